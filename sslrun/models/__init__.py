"""Backbones (timm) and heads. No losses, no Lightning."""
