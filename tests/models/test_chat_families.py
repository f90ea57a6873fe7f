"""Gemma 3 and SmolVLM2 against their own transformers processors and models (tiny presets).

Golden: the family collator's ids, attention-rule inputs, pixel tensors and labels equal what
``Gemma3Processor`` / ``SmolVLMProcessor`` produce from the chat template's rendering of the same
conversation. Loss: the fused suffix-only loss over the family's pieces equals the model's own.
What every family does end to end (training, evaluation, QLoRA, export, resume, batched generation,
the feature cache) is the family contract's: ``tests/test_contract.py``.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pg_tune.data.sample import DataError, ObjectTarget, Sample
from pg_tune.models.chat import gemma3_tiny, smolvlm_tiny
from pg_tune.models.chat.gemma3 import Gemma3Family
from pg_tune.models.chat.smolvlm import SmolVLMFamily
from pg_tune.train.loss import head_cross_entropy_sum
from tests.numerics import assert_close_to_scale

FAMILIES = {
    "tiny-gemma3": (Gemma3Family, gemma3_tiny),
    "tiny-smolvlm2": (SmolVLMFamily, smolvlm_tiny),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_setup(request):
    family_cls, tiny = FAMILIES[request.param]
    processor = tiny.build_processor(tiny.PRESETS[request.param])
    model = tiny.build_base(request.param)
    return family_cls(), processor, model


def _samples() -> list[Sample]:
    wide = Image.new("RGB", (80, 50), (200, 10, 10))
    tall = Image.new("RGB", (40, 70), (10, 200, 10))
    square = Image.new("RGB", (30, 30), (10, 10, 200))
    return [
        Sample(wide, "caption en", "a red circle", "s0"),
        Sample(
            tall,
            "detect circle ; square",
            "",
            "s1",
            task="detect",
            targets=(ObjectTarget("circle", (4, 5, 30, 40)), ObjectTarget("square", (10, 10, 20, 20))),
            image_size=(40, 70),
        ),
        Sample(square, "answer en what color is the square?", "blue", "s2", task="vqa"),
    ]


def _conversation(family, sample: Sample, with_answer: bool) -> list[dict]:
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": family.render_prompt(sample)}],
        }
    ]
    if with_answer:
        messages.append(
            {"role": "assistant", "content": [{"type": "text", "text": family.render_target(sample)}]}
        )
    return messages


def test_chat_templates_render_the_published_strings():
    g3 = gemma3_tiny.build_processor(gemma3_tiny.PRESETS["tiny-gemma3"])
    sv = smolvlm_tiny.build_processor(smolvlm_tiny.PRESETS["tiny-smolvlm2"])
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Caption this image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
    ]
    assert g3.apply_chat_template(conversation, tokenize=False) == (
        "<bos><start_of_turn>user\n<start_of_image>Caption this image.<end_of_turn>\n"
        "<start_of_turn>model\na red circle<end_of_turn>\n"
    )
    assert g3.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<end_of_turn>\n<start_of_turn>model\n"
    )
    assert sv.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>User:<image>Caption this image.<end_of_utterance>\nAssistant: a red circle<end_of_utterance>\n"
    )
    assert sv.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<end_of_utterance>\nAssistant:"
    )


def test_special_token_ids_are_the_released_ones():
    g3 = gemma3_tiny.build_processor(gemma3_tiny.PRESETS["tiny-gemma3"])
    tok = g3.tokenizer
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")
    }
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}
    assert (tok.boi_token_id, tok.eoi_token_id, tok.image_token_id) == (255_999, 256_000, 262_144)
    config = gemma3_tiny.build_config(gemma3_tiny.PRESETS["tiny-gemma3"])
    assert (config.boi_token_id, config.eoi_token_id, config.image_token_id) == (255_999, 256_000, 262_144)
    assert config.text_config.vocab_size == 262_208 and config.text_config.final_logit_softcapping is None
    assert g3.full_image_sequence.count("<image_soft_token>") == config.mm_tokens_per_image

    sv = smolvlm_tiny.build_processor(smolvlm_tiny.PRESETS["tiny-smolvlm2"])
    tok = sv.tokenizer
    expected = {
        "<|im_start|>": 1,
        "<|im_end|>": 2,
        "<global-img>": 49152,
        "<row_1_col_1>": 49153,
        "<row_6_col_6>": 49188,
        "<fake_token_around_image>": 49189,
        "<image>": 49190,
        "<end_of_utterance>": 49279,
    }
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    for token in expected:  # every control string is ONE token, never split
        assert tok(token, add_special_tokens=False)["input_ids"] == [expected[token]]
    config = smolvlm_tiny.build_config(smolvlm_tiny.PRESETS["tiny-smolvlm2"])
    assert config.image_token_id == 49190 and config.text_config.vocab_size == 49_280


def test_collator_matches_the_processor(family_setup):
    """ids, token types / pixel masks, pixels and labels equal the processor's on the template text."""
    family, processor, _ = family_setup
    samples = _samples()
    batch = family.collator(processor, 256, train=True)(list(enumerate(samples)))
    images = [[s.image] for s in samples]
    full = [processor.apply_chat_template(_conversation(family, s, True), tokenize=False) for s in samples]
    # As TRL calls it: the template already wrote <bos> (Gemma 3's tokenizer would add a second one).
    reference = processor(
        images=images,
        text=full,
        return_tensors="pt",
        padding=True,
        padding_side="right",
        add_special_tokens=False,
    )
    for key in ("input_ids", "attention_mask", "pixel_values", "token_type_ids"):
        if key in reference or key in batch:
            assert torch.equal(batch[key], reference[key]), key
    if "pixel_attention_mask" in reference:  # the same pixels, as bool (1/8 of the processor's int64)
        assert batch["pixel_attention_mask"].dtype == torch.bool
        assert torch.equal(batch["pixel_attention_mask"], reference["pixel_attention_mask"].bool())
    # Labels: everything after the generation prompt except the template's final newline.
    for i, sample in enumerate(samples):
        prompt = processor.apply_chat_template(
            _conversation(family, sample, False), tokenize=False, add_generation_prompt=True
        )
        n_prompt = len(
            processor(images=[[sample.image]], text=[prompt], add_special_tokens=False)["input_ids"][0]
        )
        n_full = int(reference["attention_mask"][i].sum())
        expected = torch.full_like(batch["labels"][i], -100)
        expected[n_prompt : n_full - 1] = reference["input_ids"][i, n_prompt : n_full - 1]
        assert torch.equal(batch["labels"][i], expected)
        supervised = processor.tokenizer.decode(batch["labels"][i][expected != -100])
        assert supervised.strip().startswith(family.render_target(sample))
        assert batch["labels"][i][n_full - 2] == family.end_of_turn_id(processor)


def test_gemma3_token_types_mark_exactly_the_image_soft_tokens():
    family = Gemma3Family()
    processor = gemma3_tiny.build_processor(gemma3_tiny.PRESETS["tiny-gemma3"])
    batch = family.collator(processor, 256, train=True)(list(enumerate(_samples())))
    assert torch.equal(batch["token_type_ids"].bool(), batch["input_ids"] == 262_144)
    assert (batch["token_type_ids"].sum(1) == 16).all()


def test_smolvlm_image_tokens_vary_with_the_aspect_ratio():
    family = SmolVLMFamily()
    processor = smolvlm_tiny.build_processor(smolvlm_tiny.PRESETS["tiny-smolvlm2"])
    collator = family.collator(processor, 256, train=False)
    counts = [int((collator([(0, s)])["input_ids"] == 49190).sum()) for s in _samples()]
    # Longest edge 96 px in 32 px tiles: wide 3 x 2 tiles, tall 2 x 3, square 3 x 3; plus the global view.
    per_tile = smolvlm_tiny.PRESETS["tiny-smolvlm2"].tokens_per_tile
    assert counts == [7 * per_tile, 7 * per_tile, 10 * per_tile]
    batch = collator(list(enumerate(_samples())))
    assert batch["pixel_values"].shape[:2] == (3, 10)
    assert batch["pixel_attention_mask"][0, 7:].sum() == 0  # padding tiles: no real pixels
    assert batch["pixel_attention_mask"][2].all()


@pytest.mark.parametrize("config_softcap", [None, 30.0])
def test_fused_loss_equals_the_models_own(family_setup, config_softcap, monkeypatch):
    """Also with a ``final_logit_softcapping`` in the config, which neither model class applies: the
    fused loss must not apply it either (``ModelFamily.final_softcap``)."""
    family, processor, model = family_setup
    monkeypatch.setattr(
        model.config.get_text_config(), "final_logit_softcapping", config_softcap, raising=False
    )
    batch = family.collator(processor, 256, train=True)(list(enumerate(_samples())))
    model_inputs = {k: v for k, v in batch.items() if k not in ("sample_index", "truncated")}
    model.zero_grad()
    expected = model(**model_inputs).loss
    features = family.image_features(model, batch)
    hidden = family.decoder_hidden(model, batch, features)
    weight, softcap = family.head(model)
    assert softcap is None
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    loss = head_cross_entropy_sum(hidden[:, :-1][mask], weight, targets[mask], softcap) / mask.sum()
    assert_close_to_scale(loss.detach(), expected.detach())


def test_truncation_cuts_only_the_target(family_setup):
    family, processor, _ = family_setup
    sample = Sample(Image.new("RGB", (32, 32)), "caption en", "a red circle " * 20, "long")
    prompt_text, _ = family.collator(processor, 256, train=False).text_length(sample)
    full = family.collator(processor, 256, train=True)([(0, sample)])
    tight = family.collator(processor, prompt_text + 3, train=True)([(0, sample)])
    assert full["truncated"].tolist() == [False] and tight["truncated"].tolist() == [True]
    assert int((tight["labels"] != -100).sum()) == 3  # the room left after the prompt, all target
    n = tight["input_ids"].shape[1]
    assert torch.equal(tight["input_ids"][0], full["input_ids"][0, :n])  # image and prompt intact
    with pytest.raises(DataError, match="no room for the target"):
        family.collator(processor, prompt_text, train=True)([(0, sample)])


def test_control_tokens_in_text_are_refused(family_setup):
    family, processor, _ = family_setup
    bad = "<end_of_turn>" if isinstance(family, Gemma3Family) else "<end_of_utterance>"
    sample = Sample(Image.new("RGB", (32, 32)), "caption en", f"a {bad} b", "x.jsonl:3")
    with pytest.raises(DataError, match=r"x\.jsonl:3.*suffix"):
        family.collator(processor, 256, train=True)([(0, sample)])


@pytest.mark.parametrize(
    ("targets", "vision", "per_lm_layer", "per_vision_layer", "projector"),
    [
        ("attention", False, 4, 0, 0),
        ("attention_mlp", False, 7, 0, 0),
        ("attention", True, 4, 4, 0),
        ("all_linear", True, 7, 6, 1),
    ],
)
def test_lora_targets(family_setup, targets, vision, per_lm_layer, per_vision_layer, projector):
    import re

    from pg_tune.config.recipe import LoraConfig

    family, _, model = family_setup
    pattern = re.compile(family.lora_target_regex(LoraConfig(targets=targets, vision=vision)))
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    matched = [n for n in linear if pattern.match(n)]
    lm = [n for n in matched if n.startswith(family.modules.language_model + ".")]
    vis = [n for n in matched if n.startswith(family.modules.vision + ".")]
    proj = [n for n in matched if n.startswith(family.modules.projector + ".")]
    has_projector_linear = family.projector_linears is not None  # Gemma 3: a bare matrix, no nn.Linear
    assert len(lm) == 2 * per_lm_layer and len(vis) == 2 * per_vision_layer
    assert len(proj) == (projector if has_projector_linear else 0)
    assert len(matched) == len(lm) + len(vis) + len(proj)  # never the head


def test_registry_finds_the_chat_families(tmp_path):
    from pg_tune.models.family import family_for

    for name, cls in (
        ("tiny-gemma3", Gemma3Family),
        ("gemma3", Gemma3Family),
        ("tiny-smolvlm2", SmolVLMFamily),
    ):
        assert isinstance(family_for(name), cls)
    # Hub ids offline, by name hint (and PaliGemma 1's "paligemma-3b" is not mistaken for Gemma 3).
    assert isinstance(family_for("google/gemma-3-4b-it"), Gemma3Family)
    assert isinstance(family_for("HuggingFaceTB/SmolVLM2-500M-Video-Instruct"), SmolVLMFamily)
    assert family_for("google/paligemma-3b-pt-224").name == "paligemma"
    ckpt = smolvlm_tiny.save_checkpoint("tiny-smolvlm2", tmp_path / "sv")
    assert isinstance(family_for(str(ckpt)), SmolVLMFamily)  # from config.json's model_type


def test_frozen_vision_runs_without_autograd_and_lora_vision_with_it(family_setup):
    import peft

    from pg_tune.config.recipe import LoraConfig

    family, processor, model = family_setup
    batch = family.collator(processor, 256, train=True)(list(enumerate(_samples()[:2])))
    for vision in (False, True):
        lora = peft.LoraConfig(r=2, target_modules=family.lora_target_regex(LoraConfig(vision=vision)))
        wrapped = peft.get_peft_model(model, lora)
        features = family.image_features(family.unwrap(wrapped), batch)
        assert features.requires_grad == vision  # frozen encoder: no graph is built
        wrapped.unload()


def test_a_frozen_encoder_in_chunks_gives_the_models_own_features(family_setup, monkeypatch):
    """``image_features`` runs a frozen encoder a few pictures at a time (``ENCODER_POSITIONS``):
    the same features, in the same order, as the model's ``get_image_features`` over the whole
    batch (SmolVLM2: its real tiles, padding tiles dropped)."""
    import pg_tune.models.family as family_module

    family, processor, model = family_setup
    model.requires_grad_(False)
    batch = family.collator(processor, 256, train=True)(list(enumerate(_samples())))
    pixels, *extra = (batch[k] for k in family.image_inputs)
    with torch.no_grad():
        output = model.model.get_image_features(pixels.to(model.dtype), *extra).pooler_output
    whole = torch.cat([f.reshape(-1, f.shape[-1]) for f in output])  # per image (a tensor) or row (a list)
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    monkeypatch.setattr(family_module, "ENCODER_POSITIONS", patches)  # one picture per call
    assert family.encoder_chunk(model.config.vision_config) == 1
    chunked = family.image_features(model, batch)
    chunked = chunked.reshape(-1, chunked.shape[-1])
    assert chunked.shape == whole.shape and not chunked.requires_grad
    # Each picture's features alone vs in a batch: only the matmuls' blocking differs (fp32).
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())
