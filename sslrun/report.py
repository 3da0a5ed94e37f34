"""Compare finished runs without a dashboard: one markdown table and a few plots.

    python -m sslrun.report multirun/2026-11-26/12-00-00          # a Hydra sweep
    python -m sslrun.report outputs/run-a outputs/run-b --out cmp  # any run directories

Each argument is a run directory (one that holds `summary.json`, written when a run ends) or a
directory of runs, searched one level down: a Hydra sweep directory with its numbered jobs
`0/`, `1/`, ... The report goes to `--out` (default: `report/` in the runs' common parent, or
in the sweep directory):

- `report.md`, also printed: one row per run with its method, backbone and data, the overrides
  that differ between the runs (`.hydra/overrides.yaml`; from `.hydra/config.yaml` when a run has
  no overrides file), and its results from `summary.json` (final step, training loss, kNN top-1
  and its random-init value, linear probe, zero-shot top-1, throughput, wall time), the offline
  protocols' numbers where `python -m sslrun.evaluate` wrote them (`eval/<protocol>.json`: kNN,
  linear and fine-tuning top-1, RankMe, alignment, uniformity), and a status column when a run did
  not complete (it failed, diverged or was preempted: summary.json says so and how far it got).
  Columns no run has a value for are left out.
- `loss.png`: `train/loss` against step, one line per run; `knn.png`: `eval/knn_top1` against
  step (random init at step 0), with a second panel for `eval/zero_shot_top1` when a run has it.
  Both read `csv/metrics.csv` (`logger=csv`, the default).

From Python: `sslrun.report.report(run_dirs, out_dir) -> str` (the markdown). A sweep's jobs
without `summary.json` (still running, or killed) are left out with a warning and listed in the
report; a run directory named itself without `summary.json`, and arguments with no finished runs
in them, are errors (`main` prints one line and returns 2).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Optional, Union

from sslrun.redaction import redact
from sslrun.run_dir import RunDir

PathLike = Union[str, os.PathLike]

# (header, summary.json key, kind): the result columns, in table order.
RESULT_COLUMNS = [
    ("global_step", "global_step", "int"),
    ("train_loss", "train_loss", "metric"),
    ("knn_top1", "knn_top1", "metric"),
    ("knn_top1_random_init", "knn_top1_random_init", "metric"),
    ("linear_probe_top1", "linear_probe_top1", "metric"),
    ("zero_shot_top1", "zero_shot_top1", "metric"),
    ("images_per_sec", "images_per_sec", "rate"),
    ("wall_time", "wall_time_sec", "duration"),
]
# (header, offline protocol, key of its eval/<protocol>.json): python -m sslrun.evaluate's numbers.
EVAL_COLUMNS = [
    ("offline_knn_top1", "knn", "top1"),
    ("offline_linear_top1", "linear", "top1"),
    ("finetune_top1", "finetune", "top1"),
    ("rankme", "stats", "rankme"),
    ("alignment", "stats", "alignment"),
    ("uniformity", "stats", "uniformity"),
]
# Groups summary.json names itself: the table shows them as columns of their own.
NAMED_GROUPS = ("method", "backbone", "data")
MISSING = "–"


class ReportError(ValueError):
    """Nothing to report on, or a run directory that is not finished; one line."""


class Run:
    """One finished run: its directory, table label, summary.json and Hydra files."""

    def __init__(self, path: Path):
        self.path = path
        self.layout = RunDir(path)
        self.label = path.name
        try:
            self.summary = json.loads(self.layout.summary.read_text())
        except ValueError as error:
            raise ReportError(f"{self.layout.summary} is not valid JSON: {error}") from None
        self.evals = {}
        for path in self.layout.eval_results():
            try:
                self.evals[path.stem] = json.loads(path.read_text())
            except ValueError as error:
                raise ReportError(f"{path} is not valid JSON: {error}") from None
        self.overrides = _read_overrides(self.layout.overrides)
        self._config = None
        self._rows = None

    @property
    def config(self) -> Optional[dict]:
        """The run's composed config (`.hydra/config.yaml`), flattened to dotted keys; None
        when the run has none."""
        if self._config is None:
            self._config = _read_config(self.layout.config)
        return self._config or None

    def metric(self, name: str) -> list:
        """(step, value) pairs of one `csv/metrics.csv` column, in file order."""
        if self._rows is None:
            path = self.layout.metrics
            self._rows = []
            if path.is_file():
                with open(path, newline="") as f:
                    self._rows = list(csv.DictReader(f))
        points = []
        for row in self._rows:
            value = row.get(name)
            if value not in (None, "") and row.get("step") not in (None, ""):
                points.append((int(float(row["step"])), float(value)))
        return points


# ---------------------------------------------------------------------- finding runs

def _unfinished(path: Path) -> ReportError:
    return ReportError(f"{path} has no summary.json: a run writes summary.json when it ends "
                       "(still running, or it was killed)")


def _sort_key(path: Path):
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def find_runs(paths: Union[PathLike, Iterable[PathLike]]) -> tuple:
    """(finished, unfinished) run directories in `paths`, in order: each path is a run (it holds
    summary.json) or is searched one level down for runs (a Hydra sweep: `0/`, `1/`, ...). A
    sweep's jobs without summary.json (still running, or killed) are the unfinished ones; a run
    named itself must be finished."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ReportError("no run directories given")
    runs, unfinished = [], []
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path} is not a directory")
        if RunDir(path).summary.is_file():
            runs.append(path)
            continue
        children = sorted((c for c in path.iterdir() if c.is_dir()), key=_sort_key)
        found = [c for c in children if RunDir(c).summary.is_file()]
        if not found:
            if RunDir(path).looks_like_a_run():
                raise _unfinished(path)
            unfinished_jobs = [c for c in children if RunDir(c).looks_like_a_run()]
            if unfinished_jobs:
                raise _unfinished(unfinished_jobs[0])
            raise ReportError(f"no runs in {path}: no summary.json in it or in its subdirectories "
                              "(a run writes summary.json when it ends)")
        runs.extend(found)
        unfinished.extend(c for c in children if c not in found and RunDir(c).looks_like_a_run())
    return _unique(runs), _unique(unfinished)


def _unique(paths: list) -> list:
    unique = []
    for path in paths:
        if path.resolve() not in [u.resolve() for u in unique]:
            unique.append(path)
    return unique


def default_out_dir(paths: Union[PathLike, Iterable[PathLike]]) -> Path:
    """`report/` in the common parent of `paths` (a sweep directory: inside it)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    resolved = [Path(p).resolve() for p in paths]
    if len(resolved) == 1:
        base = resolved[0]
    else:
        base = Path(os.path.commonpath([str(p) for p in resolved]))
    return base / "report"


def _label(runs: list) -> None:
    """Label each run by its path below the runs' common parent (a sweep's job number)."""
    resolved = [r.path.resolve() for r in runs]
    if len(runs) > 1:
        common = Path(os.path.commonpath([str(p) for p in resolved]))
        labels = [str(p.relative_to(common)) for p in resolved]
        if all(label and label != "." for label in labels):
            for run, label in zip(runs, labels):
                run.label = label
            return
    for run, path in zip(runs, resolved):
        run.label = path.name


# ---------------------------------------------------------------------- configs

def _read_overrides(path: Path) -> Optional[dict]:
    """Hydra's overrides.yaml as {key: value} ('++a.b=1' -> {'a.b': '1'}; '~a' -> {'a': '~'})."""
    if not path.is_file():
        return None
    import yaml

    overrides = {}
    for item in yaml.safe_load(path.read_text()) or []:
        item = str(item)
        if item.startswith("~"):
            key, _, value = item[1:].partition("=")
            overrides[key] = "~" + value
            continue
        key, _, value = item.lstrip("+").partition("=")
        if key.startswith("hydra.") or key == "hydra":
            continue
        overrides[key] = value
    return overrides


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    value = json.dumps(node) if isinstance(node, list) else ("null" if node is None else str(node))
    return {prefix[:-1]: value}


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that needs a resolver registered elsewhere
        container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    return redact(_flatten(container))  # resolving brought back any ${oc.env:...} secret


def _config_value(run: Run, key: str) -> Optional[str]:
    """A key's value in the run's config; a config group ('optimizer') by its name."""
    config = run.config or {}
    return config.get(key, config.get(f"{key}.name"))


def differing_settings(runs: list) -> dict:
    """{key: [value per run]} of the settings that differ between the runs: their Hydra
    overrides when every run has `.hydra/overrides.yaml`, else their composed configs."""
    if len(runs) < 2:
        return {}
    if all(r.overrides is not None for r in runs):
        keys = []
        for run in runs:
            keys += [k for k in run.overrides if k not in keys]
        table = {}
        for key in keys:
            values = []
            for run in runs:
                value = run.overrides.get(key)
                if value is None:  # not overridden in this run: its composed value, if known
                    value = _config_value(run, key)
                values.append(MISSING if value is None else value)
            if len(set(values)) > 1 and not _shown_elsewhere(runs, key, values):
                table[key] = values
        return table
    configs = [r.config or {} for r in runs]
    if not any(configs):
        return {}
    keys = []
    for config in configs:
        keys += [k for k in config if k not in keys]
    table = {}
    for key in keys:
        values = [c.get(key, MISSING) for c in configs]
        if len(set(values)) > 1:
            table[key] = values
    # A group chosen differently ('method.name') differs in most of its keys: show its name only.
    chosen = [k[: -len(".name")] for k in table if k.endswith(".name")]
    table = {k: v for k, v in table.items()
             if not any(k.startswith(g + ".") and k != g + ".name" for g in chosen)}
    return {k: v for k, v in table.items()
            if not (k.endswith(".name") and k[: -len(".name")] in NAMED_GROUPS)}


def _shown_elsewhere(runs: list, key: str, values: list) -> bool:
    """'method=clip' next to the method column that says clip already."""
    return key in NAMED_GROUPS and all(str(r.summary.get(key)) == v for r, v in zip(runs, values))


# ---------------------------------------------------------------------- formatting

def _significant(value: float, digits: int = 4) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value != 0 and abs(value) >= 10 ** digits:
        return f"{value:.0f}"
    text = f"{value:#.{digits}g}"  # trailing zeros kept: 0.7230, not 0.723
    return text[:-1] if text.endswith(".") else text


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


def _format(value, kind: str) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if kind == "int":
        return str(int(value))
    if kind == "rate":
        return f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"
    if kind == "duration":
        return _duration(value)
    return _significant(float(value))


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(runs: list, settings: Optional[dict] = None) -> str:
    """The markdown comparison table, one row per run (`settings`: differing_settings(runs))."""
    columns = [("run", [r.label for r in runs])]
    for group in NAMED_GROUPS:
        columns.append((group, [r.summary.get(group) for r in runs]))
    statuses = [r.summary.get("status", "completed") for r in runs]  # runs before statuses completed
    if any(status != "completed" for status in statuses):
        columns.append(("status", statuses))  # failed, diverged, preempted: how far each got
    columns += list((differing_settings(runs) if settings is None else settings).items())
    for header, key, kind in RESULT_COLUMNS:
        columns.append((header, [_format(r.summary.get(key), kind) for r in runs]))
    for header, protocol, key in EVAL_COLUMNS:
        columns.append((header, [_format(r.evals.get(protocol, {}).get(key), "metric") for r in runs]))
    columns = [(h, v) for h, v in columns if any(x is not None for x in v)]
    lines = ["| " + " | ".join(_cell(h) for h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for i in range(len(runs)):
        cells = [MISSING if v[i] is None else v[i] for _, v in columns]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots

def _curve_with_start(run: Run, name: str, start_key: str) -> list:
    """A metric's curve from the csv; the random-init value of summary.json at step 0 in front
    when the csv has no step-0 point (the evaluation before training is not logged there)."""
    points = run.metric(name)
    start = run.summary.get(start_key)
    if isinstance(start, (int, float)) and points and not any(step == 0 for step, _ in points):
        points = [(0, float(start))] + points
    return points


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def _legend_names(runs: list, settings: dict) -> list:
    """Run labels, with what differs between the runs when that is short ('0: method=siglip')."""
    names = []
    for i, run in enumerate(runs):
        what = " ".join(f"{key}={values[i]}" for key, values in settings.items())
        names.append(f"{run.label}: {what}" if what and len(what) <= 50 else run.label)
    return names


def plot(runs: list, out_dir: Path, settings: Optional[dict] = None) -> list:
    """loss.png and knn.png (with a zero-shot panel when a run logged it) in out_dir; the names
    of the files written. `settings`: differing_settings(runs), for the legends."""
    from matplotlib.figure import Figure

    written = []
    names = _legend_names(runs, differing_settings(runs) if settings is None else settings)
    losses = [(name, r.metric("train/loss")) for name, r in zip(names, runs)]
    if any(points for _, points in losses):
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for label, points in losses:
            if points:
                ax.plot(*zip(*points), label=label, linewidth=1.2)
        ax.set(xlabel="step", ylabel="train/loss", title="training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        _save(fig, out_dir / "loss.png")
        written.append("loss.png")

    panels = [("eval/knn_top1", "knn_top1_random_init", "kNN top-1")]
    if any(r.metric("eval/zero_shot_top1") for r in runs):
        panels.append(("eval/zero_shot_top1", "zero_shot_top1_random_init", "zero-shot top-1"))
    curves = [[(legend, _curve_with_start(r, name, start)) for legend, r in zip(names, runs)]
              for name, start, _ in panels]
    if any(points for label, points in curves[0]) or len(panels) > 1:
        fig = Figure(figsize=(7 * len(panels), 4.5), layout="constrained")
        for i, ((name, _, title), panel) in enumerate(zip(panels, curves)):
            ax = fig.add_subplot(1, len(panels), i + 1)
            for label, points in panel:
                if points:
                    ax.plot(*zip(*points), marker="o", markersize=3, label=label, linewidth=1.2)
            ax.set(xlabel="step", ylabel=name, title=f"{title} (step 0: random init)")
            ax.grid(alpha=0.3)
            if any(points for _, points in panel):
                ax.legend(fontsize="small")
        _save(fig, out_dir / "knn.png")
        written.append("knn.png")
    return written


# ---------------------------------------------------------------------- report

def report(run_dirs: Union[PathLike, Iterable[PathLike]], out_dir: Optional[PathLike] = None) -> str:
    """Compare the runs in `run_dirs` (run directories, or directories of runs such as a Hydra
    sweep): write `report.md`, `loss.png` and `knn.png` to `out_dir` (default: see
    `default_out_dir`) and return the markdown. Raises ReportError when a directory has no runs
    or a run has no summary.json."""
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    run_dirs = list(run_dirs)
    paths, unfinished = find_runs(run_dirs)
    for path in unfinished:
        print(f"sslrun.report: warning: {path} has no summary.json (still running, or killed): left out",
              file=sys.stderr)
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs)
    runs = [Run(p) for p in paths]
    _label(runs)
    out.mkdir(parents=True, exist_ok=True)
    settings = differing_settings(runs)
    images = plot(runs, out, settings)

    lines = [f"# Run comparison ({len(runs)} run{'s' if len(runs) != 1 else ''})", "", table(runs, settings), ""]
    lines += ["Final values from each run's summary.json (train_loss: mean over the last epoch; "
              "knn_top1, linear_probe_top1, zero_shot_top1: final evaluation)."]
    if any(r.evals for r in runs):
        lines += ["offline_*, finetune_top1, rankme, alignment, uniformity: python -m sslrun.evaluate "
                  "(each run's eval/<protocol>.json states the protocol's settings)."]
    lines += [""]
    lines += ["Runs:", ""] + [f"- `{r.label}`: {r.path}" for r in runs] + [""]
    if unfinished:
        lines += ["Not finished (no summary.json: still running, or killed), left out:", ""]
        lines += [f"- {path}" for path in unfinished] + [""]
    if images:
        lines += [f"![{Path(name).stem}]({name})" for name in images] + [""]
    else:
        lines += ["No plots: no run has csv/metrics.csv (`logger=csv`, the default, writes it).", ""]
    markdown = "\n".join(lines)
    (out / "report.md").write_text(markdown + "\n")
    return markdown


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sslrun.report",
        description="Compare finished runs: a markdown table (report.md) and loss/kNN plots.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (holding summary.json) or sweep directories (multirun/DATE/TIME)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: report/ in the runs' common parent or the sweep directory)")
    args = parser.parse_args(argv)
    try:
        markdown = report(args.runs, args.out)
    except ReportError as error:
        print(f"sslrun.report: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out is not None else default_out_dir(args.runs)
    print(markdown)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
