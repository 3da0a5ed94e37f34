"""MAE's step on real modules against the reference code's computation (batched, with its shuffle
and unshuffle), its masks, patch layout and pictures. (2 processes == 1 and the FSDP step are the
registry's tests; learning is tests/methods/test_method_runs.py.)"""

import numpy as np
import torch
from PIL import Image
from lightly.models import utils as lightly_utils

from sslrun.losses import patchify, unpatchify
from sslrun.models.predictor import sincos_positions
from sslrun.models.vit import crop_tokens
from tests.method_cases import BATCH, tiny_batch, tiny_method


def reference_loss(method, images, kept, removed):
    """MAE's main forward (models_mae.py) written with the method's modules: encode the visible
    tokens (class token first), then the decoder on every position in grid order (the visible
    tokens unshuffled back, a mask token at each removed one), its class token at position 0."""
    vit, decoder = method.backbone, method.decoder
    tokens = crop_tokens(vit, images)
    cls, patches = tokens[:, :1], tokens[:, 1:]
    visible = patches.gather(1, kept[..., None].expand(-1, -1, patches.shape[-1]))
    encoded = vit.norm(vit.blocks(torch.cat([cls, visible], 1)))
    x = decoder.embed(encoded)
    full = decoder.mask_token.expand(images.shape[0], method.patches, -1).clone()
    full = full.scatter(1, kept[..., None].expand(-1, -1, x.shape[-1]), x[:, 1:])
    x = torch.cat([x[:, :1], full], 1) + decoder.position_table
    for block in decoder.blocks:
        x = block(x)
    predicted = decoder.head(decoder.norm(x))[:, 1:]
    mask = torch.zeros(images.shape[0], method.patches).scatter(1, removed, 1.0)
    target = patchify(images, method.patch)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    per_patch = ((predicted - (target - mean) / (var + 1e-6) ** 0.5) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def test_a_step_is_the_reference_codes_computation_loss_and_gradients():
    method, cfg = tiny_method("mae")
    images = tiny_batch(cfg)["views"][0]
    torch.manual_seed(3)
    out = method.training_loss({"views": [images]})
    torch.manual_seed(3)
    kept, removed = method.random_masks(BATCH, images.device)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad()
    expected = reference_loss(method, images, kept, removed)
    expected.backward()
    torch.testing.assert_close(out.loss, expected)
    assert len(grads) > 10
    for name, p in method.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_masks_keep_a_quarter_of_the_patches_at_random_and_the_rest_is_removed():
    method, _ = tiny_method("mae")
    assert method.patches == 49 and method.visible == 12  # int(49 * 0.25): the reference's len_keep
    kept, removed = method.random_masks(64, "cpu")
    assert kept.shape == (64, 12) and removed.shape == (64, 37)
    union = torch.cat([kept, removed], 1).sort(1).values
    assert torch.equal(union, torch.arange(49).expand(64, -1))
    counts = torch.bincount(kept.flatten(), minlength=49).float()
    assert counts.min() > 0 and counts.std() / counts.mean() < 0.5  # every patch gets kept, about evenly


def test_patches_are_laid_out_as_the_vits_tokens_and_as_lightlys():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    torch.testing.assert_close(patches[1, 4], images[1, :, 4:8, 4:8].permute(1, 2, 0).flatten())  # row 1, column 1
    torch.testing.assert_close(unpatchify(patches, 4, (2, 3), 3), images)
    square = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(patchify(square, 4), lightly_utils.patchify(square, 4))


def test_decoder_positions_are_maes_sin_cos_table():
    table = torch.from_numpy(lightly_utils.get_2d_sincos_pos_embed(64, 7, cls_token=True)).float()
    method, _ = tiny_method("mae", "method.decoder.width=64")
    torch.testing.assert_close(method.decoder.position_table, table)
    torch.testing.assert_close(sincos_positions((7, 7), 64), table[1:])


def test_the_reconstruction_picture_shows_the_image_its_visible_patches_and_the_prediction():
    method, cfg = tiny_method("mae")
    from sslrun.data.augment import PhotometricAugment

    augment = PhotometricAugment(cfg.augmentation.views, cfg.data.mean, cfg.data.std)
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    picture = method.method_pictures(images, augment.normalize(images), augment)["reconstruction"]
    array = np.asarray(picture)[..., 0]
    assert picture.size == (3 * 98 + 2, 3 * 98 + 2)  # 3 images x (image, masked, reconstruction)
    kept, _ = method.random_masks(3, "cpu", torch.Generator().manual_seed(0))
    for i in range(3):
        visible = torch.zeros(49, dtype=torch.bool)
        visible[kept[i]] = True
        pixels = visible.view(7, 7).repeat_interleave(4, 0).repeat_interleave(4, 1)
        shown = np.asarray(Image.fromarray(pixels.numpy().astype(np.uint8) * 255).resize((96, 96), Image.NEAREST)) > 0
        tiles = [array[2 + i * 98:2 + i * 98 + 96, 2 + c * 98:2 + c * 98 + 96] for c in range(3)]
        image = np.asarray(Image.fromarray(images[i, 0].numpy()).resize((96, 96), Image.NEAREST))
        assert np.array_equal(tiles[0], image)
        assert np.array_equal(tiles[1][shown], image[shown]) and (tiles[1][~shown] == 127).all()
        assert np.array_equal(tiles[2][shown], image[shown]) and not np.array_equal(tiles[2], image)
