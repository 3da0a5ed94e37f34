"""Batched photometric ops == torchvision's per-image ops; crops have the recipe's shapes."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from omegaconf import OmegaConf
from PIL import Image

from sslrun.data import augment as A
from sslrun.data.transforms import CenterView, MultiCrop, to_tensor


@pytest.fixture
def rgb():
    return torch.rand(4, 3, 12, 10, generator=torch.Generator().manual_seed(0))


def per_image(fn, x, factors):
    return torch.stack([fn(img, float(f)) for img, f in zip(x, factors)])


def test_brightness_contrast_saturation_hue_match_torchvision(rgb):
    factors = torch.tensor([0.5, 1.0, 1.3, 1.8])
    assert torch.allclose(A.adjust_brightness(rgb, factors), per_image(TF.adjust_brightness, rgb, factors), atol=1e-6)
    assert torch.allclose(A.adjust_contrast(rgb, factors), per_image(TF.adjust_contrast, rgb, factors), atol=1e-6)
    assert torch.allclose(A.adjust_saturation(rgb, factors), per_image(TF.adjust_saturation, rgb, factors), atol=1e-6)
    shifts = torch.tensor([-0.4, -0.05, 0.0, 0.3])
    assert torch.allclose(A.adjust_hue(rgb, shifts), per_image(TF.adjust_hue, rgb, shifts), atol=1e-5)


def test_contrast_on_grey_images_matches_torchvision():
    grey = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    factors = torch.tensor([0.2, 1.0, 1.6])
    assert torch.allclose(A.adjust_contrast(grey, factors), per_image(TF.adjust_contrast, grey, factors), atol=1e-6)


def test_greyscale_and_solarize_match_torchvision(rgb):
    assert torch.allclose(A.grey(rgb), TF.rgb_to_grayscale(rgb), atol=1e-6)
    assert torch.allclose(A.solarize(rgb), TF.solarize(rgb, 0.5), atol=1e-7)


def test_hsv_round_trip(rgb):
    assert torch.allclose(A.hsv_to_rgb(A.rgb_to_hsv(rgb)), rgb, atol=1e-5)


def test_blur_matches_torchvision_per_image_sigma():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.5, 1.0, 2.0])
    expected = torch.stack([TF.gaussian_blur(img, [7, 7], [float(s), float(s)]) for img, s in zip(x, sigma)])
    assert torch.allclose(A.gaussian_blur(x, sigma, 7), expected, atol=1e-5)


def spec(**overrides):
    base = {"count": 2, "size": 8, "scale": [0.2, 1.0], "ratio": [0.75, 1.33], "flip_p": 0.5,
            "color_jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1},
            "grayscale_p": 0.2, "blur_p": 0.5, "blur_sigma": [0.1, 2.0], "solarize_p": 0.2}
    base.update(overrides)
    return OmegaConf.create(base)


def test_photometric_augment_normalises_and_keeps_shapes():
    views = [spec(count=2, size=8), spec(count=3, size=4, blur_p=0.0)]
    augment = A.PhotometricAugment(views, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    crops = [torch.randint(0, 256, (6, 3, s, s), dtype=torch.uint8) for s in (8, 8, 4, 4, 4)]
    out = augment(crops)
    assert [o.shape for o in out] == [c.shape for c in crops]
    assert all(o.dtype == torch.float32 for o in out)
    assert all(o.min() >= -2.0 - 1e-6 and o.max() <= 2.0 + 1e-6 for o in out)  # (x - 0.5) / 0.25, x in [0,1]


def test_identity_recipe_only_normalises():
    plain = spec(color_jitter={"p": 0.0, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
                 grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, count=1)
    augment = A.PhotometricAugment([plain], mean=[0.1], std=[0.5])
    crops = [torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8)]
    assert torch.allclose(augment(crops)[0], (crops[0].float() / 255 - 0.1) / 0.5)


def test_multicrop_makes_every_crop_of_the_recipe():
    image = Image.fromarray((torch.rand(40, 30, 3) * 255).byte().numpy())
    crops = MultiCrop([spec(count=2, size=16), spec(count=4, size=6)])(image)
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 6, 6)] * 4
    assert all(c.dtype == torch.uint8 for c in crops)


def test_full_scale_crop_without_flip_is_the_image():
    image = Image.fromarray((torch.rand(9, 9) * 255).byte().numpy())
    crop = MultiCrop([spec(count=1, size=9, scale=[1.0, 1.0], ratio=[1.0, 1.0], flip_p=0.0)])(image)[0]
    assert torch.equal(crop, to_tensor(image))
    flipped = MultiCrop([spec(count=1, size=9, scale=[1.0, 1.0], ratio=[1.0, 1.0], flip_p=1.0)])(image)[0]
    assert torch.equal(flipped, to_tensor(image).flip(-1))


def test_center_view_resizes_and_crops():
    image = Image.fromarray((torch.rand(60, 80, 3) * 255).byte().numpy())
    view = CenterView(size=32, crop_fraction=0.5)  # short side -> 64, centre 32x32
    assert tuple(view(image).shape) == (3, 32, 32)
    same = Image.fromarray((torch.rand(28, 28) * 255).byte().numpy())
    assert torch.equal(CenterView(28, 1.0)(same), to_tensor(same))
