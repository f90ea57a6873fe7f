"""Fixtures for the adapter tests: the shipped sample datasets and random VQ-VAE weights."""

from __future__ import annotations

from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "data_formats" / "samples"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def vae_path(tmp_path_factory) -> str:
    from pg_tune.models.paligemma.masks import make_random_vae_weights, save_npz

    return str(save_npz(make_random_vae_weights(0), tmp_path_factory.mktemp("vae") / "vae.npz"))
