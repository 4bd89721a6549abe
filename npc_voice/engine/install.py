"""Installing a built character prompt (a `Prefix`) into a conversation slot, in one fixed-shape pass.

An install gives a slot everything a prompt left: the temporal KV rows of its positions (quantized
first for an 8-bit cache), the delayed-token ring, the position counters, the sampling settings,
a fresh Mimi encoder and a primed Mimi decoder, and the first conversation position's text token
and agent codebook 0 (sampled from the prompt's last hidden state). Done with per-slot indexing on
the host, that is some 600 small launches (4.5 ms of the engine thread on an idle H200, 6-9 ms beside
63 live sessions: docs/performance.md). Here the slot, the prompt's length and the sampling
settings are device tensors, so the whole install is one body of fixed shapes: on a GPU one CUDA
graph per bucket of KV rows (`ROW_BUCKET`, captured at start-up), replayed after a handful of copies
into static buffers. On the CPU the same body runs eagerly.
"""

from __future__ import annotations

import torch

from ..model.generator import Generator, GeneratorState, Sampling, SamplingParams
from ..model.mimi import MimiState
from ..model.sampling import draw_tokens
from ..model.streaming import StreamState, byte_view
from .prompt import Prefix
from .step import capture_graph

ROW_BUCKET = 64  # KV rows an install graph covers, rounded up to a multiple of this (few graphs)


class SlotInstaller:
    """Installs prefixes of up to `rows` KV rows into slots of `state` (and of `mimi`, when given:
    each installed slot's encoder and decoder copied from `fresh_encoder` / `primed_decoder`)."""

    def __init__(self, gen: Generator, state: GeneratorState, rows: int, use_graphs: bool = False,
                 mimi: MimiState | None = None, fresh_encoder: StreamState | None = None,
                 primed_decoder: StreamState | None = None, pool=None):
        self.gen, self.state, self.use_graphs = gen, state, use_graphs
        if pool is None and use_graphs:
            pool = torch.cuda.graph_pool_handle()  # one for every bucket's graph: they replay one at a time
        self.pool = pool
        self.mimi = (mimi, fresh_encoder, primed_decoder) if mimi is not None else None
        lm = gen.lm
        caches = state.temporal.layers
        _, H, S1, D = caches[0].keys.shape
        self.capacity = S1 - 1  # ring rows (the last row is the skipped slots' scratch)
        self.rows = min(rows, self.capacity)
        device = self.device = state.offset.device
        dtype = lm.dtype
        L = len(caches)
        # Static inputs, rewritten before each run: the prefix's rows (the first n of them), its
        # ring, last hidden state and text logits, and [slot, N, text top-k, audio top-k, seed,
        # text temperature, audio temperature] (the temperatures as float64 bits) in one tensor.
        self.keys = torch.zeros(L, H, self.rows, D, device=device, dtype=dtype)  # [L, H, R, D]
        self.values = torch.zeros_like(self.keys)
        self.ring = torch.zeros(gen.cfg.num_codebooks, gen.ring, dtype=torch.long, device=device)  # [K, CT]
        with torch.inference_mode():
            hidden, logits = lm.text_head(torch.zeros(1, 1, lm.cfg.dim, device=device, dtype=dtype))
        self.hidden = torch.zeros_like(hidden[0])  # [1, dim]
        self.logits = torch.zeros_like(logits[0])  # [1, text_card]
        self.args = torch.zeros(7, dtype=torch.long, device=device)
        self._host = torch.zeros(7, dtype=torch.long, pin_memory=device.type == "cuda")
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self.params = SamplingParams(*(t[:1].clone() for t in state.sampling.tensors()))  # the slot's, [1]
        self.out = torch.zeros(2, dtype=torch.long, device=device)  # [text, agent codebook 0]
        self._two = torch.arange(2, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}  # rows of the bucket -> graph

    def buckets(self) -> list[int]:
        return sorted({min(self.rows, b) for b in range(ROW_BUCKET, self.rows + ROW_BUCKET, ROW_BUCKET)})

    def warm_up(self) -> None:
        """Captures every bucket's graph (no-op without graphs). The warm-up run before each capture
        installs a zero prefix into slot 0: call this before any conversation starts."""
        if self.use_graphs:
            for rows in self.buckets():
                self._graph(rows)
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def install(self, slot: int, prefix: Prefix, seed: int, sampling: Sampling = Sampling()) -> None:
        """Gives `slot` the character of `prefix` (queued on the device, not waited for). Every field
        of the slot is set, so nothing needs clearing first: KV rows past the prompt hold stale values
        that the slot's position makes invisible."""
        N, n = prefix.length, prefix.keys.shape[2]
        if n > self.rows:
            raise ValueError(f"a prompt of {n} KV rows is longer than a character can be ({self.rows})")
        if self._copied is not None:
            self._copied.synchronize()  # the last install's arguments have left the pinned buffer
        temps = torch.tensor([sampling.text_temperature, sampling.audio_temperature], dtype=torch.float64)
        self._host[:5] = torch.tensor([slot, N, sampling.text_top_k, sampling.audio_top_k, seed])
        self._host[5:] = temps.view(torch.long)
        torch._foreach_copy_([self.args, self.keys[:, :, :n], self.values[:, :, :n], self.ring, self.hidden[0],
                              self.logits[0]],
                             [self._host, prefix.keys, prefix.values, prefix.ring, prefix.hidden, prefix.text_logits],
                             non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        rows = next(b for b in self.buckets() if b >= n)
        if self.use_graphs:
            self._graph(rows).replay()
        else:
            self._run(rows)

    def wait(self) -> None:
        """Returns once the installs queued so far are done on the device (timing them)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _graph(self, rows: int) -> torch.cuda.CUDAGraph:
        graph = self._graphs.get(rows)
        if graph is None:
            with torch.inference_mode():
                graph, _ = capture_graph(lambda: self._run(rows), self.device, pool=self.pool)
            self._graphs[rows] = graph
        return graph

    def _run(self, R: int) -> None:
        """The install body over the first R staged rows: fixed shapes, device-side indices only."""
        state, args = self.state, self.args
        slot, N = args[0:1], args[1:2]  # [1] long each
        temps = args[5:7].view(torch.float64)
        p = self.params
        for mine, arg in ((p.text_top_k, args[2:3]), (p.audio_top_k, args[3:4]), (p.seed, args[4:5]),
                          (p.text_temperature, temps[0:1]), (p.audio_temperature, temps[1:2])):
            mine.copy_(arg)
        for mine, theirs in zip(state.sampling.tensors(), p.tensors()):
            mine.index_copy_(0, slot, theirs)
        # KV rows: staged row i is position N - n + i, kept in ring row (N - n + i) % capacity
        # (rows i >= n hold stale data for positions >= N: invisible until written again).
        n = torch.clamp(N, max=self.rows)
        ring_rows = torch.remainder(torch.arange(R, device=self.device) + (N - n), self.capacity)  # [R]
        for layer, cache in enumerate(state.temporal.layers):  # quantized on the way for an 8-bit cache
            cache.write_slot(slot, ring_rows, self.keys[layer : layer + 1, :, :R], self.values[layer : layer + 1, :, :R])
        state.temporal.position.index_copy_(0, slot, N)
        state.offset.index_copy_(0, slot, N)
        state.tokens.index_copy_(0, slot, self.ring[None])
        # Position N's text and codebook 0 come from position N-1's prediction, sampled for this slot.
        counter = N - 1
        text = draw_tokens(self.logits, p.text_temperature, p.text_top_k, p.seed, counter, 0)
        scratch = self.gen.lm.depformer.init_scratch(1, self.device, self.hidden.dtype)
        audio_logits = self.gen.lm.depth_step(0, self.hidden, text, scratch)
        cb0 = draw_tokens(audio_logits, p.audio_temperature, p.audio_top_k, p.seed, counter, 1)
        self.out.copy_(torch.cat([text, cb0]))
        state.tokens.index_put_((slot, self._two, torch.remainder(N, self.gen.ring)), self.out)
        if self.mimi is not None:
            mimi, encoder, decoder = self.mimi
            for mine, theirs in [*zip(mimi.encoder.tensors(), encoder.tensors(), strict=True),
                                 *zip(mimi.decoder.tensors(), decoder.tensors(), strict=True)]:
                byte_view(mine).index_copy_(0, slot, byte_view(theirs))


def install_prefix(gen: Generator, state: GeneratorState, slot: int, prefix: Prefix, seed: int,
                   sampling: Sampling = Sampling()) -> None:
    """`SlotInstaller.install` with an installer made for this one prefix (tools and tests; the
    engine keeps one, graphed on a GPU, that also resets the slot's Mimi state)."""
    SlotInstaller(gen, state, rows=prefix.keys.shape[2]).install(slot, prefix, seed, sampling)
