"""The engine: many NPC conversations on one shared model, characters built between ticks and installed by copying."""

from .engine import Engine, EngineFull, FrameEvent, Session
from .loop import EngineLoop
from ..model.generator import Sampling
from .persona import Persona, PrefixCache

__all__ = ["Engine", "EngineFull", "EngineLoop", "FrameEvent", "Persona", "PrefixCache", "Sampling", "Session"]
