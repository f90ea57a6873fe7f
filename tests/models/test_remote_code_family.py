"""The registry takes a family whose model code lives only on the Hub (e.g. Moondream 2).

``RemoteDemoFamily`` is a registry test double (Gemma 3's code under another name): no remote code
exists or runs here. What is checked is the contract: such a family is found like any other, and
loading it needs a pinned 40-hex commit (checked by ``pg-tune validate``) and the
``--trust-remote-code`` flag, refused before any download.
"""

from __future__ import annotations

import pytest

from pg_tune.config.recipe import ModelConfig
from pg_tune.models import family as family_module
from pg_tune.models.chat.gemma3 import Gemma3Family
from pg_tune.models.family import family_for

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class RemoteDemoFamily(Gemma3Family):
    name = "remote_demo"
    model_types = ("remote_demo",)
    tiny_presets = ()
    name_hints = ("remote-demo",)
    requires_remote_code = True


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(family_module._REGISTRY, "remote_demo", f"{__name__}:RemoteDemoFamily")


def test_remote_code_family_is_found_and_needs_a_pinned_opt_in(registered):
    family = family_for("someone/remote-demo-2b")
    assert isinstance(family, RemoteDemoFamily) and family.requires_remote_code
    with pytest.raises(ValueError, match="--trust-remote-code"):
        family.load_model(ModelConfig("someone/remote-demo-2b", revision=COMMIT))
    for revision in (None, "main", "2025-06-21", COMMIT[:12]):
        with pytest.raises(ValueError, match="model.revision.*40-hex commit"):
            family.load_processor(
                ModelConfig("someone/remote-demo-2b", revision=revision, trust_remote_code=True)
            )
    family.check_model_config(ModelConfig("someone/remote-demo-2b", revision=COMMIT, trust_remote_code=True))


def test_native_families_need_no_remote_code():
    Gemma3Family().check_model_config(ModelConfig("google/gemma-3-4b-pt"))
    assert not any(family_for(name).requires_remote_code for name in family_module.family_names())


def test_validate_names_the_missing_pin(registered, tmp_path, capsys):
    from pg_tune.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "output_dir: x\nmodel: {name_or_path: someone/remote-demo-2b}\ndata: {train: [{format: shapes}]}\n"
    )
    assert main(["validate", str(recipe)]) == 2
    assert "model.revision" in capsys.readouterr().err
    assert main(["validate", str(recipe), f"model.revision={COMMIT}"]) == 0
