"""The sampler's k-th largest value (`sampling.kth_largest`, `sampling.SELECT`): found by bisection on
the logits' order keys it is the exact value a sort finds, so the sampler draws the same tokens."""

from __future__ import annotations

import pytest
import torch

from npc_voice.model import sampling
from npc_voice.model.sampling import MAX_TOP_K, kth_largest, sample, uniform_noise


def test_the_kth_largest_is_the_sorted_rows_kth_value() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 300, generator=g)
    x[1, :50] = x[1, 50]  # ties at the threshold
    x[2, ::3] = float("-inf")
    x[3] = x[3].round()  # many ties, zeros of both signs
    x[3, :10] = -0.0
    x[4] = -x[4].abs()  # all negative
    k = torch.tensor([1, 25, 120, 250, 300, 7])
    expected = x.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])[:, 0]
    assert torch.equal(kth_largest(x, k), expected)


@pytest.mark.parametrize("vocab", [2048, 40])
def test_bisection_and_topk_draw_the_same_tokens(monkeypatch, vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    B = 8
    logits = 3 * torch.randn(B, vocab, generator=g)
    temperature = torch.tensor([0.7, 0.8, 0.0, 1.0, 1e-3, 2.0, 0.5, 0.9])
    top_k = torch.tensor([25, 250, 1, MAX_TOP_K, 0, MAX_TOP_K + 10, 3, 60])
    seeds = torch.arange(B)
    drawn = {}
    for select in ("topk", "bisect"):
        monkeypatch.setattr(sampling, "SELECT", select)
        drawn[select] = torch.stack([sample(logits, temperature, top_k, uniform_noise(seeds, torch.full((B,), t), 0, vocab))
                                     for t in range(20)])
    assert torch.equal(drawn["topk"], drawn["bisect"])
    assert len(drawn["topk"].unique()) > B  # the draws do vary


def test_the_bisection_traces_whole(monkeypatch) -> None:
    """Inside the compiled depth step (`step.COMPILE`) the bisection must trace with no graph break."""
    monkeypatch.setattr(sampling, "SELECT", "bisect")
    g = torch.Generator().manual_seed(1)
    logits, noise = torch.randn(3, 64, generator=g), torch.rand(3, 64, generator=g)
    temperature, top_k = torch.tensor([0.7, 0.0, 1.0]), torch.tensor([5, 1, 30])
    compiled = torch.compile(sample.__wrapped__, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(logits, temperature, top_k, noise), sample(logits, temperature, top_k, noise))


# --- the fused sampling kernel (npc_voice/model/sample_kernel.py), under Triton's interpreter ------


def test_the_depth_steps_noise_streams_are_consecutive_streams() -> None:
    """The depth step k draws with stream 1 + k (`sampling.draw_tokens`): the very noise the
    generator took from one [B, A, card] block of streams 1..A before."""
    seed, offset = torch.tensor([0, 5, -3, 2**40 + 7]), torch.tensor([0, 1, 12345, 2**33])
    block = uniform_noise(seed, offset, 1, 2048, streams=8)  # [B, A, card]
    for k in range(8):
        assert torch.equal(block[:, k], uniform_noise(seed, offset, 1 + k, 2048))
