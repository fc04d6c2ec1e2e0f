import numpy as np

from core.engine.metrics import attack_success_rate, clean_metrics


def test_asr_counts_only_images_whose_true_class_is_not_the_target():
    labels = np.array([5, 5, 1, 2, 3, 4])
    predictions = np.array([5, 5, 5, 5, 3, 4])  # target-class images "hit" trivially and must not count
    assert attack_success_rate(predictions, labels, target_label=5) == 50.0


def test_clean_metrics_overall_per_class_and_non_target():
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 1, 1, 1, 0, 0])
    metrics = clean_metrics(predictions, labels, ["a", "b", "c"], target_label=2)
    assert metrics["acc"] == 50.0
    assert metrics["per_class_acc"] == {"a": 50.0, "b": 100.0, "c": 0.0}
    assert metrics["acc_non_target"] == 75.0
    assert metrics["asr_without_trigger"] == 0.0  # no image outside class 2 is put in it
    # outside class 1 (images 0, 1, 4, 5) one image of four is put in it, with no trigger at all
    assert clean_metrics(predictions, labels, ["a", "b", "c"], target_label=1)["asr_without_trigger"] == 25.0
    unknown = clean_metrics(predictions, labels, ["a", "b", "c"], target_label=None)
    assert "acc_non_target" not in unknown and "asr_without_trigger" not in unknown
