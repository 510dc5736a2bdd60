"""The smaller defects of the cluster path, each with the behaviour that now guards it: SAM feature banks per mode,
no-grad forwards in `batch_size` chunks, the reference's attention implementation, rank-0 files, SAM2 in eval
mode in stage 1, the upstream recipe settings; and ZeRO-3 loading under partitioned parameters (2 processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from lens.modeling import build_preset
from lens.training.grpo import build_reference_model
from lens.training.recipe import build_trainer, load_recipe, run
from lens.training.trainable import set_trainable

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes"


def tiny(stage: str, root: Path, init: Path, out: Path, *extra: str) -> dict:
    return load_recipe(RECIPES / "tiny" / f"{stage}.yaml", [
        f"data.root={root}", f"model.init={init}", f"train.output_dir={out}", "train.report_to=none",
        "train.save_steps=1000", "train.logging_steps=1", "train.disable_tqdm=true", *extra])


@pytest.fixture()
def grpo_trainer(synthetic_root, tiny_checkpoint, tmp_path):
    trainer = build_trainer(tiny(
        "stage2", synthetic_root, tiny_checkpoint, tmp_path / "s2", "train.max_steps=1", "grpo.max_completion_length=8",
        "grpo.num_iterations=2", "train.per_device_train_batch_size=4", "grpo.num_generations=2"))
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def group_rows(trainer, images: list[int]) -> list[dict]:
    """G rollouts of one prompt for each of the given distinct images (dataset order)."""
    data, g = trainer.train_dataset, trainer.args.num_generations
    firsts, seen = [], set()
    for i in range(len(data)):
        if data[i]["image_id"] not in seen:
            seen.add(data[i]["image_id"])
            firsts.append(i)
    return [dict(data[firsts[k]]) for k in images for _ in range(g)]


def test_evaluation_during_training_leaves_each_buffered_row_its_own_image(grpo_trainer):
    trainer = grpo_trainer
    trainer.model.train()
    rows = group_rows(trainer, [0, 1])
    torch.manual_seed(0)
    buffered = trainer._generate_and_score_completions(rows)  # kept by TRL for num_iterations = 2
    trainer.model.eval()
    trainer._generate_and_score_completions(group_rows(trainer, [2, 3, 4]))  # an evaluation in between
    trainer.model.train()
    features, local = trainer._bank_features(buffered)
    with torch.no_grad():
        own = trainer.model(sam_images=torch.stack([r["sam_image"] for r in rows]))  # each row's own image
    torch.testing.assert_close(features.image_embed[local], own.image_embed, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(trainer._compute_loss(trainer.model, buffered))
    trainer.model.eval()  # rows of the training bank are refused against the evaluation bank, not mis-indexed
    with pytest.raises(RuntimeError, match="bank"):
        trainer._bank_features(buffered)


def test_no_grad_policy_log_probs_run_in_batch_size_chunks(grpo_trainer):
    trainer = grpo_trainer
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(group_rows(trainer, [0, 1]))
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    k = inputs["completion_ids"].shape[1]
    rows = []
    hook = trainer.model.register_forward_hook(lambda m, a, kw, out: rows.append(kw["input_ids"].shape[0]),
                                               with_kwargs=True)
    try:
        with torch.no_grad():
            whole, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, att, k, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
            chunked, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, att, k, batch_size=3, pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"])
    finally:
        hook.remove()
    assert rows == [4, 3, 1]  # one forward of the whole batch, then chunks of at most 3 rows
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_reference_model_uses_the_policy_attention(attn):
    model, _ = build_preset("tiny", seed=0)
    model.config._attn_implementation = attn
    ref = build_reference_model(model)
    assert ref.config._attn_implementation == attn


def test_only_rank_zero_writes_the_resolved_config(synthetic_root, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(TrainingArguments, "process_index", property(lambda self: 1))
    build_trainer(tiny("stage1", synthetic_root, tiny_checkpoint, tmp_path / "r1", "train.max_steps=1"))
    assert not (tmp_path / "r1" / "config.yaml").exists()
    monkeypatch.undo()
    build_trainer(tiny("stage1", synthetic_root, tiny_checkpoint, tmp_path / "r0", "train.max_steps=1"))
    assert (tmp_path / "r0" / "config.yaml").is_file()


def test_sam2_runs_in_eval_mode_while_none_of_it_learns():
    model, _ = build_preset("tiny", seed=0)
    set_trainable(model, "stage1")  # the paper's stage 1: only the context module
    model.train()
    assert not model.sam.training and not model.sam.sam_mask_decoder.training
    assert model.connector.training and model.model.training
    set_trainable(model, "stage2")  # the decoder learns: SAM2 in train mode
    model.train()
    assert model.sam.sam_mask_decoder.training


def test_upstream_recipe_settings():
    stage1 = load_recipe(RECIPES / "stage1.yaml")
    assert stage1["train"]["save_only_model"] is True
    reasonseg = load_recipe(RECIPES / "reasonseg.yaml")
    g, train = reasonseg["grpo"]["num_generations"], reasonseg["train"]
    assert g == 8
    per_rank = train["per_device_train_batch_size"] * reasonseg["grpo"].get("steps_per_generation",
                                                                           train["gradient_accumulation_steps"])
    assert per_rank % g == 0  # whole groups on each rank


def test_resume_of_a_weights_only_run_is_a_clear_error(synthetic_root, tiny_checkpoint, tmp_path):
    recipe = tiny("stage1", synthetic_root, tiny_checkpoint, tmp_path / "w", "train.max_steps=1",
                  "train.save_only_model=true")
    with pytest.raises(ValueError, match="save_only_model=false"):
        run(recipe, resume=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_zero3_loading_counts_and_reinit_under_partitioned_parameters(tmp_path):
    """A base Qwen2.5-VL folder + Meta's SAM2 file loaded by 2 ZeRO-3 ranks: the SAM2 weights are the file's, the
    trainable counts are the full sizes, the context module really re-initialises (the same on both ranks)."""
    from lens.modeling.sam import build_sam
    from lens.training.grpo import build_reference_model

    model, processor = build_preset("tiny", seed=0)
    qwen = build_reference_model(model)  # a stock Qwen2.5-VL with the tiny LM and vision weights
    qwen.save_pretrained(tmp_path / "qwen")
    processor.save_pretrained(tmp_path / "qwen")
    cfg = model.config
    torch.manual_seed(123)
    sam = build_sam(cfg.sam_variant, cfg.sam_image_size, cfg.sam_overrides, cfg.sam_dynamic_multimask)
    torch.save({"model": sam.state_dict()}, tmp_path / "sam2.pt")  # Meta's file layout
    from lens.modeling.loading import _LENS_FIELDS

    (tmp_path / "lens_fields.json").write_text(json.dumps({k: getattr(cfg, k) for k in _LENS_FIELDS}))
    expected = set_trainable(model, "stage1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(Path(__file__).with_name("zero3_loading_worker.py")), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["counts"] == expected and r["counts"]["context"] > 0
        assert r["sam_equal_file"] and r["reinit_changed"]
        assert 0.015 < r["query_std"] < 0.025
    assert ranks[0]["query_sum"] == ranks[1]["query_sum"]  # rank 0's initialisation reached every rank
    # every parameter is partitioned: the root-level learnable_query once came back whole from this load, one copy
    # per rank with its own values (lens.modeling.zero3.partition_whole_parameters)
    whole = [n for r in ranks for n in r["whole"]]
    assert all(r["partitioned"] for r in ranks), whole


def test_a_preset_policy_gets_the_recipes_attention_implementation():
    from lens.training.recipe import load_policy

    model, _ = load_policy({"init": "preset:tiny", "attn_implementation": "eager"}, seed=0)
    assert model.config._attn_implementation == "eager"


def test_a_given_policy_must_match_the_recipes_position_mode(synthetic_root, tiny_checkpoint, tmp_path):
    recipe = tiny("stage1", synthetic_root, tiny_checkpoint, tmp_path / "p", "train.max_steps=1",
                  "model.query_position_mode=mrope")
    model, processor = build_preset("tiny", seed=0, query_position_mode="upstream")
    with pytest.raises(ValueError, match="query_position_mode='mrope'"):
        build_trainer(recipe, policy=(model, processor))
