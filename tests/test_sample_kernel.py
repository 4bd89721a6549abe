"""The Triton sampler (`npc_voice/model/sample_kernel.py`, run here under Triton's interpreter): one
launch per draw gives the tokens `sampling.sample` gives with `sampling.uniform_noise`, its noise
bit for bit, and it stays one operator inside torch.compile."""

from __future__ import annotations

import pytest
import torch

from npc_voice.model import sampling
from npc_voice.model.sampling import MAX_TOP_K, sample, uniform_noise


def _kernel():
    pytest.importorskip("triton")  # a test dependency on Linux x86-64 (pyproject's test extra)
    from npc_voice.model import sample_kernel

    return sample_kernel


def test_the_kernels_noise_is_uniform_noise() -> None:
    """The noise the kernel races with, hashed there in uint32, is `uniform_noise` bit for bit
    (seeds and counters of any sign and size: only their low 31 bits count)."""
    sk = _kernel()
    seed = torch.tensor([0, 1, -1, 2**31 - 1, 2**31, 2**40 + 3, -(2**45), 1517055])
    counter = torch.tensor([0, 7, 2**31 + 5, 3, -2, 99999, 2**50, 0])
    for stream, size in ((0, 1000), (1, 2048), (8, 40)):
        assert torch.equal(sk.noise(seed, counter, stream, size), uniform_noise(seed, counter, stream, size))


def _rows(vocab: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """8 rows of logits with what a draw must get right, and their sampling settings."""
    g = torch.Generator().manual_seed(vocab)
    x = 3 * torch.randn(8, vocab, generator=g)
    order = x[0].argsort(descending=True)
    x[0, order[5:15]] = x[0, order[5]].item()  # ties across the threshold (k = 10)
    x[1, ::3] = float("-inf")
    x[2, [5, 9]] = x[2].max().item() + 1  # greedy: the first of two largest
    x[3, : vocab * 4 // 5] = float("-inf")  # fewer finite logits than k: the threshold is -inf
    x[6, [1, 4, 7, 30]] = x[6].max().item() + 2  # four tied on top, k = 3: all four kept
    x[7] = x[7].round()  # many ties, zeros of both signs
    x[7, :10] = -0.0
    temperature = torch.tensor([0.7, 0.8, 0.0, 1.0, 1e-3, 2.0, 0.5, 0.9])
    top_k = torch.tensor([10, 250, 1, MAX_TOP_K, 0, MAX_TOP_K + 10, 3, 25])
    return x.to(dtype), temperature, top_k


@pytest.mark.parametrize("vocab, dtype, chunk", [(2048, torch.bfloat16, None), (1000, torch.float32, 256),
                                                 (40, torch.bfloat16, None)])
def test_the_kernel_draws_what_sample_draws(monkeypatch, vocab: int, dtype: torch.dtype, chunk: int | None) -> None:
    """8 rows x 20 frames, one launch: the same tokens as `sample` with `uniform_noise`, exactly.
    (Numpy's exp and log stand in for libdevice's under the interpreter and may differ from
    PyTorch's by an ulp: only a near tie of two candidates could then draw differently, and these
    draws have none.) `chunk`: the kernel's tail in several chunks, the last one partial."""
    sk = _kernel()
    if chunk is not None:
        monkeypatch.setitem(sk.CONFIG, "chunk", chunk)
    x, temperature, top_k = _rows(vocab, dtype)
    frames = 20
    logits, temperature, top_k = x.repeat(frames, 1), temperature.repeat(frames), top_k.repeat(frames)
    seed = torch.arange(8).repeat(frames) * 7919 - 5
    counter = torch.arange(frames).repeat_interleave(8) + 1000
    ours = sk.draw(logits, temperature, top_k, seed, counter, 3)
    expected = sample(logits, temperature, top_k, uniform_noise(seed, counter, 3, vocab))
    assert torch.equal(ours, expected)
    ours = ours.view(frames, 8)
    assert (ours[:, 2] == 5).all()  # greedy: the first index of the largest logit
    assert set(ours[:, 6].tolist()) == {1, 4, 7, 30}  # the tied top, all kept
    assert len(ours.unique()) > 8  # the draws do vary


def test_a_token_the_top_k_dropped_is_never_drawn_where_the_hash_is_near_2_to_the_31() -> None:
    """Hash values within 64 of 2**31 used to round the noise to exactly 1.0: -log(u) = -0.0, and a
    dropped candidate's 0 / -0.0 = NaN won `torch.argmax` (about one text draw in a thousand was a
    random token of the whole vocabulary). The noise stays below 1.0 now, and both draws keep to the
    top-k there."""
    sk = _kernel()
    seed, counter = torch.full((4,), 1517055), torch.zeros(4, dtype=torch.long)
    u = uniform_noise(seed[:1], counter[:1], 0, 40)[0]
    assert u[3] == 1.0 - 2.0**-24 and bool((u < 1.0).all())  # the index whose hash rounds to 1.0
    assert torch.equal(sk.noise(seed[:1], counter[:1], 0, 40)[0], u)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 40, generator=g)
    x[:, 3] = -10.0  # index 3 far below the top 5: dropped
    temperature, top_k = torch.tensor([0.7, 0.7, 1.0, 1.0]), torch.tensor([5, 5, 5, 1])
    expected = sample(x, temperature, top_k, uniform_noise(seed, counter, 0, 40))
    top = x.topk(5, dim=-1).indices
    assert all(int(t) in top[i].tolist() for i, t in enumerate(expected)) and not (expected == 3).any()
    assert torch.equal(sk.draw(x, temperature, top_k, seed, counter, 0), expected)


def test_the_kernel_on_the_text_vocabulary() -> None:
    sk = _kernel()
    g = torch.Generator().manual_seed(32000)
    x = (3 * torch.randn(2, 32000, generator=g)).bfloat16()
    temperature, top_k = torch.tensor([0.7, 1.0]), torch.tensor([25, 0])
    seed, counter = torch.tensor([1, 2]), torch.tensor([3, 4])
    expected = sample(x, temperature, top_k, uniform_noise(seed, counter, 0, 32000))
    assert torch.equal(sk.draw(x, temperature, top_k, seed, counter, 0), expected)


def test_draw_tokens_runs_the_kernel_when_chosen_and_traces_whole(monkeypatch) -> None:
    """`SELECT = "kernel"`: `draw_tokens` launches the kernel (an operator torch.compile keeps whole,
    fullgraph); "auto" on a CPU is PyTorch's draw, not the kernel."""
    from torch._dynamo.backends.registry import lookup_backend

    sk = _kernel()
    calls = []
    launch = sk.draw
    monkeypatch.setattr(sk, "draw", lambda *args: calls.append(args) or launch(*args))
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 64, generator=g)
    temperature, top_k = torch.tensor([0.7, 0.0, 1.0]), torch.tensor([5, 1, 30])
    seed, counter = torch.tensor([1, 2, 3]), torch.tensor([10, 11, 12])
    expected = sample(logits, temperature, top_k, uniform_noise(seed, counter, 2, 64))
    assert torch.equal(sampling.draw_tokens(logits, temperature, top_k, seed, counter, 2), expected)
    assert not calls  # "auto" on a CPU
    monkeypatch.setattr(sampling, "SELECT", "kernel")
    assert torch.equal(sampling.draw_tokens(logits, temperature, top_k, seed, counter, 2), expected)
    assert len(calls) == 1
    graphs = []

    def aot_eager(gm, example_inputs):  # aot_eager, the graph kept to be looked at
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(sampling.draw_tokens, backend=aot_eager, fullgraph=True)
    assert torch.equal(compiled(logits, temperature, top_k, seed, counter, 2), expected)
    assert len(calls) == 2 and "torch.ops.npc_voice.draw" in graphs[0].code  # one opaque operator
