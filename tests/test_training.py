"""The training loop's epoch plan (batches and augmentation draws, made once per epoch) and its augmentation."""

import pytest
import torch

from core.engine.training import CROP_PADDING, Recipe, augment, plan_epoch

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
