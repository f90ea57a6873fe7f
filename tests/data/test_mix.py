"""Weighted mixing: shares per epoch, per-epoch choice within groups, determinism."""

from __future__ import annotations

from collections import Counter

from torch.utils.data import DataLoader

from pg_tune.data.build import ConcatSamples
from pg_tune.data.mix import MixSampler, build_train_index
from pg_tune.data.sample import Sample


def rows(name: str, n: int, group_size: int = 1) -> list[Sample]:
    meta = (lambda i: {"group": f"{name}{i // group_size}"}) if group_size > 1 else (lambda i: {})
    return [Sample(f"{name}{i}.png", "p", f"{name}{i}", f"{name}[{i}]", meta=meta(i)) for i in range(n)]


def test_weight_one_everywhere_is_a_permutation_of_the_concatenation():
    parts = [rows("a", 7), rows("b", 5)]
    index = build_train_index([1.0, 1.0], parts, seed=0, epoch=0)
    assert sorted(index) == list(range(12))
    assert index != list(range(12))  # shuffled


def test_weights_are_repeat_factors_and_fractions_walk_the_set():
    parts = [rows("a", 10), rows("b", 4)]
    seen_b = Counter()
    for epoch in range(4):
        index = build_train_index([0.5, 3.0], parts, seed=1, epoch=epoch)
        per_entry = Counter("a" if i < 10 else "b" for i in index)
        assert per_entry == {"a": 5, "b": 12}
        seen_b.update(i for i in index if i >= 10)
        if epoch == 1:
            # two half-epochs of "a" together cover all of it exactly once
            a_two = [i for e in (0, 1) for i in build_train_index([0.5, 3.0], parts, 1, e) if i < 10]
            assert sorted(a_two) == list(range(10))
    assert set(seen_b.values()) == {12}  # 4 epochs x 3 repeats, evenly


def test_groups_yield_one_member_per_epoch_and_vary():
    parts = [rows("cap", 12, group_size=3)]  # 4 images x 3 captions
    picks = [build_train_index([1.0], parts, seed=0, epoch=e) for e in range(6)]
    for index in picks:
        assert len(index) == 4 and len({i // 3 for i in index}) == 4
    assert len({tuple(sorted(p)) for p in picks}) > 1


def test_deterministic_in_seed_and_epoch():
    parts = [rows("a", 20), rows("b", 8, group_size=2)]
    assert build_train_index([1, 2], parts, 3, 5) == build_train_index([1, 2], parts, 3, 5)
    assert build_train_index([1, 2], parts, 3, 5) != build_train_index([1, 2], parts, 4, 5)


def test_sampler_in_a_dataloader_advances_epochs_and_honours_set_epoch():
    concat = ConcatSamples([rows("a", 6), rows("b", 3)])
    sampler = MixSampler(concat.parts, [1.0, 2.0], seed=0)
    assert len(sampler) == 12
    loader = DataLoader(range(len(concat)), batch_size=4, sampler=sampler)
    first = [int(i) for batch in loader for i in batch]
    second = [int(i) for batch in loader for i in batch]
    assert first == build_train_index([1.0, 2.0], concat.parts, 0, 0)
    assert second == build_train_index([1.0, 2.0], concat.parts, 0, 1)
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert concat[7].suffix == "b1" and concat.entry_of(7) == 1
