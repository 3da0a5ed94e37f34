"""DINOv2 distillation (Oquab et al. 2023, sec. 5 "Distillation of smaller models")."""

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from sslrun.config import teacher_run_files
from sslrun.methods.dinov2 import DINOv2
from sslrun.models.backbones import build_backbone
from sslrun.models.heads import DINOHead


def load_teacher(run_dir) -> tuple:
    """The trained teacher of a `method=dinov2` run, frozen and in eval mode (no drop path): an
    nn.ModuleList [backbone, DINO head, iBOT head] with the weights of the run's EMA teacher. The
    iBOT head is the DINO head when the run shared them."""
    config_path, checkpoint_path = teacher_run_files(run_dir)
    cfg = OmegaConf.load(config_path)
    backbone = build_backbone(cfg.backbone, in_chans=cfg.data.channels)
    head = DINOHead.from_spec(backbone.num_features, cfg.method.head)
    modules = [backbone, head]
    if cfg.method.ibot.separate_head:
        modules.append(DINOHead.from_spec(backbone.num_features, cfg.method.ibot.head))
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["state_dict"]
    prefix = "teacher.encoder."
    teacher = nn.Sequential(*modules)
    teacher.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return nn.ModuleList(teacher).requires_grad_(False).eval()


class DINOv2Distill(DINOv2):
    """A smaller student trained with DINOv2's losses against a larger, trained and frozen teacher:
    the EMA teacher of the `method=dinov2` run at `teacher_run`. As in the paper:

    - the teacher's Sinkhorn-Knopp (or centred) targets feed the DINO loss on class tokens and the
      iBOT loss, which here covers every patch of the global crops and masks nothing;
    - the student has no stochastic depth (its backbone config: drop_path_rate 0);
    - a spare EMA of the student (`student_ema`, momentum `momentum` -> `final_momentum`) is the
      final model: kNN, the probe and the pictures use it.

    Student and teacher must share patch size (the iBOT loss pairs their patch tokens) and
    prototype counts (`head.out_dim`, `ibot.head.out_dim`)."""

    def __init__(self, cfg, **base):
        super().__init__(cfg, **base)
        del self.mask_token  # nothing is masked
        self.student_ema = self.teacher
        self.teacher = load_teacher(cfg.teacher_run)

    def train(self, mode: bool = True):
        """The frozen teacher stays in eval mode whatever Lightning asks of the module."""
        super().train(mode)
        self.teacher.train(False)
        return self

    def teacher_modules(self):
        return self.teacher[0], self.teacher[1], self.teacher[-1]

    def masks(self, batch: int, device) -> torch.Tensor:
        """Every patch of every global crop: the iBOT loss covers them all."""
        return torch.ones(self.global_crops * batch, self.grid[0] * self.grid[1], dtype=torch.bool, device=device)

    def student_tokens(self, views, masks):
        return self.forward_crops(self.backbone, views)

    @property
    def eval_backbone(self):
        return self.student_ema.encoder[0]

    def after_optimizer_step(self) -> None:
        self.student_ema.update(self.student_modules(), self.momentum(self.global_step))

