"""A run directory's plots (`plots/*.png`) and `report.md`, from `config.yaml` and `metrics.jsonl`.

Written by rank 0 when a run ends (finished or stopped on bad losses) and on demand with
`mmscale report RUN_DIR`, which also works on a run that is still going or was killed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmscale.atomic import write_atomically

LOSS_CURVES = {"loss": "total (weighted)", "contrastive_loss": "contrastive", "mlm_loss": "masked LM",
               "classification_loss": "classification", "itm_loss": "image-text matching", "vqa_loss": "VQA answers",
               "distill_loss": "distillation (KL to the teacher)", "distill_feature_loss": "distillation (features)"}


@dataclass
class RunHistory:
    """The records of one run, by kind, one per step (a resumed run's records replace the lost ones')."""

    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)


def read_history(run_dir: Path) -> RunHistory:
    """Records from `metrics.jsonl`; for a step logged twice (a crash after logging, then a resume
    that redid the step) the later record wins, and each kind is sorted by step."""
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
            by_kind.setdefault(record.get("kind", "train"), {})[record["step"]] = record
    return RunHistory(train=[by_kind["train"][s] for s in sorted(by_kind["train"])],
                      eval=[by_kind["eval"][s] for s in sorted(by_kind["eval"])])


def _series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _class_count(config: dict) -> int:
    """Number of classes zero-shot chooses among (for the chance line), 0 when unknown."""
    names = (config.get("eval") or {}).get("classnames") or ""
    try:
        return sum(1 for line in Path(names).read_text(encoding="utf-8").splitlines() if line.strip()) if names else 0
    except OSError:
        return 0


def write_plots(history: RunHistory, config: dict, folder: Path) -> list[Path]:
    """One PNG per concern under `folder`; returns the paths written (none without records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    batch = (config.get("train") or {}).get("global_batch_size", 0)
    xlabel = f"optimizer step ({batch} pairs each)" if batch else "optimizer step"
    written = []

    def figure(name: str, title: str, ylabel: str, draw) -> None:
        fig, axis = plt.subplots(figsize=(6.4, 3.6), dpi=110)
        draw(axis)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png")
        plt.close(fig)
        written.append(folder / f"{name}.png")

    train, evals = history.train, history.eval
    if train:
        def losses(axis):
            for name, label in LOSS_CURVES.items():
                steps, values = _series(train, name)
                if values and any(v != 0 for v in values) and not (name == "loss" and _single_part(train)):
                    axis.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
            if batch and any(r.get("contrastive_loss") for r in train):
                axis.axhline(math.log(batch), color="gray", linestyle=":", label=f"contrastive at chance, ln {batch}")
            axis.set_ylim(bottom=0)
        figure("losses", "Training loss (mean over each logging window)", "loss (nats)", losses)
        schedule = config.get("train") or {}
        figure("lr", f"Learning rate at the logged steps (warmup {schedule.get('warmup_steps', 0)}, "
               f"cosine to {schedule.get('min_lr', 0):g})", "learning rate",
               lambda axis: axis.plot(*_series(train, "lr"), marker="."))
        precision = (config.get("train") or {}).get("precision", "")
        # A 16-bit copy of the logit scale moves in visible steps (bf16 keeps 8 significant bits).
        steps_note = f"; {precision} weights move in steps" if precision in ("bf16", "fp16") else ""
        figure("temperature", f"Contrastive temperature (1 / logit scale; lower is sharper{steps_note})",
               "temperature", lambda axis: axis.plot(*_series(train, "temperature")))

        def throughput(axis):
            steps, values = _series(train, "samples_per_second")
            axis.plot(steps, values, label="pairs/s, all ranks")
            axis.set_ylim(bottom=0)
            if values:
                axis.axhline(_median(values), color="gray", linestyle=":", label=f"median {_median(values):.0f}")
        figure("throughput", "Training throughput (first window includes start-up)", "image-text pairs / s",
               throughput)
    if evals:
        written.append(_eval_figure(plt, evals, config, folder / "eval.png", xlabel))
    return written


def _eval_figure(plt, evals: list[dict], config: dict, path: Path, xlabel: str) -> Path:
    """Zero-shot accuracy (with its chance level) beside retrieval recall, and the validation loss."""
    fig, (zeroshot, retrieval, loss) = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    classes = _class_count(config)
    for name, label in (("top1", "top-1"), ("top5", "top-5"), ("classifier_top1", "linear head top-1")):
        steps, values = _series(evals, name)
        # With few classes top-5 is nearly always right (5 of 6 is chance): it would read as a success.
        if values and not (name == "top5" and classes and classes <= 10):
            zeroshot.plot(steps, [100 * v for v in values], label=label, marker="o")
    if classes:
        zeroshot.axhline(100 / classes, color="gray", linestyle=":", label=f"top-1 chance ({classes} classes)")
    # The axes end at 102 so that points at 100% are drawn whole.
    zeroshot.set(title="Zero-shot classification", ylabel="% of validation images", ylim=(0, 102))
    for direction, colour in (("i2t", "tab:blue"), ("t2i", "tab:orange")):
        for k, style in (("1", "-"), ("5", "--"), ("10", ":")):
            steps, values = _series(evals, f"{direction}_r{k}")
            if values:
                retrieval.plot(steps, [100 * v for v in values], style, color=colour, marker="o",
                               label=f"{'image→text' if direction == 'i2t' else 'text→image'} R@{k}")
    pairs = evals[-1].get("samples")
    retrieval.set(title=f"Retrieval among {int(pairs)} validation pairs" if pairs else "Retrieval",
                  ylabel="% of queries with a match in the top k", ylim=(0, 102))
    loss.plot(*_series(evals, "val_loss"), marker="o")
    loss.set(title="Validation contrastive loss", ylabel="loss (nats)")
    for axis in (zeroshot, retrieval, loss):
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _single_part(records: list[dict]) -> bool:
    """True when only one loss term is non-zero, so the total would draw over it."""
    parts = [n for n in LOSS_CURVES if n != "loss" and any(r.get(n) for r in records)]
    return len(parts) <= 1


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _fmt(value) -> str:
    if value is None:  # NaN/inf are written as null
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(run_dir: str | Path) -> Path:
    """Plots under `run_dir/plots/` and `run_dir/report.md`; returns the report's path."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    history = read_history(run_dir)
    plots = write_plots(history, config, run_dir / "plots")
    train = config.get("train") or {}
    last = history.train[-1] if history.train else {}
    lines = [f"# Run report: {run_dir.name}", ""]
    planned = train.get("samples") or train.get("steps", 0) * train.get("global_batch_size", 0)
    batch = train.get("global_batch_size") or 1
    planned_steps = max(1, train["samples"] // batch) if train.get("samples") else train.get("steps", 0)
    done = (run_dir / "final").is_dir() and last.get("step", 0) >= planned_steps
    state = "finished" if done else "not finished"
    lines += [f"- Status: {state}; {last.get('step', 0)} steps, {last.get('samples', 0):,} pairs seen"
              f"{f' of {planned:,} planned' if planned else ''}.",
              f"- Model: {_model_line(config)}."]
    lines += _data_lines(config, last)
    skips = {k.removeprefix("skipped_"): v for k, v in last.items() if k.startswith("skipped_") and v}
    lines.append(f"- Samples skipped (all ranks): "
                 f"{', '.join(f'{k} {v}' for k, v in sorted(skips.items())) if skips else 'none'}; "
                 f"non-finite losses skipped: {last.get('nonfinite_skipped', 0)}.")
    lines += ["", "## Final metrics", "", "| metric | value |", "|---|---:|"]
    for name in ("loss", "contrastive_loss", "mlm_loss", "itm_loss", "classification_loss", "vqa_loss", "distill_loss",
                 "distill_feature_loss", "temperature", "lr", "samples_per_second", "mfu"):
        if last.get(name) is not None and (name in ("loss", "lr", "temperature") or last[name]):
            lines.append(f"| train {name} | {_fmt(last[name])} |")
    if history.eval:
        first, final = history.eval[0], history.eval[-1]
        shown = [first, final] if first["step"] != final["step"] else [final]
        lines += ["", "| validation | " + " | ".join(f"step {r['step']}" for r in shown) + " |",
                  "|---|" + "---:|" * len(shown)]
        for name in final:
            if name not in ("kind", "step") and any(r.get(name) is not None for r in shown):
                label = "pairs" if name == "samples" else name
                lines.append(f"| {label} | " + " | ".join(_fmt(r.get(name)) for r in shown) + " |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    lines += ["", "## Resolved config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    report = run_dir / "report.md"
    write_atomically(report, "\n".join(lines).encode("utf-8"))
    return report


def _data_lines(config: dict, last: dict) -> list[str]:
    """Pairs and shards per split (from sizes.json, when the shards are local and have one) and epochs seen."""
    from mmscale.data.tars import read_sizes, spec_urls

    lines = []
    for split, title in (("train", "Training"), ("val", "Validation")):
        spec = (config.get("data") or {}).get(split)
        if not spec:
            lines.append(f"- {title} data: none.")
            continue
        try:
            urls = spec_urls(spec)
            sizes = read_sizes(urls)
        except Exception:  # noqa: BLE001  # a shard spec that no longer resolves: the report still gets written
            sizes, urls = None, []
        if not sizes:
            lines.append(f"- {title} data `{spec}`: {len(urls)} shards (no sizes.json beside them to count pairs).")
            continue
        pairs = sum(sizes.values())
        epochs = f", {last.get('samples', 0) / pairs:.2f} epochs seen" if split == "train" and pairs else ""
        lines.append(f"- {title} data `{spec}`: {pairs:,} pairs in {len(sizes)} shards{epochs}.")
    return lines


def _model_line(config: dict) -> str:
    model = config.get("model") or {}
    source = model.get("init_from") or ",".join(filter(None, (model.get("vision_from"), model.get("text_from"))))
    lora = (config.get("lora") or {}).get("enabled")
    return (f"from `{source}`" if source else f"preset `{model.get('preset', '?')}`") + (" + LoRA" if lora else "")
