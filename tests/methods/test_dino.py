"""DINO: losses against direct computations, the head, the teacher, and 2 processes == 1."""

import math

import pytest
import torch
import torch.nn.functional as F

from sslrun.config import ConfigError, compose
from sslrun.distributed import all_reduce_sum, gather_rows
from sslrun.losses import (
    centered_teacher_probs, dino_loss, entropy, ibot_patch_loss, koleo_loss, sinkhorn_knopp,
    update_center,
)
from sslrun.models.heads import DINOHead
from sslrun.optim import WarmupCosine
from sslrun.train import build_method
from tests.conftest import write_finished_run
from tests.processes import run_in_processes

K = 12


def test_dino_loss_is_the_mean_cross_entropy_over_pairs_of_different_crops():
    g = torch.Generator().manual_seed(0)
    students = [torch.randn(5, K, generator=g) for _ in range(4)]  # 2 global + 2 local
    teachers = [torch.softmax(torch.randn(5, K, generator=g), dim=-1) for _ in range(2)]
    total, pairs = 0.0, 0
    for t in range(2):
        for s in range(4):
            if s != t:
                for b in range(5):
                    q = torch.exp(students[s][b]) / torch.exp(students[s][b]).sum()
                    total += -(teachers[t][b] * torch.log(q)).sum().item() / 5
                pairs += 1
    assert pairs == 6
    assert dino_loss(students, teachers).item() == pytest.approx(total / pairs, rel=1e-5)


def test_centering_sharpening_and_center_update():
    g = torch.Generator().manual_seed(1)
    logits, center = torch.randn(6, K, generator=g), torch.randn(1, K, generator=g)
    expected = torch.exp((logits.double() - center.double()) / 0.04)
    expected /= expected.sum(dim=1, keepdim=True)
    torch.testing.assert_close(centered_teacher_probs(logits, center, 0.04), expected.float())
    torch.testing.assert_close(update_center(center, logits.mean(0, keepdim=True), 0.9),
                               0.9 * center + 0.1 * logits.mean(0, keepdim=True))
    assert (centered_teacher_probs(logits, center, 0.04).max(1).values
            > centered_teacher_probs(logits, center, 1.0).max(1).values).all()  # lower temperature: sharper


def test_entropy_is_log_k_for_uniform_and_zero_for_one_hot():
    assert entropy(torch.full((3, K), 1 / K)).item() == pytest.approx(math.log(K))
    assert entropy(F.one_hot(torch.tensor([1, 4]), K).float()).item() == pytest.approx(0.0, abs=1e-6)


def test_sinkhorn_knopp_makes_both_marginals_uniform():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 8, generator=g) * 0.5
    q = sinkhorn_knopp(logits, temperature=0.1, iterations=200)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16))  # each sample: a distribution
    torch.testing.assert_close(q.sum(dim=0), torch.full((8,), 16 / 8), atol=1e-3, rtol=1e-3)  # B / K each
    three = sinkhorn_knopp(logits, temperature=0.1, iterations=3)
    softmax = torch.softmax(logits / 0.1, dim=1)
    assert (three.sum(0) - 2).abs().max() < (softmax.sum(0) - 2).abs().max()  # 3 rounds already even it out
    torch.testing.assert_close(three.sum(dim=1), torch.ones(16))


def test_sinkhorn_knopp_three_iterations_by_hand():
    logits = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.3, 0.1]])
    q = torch.exp(logits / 0.5).t()
    q = q / q.sum()
    for _ in range(3):
        q = q / q.sum(1, keepdim=True) / 3
        q = q / q.sum(0, keepdim=True) / 2
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.5, 3), (q * 2).t())


def test_koleo_is_minus_mean_log_nearest_neighbour_distance():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=g)
    unit = x / x.norm(dim=1, keepdim=True)
    expected = 0.0
    for i in range(6):
        expected -= math.log(min((unit[i] - unit[j]).norm().item() for j in range(6) if j != i)) / 6
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-4)


def test_ibot_loss_counts_masked_patches_only():
    g = torch.Generator().manual_seed(4)
    student = torch.randn(2, 5, K, generator=g)
    teacher = torch.softmax(torch.randn(2, 5, K, generator=g), dim=-1)
    masks = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    ce = -(teacher * torch.log_softmax(student, -1)).sum(-1)
    expected = ((ce[0, 0] + ce[0, 2]) / 2 + ce[1, 3]) / 2
    assert ibot_patch_loss(student[masks], teacher[masks], masks).item() == pytest.approx(expected.item(), rel=1e-5)
    none_masked = torch.cat([masks, torch.zeros(1, 5, dtype=torch.bool)])  # an unmasked image counts in B
    assert ibot_patch_loss(student[masks], teacher[masks], none_masked).item() == pytest.approx(
        expected.item() * 2 / 3, rel=1e-5)


def test_dino_head_shapes_and_normalised_prototypes():
    head = DINOHead(in_dim=16, out_dim=K, hidden_dim=32, bottleneck_dim=8, num_layers=3, norm_last_layer=True)
    x = torch.randn(5, 16)
    logits = head(x)
    assert logits.shape == (5, K)
    assert logits.abs().max() <= 1 + 1e-6  # unit bottleneck . unit prototype = a cosine
    assert head.last_layer.scale is None
    with torch.no_grad():
        head.last_layer.weight.mul_(7.0)  # the prototypes' norms do not matter
    torch.testing.assert_close(head(x), logits)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == 3
    learned = DINOHead(16, K, 32, 8, 3, norm_last_layer=False)
    assert learned.last_layer.scale is not None and learned.last_layer.scale.requires_grad


# ---------------------------------------------------------------------------- the method
def tiny_dino_cfg(*extra):
    return compose(["method=dino", "recipe=none", "backbone=vit_tiny_p4", "backbone.timm_kwargs.depth=2",
                    "backbone.attention=math", "data.image_size=16", "method.head.hidden_dim=32",
                    "method.head.bottleneck_dim=16", "method.head.out_dim=24", "augmentation=multicrop_small",
                    "augmentation.views.2.size=12",
                    *extra])


def tiny_dino(*extra):
    torch.manual_seed(0)
    return build_method(tiny_dino_cfg(*extra), WarmupCosine(peak=1e-3, total_steps=20), None, steps_per_epoch=10)


def dino_views(n=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 16, 16, generator=g) for _ in range(2)] + \
           [torch.randn(n, 1, 12, 12, generator=g) for _ in range(6)]


def test_teacher_sees_only_global_crops_and_gets_no_gradient():
    method = tiny_dino()
    seen = []
    backbone = method.teacher.encoder[0]
    original = backbone.patch_embed.forward
    backbone.patch_embed.forward = lambda x: seen.append(x.shape[-1]) or original(x)
    out = method.training_loss({"views": dino_views()})
    out.loss.backward()
    assert seen == [16, 16]
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert all(p.grad is not None for p in method.backbone.parameters() if p.requires_grad)
    assert {"teacher_entropy", "teacher_student_kl", "teacher_temperature", "momentum"} <= set(out.metrics)
    kl = out.metrics["teacher_student_kl"]
    assert kl >= -1e-5 and out.metrics["teacher_entropy"] <= math.log(24) + 1e-5


def test_evaluators_see_the_teacher():
    """DINO evaluates its teacher (the paper's choice): kNN, probe and pictures use `eval_backbone`."""
    method = tiny_dino()
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    images = torch.randn(3, 1, 16, 16)
    method.eval()
    assert method.eval_backbone is method.teacher.encoder[0]
    torch.testing.assert_close(method.embed(images), method.teacher.encoder[0](images))
    assert not torch.allclose(method.embed(images), method.backbone(images))


def test_center_moves_towards_the_teacher_batch_mean():
    method = tiny_dino()
    views = dino_views()
    backbone, head = method.teacher.encoder
    with torch.no_grad():
        tokens = [backbone.forward_features(v) for v in views[:2]]
        logits = head(torch.cat([t[:, 0] for t in tokens]))
    method.training_loss({"views": views})
    torch.testing.assert_close(method.center, 0.1 * logits.mean(0, keepdim=True), atol=1e-5, rtol=1e-4)


def test_teacher_temperature_warms_up_linearly_then_stays():
    method = tiny_dino("method.warmup_teacher_temperature_epochs=1")  # 10 steps
    temps = [method.teacher_temperature(s) for s in (0, 5, 10, 50)]
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07])


def test_last_layer_is_frozen_for_the_first_epoch_only():
    method = tiny_dino("method.freeze_last_layer_epochs=0.5")  # 5 steps
    method.training_loss({"views": dino_views()}).loss.backward()
    method.on_before_optimizer_step(None)  # global_step 0
    assert method.head.last_layer.weight.grad is None
    assert method.head.mlp[0].weight.grad is not None


def test_packed_and_grouped_methods_give_the_same_loss():
    views = dino_views()
    packed = tiny_dino().training_loss({"views": views}).loss
    grouped = tiny_dino("method.pack_crops=false").training_loss({"views": views}).loss
    assert packed.item() == pytest.approx(grouped.item(), rel=1e-5)


def test_global_crops_must_lead_the_augmentation():
    with pytest.raises(ConfigError, match="method.global_crops=3: the first 3 crops must share one size"):
        tiny_dino_cfg("method.global_crops=3")
    with pytest.raises(ConfigError, match="backbone: method=dino runs multi-crop ViTs"):
        build_method(compose(["method=dino", "recipe=none", "backbone=resnet18", "augmentation=multicrop_small",
                              "data.image_size=16"]), WarmupCosine(peak=1e-3, total_steps=20), None, 10)


def _dino_on_two_processes(rank, world, out):
    method = tiny_dino()
    views = [v[rank * 4:(rank + 1) * 4] for v in dino_views()]
    results = []
    for _ in range(2):  # the second step uses the center of the first, a global-batch statistic
        loss = method.training_loss({"views": views}).loss
        results.append(gather_rows(loss.detach()[None]).mean())
    method.zero_grad()
    loss.backward()
    grads = {}
    for n, p in method.named_parameters():
        if p.grad is not None:
            grads[n] = all_reduce_sum(p.grad) / world
    targets = gather_rows(sinkhorn_knopp(views[0].flatten(1)[:, :K] * 3, 0.5, 3, all_reduce_sum))
    if rank == 0:
        torch.save({"losses": results, "center": method.center, "grads": grads, "sk": targets}, out)


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """Centering and Sinkhorn-Knopp are global-batch statistics: 2 x 4 images == 1 x 8."""
    out = tmp_path / "dino.pt"
    run_in_processes(_dino_on_two_processes, 2, out)
    got = torch.load(out)
    method = tiny_dino()
    views = dino_views()
    for step in range(2):
        loss = method.training_loss({"views": views}).loss
        assert got["losses"][step].item() == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(got["center"], method.center, atol=1e-6, rtol=1e-5)
    method.zero_grad()
    loss.backward()
    for n, p in method.named_parameters():
        if p.grad is not None:
            error = (got["grads"][n] - p.grad).abs().max()
            assert error <= 1e-4 * p.grad.abs().max() + 1e-7, n
    torch.testing.assert_close(got["sk"], sinkhorn_knopp(views[0].flatten(1)[:, :K] * 3, 0.5, 3))


# ---------------------------------------------------------------------------- DINOv2
def test_block_masks_have_the_exact_count_and_the_batch_rule():
    import random

    from sslrun.data.masking import batch_masks, block_mask

    rng = random.Random(0)
    for count in (1, 5, 20, 40, 49):
        assert int(block_mask((7, 7), count, rng).sum()) == count
    masks = batch_masks(10, (7, 7), (0.1, 0.5), 0.5, rng)
    counts = sorted(int(c) for c in masks.sum(1))
    assert counts[:5] == [0] * 5 and all(c > 0 for c in counts[5:])  # half the images masked
    bounds = [0.1 + 0.4 * i / 5 for i in range(6)]  # image i of 5 draws from the i-th fifth of the range
    assert all(int(49 * bounds[i]) <= c <= int(49 * bounds[i + 1]) for i, c in enumerate(counts[5:]))


def test_layerwise_lr_decay_groups():
    from sslrun.optim import layerwise_groups, vit_layer

    assert [vit_layer(n, 12) for n in ("backbone.cls_token", "backbone.patch_embed.proj.weight",
                                       "backbone.blocks.0.attn.qkv.weight", "backbone.blocks.11.mlp.fc1.bias",
                                       "backbone.norm.weight", "head.mlp.0.weight", "mask_token")] == [0, 0, 1, 12, 13, 13, 0]
    params = {n: torch.nn.Parameter(torch.zeros(2, 2) if n.endswith("weight") else torch.zeros(2))
              for n in ("backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight",
                        "backbone.blocks.1.norm1.bias", "head.mlp.0.weight")}
    groups = layerwise_groups(params.items(), num_blocks=2, decay=0.5, patch_embed_lr_mult=0.2, weight_decay=0.04,
                              exclude_bias_and_norm=True)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    expected = {"backbone.patch_embed.proj.weight": (0.5 ** 3 * 0.2, 0.04),
                "backbone.blocks.0.attn.qkv.weight": (0.5 ** 2, 0.04),
                "backbone.blocks.1.norm1.bias": (0.5, 0.0), "head.mlp.0.weight": (1.0, 0.04)}
    for name, (lr_scale, wd) in expected.items():
        assert scale[id(params[name])] == pytest.approx((lr_scale, wd)), name


def tiny_dinov2_cfg(*extra):
    return tiny_dino_cfg("method=dinov2", "augmentation=multicrop_small", "method.ibot.head.hidden_dim=32",
                         "method.ibot.head.bottleneck_dim=16", "method.ibot.head.out_dim=20", *extra)


def tiny_dinov2(*extra):
    torch.manual_seed(0)
    return build_method(tiny_dinov2_cfg(*extra), WarmupCosine(peak=1e-3, total_steps=20), None, steps_per_epoch=10)


def fixed_masks(n=8, seed=6):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(2 * n, 16, generator=g) < 0.3
    masks[::3] = False  # some images unmasked, as DINOv2's rule makes them
    return masks


def v2_views(n=8):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, 1, 16, 16, generator=g) for _ in range(2)] + \
           [torch.randn(n, 1, 12, 12, generator=g) for _ in range(6)]


@pytest.mark.parametrize("extra", [(), ("method.centering=center", "method.ibot.separate_head=true")])
def test_dinov2_loss_is_the_weighted_sum_of_its_terms(extra):
    method = tiny_dinov2(*extra)
    method.masks = lambda batch, device: fixed_masks()
    out = method.training_loss({"views": v2_views()})
    m = out.metrics
    expected = m["dino_loss"] + m["ibot_loss"] + 0.1 * m["koleo_loss"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert method.mask_token.token.grad.abs().sum() > 0  # masked patches see the mask token
    assert all(p.grad is None for p in method.teacher.parameters())
    assert ("ibot_head" in dict(method.named_children())) == bool(extra)
    assert len(method.teacher.encoder) == (3 if extra else 2)


def test_ibot_targets_come_from_the_unmasked_teacher():
    """Only the student's global crops are masked: changing the mask changes the student's patch
    tokens at those positions, never the teacher's targets."""
    method = tiny_dinov2("method.centering=center")
    views = v2_views()
    seen = []
    teacher_backbone = method.teacher.encoder[0]
    original = teacher_backbone.patch_embed.forward
    teacher_backbone.patch_embed.forward = lambda x: seen.append(original(x)) or seen[-1]
    for masks in (fixed_masks(seed=6), fixed_masks(seed=7)):
        method.masks = lambda batch, device, masks=masks: masks
        method.training_loss({"views": views})
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3])


def _dinov2_on_two_processes(rank, world, out):
    method = tiny_dinov2("method.koleo_weight=0")
    per_crop = fixed_masks().view(2, 8, 16)[:, rank * 4:(rank + 1) * 4].reshape(8, 16)
    method.masks = lambda batch, device: per_crop
    loss = method.training_loss({"views": [v[rank * 4:(rank + 1) * 4] for v in v2_views()]}).loss
    loss.backward()
    grads = {n: all_reduce_sum(p.grad) / world for n, p in method.named_parameters() if p.grad is not None}
    losses = gather_rows(loss.detach()[None])
    if rank == 0:
        torch.save({"loss": losses.mean(), "grads": grads}, out)


def test_dinov2_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """Sinkhorn-Knopp over the global batch (class tokens, and masked patches of uneven count per
    process) makes 2 x 4 images equal 1 x 8, loss and gradients. KoLeo is off here: its nearest
    neighbours are searched within each process's batch, as in DINOv2, so it is not a global term."""
    out = tmp_path / "dinov2.pt"
    run_in_processes(_dinov2_on_two_processes, 2, out)
    got = torch.load(out)
    method = tiny_dinov2("method.koleo_weight=0")
    method.masks = lambda batch, device: fixed_masks()
    loss = method.training_loss({"views": v2_views()}).loss
    loss.backward()
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    for n, p in method.named_parameters():
        if p.grad is not None:
            assert (got["grads"][n] - p.grad).abs().max() <= 1e-4 * p.grad.abs().max() + 1e-7, n


def test_crop_sizes_must_fit_the_patch_size():
    with pytest.raises(ConfigError, match=r"augmentation.views.2.size=14: must be a multiple of the ViT's patch size "
                                          r"\(backbone.timm_kwargs.patch_size=4\)"):
        tiny_dino_cfg("augmentation.views.2.size=14")


# ---------------------------------------------------------------------------- DINOv2 distillation
def make_teacher_run(tmp_path, *extra):
    """A trained-looking dinov2 run directory (its config, and a checkpoint whose EMA teacher is no
    longer the student's copy) and the method it was saved from."""
    teacher = tiny_dinov2("method.ibot.separate_head=true", *extra)
    with torch.no_grad():
        for p in teacher.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = write_finished_run(tmp_path / "teacher", tiny_dinov2_cfg("method.ibot.separate_head=true", *extra),
                             teacher.state_dict())
    return run, teacher


def tiny_distill_cfg(run, *extra):
    """A student half as wide and half as deep as make_teacher_run's teacher, same patches and prototypes."""
    return tiny_dino_cfg("method=dinov2_distill", "augmentation=multicrop_small", f"method.teacher_run={run}",
                         "backbone.timm_kwargs.depth=1", "+backbone.timm_kwargs.embed_dim=96",
                         "+backbone.timm_kwargs.num_heads=3", "method.ibot.separate_head=true",
                         "method.ibot.head.hidden_dim=32", "method.ibot.head.bottleneck_dim=16",
                         "method.ibot.head.out_dim=20", *extra)


def tiny_distill(run, *extra):
    torch.manual_seed(1)
    return build_method(tiny_distill_cfg(run, *extra), WarmupCosine(peak=1e-3, total_steps=20), None,
                        steps_per_epoch=10)


def test_distillation_learns_from_the_runs_frozen_teacher_and_keeps_a_student_ema(tmp_path):
    run, trained = make_teacher_run(tmp_path)
    student = tiny_distill(run)
    saved = {n: p.clone() for n, p in trained.teacher.encoder.named_parameters()}
    loaded = dict(student.teacher.named_parameters())
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[n], saved[n]) for n in saved)
    assert student.backbone.num_features == 96 and student.teacher[0].num_features == 192
    assert not any(p.requires_grad for p in student.teacher.parameters())
    assert not any("mask_token" in name for name, _ in student.named_parameters())

    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    trainable = {id(p) for g in student.optimizer_groups() for p in g["params"]}
    assert not trainable & {id(p) for p in student.teacher.parameters()}
    assert not trainable & {id(p) for p in student.student_ema.parameters()}
    student.train()
    assert not student.teacher.training  # no drop path or dropout in the targets, whatever Lightning asks
    ema_before = [p.clone() for p in student.student_ema.parameters()]
    student.training_loss({"views": v2_views()}).loss.backward()
    assert all(p.grad is None for p in student.teacher.parameters())
    optimizer.step()
    student.after_optimizer_step()
    assert all(torch.equal(p, saved[n]) for n, p in student.teacher.named_parameters())
    m = student.student_ema.momentum(0)
    online = [p for module in student.student_modules() for p in module.parameters()]
    for ema, before, now in zip(student.student_ema.parameters(), ema_before, online):
        torch.testing.assert_close(ema, m * before + (1 - m) * now)
    assert student.eval_backbone is student.student_ema.encoder[0]


def test_distillation_loss_from_a_direct_computation(tmp_path):
    """Per crop, unpacked: the teacher's Sinkhorn-Knopp targets on its class tokens and on every patch
    of the global crops (nothing masked, in student or teacher), the student's cross-entropies to
    them, and KoLeo on the student's global class tokens."""
    run, _ = make_teacher_run(tmp_path)
    student = tiny_distill(run, "backbone.attention=math")
    views, temperature = v2_views(), student.teacher_temperature(0)
    out = student.training_loss({"views": views})

    t_backbone, t_head, t_ibot = student.teacher
    with torch.no_grad():
        t_tokens = [t_backbone.forward_features(v) for v in views[:2]]
        dino_targets = sinkhorn_knopp(torch.cat([t_head(t[:, 0]) for t in t_tokens]), temperature, 3)
        ibot_targets = sinkhorn_knopp(torch.cat([t_ibot(t[:, 1:]).flatten(0, 1) for t in t_tokens]), temperature, 3)
    s_tokens = [student.backbone.forward_features(v) for v in views]
    classes = torch.cat([t[:, 0] for t in s_tokens])
    s_dino = (student.head(classes) / 0.1).chunk(len(views))
    dino = dino_loss(s_dino, dino_targets.unflatten(0, (2, -1)))
    s_ibot = torch.cat([student.ibot_head(t[:, 1:]).flatten(0, 1) for t in s_tokens[:2]]) / 0.1
    ibot = torch.sum(-ibot_targets * F.log_softmax(s_ibot, dim=-1), dim=-1).mean()  # every patch, equal weight
    koleo = koleo_loss(classes[:8]) + koleo_loss(classes[8:16])
    assert out.metrics["dino_loss"].item() == pytest.approx(dino.item(), rel=1e-4)
    assert out.metrics["ibot_loss"].item() == pytest.approx(ibot.item(), rel=1e-4)
    assert out.loss.item() == pytest.approx((dino + ibot + 0.1 * koleo).item(), rel=1e-4)
    assert out.metrics["masked_patches"].item() == 1.0  # the iBOT loss covers every patch


@pytest.mark.parametrize("override, message", [
    ("backbone.timm_kwargs.patch_size=2", r"backbone.timm_kwargs.patch_size=2: the teacher at .* has 4; "
                                          r"set backbone.timm_kwargs.patch_size=4"),
    ("method.head.out_dim=30", r"method.head.out_dim=30: the teacher .* has 24; set method.head.out_dim=24"),
    ("method.ibot.separate_head=false", r"method.ibot: the student's iBOT head has 24 prototypes, the teacher's .* "
                                        r"20; set method.ibot.separate_head=true method.ibot.head.out_dim=20"),
])
def test_distillation_refuses_a_teacher_that_does_not_fit(tmp_path, override, message):
    from sslrun.config import validate

    run, _ = make_teacher_run(tmp_path)
    validate(tiny_distill_cfg(run))
    with pytest.raises(ConfigError, match=message):
        validate(tiny_distill_cfg(run, override))


def test_distillation_needs_a_finished_dinov2_run(tmp_path):
    from omegaconf import OmegaConf

    from sslrun.config import validate

    with pytest.raises(ConfigError, match=r"method.teacher_run=.*nowhere: no finished run there \(needs .*config.yaml "
                                          r"and .*last.ckpt\); point it at the run directory of a trained"):
        validate(tiny_distill_cfg(tmp_path / "nowhere"))
    run, _ = make_teacher_run(tmp_path)
    config = run / ".hydra" / "config.yaml"
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(config), {"method": {"name": "dino"}}), config)
    with pytest.raises(ConfigError, match=r"that run trained method=dino; the teacher must be a dinov2 run"):
        validate(tiny_distill_cfg(run))
