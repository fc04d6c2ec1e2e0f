import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.engine import data
from core.engine.data import ImageSet, load_images, stratified_split
from core.engine.errors import InputError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10 = SHARED / "datasets" / "cifar10"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _pixels(seed: int, size: tuple[int, int] = (32, 32), channels: int = 3) -> np.ndarray:
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def _tar(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    """A name ending in / is a folder (zipfile makes one of such a name too)."""
    with tarfile.open(path, mode) as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name.rstrip("/"))
            info.type = tarfile.DIRTYPE if name.endswith("/") else tarfile.REGTYPE
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    with path.open("wb") as stream:
        np.savez(stream, **arrays)
    return path


# Four PNGs in two classes, "dog" before "cat" in the archive so sorting is visible.
TREE = {
    "train/dog/0.png": _encode(_pixels(0)),
    "train/cat/1.png": _encode(_pixels(1)),
    "train/dog/2.png": _encode(_pixels(2)),
    "train/cat/3.png": _encode(_pixels(3)),
}

# The folders' own members, which `zip -r` and `tar -c` list ahead of their files.
FOLDERS = {"train/": b"", "train/cat/": b"", "train/dog/": b""}


@pytest.mark.parametrize(
    "make",
    [
        lambda tmp: _zip(tmp / "data.zip", TREE),
        lambda tmp: _tar(tmp / "data.tar", TREE),
        lambda tmp: _tar(tmp / "data.tar.gz", TREE, "w:gz"),
        lambda tmp: _tar(tmp / "data.tgz", TREE, "w:gz"),
        lambda tmp: _zip(tmp / "data.zip", FOLDERS | TREE),
        lambda tmp: _tar(tmp / "data.tar", FOLDERS | TREE),
    ],
    ids=["zip", "tar", "tar.gz", "tgz", "zip-with-folders", "tar-with-folders"],
)
def test_folder_archives_load_with_sorted_class_indices(tmp_path, make):
    """`zip -r` and `tar -c` of a folder list each folder as a member of its own too."""
    loaded = load_images(make(tmp_path), 32)
    assert loaded.classes == ["cat", "dog"]
    assert loaded.labels.dtype == np.int64 and loaded.labels.tolist() == [1, 0, 1, 0]
    assert loaded.images.dtype == np.uint8 and loaded.images.shape == (4, 32, 32, 3)
    for i in range(4):
        np.testing.assert_array_equal(loaded.images[i], _pixels(i))


def test_format_is_read_from_content_not_name(tmp_path):
    tgz = _tar(tmp_path / "upload.tar.gz", TREE, "w:gz")
    stored = tmp_path / "upload-17"
    stored.write_bytes(tgz.read_bytes())
    assert load_images(stored, 32).labels.tolist() == [1, 0, 1, 0]


def test_explicit_classes_set_the_label_order(tmp_path):
    loaded = load_images(_zip(tmp_path / "d.zip", TREE), 32, classes=["dog", "bird", "cat"], num_classes=3)
    assert loaded.classes == ["dog", "bird", "cat"]
    assert loaded.labels.tolist() == [0, 2, 0, 2]


def test_folder_outside_the_classes_is_named(tmp_path):
    with pytest.raises(InputError) as caught:
        load_images(_zip(tmp_path / "d.zip", TREE), 32, classes=["dog", "bird"])
    assert "cat" in str(caught.value) and "bird" in str(caught.value)


def test_more_folders_than_num_classes_is_an_error(tmp_path):
    with pytest.raises(InputError, match="2 class folders"):
        load_images(_zip(tmp_path / "d.zip", TREE), 32, num_classes=1)


def test_as_many_or_fewer_folders_than_num_classes_load(tmp_path):
    """A model's classes may all have a folder, or some none (a test set without one class)."""
    path = _zip(tmp_path / "d.zip", TREE)
    assert load_images(path, 32, num_classes=2).classes == ["cat", "dog"]
    assert load_images(path, 32, num_classes=3).labels.tolist() == [1, 0, 1, 0]


def test_leading_folders_are_optional(tmp_path):
    members = {"cat/a.png": _encode(_pixels(0)), "some/deep/prefix/dog/b.png": _encode(_pixels(1))}
    loaded = load_images(_zip(tmp_path / "d.zip", members), 32)
    assert loaded.classes == ["cat", "dog"] and loaded.labels.tolist() == [0, 1]


def test_other_sizes_are_resized_bilinear_and_exact_sizes_kept(tmp_path):
    wide = _pixels(5, size=(40, 20))
    members = {"cat/wide.png": _encode(wide), "cat/exact.png": _encode(_pixels(6, size=(16, 16)))}
    loaded = load_images(_zip(tmp_path / "d.zip", members), 16)
    expected = np.asarray(Image.fromarray(wide).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(loaded.images[0], expected)
    np.testing.assert_array_equal(loaded.images[1], _pixels(6, size=(16, 16)))


def test_grey_rgba_and_jpeg_images_become_rgb(tmp_path):
    grey = _pixels(7, channels=1)
    rgba = _pixels(8, channels=4)
    jpeg = _encode(_pixels(9), "JPEG")
    members = {"c/grey.png": _encode(grey), "c/rgba.PNG": _encode(rgba), "c/photo.JPG": jpeg}
    loaded = load_images(_zip(tmp_path / "d.zip", members), 32)
    np.testing.assert_array_equal(loaded.images[0], np.repeat(grey[..., None], 3, axis=2))
    np.testing.assert_array_equal(loaded.images[1], rgba[..., :3])
    np.testing.assert_array_equal(loaded.images[2], np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))


def test_sixteen_bit_grey_is_scaled_to_eight_bits_not_clipped_white(tmp_path):
    """A 16-bit grey PNG (a scanner's, a medical image's) opens in Pillow's I;16 mode, whose convert("RGB")
    clips every value above 255: half grey came out white."""
    grey = np.array([[0, 32768], [65535, 1000]], np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "PNG")
    loaded = load_images(_zip(tmp_path / "d.zip", {"c/deep.png": buffer.getvalue()}), 2)
    np.testing.assert_array_equal(loaded.images[0][..., 0], [[0, 128], [255, 3]])


def test_folder_names_match_in_composed_and_decomposed_unicode(tmp_path):
    """macOS stores names decomposed: its café/ is e + a combining accent, Linux's one character."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    loaded = load_images(_zip(tmp_path / "d.zip", {f"{decomposed}/0.png": TREE["train/dog/0.png"],
                                                   "tea/1.png": TREE["train/cat/1.png"]}), 32, [composed, "tea"], 2)
    assert loaded.classes == [composed, "tea"] and loaded.labels.tolist() == [0, 1]


@pytest.mark.parametrize("encoding", ["utf-8", "cp437"], ids=["zip-r", "windows"])
def test_zip_names_are_read_as_their_archiver_wrote_them(tmp_path, encoding):
    """Python's zipfile marks a name UTF-8; Info-ZIP's `zip -r` writes UTF-8 without the mark, and a zip of
    an older Windows writes cp437, the format's own. Either way the folder is zéro, not z├⌐ro."""
    raw = "zéro".encode(encoding)
    stand_in = b"z" + b"_" * (len(raw) - 3) + b"ro"  # ASCII, so zipfile sets no flag; then the real bytes
    path = _zip(tmp_path / "d.zip", {f"{stand_in.decode()}/0.png": TREE["train/dog/0.png"],
                                     "un/1.png": TREE["train/cat/1.png"]})
    path.write_bytes(path.read_bytes().replace(stand_in, raw))
    assert load_images(path, 32).classes == ["un", "zéro"]


def test_clutter_is_skipped(tmp_path):
    members = {
        "train/cat/0.png": _encode(_pixels(0)),
        "__MACOSX/train/cat/._0.png": b"\x00\x05\x16\x07 AppleDouble",
        "train/cat/._1.png": b"AppleDouble",
        "train/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "README.md": b"# my data",
        "train/cat/labels.txt": b"cat",
    }
    loaded = load_images(_tar(tmp_path / "d.tar", members), 32)
    assert loaded.classes == ["cat"] and len(loaded.labels) == 1


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a jpeg at all", "is not a PNG/JPEG"),
        (_encode(_pixels(0), "JPEG")[:300], "could not be decoded"),
    ],
    ids=["garbage", "truncated"],
)
def test_undecodable_image_is_named(tmp_path, content, reason):
    members = {"train/cat/0.png": _encode(_pixels(0)), "train/cat/broken.jpg": content}
    with pytest.raises(InputError, match=reason) as caught:
        load_images(_zip(tmp_path / "d.zip", members), 32)
    assert "train/cat/broken.jpg" in str(caught.value)


def test_only_the_accepted_decoders_run(tmp_path):
    """A TIFF named .png is refused: a name must not choose a decoder outside the accepted formats."""
    members = {"cat/sneaky.png": _encode(_pixels(0), "TIFF")}
    with pytest.raises(InputError, match="sneaky.png"):
        load_images(_zip(tmp_path / "d.zip", members), 32)


def test_image_outside_a_class_folder_is_an_error(tmp_path):
    with pytest.raises(InputError, match="not inside a class folder"):
        load_images(_zip(tmp_path / "d.zip", {"loose.png": _encode(_pixels(0))}), 32)


@pytest.mark.parametrize(
    "members", [{}, {"README.txt": b"hello", "cat/notes.csv": b"a,b"}], ids=["empty", "no-images"]
)
def test_archive_without_images_is_an_error(tmp_path, members):
    with pytest.raises(InputError, match="holds no images"):
        load_images(_zip(tmp_path / "d.zip", members), 32)


def test_unknown_format_lists_accepted_ones_and_hides_the_path(tmp_path):
    path = tmp_path / "data.rar"
    path.write_bytes(b"Rar!\x1a\x07\x00" + bytes(600))
    with pytest.raises(InputError) as caught:
        load_images(path, 32)
    message = str(caught.value)
    assert ".zip" in message and ".tar.gz" in message and ".npz" in message
    assert str(tmp_path) not in message


def test_truncated_archive_is_an_input_error(tmp_path):
    whole = _tar(tmp_path / "d.tgz", TREE, "w:gz").read_bytes()
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError) as caught:
        load_images(cut, 32)
    assert str(tmp_path) not in str(caught.value)


@pytest.mark.parametrize(
    ("kind", "message"),
    [(tarfile.SYMTYPE, "a symbolic link"), (tarfile.LNKTYPE, "a hard link"), (tarfile.CHRTYPE, "a device"),
     (tarfile.BLKTYPE, "a device"), (tarfile.FIFOTYPE, "fifo")],
    ids=["symlink", "hardlink", "char-device", "block-device", "fifo"],
)
def test_tar_links_and_devices_are_refused_by_name(tmp_path, kind, message):
    """A data set holds none, so a link or device is a probe: refused, not silently skipped."""
    path = _tar(tmp_path / "d.tar", {"cat/0.png": _encode(_pixels(0))})
    with tarfile.open(path, "a") as archive:
        info = tarfile.TarInfo("cat/odd.png")
        info.type, info.linkname = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else "cat/0.png"
        archive.addfile(info)
    with pytest.raises(InputError, match=message) as caught:
        load_images(path, 32)
    assert "'cat/odd.png'" in str(caught.value)


def test_images_above_the_pixel_cap_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_SOURCE_PIXELS", 32 * 32 - 1)
    with pytest.raises(InputError, match="32x32 pixels"):
        load_images(_zip(tmp_path / "d.zip", {"cat/big.png": _encode(_pixels(0))}), 32)


def test_pillow_decompression_bomb_warning_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # warns above 600 pixels, raises above 1200
    with pytest.raises(InputError, match="big.png"):
        load_images(_zip(tmp_path / "d.zip", {"cat/big.png": _encode(_pixels(0, size=(28, 28)))}), 28)


# ---- npz ----------------------------------------------------------------------------------------------


def test_npz_rgb_loads_as_is(tmp_path):
    x = np.stack([_pixels(i) for i in range(3)])
    loaded = load_images(_npz(tmp_path / "d.npz", x=x, y=np.array([2, 0, 1])), 32)
    np.testing.assert_array_equal(loaded.images, x)
    assert loaded.labels.dtype == np.int64 and loaded.labels.tolist() == [2, 0, 1]
    assert loaded.classes == ["0", "1", "2"]


@pytest.mark.parametrize("grey_shape", [(2, 8, 8), (2, 8, 8, 1)], ids=["NHW", "NHW1"])
def test_npz_grey_is_replicated_to_three_channels(tmp_path, grey_shape):
    x = np.random.default_rng(0).integers(0, 256, grey_shape, dtype=np.uint8)
    loaded = load_images(_npz(tmp_path / "d.npz", x=x, y=np.array([0, 1])), 8)
    assert loaded.images.shape == (2, 8, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(loaded.images[..., channel], x.reshape(2, 8, 8))


def test_npz_is_resized_and_named_by_classes_or_num_classes(tmp_path):
    x = np.stack([_pixels(i, size=(20, 20)) for i in range(2)])
    path = _npz(tmp_path / "d.npz", x=x, y=np.array([0, 1]))
    loaded = load_images(path, 10, num_classes=4)
    assert loaded.images.shape == (2, 10, 10, 3) and loaded.classes == ["0", "1", "2", "3"]
    expected = np.asarray(Image.fromarray(x[1]).resize((10, 10), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(loaded.images[1], expected)
    assert load_images(path, 20, classes=["a", "b"]).classes == ["a", "b"]


def test_npz_is_recognised_inside_a_zip_of_any_name(tmp_path):
    npz = _npz(tmp_path / "d.npz", x=np.zeros((1, 4, 4, 3), np.uint8), y=np.array([0]))
    stored = tmp_path / "upload.bin"
    stored.write_bytes(npz.read_bytes())
    assert load_images(stored, 4).images.shape == (1, 4, 4, 3)
    # Other array names too (the service stores uploads without a suffix): the npz's own message, not "no images"
    other = _npz(tmp_path / "e.npz", images=np.zeros((1, 4, 4, 3), np.uint8), labels=np.zeros(1))
    stored.write_bytes(other.read_bytes())
    with pytest.raises(InputError, match=r"arrays named x and y but holds \[images, labels\]"):
        load_images(stored, 4)


def test_a_compressed_npz_of_many_sorted_labels_is_no_bomb(tmp_path):
    """np.savez_compressed shrinks 140,000 sorted int64 labels a thousandfold, past the ratio a bomb is known by;
    y is bounded by x's image count instead, checked from the headers before anything is unpacked."""
    count = 140_000
    x = np.random.default_rng(0).integers(0, 256, (count, 1, 1, 3), dtype=np.uint8)
    path = tmp_path / "many.npz"
    np.savez_compressed(path, x=x, y=np.repeat(np.arange(10), count // 10))
    assert load_images(path, 1).labels.shape == (count,)
    np.savez_compressed(path, x=x, y=np.zeros(count + 1, np.int64))
    with pytest.raises(InputError, match="140001 labels for 140000 images"):
        load_images(path, 1)


@pytest.mark.parametrize(
    ("y", "kwargs", "message"),
    [
        (np.array([0, 3]), {"num_classes": 3}, "0 to 2"),
        (np.array([0, 2]), {"classes": ["a", "b"]}, "0 to 1"),
        (np.array([0, -1]), {}, "non-negative"),
        (np.array([0.0, 1.0]), {}, "integers"),
        (np.array([0, 1, 1]), {}, "3 labels for 2 images"),
    ],
    ids=["above-num-classes", "above-classes", "negative", "float", "count"],
)
def test_npz_bad_labels_are_errors(tmp_path, y, kwargs, message):
    path = _npz(tmp_path / "d.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=y)
    with pytest.raises(InputError, match=message):
        load_images(path, 4, **kwargs)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 4, 4, 3), np.float32), "y": np.array([0, 1])}, "uint8"),
        ({"x": np.zeros((2, 4, 4, 4), np.uint8), "y": np.array([0, 1])}, "N x H x W x 3"),
        ({"x": np.zeros((2, 4, 4, 2), np.uint8), "y": np.array([0, 1])}, "N x H x W x 3"),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([0, 1])}, "images, labels"),
        ({"x": np.array([object(), 1], dtype=object), "y": np.array([0, 1])}, "Python objects"),
    ],
    ids=["float", "four-channels", "two-channels", "wrong-keys", "pickled"],
)
def test_npz_bad_arrays_are_errors(tmp_path, arrays, message):
    with pytest.raises(InputError, match=message):
        load_images(_npz(tmp_path / "d.npz", **arrays), 4)


# ---- splits and subsets -------------------------------------------------------------------------------


def test_stratified_split_covers_every_class():
    labels = np.array([0] * 50 + [1] * 10 + [2] * 2 + [3])
    keep, holdout = stratified_split(labels, 0.2, seed=0)
    assert keep.dtype == holdout.dtype == np.int64
    assert sorted(np.concatenate([keep, holdout]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[holdout], minlength=4).tolist() == [10, 2, 1, 0]
    assert set(labels[keep].tolist()) == {0, 1, 2, 3}


def test_stratified_split_keeps_an_image_of_every_class_even_at_a_large_fraction():
    """A class of two or more images always has at least one image on each side, however large the fraction."""
    labels = np.array([0] * 2 + [1] * 5 + [2] * 20)
    keep, holdout = stratified_split(labels, 0.95, seed=0)
    assert np.bincount(labels[keep], minlength=3).tolist() == [1, 1, 1]
    assert np.bincount(labels[holdout], minlength=3).tolist() == [1, 4, 19]


def test_stratified_split_is_deterministic_per_seed():
    labels = np.random.default_rng(0).integers(0, 5, 500)
    first, second, other = (stratified_split(labels, 0.1, seed) for seed in (3, 3, 4))
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_stratified_split_rejects_fractions_outside_zero_one(fraction):
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(np.array([0, 1]), fraction, seed=0)


def test_subset_keeps_classes():
    images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    full = ImageSet(images, np.array([0, 1, 0, 1]), ["a", "b"])
    part = full.subset(np.array([3, 0]))
    np.testing.assert_array_equal(part.images, images[[3, 0]])
    assert part.labels.tolist() == [1, 0] and part.classes == ["a", "b"]


# ---- the shared CIFAR-10 copy ---------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.skipif(not (CIFAR10 / "test.tar.gz").is_file(), reason="../shared/datasets/cifar10 is absent")
def test_shared_cifar10_test_set_loads_whole():
    loaded = load_images(CIFAR10 / "test.tar.gz", 32, num_classes=10)
    assert loaded.images.shape == (10_000, 32, 32, 3) and loaded.images.dtype == np.uint8
    assert loaded.classes == CIFAR10_CLASSES == sorted(CIFAR10_CLASSES)
    assert np.bincount(loaded.labels).tolist() == [1000] * 10
    assert 100 < loaded.images.mean() < 150  # real photos, not blank frames


def test_npz_class_names_are_kept(tmp_path):
    path = tmp_path / "named.npz"
    np.savez(path, x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0, 1]), classes=np.array(["cat", "dog"]))
    assert load_images(path, 4).classes == ["cat", "dog"]


def test_an_npz_with_its_own_class_names_is_relabelled_to_the_jobs_class_order(tmp_path):
    """`nad subset` writes sorted folder names with y; a job whose `classes` number them otherwise (or the
    clean data's order, for a test set) gets each image under its class's name, not under the file's number."""
    path = tmp_path / "named.npz"
    x = np.stack([np.full((4, 4, 3), value, np.uint8) for value in (10, 240, 10)])  # cat, dog, cat
    np.savez(path, x=x, y=np.array([0, 1, 0]), classes=np.array(["cat", "dog"]))
    loaded = load_images(path, 4, ["dog", "bird", "cat"], 3)
    assert loaded.classes == ["dog", "bird", "cat"] and loaded.labels.tolist() == [2, 0, 2]
    with pytest.raises(InputError, match=r"classes \['horse'\] are not among the classes"):
        np.savez(path, x=x, y=np.array([0, 1, 0]), classes=np.array(["cat", "horse"]))
        load_images(path, 4, ["dog", "cat"], 2)
    # a file that lies: one name for two labels would merge two classes into one, silently
    with pytest.raises(InputError, match="names a class more than once"):
        np.savez(path, x=x, y=np.array([0, 1, 0]), classes=np.array(["cat", "cat"]))
        load_images(path, 4, ["dog", "cat"], 2)
