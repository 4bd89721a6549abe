"""Prompt building in chunks (`npc_voice/engine/build.py`): the same prefix as the reference's one
step per frame, for prompts shorter and longer than the context, and voices encoded in one pass."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from npc_voice.engine.build import Cost, PrefixBuilder, PromptRequest, build_prefix
from npc_voice.engine.install import install_prefix
from npc_voice.engine.prompt import prompt_frames, special_codes, text_prompt_tokens, voice_from_samples
from npc_voice.model.config import get_preset
from npc_voice.model.generator import Generator
from npc_voice.model.loading import random_model
from test_engine import frame_by_frame, tone


def small_context_model(context: int):
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, context=context),
                              mimi=dataclasses.replace(cfg.mimi, transformer=dataclasses.replace(
                                  cfg.mimi.transformer, context=8)))
    return random_model(cfg, seed=11)


@torch.no_grad()
def test_voice_in_one_pass_gives_the_streamed_codes() -> None:
    """Past the Mimi transformer's context (8 steps = 4 frames here, 10 s for the released Mimi) a
    plain whole-clip pass differs from streaming; the masked pass does not."""
    model = small_context_model(64)
    mimi = model.mimi
    samples = tone(1.5, 170)  # 19 frames: the encoder's ring wraps several times
    batched = voice_from_samples("v", samples, mimi).codes  # [F, K]
    from npc_voice.engine.prompt import normalized_voice

    pcm = np.zeros(batched.shape[0] * mimi.frame_size, np.float32)
    pcm[: samples.shape[0]] = normalized_voice(samples, mimi)
    state = mimi.init_encoder_state(1)
    frames = torch.from_numpy(pcm).view(1, 1, -1, mimi.frame_size)
    streamed = torch.stack([mimi.encode_step(frames[:, :, f], state)[0] for f in range(frames.shape[2])])
    assert torch.equal(batched, streamed)

    # Before quantization (which hides small differences on random weights): the masked pass equals
    # streaming and the plain pass does not, so the mask is what makes the codes equal.
    state = mimi.init_encoder_state(1)
    steps = []
    for f in range(frames.shape[2]):
        x = mimi.encoder.step(frames[:, :, f], state.seanet)
        steps.append(mimi.downsample.step(mimi.encoder_transformer.step(x, state.transformer), state.downsample))
    streamed_latent = torch.cat(steps, dim=-1)
    seanet = mimi.encoder(torch.from_numpy(pcm).view(1, 1, -1))
    masked = mimi.downsample(mimi.encoder_transformer(seanet, mimi.config.downsample_stride))
    plain = mimi.downsample(mimi.encoder_transformer(seanet))
    torch.testing.assert_close(masked, streamed_latent, rtol=1e-5, atol=1e-5)
    assert (plain - streamed_latent).abs().max() > 1e-3


@torch.no_grad()
def test_chunked_prefix_equals_frame_by_frame_even_past_the_context() -> None:
    """A 60-frame prompt built 8 positions a chunk, with a 24-frame context: the slot's cache (the
    last 24 positions in their ring rows), its ring and the logits that follow equal the reference's
    one full step per frame, whose cache wraps."""
    model = small_context_model(24)
    gen = Generator(model.lm)
    voice = voice_from_samples("v", tone(0.8, 220), model.mimi)
    role = text_prompt_tokens(model, "You ferry travellers across the black river for a silver coin each.")
    frames = prompt_frames(voice, role, special_codes(model.mimi), model)
    F = frames.tokens.shape[1]
    assert F > 2 * 24

    slow = frame_by_frame(gen, frames.tokens, seed=3)
    prefix = build_prefix(model, gen, frames, chunk=8)
    assert prefix.length == F and prefix.keys.shape[2] == 24
    fast = gen.init_state(2)
    install_prefix(gen, fast, 0, prefix, seed=3)
    for a, b in zip(fast.temporal.layers, slow.temporal.layers):
        torch.testing.assert_close(a.keys[0, :, :24], b.keys[0, :, :24], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values[0, :, :24], b.values[0, :, :24], rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.tokens[0][fast.tokens[0] != -2], slow.tokens[0][fast.tokens[0] != -2])
    probe = torch.full((2, 17, 1), 7, dtype=torch.long)
    torch.testing.assert_close(model.lm.step_text(probe, fast.temporal, torch.tensor([True, False]))[1][0],
                               model.lm.step_text(probe[:1], slow.temporal)[1][0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_builds_share_forwards_and_respect_the_budget() -> None:
    """Two builds in two lanes advance in the same forwards; a zero budget runs nothing (until a
    build has waited `max_wait_s`), and a run without a budget finishes everything."""
    model = random_model("tiny", seed=2)
    gen = Generator(model.lm)
    builder = PrefixBuilder(model, gen, lanes=2, chunk=16, max_wait_s=60.0)
    requests = [PromptRequest(f"k{i}", "v", text_prompt_tokens(model, "You bake bread. " * (i + 1)),
                              samples=tone(1.0 + i, 200 + 50 * i)) for i in range(2)]
    for r in requests:
        builder.submit(r)
    assert builder.run(0.0) == [] and builder.chunks_run == 0 and builder.pending == 2
    done = builder.run(None)
    assert sorted(r.key for r, _ in done) == ["k0", "k1"] and builder.pending == 0
    lengths = [p.length for _, p in done]
    assert builder.chunks_run == -(-max(lengths) // 16)  # in parallel, not one after the other
    for request, prefix in done:  # each equals the same prompt built alone
        voice = voice_from_samples("v", request.samples, model.mimi, normalized=True)
        alone = build_prefix(model, gen, prompt_frames(voice, request.text_tokens, special_codes(model.mimi), model))
        torch.testing.assert_close(prefix.keys, alone.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prefix.text_logits, alone.text_logits, rtol=1e-5, atol=1e-5)


def _requests(model, n: int) -> list[PromptRequest]:
    return [PromptRequest(f"k{i}", "v", text_prompt_tokens(model, "You mend nets by the harbour. " * (i + 1)),
                          samples=tone(0.8 + 0.3 * i, 190 + 40 * i)) for i in range(n)]


def _alone(model, gen, request: PromptRequest):
    voice = voice_from_samples("v", request.samples, model.mimi, normalized=True)
    return build_prefix(model, gen, prompt_frames(voice, request.text_tokens, special_codes(model.mimi), model))


@torch.no_grad()
def test_a_forward_covers_only_the_lanes_in_use() -> None:
    """One build in an 8-lane builder runs 1-lane forwards (it costs what it needs, not 8 lanes'
    worth); three builds are prepared together and run 4-lane forwards (lanes [0, 4)), until the
    upper ones are done."""
    model = random_model("tiny", seed=2)
    gen = Generator(model.lm)
    builder = PrefixBuilder(model, gen, lanes=8, chunk=16)
    assert builder.sizes == [1, 2, 4, 8]
    one, = _requests(model, 1)
    builder.submit(one)
    (_, prefix), = builder.run(None)
    assert {lanes for op, lanes, *_ in builder.log if op == "chunk"} == {1}
    torch.testing.assert_close(prefix.keys, _alone(model, gen, one).keys, rtol=1e-5, atol=1e-5)

    builder.log.clear()
    three = _requests(model, 3)
    for r in three:
        builder.submit(r)
    done = dict((r.key, p) for r, p in builder.run(None))
    assert builder.log[0][:2] == ("prepare", 3)  # the three voices and layouts in one operation
    widths = [lanes for op, lanes, *_ in builder.log if op == "chunk"]
    assert widths[0] == 4 and set(widths) <= {1, 2, 4}  # lane 2's build is the longest: never 8 lanes
    for r in three:
        torch.testing.assert_close(done[r.key].keys, _alone(model, gen, r).keys, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_when_the_full_forward_does_not_fit_the_lower_lanes_advance_alone() -> None:
    """The budget fits 1-lane forwards but not a 2-lane one: the first build (lane 0) advances
    alone, the second waits, and both prefixes are still exactly what they are built alone."""
    model = random_model("tiny", seed=2)
    gen = Generator(model.lm)
    builder = PrefixBuilder(model, gen, lanes=2, chunk=16, max_wait_s=60.0)
    builder.prepare_cost = Cost(0.0)
    builder.chunk_costs = {(1, 16): Cost(0.0), (1, 8): Cost(0.0), (2, 16): Cost(100.0), (2, 8): Cost(100.0)}
    first, second = _requests(model, 2)
    for r in (first, second):
        builder.submit(r)
    done = builder.run(30.0)
    assert [r.key for r, _ in done] == ["k0"]
    assert {lanes for op, lanes, *_ in builder.log if op == "chunk"} == {1}
    assert builder.pending == 1 and builder._lane_jobs[1].done == 0  # prepared, not advanced
    builder.chunk_costs[(2, 16)] = builder.chunk_costs[(2, 8)] = Cost(0.0)
    (request, later), = builder.run(None)
    assert request.key == "k1"
    for r, p in ((first, done[0][1]), (second, later)):
        torch.testing.assert_close(p.keys, _alone(model, gen, r).keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p.text_logits, _alone(model, gen, r).text_logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_half_forwards_fill_what_whole_ones_do_not() -> None:
    """A budget that fits a half chunk's forward but not a whole one's advances the lanes half a
    chunk at a time (time a whole forward would leave unused); without a budget a build's last
    forward is a half one when that is all it needs; the prefixes are still exactly what they are
    built alone."""
    model = random_model("tiny", seed=2)
    gen = Generator(model.lm)
    builder = PrefixBuilder(model, gen, lanes=2, chunk=16, max_wait_s=60.0)
    assert builder.chunk_sizes == (16, 8)
    builder.prepare_cost = Cost(0.0)
    builder.chunk_costs = {(b, C): Cost(100.0 if C == 16 else 0.0) for b in (1, 2) for C in (16, 8)}
    requests = _requests(model, 2)
    for r in requests:
        builder.submit(r)
    done = dict((r.key, p) for r, p in builder.run(30.0))
    assert sorted(done) == ["k0", "k1"]
    assert {positions for op, _, _, _, positions in builder.log if op == "chunk"} == {8}
    for r in requests:
        torch.testing.assert_close(done[r.key].keys, _alone(model, gen, r).keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(done[r.key].text_logits, _alone(model, gen, r).text_logits, rtol=1e-5, atol=1e-5)

    builder.log.clear()
    builder.chunk_costs = {shape: Cost(0.0) for shape in builder.chunk_costs}
    lasts = set()
    for words in (2, 3, 4, 5):  # prompts of 39-42 positions: the last forward has 7, 8, 9, 10 left
        request = PromptRequest(f"w{words}", "v", text_prompt_tokens(model, " ".join(["bread"] * words)),
                                samples=tone(1.0, 220))
        builder.submit(request)
        (_, prefix), = builder.run(None)
        forwards = [positions for op, _, _, _, positions in builder.log if op == "chunk"]
        left = prefix.length - 16 * (len(forwards) - 1)
        assert forwards[:-1] == [16] * (len(forwards) - 1) and forwards[-1] == (8 if left <= 8 else 16)
        lasts.add(forwards[-1])
        torch.testing.assert_close(prefix.keys, _alone(model, gen, request).keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prefix.hidden, _alone(model, gen, request).hidden, rtol=1e-5, atol=1e-5)
        builder.log.clear()
    assert lasts == {8, 16}


@torch.no_grad()
def test_a_prompt_longer_than_a_character_can_have_fails_alone() -> None:
    """The lanes keep `longest` + one chunk rows (not a whole context); a longer prompt (one the
    context would not wrap) gets a clear error, and the build beside it is unaffected."""
    model = small_context_model(400)
    gen = Generator(model.lm)
    builder = PrefixBuilder(model, gen, lanes=2, chunk=16, longest=60)
    assert builder.capacity == 76 and builder.state.layers[0].keys.shape[2] == 77
    short = PromptRequest("short", "v", text_prompt_tokens(model, "You sell fish."), samples=tone(0.5, 200))
    long = PromptRequest("long", "v", text_prompt_tokens(model, "You sell fish. " * 30), samples=tone(0.5, 200))
    builder.submit(long)
    builder.submit(short)
    done = dict((r.key, p) for r, p in builder.run(None))
    assert isinstance(done["long"], ValueError) and "a character can have" in str(done["long"])
    torch.testing.assert_close(done["short"].keys, _alone(model, gen, short).keys, rtol=1e-5, atol=1e-5)
