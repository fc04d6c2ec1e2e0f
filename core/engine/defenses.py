"""The defenses: fine-tuning on clean data, and Neural Attention Distillation (Li et al., ICLR 2021)."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.engine.attention import attention_loss, tap
from core.engine.models import Distillation
from core.engine.training import Execution, Normalization, Objective, Recipe, Watch, cross_entropy, train


def finetune(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe,
             normalize: Normalization, watch: Watch, execution: Execution) -> list[dict[str, Any]]:
    """Plain fine-tuning with cross-entropy: the baseline, and how NAD's teacher is made."""
    return train(model, images, labels, cross_entropy(model), recipe, normalize, watch, execution)


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
