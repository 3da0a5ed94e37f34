"""The registry is the one list of methods, and every method in it gets the generic tests: its
config composes and validates, 2 processes with half the batch each take the step 1 process takes
with the whole batch, and it trains from the command line. (The FSDP step is
tests/distributed/test_fsdp.py::test_every_method_takes_the_same_step_sharded_as_under_ddp.)"""

import dataclasses
import math

import pytest
import torch

from sslrun.config import CONF_DIR, ConfigError
from sslrun.distributed import convert_to_global_bn, gather_rows
from sslrun.distributed.safe_load import load_checkpoint
from sslrun.methods.registry import GENERIC_TESTS, registered, register_method
from tests.conftest import needs_fashion_mnist, read_summary, run_clis_side_by_side
from tests.method_cases import BATCH, method_name, options, shard_of, spec_of, tiny_batch, tiny_method, tiny_overrides
from tests.processes import run_in_processes


def test_every_registered_method_has_its_yaml_and_every_yaml_a_registered_method():
    methods = registered()
    assert len(methods) >= 12
    for name, spec in methods.items():
        assert (CONF_DIR / "method" / f"{name}.yaml").is_file(), name
        assert dataclasses.is_dataclass(spec.schema) and callable(spec.schema.check), name
        assert spec.cls.spec is spec and set(spec.exempt) <= set(GENERIC_TESTS), name
        assert all(reason.strip() for reason in spec.exempt.values()), f"{name}: say why it is exempt"
    for option in options():
        assert method_name(option) in methods, option


def test_the_readme_lists_every_method():
    import re

    from tests.conftest import REPO

    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `method` |"))
    assert set(re.findall(r"`([a-z0-9_]+)`", row.split("|")[2])) == set(options())


def test_a_second_registration_of_a_name_is_refused():
    spec = registered()["simclr"]
    with pytest.raises(ValueError, match="'simclr' is registered twice"):
        register_method("simclr", spec.schema, views=2)(type("Other", (spec.cls,), {}))
    with pytest.raises(ValueError, match="exempt from unknown tests"):
        register_method("other", spec.schema, views=2, exempt={"speed": "no"})


@pytest.mark.parametrize("option", options("cli"))  # what runs alone (distillation needs a teacher run:
def test_every_method_composes_at_toy_size_and_checks_its_views(option):  # tests/config/test_config.py)
    method, cfg = tiny_method(option)
    spec = spec_of(option)
    assert isinstance(method, spec.cls)
    views = sum(view.count for view in cfg.augmentation.views)
    if spec.views is not None:
        assert views == spec.views
        other = "augmentation=light_crop" if spec.views != 1 else "augmentation=simclr_views_small"
        with pytest.raises(ConfigError, match=f"augmentation: method={spec.name} takes {spec.views} views"):
            tiny_method(option, other)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal up to float reordering: max difference relative to the tensor's scale."""
    return bool((a - b).abs().max() <= rel * b.abs().max() + 1e-5)


def _one_step(method, batch):
    out = method.training_loss(batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in method.named_parameters() if p.grad is not None}


def _every_method_on_two_processes(rank, world, out):
    import torch.distributed as dist

    results = {}
    for option in options("two_processes"):
        method, cfg = tiny_method(option)
        method = convert_to_global_bn(method)
        torch.manual_seed(11)  # what a method draws (shuffles) is drawn alike
        loss, grads = _one_step(method, shard_of(tiny_batch(cfg, method=method), rank, world))
        for grad in grads.values():  # what DDP does
            dist.all_reduce(grad)
            grad /= world
        buffers = {n: gather_rows(b[None].clone()) for n, b in method.named_buffers() if "running" not in n
                   and b.dtype.is_floating_point or n.endswith("position")}
        results[option] = {"loss": gather_rows(loss[None]).mean(), "grads": grads, "buffers": buffers}
    if rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("registry") / "two_processes.pt"
    run_in_processes(_every_method_on_two_processes, 2, out)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("option", options("two_processes"))
def test_two_processes_equal_one_process_with_the_whole_batch(option, two_process_results):
    """Loss, every gradient and every state buffer (queues, centres): 2 processes x 4 images
    (gathers, global BN, global-batch statistics) == 1 process x 8."""
    got = two_process_results[option]
    method, cfg = tiny_method(option)
    torch.manual_seed(11)
    loss, grads = _one_step(method, tiny_batch(cfg, method=method))
    assert math.isfinite(loss.item())
    assert _close(got["loss"], loss), (got["loss"], loss)
    assert grads.keys() == got["grads"].keys() and len(grads) > 2
    for name, grad in grads.items():
        assert _close(got["grads"][name], grad), (option, name, (got["grads"][name] - grad).abs().max())
    state = dict(method.named_buffers())
    for name, per_process in got["buffers"].items():
        assert torch.equal(per_process[0], per_process[1]), f"{option}: every process must hold the same {name}"
        assert _close(per_process[0].float(), state[name].float()), (option, name)


@pytest.mark.slow
@needs_fashion_mnist
def test_every_method_trains_from_the_command_line(tmp_path):
    """Two steps of `python -m sslrun method=NAME` at toy sizes: a summary, a checkpoint that loads
    under weights_only, and a backbone."""
    runs = {option: tmp_path / option for option in options("cli")}
    common = ["data.num_workers=0", "trainer.max_steps=2", "trainer.progress_bar=false", "trainer.log_every_n_steps=1"]
    names = list(runs)
    for start in range(0, len(names), 3):
        run_clis_side_by_side(*([*tiny_overrides(option), *common, f"hydra.run.dir={runs[option]}"]
                                for option in names[start:start + 3]))
    for option, run_dir in runs.items():
        summary = read_summary(run_dir)
        assert summary["method"] == method_name(option) and summary["global_step"] == 2, option
        assert math.isfinite(summary["train_loss"]), option
        assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "backbone.safetensors").is_file()
        # Only tensors and plain containers: torch's weights_only allowlist is enough (distributed/safe_load.py).
        assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2, option
    assert len(runs) >= 10 and BATCH == 8
