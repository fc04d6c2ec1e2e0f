"""Backdoor triggers applied to clean uint8 images, to measure how often a model still obeys one (ASR).

Each kind reproduces the formula its attack was trained with, to the pixel: a rounding or clipping
difference would measure a slightly different trigger than the one the model learnt.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.engine.data import IMAGE_SUFFIXES, NPZ_ERRORS, decode_image, error_reason
from core.engine.errors import InputError
from core.params import BadNetsTrigger, BlendTrigger, PatchTrigger, SigTrigger, TriggerSpec, WarpTrigger

# How many float64 values a blend, sinusoid or warp works on at once (32 MB).
CHUNK_VALUES = 1 << 22
# The NAD authors' BadNets "gridTrigger" (bboylyg/NAD): a 3x3 checker in the bottom-right corner, the same in
# every channel. Rows 29-31 of a 32x32 image read 0 0 255 / 0 255 0 / 255 0 255.
NAD_GRID = BadNetsTrigger(pattern=[[0, 0, 255], [0, 255, 0], [255, 0, 255]], position=(-3, -3))


def apply_trigger(images: np.ndarray, spec: TriggerSpec) -> np.ndarray:
    """A triggered copy of uint8 N x H x W x C `images`; the input is left untouched."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 N x H x W x C images, got {images.dtype} of shape {images.shape}")
    if isinstance(spec, BadNetsTrigger | PatchTrigger):
        return _paste(images, _pattern(spec.pattern, images.shape[3]), spec.position)
    if isinstance(spec, BlendTrigger):
        return _blend(images, _pattern(spec.pattern, images.shape[3]), spec.alpha)
    if isinstance(spec, SigTrigger):
        return _sig(images, spec.amplitude, spec.frequency)
    if isinstance(spec, WarpTrigger):
        return _warp(images, spec)
    raise TypeError(f"unknown trigger spec {type(spec).__name__}")


def poison(
    images: np.ndarray, labels: np.ndarray, spec: TriggerSpec, target_label: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ASR set: triggered copies of the images whose true class is not the target, with their TRUE
    labels. Target-class images are left out: a model that predicts the target for them is merely right."""
    keep = labels != target_label
    return apply_trigger(images[keep], spec), labels[keep]


def load_pattern(path: Path, key: str | None = None) -> list:
    """A pattern file as the nested lists a trigger spec takes, so `--trigger` JSON can name a file instead of
    spelling out every pixel: an .npy, an .npz (its array `key`, which may be left out when it holds only
    one), or an image (read as RGB)."""
    name = path.name.lower()
    try:
        if name.endswith((".npy", ".npz")):
            array = _array_file(path, key)
        elif name.endswith(IMAGE_SUFFIXES):
            array = np.asarray(decode_image(path.read_bytes(), path.name))
        else:
            raise InputError(f"a pattern file must be .npy, .npz or an image ({', '.join(IMAGE_SUFFIXES)})")
    except OSError as error:  # missing or unreadable: said as any such input is, so it must name the file
        error.filename = error.filename or str(path)
        raise
    return _pattern_values(array).tolist()


def _array_file(path: Path, key: str | None) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            return loaded[_array_name(loaded.files, key)]
    except (InputError, OSError):  # OSError: missing or unreadable, where the advice below would not help
        raise
    except MemoryError:  # a header that declares an array far larger than any pattern (or the file)
        raise InputError(f"the pattern file {path} declares an array too large to be a pattern") from None
    except NPZ_ERRORS as error:
        raise InputError(
            f"the pattern file {path} could not be read ({error_reason(error)}); save a plain array with np.save"
        ) from None


def _array_name(names: list[str], key: str | None) -> str:
    if key is None and len(names) == 1:
        return names[0]
    if key not in names:
        raise InputError(f"the pattern npz holds arrays {names}; name the one to use")
    return key


def _pattern_values(array: np.ndarray) -> np.ndarray:
    """Integer H x W or H x W x C, values 0-255: what a pattern is."""
    if not np.issubdtype(array.dtype, np.integer) or array.ndim not in (2, 3):
        raise InputError(
            f"a pattern is integer H x W or H x W x C; the file holds {array.dtype} of shape {array.shape}"
        )
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InputError("pattern values must be 0-255")
    return array


def _pattern(pattern: list, channels: int) -> np.ndarray:
    """The spec's nested lists as uint8 H x W x C; a grey pixel is repeated in every channel."""
    try:
        array = np.asarray(pattern, dtype=np.uint8)
    except ValueError:
        raise InputError("the trigger pattern's rows must all be the same length") from None
    if array.ndim == 2:
        array = np.repeat(array[..., None], channels, axis=2)
    if array.ndim != 3 or 0 in array.shape:
        raise InputError("the trigger pattern must be non-empty rows of pixels")
    if array.shape[2] != channels:
        raise InputError(
            f"the trigger pattern's pixels have {array.shape[2]} values "
            f"but the images have {channels} channels"
        )
    return array


def _paste(images: np.ndarray, pattern: np.ndarray, position: tuple[int, int]) -> np.ndarray:
    height, width = images.shape[1:3]
    rows, cols = pattern.shape[:2]
    top = position[0] + height if position[0] < 0 else position[0]
    left = position[1] + width if position[1] < 0 else position[1]
    if top < 0 or left < 0 or top + rows > height or left + cols > width:
        raise InputError(
            f"a {rows}x{cols} trigger pattern at position {tuple(position)} does not fit inside "
            f"{height}x{width} images; move it or resize the pattern"
        )
    out = images.copy()
    out[:, top : top + rows, left : left + cols] = pattern
    return out


def _blend(images: np.ndarray, pattern: np.ndarray, alpha: float) -> np.ndarray:
    """round((1 - alpha) * x + alpha * pattern) in float64: with alpha 0.15 this is bit for bit the dev
    model's round(0.85 * x + 0.15 * noise), ties included."""
    if pattern.shape[:2] != images.shape[1:3]:
        raise InputError(
            f"a blend pattern must be the images' size: it is {pattern.shape[0]}x{pattern.shape[1]}, "
            f"the images are {images.shape[1]}x{images.shape[2]}"
        )
    weighted = alpha * pattern.astype(np.float64)
    return _in_chunks(images, lambda chunk: (1 - alpha) * chunk + weighted)


def _sig(images: np.ndarray, amplitude: float, frequency: float) -> np.ndarray:
    """x + amplitude * sin(2 * pi * col * frequency / W), the same offset down every column and channel."""
    width = images.shape[2]
    col = np.arange(width, dtype=np.float64)
    wave = (amplitude * np.sin(2 * np.pi * col * frequency / width))[None, :, None]
    return _in_chunks(images, lambda chunk: chunk + wave)


def warp_grid(spec: WarpTrigger, height: int, width: int) -> torch.Tensor:
    """Where each output pixel reads from, as grid_sample's 1 x H x W x 2 (x, y) grid in [-1, 1] (float64).

    WaNet's recipe with its random tensor drawn by numpy, so a seed gives the same field on every machine:
    offsets uniform in [-1, 1], divided by their mean magnitude, upsampled bicubically with aligned corners,
    scaled by strength / side and added to the identity grid, then clamped so no pixel reads from outside.
    """
    offsets = np.random.default_rng(spec.seed).uniform(-1, 1, (1, 2, spec.grid_size, spec.grid_size))
    offsets /= np.abs(offsets).mean()
    return offset_grid(torch.from_numpy(offsets), spec.strength, height, width)


def offset_grid(offsets: torch.Tensor, strength: float, height: int, width: int) -> torch.Tensor:
    """grid_sample's N x H x W x 2 grid for N x 2 x k x k control offsets (x, then y): upsampled bicubically with
    aligned corners, times `strength` over the side, added to the identity grid and clamped so no pixel reads from
    outside. An offset of 1 at strength 1 moves a pixel by 1 / side of grid_sample's [-1, 1], about half a pixel.
    Differentiable in `offsets`, which `sau` searches over (core/engine/sau.py)."""
    field = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, height, dtype=offsets.dtype, device=offsets.device),
                                torch.linspace(-1, 1, width, dtype=offsets.dtype, device=offsets.device), indexing="ij")
    grid = torch.stack((cols + strength * field[:, 0] / width, rows + strength * field[:, 1] / height), -1)
    return grid.clamp(-1, 1)


def _warp(images: np.ndarray, spec: WarpTrigger) -> np.ndarray:
    """Bilinear resampling of every image through `warp_grid`, in float64, rounded like the other formulas."""
    grid = warp_grid(spec, *images.shape[1:3])

    def resample(chunk: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(chunk).permute(0, 3, 1, 2)
        warped = F.grid_sample(inputs, grid.expand(len(chunk), -1, -1, -1), mode="bilinear", align_corners=True)
        return warped.permute(0, 2, 3, 1).numpy()

    return _in_chunks(images, resample)


def _in_chunks(images: np.ndarray, formula: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """formula(x) on float64 copies of a few images at a time, rounded and clipped to uint8: a whole test set
    in float64 would take eight times its memory (12 GB for 10,000 images of 224x224)."""
    out = np.empty_like(images)
    step = max(1, CHUNK_VALUES // images[0].size) if len(images) else 1
    for start in range(0, len(images), step):
        values = formula(images[start : start + step].astype(np.float64))
        out[start : start + step] = np.clip(np.round(values), 0, 255)
    return out
