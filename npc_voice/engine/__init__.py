"""The engine: many NPC conversations on one shared model, characters built between ticks and installed by copying."""

from ..model.generator import Sampling
from .engine import Engine
from .loop import EngineLoop
from .persona import Persona, PrefixCache
from .session import EngineFull, FrameEvent, Session

__all__ = ["Engine", "EngineFull", "EngineLoop", "FrameEvent", "Persona", "PrefixCache", "Sampling", "Session"]
