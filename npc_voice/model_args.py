"""The model arguments every command that loads a model takes (`--weights`, `--device`, ...), and
loading the model they describe: shared by `npc-voice bench|talk|serve` and `npc-voice-mcp`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from .model.config import FRAME_SECONDS, LMConfig
from .model.kvcache import KV_CHOICES
from .model.quant import WEIGHT_CHOICES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="weights directory or Hugging Face repo id (default: the tiny built-in model)")
    p.add_argument("--preset", help="model configuration: tiny, personaplex-7b, moshi-7b "
                   "(with --weights: what its config.json overrides; without: random weights of that size)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="LM dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--mimi-dtype", choices=sorted(DTYPES), help="Mimi codec dtype (default: bf16 on GPU, "
                   "fp32 on CPU; the reference runs Mimi in fp32)")
    p.add_argument("--weights-dtype", choices=WEIGHT_CHOICES, default="bf16",
                   help="the LM's matrices: bf16 (default: not quantized, the --dtype), int8 (half the memory, "
                   "slower; for 24 GB cards), fp8 (half the memory, fp8 matmuls; GPUs of compute capability 8.9+: "
                   "Ada, Hopper)")
    p.add_argument("--int8", action="store_true", help="the same as --weights-dtype int8")
    p.add_argument("--kv-dtype", choices=KV_CHOICES, default="auto",
                   help="the conversations' KV cache: int8 / fp8 (8-bit, half the memory per conversation; GPU "
                   "only), bf16 (not quantized: the LM's dtype); auto (default): int8 on a GPU, else bf16")
    p.add_argument("--context", type=int, help="frames each conversation remembers (default: the model's, "
                   f"{LMConfig.context} = {LMConfig.context * FRAME_SECONDS / 60:g} min); less memory per session, so "
                   "more sessions per GPU")


def load_model_from_args(args: argparse.Namespace) -> Any:
    """The model the arguments of `add_model_args` describe (says so on stderr when its weights are random)."""
    from .model.loading import load_model

    try:
        model = load_model(args.weights, preset=args.preset, device=args.device,
                           dtype=DTYPES[args.dtype] if args.dtype else None,
                           int8=getattr(args, "int8", False), weights_dtype=getattr(args, "weights_dtype", "bf16"),
                           context=getattr(args, "context", None),
                           mimi_dtype=DTYPES[args.mimi_dtype] if getattr(args, "mimi_dtype", None) else None,
                           kv_dtype=getattr(args, "kv_dtype", "auto"))
    except ValueError as exc:  # an impossible option (--kv-dtype int8 or --weights-dtype fp8 on a CPU) or a
        # checkpoint that does not fit
        raise SystemExit(f"npc-voice: {exc}") from None
    if model.random_weights:
        print(f"npc-voice: no weights given: using the {model.config.name} model with RANDOM weights "
              "(it babbles; pass --weights DIR for the real PersonaPlex)", file=sys.stderr)
    return model
