"""LeJEPA's step on real modules: every crop's projection against the global crops' centre, and
SIGReg along directions drawn from the step. (2 processes == 1, with SIGReg's characteristic
functions summed over processes, and the FSDP step are the registry's tests.)"""

import torch

from sslrun.losses import lejepa_loss, random_directions
from sslrun.models.multicrop import forward_by_resolution
from tests.method_cases import at_step, tiny_batch, tiny_method


def test_a_step_is_the_papers_objective_with_the_steps_directions():
    method, cfg = tiny_method("lejepa")
    batch = tiny_batch(cfg)
    assert len(batch["views"]) == 4 and cfg.method.global_crops == 2  # multicrop_small: 2 x 28 px + 2 x 14 px
    losses = {}
    for step in (0, 5):
        with at_step(method, step):
            losses[step] = method.training_loss(batch)
    features = forward_by_resolution(method.backbone, batch["views"])  # one batch per crop size
    z = method.projector(torch.cat(features)).unflatten(0, (4, -1))  # one projector batch: BN over every crop
    for step, out in losses.items():
        directions = random_directions(z.shape[-1], cfg.method.slices, step, "cpu")
        loss, prediction, sigreg = lejepa_loss(z, 2, directions, 0.05)
        torch.testing.assert_close(out.loss, loss)
        torch.testing.assert_close(out.metrics["sigreg"], sigreg.detach())
        centre = (z[0] + z[1]) / 2  # the prediction term by hand: each crop against the global centre
        torch.testing.assert_close(out.metrics["prediction_loss"], ((z - centre) ** 2).mean().detach())
    assert losses[0].metrics["sigreg"] != losses[5].metrics["sigreg"]  # new directions each step
    first, again = random_directions(16, 8, 5, "cpu"), random_directions(16, 8, 5, "cpu")
    assert torch.equal(first, again) and torch.allclose(first.norm(dim=0), torch.ones(8))
