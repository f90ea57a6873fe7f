"""Weighted mixing of a recipe's training datasets: one index list per epoch, seeded.

A dataset entry's ``weight`` is a repeat factor: each epoch draws ``round(weight * units)`` rows
from it, where a unit is a sample, or a group of samples sharing ``meta["group"]`` (all captions
of one image, all answers of one question: one of them is drawn per epoch). Weight 1 everywhere is
plain concatenation; ``weight: 3`` on a small set shows each of its rows three times an epoch;
``weight: 0.25`` on a large one a fresh quarter of it each epoch. For fixed proportions (big_vision
style "70% A, 30% B") set weights to ``share * total / size``.

Within an entry rows are drawn without replacement through successive shuffles, so a fractional
weight walks the whole set over epochs before repeating. The result is a pure function of
``(seed, epoch)``: the same recipe sees the same batches, and a resumed run continues exactly.
Evaluation never mixes: ``build_samples`` concatenates.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

from pg_tune.data.sample import Sample


def _units(part: Sequence[Sample]) -> list[list[int]]:
    """Indices of ``part`` grouped by ``meta["group"]`` (list parts only; lazy parts are ungrouped)."""
    if not isinstance(part, list):
        return [[i] for i in range(len(part))]
    units: list[list[int]] = []
    by_group: dict[object, list[int]] = {}
    for i, sample in enumerate(part):
        group = sample.meta.get("group") if sample.meta else None
        if group is None:
            units.append([i])
        elif group in by_group:
            by_group[group].append(i)
        else:
            by_group[group] = [i]
            units.append(by_group[group])
    return units


def _pick(unit: list[int], rng_key: str) -> int:
    """One sample of a unit (one caption of an image, ...), drawn with ``rng_key`` as the seed."""
    return unit[0] if len(unit) == 1 else random.Random(rng_key).choice(unit)


def build_train_index(
    weights: Sequence[float],
    samples_per_entry: Sequence[Sequence[Sample]],
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> list[int]:
    """One epoch's order: indices into the concatenation of ``samples_per_entry``.

    ``shuffle=False`` (``data.shuffle: false``): each entry's units in order, entries one after the
    other; weights still set how many rows each epoch takes.
    """
    if len(weights) != len(samples_per_entry):
        raise ValueError(f"{len(weights)} weights for {len(samples_per_entry)} datasets")
    index: list[int] = []
    offset = 0
    for entry, (weight, part) in enumerate(zip(weights, samples_per_entry, strict=True)):
        units = _units(part)
        count = round(weight * len(units))
        if units and count:
            # The k-th pass over the entry's units is a fixed shuffle; epoch e takes the slice
            # [e*count, (e+1)*count) of the endless sequence of passes.
            start = epoch * count
            for position in range(start, start + count):
                pass_no, k = divmod(position, len(units))
                unit = units[_pass_order(seed, entry, pass_no, len(units))[k] if shuffle else k]
                index.append(offset + _pick(unit, f"{seed}:{entry}:{epoch}:{position}"))
        offset += len(part)
    if shuffle:
        random.Random(f"{seed}:mix:{epoch}").shuffle(index)
    return index


_ORDER_CACHE: dict[tuple[int, int, int, int], list[int]] = {}


def _pass_order(seed: int, entry: int, pass_no: int, n: int) -> list[int]:
    key = (seed, entry, pass_no, n)
    order = _ORDER_CACHE.get(key)
    if order is None:
        if len(_ORDER_CACHE) > 64:
            _ORDER_CACHE.clear()
        order = list(range(n))
        random.Random(f"{seed}:{entry}:pass{pass_no}").shuffle(order)
        _ORDER_CACHE[key] = order
    return order


class MixSampler(Sampler[int]):
    """A torch ``Sampler`` over ``build_samples``' concatenation that mixes its entries by weight.

    Accelerate's data loader calls ``set_epoch`` before each epoch; a plain DataLoader works too,
    since each new iteration moves to the next epoch by itself.
    """

    def __init__(
        self,
        samples_per_entry: Sequence[Sequence[Sample]],
        weights: Sequence[float],
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.samples_per_entry = samples_per_entry
        self.weights = list(weights)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._length = sum(
            round(w * len(_units(p))) for w, p in zip(self.weights, samples_per_entry, strict=True)
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[int]:
        index = build_train_index(self.weights, self.samples_per_entry, self.seed, self.epoch, self.shuffle)
        self.epoch += 1
        return iter(index)
