"""CIDEr-D, BLEU-4 and the PTB tokeniser against golden values from pycocoevalcap 1.2.

How the golden values were produced (scratch venv outside the repo, nothing of it is committed):

    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install pycocoevalcap==1.2 numpy
    # then, with RAW_REFS / RAW_PREDS below (java 17 on PATH for the PTB tokenizer):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.bleu.bleu import Bleu
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in RAW_REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in RAW_PREDS.items()})
    Cider().compute_score(gts, res)           # -> REF_CIDER, REF_CIDER_PER_ID
    Bleu(4).compute_score(gts, res)           # -> [..., REF_BLEU4], [..., REF_BLEU4_PER_ID]

`gts` / `res` printed by that run are TOKENISED_REFS / TOKENISED_PREDS below. The edge-case
values came from the same Cider / Bleu classes called directly on EDGE_REFS / EDGE_PREDS.
"""

import pytest

from pg_tune.evaluate.metrics import bleu4, cider_d, ptb_tokenize

RAW_REFS = {
    "img1": ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
             "A person on a surfboard, riding a wave!"],
    "img2": ["Two dogs playing with a frisbee in the grass.", "A couple of dogs running on a field",
             "Dogs chase a frisbee on a green lawn.", "Two brown dogs play in a park; it's sunny."],
    "img3": ["A plate of food with broccoli and rice.", "A white plate topped with rice (and vegetables)."],
    "img4": ["A red double-decker bus driving down a street.", "A bus on a city street near buildings.",
             "A large red bus parked at the curb.", "The double-decker bus is red.",
             "A tour bus driving through the city..."],
    "img5": ["A cat sitting on a laptop's keyboard.", "A cat lies on top of an open laptop.",
             "A black and white cat on a computer."],
}  # fmt: skip
RAW_PREDS = {
    "img1": "A man riding a wave on a surfboard.",
    "img2": "Two dogs playing in the grass.",
    "img3": "A plate of rice and broccoli.",
    "img4": "A red double-decker bus driving down a city street.",
    "img5": "A dog sitting on a couch, isn't it?",
}
# Output of pycocoevalcap's (Java) PTBTokenizer on the captions above.
TOKENISED_REFS = {
    "img1": ["a man riding a wave on top of a surfboard", "a surfer rides a large wave in the ocean",
             "a person on a surfboard riding a wave"],
    "img2": ["two dogs playing with a frisbee in the grass", "a couple of dogs running on a field",
             "dogs chase a frisbee on a green lawn", "two brown dogs play in a park it 's sunny"],
    "img3": ["a plate of food with broccoli and rice", "a white plate topped with rice -lrb- and vegetables -rrb-"],
    "img4": ["a red double-decker bus driving down a street", "a bus on a city street near buildings",
             "a large red bus parked at the curb", "the double-decker bus is red",
             "a tour bus driving through the city"],
    "img5": ["a cat sitting on a laptop 's keyboard", "a cat lies on top of an open laptop",
             "a black and white cat on a computer"],
}  # fmt: skip
TOKENISED_PREDS = {
    "img1": "a man riding a wave on a surfboard",
    "img2": "two dogs playing in the grass",
    "img3": "a plate of rice and broccoli",
    "img4": "a red double-decker bus driving down a city street",
    "img5": "a dog sitting on a couch is n't it",
}
REF_CIDER = 2.1390348666827252
REF_CIDER_PER_ID = {
    "img1": 3.839021029308278,
    "img2": 1.4834096786906705,
    "img3": 2.123685820137072,
    "img4": 2.820943464743971,
    "img5": 0.42811434053363545,
}
REF_BLEU4 = 0.5179352997831449
REF_BLEU4_PER_ID = {
    "img1": 0.8408964150152106,
    "img2": 7.699630012415168e-05,
    "img3": 5.444460594406228e-05,
    "img4": 0.8694417437713836,
    "img5": 4.032989115749891e-05,
}

# Empty prediction, one-word prediction/reference, exact match.
EDGE_REFS = {
    1: ["a dog", "a brown dog runs"],
    2: ["cat", "a cat sleeps on a mat"],
    3: ["red car", "a red car parked"],
}
EDGE_PREDS = {1: "", 2: "cat", 3: "a red car parked"}
EDGE_CIDER = 2.779936152084682
EDGE_CIDER_PER_ID = {1: 0.0, 2: 1.6916551736610728, 3: 6.648153282592974}
EDGE_BLEU4 = 0.6703200455608298
EDGE_BLEU4_PER_ID = {1: 0.0, 2: 3.162277656215536e-05, 3: 0.9999999992291674}

TOL = 1e-6


def test_cider_d_matches_pycocoevalcap_on_reference_tokens():
    score, per_id = cider_d(TOKENISED_PREDS, TOKENISED_REFS, tokenize=False)
    assert score == pytest.approx(REF_CIDER, abs=TOL)
    assert per_id.keys() == REF_CIDER_PER_ID.keys()
    for image_id, expected in REF_CIDER_PER_ID.items():
        assert per_id[image_id] == pytest.approx(expected, abs=TOL)


def test_bleu4_matches_pycocoevalcap_on_reference_tokens():
    score, per_id = bleu4(TOKENISED_PREDS, TOKENISED_REFS, tokenize=False)
    assert score == pytest.approx(REF_BLEU4, abs=TOL)
    for image_id, expected in REF_BLEU4_PER_ID.items():
        assert per_id[image_id] == pytest.approx(expected, abs=TOL)


def test_python_tokeniser_reproduces_java_ptb_tokens_on_the_corpus():
    for image_id, captions in RAW_REFS.items():
        assert [ptb_tokenize(c) for c in captions] == TOKENISED_REFS[image_id]
        assert ptb_tokenize(RAW_PREDS[image_id]) == TOKENISED_PREDS[image_id]


def test_end_to_end_on_raw_captions_matches_pycocoevalcap_with_java_tokenizer():
    score, _ = cider_d(RAW_PREDS, RAW_REFS)
    assert score == pytest.approx(REF_CIDER, abs=TOL)
    score, _ = bleu4(RAW_PREDS, RAW_REFS)
    assert score == pytest.approx(REF_BLEU4, abs=TOL)


def test_edge_cases_match_pycocoevalcap():
    score, per_id = cider_d(EDGE_PREDS, EDGE_REFS, tokenize=False)
    assert score == pytest.approx(EDGE_CIDER, abs=TOL)
    assert per_id == pytest.approx(EDGE_CIDER_PER_ID, abs=TOL)
    score, per_id = bleu4(EDGE_PREDS, EDGE_REFS, tokenize=False)
    assert score == pytest.approx(EDGE_BLEU4, abs=TOL)
    assert per_id == pytest.approx(EDGE_BLEU4_PER_ID, abs=TOL)


@pytest.mark.parametrize(
    ("raw", "java_ptb"),
    [
        # Each right-hand side was produced by pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1).
        ("The dog's ball is red; isn't it?", "the dog 's ball is red is n't it"),
        ("A black-and-white photo of a U.S. flag.", "a black-and-white photo of a u.s. flag"),
        ("A clock that reads 10:30, with 1,000 people around it...", "a clock that reads 10:30 with 1,000 people around it"),
        ('"Stop" sign (red) near a street -- at night.', "stop sign -lrb- red -rrb- near a street at night"),
        ("People can't see the 3.5 inch screen's edge.", "people ca n't see the 3.5 inch screen 's edge"),
        ("A man in a 'cool' hat says: we'll go, they're here, I'm done, you've won, he'd go.",
         "a man in a cool hat says we 'll go they 're here i 'm done you 've won he 'd go"),
        ("A $5 bill and 50% off sign & more #tags", "a $ 5 bill and 50 % off sign & more #tags"),
        ("Mr. Smith stands near St. Mary's church.", "mr. smith stands near st. mary 's church"),
        ("A plate [with] {food} on it?!", "a plate -lsb- with -rsb- -lcb- food -rcb- on it ?!"),
        ("It's 5 p.m. and the cats' bowls are empty.", "it 's 5 p.m. and the cats bowls are empty"),
        ("Two dogs' toys, lying on the grass!", "two dogs toys lying on the grass"),
        ("an 'ello there", "an ello there"),
    ],
)  # fmt: skip
def test_python_tokeniser_matches_java_ptb(raw, java_ptb):
    assert ptb_tokenize(raw) == java_ptb


def test_cider_d_depends_on_the_corpus_it_is_scored_with():
    # Document frequencies come from the scored corpus: with one image every n-gram has df = N = 1,
    # so every idf is 0 and the score is 0 (pycocoevalcap gives 0.0 too). Score whole splits, never
    # single examples. With a second, unrelated image the exact match gets the maximum, 10.
    score, _ = cider_d({0: "a b c d e"}, {0: ["a b c d e", "a b c d e"]}, tokenize=False)
    assert score == 0.0
    score, per_id = cider_d(
        {0: "a b c d e", 1: "q"}, {0: ["a b c d e", "a b c d e"], 1: ["x y z"]}, tokenize=False
    )
    assert per_id == pytest.approx({0: 10.0, 1: 0.0})
    assert score == pytest.approx(5.0)


def test_mismatched_ids_are_refused():
    with pytest.raises(ValueError, match="same ids"):
        cider_d({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError, match="at least one reference"):
        bleu4({1: "a"}, {1: []})
