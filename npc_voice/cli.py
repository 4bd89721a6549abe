"""The `npc-voice` command line."""

from __future__ import annotations

import argparse
import json
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="weights directory or Hugging Face repo id (default: the tiny built-in model)")
    p.add_argument("--preset", help="model configuration: tiny, personaplex-7b, moshi-7b "
                   "(with --weights: what its config.json overrides; without: random weights of that size)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="LM dtype (default: bf16 on GPU, fp32 on CPU)")


def _load(args: argparse.Namespace):
    from .model.loading import load_model

    model = load_model(args.weights, preset=args.preset, device=args.device,
                       dtype=DTYPES[args.dtype] if args.dtype else None)
    if model.random_weights:
        print(f"npc-voice: no weights given: using the {model.config.name} model with RANDOM weights "
              "(it babbles; pass --weights DIR for the real PersonaPlex)", file=sys.stderr)
    return model


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_tick

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load(args)
    rows = [bench_tick(model, batch, frames=args.frames, warmup=args.warmup) for batch in args.batch]
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict()))
        return 0
    print(f"model {model.config.name} ({'random' if model.random_weights else model.source} weights), "
          f"device {rows[0].device}, dtype {rows[0].dtype}, {rows[0].threads} CPU thread(s), {args.frames} ticks")
    print(f"{'sessions':>8} {'tick p50':>9} {'tick p99':>9} {'encode':>7} {'LM':>7} {'decode':>7} {'x real time':>11}")
    for r in rows:
        print(f"{r.batch:>8} {r.tick_p50_ms:>7.2f}ms {r.tick_p99_ms:>7.2f}ms {r.encode_p50_ms:>5.2f}ms "
              f"{r.lm_p50_ms:>5.2f}ms {r.decode_p50_ms:>5.2f}ms {r.realtime_factor:>11.1f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npc-voice", description="Full-duplex voice conversations for game NPCs.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time one 80 ms tick (Mimi encode + LM step + Mimi decode)")
    _add_model_args(bench)
    bench.add_argument("--batch", type=int, nargs="+", default=[1], help="concurrent sessions (several: one row each)")
    bench.add_argument("--frames", type=int, default=100, help="timed ticks per row")
    bench.add_argument("--warmup", type=int, default=10)
    bench.add_argument("--threads", type=int, help="CPU threads for torch")
    bench.add_argument("--json", action="store_true", help="one JSON object per row")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
