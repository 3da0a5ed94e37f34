"""sslrun side by side with lightly: the same run written with lightly's transforms, heads and
losses in a plain PyTorch loop, against `python -m sslrun` with the same settings.

    python scripts/bench_peers.py                          # every method below, 3 seeds
    python scripts/bench_peers.py --methods simclr,byol --seeds 1 --steps 50
    python scripts/bench_peers.py --table                  # rewrite the table from the run dirs only
    python scripts/bench_peers.py --methods simclr --seeds 1 --steps 20 data=mnist5k   # a smoke run
    python scripts/bench_peers.py --ijepa-tokens           # tokens per image each I-JEPA side trains on
    python scripts/bench_peers.py --methods mae --model-step   # forward + backward alone, both sides

Both sides start from one composed sslrun config (`python -m sslrun method=NAME --cfg job` with
the same overrides), so they share by construction the backbone (sslrun's timm model, built once
for both), the global batch, the views (each view's crop scale, flip, colour jitter, grey, blur
and solarisation probabilities, handed to lightly's own view transforms), the optimizer (LARS,
SGD or AdamW at sslrun's scaled lr, weight decay and bias/norm exclusions; lightly's LARS), the
warm-up + cosine schedule, the momentum schedule and the number of steps. The heads and losses
are lightly's, sized from the method's config. Neither side evaluates while training.

Each (method, seed) trains both, alternating which goes first (seed 0: sslrun first, seed 1:
lightly first, ...), so each pair ran side by side in time; images/s is the same measure on both
sides (the wall time between consecutive training steps, data loading included, from the 6th
step on). Then both backbones go through one shared evaluation: `python -m sslrun.evaluate
RUN_DIR protocol=knn` (the lightly loop writes a run directory sslrun.evaluate reads: the
composed config, backbone.safetensors, summary.json). Results: run directories under
benchmarks/peers/<method>/<side>_seed<S>/, their summary.json and eval/knn.json kept (kilobytes)
under docs/results/peers/ (`--records`) so that a later checkout rewrites the table without the
runs, the table in docs/benchmarks.md. A method with neither keeps its row of the table already
there. Finished runs and evaluations are not redone (resumable).

lightly is a benchmark-only extra (`make peers`: `pip install --no-deps lightly==1.6.0`, so its
pins cannot replace torch); sslrun never imports it.
"""

import argparse
import copy
import json
import math
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ["simclr", "mocov2", "byol", "simsiam", "barlow_twins", "vicreg", "nnclr", "dino", "swav",
           "lejepa", "mae", "ijepa"]  # what lightly ships
SIDES = ("sslrun", "lightly")
# Added to both sides: no evaluation while training (the shared one comes after), no pictures.
COMMON = ["eval.enabled=false", "eval.pictures=0", "trainer.progress_bar=false"]
SKIP = 5  # steps not timed: worker start-up and warm-up (sslrun's Throughput callback skips as many)


# ---------------------------------------------------------------------- the lightly side

def lightly_views(cfg):
    """sslrun's views as lightly transforms, one lightly view transform per view: BYOLView1Transform
    (crops up to the whole image), multi-crop views (DINO, SwAV, LeJEPA: crops of several sizes)
    with DINOViewTransform, which takes a scale range for the local crops. (Not DINOTransform or
    SwaVTransform: lightly 1.6 drops cj_strength for DINO's second global view, which then jitters
    at half the asked strength, and SwaVTransform gives every crop of a size the same scale.)"""
    from lightly.transforms import BYOLView1Transform, DINOViewTransform
    from lightly.transforms.multi_view_transform import MultiViewTransform

    normalize = {"mean": list(cfg.data.mean), "std": list(cfg.data.std)}
    transforms = []
    multi_crop = len({view.size for view in cfg.augmentation.views}) > 1
    for view in (view for view in cfg.augmentation.views for _ in range(view.count)):
        jitter = view.color_jitter
        common = dict(cj_prob=jitter.p, cj_strength=1.0, cj_bright=jitter.brightness, cj_contrast=jitter.contrast,
                      cj_sat=jitter.saturation, cj_hue=jitter.hue, random_gray_scale=view.grayscale_p,
                      gaussian_blur=view.blur_p, solarization_prob=view.solarize_p, sigmas=tuple(view.blur_sigma),
                      hf_prob=view.flip_p, normalize=normalize)
        if multi_crop:
            transforms.append(DINOViewTransform(crop_size=view.size, crop_scale=tuple(view.scale), **common))
        elif view.scale[1] != 1.0:
            raise SystemExit(f"{cfg.method.name}: lightly's view transform crops up to scale 1.0, not {view.scale[1]}")
        else:
            transforms.append(BYOLView1Transform(input_size=view.size, min_scale=view.scale[0], **common))
    return MultiViewTransform(transforms)


class LightlyMethod:
    """One method in lightly's pieces: `modules` (trained), `momentum_pairs` (online -> EMA copy),
    `loss(views, step)`, the parameter groups whose lr stays fixed, the network evaluated (the
    backbone, or its EMA copy where the method evaluates that) and the loader's `collate` (None:
    the default)."""

    def __init__(self, cfg, backbone, total_steps: int, steps_per_epoch: int):
        import torch
        from lightly import loss as losses
        from lightly.models import modules as heads
        from lightly.models.modules.memory_bank import MemoryBankModule
        from lightly.models.utils import deactivate_requires_grad

        m, name = cfg.method, cfg.method.name
        features = backbone.num_features
        self.name, self.total_steps, self.backbone = name, total_steps, backbone
        self.fixed_lr_modules, self.momentum_pairs, self.evaluated, self.collate = [], [], backbone, None
        self.momentum = (m.get("momentum"), m.get("final_momentum", m.get("momentum")))

        def hidden(mlp):
            return mlp.hidden_dim or features

        def ema_copy(module, build=None):
            """A frozen copy that starts equal to `module` (`build()` makes a fresh one where deepcopy
            cannot: DINO's weight-normed last layer), then follows it by momentum."""
            twin = copy.deepcopy(module) if build is None else build()
            if build is not None:
                twin.load_state_dict(module.state_dict())
            deactivate_requires_grad(twin)
            return twin

        if name == "simclr":
            self.head = heads.SimCLRProjectionHead(features, hidden(m.projector), m.projector.out_dim,
                                                   num_layers=m.projector.num_layers, batch_norm=m.projector.batch_norm)
            self.criterion = losses.NTXentLoss(temperature=m.temperature)
        elif name == "mocov2":
            self.head = heads.MoCoProjectionHead(features, hidden(m.projector), m.projector.out_dim,
                                                 num_layers=m.projector.num_layers, batch_norm=m.projector.batch_norm)
            self.key_backbone, self.key_head = ema_copy(backbone), ema_copy(self.head)
            self.momentum_pairs = [(backbone, self.key_backbone), (self.head, self.key_head)]
            self.criterion = losses.NTXentLoss(temperature=m.temperature,
                                               memory_bank_size=(m.queue_size, m.projector.out_dim))
        elif name in ("byol", "simsiam"):
            projection = heads.BYOLProjectionHead if name == "byol" else heads.SimSiamProjectionHead
            prediction = heads.BYOLPredictionHead if name == "byol" else heads.SimSiamPredictionHead
            self.head = projection(features, hidden(m.projector), m.projector.out_dim)
            self.predictor = prediction(m.projector.out_dim, m.predictor_mlp.hidden_dim, m.predictor_mlp.out_dim)
            if name == "byol":
                self.target_backbone, self.target_head = ema_copy(backbone), ema_copy(self.head)
                self.momentum_pairs = [(backbone, self.target_backbone), (self.head, self.target_head)]
            elif m.fixed_predictor_lr:
                self.fixed_lr_modules = [self.predictor]
            self.criterion = losses.NegativeCosineSimilarity()
        elif name in ("barlow_twins", "vicreg"):
            self.head = heads.BarlowTwinsProjectionHead(features, m.projector.hidden_dim, m.projector.out_dim)
            self.criterion = (losses.BarlowTwinsLoss(lambda_param=m.lambd) if name == "barlow_twins" else
                              losses.VICRegLoss(lambda_param=m.invariance_weight, mu_param=m.variance_weight,
                                                nu_param=m.covariance_weight, eps=m.eps))
        elif name == "nnclr":  # lightly's example: NT-Xent of (neighbour, other view's prediction)
            self.head = heads.NNCLRProjectionHead(features, hidden(m.projector), m.projector.out_dim)
            self.predictor = heads.NNCLRPredictionHead(m.projector.out_dim, m.predictor_mlp.hidden_dim,
                                                       m.predictor_mlp.out_dim)
            self.support = heads.NNMemoryBankModule(size=(m.queue_size, m.projector.out_dim))
            self.criterion = losses.NTXentLoss(temperature=m.temperature)
        elif name == "dino":
            h = m.head
            freeze_steps = round(m.freeze_last_layer_epochs * steps_per_epoch)  # lightly counts "epochs": steps here
            def dino_head():
                return heads.DINOProjectionHead(features, h.hidden_dim, h.bottleneck_dim, h.out_dim,
                                                batch_norm=h.batch_norm, freeze_last_layer=freeze_steps,
                                                norm_last_layer=h.norm_last_layer)
            self.head = dino_head()
            self.teacher_backbone, self.teacher_head = ema_copy(backbone), ema_copy(self.head, dino_head)
            self.momentum_pairs = [(backbone, self.teacher_backbone), (self.head, self.teacher_head)]
            self.criterion = losses.DINOLoss(output_dim=h.out_dim, warmup_teacher_temp=m.warmup_teacher_temperature,
                                             teacher_temp=m.teacher_temperature,
                                             warmup_teacher_temp_epochs=round(
                                                 m.warmup_teacher_temperature_epochs * steps_per_epoch),
                                             student_temp=m.student_temperature, center_momentum=m.center_momentum)
            self.global_crops = m.global_crops
        elif name == "swav":  # lightly's SwaV example with its queue: a MemoryBankModule per global crop
            self.head = heads.SwaVProjectionHead(features, hidden(m.projector), m.projector.out_dim)
            self.prototypes = heads.SwaVPrototypes(m.projector.out_dim, m.prototypes, n_steps_frozen_prototypes=round(
                m.freeze_prototypes_epochs * steps_per_epoch))
            self.queues = torch.nn.ModuleList(
                MemoryBankModule(size=(m.queue_size, m.projector.out_dim), feature_dim_first=False)
                for _ in range(m.assignment_crops)) if m.queue_size else None
            # lightly's bank starts as random rows and takes every batch; its rows join the codes
            # from the step sslrun's queue first holds only real rows (sslrun's SwAV.queue_in_use)
            self.queue_from = (round(m.queue_start_epochs * steps_per_epoch)
                               + math.ceil(m.queue_size / cfg.data.batch_size))
            self.criterion = losses.SwaVLoss(temperature=m.temperature, sinkhorn_iterations=m.sinkhorn_iterations,
                                             sinkhorn_epsilon=m.sinkhorn_epsilon)
            self.global_crops = m.assignment_crops
        elif name == "mae":  # lightly's MAE example: its masked ViT around the same timm model, its decoder
            d = m.decoder
            self.encoder = heads.MaskedVisionTransformerTIMM(vit=backbone)
            self.patch_size = backbone.patch_embed.patch_size[0]
            self.decoder = heads.MaskedVisionTransformerDecoderTIMM(
                num_patches=backbone.patch_embed.num_patches, embed_dim=d.width, depth=d.depth, num_heads=d.heads)
            self.head = torch.nn.ModuleList([  # decoder embedding, decoder, pixel prediction
                torch.nn.Linear(backbone.embed_dim, d.width), self.decoder,
                torch.nn.Linear(d.width, self.patch_size ** 2 * cfg.data.channels)])
            self.mask_ratio, self.normalize_targets = m.mask_ratio, m.normalize_targets
        elif name == "ijepa":  # lightly's I-JEPA pieces around the same timm ViT: its mask collator (the
            # reference's, which cuts every block to the batch's smallest), masked encoder and predictor
            p = m.predictor
            self.encoder = heads.MaskedVisionTransformerTIMM(vit=backbone)
            self.target_backbone = self.evaluated = ema_copy(backbone)  # the paper evaluates the target encoder
            self.momentum_pairs = [(backbone, self.target_backbone)]
            self.head = heads.IJEPAPredictorTIMM(num_patches=backbone.patch_embed.num_patches, depth=p.depth,
                                                 mlp_dim=features, predictor_embed_dim=p.width, num_heads=p.heads)
            self.collate = _WithMasks(ijepa_collator(cfg))
            self.distance = torch.nn.functional.smooth_l1_loss if m.loss == "smooth_l1" else torch.nn.functional.mse_loss
        elif name == "lejepa":
            self.head = heads.LeJEPAProjectionHead(features, hidden(m.projector), m.projector.out_dim,
                                                   num_layers=m.projector.num_layers)
            self.criterion = losses.LeJEPALoss(lambda_param=m.sigreg_weight, sigreg_knots=m.knots,
                                               sigreg_t_max=m.t_max, sigreg_num_vectors=m.slices)
            self.global_crops = m.global_crops
        else:
            raise SystemExit(f"method={name}: no lightly counterpart here; choose from {', '.join(METHODS)}")
        trained = [backbone, self.head, *[getattr(self, extra) for extra in ("predictor", "prototypes")
                                          if hasattr(self, extra)]]
        self.modules = torch.nn.ModuleList(trained)
        self.frozen = torch.nn.ModuleList([twin for _, twin in self.momentum_pairs])

    def to(self, device) -> "LightlyMethod":
        """Every module of the method on `device`: the trained ones, their EMA copies and the
        losses' buffers (DINO's centre, the memory banks)."""
        import torch

        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                value.to(device)
        return self

    def update_momentum(self, step: int) -> None:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        if self.momentum_pairs:
            start, end = self.momentum
            value = cosine_schedule(step, self.total_steps, start, end)
            for online, twin in self.momentum_pairs:
                update_momentum(online, twin, value)

    def loss(self, views, step: int):
        import torch
        from lightly.models.utils import batch_shuffle, batch_unshuffle

        b, name = self.backbone, self.name
        if name == "simclr" or name in ("barlow_twins", "vicreg"):
            return self.criterion(self.head(b(views[0])), self.head(b(views[1])))
        if name == "mocov2":
            query = self.head(b(views[0]))
            with torch.no_grad():
                shuffled, order = batch_shuffle(views[1])  # lightly's shuffling BN on one process
                key = batch_unshuffle(self.key_head(self.key_backbone(shuffled)), order)
            return self.criterion(query, key.detach())
        if name in ("byol", "simsiam"):
            z = [self.head(b(v)) for v in views]
            p = [self.predictor(zi) for zi in z]
            if name == "byol":
                with torch.no_grad():
                    z = [self.target_head(self.target_backbone(v)) for v in views]
            return 0.5 * (self.criterion(p[0], z[1].detach()) + self.criterion(p[1], z[0].detach()))
        if name == "nnclr":
            z = [self.head(b(v)) for v in views]
            p = [self.predictor(zi) for zi in z]
            neighbours = [self.support(z[0].detach(), update=False), self.support(z[1].detach(), update=True)]
            return 0.5 * (self.criterion(neighbours[0], p[1]) + self.criterion(neighbours[1], p[0]))
        if name == "dino":
            with torch.no_grad():
                teacher = [self.teacher_head(self.teacher_backbone(v)) for v in views[:self.global_crops]]
            student = [self.head(b(v)) for v in views]
            loss = self.criterion(teacher, student, epoch=step)
            self.criterion.update_center(torch.stack(teacher))  # DINO's centre: this batch's teacher outputs
            return loss
        if name == "swav":
            g = self.global_crops
            self.prototypes.normalize()
            z = [torch.nn.functional.normalize(self.head(b(v)), dim=1) for v in views]
            scores = [self.prototypes(zi, step) for zi in z]
            queued = None
            if self.queues is not None:
                with torch.no_grad():
                    banks = [queue(zi.detach(), update=True)[1] for queue, zi in zip(self.queues, z[:g])]
                    if step >= self.queue_from:
                        queued = [self.prototypes(bank, step) for bank in banks]
            return self.criterion(scores[:g], scores[g:], queued)
        if name == "mae":
            from lightly.models import utils

            images = views[0]
            batch = images.shape[0]
            keep, masked = utils.random_token_mask((batch, self.encoder.sequence_length), self.mask_ratio,
                                                   device=images.device)
            embed, decoder, predict = self.head
            encoded = embed(self.encoder.encode(images=images, idx_keep=keep))
            tokens = utils.set_at_index(encoded.new_zeros(batch, decoder.sequence_length, encoded.shape[-1]),
                                        keep, encoded)
            prediction = predict(utils.get_at_index(decoder(tokens, idx_mask=masked), masked))
            target = utils.get_at_index(utils.patchify(images, self.patch_size), masked - 1)  # no class token
            if self.normalize_targets:  # the paper's per-patch normalised pixels (its norm_pix_loss)
                target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
            return torch.nn.functional.mse_loss(prediction, target)
        if name == "ijepa":  # views: ([images], context indices [1 x (B, K)], target indices [4 x (B, K')])
            from lightly.models import utils

            (images,), context, targets = views
            with torch.no_grad():
                tokens = self.target_backbone.forward_features(images)[:, b.num_prefix_tokens:]
                tokens = utils.apply_masks(torch.nn.functional.layer_norm(tokens, tokens.shape[-1:]), targets)
            predicted = self.head(self.encoder.encode(images=images, idx_keep=context[0]), context, targets)
            return self.distance(predicted, tokens)
        if name == "lejepa":
            z = [self.head(b(v)) for v in views]
            return self.criterion(local_proj=torch.stack(z[self.global_crops:]),
                                  global_proj=torch.stack(z[:self.global_crops]))
        raise AssertionError(name)


def parameter_groups(cfg, method: LightlyMethod, peak_lr: float):
    """sslrun's grouping rule: weight decay (and LARS adaptation, which lightly's LARS skips at
    weight_decay=0) off for biases and norms when exclude_bias_and_norm; modules whose lr stays
    fixed (SimSiam's predictor) in groups of their own."""
    o = cfg.optimizer
    groups = []
    fixed = {id(p) for module in method.fixed_lr_modules for p in module.parameters()}
    for module_fixed in (False, True):
        decay, no_decay = [], []
        for p in method.modules.parameters():
            if (id(p) in fixed) != module_fixed or not p.requires_grad:
                continue
            (no_decay if o.exclude_bias_and_norm and p.ndim <= 1 else decay).append(p)
        for params, weight_decay, scale in ((decay, o.weight_decay, 1.0),
                                            (no_decay, 0.0, o.bias_and_norm_lr_scale)):
            if params:
                groups.append({"params": params, "weight_decay": weight_decay, "peak_lr": peak_lr * scale,
                               "fixed_lr": module_fixed, "decays": weight_decay > 0})
    return groups


def build_optimizer(cfg, groups):
    import torch
    from lightly.utils.lars import LARS

    o = cfg.optimizer
    if o.name == "lars":
        return LARS(groups, lr=0.0, momentum=o.momentum, trust_coefficient=o.trust_coefficient)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum, nesterov=o.nesterov)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o.betas), eps=o.eps, fused=bool(o.get("fused", False)))
    raise SystemExit(f"optimizer.name={o.name}: not mapped to a lightly run")


def loop_device(cfg):
    """The device and the autocast context of the lightly loop, from sslrun's trainer.accelerator
    and trainer.precision: the same device and the same matmul dtype as the sslrun side. The loop
    runs on one device, eager; other precisions and compile are sslrun's alone."""
    import contextlib

    import torch

    from sslrun.distributed.compile import on_cuda, require_visible_gpu

    t = cfg.trainer
    if t.compile.enabled or t.precision not in ("32-true", "bf16-mixed") or t.devices != 1 or t.num_nodes != 1:
        raise SystemExit(f"trainer.compile.enabled={t.compile.enabled} trainer.precision={t.precision} "
                         f"trainer.devices={t.devices} trainer.num_nodes={t.num_nodes}: the lightly loop runs "
                         f"eager on one device in 32-true or bf16-mixed; set those for both sides")
    require_visible_gpu(t.accelerator)
    device = torch.device("cuda" if on_cuda(t.accelerator) else "cpu")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16-mixed"
                else contextlib.nullcontext())
    return device, autocast


def _to(value, device):
    """A batch (tensors in lists and tuples: views, I-JEPA's mask indices) on `device`."""
    if isinstance(value, (list, tuple)):
        return type(value)(_to(item, device) for item in value)
    return value.to(device, non_blocking=True)


def train_lightly(cfg, run_dir: Path) -> None:
    """The lightly loop, then the run directory sslrun.evaluate reads. On CUDA it takes the sslrun
    side's model settings too (trainer.tf32, trainer.channels_last), so that the two differ in the
    data path and the loop, not in the model's kernels."""
    import lightning as L
    import torch
    from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from sslrun.data.datamodule import default_num_workers
    from sslrun.data.datasets import build_splits
    from sslrun.distributed.compile import set_tf32, use_channels_last
    from sslrun.launch.threads import cpu_threads
    from sslrun.models.backbones import build_backbone
    from sslrun.train import lr_schedule

    L.seed_everything(cfg.seed)
    cpu_threads(1)  # as sslrun sets them for one process
    device, autocast = loop_device(cfg)
    splits = build_splits(cfg.data)
    schedule, steps_per_epoch = lr_schedule(cfg, len(splits.train))
    total = schedule.total_steps
    backbone = build_backbone(cfg.backbone, cfg.data.channels)
    method = LightlyMethod(cfg, backbone, total, steps_per_epoch).to(device)
    if device.type == "cuda":
        set_tf32(cfg.trainer.tf32)
        if cfg.trainer.channels_last:
            use_channels_last(torch.nn.ModuleList([method.modules, method.frozen]))
    groups = parameter_groups(cfg, method, schedule.peak)
    optimizer = build_optimizer(cfg, groups)
    transform = lightly_views(cfg)
    dataset = _Transformed(splits.train, transform)
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else default_num_workers(1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda", collate_fn=method.collate)
    method.modules.train()
    timed_images, timed_seconds, step, losses = 0, 0.0, 0, []
    started = time.time()
    while step < total:
        last = time.perf_counter()
        for views, _ in loader:
            for group in groups:
                group["lr"] = group["peak_lr"] if group["fixed_lr"] else cosine_warmup_schedule(
                    step, total, group["peak_lr"], group["peak_lr"] * cfg.scheduler.final_lr_ratio,
                    schedule.warmup_steps, 0.0)
                if group["decays"] and cfg.optimizer.get("final_weight_decay") is not None:
                    group["weight_decay"] = cosine_schedule(step, total, cfg.optimizer.weight_decay,
                                                            cfg.optimizer.final_weight_decay)
            method.update_momentum(step)
            with autocast:
                loss = method.loss(_to(views, device), step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.trainer.gradient_clip_val:
                torch.nn.utils.clip_grad_norm_(method.modules.parameters(), cfg.trainer.gradient_clip_val)
            if method.name == "dino":
                method.head.cancel_last_layer_gradients(current_epoch=step)
            optimizer.step()
            losses.append(float(loss.detach()))
            now = time.perf_counter()
            if step >= SKIP:
                timed_images += cfg.data.batch_size
                timed_seconds += now - last
            last, step = now, step + 1
            if step >= total:
                break
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    create = {"model_name": cfg.backbone.name, "num_classes": 0, "in_chans": cfg.data.channels,
              **OmegaConf.to_container(cfg.backbone.timm_kwargs, resolve=True)}
    save_file({k: v.contiguous() for k, v in method.evaluated.state_dict().items()}, str(run_dir / "backbone.safetensors"),
              metadata={"timm_create_model": json.dumps(create), "small_stem": json.dumps(bool(cfg.backbone.small_stem)),
                        "method": cfg.method.name})
    summary = {"method": cfg.method.name, "status": "completed" if all(map(math.isfinite, losses)) else "diverged",
               "global_step": step, "images_per_sec": timed_images / timed_seconds if timed_seconds else None,
               "wall_time_sec": time.time() - started, "final_loss": losses[-1] if losses else None,
               "side": "lightly"}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


class _Transformed:
    """A dataset of (PIL image, label) with lightly's multi-view transform applied."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index]
        return self.transform(image), label


def ijepa_collator(cfg):
    """lightly's I-JEPA mask collator with the method's block counts, scales and aspects."""
    from lightly.data.ijepa_collate import IJEPAMaskCollator

    m = cfg.method
    return IJEPAMaskCollator(input_size=cfg.data.image_size, patch_size=cfg.backbone.timm_kwargs.patch_size,
                             enc_mask_scale=tuple(m.context_scale), pred_mask_scale=tuple(m.target_scale),
                             aspect_ratio=tuple(m.target_aspect), nenc=1, npred=m.targets)


class _WithMasks:
    """lightly's I-JEPA collator, its batch as the loop's (views, labels): the views with the
    context and target indices beside them."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items):
        (views, labels), context, targets = self.collator(items)
        return (views, context, targets), labels


# ---------------------------------------------------------------------- both sides, the table

def overrides(method: str, seed: int, steps, run_dir: Path, extra=()) -> list:
    return [f"method={method}", f"seed={seed}", *COMMON, *([f"trainer.max_steps={steps}"] if steps else []),
            *extra, f"hydra.run.dir={run_dir}"]


def completed(run_dir: Path) -> bool:
    return _read(run_dir / "summary.json").get("status") == "completed"


def run_side(side: str, method: str, seed: int, steps, root: Path, extra=(), timeout=None) -> bool:
    """Train one side (unless it completed before); whether it completed. Output: peers.out. A
    side still running after `timeout` seconds is stopped and counts as failed."""
    run_dir = root / method / f"{side}_seed{seed}"
    if completed(run_dir):
        return True
    args = overrides(method, seed, steps, run_dir, extra)
    command = ([sys.executable, "-m", "sslrun", *args] if side == "sslrun" else
               [sys.executable, str(Path(__file__).resolve()), "--lightly-run", *args])
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"{method} seed {seed}: {side}: {' '.join(command[1:])}", flush=True)
    with open(run_dir / "peers.out", "w") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"none: stopped after {timeout:.0f} s"
    if code or not completed(run_dir):
        print(f"{method} seed {seed}: {side} failed (exit code {code}); see {run_dir / 'peers.out'}", flush=True)
    return completed(run_dir)


def evaluate(run_dir: Path) -> None:
    """The shared evaluation, once per run directory (eval/knn.json)."""
    if completed(run_dir) and not (run_dir / "eval" / "knn.json").is_file():
        code = subprocess.run([sys.executable, "-m", "sslrun.evaluate", str(run_dir), "protocol=knn"], cwd=REPO,
                              stdout=subprocess.DEVNULL).returncode
        if code:
            print(f"{run_dir}: sslrun.evaluate failed (exit code {code})", flush=True)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


RECORDED = ("batch.json", "summary.json", "eval/knn.json")  # what the table reads, per method or run


def save_records(root: Path, records: Path, method: str) -> None:
    """Copy what the table reads of `method`'s runs under root into records (the same layout)."""
    for source in sorted((root / method).rglob("*.json")):
        relative = source.relative_to(root)
        if any(str(relative).endswith(name) for name in RECORDED):
            target = records / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source.read_text())


def _found(root: Path, records: Path, relative: str) -> dict:
    """A run's JSON from its run directory, else from the records."""
    return _read(root / relative) or _read(records / relative)


def existing_rows(out: Path) -> Tuple[dict, str]:
    """method -> its row in the peer table already in `out` (for methods with no runs or records),
    and when those rows were written."""
    text = out.read_text() if out.is_file() else ""
    begin, end = "<!-- sslrun.benchmark suite=peers: begin -->", "<!-- sslrun.benchmark suite=peers: end -->"
    if begin not in text or end not in text:
        return {}, ""
    section = text[text.index(begin):text.index(end)]
    written = re.search(r"kept as they were, written (.+?) \(", section) or re.search(r"Written (\S+ \S+ \S+)", section)
    rows = {line.split("**")[1]: line for line in section.splitlines() if line.startswith("| **")}
    return rows, written.group(1) if written else "earlier"


def table(methods, seeds, root: Path, records: Path, carried: Tuple[dict, str]) -> str:
    """The peer table from the runs (or their records); `carried` rows for methods with neither."""
    from sslrun.benchmark import _mean_std, machine

    lines = ["| method | sslrun images/s | lightly images/s | sslrun / lightly (pairs) | sslrun kNN top-1 | "
             "lightly kNN top-1 | seeds | steps x batch |", "|---|---|---|---|---|---|---|---|"]
    kept = []
    for method in methods:
        rates, knn, ratios, steps = {s: [] for s in SIDES}, {s: [] for s in SIDES}, [], set()
        for seed in seeds:
            found = {s: _found(root, records, f"{method}/{s}_seed{seed}/summary.json") for s in SIDES}
            for side in SIDES:
                if found[side].get("images_per_sec"):
                    rates[side].append(found[side]["images_per_sec"])
                top1 = _found(root, records, f"{method}/{side}_seed{seed}/eval/knn.json").get("top1")
                if top1 is not None:
                    knn[side].append(top1)
                steps.add(found[side].get("global_step"))
            if all(found[s].get("images_per_sec") for s in SIDES):
                ratios.append(found["sslrun"]["images_per_sec"] / found["lightly"]["images_per_sec"])
        if not any(rates.values()):
            if method in carried[0]:
                lines.append(carried[0][method])
                kept.append(method)
            continue
        config = _found(root, records, f"{method}/batch.json")
        ratio = (f"{statistics.mean(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})" if ratios else "–")
        lines.append(" | ".join([
            f"| **{method}**", *(f"{statistics.mean(rates[s]):.0f}" if rates[s] else "–" for s in SIDES), ratio,
            _mean_std(knn["sslrun"]), _mean_std(knn["lightly"]), str(len(ratios)),
            f"{'/'.join(str(s) for s in sorted(x for x in steps if x))} x {config.get('batch', '?')} |"]))
    header = ("## Side by side with lightly: the same runs written with lightly's components\n\n"
              f"Written {datetime.now().astimezone():%Y-%m-%d %H:%M %Z} by `python scripts/bench_peers.py "
              f"{' '.join(sys.argv[1:])}` on {machine()}, lightly {_lightly_version()}. Each method's quick "
              f"recipe (`python -m sslrun method=NAME {' '.join(COMMON)}`) and its lightly loop from the same "
              f"config; kNN: `python -m sslrun.evaluate RUN_DIR protocol=knn` (k=20, whole training split as "
              f"bank) on both; images/s: mean over seeds, the ratio per seed from runs trained one after the "
              f"other (which side first alternates).")
    note = (f"\n\nRows of an earlier run of this script, kept as they were, written {carried[1]} (no runs or "
            f"records of theirs here): {', '.join(kept)}." if kept else "")
    return header + "\n\n" + "\n".join(lines) + note


def sslrun_mask_tokens(mask) -> tuple:
    """(context, target) tokens of one image's sslrun masks."""
    return len(mask.context), sum(len(block) for block in mask.targets)


def lightly_mask_tokens(context, targets) -> tuple:
    """(context, target) tokens per image of a batch of lightly's masks (equal for every image)."""
    return context[0].shape[1], sum(block.shape[1] for block in targets)


def ijepa_tokens(cfg, batches: int = 50) -> str:
    """What each I-JEPA side trains on per image: context and target tokens of its own masks
    (lightly's collator cuts every block to the batch's shortest; sslrun keeps them all) at the
    config's grid and batch, and the time each takes to draw a batch's masks."""
    import random
    import torch

    from sslrun.data.masking import multiblock_masks

    m, batch, side = cfg.method, cfg.data.batch_size, cfg.data.image_size // cfg.backbone.timm_kwargs.patch_size
    collator = ijepa_collator(cfg)
    torch.manual_seed(0)  # the collator places its blocks from torch's generator
    items = [([torch.zeros(1, cfg.data.image_size, cfg.data.image_size)], 0)] * batch
    generator, counts, seconds = random.Random(0), {"lightly": [], "sslrun": []}, {"lightly": 0.0, "sslrun": 0.0}
    for _ in range(batches):
        start = time.perf_counter()
        _, context, targets = collator(items)
        seconds["lightly"] += time.perf_counter() - start
        counts["lightly"].append(lightly_mask_tokens(context, targets))
        start = time.perf_counter()
        masks = multiblock_masks(batch, (side, side), m.targets, m.target_scale, m.target_aspect, m.context_scale,
                                 generator)
        seconds["sslrun"] += time.perf_counter() - start
        counts["sslrun"] += [sslrun_mask_tokens(mask) for mask in masks]
    return "\n".join(
        f"{name}: context {statistics.mean(c for c, _ in found):.1f}, targets {statistics.mean(t for _, t in found):.1f} "
        f"tokens per image; masks drawn in {seconds[name] / batches * 1e3:.1f} ms per batch of {batch}"
        for name, found in counts.items())


def model_step(cfg, pairs: int = 5, steps: int = 5) -> dict:
    """The model's share of each side's step: forward and backward of the loss (no optimizer, no
    EMA update, no data loading) on one fixed batch of the recipe's views (random pixels; I-JEPA's
    masks each side's own), from the same backbone weights, with the threads of a run, timed in
    alternating pairs. Beside the runs' images/s this splits a ratio into the model's part and the
    data path's. I-JEPA's sslrun side also runs on lightly's masks (lightly's work) and on its own
    token counts at one length (`variable_lengths_cost`: its masks' time over that), so its ratio
    splits into the work each side's masking asks for and the price of every image's own lengths."""
    import platform

    import torch
    from torch.utils.data import default_collate

    from sslrun.data.masking import pack_masks
    from sslrun.launch.threads import cpu_threads
    from sslrun.models.backbones import build_backbone
    from sslrun.train import build_method, lr_schedule

    cpu_threads(1)
    schedule, steps_per_epoch = lr_schedule(cfg, 60000)
    torch.manual_seed(0)
    ours = build_method(cfg, schedule, None, steps_per_epoch).train()
    backbone = build_backbone(cfg.backbone, cfg.data.channels)
    backbone.load_state_dict(ours.backbone.state_dict())
    theirs = LightlyMethod(cfg, backbone, schedule.total_steps, steps_per_epoch)
    theirs.modules.train()
    batch = cfg.data.batch_size
    views = [torch.randn(batch, cfg.data.channels, view.size, view.size)
             for view in cfg.augmentation.views for _ in range(view.count)]
    their_views, _ = (theirs.collate or default_collate)([([view[i] for view in views], 0) for i in range(batch)])
    our_batches, other_masks = {"sslrun": {"views": views}}, {}
    if ours.sample_masks is not None:  # I-JEPA; its ratio taken apart: sslrun on two other sets of masks
        from sslrun.data.masking import ContextAndTargets

        own = [ours.sample_masks(torch.Generator().manual_seed(i)) for i in range(batch)]
        _, context, targets = their_views  # lightly's masks: lightly's work exactly
        theirs_as_ours = [ContextAndTargets(context[0][i], [block[i] for block in targets]) for i in range(batch)]
        # sslrun's work with one length per segment kind: the masks of its image nearest the mean
        # counts, repeated for every image (so SDPA takes one batch per layer, as on lightly's)
        sizes = [sslrun_mask_tokens(mask) for mask in own]
        mean = [statistics.mean(size[k] for size in sizes) for k in (0, 1)]
        typical = min(range(batch), key=lambda i: sum(abs(sizes[i][k] - mean[k]) / mean[k] for k in (0, 1)))
        for name, masks in (("sslrun", own), ("sslrun_on_lightly_masks", theirs_as_ours),
                            ("sslrun_equal_lengths", [own[typical]] * batch)):
            our_batches[name] = {"views": views, "masks": pack_masks(masks)}
        other_masks["context_and_target_tokens_per_image"] = {
            "sslrun": [round(value, 1) for value in mean], "sslrun_equal_lengths": list(sizes[typical]),
            "lightly": list(lightly_mask_tokens(context, targets))}
    losses = {}

    def our_step(name):
        ours.zero_grad(set_to_none=True)
        loss = ours.training_loss(our_batches[name]).loss
        loss.backward()
        losses[name] = float(loss.detach())

    def theirs_step():
        theirs.modules.zero_grad(set_to_none=True)
        loss = theirs.loss(their_views, 0)
        loss.backward()
        losses["lightly"] = float(loss.detach())

    def seconds(step) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps

    sides = {"lightly": theirs_step, **{name: lambda name=name: our_step(name) for name in our_batches}}
    for step in sides.values():  # warm-up
        seconds(step)
    times = [{name: seconds(step) for name, step in sides.items()} for _ in range(pairs)]  # alternating
    ms = {name: statistics.median(row[name] for row in times) * 1e3 for name in sides}
    theirs_ms, ours_ms = ms.pop("lightly"), ms.pop("sslrun")
    for name, other in ms.items():
        other_masks.update({f"{name}_ms": round(other, 3), f"{name}_over_lightly": round(theirs_ms / other, 3)})
    if "sslrun_equal_lengths" in ms:
        other_masks["variable_lengths_cost"] = round(ours_ms / ms["sslrun_equal_lengths"], 3)
    return {"method": cfg.method.name, "batch": batch, "sslrun_ms": round(ours_ms, 2), "lightly_ms": round(theirs_ms, 2),
            "sslrun_over_lightly": round(theirs_ms / ours_ms, 3), **other_masks, "losses": losses,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "lightly": _lightly_version(), "date": datetime.now().strftime("%Y-%m-%d")}


def _lightly_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightly")
    except PackageNotFoundError:
        return "not installed"


def methods_problem(methods) -> Optional[str]:
    """Why --methods cannot run (a method lightly has no counterpart of here), or None."""
    bad = [m for m in methods if m not in METHODS]
    return f"--methods: {bad[0]} has no lightly counterpart here; choose from {', '.join(METHODS)}" if bad else None


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: each quick recipe's)")
    parser.add_argument("--root", default=str(REPO / "benchmarks" / "peers"))
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--records", default=str(REPO / "docs" / "results" / "peers"),
                        help="where each run's summary.json and eval/knn.json are kept for later tables")
    parser.add_argument("--table", action="store_true", help="only rewrite the table from the run directories")
    parser.add_argument("--ijepa-tokens", action="store_true",
                        help="print the tokens per image each I-JEPA side trains on (its own masks) and exit")
    parser.add_argument("--model-step", action="store_true",
                        help="time each method's forward and backward alone on both sides (JSON lines) and exit; "
                             "I-JEPA's sslrun side also on lightly's masks and at equal lengths")
    parser.add_argument("overrides", nargs="*", help="more sslrun overrides for both sides (data=mnist5k ...)")
    return parser


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--lightly-run":
        from sslrun.config import compose

        args = sys.argv[2:]
        cfg = compose([a for a in args if not a.startswith("hydra.run.dir=")])
        run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")))
        train_lightly(cfg, run_dir)
        return 0
    parser = arguments()
    options = parser.parse_args()
    from sslrun.benchmark import write_results
    from sslrun.config import compose

    if options.ijepa_tokens:
        print(ijepa_tokens(compose(["method=ijepa", *options.overrides])))
        return 0

    methods, seeds, root = options.methods.split(","), list(range(options.seeds)), Path(options.root)
    records, carried = Path(options.records), existing_rows(Path(options.out))
    problem = methods_problem(methods)
    if problem:
        parser.error(problem)
    if options.model_step:
        for method in methods:
            print(json.dumps(model_step(compose([f"method={method}", *options.overrides]))), flush=True)
        return 0
    for method in methods if not options.table else []:
        (root / method).mkdir(parents=True, exist_ok=True)
        batch = compose([f"method={method}", *options.overrides]).data.batch_size
        (root / method / "batch.json").write_text(json.dumps({"batch": batch}) + "\n")
        for seed in seeds:
            order = SIDES if seed % 2 == 0 else SIDES[::-1]
            for side in order:
                run_side(side, method, seed, options.steps, root, options.overrides)
            for side in SIDES:
                evaluate(root / method / f"{side}_seed{seed}")
            save_records(root, records, method)
            write_results(Path(options.out), "peers", table(METHODS, seeds, root, records, carried))
    write_results(Path(options.out), "peers", table(METHODS, seeds, root, records, carried))  # every method so far
    print(f"table written to {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
