"""``pg-tune data validate``: scan every dataset of a recipe and report every bad row.

Where training stops at the first bad row (``data.on_bad_row: stop``) or skips and counts them,
validation always scans everything and lists each problem with its place and field:

- at build time (the format adapters): malformed JSON (with the line), missing fields, missing
  images, boxes outside the image (clipped, counted), degenerate boxes, empty targets;
- then per sample: unreadable or corrupt images (decoded in full, each file once), images whose
  real size differs from the annotation's ``width``/``height`` (boxes would be wrong), empty
  training targets, control tokens of the model family inside prompt or target text
  (``<image>``, ``<bos>``, ``<eos>``, ``<pad>`` for PaliGemma: reason ``reserved_token``), and
  sequences over ``data.max_text_length`` counted with the recipe's own tokenizer through the
  family's collator (training would truncate their target);
- preference pairs: both answers present, non-empty and different as the family renders them, each
  checked for control tokens and counted against the length budget through the family's collator;
  under ``train.objective: dpo`` a training row without a rejected answer (reason ``not_a_pair``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pg_tune.config.recipe import Recipe
from pg_tune.config.schema import ConfigError
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.build import build_samples
from pg_tune.data.formats import FORMATS
from pg_tune.data.images import load_image
from pg_tune.data.sample import DataError

if TYPE_CHECKING:
    from pg_tune.models.family import ModelFamily

REPAIRED = frozenset({"box_clipped", "box_swapped"})
"""Reasons that mark a repaired row (kept), not a bad one."""


@dataclass
class ValidationReport:
    rows: dict[str, int] = field(default_factory=dict)
    bad_rows: BadRows = field(default_factory=lambda: BadRows("skip", examples_per_reason=10**9))
    longest: dict[str, int] = field(default_factory=dict)
    tokenizer_note: str = ""

    @property
    def num_bad(self) -> int:
        return sum(n for reason, n in self.bad_rows.counts.items() if reason not in REPAIRED)

    def render(self, max_text_length: int, policy: str) -> str:
        lines = [f"{split}: {n} samples" for split, n in self.rows.items()]
        for split, n in self.longest.items():
            lines.append(f"{split}: longest text {n} tokens (budget data.max_text_length={max_text_length})")
        if self.tokenizer_note:
            lines.append(self.tokenizer_note)
        lines.append(self.bad_rows.report())
        if self.num_bad:
            lines.append(
                f"{self.num_bad} bad rows; training with data.on_bad_row={policy} would "
                + ("stop at the first" if policy == "stop" else "skip and count them")
            )
        return "\n".join(lines)


def check_recipe_support(
    recipe: Recipe, family: ModelFamily, splits: tuple[str, ...] = ("train", "eval")
) -> None:
    """Refuse, before anything heavy loads, what the model's ``family`` cannot do with the recipe.

    ``ConfigError`` names the entry: a task of its rows the family lacks (declared by the format's
    ``task`` option or, for JSONL, by a row: ``FILE:LINE``), ``data.feature_cache`` when the family's
    image features vary in length, ``model.image`` settings its processor does not take
    (``ModelFamily.check_image_settings``), and remote-code loading without a pinned commit
    (``ModelFamily.check_model_config``). Each message says which families can.
    """
    from pg_tune.models.family import unsupported_feature_cache_message, unsupported_task_message

    try:
        family.check_model_config(recipe.model, at_load=False)
        family.check_image_settings(recipe.model.image, feature_cache=bool(recipe.data.feature_cache))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if "train" in splits and recipe.data.feature_cache and not family.cacheable_image_features:
        raise ConfigError(f"data.feature_cache: {unsupported_feature_cache_message(family)}")
    for split in splits:
        for k, entry in enumerate(getattr(recipe.data, split)):
            for task, where in FORMATS[entry.format].tasks(entry.options).items():
                if task not in family.tasks:
                    at = f"{entry.format}, {where}" if where else entry.format
                    raise ConfigError(f"data.{split}[{k}] ({at}): {unsupported_task_message(family, task)}")


def validate_recipe(
    recipe: Recipe, family: ModelFamily, processor=None, tokenizer_note: str = ""
) -> ValidationReport:
    """Build both splits under a skip-and-count policy, then check each sample.

    The model ``family`` checks reserved tokens; with a ``processor`` it also counts tokens through
    its own collator.
    """
    report = ValidationReport(tokenizer_note=tokenizer_note)
    bad = report.bad_rows
    checked_images: dict[str, str | None] = {}
    for split in ("train", "eval"):
        entries = recipe.data.train if split == "train" else recipe.data.eval
        if not entries:
            continue
        try:
            samples = build_samples(entries, split, bad, seed=recipe.train.seed, family=family)
        except DataError as e:  # a whole file is unusable (missing, not JSON, ...)
            bad.bad("unreadable_file", str(e))
            report.rows[split] = 0
            continue
        collator = pair_collator = None
        if processor is not None:
            collator = family.collator(processor, recipe.data.max_text_length, train=split == "train")
            # Pairs are scored with their answers in the sequence, in evaluation too.
            pair_collator = family.collator(processor, recipe.data.max_text_length, train=True)
        count = longest = 0
        for index in range(len(samples)):
            try:
                sample = samples[index]
            except DataError as e:
                bad.bad("bad_row", str(e))
                continue
            count += 1
            if not _image_ok(sample, checked_images, bad):
                continue
            if split == "train" and not sample.suffix.strip() and not sample.targets:
                bad.bad("empty_suffix", f"{sample.source}: empty suffix: nothing to learn from this row")
                continue
            if split == "train" and recipe.train.objective == "dpo" and not sample.is_pair:
                bad.bad(
                    "not_a_pair",
                    f"{sample.source}: no rejected answer; train.objective=dpo trains on rows with a chosen "
                    "and a rejected answer",
                )
                continue
            if sample.is_pair and not _pair_ok(sample, family, bad):
                continue
            if collator is not None:
                answers = [sample, sample.rejected_view()] if sample.is_pair else [sample]
                names = ("chosen answer", "rejected answer") if sample.is_pair else ("suffix",)
                try:
                    counter = pair_collator if sample.is_pair else collator
                    lengths = [counter.text_length(answer) for answer in answers]
                except DataError as e:
                    bad.bad(_reason(e), str(e))
                    continue
                for (n_text, full), name in zip(lengths, names, strict=True):
                    longest = max(longest, n_text)
                    if full > n_text:
                        bad.bad(
                            "over_length",
                            f"{sample.source}: {full} text tokens, over data.max_text_length="
                            f"{recipe.data.max_text_length}: training would cut the {name}",
                        )
        report.rows[split] = count
        if collator is not None:
            report.longest[split] = longest
    return report


def _pair_ok(sample, family: ModelFamily, bad: BadRows) -> bool:
    """Both answers as the family renders them: present and different (control tokens are checked
    with the prompt, by the family)."""
    try:
        family.check_text(sample, family.reserved_tokens(None))
        chosen, rejected = family.render_target(sample), family.render_target(sample.rejected_view())
    except DataError as e:
        bad.bad(_reason(e), str(e))
        return False
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            bad.bad("empty_suffix", f"{sample.source}: the {name} answer is empty: a pair needs both answers")
            return False
    if chosen.strip() == rejected.strip():
        bad.bad(
            "identical_answers",
            f"{sample.source}: the chosen and rejected answers render to the same text: the pair prefers nothing",
        )
        return False
    return True


def _reason(error: DataError) -> str:
    reason = getattr(error, "reason", None)
    if reason:
        return reason
    return "over_length" if "max_text_length" in str(error) else "empty_suffix"


def _image_ok(sample, checked: dict[str, str | None], bad: BadRows) -> bool:
    """Decode each image file once; compare its size with the annotation's, if any."""
    image = sample.image
    key = str(image) if not hasattr(image, "size") else None
    if key is not None and key in checked:
        error = checked[key]
        if error:
            bad.bad("unreadable_image", f"{sample.source}: {error}")
        return error is None
    try:
        size = load_image(image, sample.source).size
        error = None
    except DataError as e:
        error = str(e).split(": ", 1)[-1] if sample.source else str(e)
        size = None
    if key is not None:
        checked[key] = error
    if error:
        bad.bad("unreadable_image", f"{sample.source}: {error}")
        return False
    expected = sample.image_size or (sample.meta.get("image_size") if sample.meta else None)
    if expected is not None and tuple(expected) != tuple(size):
        bad.bad(
            "size_mismatch",
            f"{sample.source}: image is {size[0]}x{size[1]} but the annotation says {expected[0]}x{expected[1]}: "
            "boxes would land in the wrong place",
        )
        return False
    return True
