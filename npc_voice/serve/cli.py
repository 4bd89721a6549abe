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
    p.add_argument("--slots", type=int, default=8, help="concurrent conversations per device (default 8)")
    p.add_argument("--devices", help="several devices, one engine (model copy + --slots slots) each: "
                   "cuda:0,cuda:1 ..., `all` (every CUDA device) or cpu,cpu (tests); overrides --device "
                   "(docs/deploy.md)")
    p.add_argument("--agent-port", type=int, help="serve the HAProxy agent check on this TCP port (on --host): "
                   "weight = share of free slots, `drain` when full or stopping (docs/deploy.md)")
    p.add_argument("--drain-grace", type=float, default=0.0,
                   help="on SIGTERM, refuse new sessions but let live ones go on up to this many seconds before "
                   "ending them with `shutting_down` (default 0: at once; SIGINT always stops at once)")
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


def parse_devices(spec: str | None) -> list[str] | None:
    """`--devices`: None (one engine on --device), a comma-separated list, or `all` (every CUDA device)."""
    if spec is None:
        return None
    if spec.strip() == "all":
        import torch

        count = torch.cuda.device_count()
        if not count:
            raise ValueError("--devices all: no CUDA device here (name them instead, e.g. --devices cpu,cpu)")
        return [f"cuda:{i}" for i in range(count)]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise ValueError(f"--devices {spec!r}: name at least one device (cuda:0,cuda:1 ..., all)")
    return devices


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
        name = f"the {args.preset} model" if args.preset and args.preset != "tiny" else "the tiny built-in model"
        print(f"npc-voice serve: no --weights: serving {name} with RANDOM weights (its NPCs babble)", file=sys.stderr)
    try:
        devices = parse_devices(args.devices)
    except ValueError as exc:
        print(f"npc-voice serve: {exc}", file=sys.stderr)
        return 2
    engines = []
    for device in devices or [args.device]:  # one model copy per device
        model = load_model_from_args(argparse.Namespace(**{**vars(args), "device": device}))
        # Each engine has its own prompt cache on its device; --prefix-cache's folder is shared by all
        # (and by other server processes: files are written atomically).
        cache = PrefixCache(model, max_bytes=args.prefix_cache_mb << 20, directory=args.prefix_cache,
                            on=args.prefix_cache_on)
        # Player audio more than 0.5 s ahead of the engine is dropped (oldest first): after a hiccup the
        # conversation catches up instead of keeping the backlog as lag for good.
        engines.append(Engine(model, slots=args.slots, cache=cache, max_input_seconds=SERVE_MAX_INPUT_SECONDS))
    model = engines[0].model
    if store is not None:
        store.tokenizer = model.tokenizer  # roles counted as this model tokenizes them
        store.context_frames = model.config.lm.context  # prompts held to this model's context (--context)
    config = ServerConfig(host=args.host, port=args.port, token=args.token, idle_timeout=args.idle_timeout,
                          visemes=args.visemes, agent_port=args.agent_port, drain_grace_s=args.drain_grace)

    async def main() -> None:
        server = NPCVoiceServer(engines, config, store)
        server.demo = args.demo  # None: the default rule (npc_voice/serve/demo.py)
        await server.start()
        where = f"ws://{args.host}:{server.port}{WS_PATH}"
        on = ", ".join(str(e.model.device) for e in engines)
        agent = f"; agent check: tcp {args.host}:{server.agent_port}" if server.agent_port is not None else ""
        print(f"npc-voice serve: {where} ({server.manager.slots} slots, model {model.config.name} on {on}, "
              f"characters: {getattr(store, 'root', 'none')}, token: {'yes' if args.token else 'no'}); "
              f"health: http://{args.host}:{server.port}{HEALTH_PATH}{agent}"
              + (f"; demo page: http://{args.host}:{server.port}/demo/" if demo_enabled(server) else ""),
              file=sys.stderr, flush=True)
        stop = asyncio.Event()
        drain: list[float] = []  # SIGTERM: drain for --drain-grace first; SIGINT (or a second signal): at once

        def on_signal(sig: int) -> None:
            if stop.is_set():  # a second signal during the drain: stop at once (docs/deploy.md)
                server.end_drain()
            drain.append(config.drain_grace_s if sig == signal.SIGTERM and not stop.is_set() else 0.0)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):  # both: a graceful stop (NPCVoiceServer.stop)
            try:
                asyncio.get_running_loop().add_signal_handler(sig, on_signal, sig)
            except (NotImplementedError, AttributeError):  # pragma: no cover - Windows: Ctrl-C stops at once
                pass
        try:
            await stop.wait()
            grace = drain[0] if drain else 0.0
            print(f"npc-voice serve: shutting down{f' (draining up to {grace:g} s)' if grace else ''}",
                  file=sys.stderr, flush=True)
            await server.stop(grace)
        except BaseException:
            await server.stop()
            raise

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0
