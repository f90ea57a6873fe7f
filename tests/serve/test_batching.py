"""Dynamic batches answer exactly as one-by-one generation, for every family; per-request budgets,
stop strings, streaming and seeds hold inside a batch."""

from __future__ import annotations

import asyncio

import pytest
import torch

from pg_tune.data.sample import Sample
from pg_tune.evaluate.generate import generate_batch
from pg_tune.evaluate.predict import prompt_task
from pg_tune.serve.batcher import Batcher, Job, QueueFull
from pg_tune.serve.engine import first_stop, streamable
from pg_tune.serve.requests import Limits, parse_chat_request
from tests.serve.helpers import FAMILY_PRESETS, chat_body, engine_for, shape_images

LIMITS = Limits(max_tokens=16)
# PaliGemma in the fast tier; the other families' runs are slow-marked (each builds its model).
EVERY_FAMILY = [
    pytest.param(p, marks=[] if p == "tiny-paligemma2" else pytest.mark.slow) for p in FAMILY_PRESETS
]
# Sizes and aspect ratios differ, as real requests' do (SmolVLM2 cuts each into its own number of tiles).
IMAGES = [
    image.resize(size)
    for image, size in zip(shape_images(4), [(112, 112), (160, 96), (90, 200), (64, 64)], strict=True)
]
REQUESTS = [
    ("caption en", {"max_tokens": 6}),
    ("detect circle ; square", {"max_tokens": 12}),
    ("answer en what colour is the shape", {"max_tokens": 3}),
    ("caption en", {"max_tokens": 16}),
]


def _job(engine, image, prompt, loop, **fields) -> Job:
    chat = parse_chat_request(chat_body(image, prompt, **fields), LIMITS)
    task = prompt_task(chat.prompt, engine.family, chat.task)
    sample = Sample(
        image=image, prefix=chat.prompt, suffix="", source="test", task=task, image_size=image.size
    )
    engine.check(sample)
    return Job(chat, sample, loop)


async def _finish(job: Job) -> tuple[list[str], object]:
    deltas = []
    while True:
        kind, payload = await asyncio.wait_for(job.events.get(), 300)
        if kind == "delta":
            deltas.append(payload)
        elif kind == "done":
            return deltas, payload
        else:
            raise payload


def answer(engine, requests, max_batch: int, together: bool):
    """Each (image, prompt, fields) answered through a batcher: submitted at once (one batch when
    ``max_batch`` allows: the worker waits for all of them) or one after another."""

    async def main():
        loop = asyncio.get_running_loop()
        batcher = Batcher(engine.run, max_batch=max_batch, max_wait_s=60 if together else 0, max_queue=64)
        batcher.start()
        try:
            jobs = [_job(engine, image, prompt, loop, **fields) for image, prompt, fields in requests]
            if together:
                for job in jobs:
                    batcher.submit(job)
                results = [await _finish(job) for job in jobs]
            else:
                results = []
                for job in jobs:
                    batcher.submit(job)
                    results.append(await _finish(job))
        finally:
            await asyncio.to_thread(batcher.stop, 60)
        return results, dict(batcher.batch_sizes)

    return asyncio.run(main())


def _summary(completion):
    objects = [(o["label"], o["box"]) for o in completion.objects]
    return completion.text, completion.finish_reason, completion.completion_tokens, objects


@pytest.mark.parametrize("preset", EVERY_FAMILY)
def test_a_dynamic_batch_answers_exactly_as_one_by_one(preset):
    engine = engine_for(preset)
    requests = [(image, prompt, fields) for image, (prompt, fields) in zip(IMAGES, REQUESTS, strict=True)]
    batched, sizes = answer(engine, requests, max_batch=4, together=True)
    assert sizes == {4: 1}, "the four requests were not generated as one batch"
    single, single_sizes = answer(engine, requests, max_batch=1, together=False)
    assert single_sizes == {1: 4}
    assert [_summary(c) for _, c in batched] == [_summary(c) for _, c in single]
    for (_, b), (_, s) in zip(batched, single, strict=True):
        assert [o.get("score") for o in b.objects] == pytest.approx(
            [o.get("score") for o in s.objects], abs=1e-3
        )
    texts = [c.text for _, c in batched]
    assert len(set(texts)) > 1, f"the tiny model wrote the same answer everywhere: {texts}"
    # Each row kept its own budget inside the batch.
    for (_, completion), (_, fields) in zip(batched, REQUESTS, strict=True):
        assert completion.completion_tokens <= fields["max_tokens"]
        assert completion.finish_reason in ("stop", "length")


@pytest.mark.parametrize("preset", EVERY_FAMILY)
def test_streamed_deltas_add_up_to_the_answer_and_stop_strings_cut_it(preset):
    engine = engine_for(preset)
    plain = []
    for image, (prompt, _) in zip(IMAGES, REQUESTS, strict=True):
        (result,) = answer(engine, [(image, prompt, {"max_tokens": 16})], 1, together=False)[0]
        plain.append((image, prompt, result[1].text))
    image, prompt, text = next((p for p in plain if len(p[2].strip()) >= 4), (None, None, ""))
    assert text, f"the tiny model wrote nothing to stream: {plain}"
    streamed, _ = answer(engine, [(image, prompt, {"max_tokens": 16, "stream": True})], 1, together=False)
    deltas, completion = streamed[0]
    assert completion.text == text and deltas and "".join(deltas) == text[: len("".join(deltas))]
    # A stop string taken from the answer ends it there, streamed or not, with finish_reason "stop".
    stop = text.strip()[len(text.strip()) // 2 :][:3]
    cut, _ = answer(engine, [(image, prompt, {"max_tokens": 16, "stop": [stop], "stream": True})], 1, False)
    deltas, completion = cut[0]
    assert completion.text == text[: text.find(stop)] and completion.finish_reason == "stop"
    assert "".join(deltas) == completion.text[: len("".join(deltas))] and stop not in "".join(deltas)


def test_a_seeded_sampled_request_repeats_and_sampling_differs_from_greedy():
    engine = engine_for("tiny-paligemma2")
    fields = {"max_tokens": 12, "temperature": 1.5, "seed": 7}
    requests = [(IMAGES[1], "caption en", fields), (IMAGES[1], "caption en", fields)]
    (first, second), sizes = answer(engine, requests, max_batch=8, together=True)
    assert first[1].text == second[1].text
    assert sizes == {2: 1}  # one batch from the queue, generated as two seeded groups


def test_generate_batch_gives_each_row_its_own_budget_unchanged():
    engine = engine_for("tiny-paligemma2")
    samples = [
        Sample(image=image, prefix="caption en", suffix="", source=f"s{i}") for i, image in enumerate(IMAGES)
    ]
    budgets = [2, 7, 4, 1]
    together = generate_batch(engine.model, engine.processor, samples, engine.family, max_new_tokens=budgets)
    alone = [
        generate_batch(engine.model, engine.processor, [s], engine.family, max_new_tokens=b)[0]
        for s, b in zip(samples, budgets, strict=True)
    ]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert all(len(g.token_ids) <= b for g, b in zip(together, budgets, strict=True))
    with pytest.raises(ValueError, match="2 token budgets for 4 samples"):
        generate_batch(engine.model, engine.processor, samples, engine.family, max_new_tokens=[1, 2])


def test_the_logprob_recorder_matches_the_scores_generate_returns():
    engine = engine_for("tiny-paligemma2")
    sample = Sample(image=IMAGES[2], prefix="detect circle", suffix="", source="s", task="detect")
    (recorded,) = generate_batch(
        engine.model, engine.processor, [sample], engine.family, max_new_tokens=8, logprobs=True
    )
    from pg_tune.evaluate.generate import batch_inputs

    collator = engine.family.collator(engine.processor, 64, train=False)
    inputs = batch_inputs(collator, [sample], torch.device("cpu"), torch.float32)
    out = engine.model.generate(**inputs, max_new_tokens=8, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, **engine.family.generation_kwargs(engine.processor))  # fmt: skip
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    expected = [
        float(torch.log_softmax(out.scores[k][0], -1)[new[k]]) for k in range(len(recorded.token_logprobs))
    ]
    assert list(recorded.token_logprobs) == pytest.approx(expected, abs=1e-5)


def test_the_queue_is_bounded():
    batcher = Batcher(
        lambda jobs: None, max_batch=1, max_wait_s=0, max_queue=2
    )  # not started: nothing drains
    loop = asyncio.new_event_loop()
    try:
        chat = parse_chat_request(chat_body(IMAGES[0], "caption en"), LIMITS)
        jobs = [Job(chat, Sample(IMAGES[0], "caption en", "", "t"), loop) for _ in range(3)]
        batcher.submit(jobs[0])
        batcher.submit(jobs[1])
        with pytest.raises(QueueFull, match=r"2 request\(s\) already waiting"):
            batcher.submit(jobs[2])
    finally:
        loop.close()


def test_stop_string_helpers():
    assert first_stop("a red circle.", [".", " circle"]) == 5
    assert first_stop("abc", ["x"]) is None
    assert streamable("a red ci", [" circle"]) == len("a red")  # " ci" may still become " circle"
    assert streamable("a red  ", []) == len("a red")  # trailing space may be stripped from the answer
    assert streamable("caf\ufffd", []) == 3  # half a character
