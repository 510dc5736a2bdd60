"""Worker for tests/test_cluster_fixes.py (torchrun, 2 CPU processes, DeepSpeed ZeRO-3 over gloo): load a base
Qwen2.5-VL folder plus a SAM2 file into partitioned parameters, count, check and re-initialise, report per rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    root = Path(sys.argv[1])
    from transformers import TrainingArguments

    from lens.modeling import LensForConditionalGeneration
    from lens.modeling.zero3 import gathered, zero3_enabled
    from lens.training.recipe import close_distributed, init_deepspeed_comm
    from lens.training.trainable import set_trainable

    zero3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
             "train_batch_size": 2}
    args = TrainingArguments(output_dir=str(root / "args"), use_cpu=True, deepspeed=zero3, report_to="none",
                             per_device_train_batch_size=1)
    init_deepspeed_comm(args)
    assert zero3_enabled()
    fields = json.loads((root / "lens_fields.json").read_text())  # the tiny preset's context module and SAM2
    model = LensForConditionalGeneration.from_pretrained(root / "qwen", sam_checkpoint=root / "sam2.pt", **fields)
    partitioned = all(p.numel() == 0 for p in model.parameters())
    whole = [n for n, p in model.named_parameters() if p.numel()]  # parameters left unpartitioned
    counts = set_trainable(model, "stage1")

    file = torch.load(root / "sam2.pt", weights_only=True)["model"]
    params = dict(model.sam.named_parameters())
    with gathered(list(params.values())):
        sam_equal = all(torch.equal(params[k], file[k]) for k in params)
    with gathered([model.learnable_query]):
        before = model.learnable_query.detach().clone()
    torch.manual_seed(1000 + args.process_index)  # each rank draws differently: only rank 0's values may survive
    model.reset_context_module()
    with gathered([model.learnable_query]):
        after = model.learnable_query.detach().clone()
    Path(root, f"rank{args.process_index}.json").write_text(json.dumps({
        "partitioned": partitioned, "whole": whole, "counts": counts, "sam_equal_file": sam_equal,
        "reinit_changed": not torch.equal(before, after), "query_std": float(after.std()),
        "query_sum": float(after.double().sum()),
    }))
    close_distributed()


if __name__ == "__main__":
    main()
