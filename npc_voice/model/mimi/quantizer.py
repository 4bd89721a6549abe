"""Mimi's split residual vector quantizer (inference only).

Two residual VQs read the same latent: `rvq_first` (the semantic codebook) and `rvq_rest` (the
acoustic ones); their decoded outputs are summed. The checkpoint holds every codebook (32 for the
released Mimi) but only the first `num_codebooks` are encoded and decoded. Each codebook is stored
as the training EMA buffers; the centroids are `embedding_sum / max(cluster_usage, epsilon)`.

Everything is stateless and shape-static, so it is the same code for a clip [B, C, T] and a
streamed frame [B, C, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantizerConfig


class EuclideanCodebook(nn.Module):
    """One codebook; buffers named as in the checkpoint (`_initialized` is kept only to load it)."""

    def __init__(self, dim: int, bins: int, epsilon: float):
        super().__init__()
        self.epsilon = epsilon
        self.register_buffer("_initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))

    def _usage(self) -> torch.Tensor:
        return self.cluster_usage.clamp(min=self.epsilon)

    @property
    def embedding(self) -> torch.Tensor:
        """Centroids [bins, dim]. Recomputed on each call rather than cached: it is cheap next to the
        distance computation, and a cache would go stale when weights are loaded or edited in place."""
        return self.embedding_sum / self._usage()[:, None]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> index of the nearest centroid [N] (long)."""
        # torch.cdist as the reference does, so near-ties resolve the same way.
        return torch.cdist(x[None], self.embedding[None], p=2)[0].argmin(dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [...] -> centroids [..., D]; gathers the rows before dividing (same values, less work)."""
        return F.embedding(codes, self.embedding_sum) / F.embedding(codes, self._usage()[:, None])


class VectorQuantization(nn.Module):
    """Holder named as in the checkpoint (`vq.layers.N._codebook.*`)."""

    def __init__(self, dim: int, bins: int, epsilon: float):
        super().__init__()
        self._codebook = EuclideanCodebook(dim, bins, epsilon)


class ResidualVQ(nn.Module):
    def __init__(self, dim: int, bins: int, epsilon: float, n_q: int):
        super().__init__()
        self.layers = nn.ModuleList(VectorQuantization(dim, bins, epsilon) for _ in range(n_q))


class ResidualVectorQuantizer(nn.Module):
    """Project in (1x1 conv), quantize the residual codebook after codebook, project out."""

    def __init__(self, input_dim: int, dim: int, bins: int, epsilon: float, n_q: int):
        super().__init__()
        self.input_proj = nn.Conv1d(input_dim, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, input_dim, 1, bias=False)
        self.vq = ResidualVQ(dim, bins, epsilon, n_q)

    def _codebooks(self, n: int) -> list[EuclideanCodebook]:
        return [layer._codebook for layer in self.vq.layers[:n]]

    def encode(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """x [B, C, T] -> codes [B, n, T] from the first `n` codebooks."""
        B, _, T = x.shape
        residual = self.input_proj(x).transpose(1, 2).reshape(B * T, -1)  # [B*T, D]
        codes = []
        for codebook in self._codebooks(n):
            index = codebook.encode(residual)  # [B*T]
            residual = residual - codebook.decode(index)
            codes.append(index.view(B, T))
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> latent [B, C, T], the sum over the first K codebooks."""
        quantized = sum(cb.decode(c) for cb, c in zip(self._codebooks(codes.shape[1]), codes.unbind(1)))
        return self.output_proj(quantized.transpose(1, 2))  # [B, T, D] -> [B, C, T]


class SplitResidualVectorQuantizer(nn.Module):
    """`rvq_first` (n_q_semantic codebooks) and `rvq_rest` (the others) over the same input."""

    def __init__(self, cfg: QuantizerConfig, input_dim: int):
        super().__init__()
        if not 0 < cfg.n_q_semantic < cfg.n_q:
            raise ValueError(f"need 0 < n_q_semantic < n_q, got {cfg.n_q_semantic} and {cfg.n_q}")
        self.n_q_semantic = cfg.n_q_semantic
        self.rvq_first = ResidualVectorQuantizer(input_dim, cfg.dimension, cfg.bins, cfg.epsilon, cfg.n_q_semantic)
        self.rvq_rest = ResidualVectorQuantizer(input_dim, cfg.dimension, cfg.bins, cfg.epsilon,
                                                cfg.n_q - cfg.n_q_semantic)

    def encode(self, x: torch.Tensor, num_codebooks: int) -> torch.Tensor:
        """x [B, C, T] -> codes [B, num_codebooks, T]."""
        first = self.rvq_first.encode(x, self.n_q_semantic)
        if num_codebooks == self.n_q_semantic:
            return first
        return torch.cat([first, self.rvq_rest.encode(x, num_codebooks - self.n_q_semantic)], dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> latent [B, C, T]."""
        latent = self.rvq_first.decode(codes[:, : self.n_q_semantic])
        if codes.shape[1] > self.n_q_semantic:
            latent = latent + self.rvq_rest.decode(codes[:, self.n_q_semantic:])
        return latent
