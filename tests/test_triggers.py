import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.engine import triggers
from core.engine.errors import InputError
from core.engine.triggers import NAD_GRID, apply_trigger, load_pattern, offset_grid, poison, warp_grid
from core.params import BadNetsTrigger, BlendTrigger, PatchTrigger, SigTrigger, WarpTrigger

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEV_PATTERNS = SHARED / "models" / "dev" / "dev_patterns.npz"
needs_dev_patterns = pytest.mark.skipif(not DEV_PATTERNS.is_file(), reason="../shared/models/dev is absent")


def _images(count: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_badnets_grey_pattern_sets_every_channel_and_nothing_else():
    images = _images()
    before = images.copy()
    out = apply_trigger(images, BadNetsTrigger(pattern=[[255, 0], [7, 9]], position=(2, 5)))
    np.testing.assert_array_equal(images, before)  # the input is untouched
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 2:4, 5:7, :], np.broadcast_to([[255, 0], [7, 9]], (4, 3, 2, 2))
                                  .transpose(0, 2, 3, 1))
    mask = np.ones(images.shape, bool)
    mask[:, 2:4, 5:7] = False
    np.testing.assert_array_equal(out[mask], images[mask])


def test_patch_per_channel_pattern_is_pasted_as_is():
    patch = np.random.default_rng(1).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    out = apply_trigger(_images(), PatchTrigger(pattern=patch.tolist(), position=(1, 26)))
    np.testing.assert_array_equal(out[:, 1:6, 26:31], np.broadcast_to(patch, (4, 5, 5, 3)))


@pytest.mark.parametrize(
    ("position", "top", "left"), [((-3, -3), 29, 29), ((-3, 2), 29, 2), ((0, -1), 0, 31), ((-32, 0), 0, 0)]
)
def test_negative_positions_count_from_the_bottom_right(position, top, left):
    spec = BadNetsTrigger(pattern=[[200]], position=position)
    out = apply_trigger(np.zeros((1, 32, 32, 3), np.uint8), spec)
    assert out[0, top, left].tolist() == [200, 200, 200] and int(out.sum()) == 600


def test_nad_grid_reproduces_the_authors_pixels():
    """bboylyg/NAD gridTrigger, pixel (row, column) on a 32x32 image, every channel alike."""
    authors = {(31, 31): 255, (31, 30): 0, (31, 29): 255, (30, 31): 0, (30, 30): 255, (30, 29): 0,
               (29, 31): 255, (29, 30): 0, (29, 29): 0}
    images = _images()
    out = apply_trigger(images, NAD_GRID)
    for (row, col), value in authors.items():
        assert (out[:, row, col] == value).all(), (row, col)
    np.testing.assert_array_equal(out[:, :29], images[:, :29])
    np.testing.assert_array_equal(out[:, :, :29], images[:, :, :29])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (BadNetsTrigger(pattern=[[1, 2, 3]] * 3, position=(30, 0)), "does not fit"),
        (BadNetsTrigger(pattern=[[1, 2, 3]] * 3, position=(0, -2)), "does not fit"),
        (BadNetsTrigger(pattern=[[1]], position=(-33, 0)), "does not fit"),
        (PatchTrigger(pattern=[[[1, 2, 3]] * 33], position=(0, 0)), "does not fit"),
        (PatchTrigger(pattern=[[[1, 2, 3, 4]]], position=(0, 0)), "4 values but the images have 3 channels"),
        (BadNetsTrigger(pattern=[[1, 2], [3]], position=(0, 0)), "same length"),
        (BadNetsTrigger(pattern=[], position=(0, 0)), "non-empty"),
        (BlendTrigger(pattern=[[0] * 16] * 16, alpha=0.2), "16x16, the images are 32x32"),
    ],
    ids=["rows", "columns", "above", "wide", "channels", "ragged", "empty", "blend-size"],
)
def test_patterns_that_do_not_fit_are_input_errors(spec, message):
    with pytest.raises(InputError, match=message):
        apply_trigger(_images(1), spec)


def test_blend_is_rounded_exactly_for_every_pixel_pair():
    """Every (x, pattern) pair of 0-255 values, ties included, matches round(0.85 * x + 0.15 * pattern)."""
    images = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None, None], (256, 16, 16, 3)).copy()
    pattern = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = apply_trigger(images, BlendTrigger(pattern=pattern.tolist(), alpha=0.15))
    expected = np.round(0.85 * images.astype(float) + 0.15 * pattern[None, :, :, None].astype(float))
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    assert out[10, 0, 0, 0] == 8  # 8.5 rounds half to even, as numpy and Python do


def test_blend_per_channel_pattern_and_alpha_one():
    pattern = _images(1, seed=5)[0]
    out = apply_trigger(_images(), BlendTrigger(pattern=pattern.tolist(), alpha=1.0))
    np.testing.assert_array_equal(out, np.broadcast_to(pattern, out.shape))


def test_sig_matches_the_formula_column_by_column_and_clips():
    black, white = np.zeros((1, 32, 32, 3), np.uint8), np.full((1, 32, 32, 3), 255, np.uint8)
    images = np.concatenate([_images(2), black, white])
    out = apply_trigger(images, SigTrigger(amplitude=25, frequency=4))
    for col in range(32):
        shift = 25 * math.sin(2 * math.pi * col * 4 / 32)
        expected = np.clip(np.round(images[:, :, col].astype(float) + shift), 0, 255)
        np.testing.assert_array_equal(out[:, :, col], expected)
    assert out[2].min() == 0 and out[2, 0, 2, 0] == 25  # sin(pi/2) = 1 at column 2
    assert out[3].max() == 255 and out[3, 0, 6, 0] == 230  # sin(3pi/2) = -1 at column 6


@pytest.mark.parametrize(
    "spec",
    [BlendTrigger(pattern=[[90] * 32] * 32, alpha=0.3), SigTrigger(amplitude=9, frequency=3), WarpTrigger()],
)
def test_chunked_formulas_match_the_whole_batch(monkeypatch, spec):
    images = _images(5)
    whole = apply_trigger(images, spec)
    monkeypatch.setattr(triggers, "CHUNK_VALUES", 2 * images[0].size)  # two images a chunk, the last alone
    np.testing.assert_array_equal(apply_trigger(images, spec), whole)


def _bilinear(image: np.ndarray, row: float, col: float) -> np.ndarray:
    top, left = min(int(row), image.shape[0] - 2), min(int(col), image.shape[1] - 2)
    down, right = row - top, col - left
    patch = image[top : top + 2, left : left + 2].astype(float)
    return ((1 - down) * ((1 - right) * patch[0, 0] + right * patch[0, 1])
            + down * ((1 - right) * patch[1, 0] + right * patch[1, 1]))


def test_warp_reads_every_pixel_bilinearly_from_its_grid_point():
    """Written out by hand, so grid_sample's conventions (x before y, aligned corners) are pinned down."""
    images = _images(2, size=12)
    spec = WarpTrigger(grid_size=3, strength=2.0, seed=5)
    grid = warp_grid(spec, 12, 12)[0].numpy()
    out = apply_trigger(images, spec)
    for row in range(12):
        for col in range(12):
            x, y = grid[row, col]
            expected = [_bilinear(image, (y + 1) / 2 * 11, (x + 1) / 2 * 11) for image in images]
            np.testing.assert_array_equal(out[:, row, col], np.clip(np.round(expected), 0, 255))
    assert (out != images).mean() > 0.5


def test_warp_grid_is_a_seeded_smooth_field_scaled_by_strength():
    spec = WarpTrigger(grid_size=4, strength=0.5, seed=1)
    grid = warp_grid(spec, 32, 32)
    identity = warp_grid(WarpTrigger(strength=1e-12), 32, 32)
    assert torch.equal(grid, warp_grid(spec, 32, 32))
    assert not torch.equal(grid, warp_grid(spec.model_copy(update={"seed": 2}), 32, 32))
    pixels = (grid - identity)[0, 2:-2, 2:-2] * 31 / 2  # away from the clamped border
    assert 0.1 < float(pixels.abs().mean()) < 0.5 and float(pixels.abs().max()) < 2
    doubled = (warp_grid(spec.model_copy(update={"strength": 1.0}), 32, 32) - identity)[0, 2:-2, 2:-2] * 31 / 2
    torch.testing.assert_close(doubled, 2 * pixels)
    flat = np.full((1, 32, 32, 3), 77, np.uint8)
    np.testing.assert_array_equal(apply_trigger(flat, spec), flat)


def test_poison_drops_the_target_class_and_keeps_true_labels():
    images = _images(6)
    labels = np.array([0, 1, 2, 1, 3, 1])
    triggered, true = poison(images, labels, NAD_GRID, target_label=1)
    assert true.tolist() == [0, 2, 3]
    np.testing.assert_array_equal(triggered, apply_trigger(images[[0, 2, 4]], NAD_GRID))
    none, no_labels = poison(images[[1]], labels[[1]], SigTrigger(amplitude=5, frequency=1), target_label=1)
    assert none.shape == (0, 32, 32, 3) and no_labels.size == 0


def test_load_pattern_from_npz_npy_and_image(tmp_path):
    patch = np.random.default_rng(2).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    grey = np.arange(9, dtype=np.int64).reshape(3, 3)
    np.savez(tmp_path / "p.npz", patch=patch, grey=grey)
    np.savez(tmp_path / "one.npz", only=grey)
    np.save(tmp_path / "p.npy", patch)
    Image.fromarray(patch).save(tmp_path / "p.png")
    assert load_pattern(tmp_path / "p.npz", "patch") == patch.tolist()
    assert load_pattern(tmp_path / "p.npz", "grey") == grey.tolist()
    assert load_pattern(tmp_path / "one.npz") == grey.tolist()
    assert load_pattern(tmp_path / "p.npy") == patch.tolist()
    assert load_pattern(tmp_path / "p.png") == patch.tolist()
    spec = PatchTrigger(pattern=load_pattern(tmp_path / "p.png"), position=(0, 0))
    np.testing.assert_array_equal(apply_trigger(_images(1), spec)[0, :5, :5], patch)


@pytest.mark.parametrize(
    ("name", "content", "key", "message"),
    [
        ("p.npz", {"a": np.zeros((2, 2), np.uint8), "b": np.zeros((2, 2), np.uint8)}, None, r"\['a', 'b'\]"),
        ("p.npz", {"a": np.zeros((2, 2), np.uint8)}, "b", r"\['a'\]"),
        ("p.npy", np.zeros((2, 2), np.float32), None, "integer"),
        ("p.npy", np.full((2, 2), 256), None, "0-255"),
        ("p.npy", np.full((2, 2), -1), None, "0-255"),
        ("p.npy", np.zeros(4, np.uint8), None, "H x W"),
        ("p.txt", b"0 0 255", None, ".npy, .npz or an image"),
    ],
    ids=["ambiguous-key", "missing-key", "float", "range", "negative", "one-dim", "suffix"],
)
def test_load_pattern_errors(tmp_path, name, content, key, message):
    path = tmp_path / name
    if isinstance(content, dict):
        np.savez(path, **content)
    elif isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_pattern(path, key)


@pytest.mark.shared
@needs_dev_patterns
def test_dev_blend_and_patch_triggers_from_shared_patterns():
    noise = np.load(DEV_PATTERNS)["blend_noise"]
    patch = np.load(DEV_PATTERNS)["patch"]
    images = _images(64, seed=7)
    blend = BlendTrigger(pattern=load_pattern(DEV_PATTERNS, "blend_noise"), alpha=0.15)
    expected = np.round(0.85 * images.astype(float) + 0.15 * noise.astype(float)).astype(np.uint8)
    np.testing.assert_array_equal(apply_trigger(images, blend), expected)
    paste = PatchTrigger(pattern=load_pattern(DEV_PATTERNS, "patch"), position=(1, 26))
    pasted = apply_trigger(images, paste)
    np.testing.assert_array_equal(pasted[:, 1:6, 26:31], np.broadcast_to(patch, (64, 5, 5, 3)))


def test_warp_offsets_are_scaled_by_their_own_sides_on_non_square_images():
    """x moves by strength * offset / width, y by strength * offset / height: on an 8 x 16 image a uniform
    offset of 1 at strength 2 moves x by 2 / 16 and y by 2 / 8 of grid_sample's [-1, 1]."""
    offsets = torch.ones(1, 2, 3, 3, dtype=torch.float64)
    moved = offset_grid(offsets, 2.0, 8, 16) - offset_grid(offsets, 0.0, 8, 16)
    torch.testing.assert_close(moved[0, 2:-2, 2:-2, 0], torch.full((4, 12), 2 / 16, dtype=torch.float64))
    torch.testing.assert_close(moved[0, 2:-2, 2:-2, 1], torch.full((4, 12), 2 / 8, dtype=torch.float64))
