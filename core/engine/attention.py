"""Attention maps and the attention-transfer loss that NAD distils with (Zagoruyko & Komodakis 2017)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6


def attention_map(features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """sum_c |F_c|^p with the NAD paper's p = 2, divided by its L2 norm over the spatial dimensions: N x 1 x H x W.
    |F|^2 is computed as F^2, one operation instead of two each way: the same values and gradients to the bit,
    and a student's step 3 % faster on a CPU (docs/benchmarks.md).

    `size` pools the map to a smaller spatial size before normalising, so that teacher and student maps of
    different resolutions can still be compared.
    """
    amap = features.float().square().sum(dim=1, keepdim=True)
    if size is not None and tuple(amap.shape[-2:]) != size:
        amap = F.adaptive_avg_pool2d(amap, size)
    return amap / (amap.norm(dim=(2, 3), keepdim=True) + EPS)


def attention_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], betas: Sequence[float]
) -> torch.Tensor:
    """sum_i beta_i * MSE(A(student_i), A(teacher_i)). Gradient flows into the student's features only: the
    teacher's are detached here, whatever the caller passes."""
    total = student[0].new_zeros(())
    for s, t, beta in zip(student, teacher, betas, strict=True):
        size = tuple(min(a, b) for a, b in zip(s.shape[-2:], t.shape[-2:], strict=True))
        total = total + beta * F.mse_loss(attention_map(s, size), attention_map(t.detach(), size))
    return total


@contextmanager
def tap(model: nn.Module, layers: Sequence[str]) -> Iterator[list[torch.Tensor | None]]:
    """Record the outputs of the named modules on every forward pass, in `layers` order.

    The yielded list is overwritten in place by each forward, so read it right after calling the model.
    """
    modules = dict(model.named_modules())
    outputs: list[torch.Tensor | None] = [None] * len(layers)

    def recorder(index: int):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            outputs[index] = output

        return hook

    handles = [modules[name].register_forward_hook(recorder(i)) for i, name in enumerate(layers)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
