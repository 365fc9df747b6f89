"""Checkpoints, adapters and tokenizers from elsewhere: read as plain data, never run as code."""

from __future__ import annotations

import os
import random
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist


class _RunsACommand:
    """Unpickling this runs a shell command: what a crafted checkpoint file would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _plant_trainer_state(root, payload) -> os.PathLike:
    tag = "step00000004"
    (root / tag).mkdir(parents=True)
    (root / "latest").write_text(tag)
    path = root / tag / "trainer_state_rank0.pt"
    torch.save(payload, path)
    return path


def test_a_trainer_state_that_would_run_code_is_refused_naming_the_file(tmp_path):
    from mmscale.train.checkpoints import saved_world_size

    marker = tmp_path / "code-ran"
    path = _plant_trainer_state(tmp_path / "checkpoints",
                                {"world_size": 1, "progress": _RunsACommand(f"touch {marker}")})
    with pytest.raises(ValueError, match="holds more than plain data") as refused:
        saved_world_size(tmp_path / "checkpoints")
    assert str(path) in str(refused.value) and "system" in str(refused.value)
    assert not marker.exists()


def test_a_truncated_trainer_state_is_an_error_naming_the_file(tmp_path):
    from mmscale.train.checkpoints import saved_world_size

    path = _plant_trainer_state(tmp_path / "checkpoints", {"world_size": 1})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="unreadable") as refused:
        saved_world_size(tmp_path / "checkpoints")
    assert str(path) in str(refused.value)


def test_random_states_survive_a_weights_only_round_trip(tmp_path):
    from mmscale.train.checkpoints import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves numpy a cached Gaussian, part of its state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(), np.random.randint(1 << 30), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    drawn = (random.random(), np.random.standard_normal(), np.random.randint(1 << 30), torch.rand(3))
    assert drawn[:3] == expected[:3] and torch.equal(drawn[3], expected[3])


class _Engine:
    """DeepSpeed's side of a checkpoint, which this test is not about: it writes and reads nothing."""

    def save_checkpoint(self, root, *, tag, save_latest):
        pass

    def load_checkpoint(self, root, *, tag):
        return os.path.join(root, tag), {}


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_saved_checkpoint_resumes_from_plain_data(tmp_path, tokenizer, one_rank):
    from shardkit import write_shards

    from mmscale.data.config import DataConfig
    from mmscale.data.loader import build_loader
    from mmscale.train.checkpoints import Progress, load_checkpoint, save_checkpoint

    urls = write_shards(tmp_path / "shards", shards=2, per_shard=6)
    loader = build_loader(DataConfig(image_size=32, context_length=16, shuffle_buffer=4, workers=0),
                          spec="::".join(urls), tokenizer=tokenizer, batch_size=2, train=True)
    batches = iter(loader)
    next(batches)
    loader_state = loader.state_dict() | {"counts": Counter(a=2), "mean": np.float32(0.5)}
    root = tmp_path / "checkpoints"
    save_checkpoint(_Engine(), root, progress=Progress(step=4, samples=8), loader_state=loader_state, keep=2)
    progress, restored = load_checkpoint(_Engine(), root, "step00000004")
    assert progress == Progress(step=4, samples=8)
    assert restored["counts"] == {"a": 2} and restored["mean"] == 0.5
    assert restored["loader"] == loader.state_dict()["loader"]


def test_saving_an_object_that_is_not_plain_data_names_where_it_is():
    from mmscale.train.checkpoints import _plain

    with pytest.raises(TypeError, match=r"trainer state\['loader'\]\['when'\] is a datetime.date"):
        import datetime

        _plain({"loader": {"when": datetime.date(2024, 1, 1)}})


@pytest.fixture
def adapter_pair(tmp_path, tokenizer):
    """A tiny base checkpoint and a LoRA adapter of it, in PEFT's safetensors format."""
    from mmscale.finetune.lora import LoraSettings, apply_lora, save_adapter
    from mmscale.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer))
    model.save(tmp_path / "base", tokenizer=tokenizer)
    apply_lora(model, LoraSettings(enabled=True, rank=2))
    for name, parameter in model.towers.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: a real update, so loading it shows
            torch.nn.init.normal_(parameter)
    save_adapter(model, tmp_path / "adapter", base=str(tmp_path / "base"))
    return tmp_path / "base", tmp_path / "adapter", model


def test_an_adapter_in_safetensors_is_merged_into_its_base(adapter_pair):
    from mmscale.export.quantize import load_float

    _, adapter, trained = adapter_pair
    assert (adapter / "adapter_model.safetensors").is_file()
    merged = load_float(adapter)
    expected = dict(trained.towers.merge_and_unload().named_parameters())
    adapted = [name for name in expected if name.endswith(("q_proj.weight", "query.weight"))]
    loaded = dict(merged.towers.named_parameters())
    assert adapted and all(torch.allclose(loaded[name], expected[name], atol=1e-6) for name in adapted)


def test_an_adapter_with_only_pickle_weights_is_refused_saying_how_to_convert(adapter_pair):
    from safetensors.torch import load_file

    from mmscale.export.quantize import load_float
    from mmscale.models.checkpoint import CheckpointError

    _, adapter, _ = adapter_pair
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(weights), adapter / "adapter_model.bin")  # what save_pretrained(safe_serialization=False) writes
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"only pickle weights \(adapter_model.bin\)") as refused:
        load_float(adapter)
    assert str(adapter) in str(refused.value) and "safe_serialization=True" in str(refused.value)


def test_a_tokenizer_folder_that_asks_for_its_own_code_is_not_run(tokenizer_dir, tmp_path):
    import json
    import shutil

    from mmscale.data.text import load_tokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "evil_tokenizer.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                              "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    try:
        load_tokenizer(folder)
    except ValueError as error:
        assert str(folder) in str(error)
    assert not marker.exists()


# Temporary files: someone who can write into an output folder plants a symlink at the name a
# temporary used to have (predictable: a fixed suffix or the process id); nothing is written through it.

def _plant(link, tmp_path, *, folder: bool = False):
    """A symlink at `link` to a file (or folder) outside, holding what must survive."""
    target = tmp_path / f"outside-{link.name}"
    if folder:
        target.mkdir()
        (target / "keep").write_text("precious")
    else:
        target.write_text("precious")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return target


def _untouched(target) -> bool:
    if target.is_dir():
        return [p.name for p in target.iterdir()] == ["keep"] and (target / "keep").read_text() == "precious"
    return target.read_text() == "precious"


def test_atomic_write_replaces_the_target_under_a_fresh_name_and_cleans_up_on_error(tmp_path):
    from mmscale.atomic import TEMPORARY_GLOB, atomic_write, open_temporary, write_atomically

    target = tmp_path / "value.json"
    handle, temporary = open_temporary(target)
    handle.close()
    assert temporary.parent == tmp_path and temporary.match(TEMPORARY_GLOB) and temporary != open_temporary(target)[1]
    old_umask = os.umask(0o022)
    try:
        write_atomically(target, b"first")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"first" and target.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "value.json") == sorted(
        p.name for p in tmp_path.glob(TEMPORARY_GLOB))  # only the two opened by hand above are left


def test_a_checkpoint_save_does_not_write_through_planted_links(tmp_path, one_rank):
    from mmscale.train.checkpoints import Progress, latest_tag, remove_incomplete, save_checkpoint

    root = tmp_path / "checkpoints"
    state = _plant(root / "step00000004" / ".trainer_state_rank0.pt.tmp", tmp_path)
    latest = _plant(root / ".latest.tmp", tmp_path)
    save_checkpoint(_Engine(), root, progress=Progress(step=4), loader_state={}, keep=2)
    assert _untouched(state) and _untouched(latest) and latest_tag(root) == "step00000004"
    remove_incomplete(root)  # a stale temporary of either kind of name is cleared
    assert not list(root.glob(".*"))


def test_a_model_save_does_not_write_through_planted_links(tmp_path, tokenizer):
    from mmscale.models import ModelConfig, build_model

    staging = _plant(tmp_path / f".final.tmp-{os.getpid()}", tmp_path, folder=True)
    old = _plant(tmp_path / f".final.old-{os.getpid()}", tmp_path, folder=True)
    model = build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer))
    model.save(tmp_path / "final", tokenizer=tokenizer)
    model.save(tmp_path / "final", tokenizer=tokenizer)  # over an existing one: the old folder moves aside
    assert _untouched(staging) and _untouched(old) and (tmp_path / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.glob(".final*")) == sorted([staging.name[len("outside-"):],
                                                                       old.name[len("outside-"):]])


def test_reports_embeddings_and_failure_lists_do_not_write_through_planted_links(tmp_path):
    from mmscale.shards.output import Output
    from mmscale.shards.sharding import gather_failures
    from mmscale.eval.use import _write_embeddings
    from mmscale.train.report import write_report

    planted = [_plant(tmp_path / "run" / "report.md.tmp", tmp_path),
               _plant(tmp_path / ".embeddings.npy.tmp", tmp_path),
               _plant(tmp_path / "shards" / f".failed.parquet.tmp{os.getpid()}", tmp_path)]
    write_report(tmp_path / "run")
    _write_embeddings(tmp_path / "embeddings.npy", ["a"], np.ones((1, 4), dtype=np.float32))
    gather_failures(Output(str(tmp_path / "shards")), [])
    assert all(_untouched(target) for target in planted)
    assert (tmp_path / "run" / "report.md").read_text().startswith("# Run report")
    assert np.load(tmp_path / "embeddings.npy").shape == (1, 4)


def test_a_shard_part_does_not_write_through_a_planted_link(tmp_path):
    from mmscale.shards.output import Output
    from mmscale.shards.writer import _PartWriter

    target = _plant(tmp_path / "out" / f".shard-000000.tar.tmp{os.getpid()}", tmp_path)
    writer = _PartWriter(Output(str(tmp_path / "out")), str(tmp_path / "out"), "shard-000000.tar", max_bytes=None)
    writer.add([("000000000.txt", b"a caption")])
    assert writer.finish() == {"shard-000000.tar": 1}
    assert _untouched(target) and (tmp_path / "out" / "shard-000000.tar").stat().st_size > 0
