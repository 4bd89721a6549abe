"""GPU measurements of the step's parts compiled whole (`npc_voice.engine.step.COMPILE`, issue #14),
one JSON line per result.

Run on a CUDA machine from the repository root (reference: tools/bench/anchor_moshi.py, same call):
    python3 tools/bench/gpu_fuse.py check ticks profile | tee $OUT/fuse.jsonl
Stages: check (the compiled step against the eager one: the tiny model in float32, tokens and PCM;
the 7B model in bf16, 4 sessions), ticks (7B, full 3000-frame context, bf16 weights: 64 and 1
sessions with nothing, Mimi, then Mimi and the depth steps compiled; the first tick's time, which
pays for compiling, is reported apart), ticks_final (64 sessions with both and with nothing compiled,
1 session with both), ticks_int8 (int8 weights, both compiled: 1, 8, 64 sessions), weights_kernel
(the int8-weight kernels' launches swept first, the fastest kept for the stages after it), profile
(the kernels of one tick, by torch.profiler: how many, their GPU time, the costliest), sampler (the
sampler's k-th largest logit by a sort or by bisection), levers (the Triton sampler and Mimi's
convs as products checked, then a one-session int8 tick with all of this round's levers and with
each turned off; levers_swept: the one-row int8 kernel and the attention swept over whole layers
first, gpu_kv.py gemv / attention).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import DEVICE, emit, free, main  # noqa: E402

from npc_voice.bench import bench_tick  # noqa: E402
from npc_voice.engine import step as step_module  # noqa: E402
from npc_voice.engine.step import BatchedStep  # noqa: E402
from npc_voice.model.generator import Generator  # noqa: E402
from npc_voice.model.loading import random_model  # noqa: E402

NONE, MIMI, BOTH = frozenset(), frozenset({"mimi"}), frozenset({"mimi", "depth"})


def model_7b(weights: str = "bf16"):
    model = random_model("personaplex-7b", device=DEVICE, dtype=torch.bfloat16, seed=0, weights_dtype=weights)
    model.mimi.to(torch.bfloat16)  # the serving default on a GPU
    return model


def run_steps(model, parts: frozenset[str], batch: int, frames: int, use_graphs: bool = True):
    """`frames` ticks of `batch` slots (some skipped now and then) with `parts` compiled: outputs."""
    step_module.COMPILE = parts
    gen = Generator(model.lm)
    step = BatchedStep(model, gen, gen.init_state(batch), model.mimi.init_state(batch, DEVICE), use_graphs=use_graphs)
    rng = np.random.default_rng(0)
    outs = []
    for t in range(frames):
        pcm = (0.1 * rng.standard_normal((batch, model.mimi.frame_size))).astype(np.float32)
        active = np.array([True, t % 3 != 1, True, t > 4] * (batch // 4))
        outs.append(step(pcm, active, np.full(batch, -1), frames_seen=t + 1))
    return outs


def compare(a, b) -> dict:
    text = np.stack([o.text for o in a]), np.stack([o.text for o in b])
    first = np.nonzero((text[0] != text[1]).any(axis=1))[0]
    return dict(tokens_equal=bool((text[0] == text[1]).all()), text_agreement=float((text[0] == text[1]).mean()),
                first_differing_frame=int(first[0]) if len(first) else None,
                pcm_max_abs_diff=max(float(np.abs(x.pcm - y.pcm).max()) for x, y in zip(a, b)))


def stage_check() -> None:
    """Eager and uncompiled against graphed and compiled: the tiny model in float32 (12 frames), then
    the 7B model in bf16 (4 sessions, 24 frames; bf16 rounding may differ where inductor fuses)."""
    tiny = random_model("tiny", device=DEVICE, dtype=torch.float32, seed=1)
    for parts in (MIMI, BOTH):
        emit(what="compile_check", model="tiny float32", parts=sorted(parts),
             **compare(run_steps(tiny, NONE, 4, 12, use_graphs=False), run_steps(tiny, parts, 4, 12)))
    del tiny
    model = model_7b()
    eager = run_steps(model, NONE, 4, 24)
    for parts in (MIMI, BOTH):
        emit(what="compile_check", model="7B bf16", parts=sorted(parts), **compare(eager, run_steps(model, parts, 4, 24)))
    del model
    free()


def ticks(weights: str, plan: tuple[tuple[int, frozenset[str]], ...], selects: tuple[str, ...] = ("auto",)) -> None:
    """Each (sessions, compiled parts) of `plan` with `weights`, under each of the sampler's `selects`
    (`sampling.SELECT`), the model loaded once."""
    from npc_voice.model import sampling

    model = model_7b(weights)
    for batch, parts in plan:
        for select in selects:
            step_module.COMPILE, sampling.SELECT = parts, select
            start = time.time()
            try:
                row = bench_tick(model, batch, frames=200, warmup=10).as_dict()
            except Exception as exc:  # one failed configuration must not hide the others
                emit(what="tick_compiled", weights=weights, batch=batch, parts=sorted(parts), select=select,
                     error=repr(exc)[:400])
                continue
            emit(what="tick_compiled", weights=weights, parts=sorted(parts), select=select,
                 seconds_with_compile=round(time.time() - start, 1), **row)
            free()
    sampling.SELECT = "auto"
    del model
    free()


TICKS = ((64, NONE), (64, MIMI), (64, BOTH), (1, NONE), (1, MIMI), (1, BOTH))
TICKS_FINAL = ((64, BOTH), (64, NONE), (1, BOTH))  # today's default (both compiled) and 64 without
TICKS_INT8 = ((1, NONE), (1, BOTH), (8, BOTH), (64, BOTH))


@torch.inference_mode()
def stage_profile(plan=((1, "bf16", BOTH), (1, "int8", BOTH), (64, "bf16", BOTH))) -> None:
    """The kernels one graphed tick runs (after its warm-up): count, GPU time, the costliest 15."""
    from torch.profiler import ProfilerActivity, profile

    models: dict[str, object] = {}
    for batch, weights, parts in plan:
        if weights not in models:
            models.clear()
            free()
            models[weights] = model_7b(weights)
        model = models[weights]
        step_module.COMPILE = parts
        gen = Generator(model.lm)
        step = BatchedStep(model, gen, gen.init_state(batch), model.mimi.init_state(batch, DEVICE))
        args = (np.zeros((batch, model.mimi.frame_size), np.float32), np.ones(batch, bool), np.full(batch, -1))
        for _ in range(3):
            step(*args, frames_seen=step.capacity)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(*args, frames_seen=step.capacity)
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        emit(what="tick_profile", batch=batch, weights=weights, parts=sorted(parts),
             cuda_kernels=sum(e.count for e in kernels),
             cuda_ms=round(sum(e.self_device_time_total for e in kernels) / 1000, 3),
             top=[(e.key[:70], e.count, round(e.self_device_time_total / 1000, 3))
                  for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]])
        del step, gen
        free()


def stage_weights_kernel() -> None:
    """`gpu_kv.py weights_kernel` (the int8-weight kernels' launches swept, the fastest kept in this
    process for the stages after it)."""
    from gpu_kv import stage_weights_kernel as sweep_kernels

    sweep_kernels()


def stage_sampler() -> None:
    """`sampling.SELECT`: the Triton sampler ("kernel"), the k-th largest logit by a sort ("topk") or
    by bisection ("bisect"), both parts compiled: int8 weights at 1 session, bf16 at 64."""
    for weights, batch in (("int8", 1), ("bf16", 64)):
        ticks(weights, ((batch, BOTH),), selects=("kernel", "topk", "bisect"))


@torch.inference_mode()
def sampler_check(draws: int = 20) -> None:
    """The Triton sampler (`sampling.SELECT="kernel"`) against PyTorch's ("topk") on the GPU: the same
    tokens at the 7B vocabularies (64 rows: temperatures, top-k and greedy mixed), and one draw's time
    (a row, CUDA graph)."""
    from gpu_suite import graphed_ms

    from npc_voice.model import sampling

    g = torch.Generator(device=DEVICE).manual_seed(0)
    B = 64
    temperature = torch.tensor([0.7, 0.8, 0.0, 1.0], device=DEVICE).repeat(B // 4)
    top_k = torch.tensor([25, 250, 1, 0], device=DEVICE).repeat(B // 4)
    seed = torch.arange(B, device=DEVICE)
    for vocab in (32000, 2048):
        logits = 3 * torch.randn(B, vocab, device=DEVICE, generator=g, dtype=torch.bfloat16)
        same = 0
        for t in range(draws):
            counter = torch.full((B,), t, device=DEVICE)
            drawn = []
            for select in ("kernel", "topk"):
                sampling.SELECT = select
                drawn.append(sampling.draw_tokens(logits, temperature, top_k, seed, counter, 1))
            same += int((drawn[0] == drawn[1]).sum())
        row = dict(what="sampler_check", vocab=vocab, draws=B * draws, same_tokens=same)
        one = (logits[:1], temperature[:1], top_k[:1], seed[:1], torch.zeros(1, dtype=torch.long, device=DEVICE), 1)
        for select in ("kernel", "topk"):
            sampling.SELECT = select
            row[f"{select}_ms_one_row"] = graphed_ms(lambda: sampling.draw_tokens(*one))
        emit(**row)
    sampling.SELECT = "auto"


LEVERS = (("today's defaults", {}), ("sampler: sort", {"select": "topk"}), ("Mimi convs: cuDNN", {"conv": "cudnn"}))


def stage_levers(weights: str = "int8", batch: int = 1, swept: bool = False) -> None:
    """This round's levers: (`swept`) the one-row int8 kernel and the attention's launch swept over
    whole layers (gpu_kv.py gemv / attention, the fastest kept), the Triton sampler and the Mimi convs
    as matrix products checked, then a `batch`-session tick with every lever on, and with each turned
    off."""
    from gpu_kv import stage_attention, stage_gemv

    from npc_voice.model import decode_attention, int8_matmul, sampling
    from npc_voice.model.mimi import convs

    if swept:
        stage_gemv()
        stage_attention()
    sampler_check()
    tiny = random_model("tiny", device=DEVICE, dtype=torch.float32, seed=1)  # compiled Mimi: its convs as products
    emit(what="conv_check", model="tiny float32", vs="eager (cuDNN convs)",
         **compare(run_steps(tiny, NONE, 4, 12, use_graphs=False), run_steps(tiny, MIMI, 4, 12)))
    del tiny
    free()
    model = model_7b(weights)
    step_module.COMPILE = BOTH
    for lever, off in LEVERS:
        sampling.SELECT, convs.CONV = off.get("select", "auto"), off.get("conv", "auto")
        start = time.time()
        try:
            row = bench_tick(model, batch, frames=200, warmup=10).as_dict()
        except Exception as exc:  # one failed configuration must not hide the others
            emit(what="tick_lever", lever=lever, error=repr(exc)[:400])
            continue
        emit(what="tick_lever", lever=lever, weights=weights, seconds_with_compile=round(time.time() - start, 1),
             gemv=dict(int8_matmul.GEMV), attention=dict(decode_attention.CONFIG), **row)
        free()
    sampling.SELECT, convs.CONV = "auto", "auto"
    del model
    free()


STAGES = {"levers": stage_levers, "levers_swept": lambda: stage_levers(swept=True), "sampler": stage_sampler, "check": stage_check, "ticks": lambda: ticks("bf16", TICKS), "ticks_int8": lambda: ticks("int8", TICKS_INT8),
          "ticks_final": lambda: ticks("bf16", TICKS_FINAL), "ticks_int8_1": lambda: ticks("int8", ((1, BOTH),)), "profile": stage_profile, "weights_kernel": stage_weights_kernel}

if __name__ == "__main__":
    main(STAGES)
