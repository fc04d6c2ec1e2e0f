"""The engine's building blocks in isolation, behind the choices of `fast` mode: an SGD step in NCHW and
channels_last, eager and compiled, and inference throughput by batch size, for WRN-16-1 or another `--arch`.

    .venv/bin/python bench/steps.py [--compile] [--arch preact-resnet18]

Random inputs and a freshly built model: only speed is measured. Prints images per second.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from core.engine.models import build_model


def layout(model: nn.Module, x: torch.Tensor, channels_last: bool) -> tuple[nn.Module, torch.Tensor]:
    if not channels_last:
        return model, x
    return model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)


def training_rate(model: nn.Module, x: torch.Tensor, steps: int) -> float:
    """Images per second of SGD steps (nesterov, as the engine's), after three warm-up steps."""
    labels = torch.randint(0, 10, (len(x),))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for step in range(steps + 3):
        if step == 3:
            start = time.perf_counter()
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return len(x) * steps / (time.perf_counter() - start)


@torch.inference_mode()
def inference_rate(model: nn.Module, x: torch.Tensor, images: int) -> float:
    model.eval()
    model(x)
    done, start = 0, time.perf_counter()
    while done < images:
        model(x)
        done += len(x)
    return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (and its compiling)")
    parser.add_argument("--arch", default="wrn-16-1", help="the model to time (default wrn-16-1)")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    print(f"threads {torch.get_num_threads()}; {args.arch}, batch 64 training, images/s")
    for channels_last in (False, True):
        model, inputs = layout(build_model(args.arch, 10), x, channels_last)
        print(f"  train {'channels_last' if channels_last else 'NCHW':14} {training_rate(model, inputs, 40):8.0f}")
    if args.compile:
        model, inputs = layout(build_model(args.arch, 10), x, True)
        compiled = torch.compile(model)
        start = time.perf_counter()
        training_rate(compiled, inputs, 1)
        print(f"  compiling the training step took {time.perf_counter() - start:.1f} s")
        print(f"  train compiled       {training_rate(compiled, inputs, 40):8.0f}")
    print("inference by batch size, images/s: NCHW, channels_last")
    for batch in (64, 128, 256, 512, 1024):
        rates = [inference_rate(*layout(build_model(args.arch, 10), torch.rand(batch, 3, 32, 32), cl), 6144)
                 for cl in (False, True)]
        print(f"  {batch:5}  {rates[0]:8.0f}  {rates[1]:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
