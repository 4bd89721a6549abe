"""The engine: parallel prompt prefixes, hot swap, and slots that never disturb each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from npc_voice.engine import Engine, EngineFull, Persona, Sampling
from npc_voice.engine.prompt import (
    SILENCE_FRAMES, Voice, delayed_positions, prompt_frames, special_codes, text_prompt_tokens, voice_from_samples,
)
from npc_voice.engine.install import install_prefix
from npc_voice.engine.build import build_prefix
from npc_voice.model.generator import NOT_FORCED, Generator
from npc_voice.model.loading import LoadedModel, random_model

RATE = 24_000


def tone(seconds: float, freq: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


def persona(freq: float = 180.0, role: str = "You are a friendly innkeeper.", voice_seconds: float = 1.0,
            **kw) -> Persona:
    return Persona(role=role, voice_samples=tone(voice_seconds, freq), **kw)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return random_model("tiny", seed=3)


def frame_by_frame(gen: Generator, frames: torch.Tensor, seed: int):
    """The reference's way: one model step per prompt frame, every stream forced."""
    A = gen.num_agent
    state = gen.init_state(1)
    state.sampling.seed[0] = seed
    F = frames.shape[1]
    for t in range(F):
        nxt = t + 1 < F
        forced_text = torch.tensor([frames[0, t + 1] if nxt else NOT_FORCED])
        forced_audio = torch.empty(1, A, dtype=torch.long)
        forced_audio[0, 0] = frames[1, t + 1] if nxt else NOT_FORCED  # codebook 0: no delay
        forced_audio[0, 1:] = frames[2 : 1 + A, t]  # delayed codebooks: position t + 1 is frame t
        gen.step(state, frames[1 + A :, t][None], forced_text=forced_text, forced_audio=forced_audio)
    return state


@torch.no_grad()
def test_parallel_prefix_equals_frame_by_frame(model: LoadedModel) -> None:
    gen = Generator(model.lm)
    voice = voice_from_samples("v", tone(0.7, 210), model.mimi)
    frames = prompt_frames(voice, text_prompt_tokens(model, "You guard the city gate."), special_codes(model.mimi), model)
    F = frames.tokens.shape[1]
    assert F == voice.frames + 2 * SILENCE_FRAMES + len(text_prompt_tokens(model, "You guard the city gate."))

    slow = frame_by_frame(gen, frames.tokens, seed=5)
    fast = gen.init_state(2)
    install_prefix(gen, fast, 1, build_prefix(model, gen, frames), seed=5)

    assert int(fast.offset[1]) == int(slow.offset[0]) == F
    written = fast.tokens[1] != -2  # the user's codebook 0 at position F is written by the next step
    assert written.sum() == written.numel() - 1
    assert torch.equal(fast.tokens[1][written], slow.tokens[0][written])
    for a, b in zip(fast.temporal.layers, slow.temporal.layers):
        torch.testing.assert_close(a.keys[1, :, :F], b.keys[0, :, :F], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values[1, :, :F], b.values[0, :, :F], rtol=1e-5, atol=1e-5)

    # The conversation that follows: the same logits, and (greedy) the same tokens.
    user = torch.randint(0, 2048, (6, 1, gen.num_user))
    for st, slot in ((fast, 1), (slow, 0)):
        st.sampling.text_temperature[slot] = st.sampling.audio_temperature[slot] = 0.0
    for t in range(6):
        users = torch.zeros(2, gen.num_user, dtype=torch.long)
        users[1] = user[t, 0]
        a = gen.step(fast, users, torch.tensor([False, True]))
        b = gen.step(slow, user[t])
        assert torch.equal(a.text[1], b.text[0]) and torch.equal(a.audio[1], b.audio[0])
    probe = torch.full((2, 17, 1), 5, dtype=torch.long)
    torch.testing.assert_close(model.lm.step_text(probe, fast.temporal, torch.tensor([False, True]))[1][1],
                               model.lm.step_text(probe[:1], slow.temporal)[1][0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_preset_voice_gives_the_same_prefix_as_its_sample(model: LoadedModel) -> None:
    """A PersonaPlex preset (.pt: input embeddings of the voice positions + the reference's 4-slot
    token ring) builds the same prefix as the voice sample it was made from."""
    gen = Generator(model.lm)
    special = special_codes(model.mimi)
    sample_voice = voice_from_samples("v", tone(0.9, 260), model.mimi)
    role = text_prompt_tokens(model, "You sell swords.")
    frames = prompt_frames(sample_voice, role, special, model)
    v = sample_voice.frames
    positions = delayed_positions(frames.tokens[:, :v], model.config.lm.delays, gen.initial.cpu())
    embeddings = model.lm.embed(positions[None, :, : v - 1])[0]
    ring = torch.full((17, 4), -2, dtype=torch.long)
    full = delayed_positions(frames.tokens, model.config.lm.delays, gen.initial.cpu())
    for p in range(v - 3, v + 1):  # the reference's ring after v calls: positions up to v
        delayed = torch.tensor(model.config.lm.delays) > 0
        col = full[:, p].clone()
        if p == v:  # undelayed streams at position v belong to frame v, not yet given
            col[~delayed] = -2
        ring[:, p % 4] = col
    preset = Voice("p", embeddings=embeddings, ring=ring)
    a = build_prefix(model, gen, frames)
    b = build_prefix(model, gen, prompt_frames(preset, role, special, model))
    torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.ring, b.ring)


def run(engine: Engine, schedule: dict[int, callable], ticks: int, audio: dict[str, np.ndarray]):
    """Ticks the engine, feeding each named session its audio, running schedule[t](engine) first."""
    got: dict[str, list] = {}
    sessions: dict[str, object] = {}
    for t in range(ticks):
        if t in schedule:
            schedule[t](engine, sessions)
        for name, s in sessions.items():
            if name in audio:
                s.push_audio(audio[name][t * 1920 : (t + 1) * 1920])
        for ev in engine.tick():
            got.setdefault(ev.session_id, []).append(ev)
    return got, sessions


def test_open_swap_close_leave_other_sessions_unchanged(model: LoadedModel) -> None:
    user = {"a": tone(2.0, 300, seed=1), "b": tone(2.0, 500, seed=2)}
    alone, s1 = run(Engine(model, slots=3), {0: lambda e, s: s.update(a=e.open(persona(), seed=7))}, 16, user)

    def busy_open(e, s):
        s["b"] = e.open(persona(400, "You forge blades."), seed=8)
        s["a"] = e.open(persona(), seed=7)

    schedule = {
        0: busy_open,
        4: lambda e, s: e.switch(s["b"], persona(600, "You are a quest giver.")),
        6: lambda e, s: s.update(c=e.open(persona(700, "You guard the gate."), seed=9)),
        9: lambda e, s: e.close(s["c"]),
        11: lambda e, s: e.close(s["b"]),
    }
    crowded, s2 = run(Engine(model, slots=3), schedule, 16, user)
    a1, a2 = alone[s1["a"].id], crowded[s2["a"].id]
    assert [e.frame for e in a2] == list(range(16))  # no frame skipped
    for x, y in zip(a1, a2):
        assert x.text_token == y.text_token and np.array_equal(x.pcm, y.pcm)
    b_frames = [e.frame for e in crowded[s2["b"].id]]
    assert b_frames == [0, 1, 2, 3] + list(range(7))  # the switch restarted b; the close ended it
    assert len(crowded[s2["c"].id]) == 3


def test_full_engine_refuses_and_frees_slots(model: LoadedModel) -> None:
    engine = Engine(model, slots=1)
    s = engine.open(persona())
    with pytest.raises(EngineFull):
        engine.open(persona())
    engine.close(s)
    engine.tick()
    engine.open(persona())  # the freed slot is usable again


def test_greedy_sessions_are_reproducible(model: LoadedModel) -> None:
    p = persona(sampling=Sampling.greedy())
    audio = {"a": tone(1.0, 320, seed=4)}
    first, _ = run(Engine(model, slots=2), {0: lambda e, s: s.update(a=e.open(p, seed=1))}, 8, audio)
    second, _ = run(Engine(model, slots=2), {0: lambda e, s: s.update(a=e.open(p, seed=99))}, 8, audio)
    assert [e.text_token for e in next(iter(first.values()))] == [e.text_token for e in next(iter(second.values()))]


@pytest.mark.realtime
def test_realtime_loop_paces_frames_at_12_5_hz(model: LoadedModel, timing) -> None:
    import time

    from npc_voice.engine import EngineLoop

    engine = Engine(model, slots=2)
    got: list = []
    engine.open(persona(), seed=1, listener=got.append)
    loop = EngineLoop(engine).start()
    start = time.perf_counter()
    time.sleep(1.2)
    loop.stop()
    elapsed = time.perf_counter() - start
    # whatever the load: no error, no frame index skipped, never ahead of the 80 ms schedule
    assert loop.error is None
    assert [e.frame for e in got] == list(range(len(got)))
    assert len(got) <= elapsed / 0.08 + 2, (len(got), elapsed)
    # timing: no more than 3 frames behind it
    timing.check(len(got) >= elapsed / 0.08 - 3, f"{len(got)} frames in {elapsed:.2f} s")
    timing.verdict()


def test_prefix_cache_on_disk_is_reused(model: LoadedModel, tmp_path) -> None:
    from npc_voice.engine import PrefixCache

    gen = Generator(model.lm)
    first = PrefixCache(model, gen, directory=tmp_path)
    a = first.get(persona(250))
    first.flush()  # files are written in the background
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1 and first.misses == 1
    second = PrefixCache(model, gen, directory=tmp_path)  # a new process: read from disk, not built
    b = second.get(persona(250))
    assert second.misses == 0 and torch.equal(a.keys, b.keys) and torch.equal(a.ring, b.ring)
    files[0].write_bytes(b"damaged")  # a damaged file is rebuilt, not fatal
    c = PrefixCache(model, gen, directory=tmp_path).get(persona(250))
    assert torch.equal(a.keys, c.keys)


def test_memory_cache_is_bounded(model: LoadedModel) -> None:
    from npc_voice.engine import PrefixCache

    cache = PrefixCache(model, Generator(model.lm))
    one = cache.get(persona(200))
    cache.max_bytes = int(one.nbytes * 1.5)
    cache.get(persona(300))
    assert len(cache) == 1  # the least recently used went


def test_memory_cache_evicts_the_least_recently_used_by_bytes(model: LoadedModel) -> None:
    """The in-memory prefix cache drops characters least recently used first, until the bytes fit."""
    from npc_voice.engine import PrefixCache

    cache = PrefixCache(model, Generator(model.lm))
    a, b, c = persona(200), persona(300), persona(400)  # prefixes of one size (same role, 1 s voices)
    big = persona(500, voice_seconds=4.0)
    first = cache.get(a)
    size = first.nbytes
    cache.max_bytes = int(size * 2.5)  # two of them fit, not three

    def built(p: Persona) -> bool:
        """Gets `p`; whether it had to be built (it was not in the cache)."""
        misses = cache.misses
        cache.get(p)
        return cache.misses == misses + 1

    assert built(b) and len(cache) == 2
    assert not built(a)  # a is now the most recently used, b the least
    assert built(c) and len(cache) == 2  # b went, not a
    assert not built(a)  # both kept; c is now the least recently used
    assert built(b)  # evicts c
    assert not built(a) and built(c)  # a kept, c rebuilt
    # bounded in bytes, not entries: one prefix of 1.8 sizes evicts both others (a count limit of two
    # would keep one), and the newest entry stays even when it alone is over the budget
    big_size = cache.get(big).nbytes
    assert 1.5 * size < big_size < 2.5 * size and len(cache) == 1
    cache.max_bytes = size
    assert built(a) and len(cache) == 1 and not built(a)
    assert built(big) and len(cache) == 1


def test_input_buffer_reframes_and_drops_oldest() -> None:
    from npc_voice.engine.session import InputBuffer

    buf = InputBuffer(frame_size=4, max_frames=2)
    buf.push(np.arange(3, dtype=np.float32))
    assert buf.pop() is None
    buf.push(np.arange(3, 14, dtype=np.float32))  # 14 samples in all: 3 frames and 2 left over
    assert buf.dropped_frames == 1 and len(buf) == 2
    assert buf.pop().tolist() == [4, 5, 6, 7]


def test_a_slot_being_closed_can_be_reopened_before_the_next_tick(model: LoadedModel) -> None:
    engine = Engine(model, slots=1)
    first = engine.open(persona())
    engine.tick()
    engine.close(first)
    second = engine.open(persona(), seed=3)  # no tick in between
    events = engine.tick()
    assert [e.session_id for e in events] == [second.id] and events[0].frame == 0


def test_an_engine_uses_the_cache_it_is_given_and_writes_it_to_disk(model: LoadedModel, tmp_path) -> None:
    """`npc-voice serve --prefix-cache DIR`: the engine builds into the (empty) cache it was given,
    which writes the built prompt to DIR; a second engine on the same DIR reads it instead of building."""
    from npc_voice.engine import PrefixCache

    cache = PrefixCache(model, directory=tmp_path)
    engine = Engine(model, slots=1, cache=cache)
    assert engine.cache is cache
    engine.open(persona(330), seed=1)
    engine.tick()
    cache.flush()
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1 and cache.misses == 1
    again = Engine(model, slots=1, cache=PrefixCache(model, directory=tmp_path))
    session = again.open(persona(330), seed=1)
    assert session.started.done() is False and again.builder.pending == 0  # found on disk: nothing to build
    assert [e.session_id for e in again.tick()] == [session.id] and again.cache.hits == 1


def test_the_realtime_loop_calls_listeners_off_the_engine_thread(model: LoadedModel) -> None:
    """What a listener does (the server encodes messages) never takes the engine thread's time:
    the loop hands each tick's frames to a thread of their own, in order."""
    import threading
    import time

    from npc_voice.engine import EngineLoop

    engine = Engine(model, slots=1)
    seen: list[tuple[str, int]] = []
    engine.open(persona(), seed=1, listener=lambda e: seen.append((threading.current_thread().name, e.frame)))
    loop = EngineLoop(engine).start()
    time.sleep(0.5)
    loop.stop()
    assert loop.error is None and len(seen) >= 3
    assert {name for name, _ in seen} == {"npc-voice-listeners"}
    assert [f for _, f in seen] == list(range(len(seen)))


def test_the_engine_owns_free_slots_reserved_before_a_session_opens(model: LoadedModel) -> None:
    """`reserve` takes a slot before any work (a full engine says so at once), `open(slot=)` uses
    it, `release` gives an unused one back, and a session's close frees its slot."""
    engine = Engine(model, slots=2)
    a = engine.reserve()
    assert engine.free_slots == 1
    other = engine.open(persona(), seed=1)  # the free one, not the reserved one
    assert other.slot != a and engine.free_slots == 0
    with pytest.raises(EngineFull):
        engine.reserve()
    with pytest.raises(ValueError):
        engine.open(persona(), slot=other.slot)  # a slot nobody reserved
    session = engine.open(persona(), seed=2, slot=a)
    assert session.slot == a
    engine.release(a)  # a no-op: a session holds it now
    assert engine.free_slots == 0
    engine.close(session)
    assert engine.free_slots == 1
    b = engine.reserve()
    engine.release(b)
    assert engine.free_slots == 1


def test_a_preset_file_that_is_not_one_is_a_clear_error(tmp_path) -> None:
    """A truncated or foreign NAME.pt is refused with what it is (a server answers invalid_character
    with this reason), not torch's unpickling error."""
    from npc_voice.engine.prompt import voice_from_preset

    for name, data in (("garbage", b"not a torch file"), ("empty", b"")):
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        with pytest.raises(ValueError, match="not a PersonaPlex voice preset"):
            voice_from_preset(name, str(path), 8)


def test_a_step_with_parts_compiled_whole_speaks_as_the_eager_one(model: LoadedModel, monkeypatch) -> None:
    """`step.COMPILE`: Mimi's streaming steps and the depth transformer's steps with their sampling,
    each traced whole by torch.compile with no graph break (here the backend that generates no code),
    give the same tokens and the same PCM as eager ones."""
    from npc_voice.engine import step as step_module

    user = {"a": tone(1.0, 300, seed=1)}
    monkeypatch.setattr(step_module, "COMPILE_BACKEND", "aot_eager")

    def heard(parts: frozenset[str]):
        monkeypatch.setattr(step_module, "COMPILE", parts)
        got, sessions = run(Engine(model, slots=2), {0: lambda e, s: s.update(a=e.open(persona(), seed=7))}, 8, user)
        return got[sessions["a"].id]

    eager, traced = heard(frozenset()), heard(step_module.COMPILABLE)
    assert [e.text_token for e in eager] == [e.text_token for e in traced]
    assert all(np.array_equal(x.pcm, y.pcm) for x, y in zip(eager, traced, strict=True))


def test_an_unknown_compiled_part_is_an_error_naming_the_variable(model: LoadedModel, monkeypatch) -> None:
    from npc_voice.engine import step as step_module

    monkeypatch.setattr(step_module, "COMPILE", frozenset({"mimi", "everything"}))
    with pytest.raises(ValueError, match="NPC_VOICE_COMPILE: unknown part.*everything"):
        Engine(model, slots=1)


def test_by_default_parts_are_compiled_only_where_the_step_runs_in_cuda_graphs(model: LoadedModel, monkeypatch) -> None:
    """`step.COMPILE` unset: both parts where the step is graphed (a GPU), none in the eager CPU step;
    `NPC_VOICE_COMPILE=none` (an empty set) turns them off everywhere."""
    from npc_voice.engine import step as step_module
    from npc_voice.engine.step import BatchedStep

    monkeypatch.setattr(step_module, "COMPILE", None)
    monkeypatch.setattr(step_module.fused, "enable", lambda on=True: None)  # a graphed step's switch, global

    def parts(use_graphs: bool) -> frozenset[str]:
        gen = Generator(model.lm)
        return BatchedStep(model, gen, gen.init_state(1), model.mimi.init_state(1, model.device),
                           use_graphs=use_graphs).compiled

    assert parts(False) == frozenset() and parts(True) == step_module.COMPILABLE
    monkeypatch.setattr(step_module, "COMPILE", frozenset())
    assert parts(True) == frozenset()
