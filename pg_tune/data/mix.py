"""Weighted mixing of a recipe's training datasets: one index list per epoch, seeded.

A dataset entry's ``weight`` is a repeat factor: each epoch draws ``round(weight * units)`` rows
from it, where a unit is a sample, or a group of samples sharing ``meta["group"]`` (all captions
of one image, all answers of one question: one of them is drawn per epoch; when the group's samples
also share ``meta["object"]`` keys, as RefCOCO's per-image rows do, an object is drawn first and then
one of its samples, big_vision's "one object, then one of its sentences"). Weight 1 everywhere is
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


def _units(part: Sequence[Sample]) -> list[list[list[int]]]:
    """Indices of ``part`` grouped by ``meta["group"]``, each group split by ``meta["object"]``.

    A unit is a list of objects, an object a list of indices (one index each when samples carry no
    object key). List parts only; lazy parts are ungrouped.
    """
    if not isinstance(part, list):
        return [[[i]] for i in range(len(part))]
    units: list[list[list[int]]] = []
    by_group: dict[object, tuple[list[list[int]], dict[object, list[int]]]] = {}
    for i, sample in enumerate(part):
        meta = sample.meta or {}
        group = meta.get("group")
        if group is None:
            units.append([[i]])
            continue
        if group not in by_group:
            by_group[group] = ([], {})
            units.append(by_group[group][0])
        unit, objects = by_group[group]
        key = meta.get("object", ("sample", i))
        if key not in objects:
            objects[key] = []
            unit.append(objects[key])
        objects[key].append(i)
    return units


def _pick(unit: list[list[int]], rng_key: str) -> int:
    """One index of a unit: a uniform object, then a uniform sample of it (seeded by ``rng_key``)."""
    if len(unit) == 1 and len(unit[0]) == 1:
        return unit[0][0]
    rng = random.Random(rng_key)
    if all(len(obj) == 1 for obj in unit):  # plain groups (captions, answers): one uniform draw
        return rng.choice([obj[0] for obj in unit])
    return rng.choice(rng.choice(unit))


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
