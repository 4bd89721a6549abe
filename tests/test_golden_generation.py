"""Faithfulness of generation and of the PersonaPlex prompt to the reference (`generation.safetensors`).

Made by tools/golden/golden_generation.py (called by make_golden.py) from the golden checkpoint, in fp32:
(a) greedy generation by moshi 0.2.13's `LMGen` on forced user codes; (b) the PersonaPlex prompt phase
in NVIDIA's order, then a greedy conversation on fixed user audio, decoded by Mimi after a reset,
the forced last prompt frame first, at a context of 64 (`short`: the prompt fits) and of 16
(`long`: the 38-frame prompt wraps the ring KV cache). See tests/fixtures/golden/README.md.

Index map (F = prompt frames, 38 here; c = our conversation frame):
- (a) our `Generator.step` number t == LMGen step t (both read position t and predict t + 1); both
  output frame t, from t = 1 on. (NVIDIA's fork runs one no-op call first: its call t + 1.)
- (b) our frame c (Engine tick c, user frame c in) == the reference's frame F + c, row c of
  `{case}_tokens` / `{case}_pcm`. The reference first outputs frame F - 1 (the forced last prompt frame:
  text PAD, agent SILENCE) and decodes it after resetting Mimi; we never emit it, so our decoder must
  have decoded it (audio discarded) before frame 0 — or every PCM frame differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from npc_voice.engine.engine import Engine
from npc_voice.engine.persona import Persona, PrefixCache
from npc_voice.engine.install import install_prefix
from npc_voice.engine.prompt import special_codes, voice_from_samples
from npc_voice.model.generator import Generator, Sampling
from npc_voice.model.loading import LoadedModel, load_model
from npc_voice.model.transformer import ring_positions

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
CASES = {"short": 64, "long": 16}
LOGITS_RTOL = 1e-5  # relative (norm) error of logits and KV rows; measured ~1e-7
PCM_ATOL = 1e-4  # absolute, per sample; measured ~1e-6


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "generation.safetensors"))


@pytest.fixture(scope="module")
def meta() -> dict:
    with safe_open(str(GOLDEN / "generation.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["golden"])


_models: dict[int, LoadedModel] = {}


def model_at(context: int) -> LoadedModel:
    """The fixture checkpoint in fp32 with the LM's context overridden (the same weights)."""
    if context not in _models:
        _models[context] = load_model(GOLDEN, device="cpu", dtype=torch.float32, context=context)
    return _models[context]


def persona(ref: dict[str, torch.Tensor], meta: dict) -> Persona:
    return Persona(role=meta["role"], voice_samples=tuple(ref["voice_raw"].tolist()), name="bram",
                   sampling=Sampling.greedy())


def capture(obj, name: str, monkeypatch: pytest.MonkeyPatch, keep) -> list:
    """Wraps obj.name (on the instance) to record keep(args, kwargs, result) at every call."""
    inner, seen = getattr(obj, name), []

    def wrapped(*args, **kwargs):
        result = inner(*args, **kwargs)
        seen.append(keep(args, kwargs, result))
        return result

    monkeypatch.setattr(obj, name, wrapped)
    return seen


# --------------------------------------------------------------------------------------------------
# (a) greedy generation: our Generator vs moshi's LMGen
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_generator_greedy_matches_lmgen(ref, monkeypatch) -> None:
    model = load_model(GOLDEN, device="cpu", dtype=torch.float32)  # context 16: wraps from step 16
    user_codes, expected = ref["gen_user_codes"], ref["gen_tokens"]  # [B, T, 8], [B, T, 9]
    B, T, _ = user_codes.shape
    gen = Generator(model.lm)
    state = gen.init_state(B)
    for slot in range(B):
        Sampling.greedy().apply(state.sampling, slot, seed=slot)
    logits = capture(model.lm, "step_text", monkeypatch, lambda a, k, r: r[1][:, 0].clone())
    worst = 0.0
    for t in range(T):
        out = gen.step(state, user_codes[:, t])
        worst = max(worst, rel_error(logits[-1], ref["gen_text_logits"][:, t]))
        if t == 0:
            assert not out.valid.any() and bool((expected[:, 0] == -2).all())  # LMGen returns None
            continue
        assert out.valid.all()
        ours = torch.cat([out.text[:, None], out.audio], dim=1)
        assert torch.equal(ours, expected[:, t]), f"step {t}: ours {ours.tolist()} LMGen {expected[:, t].tolist()}"
    assert worst < LOGITS_RTOL, worst


# --------------------------------------------------------------------------------------------------
# (b) the prompt: the state it leaves in a slot
# --------------------------------------------------------------------------------------------------


def test_prompt_inputs_match_reference(ref, meta) -> None:
    """The pieces of the prompt: SINE / SILENCE codes of this Mimi, the voice's codes after loudness
    normalisation, the role's tokens."""
    model = model_at(64)
    special = special_codes(model.mimi)
    assert list(special.sine) == ref["sine_codes"].tolist()
    assert list(special.silence) == ref["silence_codes"].tolist()
    # Streamed frame by frame from a fresh encoder, as the reference does: once Mimi's transformer
    # context is full (4 frames here, 10 s for the real Mimi) a whole-clip encode gives other codes.
    voice = voice_from_samples("bram", ref["voice_raw"].numpy(), model.mimi)
    for f, (ours, theirs) in enumerate(zip(voice.codes, ref["voice_codes"])):
        assert torch.equal(ours, theirs), f"voice frame {f}: ours {ours.tolist()} reference {theirs.tolist()}"
    role = model.tokenizer.encode("<system> " + meta["role"].strip() + " <system>")
    assert role == ref["role_tokens"].tolist()


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_prompt_state_matches_reference(case, ref, meta) -> None:
    """After the prompt: the temporal KV rows of every position the reference keeps (its ring keeps
    the last `context`), the slot's position, the delayed-token ring of positions F-2..F (position F:
    the greedy text and codebook 0 chosen from position F-1), and the text logits of position F-1."""
    model = model_at(CASES[case])
    F = ref["prompt_text"].shape[0]
    gen = Generator(model.lm)
    prefix = PrefixCache(model, gen).get(persona(ref, meta))
    assert rel_error(prefix.text_logits, ref[f"{case}_text_logits"][0]) < LOGITS_RTOL
    state = gen.init_state(2)
    slot = 1
    install_prefix(gen, state, slot, prefix, seed=0, sampling=Sampling.greedy())
    assert int(state.temporal.position[slot]) == F and int(state.offset[slot]) == F

    kv, positions = ref[f"{case}_kv"], ref[f"{case}_kv_positions"]  # [L, 2, H, n, D], [n]
    capacity = state.temporal.layers[0].keys.shape[2] - 1
    held = ring_positions(state.temporal.position[slot : slot + 1], capacity)[0]  # position of each row
    rows = []
    for p in positions.tolist():
        match = (held == p).nonzero()
        assert match.numel() == 1, f"position {p} is not in the slot's KV cache (rows hold {held.tolist()})"
        rows.append(int(match))
    for layer, cache in enumerate(state.temporal.layers):
        assert rel_error(cache.keys[slot][:, rows], kv[layer, 0]) < LOGITS_RTOL, (layer, "keys")
        assert rel_error(cache.values[slot][:, rows], kv[layer, 1]) < LOGITS_RTOL, (layer, "values")

    expected = ref[f"{case}_ring"]  # [17, 3]: positions F-2, F-1, F; -2 = not known yet
    for j, p in enumerate((F - 2, F - 1, F)):
        ours = state.tokens[slot, :, p % gen.ring]
        known = expected[:, j] != -2
        assert torch.equal(ours[known], expected[known, j]), (p, ours.tolist(), expected[:, j].tolist())


# --------------------------------------------------------------------------------------------------
# (b) the conversation after the prompt, through the Engine
# --------------------------------------------------------------------------------------------------


def converse(case: str, ref, meta, monkeypatch) -> tuple[list, list, list, list]:
    """Opens the persona on a fresh Engine and ticks once per user frame: (events, FrameOutputs'
    [text, audio] per tick, user codes per tick, text logits per tick)."""
    model = model_at(CASES[case])
    engine = Engine(model, slots=1, use_graphs=False)
    frames = capture(engine.gen, "step", monkeypatch,
                     lambda a, k, r: (a[1][0].clone(), torch.cat([r.text[:1], r.audio[0]]).clone()))
    session = engine.open(persona(ref, meta), seed=0)  # the prompt is built here, not in a tick
    logits = capture(model.lm, "step_text", monkeypatch, lambda a, k, r: r[1][0, 0].clone())
    events = []
    for c in range(ref["conv_pcm"].shape[0]):
        session.push_audio(ref["conv_pcm"][c].float().numpy())
        (event,) = engine.tick()
        assert event.frame == c
        events.append(event)
    return events, [f[1] for f in frames], [f[0] for f in frames], logits


@pytest.mark.parametrize("case", list(CASES))
def test_conversation_tokens_match_reference(case, ref, meta, monkeypatch) -> None:
    """Tick c: the user's codes of frame c, the text logits of position F+c, the tokens of frame F+c."""
    events, tokens, user_codes, logits = converse(case, ref, meta, monkeypatch)
    assert torch.equal(torch.stack(user_codes), ref["conv_user_codes"])
    assert len(logits) == len(events)
    worst = max(rel_error(ours, ref[f"{case}_text_logits"][c + 1]) for c, ours in enumerate(logits))
    assert worst < LOGITS_RTOL, worst
    expected = ref[f"{case}_tokens"]  # [N, 9]: frames F..F+N-1
    for c, (event, ours) in enumerate(zip(events, tokens)):
        assert torch.equal(ours, expected[c]), f"frame {c}: ours {ours.tolist()} reference {expected[c].tolist()}"
        assert event.text_token == int(expected[c, 0])


@pytest.mark.parametrize("case", list(CASES))
def test_conversation_pcm_matches_reference(case, ref, meta, monkeypatch) -> None:
    """Needs the decoder primed with the SILENCE frame at install (the reference decodes it first)."""
    events, _, _, _ = converse(case, ref, meta, monkeypatch)
    ours = np.stack([e.pcm for e in events])
    expected = ref[f"{case}_pcm"].numpy()
    worst = np.abs(ours - expected).max(axis=1)
    assert float(worst.max()) < PCM_ATOL, f"max |error| per frame: {np.array2string(worst, precision=2)}"
