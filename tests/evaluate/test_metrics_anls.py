"""ANLS on hand-computed cases."""

import pytest

from pg_tune.evaluate.metrics import anls, anls_score, levenshtein


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("same", "same", 0)],
)
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


def test_exact_match_after_lowercase_and_strip():
    assert anls_score("  Paris ", ["paris"]) == 1.0
    assert anls_score("Paris", ["paris"], lowercase=False) == pytest.approx(0.8)  # one substitution / 5


def test_one_edit():
    # "1991" vs "1990": 1 edit / 4 chars -> NL 0.25 -> 0.75.
    assert anls_score("1991", ["1990"]) == pytest.approx(0.75)
    # "invoice" vs "invoices": 1 / 8 -> 0.875.
    assert anls_score("invoice", ["invoices"]) == pytest.approx(0.875)


def test_nl_at_or_above_threshold_scores_zero():
    # "abcd" vs "abxy": 2 / 4 = 0.5, not < 0.5 -> 0.
    assert anls_score("abcd", ["abxy"]) == 0.0
    # "abc" vs "xyz": NL 1 -> 0.
    assert anls_score("abc", ["xyz"]) == 0.0
    # Just under the threshold: "abcde" vs "abcxy": 2 / 5 = 0.4 -> 0.6.
    assert anls_score("abcde", ["abcxy"]) == pytest.approx(0.6)


def test_max_over_ground_truths():
    assert anls_score("1991", ["nineteen ninety", "1990", "xyz"]) == pytest.approx(0.75)
    assert anls_score("xyz", ["nineteen ninety", "1990", "XYZ"]) == 1.0


def test_empty_strings():
    assert anls_score("", [""]) == 1.0
    assert anls_score("something", [""]) == 0.0
    assert anls_score("", ["something"]) == 0.0


def test_mean_over_questions():
    assert anls(["paris", "1991", "no"], [["Paris"], ["1990"], ["yes"]]) == pytest.approx((1 + 0.75 + 0) / 3)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        anls(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no ground-truth"):
        anls_score("a", [])
    with pytest.raises(TypeError, match="single string"):
        anls_score("a", "a")
