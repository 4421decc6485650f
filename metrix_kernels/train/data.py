"""Datasets of the paper in their standard on-disk layouts (SPEC 3), and scikit-learn's digits.

Every loader returns ``Splits``: train and test (and, for In-Shop, query and gallery) as lists of
(image path, class index), classes re-indexed from 0 within each split so proxies can be indexed.
A missing or malformed root raises ``DatasetLayoutError`` with the layout the loader expects.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

LAYOUTS = {
    "cub200": """CUB_200_2011/                 (pass this folder or its parent as --data-root)
  images/
    001.Black_footed_Albatross/*.jpg
    ...
    200.Common_Yellowthroat/*.jpg
classes 1-100 train, 101-200 test""",
    "cars196": """cars196/                      (pass this folder or its parent as --data-root)
  cars_annos.mat                annotations: relative_im_path, class (1-196)
  car_ims/000001.jpg ...
classes 1-98 train, 99-196 test""",
    "sop": """Stanford_Online_Products/     (pass this folder or its parent as --data-root)
  Ebay_train.txt                header, then: image_id class_id super_class_id path
  Ebay_test.txt                 same format
  bicycle_final/..., ...        the image paths listed in the two files""",
    "inshop": """Inshop_Clothes/               (pass this folder or its parent as --data-root)
  Eval/list_eval_partition.txt  count line, header line, then: image_name item_id train|query|gallery
  Img/<image_name>              e.g. Img/img/WOMEN/Dresses/id_00000002/02_1_front.jpg""",
}
FOLDERS = {"cub200": "CUB_200_2011", "cars196": "cars196", "sop": "Stanford_Online_Products", "inshop": "Inshop_Clothes"}
IMAGE_DATASETS = tuple(LAYOUTS)
DATASETS = ("digits", *IMAGE_DATASETS)


class DatasetLayoutError(FileNotFoundError):
    def __init__(self, dataset: str, root, problem: str):
        super().__init__(f"{dataset}: {problem} under {root}\nexpected layout:\n{LAYOUTS[dataset]}")


@dataclass
class Split:
    items: list  # image paths, or indices into an in-memory tensor
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(set(self.labels))


@dataclass
class Splits:
    train: Split
    test: Split  # queries for In-Shop's protocol
    gallery: Optional[Split] = None
    images: Optional[torch.Tensor] = field(default=None, repr=False)  # in-memory data (digits)


def _reindex(pairs: list[tuple]) -> Split:
    """Split from (item, original class id) pairs, classes renumbered 0.. in sorted order."""
    classes = {c: k for k, c in enumerate(sorted({c for _, c in pairs}))}
    return Split([p for p, _ in pairs], [classes[c] for _, c in pairs])


def _locate(dataset: str, root) -> Path:
    root = Path(root)
    for candidate in (root, root / FOLDERS[dataset]):
        if candidate.is_dir() and _marker(dataset, candidate).exists():
            return candidate
    raise DatasetLayoutError(dataset, root, f"{_marker(dataset, Path(FOLDERS[dataset]))} not found")


def _marker(dataset: str, folder: Path) -> Path:
    return folder / {"cub200": "images", "cars196": "cars_annos.mat", "sop": "Ebay_train.txt",
                     "inshop": "Eval/list_eval_partition.txt"}[dataset]


def _check_images(dataset: str, root: Path, split: Split, name: str) -> None:
    if len(split) == 0:
        raise DatasetLayoutError(dataset, root, f"the {name} split is empty")
    # every listed image, not only the first and last: a hole found mid-epoch costs the epoch (a stat
    # per image, about a second for SOP's 120,000)
    missing = [p for p in split.items if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetLayoutError(dataset, root, f"image {missing[0]} listed for {name} does not exist{more}")


def load_cub200(root) -> Splits:
    folder = _locate("cub200", root)
    train, test = [], []
    for class_dir in sorted((folder / "images").iterdir()):
        if not class_dir.is_dir():
            continue
        number = class_dir.name.split(".", 1)[0]
        if not number.isdigit():
            raise DatasetLayoutError("cub200", folder, f"class folder {class_dir.name!r} does not start with its number NNN.")
        target = train if int(number) <= 100 else test
        target += [(str(p), int(number)) for p in sorted(class_dir.glob("*.jpg"))]
    splits = Splits(_reindex(train), _reindex(test))
    _check_images("cub200", folder, splits.train, "train")
    _check_images("cub200", folder, splits.test, "test")
    return splits


def load_cars196(root) -> Splits:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    folder = _locate("cars196", root)
    try:
        annotations = loadmat(folder / "cars_annos.mat", squeeze_me=True)["annotations"]
        paths = np.atleast_1d(annotations["relative_im_path"])
        classes = np.atleast_1d(annotations["class"])
    except (KeyError, ValueError, TypeError, MatReadError) as error:
        raise DatasetLayoutError("cars196", folder, f"cars_annos.mat is not a MATLAB file with annotations(relative_im_path, class): {error}")
    train, test = [], []
    for path, cls in zip(paths, classes):
        (train if int(cls) <= 98 else test).append((str(folder / str(path)), int(cls)))
    splits = Splits(_reindex(train), _reindex(test))
    _check_images("cars196", folder, splits.train, "train")
    _check_images("cars196", folder, splits.test, "test")
    return splits


def _read_sop_list(folder: Path, name: str) -> Split:
    path = folder / name
    if not path.is_file():
        raise DatasetLayoutError("sop", folder, f"{name} not found")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines()[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4 or not fields[1].isdigit():
            raise DatasetLayoutError("sop", folder, f"{name} line {number} is not 'image_id class_id super_class_id path': {line!r}")
        pairs.append((str(folder / fields[3]), int(fields[1])))
    return _reindex(pairs)


def load_sop(root) -> Splits:
    folder = _locate("sop", root)
    splits = Splits(_read_sop_list(folder, "Ebay_train.txt"), _read_sop_list(folder, "Ebay_test.txt"))
    _check_images("sop", folder, splits.train, "train")
    _check_images("sop", folder, splits.test, "test")
    return splits


def load_inshop(root) -> Splits:
    folder = _locate("inshop", root)
    parts: dict[str, list] = {"train": [], "query": [], "gallery": []}
    lines = (folder / "Eval/list_eval_partition.txt").read_text().splitlines()
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or fields[2] not in parts:
            raise DatasetLayoutError(
                "inshop", folder, f"list_eval_partition.txt line {number} is not 'image_name item_id train|query|gallery': {line!r}"
            )
        parts[fields[2]].append((str(folder / "Img" / fields[0]), fields[1]))
    # query and gallery share their items: index them together
    shared = _reindex(parts["query"] + parts["gallery"])
    q = len(parts["query"])
    splits = Splits(_reindex(parts["train"]), Split(shared.items[:q], shared.labels[:q]),
                    Split(shared.items[q:], shared.labels[q:]))
    for name, split in (("train", splits.train), ("query", splits.test), ("gallery", splits.gallery)):
        _check_images("inshop", folder, split, name)
    return splits


def load_digits_splits() -> Splits:
    """scikit-learn's 1,797 real 8x8 handwritten digits: classes 0-4 train, 5-9 test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = (images - 0.5) / 0.5
    labels = digits.target.tolist()
    train = [(i, c) for i, c in enumerate(labels) if c < 5]
    test = [(i, c) for i, c in enumerate(labels) if c >= 5]
    return Splits(_reindex(train), _reindex(test), images=images)


def load(dataset: str, root=None) -> Splits:
    if dataset == "digits":
        return load_digits_splits()
    if dataset not in IMAGE_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}")
    if root is None:
        raise DatasetLayoutError(dataset, "<no --data-root given>", "no data root")
    return {"cub200": load_cub200, "cars196": load_cars196, "sop": load_sop, "inshop": load_inshop}[dataset](root)


class SplitDataset(torch.utils.data.Dataset):
    """(image tensor, label, index) of a split; images decoded with PIL, or taken from memory."""

    def __init__(self, split: Split, transform: Optional[Callable] = None, images: Optional[torch.Tensor] = None):
        self.split, self.transform, self.images = split, transform, images

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        item = self.split.items[index]
        if self.images is not None:
            x = self.images[item]
        else:
            from PIL import Image

            with Image.open(item) as image:
                x = image.convert("RGB")
        if self.transform is not None:
            x = self.transform(x)
        return x, self.split.labels[index], index


def image_transforms(size: int, train: bool):
    """The recipe's augmentation: RandomResizedCrop + flip to train, Resize(size * 8/7) + CenterCrop to test."""
    from torchvision import transforms as T

    normalize = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    if train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return T.Compose([T.Resize(round(size * 8 / 7)), T.CenterCrop(size), T.ToTensor(), normalize])
