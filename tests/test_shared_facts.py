"""One owner for every shared fact (frame length, sample rate, prompt silence, context, top-k cap):
`npc_voice.model.config` (and a loaded model's config) for the model's facts, `npc_voice.model.sampling`
for the sampler's cap. Everything else imports them; these tests fail when a copy is re-typed or
disagrees."""

from __future__ import annotations

import ast
import importlib.util
import io
import tokenize
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OWNER = ROOT / "npc_voice" / "model" / "config.py"
# The model's facts as numbers: 24 kHz, 12.5 frames a second, 80 ms, 1920 samples, 3000 frames of context.
FACTS = {24_000: "the sample rate", 12.5: "the frame rate", 0.08: "the frame length", 1920: "the frame size",
         3000: "the context"}
# Not scanned, and why:
EXEMPT = {
    # the reference's own numbers, written independently on purpose: an oracle must not import the code
    # it checks (the golden files and the reference benchmark)
    "tools/golden", "tools/bench",
    # the smallest raw-websockets client, standalone on purpose (no npc_voice import): checked below
    "examples/talk.py",
}


def _sources() -> list[Path]:
    files = []
    for folder in ("npc_voice", "mcp_server", "examples", "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if path != OWNER and not any(rel == e or rel.startswith(e + "/") for e in EXEMPT):
                files.append(path)
    return files


def retyped_facts(source: str) -> list[tuple[int, str]]:
    """(line, literal) of every number in the code (not its strings or comments) that is one of FACTS."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NUMBER:
            value = ast.literal_eval(tok.string)
            if isinstance(value, (int, float)) and not isinstance(value, complex) and value in FACTS:
                found.append((tok.start[0], tok.string))
    return found


def test_the_scan_finds_a_retyped_fact() -> None:
    assert retyped_facts("RATE, FRAME = 24_000, 1920\nx = t * 0.08  # 12.5 Hz\ns = '3000'\n") == [
        (1, "24_000"), (1, "1920"), (2, "0.08")]


def test_no_module_retypes_the_models_facts() -> None:
    files = _sources()
    assert len(files) > 40
    found = [f"{path.relative_to(ROOT)}:{line}: {literal} ({FACTS[ast.literal_eval(literal)]}): import it from "
             "npc_voice.model.config (or read the loaded model's config)"
             for path in files for line, literal in retyped_facts(path.read_text())]
    assert found == []


def test_every_name_for_a_fact_is_the_owners() -> None:
    from npc_voice import audio, protocol
    from npc_voice.characters import model as characters
    from npc_voice.engine import engine, prompt
    from npc_voice.model import config
    from npc_voice.model.loading import random_model

    mimi = config.MimiConfig()
    assert (config.SAMPLE_RATE, config.FRAME_RATE, config.FRAME_SIZE, config.SILENCE_FRAMES) == (24_000, 12.5, 1920, 6)
    assert config.FRAME_SECONDS == 0.08 and config.LMConfig().context == 3000
    assert protocol.MODEL_RATE == audio.SAMPLE_RATE == characters.VOICE_RATE == mimi.sample_rate
    assert protocol.FRAME_SECONDS == engine.FRAME_SECONDS == characters.FRAME_SECONDS == 1 / mimi.frame_rate
    assert protocol.frame_samples(protocol.MODEL_RATE) == mimi.frame_size
    assert [protocol.frame_samples(r) for r in protocol.SAMPLE_RATES] == [1280, 1920, 3840]
    assert prompt.SILENCE_FRAMES == config.SILENCE_FRAMES and characters.CONTEXT_FRAMES == config.LMConfig().context
    tiny = random_model("tiny")
    assert tiny.mimi.frame_size == protocol.frame_samples(protocol.MODEL_RATE)
    assert tiny.config.mimi.sample_rate == protocol.MODEL_RATE


def test_the_standalone_example_agrees_with_the_protocol() -> None:
    from npc_voice.protocol import SAMPLE_RATES, frame_samples

    spec = importlib.util.spec_from_file_location("example_talk", ROOT / "examples" / "talk.py")
    talk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(talk)
    assert talk.RATE in SAMPLE_RATES and talk.FRAME == frame_samples(talk.RATE)


def test_the_engines_prompt_is_as_long_as_the_checks_count() -> None:
    """The character check's budget (`prompt_length`) is the frames the engine's prompt really has."""
    from npc_voice.engine.prompt import Voice, prompt_frames, special_codes
    from npc_voice.model.config import prompt_length
    from npc_voice.model.loading import random_model

    model = random_model("tiny")
    voice = Voice("v", codes=torch.zeros(37, model.config.lm.num_agent_codebooks, dtype=torch.long))
    frames = prompt_frames(voice, [5, 6, 7], special_codes(model.mimi), model)
    assert frames.tokens.shape[1] == prompt_length(37, 3) == 37 + 6 + 3 + 6


def test_the_sampler_really_caps_top_k_where_the_checks_refuse() -> None:
    """A top-k above MAX_TOP_K is cut to MAX_TOP_K by the sampler, so the schema and `Sampling` refuse it."""
    from npc_voice.characters import SamplingSettings
    from npc_voice.model.generator import Sampling
    from npc_voice.model.sampling import MAX_TOP_K, sample, uniform_noise

    B, V = 256, 2048
    logits = torch.linspace(0.0, 1e-3, V).expand(B, V).contiguous()  # nearly flat: any kept token can win
    noise = uniform_noise(torch.arange(B), torch.zeros(B, dtype=torch.long), 0, V)
    temperature = torch.ones(B)
    asked = sample(logits, temperature, torch.full((B,), 2 * MAX_TOP_K), noise)
    capped = sample(logits, temperature, torch.full((B,), MAX_TOP_K), noise)
    assert torch.equal(asked, capped) and int(asked.min()) >= V - MAX_TOP_K
    assert int(sample(logits, temperature, torch.full((B,), MAX_TOP_K - 256), noise).min()) >= V - MAX_TOP_K + 256
    with pytest.raises(ValueError, match=f"use 1 to {MAX_TOP_K}"):  # pydantic's ValidationError
        SamplingSettings(text_top_k=MAX_TOP_K + 1)
    with pytest.raises(ValueError, match=f"audio_top_k={MAX_TOP_K + 1}: use 1 to {MAX_TOP_K}"):
        Sampling(audio_top_k=MAX_TOP_K + 1)
    with pytest.raises(ValueError, match="text_top_k=0"):
        Sampling(text_top_k=0)
    assert Sampling(text_top_k=MAX_TOP_K, audio_top_k=1).text_top_k == MAX_TOP_K
