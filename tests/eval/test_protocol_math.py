"""The protocols' math (sslrun/eval) against hand computations on toy sets."""

import math

import pytest
import timm
import torch

from sslrun.eval import alignment, knn_classify, knn_classify_many, uniformity
from sslrun.eval.finetune import finetune_optimizer, finetune_schedule
from sslrun.eval.linear import LinearSettings, choose_hyperparameters, linear_protocol, stratified_split, train_linear

SETTINGS = LinearSettings(lrs=[0.01, 0.1, 1.0], weight_decays=[0.0, 1e-3], epochs=10, batch_size=32, momentum=0.9,
                          heldout_fraction=0.2, seed=0)


def clusters(count: int, seed: int, classes: int = 4, dim: int = 16, spread: float = 4.0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * spread
    labels = torch.arange(classes).repeat(count // classes)
    return centres[labels] + torch.randn(len(labels), dim, generator=generator), labels


def test_knn_several_k_votes_by_hand():
    # Query along x. Bank by cosine to it: 1.0 (class 0), 0.8, 0.8 (class 1), 0.6 (class 0), -1 (class 2).
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0, 2])
    query = torch.tensor([[3.0, 0.0]])
    predicted = knn_classify_many(query, bank, labels, 3, ks=[1, 3, 4, 9], temperature=1.0)
    # k=1: class 0. k=3: e^1 = 2.72 (class 0) < 2 e^0.8 = 4.45 (class 1). k=4: e^1 + e^0.6 = 4.54 > 4.45:
    # class 0 again. k=9 (more than the bank: all 5): class 2 adds e^-1 to itself, class 0 still wins.
    assert {k: p.item() for k, p in predicted.items()} == {1: 0, 3: 1, 4: 0, 9: 0}


def test_knn_several_k_equal_one_k_at_a_time():
    generator = torch.Generator().manual_seed(3)
    bank, labels = torch.randn(80, 8, generator=generator), torch.randint(0, 5, (80,), generator=generator)
    queries = torch.randn(30, 8, generator=generator)
    together = knn_classify_many(queries, bank, labels, 5, ks=[1, 5, 20], chunk_size=7)
    for k in (1, 5, 20):
        assert torch.equal(together[k], knn_classify(queries, bank, labels, 5, k=k))


def test_a_linear_probe_on_separable_features_reaches_one():
    train, train_labels = clusters(400, seed=0)
    test, test_labels = clusters(200, seed=1)
    result = linear_protocol(train, train_labels, test, test_labels, 4, SETTINGS)
    assert result["top1"] == 1.0
    assert len(result["val_top1"]) == 6 and result["chosen"] in [{"lr": v["lr"], "weight_decay": v["weight_decay"]}
                                                                for v in result["val_top1"]]
    assert result["heldout_for_choice"]["images"] == 80  # 20 % of each class of 100


def test_the_lr_grid_never_sees_test_labels():
    train, train_labels = clusters(200, seed=0, spread=0.5)  # overlapping classes, and a grid whose
    test, test_labels = clusters(200, seed=1, spread=0.5)  # points score differently
    settings = LinearSettings(lrs=[1e-4, 0.01, 1.0], weight_decays=[0.0, 0.3], epochs=2, batch_size=32, momentum=0.9,
                              heldout_fraction=0.2, seed=0)
    true = linear_protocol(train, train_labels, test, test_labels, 4, settings)
    wrong = linear_protocol(train, train_labels, test, (test_labels + 1) % 4, 4, settings)
    assert len({v["top1"] for v in true["val_top1"]}) > 1, "the grid points should score differently here"
    assert true["val_top1"] == wrong["val_top1"] and true["chosen"] == wrong["chosen"]
    assert wrong["top1"] < true["top1"]  # the test labels reach the final score only
    # The choice is the best held-out score, made from the training split alone.
    choice = choose_hyperparameters(train, train_labels, 4, settings)
    best = max(choice["val_top1"], key=lambda v: v["top1"])
    assert choice["chosen"] == {"lr": best["lr"], "weight_decay": best["weight_decay"]} == true["chosen"]


def sgd_by_torch(features, labels, lr, weight_decay, settings):
    """The reference: an nn.Linear-style classifier trained by torch.optim.SGD and autograd on the
    standardised features, the same start, batches and cosine schedule."""
    x = (features - features.mean(0)) / features.std(0)
    weight = (torch.randn(x.shape[1], 1, 4, generator=torch.Generator().manual_seed(settings.seed)) * 0.01)[:, 0]
    weight, bias = weight.requires_grad_(), torch.zeros(4, requires_grad=True)
    optimizer = torch.optim.SGD([weight, bias], lr=lr, momentum=settings.momentum, weight_decay=weight_decay)
    steps = len(x) // settings.batch_size
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / (settings.epochs * steps))))
    generator = torch.Generator().manual_seed(settings.seed + 1)
    for _ in range(settings.epochs):
        order = torch.randperm(len(x), generator=generator)
        for step in range(steps):
            rows = order[step * settings.batch_size:(step + 1) * settings.batch_size]
            loss = torch.nn.functional.cross_entropy(x[rows] @ weight + bias, labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return weight.detach(), bias.detach()


def test_the_batched_grid_is_torch_sgd_for_each_point():
    features, labels = clusters(64, seed=2, spread=1.0)
    points = [(0.1, 0.0), (0.5, 0.01)]
    together = train_linear(features, labels, 4, points, SETTINGS)
    for i, (lr, weight_decay) in enumerate(points):
        weight, bias = sgd_by_torch(features, labels, lr, weight_decay, SETTINGS)
        assert torch.allclose(together.weight[:, i], weight, atol=1e-5)
        assert torch.allclose(together.bias[i], bias, atol=1e-5)
    assert not torch.allclose(together.weight[:, 0], together.weight[:, 1], atol=1e-3)


def test_stratified_split_holds_out_each_class_in_proportion():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    kept, held_out = stratified_split(labels, 0.1, seed=0)
    assert [(labels[held_out] == c).sum().item() for c in range(3)] == [5, 3, 2]
    assert sorted(kept.tolist() + held_out.tolist()) == list(range(100))
    assert torch.equal(held_out, stratified_split(labels, 0.1, seed=0)[1])
    assert not torch.equal(held_out, stratified_split(labels, 0.1, seed=1)[1])


def test_alignment_and_uniformity_by_hand():
    e = torch.eye(3)
    assert alignment(e, 5 * e) == pytest.approx(0.0)  # scale does not matter: l2-normalised
    assert alignment(e, e[[1, 2, 0]]) == pytest.approx(2.0)  # orthogonal unit vectors: ||u - v||^2 = 2
    assert alignment(e, e[[1, 2, 0]], alpha=1.0) == pytest.approx(math.sqrt(2))
    assert uniformity(e, t=2.0) == pytest.approx(-4.0)  # every pair at squared distance 2: log e^-4
    points = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # squared distances 0, 4, 4
    assert uniformity(points, t=1.0) == pytest.approx(math.log((1 + 2 * math.exp(-4)) / 3))


def test_finetune_layer_decay_follows_mae():
    depth, decay = 3, 0.5
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=depth, num_classes=3)
    optimizer = finetune_optimizer(model, lr=1.0, weight_decay=0.05, layer_decay=decay)
    finetune_schedule(optimizer, total_steps=10, warmup_steps=2).step_update(2)  # warmup done: full lr
    lr_of = {name: group["lr"] for group in optimizer.param_groups for name, p in model.named_parameters()
             if any(p is q for q in group["params"])}
    assert lr_of["patch_embed.proj.weight"] == pytest.approx(decay ** (depth + 1))
    for block in range(depth):
        assert lr_of[f"blocks.{block}.attn.qkv.weight"] == pytest.approx(decay ** (depth - block))
    assert lr_of["head.weight"] == pytest.approx(1.0)
    decays = {name: group["weight_decay"] for group in optimizer.param_groups for name, p in model.named_parameters()
              if any(p is q for q in group["params"])}
    assert decays["head.bias"] == 0.0 and decays["blocks.0.norm1.weight"] == 0.0 and decays["head.weight"] == 0.05
