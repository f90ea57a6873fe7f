"""Counting bad rows: stop at the first, or skip and count, and always report the counts."""

from __future__ import annotations

from collections import Counter
from typing import Literal

from pg_tune.data.sample import DataError


def data_error(reason: str, message: str) -> DataError:
    """A ``DataError`` tagged with a short reason (``missing_image``, ``corrupt_image``...) for the counts."""
    error = DataError(message)
    error.reason = reason
    return error


def reason_of(error: Exception) -> str:
    """The counting reason of an error raised while reading or collating a row."""
    reason = getattr(error, "reason", None)
    if reason:
        return reason
    text = str(error)
    for needle, name in (
        ("empty suffix", "empty_suffix"),
        ("max_text_length", "over_length_budget"),
        ("image", "bad_image"),
    ):
        if needle in text:
            return name
    return "bad_row"


class BadRows:
    """Applies the recipe's ``data.on_bad_row`` policy and keeps counts by reason."""

    def __init__(self, policy: Literal["stop", "skip"] = "stop", examples_per_reason: int = 3):
        self.policy = policy
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._examples_per_reason = examples_per_reason

    def bad(self, reason: str, message: str, count: int = 1) -> None:
        """Record a bad row (``count`` rows: a damaged parquet row group); raise ``DataError`` under the
        ``stop`` policy."""
        if self.policy == "stop":
            raise DataError(f"{message} (data.on_bad_row=stop; set it to 'skip' to skip and count such rows)")
        self.counts[reason] += count
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self._examples_per_reason:
            examples.append(message)

    def note(self, reason: str, message: str) -> None:
        """Record a row that was repaired rather than dropped (e.g. a clipped box)."""
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self._examples_per_reason:
            examples.append(message)

    def report(self) -> str:
        if not self.counts:
            return "bad rows: none"
        lines = ["bad rows by reason:"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {reason}: {n}")
            lines.extend(f"    e.g. {ex}" for ex in self.examples.get(reason, []))
        return "\n".join(lines)

    def summary(self) -> str:
        """The counts on one line, each reason with its first example: ``corrupt_image: 4 (e.g. ...)``."""
        parts = []
        for reason, n in self.counts.most_common():
            example = self.examples.get(reason, [])
            parts.append(f"{reason}: {n}" + (f" (e.g. {example[0]})" if example else ""))
        return "; ".join(parts) or "none"


def check_bad_share(bad: BadRows, good: int, limit: float, where: str) -> None:
    """Raise ``DataError`` when more than ``limit`` of the rows a dataset build read (``bad`` + ``good``)
    were bad (``data.max_bad_row_share``): a run that drops most of its data learns from what is left."""
    count = sum(bad.counts.values())
    if not count or count <= limit * (count + good):
        return
    raise DataError(
        f"{where}: {count} of {count + good} training rows were bad at build ({100 * count / (count + good):.0f}%, "
        f"over data.max_bad_row_share={limit:g}): {bad.summary()}. Fix or remove those rows (pg-tune data "
        "validate lists them all), or raise data.max_bad_row_share if dropping that many is intended"
    )
