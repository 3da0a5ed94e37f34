"""CLIP and SigLIP end to end: `python -m sslrun method=clip|siglip` learns on the embedded data
(captioned from class names) on one process and on two; image-text data from CSV files and tar
shards through the data module and the CLI."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FASHION_MNIST, column, needs_fashion_mnist, read_metrics, read_summary, run_cli

FAST = [
    "data.batch_size=64",
    "trainer.max_steps=60",
    "eval.knn.bank_size=500",
    "eval.knn.query_size=1000",
    "eval.pictures=0",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=2",
]


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("name,processes", [("clip", 1), ("siglip", 2)])
def test_image_text_method_learns_zero_shot_classification(name, processes, tmp_path):
    """Loss falls, and zero-shot top-1 on the held-out split (10 classes: chance 0.1) ends far above
    chance and above the random init: CLIP on one process, SigLIP on two (its ring of processes).
    (SigLIP on one process and CLIP on two, whole-matrix or local loss, compute the same loss and
    gradients as these: tests/test_clip.py. Each was also run like this: README, CLIP and SigLIP.)"""
    distributed = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"] if processes == 2 else []
    local = ["method.local_loss=true"] if name == "clip" and processes == 2 else []
    run_cli(f"method={name}", *FAST, *distributed, *local, f"hydra.run.dir={tmp_path}", ranks=processes)
    summary = read_summary(tmp_path)
    assert summary["method"] == name and summary["world_size"] == processes and summary["global_step"] == 60
    assert summary["zero_shot_top1"] > 0.35 and summary["zero_shot_top1"] > summary["zero_shot_top1_random_init"] + 0.2, summary
    assert summary["zero_shot_top5"] > summary["zero_shot_top1"]
    assert summary["image_to_text_R@10"] > summary["image_to_text_R@10_random_init"], summary
    losses = [v for _, v in column(read_metrics(tmp_path), "train/loss")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    scales = [v for _, v in column(read_metrics(tmp_path), "train/logit_scale")]
    assert all(1.0 <= s <= 100.0 for s in scales)


def fashion_pairs(count: int):
    """The first `count` Fashion-MNIST training images as PNG bytes with class-name captions."""
    from sslrun.data.datasets import FASHION_MNIST_CLASSES, _read_idx

    images = _read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz")[:count]
    labels = _read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")[:count]
    pairs = []
    for image, label in zip(images, labels):
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
        pairs.append((buffer.getvalue(), f"a photo of a {FASHION_MNIST_CLASSES[label]}", int(label)))
    return pairs


def write_image_text_data(folder, shards=4, per_shard=32, held_out=64):
    """Tar shards of (png, txt, cls) samples and a held-out CSV of image files and captions."""
    pairs = fashion_pairs(shards * per_shard + held_out)
    for s in range(shards):
        with tarfile.open(folder / f"train-{s:02d}.tar", "w") as archive:
            for i in range(per_shard):
                image, caption, label = pairs[s * per_shard + i]
                for ext, data in (("png", image), ("txt", caption.encode()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{s:02d}{i:04d}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    (folder / "val").mkdir()
    rows = ["image,caption"]
    for i, (image, caption, _) in enumerate(pairs[shards * per_shard:]):
        (folder / "val" / f"{i}.png").write_bytes(image)
        rows.append(f"val/{i}.png,{caption}")
    (folder / "val.csv").write_text("\n".join(rows) + "\n")
    return f"{folder}/train-{{00..{shards - 1:02d}}}.tar", str(folder / "val.csv")


SHARD_DATA = ["data=webdataset", "data.image_size=28", "data.channels=1", "data.mean=[0.286]", "data.std=[0.353]"]


@needs_fashion_mnist
def test_shard_data_module_resumes_at_the_next_unseen_batch(tmp_path):
    """The data module's checkpoint state (epoch, batches trained) restarts the stream exactly
    where training stopped, with 2 loader workers."""
    from sslrun.config import compose
    from sslrun.data.datamodule import Captions, SSLDataModule
    from sslrun.data.tokenizer import Tokenizer

    shards, val = write_image_text_data(tmp_path)
    cfg = compose(["method=clip", *SHARD_DATA, f"data.train_shards='{shards}'", "data.train_samples=128",
                   f"data.val_file={val}", "data.batch_size=8", "data.num_workers=2", "data.shuffle_buffer=16"])

    def module():
        return SSLDataModule(cfg.data, cfg.augmentation.views, cfg.eval, processes=1, processes_per_node=1, seed=0,
                             captions=Captions(Tokenizer(16), list(cfg.method.prompts)))

    whole = list(module().train_dataloader())
    assert len(whole) == 16 and all(batch["text"].shape == (8, 16) for batch in whole)
    assert len({i for batch in whole for i in batch["index"].tolist()}) == 128
    resumed = module()
    resumed.load_state_dict({"epoch": 0, "batches": 5})
    rest = list(resumed.train_dataloader())
    assert len(rest) == 11
    for mine, theirs in zip(rest, whole[5:]):
        assert torch.equal(mine["index"], theirs["index"]) and torch.equal(mine["text"], theirs["text"])
        assert all(torch.equal(a, b) for a, b in zip(mine["views"], theirs["views"]))


@pytest.mark.slow
@needs_fashion_mnist
def test_clip_trains_from_tar_shards_with_a_held_out_csv(tmp_path):
    shards, val = write_image_text_data(tmp_path)
    run_dir = tmp_path / "run"
    run_cli("method=clip", *SHARD_DATA, f"data.train_shards='{shards}'", "data.train_samples=128",
            f"data.val_file={val}", "data.batch_size=32", "data.num_workers=2", "trainer.max_steps=8",
            "trainer.progress_bar=false", "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}")
    summary = read_summary(run_dir)
    assert summary["global_step"] == 8 and summary["epochs"] == 2  # 128 samples per epoch / 32
    assert "image_to_text_R@1" in summary and "zero_shot_top1" not in summary  # CSV pairs: no class names
    assert summary["knn_top1"] is None  # no labels to score a kNN with
    assert len(column(read_metrics(run_dir), "train/loss")) == 8
