"""The sampler in one Triton kernel: a slot's whole draw (noise, top-k, softmax, race) per program.

A tick draws 9 tokens per session (the text token, then 8 audio codebooks one after the other). In
PyTorch (`sampling.sample` with `sampling.uniform_noise`) each draw is a sort (`topk`: ~0.35 ms of
a 7 ms one-session tick on an H200 for the 9 draws) and a dozen small kernels. Here one program per
row does what those kernels do, with the same numbers:
- greedy (temperature <= 0): the first index of the largest logit;
- else the logits divided by the temperature (IEEE division, as PyTorch's), the k-th largest found
  exactly by 32 bisection steps over the values' 32-bit order keys, held in registers (BLOCK = the
  vocabulary rounded up to a power of two: 32768 for text, 2048 for audio; a count per step, no
  sort: `sampling.kth_largest`, bit for bit), then, in chunks of the row read again, the softmax
  over the values >= it and the exponential race argmax(p / -log(u)) with u the counter-based noise
  of `sampling.uniform_noise`, hashed here in uint32 (its 31-bit products keep only the low 31 bits,
  which uint32 products give as well).
Ties and NaNs resolve as `torch.argmax` resolves them (first index; a NaN wins, as it would in
PyTorch: a NaN logit; the noise itself stays below 1.0, so 0 / -0.0 never arises). exp and log
are libdevice's on a GPU (CUDA's expf and logf, as PyTorch's kernels and inductor's use): Triton's
`tl.exp` there is a faster approximation that could change a near tie. Only the sum in the softmax
adds in another order than PyTorch's: an ulp, a near tie again.

On a CPU the kernel runs only under Triton's interpreter (the tests), where libdevice is not
available: numpy's exp and log stand in, an ulp or two from PyTorch's, so the draws match but for a
near tie (none in the tests). The PyTorch path remains the CPU's (`sampling.draw_tokens`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import sampling
from .sampling import MAX_TOP_K

# The hash's and the noise's constants, owned by `sampling` (the PyTorch path the kernel must equal).
_MULT = tl.constexpr(sampling._MULT)
_MASK31 = tl.constexpr(sampling._MASK31)
_BELOW_ONE = tl.constexpr(sampling._BELOW_ONE)
_INV_2_31 = tl.constexpr(1.0 / (1 << 31))

# Warps per program by block size (blocks up to `small_block`: the audio rows): a program holds its
# row's order keys in registers through the bisection, so the text row (32768) needs many threads;
# `chunk`: lanes per step of the softmax and race. Compiled for sm_90 with Triton 3.9: audio, 4
# warps: 153 registers, no spill; text, 16 warps: 128 registers and 632 bytes of spills (32 warps: 64
# and 296). On an H200 (docs/results/2026-12-02-h200-levers-ticks.jsonl) one draw takes 0.076 ms
# (text) and 0.018 ms (audio) with these, against 0.188 and 0.150 for PyTorch's sort and kernels.
CONFIG = {"small_block": 4096, "num_warps_small": 4, "num_warps_large": 16, "chunk": 4096}


@triton.jit
def _mix(x):
    """`sampling._mix` on uint32 values < 2**31."""
    x = ((x ^ (x >> 16)) * _MULT) & _MASK31
    x = ((x ^ (x >> 16)) * _MULT) & _MASK31
    return x ^ (x >> 16)


@triton.jit
def _row_hash(seed, counter, stream):
    """`sampling.uniform_noise`'s hash of (seed, counter: int scalars, stream: int32), before the index."""
    h = _mix((seed & _MASK31).to(tl.uint32))
    h = _mix(h ^ (counter & _MASK31).to(tl.uint32))
    return _mix(h ^ stream.to(tl.uint32))  # stream: never specialised (an int 1 would be a constexpr)


@triton.jit
def _uniform(h, index):
    """`sampling.uniform_noise` at `index` (int32 block) of the row whose hash is `h`: float32 in
    (0, 1), bit for bit (h < 2**31 is exact in int32, rounded to float32 as torch rounds it, times
    2**-31 exactly as torch's division, and kept below 1.0 as there)."""
    h = _mix(h ^ index.to(tl.uint32))
    return tl.minimum((h.to(tl.int32).to(tl.float32) + 0.5) * _INV_2_31, _BELOW_ONE)


@triton.jit
def _from_key(key):
    """The float32 of an order key (uint32)."""
    return tl.where((key >> 31) != 0, key ^ 0x80000000, ~key).to(tl.float32, bitcast=True)


@triton.jit
def _scaled(row, lanes, V, temperature):
    """The logits at `lanes` (-inf past V) in float32, divided by the temperature as `sample` divides."""
    x = tl.load(row + lanes, mask=lanes < V, other=float("-inf")).to(tl.float32)
    return tl.math.div_rn(x, tl.zeros_like(x) + temperature)


@triton.jit
def _exp(x, ACCURATE: tl.constexpr):
    if ACCURATE:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def _log(x, ACCURATE: tl.constexpr):
    if ACCURATE:
        return libdevice.log(x)
    return tl.log(x)


@triton.jit(do_not_specialize=["stream"])  # one compilation for the 8 audio streams
def _draw_kernel(LOGITS, TEMP, TOPK, SEED, COUNTER, OUT, V, stride, stream, kmax,
                 BLOCK: tl.constexpr, CHUNK: tl.constexpr, ACCURATE: tl.constexpr):
    b = tl.program_id(0)
    row = LOGITS + b.to(tl.int64) * stride
    lanes = tl.arange(0, BLOCK)
    temperature = tl.load(TEMP + b)
    if temperature <= 0:  # greedy: `torch.argmax`, the first NaN if any, else the first largest
        x = tl.load(row + lanes, mask=lanes < V, other=float("-inf")).to(tl.float32)  # [BLOCK]
        nan = x != x
        first_nan = tl.min(tl.where(nan, lanes, BLOCK), axis=0)
        top = tl.max(tl.where(nan, float("-inf"), x), axis=0)
        token = tl.where(first_nan < BLOCK, first_nan, tl.min(tl.where(x == top, lanes, BLOCK), axis=0))
    else:
        # The k-th largest by bisection over order keys (uint32, the floats' order): the largest key
        # t with at least k keys >= t. Padded lanes get key 0, below every candidate (all >= 1).
        bits = _scaled(row, lanes, V, temperature).to(tl.uint32, bitcast=True)
        keys = tl.where(lanes < V, tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000), 0)  # [BLOCK]
        k = tl.load(TOPK + b)
        k = tl.where((k <= 0) | (k > kmax), kmax, k).to(tl.int32)
        found = tl.zeros([], tl.uint32)
        for i in tl.static_range(32):
            candidate = found | (1 << (31 - i))
            enough = tl.sum((keys >= candidate).to(tl.int32), axis=0) >= k
            found = tl.where(enough, candidate, found)
        threshold = _from_key(found)
        top = _from_key(tl.max(keys, axis=0))  # the largest value (always kept)
        # The rest in chunks of CHUNK lanes, the row read and divided again (the same values): only
        # the keys ever span the row in registers. Per-lane partial sums and running argmaxes, one
        # reduction each at the end. Kept: `threshold <= value` as floats (-0.0 and +0.0 alike).
        sums = tl.zeros([CHUNK], tl.float32)
        for c0 in range(0, V, CHUNK):
            c = c0 + tl.arange(0, CHUNK)
            s = _scaled(row, c, V, temperature)
            sums += tl.where((c < V) & (s >= threshold), _exp(s - top, ACCURATE), 0.0)
        total = tl.sum(sums, axis=0)
        h = _row_hash(tl.load(SEED + b), tl.load(COUNTER + b), stream)
        best = tl.full([CHUNK], float("-inf"), tl.float32)
        best_at = tl.full([CHUNK], BLOCK, tl.int32)
        nan_at = tl.full([CHUNK], BLOCK, tl.int32)
        for c0 in range(0, V, CHUNK):
            c = c0 + tl.arange(0, CHUNK)
            s = _scaled(row, c, V, temperature)
            e = tl.where((c < V) & (s >= threshold), _exp(s - top, ACCURATE), 0.0)
            probs = tl.math.div_rn(e, tl.zeros_like(e) + total)
            score = tl.math.div_rn(probs, -_log(_uniform(h, c), ACCURATE))  # the race: probs / Exp(1)
            # `torch.argmax`: a NaN wins (a NaN logit), else the first largest
            nan_at = tl.where((score != score) & (nan_at == BLOCK) & (c < V), c, nan_at)
            better = (c < V) & ((score > best) | (best_at == BLOCK))
            best = tl.where(better, score, best)
            best_at = tl.where(better, c, best_at)
        first_nan = tl.min(nan_at, axis=0)
        top_score = tl.max(best, axis=0)
        token = tl.where(first_nan < BLOCK, first_nan, tl.min(tl.where(best == top_score, best_at, BLOCK), axis=0))
    tl.store(OUT + b, token.to(tl.int64))


@triton.jit(do_not_specialize=["stream"])
def _noise_kernel(SEED, COUNTER, OUT, size, stream, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    lanes = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    u = _uniform(_row_hash(tl.load(SEED + b), tl.load(COUNTER + b), stream), lanes)
    tl.store(OUT + b.to(tl.int64) * size + lanes, u, mask=lanes < size)


INTERPRETED = hasattr(_draw_kernel, "rewrite")  # an InterpretedFunction has it: numpy's exp and log


def _check(t: torch.Tensor) -> None:
    if not t.is_cuda and not INTERPRETED:
        raise RuntimeError("the sampling kernel runs on a CPU only under Triton's interpreter "
                           "(TRITON_INTERPRET=1 before triton is imported, as the tests do)")


def draw(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, seed: torch.Tensor,
         counter: torch.Tensor, stream: int) -> torch.Tensor:
    """`sampling.sample(logits, temperature, top_k, sampling.uniform_noise(seed, counter, stream, V))`
    in one launch: logits [B, V] (any float dtype), temperature [B] float32, top_k, seed, counter
    [B] long -> [B] long."""
    _check(logits)
    B, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    block = triton.next_power_of_2(V)
    warps = CONFIG["num_warps_small"] if block <= CONFIG["small_block"] else CONFIG["num_warps_large"]
    _draw_kernel[(B,)](logits, temperature.float().contiguous(), top_k.contiguous(), seed.contiguous(),
                       counter.contiguous(), out, V, logits.stride(0), stream, min(MAX_TOP_K, V),
                       BLOCK=block, CHUNK=min(block, CONFIG["chunk"]), ACCURATE=not INTERPRETED, num_warps=warps)
    return out


def noise(seed: torch.Tensor, counter: torch.Tensor, stream: int, size: int) -> torch.Tensor:
    """The noise `draw` races with, as the kernel computes it: [B, size] float32 (for the tests:
    equal to `sampling.uniform_noise(seed, counter, stream, size)`)."""
    _check(seed)
    out = torch.empty(seed.shape[0], size, dtype=torch.float32, device=seed.device)
    block = min(1024, triton.next_power_of_2(size))
    _noise_kernel[(seed.shape[0], triton.cdiv(size, block))](seed.contiguous(), counter.contiguous(), out, size,
                                                             stream, BLOCK=block)
    return out


# The kernel as an operator of its own, so that torch.compile (`step.COMPILE`'s depth step) keeps it
# whole in a compiled region instead of tracing into Triton's launcher.
@torch.library.custom_op("npc_voice::draw", mutates_args=())
def draw_op(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, seed: torch.Tensor,
            counter: torch.Tensor, stream: int) -> torch.Tensor:
    return draw(logits, temperature, top_k, seed, counter, stream)


@draw_op.register_fake
def _(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, seed: torch.Tensor,
      counter: torch.Tensor, stream: int) -> torch.Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.long)
