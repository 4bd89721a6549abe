"""Installing a prefix (`npc_voice/engine/install.py`): the fixed-shape install (rows rounded up to a
bucket, device-side slot and length) gives the slot what an exact install gives it, resets its Mimi
state, and leaves every other slot bit-identical, with the full-precision and the 8-bit caches."""

from __future__ import annotations

import pytest
import torch

from npc_voice.engine.build import build_prefix
from npc_voice.engine.install import ROW_BUCKET, SlotInstaller, install_prefix
from npc_voice.engine.prompt import prompt_frames, special_codes, text_prompt_tokens, voice_from_samples
from npc_voice.model.generator import Generator, Sampling
from npc_voice.model.loading import random_model
from test_build import small_context_model
from test_engine import tone


def _busy_state(gen: Generator, model, slots: int):
    """A state whose slots have all run a few frames (nothing in it is a fill value)."""
    state = gen.init_state(slots)
    mimi = model.mimi.init_state(slots, model.device)
    for t in range(5):
        pcm = torch.from_numpy(tone(0.08, 200 + 50 * t, seed=t))[None, None].expand(slots, 1, -1).contiguous()
        codes = model.mimi.encode_step(pcm, mimi.encoder)
        out = gen.step(state, codes[:, : gen.num_user])
        model.mimi.decode_step(out.audio.clamp(min=0), mimi.decoder)  # the first frames are not codes yet
    return state, mimi


@pytest.mark.parametrize("kv", [None, torch.int8])
@torch.no_grad()
def test_a_bucketed_install_equals_an_exact_one_and_leaves_other_slots_bit_identical(kv) -> None:
    model = random_model("tiny", seed=5)
    model.lm.kv_dtype = kv
    gen = Generator(model.lm)
    voice = voice_from_samples("v", tone(0.9, 240), model.mimi)
    frames = prompt_frames(voice, text_prompt_tokens(model, "You mend nets at the harbour."), special_codes(model.mimi), model)
    prefix = build_prefix(model, gen, frames)
    N = prefix.length
    assert N % ROW_BUCKET and N < 2 * ROW_BUCKET  # the install covers rows past the prompt

    state, mimi = _busy_state(gen, model, 3)
    fresh = model.mimi.init_encoder_state(1, model.device)
    fresh.reset(torch.ones(1, dtype=torch.bool))
    primed = model.mimi.init_decoder_state(1, model.device)
    model.mimi.decode_step(torch.tensor([special_codes(model.mimi).silence]), primed)
    others = [[t.clone() for t in s.slot_view(i)] for s in (state, mimi) for i in (0, 2)]
    installer = SlotInstaller(gen, state, rows=2 * ROW_BUCKET, mimi=mimi, fresh_encoder=fresh, primed_decoder=primed)
    sampling = Sampling(text_temperature=0.5, text_top_k=7, audio_temperature=0.9, audio_top_k=40)
    installer.install(1, prefix, seed=12345, sampling=sampling)

    after = [s.slot_view(i) for s in (state, mimi) for i in (0, 2)]
    for before, now in zip(others, after):
        assert all(torch.equal(a, b) for a, b in zip(before, now, strict=True))

    exact = gen.init_state(1)
    install_prefix(gen, exact, 0, prefix, seed=12345, sampling=sampling)
    for a, b in zip(state.temporal.layers, exact.temporal.layers):  # every row the slot can see
        for x, y in zip(a.tensors(), b.tensors()):
            assert torch.equal(x[1, :, :N], y[0, :, :N])
    assert int(state.temporal.position[1]) == int(state.offset[1]) == N
    assert torch.equal(state.tokens[1], exact.tokens[0])  # the ring and the sampled first position
    for mine, theirs in zip(state.sampling.tensors(), exact.sampling.tensors()):
        assert torch.equal(mine[1], theirs[0])
    assert float(state.sampling.text_temperature[1]) == 0.5 and int(state.sampling.audio_top_k[1]) == 40
    assert int(state.sampling.seed[1]) == 12345
    for mine, theirs in ((mimi.encoder, fresh), (mimi.decoder, primed)):
        assert all(torch.equal(a, b) for a, b in zip(mine.slot_view(1), theirs.slot_view(0), strict=True))


@torch.no_grad()
def test_a_wrapped_prefix_lands_in_its_ring_rows_through_a_bucket() -> None:
    """A prompt longer than the context keeps its last `context` positions, each in ring row
    position % context: installed through a bucket's fixed shapes, the rows are the exact install's."""
    model = small_context_model(24)
    gen = Generator(model.lm)
    voice = voice_from_samples("v", tone(0.8, 220), model.mimi)
    role = text_prompt_tokens(model, "You ferry travellers across the black river for a silver coin each.")
    prefix = build_prefix(model, gen, prompt_frames(voice, role, special_codes(model.mimi), model), chunk=8)
    assert prefix.length > 24 and prefix.length % 24  # wrapped, not on a row boundary
    state = gen.init_state(2)
    SlotInstaller(gen, state, rows=ROW_BUCKET).install(1, prefix, seed=3)
    exact = gen.init_state(1)
    install_prefix(gen, exact, 0, prefix, seed=3)
    for a, b in zip(state.temporal.layers, exact.temporal.layers):
        assert torch.equal(a.keys[1, :, :24], b.keys[0, :, :24]) and torch.equal(a.values[1, :, :24], b.values[0, :, :24])
    first_row = (prefix.length - 24) % 24  # the oldest kept position's row holds its key
    assert torch.equal(state.temporal.layers[0].keys[1, :, first_row], prefix.keys[0, :, 0])
    assert torch.equal(state.tokens[1], exact.tokens[0])


def test_a_prefix_longer_than_the_installer_holds_is_refused() -> None:
    model = random_model("tiny", seed=5)
    gen = Generator(model.lm)
    voice = voice_from_samples("v", tone(0.9, 240), model.mimi)
    prefix = build_prefix(model, gen, prompt_frames(voice, text_prompt_tokens(model, "You sing."),
                                                    special_codes(model.mimi), model))
    with pytest.raises(ValueError, match="longer than a character can be"):
        SlotInstaller(gen, gen.init_state(1), rows=prefix.length - 1).install(0, prefix, seed=0)


def test_an_engine_fails_a_prefix_it_cannot_hold_alone() -> None:
    """A cached prefix with more KV rows than any character can have (another configuration's, say)
    fails the `open` that asked for it; the live session beside it keeps every frame."""
    import dataclasses

    from npc_voice.engine import Engine, Persona

    model = random_model("tiny", seed=5)
    engine = Engine(model, slots=2)
    inn = Persona("You keep the inn.", voice_samples=tone(1.0, 200))
    live = engine.open(inn, seed=1)
    engine.tick()
    good = engine.cache.lookup(inn.prompt_key())
    extra = engine.installer.rows + 1 - good.keys.shape[2]
    pad = lambda t: torch.cat([t, t[:, :, :1].expand(-1, -1, extra, -1)], dim=2)  # noqa: E731
    smith = Persona("You forge blades.", voice_samples=tone(1.0, 300))
    engine.cache.store(smith.prompt_key(), dataclasses.replace(good, keys=pad(good.keys), values=pad(good.values)))
    failed = engine.open(smith, seed=2)
    frames = [engine.tick() for _ in range(3)]
    with pytest.raises(ValueError, match="longer than a character can be"):
        failed.started.result(timeout=0)
    assert [e.frame for tick in frames for e in tick if e.session_id == live.id] == [1, 2, 3]
    assert engine.free_slots == 1 and engine.sessions == [live]
