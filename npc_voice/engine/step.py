"""The batched 80 ms step of every slot: Mimi encode -> LM step -> Mimi decode, on static buffers.

On CUDA the whole step is captured in CUDA graphs, one per attention window (a power of two of KV
rows, or the full context): a replay launches everything at once, so the step costs what its
kernels cost and not the thousands of launches Python would issue. Inputs are copied into the
static buffers before a replay and the outputs read back after it: one host sync per tick.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..model import fused
from ..model.generator import NOT_FORCED, Generator, GeneratorState
from ..model.loading import LoadedModel
from ..model.mimi import MimiState


# Parts of the step compiled whole by torch.compile: "mimi" (Mimi's streaming encode and decode
# steps, ~400-500 small kernels each) and "depth" (the depth transformer's 8 steps with their
# sampling, ~800 small kernels). Each traces as one graph with no break, so inductor fuses its
# element-wise work, and the result is captured in the step's CUDA graph like any other kernels.
# Measured on an H200 (docs/performance.md, `tools/bench/gpu_fuse.py`): a one-session tick 10.1 ->
# 9.0 ms, 64 sessions 29.2-29.4 -> 28.3-28.5 ms, for 40-100 s of compiling when an engine starts. Default: both where the
# step runs in CUDA graphs, none elsewhere; `NPC_VOICE_COMPILE` (a comma list, or "none") overrides;
# `COMPILE_BACKEND` "aot_eager" traces without generating code (the tests).
_env = os.environ.get("NPC_VOICE_COMPILE")
COMPILE: frozenset[str] | None = None if _env is None else frozenset(p for p in _env.split(",") if p not in ("", "none"))
COMPILE_BACKEND = os.environ.get("NPC_VOICE_COMPILE_BACKEND", "inductor")
COMPILABLE = frozenset({"mimi", "depth"})


def compiled(fn: Callable) -> Callable:
    """`fn` compiled whole for fixed shapes (one specialisation per batch size and window)."""
    return torch.compile(fn, backend=COMPILE_BACKEND, dynamic=False, fullgraph=True)


@dataclass
class StepOutput:
    pcm: np.ndarray  # float32 [B, frame_size]
    text: np.ndarray  # int64 [B]


def capture_graph(fn: Callable[[], Any], device: torch.device, warmups: int = 1, pool: Any = None
                  ) -> tuple[torch.cuda.CUDAGraph, Any]:
    """`fn` captured as a CUDA graph on `device` (its warm-up runs first on a side stream, as CUDA
    graphs require); returns the graph and what the captured call returned (its output tensors,
    which every replay rewrites). `pool`: a memory pool shared with graphs replayed one after
    another, never at once. The one way npc-voice captures a graph: step, builds, voices, installs."""
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    return graph, out


def window_for(frames_seen: int, capacity: int, smallest: int = 64) -> int:
    """The attention window (KV rows) that covers `frames_seen`: the next power of two, at most
    the cache capacity. Few windows means few graphs; powers of two waste under half the reads."""
    window = smallest
    while window < frames_seen:
        window *= 2
    return min(window, capacity)


class BatchedStep:
    def __init__(self, model: LoadedModel, gen: Generator, gen_state: GeneratorState, mimi_state: MimiState,
                 use_graphs: bool | None = None):
        self.model, self.gen, self.gen_state, self.mimi_state = model, gen, gen_state, mimi_state
        device = model.device
        B = gen_state.offset.shape[0]
        self.batch = B
        self.capacity = gen_state.temporal.layers[0].keys.shape[2] - 1  # the last row is scratch
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs:
            fused.enable()  # fuse the element-wise pieces: graphs make kernel count the cost
        self.pcm_in = torch.zeros(B, 1, model.mimi.frame_size, device=device)
        self.active = torch.zeros(B, dtype=torch.bool, device=device)
        self.forced_text = torch.full((B,), NOT_FORCED, dtype=torch.long, device=device)
        self.pcm_out = torch.zeros(B, model.mimi.frame_size, device=device)
        self.text_out = torch.zeros(B, dtype=torch.long, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pinned = dict(pin_memory=True) if device.type == "cuda" else {}
        self._host_pcm = torch.zeros(B, model.mimi.frame_size, **pinned)
        self._host_text = torch.zeros(B, dtype=torch.long, **pinned)
        mimi = model.mimi
        parts = (COMPILABLE if self.use_graphs else frozenset()) if COMPILE is None else COMPILE
        if unknown := parts - COMPILABLE:
            raise ValueError(f"NPC_VOICE_COMPILE: unknown part(s) {', '.join(sorted(unknown))} "
                             f"(expected some of {', '.join(sorted(COMPILABLE))}, or none)")
        self.compiled = parts
        self._encode, self._decode = mimi.encode_step, mimi.decode_step
        if "mimi" in parts:
            self._encode, self._decode = compiled(mimi.encode_step), compiled(mimi.decode_step)
        self._depth = compiled(gen.depth) if "depth" in parts else gen.depth

    @torch.inference_mode()
    def _run(self, window: int) -> None:
        mimi = self.model.mimi
        codes = self._encode(self.pcm_in, self.mimi_state.encoder, self.active)
        out = self.gen.step(self.gen_state, codes, self.active, forced_text=self.forced_text, window=window,
                           depth=self._depth)
        audio = out.audio.clamp(0, mimi.cardinality - 1)  # the first frame's codebook 0 is the initial token
        self.pcm_out.copy_(self._decode(audio, self.mimi_state.decoder, self.active)[:, 0])
        self.text_out.copy_(out.text)

    def _graph(self, window: int) -> torch.cuda.CUDAGraph:
        graph = self._graphs.get(window)
        if graph is None:
            # Warm up with every slot inactive: a masked step leaves every state bit-identical.
            saved = self.active.clone()
            self.active.zero_()
            graph, _ = capture_graph(lambda: self._run(window), self.active.device, warmups=2)
            self.active.copy_(saved)
            self._graphs[window] = graph
        return graph

    def warm_up(self) -> None:
        """Captures the graph of every attention window now, so that no tick pays for a capture
        (or for compiling the fused pieces) when a conversation grows into a larger window."""
        if not self.use_graphs:
            return
        window = 1
        while True:
            window = window_for(window + 1, self.capacity)
            self._graph(window)
            if window == self.capacity:
                break

    def __call__(self, pcm: np.ndarray, active: np.ndarray, forced_text: np.ndarray, frames_seen: int) -> StepOutput:
        """pcm [B, frame] float32, active [B] bool, forced_text [B] long; frames_seen: the most
        frames any active slot will have seen after this step (chooses the attention window)."""
        window = window_for(frames_seen, self.capacity)
        self.pcm_in[:, 0].copy_(torch.from_numpy(pcm), non_blocking=True)
        self.active.copy_(torch.from_numpy(active), non_blocking=True)
        self.forced_text.copy_(torch.from_numpy(forced_text), non_blocking=True)
        if self.use_graphs:
            if window not in self._graphs:
                self._graph(window)
                self.active.copy_(torch.from_numpy(active))
            self._graphs[window].replay()
        else:
            self._run(window)
        self._host_pcm.copy_(self.pcm_out, non_blocking=True)
        self._host_text.copy_(self.text_out, non_blocking=True)
        if self.pcm_out.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return StepOutput(self._host_pcm.numpy().copy(), self._host_text.numpy().copy())
