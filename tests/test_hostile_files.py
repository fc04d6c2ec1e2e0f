"""Hostile uploads: every file here is built to hurt the parser (run code, read outside the archive, exhaust
memory, reach the wrong decoder). Each must end in an InputError that names the problem, before any large
allocation; each test fails if the protection it covers is taken out."""

import io
import json
import stat
import struct
import tarfile
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_data import _tar
from test_data import _zip as _zip_as
from torch import nn

from core.engine import checkpoints, data
from core.engine.checkpoints import read_state_dict
from core.engine.data import load_images
from core.engine.errors import InputError


def _png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    """Deflated by default: the bombs here must compress."""
    return _zip_as(path, members, method)


def _refused(path: Path, *fragments: str) -> None:
    with pytest.raises(InputError) as caught:
        load_images(path, 8)
    message = str(caught.value)
    assert all(fragment in message for fragment in fragments), message
    assert str(path.parent) not in message


# ---- checkpoints: formats that are not a state dict, found before torch.load ------------------------------


@pytest.fixture()
def torch_load_forbidden(monkeypatch):
    """torch.load must not see these files: they are refused by their zip directory first."""
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was reached"))


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2))


@pytest.mark.filterwarnings("ignore:`torch.jit.s:FutureWarning")
def test_torchscript_archive_is_refused_naming_the_accepted_formats(tmp_path, torch_load_forbidden):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_tiny_model()), path)
    with pytest.raises(InputError, match="TorchScript") as caught:
        read_state_dict(path)
    assert "safetensors" in str(caught.value) and "torch.save" in str(caught.value)


def test_torch_export_archive_is_refused_naming_the_accepted_formats(tmp_path, torch_load_forbidden):
    path = tmp_path / "exported.pt2"
    model = _tiny_model()
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3),)), path)
    with pytest.raises(InputError, match="torch.export") as caught:
        read_state_dict(path)
    assert "safetensors" in str(caught.value) and "torch.save" in str(caught.value)


@pytest.mark.parametrize("bomb", [True, False], ids=["bomb", "inflates-little"])
def test_zip_checkpoint_with_compressed_members_is_refused(tmp_path, torch_load_forbidden, bomb):
    """torch.save stores members uncompressed; a deflated one would inflate inside torch.load (the bomb: 8 MiB of
    zeros from a few kilobytes). The rule is torch.save's own, not a ratio: deflated random bytes, which inflate
    to no more than the file holds, are refused too."""
    saved = tmp_path / "saved.pt"
    weight = (torch.zeros(8 << 20, dtype=torch.uint8) if bomb else
              torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    torch.save({"weight": weight}, saved)
    with zipfile.ZipFile(saved) as source:
        members = {info.filename: source.read(info) for info in source.infolist()}
    path = _zip(tmp_path / "deflated.pt", members)
    with zipfile.ZipFile(path) as deflated:
        inflated = sum(info.file_size for info in deflated.infolist())
    assert inflated > 80 * path.stat().st_size if bomb else inflated <= path.stat().st_size
    with pytest.raises(InputError, match="compressed"):
        read_state_dict(path)


def test_zip_checkpoint_member_larger_than_the_file_is_refused(tmp_path, torch_load_forbidden):
    """torch.load sizes a member's buffer from the zip directory: a directory that lies must not size it."""
    path = tmp_path / "lying.pt"
    torch.save({"weight": torch.zeros(4)}, path)
    content = bytearray(path.read_bytes())
    entry = content.index(b"PK\x01\x02")  # the central directory: a 46-byte record and the name, per member
    while not content[entry + 46 : entry + 46 + struct.unpack_from("<H", content, entry + 28)[0]].endswith(b"data/0"):
        entry = content.index(b"PK\x01\x02", entry + 1)
    content[entry + 20 : entry + 28] = struct.pack("<II", 2**31, 2**31)  # its compressed and uncompressed sizes
    path.write_bytes(bytes(content))
    with pytest.raises(InputError, match="larger than the file"):
        read_state_dict(path)


def test_zip_that_torch_save_did_not_write_is_refused(tmp_path, torch_load_forbidden):
    with pytest.raises(InputError, match="not one torch.save wrote"):
        read_state_dict(_zip(tmp_path / "other.pt", {"readme.txt": b"hello"}))


@pytest.mark.parametrize("length", [1, 18], ids=["index-error", "struct-error"])
def test_truncated_legacy_checkpoint_is_an_input_error(tmp_path, length):
    """torch.load raises IndexError or struct.error on these: any of its errors is an InputError."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer, _use_new_zipfile_serialization=False)
    path = tmp_path / "cut.pt"
    path.write_bytes(buffer.getvalue()[:length])
    with pytest.raises(InputError, match="not a plain state dict"):
        read_state_dict(path)


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize(
    ("state", "message"),
    [({3: torch.zeros(1)}, "named by strings"),
     ({"w": torch.eye(3).to_sparse()}, "sparse"),
     ({"w": torch.zeros(3, dtype=torch.complex64)}, "complex")],
    ids=["int-key", "sparse", "complex"],
)
def test_tensors_that_are_not_plain_named_weights_are_refused(tmp_path, state, message):
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(InputError, match=message):
        read_state_dict(path)


# ---- checkpoints: safetensors headers, checked before safetensors reads them ------------------------------


@pytest.fixture()
def safetensors_forbidden(monkeypatch):
    """The header is refused by our own check: safetensors must never be reached with it."""
    monkeypatch.setattr(checkpoints, "load_file", lambda *a, **k: pytest.fail("safetensors was reached"))


def _safetensors(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def _entry(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (b"{" + b" " * 100, b"", "not valid JSON"),
        (b'{"a": 1, "a": 2}', b"", "not valid JSON"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", "not valid JSON"),
        (b'{"w": {"dtype": "U8", "shape": [1' + b"0" * 5000 + b'], "data_offsets": [0, 1]}}', b"\0", "not valid JSON"),
        ({"w": _entry("Q9", [1], [0, 1])}, b"\0", "no known dtype"),
        ({"w": _entry("F32", [-1], [0, 4])}, bytes(4), "not a list of sizes"),
        ({"w": _entry("F32", [1.0], [0, 4])}, bytes(4), "not a list of sizes"),
        ({"w": _entry("F32", [True], [0, 4])}, bytes(4), "not a list of sizes"),
        ({"w": _entry("F32", [2], [0])}, bytes(8), "data_offsets"),
        ({"w": _entry("F32", [2], [0, 4])}, bytes(4), "does not fit"),
        ({"w": _entry("U8", [2**40, 2**40], [0, 8])}, bytes(8), "does not fit"),
        ({"w": _entry("U8", [2] * 100_000, [0, 8])}, bytes(8), "does not fit"),
        ({"w": _entry("U8", [4], [0, 4]), "v": _entry("U8", [4], [2, 6])}, bytes(6), "starts at byte 2, not 4"),
        ({"w": _entry("U8", [4], [0, 4]), "v": _entry("U8", [4], [5, 9])}, bytes(9), "starts at byte 5, not 4"),
        ({"w": _entry("U8", [4], [4, 8])}, bytes(8), "starts at byte 4, not 0"),
        ({"w": _entry("U8", [4], [0, 4])}, bytes(12), "cover 4 bytes but the file holds 12"),
        ({"w": _entry("U8", [4], [0, 4])}, bytes(2), "does not fit"),
    ],
    ids=["bad-json", "duplicate-key", "deep-nesting", "huge-int", "dtype", "negative-dim", "float-dim", "bool-dim",
         "one-offset", "size-mismatch", "absurd-shape", "many-dims", "overlap", "gap", "not-from-zero",
         "trailing-bytes", "past-the-end"],
)
def test_lying_safetensors_header_is_refused_before_safetensors(tmp_path, safetensors_forbidden, header, data, message):
    with pytest.raises(InputError, match=message):
        read_state_dict(_safetensors(tmp_path / "m.safetensors", header, data))


@pytest.mark.parametrize("length", [2**40, 2**64 - 1], ids=["past-the-file", "max"])
def test_safetensors_header_length_past_the_file_is_refused(tmp_path, safetensors_forbidden, length):
    with pytest.raises(InputError, match="header claims"):
        read_state_dict(_safetensors(tmp_path / "m.safetensors", {}, length=length))


def test_safetensors_header_over_the_cap_is_refused(tmp_path, safetensors_forbidden, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(3)}, path, metadata={"padding": "x" * 1000})
    monkeypatch.setattr(checkpoints, "MAX_HEADER_BYTES", 500)
    with pytest.raises(InputError, match="header claims"):
        read_state_dict(path)


def test_valid_safetensors_edge_cases_still_load(tmp_path):
    """Scalars, empty tensors and metadata pass the header check."""
    tensors = {"scalar": torch.tensor(3.0), "empty": torch.zeros(0, 5), "w": torch.ones(2, 3, dtype=torch.float16)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"note": "ok"})
    loaded = read_state_dict(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())


# ---- archives: names and member kinds --------------------------------------------------------------------


SLIPS = ["../evil.png", "cat/../../evil.png", "/etc/cat/evil.png", "C:/data/cat/evil.png", "..\\cat\\evil.png"]


@pytest.mark.parametrize("name", SLIPS, ids=["parent", "inner-parent", "absolute", "drive", "backslash"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_member_names_outside_the_archive_are_refused_by_name(tmp_path, kind, name):
    members = {"cat/ok.png": _png(), name: _png(1)}
    path = _zip(tmp_path / "d.zip", members) if kind == "zip" else _tar(tmp_path / "d.tar", members)
    _refused(path, "absolute path or a '..'", name.replace("\\", "/"))


def test_zip_symlink_is_refused_by_name(tmp_path):
    path = _zip(tmp_path / "d.zip", {"cat/ok.png": _png()})
    with zipfile.ZipFile(path, "a") as archive:
        info = zipfile.ZipInfo("cat/link.png")
        info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    _refused(path, "'cat/link.png'", "symbolic link")


def test_tar_sparse_member_is_refused(tmp_path):
    """tarfile fills a sparse file's holes with zeros it never reads, so 4 stored bytes could be a terabyte."""
    path = tmp_path / "d.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("cat/holes.png")
        info.size = 4
        info.pax_headers = {"GNU.sparse.map": "0,4", "GNU.sparse.size": str(3 << 20), "GNU.sparse.major": "0",
                            "GNU.sparse.minor": "1", "GNU.sparse.name": "cat/holes.png"}
        archive.addfile(info, io.BytesIO(b"\x89PNG"))
    _refused(path, "'cat/holes.png'", "sparse")


@pytest.mark.parametrize("inner", ["cat/more.zip", "data/train.tar.gz", "x.tgz", "d/a.npz", "d/a.7z", "d/a.RAR"])
@pytest.mark.parametrize("kind", ["zip", "tgz"])
def test_nested_archives_are_refused_by_name(tmp_path, kind, inner):
    members = {"cat/ok.png": _png(), inner: b"PK\x03\x04 whatever"}
    path = _zip(tmp_path / "d.zip", members) if kind == "zip" else _tar(tmp_path / "d.tgz", members, "w:gz")
    _refused(path, f"'{inner}'", "itself an archive")


# ---- archives: bombs, stopped while streaming ------------------------------------------------------------


def test_zip_bomb_member_stops_while_streaming(tmp_path, monkeypatch):
    """32 MiB of zeros in a 32 KiB member: refused once it passes 200 times that (6.4 MiB), not after reading
    it all."""
    path = _zip(tmp_path / "d.zip", {"cat/ok.png": _png(), "cat/bomb.png": bytes(32 << 20)})
    monkeypatch.setattr(data, "CHUNK", 256 << 10)
    largest = []
    original = zipfile.ZipExtFile.read

    def spy(self, n=-1):
        chunk = original(self, n)
        largest.append(len(chunk))
        return chunk

    monkeypatch.setattr(zipfile.ZipExtFile, "read", spy)
    _refused(path, "'cat/bomb.png'", "times its compressed size")
    assert sum(largest) < 8 << 20


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"], ids=["gz", "bz2", "xz"])
def test_compressed_tar_bomb_is_stopped_by_its_ratio(tmp_path, mode):
    """The padding is not an image, so it is never read by us: the decompressed stream itself is counted."""
    path = _tar(tmp_path / "d.tar.x", {"cat/ok.png": _png(), "cat/padding.bin": bytes(32 << 20)}, mode)
    _refused(path, "the tar stream", "times its compressed size")


def test_tar_pax_header_bomb_is_stopped_before_it_fills_memory(tmp_path):
    """tarfile reads a pax header whole before yielding its member (and tarfile.is_tarfile reads it too): the
    counter under tarfile stops this 32 MiB one long before it is all in memory."""
    path = tmp_path / "d.tgz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("cat/ok.png")
        content = _png()
        info.size, info.pax_headers = len(content), {"comment": "0" * (32 << 20)}
        archive.addfile(info, io.BytesIO(content))
    tracemalloc.start()
    try:
        _refused(path, "the tar stream", "times its compressed size")
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["zip", "tar", "tgz"])
def test_total_unpacked_bytes_are_capped(tmp_path, monkeypatch, kind):
    members = {f"cat/{i}.png": _png(i) for i in range(8)}
    path = {"zip": lambda: _zip(tmp_path / "d.zip", members), "tar": lambda: _tar(tmp_path / "d.tar", members),
            "tgz": lambda: _tar(tmp_path / "d.tgz", members, "w:gz")}[kind]()
    monkeypatch.setattr(data, "MAX_UNPACKED_BYTES", 1000)
    _refused(path, "unpacks to more than 1,000 bytes")


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_member_count_is_capped(tmp_path, monkeypatch, kind):
    members = {f"cat/{i}.png": _png(i) for i in range(4)}
    path = _zip(tmp_path / "d.zip", members) if kind == "zip" else _tar(tmp_path / "d.tar", members)
    monkeypatch.setattr(data, "MAX_MEMBERS", 3)
    _refused(path, "more than 3 members")


def _npz_with_x_header(path: Path, shape: tuple[int, ...], payload: bytes = bytes(16)) -> Path:
    """An npz whose x.npy claims `shape` but holds only `payload`."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    labels = io.BytesIO()
    np.save(labels, np.zeros(1, np.int64))
    return _zip(path, {"x.npy": header.getvalue() + payload, "y.npy": labels.getvalue()}, zipfile.ZIP_STORED)


def test_npz_array_claiming_terabytes_is_refused_from_its_header(tmp_path):
    _refused(_npz_with_x_header(tmp_path / "d.npz", (1, 2**20, 2**20, 3)), "'x.npy'", "unpacks to more than")


def test_npz_array_over_the_cap_is_refused_from_its_header(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_UNPACKED_BYTES", 1000)
    _refused(_npz_with_x_header(tmp_path / "d.npz", (1, 20, 20, 3)), "'x.npy'", "unpacks to more than 1,000")


def test_compressed_npz_bomb_is_refused(tmp_path):
    path = tmp_path / "d.npz"
    np.savez_compressed(path, x=np.zeros((8, 512, 512, 3), np.uint8), y=np.zeros(8, np.int64))
    _refused(path, "'x.npy'", "times its compressed size")


# ---- images and empty archives ---------------------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds one empty IDAT: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("side", "message"),
    [(9000, "9000x9000 pixels"), (10_000, "decompression bomb"), (100_000, "decompression bomb")],
    ids=["over-our-cap", "pillow-warning", "pillow-error"],
)
def test_image_decompression_bombs_are_refused_by_name_from_the_header(tmp_path, side, message):
    path = _zip(tmp_path / "d.zip", {"cat/ok.png": _png(), "cat/bomb.png": _png_header_only(side, side)})
    _refused(path, "'cat/bomb.png'", message)


@pytest.mark.parametrize("mode", ["w", "w:gz"], ids=["tar", "tgz"])
def test_empty_tar_says_it_holds_no_images(tmp_path, mode):
    _refused(_tar(tmp_path / "d.tar", {}, mode), "holds no images")


def test_empty_npz_says_which_arrays_it_needs(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path)
    _refused(path, "needs arrays named x and y")
