"""VQA questions for shard writing: from VQA v2 files or from table cells, checked, one sample per question.

VQA v2 (visualqa.org) ships a questions file `{"questions": [{"image_id", "question", "question_id"}, ...]}`
and, except for test splits, an annotations file `{"annotations": [{"question_id", "question_type",
"answers": [{"answer", ...}, ...], ...}, ...]}`; its images are COCO files named by their id
(`COCO_train2014_000000123456.jpg`). A table gives a question column, an answer column (one answer, a JSON
list of answers, or a list) and optionally a question-type column.

A question becomes `KEY.json` `{"question", "answers", "question_type"?}` (mmscale.data.vqa's format). Answers
are kept as the annotators wrote them; readers normalize them as the VQA evaluation does. What cannot be a
sample is a skip reason (`missing_question`, `missing_answer`, `bad_text`), as mmscale.data.vqa names them.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass

from mmscale.data.tars import IMAGE_EXTENSIONS, SampleRejected

_COCO_ID = re.compile(r"(?<!\d)(\d{12})$")  # COCO_train2014_000000123456: the id, zero-padded to 12 digits


@dataclass(frozen=True, slots=True)
class Question:
    """A VQA sample's question, its human answers (none for a test split) and its type ("" when not given)."""

    text: str
    answers: tuple[str, ...] = ()
    question_type: str = ""

    def as_json(self) -> dict:
        """The fields of the sample's json member."""
        fields = {"question": self.text, "answers": list(self.answers)}
        if self.question_type:
            fields["question_type"] = self.question_type
        return fields


@dataclass(frozen=True, slots=True)
class VqaSample:
    """One question of a VQA v2 file: where it came from, its image file (None when not found), the question
    (None when there is none) and the reason it cannot be a sample (None when it can)."""

    source: str
    image_path: str | None
    question: Question | None
    problem: str | None = None


class VqaFileError(ValueError):
    """A VQA v2 file that is not one; the message names the file and the fix."""


def question_from_cells(question, answers, question_type=None, *, with_answers: bool) -> Question | str:
    """A Question from table-like values, or the skip reason: `missing_question`, `missing_answer` (none of the
    answers is more than punctuation and articles, when `with_answers`), `bad_text` (not text, or not UTF-8)."""
    if _missing(question):
        return "missing_question"
    if isinstance(question, (int, float)):
        question = str(question)
    if not isinstance(question, str):
        return "bad_text"  # a list or mapping, not text
    parsed = answer_cell(answers)
    if parsed is None:
        return "bad_text"
    question_type = "" if _missing(question_type) else question_type
    if not isinstance(question_type, str) or not _is_utf8(question.strip(), *parsed, question_type):
        return "bad_text"
    if not question.strip():
        return "missing_question"
    if with_answers and not any(_normalize(answer) for answer in parsed):
        return "missing_answer"
    return Question(question.strip(), tuple(sys.intern(answer) for answer in parsed),
                    sys.intern(question_type.strip()))


def answer_cell(value) -> tuple[str, ...] | None:
    """The answers in one cell: a string (one answer, or a JSON list of them), a list of strings or numbers
    (VQA v2's `{"answer": ...}` objects too); () for an empty cell, None for anything else."""
    if _missing(value):
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                return (text,)  # an answer that happens to start with a bracket
        else:
            return (text,) if text else ()
    if isinstance(value, (int, float)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return None
    answers = []
    for item in value:
        if isinstance(item, dict):
            item = item.get("answer")
        if isinstance(item, bool) or not isinstance(item, (str, int, float)) or _missing(item):
            return None
        text = _number_text(item) if not isinstance(item, str) else item.strip()
        if text:
            answers.append(text)
    return tuple(answers)


def vqa_v2_samples(questions, annotations, *, path: str, answers_path: str | None, image_root: str,
                   probe: int = 20) -> list[VqaSample]:
    """The questions of a VQA v2 questions file (parsed JSON) in file order, with their annotations' answers and
    types when `annotations` (the parsed annotations file) is given, and their images found by id under
    `image_root` (image_index, built once). A question the annotations lack is a `missing_answer`; one whose
    image is not there a `missing_image`. VqaFileError when the files are not VQA v2 files, or when no image of
    the first `probe` questions is found (a wrong --image-root)."""
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise VqaFileError(f"input {path}: not a VQA v2 questions file (needs a 'questions' list); "
                           "pass --input-kind if it is something else")
    by_question = {}
    if annotations is not None:
        if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
            raise VqaFileError(f"--answers {answers_path}: not a VQA v2 annotations file (needs an "
                               "'annotations' list); give the annotations of the same split as --input")
        by_question = {item.get("question_id"): item for item in annotations["annotations"] if isinstance(item, dict)}
    images, name = image_index(image_root), os.path.basename(path)
    samples, wanted = [], []
    for item in questions["questions"]:
        item = item if isinstance(item, dict) else {}
        question_id, image = item.get("question_id"), _image_id(item.get("image_id"))
        annotation = by_question.get(question_id, {})
        question = question_from_cells(item.get("question"), annotation.get("answers"),
                                       annotation.get("question_type"), with_answers=annotations is not None)
        image_path = images.get(image)
        problem = question if isinstance(question, str) else "missing_image" if image_path is None else None
        samples.append(VqaSample(f"{name}#question_id={question_id},image_id={item.get('image_id')}", image_path,
                                 None if isinstance(question, str) else question, problem))
        if len(wanted) < probe:
            wanted.append(image)
    if wanted and not any(image in images for image in wanted):
        example = next((image for image in wanted if image is not None), 0)
        raise VqaFileError(f"input {path}: no image of the first {len(wanted)} questions is under {image_root} "
                           f"(e.g. image_id {example}: a file named like COCO_train2014_{example:012d}.jpg); "
                           "pass the folder of the images with --image-root")
    return samples


def sample_question(payload: bytes | None) -> Question | None:
    """The VQA question and answers of a shard sample's json member, when it holds a question or answers (a
    test split's questions without answers too); None for any other sample (a caption sample's metadata, or
    json that does not parse: the caption reader judges that). SampleRejected `missing_question` for answers
    without a question, `bad_json` for answers that are not a list of answers."""
    try:
        meta = json.loads(payload) if payload else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(meta, dict) or not ("question" in meta or "answers" in meta):
        return None
    fields = vqa_fields(payload, need_answers=False)
    return Question(fields.question, fields.answers, fields.question_type)


def vqa_fields(payload: bytes | None, *, need_answers: bool = True):
    """mmscale.data.vqa.parse_vqa_json's fields of a json member, whatever a crafted shard holds: answers that
    are not a list (a number, `true`) or objects without an "answer" are `bad_json` too, not an exception."""
    from mmscale.data.vqa import parse_vqa_json  # imports torch: only VQA shards pay for it

    try:
        return parse_vqa_json(payload, need_answers=need_answers)
    except (TypeError, KeyError, AttributeError):
        raise SampleRejected("bad_json", "json answers are not a list of answers") from None


def image_index(root: str) -> dict[int, str]:
    """Image files under `root` (searched recursively, in sorted order) by COCO image id: a file whose stem is
    the id, or ends with it zero-padded to 12 digits (`COCO_val2014_000000000042.jpg` is image 42). The first
    file found for an id is kept."""
    index: dict[int, str] = {}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(files):
            stem, extension = os.path.splitext(name)
            if name.startswith(".") or extension[1:].lower() not in IMAGE_EXTENSIONS:
                continue
            match = _COCO_ID.search(stem)
            if stem.isdigit() or match:
                index.setdefault(int(stem if stem.isdigit() else match.group(1)), os.path.join(folder, name))
    return index


def _image_id(value) -> int | None:
    """A VQA v2 image id as an int (ids are ints; a string of digits is accepted), None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number_text(value: int | float) -> str:
    """An answer a jsonl or parquet table holds as a number: 2.0 and 2 are both "2"."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _is_utf8(*texts: str) -> bool:
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:  # a csv cell read with surrogateescape
        return False
    return True


def _normalize(answer: str) -> str:
    from mmscale.data.vqa import normalize_answer  # imports torch: only VQA inputs pay for it

    return normalize_answer(answer)
