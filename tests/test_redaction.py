"""Secrets never land in run files (sslrun/redaction.py)."""

import logging
import secrets

import pytest
from omegaconf import OmegaConf

from sslrun.redaction import RedactingFilter, redact, redact_yaml_files, secret_values
from tests.conftest import TINY, needs_fashion_mnist, read_summary, run_cli

TOKEN = "tok_" + secrets.token_hex(10)
ENV = {"MY_API_TOKEN": TOKEN, "WANDB_API_KEY": secrets.token_hex(20), "TOKENIZERS_PARALLELISM": "false",
       "db_secret": "s3cr3t-pass", "PATH": "/usr/bin:/bin"}


def test_secrets_are_named_so_and_long_enough():
    assert secret_values(ENV) == {ENV["WANDB_API_KEY"]: "WANDB_API_KEY", "s3cr3t-pass": "db_secret",
                                  TOKEN: "MY_API_TOKEN"}  # longest first; a switch like "false" is no secret


def test_redact_replaces_secrets_in_nested_strings_with_where_they_came_from(monkeypatch):
    config = {"logger": {"tags": [TOKEN, "baseline"], "note": f"key={ENV['WANDB_API_KEY']};"}, TOKEN: 3, "lr": 0.1}
    assert redact(config, ENV) == {"logger": {"tags": ["${oc.env:MY_API_TOKEN}", "baseline"],
                                              "note": "key=${oc.env:WANDB_API_KEY};"},
                                   "${oc.env:MY_API_TOKEN}": 3, "lr": 0.1}
    monkeypatch.setenv("MY_API_TOKEN", TOKEN)
    assert OmegaConf.create({"tag": redact(TOKEN)}).tag == TOKEN  # resolves back where the variable is set
    assert redact(("a", 1), ENV) == ("a", 1)


def test_log_records_are_redacted_message_and_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_API_TOKEN", TOKEN)
    handler = logging.FileHandler(tmp_path / "log")
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    try:
        logger.warning("token %s in a message", TOKEN)
        try:
            raise ValueError(f"bad value {TOKEN}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = (tmp_path / "log").read_text()
    assert TOKEN not in text and text.count("${oc.env:MY_API_TOKEN}") == 2 and "ValueError: bad value" in text


def test_yaml_files_are_rewritten_only_where_they_hold_a_secret(tmp_path, monkeypatch):
    odd = "it's: a #pass"  # YAML quotes and escapes it: found in the parsed file, not in its text
    monkeypatch.setenv("MY_API_TOKEN", TOKEN)
    monkeypatch.setenv("ODD_SECRET", odd)
    holding, clean = tmp_path / "overrides.yaml", tmp_path / "config.yaml"
    holding.write_text(f"- logger.run_name={TOKEN}\n- seed=1\n")
    OmegaConf.save({"note": odd, "seed": 1}, clean)
    quoted = clean.read_text()
    assert odd not in quoted
    untouched = tmp_path / "hydra.yaml"
    untouched.write_text("seed: 1\n")
    before = untouched.stat().st_mtime_ns
    redact_yaml_files([holding, clean, untouched, tmp_path / "absent.yaml"])
    assert OmegaConf.to_container(OmegaConf.load(holding)) == ["logger.run_name=${oc.env:MY_API_TOKEN}", "seed=1"]
    assert OmegaConf.to_container(OmegaConf.load(clean)) == {"note": "${oc.env:ODD_SECRET}", "seed": 1}
    assert untouched.stat().st_mtime_ns == before


@pytest.mark.slow
@needs_fashion_mnist
def test_a_run_writes_no_secret_anywhere_in_its_run_dir(tmp_path, monkeypatch):
    """Two processes (config.resolved.yaml, rank1.log) logging to W&B offline, with one secret
    brought in through ${oc.env:...} and typed literally on the command line, another through
    ${oc.env:...}: no byte of any file under the run dir holds either, and the run completes."""
    pytest.importorskip("wandb")
    env = {"MY_API_TOKEN": TOKEN, "WANDB_API_KEY": ENV["WANDB_API_KEY"], "WANDB_SILENT": "true",
           "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    run_cli(*TINY, "eval.knn.bank_size=200", "eval.knn.query_size=100", "trainer.max_steps=2", "trainer=ddp",
            "trainer.devices=2", "trainer.accelerator=cpu", "logger=wandb", "logger.offline=true",
            "logger.tags=[${oc.env:MY_API_TOKEN}]", "logger.group=${oc.env:WANDB_API_KEY}",
            f"logger.run_name={TOKEN}", f"hydra.run.dir={run_dir}", env=env)
    assert read_summary(run_dir)["status"] == "completed" and read_summary(run_dir)["global_step"] == 2
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"config.resolved.yaml", "rank1.log", "sslrun.log", "hydra.yaml", "last.ckpt"} <= {p.name for p in files}
    assert any(p.suffix == ".wandb" for p in files)
    for path in files:
        content = path.read_bytes()
        for name in ("MY_API_TOKEN", "WANDB_API_KEY"):
            assert env[name].encode() not in content, f"{name} written to {path}"
    monkeypatch.setenv("MY_API_TOKEN", TOKEN)  # as in the other process, which read its config from here
    resolved = OmegaConf.load(run_dir / "config.resolved.yaml").logger
    assert resolved.run_name == TOKEN and list(resolved.tags) == [TOKEN]
