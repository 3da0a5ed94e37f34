"""I-JEPA's masks, its step on real modules against a per-(image, block) computation written from
the paper (unpacked, one sequence at a time), its loss against the formula, its evaluated feature
and its picture. (2 processes == 1 and the FSDP step are the registry's tests; learning is
tests/methods/test_method_runs.py.)"""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslrun.config import ConfigError
from sslrun.data.masking import jepa_block, multiblock_masks, pack_masks, unpack_masks
from sslrun.losses import ijepa_loss
from sslrun.models.vit import crop_tokens
from tests.method_cases import BATCH, tiny_batch, tiny_cfg, tiny_method


def _rectangle(block: torch.Tensor, width: int):
    rows, cols = block // width, block % width
    h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    return h, w, len(block) == h * w and len(set(block.tolist())) == h * w


def test_masks_have_the_papers_blocks_and_the_context_never_shows_a_target():
    grid = (14, 14)
    masks = multiblock_masks(200, grid, 4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0), random.Random(0))
    lengths = set()
    for mask in masks:
        assert len(mask.targets) == 4
        covered = set()
        for block in mask.targets:
            h, w, rectangle = _rectangle(block, 14)
            assert rectangle and 0.15 * 196 * 0.7 <= h * w <= 0.2 * 196 * 1.3  # rounded h and w
            covered |= set(block.tolist())
        context = mask.context.tolist()
        assert context == sorted(set(context)) and len(context) >= 4
        assert not covered & set(context)  # the context never holds a target patch
        lengths.add(len(context))
    assert len(lengths) > 20  # each image its own context length: none is cut to the batch's shortest
    again = multiblock_masks(200, grid, 4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0), random.Random(0))
    assert all(torch.equal(a.context, b.context) for a, b in zip(masks, again))


def test_a_block_covers_its_area_at_its_aspect_and_may_span_the_grid():
    rng = random.Random(1)
    shapes = [_rectangle(jepa_block((14, 14), (0.5, 0.5), (2.0, 2.0), rng), 14) for _ in range(50)]
    assert {(h, w) for h, w, _ in shapes} == {(14, 7)}  # sqrt(98 x 2) = 14 rows, sqrt(98 / 2) = 7 columns
    full = jepa_block((7, 7), (1.0, 1.0), (1.0, 1.0), rng)
    assert torch.equal(full, torch.arange(49))


def test_the_loss_is_the_smooth_l1_or_squared_distance_to_layer_normed_targets():
    g = torch.Generator().manual_seed(0)
    predictions, targets = torch.randn(30, 16, generator=g) * 2, torch.randn(30, 16, generator=g) * 3 + 1
    normed = (targets - targets.mean(-1, keepdim=True)) / (targets.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    d = (predictions - normed).abs()
    huber = torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()
    torch.testing.assert_close(ijepa_loss(predictions, targets), huber)
    torch.testing.assert_close(ijepa_loss(predictions, targets, "l2"), (d ** 2).mean())
    # Two processes' shares of 30 patches, 10 and 20: the average of their losses is the mean over all 30.
    shares = [ijepa_loss(predictions[s], targets[s], patches=15) for s in (slice(0, 10), slice(10, 30))]
    torch.testing.assert_close(sum(shares) / 2, huber)


def reference_loss(method, images, masks):
    """The paper's computation, one sequence at a time: per image the context encoder on its
    context patches; per target block the predictor on (those tokens, then a mask token at each
    target position), plain ViT blocks; the target encoder's whole-image tokens at the block,
    layer-normalised; smooth L1 over every predicted patch."""
    vit, predictor, target = method.backbone, method.predictor, method.eval_backbone
    with torch.no_grad():
        target_tokens = target.forward_features(images)  # no class token: [B, patches, D]
    predictions, targets = [], []
    for i, mask in enumerate(masks):
        encoded = vit.norm(vit.blocks(crop_tokens(vit, images[i:i + 1])[:, mask.context]))[0]
        for block in mask.targets:
            context = predictor.embed(encoded) + predictor.position_table[mask.context + 1]
            queries = predictor.mask_token + predictor.position_table[block + 1]
            x = torch.cat([context, queries])[None]
            for layer in predictor.blocks:
                x = layer(x)
            predictions.append(predictor.head(predictor.norm(x[0, len(mask.context):])))
            targets.append(F.layer_norm(target_tokens[i, block], (target_tokens.shape[-1],)))
    return F.smooth_l1_loss(torch.cat(predictions), torch.cat(targets))


def test_a_step_is_the_per_block_computation_loss_and_gradients():
    method, cfg = tiny_method("ijepa")
    assert method.backbone.num_prefix_tokens == 0  # the reference ViT: no class token
    images = tiny_batch(cfg)["views"][0]
    masks = method.draw_masks(BATCH, random.Random(3))
    out = method.training_loss({"views": [images], "masks": pack_masks(masks)})
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad()
    expected = reference_loss(method, images, masks)
    expected.backward()
    torch.testing.assert_close(out.loss, expected)
    assert len(grads) > 10 and not any(name.startswith("target.") for name in grads)  # the EMA gets none
    for name, p in method.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The step's features are what every evaluation reads: the target encoder's pooled output.
    torch.testing.assert_close(out.features, method.eval_backbone(images), rtol=1e-4, atol=1e-5)
    assert out.metrics["context_patches"] == sum(len(m.context) for m in masks) / BATCH


def test_the_picture_shows_the_image_its_context_and_its_targets():
    from PIL import Image

    from sslrun.data.augment import PhotometricAugment

    method, cfg = tiny_method("ijepa")
    augment = PhotometricAugment(cfg.augmentation.views, cfg.data.mean, cfg.data.std)
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    picture = method.method_pictures(images, augment.normalize(images), augment)["context_and_targets"]
    array = np.asarray(picture)
    assert picture.size == (3 * 98 + 2, 3 * 98 + 2)  # 3 images x (image, context, targets)
    masks = method.draw_masks(3, random.Random(0))
    for i, mask in enumerate(masks):
        def cells(indices):
            on = torch.zeros(49, dtype=torch.bool)
            on[indices] = True
            pixels = on.view(7, 7).repeat_interleave(4, 0).repeat_interleave(4, 1).numpy().astype(np.uint8) * 255
            return np.asarray(Image.fromarray(pixels).resize((96, 96), Image.NEAREST)) > 0

        tiles = [array[2 + i * 98:2 + i * 98 + 96, 2 + c * 98:2 + c * 98 + 96] for c in range(3)]
        image = np.asarray(Image.fromarray(images[i, 0].numpy()).resize((96, 96), Image.NEAREST))
        shown, targeted = cells(mask.context), cells(torch.cat(mask.targets))
        assert np.array_equal(tiles[0][..., 0], image)
        assert np.array_equal(tiles[1][..., 0][shown], image[shown]) and (tiles[1][~shown] == 127).all()
        channels = tiles[2][targeted].astype(int)
        assert (channels.max(-1) - channels.min(-1)).mean() > 20  # the targets are tinted, the rest is grey


def test_ijepa_needs_a_vit_and_room_for_a_context():
    with pytest.raises(ConfigError, match="method=ijepa: backbone=resnet18 is not a ViT"):
        tiny_cfg("ijepa", "backbone=resnet18_half")
    with pytest.raises(ConfigError, match="leave no context"):
        tiny_cfg("ijepa", "method.targets=6")
