"""Causal 1-d convolutions for Mimi, run on a whole clip or streamed with per-slot state.

A causal conv with effective kernel K and stride S pads K - S steps on the left, never on the right,
so T input steps (a multiple of S) give exactly T / S outputs. Streaming keeps those K - S steps of
left context per slot; a transposed conv keeps the K - S output steps that overlap the next chunk.
Both give the whole-clip result chunk by chunk (up to float rounding).

Module nesting (`conv.conv.weight`, `convtr.convtr.weight`) mirrors the checkpoint's key names: the
reference wrapped each conv in a weight-norm holder that was folded away before export.

Each conv runs either as PyTorch's conv (cuDNN on a GPU) or as a matrix product (`CONV`, below).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..streaming import StreamState, state_field, where_active

PadMode = Literal["constant", "replicate"]

# How the convs run: "cudnn" (PyTorch's conv1d / conv_transpose1d), "gemm" (the same sums as one
# matrix product: im2col by strided views, one matmul with the bias folded in, and for a transposed
# conv an overlap-add of its taps), or "auto": gemm on CUDA inside a torch.compile region (the tick's
# compiled Mimi steps, `engine.step.COMPILE`), cudnn elsewhere (the CPU path, CI and the golden tests
# exactly today's; eager GPU work such as encoding a voice sample keeps cuDNN's kernels for long
# clips). Why: on an H200 a one-session tick (CUDA graphs, Mimi in bf16 compiled by inductor) spent
# ~0.21-0.3 ms in 39 cuDNN `nchwToNhwc` layout conversions around the small convs; as plain GEMMs
# inductor fuses the gather, bias and activation and needs no layout change (measured by
# `tools/bench/gpu_fuse.py levers`). Grouped convs (other than the written-out depthwise upsampling)
# and transposed convs whose kernel is not a multiple of the stride stay on cudnn. Read at every call
# (tests monkeypatch it); `NPC_VOICE_MIMI_CONV` overrides at import.
CONV_MODES = ("auto", "cudnn", "gemm")
CONV = os.environ.get("NPC_VOICE_MIMI_CONV", "auto")
if CONV not in CONV_MODES:
    raise ValueError(f"NPC_VOICE_MIMI_CONV must be one of {', '.join(CONV_MODES)}, got {CONV!r}")


def conv_mode(device: torch.device) -> str:
    """What `CONV` means for tensors on `device`: "cudnn" or "gemm"."""
    if CONV not in CONV_MODES:
        raise ValueError(f"convs.CONV must be one of {', '.join(CONV_MODES)}, got {CONV!r}")
    if CONV == "auto":
        return "gemm" if device.type == "cuda" and torch.compiler.is_compiling() else "cudnn"
    return CONV


def conv1d_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
                dilation: int = 1) -> torch.Tensor:
    """F.conv1d(x, weight, bias, stride, dilation=dilation) (no padding, groups 1) as one matmul:
    x [B, C_in, L], weight [C_out, C_in, K] -> [B, C_out, T_out], T_out = (L - K_eff) // S + 1."""
    C_out, C_in, K = weight.shape
    if K == 1:  # a 1x1 conv is a matmul on the (strided) steps
        cols = x[..., ::stride].transpose(1, 2)  # [B, T_out, C_in]
    else:
        windows = x.unfold(-1, (K - 1) * dilation + 1, stride)[..., ::dilation]  # [B, C_in, T_out, K], a view
        cols = windows.transpose(1, 2).flatten(2)  # [B, T_out, C_in * K], (channel, tap) as in the weight
    return F.linear(cols, weight.reshape(C_out, C_in * K), bias).transpose(1, 2)  # [B, C_out, T_out]


def conv_transpose1d_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          stride: int) -> torch.Tensor:
    """F.conv_transpose1d(x, weight, bias, stride) (no padding, groups 1, K a multiple of S) as one
    matmul and an overlap-add: x [B, C_in, T], weight [C_in, C_out, K] -> [B, C_out, (T - 1) * S + K]."""
    C_in, C_out, K = weight.shape
    B, T, S = x.shape[0], x.shape[-1], stride
    n = K // S  # input step t writes output blocks t .. t + n - 1, each S steps long
    taps = (x.transpose(1, 2) @ weight.reshape(C_in, C_out * K)).view(B, T, C_out, n, S)  # [B, T, C_out, n, S]
    blocks = F.pad(taps[:, :, :, 0], (0, 0, 0, 0, 0, n - 1))  # [B, T + n - 1, C_out, S]
    for j in range(1, n):
        blocks = blocks + F.pad(taps[:, :, :, j], (0, 0, 0, 0, j, n - 1 - j))
    y = blocks.permute(0, 2, 1, 3).flatten(2)  # [B, C_out, (T + n - 1) * S]
    return y if bias is None else y + bias[:, None]


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
        return self._conv(x)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> ConvState:
        previous = torch.zeros(batch_size, self.conv.conv.in_channels, self.context, device=device, dtype=dtype)
        return ConvState(previous, torch.ones(batch_size, dtype=torch.bool, device=device))

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """The unpadded conv, x [B, C_in, L] -> [B, C_out, (L - K_eff) / S + 1], as `CONV` says."""
        c = self.conv.conv
        if c.groups == 1 and conv_mode(x.device) == "gemm":
            return conv1d_gemm(x, c.weight, c.bias, c.stride[0], c.dilation[0])
        return self.conv(x)

    def step(self, x: torch.Tensor, state: ConvState, active: torch.Tensor | None = None) -> torch.Tensor:
        """One chunk: x [B, C_in, T] (T a multiple of the stride, >= context) -> [B, C_out, T / S]."""
        pad = self.context
        if not pad:
            return self._conv(x)
        active = _active_or_all(active, x)
        previous = state.previous
        if self.pad_mode == "replicate":
            # A fresh stream's left context is its first sample repeated, as F.pad(mode="replicate").
            previous = torch.where(state.first[:, None, None], x[..., :1].expand_as(previous), previous)
        x = torch.cat([previous, x], dim=-1)  # [B, C_in, pad + T]
        y = self._conv(x)
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
        kernel (`dgrad_engine`) of 0.32 ms, most likely this one, for 128 KB of work. Any other one
        runs as `CONV` says (gemm only for groups 1 and K a multiple of S)."""
        c = self.convtr.convtr
        S, K = c.stride[0], c.kernel_size[0]
        if not (c.groups == c.in_channels == c.out_channels and K == 2 * S and c.bias is None):
            if c.groups == 1 and K % S == 0 and conv_mode(x.device) == "gemm":
                return conv_transpose1d_gemm(x, c.weight, c.bias, S)
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
