"""The defenses that train: fine-tuning on clean data, Neural Attention Distillation (Li et al., ICLR 2021) and
Feature Shift Tuning (Min et al., NeurIPS 2023)."""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.engine.attention import attention_loss, tap
from core.engine.models import Distillation, classifier_head
from core.engine.training import Execution, Normalization, Objective, Recipe, Watch, cross_entropy, train


def finetune(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe,
             normalize: Normalization, watch: Watch, execution: Execution) -> list[dict[str, Any]]:
    """Plain fine-tuning with cross-entropy: the baseline, and how NAD's teacher is made."""
    return train(model, images, labels, cross_entropy(model), recipe, normalize, watch, execution)


def feature_shift_tuning(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe,
                         alpha: float, normalize: Normalization, watch: Watch,
                         execution: Execution) -> list[dict[str, Any]]:
    """Feature Shift Tuning (Min et al., NeurIPS 2023): re-initialise the classifier head, then fine-tune the
    whole model with cross-entropy plus `alpha` times the inner product of the head's weights with the
    suspect model's, the head's norm held at the original's. Pushing the head away from the compromised one
    makes the features shift too, which plain fine-tuning on a few clean images does not do when the backdoor
    is entangled with clean features.

    As the authors' code (`fine_tune/ft.py`, ft_mode fst): weight and bias drawn from U(-1/sqrt(fan_in),
    1/sqrt(fan_in)); the norm is restored after every step (here: before every step's forward, and once at
    the end, which is the same sequence of weights)."""
    head = classifier_head(model)
    original = head.weight.detach().clone()
    norm = original.norm()
    generator = torch.Generator().manual_seed(recipe.seed)
    bound = 1 / math.sqrt(head.in_features)
    with torch.no_grad():
        for parameter in (head.weight, head.bias):
            if parameter is not None:
                parameter.copy_(torch.empty(parameter.shape).uniform_(-bound, bound, generator=generator))

    def restore_norm() -> None:
        with torch.no_grad():
            head.weight.mul_(norm / head.weight.norm())

    def objective(inputs: torch.Tensor, labels: torch.Tensor):
        restore_norm()
        logits = model(inputs)
        ce = F.cross_entropy(logits, labels)
        shift = alpha * (head.weight * original).sum()
        return ce + shift, {"ce_loss": ce, "shift_loss": shift}, logits

    history = train(model, images, labels, objective, recipe, normalize, watch, execution)
    restore_norm()
    return history


def nad_objective(student: nn.Module, teacher: nn.Module, distillation: Distillation,
                  student_features: list, teacher_features: list) -> Objective:
    """Cross-entropy plus sum_i beta_i * MSE(A(student_i), A(teacher_i)); the teacher runs without gradient
    in evaluation mode, the student's attention term carries gradient."""

    def objective(inputs: torch.Tensor, labels: torch.Tensor):
        with torch.no_grad():
            teacher(inputs)
        logits = student(inputs)
        ce = F.cross_entropy(logits, labels)
        at = attention_loss(student_features, teacher_features, distillation.betas)
        return ce + at, {"ce_loss": ce, "at_loss": at}, logits

    return objective


def distill(student: nn.Module, teacher: nn.Module, distillation: Distillation, images: torch.Tensor,
            labels: torch.Tensor, recipe: Recipe, normalize: Normalization, watch: Watch,
            execution: Execution) -> list[dict[str, Any]]:
    """Fine-tune `student` in place, matching its attention maps to the frozen `teacher`'s."""
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    with ExitStack() as stack:
        student_features = stack.enter_context(tap(student, distillation.layers))
        teacher_features = stack.enter_context(tap(teacher, distillation.layers))
        objective = nad_objective(student, teacher, distillation, student_features, teacher_features)
        return train(student, images, labels, objective, recipe, normalize, watch, execution)
