"""The temporal transformer's per-slot KV cache: full precision, or 8-bit with one scale per row.

A cache is a ring of `S` rows per slot and head (plus one scratch row that skipped slots write), so
a step writes every slot with one scatter and attends over the first `window` rows. Both kinds
answer the same three calls, which is all `Transformer.step` and a prefix install use:
- `write(rows, k, v)`: the new keys and values ([B, H, T, D]) at ring rows [B, T];
- `attend(q, bias, window)`: attention of q ([B, H, T, D]) over the first `window` rows, with an
  additive mask `bias` ([B, 1, T, window], 0 or -inf);
- `encode(keys, values)` / `rows(slot, start, count)`: a prefix's keys and values in the cache's
  own form, and the views of one slot's rows they are copied into.

The 8-bit cache (`--kv-dtype int8|fp8`) halves the cache (0.79 GB per 7B conversation at the full
context instead of 1.57 GB): each row of each head is stored as D 8-bit values times one float32
scale (absmax / 127 for int8, absmax / 448 for fp8 e4m3), quantized when written. On a GPU a
single-position step reads it with the fused Triton decode attention of `decode_attention.py`
(dequantizing in registers); elsewhere, and for multi-position steps, it is dequantized and handed
to PyTorch's attention (the same function, used as the kernel's test oracle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fused
from .streaming import StreamState, byte_view

KV_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}  # the 8-bit forms; "bf16" = unquantized
KV_NAMES = {dtype: name for name, dtype in KV_DTYPES.items()}  # what /health and benchmarks call them
# the largest magnitude each 8-bit form holds (int8 symmetric: 127)
QMAX = {torch.int8: float(torch.iinfo(torch.int8).max), torch.float8_e4m3fn: torch.finfo(torch.float8_e4m3fn).max}


def _write_rows(cache: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> None:
    """cache [B, H, S + 1, ...] gets `new` [B, H, T, ...] at rows [B, T] (skipped slots: row S)."""
    index = rows.view(rows.shape[0], 1, rows.shape[1], *([1] * (new.dim() - 3))).expand(new.shape)
    byte_view(cache).scatter_(2, index, byte_view(new.to(cache.dtype)))


@dataclass
class KVCache(StreamState):
    keys: torch.Tensor  # [B, H, S + 1, D]: S ring rows, then the skipped slots' scratch row
    values: torch.Tensor  # [B, H, S + 1, D]

    @classmethod
    def empty(cls, shape: tuple[int, int, int, int], device: torch.device | str, dtype: torch.dtype) -> KVCache:
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def slot_view(self, slot: int) -> list[torch.Tensor]:
        return [self.keys[slot, :, :-1], self.values[slot, :, :-1]]

    def write(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        _write_rows(self.keys, rows, k)
        _write_rows(self.values, rows, v)

    def attend(self, q: torch.Tensor, bias: torch.Tensor, window: int) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, self.keys[:, :, :window], self.values[:, :, :window], attn_mask=bias)

    def write_slot(self, slot: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [1, H, R, D] into ring rows `rows` [R] of the slot in `slot` ([1] long, on the
        device: an install's fixed shapes)."""
        index = _slot_rows(slot, rows, self.keys.shape[1])
        self.keys.index_put_(index, k)
        self.values.index_put_(index, v)


@fused.fusable
def _quantize(x: torch.Tensor, qmax: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) * (1.0 / qmax)).clamp(min=1e-30)  # as `decode_attention.write_rows` does
    scaled = (xf / scale[..., None]).clamp(-qmax, qmax)
    return (scaled.round() if dtype == torch.int8 else scaled).to(dtype), scale


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (values [..., D] in `dtype`, scales [...] float32): x ~= values * scale, one
    symmetric scale (absmax / qmax) per row (one fused kernel on a GPU)."""
    return _quantize(x, QMAX[dtype], dtype)


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., D] 8-bit values times their [...] scales, in `dtype`."""
    return (values.float() * scale[..., None]).to(dtype)


@dataclass
class QuantKVCache(StreamState):
    keys: torch.Tensor  # [B, H, S + 1, D] int8 or float8_e4m3fn (last row: the skipped slots' scratch)
    values: torch.Tensor  # [B, H, S + 1, D]
    key_scale: torch.Tensor  # [B, H, S + 1] float32
    value_scale: torch.Tensor  # [B, H, S + 1] float32

    @classmethod
    def empty(cls, shape: tuple[int, int, int, int], device: torch.device | str, dtype: torch.dtype) -> QuantKVCache:
        if dtype not in QMAX:
            raise ValueError(f"an 8-bit KV cache is int8 or float8_e4m3fn, not {dtype}")
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(shape[:3], device=device), torch.zeros(shape[:3], device=device))

    def slot_view(self, slot: int) -> list[torch.Tensor]:
        return [t[slot, :, :-1] for t in self.tensors()]

    def write(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if (da := _fused_write(k)) is not None:
            da.write_rows(rows, k, v, self.keys, self.key_scale, self.values, self.value_scale)
            return
        for new, values, scales in ((k, self.keys, self.key_scale), (v, self.values, self.value_scale)):
            q, s = quantize_rows(new, values.dtype)
            _write_rows(values, rows, q)
            _write_rows(scales, rows, s)

    def attend(self, q: torch.Tensor, bias: torch.Tensor, window: int) -> torch.Tensor:
        if q.is_cuda and q.shape[2] == 1:  # a tick: the fused kernel reads the 8-bit rows directly
            from .decode_attention import decode_attention

            return decode_attention(q, self.keys, self.key_scale, self.values, self.value_scale, bias, window)
        return attend_dequantized(q, self.keys, self.key_scale, self.values, self.value_scale, bias, window)

    def write_slot(self, slot: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """`KVCache.write_slot`, quantized as `write` quantizes (on a GPU the fused kernel: one launch)."""
        if (da := _fused_write(k)) is not None:
            da.write_rows(rows[None], k, v, self.keys, self.key_scale, self.values, self.value_scale, slots=slot)
            return
        index = _slot_rows(slot, rows, self.keys.shape[1])
        with fused.eager():  # the shapes are an install's buckets: not worth compiling
            for new, values, scales in ((k, self.keys, self.key_scale), (v, self.values, self.value_scale)):
                q, s = quantize_rows(new, values.dtype)
                byte_view(values).index_put_(index, byte_view(q))
                scales.index_put_(index, s)


def _fused_write(k: torch.Tensor):
    """`decode_attention` where its fused quantize-and-store kernel writes `k`'s rows (a GPU, the
    kernel switched on), else None (PyTorch's quantization and scatters)."""
    if not k.is_cuda:
        return None
    from . import decode_attention as da

    return da if da.CONFIG["fused_write"] else None


def _slot_rows(slot: torch.Tensor, rows: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """The advanced index of ring rows `rows` [R] of every head of the slot in `slot` [1]: [1, H, R]."""
    return slot[:, None, None], torch.arange(heads, device=rows.device)[None, :, None], rows[None, None, :]


def attend_dequantized(q: torch.Tensor, keys: torch.Tensor, key_scale: torch.Tensor, values: torch.Tensor,
                       value_scale: torch.Tensor, bias: torch.Tensor, window: int) -> torch.Tensor:
    """What the fused kernel computes, in plain PyTorch: q [B, H, T, D] over the first `window`
    rows of an 8-bit cache, masked by `bias` [B, 1, T, window] -> [B, H, T, D]."""
    k = dequantize(keys[:, :, :window], key_scale[:, :, :window], q.dtype)
    v = dequantize(values[:, :, :window], value_scale[:, :, :window], q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def make_cache(shape: tuple[int, int, int, int], device: torch.device | str, dtype: torch.dtype,
               kv_dtype: torch.dtype | None) -> KVCache | QuantKVCache:
    """An empty cache of `shape` [B, H, S + 1, D]: 8-bit when `kv_dtype` is int8 or fp8, else in `dtype`."""
    if kv_dtype is None or kv_dtype == dtype:
        return KVCache.empty(shape, device, dtype)
    return QuantKVCache.empty(shape, device, kv_dtype)


KV_CHOICES = ("auto", "bf16", "int8", "fp8")  # `--kv-dtype`


def resolve_kv_dtype(name: str, device: torch.device | str) -> torch.dtype | None:
    """What `--kv-dtype NAME` means on `device`: None (unquantized: the LM's compute dtype), int8
    or float8_e4m3fn. "auto" is int8 on a CUDA GPU with Triton, else unquantized. An 8-bit cache
    that cannot run fast here is an error naming the flag, never a silent fallback."""
    device = torch.device(device)
    if name not in KV_CHOICES:
        raise ValueError(f"--kv-dtype {name!r}: expected one of {', '.join(KV_CHOICES)}")
    if name == "auto":
        return torch.int8 if device.type == "cuda" and _triton_available() else None
    if name == "bf16":
        return None
    if device.type != "cuda":
        raise ValueError(f"--kv-dtype {name} needs a CUDA GPU (its fused attention kernel is Triton), and this "
                         f"model runs on {device}: use --kv-dtype bf16 (or auto)")
    if not _triton_available():
        raise ValueError(f"--kv-dtype {name} needs Triton (pip install triton), which is not importable here")
    if name == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"--kv-dtype fp8 needs a GPU with fp8 (compute capability 8.9+: Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use --kv-dtype int8")
    return KV_DTYPES[name]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
