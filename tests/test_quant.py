"""Weight-only int8 (npc_voice/model/quant.py): the logits stay close to the full-precision model's,
and the LM's weight memory is about halved against bf16."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from npc_voice.model.config import get_preset
from npc_voice.model.generator import Generator
from npc_voice.model.lm import PersonaPlexLM
from npc_voice.model.loading import random_model
from npc_voice.model.quant import Int8Linear, Int8Weight, quantize_int8_, weight_bytes
from npc_voice.model.transformer import Attention

# Relative L2 error of the logits, int8 against fp32 on the tiny model (seed 1, the inputs below):
# measured 0.0209 (text) and 0.0265 (depth); 0.018-0.021 and 0.024-0.027 over six input seeds.
TEXT_TOLERANCE = 0.03
DEPTH_TOLERANCE = 0.04


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).norm() / ref.double().norm())


def quantized_weights(lm: nn.Module) -> list[Int8Weight]:
    return [m for m in lm.modules() if isinstance(m, Int8Weight)]


@torch.no_grad()
def test_int8_logits_stay_close_to_fp32() -> None:
    full, q = random_model("tiny", seed=1), random_model("tiny", seed=1, int8=True)
    cfg = full.config.lm
    # every bias-free linear and attention projection of the LM is int8; nothing full-width is left
    assert not [n for n, m in q.lm.named_modules() if isinstance(m, nn.Linear) and m.bias is None]
    assert all(isinstance(m.in_proj_weight, Int8Weight) for m in q.lm.modules() if isinstance(m, Attention))
    assert len(quantized_weights(q.lm)) == sum(isinstance(m, Int8Linear) for m in q.lm.modules()) + sum(
        isinstance(m, Attention) for m in q.lm.modules())

    g = torch.Generator().manual_seed(0)
    T = 24
    tokens = torch.cat([torch.randint(0, cfg.text_card, (2, 1, T), generator=g),
                        torch.randint(0, cfg.card, (2, cfg.n_q, T), generator=g)], dim=1)
    depth_tokens = torch.cat([torch.randint(0, cfg.text_card, (2, T, 1), generator=g),
                              torch.randint(0, cfg.card, (2, T, cfg.dep_q - 1), generator=g)], dim=2)
    hidden, text = full.lm.forward_text(tokens)
    q_hidden, q_text = q.lm.forward_text(tokens)
    depth, q_depth = full.lm.forward_depth(hidden, depth_tokens), q.lm.forward_depth(q_hidden, depth_tokens)
    text_err, depth_err = rel_error(q_text, text), rel_error(q_depth, depth)
    assert 0.005 < text_err < TEXT_TOLERANCE, text_err  # above 0: the int8 weights are what is used
    assert 0.005 < depth_err < DEPTH_TOLERANCE, depth_err
    # the streaming path uses the same int8 weights (a row slice per depth step)
    state = q.lm.init_state(2)
    step_hidden, step_text = q.lm.step_text(tokens, state)
    torch.testing.assert_close(step_text, q_text, rtol=0, atol=1e-4)
    scratch = q.lm.depformer.init_scratch(2, step_hidden.device, step_hidden.dtype)
    for k in range(cfg.dep_q):
        logits = q.lm.depth_step(k, step_hidden[:, -1], depth_tokens[:, -1, k], scratch)
        torch.testing.assert_close(logits, q_depth[:, -1, k], rtol=0, atol=1e-4)


def test_int8_halves_the_quantized_weights_and_keeps_nothing_else() -> None:
    full = random_model("tiny", seed=1, dtype=torch.bfloat16)
    q = random_model("tiny", seed=1, dtype=torch.bfloat16, int8=True)
    weights = quantized_weights(q.lm)
    bf16 = sum(w.q.numel() * 2 for w in weights)
    int8 = sum(w.q.numel() + w.scale.numel() * 2 for w in weights)  # int8 rows and one bf16 scale per row
    assert all(w.q.dtype == torch.int8 and w.scale.dtype == torch.bfloat16 for w in weights)
    assert 0.5 < int8 / bf16 < 0.52  # measured 0.514 (the scales: 2 bytes per row of 128-528 entries)
    # the LM holds exactly that: no full-width copy of a quantized matrix stays behind
    assert weight_bytes(q.lm) == weight_bytes(full.lm) - bf16 + int8


def test_int8_7b_weight_memory() -> None:
    """The 7B LM's weights, counted on the meta device (no memory used): 16.74 GB in bf16, 8.71 GB int8."""
    with torch.device("meta"):
        lm = PersonaPlexLM(get_preset("personaplex-7b").lm).to(torch.bfloat16)
        before = weight_bytes(lm)
        after = weight_bytes(quantize_int8_(lm))
    assert before == pytest.approx(16.74e9, rel=1e-3)
    assert after == pytest.approx(8.71e9, rel=1e-3)
    assert 0.5 < after / before < 0.53  # about halved: embeddings and norms stay bf16


class RecordOps(TorchDispatchMode):
    """Records every tensor operation run inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_int8_device_and_dtype_dequantize_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """`LoadedModel.device` and `.dtype` (asked per session, per engine and by /health) read a norm's
    weight: under int8 no matrix is dequantized to answer, no tensor operation runs, and a read
    costs what a property costs. The generator finds its device and dtype the same way."""
    q = random_model("tiny", seed=1, dtype=torch.bfloat16, int8=True)
    dequantized: list[str] = []

    def counting(name: str):
        original = getattr(Int8Weight, name)

        def wrapper(self, *args):
            dequantized.append(name)
            return original(self, *args)
        return wrapper

    monkeypatch.setattr(Int8Weight, "forward", counting("forward"))
    monkeypatch.setattr(Int8Weight, "rows", counting("rows"))
    assert q.lm.text_linear.weight.dtype == torch.bfloat16 and dequantized == ["forward"]  # the counter counts
    dequantized.clear()

    with RecordOps() as recorded:
        device, dtype = q.device, q.dtype
    assert (device, dtype) == (torch.device("cpu"), torch.bfloat16)
    assert recorded.ops == [] and dequantized == []

    gen = Generator(q.lm)
    state = gen.init_state(2)
    assert state.temporal.layers[0].keys.dtype == torch.bfloat16 and dequantized == []

    reads = 10_000
    start = time.perf_counter()
    for _ in range(reads):
        _ = q.device, q.dtype
    per_read = (time.perf_counter() - start) / reads
    assert per_read < 50e-6, per_read  # a few attribute lookups: ~1 us (dequantizing the 7B text head: ~260 MB)
