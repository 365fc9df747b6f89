"""Per-class classification reports (issue 28): numbers and text equal scikit-learn's classification_report,
the confusion PNG, the gathering of predictions over real gloo ranks, and `mmscale eval zeroshot --report`."""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distkit import free_port, save_from_every_rank

from mmscale.eval.report import classification_report, format_report, save_confusion_png, write_report

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def sklearn_report(y_true, y_pred, names, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its warnings about labels absent from the data
        return sklearn_metrics.classification_report(y_true, y_pred, labels=range(len(names)), target_names=names,
                                                     zero_division=0, **options)


def sklearn_text(y_true, y_pred, names, digits: int) -> str:
    text = sklearn_report(y_true, y_pred, names, digits=digits)
    if not (np.asarray(y_true) == np.asarray(y_pred)).any():
        # With no right prediction at all scikit-learn's per-class counts turn float (its "pathological case"
        # in multilabel_confusion_matrix) and the support column reads "6.0"; ours stays an integer count.
        text = re.sub(r"(\d+)\.0\n", r"  \1\n", text)
    return text


def random_predictions(seed: int, classes: int, samples: int, *, out_of_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Skewed truth (some classes with no support) and predictions that are right about half the time and
    never name the last class; with `out_of_range`, labels -1 and classes..classes+1 mixed in on both sides."""
    rng = np.random.default_rng(seed)
    weights = rng.random(classes) ** 3
    weights[rng.random(classes) < 0.2] = 0  # classes with no support
    weights = weights / weights.sum() if weights.sum() else np.full(classes, 1 / classes)
    truth = rng.choice(classes, size=samples, p=weights)
    predicted = np.where(rng.random(samples) < 0.5, truth, rng.integers(0, classes, samples))
    if classes > 1:
        predicted[predicted == classes - 1] = 0  # a class never predicted
    if out_of_range:
        truth[rng.random(samples) < 0.05] = rng.choice([-1, classes, classes + 1])
        predicted[rng.random(samples) < 0.05] = rng.choice([-1, classes, classes + 1])
    return truth, predicted


CASES = [(seed, classes, samples, out_of_range) for seed, (classes, samples) in
         enumerate([(1, 5), (2, 40), (7, 100), (60, 500), (300, 4000)]) for out_of_range in (False, True)]


@pytest.mark.parametrize("seed,classes,samples,out_of_range", CASES)
def test_numbers_equal_scikit_learns(seed, classes, samples, out_of_range):
    truth, predicted = random_predictions(seed, classes, samples, out_of_range=out_of_range)
    names = [f"class {i}" for i in range(classes)]
    ours = classification_report(truth, predicted, names)
    expected = sklearn_report(truth, predicted, names, output_dict=True)
    assert list(ours) == list(expected)  # the same rows in the same order ("micro avg" for out-of-range labels)
    assert ours == expected  # exactly: the same float64 operations on the same counts
    assert ("accuracy" in ours) is not out_of_range
    if classes > 1:
        assert ours[names[-1]]["precision"] == 0 and ours[names[-1]]["support"] >= 0  # never predicted: 0, no NaN
    # Tensors (the zero-shot path's) give the same report as lists.
    assert classification_report(torch.from_numpy(truth), torch.from_numpy(predicted), names) == ours


def test_large_report_equals_scikit_learns():
    """100k predictions over 3000 classes, the size the bincounts are for."""
    truth, predicted = random_predictions(99, 3000, 100_000, out_of_range=False)
    names = [f"n{i:05d}" for i in range(3000)]
    assert classification_report(truth, predicted, names) == sklearn_report(truth, predicted, names,
                                                                            output_dict=True)


def test_out_of_range_labels_are_no_row_and_count_as_wrong():
    """A label outside the names (5, -1) is in no class's support or predictions, and it is wrong for the class
    it is compared with; like scikit-learn with labels=, the report then has "micro avg" instead of "accuracy"."""
    names = ["cat", "dog", "fish"]
    truth, predicted = [0, 1, 5, 2, 2], [0, -1, 1, 2, 7]
    report = classification_report(truth, predicted, names)
    assert report == sklearn_report(truth, predicted, names, output_dict=True)
    assert list(report) == ["cat", "dog", "fish", "micro avg", "macro avg", "weighted avg"]
    assert report["dog"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 1}  # 5 predicted as dog
    assert report["fish"] == {"precision": 1.0, "recall": 0.5, "f1-score": pytest.approx(2 / 3), "support": 2}
    assert report["micro avg"]["support"] == 4  # the true 5 is nobody's support
    assert report["micro avg"]["precision"] == 2 / 3 and report["micro avg"]["recall"] == 2 / 4
    # Every true label out of range: no support anywhere, and the weighted average falls back to the plain mean.
    assert classification_report([7, 7], [0, 1], names) == sklearn_report([7, 7], [0, 1], names, output_dict=True)


@pytest.mark.parametrize("digits", [0, 2, 4])
def test_text_equals_scikit_learns(digits):
    names = ["a", "a much longer class name", "c", "d"]
    for seed, out_of_range in ((0, False), (1, True)):
        truth, predicted = random_predictions(seed, len(names), 300, out_of_range=out_of_range)
        report = classification_report(truth, predicted, names)
        assert format_report(report, digits) == sklearn_text(truth, predicted, names, digits)
    short = ["x", "y"]  # names shorter than "weighted avg", and no right prediction at all
    report = classification_report([0, 0, 1], [1, 1, 0], short)
    assert format_report(report, digits) == sklearn_text([0, 0, 1], [1, 1, 0], short, digits)


def test_mistakes_are_refused_with_the_thing_named():
    with pytest.raises(ValueError, match="y_true has 2 labels and y_pred 1"):
        classification_report([0, 1], [0], ["a", "b"])
    with pytest.raises(ValueError, match="no samples"):
        classification_report([], [], ["a"])
    with pytest.raises(ValueError, match="class names 0 and 2 are both 'a'"):
        classification_report([0], [0], ["a", "b", "a"])
    with pytest.raises(ValueError, match="'accuracy', the name of a summary row"):
        classification_report([0], [0], ["a", "accuracy"])
    with pytest.raises(ValueError, match="integer class index"):
        classification_report([0.5], [0], ["a"])


def test_confusion_png_draws_the_most_frequent_classes(tmp_path):
    import matplotlib.image

    classes = 120
    rng = np.random.default_rng(3)
    truth = rng.choice(classes, size=5000, p=np.arange(1, classes + 1) / sum(range(1, classes + 1)))
    predicted = np.where(rng.random(5000) < 0.6, truth, rng.integers(-1, classes + 1, 5000))
    names = [f"c{i}" for i in range(classes)]
    path = tmp_path / "confusion.png"
    drawn = save_confusion_png(truth, predicted, names, path, title="test")
    support = np.bincount(truth, minlength=classes)
    assert len(drawn) == 50 and drawn == [names[i] for i in sorted(np.argsort(-support, kind="stable")[:50])]
    assert min(support[names.index(name)] for name in drawn) >= max(
        support[i] for i in range(classes) if names[i] not in drawn)
    assert matplotlib.image.imread(path).shape[0] > 400  # a real PNG, big enough to read 50 names
    few = save_confusion_png([0, 1, 2, 1], [0, 2, 2, 1], ["a", "b", "c"], tmp_path / "few.png")
    assert few == ["a", "b", "c"] and (tmp_path / "few.png").stat().st_size > 0


def test_write_report_writes_the_three_files_atomically(tmp_path):
    names = ["red", "green", "blue"]
    truth, predicted = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    folder = tmp_path / "nested" / "report"
    report = write_report(folder, truth, predicted, names, title="colours")
    assert sorted(p.name for p in folder.iterdir()) == ["confusion.png", "report.json", "report.txt"]  # no temporaries
    assert json.loads((folder / "report.json").read_text()) == report == classification_report(truth, predicted, names)
    assert (folder / "report.txt").read_text() == sklearn_text(truth, predicted, names, 2)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="a file is there"):
        write_report(tmp_path / "a-file", truth, predicted, names)


def _gathering_rank(rank: int, world: int, shares: list[int], port: int, results: str) -> None:
    from mmscale.eval.shared import shared_zeroshot_accuracy, shared_zeroshot_predictions

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, labels, classes = zeroshot_set()
        mine = slice(sum(shares[:rank]), sum(shares[:rank + 1]))
        truth, predicted = shared_zeroshot_predictions(images[mine], labels[mine], classes)
        top1 = shared_zeroshot_accuracy(images[mine], labels[mine], classes)["top1"]
        save_from_every_rank((truth, predicted, top1), results)
    finally:
        dist.destroy_process_group()


def zeroshot_set() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """40 noisy images of 6 classes, some without a label."""
    generator = torch.Generator().manual_seed(0)
    classes = torch.randn(6, 8, generator=generator)
    labels = torch.randint(0, 6, (40,), generator=generator)
    images = classes[labels] + 1.2 * torch.randn(40, 8, generator=generator)
    return images, labels.masked_fill(torch.arange(40) % 7 == 3, -1), classes


@pytest.mark.slow
@pytest.mark.parametrize("shares", [[13, 27], [9, 0, 31]], ids=["2-ranks", "3-ranks"])
def test_predictions_gathered_over_ranks_equal_the_single_process_ones(tmp_path, shares):
    """Every rank gets every labelled image's (label, top-1 class) in rank order, so rank 0's report is the
    single-process one and its accuracy is the reduced top1."""
    from mmscale.eval.shared import shared_zeroshot_predictions

    results = tmp_path / "gathered.pt"
    mp.spawn(_gathering_rank, args=(len(shares), shares, free_port(), str(results)), nprocs=len(shares), join=True)
    images, labels, classes = zeroshot_set()
    truth, predicted = shared_zeroshot_predictions(images, labels, classes)  # no process group: one process
    assert torch.equal(truth, labels[labels >= 0])
    assert 0.3 < float((truth == predicted).double().mean()) < 1  # not a trivial set
    for gathered_truth, gathered_predicted, top1 in torch.load(results):
        assert torch.equal(gathered_truth, truth) and torch.equal(gathered_predicted, predicted)
        assert classification_report(gathered_truth, gathered_predicted, [str(i) for i in range(6)])["accuracy"] == top1


def test_eval_zeroshot_report_writes_the_files_and_its_accuracy_is_top1(trained_tiny, tmp_path, capsys):
    from mmscale.cli import main

    def zeroshot(*extra: str) -> tuple[int, str, str]:
        code = main(["eval", "zeroshot", "--checkpoint", str(trained_tiny["final"]), "--data", str(trained_tiny["val"]),
                     "--classnames", str(trained_tiny["classnames"]), "--context-length", "32", "--workers", "0",
                     *extra])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    folder = tmp_path / "zeroshot-report"
    code, out, _ = zeroshot("--report", str(folder))
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["report"] == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["confusion.png", "report.json", "report.txt"]
    report = json.loads((folder / "report.json").read_text())
    names = trained_tiny["classnames"].read_text().split()
    assert list(report)[:len(names)] == names
    assert report["accuracy"] == summary["top1"]  # the same predictions, not merely close
    assert report["weighted avg"]["support"] == summary["samples"]  # every val image has a label
    assert (folder / "report.txt").read_text() == format_report(report)
    code, _, err = zeroshot("--report", str(folder / "report.txt"))  # refused before the pass over the data
    assert code == 2 and "--report" in err and "a file is there" in err
