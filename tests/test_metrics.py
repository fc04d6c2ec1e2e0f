import numpy as np
import pytest
import torch
from torch import nn

from core.engine.metrics import attack_success_rate, classify, clean_metrics, percent, predict
from core.engine.training import Execution, Normalization


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


def test_a_poison_archive_measures_the_asr_the_trigger_spec_measures(digits_backdoor, tmp_path):
    """A user who has triggered images but cannot describe the trigger sends them as poison_data, with their
    true labels: the target class's images among them are left out, as from the trigger's own ASR set, and
    the ASR is the one the spec gives. A job reads the archive the same way."""
    from core.engine.errors import InputError
    from core.engine.sanitize import ImageBudget, JobFiles, evaluate_checkpoint, load_clean, prepare_evaluation
    from core.engine.triggers import apply_trigger
    from core.params import SanitizeParams

    params = SanitizeParams(**digits_backdoor.params)
    test = np.load(digits_backdoor.test)
    poison = tmp_path / "poison.npz"
    np.savez(poison, x=apply_trigger(test["x"], params.trigger), y=test["y"])  # every class, the target's too
    by_spec, _ = evaluate_checkpoint(digits_backdoor.checkpoint, digits_backdoor.test, params)
    unknown = params.model_copy(update={"trigger": None})
    by_archive, evaluation = evaluate_checkpoint(digits_backdoor.checkpoint, digits_backdoor.test, unknown, poison)
    kept = int((test["y"] != params.target_label).sum())
    assert len(evaluation.poisoned.labels) == kept < len(test["y"])
    assert params.target_label not in evaluation.poisoned.labels
    assert by_archive["asr"] == by_spec["asr"] > 50
    files = JobFiles(digits_backdoor.checkpoint, digits_backdoor.clean, tmp_path / "out.safetensors",
                     digits_backdoor.test, poison)
    budget = ImageBudget()
    _, job = prepare_evaluation(files, unknown, load_clean(files.clean_data, unknown, budget), budget)
    assert len(job.poisoned.labels) == kept and budget.loaded["poison_data"] == len(test["y"])
    with pytest.raises(InputError, match="poison_data needs target_label"):
        evaluate_checkpoint(digits_backdoor.checkpoint, digits_backdoor.test,
                            unknown.model_copy(update={"target_label": None}), poison)


def test_percentages_are_given_to_the_hundredth_and_none_is_nan():
    """Reports quote ACC and ASR to two decimals; the share of no image is NaN, not 0."""
    assert percent(np.array([True, False, False])) == 33.33
    assert np.isnan(percent(np.array([], dtype=bool)))


def test_classify_predicts_every_image_in_evaluation_mode_batch_by_batch():
    """Five evaluation batches of 3 images, the last short: every image's label is the eval-mode model's argmax,
    whatever mode the model was in, and BatchNorm's running statistics are left as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (13, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = classify(model, images, Normalization(), Execution(eval_batch=3))
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        expected = model.eval()(Normalization()(images)).argmax(1)
    assert torch.equal(labels, expected)
    as_arrays = predict(model, images.permute(0, 2, 3, 1).numpy(), Normalization(), torch.device("cpu"),
                        Execution(eval_batch=3))
    assert as_arrays.tolist() == expected.tolist()
