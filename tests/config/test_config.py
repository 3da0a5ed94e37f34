"""Every config option composes and validates; bad configs fail early with one clear line."""

import pytest

from hydra import compose, initialize_config_dir

from sslrun.__main__ import check_overrides
from sslrun.config import CONF_DIR, GROUPS, ConfigError, validate
from sslrun.run_dir import RunDir
from sslrun.train import global_batch_size, resume_path, scaled_lr
from tests.conftest import run_cli, write_finished_run


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def teacher_for(method: str, directory, *overrides) -> list:
    """The override naming a teacher run for `method=dinov2_distill` (a dinov2 run's config composed
    with the same overrides, and a checkpoint file); nothing for other methods."""
    if method != "dinov2_distill":
        return []
    write_finished_run(directory, compose_cfg("method=dinov2", *overrides))
    return [f"method.teacher_run={directory}"]


def all_options():
    for group in sorted(set(GROUPS) - {"tuning"}):  # tuning files go with their method: tested below
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            yield group, path.stem


def test_groups_are_the_documented_ones():
    assert set(GROUPS) == {"method", "backbone", "data", "augmentation", "optimizer", "scheduler",
                           "trainer", "logger", "recipe", "tuning"}


VARIANTS = {"mocov3_vit": "mocov3", "dinov2_gram": "dinov2", "swav_vit": "swav"}  # method options that configure another method


@pytest.mark.parametrize("group,option", list(all_options()))
def test_every_option_composes_and_validates(group, option, tmp_path):
    # 224 px: ViT backbones with 16 px patches refuse 28 px crops (tested below).
    overrides = ["data.root=/some/where", "data.image_size=224", *REQUIRED.get(option if group == "data" else "", []),
                 *(method_taking(CONF_DIR / group / f"{option}.yaml") if group == "augmentation" else [])]
    teacher = teacher_for(option if group == "method" else "", tmp_path, *overrides)
    cfg = validate(compose_cfg(f"{group}={option}", *overrides, *teacher))
    if group in ("method", "data", "scheduler", "trainer", "logger"):  # option file = name
        assert cfg[group].name == VARIANTS.get(option, option)


def method_taking(views_file) -> list:
    """A method that takes the views this augmentation option makes (one: CLIP; two: SimCLR, the
    default; more: DINO's multi-crop, on a ViT whose 2 px patches fit every crop size)."""
    from omegaconf import OmegaConf

    views = sum(view.count for view in OmegaConf.load(views_file).views)
    multicrop = ["method=dino", "backbone=vit_small", "backbone.timm_kwargs.patch_size=2"]
    return {1: ["method=clip"], 2: []}.get(views, multicrop)


REQUIRED = {"csv": ["data.train_file=/pairs.csv"],  # data options whose files have no default
            "webdataset": ["data.train_shards='/shards/{0..9}.tar'", "data.train_samples=1000"]}


def test_default_config_is_complete_and_typed():
    cfg = validate(compose_cfg())
    assert isinstance(cfg.optimizer.base_lr, float)
    assert cfg.augmentation.views[0].size == cfg.data.image_size  # interpolated


def error_for(*overrides) -> str:
    problem = check_overrides(list(overrides))
    assert problem is not None, f"{overrides} should be rejected"
    assert "\n" not in problem
    return problem


def test_unknown_group_option_suggests_the_closest_and_lists_the_choices():
    message = error_for("method=simclrr")
    assert message.startswith("method=simclrr: no such method; did you mean 'simclr'? choose one of: ")
    assert {"simclr", "dino", "mae"} <= set(message.split("choose one of: ")[1].split(", "))
    assert error_for("backbone=xyz").startswith("backbone=xyz: no such backbone; choose one of: resnet18, ")  # none close


def test_misspelled_key_names_the_key_and_the_valid_ones():
    message = error_for("optimizer.base_lrr=0.1")
    assert message.startswith("optimizer.base_lrr: unknown key")
    assert "did you mean 'base_lr'" in message and "momentum" in message


PRECISIONS = ["32-true", "bf16-mixed", "16-mixed", "bf16-true"]


@pytest.mark.parametrize("word, choices, hint", [
    ("momentun", ["name", "momentum", "base_lr"], "momentum"),  # a typo
    ("kk", ["name", "k", "report_k"], "k"),
    ("sinkhorn", ["sinkhorn_knopp", "center"], "sinkhorn_knopp"),  # the one choice it begins
    ("temp", ["name", "temperature"], "temperature"),
    ("bf16", PRECISIONS, None),  # begins two: either could be meant
    ("moco", ["mocov2", "mocov3", "mocov3_vit"], None),
    ("gpu", ["cpu", "device"], None),  # one letter from cpu, but not a typo of it
    ("lr", ["base_lr", "lr_scaling"], None),  # too short to stand for lr_scaling
    ("16", PRECISIONS, None),
])
def test_a_hint_only_where_one_choice_is_meant(word, choices, hint):
    from sslrun.config.errors import did_you_mean

    assert did_you_mean(word, choices) == (f"did you mean '{hint}'? " if hint else "")


def test_a_value_outside_its_choices_names_the_closest_and_all():
    assert error_for("trainer.nonfinite=skp") == "trainer.nonfinite=skp: did you mean 'skip'? choose one of: stop, skip"
    assert error_for("trainer.precision=bf16") == f"trainer.precision=bf16: choose one of: {', '.join(PRECISIONS)}"


def test_key_valid_for_another_option_is_rejected():
    message = error_for("optimizer=adamw", "optimizer.trust_coefficient=0.01")
    assert "optimizer.trust_coefficient" in message and "optimizer (adamw)" in message and "betas" in message


def test_wrong_type_names_the_key():
    message = error_for("optimizer.base_lr=fast")
    assert message.startswith("optimizer.base_lr") and "fast" in message


def test_batch_that_does_not_divide_by_processes():
    message = error_for("trainer=ddp", "trainer.devices=3", "data.batch_size=256")
    assert "data.batch_size=256" in message and "3 processes" in message and "255" in message


def test_logging_every_zero_steps_is_refused():
    # Lightning writes nothing at 0 while the monitors would measure every step: one meaning, refused early
    assert error_for("trainer.log_every_n_steps=0") == "trainer.log_every_n_steps=0: must be at least 1 (1: every step)"


@pytest.mark.parametrize("override, message", [
    # each one Lightning would reject only once the run had started, or (clipping) silently ignore
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1.0: must be positive (the largest gradient norm), "
                                     "or null for no clipping"),
    ("trainer.keep_checkpoints=-2", "trainer.keep_checkpoints=-2: must be -1 (all), 0 (last.ckpt only) or more"),
    ("trainer.max_epochs=-3", "trainer.max_epochs=-3: must be -1 (no limit) or at least 0"),
    ("seed=-1", "seed=-1: must lie in [0, 2^32): numpy's seeds do"),
])
def test_values_lightning_would_refuse_late_are_refused_early(override, message):
    assert error_for(override, "trainer.max_steps=10") == message


def test_several_devices_need_ddp():
    assert "trainer=ddp or trainer=fsdp" in error_for("trainer.devices=2")


def test_fsdp_options_are_checked():
    assert "trainer.fsdp.param_dtype=fp8: choose null (fp32) or one of: bf16, fp16" in error_for(
        "trainer=fsdp", "trainer.fsdp.param_dtype=fp8")
    assert check_overrides(["trainer=fsdp", "trainer.fsdp.param_dtype=bf16",
                            "trainer.fsdp.activation_checkpointing=true", "trainer.devices=1"]) is None


def test_compile_options_are_checked():
    assert error_for("trainer.compile.mode=fast").startswith(
        "trainer.compile.mode=fast: choose one of: default, reduce-overhead, max-autotune")
    message = error_for("trainer.compile.enabled=true", "trainer.compile.backend=inductr")
    assert message.startswith("trainer.compile.backend=inductr: not a torch.compile backend here; "
                              "did you mean 'inductor'? choose one of: ") and "aot_eager" in message
    assert check_overrides(["trainer.compile.enabled=true", "trainer.compile.backend=aot_eager"]) is None


def test_timm_arguments_sslrun_sets_are_refused_with_the_key_to_use():
    assert error_for("+backbone.timm_kwargs.drop_path_rate=0.1") == \
        "backbone.timm_kwargs.drop_path_rate: set backbone.drop_path_rate instead"
    assert error_for("+backbone.timm_kwargs.in_chans=3").startswith("backbone.timm_kwargs.in_chans: set by data.channels")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_resumes_only_under_fsdp(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    run = RunDir(tmp_path)
    sharded = run.last_checkpoint
    dcp.save({"w": torch.zeros(1)}, checkpoint_id=sharded, no_dist=True)  # shards and .metadata
    torch.save({}, sharded / "meta.pt")
    assert resume_path(compose_cfg("trainer=fsdp"), run) == str(sharded)
    with pytest.raises(ConfigError, match="is a sharded checkpoint .* resume it with trainer=fsdp"):
        resume_path(compose_cfg("trainer=ddp"), run)
    named = validate(compose_cfg("trainer=fsdp", f"resume={sharded}"))  # a directory is a checkpoint too
    assert resume_path(named, run) == str(sharded)
    (sharded / "meta.pt").unlink()  # a save that died before its last file: not a checkpoint
    assert resume_path(compose_cfg("trainer=fsdp"), run) is None
    with pytest.raises(ConfigError, match=r"resume=.*last.ckpt: not a complete checkpoint .* use resume=auto"):
        resume_path(named, run)


def test_checkpoint_names_hold_no_equals_sign_and_old_names_still_resume(tmp_path):
    import torch

    run = RunDir(tmp_path)
    run.checkpoints.mkdir()
    assert run.step_checkpoint(6).name == "step_000006.ckpt"
    for name in ("step=6.ckpt", "step_000012.ckpt", "step=40.ckpt"):  # runs from before the rename keep resuming
        torch.save({}, run.checkpoints / name)
    assert [p.name for p in run.step_checkpoints()] == ["step=40.ckpt", "step_000012.ckpt", "step=6.ckpt"]
    assert resume_path(compose_cfg(), run) == str(run.checkpoints / "step=40.ckpt")
    # Hydra's grammar takes the new name unquoted on the command line.
    assert validate(compose_cfg(f"resume={run.checkpoints / 'step_000012.ckpt'}")).resume.endswith("step_000012.ckpt")
    assert "resume=/nowhere/step_000001.ckpt: no such checkpoint" in error_for("resume=/nowhere/step_000001.ckpt")


def test_a_truncated_or_corrupt_checkpoint_is_skipped_by_auto_and_one_line_when_named(tmp_path):
    import torch

    run = RunDir(tmp_path)
    run.checkpoints.mkdir()
    for path in (run.step_checkpoint(6), run.step_checkpoint(12), run.last_checkpoint):
        torch.save({"weights": torch.ones(1000), "global_step": 12}, path)
    whole = run.last_checkpoint.read_bytes()
    run.last_checkpoint.write_bytes(whole[: len(whole) // 2])  # a copy cut short
    corrupt = bytearray(whole)
    corrupt[60:80] = b"\xff" * 20  # inside the pickle, the zip's directory intact
    run.step_checkpoint(12).write_bytes(bytes(corrupt))
    assert resume_path(compose_cfg(), run) == str(run.step_checkpoint(6))  # the newest intact one
    for damaged in (run.last_checkpoint, run.step_checkpoint(12)):
        with pytest.raises(ConfigError, match=rf"^resume={damaged}: not a complete checkpoint .* use resume=auto"):
            resume_path(validate(compose_cfg(f"resume={damaged}")), run)


def test_an_unset_environment_variable_is_one_line(monkeypatch):
    monkeypatch.delenv("SSLRUN_UNSET_TOKEN", raising=False)
    assert check_overrides(["logger=wandb", "logger.tags=[${oc.env:SSLRUN_UNSET_TOKEN}]"]) == (
        "logger.tags[0]: KeyError raised while resolving interpolation: \"Environment variable "
        "'SSLRUN_UNSET_TOKEN' not found\"")


def test_missing_required_value():
    assert error_for("data=imagefolder").startswith("data.root: no value given")


def test_probability_out_of_range():
    assert "augmentation.views.0.blur_p" in error_for("augmentation.views.0.blur_p=1.5")


def test_unknown_method_name_in_a_user_file():
    cfg = compose_cfg("++method.name=dino2")
    with pytest.raises(ConfigError,
                       match="method.name: unknown method 'dino2'; did you mean 'dinov2'\\? choose one of: .*simclr"):
        validate(cfg)


def test_valid_overrides_pass():
    assert check_overrides(["method=simclr", "backbone=resnet50", "trainer=ddp", "trainer.devices=2",
                            "optimizer=lars", "backbone.timm_kwargs={channels:[8,16,32,64]}"]) is None


def test_recipes_set_a_whole_run_and_groups_still_swap():
    quick = validate(compose_cfg())
    assert quick.backbone.timm_kwargs.channels == [32, 64, 128, 256] and quick.trainer.max_epochs == 1
    assert validate(compose_cfg("backbone=resnet50")).backbone.timm_kwargs == {}
    paper = validate(compose_cfg("recipe=imagenet", "data.root=/imagenet"))
    assert (paper.backbone.name, paper.data.name, paper.data.batch_size) == ("resnet50", "imagefolder", 4096)
    assert scaled_lr(paper) == pytest.approx(4.8) and paper.trainer.name == "ddp"  # SimCLR: 0.3 x 4096 / 256
    mocov2 = validate(compose_cfg("recipe=imagenet", "method=mocov2", "data.root=/imagenet"))
    assert (mocov2.data.batch_size, mocov2.trainer.max_epochs, mocov2.scheduler.warmup_epochs) == (256, 200, 0)
    assert scaled_lr(mocov2) == pytest.approx(0.03) and not mocov2.trainer.sync_batchnorm
    plain = validate(compose_cfg("recipe=none"))
    assert plain.trainer.max_epochs == 100 and plain.backbone.timm_kwargs == {}


METHOD_OPTIONS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml")))
@pytest.mark.parametrize("method", METHOD_OPTIONS)
def test_every_method_composes_with_every_recipe(recipe, method, tmp_path):
    extra = [f"recipe={recipe}", "data.root=/data"] + (["data.image_size=224"] if recipe == "none" else [])
    # (the papers' ViTs refuse 28 px crops)
    cfg = validate(compose_cfg(f"method={method}", *extra, *teacher_for(method, tmp_path, *extra)))
    assert cfg.method.name == VARIANTS.get(method, method)


def test_tuning_files_name_an_existing_recipe_and_method():
    recipes = {p.stem for p in (CONF_DIR / "recipe").glob("*.yaml")}
    for path in (CONF_DIR / "tuning").glob("*.yaml"):
        recipe, _, method = path.stem.partition("_")
        assert recipe in recipes and method in METHOD_OPTIONS, path.name


def test_method_picks_its_own_augmentation_and_optimizer_unless_told_otherwise():
    cfg = validate(compose_cfg())
    assert cfg.optimizer.name == "lars" and (cfg.optimizer.lr_scaling, cfg.optimizer.base_lr) == ("sqrt", 0.075)
    assert cfg.augmentation.views[0].blur_p == 0.0  # the quick recipe's small-image views
    assert validate(compose_cfg("recipe=none")).augmentation.views[0].blur_p == 0.5  # the paper's
    swapped = validate(compose_cfg("optimizer=adamw"))  # the optimizer swaps, the method's lr rule stays
    assert swapped.optimizer.name == "adamw" and swapped.optimizer.base_lr == 0.075 and swapped.optimizer.betas
    assert validate(compose_cfg("augmentation=byol_views", "backbone=resnet50")).augmentation.views[1].solarize_p == 0.2


def test_lr_scales_with_the_global_batch():
    cfg = validate(compose_cfg("data.batch_size=512", "optimizer.base_lr=0.3", "optimizer.lr_scaling=linear",
                              "trainer.accumulate_grad_batches=2"))
    assert global_batch_size(cfg) == 1024
    assert scaled_lr(cfg) == pytest.approx(0.3 * 1024 / 256)
    cfg = validate(compose_cfg("data.batch_size=400", "optimizer.lr_scaling=sqrt", "optimizer.base_lr=0.075"))
    assert scaled_lr(cfg) == pytest.approx(0.075 * 20)


def test_cli_error_is_one_line_exit_2_and_fast(tmp_path):
    result = run_cli("optimizer.momentun=0.9", cwd=tmp_path, check=False, timeout=60, fresh=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["sslrun: error: optimizer.momentun: unknown key; did you mean 'momentum'? valid keys in "
                     "optimizer (lars): name, base_lr, lr_scaling, weight_decay, final_weight_decay, exclude_bias_and_norm, "
                     "bias_and_norm_lr_scale, "
                     "probe_lr, momentum, trust_coefficient"]
    assert not list(tmp_path.iterdir()), "nothing may be written for a rejected config"


def test_a_misspelled_method_key_is_one_line_before_the_run_starts(tmp_path):
    """The method's schema comes with the methods (heavy imports), so the run checks it rather than the
    CLI's first second, after it started its other processes (they import meanwhile): still one line,
    exit 2, the other process stopped, nothing trained."""
    result = run_cli("method.temperatur=0.5", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                     f"hydra.run.dir={tmp_path / 'run'}", check=False, timeout=120)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "failed with exit code" not in output and "Traceback" not in output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith("method.temperatur: unknown key; did you mean 'temperature'? "
                                                   "valid keys in method (simclr): name, temperature, projector")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_cli("method=simclr", "trainer=ddp", "optimizer=sgd", "--cfg", "job", cwd=tmp_path, timeout=60, fresh=True)
    assert "name: ddp" in result.stdout and "name: sgd" in result.stdout and "temperature:" in result.stdout


def test_local_sweep_with_several_processes_is_refused(tmp_path):
    result = run_cli("-m", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "seed=1,2",
                     f"hydra.sweep.dir={tmp_path}", cwd=tmp_path, check=False, timeout=120, fresh=True)
    assert result.returncode == 2
    assert "cannot run in a local sweep" in result.stdout + result.stderr


def test_image_text_options_are_checked():
    assert validate(compose_cfg("method=clip")).method.text.context_length == 16  # the quick recipe's tower
    with pytest.raises(ConfigError, match=r"method.prompts: 'a photo' must hold the class name's place '\{\}'"):
        validate(compose_cfg("method=clip", "method.prompts=[a photo]"))
    with pytest.raises(ConfigError, match="method.micro_batches=3: must divide the 128 images per process"):
        validate(compose_cfg("method=siglip", "method.micro_batches=3"))
    with pytest.raises(ConfigError, match="method.text.width=100: must divide by method.text.heads=8"):
        validate(compose_cfg("method=clip", "method.text.width=100", "method.text.heads=8"))
    with pytest.raises(ConfigError, match="method.logit_scale_init=200.0: must lie in"):
        validate(compose_cfg("method=clip", "method.logit_scale_init=200"))
    with pytest.raises(ConfigError, match="trainer.accumulate_grad_batches=2: .* use method.micro_batches=2 instead"):
        validate(compose_cfg("method=clip", "trainer.accumulate_grad_batches=2"))
    with pytest.raises(ConfigError, match="data.train_file: no value given"):
        validate(compose_cfg("method=clip", "data=csv"))
