"""Loss functions: pure tensor math with the paper's formula in each docstring.

Losses that need the global batch take the gathered tensors as arguments; gathering is the
caller's job (sslrun.distributed), so every loss can be checked on one process.
"""

from sslrun.losses.barlow_twins import barlow_twins_loss
from sslrun.losses.clip import clip_loss, siglip_loss
from sslrun.losses.cosine import byol_loss, negative_cosine_similarity
from sslrun.losses.dino import (
    centered_teacher_probs, dino_loss, entropy, ibot_patch_loss, koleo_loss, mean_over_batch, sinkhorn_knopp,
    update_center,
)
from sslrun.losses.gram import gram_loss
from sslrun.losses.ijepa import ijepa_loss
from sslrun.losses.infonce import infonce_batch_loss, infonce_queue_loss
from sslrun.losses.lejepa import lejepa_loss, random_directions, sigreg_loss
from sslrun.losses.mae import mae_loss, normalize_patches, patchify, unpatchify
from sslrun.losses.nnclr import nnclr_loss
from sslrun.losses.nt_xent import nt_xent_loss
from sslrun.losses.swav import swav_loss
from sslrun.losses.vicreg import vicreg_loss

__all__ = [
    "barlow_twins_loss", "clip_loss", "siglip_loss", "byol_loss", "centered_teacher_probs", "dino_loss", "entropy", "ibot_patch_loss",
    "koleo_loss", "mean_over_batch", "sinkhorn_knopp", "update_center", "gram_loss", "ijepa_loss", "infonce_batch_loss", "infonce_queue_loss", "negative_cosine_similarity",
    "lejepa_loss", "random_directions", "sigreg_loss", "mae_loss", "normalize_patches", "patchify", "unpatchify", "nnclr_loss", "nt_xent_loss", "swav_loss", "vicreg_loss",
]
