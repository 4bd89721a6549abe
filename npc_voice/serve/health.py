"""`GET /health`: what the server, its engine and its connections are doing (docs/protocol.md, "Health")."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..engine import Engine, EngineLoop
from ..engine.session import percentile
from ..protocol import PROTOCOL_VERSION
from .config import SERVER_NAME

if TYPE_CHECKING:
    from .app import NPCVoiceServer

HEALTH_TICKS = 125  # /health's tick percentiles cover the last 10 s


def _tick_stats(runner: EngineLoop | None) -> dict[str, float | int]:
    recent = list(runner.tick_ms)[-HEALTH_TICKS:] if runner is not None else []
    if not recent:
        return {"p50": 0.0, "p99": 0.0, "ticks": 0}
    return {"p50": round(percentile(recent, 0.5), 2), "p99": round(percentile(recent, 0.99), 2), "ticks": len(recent)}


def _install_stats(engine: Engine) -> dict[str, float]:
    recent = list(engine.install_ms)
    return {"p50": round(percentile(recent, 0.5), 2), "max": round(max(recent, default=0.0), 2)}


def health(server: NPCVoiceServer) -> dict[str, Any]:
    """The /health document (200 when `status` is ok, else 503)."""
    runner, model = server.loop_runner, server.engine.model
    error = server.loop_error
    return {
        "status": "error" if error is not None else ("stopping" if server.closing else "ok"),
        "error": None if error is None else repr(error),
        "protocol": PROTOCOL_VERSION,
        "server": SERVER_NAME,
        "model": model.config.name,
        "weights": "random" if model.random_weights else model.source,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "slots": {"total": server.manager.slots, "used": server.manager.reserved, "free": server.manager.free},
        "engine_sessions": len(server.engine.sessions),
        "connections": len(server.manager.connections),
        "protocols": {kind: {"connections": n, "sessions": server.manager.started_by.get(kind, 0)}
                      for kind, n in server.manager.by_protocol().items()},
        "tick_ms": _tick_stats(runner),
        "builds": {"pending": server.engine.builds_pending, "install_ms": _install_stats(server.engine)},
        "prefix_cache": server.engine.cache.stats(),
        "ticks": server.engine.ticks,
        "overruns": runner.overruns if runner else 0,
        "uptime_s": round(time.monotonic() - server.started_at, 1),
        "totals": {"sessions": server.manager.started, "refused_busy": server.manager.refused_busy,
                   "dropped_output_frames": server.manager.dropped_output,
                   "dropped_input_frames": server.manager.dropped_input},
    }
