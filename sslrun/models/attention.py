"""Block-diagonal attention over a packed sequence, on the best backend the device has.

Multi-crop packs every crop of every image into one token sequence; a token may attend only to
the tokens of its own crop (its *segment*). Each backend computes exactly that:

    out_i = sum_{j in seg(i)} softmax_j(q_i . k_j / sqrt(d)) v_j

- `xformers`: `memory_efficient_attention` with a `BlockDiagonalMask` (CUDA kernels only).
- `flex`: torch `flex_attention` with a block mask built from segment ids (compiled).
- `sdpa`: torch `scaled_dot_product_attention` run once per run of equal-length segments (or,
  where equal lengths lie apart, once per length, gathered: `run_grouped` does that once for
  every layer of a pass), as a batch with no mask: the same result as the block-diagonal mask,
  without materialising it.
- `math`: the dense block-diagonal mask and an explicit softmax; the reference the others are
  tested against (its mask is O(tokens^2): small inputs only).

`auto` takes the first that runs here: xformers, flex, sdpa on CUDA; sdpa on CPU (flex compiles
there too, but its CPU kernel is slower than SDPA's and compiling costs a minute).
"""

import importlib.util
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from sslrun.config.schema import ATTENTION_BACKENDS as BACKENDS
from sslrun.config import ConfigError
from sslrun.config.errors import require_choice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Packing:
    """Segment lengths of a packed sequence, in order (one segment per crop of one image).

    `varying`: the lengths change from call to call (a random subset of the crops, as efficient
    stochastic depth makes), so a shape-specialised compiled kernel would recompile at every call."""

    lengths: Tuple[int, ...]
    varying: bool = field(default=False, compare=False)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @cached_property
    def runs(self) -> List[Tuple[int, int, int]]:
        """(first token, segments, length) of each run of consecutive equal-length segments."""
        runs, start = [], 0
        for length in self.lengths:
            if runs and runs[-1][2] == length and runs[-1][0] + runs[-1][1] * length == start:
                first, count, _ = runs[-1]
                runs[-1] = (first, count + 1, length)
            else:
                runs.append((start, 1, length))
            start += length
        return runs

    @cached_property
    def grouping(self) -> Tuple[Optional[torch.Tensor], "Packing"]:
        """The token order that puts equal-length segments side by side (first appearance of each
        length first), and the packing in that order; (None, self) when they already are. SDPA
        takes each length as one batch, so a length costs one call however its segments lie."""
        groups = {}
        for segment, length in enumerate(self.lengths):
            groups.setdefault(length, []).append(segment)
        if len(groups) == len(self.runs):
            return None, self
        order = torch.cat([self.token_index(torch.tensor(segments)) for segments in groups.values()])
        return order, Packing(tuple(length for length, segments in groups.items() for _ in segments), self.varying)

    def segment_ids(self, device) -> torch.Tensor:
        lengths = torch.tensor(self.lengths, device=device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=device), lengths)

    def token_index(self, segments: torch.Tensor) -> torch.Tensor:
        """Positions in the sequence of the tokens of `segments` (sorted segment numbers)."""
        lengths = torch.tensor(self.lengths, device=segments.device)
        starts = torch.cumsum(lengths, 0) - lengths
        chosen = lengths[segments]
        offsets = torch.arange(int(chosen.sum()), device=segments.device)
        offsets -= torch.repeat_interleave(torch.cumsum(chosen, 0) - chosen, chosen)
        return torch.repeat_interleave(starts[segments], chosen) + offsets

    def subset(self, segments: torch.Tensor) -> "Packing":
        return Packing(tuple(self.lengths[i] for i in segments.tolist()), varying=True)


def math_attention(q, k, v, packing: Packing) -> torch.Tensor:
    """q, k, v [1, heads, tokens, dim] -> [1, heads, tokens, dim]."""
    ids = packing.segment_ids(q.device)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    scores = scores.masked_fill(ids[:, None] != ids[None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


def sdpa_attention(q, k, v, packing: Packing) -> torch.Tensor:
    order, grouped = packing.grouping
    if order is not None:  # equal lengths apart, from a caller that did not group them once (`run_grouped`)
        order = order.to(q.device)
        out = sdpa_attention(*(t.index_select(2, order) for t in (q, k, v)), grouped)
        return torch.empty_like(out).index_copy(2, order, out)
    batches = [(count, length) for _, count, length in packing.runs]
    sizes = [count * length for count, length in batches]

    def segments(t):  # [1, H, tokens, D] -> per batch [count, H, length, D]
        t = t.squeeze(0)  # t[0]'s backward fills and copies
        parts = t.split(sizes, dim=1) if len(sizes) > 1 else (t,)  # a split's backward is a cat, even of one
        return [part.unflatten(1, (count, length)).transpose(0, 1) for part, (count, length) in zip(parts, batches)]

    # Each output token by token, [count * length, H, D]: given inputs laid out so (as the qkv
    # projection's are), SDPA's fused kernels lay out their output so too, which makes this and the
    # projection's [tokens, H * D] views, not copies.
    outputs = [F.scaled_dot_product_attention(*qkv).transpose(1, 2).flatten(0, 1)
               for qkv in zip(segments(q), segments(k), segments(v))]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # a cat of one is a copy
    return out.permute(1, 0, 2).unsqueeze(0)


def run_grouped(x: torch.Tensor, packing: Packing, layers: Callable[[torch.Tensor, Packing], torch.Tensor]):
    """`layers(x, packing)` on x [1, tokens, D], with the equal-length segments put side by side
    once for all the layers (`Packing.grouping`) and the tokens put back in their order after:
    token-wise work and block-diagonal attention do not depend on the segments' order, and each
    layer's SDPA then slices its batches instead of gathering and scattering q, k, v and its output
    (I-JEPA's segments, every image its own lengths). Efficient stochastic depth draws its subset
    of segments in the grouped order: the same distribution, other segments for the same seed."""
    order, grouped = packing.grouping
    if order is None:
        return layers(x, packing)
    order = order.to(x.device)
    out = layers(x.index_select(1, order), grouped)
    return torch.empty_like(out).index_copy(1, order, out)


FLEX_BLOCK = 128  # flex_attention's default sparse block size (tokens per query / key block)
_compiled_flex: dict = {}  # torch.compile's `dynamic` -> the compiled flex_attention
_block_masks: dict = {}


def flex_block_mask(packing: Packing, device, block: int = FLEX_BLOCK):
    """The BlockMask of the block-diagonal (same-segment) mask, built from the segment bounds.

    It is what `create_block_mask(same_segment, None, None, total, total)` returns, tensor for
    tensor, but computed per pair of 128-token blocks, O((tokens / 128)^2), instead of from the
    dense tokens x tokens mask that `create_block_mask` evaluates (eagerly: int64 intermediates
    of that size, about 21 GB on the GPU for DINO's 12 crops x 64 images = 48,896 tokens).
    Segments are contiguous and in order, so the segments a block touches are the range from its
    first token's to its last token's; two blocks share a segment when those ranges overlap
    (a partial block: `same_segment` is evaluated in it), and every pair of tokens is allowed when
    both are complete blocks inside one and the same segment (a full block: no mask evaluated)."""
    from torch.nn.attention.flex_attention import BlockMask

    ids = packing.segment_ids(device)

    def same_segment(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    total = packing.total
    starts = torch.arange(0, total, block, device=device)
    ends = torch.clamp(starts + block, max=total) - 1
    first, last = ids[starts], ids[ends]
    touching = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    inside_one = (first == last) & (ends - starts + 1 == block)  # a complete block in one segment
    full = inside_one[:, None] & inside_one[None, :] & (first[:, None] == first[None, :])
    partial = touching & ~full

    def ordered(dense):  # as torch orders them: the count per query block, used key blocks first
        dense = dense.to(torch.int32)[None, None]
        return dense.sum(dim=-1).to(torch.int32), torch.argsort(dense, dim=-1, descending=True,
                                                                 stable=True).to(torch.int32)

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=(block, block),
                                    mask_mod=same_segment, seq_lengths=(total, total))


def _flex_kernel(dynamic):
    from torch.nn.attention.flex_attention import flex_attention as flex

    if dynamic not in _compiled_flex:
        _compiled_flex[dynamic] = torch.compile(flex, dynamic=dynamic)
    return _compiled_flex[dynamic]


def flex_attention(q, k, v, packing: Packing) -> torch.Tensor:
    """Compiled for fixed shapes (the packings of a run repeat every step). A varying packing
    (efficient stochastic depth: a random subset of crops, a new length nearly every call) goes to
    a kernel with automatic dynamic shapes on CUDA: with fixed shapes each new length would
    recompile, and after torch._dynamo's recompile limit (8) flex would run unfused, materialising
    the tokens x tokens scores. (On CPU, where flex only evaluates, inductor fails to build the
    dynamic-shape kernel, so it keeps fixed shapes there.)"""
    if q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled():
        raise ConfigError("backbone.attention=flex: torch's flex_attention has no backward on CPU, so it cannot "
                          "train here (it can evaluate); use backbone.attention=sdpa or auto on CPU")
    varying = packing.varying and q.device.type == "cuda"
    key = (packing.lengths, q.device)
    block_mask = _block_masks.get(key)
    if block_mask is None:
        block_mask = flex_block_mask(packing, q.device)
        if not varying:  # a random subset rarely comes back: caching it would only evict the others
            if len(_block_masks) > 64:
                _block_masks.clear()
            _block_masks[key] = block_mask
    return _flex_kernel(None if varying else False)(q, k, v, block_mask=block_mask)


def xformers_attention(q, k, v, packing: Packing) -> torch.Tensor:
    from xformers.ops import fmha

    bias = fmha.BlockDiagonalMask.from_seqlens(list(packing.lengths))
    out = fmha.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


IMPLEMENTATIONS = {"xformers": xformers_attention, "flex": flex_attention, "sdpa": sdpa_attention,
                   "math": math_attention}


def unavailable_reason(name: str, device: torch.device):
    """Why backend `name` cannot run on `device` (None when it can)."""
    if name == "xformers":
        if importlib.util.find_spec("xformers") is None:
            return "xformers is not installed (pip install 'sslrun[xformers]')"
        if device.type != "cuda":
            return f"xformers' memory-efficient kernels need a CUDA device; this run is on {device.type}"
    if name == "flex":
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return "this torch has no flex_attention"
        if device.type not in ("cuda", "cpu"):
            return f"flex_attention does not run on {device.type}"
    return None


def _works(name: str, device: torch.device) -> bool:
    """A tiny trial call: an installed xformers build may still lack kernels for this GPU."""
    try:
        q = torch.randn(1, 1, 8, 16, device=device)
        IMPLEMENTATIONS[name](q, q, q, Packing((4, 4)))
        return True
    except Exception as error:  # noqa: BLE001 - any failure means: not this backend
        log.warning("attention backend %s does not run on %s: %s", name, device, error)
        return False


class BlockDiagonalAttention:
    """The chosen backend, resolved on first use (when the device is known) and then fixed."""

    def __init__(self, name: str):
        require_choice("backbone.attention", name, BACKENDS)
        self.requested = name
        self.name = None  # set by resolve()

    def resolve(self, device: torch.device) -> str:
        if self.name is not None:
            return self.name
        if self.requested == "auto":
            preference = ("xformers", "flex", "sdpa") if device.type == "cuda" else ("sdpa",)
            self.name = next(n for n in preference + ("math",)
                             if unavailable_reason(n, device) is None and _works(n, device))
            log.info("attention backend: %s (auto, on %s)", self.name, device.type)
        else:
            reason = unavailable_reason(self.requested, device)
            if reason is not None:
                raise ConfigError(f"backbone.attention={self.requested}: {reason}; use backbone.attention=auto")
            self.name = self.requested
        return self.name

    def __call__(self, q, k, v, packing: Packing) -> torch.Tensor:
        return IMPLEMENTATIONS[self.resolve(q.device)](q, k, v, packing)


@contextmanager
def countable_attention(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Inside: every packed ViT in `model` resolved for `device`, flex and xformers run as sdpa.

    For a FLOP counter started inside (models.flops): resolving first keeps `auto`'s trial calls
    out of the count (and flex's out of the counter, under which it fails: `auto` would then give
    up flex for the run); sdpa computes the same attention and is counted per segment, where flex
    fails under the counter (or would run unfused: tokens x tokens scores) and xformers' kernels
    have no FLOP formula. Each backend is restored on exit."""
    swapped = []
    for module in model.modules():
        attention = getattr(module, "block_diagonal_attention", None)
        if attention is not None and attention.resolve(device) in ("flex", "xformers"):
            swapped.append((attention, attention.name))
            attention.name = "sdpa"
    try:
        yield
    finally:
        for attention, name in swapped:
            attention.name = name
