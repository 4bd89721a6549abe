"""Sampling with per-slot parameters and per-slot random streams, free of host syncs.

Each slot has its own temperature, top-k and seed. Randomness is counter-based: the uniform noise
for (seed, frame, stream, vocabulary index) comes from an integer hash, so a slot's samples depend
only on its own seed and position, never on what its neighbours do, and nothing waits on the host.
A multinomial draw is the exponential race the reference uses: argmax(p / E) with E ~ Exp(1).
"""

from __future__ import annotations

import importlib.util

import torch

from .fused import fusable

_MASK31 = (1 << 31) - 1
_MULT = 0x45D9F3B  # < 2**27, so (x < 2**31) * _MULT stays well inside int64
_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (two xorshift-multiply rounds) on int64 tensors."""
    x = ((x ^ (x >> 16)) * _MULT) & _MASK31
    x = ((x ^ (x >> 16)) * _MULT) & _MASK31
    return x ^ (x >> 16)


@fusable
def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, stream: int, size: int,
                  streams: int = 1) -> torch.Tensor:
    """Uniform noise in (0, 1), float32, a pure function of (seed [B], counter [B], stream, index):
    [B, size], or [B, streams, size] for the consecutive streams stream..stream+streams-1. Never 1.0:
    the hashes within 64 of 2**31 round to it in float32, and -log(1.0) = -0.0 would make a token the
    top-k dropped (probability 0) win the race as 0 / -0.0 = NaN (about one text draw in a thousand);
    they get the largest float below 1 instead."""
    h = _mix(seed & _MASK31)
    h = _mix(h ^ (counter & _MASK31))
    ids = torch.arange(stream, stream + streams, device=seed.device)
    h = _mix(h[:, None] ^ ids[None, :])  # [B, S]
    index = torch.arange(size, device=seed.device)
    h = _mix(h[:, :, None] ^ index)  # [B, S, size]
    u = ((h.float() + 0.5) / float(1 << 31)).clamp(max=_BELOW_ONE)
    return u[:, 0] if streams == 1 else u


# The largest top-k the sampler honours (the reference uses 25 for text, 250 for audio): a larger one
# acts as MAX_TOP_K. Its one owner: the character checks refuse more (npc_voice.characters.max_top_k).
MAX_TOP_K = 512


# How a draw (`draw_tokens`) is made. "topk": `sample` with `uniform_noise`, the k-th largest logit
# of each row found by one static top-MAX_TOP_K, a sort on the GPU (0.35 ms of a one-session tick on
# an H200 for the 9 draws). "bisect": the same, the value found bit by bit over the logits'
# order-preserving integer keys (32 counting passes that inductor can fuse into the compiled depth
# step, no sort). "kernel": the whole draw in one Triton kernel (`sample_kernel.draw`: the noise, the
# bisection, the softmax and the race), on a GPU (on a CPU only under Triton's interpreter, the
# tests; without Triton, "topk"). "auto" (the default): "kernel" on a GPU, "topk" elsewhere. All
# find the same threshold and the same noise, so the same tokens (tests/test_sample_kernel.py; the
# kernel's exp and log may differ from PyTorch's by an ulp, which could change a near tie only).
# Measured on an H200 (`tools/bench/gpu_fuse.py levers`, docs/performance.md): the same tokens as
# "topk" in 2 x 1280 draws; one draw 0.076 ms against 0.188 (text) and 0.018 against 0.150 (audio);
# a one-session tick 6.37 ms against 6.59 with "topk".
SELECT = "auto"


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 in [0, 2**32) with the floats' order (-0.0 just below +0.0)."""
    bits = x.view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)


def _from_order_key(key: torch.Tensor) -> torch.Tensor:
    bits = key - (1 << 31)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int32).view(torch.float32)


def kth_largest(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k-th largest value of each row: x [B, V] float32, k [B] long in 1..V -> [B] float32, by
    bisection on the bits of the order keys (the largest t with at least k keys >= t)."""
    keys = _order_keys(x)  # [B, V]
    found = torch.zeros_like(k)
    for bit in range(31, -1, -1):
        candidate = found | (1 << bit)
        enough = (keys >= candidate[:, None]).sum(dim=-1) >= k
        found = torch.where(enough, candidate, found)
    return _from_order_key(found)


@fusable
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           noise: torch.Tensor) -> torch.Tensor:
    """Samples one token per slot: logits [B, V], temperature [B] (<= 0: greedy), top_k [B]
    (<= 0 or above MAX_TOP_K: MAX_TOP_K), noise [B, V] uniform in (0, 1) -> [B] long."""
    logits = logits.float()
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    # Keep the top-k logits: the threshold is the k-th largest value of each row. One static
    # top-MAX_TOP_K serves every slot's k, so per-slot values need no shape change.
    kmax = min(MAX_TOP_K, logits.shape[-1])
    k = torch.where((top_k <= 0) | (top_k > kmax), torch.full_like(top_k, kmax), top_k)
    if SELECT == "bisect":
        threshold = kth_largest(scaled, k)[:, None]
    else:
        ranked = scaled.topk(kmax, dim=-1).values  # [B, kmax], descending
        threshold = ranked.gather(-1, (k - 1)[:, None])
    scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    drawn = (probs / -torch.log(noise)).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), drawn)


def draw_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, seed: torch.Tensor,
                counter: torch.Tensor, stream: int) -> torch.Tensor:
    """One draw: `sample` with the noise `uniform_noise(seed, counter, stream, V)`, logits [B, V] ->
    [B] long; in one Triton kernel where `SELECT` says so (see there)."""
    if SELECT == "kernel" or (SELECT == "auto" and logits.is_cuda):
        kernel = _sample_kernel()
        if kernel is not None and (logits.is_cuda or kernel.INTERPRETED):
            return kernel.draw_op(logits, temperature, top_k, seed, counter, stream)
    return sample(logits, temperature, top_k, uniform_noise(seed, counter, stream, logits.shape[-1]))


_TRITON = importlib.util.find_spec("triton") is not None  # where it is not, no import is tried per draw


def _sample_kernel():
    """The Triton sampler's module, or None where Triton is missing (then PyTorch's draw: the same
    tokens). Not `functools.cache`d: torch.compile traces the import (once imported, a lookup)."""
    if not _TRITON:
        return None
    try:
        from . import sample_kernel
    except ImportError:
        return None
    return sample_kernel
