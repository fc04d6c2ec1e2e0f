"""Loading a user's image archive into memory: an ImageFolder tree in a zip or tar, or arrays in an npz.

Everything is read straight out of the archive: nothing is extracted and no member name is ever used as a
filesystem path, so a hostile archive cannot write or read anywhere on the server. What only a hostile or
mistaken archive holds (links, devices, `..` or absolute names, archives inside the archive) is refused by
name, and bytes are counted as they are unpacked, so a zip or tar bomb stops at a cap rather than filling
memory. Only numpy and Pillow are needed, so the API can check an upload with the same code the worker
trains on.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import math
import stat
import struct
import tarfile
import unicodedata
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
from PIL import Image

from core.engine.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# Pillow plugins allowed to decode: the formats of IMAGE_SUFFIXES and nothing else, so a file named .png
# cannot reach a riskier decoder (EPS, for one, starts Ghostscript).
DECODERS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
# The largest image decoded (8192 x 8192): far above any training image, and a bound on the memory one member
# takes however well it compresses. Checked per image rather than by lowering Pillow's process-wide limit.
MAX_SOURCE_PIXELS = 8192 * 8192
ACCEPTED = (
    "a .zip, .tar, .tar.gz or .tgz archive of <class>/<image> folders "
    f"({', '.join(IMAGE_SUFFIXES)} images), or an .npz with arrays x (uint8, N x H x W x 3) and y (labels)"
)
# Caps on one archive, checked while it is read: far above any real data set (CIFAR-10's 50,000 training
# images are a 130 MB tar), far below what a zip or tar bomb unpacks to. Tests lower them.
MAX_UNPACKED_BYTES = 4 << 30
MAX_MEMBERS = 1_000_000
# A zip member, npz array or compressed tar stream that has unpacked more than RATIO_FLOOR bytes may not
# unpack to more than MAX_RATIO times its compressed size: images compress a few times at most, bombs a
# thousand times.
MAX_RATIO = 200
RATIO_FLOOR = 1 << 20
# How much of a zip member is decompressed at a time between checks of the caps.
CHUNK = 1 << 20
# Members that are archives themselves: their images would be silently skipped, and unpacking them is how a
# bomb gets a second stage.
NESTED_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".npz", ".7z", ".rar")
# Compressed tars by their first bytes, and how to read them decompressed.
TAR_COMPRESSIONS = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}
# What the standard library's readers raise for a damaged or truncated archive.
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError)
# What Pillow raises for a file it cannot decode.
DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error,
    Image.DecompressionBombError, Image.DecompressionBombWarning,
)
NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images and labels in memory. eq=False: comparing arrays field by field has no single truth value."""

    images: np.ndarray  # uint8, N x S x S x 3 (NHWC)
    labels: np.ndarray  # int64, N
    classes: list[str]  # class names in label order

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)


class TooManyImages(InputError):
    """An archive holds more images than its reader's `limit`: `count` of them when the archive says how many
    up front (an npz's header), None when reading stopped at the limit rather than decode the rest."""

    def __init__(self, count: int | None, limit: int) -> None:
        held = f"{count:,}" if count is not None else f"more than {limit:,}"
        super().__init__(f"the archive holds {held} images, more than the {limit:,} accepted; send fewer images")
        self.count, self.limit = count, limit


def load_images(
    path: Path,
    input_size: int,
    classes: list[str] | None = None,
    num_classes: int | None = None,
    max_images: int | None = None,
) -> ImageSet:
    """Read an ImageFolder archive (zip, tar, tar.gz) or an npz into uint8 NHWC images of input_size.

    Labels follow `classes` when given, else sorted folder names (as torchvision's ImageFolder numbers them),
    so a model trained on the same folders sees the same indices. An archive of more than `max_images` images
    raises TooManyImages as soon as that is known: from an npz's header, or at the first image past the limit
    of a folder archive, before it is decoded.
    """
    classes = None if classes is None else [_composed(name) for name in classes]
    kind = _kind(path)
    if kind == "npz":
        return _load_npz(path, input_size, classes, num_classes, max_images)
    members = _zip_members(path) if kind == "zip" else _tar_members(path)
    return _load_folders(members, input_size, classes, num_classes, max_images)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, holdout), holdout about `fraction` of every class, so a small validation split still
    measures each class; a class of two or more images always has at least one image on each side."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be between 0 and 1, not {fraction}")
    rng = np.random.default_rng(seed)
    holdout = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) >= 2:
            count = min(max(round(len(members) * fraction), 1), len(members) - 1)
            holdout.append(members[:count])
    held = np.sort(np.concatenate(holdout)) if holdout else np.empty(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held)
    return keep.astype(np.int64), held.astype(np.int64)


def decode_image(data: bytes, name: str) -> Image.Image:
    """The one place user image bytes are decoded: only the formats we accept, none above MAX_SOURCE_PIXELS
    (checked from the header, before decoding), and any failure an InputError that names the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=DECODERS)
            if image.width * image.height <= MAX_SOURCE_PIXELS:
                return _eight_bits(image).convert("RGB")
    except Image.UnidentifiedImageError:
        raise InputError(
            f"'{name}' is named like an image but is not a {'/'.join(DECODERS)} file; "
            "remove it or replace it with a valid PNG or JPEG"
        ) from None
    except DECODE_ERRORS as error:
        raise InputError(
            f"'{name}' is named like an image but could not be decoded ({error_reason(error)}); "
            "remove it or replace it with a valid PNG or JPEG"
        ) from None
    raise InputError(
        f"image '{name}' is {image.width}x{image.height} pixels, more than the {MAX_SOURCE_PIXELS:,} "
        "accepted; shrink it before uploading"
    )


def _eight_bits(image: Image.Image) -> Image.Image:
    """16-bit grey (a PNG's I;16, or I) scaled to 8 bits: convert("RGB") clips it instead, so every value above
    255 of 65,535, nearly all of a real image, would come out white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        return Image.fromarray((np.asarray(image, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8))
    return image


def error_reason(error: BaseException) -> str:
    """A library error's first line, fit for a user: never an OSError's file name, which is a server path."""
    if isinstance(error, OSError) and error.filename is not None:
        return error.strerror or type(error).__name__
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return text or type(error).__name__


def _kind(path: Path) -> str:
    """'zip', 'tar' or 'npz', from the file's first bytes (uploads may be stored under any name); a zip is an
    npz when its name says so or its members do (below)."""
    with path.open("rb") as stream:
        head = stream.read(4)
    if head in (b"PK\x03\x04", b"PK\x05\x06"):
        if path.name.lower().endswith(".npz") or _holds_arrays(path):
            return "npz"
        return "zip"
    if _is_tar(path):
        return "tar"
    raise InputError(f"the data file is not in a format we read (or is damaged); send {ACCEPTED}")


def _is_tar(path: Path) -> bool:
    """A tar, perhaps compressed, by its first 512-byte block: a ustar header, or zeros for an empty tar. Not
    tarfile.is_tarfile, which reads the whole first member's header data (a pax header can be gigabytes)."""
    try:
        with path.open("rb") as raw, _decompressed(raw) as stream:
            block = stream.read(512)
    except ARCHIVE_ERRORS:
        return False
    return block[257:262] == b"ustar" or block == bytes(512)


def _holds_arrays(path: Path) -> bool:
    """An npz under another name: it holds x.npy and y.npy, or nothing but .npy arrays (np.savez with other
    names, which the npz reader then names in its message rather than calling it an archive of no images)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return False
    return {"x.npy", "y.npy"} <= set(names) or (bool(names) and all(name.endswith(".npy") for name in names))


# ---- ImageFolder archives ------------------------------------------------------------------------------


def _zip_members(path: Path) -> Iterator[tuple[str, bytes | None]]:
    """(name, content) of each file member; content None for members that are surely not images, so they
    are never decompressed. Every member's name and kind is checked first (see _member_name)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            _check_count(len(infos))
            unpacked = 0
            for info in infos:
                name = _member_name(_zip_name(info))
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise _not_a_file(name, "a symbolic link")
                if info.is_dir():
                    continue
                _check_not_nested(name)
                if not _is_image_name(name):
                    yield name, None
                    continue
                content = _read_zip_member(archive, info, name, unpacked)
                unpacked += len(content)
                yield name, content
    except ARCHIVE_ERRORS as error:
        raise _damaged("zip", error) from None
    except RuntimeError as error:  # a password, or a compression method the standard library lacks
        raise InputError(
            f"the zip archive could not be read ({error_reason(error)}); create it again without a password "
            "and with standard (deflate) compression"
        ) from None


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, unpacked: int) -> bytes:
    """A member's bytes, decompressed a CHUNK at a time and counted (`unpacked`: the archive's bytes so far),
    so that a bomb stops at the caps rather than after it has filled memory."""
    chunks, size = [], 0
    with archive.open(info) as stream:
        while chunk := stream.read(CHUNK):
            chunks.append(chunk)
            size += len(chunk)
            _check_inflation(unpacked + size, size, info.compress_size, f"'{name}'")
    return b"".join(chunks)


def _tar_members(path: Path) -> Iterator[tuple[str, bytes | None]]:
    """As _zip_members, streaming: a tar(.gz) is read once, front to back, and what it unpacks to is counted
    as it comes (_Counted)."""
    try:
        with (
            path.open("rb") as raw,
            _decompressed(raw) as stream,
            tarfile.open(fileobj=_Counted(raw, stream), mode="r|") as archive,
        ):
            for count, member in enumerate(archive, 1):
                _check_count(count)
                name = _member_name(member.name)
                if member.isdir():
                    continue
                _check_tar_file(member, name)
                _check_not_nested(name)
                if not _is_image_name(name):
                    yield name, None
                    continue
                content = archive.extractfile(member)
                yield name, content.read() if content is not None else b""
    except ARCHIVE_ERRORS as error:
        raise _damaged("tar", error) from None


def _decompressed(raw: BinaryIO) -> BinaryIO:
    """The tar stream in `raw`: raw itself, or a gzip, bzip2 or xz reader of it, by its first bytes."""
    head = raw.read(6)
    raw.seek(0)
    for magic, opener in TAR_COMPRESSIONS.items():
        if head.startswith(magic):
            return opener(raw)
    return raw


class _Counted:
    """A tar stream that counts the bytes it hands to tarfile and checks the caps at every read. Counting at
    this level rather than per member also covers what tarfile reads whole before yielding a member (pax and
    long-name headers) and the members it skips."""

    def __init__(self, raw: BinaryIO, stream: BinaryIO) -> None:
        self.raw, self.stream, self.size = raw, stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.size += len(data)
        _check_inflation(self.size, self.size, self.raw.tell(), "the tar stream")
        return data


def _check_count(count: int) -> None:
    if count > MAX_MEMBERS:
        raise InputError(
            f"the archive has more than {MAX_MEMBERS:,} members; split the data set into smaller archives"
        )


def _check_inflation(total: int, size: int, packed: int, what: str) -> None:
    """Stop an archive that unpacks past MAX_UNPACKED_BYTES in all (`total`), or a part of it (`what`: a zip
    member, an npz array, a compressed tar stream) whose `size` bytes so far came from more than MAX_RATIO
    times fewer `packed` bytes: the two marks of a compression bomb."""
    if total > MAX_UNPACKED_BYTES:
        raise InputError(
            f"the archive unpacks to more than {MAX_UNPACKED_BYTES:,} bytes (at {what}); "
            "send a smaller data set, or split it"
        )
    if size > RATIO_FLOOR and size > MAX_RATIO * packed:
        raise InputError(
            f"{what} unpacks to more than {MAX_RATIO} times its compressed size, as a compression bomb does; "
            "send real images (PNG or JPEG files, or uint8 arrays), not padding"
        )


def _zip_name(info: zipfile.ZipInfo) -> str:
    """The member's name as its archiver meant it. A name without the zip format's UTF-8 flag is cp437 by the
    format, and Python reads it so; but Info-ZIP's `zip -r` (Linux, macOS) writes UTF-8 names without the
    flag, so a class folder `zéro` read as `z├⌐ro`, and its label could shift. A name whose bytes are UTF-8 is
    read as UTF-8 (cp437 text that happens to be valid UTF-8 beyond ASCII is all but unknown)."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except UnicodeError:
        return info.filename


def _member_name(name: str) -> str:
    """The member's name, with / separators and any undecodable bytes escaped (so a message can show it),
    refused when it is absolute (/..., C:...) or climbs out with `..` (zip slip): harmless here, since
    nothing is extracted, but no legitimate archive has such names and no class may be derived from one."""
    name = _composed(name.replace("\\", "/").encode("utf-8", "backslashreplace").decode("utf-8"))
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or (name[:1].isalpha() and name[1:2] == ":"):
        raise InputError(
            f"archive member '{name}' has an absolute path or a '..' component; create the archive again "
            "from inside the data folder, e.g. `cd data && zip -r ../data.zip .`"
        )
    return name


def _composed(name: str) -> str:
    """A name in Unicode's composed form (NFC): macOS writes file names decomposed (é as e and an accent),
    so the same folder zipped there and on Linux, or named in `classes`, would not match, nor sort alike."""
    return unicodedata.normalize("NFC", name)


def _check_tar_file(member: tarfile.TarInfo, name: str) -> None:
    """A tar member that is not a folder must be a plain file: links, devices, fifos and sparse files (whose
    holes tarfile fills with zeros it never reads, past any count) have no place in a data set."""
    if member.issym() or member.islnk():
        raise _not_a_file(name, f"a {'symbolic' if member.issym() else 'hard'} link")
    if not member.isreg():
        raise _not_a_file(name, "a device, fifo or other special file")
    if member.issparse():
        raise _not_a_file(name, "a sparse file")


def _not_a_file(name: str, kind: str) -> InputError:
    return InputError(
        f"archive member '{name}' is {kind}, not a plain file; create the archive again from plain files "
        "(e.g. `tar --dereference` or `zip` without `--symlinks`)"
    )


def _check_not_nested(name: str) -> None:
    if name.lower().endswith(NESTED_SUFFIXES):
        raise InputError(
            f"archive member '{name}' is itself an archive; unpack it and archive the images directly, "
            "one archive per upload"
        )


def _damaged(kind: str, error: BaseException) -> InputError:
    return InputError(f"the {kind} archive is damaged or truncated ({error_reason(error)}); create it again")


def _is_image_name(name: str) -> bool:
    """Image suffix, and not macOS or hidden clutter (`__MACOSX/`, `._photo.jpg`, `.DS_Store`)."""
    parts = PurePosixPath(name).parts
    clutter = any(part == "__MACOSX" or part.startswith(".") for part in parts)
    return not clutter and name.lower().endswith(IMAGE_SUFFIXES)


def _load_folders(
    members: Iterator[tuple[str, bytes | None]],
    input_size: int,
    classes: list[str] | None,
    num_classes: int | None,
    max_images: int | None,
) -> ImageSet:
    images: list[np.ndarray] = []
    folders: list[str] = []
    skipped = 0
    for name, content in members:
        if content is None:
            skipped += 1
            continue
        if max_images is not None and len(images) == max_images:
            raise TooManyImages(None, max_images)
        folders.append(_class_folder(name))
        images.append(_sized(decode_image(content, name), input_size))
    if not images:
        raise InputError(f"the archive holds no images ({skipped} other files were skipped); send {ACCEPTED}")
    names = _class_names(sorted(set(folders)), classes, num_classes)
    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index[folder] for folder in folders], dtype=np.int64)
    return ImageSet(np.stack(images), labels, names)


def _class_folder(name: str) -> str:
    parts = PurePosixPath(name).parts
    if len(parts) < 2:
        raise InputError(
            f"image '{name}' is not inside a class folder; arrange the archive as <class>/<image>, "
            "e.g. cat/0001.png"
        )
    return parts[-2]


def _sized(image: Image.Image, size: int) -> np.ndarray:
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _class_names(folders: list[str], classes: list[str] | None, num_classes: int | None) -> list[str]:
    """The label order: `classes` when given (every folder must be one of them), else the sorted folders."""
    if classes is not None:
        unknown = [folder for folder in folders if folder not in classes]
        if unknown:
            raise InputError(
                f"the archive's classes {unknown} are not among the classes {classes}; rename its folders (or "
                "an npz's `classes`) or fix the classes list"
            )
        return list(classes)
    if num_classes is not None and len(folders) > num_classes:
        raise InputError(
            f"the archive has {len(folders)} class folders ({', '.join(folders)}) but the model has "
            f"{num_classes} classes; remove the extra folders or correct num_classes"
        )
    return folders


# ---- npz arrays --------------------------------------------------------------------------------------


def _load_npz(path: Path, input_size: int, classes: list[str] | None, num_classes: int | None,
              max_images: int | None) -> ImageSet:
    x, y, stored = _read_arrays(path, max_images)
    images = _rgb_array(x)
    own = stored if stored is not None else classes
    labels = _labels(y, len(images), len(own) if own is not None else num_classes)
    if stored is not None and classes is not None:
        # y counts in the file's own order (`nad subset` writes sorted folder names), the job in `classes`'
        order = _class_names(stored, classes, num_classes)
        labels = np.array([order.index(name) for name in stored], dtype=np.int64)[labels]
    classes = classes if classes is not None else stored
    if images.shape[1:3] != (input_size, input_size):
        images = np.stack([_sized(Image.fromarray(image), input_size) for image in images])
    names = list(classes) if classes is not None else [str(i) for i in range(num_classes or int(labels.max()) + 1)]
    return ImageSet(np.ascontiguousarray(images), labels, names)


def _read_arrays(path: Path, max_images: int | None) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """x, y and, when the file names them (as `nad subset` writes), the class names in label order. An x of
    more than `max_images` images is refused from its header, before it is unpacked."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            members = [f"{key}.npy" for key in ("x", "y", "classes") if f"{key}.npy" in arrays.zip.namelist()]
            unpacked, shapes = 0, {}
            for member in members:
                size, shapes[member] = _npy_bytes(arrays.zip, member, unpacked)
                unpacked += size
            x, y = shapes.get("x.npy"), shapes.get("y.npy")
            if x and max_images is not None and x[0] > max_images:
                raise TooManyImages(x[0], max_images)
            if x and y is not None and math.prod(y) != x[0]:  # y's bound, checked before it is unpacked
                raise InputError(f"y has {math.prod(y)} labels for {x[0]} images; give one label per image")
            found = {member.removesuffix(".npy"): arrays[member] for member in members}
            keys = sorted(arrays.files)
    except InputError:
        raise
    except NPZ_ERRORS as error:
        raise InputError(
            f"the npz could not be read ({error_reason(error)}); save plain numeric arrays with "
            "np.savez(file, x=images, y=labels)"
        ) from None
    if "x" not in found or "y" not in found:
        shown = ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "")
        raise InputError(
            f"the npz needs arrays named x and y but holds [{shown}]; "
            "save it as np.savez(file, x=images, y=labels)"
        )
    names = found.get("classes")
    if names is not None and (names.ndim != 1 or names.dtype.kind != "U"):
        raise InputError("the npz's `classes` must be a 1-D array of strings, e.g. np.array(['cat', 'dog'])")
    classes = None if names is None else [_composed(name) for name in names.tolist()]
    if classes is not None and len(set(classes)) != len(classes):  # which of two labels would that name be?
        raise InputError("the npz's `classes` names a class more than once; give each class one name")
    return found["x"], found["y"], classes


def _npy_bytes(archive: zipfile.ZipFile, member: str, unpacked: int) -> tuple[int, tuple[int, ...]]:
    """The bytes and shape of the array in `member`, from its .npy header, before numpy allocates it: an
    object array (a pickle) is refused, and so is one past the caps on unpacked bytes and inflation, which a
    few kilobytes of compressed zeros could otherwise make numpy allocate."""
    with archive.open(member) as stream:
        version = np.lib.format.read_magic(stream)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = header(stream)
    if dtype.hasobject:
        raise InputError(
            f"'{member}' is an array of Python objects, which is a pickle; save plain numeric arrays with "
            "np.savez(file, x=images, y=labels)"
        )
    size = math.prod(shape) * dtype.itemsize
    # Labels are bounded by x's image count instead (the caller checks it): sorted labels compress a
    # thousandfold (np.savez_compressed), as no image does.
    packed = size if member == "y.npy" else archive.getinfo(member).compress_size
    _check_inflation(unpacked + size, size, packed, f"'{member}'")
    return size, shape


def _rgb_array(x: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x 3; grey N x H x W or N x H x W x 1 has its one channel repeated."""
    if x.dtype != np.uint8:
        raise InputError(
            f"x holds {x.dtype} values; it must be uint8 (0-255), e.g. (x * 255).round().astype(np.uint8)"
        )
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in (1, 3) or 0 in x.shape:
        raise InputError(f"x has shape {x.shape}; it must be N x H x W x 3 (or N x H x W grey), N > 0")
    return np.repeat(x, 3, axis=3) if x.shape[3] == 1 else x


def _labels(y: np.ndarray, count: int, num_classes: int | None) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"y holds {y.dtype} values; labels must be integers")
    if y.size != count:
        raise InputError(f"y has {y.size} labels for {count} images; give one label per image")
    labels = y.reshape(-1).astype(np.int64)
    upper = num_classes if num_classes is not None else np.iinfo(np.int64).max
    outside = labels[(labels < 0) | (labels >= upper)]
    if outside.size:
        limit = f"0 to {num_classes - 1}" if num_classes is not None else "non-negative"
        raise InputError(f"y holds labels outside {limit}, e.g. {int(outside[0])}; fix y or num_classes")
    return labels
