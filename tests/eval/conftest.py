"""A finished toy run for the offline protocols: three classes of 16 x 16 grey images in an image
folder (a bright square at a place of its own per class, plus noise), and a run directory as
training leaves it (its config, summary.json and backbone.safetensors) with a narrow, untrained
ResNet-18 whose weights come from a fixed seed."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_finished_run

CLASSES, SIZE = 3, 16
TRAIN, VAL = 20, 8  # images per class
# Fast settings for the toy: several embedding batches (several shards), no loader workers.
FAST = ["num_workers=0", "batch_size=16"]


def _write_images(folder: Path, count: int, seed: int) -> None:
    generator = np.random.default_rng(seed)
    for label in range(CLASSES):
        (folder / f"class{label}").mkdir(parents=True)
        for i in range(count):
            image = generator.normal(60, 20, (SIZE, SIZE))
            image[2:8, 2 + 4 * label:8 + 4 * label] += 150
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"class{label}" / f"{i}.png")


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy_images")
    _write_images(root / "train", TRAIN, seed=0)
    _write_images(root / "val", VAL, seed=1)
    return root


def toy_training_overrides(root: Path) -> list:
    return ["data=imagefolder", f"data.root={root}", f"data.image_size={SIZE}", "data.channels=1", "data.mean=[0.3]",
            "data.std=[0.25]", "data.eval_crop_fraction=1.0", "backbone=resnet18",
            "backbone.timm_kwargs={channels:[8,8,8,8]}"]


@pytest.fixture
def toy_run(tmp_path, toy_data) -> Path:
    import torch

    from sslrun.config import compose
    from sslrun.models.backbones import build_backbone
    from sslrun.run_dir import RunDir
    from sslrun.train import export_backbone

    cfg = compose(toy_training_overrides(toy_data), method_schema=False)
    run_dir = write_finished_run(tmp_path / "run", cfg)
    torch.manual_seed(0)
    export_backbone(cfg, build_backbone(cfg.backbone, in_chans=1), RunDir(run_dir).backbone, is_writer=True)
    RunDir(run_dir).summary.write_text(json.dumps({"status": "completed", "method": "simclr"}))
    return run_dir
