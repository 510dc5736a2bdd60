"""LENS: a Qwen-VL policy with appended context queries driving a SAM2 mask decoder.

`LensMixin` holds every LENS computation; a family class puts it over one transformers Qwen-VL class:
`LensForConditionalGeneration` (Qwen2.5-VL, here), `LensQwen2VLForConditionalGeneration` and
`LensQwen3VLForConditionalGeneration` (lens/modeling/backbones.py). `from_pretrained` on any of them returns the
class of the checkpoint's family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers import initialization as init
from transformers.utils import ModelOutput

from .config import LensConfig
from .context import QueryConnector, build_proj_to_sam
from .families import get_family
from .heads import token_log_probs
from .image_rows import distinct_images, rows_of
from .sam import SamFeatures, build_sam, decode_masks, decode_masks_per_sample, encode_images
from .zero3 import gathered


@dataclass
class LensOutput(ModelOutput):
    """Output of the query forward.

    loss: mean next-token NLL over the labelled positions (when `labels` were given).
    logits: (B, L_keep, V) token logits of the original (prompt + completion) positions only.
    log_probs, entropy: (B, L - 1) float32 next-token log-probs / entropies (with `labels`; 0 where unscored).
    mask_logits: (B, 1, h, w) low-resolution SAM2 mask logits (h = w = sam_image_size / 4).
    iou_scores: (B, 1) SAM2's predicted IoU of the returned mask.
    sam_prompt: (B, 1, C) the sparse prompt token fed to the mask decoder.
    query_states: (B, Q, H) final-layer (post-norm) hidden states of the context queries.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mask_logits: torch.Tensor | None = None
    iou_scores: torch.Tensor | None = None
    sam_prompt: torch.Tensor | None = None
    query_states: torch.Tensor | None = None


class LensMixin:
    """Policy + context module (`learnable_query`, `connector`, `conv_1d`, `proj_to_sam`) + `sam`, over the
    family's stock `...ForConditionalGeneration` (the next class in the MRO).

    `forward` without SAM inputs is the stock forward (generation, reference model).
    With `sam_images` or `sam_features` it is the query forward: the queries are appended after the
    given tokens, one language-model pass yields token logits and query states, and the mask decoder
    runs once on the whole batch.
    """

    def __init__(self, config) -> None:
        # Same body as the stock __init__, with our modules added before the single post_init().
        family = get_family(config.lens_family)
        family.pretrained_model.__init__(self, config)
        self.model = family.inner_model(config)
        hidden = config.text_config.hidden_size
        self.lm_head = nn.Linear(hidden, config.text_config.vocab_size, bias=False)

        q = config.num_of_query
        self.learnable_query = nn.Parameter(torch.zeros(1, q, hidden))
        self.connector = (
            QueryConnector(hidden, q, config.connector_depth, config.connector_heads, config.connector_mlp_ratio)
            if config.if_use_qwen_connector
            else None
        )
        self.conv_1d = nn.Conv1d(hidden, hidden, kernel_size=q)  # (B, H, Q) -> (B, H, 1)
        self.sam = build_sam(config.sam_variant, config.sam_image_size, config.sam_overrides, config.sam_dynamic_multimask)
        for module in self.sam.modules():
            module._lens_sam = True  # SAM2 keeps the sam2 package's own initialisation
        self.proj_to_sam = build_proj_to_sam(hidden, self.sam.hidden_dim)
        for name in ("connector", "conv_1d", "proj_to_sam"):
            for module in getattr(self, name).modules() if getattr(self, name) is not None else ():
                module._lens_context = True
        self.post_init()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, sam_checkpoint=None, **kwargs):
        """Load our checkpoints, the released LENS checkpoints as they are, or a base Qwen-VL folder (Qwen2-VL,
        Qwen2.5-VL or Qwen3-VL, told by its config.json); returns the LENS class of the checkpoint's family.

        sam_checkpoint: Meta's SAM2 `.pt` file to load into `sam` (required for a base Qwen folder; pass
        False there to keep a randomly initialised SAM2). LensConfig fields given as keyword arguments
        (e.g. `query_position_mode="mrope"`) override the stored configuration.
        """
        from pathlib import Path

        from .loading import finish_from_pretrained, prepare_from_pretrained

        path = Path(pretrained_model_name_or_path)
        kind, family, kwargs = prepare_from_pretrained(path, kwargs)
        target = lens_model_class(family)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super(LensMixin, target).from_pretrained(path, *args, output_loading_info=True, **kwargs)
        finish_from_pretrained(model, kind, set(info["missing_keys"]), sam_checkpoint)
        return (model, info) if want_info else model

    # ------------------------------------------------------------------ init
    def _init_weights(self, module: nn.Module) -> None:
        """Explicit init of the context module (upstream's was silently skipped; docs/design.md).

        Linear/Conv1d weights of the context module are N(0, std) with std = 0.02 * sqrt(2048 / H): exactly the
        intended 0.02 at Qwen2.5-VL-3B's width, and the same signal gain at other widths, so that the SAM
        prompt keeps a scale the mask decoder can use (at H=128 a fixed 0.02 shrinks it ~100x).
        """
        if getattr(module, "_lens_sam", False):
            return
        if module is self:
            init.normal_(self.learnable_query, mean=0.0, std=0.02)
        elif isinstance(module, QueryConnector):
            init.zeros_(module.pos_embed)
        elif getattr(module, "_lens_context", False) and isinstance(module, (nn.Linear, nn.Conv1d)):
            std = 0.02 * math.sqrt(2048 / self.config.text_config.hidden_size)
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.bias)
            return
        super()._init_weights(module)

    def reset_context_module(self) -> None:
        """Re-initialise learnable_query, connector, conv_1d and proj_to_sam (as a fresh stage 1 would)."""
        modules = [m for v in self.context_modules.values() if isinstance(v, nn.Module) for m in v.modules()]
        for module in [self, *modules]:
            module._is_hf_initialized = False
            for param in module.parameters(recurse=False):
                param._is_hf_initialized = False
        params = [self.learnable_query, *(p for m in modules for p in m.parameters(recurse=False))]
        with torch.no_grad(), gathered(params, modify=True):  # ZeRO-3: initialise the full tensors on rank 0
            for module in modules:
                self._init_weights(module)
            init.normal_(self.learnable_query, mean=0.0, std=0.02)

    @property
    def context_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        """The modules LENS adds to the policy, by checkpoint name."""
        mods = {"learnable_query": self.learnable_query, "conv_1d": self.conv_1d, "proj_to_sam": self.proj_to_sam}
        if self.connector is not None:
            mods["connector"] = self.connector
        return mods

    # ------------------------------------------------------------------ positions
    def query_position_ids(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        image_grid_thw: torch.LongTensor | None = None,
    ) -> torch.LongTensor:
        """(3, B, L + Q) position ids for tokens followed by Q always-attended queries.

        `upstream`: positions = cumsum(mask) - 1 (padding -> 1) on all three axes, so image tokens get
        plain 1-D positions (as the released weights were trained). `mrope`: the family's M-RoPE grid
        for the tokens (its `get_rope_index`); queries continue after each row's largest position.
        """
        b = input_ids.shape[0]
        q = self.config.num_of_query
        ones = attention_mask.new_ones(b, q)
        if self.config.query_position_mode == "upstream":
            mask = torch.cat([attention_mask, ones], dim=1).long()
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            return pos.unsqueeze(0).expand(3, -1, -1)
        mm_types = self.image_slots(input_ids, image_grid_thw).int()  # images only: a sampled video pad is text
        text_pos, _ = self.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_types, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
        start = text_pos.amax(dim=(0, 2)) + 1  # (B,)
        query_pos = start[:, None] + torch.arange(q, device=input_ids.device)  # (B, Q)
        return torch.cat([text_pos, query_pos.unsqueeze(0).expand(3, -1, -1)], dim=2)

    # ------------------------------------------------------------------ pieces
    def embed_multimodal(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.LongTensor | None,
        image_index: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Token embeddings (B, L, H) with vision features scattered into the image-pad slots, and the extra
        language-model inputs the family's vision features bring (Qwen3-VL's deepstack: `visual_pos_masks` (B, L),
        `deepstack_visual_embeds`; {} for Qwen2-VL and Qwen2.5-VL).

        Row b holds one image. With `image_index` (B,), rows that share an index share one image: the vision
        tower encodes each distinct image once (gradients add up as if each row had its own copy).
        """
        embeds = self.model.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds, {}
        if image_index is not None:
            pixel_values, image_grid_thw, image_index = distinct_images(pixel_values, image_grid_thw, image_index)
        vision = self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        feats = rows_of(vision.pooler_output, image_index).to(embeds.device, embeds.dtype)
        slots = self.image_slots(input_ids, image_grid_thw if image_index is None else image_grid_thw[image_index])
        if int(slots.sum()) != feats.shape[0]:
            raise ValueError(f"{int(slots.sum())} image-pad tokens but {feats.shape[0]} image features")
        return embeds.masked_scatter(slots.unsqueeze(-1), feats), self.vision_extras(vision, slots, image_index)

    def image_slots(self, input_ids: torch.LongTensor, image_grid_thw: torch.LongTensor | None) -> torch.Tensor:
        """(B, L) bool: the image-pad tokens that hold row b's image, i.e. its first grid_b.prod() / merge**2 of
        them (B, 3 `image_grid_thw`, one image per row). An image pad that a policy sampled into its completion is
        text, not a slot (it would otherwise shift the M-RoPE grid or break the feature count)."""
        pads = input_ids == self.config.image_token_id
        if image_grid_thw is None:
            return torch.zeros_like(pads)
        merge = self.config.vision_config.spatial_merge_size
        counts = image_grid_thw.to(input_ids.device).prod(-1) // merge**2  # (B,)
        return pads & (pads.cumsum(-1) <= counts[:, None])

    def vision_extras(self, vision, slots: torch.Tensor, image_index: torch.LongTensor | None) -> dict:
        """Extra language-model inputs from the vision output (none for this family; Qwen3-VL adds deepstack)."""
        return {}

    def encode_sam_images(self, sam_images: torch.Tensor) -> SamFeatures:
        """SAM2 image features of (N, 3, S, S) images in 0..255; compute once per distinct image. Without
        gradients while the image encoder is frozen. Training code calls it as `model(sam_images=...)`."""
        frozen = not any(p.requires_grad for p in self.sam.image_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return encode_images(self.sam, sam_images.to(self.sam.no_mem_embed.device))

    def sam_prompt_from_queries(self, query_states: torch.Tensor) -> torch.Tensor:
        """(B, Q, H) query states -> (B, 1, C) SAM sparse prompt: connector, conv_1d over Q, proj_to_sam."""
        query_states = query_states.to(self.conv_1d.weight.dtype)  # bf16 LM, fp32 master weights of the module
        x = self.connector(query_states) if self.connector is not None else query_states
        x = self.conv_1d(x.transpose(1, 2)).transpose(1, 2)  # (B, 1, H)
        return self.proj_to_sam(x)

    def masks_from_queries(
        self,
        query_states: torch.Tensor,
        sam_features: SamFeatures,
        sam_image_index: torch.Tensor | None = None,
        per_sample_decoding: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, Q, H) query states + features of N images (+ row -> image index (B,)) ->
        mask logits (B, 1, h, w), predicted IoU (B, 1), SAM prompt (B, 1, C).
        `per_sample_decoding` runs the original per-row decoder loop (same numbers; for benchmarks)."""
        if sam_image_index is not None:
            sam_image_index = sam_image_index.to(sam_features.image_embed.device)
        sam_prompt = self.sam_prompt_from_queries(query_states)
        decode = decode_masks_per_sample if per_sample_decoding else decode_masks
        mask_logits, iou = decode(self.sam, sam_features, sam_prompt, sam_image_index)
        return mask_logits, iou, sam_prompt

    def query_inputs(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_index: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.LongTensor, dict]:
        """Language-model inputs with the queries appended: embeds (B, L+Q, H), mask (B, L+Q), positions (3, B, L+Q),
        and the family's extra inputs (Qwen3-VL: `visual_pos_masks` (B, L+Q), False on the queries).
        `image_index` (B,): rows with equal entries show the same image (encoded once by the vision tower)."""
        b, q = input_ids.shape[0], self.config.num_of_query
        embeds, extras = self.embed_multimodal(input_ids, pixel_values, image_grid_thw, image_index)
        queries = self.learnable_query.to(embeds.dtype).expand(b, -1, -1)
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(b, q)], dim=1)
        positions = self.query_position_ids(input_ids, attention_mask, image_grid_thw)
        if "visual_pos_masks" in extras:  # the queries are no image tokens
            extras["visual_pos_masks"] = torch.cat([extras["visual_pos_masks"], full_mask.new_zeros(b, q, dtype=torch.bool)], 1)
        return torch.cat([embeds, queries], dim=1), full_mask, positions, extras

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        sam_images: torch.Tensor | None = None,
        sam_features: SamFeatures | None = None,
        sam_image_index: torch.LongTensor | None = None,
        return_logits: bool = True,
        temperature: float = 1.0,
        share_vision: bool = True,
        per_sample_decoding: bool = False,
        append_queries: bool = False,
        prefix_groups: torch.LongTensor | None = None,
        prefix_length: int | None = None,
        **kwargs,
    ):
        """The one entry point of every LENS computation, so that DDP and DeepSpeed see each parameter inside
        the wrapped model's call. Three modes:

        - the family's stock forward (generation, plain LM loss): no SAM inputs;
        - SAM2 encoding: `sam_images` (N, 3, S, S) without `input_ids` -> `SamFeatures` of the N images
          (computed without gradients when the image encoder is frozen);
        - the query forward: `input_ids` with `sam_images` or `sam_features` -> `LensOutput` (see
          `forward_with_queries`; `labels` there give per-token log-probs and entropies instead of logits).
          `append_queries=True` without SAM inputs runs it without masks (the same token positions as the
          masked passes, e.g. for GRPO's no-grad log-probs).
        """
        if input_ids is None and inputs_embeds is None and sam_images is not None:
            return self.encode_sam_images(sam_images)
        if sam_images is not None or sam_features is not None or append_queries:
            return self.forward_with_queries(
                input_ids, attention_mask, pixel_values, image_grid_thw, sam_images=sam_images,
                sam_features=sam_features, sam_image_index=sam_image_index, logits_to_keep=int(logits_to_keep),
                return_logits=return_logits, labels=labels, temperature=temperature, share_vision=share_vision,
                per_sample_decoding=per_sample_decoding, prefix_groups=prefix_groups, prefix_length=prefix_length,
            )
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            pixel_values=pixel_values, pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids,
            second_per_grid_ts=second_per_grid_ts, logits_to_keep=logits_to_keep, **kwargs,
        )

    def forward_with_queries(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        sam_images: torch.Tensor | None = None,
        sam_features: SamFeatures | None = None,
        sam_image_index: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        per_sample_decoding: bool = False,
        share_vision: bool = True,
        labels: torch.LongTensor | None = None,
        temperature: float = 1.0,
        prefix_groups: torch.LongTensor | None = None,
        prefix_length: int | None = None,
    ) -> LensOutput:
        """One pass over tokens + appended queries -> token scores, query states and masks.

        input_ids/attention_mask: (B, L), left or right padded. sam_images: (N, 3, S, S) 0..255 or
        precomputed `sam_features` of N images; `sam_image_index` (B,) says which image each row shows
        (default: row b shows image b); with `share_vision`, the vision tower also encodes each distinct image
        once; with neither, no masks are decoded. Token scores: with `labels` (B, L; -100 = unscored), `log_probs`
        and `entropy` (B, L - 1; position j scores token j + 1) at `temperature` and their mean NLL as `loss`,
        without (B, L, V) logits; else, with `return_logits`, the logits of the last `logits_to_keep` positions (all
        when 0).
        `prefix_groups` (B,) with `prefix_length` P: rows with equal ids share their first P tokens (prompt and
        image), which then run once (lens/modeling/shared_prefix.py; same numbers); logits then cover positions
        P - 1 on only, and `log_probs`/`entropy` are 0 before P - 1.
        Call it through `model(...)` (the wrapped model) when training: see `forward`.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        q = self.config.num_of_query
        start = 0
        if prefix_groups is not None:
            from .shared_prefix import shared_query_hidden

            start = prefix_length - 1  # text_hidden: positions P - 1 .. L - 1
            text_hidden, query_states = shared_query_hidden(
                self, input_ids, attention_mask, pixel_values, image_grid_thw, prefix_groups, prefix_length
            )
        else:
            shared = sam_image_index if share_vision else None
            embeds, full_mask, position_ids, extras = self.query_inputs(
                input_ids, attention_mask, pixel_values, image_grid_thw, shared
            )
            hidden = self.model.language_model(
                inputs_embeds=embeds, attention_mask=full_mask, position_ids=position_ids, use_cache=False, **extras
            ).last_hidden_state  # (B, L + Q, H), after the final norm
            text_hidden, query_states = hidden[:, :-q], hidden[:, -q:]
        out = LensOutput(query_states=query_states)
        if labels is not None:
            out.log_probs, out.entropy, out.loss = token_log_probs(text_hidden, self.lm_head, labels[:, start:], temperature)
            if start:
                out.log_probs, out.entropy = (nn.functional.pad(t, (start, 0)) for t in (out.log_probs, out.entropy))
        elif return_logits:
            out.logits = self.lm_head(text_hidden[:, -logits_to_keep:] if logits_to_keep else text_hidden)

        if sam_features is None and sam_images is None:
            return out
        if sam_features is None:
            sam_features = self.encode_sam_images(sam_images)
        out.mask_logits, out.iou_scores, out.sam_prompt = self.masks_from_queries(
            query_states, sam_features, sam_image_index, per_sample_decoding
        )
        return out

    def train(self, mode: bool = True):
        """As nn.Module.train; SAM2 stays in eval mode while none of its parameters learns (stage 1), as upstream:
        the decoder then falls back to its best multimask output when token 0 is unstable."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.sam.parameters()):
            self.sam.eval()
        return self


class LensForConditionalGeneration(LensMixin, Qwen2_5_VLForConditionalGeneration):
    """LENS over Qwen2.5-VL (the released checkpoints' family)."""

    config_class = LensConfig
    config: LensConfig


def lens_model_class(family) -> type:
    """The LENS model class of a family (a `Family` or its name)."""
    from . import backbones

    name = getattr(family, "name", family)
    return {"qwen2_5_vl": LensForConditionalGeneration, **backbones.LENS_BACKBONES}[get_family(name).name]
