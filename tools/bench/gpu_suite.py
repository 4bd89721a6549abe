"""GPU measurements for docs/performance.md (issue #4), one JSON line per result.

Run on a CUDA machine from the repository root, then the reference in the same call:
    python3 tools/bench/gpu_suite.py all | tee $OUT/ours.jsonl
    python3 tools/bench/anchor_moshi.py 1 32 | tee $OUT/reference.jsonl   # moshi 0.2.13 (wheels in .whl)
Stages: check (CUDA-graph step == eager step, tiny), builds (8 new characters at once beside 32 and
63 live full-context sessions in the real-time loop), ticks (7B bf16, 1..32 sessions, full context),
many (7B bf16, 64 sessions at a 1500-frame context), swap (hot swap with 32 live sessions),
int8 (int8 weights, 4 sessions: memory), accuracy (int8 and short context vs bf16 logits).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import sys
import time

import numpy as np
import torch

from npc_voice.bench import bench_tick
from npc_voice.bench_live import bench_swap
from npc_voice.engine.step import BatchedStep, capture_graph, window_for
from npc_voice.model.config import get_preset
from npc_voice.model.generator import Generator
from npc_voice.model.loading import random_model
from npc_voice.model.quant import quantize_int8_, weight_bytes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def free() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def stage_check(kv: str = "auto") -> None:
    """The graphed step computes what the eager step computes (same tokens, same audio); `kv`: the
    slots' KV cache (auto: int8 on a GPU, through the fused decode attention)."""
    model = random_model("tiny", device=DEVICE, dtype=torch.float32, seed=1, kv_dtype=kv)
    rng = np.random.default_rng(0)
    frames = [(0.1 * rng.standard_normal((4, model.mimi.frame_size))).astype(np.float32) for _ in range(12)]
    runs = []
    for graphs in (False, True):
        gen = Generator(model.lm)
        step = BatchedStep(model, gen, gen.init_state(4), model.mimi.init_state(4, DEVICE), use_graphs=graphs)
        runs.append([step(pcm, np.array([True, t % 3 != 1, True, t > 4]), np.full(4, -1), frames_seen=t + 1)
                     for t, pcm in enumerate(frames)])
    tokens_equal = all(np.array_equal(a.text, b.text) for a, b in zip(*runs))
    pcm_err = max(float(np.abs(a.pcm - b.pcm).max()) for a, b in zip(*runs))
    emit(what="graph_check", kv=str(model.lm.kv_dtype), tokens_equal=tokens_equal, pcm_max_abs_diff=pcm_err)

    # The builder's graphs (lane widths, windows, voice buckets) build what its eager path builds.
    from npc_voice.bench_live import build_personas
    from npc_voice.engine.build import PrefixBuilder

    gen = Generator(model.lm)
    personas = build_personas(model, 3, seed=5)
    built = []
    for graphs in (False, True):
        builder = PrefixBuilder(model, gen, lanes=4, chunk=16, use_graphs=graphs, longest=600)
        builder.warm_up(max_voice_frames=130)
        for p in personas:
            builder.submit(p.request(model))
        built.append({r.key: prefix for r, prefix in builder.run(None)})
    eager, graphed = built
    plain = PrefixBuilder(model, gen, 1, 16, use_graphs=False).voices
    samples = [p.request(model).samples for p in personas]
    emit(what="build_graph_check", built=len(graphed),
         voice_codes_equal=all(torch.equal(builder.voices.encode("v", x, True).codes, plain.encode("v", x, True).codes)
                               for x in samples),
         keys_max_abs_diff=max(float((eager[k].keys - graphed[k].keys).abs().max()) for k in eager),
         logits_max_abs_diff=max(float((eager[k].text_logits - graphed[k].text_logits).abs().max()) for k in eager),
         widths=sorted({lanes for op, lanes, *_ in builder.log if op == "chunk"}))

    # A whole engine (builds, graphed installs, graphed ticks) speaks as the eager one does.
    from npc_voice.engine import Engine

    heard = []
    for graphs in (False, True):
        engine = Engine(model, slots=3, use_graphs=graphs)
        sessions = [engine.open(p, seed=7 + i) for i, p in enumerate(personas)]
        frames = [engine.tick() for _ in range(6)]
        heard.append(([[e.text_token for e in tick] for tick in frames], np.stack([[e.pcm for e in tick] for tick in frames])))
        del engine, sessions
    emit(what="engine_graph_check", kv=str(model.lm.kv_dtype), tokens_equal=heard[0][0] == heard[1][0],
         pcm_max_abs_diff=float(np.abs(heard[0][1] - heard[1][1]).max()))


def stage_ticks(batches=(1, 8, 16, 32)) -> None:
    model = random_model("personaplex-7b", device=DEVICE, dtype=torch.bfloat16, seed=0)
    emit(what="model", weights_gb=round(weight_bytes(model.lm) / 1e9, 2))
    for b in batches:
        emit(what="tick", **bench_tick(model, b, frames=100, warmup=10).as_dict())
        free()
    for b in (1, 32):  # a conversation's first minute: the attention reads the rows filled so far
        emit(what="tick_early", **bench_tick(model, b, frames=100, warmup=10, context_fill=600).as_dict())
        free()
    model.mimi.to(torch.bfloat16)  # Mimi in bf16 (the reference runs it in fp32)
    for b in (1, 32):
        emit(what="tick_mimi_bf16", **bench_tick(model, b, frames=100, warmup=10).as_dict())
        free()
    del model
    free()


def stage_many(sessions: int = 64, context: int = 1500) -> None:
    cfg = get_preset("personaplex-7b")
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, context=context))
    model = random_model(cfg, device=DEVICE, dtype=torch.bfloat16, seed=0)
    emit(what="tick_many", context=context, **bench_tick(model, sessions, frames=100, warmup=10).as_dict())
    del model
    free()


def stage_swap(sessions: int = 32) -> None:
    model = random_model("personaplex-7b", device=DEVICE, dtype=torch.bfloat16, seed=0)
    emit(what="swap", sessions=sessions, **bench_swap(model, sessions, swaps=5).as_dict())
    del model
    free()


def stage_int8(sessions: int = 4) -> None:
    free()
    model = random_model("personaplex-7b", device=DEVICE, dtype=torch.bfloat16, seed=0, int8=True)
    emit(what="int8_model", weights_gb=round(weight_bytes(model.lm) / 1e9, 2),
         peak_after_load_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2))
    row = bench_tick(model, sessions, frames=50, warmup=5).as_dict()
    emit(what="int8_tick", **row)
    del model
    free()


@torch.inference_mode()
def teacher_forced(lm, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Text logits [B, T, card] (float32) and hidden states of T frames streamed one at a time
    through a slot state with the LM's KV cache, each step reading only the rows filled so far
    (one CUDA graph per window, as the engine's tick; captured with the slots inactive, which
    leaves the state untouched)."""
    B = tokens.shape[0]
    state = lm.init_state(B)
    capacity = state.layers[0].keys.shape[2] - 1
    frame = tokens[:, :, :1].clone()
    active = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    graphs: dict[int, tuple] = {}
    logits, hidden = [], []
    for t in range(tokens.shape[2]):
        window = window_for(t + 1, capacity)
        if window not in graphs:
            active.fill_(False)
            graphs[window] = capture_graph(lambda: lm.step_text(frame, state, active, window=window),
                                           tokens.device, warmups=2)
            active.fill_(True)
        graph, (h, lg) = graphs[window]
        frame.copy_(tokens[:, :, t : t + 1])
        graph.replay()
        logits.append(lg.float())
        hidden.append(h.float())
    return torch.cat(logits, 1), torch.cat(hidden, 1)


def random_streams(cfg, frames: int, streams: int = 2) -> torch.Tensor:
    """[streams, 17, frames] random text and audio tokens on the GPU (seed 0): what the logits are
    teacher-forced on."""
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, cfg.card, (streams, cfg.num_codebooks, frames), generator=g)
    tokens[:, 0] = torch.randint(0, cfg.text_card, (streams, frames), generator=g)
    return tokens.to(DEVICE)


def stage_accuracy(steps: int = 120, long_steps: int = 1600) -> None:
    model = random_model("personaplex-7b", device=DEVICE, dtype=torch.bfloat16, seed=0)
    tokens = random_streams(model.config.lm, long_steps)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    ref, _ = teacher_forced(model.lm, tokens[:, :, :steps])
    q = quantize_int8_(copy.deepcopy(model.lm))
    int8, _ = teacher_forced(q, tokens[:, :, :steps])
    emit(what="accuracy_int8", steps=steps, text_logits_rel_err=rel(int8, ref),
         argmax_agreement=float((int8.argmax(-1) == ref.argmax(-1)).float().mean()))
    del q, int8
    free()
    full, _ = teacher_forced(model.lm, tokens)
    short_lm = model.lm
    short_lm.transformer.context = 1500
    state = short_lm.transformer.init_state(2, capacity=1500)
    with torch.inference_mode():
        short = torch.cat([short_lm.text_head(short_lm.transformer.step(short_lm.embed(tokens[:, :, t : t + 1]), state))[1].float()
                           for t in range(long_steps)], 1)
    tail = slice(1500, long_steps)
    emit(what="accuracy_context_1500", steps=long_steps, first_1500_rel_err=rel(short[:, :1500], full[:, :1500]),
         after_1500_rel_err=rel(short[:, tail], full[:, tail]))



def graphed_ms(fn, iters: int = 50) -> float:
    """Median time of `fn` captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return round(sorted(times)[len(times) // 2], 3)


@torch.inference_mode()
def stage_parts() -> None:
    """Where a tick's time goes: each part captured on its own (element-wise pieces fused)."""
    from npc_voice.model import fused

    fused.enable()
    model = random_model("personaplex-7b", device=DEVICE, dtype=torch.bfloat16, seed=0)
    lm, mimi = model.lm, model.mimi
    for B in (1, 32, 64):
        gen = Generator(lm)
        state = gen.init_state(B)
        mstate = mimi.init_state(B, DEVICE)
        pcm = 0.1 * torch.randn(B, 1, mimi.frame_size, device=DEVICE)
        codes = torch.randint(0, 2048, (B, 8), device=DEVICE)
        tokens = torch.randint(0, 2048, (B, 17, 1), device=DEVICE)
        hidden = torch.randn(B, lm.cfg.dim, device=DEVICE, dtype=torch.bfloat16)
        prev = torch.randint(0, 1000, (B,), device=DEVICE)
        inactive = torch.zeros(B, dtype=torch.bool, device=DEVICE)

        def depth() -> None:
            scratch = lm.depformer.init_scratch(B, DEVICE, torch.bfloat16)
            p = prev
            for k in range(8):
                p = lm.depth_step(k, hidden, p, scratch).argmax(-1)

        def linears(module: torch.nn.Module) -> None:  # every weight read once, nothing else
            for lin in module.modules():
                if isinstance(lin, torch.nn.Linear):
                    torch.nn.functional.linear(xs[lin.in_features], lin.weight)

        xs = {n: torch.randn(B, n, device=DEVICE, dtype=torch.bfloat16)
              for n in {m.in_features for m in lm.modules() if isinstance(m, torch.nn.Linear)}}
        emit(what="parts_linears", B=B, temporal_linears_ms=graphed_ms(lambda: linears(lm.transformer)),
             depth_linears_ms=graphed_ms(lambda: linears(lm.depformer)),
             temporal_weights_gb=round(sum(m.weight.nbytes for m in lm.transformer.modules()
                                           if isinstance(m, torch.nn.Linear)) / 1e9, 2))
        emit(what="parts", B=B,
             mimi_encode_ms=graphed_ms(lambda: mimi.encode_step(pcm, mstate.encoder, inactive)),
             mimi_decode_ms=graphed_ms(lambda: mimi.decode_step(codes, mstate.decoder, inactive)),
             temporal_ms=graphed_ms(lambda: lm.step_text(tokens, state.temporal, inactive)),
             depth8_ms=graphed_ms(depth),
             generator_step_ms=graphed_ms(lambda: gen.step(state, codes, inactive)))
        mimi16 = copy.deepcopy(mimi).to(torch.bfloat16)
        m16 = mimi16.init_state(B, DEVICE, torch.bfloat16)
        emit(what="parts_mimi_bf16", B=B,
             mimi_encode_ms=graphed_ms(lambda: mimi16.encode_step(pcm, m16.encoder, inactive)),
             mimi_decode_ms=graphed_ms(lambda: mimi16.decode_step(codes, m16.decoder, inactive)))
        del mimi16, m16, gen, state, mstate
        free()


def _timed_ms(fn, repeat: int = 7) -> float:
    """Median wall time of `fn` (ms) on the calling thread, the GPU waited for after each call."""
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1000)
    return round(sorted(times)[len(times) // 2], 3)


@torch.inference_mode()
def stage_build_parts() -> None:
    """Where a character build's engine-thread time goes outside the forwards (issue #11): each
    part of a prepare (voice encode, layout, embeddings) and of an install, timed alone on an idle
    7B engine, and the kernels each launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from npc_voice.bench_live import build_personas
    from npc_voice.engine import Engine
    from npc_voice.engine.prompt import prompt_frames

    import os

    model = random_model(os.environ.get("NPC_BENCH_PRESET", "personaplex-7b"), device=DEVICE, dtype=torch.bfloat16, seed=0)
    model.mimi.to(torch.bfloat16)
    engine = Engine(model, slots=2)
    builder = engine.builder
    personas = build_personas(model, 8, seed=7)
    requests = [p.request(model) for p in personas]
    enc = builder.voices
    row = {"what": "build_parts"}
    row["voice_1_of_3s_ms"] = _timed_ms(lambda: enc.encode_many(requests[:1]))
    row["voice_1_of_10s_ms"] = _timed_ms(lambda: enc.encode_many(requests[-1:]))
    row["voices_8_ms"] = _timed_ms(lambda: enc.encode_many(requests))
    voices = enc.encode_many(requests)
    frames = [prompt_frames(v, r.text_tokens, builder.special, model) for v, r in zip(voices, requests)]
    row["layout_8_ms"] = _timed_ms(lambda: [prompt_frames(v, r.text_tokens, builder.special, model)
                                            for v, r in zip(voices, requests)])
    row["embed_1_ms"] = _timed_ms(lambda: builder.embedder.embed(frames[:1]))
    row["embed_8_ms"] = _timed_ms(lambda: builder.embedder.embed(frames))
    for n in (1, 4):
        def prepare() -> None:
            for r in requests[:n]:
                builder.submit(r)
            builder.run(None)
        row[f"whole_build_{n}_ms"] = _timed_ms(prepare, repeat=3)
    builder.submit(requests[3])
    (_, prefix), = builder.run(None)
    row["prompt_frames"] = prefix.length
    slot = 0
    row["install_ms"] = _timed_ms(lambda: engine._install(_FakeSession(slot, personas[3]), prefix, personas[3]))
    row["install_graphs"] = len(engine.installer._graphs)
    emit(**row)
    for name, fn in (("install", lambda: engine._install(_FakeSession(slot, personas[3]), prefix, personas[3])),
                     ("prepare_1", lambda: (builder.submit(requests[0]), builder._prepare(
                         [(builder._queue.popleft(), 7)], []), builder._lane_jobs.__setitem__(7, None)))):
        gpu = DEVICE.type == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * gpu) as prof:
            fn()
            if gpu:
                torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        emit(what="build_parts_profile", op=name, cuda_kernels=sum(e.count for e in kernels),
             cuda_ms=round(sum(e.self_device_time_total for e in kernels) / 1000, 3),
             top_cpu=[(e.key[:60], e.count, round(e.self_cpu_time_total / 1000, 3))
                      for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]],
             top_cuda=[(e.key[:60], e.count, round(e.self_device_time_total / 1000, 3))
                       for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]])
    del engine, model
    free()


@dataclasses.dataclass
class _FakeSession:
    """What `Engine._install` reads of a session (timing an install without a conversation)."""

    slot: int
    persona: object
    seed: int = 0
    prefix_length: int = 0
    frames_out: int = 0


def stage_builds(lives=(32, 63), new: int = 8, variants=({},), rounds: int = 3) -> None:
    """New uncached characters (8 at once, voices 3-10 s, roles 20-120 words) while `live`
    full-context conversations run in the real-time loop: ticks during the builds, first frames.
    `variants`: scheduling choices to compare (`bench_builds`' build_margin, build_chunk, build_lanes);
    `rounds`: 8 new characters each (the first is the first build after start-up)."""
    from npc_voice.bench_live import bench_builds

    model = random_model("personaplex-7b", device=DEVICE, dtype=torch.bfloat16, seed=0)
    model.mimi.to(torch.bfloat16)  # the serving default on a GPU
    for live in lives:
        for variant in variants:
            for row in bench_builds(model, live, new=new, rounds=rounds, **variant):
                emit(**row, variant=variant)
            free()
    del model
    free()


# The next sweep of the build scheduling beside 63 live sessions (issue #11): the loop's margin,
# and positions per lane per forward.
BUILD_VARIANTS = ({}, {"build_margin": 0.002}, {"build_chunk": 48}, {"build_chunk": 64},
                  {"build_chunk": 64, "build_margin": 0.002})


STAGES = {"builds63": lambda: stage_builds((63,)), "builds63_sweep": lambda: stage_builds((63,), variants=BUILD_VARIANTS, rounds=2),
          "builds63_margin": lambda: stage_builds((63,), variants=({}, {"build_margin": 0.002})),
          "check": stage_check, "check_bf16": lambda: stage_check("bf16"), "builds": stage_builds, "ticks": stage_ticks, "many": stage_many, "swap": stage_swap,
          "int8": stage_int8, "accuracy": stage_accuracy, "parts": stage_parts,
          "build_parts": stage_build_parts}

def main(stages: dict) -> None:
    """Runs the stages named on the command line (all by default), one JSON line per result."""
    names = sys.argv[1:] or ["all"]
    if names == ["all"]:
        names = list(stages)
    emit(what="device", name=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", torch=torch.__version__,
         date=time.strftime("%Y-%m-%d"))
    for name in names:
        start = time.time()
        try:
            stages[name]()
        except Exception as exc:  # keep going: one failed stage must not hide the others
            import traceback

            emit(what="error", stage=name, error=repr(exc)[:500], where=traceback.format_exc()[-1500:])
            free()
        emit(what="stage_done", stage=name, seconds=round(time.time() - start, 1))


if __name__ == "__main__":
    main(STAGES)
