"""Reading suspect checkpoints safely and writing cleansed ones.

A `torch.save` file is a pickle, and a pickle is a program. Only `torch.load(weights_only=True)` ever reads
one here; whatever it refuses is refused, with a note on how to save a plain state dict instead. Nothing
falls back to full unpickling.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from core.engine.errors import InputError

SAVE_HINT = (
    "save the weights alone, e.g. `torch.save(model.state_dict(), 'model.pt')` or "
    "`safetensors.torch.save_file(model.state_dict(), 'model.safetensors')`"
)
# Keys under which training scripts commonly nest the state dict.
WRAPPER_KEYS = ("state_dict", "model", "net")
FORMAT = "nad-service/1"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_safetensors(path: Path) -> bool:
    """safetensors files open with an 8-byte header length and a JSON header."""
    with path.open("rb") as stream:
        head = stream.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _load_pickled(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as error:
        reason = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        raise InputError(
            f"the checkpoint is not a plain state dict that can be read safely ({reason}); {SAVE_HINT}"
        ) from None


def _unwrap(obj: Any) -> Mapping[str, Any]:
    """The state dict inside the common wrappers: {'state_dict': ...}, {'model': ...}, {'net': ...}."""
    if not isinstance(obj, Mapping):
        raise InputError(f"the checkpoint holds a {type(obj).__name__}, not a state dict; {SAVE_HINT}")
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return obj


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors only, without DataParallel's `module.` prefix."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(f"the checkpoint holds no tensors; {SAVE_HINT}")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or `torch.save` checkpoint, on the CPU."""
    if _is_safetensors(path):
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise InputError(f"the safetensors file is damaged or invalid: {error}") from None
    return _strip_prefix(_unwrap(_load_pickled(path)))


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> None:
    """Load `state` into `model`, or say by name which keys are missing, unexpected or mis-shaped."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"missing keys: {_names(missing)}" if missing else "",
        f"unexpected keys: {_names(unexpected)}" if unexpected else "",
        f"shape mismatches (checkpoint != {arch}): {_names(misshaped)}" if misshaped else "",
    ]
    if any(problems):
        detail = "; ".join(p for p in problems if p)
        raise InputError(f"the checkpoint does not fit {arch} with this class count: {detail}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"the checkpoint has NaN or infinite values in {_names(bad)}")
    model.load_state_dict(dict(state))


def write_checkpoint(model: nn.Module, path: Path, metadata: Mapping[str, Any]) -> None:
    """Save as safetensors; metadata values that are not strings are stored as JSON."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"format": FORMAT, **text})


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata block of a safetensors file we wrote (its header, not its tensors)."""
    with path.open("rb") as stream:
        size = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(size))
    return header.get("__metadata__", {})
