"""Element-wise pieces of the step, fused by `torch.compile` on CUDA.

Inside a CUDA graph a step costs what its kernels cost, and at small batch most of the ~2000
kernels of a step are tiny element-wise ones (a float32 RMS norm alone is six). Compiling these
few pure functions fuses each into one kernel. Only on CUDA and only once `enable()` is called
(by the batched GPU step): the CPU path, and so CI, stays plain eager PyTorch.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, TypeVar

import torch
import torch.nn.functional as F

F_ = TypeVar("F_", bound=Callable)
_enabled = False


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on
    if on:  # one specialisation per shape: batch sizes, the LM's and Mimi's transformers, ...
        torch._dynamo.config.recompile_limit = 512
        torch._dynamo.config.accumulated_recompile_limit = 4096


_local = threading.local()


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Plain PyTorch inside the block, in this thread: for work whose shapes vary (a character's
    prompt, an install), where compiling one specialisation per shape would cost seconds the first
    time."""
    saved, _local.eager = getattr(_local, "eager", False), True
    try:
        yield
    finally:
        _local.eager = saved


def fusable(fn: F_) -> F_:
    compiled: list[Callable] = []

    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():  # inside a larger compiled region (step.COMPILE): traced with it
            return fn(*args, **kwargs)
        if _enabled and args[0].is_cuda and not getattr(_local, "eager", False):
            if not compiled:
                compiled.append(torch.compile(fn, dynamic=False, fullgraph=True))
            return compiled[0](*args, **kwargs)
        return fn(*args, **kwargs)

    wrapper.__doc__, wrapper.__name__, wrapper.__wrapped__ = fn.__doc__, fn.__name__, fn
    return wrapper  # type: ignore[return-value]


@fusable
def rms_norm(x: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm in float32, back to x's dtype (the reference's `rms_norm_f32`)."""
    xf = x.float()
    var = eps + xf.pow(2).mean(dim=-1, keepdim=True)
    return (xf * (alpha.float() * torch.rsqrt(var))).to(x.dtype)


@fusable
def silu_gate(h: torch.Tensor) -> torch.Tensor:
    """[..., 2H] -> silu(first half) * second half."""
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value


@fusable
def rope_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k ([B, H, T, D], interleaved pairs) in float32."""
    def rotate(x: torch.Tensor) -> torch.Tensor:
        B, H, T, D = x.shape
        pairs = x.reshape(B, H, T, D // 2, 2).float()
        real, imag = pairs[..., 0], pairs[..., 1]
        return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).to(x.dtype).view(B, H, T, D)

    return rotate(q), rotate(k)
