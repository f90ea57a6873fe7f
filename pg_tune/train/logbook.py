"""``metrics.jsonl``: one JSON object per logged step, appended and flushed as training goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pg_tune.train.storage import disk_full_guard


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with disk_full_guard(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
                f.flush()
