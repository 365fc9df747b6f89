"""VQA fine-tuning: the `vqa` config section and the answer list a run trains its answer head over.

The answer list is the `vqa.answers` most frequent normalized answers of the training shards (each question's
distinct answers counted once), read from their json members only. It is fixed for the run: a run started from
a VQA model keeps that model's list (its head's rows mean those answers), a run resuming from its checkpoint reads
the list it wrote to OUTPUT_DIR/vqa_answers.json, and a new run counts it; rank 0 chooses and the other ranks get
its list, so every rank builds the same head.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from mmscale.atomic import write_atomically
from mmscale.data.tars import SampleRejected, ShardError, ShardTruncated, iter_raw_samples, parse_spec
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
                    except SampleRejected:  # counted; the loader skips it in training too
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


def choose_answer_list(settings: VqaSettings, *, train_spec: str, output: Path, checkpoint_answers: list[str],
                       resuming: bool) -> list[str]:
    """The answer list of this run (call it on one rank: mmscale.train.checkpoints.from_rank_0 hands it to the
    others): the started-from model's; else, when the run resumes from a checkpoint, the list its first attempt
    saved; else counted from the training shards. Saved to OUTPUT_DIR/vqa_answers.json."""
    saved = output / ANSWERS_FILE
    if checkpoint_answers:
        answers = list(checkpoint_answers)
    elif resuming and saved.is_file():
        try:
            answers = json.loads(saved.read_text())["answers"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{saved}: unreadable ({error}); the checkpoints' answer head needs the list it was "
                             "trained with") from None
        if not isinstance(answers, list) or not all(isinstance(answer, str) for answer in answers):
            raise ValueError(f"{saved}: \"answers\" is not a list of strings")
    else:  # a new run (a list left by an attempt that saved no checkpoint is counted again)
        answers = count_answer_list(train_spec, settings.answers)
    output.mkdir(parents=True, exist_ok=True)
    write_atomically(saved, (json.dumps({"answers": answers}, indent=1) + "\n").encode())
    return answers
