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
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

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
    token_ids: tuple[int, ...] = ()
    """The generated ids before the end token."""
    ended: bool = False
    """True when the model wrote its end token (else the budget ran out)."""
    prompt_tokens: int = 0
    """Tokens of the prompt, image tokens included (what serving reports as usage)."""

    def scored_tokens(self) -> list[tuple[int, int, float]]:
        """``(start, end, logprob)`` per token: what scoring takes (``Item.token_logprobs``)."""
        return [(a, b, lp) for (a, b), lp in zip(self.token_spans, self.token_logprobs, strict=True)]


class _ChosenLogprobs(LogitsProcessor):
    """A logits processor that keeps, per row and step, the log-probability of the token chosen.

    It holds one step's normalised scores at a time: the next call (or ``finish``) reads which token
    was chosen from ``input_ids``' last column. ``output_scores`` would keep every step's
    ``[batch, vocab]`` scores until the end (gigabytes for a 257,216-token vocabulary). Appended
    after ``generate``'s own processors and warpers, it sees the scores the token was chosen from:
    the same values as ``log_softmax(out.scores[step])``. Greedy and sampling (one beam) only.
    """

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self._last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, chosen: torch.Tensor) -> None:
        if self._last is not None:
            self.steps.append(self._last.gather(1, chosen[:, None].to(self._last.device))[:, 0].cpu())
            self._last = None

    def finish(self, new: torch.Tensor) -> list[list[float]]:
        """``[rows][steps]`` for the generated ids ``new`` (the last step's choice read from it)."""
        if self._last is not None:
            self._take(new[:, len(self.steps)])
        if not self.steps:
            return [[] for _ in range(new.shape[0])]
        return torch.stack(self.steps, dim=1).tolist()


def _beam_logprobs(model, out) -> list[list[float]]:
    """Log-probability of each chosen token along the returned beam, ``[rows][steps]``."""
    return model.compute_transition_scores(
        out.sequences, out.scores, out.beam_indices, normalize_logits=True
    ).tolist()


class _RowBudgets(StoppingCriteria):
    """A stopping criterion that ends each row at its own token budget (the others go on)."""

    def __init__(self, budgets: Sequence[int], prompt_length: int):
        self.budgets = torch.tensor(list(budgets))
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.prompt_length >= self.budgets).to(input_ids.device)


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
    by_task: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_task.setdefault(sample.task, []).append(i)
    chunks = [
        (task, indices[start : start + batch_size])
        for task, indices in by_task.items()
        for start in range(0, len(indices), batch_size)
    ]
    results: list[Generated | None] = [None] * len(samples)
    for task, chunk in tqdm(chunks, desc="generate", disable=not progress, leave=False):
        generated = generate_batch(
            model,
            processor,
            [samples[i] for i in chunk],
            family,
            collator=collator,
            max_new_tokens=max_new_tokens_for(task, max_new_tokens, max_new_tokens_per_task),
            num_beams=num_beams,
            logprobs=logprobs,
        )
        for i, g in zip(chunk, generated, strict=True):
            results[i] = g
    return [r if r is not None else Generated("", ()) for r in results]


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    processor,
    samples: Sequence[Sample],
    family: ModelFamily,
    *,
    collator: Collator | None = None,
    max_new_tokens: int | Sequence[int] = 32,
    num_beams: int = 1,
    logprobs: bool = False,
    max_text_length: int = 512,
    **generate_kwargs: Any,
) -> list[Generated]:
    """One left-padded batch through ``model.generate``: what ``generate`` runs per chunk and what
    ``pg-tune serve`` runs per dynamic batch, so both decode alike.

    ``max_new_tokens`` is one budget or one per sample (a row stops at its own; the others go on,
    which leaves their tokens unchanged). ``generate_kwargs`` pass through to ``model.generate``
    (sampling settings, extra ``stopping_criteria`` / ``logits_processor``); without them decoding is
    greedy (``num_beams=1``) or beam search.
    """
    collator = collator or family.collator(processor, max_text_length, train=False)
    budgets = [max_new_tokens] * len(samples) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(samples):
        raise ValueError(f"{len(budgets)} token budgets for {len(samples)} samples")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        inputs = batch_inputs(collator, samples, device, _model_dtype(model))
        prompt_length = inputs["input_ids"].shape[1]
        generation_kwargs = family.generation_kwargs(processor)
        end = generation_kwargs.get("eos_token_id")
        end_ids = set(end) if isinstance(end, (list, tuple)) else {end}
        kwargs = dict(generate_kwargs)
        stopping = list(kwargs.pop("stopping_criteria", None) or [])
        if len(set(budgets)) > 1:
            stopping.append(_RowBudgets(budgets, prompt_length))
        processors = list(kwargs.pop("logits_processor", None) or [])
        recorder = _ChosenLogprobs() if logprobs and num_beams == 1 else None
        if recorder is not None:
            processors.append(recorder)
        kwargs.setdefault("do_sample", False)
        if stopping:
            kwargs["stopping_criteria"] = StoppingCriteriaList(stopping)
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        out = model.generate(
            **inputs,
            max_new_tokens=max(budgets),
            num_beams=num_beams,
            output_scores=logprobs and num_beams > 1,
            return_dict_in_generate=logprobs,
            **generation_kwargs,
            **kwargs,
        )
    finally:
        if was_training:
            model.train()
    sequences = out.sequences if logprobs else out
    new = sequences[:, prompt_length:]
    if recorder is not None:
        scores = recorder.finish(new)
    elif logprobs:
        scores = _beam_logprobs(model, out)
    else:
        scores = None
    prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
    results = []
    for k, row in enumerate(new.tolist()):
        row = row[: budgets[k]]
        end_at = _until_end(row, end_ids)
        kept = scores[k][:end_at] if scores is not None else []
        spans = _char_spans(family, processor, row[:end_at]) if scores is not None else ()
        results.append(
            Generated(
                family.decode(processor, row),
                tuple(float(v) for v in kept),
                spans,
                token_ids=tuple(row[:end_at]),
                ended=end_at < len(row),
                prompt_tokens=int(prompt_tokens[k]),
            )
        )
    return results
