"""make_shards end to end on real files: every input kind, resume, filters, bad inputs, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from corpus import (
    bomb_png,
    file_states,
    image_bytes,
    make_input,
    read_samples,
    truncate_inside_last_image,
    write_coco,
    write_table,
)
from PIL import Image

from mmscale.shards.images import decode_image
from mmscale.shards.inspection import inspect_spec
from mmscale.shards.make_shards import main
from mmscale.data.tars import ShardTruncated, iter_raw_samples, read_sizes, spec_urls
from mmscale.shards.synthetic import make_image_folder, make_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--workers", "1", "--no-progress"]


def run(*args: str) -> int:
    return main([*map(str, args), *QUIET])


def complete_samples(path: Path) -> list[dict]:
    """The samples a truncated shard still yields whole (with image and caption)."""
    samples = []
    try:
        samples.extend(iter_raw_samples(str(path)))
    except ShardTruncated:
        pass
    return [s for s in samples if "jpg" in s and "txt" in s]


def verify(out: Path) -> list[dict]:
    """inspect_shards finds nothing wrong, sizes.json matches the tars; returns the samples."""
    report = inspect_spec(str(out), check_sizes=True, progress=False)
    assert report.all_problems == []
    urls = spec_urls(str(out))
    assert read_sizes(urls) == {shard.url: shard.samples for shard in report.shards}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == sum(shard.samples for shard in report.shards)
    return read_samples(str(out))


@pytest.mark.parametrize("kind", ["folder", "csv", "tsv", "jsonl", "parquet", "coco"])
def test_each_input_kind_gives_verified_shards(tmp_path, kind):
    args, captions, labels = make_input(kind, tmp_path)
    out = tmp_path / "out"
    assert run(*args, "--output", out, "--samples-per-shard", 5) == 0
    samples = verify(out)
    assert [s["txt"].decode() for s in samples] == captions
    assert all(len(s["__key__"]) == 9 and s["__key__"].isdigit() for s in samples)
    assert {s["cls"].decode() for s in samples if "cls" in s} == labels
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-{i:06d}.tar" for i in range(-(-len(captions) // 5))]
    meta = json.loads(samples[0]["json"])
    assert meta["caption"] == captions[0] and meta["width"] == meta["original_width"] == 48


def test_coco_first_caption_only(tmp_path):
    args, captions, _ = make_input("coco", tmp_path)
    out = tmp_path / "out"
    assert run(*args, "--output", out, "--coco-first-caption-only") == 0
    assert [s["txt"].decode() for s in verify(out)] == captions[::2]


def test_existing_tars_are_resharded_with_truncated_input_counted(tmp_path):
    source = tmp_path / "source"
    make_synthetic_shards(source, 20, samples_per_shard=8)
    # a truncated input shard: its complete samples are kept, the shard is counted as truncated
    truncate_inside_last_image(source / "shard-000002.tar")
    out = tmp_path / "out"
    assert run("--input", source, "--output", out, "--samples-per-shard", 6, "--resize", 32) == 0
    samples = verify(out)
    assert len(samples) == 16 + len(complete_samples(source / "shard-000002.tar")) >= 18
    assert all(decode_image(s["jpg"]).size == (32, 32) for s in samples)
    assert json.loads((out / "stats.json").read_text())["skipped"] == {"truncated_shard": 1}
    assert json.loads(samples[0]["json"])["source"].endswith("shard-000000.tar#000000000")


def test_rerun_is_a_no_op(tmp_path, capsys):
    args, _, _ = make_input("folder", tmp_path)
    out = tmp_path / "out"
    assert run(*args, "--output", out, "--samples-per-shard", 4, "--dedup") == 0
    before = file_states(out)
    capsys.readouterr()
    assert run(*args, "--output", out, "--samples-per-shard", 4, "--dedup") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert file_states(out) == before


@pytest.mark.parametrize("dedup", [False, True])
def test_resume_after_a_crash_ends_with_every_sample_once(tmp_path, dedup):
    images = tmp_path / "images"
    make_image_folder(images, 30, size=40, seed=1)
    for index in (3, 17, 25):  # duplicates of earlier images, spread over several shards
        shutil.copy(images / "000000.jpg", images / f"dup{index:03d}.jpg")
        shutil.copy(images / f"{index:06d}.txt", images / f"dup{index:03d}.txt")
    options = ["--input", images, "--samples-per-shard", 4] + (["--dedup"] if dedup else [])
    assert run(*options, "--output", tmp_path / "reference") == 0
    out = tmp_path / "out"
    assert run(*options, "--output", out) == 0
    # what a kill leaves: chunks without stats (one with its tar renamed, one without), a stale temporary
    (out / "shard-000002.stats.json").unlink()
    (out / "shard-000005.stats.json").unlink()
    (out / "shard-000005.tar").unlink()
    (out / ".shard-000005.tar.tmp999").write_bytes(b"half a tar")
    (out / "sizes.json").unlink()
    assert run(*options, "--output", out) == 0
    assert not list(out.glob(".*.tmp*"))
    reference = file_states(tmp_path / "reference")
    assert {name: state[2] for name, state in file_states(out).items() if name != "stats.json"} == \
        {name: state[2] for name, state in reference.items() if name != "stats.json"}
    samples = verify(out)
    assert len({s["__key__"] for s in samples}) == len(samples) == 33 - 3 * dedup
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped"] == ({"duplicate": 3} if dedup else {})


def test_killed_process_group_restarts_to_the_same_shards(tmp_path):
    images = tmp_path / "images"
    make_image_folder(images, 240, size=160, seed=2)
    for index in (5, 150):
        shutil.copy(images / "000001.jpg", images / f"dup{index:03d}.jpg")
        shutil.copy(images / f"{index:06d}.txt", images / f"dup{index:03d}.txt")
    options = ["--input", images, "--samples-per-shard", 10, "--resize", 96, "--dedup"]
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "tools" / "make_shards.py"), *map(str, options), "--output", str(out),
               "--workers", "2", "--no-progress"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(out.glob("*.stats.json")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list(out.glob("*.stats.json")))
    assert 0 < finished < 25, process.stderr.read().decode()
    assert not (out / "sizes.json").exists()
    assert run(*options, "--output", out) == 0
    assert run(*options, "--output", tmp_path / "reference") == 0
    reference = file_states(tmp_path / "reference")
    assert {name: state[2] for name, state in file_states(out).items() if name.endswith(".tar")} == \
        {name: state[2] for name, state in reference.items() if name.endswith(".tar")}
    samples = verify(out)
    assert len({s["__key__"] for s in samples}) == len(samples) == 240


def test_filters_resize_and_image_conversion(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    cases = {
        "big": (image_bytes((120, 90)), "a big noisy picture"),
        "small": (image_bytes((20, 20)), "a small noisy picture"),
        "wide": (image_bytes((300, 40)), "a wide noisy picture"),
        "short": (image_bytes((64, 64)), "tiny"),
        "long": (image_bytes((64, 64)), "word " * 40),
        "exact": (image_bytes((70, 60)), "an image that is already small"),
    }
    for name, (payload, caption) in cases.items():
        (folder / f"{name}.jpg").write_bytes(payload)
        (folder / f"{name}.txt").write_text(caption)
    (folder / "alpha.png").write_bytes(image_bytes((80, 80), image_format="PNG", mode="RGBA"))
    (folder / "alpha.txt").write_text("a png with transparency")
    (folder / "palette.webp").write_bytes(image_bytes((90, 100), image_format="WEBP", mode="RGB"))
    (folder / "palette.txt").write_text("a webp image here")
    out = tmp_path / "out"
    assert run("--input", folder, "--output", out, "--resize", 60, "--min-side", 32, "--max-aspect", 3,
               "--min-caption-chars", 8, "--max-caption-words", 20, "--jpeg-quality", 80) == 0
    samples = {json.loads(s["json"])["source"]: s for s in verify(out)}
    assert sorted(samples) == ["alpha.png", "big.jpg", "exact.jpg", "palette.webp"]
    assert decode_image(samples["big.jpg"]["jpg"]).size == (80, 60)
    assert json.loads(samples["big.jpg"]["json"])["original_width"] == 120
    assert samples["exact.jpg"]["jpg"] == cases["exact"][0]  # no resize needed: original bytes kept
    for name in ("alpha.png", "palette.webp"):
        image = decode_image(samples[name]["jpg"])
        assert image.format == "JPEG" and image.mode == "RGB" and min(image.size) == 60
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped"] == {"bad_aspect": 1, "caption_length": 2, "too_small": 1}


def test_bad_inputs_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = image_bytes((50, 50))
    files = {"good.jpg": good, "good.txt": b"a fine caption",
             "corrupt.jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "corrupt.txt": b"caption",
             "truncated.jpg": good[: len(good) // 2], "truncated.txt": b"caption",
             "empty.jpg": b"", "empty.txt": b"caption",
             "latin1.jpg": good, "latin1.txt": "caf\u00e9 cr\u00e8me".encode("latin-1"),
             "bomb.png": bomb_png(), "bomb.txt": b"caption",
             "large.jpg": image_bytes((120, 100)), "large.txt": b"caption over the pixel limit",
             "nocaption.jpg": good, "orphan.txt": b"a caption without its image"}
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    out = tmp_path / "out"
    assert run("--input", folder, "--output", out, "--max-pixels", 10_000) == 0
    assert [json.loads(s["json"])["source"] for s in verify(out)] == ["good.jpg"]
    assert json.loads((out / "stats.json").read_text())["skipped"] == {
        "bad_text": 1, "corrupt_image": 2, "empty_member": 1, "image_too_large": 2, "missing_caption": 1,
        "missing_image": 1}


def test_bad_table_rows_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.jpg").write_bytes(image_bytes((40, 40)))
    table = tmp_path / "rows.csv"
    table.write_bytes(b"path,text,y\na.jpg,fine caption,1\nmissing.jpg,no such image,2\n"
                      b"a.jpg,caf\xe9 latin-1,3\na.jpg,,4\na.jpg,not an int label,x\n,no path,5\n")
    out = tmp_path / "out"
    assert run("--input", table, "--output", out, "--image-column", "path", "--caption-column", "text",
               "--label-column", "y") == 0
    samples = verify(out)
    assert [(s["txt"], s["cls"]) for s in samples] == [(b"fine caption", b"1")]
    assert json.loads((out / "stats.json").read_text())["skipped"] == {
        "bad_label": 1, "bad_text": 1, "missing_caption": 1, "missing_image": 2}
    lines = tmp_path / "rows.jsonl"
    lines.write_bytes(b'{"image": "a.jpg", "caption": "ok"}\n{"image": "a.jpg", "caption": "caf\xe9"}\n'
                      b'{not json\n\n{"image": "a.jpg", "caption": ["a", "list"]}\n')
    assert run("--input", lines, "--output", tmp_path / "out2") == 0
    assert json.loads((tmp_path / "out2" / "stats.json").read_text())["skipped"] == {"bad_row": 1, "bad_text": 2}
    coco = write_coco(tmp_path / "coco.json", [("a.jpg", ["a caption"])])
    broken = json.loads(coco.read_text())
    broken["annotations"].append(None)
    broken["images"].append("not an image entry")
    coco.write_text(json.dumps(broken))
    assert run("--input", coco, "--output", tmp_path / "out3") == 0
    assert json.loads((tmp_path / "out3" / "stats.json").read_text())["skipped"] == {"missing_image": 1}


@pytest.mark.parametrize("kind, payload", [
    ("csv", b'image,caption\r\na.jpg,"two\r\nlines"\r\n\r\nb.jpg,"a ""quoted"" word"\r\n,\r\nc.jpg,caf\xe9\r\n'),
    ("tsv", b"image\tcaption\n" + b"".join(b"%d.jpg\tcaption %d\n" % (n, n) for n in range(70_000)) + b"\n"),
    ("jsonl", b'\n{"image": "a.jpg"}\n  \n{not json\n' + b'{"image": "b.jpg"}\n' * 70_000 + b'"a string"'),
    ("csv", b"image,caption\n"),
])
def test_row_counts_match_the_rows_read_and_report_every_byte(tmp_path, kind, payload):
    """Shards are planned from counted rows: the count must equal what iter_rows yields (quoted newlines,
    empty rows, bad JSON, no final newline), and the progress callback must reach the file's size."""
    from mmscale.shards.tables import count_rows, iter_rows

    path = tmp_path / f"rows.{kind}"
    path.write_bytes(payload)
    reported = []
    assert count_rows(str(path), kind, reported.append) == sum(1 for _ in iter_rows(str(path), kind))
    assert sum(reported) == len(payload) and all(n >= 0 for n in reported)
    if len(payload) > 2**20:  # big ones report along the way, not only at the end
        assert len(reported) > 1


def test_file_names_that_are_not_utf8_are_written_and_reported_not_a_crash(tmp_path):
    """A csv naming `caf\\xe9.jpg` (latin-1 bytes on disk): the sample is written and its KEY.json reads
    back to the same name; a missing one of that kind is listed in failed.parquet."""
    os.makedirs(tmp_path / "images")
    with open(os.path.join(os.fsencode(tmp_path / "images"), b"caf\xe9.jpg"), "wb") as handle:
        handle.write(image_bytes((40, 40)))
    table = tmp_path / "rows.csv"
    table.write_bytes(b"image,caption\nimages/caf\xe9.jpg,a cafe\nimages/gon\xe9.jpg,gone\n")
    out = tmp_path / "out"
    assert run("--input", table, "--output", out) == 0
    (sample,) = verify(out)
    assert os.fsencode(json.loads(sample["json"])["source"]).endswith(b"images/caf\xe9.jpg")
    import pyarrow.parquet as parquet

    (failed,) = parquet.read_table(out / "failed.parquet").to_pylist()
    assert failed["reason"] == "missing_image" and failed["source"].endswith("images/gon\\udce9.jpg")


def test_dedup_keeps_the_first_copy(tmp_path):
    folder = tmp_path / "in"
    samples = make_image_folder(folder, 6, size=32)
    shutil.copy(samples[1].image_path, folder / "zz_copy.jpg")
    (folder / "zz_copy.txt").write_text("a copy with another caption")
    out = tmp_path / "out"
    assert run("--input", folder, "--output", out, "--dedup", "--resize", 16) == 0
    sources = [json.loads(s["json"])["source"] for s in verify(out)]
    assert sources == [f"{i:06d}.jpg" for i in range(6)]
    assert json.loads((out / "stats.json").read_text())["skipped"] == {"duplicate": 1}


def test_max_bytes_splits_chunks_into_parts(tmp_path):
    folder = tmp_path / "in"
    make_image_folder(folder, 20, size=64)
    out = tmp_path / "out"
    options = ["--input", folder, "--output", out, "--samples-per-shard", 10, "--max-bytes-per-shard", "25KB"]
    assert main([*map(str, options), "--workers", "2", "--no-progress"]) == 0
    names = sorted(p.name for p in out.glob("*.tar"))
    assert len(names) > 2 and names[0] == "shard-000000-000.tar"
    assert all((out / name).stat().st_size <= 25_000 for name in names)
    assert len(verify(out)) == 20
    before = file_states(out)
    assert run(*options) == 0
    assert file_states(out) == before


def test_input_errors_exit_2_with_a_clear_message(tmp_path, capsys):
    def error(*args) -> str:
        capsys.readouterr()
        assert run(*args, "--output", tmp_path / "out") == 2
        message = capsys.readouterr().err
        assert "Traceback" not in message
        return message

    assert "nowhere: no such file or folder" in error("--input", tmp_path / "nowhere")
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    table = write_table(tmp_path / "t.csv", [{"image": "a.jpg", "caption": "c"}], "csv")
    assert "no column 'photo'" in error("--input", table, "--image-column", "photo")
    assert "--caption-column" in error("--input", write_table(tmp_path / "u.csv", [{"image": "a.jpg", "x": 1}],
                                                              "csv"))
    (tmp_path / "empty.csv").write_text("image,caption\n")
    assert "no rows" in error("--input", tmp_path / "empty.csv")
    assert "--image-root" in error("--input", table, "--image-root", tmp_path / "elsewhere")
    embedded = write_table(tmp_path / "e.parquet", [{"image": b"\xff\xd8", "caption": "c"}], "parquet")
    assert "holds bytes values" in error("--input", embedded)
    os.makedirs(tmp_path / "glob")
    write_table(tmp_path / "glob" / "0.parquet", [{"image": "a.jpg", "caption": "c"}], "parquet")
    write_table(tmp_path / "glob" / "1.parquet", [{"IMAGE": "a.jpg", "caption": "c"}], "parquet")
    assert "1.parquet: no column 'image'" in error("--input", str(tmp_path / "glob" / "*.parquet"),
                                                   "--image-root", tmp_path)
    (tmp_path / "notes.xyz").write_text("?")
    assert "--input-kind" in error("--input", tmp_path / "notes.xyz")
    assert run("--input", table, "--output", tmp_path / "out") == 0
    assert "other input or options" in error("--input", table, "--resize", 8)
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(table), "--output", str(tmp_path / "o"), "--name-pattern", "shard.tar"])
    assert exit_info.value.code == 2


def test_resharding_into_the_input_folder_is_refused_and_keeps_the_input(tmp_path, capsys):
    source = tmp_path / "shards"
    assert run("--input", make_input("folder", tmp_path)[0][1], "--output", source, "--samples-per-shard", 6) == 0
    for stats in source.glob("*.stats.json"):
        stats.unlink()  # as third-party shards would be: no stats files beside them
    before = {path.name: path.read_bytes() for path in source.glob("*.tar")}
    capsys.readouterr()
    assert run("--input", f"{source}/shard-{{000000..000001}}.tar", "--output", source) == 2
    assert "is in the output folder" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in source.glob("*.tar")} == before


def test_a_symlink_planted_at_the_lock_file_is_refused_not_followed(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside.lock"
    (out / ".make_shards.lock").symlink_to(outside)
    capsys.readouterr()
    assert run(*make_input("folder", tmp_path)[0], "--output", out) == 2
    assert ".make_shards.lock is a symbolic link" in capsys.readouterr().err
    assert not outside.exists() and not list(out.glob("*.tar"))


def test_synthetic_corpus_is_deterministic_and_described(tmp_path):
    first = make_image_folder(tmp_path / "a", 5, size=32, seed=4, image_format="png")
    second = make_image_folder(tmp_path / "b", 5, size=32, seed=4, image_format="png")
    assert [s.caption for s in first] == [s.caption for s in second]
    assert [Path(s.image_path).read_bytes() for s in first] == [Path(s.image_path).read_bytes() for s in second]
    assert all(s.caption.split()[2] in ("circle", "square", "triangle") for s in first)
    assert Image.open(first[0].image_path).size == (32, 32)
