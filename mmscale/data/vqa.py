"""Visual question answering samples: the answers' normalization and score, the answer list, soft targets.

A VQA sample is `KEY.jpg` + `KEY.json` holding `{"question": str, "answers": [str, ...]}` (VQA v2: ten human
answers; one is fine) and optionally `"question_type"`, one sample per question. Answers are compared after the
VQA v2 evaluation's normalization of predicted answers (`normalize_answer`: its punctuation rules, number words to
digits, articles dropped, contractions restored, lower case), and a predicted answer scores as that evaluation
scores it (`answer_accuracy`): with ten answers, exactly vqaEval.py (human answers as written, the mean over the
ten leave-one-out sets of nine of min(matches / 3, 1)); with fewer, min(matches / min(3, n), 1) over normalized
answers, so one answer is an exact match. Training targets are a score per candidate answer over normalized
human answers (`soft_scores`): min(count / 3, 1) for three or more answers (the VQA soft target).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
import warnings
from dataclasses import dataclass, field

from mmscale.data.tars import SampleRejected, ShardError, ShardTruncated, iter_raw_samples, parse_spec

# The VQA v2 evaluation's tables (vqaEval.py of the VQA API, github.com/GT-Vision-Lab/VQA).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the evaluation's pattern as written: a period not before a digit
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
VQA_ANNOTATORS = 10  # answers per question in VQA v2


def _punctuation(text: str) -> str:
    """The VQA v2 evaluation's processPunctuation: a mark beside a space, or any mark in a text with a comma inside a
    number, is dropped; elsewhere it becomes a space; then periods not before a digit go."""
    out = text
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
    """An answer as the VQA v2 evaluation normalizes a predicted one: whitespace, its punctuation rule, then lower
    case, number words to digits, articles dropped, contractions restored."""
    out = _punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBERS.get(word, word) for word in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def answer_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one predicted answer against the human answers. Ten answers: exactly the VQA v2 evaluation
    (vqaEval.py): the prediction normalized (normalize_answer), the human answers taken as written, only their
    punctuation processed and only when they disagree, and the mean over each answer left out of min(matches among
    the other nine / 3, 1). Fewer than ten (mmscale's rule for other datasets): both normalized, min(matches /
    min(3, n), 1), so one answer is an exact match."""
    if not answers:
        return 0.0
    predicted = normalize_answer(prediction)
    if len(answers) == VQA_ANNOTATORS:
        truth = [_punctuation(answer) for answer in answers] if len(set(answers)) > 1 else list(answers)
        matches = [answer == predicted for answer in truth]
        total = sum(matches)
        return sum(min(1.0, (total - match) / 3) for match in matches) / len(matches)
    matches = [normalize_answer(answer) == predicted for answer in answers]
    return min(1.0, sum(matches) / min(3, len(answers)))


def soft_scores(answers: list[str]) -> dict[str, float]:
    """Each distinct normalized answer's training target: min(count / min(3, n), 1) over the n answers given."""
    counts = Counter(normalize_answer(answer) for answer in answers)
    divisor = min(3, len(answers)) or 1
    return {answer: min(1.0, count / divisor) for answer, count in counts.items()}


@dataclass(frozen=True)
class VqaFields:
    """What a VQA sample's json member holds, checked."""

    question: str
    answers: tuple[str, ...]
    question_type: str


def parse_vqa_json(payload: bytes | None, *, need_answers: bool = True) -> VqaFields:
    """The question, answers and question type of a VQA sample's json member; SampleRejected naming what is
    missing (`missing_question`, `missing_answer`, `bad_json`). `need_answers=False` accepts a question alone
    (answering, not training or scoring)."""
    if not payload:
        raise SampleRejected("missing_question")
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; deep nesting a RecursionError
        raise SampleRejected("bad_json") from None
    if not isinstance(value, dict):
        raise SampleRejected("bad_json")
    question = value.get("question")
    if not isinstance(question, str) or not question.strip():
        raise SampleRejected("missing_question")
    answers = value.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if answers is not None and not isinstance(answers, list):
        raise SampleRejected("bad_json")
    answers = (answer.get("answer") if isinstance(answer, dict) else answer for answer in answers or ())
    answers = tuple(answer.strip() for answer in answers if isinstance(answer, str) and normalize_answer(answer))
    if need_answers and not answers:
        raise SampleRejected("missing_answer")
    question_type = value.get("question_type")
    return VqaFields(question=question.strip(), answers=answers,
                     question_type=question_type if isinstance(question_type, str) and question_type else "")


def answer_list(answer_sets: Iterable[list[str]], size: int) -> list[str]:
    """The `size` most frequent normalized answers over the samples' answer sets (each sample's distinct answers
    counted once), ties broken alphabetically so every rank and every run gets the same list."""
    return most_frequent(answer_counts(answer_sets), size)


def answer_counts(answer_sets: Iterable[list[str]]) -> Counter:
    """How many samples gave each normalized answer (each sample's distinct answers once); counts of parts of
    a corpus add up to the whole's."""
    counts: Counter = Counter()
    for answers in answer_sets:
        counts.update({normalize_answer(answer) for answer in answers})
    counts.pop("", None)
    return counts


def most_frequent(counts: Counter, size: int) -> list[str]:
    """The `size` answers of `counts` given most often, ties broken alphabetically."""
    return [answer for answer, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:size]]


@dataclass
class AnswerCount:
    """Answer frequencies of some of the training shards' VQA samples; the parts of a corpus add up."""

    counts: Counter = field(default_factory=Counter)
    samples: int = 0
    bad: int = 0
    """Samples without a question or answer (the loader skips them in training too)."""
    unreadable: list[str] = field(default_factory=list)

    def __add__(self, other: AnswerCount) -> AnswerCount:
        return AnswerCount(self.counts + other.counts, self.samples + other.samples, self.bad + other.bad,
                           self.unreadable + other.unreadable)


def count_answers(spec: str, *, rank: int = 0, world_size: int = 1) -> AnswerCount:
    """The answers of the VQA samples in every `world_size`-th shard of `spec` from the `rank`-th (all shards by
    default), reading only the json members; unreadable shards and bad samples are counted, not raised."""
    urls = [url for source in parse_spec(spec) for url in source.urls]
    count = AnswerCount()
    for url in urls[rank::world_size]:
        answer_sets = []
        try:
            for raw in iter_raw_samples(url, extensions=("json",)):
                try:
                    answer_sets.append(list(parse_vqa_json(raw.get("json")).answers))
                except SampleRejected:
                    count.bad += 1
        except (ShardError, ShardTruncated, OSError) as error:
            count.unreadable.append(f"{url} ({error})")
        count.counts.update(answer_counts(answer_sets))  # what a shard cut short held still counts
        count.samples += len(answer_sets)
    return count


def answers_counted(count: AnswerCount, size: int, spec: str) -> list[str]:
    """The `size` most frequent answers of `count` (the whole of `spec`), warning of what could not be read."""
    if count.unreadable or count.bad:
        warnings.warn(f"VQA answer list: {count.bad} samples without a question or answer, {len(count.unreadable)} "
                      f"unreadable shards{': ' + count.unreadable[0] if count.unreadable else ''}", stacklevel=2)
    answers = most_frequent(count.counts, size)
    if len(answers) < 2:
        raise ValueError(f"data.train {spec} holds {count.samples} VQA samples with {len(answers)} distinct "
                         "answers; VQA fine-tuning needs shards of KEY.jpg + KEY.json {\"question\", \"answers\"} "
                         "(tools/make_shards.py --answers, or mmscale.shards.synthetic.make_vqa_shards)")
    return answers


def count_answer_list(spec: str, size: int) -> list[str]:
    """The `size` most frequent answers of the VQA samples of `spec` (mmscale.data.vqa.answer_list), counted in
    this process alone."""
    return answers_counted(count_answers(spec), size, spec)


class AnswerTargets:
    """Soft target vectors over a fixed answer list (picklable: dataloader workers get a copy)."""

    def __init__(self, answers: list[str]):
        if not answers:
            raise ValueError("the VQA answer list is empty")
        self.answers = list(answers)
        self.index = {answer: position for position, answer in enumerate(self.answers)}
        if len(self.index) != len(self.answers):
            raise ValueError("the VQA answer list repeats an answer")

    def __len__(self) -> int:
        return len(self.answers)

    def targets(self, answer_sets: list[tuple[str, ...]]):
        """[B, K] float32 tensor: each listed answer's soft score (0 for answers outside the list)."""
        import torch

        out = torch.zeros(len(answer_sets), len(self.answers), dtype=torch.float32)
        for row, answers in enumerate(answer_sets):
            for answer, score in soft_scores(list(answers)).items():
                column = self.index.get(answer)
                if column is not None:
                    out[row, column] = score
        return out
