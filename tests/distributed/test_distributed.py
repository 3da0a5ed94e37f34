"""Global-batch correctness: W processes x batch B == 1 process x batch W*B (loss AND gradients)."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import OmegaConf

from sslrun.distributed import GlobalBatchNorm, all_gather_with_grad, convert_to_global_bn, gather_rows, rank
from sslrun.losses import nt_xent_loss
from sslrun.methods.simclr import SimCLR
from sslrun.models.backbones import build_backbone
from sslrun.optim import WarmupCosine
from tests.processes import run_in_processes

WORLD = 2


def encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 6))


def data(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 10, generator=g), torch.randn(n, 10, generator=g)


def simclr_loss(model, x1, x2, temperature=0.3):
    z1, z2 = model(x1), model(x2)
    return nt_xent_loss(z1, z2, temperature, all_gather_with_grad(z1), all_gather_with_grad(z2),
                        offset=rank() * x1.shape[0])


def _ddp_nt_xent(rank_, world, out):
    model = nn.parallel.DistributedDataParallel(encoder())
    x1, x2 = data()
    b = x1.shape[0] // world
    loss = simclr_loss(model, x1[rank_ * b:(rank_ + 1) * b], x2[rank_ * b:(rank_ + 1) * b])
    loss.backward()  # DDP averages the gradients over processes
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    if rank_ == 0:
        torch.save({"loss": torch.stack(losses).mean(),
                    "grads": [p.grad for p in model.module.parameters()]}, out)


def test_gathered_nt_xent_equals_single_process_big_batch(tmp_path):
    run_in_processes(_ddp_nt_xent, WORLD, tmp_path / "ddp.pt")
    distributed = torch.load(tmp_path / "ddp.pt")

    model = encoder()
    x1, x2 = data()
    loss = simclr_loss(model, x1, x2)
    loss.backward()
    assert torch.allclose(distributed["loss"], loss.detach(), atol=1e-6)
    for mine, theirs in zip([p.grad for p in model.parameters()], distributed["grads"]):
        assert torch.allclose(mine, theirs, atol=1e-6), (mine - theirs).abs().max()


def _gather_without_grad_sum(rank_, world, out):
    """The classic bug, for contrast: gathering without summing gradients across processes."""
    model = nn.parallel.DistributedDataParallel(encoder())
    x1, x2 = data()
    b = x1.shape[0] // world
    z1, z2 = model(x1[rank_ * b:(rank_ + 1) * b]), model(x2[rank_ * b:(rank_ + 1) * b])
    gathered = []
    for z in (z1, z2):
        parts = [torch.zeros_like(z) for _ in range(world)]
        dist.all_gather(parts, z.detach())
        parts[rank_] = z  # only the local rows carry gradient
        gathered.append(torch.cat(parts))
    nt_xent_loss(z1, z2, 0.3, *gathered, offset=rank_ * b).backward()
    if rank_ == 0:
        torch.save([p.grad for p in model.module.parameters()], out)


def test_the_naive_gather_is_detectably_wrong(tmp_path):
    """Guards the test above: a gather that drops the other processes' gradients must differ."""
    run_in_processes(_gather_without_grad_sum, WORLD, tmp_path / "naive.pt")
    naive = torch.load(tmp_path / "naive.pt")
    model = encoder()
    simclr_loss(model, *data()).backward()
    assert any(not torch.allclose(p.grad, g, atol=1e-4) for p, g in zip(model.parameters(), naive))


def _global_bn(rank_, world, out):
    torch.manual_seed(0)
    bn = convert_to_global_bn(nn.BatchNorm1d(3))
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(3)) * 4 + 1
    b = x.shape[0] // world
    local = x[rank_ * b:(rank_ + 1) * b].requires_grad_()
    y = bn(local)
    (y * torch.arange(1.0, 4.0)).pow(2).sum().backward()
    ys = gather_rows(y.detach())
    xgrads = gather_rows(local.grad)
    for p in bn.parameters():
        dist.all_reduce(p.grad)  # parameter gradients: sum of per-process contributions
    if rank_ == 0:
        torch.save({"y": ys, "x_grad": xgrads, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad,
                    "running_mean": bn.running_mean, "running_var": bn.running_var}, out)


def test_global_batch_norm_equals_batch_norm_over_the_whole_batch(tmp_path):
    run_in_processes(_global_bn, WORLD, tmp_path / "gbn.pt")
    got = torch.load(tmp_path / "gbn.pt")
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    x = (torch.randn(8, 3, generator=torch.Generator().manual_seed(3)) * 4 + 1).requires_grad_()
    y = bn(x)
    (y * torch.arange(1.0, 4.0)).pow(2).sum().backward()
    assert torch.allclose(got["y"], y.detach(), atol=1e-5)
    assert torch.allclose(got["x_grad"], x.grad, atol=1e-4)
    assert torch.allclose(got["w_grad"], bn.weight.grad, atol=1e-4)
    assert torch.allclose(got["b_grad"], bn.bias.grad, atol=1e-4)
    assert torch.allclose(got["running_mean"], bn.running_mean, atol=1e-6)
    assert torch.allclose(got["running_var"], bn.running_var, atol=1e-5)


def test_conversion_keeps_frozen_parameters_frozen():
    frozen = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).requires_grad_(False)
    converted = convert_to_global_bn(frozen)
    assert isinstance(converted[1], GlobalBatchNorm)
    assert not any(p.requires_grad for p in converted.parameters())


def test_global_batch_norm_is_plain_batch_norm_on_one_process():
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(4)
    converted = convert_to_global_bn(copy.deepcopy(reference))
    assert isinstance(converted, GlobalBatchNorm)
    x = torch.randn(5, 4, 3, 3)
    assert torch.allclose(converted(x), reference(x), atol=1e-6)
    assert torch.allclose(converted.running_var, reference.running_var)


def tiny_simclr():
    torch.manual_seed(0)
    backbone_cfg = OmegaConf.create({"name": "resnet18", "small_stem": False, "drop_path_rate": 0.0,
                                     "timm_kwargs": {"channels": [8, 16, 16, 32]}, "attention": None})
    method_cfg = OmegaConf.create({"temperature": 0.2, "projector": {
        "num_layers": 2, "hidden_dim": 32, "out_dim": 16, "batch_norm": True, "last_batch_norm": True}})
    optimizer_cfg = OmegaConf.create({"weight_decay": 0.0, "final_weight_decay": None, "exclude_bias_and_norm": True,
                                      "probe_lr": 0.1})
    return SimCLR(method_cfg, backbone=build_backbone(backbone_cfg, in_chans=1), optimizer_cfg=optimizer_cfg,
                  lr_schedule=WarmupCosine(peak=0.1, total_steps=10), num_classes=None, steps_per_epoch=5).double()


def simclr_views(n=8):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, 1, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]


def _ddp_simclr(rank_, world, out):
    method = convert_to_global_bn(tiny_simclr())
    views = simclr_views()
    b = views[0].shape[0] // world
    loss = method.training_loss({"views": [v[rank_ * b:(rank_ + 1) * b] for v in views]}).loss
    loss.backward()
    for p in method.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world  # what DDP does
    dist.all_reduce(loss)
    if rank_ == 0:
        torch.save({"loss": loss / world, "grads": {n: p.grad for n, p in method.named_parameters()}}, out)


@pytest.mark.slow
def test_simclr_with_global_bn_on_two_processes_equals_one_big_batch(tmp_path):
    """The whole method (ResNet with BN, projector with BN, gathers): 2 x B == 1 x 2B, in float64 to
    its rounding. (In float32 the runs drift apart over steps from rounding alone: test_scale_out.)"""
    run_in_processes(_ddp_simclr, WORLD, tmp_path / "simclr.pt")
    got = torch.load(tmp_path / "simclr.pt")
    method = tiny_simclr()
    loss = method.training_loss({"views": simclr_views()}).loss
    loss.backward()
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-12)
    for name, p in method.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-9, atol=1e-12, msg=name)

