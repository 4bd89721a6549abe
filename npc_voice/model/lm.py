"""The PersonaPlex / Moshi language model: a temporal transformer over 80 ms frames and a depth
transformer over the codebooks of one frame.

Per frame, 17 token streams enter (k=0 text, k=1..8 the agent's Mimi codebooks, k=9..16 the
user's); their embeddings are summed, the temporal transformer produces one hidden state, the text
head predicts the next text token, and the depth transformer predicts the codebooks one after the
other, each conditioned on the previous one. Parameter names are the checkpoint's.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMConfig
from .transformer import LayerSpec, RMSNorm, Transformer, TransformerState


class ZeroableEmbedding(nn.Embedding):
    """An embedding where token id -1 means "no input" and embeds to exact zeros."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids.clamp(min=0))
        return out.masked_fill((ids < 0)[..., None], 0.0)


class DepthTransformer(Transformer):
    """The depformer: one position per codebook, weights per step, no positional embedding.

    Its attention never leaves the current frame, so its KV cache is scratch space for one frame.
    """

    def __init__(self, cfg: LMConfig):
        spec = LayerSpec(cfg.depformer_dim, cfg.depformer_num_heads, cfg.depformer_hidden_dim,
                         norm="rms_f32", ffn="gated_silu", norm_eps=cfg.norm_eps, steps=cfg.dep_q)
        super().__init__(spec, cfg.depformer_num_layers, context=None, max_period=cfg.depformer_max_period)

    def init_scratch(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """One [2, B, H, dep_q, D] key/value buffer per layer."""
        H = self.spec.num_heads
        shape = (2, batch_size, H, self.spec.steps, self.spec.dim // H)
        return [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]

    def step_codebook(self, k: int, x: torch.Tensor, scratch: list[torch.Tensor]) -> torch.Tensor:
        """Runs depth step `k` (a Python int, so each step is its own static graph): x [B, 1, C]."""
        for layer, kv in zip(self.layers, scratch):
            x = layer(x, partial(_attend_step, kv, k), step=k)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All steps of many frames (teacher forcing): x [N, K, C] -> [N, K, C]. Step k sees steps
        <= k only, so running the steps in order is the causal pass; each has its own weights."""
        N, K, _ = x.shape
        scratch = self.init_scratch(N, x.device, x.dtype)
        return torch.cat([self.step_codebook(k, x[:, k : k + 1], scratch) for k in range(K)], dim=1)


def _attend_step(kv: torch.Tensor, k: int, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Attention of depth step k ([B, H, 1, D] each) over steps 0..k, keeping its key and value in
    kv [2, B, H, dep_q, D]."""
    kv[0, :, :, k : k + 1] = key
    kv[1, :, :, k : k + 1] = value
    return F.scaled_dot_product_attention(q, kv[0, :, :, : k + 1], kv[1, :, :, : k + 1])


class PersonaPlexLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.ModuleList(ZeroableEmbedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q))
        self.text_emb = ZeroableEmbedding(cfg.text_card + 1, cfg.dim)
        self.transformer = Transformer(
            LayerSpec(cfg.dim, cfg.num_heads, cfg.hidden_dim, norm="rms_f32", ffn="gated_silu", norm_eps=cfg.norm_eps),
            cfg.num_layers, context=cfg.context, max_period=cfg.max_period,
        )
        self.out_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.text_linear = nn.Linear(cfg.dim, cfg.text_card, bias=False)
        self.depformer_in = nn.ModuleList(nn.Linear(cfg.dim, cfg.depformer_dim, bias=False) for _ in range(cfg.dep_q))
        self.depformer_emb = nn.ModuleList(ZeroableEmbedding(cfg.card + 1, cfg.depformer_dim) for _ in range(cfg.dep_q - 1))
        self.depformer_text_emb = ZeroableEmbedding(cfg.text_card + 1, cfg.depformer_dim)
        self.depformer = DepthTransformer(cfg)
        self.linears = nn.ModuleList(nn.Linear(cfg.depformer_dim, cfg.card, bias=False) for _ in range(cfg.dep_q))
        # The conversation slots' KV cache: None = the compute dtype, int8 / float8_e4m3fn = 8-bit
        # (`kvcache.QuantKVCache`); set by the loader (`--kv-dtype`), read by `init_state`.
        self.kv_dtype: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        """Where the LM lives, read from a norm's weight: int8 never quantizes norms, while an int8
        linear's `weight` dequantizes its whole matrix to answer."""
        return self.out_norm.alpha.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations and the KV cache), read like `device`."""
        return self.out_norm.alpha.dtype

    # --- temporal transformer -------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sum of the stream embeddings: tokens [B, 17, T] -> [B, T, dim]."""
        x = self.text_emb(tokens[:, 0])
        for k, emb in enumerate(self.emb):
            x = x + emb(tokens[:, k + 1])
        return x

    def text_head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer output [B, T, dim] -> (normed hidden [B, T, dim], text logits [B, T, text_card])."""
        hidden = self.out_norm(hidden)
        return hidden, self.text_linear(hidden)

    def forward_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole sequence, teacher forced: tokens [B, 17, T] -> (hidden [B, T, dim], text logits)."""
        return self.text_head(self.transformer(self.embed(tokens)))

    def init_state(self, batch_size: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> TransformerState:
        """Conversation slots' temporal state, with the KV cache in `self.kv_dtype`."""
        return self.transformer.init_state(batch_size, device, dtype, kv_dtype=self.kv_dtype)

    def step_text(self, tokens: torch.Tensor, state: TransformerState, active: torch.Tensor | None = None,
                  window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Streams T frames: tokens [B, 17, T] -> (hidden [B, T, dim], text logits [B, T, text_card])."""
        return self.step_embeddings(self.embed(tokens), state, active, window)

    def step_embeddings(self, x: torch.Tensor, state: TransformerState, active: torch.Tensor | None = None,
                        window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `step_text` from summed input embeddings [B, T, dim] (how voice presets are stored)."""
        return self.text_head(self.transformer.step(x, state, active, window))

    # --- depth transformer ----------------------------------------------------------------
    def depth_input(self, k: int, hidden: torch.Tensor, prev_token: torch.Tensor) -> torch.Tensor:
        """Input of depth step k: hidden [B, T, dim], prev_token [B, T] (text for k=0) -> [B, T, ddim]."""
        token_emb = self.depformer_text_emb(prev_token) if k == 0 else self.depformer_emb[k - 1](prev_token)
        return self.depformer_in[k](hidden) + token_emb

    def depth_step(self, k: int, hidden: torch.Tensor, prev_token: torch.Tensor,
                   scratch: list[torch.Tensor]) -> torch.Tensor:
        """Logits of codebook k for one frame: hidden [B, dim], prev_token [B] -> [B, card]."""
        x = self.depth_input(k, hidden[:, None], prev_token[:, None])
        return self.linears[k](self.depformer.step_codebook(k, x, scratch))[:, 0]

    def forward_depth(self, hidden: torch.Tensor, depth_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced depth logits for every frame: hidden [B, T, dim], depth_tokens [B, T, dep_q]
        (the token entering step k: text for k=0, codebook k-1 after) -> [B, T, dep_q, card]."""
        B, T, _ = hidden.shape
        K = self.cfg.dep_q
        x = torch.stack([self.depth_input(k, hidden, depth_tokens[..., k]) for k in range(K)], dim=2)
        y = self.depformer(x.view(B * T, K, -1))
        return torch.stack([self.linears[k](y[:, k]) for k in range(K)], dim=1).view(B, T, K, -1)
