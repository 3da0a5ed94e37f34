"""Projection and prediction heads, built from a spec: MLP heads and DINO's prototype head."""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPHead(nn.Sequential):
    """`num_layers` Linear layers: Linear -> (BN) -> ReLU for each hidden layer, then Linear -> (BN).

    SimCLR v1's projector is 2 layers, v2's 3 (Chen et al. 2020b, sec. 2), both with hidden width
    equal to the backbone's feature width (hidden_dim=None) and a 128-d output. A Linear followed
    by BN has no bias: the BN's mean subtraction would cancel it. The output BN has no learned
    scale or shift, as in the SimSiam and MoCo v3 reference code.
    """

    def __init__(self, in_dim: int, out_dim: int, num_layers: int, hidden_dim: Optional[int] = None,
                 batch_norm: bool = True, last_batch_norm: bool = False):
        if num_layers < 1:
            raise ValueError(f"an MLP head needs at least one layer, got num_layers={num_layers}")
        hidden_dim = hidden_dim or in_dim
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        layers = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(d_in, d_out, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(dims[-1], out_dim, bias=not last_batch_norm))
        if last_batch_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)
        self.out_dim = out_dim

    @classmethod
    def from_spec(cls, in_dim: int, spec) -> "MLPHead":
        return cls(in_dim, spec.out_dim, spec.num_layers, spec.hidden_dim, spec.batch_norm, spec.last_batch_norm)


class NormalizedLinear(nn.Module):
    """A bias-free Linear with weight-normalised rows, w_k = g_k v_k / ||v_k|| (Salimans & Kingma
    2016): DINO's prototype layer. With `learn_scale=False` g is fixed at 1 (DINO's
    `norm_last_layer=True`), so the logits are cosines scaled only by the input's norm."""

    def __init__(self, in_dim: int, out_dim: int, learn_scale: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)
        self.scale = nn.Parameter(torch.ones(out_dim)) if learn_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.normalize(self.weight, dim=1)
        if self.scale is not None:
            weight = weight * self.scale[:, None]
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, sec. 3.1 and appendix): an MLP (Linear-GELU,
    `hidden_dim` wide, `num_layers` Linear layers in all) down to a `bottleneck_dim` feature,
    l2-normalised, then a weight-normalised Linear to `out_dim` prototypes (65536 in the paper).
    `batch_norm` puts BN after each hidden Linear (the reference code's `use_bn_in_head`): it
    keeps short runs from collapsing (README, DINO on CPU)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, num_layers: int,
                 norm_last_layer: bool, batch_norm: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        layers = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), *([nn.BatchNorm1d(d_out)] if batch_norm else []), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(dims[-1], bottleneck_dim))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim, learn_scale=not norm_last_layer)
        self.out_dim = out_dim

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))

    @classmethod
    def from_spec(cls, in_dim: int, spec) -> "DINOHead":
        return cls(in_dim, spec.out_dim, spec.hidden_dim, spec.bottleneck_dim, spec.num_layers, spec.norm_last_layer,
                   spec.batch_norm)


class LogitScale(nn.Module):
    """The learned inverse temperature of an image-text loss, kept as its log t (CLIP: scale e^t,
    t starting at ln(1/0.07), at most ln 100; SigLIP: t from ln 10), with SigLIP's learned logit
    bias b when `bias` is given. Each is a 1-element parameter (FSDP2 shards no 0-d tensor), so
    it gets no weight decay (optim.parameter_groups: <= 1-d).

    Called (`t, b = logit_scale()`, 0-d copies) rather than read, so that FSDP gathers it like any
    module (a view of the gathered parameter would outlive the reshard after forward)."""

    def __init__(self, initial_scale: float, max_scale: float, bias: Optional[float] = None):
        super().__init__()
        if not 1.0 <= initial_scale <= max_scale:
            raise ValueError(f"logit scale {initial_scale}: must lie in [1, {max_scale}]")
        self.log_scale = nn.Parameter(torch.tensor([math.log(initial_scale)]))
        self.bias = nn.Parameter(torch.tensor([float(bias)])) if bias is not None else None
        self.max_log_scale = math.log(max_scale)

    def forward(self):
        return self.log_scale.clone().squeeze(0), self.bias.clone().squeeze(0) if self.bias is not None else None

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep t in [0, ln max_scale] (CLIP, sec. 2.5); run after every optimizer step."""
        self.log_scale.clamp_(0.0, self.max_log_scale)
