"""Mimi audio codec (Kyutai), checkpoint-compatible with the released weights, with per-slot streaming."""

from .codec import Mimi, MimiDecoderState, MimiEncoderState, MimiState, MimiTransformer

__all__ = ["Mimi", "MimiDecoderState", "MimiEncoderState", "MimiState", "MimiTransformer"]
