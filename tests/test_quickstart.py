"""The README's first command, end to end."""

from __future__ import annotations

import json

import pytest

from mmscale.cli import main


@pytest.mark.slow
def test_quickstart_runs_the_data_side_end_to_end(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resumed batch identical: True" in out
    sizes = json.loads((tmp_path / "shards" / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == 1536 and len(sizes) == 12
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
