"""Streaming image-text samples from WebDataset-style tar shards (standard library only).

Why: at scale (millions of image-text pairs) a data set is a list of tar files ("shards") read
front to back, never indexed. Reading sequentially works on pipes and network filesystems, each
process and DataLoader worker reads its own shards (no file is opened twice in an epoch), and a
run resumes mid-epoch exactly where it stopped, without decoding what it skips.

Tar layout users must provide: the files of one sample are consecutive members that share a key,
the member's path up to the first dot of its basename (directories included, as webdataset does):

    000000.jpg   000000.txt   000000.cls      <- sample "000000": image, caption, optional label
    000001.png   000001.txt                      (image as .jpg/.jpeg/.png/.webp, caption UTF-8)
    part1/a.b.webp  part1/a.b.txt             <- key "part1/a", extensions "b.webp" and "b.txt"

Directories, members that are not regular files, and files whose basename starts with "." or "_"
(or has no dot) are ignored. `iter_samples` yields {"__key__", "__shard__", "<ext>": bytes} with
the extension lower-cased; turning that into a training item is the caller's `to_item`. A bad
sample carries "__error__" instead of failing the read: a member that appears twice in it, or
the tar breaking off in it (a shard cut short by a failed copy, or not a tar at all). A broken
tar ends there: the samples before the break are yielded, then the one it broke in (or an empty
one with the key "" when it broke before the first) with its "__error__".

`ShardStream` (an IterableDataset yielding whole collated batches; use DataLoader(batch_size=None)
with the default in_order=True) has these semantics, with B = per_process_batch, R = world
processes, N = DataLoader workers per process (1 when num_workers=0), W = R * N:

- batches_per_epoch = samples_per_epoch // (B * R): every process yields exactly that many
  batches per epoch whatever the shard sizes, so DDP ranks never wait on one another. An
  "epoch" is this count of batches, not one pass over the shards.
- Epoch e shuffles the shard list with a generator seeded by (seed, e); global worker
  g = rank * N + worker_id reads shards[g::W] (needs len(shards) >= W, else DataError). It reads
  them in that order and, if its batches are not done, again in a fresh order drawn from
  (seed, e, g, pass) - as often as needed. Samples go through a shuffle buffer of
  `shuffle_buffer` samples (0 or 1: no shuffling) seeded by (seed, e, g).
- The DataLoader takes batch j of the epoch from worker j % N, so worker w yields exactly
  len(range(w, batches_per_epoch, N)) batches of B consecutive samples of its (shuffled) stream.
- Sample slot p of worker g's stream (p = 0, 1, ... in the epoch) gets index p * W + g, passed
  to `to_item(sample, epoch, index)`: unique within an epoch across processes and workers, and
  the same every time (seed augmentations with it, e.g. transforms.sample_generator).
- Unreadable samples: when `to_item` raises or the sample carries "__error__" (so a shard cut
  short still gives the samples before its break), a warning names the shard and key, `skipped`
  (shared with the workers) counts it, and the slot is filled by the next sample of the stream
  that decodes, keeping the slot's index. That sample still fills its own slot too (it is seen
  twice, as ImageFiles serves the next readable image in place of a bad one). So every batch
  takes exactly B slots of the stream, whatever is corrupt, which is what makes resuming exact.
  MAX_UNREADABLE_RUN (100) unreadable samples in a row raise DataError.
- resume_at(epoch, batches): in that epoch, `batches` batches of this process were already
  trained on. Worker w then plays the part of worker (w + batches) % N of the uninterrupted run
  (so the round robin lines up) and drops that worker's first len(range(w', batches, N)) * B
  slots as raw samples - read from the tar and pushed through the shuffle buffer, never decoded -
  so the resumed loader yields exactly batches [batches:] of the uninterrupted epoch. This needs
  the same shards, seed, B, R and N as the interrupted run.
- set_epoch / resume_at write shared memory, so they reach persistent workers too; call them
  before iter(loader) (Lightning does not call a dataset's set_epoch: do it from
  on_train_epoch_start). `to_item` and `collate` must be picklable for the spawn/forkserver
  worker start methods.
"""

import collections
import itertools
import logging
import multiprocessing
import os
import re
import tarfile
from typing import Any, Callable, Deque, Iterator, List, Optional

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from sslrun.data.datasets import DataError, why_unreadable

log = logging.getLogger(__name__)

MAX_UNREADABLE_RUN = 100  # unreadable samples in a row before a run gives up
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
# Tags that keep the random streams drawn from one (seed, epoch, ...) apart.
_SHARD_ORDER, _PASS_ORDER, _BUFFER = 0, 1, 2


# ---------------------------------------------------------------------------------------- shards


def _brace_alternatives(body: str) -> List[str]:
    match = _RANGE.match(body)
    if match:
        first, last = match.groups()
        start, stop = int(first), int(last)
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if stop >= start else -1
        return [str(n).zfill(width) for n in range(start, stop + step, step)]
    if "," in body:
        return body.split(",")
    return ["{" + body + "}"]  # like the shell: "{x}" is literal


def _expand_braces(pattern: str, whole: str) -> List[str]:
    opening = pattern.find("{")
    closing = pattern.find("}", max(opening, 0))
    if "}" in pattern[:max(opening, 0)] or (opening < 0) != (closing < 0) or "{" in pattern[opening + 1:closing]:
        raise DataError(f"shard pattern {whole!r}: unbalanced or nested braces")
    if opening < 0:
        return [pattern]
    head, body, tail = pattern[:opening], pattern[opening + 1:closing], pattern[closing + 1:]
    tails = _expand_braces(tail, whole)
    return [head + choice + rest for choice in _brace_alternatives(body) for rest in tails]


def expand_shards(pattern: str) -> List[str]:
    """The shard files a pattern names, in order: brace ranges `shard-{000000..000123}.tar`
    (zero-padded when a bound has a leading zero), alternatives `{a,b}`, several braces, plain
    paths, and several such patterns joined by '::'. Raises DataError naming the pattern when it
    names no existing file, or the first missing file when only some are missing."""
    parts = [part for part in pattern.split("::") if part]
    if not parts:
        raise DataError(f"shard pattern {pattern!r}: names no file")
    shards: List[str] = []
    for part in parts:
        paths = _expand_braces(part, part)
        missing = [path for path in paths if not os.path.exists(path)]
        if len(missing) == len(paths):
            raise DataError(
                f"shard pattern {part!r}: no such file ({len(paths)} path(s), e.g. {paths[0]}, none exist)"
            )
        if missing:
            raise DataError(
                f"shard pattern {part!r}: {missing[0]} does not exist ({len(missing)} of {len(paths)} missing)"
            )
        folders = [path for path in paths if os.path.isdir(path)]
        if folders:
            raise DataError(f"shard pattern {part!r}: {folders[0]} is a directory, not a tar file")
        shards.extend(paths)
    return shards


def _split_name(name: str):
    """(key, extension) of a tar member, or None for one that is not part of a sample."""
    folder, slash, base = name.rpartition("/")
    if not base or base[0] in "._" or "." not in base:
        return None
    stem, _, extension = base.partition(".")
    return folder + slash + stem, extension.lower()


def iter_samples(path: str) -> Iterator[dict]:
    """The samples of one tar shard, read sequentially ('r|*': plain or compressed, pipes and
    network filesystems work): consecutive members with the same key make one dict
    {"__key__": key, "__shard__": path, "<ext>": bytes}, or with "__error__" for a bad sample
    (the module docstring says when)."""
    sample: Optional[dict] = None
    count = 0
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                parts = _split_name(member.name)
                if parts is None:
                    continue
                key, extension = parts
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    count += 1
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__shard__": path}
                elif extension in sample:
                    sample.setdefault("__error__", DataError(f"{member.name} appears twice"))
                    continue
                sample[extension] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        sample = sample or {"__key__": "", "__shard__": path}
        sample["__error__"] = DataError(
            f"the tar breaks off after {count} sample(s) ({type(error).__name__}: {error}), the rest of the "
            f"shard is not read: re-create it or drop it from the shard list"
        )
    if sample is not None:
        yield sample


# ---------------------------------------------------------------------------------------- stream


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def _shuffled(stream: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """A shuffle buffer over an endless stream: fill `size` samples, then emit a random one and
    put the next in its place."""
    if size <= 1:
        yield from stream
        return
    buffer: List[dict] = []
    for sample in stream:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(size))
        buffer[j], sample = sample, buffer[j]
        yield sample


class _Pending:
    __slots__ = ("sample", "bad")

    def __init__(self, sample: dict):
        self.sample, self.bad = sample, False


class ShardStream(IterableDataset):
    """Collated batches streamed from tar shards, split between processes and DataLoader workers
    (the module docstring has the exact semantics)."""

    def __init__(self, shards: List[str], per_process_batch: int, world: int, rank: int, seed: int,
                 samples_per_epoch: int, to_item: Callable[[dict, int, int], Any],
                 collate: Callable[[list], Any], shuffle_buffer: int):
        if per_process_batch < 1 or world < 1 or not 0 <= rank < world or shuffle_buffer < 0:
            raise ValueError(
                f"ShardStream: per_process_batch={per_process_batch}, world={world}, rank={rank}, "
                f"shuffle_buffer={shuffle_buffer} are not valid"
            )
        self.shards = list(shards)
        self.batch, self.world, self.rank, self.seed = per_process_batch, world, rank, seed
        self.samples_per_epoch = samples_per_epoch
        self.to_item, self.collate, self.shuffle_buffer = to_item, collate, shuffle_buffer
        if self.batches_per_epoch == 0:
            raise DataError(
                f"samples_per_epoch={samples_per_epoch} is less than one global batch "
                f"({per_process_batch} x {world} processes)"
            )
        self.check_workers(0)
        # [epoch, resume epoch, resume batches, skipped] in shared memory, so that set_epoch and
        # resume_at reach persistent workers and workers' skip counts reach this process. A
        # spawn-context lock can be inherited by forked workers and pickled to spawned ones.
        self._state = multiprocessing.get_context("spawn").Array("q", [0, -1, 0, 0])

    @property
    def batches_per_epoch(self) -> int:
        return self.samples_per_epoch // (self.batch * self.world)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def check_workers(self, num_workers: int) -> None:
        """DataError unless every process x DataLoader worker gets at least one shard."""
        workers = max(1, num_workers)
        if len(self.shards) < self.world * workers:
            raise DataError(
                f"{len(self.shards)} shard(s) cannot feed {self.world} process(es) x {workers} "
                f"DataLoader worker(s) (each reads its own shards): use more shards, or fewer "
                f"data.num_workers / processes"
            )

    def set_epoch(self, epoch: int) -> None:
        with self._state.get_lock():
            self._state[0] = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        """Make epoch `epoch` start after the first `batches` batches of this process."""
        if not 0 <= batches <= self.batches_per_epoch:
            raise ValueError(f"resume_at: {batches} batches is outside 0..{self.batches_per_epoch}")
        with self._state.get_lock():
            self._state[1], self._state[2] = epoch, batches

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    @property
    def skipped(self) -> int:
        """Unreadable samples met so far, in this process and its workers (once per epoch that
        meets them; samples dropped unread on resume are not looked at)."""
        return int(self._state[3])

    def _note_unreadable(self, sample: dict, error: Exception) -> None:
        with self._state.get_lock():
            self._state[3] += 1
        log.warning("skipping unreadable sample %s in shard %s (%s)", sample.get("__key__") or "at the start",
                    sample.get("__shard__"), why_unreadable(error))

    def worker_shards(self, epoch: int, worker: int, workers: int) -> List[str]:
        """The shards that global worker `worker` of `workers` reads first in `epoch`."""
        order = _rng(self.seed, epoch, _SHARD_ORDER).permutation(len(self.shards))
        return [self.shards[i] for i in order[worker::workers]]

    def _raw_stream(self, epoch: int, worker: int, workers: int) -> Iterator[dict]:
        """Worker `worker`'s shards read in order, then again in fresh orders, endlessly."""
        mine = self.worker_shards(epoch, worker, workers)
        for rereading in itertools.count():
            order = mine if rereading == 0 else [
                mine[i] for i in _rng(self.seed, epoch, worker, rereading, _PASS_ORDER).permutation(len(mine))
            ]
            found = False
            for shard in order:
                for sample in iter_samples(shard):
                    found = found or "__error__" not in sample
                    yield sample
            if not found:
                raise DataError(f"shards {', '.join(mine)}: no samples in them (see shards.py for the layout)")

    def _fill_slot(self, stream: Iterator[dict], pending: Deque[_Pending], epoch: int, index: int):
        """Decode the next slot's sample, or the first readable one after it (looked at, not
        taken from the stream)."""
        depth = 0
        while True:
            if depth == len(pending):
                pending.append(_Pending(next(stream)))
            candidate = pending[depth]
            if not candidate.bad:
                try:
                    if "__error__" in candidate.sample:
                        raise candidate.sample["__error__"]
                    item = self.to_item(candidate.sample, epoch, index)
                except Exception as error:  # decoders raise many types for bad data
                    candidate.bad = True
                    self._note_unreadable(candidate.sample, error)
                else:
                    pending.popleft()
                    return item
            depth += 1
            if depth >= MAX_UNREADABLE_RUN:
                raise DataError(
                    f"{depth} unreadable samples in a row (the last {candidate.sample.get('__key__')} "
                    f"in shard {candidate.sample.get('__shard__')}): check the shards and to_item"
                )

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker_id = (1, 0) if info is None else (info.num_workers, info.id)
        self.check_workers(workers)
        with self._state.get_lock():
            epoch, resume_epoch, resume_batches = self._state[0], self._state[1], self._state[2]
        done = resume_batches if resume_epoch == epoch else 0
        role = (worker_id + done) % workers  # the worker of the uninterrupted run this one continues
        world_workers = self.world * workers
        g = self.rank * workers + role
        first = len(range(role, done, workers))
        count = len(range(role, self.batches_per_epoch, workers)) - first

        stream = _shuffled(self._raw_stream(epoch, g, world_workers), self.shuffle_buffer,
                           _rng(self.seed, epoch, g, _BUFFER))
        slot = first * self.batch
        for _ in range(slot):  # resume: drop what was trained on, undecoded
            next(stream)
        pending: Deque[_Pending] = collections.deque()
        for _ in range(count):
            items = []
            for _ in range(self.batch):
                items.append(self._fill_slot(stream, pending, epoch, slot * world_workers + g))
                slot += 1
            yield self.collate(items)
