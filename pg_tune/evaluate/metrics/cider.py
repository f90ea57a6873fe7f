"""Captioning metrics: CIDEr-D and BLEU-4, computed the way pycocoevalcap computes them.

pycocoevalcap is the reference every captioning paper (and big_vision's PaliGemma numbers) reports
against, so these functions reproduce its arithmetic exactly, quirks included, on the same tokens.
The only part we do not reproduce bit-for-bit is its tokeniser: pycocoevalcap shells out to the
Stanford PTB tokenizer (Java). `ptb_tokenize` is a pure-Python approximation of it; pass
``tokenize=False`` and tokenise yourself when you need the exact reference tokens.

Run on a toy corpus::

    from pg_tune.evaluate.metrics import cider_d
    score, per_id = cider_d({1: "a dog runs"}, {1: ["a dog is running", "the dog runs"]})
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

__all__ = ["PTB_PUNCTUATION", "bleu4", "cider_d", "ptb_tokenize"]

# Tokens pycocoevalcap drops after PTB tokenisation (tokenizer/ptbtokenizer.py, PUNCTUATIONS).
# Brackets arrive there as -LRB-/-RRB-/-LCB-/-RCB-; quotes as `` '' ` '.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
# An abbreviation such as "u.s." or "a.m." keeps its final period in PTB; a plain word does not.
_ABBREVIATION = re.compile(r"^(?:[a-z]\.)+$")
# A few of the abbreviations PTB's lexer lists explicitly; they keep their period too.
_KNOWN_ABBREVIATIONS = frozenset(
    "mr. mrs. ms. dr. st. jr. sr. prof. vs. etc. inc. co. corp. ltd. mt. ave. "
    "jan. feb. aug. sept. oct. nov. dec.".split()
)
# PTB turns brackets into -LRB- etc.; with -lowerCase they come out lowercased, which is *not* in
# pycocoevalcap's PUNCTUATIONS list, so the reference keeps them as words. We do the same.
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
# Pieces PTB always splits into their own token: ellipses, double dashes, runs of ?/! ("?!" stays one
# token, and only a lone "?" or "!" is in PUNCTUATIONS), ; $ % &. Double quotes become `` / '' and
# are dropped, so we turn them into spaces.
_ALWAYS_SPLIT = re.compile(r"(\.\.\.|--|[?!]+|[;$%&])")
# Commas and colons split unless they sit between digits ("1,000", "10:30" stay whole in PTB).
_COMMA_COLON = re.compile(r"(?<!\d)([,:])|([,:])(?!\d)")


def ptb_tokenize(text: str) -> str:
    """Lowercase and tokenise a caption like pycocoevalcap's PTBTokenizer, then drop its punctuation.

    Approximation of Stanford PTBTokenizer 3.4.1 (``-preserveLines -lowerCase``) followed by
    pycocoevalcap's removal of `PTB_PUNCTUATION`, written so captions can be scored without Java.
    It splits clitics ("dog's" -> "dog 's", "don't" -> "do n't"), sentence punctuation, brackets
    and quotes, and keeps hyphenated words and numbers such as "1,000" and "3.5" whole, as PTB
    does. Brackets become "-lrb-", "-rsb-", ... and are kept, because the reference's punctuation
    list only names the upper-case forms that ``-lowerCase`` never produces. Known differences:
    PTB keeps the period of a long list of abbreviations; here only letter-dot sequences ("u.s.",
    "a.m.") and a short list ("mr.", "st.", "dr.", ...) keep it, and rarer PTB rules (e.g. for
    URLs, emoticons, "gonna") are not implemented. Returns the tokens joined by spaces.
    """
    text = text.replace("\n", " ").replace('"', " ").lower()
    for bracket, token in _BRACKETS.items():
        text = text.replace(bracket, token)
    text = _ALWAYS_SPLIT.sub(r" \1 ", text)
    text = _COMMA_COLON.sub(lambda m: f" {m.group(1) or m.group(2)} ", text)
    tokens: list[str] = []
    for word in text.split():
        # Opening single quotes become PTB's ` and are dropped; closing ones become ' (dropped too).
        word = word.lstrip("'`")
        trailing_quote = word.endswith("'") and not word.endswith("n't")
        word = word.rstrip("'")
        if (
            word.endswith(".")
            and word != "..."
            and not _ABBREVIATION.match(word)
            and word not in _KNOWN_ABBREVIATIONS
        ):
            word = word.rstrip(".")
        if not word:
            continue
        clitic = _CLITIC.match(word)
        if clitic and clitic.group(1).strip("'"):
            tokens.extend([clitic.group(1), clitic.group(2)])
        else:
            tokens.append(word)
        if trailing_quote:
            tokens.append("'")
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def _ngram_counts(sentence: str, n: int = 4) -> Counter[tuple[str, ...]]:
    """All 1..n-grams of a whitespace-tokenised sentence with their counts (pycocoevalcap's precook)."""
    words = sentence.split()
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _prepare(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    tokenize: bool,
) -> tuple[list[Hashable], dict[Hashable, str], dict[Hashable, list[str]]]:
    """Check that both sides cover the same ids and optionally tokenise them."""
    if set(predictions) != set(references):
        missing = set(references) - set(predictions)
        extra = set(predictions) - set(references)
        raise ValueError(
            f"predictions and references must have the same ids; "
            f"missing predictions for {sorted(map(str, missing))[:5]}, "
            f"no references for {sorted(map(str, extra))[:5]}"
        )
    ids = list(references)
    for image_id in ids:
        if not references[image_id]:
            raise ValueError(f"references[{image_id!r}] is empty; every id needs at least one reference")
    prep = ptb_tokenize if tokenize else (lambda s: s)
    preds = {i: prep(predictions[i]) for i in ids}
    refs = {i: [prep(r) for r in references[i]] for i in ids}
    return ids, preds, refs


def cider_d(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    tokenize: bool = True,
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D of one caption per id against its references; returns (corpus mean, per-id scores).

    Same arithmetic as pycocoevalcap's ``Cider`` (which is CIDEr-D): tf-idf vectors of 1..4-grams
    with document frequencies counted over the references of the corpus being scored (so the score
    of an image depends on the other images scored with it), candidate tf-idf clipped to the
    reference's, a gaussian penalty exp(-delta^2 / (2 sigma^2)) on the length difference, the mean
    over n-gram orders and references, times 10. The length used is pycocoevalcap's: the number of
    bigrams, i.e. words - 1, which only differs from words when a sentence is empty.

    Because idf comes from the scored corpus, score a whole split at once: a corpus of one image
    scores 0 whatever the caption (every idf is log(1/1) = 0), exactly as in pycocoevalcap.
    """
    ids, preds, refs = _prepare(predictions, references, tokenize)
    if not ids:
        raise ValueError("cider_d needs at least one prediction")
    test_counts = {i: _ngram_counts(preds[i], n) for i in ids}
    ref_counts = {i: [_ngram_counts(r, n) for r in refs[i]] for i in ids}

    document_frequency: Counter[tuple[str, ...]] = Counter()
    for i in ids:
        document_frequency.update({g for counts in ref_counts[i] for g in counts})
    log_num_images = math.log(float(len(ids)))

    def tfidf(counts: Counter[tuple[str, ...]]) -> tuple[list[dict], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            vec[order][gram] = float(tf) * (log_num_images - math.log(max(1.0, document_frequency[gram])))
            norm[order] += vec[order][gram] ** 2
            if order == 1:  # pycocoevalcap counts bigrams as "length"; we keep that quirk.
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores: dict[Hashable, float] = {}
    for i in ids:
        vec, norm, length = tfidf(test_counts[i])
        total = [0.0] * n
        for counts in ref_counts[i]:
            vec_ref, norm_ref, length_ref = tfidf(counts)
            penalty = math.e ** (-(float(length - length_ref) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and norm_ref[k] != 0:
                    val /= norm[k] * norm_ref[k]
                total[k] += val * penalty
        scores[i] = sum(total) / n / len(ref_counts[i]) * 10.0
    return sum(scores.values()) / len(scores), scores


def bleu4(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    tokenize: bool = True,
) -> tuple[float, dict[Hashable, float]]:
    """Corpus BLEU-4 and per-id BLEU-4, as pycocoevalcap's ``Bleu(4)`` computes them.

    Corpus score: clipped n-gram matches and candidate n-gram counts are summed over the corpus
    before taking the precisions (not an average of sentence scores); the brevity penalty uses,
    per sentence, the reference length closest to the candidate (ties to the shorter one). The
    1e-15 / 1e-9 smoothing constants of the reference are kept so empty matches give ~0, not NaN.
    Per-id scores are pycocoevalcap's sentence-level BLEU-4 with the same constants.
    """
    ids, preds, refs = _prepare(predictions, references, tokenize)
    if not ids:
        raise ValueError("bleu4 needs at least one prediction")
    n, tiny, small = 4, 1e-15, 1e-9
    total_correct = [0] * n
    total_guess = [0] * n
    total_test_len = 0
    total_ref_len = 0
    scores: dict[Hashable, float] = {}
    for i in ids:
        max_ref_counts: dict[tuple[str, ...], int] = {}
        ref_lens = []
        for ref in refs[i]:
            ref_lens.append(len(ref.split()))
            for gram, count in _ngram_counts(ref, n).items():
                max_ref_counts[gram] = max(max_ref_counts.get(gram, 0), count)
        test_len = len(preds[i].split())
        ref_len = min((abs(length - test_len), length) for length in ref_lens)[1]
        guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for gram, count in _ngram_counts(preds[i], n).items():
            correct[len(gram) - 1] += min(max_ref_counts.get(gram, 0), count)
        for k in range(n):
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]
        total_test_len += test_len
        total_ref_len += ref_len
        scores[i] = _bleu_from_counts(correct, guess, test_len, ref_len, tiny, small)
    corpus = _bleu_from_counts(total_correct, total_guess, total_test_len, total_ref_len, tiny, small)
    return corpus, scores


def _bleu_from_counts(
    correct: list[int], guess: list[int], test_len: int, ref_len: int, tiny: float, small: float
) -> float:
    """BLEU-N from match counts, with pycocoevalcap's smoothing constants and brevity penalty."""
    n = len(correct)
    product = 1.0
    for k in range(n):
        product *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
    score = product ** (1.0 / n)
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)
    return score
