import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from sslrun.distributed.checkpoint import AtomicCheckpointIO
from sslrun.models.backbones import BackboneError, build_backbone
from sslrun.models.heads import MLPHead


def backbone_cfg(name="resnet18", small_stem=False, **timm_kwargs):
    return OmegaConf.create({"name": name, "small_stem": small_stem, "drop_path_rate": 0.0,
                             "timm_kwargs": timm_kwargs, "attention": None})


def test_small_stem_keeps_32px_resolution_into_the_first_stage():
    x = torch.randn(2, 3, 32, 32)
    plain = build_backbone(backbone_cfg(), in_chans=3)
    small = build_backbone(backbone_cfg(small_stem=True), in_chans=3)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert plain.forward_features(x).shape[-2:] == (1, 1)  # 32 / 32
    assert small.forward_features(x).shape[-2:] == (4, 4)  # 32 / 8
    assert small(x).shape == (2, 512)


def test_backbone_errors_name_the_fix():
    with pytest.raises(BackboneError, match="resnet19: not a timm model; did you mean"):
        build_backbone(backbone_cfg("resnet19"), in_chans=3)
    with pytest.raises(BackboneError, match="small_stem=true"):
        build_backbone(backbone_cfg("vit_tiny_patch16_224", small_stem=True), in_chans=3)


def test_channels_and_input_planes_come_from_config():
    model = build_backbone(backbone_cfg(channels=[8, 16, 32, 64]), in_chans=1)
    assert model.num_features == 64 and model.conv1.in_channels == 1


def test_mlp_head_follows_its_spec():
    head = MLPHead(in_dim=16, out_dim=4, num_layers=3, hidden_dim=None, batch_norm=True, last_batch_norm=True)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(16, 16), (16, 16), (16, 4)]
    assert all(l.bias is None for l in linears)  # every Linear feeds a BN
    assert isinstance(head[-1], nn.BatchNorm1d) and sum(isinstance(m, nn.ReLU) for m in head) == 2
    plain = MLPHead(in_dim=8, out_dim=2, num_layers=2, hidden_dim=32, batch_norm=False, last_batch_norm=False)
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear] and plain[-1].bias is not None
    assert plain(torch.randn(5, 8)).shape == (5, 2)


def test_interrupted_checkpoint_save_keeps_the_previous_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_resnet_runs_multi_crop_views_one_batch_per_size():
    """SwAV's multi-crop on a ResNet: the 2 global crops in one forward, the 4 local ones in another;
    each crop's features are what the backbone gives it alone (eval mode: no batch statistics)."""
    import timm

    from sslrun.models.multicrop import forward_by_resolution, same_size_runs

    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(3, 1, 32, 32, generator=g) for _ in range(2)] + \
            [torch.randn(3, 1, 16, 16, generator=g) for _ in range(4)]
    assert same_size_runs(crops) == [(0, 2), (2, 6)]
    resnet = timm.create_model("resnet18", num_classes=0, in_chans=1, channels=[8, 16, 16, 32]).eval()
    calls = []
    resnet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    with torch.no_grad():
        outputs = forward_by_resolution(resnet, crops)
        assert calls == [6, 12]  # one batch per size
        for crop, output in zip(crops, outputs):
            torch.testing.assert_close(output, resnet(crop), rtol=1e-5, atol=1e-5)


def test_token_predictor_packs_segments_of_any_lengths_as_each_alone():
    """MAE's decoder / I-JEPA's predictor: four segments (context + queries of 4 + 2, 1 + 6, 6 + 1,
    2 + 4 tokens: equal lengths apart, which the pass puts side by side) in one packed call give, at each query, what the segment gives run alone through the
    same blocks as a batch of one: embedded context and mask tokens, each plus its position."""
    from sslrun.models.attention import BlockDiagonalAttention
    from sslrun.models.predictor import TokenPredictor

    torch.manual_seed(0)
    predictor = TokenPredictor(12, 16, 2, 2, 5, (3, 3), BlockDiagonalAttention("sdpa")).eval()
    context_lengths, query_lengths = (4, 1, 6, 2), (2, 6, 1, 4)
    context = torch.randn(sum(context_lengths), 12)
    context_positions = torch.randint(0, 10, (sum(context_lengths),))
    query_positions = torch.randint(1, 10, (sum(query_lengths),))
    got = predictor(context, context_positions, context_lengths, query_positions, query_lengths)
    expected = []
    for c, cp, q in zip(context.split(context_lengths), context_positions.split(context_lengths),
                        query_positions.split(query_lengths)):
        table = predictor.position_table
        x = torch.cat([predictor.embed(c) + table[cp], predictor.mask_token + table[q]])[None]
        for block in predictor.blocks:
            x = block(x)
        expected.append(predictor.head(predictor.norm(x[0, len(c):])))
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-5)
    assert torch.equal(predictor.position_table[0], torch.zeros(16))  # prefix tokens: no position
