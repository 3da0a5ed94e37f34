"""The offline protocols on one backbone: kNN, linear, fine-tuning, label-free statistics.

`evaluate(cfg)` runs `cfg.protocol` and writes RUN_DIR/eval/<protocol>.json: its numbers, the
settings it ran with (the whole protocol config), what was evaluated and on which images. In a
process group (devices=N, torchrun) every process embeds its share of each split, all of them
score the gathered features alike, and process 0 writes. The math is in sslrun/eval/.
"""

import json
import logging
import os
import time
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from sslrun.config import ConfigError
from sslrun.config.errors import require
from sslrun.data.augment import PhotometricAugment
from sslrun.data.datamodule import collate_eval, default_num_workers, fixed_subset
from sslrun.data.datasets import build_splits
from sslrun.data.sampler import GlobalBatchSampler
from sslrun.distributed.gather import is_distributed, rank, world_size
from sslrun.eval import alignment, effective_rank, knn_classify_many, uniformity
from sslrun.eval.finetune import finetune_optimizer, finetune_schedule
from sslrun.eval.linear import LinearSettings, linear_protocol, top1
from sslrun.evaluate.config import source_config
from sslrun.evaluate.features import Center, FeatureCache, Features, RandomCrop, Viewed, embed, file_digest
from sslrun.models.backbones import build_backbone
from sslrun.models.vit import is_vit
from sslrun.run_dir import RunDir

log = logging.getLogger(__name__)


class Evaluation:
    """What every protocol needs: its settings, the data, the device, the backbone, cached features."""

    def __init__(self, cfg: DictConfig, source: DictConfig):
        self.cfg, self.protocol, self.source, self.data = cfg, cfg.protocol, source, source.data
        self.layout = RunDir(cfg.run_dir)
        self.splits = build_splits(self.data)
        require(self.splits.heldout is not None and self.splits.num_classes > 0,
                f"data={self.data.name}: protocol={self.protocol.name} needs class labels and a held-out split; "
                f"give a labelled data set (data=fashion_mnist, imagefolder with a val/ folder, cifar10, ...)")
        self.device = _device(cfg.accelerator)
        self.normalize = PhotometricAugment([], self.data.mean, self.data.std).normalize
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
        self.num_workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(local)
        self.weights_sha256 = file_digest(source.weights)
        self.cache = FeatureCache(self.layout, self.data, cfg.cache)
        self.center = Center(self.data)
        self._backbone = None

    def dataset(self, split: str) -> Dataset:
        return {"train": self.splits.train, "test": self.splits.heldout}[split]

    def load_backbone(self, drop_path_rate: Optional[float] = None) -> torch.nn.Module:
        """The evaluated backbone with its weights, on the device, in eval mode."""
        from safetensors.torch import load_file

        cfg = self.source.backbone.copy()
        if drop_path_rate is not None:
            cfg.drop_path_rate = drop_path_rate
        model = build_backbone(cfg, in_chans=self.data.channels)
        try:
            model.load_state_dict(load_file(self.source.weights))
        except RuntimeError as error:
            problem = " ".join(str(error).split())[:300]
            raise ConfigError(f"{self.source.weights}: these weights do not fit backbone.name={cfg.name} "
                              f"({problem})") from None
        return model.to(self.device).eval()

    def features(self, split: str, view, indices: Optional[Sequence[int]] = None,
                 embedder: str = "backbone") -> Features:
        """(features, labels) of `split` (or its `indices`) in `view`, embedded by the trained
        backbone, the same backbone at a seeded random init, or as raw pixels; cached."""
        identity = {"backbone": {"weights_sha256": self.weights_sha256},
                    "random_init": {"random_init": OmegaConf.to_container(self.source.backbone), "seed": self.cfg.seed},
                    "pixels": {"pixels": True}}[embedder]

        def compute() -> Features:
            model, dim = self._embedder(embedder)
            with torch.inference_mode():
                return embed(model, Viewed(self.dataset(split), view, indices), dim, self.cfg.batch_size,
                             self.num_workers, self.device, self.normalize)

        return self.cache.get(split, identity, view.describe, indices, compute)

    def _embedder(self, embedder: str):
        if embedder == "pixels":
            return (lambda x: x.flatten(1)), self.data.channels * self.data.image_size ** 2
        if embedder == "random_init":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                model = build_backbone(self.source.backbone, in_chans=self.data.channels).to(self.device).eval()
            return model, model.num_features
        if self._backbone is None:
            self._backbone = self.load_backbone()
        return self._backbone, self._backbone.num_features

    def crop(self, scale: Sequence[float], draw: int) -> RandomCrop:
        """Draw `draw` of a random-resized crop + flip of every image, at the data's image size."""
        return RandomCrop(self.data.image_size, scale, self.cfg.seed, draw)

    def subset(self, split: str, size: Optional[int]) -> Optional[list]:
        """The indices of a fixed random `size` images of the split (the online evaluation's rule),
        None for all of them."""
        chosen = fixed_subset(self.dataset(split), size, self.cfg.seed)
        return None if chosen is self.dataset(split) else chosen.indices


def _device(accelerator: str) -> torch.device:
    cuda = torch.cuda.is_available()
    require(accelerator != "gpu" or cuda, "accelerator=gpu: no CUDA device here; use accelerator=cpu or auto")
    if accelerator == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


# ---------------------------------------------------------------------------- protocols
def knn(ev: Evaluation) -> dict:
    p = ev.protocol
    bank_indices = ev.subset("train", p.bank_size)

    def scores(embedder: str) -> Dict[str, float]:
        bank, bank_labels = ev.features("train", ev.center, embedder=embedder)
        queries, query_labels = ev.features("test", ev.center, embedder=embedder)
        if bank_indices is not None:
            bank, bank_labels = bank[bank_indices], bank_labels[bank_indices]
        predicted = knn_classify_many(queries, bank, bank_labels, ev.splits.num_classes, list(p.k), p.temperature)
        return {str(k): top1(predicted[k], query_labels) for k in p.k}

    by_k = scores("backbone")
    result = {"top1": by_k[str(p.report_k)], "top1_by_k": by_k, "k": p.report_k}
    for baseline in p.baselines:
        result[f"top1_{baseline}"] = scores(baseline)[str(p.report_k)]
    bank_size = len(bank_indices) if bank_indices is not None else len(ev.splits.train)
    result["features"] = {"bank": bank_size, "bank_split": "train", "queries": len(ev.splits.heldout),
                          "query_split": "test (held-out)", "view": ev.center.describe}
    return result


def linear(ev: Evaluation) -> dict:
    p = ev.protocol
    train, train_labels = ev.features("train", ev.center)
    test, test_labels = ev.features("test", ev.center)
    passes = [ev.features("train", ev.crop(p.crop_scale, draw))[0] for draw in range(p.augment_passes)]
    settings = LinearSettings(lrs=list(p.lr), weight_decays=list(p.weight_decay), epochs=p.epochs,
                              batch_size=p.batch_size, momentum=p.momentum, heldout_fraction=p.heldout_fraction,
                              seed=ev.cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(p.threads or threads)
    try:
        result = linear_protocol(torch.stack(passes) if passes else train, train_labels, test, test_labels,
                                 ev.splits.num_classes, settings, train_validation=train if passes else None)
    finally:
        torch.set_num_threads(threads)
    views = [{**ev.crop(p.crop_scale, 0).recipe, "draws": p.augment_passes}] if passes else [ev.center.describe]
    result.update(epochs=p.epochs, grid={"lr": list(p.lr), "weight_decay": list(p.weight_decay)},
                  features={"train": len(train), "test": len(test), "dim": train.shape[1], "train_views": views,
                            "choice_and_test_view": ev.center.describe})
    return result


def stats(ev: Evaluation) -> dict:
    p = ev.protocol
    test, _ = ev.features("test", ev.center)
    indices = ev.subset("test", p.pairs) or list(range(len(ev.splits.heldout)))
    views = [ev.features("test", ev.crop(p.crop_scale, draw), indices)[0] for draw in (0, 1)]
    return {"rankme": effective_rank(test).item(), "alignment": alignment(*views, alpha=p.alignment_alpha),
            "uniformity": sum(uniformity(v, t=p.uniformity_t) for v in views) / 2,
            "features": {"rankme_images": len(test), "rankme_view": ev.center.describe, "pairs": len(indices),
                         "split": "test (held-out)", "pair_views": {**ev.crop(p.crop_scale, 0).recipe, "draws": [0, 1]},
                         "dim": test.shape[1]}}


class EpochCrops(Dataset):
    """Item (epoch, index): a random-resized crop + flip of image `index`, drawn from (seed, epoch)."""

    def __init__(self, base: Dataset, size: int, scale: Sequence[float], seed: int):
        self.base, self.size, self.scale, self.seed = base, size, scale, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        image, label = self.base[index][:2]
        return RandomCrop(self.size, self.scale, self.seed, epoch)(image, index), label


def finetune(ev: Evaluation) -> dict:
    p, world = ev.protocol, world_size()
    require(p.batch_size % world == 0, f"protocol.batch_size={p.batch_size}: must divide by the {world} processes")
    require(p.batch_size <= len(ev.splits.train), f"protocol.batch_size={p.batch_size}: more than the "
                                                  f"{len(ev.splits.train)} training images; give a smaller one")
    pretrained = ev.load_backbone(drop_path_rate=p.drop_path_rate)
    require(p.global_pool is None or is_vit(pretrained),
            f"protocol.global_pool={p.global_pool}: only a ViT pools a choice of tokens ({ev.source.backbone.name} "
            f"averages its feature map); drop it")
    result = _finetune(ev, pretrained, ev.layout.eval_dir / "finetune.safetensors")
    if "random_init" in p.baselines:  # the same protocol from the untrained network: what pretraining adds
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ev.cfg.seed)
            backbone = ev.source.backbone.copy()
            backbone.drop_path_rate = p.drop_path_rate
            untrained = build_backbone(backbone, in_chans=ev.data.channels).to(ev.device)
        baseline = _finetune(ev, untrained, ev.layout.eval_dir / "finetune_random_init.safetensors")
        result.update(top1_random_init=baseline["top1"], train_loss_random_init=baseline["train_loss"])
    return result


def _finetune(ev: Evaluation, model: torch.nn.Module, weights) -> dict:
    """Fine-tune `model` end to end by the protocol; score it on the test split; save it to `weights`."""
    p, world = ev.protocol, world_size()
    vit = is_vit(model)
    with torch.random.fork_rng(devices=[]):  # the new head's init: seeded, the same for every backbone
        torch.manual_seed(ev.cfg.seed)
        model.reset_classifier(ev.splits.num_classes, **({} if p.global_pool is None else {"global_pool": p.global_pool}))
    model.to(ev.device)
    lr = p.base_lr * p.batch_size / 256
    layer_decay = p.layer_decay if vit and p.layer_decay < 1 else None
    optimizer = finetune_optimizer(model, lr, p.weight_decay, layer_decay)
    sampler = GlobalBatchSampler(len(ev.splits.train), p.batch_size // world, world, rank(), ev.cfg.seed)
    per_epoch = sampler.batches_per_epoch
    total = p.epochs * per_epoch if p.max_steps is None else min(p.max_steps, p.epochs * per_epoch)
    # Warmup: the same fraction of a run that max_steps shortens.
    schedule = finetune_schedule(optimizer, total, round(total * min(1.0, p.warmup_epochs / p.epochs)))
    loader = DataLoader(EpochCrops(ev.splits.train, ev.data.image_size, p.crop_scale, ev.cfg.seed),
                        batch_size=p.batch_size // world, sampler=sampler, num_workers=ev.num_workers,
                        collate_fn=collate_eval, drop_last=True)
    network = torch.nn.parallel.DistributedDataParallel(model) if is_distributed() else model
    model.train()
    step, losses = 0, []
    for epoch in range(p.epochs):
        sampler.set_epoch(epoch)
        for images, labels in loader:
            if step == total:
                break
            schedule.step_update(step)
            logits = network(ev.normalize(images.to(ev.device)))
            loss = F.cross_entropy(logits, labels.to(ev.device), label_smoothing=p.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
    model.eval()
    with torch.inference_mode():
        logits, labels = embed(model, Viewed(ev.splits.heldout, ev.center), ev.splits.num_classes, ev.cfg.batch_size,
                               ev.num_workers, ev.device, ev.normalize)
    if rank() == 0:
        _save_weights(model, weights)
    last_epoch = losses[-per_epoch:]
    return {"top1": top1(logits.argmax(dim=1), labels), "steps": step, "epochs": step / per_epoch, "lr": lr,
            "layer_decay": layer_decay, "global_pool": model.global_pool if vit else "avg",
            "train_loss": sum(last_epoch) / max(1, len(last_epoch)),
            "weights": str(weights),
            "features": {"train": len(ev.splits.train), "test": len(ev.splits.heldout),
                         "train_view": {**ev.crop(p.crop_scale, 0).recipe, "draw": "the epoch"},
                         "test_view": ev.center.describe}}


def _save_weights(model: torch.nn.Module, path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(partial))
    os.replace(partial, path)


PROTOCOLS: Dict[str, Callable[[Evaluation], dict]] = {"knn": knn, "linear": linear, "finetune": finetune,
                                                      "stats": stats}


# ---------------------------------------------------------------------------- the run
def evaluate(cfg: DictConfig, training_overrides: Sequence[str] = (), composed: Optional[DictConfig] = None) -> dict:
    """Run `cfg.protocol` (a validated app config) and write RUN_DIR/eval/<protocol>.json (process 0);
    the result, on every process. `composed`: see config.source_config."""
    started = time.time()
    source = source_config(cfg, training_overrides, composed)
    evaluation = Evaluation(cfg, source)
    name = cfg.protocol.name
    log.info("protocol=%s on %s (%s, data %s)", name, source.weights, source.backbone.name, source.data.name)
    result = {"protocol": name, **PROTOCOLS[name](evaluation)}
    result.update(
        settings=OmegaConf.to_container(cfg.protocol), seed=cfg.seed,
        source={"run_dir": str(cfg.run_dir), "weights": source.weights, "weights_sha256": evaluation.weights_sha256,
                "method": source.method, "backbone": OmegaConf.to_container(source.backbone),
                "data": OmegaConf.to_container(source.data), "training_overrides": list(training_overrides)},
        world_size=world_size(), device=str(evaluation.device), wall_time_sec=time.time() - started)
    if rank() == 0:
        path = evaluation.layout.eval_result(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        partial.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(partial, path)
        numbers = ", ".join(f"{key} {result[key]:.4f}" for key in ("top1", "rankme", "alignment", "uniformity")
                            if key in result)
        log.info("protocol=%s: %s; %s", name, numbers, path)
    return result
