import collections
import errno
import importlib.metadata
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from conftest import read_metadata
from core.engine.checkpoints import load_weights, read_state_dict, sha256_file, write_checkpoint
from core.engine.errors import InputError
from core.engine.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OFFICIAL = SHARED / "models" / "nad-official"


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return build_model("wrn-16-1", 10)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "wrap",
    [lambda sd: sd, lambda sd: {"state_dict": sd, "epoch": 3}, lambda sd: {"model": sd},
     lambda sd: {"net": sd, "acc": 91.0}, lambda sd: {f"module.{k}": v for k, v in sd.items()},
     lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_prec": 0.9},
     lambda sd: {"epoch": 9, "model_state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []}},
     lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()}],
    ids=["plain", "state_dict", "model", "net", "dataparallel", "wrapped-dataparallel", "pytorch-tutorial",
         "compiled-dataparallel"],
)
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_wrappers_are_unwrapped(tmp_path, model, wrap, zip_format):
    """In torch.save's zip format and in its format before PyTorch 1.6, a bare pickle (the NAD authors')."""
    path = tmp_path / "model.pth"
    torch.save(wrap(model.state_dict()), path, _use_new_zipfile_serialization=zip_format)
    assert _same(read_state_dict(path), model.state_dict())


def test_safetensors_round_trip_with_metadata(tmp_path, model):
    source = tmp_path / "in.pt"
    torch.save(model.state_dict(), source)
    out = tmp_path / "out.safetensors"
    write_checkpoint(model, out, {"arch": "wrn-16-1", "num_classes": 10, "input_sha256": sha256_file(source)})
    assert _same(read_state_dict(out), model.state_dict())
    meta = read_metadata(out)
    assert meta["arch"] == "wrn-16-1" and meta["num_classes"] == "10"
    assert meta["input_sha256"] == sha256_file(source) and meta["format"] == "nad-service/1"
    assert meta["nad_version"] == importlib.metadata.version("nad-service")
    fresh = build_model("wrn-16-1", 10)
    load_weights(fresh, read_state_dict(out), "wrn-16-1")
    assert _same(fresh.state_dict(), model.state_dict())


def test_plain_safetensors_is_read(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), path)
    assert _same(read_state_dict(path), model.state_dict())
    save_file({f"module.{k}": v for k, v in model.state_dict().items()}, path)  # DataParallel's, as safetensors
    assert _same(read_state_dict(path), model.state_dict())


def test_a_full_disk_while_writing_a_checkpoint_is_an_oserror_saying_so(tmp_path, model, monkeypatch):
    """safetensors reports the OS's errors as its own SafetensorError, which the worker could not tell from a
    bug: its full disk reached the owner as the generic internal error."""

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("core.engine.checkpoints.save_file", full)
    with pytest.raises(OSError) as raised:
        write_checkpoint(model, tmp_path / "m.safetensors", {})
    assert raised.value.errno == errno.ENOSPC


def test_a_checkpoint_without_batch_norms_batch_counts_loads(model):
    """PyTorch before 0.4.1 saved no `num_batches_tracked`; torch's own loading fills it in."""
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(model.state_dict())
    fresh = build_model("wrn-16-1", 10)
    load_weights(fresh, old, "wrn-16-1")
    assert _same({k: fresh.state_dict()[k] for k in old}, old)


def test_pickled_whole_module_is_refused_with_advice(tmp_path, model):
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(InputError, match=r"state_dict\(\)"):
        read_state_dict(path)


MARKER = Path("/tmp/nad-test-should-not-exist")


class Payload:
    """Unpickled in full, it runs code: it creates `marker`."""

    def __init__(self, marker: Path = MARKER) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    ("write", "reason"),
    [(lambda path: path.write_text("# not a checkpoint"), "Unsupported operand"),
     (lambda path: path.write_bytes(pickle.dumps([1, 2], protocol=4)), "Unsupported operand")],
    ids=["text", "plain-pickle"],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # torch's note on the second file: expected
def test_a_file_torch_cannot_read_safely_is_refused_without_torchs_advice_to_load_it_unsafely(tmp_path, write, reason):
    """torch's message opens with 'Re-running torch.load with weights_only set to False will likely succeed': the
    one thing a user of a sanitization service must not be told to do."""
    path = tmp_path / "model.pt"
    write(path)
    with pytest.raises(InputError, match="not a plain state dict") as caught:
        read_state_dict(path)
    assert reason in str(caught.value) and "weights_only" not in str(caught.value)


@pytest.mark.parametrize(
    ("content", "zip_format"),
    [(lambda: Payload(), True), (lambda: {"state_dict": {"weight": torch.zeros(1), "x": Payload()}}, True),
     (lambda: {"weight": torch.zeros(1), "x": Payload()}, False), (lambda: Payload(), False)],
    ids=["top-level", "nested-in-state-dict", "legacy-nested", "legacy-top-level"],
)
def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, content, zip_format):
    marker = MARKER
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    torch.save(content(), path, _use_new_zipfile_serialization=zip_format)
    marker.unlink(missing_ok=True)  # torch.save itself does not run it, but be sure
    with pytest.raises(InputError, match="not a plain state dict") as caught:
        read_state_dict(path)
    assert not marker.exists()
    assert "Unsupported global" in str(caught.value) and "weights_only" not in str(caught.value)


# Asks torch for a full unpickle, in a fresh interpreter that has run `preamble` first.
LOAD_IN_FULL = """
import sys
{preamble}
assert "torch" not in sys.modules, "torch was imported before the preamble's settings could take effect"
import torch
try:
    torch.load(sys.argv[1], weights_only=False)
except Exception as error:
    print(type(error).__name__)
"""


@pytest.mark.parametrize(("preamble", "runs"), [("import worker.app", False), ("", True)], ids=["worker", "control"])
def test_the_worker_process_refuses_a_full_unpickle_whatever_the_call_asks(tmp_path, preamble, runs):
    """worker.app forces weights-only loading before torch is imported, whatever setting the process inherited
    (an inherited "0" must not turn it off); the control shows that the same load without it does run the file's
    code."""
    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save(Payload(marker), path)
    # This process may carry the setting already (any test module importing worker.app sets it).
    env = os.environ | {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "0"}
    done = subprocess.run([sys.executable, "-c", LOAD_IN_FULL.format(preamble=preamble), str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert marker.exists() == runs and ("UnpicklingError" in done.stdout) != runs, done.stdout


def test_other_architecture_names_the_keys(model):
    state = collections.OrderedDict(model.state_dict())
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(5, 64)
    with pytest.raises(InputError) as error:
        load_weights(build_model("wrn-16-1", 10), state, "wrn-16-1")
    message = str(error.value)
    assert "missing keys: fc.bias" in message and "unexpected keys: extra.weight" in message
    assert "fc.weight (5, 64) != (10, 64)" in message


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_weights_are_refused(model, value):
    state = dict(model.state_dict())
    state["fc.weight"][3, 5] = float(value)
    with pytest.raises(InputError, match="NaN"):
        load_weights(build_model("wrn-16-1", 10), state, "wrn-16-1")


def test_damaged_safetensors_is_an_input_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((100).to_bytes(8, "little") + b'{"a": 1')
    with pytest.raises(InputError, match="damaged or invalid: .*; save it again: save the weights alone, e.g. "):
        read_state_dict(path)


@pytest.mark.shared
@pytest.mark.skipif(not OFFICIAL.exists(), reason="../shared is absent")
@pytest.mark.parametrize("name", ["backdoored", "teacher", "nad-erased"])
def test_the_authors_gpu_saved_legacy_checkpoints_load(name):
    model = build_model("wrn-16-1", 10)
    load_weights(model, read_state_dict(OFFICIAL / f"wrn16_1-badnets-grid-{name}.pth.tar"), "wrn-16-1")
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)
