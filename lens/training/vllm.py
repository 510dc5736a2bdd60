"""vLLM generation for the LENS policy: a stock Qwen2.5-VL view of it, and a weight sync filtered to that view.

vLLM knows Qwen2.5-VL but not `model_type: lens`, and its Qwen2.5-VL has no module for the LENS-only parameters
(`learnable_query`, `connector.*`, `conv_1d.*`, `proj_to_sam.*`, `sam.*`): its weight loader rejects those names.
Generation only needs the language model and the vision tower, which LENS keeps under the stock names
(`model.language_model.*`, `model.visual.*`, `lm_head.*`, as transformers 5 names a stock Qwen2.5-VL). So:

- `write_stock_view` writes a folder that vLLM (or `Qwen2_5_VLForConditionalGeneration.from_pretrained`) loads as
  a stock Qwen2.5-VL: config.json (`model_type: qwen2_5_vl`), generation_config.json, the processor and tokenizer
  files, and safetensors shards holding the language + vision weights only, under their stock names. TRL builds
  colocated vLLM with `LLM(model=model.name_or_path, ...)` and no `load_format`, so the folder needs real weights;
  they are also what TRL's first `sync_weights` (before the first generation) sends again.
- `LensVLLMGeneration` is TRL's `VLLMGeneration` with two overrides: colocate mode builds `LLM` from the view, and
  `_iter_named_params` (what `sync_weights` sends, in colocate and server mode) yields the stock names only. TRL's
  own handling of DeepSpeed ZeRO-3 gathering, FSDP and PEFT (adapter merged, `base_model.model.` / `.base_layer` /
  `modules_to_save.default.` stripped) stays as it is; LENS-only names are dropped after it. The sampling kwargs
  also get a `logit_bias` that keeps vLLM from sampling `<|image_pad|>` (TRL's transformers path suppresses it).
- `VLLMViewMixin` (first among the trainer's bases) makes `GRPOTrainer.__init__` construct `LensVLLMGeneration`
  instead of `VLLMGeneration`, and checks the positions question below. With `use_vllm: false` it does nothing.

Positions: vLLM samples with Qwen2.5-VL's M-RoPE grid positions. With `query_position_mode: upstream` the trainer's
log-probs come from 1-D positions (docs/design.md, "vLLM generation"), so TRL's importance-sampling correction would
weight by the ratio of two different position schemes; `check_vllm_positions` requires it off in that mode.

Server mode: write the view once (`python -m lens.training.vllm CHECKPOINT OUT`) and start `trl vllm-serve --model OUT`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from trl import GRPOTrainer
from trl.generation import vllm_generation as trl_vllm
from trl.generation.vllm_generation import VLLMGeneration

from lens.modeling.families import family_of

STOCK_PREFIXES = ("model.language_model.", "model.visual.", "lm_head.")
VIEW_DIR = "vllm_view"  # under train.output_dir
SHARD_BYTES = 2 * 1024**3
STOCK_ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"  # of a Qwen2.5-VL policy; others: their family's class


# ---------------------------------------------------------------------- names, config
def stock_name(name: str) -> str | None:
    """The name vLLM's Qwen2.5-VL loads for a policy parameter (TRL's name after its PEFT/FSDP clean-up),
    or None for a LENS-only parameter. LENS keeps the transformers-5 names of a stock Qwen2.5-VL, which TRL
    sends unchanged for a stock model and vLLM maps itself (`hf_to_vllm_mapper`)."""
    return name if name.startswith(STOCK_PREFIXES) else None


def stock_config(config, dtype: torch.dtype | None = None):
    """The stock configuration of the policy's family (Qwen2.5-VL, Qwen2-VL, Qwen3-VL) from a LENS config (the
    LENS-only fields dropped)."""
    family = family_of(config)
    lens_only = set(type(config)().to_dict()) - set(family.stock_config().to_dict())
    fields = {k: v for k, v in config.to_dict().items() if k not in lens_only | {"model_type", "architectures"}}
    out = family.stock_config.from_dict(fields)
    out.architectures = [family.stock_architecture]
    if dtype is not None:
        out.dtype = dtype
    return out


def stock_named_parameters(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(stock name, tensor) of a plain (not PEFT-wrapped, not sharded) policy's language and vision weights.
    Tied weights come once, as from `named_parameters` (and as TRL syncs them)."""
    for name, param in model.named_parameters():
        stock = stock_name(name)
        if stock is not None:
            yield stock, param.detach()


# ---------------------------------------------------------------------- the view
def write_stock_view(
    path: str | Path,
    config,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    processor=None,
    generation_config=None,
    write: bool = True,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write a stock Qwen2.5-VL folder: config, generation config, processor files and the given weights.

    `named_tensors` yields (stock name, tensor); it is consumed even when `write` is False, because under ZeRO-3
    every rank must take part in gathering each parameter (only the writing rank keeps a CPU copy). Weights go
    to `model.safetensors`, or to shards of about `shard_bytes` with `model.safetensors.index.json`.
    """
    path = Path(path)
    if not write:
        for _ in named_tensors:
            pass
        return path
    path.mkdir(parents=True, exist_ok=True)
    for old in [*path.glob("model*.safetensors"), path / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # a previous view may have been sharded differently

    shards: list[dict[str, torch.Tensor]] = [{}]
    size, total, dtype = 0, 0, None
    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu", copy=True).contiguous()
        dtype = tensor.dtype if dtype is None else dtype
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            _save_shard(path, len(shards), shards[-1])
            shards[-1] = {k: None for k in shards[-1]}  # keep the names for the index, free the tensors
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
        total += nbytes
    if len(shards) == 1 and not shards[0]:
        raise ValueError("no language or vision weights to write: is this a LENS / Qwen2.5-VL policy?")
    _save_shard(path, len(shards), shards[-1])

    if len(shards) == 1:
        (path / "tmp-00001.safetensors").rename(path / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            (path / f"tmp-{i:05d}.safetensors").rename(path / final)
            weight_map.update(dict.fromkeys(shard, final))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    stock_config(config, dtype).save_pretrained(path)
    if generation_config is not None:
        generation_config.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    return path


def _save_shard(path: Path, index: int, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path / f"tmp-{index:05d}.safetensors"), metadata={"format": "pt"})


def save_stock_view(model, processor, path: str | Path, shard_bytes: int = SHARD_BYTES) -> Path:
    """The stock view of an in-memory, unsharded LENS policy (tests, `trl vllm-serve` for server mode)."""
    return write_stock_view(
        path, model.config, stock_named_parameters(model), processor=processor,
        generation_config=getattr(model, "generation_config", None), shard_bytes=shard_bytes,
    )


# ---------------------------------------------------------------------- positions
def check_vllm_positions(args, config) -> None:
    """Refuse TRL's vLLM importance-sampling correction when it would compare two position schemes.

    vLLM samples with M-RoPE grid positions (a stock Qwen2.5-VL); the trainer's log-probs come from the query
    forward, whose positions are 1-D in `query_position_mode: upstream`. The correction's ratio would then be
    the gap between two position schemes, not the sampler/trainer numerics it is meant to absorb, and with TRL's
    default `sequence_mask` it drops whole rollouts. Upstream (and our HF-generation path) ignores that gap.
    """
    if not getattr(args, "use_vllm", False):
        return
    mode = getattr(config, "query_position_mode", None)
    if mode == "upstream" and args.vllm_importance_sampling_correction:
        raise ValueError(
            "use_vllm with query_position_mode 'upstream': vLLM samples with M-RoPE positions but the policy "
            "log-probs use 1-D positions, so TRL's importance-sampling ratio would measure the position scheme, not "
            "the sampler. Set grpo.vllm_importance_sampling_correction=false (as upstream, and as HF generation "
            "here), or model.query_position_mode=mrope (then the correction is meaningful). See docs/design.md."
        )


# ---------------------------------------------------------------------- TRL
IMAGE_TOKEN_BIAS = -100.0  # exp(-100): never sampled


def suppress_image_token(generation_kwargs: dict | None, image_token_id: int) -> dict:
    """vLLM sampling kwargs that never sample `<|image_pad|>` (a copy; the caller's dict is left alone).

    TRL's transformers path suppresses it (`suppress_tokens`), its vLLM path does not: one sampled image-pad
    token and the trainer's forwards find more image tokens than image features and fail. A `logit_bias` the
    user gave is kept; the processed log-probs then exclude the image token (a relative error of its probability).
    """
    out = dict(generation_kwargs or {})
    out["logit_bias"] = {**(out.get("logit_bias") or {}), int(image_token_id): IMAGE_TOKEN_BIAS}
    return out


@contextlib.contextmanager
def _name_or_path(model, path: str | Path):
    """Temporarily point `model.name_or_path` (what TRL hands to `LLM(model=...)`) at `path`."""
    own = vars(model)
    had, old = "name_or_path" in own, own.get("name_or_path")
    model.name_or_path = str(path)
    try:
        yield
    finally:
        if had:
            model.name_or_path = old
        else:  # a PEFT wrapper forwards the attribute to the wrapped model
            del model.name_or_path


class LensVLLMGeneration(VLLMGeneration):
    """TRL's vLLM backend for the LENS policy: colocated vLLM loads the stock view; syncs send stock names only.

    view_dir: where the view is written (the trainer's `output_dir/vllm_view`). on_each_node: the local main
    process of every node writes it (node-local output folders, `save_on_each_node`), else the global main only.
    """

    def __init__(self, *args, view_dir: str | Path, on_each_node: bool = False, **kwargs) -> None:
        self.view_dir = Path(view_dir)
        self.on_each_node = on_each_node
        super().__init__(*args, **kwargs)
        self.generation_kwargs = suppress_image_token(self.generation_kwargs, self.model.config.image_token_id)

    def _init_vllm(self):
        if self.mode != "colocate" or not trl_vllm.is_vllm_available():
            return super()._init_vllm()  # server mode: the server was started from a view; or TRL's ImportError
        self.write_view()
        with _name_or_path(self.model, self.view_dir):
            return super()._init_vllm()

    def write_view(self) -> Path:
        """The stock view of the current weights (a collective under ZeRO-3: every rank must call it)."""
        acc = self.accelerator
        writer = acc.is_local_main_process if self.on_each_node else acc.is_main_process
        model = self.model
        write_stock_view(
            self.view_dir, model.config, self._iter_named_params(), processor=self.processing_class,
            generation_config=getattr(model, "generation_config", None), write=writer,
        )
        acc.wait_for_everyone()
        return self.view_dir

    def _iter_named_params(self):
        """TRL's parameter stream with the LENS-only names left out.

        Plain (non-PEFT, non-FSDP) models skip the LENS-only parameters before gathering them (under ZeRO-3 each
        gather is a collective, and every rank skips the same names); PEFT (merged over one full gather) and FSDP
        go through TRL's own iteration and are filtered after it.
        """
        model = self.model
        if trl_vllm.is_peft_model(model) or self._dist.is_fsdp:
            for name, tensor in super()._iter_named_params():
                stock = stock_name(name)
                if stock is not None:
                    yield stock, tensor
            return
        for name, param in model.named_parameters():
            stock = stock_name(self._fix_param_name_to_vllm(name))
            if stock is None:
                continue
            with self._dist.gather_params([param]):
                yield stock, param.data


@contextlib.contextmanager
def _generation_backend(factory):
    """Make `GRPOTrainer.__init__` build its vLLM backend with `factory` (TRL names the class at module level)."""
    module = sys.modules[GRPOTrainer.__module__]
    if not hasattr(module, "VLLMGeneration"):
        raise RuntimeError(f"{module.__name__} no longer builds VLLMGeneration: update lens/training/vllm.py for this TRL")
    original = module.VLLMGeneration
    module.VLLMGeneration = factory
    try:
        yield
    finally:
        module.VLLMGeneration = original


class VLLMViewMixin:
    """First base of the LENS GRPO trainer: with `use_vllm`, TRL's vLLM backend is `LensVLLMGeneration`.

    `GRPOTrainer.__init__` runs unchanged; only the class it instantiates for `self.vllm_generation` differs (same
    arguments, plus the view folder). Without `use_vllm` nothing changes.
    """

    def __init__(self, *args, **kwargs) -> None:
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is None or not getattr(config, "use_vllm", False):
            super().__init__(*args, **kwargs)
            return
        model = kwargs.get("model", args[0] if args else None)
        check_vllm_positions(config, getattr(model, "config", None))
        factory = functools.partial(
            LensVLLMGeneration, view_dir=Path(config.output_dir) / VIEW_DIR, on_each_node=config.save_on_each_node
        )
        with _generation_backend(factory):
            super().__init__(*args, **kwargs)


# ---------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """python -m lens.training.vllm CHECKPOINT OUT: write the stock view of a LENS checkpoint (server mode)."""
    import argparse

    from transformers import AutoProcessor

    from lens.modeling import LensForConditionalGeneration

    ap = argparse.ArgumentParser(prog="python -m lens.training.vllm", description=main.__doc__)
    ap.add_argument("checkpoint", help="a LENS checkpoint folder (ours or released)")
    ap.add_argument("out", help="folder for the stock Qwen2.5-VL view (then: trl vllm-serve --model OUT)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a = ap.parse_args(argv)
    model = LensForConditionalGeneration.from_pretrained(a.checkpoint, dtype=getattr(torch, a.dtype))
    save_stock_view(model, AutoProcessor.from_pretrained(a.checkpoint), a.out)
    print(f"stock Qwen2.5-VL view: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
