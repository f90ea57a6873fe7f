"""VQAv2 accuracy, with the answer normalisation of the official evaluation script.

The official script (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py) is what
VQAv2 numbers, big_vision's PaliGemma numbers included, are computed with, so this module follows it
rule for rule, quirks included (each quirk is marked where it is implemented):

1. Newlines and tabs become spaces and both ends are stripped, always.
2. Only when the human answers disagree (more than one distinct string) are the prediction and the
   human answers normalised: punctuation, then number words to digits, articles dropped,
   missing-apostrophe contractions restored. When all humans agree the raw strings are compared.
   big_vision does the same ("supposedly avoids postproc OCR", GT-Vision-Lab/VQA issue 14).
3. With exactly 10 human answers (VQAv2, the official setting) accuracy averages, over the 10
   leave-one-out subsets of 9 humans, min(#humans in the subset who gave the predicted answer / 3, 1).
   So 1 matching human of 10 gives 0.3, 3 give 0.9 (not 1.0: the 3 subsets that leave one of them
   out see only 2), and 4 or more give 1.0.

Any other number of answers (custom data, OK-VQA-style sets) follows big_vision's generic VQA
evaluator (``evaluators/proj/paligemma/transfers/vqa.py``): min(#matching answers / 3, 1), with no
leave-one-out, which on 2-9 answers would cost a unanimous correct answer a third or more. A single
answer is big_vision's single-ground-truth mode: exact match (min(1/3, 1) would cap it at 0.33).
Answers are compared after rules 1-2 in every case; big_vision's generic evaluator compares raw
strings, so ours is the more lenient of the two only in spelling, never in counting.

    from pg_tune.evaluate.metrics import vqa_accuracy
    vqa_accuracy("two", ["2"] * 3 + ["3"] * 7)  # 0.9
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["OFFICIAL_NUM_ANSWERS", "mean_vqa_accuracy", "normalize_vqa_answer", "vqa_accuracy"]

OFFICIAL_NUM_ANSWERS = 10
"""VQAv2 collects 10 human answers per question; only then does the leave-one-out rule apply."""

# The official table (vqaEval.py, self.contractions): apostrophe-less spellings and the form they
# are restored to. Kept verbatim, including its dead keys (the capitalised ones never match, as
# words are lowercased first) and its one backwards entry ("somebody'd" -> "somebodyd").
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset(["a", "an", "the"])
# Order matters (each character is handled in turn); apostrophes, colons and periods are not here.
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# Quirk: the official pattern is "(?!<=\d)(\.)(?!\d)"; "(?!<=" is a typo for the lookbehind "(?<!",
# so it only spares periods followed by a digit ("2.5" stays, "5." loses its period). Kept verbatim.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def _strip_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """The official processPunctuation: drop or space out punctuation, drop non-decimal periods."""
    # Quirk: one "digit,digit" anywhere makes every punctuation mark vanish instead of becoming a space.
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # Both tests look at the input text, not at the partly cleaned `out`, as the official code does.
        if f"{mark} " in text or f" {mark}" in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # Quirk: the official call is periodStrip.sub("", out, re.UNICODE), which passes re.UNICODE (32)
    # as the *count*, so at most 32 periods are removed. Kept for exactness.
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _process_digit_article(text: str) -> str:
    """The official processDigitArticle: lowercase, number words to digits, drop articles, contractions."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """Full official normalisation of one answer: whitespace, punctuation, digits, articles, contractions.

    `vqa_accuracy` applies this only when the human answers disagree (see the module docstring);
    it is public for inspecting predictions and building answer vocabularies.
    """
    return _process_digit_article(_process_punctuation(_strip_whitespace(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one predicted answer against the human answers.

    10 answers: the official VQAv2 rule (mean over leave-one-out subsets of min(#matches / 3, 1)).
    1 answer: exact match. Otherwise: min(#matches / 3, 1), as big_vision's generic VQA evaluator.
    Answers are normalised by the official rules in every case (see the module docstring).
    """
    if isinstance(answers, str):
        raise TypeError(f"answers must be a list of strings, got the single string {answers!r}")
    if not answers:
        raise ValueError(f"no human answers given for prediction {prediction!r}")
    pred = _strip_whitespace(prediction)
    gts = [_strip_whitespace(a) for a in answers]
    if len(set(gts)) > 1:
        pred = _process_digit_article(_process_punctuation(pred))
        gts = [_process_digit_article(_process_punctuation(a)) for a in gts]
    elif len(gts) == 1:
        # A lone answer cannot disagree with itself; normalise both so "Two." matches "2".
        pred, gts = normalize_vqa_answer(prediction), [normalize_vqa_answer(answers[0])]
    matches = sum(gt == pred for gt in gts)
    if len(gts) == OFFICIAL_NUM_ANSWERS:
        # Leaving out a matching human leaves matches - 1 in the subset; leaving out another leaves matches.
        per_subset = [min(1.0, (matches - (gt == pred)) / 3.0) for gt in gts]
        return sum(per_subset) / len(per_subset)
    if len(gts) == 1:
        return float(matches)
    return min(1.0, matches / 3.0)


def mean_vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean `vqa_accuracy` over questions; ``answers[i]`` holds the human answers to question i."""
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("mean_vqa_accuracy needs at least one question")
    return sum(vqa_accuracy(p, a) for p, a in zip(predictions, answers, strict=True)) / len(predictions)
