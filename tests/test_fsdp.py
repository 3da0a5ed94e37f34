"""FSDP2 sharding plans on 2 CPU processes (gloo): a ViT sharded per block runs the packed
multi-crop pass exactly as the unsharded one does on the whole batch, and a teacher sharded by the
same plan takes its EMA step on local shards, with no communication."""

import copy

import pytest
import torch

from sslrun.models.ema import ema_update
from sslrun.models.vit import enable_packing, packed_forward
from tests.processes import run_in_processes

# The packed pass returns its per-crop outputs as views of one sequence; FSDP2 warns about in-place
# ops on such views, which nothing here does.
pytestmark = pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view tensor")


def tiny_vit(attention="sdpa"):
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, num_classes=0, in_chans=1,
                            dynamic_img_size=True)
    return enable_packing(vit, attention)


def crops():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 1, 16, 16, generator=g) for _ in range(2)] + \
           [torch.randn(8, 1, 8, 8, generator=g) for _ in range(3)]


def loss_of(tokens):
    """A mean over images (so 2 x 4 images average to 1 x 8) that reaches every token."""
    return sum(t.float().pow(2).sum(-1).mean() for t in tokens)


def sgd_then_ema(student, teacher):
    with torch.no_grad():
        for p in student.parameters():
            p.sub_(0.1 * p.grad)
    ema_update(teacher, student, 0.9)


def _sharded(rank, world, out):
    from torch.distributed.tensor.debug import CommDebugMode

    from sslrun.distributed.fsdp import shard_backbone

    student = tiny_vit()
    teacher = copy.deepcopy(student)  # as MomentumEncoder makes it, before sharding
    shard_backbone(student)
    shard_backbone(teacher)
    tokens = packed_forward(student, [c[rank * 4:(rank + 1) * 4] for c in crops()])
    loss_of(tokens).backward()
    grads = {n: p.grad.full_tensor() for n, p in student.named_parameters()}
    with CommDebugMode() as comm:
        sgd_then_ema(student, teacher)
    torch.save({
        "tokens": [t.detach() for t in tokens], "grads": grads, "ema_collectives": comm.get_total_counts(),
        "teacher": {n: p.full_tensor() for n, p in teacher.named_parameters()},
        "qkv_shard": tuple(teacher.blocks[0].attn.qkv.weight.to_local().shape),
    }, out / f"rank{rank}.pt")


def test_sharded_vit_packed_pass_and_ema_equal_the_unsharded_ones(tmp_path):
    run_in_processes(_sharded, 2, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    student = tiny_vit()
    teacher = copy.deepcopy(student)
    tokens = packed_forward(student, crops())
    loss_of(tokens).backward()
    for r, got in enumerate(ranks):
        for mine, whole in zip(got["tokens"], tokens):
            torch.testing.assert_close(mine, whole[r * 4:(r + 1) * 4].detach(), rtol=1e-5, atol=1e-5)
        for name, p in student.named_parameters():  # gradients averaged over ranks = the whole batch's
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    sgd_then_ema(student, teacher)
    for got in ranks:
        assert got["ema_collectives"] == 0  # each rank updates its own shards
        assert got["qkv_shard"] == (3 * 192 // 2, 192)  # half of the q, k, v rows on each rank
        for name, p in teacher.named_parameters():
            torch.testing.assert_close(got["teacher"][name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)


def tiny_resnet():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=0, in_chans=1, channels=[8, 16, 32, 64]).eval()  # running BN stats


def _sharded_resnet(rank, world, out):
    from sslrun.distributed.fsdp import shard_backbone, shard_units

    resnet = tiny_resnet()
    assert len(shard_units(resnet)) == 4  # layer1..layer4, then the root (stem, pooling)
    shard_backbone(resnet)
    features = resnet(crops()[0][rank * 4:(rank + 1) * 4])
    features.pow(2).sum(-1).mean().backward()
    torch.save({"features": features.detach(), "grads": {n: p.grad.full_tensor() for n, p in resnet.named_parameters()}},
               out / f"resnet{rank}.pt")


def test_sharded_resnet_per_stage_equals_the_unsharded_one(tmp_path):
    run_in_processes(_sharded_resnet, 2, tmp_path)
    resnet = tiny_resnet()
    features = resnet(crops()[0])
    features.pow(2).sum(-1).mean().backward()
    for r in range(2):
        got = torch.load(tmp_path / f"resnet{r}.pt", weights_only=False)
        torch.testing.assert_close(got["features"], features[r * 4:(r + 1) * 4].detach(), rtol=1e-5, atol=1e-5)
        for name, p in resnet.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
