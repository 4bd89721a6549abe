"""Fused decode attention over the 8-bit KV cache (Triton): one query position per slot and head.

A tick's attention is a pure read of the cache: at 64 conversations and the full context it moves
~100 GB of bf16 keys and values, most of the tick. This kernel reads the 8-bit rows (half the
bytes) and dequantizes them in registers, flash-decoding style: each (slot, head) is split over
`splits` programs that each fold a run of rows into a running max, sum and weighted value
(online softmax); a second kernel combines the splits. Row scales multiply the scores (keys) and
the probabilities (values), never the tiles. `mode` picks how a tile is reduced: "dot" on the
tensor cores (the query repeated over 16 rows, tiles cast to the query's dtype), "fma" in float32
on the CUDA cores. Launch sizes are fixed by the shapes, so a CUDA graph captures it.

On a CPU the same kernels run under Triton's interpreter (`TRITON_INTERPRET=1` before triton is
imported: the tests set it); `kvcache.attend_dequantized` is the oracle they are checked against.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # cache rows per tile
TARGET_PROGRAMS = 1024  # enough (slot, head, split) programs to fill an H100/H200 (132 SMs)
MODE = os.environ.get("NPC_VOICE_DECODE_ATTENTION", "dot")  # "dot" | "fma" (benchmarks compare them)


@triton.jit
def _split_kernel(Q, K, KS, V, VS, BIAS, ACC, ML, OUT,
                  sq_b, sq_h, sk_b, sk_h, sk_n, ss_b, ss_h, sb_b, so_b, so_h,
                  H, W, sm_scale,
                  CHUNK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                  DOT: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    start = split * CHUNK  # CHUNK: a whole number of tiles
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    kbase = b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
    sbase = b.to(tl.int64) * ss_b + h * ss_h
    if DOT:  # 16 identical query rows: tl.dot needs 16; row 0 is stored
        m_rows = tl.arange(0, 16)
        q = tl.load(Q + b * sq_b + h * sq_h + m_rows[:, None] * 0 + d[None, :], mask=dmask[None, :], other=0.0)
        m_i = tl.full([16], -1e30, tl.float32)
        l_i = tl.zeros([16], tl.float32)
        acc = tl.zeros([16, BLOCK_D], tl.float32)
    else:
        q = tl.load(Q + b * sq_b + h * sq_h + d, mask=dmask, other=0.0).to(tl.float32)
        m_i = -1e30
        l_i = 0.0
        acc = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, CHUNK, BLOCK_N):
        n = start + n0 + tl.arange(0, BLOCK_N)
        nmask = n < W
        tile = nmask[:, None] & dmask[None, :]
        k = tl.load(K + kbase + n[:, None] * sk_n + d[None, :], mask=tile, other=0.0)
        ks = tl.load(KS + sbase + n, mask=nmask, other=0.0)
        bias = tl.load(BIAS + b * sb_b + n, mask=nmask, other=float("-inf")).to(tl.float32)
        v = tl.load(V + kbase + n[:, None] * sk_n + d[None, :], mask=tile, other=0.0)
        vs = tl.load(VS + sbase + n, mask=nmask, other=0.0)
        if DOT:
            s = tl.dot(q, tl.trans(k.to(q.dtype))) * (ks * sm_scale)[None, :] + bias[None, :]  # [16, BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot((p * vs[None, :]).to(q.dtype), v.to(q.dtype))
        else:
            s = tl.sum(k.to(tl.float32) * q[None, :], 1) * (ks * sm_scale) + bias  # [BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum((p * vs)[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    if DOT:  # every row holds the same numbers: keep row 0
        first = tl.arange(0, 16)[:, None] == 0
        acc = tl.sum(tl.where(first, acc, 0.0), 0)
        m_i = tl.max(tl.where(tl.arange(0, 16) == 0, m_i, -1e30), 0)
        l_i = tl.sum(tl.where(tl.arange(0, 16) == 0, l_i, 0.0), 0)
    if SPLITS == 1:  # nothing to combine: the normalised output
        out = acc / l_i
        tl.store(OUT + b * so_b + h * so_h + d, out.to(OUT.dtype.element_ty), mask=dmask)
    else:
        tl.store(ACC + (bh * SPLITS + split) * BLOCK_D + d, acc)
        tl.store(ML + (bh * SPLITS + split) * 2, m_i)
        tl.store(ML + (bh * SPLITS + split) * 2 + 1, l_i)


@triton.jit
def _combine_kernel(ACC, ML, OUT, so_b, so_h, H,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    m = tl.load(ML + (bh * SPLITS + s) * 2)
    l = tl.load(ML + (bh * SPLITS + s) * 2 + 1)
    top = tl.max(m, 0)
    w = tl.exp(m - top)  # splits that saw no visible row have m = -1e30: weight 0
    acc = tl.load(ACC + (bh * SPLITS + s)[:, None] * BLOCK_D + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(OUT + b * so_b + h * so_h + d, out.to(OUT.dtype.element_ty), mask=d < D)


def plan(batch: int, heads: int, window: int, block_n: int = BLOCK_N) -> tuple[int, int]:
    """(splits, rows per split) for a launch: a power of two of splits so that there are about
    TARGET_PROGRAMS programs, each over whole tiles."""
    blocks = triton.cdiv(window, block_n)
    want = max(1, triton.cdiv(TARGET_PROGRAMS, batch * heads))
    splits = 1 << (min(want, blocks).bit_length() - 1)  # the largest power of two <= both
    return splits, triton.cdiv(blocks, splits) * block_n


def decode_attention(q: torch.Tensor, keys: torch.Tensor, key_scale: torch.Tensor, values: torch.Tensor,
                     value_scale: torch.Tensor, bias: torch.Tensor, window: int, mode: str | None = None) -> torch.Tensor:
    """q [B, H, 1, D] over the first `window` rows of an 8-bit cache (keys/values [B, H, S + 1, D],
    scales [B, H, S + 1] float32), masked by the additive `bias` [B, 1, 1, window] -> [B, H, 1, D]
    in q's dtype. Scores are scaled by 1/sqrt(D), as PyTorch's attention does."""
    B, H, T, D = q.shape
    if T != 1:
        raise ValueError(f"decode attention takes one query position, got {T}")
    if keys.stride(-1) != 1 or key_scale.stride(-1) != 1 or bias.stride(-1) != 1:
        raise ValueError("decode attention needs the cache rows, scales and bias contiguous in their last dim")
    mode = mode or MODE
    dot = mode == "dot" and q.dtype in (torch.bfloat16, torch.float16) and D >= 16
    block_d = max(16, triton.next_power_of_2(D))
    splits, chunk = plan(B, H, window)
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    acc = torch.empty(B * H * splits * block_d if splits > 1 else 1, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * H * splits * 2 if splits > 1 else 1, dtype=torch.float32, device=q.device)
    if not q.is_cuda and not hasattr(_split_kernel, "rewrite"):  # an InterpretedFunction has it
        raise RuntimeError("decode attention runs on a CPU only under Triton's interpreter "
                           "(TRITON_INTERPRET=1 before triton is imported, as the tests do)")
    _split_kernel[(B * H, splits)](
        q, keys, key_scale, values, value_scale, bias, acc, ml, out,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        key_scale.stride(0), key_scale.stride(1), bias.stride(0), out.stride(0), out.stride(1),
        H, window, 1.0 / math.sqrt(D),
        CHUNK=chunk, D=D, BLOCK_D=block_d, BLOCK_N=BLOCK_N, SPLITS=splits, DOT=dot,
    )
    if splits > 1:
        _combine_kernel[(B * H,)](acc, ml, out, out.stride(0), out.stride(1), H, D=D, BLOCK_D=block_d, SPLITS=splits)
    return out
