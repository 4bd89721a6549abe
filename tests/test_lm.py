"""The LM on small configurations: streaming equals whole-sequence, slots are independent."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from npc_voice.model.config import PRESETS, LMConfig
from npc_voice.model.generator import Generator
from npc_voice.model.lm import PersonaPlexLM
from npc_voice.model.loading import randomize
from npc_voice.model.sampling import sample, uniform_noise

SMALL = dataclasses.replace(PRESETS["tiny"].lm, dim=64, num_layers=2, num_heads=4, context=12,
                            text_card=300, card=256, depformer_dim=32, depformer_dim_feedforward=132)


@pytest.fixture(scope="module")
def lm() -> PersonaPlexLM:
    model = PersonaPlexLM(SMALL).eval()
    randomize(model, seed=1)
    with torch.no_grad():  # norms away from 1 so that a wrong norm shows
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.add_(0.2 * torch.randn(p.shape))
    return model


def random_tokens(cfg: LMConfig, B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.card, (B, cfg.num_codebooks, T), generator=g)
    tokens[:, 0] = torch.randint(0, cfg.text_card, (B, T), generator=g)
    tokens[:, :, 0] = cfg.initial_audio_token
    tokens[:, 0, 0] = cfg.initial_text_token
    tokens[0, 5, 3] = -1  # "no input" embeds to zeros
    return tokens


@torch.no_grad()
def test_streaming_equals_whole_sequence(lm: PersonaPlexLM) -> None:
    B, T = 2, 10  # T < context: the whole-sequence pass sees the same window
    tokens = random_tokens(SMALL, B, T)
    hidden, text_logits = lm.forward_text(tokens)
    state = lm.init_state(B)
    streamed = [lm.step_text(tokens[:, :, t : t + 1], state) for t in range(T)]
    torch.testing.assert_close(torch.cat([s[1] for s in streamed], 1), text_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([s[0] for s in streamed], 1), hidden, rtol=1e-5, atol=1e-5)

    depth_tokens = torch.randint(0, SMALL.card, (B, T, SMALL.dep_q))
    depth_tokens[..., 0] %= SMALL.text_card
    whole = lm.forward_depth(hidden, depth_tokens)
    for t in (0, T - 1):
        scratch = lm.depformer.init_scratch(B, hidden.device, hidden.dtype)
        for k in range(SMALL.dep_q):
            logits = lm.depth_step(k, hidden[:, t], depth_tokens[:, t, k], scratch)
            torch.testing.assert_close(logits, whole[:, t, k], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_streaming_several_frames_at_once_and_ring_wrap(lm: PersonaPlexLM) -> None:
    B, T = 2, 30  # more than the context of 12: the ring wraps
    tokens = random_tokens(SMALL, B, T, seed=3)
    one = lm.init_state(B)
    by_one = torch.cat([lm.step_text(tokens[:, :, t : t + 1], one)[1] for t in range(T)], 1)
    three = lm.init_state(B)
    by_three = torch.cat([lm.step_text(tokens[:, :, t : t + 3], three)[1] for t in range(0, T, 3)], 1)
    # Several frames at once see the same keys as long as the ring still holds them.
    torch.testing.assert_close(by_three[:, :SMALL.context], by_one[:, :SMALL.context], rtol=1e-5, atol=1e-5)
    # Past the context, attention is limited to the last `context` frames (sliding window).
    hidden, whole = lm.forward_text(tokens)
    torch.testing.assert_close(by_one, whole, rtol=1e-5, atol=1e-5)


def run_generator(gen: Generator, users: torch.Tensor, schedule=None, reset_at=None):
    """Steps a 3-slot batch; schedule(t) gives the active mask, reset_at=(t, mask) resets slots."""
    B = users.shape[1]
    state = gen.init_state(B)
    state.sampling.seed.copy_(torch.arange(B) + 11)
    outs = []
    for t in range(users.shape[0]):
        if reset_at is not None and t == reset_at[0]:
            state.reset(reset_at[1])
            state.sampling.seed.copy_(torch.arange(B) + 11)
        active = schedule(t) if schedule else None
        outs.append(gen.step(state, users[t], active))
    return outs


def skip_and_reset_slot_1(gen: Generator, users: torch.Tensor) -> tuple[list, list]:
    """Runs 3 slots plainly, with slot 1 skipping every third step, and with slot 1 reset at step
    7; checks that slots 0 and 2 come out bit-identical in all three; returns (skipped, reset)."""
    base = run_generator(gen, users)
    skipped = run_generator(gen, users, schedule=lambda t: torch.tensor([True, t % 3 != 1, True]))
    reset = run_generator(gen, users, reset_at=(7, torch.tensor([False, True, False])))
    for a, b, c in zip(base, skipped, reset):
        for other in (0, 2):
            assert torch.equal(a.text[other], b.text[other]) and torch.equal(a.audio[other], b.audio[other])
            assert torch.equal(a.text[other], c.text[other]) and torch.equal(a.audio[other], c.audio[other])
    return skipped, reset


def test_skipping_or_resetting_a_slot_leaves_others_bit_identical(lm: PersonaPlexLM) -> None:
    gen = Generator(lm)
    users = torch.randint(0, SMALL.card, (16, 3, gen.num_user))
    skipped, reset = skip_and_reset_slot_1(gen, users)
    # A skipped step is invisible to the slot itself: it resumes where it stopped.
    resumed = [o for t, o in enumerate(skipped) if t % 3 != 1]
    for t, o in enumerate(resumed[:8]):
        assert o.frame[1] == t
    # A reset slot starts over: from the reset on, it replays a fresh stream fed the same frames.
    fresh = run_generator(gen, users[7:])
    for a, b in zip(reset[7:], fresh):
        assert torch.equal(a.audio[1], b.audio[1]) and torch.equal(a.text[1], b.text[1])


def test_first_frame_is_not_valid_and_frames_are_counted(lm: PersonaPlexLM) -> None:
    gen = Generator(lm)
    outs = run_generator(gen, torch.randint(0, SMALL.card, (4, 3, gen.num_user)))
    assert [bool(o.valid.all()) for o in outs] == [False, True, True, True]
    assert [int(o.frame[0]) for o in outs] == [0, 1, 2, 3]
    assert all(((o.audio >= 0) & (o.audio < SMALL.card)).all() for o in outs[1:])


def test_forced_tokens_replace_samples(lm: PersonaPlexLM) -> None:
    gen = Generator(lm)
    state = gen.init_state(2)
    user = torch.zeros(2, gen.num_user, dtype=torch.long)
    forced_text = torch.tensor([42, -1])
    forced_audio = torch.full((2, gen.num_agent), -1)
    forced_audio[0] = torch.arange(gen.num_agent) + 5
    first = gen.step(state, user, forced_text=forced_text, forced_audio=forced_audio)
    # Step 0 predicts the delayed codebooks 1..7 of frame 0 ...
    assert torch.equal(first.audio[0, 1:], torch.arange(6, 5 + gen.num_agent))
    out = gen.step(state, user)
    assert out.text[0] == 42  # ... and the text and codebook 0 of frame 1
    assert out.audio[0, 0] == 5
    assert out.text[1] != 42 or out.audio[1, 0] != 5  # slot 1 was not forced


def test_sampling_greedy_topk_and_per_slot_seeds() -> None:
    V = 50
    logits = torch.randn(4, V)
    seeds = torch.tensor([1, 2, 3, 4])
    noise = uniform_noise(seeds, torch.zeros(4, dtype=torch.long), 0, V)
    greedy = sample(logits, torch.zeros(4), torch.zeros(4, dtype=torch.long), noise)
    assert torch.equal(greedy, logits.argmax(-1))
    # top-1 sampling is greedy whatever the temperature
    top1 = sample(logits, torch.ones(4), torch.ones(4, dtype=torch.long), noise)
    assert torch.equal(top1, logits.argmax(-1))
    # a slot's noise depends only on its own seed and counter
    again = uniform_noise(torch.tensor([9, 2, 7, 4]), torch.zeros(4, dtype=torch.long), 0, V)
    assert torch.equal(again[1], noise[1]) and not torch.equal(again[0], noise[0])
    # top-k keeps samples inside the k best, and draws follow the softmax
    probs = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0, -5.0]), 0)
    counts = torch.zeros(5)
    n = 4000
    draws = sample(torch.log(probs).expand(n, 5), torch.ones(n), torch.full((n,), 3, dtype=torch.long),
                   uniform_noise(torch.arange(n), torch.zeros(n, dtype=torch.long), 0, 5))
    counts.index_add_(0, draws, torch.ones(n))
    assert counts[3:].sum() == 0
    expected = probs[:3] / probs[:3].sum()
    assert torch.allclose(counts[:3] / n, expected, atol=0.03)
