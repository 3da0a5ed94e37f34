"""One file per method; METHODS maps each `method.name` to its LightningModule."""

from sslrun.methods.barlow_twins import BarlowTwins
from sslrun.methods.base import SSLMethod, StepOutput
from sslrun.methods.byol import BYOL
from sslrun.methods.clip import CLIP
from sslrun.methods.dino import DINO
from sslrun.methods.dinov2 import DINOv2
from sslrun.methods.dinov2_distill import DINOv2Distill
from sslrun.methods.mocov2 import MoCoV2
from sslrun.methods.mocov3 import MoCoV3
from sslrun.methods.simclr import SimCLR
from sslrun.methods.siglip import SigLIP
from sslrun.methods.simsiam import SimSiam
from sslrun.methods.vicreg import VICReg

METHODS = {
    "simclr": SimCLR,
    "mocov2": MoCoV2,
    "mocov3": MoCoV3,
    "byol": BYOL,
    "simsiam": SimSiam,
    "barlow_twins": BarlowTwins,
    "vicreg": VICReg,
    "dino": DINO,
    "dinov2": DINOv2,
    "dinov2_distill": DINOv2Distill,
    "clip": CLIP,
    "siglip": SigLIP,
}

__all__ = ["METHODS", "SSLMethod", "StepOutput"]
