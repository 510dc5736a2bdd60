"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

SYNTHETIC_SEED = 7


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset in every on-disk format (upstream ``datasets/`` layout)."""
    from lens.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, seed=SYNTHETIC_SEED, n_train=12, n_val=8, n_test=8, image_size=160)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-contained tiny LENS checkpoint folder (random weights, processor saved alongside)."""
    from lens.modeling import build_preset

    path = tmp_path_factory.mktemp("tiny_ckpt")
    model, processor = build_preset("tiny", seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
