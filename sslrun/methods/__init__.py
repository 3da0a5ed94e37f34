"""One file per method; METHODS maps each `method.name` to its LightningModule."""

from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.simclr import SimCLR

METHODS = {"simclr": SimCLR}

__all__ = ["METHODS", "SSLMethod", "StepOutput"]
