"""PersonaPlex character prompts, built once and installed into a slot by copying.

A character prompt is a sequence of forced frames (see the reference's prompt order):
  voice frames      text PAD, agent = the voice sample's Mimi codes, user = SINE codes
  6 silence frames  text PAD, agent = SILENCE codes,                 user = SINE codes
  text frames       text = "<system> {role} <system>", one token a frame, agent SILENCE, user SINE
  6 silence frames
Every stream is forced, so what the prompt leaves in the model (the temporal KV cache and the
delayed-token ring) depends only on the character. We compute it in ONE parallel forward over all
prompt positions (the reference runs one full model step per frame: seconds per character) and
keep it as a `Prefix`, which `install_prefix` copies into a slot in a few small tensor copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..audio import VOICE_LUFS, normalize_loudness
from ..model.generator import Generator, GeneratorState, Sampling
from ..model.loading import LoadedModel
from ..model.mimi import Mimi
from ..model.sampling import sample, uniform_noise

SILENCE_FRAMES = 6
# Published codes of the official Mimi for a 440 Hz sine frame and a silent frame.
OFFICIAL_SINE_CODES = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
OFFICIAL_SILENCE_CODES = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)


@dataclass(frozen=True)
class SpecialCodes:
    sine: tuple[int, ...]  # the user stream during the prompt
    silence: tuple[int, ...]  # the agent stream while it is silent


def sine_frame(frame_size: int, sample_rate: int) -> np.ndarray:
    """The reference's 440 Hz sine of one frame, amplitude 0.5."""
    t = np.linspace(0.0, frame_size / sample_rate, frame_size, endpoint=False)
    return (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


def is_official_mimi(mimi: Mimi) -> bool:
    """The released Mimi is the only one with the full-size configuration."""
    cfg = mimi.config
    return cfg.seanet.dimension == 512 and cfg.seanet.n_filters == 64 and cfg.quantizer.n_q == 32 \
        and cfg.quantizer.bins == 2048


@torch.no_grad()
def special_codes(mimi: Mimi) -> SpecialCodes:
    """SINE and SILENCE codes for this Mimi: each frame encoded as the first frame of a fresh stream
    (the published constants for the official Mimi)."""
    if is_official_mimi(mimi):
        return SpecialCodes(OFFICIAL_SINE_CODES, OFFICIAL_SILENCE_CODES)
    device = mimi.downsample.conv.conv.conv.weight.device
    frames = torch.stack([
        torch.from_numpy(sine_frame(mimi.frame_size, mimi.config.sample_rate)),
        torch.zeros(mimi.frame_size),
    ])[:, None].to(device)  # [2, 1, frame]
    codes = mimi.encode_step(frames, mimi.init_encoder_state(2, device))
    return SpecialCodes(tuple(codes[0].tolist()), tuple(codes[1].tolist()))


@dataclass
class Voice:
    """A voice prompt: Mimi codes of a sample, or a PersonaPlex preset (embeddings + token ring)."""

    name: str
    codes: torch.Tensor | None = None  # [F, 8] long: one row per 80 ms frame
    embeddings: torch.Tensor | None = None  # [F - 1, dim]: input embeddings of positions 0..F-2
    ring: torch.Tensor | None = None  # [17, 4] long: the reference's token ring after the voice

    @property
    def frames(self) -> int:
        return self.codes.shape[0] if self.codes is not None else self.embeddings.shape[0] + 1


@torch.no_grad()
def voice_from_samples(name: str, samples: np.ndarray, mimi: Mimi) -> Voice:
    """A voice from 24 kHz mono float samples: loudness-normalised to -24 LUFS, cut into frames
    (the last one zero-padded), streamed through a fresh Mimi encoder as the reference does."""
    samples = normalize_loudness(samples, mimi.config.sample_rate, VOICE_LUFS)
    size = mimi.frame_size
    frames = max(1, math.ceil(samples.shape[-1] / size))
    padded = np.zeros(frames * size, dtype=np.float32)
    padded[: samples.shape[-1]] = samples
    device = mimi.downsample.conv.conv.conv.weight.device
    pcm = torch.from_numpy(padded).to(device).view(1, 1, frames, size)
    state = mimi.init_encoder_state(1, device)
    codes = torch.stack([mimi.encode_step(pcm[:, :, f], state)[0] for f in range(frames)])
    return Voice(name, codes=codes.cpu())


def voice_from_preset(name: str, path: str, dim: int) -> Voice:
    """A PersonaPlex preset `.pt`: {"embeddings": [T, 1, 1, dim], "cache": [1, 17, 4]}."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "embeddings" not in data or "cache" not in data:
        raise ValueError(f"{path}: not a PersonaPlex voice preset (expected 'embeddings' and 'cache')")
    embeddings, ring = data["embeddings"], data["cache"]
    if embeddings.dim() != 4 or embeddings.shape[-1] != dim or tuple(ring.shape) != (1, 17, 4):
        raise ValueError(f"{path}: preset shapes {tuple(embeddings.shape)} / {tuple(ring.shape)} do not fit a "
                         f"model of dim {dim} (expected [T, 1, 1, {dim}] and [1, 17, 4])")
    return Voice(name, embeddings=embeddings.reshape(-1, dim), ring=ring[0].long())


@dataclass
class PromptFrames:
    """The forced frames of a character prompt, before delays: one column per frame."""

    tokens: torch.Tensor  # [K, F] long: text, agent codebooks, user codebooks
    voice: Voice


def prompt_frames(voice: Voice, text_tokens: list[int], special: SpecialCodes, model: LoadedModel) -> PromptFrames:
    cfg = model.config.lm
    A = cfg.num_agent_codebooks
    F = voice.frames + 2 * SILENCE_FRAMES + len(text_tokens)
    tokens = torch.empty(cfg.num_codebooks, F, dtype=torch.long)
    tokens[0] = cfg.existing_text_padding_id
    tokens[1 : 1 + A] = torch.tensor(special.silence)[:, None]
    tokens[1 + A :] = torch.tensor(special.sine)[:, None]
    v = voice.frames
    if voice.codes is not None:
        tokens[1 : 1 + A, :v] = voice.codes.T
    else:  # a preset: only the voice's last frames matter past its embeddings; read them off its ring
        ring, R = voice.ring, voice.ring.shape[-1]
        tokens[1, v - 1] = ring[1, (v - 1) % R]
        tokens[2 : 1 + A, v - 1] = ring[2 : 1 + A, v % R]
        if v >= 2:
            tokens[2 : 1 + A, v - 2] = ring[2 : 1 + A, (v - 1) % R]
    start = v + SILENCE_FRAMES
    tokens[0, start : start + len(text_tokens)] = torch.tensor(text_tokens, dtype=torch.long)
    return PromptFrames(tokens, voice)


def delayed_positions(frames: torch.Tensor, delays: tuple[int, ...], initial: torch.Tensor) -> torch.Tensor:
    """Frame table [K, F] -> position table [K, F]: position p of stream k holds frame p - delay_k,
    and the initial token where p <= delay_k (the reference's delay machinery)."""
    K, F = frames.shape
    out = torch.empty_like(frames)
    for k, d in enumerate(delays):
        out[k, d:] = frames[k, : F - d]
        out[k, : min(d + 1, F)] = initial[k]
    return out


def text_prompt_tokens(model: LoadedModel, role: str) -> list[int]:
    return model.tokenizer.encode("<system> " + role.strip() + " <system>")


@dataclass
class Prefix:
    """What a prompt leaves in one slot: the temporal KV rows of its positions, the token ring,
    and the last position's hidden state and text logits (to sample the first spoken frame)."""

    keys: torch.Tensor  # [L, H, N, D]
    values: torch.Tensor  # [L, H, N, D]
    ring: torch.Tensor  # [K, CT] long, as the generator's ring after N positions
    hidden: torch.Tensor  # [dim]
    text_logits: torch.Tensor  # [text_card]

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.ring, self.hidden, self.text_logits))


@torch.no_grad()
def build_prefix(model: LoadedModel, gen: Generator, frames: PromptFrames) -> Prefix:
    """Runs all prompt positions 0..F-1 in one parallel forward of a fresh one-slot state."""
    lm, cfg = model.lm, model.config.lm
    F = frames.tokens.shape[1]
    if F >= cfg.context:
        raise ValueError(f"the prompt takes {F} frames, more than the model's context of {cfg.context}")
    device = model.device
    initial = gen.initial.cpu()
    positions = delayed_positions(frames.tokens, cfg.delays, initial).to(device)  # [K, F]
    x = lm.embed(positions[None])  # [1, F, dim]
    voice = frames.voice
    if voice.embeddings is not None:  # a preset's stored input embeddings for positions 0..v-2
        x[0, : voice.embeddings.shape[0]] = voice.embeddings.to(device, x.dtype)
    state = lm.transformer.init_state(1, capacity=F)
    hidden, text_logits = lm.step_embeddings(x, state)

    # The ring after position F-1: delayed streams at position F hold frame F-1 (all forced).
    ring = torch.full((cfg.num_codebooks, gen.ring), -2, dtype=torch.long)
    delays = torch.tensor(cfg.delays)
    for p in range(max(0, F - gen.ring + 1), F + 1):
        frame = p - delays  # [K]
        known = (frame >= 0) & (frame < F)
        col = torch.where(known, frames.tokens[torch.arange(len(delays)), frame.clamp(0, F - 1)], -2)
        col = torch.where(torch.tensor(p) <= delays, initial, col)
        ring[:, p % gen.ring] = col
    keys = torch.stack([c.keys[0, :, :F] for c in state.layers])
    values = torch.stack([c.values[0, :, :F] for c in state.layers])
    return Prefix(keys, values, ring.to(device), hidden[0, -1], text_logits[0, -1])


@torch.no_grad()
def install_prefix(gen: Generator, state: GeneratorState, slot: int, prefix: Prefix, seed: int,
                   sampling: Sampling = Sampling()) -> None:
    """Gives `slot` the character of `prefix`: copies its caches and ring, then samples the text
    and agent codebook 0 of the first conversation position (the rest of it is forced silence)."""
    # Every field of the slot is set below, so nothing needs clearing first: KV rows past the
    # prefix hold stale values that the slot's position makes invisible.
    sampling.apply(state.sampling, slot, seed)
    N = prefix.length
    for layer, cache in enumerate(state.temporal.layers):
        cache.keys[slot, :, :N] = prefix.keys[layer]
        cache.values[slot, :, :N] = prefix.values[layer]
    state.temporal.position[slot] = N
    state.offset[slot] = N
    state.tokens[slot] = prefix.ring

    # Position N's text and codebook 0 come from position N-1's prediction, sampled for this slot.
    sp, counter = state.sampling, torch.full((1,), N - 1, device=state.offset.device)
    s = slice(slot, slot + 1)
    text = sample(prefix.text_logits[None], sp.text_temperature[s], sp.text_top_k[s],
                  uniform_noise(sp.seed[s], counter, 0, prefix.text_logits.shape[-1]))
    scratch = gen.lm.depformer.init_scratch(1, prefix.hidden.device, prefix.hidden.dtype)
    logits = gen.lm.depth_step(0, prefix.hidden[None], text, scratch)
    cb0 = sample(logits, sp.audio_temperature[s], sp.audio_top_k[s], uniform_noise(sp.seed[s], counter, 1, logits.shape[-1]))
    position = N % gen.ring
    state.tokens[slot, 0, position] = text[0]
    state.tokens[slot, 1, position] = cb0[0]
