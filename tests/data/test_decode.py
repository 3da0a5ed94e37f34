"""data.decode=device makes the CPU path's batches: the same items, boxes and photometric
parameters, the same decoded pixels (grey, CMYK and PNG files too) and crops that differ only by
rounding; a corrupt JPEG is skipped and counted as on the CPU path; and it is refused where it
does not apply."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from sslrun.__main__ import check_overrides
from sslrun.data.datamodule import Captions, SSLDataModule
from sslrun.data.datasets import IMAGE_MODES, DataError, open_image, read_encoded
from sslrun.data.masking import MultiBlock, pack_masks, unpack_masks
from sslrun.data.tokenizer import Tokenizer
from sslrun.data.transforms import MultiCrop, Upscaled, sample_generator, to_tensor
from tests.conftest import read_summary, run_cli
from tests.data.test_data import EVAL, data_cfg


def view(count, size, scale):
    return {"count": count, "size": size, "scale": scale, "ratio": [0.75, 1.33], "flip_p": 0.5,
            "color_jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
            "grayscale_p": 0.2, "blur_p": 0.5, "blur_sigma": [0.1, 2.0], "solarize_p": 0.2}


MULTI_CROP = OmegaConf.create([view(2, 24, [0.3, 1.0]), view(3, 12, [0.05, 0.3])])


def photo(width, height, seed) -> Image.Image:
    """Smooth colour fields with a few hard-edged patches and grain: compresses like a photograph."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray((rng.random((height // 16 + 2, width // 16 + 2, 3)) * 255).astype(np.uint8))
    pixels = np.asarray(field.resize((width, height), Image.BICUBIC)).astype(np.float32)
    for _ in range(4):
        y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
        patch = pixels[y:y + height // 3, x:x + width // 3]
        patch[:] = patch * 0.4 + rng.random(3) * 150
    return Image.fromarray((pixels + rng.normal(0, 4, pixels.shape)).clip(0, 255).astype(np.uint8))


def make_folder(root, extra=()):
    """8 colour JPEGs of different sizes in 2 classes, a grey JPEG, a CMYK JPEG and a PNG, and `extra`
    (name, bytes) files."""
    for i in range(8):
        path = root / "train" / "ab"[i % 2] / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(40 + 9 * i, 60 - 4 * i, i).save(path, quality=90)
    photo(50, 40, 8).convert("L").save(root / "train" / "a" / "grey.jpg", quality=90)
    photo(50, 40, 9).convert("CMYK").save(root / "train" / "a" / "cmyk.jpg", quality=90)
    photo(44, 36, 10).save(root / "train" / "b" / "png.png")
    for name, content in extra:
        (root / "train" / name).write_bytes(content)


def module(root, decode, channels=3, workers=0, captions=None, upscaled=None):
    cfg = data_cfg("imagefolder", root=str(root), train_dir="train", val_dir="val", channels=channels,
                   mean=[0.5] * channels, std=[0.5] * channels, batch_size=4, num_workers=workers, decode=decode)
    return SSLDataModule(cfg, MULTI_CROP, EVAL, processes=1, processes_per_node=1, seed=3, captions=captions,
                         upscaled=upscaled)


def assert_same_crops(cpu_views, device_views):
    """Inside, the crops agree to rounding (1 level in 255); within 2 px of a border PIL's filter
    also reads pixels outside the box and torch's stops at it, so there only the mean is held (these
    crops are small: half their pixels are border pixels)."""
    for cpu, device in zip(cpu_views, device_views):
        assert cpu.shape == device.shape and device.dtype == torch.uint8
        difference = (cpu.int() - device.int()).abs()
        assert difference[..., 2:-2, 2:-2].max() <= 1
        assert difference.float().mean() < 1


@pytest.mark.parametrize("channels", [3, 1])
def test_device_decode_makes_the_cpu_paths_batches(tmp_path, channels):
    make_folder(tmp_path)
    cpu_module, device_module = module(tmp_path, "cpu", channels), module(tmp_path, "device", channels)
    train, crops = device_module.load().train, MultiCrop(MULTI_CROP)
    pairs = list(zip(cpu_module.train_dataloader(), device_module.train_dataloader()))
    assert len(pairs) == 11 // 4
    for cpu, device in pairs:
        for key in ("index", "label"):
            assert torch.equal(cpu[key], device[key])
        assert all(torch.equal(a, b) for a, b in zip(cpu["photometric"], device["photometric"]))
        expected_boxes = [crops.boxes(*train[index][0].size, sample_generator(3, 0, index))
                          for index in device["index"].tolist()]
        assert device["encoded"]["boxes"].tolist() == [[list(box) for box in boxes] for boxes in expected_boxes]
        assert_same_crops(cpu["views"], device_module.device_crops(dict(device)))
        cpu, device = cpu_module.on_after_batch_transfer(cpu, 0), device_module.on_after_batch_transfer(device, 0)
        assert set(device) == {"views", "label", "index"}
        for a, b in zip(cpu["views"], device["views"]):
            assert b.dtype == torch.float32 and (a - b).abs().mean() < 0.01  # normalised with std 0.5


def test_moving_a_batch_leaves_what_the_host_reads_on_the_host(tmp_path):
    """A data.decode=device batch moves to the device but for its files and crop boxes (read by
    DeviceCrops on the host) and its photometric parameters (read by the augmentation): read on a
    GPU, each would make the host wait for it."""
    make_folder(tmp_path)
    device_module = module(tmp_path, "device")
    batch = next(iter(device_module.train_dataloader()))
    moved = device_module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["index"].device.type == moved["label"].device.type == "meta"
    assert moved["encoded"] is batch["encoded"] and moved["photometric"] is batch["photometric"]
    assert moved.keys() == batch.keys()


@pytest.mark.parametrize("channels", [3, 1])
def test_grey_cmyk_and_png_files_decode_to_pils_pixels(tmp_path, channels):
    make_folder(tmp_path)
    mode = IMAGE_MODES[channels]
    decoder = module(tmp_path, "device", channels)
    decoder.train_dataloader()
    for name in ("a/grey.jpg", "a/cmyk.jpg", "b/png.png", "a/0.jpg"):
        path = tmp_path / "train" / name
        array, size = read_encoded(str(path), mode)
        assert array.ndim == (1 if name.endswith(".jpg") else 2 if channels == 1 else 3)  # bytes, or pixels
        [image] = decoder.device_crops.decode([array], torch.device("cpu"))
        assert size == Image.open(path).size
        assert torch.equal(image, to_tensor(open_image(path, mode))), name  # the same libjpeg-turbo, PIL's grey


def test_a_corrupt_jpeg_is_skipped_and_counted_as_on_the_cpu_path(tmp_path, caplog):
    """A JPEG cut short passes the worker's header read and fails on the device; a file that is no
    image fails in the worker. Both are replaced by the next readable file and counted once, and
    the batches are the CPU path's, whatever the number of workers."""
    whole = tmp_path / "whole.jpg"
    photo(64, 48, 11).save(whole, quality=90)
    content = whole.read_bytes()
    make_folder(tmp_path / "data", extra=[("a/0a_cut_short.jpg", content[:len(content) // 2]),
                                          ("b/0a_not_an_image.jpg", b"<html>404</html>")])
    cpu_module = module(tmp_path / "data", "cpu")
    cpu = [cpu_module.on_after_batch_transfer(batch, 0) for batch in cpu_module.train_dataloader()]
    assert cpu_module.skipped_images() == 2
    caplog.clear()
    for workers in (0, 2):
        device_module = module(tmp_path / "data", "device", workers=workers)
        with caplog.at_level(logging.WARNING, logger="sslrun.data.datasets"):
            for epoch in range(2):  # the second epoch skips them in the workers, silently
                loader = device_module.train_dataloader()
                loader.sampler.set_epoch(epoch)
                batches = [device_module.on_after_batch_transfer(batch, 0) for batch in loader]
                if epoch == 0:
                    first = batches
        assert device_module.skipped_images() == 2
        logged = [record.getMessage() for record in caplog.records]
        for name, here in (("0a_cut_short.jpg", True), ("0a_not_an_image.jpg", workers == 0)):
            assert sum(name in line for line in logged) == here  # once; a worker's log stays in the worker
        caplog.clear()
        if workers == 0:
            reference = first
        assert len(first) == len(cpu) == 13 // 4
        for batch, same, on_cpu in zip(first, reference, cpu):
            assert all(torch.equal(a, b) for a, b in zip(batch["views"], same["views"]))  # any number of workers
            assert torch.equal(batch["label"], on_cpu["label"]) and torch.equal(batch["index"], on_cpu["index"])
            assert all((a - b).abs().mean() < 0.01 for a, b in zip(batch["views"], on_cpu["views"]))


def test_masks_are_drawn_in_the_workers_from_each_images_stream_on_both_decode_paths(tmp_path):
    """A method's per-image masks (I-JEPA's) come in the batch, packed: each image's are
    `MultiBlock` drawn first from its (seed, epoch, index) stream, in the batch's order, the same
    on both decode paths and any number of workers, and an unreadable file's replacement keeps
    them (drawn first, they do not depend on the image's size, which a crop's draws do)."""
    photo(64, 48, 11).save(tmp_path / "whole.jpg", quality=90)
    content = (tmp_path / "whole.jpg").read_bytes()
    make_folder(tmp_path / "data", extra=[("a/0a_cut_short.jpg", content[:len(content) // 2])])
    rule = MultiBlock((4, 4), 2, (0.15, 0.25), (0.75, 1.5), (0.85, 1.0))
    loaders = []
    for decode, workers in (("cpu", 0), ("device", 0), ("device", 2)):
        data = module(tmp_path / "data", decode, workers=workers)
        data.sample_masks = rule
        loaders.append([data.on_after_batch_transfer(batch, 0) for batch in data.train_dataloader()])
    assert len(loaders[0]) == 12 // 4
    for cpu, *device in zip(*loaders):
        assert set(cpu) == {"views", "label", "index", "masks"}
        expected = [rule(sample_generator(3, 0, index)) for index in cpu["index"].tolist()]
        assert pack_masks(expected).keys() == cpu["masks"].keys()
        for batch in (cpu, *device):
            assert torch.equal(batch["index"], cpu["index"])
            got = unpack_masks(batch["masks"])
            assert len(got) == 4 and len({len(mask.context) for mask in got + expected}) > 1
            for mine, theirs in zip(got, expected):
                assert torch.equal(mine.context, theirs.context)
                assert all(torch.equal(a, b) for a, b in zip(mine.targets, theirs.targets))


@pytest.mark.slow
def test_a_run_trains_with_decode_device(tmp_path):
    """Through Lightning's batch transfer (the bytes stay on the CPU, where decode_jpeg reads them)
    and a loader worker: the run completes and counts the JPEG cut short."""
    photo(64, 48, 11).save(tmp_path / "whole.jpg", quality=90)
    content = (tmp_path / "whole.jpg").read_bytes()
    make_folder(tmp_path / "data", extra=[("a/0a_cut_short.jpg", content[:len(content) // 2])])
    run_cli("data=imagefolder", f"data.root={tmp_path / 'data'}", "data.decode=device", "data.image_size=32",
            "data.batch_size=4", "data.num_workers=1", "backbone.timm_kwargs={channels:[8,16,32,64]}",
            "method.projector.hidden_dim=64", "method.projector.out_dim=32", "eval.enabled=false",
            "trainer.max_steps=6", "trainer.progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "completed" and summary["skipped_images"] == 1, summary


def test_decode_device_is_checked_up_front(tmp_path):
    wrong = check_overrides(["data.decode=device"])  # the default data set, Fashion-MNIST
    assert wrong == ("data.decode=device: only data=imagefolder decodes on the device (JPEG files); "
                     "data=fashion_mnist needs data.decode=cpu")
    assert check_overrides(["data=imagefolder", "data.root=/x", "data.decode=gpu"]) == \
        "data.decode=gpu: choose one of: cpu, device"
    assert check_overrides(["data=imagefolder", "data.root=/x", "data.decode=device"]) is None
    make_folder(tmp_path)
    with pytest.raises(DataError, match="image-text methods decode on the CPU; use data.decode=cpu"):
        module(tmp_path, "device", captions=Captions(Tokenizer(8), ["a photo of a {}."])).load()


def test_upscaled_copies_are_the_global_crops_cut_again_at_a_higher_resolution(tmp_path):
    """A method's upscaled_crops (DINOv3's Gram teacher): the global crops cut a second time from
    the same boxes of the source image at 2x their size, with their crop's photometric parameters
    and its blur scaled, on both decode paths. The recipe's views stay what they are without them,
    and a copy brought back to its crop's size is that crop's view."""
    make_folder(tmp_path)
    upscaled = Upscaled(crops=2, factor=2)
    plain, cpu_module, device_module = (module(tmp_path, "cpu"), module(tmp_path, "cpu", upscaled=upscaled),
                                        module(tmp_path, "device", upscaled=upscaled))
    for reference, cpu, device in zip(*(m.train_dataloader() for m in (plain, cpu_module, device_module))):
        assert [tuple(v.shape[-2:]) for v in cpu["views"]] == [(24, 24)] * 2 + [(12, 12)] * 3 + [(48, 48)] * 2
        assert all(torch.equal(a, b) for a, b in zip(reference["views"], cpu["views"][:5]))
        assert all(torch.equal(a, b) for a, b in zip(reference["photometric"], cpu["photometric"][:5]))
        assert all(torch.equal(a, b) for a, b in zip(cpu["photometric"][5:], cpu["photometric"][:2]))
        assert_same_crops(cpu["views"], device_module.device_crops(dict(device)))
        reference = plain.on_after_batch_transfer(reference, 0)
        cpu = cpu_module.on_after_batch_transfer(cpu, 0)
        assert all(torch.equal(a, b) for a, b in zip(reference["views"], cpu["views"]))
        for batch in (cpu, device_module.on_after_batch_transfer(device, 0)):
            assert set(batch) == {"views", "upscaled_views", "label", "index"} and len(batch["views"]) == 5
            for view, copy in zip(batch["views"][:2], batch["upscaled_views"]):
                assert copy.shape[-1] == 2 * view.shape[-1]
                # the same augmented view at twice the resolution (2 px of border aside, as above)
                down = F.interpolate(copy, size=view.shape[-2:], mode="bilinear", antialias=True)
                difference = (down - view).abs()[..., 2:-2, 2:-2]
                assert difference.mean() < 0.05, difference.mean()
