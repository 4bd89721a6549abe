"""Model configuration: dataclasses for the LM and the Mimi codec, and named presets.

The field names follow the reference's (Kyutai `moshi`) keyword names where one exists, so a
Kyutai-style `config.json` maps onto these dataclasses key for key (see `LMConfig.from_kyutai`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

# The facts every layer shares, owned here: import them (or read them off a loaded model's config,
# `model.config.mimi.sample_rate` / `.frame_size`, `model.config.lm.context`), never re-type them.
SAMPLE_RATE = 24_000  # Mimi's rate: what the model hears and says
FRAME_RATE = 12.5  # model frames a second
FRAME_SECONDS = 1 / FRAME_RATE  # 0.08: one 80 ms frame
FRAME_MS = round(FRAME_SECONDS * 1000)  # 80, for messages and wire formats
FRAME_SIZE = int(SAMPLE_RATE / FRAME_RATE)  # 1920 samples a frame at 24 kHz
# A character prompt is: voice frames, SILENCE_FRAMES, one frame per text token, SILENCE_FRAMES
# (the reference's `audio_silence_frame_cnt = int(0.5 * frame_rate)`).
SILENCE_FRAMES = int(0.5 * FRAME_RATE)  # 6


def prompt_length(voice_frames: int, text_tokens: int) -> int:
    """Frames of a character prompt: the voice, a silence, the text prompt, a silence."""
    return voice_frames + SILENCE_FRAMES + text_tokens + SILENCE_FRAMES


@dataclass(frozen=True)
class LMConfig:
    """PersonaPlex / Moshi LM: a temporal transformer over frames and a depth transformer over codebooks."""

    dim: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    hidden_scale: float = 4.125
    context: int = 3000  # frames the temporal transformer attends to (240 s)
    max_period: float = 10_000.0
    text_card: int = 32_000
    card: int = 2048  # audio codebook size; id `card` is the initial audio token
    n_q: int = 16  # audio streams in the input: 8 agent + 8 user codebooks
    dep_q: int = 16  # codebooks the depth transformer handles (PersonaPlex 16, Moshi 8)
    delays: tuple[int, ...] = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
    existing_text_padding_id: int = 3
    existing_text_end_padding_id: int = 0
    norm_eps: float = 1e-8  # rms_norm_f32
    depformer_dim: int = 1024
    depformer_num_layers: int = 6
    depformer_num_heads: int = 16
    depformer_dim_feedforward: int = 4224  # int(4.125 * 1024)
    depformer_max_period: float = 10_000.0

    def __post_init__(self) -> None:
        if len(self.delays) != self.n_q + 1:
            raise ValueError(f"expected {self.n_q + 1} delays (text + {self.n_q} audio), got {len(self.delays)}")
        if self.dim % self.num_heads or self.depformer_dim % self.depformer_num_heads:
            raise ValueError("dim must be divisible by num_heads (temporal and depth transformers)")
        if not 0 < self.dep_q <= self.n_q:
            raise ValueError(f"dep_q must be in 1..n_q, got {self.dep_q}")

    @property
    def num_codebooks(self) -> int:
        """Streams per frame: text + audio."""
        return self.n_q + 1

    @property
    def num_agent_codebooks(self) -> int:
        """Audio codebooks the model speaks with (the first half of the audio streams)."""
        return self.n_q // 2

    @property
    def hidden_dim(self) -> int:
        """Hidden width of the temporal transformer's gated FFN."""
        return gated_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_hidden_dim(self) -> int:
        return gated_hidden(self.depformer_dim, self.depformer_dim_feedforward)

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def initial_text_token(self) -> int:
        return self.text_card

    @property
    def initial_audio_token(self) -> int:
        return self.card

    @classmethod
    def from_kyutai(cls, raw: Mapping[str, Any], base: LMConfig | None = None) -> LMConfig:
        """Overrides `base` (default: this class's defaults) with the LM keys of a Kyutai `config.json`.

        Keys that do not describe the LM (file names, generation settings, ...) are ignored; LM
        features this implementation does not support raise, rather than load a different model.
        """
        base = base or cls()
        unsupported = {
            "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope", "causal": True,
            "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_multi_linear": True,
            "depformer_weights_per_step": True, "layer_scale": None, "depformer_layer_scale": None,
            "depformer_weights_per_step_schedule": None, "depformer_low_rank_embeddings": None,
            "conditioners": None, "fuser": None, "demux_second_stream": False, "cross_attention": False,
            "kv_repeat": 1,
        }
        for key, supported in unsupported.items():
            value = raw.get(key, supported)
            empty = value in (None, [], {}, False) and supported in (None, False)
            if value != supported and not empty:
                raise ValueError(f"config.json: {key}={value!r} is not supported (expected {supported!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        updates: dict[str, Any] = {k: raw[k] for k in names if k in raw}
        if "delays" in updates:
            updates["delays"] = tuple(updates["delays"])
        return dataclasses.replace(base, **updates)

    def to_kyutai(self) -> dict[str, Any]:
        """The LM part of a Kyutai-style `config.json` for this configuration."""
        out = dataclasses.asdict(self)
        out["delays"] = list(self.delays)
        out.pop("norm_eps")
        out.update(gating="silu", norm="rms_norm_f32", positional_embedding="rope", causal=True,
                   layer_scale=None, depformer_gating="silu", depformer_pos_emb="none",
                   depformer_multi_linear=True, depformer_weights_per_step=True,
                   depformer_layer_scale=None, depformer_context=self.dep_q)
        return out


def gated_hidden(dim: int, dim_feedforward: int) -> int:
    """Hidden width of a gated FFN, the reference's rule: 21/8 dim at 4x, else 2/3 of dim_feedforward."""
    return (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3


@dataclass(frozen=True)
class SEANetConfig:
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    compress: int = 2
    dilation_base: int = 2
    n_residual_layers: int = 1
    true_skip: bool = True
    pad_mode: str = "constant"

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.ratios:
            hop *= r
        return hop


@dataclass(frozen=True)
class MimiTransformerConfig:
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250  # steps at the encoder frame rate (25 Hz): 10 s
    layer_scale: float = 0.01
    max_period: float = 10_000.0
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class QuantizerConfig:
    dimension: int = 256
    n_q: int = 32  # codebooks in the checkpoint: 1 semantic + 31 acoustic
    n_q_semantic: int = 1
    bins: int = 2048
    epsilon: float = 1e-5


@dataclass(frozen=True)
class MimiConfig:
    sample_rate: int = SAMPLE_RATE
    frame_rate: float = FRAME_RATE
    seanet: SEANetConfig = field(default_factory=SEANetConfig)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    num_codebooks: int = 8  # codebooks used by the LM

    @property
    def frame_size(self) -> int:
        return int(self.sample_rate / self.frame_rate)

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.seanet.hop_length

    @property
    def downsample_stride(self) -> int:
        return int(self.encoder_frame_rate / self.frame_rate)

    @classmethod
    def from_kyutai(cls, raw: Mapping[str, Any]) -> MimiConfig:
        """Reads a Kyutai Mimi config (`{"seanet": ..., "transformer": ..., "quantizer": ...}`)."""

        def pick(kind: type, values: Mapping[str, Any]) -> Any:
            names = {f.name for f in dataclasses.fields(kind)}
            kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}
            return kind(**kw)

        seanet = pick(SEANetConfig, raw.get("seanet", {}))
        transformer = pick(MimiTransformerConfig, raw.get("transformer", {}))
        quantizer = pick(QuantizerConfig, raw.get("quantizer", {}))
        return cls(
            sample_rate=raw.get("sample_rate", SAMPLE_RATE),
            frame_rate=raw.get("frame_rate", FRAME_RATE),
            seanet=seanet,
            transformer=transformer,
            quantizer=quantizer,
            num_codebooks=raw.get("num_codebooks", 8),
        )

    def to_kyutai(self) -> dict[str, Any]:
        """A Kyutai-style Mimi config dict (the layout of `moshi.models.loaders._mimi_config`)."""
        s, t, q = self.seanet, self.transformer, self.quantizer
        seanet = dataclasses.asdict(s) | {
            "ratios": list(s.ratios), "causal": True, "activation": "ELU", "norm": "none",
            "disable_norm_outer_blocks": 0,
        }
        transformer = {
            "d_model": t.d_model, "num_heads": t.num_heads, "num_layers": t.num_layers, "causal": True,
            "layer_scale": t.layer_scale, "context": t.context, "conv_layout": True,
            "max_period": t.max_period, "gating": "none", "norm": "layer_norm",
            "positional_embedding": "rope", "dim_feedforward": t.dim_feedforward,
            "input_dimension": s.dimension, "output_dimensions": [s.dimension],
        }
        quantizer = {"dimension": q.dimension, "n_q": q.n_q, "bins": q.bins,
                     "input_dimension": s.dimension, "output_dimension": s.dimension}
        return {"sample_rate": self.sample_rate, "channels": s.channels, "frame_rate": self.frame_rate,
                "seanet": seanet, "transformer": transformer, "quantizer": quantizer}


@dataclass(frozen=True)
class ModelConfig:
    """A whole PersonaPlex model: the LM and its Mimi codec."""

    name: str
    lm: LMConfig
    mimi: MimiConfig


PRESETS: dict[str, ModelConfig] = {
    # NVIDIA PersonaPlex 7B: Moshi 7B whose depth transformer also models the user's 8 codebooks.
    "personaplex-7b": ModelConfig("personaplex-7b", LMConfig(), MimiConfig()),
    # Kyutai Moshi 7B (moshiko / moshika): the same LM with dep_q = 8.
    "moshi-7b": ModelConfig("moshi-7b", LMConfig(dep_q=8), MimiConfig()),
    # The same architecture, small enough to run a full frame well inside 80 ms on one CPU core.
    # Its text vocabulary is the built-in tokenizer's (see npc_voice.model.tokenizer).
    "tiny": ModelConfig(
        "tiny",
        LMConfig(
            dim=128, num_layers=2, num_heads=8, text_card=1000, depformer_dim=64,
            depformer_num_layers=1, depformer_num_heads=4, depformer_dim_feedforward=int(4.125 * 64),
        ),
        MimiConfig(
            seanet=SEANetConfig(dimension=64, n_filters=8),
            transformer=MimiTransformerConfig(d_model=64, num_heads=4, num_layers=2, dim_feedforward=256),
            quantizer=QuantizerConfig(dimension=32, n_q=8),
        ),
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None
