"""Batched generation with PaliGemma's bidirectional prefix.

Prompts are left-padded so they all end where decoding starts, and ``token_type_ids`` (all 0 on
the prompt) are passed so the prefill attends over image + prompt both ways, exactly as in
training. Works with a peft model, a merged model or a base checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from pg_tune.data.collate import PaliGemmaCollator
from pg_tune.data.sample import Sample
from pg_tune.models.layout import EOS_ID


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    processor,
    samples: Sequence[Sample],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    max_text_length: int = 512,
    progress: bool = False,
) -> list[str]:
    """Greedy (or beam) decoding of every sample's prefix; returns the decoded suffixes."""
    collator = PaliGemmaCollator(processor, max_text_length, train=False)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts: list[str] = []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
        chunk = samples[start : start + batch_size]
        batch = collator(list(enumerate(chunk)))
        inputs = {
            k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
        }
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=num_beams,
            eos_token_id=EOS_ID,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            if EOS_ID in row:
                row = row[: row.index(EOS_ID)]
            texts.append(processor.tokenizer.decode(row, skip_special_tokens=True))
    if was_training:
        model.train()
    return texts
