"""The training loop's epoch plan (batches and augmentation draws, made once per epoch), its augmentation and its
sharpness-aware steps."""

from copy import deepcopy

import pytest
import torch
from torch import nn

from conftest import watch_of
from core.engine.errors import Cancelled
from core.engine.training import (
    CROP_PADDING,
    Execution,
    Normalization,
    Recipe,
    augment,
    cross_entropy,
    draw_augmentation,
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
          watch_of("student"), Execution())
    return model


def test_sharpness_aware_steps_start_at_sam_from():
    plain = _train(Recipe(epochs=2, lr=0.1, batch_size=8))
    late = _train(Recipe(epochs=2, lr=0.1, batch_size=8, sam_rho=0.5, sam_from=2))
    second = _train(Recipe(epochs=2, lr=0.1, batch_size=8, sam_rho=0.5, sam_from=1))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), late.state_dict().values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(plain.parameters(), second.parameters(), strict=True))


def test_augment_pads_with_four_zero_rows_and_columns():
    """The authors' random crop pads by 4: at offsets (0, 0) the image moves 4 rows down and 4 columns right, and
    the 4 rows and columns it leaves are zeros."""
    images = torch.randint(1, 256, (1, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros(1, dtype=torch.long)
    moved = augment(images, zero, zero, zero)
    assert torch.equal(moved[:, :, 4:, 4:], images[:, :, :4, :4])
    assert moved[:, :, :4].eq(0).all() and moved[:, :, :, :4].eq(0).all()


def test_augmentation_draws_every_crop_offset_and_both_flips():
    """Crops are uniform over the 9 offsets 0-8 each way (a shift of -4 to +4), and half the images flip."""
    dy, dx, flip = draw_augmentation(4000, torch.Generator().manual_seed(0))
    for offsets in (dy, dx):
        assert sorted(set(offsets.tolist())) == list(range(2 * 4 + 1))
        assert offsets.float().mean().item() == pytest.approx(4, abs=0.2)
    assert set(flip.tolist()) == {0, 1} and flip.float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_the_lr_drops_tenfold_from_each_milestone_epoch_on():
    """Milestones count epochs from 0: `lr_milestones: [2]` trains epochs 0 and 1 at lr and epoch 2 on at lr / 10,
    and the training loop runs each epoch at that lr."""
    recipe = Recipe(epochs=5, lr=0.1, milestones=(2, 4), batch_size=8)
    assert [recipe.lr_at(epoch) for epoch in range(5)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    model = _tiny_model()
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    rows = train(model, images, torch.arange(16) % 3, cross_entropy(model), recipe, Normalization(),
                 watch_of("student"), Execution())
    assert [row["lr"] for row in rows] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_normalization_maps_uint8_to_pixels_over_255_then_standardizes_per_channel():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.allclose(Normalization()(images), torch.tensor([0.0, 0.2, 1.0]).view(1, 3, 1, 1))
    normalize = Normalization(mean=(0.5, 0.1, 0.2), std=(0.25, 0.5, 2.0))
    expected = torch.tensor([(0.0 - 0.5) / 0.25, (0.2 - 0.1) / 0.5, (1.0 - 0.2) / 2.0]).view(1, 3, 1, 1)
    assert torch.allclose(normalize(images), expected)


@pytest.mark.parametrize(("weight_decay", "nesterov", "shrink"), [(0.0, True, 1.0), (0.01, False, 1 - 0.1 * 0.01),
                                                                  (0.01, True, 1 - 0.1 * 0.01 * 1.9)])
def test_the_optimizer_takes_the_recipes_weight_decay_and_nesterov(weight_decay, nesterov, shrink):
    """With a loss that gives no gradient, one SGD step moves the weights by weight decay alone: w * (1 - lr * wd),
    and nesterov's look-ahead adds momentum's 0.9 to that first step. FST trains without either."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    before = [p.detach().clone() for p in model.parameters()]

    def no_gradient(inputs, labels):
        logits = model(inputs)
        return logits.sum() * 0, {}, logits

    recipe = Recipe(epochs=1, lr=0.1, batch_size=4, augment=False, weight_decay=weight_decay, nesterov=nesterov)
    train(model, torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), no_gradient, recipe,
          Normalization(), watch_of("student"), Execution())
    for p, w in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), w * shrink)


def test_an_epoch_is_plain_sgd_in_training_mode_over_the_planned_batches():
    """One epoch equals the loop written out: the planned batches in order, each a fresh gradient (no carry-over
    from the last step), in training mode even for a model left in evaluation mode (as evaluating leaves it), so
    BatchNorm's running statistics move once a batch."""
    recipe = Recipe(epochs=1, lr=0.1, batch_size=4, augment=False, nesterov=False, weight_decay=0.0)
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(12) % 3
    expected = _tiny_model()
    optimizer = torch.optim.SGD(expected.parameters(), lr=0.1, momentum=0.9)
    for step in plan_epoch(12, recipe, torch.Generator().manual_seed(recipe.seed), CPU, False):
        optimizer.zero_grad()
        cross_entropy(expected)(Normalization()(images[step.index]), labels[step.index])[0].backward()
        optimizer.step()
    model = _tiny_model().eval()
    train(model, images, labels, cross_entropy(model), recipe, Normalization(),
          watch_of("student"), Execution())
    assert int(model[1].num_batches_tracked) == 3
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, msg=name)


def test_the_epochs_loss_is_the_mean_over_images_not_over_batches():
    """Batches of 4, 4 and 2 images whose losses are 0, 0 and 1: the epoch's loss is 2 / 10, not 1 / 3."""
    model = _tiny_model()
    images = torch.zeros(10, 3, 8, 8, dtype=torch.uint8)

    def batch_loss(inputs, labels):
        logits = model(inputs)
        return logits.sum() * 0 + float(len(labels) == 2), {}, logits

    rows = train(model, images, torch.zeros(10, dtype=torch.long), batch_loss,
                 Recipe(epochs=1, lr=0.1, batch_size=4, augment=False), Normalization(),
                 watch_of("student"), Execution())
    assert rows[0]["loss"] == pytest.approx(0.2)


def test_training_that_is_asked_to_stop_raises_cancelled_before_the_epoch():
    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    images = torch.zeros(8, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(Cancelled, match="before student epoch 1"):
        train(model, images, torch.zeros(8, dtype=torch.long), cross_entropy(model), Recipe(epochs=2, lr=0.1),
              Normalization(), watch_of("student", should_stop=lambda: True), Execution())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before, strict=True))
