"""Launcher configs, run naming and identity, the requeue handler, the Docker image's pins.

The real SLURM runs are in tests/test_slurm.py; here each piece is checked on its own, in-process.
"""

import os
import re
import signal
import tomllib

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sslrun.launch.requeue import Requeue
from sslrun.config import CONF_DIR
from sslrun.tracking import run_name, wandb_run_id
from tests.conftest import REPO, TINY, needs_fashion_mnist, read_summary, run_cli


def launcher(*overrides) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    cfg.hydra.job.name = "sslrun"  # set by Hydra when it runs the app
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_slurm_launcher_asks_for_one_task_and_gpu_per_process():
    params = launcher("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4",
                      "trainer.accelerator=gpu", "hydra.launcher.partition=gpu", "hydra.launcher.account=ssl",
                      "hydra.launcher.qos=high", "hydra.launcher.constraint=h100", "hydra.launcher.mem_gb=400",
                      "+hydra.launcher.additional_parameters={exclusive: true}")
    assert params["_target_"].endswith("SlurmLauncher")
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (4, 8, 8)
    assert (params["partition"], params["account"], params["qos"], params["constraint"], params["mem_gb"]) == \
        ("gpu", "ssl", "high", "h100", 400)
    assert params["additional_parameters"] == {"exclusive": True}
    assert params["max_num_timeout"] > 0  # requeue after a time limit, not only after preemption
    assert params["submitit_folder"].endswith("/.submitit/%j")


def test_slurm_launcher_asks_for_no_gpus_for_a_cpu_run():
    params = launcher("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (1, 2, None)


def test_local_launchers():
    assert launcher()["_target_"] == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    local = launcher("hydra/launcher=submitit_local")
    assert local["_target_"].endswith("submitit_launcher.LocalLauncher") and local["tasks_per_node"] == 1


def test_slurm_sbatch_script_carries_the_config(tmp_path):
    """What submitit would submit for hydra/launcher=slurm (no cluster needed to write it)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = launcher("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=gpu",
                      "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=600")
    script = _make_sbatch_string(
        command="python -m submitit.core._submit", folder=str(tmp_path), job_name=params["name"],
        partition=params["partition"], time=params["timeout_min"], nodes=params["nodes"],
        ntasks_per_node=params["tasks_per_node"], gpus_per_node=params["gpus_per_node"],
        cpus_per_task=params["cpus_per_task"], signal_delay_s=params["signal_delay_s"])
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2", "#SBATCH --partition=gpu",
                 "#SBATCH --time=600", "#SBATCH --signal=USR2@120"):
        assert line in script, script


@pytest.mark.slow
@needs_fashion_mnist
def test_submitit_local_runs_jobs_of_several_processes(tmp_path):
    """Refused under the local launcher (tests/test_config.py); under submitit_local each job is
    a process of its own, which starts the job's other process."""
    sweep_dir = tmp_path
    run_cli("-m", *TINY, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=32",
            "trainer.max_steps=3", "eval.enabled=false", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep_dir}")
    summary = read_summary(sweep_dir / "0")
    assert summary["world_size"] == 2 and summary["global_step"] == 3
    assert (sweep_dir / "0" / "rank1.log").is_file() and list((sweep_dir / ".submitit").glob("*/*_log.out"))


def test_run_names_say_method_backbone_data_and_key_overrides():
    name = run_name("dino", "vit_small", "imagenet", ["method=dino", "++optimizer.base_lr=0.3", "trainer=fsdp",
                                                       "hydra/launcher=slurm", "logger=wandb", "data.root=/d"])
    assert name == "dino-vit_small-imagenet optimizer.base_lr=0.3 trainer=fsdp data.root=/d"
    assert run_name("simclr", "resnet18", "fashion_mnist") == "simclr-resnet18-fashion_mnist"


def test_wandb_run_id_survives_a_resume_and_not_a_fresh_start(tmp_path):
    first = wandb_run_id(tmp_path, resuming=False)
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == first
    assert wandb_run_id(tmp_path, resuming=True) == first  # a requeued job resuming its checkpoint
    fresh = wandb_run_id(tmp_path, resuming=False)  # resume=null in the same directory: a new run
    assert fresh != first and wandb_run_id(tmp_path, resuming=True) == fresh


class _Steps(L.LightningModule):
    """A tiny model that sends itself the preemption signal during step `signal_at`."""

    def __init__(self, signal_at: int):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.signal_at = signal_at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR2)
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 4))
        return torch.utils.data.DataLoader(data, batch_size=4)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_requeue_checkpoints_at_the_next_step_then_hands_over_to_the_previous_handler(tmp_path, accumulate):
    handed_over = []

    def submitit_handler(signum, frame):  # stands in for submitit's: requeue, then exit
        handed_over.append(signum)
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        preempted = []
        requeue = Requeue(signal.SIGUSR2, tmp_path / "last.ckpt",
                          on_preempted=lambda trainer, reason: preempted.append((trainer.global_step, reason)))
        trainer = L.Trainer(max_steps=20, accumulate_grad_batches=accumulate, callbacks=[requeue], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu")
        with pytest.raises(SystemExit):
            trainer.fit(_Steps(signal_at=5))
        assert handed_over == [signal.SIGUSR2]
        # summary.json's status preempted, written before the hand-over (train.build_callbacks)
        assert preempted == [(6, f"SIGUSR2 at step 6: checkpointed and requeued; the requeued job resumes from "
                                 f"{tmp_path / 'last.ckpt'}")]
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # restored after the run
    finally:
        signal.signal(signal.SIGUSR2, previous)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6  # the step the signal came in, completed and saved
    # The checkpoint resumes: the remaining steps run from there.
    resumed = L.Trainer(max_steps=20, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    resumed.fit(_Steps(signal_at=-1), ckpt_path=str(tmp_path / "last.ckpt"), weights_only=True)
    assert resumed.global_step == 20


def test_docker_image_pins_the_projects_torch_and_extras():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_pin = next(d for d in project["dependencies"] if d.startswith("torch=="))
    version = torch_pin.split("==")[1]
    assert re.search(rf"ARG BASE=pytorch/pytorch:{re.escape(version)}-cuda", dockerfile)
    assert f"!= '{version}'" in dockerfile  # the build fails if pip replaced the base image's torch
    extras = re.search(r"pip install '\.\[([a-z,]+)\]'", dockerfile).group(1).split(",")
    assert set(extras) <= set(project["optional-dependencies"]) and "xformers" in extras


def test_requeue_signal_is_checked_early_and_against_submitit(monkeypatch):
    from sslrun.__main__ import check_overrides
    from sslrun.config import ConfigError
    from sslrun.launch.requeue import check_requeue_signal

    assert "trainer.requeue_signal=USR9: not a signal" in check_overrides(["trainer.requeue_signal=USR9"])
    assert check_overrides(["trainer.requeue_signal=SIGUSR1"]) is None
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    check_requeue_signal("USR2")  # submitit's default
    with pytest.raises(ConfigError, match="set trainer.requeue_signal=USR2"):
        check_requeue_signal("USR1")


def test_cpu_threads_follow_the_slurm_task_or_split_the_cores(monkeypatch):
    from sslrun.launch.threads import cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
        cpu_threads(processes_per_node=8)
        assert torch.get_num_threads() == 3  # hydra.launcher.cpus_per_task, not every core of the node
        monkeypatch.delenv("SLURM_CPUS_PER_TASK")
        monkeypatch.setattr(os, "cpu_count", lambda: 16)
        cpu_threads(processes_per_node=4)
        assert torch.get_num_threads() == 4  # local processes share the cores
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
        cpu_threads(processes_per_node=16)
        assert torch.get_num_threads() == 2  # the user's setting wins
    finally:
        torch.set_num_threads(before)
