"""Values a recipe cannot mean, and recipe/override mistakes: one line at `pg-tune validate`, naming
the dotted path (or file and line) and what to do; never a traceback, never a silent run."""

from __future__ import annotations

import pytest
import yaml

from pg_tune.cli import main, parse_args
from pg_tune.config import ConfigError, load_recipe, parse_recipe
from pg_tune.models.paligemma import PaliGemmaFamily

BASE = {
    "output_dir": "runs/x",
    "data": {
        "train": [{"format": "shapes", "num_samples": 4}],
        "eval": [{"format": "shapes", "num_samples": 2}],
    },
}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_steps=0", r"train.max_steps: must be >= 1, got 0 \(leave it unset, or null, to train by epochs\)"),
        ("train.max_steps=-5", r"train.max_steps: must be >= 1, got -5"),
        ("train.lr=.nan", r"train.lr: must be a finite number > 0, got nan"),
        ("train.lr=.inf", r"train.lr: must be a finite number > 0, got inf"),
        ("lora.dropout=1.5", r"lora.dropout: must be in \[0, 1\) \(a probability; 0 = off\), got 1.5"),
        ("lora.alpha=0", r"lora.alpha: must be >= 1, got 0"),
        ("train.warmup_ratio=-2", r"train.warmup_ratio: must be a finite number in \[0, 1\], got -2.0"),
        ("train.weight_decay=-0.1", r"train.weight_decay: must be a finite number in \[0, inf\]"),
        ("train.max_grad_norm=0", r"train.max_grad_norm: must be a finite number > 0, got 0.0"),
        ("data.num_workers=-3", r"data.num_workers: must be >= 0, got -3"),
        ("data.pad_to_multiple_of=0", r"data.pad_to_multiple_of: must be >= 1, got 0 \(1 = pad to the longest row\)"),
        ("eval.batch_size=0", r"eval.batch_size: must be >= 1, got 0"),
        ("eval.num_beams=0", r"eval.num_beams: must be >= 1, got 0"),
        ("eval.every=0", r"eval.every: must be >= 1, got 0"),
        ("eval.limit=0", r"eval.limit: must be >= 1, got 0"),
        ("eval.max_new_tokens_per_task={detect: 0}", r"eval.max_new_tokens_per_task.detect: must be >= 1"),
        ("data.max_text_length=0", r"data.max_text_length: must be >= 1, got 0"),
        ("train.save_every=0", r"train.save_every: must be >= 1, got 0 \(leave it unset, or null, for no checkpoints\)"),
        ("eval.best_metric=caption/cidr", r"eval.best_metric: no task reports a metric 'caption/cidr' — did you mean 'caption/cider'\?"),
        ("eval.best_metric=accuracy", r"eval.best_metric: no task reports a metric 'accuracy' — did you mean 'vqa/accuracy'\?"),
        ("data.eval=[]", r"eval.best_metric: 'caption/cider' needs an evaluation: add a data.eval dataset"),
    ],
)  # fmt: skip
def test_values_no_run_can_mean_fail_validate(tmp_path, capsys, override, message):
    recipe = tmp_path / "r.yaml"
    data = BASE if override != "data.eval=[]" else {**BASE, "eval": {"best_metric": "caption/cider"}}
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe, [override])
    assert main(["validate", str(recipe), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pg-tune: error: {recipe}: ") and err.count("\n") == 1


def test_valid_edges_still_pass():
    for override in ("train.max_steps=1", "train.max_steps=null", "lora.dropout=0", "train.warmup_ratio=1",
                     "data.num_workers=0", "train.save_every=1", "eval.best_metric=refer_detect/acc@0.5"):  # fmt: skip
        key, value = override.split("=")
        section, name = key.split(".")
        parse_recipe({**BASE, section: {**BASE.get(section, {}), name: yaml.safe_load(value)}})


def test_metric_names_are_what_scoring_reports():
    """eval.best_metric is checked against METRIC_NAMES: it must list exactly what scoring returns."""
    from pg_tune.evaluate.scoring import Item, score_items
    from pg_tune.models.paligemma.boxes import encode_box
    from pg_tune.tasks import METRIC_NAMES

    box = encode_box((10, 10, 60, 60), (100, 100))
    items = {
        "caption": Item("caption", "a red circle", ["a red circle"]),
        "vqa": Item("vqa", "two", ["two"]),
        "docvqa": Item("docvqa", "x", ["x"]),
        "ocr": Item("ocr", "x", ["x"]),
        "refer_detect": Item("refer_detect", box, [box], (100, 100)),
        "refer_segment": Item("refer_segment", box, [box], (100, 100)),
        "detect": Item("detect", box + " cat", [box + " cat"], (100, 100)),
    }
    assert set(items) == set(METRIC_NAMES)
    for task, item in items.items():
        reported = {
            name.split("/", 1)[1]
            for name in score_items([item], PaliGemmaFamily()).metrics
            if name.startswith(task + "/")
        }
        listed = set(METRIC_NAMES[task]) - (
            {"miou"} if task == "refer_segment" else set()
        )  # needs the VQ-VAE
        assert reported == listed, task


def test_recipe_file_errors_are_one_line(tmp_path, capsys):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"output_dir: runs/x\n# caf\xe9\ndata: {}\n")
    with pytest.raises(
        ConfigError, match=r"latin1.yaml:2: not UTF-8 text \(byte 0xe9\); save the recipe as UTF-8"
    ):
        load_recipe(latin1)
    with pytest.raises(ConfigError, match=r": is a directory; give the recipe's .yaml file"):
        load_recipe(tmp_path)
    for argv in (["validate", str(latin1)], ["validate", str(tmp_path)], ["train", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("pg-tune: error:") and err.count("\n") == 1 and "Traceback" not in err
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(BASE).encode())
    assert load_recipe(bom)[0].output_dir == "runs/x"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.train.5.num_samples=1", r"'data.train.5.num_samples=1': data.train has 1 entry \(indices 0..0\), got '5'"),
        ("data.train.first.num_samples=1", r"data.train has 1 entry \(indices 0..0\), got 'first'"),
        ("output_dir.x=1", r"output_dir is 'runs/x', not a section"),
        ("train..lr=1", r"empty part in key 'train..lr'"),
        ("train.lr=[1", r"the value is not valid YAML \(expected ',' or '\]', but got '<stream end>'\)"),
    ],
)  # fmt: skip
def test_bad_overrides_are_named(tmp_path, capsys, override, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe, [override])
    assert main(["validate", str(recipe), override]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_overrides_anywhere_on_the_line(tmp_path, shapes_jsonl):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({**BASE, "data": {"train": [{"format": "jsonl", "path": str(shapes_jsonl)}]}})
    )
    out = tmp_path / "preview.jsonl"
    # After the options, and split around them: applied in the order given (the last one wins).
    argv = ["data", "preview", str(recipe), "data.train.0.limit=9", "--limit", "50", "--out", str(out),
            "data.train.0.limit=3"]  # fmt: skip
    assert main(argv) == 0
    assert len(out.read_text().splitlines()) == 3
    args = parse_args(
        ["eval", str(recipe), "--model", "RUN/adapter", "eval.limit=48", "--out", "o", "eval.num_beams=2"]
    )
    assert args.overrides == ["eval.limit=48", "eval.num_beams=2"] and args.model == "RUN/adapter"
    # `--resume` takes an optional value: an override right after it is still an override.
    args = parse_args(["train", str(recipe), "--resume", "train.lr=1e-5", "train.epochs=2"])
    assert args.resume == "auto" and args.overrides == ["train.lr=1e-5", "train.epochs=2"]
    assert parse_args(["train", str(recipe), "--resume", str(tmp_path)]).resume == str(tmp_path)


def test_stray_arguments_still_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["validate", "r.yaml", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["predict", "--model", "m", "--image", "i", "--prompt", "p", "eval.limit=3"])
    assert "pg-tune predict reads no recipe, so it takes no key=value overrides" in capsys.readouterr().err
