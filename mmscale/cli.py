"""`mmscale <command>`: the entry point.

Commands that take a config accept `--config FILE` and any number of dotted `key=value`
overrides (defaults < YAML < command line); `--help` on them lists every config key with
its default and docstring.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading
from pathlib import Path

from mmscale.config import ConfigError, help_text, load_config
from mmscale.data.loader import UnusableData
from mmscale.data.tars import ALLOW_PIPE_VARIABLE, ShardError


def _config_parser(subparsers, name: str, *, summary: str, config_class) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help=summary, description=summary, epilog=help_text(config_class),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (sections as in the keys below)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.workers=8")
    _allow_pipe_flag(parser)
    parser.set_defaults(config_class=config_class)
    return parser


def _allow_pipe_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-pipe", action="store_true", help="allow `pipe:` shard URLs, which run shell commands "
                        f"(only from here or {ALLOW_PIPE_VARIABLE}=1, never from a config file)")


def _eval_parsers(subparsers) -> None:
    evaluation = subparsers.add_parser("eval", help="evaluate a saved model (zero-shot, retrieval, masked words)")
    kinds = evaluation.add_subparsers(dest="eval_kind", required=True)
    for kind, summary in (("zeroshot", "zero-shot classification accuracy on labelled shards"),
                          ("retrieval", "image-text retrieval recall@1/5/10 on caption shards"),
                          ("mlm", "masked-word accuracy on caption shards, with each caption's image and with a "
                                  "blank gray one"),
                          ("vqa", "VQA accuracy (the VQA v2 evaluation's) of a VQA-fine-tuned fusion model on VQA "
                                  "shards, overall and per question type, beside the question-only prior")):
        parser = kinds.add_parser(kind, help=summary, description=summary + "; the last line printed is one JSON object")
        parser.add_argument("--checkpoint", required=True,
                            help="model folder (mmscale final/, HF CLIP, dual encoder or BLIP ITM)")
        parser.add_argument("--data", required=True, help="shard spec of the evaluation data")
        parser.add_argument("--tokenizer", default="", help="tokenizer folder (default: the checkpoint's)")
        parser.add_argument("--batch-size", type=int, default=64)
        parser.add_argument("--context-length", type=int, default=64, help="caption tokens, as in training")
        parser.add_argument("--workers", type=int, default=2)
        _allow_pipe_flag(parser)
        if kind == "zeroshot":
            parser.add_argument("--classnames", required=True, help="one class name per line; line i is label i")
            parser.add_argument("--templates", default="", help="prompt templates, one per line with {} (default: "
                                "'a photo of a {}.')")
            parser.add_argument("--report", default="", metavar="DIR", help="also write a per-class report to "
                                "DIR (created): report.txt and report.json (precision, recall, F1 and support per "
                                "class, scikit-learn's classification_report layout) and confusion.png")
        if kind == "retrieval":
            parser.add_argument("--rerank", type=int, default=0, metavar="K", help="re-rank each query's top K "
                                "contrastive results by a fusion model's ITM match logit plus the cosine (BLIP's score) and report rerank_i2t_r1.. "
                                "beside the contrastive recall (ALBEF/BLIP evaluation; default 0: off)")
            parser.add_argument("--itm-label-groups", action="store_true", help="a fusion model's itm_accuracy: "
                                "no hard negative with the caption's .cls label (as loss.itm_label_groups trains)")
            parser.add_argument("--match-labels", action="store_true", help="a result with the query's .cls label "
                                "counts as correct (category-level recall, for captions that are templates of a "
                                "label); default: the same caption or the same image")
        if kind == "vqa":
            parser.add_argument("--report", default="", metavar="DIR", help="also write a per-answer report to DIR "
                                "(created): report.txt and report.json (precision, recall, F1 and support per answer, "
                                "a question's true answer being its most frequent human answer) and confusion.png")
        if kind == "mlm":
            parser.add_argument("--words", default="", metavar="FILE", help="mask every whole-word occurrence "
                                "(case-insensitive, every word piece) of these words, one a line (default: "
                                "BERT's random 15%% masking, seeded per caption)")


def _use_parsers(subparsers) -> None:
    convert = subparsers.add_parser("convert", help="convert an open_clip checkpoint into a transformers CLIPModel "
                                    "folder (weights, tokenizer, image processor)",
                                    description="convert an open_clip checkpoint into a transformers CLIPModel folder "
                                    "(weights, tokenizer, image processor) that fine-tuning and every command take")
    convert.add_argument("--from-open-clip", required=True, metavar="MODEL_NAME",
                         help="open_clip's model config name (e.g. ViT-B-32, ViT-B-16-quickgelu)")
    convert.add_argument("--weights", required=True, help="the checkpoint: .safetensors or a tensors-only torch file")
    convert.add_argument("--out", required=True, help="output folder")
    convert.add_argument("--open-clip-config", default=None, help="the model's JSON config, where open_clip is not "
                         "installed or the model is not one of its configs")
    export = subparsers.add_parser("export", help="merge adapters, quantize (int8, int8-cpu, nf4) or not, as a "
                                   "transformers folder or ONNX graphs; writes export_report.json",
                                   description="merge adapters, quantize (int8, int8-cpu, nf4) or not, as a "
                                   "transformers folder or ONNX graphs; writes export_report.json")
    export.add_argument("--checkpoint", required=True, help="model folder (final/) or a LoRA adapter/ folder")
    export.add_argument("--out", required=True, help="output folder (transformers loads it)")
    export.add_argument("--quantize", choices=["int8", "int8-cpu", "nf4", "none"], default="int8",
                        help="int8: bitsandbytes LLM.int8 (CPU or GPU); int8-cpu: int8 linear layers fast on CPU; "
                        "nf4: bitsandbytes 4-bit; none: float")
    export.add_argument("--format", choices=["transformers", "onnx"], default="transformers",
                        help="transformers: a folder AutoModel.from_pretrained loads; onnx: image and text encoders "
                        "as ONNX graphs (dynamic batch) checked with onnxruntime")
    export.add_argument("--quantize-projections", action="store_true", help="put the projections in int8 too")
    export.add_argument("--data", default="", help="evaluation shards: zero-shot / retrieval before and after")
    export.add_argument("--classnames", default="", help="class names for zero-shot on --data")
    export.add_argument("--templates", default="")
    export.add_argument("--context-length", type=int, default=64)
    summary = ("remove a fraction of every layer's attention heads and MLP neurons of both towers (by importance on "
               "--data, else weight magnitude); writes prune_report.json")
    prune = subparsers.add_parser("prune", help=summary, description=summary)
    prune.add_argument("--checkpoint", required=True, help="dual-encoder model folder (final/) or a LoRA adapter/")
    prune.add_argument("--out", required=True, help="output folder (transformers loads it)")
    prune.add_argument("--heads", type=float, default=0.0, help="fraction of attention heads per layer to remove "
                       "(zeroed in place: transformers 5 saves no narrower attention)")
    prune.add_argument("--mlp", type=float, default=0.0, help="fraction of MLP neurons per layer to remove")
    prune.add_argument("--data", default="", help="shards to calibrate on (and score zero-shot / retrieval before "
                       "and after)")
    prune.add_argument("--calibration", type=int, default=512, help="image-caption pairs of --data to calibrate on")
    prune.add_argument("--classnames", default="", help="class names for zero-shot on --data")
    prune.add_argument("--templates", default="")
    prune.add_argument("--context-length", type=int, default=64)
    embed = subparsers.add_parser("embed", help="embed images or texts to .npy or .parquet")
    embed.add_argument("--checkpoint", required=True, help="model folder (float or int8 export)")
    source = embed.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="glob of image files (quote it)")
    source.add_argument("--texts", help="text file, one text per line")
    embed.add_argument("--out", required=True, help="FILE.npy or FILE.parquet")
    embed.add_argument("--batch-size", type=int, default=64)
    embed.add_argument("--context-length", type=int, default=64)
    zeroshot = subparsers.add_parser("zeroshot", help="classify one image by class names")
    zeroshot.add_argument("--checkpoint", required=True, help="model folder (float or int8 export)")
    zeroshot.add_argument("--image", required=True)
    zeroshot.add_argument("--classnames", required=True, help="one class name per line")
    zeroshot.add_argument("--templates", default="", help="prompt templates with {} (default 'a photo of a {}.')")
    zeroshot.add_argument("--top", type=int, default=5)
    zeroshot.add_argument("--context-length", type=int, default=64)
    summary = "image-text matching probability of one image with each text (a fusion model's ITM head)"
    match = subparsers.add_parser("match", help=summary, description=summary + "; one line per text in the file's "
                                  "order, then one JSON object")
    match.add_argument("--checkpoint", required=True, help="fusion model folder (mmscale final/ or BLIP ITM)")
    match.add_argument("--image", required=True)
    match.add_argument("--texts", required=True, help="text file, one text per line; printed in this order")
    match.add_argument("--batch-size", type=int, default=64)
    match.add_argument("--context-length", type=int, default=64)
    summary = "answer a question about one image (a VQA-fine-tuned fusion model, float or int8 export)"
    vqa = subparsers.add_parser("vqa", help=summary, description=summary + "; the top answers with their "
                                "probabilities, then one JSON object")
    vqa.add_argument("--checkpoint", required=True, help="VQA model folder (mmscale finetune's final/ or its export)")
    vqa.add_argument("--image", required=True)
    vqa.add_argument("--question", required=True)
    vqa.add_argument("--top", type=int, default=5, help="answers to print")
    vqa.add_argument("--context-length", type=int, default=64)


def build_parser() -> argparse.ArgumentParser:
    from mmscale.data.check import DataCheckConfig
    from mmscale.train.config import TrainRunConfig

    parser = argparse.ArgumentParser(prog="mmscale", description="Image-text pretraining at scale.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    quickstart = subparsers.add_parser("quickstart", help="generate a small corpus and run the pipeline on it")
    quickstart.add_argument("--out", default="mmscale-quickstart", help="folder for everything it makes")
    _config_parser(subparsers, "data-check", summary="read training batches through the loader and report "
                   "throughput and skipped samples", config_class=DataCheckConfig)
    train = _config_parser(subparsers, "train", summary="pretrain (or continue) a dual encoder with DeepSpeed; run "
                           "it directly or as `deepspeed ... --module mmscale.train`", config_class=TrainRunConfig)
    train.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher's; env has it
    finetune = _config_parser(subparsers, "finetune", summary="fine-tune a checkpoint (LoRA with "
                              "configs/finetune/lora.yaml, VQA with configs/finetune/vqa.yaml) through the training loop", config_class=TrainRunConfig)
    finetune.add_argument("--checkpoint", required=True, help="model to start from: an mmscale final/, a Hugging "
                          "Face CLIPModel or dual-encoder folder, or VISION_DIR,TEXT_DIR (a vision model and a text encoder)")
    finetune.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    _eval_parsers(subparsers)
    _use_parsers(subparsers)
    report = subparsers.add_parser("report", help="(re)write a run directory's plots and report.md, also "
                                   "for a run that is still going or was stopped")
    report.add_argument("run_dir", help="a training run's output_dir")
    return parser


def _one_line(error: Exception) -> str:
    """The message itself: an error re-raised from a dataloader worker carries the worker's
    whole traceback, whose last line is `module.Type: message`."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and ": " in lines[-1]:
        return lines[-1].split(": ", 1)[1]
    return lines[-1] if lines else type(error).__name__


def _checkpoint_overrides(checkpoint: str, overrides: list[str]) -> list[str]:
    """`--checkpoint` as model overrides; the images follow the checkpoint's size unless data.image_size is given,
    and a SigLIP checkpoint's captions its length (padded to it) unless data.context_length is given."""
    from mmscale.models.checkpoint import image_size_of, model_kind, text_positions_of
    from mmscale.models.from_open_clip import PREFIX as OPEN_CLIP

    if "," in checkpoint:
        vision, text = checkpoint.split(",", 1)
        model = [f"model.vision_from={vision}", f"model.text_from={text}"]
    else:
        vision, model = checkpoint, [f"model.init_from={checkpoint}"]
    given = {item.split("=", 1)[0] for item in overrides}
    if checkpoint.startswith(OPEN_CLIP):  # converted when the run starts; data.image_size=0 takes its side
        return model + list(overrides)
    if "data.image_size" not in given:
        model.append(f"data.image_size={image_size_of(vision)}")
    if "," not in checkpoint and model_kind(checkpoint) == "siglip":  # captions as SigLIP was trained on them
        model += [f"data.{key}={value}" for key, value in (("context_length", text_positions_of(checkpoint)),
                                                           ("pad_to_longest", "false")) if f"data.{key}" not in given]
    return model + list(overrides)


def main(argv: list[str] | None = None) -> int:
    """Run one command; user mistakes print a one-line error and exit 2, not a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if getattr(args, "allow_pipe", False):
        os.environ[ALLOW_PIPE_VARIABLE] = "1"  # dataloader workers inherit it
    try:
        if args.command == "quickstart":
            from mmscale.quickstart import QuickstartFailed, run_quickstart

            try:
                return run_quickstart(args.out)
            except QuickstartFailed as error:
                print(f"mmscale quickstart: failed: {error}", file=sys.stderr)
                return 1
        if args.command == "report":
            from mmscale.train.report import write_report

            if not (Path(args.run_dir) / "metrics.jsonl").is_file():
                raise FileNotFoundError(f"{args.run_dir}: no metrics.jsonl here; give a training run's output_dir")
            print(write_report(args.run_dir))
            return 0
        if args.command == "vqa":
            from mmscale.eval.vqa import answer_command

            return answer_command(args)
        if args.command == "convert":
            from mmscale.models.from_open_clip import convert

            folder = convert(args.from_open_clip, args.weights, args.out, config_file=args.open_clip_config)
            print(json.dumps({"out": str(folder), "model": args.from_open_clip, "class": "CLIPModel"}))
            return 0
        if args.command == "prune":
            from mmscale.export.prune import prune_command

            return prune_command(args)
        if args.command in ("export", "embed", "zeroshot", "match"):
            from mmscale.eval import use

            return getattr(use, f"{args.command}_command")(args)
        if args.command == "eval":
            from mmscale.eval.commands import run_eval_command

            return run_eval_command(args)
        overrides = args.overrides
        if args.command == "finetune":
            overrides = _checkpoint_overrides(args.checkpoint, overrides)
        config = load_config(args.config_class, args.config, overrides)
        if args.command == "data-check":
            from mmscale.data.check import print_report, run_data_check

            print_report(run_data_check(config))
            return 0
        if args.command in ("train", "finetune"):
            from mmscale.train.loop import NonFiniteLoss, train

            try:
                summary = train(config)
            except NonFiniteLoss as error:
                print(f"mmscale {args.command}: stopped: {error}", file=sys.stderr)
                return 1
            if int(os.environ.get("RANK", "0")) == 0:
                print(json.dumps(summary))
            return 0
    except (ConfigError, ShardError, UnusableData, ValueError, FileNotFoundError) as error:
        print(f"mmscale {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


def exit_without_teardown(code: int | None) -> None:
    """Leave a finished command's process with `code` the way a normal exit does (atexit handlers, DataLoader
    workers and other children stopped, output flushed) minus the interpreter's teardown of every imported module,
    which takes ~2 s once DeepSpeed is imported (2-core AMD EPYC: `import deepspeed` alone 6.96 s, its process
    8.78 s). Each rank and CLI call pays it. With a thread of someone else's still running the normal exit is
    kept, since it waits for such (non-daemon) threads."""
    if any(thread.is_alive() and not thread.daemon for thread in threading.enumerate()
           if thread is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # noqa: SLF001  # what sys.exit would run first; os._exit skips them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing to flush into
            pass
    os._exit(code or 0)


def run() -> None:
    """The `mmscale` command and `python -m mmscale.cli`: main() with the exit above."""
    exit_without_teardown(main())


if __name__ == "__main__":
    run()
