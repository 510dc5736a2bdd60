"""Command line: ``python -m lens.evaluation --config configs/eval/paper.yaml --model weights/LENS``.

Options can come from a YAML file (``--config``; keys are the option names, ``-`` or ``_``);
flags given on the command line override the YAML. Multi-GPU: run under ``torchrun`` (see eval.sh).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from lens.evaluation.runner import EvalConfig, run_evaluation, valid_benchmark_names

EPILOG = """\
benchmarks: names from lens/data/registry.py (refcoco_val, refcoco_testA, ..., refcocog_test,
reasonseg_val, reasonseg_test, groundingsuite, and the *_train sets) or custom:<path.jsonl>;
append ':cot' to a name for chain-of-thought prompting (samr1_v4), or pass --cot for all.

examples:
  python -m lens.evaluation --config configs/eval/paper.yaml --model weights/LENS
  python -m lens.evaluation --model weights/LENS_ReasonSeg_CoT --benchmarks reasonseg_val:cot reasonseg_test:cot
  python -m lens.evaluation --config configs/eval/synthetic.yaml --limit 32
  GPUS=8 bash eval.sh --config configs/eval/paper.yaml --model weights/LENS --batch-size 32
  # score saved predictions (LENS's --save-predictions output or another system's masks), no model loaded:
  bash eval.sh --predictions outputs/eval/tiny --benchmarks refcoco_val --out outputs/eval/rescored
  bash eval.sh --predictions preds.jsonl --protocol standard --allow-missing
"""


def build_parser() -> argparse.ArgumentParser:
    """Every option defaults to 'not given' so YAML values survive unless overridden."""
    p = argparse.ArgumentParser(
        prog="python -m lens.evaluation", description="Evaluate a LENS model on segmentation benchmarks.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", type=Path, help="YAML file with option defaults (configs/eval/*.yaml)")
    p.add_argument("--model", help="checkpoint folder or preset name (tiny, qwen2.5-vl-3b)")
    p.add_argument("--benchmarks", nargs="+", metavar="NAME", help="benchmark names (space or comma separated)")
    p.add_argument("--cot", action="store_true", help="chain-of-thought prompting for every benchmark")
    p.add_argument("--data-root", help="dataset root in the upstream layout (default: datasets)")
    p.add_argument("--out", help="output folder (default: <model>/evaluations, or outputs/eval/<preset>)")
    p.add_argument("--protocol", choices=("lens", "standard"), help="metric protocol (default: lens)")
    p.add_argument("--batch-size", type=int, help="expressions per forward (default: 16)")
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: 256, 512 with CoT)")
    p.add_argument("--limit", type=int, help="only the first N expressions of each split (smoke runs)")
    p.add_argument("--save-predictions", action="store_true", help="write <split>.predictions.jsonl (RLE, text, box)")
    p.add_argument("--save-overlays", type=int, metavar="K", help="save the K best and K worst overlays per split")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--overwrite", action="store_true", help="recompute splits that already have results")
    p.add_argument("--predictions", metavar="FILE_OR_DIR",
                   help="score this predictions JSONL file (or the *.predictions.jsonl files of a folder); no model")
    p.add_argument("--allow-missing", action="store_true",
                   help="with --predictions: score a partial file and report coverage instead of failing")
    p.add_argument("--overlays-filter", choices=("extremes", "mask_rescues_box", "box_rescues_mask"),
                   help="which expressions --save-overlays draws (default: extremes = K best and K worst)")
    p.add_argument("--list-benchmarks", action="store_true", help="print the valid benchmark names and exit")
    return p


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return data


def resolve_config(argv: list[str] | None = None) -> EvalConfig | None:
    """YAML (if any) overridden by the flags given; ``None`` after ``--list-benchmarks``."""
    args = vars(build_parser().parse_args(argv))
    if args.pop("list_benchmarks", False):
        print("\n".join(valid_benchmark_names()))
        return None
    config = args.pop("config", None)
    values = load_yaml(config) if config is not None else {}
    values.update(args)
    return EvalConfig.from_dict(values, source=config)  # a typo in the YAML names the file


def main(argv: list[str] | None = None) -> int:
    """Bad input (options, data, predictions files) ends with one ``error: ...`` line and exit status 2;
    ``LENS_DEBUG=1`` shows the traceback instead."""
    try:
        cfg = resolve_config(argv)
        if cfg is None:
            return 0
        run_evaluation(cfg)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        if os.environ.get("LENS_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
