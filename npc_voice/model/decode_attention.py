"""Fused decode attention over the 8-bit KV cache (Triton): one query position per slot and head.

A tick's attention is a pure read of the cache: at 64 conversations and the full context it moves
~100 GB of bf16 keys and values, most of the tick. This kernel reads the 8-bit rows (half the
bytes) and dequantizes them in registers, flash-decoding style: each (slot, head) is split over
`splits` programs that each fold a run of rows into a running max, sum and weighted value
(online softmax); a second kernel combines the splits. Row scales multiply the scores (keys) and
the probabilities (values), never the tiles. The tiles go through the tensor cores (the query
repeated over 16 rows) as fp16 made by bit operations alone ("offset" mode, the default: an int8
conversion instruction per value would cost as much as reading it), or cast ("dot"), or in float32
on the CUDA cores ("fma", also what a float32 query gets). Launch sizes are fixed by the shapes,
so a CUDA graph captures it.

On a CPU the same kernels run under Triton's interpreter (`TRITON_INTERPRET=1` before triton is
imported: the tests set it); `kvcache.attend_dequantized` is the oracle they are checked against.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .kvcache import QMAX

# How a launch is made: `mode` picks how a tile is reduced ("offset": the 8-bit rows become fp16 by
# bit operations alone, tensor-core dots; "dot": cast to the query's dtype, tensor-core dots;
# "fma": float32 on the CUDA cores); rows per tile; warps and pipeline stages per program.
# tools/bench/gpu_kv.py measures each choice on the GPU (docs/performance.md).
# Measured on an H200 (docs/results/2026-12-02-h200-kv8.jsonl): 128 rows, 4 warps, 2 stages read the
# 64-conversation cache at 2.9 TB/s (64 rows, 3 stages: 2.4; "dot": 2.3; "fma": 2.0).
# `programs`: about how many (slot, head, split) programs a launch should have (4096: a 64-session
# layer in two splits, 0.547 ms against 0.565 at 1024; 8192: 0.554).
# `fused_write`: a step's new rows quantized and stored by one kernel per layer (`write_rows`) instead
# of PyTorch's quantization and four scatters (same bytes, checked on the GPU by gpu_kv.py kernel):
# 0.45 ms off a 1-session tick, 0.7 ms off a 64-session one (H200, docs/performance.md).
# The integer modes ("imma", "imma_pv") read the cache no faster there (2.6 and 2.9 TB/s).
# `maxnreg`: a register cap per thread (None: Triton's choice). Compiled for sm_90 here
# (tools/bench/kernel_sass.py), the default launch takes 250 registers, so 2 programs share an SM,
# and its instruction count bounds it (~0.28 ms of issue for the 0.55 ms a 64-session layer takes);
# "packed" takes 178, and 168 under a cap (3 programs an SM, 16 bytes spilled). Measured on an H200
# (docs/results/2026-12-02-h200-kv8-sweep3.jsonl): "packed" 0.545-0.72 ms, a cap of 168 0.55-0.72 ms,
# against 0.548 for the default in the same sweep: within noise at best, so neither is the default.
# `tma`: the key and value tiles fetched by the Hopper tensor-memory accelerator (one bulk copy a
# tile from a descriptor, not 16-byte copies addressed by every thread: 213 registers instead of 250,
# 10 % fewer instructions), for head dims of 16-byte multiples over a contiguous cache; rows past the
# window that a tile takes in are the next rows of the cache (finite bits, masked by the bias).
# Measured on an H200 (`gpu_kv.py attention`, docs/results/2026-12-02-h200-levers.jsonl): slower at
# 64 sessions (0.63-0.67 ms at 4 warps, 1.1 at 8, against 0.545), so off. `min_tiles`: at least this
# many tiles a split (a small batch launched as one tile a program waits on each load with nothing
# to overlap): at 1 session, 8 layers' caches in one graph, 3 tiles 0.140 ms against 0.158 for 1
# (2: 0.166, 4: 0.151, 6: 0.180); a 64-session layer splits into 12-tile runs either way.
CONFIG = {"mode": os.environ.get("NPC_VOICE_DECODE_ATTENTION", "offset"), "block_n": 128, "num_warps": 4,
          "num_stages": 2, "programs": 4096, "fused_write": True, "maxnreg": None, "tma": False, "min_tiles": 3}
MODES = {"fma": 0, "dot": 1, "offset": 2, "imma": 3, "imma_pv": 4, "packed": 5}


@triton.jit
def _split_kernel(Q, K, KS, V, VS, BIAS, ACC, ML, OUT,
                  sq_b, sq_h, sk_b, sk_h, sk_n, ss_b, ss_h, sb_b, so_b, so_h,
                  H, W, sm_scale,
                  CHUNK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  SPLITS: tl.constexpr, MODE: tl.constexpr, TMA: tl.constexpr, IS_INT: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    start = split * CHUNK  # CHUNK: a whole number of tiles
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    kbase = b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
    row0 = (kbase // sk_n).to(tl.int32) + start  # TMA: the split's first row in the [rows, D] view
    sbase = b.to(tl.int64) * ss_b + h * ss_h
    # "imma" (int8 caches): the keys go into integer tensor-core dots as they are stored, against the
    # query as two int8 terms (q ~ sq * (q1 + q2 / 254): finer than fp16); "imma_pv" also the values,
    # against the probabilities as two int8 terms per tile. No per-value conversion at all.
    IMMA_K: tl.constexpr = MODE == 3 or MODE == 4
    IMMA_V: tl.constexpr = MODE == 4
    # "packed" (int8 caches on a GPU): "offset" with the bits laid out four values at a time by PTX
    # (one xor and two byte permutes per four values, as CUTLASS converts int8 to fp16)
    BITS: tl.constexpr = MODE == 2 or MODE == 5
    # "offset": an int8 x read as the fp16 bits 0x6400 | (x + 128) is x + 1152 exactly, and an e4m3
    # x moved into the fp16 fields is x / 256 exactly: one or two bit operations per value, no
    # conversion instruction; the offset comes off the dot products, the 256 goes into the scales.
    K_OFFSET: tl.constexpr = 1152.0 if (BITS and IS_INT) else 0.0
    V_OFFSET: tl.constexpr = 1152.0 if (MODE >= 2 and IS_INT) else 0.0
    MULT: tl.constexpr = 1.0 if (not BITS or IS_INT) else 256.0
    if MODE == 0:
        q = tl.load(Q + b * sq_b + h * sq_h + d, mask=dmask, other=0.0).to(tl.float32)
        m_i = -1e30
        l_i = 0.0
        acc = tl.zeros([BLOCK_D], tl.float32)
    else:  # 16 identical query rows (tl.dot's least); row 0 is kept
        q = tl.load(Q + b * sq_b + h * sq_h + tl.arange(0, 16)[:, None] * 0 + d[None, :], mask=dmask[None, :],
                    other=0.0)
        if IMMA_K:
            q1, q2, q_scale = _two_int8_terms(q.to(tl.float32))
        elif BITS:
            q = q.to(tl.float16)
        q_sum = tl.sum(q.to(tl.float32), 1)  # [16]: what the offset adds to each score
        m_i = tl.full([16], -1e30, tl.float32)
        l_i = tl.zeros([16], tl.float32)
        acc = tl.zeros([16, BLOCK_D], tl.float32)
    for n0 in range(0, CHUNK, BLOCK_N):
        n = start + n0 + tl.arange(0, BLOCK_N)
        nmask = n < W
        tile = nmask[:, None] & dmask[None, :]
        if TMA:  # K, V: descriptors of the [B * H * (S + 1), D] cache
            k = K.load([row0 + n0, 0])
        else:
            k = tl.load(K + kbase + n[:, None] * sk_n + d[None, :], mask=tile, other=0.0)
        ks = tl.load(KS + sbase + n, mask=nmask, other=0.0) * (sm_scale * MULT)
        bias = tl.load(BIAS + b * sb_b + n, mask=nmask, other=float("-inf")).to(tl.float32)
        if TMA:
            v = V.load([row0 + n0, 0])
        else:
            v = tl.load(V + kbase + n[:, None] * sk_n + d[None, :], mask=tile, other=0.0)
        vs = tl.load(VS + sbase + n, mask=nmask, other=0.0) * MULT
        if MODE == 0:
            s = tl.sum(k.to(tl.float32) * q[None, :], 1) * ks + bias  # [BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum((p * vs)[:, None] * v.to(tl.float32), 0)
        else:
            if IMMA_K:  # exact integer dots, one per query term  # [16, BLOCK_N]
                s = tl.dot(q1, tl.trans(k)).to(tl.float32) + tl.dot(q2, tl.trans(k)).to(tl.float32) * (1.0 / 254.0)
                s = s * q_scale[:, None] * ks[None, :] + bias[None, :]
            else:
                if MODE == 5:
                    k = _int8_as_fp16_packed(k)
                elif MODE == 2:
                    k = _as_fp16(k, IS_INT)
                else:
                    k = k.to(q.dtype)
                s = (tl.dot(q, tl.trans(k)) - K_OFFSET * q_sum[:, None]) * ks[None, :] + bias[None, :]  # [16, BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IMMA_V:  # the weighted probabilities as two int8 terms with a scale per tile  # [16, D]
                w1, w2, w_scale = _two_int8_terms(p * vs[None, :])
                pv_acc = tl.dot(w1, v).to(tl.float32) + tl.dot(w2, v).to(tl.float32) * (1.0 / 254.0)
                acc = acc * alpha[:, None] + pv_acc * w_scale[:, None]
            else:
                if MODE >= 2:
                    v = _int8_as_fp16_packed(v) if MODE == 5 else _as_fp16(v, IS_INT)
                    pv = (p * vs[None, :]).to(tl.float16)
                else:
                    v = v.to(q.dtype)
                    pv = (p * vs[None, :]).to(q.dtype)
                acc = acc * alpha[:, None] + tl.dot(pv, v) - V_OFFSET * tl.sum(pv.to(tl.float32), 1)[:, None]
        m_i = m_new
    if MODE != 0:  # every row holds the same numbers: keep row 0
        first = tl.arange(0, 16) == 0
        acc = tl.sum(tl.where(first[:, None], acc, 0.0), 0)
        m_i = tl.max(tl.where(first, m_i, -1e30), 0)
        l_i = tl.sum(tl.where(first, l_i, 0.0), 0)
    if SPLITS == 1:  # nothing to combine: the normalised output
        out = acc / l_i
        tl.store(OUT + b * so_b + h * so_h + d, out.to(OUT.dtype.element_ty), mask=dmask)
    else:
        tl.store(ACC + (bh * SPLITS + split) * BLOCK_D + d, acc)
        tl.store(ML + (bh * SPLITS + split) * 2, m_i)
        tl.store(ML + (bh * SPLITS + split) * 2 + 1, l_i)


@triton.jit
def _two_int8_terms(x):
    """Rows of x [M, N] (float32) as scale * (t1 + t2 / 254), t1 and t2 int8, scale [M] = the row's
    largest magnitude / 127: within 1/508 of a step of t1, finer than fp16."""
    scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-30) / 127.0
    y = x / scale[:, None]
    t1 = tl.floor(y + 0.5)
    t2 = tl.floor((y - t1) * 254.0 + 0.5)
    return t1.to(tl.int8), t2.to(tl.int8), scale


@triton.jit
def _int8_as_fp16_packed(x):
    """int8 x -> fp16 x + 1152, as `_as_fp16` makes it, four values per 32-bit register: the sign bits
    flipped by one xor, then each byte put under the exponent byte 0x64 by a byte permute."""
    return tl.inline_asm_elementwise(
        asm="{ .reg .b32 t; xor.b32 t, $2, 0x80808080; prmt.b32 $0, t, 0x64646464, 0x5140; "
            "prmt.b32 $1, t, 0x64646464, 0x7362; }",
        constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _as_fp16(x, IS_INT: tl.constexpr):
    """8-bit values as fp16 by bit operations: int8 x -> x + 1152, e4m3 x -> x / 256 (exact)."""
    bits = x.to(tl.uint8, bitcast=True).to(tl.uint16)
    if IS_INT:
        bits = bits ^ 0x6480  # 0x6400 | (x + 128): x's sign bit flipped, under fp16's 2^10 exponent
    else:
        bits = ((bits & 0x7F) << 7) | ((bits & 0x80) << 8)  # sign, then exponent and mantissa, 8 bits left
    return bits.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _combine_kernel(ACC, ML, OUT, so_b, so_h, H,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    s = tl.arange(0, BLOCK_S)
    smask = s < SPLITS
    d = tl.arange(0, BLOCK_D)
    m = tl.load(ML + (bh * SPLITS + s) * 2, mask=smask, other=-1e30)
    l = tl.load(ML + (bh * SPLITS + s) * 2 + 1, mask=smask, other=0.0)
    top = tl.max(m, 0)
    w = tl.exp(m - top)  # splits that saw no visible row have m = -1e30: weight 0
    acc = tl.load(ACC + (bh * SPLITS + s)[:, None] * BLOCK_D + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(OUT + b * so_b + h * so_h + d, out.to(OUT.dtype.element_ty), mask=d < D)


def plan(batch: int, heads: int, window: int, block_n: int | None = None, programs: int | None = None,
         min_tiles: int | None = None) -> tuple[int, int]:
    """(splits, rows per split) for a launch: about `programs` (slot, head, split) programs, each over
    a run of whole tiles of `block_n` rows (at least `min_tiles` where the window has them), none
    empty (all default to CONFIG's)."""
    block_n = block_n or CONFIG["block_n"]
    blocks = triton.cdiv(window, block_n)
    most = max(1, blocks // (min_tiles or CONFIG["min_tiles"]))
    want = min(most, max(1, triton.cdiv(programs or CONFIG["programs"], batch * heads)))
    tiles = triton.cdiv(blocks, want)
    return triton.cdiv(blocks, tiles), tiles * block_n


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
    mode = mode or CONFIG["mode"]
    block_n = CONFIG["block_n"]
    block_d = max(16, triton.next_power_of_2(D))
    if mode in ("imma", "imma_pv") and (keys.dtype != torch.int8 or min(block_d, block_n) < 32):
        mode = "offset"  # integer dots take an int8 cache, and 32-deep tiles
    if mode == "packed" and (keys.dtype != torch.int8 or not q.is_cuda):
        mode = "offset"  # PTX: an int8 cache on a GPU (Triton's interpreter runs the same numbers as "offset")
    if D < 16 or q.dtype not in (torch.bfloat16, torch.float16):
        mode = "fma"  # tensor-core dots need 16-wide tiles, and a float32 query keeps float32 math
    splits, chunk = plan(B, H, window, block_n, CONFIG["programs"])
    tma = (CONFIG["tma"] and mode != "fma" and D == block_d and D * keys.element_size() % 16 == 0
           and keys.is_contiguous() and values.is_contiguous() and keys.stride() == values.stride()
           and (not q.is_cuda or torch.cuda.get_device_capability(q.device) >= (9, 0)))
    k_arg, v_arg = keys, values
    if tma:  # one descriptor a tensor, over its rows: [B * H * (S + 1), D]
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_arg = TensorDescriptor.from_tensor(keys.view(-1, D), [block_n, D])
        v_arg = TensorDescriptor.from_tensor(values.view(-1, D), [block_n, D])
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    acc = torch.empty(B * H * splits * block_d if splits > 1 else 1, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * H * splits * 2 if splits > 1 else 1, dtype=torch.float32, device=q.device)
    if not q.is_cuda and not hasattr(_split_kernel, "rewrite"):  # an InterpretedFunction has it
        raise RuntimeError("decode attention runs on a CPU only under Triton's interpreter "
                           "(TRITON_INTERPRET=1 before triton is imported, as the tests do)")
    _split_kernel[(B * H, splits)](
        q, k_arg, key_scale, v_arg, value_scale, bias, acc, ml, out,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        key_scale.stride(0), key_scale.stride(1), bias.stride(0), out.stride(0), out.stride(1),
        H, window, 1.0 / math.sqrt(D),
        CHUNK=chunk, D=D, BLOCK_D=block_d, BLOCK_N=block_n, SPLITS=splits, MODE=MODES[mode], TMA=tma,
        IS_INT=keys.dtype == torch.int8,
        num_warps=CONFIG["num_warps"], num_stages=CONFIG["num_stages"],
        **({"maxnreg": CONFIG["maxnreg"]} if CONFIG.get("maxnreg") else {}),
    )
    if splits > 1:
        _combine_kernel[(B * H,)](acc, ml, out, out.stride(0), out.stride(1), H, D=D, BLOCK_D=block_d, SPLITS=splits,
                              BLOCK_S=triton.next_power_of_2(splits))
    return out


@triton.jit
def _quantize_row(X, Q, S, src, dst, scale_at, dmask, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """One row of D values -> 8-bit values and their scale, as `kvcache.quantize_rows` makes them."""
    x = tl.load(X + src, mask=dmask, other=0.0).to(tl.float32)
    # the scale times the reciprocal, then an IEEE-rounded division (Triton's `/` may be approximate),
    # as `kvcache.quantize_rows` computes them, so both store the same bytes
    scale = tl.maximum(tl.max(tl.abs(x), 0) * (1.0 / QMAX), 1e-30)
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
    if IS_INT:  # round half to even, as torch.round
        r = tl.floor(y + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        y = tl.where(((r - y) == 0.5) & odd, r - 1.0, r)
    tl.store(Q + dst, y.to(Q.dtype.element_ty), mask=dmask)
    tl.store(S + scale_at, scale)


@triton.jit
def _write_kernel(NK, NV, ROWS, SLOTS, K, KS, V, VS,
                  sn_b, sn_h, sn_t, sv_b, sv_h, sv_t, sk_b, sk_h, sk_n, ss_b, ss_h, H, T,
                  QMAX: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, IS_INT: tl.constexpr,
                  HAS_SLOTS: tl.constexpr):
    pid = tl.program_id(0)  # one (batch entry, head, position)
    t = pid % T
    b = pid // T // H
    h = pid // T % H
    row = tl.load(ROWS + b * T + t)
    if HAS_SLOTS:  # the cache slot of batch entry b
        slot = tl.load(SLOTS + b).to(tl.int64)
    else:
        slot = b.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    dst = slot * sk_b + h.to(tl.int64) * sk_h + row * sk_n + d
    scale_at = slot * ss_b + h * ss_h + row
    _quantize_row(NK, K, KS, b * sn_b + h * sn_h + t * sn_t + d, dst, scale_at, dmask, QMAX, IS_INT)
    _quantize_row(NV, V, VS, b * sv_b + h * sv_h + t * sv_t + d, dst, scale_at, dmask, QMAX, IS_INT)


def write_rows(rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, key_scale: torch.Tensor,
               values: torch.Tensor, value_scale: torch.Tensor, slots: torch.Tensor | None = None) -> None:
    """k, v [B, H, T, D] quantized into ring rows [B, T] of an 8-bit cache (keys/values [S_b, H, S + 1, D],
    scales [S_b, H, S + 1]): what `QuantKVCache.write` does in PyTorch, in one launch. `slots` [B] long:
    the cache slot each batch entry goes to (default: entry b to slot b; an install writes one slot)."""
    B, H, T, D = k.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1 or keys.stride(-1) != 1 or key_scale.stride(-1) != 1:
        raise ValueError("write_rows needs the rows contiguous in their last dim")
    if keys.stride() != values.stride() or key_scale.stride() != value_scale.stride():
        raise ValueError("write_rows needs keys and values (and their scales) laid out alike")
    _write_kernel[(B * H * T,)](
        k, v, rows.contiguous(), rows if slots is None else slots, keys, key_scale, values, value_scale,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), key_scale.stride(0), key_scale.stride(1), H, T,
        QMAX=QMAX[keys.dtype], D=D, BLOCK_D=triton.next_power_of_2(D), IS_INT=keys.dtype == torch.int8,
        HAS_SLOTS=slots is not None,
    )
