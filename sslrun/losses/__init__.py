"""Loss functions: pure tensor math with the paper's formula in each docstring.

Losses that need the global batch take the gathered tensors as arguments; gathering is the
caller's job (sslrun.distributed), so every loss can be checked on one process.
"""

from sslrun.losses.nt_xent import nt_xent_loss

__all__ = ["nt_xent_loss"]
