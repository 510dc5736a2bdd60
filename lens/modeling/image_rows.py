"""Rows and images: one image per row, rows that show the same image share its vision features."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lens.distinct import distinct_index


def distinct_images(
    pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor, image_index: torch.LongTensor
) -> tuple[torch.Tensor, torch.LongTensor, torch.LongTensor]:
    """Keep the patches of the first row of each distinct `image_index` value.

    pixel_values: (sum_b patches_b, D) rows' patches in order; image_grid_thw: (B, 3); image_index: (B,).
    Returns the distinct images' patches and grids, and each row's position among them (B,).
    """
    first, inverse = distinct_index(image_index.tolist())
    offsets = torch.cat([image_grid_thw.new_zeros(1), image_grid_thw.prod(-1).cumsum(0)])
    keep = torch.cat([torch.arange(int(offsets[r]), int(offsets[r + 1]), device=pixel_values.device) for r in first])
    return pixel_values[keep], image_grid_thw[first], inverse.to(image_index.device)


def rows_of(per_image: Sequence[torch.Tensor], image_index: torch.LongTensor | None) -> torch.Tensor:
    """Concatenate per-image features (each (n_i, D)) in row order: row b takes image `image_index[b]` (all in order
    without an index) -> (sum over rows of n, D)."""
    if image_index is not None:
        per_image = [per_image[i] for i in image_index.tolist()]
    return torch.cat(list(per_image), dim=0)
