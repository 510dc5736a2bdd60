"""A 2-process CPU (gloo) run of tiny stage 2: it completes and every GRPO group stays on one rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "tiny" / "stage2.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_grpo_keeps_groups_on_one_rank(synthetic_root, tiny_checkpoint, tmp_path):
    overrides = [f"data.root={synthetic_root}", f"model.init={tiny_checkpoint}", f"train.output_dir={tmp_path / 'run'}",
                 "train.max_steps=2", "train.report_to=none", "train.save_steps=1000", "train.logging_steps=1",
                 "train.disable_tqdm=true", "grpo.max_completion_length=8", "train.per_device_train_batch_size=4",
                 "grpo.num_generations=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(Path(__file__).with_name("dist_grpo_worker.py")), str(RECIPE), str(tmp_path), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    g = 4  # num_generations, set above: one whole group per rank and step
    for r in ranks:
        assert len(r["batches"]) == 2  # one generation batch per step
        for batch in r["batches"]:
            assert len(batch) == 4 and all(n == g for n in Counter(batch).values()), batch  # whole groups only
    # the two ranks work on different prompts, and the loss was logged on every step
    for step in range(2):
        assert set(ranks[0]["batches"][step]).isdisjoint(ranks[1]["batches"][step])
    assert len(ranks[0]["loss"]) == 2
