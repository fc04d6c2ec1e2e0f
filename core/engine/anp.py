"""Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021): prune the neurons whose perturbation most raises the
loss on clean data. A backdoored network's trigger neurons are unusually sensitive: under small adversarial
changes of their weights the network starts predicting the target class even without the trigger. ANP learns
a mask m in [0, 1] per BatchNorm neuron that keeps the clean loss low while that neuron's weight and bias are
adversarially perturbed; neurons whose mask the optimisation drives to (near) zero are pruned.

Followed from the authors' code (github.com/csdongxian/ANP_backdoor: `optimize_mask_cifar.py`,
`prune_neuron_cifar.py`, `models/anp_batchnorm.py`), where it differs from a plain reading of the paper:

- A BatchNorm layer computes `BN(x; weight * (m + delta), bias * (1 + xi))` under perturbation and
  `BN(x; weight * m, bias)` without: the mask scales the weight only.
- Each batch the noise (delta, xi) is drawn uniformly from [-eps, eps], then `steps` steps of
  `eps / steps` along the sign of the loss's gradient are taken. The noise is never projected back into
  [-eps, eps], so after the default single step it may reach 2 * eps.
- The mask's loss is `alpha * natural + (1 - alpha) * perturbed`, both on the same batch; SGD lr 0.2, momentum
  0.9, no weight decay; the mask is clipped to [0, 1] after every step.
- The network runs in training mode: BatchNorm normalises with each batch's statistics (and dropout, where a
  model has it, is on). The authors' running statistics drift meanwhile but are thrown away, as their pruning
  script reloads the original checkpoint; here they are not updated at all, which leaves the same model.
- Batches are 128 images drawn with replacement from the clean data, cropped and flipped; 2000 of them.
- Pruning sets the BatchNorm *weight* of each neuron whose mask is at or below the threshold to zero and keeps
  its bias, as `prune_neuron_cifar.py` does: the neuron then emits a constant. That script evaluates a sweep
  of thresholds (0 to 0.9 in steps of 0.05, on mask values rounded to 4 decimals) rather than fixing one; the
  default here, 0.2, is the paper's, and the exact mask values are compared.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from core.engine.errors import Cancelled
from core.engine.events import Event
from core.engine.training import MOMENTUM, Execution, Normalization, Watch, augment, draw_augmentation

# The BatchNorm kinds the authors perturb (their NoisyBatchNorm2d and NoisyBatchNorm1d).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# Iterations between cancellation checks and history rows.
ROUND = 50


@dataclass(frozen=True)
class AnpRecipe:
    """ANP's settings: the noise size `eps` and its `steps` signed-gradient steps per batch, the natural loss's
    weight `alpha`, the mask's SGD (`iterations` batches of `batch_size`, `lr`), and the pruning threshold."""

    eps: float
    steps: int
    alpha: float
    iterations: int
    lr: float
    batch_size: int
    threshold: float
    augment: bool = True
    seed: int = 0


def batch_norms(model: nn.Module) -> dict[str, nn.Module]:
    """The model's BatchNorm layers with a weight and bias, by module name: ANP's neurons are their channels. A
    model without any cannot be pruned (`methods.unsuitable` says so before any work)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, BATCH_NORMS) and module.affine}


class Perturbation:
    """Every neuron's mask, and the noise on its weight (row 0) and bias (row 1), as flat tensors that the
    layers read their slices of: one optimiser step, one clip, one gradient for all layers together."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.sizes = [layer.num_features for layer in layers.values()]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        device = next(iter(layers.values())).weight.device
        self.mask = torch.ones(sum(self.sizes), device=device, requires_grad=True)
        self.noise = torch.zeros(2, sum(self.sizes), device=device)
        self.on = False

    def masks(self) -> list[torch.Tensor]:
        """Each layer's mask, in the order of `layers`."""
        return list(self.mask.detach().split(self.sizes))

    def draw_noise(self, eps: float, generator: torch.Generator) -> None:
        """The start of each batch's search: uniform in [-eps, eps], drawn on the CPU for reproducibility."""
        uniform = torch.rand(self.noise.shape, generator=generator) * 2 - 1
        self.noise = (eps * uniform).to(self.mask.device).requires_grad_()

    def ascend(self, loss: torch.Tensor, step: float) -> None:
        """One signed-gradient step of the noise up the loss (the authors' SGD step on -loss with sign grads)."""
        (gradient,) = torch.autograd.grad(loss, self.noise)
        self.noise = (self.noise + step * gradient.sign()).detach().requires_grad_()

    def clip(self) -> None:
        with torch.no_grad():
            self.mask.clamp_(0.0, 1.0)


class _Coefficient(nn.Module):
    """A parametrization of one layer's weight or bias, reading that layer's slice of the shared state."""

    def __init__(self, state: Perturbation, index: int) -> None:
        super().__init__()
        self.state = state
        self.part = slice(state.offsets[index], state.offsets[index] + state.sizes[index])


class _Weight(_Coefficient):
    """weight * (m + delta) under perturbation, weight * m without."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.state.mask[self.part]
        return weight * (mask + self.state.noise[0, self.part] if self.state.on else mask)


class _Bias(_Coefficient):
    """bias * (1 + xi) under perturbation, the bias itself without."""

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return bias * (1 + self.state.noise[1, self.part]) if self.state.on else bias


@contextmanager
def perturbable(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[Perturbation]:
    """The model with masks and noise on its BatchNorm layers, for the duration of the block only.

    Parametrizations wrap each layer's weight and bias and are removed on the way out, with the original
    tensors put back, so the model keeps its modules, classes and state-dict keys. Meanwhile its own
    parameters are frozen (only the mask learns; no gradient is computed for them), it runs in training
    mode as the authors' does, and every normalisation layer normalises with batch statistics without updating
    its running ones: the perturbed layers, and those ANP does not prune (without weight and bias, say), whose
    statistics would otherwise drift over thousands of noisy batches and stay in the returned model (the
    authors prune a fresh load of the checkpoint). All of this is undone on the way out, also when the block
    raises (Cancelled included)."""
    state = Perturbation(layers)
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    tracking = [module for module in model.modules() if getattr(module, "track_running_stats", False)]
    training = model.training
    try:
        model.requires_grad_(False)
        model.train()
        for module in tracking:
            module.track_running_stats = False
        for index, layer in enumerate(layers.values()):
            parametrize.register_parametrization(layer, "weight", _Weight(state, index))
            parametrize.register_parametrization(layer, "bias", _Bias(state, index))
        yield state
    finally:
        for layer in layers.values():
            for name in ("weight", "bias"):
                if parametrize.is_parametrized(layer, name):
                    parametrize.remove_parametrizations(layer, name, leave_parametrized=False)
        for module in tracking:
            module.track_running_stats = True
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)
        model.train(training)


def draw_batch(images: torch.Tensor, labels: torch.Tensor, recipe: AnpRecipe, generator: torch.Generator,
               normalize: Normalization, execution: Execution) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` images drawn with replacement (the authors' RandomSampler), cropped and flipped when
    `recipe.augment`, as model inputs, with their labels."""
    index = torch.randint(len(images), (recipe.batch_size,), generator=generator).to(images.device)
    batch = images[index]
    if recipe.augment:
        dy, dx, flip = draw_augmentation(recipe.batch_size, generator).to(images.device)
        batch = augment(batch, dy, dx, flip)
    return execution.inputs(normalize(batch)), labels[index]


def mask_step(model: nn.Module, state: Perturbation, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
              labels: torch.Tensor, recipe: AnpRecipe, generator: torch.Generator,
              execution: Execution) -> dict[str, torch.Tensor]:
    """One ANP iteration: find the batch's worst noise, then step the mask on the weighted natural and
    perturbed losses and clip it to [0, 1]. Returns the losses and the clean predictions' hits. Only the
    forward passes are autocast; gradients are taken outside, as PyTorch advises."""

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        with execution.autocast(inputs.device):
            logits = model(inputs)
        return F.cross_entropy(logits.float(), labels), logits

    state.draw_noise(recipe.eps, generator)
    state.on = True
    for _ in range(recipe.steps):
        state.ascend(forward()[0], recipe.eps / recipe.steps)
    state.noise = state.noise.detach()
    perturbed, _ = forward()
    state.on = False
    natural, logits = forward()
    loss = recipe.alpha * natural + (1 - recipe.alpha) * perturbed
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    state.clip()
    return {"loss": loss.detach(), "nat_loss": natural.detach(), "rob_loss": perturbed.detach(),
            "correct": (logits.argmax(1) == labels).sum()}


def optimize_masks(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor, labels: torch.Tensor,
                   recipe: AnpRecipe, normalize: Normalization, watch: Watch,
                   execution: Execution) -> list[torch.Tensor]:
    """Learn each layer's neuron mask on the clean uint8 `images`; the model is left as it was.

    Checks `watch.should_stop()` every ROUND iterations and raises Cancelled when it turns true; appends a
    history row and sends an event with the round's mean losses at the end of each round."""
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)  # dropout, in models that have it
    with perturbable(model, layers) as state:
        optimizer = torch.optim.SGD([state.mask], lr=recipe.lr, momentum=MOMENTUM)
        for start in range(0, recipe.iterations, ROUND):
            if watch.should_stop():
                raise Cancelled(f"cancelled before {watch.stage} iteration {start + 1}")
            stop = min(start + ROUND, recipe.iterations)
            sums: dict[str, torch.Tensor] = {}
            for iteration in range(start + 1, stop + 1):
                inputs, target = draw_batch(images, labels, recipe, generator, normalize, execution)
                parts = mask_step(model, state, optimizer, inputs, target, recipe, generator, execution)
                sums = {name: sums.get(name, 0) + value for name, value in parts.items()}
                watch.on_event(Event(watch.stage, watch.at(iteration / recipe.iterations), step=iteration))
            _record_round(watch, sums, stop - start, stop, recipe)
        return state.masks()


def _record_round(watch: Watch, sums: dict[str, torch.Tensor], count: int, stop: int, recipe: AnpRecipe) -> None:
    row: dict[str, Any] = {name: float(sums[name]) / count for name in ("loss", "nat_loss", "rob_loss")}
    row.update(train_acc=100.0 * float(sums["correct"]) / (count * recipe.batch_size), stage=watch.stage, step=stop,
               steps=recipe.iterations, lr=recipe.lr)
    watch.history.append(row)
    watch.on_event(Event(watch.stage, watch.at(stop / recipe.iterations), step=stop, loss=row["loss"],
                         lr=recipe.lr))


def prune(layers: dict[str, nn.Module], masks: list[torch.Tensor], threshold: float) -> dict[str, Any]:
    """Zero the BatchNorm weight of every neuron whose mask is at or below `threshold` (the authors' `<=`);
    returns how many neurons of how many were pruned, overall and per layer."""
    per_layer = {}
    with torch.no_grad():
        for (name, layer), mask in zip(layers.items(), masks, strict=True):
            pruned = mask <= threshold
            layer.weight[pruned] = 0.0
            per_layer[name] = {"pruned": int(pruned.sum()), "neurons": len(mask)}
    return {"threshold": threshold, "pruned": sum(row["pruned"] for row in per_layer.values()),
            "neurons": sum(row["neurons"] for row in per_layer.values()), "layers": per_layer}


def adversarial_neuron_pruning(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: AnpRecipe,
                               normalize: Normalization, watch: Watch, execution: Execution) -> dict[str, Any]:
    """Prune `model` in place: learn the masks of its BatchNorm layers (there are some: `methods.unsuitable`
    refuses such a model before any work) on the clean data, then zero the weights of the neurons
    whose mask fell to the threshold. Returns what `prune` reports. The layers are looked up on `model`
    itself: `auto` cleans a copy of the suspect, and pruning the suspect's layers instead would touch the
    model every later candidate starts from."""
    layers = batch_norms(model)
    masks = optimize_masks(model, layers, images, labels, recipe, normalize, watch, execution)
    return prune(layers, masks, recipe.threshold)
