"""`mmscale quickstart`: the whole system on a generated corpus, in a few minutes on a laptop CPU.

Renders captioned shapes (a training split, a held-out split, and a darker "dim" domain for
fine-tuning), shards them with the project's sharding code, trains a WordPiece tokenizer,
pretrains `tiny` with DeepSpeed ZeRO-3 through the DeepSpeed launcher (every local GPU, or 2
CPU ranks), evaluates zero-shot and retrieval with `mmscale eval`, LoRA-fine-tunes on the dim
domain with `mmscale finetune`, exports int8 with `mmscale export`, classifies an image with the
int8 model, and prints a summary table. Each step runs the command a user would run; the
training logs go to files under `--out/logs/` while a progress bar follows the run's metrics.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mmscale.shards.inspection import inspect_spec
from mmscale.shards.sharding import ShardingOptions, make_shards
from mmscale.shards.sources import InputOptions
from mmscale.shards.synthetic import OBJECT_COLOURS, corpus, make_image_folder, write_zeroshot_files
from mmscale.shards.tokenizer_train import iter_captions, train_wordpiece
from mmscale.train.engine import free_port
from mmscale.train.report import read_history

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SPLITS = {  # name: (images, domain, seed)
    "train": (2048, "plain", 0), "val": (512, "plain", 1), "dim-train": (2048, "dim", 2), "dim-val": (512, "dim", 3),
}
PRETRAIN_STEPS = 120  # held-out zero-shot is at its plateau (~0.97) from step ~100
FINETUNE_STEPS = 60
BATCH_SIZE = 64
STEPS = 6


class QuickstartFailed(Exception):
    """A step failed; the message names it and carries the end of its log."""


@dataclass
class Result:
    """One summary row."""

    step: str
    result: str
    seconds: float


class Quickstart:
    """The steps, in order, sharing the output folder and the rows of the summary."""

    def __init__(self, out: Path):
        self.out = out
        self.rows: list[Result] = []
        self.numbers: dict[str, float] = {}
        self.number = 0
        self.started = time.perf_counter()
        self.devices = torch.cuda.device_count()

    def begin(self, title: str) -> float:
        self.number += 1
        print(f"\n[{self.number}/{STEPS}] {title}", flush=True)
        return time.perf_counter()

    def record(self, step: str, result: str, started: float) -> None:
        self.rows.append(Result(step, result, time.perf_counter() - started))
        print(f"      {result}", flush=True)

    # -- data ---------------------------------------------------------------------------------------------------
    def corpus(self) -> dict[str, Path]:
        started = self.begin("rendering captioned shapes (train, held-out, dim domain) and sharding them")
        shards = {}
        for name, (count, domain, seed) in SPLITS.items():
            images = self.out / "images" / name
            make_image_folder(images, count, size=64, seed=seed, labels=True, domain=domain)
            summary = make_shards(ShardingOptions(input=InputOptions(path=str(images), kind="folder"),
                                                  output_dir=str(self.out / "shards" / name), samples_per_shard=256,
                                                  workers=2, progress=False))
            shards[name] = self.out / "shards" / name
            print(f"      {name:9s} {summary.written:5d} pairs ({domain}) -> {len(summary.sizes)} shards in "
                  f"{shards[name]}")
        report = inspect_spec(str(shards["train"]), examples=0, check_sizes=True, progress=False)
        if report.all_problems:
            raise QuickstartFailed("shard verification failed:\n" + "\n".join(report.all_problems))
        # Prompt ensembling over the caption vocabulary, as CLIP ensembles its templates.
        write_zeroshot_files(self.out, "shapes")
        total = sum(count for count, _, _ in SPLITS.values())
        self.record("data", f"{total:,} pairs in 4 splits, verified; the label is {corpus('shapes').summary} "
                    f"({len(OBJECT_COLOURS)} classes)", started)
        return shards

    def tokenizer(self, shards: dict[str, Path]) -> Path:
        started = self.begin("training a WordPiece tokenizer on the training captions")
        folder = self.out / "tokenizer"
        tokenizer = train_wordpiece(iter_captions(str(shards["train"])), vocab_size=512, output_dir=folder)
        self.record("tokenizer", f"WordPiece, {len(tokenizer)} tokens", started)
        return folder

    # -- training -----------------------------------------------------------------------------------------------
    def pretrain(self, shards: dict[str, Path], tokenizer: Path) -> Path:
        # The global batch of 64 must split evenly: the most GPUs that divide it (all of them, usually).
        ranks = max(r for r in (1, 2, 4, 8, 16, 32, 64) if r <= self.devices) if self.devices else 2
        where = f"{ranks} of {self.devices} GPUs" if self.devices else "2 CPU ranks (gloo)"
        started = self.begin(f"pretraining tiny: DeepSpeed ZeRO-3 on {where}, CLIP + masked-LM, "
                             f"{PRETRAIN_STEPS} steps of {BATCH_SIZE} pairs")
        run = self.out / "runs" / "pretrain"
        devices = local_device_args(ranks) if self.devices else ["--num_gpus", str(ranks)]
        command = [sys.executable, "-m", "deepspeed.launcher.runner", *devices, "--master_port", str(free_port()),
                   "--module", "mmscale.train", "--config", str(_shipped("pretrain/tiny.yaml")), f"output_dir={run}",
                   f"data.train={shards['train']}", f"data.val={shards['val']}", f"tokenizer={tokenizer}",
                   f"train.samples={PRETRAIN_STEPS * BATCH_SIZE}", f"train.global_batch_size={BATCH_SIZE}",
                   f"train.deepspeed={_shipped('deepspeed/zero3.json')}", "train.save_every_steps=60",
                   "train.log_every_steps=5", "train.progress=false", "eval.every_steps=40",
                   *self._eval_overrides()]  # tiny.yaml's train.precision=auto: bf16 on GPUs, fp32 on most CPUs
        _run_with_progress(command, log=self.out / "logs" / "pretrain.log", run=run, steps=PRETRAIN_STEPS)
        history = read_history(run)
        first, final, last = history.train[0], history.train[-1], history.eval[-1]
        self.numbers |= {"pretrain_zeroshot_top1": last["top1"], "pretrain_loss_first": first["loss"],
                         "pretrain_loss_last": final["loss"]}
        self.record("pretrain", f"loss {first['loss']:.2f} -> {final['loss']:.2f}, "
                    f"held-out zero-shot top-1 {last['top1']:.1%}", started)
        return run

    def evaluate(self, run: Path, shards: dict[str, Path]) -> dict:
        started = self.begin("evaluating the pretrained model on the held-out split: mmscale eval zeroshot|retrieval")
        final = str(run / "final")
        zeroshot = _mmscale("eval", "zeroshot", "--checkpoint", final, "--data", str(shards["val"]),
                            "--classnames", str(self.out / "classnames.txt"),
                            "--templates", str(self.out / "templates.txt"))
        retrieval = _mmscale("eval", "retrieval", "--checkpoint", final, "--data", str(shards["val"]))
        self.numbers |= {"eval_zeroshot_top1": zeroshot["top1"], "eval_i2t_r1": retrieval["i2t_r1"],
                         "eval_t2i_r1": retrieval["t2i_r1"]}
        self.record("evaluate", f"zero-shot top-1 {zeroshot['top1']:.1%} (chance {1 / len(OBJECT_COLOURS):.1%}); "
                    f"retrieval R@1 image->text {retrieval['i2t_r1']:.1%}, text->image {retrieval['t2i_r1']:.1%}",
                    started)
        return {"zeroshot": zeroshot, "retrieval": retrieval}

    def finetune(self, pretrained: Path, shards: dict[str, Path]) -> Path:
        started = self.begin(f"LoRA fine-tuning on the dim domain: mmscale finetune, one process, "
                             f"{FINETUNE_STEPS} steps")
        run = self.out / "runs" / "lora"
        command = [sys.executable, "-m", "mmscale.cli", "finetune", "--checkpoint", str(pretrained / "final"),
                   "--config", str(_shipped("finetune/lora.yaml")), f"output_dir={run}",
                   f"data.train={shards['dim-train']}", f"data.val={shards['dim-val']}",
                   f"train.samples={FINETUNE_STEPS * BATCH_SIZE}", f"train.global_batch_size={BATCH_SIZE}",
                   f"train.deepspeed={_shipped('deepspeed/zero0.json')}", "train.log_every_steps=5",
                   "train.progress=false", "eval.every_steps=20", *self._eval_overrides()]
        _run_with_progress(command, log=self.out / "logs" / "lora.log", run=run, steps=FINETUNE_STEPS)
        evals = read_history(run).eval
        self.numbers |= {"dim_zeroshot_top1_before": evals[0]["top1"], "dim_zeroshot_top1_after": evals[-1]["top1"]}
        self.record("lora", f"dim-domain zero-shot {evals[0]['top1']:.1%} -> {evals[-1]['top1']:.1%} "
                    f"({(evals[-1]['top1'] - evals[0]['top1']) * 100:+.1f} points)", started)
        return run

    def export(self, finetuned: Path, shards: dict[str, Path]) -> Path:
        started = self.begin("exporting the fine-tuned model to int8 (bitsandbytes) and classifying an image with it")
        out = self.out / "runs" / "lora-int8"
        report = _mmscale("export", "--checkpoint", str(finetuned / "final"), "--out", str(out), "--quantize", "int8",
                          "--data", str(shards["dim-val"]), "--classnames", str(self.out / "classnames.txt"),
                          "--templates", str(self.out / "templates.txt"))
        image = sorted((self.out / "images" / "dim-val").glob("*.jpg"))[0]
        answer = _mmscale("zeroshot", "--checkpoint", str(out), "--image", str(image),
                          "--classnames", str(self.out / "classnames.txt"),
                          "--templates", str(self.out / "templates.txt"))
        truth = OBJECT_COLOURS[int(image.with_suffix(".cls").read_text())]
        self.numbers |= {"int8_size_ratio": report["size_ratio"],
                         "int8_dim_zeroshot_top1": report["eval_exported"]["top1"],
                         "float_dim_zeroshot_top1": report["eval_float"]["top1"]}
        self.record("export", f"{report['size_ratio']:.2f}x the float bytes, image cosine to float "
                    f"{report['image_cosine_min']:.4f} (min); zero-shot {report['eval_float']['top1']:.1%} float, "
                    f"{report['eval_exported']['top1']:.1%} int8; {image.name}: {answer['label']} (truth {truth})",
                    started)
        return out

    def _eval_overrides(self) -> list[str]:
        return [f"eval.classnames={self.out / 'classnames.txt'}", f"eval.templates={self.out / 'templates.txt'}"]

    def summary(self, paths: dict[str, Path]) -> None:
        """The table, the paths, and the same as `summary.json`."""
        seconds = time.perf_counter() - self.started
        (self.out / "summary.json").write_text(json.dumps(
            {"seconds": seconds, "steps": {row.step: row.seconds for row in self.rows}, "numbers": self.numbers,
             "paths": {name: str(path) for name, path in paths.items()}}, indent=2) + "\n")
        width = max(len(row.result) for row in self.rows)
        print(f"\n{'step':10s} {'result':{width}s} {'seconds':>7s}")
        for row in self.rows:
            print(f"{row.step:10s} {row.result:{width}s} {row.seconds:7.1f}")
        print(f"{'total':10s} {'':{width}s} {seconds:7.1f}\n")
        for name, path in paths.items():
            print(f"{name:22s} {path}")


def run_quickstart(out: str | os.PathLike) -> int:
    """Run every step and print the summary; returns the exit code."""
    out = Path(out).resolve()
    if (out / "runs").exists():
        raise ValueError(f"{out} already holds a quickstart run; remove it or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quick = Quickstart(out)
    shards = quick.corpus()
    tokenizer = quick.tokenizer(shards)
    pretrained = quick.pretrain(shards, tokenizer)
    quick.evaluate(pretrained, shards)
    finetuned = quick.finetune(pretrained, shards)
    exported = quick.export(finetuned, shards)
    quick.summary({"shards": out / "shards", "pretrained model": pretrained / "final",
                   "pretraining report": pretrained / "report.md", "LoRA adapter": finetuned / "adapter",
                   "fine-tuned model": finetuned / "final", "fine-tuning report": finetuned / "report.md",
                   "int8 model": exported, "logs": out / "logs"})
    return 0


def _shipped(name: str) -> Path:
    path = CONFIGS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; the quickstart uses the configs/ of a source checkout "
                                "(git clone ... && pip install -e .)")
    return path


def _mmscale(*args: str) -> dict:
    """Run an mmscale command in this process (its command line shown, its output kept for a failure);
    returns its last line's JSON."""
    from mmscale.cli import main

    print(f"      $ mmscale {' '.join(args)}", flush=True)
    output, errors = io.StringIO(), io.StringIO()  # loading bars and library notices: kept for a failure
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(errors):
        code = main(list(args))
    if code != 0:
        raise QuickstartFailed(f"mmscale {' '.join(args)} exited with {code}:\n{output.getvalue()}{errors.getvalue()}")
    lines = output.getvalue().strip().splitlines()
    return json.loads(lines[-1])


def local_device_args(ranks: int) -> list[str]:
    """The DeepSpeed launcher's arguments for `ranks` processes on the first `ranks` GPUs that
    CUDA_VISIBLE_DEVICES names: with `--num_gpus N` the launcher drops that variable and takes GPUs 0..N-1.
    Without it (or with GPU UUIDs, which --include cannot name), `--num_gpus`."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if len(visible) >= ranks and all(index.strip().isdigit() for index in visible):
        return ["--include", "localhost:" + ",".join(index.strip() for index in visible[:ranks])]
    return ["--num_gpus", str(ranks)]


def _run_with_progress(command: list[str], *, log: Path, run: Path, steps: int) -> None:
    """Run a training command with its output in `log`, a progress bar following its metrics.jsonl."""
    from tqdm import tqdm

    log.parent.mkdir(parents=True, exist_ok=True)
    shown = {"deepspeed.launcher.runner": "deepspeed", "mmscale.cli": "mmscale"}.get(command[2], command[2])
    print(f"      $ {shown} {' '.join(command[3:])}\n      log: {log}", flush=True)
    with open(log, "w", encoding="utf-8") as handle, tqdm(total=steps, unit="step", leave=True) as bar:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, text=True)
        while process.poll() is None:
            time.sleep(1)
            records = read_history(run).train
            if records:
                bar.n = records[-1]["step"]
                bar.set_postfix(loss=f"{records[-1]['loss']:.3f}", refresh=False)
                bar.refresh()
        if process.returncode == 0:
            bar.n = steps
            bar.refresh()
    if process.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise QuickstartFailed(f"{' '.join(command[2:6])} ... exited with {process.returncode}; "
                               f"the end of {log}:\n{tail}")
