#!/usr/bin/env bash
# sslrun on a GPU cluster with SLURM: a worked example. Both ways below survive preemption and time
# limits: SLURM sends SIGUSR2 two minutes ahead, sslrun checkpoints, the job is requeued and resumes
# in the same run directory (and the same W&B run).
#
# 1) A sweep, submitted from the login node by submitit: one SLURM job per point, each with
#    trainer.num_nodes nodes x trainer.devices GPUs. The command waits for the jobs (run it in
#    tmux), then compare them:
#
#    python -m sslrun -m method=dino optimizer.base_lr=0.0005,0.001 recipe=imagenet \
#        data.root=/datasets/imagenet trainer=fsdp trainer.num_nodes=2 trainer.accelerator=gpu \
#        logger=wandb logger.project=ssl-sweeps \
#        hydra/launcher=slurm hydra.launcher.partition=gpu hydra.launcher.account=myproject \
#        hydra.launcher.cpus_per_task=10 hydra.launcher.mem_gb=480 hydra.launcher.timeout_min=2880 \
#        'hydra.launcher.setup=["source $HOME/venvs/sslrun/bin/activate"]' \
#        hydra.sweep.dir=/shared/runs/dino-lr-sweep
#    python -m sslrun.report /shared/runs/dino-lr-sweep
#
# 2) One run as a plain batch script: sbatch scripts/slurm_example.sh  (RUN_DIR=... to choose)
#SBATCH --job-name=sslrun-dino
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# One task per GPU: --ntasks-per-node must equal trainer.devices and --nodes trainer.num_nodes, so
# Lightning takes ranks from SLURM. A requeued job runs this script again: the same RUN_DIR makes it
# resume from RUN_DIR/checkpoints/last.ckpt. --signal must name trainer.requeue_signal (USR2).
RUN_DIR=${RUN_DIR:-/shared/runs/dino-vits16}
srun python -m sslrun method=dino recipe=imagenet data.root=/datasets/imagenet \
    trainer=fsdp trainer.devices=8 trainer.num_nodes=2 trainer.accelerator=gpu \
    logger=wandb logger.project=ssl hydra.run.dir="$RUN_DIR"
