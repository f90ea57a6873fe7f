"""Bad input, one case a test: each must fail (or be skipped and counted) with a message naming
the file, the line or row, and the field or reason."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import yaml
from PIL import Image

from pg_tune.config.recipe import load_recipe
from pg_tune.config.schema import ConfigError
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.formats import BuildContext
from pg_tune.data.formats.jsonl import JsonlOptions
from pg_tune.data.formats.jsonl import build as build_jsonl
from pg_tune.data.images import MAX_IMAGE_PIXELS, image_size, load_image
from pg_tune.data.safe_collate import BAD_ROWS_KEY, SafeCollator, batch_rows
from pg_tune.data.sample import DataError, Sample

# --- images ------------------------------------------------------------------------------------


def _png(path, size=(8, 8)):
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def _png_claiming(path, width: int, height: int):
    """A valid little PNG whose header claims another size: a decompression bomb costs nothing to make."""
    data = bytearray(_png(path).read_bytes())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def test_missing_image_names_row_and_path(tmp_path):
    with pytest.raises(DataError, match=r"data.jsonl:7: image file not found: .*nope.png") as err:
        load_image(tmp_path / "nope.png", "data.jsonl:7")
    assert err.value.reason == "missing_image"


def test_corrupt_image(tmp_path):
    bad = tmp_path / "garbage.png"
    bad.write_bytes(b"not an image at all" * 10)
    with pytest.raises(
        DataError, match=r"data.jsonl:3: cannot read image .*garbage.png \(corrupt or truncated\?\)"
    ):
        load_image(bad, "data.jsonl:3")


def test_truncated_image(tmp_path):
    path = tmp_path / "cut.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        load_image(path, "data.jsonl:4")
    assert err.value.reason == "corrupt_image"


def test_decompression_bomb_is_bounded(tmp_path):
    # Over pg_tune's bound but under PIL's own: refused from the header, before any pixel is decoded.
    big = _png_claiming(tmp_path / "big.png", 9000, 9000)
    assert 9000 * 9000 > MAX_IMAGE_PIXELS
    with pytest.raises(
        DataError, match=r"data.jsonl:5: image .*big.png is 9000x9000 pixels, over the"
    ) as err:
        load_image(big, "data.jsonl:5")
    assert err.value.reason == "image_too_large"
    # Far over: PIL refuses to even open it; still a DataError naming the row.
    bomb = _png_claiming(tmp_path / "bomb.png", 60000, 60000)
    with pytest.raises(DataError, match=r"data.jsonl:6: .*bomb.png"):
        load_image(bomb, "data.jsonl:6")
    assert image_size(big) == (9000, 9000)  # header-only reads stay cheap


# --- JSONL rows -------------------------------------------------------------------------------


def _jsonl(tmp_path, lines: list[bytes | str | dict]) -> JsonlOptions:
    _png(tmp_path / "ok.png")
    path = tmp_path / "data.jsonl"
    raw = b""
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        raw += (line.encode() if isinstance(line, str) else line) + b"\n"
    path.write_bytes(raw)
    return JsonlOptions(path=str(path))


GOOD = {"image": "ok.png", "prefix": "caption en", "suffix": "a red square"}

# (line content, reason counted under skip, message fragment under stop)
ROW_CASES = [
    (
        b'{"image": "ok.png", "prefix": "caption en", "suffix": "caf\xe9"}',
        "not_utf8",
        "line is not valid UTF-8",
    ),
    ('{"image": "ok.png", "prefix": ', "malformed_json", "malformed JSON"),
    ('["ok.png", "caption en", "x"]', "wrong_type", "expected a JSON object, got list"),
    (
        {"image": 5, "prefix": "caption en", "suffix": "x"},
        "wrong_type",
        "field 'image' must be a string, got 5",
    ),
    ({"image": "ok.png", "prefix": "caption en"}, "missing_field", "missing field 'suffix'"),
    ({**GOOD, "suffix": "  "}, "empty_suffix", "empty suffix"),
    ({**GOOD, "image": "gone.png"}, "missing_image", "image file not found"),
    ({**GOOD, "references": "a red square"}, "wrong_type", "field 'references' must be a list of strings"),
    ({**GOOD, "task": "captioning"}, "unknown_task", "field 'task' must be one of"),
]


@pytest.mark.parametrize(
    "line,reason,fragment", ROW_CASES, ids=[c[1] + str(i) for i, c in enumerate(ROW_CASES)]
)
def test_jsonl_bad_row_stop_names_file_and_line(tmp_path, line, reason, fragment):
    options = _jsonl(tmp_path, [GOOD, line, GOOD])
    with pytest.raises(DataError) as err:
        build_jsonl(options, BuildContext("train", BadRows("stop")))
    message = str(err.value)
    assert f"data.jsonl:2: {fragment}" in message and "data.on_bad_row=stop" in message


def test_jsonl_skip_counts_every_reason(tmp_path):
    options = _jsonl(tmp_path, [GOOD] + [case[0] for case in ROW_CASES] + [GOOD])
    bad = BadRows("skip")
    samples = build_jsonl(options, BuildContext("train", bad))
    assert len(samples) == 2
    expected: dict[str, int] = {}
    for _, reason, _ in ROW_CASES:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(bad.counts) == expected
    report = bad.report()
    assert "wrong_type: 3" in report and "data.jsonl:2: line is not valid UTF-8" in report


def test_missing_jsonl_file(tmp_path):
    with pytest.raises(DataError, match=r"missing.jsonl: JSONL file not found"):
        build_jsonl(JsonlOptions(path=str(tmp_path / "missing.jsonl")), BuildContext("train", BadRows()))


# --- the collator: rows that fail at training time ----------------------------------------------


@pytest.fixture(scope="module")
def collator():
    from pg_tune.models.paligemma import PaliGemmaFamily
    from pg_tune.models.paligemma.tiny import PRESETS, build_processor

    return PaliGemmaFamily().collator(build_processor(PRESETS["tiny-paligemma2"]), max_text_length=16)


def _rows(tmp_path):
    ok = _png(tmp_path / "ok.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return [
        (0, Sample(ok, "caption en", "a red square", "data.jsonl:1")),
        (1, Sample(corrupt, "caption en", "a red square", "data.jsonl:2")),
        (2, Sample(tmp_path / "deleted.png", "caption en", "a red square", "data.jsonl:3")),
        (3, Sample(ok, "caption en", "a red square", "data.jsonl:4")),
    ]


def test_collator_skip_drops_bad_rows_and_reports_them(tmp_path, collator):
    batch = SafeCollator(collator, "skip")(_rows(tmp_path))
    assert batch["sample_index"].tolist() == [0, 3] and batch_rows(batch) == 2
    assert [reason for reason, _ in batch[BAD_ROWS_KEY]] == ["corrupt_image", "missing_image"]
    assert "data.jsonl:2: cannot read image" in batch[BAD_ROWS_KEY][0][1]
    assert "data.jsonl:3: image file not found" in batch[BAD_ROWS_KEY][1][1]


def test_collator_skip_all_rows_bad_gives_empty_batch(tmp_path, collator):
    rows = _rows(tmp_path)[1:3]
    batch = SafeCollator(collator, "skip")(rows)
    assert batch_rows(batch) == 0 and len(batch[BAD_ROWS_KEY]) == 2


def test_collator_stop_raises_naming_the_row(tmp_path, collator):
    with pytest.raises(DataError, match=r"data.jsonl:2: cannot read image"):
        SafeCollator(collator, "stop")(_rows(tmp_path))


def test_collator_over_length_budget_and_empty_suffix(tmp_path, collator):
    ok = _png(tmp_path / "ok.png")
    long_prompt = Sample(ok, "caption en " + "red " * 40, "a red square", "data.jsonl:9")
    with pytest.raises(
        DataError, match=r"data.jsonl:9: prompt is \d+ tokens, leaving no room .*max_text_length=16"
    ):
        collator([(0, long_prompt)])
    with pytest.raises(DataError, match=r"data.jsonl:10: empty suffix"):
        collator([(0, Sample(ok, "caption en", "", "data.jsonl:10"))])
    # A long suffix is not an error: it is truncated (never the image tokens or prompt) and flagged.
    batch = collator([(0, Sample(ok, "caption en", "red " * 40, "data.jsonl:11"))])
    assert batch["truncated"].tolist() == [True]
    assert batch["input_ids"].shape[1] == collator.num_image_tokens + 16
    reasons = SafeCollator(collator, "skip")([(0, long_prompt), (1, Sample(ok, "cap en", "a", "x:1"))])
    assert [r for r, _ in reasons[BAD_ROWS_KEY]] == ["over_length_budget"]


# --- the recipe ---------------------------------------------------------------------------------


def _recipe_file(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


BASE = {"output_dir": "runs/x", "data": {"train": [{"format": "shapes"}]}}


@pytest.mark.parametrize(
    "patch,fragment",
    [
        ({"train": {"lr": "fast"}}, "train.lr: expected a number, got 'fast'"),
        ({"train": {"batch_size": 2.5}}, "train.batch_size: expected an integer, got 2.5"),
        ({"train": {"on_nonfinite": "ignore"}}, "train.on_nonfinite: expected one of 'stop' | 'skip'"),
        ({"train": {"max_step": 10}}, "unknown key 'train.max_step' — did you mean 'max_steps'?"),
        ({"eval": {"best_mode": "highest"}}, "eval.best_mode: expected one of 'max' | 'min'"),
        (
            {"data": {"train": [{"format": "jsonll", "path": "x"}]}},
            "unknown dataset format 'jsonll' — did you mean",
        ),
        ({"data": {"train": [{"format": "jsonl", "pth": "x"}]}}, "unknown key 'data.train[0].pth'"),
        ({"data": {"on_bad_row": "ignore"}, "__keep_train": True}, "data.on_bad_row: expected one of"),
        ({"quantization": {"bnb_4bit_compute_type": "bfloat16"}}, "did you mean 'bnb_4bit_compute_dtype'"),
    ],
)
def test_recipe_errors_name_the_dotted_path(tmp_path, patch, fragment):
    data = json.loads(json.dumps(BASE))
    keep_train = patch.pop("__keep_train", False)
    for section, values in patch.items():
        if section == "data" and keep_train:
            data["data"].update(values)
        else:
            data[section] = {**data.get(section, {}), **values}
    path = _recipe_file(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value).startswith(path) and fragment in str(err.value)


# --- end to end: an image that breaks mid-training ----------------------------------------------


@pytest.mark.slow
def test_training_skips_and_counts_a_corrupt_image(tmp_path, shapes_jsonl):
    from pg_tune.cli.train import run_training

    images = sorted((shapes_jsonl.parent / "images").glob("*.png"))
    images[3].write_bytes(b"corrupted after indexing")  # build sees the file; only decoding fails
    data = {
        "output_dir": str(tmp_path / "run"),
        "lora": {"r": 2, "targets": "attention"},
        "data": {"train": [{"format": "jsonl", "path": str(shapes_jsonl), "limit": 8}], "on_bad_row": "skip"},
        "train": {"max_steps": 2, "batch_size": 4, "log_every": 1},
        "eval": {"before_training": False},
    }
    recipe, resolved = load_recipe(_recipe_file(tmp_path, data))
    result = run_training(recipe, resolved)
    assert result.steps == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bad_rows"]["training"] == {"corrupt_image": 1}
