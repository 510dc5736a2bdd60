"""The strict configuration: every recipe and evaluation config under configs/ loads; a misspelled key anywhere
(top level, a section, train, grpo, a base file, an override) fails at load time naming the file, the dotted key and
the closest valid name; the CLIs print that one line; the tiny recipes resolve to the values the quickstart uses."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lens.config import ConfigError, parse_override, set_dotted
from lens.evaluation.config import EvalConfig, parse_benchmarks
from lens.training.config import (
    SECTIONS,
    TrainableGroups,
    from_dict,
    load_config,
    load_recipe,
    train_fields,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
ALL_RECIPES = sorted(RECIPES.rglob("*.yaml"))
EVAL_CONFIGS = sorted((REPO / "configs" / "eval").glob("*.yaml"))
TINY_STAGE1 = RECIPES / "tiny" / "stage1.yaml"
TINY_STAGE2 = RECIPES / "tiny" / "stage2.yaml"


def recipe_file(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    return str(info.value)


# ---------------------------------------------------------------------- every config under configs/
@pytest.mark.parametrize("path", ALL_RECIPES, ids=[str(p.relative_to(RECIPES)) for p in ALL_RECIPES])
def test_every_recipe_loads_and_its_resolution_is_stable(path):
    recipe = load_recipe(path)
    assert "base" not in recipe
    assert set(recipe["train"]) <= train_fields()
    # the dict form round-trips through the schema and YAML unchanged (build_trainer re-validates it; the run writes
    # it as config.yaml)
    assert from_dict(recipe).to_dict() == recipe
    assert yaml.safe_load(yaml.safe_dump(recipe, sort_keys=False)) == recipe
    assert load_config(path).to_dict() == recipe


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=[p.stem for p in EVAL_CONFIGS])
def test_every_evaluation_config_loads(path):
    cfg = EvalConfig.from_file(path, model="tiny")
    cfg.validate()
    assert parse_benchmarks(cfg.benchmarks)


def test_the_schema_covers_every_trainable_group():
    from lens.training.trainable import GROUPS

    assert tuple(f.name for f in dataclasses.fields(TrainableGroups)) == GROUPS
    assert tuple(f.name for f in dataclasses.fields(SECTIONS["lr_multipliers"])) == GROUPS


# ---------------------------------------------------------------------- typos: file, key, suggestion
@pytest.mark.parametrize(("line", "key", "suggestion"), [
    ("rewrads: [box_iou]", "rewrads", "rewards"),  # top level
    ("loss: {seg_wieght: 5}", "loss.seg_wieght", "loss.seg_weight"),  # a typed section
    ("model: {dtpye: bfloat16}", "model.dtpye", "model.dtype"),
    ("train: {learning_rte: 1.0e-5}", "train.learning_rte", "train.learning_rate"),  # TrainingArguments
    ("grpo: {num_generatons: 4}", "grpo.num_generatons", "grpo.num_generations"),  # GRPOConfig
    ("train: {beta: 0.1}", "train.beta", "grpo.beta"),  # the right name in the wrong section
    ("learning_rate: 1.0e-5", "learning_rate", "train.learning_rate"),
    ("modle: {init: x}", "modle", "model"),  # a misspelled section
])
def test_a_misspelled_key_in_a_file_names_the_file_the_key_and_the_closest_name(tmp_path, line, key, suggestion):
    path = recipe_file(tmp_path, f"base: {TINY_STAGE2}\n{line}\n")
    assert error_of(path) == f"{path}: unknown key {key!r}; did you mean {suggestion!r}?"


def test_a_misspelled_key_in_a_base_recipe_names_the_base_file(tmp_path):
    base = recipe_file(tmp_path, f"base: {TINY_STAGE1}\nloss: {{dice_wieght: 2}}\n", "base.yaml")
    child = recipe_file(tmp_path, "base: base.yaml\ntrain: {seed: 1}\n", "child.yaml")
    assert error_of(child) == f"{base}: unknown key 'loss.dice_wieght'; did you mean 'loss.dice_weight'?"


@pytest.mark.parametrize(("override", "key", "suggestion"), [
    ("loss.seg_wieght=5", "loss.seg_wieght", "loss.seg_weight"),
    ("model.dtpye=bfloat16", "model.dtpye", "model.dtype"),
    ("train.learning_rte=1e-5", "train.learning_rte", "train.learning_rate"),
    ("cache_sam_featres=true", "cache_sam_featres", "cache_sam_features"),  # top level
])
def test_a_misspelled_override_names_the_override(override, key, suggestion):
    message = error_of(TINY_STAGE1, ["train.max_steps=3", override])
    assert message == (f"{os.path.normpath(TINY_STAGE1)}: override {override!r}: unknown key {key!r}; "
                       f"did you mean {suggestion!r}?")


def test_a_grpo_typo_in_an_override_and_far_off_keys_list_the_valid_names():
    assert error_of(TINY_STAGE2, ["grpo.temprature=1"]).endswith(
        "unknown key 'grpo.temprature'; did you mean 'grpo.temperature'?")
    assert error_of(TINY_STAGE1, ["loss.zzzzzz=1"]).endswith(
        "unknown key 'loss.zzzzzz'; valid keys of loss: objective, seg_weight, bce_weight, dice_weight, lm_weight")
    assert error_of(TINY_STAGE1, ["train.zzzzzzzzzzzz=1"]).endswith(
        "train takes transformers.TrainingArguments fields")


def test_values_are_checked_against_their_types_and_stages():
    where = os.path.normpath(TINY_STAGE1)
    assert error_of(TINY_STAGE1, ["loss.seg_weight=heavy"]) == (
        f"{where}: override 'loss.seg_weight=heavy': loss.seg_weight must be a number, got 'heavy'")
    assert error_of(TINY_STAGE1, ["model.dtype=bfloat61"]).endswith(
        "model.dtype='bfloat61'; expected one of float32, bfloat16, float16; did you mean 'bfloat16'?")
    assert error_of(TINY_STAGE1, ["data.train=refcoco:train"]).endswith(
        "data.train must be a list of strings, got 'refcoco:train'")
    assert error_of(TINY_STAGE1, ["grpo.beta=0.1"]).endswith(
        "'grpo' applies to stage2 recipes only (this recipe is stage1)")
    assert error_of(TINY_STAGE2, ["loss.objective=lm"]).startswith(f"{os.path.normpath(TINY_STAGE2)}: loss.objective")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_recipe(TINY_STAGE1, ["learning_rate"])


def test_null_removes_an_inherited_key_and_its_default_applies(tmp_path):
    real = load_recipe(RECIPES / "stage1.yaml")
    assert real["train"]["deepspeed"] and real["model"]["attn_implementation"] == "flash_attention_2"
    path = recipe_file(tmp_path, f"base: {RECIPES / 'stage1.yaml'}\nmodel: {{attn_implementation: null}}\n"
                                 "train: {deepspeed: null}\n")
    recipe = load_recipe(path, ["loss.bce_weight=null"])
    assert "deepspeed" not in recipe["train"] and recipe["model"]["attn_implementation"] is None
    assert recipe["loss"]["bce_weight"] == 1.0  # the schema's default
    assert {k: v for k, v in recipe["train"].items() if k != "deepspeed"} == {
        k: v for k, v in real["train"].items() if k != "deepspeed"}


def test_defaults_live_in_the_schema():
    recipe = load_recipe(RECIPES / "tiny" / "warmup.yaml")
    assert recipe["loss"] == {"objective": "lm", "seg_weight": 1.0, "bce_weight": 1.0, "dice_weight": 1.0,
                              "lm_weight": 1.0}
    assert recipe["data"]["question_template"] == "pr1_grounding" and recipe["data"]["llm_longest_side"] is None
    assert recipe["train"]["remove_unused_columns"] is False and recipe["train"]["seed"] == 0  # the recipe's seed
    assert "grpo" not in recipe and "rewards" not in recipe  # stage-2 sections only in stage-2 recipes
    stage2 = load_recipe(RECIPES / "stage2.yaml")
    assert "flow" not in stage2 and stage2["train"]["gradient_checkpointing_kwargs"] == {"use_reentrant": False}


# ---------------------------------------------------------------------- the tiny recipes inherit the real ones
TINY_STAGE1_RESOLVED = {
    "stage": "stage1",
    "model": {"init": "outputs/quickstart/warmup/final", "dtype": "float32", "attn_implementation": None,
              "sam_checkpoint": None, "sam_variant": None, "query_position_mode": None,
              "reinit_context": True},
    "data": {"train": ["refcoco:train"], "root": "outputs/quickstart/data", "question_template": "pr1_grounding",
             "min_pixels": 3136, "max_pixels": 12544, "llm_longest_side": None, "answer_style": "phrase",
             "memo_images": 2048},
    "train": {"output_dir": "outputs/quickstart/stage1", "per_device_train_batch_size": 16, "learning_rate": 0.001,
              "lr_scheduler_type": "cosine", "warmup_steps": 10, "num_train_epochs": 4, "weight_decay": 0.0,
              "logging_steps": 50, "save_steps": 200, "save_total_limit": 2, "dataloader_num_workers": 0,
              "report_to": "tensorboard", "seed": 0, "use_cpu": True, "remove_unused_columns": False,
              "ddp_find_unused_parameters": False},
    "loss": {"objective": "lm+seg", "seg_weight": 1.0, "bce_weight": 1.0, "dice_weight": 1.0, "lm_weight": 1.0},
    "trainable": {"llm": True, "context": True, "sam_prompt_encoder": True, "sam_mask_decoder": True},
    "lr_multipliers": {"llm": 0.2, "context": 0.03},
    "cache_sam_features": True,
}
TINY_STAGE2_RESOLVED = {
    "stage": "stage2",
    "model": {"init": "outputs/quickstart/stage1/final", "dtype": "float32", "attn_implementation": None,
              "sam_checkpoint": None, "sam_variant": None, "query_position_mode": None,
              "reinit_context": False},
    "data": {"train": ["refcoco:train"], "root": "outputs/quickstart/data", "question_template": "pr1_grounding",
             "min_pixels": 3136, "max_pixels": 12544, "llm_longest_side": None, "answer_style": "grounding",
             "memo_images": 2048},
    "train": {"output_dir": "outputs/quickstart/stage2", "per_device_train_batch_size": 32,
              "gradient_accumulation_steps": 1, "learning_rate": 2e-05, "lr_scheduler_type": "linear",
              "bf16": False, "gradient_checkpointing": False, "logging_steps": 1, "save_steps": 200,
              "save_total_limit": 2, "dataloader_num_workers": 0, "report_to": "tensorboard", "seed": 0,
              "use_cpu": True, "max_steps": 300, "remove_unused_columns": False, "ddp_find_unused_parameters": False},
    "loss": {"objective": None, "seg_weight": 1.0, "bce_weight": 1.0, "dice_weight": 1.0, "lm_weight": 1.0},
    "trainable": {"sam_image_encoder": False},
    "lr_multipliers": {"sam_mask_decoder": 10.0},
    "rewards": ["box_iou", "mask_iou"],
    "grpo": {"num_generations": 2, "beta": 0.04, "temperature": 1.5, "top_p": 1.0, "top_k": 0,
             "max_completion_length": 16, "loss_type": "grpo", "scale_rewards": "group"},
    "grpo_shared_prefix": True,  # inherited: each group's prompt runs once (exact; tests/test_shared_prefix.py)
    "single_pass_rewards": True,  # inherited: the mask reward from the loss forward (same numbers; test_golden.py)
    "cache_sam_features": True,
}


@pytest.mark.parametrize(("path", "expected"), [(TINY_STAGE1, TINY_STAGE1_RESOLVED),
                                               (TINY_STAGE2, TINY_STAGE2_RESOLVED)], ids=["stage1", "stage2"])
def test_tiny_recipes_inherit_the_real_ones_and_resolve_to_the_quickstarts_values(path, expected):
    """An edit of configs/recipes/stage{1,2}.yaml must not move the quickstart's recipes unnoticed."""
    real = f"../{path.name}"
    assert yaml.safe_load(path.read_text())["base"] == real
    assert load_recipe(path) == expected


# ---------------------------------------------------------------------- evaluation configs
def test_evaluation_config_typos_name_the_file_and_the_closest_option(tmp_path):
    path = recipe_file(tmp_path, "model: tiny\nbatchsize: 4\n", "eval.yaml")
    with pytest.raises(ValueError, match=r"unknown evaluation option") as info:
        EvalConfig.from_file(path)
    assert str(info.value) == f"{path}: unknown evaluation option 'batchsize'; did you mean 'batch_size'?"
    with pytest.raises(ValueError, match=r"'modle'; did you mean 'model'\?"):
        EvalConfig.from_dict({"modle": "tiny"})
    # the CLI prints that line, naming the YAML file, and exits 2
    proc = subprocess.run([sys.executable, "-m", "lens.evaluation", "--config", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {path}: unknown evaluation option 'batchsize'; did you mean 'batch_size'?"


# ---------------------------------------------------------------------- shared pieces
def test_one_dtype_table_and_one_dotted_setter():
    import torch

    import lens.config
    import lens.evaluation.distributed
    import lens.training.recipe

    assert lens.training.recipe.DTYPES is lens.evaluation.distributed.DTYPES is lens.config.DTYPES
    assert lens.config.DTYPES["bfloat16"] is torch.bfloat16
    tree: dict = {"train": {"seed": 1}}
    keys, value = parse_override("train.learning_rate=1e-5")
    set_dotted(tree, keys, value)
    set_dotted(tree, "grpo.generation_kwargs.min_new_tokens", 8)
    assert tree == {"train": {"seed": 1, "learning_rate": 1e-5}, "grpo": {"generation_kwargs": {"min_new_tokens": 8}}}
    with pytest.raises(ConfigError, match=r"train.seed is not a section"):
        set_dotted(tree, "train.seed.x", 1)


# ---------------------------------------------------------------------- command lines
def run_command(*cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("LENS_DEBUG", None)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


def test_the_training_cli_prints_one_line_and_exits_2():
    proc = run_command(sys.executable, "-m", "lens.training", "--recipe", "configs/recipes/tiny/stage1.yaml",
                       "loss.seg_wieght=5")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: configs/recipes/tiny/stage1.yaml: override 'loss.seg_wieght=5': unknown key 'loss.seg_wieght'; "
        "did you mean 'loss.seg_weight'?"]
    proc = run_command(sys.executable, "-m", "lens.training", "--recipe", "configs/recipes/tiny/nope.yaml")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error: recipe configs/recipes/tiny/nope.yaml not found (recipes live in configs/recipes/)"]


def test_the_launcher_stops_on_a_typo_before_preparing_anything():
    proc = run_command("bash", "train_stage1.sh", "configs/recipes/tiny/stage1.yaml", "loss.seg_wieght=5")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: configs/recipes/tiny/stage1.yaml: override 'loss.seg_wieght=5': unknown key 'loss.seg_wieght'; "
        "did you mean 'loss.seg_weight'?"]


# ---------------------------------------------------------------------- the TrainingArguments / GRPOConfig names
def test_field_names_are_kept_per_installed_version_and_a_bad_cache_file_is_rebuilt(tmp_path, monkeypatch):
    from importlib.metadata import version

    from transformers import TrainingArguments

    from lens.training.hf_fields import init_field_names

    monkeypatch.setenv("LENS_CACHE", str(tmp_path))
    truth = frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)
    assert init_field_names("transformers", "TrainingArguments") == truth
    file = tmp_path / f"fields-transformers-{version('transformers')}-TrainingArguments.json"
    assert file.is_file() and sorted(truth) == __import__("json").loads(file.read_text())
    file.write_text('["learning_rate", "only_in_the_cache"]')  # the file, not the import, answers the next call
    assert init_field_names("transformers", "TrainingArguments") == {"learning_rate", "only_in_the_cache"}
    file.write_text("{not json")
    assert init_field_names("transformers", "TrainingArguments") == truth  # rebuilt from the class
    assert init_field_names("transformers", "TrainingArguments") == truth and "{" not in file.read_text()


def test_a_recipe_check_with_known_names_imports_neither_transformers_nor_trl(tmp_path):
    """The launcher checks the recipe before any rank starts; with the names kept it takes a fraction of a second."""
    env = {**os.environ, "LENS_CACHE": str(tmp_path)}
    code = ("import sys; from lens.training.config import load_recipe; load_recipe(sys.argv[1], sys.argv[2:]); "
            "print(sorted(m for m in ('transformers', 'trl', 'torch') if m in sys.modules))")
    cmd = [sys.executable, "-c", code, str(TINY_STAGE2), "grpo.beta=0.01", "train.learning_rate=1e-5"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    assert "transformers" in first.stdout and second.stdout.strip() == "[]"
    # a typo in train is still caught from the kept names, with its suggestion
    typo = subprocess.run([*cmd[:4], "train.learning_rat=1e-5"], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)
    assert typo.returncode == 1 and "unknown key 'train.learning_rat'" in typo.stderr
    assert "train.learning_rate" in typo.stderr
