"""The model side of ``pg-tune serve``: what MODEL names, loaded once, and batches of jobs generated.

``resolve_model`` turns the command's MODEL into something ``load_for_eval`` loads: a training run
folder (its ``adapter/`` or, for a full / partial run, ``model/``, with the run's recipe), an
adapter folder, a merged export, a model folder, a hub id or a tiny preset.

``Engine.run`` generates a batch of jobs with ``pg_tune.evaluate.generate.generate_batch`` (the same
left-padded batches ``pg-tune eval`` decodes), each row with its own token budget. Jobs are grouped
by how they decode: greedy jobs together, sampled jobs by (temperature, top_p), a seeded job alone
(its seed then fixes its tokens). While a row generates, a stopping criterion watches it: it
streams the text written so far, ends the row at a stop string, and ends it when the job is
cancelled. The answer is read by the family's parser (``pg_tune.evaluate.predict.read_answer``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria

from pg_tune.data.sample import DataError, Sample
from pg_tune.evaluate.generate import Generated, generate_batch
from pg_tune.evaluate.predict import read_answer
from pg_tune.models.family import ModelFamily
from pg_tune.serve.batcher import Job
from pg_tune.serve.requests import RequestError


@dataclass(frozen=True)
class ServedModel:
    """What MODEL resolved to."""

    ref: str
    """An adapter folder, a model folder, a hub id or a tiny preset: what ``load_for_eval`` takes."""
    name: str
    """The id clients name (``/v1/models``)."""
    recipe: Any | None = None
    """The run's recipe when MODEL is a run folder (dtype, the adapter's base, ``model.vae_path``)."""


def resolve_model(model: str, served_name: str | None = None) -> ServedModel:
    """A run folder (``recipe.yaml`` beside ``adapter/`` or ``model/``) is read with its recipe; any
    other MODEL is passed on as it is."""
    path = Path(model)
    is_run = (path / "recipe.yaml").is_file() and ((path / "adapter").is_dir() or (path / "model").is_dir())
    name = served_name or (path.resolve().name if path.exists() else model)
    if not is_run:
        return ServedModel(model, name)
    from pg_tune.export.run import read_run

    run = read_run(path)
    return ServedModel(str(run.adapter_dir), name, run.recipe)


@dataclass
class Completion:
    """One finished answer."""

    text: str
    finish_reason: str
    """``stop`` (end token or a stop string) or ``length`` (``max_tokens`` reached)."""
    task: str
    image_size: tuple[int, int]
    objects: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def streamable(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be sent now: not a trailing part that may still become a stop string,
    trailing whitespace (a family may strip it from the final answer) or a half-decoded character."""
    end = len(text.rstrip().rstrip("\ufffd"))
    for stop in stops:
        for n in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:n]):
                end -= n
                break
    return end


class _Watch(StoppingCriteria):
    """Per row: stream its text, end it at a stop string or when its job is cancelled."""

    def __init__(self, jobs: Sequence[Job], family: ModelFamily, processor, end_ids: set[int]):
        self.jobs = jobs
        self.family = family
        self.processor = processor
        self.end_ids = end_ids
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.done = [False] * len(jobs)
        self.sent = [""] * len(jobs)
        """The text each row has streamed so far."""

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for k, job in enumerate(self.jobs):
            if self.done[k]:
                continue
            token = int(input_ids[k, -1])
            if token in self.end_ids or job.cancelled:
                self.done[k] = True
                continue
            self.ids[k].append(token)
            if len(self.ids[k]) >= job.request.max_tokens:
                self.done[k] = True
            stops = job.request.stop
            if not (job.request.stream or stops):
                continue
            text = self.family.decode(self.processor, self.ids[k])
            cut = first_stop(text, stops)
            if cut is not None:
                self.done[k] = True
                text = text[:cut]
            if job.request.stream:
                ready = text[: len(text) if cut is not None else streamable(text, stops)]
                # Send only what extends the text already sent (a decode may rewrite its tail).
                if len(ready) > len(self.sent[k]) and ready.startswith(self.sent[k]):
                    job.emit("delta", ready[len(self.sent[k]) :])
                    self.sent[k] = ready
        return torch.tensor(self.done, device=input_ids.device)


class Engine:
    """A loaded model answering batches of jobs (``Batcher``'s ``run_batch``)."""

    def __init__(self, model: torch.nn.Module, processor, family: ModelFamily, max_prompt_tokens: int = 512):
        self.model = model
        self.processor = processor
        self.family = family
        self.collator = family.collator(processor, max_prompt_tokens, train=False)
        end = family.generation_kwargs(processor).get("eos_token_id")
        self.end_ids = set(end) if isinstance(end, (list, tuple)) else {end}

    def check(self, sample: Sample) -> None:
        """Refuse, before queueing, a prompt the collator would refuse in the batch (control tokens,
        too long): ``RequestError`` 400."""
        try:
            self.collator.text_length(sample)
        except DataError as e:
            message = str(e).replace("data.max_text_length", "the server's --max-prompt-tokens")
            raise RequestError(400, message, "messages") from None

    def run(self, jobs: Sequence[Job]) -> None:
        """Generate every job, grouped by how it decodes; each job gets its ``done`` or ``error`` event."""
        counter = itertools.count()

        def key(job: Job) -> tuple:
            r = job.request
            if not r.sampling:
                return ("greedy",)
            return ("sample", r.temperature, r.top_p) if r.seed is None else ("seeded", next(counter))

        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(key(job), []).append(job)
        for group in groups.values():
            try:
                self._run_group(group)
            except Exception as e:
                if len(group) == 1:
                    group[0].emit("error", e)
                    continue
                for job in group:  # one bad row must not fail the others: each alone, errors to their own
                    try:
                        self._run_group([job])
                    except Exception as single:
                        job.emit("error", single)

    def _run_group(self, jobs: Sequence[Job]) -> None:
        first = jobs[0].request
        kwargs: dict[str, Any] = {}
        if first.sampling:
            kwargs = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p, "top_k": 0}
            if first.seed is not None:
                torch.manual_seed(first.seed)  # the worker thread is the only one generating
        watch = _Watch(jobs, self.family, self.processor, self.end_ids)
        box_task = any(job.sample.task in ("detect", "refer_detect", "refer_segment") for job in jobs)
        generated = generate_batch(
            self.model,
            self.processor,
            [job.sample for job in jobs],
            self.family,
            collator=self.collator,
            max_new_tokens=[job.request.max_tokens for job in jobs],
            logprobs=box_task,  # detections are scored by the tokens that wrote them
            stopping_criteria=[watch],
            **kwargs,
        )
        for k, (job, result) in enumerate(zip(jobs, generated, strict=True)):
            job.emit("done", self._completion(job, result, watch.sent[k]))

    def _completion(self, job: Job, result: Generated, streamed: str) -> Completion:
        request, sample = job.request, job.sample
        text = result.text
        cut = first_stop(text, request.stop)
        if cut is not None:
            text = text[:cut]
        if cut is not None or result.ended:
            reason = "stop"
        else:
            reason = "length"
        objects, _, notes = read_answer(
            self.family, text, sample.task, sample.image.size, result.scored_tokens()
        )
        if request.stream and not text.startswith(streamed):
            notes.append(
                "the streamed text differs from the final answer; the final answer is in pg_tune.text"
            )
        return Completion(
            text=text,
            finish_reason=reason,
            task=sample.task,
            image_size=sample.image.size,
            objects=objects,
            notes=notes,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=len(result.token_ids) + int(result.ended),
        )
