"""Word oracle: how well can a SAM2 mask decoder follow referring expressions when it is handed the words?

A diagnostic for the miniature (research/README.md; findings in docs/lab-notebook.md). It replaces Qwen and
the context module by a bidirectional
GRU over the expression's words that writes the SAM2 sparse prompt directly, so the decoder gets the words
without loss. As in tiny stage 1, the image encoder stays frozen (features computed once per image) and the
prompt encoder and mask decoder train with the LENS segmentation loss (BCE + dice). The held-out gIoU it
reaches bounds what the SAM2 side can make of the words with that training budget:

    python -m research.word_oracle --data outputs/quickstart/data --init outputs/quickstart/warmup/final

``--init`` takes ``preset:<name>`` or any LENS checkpoint folder (only its SAM2 is used).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from tqdm import tqdm

from lens.data.base import Reference
from lens.data.refer import load_refer
from lens.data.synthetic import normalise_text, parse_expression
from lens.data.transforms import load_rgb, sam_image
from lens.evaluation.metrics import SegmentationMetrics, expression_iou, score_mask_logits
from lens.losses import segmentation_loss
from lens.modeling.lens import LensForConditionalGeneration
from lens.modeling.presets import build_preset
from lens.modeling.sam import SamFeatures, decode_masks, encode_images

HELD_OUT = ("val", "testA", "testB")


class WordPrompter(nn.Module):
    """Word ids (B, L), 0 = padding -> SAM2 sparse prompt (B, T, C): embeddings, BiGRU, max-pool, linear."""

    def __init__(self, vocab_size: int, dim: int, prompt_dim: int, prompt_tokens: int, gain: float = 1.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.gru = nn.GRU(dim, dim, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * dim, prompt_tokens * prompt_dim)
        with torch.no_grad():  # `gain` scales the initial prompt (the decoder's own tokens have norm ~8)
            self.out.weight.mul_(gain)
            self.out.bias.mul_(gain)
        self.shape = (prompt_tokens, prompt_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids != 0).sum(1).cpu()
        packed = pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=ids.shape[1])  # (B, L, 2*dim)
        h = h.masked_fill((ids == 0).unsqueeze(-1), float("-inf")).amax(1)  # padding never wins the max
        return self.out(h).view(ids.shape[0], *self.shape)


class Vocabulary(dict):
    def ids(self, texts: list[str]) -> torch.Tensor:
        """(B, L) word ids, right-padded with 0; unseen words get new ids (the oracle sees every word)."""
        rows = [[self.setdefault(w, len(self) + 1) for w in normalise_text(t).split()] for t in texts]
        width = max(map(len, rows))
        return torch.tensor([r + [0] * (width - len(r)) for r in rows])


def load_sam(init: str, seed: int) -> nn.Module:
    if init.startswith("preset:"):
        return build_preset(init.split(":", 1)[1], seed=seed)[0].sam
    return LensForConditionalGeneration.from_pretrained(init).sam


@torch.no_grad()
def encode_all(sam: nn.Module, refs: list[Reference], batch: int = 32) -> tuple[SamFeatures, dict[str, int]]:
    """Frozen SAM2 features of every distinct image, once; returns them and image key -> row."""
    keys = sorted({r.image_key for r in refs})
    path = {r.image_key: r.image_path for r in refs}
    parts = []
    for i in tqdm(range(0, len(keys), batch), desc="sam features"):
        images = torch.stack([sam_image(load_rgb(path[k]), sam.image_size) for k in keys[i : i + batch]])
        parts.append(encode_images(sam, images))
    return SamFeatures.cat(parts), {k: i for i, k in enumerate(keys)}


def decode(sam: nn.Module, feats: SamFeatures, rows: dict[str, int], refs: list[Reference], prompt: torch.Tensor):
    """Low-res mask logits (B, 1, h, w); each distinct image's features are gathered once."""
    uniq, index = torch.tensor([rows[r.image_key] for r in refs]).unique(return_inverse=True)
    return decode_masks(sam, feats.index(uniq), prompt, index)[0]


def expression_kind(text: str) -> str:
    """Kind of a synthetic expression (attr, position, size, relation, reasoning); "other" outside the grammar."""
    try:
        return parse_expression(text).kind
    except ValueError:
        return "other"


@torch.no_grad()
def evaluate(sam, feats, rows, refs: list[Reference], prompter: WordPrompter, vocab: Vocabulary) -> dict:
    """cIoU/gIoU (`standard` protocol), mean per-expression precision and recall of the predicted mask (a
    decoder that ignores the words and masks every object shows low precision, high recall) and the mean IoU by
    kind of expression; these three count pixels == 1 as the target (the `lens` protocol's foreground).
    Masks are upsampled and scored by evaluation's :func:`lens.evaluation.metrics.score_mask_logits`."""
    records, by_kind, precision, recall = [], {}, [], []
    for i in range(0, len(refs), 32):
        batch = refs[i : i + 32]
        logits = decode(sam, feats, rows, batch, prompter(vocab.ids([r.expressions[0] for r in batch])))
        targets = [ref.load_mask() for ref in batch]
        std = score_mask_logits(logits, targets, "standard")
        fg = score_mask_logits(logits, targets, "lens")
        for k, ref in enumerate(batch):
            records.append({"id": None, "I": int(std.inter[k]), "U": int(std.union[k])})
            inter, union = int(fg.inter[k]), int(fg.union[k])
            precision.append(inter / max(int(fg.pred_area[k]), 1))
            recall.append(inter / max(int(fg.target_area[k]), 1))
            by_kind.setdefault(expression_kind(ref.expressions[0]), []).append(expression_iou(inter, union))
    metrics = SegmentationMetrics.from_records(records, protocol="standard").compute()
    result = {k: v for k, v in metrics.items() if k in ("ciou", "giou", "n")}
    result["precision"] = sum(precision) / len(precision)
    result["recall"] = sum(recall) / len(recall)
    result["mean_iou_by_kind"] = {k: {"iou": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_kind.items())}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset root holding refer_seg/refcoco (e.g. the synthetic data)")
    p.add_argument("--init", default="preset:tiny", help="preset:<name> or a LENS checkpoint folder (its SAM2)")
    p.add_argument("--steps", type=int, default=2220, help="optimizer steps (tiny stage 1 takes 2,220)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW, warm-up 10 steps then cosine, as tiny stage 1")
    p.add_argument("--prompt-tokens", type=int, default=1, help="sparse prompt tokens (LENS: 1)")
    p.add_argument("--prompt-gain", type=float, default=1.0,
                   help="scale of the prompter's initial output (1: PyTorch's default Linear init)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.prompt_tokens < 1:
        p.error("--steps, --batch and --prompt-tokens must be at least 1")
    if not args.prompt_gain > 0:
        p.error(f"--prompt-gain must be positive, got {args.prompt_gain}")

    torch.manual_seed(args.seed)
    sam = load_sam(args.init, args.seed).eval()
    sam.requires_grad_(False)
    train = load_refer(args.data, "refcoco", "train")
    held = [r for split in HELD_OUT for r in load_refer(args.data, "refcoco", split)]
    if len(train) < args.batch or not held:
        raise SystemExit(f"--data {args.data}: refcoco has {len(train)} train references (--batch {args.batch} needs "
                         f"at least as many) and {len(held)} in {'/'.join(HELD_OUT)} (needs some)")
    feats, rows = encode_all(sam, train + held)
    vocab = Vocabulary()
    vocab.ids([r.expressions[0] for r in train + held])
    prompter = WordPrompter(len(vocab) + 1, 128, feats.image_embed.shape[1], args.prompt_tokens, args.prompt_gain)
    trained = [*prompter.parameters(), *sam.sam_prompt_encoder.parameters(), *sam.sam_mask_decoder.parameters()]
    for t in trained:
        t.requires_grad_(True)
    opt = torch.optim.AdamW(trained, args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))

    sam.sam_mask_decoder.train()
    rng, order, losses, start = random.Random(args.seed), [], [], time.time()
    for _ in (bar := tqdm(range(args.steps), desc="oracle")):
        if len(order) < args.batch:
            order = list(range(len(train)))
            rng.shuffle(order)
        batch = [train[order.pop()] for _ in range(args.batch)]
        logits = decode(sam, feats, rows, batch, prompter(vocab.ids([r.expressions[0] for r in batch])))
        targets = [torch.from_numpy(r.load_mask() == 1).float() for r in batch]
        loss, parts = segmentation_loss(logits, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", dice=f"{parts['dice'].item():.3f}")
    train_s = time.time() - start

    sam.eval()
    result = evaluate(sam, feats, rows, held, prompter, vocab)
    result.update(steps=args.steps, lr=args.lr, prompt_tokens=args.prompt_tokens, prompt_gain=args.prompt_gain,
                  init=args.init, train_seconds=round(train_s, 1),
                  final_loss=sum(losses[-100:]) / len(losses[-100:]))
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
