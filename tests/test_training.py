"""The training loop's epoch plan (batches and augmentation draws, made once per epoch), its augmentation and its
sharpness-aware steps."""

from copy import deepcopy

import pytest
import torch
from torch import nn

from core.engine.training import (
    CROP_PADDING,
    Execution,
    Normalization,
    Recipe,
    Watch,
    augment,
    cross_entropy,
    plan_epoch,
    sharpness_aware_gradients,
    train,
)

CPU = torch.device("cpu")


def sizes(n: int, static_shapes: bool, batch_size: int = 4) -> list[int]:
    recipe = Recipe(epochs=1, lr=0.1, batch_size=batch_size)
    return [len(step.index) for step in plan_epoch(n, recipe, torch.Generator().manual_seed(0), CPU, static_shapes)]


@pytest.mark.parametrize(("n", "reference", "static"), [(10, [4, 4, 2], [4, 4]), (9, [4, 4], [4, 4]),
                                                         (8, [4, 4], [4, 4]), (3, [3], [3])])
def test_batches_cover_the_epoch_and_static_shapes_drop_a_partial_last_batch(n, reference, static):
    """A last batch of one image is always dropped (batch norm cannot train on it); static shapes drop any
    partial last batch, unless it is the only one."""
    assert sizes(n, static_shapes=False) == reference
    assert sizes(n, static_shapes=True) == static


def test_the_plan_is_a_shuffle_with_draws_in_range_and_the_same_for_a_seed():
    recipe = Recipe(epochs=1, lr=0.1, batch_size=16)
    first, again = (plan_epoch(50, recipe, torch.Generator().manual_seed(3), CPU, False) for _ in range(2))
    assert sorted(torch.cat([step.index for step in first]).tolist()) == list(range(50))
    for step, repeat in zip(first, again, strict=True):
        assert all(torch.equal(a, b) for a, b in zip((step.index, step.dy, step.dx, step.flip),
                                                      (repeat.index, repeat.dy, repeat.dx, repeat.flip), strict=True))
        assert step.dy.min() >= 0 and step.dy.max() <= 2 * CROP_PADDING and set(step.flip.tolist()) <= {0, 1}
    plain = plan_epoch(50, Recipe(epochs=1, lr=0.1, batch_size=16, augment=False), torch.Generator(), CPU, False)
    assert plain[0].dy is None and plain[0].flip is None


def test_augment_crops_at_the_offsets_and_flips_where_asked():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).reshape(2, 3, 5, 5)
    centre = torch.full((2,), CROP_PADDING)
    assert torch.equal(augment(images, centre, centre, torch.tensor([0, 0])), images)
    assert torch.equal(augment(images, centre, centre, torch.tensor([1, 0])), torch.stack([images[0].flip(2),
                                                                                             images[1]]))
    shifted = augment(images, centre - 1, centre + 2, torch.tensor([0, 0]))  # content one row down, two columns left
    assert torch.equal(shifted[:, :, 1:, :3], images[:, :, :4, 2:])
    assert shifted[:, :, 0].eq(0).all() and shifted[:, :, :, 3:].eq(0).all()


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_a_sharpness_aware_step_takes_the_gradient_at_the_adaptive_worst_case_and_leaves_the_weights():
    """The gradients become those at w + rho * w^2 g / ||w g|| (computed here by hand on a copy), the weights are
    w again, and BatchNorm's running statistics moved once, for the first pass only."""
    model, rho = _tiny_model(), 0.5
    inputs, labels = torch.rand(8, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    copy, weights = deepcopy(model), [p.detach().clone() for p in model.parameters()]
    loss, _, _ = cross_entropy(model)(inputs, labels)
    loss.backward()
    once = model[1].running_mean.clone()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.sqrt(sum(((w.abs() * g) ** 2).sum() for w, g in zip(weights, grads, strict=True)))
    with torch.no_grad():
        for p, w, g in zip(copy.parameters(), weights, grads, strict=True):
            p.copy_(w + rho * w**2 * g / norm)
    cross_entropy(copy)(inputs, labels)[0].backward()

    sharpness_aware_gradients(model, cross_entropy(model), inputs, labels, rho, Execution())

    for p, w, expected in zip(model.parameters(), weights, copy.parameters(), strict=True):
        assert torch.equal(p.detach(), w)
        assert torch.allclose(p.grad, expected.grad, atol=1e-6)
    assert any(not torch.allclose(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert torch.equal(model[1].running_mean, once) and int(model[1].num_batches_tracked) == 1
    assert model[1].momentum == 0.1


def _train(recipe: Recipe) -> nn.Module:
    model = _tiny_model()
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 3, (16,), generator=generator)
    train(model, images, labels, cross_entropy(model), recipe, Normalization(),
          Watch("student", lambda _event: None, lambda: False), Execution())
    return model


def test_sharpness_aware_steps_start_at_sam_from():
    plain = _train(Recipe(epochs=2, lr=0.1, batch_size=8))
    late = _train(Recipe(epochs=2, lr=0.1, batch_size=8, sam_rho=0.5, sam_from=2))
    second = _train(Recipe(epochs=2, lr=0.1, batch_size=8, sam_rho=0.5, sam_from=1))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), late.state_dict().values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(plain.parameters(), second.parameters(), strict=True))
