"""What a model or adapter folder may decide: never remote code, never silently the base model."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from PIL import Image

from pg_tune.cli import main
from pg_tune.config.recipe import parse_recipe
from pg_tune.config.schema import ConfigError
from pg_tune.models.source import adapter_base, require_safetensors
from tests.families import family_of

PLANTED = "planted_code"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A model folder shipping custom code (auto_map everywhere) and an adapter that points at it,
    with a recipe.yaml asking for trust_remote_code, as a hostile shared adapter would."""
    from pg_tune.config.recipe import LoraConfig
    from pg_tune.models.paligemma.tiny import build_base, save_checkpoint
    from pg_tune.train.adapters import apply_lora

    root = tmp_path_factory.mktemp("planted")
    marker = root / "IMPORTED"
    model_dir = save_checkpoint("tiny-paligemma2", root / "custom-model")
    (model_dir / f"{PLANTED}.py").write_text(
        f"open({str(marker)!r}, 'w').write('the planted module ran')\n"
        "from transformers import PaliGemmaConfig as Config, PaliGemmaForConditionalGeneration as Model\n"
        "from transformers import PaliGemmaProcessor as Processor\n"
    )
    auto_map = {
        "AutoConfig": f"{PLANTED}.Config",
        "AutoModel": f"{PLANTED}.Model",
        "AutoModelForImageTextToText": f"{PLANTED}.Model",
        "AutoProcessor": f"{PLANTED}.Processor",
    }
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file():
            path.write_text(json.dumps({**json.loads(path.read_text()), "auto_map": auto_map}))
    adapter = root / "adapter"
    apply_lora(
        build_base("tiny-paligemma2"),
        LoraConfig(r=2, alpha=4),
        str(model_dir),
        family_of(build_base("tiny-paligemma2")),
    ).save_pretrained(adapter)
    hostile = {"output_dir": str(root / "run"), "model": {"name_or_path": str(model_dir), "trust_remote_code": True},
               "data": {"train": [{"format": "shapes", "num_samples": 2}]}}  # fmt: skip
    (adapter / "recipe.yaml").write_text(yaml.safe_dump(hostile))
    image = root / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    return root, model_dir, adapter, marker, image


def _planted_imported(marker) -> bool:
    return marker.exists() or any(PLANTED in name for name in sys.modules)


def test_adapter_folder_cannot_switch_on_remote_code(planted, capsys):
    root, model_dir, adapter, marker, image = planted
    code = main(["predict", "--model", str(adapter), "--image", str(image), "--prompt", "caption en",
                 "--max-new-tokens", "2"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0
    # Loaded as plain PaliGemma: the recipe.yaml travelling with the adapter switched nothing on ...
    assert not _planted_imported(marker)
    # ... and the base is the one adapter_config.json names, and the command says so.
    assert f"loading base {model_dir} (from {adapter / 'adapter_config.json'})" in err
    assert json.loads(out[out.index("\n{\n") + 1 :])["model"] == f"adapter {adapter} on base {model_dir}"


def test_recipe_cannot_switch_on_remote_code(planted, tmp_path, capsys):
    root, model_dir, adapter, marker, image = planted
    with pytest.raises(
        ConfigError,
        match=r"model.trust_remote_code: a recipe cannot switch on remote code.*--trust-remote-code",
    ):
        parse_recipe(yaml.safe_load((adapter / "recipe.yaml").read_text()))
    assert main(["validate", str(adapter / "recipe.yaml")]) == 2
    assert "pass --trust-remote-code on the command line" in capsys.readouterr().err
    # Old recipes that spell out the default still load.
    assert parse_recipe({"output_dir": "x", "model": {"trust_remote_code": False},
                         "data": {"train": [{"format": "shapes"}]}}).model.trust_remote_code is False  # fmt: skip
    assert not _planted_imported(marker)


def test_adapter_base_mismatch_is_refused(planted, tmp_path, capsys):
    root, model_dir, adapter, marker, image = planted
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "model": {"name_or_path": "tiny-paligemma2"},
                                      "data": {"train": [{"format": "shapes", "num_samples": 2}],
                                               "eval": [{"format": "shapes", "num_samples": 2}]}}))  # fmt: skip
    assert main(["eval", str(recipe), "--model", str(adapter), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert f"{adapter} was trained on base {str(model_dir)!r}" in err
    assert "the recipe's model.name_or_path names 'tiny-paligemma2'" in err
    assert f"model.name_or_path={model_dir}" in err
    code = main(["predict", "--model", str(adapter), "--base", "tiny-paligemma", "--image", str(image),
                 "--prompt", "caption en"])  # fmt: skip
    assert code == 2 and "but --base names 'tiny-paligemma'" in capsys.readouterr().err
    assert not (tmp_path / "ev" / "metrics.json").exists()
    # A matching --base, or the same folder by another path, is accepted.
    assert adapter_base(adapter, str(model_dir / ".." / model_dir.name), "--base") == str(model_dir)
    assert not _planted_imported(marker)


def test_adapter_without_base_name_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": None})
    )
    with pytest.raises(ConfigError, match="base_model_name_or_path is missing"):
        adapter_base(tmp_path)


def test_pickle_only_model_folder_is_refused_with_a_conversion_hint(tmp_path, capsys):
    folder = tmp_path / "old-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ConfigError, match=r"has only pickled weights \(pytorch_model.bin\); pg_tune loads "
                       r"safetensors only.*save_pretrained"):  # fmt: skip
        require_safetensors(str(folder))
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["predict", "--model", str(folder), "--image", str(image), "--prompt", "caption en"]) == 2
    err = capsys.readouterr().err
    assert "pg-tune: error:" in err and "use_safetensors=False" in err and "Traceback" not in err
    (folder / "model.safetensors").write_bytes(b"")
    require_safetensors(str(folder))  # safetensors present: loading goes ahead


def test_unloadable_model_is_one_line(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "empty").mkdir()
    for ref, message in ((tmp_path / "nope", "no such folder"), (tmp_path / "empty", "model.safetensors")):
        assert main(["predict", "--model", str(ref), "--image", str(image), "--prompt", "caption en"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pg-tune: error:") and message in err and err.count("\n") == 1
