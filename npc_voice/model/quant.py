"""8-bit LM weights (`--weights-dtype int8|fp8`): each matrix stored in 8 bits with one scale per output row.

Both halve the LM's memory (16.7 GB of bf16 weights -> 8.7 GB: tests/test_quant.py), so the 7B model and
a few conversations fit a 24 GB consumer card; activations and the KV cache keep their precision.
- int8: on a GPU one Triton kernel reads the int8 rows and multiplies them by the activations in
  registers (`int8_matmul.py`): half of bf16's bytes; a one-session tick 7.3 ms against bf16's 9.0
  on an H200 (slower from 64 sessions on: docs/performance.md). Elsewhere each matrix is dequantized
  to the compute dtype when used (one layer at a time): runs anywhere, slower than bf16.
- fp8 (e4m3): the matmul itself runs in fp8 on the tensor cores (`torch._scaled_mm`, Ada / Hopper:
  compute capability 8.9+), the activations quantized per row (token) on the fly. Elsewhere (a CPU, in
  the tests) a plain float32 computation of the same math stands in. Per product on an H200 (torch
  2.11, 1-64 rows, 7B shapes, CUDA graphs) it took 0.9-4x bf16's time (int8: ~10x): the rowwise
  `_scaled_mm` runs at about bf16's speed there and quantizing x costs ~10 us of small kernels: a
  whole tick is slower than with bf16 weights (14.6 vs 10.8 ms at one session, docs/performance.md).
Embeddings, norms and Mimi are never quantized.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import Attention

log = logging.getLogger(__name__)

WEIGHT_CHOICES = ("bf16", "int8", "fp8")  # `--weights-dtype`; "bf16" = not quantized (the LM's --dtype)
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: the largest magnitude float8_e4m3fn holds


def resolve_weights_dtype(name: str, device: torch.device | str, int8: bool = False) -> str:
    """What `--weights-dtype NAME` (or the older `--int8`) means on `device`: "bf16", "int8" or "fp8".
    fp8 weights that cannot use fp8 matmuls here are an error naming the flag, never a silent fallback."""
    device = torch.device(device)
    if name not in WEIGHT_CHOICES:
        raise ValueError(f"--weights-dtype {name!r}: expected one of {', '.join(WEIGHT_CHOICES)}")
    if int8:
        if name not in ("bf16", "int8"):
            raise ValueError(f"--int8 and --weights-dtype {name} disagree: give --weights-dtype alone")
        name = "int8"
    if name != "fp8":
        return name
    if device.type != "cuda":
        raise ValueError(f"--weights-dtype fp8 needs a CUDA GPU with fp8 matmuls (compute capability 8.9+: Ada, "
                         f"Hopper), and this model runs on {device}: use --weights-dtype int8")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"--weights-dtype fp8 needs a GPU with fp8 matmuls (compute capability 8.9+: Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use --weights-dtype int8")
    return name


class QuantWeight(nn.Module):
    """A [out, in] matrix `q` (8 bits) times `scale` [out, 1], one per output row. Subclasses say how
    to `dequantize`; `linear` is x @ rows.T unless a subclass has a faster way."""

    q: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Rows q [R, in] with their scales [R, 1] -> [R, in] in the compute dtype."""
        raise NotImplementedError

    def rows(self, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Rows [start, end), dequantized: [end - start, in]."""
        return self.dequantize(self.q[start:end], self.scale[start:end])

    def forward(self) -> torch.Tensor:
        """The whole matrix, dequantized: [out, in] (a full-width temporary)."""
        return self.dequantize(self.q, self.scale)

    def linear(self, x: torch.Tensor, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """x [..., in] @ rows(start, end).T -> [..., end - start]."""
        return F.linear(x, self.rows(start, end))


class Int8Weight(QuantWeight):
    """int8 rows times a per-row scale in the compute dtype (symmetric, absmax / 127)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        w = weight.float()
        scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        self.register_buffer("q", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return q.to(scale.dtype) * scale

    def linear(self, x: torch.Tensor, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """On a GPU, for the few rows of a tick, one Triton kernel that reads the int8 rows as they are
        (`int8_matmul`); elsewhere (and for a prompt's many rows) the rows dequantized, then multiplied."""
        w8 = _int8_kernel() if x.is_cuda else None
        if w8 is not None and w8.CONFIG["enabled"] and x.numel() // x.shape[-1] <= w8.LARGEST_M:
            return w8.int8_linear_op(x, self.q[start:end], self.scale[start:end])
        return super().linear(x, start, end)


@functools.cache
def _int8_kernel():
    """The Triton kernel's module, or None where Triton is missing (the dequantizing path then runs:
    the same numbers, slower; said once in the log)."""
    try:
        from . import int8_matmul
    except ImportError as exc:
        log.warning("int8 weights without Triton (%s): each matrix is dequantized on use, slower than bf16", exc)
        return None
    return int8_matmul


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 scale [M, 1]): x ~ q * scale, absmax / 448 per row.
    Few kernels (it runs before every fp8 product): one reduction, the scale, one divide (in float32,
    by type promotion), one cast. |x / scale| <= 448 up to a float32 rounding, which e4m3 rounds to 448."""
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)  # [M, 1]
    scale = (amax / FP8_MAX).clamp_(min=1e-12)
    return (x / scale).to(FP8), scale


class Fp8Weight(QuantWeight):
    """float8_e4m3fn rows times a float32 per-row scale (absmax / 448); `linear` quantizes x per row
    the same way and multiplies in fp8 (`torch._scaled_mm`, rowwise scales) on a GPU."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        q, scale = quantize_rows_fp8(weight)
        self.register_buffer("q", q)  # [out, in] float8_e4m3fn
        self.register_buffer("scale", scale)  # [out, 1] float32 (what _scaled_mm takes)
        self.dtype = dtype  # what `rows` dequantizes to

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (q.float() * scale).to(self.dtype)

    def linear(self, x: torch.Tensor, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """x [..., in] -> [..., end - start]: x and the weight rows both fp8, accumulated in float32 (on
        an H200 within 1.3e-4 of the stand-in's float32 sums), times both scales, in x's dtype."""
        q, sw = self.q[start:end], self.scale[start:end]  # [N, K], [N, 1]
        lead, K = x.shape[:-1], x.shape[-1]
        xq, sx = quantize_rows_fp8(x.reshape(-1, K))  # [M, K], [M, 1]
        if x.is_cuda and K % 16 == 0 and q.shape[0] % 16 == 0:
            # row-major fp8 x column-major fp8 (q.t() of a row slice: aligned, since K % 16 == 0);
            # rowwise scales: sx [M, 1], sw [1, N], both float32 and contiguous. M needs no padding.
            out = torch._scaled_mm(xq, q.t(), scale_a=sx, scale_b=sw.view(1, -1), out_dtype=x.dtype)
        else:  # the same math in float32 (CPU, odd shapes): exact products of fp8 values, scaled after
            out = ((xq.float() @ q.float().t()) * sx * sw.view(1, -1)).to(x.dtype)
        return out.view(*lead, -1)


class QuantLinear(nn.Module):
    """Drop-in for a bias-free nn.Linear, its matrix as `weight_class`."""

    weight_class: type[QuantWeight]

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.w = self.weight_class(linear.weight.data, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized matrix: a full-width temporary, so not for asking a device or dtype."""
        return self.w()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return self.w.linear(x)


class Int8Linear(QuantLinear):
    weight_class = Int8Weight


class Fp8Linear(QuantLinear):
    weight_class = Fp8Weight


LINEARS: dict[str, type[QuantLinear]] = {"int8": Int8Linear, "fp8": Fp8Linear}


@torch.no_grad()
def quantize_(model: nn.Module, weights_dtype: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Replaces, in place, every bias-free nn.Linear and every attention projection of `model` with
    its `weights_dtype` ("int8" or "fp8") form (embeddings and norms stay as they are). One matrix at
    a time: the full-width one is dropped as soon as its 8-bit form exists. `dtype`: the compute dtype
    (default: each matrix's own)."""
    if weights_dtype not in LINEARS:
        raise ValueError(f"weights dtype {weights_dtype!r}: expected one of {', '.join(LINEARS)}")
    linear_class = LINEARS[weights_dtype]
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, linear_class(child, dtype or child.weight.dtype))
        if isinstance(module, Attention) and isinstance(module.in_proj_weight, nn.Parameter):
            weight = module.in_proj_weight
            del module.in_proj_weight
            module.in_proj_weight = linear_class.weight_class(weight.data, dtype or weight.dtype)
    return model


def quantize_int8_(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    return quantize_(model, "int8", dtype)


def quantize_fp8_(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    return quantize_(model, "fp8", dtype)


def weights_kind(model: nn.Module) -> str:
    """"int8", "fp8" or "bf16" (not quantized): what `quantize_` made of `model`'s linears, if anything."""
    return next((kind for kind, cls in LINEARS.items() if any(isinstance(m, cls) for m in model.modules())), "bf16")


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
