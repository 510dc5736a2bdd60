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


def tiny_base(root: Path, init: Path | str, out: Path) -> list[str]:
    """The overrides every tiny test recipe starts from: data, weights, output folder, then QUIET_TRAIN."""
    return [f"data.root={root}", f"model.init={init}", f"train.output_dir={out}", *QUIET_TRAIN]


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
        return load_recipe(TINY_RECIPES / f"{stage}.yaml",
                           [*tiny_base(root or synthetic_root, init or tiny_checkpoint, out), *extra])

    return make


@pytest.fixture(scope="module")
def tiny_grpo(synthetic_root: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """Factory for tests that call a GRPO trainer's pieces directly (one trainer per module, built once):
    ``tiny_grpo("name", *extra)`` -> ``(trainer, [first, second])``, the tiny stage-2 recipe on the synthetic data and
    the tiny checkpoint (`tiny_base`, 10 completion tokens, one step; ``extra`` overrides win), in training mode with
    one accumulation step, and two of its data set's rows whose images differ (so a row -> image index matters)."""
    from lens.training.recipe import build_trainer, load_recipe

    def make(name: str, *extra: str):
        recipe = load_recipe(TINY_RECIPES / "stage2.yaml", [
            *tiny_base(synthetic_root, tiny_checkpoint, tmp_path_factory.mktemp(name)), "train.max_steps=1",
            "grpo.max_completion_length=10", *extra])
        trainer = build_trainer(recipe)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop; tests call the pieces directly
        data = trainer.train_dataset
        first = dict(data[0])
        second = next(dict(data[i]) for i in range(1, len(data)) if data[i]["image_id"] != first["image_id"])
        return trainer, [first, second]

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


@pytest.fixture()
def make_batch():
    """Factory: ``make_batch(processor, n_rows=3, n_images=2, seed=0)`` -> (tokens, sam_images, row -> image index).

    Rows alternate over ``n_images`` random images; left-padded prompts + right-padded completions (eos-terminated).
    tokens: input_ids / attention_mask (B, L), pixel_values, image_grid_thw; sam_images (N, 3, 256, 256) uint8.
    """
    import numpy as np
    import torch
    from PIL import Image

    from lens.prompts import build_messages

    def make(processor, n_rows: int = 3, n_images: int = 2, seed: int = 0):
        rng = np.random.default_rng(seed)
        images = [Image.fromarray(rng.integers(0, 255, (120 + 20 * i, 160, 3), dtype=np.uint8)) for i in range(n_images)]
        rows = [i % n_images for i in range(n_rows)]
        texts = [
            processor.apply_chat_template(build_messages("the red circle" + " left" * r), add_generation_prompt=True,
                                          tokenize=False)
            for r in range(n_rows)
        ]
        inputs = processor(text=texts, images=[images[r] for r in rows], padding=True, return_tensors="pt")
        tok = processor.tokenizer
        completions = ["(1,2),(30,40)", "hello there", "(5,5),(9,9) done"][:n_rows]
        comp = tok([c + tok.eos_token for c in completions], add_special_tokens=False, padding=True,
                   padding_side="right", return_tensors="pt")
        ids = torch.cat([inputs["input_ids"], comp["input_ids"]], 1)
        mask = torch.cat([inputs["attention_mask"], comp["attention_mask"]], 1)
        sam = torch.from_numpy(rng.integers(0, 255, (n_images, 3, 256, 256), dtype=np.uint8))
        return dict(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                    image_grid_thw=inputs["image_grid_thw"]), sam, torch.tensor(rows)

    return make
