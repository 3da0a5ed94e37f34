"""Regional compilation (`trainer.compile`, distributed/compile.py): a compiled step equals the
eager one (loss and every gradient), stochastic depth's varying packings compile a bounded number
of graphs, and the compiled method runs under DDP and FSDP on 2 gloo processes as the eager one
does on the whole batch. Channels-last and TF32 are CUDA settings; what they do is checked here
on the modules and flags they set.

Tolerance: inductor fuses and reorders float operations, so compiled and eager agree to float32
rounding, not bit for bit: loss to 1e-5 relative, each gradient to 1e-4 relative plus 1e-5 of the
largest gradient (gradients that are zero in exact arithmetic, such as those of DINO's centred
logits' biases, are float noise of 1e-9 either way)."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor

from sslrun.distributed.compile import compile_method, set_tf32, use_channels_last
from tests.method_cases import shard_of, tiny_batch, tiny_method
from tests.processes import run_in_processes

pytestmark = pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view tensor")


def one_step(method, batch, seed=11):
    torch.manual_seed(seed)  # the same masks, shuffles and dropped segments in both runs
    out = method.training_loss(batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def assert_same_step(expected, got, what):
    (loss, grads), (compiled_loss, compiled_grads) = expected, got
    assert compiled_loss.item() == pytest.approx(loss.item(), rel=1e-5), what
    assert compiled_grads.keys() == grads.keys() and len(grads) > 4, what
    largest = max(g.abs().max().item() for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5 * largest, msg=f"{what}: {name}")


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("option,backend", [("dino", "inductor"), ("simclr", "inductor"), ("clip", "aot_eager")])
def test_a_compiled_step_equals_the_eager_step(option, backend):
    """DINO: a packed multi-crop ViT with stochastic depth, its EMA teacher and heads; SimCLR: a
    ResNet's stages and its projector; CLIP: the text tower's blocks (its graphs captured as
    training captures them; inductor's code for the same blocks is DINO's)."""
    torch._dynamo.reset()
    extra = ("backbone.drop_path_rate=0.3",) if option == "dino" else ()
    eager, cfg = tiny_method(option, *extra)
    compiled, _ = tiny_method(option, *extra)
    batch = tiny_batch(cfg)
    regions = compile_method(compiled, backend=backend)
    before = graphs()
    assert_same_step(one_step(eager, batch), one_step(compiled, batch), option)
    assert graphs() > before, "the compiled regions must have run"
    assert regions >= 3


def test_stochastic_depth_compiles_a_bounded_number_of_graphs():
    """Efficient stochastic depth runs each branch on a random subset of the crops: the token count
    changes at nearly every call. Over 20 steps the graphs compiled stop growing after the first
    steps (the token-wise parts go dynamic), instead of one compilation per length."""
    torch._dynamo.reset()
    method, cfg = tiny_method("dino", "backbone.drop_path_rate=0.5")
    compile_method(method, backend="aot_eager")  # dynamo decides what recompiles, whatever the backend
    batch = tiny_batch(cfg)
    block = method.backbone.blocks[-1]  # timm raises the rate with depth: the first block drops none
    lengths, compiled_mlp = set(), block.packed_mlp

    def recording(x):
        lengths.add(x.shape[1])
        return compiled_mlp(x)

    block.packed_mlp = recording
    start, counts = graphs(), []
    # A count that stopped growing because torch gave up (its recompile limit) must fail, not pass.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for step in range(20):
            method.zero_grad()
            one_step(method, batch, seed=step)
            counts.append(graphs() - start)
    assert len(lengths) >= 5, f"the subsets must vary for the test to mean anything: {sorted(lengths)}"
    assert counts[-1] == counts[2] <= 24, counts


# ---------------------------------------------------------------------------- 2 processes
def _compiled_on_two_processes(rank, world, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from sslrun.distributed import convert_to_global_bn
    from sslrun.distributed.fsdp import fsdp_options, shard_method

    results = {}
    method, cfg = tiny_method("simclr", "trainer=ddp")
    convert_to_global_bn(method)
    compile_method(method, backend="aot_eager")
    loss, grads = one_step(method, shard_of(tiny_batch(cfg), rank, world))
    for grad in grads.values():  # DDP's averaging
        dist.all_reduce(grad)
        grad /= world
    dist.all_reduce(loss)
    results["simclr"] = (loss / world, grads)

    method, cfg = tiny_method("dino", "trainer=fsdp")
    compile_method(method, backend="aot_eager")
    shard_method(method, fsdp_options(init_device_mesh("cpu", (world,))))
    loss, grads = one_step(method, shard_of(tiny_batch(cfg), rank, world))
    dist.all_reduce(loss)
    results["dino"] = (loss / world, {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in grads.items()})
    if rank == 0:
        torch.save(results, out / "compiled.pt")


def test_compiled_methods_on_two_processes_equal_eager_on_the_whole_batch(tmp_path):
    """Compiled SimCLR under DDP (global BN, gathered negatives) and compiled DINO under FSDP2 (the
    compiled regions run between FSDP's unshard and reshard of each block, the teacher sharded
    too) on 2 x 4 images == eager on 1 x 8."""
    run_in_processes(_compiled_on_two_processes, 2, tmp_path)
    results = torch.load(tmp_path / "compiled.pt", weights_only=False)
    for option in ("simclr", "dino"):
        method, cfg = tiny_method(option)
        assert_same_step(one_step(method, tiny_batch(cfg)), results[option], option)


# ---------------------------------------------------------------------------- CUDA settings
def test_channels_last_converts_cnn_backbones_and_their_inputs_only():
    resnet, cfg = tiny_method("simclr")
    vit, _ = tiny_method("dino")
    assert use_channels_last(resnet) == 1 and use_channels_last(vit) == 0
    conv = resnet.backbone.layer1[0].conv1  # (the stem takes 1 channel: both layouts at once)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    seen = []
    conv.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = tiny_batch(cfg)["views"][0]
    reference, _ = tiny_method("simclr")
    torch.testing.assert_close(resnet.backbone(images), reference.backbone(images), rtol=1e-4, atol=1e-5)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)


def test_tf32_sets_and_clears_cuda_fp32_precision():
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        set_tf32(True)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
        set_tf32(False)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("ieee", "ieee")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv
