"""Per-slot streaming state.

Every streaming module keeps its state in a `StreamState` dataclass whose tensors all have the
slot (batch) dimension first and a fixed shape. A step updates them in place, so:
- one slot can be reset (`reset(mask)`) or skipped (`active` mask of a step) without touching the
  others, which are bit-identical whatever happens to their neighbours;
- no shape ever changes, so a step can be captured in a CUDA graph;
- a slot's whole state can be copied into another slot (`copy_slot`), which is how a cached
  character prefix is installed into a live slot.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import torch


def slot_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshapes a `[B]` mask so that it broadcasts against `like` (`[B, ...]`)."""
    return mask.view(mask.shape[0], *([1] * (like.dim() - 1)))


def where_active(active: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """`new` for active slots, `old` for the others (`active` is `[B]` bool)."""
    return torch.where(slot_mask(active, new), new, old)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A float8 tensor as its bytes (uint8, zero = +0.0), others as they are: PyTorch has no
    masked_fill or scatter for float8, and these only move or zero whole values."""
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def state_field(fill: float | int | bool = 0) -> Any:
    """A state tensor field whose value after a reset is `fill` (default zero)."""
    return dataclasses.field(metadata={"fill": fill})


@dataclass
class StreamState:
    """Base class: tensor fields (slot dim first), nested states, or lists of nested states."""

    def _items(self) -> Iterator[tuple[str, Any, Any]]:
        for f in dataclasses.fields(self):
            yield f.name, getattr(self, f.name), f.metadata.get("fill", 0)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every state tensor, nested ones included."""
        for item, _ in self._fills():
            yield item

    def slot_view(self, slot: int) -> list[torch.Tensor]:
        """What one slot's state holds (views), scratch space left out: for comparing states."""
        views: list[torch.Tensor] = []
        for _, value, _ in self._items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, StreamState):
                    views.extend(item.slot_view(slot))
                elif isinstance(item, torch.Tensor):
                    views.append(item[slot])
        return views

    def reset(self, mask: torch.Tensor) -> None:
        """Puts the slots where `mask` ([B] bool) is true back to their initial state."""
        for _, value, fill in self._items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, StreamState):
                    item.reset(mask)
                elif isinstance(item, torch.Tensor):
                    byte_view(item).masked_fill_(slot_mask(mask, item), fill)  # float8 (a KV cache): as bytes

    def _fills(self) -> Iterator[tuple[torch.Tensor, Any]]:
        """Every state tensor with its reset value, nested ones included."""
        for _, value, fill in self._items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, StreamState):
                    yield from item._fills()
                elif isinstance(item, torch.Tensor):
                    yield item, fill

    def reset_slot(self, slot: int) -> None:
        """`reset` of one slot known on the host: touches that slot's rows only (the zero fills in
        one multi-tensor launch: a slot is reset while the others wait for their next tick)."""
        zeros = []
        for item, fill in self._fills():
            if fill == 0:
                zeros.append(item[slot])
            else:
                item[slot].fill_(fill)
        if zeros:
            torch._foreach_zero_(zeros)

    def copy_slot(self, src: StreamState, src_slot: int, dst_slot: int) -> None:
        """Copies slot `src_slot` of `src` (a state of the same structure) into our slot
        `dst_slot`, in one multi-tensor launch."""
        pairs = list(zip(self.tensors(), src.tensors(), strict=True))
        torch._foreach_copy_([mine[dst_slot] for mine, _ in pairs], [theirs[src_slot] for _, theirs in pairs])

    def head(self, n: int) -> StreamState:
        """The same state restricted to slots [0, n): views, so a step on it updates ours in place
        (a smaller batch runs the slots in use only)."""
        changes = {}
        for name, value, _ in self._items():
            if isinstance(value, list):
                changes[name] = [v.head(n) if isinstance(v, StreamState) else v[:n] for v in value]
            elif isinstance(value, StreamState):
                changes[name] = value.head(n)
            elif isinstance(value, torch.Tensor):
                changes[name] = value[:n]
        return dataclasses.replace(self, **changes)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
