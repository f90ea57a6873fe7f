"""Preference pairs in the one data contract: jsonl / hf (RLAIF-V layout) / shapes rows, each family's
preference batch, and ``data preview`` / ``data validate`` on pairs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pg_tune.cli import main
from pg_tune.config.recipe import ModelConfig
from pg_tune.config.schema import from_dict
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.formats import FORMATS, BuildContext
from pg_tune.data.sample import DataError
from pg_tune.models.family import family_for


def _build(fmt: str, stage: str = "train", policy: str = "stop", **options):
    bad = BadRows(policy)
    opts = from_dict(FORMATS[fmt].options, options, fmt)
    return list(FORMATS[fmt].build(opts, BuildContext(split=stage, bad_rows=bad))), bad


def test_jsonl_pairs_sample(samples_dir):
    rows, bad = _build("jsonl", path=str(samples_dir / "jsonl" / "pairs.jsonl"))
    assert not bad.counts
    assert [(s.suffix, s.rejected, s.task) for s in rows] == [
        ("a red cat and a blue dog", "a red cat and a green bird", "caption"),
        ("blue", "red", "vqa"),
    ]
    assert all(s.is_pair for s in rows)
    rejected = rows[1].rejected_view()
    assert (rejected.suffix, rejected.rejected, rejected.prefix, rejected.image) == (
        "red",
        None,
        rows[1].prefix,
        rows[1].image,
    )


def test_jsonl_bad_pairs_are_named_and_counted(tmp_path, samples_dir):
    shutil.copytree(samples_dir / "jsonl" / "images", tmp_path / "images")
    image = "images/000000000139.png"
    lines = [
        {"image": image, "prefix": "caption en", "chosen": "a cat"},
        {"image": image, "prefix": "caption en", "chosen": "a cat", "rejected": " a cat "},
        {"image": image, "prefix": "caption en", "chosen": "a cat", "rejected": ""},
        {"image": image, "prefix": "caption en", "chosen": "a cat", "rejected": 3},
        {"image": image, "prefix": "caption en", "suffix": "a cat", "chosen": "a cat", "rejected": "a dog"},
        {"image": image, "task": "detect", "objects": [{"label": "cat", "box": [1, 1, 9, 9]}], "chosen": "x"},
        {"image": image, "prefix": "caption en", "chosen": "a cat", "rejected": "a dog"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows, bad = _build("jsonl", policy="skip", path=str(path))
    assert [(s.suffix, s.rejected) for s in rows] == [("a cat", "a dog")]
    assert dict(bad.counts) == {
        "missing_field": 1,
        "identical_answers": 1,
        "empty_suffix": 1,
        "wrong_type": 3,
    }
    with pytest.raises(DataError, match=r"pairs.jsonl:1: missing field 'rejected'"):
        _build("jsonl", path=str(path))


def test_hf_rlaif_v_layout(samples_dir, tmp_path):
    """RLAIF-V's columns (image, question, chosen, rejected, ...): pairs with a prompt template."""
    parquet = samples_dir / "hf" / "rlaif_v.parquet"
    rows, bad = _build("hf", path=str(parquet), prompt="answer en {question}", task="vqa")
    assert not bad.counts and len(rows) == 2
    assert rows[0].prefix == "answer en What animals are in the picture?"
    assert rows[0].suffix.startswith("A red cat on the left") and "bird" in rows[0].rejected
    assert rows[0].image.size == (96, 64)  # the image bytes, decoded lazily
    # Other column names are mapped; a missing rejected column is named.
    import pyarrow.parquet as pq

    table = pq.read_table(parquet).rename_columns(
        ["ds_name", "picture", "question", "better", "worse", "origin_dataset", "origin_split", "idx", "p"]
    )
    pq.write_table(table, tmp_path / "renamed.parquet")
    mapped, _ = _build(
        "hf",
        path=str(tmp_path / "renamed.parquet"),
        columns={"image": "picture", "prefix": "question", "chosen": "better", "rejected": "worse"},
    )
    assert [(s.prefix, s.suffix, s.rejected) for s in mapped] == [
        (s.prefix[10:], s.suffix, s.rejected) for s in rows
    ]
    with pytest.raises(DataError, match=r"missing columns \['rejected'\]"):
        _build(
            "hf",
            path=str(tmp_path / "renamed.parquet"),
            columns={"image": "picture", "chosen": "better"},
            prompt="{question}",
        )
    # A row whose answers are the same is a bad row (skipped and counted, or named).
    table = pq.read_table(parquet)
    same = table.set_column(table.column_names.index("rejected"), "rejected", table.column("chosen"))
    pq.write_table(same, tmp_path / "same.parquet")
    with pytest.raises(
        DataError, match=r"same.parquet\[0\]: fields 'chosen' and 'rejected' are the same text"
    ):
        _build("hf", path=str(tmp_path / "same.parquet"), prompt="{question}")


def test_shapes_pairs_keep_the_images_and_change_one_word():
    plain, _ = _build("shapes", num_samples=40, image_size=32)
    pairs, _ = _build("shapes", num_samples=40, image_size=32, pairs=True)
    again, _ = _build("shapes", num_samples=40, image_size=32, pairs=True)
    assert [s.rejected for s in pairs] == [s.rejected for s in again]  # seeded
    kinds = set()
    for p, s in zip(pairs, plain, strict=True):
        assert np.array_equal(np.asarray(p.image), np.asarray(s.image)) and p.suffix == s.suffix
        assert s.rejected is None and p.rejected != p.suffix
        changed = [
            i for i, (a, b) in enumerate(zip(p.suffix.split(), p.rejected.split(), strict=True)) if a != b
        ]
        assert len(changed) == 1
        kinds.add(changed[0])
    assert kinds == {1, 2}  # wrong colours and wrong shapes both occur


@pytest.mark.parametrize("preset", ["tiny-paligemma2", "tiny-gemma3", "tiny-smolvlm2"])
def test_each_family_renders_both_answers_through_its_collator(preset, samples_dir):
    """Row i of a preference batch is the chosen answer laid out exactly as an SFT row, row B + i the
    rejected one; the images come once."""
    family = family_for(preset)
    processor = family.load_processor(ModelConfig(name_or_path=preset))
    pairs, _ = _build("jsonl", path=str(samples_dir / "jsonl" / "pairs.jsonl"))
    collator = family.collator(processor, 32)
    batch = collator.preference_batch(list(enumerate(pairs)))
    n = len(pairs)
    assert batch["input_ids"].shape[0] == batch["labels"].shape[0] == 2 * n
    assert batch["sample_index"].tolist() == [0, 1]
    plain = collator(list(enumerate(pairs)))
    assert torch.equal(batch[family.image_inputs[0]], plain[family.image_inputs[0]])  # B images, once
    for i, sample in enumerate(pairs):
        for row, answer in ((i, sample), (n + i, sample.rejected_view())):
            alone = collator([(i, answer)])
            length = int(alone["attention_mask"].sum())
            for key in ("input_ids", "labels", "attention_mask", *family.attention_inputs):
                assert torch.equal(batch[key][row, :length], alone[key][0, :length]), (key, row)
            assert int(batch["attention_mask"][row].sum()) == length
    assert not torch.equal(batch["labels"][0], batch["labels"][n])
    # Only training rows that are pairs can make a preference batch.
    with pytest.raises(DataError, match="not a preference pair"):
        collator.preference_batch([(0, pairs[0].rejected_view())])


@pytest.fixture
def pairs_recipe(tmp_path, samples_dir):
    shutil.copytree(samples_dir / "jsonl" / "images", tmp_path / "images")
    image = "images/000000000139.png"
    lines = [
        {"image": image, "prefix": "caption en", "chosen": "a red cat", "rejected": "a blue cat"},
        {"image": image, "prefix": "caption en", "chosen": "a red cat", "rejected": "a red <eos> cat"},
        {"image": image, "prefix": "caption en", "suffix": "a red cat"},
        {"image": image, "prefix": "caption en", "chosen": "a red cat", "rejected": "a red cat " + "x " * 40},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"output_dir: {tmp_path}/run\n"
        "data:\n"
        f"  train: [{{format: jsonl, path: {tmp_path}/pairs.jsonl}}]\n"
        "  max_text_length: 24\n"
        "train: {objective: dpo}\n"
    )
    return path


def test_preview_shows_both_answers(pairs_recipe, tmp_path, capsys):
    draw = tmp_path / "draw"
    assert main(["data", "preview", str(pairs_recipe), "--draw", str(draw)]) == 0
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    records = {r["index"]: r for r in printed}
    assert (records[0]["chosen"], records[0]["rejected"]) == ("a red cat", "a blue cat")
    assert "suffix" not in records[0] and records[2]["suffix"] == "a red cat"
    assert len(list(draw.glob("*.png"))) == len(records) == 4


def test_validate_checks_pairs(pairs_recipe, capsys):
    assert main(["data", "validate", str(pairs_recipe)]) == 1
    out = capsys.readouterr().out
    assert "reserved_token: 1" in out and "field 'rejected' contains <eos>" in out
    assert "not_a_pair: 1" in out and "pairs.jsonl:3: no rejected answer" in out
    assert "over_length: 1" in out and "training would cut the rejected answer" in out
