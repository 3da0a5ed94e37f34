"""Untrusted files: a crafted pickle, wherever sslrun would load a checkpoint (resume=PATH,
resume=auto, a sharded checkpoint's meta.pt and .metadata, a distillation teacher), is refused in
one line naming the file, and none of its code runs. That sslrun's own checkpoints load under
weights_only: tests/methods/test_registry.py (every method) and the resume tests."""

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from sslrun.config import ConfigError, compose
from sslrun.distributed.safe_load import CheckedReader, check_checkpoint, load_checkpoint
from sslrun.run_dir import RunDir
from sslrun.train import resume_path
from tests.conftest import TINY, needs_fashion_mnist, run_cli, write_finished_run


class Payload:
    """Unpickled, it runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def crafted_checkpoint(path, marker):
    torch.save({"state_dict": {}, "global_step": 0, "loops": Payload(marker)}, path)
    return path


def sharded_checkpoint(path, meta=None, index=None):
    """A sharded checkpoint directory, with `meta` in place of its meta.pt or `index` in place of
    its .metadata when given."""
    dcp.save({"w": torch.zeros(2)}, checkpoint_id=path, no_dist=True)
    torch.save(meta if meta is not None else {"global_step": 0}, path / "meta.pt")
    if index is not None:
        (path / ".metadata").write_bytes(pickle.dumps(index))
    return path


def test_the_payload_runs_when_unpickled_unsafely(tmp_path):
    """The control: what the other tests refuse would have run."""
    torch.load(crafted_checkpoint(tmp_path / "x.ckpt", tmp_path / "ran"), weights_only=False)
    pickle.loads(pickle.dumps(Payload(tmp_path / "ran_too")))
    assert (tmp_path / "ran").exists() and (tmp_path / "ran_too").exists()


def test_a_crafted_checkpoint_file_is_refused_before_any_of_it_runs(tmp_path):
    path = crafted_checkpoint(tmp_path / "last.ckpt", tmp_path / "ran")
    for load in (check_checkpoint, load_checkpoint):
        with pytest.raises(ConfigError, match=rf"^{path}: refused unloaded: it pickles builtins.exec, .*"
                                              rf"use a checkpoint sslrun wrote"):
            load(path)
    assert not (tmp_path / "ran").exists()


def test_a_crafted_sharded_checkpoint_is_refused_by_its_meta_pt_or_its_index(tmp_path):
    bad_meta = sharded_checkpoint(tmp_path / "bad_meta", meta={"loops": Payload(tmp_path / "ran")})
    bad_index = sharded_checkpoint(tmp_path / "bad_index", index=Payload(tmp_path / "ran"))
    for path, culprit in ((bad_meta, bad_meta / "meta.pt"), (bad_index, bad_index / ".metadata")):
        with pytest.raises(ConfigError, match=rf"^{culprit}: refused unloaded: it pickles builtins.exec"):
            check_checkpoint(path)
    with pytest.raises(ConfigError, match=rf"^{bad_meta / 'meta.pt'}: refused"):
        load_checkpoint(bad_meta / "meta.pt")  # what the sharded strategy loads it with
    with pytest.raises(ConfigError, match=rf"^{bad_index / '.metadata'}: refused"):
        CheckedReader(bad_index).read_metadata()  # what the sharded strategy reads the index with
    assert not (tmp_path / "ran").exists()
    check_checkpoint(sharded_checkpoint(tmp_path / "genuine"))  # DCP's own index passes
    assert CheckedReader(tmp_path / "genuine").read_metadata().state_dict_metadata.keys() == {"w"}


def test_resume_refuses_a_crafted_checkpoint_and_resume_auto_does_not_fall_back_past_it(tmp_path):
    run = RunDir(tmp_path)
    run.checkpoints.mkdir()
    torch.save({"global_step": 4}, run.step_checkpoint(4))  # an older, genuine one
    crafted_checkpoint(run.last_checkpoint, tmp_path / "ran")
    with pytest.raises(ConfigError, match=rf"^resume=auto: {run.last_checkpoint}: refused unloaded: .*; move it "
                                          rf"away to resume from the one before it, or resume=null"):
        resume_path(compose([]), run)
    with pytest.raises(ConfigError, match=rf"^resume: {run.last_checkpoint}: refused unloaded"):
        resume_path(compose([f"resume={run.last_checkpoint}"]), run)
    sharded = sharded_checkpoint(tmp_path / "sharded", meta={"loops": Payload(tmp_path / "ran")})
    with pytest.raises(ConfigError, match=rf"^resume: {sharded / 'meta.pt'}: refused unloaded"):
        resume_path(compose(["trainer=fsdp", f"resume={sharded}"]), run)
    assert not (tmp_path / "ran").exists()
    run.last_checkpoint.unlink()
    assert resume_path(compose([]), run) == str(run.step_checkpoint(4))  # genuine ones still resume


def one_error_line(result, path) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(path) in errors[0], errors
    return errors[0]


@needs_fashion_mnist
def test_the_cli_refuses_a_crafted_resume_checkpoint_in_one_line(tmp_path):
    path = crafted_checkpoint(tmp_path / "step_000008.ckpt", tmp_path / "ran")
    result = run_cli(*TINY, f"resume={path}", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert "refused unloaded: it pickles builtins.exec" in one_error_line(result, path)
    assert not (tmp_path / "ran").exists()


@needs_fashion_mnist
def test_the_cli_refuses_a_crafted_distillation_teacher_in_one_line(tmp_path):
    teacher = write_finished_run(tmp_path / "teacher", compose(["method=dinov2"]))
    path = crafted_checkpoint(RunDir(teacher).last_checkpoint, tmp_path / "ran")
    result = run_cli("method=dinov2_distill", f"method.teacher_run={teacher}", "data.num_workers=0",
                     "trainer.progress_bar=false", f"hydra.run.dir={tmp_path / 'student'}", check=False)
    line = one_error_line(result, path)
    assert f"method.teacher_run={teacher}: {path}: refused unloaded" in line
    assert not (tmp_path / "ran").exists()
