"""`python -m sslrun.benchmark`: planning from the registry, the results table's arithmetic, resuming
without re-running, and statuses of runs that failed. The fast tests read run directories filled
with recorded summary.json and eval/<protocol>.json files, as training and sslrun.evaluate write
them; the slow test trains and evaluates for real."""

import json
import math
import re
import shlex
import statistics

import pytest
import yaml

from sslrun import benchmark
from sslrun.benchmark import compose_benchmark, main, next_step, plan, write_results
from sslrun.methods.registry import METHODS, MethodSpec, registered
from tests.conftest import TINY

# Cheap methods for 3 steps on the 5,000 MNIST digits; byol has an override of its own; a short
# linear protocol (one lr, 5 epochs).
TINY_SUITE = {
    "name": "tiny",
    "about": "two cheap methods, 3 steps",
    "train": ["data=mnist5k", *TINY, "trainer.max_steps=3", "eval.enabled=false", "eval.pictures=0"],
    "methods": {"byol": ["method.predictor_mlp.out_dim=64"]},
    "protocols": {"knn": [], "linear": ["protocol.epochs=5", "protocol.lr=[0.1]", "protocol.weight_decay=[0.0]"]},
}


@pytest.fixture
def suite_dir(tmp_path):
    """A directory of suites holding tiny.yaml: given to the benchmark with hydra.searchpath."""
    (tmp_path / "suites" / "suite").mkdir(parents=True)
    (tmp_path / "suites" / "suite" / "tiny.yaml").write_text(yaml.safe_dump(TINY_SUITE))
    return tmp_path / "suites"


def tiny_args(tmp_path, suite_dir, *extra):
    return ["suite=tiny", f"hydra.searchpath=[file://{suite_dir}]", f"root={tmp_path / 'runs'}",
            f"out={tmp_path / 'results.md'}", *extra]


def finish(run, knn=None, linear=None, status="completed", reason=None, wall=100.0, rate=250.0,
           pixels=0.825, random_init=0.2, load=2.1, history=()):
    """A run directory as the benchmark leaves it: benchmark.json with the planned command,
    summary.json, and the protocols' JSONs (those given)."""
    layout = run.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    (layout.root / ".hydra").mkdir(exist_ok=True)
    layout.benchmark_record.write_text(json.dumps({
        "command": run.overrides, "machine": "Test CPU, 2 CPU cores, no GPU, torch 2.14.1",
        "started": "2026-11-27T10:00:00+00:00", "exit_code": 0 if status == "completed" else 1,
        "cores": 2, "load_average": load}))
    layout.summary.write_text(json.dumps({
        "method": run.method, "status": status, "reason": reason, "knn_top1": 0.5,
        "knn_top1_pixels": pixels, "knn_top1_random_init": random_init,
        "wall_time_sec": wall, "images_per_sec": rate,
        "knn_history": [{"step": step, "wall_time_sec": t, "knn_top1": k} for step, t, k in history]}))
    for protocol, top1 in (("knn", knn), ("linear", linear)):
        if top1 is not None:
            layout.eval_dir.mkdir(exist_ok=True)
            layout.eval_result(protocol).write_text(json.dumps({
                "top1": top1, "settings": {"protocol": protocol, "k": 20}, "wall_time_sec": 10.0}))


def table_rows(markdown: str) -> dict:
    """method -> {column header: cell} of the results table."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    headers = split[0]
    return {row[0].strip("*"): dict(zip(headers, row)) for row in split[2:]}


def mean_std(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def test_every_registered_method_is_planned_with_no_edit(monkeypatch, tmp_path):
    """The plan is the registry's: a method registered now (no YAML, no benchmark edit) is in it;
    every seed of every method has its run directory and command; distillation runs after the
    dinov2 run of its seed and learns from it."""
    spec = next(iter(registered().values()))
    monkeypatch.setitem(METHODS, "brand_new", MethodSpec("brand_new", spec.cls, spec.schema, 2, False, ()))
    cfg = compose_benchmark(["seeds=2", f"root={tmp_path}"])
    runs = plan(cfg)
    assert {(r.method, r.seed) for r in runs} == {(m, s) for m in registered() for s in (0, 1)}
    for run in runs:
        assert run.run_dir == tmp_path / run.method / f"seed{run.seed}"
        assert run.overrides[:3] == [f"method={run.method}", f"seed={run.seed}", f"hydra.run.dir={run.run_dir}"]
        assert "trainer.progress_bar=false" in run.overrides  # the quick suite's only override
    order = [(r.method, r.seed) for r in runs]
    assert order.index(("dinov2", 1)) < order.index(("dinov2_distill", 1))
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)  # seed by seed: every method's seed 0 first
    distill = next(r for r in runs if r.method == "dinov2_distill" and r.seed == 1)
    assert f"method.teacher_run={tmp_path / 'dinov2' / 'seed1'}" in distill.overrides
    assert distill.needs == [tmp_path / "dinov2" / "seed1"]
    # methods=[...] picks some; the teacher a picked method needs comes with it
    only = plan(compose_benchmark(["seeds=1", "methods=[dinov2_distill,byol]", f"root={tmp_path}"]))
    assert [r.method for r in only] == ["byol", "dinov2", "dinov2_distill"]


def test_every_suite_composes(tmp_path):
    """Each shipped suite's commands are ones the training app accepts (all keys exist, all types
    right): the overrides every method gets, and each method's own."""
    from sslrun.config import compose

    for suite in ("quick", "long", "gpu"):
        cfg = compose_benchmark([f"suite={suite}", "seeds=1", f"root={tmp_path}"])
        assert set(cfg.suite.protocols) >= {"knn", "linear"}
        own = {"simclr", *cfg.suite.methods, *cfg.method_overrides}
        for run in [r for r in plan(cfg) if r.method in own]:
            composed = compose([o for o in run.overrides if not o.startswith("hydra.")], method_schema=False)
            assert composed.method.name == run.method and composed.seed == 0


def test_table_gives_mean_and_std_over_seeds_from_the_runs_files(tmp_path, suite_dir, capsys):
    """One row per method; kNN and linear top-1 are the mean ± sample std of the seeds'
    eval/<protocol>.json (checked against the files), baselines, wall time and images/s from
    summary.json; the command column is the exact training command, runnable in a shell loop;
    the header names machine, date and suite. A second invocation trains and evaluates nothing."""
    args = tiny_args(tmp_path, suite_dir, "seeds=3", "methods=[simclr,byol]")
    runs = plan(compose_benchmark(args))
    values = {("simclr", 0): (0.61, 0.52), ("simclr", 1): (0.65, 0.50), ("simclr", 2): (0.66, 0.57),
              ("byol", 0): (0.41, 0.30), ("byol", 1): (0.47, 0.33), ("byol", 2): (0.40, 0.31)}
    for run in runs:
        knn, linear = values[run.method, run.seed]
        finish(run, knn, linear, wall=100.0 + 10 * run.seed, rate=200.0 + run.seed, random_init=0.2 + 0.01 * run.seed)
    mtimes = {r.run_dir: r.layout.summary.stat().st_mtime_ns for r in runs}

    assert main(args) == 0  # everything finished: mode=run trains and evaluates nothing
    err = capsys.readouterr().err
    assert err.count("skipping finished run") == len(runs) == 6
    assert {r.run_dir: r.layout.summary.stat().st_mtime_ns for r in runs} == mtimes
    assert not any("training" in line or "evaluating" in line for line in err.splitlines())

    markdown = (tmp_path / "results.md").read_text()
    rows = table_rows(markdown)
    assert list(rows) == ["simclr", "byol"]  # registry order
    for method, row in rows.items():
        files = [r for r in runs if r.method == method]
        knn = [json.loads(r.layout.eval_result("knn").read_text())["top1"] for r in files]
        linear = [json.loads(r.layout.eval_result("linear").read_text())["top1"] for r in files]
        summaries = [json.loads(r.layout.summary.read_text()) for r in files]
        assert row["kNN top-1"] == mean_std(knn)
        assert row["linear top-1"] == mean_std(linear)
        assert row["kNN random init"] == mean_std([s["knn_top1_random_init"] for s in summaries])
        assert row["kNN raw pixels"] == "0.825 ± 0.000"
        rates = [s["images_per_sec"] for s in summaries]
        assert row["images/s"] == f"{statistics.mean(rates):.0f} ± {statistics.stdev(rates):.0f}"
        assert row["wall time (train + eval)"] == "1m 50s + 20s"  # mean of 100, 110, 120 s; 2 x 10 s
        assert row["seeds"] == "3"
        command = row["command (S = seed)"].strip("`")
        for run in files:  # the shell fills in $S: the very command the benchmark ran
            assert shlex.split(command.replace("$S", str(run.seed))) == ["python", "-m", "sslrun", *run.overrides]
    assert mean_std([0.61, 0.65, 0.66]) == "0.640 ± 0.026"  # the arithmetic, by hand: sd = sqrt(0.0014 / 2)
    assert "Test CPU, 2 CPU cores, no GPU, torch 2.14.1" in markdown and "2026-11-27" in markdown
    assert "## Suite `tiny`: two cheap methods, 3 steps" in markdown
    assert "trainer.max_steps=3" in markdown and "method.predictor_mlp.out_dim=64" in markdown
    assert '{"k": 20, "protocol": "linear"}' in markdown  # each protocol's settings, from its JSON


def test_a_run_that_shared_the_machine_is_marked(tmp_path, suite_dir):
    """A mean load above 1.5 x the cores (3 on 2) marks the images/s cell with the seed and load;
    load at the run's own cores, or no load recorded, leaves it plain."""
    args = tiny_args(tmp_path, suite_dir, "seeds=3", "methods=[simclr,byol]", "mode=table")
    for run in plan(compose_benchmark(args)):
        load = {("simclr", 1): 4.12, ("simclr", 2): 3.0, ("byol", 0): None}.get((run.method, run.seed), 2.2)
        finish(run, 0.6, 0.5, rate=200.0, load=load)
    assert main(args) == 0
    rows = table_rows((tmp_path / "results.md").read_text())
    assert rows["simclr"]["images/s"] == "200 ± 0 (shared machine: seed 1 load 4.1 on 2 cores)"
    assert rows["byol"]["images/s"] == "200 ± 0"


def test_a_methods_own_protocol_runs_for_it_only_and_gets_a_column(tmp_path, suite_dir):
    """suite.method_protocols (MAE's fine-tuning): only that method's runs miss it until its JSON
    is there, the table gets its column ("–" for the others), and the protocols list says whose."""
    suite = {**TINY_SUITE, "method_protocols": {"byol": {"finetune": ["protocol.max_steps=2"]}}}
    (suite_dir / "suite" / "tiny.yaml").write_text(yaml.safe_dump(suite))
    args = tiny_args(tmp_path, suite_dir, "seeds=2", "methods=[simclr,byol]", "mode=table")
    cfg = compose_benchmark(args)
    runs = plan(cfg)
    for run in runs:
        finish(run, 0.6, 0.5)
    assert {r.method: benchmark.missing_protocols(cfg, r) for r in runs} == {"simclr": [], "byol": ["finetune"]}
    assert benchmark.protocols_of(cfg, "byol")["finetune"] == ["protocol.max_steps=2"]
    for run, top1, baseline in zip([r for r in runs if r.method == "byol"], (0.7, 0.8), (0.4, 0.6)):
        run.layout.eval_result("finetune").write_text(
            json.dumps({"top1": top1, "top1_random_init": baseline, "wall_time_sec": 5.0}))
    assert not any(benchmark.missing_protocols(cfg, r) for r in runs)
    assert main(args) == 0
    markdown = (tmp_path / "results.md").read_text()
    rows = table_rows(markdown)
    assert rows["byol"]["fine-tune top-1"] == mean_std([0.7, 0.8]) and rows["simclr"]["fine-tune top-1"] == "–"
    # fine-tuning's random-init baseline gets its own column, right after fine-tune's
    assert rows["byol"]["fine-tune random init"] == mean_std([0.4, 0.6])
    assert rows["simclr"]["fine-tune random init"] == "–"
    assert list(rows["byol"]).index("fine-tune random init") == list(rows["byol"]).index("fine-tune top-1") + 1
    assert "- finetune (byol only): `python -m sslrun.evaluate RUN_DIR protocol=finetune protocol.max_steps=2`" in markdown


def test_knn_against_wall_time_says_where_each_run_passes_raw_pixels(tmp_path, suite_dir):
    """A run evaluated during training gets a row of its knn_history and the first evaluation above
    its raw-pixel kNN, or its best when none is; a run evaluated only before and after gets none."""
    args = tiny_args(tmp_path, suite_dir, "seeds=2", "methods=[simclr,byol]", "mode=table")
    histories = {("simclr", 0): [(0, 0.5, 0.3), (100, 70.0, 0.81), (200, 135.0, 0.84), (300, 200.0, 0.86)],
                 ("simclr", 1): [(0, 0.5, 0.3), (100, 65.0, 0.80), (200, 130.0, 0.82)],
                 ("byol", 0): [(0, 0.5, 0.3), (300, 190.0, 0.9)]}
    for run in plan(compose_benchmark(args)):
        finish(run, 0.6, 0.5, pixels=0.825, history=histories.get((run.method, run.seed), ()))
    assert main(args) == 0
    markdown = (tmp_path / "results.md").read_text()
    rows = {(r[0].strip("*"), r[1]): r for r in (
        [c.strip() for c in line.split("|")[1:-1]] for line in markdown.splitlines()
        if line.startswith("| **") and line.count("|") == 6)}
    assert set(rows) == {("simclr", "0"), ("simclr", "1")}
    assert rows[("simclr", "0")][3] == "0.300 (0, 0s) → 0.810 (100, 1m 10s) → 0.840 (200, 2m 15s) → 0.860 (300, 3m 20s)"
    assert rows[("simclr", "0")][4] == "at step 200, 2m 15s (0.840)"
    assert rows[("simclr", "1")][4] == "not within 2m 10s (best 0.820)"
    assert rows[("simclr", "0")][2] == "0.825"


def test_train_records_the_machine_load_over_the_run(tmp_path, suite_dir, monkeypatch):
    """benchmark.json gets the mean of the load samples taken while the training process ran."""
    args = tiny_args(tmp_path, suite_dir, "methods=[simclr]")
    run = plan(compose_benchmark(args))[0]
    monkeypatch.setattr(benchmark, "LOAD_SAMPLE_SEC", 0.05)
    samples = iter([1.0, 3.0, 5.0] + [5.0] * 1000)
    monkeypatch.setattr(benchmark.os, "getloadavg", lambda: (next(samples), 0.0, 0.0))
    monkeypatch.setattr(run, "overrides", ["--cfg", "job"])  # a real child process that ends quickly
    assert benchmark.train(run) == 0
    written = json.loads(run.layout.benchmark_record.read_text())
    assert written["cores"] == benchmark.usable_cores() and written["exit_code"] == 0
    assert written["load_average"] >= 3.0  # the mean of at least the first three samples


def test_failed_killed_and_diverged_runs_show_their_status(tmp_path, suite_dir):
    """Runs that give no numbers are counted out of the means and named with their status."""
    args = tiny_args(tmp_path, suite_dir, "seeds=3", "methods=[simclr,byol,mocov2]", "mode=table")
    runs = {(r.method, r.seed): r for r in plan(compose_benchmark(args))}
    finish(runs["simclr", 0], 0.60, 0.50)
    finish(runs["simclr", 1], 0.64, 0.54)
    finish(runs["simclr", 2], status="diverged", reason="train/loss is nan at step 2")
    finish(runs["byol", 0], 0.40)  # trained, linear not evaluated (yet)
    finish(runs["byol", 1], status="failed", reason="CUDA out of memory")
    killed = runs["byol", 2].layout
    killed.root.mkdir(parents=True)
    killed.benchmark_record.write_text(json.dumps({"command": runs["byol", 2].overrides, "exit_code": -9}))
    broken = runs["mocov2", 0].layout
    broken.root.mkdir(parents=True)
    broken.benchmark_record.write_text(json.dumps({"command": runs["mocov2", 0].overrides, "exit_code": 2}))
    broken.benchmark_output.write_text("starting\nsslrun: error: data.batch_size=256: the global batch must divide\n")

    assert main(args) == 0
    markdown = (tmp_path / "results.md").read_text()
    rows = table_rows(markdown)
    assert rows["simclr"]["kNN top-1"] == mean_std([0.60, 0.64])
    assert rows["simclr"]["seeds"] == "2 of 3; seed 2: diverged"
    assert rows["byol"]["kNN top-1"] == "0.400" and rows["byol"]["linear top-1"] == "–"
    assert rows["byol"]["seeds"] == "1 of 3; seed 0: not evaluated; seed 1: failed; seed 2: killed (SIGKILL), no summary.json"
    assert rows["mocov2"]["seeds"].startswith("0 of 3; seed 0: failed (exit code 2); seed 1: not run")
    assert "- simclr seed 2: diverged: train/loss is nan at step 2" in markdown
    assert "- byol seed 0: not evaluated: linear" in markdown
    assert "- byol seed 1: failed: CUDA out of memory" in markdown
    assert "- mocov2 seed 0: failed (exit code 2): sslrun: error: data.batch_size=256: the global batch must divide" in markdown


def test_what_a_second_invocation_does_with_each_run(tmp_path, suite_dir):
    """Resume rules: finished runs are left alone, a diverged one too (the same budget diverges
    again); a completed run without all its protocols is only evaluated; a run directory without
    a completed summary is trained again (resume=auto continues it); a run whose teacher did not
    complete is skipped."""
    cfg = compose_benchmark(tiny_args(tmp_path, suite_dir, "seeds=1", "methods=[simclr,byol,mocov2,vicreg,dinov2_distill]"))
    runs = {r.method: r for r in plan(cfg)}
    finish(runs["simclr"], 0.6, 0.5)
    finish(runs["byol"], 0.6)
    finish(runs["mocov2"], status="diverged", reason="nan")
    finish(runs["vicreg"], status="failed", reason="interrupted (exit code 130)")
    finish(runs["dinov2"], status="preempted")
    steps = {m: next_step(cfg, r) for m, r in runs.items()}
    assert steps == {"simclr": "finished", "byol": "evaluate", "mocov2": "finished", "vicreg": "resume",
                     "dinov2": "resume", "dinov2_distill": "skip"}
    runs["vicreg"].layout.summary.unlink()  # killed before it wrote one
    assert next_step(cfg, runs["vicreg"]) == "resume"
    finish(runs["dinov2"])
    assert next_step(cfg, runs["dinov2_distill"]) == "train"


def test_a_protocol_that_fails_is_reported_and_the_benchmark_goes_on(tmp_path, suite_dir, capsys):
    """sslrun.evaluate refuses a run without backbone.safetensors: the benchmark logs it, records
    the error beside the missing protocol in the table, and exits 0; the next invocation tries
    that protocol again (and only it)."""
    args = tiny_args(tmp_path, suite_dir, "seeds=1", "methods=[simclr]")
    run = plan(compose_benchmark(args))[0]
    finish(run, knn=0.6)  # trained, kNN done, linear not yet, and no backbone.safetensors
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "simclr seed 0: evaluating linear" in err and "evaluating knn" not in err
    assert "simclr seed 0: linear failed: ConfigError: " in err
    markdown = (tmp_path / "results.md").read_text()
    assert table_rows(markdown)["simclr"]["seeds"] == "1 of 1; seed 0: not evaluated"
    assert "- simclr seed 0: not evaluated: linear (ConfigError: " in markdown and "backbone.safetensors" in markdown
    assert main(args) == 0
    assert capsys.readouterr().err.count("evaluating linear") == 1


def test_a_run_dir_trained_with_another_command_is_refused(tmp_path, suite_dir, capsys):
    """Editing the suite and reusing its root would put two budgets in one row: one-line error."""
    args = tiny_args(tmp_path, suite_dir, "seeds=1", "methods=[simclr]")
    run = plan(compose_benchmark(args))[0]
    finish(run, 0.6, 0.5)
    assert main([*args, "suite.train=['trainer.max_steps=5']"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sslrun.benchmark: error: ") and "give another root=" in err and "\n" not in err


def test_records_carry_finished_runs_to_another_root(tmp_path, suite_dir, capsys):
    """records=DIR keeps what the table reads of each finished run; a benchmark under another root
    (another machine, the run directories gone) with the same records counts them as finished,
    trains only the rest, and gives the same numbers. A run not finished is not recorded; a
    record of another command is a one-line error."""
    records = tmp_path / "records"
    args = tiny_args(tmp_path, suite_dir, "seeds=2", "methods=[simclr,byol]", f"records={records}")
    runs = {(r.method, r.seed): r for r in plan(compose_benchmark(args))}
    finish(runs["simclr", 0], 0.60, 0.50)
    finish(runs["simclr", 1], 0.64, 0.52)
    finish(runs["byol", 0], 0.40, 0.30)
    finish(runs["byol", 1], 0.41)  # linear missing, and it cannot be evaluated (no weights): not finished
    assert main(args) == 0
    first = table_rows((tmp_path / "results.md").read_text())
    recorded = sorted(p.relative_to(records).as_posix() for p in records.rglob("*") if p.is_file())
    assert recorded == [f"{m}/seed{s}/{f}" for m, s in (("byol", 0), ("simclr", 0), ("simclr", 1))
                        for f in ("benchmark.json", "eval/knn.json", "eval/linear.json", "summary.json")]

    moved = [a.replace(f"root={tmp_path / 'runs'}", f"root={tmp_path / 'elsewhere'}") for a in args]
    capsys.readouterr()
    assert main([*moved, "mode=plan"]) == 0
    planned = capsys.readouterr().out
    assert planned.count(f"finished (recorded in {records}") == 3 and "byol seed 1: train: " in planned
    assert not (tmp_path / "elsewhere").exists()  # planning copies nothing
    assert main([*moved, "mode=table"]) == 0
    second = table_rows((tmp_path / "results.md").read_text())
    command = "command (S = seed)"
    assert {k: v for k, v in second["simclr"].items() if k != command} == \
        {k: v for k, v in first["simclr"].items() if k != command}
    assert second["simclr"][command] == first["simclr"][command].replace(str(tmp_path / "runs"), str(tmp_path / "elsewhere"))
    assert second["byol"]["kNN top-1"] == "0.400" and second["byol"]["seeds"] == "1 of 2; seed 1: not run"

    again = [a.replace(f"root={tmp_path / 'runs'}", f"root={tmp_path / 'third'}") for a in args]
    capsys.readouterr()
    assert main([*again, "suite.train=['trainer.max_steps=5']"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sslrun.benchmark: error: ") and "give another records=" in err and "\n" not in err
    assert not (tmp_path / "third").exists()  # refused before anything was written


def test_a_teacher_is_restored_from_records_only_with_its_student(tmp_path, suite_dir):
    """A record has no weights: a dinov2 run is restored only when the distillation run that
    learns from it is finished too; otherwise both train."""
    args = tiny_args(tmp_path, suite_dir, "seeds=1", "methods=[dinov2_distill]", f"records={tmp_path / 'records'}")
    cfg = compose_benchmark(args)
    runs = {r.method: r for r in plan(cfg)}
    moved = compose_benchmark([*args, f"root={tmp_path / 'elsewhere'}"])
    finish(runs["dinov2"], 0.5, 0.4)
    benchmark.save_record(cfg, runs["dinov2"])
    assert benchmark.restorable(moved, plan(moved)) == {}
    finish(runs["dinov2_distill"], 0.6, 0.5)
    benchmark.save_record(cfg, runs["dinov2_distill"])
    assert set(benchmark.restorable(moved, plan(moved))) == {r.run_dir for r in plan(moved)}


@pytest.mark.parametrize("args, message", [
    (["suite=nope"], "suite=nope: no such suite; choose one of: gpu, long, quick"),
    (["suite=lng"], "suite=lng: no such suite; did you mean 'long'? choose one of: gpu, long, quick"),
    (["methods=[simclr,nope]"], "methods: no method 'nope'; choose from simclr,"),
    (["methods=[simclr,vicrg]"], "methods: no method 'vicrg'; did you mean 'vicreg'? choose from simclr,"),
    (["seeds=0"], "seeds=0: give a number of seeds"),
    (["mode=go"], "mode=go: choose one of: run, plan, table"),
    (["mode=plna"], "mode=plna: did you mean 'plan'? choose one of: run, plan, table"),
    (["+suite.protocols.linaer=[]"], "suite.protocols: no protocol 'linaer'"),
])
def test_bad_arguments_are_one_line_errors(args, message, tmp_path, capsys):
    mode = [] if any(a.startswith("mode=") for a in args) else ["mode=plan"]
    assert main([*args, f"root={tmp_path}", *mode]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sslrun.benchmark: error: ") and message in err and err.count("\n") == 1


def test_the_results_file_keeps_every_suites_section(tmp_path):
    """One docs/results.md for all suites: a suite's run replaces its own section only."""
    out = tmp_path / "results.md"
    write_results(out, "quick", "quick table v1")
    write_results(out, "long", "long table")
    write_results(out, "quick", "quick table v2")
    text = out.read_text()
    assert text.startswith("# Benchmark results")
    assert "quick table v2" in text and "long table" in text and "v1" not in text
    assert text.index("quick table v2") < text.index("long table")


def test_mean_std_formatting():
    assert benchmark._mean_std([]) == "–"
    assert benchmark._mean_std([0.7634]) == "0.763"
    assert benchmark._mean_std([0.5, 0.7]) == f"0.600 ± {math.sqrt(0.02):.3f}"
    assert benchmark._mean_std([150.0, 210.0], digits=0) == f"180 ± {math.sqrt(1800):.0f}"


@pytest.mark.slow
def test_benchmark_trains_evaluates_and_resumes_for_real(tmp_path, suite_dir):
    """The tiny suite end to end: real training processes and sslrun.evaluate; a method that
    cannot start shows its exit status; the second invocation re-runs nothing; a run missing
    one protocol's JSON is evaluated again and not retrained."""
    import subprocess
    import sys

    from tests.conftest import REPO

    suite = {**TINY_SUITE, "methods": {**TINY_SUITE["methods"], "mocov2": ["trainer.devices=3"]}}
    (suite_dir / "suite" / "tiny.yaml").write_text(yaml.safe_dump(suite))
    args = tiny_args(tmp_path, suite_dir, "seeds=1", "methods=[simclr,mocov2]")  # (means over seeds: fast tests)

    def benchmark_cli():
        result = subprocess.run([sys.executable, "-m", "sslrun.benchmark", *args], cwd=REPO, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    benchmark_cli()
    runs = plan(compose_benchmark(args))
    rows = table_rows((tmp_path / "results.md").read_text())
    assert list(rows) == ["simclr", "mocov2"]
    for method in ("simclr",):
        files = [r for r in runs if r.method == method]
        knn = [json.loads(r.layout.eval_result("knn").read_text())["top1"] for r in files]
        linear = [json.loads(r.layout.eval_result("linear").read_text())["top1"] for r in files]
        assert rows[method]["kNN top-1"] == f"{knn[0]:.3f}" and rows[method]["linear top-1"] == f"{linear[0]:.3f}"
        assert rows[method]["seeds"] == "1"
        assert all(json.loads(r.layout.summary.read_text())["global_step"] == 3 for r in files)
    assert rows["mocov2"]["seeds"] == "0 of 1; seed 0: failed (exit code 2)"

    finished = [r for r in runs if r.method != "mocov2"]
    mtimes = {r.run_dir: r.layout.summary.stat().st_mtime_ns for r in finished}
    finished[0].layout.eval_result("linear").unlink()
    err = benchmark_cli()
    assert "simclr seed 0: training" not in err and "simclr seed 0: resuming" not in err
    assert "simclr seed 0: evaluating linear" in err and "evaluating knn" not in err
    assert {r.run_dir: r.layout.summary.stat().st_mtime_ns for r in finished} == mtimes  # nothing retrained
    assert finished[0].layout.eval_result("linear").is_file()
