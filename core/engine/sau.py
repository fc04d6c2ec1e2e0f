"""Shared Adversarial Unlearning (Wei et al., NeurIPS 2023): unlearn the adversarial examples that the model
shares with the suspect. A backdoor gives the suspect a short path from almost any image to its target class,
so a bounded perturbation that fools both the suspect and the model being cleaned, into the same class, most
likely walks that path. Each batch, projected gradient steps look for such shared adversarial examples; the
weights then take one Adam step on a clean-data term plus a term that pushes the model's prediction on
each adversarial image away from the class the suspect gives it.

Followed from the authors' code (BackdoorBench, `defense/sau.py`, class `Shared_PGD`, written by the paper's
first author, and `config/defense/sau/config.yaml`), where it differs from a plain reading of the paper:

- The perturbation is one per image, bounded in L-infinity by `bound` (0.2) in pixel units ([0, 1], before
  any normalisation), and not clipped to valid images. It starts at +`bound` everywhere and takes 5 signed
  gradient steps of 0.2 down 0.01 * L_adv + L_shared: L_adv is minus the cross-entropy (true labels) of the
  images that do not yet fool each model, halved and divided by the batch; L_shared is the Jensen-Shannon
  divergence between the two models' predictions on the images that are not yet shared adversarial examples.
  It stops early when every image is one.
- The unlearning loss is the clean term (below) plus, for each "potential poison" (an adversarial image
  that the suspect puts in a class that is neither its label nor the suspect's prediction for the clean
  image), -log(1 - p) with p the model's probability of the suspect's adversarial class, summed and divided
  by the batch. As the authors, 1 - p is taken half as the sum of the other classes' probabilities (clamped at
  0.999) and half as 1 - p (p clamped at 0.001), which keeps it finite when p is near 0 or 1.
  The adversarial-training term is off (their `lmd_2` is 0).
- Their clean term is the cross-entropy with the images' labels. Here, for the first `anchor_epochs`
  (`sau_anchor_epochs`, default 2), it is instead the distillation loss (KL divergence at temperature 4,
  times 16) from the suspect's own predictions on the clean images, which the backdoor does not touch: the
  shared term's first, largest steps knock a well-trained model far off (our dev patch model fell from 85.6 to
  57.4 % in the first epoch with labels, and ended at 80.2), and labels the suspect fits with near certainty
  pull back weakly, where its softened predictions hold the model to what it did on clean data. Not for
  longer: distilled to the end, a blend backdoor that the first epochs had erased came back (ASR 1.3 % after
  epoch 3, 37 % after epoch 10), the suspect's soft predictions carrying some of it (docs/engine.md).
- When an epoch's shared term is saturated (`SATURATED`: the authors' clamps give it no gradient where the model
  is certain of the suspect's class; on our blend models it stayed there for all ten epochs, ASR 100 %), the run
  stops at that epoch's end and starts again from the suspect's weights with perturbations in a sixteenth of the
  box (`RETRY_BOUND`), whose adversarial images the model is less certain of, and with the suspect's predictions
  as its clean term in every epoch. Both halves matter (docs/engine.md, docs/results.md): the exact -log(1 - p),
  an earlier retry, broke the saturation in one violent epoch and let the dev blend backdoor come back (85.6 /
  43.0 ACC / ASR, `sau` alone on its 2,500 images); a quarter of the box broke it in its second epoch and erased
  it (85.6 / 0.1), and kept our blend model inside `auto` at 82.0 / 1.6, but at other seeds broke it inside its
  first and let the backdoor come back, where a sixteenth erased it at every seed measured (`RETRY_BOUND` says
  more). With labels after two anchor epochs the smaller box cost our blend model its target (79.1). Why at the
  first saturated epoch, not only after the last: a saturated first epoch that breaks out by itself does it
  violently too. On the dev blend model at seed 1 the first epoch saturated (12.2), Adam's steps took the model to
  68.7 % (ASR 94 %), the second broke out, and `auto`'s candidate ended at 78.6 / 7.0; `sau` alone on all 2,500
  images at seed 1 (first epoch 5.5) left 83.1 / 90.2 with no warning. Retried in a quarter of the box after their
  first epoch they end at 85.2 / 1.2 and 85.3 / 5.8 (docs/results.md, "The default at another seed"). A retry
  that stays saturated runs to its end: at seed 2 the dev blend model's retry in a quarter of the box sat at 12.3
  for eight epochs and kept the backdoor (84.1 / 87.5, no warning then), and a quarter of that box erased it
  (84.8 / 1.0), but no retry in a sixteenth has stayed saturated in our measurements, and a retry in a box of 0.003
  (a sixteenth of 0.05, under one pixel level) left our blend model's backdoor whole with no sign (99.8 % ASR,
  shared loss 0.1). A retry saturated for most of its epochs, or at its end, is warned of instead
  (`saturation_warning`).
- With `warp` (`sau_warp`), the second half of each batch is searched among smooth warps (WaNet's 4 x 4
  control offsets, each within `warp`, from a random start, in steps of half of it) instead of additive
  perturbations: the additive search steps by its whole bound and so only visits the corners of the box,
  noise that misses a backdoor keyed to resampling. Not on everywhere, because the dev blend and sinusoid
  backdoors kept more of themselves with it (docs/engine.md): by default only where the suspect's resampling
  sign fires (core/engine/resampling.py, decided in core/engine/methods.py).
- Adam (betas 0.9, 0.999, no weight decay), batches of 256, no augmentation; both models stay in evaluation
  mode, so BatchNorm keeps the statistics it learnt on the whole training set.
- The authors' configuration asks for a cosine learning-rate schedule, and their code builds it but never
  steps it; here it is stepped once an epoch. Their Adam runs at 0.0001 for 100 epochs; the defaults here
  (`sau_lr` 0.0007, `sau_epochs` 10, in core/params.py) were measured on well-trained WRN-16-1, where 10
  epochs at 0.0001 left a blend backdoor whole (docs/engine.md).

It runs in fp32 on every device, like `ibau`: its perturbation steps follow the sign of input gradients, which
this engine has not checked in bf16.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.engine.events import Event
from core.engine.training import (
    Execution,
    Normalization,
    Recipe,
    Watch,
    begin_epoch,
    logits_on_pixels,
    plan_epoch,
    to_pixels,
)
from core.engine.triggers import offset_grid

PGD_STEPS = 5
PGD_STEP_SIZE = 0.2
ADVERSARIAL_WEIGHT = 0.01
SHARED_WEIGHT = 1.0
# The control points per side of `shared_warp`'s fields: WaNet's k.
WARP_GRID = 4
# The distillation temperature of the anchor epochs' clean term (Hinton et al.'s usual 4); the loss is
# multiplied by its square, as theirs, so its gradients keep their size. At temperature 1 the dev patch
# model's first epoch fell as far as with labels (57.7 %).
TEMPERATURE = 4.0
# A potential poison that the model puts in the suspect's class with certainty costs about 13.8 in the shared
# term (-log 1e-6, the clamps' floor) and gives it no gradient. An epoch's mean above SATURATED says most
# stayed there: 11.9 on our blend model, whose backdoor `sau` left whole (ASR 99.9 %), at most 0.26 at the end
# of every run that erased one (docs/results.md); after the first epoch 5.6, 12.2 and 7.5 on the dev blend model
# (seeds 0 to 2), 4.2 to 4.7 on dev patch, 1.0 to 1.6 on dev badnets and sinusoid. It calls for the retry,
# and for a warning when the last run ends above it or stays there for most of its epochs.
SATURATED = 5.0
# The retry's box as a share of `bound`. At a half our blend model stayed saturated for five epochs of the retry
# (docs/results.md); at a quarter both blend models broke out in the second, but on the dev blend model a retry at
# a quarter stayed saturated for three epochs at nine seeds of nineteen, and of those that broke out two let the
# backdoor come back (8 and 16: 83.41 / 68.57 and 85.54 / 5.21, no warning), having broken out violently inside
# their first epoch. At a sixteenth (0.0125) it broke out gently in its first epoch and erased the backdoor at
# every seed measured, 0.8 to 1.4 points under before (the quarter: 0.3 to 2.8), and met the target on our blend
# models (docs/results.md, "`sau`'s retry in a sixteenth of the box"). One retry only: a smaller box still
# is under one pixel level and fails without a sign (the module's docstring).
RETRY_BOUND = 1 / 16


@dataclass(frozen=True)
class SauRecipe:
    """SAU's settings: `epochs` passes over the clean data in batches of `batch_size`, one Adam step per batch
    at `lr` (cosine over the epochs), each batch's perturbations within `bound` in L-infinity (pixel units);
    the first `anchor_epochs` fit the suspect's predictions on the clean images instead of their labels; with
    `warp`, the second half of each batch gets smooth warps within that strength instead (`shared_warp`)."""

    epochs: int
    lr: float
    batch_size: int
    bound: float
    anchor_epochs: int = 0
    warp: float = 0.0
    seed: int = 0


def shared_perturbation(model: nn.Module, suspect: nn.Module, pixels: torch.Tensor, labels: torch.Tensor,
                        bound: float, normalize: Normalization, execution: Execution) -> torch.Tensor:
    """Per-image perturbations (pixel units, within `bound`) that make `model` and `suspect` err alike: the
    authors' Shared_PGD. Neither model's weights get gradient."""
    return _shared_search(model, suspect, pixels, labels, torch.full_like(pixels, bound), _add, PGD_STEP_SIZE, bound,
                          normalize, execution)


def shared_warp(model: nn.Module, suspect: nn.Module, pixels: torch.Tensor, labels: torch.Tensor,
                strength: float, normalize: Normalization, execution: Execution) -> torch.Tensor:
    """Per-image smooth warps that make `model` and `suspect` err alike: the same search over WaNet's 4 x 4
    control offsets (`offset_grid`, each within `strength`) instead of pixels, from a uniform random start (the
    global generator, which `shared_unlearning` seeds), in steps of half of `strength`. Returns the warped images.
    Neither model's weights get gradient."""
    start = (torch.rand(len(pixels), 2, WARP_GRID, WARP_GRID, device=pixels.device) * 2 - 1) * strength
    offsets = _shared_search(model, suspect, pixels, labels, start, _warp, strength / 2, strength, normalize,
                             execution)
    return _warp(pixels, offsets)


def _add(pixels: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
    return pixels + perturbation


def _warp(pixels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    grid = offset_grid(offsets.to(pixels.dtype), 1.0, *pixels.shape[2:])
    return F.grid_sample(pixels, grid, mode="bilinear", align_corners=True)


def _shared_search(model: nn.Module, suspect: nn.Module, pixels: torch.Tensor, labels: torch.Tensor,
                   start: torch.Tensor, apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], step: float,
                   bound: float, normalize: Normalization, execution: Execution) -> torch.Tensor:
    """Shared_PGD's steps on whatever `apply(pixels, variable)` turns `start` into an image with: signed steps of
    `step` down 0.01 * L_adv + L_shared, the variable kept within `bound`, until every image is a shared
    adversarial example or PGD_STEPS are taken. Returns the variable."""

    def logits_of(network: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return logits_on_pixels(network, inputs, normalize, execution)

    with torch.no_grad():
        own, own_suspect = logits_of(model, pixels).argmax(1), logits_of(suspect, pixels).argmax(1)
    variable = start
    for _ in range(PGD_STEPS):
        variable.requires_grad_()
        inputs = apply(pixels, variable)
        logits, logits_suspect = logits_of(model, inputs), logits_of(suspect, inputs)
        fooled, fooled_suspect = logits.argmax(1) != own, logits_suspect.argmax(1) != own_suspect
        shared = fooled & fooled_suspect & (logits.argmax(1) == logits_suspect.argmax(1))
        adversarial = -(F.cross_entropy(logits, labels, reduction="none")[~fooled].sum()
                        + F.cross_entropy(logits_suspect, labels, reduction="none")[~fooled_suspect].sum()) / 2
        divergence = _jensen_shannon(logits, logits_suspect)[~shared].sum()
        loss = (ADVERSARIAL_WEIGHT * adversarial + SHARED_WEIGHT * divergence) / len(pixels)
        (gradient,) = torch.autograd.grad(loss, variable)
        variable = (variable.detach() - step * gradient.sign()).clamp_(-bound, bound)
        if bool(shared.all()):
            break
    return variable.detach()


def unlearning_loss(logits: torch.Tensor, adversarial_logits: torch.Tensor, labels: torch.Tensor,
                    suspect_logits: torch.Tensor, suspect_adversarial: torch.Tensor,
                    anchor: bool) -> dict[str, torch.Tensor]:
    """The clean term and the shared-risk term: on each potential poison (the suspect's adversarial class is
    neither the label nor its clean prediction), -log(1 - p) for the model's probability p of that class, in
    the authors' two clamped halves. The clean term is the cross-entropy with `labels` or, with `anchor`, the
    distillation loss from the suspect's predictions (`suspect_logits`, on the clean images);
    `suspect_adversarial` are the suspect's classes for the adversarial images. Also returns the share of the
    batch that were potential poisons."""
    clean = distillation_loss(logits, suspect_logits) if anchor else F.cross_entropy(logits, labels)
    poison = (suspect_adversarial != labels) & (suspect_adversarial != suspect_logits.argmax(1))
    probabilities = F.softmax(adversarial_logits, dim=1)[poison]
    one_hot = F.one_hot(suspect_adversarial[poison], adversarial_logits.shape[1]).to(probabilities.dtype)
    chosen, rest = (probabilities * one_hot).sum(1), (probabilities * (1 - one_hot)).sum(1)
    shared = -(torch.log(1e-6 + rest.clamp(max=0.999)).sum()
               + torch.log(1 + 1e-6 - chosen.clamp(min=0.001)).sum()) / 2 / len(labels)
    return {"loss": clean + shared, "clean_loss": clean, "shared_loss": shared,
            "poison_share": poison.float().mean()}


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) at TEMPERATURE, times its square, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits / TEMPERATURE, 1), F.softmax(teacher_logits / TEMPERATURE, 1),
                    reduction="batchmean") * TEMPERATURE * TEMPERATURE


def shared_unlearning(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: SauRecipe,
                      normalize: Normalization, watch: Watch, execution: Execution) -> list[dict[str, Any]]:
    """Unlearn `model` in place on the clean uint8 `images`, against a frozen copy of itself as the suspect;
    returns one history row per epoch.

    When an epoch ends saturated (`SATURATED`: the clamped term sat at its floor, where it has no gradient, on
    most potential poisons), the run stops there, the model goes back to the suspect's weights and runs the
    recipe again in a sixteenth of the box (`RETRY_BOUND`), anchored in every epoch (the module's docstring
    says why), once. Its rows say `"retry": true`, and its progress events spread over what the first run
    left of the stage, so they never pass its end. Every row says whether its clean term
    was `anchored` and the perturbations' `bound`.

    Checks `watch.should_stop()` before every epoch and raises Cancelled when it turns true, so a model is
    never left half-way through an epoch."""
    suspect = copy.deepcopy(model).eval()
    for weight in suspect.parameters():
        weight.requires_grad_(False)
    training = model.training
    model.eval()
    try:
        rows = _unlearn(model, suspect, images, labels, recipe, False, normalize, watch, execution)
        if _saturated(rows[-1]):
            model.load_state_dict(suspect.state_dict())
            retry = dataclasses.replace(recipe, anchor_epochs=recipe.epochs, bound=recipe.bound * RETRY_BOUND)
            span = dataclasses.replace(watch, start=watch.at(len(rows) / recipe.epochs))
            rows += _unlearn(model, suspect, images, labels, retry, True, normalize, span, execution)
    finally:
        model.train(training)
    return rows


def _unlearn(model: nn.Module, suspect: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: SauRecipe,
             retry: bool, normalize: Normalization, watch: Watch, execution: Execution) -> list[dict[str, Any]]:
    """The recipe's epochs, from a fresh optimizer and the recipe's seed; the first run (not a `retry`) stops at
    the end of its first saturated epoch."""
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    plan = Recipe(epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, augment=False, seed=recipe.seed,
                  cosine=True)
    optimizer = torch.optim.Adam([w for w in model.parameters() if w.requires_grad], lr=recipe.lr)
    rows = []
    for epoch in range(recipe.epochs):
        lr = begin_epoch(epoch, plan, optimizer, watch)
        steps = plan_epoch(len(images), plan, generator, images.device, execution.static_shapes)
        sums: dict[str, float] = {}
        anchored = epoch < recipe.anchor_epochs
        for number, step in enumerate(steps, start=1):
            pixels, targets = to_pixels(images[step.index]), labels[step.index]
            parts = _unlearning_step(model, suspect, pixels, targets, recipe, anchored, optimizer, normalize,
                                     execution)
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value / len(steps)
            watch.on_event(Event(watch.stage, watch.at((epoch + number / len(steps)) / recipe.epochs),
                                 epoch=epoch + 1, epochs=recipe.epochs, step=number))
        rows.append(_record_epoch(watch, epoch + 1, recipe.epochs, lr, sums, anchored, recipe.bound, retry))
        if not retry and _saturated(rows[-1]):
            break
    return rows


def _saturated(row: dict[str, Any]) -> bool:
    return row["shared_loss"] > SATURATED


def saturation_warning(rows: list[dict[str, Any]]) -> str | None:
    """A warning for the report when the last run's shared loss says the unlearning never took hold: it ended
    saturated, or was for most of its epochs, breaking out only where the cosine lr had little left to unlearn
    with. A run's rows are those with its box: the retry's is smaller than the first run's (`sau_bound` > 0)."""
    last = [row for row in rows if row["bound"] == rows[-1]["bound"]]
    saturated = sum(map(_saturated, last))
    if not _saturated(rows[-1]) and 2 * saturated <= len(last):
        return None
    return (f"sau's shared loss was above {SATURATED:g} in {saturated} of its last run's {len(last)} epochs, the "
            f"last at {rows[-1]['shared_loss']:.1f}: the model stayed certain of the suspect's class on most of the "
            "adversarial images it was to unlearn, so the backdoor may be intact")


def _unlearning_step(model: nn.Module, suspect: nn.Module, pixels: torch.Tensor, targets: torch.Tensor,
                     recipe: SauRecipe, anchor: bool, optimizer: torch.optim.Optimizer,
                     normalize: Normalization, execution: Execution) -> dict[str, float]:
    """One batch: find its shared adversarial examples, then one optimizer step on the unlearning loss."""
    adversarial = _adversarial_images(model, suspect, pixels, targets, recipe, normalize, execution)
    both = torch.cat([pixels, adversarial])
    logits, adversarial_logits = logits_on_pixels(model, both, normalize, execution).split(len(targets))
    with torch.no_grad():
        suspect_clean = logits_on_pixels(suspect, pixels, normalize, execution)
        suspect_adversarial = logits_on_pixels(suspect, adversarial, normalize, execution).argmax(1)
    parts = unlearning_loss(logits, adversarial_logits, targets, suspect_clean, suspect_adversarial, anchor)
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    optimizer.step()
    return {name: float(value.detach()) for name, value in parts.items()}


def _adversarial_images(model: nn.Module, suspect: nn.Module, pixels: torch.Tensor, targets: torch.Tensor,
                        recipe: SauRecipe, normalize: Normalization, execution: Execution) -> torch.Tensor:
    """The batch's shared adversarial images: additive perturbations within `recipe.bound` (the authors') or, with
    `recipe.warp`, those for the first half of the batch and smooth warps for the second."""
    half = (len(pixels) + 1) // 2 if recipe.warp else len(pixels)
    additive = pixels[:half] + shared_perturbation(model, suspect, pixels[:half], targets[:half], recipe.bound,
                                                   normalize, execution)
    if half == len(pixels):
        return additive
    warped = shared_warp(model, suspect, pixels[half:], targets[half:], recipe.warp, normalize, execution)
    return torch.cat([additive, warped])


def _jensen_shannon(logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-image Jensen-Shannon divergence of two predictions, probabilities clamped at 1e-8 as the authors'."""
    p, q = F.softmax(logits, dim=1).clamp(min=1e-8), F.softmax(other, dim=1).clamp(min=1e-8)
    mixture = (p + q) / 2
    return (0.5 * (p * (p.log() - mixture.log())) + 0.5 * (q * (q.log() - mixture.log()))).sum(1)


def _record_epoch(watch: Watch, epoch: int, epochs: int, lr: float, sums: dict[str, float], anchored: bool,
                  bound: float, retry: bool) -> dict[str, Any]:
    row = {"stage": watch.stage, "epoch": epoch, "epochs": epochs, "lr": lr, "anchored": anchored, "bound": bound,
           "retry": retry, **sums}
    watch.history.append(row)
    watch.on_event(Event(watch.stage, watch.at(epoch / epochs), epoch=epoch, epochs=epochs, loss=sums["loss"],
                         lr=lr))
    return row
