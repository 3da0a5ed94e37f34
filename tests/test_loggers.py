import pytest

from sslrun.tracking import wandb_key_available as _wandb_key_available


def test_wandb_goes_offline_exactly_when_no_key_is_available(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not _wandb_key_available()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert _wandb_key_available()
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "abc")
    assert _wandb_key_available()


def test_csv_metrics_continue_across_a_resume(tmp_path):
    """A resumed run keeps the rows before its first step and replaces those the interrupted run
    logged past its checkpoint (Lightning's own CSV logger deletes the file)."""
    import csv

    from sslrun.tracking import ResumableCSVLogger

    first = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    for step in range(10):
        first.log_metrics({"train/loss": 10.0 - step}, step=step)
    first.log_metrics({"eval/knn_top1": 0.5}, step=9)
    first.save()
    resumed = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")  # checkpoint at step 6
    for step in range(6, 12):
        resumed.log_metrics({"train/loss": 1.0 + step, "lr": 0.1}, step=step)
    resumed.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["step"]) for r in rows] == list(range(12))
    assert [float(r["train/loss"]) for r in rows] == [10.0 - s for s in range(6)] + [1.0 + s for s in range(6, 12)]
    assert set(rows[0]) == {"step", "train/loss", "lr", "eval/knn_top1"}  # old and new columns
    assert all(r["eval/knn_top1"] == "" for r in rows)  # logged at step 9, past the checkpoint: dropped
    fresh = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")  # resume=null: from step 0
    fresh.log_metrics({"train/loss": 3.0}, step=0)
    fresh.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as file:
        assert [(r["step"], r["train/loss"]) for r in csv.DictReader(file)] == [("0", "3.0")]


@pytest.mark.parametrize("accumulate, written, measured", [
    (1, {3, 7, 11, 15, 19}, [0, 1, 5, 9]),  # the last epoch's batches: its first, global steps 12, 16, 20
    (2, {3, 7}, [0, 5]),  # its first, and the micro-batch that ends global step 8 (once, not twice)
])
def test_the_collapse_monitor_measures_the_steps_the_logger_writes_and_each_epochs_first(
        tmp_path, accumulate, written, measured):
    """Its SVD runs on the written optimizer steps only (plus each epoch's first, for the summary):
    the same steps as the loss in metrics.csv, and the summary's means are those of the measured
    batches by hand."""
    import csv

    import lightning as L
    import torch

    from sslrun.callbacks import CollapseMonitor
    from sslrun.eval import effective_rank, normalized_std
    from sslrun.tracking import ResumableCSVLogger

    def embedding(batch_idx):  # a spread that differs per step, so a wrong step shows in the means
        return torch.randn(16, 8, generator=torch.Generator().manual_seed(batch_idx)) * (1 + batch_idx)

    class Toy(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 8)

        def training_step(self, batch, batch_idx):
            z = embedding(batch_idx)
            loss = self.layer(z).pow(2).mean()
            self.log("train/loss", loss)
            return {"loss": loss, "embedding": z}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(10, 1)), batch_size=1)

    every = 4
    monitor = CollapseMonitor(every_n_steps=every)
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    L.Trainer(max_epochs=2, callbacks=[monitor], logger=logger, log_every_n_steps=every, accelerator="cpu",
              accumulate_grad_batches=accumulate, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(Toy())
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    loss_steps = [int(r["step"]) for r in rows if r["train/loss"]]
    collapse_steps = [int(r["step"]) for r in rows if r["collapse/effective_rank"]]
    assert set(loss_steps) == set(collapse_steps) == written
    summary = monitor.summary()
    expected_std = torch.stack([normalized_std(embedding(i)) for i in measured]).mean()
    expected_rank = torch.stack([effective_rank(embedding(i)) for i in measured]).mean()
    assert summary["embedding_std"] == pytest.approx(expected_std.item(), rel=1e-5)
    assert summary["effective_rank"] == pytest.approx(expected_rank.item(), rel=1e-5)
    assert f"every {every} steps" in summary["collapse_protocol"]
