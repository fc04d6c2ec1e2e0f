"""Architectures by name, each with the layers NAD distils by default.

The parameter layouts follow the code people actually train backdoored models with, so their checkpoints load
unchanged: WideResNet as in the widely used WideResNet-pytorch (the NAD authors' own), PreAct-ResNet18 as in
BackdoorBench, ResNet18 as in the common CIFAR form (3x3 stem, no max-pool), and any classification model of
torchvision by its name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from core.engine.attention import tap
from core.engine.data import error_reason
from core.engine.errors import InputError

# The NAD authors' betas for WRN-16-1's three residual groups; used for every arch's three default layers.
DEFAULT_BETAS = (500.0, 1000.0, 1000.0)


class WideBasicBlock(nn.Module):
    """Pre-activation block of WideResNet-pytorch; attribute names are part of the checkpoint format."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class WideGroup(nn.Module):
    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
              for i in range(blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise InputError(f"WideResNet depth must be 6n+4 (10, 16, 22, 28, 40...), not {depth}")
        blocks = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.block1 = WideGroup(blocks, channels[0], channels[1], 1)
        self.block2 = WideGroup(blocks, channels[1], channels[2], 2)
        self.block3 = WideGroup(blocks, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet18 in its CIFAR form; `preact` selects BackdoorBench's PreAct-ResNet18 (final bn before pooling)."""

    def __init__(self, num_classes: int, preact: bool) -> None:
        super().__init__()
        block = PreActBlock if preact else BasicBlock
        self.preact = preact
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        if not preact:
            self.bn1 = nn.BatchNorm2d(64)
        planes, stages = 64, []
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(block(planes, width, stride), block(width, width, 1)))
            planes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        if preact:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x) if self.preact else F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn(out))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@dataclass(frozen=True)
class Distillation:
    """Which module outputs NAD matches, and how strongly."""

    layers: tuple[str, ...]
    betas: tuple[float, ...]


_WRN = re.compile(r"wrn-(\d+)-(\d+)")


def torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def arch_names() -> list[str]:
    """What `build_model` accepts, for error messages and docs."""
    examples = ", ".join(torchvision_names()[:5])
    return [
        "wrn-D-W (e.g. wrn-16-1, wrn-28-10)",
        "preact-resnet18",
        "resnet18 (CIFAR form)",
        f"any torchvision classification model by name (torchvision.resnet18 for its ImageNet form): {examples}, ...",
    ]


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised model of the named architecture."""
    if match := _WRN.fullmatch(arch):
        return WideResNet(int(match[1]), int(match[2]), num_classes)
    if arch == "preact-resnet18":
        return CifarResNet18(num_classes, preact=True)
    if arch == "resnet18":
        return CifarResNet18(num_classes, preact=False)
    name = arch.removeprefix("torchvision.")
    if name in torchvision_names():
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise InputError(f"unknown architecture {arch!r}; known: " + "; ".join(arch_names()))


def check_runs(model: nn.Module, arch: str, input_size: int, num_classes: int) -> None:
    """Refuse, before any work, a model that cannot classify `input_size` images as training needs: some
    torchvision models take only their own size (a ViT's 224), some need more pixels than a CIFAR image has
    (Inception), some answer in training mode with more than class scores (GoogLeNet's auxiliary outputs).
    They failed mid-job as an internal error. A training-mode pass moves BatchNorm's statistics: the buffers are
    put back after it (a copy of the whole model would double a large one's memory for the check)."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    was_training = model.training
    images = torch.zeros(2, 3, input_size, input_size, device=next(model.parameters()).device)
    try:
        for training in (False, True):
            _check_answers(model, training, images, arch, num_classes)
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        model.train(was_training)


def _check_answers(model: nn.Module, training: bool, images: torch.Tensor, arch: str, num_classes: int) -> None:
    model.train(training)
    try:
        with torch.no_grad():
            scores = model(images)
    except Exception as error:  # the model's own assertion or shape error says what does not fit
        size = images.shape[-1]
        raise InputError(f"{arch} cannot classify {size}x{size} images ({error_reason(error)}); "
                         "set input_size to the size it takes, or choose another arch") from None
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (2, num_classes):
        raise InputError(f"{arch} answers a {type(scores).__name__} in {'training' if training else 'evaluation'} "
                         f"mode, not {num_classes} class scores an image; choose another arch")


def overwritten(model: nn.Module) -> set[str]:
    """The modules whose output the next module of their nn.Sequential overwrites in place (VGG's convolutions,
    each followed by ReLU(inplace=True)). What a hook records of such a module is, once the forward pass is
    done, the next module's output, the very same tensor: NAD would distil one map twice and the named one
    never."""
    names = set()
    for prefix, parent in model.named_modules():
        if isinstance(parent, nn.Sequential):
            names.update(f"{prefix}.{name}" if prefix else name
                         for (name, _), (_, following) in pairwise(parent.named_children())
                         if getattr(following, "inplace", False))
    return names


def default_layers(arch: str, model: nn.Module) -> tuple[str, ...]:
    """The three residual groups' outputs, as in the NAD paper; for other torchvision models the last three
    modules of `features` whose output is not overwritten in place."""
    if _WRN.fullmatch(arch):
        return ("block1", "block2", "block3")
    names = dict(model.named_children())
    if {"layer2", "layer3", "layer4"} <= names.keys():
        return ("layer2", "layer3", "layer4")
    features = names.get("features")
    lost = overwritten(model)
    kept = [name for name in (f"features.{child}" for child, _ in features.named_children()) if name not in lost] \
        if isinstance(features, nn.Sequential) else []
    if len(kept) >= 3:
        return tuple(kept[-3:])
    raise InputError(f"no default distillation layers for {arch!r}: choose them with `layers` (module names)")


def choose_distillation(
    arch: str, model: nn.Module, layers: list[str] | None, betas: list[float] | None
) -> Distillation:
    """The layers and betas a job distils with, checked against the model's module names."""
    chosen = tuple(layers) if layers else default_layers(arch, model)
    modules = dict(model.named_modules())
    unknown = [name for name in chosen if name not in modules]
    if unknown:
        known = ", ".join(name for name in modules if name)
        raise InputError(f"no module named {', '.join(map(repr, unknown))} in {arch}; module names: {known}")
    lost = sorted(overwritten(model) & set(chosen))
    if lost:
        raise InputError(f"the module after {', '.join(map(repr, lost))} overwrites its output in place: choose "
                         "that module instead")
    if betas:
        weights = tuple(betas)
    elif len(chosen) == len(DEFAULT_BETAS):
        weights = DEFAULT_BETAS
    else:
        raise InputError(f"{len(chosen)} layers chosen: give one beta per layer with `betas`")
    if len(weights) != len(chosen):
        raise InputError(f"{len(weights)} betas for {len(chosen)} layers: give one beta per layer")
    return Distillation(chosen, weights)


def check_maps(model: nn.Module, layers: tuple[str, ...], input_size: int) -> None:
    """Refuse, before any work, a layer whose output is no feature map (images x channels x height x width):
    a linear layer's, or the whole model's (`""`). NAD cannot make an attention map of it, and the job failed
    at its first distillation step as an internal error. One pass of two blank images in evaluation mode."""
    was_training = model.training
    model.eval()
    try:
        with tap(model, layers) as outputs, torch.no_grad():
            model(torch.zeros(2, 3, input_size, input_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    flat = [name for name, output in zip(layers, outputs, strict=True)
            if not (isinstance(output, torch.Tensor) and output.dim() == 4)]
    if flat:
        raise InputError(f"{', '.join(map(repr, flat))} gives no feature map (channels x height x width) whose "
                         "attention could be distilled: choose convolutional layers with `layers`")


def classifier_head(model: nn.Module) -> nn.Linear:
    """The linear layer that produces the logits: the last `nn.Linear` of the model (`fc` of WRN and
    torchvision's ResNets, `linear` of the CIFAR ResNets, the last of `classifier` or `heads` elsewhere)."""
    head = find_classifier_head(model)
    if head is None:
        raise InputError("the model has no linear classifier layer, which this method retrains; use nad or finetune")
    return head


def find_classifier_head(model: nn.Module) -> nn.Linear | None:
    """`classifier_head`, or None for a model whose logits come from elsewhere (torchvision's SqueezeNet ends in
    a convolution)."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None
