"""Linear evaluation on frozen features: the standard protocol of the self-supervised papers.

A linear classifier `softmax(W x + b)` on standardised backbone features (x - mean) / std (the
classifier's training features' statistics: MAE's BatchNorm without affine before its probe, in
closed form, so that one lr grid fits features of any scale), trained with cross-entropy by SGD
(momentum, weight decay on W and b, as DINO's `eval_linear.py`) with a per-step cosine schedule
from lr to 0. W starts at N(0, 0.01^2), b at 0 (DINO).

The lr and weight decay are chosen on a stratified part of the training split held out for it
(`choose_hyperparameters` never receives the test split); the classifier is then retrained with
the chosen values on the whole training split and scored once on the test split
(`linear_protocol`). Every grid point trains in one batched pass: the same mini-batches, one
[D, G, C] weight tensor, each point's own lr and weight decay.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


@dataclass
class LinearSettings:
    lrs: Sequence[float]
    weight_decays: Sequence[float]
    epochs: int
    batch_size: int
    momentum: float
    heldout_fraction: float
    seed: int


@dataclass
class LinearClassifiers:
    """G linear classifiers on standardised features: weight [D, G, C], bias [G, C]."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted labels [G, N] of features [N, D]."""
        return _logits((features.float() - self.mean) / self.std, self.weight, self.bias).argmax(dim=2).T


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[N, G, C]: every point's logits in one product."""
    return (x @ weight.flatten(1)).view(len(x), *bias.shape) + bias


def grid(settings: LinearSettings) -> List[Tuple[float, float]]:
    """The (lr, weight decay) points, lr-major."""
    return [(lr, wd) for lr in settings.lrs for wd in settings.weight_decays]


@torch.no_grad()
def train_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, points: Sequence[Tuple[float, float]],
                 settings: LinearSettings) -> LinearClassifiers:
    """One classifier per (lr, weight decay) point, trained together on the same mini-batches.

    features [N, D], or [P, N, D]: P augmented passes of the same N images, epoch e training on
    pass e mod P (DINO's augmented linear evaluation, with the augmentations precomputed).
    torch.optim.SGD's update, with the cross-entropy gradient in closed form (softmax p, one-hot y,
    batch B): g_W = x^T (p - y) / B + wd W, v <- momentum v + g, W <- W - lr_t v (likewise b), and
    lr_t = lr (1 + cos(pi t / T)) / 2 over the T steps."""
    passes = features.float() if features.dim() == 3 else features.float()[None]
    mean, std = passes.mean(dim=(0, 1)), passes.std(dim=(0, 1)).clamp_min(1e-6)
    passes = (passes - mean) / std
    count, dim = passes.shape[1:]
    lrs, decays = (torch.tensor([point[i] for point in points]) for i in (0, 1))
    # Every point starts from the same weights and sees the same batches: as if trained alone.
    start = torch.randn(dim, 1, num_classes, generator=torch.Generator().manual_seed(settings.seed)) * 0.01
    weight, bias = start.repeat(1, len(points), 1), torch.zeros(len(points), num_classes)
    weight_velocity, bias_velocity = torch.zeros_like(weight), torch.zeros_like(bias)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    one_hot = F.one_hot(labels, num_classes).float()[:, None]
    batch = min(settings.batch_size, count)
    steps_per_epoch = count // batch
    total = settings.epochs * steps_per_epoch
    for epoch in range(settings.epochs):
        order = torch.randperm(count, generator=generator)
        epoch_features = passes[epoch % len(passes)]
        for step in range(steps_per_epoch):
            rows = order[step * batch:(step + 1) * batch]
            x = epoch_features[rows]
            error = (_logits(x, weight, bias).softmax(dim=2) - one_hot[rows]) / len(rows)
            weight_velocity.mul_(settings.momentum).add_((x.T @ error.flatten(1)).view_as(weight) + decays[:, None] * weight)
            bias_velocity.mul_(settings.momentum).add_(error.sum(dim=0) + decays[:, None] * bias)
            lr = lrs * 0.5 * (1 + math.cos(math.pi * (epoch * steps_per_epoch + step) / total))
            weight.sub_(lr[:, None] * weight_velocity)
            bias.sub_(lr[:, None] * bias_velocity)
    return LinearClassifiers(weight, bias, mean, std)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) indices: round(fraction * n_c) random images of each class c held out
    (at least one of a class with two or more), from a generator seeded by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    held = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        take = min(len(members) - 1, max(1, round(fraction * len(members))))
        held.append(members[torch.randperm(len(members), generator=generator)[:take]])
    held_out = torch.cat(held).sort().values
    kept = torch.ones(len(labels), dtype=torch.bool)
    kept[held_out] = False
    return kept.nonzero().flatten(), held_out


def top1(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return (predicted == labels).float().mean().item()


def choose_hyperparameters(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           settings: LinearSettings, validation: Optional[torch.Tensor] = None) -> Dict:
    """Train every grid point on the training split less a stratified held-out part, score each on
    that part (center-view `validation` features [N, D] when `features` are augmented passes), and
    choose the best (the first in grid order on a tie). Sees the training split only."""
    kept, held_out = stratified_split(labels, settings.heldout_fraction, settings.seed)
    validation = features if validation is None else validation
    points = grid(settings)
    classifiers = train_linear(features[..., kept, :], labels[kept], num_classes, points, settings)
    scores = [top1(predicted, labels[held_out]) for predicted in classifiers.predict(validation[held_out])]
    best = max(range(len(points)), key=lambda i: (scores[i], -i))
    return {"val_top1": [{"lr": lr, "weight_decay": wd, "top1": score} for (lr, wd), score in zip(points, scores)],
            "chosen": {"lr": points[best][0], "weight_decay": points[best][1]},
            "heldout_for_choice": {"images": len(held_out), "fraction": settings.heldout_fraction,
                                   "stratified": True, "seed": settings.seed}}


def linear_protocol(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                    test_labels: torch.Tensor, num_classes: int, settings: LinearSettings,
                    train_validation: Optional[torch.Tensor] = None) -> Dict:
    """Choose lr and weight decay on held-out training images, retrain with them on the whole
    training split, report top-1 on the test split (the only use of its labels)."""
    choice = choose_hyperparameters(train_features, train_labels, num_classes, settings, train_validation)
    chosen = (choice["chosen"]["lr"], choice["chosen"]["weight_decay"])
    final = train_linear(train_features, train_labels, num_classes, [chosen], settings)
    return {"top1": top1(final.predict(test_features)[0], test_labels), **choice,
            "retrained_on": "the whole training split, with the chosen lr and weight decay"}
