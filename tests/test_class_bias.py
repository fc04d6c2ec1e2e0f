"""Refitting the classifier's bias on the clean images (`fit_class_bias`): what the fit guarantees, and what it
leaves alone."""

import torch
import torch.nn.functional as F
from torch import nn

from core.engine.defenses import fit_class_bias
from core.engine.metrics import logits_of
from core.engine.training import Execution, Normalization


def _case(classes: int, present: int, bias: bool = True) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small model with a skewed head and images whose labels cover the first `present` classes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, classes, bias=bias))
    if bias:
        with torch.no_grad():
            model[3].bias.copy_(torch.linspace(-1, 1, classes))
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (300, 3, 6, 6), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, present, (300,), generator=generator)
    return model, images, labels


def _loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float(F.cross_entropy(logits_of(model, images, Normalization(), Execution()), labels))


def test_the_fit_matches_each_class_share_and_changes_the_bias_alone():
    model, images, labels = _case(classes=4, present=4)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    loss = _loss(model, images, labels)

    shift = fit_class_bias(model, images, labels, Normalization(), Execution())

    probabilities = torch.softmax(logits_of(model, images, Normalization(), Execution()), 1).mean(0)
    shares = torch.bincount(labels, minlength=4).float() / len(labels)
    assert torch.allclose(probabilities, shares, atol=1e-3)
    assert _loss(model, images, labels) < loss
    assert shift.abs().max() > 0.1 and abs(float(shift.sum())) < 1e-5
    for name, value in model.state_dict().items():
        expected = before[name] + shift if name == "3.bias" else before[name]
        assert torch.allclose(value, expected, atol=1e-6), name


def test_a_class_the_images_lack_keeps_its_bias_and_is_not_pushed_out():
    model, images, labels = _case(classes=4, present=3)
    bias = model[3].bias.detach().clone()

    shift = fit_class_bias(model, images, labels, Normalization(), Execution())

    assert shift[3] == 0 and model[3].bias[3] == bias[3]
    assert abs(float(shift[:3].sum())) < 1e-5 and shift[:3].abs().max() < 5
    probabilities = torch.softmax(logits_of(model, images, Normalization(), Execution()), 1).mean(0)
    assert probabilities[3] > 0.05


def test_a_head_without_a_bias_is_left_as_it_is():
    model, images, labels = _case(classes=4, present=4, bias=False)
    before = [p.detach().clone() for p in model.parameters()]

    shift = fit_class_bias(model, images, labels, Normalization(), Execution())

    assert shift is None
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_a_model_without_a_linear_head_is_left_as_it_is():
    """SqueezeNet's logits come from a convolution: nad's refit must not fail the job there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    _, images, labels = _case(classes=4, present=4)
    before = [p.detach().clone() for p in model.parameters()]

    assert fit_class_bias(model, images, labels, Normalization(), Execution()) is None
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
