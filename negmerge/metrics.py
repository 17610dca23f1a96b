"""Unlearning metrics: accuracy, MIA-efficacy and the Avg. Gap to a retrained model."""

from dataclasses import asdict, astuple, dataclass
from typing import Any

import numpy as np
import torch
from sklearn.svm import SVC


@dataclass(frozen=True)
class UnlearningMetrics:
    """The four quantities unlearning papers report, each in percent."""

    retain_acc: float
    forget_acc: float
    test_acc: float
    mia: float

    def to_dict(self) -> dict[str, float]:
        return {name: float(value) for name, value in asdict(self).items()}


def accuracy(logits_or_preds: Any, labels: Any) -> float:
    """Top-1 accuracy in percent from logits (N, C) or predicted class ids (N,)."""
    predictions = _as_array(logits_or_preds)
    labels = _as_array(labels)
    if predictions.ndim not in (1, 2):
        raise ValueError(f"logits_or_preds must have shape (N, C) or (N,), got {predictions.shape}")
    _check_labels(labels, len(predictions))
    if len(labels) == 0:
        raise ValueError("accuracy needs at least one sample")
    if predictions.ndim == 2:
        predictions = predictions.argmax(axis=1)
    return float(np.mean(predictions == labels) * 100)


def true_label_probabilities(logits: Any, labels: Any) -> np.ndarray:
    """Softmax probability of each sample's true label, computed in float64."""
    logits = _as_array(logits).astype(np.float64)
    labels = _as_array(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {logits.shape}")
    _check_labels(labels, len(logits))
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if len(labels) and not (labels.min() >= 0 and labels.max() < logits.shape[1]):
        raise ValueError(
            f"labels must be in [0, {logits.shape[1]}), got {labels.min()}..{labels.max()}"
        )
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return np.exp(log_probs[np.arange(len(labels)), labels])


def mia_efficacy(retain_probs: Any, forget_probs: Any, test_probs: Any) -> float:
    """MIA-efficacy in percent: the share of forget samples an attacker judges non-members.

    As in SalUn and Jia et al. (2023), ``SVC_MIA`` on confidences: an SVC on the true-label
    probability learns members (the first len(test) retain samples) against non-members (the test
    samples), then classifies the forget samples. The classes stay balanced, so when the retain set
    is the smaller one, all of it is used with as many test samples.
    """
    retain, forget, test = (
        _as_array(probs).astype(np.float64).reshape(-1)
        for probs in (retain_probs, forget_probs, test_probs)
    )
    for name, probs in (("retain_probs", retain), ("forget_probs", forget), ("test_probs", test)):
        if len(probs) == 0:
            raise ValueError(f"{name} must not be empty")
    size = min(len(retain), len(test))
    members, non_members = retain[:size], test[:size]

    attacker = SVC(C=3, gamma="auto", kernel="rbf")
    attacker.fit(
        np.concatenate([members, non_members]).reshape(-1, 1),
        np.concatenate([np.ones(size), np.zeros(size)]),
    )
    judged_members = attacker.predict(forget.reshape(-1, 1))
    return float(np.mean(judged_members == 0) * 100)


def avg_gap(metrics: UnlearningMetrics, reference: UnlearningMetrics) -> float:
    """Mean absolute difference to the retrained reference over the four quantities."""
    differences = [
        abs(ours - theirs)
        for ours, theirs in zip(astuple(metrics), astuple(reference), strict=True)
    ]
    return float(np.mean(differences))


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        # NumPy has no bfloat16; float64 holds every torch float exactly.
        return (values.double() if values.is_floating_point() else values).numpy()
    return np.asarray(values)


def _check_labels(labels: np.ndarray, count: int) -> None:
    if labels.ndim != 1 or len(labels) != count:
        raise ValueError(f"labels must have shape ({count},), got {labels.shape}")
