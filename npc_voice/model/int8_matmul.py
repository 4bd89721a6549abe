"""int8 weights times bf16 activations in one Triton kernel (`--weights-dtype int8` on a GPU).

A conversation's tick multiplies a few rows of activations (1-128 sessions) by every matrix of the
7B model: at that size a product is a read of the matrix, so int8 weights (half of bf16's bytes)
should take half the time. Dequantizing the matrix to bf16 first (the portable path,
`quant.Int8Weight.linear`) writes and reads a full bf16 copy on every use instead: 4.6x slower than
bf16 per tick. Here each program reads a [BLOCK_N, K] strip of int8 rows once, turns each tile into
the activations' dtype in registers, accumulates x @ w.T on the tensor cores in float32 and applies
the rows' scales at the end: the int8 bytes are the only traffic besides x and the output.

On a CPU the kernel runs only under Triton's interpreter (the tests); the CPU model itself keeps the
portable path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch configuration: BLOCK_N output rows a program, BLOCK_K of the inner dimension per tile,
# `min_programs`: narrower strips (down to 16 rows) for a matrix whose strips would launch fewer
# programs. Swept on an H200 at the 7B shapes, 1-64 rows (tools/bench/gpu_kv.py weights_kernel):
# 128 x 256, 3 stages, at least 256 programs was fastest (0.384 ms summed over 12 products; 64 x 256
# without narrowing 0.413; 16-row strips 0.52-0.58). Measured there (docs/performance.md): a whole
# tick at one session 9.00 ms against 10.33 with bf16 weights; at 64 sessions 31.4 against 29.5 (a
# [64, K] activation tile is re-read per strip: bf16's GEMM wins).
# A third sweep (docs/results/2026-12-02-h200-fuse-int8.jsonl): 64 x 256, at least 128 programs, 0.195 ms
# summed at 1 and 8 rows against 0.202 for 128 x 256 / 256: the default now (one row: GEMV below).
CONFIG = {"enabled": True, "block_n": 64, "block_k": 256, "num_warps": 4, "num_stages": 3,  # enabled: on a GPU
          "min_programs": 128}
# For more than 16 rows (many sessions, a prompt's chunk) the launch may differ: the same until the
# next GPU sweep (`weights_kernel` sweeps it apart, at 64 rows) says otherwise.
MANY = {"block_n": 128, "block_k": 256, "num_warps": 4, "num_stages": 3, "min_programs": 256}
FEW_ROWS = 16


@triton.jit
def _w8_kernel(X, W, S, OUT, M, N, K, sx_m, sw_n, so_m,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = m < M
    nmask = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        x = tl.load(X + m[:, None] * sx_m + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(W + n[None, :].to(tl.int64) * sw_n + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0)
        acc += tl.dot(x, w.to(x.dtype))  # [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_N]
    scale = tl.load(S + n, mask=nmask, other=0.0).to(tl.float32)
    out = acc * scale[None, :]
    tl.store(OUT + m[:, None] * so_m + n[None, :], out.to(OUT.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


# One activation row (one session) is a matrix-vector product: no tensor cores, each program sums
# [block_n, block_k] tiles of its rows times x on the CUDA cores (float32) and reduces once at the
# end; narrower strips until a matrix launches `min_programs` (a [4096, K] matrix must still fill
# 132 SMs). Swept on an H200 (`gpu_kv.py weights_kernel`, docs/results/2026-12-02-h200-fuse-int8.jsonl):
# 2 rows x 1024, 2 warps, 4096 programs was fastest, 0.102 ms over the four 7B temporal products, the
# same as the kernel above; but a whole one-session tick, where the depth transformer's hundreds of
# small products gain most, took 7.35 ms with it against 7.82-7.85 without.
# `num_stages` > 1: the loop over K software-pipelined (`tl.range(num_stages=)`: the next tiles' loads
# in flight while this one is summed); 0: a plain loop. The int8 values become float32 by bit
# operations (`_int8_as_float32`), not by I2F. Swept over four layers' temporal products at once
# (822 MB, nothing reread from L2: `gpu_kv.py gemv`, docs/results/2026-12-02-h200-levers.jsonl):
# 16 rows x 512, 4 warps, 3 stages 0.282 ms (2.9 TB/s) against 0.305 for the previous default
# (2 x 1024, 2 warps, unpipelined) and 0.335 for the tensor-core kernel; bf16 weights 0.467 ms.
GEMV = {"enabled": True, "block_n": 16, "block_k": 512, "num_warps": 4, "min_programs": 1024, "num_stages": 3}


@triton.jit
def _w8_gemv_kernel(X, W, S, OUT, N, K, sw_n, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES if STAGES > 0 else None):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        x = tl.load(X + k, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(W + n[:, None].to(tl.int64) * sw_n + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
        acc += _int8_as_float32(w) * x[None, :]
    scale = tl.load(S + n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(OUT + n, (tl.sum(acc, axis=1) * scale).to(OUT.dtype.element_ty), mask=nmask)


@triton.jit
def _int8_as_float32(w):
    """int8 -> float32 without a conversion instruction (I2F issues at a quarter of the FMA rate, 16
    an SM a clock on Hopper: the one-row kernel needs ~15 bytes an SM a clock to keep up with HBM):
    the byte with its sign bit flipped (x + 128) under float32's 2**23 exponent is 2**23 + x + 128
    exactly, one logic op; one subtraction leaves x."""
    bits = w.to(tl.uint8, bitcast=True).to(tl.uint32) ^ 0x4B000080
    return bits.to(tl.float32, bitcast=True) - 8388736.0


LARGEST_M = 128  # more activation rows (a prompt's chunk) than this: a tensor-core GEMM on the dequantized
# rows does better than re-reading the int8 strip for every 64 rows (`quant.Int8Weight.linear` decides)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (q [N, K] int8 * scale [N] or [N, 1]).T -> [..., N] in x's dtype (float32
    accumulation; the scale applied to the sums, not rounded into the weights first)."""
    lead, K = x.shape[:-1], x.shape[-1]
    N = q.shape[0]
    if q.dtype != torch.int8 or q.shape[1] != K or q.stride(1) != 1:
        raise ValueError(f"int8_linear needs int8 rows [N, {K}] contiguous in K, not {q.dtype} {tuple(q.shape)}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    scale = scale.reshape(N)
    if not x.is_cuda and not hasattr(_w8_kernel, "rewrite"):  # an InterpretedFunction has it
        raise RuntimeError("int8_linear runs on a CPU only under Triton's interpreter "
                           "(TRITON_INTERPRET=1 before triton is imported, as the tests do)")
    out = torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    if M == 1 and GEMV["enabled"]:
        block_n = _narrowed(GEMV["block_n"], N, 1, GEMV["min_programs"], 2)
        _w8_gemv_kernel[(triton.cdiv(N, block_n),)](x2, q, scale, out, N, K, q.stride(0), BLOCK_N=block_n,
                                                    BLOCK_K=GEMV["block_k"], STAGES=GEMV.get("num_stages", 0),
                                                    num_warps=GEMV["num_warps"])
        return out
    config = CONFIG if M <= FEW_ROWS else MANY
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    block_n, block_k = _narrowed(config["block_n"], N, triton.cdiv(M, block_m), config.get("min_programs", 0), 16), config["block_k"]
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    _w8_kernel[grid](x2, q, scale, out, M, N, K, x2.stride(0), q.stride(0), N,
                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                     num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def _narrowed(block_n: int, N: int, m_blocks: int, min_programs: int, narrowest: int) -> int:
    """`block_n` halved (not below `narrowest`) until N's strips times `m_blocks` reach `min_programs`."""
    while block_n > narrowest and triton.cdiv(N, block_n) * m_blocks < min_programs:
        block_n //= 2
    return block_n


# The kernel as an operator of its own, so that torch.compile (`step.COMPILE`) keeps it whole in a
# compiled region instead of tracing into Triton's launcher.
@torch.library.custom_op("npc_voice::int8_linear", mutates_args=())
def int8_linear_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return int8_linear(x, q, scale)


@int8_linear_op.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], q.shape[0])
