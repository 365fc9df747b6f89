"""The config system: strict YAML, dotted overrides, precedence, help text."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mmscale.config import ConfigError, dump_yaml, field_docs, help_text, load_config
from mmscale.data.config import DataConfig


@dataclass
class Root:
    data: DataConfig = field(default_factory=DataConfig)
    """The data section."""
    tokenizer: str = ""
    """Tokenizer folder."""
    batch_size: int = 8
    """Batch per rank."""


def test_defaults_then_yaml_then_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  workers: 2\n  train: a.tar\nbatch_size: 16\n")
    config = load_config(Root, path, ["data.workers=6", "tokenizer=tok", "data.crop_scale=[0.5, 1.0]"])
    assert config.data.workers == 6 and config.data.train == "a.tar" and config.batch_size == 16
    assert config.tokenizer == "tok" and config.data.crop_scale == (0.5, 1.0)
    assert config.data.shuffle_buffer == DataConfig().shuffle_buffer


def test_unknown_keys_name_the_closest_known_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.worker is unknown \(did you mean data.workers\?\)"):
        load_config(Root, None, ["data.worker=3"])
    path = tmp_path / "c.yaml"
    path.write_text("batch_sise: 3\n")
    with pytest.raises(ConfigError, match=r"batch_sise is unknown \(did you mean batch_size\?\)"):
        load_config(Root, path)


@pytest.mark.parametrize("override, message", [
    ("data.workers=many", "data.workers: expected int"),
    ("data.pad_to_longest=maybe", "data.pad_to_longest: expected true or false"),
    ("data.allow_pipe=true", r"data.allow_pipe is no longer read: .* only from the command line \(--allow-pipe\)"),
    ("data.sampling=random", "not one of"),
    ("data.workers=-1", "data.workers must be >= 0"),
    ("data.image_size=-1", "data.image_size must be >= 1"),
    ("data.crop_ratio=[0, 1]", "data.crop_ratio must satisfy"),
    ("data.hflip_probability=1.5", "data.hflip_probability must be in"),
    ("data.prefetch_factor=0", "data.prefetch_factor must be >= 1"),
    ("data", "not of the form key=value"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Root, None, [override])


def test_command_line_values_are_read_by_the_field_type(tmp_path):
    config = load_config(Root, None, ["tokenizer=0123", "data.train=on", "data.val=1_000",
                                      "data.hflip_probability=1e-3", "data.crop_scale=[0.5, 1]"])
    assert (config.tokenizer, config.data.train, config.data.val) == ("0123", "on", "1_000")
    assert config.data.hflip_probability == 0.001 and config.data.crop_scale == (0.5, 1.0)
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  mlm_probability: 1e-1\n")
    assert load_config(Root, path).data.mlm_probability == 0.1


def test_a_key_given_twice_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 4\nbatch_size: 8\n")
    with pytest.raises(ConfigError, match="given twice"):
        load_config(Root, path)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(Root, tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Root, tmp_path / "list.yaml")


def test_help_lists_every_key_with_default_and_docstring():
    text = help_text(Root)
    for name in DataConfig.__dataclass_fields__:
        assert f"data.{name} (" in text
    assert "data.shuffle_buffer (int, default 1000)" in text
    assert "Samples held per worker for shuffling" in text
    assert "batch_size (int, default 8)" in text and "Batch per rank." in text


def test_every_shipped_config_field_is_documented():
    assert set(field_docs(DataConfig)) == set(DataConfig.__dataclass_fields__)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(Root, None, ["data.train=x-{0..3}.tar", "data.mlm_probability=0.2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(config))
    assert load_config(Root, path) == config


def test_a_budget_on_the_command_line_replaces_the_yamls_other_budget_and_two_at_one_level_are_refused(tmp_path):
    """train.samples and train.steps are one budget: tiny.yaml sets train.samples, and train.steps=2 on the
    command line must win (defaults < YAML < CLI), not be silently ignored; both in one place is an error."""
    from mmscale.config import ConfigError, load_config
    from mmscale.train.config import TrainRunConfig

    tiny = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"
    config = load_config(TrainRunConfig, tiny, ["train.steps=2"])
    assert (config.train.steps, config.train.samples) == (2, 0)
    assert load_config(TrainRunConfig, tiny, ["train.samples=64"]).train.samples == 64
    with pytest.raises(ConfigError, match=r"train.samples=5 and train.steps=2 are both set.*set train.samples=0 or "
                                          r"train.steps=0"):
        load_config(TrainRunConfig, tiny, ["train.steps=2", "train.samples=5"])
    both = tmp_path / "both.yaml"
    both.write_text("train:\n  samples: 640\n  steps: 3\n")
    with pytest.raises(ConfigError, match="train.samples=640 and train.steps=3 are both set"):
        load_config(TrainRunConfig, both)


def test_a_key_given_twice_on_the_command_line_is_refused_and_names_both():
    """An unquoted `data.train=x-{0..2}.tar` reaches the program as three data.train= arguments (the shell, or
    pdsh's remote shell, brace-expands it): keeping the last one would silently train on one shard."""
    with pytest.raises(ConfigError, match=r"config key data.train is given twice on the command line "
                                          r"\('data.train=x-0.tar', then 'data.train=x-1.tar'\); give it once"):
        load_config(Root, None, ["data.train=x-0.tar", "data.train=x-1.tar", "data.train=x-2.tar"])
    with pytest.raises(ConfigError, match="config key batch_size is given twice"):
        load_config(Root, None, ["batch_size=1", "tokenizer=t", "batch_size=1"])


def test_merge_overrides_keeps_the_last_of_each_key():
    from mmscale.config import merge_overrides

    merged = merge_overrides("data.workers=1", "batch_size=2", "data.train=a=b", "data.workers=3")
    assert merged == ["batch_size=2", "data.train=a=b", "data.workers=3"]
    assert load_config(Root, None, merged).data.workers == 3
