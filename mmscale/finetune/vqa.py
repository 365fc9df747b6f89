"""VQA fine-tuning: the `vqa` config section and the answer list a run trains its answer head over.

The answer list is the `vqa.answers` most frequent normalized answers of the training shards (each question's
distinct answers counted once), read from their json members only. It is fixed for the run: a run started from
a VQA model keeps that model's list (its head's rows mean those answers), a run resuming from its checkpoint reads
the list it wrote to OUTPUT_DIR/vqa_answers.json, and a new run counts it, each rank reading its share of the
shards and rank 0 choosing from their sum, so every rank builds the same head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mmscale.atomic import write_atomically
from mmscale.data.vqa import AnswerCount, answers_counted, count_answers

ANSWERS_FILE = "vqa_answers.json"


@dataclass
class VqaSettings:
    """Visual question answering fine-tuning (loss.objective=vqa)."""

    answers: int = 1000
    """Size of the answer list: the most frequent normalized answers of the training shards (VQA v2 models use
    the ~3,000 answers given at least 9 times); questions whose answers are all outside it have all-zero targets."""

    def __post_init__(self):
        if self.answers < 2:
            raise ValueError(f"vqa.answers must be >= 2, got {self.answers}")


def known_answer_list(*, output: Path, checkpoint_answers: list[str], resuming: bool) -> list[str] | None:
    """The answer list a run must keep: the started-from model's; else, when the run resumes from a checkpoint,
    the list its first attempt saved; None when there is none (a new run counts one)."""
    if checkpoint_answers:
        return list(checkpoint_answers)
    saved = output / ANSWERS_FILE
    if not (resuming and saved.is_file()):  # a list left by an attempt that saved no checkpoint is counted again
        return None
    try:
        answers = json.loads(saved.read_text())["answers"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{saved}: unreadable ({error}); the checkpoints' answer head needs the list it was "
                         "trained with") from None
    if not isinstance(answers, list) or not all(isinstance(answer, str) for answer in answers):
        raise ValueError(f"{saved}: \"answers\" is not a list of strings")
    return answers


def choose_answer_list(settings: VqaSettings, *, train_spec: str, output: Path, checkpoint_answers: list[str],
                       resuming: bool) -> list[str]:
    """The answer list of this run, the same on every rank (a collective: every rank calls it), saved to
    OUTPUT_DIR/vqa_answers.json: known_answer_list's, else counted from the training shards, each rank reading
    its share of them (VQA v2's shards hold ~13 GB of images the count reads past: one reader would keep the
    others waiting at their first collective for minutes). An error on any rank is raised on every rank."""
    import torch.distributed as dist

    from mmscale.train.checkpoints import from_rank_0

    answers = from_rank_0(lambda: known_answer_list(output=output, checkpoint_answers=checkpoint_answers,
                                                    resuming=resuming))
    if answers is None:
        try:
            part = ("value", count_answers(train_spec, rank=dist.get_rank(), world_size=dist.get_world_size()))
        except Exception as error:  # noqa: BLE001  # handed to every rank below, then raised on each
            part = ("error", f"rank {dist.get_rank()}: {type(error).__name__}: {error}")
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, part)
        failed = [value for kind, value in parts if kind == "error"]
        if failed:
            raise ValueError(f"counting the VQA answers of {train_spec} failed on {len(failed)} rank(s): {failed[0]}")
        total = sum((value for _, value in parts), AnswerCount())
        answers = from_rank_0(lambda: answers_counted(total, settings.answers, train_spec))

    def save() -> None:
        output.mkdir(parents=True, exist_ok=True)
        write_atomically(output / ANSWERS_FILE, (json.dumps({"answers": answers}, indent=1) + "\n").encode())

    from_rank_0(save)
    return answers
