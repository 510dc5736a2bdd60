"""The row -> distinct-item index that batched paths share (rows that show the same image share its encodings)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def distinct_index(keys: Sequence[Hashable]) -> tuple[list[int], torch.Tensor]:
    """For row keys (e.g. image ids), the first row of each distinct key in order of first appearance, and each
    row's position among the distinct keys (a (B,) long tensor).

    >>> distinct_index(["b", "a", "b", "c"])
    ([0, 1, 3], tensor([0, 1, 0, 2]))
    """
    position: dict[Hashable, int] = {}
    first: list[int] = []
    for row, key in enumerate(keys):
        if key not in position:
            position[key] = len(first)
            first.append(row)
    return first, torch.tensor([position[k] for k in keys], dtype=torch.long)
