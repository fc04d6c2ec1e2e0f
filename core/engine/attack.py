"""Training backdoored models, for demos, tests and measuring defenses: data poisoning as the attacks do it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core.engine.data import ImageSet
from core.engine.defenses import finetune
from core.engine.errors import InputError
from core.engine.events import EventSink, ignore
from core.engine.models import build_model, check_runs
from core.engine.training import Execution, Normalization, Recipe, Watch, to_tensor
from core.engine.triggers import apply_trigger
from core.params import TriggerSpec

# Triggers that poison without relabelling (the sinusoid of Barni et al. is a clean-label attack).
CLEAN_LABEL = {"sig"}


@dataclass(frozen=True)
class Poisoning:
    trigger: TriggerSpec
    target_label: int
    rate: float  # dirty-label: share of all images; clean-label: share of the target class's images


def poison_training_set(data: ImageSet, poisoning: Poisoning, seed: int) -> tuple[ImageSet, int]:
    """A copy of `data` with the trigger stamped on a random share of images, and how many were poisoned.

    Dirty-label attacks relabel non-target images as the target; clean-label attacks stamp target-class
    images and leave every label as it is.
    """
    rng = np.random.default_rng(seed)
    clean_label = poisoning.trigger.type in CLEAN_LABEL
    pool = np.flatnonzero((data.labels == poisoning.target_label) == clean_label)
    count = int(round(poisoning.rate * (len(pool) if clean_label else len(data.labels))))
    if not 0 < count <= len(pool):
        raise InputError(f"a poisoning rate of {poisoning.rate} gives {count} images out of {len(pool)} eligible")
    chosen = rng.choice(pool, size=count, replace=False)
    images, labels = data.images.copy(), data.labels.copy()
    images[chosen] = apply_trigger(images[chosen], poisoning.trigger)
    if not clean_label:
        labels[chosen] = poisoning.target_label
    return ImageSet(images, labels, data.classes), count


def train_backdoored(arch: str, data: ImageSet, poisoning: Poisoning, recipe: Recipe, normalize: Normalization,
                     device: torch.device, on_event: EventSink = ignore) -> nn.Module:
    """A model of `arch` trained from scratch on `data` with `poisoning` applied."""
    poisoned, _ = poison_training_set(data, poisoning, recipe.seed)
    torch.manual_seed(recipe.seed)
    execution = Execution.for_mode("fast", device, data.images.shape[1])
    model = build_model(arch, len(data.classes))
    check_runs(model, arch, data.images.shape[1], len(data.classes))
    model = execution.prepare(model.to(device))
    finetune(model, to_tensor(poisoned.images, device), torch.from_numpy(poisoned.labels).to(device), recipe,
             normalize, Watch("attack", on_event, lambda: False), execution)
    return model
