"""Mimi: the neural audio codec between 24 kHz PCM and 12.5 Hz frames of discrete codes.

    encode: PCM -> SEANet encoder (25 Hz) -> transformer -> downsample x2 (12.5 Hz) -> split RVQ -> codes
    decode: codes -> split RVQ -> upsample x2 (25 Hz) -> transformer -> SEANet decoder -> PCM

`state_dict()` keys and shapes are those of Kyutai's released Mimi checkpoint
(`tokenizer-e351c8d8-checkpoint125.safetensors`), so it loads with a plain `load_state_dict`.

Streaming runs one 80 ms frame per step for a fixed batch of slots. Every piece of state (conv left
contexts, transposed-conv overlaps, replicate-padding flags, transformer KV rings) lives in typed
`StreamState`s with the slot first and a fixed shape; a step has no host sync and no data-dependent
branch, so it can be captured in a CUDA graph. Slots with `active[i] == False` keep their state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import MimiConfig
from ..streaming import StreamState
from ..transformer import LayerSpec, Transformer, TransformerState
from .convs import ConvDownsample1d, ConvState, ConvTrState, ConvTrUpsample1d
from .quantizer import SplitResidualVectorQuantizer
from .seanet import LayerState, SEANetDecoder, SEANetEncoder


@dataclass
class MimiEncoderState(StreamState):
    seanet: list[LayerState]  # SEANet encoder layers, in order
    transformer: TransformerState
    downsample: ConvState


@dataclass
class MimiDecoderState(StreamState):
    upsample: ConvTrState
    transformer: TransformerState
    seanet: list[LayerState]  # SEANet decoder layers, in order


@dataclass
class MimiState(StreamState):
    """A full-duplex slot: the encoder streams the user's audio, the decoder the agent's codes."""

    encoder: MimiEncoderState
    decoder: MimiDecoderState


class MimiTransformer(nn.Module):
    """The transformer between SEANet and the quantizer, on [B, C, T] tensors ("conv layout").

    Named like the reference's ProjectedTransformer: `transformer.layers.N...`, plus `input_proj` and
    `output_projs.0` only when d_model differs from the SEANet dimension (never in the released Mimi).
    """

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        t, dim = cfg.transformer, cfg.seanet.dimension
        spec = LayerSpec(t.d_model, t.num_heads, t.dim_feedforward, norm="layer", ffn="gelu",
                         norm_eps=t.norm_eps, layer_scale=t.layer_scale)
        self.transformer = Transformer(spec, t.num_layers, t.context, t.max_period)
        self.input_proj = nn.Linear(dim, t.d_model, bias=False) if t.d_model != dim else None
        self.output_projs = nn.ModuleList([nn.Linear(t.d_model, dim, bias=False)] if t.d_model != dim else [])

    def _project_in(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, T, D]
        x = x.transpose(1, 2)
        return self.input_proj(x) if self.input_proj is not None else x

    def _project_out(self, z: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, C, T]
        for proj in self.output_projs:
            z = proj(z)
        return z.transpose(1, 2)

    def forward(self, x: torch.Tensor, streamed_chunk: int | None = None) -> torch.Tensor:
        return self._project_out(self.transformer(self._project_in(x), streamed_chunk))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> TransformerState:
        return self.transformer.init_state(batch_size, device, dtype)

    def step(self, x: torch.Tensor, state: TransformerState, active: torch.Tensor | None = None) -> torch.Tensor:
        return self._project_out(self.transformer.step(self._project_in(x), state, active))


class Mimi(nn.Module):
    def __init__(self, config: MimiConfig):
        super().__init__()
        q = config.quantizer
        if not q.n_q_semantic <= config.num_codebooks <= q.n_q:
            raise ValueError(f"num_codebooks must be in {q.n_q_semantic}..{q.n_q}, got {config.num_codebooks}")
        if config.frame_size != config.seanet.hop_length * config.downsample_stride:
            raise ValueError("frame_size must equal the SEANet hop length times the downsample stride")
        self.config = config
        self.num_codebooks = config.num_codebooks
        dim, stride = config.seanet.dimension, config.downsample_stride
        self.encoder = SEANetEncoder(config.seanet)
        self.decoder = SEANetDecoder(config.seanet)
        self.encoder_transformer = MimiTransformer(config)
        self.decoder_transformer = MimiTransformer(config)
        self.quantizer = SplitResidualVectorQuantizer(q, dim)
        self.downsample = ConvDownsample1d(stride, dim)
        # channel_wise=True: the released Mimi's upsampler is depthwise (`upsample_channel_wise_bug`).
        self.upsample = ConvTrUpsample1d(stride, dim, channel_wise=True)

    @property
    def frame_size(self) -> int:
        return self.config.frame_size

    @property
    def cardinality(self) -> int:
        return self.config.quantizer.bins

    # ---- whole clip -------------------------------------------------------------------------

    def encode(self, pcm: torch.Tensor, as_streamed: bool = False) -> torch.Tensor:
        """pcm [B, 1, N] -> codes [B, K, ceil(N / frame_size)] (long); the clip is zero-padded on the
        right to whole frames. as_streamed: the codes `encode_step` gives frame by frame (they differ
        from a whole-clip pass once the transformer's context is full: 10 s for the released Mimi)."""
        pad = -pcm.shape[-1] % self.frame_size
        x = nn.functional.pad(pcm.to(self._dtype), (0, pad))
        chunk = self.config.downsample_stride if as_streamed else None  # transformer steps per frame
        latent = self.downsample(self.encoder_transformer(self.encoder(x), chunk))  # [B, C, F]
        return self.quantizer.encode(latent, self.num_codebooks)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, F] -> pcm [B, 1, F * frame_size]."""
        latent = self.upsample(self.quantizer.decode(codes))  # [B, C, stride * F]
        return self.decoder(self.decoder_transformer(latent))

    # ---- streaming --------------------------------------------------------------------------

    def init_encoder_state(self, batch_size: int, device: torch.device | str | None = None,
                           dtype: torch.dtype | None = None) -> MimiEncoderState:
        device, dtype = self._placement(device, dtype)
        return MimiEncoderState(
            seanet=self.encoder.init_state(batch_size, device, dtype),
            transformer=self.encoder_transformer.init_state(batch_size, device, dtype),
            downsample=self.downsample.init_state(batch_size, device, dtype),
        )

    def init_decoder_state(self, batch_size: int, device: torch.device | str | None = None,
                           dtype: torch.dtype | None = None) -> MimiDecoderState:
        device, dtype = self._placement(device, dtype)
        return MimiDecoderState(
            upsample=self.upsample.init_state(batch_size, device, dtype),
            transformer=self.decoder_transformer.init_state(batch_size, device, dtype),
            seanet=self.decoder.init_state(batch_size, device, dtype),
        )

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> MimiState:
        return MimiState(self.init_encoder_state(batch_size, device, dtype),
                         self.init_decoder_state(batch_size, device, dtype))

    def encode_step(self, pcm: torch.Tensor, state: MimiEncoderState,
                    active: torch.Tensor | None = None) -> torch.Tensor:
        """One frame per slot: pcm [B, 1, frame_size] -> codes [B, K]."""
        active = _all_if_none(active, pcm)
        x = self.encoder.step(pcm.to(self._dtype), state.seanet, active)  # [B, C, stride]
        x = self.encoder_transformer.step(x, state.transformer, active)
        x = self.downsample.step(x, state.downsample, active)  # [B, C, 1]
        return self.quantizer.encode(x, self.num_codebooks)[..., 0]

    def decode_step(self, codes: torch.Tensor, state: MimiDecoderState,
                    active: torch.Tensor | None = None) -> torch.Tensor:
        """One frame per slot: codes [B, K] -> pcm [B, 1, frame_size]."""
        active = _all_if_none(active, codes)
        x = self.quantizer.decode(codes[..., None])  # [B, C, 1]
        x = self.upsample.step(x, state.upsample, active)  # [B, C, stride]
        x = self.decoder_transformer.step(x, state.transformer, active)
        return self.decoder.step(x, state.seanet, active)

    @property
    def _dtype(self) -> torch.dtype:
        """The weights' dtype; PCM in any float dtype (bf16 fixtures, float64 audio) is cast to it."""
        return self.downsample.conv.conv.conv.weight.dtype

    def _placement(self, device: torch.device | str | None, dtype: torch.dtype | None
                   ) -> tuple[torch.device, torch.dtype]:
        ref = self.downsample.conv.conv.conv.weight
        return torch.device(device) if device is not None else ref.device, dtype or ref.dtype


def _all_if_none(active: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """One all-true mask per step, rather than one per layer."""
    return torch.ones(like.shape[0], dtype=torch.bool, device=like.device) if active is None else active
