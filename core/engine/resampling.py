"""A clean-data sign of a backdoor keyed to resampling: it decides whether `sau` searches smooth warps too, and
where the suspect shows it, a cleansed model that still does is warned of.

A warping backdoor (WaNet) is learnt from images resampled through one smooth field, and a model that learnt it
may fire on almost any resampling: our warp model sent 98.5 % of the non-target test images to its target after
a 3 x 3 box blur and 100 % after a half-pixel shift (docs/results.md). So shift the clean images by half a pixel
in both directions (each pixel the mean of itself and its right, lower and lower-right neighbours, the border
repeated, rounded back to uint8) and count the images whose prediction moves into the one class most of the
moved ones go to. A clean or otherwise backdoored model loses a few images to blur, spread out (to cat, on
CIFAR-10): 5.4 to 6.1 % on the four dev models, 8.9 and 13.9 % on the NAD authors' backdoored and erased
ones. Our warp model: 89.8 and 89.4 % (two copies). At SIGN_SHARE (50 %) or more, the sign fires.

What it cannot see: a backdoor taught not to fire on other resamplings. WaNet's "noise mode" trains on images
warped through random fields with their true labels for that purpose; `nad attack` has no such mode, so no
model here was trained with it, and the sign's behaviour on one is not measured.

The suspect's sign sets `sau_warp` only when the user left it unset; the user's value, 0 included, is used as
given. Where the suspect's sign fired, each cleansed model is measured again, and one that still moves at least
SIGN_SHARE of the shifted images into the suspect's class is warned of: on a WaNet digits model, the defenses
that left the backdoor (ASR 23 to 88 %) all still sent 89.8 to 90.7 % of the clean images to the target, as
the suspect did (90.6 %), and `sau` with the warp search, which erased it, 24.2 % into another class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.engine.metrics import classify
from core.engine.training import Execution, Normalization

# The share of the clean images (percent) that must move into one class for the sign to fire: halfway between
# the most any model without a warp backdoor moved (13.9 %) and our warp model (89.8 %).
SIGN_SHARE = 50.0
# sau's warp strength when the sign fires: WaNet's s of 1, offsets of up to about half a pixel. Inside `auto` on
# two copies of our warp model it left 0.9 and 0.8 % ASR, where the additive search alone left 2.5 and 90.2 %
# (docs/results.md).
WARP_STRENGTH = 1.0


@dataclass(frozen=True)
class ResamplingSign:
    """`share` percent of `images` clean images moved into class `label` when shifted half a pixel."""

    share: float
    label: int
    images: int

    @property
    def fired(self) -> bool:
        return self.share >= SIGN_SHARE

    @property
    def warp(self) -> float:
        """The `sau_warp` this sign decides: WARP_STRENGTH when it fires, else 0 (additive search only)."""
        return WARP_STRENGTH if self.fired else 0.0

    def describe(self) -> str:
        return f"{self.share:.1f} % of the {self.images} clean images moved into class {self.label}"

    def report(self) -> dict[str, Any]:
        """What the job's report says: the figures and what they mean."""
        meaning = (f"at least {SIGN_SHARE:g} %: a backdoor keyed to resampling (a warp) may be there" if self.fired
                   else f"under {SIGN_SHARE:g} %: no sign of a warp")
        return {"share": round(self.share, 2), "label": self.label, "images": self.images, "threshold": SIGN_SHARE,
                "fired": self.fired, "note": f"{self.describe()} when shifted half a pixel, {meaning}"}


def survival_warning(suspect: ResamplingSign, cleansed: ResamplingSign) -> str | None:
    """A warning when the cleansed model shows the sign into the suspect's class, as a surviving warp backdoor
    does; None otherwise. A sign into another class is not the backdoor: on the digits warp model, a `sau`
    that erased it (ASR 0) at a high learning rate sent 53.3 % of the shifted images into class 8, not 0."""
    if not (suspect.fired and cleansed.fired and cleansed.label == suspect.label):
        return None
    return (f"the cleansed model still shows the resampling sign ({cleansed.describe()} when shifted half a pixel; "
            f"the suspect {suspect.share:.1f} %): the warp backdoor may have survived")


def half_pixel_shift(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW images moved half a pixel left and up by bilinear resampling, rounded back to uint8."""
    padded = F.pad(images.float(), (0, 1, 0, 1), mode="replicate")
    return F.avg_pool2d(padded, 2, stride=1).round_().to(torch.uint8)


def resampling_sign(model: nn.Module, images: torch.Tensor, normalize: Normalization,
                    execution: Execution) -> ResamplingSign:
    """The sign on the clean uint8 NCHW `images` (on the model's device); leaves the model in evaluation mode."""
    before = classify(model, images, normalize, execution)
    step = execution.eval_batch  # shifted a batch at a time: in float, a whole set may not fit
    shifted = torch.cat([half_pixel_shift(images[start:start + step]) for start in range(0, len(images), step)])
    after = classify(model, shifted, normalize, execution)
    moved = after[after != before]
    if len(moved) == 0:
        return ResamplingSign(0.0, 0, len(images))
    counts = torch.bincount(moved)
    label = int(counts.argmax())
    return ResamplingSign(100.0 * int(counts[label]) / len(images), label, len(images))
