"""Per-class classification reports: precision, recall, F1 and support per class, as text, JSON and a
confusion-matrix PNG (issue 28).

The numbers and layout are scikit-learn's `classification_report(y_true, y_pred, labels=range(len(names)),
target_names=names, output_dict=True, zero_division=0)` (tests/test_report.py compares them), computed here
from three bincounts so that 100k predictions over thousands of classes take milliseconds and scikit-learn
is not needed at run time.

Class i is `names[i]`. A label outside 0..len(names)-1 (in the truth or the prediction) is no row of the
report, as with scikit-learn's `labels=`: a true label out of range counts in no class's support, a predicted
one is wrong for the class it should have been and counts in no class's predictions. Then, as scikit-learn
does when the data hold labels beyond `labels`, the report has a "micro avg" row (pooled precision, recall,
F1 over the named classes) in place of "accuracy".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmscale.atomic import atomic_write, write_atomically

METRICS = ("precision", "recall", "f1-score", "support")
SUMMARY_ROWS = ("accuracy", "micro avg", "macro avg", "weighted avg")
READABLE_COUNTS = 30
"""Up to this many classes the confusion PNG writes each cell's count; beyond, only colours."""


def _labels(values, what: str) -> np.ndarray:
    """A 1-D int64 array of class indices from a list, numpy array or (any device) tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected one integer class index per sample, got {array.dtype} of shape "
                         f"{array.shape}")
    return array.astype(np.int64, copy=False)


def check_names(names: Sequence[str]) -> None:
    """Refuse class names a report cannot key its rows by: none, a repeated one, or a summary row's name."""
    if not names:
        raise ValueError("class names: none given; a report needs one name per class")
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in SUMMARY_ROWS:
            raise ValueError(f"class name {index} is {name!r}, the name of a summary row of the report; rename it")
        if name in seen:
            raise ValueError(f"class names {seen[name]} and {index} are both {name!r}; a report is keyed by "
                             "name, so give each class its own")
        seen[name] = index


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator in float64, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    denominator = np.asarray(denominator, dtype=np.float64)
    empty = denominator == 0
    return np.where(empty, 0.0, np.asarray(numerator, dtype=np.float64) / np.where(empty, 1.0, denominator))


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    truth, predicted = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if len(truth) != len(predicted):
        raise ValueError(f"y_true has {len(truth)} labels and y_pred {len(predicted)}; give one prediction per sample")
    if not len(truth):
        raise ValueError("no samples: a classification report needs at least one (true, predicted) pair")
    return truth, predicted


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], names: Sequence[str]) -> dict:
    """Per class (keyed by name, in the order of `names`) {"precision", "recall", "f1-score", "support"}, then
    "accuracy" (a float; "micro avg", a row, when a label is out of range: see the module docstring),
    "macro avg" and "weighted avg" rows: scikit-learn's output_dict layout and numbers with zero_division=0,
    except that supports are ints (scikit-learn writes them as floats; they compare equal)."""
    check_names(names)
    truth, predicted = _pair(y_true, y_pred)
    classes = len(names)
    true_named = (truth >= 0) & (truth < classes)
    predicted_named = (predicted >= 0) & (predicted < classes)
    support = np.bincount(truth[true_named], minlength=classes)
    predictions = np.bincount(predicted[predicted_named], minlength=classes)
    hits = np.bincount(truth[true_named & (truth == predicted)], minlength=classes)
    precision, recall = _divide(hits, predictions), _divide(hits, support)
    f1 = _divide(2.0 * hits, support.astype(np.float64) + predictions)
    report: dict = {name: {"precision": float(p), "recall": float(r), "f1-score": float(f), "support": int(s)}
                    for name, p, r, f, s in zip(names, precision, recall, f1, support)}
    total = int(support.sum())
    hit_total, predicted_total = hits.sum(), predictions.sum()
    pooled = {"precision": float(_divide(hit_total, predicted_total)), "recall": float(_divide(hit_total, total)),
              "f1-score": float(_divide(2.0 * hit_total, float(total) + predicted_total)), "support": total}
    if true_named.all() and predicted_named.all():
        report["accuracy"] = pooled["precision"]
    else:
        report["micro avg"] = pooled
    report["macro avg"] = {"precision": float(np.mean(precision)), "recall": float(np.mean(recall)),
                           "f1-score": float(np.mean(f1)), "support": total}
    weights = support.astype(np.float64)

    def weighted(values: np.ndarray) -> float:
        # scikit-learn falls back to the plain mean when no named class has support.
        return float(np.sum(values * weights) / weights.sum()) if total else float(np.mean(values))

    report["weighted avg"] = {"precision": weighted(precision), "recall": weighted(recall),
                              "f1-score": weighted(f1), "support": total}
    return report


def format_report(report: dict, digits: int = 2) -> str:
    """`report` (classification_report's dict) as scikit-learn's text classification_report prints it."""
    classes = [name for name in report if name not in SUMMARY_ROWS]
    width = max(max((len(name) for name in classes), default=0), len("weighted avg"), digits)
    text = ("{:>{width}s} " + " {:>9}" * len(METRICS)).format("", *METRICS, width=width) + "\n\n"
    row = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"

    def line(name: str, values: dict) -> str:
        return row.format(name, *(values[m] for m in METRICS[:3]), int(values["support"]), width=width, digits=digits)

    text += "".join(line(name, report[name]) for name in classes) + "\n"
    if "accuracy" in report:
        text += ("{:>{width}s} " + " {:>9.{digits}}" * 2 + " {:>9.{digits}f} {:>9}\n").format(
            "accuracy", "", "", report["accuracy"], int(report["weighted avg"]["support"]), width=width, digits=digits)
    else:
        text += line("micro avg", report["micro avg"])
    return text + line("macro avg", report["macro avg"]) + line("weighted avg", report["weighted avg"])


def save_confusion_png(y_true: Sequence[int], y_pred: Sequence[int], names: Sequence[str], path: str | Path, *,
                       max_classes: int = 50, title: str = "") -> list[str]:
    """A confusion-matrix heat map at `path` (rows the true class, columns the predicted one), written
    atomically; returns the names of the classes drawn, in class order. With more than `max_classes` classes
    only the `max_classes` with the most true samples are drawn (the title says so). Colours are each row's
    share of its class's samples (the diagonal is the recall), so predictions of classes left out or out of
    range are in no cell; cells hold counts when they are readable."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_names(names)
    if max_classes < 1:
        raise ValueError(f"max_classes {max_classes}: draw at least one class")
    truth, predicted = _pair(y_true, y_pred)
    classes = len(names)
    support = np.bincount(truth[(truth >= 0) & (truth < classes)], minlength=classes)
    drawn = np.arange(classes)
    if classes > max_classes:  # most frequent first, ties by class index; then drawn in class order
        drawn = np.sort(np.argsort(-support, kind="stable")[:max_classes])
    count = len(drawn)
    position = np.full(classes + 1, -1, dtype=np.int64)  # index `classes` stands for every out-of-range label
    position[drawn] = np.arange(count)
    row = position[np.where((truth >= 0) & (truth < classes), truth, classes)]
    column = position[np.where((predicted >= 0) & (predicted < classes), predicted, classes)]
    kept = (row >= 0) & (column >= 0)
    matrix = np.bincount(row[kept] * count + column[kept], minlength=count * count).reshape(count, count)
    shares = matrix / np.maximum(support[drawn], 1)[:, None]

    side = min(max(4.5, 0.28 * count + 3.0), 22.0)
    figure = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    image = axis.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="share of the true class's samples")
    labels = [names[index] for index in drawn]
    font = max(4.0, min(9.0, 360.0 / count))
    axis.set_xticks(range(count), labels, rotation=90, fontsize=font)
    axis.set_yticks(range(count), labels, fontsize=font)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    if count <= READABLE_COUNTS:
        for (i, j), value in np.ndenumerate(matrix):
            if value:
                axis.text(j, i, str(value), ha="center", va="center", fontsize=font,
                          color="white" if shares[i, j] > 0.5 else "black")
    subset = f"the {count} most frequent of {classes} classes" if count < classes else f"{classes} classes"
    heading = f"{title}\n" if title else ""
    axis.set_title(f"{heading}Confusion matrix, {subset} ({len(truth):,} samples)", fontsize=10)
    figure.tight_layout()
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png")
    return labels


def write_report(folder: str | Path, y_true: Sequence[int], y_pred: Sequence[int], names: Sequence[str], *,
                 title: str = "") -> dict:
    """`report.txt` (format_report), `report.json` (the dict) and `confusion.png` (save_confusion_png, with
    `title`) in `folder`, created if missing, each written atomically; returns the report dict."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"report folder {folder}: a file is there; give a folder (it is created if missing)")
    folder.mkdir(parents=True, exist_ok=True)
    report = classification_report(y_true, y_pred, names)
    write_atomically(folder / "report.txt", format_report(report).encode("utf-8"))
    write_atomically(folder / "report.json", (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    save_confusion_png(y_true, y_pred, names, folder / "confusion.png", title=title)
    return report
