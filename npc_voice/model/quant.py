"""Weight-only int8: the LM's matrices stored as int8 with one scale per output row.

Halves the LM's memory (16.7 GB of bf16 weights -> 8.7 GB: tests/test_quant.py), so the 7B model and a few
conversations fit a 24 GB consumer card. Each matrix is dequantized to the compute dtype when used
(one layer at a time), so activations and the KV cache keep their precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import Attention


class Int8Weight(nn.Module):
    """A [out, in] matrix as int8 rows times a per-row scale (symmetric, absmax / 127)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        w = weight.float()
        scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        self.register_buffer("q", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))

    def rows(self, start: int, end: int) -> torch.Tensor:
        return self.q[start:end].to(self.scale.dtype) * self.scale[start:end]

    def forward(self) -> torch.Tensor:
        return self.q.to(self.scale.dtype) * self.scale


class Int8Linear(nn.Module):
    """Drop-in for a bias-free nn.Linear."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.w = Int8Weight(linear.weight.data, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized matrix: a full-width temporary, so not for asking a device or dtype."""
        return self.w()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w())


@torch.no_grad()
def quantize_int8_(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replaces, in place, every bias-free nn.Linear and every attention projection of `model`
    with its int8 form (embeddings and norms stay as they are)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, Int8Linear(child, dtype or child.weight.dtype))
        if isinstance(module, Attention) and isinstance(module.in_proj_weight, nn.Parameter):
            weight = module.in_proj_weight
            del module.in_proj_weight
            module.in_proj_weight = Int8Weight(weight.data, dtype or weight.dtype)
    return model


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
