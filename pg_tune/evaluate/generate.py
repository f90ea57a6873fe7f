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
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pg_tune.data.sample import Sample
from pg_tune.models.family import Collator, ModelFamily


def max_new_tokens_for(task: str, default: int, per_task: Mapping[str, int] | None = None) -> int:
    """The decoding budget of one task: ``per_task[task]`` when the recipe sets it, else ``default``.

    Tasks need very different budgets: a VQA answer is a few tokens, a referring-segmentation answer
    is exactly 20 (4 loc + 16 seg), a detection answer grows by 5+ tokens per object.
    """
    if per_task and task in per_task:
        return int(per_task[task])
    return int(default)


def batch_inputs(
    collator: Collator, samples: Sequence[Sample], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Left-padded generation inputs for ``samples``, on ``device``, images in the model's dtype."""
    batch = collator(list(enumerate(samples)))
    return {k: v.to(device) for k, v in collator.family.generation_inputs(batch, dtype).items()}


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@dataclass(frozen=True)
class Generated:
    """One decoded answer and the log-probability of each generated token before the end token."""

    text: str
    token_logprobs: tuple[float, ...]
    token_spans: tuple[tuple[int, int], ...] = ()
    """``[start, end)`` characters of ``text`` each kept token wrote (same length as
    ``token_logprobs``), so a score can be given to each object of an answer, not only to the answer."""

    def scored_tokens(self) -> list[tuple[int, int, float]]:
        """``(start, end, logprob)`` per token: what scoring takes (``Item.token_logprobs``)."""
        return [(a, b, lp) for (a, b), lp in zip(self.token_spans, self.token_logprobs, strict=True)]


def _chosen_logprobs(model, out, new: torch.Tensor) -> list[list[float]]:
    """Log-probability of each chosen token, ``[rows][steps]`` (fp32 log-softmax of the step's scores)."""
    if getattr(out, "beam_indices", None) is not None:
        return model.compute_transition_scores(
            out.sequences, out.scores, out.beam_indices, normalize_logits=True
        ).tolist()
    steps = [
        torch.log_softmax(step.float(), dim=-1).gather(1, new[:, k : k + 1]).squeeze(1)
        for k, step in enumerate(out.scores)
    ]
    return torch.stack(steps, dim=1).tolist()


def _char_spans(family: ModelFamily, processor, ids: list[int]) -> tuple[tuple[int, int], ...]:
    """``[start, end)`` of the decoded text each token adds, from decoding growing prefixes (exact
    however the tokenizer merges spaces; answers that need scores are short)."""
    spans, previous = [], 0
    for n in range(1, len(ids) + 1):
        length = max(previous, len(family.decode(processor, ids[:n])))
        spans.append((previous, length))
        previous = length
    return tuple(spans)


def _until_end(ids: list[int], end_ids: set[int]) -> int:
    return next((k for k, token in enumerate(ids) if token in end_ids), len(ids))


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    processor,
    samples: Sequence[Sample],
    family: ModelFamily,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    max_new_tokens_per_task: Mapping[str, int] | None = None,
    num_beams: int = 1,
    max_text_length: int = 512,
    progress: bool = False,
) -> list[str]:
    """Greedy (``num_beams=1``) or beam decoding of every sample's prefix; returns the decoded suffixes.

    Samples are batched per task (each task has its own ``max_new_tokens``); the result keeps the
    input order. The model ``family`` lays out the prompts; decoding stops at its end token and
    keeps its task tokens (PaliGemma: ``<loc>``/``<seg>``).
    """
    return [
        g.text
        for g in _generate(
            model,
            processor,
            samples,
            family,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_new_tokens_per_task=max_new_tokens_per_task,
            num_beams=num_beams,
            max_text_length=max_text_length,
            progress=progress,
            logprobs=False,
        )
    ]


@torch.no_grad()
def generate_with_logprobs(
    model: torch.nn.Module, processor, samples: Sequence[Sample], family: ModelFamily, **kwargs
) -> list[Generated]:
    """``generate`` that also returns each answer's per-token log-probabilities (``Generated``).

    The log-probabilities are those of the chosen tokens under the model's normalised scores (for
    beam search, along the returned beam), up to the end token; they give detections a score
    (``ModelFamily.parse_output(token_logprobs=...)``) so mAP does not depend on dataset order.
    """
    return _generate(model, processor, samples, family, logprobs=True, **kwargs)


def _generate(
    model: torch.nn.Module,
    processor,
    samples: Sequence[Sample],
    family: ModelFamily,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    max_new_tokens_per_task: Mapping[str, int] | None = None,
    num_beams: int = 1,
    max_text_length: int = 512,
    progress: bool = False,
    logprobs: bool = False,
) -> list[Generated]:
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
    generation_kwargs = family.generation_kwargs(processor)
    end = generation_kwargs.get("eos_token_id")
    end_ids = set(end) if isinstance(end, (list, tuple)) else {end}
    results: list[Generated | None] = [None] * len(samples)
    try:
        for task, chunk in tqdm(chunks, desc="generate", disable=not progress, leave=False):
            inputs = batch_inputs(collator, [samples[i] for i in chunk], device, dtype)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens_for(task, max_new_tokens, max_new_tokens_per_task),
                do_sample=False,
                num_beams=num_beams,
                output_scores=logprobs,
                return_dict_in_generate=logprobs,
                **generation_kwargs,
            )
            sequences = out.sequences if logprobs else out
            new = sequences[:, inputs["input_ids"].shape[1] :]
            scores = _chosen_logprobs(model, out, new) if logprobs else None
            for k, (i, row) in enumerate(zip(chunk, new.tolist(), strict=True)):
                end_at = _until_end(row, end_ids)
                kept = scores[k][:end_at] if scores is not None else []
                spans = _char_spans(family, processor, row[:end_at]) if scores is not None else ()
                results[i] = Generated(family.decode(processor, row), tuple(float(v) for v in kept), spans)
    finally:
        if was_training:
            model.train()
    return [r if r is not None else Generated("", ()) for r in results]
