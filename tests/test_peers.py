"""sslrun against a peer library: its losses give lightly's numbers on the same inputs (an
independent implementation of the same formulas), and sslrun itself never imports a peer
(lightly is a benchmark-only extra, `make peers`, used by scripts/bench_peers.py)."""

import ast
import math

import pytest
import torch

from tests.conftest import REPO, load_script

PEERS = {"lightly", "solo", "stable_pretraining", "vissl", "mmselfsup"}



def test_sslrun_never_imports_a_peer_library():
    imported = []
    for path in sorted((REPO / "sslrun").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            imported += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in PEERS]
    assert not imported


@pytest.fixture
def lightly_loss():
    return pytest.importorskip("lightly.loss", reason="lightly is installed by `make peers` (make test does)")


@pytest.fixture
def bench_peers():
    return load_script("bench_peers")


@pytest.fixture
def bench_loader():
    return load_script("bench_loader")


@pytest.fixture
def views():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(64, 32, generator=generator), torch.randn(64, 32, generator=generator)


def test_nt_xent_equals_lightlys(views, lightly_loss):
    from sslrun.losses.nt_xent import nt_xent_loss

    for temperature in (0.1, 0.5):
        expected = lightly_loss.NTXentLoss(temperature=temperature)(*views)
        torch.testing.assert_close(nt_xent_loss(*views, temperature), expected)


def test_vicreg_equals_lightlys(views, lightly_loss):
    from sslrun.losses.vicreg import vicreg_loss

    loss, _ = vicreg_loss(*views, invariance_weight=25.0, variance_weight=25.0, covariance_weight=1.0, eps=1e-4)
    expected = lightly_loss.VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=1e-4)(*views)
    torch.testing.assert_close(loss, expected)


def test_negative_cosine_similarity_equals_lightlys(views, lightly_loss):
    from sslrun.losses.cosine import negative_cosine_similarity

    torch.testing.assert_close(negative_cosine_similarity(*views), lightly_loss.NegativeCosineSimilarity()(*views))


def test_barlow_twins_equals_lightlys_up_to_the_variance_estimate(views, lightly_loss):
    """lightly standardises with the unbiased std, sslrun (as the paper's BatchNorm) with the
    biased one plus eps: C differs by the factor (N - 1) / N, which the comparison undoes."""
    from sslrun.losses.barlow_twins import barlow_twins_loss

    n = views[0].shape[0]
    ours = barlow_twins_loss(views[0], views[1], lambd=0.0051)
    expected = lightly_loss.BarlowTwinsLoss(lambda_param=0.0051)(*views)
    assert abs(ours.item() - expected.item()) / expected.item() < 2 / n  # the two estimators' gap


def test_dino_loss_equals_lightlys(lightly_loss):
    """Two global and two local crops, a zero centre: the cross-entropy over every (teacher
    global, other student crop) pair, averaged, as lightly's DINOLoss computes it."""
    from sslrun.losses.dino import centered_teacher_probs, dino_loss

    generator = torch.Generator().manual_seed(1)
    teacher = [torch.randn(16, 40, generator=generator) for _ in range(2)]
    student = [torch.randn(16, 40, generator=generator) for _ in range(4)]
    center = torch.zeros(1, 40)
    ours = dino_loss([s / 0.1 for s in student], [centered_teacher_probs(t, center, 0.04) for t in teacher])
    peer = lightly_loss.DINOLoss(output_dim=40, warmup_teacher_temp=0.04, teacher_temp=0.04,
                                 warmup_teacher_temp_epochs=0, student_temp=0.1)
    torch.testing.assert_close(ours, peer(teacher, student))


def test_bench_peers_maps_each_sslrun_view_to_a_lightly_view(lightly_loss, bench_peers):
    """scripts/bench_peers.py hands sslrun's views to lightly's transforms: one lightly view per
    sslrun view, each with the view's crop size and scale, flip, jitter, grey, blur and
    solarisation probabilities and the data's mean and std; an image becomes as many tensors."""
    from PIL import Image
    from torchvision.transforms import v2

    from sslrun.config import compose

    image = Image.fromarray((torch.rand(28, 28) * 255).to(torch.uint8).numpy(), mode="L")
    for method in ("simclr", "byol", "dino", "swav", "lejepa", "mae"):
        cfg = compose([f"method={method}"])
        views = [view for view in cfg.augmentation.views for _ in range(view.count)]
        transform = bench_peers.lightly_views(cfg)
        assert [tuple(t.shape) for t in transform(image)] == [(1, v.size, v.size) for v in views], method
        for view, lightly_view in zip(views, transform.transforms):
            steps = {type(step).__name__: step for step in lightly_view.transform.transforms}
            crop, jitter = steps["RandomResizedCrop"], steps["RandomApply"]
            assert crop.size == [view.size, view.size] or tuple(crop.size) == (view.size, view.size), method
            assert tuple(crop.scale) == pytest.approx(tuple(view.scale)), method
            assert steps["RandomHorizontalFlip"].p == view.flip_p and jitter.p == view.color_jitter.p
            brightness = view.color_jitter.brightness  # torchvision keeps no range for a strength of 0
            assert jitter.transforms[0].brightness == (pytest.approx((1 - brightness, 1 + brightness))
                                                       if brightness else None)
            assert steps["RandomGrayscale"].p == view.grayscale_p
            assert steps["GaussianBlur"].prob == view.blur_p and steps["RandomSolarization"].prob == view.solarize_p
            normalize = steps["Normalize"]
            assert isinstance(normalize, v2.Normalize) or hasattr(normalize, "mean")
            assert list(normalize.mean) == list(cfg.data.mean) and list(normalize.std) == list(cfg.data.std)


def test_bench_loader_reads_one_folder_through_sslruns_pipeline_and_lightlys(lightly_loss, bench_loader, tmp_path):
    """scripts/bench_loader.py's lightly rows read the folder its sslrun rows read, as many batches per
    epoch and the recipe's views (count and sizes): lightly's augmented in the workers (float32),
    sslrun's as uint8 crops that the device step augments."""
    bench_loader.make_folder(tmp_path, 12)
    for method in ("simclr", "dino"):
        cfg = bench_loader.config(method, tmp_path, 4, 0, "cpu")
        shapes = [(4, 3, view.size, view.size) for view in cfg.augmentation.views for _ in range(view.count)]
        ours, theirs = bench_loader.data_module(cfg).train_dataloader(), bench_loader.lightly_loader(cfg)
        assert len(ours) == len(theirs) == 3, method
        batch, (views, labels) = next(iter(ours)), next(iter(theirs))
        assert [tuple(view.shape) for view in batch["views"]] == [tuple(view.shape) for view in views] == shapes, method
        assert {view.dtype for view in batch["views"]} == {torch.uint8} and {view.dtype for view in views} == {torch.float32}
        assert len(labels) == 4 and bench_loader.loader_rate(cfg, bench_loader.LIGHTLY) > 0, method


def test_nearest_neighbour_support_set_equals_lightlys():
    """NNCLR's NN(z, Q): the Queue's nearest rows are those lightly's NNMemoryBankModule returns
    from the same bank. (lightly's NNCLR example then applies NT-Xent, 2N - 1 candidates per
    anchor; sslrun follows the paper's eq. 2, the N predictions of the other view:
    tests/losses/test_losses.py.)"""
    modules = pytest.importorskip("lightly.models.modules", reason="lightly is installed by `make peers`")
    from sslrun.models.queue import Queue

    generator = torch.Generator().manual_seed(3)
    queue = Queue(50, 16)
    queue.push(torch.nn.functional.normalize(torch.randn(50, 16, generator=generator), dim=1))
    peer = modules.NNMemoryBankModule(size=(50, 16))
    peer.bank = queue.rows.clone()  # lightly's layout: (size, dim), as its _init_memory_bank makes it
    queries = torch.randn(20, 16, generator=generator)
    torch.testing.assert_close(queue.nearest(queries), peer(queries, update=False))


@pytest.mark.parametrize("queued", [0, 48])
def test_swav_codes_and_loss_equal_lightlys(lightly_loss, queued):
    """Two global and four local crops' prototype scores (and a queue of earlier scores per global
    crop): sslrun's Sinkhorn-Knopp codes and swapped prediction give lightly's SwaVLoss."""
    from sslrun.losses import sinkhorn_knopp, swav_loss

    generator = torch.Generator().manual_seed(4)
    scores = [torch.randn(16, 30, generator=generator) * 0.3 for _ in range(6)]
    queue = [torch.randn(queued, 30, generator=generator) * 0.3 for _ in range(2)] if queued else None
    codes = [sinkhorn_knopp(torch.cat([queue[t], scores[t]]) if queued else scores[t], 0.05, 3)[-16:]
             for t in range(2)]
    peer = lightly_loss.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    expected = peer(scores[:2], scores[2:], queue)
    torch.testing.assert_close(swav_loss(scores, codes, 0.1), expected.squeeze(), rtol=1e-5, atol=1e-6)


def test_sigreg_and_lejepa_loss_equal_lightlys(lightly_loss):
    """lightly's SIGReg (Epps-Pulley on [0, t_max], doubled) and LeJEPALoss on multi-view
    projections [V, N, D], with the same random directions given to both."""
    from sslrun.losses import lejepa_loss, random_directions, sigreg_loss

    torch.manual_seed(9)
    views = torch.randn(5, 32, 16) * 1.5 + 0.3  # 2 global + 3 local views, far from N(0, I)
    directions = random_directions(16, 64, seed=3, device="cpu")
    sigreg = lightly_loss.SIGReg(num_vectors=64)
    sigreg._generate_unit_vectors = lambda device, dtype, features: directions
    torch.testing.assert_close(sigreg_loss(views, directions), sigreg(views))
    loss = lightly_loss.LeJEPALoss(lambda_param=0.05, sigreg_num_vectors=64)
    loss.sigreg._generate_unit_vectors = lambda device, dtype, features: directions
    ours, _, _ = lejepa_loss(views, 2, directions, 0.05)
    torch.testing.assert_close(ours, loss(local_proj=views[2:], global_proj=views[:2]))


def test_ijepa_predictor_equals_lightlys_on_blocks_of_one_size():
    """I-JEPA's predictor as one packed sequence of (image, block) segments gives what lightly's
    IJEPAPredictorTIMM gives with the same weights, where lightly can run (every context and every
    target block of one size: the reference truncates to make them so). The 2-D sin-cos position
    tables are each library's own, so their layouts are compared too."""
    lightly_modules = pytest.importorskip("lightly.models.modules", reason="lightly is installed by `make peers`")
    from sslrun.models.attention import BlockDiagonalAttention
    from sslrun.models.predictor import TokenPredictor

    torch.manual_seed(0)
    images, grid, context, target, blocks = 3, (3, 3), 5, 3, 2
    peer = lightly_modules.IJEPAPredictorTIMM(num_patches=9, depth=2, mlp_dim=12, predictor_embed_dim=16,
                                              num_heads=2).eval()
    ours = TokenPredictor(12, 16, 2, 2, 12, grid, BlockDiagonalAttention("sdpa")).eval()
    with torch.no_grad():
        peer.decoder.mask_token.normal_()  # lightly starts it at zero: a random one is a stronger check
        for mine, theirs in ((ours.embed, peer.predictor_embed), (ours.blocks, peer.decoder.blocks),
                             (ours.norm, peer.decoder.norm), (ours.head, peer.predictor_proj)):
            mine.load_state_dict(theirs.state_dict())
        ours.mask_token.copy_(peer.decoder.mask_token.flatten())
    tokens = torch.randn(images, context, 12)
    context_at = torch.stack([torch.randperm(9)[:context] for _ in range(images)])
    targets_at = [torch.stack([torch.randperm(9)[:target] for _ in range(images)]) for _ in range(blocks)]
    expected = peer(tokens.clone(), [context_at], targets_at)  # [blocks x images, target, 12], block-major
    segments = [(i, j) for j in range(blocks) for i in range(images)]
    got = ours(torch.cat([tokens[i] for i, _ in segments]), torch.cat([context_at[i] + 1 for i, _ in segments]),
               [context] * len(segments), torch.cat([targets_at[j][i] + 1 for i, j in segments]),
               [target] * len(segments))
    torch.testing.assert_close(got.view(blocks * images, target, 12), expected, rtol=1e-5, atol=1e-5)


def test_bench_peers_ijepa_loop_trains_the_context_path_and_evaluates_the_target(lightly_loss, bench_peers):
    """The lightly I-JEPA loop: lightly's collator draws 4 target blocks and a context block
    without them per image, one step's loss reaches the context encoder and the predictor but not
    the EMA target encoder, which is what the loop saves for the shared evaluation."""
    from sslrun.config import compose
    from sslrun.methods.registry import registered
    from sslrun.models.backbones import build_backbone

    torch.manual_seed(0)
    cfg = compose(["method=ijepa", *registered()["ijepa"].test_overrides])
    backbone = build_backbone(cfg.backbone, cfg.data.channels)
    method = bench_peers.LightlyMethod(cfg, backbone, total_steps=10, steps_per_epoch=10)
    views, labels = method.collate([([torch.randn(1, 28, 28)], label) for label in range(6)])
    (images,), context, targets = views
    assert images.shape == (6, 1, 28, 28) and labels.tolist() == list(range(6))
    assert len(context) == 1 and len(targets) == cfg.method.targets
    for i in range(6):
        covered = set(torch.cat([block[i] for block in targets]).tolist())
        assert covered and not covered & set(context[0][i].tolist())
    method.loss(views, 0).backward()
    assert method.evaluated is method.target_backbone is not backbone
    assert all(p.grad is None for p in method.target_backbone.parameters())
    assert backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert method.head.predictor_proj.weight.grad.abs().sum() > 0


def test_bench_peers_lightly_loop_runs_in_the_sslrun_sides_precision(lightly_loss, bench_peers, tmp_path,
                                                                     monkeypatch):
    """The lightly loop takes trainer.precision and trainer.accelerator from the shared config: under
    bf16-mixed its backbone computes in bf16 (as the sslrun side's does) and the run completes with
    the summary the table reads; what the loop cannot run like sslrun is refused in one line."""
    import json

    from sslrun.config import compose
    from tests.conftest import TINY

    cfg = compose(["method=simclr", *TINY, "data.batch_size=16", "trainer.max_steps=3",
                   "trainer.precision=bf16-mixed"])
    assert bench_peers.loop_device(cfg)[0].type == "cpu"
    seen, loss = [], bench_peers.LightlyMethod.loss

    def recorded(method, views, step):
        seen.append((torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
                     method.backbone(views[0]).dtype))
        return loss(method, views, step)

    monkeypatch.setattr(bench_peers.LightlyMethod, "loss", recorded)
    bench_peers.train_lightly(cfg, tmp_path / "run")
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 3 and math.isfinite(summary["final_loss"])
    for refused in ("trainer.precision=16-mixed", "trainer.compile.enabled=true"):
        with pytest.raises(SystemExit, match=r"the lightly loop runs eager on one device in 32-true or bf16-mixed"):
            bench_peers.loop_device(compose(["method=simclr", refused]))
    if not torch.cuda.is_available():  # the same one line as a run of sslrun's (train._train)
        from sslrun.config import ConfigError

        with pytest.raises(ConfigError, match=r"^trainer.accelerator=gpu: no CUDA device is visible here; use "
                                              r"trainer.accelerator=cpu or auto$"):
            bench_peers.loop_device(compose(["method=simclr", "trainer.accelerator=gpu"]))


def test_bench_peers_stops_a_side_past_its_timeout_and_counts_it_failed(bench_peers, tmp_path, capsys):
    assert not bench_peers.run_side("sslrun", "simclr", 0, 5, tmp_path, timeout=1)
    assert "simclr seed 0: sslrun failed (exit code none: stopped after 1 s)" in capsys.readouterr().out
    assert (tmp_path / "simclr" / "sslrun_seed0" / "peers.out").is_file()


@pytest.mark.parametrize("method", ["mae", "ijepa"])
def test_bench_peers_times_both_sides_model_step_on_one_batch(lightly_loss, bench_peers, method):
    """--model-step: both sides' forward and backward on one batch of the recipe's views (I-JEPA's
    with each side's own masks, sslrun's packed as its loader packs them), each giving a finite
    loss; the ratio is of the two medians. I-JEPA's sslrun side also runs on lightly's masks (the
    same work as lightly's step) and on one image's masks for every image (its own work at equal
    lengths), each with a loss of its own and its own ratio."""
    from sslrun.config import compose
    from sslrun.methods.registry import registered

    cfg = compose([f"method={method}", "data.batch_size=8", *registered()[method].test_overrides])
    result = bench_peers.model_step(cfg, pairs=1, steps=1)
    other_masks = ["sslrun_on_lightly_masks", "sslrun_equal_lengths"] if method == "ijepa" else []
    assert set(result["losses"]) == {"sslrun", "lightly", *other_masks}
    assert all(math.isfinite(loss) and loss > 0 for loss in result["losses"].values()), result
    for side in ["sslrun", *other_masks]:
        assert result[f"{side}_over_lightly"] == pytest.approx(result["lightly_ms"] / result[f"{side}_ms"], rel=1e-2)
    if other_masks:  # other masks: other losses from the same weights and images
        assert len({result["losses"][side] for side in ["sslrun", *other_masks]}) == 3
        assert result["variable_lengths_cost"] == pytest.approx(
            result["sslrun_ms"] / result["sslrun_equal_lengths_ms"], rel=1e-2)


def test_bench_peers_table_reads_runs_or_their_records_and_keeps_older_rows(tmp_path, bench_peers):
    """The peer table from run directories, else from the records kept in the repository (a new
    checkout has no runs), and an earlier table's row for a method with neither, said so."""
    import json

    from sslrun.benchmark import write_results

    root, records, out = tmp_path / "runs", tmp_path / "records", tmp_path / "benchmarks.md"
    for seed, (ours, theirs) in enumerate([(300.0, 200.0), (330.0, 300.0)]):
        for side, rate, top1 in (("sslrun", ours, 0.70 + seed / 100), ("lightly", theirs, 0.69)):
            run = root / "swav" / f"{side}_seed{seed}"
            (run / "eval").mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps({"images_per_sec": rate, "global_step": 234}))
            (run / "eval" / "knn.json").write_text(json.dumps({"top1": top1}))
    (root / "swav" / "batch.json").write_text(json.dumps({"batch": 256}))
    (root / "swav" / "sslrun_seed0" / "backbone.safetensors").write_bytes(b"weights stay out of the records")
    old_row = "| **simclr** | 902 | 581 | 1.57x (1.72) | 0.800 | 0.798 | 1 | 234 x 256 |"
    write_results(out, "peers", "Written 2026-12-03 15:19 UTC by ...\n\n| method | ... |\n|---|\n" + old_row)
    bench_peers.save_records(root, records, "swav")
    assert sorted(str(p.relative_to(records)) for p in records.rglob("*") if p.is_file()) == sorted(
        ["swav/batch.json"] + [f"swav/{side}_seed{seed}/{name}" for side in ("sslrun", "lightly") for seed in (0, 1)
                               for name in ("summary.json", "eval/knn.json")])
    for source in (root, tmp_path / "no-runs"):  # from the runs, then from the records alone
        text = bench_peers.table(["simclr", "swav"], [0, 1], source, records, bench_peers.existing_rows(out))
        rows = {line.split("**")[1]: line for line in text.splitlines() if line.startswith("| **")}
        assert rows["simclr"] == old_row
        assert rows["swav"] == "| **swav** | 315 | 250 | 1.30x (1.50, 1.10) | 0.705 ± 0.007 | 0.690 ± 0.000 | 2 | 234 x 256 |"
        assert "kept as they were, written 2026-12-03 15:19 UTC (no runs or records of theirs here): simclr." in text
