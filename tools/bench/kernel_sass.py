"""The 8-bit decode attention (and the int8-weight matmul) compiled for an H100/H200 (sm_90) on any machine, no GPU needed:
registers, spills, shared memory and an instruction count per launch configuration, one JSON line
each. What a GPU launch compiles: 7B shapes (128-wide heads, a 64-session layer in two splits), the
arguments specialised as Triton specialises them at a launch (pointers and strides that are
multiples of 16 marked so; the scales' head stride, 3001, and the window, 3000, are not).

    python3 tools/bench/kernel_sass.py                       # the configurations below
    python3 tools/bench/kernel_sass.py packed:128:4:2:168    # mode[-tma]:rows:warps:stages[:register cap]
    python3 tools/bench/kernel_sass.py w8:16:32:256:4:4      # int8_matmul: w8:BLOCK_M:BLOCK_N:BLOCK_K:warps:stages
    python3 tools/bench/kernel_sass.py gemv:2:1024:2:3       # its one-row kernel: gemv:BLOCK_N:BLOCK_K:warps:stages

Uses the ptxas / cuobjdump that come with Triton's NVIDIA backend. Read with the GPU figures in
docs/performance.md: a count is not a time.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from npc_voice.model import decode_attention as da  # noqa: E402
from npc_voice.model import int8_matmul  # noqa: E402

POINTERS = {"Q": "*bf16", "K": "*i8", "KS": "*fp32", "V": "*i8", "VS": "*fp32", "BIAS": "*bf16", "ACC": "*fp32",
            "ML": "*fp32", "OUT": "*bf16"}
INTS = ["sq_b", "sq_h", "sk_b", "sk_h", "sk_n", "ss_b", "ss_h", "sb_b", "so_b", "so_h", "H", "W"]
NOT_MULTIPLES_OF_16 = {"ss_h", "sb_b", "W"}  # 3001-row scales, a 3000-wide mask and window
CONSTEXPRS = ["CHUNK", "D", "BLOCK_D", "BLOCK_N", "SPLITS", "MODE", "TMA", "IS_INT"]
CONFIGS = ["offset:128:4:2", "offset:128:4:2:168", "packed:128:4:2", "packed:128:4:2:168", "packed:64:4:3",
           "imma_pv:128:4:3", "offset:128:8:2", "offset-tma:128:4:2", "offset-tma:128:4:3", "offset-tma:128:8:3"]
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_split_kernel(mode: str, block_n: int, warps: int, stages: int, maxnreg: int | None):
    """`mode` a key of `da.MODES`, "-tma" appended for tiles fetched by descriptor (`CONFIG["tma"]`)."""
    mode, tma = mode.removesuffix("-tma"), mode.endswith("-tma")
    args = list(POINTERS) + INTS + ["sm_scale"]
    pointers = dict(POINTERS, **({"K": f"tensordesc<i8[{block_n}, 128]>", "V": f"tensordesc<i8[{block_n}, 128]>"} if tma else {}))
    signature = {**pointers, **{name: "i32" for name in INTS}, "sm_scale": "fp32", **{c: "constexpr" for c in CONSTEXPRS}}
    constants = {"CHUNK": 1536, "D": 128, "BLOCK_D": 128, "BLOCK_N": block_n, "SPLITS": 2, "MODE": da.MODES[mode],
                 "TMA": tma, "IS_INT": True}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(args)
             if name != "sm_scale" and name not in NOT_MULTIPLES_OF_16 and not (tma and name in ("K", "V"))}
    options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    source = ASTSource(fn=da._split_kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def compile_w8_kernel(block_m: int, block_n: int, block_k: int, warps: int, stages: int):
    """`int8_matmul._w8_kernel` as a 7B product launches it: bf16 activations, int8 rows, bf16 scales."""
    pointers = {"X": "*bf16", "W": "*i8", "S": "*bf16", "OUT": "*bf16"}
    ints = ["M", "N", "K", "sx_m", "sw_n", "so_m"]
    signature = {**pointers, **{name: "i32" for name in ints}, "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                 "BLOCK_K": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate([*pointers, *ints]) if name != "M"}
    source = ASTSource(fn=int8_matmul._w8_kernel, signature=signature, attrs=attrs,
                       constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def compile_gemv_kernel(block_n: int, block_k: int, warps: int, stages: int):
    """`int8_matmul._w8_gemv_kernel` as one activation row launches it."""
    pointers = {"X": "*bf16", "W": "*i8", "S": "*bf16", "OUT": "*bf16"}
    ints = ["N", "K", "sw_n"]
    signature = {**pointers, **{name: "i32" for name in ints}, "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                 "STAGES": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate([*pointers, *ints])}
    source = ASTSource(fn=int8_matmul._w8_gemv_kernel, signature=signature, attrs=attrs,
                       constexprs={"BLOCK_N": block_n, "BLOCK_K": block_k, "STAGES": stages})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def describe(spec: str) -> dict:
    if spec.startswith("gemv:"):
        block_n, block_k, warps, stages = (int(v) for v in spec.split(":")[1:])
        kernel = compile_gemv_kernel(block_n, block_k, warps, stages)
    elif spec.startswith("w8:"):
        block_m, block_n, block_k, warps, stages = (int(v) for v in spec.split(":")[1:])
        kernel = compile_w8_kernel(block_m, block_n, block_k, warps, stages)
    else:
        mode, block_n, warps, stages, *cap = spec.split(":")
        kernel = compile_split_kernel(mode, int(block_n), int(warps), int(stages), int(cap[0]) if cap else None)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    ops = collections.Counter(m.group(2) for m in re.finditer(r"/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    per_sm = min(65536 // (registers * 32 * int(warps)), 232448 // max(kernel.metadata.shared, 1))
    return dict(what="kernel_sass", config=spec, registers=registers,
                stack_bytes=int(re.search(r"STACK:(\d+)", usage).group(1)), shared_bytes=kernel.metadata.shared,
                programs_per_sm=per_sm, instructions=sum(ops.values()),
                most=dict(ops.most_common(10)), async_copies=ops["LDGSTS"], global_loads=ops["LDG"],
                local_spills=ops["STL"] + ops["LDL"])


if __name__ == "__main__":
    for spec in sys.argv[1:] or CONFIGS:
        print(json.dumps(describe(spec)), flush=True)
