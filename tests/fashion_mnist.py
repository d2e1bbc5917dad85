"""Real images for tests: a few Fashion-MNIST pictures per class, as PNG bytes.

The files come from Debian's ``dataset-fashion-mnist`` package (the idx files of Zalando's
Fashion-MNIST, gzipped, under ``usr/share/datasets/fashion-mnist``). If the package is not
installed, ``apt-get download`` fetches the .deb (no root needed) and ``dpkg-deb -x`` unpacks it
into ``.cache/fashion-mnist`` at the repository root (ignored by git), once.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Class names in label order (from the dataset's README).
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
PACKAGE = "dataset-fashion-mnist"
PACKAGE_DIR = Path("usr/share/datasets/fashion-mnist")  # inside the package
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class FashionMnistUnavailableError(RuntimeError):
    """The files are not here and the package could not be fetched (no apt-get, no network)."""


@dataclass(frozen=True)
class Picture:
    """One Fashion-MNIST image: a 28x28 grayscale PNG, its class name, its index in the split."""

    png: bytes
    label: str
    index: int


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FILES.values() for name in pair)


def data_dir(cache: Path = CACHE) -> Path:
    """The folder holding the four gzipped idx files, fetching the package on first use."""
    installed = Path("/") / PACKAGE_DIR
    if _complete(installed):
        return installed
    if _complete(cache):
        return cache
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FashionMnistUnavailableError("apt-get and dpkg-deb are needed to fetch " + PACKAGE)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Unpack next to the cache and rename at the end: parallel test runs never see half a folder.
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        work = Path(tmp)
        fetched = subprocess.run(
            ["apt-get", "download", PACKAGE], cwd=work, capture_output=True, text=True
        )
        debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
        if fetched.returncode != 0 or not debs:
            raise FashionMnistUnavailableError(
                f"apt-get download {PACKAGE} failed: {fetched.stderr.strip()[-500:]}"
            )
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")], check=True)
        unpacked = work / "root" / PACKAGE_DIR
        if not _complete(unpacked):
            raise FashionMnistUnavailableError(
                f"{debs[0].name} does not hold the expected idx files"
            )
        try:
            os.replace(unpacked, cache)
        except OSError:  # another run got there first
            if not _complete(cache):
                raise
    return cache


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file: big-endian magic (0x0803 images, 0x0801 labels), dimension sizes, uint8s."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = magic & 0xFF
    found, *dims = struct.unpack(f">{1 + ndim}I", data[: 4 * (1 + ndim)])
    if found != magic:
        raise ValueError(f"{path.name}: magic {found:#x}, expected {magic:#x}")
    return np.frombuffer(data, np.uint8, offset=4 * (1 + ndim)).reshape(dims)


def load_pictures(per_class: int = 3, split: str = "test", cache: Path = CACHE) -> list[Picture]:
    """The first ``per_class`` images of each class in ``split`` (``"test"`` or ``"train"``), in
    file order, as PNG bytes with their class names."""
    from PIL import Image as PILImage

    images_file, labels_file = FILES[split]
    folder = data_dir(cache)
    images = _read_idx(folder / images_file, 0x0803)
    labels = _read_idx(folder / labels_file, 0x0801)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    pictures = []
    for label in range(len(CLASSES)):
        for index in np.flatnonzero(labels == label)[:per_class]:
            buffer = io.BytesIO()
            PILImage.fromarray(images[index]).save(buffer, format="PNG")
            pictures.append(Picture(buffer.getvalue(), CLASSES[label], int(index)))
    return pictures
