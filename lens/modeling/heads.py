"""Per-token log-probabilities (and entropies) of labelled positions without the (B, L, V) logits.

The LM head runs on the labelled positions only, in row chunks; each chunk is recomputed in the backward
(activation checkpointing), so at most one (chunk, V) logits block is alive at a time. This is what the
query forward uses for GRPO and for the teacher-forced answer loss; it runs inside the wrapped model's
forward, so DeepSpeed ZeRO-3 has the LM head gathered (see `lens.modeling.zero3`).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_ROWS = 1024


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
           temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, H) states, (n,) labels -> log p(label) (n,) and entropy (n,), in float32."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature  # (n, V)
    log_z = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, labels[:, None])[:, 0] - log_z
    probs = torch.softmax(logits, dim=-1)
    entropy = log_z - (probs * logits).sum(-1)
    return picked, entropy


def token_log_probs(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token log-probs of a causal LM from its final hidden states.

    hidden: (B, L, H) post-norm states; labels: (B, L) token ids, -100 where nothing is scored. Position j of
    the outputs scores token j + 1 (as TRL's fused head): returns log_probs (B, L - 1), entropy (B, L - 1),
    both float32 and 0 where unscored, and the mean negative log-likelihood over scored tokens (the causal-LM
    loss of `transformers`).
    """
    states, targets = hidden[:, :-1], labels[:, 1:]
    mask = targets != -100  # (B, L - 1)
    rows, ids = states[mask], targets[mask]  # (n, H), (n,)
    weight, bias = lm_head.weight, lm_head.bias
    pieces = []
    for s in range(0, rows.shape[0], chunk_rows):
        args = (rows[s : s + chunk_rows], weight, bias, ids[s : s + chunk_rows], temperature)
        pieces.append(checkpoint(_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk(*args))
    picked = torch.cat([p for p, _ in pieces]) if pieces else rows.new_zeros(0, dtype=torch.float32)
    ent = torch.cat([e for _, e in pieces]) if pieces else rows.new_zeros(0, dtype=torch.float32)
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    # masked_scatter keeps an all-unscored batch connected to the graph (a differentiable zero)
    log_probs = zeros.masked_scatter(mask, picked)
    entropy = zeros.masked_scatter(mask, ent)
    loss = -picked.sum() / mask.sum().clamp(min=1)
    return log_probs, entropy, loss
