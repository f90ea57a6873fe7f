"""Batched generation with PaliGemma's bidirectional prefix.

Prompts are left-padded so they all end where decoding starts, and ``token_type_ids`` (0 on the
prompt) are passed so the prefill attends over image + prompt both ways, exactly as in training;
transformers' PaliGemma turns them into the prefix-LM mask on the first step and marks every
generated token as suffix (1). ``tests/evaluate/test_generate.py`` pins both facts: the prefill
logits equal the training-mode logits at the prompt's last token, and a left-padded batch decodes
exactly like the same samples one by one. Works with a peft model, a merged model or a base
checkpoint: anything with PaliGemma's ``generate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from pg_tune.data.collate import PaliGemmaCollator
from pg_tune.data.sample import Sample
from pg_tune.models.layout import EOS_ID

_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")

LOGPROB_TASKS = ("detect",)
"""Tasks whose scoring needs per-token log-probabilities (a confidence per detected box)."""


class Generation(str):
    """A generated text that also carries its tokens' log-probabilities (``LOGPROB_TASKS`` only).

    ``token_logprobs`` holds one ``(start, end, logprob)`` per generated token up to ``<eos>``:
    the ``[start, end)`` characters of the text that token wrote and its log-probability under the
    model (greedy: log-softmax of the logits; beam: the finished beam's per-token scores). Still a
    ``str``, so every caller that wants text keeps working; scoring reads the attribute.
    """

    token_logprobs: tuple[tuple[int, int, float], ...] | None

    def __new__(cls, text: str, token_logprobs=None):
        obj = super().__new__(cls, text)
        obj.token_logprobs = tuple(token_logprobs) if token_logprobs is not None else None
        return obj

    def __reduce__(self):  # pickled across ranks by accelerate's gather_object
        return Generation, (str(self), self.token_logprobs)


def _char_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of the text each token adds, from decoding growing prefixes (exact, however
    the tokenizer merges spaces; detection answers are short)."""
    spans, previous = [], 0
    for n in range(1, len(ids) + 1):
        length = len(tokenizer.decode(ids[:n], skip_special_tokens=True))
        spans.append((previous, max(previous, length)))
        previous = max(previous, length)
    return spans


def max_new_tokens_for(task: str, default: int, per_task: Mapping[str, int] | None = None) -> int:
    """The decoding budget of one task: ``per_task[task]`` when the recipe sets it, else ``default``.

    Tasks need very different budgets: a VQA answer is a few tokens, a referring-segmentation answer
    is exactly 20 (4 loc + 16 seg), a detection answer grows by 5+ tokens per object.
    """
    if per_task and task in per_task:
        return int(per_task[task])
    return int(default)


def batch_inputs(
    collator: PaliGemmaCollator, samples: Sequence[Sample], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Left-padded generation inputs for ``samples``, on ``device``, pixels in the model's dtype."""
    batch = collator(list(enumerate(samples)))
    inputs = {k: batch[k].to(device) for k in _INPUT_KEYS}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


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
) -> list[str]:
    """Greedy (``num_beams=1``) or beam decoding of every sample's prefix; returns the decoded suffixes.

    Samples are batched per task (each task has its own ``max_new_tokens``); the result keeps the
    input order. Decoding stops at ``<eos>``; ``<loc>``/``<seg>`` tokens are kept in the text (they
    are not special tokens), other special tokens are dropped. For ``LOGPROB_TASKS`` each text is a
    `Generation` carrying its tokens' log-probabilities.
    """
    collator = PaliGemmaCollator(processor, max_text_length, train=False)
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
            inputs = batch_inputs(collator, [samples[i] for i in chunk], device, dtype)
            with_logprobs = task in LOGPROB_TASKS
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens_for(task, max_new_tokens, max_new_tokens_per_task),
                do_sample=False,
                num_beams=num_beams,
                eos_token_id=EOS_ID,
                pad_token_id=processor.tokenizer.pad_token_id,
                **({"output_scores": True, "return_dict_in_generate": True} if with_logprobs else {}),
            )
            sequences = out.sequences if with_logprobs else out
            logprobs = _token_logprobs(model, out, num_beams) if with_logprobs else None
            for k, (i, row) in enumerate(
                zip(chunk, sequences[:, inputs["input_ids"].shape[1] :].tolist(), strict=True)
            ):
                if EOS_ID in row:
                    row = row[: row.index(EOS_ID)]
                texts[i] = processor.tokenizer.decode(row, skip_special_tokens=True)
                if logprobs is not None:
                    spans = _char_spans(processor.tokenizer, row)
                    values = logprobs[k, : len(row)].tolist()
                    texts[i] = Generation(
                        texts[i], [(a, b, lp) for (a, b), lp in zip(spans, values, strict=True)]
                    )
    finally:
        if was_training:
            model.train()
    return [t if t is not None else "" for t in texts]


def _token_logprobs(model: torch.nn.Module, out, num_beams: int) -> torch.Tensor:
    """``[batch, new_tokens]`` log-probability of each generated token (transformers'
    ``compute_transition_scores``: log-softmax of greedy logits; the chosen beam's scores)."""
    if num_beams > 1:
        scores = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
    else:
        scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    return scores.float().cpu()
