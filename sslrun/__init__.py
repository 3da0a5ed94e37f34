"""sslrun: self-supervised and contrastive representation learning, one config system."""

__version__ = "0.1.0"
