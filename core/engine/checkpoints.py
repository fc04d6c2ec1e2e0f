"""Reading suspect checkpoints safely and writing cleansed ones.

A `torch.save` file is a pickle, and a pickle is a program. Only `torch.load(weights_only=True)` ever reads
one here; whatever it refuses is refused, with a note on how to save a plain state dict instead. Nothing
falls back to full unpickling. What can be checked before a library reads the file is checked first: the zip
directory of a `torch.save` file (no TorchScript or torch.export archive, no compressed member that could
inflate inside torch.load) and the whole header of a safetensors file (every tensor's size must match the
bytes the file holds, so no shape in it can make the reader allocate more than the file's size).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from core import __version__
from core.engine.errors import InputError

SAVE_HINT = (
    "save the weights alone, e.g. `torch.save(model.state_dict(), 'model.pt')` or "
    "`safetensors.torch.save_file(model.state_dict(), 'model.safetensors')`"
)
# Keys under which training scripts commonly nest the state dict (model_state_dict: PyTorch's own tutorial).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Prefixes that wrappers put before every key: DataParallel's and torch.compile's.
KEY_PREFIXES = ("module.", "_orig_mod.")
FORMAT = "nad-service/1"
ACCEPTED = "only safetensors files and state dicts written by torch.save are accepted"
# A safetensors header is a few kilobytes for a classifier and a few megabytes for the largest models.
MAX_HEADER_BYTES = 16 << 20
# Bytes per element of the safetensors dtypes a classifier's weights can have.
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}


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


def _is_zip(path: Path) -> bool:
    """What torch.load takes for a zip checkpoint (its other format, the legacy one, is a bare pickle)."""
    with path.open("rb") as stream:
        return stream.read(4) == b"PK\x03\x04"


def _damaged_safetensors(problem: str) -> InputError:
    return InputError(f"the safetensors file is damaged or invalid: {problem}; save it again: {SAVE_HINT}")


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header and the size of the data after it. The header's length field is the file's word, so
    it is checked against MAX_HEADER_BYTES and the file's size before it sizes a read; duplicate keys are
    refused, so that no reader can pick a different entry from the one checked here."""
    size = path.stat().st_size
    with path.open("rb") as stream:
        length = int.from_bytes(stream.read(8), "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise _damaged_safetensors(f"its header claims {length:,} bytes, more than the file or the cap allows")
        text = stream.read(length)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged_safetensors(f"its header is not valid JSON ({str(error)[:200]})") from None
    return header, size - 8 - length  # a dict: _is_safetensors saw the header open with "{"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key appears twice")
    return dict(pairs)


def _tensor_span(name: str, entry: Any, data_size: int) -> tuple[int, int, str]:
    """The bytes [begin, end) of one header entry, and its name, checked: a known dtype, a shape of
    non-negative ints, and offsets inside the data section exactly as far apart as the shape and dtype need."""
    if not isinstance(entry, dict) or entry.get("dtype") not in ITEMSIZE:
        raise _damaged_safetensors(f"tensor '{name[:100]}' has no known dtype ({', '.join(ITEMSIZE)})")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise _damaged_safetensors(f"tensor '{name[:100]}' has a shape that is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _damaged_safetensors(f"tensor '{name[:100]}' has no [begin, end] data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size or end - begin != _nbytes(shape, ITEMSIZE[entry["dtype"]], data_size):
        raise _damaged_safetensors(
            f"tensor '{name[:100]}' of shape {str(shape)[:100]} does not fit its data_offsets {offsets} "
            f"in the file's {data_size:,} bytes of data"
        )
    return begin, end, name


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int:
    """prod(shape) * itemsize, or any number above `limit` once the product passes it: a hostile shape of
    many huge dimensions stays cheap to refuse."""
    size = itemsize if 0 not in shape else 0
    for dim in shape:
        size *= dim
        if size > limit:
            break
    return size


def _check_safetensors(path: Path) -> None:
    """Every tensor entry is valid and the entries tile the data section exactly, in order and without
    overlap: so no shape, however large, can make safetensors allocate more than the file holds."""
    header, data_size = _safetensors_header(path)
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    end = 0
    for begin, stop, name in sorted(_tensor_span(name, entry, data_size) for name, entry in tensors.items()):
        if begin != end:
            raise _damaged_safetensors(f"tensor '{name[:100]}' starts at byte {begin:,}, not {end:,}")
        end = stop
    if end != data_size:
        raise _damaged_safetensors(f"its tensors cover {end:,} bytes but the file holds {data_size:,}")


def _check_torch_zip(path: Path) -> None:
    """A zip checkpoint must be one torch.save wrote, as far as its directory shows, before torch.load reads
    a byte of it."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise InputError(f"the checkpoint is a damaged zip archive ({str(error)[:200]}); {SAVE_HINT}") from None
    _check_torch_save_names({info.filename.partition("/")[2] for info in infos})
    _check_stored(infos, path.stat().st_size)


def _check_torch_save_names(names: set[str]) -> None:
    """Refuse by their member names (below the archive's one folder) the zips that are not state dicts:
    TorchScript (torch.jit.save: code/, constants.pkl), torch.export (archive_format and models/, or the older
    serialized_exported_program.json) and any other zip without torch.save's data.pkl. torch.load would refuse
    most of them too, but with advice to load them unsafely, which is no help to a user of this service."""
    if "constants.pkl" in names or any(name.startswith("code/") for name in names):
        raise InputError(f"the checkpoint is a TorchScript archive (torch.jit.save); {ACCEPTED}: {SAVE_HINT}")
    exported = {"archive_format", "serialized_exported_program.json"}
    if names & exported or any(name.startswith("models/") for name in names):
        raise InputError(f"the checkpoint is a torch.export archive; {ACCEPTED}: {SAVE_HINT}")
    if "data.pkl" not in names:
        raise InputError(f"the checkpoint is a zip archive but not one torch.save wrote; {ACCEPTED}: {SAVE_HINT}")


def _check_stored(infos: list[zipfile.ZipInfo], file_size: int) -> None:
    """torch.save stores members uncompressed. torch.load sizes its buffers from the zip directory, so a
    compressed member (or one claiming more bytes than the file has) would make it allocate and inflate
    far more than the upload: a zip bomb inside torch.load."""
    compressed = any(info.compress_type != zipfile.ZIP_STORED for info in infos)
    if compressed or sum(info.file_size for info in infos) > file_size:
        raise InputError(
            f"the checkpoint's zip members are compressed or larger than the file, which torch.save never "
            f"writes; {SAVE_HINT}"
        )


def _load_pickled(path: Path) -> Any:
    """torch.load(weights_only=True), with any failure an InputError: on hostile bytes its unpickler raises
    nearly anything (KeyError, IndexError, struct.error, AssertionError, ...), and all of them mean the same."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:
        raise InputError(
            f"the checkpoint is not a plain state dict that can be read safely ({_torch_reason(error)}); {SAVE_HINT}"
        ) from None


def _torch_reason(error: Exception) -> str:
    """The line of a torch.load error that says what was refused, without torch's advice to load with
    weights_only=False (which would run the file's code, and which the user cannot do here anyway)."""
    text = str(error)
    _, marker, refused = text.partition("WeightsUnpickler error:")  # the reason follows it, on its line or the next
    lines = [line.strip() for line in (refused if marker else text).splitlines() if line.strip()]
    lines = [line for line in lines if "weights_only" not in line]
    return (lines or [type(error).__name__])[0].split(" Please use ")[0][:300]


def _unwrap(obj: Any) -> Mapping[str, Any]:
    """The state dict inside the common wrappers: {'state_dict': ...}, {'model_state_dict': ...}, ..."""
    if not isinstance(obj, Mapping):
        raise InputError(f"the checkpoint holds a {type(obj).__name__}, not a state dict; {SAVE_HINT}")
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return obj


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors only, without the prefixes of DataParallel (`module.`) and torch.compile (`_orig_mod.`), in
    whatever order they were stacked, in either file format."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(f"the checkpoint holds no tensors; {SAVE_HINT}")
    if not all(isinstance(k, str) for k in tensors):
        raise InputError(f"the checkpoint's tensors are not all named by strings; {SAVE_HINT}")
    while prefix := next((p for p in KEY_PREFIXES if all(k.startswith(p) for k in tensors)), None):
        tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
    return tensors


def _check_plain(tensors: Mapping[str, torch.Tensor]) -> None:
    """Weights are dense real tensors. A sparse or quantized one makes later checks and loading fail in torch's
    own words, and a complex one would slip past the NaN check and lose its imaginary part."""
    odd = [k for k, v in tensors.items() if v.layout != torch.strided or v.is_quantized or v.is_complex()]
    if odd:
        raise InputError(f"the checkpoint has sparse, quantized or complex tensors ({_names(odd)}); {SAVE_HINT}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or `torch.save` checkpoint, on the CPU."""
    if _is_safetensors(path):
        _check_safetensors(path)
        try:
            tensors = _strip_prefix(load_file(path, device="cpu"))
        except (SafetensorError, OSError, ValueError) as error:
            raise _damaged_safetensors(str(error)[:300]) from None
    else:
        if _is_zip(path):
            _check_torch_zip(path)
        tensors = _strip_prefix(_unwrap(_load_pickled(path)))
    _check_plain(tensors)
    return tensors


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> None:
    """Load `state` into `model`, or say by name which keys are missing, unexpected or mis-shaped. BatchNorm's
    `num_batches_tracked` may be missing: checkpoints older than PyTorch 0.4.1 have none, and torch fills it."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
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
    """Save as safetensors; metadata values that are not strings are stored as JSON. The file also says its
    format and which version of nad-service wrote it."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file(tensors, path, metadata={"format": FORMAT, "nad_version": __version__, **text})
    except SafetensorError as error:  # the OS's errors in safetensors' own type: a full disk is an OSError
        code = re.search(r"\(os error (\d+)\)", str(error))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from error
