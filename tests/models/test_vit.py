"""Packed multi-crop ViT forward: equal to timm's own per-crop forward, on every CPU backend."""

import logging

import pytest
import timm
import torch

from sslrun.config import ConfigError
from sslrun.models.attention import BlockDiagonalAttention, Packing, math_attention, run_grouped
from sslrun.models.vit import MaskToken, crop_tokens, enable_packing, grouped_forward, packed_forward, residual_on_subset

BATCH = 3


def tiny_vit(attention="math", reg_tokens=0, drop_path_rate=0.0):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=28, patch_size=4, depth=2,
                            in_chans=1, dynamic_img_size=True, reg_tokens=reg_tokens,
                            drop_path_rate=drop_path_rate)
    return enable_packing(vit, attention)


def multi_crop(batch=BATCH, seed=1):
    g = torch.Generator().manual_seed(seed)
    sizes = [28, 28, 12, 12, 12, 16]  # global, global, locals, and one odd size
    return [torch.randn(batch, 1, s, s, generator=g) for s in sizes]


def reference_forward(vit, crops):
    """timm's own forward, one crop at a time: no packing, no mask."""
    return [vit.forward_features(c) for c in crops]


def loss_of(outputs):
    g = torch.Generator().manual_seed(2)
    return sum((o * torch.randn(o.shape, generator=g)).sum() for o in outputs)


def assert_close_to_scale(got, expected, tolerance=1e-5, name=""):
    """|got - expected| <= tolerance * max|expected|: equal up to fp32 summation order."""
    error = (got - expected).abs().max().item()
    assert error <= tolerance * expected.abs().max().item(), (name, error, expected.abs().max().item())


def grads(vit):
    return {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_packed_forward_equals_per_crop_forward_outputs_and_gradients(backend, reg_tokens):
    vit = tiny_vit(backend, reg_tokens).eval()
    crops = multi_crop()
    reference = reference_forward(vit, crops)
    loss_of(reference).backward()
    expected = grads(vit)
    vit.zero_grad()

    packed = packed_forward(vit, crops)
    assert [p.shape for p in packed] == [r.shape for r in reference]
    for p, r in zip(packed, reference):
        torch.testing.assert_close(p, r, atol=1e-5, rtol=1e-5)
    loss_of(packed).backward()
    got = grads(vit)
    assert got.keys() == expected.keys()
    for name in expected:
        assert_close_to_scale(got[name], expected[name], name=name)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_kept_patches_of_any_count_run_as_each_image_alone(backend, reg_tokens):
    """`keep` (MAE's encoder, I-JEPA's context): image i keeps its own patches (5, 7 and 5 of 49:
    equal lengths apart, which the pass puts side by side, and a fixed 5 for a second crop); each
    image's output and every gradient equal the blocks run on that image's prefix and kept tokens
    alone, in the order given."""
    vit = tiny_vit(backend, reg_tokens).eval()
    crops = multi_crop()[:2]
    g = torch.Generator().manual_seed(4)
    ragged = [torch.randperm(49, generator=g)[:count] for count in (5, 7, 5)]
    fixed = torch.stack([torch.randperm(49, generator=g)[:5] for _ in range(BATCH)])
    prefix = vit.num_prefix_tokens
    reference = []
    for images, kept in zip(crops, (ragged, list(fixed))):
        tokens = crop_tokens(vit, images)
        for i, k in enumerate(kept):
            alone = torch.cat([tokens[i:i + 1, :prefix], tokens[i:i + 1, prefix:][:, k]], 1)
            reference.append(vit.norm(vit.blocks(alone))[0])
    loss_of(reference).backward()
    expected = grads(vit)
    vit.zero_grad()

    first, second = packed_forward(vit, crops, keep=[ragged, fixed])
    assert first.shape == (3 * prefix + 17, 192) and second.shape == (BATCH * (prefix + 5), 192)
    outputs = [*first.split([prefix + len(k) for k in ragged]), *second.split(prefix + 5)]
    for got, want in zip(outputs, reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    loss_of(outputs).backward()
    for name, grad in grads(vit).items():
        assert_close_to_scale(grad, expected[name], name=name)


def test_grouped_forward_equals_packed_forward():
    vit = tiny_vit("sdpa").eval()
    crops = multi_crop()
    with torch.no_grad():
        for a, b in zip(grouped_forward(vit, crops), packed_forward(vit, crops)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flex_attention_forward_equals_per_crop_forward():
    """flex_attention compiles on CPU (about half a minute) and runs forward only there."""
    vit = tiny_vit("flex").eval()
    crops = multi_crop()
    with torch.no_grad():
        for p, r in zip(packed_forward(vit, crops), reference_forward(vit, crops)):
            torch.testing.assert_close(p, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [(5, 5, 3, 3, 4), (197, 197, 37, 37, 37, 37, 50), (128, 128), (300,), (1,) * 300,
                                     (127, 129, 128, 256, 255, 257), (256, 100, 28, 128, 128, 1)])
def test_flex_block_mask_is_create_block_masks_without_the_dense_mask(lengths):
    """flex's BlockMask, built from segment bounds per 128-token block, equals torch's own
    create_block_mask (which evaluates the dense tokens x tokens mask) tensor for tensor."""
    from torch.nn.attention.flex_attention import create_block_mask

    from sslrun.models.attention import flex_block_mask

    packing = Packing(lengths)
    ids = packing.segment_ids("cpu")
    expected = create_block_mask(lambda b, h, q, k: ids[q] == ids[k], None, None, packing.total, packing.total,
                                 device="cpu")
    got = flex_block_mask(packing, "cpu")
    assert got.seq_lengths == expected.seq_lengths and got.BLOCK_SIZE == expected.BLOCK_SIZE
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
                 "full_q_num_blocks", "full_q_indices"):
        a, b = getattr(got, name), getattr(expected, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_a_subset_of_crops_is_a_varying_packing():
    """Efficient stochastic depth's random subsets are marked, so flex compiles them for dynamic shapes."""
    packing = Packing((4, 4, 2, 2))
    assert not packing.varying
    subset = packing.subset(torch.tensor([0, 2]))
    assert subset.varying and subset == Packing((4, 2))


def test_flex_refuses_to_train_on_cpu_with_a_clear_error():
    vit = tiny_vit("flex")
    with pytest.raises(ConfigError, match="no backward on CPU.*sdpa or auto"):
        packed_forward(vit, multi_crop())


def test_xformers_mask_is_our_block_diagonal_mask_and_its_kernels_need_cuda():
    fmha = pytest.importorskip("xformers.ops.fmha")
    packing = Packing((5, 5, 3, 3, 4))
    ids = packing.segment_ids("cpu")
    ours = ids[:, None] == ids[None, :]
    theirs = fmha.BlockDiagonalMask.from_seqlens(list(packing.lengths)).materialize((packing.total, packing.total))
    assert torch.equal(theirs == 0, ours)  # 0 where attention is allowed, -inf elsewhere
    with pytest.raises(ConfigError, match="backbone.attention=xformers: .*CUDA"):
        packed_forward(tiny_vit("xformers"), multi_crop())


def test_auto_picks_sdpa_on_cpu_and_says_so(caplog):
    vit = tiny_vit("auto").eval()
    with caplog.at_level(logging.INFO), torch.no_grad():
        packed_forward(vit, multi_crop())
    assert vit.block_diagonal_attention.name == "sdpa"
    assert "attention backend: sdpa (auto, on cpu)" in caplog.text


def test_unknown_backend_and_non_vit_backbones_are_refused():
    with pytest.raises(ConfigError, match="backbone.attention=fast: choose one of: auto, xformers, flex, sdpa, math"):
        BlockDiagonalAttention("fast")
    resnet = timm.create_model("resnet18", num_classes=0)
    with pytest.raises(ConfigError, match="not a timm VisionTransformer; set backbone.attention=null"):
        enable_packing(resnet, "auto")
    fixed = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=28, patch_size=4, depth=1)
    with pytest.raises(ConfigError, match="dynamic_img_size: must be true"):
        enable_packing(fixed, "auto")


def test_packing_runs_and_token_index():
    packing = Packing((4, 4, 2, 2, 2, 3))
    assert packing.total == 17
    assert packing.runs == [(0, 2, 4), (8, 3, 2), (14, 1, 3)]
    assert packing.segment_ids("cpu").tolist() == [0] * 4 + [1] * 4 + [2] * 2 + [3] * 2 + [4] * 2 + [5] * 3
    chosen = torch.tensor([1, 3, 5])
    assert packing.token_index(chosen).tolist() == [4, 5, 6, 7, 10, 11, 14, 15, 16]
    assert packing.subset(chosen).lengths == (4, 2, 3)


def test_math_attention_is_per_segment_softmax_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g) for _ in range(3))
    packing = Packing((3, 4))
    out = math_attention(q, k, v, packing)
    for start, end in ((0, 3), (3, 7)):
        weights = torch.softmax(q[..., start:end, :] @ k[..., start:end, :].transpose(-2, -1) / 8 ** 0.5, dim=-1)
        torch.testing.assert_close(out[..., start:end, :], weights @ v[..., start:end, :])


@pytest.mark.parametrize("lengths", [(3, 3, 5, 2, 2), (3, 5, 3, 2, 5, 3, 1)])
def test_sdpa_attention_is_math_attention_for_adjacent_and_scattered_equal_lengths(lengths):
    """Runs of adjacent equal lengths are sliced; equal lengths apart (I-JEPA's segments) are
    gathered per length: outputs and gradients are the reference's either way."""
    from sslrun.models.attention import sdpa_attention

    g = torch.Generator().manual_seed(1)
    packing = Packing(lengths)
    q, k, v = (torch.randn(1, 2, packing.total, 8, generator=g).requires_grad_(True) for _ in range(3))
    weights = torch.randn(1, 2, packing.total, 8, generator=g)
    results = []
    for attention in (math_attention, sdpa_attention):
        out = attention(q, k, v, packing)
        grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
        results.append((out, grads))
    (expected, expected_grads), (got, got_grads) = results
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_run_grouped_gives_the_layers_equal_lengths_side_by_side_and_restores_the_order():
    """Grouped once for every layer: the layers see each length as one run (first appearance
    first), and the outputs and gradients are the ungrouped attention's, token for token."""
    packing = Packing((3, 5, 3, 2, 5, 3))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, packing.total, 8, generator=g).requires_grad_(True)
    weights = torch.randn(1, packing.total, 8, generator=g)
    seen = []

    def layers(t, p):  # two attention layers of one head
        seen.append(p)
        for _ in range(2):
            t = math_attention(t[:, None], t[:, None], t[:, None], p)[:, 0] * 1.5
        return t

    results = []
    for run in (run_grouped, lambda t, p, f: f(t, p)):
        out = run(x, packing, layers)
        results.append((out, torch.autograd.grad((out * weights).sum(), x)[0]))
    assert seen == [Packing((3, 3, 3, 5, 5, 2)), packing]
    assert [length for _, _, length in seen[0].runs] == [3, 5, 2]
    (got, got_grad), (expected, expected_grad) = results
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-6, rtol=1e-6)
    assert run_grouped(x, Packing((3, 3, 2)), lambda t, p: t) is x  # already grouped: no copy


def test_efficient_stochastic_depth_runs_the_branch_on_kept_segments_only():
    torch.manual_seed(3)
    packing = Packing((3, 3, 2, 2, 2, 2))
    x = torch.randn(1, packing.total, 4)
    weight = torch.randn(4, 4)
    seen = []

    def branch(t, p):
        seen.append((t.shape[1], p.lengths))
        return t @ weight

    out = residual_on_subset(x, packing, branch, drop_rate=0.5)
    kept_tokens, kept_lengths = seen[0]
    assert len(kept_lengths) == 3 and kept_tokens == sum(kept_lengths)  # 6 segments, half kept
    ids = packing.segment_ids("cpu")
    changed = [bool((out[0, ids == s] != x[0, ids == s]).any()) for s in range(6)]
    assert sum(changed) == 3
    for s in range(6):
        rows = ids == s
        expected = x[0, rows] + 2.0 * (x[0, rows] @ weight) if changed[s] else x[0, rows]
        torch.testing.assert_close(out[0, rows], expected)


def test_efficient_stochastic_depth_is_unbiased():
    """E[x + (n / kept) * 1[kept] * f(x)] = x + f(x): the scaling makes the expectation exact."""
    torch.manual_seed(4)
    packing = Packing((2, 2, 2, 2, 2))
    x = torch.randn(1, packing.total, 3)
    mean = sum(residual_on_subset(x, packing, lambda t, p: 2 * t, 0.4) for _ in range(4000)) / 4000
    torch.testing.assert_close(mean, 3 * x, atol=0.1, rtol=0.05)


def test_drop_path_blocks_train_on_subsets_and_evaluate_exactly():
    vit = tiny_vit("sdpa", drop_path_rate=0.5)
    crops = multi_crop()
    vit.train()
    out = packed_forward(vit, crops)
    loss_of(out).backward()
    assert all(torch.isfinite(p.grad).all() for p in vit.parameters() if p.grad is not None)
    vit.eval()
    with torch.no_grad():
        for p, r in zip(packed_forward(vit, crops), reference_forward(vit, crops)):
            torch.testing.assert_close(p, r, atol=1e-5, rtol=1e-5)


def test_masked_patches_become_the_mask_token_before_the_position_embedding():
    vit = tiny_vit()
    images = multi_crop()[0]
    mask = torch.zeros(BATCH, 49, dtype=torch.bool)
    mask[0, :10] = True
    mask_token = MaskToken(192)
    mask_token.token.data.normal_()
    token = mask_token.token.detach()
    masked = crop_tokens(vit, images, mask, mask_token)
    plain = crop_tokens(vit, images)
    prefix = vit.num_prefix_tokens
    position = vit.pos_embed[0, prefix:]  # timm's ViT-Ti: class token inside pos_embed
    torch.testing.assert_close(masked[0, prefix:prefix + 10], token + position[:10])
    torch.testing.assert_close(masked[0, prefix + 10:], plain[0, prefix + 10:])
    torch.testing.assert_close(masked[1:], plain[1:])


# ---------------------------------------------------------------------------- pictures
def test_class_attention_is_the_last_blocks_attention_row_of_the_class_token():
    from sslrun.eval.pictures import class_attention

    vit = tiny_vit(reg_tokens=4).eval()
    images = multi_crop()[0]
    captured = []
    last = vit.blocks[-1].attn
    last.fused_attn = False  # timm then runs softmax -> attn_drop, where a hook sees the matrix
    last.attn_drop.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    with torch.no_grad():
        vit.forward_features(images)
    expected = captured[-1][:, :, 0, vit.num_prefix_tokens:].reshape(BATCH, 3, 7, 7)
    torch.testing.assert_close(class_attention(vit, images), expected)


def test_patch_pca_colours_are_the_top_principal_components_scaled_to_unit_range():
    import numpy as np

    from sslrun.eval.pictures import attention_picture, class_attention, patch_pca, pca_picture

    vit = tiny_vit().eval()
    images = multi_crop()[0]
    rgb = patch_pca(vit, images)
    assert rgb.shape == (BATCH, 7, 7, 3) and rgb.min() >= 0 and rgb.max() <= 1
    with torch.no_grad():
        flat = vit.forward_features(images)[:, 1:].reshape(-1, 192).double().numpy()
    flat -= flat.mean(0)
    _, vectors = np.linalg.eigh(flat.T @ flat)
    for channel in range(3):
        component = flat @ vectors[:, -1 - channel]
        scaled = (component - component.min()) / (component.max() - component.min())
        got = rgb[..., channel].reshape(-1).double().numpy()
        assert min(np.abs(got - scaled).max(), np.abs(got - (1 - scaled)).max()) < 1e-4  # sign is arbitrary

    uint8 = (torch.rand(BATCH, 1, 28, 28) * 255).to(torch.uint8)
    attention = attention_picture(uint8, class_attention(vit, images))
    assert attention.size == (4 * 98 + 2, BATCH * 98 + 2)  # image + 3 heads per row, 96 px tiles
    assert pca_picture(uint8, rgb).size == (BATCH * 98 + 2, 2 * 98 + 2)


def test_patch_pca_is_computed_in_fp32_under_a_bf16_run():
    """Under trainer.precision=bf16-mixed the pictures run in autocast; the PCA must not (numpy
    has no bf16: found on a GPU run)."""
    from sslrun.eval.pictures import patch_pca, pca_picture

    vit = tiny_vit().eval()
    images = multi_crop()[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rgb = patch_pca(vit, images)
    assert rgb.dtype == torch.float32
    pca_picture((torch.rand(BATCH, 1, 28, 28) * 255).to(torch.uint8), rgb)
