"""The parameters of a sanitization job: one schema for the command line, the HTTP API and the engine.

This module imports neither torch nor anything web-related, so the API can validate a job's `params`
form field before a single byte reaches the worker, and the engine can trust what it receives.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

# The most bytes of params JSON anyone takes: the API for the `params` form field, the command line for a JSON
# file it is given (a trigger, `nad submit --params @file`). A bigger one is no small JSON object, and reading it
# whole (/dev/zero, say) would never end.
PARAMS_LIMIT = 1 << 20
# The training lengths an operator caps with NAD_MAX_EPOCHS (`sau_anchor_epochs` only splits `sau_epochs`).
CAPPED_EPOCHS = ("epochs", "teacher_epochs", "fst_epochs", "ibau_rounds", "sau_epochs")
# The square image sizes taken, here and by the command line's --input-size: a million pixels a side would
# decode a data set into more memory than any machine has.
INPUT_SIZES = (8, 1024)

Pixel = Annotated[int, Field(ge=0, le=255)]


def _pixels(value: object) -> object:
    """A pattern's file name is read into pixels by the engine's commands before they validate: one that
    reaches validation came to the service, which reads no file of its host."""
    if isinstance(value, str):
        raise ValueError("a pattern file is read by nad sanitize, evaluate and attack only; send the service "
                         "the pattern's pixels, as rows of values")
    return value


# A pattern is rows of pixels: each pixel one grey value (all channels alike) or one value per channel.
Pattern = Annotated[list[list[Pixel]] | list[list[list[Pixel]]], BeforeValidator(_pixels)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BadNetsTrigger(_Spec):
    """Pixels set to fixed values at a position (BadNets, Gu et al. 2017)."""

    type: Literal["badnets"] = "badnets"
    pattern: Pattern = Field(description="rows of pixel values; each a grey value or one value per channel")
    position: tuple[int, int] = Field(
        description="(row, column) of the pattern's top-left pixel; negative values count from the bottom/right"
    )


class PatchTrigger(_Spec):
    """A small image pasted at a position."""

    type: Literal["patch"] = "patch"
    pattern: Pattern = Field(description="the image, HxWxC (or HxW grey), uint8 values")
    position: tuple[int, int] = Field(description="(row, column) of the top-left pixel; negative counts from the end")


class BlendTrigger(_Spec):
    """The whole image blended with a pattern: round((1 - alpha) * x + alpha * pattern) (Chen et al. 2017)."""

    type: Literal["blend"] = "blend"
    pattern: Pattern = Field(description="an image of the input's size, HxWxC (or HxW grey), uint8 values")
    alpha: float = Field(gt=0, le=1)


class SigTrigger(_Spec):
    """A horizontal sinusoid added to every row and channel (Barni et al. 2019):
    clip(round(x + amplitude * sin(2 * pi * column * frequency / width)))."""

    type: Literal["sig"] = "sig"
    amplitude: float = Field(gt=0, le=255)
    frequency: float = Field(gt=0)


class WarpTrigger(_Spec):
    """Every image resampled through one fixed, smooth warping field (WaNet, Nguyen & Tran, ICLR 2021):
    grid_size x grid_size random offsets drawn from `seed`, scaled to a mean magnitude of 1, upsampled
    bicubically to the image's size; a pixel is read, bilinearly, from `strength` times that offset over
    the image's side, in grid_sample's [-1, 1] coordinates (about strength / 2 pixels on average)."""

    type: Literal["warp"] = "warp"
    grid_size: int = Field(default=4, ge=2, le=32, description="control points per side (WaNet's k)")
    strength: float = Field(default=0.5, gt=0, le=8, description="how far pixels move (WaNet's s)")
    seed: int = Field(default=0, ge=0, description="draws the random control offsets")


TriggerSpec = Annotated[
    BadNetsTrigger | PatchTrigger | BlendTrigger | SigTrigger | WarpTrigger, Field(discriminator="type")
]

Candidate = Literal["nad", "finetune", "fst", "anp", "ibau", "sau"]
Method = Literal[Candidate, "auto"]
Mode = Literal["fast", "reference"]


class SanitizeParams(_Spec):
    """Everything a sanitization job needs besides its files.

    The default method is `auto` with candidates nad, then sau, then fst: on well-trained models the authors' nad
    costs 22 to 46 points of accuracy, and auto falls back to sau there; where both collapse (our PreAct-ResNet18),
    to fst (docs/results.md). NAD's defaults are the NAD authors' (Li et al., ICLR 2021): student 20 epochs at lr
    0.1, dropped tenfold from epoch 2; teacher fine-tuned 10 epochs at lr 0.01; SGD with nesterov momentum 0.9,
    weight decay 1e-4; batch 64; betas 500/1000/1000 on WRN's three residual groups; crop and flip augmentation;
    but for two changes of ours, measured on the authors' own model: sharpness-aware steps after the lr drop
    (`nad_sam_rho`) and the classifier's bias refit to the clean images (`nad_refit_bias`). The `anp_*` defaults
    are the ANP authors' (Wu & Wang, NeurIPS 2021), the `ibau_*` ones I-BAU's (Zeng et al., ICLR 2022); the `sau_*`
    ones follow SAU's (Wei et al., NeurIPS 2023) but for its learning rate, epochs and clean term, a retry in a
    sixteenth of the box where the authors' shared term saturates, and a warp search where the suspect's
    resampling sign fires, as docs/engine.md details.
    """

    arch: str = Field(description="architecture name, e.g. wrn-16-1, preact-resnet18, resnet18, or a torchvision name")
    num_classes: int = Field(ge=2, le=100_000)
    classes: list[str] | None = Field(
        default=None, description="class folder names in label order; default: sorted folder names"
    )
    input_size: int = Field(default=32, ge=INPUT_SIZES[0], le=INPUT_SIZES[1],
                            description="images are resized to this square size")
    mean: tuple[float, float, float] | None = Field(default=None, description="per-channel normalization mean")
    std: tuple[float, float, float] | None = Field(default=None, description="per-channel normalization std")
    method: Method = Field(
        default="auto",
        description="nad: Neural Attention Distillation (fine-tuned teacher, then attention distillation); finetune: "
        "the fine-tuned teacher itself; fst: Feature Shift Tuning; anp: Adversarial Neuron Pruning (BatchNorm "
        "neurons that adversarial weight noise exposes are pruned; no training of the weights); ibau: Implicit "
        "Backdoor Adversarial Unlearning (the universal adversarial perturbation is unlearnt); sau: Shared "
        "Adversarial Unlearning (adversarial examples the model shares with the suspect are unlearnt); auto: runs "
        "auto_candidates and keeps the one that clean data favours (docs/engine.md)",
    )
    epochs: int = Field(default=20, ge=1, le=1000,
                        description="nad: student epochs (finetune trains for teacher_epochs at teacher_lr)")
    lr: float = Field(default=0.1, gt=0, le=10, description="student learning rate")
    lr_milestones: list[int] = Field(
        default=[2], description="epochs (0-based) from which the student's lr is divided by 10"
    )
    nad_sam_rho: float = Field(
        default=2.0, ge=0, le=10,
        description="nad: radius of the sharpness-aware steps (adaptive SAM, as in FT-SAM, whose radius is 2) the "
                    "student takes from its first lr milestone on, the epochs in which plain SGD lets part of an "
                    "erased backdoor come back (0: plain SGD, the authors' NAD; docs/engine.md)",
    )
    nad_refit_bias: bool = Field(
        default=True,
        description="nad: once the student is trained, refit its classifier's bias to the clean images (the other "
                    "weights held), so that it predicts each class as often as the images hold it (false: the "
                    "authors' NAD; docs/engine.md)",
    )
    teacher_epochs: int = Field(default=10, ge=1, le=1000)
    teacher_lr: float = Field(default=0.01, gt=0, le=10)
    batch_size: int = Field(default=64, ge=1, le=4096)
    auto_candidates: list[Candidate] = Field(
        default=["nad", "sau", "fst"], min_length=1,
        description="auto: the methods it runs, each on its own copy of the model, in order of preference: the "
                    "first within auto_budget is kept",
    )
    auto_budget: float = Field(
        default=2.0, ge=0, le=100,
        description="auto: how many points of clean accuracy (on a held-out tenth of clean_data) a candidate may "
                    "lose against the suspect and still be chosen over the ones after it (when none is within it, "
                    "the most accurate candidate is kept; one before the kept one that missed it by no more than "
                    "its gap's standard error gets a second look, on as many other images)",
    )
    fst_epochs: int = Field(default=10, ge=1, le=1000, description="fst: epochs (the authors' 10)")
    fst_lr: float = Field(default=0.01, gt=0, le=10,
                          description="fst: learning rate, cosine-annealed over the epochs (the authors' 0.01)")
    fst_alpha: float = Field(default=0.1, ge=0, le=100,
                             description="fst: weight of the head's inner product with the suspect's (the authors' "
                                         "0.1 for CIFAR-10)")
    anp_eps: float = Field(default=0.4, gt=0, le=1,
                           description="anp: relative noise on each BatchNorm neuron's weight and bias, drawn from "
                                       "[-eps, eps], then moved anp_steps steps of eps/anp_steps up the loss")
    anp_steps: int = Field(default=1, ge=1, le=100, description="anp: signed-gradient steps of the noise per batch")
    anp_alpha: float = Field(default=0.2, ge=0, le=1,
                             description="anp: weight of the natural loss; 1 - anp_alpha weighs the loss under noise")
    anp_iterations: int = Field(default=2000, ge=1, le=100_000, description="anp: mask optimisation batches")
    anp_lr: float = Field(default=0.2, gt=0, le=10, description="anp: SGD learning rate of the masks (momentum 0.9)")
    anp_batch_size: int = Field(default=128, ge=2, le=4096,
                                description="anp: images per mask batch, drawn with replacement")
    anp_threshold: float = Field(default=0.2, ge=0, le=1,
                                 description="anp: neurons whose mask ends at or below this are pruned")
    ibau_rounds: int = Field(default=5, ge=1, le=1000,
                             description="ibau: rounds of (find the universal perturbation, one pass of unlearning)")
    ibau_lr: float = Field(default=0.001, gt=0, le=1, description="ibau: Adam learning rate of the weights")
    ibau_batch_size: int = Field(default=100, ge=2, le=4096, description="ibau: images per unlearning batch")
    ibau_norm: float = Field(default=10.0, gt=0, le=1000,
                             description="ibau: bound on the perturbation's L2 norm, in pixels in [0, 1]")
    sau_epochs: int = Field(default=10, ge=1, le=1000,
                            description="sau: passes over the clean data (the authors': 100)")
    sau_lr: float = Field(default=0.0007, gt=0, le=1,
                          description="sau: Adam learning rate of the weights, cosine-annealed over the epochs (the "
                                      "authors': 0.0001)")
    sau_batch_size: int = Field(default=256, ge=2, le=4096, description="sau: images per unlearning batch")
    sau_bound: float = Field(default=0.2, gt=0, le=1,
                             description="sau: bound on each image's perturbation (L-infinity, pixels in [0, 1])")
    sau_anchor_epochs: int = Field(
        default=2, ge=0, le=1000,
        description="sau: first epochs whose clean term distils the suspect's own predictions on the clean images "
                    "instead of fitting their labels; it keeps well-trained models' accuracy (0: the authors' loss). "
                    "A retry (after an epoch whose shared loss ended saturated) distils in every epoch",
    )
    sau_warp: float | None = Field(
        default=None, ge=0, le=8,
        description="sau: the second half of each batch searches smooth warps (WaNet's 4x4 control offsets, each "
                    "within this strength, WaNet's s) instead of additive perturbations, for backdoors that fire on "
                    "resampled images (0: additive only, the authors'; default: 1 when the suspect sends at least "
                    "half of the clean images into one class once they are shifted half a pixel, else 0, said in "
                    "the report's resampling)",
    )
    layers: list[str] | None = Field(default=None, description="module names to distil; default: the arch's own")
    betas: list[float] | None = Field(default=None, description="one weight per layer; default: the arch's own")
    augment: bool = Field(default=True, description="random crop (padding 4) and horizontal flip while training")
    seed: int = 0
    mode: Mode = Field(
        default="fast",
        description="fast: the same computation laid out for speed (channels_last, bf16 autocast and large "
        "evaluation batches on a GPU, full training batches only, but for ibau's rounds); reference: the authors' "
        "execution (eager fp32, evaluation batch 64, every image every epoch but a last batch of one, which batch "
        "norm cannot train on)",
    )
    target_label: int | None = Field(default=None, ge=0, description="the attack's target class, for ASR")
    trigger: TriggerSpec | None = Field(default=None, description="a trigger applied to the clean test set for ASR")

    @field_validator("auto_candidates", "classes")
    @classmethod
    def _once_each(cls, names: list[str] | None) -> list[str] | None:
        """A method runs once (its stages and report rows are named by it), and a class has one label."""
        repeated = sorted({name for name in names or [] if names.count(name) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} named more than once")
        return names

    @property
    def teacher_unused(self) -> str | None:
        """Why a supplied teacher would go unused, or None where it is used: nad distils from a teacher and
        finetune is one (each fine-tunes its own unless given one), and auto runs them as candidates. A
        teacher sent to another method was loaded and ignored without a word."""
        methods = self.auto_candidates if self.method == "auto" else [self.method]
        if {"nad", "finetune"} & set(methods):
            return None
        return (f"method {self.method} uses no teacher (nad and finetune do, and auto with either as a "
                "candidate); leave the teacher out, or choose one of those")

    @model_validator(mode="after")
    def _consistent(self) -> SanitizeParams:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(f"classes lists {len(self.classes)} names but num_classes is {self.num_classes}")
        if self.betas is not None and self.layers is not None and len(self.betas) != len(self.layers):
            raise ValueError(f"{len(self.betas)} betas for {len(self.layers)} layers: give one beta per layer")
        if self.target_label is not None and self.target_label >= self.num_classes:
            raise ValueError(f"target_label {self.target_label} is not below num_classes {self.num_classes}")
        if self.trigger is not None and self.target_label is None:
            raise ValueError("a trigger needs target_label")
        return self
