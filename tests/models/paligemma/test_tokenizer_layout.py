"""The tiny tokenizer must have PaliGemma's real special-token layout."""

from pg_tune.models.paligemma.layout import BOS_ID, EOS_ID, IMAGE_TOKEN_ID, NEWLINE_ID, PAD_ID
from pg_tune.models.paligemma.tiny import build_tokenizer


def test_special_ids_match_paligemma():
    tok = build_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (PAD_ID, EOS_ID, BOS_ID) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("\n") == NEWLINE_ID == 108
    assert tok.convert_tokens_to_ids("<loc0000>") == 256000
    assert tok.convert_tokens_to_ids("<loc1023>") == 257023
    assert tok.convert_tokens_to_ids("<seg000>") == 257024
    assert tok.convert_tokens_to_ids("<seg127>") == 257151
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID == 257152
    assert len(tok) == 257153


def test_every_loc_and_seg_token_is_one_token():
    tok = build_tokenizer()
    text = "".join(f"<loc{i:04d}>" for i in range(1024)) + "".join(f"<seg{i:03d}>" for i in range(128))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(range(256000, 256000 + 1024 + 128))
    # Inside ordinary text too, with a label after the box.
    ids = tok("<loc0001><loc0002><loc0003><loc0004> red circle", add_special_tokens=False)["input_ids"]
    assert ids[:4] == [256001, 256002, 256003, 256004]


def test_text_round_trips_through_byte_fallback():
    tok = build_tokenizer()
    text = "a red circle ; zebra über 東京 <loc0100>"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
