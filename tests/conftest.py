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


TINY_RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "tiny"
QUIET_TRAIN = ("train.report_to=none", "train.save_steps=1000", "train.logging_steps=1", "train.disable_tqdm=true")


@pytest.fixture()
def tiny_recipe(synthetic_root: Path, tiny_checkpoint: Path, tmp_path: Path):
    """Factory: a tiny recipe (``configs/recipes/tiny/<stage>.yaml``) on the synthetic data and the tiny checkpoint.

    ``tiny_recipe("stage2", "train.max_steps=1", out=tmp_path / "s2")`` -> the resolved recipe dict. Defaults:
    data.root = ``synthetic_root``, model.init = ``tiny_checkpoint``, train.output_dir = ``tmp_path / stage``,
    no reporting, no checkpoint within 1000 steps, a log line per step, no progress bar; ``extra`` overrides
    (``section.key=value``) come last and win.
    """
    from lens.training.recipe import load_recipe

    def make(stage: str, *extra: str, out: Path | None = None, root: Path | None = None,
             init: Path | str | None = None) -> dict:
        out = tmp_path / stage if out is None else out
        return load_recipe(TINY_RECIPES / f"{stage}.yaml", [
            f"data.root={root or synthetic_root}", f"model.init={init or tiny_checkpoint}", f"train.output_dir={out}",
            *QUIET_TRAIN, *extra])

    return make


@pytest.fixture()
def one_thread():
    """One intra-op thread: numbers (and so pinned or measured values) do not depend on the runner's thread count,
    and a busy 2-core runner is not oversubscribed."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
