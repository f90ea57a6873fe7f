"""The recipe: a YAML file turned into small typed sections, validated before anything loads.

Sections: ``model``, ``method`` (with ``lora`` / ``full`` / ``partial``), ``quantization``, ``data``, ``train``
(``train.objective: dpo`` reads ``dpo``), ``eval``, ``logging``, ``hub``, ``output_dir``. Each dataset entry under ``data.train`` / ``data.eval`` names its ``format`` and
carries that format's own keys (see ``data_formats/``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pg_tune.config.datasets import FORMAT_OPTIONS, preference_pairs_problem
from pg_tune.config.schema import ConfigError, coerce, from_dict, to_dict
from pg_tune.tasks import METRIC_NAMES, PREFERENCE_METRIC_NAMES, TASKS


def _at_least(path: str, name: str, value: int | None, low: int, hint: str = "") -> None:
    if value is not None and value < low:
        raise ConfigError(f"{path}.{name}: must be >= {low}, got {value}{hint}")


def _at_most(path: str, name: str, value: int | None, high: int, hint: str = "") -> None:
    """Sizes no run can mean (a batch of 1e21, 1e26 steps) fail here, not as a hang or an overflow later."""
    if value is not None and value > high:
        raise ConfigError(f"{path}.{name}: must be <= {high}, got {value}{hint}")


MAX_STEPS = 10**9
"""Steps, epochs and step intervals: beyond this a run would take decades (and counters leave int64)."""
MAX_BATCH = 65536
"""Micro-batch, accumulation and eval batch sizes, LoRA rank."""
MAX_TEXT_LENGTH = 2**20
MAX_WEIGHT = 1000.0
"""A dataset entry's weight is a repeat factor: each epoch shows every row ``weight`` times."""
MAX_SEED = 2**32 - 1
"""numpy's and torch's seeds are 32-bit (``set_seed`` fails past it)."""


def _finite_in(path: str, name: str, value: float, low: float, high: float, hint: str = "") -> None:
    """``low <= value <= high`` and finite (NaN compares false with everything, so say it)."""
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"{path}.{name}: must be a finite number in [{low:g}, {high:g}], got {value}{hint}")


@dataclass
class ImageConfig:
    """The image-token budget: how many sequence positions each picture takes. Which keys apply
    depends on how the model family's processor makes image tokens; ``pg-tune validate`` refuses the
    others, ``pg-tune data preview`` shows the tokens of each row, ``pg-tune plan`` budgets the
    largest. Unset keys keep the checkpoint's processor settings. (PaliGemma takes none: its count
    is fixed by the checkpoint's resolution, 256 / 1,024 / 4,096 tokens at 224 / 448 / 896 px.)"""

    longest_edge: int | None = None
    """SmolVLM2: resize each image so its longest edge is this many pixels, then cut it into tiles of
    the encoder's size (512 px on 256M/500M) plus a global view; 64 tokens a tile. The released
    2,048 gives up to 4 x 4 tiles + 1 (1,088 tokens); 1,024 at most 2 x 2 + 1 (320)."""
    splitting: bool | None = None
    """SmolVLM2: ``false`` feeds the global view alone (64 tokens a picture, no tiles)."""
    pan_and_scan: bool | None = None
    """Gemma 3: beside the whole image, up to ``max_crops`` crops along the long side of a wide or
    tall picture (documents, OCR), 256 tokens each."""
    max_crops: int | None = None
    """Gemma 3 pan and scan: at most this many crops a picture (the processor's default 4)."""
    min_crop_size: int | None = None
    """Gemma 3 pan and scan: no crop narrower than this many pixels (default 256)."""

    def check(self, path: str) -> None:
        _at_least(path, "longest_edge", self.longest_edge, 1)
        if self.longest_edge is not None and self.longest_edge > 4096:
            raise ConfigError(
                f"{path}.longest_edge: at most 4096 (the processor's bound), got {self.longest_edge}"
            )
        _at_least(path, "max_crops", self.max_crops, 2, " (pan and scan makes 2 crops or none)")
        _at_least(path, "min_crop_size", self.min_crop_size, 1)
        for key in ("max_crops", "min_crop_size"):
            if getattr(self, key) is not None and not self.pan_and_scan:
                raise ConfigError(f"{path}.{key}: applies to pan and scan; set {path}.pan_and_scan: true")

    def settings(self) -> dict[str, Any]:
        """The keys the recipe sets (the others keep the checkpoint's processor settings)."""
        return {k: v for k, v in to_dict(self).items() if v is not None}


@dataclass
class ModelConfig:
    name_or_path: str = "tiny-paligemma2"
    """A hub id (``google/paligemma2-3b-pt-224``), a local directory in the hub's layout, or a
    built-in tiny preset (``tiny-paligemma``, ``tiny-paligemma2``, ``bench-mini``)."""
    revision: str | None = None
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """``auto``: bfloat16 on a GPU that supports it, float32 on CPU. float16 gives NaNs on Gemma."""
    attn_implementation: Literal["eager", "sdpa"] | None = None
    trust_remote_code: bool = False
    """Set only by the ``--trust-remote-code`` flag, never by a recipe: recipes travel with adapters
    (``pg-tune push`` uploads them), so a file must not be able to switch on code execution."""
    vae_path: str | None = None
    """The mask tokenizer of families with one (PaliGemma: big_vision's ``vae-oid.npz``): renders
    segmentation targets for training and decodes predicted masks for evaluation. Without it (and no
    copy in the cache) training refuses segmentation rows and evaluation scores their boxes only."""
    image: ImageConfig = field(default_factory=ImageConfig)
    """The image-token budget (``ImageConfig``): SmolVLM2's longest edge and tiling, Gemma 3's pan and scan."""

    def check(self, path: str) -> None:
        if self.trust_remote_code:
            raise ConfigError(
                f"{path}.trust_remote_code: a recipe cannot switch on remote code (recipes travel with "
                "adapters); remove the key and pass --trust-remote-code on the command line if you "
                "trust the model's code"
            )


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: Literal["attention", "attention_mlp", "all_linear"] = "attention_mlp"
    """Which linear layers of the language model get adapters."""
    vision: bool = False
    """Also adapt the SigLIP encoder's layers (same target set)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter, e.g. ``[multi_modal_projector]``."""
    use_dora: bool = False
    """DoRA (peft): a learned magnitude per output row besides the low-rank direction update.
    Closer to full fine-tuning at low rank; each step costs more (about 1.2-2x on the adapted layers)."""
    use_rslora: bool = False
    """rsLoRA (peft): scale by ``alpha / sqrt(r)`` instead of ``alpha / r``, so high ranks
    (64 and up) still learn; same cost as LoRA."""

    def check(self, path: str) -> None:
        # r is checked by Recipe.check, and only when LoRA is the method.
        _at_least(path, "alpha", self.alpha, 1)
        if not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise ConfigError(
                f"{path}.dropout: must be in [0, 1) (a probability; 0 = off), got {self.dropout}"
            )


TRAIN_METHODS = ("lora", "full", "partial")
PARAMETER_GROUPS = ("attention", "mlp", "llm", "projector", "vision")


@dataclass
class FullConfig:
    """``method: full``: every weight of the language model and the projector trains."""

    vision: bool = False
    """Also train the SigLIP encoder (big_vision's transfers do; costs its weights' optimizer state)."""


@dataclass
class PartialConfig:
    """``method: partial``: only the named groups train, the rest stays frozen."""

    groups: list[Literal["attention", "mlp", "llm", "projector", "vision"]] = field(
        default_factory=lambda: ["attention"]
    )
    """``attention``: the language model's attention projections (big_vision's T4 notebook);
    ``mlp``: its MLPs; ``llm``: the whole language model, embeddings included; ``projector``: the
    image-to-text projection; ``vision``: the SigLIP encoder."""


@dataclass
class QuantizationConfig:
    """bitsandbytes loading of the frozen base (QLoRA). Key names are bitsandbytes' own."""

    mode: Literal["none", "4bit", "8bit"] = "none"
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """``auto``: bfloat16, except on a CPU-only run where the CPU has no fast bf16 kernels (no AVX-512 or
    Arm BF16; ``pg_tune.models.cpu_dtype``), where it is float32: there bf16 ran QLoRA's 4-bit linears
    5.6x (forward) to 80x (forward and backward) slower."""
    quantize_vision_tower: bool = False
    """Also quantize SigLIP (kept in the model dtype by default; see pg_tune/models/quantize.py)."""


@dataclass
class DatasetEntry:
    """One dataset in a mix: its ``format``, a sampling ``weight`` and the format's own options."""

    format: str
    weight: float = 1.0
    options: Any = None


@dataclass
class DataConfig:
    train: list[DatasetEntry] = field(default_factory=list)
    eval: list[DatasetEntry] = field(default_factory=list)
    max_text_length: int = 128
    """Token budget after the image tokens (bos + prefix + "\\n" + suffix + eos). Only the suffix
    is ever truncated; image tokens never are."""
    on_bad_row: Literal["stop", "skip"] = "stop"
    """``stop`` at the first bad row, or ``skip`` it and count it; counts are always printed."""
    max_bad_row_share: float = 0.5
    """Under ``skip``: a run fails (no adapter written) when more than this share of its training rows
    was bad, at build or among the rows read while training; 1 = never for the share. A run that
    trained nothing always fails."""
    num_workers: int = 0
    """DataLoader worker processes decoding and resizing images."""
    shuffle: bool = True
    """Shuffle the training rows (seeded by ``train.seed``). ``false``: every entry in its file
    order, entries one after the other (curricula, debugging, comparing a stream with a table)."""
    pad_to_multiple_of: int = 8
    """Pad each training batch to its longest row rounded up to a multiple of this (1: to the longest
    row). The CPU backend keeps compiled kernels for every matmul shape it has seen (oneDNN's primitive
    cache and more), for the life of the process: at the PaliGemma 2 3B shape in bf16 each new batch length held ~20 MB more,
    so a run over captions of many lengths grew by that much per length (docs/performance.md,
    "Batch lengths"). 8 bounds that to one set of kernels per 8 lengths for at most 7 padding
    positions per row, and is the multiple GPU tensor cores prefer."""
    group_by_length: bool = False
    """Batch rows of similar length (image tokens and text, as the model family lays them out) together: less padding; order stays random."""
    feature_cache: str | None = None
    """Directory caching projected image features when the vision tower is frozen, so training
    skips SigLIP (docs/performance.md says when it pays)."""

    def check(self, path: str) -> None:
        _at_least(path, "max_text_length", self.max_text_length, 1, " (text tokens after the image tokens)")
        _at_most(path, "max_text_length", self.max_text_length, MAX_TEXT_LENGTH)
        _finite_in(
            path, "max_bad_row_share", self.max_bad_row_share, 0, 1, " (a fraction of the training rows)"
        )
        _at_least(path, "num_workers", self.num_workers, 0, " (0 = load in the main process)")
        _at_least(path, "pad_to_multiple_of", self.pad_to_multiple_of, 1, " (1 = pad to the longest row)")
        _at_most(path, "pad_to_multiple_of", self.pad_to_multiple_of, MAX_TEXT_LENGTH)
        if not self.shuffle and self.group_by_length:
            raise ConfigError(
                f"{path}.shuffle: false keeps the rows in file order, {path}.group_by_length reorders "
                "them by length; set one of the two"
            )


@dataclass
class TrainConfig:
    objective: Literal["sft", "dpo"] = "sft"
    """``sft``: cross-entropy on the target (demonstrations). ``dpo``: Direct Preference Optimization
    on pairs, rows with a chosen and a rejected answer (section ``dpo``; README "Preference tuning")."""
    seed: int = 0
    epochs: int = 1
    max_steps: int | None = None
    """Optimizer steps (>= 1); overrides ``epochs`` when set. Unset (null) trains by ``epochs``."""
    batch_size: int = 8
    """Per-process micro-batch."""
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """``auto``: bf16 autocast where the GPU supports it, none on CPU."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """``adamw_8bit`` / ``paged_adamw_8bit``: bitsandbytes' 8-bit states (paged: spill to CPU under
    GPU memory pressure)."""
    gradient_checkpointing: bool = False
    compile: bool = False
    """Compile each decoder layer with ``torch.compile`` (inductor; shapes dynamic, as batches vary in
    length): fused elementwise work, slower first steps while it compiles (docs/performance.md)."""
    log_every: int = 10
    save_every: int | None = None
    """Write a checkpoint under ``checkpoints/`` every N (>= 1) optimizer steps; unset: none."""
    keep_last: int = 2
    """Checkpoints kept besides the best one (see ``eval.best_metric``)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (PyTorch's definition: ``eps`` spread over the whole vocabulary);
    big_vision tunes it for some transfers. 0 = off."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss or gradient norm: ``stop`` (checkpoint the last good state, name the batch's
    rows, exit non-zero) or ``skip`` the optimizer step and count it."""

    def check(self, path: str) -> None:
        for name in ("batch_size", "grad_accum", "epochs", "log_every", "keep_last"):
            _at_least(path, name, getattr(self, name), 1)
        _at_least(path, "max_steps", self.max_steps, 1, " (leave it unset, or null, to train by epochs)")
        _at_least(path, "save_every", self.save_every, 1, " (leave it unset, or null, for no checkpoints)")
        _at_most(path, "batch_size", self.batch_size, MAX_BATCH, " (the per-process micro-batch)")
        _at_most(path, "grad_accum", self.grad_accum, MAX_BATCH)
        for name in ("epochs", "max_steps", "save_every", "log_every", "keep_last"):
            _at_most(path, name, getattr(self, name), MAX_STEPS)
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(
                f"{path}.seed: must be in [0, {MAX_SEED}] (numpy and torch seeds are 32-bit), got {self.seed}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{path}.lr: must be a finite number > 0, got {self.lr}")
        _finite_in(path, "warmup_ratio", self.warmup_ratio, 0, 1, " (a fraction of the optimizer steps)")
        _finite_in(path, "weight_decay", self.weight_decay, 0, math.inf)
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError(f"{path}.max_grad_norm: must be a finite number > 0, got {self.max_grad_norm}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{path}.label_smoothing: must be in [0, 1), got {self.label_smoothing}")


@dataclass
class DpoConfig:
    """``train.objective: dpo``: learn from (chosen, rejected) answer pairs against a reference model
    (LoRA: the same base with the adapter switched off; ``full`` / ``partial``: a frozen copy)."""

    beta: float = 0.1
    """The implicit reward is ``beta * (log π(answer) - log π_ref(answer))``: a higher beta keeps the
    model closer to the reference. For ``loss: ipo`` it is IPO's τ."""
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """``sigmoid``: DPO, ``-log σ(β·m)`` of the reward margin ``m``; ``ipo``: ``(m' - 1/(2β))²`` with
    ``m'`` the margin of per-token mean log-ratios (as TRL computes it); ``hinge``: ``relu(1 - β·m)``
    (SLiC)."""
    label_smoothing: float = 0.0
    """Conservative DPO (``loss: sigmoid`` only): the probability ε that a pair's preference is flipped,
    ``-(1-ε)·log σ(β·m) - ε·log σ(-β·m)``. In [0, 0.5); 0 = off."""
    sft_weight: float = 0.0
    """RPO: add ``sft_weight`` × the chosen answers' mean token negative log-likelihood, so the chosen
    answer's own likelihood does not fall while the margin grows. 0 = off."""

    def check(self, path: str) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(
                f"{path}.beta: must be a finite number > 0 (0.1 is the usual start), got {self.beta}"
            )
        if not (math.isfinite(self.label_smoothing) and 0.0 <= self.label_smoothing < 0.5):
            raise ConfigError(
                f"{path}.label_smoothing: must be in [0, 0.5) (the probability a pair's label is flipped), "
                f"got {self.label_smoothing}"
            )
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(
                f"{path}.label_smoothing: conservative DPO smooths the sigmoid loss; {path}.loss is {self.loss!r}. "
                f"Set {path}.loss=sigmoid or {path}.label_smoothing=0"
            )
        _finite_in(path, "sft_weight", self.sft_weight, 0, math.inf, " (0 = off; RPO uses about 1)")


@dataclass
class EvalConfig:
    every: int | None = None
    """Evaluate every N optimizer steps (besides before and after training)."""
    before_training: bool = True
    batch_size: int = 8
    max_new_tokens: int = 32
    max_new_tokens_per_task: dict[str, int] = field(default_factory=dict)
    """Budgets per task overriding ``max_new_tokens``, e.g. ``{detect: 128, refer_segment: 24}``."""
    num_beams: int = 1
    limit: int | None = None
    """Evaluate at most this many samples per eval dataset."""
    best_metric: str | None = None
    """Eval metric that names the best checkpoint, kept besides the last ``train.keep_last``, e.g.
    ``caption/exact_match`` (names as printed by evaluation). Evaluated every ``eval.every`` steps."""
    best_mode: Literal["max", "min"] = "max"
    min_delta: float = 0.0
    """An evaluation must beat the best ``best_metric`` by more than this to count as better (for
    the best checkpoint and for ``patience``)."""
    patience: int | None = None
    """Early stopping: stop cleanly after this many evaluations in a row without a better
    ``best_metric``; the best checkpoint is kept. Needs ``best_metric`` and ``every``."""

    def check(self, path: str) -> None:
        for name in ("batch_size", "max_new_tokens", "num_beams"):
            _at_least(path, name, getattr(self, name), 1)
            _at_most(path, name, getattr(self, name), MAX_BATCH)
        _at_most(path, "every", self.every, MAX_STEPS)
        _at_least(
            path, "every", self.every, 1, " (leave it unset, or null, to evaluate before and after only)"
        )
        _at_least(path, "limit", self.limit, 1, " (leave it unset, or null, for every sample)")
        for task, budget in self.max_new_tokens_per_task.items():
            _at_least(f"{path}.max_new_tokens_per_task", task, budget, 1)
        if self.best_metric is not None:
            _check_metric_name(f"{path}.best_metric", self.best_metric)
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ConfigError(f"{path}.min_delta: must be a finite number >= 0, got {self.min_delta}")
        if self.patience is not None:
            if self.patience < 1:
                raise ConfigError(f"{path}.patience: must be >= 1 (or unset), got {self.patience}")
            if not self.best_metric or not self.every:
                raise ConfigError(
                    f"{path}.patience: early stopping watches {path}.best_metric evaluated every {path}.every "
                    "steps; set both"
                )


def _check_metric_name(path: str, name: str) -> None:
    known = [f"{task}/{metric}" for task in TASKS for metric in METRIC_NAMES.get(task, ())]
    known += [f"preference/{metric}" for metric in PREFERENCE_METRIC_NAMES]
    if name not in known:
        task = name.split("/", 1)[0]
        same_task = [k for k in known if k.startswith(task + "/")]
        raise ConfigError(
            f"{path}: no task reports a metric {name!r}"
            + (f" — did you mean {m!r}?" if (m := _closest_name(name, known)) else "")
            + f" (names are task/metric, e.g. {', '.join(same_task or [k for k in known if k.endswith(('/cider', '/map', '/anls'))])})"
        )


@dataclass
class LoggingConfig:
    trackers: list[Literal["wandb", "tensorboard"]] = field(default_factory=list)
    project: str = "pg_tune"
    run_name: str | None = None
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass
class HubConfig:
    """Pushing to the Hugging Face Hub from training (``pg-tune push`` does the same by hand).

    The token is never a recipe key: huggingface_hub reads it from ``HF_TOKEN`` or ``hf auth login``.
    """

    repo_id: str | None = None
    """``OWNER/NAME``; nothing is pushed while unset."""
    private: bool = True
    """Create the repo private (the default, as for ``pg-tune push``); ``false`` makes it public."""
    revision: str | None = None
    """Branch to push to (created if missing); default ``main``."""
    push_at_end: bool = True
    push_checkpoints: bool = False
    """Also push each ``checkpoints/step-N`` folder as it is written (under ``checkpoints/`` in the repo)."""
    merged: bool = False
    """At the end, push merged full-precision weights instead of the adapter."""
    base_model: str | None = None
    """Hub id for the model card's ``base_model`` when ``model.name_or_path`` is a local folder."""
    tags: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    """Hub dataset ids for the model card."""

    def check(self, path: str) -> None:
        if self.repo_id is not None:
            check_repo_id(self.repo_id, f"{path}.repo_id")
        if self.revision is not None:
            check_revision(self.revision, f"{path}.revision")


def check_repo_id(repo_id: str, where: str) -> None:
    """``OWNER/NAME`` as the Hub accepts it (huggingface_hub's own validator); ``where`` names the
    setting (``hub.repo_id``, ``--repo-id``) in the error."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"{where}: expected OWNER/NAME, got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"{where}: {repo_id!r} is not a valid Hub repo id: {e}") from None


_BAD_BRANCH = re.compile(r"(^[-/.])|(/\.)|(\.\.)|([\x00-\x20\x7f~^:?*\[\\])|(//)|(@\{)|([/.]$)|(\.lock(/|$))")


def check_revision(revision: str, where: str) -> None:
    """A branch name git accepts (``git check-ref-format --branch``'s rules): what a push creates."""
    if not revision or revision == "@" or _BAD_BRANCH.search(revision):
        raise ConfigError(
            f"{where}: {revision!r} is not a valid branch name (no spaces, '..', '~^:?*[\\', '@{{', leading "
            "'-' or '.', or trailing '/', '.' or '.lock'), e.g. main or exp-1"
        )


@dataclass
class Recipe:
    output_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Literal["lora", "full", "partial"] = "lora"
    """What trains: ``lora`` adapters (section ``lora``), the ``full`` model (section ``full``), or
    ``partial`` named groups (section ``partial``). See the README's "Training methods"."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    full: FullConfig = field(default_factory=FullConfig)
    partial: PartialConfig = field(default_factory=PartialConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    """Read only with ``train.objective: dpo``."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def check(self, path: str) -> None:
        if not self.data.train:
            raise ConfigError("data.train: at least one dataset entry is needed")
        # The lora section is only read (and only checked) when LoRA is the method.
        if self.method == "lora":
            _at_least("lora", "r", self.lora.r, 1)
            _at_most("lora", "r", self.lora.r, MAX_BATCH)
        if self.method != "lora" and self.quantization.mode != "none":
            raise ConfigError(
                f"method: {self.method!r} trains base weights, which cannot be {self.quantization.mode} "
                "quantized; set quantization.mode=none, or method=lora for QLoRA"
            )
        if self.method == "partial" and not self.partial.groups:
            raise ConfigError(f"partial.groups: name at least one of {', '.join(PARAMETER_GROUPS)}")
        if self.eval.best_metric is not None and not self.data.eval:
            raise ConfigError(
                f"eval.best_metric: {self.eval.best_metric!r} needs an evaluation: add a data.eval dataset "
                "(or remove best_metric)"
            )
        self._check_streaming()
        trains_vision = {
            "lora": ("lora.vision=true", self.lora.vision),
            "full": ("method=full (it trains the projector)", True),
            "partial": (
                f"partial.groups={self.partial.groups}",
                bool({"vision", "projector"} & set(self.partial.groups)),
            ),
        }[self.method]
        if self.data.feature_cache and trains_vision[1]:
            raise ConfigError(
                f"data.feature_cache: {trains_vision[0]} trains what produces the image features, so cached "
                "features would go stale while training; remove data.feature_cache or freeze the vision side"
            )

        self._check_objective()

    def _check_objective(self) -> None:
        """``dpo`` settings only where DPO runs, and DPO only on data that can hold pairs."""
        if self.train.objective == "sft":
            default = DpoConfig()
            for name in ("beta", "loss", "label_smoothing", "sft_weight"):
                if getattr(self.dpo, name) != getattr(default, name):
                    raise ConfigError(
                        f"dpo.{name}: only read with train.objective=dpo, and this recipe trains "
                        "train.objective=sft; set train.objective=dpo, or remove the dpo section"
                    )
            return
        if self.train.label_smoothing:
            raise ConfigError(
                f"train.label_smoothing: smooths the SFT cross-entropy, and train.objective=dpo has none; "
                f"for conservative DPO set dpo.label_smoothing={self.train.label_smoothing} instead"
            )
        for k, entry in enumerate(self.data.train):
            problem = preference_pairs_problem(entry.format, entry.options)
            if problem:
                raise ConfigError(
                    f"data.train[{k}]: train.objective=dpo learns from answer pairs, but {problem}"
                )

    def _check_streaming(self) -> None:
        """What the loader refuses for streamed entries (``pg_tune.data.loader``), refused here first."""
        streamed = [k for k, e in enumerate(self.data.train) if getattr(e.options, "streaming", False)]
        if streamed:
            for name in ("group_by_length", "feature_cache"):
                if getattr(self.data, name):
                    raise ConfigError(
                        f"data.{name}: not available with a streamed training entry (data.train[{streamed[0]}] "
                        "streams): it needs every row up front; turn it off or drop streaming: true"
                    )
        for k, entry in enumerate(self.data.eval):
            if getattr(entry.options, "streaming", False) and entry.options.limit is None:
                raise ConfigError(
                    f"data.eval[{k}].limit: a streamed eval entry needs limit (evaluation reads its first "
                    "limit rows)"
                )

    def ignored_settings(self) -> list[str]:
        """One warning per setting the chosen method (or mode) does not read, e.g.
        ``lora.use_dora=true is ignored by method=full``: set, and silently without effect."""
        warnings = []
        for section, owner in (("lora", "lora"), ("full", "full"), ("partial", "partial")):
            if self.method != owner:
                warnings += [
                    f"{key} is ignored by method={self.method} (only method={owner} reads the {section} section)"
                    for key in _changed(section, getattr(self, section))
                ]
        q = self.quantization
        ignored = ["bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"]
        ignored = (
            ignored + ["quantize_vision_tower"] if q.mode == "none" else ignored if q.mode == "8bit" else []
        )
        warnings += [
            f"{key} is ignored by quantization.mode={q.mode}"
            for key in _changed("quantization", q, only=ignored)
        ]
        if self.eval.best_metric is None:
            warnings += [
                f"{key} is ignored without eval.best_metric (it decides which evaluation is the best)"
                for key in _changed("eval", self.eval, only=["best_mode", "min_delta"])
            ]
        return [f"warning: {w}" for w in warnings]


def _changed(section: str, value: Any, only: list[str] | None = None) -> list[str]:
    """``section.key=value`` for each field of ``value`` that differs from its default."""
    default = type(value)()
    out = []
    for f in dataclasses.fields(value):
        if only is not None and f.name not in only:
            continue
        now = getattr(value, f.name)
        if now != getattr(default, f.name):
            shown = str(now).lower() if isinstance(now, bool) else repr(now)
            out.append(f"{section}.{f.name}={shown}")
    return out


def _parse_dataset_entry(raw: Any, path: str) -> DatasetEntry:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'format' key, got {raw!r}")
    raw = dict(raw)
    fmt = raw.pop("format", None)
    if fmt is None:
        raise ConfigError(
            f"{path}.format: required key is missing (one of {', '.join(sorted(FORMAT_OPTIONS))})"
        )
    if fmt not in FORMAT_OPTIONS:
        raise ConfigError(
            f"{path}.format: unknown dataset format {fmt!r}"
            + (f" — did you mean {m!r}?" if (m := _closest_name(fmt, list(FORMAT_OPTIONS))) else "")
            + f" (known: {', '.join(sorted(FORMAT_OPTIONS))})"
        )
    if "vae_path" in raw:
        raise ConfigError(_VAE_MOVED.format(where=f"{path}.vae_path"))
    # As for every number of a recipe: YAML 1.1 reads `1.0e6` (no sign in the exponent) as a string.
    weight = coerce(raw.pop("weight", 1.0), float, f"{path}.weight")
    if not (math.isfinite(weight) and weight > 0):
        raise ConfigError(f"{path}.weight: must be a finite number > 0 (a repeat factor), got {weight}")
    if weight > MAX_WEIGHT:
        raise ConfigError(
            f"{path}.weight: {weight} is a repeat factor (every row shown that many times an epoch); at most "
            f"{MAX_WEIGHT:g}. For proportions, set weights to share * total / size (data_formats/README.md)"
        )
    options = from_dict(FORMAT_OPTIONS[fmt], raw, path)
    return DatasetEntry(format=fmt, weight=weight, options=options)


_VAE_MOVED = (
    "{where}: moved to model.vae_path (one VQ-VAE renders segmentation targets for training and decodes "
    "masks for evaluation, so in-training evaluation scores masks too); set it there once"
)


def _closest_name(name: str, names: list[str]) -> str | None:
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return match[0] if match else None


def parse_recipe(data: dict[str, Any]) -> Recipe:
    """Validate plain recipe data (as read from YAML) into a ``Recipe``."""
    if not isinstance(data, dict):
        raise ConfigError(f"recipe: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    raw_data = data.pop("data", None) or {}
    if not isinstance(raw_data, dict):
        raise ConfigError(f"data: expected a mapping, got {raw_data!r}")
    raw_data = dict(raw_data)
    entries = {}
    for split in ("train", "eval"):
        items = raw_data.pop(split, None) or []
        if not isinstance(items, list):
            raise ConfigError(f"data.{split}: expected a list of dataset entries, got {items!r}")
        entries[split] = [_parse_dataset_entry(item, f"data.{split}[{i}]") for i, item in enumerate(items)]
    if isinstance(data.get("eval"), dict) and "vae_path" in data["eval"]:
        raise ConfigError(_VAE_MOVED.format(where="eval.vae_path"))
    data_config = from_dict(DataConfig, raw_data, "data")
    data_config.train, data_config.eval = entries["train"], entries["eval"]
    data["data"] = data_config
    return from_dict(Recipe, data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to raw recipe data."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, value = item.split("=", 1)
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty part in key {key!r}")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
        node: Any = data
        for i, part in enumerate(parts):
            where = ".".join(parts[:i])
            index: str | int = part
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"override {item!r}: {where} has {len(node)} "
                        f"{'entry' if len(node) == 1 else 'entries'} (indices 0..{len(node) - 1}), got {part!r}"
                    )
                index = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {where} is {node!r}, not a section")
            if i == len(parts) - 1:
                node[index] = parsed
            else:
                if isinstance(node, dict) and node.get(index) is None:  # missing, or `eval:` left empty
                    node[index] = {}
                node = node[index]
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, dict[str, Any]]:
    """Read, override and validate a recipe; returns the recipe and its resolved plain form."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (some Windows editors) is not content
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; give the recipe's .yaml file") from None
    except UnicodeDecodeError as e:
        line = text_line_of(path.read_bytes(), e.start)
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x}); save the recipe as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    data = apply_overrides(data, overrides or [])
    try:
        recipe = parse_recipe(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return recipe, resolved(recipe)


def text_line_of(data: bytes, offset: int) -> int:
    """The 1-based line number of byte ``offset`` in ``data`` (for errors that name a line)."""
    return data.count(b"\n", 0, offset) + 1


def resolved(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe (defaults filled in) as plain data."""
    out = to_dict(recipe)
    for split in ("train", "eval"):
        out["data"][split] = [
            {"format": e.format, "weight": e.weight, **to_dict(e.options)}
            for e in getattr(recipe.data, split)
        ]
    return out
