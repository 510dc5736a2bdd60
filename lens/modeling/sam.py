"""SAM2 / SAM2.1 from the `sam2` package: building it without memory modules, loading Meta's checkpoint files,
shared image features and batched mask decoding driven by one external sparse prompt token per row.

What SAM2.1 changes for LENS's image-only path: nothing but the weights. The packaged `sam2.1_hiera_*` configs
differ from `sam2_hiera_*` only in video-memory settings: `no_obj_embed_spatial` (a (1, 64) parameter added to
the memory of frames without an object, read by `_encode_new_memory`), `obj_ptr_tpos_proj` (Linear(256, 64) over
the temporal encoding of object pointers, read by `_prepare_memory_conditioned_features`; an Identity in SAM2.0)
and the flags `add_tpos_enc_to_obj_ptrs` / `proj_tpos_enc_in_obj_ptrs` / `use_signed_tpos_enc_to_obj_ptrs` of
that same memory path. Image encoder, prompt encoder and mask decoder have the same configuration, so the kept
modules (and their parameter counts) are those of the SAM2.0 model of the same size. LENS deletes the two
SAM2.1 memory-only parts with the memory modules: no trainable parameter is left that no loss reaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Names accepted for `LensConfig.sam_variant` -> packaged Hydra config of the `sam2` package.
SAM2_CONFIGS: dict[str, str] = {
    "sam2_hiera_t": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_s": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_b+": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_l": "configs/sam2/sam2_hiera_l.yaml",
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
# Meta's released checkpoint file for each variant (hub id facebook/<name with - for _>).
SAM2_CHECKPOINT_FILES: dict[str, str] = {
    "sam2_hiera_t": "sam2_hiera_tiny.pt",
    "sam2_hiera_s": "sam2_hiera_small.pt",
    "sam2_hiera_b+": "sam2_hiera_base_plus.pt",
    "sam2_hiera_l": "sam2_hiera_large.pt",
    "sam2.1_hiera_t": "sam2.1_hiera_tiny.pt",
    "sam2.1_hiera_s": "sam2.1_hiera_small.pt",
    "sam2.1_hiera_b+": "sam2.1_hiera_base_plus.pt",
    "sam2.1_hiera_l": "sam2.1_hiera_large.pt",
}
# Video-only modules that LENS deletes (upstream keeps the image path only) ...
MEMORY_MODULES = ("memory_attention", "memory_encoder", "maskmem_tpos_enc")
# ... and SAM2.1's additions to that video-memory path (see the module docstring); SAM2.0 has them as
# None / Identity. A Meta SAM2.1 file holds their weights, a SAM2.0 file does not: that tells the two apart.
SAM21_MEMORY_ONLY = ("no_obj_embed_spatial", "obj_ptr_tpos_proj")
DELETED = MEMORY_MODULES + SAM21_MEMORY_ONLY
# As upstream's build_sam2 post-processing: fall back to the best multimask output when token 0 is unstable.
DYNAMIC_MULTIMASK = [
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
]
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def build_sam(
    variant: str = "sam2_hiera_l",
    image_size: int = 1024,
    overrides: list[str] | None = None,
    dynamic_multimask: bool = True,
    image_only: bool = True,
) -> nn.Module:
    """Instantiate SAM2Base (random weights) from the `sam2` package and drop its video-memory parts (`DELETED`).

    `image_only=False` keeps the whole video model, as Meta's checkpoint files hold it (e.g. to write one)."""
    if variant not in SAM2_CONFIGS:
        raise ValueError(f"sam_variant={variant!r} is not known; expected one of {sorted(SAM2_CONFIGS)}")
    import sam2  # noqa: F401  (registers the packaged Hydra configs)
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose(
        config_name=SAM2_CONFIGS[variant],
        overrides=[f"++model.image_size={image_size}", *(DYNAMIC_MULTIMASK if dynamic_multimask else []), *(overrides or [])],
    )
    OmegaConf.resolve(cfg)
    sam = instantiate(cfg.model, _recursive_=True)
    if image_only:
        for name in DELETED:
            delattr(sam, name)  # SAM2.0's no_obj_embed_spatial (None) and obj_ptr_tpos_proj (Identity) too
    # what `load_sam_checkpoint` needs to tell which variant a mismatching file is (plain attributes, not weights)
    sam.lens_build = (image_size, tuple(overrides or ()))
    return sam


def is_sam21(variant: str) -> bool:
    return variant.startswith("sam2.1_")


def hub_location(variant: str) -> str:
    """'sam2.1_hiera_large.pt from the hub repository facebook/sam2.1-hiera-large' (Meta's release of a variant)."""
    file = SAM2_CHECKPOINT_FILES[variant]
    return f"{file} from the hub repository facebook/{file.removesuffix('.pt').replace('_', '-')}"


def _deleted(key: str) -> bool:
    return key.split(".", 1)[0] in DELETED


def file_family(state: dict[str, torch.Tensor]) -> str | None:
    """'SAM2.1' / 'SAM2.0' for a file with the video-memory weights (as Meta ships them), None without them."""
    if any(k.split(".", 1)[0] in SAM21_MEMORY_ONLY for k in state):
        return "SAM2.1"
    return "SAM2.0" if any(k.startswith("memory_attention.") for k in state) else None


@cache
def _kept_shapes(variant: str, image_size: int, overrides: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    from transformers.initialization import meta_device_safe_creation_ops

    with torch.device("meta"), meta_device_safe_creation_ops():  # shapes only: no memory, a fraction of a second
        sam = build_sam(variant, image_size, list(overrides), dynamic_multimask=False)
    return {k: tuple(v.shape) for k, v in sam.state_dict().items()}


def matching_variants(state: dict[str, torch.Tensor], image_size: int = 1024, overrides: tuple[str, ...] = ()) -> list[str]:
    """The variants (built with `image_size` / `overrides`) whose kept weights have exactly the names and shapes of
    `state`'s, restricted to the file's family when the file says it (`file_family`). Several can match under
    overrides that shrink every variant to one size."""
    family = file_family(state)
    shapes = {k: tuple(v.shape) for k, v in state.items() if not _deleted(k)}
    return [v for v in SAM2_CONFIGS if (family is None or is_sam21(v) == (family == "SAM2.1"))
            and _kept_shapes(v, image_size, tuple(overrides)) == shapes]


def load_sam_checkpoint(sam: nn.Module, path: str | Path, variant: str) -> None:
    """Load Meta's SAM2 / SAM2.1 checkpoint file (`{'model': state_dict}` with every video-memory weight) into a
    SAM built by `build_sam(variant, ...)`; a file of another variant (or family: SAM2.0 for sam2.1_*, or the
    reverse, even at the same size) raises, saying which variant the file looks like."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM2 checkpoint {path} not found. Download {hub_location(variant)} and pass its path.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"SAM2 checkpoint {path}: expected {{'model': state_dict}} (Meta's format), got {type(state)}")
    family, want = file_family(state), "SAM2.1" if is_sam21(variant) else "SAM2.0"
    kept = {k: v for k, v in state.items() if not _deleted(k)}
    own = sam.state_dict()
    missing, unexpected = sorted(own.keys() - kept.keys()), sorted(kept.keys() - own.keys())
    reshaped = sorted(k for k in own.keys() & kept.keys() if own[k].shape != kept[k].shape)
    if family not in (None, want) or missing or unexpected or reshaped:
        image_size, overrides = getattr(sam, "lens_build", (sam.image_size, ()))
        looks = matching_variants(state, image_size, overrides)
        looks_text = (" or ".join(looks) + (" (the same shapes under this model's sam_overrides)" if len(looks) > 1 else "")
                      if looks else f"none of the known variants ({family or 'family unknown'})")
        raise ValueError(
            f"SAM2 checkpoint {path} does not match sam_variant={variant!r} ({want}): the file looks like {looks_text}. "
            + (f"It is a {family} file (it {'has' if family == 'SAM2.1' else 'lacks'} SAM2.1's {SAM21_MEMORY_ONLY} "
               "weights). " if family not in (None, want) else "")
            + (f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
               f"{len(reshaped)} of another shape (e.g. {reshaped[:3]}). " if missing or unexpected or reshaped else "")
            + f"Set sam_variant (model.sam_variant in a recipe) to the file's variant, or pass {hub_location(variant)}."
        )
    sam.load_state_dict(kept)


@dataclass
class SamFeatures:
    """SAM2 image features of N distinct images, taken before the decoder's trainable `conv_s0`/`conv_s1`
    so that they can be cached while those convolutions train."""

    image_embed: torch.Tensor  # (N, C, h, w), `no_mem_embed` already added
    fpn_s0: torch.Tensor  # (N, C, 4h, 4w) raw FPN level 0
    fpn_s1: torch.Tensor  # (N, C, 2h, 2w) raw FPN level 1

    def __len__(self) -> int:
        return self.image_embed.shape[0]

    def to(self, *args, **kwargs) -> SamFeatures:
        return SamFeatures(*(x.to(*args, **kwargs) for x in (self.image_embed, self.fpn_s0, self.fpn_s1)))

    def index(self, idx: torch.Tensor | list[int]) -> SamFeatures:
        """Features of a subset (or reordering) of the N images."""
        return SamFeatures(self.image_embed[idx], self.fpn_s0[idx], self.fpn_s1[idx])

    @staticmethod
    def cat(parts: list[SamFeatures]) -> SamFeatures:
        return SamFeatures(*(torch.cat(xs) for xs in zip(*((p.image_embed, p.fpn_s0, p.fpn_s1) for p in parts))))


def normalize_sam_images(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, 3, S, S) RGB in 0..255 (uint8 or float) -> SAM2 input normalised with SAM's pixel statistics."""
    mean = torch.tensor(SAM_PIXEL_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, device=images.device).view(1, 3, 1, 1)
    return ((images.float() - mean) / std).to(dtype)


def encode_images(sam: nn.Module, images: torch.Tensor) -> SamFeatures:
    """Run the SAM2 image encoder (Hiera + FPN) once on (N, 3, S, S) images in 0..255."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (sam.image_size, sam.image_size):
        raise ValueError(f"sam_images must be (N, 3, {sam.image_size}, {sam.image_size}); got {tuple(images.shape)}")
    dtype = sam.no_mem_embed.dtype
    fpn = sam.image_encoder(normalize_sam_images(images, dtype))["backbone_fpn"]  # 3 levels, fine to coarse
    embed = fpn[-1] + sam.no_mem_embed.view(1, -1, 1, 1)  # directly_add_no_mem_embed, as for a single image
    # sam2's FPN adds its top-down path in float32: hand the decoder features in the model's dtype, all three
    # channels-last (the neck gives levels 1-2 so; level 0 comes out NCHW, and the trainable 1x1 `conv_s0` on it ran
    # 2.2x slower forward + backward on CPU: 9.4 against 4.2 ms for 16 tiny-preset images, docs/lab-notebook.md)
    return SamFeatures(*(x.to(dtype).contiguous(memory_format=torch.channels_last) for x in (embed, fpn[0], fpn[1])))


def decode_masks(
    sam: nn.Module, features: SamFeatures, prompt: torch.Tensor, index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched mask decoding: row b uses image `index[b]` of `features` and sparse prompt `prompt[b]` (B, T, C).

    `conv_s0`/`conv_s1` run once per distinct image, then features are gathered per row, and the decoder
    runs once on the whole batch. Returns low-resolution mask logits (B, 1, 4h, 4w) and predicted IoU
    (B, 1). In eval mode the decoder falls back to the best multimask output when token 0 is unstable
    (upstream behaviour); in train mode token 0 is always used.
    """
    decoder, pe = sam.sam_mask_decoder, sam.sam_prompt_encoder
    high_res = [decoder.conv_s0(features.fpn_s0), decoder.conv_s1(features.fpn_s1)]
    embed = features.image_embed
    if index is not None:
        embed, high_res = embed[index], [x[index] for x in high_res]
    elif embed.shape[0] != prompt.shape[0]:
        raise ValueError(f"{embed.shape[0]} SAM images for {prompt.shape[0]} rows: pass sam_image_index (B,)")
    b = prompt.shape[0]
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, *embed.shape[-2:])
    masks, iou, _, _ = decoder(
        image_embeddings=embed,
        image_pe=dense_positional_encoding(pe).to(embed.dtype),
        sparse_prompt_embeddings=prompt.to(embed.dtype),
        dense_prompt_embeddings=dense.to(embed.dtype),
        multimask_output=False,
        repeat_image=False,
        high_res_features=high_res,
    )
    return masks, iou


def dense_positional_encoding(prompt_encoder: nn.Module) -> torch.Tensor:
    """(1, C, h, w) positional encoding of the image-embedding grid, as `PromptEncoder.get_dense_pe`, computed in
    float32 whatever the model's dtype (sam2's own builds a float32 grid and fails on a bf16/fp16 model)."""
    gaussian = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.float()  # (2, C/2), a buffer
    h, w = prompt_encoder.image_embedding_size
    ys = (torch.arange(h, device=gaussian.device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=gaussian.device, dtype=torch.float32) + 0.5) / w
    coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y) in (0, 1)
    proj = 2 * math.pi * ((2 * coords - 1) @ gaussian)  # (h, w, C/2)
    return torch.cat([proj.sin(), proj.cos()], dim=-1).permute(2, 0, 1).unsqueeze(0)


def decode_masks_per_sample(
    sam: nn.Module, features: SamFeatures, prompt: torch.Tensor, index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original flow: one decoder call per row (a Python loop). Same numbers as `decode_masks`; kept
    as the reference that benchmarks and tests compare the batched path against."""
    rows = range(prompt.shape[0])
    outs = [decode_masks(sam, features.index([int(index[b]) if index is not None else b]), prompt[b : b + 1]) for b in rows]
    return torch.cat([m for m, _ in outs]), torch.cat([i for _, i in outs])


def upsample_masks(low_res: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) logits -> (B, H, W) logits at `size` (bilinear, align_corners=False, as upstream)."""
    return F.interpolate(low_res.float(), size=size, mode="bilinear", align_corners=False)[:, 0]
