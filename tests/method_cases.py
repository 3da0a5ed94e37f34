"""Every method at toy sizes, from the registry: what the generic tests (2 processes == 1, the
FSDP step, a CLI run) build. A new method is covered by registering it; nothing here names one.

Each method's YAML option (conf/method/*.yaml: the registered methods and their variants, such as
mocov3_vit) runs on its quick-recipe presets, shrunk: the method's own `test_overrides`
(registration) and a backbone of its family at toy width."""

from functools import lru_cache
from typing import List, Optional
from unittest import mock

import torch

from sslrun.config import CONF_DIR, compose
from sslrun.data.masking import pack_masks, unpack_masks
from sslrun.methods.registry import MethodSpec, registered

BATCH = 8  # global
TINY_BACKBONE = {
    "resnet": ["backbone.timm_kwargs={channels:[8,16,16,32]}"],
    "vit": ["backbone.timm_kwargs.embed_dim=48", "backbone.timm_kwargs.depth=2"],
}


def options(test: Optional[str] = None) -> List[str]:
    """The method YAML options, less those whose method is exempt from `test`."""
    names = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
    return [name for name in names if test is None or test not in spec_of(name).exempt]


@lru_cache(maxsize=None)
def _composed(option: str):
    """`method=option` as Hydra composes it, unvalidated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[f"method={option}"])


def method_name(option: str) -> str:
    return _composed(option).method.name


def spec_of(option: str) -> MethodSpec:
    return registered()[method_name(option)]


def tiny_overrides(option: str) -> List[str]:
    """`method=option` at toy sizes on its quick presets (command-line overrides)."""
    family = "resnet" if _composed(option).backbone.attention is None else "vit"
    return [f"method={option}", "recipe=quick", f"data.batch_size={BATCH}", "eval.enabled=false",
            "scheduler.warmup_epochs=0", *TINY_BACKBONE[family], *spec_of(option).test_overrides]


def tiny_cfg(option: str, *extra: str):
    return compose([*tiny_overrides(option), *extra])


def tiny_method(option: str, *extra: str, seed: int = 0):
    from sslrun.train import build_method, lr_schedule

    cfg = tiny_cfg(option, *extra)
    schedule, steps_per_epoch = lr_schedule(cfg, 60000)
    torch.manual_seed(seed)
    return build_method(cfg, schedule, None, steps_per_epoch), cfg


def tiny_batch(cfg, seed: int = 7, method=None) -> dict:
    """A whole global batch the method's views fit: every crop the augmentation makes; for
    image-text methods, token ids ending in the end token (the highest id); for a `method` that
    masks patches, its masks, drawn as the loader draws them (one generator per image)."""
    g = torch.Generator().manual_seed(seed)
    channels = cfg.data.channels
    batch = {"views": [torch.randn(BATCH, channels, view.size, view.size, generator=g)
                       for view in cfg.augmentation.views for _ in range(view.count)]}
    if registered()[cfg.method.name].image_text:
        text = torch.randint(1, 1000, (BATCH, cfg.method.text.context_length), generator=g)
        text[:, -1] = 49407
        batch["text"] = text
    if method is not None and method.sample_masks is not None:
        batch["masks"] = pack_masks([method.sample_masks(torch.Generator().manual_seed(seed * 1000 + i))
                                     for i in range(BATCH)])
    return batch


def shard_of(batch: dict, rank: int, world: int) -> dict:
    """This process's rows of the global batch."""
    per = BATCH // world
    rows = slice(rank * per, (rank + 1) * per)

    def shard(key, value):
        if key == "views":
            return [v[rows] for v in value]
        return pack_masks(unpack_masks(value)[rows]) if key == "masks" else value[rows]

    return {key: shard(key, value) for key, value in batch.items()}


def at_step(method, step: int):
    """A context in which `method.global_step` reads `step` (schedules, queues, seeded draws)."""
    return mock.patch.object(type(method), "global_step", new_callable=mock.PropertyMock, return_value=step)
