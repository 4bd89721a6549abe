"""Frame-by-frame generation over a fixed batch of conversation slots.

Token streams are delayed (`LMConfig.delays`): position p of stream k holds frame p - delay_k, and
positions p <= delay_k hold the initial token. At step t the user's frame t arrives; the model reads
position t of every stream and predicts position t+1 (text and agent codebook 0 of frame t+1,
agent codebooks 1..7 of frame t). So after step t the agent's frame t is complete: the same token
sequences as the reference, one frame earlier (the reference waits for the user's next frame so
that it can teacher-force the user's codebooks in the depth transformer, which cannot change what
the agent says; we skip those depth steps).

Everything per slot is a fixed-shape tensor in `GeneratorState`; a step has no host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .lm import PersonaPlexLM
from .sampling import MAX_TOP_K, draw_tokens
from .streaming import StreamState, state_field, where_active
from .transformer import TransformerState

UNGENERATED = -2  # a ring-buffer entry nothing has written yet
NOT_FORCED = -1  # in forced_text / forced_audio: sample this token


@dataclass(frozen=True)
class Sampling:
    """One conversation's sampling settings (the reference's defaults); temperature <= 0 is greedy."""

    text_temperature: float = 0.7
    text_top_k: int = 25
    audio_temperature: float = 0.8
    audio_top_k: int = 250

    def __post_init__(self) -> None:
        for name in ("text_top_k", "audio_top_k"):
            k = getattr(self, name)
            if not 1 <= k <= MAX_TOP_K:
                raise ValueError(f"{name}={k}: use 1 to {MAX_TOP_K} (the sampler keeps at most the {MAX_TOP_K} "
                                 "likeliest tokens)")

    @classmethod
    def greedy(cls) -> Sampling:
        return cls(text_temperature=0.0, audio_temperature=0.0)

    def apply(self, params: SamplingParams, slot: int, seed: int) -> None:
        params.text_temperature[slot], params.text_top_k[slot] = self.text_temperature, self.text_top_k
        params.audio_temperature[slot], params.audio_top_k[slot] = self.audio_temperature, self.audio_top_k
        params.seed[slot] = seed


@dataclass
class SamplingParams(StreamState):
    """Per-slot sampling settings (the reference's defaults after a reset)."""

    text_temperature: torch.Tensor = state_field(Sampling.text_temperature)  # [B] float; <= 0: greedy
    text_top_k: torch.Tensor = state_field(Sampling.text_top_k)  # [B] long
    audio_temperature: torch.Tensor = state_field(Sampling.audio_temperature)  # [B] float
    audio_top_k: torch.Tensor = state_field(Sampling.audio_top_k)  # [B] long
    seed: torch.Tensor = state_field(0)  # [B] long


@dataclass
class GeneratorState(StreamState):
    offset: torch.Tensor = state_field(0)  # [B] long: frames stepped
    tokens: torch.Tensor = state_field(UNGENERATED)  # [B, K, CT] ring of delayed tokens
    temporal: TransformerState = state_field()
    sampling: SamplingParams = state_field()


@dataclass
class FrameOutput:
    text: torch.Tensor  # [B] text token of the agent's frame
    audio: torch.Tensor  # [B, A] the agent's Mimi codes of the frame
    frame: torch.Tensor  # [B] long: which frame (the user frame it answers)
    valid: torch.Tensor  # [B] bool: false for skipped slots and the first frame (whose tokens
    # may be the initial or ungenerated ids, outside the codebooks)


class Generator:
    """Steps every slot of a batch by one 80 ms frame."""

    def __init__(self, lm: PersonaPlexLM):
        self.lm = lm
        cfg = lm.cfg
        self.cfg = cfg
        self.num_agent = cfg.num_agent_codebooks
        self.num_user = cfg.n_q - self.num_agent
        self.depth_steps = min(cfg.dep_q, self.num_agent)
        self.ring = cfg.max_delay + 2
        device = lm.device
        # Made once: creating tensors from Python data inside a step would copy from the host,
        # which a CUDA graph cannot capture.
        self.delays = torch.tensor(cfg.delays, device=device)
        self.initial = self._initial(device)

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> GeneratorState:
        device = device or self.lm.device
        long = dict(dtype=torch.long, device=device)
        d = Sampling()
        sampling = SamplingParams(
            torch.full((batch_size,), d.text_temperature, device=device),
            torch.full((batch_size,), d.text_top_k, **long),
            torch.full((batch_size,), d.audio_temperature, device=device),
            torch.full((batch_size,), d.audio_top_k, **long),
            torch.zeros(batch_size, **long),
        )
        return GeneratorState(
            torch.zeros(batch_size, **long),
            torch.full((batch_size, self.cfg.num_codebooks, self.ring), UNGENERATED, **long),
            self.lm.init_state(batch_size, device, dtype or self.lm.dtype),
            sampling,
        )

    def _initial(self, device: torch.device) -> torch.Tensor:
        """[K] the initial token of each stream."""
        init = torch.full((self.cfg.num_codebooks,), self.cfg.initial_audio_token, dtype=torch.long, device=device)
        init[0] = self.cfg.initial_text_token
        return init

    @torch.inference_mode()
    def step(self, state: GeneratorState, user_codes: torch.Tensor, active: torch.Tensor | None = None,
             forced_text: torch.Tensor | None = None, forced_audio: torch.Tensor | None = None,
             window: int | None = None, depth: Callable[..., torch.Tensor] | None = None) -> FrameOutput:
        """One frame for every slot.

        user_codes [B, U]: the user's Mimi codes of this frame. active [B] bool: slots to step
        (others keep their state bit-identical). forced_text [B] / forced_audio [B, A]: tokens to
        use instead of sampling for what this step predicts (NOT_FORCED = sample). window: see
        `Transformer.step` (an upper bound of the frames any active slot has seen, this one included).
        depth: what runs `Generator.depth` (the engine's step passes it compiled).
        """
        cfg, B = self.cfg, user_codes.shape[0]
        device = user_codes.device
        if active is None:
            active = torch.ones(B, dtype=torch.bool, device=device)
        delays = self.delays
        t = state.offset.clone()  # [B] this frame's index (the state advances below)
        user = slice(1 + self.num_agent, cfg.num_codebooks)

        # The user's frame t goes to positions t + delay.
        self._write(state.tokens, user, t[:, None] + delays[user], user_codes, active)

        # Position t of every stream is the model's input; early positions hold the initial token.
        read = torch.remainder(t, self.ring)[:, None, None].expand(B, cfg.num_codebooks, 1)
        current = state.tokens.gather(2, read)[..., 0]  # [B, K]
        is_initial = t[:, None] <= delays[None, :]
        current = torch.where(is_initial, self.initial[None, :], current)

        hidden, text_logits = self.lm.step_text(current[:, :, None], state.temporal, active, window)
        hidden, text_logits = hidden[:, 0], text_logits[:, 0]  # [B, dim], [B, text_card]
        sp = state.sampling
        text = draw_tokens(text_logits, sp.text_temperature, sp.text_top_k, sp.seed, t, 0)
        if forced_text is not None:
            text = torch.where(forced_text >= 0, forced_text, text)

        audio = (depth or self.depth)(hidden, text, state.sampling, state.offset, forced_audio)  # [B, A]

        # What this step predicted is position t + 1 of the text and agent streams.
        agent = slice(0, 1 + self.num_agent)
        predicted = torch.cat([text[:, None], audio], dim=1)
        self._write(state.tokens, agent, (t + 1)[:, None].expand(B, 1 + self.num_agent), predicted, active)

        # The agent's frame t: text and codebook 0 from position t, delayed codebooks from t + 1.
        out_pos = torch.remainder(t[:, None] + 1 - cfg.max_delay + delays[None, agent], self.ring)
        frame_tokens = state.tokens[:, agent].gather(2, out_pos[:, :, None])[..., 0]  # [B, 1 + A]
        valid = active & (t >= cfg.max_delay)
        state.offset.copy_(t + active.long())
        return FrameOutput(frame_tokens[:, 0], frame_tokens[:, 1:], t, valid)

    def depth(self, hidden: torch.Tensor, text: torch.Tensor, sp: SamplingParams, offset: torch.Tensor,
              forced_audio: torch.Tensor | None = None) -> torch.Tensor:
        """Samples the agent's codebooks one after the other from the temporal hidden state [B, dim]
        and the frame's text token [B], at frame `offset` [B]: [B, A]."""
        scratch = self.lm.depformer.init_scratch(hidden.shape[0], hidden.device, hidden.dtype)
        prev, tokens = text, []
        for k in range(self.depth_steps):
            logits = self.lm.depth_step(k, hidden, prev, scratch)
            token = draw_tokens(logits, sp.audio_temperature, sp.audio_top_k, sp.seed, offset, 1 + k)  # stream 1 + k
            if forced_audio is not None:
                token = torch.where(forced_audio[:, k] >= 0, forced_audio[:, k], token)
            tokens.append(token)
            prev = token
        return torch.stack(tokens, dim=1)

    def _write(self, tokens: torch.Tensor, streams: slice, positions: torch.Tensor, values: torch.Tensor,
               active: torch.Tensor) -> None:
        """tokens[b, streams, positions[b, j] % CT] = values[b, j] for active slots."""
        index = torch.remainder(positions, self.ring)[:, :, None]  # [B, J, 1]
        view = tokens[:, streams]
        old = view.gather(2, index)[..., 0]
        view.scatter_(2, index, where_active(active, values, old)[:, :, None])
