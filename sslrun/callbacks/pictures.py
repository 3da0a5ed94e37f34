"""Pictures during training, for ViT backbones: class-token attention per head, the PCA of patch
features and the method's own (`SSLMethod.method_pictures`: MAE's reconstructions), on fixed
held-out images; saved as PNGs under <run dir>/pictures/ and sent to the dashboard (wandb,
TensorBoard) at every evaluation and at the end of training."""

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch

from sslrun.eval.pictures import attention_picture, class_attention, patch_pca, pca_picture
from sslrun.models.vit import is_vit

log = logging.getLogger(__name__)


class Pictures(L.Callback):
    def __init__(self, datamodule, directory: Path, every_n_epochs: int, count: int):
        self.datamodule, self.directory = datamodule, Path(directory)
        self.every_n_epochs, self.count = every_n_epochs, count
        self.drawn_at_step = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.drawn_at_step != trainer.global_step:
            self.draw(trainer, pl_module)

    @torch.no_grad()
    def draw(self, trainer, pl_module) -> None:
        self.drawn_at_step = trainer.global_step
        if not is_vit(pl_module.eval_backbone):
            return
        # Every process runs the model (a sharded one needs them all); process 0 saves.
        images = self.datamodule.sample_images(self.count)
        inputs = self.datamodule.augment.normalize(images.to(pl_module.device))
        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context():
                vit = pl_module.eval_backbone
                pictures = {"patch_pca": pca_picture(images, patch_pca(vit, inputs))}
                if vit.cls_token is not None:  # class-token attention needs one (I-JEPA's ViT has none)
                    pictures["attention"] = attention_picture(images, class_attention(vit, inputs).float())
                pictures.update(pl_module.method_pictures(images, inputs, self.datamodule.augment))
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for name, picture in pictures.items():
            path = self.directory / f"{name}_step{trainer.global_step:07d}.png"
            picture.save(path)
            log.info("picture: %s", path)
            for logger in trainer.loggers:
                _send(logger, f"pictures/{name}", picture, trainer.global_step)


def _send(logger, key: str, picture, step: int) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[picture], step=step)
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, np.asarray(picture), step, dataformats="HWC")
