"""`python -m sslrun.evaluate` / `evaluate_run` on a finished toy run (tests/eval/conftest.py):
each protocol's numbers against a computation by hand from the run's own files, the feature
cache, several processes against one, the one-line errors of the command line, the report."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sslrun.config import ConfigError
from sslrun.evaluate import evaluate_run
from sslrun.run_dir import RunDir
from tests.conftest import REPO, run_cli
from tests.eval.conftest import FAST, toy_training_overrides

LINEAR = [*FAST, "protocol.epochs=5", "protocol.batch_size=16"]


def images_by_hand(folder: Path):
    """The images of an image folder as ImageFiles orders them (sorted class folders, sorted
    files), scaled as the toy data config says, and their labels."""
    import numpy as np
    from PIL import Image

    paths = [(path, label) for label, name in enumerate(sorted(p.name for p in folder.iterdir()))
             for path in sorted((folder / name).rglob("*"))]
    pixels = torch.tensor(np.stack([np.asarray(Image.open(path)) for path, _ in paths]), dtype=torch.float32)
    return (pixels[:, None] / 255 - 0.3) / 0.25, torch.tensor([label for _, label in paths])


def backbone_by_hand(weights: Path) -> torch.nn.Module:
    """The exported backbone as its metadata says to build it (README: backbone.safetensors)."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(weights), "pt") as f:
        create = json.loads(f.metadata()["timm_create_model"])
    model = timm.create_model(**create)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def cached(run_dir: Path, split: str) -> list:
    return sorted((RunDir(run_dir).eval_dir / "features").glob(f"{split}_*.safetensors"))


def test_knn_on_a_run_equals_the_vote_by_hand(toy_run, toy_data):
    from sslrun.eval import knn_classify
    from sslrun.models.backbones import build_backbone

    result = evaluate_run(toy_run, "knn", [*FAST, "protocol.baselines=[pixels,random_init]"])
    assert json.loads(RunDir(toy_run).eval_result("knn").read_text()) == result
    (train, train_labels), (test, test_labels) = images_by_hand(toy_data / "train"), images_by_hand(toy_data / "val")

    def top1(embed, k=20):
        with torch.no_grad():
            predicted = knn_classify(embed(test), embed(train), train_labels, 3, k=k, temperature=0.07)
        return (predicted == test_labels).float().mean().item()

    model = backbone_by_hand(RunDir(toy_run).backbone)
    for k in (10, 20, 100, 200):
        assert result["top1_by_k"][str(k)] == pytest.approx(top1(model, k))
    assert result["top1"] == result["top1_by_k"]["20"]
    assert result["top1_pixels"] == pytest.approx(top1(lambda x: x.flatten(1)))
    torch.manual_seed(0)  # the random init: the run's backbone config, seeded by `seed`
    untrained = build_backbone(OmegaConf.create(result["source"]["backbone"]), in_chans=1).eval()
    assert result["top1_random_init"] == pytest.approx(top1(untrained))
    assert result["features"]["bank"] == 60 and result["features"]["queries"] == 24
    assert result["settings"]["k"] == [10, 20, 100, 200] and result["source"]["weights_sha256"]


def test_cached_features_are_reused_until_weights_or_view_change(toy_run, monkeypatch):
    from sslrun.evaluate import protocols

    calls = []
    real_embed = protocols.embed
    monkeypatch.setattr(protocols, "embed", lambda *a, **k: calls.append(1) or real_embed(*a, **k))
    first = evaluate_run(toy_run, "knn", FAST)
    assert len(calls) == 2 and len(cached(toy_run, "train")) == len(cached(toy_run, "test")) == 1
    again = evaluate_run(toy_run, "knn", FAST)
    assert len(calls) == 2, "the second call must not run the backbone"
    assert again["top1_by_k"] == first["top1_by_k"]
    evaluate_run(toy_run, "linear", LINEAR)  # the same features serve the linear protocol
    assert len(calls) == 2
    evaluate_run(toy_run, "knn", [*FAST, "data.eval_crop_fraction=0.8"])  # another view
    assert len(calls) == 4 and len(cached(toy_run, "train")) == 2
    from safetensors.torch import load_file, save_file

    weights = RunDir(toy_run).backbone
    save_file({k: v + 0.01 for k, v in load_file(str(weights)).items()}, str(weights))  # other weights
    evaluate_run(toy_run, "knn", FAST)
    assert len(calls) == 6 and len(cached(toy_run, "train")) == 3


def test_linear_on_a_run_is_the_protocol_on_its_features(toy_run):
    from safetensors.torch import load_file

    from sslrun.eval.linear import LinearSettings, linear_protocol

    result = evaluate_run(toy_run, "linear", LINEAR)
    assert result["epochs"] == 5 and result["grid"] == {"lr": [0.03, 0.1, 0.3, 1.0, 3.0], "weight_decay": [0.0, 5e-4]}
    assert len(result["val_top1"]) == 10 and result["heldout_for_choice"]["images"] == 6  # 10 % of 20, per class
    assert result["chosen"] in [{"lr": v["lr"], "weight_decay": v["weight_decay"]} for v in result["val_top1"]]
    # The app feeds the training split's features to the choice and the test split's to the score.
    (train,), (test,) = cached(toy_run, "train"), cached(toy_run, "test")
    train, test = load_file(str(train)), load_file(str(test))
    settings = LinearSettings(lrs=result["grid"]["lr"], weight_decays=result["grid"]["weight_decay"], epochs=5,
                              batch_size=16, momentum=0.9, heldout_fraction=0.1, seed=0)
    by_hand = linear_protocol(train["features"], train["labels"], test["features"], test["labels"], 3, settings)
    assert by_hand["top1"] == result["top1"] and by_hand["val_top1"] == result["val_top1"]


def test_augmented_linear_trains_on_its_own_crops(toy_run):
    from safetensors.torch import load_file

    result = evaluate_run(toy_run, "linear", [*LINEAR, "protocol.augment_passes=2", "protocol.epochs=2"])
    assert result["features"]["train_views"][0]["draws"] == 2
    train = [load_file(str(path))["features"] for path in cached(toy_run, "train")]
    assert len(train) == 3  # the center view and two crop passes
    for i in range(3):
        for j in range(i):
            assert not torch.allclose(train[i], train[j])


def test_stats_are_rankme_alignment_uniformity_of_its_features(toy_run):
    from safetensors.torch import load_file

    result = evaluate_run(toy_run, "stats", [*FAST, "protocol.pairs=12"])
    (test,) = [p for p in cached(toy_run, "test") if _key(p)["view"]["view"] == "center"]
    singular = torch.linalg.svdvals(load_file(str(test))["features"].double())
    p = singular / singular.sum() + 1e-7  # RankMe's epsilon
    assert result["rankme"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-4)
    views = [load_file(str(path))["features"] for path in cached(toy_run, "test") if path != test]
    assert len(views) == 2 and len(views[0]) == 12 == result["features"]["pairs"]
    x, y = (torch.nn.functional.normalize(v, dim=1) for v in views)
    assert result["alignment"] == pytest.approx(((x - y) ** 2).sum(1).mean().item(), rel=1e-5) and result["alignment"] > 0
    unif = [torch.log(torch.exp(-2 * torch.cdist(v, v) ** 2)[torch.triu(torch.ones(12, 12), 1) > 0].mean()) for v in (x, y)]
    assert result["uniformity"] == pytest.approx(sum(unif).item() / 2, rel=1e-4)


def _key(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["key"])


def test_finetuning_moves_the_backbone(toy_run):
    from safetensors.torch import load_file

    result = evaluate_run(toy_run, "finetune", [*FAST, "protocol.max_steps=3", "protocol.batch_size=16"])
    assert result["steps"] == 3 and result["layer_decay"] is None  # a ResNet: no layer-wise decay
    assert result["lr"] == pytest.approx(0.001 * 16 / 256) and 0 <= result["top1"] <= 1
    before, after = load_file(str(RunDir(toy_run).backbone)), load_file(result["weights"])
    assert set(after) - set(before) == {"fc.weight", "fc.bias"} and after["fc.weight"].shape == (3, 8)
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert "conv1.weight" in moved and "layer4.1.conv2.weight" in moved
    with pytest.raises(ConfigError, match="protocol.global_pool=avg: only a ViT pools a choice of tokens"):
        evaluate_run(toy_run, "finetune", [*FAST, "protocol.batch_size=16", "protocol.global_pool=avg"])


def test_weights_of_a_vit_finetune_with_layer_decay(tmp_path, toy_data):
    """A ViT fine-tunes with MAE's layer-wise decay, from its class token or (global_pool=avg) its patch mean."""
    from safetensors.torch import load_file, save_file

    from sslrun.config import compose
    from sslrun.models.backbones import build_backbone

    overrides = [o for o in toy_training_overrides(toy_data) if not o.startswith("backbone")]
    vit = ["backbone=vit_tiny_p4", "backbone.timm_kwargs.depth=2", "backbone.timm_kwargs.patch_size=8"]
    cfg = compose([*overrides, *vit], method_schema=False)
    weights = tmp_path / "vit.safetensors"
    save_file(build_backbone(cfg.backbone, in_chans=1).state_dict(), str(weights))
    out = tmp_path / "out"
    result = evaluate_run(out, "finetune", [*FAST, f"weights={weights}", *overrides, *vit, "protocol.max_steps=2",
                                            "protocol.batch_size=16"])
    assert result["steps"] == 2 and result["layer_decay"] == 0.75 and RunDir(out).eval_result("finetune").is_file()
    assert result["source"]["method"] is None and result["source"]["backbone"]["timm_kwargs"]["depth"] == 2
    assert result["global_pool"] == "token"  # the backbone's own head reads the class token
    averaged = evaluate_run(tmp_path / "avg", "finetune", [*FAST, f"weights={weights}", *overrides, *vit,
                                                           "protocol.max_steps=2", "protocol.batch_size=16",
                                                           "protocol.global_pool=avg"])
    assert averaged["global_pool"] == "avg" and averaged["settings"]["global_pool"] == "avg"
    heads = [load_file(r["weights"])["head.weight"] for r in (result, averaged)]
    assert not torch.equal(*heads)  # the same seeded head, trained on other features


def _evaluate_in_a_process_group(rank, world, run_dir, protocols):
    from sslrun.evaluate.config import compose_app, split_overrides
    from sslrun.evaluate.protocols import evaluate

    for protocol, overrides in protocols:
        own, training = split_overrides(overrides)
        evaluate(compose_app([f"protocol={protocol}", *own], run_dir=run_dir), training)


def test_two_processes_give_the_numbers_of_one(toy_run):
    from safetensors.torch import load_file

    from tests.processes import run_in_processes

    two = toy_run.parent / "two"
    shutil.copytree(toy_run, two)
    one_knn, one_linear = evaluate_run(toy_run, "knn", FAST), evaluate_run(toy_run, "linear", LINEAR)
    run_in_processes(_evaluate_in_a_process_group, 2, str(two), [("knn", FAST), ("linear", LINEAR)])
    two_knn, two_linear = (json.loads(RunDir(two).eval_result(p).read_text()) for p in ("knn", "linear"))
    assert two_knn["world_size"] == 2
    for split in ("train", "test"):  # 4 and 2 batches of 16, split between the processes
        (a,), (b,) = cached(toy_run, split), cached(two, split)
        assert a.name == b.name
        a, b = load_file(str(a)), load_file(str(b))
        assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["features"], b["features"], atol=1e-6)
    assert two_knn["top1_by_k"] == one_knn["top1_by_k"]
    for key in ("top1", "val_top1", "chosen"):
        assert two_linear[key] == one_linear[key], key


def _cli(*args, timeout=300):
    """`python -m sslrun.evaluate ARGS`, forked from the warm test process server."""
    return run_cli(*map(str, args), script=str(REPO / "sslrun" / "evaluate" / "__main__.py"), check=False,
                   timeout=timeout)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, toy_run):
    failed = tmp_path / "failed"
    shutil.copytree(toy_run, failed)
    RunDir(failed).backbone.unlink()
    RunDir(failed).summary.write_text(json.dumps({"status": "diverged", "reason": "non-finite loss at step 7"}))
    running = tmp_path / "running"
    shutil.copytree(toy_run / ".hydra", running / ".hydra")
    cases = {
        "no such directory": _cli(tmp_path / "nowhere"),
        "no backbone.safetensors and no summary.json: the run is still going or was killed": _cli(running),
        "protocol.kk: unknown key; did you mean 'k'?": _cli(toy_run, "protocol.kk=20"),
        "the run ended with status diverged (non-finite loss at step 7)": _cli(failed),
        "protocol=lineer: no such protocol; did you mean 'linear'? choose one of: finetune, knn, linear, stats":
            _cli(toy_run, "protocol=lineer"),
        "give the backbone it was trained as": _cli(tmp_path / "out", f"weights={RunDir(toy_run).backbone}"),
    }
    for expected, result in cases.items():
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("sslrun: error: ") and expected in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_baseline_names_the_closest_and_all():
    from sslrun.config import ConfigError
    from sslrun.evaluate.config import compose_app

    with pytest.raises(ConfigError, match=r"^protocol.baselines=pixel: did you mean 'pixels'\? choose one of: "
                                          r"pixels, random_init$"):
        compose_app(["protocol.baselines=[random_init,pixel]"], run_dir="RUN_DIR")


def test_an_unknown_data_set_for_a_run_names_the_closest_and_all(toy_run):
    from sslrun.evaluate.config import compose_app, source_config

    with pytest.raises(ConfigError, match=r"^data.name=imagefoldr: unknown data set; did you mean 'imagefolder'\? "
                                          r"choose one of: .*fashion_mnist"):
        source_config(compose_app([], run_dir=toy_run), ["data.name=imagefoldr"])


def test_cli_evaluates_a_run_and_leaves_its_training_files_alone(toy_run):
    config = RunDir(toy_run).config.read_text()
    process = _cli(toy_run, "protocol=knn", "protocol.k=[1,5]", "protocol.report_k=5", *FAST)
    assert process.returncode == 0, process.stderr
    result = json.loads(RunDir(toy_run).eval_result("knn").read_text())
    assert list(result["top1_by_k"]) == ["1", "5"] and result["top1"] == result["top1_by_k"]["5"]
    assert (RunDir(toy_run).eval_dir / "evaluate.log").is_file() and RunDir(toy_run).config.read_text() == config


@pytest.mark.slow
def test_cli_with_two_devices_gives_the_numbers_of_one(toy_run):
    two = toy_run.parent / "two"
    shutil.copytree(toy_run, two)
    for run_dir, devices in ((toy_run, 1), (two, 2)):
        process = _cli(run_dir, "protocol=knn", f"devices={devices}", "accelerator=cpu", *FAST)
        assert process.returncode == 0, process.stderr
    one, two = (json.loads(RunDir(r).eval_result("knn").read_text()) for r in (toy_run, two))
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["top1_by_k"] == one["top1_by_k"]


def test_the_protocol_configs_ship_with_the_package():
    import fnmatch
    import tomllib

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sslrun"]
    files = [str(p.relative_to(REPO / "sslrun")) for p in (REPO / "sslrun" / "conf_evaluate").rglob("*.yaml")]
    assert len(files) == 5 and all(any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)
                                   for f in files)


def test_report_shows_the_offline_numbers(toy_run):
    from sslrun.report import report

    evaluate_run(toy_run, "knn", FAST)
    evaluate_run(toy_run, "stats", [*FAST, "protocol.pairs=12"])
    knn, stats = (json.loads(RunDir(toy_run).eval_result(p).read_text()) for p in ("knn", "stats"))
    markdown = report([toy_run], toy_run.parent / "report")
    header, _, row = markdown.split("\n")[2:5]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert float(cells["offline_knn_top1"]) == pytest.approx(knn["top1"], abs=1e-4)
    assert float(cells["rankme"]) == pytest.approx(stats["rankme"], rel=1e-3)
    assert "offline_linear_top1" not in cells  # no linear.json: no column


def test_the_random_init_baseline_is_the_same_fine_tuning_from_the_seeded_untrained_backbone(tmp_path, toy_data):
    """Weights saved from the evaluation's seeded random init (seed 0) fine-tune, with nothing else
    random (no stochastic depth), to exactly the baseline's numbers and weights."""
    from safetensors.torch import load_file, save_file

    from sslrun.config import compose
    from sslrun.models.backbones import build_backbone

    overrides = [o for o in toy_training_overrides(toy_data) if not o.startswith("backbone")]
    vit = ["backbone=vit_tiny_p4", "backbone.timm_kwargs.depth=2", "backbone.timm_kwargs.patch_size=8"]
    cfg = compose([*overrides, *vit], method_schema=False)
    torch.manual_seed(0)
    weights = tmp_path / "init.safetensors"
    save_file(build_backbone(cfg.backbone, in_chans=1).state_dict(), str(weights))
    out = tmp_path / "out"
    result = evaluate_run(out, "finetune", [*FAST, f"weights={weights}", *overrides, *vit, "protocol.max_steps=3",
                                            "protocol.batch_size=16", "protocol.drop_path_rate=0.0",
                                            "protocol.baselines=[random_init]"])
    assert result["top1_random_init"] == result["top1"]
    assert result["train_loss_random_init"] == result["train_loss"]
    trained, baseline = (load_file(str(RunDir(out).eval_dir / name))
                         for name in ("finetune.safetensors", "finetune_random_init.safetensors"))
    assert all(torch.equal(trained[k], baseline[k]) for k in trained)
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], load_file(str(weights))["blocks.0.attn.qkv.weight"])
