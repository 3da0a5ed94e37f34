"""How many threads torch's CPU ops use in each process of a run."""

import os


def cpu_threads(processes_per_node: int) -> None:
    """Threads for torch's CPU ops in this process: OMP_NUM_THREADS when set (applied here too, as
    torch may have read the environment before it was set), else the task's CPUs under SLURM,
    else the machine's cores split between the processes of this node (as Lightning does when it
    starts them; sslrun starts them itself, and each would use every core)."""
    import torch

    given = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]
    if given.isdigit() and int(given) > 0:
        threads = int(given)
    elif "SLURM_CPUS_PER_TASK" in os.environ:
        threads = int(os.environ["SLURM_CPUS_PER_TASK"])
    elif processes_per_node > 1:
        threads = max(1, (os.cpu_count() or 1) // processes_per_node)
    else:
        return
    torch.set_num_threads(threads)
