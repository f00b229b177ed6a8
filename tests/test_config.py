from pathlib import Path

import pytest
import yaml

from datadream.config import CONFIG_DIR, Config, load_config, parse_override
from datadream.errors import UserError


def test_paper_yaml_spells_out_the_defaults():
    # datadream/presets/paper.yaml documents every paper value with its source; it must not drift from the code.
    assert load_config("paper") == Config()
    assert yaml.safe_load((CONFIG_DIR / "paper.yaml").read_text()) == Config().to_dict()


def test_paper_values_follow_reference():
    c = Config()
    assert (c.models.sd, c.models.clip, c.models.clip_pretrained) == (
        "stabilityai/stable-diffusion-2-1-base", "ViT-B-16", "openai")
    assert (c.adapt.rank, c.adapt.alpha, c.adapt.lr, c.adapt.epochs, c.adapt.batch_size) == (16, 16, 1e-4, 200, 8)
    assert (c.generate.images_per_class, c.generate.guidance_scale, c.generate.steps) == (500, 2.0, 50)
    assert (c.classify.rank, c.classify.alpha, c.classify.dropout) == (16, 32, 0.1)


def test_every_field_has_a_description():
    for section in Config.model_fields:
        model = Config.model_fields[section].annotation
        for name, field in model.model_fields.items():
            assert field.description, f"{section}.{name} has no description"


def test_tiny_preset_and_layering(tmp_path: Path):
    f = tmp_path / "mine.yaml"
    f.write_text("adapt:\n  rank: 2\ngenerate:\n  steps: 3\n")
    c = load_config("tiny", [f], ["adapt.rank=6", "adapt.unet_targets=[to_q]"])
    assert c.models.sd == "tiny" and c.run.device == "cpu"
    assert c.adapt.rank == 6 and c.generate.steps == 3 and c.adapt.unet_targets == ["to_q"]


def test_prompt_template():
    c = load_config("paper", overrides=["data.domain=texture"])
    assert c.data.prompt("banded") == "a texture photo of a banded"
    assert Config().data.prompt("cat") == "a photo of a cat"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("adapt.rnak=3", "unknown config key 'adapt.rnak'"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("adapt.rank=abc", "config key 'adapt.rank'"),
        ("adapt.rank=0", "config key 'adapt.rank'"),
        ("adapt.mode=pixel", "config key 'adapt.mode'"),
        ("adapt=3", "config key 'adapt'"),
        ("novalue", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(UserError) as e:
        load_config("tiny", overrides=[override])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert override.split("=")[0] in msg


def test_bad_files_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapt:\n  rank: [1, 2\n")
    with pytest.raises(UserError, match=r"bad\.yaml: not valid YAML"):
        load_config("paper", [bad])
    typo = tmp_path / "typo.yaml"
    typo.write_text("generate:\n  image_per_class: 3\n")
    with pytest.raises(UserError, match=r"config file .*typo.yaml: unknown config key 'generate.image_per_class'"):
        load_config("paper", [typo])
    with pytest.raises(UserError, match="not found"):
        load_config("paper", [tmp_path / "missing.yaml"])
    with pytest.raises(UserError, match="unknown preset"):
        load_config("huge")


def test_parse_override_types():
    assert parse_override("a.b=1e-4") == {"a": {"b": "1e-4"}}  # YAML 1.1 reads it as text; pydantic coerces
    assert load_config("paper", overrides=["adapt.lr=1e-4"]).adapt.lr == 1e-4
    assert parse_override("a.b=null") == {"a": {"b": None}}


def test_inline_yaml_layer():
    c = load_config("tiny", overrides=["adapt.rank=3"], text="adapt:\n  rank: 2\n  epochs: 7\n")
    assert (c.adapt.rank, c.adapt.epochs) == (3, 7)  # --set comes after the inline text
    with pytest.raises(UserError, match=r"inline config: unknown config key 'adapt\.x'"):
        load_config("tiny", text="adapt:\n  x: 1\n")
    with pytest.raises(UserError, match=r"inline config: expected a mapping"):
        load_config("tiny", text="- a\n- b\n")


def test_presets_by_name_and_dataset_presets_layer_on_paper():
    from datadream import presets

    names = presets.names()
    assert names[:2] == ["paper", "tiny"] and "paper/flowers102" in names and len(names) == 12
    dtd = load_config("paper/dtd")
    assert (dtd.data.format, dtd.data.domain) == ("dtd", "texture")
    assert dtd.adapt == Config().adapt  # the rest is the paper preset
    with pytest.raises(UserError, match=r"--preset 'papr': unknown preset; expected one of paper, tiny, paper/"):
        load_config("papr")


def test_presets_ship_in_the_wheel(tmp_path):
    # An installed wheel (pip install, the container image) has the presets: they are package data.
    import shutil
    import subprocess
    import sys
    import zipfile

    root, src = Path(__file__).resolve().parent.parent, tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "datadream", "components", "pipelines"):  # setuptools writes build/
        copy = shutil.copytree if (root / name).is_dir() else shutil.copy
        copy(root / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree
                                           else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("datadream-*.whl"))
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("datadream/presets/")}
    in_tree = {f"datadream/presets/{p.relative_to(CONFIG_DIR).as_posix()}" for p in CONFIG_DIR.rglob("*.yaml")}
    assert in_tree and in_tree <= shipped
