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
