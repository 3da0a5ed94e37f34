"""DINOv3's Gram anchoring on method=dinov2 (`method.gram.*`): the loss against pairwise cosine
similarities computed directly, its place in the step, the Gram teacher's schedule (loaded from
the EMA teacher at `start_step`, reloaded every `refresh_every`), the high-resolution teacher,
and a sharded 2-process run through the CLI."""

import pytest
import torch
import torch.nn.functional as F

from sslrun.config import ConfigError
from sslrun.data.transforms import Upscaled
from sslrun.losses import gram_loss
from sslrun.methods.dinov2 import DINOv2
from tests.conftest import column, needs_fashion_mnist, read_metrics, read_summary, run_cli
from tests.method_cases import BATCH, tiny_batch, tiny_cfg, tiny_method

GRAM_ON = ("method.gram.weight=2.0", "method.gram.start_step=0")


def direct_gram_loss(student, teacher, clamp_negative=False):
    """Each image's patch-to-patch cosine similarities, pair by pair; the squared differences' mean."""
    total, count = 0.0, 0
    for s, t in zip(student, teacher):
        a = F.cosine_similarity(s[:, None], s[None], dim=-1)
        b = F.cosine_similarity(t[:, None], t[None], dim=-1)
        if clamp_negative:
            a, b = a.clamp(min=0), b.clamp(min=0)
        total, count = total + ((a - b) ** 2).sum(), count + a.numel()
    return total / count


def test_the_loss_compares_each_images_patch_similarities():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 10, 8, generator=g), torch.randn(3, 10, 8, generator=g)
    for clamp in (False, True):
        torch.testing.assert_close(gram_loss(student, teacher, clamp), direct_gram_loss(student, teacher, clamp))
    scales = torch.rand(3, 10, 1, generator=g) + 0.5
    torch.testing.assert_close(gram_loss(student * scales, teacher), gram_loss(student, teacher))  # cosines only
    assert gram_loss(teacher, teacher).item() < 1e-12
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    gram_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0  # the Gram teacher gets no gradient


def _at_step(monkeypatch, step):
    monkeypatch.setattr(DINOv2, "global_step", property(lambda self: step))


def test_the_step_adds_the_weighted_gram_loss_of_the_masked_student_against_the_gram_teacher(monkeypatch):
    _at_step(monkeypatch, 0)
    on, cfg = tiny_method("dinov2", *GRAM_ON)
    off, _ = tiny_method("dinov2")
    batch = tiny_batch(cfg)
    outputs = []
    for method in (on, off):
        torch.manual_seed(3)
        outputs.append(method.training_loss(batch))
    with_gram, without = outputs
    gram = with_gram.metrics["gram_loss"]
    torch.testing.assert_close(with_gram.loss, without.loss + 2.0 * gram)
    assert "gram_loss" not in without.metrics and gram > 0

    # The same number from the student's masked global crops and the Gram teacher's plain forward.
    views = batch["views"][:2]
    torch.manual_seed(3)
    masks = on.masks(BATCH, "cpu")
    tokens = on.student_tokens(batch["views"], masks)
    student = torch.cat([t[:, on.backbone.num_prefix_tokens:] for t in tokens[:2]])
    teacher_vit = on.gram_teacher.encoder[0]
    teacher = torch.cat([teacher_vit.forward_features(v)[:, teacher_vit.num_prefix_tokens:] for v in views])
    torch.testing.assert_close(gram, direct_gram_loss(student, teacher).detach(), rtol=1e-4, atol=1e-6)


def test_the_gram_teacher_is_the_ema_teacher_of_its_last_refresh(monkeypatch):
    method, cfg = tiny_method("dinov2", "method.gram.weight=1.0", "method.gram.start_step=3",
                              "method.gram.refresh_every=2")
    assert [method.gram_refresh_due(s) for s in range(9)] == [False] * 3 + [True, False, True, False, True, False]
    assert not method.gram_active(2) and method.gram_active(4)
    batch = tiny_batch(cfg)
    teacher, gram = method.teacher_modules()[0], method.gram_teacher.encoder[0]

    def nudge_teacher():
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.01 * torch.randn_like(p))

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))

    nudge_teacher()
    _at_step(monkeypatch, 2)
    assert "gram_loss" not in method.training_loss(batch).metrics and not same(gram, teacher)  # not yet on
    _at_step(monkeypatch, 3)
    assert "gram_loss" in method.training_loss(batch).metrics and same(gram, teacher)  # loaded
    loaded = [p.clone() for p in gram.parameters()]
    nudge_teacher()
    _at_step(monkeypatch, 4)
    method.training_loss(batch)
    assert all(torch.equal(a, b) for a, b in zip(loaded, gram.parameters()))  # kept between refreshes
    _at_step(monkeypatch, 5)
    method.training_loss(batch)
    assert same(gram, teacher)  # reloaded
    assert not any(p.requires_grad for p in gram.parameters())


def test_a_high_resolution_gram_teacher_reads_the_upscaled_crops_resized_to_the_students_grid(monkeypatch):
    """teacher_upscale=2: the method asks the data pipeline for its global crops cut again at 2x
    (upscaled_crops; tests/data/test_decode.py checks the cutting), the Gram teacher embeds those
    and its 8 x 8 feature map is resized (bicubic) to the student's 4 x 4 grid."""
    _at_step(monkeypatch, 0)
    method, cfg = tiny_method("dinov2", *GRAM_ON, "method.gram.teacher_upscale=2")
    assert DINOv2.upscaled_crops(cfg.method) == Upscaled(crops=2, factor=2)
    assert DINOv2.upscaled_crops(tiny_cfg("dinov2", *GRAM_ON).method) is None  # the crops' own size
    assert DINOv2.upscaled_crops(tiny_cfg("dinov2", "method.gram.teacher_upscale=2").method) is None  # Gram off
    views = tiny_batch(cfg)["views"][:2]
    upscaled = [torch.randn(BATCH, cfg.data.channels, 56, 56, generator=torch.Generator().manual_seed(i))
                for i in range(2)]
    targets = method.gram_targets(views, upscaled)
    vit = method.gram_teacher.encoder[0]
    expected = []
    for large in upscaled:
        patches = vit.forward_features(large)[:, vit.num_prefix_tokens:]  # an 8 x 8 grid of 7 px patches
        grid = patches.transpose(1, 2).unflatten(2, (8, 8))
        expected.append(F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2))
    assert targets.shape == (2 * BATCH, 16, vit.num_features)
    torch.testing.assert_close(targets, torch.cat(expected), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no upscaled_views"):
        method.gram_targets(views)


def test_gram_settings_are_checked():
    with pytest.raises(ConfigError, match="method.gram.teacher_upscale=0: 1 .* or more"):
        tiny_cfg("dinov2", "method.gram.weight=1.0", "method.gram.teacher_upscale=0")
    with pytest.raises(ConfigError, match="method.gram.refresh_every=0: positive"):
        tiny_cfg("dinov2", "method.gram.refresh_every=0")
    cfg = tiny_cfg("dinov2_gram")
    assert cfg.method.name == "dinov2" and cfg.method.gram.weight == 2.0 and cfg.method.gram.teacher_upscale == 2


@pytest.mark.slow
@needs_fashion_mnist
def test_gram_anchoring_runs_sharded_on_two_processes_and_checkpoints_its_teacher(tmp_path):
    """method=dinov2_gram under FSDP2 on 2 gloo processes: the loss appears at start_step, stays
    finite, and the sharded Gram teacher is saved in the (sharded) checkpoint."""
    steps = 6
    run_cli("method=dinov2_gram", "backbone.timm_kwargs.depth=2", "augmentation.views.2.count=2",
            "data.batch_size=16", "data.num_workers=0", "eval.knn.bank_size=200", "eval.knn.query_size=100",
            "eval.pictures=0", "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
            "method.head.out_dim=256", "method.gram.start_step=2", "method.gram.refresh_every=3",
            "trainer=fsdp", "trainer.devices=2", "trainer.accelerator=cpu", f"trainer.max_steps={steps}",
            f"hydra.run.dir={tmp_path}", ranks=2)
    assert read_summary(tmp_path)["global_step"] == steps
    gram = column(read_metrics(tmp_path), "train/gram_loss")
    assert [step for step, _ in gram] == list(range(2, steps)) and all(0 < v < 4 for _, v in gram), gram
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(tmp_path / "checkpoints" / "last.ckpt")).read_metadata().state_dict_metadata
    assert any("gram_teacher.encoder.0.blocks.0.attn.qkv.weight" in key for key in saved), sorted(saved)[:5]
