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
from core.engine.metrics import logits_of
from core.engine.models import Distillation, classifier_head, find_classifier_head
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
    1/sqrt(fan_in)); the norm is restored after every step. Here it is restored before every step's forward
    and once at the end: the same rule but for the first step, which runs at the suspect's norm where the
    authors' runs at the draw's own, so the weights differ slightly from theirs from that step on."""
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
    in evaluation mode, the student's attention term carries gradient. The teacher runs once a batch: a
    sharpness-aware step asks for the same batch twice, and its features are still in `teacher_features`."""
    last: list[torch.Tensor] = []

    def objective(inputs: torch.Tensor, labels: torch.Tensor):
        if not last or last[0] is not inputs:
            with torch.no_grad():
                teacher(inputs)
            last[:] = [inputs]
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


def fit_class_bias(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Normalization,
                   execution: Execution) -> torch.Tensor | None:
    """Refit the classifier head's bias to the clean images, all other weights held: the shift that minimises
    the cross-entropy of the model's logits (evaluation mode, no augmentation) plus that shift, added to the
    bias; returns it, or None where there is no such bias (below). The problem is convex and, at its optimum,
    the model's mean predicted probability of each class on the images equals that class's share of them.

    Why: the last SGD steps leave each class's bias wherever the last batches pushed it, so the trained model
    over-predicts some class by chance; where that class is the attack's target, the over-prediction reads as
    ASR (on the NAD authors' model a student put 1,263 test images in the target class of 1,000, docs/results.md).
    Only the classes the images hold are refit, by shifts that sum to 0 (softmax ignores a common shift, and
    without that rule the fit would push every other class out): the images say nothing of another class's
    share. A model whose logits do not come from a linear layer with a bias is left as it is: `nad` still
    runs on it."""
    head = find_classifier_head(model)
    if head is None or head.bias is None:
        return None
    shift = torch.zeros(head.out_features)
    logits = logits_of(model, images, normalize, execution).cpu()
    target = labels.cpu()
    present = torch.unique(target)
    free = torch.zeros(len(present), requires_grad=True)
    optimizer = torch.optim.LBFGS([free], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits + torch.zeros_like(shift).index_put((present,), free - free.mean()), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    shift[present] = (free - free.mean()).detach()
    with torch.no_grad():
        head.bias.add_(shift.to(head.bias.device, head.bias.dtype))
    return shift
