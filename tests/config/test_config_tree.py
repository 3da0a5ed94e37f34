"""The config tree stays small: no alias files, no copies, one YAML per method (plus at most one
tuning file per recipe), and it composes exactly the configs the tree of 133 files composed."""

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sslrun.config import CONF_DIR

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "composed_configs.json"
# Shared presets (every group but method/ and tuning/, which grow by one YAML and its tuning files per
# method): 133 files in all before the tree named presets by what they are (issue 15), 77 after.
MAX_SHARED_FILES = 50

# Two methods' own values that happen to agree (each is tuned for its method; changing one must not
# change the other). MoCo v3 at CPU scale was measured at other momenta and temperatures
# (2026-12-01: kNN 0.759 at 0.99 / T 1.0, 0.753 at momentum 0.9, 0.763 at T 0.2 with a worse probe):
# BYOL's widths and nothing else. One method cannot take another's values at one recipe only:
# an interpolated `override /tuning_of:` resolves after the tuning lookup (Hydra defers it).
SAME_VALUES = {
    frozenset({"tuning/quick_byol.yaml", "tuning/quick_mocov3.yaml"}): "BYOL's and MoCo v3's 1024-wide MLPs",
    frozenset({"tuning/quick_barlow_twins.yaml", "tuning/quick_vicreg.yaml"}):
        "Barlow Twins' and VICReg's 2048-wide projectors (both papers: 8192)",
}
# method/recipe -> {dotted key: reason}: what the composed configs may differ in from the fixture
# (tests/fixtures/composed_configs.json, written from the tree before the change).
INTENDED_DIFFERENCES = {
    "barlow_twins/imagenet": {"scheduler.final_lr_ratio": "the paper's cosine ends at lr / 1000 (sec. 4), not 0"},
    "vicreg/imagenet": {"scheduler.final_lr_ratio": "the paper's cosine ends at lr 0.002 (appendix C), not 0"},
    **{f"{method}/{recipe}": {"method.gram": "issue 18: DINOv3's Gram anchoring, off (weight 0) unless asked for"}
       for method in ("dinov2", "dinov2_distill") for recipe in ("quick", "imagenet", "none")},
}

# Keys added to every config since the fixture was written, with the issue that added them.
ADDED_KEYS = {
    "trainer.nonfinite": "issue 16: stop or skip at a non-finite loss or gradient norm",
    "trainer.max_skipped_steps": "issue 16: how many updates trainer.nonfinite=skip may drop",
    "trainer.compile": "issue 19: regional torch.compile, off unless asked for",
    "trainer.tf32": "issue 19: TF32 matmuls on CUDA",
    "trainer.channels_last": "issue 19: channels-last CNNs on CUDA",
    "data.decode": "issue 19: image folders' JPEGs decoded on the CPU workers or on the training device",
}


def yaml_files():
    return sorted(p for p in CONF_DIR.rglob("*.yaml"))


def content(path: Path) -> str:
    """The file without comments, package headers or blank lines."""
    lines = [re.sub(r"\s+#.*$", "", line).rstrip() for line in path.read_text().splitlines()]
    return "\n".join(line for line in lines if line.strip() and not line.lstrip().startswith("#"))


def test_the_shared_presets_stay_at_most_50_files():
    shared = [p for p in yaml_files() if p.relative_to(CONF_DIR).parts[0] not in ("method", "tuning")]
    assert len(shared) <= MAX_SHARED_FILES, len(shared)


def test_no_file_only_includes_another():
    for path in yaml_files():
        data = OmegaConf.load(path)
        assert set(data) != {"defaults"}, (f"{path.relative_to(CONF_DIR)} only includes {list(data.defaults)}: "
                                           f"name the preset where it is used instead")


def test_no_two_files_hold_the_same_content():
    seen = {}
    for path in yaml_files():
        text = content(path)
        if text in seen:
            pair = frozenset({str(p.relative_to(CONF_DIR)) for p in (path, seen[text])})
            assert pair in SAME_VALUES, f"{path.relative_to(CONF_DIR)} repeats {seen[text].relative_to(CONF_DIR)}"
        seen[text] = path


def test_a_method_is_one_yaml_and_its_tuning_files():
    """No preset is named after a method: a method's YAML names the presets it uses."""
    methods = {p.stem for p in (CONF_DIR / "method").glob("*.yaml")}
    recipes = {p.stem for p in (CONF_DIR / "recipe").glob("*.yaml")}
    for group in ("backbone", "augmentation", "optimizer", "data", "scheduler", "trainer", "logger"):
        named = {p.stem for p in (CONF_DIR / group).glob("*.yaml")} & methods
        assert not named, f"conf/{group} has files named after methods: {sorted(named)}"
    for path in (CONF_DIR / "tuning").glob("*.yaml"):
        recipe, _, method = path.stem.partition("_")
        assert recipe in recipes and method in methods, path.name


def composed(method: str, recipe: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"method={method}", f"recipe={recipe}"])
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return container


def differences(before, after, path=""):
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after)):
            yield from differences(before.get(key, "<absent>"), after.get(key, "<absent>"),
                                   f"{path}.{key}" if path else key)
    elif before != after:
        yield path, before, after


SNAPSHOT = json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("case", sorted(SNAPSHOT))
def test_every_method_and_recipe_composes_what_the_old_tree_composed(case):
    method, recipe = case.split("/")
    intended = INTENDED_DIFFERENCES.get(case, {})
    found = {key: (before, after) for key, before, after in differences(SNAPSHOT[case], composed(method, recipe))}
    added = {key for key, (before, _) in found.items() if key in ADDED_KEYS and before == "<absent>"}
    assert added == set(ADDED_KEYS), f"{case}: keys listed as added but not new: {set(ADDED_KEYS) - added}"
    unexpected = {key: change for key, change in found.items() if key not in intended and key not in added}
    assert not unexpected, f"{case}: {unexpected}"
    assert set(intended) <= set(found), f"{case}: listed as intended but unchanged: {set(intended) - set(found)}"


def test_the_fixture_covers_every_older_method_and_newer_ones_compose_at_every_recipe():
    """The fixture holds every method option of the tree it was written from, at every recipe;
    methods added since (they have no old composition to match) compose at every recipe."""
    methods = {p.stem for p in (CONF_DIR / "method").glob("*.yaml")}
    recipes = {p.stem for p in (CONF_DIR / "recipe").glob("*.yaml")}
    older = {case.split("/")[0] for case in SNAPSHOT}
    assert older <= methods, f"method options gone since the fixture: {older - methods}"
    assert set(SNAPSHOT) == {f"{m}/{r}" for m in older for r in recipes}
    for method in sorted(methods - older):
        for recipe in sorted(recipes):
            assert composed(method, recipe)["method"]["name"], (method, recipe)


def test_quick_presets_follow_the_image_size():
    """The quick recipe's ViTs keep a fixed grid of patches and its local crops half the image, so a
    user's 224 px data trains as fast as 28 px (4 x 4 = 16 tokens a crop, not 32 x 32 = 1,024)."""
    from sslrun.config import compose as validated

    for size, patch in ((28, 7), (32, 8), (96, 24), (224, 56)):
        cfg = validated(["method=dino", f"data.image_size={size}"])
        assert cfg.backbone.timm_kwargs.patch_size == patch
        assert [v.size for v in cfg.augmentation.views] == [size, size, size // 2]
    clip = validated(["method=clip", "data=csv", "data.train_file=/pairs.csv"])  # 224 px images
    assert clip.data.image_size // clip.backbone.timm_kwargs.patch_size == 4
    mocov3 = validated(["method=mocov3_vit", "data.image_size=224"])
    assert mocov3.data.image_size // mocov3.backbone.timm_kwargs.patch_size == 7
