"""The `mmscale` command: config help, data-check, clear errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

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
    assert "data.shuffle_buffer (int, default 1000)" in text and "data.max_member_bytes" in text
    assert "--allow-pipe" in text and "data.allow_pipe" not in text


def test_data_check_reads_batches_and_reports_json(tmp_path, tokenizer_dir, capsys):
    write_shards(tmp_path / "shards", shards=2, per_shard=10)
    config = tmp_path / "check.yaml"
    config.write_text("data:\n  workers: 0\n  image_size: 32\n  context_length: 16\nbatch_size: 4\n")
    code = main(["data-check", "--config", str(config), f"data.train={tmp_path}/shards",
                 f"tokenizer={tokenizer_dir}", "batches=3"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["batches"] == 3 and report["samples"] == 12 and report["skipped"] == {}


def test_data_check_reads_vqa_samples_and_reports_the_answer_lists_coverage(tmp_path, tokenizer_dir, capsys):
    from mmscale.shards.synthetic import make_vqa_shards

    make_vqa_shards(tmp_path / "vqa", 12, corpus="shapes", samples_per_shard=12, seed=0)
    common = ["data-check", f"data.train={tmp_path}/vqa", f"tokenizer={tokenizer_dir}", "data.workers=0",
              "data.image_size=32", "data.context_length=16", "batch_size=6", "batches=6", "vqa=true"]
    coverage = {}
    for size in (2, 1000):
        assert main([*common, f"vqa_answers={size}"]) == 0
        out = capsys.readouterr().out
        report = json.loads(out.strip().splitlines()[-1])
        assert report["samples"] == 36 and report["skipped"] == {}, report
        assert f"answer list of {min(size, 12)} answers" in out  # 12 distinct answers: 6 colours, 3 shapes, 3 grounds
        coverage[size] = report["answer_coverage"]
    assert coverage[1000] == 1.0 and 0 < coverage[2] < 0.5  # two answers of twelve cover a few questions


def test_user_mistakes_are_one_line_errors(tmp_path, tokenizer_dir, capsys):
    assert main(["data-check", "data.shufle_buffer=3"]) == 2
    assert "data.shufle_buffer is unknown (did you mean data.shuffle_buffer?)" in capsys.readouterr().err
    for workers in (0, 2):
        assert main(["data-check", f"data.train={tmp_path}/missing-{{0..1}}.tar", f"tokenizer={tokenizer_dir}",
                     f"data.workers={workers}"]) == 2
        last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
        # Unreadable shards are skipped, up to data.max_bad_shard_fraction; here every shard is.
        assert re.fullmatch(r"mmscale data-check: error: no shard could be read \(2 unreadable; first: shard "
                            + re.escape(str(tmp_path)) + r"/missing-0.tar: no such file\)", last_line), last_line


def test_train_refuses_a_key_given_twice(capsys):
    """`mmscale train --config X a.b=1 a.b=2` stops before training, naming the key (a brace spec the shell
    expanded into one data.train= per shard must not silently train on the last)."""
    tiny = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"
    assert main(["train", "--config", str(tiny), "train.lr=1", "data.train=s-000000.tar",
                 "data.train=s-000001.tar"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mmscale train: error: config key data.train is given twice on the command line "
                            "('data.train=s-000000.tar', then 'data.train=s-000001.tar')"), error
    assert "\n" not in error and "Traceback" not in error


def test_report_writes_plots_and_a_report_from_a_run_directory(tmp_path, capsys):
    """`mmscale report`: PNGs and report.md from config.yaml + metrics.jsonl; a step logged twice (a crash
    after logging, then a resume that redid it) is taken from the later record."""
    import json

    import yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "classnames.txt").write_text("red\ngreen\nblue\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("shard-000000.tar", "shard-000001.tar"):
        (shards / name).write_bytes(b"")
    (shards / "sizes.json").write_text(json.dumps({"shard-000000.tar": 320, "shard-000001.tar": 320}))
    (run / "config.yaml").write_text(yaml.safe_dump({
        "data": {"train": str(shards), "val": ""}, "model": {"preset": "tiny"},
        "train": {"global_batch_size": 64, "samples": 640, "precision": "bf16"},
        "eval": {"classnames": str(run / "classnames.txt")}}))
    records = [{"kind": "eval", "step": 0, "top1": 0.3, "top5": 1.0, "i2t_r1": 0.1, "t2i_r1": 0.1, "val_loss": 4.1,
                "samples": 96.0}]
    for step in range(1, 11):
        records.append({"kind": "train", "step": step, "samples": 64 * step, "loss": 6.0 - 0.3 * step,
                        "contrastive_loss": 4.2 - 0.2 * step, "mlm_loss": 3.0 - 0.2 * step, "lr": 1e-3,
                        "temperature": 0.07, "samples_per_second": 100.0, "skipped_corrupt_image": 2})
    records.insert(6, {"kind": "train", "step": 8, "samples": 512, "loss": 99.0})  # lost run's record, redone later
    records.append({"kind": "eval", "step": 10, "top1": 0.9, "top5": 1.0, "i2t_r1": 0.5, "t2i_r1": 0.4,
                    "val_loss": 1.0, "samples": 96.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr')  # cut line
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.md")
    assert sorted(p.name for p in (run / "plots").iterdir()) == [
        "eval.png", "losses.png", "lr.png", "temperature.png", "throughput.png"]
    for png in (run / "plots").iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = (run / "report.md").read_text()
    assert "Status: not finished; 10 steps, 640 pairs seen of 640 planned" in report
    assert "| train loss | 3 |" in report  # step 10's record; the duplicate step 8 did not become the last
    assert "| validation | step 0 | step 10 |" in report and "| top1 | 0.3 | 0.9 |" in report
    assert "corrupt_image 2" in report
    assert f"Training data `{shards}`: 640 pairs in 2 shards, 1.00 epochs seen" in report
    assert "![losses](plots/losses.png)" in report and "preset: tiny" in report
    from mmscale.train.report import read_history

    assert [r["loss"] for r in read_history(run).train if r["step"] == 8] == [6.0 - 0.3 * 8]


def test_report_of_a_folder_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl here" in capsys.readouterr().err


EXIT_SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
from mmscale.cli import exit_without_teardown
atexit.register(lambda: sys.stdout.write("atexit ran\\n"))  # written, not flushed: the exit must flush it
if sys.argv[1] == "thread":  # a non-daemon thread still writing: the exit must wait for it, as sys.exit does
    threading.Thread(target=lambda: (time.sleep(0.5), Path(sys.argv[2]).write_text("done"))).start()
sys.stdout.write("x" * 100000)
exit_without_teardown(3)
"""


def test_a_command_exits_with_its_code_flushed_output_and_atexit_handlers_without_module_teardown(tmp_path):
    for mode in ("plain", "thread"):
        marker = tmp_path / f"{mode}.txt"
        result = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, mode, str(marker)], capture_output=True, text=True)
        assert result.returncode == 3, result.stderr
        assert result.stdout == "x" * 100000 + "atexit ran\n"
        assert marker.is_file() == (mode == "thread")
