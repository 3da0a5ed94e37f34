"""LARS, parameter groups and schedules against their formulas."""

import math

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from sslrun.optim import LARS, WarmupCosine, build_optimizer, parameter_groups


def test_lars_step_matches_formula():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(4))
    optimizer = LARS([{"params": [w], "weight_decay": 0.1, "lars_adapt": True},
                      {"params": [b], "weight_decay": 0.0, "lars_adapt": False}],
                     lr=0.5, momentum=0.9, trust_coefficient=0.02)
    w0, b0 = w.detach().clone(), b.detach().clone()
    velocity_w, velocity_b = torch.zeros_like(w0), torch.zeros_like(b0)
    for step in range(3):
        w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
        update = w.grad + 0.1 * w0
        update = update * 0.02 * w0.norm() / update.norm()
        velocity_w = update if step == 0 else 0.9 * velocity_w + update
        velocity_b = b.grad.clone() if step == 0 else 0.9 * velocity_b + b.grad
        w0, b0 = w0 - 0.5 * velocity_w, b0 - 0.5 * velocity_b
        optimizer.step()
        assert torch.allclose(w, w0, atol=1e-6) and torch.allclose(b, b0, atol=1e-6)


def test_lars_leaves_zero_weights_unscaled():
    w = nn.Parameter(torch.zeros(3))
    optimizer = LARS([w], lr=1.0, momentum=0.0)
    w.grad = torch.ones(3)
    optimizer.step()
    assert torch.allclose(w, -torch.ones(3))  # trust ratio 1 when |w| = 0


def test_bias_and_norm_parameters_are_excluded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = parameter_groups(model.named_parameters(), weight_decay=0.05, exclude_bias_and_norm=True)
    decayed, excluded = groups
    assert {p.ndim for p in decayed["params"]} == {4, 2} and decayed["weight_decay"] == 0.05
    assert all(p.ndim == 1 for p in excluded["params"]) and len(excluded["params"]) == 4
    assert excluded["weight_decay"] == 0.0 and excluded["lars_adapt"] is False
    everything = parameter_groups(model.named_parameters(), weight_decay=0.05, exclude_bias_and_norm=False)
    assert len(everything) == 1 and len(everything[0]["params"]) == 6


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("lars", LARS)])
def test_build_optimizer(name, cls):
    cfg = OmegaConf.create({"name": name, "momentum": 0.9, "nesterov": False, "betas": [0.9, 0.95], "eps": 1e-8,
                            "trust_coefficient": 0.001, "fused": True})
    model = nn.Linear(3, 2)
    groups = parameter_groups(model.named_parameters(), 0.01, True)
    optimizer = build_optimizer(cfg, groups, lr=0.2)
    assert isinstance(optimizer, cls) and all(g["lr"] == 0.2 for g in optimizer.param_groups)
    if name == "adamw":
        assert optimizer.defaults["fused"] and optimizer.defaults["betas"] == (0.9, 0.95)


def test_fused_adamw_takes_the_foreach_step():
    """optimizer.fused=true (the default) is only a faster kernel: the same update as foreach."""
    torch.manual_seed(0)
    models = [nn.Linear(6, 4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(8, 6)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.05, fused=fused)
                  for m, fused in zip(models, (False, True))]
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_warmup_cosine_closed_form():
    schedule = WarmupCosine(peak=1.0, total_steps=110, warmup_steps=10, final=0.1)
    assert schedule(0) == 0.0
    assert schedule(5) == pytest.approx(0.5)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(110) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)
    values = [schedule(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warmup
