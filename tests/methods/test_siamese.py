"""The siamese methods on small real modules: queues, stop-gradients and momentum teachers.
(Their 2 processes == 1 process test is the registry's: tests/methods/test_registry.py.)"""

import math

import lightning as L
import pytest
import torch

from sslrun.config import compose
from sslrun.losses import negative_cosine_similarity
from sslrun.models.queue import Queue
from sslrun.optim import WarmupCosine
from sslrun.train import build_method

BATCH = 8


def tiny_cfg(name: str, *extra: str):
    """The method's own config at toy sizes, validated like a real run."""
    overrides = [f"method={name}", "recipe=none", "data.image_size=16", "method.projector.hidden_dim=32",
                 "method.projector.out_dim=16", *extra]
    if not any(o.startswith("backbone") for o in extra):
        overrides.append("backbone.timm_kwargs={channels:[8,16,16,32]}")
    if name in ("mocov3", "byol", "simsiam", "nnclr"):
        overrides += ["method.predictor_mlp.hidden_dim=24", "method.predictor_mlp.out_dim=16"]
    if name in ("mocov2", "nnclr"):
        overrides += ["method.queue_size=40"]
    return compose(overrides)


def tiny_method(name: str, *extra: str):
    torch.manual_seed(0)
    return build_method(tiny_cfg(name, *extra), WarmupCosine(peak=0.1, total_steps=10), num_classes=None,
                        steps_per_epoch=5)


def views(n=BATCH):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, 1, 16, 16, generator=g) for _ in range(2)]


def test_queue_holds_the_newest_keys_and_wraps_around():
    queue = Queue(40, 16)
    k = torch.nn.functional.normalize(torch.randn(30, 16), dim=1)
    queue.push(k)
    assert torch.allclose(queue.rows[:30], k) and int(queue.position) == 30
    more = torch.nn.functional.normalize(torch.randn(20, 16), dim=1)
    queue.push(more)  # 40 slots: 10 at the end, 10 wrapping to the start
    assert torch.allclose(queue.rows[30:], more[:10]) and torch.allclose(queue.rows[:10], more[10:])
    assert int(queue.position) == 10
    queue.push(torch.randn(50, 16))  # more than it holds: the newest 40, from the write position on
    assert int(queue.position) == 10


def test_mocov2_queue_takes_each_steps_keys_and_travels_in_checkpoints():
    method = tiny_method("mocov2")
    before = method.queue.rows.clone()
    method.training_loss({"views": views()})
    assert int(method.queue.position) == BATCH and not torch.equal(method.queue.rows[:BATCH], before[:BATCH])
    assert torch.equal(method.queue.rows[BATCH:], before[BATCH:])
    state = method.state_dict()
    assert {"queue.rows", "queue.position"} <= set(state)  # saved in checkpoints
    fresh = tiny_method("mocov2", "seed=1")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.queue.rows, method.queue.rows) and int(fresh.queue.position) == BATCH
    # A checkpoint from before the queue was a module (buffers `queue`, `queue_position`) resumes.
    old = {"queue" if k == "queue.rows" else "queue_position" if k == "queue.position" else k: v
           for k, v in state.items()}
    checkpoint = {"state_dict": old}
    older = tiny_method("mocov2", "seed=2")
    older.on_load_checkpoint(checkpoint)  # Lightning calls it before loading the state
    older.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(older.queue.rows, method.queue.rows) and int(older.queue.position) == BATCH


def test_nnclr_contrasts_nearest_neighbours_and_keeps_view_one_in_its_support_set():
    """Each view's positive is the support row most similar to its projection (checked by brute
    force against every row); the loss is NNCLR's formula on those rows and the predictions; the
    step then pushes view 1's normalised projections, which travel in checkpoints."""
    from sslrun.losses import nnclr_loss

    method = tiny_method("nnclr")
    method.support.push(torch.nn.functional.normalize(torch.randn(40, 16), dim=1))
    support = method.support.rows.clone()
    v = views()
    out = method.training_loss({"views": v})
    out.loss.backward()

    z1, z2 = method.projector(method.backbone(torch.cat(v))).chunk(2)
    p1, p2 = method.predictor(torch.cat([z1, z2])).chunk(2)
    nearest = []
    for z in (z1, z2):
        similarity = torch.nn.functional.cosine_similarity(z.detach()[:, None], support[None], dim=2)
        nearest.append(support[similarity.argmax(dim=1)])
    torch.testing.assert_close(out.loss, nnclr_loss(*nearest, p1, p2, method.temperature))
    assert out.metrics["nn_similarity"] > 0  # the chosen rows are the most similar of 40 random ones
    assert not method.support.rows.requires_grad
    assert torch.allclose(method.support.rows[:BATCH], torch.nn.functional.normalize(z1.detach(), dim=1), atol=1e-6)
    assert torch.equal(method.support.rows[BATCH:], support[BATCH:]) and int(method.support.position) == BATCH
    assert all(p.grad is not None for p in method.backbone.parameters())
    fresh = tiny_method("nnclr", "seed=1")
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.support.rows, method.support.rows) and int(fresh.support.position) == BATCH


@pytest.mark.parametrize("name", ["mocov2", "mocov3", "byol"])
def test_no_gradient_reaches_the_momentum_encoder(name):
    method = tiny_method(name)
    method.training_loss({"views": views()}).loss.backward()
    teacher = method.key_encoder if name == "mocov2" else method.target
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in method.backbone.parameters())
    optimized = {id(p) for g in method.optimizer_groups() for p in g["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_simsiam_stop_gradient_matches_the_formula(stop_gradient):
    method = tiny_method("simsiam", f"method.stop_gradient={stop_gradient}")
    v = views()
    method.training_loss({"views": v}).loss.backward()
    got = {n: p.grad.clone() for n, p in method.named_parameters()}

    method.zero_grad()
    z1, z2 = method.projector(method.backbone(torch.cat(v))).chunk(2)
    p1, p2 = method.predictor(torch.cat([z1, z2])).chunk(2)
    t1, t2 = (z1.detach(), z2.detach()) if stop_gradient else (z1, z2)
    (negative_cosine_similarity(p1, t2) / 2 + negative_cosine_similarity(p2, t1) / 2).backward()
    for n, p in method.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n


def test_simsiam_ablations_change_the_gradient_path():
    v = views()
    grads = {}
    for flags in [("method.stop_gradient=true",), ("method.stop_gradient=false",), ("method.predictor=false",)]:
        method = tiny_method("simsiam", *flags)
        method.training_loss({"views": v}).loss.backward()
        grads[flags[0]] = method.projector[0].weight.grad.clone()
        if flags[0] == "method.predictor=false":
            assert method.predictor is None
    assert not torch.allclose(grads["method.stop_gradient=true"], grads["method.stop_gradient=false"])


def test_simsiam_predictor_keeps_its_peak_learning_rate():
    method = tiny_method("simsiam")
    groups = method.optimizer_groups()
    predictor = {id(p) for p in method.predictor.parameters()}
    fixed = [g for g in groups if g.get("constant_lr") is not None]
    assert fixed and all(id(p) in predictor for g in fixed for p in g["params"])
    assert all(g["constant_lr"] == method.lr_schedule.peak for g in fixed)


class RecordTeacher(L.Callback):
    """Teacher and online parameters around every optimizer step of a real Lightning loop."""

    def __init__(self):
        self.records = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.detach().clone() for p in pl_module.target.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        online = [p.detach().clone() for p in [*pl_module.backbone.parameters(), *pl_module.projector.parameters()]]
        after = [p.detach().clone() for p in pl_module.target.parameters()]
        self.records.append((trainer.global_step - 1, self.before, online, after))


def test_byol_target_follows_the_ema_formula_and_cosine_schedule(tmp_path):
    steps = 4
    method = tiny_method("byol", "method.momentum=0.9")
    method.lr_schedule = WarmupCosine(peak=0.05, total_steps=steps)
    method.target.schedule = WarmupCosine(peak=0.9, final=1.0, total_steps=steps)
    batches = [{"views": views(), "label": torch.zeros(BATCH, dtype=torch.long)} for _ in range(steps)]
    recorder = RecordTeacher()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                        default_root_dir=tmp_path)
    trainer.fit(method, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert [r[0] for r in recorder.records] == list(range(steps))
    for step, before, online, after in recorder.records:
        m = 1 - (1 - 0.9) * (math.cos(math.pi * step / steps) + 1) / 2  # BYOL's eq. for tau
        assert math.isclose(method.target.momentum(step), m, rel_tol=1e-12)
        for b, o, a in zip(before, online, after):
            assert torch.allclose(a, m * b + (1 - m) * o, atol=1e-6)
    assert any(not torch.equal(b, a) for b, a in zip(recorder.records[0][1], recorder.records[0][3]))


def test_mocov3_freezes_a_vit_patch_projection_and_refuses_other_backbones():
    vit = tiny_method("mocov3", "backbone=vit_tiny_p4", "+backbone.timm_kwargs.depth=2", "method.frozen_patch_embed=true")
    assert not any(p.requires_grad for p in vit.backbone.patch_embed.parameters())
    assert any(p.requires_grad for p in vit.backbone.blocks.parameters())
    vit.training_loss({"views": views()}).loss.backward()
    assert all(p.grad is None for p in vit.backbone.patch_embed.parameters())
    with pytest.raises(Exception, match="frozen_patch_embed=true"):
        tiny_method("mocov3", "method.frozen_patch_embed=true")
