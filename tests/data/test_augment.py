"""Batched photometric ops == torchvision's per-image ops; crops have the recipe's shapes."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from omegaconf import OmegaConf
from PIL import Image

from sslrun.data import augment as A
from sslrun.data.transforms import (CenterView, MultiCrop, Upscaled, random_resized_crop_box, sample_generator,
                                   to_tensor)


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


def test_hue_matches_torchvision_on_greys_ties_and_every_sector():
    """The closed-form hue rotation against torchvision's HSV round trip: random pixels, grey ones
    (no hue), ties between the largest channels, pure and saturated colours, and shifts that wrap
    through every sector in both directions; a zero shift gives the image back."""
    x = torch.rand(24, 3, 9, 9, generator=torch.Generator().manual_seed(3))
    x[:, :, 0] = x[:, :1, 0]  # grey rows
    x[:, 1, 1] = x[:, 0, 1]  # R == G ties
    x[:, 2, 2] = x[:, 1, 2]  # G == B ties
    x[:, :, 3, :6] = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]]).T.float()
    x[:, :, 4, 0], x[:, :, 4, 1] = 0.0, 1.0  # black and white
    shifts = torch.linspace(-0.5, 0.5, 24)
    assert torch.allclose(A.adjust_hue(x, shifts), per_image(TF.adjust_hue, x, shifts), atol=1e-5)
    assert torch.allclose(A.adjust_hue(x, torch.zeros(24)), x, atol=1e-6)


def test_blur_matches_torchvision_per_image_sigma():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.5, 1.0, 2.0])
    expected = torch.stack([TF.gaussian_blur(img, [7, 7], [float(s), float(s)]) for img, s in zip(x, sigma)])
    assert torch.allclose(A.gaussian_blur(x, sigma, 7), expected, atol=1e-5)


def test_blur_kernel_has_no_subnormal_weights_and_sums_to_one():
    """Subnormal floats in the kernel slow every product they enter several times on CPUs: the
    kernel zeroes tails below 1e-12 (invisible in float32 on [0, 1] pixels) and still sums to 1."""
    sigma = torch.linspace(0.1, 2.0, 1901)
    kernel = A.gaussian_kernel(sigma, 6)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((kernel > 0) & (kernel < tiny)).any()
    assert torch.allclose(kernel.sum(dim=1), torch.ones(1901), atol=1e-6)
    unclipped = torch.exp(-0.5 * (torch.arange(-6.0, 7.0)[None] / sigma[:, None]) ** 2)
    assert ((unclipped > 0) & (unclipped < tiny)).any()  # without the clip there are some


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
    params = drawn(augment, 6)
    out = augment(crops, params)
    assert [o.shape for o in out] == [c.shape for c in crops]
    assert all(o.dtype == torch.float32 for o in out)
    assert all(o.min() >= -2.0 - 1e-6 and o.max() <= 2.0 + 1e-6 for o in out)  # (x - 0.5) / 0.25, x in [0,1]


def test_identity_recipe_only_normalises():
    plain = spec(color_jitter={"p": 0.0, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
                 grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, count=1)
    augment = A.PhotometricAugment([plain], mean=[0.1], std=[0.5])
    crops = [torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8)]
    assert torch.allclose(augment(crops, drawn(augment, 2))[0], (crops[0].float() / 255 - 0.1) / 0.5)


def drawn(augment, batch, seed=0):
    """Parameters of `batch` images for every crop of the recipe, as the workers draw them."""
    per_image = [augment.draw(sample_generator(seed, 0, i)) for i in range(batch)]
    return [torch.stack(crop) for crop in zip(*per_image)]


def test_batched_augment_applies_each_images_parameters_in_its_own_order(rgb):
    """The batched jitter equals torchvision's ops applied per image, in each image's drawn order,
    with the drawn factors; greyscale and solarize where drawn."""
    recipe = spec(count=1, blur_p=0.0, grayscale_p=0.5, solarize_p=0.5,
                  color_jitter={"p": 0.9, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1})
    augment = A.PhotometricAugment([recipe], mean=[0.0] * 3, std=[1.0] * 3)
    params = drawn(augment, 4, seed=3)[0]
    assert len({tuple(p[A.ORDER].tolist()) for p in params}) > 1  # orders differ between images
    got = augment.augment(rgb, recipe, params)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    columns = [A.BRIGHTNESS, A.CONTRAST, A.SATURATION, A.HUE]
    for image, p, out in zip(rgb, params, got):
        expected = image
        if p[A.JITTER]:
            for op in p[A.ORDER].long().tolist():
                expected = ops[op](expected, float(p[columns[op]]))
        if p[A.GREY]:
            expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
        if p[A.SOLARIZE]:
            expected = TF.solarize(expected, 0.5)
        assert torch.allclose(out, expected, atol=1e-5)


def test_augment_chooses_each_ops_images_on_the_host_never_reading_the_device():
    """Each op's images are chosen from host parameters: with the crops on the meta device, whose
    values cannot be read, a recipe with every op still runs. A read of device values on the host
    would raise here; on CUDA it would wait for the device (a sync, hundreds per step)."""
    augment = A.PhotometricAugment([spec(count=1, color_jitter={"p": 1.0, "brightness": 0.4, "contrast": 0.4,
                                                         "saturation": 0.2, "hue": 0.1}, grayscale_p=0.5,
                                         blur_p=0.5, solarize_p=0.5)], [0.5] * 3, [0.25] * 3)
    generator = torch.Generator().manual_seed(0)
    params = [torch.stack([augment.draw(generator)[0] for _ in range(8)])]
    views = augment([torch.empty(8, 3, 16, 16, dtype=torch.uint8, device="meta")], params)
    assert views[0].device.type == "meta" and views[0].shape == (8, 3, 16, 16)
    assert (params[0][:, A.GREY] > 0).any() and (params[0][:, A.BLUR] > 0).any() and (params[0][:, A.SOLARIZE] > 0).any()


def test_datamodule_keeps_the_photometric_parameters_on_the_host(tmp_path):
    """The DataModule moves a batch as Lightning does, except its photometric parameters, which the
    augmentation reads on the host."""
    from sslrun.config import compose
    from sslrun.data.datamodule import SSLDataModule

    cfg = compose(["method=simclr", "data.num_workers=0", "data.batch_size=8"])
    module = SSLDataModule(cfg.data, cfg.augmentation.views, cfg.eval, 1, 1, cfg.seed)
    batch = next(iter(module.train_dataloader()))
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert {view.device.type for view in moved["views"]} == {"meta"} and moved["index"].device.type == "meta"
    assert all(p is q for p, q in zip(moved["photometric"], batch["photometric"]))
    assert "photometric" in batch and moved.keys() == batch.keys()


def test_drawn_parameters_follow_the_recipe():
    recipe = spec(count=1, blur_sigma=[0.5, 1.5],
                  color_jitter={"p": 0.8, "brightness": 0.4, "contrast": 0.2, "saturation": 0.0, "hue": 0.1})
    params = torch.stack([A.draw_photometric(recipe, sample_generator(0, 0, i)) for i in range(4000)])
    assert params[:, A.JITTER].mean() == pytest.approx(0.8, abs=0.03)
    assert params[:, A.GREY].mean() == pytest.approx(0.2, abs=0.03)
    assert params[:, A.BLUR].mean() == pytest.approx(0.5, abs=0.03)
    assert params[:, A.SOLARIZE].mean() == pytest.approx(0.2, abs=0.03)
    assert 0.6 <= params[:, A.BRIGHTNESS].min() and params[:, A.BRIGHTNESS].max() <= 1.4
    assert 0.8 <= params[:, A.CONTRAST].min() and params[:, A.CONTRAST].max() <= 1.2
    assert (params[:, A.SATURATION] == 1.0).all()
    assert params[:, A.HUE].abs().max() <= 0.1 and params[:, A.HUE].std() > 0.05
    assert 0.5 <= params[:, A.SIGMA].min() and params[:, A.SIGMA].max() <= 1.5
    assert (params[:, A.ORDER].sort(dim=1).values == torch.arange(4.0)).all()  # a permutation each


def test_an_images_views_depend_only_on_seed_epoch_and_index():
    image = Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy())
    crops = MultiCrop([spec(count=3, size=8)])
    first, again = crops(image, sample_generator(5, 2, 17)), crops(image, sample_generator(5, 2, 17))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for other in (sample_generator(5, 3, 17), sample_generator(5, 2, 18), sample_generator(6, 2, 17)):
        assert not all(torch.equal(a, b) for a, b in zip(first, crops(image, other)))


def test_random_resized_crop_box_follows_scale_and_ratio():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        top, left, h, w = random_resized_crop_box(40, 30, (0.2, 0.6), (0.75, 1.33), generator)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40
        assert 0.2 * 1200 * 0.9 <= h * w <= 0.6 * 1200 * 1.1 and 0.7 <= w / h <= 1.4
    assert random_resized_crop_box(10, 100, (0.9, 1.0), (1.0, 1.0), generator) == (45, 0, 10, 10)  # fallback


def test_multicrop_makes_every_crop_of_the_recipe():
    image = Image.fromarray((torch.rand(40, 30, 3) * 255).byte().numpy())
    crops = MultiCrop([spec(count=2, size=16), spec(count=4, size=6)])(image, sample_generator(0, 0, 0))
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 6, 6)] * 4
    assert all(c.dtype == torch.uint8 for c in crops)


def test_full_scale_crop_without_flip_is_the_image():
    image = Image.fromarray((torch.rand(9, 9) * 255).byte().numpy())
    generator = sample_generator(0, 0, 0)
    crop = MultiCrop([spec(count=1, size=9, scale=[1.0, 1.0], ratio=[1.0, 1.0], flip_p=0.0)])(image, generator)[0]
    assert torch.equal(crop, to_tensor(image))
    flipped = MultiCrop([spec(count=1, size=9, scale=[1.0, 1.0], ratio=[1.0, 1.0], flip_p=1.0)])(image, generator)[0]
    assert torch.equal(flipped, to_tensor(image).flip(-1))


def test_center_view_resizes_and_crops():
    image = Image.fromarray((torch.rand(60, 80, 3) * 255).byte().numpy())
    view = CenterView(size=32, crop_fraction=0.5)  # short side -> 64, centre 32x32
    assert tuple(view(image).shape) == (3, 32, 32)
    same = Image.fromarray((torch.rand(28, 28) * 255).byte().numpy())
    assert torch.equal(CenterView(28, 1.0)(same), to_tensor(same))


def test_an_upscaled_copy_gets_its_crops_parameters_and_a_blur_scaled_with_it():
    """PhotometricAugment with transforms.Upscaled: the recipe's draws are unchanged, each copy
    takes its crop's parameters, and its blur sigma (in pixels) grows with its size, so a copy at
    2x brought back to the crop's size is the crop's blurred view (an unscaled sigma is not)."""
    blur_only = spec(count=1, size=16, color_jitter={"p": 0.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0,
                                                     "hue": 0.0}, grayscale_p=0.0, blur_p=1.0, blur_sigma=[1.5, 2.0],
                     solarize_p=0.0)
    views = [blur_only, spec(count=2, size=8)]
    plain = A.PhotometricAugment(views, mean=[0.0] * 3, std=[1.0] * 3)
    upscaled = A.PhotometricAugment(views, mean=[0.0] * 3, std=[1.0] * 3, upscaled=Upscaled(crops=1, factor=2))
    params = upscaled.draw(torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(plain.draw(torch.Generator().manual_seed(4)), params[:3]))
    assert len(params) == 4 and torch.equal(params[3], params[0])
    # a smooth image at 32 px and the same image at 16 px
    y, x = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    large = torch.stack([torch.sin(6 * x) * 0.5 + 0.5, y, (x * y)]).expand(2, 3, 32, 32)
    step = torch.zeros(2, 3, 32, 32)
    step[..., 12:20, 12:20] = 1.0  # and a square: what the blur changes
    large = (0.3 * large + 0.7 * step).clamp(0, 1)
    small = F.interpolate(large, size=(16, 16), mode="area")
    batch = [torch.stack([p] * 2) for p in params]
    to_uint8 = lambda t: (t * 255).round().to(torch.uint8)  # noqa: E731
    crops = [to_uint8(small), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
             to_uint8(large)]
    out = upscaled(crops, batch)
    assert [tuple(v.shape[-2:]) for v in out] == [(16, 16), (8, 8), (8, 8), (32, 32)]
    inside = (..., slice(3, -3), slice(3, -3))  # the borders' padding differs with the size
    back = F.interpolate(out[3], size=(16, 16), mode="area")
    assert (back - out[0]).abs()[inside].max() < 0.03
    unscaled = F.interpolate(A.PhotometricAugment.augment(large, upscaled.specs[3], batch[3]), size=(16, 16),
                             mode="area")
    assert (unscaled - out[0]).abs()[inside].max() > 0.1
