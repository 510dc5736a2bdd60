"""Side-by-side benchmark: this implementation's fast paths vs a flow that does what the original does.

Measured in one run, on the same checkpoint, data and seeds:

  (a) GRPO: one stage-2 optimizer step (generation with a FIXED completion length, mask-IoU scoring,
      reference log-probs, policy forward + backward, optimizer step) with the product trainer (fast) and
      with `ReferenceFlowTrainer` (reference: SAM2 encodes per rollout, per-sample mask decoding, separate
      forwards for the log-probs and the masks). 1 warm-up step, then --steps timed steps; median step time,
      per-phase medians, ratio reference/fast. On CUDA also the MFU of the training forward+backward.
  (b) Evaluation: `Segmenter.run_batch` on --eval-exprs expressions, batched (--eval-batch) vs one at a
      time (batch 1: one generation and one SAM2 encoding per expression); expressions/s and ratio.
      `--parts runner` times the whole evaluation runner the same way (loading, scoring and writing included).
  (c) Peak memory of every measurement: each runs in its own subprocess (this tool re-invoked with
      --worker). CUDA: torch.cuda.max_memory_allocated, reset after the warm-up. CPU: the process's
      ru_maxrss (whole lifetime, includes imports and model loading) and VmHWM reset after the warm-up
      (via /proc/self/clear_refs, when the kernel allows it).

The checkpoint is the preset with random weights (saved once to the work directory); data is a synthetic
dataset written there too (--data to use another REFER-layout root). Completion lengths are forced with
min_new_tokens = max_new_tokens so that random weights give repeatable work.

The LAST line of stdout is one JSON object with every figure and ratio.

Examples:
  OMP_NUM_THREADS=1 python tools/benchmark.py --steps 2 --eval-exprs 16          # CPU, tiny (quick look)
  python tools/benchmark.py --preset qwen2.5-vl-3b --device cuda                  # one GPU, bf16, 8 prompts x G=8
  python tools/benchmark.py --preset qwen2.5-vl-3b --device cuda --parts grpo --workdir /tmp/lensbench
  python tools/benchmark.py --parts runner --eval-exprs 64                         # the evaluation runner, b16 vs b1

Layout: `cli` (options, workers, summary), `grpo_step` (the GRPO measurement), `reference_flow` (the original's flow
as a trainer subclass), `evaluation` (eval throughput), `flops` (FLOP arithmetic, MFU), `timing` (phase timer,
peak memory), `report` (the table). `python -m tools.benchmark` is the same tool.
"""
