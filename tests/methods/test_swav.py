"""SwAV's step on real modules: codes by Sinkhorn-Knopp over the scores (and the queue once it
holds real rows), the swapped prediction, renormalised and initially frozen prototypes. (2 processes
== 1 and the FSDP step are the registry's tests.)"""

import torch
import torch.nn.functional as F

from sslrun.losses import sinkhorn_knopp, swav_loss
from sslrun.models.multicrop import crop_features
from tests.method_cases import BATCH, at_step, tiny_batch, tiny_method


def scores_by_hand(method, batch):
    """(normalised projections, scores per crop) with the method's modules, prototypes as they are."""
    features = crop_features(method.backbone, batch["views"])  # one batch per crop size, as the step
    z = F.normalize(method.projector(torch.cat(features)), dim=1)
    return z, (z @ method.prototypes.weight.detach().T).chunk(len(batch["views"]))


def test_a_step_is_the_papers_swapped_prediction():
    method, cfg = tiny_method("swav", "method.queue_size=0")
    batch = tiny_batch(cfg)
    method.prototypes.weight.data.mul_(3.0)  # unnormalised: the step renormalises the rows first
    out = method.training_loss(batch)
    weight = method.prototypes.weight.detach()
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(weight.shape[0]))

    _, scores = scores_by_hand(method, batch)
    codes = [sinkhorn_knopp(scores[t].detach(), 0.05, 3) for t in range(2)]
    torch.testing.assert_close(out.loss, swav_loss(scores, codes, 0.1))
    for code in codes:  # each sample's code is a distribution over the prototypes
        torch.testing.assert_close(code.sum(dim=1), torch.ones(BATCH))


def test_the_queue_fills_first_then_joins_the_sinkhorn_columns():
    """Queue of 32 rows, 8 per step from step 0: steps 0-3 fill it (not used), from step 4 its
    scores join each global crop's Sinkhorn columns; the newest rows are the step's projections."""
    method, cfg = tiny_method("swav")
    assert method.queue_start_step == 0 and len(method.queues) == 2 and len(method.queues[0]) == 32
    used = []
    for step in range(6):
        with at_step(method, step):
            used.append(method.queue_in_use(BATCH))
    assert used == [False] * 4 + [True] * 2

    batch = tiny_batch(cfg)
    before = [q.rows.clone() for q in method.queues]
    with at_step(method, 4):
        out = method.training_loss(batch)
    z, scores = scores_by_hand(method, batch)
    weight = method.prototypes.weight.detach()
    codes = [sinkhorn_knopp(torch.cat([before[t] @ weight.T, scores[t].detach()]), 0.05, 3)[-BATCH:]
             for t in range(2)]
    torch.testing.assert_close(out.loss, swav_loss(scores, codes, 0.1))
    for t, queue in enumerate(method.queues):
        torch.testing.assert_close(queue.rows[:BATCH], z[t * BATCH:(t + 1) * BATCH].detach(), atol=1e-5, rtol=1e-4)
        assert torch.equal(queue.rows[BATCH:], before[t][BATCH:])


def test_prototypes_are_frozen_for_their_first_steps_only():
    method, _ = tiny_method("swav", "method.freeze_prototypes_epochs=0.0004")  # 60000 / 8 steps: 3
    assert method.freeze_prototypes_steps == 3
    for step, frozen in ((2, True), (3, False)):
        method.prototypes.weight.grad = torch.ones_like(method.prototypes.weight)
        with at_step(method, step):
            method.on_before_optimizer_step(None)
        assert (method.prototypes.weight.grad is None) == frozen
