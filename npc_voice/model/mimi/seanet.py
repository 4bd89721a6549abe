"""SEANet encoder / decoder: the convolutional halves of Mimi (24 kHz PCM <-> 25 Hz latents).

Layers sit in one `nn.Sequential` named `model` with the ELUs as their own entries, so the indices
(`model.3.conv.conv.weight`, `model.1.block.1...`) are the checkpoint's. Streaming keeps one state
per stateful layer, in layer order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from ..config import SEANetConfig
from ..streaming import StreamState
from .convs import ConvState, ConvTrState, StreamingConv1d, StreamingConvTranspose1d


@dataclass
class ResBlockState(StreamState):
    convs: list[ConvState]  # one per conv of the residual branch


LayerState = Union[ConvState, ConvTrState, ResBlockState]


class SEANetResnetBlock(nn.Module):
    """x + branch(x), branch = ELU -> conv(k, dilation) to dim / compress -> ELU -> conv(1) back to dim."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int, true_skip: bool,
                 pad_mode: str):
        super().__init__()
        hidden = dim // compress
        self.block = nn.Sequential(
            nn.ELU(),
            StreamingConv1d(dim, hidden, kernel_size, dilation=dilation, pad_mode=pad_mode),
            nn.ELU(),
            StreamingConv1d(hidden, dim, 1, pad_mode=pad_mode),
        )
        # A 1x1 conv needs no left context, so a learnt shortcut is stateless.
        self.shortcut: nn.Module = nn.Identity() if true_skip else StreamingConv1d(dim, dim, 1, pad_mode=pad_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        return self.shortcut(x) + self.block(x)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> ResBlockState:
        return ResBlockState([conv.init_state(batch_size, device, dtype) for conv in self._convs()])

    def step(self, x: torch.Tensor, state: ResBlockState, active: torch.Tensor | None = None) -> torch.Tensor:
        y = x
        convs = iter(state.convs)
        for layer in self.block:
            y = layer.step(y, next(convs), active) if isinstance(layer, StreamingConv1d) else layer(y)
        return self.shortcut(x) + y

    def _convs(self) -> list[StreamingConv1d]:
        return [layer for layer in self.block if isinstance(layer, StreamingConv1d)]


StatefulLayer = Union[StreamingConv1d, StreamingConvTranspose1d, SEANetResnetBlock]


class _SEANet(nn.Module):
    """Shared streaming plumbing: `model` is a Sequential of ELUs and stateful layers."""

    model: nn.Sequential

    def _stateful(self) -> list[StatefulLayer]:
        return [layer for layer in self.model if not isinstance(layer, nn.ELU)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[LayerState]:
        return [layer.init_state(batch_size, device, dtype) for layer in self._stateful()]

    def step(self, x: torch.Tensor, states: list[LayerState], active: torch.Tensor | None = None) -> torch.Tensor:
        it = iter(states)
        for layer in self.model:
            x = layer(x) if isinstance(layer, nn.ELU) else layer.step(x, next(it), active)
        return x


class SEANetEncoder(_SEANet):
    """PCM [B, channels, T] -> latents [B, dimension, T / hop]; strides are the ratios reversed."""

    def __init__(self, cfg: SEANetConfig):
        super().__init__()
        layers: list[nn.Module] = [StreamingConv1d(cfg.channels, cfg.n_filters, cfg.kernel_size, pad_mode=cfg.pad_mode)]
        width = cfg.n_filters
        for ratio in reversed(cfg.ratios):
            layers += _residuals(cfg, width)
            layers += [nn.ELU(), StreamingConv1d(width, 2 * width, 2 * ratio, ratio, pad_mode=cfg.pad_mode)]
            width *= 2
        layers += [nn.ELU(), StreamingConv1d(width, cfg.dimension, cfg.last_kernel_size, pad_mode=cfg.pad_mode)]
        self.model = nn.Sequential(*layers)


class SEANetDecoder(_SEANet):
    """Latents [B, dimension, T] -> PCM [B, channels, T * hop]; no final activation."""

    def __init__(self, cfg: SEANetConfig):
        super().__init__()
        width = cfg.n_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [StreamingConv1d(cfg.dimension, width, cfg.kernel_size, pad_mode=cfg.pad_mode)]
        for ratio in cfg.ratios:
            layers += [nn.ELU(), StreamingConvTranspose1d(width, width // 2, 2 * ratio, ratio)]
            width //= 2
            layers += _residuals(cfg, width)
        layers += [nn.ELU(), StreamingConv1d(cfg.n_filters, cfg.channels, cfg.last_kernel_size, pad_mode=cfg.pad_mode)]
        self.model = nn.Sequential(*layers)


def _residuals(cfg: SEANetConfig, dim: int) -> list[nn.Module]:
    return [SEANetResnetBlock(dim, cfg.residual_kernel_size, cfg.dilation_base ** j, cfg.compress, cfg.true_skip,
                              cfg.pad_mode)
            for j in range(cfg.n_residual_layers)]
