"""FSDP2 sharding plans on 2 CPU processes (gloo): a ViT sharded per block runs the packed
multi-crop pass exactly as the unsharded one does on the whole batch, and a teacher sharded by the
same plan takes its EMA step on local shards, with no communication."""

import copy

import pytest
import torch
from torch.distributed.tensor import DTensor

from sslrun.models.ema import ema_update
from sslrun.models.vit import enable_packing, packed_forward
from tests.method_cases import options, shard_of, tiny_batch, tiny_method
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


# ---------------------------------------------------------------------------- every method
def method_for(option):
    """The method at toy sizes (tests/method_cases.py) and the sharding options it is tested with:
    one method keeps its shards in CPU memory, one recomputes its blocks."""
    method, cfg = tiny_method(option, "trainer=ddp")
    sharding = {"reshard_after_forward": True, "param_dtype": None, "cpu_offload": option == "byol",
                "activation_checkpointing": option == "dino"}
    return method, sharding, cfg


def one_step(method, batch, rank, world, sharded):
    """One training step on this rank's half of the batch, as Lightning runs it; the loss of the
    global batch and every parameter (whole) after the step and the EMA update."""
    import torch.distributed as dist

    optimizer = method.configure_optimizers()
    before = {n: p.detach().clone() for n, p in method.named_parameters() if not isinstance(p, DTensor)}
    torch.manual_seed(11 + rank)  # the same masks / shuffles in both runs
    loss = method.training_loss(shard_of(batch, rank, world)).loss
    loss.backward()
    if not sharded:  # DDP's gradient averaging
        for p in method.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
    optimizer.step()
    method.after_optimizer_step()
    dist.all_reduce(total := loss.detach().clone())
    params = {n: (p.full_tensor() if sharded else p).detach().clone() for n, p in method.named_parameters()}
    moved = sum(not torch.equal(params[n], before[n]) for n in before) / max(len(before), 1)
    return total.item() / world, params, moved


def _every_method(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh

    from sslrun.distributed.fsdp import fsdp_options, shard_method

    results = {}
    for name in options("fsdp"):
        reference, _, cfg = method_for(name)
        batch = tiny_batch(cfg, method=reference)
        expected = one_step(reference, batch, rank, world, sharded=False)
        method, sharding, _ = method_for(name)
        mesh = init_device_mesh("cpu", (world,))
        checkpointing = sharding.pop("activation_checkpointing")
        shard_method(method, fsdp_options(mesh, **sharding), checkpointing)
        got = one_step(method, batch, rank, world, sharded=True)
        results[name] = (expected, got)
    if rank == 0:
        torch.save(results, out / "methods.pt")


def test_every_method_takes_the_same_step_sharded_as_under_ddp(tmp_path):
    """Each method sharded by the plan (backbone units, heads, teachers, DINOv2's mask token) takes
    the same optimizer step (and EMA update) as the unsharded model with DDP's averaged gradients."""
    run_in_processes(_every_method, 2, tmp_path)
    results = torch.load(tmp_path / "methods.pt", weights_only=False)
    assert set(results) == set(options("fsdp")) and len(results) >= 11
    for name, ((loss, params, moved), (sharded_loss, sharded_params, _)) in results.items():
        assert moved > 0.5, f"{name}: the step must change most parameters for the comparison to mean anything"
        assert sharded_loss == pytest.approx(loss, rel=1e-5), name
        assert params.keys() == sharded_params.keys()
        for key, value in params.items():
            torch.testing.assert_close(sharded_params[key], value, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


def _options_and_refusals(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh

    from sslrun.distributed.fsdp import fsdp_options, shard_method

    mesh = init_device_mesh("cpu", (world,))
    method = torch.nn.Module()
    method.head = torch.nn.Linear(4, 4)
    method.scale = torch.nn.Parameter(torch.ones(()))
    with pytest.raises(ValueError, match=r"parameters \['scale'\] belong to no module FSDP can shard"):
        shard_method(method, fsdp_options(mesh))

    # bf16 parameters for compute, fp32 shards and gradient reduction; weights kept gathered from
    # forward to backward (reshard_after_forward=false).
    reference, _, cfg = method_for("dino")
    batch = tiny_batch(cfg)
    expected, _, _ = one_step(reference, batch, rank, world, sharded=False)
    method, _, _ = method_for("dino")
    shard_method(method, fsdp_options(mesh, reshard_after_forward=False, param_dtype="bf16"))
    outputs = []
    method.backbone.register_forward_hook(lambda module, args, output: outputs.append(output.dtype))
    method.backbone(batch["views"][0][:2])
    loss, params, _ = one_step(method, batch, rank, world, sharded=True)
    # Activation checkpointing: a block's first norm runs again in backward (the recomputation).
    from sslrun.distributed.fsdp import checkpoint_activations

    vit = tiny_vit()
    checkpoint_activations(vit)
    shard_method(torch.nn.ModuleDict({"backbone": vit}), fsdp_options(mesh))
    norm_calls = []
    vit.blocks[0].norm1.register_forward_hook(lambda *args: norm_calls.append(1))
    loss_of(packed_forward(vit, [c[rank * 4:(rank + 1) * 4] for c in crops()])).backward()
    if rank == 0:
        torch.save({"expected": expected, "loss": loss, "compute": outputs[0], "norm_calls": len(norm_calls),
                    "stored": {p.dtype for p in params.values()}}, out / "options.pt")


def test_bf16_parameters_checkpointing_and_a_bare_parameter_refused_by_name(tmp_path):
    run_in_processes(_options_and_refusals, 2, tmp_path)
    got = torch.load(tmp_path / "options.pt", weights_only=False)
    assert got["norm_calls"] == 2  # forward, then again in backward
    assert got["compute"] == torch.bfloat16 and got["stored"] == {torch.float32}
    assert got["loss"] == pytest.approx(got["expected"], rel=2e-2)  # bf16 rounding only
