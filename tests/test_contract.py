"""The family contract: every registered model family x every row of the support matrix, as a user runs it.

For each family of the registry (``family_names()``, plus ``StandInFamily`` below, registered only in
this module) the contract takes the family's first tiny preset (``tiny_presets[0]``) and one mixed
dataset holding every task the family supports, built from the shipped real-format samples
(``data_formats/samples``: COCO captions, a VQA/OCR JSONL, DocVQA, COCO detection, RefCOCO), and runs
the command line: ``pg_tune.cli.main`` in this process, ``python -c`` launches where a process must
die or its peak memory is measured.

| row of the support matrix | test |
|---|---|
| training: the loss falls; in-training and final evaluation report every task's metrics | ``test_training_learns_and_evaluates_every_task`` |
| ``pg-tune eval`` of the saved adapter = training's final evaluation; re-scoring its predictions = the same | ``test_eval_and_rescoring_reproduce_training`` |
| the family's parser reads back what it renders: right answers score perfectly | ``test_right_answers_score_perfectly`` |
| ``pg-tune predict`` answers and draws each task | ``test_predict_answers_and_draws`` |
| methods: LoRA on the decoder and the vision tower (the shared run), DoRA, full, partial | ``test_training_...``, ``test_methods_train`` |
| QLoRA (4-bit base from a checkpoint on disk) | ``test_qlora_trains_from_a_checkpoint`` |
| ``pg-tune export``, streamed (default) and ``--parity full``; the folder loads with transformers alone | ``test_export_loads_with_transformers_alone`` |
| the model card's code runs on the export and builds the family's own inputs | ``test_model_card_snippet_runs`` |
| SIGKILL, then ``--resume auto``: bitwise equal to an uninterrupted run | ``test_sigkill_then_resume_is_bitwise`` |
| the model sees the image: two images give different logits | ``test_different_images_give_different_logits`` |
| batched generation = one sample at a time | ``test_batched_generation_equals_one_by_one`` |
| ``data.feature_cache``: same loss as from pixels, or refused by ``validate`` | ``test_feature_cache_or_refusal`` |
| ``pg-tune plan`` within +-20% of the measured peak | ``test_plan_within_20_percent_of_the_peak`` |
| FSDP (``recipes/accelerate/fsdp.yaml``) wraps each decoder and vision layer | ``test_fsdp_wraps_each_layer`` |
| ``pg-tune serve`` of the run: each task's chat completion = ``pg-tune predict``'s answer and objects | ``test_served_run_answers_as_predict_does`` |
| DPO (``train.objective: dpo``) on JSONL preference pairs: ln 2 at the start, the loss falls | ``test_dpo_prefers_the_chosen_answers`` |
| a task the family cannot do: refused by ``pg-tune validate``, ``data validate`` and ``predict`` | ``test_unsupported_task_is_refused`` |

A new family gets all of this by registering (one line in ``pg_tune/models/family.py``'s ``_REGISTRY``):
nothing here names a family. What a family cannot do is either refused by name (a task
outside ``family.tasks``, a feature cache of variable-length image features) or skipped with the
reason shown.

Cost: each family's rows share one trained run (module-scoped fixtures, 3 full-batch steps of the
tiny preset); the runs that take a model or a process are marked ``slow``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

from pg_tune.cli import main
from pg_tune.models import family as family_module
from pg_tune.models.family import family_names, load_family
from pg_tune.models.paligemma import PaliGemmaFamily
from pg_tune.models.paligemma import tiny as paligemma_tiny
from pg_tune.models.tiny import init_random, write_checkpoint
from pg_tune.tasks import PRIMARY_METRIC, TASKS
from pg_tune.train.signals import KILL_AFTER_CHECKPOINT_ENV
from tests.numerics import VOCAB_SUM_REL, assert_close_to_scale

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_formats" / "samples"


# ---- a fourth family, registered in this module only -------------------------------------------
#
# A genuinely new family implements, in its own folder under pg_tune/models/ (docs/architecture.md,
# "How to add a model family"):
#   - the class attributes: name, model_types, tiny_presets, tiny_module, tasks, modules (ModulePaths),
#     lm_layers, vision_layers, projector_linears, attention_inputs, image_inputs, final_softcap,
#     cacheable_image_features, model_class, processor_class, hub_tags, name_hints, refused_hints;
#   - the abstract methods: reserved_tokens, render_prompt, render_target, collator (its Collator),
#     generation_kwargs, decode, parse_output, reference_batch, usage_snippet;
#   - what of the shared behaviour differs (image_features, decoder_hidden, load_processor, ...);
#   - a tiny-preset module (PRESETS, build_config, build_base, build_processor, save_checkpoint);
#   - one line in _REGISTRY, its recipes, and its golden tests (sequence vs the processor, loss vs
#     the model's own loss, generation vs training logits).
# The stand-in reuses PaliGemma's sequence and parsing (a PaliGemma under another model_type and
# classes), so what it shows is the other half: a family the generic code has never seen is found
# by its preset, its checkpoints and adapters, and passes every row below by registering.


class StandInConfig(PaliGemmaConfig):
    model_type = "pg_tune_standin"


class StandInForConditionalGeneration(PaliGemmaForConditionalGeneration):
    config_class = StandInConfig


class StandInTiny:
    """The stand-in's tiny presets (a family's ``tiny_module``): PaliGemma 2's tiny preset, own classes."""

    PRESETS = {"tiny-standin": paligemma_tiny.PRESETS["tiny-paligemma2"]}

    @staticmethod
    def build_config(preset) -> StandInConfig:
        config = paligemma_tiny.build_config(preset).to_dict()
        config.pop("model_type")
        return StandInConfig(**config)

    @staticmethod
    def build_processor(preset):
        return paligemma_tiny.build_processor(preset)

    @classmethod
    def build_base(cls, preset_name: str, seed: int = 0) -> StandInForConditionalGeneration:
        return init_random(StandInForConditionalGeneration, cls.build_config(cls.PRESETS[preset_name]), seed)

    @classmethod
    def save_checkpoint(cls, preset_name: str, out_dir, seed: int = 0) -> Path:
        processor = cls.build_processor(cls.PRESETS[preset_name])
        return write_checkpoint(cls.build_base(preset_name, seed), processor, out_dir)


class StandInFamily(PaliGemmaFamily):
    """A fourth family: what the registry, the loaders and export see of it is its own."""

    name = "standin"
    model_types = ("pg_tune_standin",)
    tiny_module = StandInTiny
    tiny_presets = tuple(StandInTiny.PRESETS)
    model_class = StandInForConditionalGeneration
    hub_tags = ()
    name_hints = ()


CONTRACT_FAMILIES = [*family_names(), StandInFamily.name]
"""Every registered family, and the stand-in (registered by ``stand_in_registered``)."""

# A child process registers the stand-in the same way, then runs the command line.
LAUNCHER = f"""
import sys
from pg_tune.models import family
family._REGISTRY[{StandInFamily.name!r}] = "tests.test_contract:StandInFamily"
from pg_tune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module", autouse=True)
def stand_in_registered():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(family_module._REGISTRY, StandInFamily.name, f"{__name__}:StandInFamily")
        yield


def pg_tune_process(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``pg-tune ARGS`` in a child process (this checkout's pg_tune, the stand-in registered), its
    output to ``log`` (a file, not a pipe: a full pipe would stall the child)."""
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, *args],
            cwd=REPO,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                **(env or {}),
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    process.log = log
    return process


def wait(process: subprocess.Popen) -> tuple[str, int, int | None]:
    """Output, exit status (negative: the signal) and peak resident memory in bytes of a child process.

    The peak is the child's own ``VmHWM``, read while it runs (a high-water mark, so the last read is
    the peak up to then): ``ru_maxrss`` would count the test process it was forked from.
    """
    status_file, peak = Path(f"/proc/{process.pid}/status"), None
    while process.poll() is None:
        try:
            line = next(x for x in status_file.read_text().splitlines() if x.startswith("VmHWM:"))
            peak = int(line.split()[1]) * 1024  # kB
        except (OSError, StopIteration):
            pass
        time.sleep(0.05)
    return process.log.read_text(), process.returncode, peak


# ---- one mixed dataset per family: every task it supports, from the shipped samples -------------

TEXT_ROWS = {
    "vqa": [
        ("coco_detection/images/000000000139.png", "answer en what colour is the cat?", "red"),
        ("coco_detection/images/000000000285.png", "answer en what animal is it?", "dog"),
    ],
    "ocr": [("docvqa/documents/xnbl0037_1.png", "ocr", "1/8/93")],
}


def task_entry(task: str, split: str, folder: Path) -> dict:
    """The dataset entry (real format, shipped sample) holding ``task``'s rows for ``split``."""
    if task == "caption":
        return {
            "format": "coco_captions",
            "annotations": str(SAMPLES / "coco_captions" / "captions_val2017.json"),
            "images": str(SAMPLES / "coco_captions" / "images"),
            "limit": 2,
        }
    if task in TEXT_ROWS:
        path = folder / f"{task}.jsonl"
        rows = [
            {"image": str(SAMPLES / image), "prefix": prefix, "suffix": suffix, "task": task}
            for image, prefix, suffix in TEXT_ROWS[task]
        ]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return {"format": "jsonl", "path": str(path)}
    if task == "docvqa":
        return {
            "format": "docvqa",
            "annotations": str(SAMPLES / "docvqa" / "val_v1.0.json"),
            "images": str(SAMPLES / "docvqa"),
            "limit": 2,
        }
    if task == "detect":
        return {
            "format": "coco_detection",
            "annotations": str(SAMPLES / "coco_detection" / "instances_val2017.json"),
            "images": str(SAMPLES / "coco_detection" / "images"),
        }
    if task in ("refer_detect", "refer_segment"):
        return {
            "format": "refcoco",
            "refs": str(SAMPLES / "refcoco" / "refs(unc).p"),
            "instances": str(SAMPLES / "refcoco" / "instances.json"),
            "images": str(SAMPLES / "refcoco" / "images"),
            "split": "train" if split == "train" else "val",
            "task": "detect" if task == "refer_detect" else "segment",
        }
    raise AssertionError(f"the contract has no data for task {task}: add it here")


class Workspace:
    """One family's preset, folder, mixed-task recipe and the shared runs trained from it."""

    def __init__(self, name: str, root: Path):
        from pg_tune.models.paligemma.masks import make_random_vae_weights, save_npz

        self.family = load_family(name)
        self.preset = self.family.tiny_presets[0]
        self.root = root
        self.tasks = [t for t in TASKS if t in self.family.tasks]
        # Mask tokens need big_vision's VQ-VAE; random weights in its layout (families without masks ignore it).
        self.vae = save_npz(make_random_vae_weights(0), root / "vae.npz")
        self.recipe = self.write_recipe("recipe.yaml", root / "run")

    def recipe_dict(self, output_dir: Path, tasks: list[str] | None = None) -> dict:
        tasks = self.tasks if tasks is None else tasks
        return {
            "output_dir": str(output_dir),
            "model": {"name_or_path": self.preset, "vae_path": str(self.vae), "dtype": "float32"},
            # On the vision tower too: its adapters learn only if gradients reach the image path.
            "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "targets": "attention_mlp", "vision": True},
            "data": {
                "train": [task_entry(t, "train", self.root) for t in tasks],
                "eval": [task_entry(t, "eval", self.root) for t in tasks],
                "max_text_length": 48,
            },
            # One batch holds every training row, so each step sees the same data: the loss must fall.
            "train": {
                "max_steps": 3,
                "batch_size": 16,
                "lr": 3e-3,
                "warmup_ratio": 0.0,
                "scheduler": "constant",
                "log_every": 1,
                "save_every": 1,
                "keep_last": 3,
            },
            "eval": {"every": 2, "before_training": False, "batch_size": 16, "max_new_tokens": 8},
        }

    def write_recipe(self, name: str, output_dir: Path, tasks: list[str] | None = None, **sections) -> Path:
        recipe = self.recipe_dict(output_dir, tasks)
        for key, value in sections.items():
            recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
        path = self.root / name
        path.write_text(yaml.safe_dump(recipe))
        return path

    def eval_samples(self):
        from pg_tune.config import load_recipe
        from pg_tune.data.bad_rows import BadRows
        from pg_tune.data.build import build_samples

        recipe, _ = load_recipe(str(self.recipe), [])
        return list(build_samples(recipe.data.eval, "eval", BadRows(), family=self.family))


@pytest.fixture(scope="module", params=CONTRACT_FAMILIES)
def workspace(request, tmp_path_factory, stand_in_registered) -> Workspace:
    return Workspace(request.param, tmp_path_factory.mktemp(f"contract-{request.param}"))


@pytest.fixture(scope="module")
def runs(workspace):
    """The shared LoRA run (``pg-tune train`` in this process) and, at the same time in a child
    process, the same recipe SIGKILLed right after step 2's checkpoint, whose peak memory the
    ``plan`` row compares with the plan (``test_sigkill_then_resume_is_bitwise`` resumes it)."""
    crashed_recipe = workspace.write_recipe("crashed.yaml", workspace.root / "crashed")
    crash = pg_tune_process(
        "train", str(crashed_recipe), log=workspace.root / "crashed.log", env={KILL_AFTER_CHECKPOINT_ENV: "2"}
    )
    assert main(["train", str(workspace.recipe)]) == 0
    crash_out, crash_status, peak = wait(crash)
    assert crash_status == -signal.SIGKILL, crash_out[-6000:]
    return {"run": workspace.root / "run", "peak_rss": peak, "crashed": crashed_recipe}


def records(run: Path) -> list[dict]:
    """``metrics.jsonl`` without the wall-clock throughput."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in lines]


def expected_counts(workspace: Workspace) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sample in workspace.eval_samples():
        counts[sample.task] = counts.get(sample.task, 0) + 1
    return counts


# ---- training, evaluation, re-scoring -------------------------------------------------------------


@pytest.mark.slow
def test_training_learns_and_evaluates_every_task(workspace, runs):
    logged = records(runs["run"])
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    evaluations = [r for r in logged if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evaluations] == [2, 3]  # eval.every=2, then the final evaluation
    counts = expected_counts(workspace)
    assert sorted(counts) == sorted(workspace.tasks)
    for evaluation in evaluations:
        for task in workspace.tasks:
            assert f"eval/{PRIMARY_METRIC[task]}" in evaluation, task
            assert evaluation[f"eval/{task}/count"] == counts[task], task
    # LoRA's B matrices start at zero: after training, those on the vision tower moved too.
    adapter = load_file(runs["run"] / "adapter" / "adapter_model.safetensors")
    vision = [k for k in adapter if f".{workspace.family.modules.vision}." in k and "lora_B" in k]
    assert vision and all(adapter[k].abs().max() > 0 for k in vision)
    summary = json.loads((runs["run"] / "summary.json").read_text())
    assert summary["metrics_after"] == {
        k.removeprefix("eval/"): v for k, v in evaluations[-1].items() if k != "step"
    }


@pytest.mark.slow
def test_eval_and_rescoring_reproduce_training(workspace, runs, capsys):
    run = runs["run"]
    trained = json.loads((run / "summary.json").read_text())["metrics_after"]
    out = workspace.root / "eval"
    assert main(["eval", str(workspace.recipe), "--model", str(run / "adapter"), "--out", str(out)]) == 0
    evaluated = json.loads((out / "metrics.json").read_text())
    assert evaluated["metrics"] == pytest.approx(trained)
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {line["family"] for line in lines} == {workspace.family.name}
    assert {line["task"] for line in lines} == set(workspace.tasks)
    rescored = workspace.root / "rescored"
    args = ["eval", "--predictions", str(out / "predictions.jsonl"), "--out", str(rescored)]
    assert main([*args, "--vae-path", str(workspace.vae)]) == 0
    assert json.loads((rescored / "metrics.json").read_text())["metrics"] == pytest.approx(trained)
    capsys.readouterr()


def test_right_answers_score_perfectly(workspace, tmp_path):
    """What the family writes for the ground truth, parsed back and scored (no model): every metric
    at its best, through ``pg-tune eval --predictions``. A parser that drops objects, a box read in
    the wrong order or a scorer that always says 0 fails here."""
    from pg_tune.evaluate.predictions import write_predictions
    from pg_tune.evaluate.scoring import score_samples

    family = load_family(workspace.preset, workspace.vae)
    samples = workspace.eval_samples()
    answers = [family.render_target(s) if s.targets else (s.references or (s.suffix,))[0] for s in samples]
    scored = score_samples(samples, answers, family)
    path = write_predictions(tmp_path / "predictions.jsonl", scored.records)
    assert main(["eval", "--predictions", str(path), "--vae-path", str(workspace.vae)]) == 0
    metrics = json.loads((tmp_path / "rescored" / "metrics.json").read_text())["metrics"]
    assert metrics == pytest.approx(scored.metrics)
    perfect = {
        "caption": "caption/exact_match",
        "vqa": "vqa/exact_match",
        "docvqa": "docvqa/anls",
        "ocr": "ocr/anls",
        "detect": "detect/map_50",
        "refer_detect": "refer_detect/acc@0.75",
        "refer_segment": "refer_segment/acc@0.75",  # masks go through a random VQ-VAE: boxes only
    }
    for task in workspace.tasks:
        assert metrics[perfect[task]] == 1.0, (task, metrics)
    if "detect" in workspace.tasks:
        assert metrics["detect/map"] > 0.9  # quantised boxes on 64-96 px images: IoU > 0.9


# ---- predict --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_predict_answers_and_draws(workspace, runs, task, tmp_path, capsys, monkeypatch):
    """``pg-tune predict --draw`` with the trained adapter on one image of the task (real generation).

    A 3-step model writes no box worth drawing, so for box tasks the generated text is then replaced
    by the family's own rendering of the ground truth (as a trained model would write it): ``predict``
    must read back every object at its true place and draw it.
    """
    from pg_tune.data.images import load_image
    from pg_tune.evaluate import generate as generate_module

    if task not in workspace.tasks:
        pytest.skip(f"{workspace.family.name} does not do {task}: test_unsupported_task_is_refused")
    sample = next(s for s in workspace.eval_samples() if s.task == task)
    image = tmp_path / "image.png"
    load_image(sample.image, sample.source).save(image)
    drawn = tmp_path / "drawn.png"
    truth = load_family(workspace.preset, workspace.vae).render_target(sample) if sample.targets else None
    if truth is not None:
        generate = generate_module.generate_with_logprobs

        def writes_the_truth(*args, **kwargs):
            generated = generate(*args, **kwargs)  # the real model runs; its answer is replaced
            return [type(g)(truth, (0.0,), ((0, len(truth)),)) for g in generated]

        monkeypatch.setattr(generate_module, "generate_with_logprobs", writes_the_truth)
    args = [
        "predict",
        "--model",
        str(runs["run"] / "adapter"),
        "--image",
        str(image),
        "--prompt",
        sample.prefix,
    ]
    args += ["--task", task, "--draw", str(drawn), "--max-new-tokens", "8", "--vae-path", str(workspace.vae)]
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out  # the raw answer, then the JSON record
    answer = json.loads(printed[printed.index('{\n  "model"') :])
    assert answer["family"] == workspace.family.name and answer["task"] == task
    assert isinstance(answer["prediction"], str) and isinstance(answer["objects"], list)
    assert Image.open(drawn).size == Image.open(image).size
    if truth is None:
        return
    expected = [list(o.box) for o in sample.targets]
    if task != "detect":
        expected = expected[:1]  # referring: the first object (big_vision's rule)
    boxes = [o["box"] for o in answer["objects"]]
    assert len(boxes) == len(expected)
    for got, want in zip(boxes, expected, strict=True):
        assert max(abs(g - w) for g, w in zip(got, want, strict=True)) <= 1.0  # quantised to 1/1000
    assert Image.open(drawn).tobytes() != Image.open(image).convert("RGB").tobytes()  # boxes drawn


# ---- methods --------------------------------------------------------------------------------------

METHODS = {
    "dora": ["lora.use_dora=true"],
    "full": ["method=full"],
    "partial": ["method=partial", "partial.groups=[attention,projector]"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_train(workspace, method, capsys):
    out = workspace.root / f"method-{method}"
    overrides = [f"output_dir={out}", "data.eval=[]", "train.save_every=null", *METHODS[method]]
    assert main(["train", str(workspace.recipe), *overrides]) == 0
    losses = [r["loss"] for r in records(out) if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    family = workspace.family
    if method == "dora":
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
        return
    # full / partial write a whole model that transformers loads alone; what trained moved, the rest did not.
    model = family.model_class.from_pretrained(out / "model")
    base = family.tiny_module.build_base(workspace.preset)
    before = dict(base.named_parameters())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    language = family.modules.language_model + "."
    vision = family.modules.vision + "."
    projector = family.modules.projector + "."
    assert moved and not any(n.startswith(vision) for n in moved)
    assert any(n.startswith(projector) for n in moved)
    if method == "partial":  # attention projections and the projector only
        assert all(n.startswith(projector) or ".self_attn." in n for n in moved), sorted(moved)
    else:
        assert any(n.startswith(language) and ".mlp." in n for n in moved)
    capsys.readouterr()


@pytest.mark.slow
def test_qlora_trains_from_a_checkpoint(workspace, capsys):
    """4-bit base (every decoder linear quantized; vision, projector and head kept), trained, then
    exported: merged into the full-precision base."""
    import re

    pytest.importorskip("bitsandbytes")
    family = workspace.family
    checkpoint = family.save_tiny(workspace.preset, workspace.root / "checkpoint")
    out = workspace.root / "qlora"
    overrides = [f"output_dir={out}", f"model.name_or_path={checkpoint}", "quantization.mode=4bit"]
    overrides += ["quantization.bnb_4bit_compute_dtype=float32", "data.eval=[]", "train.save_every=null"]
    assert main(["train", str(workspace.recipe), *overrides]) == 0
    quantized = int(
        re.search(r"quantization: (\d+) linear layers quantized", capsys.readouterr().out).group(1)
    )
    with torch.device("meta"):
        model = family.model_class(family.model_class.config_class.from_pretrained(checkpoint))
    decoder = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and re.match(family.lm_layers, n)
    ]
    assert quantized == len(decoder) > 0
    losses = [r["loss"] for r in records(out) if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    merged = workspace.root / "qlora-merged"
    assert main(["export", str(out), "--out", str(merged), "--dtype", "fp32"]) == 0
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert not any("lora" in n for n, _ in load_alone(family, merged)[0].named_parameters())
    capsys.readouterr()


# ---- export ---------------------------------------------------------------------------------------


def load_alone(family, folder: Path):
    """The exported folder through transformers only: the family's model and processor classes."""
    model = family.model_class.from_pretrained(folder).eval()
    try:
        processor = family.processor_class.from_pretrained(folder)
    except ImportError as e:  # SmolVLMProcessor's video part needs torchvision; images do not
        from transformers import AutoImageProcessor, AutoTokenizer

        assert "Torchvision" in str(e) or "torchvision" in str(e), e
        processor = None
        AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    return model, processor


@pytest.fixture(scope="module")
def exports(workspace, runs):
    """The shared run exported both ways: streamed (the default) and ``--parity full``."""
    folders = {"streamed": workspace.root / "export-streamed", "full": workspace.root / "export-full"}
    run = str(runs["run"])
    assert main(["export", run, "--out", str(folders["streamed"]), "--dtype", "fp32"]) == 0
    assert main(["export", run, "--out", str(folders["full"]), "--dtype", "fp32", "--parity", "full"]) == 0
    return folders


@pytest.mark.slow
def test_export_loads_with_transformers_alone(workspace, runs, exports):
    import peft

    from pg_tune.config.recipe import ModelConfig

    family = workspace.family
    for kind, folder in exports.items():
        report = json.loads((folder / "export_report.json").read_text())
        assert json.loads((folder / "config.json").read_text())["model_type"] == family.model_types[0]
        assert (folder / "README.md").is_file() and report, kind
    merged = {kind: load_alone(family, folder)[0] for kind, folder in exports.items()}
    # Both merges equal base + adapter on a real sample (peft on the base, as a user would check).
    base = family.load_model(ModelConfig(workspace.preset, dtype="float32"))
    reference = peft.PeftModel.from_pretrained(base, runs["run"] / "adapter").eval()
    processor = family.load_processor(ModelConfig(workspace.preset))
    batch = family.collator(processor, 48, train=False)([(0, workspace.eval_samples()[0])])
    inputs = family.generation_inputs(batch, torch.float32)
    with torch.no_grad():
        expected = reference(**inputs).logits
        for kind, model in merged.items():
            assert_close_to_scale(model(**inputs).logits, expected, msg=kind)


@pytest.mark.slow
def test_model_card_snippet_runs(workspace, exports):
    """The model card's code, run as written on the exported folder, loads it; where it builds model
    inputs they are the family's own (Gemma 3: one <bos>, though its tokenizer adds one itself)."""
    import re

    import transformers

    from pg_tune.config.recipe import ModelConfig
    from pg_tune.data.images import load_image

    family = workspace.family
    folder = exports["streamed"]
    if getattr(transformers, family.model_class.__name__, None) is not family.model_class:
        pytest.skip(f"{family.model_class.__name__} is not in transformers: the card's import cannot name it")
    try:
        family.processor_class.from_pretrained(folder)
    except ImportError as e:
        pytest.skip(f"{family.processor_class.__name__} cannot load here: {str(e).strip().splitlines()[0]}")
    card = family.usage_snippet(None, str(folder), merged=True)
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    sample = next(s for s in workspace.eval_samples() if s.task == "caption")
    scope = {"image": load_image(sample.image, sample.source), "PROMPT": family.render_prompt(sample)}
    exec(code, scope)  # the card's code, as a user pastes it
    assert isinstance(scope["model"], family.model_class)
    if "inputs" in scope:
        processor = family.load_processor(ModelConfig(str(folder)))
        ours = family.collator(processor, 48, train=False)([(0, sample)])
        assert scope["inputs"]["input_ids"].tolist() == ours["input_ids"].tolist()


# ---- resume ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise(workspace, runs, capsys):
    crashed = workspace.root / "crashed"
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    assert main(["train", str(runs["crashed"]), "--resume", "auto"]) == 0
    assert "resuming from" in capsys.readouterr().out
    expected = load_file(runs["run"] / "adapter" / "adapter_model.safetensors")
    got = load_file(crashed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert records(crashed) == records(runs["run"])


# ---- the image path -------------------------------------------------------------------------------


def _two_images(workspace):
    from pg_tune.config.recipe import ModelConfig
    from pg_tune.data.sample import Sample

    family = workspace.family
    processor = family.load_processor(ModelConfig(workspace.preset))
    model = family.load_model(ModelConfig(workspace.preset, dtype="float32")).eval()
    noise = Image.effect_noise((64, 48), 80).convert("RGB")
    black = Image.new("RGB", (64, 48))
    samples = [Sample(image, "caption en", "", f"image {k}") for k, image in enumerate((noise, black))]
    return family, processor, model, samples


def test_different_images_give_different_logits(workspace):
    family, processor, model, samples = _two_images(workspace)
    collator = family.collator(processor, 48, train=False)
    with torch.no_grad():
        logits = [
            model(**family.generation_inputs(collator([(0, s)]), torch.float32)).logits[0, -1]
            for s in samples
        ]
    scale = float(logits[0].abs().max())
    # Far beyond what summation order could move them: the image's features reach the next token.
    assert float((logits[0] - logits[1]).abs().max()) > 10 * VOCAB_SUM_REL * scale


def test_padding_to_a_multiple_adds_only_ignored_positions(workspace):
    """``data.pad_to_multiple_of``: the batch widens to the multiple with pad positions that are
    masked, unlabelled and change neither the loss nor its token count."""
    from pg_tune.train.loss import SuffixLoss

    family, processor, model, images = _two_images(workspace)
    # Targets of two lengths: the shorter row is padded within the batch already.
    targets = ("a noisy picture of many colours", "black")
    batch = [
        (k, dataclasses.replace(s, suffix=t)) for k, (s, t) in enumerate(zip(images, targets, strict=True))
    ]
    tight = family.collator(processor, 48, train=True)(batch)
    longest = tight["input_ids"].shape[1]
    assert int(tight["attention_mask"].sum(1).max()) == longest  # pad_to_multiple_of=1: the longest row
    multiple = longest + 3  # never already a multiple: three padding columns
    wide = family.collator(processor, 48, train=True, pad_to_multiple_of=multiple)(batch)
    assert wide["input_ids"].shape[1] == multiple
    assert (
        family.collator(processor, 48, train=True, pad_to_multiple_of=8)(batch)["input_ids"].shape[1] % 8 == 0
    )
    for key, value in tight.items():
        if value.ndim == 2 and value.shape[1] == longest:  # the per-position inputs
            assert torch.equal(wide[key][:, :longest], value), key
            extra = wide[key][:, longest:]
            expected = {"attention_mask": 0, "labels": -100, "input_ids": processor.tokenizer.pad_token_id}
            assert (extra == expected.get(key, 0)).all(), key
        else:
            assert torch.equal(wide[key], value), key
    loss = SuffixLoss(model, family).eval()
    with torch.no_grad():
        (tight_sum, tight_count), (wide_sum, wide_count) = loss(tight), loss(wide)
    assert int(wide_count) == int(tight_count) > 0
    assert_close_to_scale(wide_sum, tight_sum, VOCAB_SUM_REL)


@pytest.mark.slow
def test_batched_generation_equals_one_by_one(workspace):
    """Left padding, attention-rule inputs and image padding do not change what each row generates."""
    from pg_tune.evaluate.generate import generate

    family, processor, model, _ = _two_images(workspace)
    one_per_task = {s.task: s for s in reversed(workspace.eval_samples())}
    samples = list(one_per_task.values())[:4]
    # Tiny random models echo their input; a random final norm makes greedy outputs long, arbitrary
    # and input-dependent, so a padding / mask / token-type leak would show.
    torch.manual_seed(0)
    torch.nn.init.normal_(model.get_submodule(family.modules.language_model + ".norm").weight, std=2.0)
    kwargs = {"max_text_length": 48, "max_new_tokens": 6}
    batched = generate(model, processor, samples, family, batch_size=4, **kwargs)
    one_by_one = [generate(model, processor, [s], family, batch_size=1, **kwargs)[0] for s in samples]
    assert batched == one_by_one
    assert any(batched)


def test_fsdp_wraps_each_layer(workspace):
    """``recipes/accelerate/fsdp.yaml`` names no layer class: the FSDP plugin accelerate builds from it,
    given the family's layer classes before ``prepare``, wraps every decoder and vision encoder layer
    of the module pg_tune prepares (``SuffixLoss``). One process: FSDP itself needs several GPUs."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from pg_tune.config.recipe import ModelConfig
    from pg_tune.train.loss import SuffixLoss
    from pg_tune.train.sharding import wrap_family_layers

    launch = yaml.safe_load((REPO / "recipes" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    assert "fsdp_transformer_layer_cls_to_wrap" not in launch
    family = workspace.family
    model = family.load_model(ModelConfig(workspace.preset, dtype="float32"))
    config = model.config
    layers = config.get_text_config().num_hidden_layers + config.vision_config.num_hidden_layers

    def wrapped(name_layers: bool) -> list[str]:
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=1, auto_wrap_policy=launch["fsdp_auto_wrap_policy"]
        )
        accelerator = SimpleNamespace(
            distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin)
        )
        if name_layers:
            wrap_family_layers(accelerator, model, family)
        prepared = SuffixLoss(model, family)
        plugin.set_auto_wrap_policy(prepared)  # what accelerator.prepare does with it
        policy = plugin.auto_wrap_policy
        return [n for n, m in prepared.named_modules() if policy(module=m, recurse=False, nonwrapped_numel=0)]

    assert wrapped(name_layers=False) == []  # accelerate alone finds no _no_split_modules on the wrapper
    assert len(wrapped(name_layers=True)) == layers


# ---- what not every family can do -----------------------------------------------------------------


@pytest.mark.slow
def test_served_run_answers_as_predict_does(workspace, runs, tmp_path, capsys):
    """``pg-tune serve RUN`` (a child process): for one image of every task, the OpenAI-style chat
    completion at temperature 0 says what ``pg-tune predict`` says, reads the same task from the prompt
    (``docvqa`` rows' ``answer en ...`` reads as ``vqa``) and carries the same objects."""
    import re

    import httpx

    from pg_tune.data.images import load_image

    server = pg_tune_process(
        "serve", str(runs["run"]), "--host", "127.0.0.1", "--port", "0", "--max-tokens", "8",
        log=tmp_path / "serve.log", env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        deadline, url = time.monotonic() + 300, None
        while url is None and server.poll() is None and time.monotonic() < deadline:
            text = server.log.read_text()
            found = re.search(r"at (http://127\.0\.0\.1:\d+)\n", text)
            url = found.group(1) if found and "Application startup complete" in text else None
            time.sleep(0.1)
        assert url is not None, server.log.read_text()[-3000:]
        samples = {}
        for sample in workspace.eval_samples():
            samples.setdefault(sample.task, sample)
        assert set(samples) == set(workspace.tasks)
        for task, sample in samples.items():
            image = tmp_path / f"{task}.png"
            load_image(sample.image, sample.source).save(image)
            capsys.readouterr()
            assert main(
                ["predict", "--model", str(runs["run"] / "adapter"), "--image", str(image), "--prompt",
                 sample.prefix, "--max-new-tokens", "8", "--vae-path", str(workspace.vae)]
            ) == 0  # fmt: skip
            printed = capsys.readouterr().out
            predicted = json.loads(printed[printed.index('{\n  "model"') :])
            content = [
                {"type": "image_url", "image_url": {"url": _data_url(image)}},
                {"type": "text", "text": sample.prefix},
            ]
            body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8}
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["choices"][0]["message"]["content"] == predicted["prediction"], task
            assert answer["pg_tune"]["task"] == predicted["task"], task  # both read it from the prompt
            served_boxes = [o["box"] for o in answer["pg_tune"]["objects"]]
            assert served_boxes == [o["box"] for o in predicted["objects"]], task
    finally:
        server.kill()
        server.wait(30)


def _data_url(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.slow
def test_dpo_prefers_the_chosen_answers(workspace, tmp_path, capsys):
    """``train.objective: dpo`` on preference pairs (the JSONL pair format): the first step's loss is
    ln 2 (a fresh adapter is its own reference), and the policy learns to prefer the chosen answers."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {
            "image": str(SAMPLES / image),
            "prefix": prefix,
            "chosen": chosen,
            "rejected": rejected,
            "task": "vqa",
        }
        for (image, prefix, chosen), rejected in zip(TEXT_ROWS["vqa"], ("green", "bird"), strict=True)
    ]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "dpo"
    recipe = workspace.write_recipe(
        "dpo.yaml", out,
        data={"train": [{"format": "jsonl", "path": str(pairs)}], "eval": []},
        train={"objective": "dpo", "max_steps": 4, "batch_size": 2, "lr": 1e-2, "save_every": None},
        eval={"every": None, "best_metric": None},
        dpo={"beta": 0.5},
    )  # fmt: skip
    assert main(["train", str(recipe)]) == 0, capsys.readouterr().err
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if "loss" in r]
    assert len(losses) == 4
    ln2 = float(torch.tensor(math.log(2.0)))
    assert abs(losses[0] - ln2) <= 1e-6 * ln2
    assert losses[-1] < losses[0]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_feature_cache_or_refusal(workspace, runs, capsys):
    """Families whose image features have one shape per image train from cached features with the
    same first loss as from pixels; the others are refused by ``pg-tune validate``, by name."""
    overrides = [f"data.feature_cache={workspace.root / 'features'}", "lora.vision=false"]
    if not workspace.family.cacheable_image_features:
        assert main(["validate", str(workspace.recipe), *overrides]) == 2
        error = capsys.readouterr().err
        assert f"model family {workspace.family.name!r}" in error and "data.feature_cache" in error
        supporting = [n for n in CONTRACT_FAMILIES if load_family(n).cacheable_image_features]
        assert "support it: " + ", ".join(sorted(supporting)) in error
        return
    out = workspace.root / "cached"
    overrides += [f"output_dir={out}", "data.eval=[]", "train.max_steps=1", "train.save_every=null"]
    assert main(["train", str(workspace.recipe), *overrides]) == 0
    # Fresh adapters leave the model as it was (B = 0), wherever they sit: the same first loss.
    first = [r["loss"] for r in records(runs["run"]) if "loss" in r][0]
    assert_close_to_scale(torch.tensor(records(out)[0]["loss"]), torch.tensor(first))
    capsys.readouterr()


@pytest.mark.slow
def test_plan_within_20_percent_of_the_peak(workspace, runs, tmp_path):
    """``pg-tune plan --device cpu`` (in its own process: its runtime part is that process's RSS after
    the imports) against the peak RSS of the process that trained the recipe (the SIGKILLed one)."""
    if runs["peak_rss"] is None:
        pytest.skip("the peak RSS of a process is read from /proc (Linux)")
    planned, status, _ = wait(
        pg_tune_process("plan", str(workspace.recipe), "--device", "cpu", log=tmp_path / "plan.log")
    )
    assert status == 0, planned
    expected = next(line for line in planned.splitlines() if line.startswith("expected peak"))
    plan_gb, peak_gb = float(expected.split()[2]), runs["peak_rss"] / 1e9
    print(f"plan {plan_gb:.2f} GB, measured peak RSS {peak_gb:.2f} GB ({plan_gb / peak_gb:.2f}x)")
    assert abs(plan_gb - peak_gb) <= 0.2 * peak_gb, (plan_gb, peak_gb)


def jsonl_rows(task: str) -> list[dict]:
    """Two JSONL rows of ``task`` as users write them (structured objects for detect / segment)."""
    image = str(SAMPLES / "jsonl" / "images" / "000000000139.png")
    if task == "refer_segment":
        polygon = [38, 30, 23, 50, 8, 30, 23, 10]
        return [
            {"image": image, "task": "segment", "objects": [{"label": "red cat", "polygon": polygon}]}
        ] * 2
    if task == "detect":
        return [{"image": image, "task": "detect", "objects": [{"label": "cat", "box": [8, 10, 38, 50]}]}] * 2
    return [{"image": image, "prefix": "x", "suffix": "y", "task": task}] * 2


@pytest.mark.parametrize("task", TASKS)
def test_unsupported_task_is_refused(workspace, task, tmp_path, capsys):
    """A task outside ``family.tasks``: ``validate`` refuses the recipe naming the family and the
    families that support it; ``data validate`` files each row under ``unsupported_task``;
    ``predict`` refuses the task before loading a model."""
    if task in workspace.tasks:
        pytest.skip(f"{workspace.family.name} does {task}: the other rows run it")
    family = workspace.family
    supporting = ", ".join(sorted(n for n in CONTRACT_FAMILIES if task in load_family(n).tasks))
    recipe = workspace.write_recipe(f"unsupported-{task}.yaml", tmp_path / "run", tasks=[task])
    assert main(["validate", str(recipe)]) == 2
    error = capsys.readouterr().err
    assert f"model family {family.name!r} cannot do task {task}" in error
    assert f"families that support it: {supporting}" in error
    # Rows of that task in a JSONL file (its per-row "task"): refused too, and filed under that reason.
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in jsonl_rows(task)))
    entries = {"train": [{"format": "jsonl", "path": str(rows)}], "eval": []}
    jsonl = workspace.write_recipe(f"unsupported-{task}-jsonl.yaml", tmp_path / "run", tasks=[], data=entries)
    assert main(["validate", str(jsonl)]) == 2
    error = capsys.readouterr().err
    assert f"{rows}:1" in error and f"model family {family.name!r} cannot do task {task}" in error
    assert main(["data", "validate", str(jsonl)]) == 1  # bad rows found
    report = capsys.readouterr().out
    assert "unsupported_task: 2" in report and "empty_suffix" not in report
    assert f"families that support it: {supporting}" in report
    image = SAMPLES / "jsonl" / "images" / "000000000139.png"
    args = ["predict", "--model", workspace.preset, "--image", str(image), "--prompt", "x", "--task", task]
    assert main(args) == 2
    assert f"cannot do task {task}" in capsys.readouterr().err
