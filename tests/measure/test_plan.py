"""pg-tune plan: exact parts are exact, the activation model matches what autograd really saves."""

from __future__ import annotations

import pytest
import torch

from pg_tune.config.recipe import parse_recipe
from pg_tune.measure.plan import estimate, parse_memory, suggest_micro_batch
from tests.families import family_of


def _recipe(preset: str, **train):
    return parse_recipe(
        {
            "output_dir": "/tmp/unused",
            "model": {"name_or_path": preset, "dtype": train.pop("dtype", "float32")},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "attention_mlp"},
            "data": {"train": [{"format": "shapes"}], "max_text_length": 32},
            "train": {"batch_size": 2, **train},
        }
    )


def _part(plan, name: str) -> float:
    return next(p.bytes for p in plan.parts if p.name.startswith(name))


def _prepared(recipe):
    from pg_tune.models.family import resolve_dtype
    from pg_tune.train.adapters import prepare_model

    family = family_of(recipe)
    model = family.tiny_module.build_base(recipe.model.name_or_path).to(resolve_dtype(recipe.model.dtype))
    return prepare_model(model, recipe, family).train()


def test_weights_lora_gradients_and_optimizer_are_exact():
    recipe = _recipe("tiny-paligemma2")
    plan = estimate(recipe, family_of(recipe), device="cuda")
    model = _prepared(recipe)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert _part(plan, "base weights") == base * 4  # fp32
    assert _part(plan, "LoRA weights") == _part(plan, "gradients") == trainable * 4
    assert _part(plan, "optimizer states") == trainable * 8
    assert all(p.name != "runtime (imports)" for p in plan.parts)  # CPU only


def _longest_batch(recipe, family, model):
    """One training batch of rows as long as the plan budgets: the largest image the processor
    makes (a square at its longest edge) and a target that fills ``data.max_text_length``."""
    from PIL import Image

    from pg_tune.config.recipe import ModelConfig
    from pg_tune.data.sample import Sample
    from pg_tune.models.tiny import WORDS

    processor = family.load_processor(ModelConfig(name_or_path=recipe.model.name_or_path))
    side = int(getattr(processor.image_processor, "size", {}).get("longest_edge", 64))
    image = Image.new("RGB", (side, side), (120, 30, 200))
    suffix = " ".join(WORDS[i % 50] for i in range(4 * recipe.data.max_text_length))
    # The second row is shorter: padding, as in any real batch (SDPA then expands grouped k/v heads).
    suffixes = [suffix, "a red circle"]
    samples = [
        Sample(image=image, prefix="caption en", suffix=t, source=f"r{i}") for i, t in enumerate(suffixes)
    ]
    collator = family.collator(processor, recipe.data.max_text_length)
    batch = collator(list(enumerate(samples[: recipe.train.batch_size])))
    # A cut target drops the chat template's newline after it: one position under the budget.
    assert 0 <= collator.max_row_length() - batch["input_ids"].shape[1] <= 1
    return batch


def _saved_activation_bytes(recipe) -> int:
    """Bytes autograd keeps for backward in one pg_tune training forward (parameters excluded)."""
    from pg_tune.train.loss import SuffixLoss

    model = _prepared(recipe)
    family = family_of(model)
    inputs = _longest_batch(recipe, family, model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        SuffixLoss(model, family)(inputs)
    return sum(storages.values())


@pytest.mark.parametrize(
    ("preset", "dtype"),
    [
        ("tiny-paligemma2", "float32"),
        ("tiny-paligemma2", "bfloat16"),
        ("tiny-paligemma", "bfloat16"),
        ("tiny-gemma3", "float32"),
        ("tiny-smolvlm2", "float32"),
        ("tiny-smolvlm2", "bfloat16"),
    ],
)
def test_activation_estimate_matches_what_autograd_saves(preset, dtype):
    # Gemma 2 runs eager attention (scores kept), the others SDPA; Gemma 3 adds per-head q/k norms;
    # SmolVLM2 is Llama (2 norms, SiLU MLP) after up to 10 tiles of image tokens; bf16 bases cast
    # each LoRA input to fp32.
    recipe = _recipe(preset, dtype=dtype)
    estimated = _part(estimate(recipe, family_of(recipe), device="cuda"), "activations")
    measured = _saved_activation_bytes(recipe)
    # The model leaves out small per-model tensors (rotary cos/sin, masks, the head's rows): 15 %.
    assert abs(estimated - measured) <= 0.15 * measured, (estimated, measured)


@pytest.mark.parametrize("preset", ["tiny-paligemma2", "tiny-gemma3", "tiny-smolvlm2"])
def test_batch_image_inputs_are_the_collators_bytes_for_the_largest_image(preset, tmp_path):
    """The plan's image inputs equal the tensors the family's collator makes for two rows of the
    largest image the settings allow (SmolVLM2: every tile, with its per-pixel mask)."""
    from PIL import Image

    from pg_tune.data.sample import Sample
    from pg_tune.measure.plan import plan_processor

    recipe = _recipe(preset)
    family = family_of(recipe)
    processor = plan_processor(recipe, family)
    path = tmp_path / "large.png"
    Image.new("RGB", (4096, 4096), (120, 30, 200)).save(path)  # past every family's longest edge
    rows = [(i, Sample(str(path), "caption en", "a shape", f"test:{i}")) for i in range(2)]
    batch = family.collator(processor, recipe.data.max_text_length, train=True)(rows)
    made = sum(batch[key].nbytes for key in family.image_inputs)
    assert (
        _part(estimate(recipe, family, "cpu", runtime=0.0, processor=processor), "batch image inputs") == made
    )


def test_checkpointing_keeps_layer_inputs_only():
    plain, checkpointed = _recipe("tiny-paligemma2"), _recipe("tiny-paligemma2", gradient_checkpointing=True)
    est_plain = _part(estimate(plain, family_of(plain), device="cuda"), "activations")
    est_ckpt = _part(estimate(checkpointed, family_of(checkpointed), device="cuda"), "activations")
    layers = 2
    # The forward keeps only the layer inputs; one layer is recomputed at a time during backward.
    forward_part = est_ckpt - est_plain / layers
    measured = _saved_activation_bytes(checkpointed)
    assert est_ckpt < est_plain
    assert abs(forward_part - measured) <= 0.25 * measured, (forward_part, measured)


def test_suggests_the_largest_micro_batch_that_fits_with_accumulation():
    recipe = _recipe("tiny-paligemma2", batch_size=8, grad_accum=1)
    at = {b: estimate(recipe, family_of(recipe), device="cuda", batch_size=b).peak for b in (1, 2, 4)}
    assert at[1] < at[2] < at[4]
    micro, accum, plan = suggest_micro_batch(
        recipe, family_of(recipe), memory=(at[2] + at[4]) / 2, device="cuda"
    )
    assert (micro, accum) == (2, 4) and plan.peak == at[2]
    assert suggest_micro_batch(recipe, family_of(recipe), memory=at[1] * 0.9, device="cuda") is None


def test_cpu_plan_counts_the_runtime_and_no_mapped_checkpoint(tmp_path):
    from pg_tune.models.paligemma.tiny import save_checkpoint

    plan = estimate(_recipe("tiny-paligemma2"), family_of(_recipe("tiny-paligemma2")), device="cpu")
    assert 1e8 < _part(plan, "runtime") < 4e9  # this process's RSS after the imports: measured
    checkpoint = save_checkpoint("tiny-paligemma2", tmp_path / "ckpt")
    recipe = _recipe("tiny-paligemma2")
    recipe.model.name_or_path = str(checkpoint)
    recipe.quantization.mode = "4bit"
    # The loader reads each tensor into its own memory (pg_tune.models.shards): nothing stays mapped.
    assert not any("mapped" in p.name for p in estimate(recipe, family_of(recipe), "cpu").parts)


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_plan_says_where_glibc_may_keep_freed_memory_beyond_it(monkeypatch, tiny_checkpoint):
    """The plan models freed memory as returned; where the loader fixes glibc's mmap threshold
    (``host_memory.fixes_threshold``: a checkpoint read from disk, unless ``PG_TUNE_MALLOC=system``)
    it names the CPU time that costs and the way out; elsewhere it says the heap may hold more."""

    def heap_notes(mode: str, model: str, quantization: str = "none", device: str = "cpu") -> list[str]:
        monkeypatch.setenv("PG_TUNE_MALLOC", mode)
        recipe = _recipe("tiny-paligemma2")
        recipe.model.name_or_path, recipe.quantization.mode = model, quantization
        plan = estimate(recipe, family_of(recipe), device, runtime=0.0)
        return [n for n in plan.notes if "mmap threshold" in n]

    disk = str(tiny_checkpoint)
    for mode, quantization in (("auto", "none"), ("auto", "4bit"), ("compact", "none")):
        (note,) = heap_notes(mode, disk, quantization)  # the loader fixes the threshold
        assert (
            f"PG_TUNE_MALLOC={mode} fixes glibc's mmap threshold" in note and "PG_TUNE_MALLOC=system" in note
        )
    (note,) = heap_notes("system", disk, "4bit")  # glibc left alone, even for QLoRA
    assert "leaves glibc's mmap threshold dynamic for this base" in note and "PG_TUNE_MALLOC=auto" in note
    (note,) = heap_notes("auto", "tiny-paligemma2")  # built in-process: nothing is loaded
    assert "dynamic for this in-process preset" in note
    assert heap_notes("auto", disk, device="cuda") == []  # host RSS is not what a GPU plan answers


def test_parse_memory():
    assert parse_memory("24GiB") == 24 * 2**30
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("512 MiB") == 512 * 2**20
    assert parse_memory("1e12") == 10**12
    for bad in ("lots", "nan", "inf", "-5GiB", "", ".", "1.2.3"):
        with pytest.raises(ValueError, match="expected a size"):
            parse_memory(bad)
    for out_of_range in ("0", "0.1", "1e400", "2000PB"):
        with pytest.raises(ValueError, match="expected between 1 byte and"):
            parse_memory(out_of_range)


@pytest.mark.parametrize("memory", ["abc", "nan", "inf", "1e400", "-5GiB", "0", ""])
def test_cli_refuses_a_bad_memory_in_one_line(memory, capsys):
    from pg_tune.cli import main

    assert main(["plan", "recipes/demo/shapes_tiny.yaml", f"--memory={memory}", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pg-tune plan: error: --memory") and "\n" not in err and "Traceback" not in err


def test_cli_names_an_unknown_model_in_one_line(capsys):
    from pg_tune.cli import main

    assert (
        main(
            ["plan", "recipes/demo/shapes_tiny.yaml", "model.name_or_path=nobody/nothing", "--device", "cpu"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("pg-tune plan: error: no model family for 'nobody/nothing'") and "\n" not in err


def test_an_absurd_global_batch_is_refused_or_split_without_walking_it():
    from pg_tune.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"train\.batch_size: must be <= 65536"):
        _recipe("tiny-paligemma2", batch_size=10**21)  # the recipe refuses it before plan
    recipe = _recipe("tiny-paligemma2", batch_size=65536, grad_accum=65536)  # 2**32 in range per key
    with pytest.raises(ValueError, match="too large to split"):
        suggest_micro_batch(recipe, family_of(recipe), memory=2**40, device="cuda")
    # A prime: only 1 and itself divide it; found by bisection over two divisors.
    recipe = _recipe("tiny-paligemma2", batch_size=65521)
    micro, accum, _ = suggest_micro_batch(recipe, family_of(recipe), memory=2**35, device="cuda")
    assert (micro, accum) == (1, 65521)


def test_cli_prints_parts_and_the_fit(capsys):
    from pg_tune.cli import main

    assert main(["plan", "recipes/demo/shapes_tiny.yaml", "--memory", "1TB", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for part in ("base weights", "LoRA weights", "optimizer states", "activations", "loss head chunk"):
        assert part in out
    assert "fits in 1TB: train.batch_size=" in out and "estimate" in out and "exact" in out
    assert main(["plan", "recipes/demo/shapes_tiny.yaml", "--memory", "1MB", "--device", "cpu"]) == 1
    assert "does not fit in 1MB" in capsys.readouterr().out
