"""VQA evaluation and answering: a fusion model's answer head on VQA shards or on one image.

`answer_questions` runs the answer head over every rank's share of a pass (ranks in lockstep under ZeRO-3, as
mmscale.eval.embed does), `vqa_metrics` scores the answers as the VQA v2 evaluation does (mmscale.data.vqa:
accuracy overall and per question type, over every rank), and `vqa_command` / `answer_command` are
`mmscale eval vqa` and `mmscale vqa`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from mmscale.data.vqa import answer_accuracy, normalize_answer
from mmscale.eval.embed import distributed, lockstep, placeholder_batch

NOT_LISTED = "(not in the answer list)"


@dataclass
class Answered:
    """This rank's questions of one pass and the model's answers to them."""

    answers: list[str]
    """The model's answer list."""
    predicted: list[int] = field(default_factory=list)
    """Each question's answer, an index into `answers`."""
    probability: list[float] = field(default_factory=list)
    """The predicted answer's sigmoid probability."""
    truth: list[tuple[str, ...]] = field(default_factory=list)
    """Each question's human answers."""
    question_types: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


@torch.no_grad()
def answer_questions(model, batches, *, device: torch.device, max_samples: int = 0) -> Answered:
    """The answer head's top answer to each question of this rank's share of `batches` (VQA batches:
    mmscale.data.loader.build_loader(..., vqa=...)). Across ranks every rank runs as many forward passes as the
    one with the most batches (a one-question placeholder when it has run out), as ZeRO-3's gathers need."""
    answered = Answered(answers=list(model.vqa_answers))
    was_training = model.training
    model.eval()  # no dropout, every patch
    try:
        for batch, real in lockstep(batches, device=device, placeholder=placeholder_batch(model, 8),
                                    max_samples=max_samples):
            logits = model.vqa_logits(batch["images"].to(device), batch["input_ids"].to(device),
                                      batch["attention_mask"].to(device)).float()
            if real:
                _add_answers(answered, batch, logits)
    finally:
        model.train(was_training)
    return answered


def _add_answers(answered: Answered, batch: dict, logits: torch.Tensor) -> None:
    probability, predicted = logits.sigmoid().max(dim=1)
    answered.predicted += predicted.tolist()
    answered.probability += probability.tolist()
    answered.truth += [tuple(answers) for answers in batch["answers"]]
    answered.question_types += list(batch["question_types"])
    answered.keys += list(batch["keys"])


def vqa_metrics(answered: Answered, *, reduce: bool = False) -> dict[str, float]:
    """`vqa_accuracy` (the VQA v2 evaluation's, mean over questions), `vqa_questions`, and `vqa_accuracy_<type>`
    per question type; with `reduce`, over every rank's questions (a collective)."""
    per_type: dict[str, list[float]] = {}
    for index, truth, kind in zip(answered.predicted, answered.truth, answered.question_types):
        score = answer_accuracy(answered.answers[index], list(truth))
        for name in ("", kind) if kind else ("",):
            sums = per_type.setdefault(name, [0.0, 0.0])
            sums[0] += score
            sums[1] += 1
    if reduce and distributed():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, per_type)
        per_type = {}
        for part in gathered:
            for name, (total, count) in part.items():
                sums = per_type.setdefault(name, [0.0, 0.0])
                sums[0] += total
                sums[1] += count
    total, count = per_type.pop("", [0.0, 0.0])
    metrics = {"vqa_accuracy": total / count if count else float("nan"), "vqa_questions": int(count)}
    metrics |= {f"vqa_accuracy_{name}": value[0] / value[1] for name, value in sorted(per_type.items())}
    return metrics


def question_only_prior(answered: Answered) -> float:
    """The accuracy of answering each question type with its most frequent consensus answer, ignoring the image
    (the question-only prior the image has to beat), scored like the model's answers."""
    by_type: dict[str, Counter] = {}
    for truth, kind in zip(answered.truth, answered.question_types):
        by_type.setdefault(kind, Counter())[consensus(truth)] += 1
    guesses = {kind: counts.most_common(1)[0][0] for kind, counts in by_type.items()}
    scores = [answer_accuracy(guesses[kind], list(truth)) for truth, kind in zip(answered.truth,
                                                                                  answered.question_types)]
    return sum(scores) / len(scores) if scores else float("nan")


def consensus(answers: tuple[str, ...]) -> str:
    """The most frequent normalized human answer (ties: the alphabetically first)."""
    counts = Counter(normalize_answer(answer) for answer in answers)
    return min(counts.items(), key=lambda item: (-item[1], item[0]))[0] if counts else ""


def report_labels(answered: Answered) -> tuple[list[int], list[int], list[str]]:
    """(true, predicted, names) for the per-answer report: a question's true class is its consensus answer, a
    consensus answer outside the answer list is one extra class, NOT_LISTED."""
    index = {answer: position for position, answer in enumerate(answered.answers)}
    names = list(answered.answers)
    truth = [index.get(consensus(answers), len(names)) for answers in answered.truth]
    if any(label == len(names) for label in truth):
        names.append(NOT_LISTED)
    return truth, list(answered.predicted), names


def _load_answering_model(checkpoint: str):
    """A saved model with a VQA head (float or int8 export) and its tokenizer."""
    from mmscale.eval.use import model_and_tokenizer

    model, tokenizer = model_and_tokenizer(checkpoint)
    if getattr(model, "vqa_head", None) is None:
        raise ValueError(f"{checkpoint} has no VQA answer head; fine-tune a fusion model on VQA shards first "
                         "(mmscale finetune --checkpoint DIR --config configs/finetune/vqa.yaml ...)")
    return model, tokenizer


def vqa_command(args) -> int:
    """`mmscale eval vqa`: print the metrics, then one JSON object with `accuracy` as the last line."""
    from mmscale.data.config import DataConfig
    from mmscale.data.loader import build_loader
    from mmscale.data.text import load_tokenizer
    from mmscale.data.vqa import AnswerTargets

    if args.report and Path(args.report).exists() and not Path(args.report).is_dir():
        raise ValueError(f"--report {args.report}: a file is there; give a folder (it is created if missing)")
    model, tokenizer = _load_answering_model(args.checkpoint)
    device = model.device
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    data = DataConfig(val=args.data, image_size=model.image_size, **model.caption_settings(args.context_length),
                      workers=args.workers, mlm_probability=0.0)
    loader = build_loader(data, spec=args.data, tokenizer=tokenizer, batch_size=args.batch_size, train=False,
                          rank=0, world_size=1, vqa=AnswerTargets(model.vqa_answers))
    answered = answer_questions(model, loader, device=device)
    metrics = vqa_metrics(answered)
    result = {"accuracy": metrics.pop("vqa_accuracy"), "questions": metrics.pop("vqa_questions"),
              "question_only_prior": question_only_prior(answered)}
    result |= {name.replace("vqa_accuracy_", "accuracy_"): value for name, value in metrics.items()}
    if args.report:
        from mmscale.eval.report import format_report, write_report

        truth, predicted, names = report_labels(answered)
        report = write_report(args.report, truth, predicted, names, title=f"VQA answers of {args.checkpoint}")
        print(format_report(report))
        result["report"] = args.report
    for name, value in result.items():
        print(f"{name:>24}: {value:.4f}" if isinstance(value, float) else f"{name:>24}: {value}")
    skipped = dict(loader.skipped)
    if skipped:
        print(f"{'skipped':>24}: {skipped}")
        result["skipped"] = skipped
    print(json.dumps(result))
    return 0


def answer_command(args) -> int:
    """`mmscale vqa`: the top answers to one question about one image, with their probabilities."""
    from mmscale.data.text import CaptionEncoder
    from mmscale.eval.use import read_image

    if not args.question.strip():
        raise ValueError("--question is empty")
    model, tokenizer = _load_answering_model(args.checkpoint)
    device = model.device
    image = read_image(args.image, model.image_size)
    encoded = CaptionEncoder(tokenizer, mlm_probability=0.0, **model.caption_settings(args.context_length)).encode(
        [args.question.strip()])
    with torch.no_grad():
        probabilities = model.vqa_logits(image[None].to(device), encoded["input_ids"].to(device),
                                         encoded["attention_mask"].to(device)).float().sigmoid()[0].cpu()
    top = probabilities.topk(min(args.top, len(probabilities)))
    answers = [{"answer": model.vqa_answers[index], "probability": float(value)}
               for value, index in zip(top.values.tolist(), top.indices.tolist())]
    for answer in answers:
        print(f"{answer['probability']:.4f}  {answer['answer']}")
    print(json.dumps({"question": args.question.strip(), "answers": answers}))
    return 0
