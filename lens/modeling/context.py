"""The context module: a connector over the query hidden states (upstream attribute names kept so
that released checkpoints load as they are)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QueryAttention(nn.Module):
    """Non-causal multi-head self-attention without positional encoding (keys `qkv`, `proj`)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"connector hidden size {dim} is not divisible by connector_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, Q, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class QueryMLP(nn.Module):
    """fc1 -> quick_gelu -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))


class ConnectorBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = QueryAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = QueryMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class QueryConnector(nn.Module):
    """Learned position embedding (zeros at init) added to the Q query states, then `depth` blocks."""

    def __init__(self, dim: int, num_queries: int, depth: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.blocks = nn.ModuleList(ConnectorBlock(dim, num_heads, mlp_ratio) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Q, H) -> (B, Q, H)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


def build_proj_to_sam(hidden: int, sam_dim: int) -> nn.Sequential:
    """Linear(H, H) -> GELU -> Linear(H, sam_dim); keys `.0` and `.2` as upstream."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, sam_dim))
