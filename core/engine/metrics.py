"""Clean accuracy (ACC), attack success rate (ASR) and per-class accuracy, in percent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from core.engine.training import Execution, Normalization, to_tensor


@torch.inference_mode()
def classify(model: nn.Module, images: torch.Tensor, normalize: Normalization, execution: Execution) -> torch.Tensor:
    """Predicted labels for uint8 NCHW images on the model's device, in evaluation mode."""
    return _batched(model, images, normalize, execution, lambda logits: logits.argmax(1), torch.long)


@torch.inference_mode()
def logits_of(model: nn.Module, images: torch.Tensor, normalize: Normalization, execution: Execution) -> torch.Tensor:
    """The model's logits (float32) for uint8 NCHW images on its device, in evaluation mode."""
    return _batched(model, images, normalize, execution, lambda logits: logits.float(), torch.float32)


def _batched(model: nn.Module, images: torch.Tensor, normalize: Normalization, execution: Execution,
             keep: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """`keep(logits)` of every evaluation batch, joined; `dtype` types the empty result of no images, which
    torch.cat cannot make."""
    model.eval()
    kept = []
    for start in range(0, len(images), execution.eval_batch):
        batch = images[start : start + execution.eval_batch]
        with execution.autocast(images.device):
            kept.append(keep(model(execution.inputs(normalize(batch)))))
    return torch.cat(kept) if kept else torch.zeros(0, dtype=dtype, device=images.device)


def predict(model: nn.Module, images: np.ndarray, normalize: Normalization, device: torch.device,
            execution: Execution) -> np.ndarray:
    """Predicted labels for uint8 NHWC images, moved to `device` one evaluation batch at a time."""
    step = execution.eval_batch
    return np.concatenate([classify(model, to_tensor(images[start : start + step], device), normalize, execution)
                           .cpu().numpy() for start in range(0, len(images), step)] or [np.zeros(0, dtype=np.int64)])


def percent(hits: np.ndarray) -> float:
    """The share of `hits`, in points to the hundredth (NaN for none), as reports give it."""
    return round(100.0 * float(hits.mean()), 2) if len(hits) else float("nan")


def clean_metrics(predictions: np.ndarray, labels: np.ndarray, classes: list[str],
                  target_label: int | None) -> dict[str, Any]:
    """ACC over all images, per class, and, when a target is known, over the non-target classes (the figure
    the NAD paper reports) and the ASR of the clean images themselves: the share of non-target images put in
    the target class without any trigger, the part of an ASR that ordinary errors account for (3 to 6 % on the
    NAD authors' model once cleansed, next to the efficacy target's 5 %: docs/results.md)."""
    hits = predictions == labels
    result: dict[str, Any] = {
        "acc": percent(hits),
        "per_class_acc": {name: percent(hits[labels == c]) for c, name in enumerate(classes) if (labels == c).any()},
    }
    if target_label is not None:
        result["acc_non_target"] = percent(hits[labels != target_label])
        result["asr_without_trigger"] = attack_success_rate(predictions, labels, target_label)
    return result


def attack_success_rate(predictions: np.ndarray, labels: np.ndarray, target_label: int) -> float:
    """Share of triggered images classified as the target, among those whose true class is not the target."""
    keep = labels != target_label
    return percent(predictions[keep] == target_label)
