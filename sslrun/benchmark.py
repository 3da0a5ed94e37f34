"""`python -m sslrun.benchmark suite=quick seeds=3`: every registered method at a suite's budget,
evaluated offline, in one results table (docs/results.md).

    python -m sslrun.benchmark                                  # suite=quick seeds=3, every method
    python -m sslrun.benchmark suite=long methods=[simclr,byol,mocov3,vicreg,dino]
    python -m sslrun.benchmark mode=plan                        # what would train, resume, evaluate
    python -m sslrun.benchmark mode=table                       # rewrite the table from <root> only
    python -m sslrun.benchmark records=docs/results/quick       # keep finished runs' results there

A suite (`sslrun/conf_benchmark/suite/<name>.yaml`) is overrides added to every method's
training command, overrides per method, and the offline protocols with their overrides. The
methods are the registry's (`sslrun.methods.registry.registered()`), so a new method is
benchmarked with no edit here. Each (method, seed) trains in a process of its own,

    python -m sslrun method=NAME seed=S hydra.run.dir=<root>/NAME/seedS \
        <suite.train> <method_overrides[NAME]> <suite.methods[NAME]>

and is then evaluated with `sslrun.evaluate.evaluate_run(run_dir, protocol, overrides)` for each
protocol of the suite (`eval/<protocol>.json` in the run directory). Runs go seed by seed (every
method's seed 0 first), so an interrupted benchmark has a table over all methods early; the table
is rewritten after every run.

Records across machines: run directories hold weights and checkpoints and stay where they are
trained; `records=DIR` keeps what the table reads of each finished run (summary.json,
benchmark.json, eval/<protocol>.json: kilobytes) in DIR/<method>/seed<S>/, to be committed. A later
benchmark with the same records= (on another machine, or after the run directories are gone)
counts those runs as finished and trains only the rest, so a suite too long for one sitting is
recorded over several, each run with the machine it ran on.

Resuming: run it again with the same arguments. A run whose summary.json says completed (or
diverged: the same budget diverges again) is not trained again, and a protocol whose JSON is there
is not evaluated again; any other run directory (killed, failed, preempted) is trained again with
training's `resume=auto`, which continues from its last checkpoint. A run directory first
trained with another command (the suite was edited) is an error rather than a mixed table: give
another `root=`. A run that fails shows its status in the table and the benchmark goes on.

DINOv2 distillation needs a finished dinov2 run as its teacher: `{run_dir:dinov2}` in the
config (conf_benchmark/config.yaml) points each seed at the suite's own dinov2 run of that seed,
which therefore trains first; when it did not complete, the distillation run is skipped and the
table says why.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from sslrun.config.errors import ConfigError, did_you_mean, no_such_option, require_choice
from sslrun.report import _cell, _duration
from sslrun.run_dir import RunDir

CONF_DIR = Path(__file__).resolve().parent / "conf_benchmark"
PROTOCOLS = {"knn": "kNN", "linear": "linear", "finetune": "fine-tune"}  # the offline protocols with a top-1
FINAL_STATUSES = ("completed", "diverged")  # training again would give the same: not retrained
SEED = "$S"  # the seed in the table's commands: `for S in 0 1 2; do <command>; done`
_RUN_DIR_OF = re.compile(r"\{run_dir:([\w.-]+)\}")
LOAD_SAMPLE_SEC = 10  # how often train() reads the machine's load average
SHARED_LOAD = 1.5  # mean load above this x cores: something else ran beside the run
_SUITE_KEYS = {"name", "about", "train", "methods", "protocols", "method_protocols"}

log = logging.getLogger("sslrun.benchmark")


class BenchmarkError(ValueError):
    """A problem with the benchmark's arguments or its run directories; one line."""


@dataclass
class PlannedRun:
    """One (method, seed): its run directory and the training command that fills it."""

    method: str
    seed: int
    run_dir: Path
    overrides: List[str]  # python -m sslrun's arguments
    needs: List[Path] = field(default_factory=list)  # run directories that must complete first

    @property
    def layout(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def name(self) -> str:
        return f"{self.method} seed {self.seed}"


# ---------------------------------------------------------------------- config

def compose_benchmark(overrides: Sequence[str] = ()) -> DictConfig:
    """The benchmark's config (conf_benchmark/config.yaml with `overrides`), checked."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except MissingConfigException as error:
        group, _, option = str(error.missing_cfg_file or "").rpartition("/")
        raise BenchmarkError(no_such_option(group, option, error.options or [])) from None
    except HydraException as error:
        raise BenchmarkError(" ".join(str(error).split())) from None
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    _check(cfg)
    return cfg


def _check(cfg: DictConfig) -> None:
    suite = cfg.suite
    unknown = set(suite) - _SUITE_KEYS
    if unknown:
        raise BenchmarkError(f"suite.{sorted(unknown)[0]}: unknown key; a suite has {', '.join(sorted(_SUITE_KEYS))}")
    for key in ("train", "methods", "protocols"):
        if suite.get(key) is None:
            raise BenchmarkError(f"suite.{key}: no value given (suite={suite.get('name')})")
    extra = suite.get("method_protocols") or {}
    bad = [(key, p) for key, names in [("suite.protocols", suite.protocols),
                                       *((f"suite.method_protocols.{m}", v) for m, v in extra.items())]
           for p in names if p not in PROTOCOLS]
    if bad:
        raise BenchmarkError(f"{bad[0][0]}: no protocol {bad[0][1]!r}; choose from {', '.join(PROTOCOLS)}")
    require_choice("mode", cfg.mode, ("run", "plan", "table"))
    seeds(cfg)


def seeds(cfg: DictConfig) -> List[int]:
    """`seeds=3` -> [0, 1, 2]; `seeds=[0,5]` -> [0, 5]."""
    value = cfg.seeds
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return list(range(value))
    if isinstance(value, ListConfig) and value and all(isinstance(s, int) for s in value):
        return list(value)
    raise BenchmarkError(f"seeds={value}: give a number of seeds (seeds=3: 0, 1, 2) or a list (seeds=[0,5])")


def method_options() -> List[str]:
    """Every `method=` option: the registered methods in registry order, then variants
    (conf/method/*.yaml files named otherwise, such as mocov3_vit)."""
    from sslrun.config import CONF_DIR as TRAIN_CONF
    from sslrun.methods.registry import registered

    names = list(registered())
    return names + sorted(p.stem for p in (TRAIN_CONF / "method").glob("*.yaml") if p.stem not in names)


def selected_methods(cfg: DictConfig) -> List[str]:
    """cfg.methods (default: every registered method), with the methods their runs need (a
    teacher) added before them, in registry order."""
    from sslrun.methods.registry import registered

    options = method_options()
    wanted = list(registered()) if cfg.methods is None else (
        [cfg.methods] if isinstance(cfg.methods, str) else list(cfg.methods))
    for name in wanted:
        if name not in options:
            raise BenchmarkError(f"methods: no method {name!r}; {did_you_mean(name, options)}"
                                 f"choose from {', '.join(options)}")
    chosen: List[str] = []

    def add(name: str, path: tuple) -> None:
        if name in path:
            raise BenchmarkError(f"suite.methods: {' -> '.join(path + (name,))}: runs that need each other")
        for needed in _needed_methods(cfg, name):
            add(needed, path + (name,))
        if name not in chosen:
            chosen.append(name)

    for name in sorted(wanted, key=options.index):
        add(name, ())
    return chosen


def _method_templates(cfg: DictConfig, method: str) -> List[str]:
    """The training command's arguments for `method`, with {seed} and {run_dir:NAME} in them."""
    return [f"method={method}", "seed={seed}", "hydra.run.dir={run_dir:%s}" % method,
            *map(str, cfg.suite.train), *map(str, cfg.method_overrides.get(method) or []),
            *map(str, cfg.suite.methods.get(method) or [])]


def _needed_methods(cfg: DictConfig, method: str) -> List[str]:
    found = [m for t in _method_templates(cfg, method) for m in _RUN_DIR_OF.findall(t)]
    return [m for m in dict.fromkeys(found) if m != method]


def run_dir(cfg: DictConfig, method: str, seed) -> Path:
    return Path(cfg.root) / method / f"seed{seed}"


def _fill(cfg: DictConfig, template: str, seed) -> str:
    text = _RUN_DIR_OF.sub(lambda m: str(run_dir(cfg, m.group(1), seed)), template)
    return text.replace("{seed}", str(seed))


def plan(cfg: DictConfig) -> List[PlannedRun]:
    """Every (method, seed) of the benchmark, in the order they run: seed by seed, a run after
    the runs it needs."""
    runs = []
    for seed in seeds(cfg):
        for method in selected_methods(cfg):
            runs.append(PlannedRun(method, seed, run_dir(cfg, method, seed),
                                   [_fill(cfg, t, seed) for t in _method_templates(cfg, method)],
                                   [run_dir(cfg, m, seed) for m in _needed_methods(cfg, method)]))
    return runs


def command_template(cfg: DictConfig, method: str) -> str:
    """The training command of a method's rows, with $S for the seed (copyable into a shell loop)."""
    return " ".join(["python -m sslrun", *(_quote(_fill(cfg, t, SEED)) for t in _method_templates(cfg, method))])


def _quote(arg: str) -> str:
    """Shell quoting that leaves the seed placeholder $S for the shell to fill in."""
    if re.fullmatch(r"[\w@%+=:,./-]+", arg.replace(SEED, "S")):
        return arg
    if SEED in arg:  # double quotes, so the shell still fills in $S
        return '"' + re.sub(r'(["\\`])', r"\\\1", arg) + '"'
    return shlex.quote(arg)


# ---------------------------------------------------------------------- state of a run

def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(run: PlannedRun) -> Optional[dict]:
    return read_json(run.layout.summary)


def record(run: PlannedRun) -> Optional[dict]:
    """What the benchmark wrote when it trained the run (benchmark.json): command, exit code, machine."""
    return read_json(run.layout.benchmark_record)


def protocols_of(cfg: DictConfig, method: str) -> Dict[str, List[str]]:
    """The offline protocols of a method's runs -> their overrides: the suite's, then the method's
    own (`suite.method_protocols`: MAE's fine-tuning)."""
    extra = (cfg.suite.get("method_protocols") or {}).get(method) or {}
    return {p: [str(o) for o in overrides] for p, overrides in {**cfg.suite.protocols, **extra}.items()}


def missing_protocols(cfg: DictConfig, run: PlannedRun) -> List[str]:
    return [p for p in protocols_of(cfg, run.method) if not run.layout.eval_result(p).is_file()]


def trained(run: PlannedRun) -> bool:
    """Training would not change it: its summary says completed or diverged."""
    return (summary(run) or {}).get("status") in FINAL_STATUSES


def completed(run_dir_: Path) -> bool:
    return (read_json(RunDir(run_dir_).summary) or {}).get("status") == "completed"


def next_step(cfg: DictConfig, run: PlannedRun) -> str:
    """'finished', 'skip' (a run it needs did not complete), 'evaluate', 'resume' or 'train'."""
    if trained(run):
        done = summary(run)["status"] != "completed" or not missing_protocols(cfg, run)
        return "finished" if done else "evaluate"
    if not all(completed(d) for d in run.needs):
        return "skip"
    return "resume" if run.layout.looks_like_a_run() else "train"


def status(cfg: DictConfig, run: PlannedRun) -> Optional[str]:
    """Why a run gives no numbers, in a few words ('failed: CUDA out of memory'); None when it does."""
    found = summary(run)
    if found is not None:
        if found.get("status") == "completed":
            missing = missing_protocols(cfg, run)
            errors = (record(run) or {}).get("eval_errors") or {}
            return "; ".join(f"not evaluated: {p}" + (f" ({errors[p]})" if p in errors else "")
                             for p in missing) or None
        reason = found.get("reason")
        return f"{found.get('status')}: {reason}" if reason else str(found.get("status"))
    unmet = [d for d in run.needs if not completed(d)]
    if unmet:
        return f"skipped: needs a completed run in {unmet[0]}"
    written = record(run)
    if written is None:
        return "not run"
    code = written.get("exit_code")
    if code is None:
        return "not finished (still training, or the benchmark was stopped while it trained)"
    if code < 0:
        return f"killed ({signal.Signals(-code).name}), no summary.json"
    return f"failed (exit code {code}): {_last_line(run.layout.benchmark_output)}"


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1][:200]


# ---------------------------------------------------------------------- records

def record_dir(cfg: DictConfig, run: PlannedRun) -> Optional[Path]:
    """Where `records=` keeps the run's results: <records>/<method>/seed<S>/ (None: no records)."""
    return Path(cfg.records) / run.method / f"seed{run.seed}" if cfg.records else None


def _recorded_files(cfg: DictConfig, run: PlannedRun) -> List[Path]:
    """What the table reads of a run, relative to its directory: summary.json, benchmark.json and
    the suite's eval/<protocol>.json (no weights: a record is kilobytes, fit for git)."""
    layout = run.layout
    files = [layout.summary, layout.benchmark_record, *(layout.eval_result(p) for p in protocols_of(cfg, run.method))]
    return [f.relative_to(layout.root) for f in files]


def save_record(cfg: DictConfig, run: PlannedRun) -> None:
    """Copy a finished run's results into its record directory."""
    target = record_dir(cfg, run)
    for relative in _recorded_files(cfg, run):
        _copy(run.run_dir / relative, target / relative)


def _copy(source: Path, target: Path) -> None:
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".tmp")
        partial.write_bytes(source.read_bytes())
        os.replace(partial, target)


def recorded(cfg: DictConfig, run: PlannedRun) -> Optional[Path]:
    """The run's record directory when it holds the run finished (completed with every protocol
    of the suite, or diverged); None otherwise. A record of another command is an error."""
    target = record_dir(cfg, run)
    kept = RunDir(target) if target is not None else None  # a record has a run directory's layout
    found = read_json(kept.summary) if kept is not None else None
    if found is None:
        return None
    written = read_json(kept.benchmark_record) or {}
    if not same_command(written.get("command"), run):
        raise BenchmarkError(
            f"{target} records a run of `python -m sslrun {' '.join(written.get('command') or [])}`, not this "
            f"suite's `python -m sslrun {' '.join(run.overrides)}`: give another records= (or remove that directory)")
    finished = found.get("status") == "diverged" or (found.get("status") == "completed" and all(
        kept.eval_result(p).is_file() for p in protocols_of(cfg, run.method)))
    return target if finished else None


def restorable(cfg: DictConfig, runs: List[PlannedRun]) -> Dict[Path, Path]:
    """run dir -> record dir, for the runs not trained here that have a finished record. A run
    that another run needs (a teacher) is restored only when that run is finished or restored
    too: its record has no weights to learn from."""
    found = {run.run_dir: recorded(cfg, run) for run in runs if not trained(run)}
    found = {d: r for d, r in found.items() if r is not None}
    for run in runs:
        if run.run_dir not in found and next_step(cfg, run) != "finished":
            for needed in run.needs:
                found.pop(needed, None)
    return found


def restore_records(cfg: DictConfig, runs: List[PlannedRun], targets: Dict[Path, Path]) -> None:
    """Fill run directories from their records (`restorable`), so those runs count as finished."""
    for run in runs:
        if run.run_dir in targets:
            for relative in _recorded_files(cfg, run):
                _copy(targets[run.run_dir] / relative, run.run_dir / relative)
            log.info("%s: restored from %s", run.name, targets[run.run_dir])


# ---------------------------------------------------------------------- running

def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine() -> str:
    """CPU model, cores this process may use, torch and the GPU: where a run's numbers come from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    cores = usable_cores()
    gpu = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
           if torch.cuda.is_available() else "no GPU")
    return f"{cpu}, {cores} CPU cores, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def _write_record(run: PlannedRun, values: dict) -> None:
    path = run.layout.benchmark_record
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(partial, path)


def _without_root(command: Sequence[str]) -> List[str]:
    """The command with the benchmark's root (read off its hydra.run.dir=ROOT/METHOD/seedS) written
    as <root>: the same run, wherever root= put it."""
    dirs = [a.split("=", 1)[1] for a in command if a.startswith("hydra.run.dir=")]
    if not dirs:
        return list(command)
    root = str(Path(dirs[0]).parent.parent) + "/"
    return [a.replace(root, "<root>/") for a in command]


def same_command(command: Optional[Sequence[str]], run: PlannedRun) -> bool:
    return bool(command) and _without_root(command) == _without_root(run.overrides)


def check_same_command(run: PlannedRun) -> None:
    """A run directory trained with another command would mix two budgets in one row."""
    written = record(run)
    if written is not None and not same_command(written.get("command"), run):
        raise BenchmarkError(
            f"{run.run_dir} was trained by `python -m sslrun {' '.join(written.get('command') or [])}`, "
            f"not by this suite's `python -m sslrun {' '.join(run.overrides)}`: give another root= "
            f"(or remove that directory)")


def train(run: PlannedRun) -> int:
    """`python -m sslrun ...` for the run in a process of its own (output in benchmark.out); its
    exit code. Stopping the benchmark stops it (training writes its summary and checkpoint).
    The machine's mean 1-minute load over the run is recorded: a run that shared the machine
    with other work is marked in the table (its images/s and wall time understate it)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    values = {"command": run.overrides, "machine": machine(), "cores": usable_cores(),
              "started": datetime.now().astimezone().isoformat(timespec="seconds"), "exit_code": None}
    _write_record(run, values)
    loads = []
    with open(run.layout.benchmark_output, "ab") as output:
        process = subprocess.Popen([sys.executable, "-m", "sslrun", *run.overrides], stdout=output,
                                   stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    code = process.wait(timeout=LOAD_SAMPLE_SEC)
                    break
                except subprocess.TimeoutExpired:
                    loads.append(os.getloadavg()[0])
        except BaseException:  # Ctrl-C (the child got it too) or SIGTERM: let it write its summary
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    values.update(exit_code=code, finished=datetime.now().astimezone().isoformat(timespec="seconds"),
                  load_average=round(sum(loads) / len(loads), 2) if loads else None)
    _write_record(run, values)
    return code


def shared_machine(written: Optional[dict]) -> Optional[str]:
    """'load 4.1 on 2 cores' where the run's mean load exceeded SHARED_LOAD x its cores (a training
    run alone keeps it near the cores it uses), else None."""
    load, cores = (written or {}).get("load_average"), (written or {}).get("cores")
    if load is None or not cores or load <= SHARED_LOAD * cores:
        return None
    return f"load {load:.1f} on {cores} cores"


def evaluate(cfg: DictConfig, run: PlannedRun) -> None:
    """The suite's offline protocols that have no JSON yet; a protocol that fails is logged and
    left without one (the table says so, the next benchmark tries again)."""
    missing = missing_protocols(cfg, run)
    if not missing:
        return
    from sslrun.evaluate import evaluate_run

    written = record(run)
    errors = dict((written or {}).get("eval_errors") or {})
    for protocol in missing:
        log.info("%s: evaluating %s", run.name, protocol)
        try:
            result = evaluate_run(run.run_dir, protocol, protocols_of(cfg, run.method)[protocol])
        except Exception as error:  # noqa: BLE001 - one protocol's failure must not stop the benchmark
            errors[protocol] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            log.error("%s: %s failed: %s", run.name, protocol, errors[protocol])
            continue
        errors.pop(protocol, None)
        log.info("%s: %s top-1 %s (%s)", run.name, protocol, result.get("top1"),
                 _duration(result.get("wall_time_sec") or 0))
    if written is not None:  # the table gives the error beside the missing protocol
        _write_record(run, {**written, "eval_errors": errors})


def execute(cfg: DictConfig, run: PlannedRun) -> None:
    """Bring one run to finished: train (or resume) it, then evaluate it."""
    step = next_step(cfg, run)
    if step == "finished":
        log.info("%s: skipping finished run %s", run.name, run.run_dir)
        return
    if step == "skip":
        log.warning("%s: skipped: %s", run.name, status(cfg, run))
        return
    if step in ("train", "resume"):
        log.info("%s: %s: python -m sslrun %s", run.name, "training" if step == "train" else "resuming",
                 " ".join(map(_quote, run.overrides)))
        started = time.time()
        code = train(run)
        problem = status(cfg, run) if not trained(run) else None
        if problem:
            log.error("%s: %s (after %s; output: %s)", run.name, problem, _duration(time.time() - started),
                      run.layout.benchmark_output)
            return
        log.info("%s: %s in %s", run.name, summary(run)["status"], _duration(time.time() - started))
        if code and summary(run)["status"] == "completed":
            log.warning("%s: completed, but exited with code %s", run.name, code)
    if summary(run)["status"] == "completed":
        evaluate(cfg, run)


# ---------------------------------------------------------------------- the table

def _mean_std(values: List[float], digits: int = 3) -> str:
    """'0.763 ± 0.004' (sample standard deviation over seeds), '0.763' for one seed, '–' for none."""
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _numbers(items: List[Optional[float]]) -> List[float]:
    """The finite numbers among `items` (a 3-step run's images/s is nan: no step after warm-up)."""
    return [float(v) for v in items if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _mean(values: List[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


@dataclass
class MethodResults:
    """A method's finished runs and the statuses of the others, read from their directories."""

    method: str
    runs: List[PlannedRun]
    summaries: List[dict]  # of the runs that give numbers
    evals: List[Dict[str, dict]]  # protocol -> eval/<protocol>.json, same order
    problems: List[tuple]  # (seed, status) of the runs that give none
    shared: List[tuple]  # (seed, 'load 4.1 on 2 cores') of the runs with numbers that shared the machine

    @classmethod
    def read(cls, cfg: DictConfig, method: str, runs: List[PlannedRun]) -> "MethodResults":
        summaries, evals, problems, shared = [], [], [], []
        for run in runs:
            problem = status(cfg, run)
            found = summary(run)
            if found is not None and found.get("status") == "completed":
                summaries.append(found)
                evals.append({p: read_json(run.layout.eval_result(p)) or {} for p in protocols_of(cfg, method)})
                load = shared_machine(record(run))
                if load:
                    shared.append((run.seed, load))
            if problem:
                problems.append((run.seed, problem))
        return cls(method, runs, summaries, evals, problems, shared)

    def protocol(self, name: str, key: str = "top1") -> List[float]:
        return _numbers([e.get(name, {}).get(key) for e in self.evals])

    def online(self, key: str) -> List[float]:
        return _numbers([s.get(key) for s in self.summaries])

    def baseline(self, key: str) -> List[float]:
        """Raw-pixel or random-init kNN: the offline kNN protocol's where its JSON has them
        (`top1_pixels`, `top1_random_init`), else the online evaluation's (summary.json)."""
        offline = self.protocol("knn", f"top1_{key}")
        return offline if offline else self.online(f"knn_top1_{key}")


def _seeds_cell(results: MethodResults) -> str:
    """'3', or '2 of 3; seed 2: diverged': the seeds with numbers, and what the others are."""
    total, done = len(results.runs), len(results.summaries)
    if not results.problems:
        return str(total)
    return f"{done} of {total}; " + "; ".join(f"seed {s}: {p.split(':')[0]}" for s, p in results.problems)


def _rate_cell(rates: List[float], shared: List[tuple]) -> str:
    """'157 ± 40' over the seeds, with '(shared machine: seed 0 load 4.1 on 2 cores)' where a run
    shared the machine (a lower bound then)."""
    cell = _mean_std(rates, digits=0)
    if not shared or not rates:
        return cell
    return f"{cell} (shared machine: " + "; ".join(f"seed {s} {load}" for s, load in shared) + ")"


def table(cfg: DictConfig, runs: List[PlannedRun]) -> str:
    """The markdown table, one row per method, from the run directories alone (so mode=table
    and every later invocation give the same), with the runs that give no numbers under it."""
    by_method: Dict[str, List[PlannedRun]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    results = [MethodResults.read(cfg, m, r) for m, r in by_method.items()]
    protocols = _table_protocols(cfg, by_method)
    # a protocol other than kNN that also trained from random init (fine-tune's baselines) gets the
    # baseline's column beside its own; kNN's baselines have their columns below
    columns = [(p, key) for p in protocols
               for key in ("top1", "top1_random_init")
               if key == "top1" or (p != "knn" and any(r.protocol(p, key) for r in results))]
    headers = ["method", *[f"{PROTOCOLS[p]} {'top-1' if key == 'top1' else 'random init'}" for p, key in columns],
               "kNN raw pixels", "kNN random init"]
    zero_shot = any(r.online("zero_shot_top1") for r in results)
    if zero_shot:
        headers.append("zero-shot top-1 (online)")
    headers += ["wall time (train + eval)", "images/s", "seeds", "command (S = seed)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in results:
        train_time = _mean(r.online("wall_time_sec"))
        eval_time = _mean(_numbers([sum(_numbers([e.get(p, {}).get("wall_time_sec") for p in e]))
                                    for e in r.evals]))
        cells = [f"**{r.method}**", *[_mean_std(r.protocol(p, key)) for p, key in columns],
                 _mean_std(r.baseline("pixels")), _mean_std(r.baseline("random_init"))]
        if zero_shot:
            cells.append(_mean_std(r.online("zero_shot_top1")))
        cells += [f"{_duration(train_time)} + {_duration(eval_time or 0)}" if train_time is not None else "–",
                  _rate_cell(r.online("images_per_sec"), r.shared), _seeds_cell(r),
                  f"`{command_template(cfg, r.method)}`"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    notes = [f"- {r.method} seed {seed}: {problem}" for r in results for seed, problem in r.problems]
    return "\n".join(lines + ([""] + ["Runs without numbers:", ""] + notes if notes else []))


def knn_over_time(runs: List[PlannedRun]) -> str:
    """kNN against wall time, one row per run that evaluated during training as well as before and
    after it (summary.json's knn_history, the online evaluation's), and where it first crosses the
    raw-pixel kNN of that same evaluation; '' when no run did."""
    rows = []
    for run in runs:
        found = summary(run)
        history = (found or {}).get("knn_history") or []
        pixels = (found or {}).get("knn_top1_pixels")
        if found is None or found.get("status") != "completed" or len(history) < 3 or pixels is None:
            continue
        points = " → ".join(f"{h['knn_top1']:.3f} ({h['step']}, {_duration(h['wall_time_sec'])})" for h in history)
        crossing = next((h for h in history if h["knn_top1"] > pixels), None)
        if crossing is not None:
            crosses = f"at step {crossing['step']}, {_duration(crossing['wall_time_sec'])} ({crossing['knn_top1']:.3f})"
        else:
            best = max(h["knn_top1"] for h in history)
            crosses = f"not within {_duration(history[-1]['wall_time_sec'])} (best {best:.3f})"
        rows.append(f"| **{run.method}** | {run.seed} | {pixels:.3f} | {points} | {crosses} |")
    if not rows:
        return ""
    return "\n".join([
        "kNN against wall time: the online kNN of each evaluation (the run's own: its bank and queries, "
        "eval_protocol in summary.json) as kNN (step, training wall time), from random init to the end, "
        "and where it first passes the raw-pixel kNN of the same evaluation.", "",
        "| method | seed | kNN raw pixels (online) | kNN (step, wall time) | passes raw pixels |",
        "|---|---|---|---|---|", *rows])


def _table_protocols(cfg: DictConfig, by_method: Dict[str, List[PlannedRun]]) -> List[str]:
    """The table's protocol columns: the suite's, then those only some methods have."""
    names = list(cfg.suite.protocols)
    for method in by_method:
        names += [p for p in protocols_of(cfg, method) if p not in names]
    return names


def _protocol_settings(cfg: DictConfig, runs: List[PlannedRun]) -> List[str]:
    """Each protocol's settings as its first JSON states them (a method's own protocol: for its runs)."""
    lines, by_method = [], {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    for protocol in _table_protocols(cfg, by_method):
        users = [m for m in by_method if protocol in protocols_of(cfg, m)]
        scope = "" if protocol in cfg.suite.protocols else f" ({', '.join(users)} only)"
        used = [r for r in runs if r.method in users]
        found = next((j for j in (read_json(r.layout.eval_result(protocol)) for r in used) if j), None)
        overrides = " ".join(map(_quote, protocols_of(cfg, users[0])[protocol]))
        command = f"`python -m sslrun.evaluate RUN_DIR protocol={protocol}{' ' + overrides if overrides else ''}`"
        settings = found.get("settings") if found else None
        text = json.dumps(settings, sort_keys=True) if settings is not None else "no run evaluated yet"
        lines.append(f"- {protocol}{scope}: {command}; settings: `{_cell(text)}`")
    return lines


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + (" with uncommitted changes" if dirty else "")) if head else "unknown"


def section(cfg: DictConfig, runs: List[PlannedRun], invocation: str) -> str:
    """The suite's part of the results file: header (machine, date, suite), table, protocols."""
    records = [w for w in (record(r) for r in runs) if w]
    machines = sorted({w["machine"] for w in records if w.get("machine")}) or ["no run trained yet"]
    started = sorted(w["started"][:10] for w in records if w.get("started"))
    dates = (started[0] if started[0] == started[-1] else f"{started[0]} to {started[-1]}") if started else "–"
    suite = cfg.suite
    per_method = "; ".join(f"{m}: `{' '.join(map(_quote, map(str, o)))}`" for m, o in suite.methods.items() if o)
    lines = [
        f"## Suite `{suite.name}`: {suite.get('about') or ''}", "",
        f"Written {datetime.now().astimezone():%Y-%m-%d %H:%M %Z} by `{invocation}` (sslrun commit "
        f"{_git_commit()}); runs trained {dates} on: {'; '.join(machines)}.", "",
        f"Every run: `python -m sslrun method=NAME seed=S hydra.run.dir={cfg.root}/NAME/seedS "
        f"{' '.join(map(_quote, map(str, suite.train)))}`"
        + (f", and per method {per_method}" if per_method else "") + " (the command column gives each in full). "
        "Each completed run is then evaluated offline:", "",
        *(_protocol_settings(cfg, runs) or ["- no offline protocol in this suite"]), "",
        "Columns: mean ± sample standard deviation over the seeds that completed; kNN top-1 at k=20 "
        "(the kNN protocol's JSON has the other k); raw-pixel and random-init kNN from the kNN protocol "
        "where it reports them, else from the run's online evaluation (summary.json); a protocol's "
        "'random init' column (fine-tune): the same protocol run from a seeded random init; wall time: "
        "training (its online evaluation included) + the offline protocols, mean per run; images/s: "
        f"training throughput, marked 'shared machine' where the machine's mean 1-minute load during "
        f"training was above {SHARED_LOAD:g} x its cores (something else ran beside it: its wall time "
        f"and images/s understate it; runs recorded before 2026-12-02 18:30 UTC have no load). Machines "
        f"of one description differ in speed by up to 2x between sessions, so seeds trained on different "
        f"days spread images/s: compare speeds within one session (scripts/bench_peers.py).", "",
        table(cfg, runs),
    ]
    over_time = knn_over_time(runs)
    return "\n".join(lines + (["", over_time] if over_time else []))


def write_results(out: Path, suite_name: str, text: str) -> None:
    """Put `text` between this suite's markers in `out` (replacing what was there), keeping the
    rest of the file: one results file holds every suite."""
    begin, end = f"<!-- sslrun.benchmark suite={suite_name}: begin -->", f"<!-- sslrun.benchmark suite={suite_name}: end -->"
    block = f"{begin}\n{text}\n{end}"
    old = out.read_text() if out.is_file() else (
        "# Benchmark results\n\nWritten by `python -m sslrun.benchmark` (README, Benchmark): one section per suite, "
        "each replaced when that suite runs again.\n")
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".tmp")
    partial.write_text(new)
    os.replace(partial, out)


# ---------------------------------------------------------------------- main

def _log_to(root: Path) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    root.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s sslrun.benchmark: %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(root / "benchmark.log")):
        handler.setFormatter(formatter)
        log.addHandler(handler)


def run_benchmark(overrides: Sequence[str] = ()) -> List[PlannedRun]:
    """Compose, plan and (mode=run) train and evaluate what is not finished; write the table.
    The planned runs."""
    cfg = compose_benchmark(overrides)
    runs = plan(cfg)
    for run in runs:
        check_same_command(run)
    invocation = " ".join(["python -m sslrun.benchmark", *(_quote(o) for o in overrides if not o.startswith("mode="))])
    restored = restorable(cfg, runs) if cfg.records else {}  # (records checked before anything is written)
    if cfg.mode == "plan":
        for run in runs:
            step = next_step(cfg, run)
            if run.run_dir in restored:
                step = f"finished (recorded in {restored[run.run_dir]})"
            elif step == "skip":  # its teacher is planned before it
                step = f"train once {', '.join(map(str, run.needs))} completed"
            print(f"{run.name}: {step}: python -m sslrun {' '.join(map(_quote, run.overrides))}")
        return runs
    _log_to(Path(cfg.root))
    restore_records(cfg, runs, restored)
    out = Path(cfg.out)
    if cfg.mode == "run":
        todo = [r for r in runs if next_step(cfg, r) != "finished"]
        log.info("suite %s: %d runs, %d to train or evaluate; results: %s", cfg.suite.name, len(runs), len(todo), out)
        for run in runs:
            execute(cfg, run)
            if cfg.records and next_step(cfg, run) == "finished":
                save_record(cfg, run)
            write_results(out, cfg.suite.name, section(cfg, runs, invocation))
    write_results(out, cfg.suite.name, section(cfg, runs, invocation))
    log.info("results written to %s", out)
    return runs


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stops the training process too (train)
    try:
        run_benchmark(argv)
    except (BenchmarkError, ConfigError) as error:
        print(f"sslrun.benchmark: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sslrun.benchmark: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
