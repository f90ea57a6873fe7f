"""PaliGemma's training and generation sequence (the layout ``PaliGemmaProcessor`` builds).

Training rows are laid out exactly as big_vision and transformers' ``PaliGemmaProcessor`` do::

    <image> x N, <bos>, prefix, "\\n", suffix, <eos>, <pad> ...   (right padding)
    token_type_ids:  0 on the prefix side (image, bos, prefix, "\\n"), 1 on suffix + eos, 0 on pads
    labels:          -100 except on suffix + eos

``token_type_ids`` give the prefix-LM mask: the prefix side attends both ways, the suffix causally.
Only the suffix is ever truncated; image tokens and the prompt never are. Generation rows are
``<image> x N, <bos>, prefix, "\\n"`` with LEFT padding so every row ends where decoding starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pg_tune.data.collate import IGNORE_INDEX, one_index_per_pair, padded_length, pair_rows
from pg_tune.data.images import load_image
from pg_tune.data.sample import DataError, Sample
from pg_tune.models.paligemma.layout import BOS_ID, EOS_ID, IMAGE_TOKEN_ID, PAD_ID


@dataclass
class EncodedRow:
    input_ids: list[int]
    token_type_ids: list[int]
    labels: list[int]
    truncated: bool
    untruncated_length: int


class PaliGemmaCollator:
    """Builds training (``train=True``) or generation batches from ``(index, Sample)`` pairs, each
    padded to its longest row rounded up to ``pad_to_multiple_of``."""

    def __init__(
        self, family, processor, max_text_length: int, train: bool = True, pad_to_multiple_of: int = 1
    ):
        self.family = family
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.num_image_tokens: int = processor.image_seq_length
        self.max_text_length = max_text_length
        self.train = train
        self.pad_to_multiple_of = pad_to_multiple_of
        self.reserved = self.family.reserved_tokens(processor)
        # Rendered targets (a <seg> encode runs the VQ-VAE), by what they are rendered from: rows may share
        # a source (RefCOCO's detect and segment entries read the same refs).
        self._targets: dict[tuple, str] = {}

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _target(self, sample: Sample) -> str:
        if not sample.targets:
            return sample.suffix
        key = (sample.source, sample.task, sample.image_size, tuple((t.label, t.box) for t in sample.targets))
        if key not in self._targets:
            self._targets[key] = self.family.render_target(sample)
        return self._targets[key]

    def encode(self, sample: Sample) -> EncodedRow:
        """Token ids, token types and labels of one sample (no padding)."""
        self.family.check_task(sample)
        self.family.check_text(sample, reserved=self.reserved)
        prompt = self.family.render_prompt(sample)
        prefix_ids = [IMAGE_TOKEN_ID] * self.num_image_tokens + [BOS_ID] + self._tokens(prompt + "\n")
        prefix_text_len = len(prefix_ids) - self.num_image_tokens
        if not self.train:
            if prefix_text_len > self.max_text_length:
                raise DataError(
                    f"{sample.source}: prompt is {prefix_text_len} tokens, over data.max_text_length="
                    f"{self.max_text_length}"
                )
            n = len(prefix_ids)
            return EncodedRow(prefix_ids, [0] * n, [IGNORE_INDEX] * n, False, prefix_text_len)
        suffix = self._target(sample)
        if not suffix.strip():
            raise DataError(f"{sample.source}: empty suffix: a training row needs a target to learn")
        suffix_ids = self._tokens(suffix) + [EOS_ID]
        room = self.max_text_length - prefix_text_len
        if room < 1:
            raise DataError(
                f"{sample.source}: prompt is {prefix_text_len} tokens, leaving no room for the suffix within "
                f"data.max_text_length={self.max_text_length}; raise it"
            )
        truncated = len(suffix_ids) > room
        full = prefix_text_len + len(suffix_ids)
        suffix_ids = suffix_ids[:room]
        return EncodedRow(
            input_ids=prefix_ids + suffix_ids,
            token_type_ids=[0] * len(prefix_ids) + [1] * len(suffix_ids),
            labels=[IGNORE_INDEX] * len(prefix_ids) + suffix_ids,
            truncated=truncated,
            untruncated_length=full,
        )

    def text_length(self, sample: Sample) -> tuple[int, int]:
        """Text tokens of the encoded row (image tokens excluded) and before any truncation."""
        row = self.encode(sample)
        return len(row.input_ids) - self.num_image_tokens, row.untruncated_length

    def row_length(self, sample: Sample) -> int:
        """Image tokens (the same for every image at one resolution) plus the text of the row."""
        return self.num_image_tokens + self.text_length(sample)[0]

    def max_row_length(self) -> int:
        """Image tokens plus ``data.max_text_length`` (which counts bos, the newline and eos)."""
        return self.num_image_tokens + self.max_text_length

    def __call__(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]:
        return {**self.text_batch(batch), "pixel_values": self._pixels(batch)}

    def preference_batch(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]:
        """``B`` preference pairs as ``2B`` training rows (chosen, then rejected: ``pair_rows``), each
        image once: ``pixel_values`` has ``B`` rows, the loss encodes each image once per pair."""
        return {**self.preference_text_batch(batch), "pixel_values": self._pixels(batch)}

    def preference_text_batch(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]:
        """``preference_batch`` without ``pixel_values`` (the feature cache supplies the features)."""
        return one_index_per_pair(self.text_batch(pair_rows(batch)), len(batch))

    def _pixels(self, batch: Sequence[tuple[int, Sample]]) -> torch.Tensor:
        images = [load_image(sample.image, sample.source) for _, sample in batch]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def text_batch(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]:
        """Everything but ``pixel_values`` (the feature cache supplies image features instead)."""
        rows = [self.encode(sample) for _, sample in batch]
        length = padded_length(max(len(r.input_ids) for r in rows), self.pad_to_multiple_of)
        input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.input_ids)
            # Training pads on the right; generation on the left so every prompt ends at the same column.
            cols = slice(0, n) if self.train else slice(length - n, length)
            input_ids[i, cols] = torch.tensor(row.input_ids)
            attention_mask[i, cols] = 1
            token_type_ids[i, cols] = torch.tensor(row.token_type_ids)
            labels[i, cols] = torch.tensor(row.labels)
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "sample_index": torch.tensor([index for index, _ in batch], dtype=torch.long),
            "truncated": torch.tensor([r.truncated for r in rows], dtype=torch.bool),
        }
        if self.train:
            out["labels"] = labels
        return out
