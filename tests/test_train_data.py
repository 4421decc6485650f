import re
from pathlib import Path

import pytest
import torch

from metrix_kernels.train import data
from metrix_kernels.train.sampling import BalancedBatchSampler, RandomBatchSampler

from train_fixtures import make_cars, make_cub, make_inshop, make_sop


def test_cub_split_by_class_number(tmp_path):
    make_cub(tmp_path)
    for root in (tmp_path, tmp_path / "CUB_200_2011"):
        splits = data.load("cub200", root)
        assert (len(splits.train), len(splits.test)) == (12, 8)
        assert (splits.train.num_classes, splits.test.num_classes) == (3, 2)
        assert sorted(set(splits.test.labels)) == [0, 1]
        assert all("/101." in p or "/102." in p for p in splits.test.items)


def test_cars_reads_annotations(tmp_path):
    make_cars(tmp_path)
    splits = data.load("cars196", tmp_path)
    assert (len(splits.train), len(splits.test)) == (6, 6)
    assert splits.train.labels == [0, 0, 0, 1, 1, 1]
    assert splits.test.items[0].endswith("car_ims/000007.jpg")


def test_sop_reads_both_lists(tmp_path):
    make_sop(tmp_path)
    splits = data.load("sop", tmp_path / "Stanford_Online_Products")
    assert (len(splits.train), len(splits.test), splits.test.num_classes) == (6, 4, 2)


def test_inshop_query_and_gallery_share_classes(tmp_path):
    make_inshop(tmp_path)
    splits = data.load("inshop", tmp_path)
    assert (len(splits.train), len(splits.test), len(splits.gallery)) == (4, 4, 4)
    assert splits.test.labels == splits.gallery.labels == [0, 0, 1, 1]
    x, label, index = data.SplitDataset(splits.gallery, data.image_transforms(16, train=False))[3]
    assert x.shape == (3, 16, 16) and (label, index) == (1, 3)


@pytest.mark.parametrize("dataset", data.IMAGE_DATASETS)
def test_missing_root_shows_expected_layout(tmp_path, dataset):
    with pytest.raises(data.DatasetLayoutError, match="expected layout") as error:
        data.load(dataset, tmp_path / "nowhere")
    assert data.FOLDERS[dataset] in str(error.value)


def test_malformed_files_are_reported(tmp_path):
    folder = make_sop(tmp_path)
    (folder / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 2 broken\n")
    with pytest.raises(data.DatasetLayoutError, match="line 2"):
        data.load("sop", tmp_path)
    folder = make_inshop(tmp_path / "b")
    (folder / "Img/img/WOMEN/Dresses/id_00000001/train_0_front.jpg").unlink()
    with pytest.raises(data.DatasetLayoutError, match="does not exist"):
        data.load("inshop", tmp_path / "b")
    (tmp_path / "c/cars196").mkdir(parents=True)
    (tmp_path / "c/cars196/cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(data.DatasetLayoutError, match="not a MATLAB file"):
        data.load("cars196", tmp_path / "c")


def test_digits_split_halves_the_classes():
    splits = data.load("digits")
    assert splits.train.num_classes == splits.test.num_classes == 5
    assert len(splits.train) + len(splits.test) == 1797
    assert splits.images.shape == (1797, 1, 8, 8)


def test_random_sampler_is_a_function_of_seed_and_epoch():
    sampler = RandomBatchSampler(50, 8, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    assert len(first) == 6 and all(len(b) == 8 for b in first)
    assert len({i for b in first for i in b}) == 48
    sampler.set_epoch(2, start=4)
    assert list(sampler) == first[4:]
    sampler.set_epoch(3)
    assert list(sampler) != first


def test_balanced_sampler_structure():
    labels = [c for c in range(10) for _ in range(6)] + [10, 10]  # class 10 has 2 < 4 examples
    sampler = BalancedBatchSampler(labels, classes_per_batch=3, samples_per_class=4, seed=0)
    sampler.set_epoch(0)
    batches = list(sampler)
    assert len(batches) == len(labels) // 12
    for batch in batches:
        counts = torch.bincount(torch.tensor([labels[i] for i in batch]))
        assert sorted(counts[counts > 0].tolist()) == [4, 4, 4]
    with pytest.raises(ValueError, match="classes per batch"):
        BalancedBatchSampler(labels, classes_per_batch=12, samples_per_class=2)


@pytest.mark.parametrize("dataset", ["cars196", "sop", "inshop"])  # CUB's list is its folders' contents
def test_a_hole_mid_list_is_found_at_load(tmp_path, dataset):
    """Every image a list file names is checked when the data load, not only the first and last."""
    {"cars196": make_cars, "sop": make_sop, "inshop": make_inshop}[dataset](tmp_path)
    items = data.load(dataset, tmp_path).train.items
    hole = items[len(items) // 2]
    Path(hole).unlink()
    with pytest.raises(data.DatasetLayoutError, match=f"image {re.escape(str(hole))} listed for train does not exist"):
        data.load(dataset, tmp_path)
