"""Process set-up and launching: the local worker processes of a multi-process run (`local`,
`worker`), each process's CPU threads (`threads`), and SLURM preemption (`requeue`, a Lightning
callback; import it from its module, this package stays light for the CLI's first second)."""

from sslrun.launch.local import launch_local_processes, launched_externally, needs_local_launch, stop, wait_for

__all__ = ["launch_local_processes", "launched_externally", "needs_local_launch", "stop", "wait_for"]
