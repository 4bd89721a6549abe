"""PersonaPlex character prompts, built once and installed into a slot by copying.

A character prompt is a sequence of forced frames (see the reference's prompt order):
  voice frames      text PAD, agent = the voice sample's Mimi codes, user = SINE codes
  6 silence frames  text PAD, agent = SILENCE codes,                 user = SINE codes
  text frames       text = "<system> {role} <system>", one token a frame, agent SILENCE, user SINE
  6 silence frames
Every stream is forced, so what the prompt leaves in the model (the temporal KV cache and the
delayed-token ring) depends only on the character. We compute it in parallel forwards over many
prompt positions at once (the reference runs one full model step per frame: seconds per character) and
keep it as a `Prefix`, which `install.py` copies into a slot in one fixed-shape pass.
The engine builds prompts between ticks, a chunk at a time (`build.py`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..audio import VOICE_LUFS, normalize_loudness
from ..model.config import SILENCE_FRAMES, prompt_length
from ..model.generator import Generator
from ..model.loading import LoadedModel
from ..model.mimi import Mimi
from .step import capture_graph

log = logging.getLogger(__name__)

# SILENCE_FRAMES (6) and the prompt's length are owned by npc_voice.model.config (the character checks use them too).
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


VOICE_BUCKET_FRAMES = 25  # a voice is encoded padded to whole 2 s buckets: few shapes, all warmed up


def voice_bucket_frames(frames: int) -> int:
    """The padded length (frames) a voice of `frames` frames is encoded at."""
    return -(-max(1, frames) // VOICE_BUCKET_FRAMES) * VOICE_BUCKET_FRAMES


def normalized_voice(samples: np.ndarray, mimi: Mimi) -> np.ndarray:
    """A voice sample as the reference prompts with it: loudness-normalised to -24 LUFS."""
    return normalize_loudness(samples, mimi.config.sample_rate, VOICE_LUFS)


@torch.no_grad()
def voice_from_samples(name: str, samples: np.ndarray, mimi: Mimi, normalized: bool = False) -> Voice:
    """A voice from 24 kHz mono float samples (loudness-normalised here unless `normalized`), cut
    into frames (the last one zero-padded) and encoded by Mimi in ONE batched pass over the whole
    clip, masked as streaming sees it (`Mimi.encode(as_streamed=True)`): the codes a fresh streaming
    encoder gives frame by frame, as the reference does (Mimi is causal, so the zeros padding the clip
    to its bucket change no earlier frame)."""
    return VoiceEncoder(mimi, use_graphs=False).encode(name, samples, normalized)


class VoiceEncoder:
    """`voice_from_samples` at a few fixed shapes: on a GPU one CUDA graph per voice bucket, captured
    at start-up (`warm_up`), so encoding a voice costs its kernels (about a millisecond), not the
    hundreds of launches eager PyTorch would issue on the engine thread."""

    def __init__(self, mimi: Mimi, use_graphs: bool, pool=None):
        self.mimi, self.use_graphs, self.pool = mimi, use_graphs, pool
        self.device = mimi.downsample.conv.conv.conv.weight.device
        self._pcm: torch.Tensor | None = None  # [1, 1, longest bucket's samples]: the graphs' input
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, codes [1, K, bucket])
        self.error: BaseException | None = None  # why the graphs could not be captured, if they could not

    def _pass(self, pcm: torch.Tensor) -> torch.Tensor:
        return self.mimi.encode(pcm, as_streamed=True)  # [1, K, bucket]

    def warm_up(self, max_frames: int) -> None:
        """Captures every bucket's graph up to `max_frames` frames (no-op without graphs)."""
        if not self.use_graphs:
            return
        size = self.mimi.frame_size
        self._pcm = torch.zeros(1, 1, voice_bucket_frames(max_frames) * size, device=self.device)
        try:
            for bucket in range(VOICE_BUCKET_FRAMES, voice_bucket_frames(max_frames) + 1, VOICE_BUCKET_FRAMES):
                pcm = self._pcm[..., : bucket * size]
                with torch.inference_mode():
                    self._graphs[bucket] = capture_graph(lambda: self._pass(pcm), self.device, pool=self.pool)
        except RuntimeError as exc:  # eager encoding still works, at a few milliseconds more per voice
            self._graphs.clear()
            self.error = exc
            log.warning("voice encoder graphs unavailable, encoding eagerly: %s", exc)

    @torch.no_grad()
    def encode(self, name: str, samples: np.ndarray, normalized: bool = False) -> Voice:
        if not normalized:
            samples = normalized_voice(samples, self.mimi)
        return Voice(name, codes=self._codes(samples).T.cpu())  # [F, K]

    @torch.no_grad()
    def encode_many(self, requests) -> list[Voice | BaseException]:
        """The voice of each `PromptRequest` (its preset, its already encoded voice, or its
        normalised sample encoded now: every pass queued before the one wait for their codes), or
        the error that made it unusable."""
        pending: list[Voice | BaseException | torch.Tensor] = []
        for request in requests:
            try:
                pending.append(request.preset or request.voice or self._codes(request.samples))
            except Exception as exc:
                pending.append(exc)
        return [Voice(r.name, codes=v.T.cpu()) if isinstance(v, torch.Tensor) else v for r, v in zip(requests, pending)]

    def _codes(self, samples: np.ndarray) -> torch.Tensor:
        """[K, F] on the device, not waited for."""
        size = self.mimi.frame_size
        frames = max(1, math.ceil(samples.shape[-1] / size))
        bucket = voice_bucket_frames(frames)
        padded = np.zeros(bucket * size, dtype=np.float32)
        padded[: samples.shape[-1]] = samples
        pcm = torch.from_numpy(padded).to(self.device).view(1, 1, -1)
        graphed = self._graphs.get(bucket)
        if graphed is None:
            return self._pass(pcm)[0, :, :frames]
        # The graph's output lives in a pool other graphs reuse: copied out before any other replay.
        graph, codes = graphed
        self._pcm[..., : bucket * size].copy_(pcm)
        graph.replay()
        return codes[0, :, :frames].clone()


def voice_from_preset(name: str, path: str, dim: int | None) -> Voice:
    """A PersonaPlex preset `.pt`: {"embeddings": [T, 1, 1, dim], "cache": [1, 17, 4]}."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: pickle, zip or torch errors alike
        raise ValueError(f"{path}: not a PersonaPlex voice preset ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else 'unreadable'})") from None
    if not isinstance(data, dict) or "embeddings" not in data or "cache" not in data:
        raise ValueError(f"{path}: not a PersonaPlex voice preset (expected 'embeddings' and 'cache')")
    embeddings, ring = data["embeddings"], data["cache"]
    if embeddings.dim() != 4 or (dim is not None and embeddings.shape[-1] != dim) or tuple(ring.shape) != (1, 17, 4):
        raise ValueError(f"{path}: preset shapes {tuple(embeddings.shape)} / {tuple(ring.shape)} do not fit a "
                         f"model of dim {dim} (expected [T, 1, 1, {dim}] and [1, 17, 4])")
    return Voice(name, embeddings=embeddings.reshape(embeddings.shape[0], -1), ring=ring[0].long())


@dataclass
class PromptFrames:
    """The forced frames of a character prompt, before delays: one column per frame."""

    tokens: torch.Tensor  # [K, F] long: text, agent codebooks, user codebooks
    voice: Voice


def prompt_frames(voice: Voice, text_tokens: list[int], special: SpecialCodes, model: LoadedModel) -> PromptFrames:
    cfg = model.config.lm
    A = cfg.num_agent_codebooks
    F = prompt_length(voice.frames, len(text_tokens))
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


EMBED_BUCKET = 128  # a prompt's embeddings are computed padded to a multiple of this many positions


class PromptEmbedder:
    """The summed input embeddings of whole prompts ([F, dim] each; a preset's stored ones for its
    voice positions). On a GPU one CUDA graph per bucket of `EMBED_BUCKET` positions up to
    `longest` (captured at start-up by `warm_up`): an embedding pass is 17 lookups with their
    masks, some 90 launches eagerly (2 ms of the engine thread on an H200), one replay here."""

    def __init__(self, model: LoadedModel, gen: Generator, longest: int = 0, use_graphs: bool = False, pool=None):
        self.lm, self.delays, self.initial = model.lm, model.config.lm.delays, gen.initial.cpu()
        self.use_graphs, self.pool, self.device = use_graphs, pool, model.device
        self.longest = -(-longest // EMBED_BUCKET) * EMBED_BUCKET
        self._tokens = torch.zeros(1, model.config.lm.num_codebooks, self.longest, dtype=torch.long,
                                   device=model.device)  # [1, K, longest]: the graphs' input
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, [1, bucket, dim])

    def warm_up(self) -> None:
        if self.use_graphs:
            for bucket in range(EMBED_BUCKET, self.longest + 1, EMBED_BUCKET):
                tokens = self._tokens[:, :, :bucket]
                with torch.inference_mode():
                    self._graphs[bucket] = capture_graph(lambda: self.lm.embed(tokens), self.device, pool=self.pool)

    @torch.inference_mode()
    def embed(self, prompts: list[PromptFrames]) -> list[torch.Tensor]:
        out = []
        for frames in prompts:
            positions = delayed_positions(frames.tokens, self.delays, self.initial)  # [K, F]
            F = positions.shape[1]
            graphed = self._graphs.get(-(-F // EMBED_BUCKET) * EMBED_BUCKET)
            if graphed is None:  # no graphs (CPU, tools), or longer than a character can be (it wraps)
                x = self.lm.embed(positions.to(self.device)[None])[0]
            else:  # the graph's output lives in a pool other graphs reuse: copied out at once
                graph, embedded = graphed
                self._tokens[0, :, :F].copy_(positions)
                graph.replay()
                x = embedded[0, :F].clone()
            voice = frames.voice
            if voice.embeddings is not None:  # a preset's stored input embeddings for positions 0..v-2
                x[: voice.embeddings.shape[0]] = voice.embeddings.to(x.device, x.dtype)
            out.append(x)
        return out


def text_prompt_tokens(model: LoadedModel, role: str) -> list[int]:
    return model.tokenizer.encode("<system> " + role.strip() + " <system>")


@dataclass
class Prefix:
    """What a prompt of N positions leaves in one slot: the temporal KV rows of its last
    min(N, context) positions (in position order), the token ring, and the last position's hidden
    state and text logits (to sample the first spoken frame)."""

    keys: torch.Tensor  # [L, H, n, D]
    values: torch.Tensor  # [L, H, n, D]
    ring: torch.Tensor  # [K, CT] long, as the generator's ring after N positions
    hidden: torch.Tensor  # [dim]
    text_logits: torch.Tensor  # [text_card]
    positions: torch.Tensor  # [] long, on the host: N, the prompt's length in frames

    @property
    def length(self) -> int:
        return int(self.positions)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())

    def to(self, device: torch.device | str, pin: bool = False) -> Prefix:
        """A copy on `device` (pinned host memory with `pin`: copies back to a GPU in milliseconds)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)
            return t.pin_memory() if pin and not t.is_pinned() else t
        return Prefix(**{k: (move(v) if k != "positions" else v.cpu()) for k, v in vars(self).items()})


def prompt_ring(frames: PromptFrames, gen: Generator) -> torch.Tensor:
    """[K, CT] the generator's token ring after the prompt's N positions: the delayed streams at
    position N hold frame N-1 (every stream is forced), the initial token where p <= delay."""
    F = frames.tokens.shape[1]
    initial = gen.initial.cpu()
    delays = torch.tensor(gen.cfg.delays)
    ring = torch.full((gen.cfg.num_codebooks, gen.ring), -2, dtype=torch.long)
    for p in range(max(0, F - gen.ring + 1), F + 1):
        frame = p - delays  # [K]
        known = (frame >= 0) & (frame < F)
        col = torch.where(known, frames.tokens[torch.arange(len(delays)), frame.clamp(0, F - 1)], -2)
        col = torch.where(torch.tensor(p) <= delays, initial, col)
        ring[:, p % gen.ring] = col
    return ring
