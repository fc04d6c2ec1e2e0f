"""The resampling sign (core/engine/resampling.py) on hand-made images, on real digits backdoors, and on the
shared CIFAR-10 models it must leave alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.engine.data import load_images
from core.engine.methods import sau_recipe
from core.engine.resampling import (
    SIGN_SHARE,
    ResamplingSign,
    half_pixel_shift,
    resampling_sign,
    survival_warning,
)
from core.engine.sanitize import load_model
from core.engine.training import Execution, Normalization, to_tensor
from core.params import SanitizeParams

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10_TEST = SHARED / "datasets" / "cifar10" / "test.tar.gz"
MODELS = [SHARED / "models" / "dev" / f"wrn16_1-dev_{name}.safetensors"
          for name in ("badnets", "blend", "sig", "patch")]
OFFICIAL = [SHARED / "models" / "nad-official" / f"wrn16_1-badnets-grid-{name}.pth.tar"
            for name in ("backdoored", "nad-erased")]
EXECUTION = Execution()
WRN = SanitizeParams(arch="wrn-16-1", num_classes=10)


def _sign(model: nn.Module, images: np.ndarray) -> ResamplingSign:
    return resampling_sign(model, to_tensor(images, torch.device("cpu")), Normalization(), EXECUTION)


def test_half_pixel_shift_moves_an_edge_half_a_pixel_and_repeats_the_border():
    images = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    images[..., 2:] = 200  # dark left half, bright right half
    shifted = half_pixel_shift(images)
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    assert shifted[0, 0, 0].tolist() == [0, 100, 200, 200], "the edge moves left by half a pixel"
    flat = torch.full((2, 3, 5, 5), 77, dtype=torch.uint8)
    assert torch.equal(half_pixel_shift(flat), flat), "the border is repeated, not darkened"


class Sharpness(nn.Module):
    """Class 7 for images whose neighbouring pixels differ little (as after a resampling), else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smooth = (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)) < 0.2
        return nn.functional.one_hot(torch.where(smooth, 7, 0), 10).float()


def test_the_sign_fires_when_shifted_images_move_into_one_class_and_says_so():
    noise = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    sign = _sign(Sharpness(), noise)
    assert (sign.share, sign.label, sign.images) == (100.0, 7, 40)
    assert sign.fired and sign.warp == 1.0
    report = sign.report()
    assert report["fired"] and report["threshold"] == SIGN_SHARE and report["share"] == 100.0
    assert report["note"] == ("100.0 % of the 40 clean images moved into class 7 when shifted half a pixel, at least "
                              "50 %: a backdoor keyed to resampling (a warp) may be there")


def test_a_model_that_does_not_care_for_resampling_shows_no_sign():
    flat = np.full((10, 8, 8, 3), 90, dtype=np.uint8)  # a half-pixel shift changes nothing: no image moves
    sign = _sign(Sharpness(), flat)
    assert (sign.share, sign.fired, sign.warp) == (0.0, False, 0.0)
    assert "no sign of a warp" in sign.report()["note"]
    assert not ResamplingSign(SIGN_SHARE - 0.1, 3, 100).fired and ResamplingSign(SIGN_SHARE, 3, 100).fired


def test_the_share_counts_the_moved_images_against_all_the_clean_images():
    """Half the images move into class 7 and half do not move: 50 % of the clean images, not 100 % of the moved."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    flat = np.full((20, 8, 8, 3), 90, dtype=np.uint8)
    sign = _sign(Sharpness(), np.concatenate([noise, flat]))
    assert (sign.share, sign.label, sign.images) == (50.0, 7, 40)


def test_the_users_sau_warp_is_used_as_given_even_0_and_only_unset_is_left_to_the_sign():
    """0 is the user's "additive only", not "unset": a sign that fired must not turn it into the warp search."""
    fired, quiet = ResamplingSign(90.0, 0, 100), ResamplingSign(5.0, 3, 100)
    for given, sign, warp in ((0.0, fired, 0.0), (0.5, fired, 0.5), (0.5, quiet, 0.5), (None, fired, 1.0),
                              (None, quiet, 0.0)):
        params = SanitizeParams(arch="wrn-16-1", num_classes=10, method="sau", sau_warp=given)
        assert sau_recipe(params, sign).warp == warp, (given, sign)


def test_a_cleansed_model_is_warned_of_only_when_it_shows_the_sign_into_the_suspects_class():
    suspect = ResamplingSign(90.6, 0, 500)
    survived = survival_warning(suspect, ResamplingSign(89.8, 0, 450))
    assert survived is not None and survived.startswith("the cleansed model still shows the resampling sign (89.8 %")
    assert survival_warning(suspect, ResamplingSign(53.3, 8, 450)) is None, "another class is not the backdoor"
    assert survival_warning(suspect, ResamplingSign(24.2, 0, 450)) is None
    assert survival_warning(ResamplingSign(13.9, 3, 500), ResamplingSign(60.0, 3, 500)) is None, "no sign before"


def test_a_cleansed_model_that_shows_the_sign_keeps_its_methods_own_warning_too(monkeypatch):
    """sau's saturated shared loss and a surviving resampling sign are two signals: the candidate's warning says
    both, and where the suspect showed no sign, the cleansed model is not measured for it."""
    from core.engine import methods
    from core.engine.sanitize import Clock

    monkeypatch.setattr(methods, "_defend", lambda *args: methods.Defended(nn.Identity(), warning="sau saturated"))
    monkeypatch.setattr(methods, "resampling_sign", lambda *args: ResamplingSign(88.0, 0, 10))
    images, labels = torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.zeros(10, dtype=torch.int64)

    def run(suspect: ResamplingSign) -> methods.Run:
        return methods.Run(WRN, None, None, suspect, Normalization(), EXECUTION, None, Clock())

    warning = methods.defend("sau", nn.Identity(), images, labels, run(ResamplingSign(90.0, 0, 10))).warning
    assert warning.startswith("sau saturated; the cleansed model still shows the resampling sign (88.0 %")
    assert methods.defend("sau", nn.Identity(), images, labels, run(ResamplingSign(9.0, 0, 10))).warning == \
        "sau saturated"


def test_a_defense_that_leaves_a_warp_backdoor_is_warned_of(digits_warp_backdoor, tmp_path):
    """Fine-tuning leaves this backdoor (85.1 % ASR on the first machine) and the cleansed model still sends 90.6 %
    of the shifted clean digits to the target: the report says so."""
    report = digits_warp_backdoor.sanitize(tmp_path / "clean.safetensors", method="finetune")
    assert report["resampling"]["fired"] and report["resampling"]["sau_warp"] is None, "sau did not run"
    assert report["after"]["asr"] > 50
    (warning,) = report["warnings"]
    assert "still shows the resampling sign" in warning and warning.endswith("the warp backdoor may have survived")


def _clean_images(case) -> np.ndarray:
    with np.load(case.clean) as data:
        return data["x"]


def test_the_sign_tells_a_real_warp_backdoor_from_a_badnets_one(digits_warp_backdoor, digits_backdoor):
    """On the first machine: the warp model 90.6 % of the 500 clean digits into its target, class 0; the badnets
    one far under the threshold."""
    warp = _sign(load_model(WRN, digits_warp_backdoor.checkpoint), _clean_images(digits_warp_backdoor))
    assert warp.fired and warp.label == 0 and warp.images == 500
    badnets = _sign(load_model(WRN, digits_backdoor.checkpoint), _clean_images(digits_backdoor))
    assert not badnets.fired and badnets.share < SIGN_SHARE / 2


@pytest.mark.skipif(not CIFAR10_TEST.is_file() or not all(p.is_file() for p in MODELS + OFFICIAL),
                    reason="../shared's CIFAR-10 test set or its models are absent")
def test_the_sign_stays_quiet_on_the_shared_models_whose_triggers_are_no_warps():
    """On the 2,500 clean training images of docs/results.md: the dev models 5.4 to 6.1 %, the NAD authors'
    backdoored and erased models 8.9 and 13.9 %, always into cat; here on 1,000 test images."""
    images = load_images(CIFAR10_TEST, 32).images[:1000]
    execution = Execution.for_mode("fast", torch.device("cpu"), 32)
    for path in MODELS + OFFICIAL:
        model = execution.prepare(load_model(WRN, path))
        sign = resampling_sign(model, to_tensor(images, torch.device("cpu")), Normalization(), execution)
        assert sign.share < 20, f"{path.name}: {sign.report()['note']}"
