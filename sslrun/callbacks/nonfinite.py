"""Non-finite losses and gradients: stop at that step with one line, or skip the update.

A loss that became nan or inf, or a gradient norm that did, means the run diverged: going on
writes nan into the weights, every later checkpoint and the exported backbone. The guard looks
at every micro-batch's loss and, before each optimizer step, at the gradients every process
holds (DDP's are already averaged; FSDP's are each process's shard): one all-reduce makes all
processes agree, so they stop or skip together. Under 16-mixed precision the gradient scaler
owns inf gradients (it skips those steps itself): only the loss is checked there.
"""

import logging
import math
from typing import Optional

import lightning as L
import torch

from sslrun.failures import Diverged

log = logging.getLogger("sslrun")


class NonFiniteGuard(L.Callback):
    """`policy=stop` raises Diverged at the first non-finite step; `policy=skip` drops that
    step's update (no parameter, optimizer-state or momentum-teacher change; the step still counts,
    so the schedules go on) at most `max_skipped` times, then stops.

    `unstable_since` is the first step of the current run of non-finite steps (None while steps
    are finite): checkpoints from then on are not written (`pause_checkpoints`), since the weights
    that gave that step may already be the problem, and the last good checkpoint is the newest
    from before it."""

    def __init__(self, policy: str = "stop", max_skipped: int = 0, check_gradients: bool = True):
        self.policy, self.max_skipped, self.check_gradients = policy, max_skipped, check_gradients
        self.skipped_steps = 0
        self.unstable_since: Optional[int] = None
        self._loss: Optional[torch.Tensor] = None  # the worst loss of the step's micro-batches

    def state_dict(self) -> dict:  # the budget holds across a resume
        return {"skipped_steps": self.skipped_steps, "unstable_since": self.unstable_since}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps, self.unstable_since = int(state_dict["skipped_steps"]), state_dict["unstable_since"]

    def pause_checkpoints(self) -> bool:
        return self.unstable_since is not None

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        loss = loss.detach().float()  # chosen on the device: reading it here would wait for the forward
        self._loss = loss if self._loss is None else torch.where(torch.isfinite(loss), self._loss, loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        loss = self._loss if self._loss is not None else torch.zeros((), device=trainer.strategy.root_device)
        self._loss = None
        gradients = _gradients(pl_module) if self.check_gradients else []
        local = torch.stack([loss, _norm_sum(gradients, loss.device)])
        # Summed over processes: non-finite wherever any process's value is.
        loss_sum, norm_sum = (trainer.strategy.reduce(local, reduce_op="sum") if trainer.world_size > 1
                                  else local).tolist()
        if math.isfinite(loss_sum) and math.isfinite(norm_sum):
            self.unstable_since = None
            return
        what = (f"train/loss became {_word(loss_sum)}" if not math.isfinite(loss_sum)
                else f"the gradient norm became {_word(norm_sum)}")
        step, lr = trainer.global_step, optimizer.param_groups[0]["lr"]
        self.unstable_since = step if self.unstable_since is None else self.unstable_since
        if self.policy == "stop" or self.skipped_steps >= self.max_skipped:
            also = f" after {self.skipped_steps} skipped steps (trainer.max_skipped_steps={self.max_skipped})" \
                if self.policy == "skip" else ""
            raise Diverged(f"{what} at step {step} (lr {lr:.3g}){also}")
        self.skipped_steps += 1
        optimizer.zero_grad(set_to_none=True)  # the optimizer leaves parameters without gradients alone
        pl_module.skip_momentum_update = True
        if trainer.is_global_zero:
            log.warning("skipping the update of step %d: %s (lr %.3g; %d of at most %d skipped)",
                        step, what, lr, self.skipped_steps, self.max_skipped)

def _gradients(module: torch.nn.Module) -> list:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this process's shard

def _norm_sum(gradients: list, device: torch.device) -> torch.Tensor:
    if not gradients:
        return torch.zeros((), device=device)
    return torch.stack(torch._foreach_norm(gradients)).float().square().sum().to(device)

def _word(value: float) -> str:
    return "nan" if math.isnan(value) else "inf"

