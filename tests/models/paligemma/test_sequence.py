"""The training sequence contract: layout, token types, labels, truncation, prefix-LM attention."""

import pytest
import torch
from PIL import Image

from pg_tune.data import IGNORE_INDEX, DataError, Sample
from pg_tune.models.paligemma import PaliGemmaFamily
from pg_tune.models.paligemma.layout import BOS_ID, EOS_ID, IMAGE_TOKEN_ID, NEWLINE_ID, PAD_ID
from pg_tune.models.paligemma.tiny import PRESETS, build_model, build_processor
from pg_tune.train.loss import SuffixLoss
from tests.families import family_of
from tests.numerics import assert_close_to_scale


def _image(colour=(255, 0, 0)):
    return Image.new("RGB", (40, 30), colour)


ROWS = [
    Sample(_image(), "caption en", "a red circle", "row0"),
    Sample(_image((0, 0, 255)), "answer en what is on the left", "a blue square on the left", "row1"),
]


@pytest.fixture(scope="module")
def processor():
    return build_processor(PRESETS["tiny-paligemma2"])


def test_exact_token_sequence(processor):
    collator = PaliGemmaFamily().collator(processor, max_text_length=32)
    batch = collator([(0, ROWS[0])])
    n = processor.image_seq_length
    tok = processor.tokenizer
    expected = (
        [IMAGE_TOKEN_ID] * n
        + [BOS_ID]
        + tok.convert_tokens_to_ids(["caption", "▁en"])
        + [NEWLINE_ID]
        + tok.convert_tokens_to_ids(["a", "▁red", "▁circle"])
        + [EOS_ID]
    )
    assert batch["input_ids"][0].tolist() == expected
    prefix_len = n + 4
    assert batch["token_type_ids"][0].tolist() == [0] * prefix_len + [1] * 4
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * prefix_len + expected[prefix_len:]


def test_matches_transformers_processor(processor):
    """Golden test: same tensors as PaliGemmaProcessor(images, text, suffix) with right padding."""
    ours = PaliGemmaFamily().collator(processor, max_text_length=64)(list(enumerate(ROWS)))
    theirs = processor(
        images=[r.image for r in ROWS],
        text=["<image>" + r.prefix for r in ROWS],
        suffix=[r.suffix for r in ROWS],
        padding="longest",
        padding_side="right",
        return_tensors="pt",
    )
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert torch.equal(ours[key], theirs[key]), key
    assert torch.allclose(ours["pixel_values"], theirs["pixel_values"])


def test_padding_is_right_and_unsupervised(processor):
    batch = PaliGemmaFamily().collator(processor, max_text_length=64)(list(enumerate(ROWS)))
    short = batch["attention_mask"][0]
    pads = short == 0
    assert pads.any() and not short[-int(pads.sum()) :].any()  # pads sit at the end
    assert (batch["input_ids"][0][pads] == PAD_ID).all()
    assert (batch["labels"][0][pads] == IGNORE_INDEX).all()
    assert (batch["token_type_ids"][0][pads] == 0).all()


def test_truncation_cuts_only_the_suffix(processor):
    collator = PaliGemmaFamily().collator(processor, max_text_length=6)
    row = collator.encode(ROWS[0])  # bos + 2 prompt tokens + "\n" = 4, room for 2 suffix tokens
    n = processor.image_seq_length
    assert row.input_ids[:n] == [IMAGE_TOKEN_ID] * n
    assert len(row.input_ids) == n + 6 and row.truncated
    assert row.input_ids[-1] != EOS_ID
    with pytest.raises(DataError, match="row1.*max_text_length"):
        collator.encode(ROWS[1])  # the prompt alone is over budget: never cut image or prompt


def test_empty_suffix_is_rejected(processor):
    collator = PaliGemmaFamily().collator(processor, max_text_length=32)
    with pytest.raises(DataError, match=r"data/x.jsonl:7: empty suffix"):
        collator.encode(Sample(_image(), "caption en", "  ", "data/x.jsonl:7"))


def test_generation_rows_are_left_padded_prompts(processor):
    batch = PaliGemmaFamily().collator(processor, max_text_length=64, train=False)(list(enumerate(ROWS)))
    assert "labels" not in batch
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()
    assert (batch["input_ids"][:, -1] == NEWLINE_ID).all()
    assert (batch["token_type_ids"] == 0).all()


def _prefix_logits(model, batch):
    out = model(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
    )
    return out.logits


def test_prefix_lm_attention(tiny_preset):
    """Suffix tokens never influence the prefix side; late prefix tokens do influence early ones."""
    model, processor = build_model(tiny_preset)
    collator = PaliGemmaFamily().collator(processor, max_text_length=32)
    batch = collator([(0, ROWS[1])])
    prefix_side = (batch["token_type_ids"][0] == 0).nonzero().flatten()
    suffix_start = int((batch["token_type_ids"][0] == 1).nonzero()[0])
    with torch.no_grad():
        base = _prefix_logits(model, batch)
        changed_suffix = {k: v.clone() for k, v in batch.items()}
        changed_suffix["input_ids"][0, suffix_start + 1] = 500
        after_suffix = _prefix_logits(model, changed_suffix)
        changed_prefix = {k: v.clone() for k, v in batch.items()}
        changed_prefix["input_ids"][0, suffix_start - 2] = 500  # the last prompt word, before "\n"
        after_prefix = _prefix_logits(model, changed_prefix)
    assert torch.equal(base[0, prefix_side], after_suffix[0, prefix_side])
    first_text = processor.image_seq_length  # the bos position, earlier than the changed token
    assert not torch.allclose(base[0, first_text], after_prefix[0, first_text])
    assert not torch.allclose(base[0, 0], after_prefix[0, 0])  # image tokens see the prompt too


def test_loss_is_on_suffix_and_eos_only(tiny_preset):
    model, processor = build_model(tiny_preset)
    batch = PaliGemmaFamily().collator(processor, max_text_length=32)(list(enumerate(ROWS)))
    loss_sum, n_tokens = SuffixLoss(model, family_of(model))(batch)
    suffix_lengths = [
        len(processor.tokenizer(r.suffix, add_special_tokens=False)["input_ids"]) + 1 for r in ROWS
    ]
    assert int(n_tokens) == sum(suffix_lengths)
    reference = model(
        **{k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids", "labels")}
    ).loss
    assert_close_to_scale(loss_sum / n_tokens, reference)
    # Changing a prompt token's label would not matter: only suffix positions carry labels.
    assert (batch["labels"][batch["token_type_ids"] == 0] == IGNORE_INDEX).all()


def test_rows_sharing_a_source_keep_their_own_targets(processor):
    """RefCOCO's detect and segment entries read the same refs: their rows share a ``source``. Each
    renders its own target whatever the order the sampler visits them in (found by the contract's
    resume row: the first visit's rendering was reused for the other)."""
    from pg_tune.data.sample import ObjectTarget
    from pg_tune.models.paligemma.masks import MaskCodec, make_random_vae_weights

    family = PaliGemmaFamily(mask_codec=MaskCodec(make_random_vae_weights(0)))
    target = (ObjectTarget("", (4, 6, 30, 24), [[4, 6, 30, 6, 30, 24, 4, 24]]),)
    detect = Sample(
        _image(),
        "detect the cat",
        "",
        "refs(unc).p:ref 7[sentence 0]",
        "refer_detect",
        (),
        {},
        target,
        (40, 30),
    )
    segment = Sample(
        _image(), "segment the cat", "", detect.source, "refer_segment", (), {}, target, (40, 30)
    )
    supervised = {}
    for order in ((detect, segment), (segment, detect)):
        batch = family.collator(processor, 64)(list(enumerate(order)))
        for sample, labels in zip(order, batch["labels"], strict=True):
            supervised.setdefault(sample.task, set()).add(int((labels != IGNORE_INDEX).sum()))
    assert supervised == {"refer_detect": {4 + 1}, "refer_segment": {4 + 16 + 1}}  # + <eos>
