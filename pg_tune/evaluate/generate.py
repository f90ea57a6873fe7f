"""Batched generation through the model family: its generation collator, inputs and decoding.

Prompts are left-padded so they all end where decoding starts, and the family passes its
attention-rule inputs (PaliGemma: ``token_type_ids``, 0 on the prompt) so the prefill attends over
image + prompt exactly as in training. ``tests/evaluate/test_generate.py`` pins this for PaliGemma:
the prefill logits equal the training-mode logits at the prompt's last token, and a left-padded
batch decodes exactly like the same samples one by one. Works with a peft model, a merged model or
a base checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from pg_tune.data.sample import Sample
from pg_tune.models.family import Collator, ModelFamily, family_for


def max_new_tokens_for(task: str, default: int, per_task: Mapping[str, int] | None = None) -> int:
    """The decoding budget of one task: ``per_task[task]`` when the recipe sets it, else ``default``.

    Tasks need very different budgets: a VQA answer is a few tokens, a referring-segmentation answer
    is exactly 20 (4 loc + 16 seg), a detection answer grows by 5+ tokens per object.
    """
    if per_task and task in per_task:
        return int(per_task[task])
    return int(default)


def batch_inputs(
    collator: Collator,
    samples: Sequence[Sample],
    device: torch.device,
    dtype: torch.dtype,
    family: ModelFamily | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded generation inputs for ``samples``, on ``device``, images in the model's dtype."""
    family = family if family is not None else collator.family
    batch = collator(list(enumerate(samples)))
    return {k: v.to(device) for k, v in family.generation_inputs(batch, dtype).items()}


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    processor,
    samples: Sequence[Sample],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    max_new_tokens_per_task: Mapping[str, int] | None = None,
    num_beams: int = 1,
    max_text_length: int = 512,
    progress: bool = False,
    family: ModelFamily | None = None,
) -> list[str]:
    """Greedy (``num_beams=1``) or beam decoding of every sample's prefix; returns the decoded suffixes.

    Samples are batched per task (each task has its own ``max_new_tokens``); the result keeps the
    input order. Decoding stops at the family's end token and keeps its task tokens (PaliGemma:
    ``<loc>``/``<seg>``); ``family`` defaults to the model's (``family_for(model)``).
    """
    family = family if family is not None else family_for(model)
    collator = family.collator(processor, max_text_length, train=False)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = _model_dtype(model)
    by_task: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_task.setdefault(sample.task, []).append(i)
    chunks = [
        (task, indices[start : start + batch_size])
        for task, indices in by_task.items()
        for start in range(0, len(indices), batch_size)
    ]
    texts: list[str | None] = [None] * len(samples)
    try:
        for task, chunk in tqdm(chunks, desc="generate", disable=not progress, leave=False):
            inputs = batch_inputs(collator, [samples[i] for i in chunk], device, dtype, family)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens_for(task, max_new_tokens, max_new_tokens_per_task),
                do_sample=False,
                num_beams=num_beams,
                **family.generation_kwargs(processor),
            )
            for i, row in zip(chunk, out[:, inputs["input_ids"].shape[1] :].tolist(), strict=True):
                texts[i] = family.decode(processor, row)
    finally:
        if was_training:
            model.train()
    return [t if t is not None else "" for t in texts]
