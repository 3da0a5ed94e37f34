"""Bad inputs a user meets in real data sets: each is decoded, skipped and counted, or stops the
run before training with one line that names the file or folder and the fix; never a traceback.
(How tar shards cut short or holding a bad member are read: test_shards.py.)"""

import io
import logging
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from sslrun.data.datamodule import SSLDataModule
from sslrun.data.datasets import IMAGE_MODES, CaptionFile, DataError, ImageFiles, build_splits, open_image
from tests.conftest import run_cli
from tests.data.test_data import EVAL, VIEWS, data_cfg
from tests.data.test_shards import png, write_tar


def save(image: Image.Image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def noise() -> Image.Image:
    """32 x 24 random pixels: files that do not compress away, so cutting one in half breaks its data."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))


def folder_cfg(root, channels=3):
    return data_cfg("imagefolder", root=str(root), train_dir="train", val_dir="val", channels=channels,
                    mean=[0.5] * channels, std=[0.5] * channels)


def warnings_naming(caplog, text):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# ---------------------------------------------------------------------------------- image modes


def palette_image() -> Image.Image:
    image = Image.new("P", (4, 3), 1)
    image.putpalette([0, 0, 0, 200, 30, 60] + [0] * 762)
    return image


SIXTEEN_BIT = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000  # up to 55,000 of 65,535

# name -> (image, file, RGB of pixel (x=1, y=2) after decoding)
ODD_MODES = {
    "CMYK": (Image.new("CMYK", (4, 3), (0, 255, 255, 0)), "cmyk.jpg", (255, 0, 0)),
    "I;16": (Image.fromarray(SIXTEEN_BIT), "grey16.png", (SIXTEEN_BIT[2, 1] >> 8,) * 3),
    "RGBA": (Image.new("RGBA", (4, 3), (10, 200, 10, 0)), "transparent.png", (10, 200, 10)),
    "P": (palette_image(), "palette.png", (200, 30, 60)),
}


@pytest.mark.parametrize("source_mode", sorted(ODD_MODES))
@pytest.mark.parametrize("channels", [1, 3])
def test_odd_image_modes_decode_to_the_configured_mode(tmp_path, source_mode, channels):
    image, name, rgb = ODD_MODES[source_mode]
    path = save(image, tmp_path / "train" / "things" / name)
    assert Image.open(path).mode == source_mode  # the file really is in that mode
    decoded, label = build_splits(folder_cfg(tmp_path, channels)).train[0]
    mode = IMAGE_MODES[channels]
    expected = Image.new("RGB", (1, 1), tuple(int(v) for v in rgb)).convert(mode).getpixel((0, 0))
    assert (decoded.mode, decoded.size, label) == (mode, (4, 3), 0)
    assert np.abs(np.subtract(decoded.getpixel((1, 2)), expected)).max() <= 3  # JPEG is lossy


def test_sixteen_bit_grey_keeps_its_range():
    """PIL's own convert() clips 16-bit grey at 255: all but the darkest pixels would be white."""
    buffer = io.BytesIO()
    Image.fromarray(SIXTEEN_BIT).save(buffer, format="PNG")
    assert np.asarray(open_image(buffer, "L")).tolist() == (SIXTEEN_BIT >> 8).tolist()


# ---------------------------------------------------------------------------------- unreadable files


def test_unreadable_truncated_and_empty_files_are_skipped_counted_and_named_once(tmp_path, caplog):
    cats = tmp_path / "train" / "cat"
    for i in range(3):
        save(noise(), cats / f"{i}.png")
    whole = io.BytesIO()
    noise().save(whole, format="JPEG", quality=95)
    (cats / "0b_truncated.jpg").write_bytes(whole.getvalue()[:len(whole.getvalue()) // 2])
    (cats / "0c_empty.png").write_bytes(b"")
    (cats / "0d_not_an_image.png").write_bytes(b"<html>404</html>")
    train = build_splits(folder_cfg(tmp_path)).train
    assert len(train) == 6
    with caplog.at_level(logging.WARNING, logger="sslrun.data.datasets"):
        for _ in range(2):  # two epochs: each bad file is named once
            items = [train[i] for i in range(len(train))]
    assert train.skipped == 3
    assert all(image.mode == "RGB" and image.size == (32, 24) for image, _ in items)
    for name in ("0b_truncated.jpg", "0c_empty.png", "0d_not_an_image.png"):
        assert len(warnings_naming(caplog, name)) == 1, name


def test_an_image_over_the_decompression_bomb_limit_is_skipped_and_says_why(tmp_path, monkeypatch, caplog):
    """PIL refuses images over twice Image.MAX_IMAGE_PIXELS (a small file can claim gigapixels) and
    decodes those under it, with a warning of its own; a low limit stands in for the real one."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    save(Image.new("RGB", (4, 4)), tmp_path / "train" / "a" / "0_small.png")
    save(Image.new("RGB", (12, 12)), tmp_path / "train" / "a" / "1_over_the_limit.png")  # 144 pixels: decoded
    save(Image.new("RGB", (16, 16)), tmp_path / "train" / "a" / "2_bomb.png")  # 256 > 2 x 100: refused
    train = build_splits(folder_cfg(tmp_path)).train
    with caplog.at_level(logging.WARNING, logger="sslrun.data.datasets"), \
            pytest.warns(Image.DecompressionBombWarning, match=r"\(144 pixels\) exceeds limit of 100"):
        sizes = [train[i][0].size for i in range(3)]
    assert sizes == [(4, 4), (12, 12), (4, 4)] and train.skipped == 1  # the bomb's slot: the next readable image
    [warning] = warnings_naming(caplog, "2_bomb.png")
    assert "exceeds limit of 200 pixels" in warning and "Downscale it" in warning


def test_bad_images_in_tar_shards_are_skipped_and_counted_through_the_data_module(tmp_path, monkeypatch, caplog):
    """The shard stream decodes as the folders do: a decompression bomb, a corrupt image and a tar
    cut short are skipped and counted, and the batch is full."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # the 4 x 3 pictures are 12 pixels
    bomb = io.BytesIO()
    Image.new("RGB", (8, 8)).save(bomb, format="PNG")
    members = []
    for key, image in (("a0", png(1)), ("a1", bomb.getvalue()), ("a2", b"garbage"), ("a3", png(2)), ("a4", png(3))):
        members += [(f"{key}.png", image), (f"{key}.txt", f"caption {key}".encode())]
    shard = write_tar(tmp_path / "shard-0.tar", members)
    with tarfile.open(shard) as archive:
        cut = archive.getmember("a4.png").offset_data + 10
    with open(shard, "r+b") as f:
        f.truncate(cut)
    cfg = data_cfg("webdataset", train_shards=shard, train_samples=5, shuffle_buffer=0, val_file=None,
                   image_column="image", caption_column="caption", channels=3, mean=[0.5] * 3, std=[0.5] * 3,
                   image_size=16, batch_size=5)
    module = SSLDataModule(cfg, VIEWS, EVAL, processes=1, processes_per_node=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="sslrun.data.shards"):
        [batch] = list(module.train_dataloader())  # slots: a0, a3 for a1, a3 for a2, a3, a0 for a4
    assert batch["views"][0].shape == (5, 3, 16, 16) and batch["index"].tolist() == list(range(5))
    assert module.skipped_images() == 3
    [bomb_warning] = warnings_naming(caplog, "sample a1 in shard")
    assert "exceeds limit of 40 pixels" in bomb_warning and "Downscale it" in bomb_warning
    [cut_warning] = warnings_naming(caplog, "sample a4 in shard")
    assert f"{shard} (DataError: the tar breaks off after 4 sample(s) (ReadError" in cut_warning


# ---------------------------------------------------------------------------------- CSV files


def write_csv(folder, rows, existing):
    """A CSV of `rows` (lines after the header) next to an images/ folder with the files `existing`."""
    for i, name in enumerate(existing):
        save(Image.new("RGB", (6, 5), (20 * i, 0, 0)), folder / "images" / name)
    path = folder / "pairs.csv"
    path.write_text("\n".join(["image,caption", *rows]) + "\n")
    return path


def test_csv_rows_whose_image_is_missing_are_skipped_and_counted(tmp_path, caplog):
    rows = ["images/0.png,caption 0", "images/missing-1.png,caption 1", "images/2.png", ",caption 3"]
    pairs = CaptionFile(str(write_csv(tmp_path, rows, ["0.png", "2.png"])), "image", "caption", "RGB")
    assert len(pairs) == 4
    with caplog.at_level(logging.WARNING, logger="sslrun.data.datasets"):
        for _ in range(2):
            captions = [pairs[i][2] for i in range(4)]
    # A missing row's slot gets the next readable pair, image and caption together; a short row
    # has an empty caption, a row without an image path is skipped.
    assert captions == [["caption 0"], [""], [""], ["caption 0"]]
    assert pairs.skipped == 2
    assert warnings_naming(caplog, "missing-1.png") == [
        f"skipping unreadable image {tmp_path}/images/missing-1.png (No such file or directory)"]


def test_a_csv_whose_image_paths_are_mostly_wrong_is_one_line_naming_the_fix(tmp_path):
    rows = [f"images/{'' if i == 0 else 'missing-'}{i}.png,caption {i}" for i in range(300)]
    path = write_csv(tmp_path, rows, ["0.png"])
    with pytest.raises(DataError) as error:
        CaptionFile(str(path), "image", "caption", "RGB")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: 99 of 100 rows checked name no existing file")
    assert f"first image {tmp_path}/images/missing-3.png does not exist" in message  # rows 0, 3, 6, ... checked
    assert f"relative to the file's folder {tmp_path}" in message and "fix column 'image'" in message


def test_a_csv_that_is_not_text_is_one_line(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"image,caption\n\xff\xd8\xff\xe0 a JPEG, not a CSV\n")
    with pytest.raises(DataError, match=r"pairs.csv: not a readable CSV/TSV file \(UnicodeDecodeError: .*\); "
                                        r"give UTF-8 text with a header row$"):
        CaptionFile(str(path), "image", "caption", "RGB")


# ---------------------------------------------------------------------------------- image folders


def make_classes(root, names, per_class=2):
    for c, name in enumerate(names):
        for i in range(per_class):
            save(Image.new("RGB", (6, 5), (30 * c, 10 * i, 0)), root / name / f"{i}.png")


def test_an_empty_class_folder_is_a_one_line_error_naming_it(tmp_path):
    make_classes(tmp_path / "train", ["cat", "dog"])
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "train" / "bird" / "notes.txt").write_text("no images here")
    root = re.escape(str(tmp_path))
    with pytest.raises(DataError, match=rf"^data.root={root}: {root}/train: class folder\(s\) bird hold no "
                                        rf"images \(.jpg, .*\); add images or remove the folder\(s\)$"):
        build_splits(folder_cfg(tmp_path))


def test_hidden_folders_are_not_classes(tmp_path):
    make_classes(tmp_path / "train", ["cat", "dog"])
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    splits = build_splits(folder_cfg(tmp_path))
    assert splits.train.classes == ["cat", "dog"] and splits.num_classes == 2


def test_held_out_labels_follow_the_training_classes_by_name(tmp_path):
    make_classes(tmp_path / "train", ["ant", "bee", "cat"])
    make_classes(tmp_path / "val", ["bee", "cat"], per_class=1)  # a subset: not the first two labels
    splits = build_splits(folder_cfg(tmp_path))
    assert splits.heldout.classes == ["ant", "bee", "cat"] and splits.num_classes == 3
    assert [label for _, label in splits.heldout.samples] == splits.heldout.labels.tolist() == [1, 2]
    assert [splits.heldout[i][1] for i in range(2)] == [1, 2]
    assert [path.split("/")[-2] for path, _ in splits.heldout.samples] == ["bee", "cat"]


@pytest.mark.parametrize("val_classes,named", [(["ant", "bee", "cat"], "cat"), (["cow", "emu"], "cow, emu")])
def test_held_out_classes_the_training_folder_lacks_are_a_one_line_error(tmp_path, val_classes, named):
    make_classes(tmp_path / "train", ["ant", "bee"])
    make_classes(tmp_path / "val", val_classes)
    with pytest.raises(DataError) as error:
        build_splits(folder_cfg(tmp_path))
    assert str(error.value) == (
        f"data.root={tmp_path}: {tmp_path}/val: class folder(s) {named} not in the training folder {tmp_path}/train; "
        f"the held-out split can only hold training classes: remove them here or add them there")


def test_image_files_name_at_most_five_folders(tmp_path):
    make_classes(tmp_path, ["real"])
    for i in range(7):
        (tmp_path / f"empty{i}").mkdir()
    with pytest.raises(DataError, match=r"empty0, empty1, empty2, empty3, empty4 and 2 more hold no images"):
        ImageFiles(str(tmp_path), "RGB")


def test_cli_reports_a_bad_held_out_folder_in_one_line_with_exit_code_2(tmp_path):
    make_classes(tmp_path / "data" / "train", ["ant", "bee"])
    make_classes(tmp_path / "data" / "val", ["ant", "wasp"])
    result = run_cli("data=imagefolder", f"data.root={tmp_path / 'data'}", "data.num_workers=0",
                     f"hydra.run.dir={tmp_path / 'run'}", check=False, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"error: data.root={tmp_path / 'data'}: {tmp_path / 'data'}/val: class folder(s) wasp not in the training "
        f"folder {tmp_path / 'data'}/train; the held-out split can only hold training classes: remove them here or "
        f"add them there"), output
    assert not (tmp_path / "run" / "checkpoints").exists()
