"""sslrun: self-supervised and contrastive representation learning, one config system."""

from sslrun.config import register_hydra_extras

__version__ = "0.1.0"

# Any process that imports sslrun can compose its configs, a submitit job unpickling its task too.
register_hydra_extras()
