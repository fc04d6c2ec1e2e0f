"""The training loop every defense shares: SGD with nesterov momentum, a step learning-rate schedule, batched
crop-and-flip augmentation on uint8 tensors, progress events and cooperative cancellation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.engine.errors import Cancelled
from core.engine.events import Event, EventSink

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
CROP_PADDING = 4

# An objective maps a batch (inputs, labels) to (loss to minimise, named parts to log, logits).
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class Recipe:
    """How long and how fast to train. The lr is divided by 10 from each milestone epoch (0-based) on, or,
    with `cosine`, follows a cosine from `lr` towards 0 over the epochs (PyTorch's CosineAnnealingLR stepped
    once an epoch). With `sam_rho`, the steps of epoch `sam_from` (0-based) on are sharpness-aware
    (`sharpness_aware_gradients`)."""

    epochs: int
    lr: float
    milestones: tuple[int, ...] = ()
    batch_size: int = 64
    augment: bool = True
    seed: int = 0
    weight_decay: float = WEIGHT_DECAY
    cosine: bool = False
    nesterov: bool = True
    sam_rho: float = 0.0
    sam_from: int = 0

    def sharpness_aware(self, epoch: int) -> bool:
        return self.sam_rho > 0 and epoch >= self.sam_from

    def lr_at(self, epoch: int) -> float:
        if self.cosine:
            return self.lr * (1 + math.cos(math.pi * epoch / self.epochs)) / 2
        return self.lr / 10 ** sum(epoch >= m for m in self.milestones)


@dataclass(frozen=True)
class Normalization:
    """Maps uint8 images to the model's input: x / 255, then (x - mean) / std when given."""

    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.standardize(to_pixels(images))

    def standardize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float pixels in [0, 1] (an image with a perturbation added, say) to the model's input."""
        if self.mean is None or self.std is None:
            return pixels
        mean = torch.tensor(self.mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as float pixels in [0, 1], where perturbations are measured whatever the model's
    normalisation."""
    return images.float().div_(255)


def logits_on_pixels(model: nn.Module, pixels: torch.Tensor, normalize: Normalization,
                     execution: Execution) -> torch.Tensor:
    """A model's logits on float pixels in [0, 1] (perturbed or not), normalised as the model expects."""
    return model(execution.inputs(normalize.standardize(pixels)))


@dataclass(frozen=True)
class Execution:
    """How the arithmetic is laid out, never what it computes: the `mode` parameter.

    `fast` keeps activations in channels_last (about 1.2x faster convolutions on this project's CPUs, more
    on GPUs), autocasts to bf16 on a GPU only (on CPUs bf16 is many times slower), evaluates in batches of
    1024 images of 32 x 32 on a GPU and of 64 on a CPU (larger ones fall out of a CPU's caches: 256 ran 1.4x
    slower on a Xeon; fewer of larger images), and trains on full batches only (the last, partial batch of an
    epoch is dropped: one shape throughout, so no kernel is planned or compiled twice). docs/benchmarks.md has
    the measurements.
    `reference` is the authors' execution: eager fp32 in NCHW, evaluation batch 64 (of 32 x 32 images), every
    image every epoch.
    """

    channels_last: bool = False
    bf16: bool = False
    eval_batch: int = 64
    static_shapes: bool = False

    @classmethod
    def for_mode(cls, mode: str, device: torch.device, input_size: int) -> Execution:
        """Evaluation batches of larger images hold fewer of them, as many pixels as a batch of 32 x 32
        images: a batch of 256 at 1024 x 1024 is 17 GB in WRN-16-1's first layer alone (256 x 16 x 1024^2 x 4
        bytes), and such a job ran a machine out of memory measuring its images. On a CPU, as many pixels as
        256 such images, at most 64 images: a torchvision ResNet-18 measures 224 x 224 images 1.4x faster
        five at a time than one at a time."""
        if mode == "reference":
            return cls(eval_batch=_scaled(64, input_size))
        gpu = device.type == "cuda"
        return cls(channels_last=True, bf16=gpu,
                   eval_batch=_scaled(1024, input_size) if gpu else min(64, _scaled(256, input_size)),
                   static_shapes=True)

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)


def _scaled(batch: int, input_size: int) -> int:
    """`batch` images of 32 x 32 (or smaller), as a count of `input_size` images of as many pixels."""
    return batch if input_size <= 32 else max(1, batch * 32 * 32 // input_size**2)


@dataclass
class Watch:
    """Who is told about progress, and the share of the whole job this training run covers."""

    stage: str
    on_event: EventSink
    should_stop: Callable[[], bool]
    start: float = 0.0
    end: float = 1.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def at(self, fraction: float) -> float:
        return self.start + (self.end - self.start) * fraction


def to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC array -> uint8 NCHW tensor on `device` (kept as uint8: four times smaller than float)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)


@dataclass(frozen=True)
class Step:
    """One training batch: the images' indices and, when augmenting, each image's crop offsets and flip."""

    index: torch.Tensor
    dy: torch.Tensor | None = None
    dx: torch.Tensor | None = None
    flip: torch.Tensor | None = None


def plan_epoch(n: int, recipe: Recipe, generator: torch.Generator, device: torch.device,
               static_shapes: bool) -> list[Step]:
    """The epoch's shuffled batches and augmentation draws, drawn on the CPU in one fixed order (the
    permutation, then per batch: rows, columns, flips) and moved to the device in one copy, so the epoch's
    steps wait on no transfer. A last batch of one image is dropped (batch norm cannot train on it); with
    `static_shapes`, any partial last batch is."""
    batches = list(torch.randperm(n, generator=generator).split(recipe.batch_size))
    if len(batches) > 1 and (len(batches[-1]) == 1 or (static_shapes and len(batches[-1]) < recipe.batch_size)):
        batches.pop()
    sizes = [len(batch) for batch in batches]
    rows = [torch.cat(batches)]
    if recipe.augment:
        rows += list(torch.cat([draw_augmentation(m, generator) for m in sizes], dim=1))
    columns = [row.split(sizes) for row in torch.stack(rows).to(device)]
    return [Step(*parts) for parts in zip(*columns, strict=True)]


def draw_augmentation(m: int, generator: torch.Generator) -> torch.Tensor:
    """Crop rows, crop columns and flips (0 or 1) for `m` images, drawn in that order: a 3 x m tensor."""
    span = 2 * CROP_PADDING + 1
    return torch.stack([torch.randint(0, span, (m,), generator=generator),
                        torch.randint(0, span, (m,), generator=generator),
                        (torch.rand(m, generator=generator) < 0.5).long()])


def augment(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop with zero padding at offsets (dy, dx) and flip horizontally where `flip` is 1, for a whole uint8
    NCHW batch at once."""
    n, c, h, w = images.shape
    padded = F.pad(images, (CROP_PADDING,) * 4)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    cropped = padded[batch, channel, rows, cols]
    return torch.where(flip.bool()[:, None, None, None], cropped.flip(3), cropped)


def cross_entropy(model: nn.Module) -> Objective:
    def objective(inputs: torch.Tensor, labels: torch.Tensor):
        logits = model(inputs)
        loss = F.cross_entropy(logits, labels)
        return loss, {"ce_loss": loss}, logits

    return objective


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    objective: Objective,
    recipe: Recipe,
    normalize: Normalization,
    watch: Watch,
    execution: Execution,
) -> list[dict[str, Any]]:
    """Train `model` in place on uint8 `images`; returns one history row per epoch.

    Checks `watch.should_stop()` before every epoch and raises Cancelled when it turns true, so a model is
    never left half-way through an epoch.
    """
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=MOMENTUM, weight_decay=recipe.weight_decay,
        nesterov=recipe.nesterov,
    )
    rows = []
    for epoch in range(recipe.epochs):
        lr = begin_epoch(epoch, recipe, optimizer, watch)
        rows.append(_epoch(model, images, labels, objective, recipe, normalize, execution, watch, optimizer,
                           generator, epoch))
        rows[-1].update(stage=watch.stage, epoch=epoch + 1, epochs=recipe.epochs, lr=lr)
        watch.history.append(rows[-1])
        watch.on_event(
            Event(watch.stage, watch.at((epoch + 1) / recipe.epochs), epoch=epoch + 1, epochs=recipe.epochs,
                  loss=rows[-1]["loss"], lr=lr)
        )
    return rows


def begin_epoch(epoch: int, recipe: Recipe, optimizer: torch.optim.Optimizer, watch: Watch) -> float:
    """Before epoch `epoch` (0-based): raise Cancelled when the watcher asks to stop, else set the optimizer's
    learning rate to the recipe's for that epoch and return it."""
    if watch.should_stop():
        raise Cancelled(f"cancelled before {watch.stage} epoch {epoch + 1}")
    lr = recipe.lr_at(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, objective: Objective, recipe: Recipe,
           normalize: Normalization, execution: Execution, watch: Watch, optimizer: torch.optim.Optimizer,
           generator: torch.Generator, epoch: int) -> dict[str, Any]:
    """One epoch of `train`; returns its history row: the mean of each loss part and the training accuracy."""
    model.train()
    sharp = recipe.sharpness_aware(epoch)
    steps = plan_epoch(len(images), recipe, generator, images.device, execution.static_shapes)
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=images.device)
    seen = 0
    for number, step in enumerate(steps, start=1):
        index = step.index
        batch = augment(images[index], step.dy, step.dx, step.flip) if recipe.augment else images[index]
        target = labels[index]
        inputs = execution.inputs(normalize(batch))
        with execution.autocast(images.device):
            loss, parts, logits = objective(inputs, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sharp:
            sharpness_aware_gradients(model, objective, inputs, target, recipe.sam_rho, execution)
        optimizer.step()
        for name, value in {"loss": loss, **parts}.items():
            sums[name] = sums.get(name, 0) + value.detach() * len(index)
        correct += (logits.argmax(1) == target).sum()
        seen += len(index)
        fraction = (epoch + number / len(steps)) / recipe.epochs
        watch.on_event(Event(watch.stage, watch.at(fraction), epoch=epoch + 1, epochs=recipe.epochs,
                             step=number))
    row = {name: float(total) / seen for name, total in sums.items()}
    row["train_acc"] = 100.0 * float(correct) / seen
    return row


def sharpness_aware_gradients(model: nn.Module, objective: Objective, inputs: torch.Tensor, labels: torch.Tensor,
                              rho: float, execution: Execution) -> None:
    """Replace the gradients of the batch's loss at the weights w, already in `.grad`, by its gradients at w + e,
    the first-order worst case within radius `rho` in adaptive SAM's scale-invariant measure (Kwon et al.,
    2021): e = rho * w^2 g / ||w g||. This is FT-SAM's step (Zhu et al., ICCV 2023). Its observation: a
    backdoor lives in a few neurons of large weight norm, the perturbation, scaled by the weights, falls
    hardest on them, and fine-tuning with it shrinks them where plain fine-tuning leaves them. The weights are
    back at w when it returns, so the optimizer's step applies the new gradients to w; the second forward pass
    leaves BatchNorm's running statistics as the first left them."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack([(p.abs() * p.grad).norm() for p in parameters]))
        weights = [p.detach().clone() for p in parameters]
        for p in parameters:
            p.add_(p.square() * p.grad * (rho / (norm + 1e-12)))
    for p in parameters:
        p.grad = None
    with frozen_batch_norm_statistics(model), execution.autocast(inputs.device):
        worst, _, _ = objective(inputs, labels)
    worst.backward()
    with torch.no_grad():
        for p, weight in zip(parameters, weights, strict=True):
            p.copy_(weight)


@contextmanager
def frozen_batch_norm_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode normalise with the batch's statistics but leave their running
    statistics (and batch count) as they are."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(layers, saved, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)
