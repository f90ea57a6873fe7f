"""ANLS (Average Normalised Levenshtein Similarity), the DocVQA / InfographicVQA metric.

Defined in Biten et al., "Scene Text Visual Question Answering" (ICCV 2019), Eq. 1: a prediction
earns 1 - NL for its closest ground truth, where NL = edit distance / max(len), unless NL >= 0.5,
in which case it earns 0 (a wrong answer that happens to share letters should not score). Both
strings are lowercased and stripped first, as big_vision's DocVQA evaluator (``to_lower=True``)
and the DocVQA reference script do, so "Paris " and "paris" are the same answer.

    from pg_tune.evaluate.metrics import anls
    anls(["paris", "1990"], [["Paris"], ["1991", "nineteen ninety"]])  # (1.0 + 0.75) / 2
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["anls", "anls_score", "levenshtein"]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two strings.

    Plain dynamic programming over two rows; answers are short, so this stays fast without the
    ``editdistance`` C extension big_vision uses (which computes the same number).
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete char_a
                    current[j - 1] + 1,  # insert char_b
                    previous[j - 1] + (char_a != char_b),  # substitute (free if equal)
                )
            )
        previous = current
    return previous[-1]


def _normalise(text: str, lowercase: bool) -> str:
    text = text.strip()
    return text.lower() if lowercase else text


def anls_score(
    prediction: str, answers: Sequence[str], threshold: float = 0.5, lowercase: bool = True
) -> float:
    """ANLS of one prediction: max over the ground-truth answers of (1 - NL if NL < threshold else 0).

    Two empty strings count as an exact match (score 1), which is what big_vision returns for an
    empty ground truth. A question with no ground truths is refused rather than scored 0.
    """
    if isinstance(answers, str):
        raise TypeError(f"answers must be a list of strings, got the single string {answers!r}")
    if not answers:
        raise ValueError(f"no ground-truth answers given for prediction {prediction!r}")
    pred = _normalise(prediction, lowercase)
    best = 0.0
    for answer in answers:
        gt = _normalise(answer, lowercase)
        longest = max(len(gt), len(pred))
        if longest == 0:
            return 1.0
        nl = levenshtein(gt, pred) / longest
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def anls(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    threshold: float = 0.5,
    lowercase: bool = True,
) -> float:
    """Mean `anls_score` over questions; ``answers[i]`` holds every accepted answer to question i."""
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("anls needs at least one question")
    scores = [anls_score(p, a, threshold, lowercase) for p, a in zip(predictions, answers, strict=True)]
    return sum(scores) / len(scores)
