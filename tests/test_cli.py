"""The `mmscale` command: config help, data-check, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

from shardkit import write_shards

from mmscale.cli import main


def test_console_script_lists_commands():
    result = subprocess.run([sys.executable, "-m", "mmscale.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "data-check" in result.stdout and "quickstart" in result.stdout


def test_data_check_help_lists_config_keys(capsys):
    try:
        main(["data-check", "--help"])
    except SystemExit as exit:
        assert exit.code == 0
    text = capsys.readouterr().out
    assert "data.shuffle_buffer (int, default 1000)" in text and "data.allow_pipe" in text


def test_data_check_reads_batches_and_reports_json(tmp_path, tokenizer_dir, capsys):
    write_shards(tmp_path / "shards", shards=2, per_shard=10)
    config = tmp_path / "check.yaml"
    config.write_text("data:\n  workers: 0\n  image_size: 32\n  context_length: 16\nbatch_size: 4\n")
    code = main(["data-check", "--config", str(config), f"data.train={tmp_path}/shards",
                 f"tokenizer={tokenizer_dir}", "batches=3"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["batches"] == 3 and report["samples"] == 12 and report["skipped"] == {}


def test_user_mistakes_are_one_line_errors(tmp_path, tokenizer_dir, capsys):
    assert main(["data-check", "data.shufle_buffer=3"]) == 2
    assert "data.shufle_buffer is unknown (did you mean data.shuffle_buffer?)" in capsys.readouterr().err
    for workers in (0, 2):
        assert main(["data-check", f"data.train={tmp_path}/missing-{{0..1}}.tar", f"tokenizer={tokenizer_dir}",
                     f"data.workers={workers}"]) == 2
        last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
        assert last_line in (f"mmscale data-check: error: shard {tmp_path}/missing-{i}.tar: no such file"
                             for i in (0, 1)), last_line
