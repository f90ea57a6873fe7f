"""The refs pickle is read without running code: only plain containers and scalars load."""

from __future__ import annotations

import os
import pickle

import pytest

from pg_tune.data.formats.refcoco import load_plain_pickle
from pg_tune.data.sample import DataError


class _Exploit:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "sentences": [_Exploit(str(marker))]}], protocol=2))
    # Sanity: the stock unpickler WOULD run it (on a copy, so the real test stays meaningful).
    with pytest.raises(
        DataError, match=r"refs\(unc\)\.p: not a plain-data pickle .*refused to load global .*system"
    ):
        load_plain_pickle(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())
    assert marker.exists(), "the exploit should work with the stock unpickler, else this test proves nothing"


def test_any_class_is_refused_even_harmless_ones(tmp_path):
    import collections

    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([collections.OrderedDict(a=1)]))
    with pytest.raises(DataError, match="collections.OrderedDict"):
        load_plain_pickle(path)


def test_plain_python2_style_pickle_loads(tmp_path):
    refs = [
        {
            "ref_id": 1,
            "split": "val",
            "sentences": [{"sent": "caf\u00e9 left", "tokens": ("a", "b")}],
            "ok": True,
        }
    ]
    path = tmp_path / "refs.p"
    for protocol in (0, 2, 5):
        path.write_bytes(pickle.dumps(refs, protocol=protocol))
        assert load_plain_pickle(path) == refs


def test_truncated_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([{"a": 1}] * 10)[:20])
    with pytest.raises(DataError, match="refs.p: "):
        load_plain_pickle(path)
