"""VQAv2 accuracy: leave-one-out arithmetic and the official normalisation rules.

Normalisation cases follow the examples on https://visualqa.org/evaluation.html and the rules of the
official vqaEval.py (processPunctuation / processDigitArticle).
"""

import pytest

from pg_tune.evaluate.metrics import mean_vqa_accuracy, normalize_vqa_answer, vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Yes", "yes"),  # lowercase
        ("two", "2"),  # number words become digits
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("the red one", "red 1"),  # articles dropped
        ("a dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions restored
        ("its", "its"),  # not in the official table
        ("whats that", "what's that"),
        ("2.5", "2.5"),  # decimal point kept
        ("yes.", "yes"),  # other periods dropped
        ("100,000", "100000"),  # digit,digit: punctuation removed, not spaced
        ("black,white", "black white"),  # otherwise punctuation becomes a space ...
        ("black, white", "black white"),  # ... or is removed when it touches a space
        ("t-shirt", "t shirt"),
        ("left / right", "left right"),
        ("one's", "one's"),  # apostrophes are not punctuation here
        ("12:30", "12:30"),  # neither are colons
        ("  Two\tDogs\n", "2 dogs"),
    ],
)
def test_official_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def _answers(n_match: int, match: str = "2", other: str = "3") -> list[str]:
    return [match] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize(
    ("n_match", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # 9 subsets contain the one match: 9 * (1/3) / 10
        (2, 0.6),  # 8 subsets see 2: (8 * 2/3 + 2 * 1/3) / 10
        (3, 0.9),  # 7 subsets see 3 -> 1, 3 subsets see 2 -> 2/3: (7 + 2) / 10
        (4, 1.0),  # every subset sees at least 3
        (10, 1.0),
    ],
)
def test_leave_one_out_accuracy(n_match, expected):
    answers = _answers(n_match) if n_match < 10 else ["2"] * 10
    assert vqa_accuracy("2", answers) == pytest.approx(expected, abs=1e-12)


def test_prediction_is_normalised_when_humans_disagree():
    # "Two" -> "2", "the 3" -> "3": normalised because the ten answers are not all the same.
    assert vqa_accuracy("Two.", _answers(3, match="2", other="the 3")) == pytest.approx(0.9)
    assert vqa_accuracy("a 3", _answers(3, match="2", other="the 3")) == 1.0


def test_no_normalisation_when_all_humans_agree():
    # Official quirk (kept by big_vision too): unanimous answers are compared raw, after whitespace
    # stripping only, so "two" does not match ten "2"s but " 2\n" does.
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy(" 2\n", ["2"] * 10) == 1.0


def test_mean_over_questions():
    assert mean_vqa_accuracy(["2", "yes"], [_answers(1), ["yes"] * 10]) == pytest.approx((0.3 + 1.0) / 2)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="no human answers"):
        vqa_accuracy("2", [])
    with pytest.raises(TypeError, match="single string"):
        vqa_accuracy("2", "2")
    with pytest.raises(ValueError, match="2 predictions but 1"):
        mean_vqa_accuracy(["a", "b"], [["a"] * 10])


def _official_leave_one_out(prediction: str, answers: list[str]) -> float:
    """The official vqaEval.py arithmetic, applied blindly to however many answers (the old rule)."""
    matches = sum(a == prediction for a in answers)
    return sum(min(1.0, (matches - (a == prediction)) / 3.0) for a in answers) / len(answers)


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        (["yes", "yes", "yes"], 1.0),  # unanimous 3-answer row: big_vision 1.0, leave-one-out 0.67
        (["yes", "yes"], 2 / 3),  # 2 of 2 match: min(2/3, 1); leave-one-out gave 0.33
        (["yes", "no", "no"], 1 / 3),  # 1 of 3: min(1/3, 1); leave-one-out gave 0.0
        (["yes", "yes", "no", "no", "no"], 2 / 3),  # leave-one-out gave (2/3 + 3 * 2/3) / 5 = 0.53
        (["yes"] * 3 + ["no"] * 9, 1.0),  # 12 answers: not the official setting; leave-one-out 0.92
    ],
)
def test_fewer_or_more_than_ten_answers_follow_big_vision_generic_rule(answers, expected):
    assert vqa_accuracy("yes", answers) == pytest.approx(expected, abs=1e-12)
    # Each case is one where the two rules disagree, so the test tells them apart.
    assert _official_leave_one_out("yes", answers) != pytest.approx(expected, abs=1e-6)


def test_ten_answers_keep_the_official_rule_where_generic_would_differ():
    answers = ["yes"] * 3 + ["no"] * 7
    assert vqa_accuracy("yes", answers) == pytest.approx(_official_leave_one_out("yes", answers)) == 0.9
    assert min(1.0, 3 / 3) != 0.9  # big_vision's generic rule would give 1.0 here


def test_single_answer_is_exact_match_after_normalisation():
    assert vqa_accuracy("Two.", ["2"]) == 1.0
    assert vqa_accuracy("3", ["2"]) == 0.0
