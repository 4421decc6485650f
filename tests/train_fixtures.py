"""Tiny dataset trees in the standard layouts of SPEC 3, written into a test's tmp_path."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _jpeg(path: Path, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_cub(root: Path, classes=(1, 2, 3, 101, 102), per_class: int = 4) -> Path:
    folder = root / "CUB_200_2011"
    for c in classes:
        for k in range(per_class):
            _jpeg(folder / "images" / f"{c:03d}.Bird_{c}" / f"Bird_{c}_{k:04d}.jpg", c * 100 + k)
    return folder


def make_cars(root: Path, classes=(1, 2, 99, 100), per_class: int = 3) -> Path:
    from scipy.io import savemat

    folder = root / "cars196"
    records = []
    for c in classes:
        for k in range(per_class):
            name = f"car_ims/{len(records) + 1:06d}.jpg"
            _jpeg(folder / name, len(records))
            records.append((name, 1, 1, 10, 10, c, 0))
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    table = np.array(records, dtype=[(f, object) for f in fields])
    savemat(folder / "cars_annos.mat", {"annotations": table[None, :]})
    return folder


def make_sop(root: Path) -> Path:
    folder = root / "Stanford_Online_Products"
    for name, classes in (("Ebay_train.txt", (1, 2, 3)), ("Ebay_test.txt", (11319, 11320))):
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            for k in range(2):
                path = f"bicycle_final/{c}_{k}.JPG"
                _jpeg(folder / path, c * 10 + k)
                lines.append(f"{len(lines)} {c} 1 {path}")
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def make_inshop(root: Path) -> Path:
    folder = root / "Inshop_Clothes"
    rows = []
    for item, status in (("id_00000001", "train"), ("id_00000002", "train"), ("id_00000003", "query"),
                         ("id_00000003", "gallery"), ("id_00000004", "query"), ("id_00000004", "gallery")):
        for k in range(2):
            name = f"img/WOMEN/Dresses/{item}/{status}_{k}_front.jpg"
            _jpeg(folder / "Img" / name, len(rows))
            rows.append(f"{name} {item} {status}")
    (folder / "Eval").mkdir(parents=True)
    text = [str(len(rows)), "image_name item_id evaluation_status", *rows]
    (folder / "Eval/list_eval_partition.txt").write_text("\n".join(text) + "\n")
    return folder
