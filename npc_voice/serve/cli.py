"""`npc-voice serve`: its arguments, and the process around an `NPCVoiceServer` (signals, the
banner, a graceful stop)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from ..characters import open_store
from ..engine import Engine
from ..engine.persona import DEFAULT_CACHE_MB
from ..model_args import add_model_args, load_model_from_args
from ..protocol import HEALTH_PATH, WS_PATH
from .app import NPCVoiceServer
from .config import DEFAULT_PORT, SERVE_MAX_INPUT_SECONDS, TOKEN_ENV, ServerConfig, check_bind
from .demo import demo_enabled


def add_serve_command(sub: Any) -> None:
    """Registers `npc-voice serve` (called from npc_voice.cli)."""
    p = sub.add_parser("serve", help="websocket server for game engines (docs/protocol.md)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    p.add_argument("--slots", type=int, default=8, help="concurrent conversations (default 8)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"shared secret clients must send (default: ${TOKEN_ENV}); required off loopback")
    p.add_argument("--characters", help="characters folder (default: $NPC_VOICE_CHARACTERS, ./characters, the shipped cast)")
    p.add_argument("--voices", help="preset voices folder (NAME.pt; default: $NPC_VOICE_VOICES or voices/ beside "
                   "the characters folder)")
    p.add_argument("--idle-timeout", type=float, default=30.0, help="seconds without client messages before closing")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--prefix-cache", help="folder caching built character prompts across restarts")
    p.add_argument("--prefix-cache-mb", type=int, default=DEFAULT_CACHE_MB,
                   help=f"memory for built character prompts, in MB (default {DEFAULT_CACHE_MB}; about 110 MB per "
                   "character at 7B, 0.3 MB on the tiny model); least recently used ones go first")
    p.add_argument("--prefix-cache-on", choices=["host", "device"], default="device",
                   help="where cached prompts live on a GPU machine: GPU memory (default; installed in ~6 ms at 7B) "
                   "or host memory (leaves GPU memory to conversations; copied back at each install)")
    p.add_argument("--no-visemes", dest="visemes", action="store_false",
                   help="refuse clients' requests for mouth tracks (start \"visemes\": true answers visemes_unavailable)")
    p.add_argument("--demo", action=argparse.BooleanOptionalAction, default=None,
                   help="serve the browser demo at /demo/ (default: on without a token, off with one; docs/demo.md)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..engine import PrefixCache

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        check_bind(args.host, args.token)
        store = open_store(args.characters, args.voices)
    except ValueError as exc:
        print(f"npc-voice serve: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.weights:
        print("npc-voice serve: no --weights: serving the tiny built-in model with RANDOM weights (its NPCs babble)",
              file=sys.stderr)
    model = load_model_from_args(args)
    if store is not None:
        store.tokenizer = model.tokenizer  # roles counted as this model tokenizes them
        store.context_frames = model.config.lm.context  # prompts held to this model's context (--context)
    cache = PrefixCache(model, max_bytes=args.prefix_cache_mb << 20, directory=args.prefix_cache,
                        on=args.prefix_cache_on)
    # Player audio more than 0.5 s ahead of the engine is dropped (oldest first): after a hiccup the
    # conversation catches up instead of keeping the backlog as lag for good.
    engine = Engine(model, slots=args.slots, cache=cache, max_input_seconds=SERVE_MAX_INPUT_SECONDS)
    config = ServerConfig(host=args.host, port=args.port, token=args.token, idle_timeout=args.idle_timeout,
                          visemes=args.visemes)

    async def main() -> None:
        server = NPCVoiceServer(engine, config, store)
        server.demo = args.demo  # None: the default rule (npc_voice/serve/demo.py)
        async with server:
            where = f"ws://{args.host}:{server.port}{WS_PATH}"
            print(f"npc-voice serve: {where} ({engine.slots} slots, model {model.config.name} on {model.device}, "
                  f"characters: {getattr(store, 'root', 'none')}, token: {'yes' if args.token else 'no'}); "
                  f"health: http://{args.host}:{server.port}{HEALTH_PATH}"
                  + (f"; demo page: http://{args.host}:{server.port}/demo/" if demo_enabled(server) else ""),
                  file=sys.stderr, flush=True)
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):  # both: a graceful stop (NPCVoiceServer.stop)
                try:
                    asyncio.get_running_loop().add_signal_handler(sig, stop.set)
                except (NotImplementedError, AttributeError):  # pragma: no cover - Windows: Ctrl-C stops at once
                    pass
            await stop.wait()
            print("npc-voice serve: shutting down", file=sys.stderr, flush=True)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0
