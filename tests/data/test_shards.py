"""Tar-shard streaming: brace patterns, sample grouping, the split between processes and workers,
determinism, exact mid-epoch resume, and corrupt samples."""

import io
import logging
import tarfile

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sslrun.data.datasets import DataError
from sslrun.data.shards import ShardStream, expand_shards, iter_samples


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (value % 256, 7, 9)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path, members):
    """members: (name, bytes) in order."""
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


def write_shards(folder, shards: int, per_shard: int, corrupt=()):
    """`shards` tars of `per_shard` samples, keys s{shard}_{i}: a PNG (garbage for keys in
    `corrupt`) and a caption."""
    paths = []
    for s in range(shards):
        members = []
        for i in range(per_shard):
            key = f"s{s}_{i:02d}"
            image = b"not a png" if key in corrupt else png(s * per_shard + i)
            members += [(f"{key}.png", image), (f"{key}.txt", f"caption {key}".encode())]
        paths.append(write_tar(folder / f"shard-{s:03d}.tar", members))
    return paths


def to_item(sample, epoch, index):
    with Image.open(io.BytesIO(sample["png"])) as image:
        image.load()
        assert image.size == (4, 3)
    return sample["__key__"], sample["txt"].decode(), epoch, index


def collate(items):
    keys, captions, epochs, indices = zip(*items)
    return {"key": list(keys), "caption": list(captions), "epoch": list(epochs),
            "index": torch.tensor(indices)}


def stream(shards, batch=3, world=1, rank=0, seed=0, samples=None, buffer=0, decode=to_item):
    return ShardStream(shards, batch, world, rank, seed, samples or 3 * batch * world, decode, collate, buffer)


def run_epoch(dataset, workers=0, epoch=0, resume=None):
    dataset.set_epoch(epoch)
    if resume is not None:
        dataset.resume_at(epoch, resume)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        multiprocessing_context="fork" if workers else None)
    return [(b["key"], b["caption"], b["epoch"], b["index"].tolist()) for b in loader]


# ---------------------------------------------------------------------------------- patterns


def test_brace_expansion(tmp_path):
    names = [f"shard-{i:06d}.tar" for i in range(12)] + ["a-x.tar", "a-y.tar", "b-1.tar", "b-2.tar", "c7.tar"]
    for name in names:
        (tmp_path / name).touch()
    root = str(tmp_path)
    assert expand_shards(f"{root}/shard-{{000000..000011}}.tar") == [f"{root}/{n}" for n in names[:12]]
    assert expand_shards(f"{root}/shard-{{000009..000010}}.tar") == [
        f"{root}/shard-000009.tar", f"{root}/shard-000010.tar"]
    assert expand_shards(f"{root}/a-{{x,y}}.tar") == [f"{root}/a-x.tar", f"{root}/a-y.tar"]
    assert expand_shards(f"{root}/{{a-x,b-1}}.tar::{root}/b-{{1..2}}.tar::{root}/c7.tar") == [
        f"{root}/a-x.tar", f"{root}/b-1.tar", f"{root}/b-1.tar", f"{root}/b-2.tar", f"{root}/c7.tar"]
    assert expand_shards(f"{root}/c7.tar") == [f"{root}/c7.tar"]
    # several braces: the cartesian product, in order
    for name in ("p0q1.tar", "p0q2.tar", "p1q1.tar", "p1q2.tar"):
        (tmp_path / name).touch()
    assert [p[len(root) + 1:] for p in expand_shards(f"{root}/p{{0..1}}q{{1,2}}.tar")] == [
        "p0q1.tar", "p0q2.tar", "p1q1.tar", "p1q2.tar"]


def test_pattern_errors_name_the_pattern_or_the_missing_file(tmp_path):
    (tmp_path / "shard-000.tar").touch()
    (tmp_path / "shard-002.tar").touch()
    pattern = f"{tmp_path}/nothing-{{000..003}}.tar"
    with pytest.raises(DataError, match="nothing-{000..003}.tar.*none exist"):
        expand_shards(pattern)
    with pytest.raises(DataError, match=r"shard-001.tar does not exist \(2 of 4 missing\)"):
        expand_shards(f"{tmp_path}/shard-{{000..003}}.tar")
    with pytest.raises(DataError, match="other.tar"):
        expand_shards(f"{tmp_path}/shard-000.tar::{tmp_path}/other.tar")
    with pytest.raises(DataError, match="unbalanced"):
        expand_shards(f"{tmp_path}/shard-{{000..003.tar")


# ---------------------------------------------------------------------------------- samples


def test_iter_samples_groups_members_by_key(tmp_path):
    path = write_tar(tmp_path / "a.tar", [
        ("000.jpg", b"i0"), ("000.txt", b"t0"), ("000.cls", b"3"),
        ("dir.v2/img.01.JPG", b"i1"), ("dir.v2/img.01.txt", b"t1"),
        ("dir.v2/img.02.webp", b"i2"),
        ("._000.jpg", b"mac junk"), ("__meta__.json", b"{}"), ("README", b"no dot"),
        ("001.png", b"i3"), ("001.txt", b"t3"),
    ])
    with tarfile.open(path, "a") as archive:  # a directory member is ignored too
        info = tarfile.TarInfo("folder")
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
    samples = list(iter_samples(path))
    assert samples == [
        {"__key__": "000", "__shard__": path, "jpg": b"i0", "txt": b"t0", "cls": b"3"},
        {"__key__": "dir.v2/img", "__shard__": path, "01.jpg": b"i1", "01.txt": b"t1", "02.webp": b"i2"},
        {"__key__": "001", "__shard__": path, "png": b"i3", "txt": b"t3"},
    ]


def cut_in(path, member: str, into: int = 10) -> str:
    """Truncate a tar `into` bytes into `member`'s data, as a copy that failed midway leaves it."""
    with tarfile.open(path) as archive:
        end = archive.getmember(member).offset_data + into
    with open(path, "r+b") as f:
        f.truncate(end)
    return path


def test_a_shard_cut_short_gives_the_samples_before_the_break(tmp_path):
    path = cut_in(write_shards(tmp_path, 1, 4)[0], "s0_02.png")
    samples = list(iter_samples(path))
    assert [s["__key__"] for s in samples] == ["s0_00", "s0_01", "s0_02"]
    for i, sample in enumerate(samples[:2]):
        assert set(sample) == {"__key__", "__shard__", "png", "txt"} and sample["png"] == png(i)
    assert str(samples[2]["__error__"]) == (
        "the tar breaks off after 2 sample(s) (ReadError: unexpected end of data), the rest of the shard is not "
        "read: re-create it or drop it from the shard list")


@pytest.mark.parametrize("content", [b"", b"not a tar file " * 100])
def test_a_shard_that_is_not_a_tar_gives_one_bad_sample(tmp_path, content):
    path = tmp_path / "shard.tar"
    path.write_bytes(content)
    [sample] = list(iter_samples(str(path)))
    assert (sample["__key__"], sample["__shard__"]) == ("", str(path))
    assert str(sample["__error__"]).startswith("the tar breaks off after 0 sample(s) (ReadError: ")
    with pytest.raises(DataError, match="shard.tar: no samples in them"):  # not 100 bad samples in a row
        run_epoch(stream([str(path)]))


def test_a_member_twice_in_a_sample_makes_it_bad(tmp_path):
    path = write_tar(tmp_path / "a.tar", [("000.png", b"i0"), ("000.png", b"again"), ("000.txt", b"t0"),
                                          ("001.png", b"i1"), ("001.txt", b"t1")])
    first, second = iter_samples(path)
    assert str(first["__error__"]) == "000.png appears twice" and first["png"] == b"i0" and first["txt"] == b"t0"
    assert second == {"__key__": "001", "__shard__": path, "png": b"i1", "txt": b"t1"}


# ---------------------------------------------------------------------------------- stream


def test_two_ranks_two_workers_see_every_sample_once(tmp_path):
    shards = write_shards(tmp_path, 4, 6)
    per_rank = [run_epoch(stream(shards, batch=3, world=2, rank=r, samples=24), workers=2) for r in (0, 1)]
    assert [len(batches) for batches in per_rank] == [4, 4]
    keys = [k for batches in per_rank for b in batches for k in b[0]]
    assert sorted(keys) == sorted(f"s{s}_{i:02d}" for s in range(4) for i in range(6))
    indices = [i for batches in per_rank for b in batches for i in b[3]]
    assert sorted(indices) == list(range(24))
    for batches in per_rank:  # no shuffle buffer: each batch is consecutive samples of one shard
        for key_list, captions, epochs, _ in batches:
            assert len({k.split("_")[0] for k in key_list}) == 1
            assert captions == [f"caption {k}" for k in key_list] and epochs == [0, 0, 0]


def test_same_seed_same_batches_and_epochs_differ(tmp_path):
    shards = write_shards(tmp_path, 2, 5)
    first = run_epoch(stream(shards, samples=12, buffer=4, seed=3))
    assert len(first) == 4  # 12 samples from 10: the worker reads its shards again
    assert first == run_epoch(stream(shards, samples=12, buffer=4, seed=3))
    assert [b[0] for b in first] != [b[0] for b in run_epoch(stream(shards, samples=12, buffer=4, seed=3), epoch=1)]
    assert [b[0] for b in first] != [b[0] for b in run_epoch(stream(shards, samples=12, buffer=4, seed=4))]


class CountingDecode:
    def __init__(self):
        self.calls = 0

    def __call__(self, sample, epoch, index):
        self.calls += 1
        return to_item(sample, epoch, index)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_the_rest_of_the_epoch(tmp_path, workers):
    shards = write_shards(tmp_path, 4, 5, corrupt={"s1_02", "s2_04"})
    samples = 2 * 7 * 2  # 7 batches of 2 per process, 2 processes
    whole = run_epoch(stream(shards, batch=2, world=2, rank=1, samples=samples, buffer=4, seed=5),
                      workers=workers, epoch=2)
    assert len(whole) == 7
    for k in (1, 3, 4, 7):
        decode = CountingDecode()
        resumed = stream(shards, batch=2, world=2, rank=1, samples=samples, buffer=4, seed=5, decode=decode)
        assert run_epoch(resumed, workers=workers, epoch=2, resume=k) == whole[k:]
        if workers == 0:  # what was skipped was not decoded (corrupt samples cost one extra call each)
            assert (7 - k) * 2 <= decode.calls <= (7 - k) * 2 + 4
    # resume applies to its own epoch only
    other = stream(shards, batch=2, world=2, rank=1, samples=samples, buffer=4, seed=5)
    other.resume_at(1, 3)
    assert run_epoch(other, workers=workers, epoch=2) == whole


def test_persistent_workers_follow_set_epoch(tmp_path):
    shards = write_shards(tmp_path, 2, 4)
    dataset = stream(shards, batch=2, samples=8, buffer=3, seed=1)
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork",
                        persistent_workers=True)
    seen = []
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        seen.append([(b["key"], b["epoch"]) for b in loader])
    for epoch in (0, 1):
        fresh = run_epoch(stream(shards, batch=2, samples=8, buffer=3, seed=1), workers=2, epoch=epoch)
        assert seen[epoch] == [(b[0], b[2]) for b in fresh]


def test_corrupt_image_is_skipped_with_a_warning(tmp_path, caplog):
    shards = write_shards(tmp_path, 2, 4, corrupt={"s0_01"})
    dataset = stream(shards, batch=2, samples=8)
    with caplog.at_level(logging.WARNING, logger="sslrun.data.shards"):
        batches = run_epoch(dataset)
    assert len(batches) == dataset.batches_per_epoch == 4
    keys = [k for b in batches for k in b[0]]
    assert "s0_01" not in keys and keys.count("s0_02") == 2  # the next sample fills the bad one's slot
    assert sorted(i for b in batches for i in b[3]) == list(range(8))
    assert dataset.skipped == 1
    assert [r.getMessage() for r in caplog.records if "s0_01" in r.getMessage() and "shard-000.tar" in r.getMessage()]

    # counted across DataLoader workers too
    dataset = stream(shards, batch=2, samples=8)
    assert len(run_epoch(dataset, workers=2)) == 4 and dataset.skipped == 1


def test_a_cut_short_shard_and_a_bad_member_are_skipped_counted_and_named(tmp_path, caplog):
    cut = cut_in(write_shards(tmp_path, 1, 4)[0], "s0_02.png")  # s0_00, s0_01 readable
    doubled = write_tar(tmp_path / "shard-001.tar", [
        (name, data) for i in range(4) for name, data in
        [(f"s1_{i:02d}.png", png(10 + i)), (f"s1_{i:02d}.txt", b"caption")] * (2 if i == 1 else 1)])
    dataset = stream([cut, doubled], batch=1, samples=7)  # one pass: 7 samples, 2 of them bad
    with caplog.at_level(logging.WARNING, logger="sslrun.data.shards"):
        batches = run_epoch(dataset)
    keys = [k for b in batches for k in b[0]]
    assert len(keys) == 7 and set(keys) == {"s0_00", "s0_01", "s1_00", "s1_02", "s1_03"}
    assert dataset.skipped == 2
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "s0_02 in shard" in m and cut in m and "breaks off after 2 sample(s)" in m]
    assert [m for m in messages if "s1_01 in shard" in m and doubled in m and "s1_01.png appears twice" in m]
    assert len(messages) == 2


def test_too_few_shards_for_processes_and_workers(tmp_path):
    shards = write_shards(tmp_path, 3, 2)
    with pytest.raises(DataError, match="more shards, or fewer data.num_workers / processes"):
        stream(shards, world=4)
    dataset = stream(shards, batch=1, world=2, rank=1)
    with pytest.raises(DataError, match="3 shard.*2 process.*2 DataLoader worker"):
        dataset.check_workers(2)
    with pytest.raises(DataError, match="more shards, or fewer data.num_workers / processes"):
        run_epoch(dataset, workers=2)
    with pytest.raises(DataError, match="less than one global batch"):
        stream(shards, batch=4, world=2, samples=7)
