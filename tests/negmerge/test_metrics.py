import json
import math

import numpy as np
import pytest
import torch
from sklearn.svm import SVC

from negmerge.metrics import (
    UnlearningMetrics,
    accuracy,
    avg_gap,
    mia_efficacy,
    true_label_probabilities,
)


def test_accuracy_from_logits():
    logits = [[2.0, 1.0], [0.0, 3.0], [5.0, 4.0]]

    assert accuracy(np.array(logits), np.array([0, 1, 1])) == pytest.approx(200 / 3)
    assert accuracy(torch.tensor(logits), torch.tensor([0, 1, 1])) == pytest.approx(200 / 3)


def test_accuracy_from_predicted_classes():
    assert accuracy(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2])) == 75.0
    assert accuracy(torch.tensor([3, 3]), torch.tensor([3, 3])) == 100.0
    assert accuracy(torch.tensor([3, 3]), torch.tensor([1, 2])) == 0.0


def test_accuracy_accepts_bfloat16_logits():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.bfloat16)

    assert accuracy(logits, torch.tensor([1, 1])) == 50.0


@pytest.mark.parametrize(
    ("predictions", "labels"),
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=int)),
        (np.zeros(0, dtype=int), np.zeros(0, dtype=int)),
        (np.array([0, 1]), np.array([0])),
        (np.zeros((2, 2, 2)), np.array([0, 1])),
    ],
)
def test_accuracy_rejects_empty_or_mismatched_input(predictions, labels):
    with pytest.raises(ValueError):
        accuracy(predictions, labels)


def test_true_label_probabilities_match_a_hand_computed_softmax():
    # Row 0: softmax(0, ln 3) = (1/4, 3/4). Row 1: softmax(ln 2, 0, ln 5) = (2/8, 1/8, 5/8).
    logits = torch.tensor([[0.0, math.log(3), -math.inf], [math.log(2), 0.0, math.log(5)]])

    probabilities = true_label_probabilities(logits, torch.tensor([1, 0]))

    assert probabilities.dtype == np.float64
    np.testing.assert_allclose(probabilities, [3 / 4, 2 / 8], rtol=1e-6)


def test_true_label_probabilities_survive_huge_logits():
    probabilities = true_label_probabilities(np.array([[1000.0, 0.0], [0.0, 1000.0]]), [0, 0])

    assert probabilities[0] == 1.0
    assert 0.0 <= probabilities[1] < 1e-300


def test_true_label_probabilities_reject_labels_out_of_range():
    with pytest.raises(ValueError, match="labels"):
        true_label_probabilities(np.zeros((2, 3)), np.array([0, 3]))


def reference_svc_mia(retain, forget, test):
    """Jia et al.'s SVC_fit_predict on confidences, written out directly."""
    shadow_train, shadow_test = retain[: len(test)], test[: len(retain)]
    features = np.concatenate([shadow_train, shadow_test]).reshape(-1, 1)
    membership = np.concatenate([np.ones(len(shadow_train)), np.zeros(len(shadow_test))])
    attacker = SVC(C=3, gamma="auto", kernel="rbf").fit(features, membership)
    return 100 * (1 - attacker.predict(forget.reshape(-1, 1)).mean())


def test_mia_efficacy_is_high_when_forget_samples_look_unseen():
    rng = np.random.default_rng(0)
    retain = rng.uniform(0.95, 1.0, 500)
    test = rng.uniform(0.0, 0.6, 200)
    forget = rng.uniform(0.0, 0.6, 100)

    assert mia_efficacy(retain, forget, test) >= 95.0


def test_mia_efficacy_is_low_when_forget_samples_look_like_members():
    rng = np.random.default_rng(1)
    retain = rng.uniform(0.95, 1.0, 500)
    test = rng.uniform(0.0, 0.6, 200)
    forget = rng.uniform(0.97, 1.0, 100)

    assert mia_efficacy(retain, forget, test) <= 5.0


@pytest.mark.parametrize(("retain_size", "test_size"), [(400, 150), (60, 150)])
def test_mia_efficacy_matches_a_direct_svc(retain_size, test_size):
    rng = np.random.default_rng(retain_size)
    # Only the leading samples of the longer set are used, so its tail is made to look different.
    size = min(retain_size, test_size)
    retain = np.concatenate([rng.beta(8, 1, size), rng.uniform(0.0, 0.5, retain_size - size)])
    test = np.concatenate([rng.beta(3, 2, size), rng.uniform(0.9, 1.0, test_size - size)])
    forget = rng.beta(5, 1, 80)

    efficacy = mia_efficacy(torch.tensor(retain), forget, test.tolist())

    assert efficacy == pytest.approx(reference_svc_mia(retain, forget, test), abs=1e-9)
    assert 0.0 < efficacy < 100.0
    assert mia_efficacy(retain, forget, test) == efficacy


@pytest.mark.parametrize("empty", ["retain_probs", "forget_probs", "test_probs"])
def test_mia_efficacy_rejects_empty_inputs(empty):
    inputs = {"retain_probs": [0.9, 0.8], "forget_probs": [0.5], "test_probs": [0.1, 0.2]}
    inputs[empty] = []

    with pytest.raises(ValueError, match=empty):
        mia_efficacy(**inputs)


def test_avg_gap_on_a_hand_worked_example():
    ours = UnlearningMetrics(retain_acc=98.0, forget_acc=10.0, test_acc=90.0, mia=80.0)
    retrained = UnlearningMetrics(retain_acc=99.0, forget_acc=8.0, test_acc=91.5, mia=84.0)

    # |98 - 99| + |10 - 8| + |90 - 91.5| + |80 - 84| = 1 + 2 + 1.5 + 4 = 8.5, over 4 quantities.
    assert avg_gap(ours, retrained) == 2.125
    assert avg_gap(retrained, ours) == 2.125
    assert avg_gap(ours, ours) == 0.0


def test_unlearning_metrics_to_dict():
    metrics = UnlearningMetrics(retain_acc=98.0, forget_acc=np.float32(10.5), test_acc=90, mia=80.0)

    assert json.loads(json.dumps(metrics.to_dict())) == {
        "retain_acc": 98.0,
        "forget_acc": 10.5,
        "test_acc": 90.0,
        "mia": 80.0,
    }
