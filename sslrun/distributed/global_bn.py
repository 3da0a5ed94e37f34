"""Global batch normalisation: BN statistics over the batches of all processes.

torch's SyncBatchNorm runs only on accelerators; this one runs wherever torch.distributed does
(gloo on CPU included), so global-BN runs are tested here exactly as they train on GPUs. Each
process sends (count, mean, M2) per channel in one differentiable all-gather and combines them
with Chan et al.'s parallel variance formula:

    n = sum_r n_r,   mean = sum_r n_r mean_r / n,   var = sum_r [M2_r + n_r (mean_r - mean)^2] / n

Gradients flow through the gathered statistics, so every process's loss reaches every input.
"""

import torch
import torch.nn as nn

from sslrun.distributed.gather import all_gather_with_grad, is_distributed


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for BatchNorm1d/2d/3d; identical to them outside distributed training."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        count = x.numel() // x.shape[1]
        local_mean = x.mean(dim=dims)
        shape = [1, -1] + [1] * (x.dim() - 2)
        local_m2 = ((x - local_mean.view(shape)) ** 2).sum(dim=dims)
        local_count = torch.full_like(local_mean, float(count))
        stats = all_gather_with_grad(torch.stack([local_count, local_mean, local_m2])[None])
        counts, means, m2s = stats.unbind(1)  # each [W, C]
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        var = (m2s + counts * (means - mean) ** 2).sum(0) / total

        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            with torch.no_grad():
                unbiased = var * total / (total - 1).clamp(min=1)
                # fp32 statistics also when the input is bf16 (FSDP's param_dtype, autocast)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)

        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_to_global_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d in `module` by GlobalBatchNorm, keeping its state."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        converted.load_state_dict(module.state_dict())
        reference = module.running_mean if module.running_mean is not None else module.weight
        if reference is not None:  # keep a double / half / GPU model's dtype and device
            converted.to(device=reference.device, dtype=reference.dtype)
        for new, old in zip(converted.parameters(), module.parameters()):
            new.requires_grad_(old.requires_grad)  # a frozen BN (a momentum teacher's) stays frozen
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_to_global_bn(child))
    return module
