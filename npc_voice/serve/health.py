"""`GET /health`: what the server, its engine and its connections are doing (docs/protocol.md, "Health")."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..engine import Engine, EngineLoop
from ..engine.session import percentile
from ..model.kvcache import KV_NAMES
from ..model.quant import weights_kind
from ..protocol import PROTOCOL_VERSION
from .config import SERVER_NAME

if TYPE_CHECKING:
    from .app import NPCVoiceServer

HEALTH_TICKS = 125  # /health's tick percentiles cover the last 10 s


def _tick_stats(*runners: EngineLoop | None) -> dict[str, float | int]:
    """Over the last 125 steps of each engine (all of them together when there are several)."""
    recent = [ms for runner in runners if runner is not None for ms in list(runner.tick_ms)[-HEALTH_TICKS:]]
    if not recent:
        return {"p50": 0.0, "p99": 0.0, "ticks": 0}
    return {"p50": round(percentile(recent, 0.5), 2), "p99": round(percentile(recent, 0.99), 2), "ticks": len(recent)}


def _install_stats(*engines: Engine) -> dict[str, float]:
    recent = [ms for engine in engines for ms in list(engine.install_ms)]
    return {"p50": round(percentile(recent, 0.5), 2), "max": round(max(recent, default=0.0), 2)}


def _cache_stats(engines: list[Engine]) -> dict[str, Any]:
    """One engine's prefix cache stats; several engines' summed (each has its own cache on its device)."""
    caches = list({id(e.cache): e.cache for e in engines}.values())
    stats = [c.stats() for c in caches]
    if len(stats) == 1:
        return stats[0]
    total = dict(stats[0])
    for key in ("entries", "bytes", "max_bytes", "hits", "misses", "evictions"):
        total[key] = sum(s[key] for s in stats)
    lookups = total["hits"] + total["misses"]
    total["hit_rate"] = round(total["hits"] / lookups, 3) if lookups else 0.0
    return total


def engine_health(server: NPCVoiceServer) -> list[dict[str, Any]]:
    """/health's `engines`: each engine (one per device) with its own slots, sessions and ticks."""
    out = []
    runners = server.loop_runners or [None] * len(server.engines)
    for i, (engine, runner) in enumerate(zip(server.engines, runners)):
        free = engine.free_slots
        out.append({
            "index": i, "device": str(engine.model.device),
            "slots": {"total": engine.slots, "used": engine.slots - free, "free": free},
            "engine_sessions": len(engine.sessions), "sessions": server.manager.started_on[i],
            "tick_ms": _tick_stats(runner), "builds": {"pending": engine.builds_pending},
            "ticks": engine.ticks, "overruns": runner.overruns if runner else 0,
            "error": None if runner is None or runner.error is None else repr(runner.error),
        })
    return out


def health(server: NPCVoiceServer) -> dict[str, Any]:
    """The /health document (200 when `status` is ok, else 503). With several engines the figures
    are totals (slots, sessions, builds, overruns; `ticks` is the slowest engine's count, `tick_ms`
    over all engines' steps, `device` the first engine's) and `engines` lists each one."""
    engines, runners, model = server.engines, server.loop_runners, server.engine.model
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
        "weights_dtype": weights_kind(model.lm),
        "kv_dtype": KV_NAMES.get(model.lm.kv_dtype, "bf16"),
        "slots": {"total": server.manager.slots, "used": server.manager.reserved, "free": server.manager.free},
        "engine_sessions": sum(len(e.sessions) for e in engines),
        "connections": len(server.manager.connections),
        "protocols": {kind: {"connections": n, "sessions": server.manager.started_by.get(kind, 0)}
                      for kind, n in server.manager.by_protocol().items()},
        "tick_ms": _tick_stats(*runners),
        "builds": {"pending": sum(e.builds_pending for e in engines), "install_ms": _install_stats(*engines)},
        "prefix_cache": _cache_stats(engines),
        "ticks": min(e.ticks for e in engines),
        "overruns": sum(r.overruns for r in runners),
        "uptime_s": round(time.monotonic() - server.started_at, 1),
        "totals": {"sessions": server.manager.started, "refused_busy": server.manager.refused_busy,
                   "dropped_output_frames": server.manager.dropped_output,
                   "dropped_input_frames": server.manager.dropped_input},
        "engines": engine_health(server),
    }
