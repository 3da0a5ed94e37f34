"""CLIP and SigLIP: tokenizer, text tower, losses (closed forms, 2 x B == 1 x 2B), accumulation
that keeps every negative, the learned temperature, image-text data and evaluation."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sslrun.data.tokenizer import END_ID, VOCAB_SIZE, Tokenizer
from sslrun.eval import class_embeddings, retrieval_recall, top_k_accuracy
from sslrun.losses import clip_loss, siglip_loss
from tests.conftest import needs_fashion_mnist
from tests.processes import run_in_processes

WORLD = 2


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_gives_clips_own_ids():
    """Against open_clip's tokenizer (an independent implementation of the same vocabulary)."""
    from open_clip.tokenizer import SimpleTokenizer

    texts = ["a photo of a cat.", "A PHOTO of the number 3!", "t-shirt/top", "ankle boot",
             "It's a dog's life; they'll've 12,345 cafés, naïve 北京 &amp; emoji 😀",
             "   multiple   spaces\n\tand tabs ", "x" * 200, ""]
    ours = Tokenizer(context_length=77)
    assert torch.equal(ours(texts), SimpleTokenizer()(texts, context_length=77))
    # The ids every CLIP user has seen: <start> a photo of a cat <end>.
    assert ours("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ours.vocab_size == VOCAB_SIZE == 49408 and ours.end_id == END_ID  # what CLIP builds its tower with


def test_tokenizer_truncates_keeping_the_end_token_and_decodes_back():
    tokenizer = Tokenizer(context_length=6)
    long = tokenizer("one two three four five six seven")[0]
    assert long.tolist()[0] == tokenizer.start_id and long.tolist()[-1] == tokenizer.end_id
    assert tokenizer.decode(long) == "one two three four"
    short = tokenizer("Ankle   BOOT")[0]
    assert short.tolist()[3:] == [tokenizer.end_id, 0, 0] and tokenizer.decode(short) == "ankle boot"


# ---------------------------------------------------------------------------- text tower
def test_text_tower_is_causal_and_pools_at_the_end_token():
    from sslrun.models.text import TextTransformer

    tokenizer = Tokenizer(context_length=12)
    torch.manual_seed(0)
    tower = TextTransformer(tokenizer.vocab_size, 12, width=32, layers=2, heads=4, end_token_id=tokenizer.end_id).eval()
    tokens = tokenizer(["a photo of a coat.", "a photo of a bag."])
    features = tower(tokens)
    assert features.shape == (2, 32)
    after_end = tokens.clone()
    after_end[:, -1] = 1234  # padding after the end token: unseen by a causal tower pooled at the end
    torch.testing.assert_close(tower(after_end), features)
    before_end = tokens.clone()
    before_end[:, 2] = 1234
    assert (tower(before_end) - features).abs().max() > 1e-3


# ---------------------------------------------------------------------------- losses
def similarities(x, y, tau):
    return (F.normalize(x, dim=1) @ F.normalize(y, dim=1).T) / tau


def test_clip_loss_gradient_equals_the_closed_form():
    """dL/dx_i = -(1/N)[ds_ii/dx_i - sum_j softmax_j(s_i.) ds_ij/dx_i] for the image -> text term
    (and the same with the column softmax for text -> image), s_ij = x_i.y_j / (tau |x_i||y_j|)."""
    torch.manual_seed(0)
    n, d, tau = 6, 5, 0.07
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, d, dtype=torch.float64)
    clip_loss(x, y, torch.tensor(math.log(1 / tau), dtype=torch.float64)).backward()

    with torch.no_grad():
        s = similarities(x, y, tau)
        row_softmax, column_softmax = s.softmax(dim=1), s.softmax(dim=0)

        def ds_dx(i, j):  # d s_ij / d x_i
            xi, yj = x[i], y[j]
            return (yj / (xi.norm() * yj.norm()) - (xi @ yj) * xi / (xi.norm() ** 3 * yj.norm())) / tau

        expected = torch.zeros_like(x)
        for i in range(n):
            image_to_text = ds_dx(i, i) - sum(row_softmax[i, j] * ds_dx(i, j) for j in range(n))
            text_to_image = ds_dx(i, i) - sum(column_softmax[i, j] * ds_dx(i, j) for j in range(n))
            expected[i] = -(image_to_text + text_to_image) / (2 * n)
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)


def test_clip_loss_by_hand_and_local_rows_average_to_the_whole():
    torch.manual_seed(1)
    x, y, scale = torch.randn(8, 4).double(), torch.randn(8, 4).double(), torch.tensor(2.0).double()
    s = similarities(x, y, 1 / scale.exp())
    by_hand = 0.0
    for i in range(8):
        by_hand += -math.log(s[i].softmax(0)[i]) - math.log(s[:, i].softmax(0)[i])
    assert clip_loss(x, y, scale).item() == pytest.approx(by_hand / 16, rel=1e-12)
    local = [clip_loss(x[r * 2:(r + 1) * 2], y[r * 2:(r + 1) * 2], scale, x, y, offset=r * 2) for r in range(4)]
    assert torch.stack(local).mean().item() == pytest.approx(by_hand / 16, rel=1e-12)


def test_siglip_loss_by_hand_and_in_blocks():
    torch.manual_seed(2)
    x, y = torch.randn(6, 4).double(), torch.randn(6, 4).double()
    t, b = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    logits = similarities(x, y, 1.0) * 10.0 - 10.0
    by_hand = 0.0
    for i in range(6):
        for j in range(6):
            z = 1.0 if i == j else -1.0
            by_hand += -math.log(1 / (1 + math.exp(-z * logits[i, j])))
    assert siglip_loss(x, [y], t, b).item() == pytest.approx(by_hand / 6, rel=1e-12)
    # Three "processes" of 2: own block first (diagonal positives), the others' blocks negatives.
    blocks = [y[r * 2:(r + 1) * 2] for r in range(3)]
    per_process = [siglip_loss(x[r * 2:(r + 1) * 2], [blocks[r]] + [blocks[(r - k) % 3] for k in (1, 2)], t, b)
                   for r in range(3)]
    assert torch.stack(per_process).mean().item() == pytest.approx(by_hand / 6, rel=1e-12)
    # Closed form: matching pairs identical, the rest orthogonal: positives' logit 10 - 10 = 0,
    # negatives' -10, so L = log 2 + 3 log(1 + e^-10) for 4 pairs.
    eye = torch.eye(4, dtype=torch.float64)
    assert siglip_loss(eye, [eye], t, b).item() == pytest.approx(math.log(2) + 3 * math.log1p(math.exp(-10)), rel=1e-12)


# ---------------------------------------------------------------------------- the whole method
def tiny_method(name="clip", **overrides):
    from sslrun.config import compose
    from sslrun.train import build_method, lr_schedule

    args = [f"method={name}", "backbone.timm_kwargs.embed_dim=48", "backbone.timm_kwargs.depth=1",
            "method.text.width=32", "method.text.layers=1", "method.text.heads=2", "method.text.context_length=10",
            "method.embed_dim=16", "data.batch_size=8", "eval.enabled=false",
            *[f"{key}={value}" for key, value in overrides.items()]]
    cfg = compose(args)
    torch.manual_seed(0)
    schedule, steps = lr_schedule(cfg, 60000)
    return build_method(cfg, schedule, None, steps).double()


def pairs(n=8):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64)
    tokens = Tokenizer(10)([f"a photo of a number {i}" for i in range(n)])
    return images, tokens


def loss_and_gradients(method, images, tokens):
    method.zero_grad()
    loss = method.training_loss({"views": [images], "text": tokens}).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


CASES = {"clip": {}, "clip {'method.local_loss': True}": {"method.local_loss": True}, "siglip": {}}


def _cases(rank, world, out):
    results = {}
    for label, overrides in CASES.items():
        method = tiny_method(label.split()[0], **overrides)
        images, tokens = pairs()
        b = images.shape[0] // world
        loss, grads = loss_and_gradients(method, images[rank * b:(rank + 1) * b], tokens[rank * b:(rank + 1) * b])
        for g in grads.values():  # DDP's averaging
            dist.all_reduce(g)
            g /= world
        dist.all_reduce(loss)
        results[label] = (loss / world, grads)
    if rank == 0:
        torch.save(results, out)


@pytest.mark.slow
def test_two_processes_equal_one_big_batch_for_clip_local_loss_and_siglip(tmp_path):
    """2 processes x 4 pairs == 1 process x 8 pairs, loss and every parameter's gradient (float64):
    CLIP gathering with gradient (whole N x N, and local rows), SigLIP passing texts round the ring."""
    run_in_processes(_cases, WORLD, tmp_path / "cases.pt")
    got = torch.load(tmp_path / "cases.pt", weights_only=False)
    assert set(got) == set(CASES)
    for label, overrides in CASES.items():
        method = tiny_method(label.split()[0], **overrides)
        loss, grads = loss_and_gradients(method, *pairs())
        assert got[label][0].item() == pytest.approx(loss.item(), rel=1e-12), label
        assert got[label][1].keys() == grads.keys()
        assert "logit_scale.log_scale" in grads and "text_tower.token_embedding.weight" in grads
        for name, grad in grads.items():
            torch.testing.assert_close(got[label][1][name], grad, rtol=1e-9, atol=1e-12, msg=f"{label}: {name}")
    # Guard: SigLIP on the local block alone (no ring) is a different loss (at b = -10 the missing
    # negatives weigh little, but far more than the 1e-12 the test above holds to).
    method = tiny_method("siglip")
    images, tokens = pairs()
    local = [siglip_loss(method.encode_image(images[r * 4:(r + 1) * 4]), [method.encode_text(tokens[r * 4:(r + 1) * 4])],
                         *method.logit_scale()) for r in range(2)]
    assert torch.stack(local).mean().item() != pytest.approx(got["siglip"][0].item(), rel=1e-6)


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while `fn` runs the forward pass."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return result, total


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_micro_batches_keep_every_negative_and_keep_less_for_backward(name):
    images, tokens = pairs()
    whole = tiny_method(name)
    (loss, _), whole_saved = saved_bytes(lambda: (whole.training_loss({"views": [images], "text": tokens}).loss, 0))
    loss, grads = loss_and_gradients(whole, images, tokens)
    split = tiny_method(name, **{"method.micro_batches": 4})
    _, split_saved = saved_bytes(lambda: split.training_loss({"views": [images], "text": tokens}).loss)
    split_loss, split_grads = loss_and_gradients(split, images, tokens)
    assert split_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    for key, grad in grads.items():
        torch.testing.assert_close(split_grads[key], grad, rtol=1e-9, atol=1e-12, msg=key)
    assert split_saved < whole_saved / 2, (split_saved, whole_saved)  # only the micro-batches' inputs
    # What plain accumulation would do (mean of the micro-batch losses) is a different, weaker loss.
    if name == "clip":
        means = [whole.training_loss({"views": [images[k * 2:(k + 1) * 2]], "text": tokens[k * 2:(k + 1) * 2]}).loss
                 for k in range(4)]
        assert torch.stack(means).mean().item() < loss.item() - 0.5


def test_logit_scale_starts_at_its_init_is_clamped_after_each_step_and_is_not_decayed():
    clip, siglip = tiny_method("clip"), tiny_method("siglip")
    assert clip.logit_scale.log_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert clip.logit_scale.bias is None
    assert siglip.logit_scale.log_scale.item() == pytest.approx(math.log(10)) and siglip.logit_scale.bias.item() == -10
    for value, clamped in ((10.0, math.log(100)), (-1.0, 0.0), (3.0, 3.0)):
        clip.logit_scale.log_scale.data.fill_(value)
        clip.after_optimizer_step()
        assert clip.logit_scale.log_scale.item() == pytest.approx(clamped)
    # The weight-decay groups: weights decayed; the scale, bias, norms and biases (0-/1-d) not.
    groups = siglip.configure_optimizers().param_groups
    names = {id(p): n for n, p in siglip.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"logit_scale.log_scale", "logit_scale.bias", "text_tower.norm.weight", "text_tower.norm.bias"} <= undecayed
    assert {"text_tower.token_embedding.weight", "image_projection.weight", "text_projection.weight"} <= decayed
    assert all(siglip.get_parameter(n).ndim <= 1 for n in undecayed)


# ---------------------------------------------------------------------------- evaluation
def test_zero_shot_and_retrieval_metrics_against_brute_force():
    torch.manual_seed(4)
    logits, labels = torch.randn(50, 7), torch.randint(0, 7, (50,))
    accuracy = top_k_accuracy(logits, labels, ks=(1, 3))
    order = logits.argsort(dim=1, descending=True)
    for k in (1, 3):
        assert accuracy[k] == pytest.approx(sum(int(labels[i] in order[i, :k]) for i in range(50)) / 50)

    images, texts = torch.randn(20, 6), torch.randn(5, 6)
    caption_of_image = torch.randint(0, 5, (20,))
    caption_of_image[:5] = torch.arange(5)  # every caption has an image
    recall = retrieval_recall(images, texts, caption_of_image, ks=(1, 2))
    cos = F.normalize(images, dim=1) @ F.normalize(texts, dim=1).T
    for k in (1, 2):
        i2t = sum(int(caption_of_image[i] in cos[i].argsort(descending=True)[:k]) for i in range(20)) / 20
        t2i = sum(any(caption_of_image[j] == t for j in cos[:, t].argsort(descending=True)[:k]) for t in range(5)) / 5
        assert recall[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert recall[f"text_to_image_R@{k}"] == pytest.approx(t2i)

    prompts = torch.randn(3, 4, 6)  # 3 classes x 4 prompts
    classifier = class_embeddings(prompts)
    expected = F.normalize(torch.stack([F.normalize(prompts[c], dim=1).mean(0) for c in range(3)]), dim=1)
    torch.testing.assert_close(classifier, expected)


# ---------------------------------------------------------------------------- data
def caption_data_cfg(name, **extra):
    from omegaconf import OmegaConf

    base = {"name": name, "root": None, "download": False, "image_size": 16, "channels": 3,
            "mean": [0.5] * 3, "std": [0.5] * 3, "eval_crop_fraction": 1.0, "batch_size": 4, "eval_batch_size": 8,
            "num_workers": 0, "pin_memory": False, "persistent_workers": False,
            "image_column": "image", "caption_column": "caption", "val_file": None}
    base.update(extra)
    return OmegaConf.create(base)


ONE_VIEW = [{"count": 1, "size": 16, "scale": [0.9, 1.0], "ratio": [1.0, 1.0], "flip_p": 0.0,
             "color_jitter": {"p": 0.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0},
             "grayscale_p": 0.0, "blur_p": 0.0, "blur_sigma": [0.1, 2.0], "solarize_p": 0.0}]


def image_text_module(cfg, prompts=("a photo of a {}.",), query_size=None):
    from omegaconf import OmegaConf

    from sslrun.data.datamodule import Captions, SSLDataModule

    return SSLDataModule(cfg, OmegaConf.create(ONE_VIEW),
                         OmegaConf.create({"knn": {"bank_size": None, "query_size": query_size}}),
                         processes=1, processes_per_node=1, seed=0,
                         captions=Captions(Tokenizer(12), list(prompts)))


def write_pairs(folder, rows, name="pairs.csv", delimiter=","):
    import numpy as np
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = [delimiter.join(["caption", "image"])]
    for i, (caption, content) in enumerate(rows):
        path = folder / "images" / f"{i}.png"
        if content is None:
            Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)).save(path)
        else:
            path.write_bytes(content)
        lines.append(delimiter.join([caption, f"images/{i}.png"]))
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def test_caption_file_pairs_each_image_with_its_caption_and_skips_unreadable_ones(tmp_path):
    tokenizer = Tokenizer(12)
    rows = [("a red shoe", None), ("a blue hat", None), ("broken", b"not a png"), ("a green bag", None)]
    train = write_pairs(tmp_path, rows, "pairs.tsv", delimiter="\t")
    module = image_text_module(caption_data_cfg("csv", train_file=str(train), val_file=str(train)))
    seen = {}
    for batch in module.train_dataloader():
        assert set(batch) == {"views", "photometric", "label", "index", "text"}
        assert batch["text"].shape == (4, 12) and (batch["label"] == -1).all()
        for index, tokens in zip(batch["index"].tolist(), batch["text"]):
            seen[index] = tokenizer.decode(tokens)
    # The unreadable row is replaced by the next readable pair, image and caption together.
    assert seen == {0: "a red shoe", 1: "a blue hat", 2: "a green bag", 3: "a green bag"}
    assert module.skipped_images() == 1
    assert module.eval_loaders(0, 1) is None  # no labels: no kNN, retrieval only
    images, labels, tokens = next(iter(module.heldout_pairs_loader(0, 1)))
    assert images.shape == (4, 3, 16, 16) and [tokenizer.decode(t) for t in tokens][:2] == ["a red shoe", "a blue hat"]


def test_caption_file_errors_name_the_fix(tmp_path):
    from sslrun.data.datasets import DataError, build_splits

    with pytest.raises(DataError, match="no such file"):
        build_splits(caption_data_cfg("csv", train_file=str(tmp_path / "missing.csv")))
    train = write_pairs(tmp_path, [("a cat", None)])
    with pytest.raises(DataError, match=r"no column 'text' \(columns: caption, image\); set data.image_column"):
        build_splits(caption_data_cfg("csv", train_file=str(train), caption_column="text"))
    (tmp_path / "images" / "0.png").unlink()
    with pytest.raises(DataError, match="first image .* does not exist; image paths are read relative"):
        build_splits(caption_data_cfg("csv", train_file=str(train)))


@needs_fashion_mnist
def test_labelled_images_are_captioned_by_prompts_drawn_per_image_and_epoch():
    from tests.conftest import FASHION_MNIST

    tokenizer = Tokenizer(12)
    cfg = caption_data_cfg("fashion_mnist", root=str(FASHION_MNIST), channels=1, mean=[0.5], std=[0.5], batch_size=64)
    prompts = ("a photo of a {}", "a drawing of a {}")
    module = image_text_module(cfg, prompts, query_size=30)
    names = module.load().class_names
    assert names[0] == "t-shirt" and names[9] == "ankle boot"

    def captions(epoch):
        views = module.train_dataloader().dataset
        return {i: tuple(views[(epoch, i)][4]["text"].tolist()) for i in range(40)}

    def prompted(label):
        return {tuple(tokenizer(prompt.format(names[int(label)]))[0].tolist()) for prompt in prompts}

    first, again, later = captions(0), captions(0), captions(1)
    assert first == again  # drawn from (seed, epoch, index)
    assert first != later
    labels = module.load().train.base.labels
    assert all(caption in prompted(labels[i]) for i, caption in first.items())
    assert {tokenizer.decode(caption).split()[1] for caption in first.values()} == {"photo", "drawing"}
    _, heldout_labels, tokens = next(iter(module.heldout_pairs_loader(0, 1)))
    assert all(tuple(t.tolist()) in prompted(label) for t, label in zip(tokens, heldout_labels))
