"""Projection and prediction heads, built from an MLP spec."""

from typing import Optional

import torch.nn as nn


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
