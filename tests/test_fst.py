"""Feature Shift Tuning on the digits backdoor, and its pieces: the head re-initialised and pushed away from the
suspect's, its norm held, the cosine schedule."""

import pytest
import torch
from torch import nn

from conftest import read_metadata
from core.engine.defenses import feature_shift_tuning
from core.engine.errors import InputError
from core.engine.models import build_model, classifier_head
from core.engine.training import Execution, Normalization, Recipe, Watch

CPU = torch.device("cpu")


def test_fst_weakens_the_digits_backdoor_and_keeps_accuracy(digits_backdoor, tmp_path):
    """On this small model and 500 images FST at the authors' settings (alpha 0.1, lr 0.01, 10 epochs) only
    weakens the backdoor. How much depends on the machine, which trains the model: on the first, ASR went from
    99.6 to 51 % (35 with lr 0.03 for 5 epochs; alpha 0.5 erased it but cost 17 points of accuracy); on an AMD
    EPYC machine from 95 to 20 to 23 % for seeds 0 to 2, ACC 0.8 to 4.4 points lower; on an Intel Xeon machine
    from 99.6 to 51.4, 40.3 and 48.6 %, ACC 1.4 to 2.4 points lower. So the test asks for ASR cut by 40 % at
    least. docs/results.md has FST on the CIFAR-10 models."""
    report = digits_backdoor.sanitize(tmp_path / "clean.safetensors", method="fst")
    before, after = report["before"], report["after"]
    assert before["asr"] > 90 and after["asr"] < before["asr"] * 0.6
    assert after["acc"] > before["acc"] - 6
    assert [(row["stage"], row["epoch"]) for row in report["history"]] == [("fst", e) for e in range(1, 11)]
    assert all(row["shift_loss"] < 0 for row in report["history"][1:])  # pushed away from the suspect's head
    assert report["teacher"] is None and "fst" in report["timings"]
    assert read_metadata(tmp_path / "clean.safetensors")["method"] == "fst"


def test_the_head_is_reinitialised_and_keeps_its_norm():
    torch.manual_seed(0)
    model = build_model("wrn-16-1", 10)
    head = classifier_head(model)
    original = head.weight.detach().clone()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(16) % 10
    recipe = Recipe(epochs=2, lr=0.05, batch_size=8, cosine=True, nesterov=False, weight_decay=0.0)
    feature_shift_tuning(model, images, labels, recipe, 0.1, Normalization(), Watch("fst", lambda e: None,
                         lambda: False), Execution())
    assert head is model.fc
    assert torch.isclose(head.weight.norm(), original.norm())
    cosine = torch.nn.functional.cosine_similarity(head.weight.flatten(), original.flatten(), dim=0)
    assert cosine < 0.5  # a new head, not the suspect's


def test_the_new_head_is_pushed_away_from_the_suspects():
    """The penalty is +alpha * <W, W_suspect>, so descending it lowers the inner product: the new head moves away
    from the compromised one (with the sign flipped it would be pulled back towards it). The head as training
    starts is the one its first forward pass sees, re-initialised and rescaled to the suspect's norm."""
    torch.manual_seed(0)
    model = build_model("wrn-16-1", 10)
    head = classifier_head(model)
    suspect = head.weight.detach().clone()
    starts = []
    head.register_forward_pre_hook(lambda module, _: starts.append(module.weight.detach().clone()))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.arange(16) % 10
    recipe = Recipe(epochs=1, lr=0.05, batch_size=8, augment=False)
    feature_shift_tuning(model, images, labels, recipe, 0.1, Normalization(), Watch("fst", lambda e: None,
                         lambda: False), Execution())
    assert len(starts) == 2  # two steps
    assert torch.isclose(starts[0].norm(), suspect.norm())
    assert (head.weight.detach() * suspect).sum() < (starts[0] * suspect).sum()


def test_a_model_without_a_linear_head_is_refused():
    with pytest.raises(InputError, match="no linear classifier"):
        classifier_head(nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))


def test_the_cosine_schedule_follows_pytorchs():
    recipe = Recipe(epochs=10, lr=0.01, cosine=True)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)
    for epoch in range(10):
        assert recipe.lr_at(epoch) == pytest.approx(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
