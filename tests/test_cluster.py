"""The cluster path on CPU: 2-process runs through the launchers (gloo; DeepSpeed's CPU accelerator for ZeRO),
with gradient accumulation 2. Each run trains, saves and ends with a checkpoint that reloads with the trained
weights; the ZeRO-3 runs and the DDP GRPO run also resume from step 1 with the same next-step loss as the
uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "recipes" / "tiny"
ZERO3, ZERO2 = "train.deepspeed=configs/deepspeed/zero3.json", "train.deepspeed=configs/deepspeed/zero2.json"
STAGE1 = ("train_stage1.sh", TINY / "stage1.yaml", "train.per_device_train_batch_size=2", "train.warmup_steps=0")
STAGE2 = ("train_stage2.sh", TINY / "stage2.yaml", "train.per_device_train_batch_size=4", "grpo.num_generations=2",
          "grpo.max_completion_length=6")
LORA = ("train_stage2.sh", TINY / "lora.yaml", *STAGE2[2:])
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, recipe: Path, out: Path, *overrides: str, root: Path, init: Path, resume: bool = False) -> str:
    """`GPUS_PER_NODE=2 bash <script> <recipe> [--resume] ...` as a user runs it on a machine without GPU."""
    env = {**os.environ, "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()), "TOKENIZERS_PARALLELISM": "false"}
    cmd = ["bash", str(ROOT / script), str(recipe), *(["--resume"] if resume else []), f"train.output_dir={out}",
           f"data.root={root}", f"model.init={init}", "train.report_to=none", "train.logging_steps=1",
           "train.disable_tqdm=true", "train.gradient_accumulation_steps=2", "train.max_steps=2",
           "train.save_steps=1", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert "2 CPU process(es)" in proc.stdout
    return proc.stdout


def losses(run: Path) -> list[float]:
    history = json.loads((run / "final" / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def check_reload(final: Path, init: Path, trained: dict[str, torch.Tensor] | None = None) -> None:
    """final/ loads with 0 missing/unexpected keys, differs from the start, equals `trained`, and segments."""
    from lens import Segmenter
    from lens.modeling import LensForConditionalGeneration

    model, info = LensForConditionalGeneration.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    start = load_file(str(init / "model.safetensors"))
    changed = {k for k in start if not torch.equal(start[k], state[k])}
    assert "learnable_query" in changed or any(k.startswith("model.language_model.") for k in changed), changed
    assert all(torch.isfinite(v).all() and v.numel() > 0 for v in state.values())
    if trained is not None:
        common = set(trained) & set(state)
        assert "learnable_query" in common and len(common) > 0.9 * len(state)
        bad = [k for k in common if not torch.allclose(trained[k].float(), state[k].float(), atol=1e-6)]
        assert not bad, bad[:5]
    pred = Segmenter.from_pretrained(str(final), max_new_tokens=4)(np.zeros((64, 80, 3), np.uint8), "the red square")
    assert pred.mask.shape == (64, 80) and np.isfinite(pred.score)


def zero_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights assembled from a ZeRO checkpoint's partitions (DeepSpeed's own converter)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


def train_resume_reload(run, tmp_path: Path, stage, *extra: str, zero: bool, resume: bool = True) -> None:
    script, recipe, *overrides = stage
    a, b = tmp_path / "a", tmp_path / "b"
    run(script, recipe, a, *overrides, *extra)
    uninterrupted = losses(a)
    assert len(uninterrupted) == 2 and all(np.isfinite(uninterrupted))
    if resume:
        shutil.copytree(a / "checkpoint-1", b / "checkpoint-1")  # an interrupted run that saved after step 1
        run(script, recipe, b, *overrides, *extra, resume=True)
        assert losses(b)[-1] == pytest.approx(uninterrupted[-1], rel=1e-4, abs=1e-5)
    # the weights the run trained: assembled from ZeRO's partitions, or the Trainer's own step-2 save (DDP)
    trained = zero_weights(a / "checkpoint-2") if zero else load_file(str(a / "checkpoint-2" / "model.safetensors"))
    check_reload(a / "final", run.init, trained)


@pytest.fixture()
def run(synthetic_root, tiny_checkpoint):
    def go(script, recipe, out, *overrides, resume=False):
        return launch(script, recipe, out, *overrides, root=synthetic_root, init=tiny_checkpoint, resume=resume)

    go.init = tiny_checkpoint
    return go


@pytest.mark.parametrize("stage", [STAGE1, STAGE2], ids=["stage1", "stage2"])
def test_zero3_two_processes_train_resume_and_reload(run, tmp_path, stage):
    train_resume_reload(run, tmp_path, stage, ZERO3, zero=True)


# Each launch costs ~16 s here (~35 s on CI's slower hosts), so the suite resumes where the paths differ: ZeRO-3
# resumes both stages (partitioned optimizer state), DDP the GRPO trainer (stage 1's Trainer resume is the same
# code as under ZeRO-3, and tests/test_training.py resumes it in one process); ZeRO-2 trains stage 2 (its stage 1
# shards the same optimizer the same way).
@pytest.mark.parametrize(("stage", "resume"), [(STAGE1, False), (STAGE2, True)], ids=["stage1", "stage2-resume"])
def test_ddp_two_processes_with_accumulation_train_resume_and_reload(run, tmp_path, stage, resume):
    train_resume_reload(run, tmp_path, stage, zero=False, resume=resume)


def test_zero2_two_processes_train_and_reload(run, tmp_path):
    script, recipe, *overrides = STAGE2
    run(script, recipe, tmp_path / "z2", *overrides, ZERO2)
    assert len(losses(tmp_path / "z2")) == 2
    check_reload(tmp_path / "z2" / "final", run.init, zero_weights(tmp_path / "z2" / "checkpoint-2"))


def test_ddp_lora_two_processes_end_with_a_merged_checkpoint(run, tmp_path):
    script, recipe, *overrides = LORA
    run(script, recipe, tmp_path / "lora", *overrides)
    assert (tmp_path / "lora" / "final" / "adapter" / "adapter_config.json").is_file()
    check_reload(tmp_path / "lora" / "final", run.init)


def test_gpu_recipe_without_gpu_stops_with_a_message(tmp_path):
    env = {**os.environ, "GPUS_PER_NODE": "2"}
    env.pop("LENS_ALLOW_CPU", None)
    proc = subprocess.run(["bash", str(ROOT / "train_stage2.sh"), str(ROOT / "configs/recipes/stage2.yaml"),
                           f"train.output_dir={tmp_path}"], env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 2 and "GPU recipe" in proc.stderr and "LENS_ALLOW_CPU=1" in proc.stderr
    assert not (tmp_path / "config.yaml").exists()
