"""The model-family interface: registry, layering, reserved tokens, one vae_path (issue 11, 17.8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pg_tune.config.recipe import parse_recipe
from pg_tune.config.schema import ConfigError
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.build import build_samples
from pg_tune.data.safe_collate import BAD_ROWS_KEY, SafeCollator
from pg_tune.data.sample import DataError, Sample
from pg_tune.models.family import ModelFamily, family_for, family_names, is_tiny_preset
from pg_tune.models.paligemma import PaliGemmaFamily
from pg_tune.models.paligemma.tiny import PRESETS, build_processor, save_checkpoint
from tests.families import family_of

PACKAGE = Path(__file__).resolve().parents[2] / "pg_tune"


def test_registry_resolves_presets_checkpoints_adapters_configs_and_hub_ids(tmp_path):
    assert family_names() == ["gemma3", "paligemma", "smolvlm"]
    for name in ("tiny-paligemma", "tiny-paligemma2", "bench-mini", "paligemma"):
        assert isinstance(family_for(name), PaliGemmaFamily)
    ckpt = save_checkpoint("tiny-paligemma", tmp_path / "ckpt")
    assert isinstance(family_for(str(ckpt)), PaliGemmaFamily)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(ckpt)}))
    assert isinstance(family_for(str(adapter)), PaliGemmaFamily)
    # A hub id with no network and nothing cached: the family's name hints.
    assert isinstance(family_for("google/paligemma2-3b-pt-224"), PaliGemmaFamily)
    assert is_tiny_preset("tiny-paligemma2") and not is_tiny_preset("google/paligemma2-3b-pt-224")
    with pytest.raises(ValueError, match="no model family.*_REGISTRY"):
        family_for("someone/unknown-model")


def test_every_abstract_method_is_implemented_and_documented():
    family = PaliGemmaFamily()
    assert not PaliGemmaFamily.__abstractmethods__
    for name in dir(ModelFamily):
        member = getattr(ModelFamily, name)
        if callable(member) and not name.startswith("_"):
            assert (member.__doc__ or "").strip(), f"ModelFamily.{name} has no docstring"
    assert family.keep_unquantized() == ["lm_head", "model.multi_modal_projector", "model.vision_tower"]


# --- reserved tokens (issue 17 item 8) ------------------------------------------------------------


@pytest.fixture
def jsonl_with_control_tokens(tmp_path):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "prefix": "caption en", "suffix": "a red square"},
        {"image": "a.png", "prefix": "caption en <image>", "suffix": "a red square"},
        {"image": "a.png", "prefix": "caption en", "suffix": "a red <eos> square"},
        {"image": "a.png", "prefix": "<bos>caption en", "suffix": "x"},
        {"image": "a.png", "prefix": "caption en", "suffix": "pad <pad>"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _entries(path):
    return parse_recipe({"output_dir": "unused", "data": {"train": [{"format": "jsonl", "path": str(path)}]}})


@pytest.mark.parametrize("token_line", [(2, "<image>"), (3, "<eos>"), (4, "<bos>"), (5, "<pad>")])
def test_control_tokens_stop_the_build_naming_the_row(jsonl_with_control_tokens, token_line):
    line, token = token_line
    path = jsonl_with_control_tokens
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[line - 1] + "\n")
    recipe = _entries(path)
    with pytest.raises(DataError, match=rf"data.jsonl:2: field '(prefix|suffix)' contains {token}"):
        build_samples(recipe.data.train, "train", BadRows("stop"), family=PaliGemmaFamily())


def test_control_tokens_are_skipped_and_counted(jsonl_with_control_tokens):
    recipe = _entries(jsonl_with_control_tokens)
    bad = BadRows("skip")
    samples = build_samples(recipe.data.train, "train", bad, family=PaliGemmaFamily())
    assert len(samples) == 1 and bad.counts == {"reserved_token": 4}


def test_lazily_read_rows_are_caught_by_the_collator(tmp_path):
    """Rows the build cannot see (lazy formats) fail in the collator, naming the row: skip/stop apply."""
    image = Image.new("RGB", (16, 16))
    collator = PaliGemmaFamily().collator(build_processor(PRESETS["tiny-paligemma"]), 32, train=True)
    rows = [(0, Sample(image, "caption en", "fine", "ds[0]")), (1, Sample(image, "<image>", "x", "ds[1]"))]
    with pytest.raises(DataError, match=r"ds\[1\]: field 'prefix' contains <image>"):
        SafeCollator(collator, "stop")(rows)
    batch = SafeCollator(collator, "skip")(rows)
    assert batch["input_ids"].shape[0] == 1
    assert [reason for reason, _ in batch[BAD_ROWS_KEY]] == ["reserved_token"]


def test_validate_reports_control_tokens(jsonl_with_control_tokens):
    from pg_tune.data.validate import validate_recipe

    recipe = parse_recipe(
        {
            "output_dir": "unused",
            "model": {"name_or_path": "tiny-paligemma"},
            "data": {"train": [{"format": "jsonl", "path": str(jsonl_with_control_tokens)}]},
        }
    )
    report = validate_recipe(recipe, family_of(recipe), build_processor(PRESETS["tiny-paligemma"]))
    assert report.bad_rows.counts["reserved_token"] == 4 and report.num_bad == 4
    assert any("data.jsonl:2" in e for e in report.bad_rows.examples["reserved_token"])


# --- one vae_path -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch",
    [
        {"eval": {"vae_path": "vae.npz"}},
        {"data": {"train": [{"format": "jsonl", "path": "x.jsonl", "vae_path": "vae.npz"}]}},
    ],
)
def test_old_vae_path_keys_point_to_model_vae_path(patch):
    with pytest.raises(ConfigError, match="moved to model.vae_path"):
        parse_recipe({"output_dir": "unused", **patch})


def test_in_training_evaluation_scores_masks_with_model_vae_path(monkeypatch, tmp_path):
    """The refcoco_seg recipes set vae_path on data entries only, so evaluation scored boxes only."""
    from pg_tune.evaluate import run
    from pg_tune.models.paligemma.masks import make_random_vae_weights, save_npz

    vae = save_npz(make_random_vae_weights(0), tmp_path / "vae.npz")
    samples_dir = PACKAGE.parent / "data_formats" / "samples" / "jsonl"
    recipe = parse_recipe(
        {
            "output_dir": "unused",
            "model": {"name_or_path": "tiny-paligemma", "vae_path": str(vae)},
            "data": {
                "train": [{"format": "jsonl", "path": str(samples_dir / "data.jsonl")}],
                "eval": [{"format": "jsonl", "path": str(samples_dir / "data.jsonl")}],
            },
        }
    )
    samples = [s for s in build_samples(recipe.data.eval, "eval", BadRows()) if s.task == "refer_segment"]
    family = PaliGemmaFamily()
    codec = family.load_mask_codec(str(vae))
    texts = [PaliGemmaFamily(mask_codec=codec).render_target(s) for s in samples]
    monkeypatch.setattr(run, "predict_texts", lambda *args, **kwargs: texts)

    class Single:
        is_local_main_process = True

    metrics = run.evaluate_samples(Single(), None, None, samples, recipe, family_of(recipe))
    assert 0.0 < metrics["refer_segment/miou"] < 1.0  # real masks: the VQ-VAE's loss shows
