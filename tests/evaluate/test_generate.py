"""Generation sees the training prefix mask, batches like single samples, and honours its budgets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pg_tune.data.formats.shapes import draw_shape
from pg_tune.data.sample import Sample
from pg_tune.evaluate.generate import batch_inputs, generate, max_new_tokens_for
from pg_tune.models.paligemma import PaliGemmaFamily
from pg_tune.models.paligemma.layout import EOS_ID
from pg_tune.models.paligemma.tiny import build_model
from tests.families import family_of
from tests.numerics import assert_close_to_scale

PROMPTS = [
    ("caption en", "a red circle", "caption"),
    ("answer en what colour is the shape in the picture", "red", "vqa"),
    ("detect circle", "<loc0100><loc0200><loc0300><loc0400> circle", "detect"),
]


def _samples() -> list[Sample]:
    import random

    rng = random.Random(3)
    out = []
    for i, (prefix, suffix, task) in enumerate(PROMPTS):
        image, *_ = draw_shape(rng, 112)
        out.append(Sample(image=image, prefix=prefix, suffix=suffix, source=f"test[{i}]", task=task))
    return out


@pytest.fixture(scope="module", params=["tiny-paligemma", "tiny-paligemma2"])
def model_and_processor(request):
    return build_model(request.param, seed=1)


@pytest.fixture(scope="module")
def pg2_model_and_processor():
    return build_model("tiny-paligemma2", seed=1)


def test_prefill_logits_equal_training_mode_prefix_logits(model_and_processor):
    model, processor = model_and_processor
    samples = _samples()
    train_collator = PaliGemmaFamily().collator(processor, 64, train=True)
    batch = train_collator(list(enumerate(samples)))
    with torch.no_grad():
        train_logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            pixel_values=batch["pixel_values"],
        ).logits
    # The last prefix token ("\n") is the last 0 in token_type_ids among the real tokens of each row.
    last_prefix = [int(((row == 0) & (mask == 1)).nonzero().max()) for row, mask in
                   zip(batch["token_type_ids"], batch["attention_mask"], strict=True)]  # fmt: skip
    expected = torch.stack([train_logits[i, p] for i, p in enumerate(last_prefix)])

    inputs = batch_inputs(
        PaliGemmaFamily().collator(processor, 64, train=False), samples, torch.device("cpu"), torch.float32
    )
    assert (inputs["attention_mask"][:, 0] == 0).any(), "prompts of different lengths must be left-padded"
    out = model.generate(
        **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True,
        pad_token_id=0,
    )  # fmt: skip
    assert_close_to_scale(out.logits[0], expected)

    # The check has teeth: a causal prefill (no token_type_ids) gives different logits.
    causal_inputs = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    causal = model.generate(
        **causal_inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True,
        pad_token_id=0,
    )  # fmt: skip
    assert not torch.allclose(causal.logits[0], expected, atol=1e-3)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_batched_left_padded_generation_equals_one_by_one(model_and_processor, num_beams):
    model, processor = model_and_processor
    samples = [dataclasses.replace(s, task="caption") for s in _samples()]  # one batch
    batched = generate(
        model, processor, samples, family_of(model), batch_size=8, max_new_tokens=6, num_beams=num_beams
    )
    single = [
        generate(model, processor, [s], family_of(model), max_new_tokens=6, num_beams=num_beams)[0]
        for s in samples
    ]
    assert batched == single
    assert any(batched), "a random tiny model still emits some tokens"


def test_per_task_budget_and_input_order(pg2_model_and_processor, monkeypatch):
    model, processor = pg2_model_and_processor
    samples = _samples()
    budgets = {"caption": 1, "vqa": 3}
    calls = []
    real_generate = model.generate

    def spy(**kwargs):
        out = real_generate(**kwargs)
        calls.append((kwargs["max_new_tokens"], out.shape[1] - kwargs["input_ids"].shape[1]))
        return out

    monkeypatch.setattr(model, "generate", spy)
    texts = generate(
        model, processor, samples, family_of(model), max_new_tokens=5, max_new_tokens_per_task=budgets
    )
    assert sorted(budget for budget, _ in calls) == [1, 3, 5]  # one batch per task, each with its budget
    assert all(new_tokens <= budget for budget, new_tokens in calls)
    # Order is the input order even though samples are grouped per task.
    again = [
        generate(model, processor, [s], family_of(model), max_new_tokens=5, max_new_tokens_per_task=budgets)[
            0
        ]
        for s in samples
    ]
    assert texts == again
    assert max_new_tokens_for("detect", 32, {"detect": 128}) == 128
    assert max_new_tokens_for("vqa", 32, {"detect": 128}) == 32


def test_stops_at_eos_and_keeps_loc_tokens(pg2_model_and_processor, monkeypatch):
    model, processor = pg2_model_and_processor
    loc = processor.tokenizer.convert_tokens_to_ids("<loc0007>")
    word = processor.tokenizer.convert_tokens_to_ids("▁cat")
    real_generate = model.generate

    def fake_generate(**kwargs):
        prompt = kwargs["input_ids"]
        tail = torch.tensor([[loc, word, EOS_ID, word, 0]] * prompt.shape[0])
        return torch.cat([prompt, tail], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    try:
        assert generate(model, processor, _samples()[:1], family_of(model)) == ["<loc0007> cat"]
    finally:
        monkeypatch.setattr(model, "generate", real_generate)


def test_peft_wrapped_and_merged_models_generate_like_the_base(pg2_model_and_processor):
    import copy

    import peft

    base, processor = pg2_model_and_processor
    samples = _samples()[:2]
    expected = generate(base, processor, samples, family_of(base), max_new_tokens=4)
    config = peft.LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    wrapped = peft.get_peft_model(copy.deepcopy(base), config)  # LoRA B starts at 0: same function
    assert generate(wrapped, processor, samples, family_of(wrapped), max_new_tokens=4) == expected
    merged = wrapped.merge_and_unload()
    assert generate(merged, processor, samples, family_of(merged), max_new_tokens=4) == expected


def test_generate_with_logprobs_gives_each_kept_token_its_log_probability(pg2_model_and_processor):
    from pg_tune.evaluate.generate import generate_with_logprobs

    model, processor = pg2_model_and_processor
    samples = _samples()
    generated = generate_with_logprobs(model, processor, samples, family_of(model), max_new_tokens=6)
    assert [g.text for g in generated] == generate(
        model, processor, samples, family_of(model), max_new_tokens=6
    )
    for sample in samples:
        (g,) = generate_with_logprobs(
            model, processor, [sample], family_of(model), max_new_tokens=6
        )  # same padding as below
        inputs = batch_inputs(
            PaliGemmaFamily().collator(processor, 64, train=False),
            [sample],
            torch.device("cpu"),
            torch.float32,
        )
        out = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
            eos_token_id=EOS_ID, pad_token_id=0,
        )  # fmt: skip
        ids = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        kept = ids.index(EOS_ID) if EOS_ID in ids else len(ids)
        expected = [
            float(torch.log_softmax(out.logits[step][0].float(), -1)[ids[step]]) for step in range(kept)
        ]
        assert len(g.token_logprobs) == kept
        assert g.token_logprobs == pytest.approx(expected, abs=1e-4)
        assert all(v <= 0 for v in g.token_logprobs)


def test_generate_with_logprobs_under_beam_search_keeps_texts(pg2_model_and_processor):
    from pg_tune.evaluate.generate import generate_with_logprobs

    model, processor = pg2_model_and_processor
    samples = _samples()
    beams = generate_with_logprobs(model, processor, samples, family_of(model), max_new_tokens=5, num_beams=2)
    assert [g.text for g in beams] == generate(
        model, processor, samples, family_of(model), max_new_tokens=5, num_beams=2
    )
    assert all(g.token_logprobs and all(v <= 1e-6 for v in g.token_logprobs) for g in beams)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_detect_generations_carry_token_logprobs_of_the_model(
    pg2_model_and_processor, num_beams, monkeypatch
):
    # Each token's log-probability must be what a teacher-forced forward pass over prompt + output
    # gives at that position (log-softmax of the logits), for greedy and for beam search alike.

    from pg_tune.evaluate.generate import Generated, generate_with_logprobs

    model, processor = pg2_model_and_processor
    sample = _samples()[2]
    assert sample.task == "detect"
    outputs = []
    real_generate = model.generate

    def spy(**kwargs):
        outputs.append((kwargs, real_generate(**kwargs)))
        return outputs[-1][1]

    monkeypatch.setattr(model, "generate", spy)
    (text,) = generate_with_logprobs(
        model, processor, [sample], family_of(model), max_new_tokens=6, num_beams=num_beams
    )
    monkeypatch.setattr(model, "generate", real_generate)
    assert isinstance(text, Generated) and text.token_logprobs
    spans = list(text.token_spans)
    assert "".join(text.text[a:b] for a, b in spans) == text.text  # spans tile the text in order
    ((inputs, out),) = outputs
    prompt_length = inputs["input_ids"].shape[1]
    generated = out.sequences[:, prompt_length : prompt_length + len(spans)]
    n = generated.shape[1]
    full = {
        "input_ids": torch.cat([inputs["input_ids"], generated], dim=1),
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(generated)], dim=1),
        "token_type_ids": torch.cat([inputs["token_type_ids"], torch.ones_like(generated)], dim=1),
        "pixel_values": inputs["pixel_values"],
    }
    with torch.no_grad():
        logits = model(**full).logits[0, -n - 1 : -1]
    expected = torch.log_softmax(logits.float(), dim=-1).gather(1, generated[0, :, None])[:, 0]
    assert_close_to_scale(torch.tensor(text.token_logprobs), expected)
    assert [lp for *_, lp in text.scored_tokens()] == list(text.token_logprobs)
