"""`npc-voice-mcp`: the MCP server over stdio (desktop assistants) or streamable HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from npc_voice.model_args import add_model_args

    p = argparse.ArgumentParser(prog="npc-voice-mcp", description="MCP server of npc-voice: AI assistants create "
                                "NPC characters and run voice conversations (docs/mcp.md).")
    p.add_argument("--transport", choices=["stdio", "http"], default="stdio",
                   help="stdio (desktop assistants; default) or streamable HTTP")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000); the endpoint is /mcp")
    p.add_argument("--characters", help="characters folder (default: $NPC_VOICE_CHARACTERS, ./characters, the "
                   "shipped cast); created if missing")
    p.add_argument("--voices", help="preset voices folder (NAME.pt; default: $NPC_VOICE_VOICES or voices/ beside the "
                   "characters folder)")
    p.add_argument("--audio-dir", default=os.environ.get("NPC_VOICE_MCP_AUDIO_DIR"),
                   help="the only folder audio files may be read from (voice_file, audio_file); default "
                   "$NPC_VOICE_MCP_AUDIO_DIR; without it, audio comes as base64 only")
    p.add_argument("--server-url", default=os.environ.get("NPC_VOICE_SERVER_URL"),
                   help="a running `npc-voice serve` (ws://host:port) to drive instead of an embedded engine "
                   "(default $NPC_VOICE_SERVER_URL)")
    p.add_argument("--token", default=os.environ.get("NPC_VOICE_TOKEN"), help="its token (default $NPC_VOICE_TOKEN)")
    g = p.add_argument_group("embedded engine (without --server-url)")
    add_model_args(g)
    g.add_argument("--slots", type=int, default=6, help="slots of the one embedded engine, shared by talks, scenes "
                   "(two each) and player sessions (default 6)")
    g.add_argument("--player-slots", type=int, default=None, help=argparse.SUPPRESS)  # deprecated: shares --slots
    g.add_argument("--player-host", default="127.0.0.1", help="bind address of the embedded websocket server")
    g.add_argument("--player-port", type=int, default=0, help="its port (default: any free port)")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--prefix-cache", help="folder caching built character prompts across restarts")
    g.add_argument("--preload", action="store_true", help="load the model at start-up, not at the first conversation")
    p.add_argument("--busy-wait", type=float, default=20.0, help="seconds a conversation waits for the engine before "
                   "'server busy' (default 20)")
    p.add_argument("--allow-remote-http", action="store_true", help="allow --host other than loopback for --transport "
                   "http (the MCP endpoint has no authentication of its own: put it behind an authenticating proxy)")
    p.add_argument("--log-level", default="WARNING")
    return p


def settings_from_args(args: argparse.Namespace):
    from npc_voice.model_args import DTYPES

    from .backend import Settings

    return Settings(
        characters=Path(args.characters) if args.characters else None,
        voices=Path(args.voices) if args.voices else None,
        audio_dir=Path(args.audio_dir) if args.audio_dir else None,
        server_url=args.server_url or None, token=args.token or None,
        weights=args.weights, preset=args.preset, device=args.device,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        mimi_dtype=DTYPES[args.mimi_dtype] if args.mimi_dtype else None,
        int8=args.int8, weights_dtype=args.weights_dtype, kv_dtype=args.kv_dtype, context=args.context,
        slots=args.slots,
        player_slots=args.player_slots,
        player_host=args.player_host, player_port=args.player_port, prefix_cache=args.prefix_cache,
        busy_wait_s=args.busy_wait)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # stdout belongs to the protocol on stdio: everything else goes to stderr
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .app import build_server
    from .backend import Backend

    try:
        from npc_voice.serve import is_loopback

        if args.transport == "http" and not is_loopback(args.host) and not args.allow_remote_http:
            raise ValueError(f"refusing to serve MCP over HTTP on {args.host}: the endpoint has no authentication and "
                             "can create characters and run the model; bind 127.0.0.1, or pass --allow-remote-http "
                             "behind an authenticating proxy")
        settings = settings_from_args(args)
        if settings.server_url is None:  # the embedded model loads later: its impossible options fail now
            from npc_voice.model.kvcache import resolve_kv_dtype
            from npc_voice.model.loading import default_device
            from npc_voice.model.quant import resolve_weights_dtype

            device = settings.device or default_device()
            resolve_kv_dtype(settings.kv_dtype, device)
            resolve_weights_dtype(settings.weights_dtype, device, settings.int8)
        if settings.audio_dir is not None and not settings.audio_dir.is_dir():
            raise ValueError(f"--audio-dir {settings.audio_dir} is not a folder")
        backend = Backend(settings)
    except Exception as exc:
        print(f"npc-voice-mcp: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if settings.mode == "embedded" and not settings.weights:
        print("npc-voice-mcp: no --weights: the embedded engine runs the tiny built-in model with RANDOM weights "
              "(NPCs babble)", file=sys.stderr)
    if args.preload and settings.mode == "embedded":
        backend.model()
    server = build_server(backend)
    if args.transport == "stdio":
        server.run("stdio")
    else:
        print(f"npc-voice-mcp: streamable HTTP on http://{args.host}:{args.port}/mcp", file=sys.stderr, flush=True)
        server.run("streamable-http", host=args.host, port=args.port)
    return 0
