"""The README's first command, end to end: `mmscale quickstart` as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel


@pytest.mark.slow
def test_quickstart_pretrains_finetunes_exports_and_reports(tmp_path):
    """The whole system on its generated corpus: zero-shot far above chance (1/6) after pretraining, a
    gain on the shifted domain from LoRA, an int8 model plain transformers loads, plots and reports."""
    script = Path(sys.executable).parent / "mmscale"  # the console script `pip install -e .` puts on PATH
    out = tmp_path / "qs"
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # the quickstart picks it itself
    result = subprocess.run([str(script), "quickstart", "--out", str(out)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    numbers = summary["numbers"]
    assert numbers["pretrain_zeroshot_top1"] > 0.5, numbers  # chance is 1/6
    assert numbers["eval_zeroshot_top1"] == pytest.approx(numbers["pretrain_zeroshot_top1"], abs=0.02)
    assert numbers["dim_zeroshot_top1_after"] > numbers["dim_zeroshot_top1_before"] + 0.1, numbers
    assert abs(numbers["int8_dim_zeroshot_top1"] - numbers["float_dim_zeroshot_top1"]) <= 0.05
    assert numbers["int8_size_ratio"] < 0.5
    for step in ("data", "tokenizer", "pretrain", "evaluate", "lora", "export"):
        assert step in summary["steps"] and f"\n{step} " in result.stdout
    ranks = 2 if not torch.cuda.is_available() else None  # on GPUs: however many divide the batch
    launch = rf"--num_gpus {ranks}" if ranks else r"(--num_gpus [0-9]+|--include localhost:[0-9,]+)"
    assert "[6/6]" in result.stdout and re.search(rf"\$ deepspeed {launch} ", result.stdout)
    for run in ("pretrain", "lora"):
        report = (out / "runs" / run / "report.md").read_text()
        assert "Status: finished" in report and "![eval](plots/eval.png)" in report
        assert {p.name for p in (out / "runs" / run / "plots").iterdir()} >= {"losses.png", "eval.png", "lr.png"}
    assert re.search(rf"mmscale train: {ranks or '[0-9]+'} processes", (out / "logs" / "pretrain.log").read_text())
    assert "$ mmscale eval zeroshot" in result.stdout and "$ mmscale export" in result.stdout
    linear = type(AutoModel.from_pretrained(out / "runs" / "lora-int8").vision_model.encoder.layers[0].mlp.fc1)
    assert linear.__name__ == "Linear8bitLt"


def test_quickstart_refuses_a_folder_that_holds_a_run(tmp_path, capsys):
    from mmscale.cli import main

    (tmp_path / "runs").mkdir()
    assert main(["quickstart", "--out", str(tmp_path)]) == 2
    assert "already holds a quickstart run" in capsys.readouterr().err
