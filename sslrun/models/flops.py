"""Model FLOPs of a training step, and the peak FLOP/s of common GPUs, for MFU.

    mfu = FLOPs of one batch x batches per second / dense peak FLOP/s of the device in the dtype
          the matmuls run in

The FLOPs are torch's counter's (`torch.utils.flop_counter`): 2 per multiply-add of every matmul,
convolution and attention, forward and backward (backward as it runs: about twice the forward;
fused attention's backward also recomputes the scores). Elementwise work (norms, activations, the
optimizer step) is not counted: the usual "model FLOPs". Activation checkpointing's recomputed
forward runs under the counter, so it is counted too.
"""

import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from sslrun.models.attention import countable_attention


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# CPU SDPA's kernels, which torch's counter has no formula for (it counts them as 0): torch's own
# formulas for its other SDPA kernels, which compute the same.
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}


class _TotalOnly:
    """Stands in for FlopCounterMode's module tracker, which attributes FLOPs to modules: sslrun
    reads only the total, and torch's tracker hooks autograd on every module input, which fails on
    a view taken under no_grad of a tensor that requires grad (it has no grad_fn), as SwAV's codes
    are computed."""

    parents = {"Global"}  # the counter adds every op's FLOPs to each parent; "Global" is the total

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


@contextmanager
def flop_counter(model: Optional[torch.nn.Module] = None,
                 device: Optional[torch.device] = None) -> Iterator[FlopCounterMode]:
    """torch's FLOP counter over what runs inside (`.get_total_flops()`), with CPU attention counted.

    Compiled code runs eagerly inside (a compiled kernel's ops are invisible to the counter).
    With `model`, its packed ViTs are resolved for `device` first and counted as SDPA
    (models.attention.countable_attention): flex and xformers are not countable."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    counter.mod_tracker = _TotalOnly()
    with ExitStack() as stack:
        if model is not None:
            stack.enter_context(countable_attention(model, device or torch.device("cpu")))
        stack.enter_context(torch.compiler.set_stance("force_eager"))
        stack.enter_context(counter)
        yield counter


def count_flops(fn: Callable[[], object], model: Optional[torch.nn.Module] = None,
                device: Optional[torch.device] = None) -> int:
    """The FLOPs of `fn()` (run a forward and its backward inside to count both); `model` and
    `device` as for flop_counter."""
    with flop_counter(model, device) as counter:
        fn()
    return counter.get_total_flops()


@dataclass(frozen=True)
class Peaks:
    """Dense (no 2:4 sparsity) peak TFLOP/s by matmul dtype; None: no tensor cores for it."""

    bf16: Optional[float]
    fp16: float
    tf32: Optional[float]
    fp32: float  # without tensor cores


_H100_SXM = Peaks(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9)

# (pattern searched in torch.cuda.get_device_name(), case-insensitive; peaks): the first match wins.
# Sources, the vendor's own: NVIDIA A100 datasheet; NVIDIA H100 Tensor Core GPU architecture
# whitepaper (SXM5 and PCIe columns, dense); NVIDIA H200 datasheet (the H100 SXM's Tensor Core
# peaks); NVIDIA L4, L40, L40S and A10 datasheets; NVIDIA V100 datasheet (SXM2, PCIe) and V100S
# datasheet; NVIDIA Ada GPU architecture whitepaper, appendix A (RTX 4090, fp16/bf16 with fp32
# accumulate, as torch's matmuls accumulate). The sparse figures datasheets quote are twice these.
PEAKS = (
    (r"\bH[12]00 NVL\b", None),  # NVL boards run at their own clocks: not confirmed, so unknown
    (r"\bH100 PCIe\b", Peaks(bf16=756.0, fp16=756.0, tf32=378.0, fp32=51.2)),
    (r"\bH100\b", _H100_SXM),  # "NVIDIA H100 80GB HBM3": the SXM5 board
    (r"\bH200\b", _H100_SXM),
    (r"\bA100\b", Peaks(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5)),  # SXM4 and PCIe alike
    (r"\bL40S\b", Peaks(bf16=362.05, fp16=362.05, tf32=183.0, fp32=91.6)),
    (r"\bL40\b", Peaks(bf16=181.05, fp16=181.05, tf32=90.5, fp32=90.5)),
    (r"\bL4\b", Peaks(bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3)),
    (r"\bA10\b", Peaks(bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2)),  # not the A10G, whose peaks differ
    # Volta: fp16 tensor cores only; bf16 is emulated and fp32 has no TF32 mode.
    (r"\bV100S-PCIE\b", Peaks(bf16=None, fp16=130.0, tf32=None, fp32=16.4)),
    (r"\bV100-SXM2\b", Peaks(bf16=None, fp16=125.0, tf32=None, fp32=15.7)),
    (r"\bV100-PCIE\b", Peaks(bf16=None, fp16=112.0, tf32=None, fp32=14.0)),
    (r"\bRTX 4090$", Peaks(bf16=165.2, fp16=165.2, tf32=82.6, fp32=82.6)),
)


def compute_dtype(precision: str, param_dtype: Optional[str] = None) -> str:
    """bf16, fp16 or fp32: what matmuls run in under Lightning's `precision` (32-true,
    bf16-mixed, 16-mixed, bf16-true) and FSDP's `param_dtype` (bf16 | fp16: gathered and computed
    in it; autocast's dtype wins where both are set)."""
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    return param_dtype or "fp32"


def _peaks(device_name: Optional[str]) -> Optional[Peaks]:
    return next((p for pattern, p in PEAKS if re.search(pattern, device_name or "", re.IGNORECASE)), None)


def matmul_dtype(device_name: Optional[str], dtype: str, tf32: bool) -> str:
    """`dtype` (bf16, fp16, fp32), or tf32 where fp32 matmuls run on the GPU `device_name`'s TF32
    tensor cores: `tf32` asked for (tf32_matmuls()) and the GPU has them (not a V100)."""
    peaks = _peaks(device_name)
    return "tf32" if dtype == "fp32" and tf32 and peaks is not None and peaks.tf32 is not None else dtype


def peak_flops(device_name: Optional[str], dtype: str) -> Optional[float]:
    """Dense peak FLOP/s of the GPU `device_name` for matmuls in `dtype` (bf16, fp16, tf32, fp32);
    None for a device not in PEAKS (the CPU: device_name None) or a dtype it has no tensor cores
    for (bf16 on a V100)."""
    peaks = _peaks(device_name)
    tera = None if peaks is None else getattr(peaks, dtype)
    return None if tera is None else tera * 1e12


def tf32_matmuls() -> bool:
    """Whether fp32 CUDA matmuls run on TF32 tensor cores (torch.set_float32_matmul_precision("high"),
    or torch.backends.cuda.matmul.fp32_precision = "tf32")."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"
