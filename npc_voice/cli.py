"""The `npc-voice` command line."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .characters.cli import add_parser as add_characters_parser, add_talk_args
from .model_args import add_model_args, load_model_from_args
from .serve.cli import add_serve_command


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_tick
    from .bench_live import bench_swap

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model_from_args(args)
    rows = [bench_tick(model, batch, frames=args.frames, warmup=args.warmup, context_fill=args.context_fill)
            for batch in args.batch]
    swap = None if args.no_swap else bench_swap(model, max(args.batch))
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict()), flush=True)
        if swap is not None:
            print(json.dumps({"swap": swap.as_dict(), "sessions": max(args.batch)}), flush=True)
        return 0
    first = rows[0]
    print(f"model {model.config.name} ({'random' if model.random_weights else model.source} weights), "
          f"device {first.device}, {first.dtype}, context {model.config.lm.context} frames, "
          f"{'CUDA graphs' if first.graphs else f'{first.threads} CPU thread(s)'}, {args.frames} ticks")
    print(f"{'sessions':>8} {'KV rows':>8} {'attended':>8} {'tick p50':>9} {'tick p99':>9} {'tick max':>9} "
          f"{'x real time':>11} {'memory':>9}")
    for r in rows:
        p99 = f"{r.tick_p99_ms:>7.2f}ms" if r.tick_p99_ms is not None else f"{'-':>9}"
        print(f"{r.batch:>8} {r.fill:>8} {r.window:>8} {r.tick_p50_ms:>7.2f}ms {p99} {r.tick_max_ms:>7.2f}ms "
              f"{r.realtime_factor:>11.1f} {r.peak_memory_gb:>7.2f}GB")
    print("(tick p99 needs 100 timed ticks: --frames; memory: GPU peak of the row, or the process's RSS on a CPU)")
    if swap is not None:
        print(f"hot swap with {swap.sessions} live sessions ({swap.context_fill} KV rows each) in the real-time loop: "
              f"a cached character ({swap.prompt_frames} frames) installed in {swap.cached_install_ms_p50:.2f} ms p50 "
              f"({swap.cached_install_ms_max:.2f} max), a new one switched in {swap.uncached_switch_ms_p50:.0f} ms "
              f"p50 ({swap.uncached_switch_ms_max:.0f} max); ticks meanwhile {swap.tick_ms_p50:.1f} ms p50, "
              f"{swap.tick_ms_max:.1f} ms max, {swap.overruns} late, {swap.frame_index_skips} skipped frame "
              f"indexes, live frames {swap.live_frames_min} of {swap.live_frames_expected:.0f}")
    return 0


def cmd_talk(args: argparse.Namespace) -> int:
    from .engine import Persona, Sampling
    from .talk import talk_files

    if args.character is None and (args.voice is None or args.prompt is None):
        print("npc-voice talk: give --character ID, or --voice and --prompt", file=sys.stderr)
        return 2
    model = load_model_from_args(args)
    sampling = Sampling.greedy() if args.greedy else Sampling()
    if args.character is not None:  # a character from the store: its voice, role and sampling
        from .characters.cli import persona_for_talk

        persona = persona_for_talk(args, model, sampling if args.greedy else None)
    else:
        persona = Persona(role=args.prompt, voice_path=args.voice, sampling=sampling)
    transcript = talk_files(model, persona, args.input, args.output, args.transcript, seed=args.seed)
    print(f"wrote {args.output}" + (f" and {args.transcript}" if args.transcript else "") + f": {transcript.text!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npc-voice", description="Full-duplex voice conversations for game NPCs.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time one 80 ms tick (Mimi encode + LM step + Mimi decode)")
    add_model_args(bench)
    bench.add_argument("--batch", type=int, nargs="+", default=[1], help="concurrent sessions (several: one row each)")
    bench.add_argument("--frames", type=int, default=100, help="timed ticks per row")
    bench.add_argument("--warmup", type=int, default=10)
    bench.add_argument("--threads", type=int, help="CPU threads for torch")
    bench.add_argument("--json", action="store_true", help="one JSON object per row")
    bench.add_argument("--no-swap", action="store_true", help="skip the hot-swap measurement")
    bench.add_argument("--context-fill", type=int, help="KV rows attended per session (default: the full context)")
    bench.set_defaults(func=cmd_bench)

    talk = sub.add_parser("talk", help="offline conversation: a user recording in, the NPC's reply out (same timeline)")
    add_model_args(talk)
    talk.add_argument("--voice", help="voice sample (WAV/FLAC/OGG, 3-10 s) or PersonaPlex preset .pt")
    talk.add_argument("--prompt", help="the role: who the NPC is and what it wants")
    talk.add_argument("--input", required=True, help="the user's side (any rate, any channel count)")
    talk.add_argument("--output", required=True, help="the NPC's side, 24 kHz mono 16-bit WAV, as long as --input")
    talk.add_argument("--transcript", help="JSON file: the NPC's words with start and end times")
    talk.add_argument("--seed", type=int, default=0)
    talk.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    add_talk_args(talk)  # --character ID, --characters DIR, --voices DIR
    talk.set_defaults(func=cmd_talk)
    add_characters_parser(sub)  # npc-voice characters list|show|create|validate|delete
    add_serve_command(sub)  # npc-voice serve (websocket server for game engines)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
