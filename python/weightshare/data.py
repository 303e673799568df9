"""MNIST from the bundled IDX files: verified, decoded once, split deterministically.

The four gzip files in <repo>/data/mnist/ (or in $WS_DATA_DIR) are checked before anything is decoded: the md5
of each .gz, then the IDX header (big-endian magic number, dimension sizes), the payload length, and the
per-class label counts. Any mismatch raises a ValueError that names the file, so a corrupt or truncated copy can
never turn into silently wrong training data. Nothing is ever downloaded.

Normalisation (where it is applied): `load_mnist` returns raw pixels scaled to [0, 1]; `mnist_splits` returns
datasets already normalised with (MNIST_MEAN, MNIST_STD) unless `normalize=False`. Every model in
`weightshare.models` is trained and evaluated on normalised inputs (`weightshare.train` uses `mnist_splits`), so
code that feeds `load_mnist` images to a trained model must call `normalize` first.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

# Mean and standard deviation of the training pixels (scaled to [0, 1]); the customary MNIST constants.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

IMAGE_MAGIC = 2051  # IDX: 0x0000 0803 = unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049  # IDX: 0x0000 0801 = unsigned bytes, 1 dimension
IMAGE_SIZE = 28


class _SplitFiles(NamedTuple):
    images: str
    images_md5: str
    labels: str
    labels_md5: str
    label_counts: tuple[int, ...]  # examples of digit 0..9


# Checksums from data/mnist/README.md; label counts are those of the original distribution.
_SPLITS: dict[str, _SplitFiles] = {
    "train": _SplitFiles(
        "train-images-idx3-ubyte.gz", "c7dfcf1bfd3481a40f7b3aedbdbd083c",
        "train-labels-idx1-ubyte.gz", "d289298a347a2cc65765a3c81043ba88",
        (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    ),
    "test": _SplitFiles(
        "t10k-images-idx3-ubyte.gz", "ecff87aa27c74fbc2c1f97e89c19221d",
        "t10k-labels-idx1-ubyte.gz", "a38049bc042dc6e683842a84160daae1",
        (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    ),
}


class MnistSplits(NamedTuple):
    """Train / validation (held out from the training files) / test datasets of (image, label) pairs."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset


def data_dir() -> Path:
    """The MNIST folder: $WS_DATA_DIR if set, else <repo>/data/mnist (this file is <repo>/python/weightshare/)."""
    env = os.environ.get("WS_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "data" / "mnist"


def normalize(images: Tensor) -> Tensor:
    """Map [0, 1] pixels to the zero-mean, unit-variance inputs the models are trained on (returns a new tensor)."""
    return (images - MNIST_MEAN) / MNIST_STD


def _read_verified_gzip(path: Path, expected_md5: str) -> bytes:
    """The decompressed contents of `path`, after checking the md5 of the compressed file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST file {path} not found (set WS_DATA_DIR to a folder holding the four IDX .gz files; "
            "nothing is downloaded)")
    raw = path.read_bytes()
    actual = hashlib.md5(raw).hexdigest()
    if actual != expected_md5:
        raise ValueError(f"MNIST file {path}: md5 {actual} does not match the expected {expected_md5} "
                         "(corrupt, truncated or a different file)")
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # unreachable with a matching md5, kept as a second guard
        raise ValueError(f"MNIST file {path}: not a valid gzip stream ({exc})") from exc


def parse_idx(payload: bytes, expected_magic: int, expected_dims: tuple[int, ...], name: str) -> np.ndarray:
    """Decode an uncompressed IDX buffer of unsigned bytes into a read-only uint8 array of `expected_dims`.

    The header is: a big-endian uint32 magic number (0x08 = ubyte in byte 3, the rank in byte 4), then one
    big-endian uint32 per dimension. `name` is only used in error messages.
    """
    rank = len(expected_dims)
    header_len = 4 * (1 + rank)
    if len(payload) < header_len:
        raise ValueError(f"MNIST file {name}: {len(payload)} bytes is too short for an IDX header")
    header = np.frombuffer(payload, dtype=">u4", count=1 + rank)
    magic, dims = int(header[0]), tuple(int(d) for d in header[1:])
    if magic != expected_magic:
        raise ValueError(f"MNIST file {name}: IDX magic number {magic}, expected {expected_magic}")
    if dims != expected_dims:
        raise ValueError(f"MNIST file {name}: IDX dimensions {dims}, expected {expected_dims}")
    expected_len = header_len + int(np.prod(dims))
    if len(payload) != expected_len:
        raise ValueError(f"MNIST file {name}: {len(payload)} bytes after decompression, expected {expected_len}")
    array = np.frombuffer(payload, dtype=np.uint8, offset=header_len).reshape(dims)
    array.flags.writeable = False  # shared by the cache: nobody may modify it in place
    return array


def check_label_counts(labels: np.ndarray, expected: tuple[int, ...], name: str) -> None:
    """Raise if the labels are outside 0..9 or their per-class counts differ from `expected`."""
    if labels.size and int(labels.max()) >= len(expected):
        raise ValueError(f"MNIST file {name}: label {int(labels.max())} is outside 0..{len(expected) - 1}")
    counts = tuple(int(c) for c in np.bincount(labels, minlength=len(expected)))
    if counts != tuple(expected):
        raise ValueError(f"MNIST file {name}: label counts {counts}, expected {tuple(expected)}")


def _file_stamp(path: Path) -> tuple[int, int]:
    """(size, mtime) of a file, or (-1, -1) if missing: part of the cache key so an edited file is re-verified."""
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _decoded_split(folder: str, split: str, _stamps: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Verified uint8 images [N, 28, 28] and labels [N] of one split (cached; both arrays are read-only)."""
    files = _SPLITS[split]
    n = sum(files.label_counts)
    image_path, label_path = Path(folder) / files.images, Path(folder) / files.labels
    images = parse_idx(_read_verified_gzip(image_path, files.images_md5), IMAGE_MAGIC,
                       (n, IMAGE_SIZE, IMAGE_SIZE), str(image_path))
    labels = parse_idx(_read_verified_gzip(label_path, files.labels_md5), LABEL_MAGIC, (n,), str(label_path))
    check_label_counts(labels, files.label_counts, str(label_path))
    return images, labels


def load_mnist(split: str = "train") -> tuple[Tensor, Tensor]:
    """One MNIST split as (images float32 [N, 1, 28, 28] in [0, 1], labels int64 [N]); N = 60000 or 10000.

    Pixels are not normalised here (see `normalize`). The verified, decoded bytes are cached in memory, so
    repeated calls only pay for the float conversion; the returned tensors are fresh copies the caller may modify.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    folder = data_dir()
    files = _SPLITS[split]
    stamps = (_file_stamp(folder / files.images), _file_stamp(folder / files.labels))
    images_u8, labels_u8 = _decoded_split(str(folder), split, stamps)
    images = torch.from_numpy(images_u8.astype(np.float32)).div_(255.0).unsqueeze(1)
    labels = torch.from_numpy(labels_u8.astype(np.int64))
    return images, labels


def mnist_splits(val_size: int = 5000, seed: int = 0, normalize: bool = True) -> MnistSplits:
    """Train / validation / test datasets; validation is `val_size` examples held out of the 60000 training ones.

    The held-out indices come from a permutation drawn with a generator seeded by `seed` (independent of the
    global RNG), so the same (val_size, seed) always gives the same split; both parts keep the files' order.
    Compression checks its accuracy constraint on `val` and reports `test` separately. Images are normalised
    with (MNIST_MEAN, MNIST_STD) unless `normalize=False`.
    """
    train_images, train_labels = load_mnist("train")
    test_images, test_labels = load_mnist("test")
    n = train_labels.numel()
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    generator = torch.Generator().manual_seed(seed)
    held_out = torch.zeros(n, dtype=torch.bool)
    held_out[torch.randperm(n, generator=generator)[:val_size]] = True
    if normalize:
        train_images, test_images = _normalize_(train_images), _normalize_(test_images)
    return MnistSplits(
        train=TensorDataset(train_images[~held_out], train_labels[~held_out]),
        val=TensorDataset(train_images[held_out], train_labels[held_out]),
        test=TensorDataset(test_images, test_labels),
    )


def _normalize_(images: Tensor) -> Tensor:
    """In-place `normalize` for the fresh tensors `load_mnist` returns (avoids a second 190 MB copy)."""
    return images.sub_(MNIST_MEAN).div_(MNIST_STD)
