"""A streaming causal transformer shared by the LM (temporal and depth) and Mimi.

Parameter names follow the reference checkpoints (`self_attn.in_proj_weight`, `self_attn.out_proj.weight`,
`gating.linear_in.weight` or `linear1.weight`, `norm1.alpha` or `norm1.weight`, `layer_scale_1.scale`),
so a checkpoint loads with no renaming. Layers with weights per step (the depth transformer) keep
their projections stacked along dim 0, exactly as the checkpoint stores them.

Each layer has one body, `TransformerLayer.forward` (norm, projections, attention, feed-forward);
the attention proper is the caller's: masked over the whole sequence (`Transformer.forward`), over
a ring cache (`Transformer.step`) or over one frame's steps (the depth transformer).

Streaming keeps a ring KV cache per layer in fixed-shape tensors with the slot first (`kvcache.py`:
full precision or 8-bit); positions are per slot, so slots advance, reset and skip steps independently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .kvcache import KVCache, QuantKVCache, make_cache
from .streaming import StreamState, state_field

NormKind = Literal["rms_f32", "layer"]
FFNKind = Literal["gated_silu", "gelu"]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # q, k, v [B, H, T, D] -> [B, H, T, D]


class RMSNorm(nn.Module):
    """RMS norm computed in float32 (the reference's `rms_norm_f32`); weight named `alpha`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C]
        return fused.rms_norm(x, self.alpha, self.eps)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def make_norm(kind: NormKind, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rms_f32" else nn.LayerNorm(dim, eps=eps)


def rope_tables(positions: torch.Tensor, head_dim: int, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, float32 [B, 1, T, D/2], for positions [B, T]; computed
    once per step and shared by every layer."""
    freqs = torch.exp(torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
                      * (-math.log(max_period) * 2 / head_dim))
    angles = positions.float()[:, None, :, None] * freqs
    return torch.cos(angles), torch.sin(angles)


def ring_positions(end: torch.Tensor, capacity: int) -> torch.Tensor:
    """Absolute position held by each ring-buffer row once `end` ([B]) positions were written.

    Row j holds the latest position p < end with p = j (mod capacity); rows never written get a
    negative position. Returns [B, capacity].
    """
    rows = torch.arange(capacity, device=end.device)
    last = (end - 1)[:, None]
    return last - torch.remainder(last - rows, capacity)


def visibility(q_pos: torch.Tensor, k_pos: torch.Tensor, context: int | None,
               always_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each query sees: [B, 1, T, S] bool for queries at `q_pos` ([B, T]) and keys at
    `k_pos` ([B, S]; < 0 = empty). A key is visible when 0 <= q_pos - k_pos < context;
    `always_valid` ([B, S]) adds keys visible anyway (keeps skipped slots free of empty rows, hence
    of NaNs). Computed once per step and shared by every layer."""
    delta = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
    visible = (k_pos[:, None, :] >= 0) & (delta >= 0)
    if context is not None:
        visible &= delta < context
    if always_valid is not None:
        visible |= always_valid[:, None, :]
    return visible[:, None]


@dataclass
class TransformerState(StreamState):
    position: torch.Tensor = state_field(0)  # [B] long: steps already seen by each slot
    layers: list[KVCache | QuantKVCache] = state_field(0)


class Attention(nn.Module):
    """Multi-head self-attention; `steps` > 0 gives each step (codebook) its own projections."""

    def __init__(self, dim: int, num_heads: int, steps: int = 0):
        super().__init__()
        self.dim, self.num_heads, self.steps = dim, num_heads, steps
        mult = max(steps, 1)
        self.in_proj_weight = nn.Parameter(torch.empty(mult * 3 * dim, dim))
        nn.init.kaiming_uniform_(self.in_proj_weight, a=math.sqrt(5))  # nn.Linear's default (no-op on meta)
        self.out_proj = nn.Linear(dim, mult * dim, bias=False)

    @staticmethod
    def _linear(x: torch.Tensor, weight: torch.Tensor | nn.Module, rows: int, step: int) -> torch.Tensor:
        """x [..., in] times rows [step * rows, (step + 1) * rows) of a stacked weight: [..., rows]. A
        quantized weight (npc_voice.model.quant) runs its own product on those rows."""
        start, end = step * rows, (step + 1) * rows
        if isinstance(weight, torch.Tensor):
            return F.linear(x, weight[start:end])
        return weight.linear(x, start, end)

    def project_in(self, x: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> q, k, v, each [B, H, T, D]."""
        B, T, _ = x.shape
        qkv = self._linear(x, self.in_proj_weight, 3 * self.dim, step)  # [B, T, 3 * C]
        q, k, v = qkv.view(B, T, 3, self.num_heads, self.dim // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def project_out(self, y: torch.Tensor, step: int = 0) -> torch.Tensor:
        """y [B, H, T, D] -> [B, T, C]."""
        B, H, T, D = y.shape
        out = self.out_proj
        return self._linear(y.transpose(1, 2).reshape(B, T, H * D), out.weight if isinstance(out, nn.Linear) else out.w,
                            self.dim, step)


class GatedFFN(nn.Module):
    """SiLU-gated feed-forward: linear_in -> (silu(a) * b) -> linear_out."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(fused.silu_gate(self.linear_in(x)))


@dataclass(frozen=True)
class LayerSpec:
    """What kind of transformer layer: the LM's (RMS, gated SiLU) or Mimi's (LayerNorm, GELU, layer scale)."""

    dim: int
    num_heads: int
    hidden: int  # FFN hidden width (gated: the width after gating)
    norm: NormKind
    ffn: FFNKind
    norm_eps: float
    layer_scale: float | None = None
    steps: int = 0  # weights per step (depth transformer); 0 = shared


class TransformerLayer(nn.Module):
    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.self_attn = Attention(spec.dim, spec.num_heads, spec.steps)
        self.norm1 = make_norm(spec.norm, spec.dim, spec.norm_eps)
        self.norm2 = make_norm(spec.norm, spec.dim, spec.norm_eps)
        if spec.ffn == "gated_silu":
            if spec.steps:
                self.gating = nn.ModuleList(GatedFFN(spec.dim, spec.hidden) for _ in range(spec.steps))
            else:
                self.gating = GatedFFN(spec.dim, spec.hidden)
        else:
            self.linear1 = nn.Linear(spec.dim, spec.hidden, bias=False)
            self.linear2 = nn.Linear(spec.hidden, spec.dim, bias=False)
        if spec.layer_scale is not None:
            self.layer_scale_1 = LayerScale(spec.dim, spec.layer_scale)
            self.layer_scale_2 = LayerScale(spec.dim, spec.layer_scale)

    def forward(self, x: torch.Tensor, attend: Attend, step: int = 0) -> torch.Tensor:
        """The layer's one body: x [B, T, C] -> [B, T, C].

        attend(q, k, v), each [B, H, T, D] -> [B, H, T, D]: the attention proper (positions, masks,
        caches), which each caller owns. step: the weights of that step (depth transformer)."""
        q, k, v = self.self_attn.project_in(self.norm1(x), step)  # [B, H, T, D]
        x = x + self._scale(1, self.self_attn.project_out(attend(q, k, v), step))  # [B, T, C]
        return x + self._scale(2, self._mlp(self.norm2(x), step))  # [B, T, C]

    def _mlp(self, h: torch.Tensor, step: int) -> torch.Tensor:
        if self.spec.ffn == "gated_silu":
            return (self.gating[step] if self.spec.steps else self.gating)(h)
        return self.linear2(F.gelu(self.linear1(h)))

    def _scale(self, which: int, update: torch.Tensor) -> torch.Tensor:
        if self.spec.layer_scale is None:
            return update
        return (self.layer_scale_1 if which == 1 else self.layer_scale_2)(update)


class Transformer(nn.Module):
    """A causal transformer over time with RoPE, run whole-sequence or streamed step by step."""

    def __init__(self, spec: LayerSpec, num_layers: int, context: int | None, max_period: float):
        super().__init__()
        self.spec, self.context, self.max_period = spec, context, max_period
        self.layers = nn.ModuleList(TransformerLayer(spec) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, streamed_chunk: int | None = None) -> torch.Tensor:
        """Whole sequence, no cache: x [B, T, C] -> [B, T, C].

        streamed_chunk: give exactly what streaming `streamed_chunk` steps at a time through a ring
        cache of `context` rows gives. Once the ring is full, a chunk's writes evict keys that its own
        earlier queries would still see (a query at p loses the keys older than the chunk's last
        step minus the context): the reference streams Mimi 2 steps a frame, so a voice encoded
        whole must see the keys each streamed step saw."""
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device).expand(B, T)
        cos, sin = rope_tables(pos, self.spec.dim // self.spec.num_heads, self.max_period)
        mask = visibility(pos, pos, self.context)  # [B, 1, T, T]
        if streamed_chunk is not None and self.context is not None:
            oldest = (pos // streamed_chunk + 1) * streamed_chunk - self.context  # [B, T]: oldest key kept
            mask = mask & (pos[:, None, None, :] >= oldest[:, None, :, None])

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k = fused.rope_pair(q, k, cos, sin)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        for layer in self.layers:
            x = layer(x, attend)
        return x

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, capacity: int | None = None,
                   kv_dtype: torch.dtype | None = None) -> TransformerState:
        """Empty streaming state for `batch_size` slots; the ring holds `capacity` (default: context)
        steps; `kv_dtype` int8 or float8_e4m3fn makes the KV cache 8-bit (`kvcache.QuantKVCache`)."""
        capacity = capacity or self.context
        if capacity is None:
            raise ValueError("a streaming transformer needs a context or an explicit capacity")
        ref = next(p for p in self.parameters() if p.is_floating_point())  # a norm's weight: the compute dtype
        device = device or ref.device
        dtype = dtype or ref.dtype
        H = self.spec.num_heads
        # One extra row at the end: skipped slots write there, so a step writes every slot with one
        # scatter instead of a gather, a select and a scatter. Attention never reads it.
        shape = (batch_size, H, capacity + 1, self.spec.dim // H)
        layers = [make_cache(shape, device, dtype, kv_dtype) for _ in self.layers]
        return TransformerState(torch.zeros(batch_size, dtype=torch.long, device=device), layers)

    def step(self, x: torch.Tensor, state: TransformerState, active: torch.Tensor | None = None,
             window: int | None = None) -> torch.Tensor:
        """Streams T new steps: x [B, T, C] -> [B, T, C]. Slots where `active` ([B] bool) is false
        keep their state untouched (their output is computed but meaningless).

        window: attend to the first `window` cache rows only. Valid when no active slot has seen
        more than `window` steps after this one (the caller knows positions on the host), so the
        attention never reads rows no slot has filled yet.
        """
        B, T, _ = x.shape
        if active is None:
            active = torch.ones(B, dtype=torch.bool, device=x.device)
        capacity = state.layers[0].keys.shape[2] - 1  # the last row is the skipped slots' scratch
        if T > capacity:
            raise ValueError(f"cannot stream {T} steps at once into a cache of {capacity}")
        start = state.position
        q_pos = start[:, None] + torch.arange(T, device=x.device)  # [B, T]
        end = start + T * active.long()
        window = capacity if window is None else min(window, capacity)
        k_pos = ring_positions(end, capacity)[:, :window]  # [B, W]
        rows = torch.where(active[:, None], torch.remainder(q_pos, capacity), capacity)  # [B, T]
        # Skipped slots see one arbitrary row, so that no attention row is empty (no NaN).
        always = (~active)[:, None] & (torch.arange(window, device=x.device) == 0)
        cos, sin = rope_tables(q_pos, self.spec.dim // self.spec.num_heads, self.max_period)
        visible = visibility(q_pos, k_pos, self.context, always)
        bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill_(~visible, float("-inf"))

        def attend(cache: KVCache | QuantKVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k = fused.rope_pair(q, k, cos, sin)
            cache.write(rows, k, v)
            return cache.attend(q, bias, window)

        for layer, cache in zip(self.layers, state.layers):
            x = layer(x, partial(attend, cache))
        state.position.copy_(end)
        return x

