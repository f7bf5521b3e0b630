"""Classification metrics shared by the stages (pure functions over label sequences)."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_fscore_support

__all__ = ["classification_metrics"]


def classification_metrics(truth: Sequence[str], predicted: Sequence[str]) -> dict:
    """Macro-F1 (over the classes present in ``truth``), balanced accuracy, accuracy, per-class P/R/F1.

    Averaging over the true classes is the challenges' convention: a class the model predicts but
    the data never holds only costs precision elsewhere, it does not add a zero to the mean.
    """
    labels = sorted(set(truth))
    if not labels:
        raise ValueError("no ground truth to score")
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0
    )
    return {
        "macro_f1": float(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
        "accuracy": float(sum(t == p for t, p in zip(truth, predicted, strict=True)) / len(truth)),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        },
    }
