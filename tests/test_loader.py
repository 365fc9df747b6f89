"""The streaming loader on real tar shards: coverage, resampling, resume, skips."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus import write_tar
from PIL import Image
from shardkit import jpeg_bytes, write_shards

from mmscale.data.config import DataConfig
from mmscale.data.epochs import repartitioned_state
from mmscale.data.loader import (
    BatchLoader,
    ShardStream,
    StreamSettings,
    UnusableData,
    build_loader,
)
from mmscale.data.samples import AugmentSettings, SampleDecoder
from mmscale.data.tars import parse_spec
from mmscale.data.text import IGNORE_INDEX, CaptionEncoder

CONFIG = DataConfig(image_size=32, context_length=16, shuffle_buffer=16, workers=0)


def make_stream(tokenizer, spec, *, rank=0, world_size=1, epochs=1, sampling="epoch", batch_size=4,
                drop_last=False, shuffle_buffer=16, config=CONFIG):
    settings = StreamSettings(
        sources=tuple(parse_spec(spec)), sampling=sampling, rank=rank, world_size=world_size, seed=7,
        shuffle_buffer=shuffle_buffer, batch_size=batch_size, epochs=epochs, drop_last=drop_last,
    )
    augment = AugmentSettings(image_size=config.image_size, max_pixels=config.max_pixels, train=True,
                              hflip_probability=0.5)
    captions = CaptionEncoder(tokenizer, context_length=config.context_length, mlm_probability=0.15)
    return ShardStream(settings, SampleDecoder(augment, captions))


def test_batch_layout(tmp_path, tokenizer):
    urls = write_shards(tmp_path, shards=2, per_shard=6, labels=True)
    loader = build_loader(CONFIG, spec="::".join(urls), tokenizer=tokenizer, batch_size=4, train=True)
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.uint8
    width = batch["input_ids"].shape[1]  # the longest caption's length, rounded up to a multiple of 8
    assert width % 8 == 0 and width <= 16 and batch["attention_mask"][:, width - 8:].sum(1).max() > 0
    for name in ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"):
        assert batch[name].shape == (4, width) and batch[name].dtype == torch.long
    assert batch["input_ids"][:, 0].eq(tokenizer.cls_token_id).all()
    # The masked positions, flat into 4 x width, with their targets: the same tokens mlm_labels names.
    positions, targets = batch["mlm_positions"], batch["mlm_targets"]
    real = targets != IGNORE_INDEX
    assert len(positions) % 16 == 0 and torch.equal(targets[real], batch["mlm_labels"].flatten()[positions[real]])
    assert int(real.sum()) == int((batch["mlm_labels"] != IGNORE_INDEX).sum())
    assert set(batch["labels"].tolist()) <= {0, 1, 2}
    assert len(batch["keys"]) == 4


@pytest.mark.slow
def test_epoch_mode_visits_every_sample_once_across_ranks_and_workers(tmp_path, tokenizer):
    urls = write_shards(tmp_path, shards=8, per_shard=9)
    seen = Counter()
    for rank in range(2):
        stream = make_stream(tokenizer, "::".join(urls), rank=rank, world_size=2, batch_size=4)
        loader = BatchLoader(stream, workers=2)
        for batch in loader:
            seen.update(batch["keys"])
        assert loader.skipped == Counter()
    assert len(seen) == 72
    assert set(seen.values()) == {1}


def test_epochs_follow_each_other_seamlessly_in_a_new_order(tmp_path, tokenizer):
    urls = write_shards(tmp_path, shards=4, per_shard=8)
    stream = make_stream(tokenizer, "::".join(urls), epochs=2, batch_size=8)
    keys = [key for batch in BatchLoader(stream, workers=0) for key in batch["keys"]]
    assert len(keys) == 64 and set(Counter(keys).values()) == {2}
    first, second = keys[:32], keys[32:]
    assert first != second and first != sorted(first)


def test_resampled_mode_is_endless_and_weights_sources(tmp_path, tokenizer):
    a = write_shards(tmp_path / "a", shards=3, per_shard=10, prefix="a")
    b = write_shards(tmp_path / "b", shards=3, per_shard=10, prefix="b")
    spec = f"{tmp_path}/a/a-{{000000..000002}}.tar@3::{tmp_path}/b/b-{{000000..000002}}.tar@1"
    stream = make_stream(tokenizer, spec, epochs=None, sampling="resampled", batch_size=10, shuffle_buffer=4)
    counts = Counter()
    iterator = iter(BatchLoader(stream, workers=0))
    for _ in range(120):  # 1,200 samples from 60 distinct ones: only an endless stream gets here
        counts.update(key[0] for key in next(iterator)["keys"])
    share = counts["a"] / (counts["a"] + counts["b"])
    assert len(a) == len(b) == 3
    assert 0.65 < share < 0.85, counts  # expected 0.75


def _batches_equal(left: dict, right: dict) -> bool:
    return left["keys"] == right["keys"] and all(
        torch.equal(left[name], right[name]) for name in ("images", "input_ids", "mlm_input_ids", "mlm_labels"))


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_state_yields_exactly_the_uninterrupted_batches(tmp_path, tokenizer, workers):
    urls = write_shards(tmp_path, shards=4, per_shard=11)
    config = DataConfig(image_size=32, context_length=16, shuffle_buffer=16, workers=workers)
    spec = "::".join(urls)

    def loader():
        return build_loader(config, spec=spec, tokenizer=tokenizer, batch_size=4, train=True)

    straight_iter = iter(loader())
    straight = [next(straight_iter) for _ in range(30)]  # crosses epoch boundaries
    first = loader()
    first_iter = iter(first)
    for _ in range(13):
        next(first_iter)
    state = first.state_dict()
    del first_iter, first
    resumed = loader()
    resumed.load_state_dict(state)
    resumed_iter = iter(resumed)
    for expected in straight[13:]:
        assert _batches_equal(next(resumed_iter), expected)
    assert resumed.samples_delivered == 30 * 4


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_leaves_the_trainers_random_generator_alone(tmp_path, tokenizer, workers):
    """A resumed run restores torch's generator before its loader starts: a loader that drew from it (the
    workers' base seed of each iter()) shifted every later draw of the model (the fusion model's ITM negatives)."""
    config = DataConfig(image_size=32, context_length=16, shuffle_buffer=16, workers=workers)
    spec = "::".join(write_shards(tmp_path, shards=2, per_shard=6))
    torch.manual_seed(3)
    before = torch.get_rng_state()
    loader = build_loader(config, spec=spec, tokenizer=tokenizer, batch_size=4, train=True)
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    resumed = build_loader(config, spec=spec, tokenizer=tokenizer, batch_size=4, train=True)
    resumed.load_state_dict(state)
    next(iter(resumed))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("old_batches,epochs", [(4, 1), (8, 2), (11, 2)], ids=["mid-epoch", "one-reader-past-it",
                                                                               "both-readers-past-it"])
@pytest.mark.parametrize("new_ranks,new_workers", [(1, 0), (3, 0), (3, 2)])
def test_a_changed_number_of_readers_trains_the_rest_exactly_once(tmp_path, tokenizer, old_batches, epochs, new_ranks,
                                                                  new_workers):
    """2 ranks x 1 worker read some batches and save; the rest goes on with 1 or 3 ranks of 0 or 2 workers.
    Whatever sat in shuffle buffers goes back to the pool: over the epochs every key is trained exactly
    once per epoch, none twice, none lost. (8 batches of 4 per rank cross into the second epoch on the rank
    with fewer samples, 11 on both, with samples of the first still in their buffers.)"""
    urls = write_shards(tmp_path, shards=7, per_shard=10)
    spec = "::".join(urls)

    def loader(rank, world, workers):
        stream = make_stream(tokenizer, spec, rank=rank, world_size=world, epochs=epochs, shuffle_buffer=8)
        return BatchLoader(stream, workers=workers)

    trained, saved = Counter(), []
    for rank in range(2):
        old = loader(rank, 2, 1)
        batches = iter(old)
        for _ in range(old_batches):
            trained.update(next(batches)["keys"])
        saved.append(old.state_dict())
        del batches
    for rank in range(new_ranks):
        new = loader(rank, new_ranks, new_workers)
        new.load_state_dict(repartitioned_state(saved, rank=rank, step=old_batches))
        for batch in new:
            trained.update(batch["keys"])
    everything = {f"shard{shard:03d}x{i:05d}" for shard in range(7) for i in range(10)}
    assert set(trained) == everything
    assert set(trained.values()) == {epochs}, {key: n for key, n in trained.items() if n != epochs}


def test_a_changed_layout_in_resampled_sampling_starts_new_streams(tmp_path, tokenizer):
    urls = write_shards(tmp_path, shards=4, per_shard=6)
    spec = "::".join(urls)
    old = BatchLoader(make_stream(tokenizer, spec, sampling="resampled", epochs=None, world_size=2), workers=0)
    batches = iter(old)
    first = [next(batches)["keys"] for _ in range(3)]
    resumed = BatchLoader(make_stream(tokenizer, spec, sampling="resampled", epochs=None), workers=0)
    resumed.load_state_dict(repartitioned_state([old.state_dict(), old.state_dict()], rank=0, step=3))
    again = iter(resumed)
    continued = [next(again)["keys"] for _ in range(3)]
    later = [next(batches)["keys"] for _ in range(3)]  # what the old reader 0 would have drawn next
    assert continued != first and continued != later  # a new stream, not a replay of the old one
    assert len({key for keys in continued for key in keys}) > 1


def test_a_changed_layout_over_other_shards_is_refused(tmp_path, tokenizer):
    urls = write_shards(tmp_path, shards=4, per_shard=6)
    old = BatchLoader(make_stream(tokenizer, "::".join(urls), world_size=2), workers=0)
    batches = iter(old)
    next(batches)
    saved = [old.state_dict()] * 2
    other = BatchLoader(make_stream(tokenizer, "::".join(urls[:3])), workers=0)
    other.load_state_dict(repartitioned_state(saved, rank=0, step=1))
    with pytest.raises(ValueError, match="resume with the same data.sampling, data.seed and shard spec"):
        next(iter(other))


def test_resume_decodes_only_unseen_samples(tmp_path, tokenizer):
    urls = write_shards(tmp_path, shards=2, per_shard=40)
    stream = make_stream(tokenizer, "::".join(urls), batch_size=5, shuffle_buffer=8)
    loader = BatchLoader(stream, workers=0)
    iterator = iter(loader)
    delivered = [next(iterator)["keys"] for _ in range(10)]
    state = loader.state_dict()

    resumed_stream = make_stream(tokenizer, "::".join(urls), batch_size=5, shuffle_buffer=8)
    decoded = []
    original_decode = resumed_stream.decoder.decode
    resumed_stream.decoder.decode = lambda raw, seed: decoded.append(raw["__key__"]) or original_decode(raw, seed=seed)
    resumed = BatchLoader(resumed_stream, workers=0)
    resumed.load_state_dict(state)
    rest = [key for batch in resumed for key in batch["keys"]]
    already = {key for keys in delivered for key in keys}
    assert len(already) == 50 and len(rest) == 30 and already.isdisjoint(rest)
    assert sorted(decoded) == sorted(rest)  # nothing before the resume point was decoded again


def _bomb_png() -> bytes:
    """A real decompression bomb: 10,000 x 9,000 1-bit pixels (over PIL's limit) in a few KB."""
    buffer = io.BytesIO()
    Image.new("1", (10_000, 9_000)).save(buffer, "PNG")
    return buffer.getvalue()


def test_every_bad_input_kind_is_skipped_and_counted(tmp_path, tokenizer):
    good = jpeg_bytes(1)
    members = []

    def add(key, **parts):
        members.extend((f"{key}.{ext}", payload) for ext, payload in parts.items())

    add("k00", jpg=good, txt=b"a good one")
    add("k01", jpg=good[: len(good) // 2], txt=b"truncated jpeg")
    add("k02", jpg=b"\x00garbage" * 20, txt=b"not an image at all")
    add("k03", jpg=good)  # no caption
    add("k04", txt=b"no image")
    add("k05", jpg=good, txt=b"\xff\xfe caption in latin-1 \xe9")
    add("k06", jpg=b"", txt=b"zero-byte image")
    add("k07", jpg=good, txt=b"")
    add("k08", png=_bomb_png(), txt=b"decompression bomb")
    add("k09", jpg=good, txt=b"another good one")
    add("k10", jpg=good, json=json.dumps({"caption": "caption from json"}).encode())
    write_tar(tmp_path / "bad-000000.tar", members)
    # A truncated tar: a good shard cut in the middle of its second image.
    write_tar(tmp_path / "whole.tar", [("t0.jpg", good), ("t0.txt", b"kept"), ("t1.jpg", good), ("t1.txt", b"lost")])
    whole = (tmp_path / "whole.tar").read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        cut = tar.getmember("t1.jpg").offset_data + len(good) // 2
    (tmp_path / "bad-000001.tar").write_bytes(whole[:cut])
    (tmp_path / "whole.tar").unlink()

    loader = build_loader(CONFIG, spec=f"{tmp_path}/bad-{{000000..000001}}.tar", tokenizer=tokenizer,
                          batch_size=2, train=False)
    with pytest.warns(UserWarning, match="bad-000001.tar: truncated"):
        keys = [key for batch in loader for key in batch["keys"]]
    assert sorted(keys) == ["k00", "k09", "k10", "t0"]
    assert loader.skipped == Counter(corrupt_image=1, not_an_image=1, missing_caption=1, missing_image=1, bad_text=1,
                                     empty_member=2, image_too_large=1, truncated_shard=1)


def unreadable_shards(folder: Path) -> dict[str, str]:
    """A missing shard, a zero-byte one and a file that is not a tar, by the reason each is skipped under."""
    (folder / "zero-000000.tar").write_bytes(b"")
    (folder / "text-000000.tar").write_text("not a tar file, but named like one\n" * 40)
    return {"shard_missing": str(folder / "nope-000001.tar"), "shard_empty": str(folder / "zero-000000.tar"),
            "shard_not_a_tar": str(folder / "text-000000.tar")}


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_shards_are_skipped_counted_and_named(tmp_path, tokenizer, workers):
    urls = write_shards(tmp_path, shards=3, per_shard=3)
    bad = unreadable_shards(tmp_path)
    config = DataConfig(image_size=32, context_length=16, workers=workers, max_bad_shard_fraction=0.7)
    loader = build_loader(config, spec="::".join(urls + list(bad.values())), tokenizer=tokenizer, batch_size=2,
                          train=False)
    # Worker processes warn on their own stderr, out of pytest's reach.
    named = pytest.warns(UserWarning, match="skipped shard .*nope-000001.tar: no such file") if workers == 0 \
        else contextlib.nullcontext()
    with named:
        keys = [key for batch in loader for key in batch["keys"]]
    assert sorted(keys) == sorted(f"shard{s:03d}x{i:05d}" for s in range(3) for i in range(3))
    assert loader.skipped == Counter({reason: 1 for reason in bad})


def test_too_many_unreadable_shards_stop_with_the_numbers(tmp_path, tokenizer):
    urls = write_shards(tmp_path, shards=1, per_shard=3)
    spec = f"{urls[0]}::{tmp_path}/nope-000001.tar"
    loader = build_loader(CONFIG, spec=spec, tokenizer=tokenizer, batch_size=2, train=False)  # the default 0.05
    with pytest.warns(UserWarning, match="skipped shard"), pytest.raises(
            UnusableData, match=r"1 of the 2 shards of epoch 0 were unreadable, more than "
                                r"data.max_bad_shard_fraction=0.05 \(last: shard .*nope-000001.tar: no such file"):
        list(loader)
    tolerant = DataConfig(image_size=32, context_length=16, workers=0, max_bad_shard_fraction=0.5)
    with pytest.warns(UserWarning, match="skipped shard"):
        assert len(list(build_loader(tolerant, spec=spec, tokenizer=tokenizer, batch_size=3, train=False))) == 1


@pytest.mark.parametrize("bad_count", [1, 2])
def test_the_unreadable_fraction_is_of_the_epochs_shards_across_readers(tmp_path, tokenizer, bad_count):
    """20 shards over 10 ranks, data.max_bad_shard_fraction=0.05: one missing shard (5% of the epoch) is within
    the limit although it is half of one reader's shards; two (10%) are over it once the ranks' counts are put
    together, as the training loop does at log steps (each rank alone has seen at most one)."""
    urls = write_shards(tmp_path, shards=20 - bad_count, per_shard=2)
    spec = "::".join(urls + [str(tmp_path / f"nope-{i:06d}.tar") for i in range(bad_count)])
    config = DataConfig(image_size=32, context_length=16, workers=0, shuffle_buffer=0)
    loaders = [build_loader(config, spec=spec, tokenizer=tokenizer, batch_size=1, train=True, rank=rank,
                            world_size=10, epochs=1) for rank in range(10)]
    with pytest.warns(UserWarning, match="skipped shard"):
        keys = [key for loader in loaders for batch in loader for key in batch["keys"]]
    assert sorted(keys) == sorted(f"shard{s:03d}x{i:05d}" for s in range(20 - bad_count) for i in range(2))
    combined = sum((loader.bad_shards for loader in loaders), Counter())
    assert combined == Counter({0: bad_count}) and all(loader.bad_shards[0] <= 1 for loader in loaders)
    if bad_count == 1:
        loaders[0].check_bad_shards(combined)
    else:
        with pytest.raises(UnusableData, match=r"2 of the 20 shards of epoch 0 were unreadable, more than "
                                               r"data.max_bad_shard_fraction=0.05"):
            loaders[0].check_bad_shards(combined)


def test_resampling_judges_unreadable_shards_over_its_last_draws(tmp_path, tokenizer):
    urls = write_shards(tmp_path, shards=1, per_shard=4)
    spec = f"{urls[0]}::{tmp_path}/nope-000001.tar"  # half the draws hit the missing shard
    stream = make_stream(tokenizer, spec, epochs=None, sampling="resampled", batch_size=4)
    with pytest.warns(UserWarning, match="skipped shard"), pytest.raises(UnusableData, match="of its last 20 draws"):
        for _ in zip(range(100), BatchLoader(stream, workers=0)):
            pass


def test_a_permission_denied_shard_is_skipped(tmp_path, tokenizer, monkeypatch):
    # Tests may run as root, whom chmod does not stop: deny the one file at open() instead.
    urls = write_shards(tmp_path, shards=2, per_shard=3)
    real_open = open
    def guarded(path, *args, **kwargs):
        if str(path) == urls[1]:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("mmscale.data.tars.open", guarded, raising=False)
    config = DataConfig(image_size=32, context_length=16, workers=0, max_bad_shard_fraction=0.5)
    loader = build_loader(config, spec="::".join(urls), tokenizer=tokenizer, batch_size=3, train=False)
    with pytest.warns(UserWarning, match="permission denied"):
        assert [key for batch in loader for key in batch["keys"]] == [f"shard000x{i:05d}" for i in range(3)]
    assert loader.skipped == Counter(shard_permission=1)


def test_remote_shards_are_retried_with_backoff_then_skipped(tmp_path, tokenizer, monkeypatch):
    import fsspec

    urls = write_shards(tmp_path, shards=2, per_shard=3)
    memory = fsspec.filesystem("memory")
    for url in urls:
        memory.pipe(f"/flaky/{Path(url).name}", Path(url).read_bytes())
    memory.pipe("/flaky/sizes.json", Path(urls[0]).with_name("sizes.json").read_bytes())  # nothing to count first
    failures = Counter({"memory://flaky/shard-000000.tar": 2, "memory://flaky/shard-000001.tar": 99})
    real_open, sleeps = fsspec.open, []
    def flaky(url, *args, **kwargs):
        if failures[url] > 0:
            failures[url] -= 1
            raise ConnectionError("connection reset by peer")
        return real_open(url, *args, **kwargs)
    monkeypatch.setattr(fsspec, "open", flaky)
    monkeypatch.setattr("mmscale.data.tars.time.sleep", sleeps.append)
    config = DataConfig(image_size=32, context_length=16, workers=0, max_bad_shard_fraction=0.5)
    loader = build_loader(config, spec="memory://flaky/shard-{000000..000001}.tar", tokenizer=tokenizer,
                          batch_size=3, train=False)
    with pytest.warns(UserWarning, match=r"shard-000001.tar: cannot open after 4 attempts \(connection reset"):
        keys = [key for batch in loader for key in batch["keys"]]
    assert keys == [f"shard000x{i:05d}" for i in range(3)]  # opened on its third try
    assert sleeps == [1.0, 2.0, 1.0, 2.0, 4.0] and loader.skipped == Counter(shard_remote=1)


@pytest.mark.parametrize("sizes_json", [True, False], ids=["listed", "counted"])
def test_fewer_shards_than_readers_share_them_and_train_each_sample_once(tmp_path, tokenizer, sizes_json):
    """Readers cut the epoch by samples, not by shards: 3 shards of 5, 9 and 2 samples over 2 ranks x 2 workers
    (4 readers) give every reader 4 samples, and every sample is read once (sizes counted without sizes.json)."""
    urls = [write_shards(tmp_path / f"s{i}", shards=1, per_shard=n, prefix=f"s{i}")[0] for i, n in enumerate((5, 9, 2))]
    if not sizes_json:
        for url in urls:
            Path(url).with_name("sizes.json").unlink()
    config = DataConfig(image_size=32, context_length=16, workers=2, shuffle_buffer=3)
    seen, per_reader = Counter(), []
    for rank in range(2):
        loader = build_loader(config, spec="::".join(urls), tokenizer=tokenizer, batch_size=2, train=True, rank=rank,
                              world_size=2, epochs=1)
        keys = [batch["keys"] for batch in loader]
        per_reader += [sum(map(len, keys[worker::2])) for worker in range(2)]
        seen.update(key for batch in keys for key in batch)
    assert per_reader == [4, 4, 4, 4]
    assert set(seen) == {f"s{i}{0:03d}x{j:05d}" for i, n in enumerate((5, 9, 2)) for j in range(n)}
    assert set(seen.values()) == {1}


def test_training_with_fewer_samples_than_readers_is_refused_with_sizes_that_work(tmp_path, tokenizer):
    urls = write_shards(tmp_path, shards=1, per_shard=3)
    config = DataConfig(image_size=32, context_length=16, workers=2)
    with pytest.raises(ValueError, match=r"3 samples for 4 readers \(2 ranks x 2 workers\): .*set data.workers=1 "
                                         r"or fewer, or use more data"):
        build_loader(config, spec=urls[0], tokenizer=tokenizer, batch_size=2, train=True, rank=0, world_size=2)
    build_loader(config, spec=urls[0], tokenizer=tokenizer, batch_size=2, train=True, rank=0, world_size=1)


def test_pipe_urls_are_refused_unless_the_environment_allows_them(tmp_path, tokenizer, monkeypatch):
    monkeypatch.delenv("MMSCALE_ALLOW_PIPE", raising=False)
    with pytest.raises(ValueError, match="pipe: URLs run shell commands .* pass --allow-pipe"):
        build_loader(CONFIG, spec="pipe:cat x.tar", tokenizer=tokenizer, batch_size=2, train=True)
    urls = write_shards(tmp_path, shards=1, per_shard=3)
    monkeypatch.setenv("MMSCALE_ALLOW_PIPE", "1")
    config = DataConfig(image_size=32, context_length=16, workers=0)
    loader = build_loader(config, spec=f"pipe:cat {urls[0]}", tokenizer=tokenizer, batch_size=3, train=False)
    assert len(next(iter(loader))["keys"]) == 3


def test_a_folders_file_named_like_a_pipe_is_read_as_a_file_not_run(tmp_path, tokenizer, monkeypatch):
    """A folder expands to its *.tar files; one named `pipe:...` must stay a path even with pipes allowed."""
    urls = write_shards(tmp_path / "data", shards=1, per_shard=3)
    marker = tmp_path / "data" / "ran"
    os.rename(urls[0], tmp_path / "data" / "pipe:touch ran; cat x.tar")
    monkeypatch.setenv("MMSCALE_ALLOW_PIPE", "1")
    monkeypatch.chdir(tmp_path / "data")
    config = DataConfig(image_size=32, context_length=16, workers=0)
    loader = build_loader(config, spec=".", tokenizer=tokenizer, batch_size=3, train=False)
    assert len(next(iter(loader))["keys"]) == 3 and not marker.exists()


def test_train_images_are_augmented_and_eval_images_are_not(tmp_path, tokenizer):
    write_tar(tmp_path / "one.tar", [("x.jpg", jpeg_bytes(3, (64, 48))), ("x.txt", b"one image")])
    config = DataConfig(image_size=32, context_length=16, workers=0, crop_scale=(0.2, 1.0))
    def image(train, epochs):
        loader = build_loader(config, spec=str(tmp_path / "one.tar"), tokenizer=tokenizer, batch_size=1,
                              train=train, epochs=epochs)
        return [batch["images"][0] for batch in loader]
    train = image(True, 3)
    assert len(train) == 3 and not torch.equal(train[0], train[1])
    evaluated = image(False, None) + image(False, None)
    assert torch.equal(evaluated[0], evaluated[1])
    source = Image.open(io.BytesIO(jpeg_bytes(3, (64, 48)))).convert("RGB")
    reference = np.asarray(source.resize((32, 32), box=(8, 0, 56, 48)))
    assert np.abs(evaluated[0].permute(1, 2, 0).numpy().astype(int) - reference.astype(int)).mean() < 12



def test_fsspec_urls_are_read(tmp_path, tokenizer):
    import fsspec

    urls = write_shards(tmp_path, shards=2, per_shard=3)
    memory = fsspec.filesystem("memory")
    for url in urls:
        memory.pipe(f"/remote/{Path(url).name}", Path(url).read_bytes())
    loader = build_loader(CONFIG, spec="memory://remote/shard-{000000..000001}.tar", tokenizer=tokenizer,
                          batch_size=4, train=False)
    assert sorted(key for batch in loader for key in batch["keys"]) == sorted(
        f"shard{s:03d}x{i:05d}" for s in range(2) for i in range(3))
    with pytest.raises(UnusableData, match="no shard could be read .*memory://remote/absent.tar: no such file"):
        build_loader(CONFIG, spec="memory://remote/absent.tar", tokenizer=tokenizer, batch_size=4, train=False)


def test_restoring_onto_another_layout_is_refused(tmp_path, tokenizer):
    urls = write_shards(tmp_path, shards=4, per_shard=6)
    loader = build_loader(CONFIG, spec="::".join(urls), tokenizer=tokenizer, batch_size=2, train=True)
    next(iter(loader))
    state = loader.state_dict()
    fewer_shards = build_loader(CONFIG, spec="::".join(urls[:3]), tokenizer=tokenizer, batch_size=2, train=True)
    fewer_shards.load_state_dict(state)
    with pytest.raises(ValueError, match="resume with the same data.workers"):
        next(iter(fewer_shards))
    other_rank = build_loader(CONFIG, spec="::".join(urls), tokenizer=tokenizer, batch_size=2, train=True,
                              rank=1, world_size=2)
    other_rank.load_state_dict(state)
    with pytest.raises(ValueError, match="resume with the same data.workers"):
        next(iter(other_rank))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_position_applies_to_one_pass_and_a_finished_pass_restarts(tmp_path, tokenizer, workers):
    urls = write_shards(tmp_path, shards=2, per_shard=5)
    config = DataConfig(image_size=32, context_length=16, workers=workers)

    def loader():
        return build_loader(config, spec="::".join(urls), tokenizer=tokenizer, batch_size=2, train=False)

    first = loader()
    full_pass = [batch["keys"] for batch in first]
    assert sum(map(len, full_pass)) == 10
    assert [batch["keys"] for batch in first] == full_pass  # passes repeat
    partial = loader()
    iterator = iter(partial)
    next(iterator), next(iterator)
    resumed = loader()
    resumed.load_state_dict(partial.state_dict())
    assert [batch["keys"] for batch in resumed] == full_pass[2:]
    assert [batch["keys"] for batch in resumed] == full_pass  # the next pass starts from the beginning
    finished = loader()
    finished.load_state_dict(first.state_dict())
    assert [batch["keys"] for batch in finished] == full_pass


@pytest.mark.parametrize("cut", ["member_boundary", "inside_header"])
def test_a_tar_cut_between_members_is_counted_as_truncated(tmp_path, tokenizer, cut):
    [url] = write_shards(tmp_path, shards=1, per_shard=3)
    with tarfile.open(url) as tar:
        third_sample = [m for m in tar.getmembers() if m.name.startswith("shard000x00002")][0]
    end = third_sample.offset + (0 if cut == "member_boundary" else 100)
    Path(url).write_bytes(Path(url).read_bytes()[:end])
    loader = build_loader(CONFIG, spec=url, tokenizer=tokenizer, batch_size=2, train=False)
    with pytest.warns(UserWarning, match="shard-000000.tar: truncated"):
        keys = [key for batch in loader for key in batch["keys"]]
    assert keys == ["shard000x00000", "shard000x00001"]
    assert loader.skipped == Counter(truncated_shard=1)


def test_empty_shards_are_counted_and_never_stop_the_others(tmp_path, tokenizer):
    urls = write_shards(tmp_path, shards=3, per_shard=4)
    write_tar(tmp_path / "empty-000000.tar", [])
    write_tar(tmp_path / "empty-000001.tar", [])
    spec = "::".join(urls + [str(tmp_path / "empty-000000.tar"), str(tmp_path / "empty-000001.tar")])
    config = DataConfig(image_size=32, context_length=16, workers=2, shuffle_buffer=0)
    loader = build_loader(config, spec=spec, tokenizer=tokenizer, batch_size=2, train=False)
    assert sorted(key for batch in loader for key in batch["keys"]) == sorted(
        f"shard{s:03d}x{i:05d}" for s in range(3) for i in range(4))
    assert loader.skipped == Counter(empty_shard=2)
    # Endless, with half the shards empty: epochs where a worker draws only empty shards pass by.
    endless = make_stream(tokenizer, "::".join([str(tmp_path / "empty-000000.tar"), urls[0]]), epochs=None,
                          batch_size=2)
    keys = [key for _, batch in zip(range(12), BatchLoader(endless, workers=2)) for key in batch["keys"]]
    assert len(keys) == 24 and set(keys) == {f"shard000x{i:05d}" for i in range(4)}


def test_resampling_only_empty_shards_stops_with_a_clear_error(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr("mmscale.data.stream.MAX_SKIPS_IN_A_ROW", 50)
    write_tar(tmp_path / "empty.tar", [])
    stream = make_stream(tokenizer, str(tmp_path / "empty.tar"), epochs=None, sampling="resampled")
    with pytest.raises(RuntimeError, match=r"51 samples or shards in a row were skipped \(last: empty_shard"):
        next(iter(BatchLoader(stream, workers=0)))


def test_the_skip_limit_counts_skips_in_a_row_not_per_batch(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr("mmscale.data.stream.MAX_SKIPS_IN_A_ROW", 5)
    good = jpeg_bytes(2)
    alternating = []
    for i in range(40):
        alternating += [(f"g{i:03d}.jpg", good), (f"g{i:03d}.txt", b"good"), (f"b{i:03d}.jpg", b"bad"),
                        (f"b{i:03d}.txt", b"corrupt image")]
    write_tar(tmp_path / "alternating.tar", alternating)
    loader = build_loader(CONFIG, spec=str(tmp_path / "alternating.tar"), tokenizer=tokenizer, batch_size=10,
                          train=False)
    assert sum(batch["size"] for batch in loader) == 40 and loader.skipped["not_an_image"] == 40
    bad_run = [(f"b{i:03d}.{ext}", payload) for i in range(6) for ext, payload in (("jpg", b"bad"), ("txt", b"b"))]
    write_tar(tmp_path / "run.tar", bad_run + [("g.jpg", good), ("g.txt", b"x")])
    with pytest.raises(RuntimeError, match="6 samples or shards in a row"):
        list(build_loader(CONFIG, spec=str(tmp_path / "run.tar"), tokenizer=tokenizer, batch_size=1, train=False))


def test_transparent_pixels_are_white_as_in_the_shard_writer(tmp_path, tokenizer):
    buffer = io.BytesIO()
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(buffer, "PNG")
    write_tar(tmp_path / "alpha.tar", [("a.png", buffer.getvalue()), ("a.txt", b"nothing to see")])
    batch = next(iter(build_loader(CONFIG, spec=str(tmp_path / "alpha.tar"), tokenizer=tokenizer, batch_size=1,
                                   train=False)))
    assert batch["images"].min() >= 250


def test_a_tar_cut_inside_its_first_member_is_truncated_not_fatal(tmp_path, tokenizer):
    [url] = write_shards(tmp_path, shards=1, per_shard=2)
    Path(url).write_bytes(Path(url).read_bytes()[:700])
    loader = build_loader(CONFIG, spec=url, tokenizer=tokenizer, batch_size=2, train=False)
    with pytest.warns(UserWarning, match="truncated"):
        assert list(loader) == []
    assert loader.skipped == Counter(truncated_shard=1)


def test_samples_beyond_a_shards_listed_size_are_counted_and_named(tmp_path, tokenizer):
    """sizes.json lists 4 of a shard's 6 samples: positions of other shards would clash with the 2 unlisted ones,
    so they are skipped, counted as beyond_listed_size and the shard named; the listed ones train once."""
    urls = write_shards(tmp_path, shards=2, per_shard=6)
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 4, "shard-000001.tar": 6}))
    loader = build_loader(CONFIG, spec="::".join(urls), tokenizer=tokenizer, batch_size=2, train=False)
    with pytest.warns(UserWarning, match=r"shard .*shard-000000.tar holds 2 samples more than the 4 its sizes.json"):
        keys = sorted(key for batch in loader for key in batch["keys"])
    assert keys == sorted([f"shard000x{i:05d}" for i in range(4)] + [f"shard001x{i:05d}" for i in range(6)])
    assert loader.skipped == Counter(beyond_listed_size=2)


def test_a_position_saved_by_the_earlier_shard_split_is_refused_with_the_reason(tmp_path, tokenizer):
    urls = write_shards(tmp_path, shards=2, per_shard=4)
    first = build_loader(CONFIG, spec="::".join(urls), tokenizer=tokenizer, batch_size=2, train=True)
    next(iter(first))
    state = first.state_dict()
    state["loader"]["dataset_state"]["layout"] = "0/1/epoch/0/123"  # worker/workers/sampling/seed/shards, no version
    loader = build_loader(CONFIG, spec="::".join(urls), tokenizer=tokenizer, batch_size=2, train=True)
    loader.load_state_dict(state)
    with pytest.raises(ValueError, match="saved by an earlier mmscale, which split epochs among readers by shards"):
        next(iter(loader))


def test_the_reading_side_imports_nothing_of_the_writing_side():
    """mmscale.data (reading shards for training) stands without mmscale.shards (writing them): importing every
    module of it in a fresh interpreter loads no module of the writing package."""
    code = ("import importlib, json, pkgutil, sys, mmscale.data\n"
            "for module in pkgutil.iter_modules(mmscale.data.__path__):\n"
            "    importlib.import_module('mmscale.data.' + module.name)\n"
            "print(json.dumps(sorted(name for name in sys.modules if name.startswith('mmscale.'))))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported = json.loads(result.stdout)
    assert "mmscale.data.loader" in imported and "mmscale.data.check" in imported
    assert [name for name in imported if name.startswith("mmscale.shards")] == []
