"""Causal 1-d convolutions for Mimi, run on a whole clip or streamed with per-slot state.

A causal conv with effective kernel K and stride S pads K - S steps on the left, never on the right,
so T input steps (a multiple of S) give exactly T / S outputs. Streaming keeps those K - S steps of
left context per slot; a transposed conv keeps the K - S output steps that overlap the next chunk.
Both give the whole-clip result chunk by chunk (up to float rounding).

Module nesting (`conv.conv.weight`, `convtr.convtr.weight`) mirrors the checkpoint's key names: the
reference wrapped each conv in a weight-norm holder that was folded away before export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..streaming import StreamState, state_field, where_active

PadMode = Literal["constant", "replicate"]


@dataclass
class ConvState(StreamState):
    previous: torch.Tensor  # [B, C_in, K_eff - S]: the last input steps, the next chunk's left context
    first: torch.Tensor = state_field(True)  # [B] bool: no chunk seen yet (replicate padding pending)


@dataclass
class ConvTrState(StreamState):
    partial: torch.Tensor  # [B, C_out, K - S]: overlap-add tail owed to the next chunk, bias excluded


def _active_or_all(active: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if active is None:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return active


class NormConv1d(nn.Module):
    """Holder whose only child is the conv (checkpoint key `<name>.conv.weight`)."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class NormConvTranspose1d(nn.Module):
    """Holder whose only child is the transposed conv (checkpoint key `<name>.convtr.weight`)."""

    def __init__(self, convtr: nn.ConvTranspose1d):
        super().__init__()
        self.convtr = convtr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convtr(x)


class StreamingConv1d(nn.Module):
    """Causal Conv1d: left padding K_eff - S (zeros, or the first sample repeated), no right padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, pad_mode: PadMode = "constant"):
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"unsupported pad_mode {pad_mode!r}")
        self.pad_mode = pad_mode
        self.conv = NormConv1d(nn.Conv1d(in_channels, out_channels, kernel_size, stride,
                                         dilation=dilation, groups=groups, bias=bias))

    @property
    def stride(self) -> int:
        return self.conv.conv.stride[0]

    @property
    def context(self) -> int:
        """Steps of left context a chunk needs: effective kernel minus stride."""
        c = self.conv.conv
        return (c.kernel_size[0] - 1) * c.dilation[0] + 1 - c.stride[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole clip: x [B, C_in, T] (T a multiple of the stride) -> [B, C_out, T / S]."""
        pad = self.context
        if pad:
            x = F.pad(x, (pad, 0), mode=self.pad_mode)
        return self.conv(x)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> ConvState:
        previous = torch.zeros(batch_size, self.conv.conv.in_channels, self.context, device=device, dtype=dtype)
        return ConvState(previous, torch.ones(batch_size, dtype=torch.bool, device=device))

    def step(self, x: torch.Tensor, state: ConvState, active: torch.Tensor | None = None) -> torch.Tensor:
        """One chunk: x [B, C_in, T] (T a multiple of the stride, >= context) -> [B, C_out, T / S]."""
        pad = self.context
        if not pad:
            return self.conv(x)
        active = _active_or_all(active, x)
        previous = state.previous
        if self.pad_mode == "replicate":
            # A fresh stream's left context is its first sample repeated, as F.pad(mode="replicate").
            previous = torch.where(state.first[:, None, None], x[..., :1].expand_as(previous), previous)
        x = torch.cat([previous, x], dim=-1)  # [B, C_in, pad + T]
        y = self.conv(x)
        state.previous.copy_(where_active(active, x[..., -pad:], state.previous))
        state.first.logical_and_(~active)
        return y


class StreamingConvTranspose1d(nn.Module):
    """Causal ConvTranspose1d: the K - S trailing output steps are trimmed (whole clip) or carried
    over to the next chunk (streaming)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        self.convtr = NormConvTranspose1d(nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride,
                                                             groups=groups, bias=bias))

    @property
    def overlap(self) -> int:
        c = self.convtr.convtr
        return c.kernel_size[0] - c.stride[0]

    def _transposed(self, x: torch.Tensor) -> torch.Tensor:
        """The transposed conv, x [B, C_in, T] -> [B, C_out, (T - 1) * S + K]. A depthwise one of
        kernel 2 * S (Mimi's upsampling) is two products and an overlap-add, written out (and fused
        when compiled): a 64-session step's profile on an H200 showed one generic cuDNN transposed-conv
        kernel (`dgrad_engine`) of 0.32 ms, most likely this one, for 128 KB of work."""
        c = self.convtr.convtr
        S, K = c.stride[0], c.kernel_size[0]
        if not (c.groups == c.in_channels == c.out_channels and K == 2 * S and c.bias is None):
            return c(x)
        taps = x[..., None] * c.weight[:, 0][None, :, None, :]  # [B, C, T, K]
        head, tail = taps[..., :S], taps[..., S:]  # to output blocks t and t + 1
        blocks = F.pad(head, (0, 0, 0, 1)) + F.pad(tail, (0, 0, 1, 0))  # [B, C, T + 1, S]
        return blocks.flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole clip: x [B, C_in, T] -> [B, C_out, T * S]."""
        y = self._transposed(x)  # [B, C_out, (T - 1) * S + K]
        return y[..., : y.shape[-1] - self.overlap]

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> ConvTrState:
        c = self.convtr.convtr
        return ConvTrState(torch.zeros(batch_size, c.out_channels, self.overlap, device=device, dtype=dtype))

    def step(self, x: torch.Tensor, state: ConvTrState, active: torch.Tensor | None = None) -> torch.Tensor:
        """One chunk: x [B, C_in, T] -> [B, C_out, T * S]."""
        y = self._transposed(x)  # [B, C_out, T * S + overlap]
        tail = self.overlap
        if not tail:
            return y
        active = _active_or_all(active, x)
        y = torch.cat([y[..., :tail] + state.partial, y[..., tail:]], dim=-1)
        carry = y[..., -tail:]
        bias = self.convtr.convtr.bias
        if bias is not None:
            # The bias is added once, by the chunk that emits the step, not by the one that started it.
            carry = carry - bias[:, None]
        state.partial.copy_(where_active(active, carry, state.partial))
        return y[..., :-tail]


class ConvDownsample1d(nn.Module):
    """Learnt downsampling by `stride` (encoder rate -> frame rate): conv of kernel 2 * stride,
    replicate padding, no bias. Checkpoint key `conv.conv.conv.weight`."""

    def __init__(self, stride: int, dimension: int):
        super().__init__()
        self.conv = StreamingConv1d(dimension, dimension, 2 * stride, stride, bias=False, pad_mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C, T / stride]
        return self.conv(x)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> ConvState:
        return self.conv.init_state(batch_size, device, dtype)

    def step(self, x: torch.Tensor, state: ConvState, active: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv.step(x, state, active)


class ConvTrUpsample1d(nn.Module):
    """Learnt upsampling by `stride` (frame rate -> decoder rate): transposed conv of kernel 2 * stride,
    no bias. `channel_wise=True` (the released Mimi, `upsample_channel_wise_bug`) makes it depthwise:
    groups = dimension, weight [C, 1, K]. Checkpoint key `convtr.convtr.convtr.weight`."""

    def __init__(self, stride: int, dimension: int, channel_wise: bool = True):
        super().__init__()
        groups = dimension if channel_wise else 1
        self.convtr = StreamingConvTranspose1d(dimension, dimension, 2 * stride, stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C, T * stride]
        return self.convtr(x)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> ConvTrState:
        return self.convtr.init_state(batch_size, device, dtype)

    def step(self, x: torch.Tensor, state: ConvTrState, active: torch.Tensor | None = None) -> torch.Tensor:
        return self.convtr.step(x, state, active)
