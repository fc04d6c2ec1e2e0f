"""One defense method run on a model: what `sanitize` does for `method`, and what `auto` does for each of its
candidates."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.engine.anp import AnpRecipe, adversarial_neuron_pruning, batch_norms
from core.engine.defenses import distill, feature_shift_tuning, finetune, fit_class_bias
from core.engine.ibau import IbauRecipe, unlearn
from core.engine.models import Distillation, find_classifier_head
from core.engine.resampling import ResamplingSign, resampling_sign, survival_warning
from core.engine.sau import SauRecipe, saturation_warning, shared_unlearning
from core.engine.training import Execution, Normalization, Recipe, Watch
from core.params import SanitizeParams

# The cost of each training stage, in epochs of fine-tuning on the same images: the progress bar's shares, and
# what `auto` estimates a candidate's time from.
# ANP: its 2000 default iterations of 128 images cost about as much as 10 epochs of 2,500 images.
ANP_STAGE_WEIGHT = 10
# An I-BAU round (a perturbation pass, then one hypergradient step per batch, each some 15 forward and backward
# passes) costs about as much as 20 epochs of fine-tuning on the same images.
IBAU_ROUND_WEIGHT = 20
# A SAU epoch (up to five perturbation steps through two models, then the unlearning step) costs about as much
# as 9 epochs of fine-tuning on the same images (27 s against 2.9 on 2,500 CIFAR-10 images, 2 CPU cores).
SAU_EPOCH_WEIGHT = 9


@dataclass(frozen=True)
class Run:
    """What every method of one job shares: its parameters, a supplied teacher (or None), the NAD layers
    checked at load time, the data pipeline, and where progress and timings go. `watch(stage)`
    gives the progress span of a training stage; `stage_prefix` names the stages of an `auto` candidate, and
    `cutoff`, when set, stops it (Cancelled) before an epoch it has no time for, as the user's cancel would;
    `deadline` (time.monotonic(), or None) is when the job's time runs out. `resampling` is the suspect's
    resampling sign (core/engine/resampling.py): it sets sau's warp search when the user left `sau_warp` unset,
    and where it fired every cleansed model is checked for it again."""

    params: SanitizeParams
    teacher: nn.Module | None
    distillation: Distillation | None
    resampling: ResamplingSign
    normalize: Normalization
    execution: Execution
    watch: Callable[[str], Watch]
    clock: Any
    stage_prefix: str = ""
    deadline: float | None = None
    cutoff: Callable[[], bool] | None = None

    def for_candidate(self, name: str, cutoff: Callable[[], bool] | None) -> Run:
        """This run for one of auto's candidates: its stages named `name`/..., stopped by `cutoff` too."""
        return dataclasses.replace(self, stage_prefix=f"{name}/", cutoff=cutoff)

    def stage(self, name: str) -> Watch:
        watch = self.watch(self.stage_prefix + name)
        if self.cutoff is None:
            return watch
        asked, cutoff = watch.should_stop, self.cutoff
        return dataclasses.replace(watch, should_stop=lambda: asked() or cutoff())

    def timed(self, name: str):
        return self.clock.time(self.stage_prefix + name)


@dataclass(frozen=True)
class Defended:
    """What a defense gives back: the cleansed model (for finetune: the teacher), what anp pruned, the shift
    nad added to its classifier's bias, and a warning when clean-data signals say the backdoor may have
    survived (the method's own, or the resampling sign's)."""

    model: nn.Module
    pruning: dict[str, Any] | None = None
    warning: str | None = None
    bias_shift: list[float] | None = None


def stages(method: str, params: SanitizeParams, trains_teacher: bool) -> dict[str, int]:
    """The training stages `method` runs, in order, with their cost in epochs of fine-tuning (auto: every
    candidate's, prefixed with the candidate's name). A sharpness-aware epoch costs two: each step runs the
    batch twice."""
    if method == "auto":
        return {f"{candidate}/{stage}": epochs for candidate in params.auto_candidates
                for stage, epochs in stages(candidate, params, trains_teacher).items()}
    if method == "fst":
        return {"fst": params.fst_epochs}
    if method == "anp":
        return {"anp": ANP_STAGE_WEIGHT}  # counted in iterations, not epochs
    if method == "ibau":
        return {"ibau": params.ibau_rounds * IBAU_ROUND_WEIGHT}
    if method == "sau":
        return {"sau": params.sau_epochs * SAU_EPOCH_WEIGHT}
    teacher = {"teacher": params.teacher_epochs} if trains_teacher else {}
    if method != "nad":
        return teacher
    student = recipes(params)["student"]
    return teacher | {"student": student.epochs + sum(map(student.sharpness_aware, range(student.epochs)))}


def unsuitable(method: str, model: nn.Module) -> str | None:
    """Why `method` cannot clean `model`, or None when it can: `fst` retrains the linear classifier layer, `anp`
    prunes BatchNorm neurons, and some models have neither (torchvision's SqueezeNet ends in a convolution).
    Asked before anything trains: `auto` leaves such a candidate out instead of failing the job after the
    others trained, and a single method fails at once."""
    if method == "fst" and find_classifier_head(model) is None:
        return "fst retrains the model's linear classifier layer, and this model has none"
    if method == "anp" and not batch_norms(model):
        return "anp prunes BatchNorm neurons, and this model has no BatchNorm layer with weight and bias"
    return None


def recipes(params: SanitizeParams) -> dict[str, Recipe]:
    """The recipe of each training stage a method may have."""
    common = {"batch_size": params.batch_size, "augment": params.augment, "seed": params.seed}
    return {
        "teacher": Recipe(epochs=params.teacher_epochs, lr=params.teacher_lr, **common),
        "student": Recipe(epochs=params.epochs, lr=params.lr, milestones=tuple(params.lr_milestones),
                          sam_rho=params.nad_sam_rho, sam_from=min(params.lr_milestones, default=0), **common),
        # The FST authors' optimiser: plain momentum, no weight decay, cosine schedule.
        "fst": Recipe(epochs=params.fst_epochs, lr=params.fst_lr, cosine=True, nesterov=False, weight_decay=0.0,
                      **common),
    }


def anp_recipe(params: SanitizeParams) -> AnpRecipe:
    return AnpRecipe(eps=params.anp_eps, steps=params.anp_steps, alpha=params.anp_alpha,
                     iterations=params.anp_iterations, lr=params.anp_lr, batch_size=params.anp_batch_size,
                     threshold=params.anp_threshold, augment=params.augment, seed=params.seed)


def ibau_recipe(params: SanitizeParams) -> IbauRecipe:
    return IbauRecipe(rounds=params.ibau_rounds, lr=params.ibau_lr, batch_size=params.ibau_batch_size,
                      norm=params.ibau_norm, seed=params.seed)


def sau_recipe(params: SanitizeParams, resampling: ResamplingSign) -> SauRecipe:
    """sau's recipe; its warp strength is the user's `sau_warp` or, left unset, what the suspect's resampling
    sign decides."""
    warp = params.sau_warp if params.sau_warp is not None else resampling.warp
    return SauRecipe(epochs=params.sau_epochs, lr=params.sau_lr, batch_size=params.sau_batch_size,
                     bound=params.sau_bound, anchor_epochs=params.sau_anchor_epochs, warp=warp, seed=params.seed)


def defend(method: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
           run: Run) -> Defended:
    """Clean `model` (changed in place) with `method`. Where the suspect showed the resampling sign, the cleansed
    model is measured for it again on the same images, and one that still shows it into the suspect's class
    gets a warning: the warp backdoor may have survived (core/engine/resampling.py)."""
    defended = _defend(method, model, images, labels, run)
    if not run.resampling.fired:
        return defended
    with run.timed("resampling_sign"):
        survival = survival_warning(run.resampling, resampling_sign(defended.model, images, run.normalize,
                                                                    run.execution))
    if survival is None:
        return defended
    return dataclasses.replace(defended, warning="; ".join(w for w in (defended.warning, survival) if w))


def _defend(method: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, run: Run) -> Defended:
    params, training = run.params, recipes(run.params)
    normalize, execution = run.normalize, run.execution
    if method == "fst":
        with run.timed("fst"):
            feature_shift_tuning(model, images, labels, training["fst"], params.fst_alpha, normalize, run.stage("fst"),
                                 execution)
        return Defended(model)
    if method == "anp":
        with run.timed("anp"):
            pruning = adversarial_neuron_pruning(model, images, labels, anp_recipe(params), normalize, run.stage("anp"),
                                                 execution)
        return Defended(model, pruning)
    if method == "ibau":
        with run.timed("ibau"):
            unlearn(model, images, labels, ibau_recipe(params), normalize, run.stage("ibau"), execution)
        return Defended(model)
    if method == "sau":
        with run.timed("sau"):
            rows = shared_unlearning(model, images, labels, sau_recipe(params, run.resampling), normalize,
                                     run.stage("sau"), execution)
        return Defended(model, warning=saturation_warning(rows))
    teacher = run.teacher
    if teacher is None:
        teacher = copy.deepcopy(model)
        with run.timed("teacher"):
            finetune(teacher, images, labels, training["teacher"], normalize, run.stage("teacher"), execution)
    if method == "finetune":
        return Defended(teacher)
    with run.timed("student"):
        distill(model, teacher, run.distillation, images, labels, training["student"], normalize, run.stage("student"),
                execution)
    if not params.nad_refit_bias:
        return Defended(model)
    with run.timed("refit_bias"):
        shift = fit_class_bias(model, images, labels, normalize, execution)
    return Defended(model, bias_shift=None if shift is None else [round(float(value), 4) for value in shift])
