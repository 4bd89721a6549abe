"""GPU measurements of the 8-bit KV cache (issue #14), one JSON line per result.

Run on a CUDA machine from the repository root (reference: tools/bench/anchor_moshi.py, same call):
    python3 tools/bench/gpu_kv.py kernel ticks accuracy | tee $OUT/kv.jsonl
Stages: kernel (the fused decode attention vs PyTorch's attention over the dequantized cache at
the 7B shapes: error, then time per layer against bf16 SDPA), ticks (7B, full 3000-frame context:
whole ticks at 1/64/128 sessions with the 8-bit cache, 1/64 with bf16, peak memory), accuracy
(teacher-forced text logits over 3000 frames, 2 streams, each cache vs the bf16 one), and the
kernels' launch sweeps (attention, gemv, weights_kernel).

Over 400 lines: one GPU call runs several stages in one process (a sweep keeps its fastest launch
for the stages after it), so the stages of the 8-bit cache and weights stay in one script.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import DEVICE, emit, free, graphed_ms, main, random_streams, teacher_forced  # noqa: E402

from npc_voice.bench import bench_tick  # noqa: E402
from npc_voice.model import decode_attention as da  # noqa: E402
from npc_voice.model.kvcache import QuantKVCache, attend_dequantized  # noqa: E402
from npc_voice.model.loading import random_model  # noqa: E402

H, D, S = 32, 128, 3000  # the 7B temporal transformer's heads and head size; the full context
KVS = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def random_cache(B: int, kv: torch.dtype, seed: int = 0) -> QuantKVCache:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    cache = QuantKVCache.empty((B, H, S + 1, D), DEVICE, kv)
    for start in range(0, S, 500):  # in pieces: the bf16 source of a 128-slot cache is 6 GB a chunk less
        n = min(500, S - start)
        k = torch.randn(B, H, n, D, device=DEVICE, generator=g, dtype=torch.bfloat16)
        v = torch.randn(B, H, n, D, device=DEVICE, generator=g, dtype=torch.bfloat16)
        cache.write(torch.arange(start, start + n, device=DEVICE).expand(B, n), k, v)
    return cache


def bias_for(B: int, W: int, filled: int) -> torch.Tensor:
    bias = torch.zeros(B, 1, 1, W, dtype=torch.bfloat16, device=DEVICE)
    bias[..., filled:] = float("-inf")
    return bias


def layer_ms(cache: QuantKVCache, q: torch.Tensor, bias: torch.Tensor, mode: str | None = None) -> float:
    return graphed_ms(lambda: da.decode_attention(q, cache.keys, cache.key_scale, cache.values, cache.value_scale,
                                                  bias, S, mode=mode))


SWEEP = ([dict(mode="offset", block_n=n, num_warps=w, num_stages=st, programs=1024) for n in (64, 128, 256)
          for w in (2, 4, 8) for st in (2, 3)]
         + [dict(mode="offset", block_n=128, num_warps=4, num_stages=2, programs=p) for p in (2048, 4096, 8192)]
         + [dict(mode="offset", block_n=n, num_warps=w, num_stages=2, programs=4096) for n in (64, 256) for w in (4, 8)]
         + [dict(mode=m, block_n=128, num_warps=4, num_stages=st, programs=4096) for m in ("imma", "imma_pv")
            for st in (2, 3)]
         # the PTX conversion and a register cap (3 programs an SM: tools/bench/kernel_sass.py)
         + [dict(mode=m, block_n=n, num_warps=4, num_stages=st, programs=4096, maxnreg=r)
            for m in ("packed", "offset") for n in (64, 128) for st in (2, 3) for r in (None, 168)]
         + [dict(mode=m, block_n=64, num_warps=4, num_stages=3, programs=1024) for m in ("dot", "fma")])


@torch.inference_mode()
def stage_kernel(sweep: bool = True) -> None:
    for kv_name, kv in KVS.items():  # correctness on fresh random data, 7B shapes
        cache = random_cache(4, kv, seed=1)
        q = torch.randn(4, H, 1, D, device=DEVICE, dtype=torch.bfloat16)
        bias = bias_for(4, S, 2500)
        ref = attend_dequantized(q.double(), cache.keys, cache.key_scale, cache.values, cache.value_scale,
                                 bias.double(), S)
        for mode in da.MODES:
            out = da.decode_attention(q, cache.keys, cache.key_scale, cache.values, cache.value_scale, bias, S, mode=mode)
            emit(what="kv_kernel_check", kv=kv_name, mode=mode, finite=bool(torch.isfinite(out).all()),
                 rel_err_vs_dequantized=float((out.double() - ref).norm() / ref.norm()))
        del cache
        free()
    for kv_name, kv in KVS.items():  # the fused write stores what PyTorch's quantization and scatters store
        ours, ref = random_cache(4, kv, seed=2), random_cache(4, kv, seed=2)
        k = torch.randn(4, H, 1, D, device=DEVICE, dtype=torch.bfloat16)
        v = torch.randn(4, 1, 3, H, D, device=DEVICE, dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)[1]
        rows = torch.tensor([[7], [S - 1], [0], [S]], device=DEVICE)
        try:
            da.write_rows(rows, k, v, ours.keys, ours.key_scale, ours.values, ours.value_scale)
        except Exception as exc:  # reported; the sweep below still runs
            emit(what="kv_fused_write_check", kv=kv_name, error=repr(exc)[:300])
            continue
        ref.write(rows, k, v)
        emit(what="kv_fused_write_check", kv=kv_name, differing=[
            int((a.float() != b.float()).sum()) for a, b in zip(ours.tensors(), ref.tensors())])
        del ours, ref
        free()
    if sweep:
        stage_sweep()
    for B in (1, 64, 128):  # one layer's attention at the full context: ours vs bf16 SDPA
        bias = bias_for(B, S, S)
        q = torch.randn(B, H, 1, D, device=DEVICE, dtype=torch.bfloat16)
        row = dict(what="kv_kernel_time", B=B, window=S, config=da.CONFIG)
        for kv_name, kv in KVS.items():
            cache = random_cache(B, kv)
            row[f"{kv_name}_ms"] = ms = layer_ms(cache, q, bias)
            row[f"{kv_name}_gbps"] = round(cache.nbytes * S / (S + 1) / ms / 1e6)
            del cache
            free()
        if B <= 64:
            k = torch.randn(B, H, S + 1, D, device=DEVICE, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            ms = graphed_ms(lambda: F.scaled_dot_product_attention(q, k[:, :, :S], v[:, :, :S], attn_mask=bias))
            row.update(bf16_sdpa_ms=ms, bf16_sdpa_gbps=round(2 * k.nbytes * S / (S + 1) / ms / 1e6))
            del k, v
        emit(**row)
        free()


def sweep(configs: list[dict], target: dict, measure, what: str, report=lambda ms: {"ms": ms}) -> None:
    """Tries each launch configuration in `target` (a kernel module's config dict; what a configuration
    does not name is the default's) by `measure()` (ms), keeps the fastest there: a `{what}_sweep` row
    each (`report(ms)`), then `{what}_config`."""
    default, best = dict(target), None
    for config in configs:
        target.update(default)
        target.update(config)
        try:
            ms = measure()
        except Exception as exc:  # a configuration Triton cannot build (too many registers, shared memory)
            emit(what=f"{what}_sweep", **config, error=repr(exc)[:200])
            continue
        emit(what=f"{what}_sweep", **config, **report(ms))
        if best is None or ms < best[0]:
            best = (ms, dict(config))
    target.update(default)
    target.update(best[1] if best else {})
    emit(what=f"{what}_config", default=default, chosen=dict(target))


def stage_sweep() -> None:
    """The launch configuration: swept at 64 sessions (int8, full context), the fastest kept for what
    follows in the same process."""
    cache, q, bias = random_cache(64, torch.int8), torch.randn(64, H, 1, D, device=DEVICE, dtype=torch.bfloat16), bias_for(64, S, S)
    sweep(SWEEP, da.CONFIG, lambda: layer_ms(cache, q, bias), "kv_kernel",
          lambda ms: dict(B=64, ms=ms, gbps=round(cache.nbytes * S / (S + 1) / ms / 1e6)))
    del cache
    free()


TICKS = ((None, (1, 64)), (torch.int8, (1, 64, 128)), (torch.float8_e4m3fn, (64,)))
TICKS_MAIN = ((None, (64,)), (torch.int8, (1, 64, 128)))  # the headline figures: bf16 at 64, int8 at 1/64/128


def stage_ticks(plan=TICKS) -> None:
    model = random_model("personaplex-7b", device=DEVICE, dtype=torch.bfloat16, seed=0, kv_dtype="bf16")
    model.mimi.to(torch.bfloat16)  # the serving default on a GPU
    for kv, batches in plan:
        model.lm.kv_dtype = kv
        for b in batches:
            try:
                emit(what="tick_kv", attention=da.CONFIG if kv is not None else "sdpa",
                     **bench_tick(model, b, frames=200, warmup=10).as_dict())
            except torch.cuda.OutOfMemoryError as exc:
                emit(what="tick_kv", kv=str(kv), batch=b, error=str(exc)[:200])
            free()
    del model
    free()


def stage_accuracy(frames: int = S) -> None:
    model = random_model("personaplex-7b", device=DEVICE, dtype=torch.bfloat16, seed=0, kv_dtype="bf16")
    tokens = random_streams(model.config.lm, frames)
    ref_logits, ref_hidden = teacher_forced(model.lm, tokens)
    kept = {}
    for name, kv in KVS.items():
        model.lm.kv_dtype = kv
        logits, hidden = teacher_forced(model.lm, tokens)
        emit(what="kv_accuracy", kv=name, vs="bf16 cache", frames=frames, streams=2,
             **compare(logits, ref_logits), hidden_rel_err=float((hidden - ref_hidden).norm() / ref_hidden.norm()))
        kept[name] = logits
        del hidden
        free()
    # Context: how far bf16 compute itself is from float32 (the same weights, cast up exactly)
    model.lm.to(torch.float32)
    model.lm.kv_dtype = None
    exact, _ = teacher_forced(model.lm, tokens)
    emit(what="kv_accuracy", kv="bf16", vs="float32 compute", frames=frames, streams=2, **compare(ref_logits, exact))
    for name, logits in kept.items():
        emit(what="kv_accuracy", kv=name, vs="float32 compute", frames=frames, streams=2, **compare(logits, exact))
    del model
    free()


def compare(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative error of text logits [B, T, card] against `ref`, overall, at the 99th-percentile
    frame and over the last 500 frames; greedy-token agreement; the greedy token in the top 5."""
    per_frame = (logits - ref).norm(dim=-1) / ref.norm(dim=-1)  # [B, T]
    return dict(text_logits_rel_err=float((logits - ref).norm() / ref.norm()),
                text_logits_rel_err_p99_frame=float(per_frame.flatten().quantile(0.99)),
                text_logits_rel_err_last_500=float((logits[:, -500:] - ref[:, -500:]).norm() / ref[:, -500:].norm()),
                greedy_agreement=float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
                top5_contains_greedy=float((logits.topk(5, -1).indices == ref.argmax(-1, keepdim=True)).any(-1)
                                           .float().mean()))


def stage_ticks_final() -> None:
    """The headline ticks (bf16 cache at 64; int8 at 1/64/128, each step's rows written by one
    kernel per layer, the default), then int8 at 1/64 with PyTorch's quantization and scatters."""
    stage_ticks(TICKS_MAIN)
    default = da.CONFIG["fused_write"]
    da.CONFIG["fused_write"] = not default
    emit(what="fused_write", on=not default)
    stage_ticks(((torch.int8, (1, 64)),))
    da.CONFIG["fused_write"] = default


def weights_ticks(plan: tuple[tuple[str, tuple[int, ...]], ...]) -> None:
    """For each (weights dtype, session counts) of `plan`, with the 8-bit cache: weight bytes, then
    ticks and peak memory at each count (full context)."""
    from npc_voice.model.quant import weight_bytes

    for weights, batches in plan:
        model = random_model("personaplex-7b", device=DEVICE, dtype=torch.bfloat16, seed=0, kv_dtype="int8",
                             weights_dtype=weights)
        model.mimi.to(torch.bfloat16)
        emit(what="weights", weights=weights, lm_weights_gb=round(weight_bytes(model.lm) / 1e9, 2),
             mimi_weights_gb=round(weight_bytes(model.mimi) / 1e9, 2))
        for b in batches:
            emit(what="tick_weights", weights=weights, **bench_tick(model, b, frames=100, warmup=10).as_dict())
            free()
        del model
        free()


def weights_accuracy(weights: str, int8_cache_too: bool = False) -> None:
    """`weights`' teacher-forced text logits (3000 frames, 2 streams) against bf16 weights, both with a
    bf16 cache (and, with `int8_cache_too`, the 8-bit weights with the int8 cache as well)."""
    ref = random_model("personaplex-7b", device=DEVICE, dtype=torch.bfloat16, seed=0, kv_dtype="bf16")
    tokens = random_streams(ref.config.lm, S)
    ref_logits, _ = teacher_forced(ref.lm, tokens)
    del ref
    free()
    model = random_model("personaplex-7b", device=DEVICE, dtype=torch.bfloat16, seed=0, kv_dtype="bf16",
                         weights_dtype=weights)
    logits, _ = teacher_forced(model.lm, tokens)
    emit(what="weights_accuracy", weights=weights, kv="bf16", vs="bf16 weights", frames=S, streams=2,
         **compare(logits, ref_logits))
    if int8_cache_too:
        model.lm.kv_dtype = torch.int8
        logits, _ = teacher_forced(model.lm, tokens)
        emit(what="weights_accuracy", weights=weights, kv="int8", vs="bf16 weights, bf16 cache", frames=S,
             streams=2, **compare(logits, ref_logits))
    del model
    free()


def stage_weights() -> None:
    """fp8 weights (1, 8, 64 sessions) and int8 weights (8) with the 8-bit cache, and fp8 weights'
    logits against bf16 weights."""
    weights_ticks((("fp8", (1, 8, 64)), ("int8", (8,))))
    weights_accuracy("fp8", int8_cache_too=True)


def stage_weights_int8() -> None:
    """int8 weights (the Triton kernel) at 1, 8 and 64 full-context sessions against bf16 weights at 1
    and 64 in the same process, then int8 weights' logits against bf16 weights."""
    weights_ticks(INT8_TICKS)
    weights_accuracy("int8")


INT8_TICKS = (("bf16", (1, 64)), ("int8", (1, 8, 64)))


W8_SHAPES = ((12288, 4096), (4096, 4096), (22528, 4096), (4096, 11264))  # 7B: qkv, out, gate+up, down
W8_SWEEP = ([dict(block_n=n, block_k=k, num_stages=st) for n in (32, 64) for k in (128, 256) for st in (3, 4)]
            # narrower strips where a matrix would launch fewer programs (its 4096 rows: 64 of 64)
            + [dict(block_n=n, block_k=k, num_stages=3, min_programs=p) for n in (64, 128) for k in (128, 256)
               for p in (128, 256)])
# More than 16 rows (`int8_matmul.MANY`), timed at 64: wider programs, 8 warps, shorter K tiles.
W8_SWEEP_MANY = [dict(block_n=n, block_k=k, num_warps=w, num_stages=st, min_programs=p)
                 for n, k, w, st, p in ((128, 256, 4, 3, 256), (128, 128, 4, 4, 256), (128, 128, 8, 3, 0),
                                        (256, 128, 8, 3, 0), (128, 64, 4, 4, 0), (64, 128, 4, 4, 0),
                                        (256, 64, 8, 4, 0), (128, 256, 8, 3, 128))]


# One row (`int8_matmul.GEMV`), timed at 1 against the tensor-core kernel (the first entry).
W8_SWEEP_GEMV = [dict(enabled=False)] + [dict(enabled=True, block_n=n, block_k=k, num_warps=w, min_programs=p)
                                         for n, k, w, p in ((16, 512, 4, 1024), (8, 512, 4, 1024), (4, 1024, 4, 1024),
                                                            (16, 256, 4, 1024), (32, 256, 8, 512), (8, 1024, 8, 512),
                                                            (16, 512, 4, 2048), (4, 512, 2, 2048), (2, 1024, 2, 4096),
                                                            (8, 256, 2, 2048), (32, 128, 4, 1024), (16, 1024, 8, 256))]


# One row, as a tick reads the weights: four layers' temporal products (distinct matrices, 822 MB:
# nothing left in the 50 MB L2 from the layer before) and eight depth layers' (dim 1024), in one
# CUDA graph. The first entry: the tensor-core kernel; then the one-row kernel, pipelined or not.
DEPTH_SHAPES = ((3072, 1024), (1024, 1024), (5632, 1024), (1024, 2816))
GEMV_LAYERS = [dict(enabled=False)] + [dict(enabled=True, block_n=n, block_k=k, num_warps=w, min_programs=p, num_stages=st)
                                       for n, k, w, p in ((2, 1024, 2, 4096), (4, 1024, 2, 2048), (4, 512, 2, 2048),
                                                          (8, 512, 4, 1024), (8, 1024, 4, 1024), (16, 512, 4, 1024),
                                                          (1, 2048, 2, 8192), (2, 2048, 4, 4096))
                                       for st in (0, 2, 3)]


@torch.inference_mode()
def stage_gemv() -> None:
    """`int8_matmul.GEMV` swept over whole layers at one row (the fastest kept for what follows), against
    bf16's F.linear on the same layers: ms and GB/s of weights read."""
    from npc_voice.model import int8_matmul as w8
    from npc_voice.model.quant import Int8Weight

    g = torch.Generator(device=DEVICE).manual_seed(0)
    groups = {"temporal": [W8_SHAPES] * 4, "depth": [DEPTH_SHAPES] * 8}
    for name, layers in groups.items():
        weights = [[Int8Weight(torch.randn(*shape, device=DEVICE, generator=g, dtype=torch.bfloat16) * 0.02, torch.bfloat16)
                    for shape in layer] for layer in layers]
        xs = {K: torch.randn(1, K, device=DEVICE, generator=g, dtype=torch.bfloat16) for _, K in layers[0]}
        nbytes = sum(w.q.numel() for layer in weights for w in layer)

        def run() -> None:
            for layer in weights:
                for w in layer:
                    w8.int8_linear(xs[w.q.shape[1]], w.q, w.scale)

        def report(ms: float) -> dict:
            return {"group": name, "ms": ms, "gbps": round(nbytes / ms / 1e6)}

        if name == "temporal":  # the sweep: on the temporal layers, where the bytes are
            sweep(GEMV_LAYERS, w8.GEMV, lambda: graphed_ms(run), "w8_gemv_layers", report)
        w = weights[0][-1]
        x = xs[w.q.shape[1]]
        ref = x.double() @ (w.q.double() * w.scale.double()).T
        emit(what="w8_gemv_layers_chosen", config=dict(w8.GEMV), **report(graphed_ms(run)),
             rel_err=float((w8.int8_linear(x, w.q, w.scale).double() - ref).norm() / ref.norm()))
        dense = [[w() for w in layer] for layer in weights]
        del weights
        free()
        ms = graphed_ms(lambda: [F.linear(xs[d.shape[1]], d) for layer in dense for d in layer])
        emit(what="bf16_gemv_layers", group=name, ms=ms, gbps=round(2 * nbytes / ms / 1e6))
        del dense
        free()


# The attention's launch, as a tick meets it: 64 sessions (one layer: 1.57 GB), and 1 session over 8
# layers' caches in one graph (25 MB a layer would sit in L2 if one were read again and again).
ATTENTION_64 = ([{}] + [dict(tma=True, num_warps=w, num_stages=st) for w in (4, 8) for st in (2, 3, 4)]
                + [dict(tma=True, block_n=64, num_warps=4, num_stages=st) for st in (3, 4)])
ATTENTION_1 = [dict(min_tiles=m, tma=t) for t in (False, True) for m in (1, 2, 3, 4, 6, 12)]


@torch.inference_mode()
def stage_attention() -> None:
    """`decode_attention.CONFIG` swept at 64 sessions, then `min_tiles` at 1 (each fastest kept), with
    each chosen launch checked against PyTorch's attention over the dequantized cache."""
    def check(cache, q, bias) -> float:
        out = da.decode_attention(q, cache.keys, cache.key_scale, cache.values, cache.value_scale, bias, S).double()
        ref = attend_dequantized(q.double(), cache.keys, cache.key_scale, cache.values, cache.value_scale, bias.double(), S)
        return float((out - ref).norm() / ref.norm())

    cache, q, bias = random_cache(64, torch.int8), torch.randn(64, H, 1, D, device=DEVICE, dtype=torch.bfloat16), bias_for(64, S, S - 7)
    gb = cache.nbytes * S / (S + 1) / 1e9
    sweep(ATTENTION_64, da.CONFIG, lambda: layer_ms(cache, q, bias), "attention",
          lambda ms: dict(B=64, ms=ms, gbps=round(gb / ms * 1e3)))
    emit(what="attention_check", B=64, config=dict(da.CONFIG), rel_err=check(cache, q, bias))
    del cache
    free()
    caches = [random_cache(1, torch.int8, seed=i) for i in range(8)]
    q, bias = torch.randn(1, H, 1, D, device=DEVICE, dtype=torch.bfloat16), bias_for(1, S, S - 7)
    gb = sum(c.nbytes for c in caches) * S / (S + 1) / 1e9

    def layers() -> None:
        for c in caches:
            da.decode_attention(q, c.keys, c.key_scale, c.values, c.value_scale, bias, S)

    sweep(ATTENTION_1, da.CONFIG, lambda: graphed_ms(layers), "attention",
          lambda ms: dict(B=1, layers=8, ms=ms, gbps=round(gb / ms * 1e3)))
    emit(what="attention_check", B=1, config=dict(da.CONFIG), rel_err=check(caches[0], q, bias))
    del caches
    free()


@torch.inference_mode()
def stage_weights_kernel() -> None:
    """The int8-weight kernel (`int8_matmul`) per product at the 7B shapes: its launch configurations
    swept (time summed over the shapes at 1 and 8 rows for `CONFIG`, at 64 rows for `MANY`; the fastest
    kept for what follows in the same process), then each shape against bf16's F.linear, with the
    error vs the dequantized product."""
    from npc_voice.model import int8_matmul as w8
    from npc_voice.model.quant import Int8Weight

    g = torch.Generator(device=DEVICE).manual_seed(0)
    weights = {shape: Int8Weight(torch.randn(*shape, device=DEVICE, generator=g, dtype=torch.bfloat16) * 0.02,
                                 torch.bfloat16) for shape in W8_SHAPES}
    xs = {(M, K): torch.randn(M, K, device=DEVICE, generator=g, dtype=torch.bfloat16) for M in (1, 8, 64)
          for K in {k for _, k in W8_SHAPES}}
    def total(rows: tuple[int, ...]):
        return lambda: sum(graphed_ms(lambda: w8.int8_linear(xs[(M, K)], w.q, w.scale))
                           for (N, K), w in weights.items() for M in rows)

    def report(ms: float) -> dict:
        return {"total_ms": round(ms, 3)}

    sweep(W8_SWEEP, w8.CONFIG, total((1, 8)), "w8", report)  # a few rows: 1-16 sessions
    sweep(W8_SWEEP_MANY, w8.MANY, total((64,)), "w8", report)  # more
    sweep(W8_SWEEP_GEMV, w8.GEMV, total((1,)), "w8_gemv", report)  # one row (the first: the kernel above)
    for (N, K), w in weights.items():
        dense = w()  # [N, K] bf16: what bf16 weights would be
        for M in (1, 8, 64):
            x = xs[(M, K)]
            ours = w8.int8_linear(x, w.q, w.scale).double()
            ref = x.double() @ (w.q.double() * w.scale.double()).T
            int8_ms = graphed_ms(lambda: w8.int8_linear(x, w.q, w.scale))
            bf16_ms = graphed_ms(lambda: F.linear(x, dense))
            emit(what="w8_product", N=N, K=K, M=M, int8_ms=int8_ms, bf16_ms=bf16_ms,
                 int8_gbps=round(N * K / int8_ms / 1e6), bf16_gbps=round(2 * N * K / bf16_ms / 1e6),
                 rel_err=float((ours - ref).norm() / ref.norm()))
    del weights, xs
    free()


def stage_accuracy_int8(frames: int = S) -> None:
    """The int8 cache read by the current kernel configuration against the bf16 cache (teacher-forced
    text logits, 2 streams)."""
    model = random_model("personaplex-7b", device=DEVICE, dtype=torch.bfloat16, seed=0, kv_dtype="bf16")
    tokens = random_streams(model.config.lm, frames)
    ref_logits, _ = teacher_forced(model.lm, tokens)
    model.lm.kv_dtype = torch.int8
    logits, _ = teacher_forced(model.lm, tokens)
    emit(what="kv_accuracy", kv="int8", attention=da.CONFIG, vs="bf16 cache", frames=frames, streams=2,
         **compare(logits, ref_logits))
    del model
    free()


STAGES = {"kernel": stage_kernel, "accuracy_int8": stage_accuracy_int8, "ticks_final": stage_ticks_final, "ticks": stage_ticks, "accuracy": stage_accuracy, "weights": stage_weights,
          "ticks_main": lambda: stage_ticks(TICKS_MAIN), "weights_kernel": stage_weights_kernel,
          "weights_int8": stage_weights_int8, "weights_int8_ticks": lambda: weights_ticks(INT8_TICKS),
          "checks": lambda: stage_kernel(sweep=False), "gemv": stage_gemv, "attention": stage_attention}

if __name__ == "__main__":
    main(STAGES)
