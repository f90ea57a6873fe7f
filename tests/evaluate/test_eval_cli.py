"""`pg-tune eval` and `pg-tune predict` end to end on a tiny adapter trained for a few steps."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from pg_tune.cli import main
from pg_tune.data.formats.shapes import draw_shape
from pg_tune.models.paligemma.boxes import encode_box


def _refer_jsonl(folder, n: int = 4):
    """A referring-detection JSONL dataset: shape images, 'detect <shape>' prompts, box suffixes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(5)
    lines = []
    for i in range(n):
        image, colour, shape, box = draw_shape(rng, 96)
        image.save(folder / f"{i}.png")
        suffix = encode_box(box, image.size) + f" {shape}"
        lines.append(
            {"image": f"{i}.png", "prefix": f"detect {shape}", "suffix": suffix, "task": "refer_detect"}
        )
    path = folder / "refer.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from pg_tune.cli.train import run_training
    from pg_tune.config.recipe import parse_recipe, resolved

    root = tmp_path_factory.mktemp("eval_cli")
    refer = _refer_jsonl(root / "refer")
    data = {
        "output_dir": str(root / "run"),
        "model": {"name_or_path": "tiny-paligemma2"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {
            "train": [{"format": "shapes", "num_samples": 8}],
            "eval": [{"format": "shapes", "num_samples": 4}, {"format": "jsonl", "path": str(refer)}],
            "max_text_length": 24,
        },
        # A large learning rate so a few steps visibly change what the model generates.
        "train": {"max_steps": 6, "batch_size": 4, "lr": 0.02, "warmup_ratio": 0.0, "scheduler": "constant"},
        "eval": {
            "before_training": False,
            "max_new_tokens": 4,
            "max_new_tokens_per_task": {"refer_detect": 6},
        },
    }
    recipe = parse_recipe(data)
    run_training(recipe, resolved(recipe))
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    return root, recipe_path


def _predictions(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_eval_adapter_merged_and_base_then_rescore(trained_run, capsys):
    import peft

    from pg_tune.config.recipe import ModelConfig
    from pg_tune.models.paligemma import PaliGemmaFamily

    root, recipe_path = trained_run
    adapter = root / "run" / "adapter"
    assert main(["eval", str(recipe_path), "--model", str(adapter), "--out", str(root / "ev_adapter")]) == 0
    out = capsys.readouterr().out
    assert "refer_detect/acc@0.5" in out and "caption/cider" in out

    metrics = json.loads((root / "ev_adapter" / "metrics.json").read_text())
    assert set(metrics["datasets"]) == {"eval[0] shapes", "eval[1] jsonl refer.jsonl"}
    assert metrics["metrics"]["caption/count"] == 4 and metrics["metrics"]["refer_detect/count"] == 4
    records = _predictions(root / "ev_adapter")
    assert len(records) == 8
    refer = [r for r in records if r["task"] == "refer_detect"]
    assert all(r["image_size"] == [96, 96] and r["image"].endswith(".png") for r in refer)
    assert all(isinstance(r["score"], float) and "parsed" in r for r in records)
    # The training loop's own after-training evaluation agrees with the reloaded adapter.
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["metrics_after"] == pytest.approx(metrics["metrics"])

    # A merged copy of the adapter predicts the same; the bare base predicts something else.
    merged_dir = root / "merged"
    base = PaliGemmaFamily().load_model(ModelConfig(name_or_path="tiny-paligemma2"))
    peft.PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(merged_dir)
    PaliGemmaFamily().load_processor(ModelConfig(name_or_path=str(adapter))).save_pretrained(merged_dir)
    assert main(["eval", str(recipe_path), "--model", str(merged_dir), "--out", str(root / "ev_merged")]) == 0
    assert main(["eval", str(recipe_path), "--out", str(root / "ev_base")]) == 0
    adapter_texts = [r["prediction"] for r in records]
    assert [r["prediction"] for r in _predictions(root / "ev_merged")] == adapter_texts
    assert [r["prediction"] for r in _predictions(root / "ev_base")] != adapter_texts
    assert "merged model" in json.loads((root / "ev_merged" / "metrics.json").read_text())["model"]

    # Re-scoring the saved file without a model reproduces the numbers.
    capsys.readouterr()
    predictions = root / "ev_adapter" / "predictions.jsonl"
    assert main(["eval", "--predictions", str(predictions), "--out", str(root / "rescored")]) == 0
    rescored = json.loads((root / "rescored" / "metrics.json").read_text())
    assert rescored["metrics"] == pytest.approx(metrics["metrics"])
    assert set(rescored["datasets"]) == set(metrics["datasets"])
    for name, values in metrics["datasets"].items():
        assert rescored["datasets"][name] == pytest.approx(values)
    assert (root / "rescored" / "report" / "index.html").is_file()


@pytest.mark.slow
def test_predict_prints_text_and_parsed_json_and_draws(trained_run, tmp_path, capsys):
    root, _ = trained_run
    image = root / "refer" / "0.png"
    drawn = tmp_path / "drawn.png"
    code = main(["predict", "--model", str(root / "run" / "adapter"), "--image", str(image),
                 "--prompt", "detect circle", "--max-new-tokens", "5", "--draw", str(drawn)])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    # The raw text (which may itself hold newlines), then the JSON object on its own lines.
    start = out.index("\n{\n") + 1 if not out.startswith("{\n") else 0
    result = json.loads(out[start:])
    assert result["prediction"] == out[: max(start - 1, 0)] and result["image_size"] == [96, 96]
    assert isinstance(result["objects"], list)
    from PIL import Image

    assert Image.open(drawn).size == (96, 96)


def test_rescore_minimal_lines_and_errors_name_the_line(tmp_path, capsys):
    loc = encode_box((0, 0, 50, 50), (100, 100))
    lines = [
        {"task": "caption", "prediction": "a red circle", "references": ["a red circle", "a circle"]},
        {"task": "refer_detect", "prediction": loc, "references": [loc], "image_size": [100, 100]},
        {"task": "refer_detect", "prediction": "no idea", "references": [loc], "image_size": [100, 100]},
        {"task": "vqa", "prediction": "2", "references": ["two"]},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    # Lines that do not name the family that wrote them: its parser is asked for, never assumed.
    assert main(["eval", "--predictions", str(path)]) == 2
    assert "no model family (field 'family'" in capsys.readouterr().err
    assert main(["eval", "--predictions", str(path), "--family", "paligemma"]) == 0
    metrics = json.loads((tmp_path / "rescored" / "metrics.json").read_text())["metrics"]
    assert metrics["refer_detect/acc@0.5"] == 0.5 and metrics["refer_detect/unparsed"] == 1
    assert metrics["vqa/accuracy"] == 1.0 and metrics["caption/exact_match"] == 1.0

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[1], "image_size": None}) + "\n")
    assert main(["eval", "--predictions", str(bad), "--family", "paligemma"]) == 2
    assert f"{bad}:2: field 'image_size'" in capsys.readouterr().err
