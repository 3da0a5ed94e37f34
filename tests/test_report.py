"""`python -m sslrun.report`: the comparison table, plots and errors, on fake run directories
(summary.json, Lightning CSVLogger's csv/metrics.csv, Hydra's .hydra/ files); no training."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sslrun.report import main, report

REPO = Path(__file__).resolve().parents[1]

# The columns of a CLIP run's csv/metrics.csv as Lightning's CSVLogger writes them (sorted).
CSV_COLUMNS = [
    "collapse/effective_rank", "collapse/std", "collapse/std_sqrt_d", "epoch",
    "eval/image_to_text_R@1", "eval/knn_top1", "eval/linear_probe_top1", "eval/zero_shot_top1",
    "img/s", "lr", "step", "train/logit_scale", "train/loss", "train/probe_loss", "train/probe_top1",
]


def fake_run(run_dir: Path, *, method="clip", overrides=("method=clip", "++eval.knn.bank_size=2000"),
             train_loss=3.686413526535034, knn=0.7534999847412109, knn_init=0.5945000052452087,
             probe=0.7229999899864197, zero_shot=0.7300000190734863, images_per_sec=201.21335919016198,
             wall=110.84234809875488, steps=30, config_extra=None) -> Path:
    """A finished run as training leaves it: summary.json, csv/metrics.csv (a train/loss row every
    10 steps, then the final evaluation's rows), .hydra/overrides.yaml and .hydra/config.yaml."""
    run_dir.mkdir(parents=True)
    summary = {
        "method": method, "backbone": "vit_tiny_patch16_224", "data": "fashion_mnist",
        "global_step": steps, "epochs": 0.1, "train_loss": train_loss,
        "train_loss_protocol": "mean training loss over the last epoch, all processes",
        "knn_top1": knn, "knn_top1_random_init": knn_init, "knn_top1_pixels": 0.772,
        "linear_probe_top1": probe, "eval_protocol": {"knn": "cosine"},
        "images_per_sec": images_per_sec, "peak_memory_mb": 1411.5, "wall_time_sec": wall,
        "world_size": 1, "global_batch_size": 128, "lr": 0.001, "skipped_images": 0,
        "checkpoint": None, "backbone_weights": None,
    }
    if zero_shot is not None:
        summary.update(zero_shot_top1=zero_shot, zero_shot_top1_random_init=0.1135)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    (run_dir / "csv").mkdir()
    with open(run_dir / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for step in range(9, steps, 10):
            writer.writerow({"collapse/effective_rank": 12.7, "collapse/std": 0.05, "collapse/std_sqrt_d": 0.58,
                             "epoch": 0, "img/s": 246.5, "lr": 1e-4, "step": step, "train/logit_scale": 14.2,
                             "train/loss": train_loss + 1 - step / steps, "train/probe_loss": 2.1,
                             "train/probe_top1": 0.14})
        writer.writerow({"eval/knn_top1": knn, "eval/linear_probe_top1": probe, "step": steps})
        if zero_shot is not None:
            writer.writerow({"eval/image_to_text_R@1": 0.09, "eval/zero_shot_top1": zero_shot, "step": steps})

    (run_dir / ".hydra").mkdir()
    if overrides is not None:
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    config = {"method": {"name": method, "embed_dim": 128},
              "backbone": {"name": "vit_tiny_patch16_224"},
              "data": {"name": "fashion_mnist", "batch_size": 128},
              "eval": {"knn": {"bank_size": 2000, "query_size": 2000}},
              "trainer": {"max_steps": steps}}
    for key, value in (config_extra or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    (run_dir / ".hydra" / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    return run_dir


def parse_table(markdown: str) -> list:
    """The report's table as one {header: cell} dict per run."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    headers = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].strip("|").split("|")) == {"---"}
    return [dict(zip(headers, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def sweep(tmp_path: Path) -> Path:
    """A Hydra multirun directory: multirun/<date>/<time>/{0,1,2} and multirun.yaml."""
    root = tmp_path / "multirun" / "2026-11-26" / "12-00-00"
    fake_run(root / "0", overrides=["method=clip", "optimizer.base_lr=0.001", "++eval.knn.bank_size=2000"],
             knn=0.75, train_loss=3.5)
    fake_run(root / "1", method="siglip", overrides=["method=siglip", "optimizer.base_lr=0.001",
                                                     "++eval.knn.bank_size=2000"],
             knn=0.7130000114440918, train_loss=5.003, zero_shot=0.69)
    fake_run(root / "2", overrides=["method=clip", "optimizer.base_lr=0.002", "++eval.knn.bank_size=2000"],
             knn=0.7612345, train_loss=3.123456, zero_shot=None, images_per_sec=12345.6, wall=4000.0)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_table_has_each_runs_numbers(tmp_path):
    a = fake_run(tmp_path / "runs" / "a", overrides=["method=clip", "data.batch_size=128"])
    b = fake_run(tmp_path / "runs" / "b", overrides=["method=clip", "data.batch_size=256"],
                 train_loss=4.0, knn=0.8, knn_init=0.5, probe=0.6, zero_shot=0.55, images_per_sec=99.94,
                 wall=45.4, steps=40)
    markdown = report([a, b], tmp_path / "out")
    assert (tmp_path / "out" / "report.md").read_text().strip() == markdown.strip()
    rows = parse_table(markdown)
    assert [r["run"] for r in rows] == ["a", "b"]
    assert rows[0] == {
        "run": "a", "method": "clip", "backbone": "vit_tiny_patch16_224", "data": "fashion_mnist",
        "data.batch_size": "128", "global_step": "30", "train_loss": "3.686", "knn_top1": "0.7535",
        "knn_top1_random_init": "0.5945", "linear_probe_top1": "0.7230", "zero_shot_top1": "0.7300",
        "images_per_sec": "201.2", "wall_time": "1m 51s",
    }
    assert rows[1] == {
        "run": "b", "method": "clip", "backbone": "vit_tiny_patch16_224", "data": "fashion_mnist",
        "data.batch_size": "256", "global_step": "40", "train_loss": "4.000", "knn_top1": "0.8000",
        "knn_top1_random_init": "0.5000", "linear_probe_top1": "0.6000", "zero_shot_top1": "0.5500",
        "images_per_sec": "99.9", "wall_time": "45s",
    }
    for run in (a, b):  # the 4 significant digits are those of summary.json
        summary = json.loads((run / "summary.json").read_text())
        row = rows[[a, b].index(run)]
        for key in ("train_loss", "knn_top1", "knn_top1_random_init", "linear_probe_top1", "zero_shot_top1"):
            assert float(row[key]) == pytest.approx(summary[key], rel=5e-4)


def test_sweep_is_expanded_and_only_differing_overrides_are_columns(tmp_path):
    root = sweep(tmp_path)
    markdown = report([root], None)  # default: <sweep>/report
    out = root / "report"
    assert (out / "report.md").is_file()
    rows = parse_table(markdown)
    assert [r["run"] for r in rows] == ["0", "1", "2"]
    assert [r["method"] for r in rows] == ["clip", "siglip", "clip"]
    # Differing overrides are columns; equal ones (eval.knn.bank_size) are not, nor is `method`,
    # the method column's twin.
    assert [r["optimizer.base_lr"] for r in rows] == ["0.001", "0.001", "0.002"]
    assert "eval.knn.bank_size" not in rows[0] and "method=" not in markdown.split("\n\n")[1]
    assert list(rows[0]).count("method") == 1
    assert [r["knn_top1"] for r in rows] == ["0.7500", "0.7130", "0.7612"]
    assert [r["train_loss"] for r in rows] == ["3.500", "5.003", "3.123"]
    assert [r["zero_shot_top1"] for r in rows] == ["0.7300", "0.6900", "–"]  # run 2 has none
    assert rows[2]["images_per_sec"] == "12346" and rows[2]["wall_time"] == "1h 06m"
    # A second report over the same sweep ignores the first one's directory.
    assert parse_table(report([root], None)) == rows


def test_overrides_missing_in_a_run_take_its_config_value(tmp_path):
    a = fake_run(tmp_path / "a", overrides=["method=clip"], config_extra={"data.batch_size": 128})
    b = fake_run(tmp_path / "b", overrides=["method=clip", "data.batch_size=64"])
    rows = parse_table(report([a, b], tmp_path / "out"))
    assert [r["data.batch_size"] for r in rows] == ["128", "64"]


def test_without_overrides_files_the_differing_config_values_are_columns(tmp_path):
    a = fake_run(tmp_path / "a", overrides=None, config_extra={"trainer.max_steps": 100})
    b = fake_run(tmp_path / "b", overrides=None, method="siglip", config_extra={"trainer.max_steps": 200})
    rows = parse_table(report([a, b], tmp_path / "out"))
    assert [r["trainer.max_steps"] for r in rows] == ["100", "200"]
    # method.name differs: the method column shows it, and the rest of the group is not repeated.
    assert "method.name" not in rows[0] and "eval.knn.bank_size" not in rows[0]
    assert [r["method"] for r in rows] == ["clip", "siglip"]


def test_columns_without_values_are_left_out(tmp_path):
    a = fake_run(tmp_path / "a", zero_shot=None)
    b = fake_run(tmp_path / "b", zero_shot=None)
    rows = parse_table(report([a, b], tmp_path / "out"))
    assert "zero_shot_top1" not in rows[0] and "knn_top1" in rows[0]
    assert not (tmp_path / "out" / "zero_shot.png").exists()


def test_plots_are_valid_images(tmp_path):
    from PIL import Image

    root = sweep(tmp_path)
    out = tmp_path / "plots"
    markdown = report([root], out)
    for name in ("loss.png", "knn.png"):
        assert f"]({name})" in markdown
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
    with Image.open(out / "knn.png") as knn:  # two panels: kNN and zero-shot
        assert knn.width > 1.5 * knn.height


def test_cli_prints_the_table_and_writes_the_report(tmp_path, capsys):
    root = sweep(tmp_path)
    assert main([str(root), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == (tmp_path / "o" / "report.md").read_text().strip()
    assert len(parse_table(printed)) == 3


def test_unfinished_jobs_of_a_sweep_are_left_out_and_listed(tmp_path, capsys):
    fake_run(tmp_path / "0", knn=0.75)
    fake_run(tmp_path / "1")
    (tmp_path / "1" / "summary.json").unlink()  # a job that failed
    assert main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert f"{tmp_path / '1'} has no summary.json" in captured.err
    assert [r["run"] for r in parse_table(captured.out)] == ["0"]
    assert f"left out:\n\n- {tmp_path / '1'}" in (tmp_path / "report" / "report.md").read_text()


def test_runs_that_did_not_complete_show_their_status(tmp_path, capsys):
    fake_run(tmp_path / "0", knn=0.75)
    fake_run(tmp_path / "1")
    assert main([str(tmp_path)]) == 0
    assert "status" not in parse_table(capsys.readouterr().out)[0]  # all completed: no column
    summary = json.loads((tmp_path / "1" / "summary.json").read_text())
    summary.update(status="diverged", reason="train/loss became nan at step 17 (lr 5.7e+08)", global_step=17)
    (tmp_path / "1" / "summary.json").write_text(json.dumps(summary))
    assert main([str(tmp_path)]) == 0
    rows = parse_table(capsys.readouterr().out)
    assert [(r["run"], r["status"], r["global_step"]) for r in rows] == [("0", "completed", "30"), ("1", "diverged", "17")]


@pytest.mark.parametrize("case", ["empty", "unfinished", "unfinished_sweep", "missing"])
def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, case):
    target = tmp_path / "x"
    if case == "empty":
        target.mkdir()
    elif case == "unfinished":
        fake_run(target)
        (target / "summary.json").unlink()
    elif case == "unfinished_sweep":
        for job in ("0", "1"):
            fake_run(target / job)
            (target / job / "summary.json").unlink()
    assert main([str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sslrun.report: error: ")
    if case == "empty":
        assert "no runs in" in err and "summary.json" in err
    elif case.startswith("unfinished"):
        path = target / "0" if case == "unfinished_sweep" else target
        assert f"{path} has no summary.json" in err and "when it ends" in err
    assert not (tmp_path / "x" / "report").exists() and not (tmp_path / "report").exists()


def test_module_entry_point(tmp_path):
    """`python -m sslrun.report` in a fresh interpreter: exit codes, and nothing that needs torch."""
    run = fake_run(tmp_path / "run")
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "sslrun.report", str(run), "--out", str(tmp_path / "o")],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "| run |" in ok.stdout and (tmp_path / "o" / "loss.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "sslrun.report", str(tmp_path / "o")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
