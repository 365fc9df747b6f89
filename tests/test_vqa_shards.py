"""Writing VQA shards: generated corpora, VQA v2 files and question/answer tables through make_shards, and
inspect_shards' VQA counts. Samples are read back with webdataset, as training reads them."""

from __future__ import annotations

import io
import json
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from corpus import file_states, image_bytes, write_table, write_tar
from PIL import Image

from mmscale.data.tars import read_sizes, spec_urls
from mmscale.data.vqa import VQA_ANNOTATORS, normalize_answer
from mmscale.shards.inspection import main as inspect_main
from mmscale.shards.make_shards import main
from mmscale.shards.synthetic import (
    CHARACTERS,
    COLOURS,
    DIGITS,
    OBJECT_COLOURS,
    PAPER_COLOURS,
    make_vqa_shards,
    question_only_prior,
    vqa_questions,
)

QUIET = ["--workers", "1", "--no-progress"]


def run(*args) -> int:
    return main([*map(str, args), *QUIET])


def read_back(folder: Path) -> list[dict]:
    """Every sample of a shard folder through webdataset, json decoded, in order."""
    urls = spec_urls(str(folder))

    def dataset(shards: list[str]) -> wds.WebDataset:
        return wds.WebDataset(shards, shardshuffle=False, empty_check=False)  # a chunk of failed rows: no samples

    assert read_sizes(urls) == {url: sum(1 for _ in dataset([url])) for url in urls}
    return [sample | {"meta": json.loads(sample["json"])} for sample in dataset(urls)]


def consensus(answers: list[str]) -> tuple[str, int]:
    """The most frequent normalized answer and how many gave it."""
    return Counter(map(normalize_answer, answers)).most_common(1)[0]


def dominant_colour(image: Image.Image, palette: dict[str, tuple[int, int, int]]) -> str:
    """The palette colour most pixels are nearest to (the background: a shape covers at most half the image)."""
    pixels = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 1, 3)
    names = list(palette)
    nearest = np.linalg.norm(pixels - np.array([palette[name] for name in names]), axis=2).argmin(axis=1)
    return names[np.bincount(nearest).argmax()]


def shape_of(image: Image.Image, background: tuple[int, int, int]) -> str:
    """circle, square or triangle, from how much of its bounding box the non-background pixels fill."""
    pixels = np.asarray(image.convert("RGB"), dtype=float)
    mask = np.linalg.norm(pixels - np.array(background), axis=2) > 80
    rows, columns = np.nonzero(mask)
    fill = mask.sum() / ((rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1))
    return "triangle" if fill < 0.65 else "circle" if fill < 0.9 else "square"


def by_image(samples: list[dict]) -> dict[bytes, dict[str, dict]]:
    """Samples grouped by their image bytes: question -> sample."""
    groups: dict[bytes, dict[str, dict]] = {}
    for sample in samples:
        groups.setdefault(sample["jpg"], {})[sample["meta"]["question"]] = sample
    return groups


def test_generated_shapes_vqa_shards_answer_what_each_image_shows(tmp_path):
    samples = read_back(make_vqa_shards(tmp_path / "vqa", 12, corpus="shapes", samples_per_shard=16, seed=3))
    questions = vqa_questions("shapes")
    assert len(samples) == 36 and len({sample["__key__"] for sample in samples}) == 36
    assert all(set(sample) - {"__key__", "__url__", "__local_path__", "meta"} == {"jpg", "json", "cls"}
               for sample in samples)
    groups = by_image(samples)
    assert len(groups) == 12 and all(set(group) == {q.text for q in questions} for group in groups.values())
    for image_bytes_, group in groups.items():
        image = Image.open(io.BytesIO(image_bytes_))
        truth = {}
        for question in questions:
            meta = group[question.text]["meta"]
            assert meta["question_type"] == question.question_type and len(meta["answers"]) == VQA_ANNOTATORS
            truth[question.question_type], agreeing = consensus(meta["answers"])
            assert agreeing >= 7
        assert {int(group[q.text]["cls"]) for q in questions} == {OBJECT_COLOURS.index(truth["colour"])}
        background = dominant_colour(image, {name: COLOURS[name] for name in ("white", "gray", "black")})
        assert truth["background"] == background
        assert truth["shape"] == shape_of(image, COLOURS[background])
    answers = [answer for sample in samples for answer in sample["meta"]["answers"]]
    disagreeing = sum(normalize_answer(answer) != consensus(sample["meta"]["answers"])[0]
                      for sample in samples for answer in sample["meta"]["answers"])
    assert 0.03 < disagreeing / len(answers) < 0.2  # annotators disagree about one time in ten
    assert any(answer != normalize_answer(answer) for answer in answers)  # "Red", "red.", "a red"
    again = read_back(make_vqa_shards(tmp_path / "again", 12, corpus="shapes", samples_per_shard=16, seed=3))
    assert [sample["json"] for sample in again] == [sample["json"] for sample in samples]


def test_generated_characters_vqa_shards_answer_what_each_image_shows(tmp_path):
    samples = read_back(make_vqa_shards(tmp_path / "vqa", 12, corpus="characters", seed=4))
    questions = vqa_questions("characters")
    groups = by_image(samples)
    assert len(samples) == 36 and len(groups) == 12
    for image_bytes_, group in groups.items():
        truth = {q.question_type: consensus(group[q.text]["meta"]["answers"])[0] for q in questions}
        assert truth["character"] in CHARACTERS and truth["character"] != "a"
        assert truth["digit or letter"] == ("digit" if truth["character"] in DIGITS else "letter")
        assert {int(group[q.text]["cls"]) for q in questions} == {CHARACTERS.index(truth["character"])}
        assert truth["paper colour"] == dominant_colour(Image.open(io.BytesIO(image_bytes_)), PAPER_COLOURS)


@pytest.mark.parametrize("corpus", ["shapes", "characters"])
def test_question_only_prior_of_generated_vqa_shards_is_at_most_0_4(tmp_path, corpus):
    """Answering each question with its most frequent answer, blind to the image: scored with VQA accuracy
    and as the share of images whose consensus answer it is, both at most 0.4."""
    samples = read_back(make_vqa_shards(tmp_path, 60, corpus=corpus, samples_per_shard=100, seed=5))
    questions = Counter(sample["meta"]["question"] for sample in samples)
    assert set(questions.values()) == {60}  # every image gets every question
    prior = question_only_prior((sample["meta"]["question"], sample["meta"]["answers"]) for sample in samples)
    consensus_answers: dict[str, Counter] = {}
    for sample in samples:
        answer, _ = consensus(sample["meta"]["answers"])
        consensus_answers.setdefault(sample["meta"]["question"], Counter())[answer] += 1
    share = statistics.fmean(max(counts.values()) / sum(counts.values()) for counts in consensus_answers.values())
    assert prior <= 0.4 and share <= 0.4, (prior, share)


def write_coco_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        (folder / name).write_bytes(image_bytes((40, 32), seed=seed))


def write_vqa_v2(root: Path, questions: list[tuple[int, int, str]], answers: dict[int, list[str]] | None = None
                 ) -> tuple[Path, Path | None]:
    """A VQA v2 questions file of (question_id, image_id, question) and, given answers by question id, its
    annotations file."""
    questions_file = root / "questions.json"
    questions_file.write_text(json.dumps({"info": {}, "task_type": "Open-Ended", "data_subtype": "train2014",
                                          "questions": [{"image_id": image, "question": text, "question_id": qid}
                                                        for qid, image, text in questions]}))
    if answers is None:
        return questions_file, None
    annotations = [{"question_id": qid, "image_id": image, "question_type": text.split()[0] + " " + text.split()[1],
                    "answer_type": "other", "multiple_choice_answer": answers[qid][0],
                    "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1}
                                for i, answer in enumerate(answers[qid])]}
                   for qid, image, text in questions if qid in answers]
    annotations_file = root / "annotations.json"
    annotations_file.write_text(json.dumps({"info": {}, "annotations": annotations}))
    return questions_file, annotations_file


def test_vqa_v2_files_give_one_sample_per_question_and_a_missing_image_is_a_failed_row(tmp_path):
    write_coco_images(tmp_path / "images" / "train2014", ["COCO_train2014_000000000001.jpg",
                                                          "COCO_train2014_000000000002.jpg"])
    write_coco_images(tmp_path / "images", ["3.jpg"])  # a file named by the bare id
    ten = {10: ["2"] * 9 + ["two"], 11: ["red"] * 8 + ["Red", "pink"], 20: ["yes"] * 10, 30: ["dog"] * 10,
           40: ["no"] * 10}
    questions, annotations = write_vqa_v2(tmp_path, [
        (10, 1, "how many cats are there?"), (11, 1, "what color is the cat?"), (20, 2, "is it raining?"),
        (30, 3, "what animal is this?"), (40, 99, "is this image missing?")], ten)
    out = tmp_path / "out"
    assert run("--input", questions, "--answers", annotations, "--image-root", tmp_path / "images",
               "--output", out, "--samples-per-shard", 2) == 0
    samples = read_back(out)
    assert [sample["meta"]["question"] for sample in samples] == [
        "how many cats are there?", "what color is the cat?", "is it raining?", "what animal is this?"]
    assert [sample["meta"]["answers"] for sample in samples] == [ten[10], ten[11], ten[20], ten[30]]
    assert samples[1]["meta"]["question_type"] == "what color" and "txt" not in samples[0]
    assert samples[0]["jpg"] != samples[2]["jpg"] and len({s["__key__"] for s in samples}) == 4
    assert samples[0]["meta"]["source"] == "questions.json#question_id=10,image_id=1"
    import pyarrow.parquet as parquet

    (failed,) = parquet.read_table(out / "failed.parquet").to_pylist()
    assert failed["reason"] == "missing_image" and failed["question"] == "is this image missing?"
    assert failed["source"] == "questions.json#question_id=40,image_id=99"
    assert json.loads((out / "stats.json").read_text())["skipped"] == {"missing_image": 1}
    before = file_states(out)
    assert run("--input", questions, "--answers", annotations, "--image-root", tmp_path / "images",
               "--output", out, "--samples-per-shard", 2) == 0
    assert file_states(out) == before  # resumed: nothing left to do


def test_vqa_v2_test_split_without_answers_writes_questions_with_no_answers(tmp_path, capsys):
    write_coco_images(tmp_path, ["COCO_test2015_000000000007.jpg"])
    questions, _ = write_vqa_v2(tmp_path, [(70, 7, "what is on the table?"), (71, 7, "is it day?")])
    out = tmp_path / "out"
    assert run("--input", questions, "--output", out) == 0
    samples = read_back(out)
    assert [sample["meta"]["answers"] for sample in samples] == [[], []]
    assert all("question_type" not in sample["meta"] for sample in samples)
    assert inspect_main([str(out), "--no-progress"]) == 1
    assert "VQA question without answers" in capsys.readouterr().err
    assert inspect_main([str(out), "--no-progress", "--questions-only"]) == 0


def test_dedup_keeps_every_question_of_an_image_and_drops_a_repeated_question(tmp_path):
    write_coco_images(tmp_path, ["COCO_val2014_000000000005.jpg"])
    questions, annotations = write_vqa_v2(tmp_path, [(1, 5, "what is it?"), (2, 5, "what colour is it?"),
                                                     (3, 5, "what is it?")],
                                          {1: ["noise"] * 10, 2: ["gray"] * 10, 3: ["noise"] * 10})
    out = tmp_path / "out"
    assert run("--input", questions, "--answers", annotations, "--output", out, "--dedup") == 0
    assert [sample["meta"]["question"] for sample in read_back(out)] == ["what is it?", "what colour is it?"]
    assert json.loads((out / "stats.json").read_text())["skipped"] == {"duplicate": 1}


def test_table_with_question_and_answer_columns(tmp_path):
    write_coco_images(tmp_path / "images", ["a.jpg", "b.jpg"])
    table = write_table(tmp_path / "vqa.csv", [
        {"image": "a.jpg", "q": "what is it?", "a": "a dog", "type": "what is"},
        {"image": "a.jpg", "q": "how many legs?", "a": json.dumps(["4", "four", "3"]), "type": "how many"},
        {"image": "b.jpg", "q": "is it blue?", "a": "", "type": "is it"},
        {"image": "b.jpg", "q": "", "a": "yes", "type": "is it"},
        {"image": "b.jpg", "q": "is it red?", "a": "no", "type": ""}], "csv")
    out = tmp_path / "out"
    assert run("--input", table, "--image-root", tmp_path / "images", "--question-column", "q",
               "--answer-column", "a", "--question-type-column", "type", "--output", out) == 0
    assert [sample["meta"] | {"sha256": None, "source": None} for sample in read_back(out)] == [
        {"key": key, "question": question, "answers": answers, **kind, "status": "success", "width": 40,
         "height": 32, "original_width": 40, "original_height": 32, "sha256": None, "source": None}
        for key, question, answers, kind in [
            ("000000000", "what is it?", ["a dog"], {"question_type": "what is"}),
            ("000000001", "how many legs?", ["4", "four", "3"], {"question_type": "how many"}),
            ("000000004", "is it red?", ["no"], {})]]
    assert json.loads((out / "stats.json").read_text())["skipped"] == {"missing_answer": 1, "missing_question": 1}


def test_parquet_answer_lists_and_resharding_keep_the_questions(tmp_path):
    write_coco_images(tmp_path, ["a.jpg"])
    table = write_table(tmp_path / "vqa.parquet", [
        {"path": "a.jpg", "question": "what number?", "answers": ["2", "2", "two"], "label": 3}], "parquet")
    first, second = tmp_path / "first", tmp_path / "second"
    assert run("--input", table, "--question-column", "question", "--answer-column", "answers",
               "--label-column", "label", "--output", first) == 0
    assert run("--input", first, "--output", second, "--resize", 16) == 0  # reshard: the questions go along
    (sample,) = read_back(second)
    assert sample["meta"]["question"] == "what number?" and sample["meta"]["answers"] == ["2", "2", "two"]
    assert sample["cls"] == b"3" and sample["meta"]["height"] == 16


def test_vqa_options_that_do_not_fit_the_input_are_refused(tmp_path, capsys):
    write_coco_images(tmp_path / "images", ["COCO_train2014_000000000001.jpg"])
    table = write_table(tmp_path / "t.csv", [{"image": "images/COCO_train2014_000000000001.jpg", "caption": "x"}],
                        "csv")
    assert run("--input", table, "--answer-column", "caption", "--output", tmp_path / "o1") == 2
    assert "--answer-column go with --question-column" in capsys.readouterr().err
    assert run("--input", tmp_path / "images", "--answers", table, "--output", tmp_path / "o2") == 2
    assert "VQA v2 answers go with a VQA v2 questions file" in capsys.readouterr().err
    questions, _ = write_vqa_v2(tmp_path, [(1, 1, "what?")])
    assert run("--input", questions, "--image-root", tmp_path, "--output", tmp_path / "o3") == 0
    assert run("--input", questions, "--image-root", tmp_path / "nowhere", "--output", tmp_path / "o4") == 2
    assert "pass the folder of the images with --image-root" in capsys.readouterr().err


def test_inspect_counts_vqa_samples_bad_ones_question_types_and_answers(tmp_path, capsys):
    good = image_bytes((32, 32))

    def vqa(key: str, **fields) -> list[tuple[str, bytes]]:
        return [(f"{key}.jpg", good), (f"{key}.json", json.dumps(fields).encode())]

    write_tar(tmp_path / "shard-000000.tar", [
        *vqa("k0", question="what colour?", answers=["Red", "red", "blue."], question_type="colour"),
        *vqa("k1", question="what colour?", answers=["red"] * 10, question_type="colour"),
        *vqa("k2", question="how many?", answers=["two", "2"], question_type="count"),
        *vqa("k3", answers=["red"]),
        *vqa("k4", question="what shape?", answers=[]),
        ("k5.jpg", good), ("k5.txt", b"a caption sample"),
        *vqa("k6", question="crafted?", answers=5)])  # not a list: counted, not a crash
    assert inspect_main([str(tmp_path), "--no-progress", "--json"]) == 1
    captured = capsys.readouterr()
    figures = json.loads(captured.out.strip().splitlines()[-1])
    bad = {"bad_json": 1, "missing_answer": 1, "missing_question": 1}
    assert figures["samples"] == 7 and figures["bad_samples"] == bad
    assert figures["vqa"] == {"samples": 6, "bad": bad, "question_types": {"colour": 2, "count": 1},
                              "top_answers": [["red", 2], ["2", 1], ["blue", 1]]}
    assert ("vqa samples: 6   without a question or answers: 3 (bad_json=1, missing_answer=1, missing_question=1)"
            in captured.out)
    assert "question types: colour=2, count=1" in captured.out and "top answers: red=2, 2=1, blue=1" in captured.out
    assert f"shard {tmp_path / 'shard-000000.tar'} key k3: VQA sample without a question" in captured.err
    assert f"shard {tmp_path / 'shard-000000.tar'} key k4: VQA question without answers" in captured.err
    assert "k5" not in captured.err  # a caption sample beside them is fine
