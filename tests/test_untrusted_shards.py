"""Shards from elsewhere: every hostile member kind is skipped and counted, never run or decoded, by every reader.

One crafted folder holds good samples between an EPS body named `.png`, a 150 M-pixel PNG (under PIL's own
bomb limit, so PIL alone would decode it), a 70 MB member (over data.max_member_bytes' 64 MiB default),
`KEY.__index__` / `KEY.__url__` members, a caption `.json` nested 100,000 deep, and beside it an xz file
named `.tar` that expands to a 50 MB member. The loader, `mmscale data-check`, `inspect_shards` and
`make_shards` (tar input) each run in a subprocess on it and on a folder of the good samples alone, reading in
that process (no worker processes): each must deliver the good samples, count every bad one under its reason,
and peak within MEMORY_BOUND_MB of its run on the good samples (decoding the PNG alone takes 150 MB, reading
the big member 70 MB).
"""

from __future__ import annotations

import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from corpus import write_tar
from PIL import EpsImagePlugin, Image, ImageDraw
from shardkit import jpeg_bytes

from mmscale.shards.images import ImageOptions, decode_image, prepare_image
from mmscale.data.tars import SampleRejected, iter_raw_samples, tar_member
from mmscale.data.transforms import decode_and_crop

ROOT = Path(__file__).resolve().parents[1]
MEMORY_BOUND_MB = 40
GOOD_KEYS = [f"good{i}" for i in range(6)]
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")
BAD_SAMPLES = Counter(not_an_image=1, image_too_large=1, member_too_large=1, reserved_member=2, bad_json=1)


def _png_bomb() -> bytes:
    """15,000 x 10,000 grey pixels in stripes: 150 M pixels, 150 MB once decoded, from about 170 KB. (Blank
    pixels would not do: their pages stay untouched and never show in the RSS.)"""
    image = Image.new("L", (15_000, 10_000))
    draw = ImageDraw.Draw(image)
    for x in range(0, 15_000, 50):
        draw.line([(x, 0), (x, 9_999)], fill=255, width=3)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _xz_tar(member_bytes: int) -> bytes:
    """A tar of one huge member of zeros, xz-compressed to a few KB."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.addfile(*tar_member("zeros.jpg", bytes(member_bytes)))
    return lzma.compress(buffer.getvalue(), preset=6)


def _good(i: int) -> list[tuple[str, bytes]]:
    return [(f"good{i}.jpg", jpeg_bytes(i)), (f"good{i}.txt", f"a good caption {i}".encode())]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    crafted, clean = tmp_path_factory.mktemp("crafted"), tmp_path_factory.mktemp("clean")
    caption = [("txt", b"a caption")]
    bad = {
        "eps": [("png", EPS)] + caption,
        "bomb": [("png", _png_bomb())] + caption,
        "huge": [("jpg", bytes(70_000_000))] + caption,
        "index": [("jpg", jpeg_bytes(7)), ("__index__", b"not a number")] + caption,
        "url": [("jpg", jpeg_bytes(8)), ("__url__", b"elsewhere")] + caption,
        "nested": [("jpg", jpeg_bytes(9)), ("json", b'{"caption": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")],
    }
    members = []
    for i, (key, parts) in enumerate(bad.items()):  # a good sample first and last, bad ones between
        members += _good(i) + [(f"{key}.{extension}", payload) for extension, payload in parts]
    members += [item for i in range(len(bad), len(GOOD_KEYS)) for item in _good(i)]
    write_tar(crafted / "crafted-000000.tar", members)
    (crafted / "crafted-000001.tar").write_bytes(_xz_tar(50_000_000))
    write_tar(clean / "clean-000000.tar", [item for i in range(len(GOOD_KEYS)) for item in _good(i)])
    return {"crafted": crafted, "clean": clean}


# Imported before the peak is reset (Linux: /proc/self/clear_refs), so that it measures the reading, not the imports.
_IMPORTS = textwrap.dedent("""
    import json
    import PIL.Image, torch, webdataset
    import mmscale.data.check, mmscale.shards.inspection, mmscale.data.loader, mmscale.shards.make_shards
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
""")


def _run_measured(code: str, tmp_path: Path) -> dict:
    """Run `code` in a fresh interpreter; its JSON result with `peak_mb`, its peak RSS in MB after the imports.
    (VmHWM, which clear_refs resets; getrusage's ru_maxrss also keeps the peak of the process it was forked from.)"""
    script = tmp_path / "measured.py"
    script.write_text(_IMPORTS + textwrap.dedent(code) + textwrap.dedent("""
        peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print("RESULT " + json.dumps(dict(result, peak_mb=peak / 1024)))
    """))
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT)))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _both(code: str, folders: dict[str, Path], tmp_path: Path) -> tuple[dict, dict]:
    runs = {}
    for name in ("crafted", "clean"):
        (tmp_path / name).mkdir()
        runs[name] = _run_measured(code.replace("FOLDER", str(folders[name])).replace("OUT", str(tmp_path / name)),
                                   tmp_path / name)
    crafted, clean = runs["crafted"]["peak_mb"], runs["clean"]["peak_mb"]
    print(f"peak RSS after imports: crafted {crafted:.0f} MB, good samples only {clean:.0f} MB")
    assert crafted - clean < MEMORY_BOUND_MB, f"the crafted shards cost {crafted - clean:.0f} MB more at peak"
    return runs["crafted"], runs["clean"]


def test_the_loader_delivers_the_good_samples_and_counts_each_bad_one(folders, tmp_path, tokenizer_dir):
    code = f"""
        import json
        from mmscale.data.config import DataConfig
        from mmscale.data.loader import build_loader
        from mmscale.data.text import load_tokenizer
        config = DataConfig(image_size=32, context_length=16, workers=0, max_bad_shard_fraction=0.5)
        loader = build_loader(config, spec="FOLDER", tokenizer=load_tokenizer("{tokenizer_dir}"), batch_size=2,
                              train=False)
        keys = [key for batch in loader for key in batch["keys"]]
        result = dict(keys=keys, skipped=dict(loader.skipped))
    """
    crafted, clean = _both(code, folders, tmp_path)
    assert sorted(crafted["keys"]) == sorted(clean["keys"]) == GOOD_KEYS
    assert Counter(crafted["skipped"]) == BAD_SAMPLES + Counter(shard_not_a_tar=1)


def test_data_check_trains_past_every_bad_kind(folders, tmp_path, tokenizer_dir):
    code = f"""
        import json
        from mmscale.config import load_config
        from mmscale.data.check import DataCheckConfig, run_data_check
        config = load_config(DataCheckConfig, None, ["data.train=FOLDER", "tokenizer={tokenizer_dir}", "batch_size=2",
                                                     "batches=4", "data.workers=0", "data.shuffle_buffer=0",
                                                     "data.max_bad_shard_fraction=0.5", "data.image_size=32"])
        report = run_data_check(config)
        result = dict(samples=report.samples, skipped=report.skipped)
    """
    crafted, clean = _both(code, folders, tmp_path)
    assert crafted["samples"] == clean["samples"] == 8  # a whole epoch of the 6 good samples, and 2 of the next
    assert set(crafted["skipped"]) == set(BAD_SAMPLES) | {"shard_not_a_tar"}


def test_inspect_shards_reports_each_bad_sample_under_its_reason(folders, tmp_path):
    code = """
        import json
        from mmscale.shards.inspection import inspect_spec
        report = inspect_spec("FOLDER", progress=False)
        result = dict(samples=sum(shard.samples for shard in report.shards), bad=dict(report.bad_samples),
                      problems=report.all_problems)
    """
    crafted, clean = _both(code, folders, tmp_path)
    assert clean["bad"] == {} and clean["samples"] == len(GOOD_KEYS)
    assert Counter(crafted["bad"]) == BAD_SAMPLES and crafted["samples"] == len(GOOD_KEYS) + sum(BAD_SAMPLES.values())
    assert any("crafted-000001.tar: compressed with xz" in problem for problem in crafted["problems"])


def test_make_shards_reshards_the_good_samples_and_counts_the_rest(folders, tmp_path):
    code = """
        import json, sys
        from mmscale.shards.make_shards import main
        from mmscale.data.tars import iter_raw_samples, spec_urls
        code = main(["--input", "FOLDER", "--output", "OUT/out", "--workers", "1", "--no-progress"])
        captions = sorted(s["txt"].decode() for url in spec_urls("OUT/out") for s in iter_raw_samples(url))
        stats = json.load(open("OUT/out/stats.json"))
        result = dict(code=code, captions=captions, skipped=stats["skipped"])
    """
    crafted, clean = _both(code, folders, tmp_path)
    assert crafted["code"] == clean["code"] == 0
    assert crafted["captions"] == clean["captions"] == [f"a good caption {i}" for i in range(len(GOOD_KEYS))]
    assert Counter(crafted["skipped"]) == BAD_SAMPLES + Counter(shard_not_a_tar=1)


def test_an_eps_body_never_reaches_pils_eps_plugin(monkeypatch):
    """PIL alone opens these bytes as EPS and runs Ghostscript to load them; mmscale's readers never try it."""
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: calls.append(args) or None)
    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # the vector: PIL's own open picks the EPS plugin
    with pytest.raises(Exception):
        Image.open(io.BytesIO(EPS)).load()
    assert len(calls) == 1
    readers = [lambda: decode_and_crop(EPS, "png", size=16, max_pixels=10**6),
               lambda: decode_and_crop(EPS, "jpg", size=16, max_pixels=10**6),
               lambda: prepare_image(EPS, ImageOptions()), lambda: decode_image(EPS)]
    for read in readers:
        with pytest.raises(SampleRejected, match="not_an_image"):
            read()
    assert len(calls) == 1


def test_a_bomb_under_pils_own_limit_is_refused_from_its_header():
    """150 M pixels is under PIL's 179 M error threshold: without mmscale's limit PIL would decode it."""
    bomb = _png_bomb()
    for read in (lambda: prepare_image(bomb, ImageOptions()), lambda: decode_image(bomb),
                 lambda: decode_and_crop(bomb, "png", size=16, max_pixels=89_478_485)):
        with pytest.raises(SampleRejected, match="image_too_large"):
            read()
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # the process-wide limit is restored


def test_only_used_members_are_read_and_metadata_cannot_be_overwritten(tmp_path):
    path = write_tar(tmp_path / "a.tar", [("k.jpg", b"image"), ("k.txt", b"caption"), ("k.bin", b"x" * 1000),
                                          ("k.__key__", b"other"), ("j.txt", b"caption")])
    [first, second] = iter_raw_samples(str(path), extensions=("jpg", "txt"))
    assert set(first) == {"__key__", "__url__", "__index__", "__rejected__", "jpg", "txt"}
    assert first["__key__"] == "k" and first["__rejected__"].reason == "reserved_member"
    assert second == {"__key__": "j", "__url__": str(path), "__index__": 1, "txt": b"caption"}
    small = next(iter_raw_samples(str(path), extensions=("jpg", "bin"), max_member_bytes=999))
    assert small["__rejected__"].reason == "member_too_large" and "bin" not in small and small["jpg"] == b"image"
