#!/usr/bin/env python
"""Quick qualitative check: segment what a prompt names and write an overlay PNG.

    python demo.py --image dog.jpg --prompt "the dog" [--model weights/LENS] [--out overlay.png] [--cot]
    python demo.py --gradio [--model weights/LENS] [--host 127.0.0.1] [--port 7860]   # web UI (pip install '.[demo]')

The web UI listens on 127.0.0.1 (this machine only) unless --host says otherwise, e.g. --host 0.0.0.0 to serve
the local network. A user error (missing image, unreadable file, unknown model) ends with one `error:` line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from PIL import Image

from lens.data.transforms import load_rgb
from lens.visualize import overlay

DTYPES = ("auto", "float32", "bfloat16", "float16")
PROG = "demo.py"


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, without a traceback."""


def resolve_device_dtype(device: str, dtype: str):
    """`auto`: CUDA and bfloat16 where a GPU is visible, else CPU and float32 (as eval.sh)."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_segmenter(model: str | None, device: str = "auto", dtype: str = "auto"):
    from lens import Segmenter
    from lens.modeling.presets import PRESETS

    device, torch_dtype = resolve_device_dtype(device, dtype)
    if model is None:
        print("[demo] no --model given: using the randomly initialised `tiny` preset, so its masks are untrained.")
        return Segmenter.from_pretrained("tiny", device=device, dtype=torch_dtype, max_new_tokens=32)
    path = Path(model)
    hub_id = model.count("/") == 1 and not model.startswith((".", "/")) and not path.exists()
    if model not in PRESETS and not hub_id:
        if not path.exists():
            raise UserError(f"--model {model}: no such folder, and not a preset ({', '.join(PRESETS)})")
        if not path.is_dir():
            raise UserError(f"--model {model}: not a folder (a checkpoint is a folder with config.json)")
        if not (path / "config.json").is_file():
            raise UserError(f"--model {model}: no config.json in this folder, so it is not a LENS checkpoint")
    try:
        return Segmenter.from_pretrained(model, device=device, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as exc:  # FileNotFoundError is an OSError; a corrupt or foreign folder
        raise UserError(f"--model {model}: cannot load it: {first_line(exc)}") from exc


# ---------------------------------------------------------------------- web UI
def build_app(segmenter):
    """The gradio app: image + instruction (+ chain of thought) -> overlay + answer text.

    Bad input (no image, a file that is not an image, an empty instruction) is shown in the page as an error
    message and logged as one line; the server keeps running and prints no traceback.
    """
    import gradio as gr
    from PIL import UnidentifiedImageError

    image_in = gr.Image(type="pil", label="Image", elem_id="lens-image")
    stock_preprocess = image_in.preprocess

    def preprocess(payload):
        """gr.Image's own decoding; an unreadable upload becomes an error message in the page, not a traceback.

        (Set on the instance: a subclass of a gradio component would make gradio write a demo.pyi stub.)"""
        try:
            return stock_preprocess(payload)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            name = getattr(payload, "orig_name", None) or "the uploaded file"
            print(f"[demo] rejected upload {name}: not a readable image", flush=True)
            raise gr.Error(f"{name} is not an image that can be read (PNG, JPEG, WebP, ...)",
                           title="Not an image", print_exception=False) from exc

    image_in.preprocess = preprocess

    def predict(image: Image.Image | None, prompt: str, cot: bool):
        if image is None:
            raise gr.Error("Upload an image first.", title="No image", print_exception=False)
        if not (prompt or "").strip():
            raise gr.Error("Type what to segment, e.g. 'the dog on the left'.", title="No instruction",
                           print_exception=False)
        image = image.convert("RGB")
        pred = segmenter(image, prompt, cot=cot)
        return overlay(image, pred.mask, pred.box, pred.text), pred.text.strip() or "(empty answer)"

    return gr.Interface(
        predict,
        [
            image_in,
            gr.Textbox(label="Instruction", placeholder="the dog on the left", elem_id="lens-prompt"),
            gr.Checkbox(label="Chain of thought", elem_id="lens-cot"),
        ],
        [gr.Image(type="pil", format="png", label="Overlay", elem_id="lens-overlay"),  # lossless: crisp masks
         gr.Textbox(label="Answer", elem_id="lens-answer")],
        title="LENS: text-prompted segmentation",
        flagging_mode="never",
    )


def run_gradio(segmenter, host: str = "127.0.0.1", port: int = 7860) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise UserError("--gradio needs gradio: pip install '.[demo]' (or pip install gradio)") from exc
    print(f"[demo] serving on http://{host}:{port} (Ctrl+C stops it)", flush=True)
    build_app(segmenter).launch(server_name=host, server_port=port, share=False, ssr_mode=False)


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, help="input image file")
    ap.add_argument("--prompt", help="what to segment, e.g. 'the dog on the left'")
    ap.add_argument("--model", help="checkpoint folder (ours or a released LENS one), hub id or preset name")
    ap.add_argument("--out", type=Path, default=Path("demo_overlay.png"), help="overlay PNG to write")
    ap.add_argument("--cot", action="store_true", help="ask for <think> reasoning before the answer")
    ap.add_argument("--gradio", action="store_true", help="start a web UI instead")
    ap.add_argument("--host", default="127.0.0.1",
                    help="web UI address (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=7860, help="web UI port (default 7860)")
    ap.add_argument("--dtype", choices=DTYPES, default="auto", help="model dtype (auto: bfloat16 on CUDA, else float32)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    return ap


def run(args: argparse.Namespace) -> int:
    if args.gradio:
        run_gradio(load_segmenter(args.model, args.device, args.dtype), args.host, args.port)
        return 0
    try:
        image = load_rgb(args.image)  # before the model loads: fail fast on a bad image path
    except (OSError, ValueError) as exc:
        raise UserError(f"--image: {first_line(exc)}") from exc
    segmenter = load_segmenter(args.model, args.device, args.dtype)
    pred = segmenter(image, args.prompt, cot=args.cot)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        overlay(image, pred.mask, pred.box, pred.text).save(args.out)
    except (OSError, ValueError) as exc:  # unwritable folder, unknown extension
        raise UserError(f"--out {args.out}: cannot write the overlay: {first_line(exc)}") from exc
    box = "none parsed" if pred.box is None else "[" + ", ".join(f"{v:.1f}" for v in pred.box) + "]"
    print(f"answer: {pred.text.strip()!r}\nbox (original pixels): {box}\nmask pixels: {int(pred.mask.sum())}"
          f"  score: {pred.score:.3f}\noverlay: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.gradio and (args.image is None or not args.prompt):
        ap.error("--image and --prompt are required (or use --gradio)")
    if not 0 < args.port < 65536:
        ap.error(f"--port {args.port}: expected 1..65535")
    try:
        return run(args)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
