"""Model FLOPs against hand counts (an MLP, a packed ViT block on every CPU attention backend), the
GPU peak table, and the Throughput callback's count and rates."""

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F

from sslrun.callbacks import Throughput
from sslrun.models.attention import Packing
from sslrun.models.flops import compute_dtype, count_flops, matmul_dtype, peak_flops
from sslrun.models.vit import enable_packing

D, HEADS, N, B = 64, 4, 17, 3  # width, heads, tokens per image (16 patches + cls), images


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def mlp_step_flops(batch):
    """Forward: 2 FLOPs per multiply-add, 2*B*(8*16 + 16*4). Backward, as autograd runs it: the
    second layer's weight gradient (2*B*16*4) and its input gradient (2*B*4*16), the first layer's
    weight gradient (2*B*8*16) but no input gradient, since the input does not require one. Bias
    gradients are sums: no FLOPs."""
    forward = 2 * batch * (8 * 16 + 16 * 4)
    backward = 2 * batch * 16 * 4 * 2 + 2 * batch * 8 * 16
    return forward + backward


def test_mlp_step_matches_the_hand_count():
    model, x = mlp(), torch.randn(5, 8)
    assert count_flops(lambda: model(x).sum().backward()) == mlp_step_flops(5) == 4480


def test_modules_called_under_no_grad_on_views_of_tensors_that_require_grad_are_counted():
    """SwAV computes its codes under no_grad from slices of embeddings that require grad: such a view
    requires grad but has no grad_fn, which torch's per-module tracker cannot hook."""
    model, layer = mlp(), torch.nn.Linear(4, 3, bias=False)

    def step():
        z = model(torch.randn(5, 8))
        with torch.no_grad():
            layer(z[:2])
        z.sum().backward()

    assert count_flops(step) == mlp_step_flops(5) + 2 * 2 * 4 * 3


def test_cpu_sdpa_is_counted_as_torch_counts_the_gpu_kernels():
    """torch's counter has no formula for CPU SDPA's kernel (it counts 0 for it); with ours, forward
    is QK^T and PV, 2*L*L*d each per head and image, backward 5 such matmuls (the scores
    recomputed)."""
    batch, head_dim = 2, 16
    q = torch.randn(batch, HEADS, N, head_dim, requires_grad=True)
    per_matmul = 2 * batch * HEADS * N * N * head_dim
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward()) == 7 * per_matmul


def tiny_vit(attention):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=4, depth=1, in_chans=1,
                            embed_dim=D, num_heads=HEADS, mlp_ratio=4, dynamic_img_size=True)
    return enable_packing(vit, attention)


def block_step_flops(vit):
    x = torch.randn(1, B * N, D, requires_grad=True)
    packing = Packing((N,) * B)
    return count_flops(lambda: vit.blocks[0].packed(x, packing, vit.block_diagonal_attention).sum().backward(),
                       vit, x.device)


def linear_flops(tokens):
    """qkv 2*T*D*3D, proj 2*T*D*D, MLP 2*T*D*4D twice; backward twice that (input and weight
    gradients: the block's input requires one)."""
    return 3 * 2 * tokens * D * (3 * D + D + 4 * D + 4 * D)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_packed_vit_block_matches_the_hand_count_with_sdpa(attention):
    """SDPA runs per segment: QK^T and PV are 2*L*L*D each per image (over all heads), forward;
    its backward 5 such (the scores recomputed). flex runs as SDPA while counted (it has no
    backward on CPU, and under the counter it would not compile): the same count; then flex again."""
    attention_flops, vit = B * (2 + 5) * 2 * N * N * D, tiny_vit(attention)
    assert block_step_flops(vit) == linear_flops(B * N) + attention_flops
    assert vit.block_diagonal_attention.name == attention


def test_packed_vit_block_matches_the_hand_count_with_math():
    """The math backend multiplies the whole T x T block-diagonal matrix (T = B*N tokens): QK^T and
    PV are 2*T*T*D each, forward; backward computes both inputs' gradients of both, 4 such."""
    tokens = B * N
    attention_flops = (2 + 4) * 2 * tokens * tokens * D
    assert block_step_flops(tiny_vit("math")) == linear_flops(tokens) + attention_flops


@pytest.mark.parametrize("name, dtype, tf32, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4),
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494.7),
    ("NVIDIA H100 80GB HBM3", "fp32", False, 66.9),
    ("NVIDIA H100 PCIe", "bf16", False, 756.0),
    ("NVIDIA H100 PCIe", "fp32", True, 378.0),
    ("NVIDIA H200", "bf16", False, 989.4),
    ("NVIDIA H200", "fp16", False, 989.4),
    ("NVIDIA A100-SXM4-80GB", "bf16", False, 312.0),
    ("NVIDIA A100-PCIE-40GB", "fp32", True, 156.0),
    ("NVIDIA A100 80GB PCIe", "fp32", False, 19.5),
    ("NVIDIA L4", "bf16", False, 121.0),
    ("NVIDIA L40S", "bf16", False, 362.05),
    ("NVIDIA A10", "bf16", False, 125.0),
    ("Tesla V100-SXM2-16GB", "fp16", False, 125.0),
    ("Tesla V100-SXM2-16GB", "fp32", True, 15.7),  # no TF32 on Volta: fp32 runs as fp32
    ("NVIDIA GeForce RTX 4090", "bf16", False, 165.2),
])
def test_peak_of_known_gpus(name, dtype, tf32, tflops):
    assert peak_flops(name, matmul_dtype(name, dtype, tf32)) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name, dtype", [
    ("NVIDIA H100 NVL", "bf16"),  # not the SXM board's clocks
    ("NVIDIA H200 NVL", "bf16"),
    ("NVIDIA A10G", "bf16"),  # not the A10
    ("NVIDIA GeForce RTX 4090 D", "bf16"),
    ("NVIDIA GH200 480GB", "bf16"),
    ("Tesla V100-SXM2-16GB", "bf16"),  # no bf16 tensor cores
    ("Some Future GPU", "bf16"),
    (None, "fp32"),  # the CPU
])
def test_peak_of_other_devices_is_unknown(name, dtype):
    assert peak_flops(name, dtype) is None


@pytest.mark.parametrize("precision, param_dtype, dtype", [
    ("32-true", None, "fp32"), ("bf16-mixed", None, "bf16"), ("bf16-true", None, "bf16"), ("16-mixed", None, "fp16"),
    ("32-true", "bf16", "bf16"), ("32-true", "fp16", "fp16"), ("bf16-mixed", "fp16", "bf16"),
])
def test_compute_dtype_from_precision_and_fsdp_param_dtype(precision, param_dtype, dtype):
    assert compute_dtype(precision, param_dtype) == dtype


class _MLPModule(L.LightningModule):
    """The MLP above, trained on batches of 5; from the third batch on its inputs are 4x larger,
    so a count taken on any batch but the first would differ."""

    def __init__(self):
        super().__init__()
        self.model = mlp()

    def training_step(self, batch, batch_idx):
        x = batch[0]
        return self.model(x.repeat(4, 1) if batch_idx >= 2 else x).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(60, 8, generator=torch.Generator().manual_seed(0)))
        return torch.utils.data.DataLoader(data, batch_size=5)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_throughput_counts_the_first_batch_once_and_reports_per_batch_rates(accumulate):
    """The count is the first batch's forward and backward (the optimizer's step adds none, with
    accumulation or not); 12 batches an epoch over 2 epochs: the timed ones skip each epoch's first
    2. On the CPU no peak is known: mfu is null and the progress bar shows no mfu."""
    throughput = Throughput(5, "32-true", skip=2)
    trainer = L.Trainer(max_epochs=2, callbacks=[throughput], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        accumulate_grad_batches=accumulate)
    trainer.fit(_MLPModule())
    summary = throughput.summary()
    assert summary["flops_per_step"] == mlp_step_flops(5)
    assert throughput.timed_images == 2 * (12 - 2) * 5
    assert summary["tflops_per_sec"] == pytest.approx(
        mlp_step_flops(5) * 20 / throughput.timed_seconds / 1e12)
    assert summary["tflops_per_sec"] > 0
    assert summary["mfu"] is None and summary["peak_tflops"] is None
    assert "no peak known for cpu" in summary["mfu_protocol"]
    assert "tflops_per_sec" in trainer.logged_metrics and "mfu" not in trainer.logged_metrics


def test_throughput_leaves_the_counted_batch_out_of_the_timing():
    throughput = Throughput(5, skip=0)
    trainer = L.Trainer(max_steps=4, callbacks=[throughput], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(_MLPModule())
    assert throughput.timed_images == 3 * 5


@pytest.mark.parametrize("name, precision, tf32, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", False, "bf16", 989.4),
    ("NVIDIA H100 80GB HBM3", "32-true", True, "tf32", 494.7),
    ("NVIDIA A100-SXM4-80GB", "32-true", False, "fp32", 19.5),
    ("Tesla V100-SXM2-16GB", "32-true", True, "fp32", 15.7),  # TF32 asked for, but Volta has none
])
def test_throughput_takes_the_peak_of_its_gpu_and_dtype(monkeypatch, name, precision, tf32, dtype, tflops):
    """On a GPU (its name and TF32 setting stood in for here): mfu = counted FLOPs x batches/s /
    the peak of that GPU for the dtype the matmuls run in."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    monkeypatch.setattr("sslrun.callbacks.throughput.tf32_matmuls", lambda: tf32)
    throughput = Throughput(256, precision)
    throughput._set_peak(torch.device("cuda", 0))
    throughput.flops_per_step, throughput.timed_images, throughput.timed_seconds = 10**12, 256 * 50, 10.0
    summary = throughput.summary()
    assert summary["tflops_per_sec"] == pytest.approx(5.0)  # 1 TFLOP per batch, 5 batches/s
    assert summary["peak_tflops"] == pytest.approx(tflops)
    assert summary["mfu"] == pytest.approx(5.0 / tflops)
    assert summary["mfu_protocol"].endswith(f"mfu over the dense {dtype} peak of {name}")


class _PackedBlockModule(L.LightningModule):
    """One packed ViT block on learned tokens; `auto` resolves on its first call."""

    def __init__(self, attention="auto"):
        super().__init__()
        self.vit = tiny_vit(attention)
        self.tokens = torch.nn.Parameter(torch.randn(1, B * N, D))

    def training_step(self, batch, batch_idx):
        return self.vit.blocks[0].packed(self.tokens, Packing((N,) * B), self.vit.block_diagonal_attention).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 1)), batch_size=1)


def test_throughput_resolves_auto_attention_before_counting():
    """`auto` tries each backend on a small input when it resolves (on CUDA flex, which fails under
    the counter): resolved inside the counted step, the tries would be counted, or give up flex.
    The count is the block's alone, as SDPA (auto's choice on CPU) runs it."""
    throughput = Throughput(1)
    trainer = L.Trainer(max_steps=2, callbacks=[throughput], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(_PackedBlockModule())
    assert throughput.flops_per_step == linear_flops(B * N) + B * (2 + 5) * 2 * N * N * D


def test_throughput_counts_flex_as_sdpa_and_gives_flex_back():
    """One step (flex has no backward on CPU): counted as SDPA runs it, flex again afterwards."""
    throughput, module = Throughput(1), _PackedBlockModule("flex")
    trainer = L.Trainer(max_steps=1, callbacks=[throughput], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    assert throughput.flops_per_step == linear_flops(B * N) + B * (2 + 5) * 2 * N * N * D
    assert module.vit.block_diagonal_attention.name == "flex"
