"""The README's commands work as shown.

Every `python -m sslrun...` of the README, in its code blocks and its inline code (training runs and
sweeps, `sslrun.evaluate`, `sslrun.benchmark`; and `make train|benchmark ARGS=...`), is split as the
shell splits it and put through the checks its app makes before anything starts: Hydra's
composition, the typed schemas, each method's own check, the evaluation's source checks, the
benchmark's plan; every job of a sweep; and `scripts/bench_peers.py`'s sslrun overrides, composed for
each method it names. (The two checks made inside the running Hydra app,
torchrun's shared run directory and a local sweep of several processes, are tested in
tests/distributed/test_scale_out.py and tests/config/test_config.py.) Under a console example, the
`sslrun: error:` line must be what the command prints (`... error:`: what the run logs when it
builds its data). So a renamed key, a removed option or a reworded error fails here rather than
for the user who copies the command. Nothing is trained.

What a command needs on disk is made in a scratch directory it runs in: RUN_DIR is a finished run,
a `method.teacher_run` a finished DINOv2 run matching the student (as the README's preceding command
trains), `weights=` a file, the evaluation's diverged run example a run that diverged.
"""

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

from tests.conftest import REPO, load_script, write_finished_run

PEERS = "scripts/bench_peers.py"  # takes sslrun overrides for both its sides
PLACEHOLDER = re.compile(r"\bNAME\b|<[a-z ]+>|\||/path/to/")  # method=NAME, multirun/<date>, clip|siglip (and "...")
APPS = ("sslrun", "sslrun.evaluate", "sslrun.benchmark", PEERS)  # sslrun.report reads finished runs only
MAKE_TARGETS = {"train": "sslrun", "benchmark": "sslrun.benchmark"}  # make TARGET ARGS="...": the app's arguments


@dataclass
class Command:
    line: int
    app: str
    args: List[str]
    error: Optional[str] = None  # the error shown under a console example
    logged: bool = False  # the error is the run's log line (`... error:`), not the command line's


def _split(text: str, line: int, error: Optional[str] = None, logged: bool = False) -> Optional[Command]:
    words = shlex.split(text, comments=True)
    if words[:1] == ["make"] and len(words) == 3 and words[1] in MAKE_TARGETS and words[2].startswith("ARGS="):
        return Command(line, MAKE_TARGETS[words[1]], shlex.split(words[2].removeprefix("ARGS=")))
    if PEERS in words:
        return Command(line, PEERS, words[words.index(PEERS) + 1:])
    starts = [i for i in range(len(words) - 1) if words[i] == "-m" and words[i + 1].startswith("sslrun")]
    return Command(line, words[starts[0] + 1], words[starts[0] + 2:], error, logged) if starts else None


def readme_commands() -> List[Command]:
    """The README's commands, in order, but those with a placeholder."""
    lines = (REPO / "README.md").read_text().splitlines()
    found, fenced, index = [], False, 0
    while index < len(lines):
        text, number = lines[index].strip(), index + 1
        if text.startswith("```"):
            fenced = not fenced
        elif fenced:
            while text.endswith("\\") and index + 1 < len(lines):  # a command continued on the next line
                index += 1
                text = text[:-1] + " " + lines[index].strip()
            shown = lines[index + 1].strip() if index + 1 < len(lines) else ""  # under a console example
            error = shown.partition("error: ")[2] if text.startswith("$ ") and " error: " in f" {shown}" else None
            if "-m sslrun" in text or PEERS in text or re.match(r"make \S+ ARGS=", text):
                found.append(_split(text.removeprefix("$ "), number, error, logged=shown.startswith("...")))
        else:  # inline code with arguments (a bare `python -m sslrun.evaluate` names the app)
            codes = re.findall(r"`([^`]*-m sslrun\S* [^`]+|make \S+ ARGS=[^`]+)`", text)
            found += [_split(code, number) for code in codes]
        index += 1
    return [c for c in found
            if c and c.app in APPS and not PLACEHOLDER.search(" ".join(c.args)) and "..." not in c.args]


COMMANDS = readme_commands()


def test_the_readme_shows_commands_of_every_app_and_error_examples():
    """The parser finds what the README has (so the test below cannot pass by finding nothing)."""
    assert {c.app for c in COMMANDS} == set(APPS)
    assert len(COMMANDS) >= 90
    assert sum(c.error is not None for c in COMMANDS) >= 10
    assert any(c.app == "sslrun" and "-m" in c.args for c in COMMANDS)  # a sweep


def jobs(overrides: List[str]) -> List[List[str]]:
    """The overrides of each job of a sweep (`key=a,b`), as Hydra expands them; one job otherwise."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = [[f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in OverridesParser.create().parse_overrides(overrides)]
    return [list(job) for job in itertools.product(*choices)]


def training_problem(overrides: List[str]) -> Optional[str]:
    """What `python -m sslrun OVERRIDES` prints before it starts, or None: the whole config's check
    (the method's schema and check included), worded as the command line's check words it where
    that check finds the problem first."""
    from sslrun.__main__ import check_overrides
    from sslrun.config import compose

    try:
        compose(overrides)
    except Exception as error:  # noqa: BLE001  (Hydra's own, worded by check_overrides)
        return check_overrides(overrides) or str(error)
    return None


def make_teachers(overrides: List[str]) -> None:
    """A finished DINOv2 run at each `method.teacher_run` not yet there: the student's command as
    method=dinov2 (the same recipe, data and heads)."""
    from sslrun.config import compose

    for override in overrides:
        key, _, teacher = override.partition("=")
        if key == "method.teacher_run" and not Path(teacher).exists():
            own = [o for o in overrides if not o.startswith(("method=", "method.teacher_run="))]
            write_finished_run(Path(teacher), compose(["method=dinov2", *own]))


def check_training(command: Command) -> Optional[str]:
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(command.args)
    for job in jobs(args.overrides) if args.multirun else [args.overrides]:
        make_teachers(job)
        problem = training_problem(job) or (logged_data_problem(job) if command.logged else None)
        if problem:
            return problem
    return None


def logged_data_problem(overrides: List[str]) -> Optional[str]:
    """The error a run logs when it builds its data, or None."""
    from sslrun.config import compose
    from sslrun.data.datasets import DataError
    from sslrun.train import build_data

    try:
        build_data(compose(overrides))
    except DataError as error:
        return str(error)
    return None


def check_peers(command: Command) -> Optional[str]:
    """scripts/bench_peers.py's options, and each method's config as both its sides compose it."""
    bench_peers = load_script("bench_peers")
    options = bench_peers.arguments().parse_args(command.args)
    methods = options.methods.split(",")
    if problem := bench_peers.methods_problem(methods):
        return problem
    for method in methods:
        overrides = bench_peers.overrides(method, 0, options.steps, Path("peers"), options.overrides)
        problem = training_problem([o for o in overrides if not o.startswith("hydra.run.dir=")])
        if problem:
            return problem
    return None


def check_evaluation(command: Command) -> Optional[str]:
    from sslrun.evaluate.__main__ import check, parse

    _, run_dir, own, training = parse(command.args)
    return next((p for p in (check(run_dir, job, training) for job in jobs(own)) if p), None)


def check_benchmark(command: Command, capsys) -> Optional[str]:
    from sslrun.benchmark import main

    code = main([*command.args, "root=benchmark_runs", "mode=plan"])  # plan: what it would run, nothing more
    err = capsys.readouterr().err
    return err.strip().partition("error: ")[2] if code else None


@pytest.fixture(scope="module")
def default_config():
    from sslrun.config import compose

    return compose([])


@pytest.fixture
def scratch(tmp_path, monkeypatch, default_config) -> Path:
    """The directory the commands run in, with what they need there."""
    import json

    from sslrun.run_dir import RunDir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MY_TEAM_TOKEN", "secret-from-the-environment")  # the README's ${oc.env:MY_TEAM_TOKEN}
    RunDir(write_finished_run(tmp_path / "RUN_DIR", default_config)).backbone.touch()
    Path("w.safetensors").touch()
    diverged = RunDir(tmp_path / "outputs/2026-12-01/10-00-00")
    diverged.summary.parent.mkdir(parents=True)
    diverged.summary.write_text(json.dumps({"status": "diverged", "reason": "non-finite loss at step 7"}))
    return tmp_path


@pytest.mark.parametrize("command", COMMANDS, ids=[f"README.md:{c.line}" for c in COMMANDS])
def test_a_readme_command_passes_every_check_or_fails_as_the_readme_shows(command, scratch, capsys):
    if command.app == "sslrun":
        problem = check_training(command)
    elif command.app == "sslrun.evaluate":
        problem = check_evaluation(command)
    elif command.app == PEERS:
        problem = check_peers(command)
    else:
        problem = check_benchmark(command, capsys)
    assert problem == command.error, f"README.md:{command.line}: {command.app} {shlex.join(command.args)}"
