#!/usr/bin/env python
"""Quick qualitative check: segment what a prompt names and write an overlay PNG.

    python demo.py --image dog.jpg --prompt "the dog" [--model weights/LENS] [--out overlay.png] [--cot]
    python demo.py --gradio [--model weights/LENS]      # small web UI (needs `pip install gradio`)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from lens.visualize import overlay


DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device_dtype(device: str, dtype: str):
    """`auto`: CUDA and bfloat16 where a GPU is visible, else CPU and float32 (as eval.sh)."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def load_segmenter(model: str | None, device: str = "auto", dtype: str = "auto"):
    from lens import Segmenter

    device, torch_dtype = resolve_device_dtype(device, dtype)
    if model is None:
        print("[demo] no --model given: using the randomly initialised `tiny` preset, so its masks are untrained.")
        return Segmenter.from_pretrained("tiny", device=device, dtype=torch_dtype, max_new_tokens=32)
    return Segmenter.from_pretrained(model, device=device, dtype=torch_dtype)


def run_gradio(segmenter) -> None:
    try:
        import gradio as gr
    except ImportError:
        sys.exit("--gradio needs gradio: pip install gradio")

    def predict(image: Image.Image, prompt: str, cot: bool):
        pred = segmenter(image, prompt, cot=cot)
        return overlay(image, pred.mask, pred.box, pred.text), pred.text

    gr.Interface(
        predict,
        [gr.Image(type="pil"), gr.Textbox(label="Instruction"), gr.Checkbox(label="Chain of thought")],
        [gr.Image(type="pil"), gr.Textbox(label="Answer")],
        title="LENS: text-prompted segmentation",
    ).launch(server_name="0.0.0.0", server_port=7860)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, help="input image file")
    ap.add_argument("--prompt", help="what to segment, e.g. 'the dog on the left'")
    ap.add_argument("--model", help="checkpoint folder (ours or a released LENS one) or a preset name")
    ap.add_argument("--out", type=Path, default=Path("demo_overlay.png"), help="overlay PNG to write")
    ap.add_argument("--cot", action="store_true", help="ask for <think> reasoning before the answer")
    ap.add_argument("--gradio", action="store_true", help="start a web UI instead")
    ap.add_argument("--dtype", choices=DTYPES, default="auto", help="model dtype (auto: bfloat16 on CUDA, else float32)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    args = ap.parse_args(argv)

    if not args.gradio and (args.image is None or not args.prompt):
        ap.error("--image and --prompt are required (or use --gradio)")
    from lens.data.transforms import load_rgb

    image = load_rgb(args.image) if not args.gradio else None  # fail fast on a bad image path
    segmenter = load_segmenter(args.model, args.device, args.dtype)
    if args.gradio:
        run_gradio(segmenter)
        return 0
    pred = segmenter(image, args.prompt, cot=args.cot)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, pred.mask, pred.box, pred.text).save(args.out)
    box = "none parsed" if pred.box is None else "[" + ", ".join(f"{v:.1f}" for v in pred.box) + "]"
    print(f"answer: {pred.text.strip()!r}\nbox (original pixels): {box}\nmask pixels: {int(pred.mask.sum())}"
          f"  score: {pred.score:.3f}\noverlay: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
