"""What every family's tiny presets share: a small BPE vocabulary, random initialisation, saving.

Tiny presets are randomly initialised models of each family with the real special-token layout and
a real tokenizer whose ordinary vocabulary is small: the bytes, a few characters and a few hundred
whole words (``WORDS``, the words the demo, the tests and the task prompts use), each made one
piece by BPE merges (``word_merges``). The tests, the embedded demo and the benchmarks build them
in-process; nothing downloads.

Write one as a checkpoint in the hub's layout (config, safetensors, processor files)::

    python -m pg_tune.models.tiny OUT_DIR [--preset tiny-paligemma2] [--seed 0]

``--preset`` takes any family's tiny preset (``tiny-paligemma``, ``tiny-paligemma2``, ``bench-mini``,
``tiny-gemma3``, ``gemma3-bench-mini``, ``tiny-smolvlm2``, ``smolvlm2-bench-mini``).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

# Words the demo, the tests and the task prompts use, so they tokenize to one piece each.
WORDS = """
a an the of on in at to and or with is are was it this that there what which where how many
caption cap describe en fr de es answer detect segment ocr question yes no
red green blue yellow purple orange black white gray grey brown pink
circle square triangle star shape shapes small large big left right top bottom middle center
cat cats dog dogs person people car cars bus tree trees house man woman child bird horse table
chair cup plate bottle sitting standing near next front behind picture image photo
one two three four five six seven eight nine ten
""".split()

CHARS = [chr(c) for c in range(33, 127)]
"""Printable ASCII, each a piece of the SentencePiece-style (Gemma) tiny vocabularies."""


def bpe_split(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """How BPE with these merge ranks splits ``word`` (lowest rank merges first)."""
    parts = list(word)
    while len(parts) > 1:
        candidates = [
            (ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(itertools.pairwise(parts))
        ]
        rank, i = min(candidates)
        if rank > len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def word_merges(
    forms: Iterable[str], first: Sequence[tuple[str, str]] = ()
) -> tuple[list[tuple[str, str]], list[str]]:
    """BPE merges, in rank order, that make every string of ``forms`` one piece; and the new pieces.

    ``first`` are merges that rank before all others. Each new merge ranks last, so it never changes
    how an earlier form splits: every listed form ends as one piece.
    """
    merges = list(first)
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    pieces: list[str] = []
    for form in forms:
        parts = bpe_split(form, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces.append(pair[0] + pair[1])
            parts = [pair[0] + pair[1]] + parts[2:]
    return merges, pieces


def add_pieces(vocab: dict[str, int], pieces: Iterable[str], next_id: int) -> int:
    """Give each piece not yet in ``vocab`` the next id; returns the id after the last one given."""
    for piece in pieces:
        if piece not in vocab:
            vocab[piece] = next_id
            next_id += 1
    return next_id


def init_random(model_class: type, config, seed: int):
    """A randomly initialised ``model_class(config)`` (fp32, CPU, eval mode), the same for a given seed.

    Built on the meta device, then given real (untouched) storage and initialised once: a tied LM
    head shares the large embedding table, and building eagerly would fill both tables first (about
    +260 MB of peak memory at bench-mini size) before tying them. Every family's tiny presets use it.
    """
    with torch.device("meta"):
        model = model_class(config)
    model.to_empty(device="cpu")
    model.tie_weights()  # a no-op for configs with tie_word_embeddings=False
    torch.manual_seed(seed)
    model.initialize_weights()
    model.eval()
    return model


def write_checkpoint(model, processor, out_dir: str | Path) -> Path:
    """Save a model and its processor into ``out_dir`` in the hub's layout."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """``python -m pg_tune.models.tiny OUT_DIR [--preset P] [--seed N]``: any family's tiny preset."""
    from pg_tune.models.family import family_for, family_names

    presets = sorted(p for name in family_names() for p in family_for(name).tiny_presets)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default="tiny-paligemma2", choices=presets)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(family_for(args.preset).save_tiny(args.preset, args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
