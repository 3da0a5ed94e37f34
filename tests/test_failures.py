"""Runs that fail: a non-finite loss or gradient stops the run with one line (or skips the update),
a full disk leaves the previous checkpoint whole, and summary.json says how every run ended."""

import errno
import os
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sslrun.callbacks import CollapseMonitor, NonFiniteGuard
from sslrun.distributed.checkpoint import AtomicCheckpointIO
from sslrun.eval import effective_rank
from sslrun.failures import Diverged, WriteFailed
from tests.conftest import TINY, needs_fashion_mnist, read_summary, run_cli


class _Toy(L.LightningModule):
    """A linear model whose loss is nan at the steps in `nan_at` (on the ranks in `ranks`), and whose
    gradient is inf (with a finite loss) at the steps in `inf_grad_at`."""

    def __init__(self, nan_at=(), inf_grad_at=(), ranks=None, record=None):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.nan_at, self.inf_grad_at, self.ranks, self.record = set(nan_at), set(inf_grad_at), ranks, record
        self.weights_after_step, self.momentum_updates = {}, 0
        self.skip_momentum_update = False

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        mine = self.ranks is None or self.global_rank in self.ranks
        if mine and self.global_step in self.nan_at:
            loss = loss * float("nan")
        if mine and self.global_step in self.inf_grad_at:
            shift = self.layer.bias - self.layer.bias.detach()  # 0, with d/dbias of sqrt(0) = inf
            loss = loss + shift.abs().sqrt().sum()
        return loss

    def optimizer_step(self, *args, **kwargs):  # as SSLMethod: momentum teachers follow here
        try:
            super().optimizer_step(*args, **kwargs)  # the guard runs in here, before the update
        except Diverged as stopped:
            if self.record is not None:  # what each process saw (ddp_spawn re-raises only one)
                Path(self.record, f"rank{self.global_rank}").write_text(str(stopped))
            raise
        if self.skip_momentum_update:
            self.skip_momentum_update = False
        else:
            self.momentum_updates += 1
        self.weights_after_step[self.global_step] = self.layer.weight.detach().clone()  # counted from 0

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))
        return torch.utils.data.DataLoader(data, batch_size=4)


def _fit(model, guard, steps=10, **trainer_kwargs):
    trainer = L.Trainer(max_steps=steps, callbacks=[guard], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **trainer_kwargs)
    trainer.fit(model)
    return trainer


def test_stop_policy_raises_at_the_first_non_finite_loss():
    model = _Toy(nan_at={3})
    with pytest.raises(Diverged, match=r"^train/loss became nan at step 3 \(lr 0\.1\)$"):
        _fit(model, NonFiniteGuard("stop"))
    assert sorted(model.weights_after_step) == [0, 1, 2]  # steps 0-2 updated; step 3 stopped first


def test_an_infinite_gradient_with_a_finite_loss_stops_too():
    with pytest.raises(Diverged, match=r"^the gradient norm became (inf|nan) at step 4 "):
        _fit(_Toy(inf_grad_at={4}), NonFiniteGuard("stop"))


def test_skip_policy_drops_exactly_those_updates_and_counts_them():
    guard = NonFiniteGuard("skip", max_skipped=2)
    model = _Toy(nan_at={3, 6})
    trainer = _fit(model, guard, steps=10, accumulate_grad_batches=1)
    assert trainer.global_step == 10 and guard.skipped_steps == 2
    after = model.weights_after_step
    assert torch.equal(after[3], after[2]) and torch.equal(after[6], after[5])  # steps 3 and 6: no update
    assert not torch.equal(after[4], after[3])  # the others update
    assert model.momentum_updates == 8  # the teacher does not follow a skipped step
    assert guard.unstable_since is None  # finite again since


def test_skip_policy_stops_once_its_budget_is_spent():
    guard = NonFiniteGuard("skip", max_skipped=2)
    with pytest.raises(Diverged, match=r"at step 4 .*after 2 skipped steps \(trainer.max_skipped_steps=2\)"):
        _fit(_Toy(nan_at={2, 3, 4}), guard)
    assert guard.unstable_since == 2  # the last good checkpoint is from before step 2


def test_a_nan_in_one_micro_batch_counts_for_the_whole_step():
    with pytest.raises(Diverged, match=r"at step 1 "):
        _fit(_Toy(nan_at={1}), NonFiniteGuard("stop"), accumulate_grad_batches=2)


def test_two_processes_stop_at_the_same_step_when_only_one_sees_nan(tmp_path):
    """Rank 1 alone has a nan loss at step 2: both stop there (otherwise rank 0 would go on and
    hang in the next gradient all-reduce)."""
    with pytest.raises(Exception):
        _fit(_Toy(nan_at={2}, ranks={1}, record=str(tmp_path)), NonFiniteGuard("stop"), strategy="ddp_spawn",
             devices=2)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text().startswith("train/loss became nan at step 2 "), rank


def test_monitors_take_non_finite_embeddings_without_failing():
    from sslrun.eval.pictures import colorize

    nan = torch.full((8, 4), float("nan"))
    assert torch.isnan(effective_rank(nan))  # no SVD on nan ("the algorithm failed to converge")
    assert effective_rank(torch.eye(8)) == pytest.approx(8.0, rel=1e-4)
    monitor = CollapseMonitor()
    monitor.on_train_batch_end(None, None, {"embedding": nan}, None, 0)
    assert monitor.summary() == {}  # nothing measured from a skipped step
    assert colorize(torch.tensor([[float("nan"), 1.0], [0.0, 2.0]]).numpy()).shape == (2, 2, 3)


def test_a_full_disk_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"weights": torch.ones(1000)}, path)
    original = path.read_bytes()

    def full_disk(self, checkpoint, path, storage_options=None):  # Lightning's own file write
        Path(path).write_bytes(b"partial")  # part of the file got out before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full_disk)
    with pytest.raises(WriteFailed) as failure:
        io.save_checkpoint({"weights": torch.ones(2**18)}, path)  # 1 MB of float32
    message = str(failure.value)
    assert "\n" not in message and str(path) in message and "no space left on device" in message
    assert "it needs about 1.0 MB" in message and "MB free there" in message
    assert path.read_bytes() == original and list(tmp_path.iterdir()) == [path]  # no .tmp left


def _cli(tmp_path, *extra, check=False):
    return run_cli(*TINY, "trainer.max_steps=30", "trainer.checkpoint_every_n_steps=2", "eval.every_n_epochs=0",
                   f"hydra.run.dir={tmp_path}", *extra, check=check)


def _the_one_error_line(result) -> str:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0].split("error: ", 1)[1]


@pytest.mark.slow
@needs_fashion_mnist
def test_a_diverging_run_stops_with_one_line_and_says_so_in_its_summary(tmp_path):
    result = _cli(tmp_path, "optimizer.base_lr=1e8")  # lr 8e8 at batch 64: nan within a few steps
    assert result.returncode == 1
    line = _the_one_error_line(result)
    summary = read_summary(tmp_path)
    assert summary["status"] == "diverged" and summary["reason"] == line
    step = summary["global_step"]
    assert line.startswith(f"train/loss became nan at step {step} (lr ")
    good = max(s for s in range(2, step, 2))  # written on the step grid before the first nan step
    assert f"last good checkpoint: checkpoints/step_{good:06d}.ckpt; lower optimizer.base_lr" in line
    assert summary["checkpoint"] == str(tmp_path / "checkpoints" / f"step_{good:06d}.ckpt")


@pytest.mark.slow
@needs_fashion_mnist
def test_skipped_steps_are_counted_and_no_checkpoint_is_written_while_unstable(tmp_path):
    result = _cli(tmp_path, "optimizer.base_lr=1e8", "trainer.nonfinite=skip", "trainer.max_skipped_steps=3")
    assert result.returncode == 1
    line = _the_one_error_line(result)
    summary = read_summary(tmp_path)
    assert summary["status"] == "diverged" and summary["skipped_steps"] == 3
    assert "after 3 skipped steps (trainer.max_skipped_steps=3)" in line
    first_bad = summary["global_step"] - 3
    written = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*.ckpt"))
    assert written and max(written) <= first_bad  # none while the steps were non-finite


@pytest.mark.slow
@needs_fashion_mnist
def test_a_run_that_fills_the_disk_stops_with_one_line_and_keeps_its_checkpoint(tmp_path):
    """The run dir on a 12 MB tmpfs: room for two checkpoints of the tiny model, not three."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tmpfs needs root (CI runs as root); the unit test above covers the write")
    try:
        run_dir = mount / "run"
        result = _cli(run_dir, "trainer.keep_checkpoints=-1")
        assert result.returncode == 1
        line = _the_one_error_line(result)
        assert line.startswith(f"could not write {run_dir / 'checkpoints'}/step_0") and "no space left" in line
        assert "it needs about" in line and "the previous checkpoint is intact" in line
        summary = read_summary(run_dir)
        assert summary["status"] == "failed" and summary["reason"] == line
        kept = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
        assert kept["global_step"] >= 2 and not list((run_dir / "checkpoints").glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
@needs_fashion_mnist
def test_a_run_stopped_by_a_data_error_writes_a_failed_summary(tmp_path):
    result = run_cli("data=imagefolder", f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}",
                     check=False)
    assert result.returncode == 2
    line = _the_one_error_line(result)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "failed" and summary["reason"] == line and str(tmp_path / "nowhere") in line


@pytest.mark.slow
def test_a_data_error_in_a_loader_worker_is_one_line(tmp_path):
    """Every training image unreadable: the DataLoader worker's DataError reaches the user as its
    own line, not the worker's traceback that torch wraps it in."""
    for label in ("a", "b"):
        (tmp_path / "images" / "train" / label).mkdir(parents=True)
        for index in range(4):
            (tmp_path / "images" / "train" / label / f"{index}.png").write_bytes(b"")
    result = run_cli("data=imagefolder", f"data.root={tmp_path / 'images'}", "data.batch_size=2", "data.num_workers=1",
                     "eval.enabled=false", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 2
    line = _the_one_error_line(result)
    assert line == "no readable image left in the data set", line
    assert read_summary(tmp_path / "run")["reason"] == line
