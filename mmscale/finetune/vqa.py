"""VQA fine-tuning: the `vqa` config section and the answer list a run trains its answer head over.

The answer list is the `vqa.answers` most frequent normalized answers of the training shards (each question's
distinct answers counted once), read from their json members only. It is fixed for the run: a run started from
a VQA model keeps that model's list (its head's rows mean those answers), a resumed run reads the list it wrote
to OUTPUT_DIR/vqa_answers.json, and a new run counts it on rank 0 and sends it to the other ranks, so every
rank builds the same head.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from mmscale.atomic import write_atomically
from mmscale.data.tars import ShardError, ShardTruncated, iter_raw_samples, parse_spec
from mmscale.data.vqa import answer_list, parse_vqa_json

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


def count_answer_list(spec: str, size: int) -> list[str]:
    """The `size` most frequent answers of the VQA samples of `spec` (mmscale.data.vqa.answer_list), reading only
    the json members; unreadable shards and bad samples are passed over with a warning naming how many."""
    answer_sets, bad, unreadable = [], 0, []
    for source in parse_spec(spec):
        for url in source.urls:
            try:
                for raw in iter_raw_samples(url, extensions=("json",)):
                    try:
                        answer_sets.append(list(parse_vqa_json(raw.get("json")).answers))
                    except ValueError:  # SampleRejected: counted, the loader skips it in training too
                        bad += 1
            except (ShardError, ShardTruncated, OSError) as error:
                unreadable.append(f"{url} ({error})")
    if unreadable or bad:
        warnings.warn(f"VQA answer list: {bad} samples without a question or answer, {len(unreadable)} unreadable "
                      f"shards{': ' + unreadable[0] if unreadable else ''}", stacklevel=2)
    answers = answer_list(answer_sets, size)
    if len(answers) < 2:
        raise ValueError(f"data.train {spec} holds {len(answer_sets)} VQA samples with {len(answers)} distinct "
                         "answers; VQA fine-tuning needs shards of KEY.jpg + KEY.json {\"question\", \"answers\"} "
                         "(tools/make_shards.py --answers, or mmscale.shards.synthetic.make_vqa_shards)")
    return answers


def run_answer_list(settings: VqaSettings, *, train_spec: str, output: Path, checkpoint_answers: list[str],
                    rank: int) -> list[str]:
    """The answer list of this run, the same on every rank (a collective when torch.distributed is up): the
    started-from model's, else the one a previous attempt of this run saved, else counted from the training
    shards (rank 0) and saved beside the checkpoints."""
    chosen = [None]
    if rank == 0:
        saved = output / ANSWERS_FILE
        if checkpoint_answers:
            answers = list(checkpoint_answers)
        elif saved.is_file():
            answers = json.loads(saved.read_text())["answers"]
        else:
            answers = count_answer_list(train_spec, settings.answers)
        output.mkdir(parents=True, exist_ok=True)
        write_atomically(saved, (json.dumps({"answers": answers}, indent=1) + "\n").encode())
        chosen = [answers]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    return chosen[0]
