"""DINOv2 distillation (Oquab et al. 2023, sec. 5 "Distillation of smaller models")."""

from dataclasses import dataclass

import torch.nn as nn
from omegaconf import MISSING, DictConfig, OmegaConf

from sslrun.config.errors import ConfigError, require
from sslrun.distributed.safe_load import load_checkpoint
from sslrun.methods.dinov2 import IBOT_HEAD, DINOv2, DINOv2Config
from sslrun.methods.dino import HEADS
from sslrun.methods.registry import register_method
from sslrun.methods.teacher import MomentumTeacher
from sslrun.models.backbones import build_backbone
from sslrun.models.heads import DINOHead
from sslrun.run_dir import RunDir


def teacher_problem(cfg: DictConfig) -> str:
    """The problem with `method.teacher_run` for this student config, in one line, or ''."""
    run = RunDir(cfg.method.teacher_run)
    where = f"method.teacher_run={cfg.method.teacher_run}"
    if not run.config.is_file() or not run.last_checkpoint.is_file():
        return (f"{where}: no finished run there (needs {run.config} and {run.last_checkpoint}); "
                f"point it at the run directory of a trained method=dinov2 run")
    teacher = OmegaConf.load(run.config)
    if teacher.method.name != "dinov2":
        return f"{where}: that run trained method={teacher.method.name}; the teacher must be a dinov2 run"
    checks = [
        ("backbone.timm_kwargs.patch_size", lambda c: c.backbone.timm_kwargs.get("patch_size")),
        ("data.image_size", lambda c: c.data.image_size),
        ("method.head.out_dim", lambda c: c.method.head.out_dim),
    ]
    for key, value in checks:
        if value(cfg) != value(teacher):
            return (f"{key}={value(cfg)}: the teacher at {cfg.method.teacher_run} has {value(teacher)}; "
                    f"set {key}={value(teacher)}")
    ibot = [(c.method.ibot.head if c.method.ibot.separate_head else c.method.head).out_dim for c in (cfg, teacher)]
    if ibot[0] != ibot[1]:
        return (f"method.ibot: the student's iBOT head has {ibot[0]} prototypes, the teacher's at "
                f"{cfg.method.teacher_run} {ibot[1]}; set method.ibot.separate_head=true "
                f"method.ibot.head.out_dim={ibot[1]}")
    return ""


@dataclass
class DINOv2DistillConfig(DINOv2Config):
    teacher_run: str = MISSING  # run directory of a trained method=dinov2 run

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        require(cfg.method.gram.weight == 0, f"method.gram.weight={cfg.method.gram.weight}: Gram anchoring is "
                                             f"method=dinov2's (a distilled student follows a frozen teacher already)")
        problem = teacher_problem(cfg)
        require(not problem, problem)


def load_teacher(run_dir) -> nn.ModuleList:
    """The trained teacher of a `method=dinov2` run, frozen and in eval mode (no drop path): an
    nn.ModuleList [backbone, DINO head, iBOT head] with the weights of the run's EMA teacher. The
    iBOT head is the DINO head when the run shared them."""
    run = RunDir(run_dir)
    cfg = OmegaConf.load(run.config)
    backbone = build_backbone(cfg.backbone, in_chans=cfg.data.channels)
    head = DINOHead.from_spec(backbone.num_features, cfg.method.head)
    modules = [backbone, head]
    if cfg.method.ibot.separate_head:
        modules.append(DINOHead.from_spec(backbone.num_features, cfg.method.ibot.head))
    try:
        state = load_checkpoint(run.last_checkpoint)["state_dict"]
    except ConfigError as error:
        raise ConfigError(f"method.teacher_run={run_dir}: {error}") from None
    prefix = "teacher.encoder."
    teacher = nn.Sequential(*modules)
    teacher.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return nn.ModuleList(teacher).requires_grad_(False).eval()


@register_method("dinov2_distill", DINOv2DistillConfig, views=None, test_overrides=(*HEADS, *IBOT_HEAD), exempt={
    "two_processes": "KoLeo's nearest neighbours are searched per process, as in DINOv2; "
                     "tests/methods/test_dino.py checks the loss against a direct computation",
    "fsdp": "its teacher is a finished dinov2 run, which the toy harness does not train; the student's modules "
            "are DINOv2's, whose sharded step is tested",
    "cli": "its teacher is a finished dinov2 run: tests/methods/test_method_runs.py distils from a trained one"})
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

    masks_patches = False

    def build_teacher(self, cfg) -> nn.Module:
        """The frozen teacher of the run at `teacher_run`; the student's own EMA is kept beside it."""
        self.student_ema = MomentumTeacher(self.student_modules(), cfg.momentum, cfg.final_momentum,
                                           self.lr_schedule.total_steps)
        return load_teacher(cfg.teacher_run)

    def teacher_modules(self):
        return self.teacher[0], self.teacher[1], self.teacher[-1]

    def train(self, mode: bool = True):
        """The frozen teacher stays in eval mode whatever Lightning asks of the module."""
        super().train(mode)
        self.teacher.train(False)
        return self

    @property
    def eval_backbone(self):
        return self.student_ema.encoder[0]

    def ema_metrics(self) -> dict:
        return self.student_ema.metrics(self.global_step)

    def after_optimizer_step(self) -> None:
        self.student_ema.follow(self.student_modules(), self.global_step)
