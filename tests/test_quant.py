"""8-bit LM weights (npc_voice/model/quant.py), int8 (weight-only) and fp8 (fp8 matmuls; on this CPU their
plain float32 stand-in): the logits stay close to the full-precision model's, and the LM's weight memory is
about halved against bf16."""

from __future__ import annotations

from types import SimpleNamespace

import time

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from npc_voice.model.config import get_preset
from npc_voice.model.generator import Generator
from npc_voice.model.lm import PersonaPlexLM
from npc_voice.model.loading import random_model
from npc_voice.model.quant import (
    Fp8Linear, Fp8Weight, Int8Linear, Int8Weight, QuantWeight, quantize_fp8_, quantize_int8_, resolve_weights_dtype,
    weight_bytes,
)
from npc_voice.model.transformer import Attention

# Relative L2 error of the logits, int8 against fp32 on the tiny model (seed 1, the inputs below):
# measured 0.0209 (text) and 0.0265 (depth); 0.018-0.021 and 0.024-0.027 over six input seeds.
TEXT_TOLERANCE = 0.03
DEPTH_TOLERANCE = 0.04


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).norm() / ref.double().norm())


def teacher_forced(full, q, T: int = 24) -> SimpleNamespace:
    """`q`'s whole-sequence text and depth logits on 2 random streams, and their relative errors
    against `full`'s."""
    cfg = full.config.lm
    g = torch.Generator().manual_seed(0)
    tokens = torch.cat([torch.randint(0, cfg.text_card, (2, 1, T), generator=g),
                        torch.randint(0, cfg.card, (2, cfg.n_q, T), generator=g)], dim=1)
    depth_tokens = torch.cat([torch.randint(0, cfg.text_card, (2, T, 1), generator=g),
                              torch.randint(0, cfg.card, (2, T, cfg.dep_q - 1), generator=g)], dim=2)
    hidden, text = full.lm.forward_text(tokens)
    q_hidden, q_text = q.lm.forward_text(tokens)
    depth, q_depth = full.lm.forward_depth(hidden, depth_tokens), q.lm.forward_depth(q_hidden, depth_tokens)
    return SimpleNamespace(tokens=tokens, depth_tokens=depth_tokens, q_text=q_text, q_depth=q_depth,
                           text_err=rel_error(q_text, text), depth_err=rel_error(q_depth, depth))


def assert_streaming_uses_the_same_weights(q, run: SimpleNamespace) -> None:
    """The streaming path gives what the whole-sequence pass gave (a row slice per depth step)."""
    state = q.lm.init_state(2)
    step_hidden, step_text = q.lm.step_text(run.tokens, state)
    torch.testing.assert_close(step_text, run.q_text, rtol=0, atol=1e-4)
    scratch = q.lm.depformer.init_scratch(2, step_hidden.device, step_hidden.dtype)
    for k in range(q.config.lm.dep_q):
        logits = q.lm.depth_step(k, step_hidden[:, -1], run.depth_tokens[:, -1, k], scratch)
        torch.testing.assert_close(logits, run.q_depth[:, -1, k], rtol=0, atol=1e-4)


def quantized_weights(lm: nn.Module, kind: type[QuantWeight] = Int8Weight) -> list[QuantWeight]:
    return [m for m in lm.modules() if isinstance(m, kind)]


@torch.no_grad()
def test_int8_logits_stay_close_to_fp32() -> None:
    full, q = random_model("tiny", seed=1), random_model("tiny", seed=1, int8=True)
    # every bias-free linear and attention projection of the LM is int8; nothing full-width is left
    assert not [n for n, m in q.lm.named_modules() if isinstance(m, nn.Linear) and m.bias is None]
    assert all(isinstance(m.in_proj_weight, Int8Weight) for m in q.lm.modules() if isinstance(m, Attention))
    assert len(quantized_weights(q.lm)) == sum(isinstance(m, Int8Linear) for m in q.lm.modules()) + sum(
        isinstance(m, Attention) for m in q.lm.modules())

    run = teacher_forced(full, q)
    text_err, depth_err = run.text_err, run.depth_err
    assert 0.005 < text_err < TEXT_TOLERANCE, text_err  # above 0: the int8 weights are what is used
    assert 0.005 < depth_err < DEPTH_TOLERANCE, depth_err
    # the streaming path uses the same int8 weights (a row slice per depth step)
    assert_streaming_uses_the_same_weights(q, run)


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


@pytest.mark.parametrize("quantize", [quantize_int8_, quantize_fp8_], ids=["int8", "fp8"])
def test_8bit_7b_weight_memory(quantize) -> None:
    """The 7B LM's weights, counted on the meta device (no memory used): 16.74 GB in bf16, 8.71 GB in
    int8 or fp8 (the per-row scales, bf16 or float32, are 0.004 GB)."""
    with torch.device("meta"):
        lm = PersonaPlexLM(get_preset("personaplex-7b").lm).to(torch.bfloat16)
        before = weight_bytes(lm)
        after = weight_bytes(quantize(lm))
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


# --- fp8 -------------------------------------------------------------------------------------------
# Relative L2 error of the logits, fp8 against fp32 on the tiny model (seed 1, the inputs of the int8
# test): measured 0.110 (text) and 0.141 (depth); 0.101-0.110 and 0.134-0.142 over six input seeds. Each
# fp8 product (x and W both e4m3: 3 mantissa bits) is off by ~3.7% (int8 weight-only: ~0.7%), and the
# tiny random model's dozen chained products add up.
FP8_TEXT_TOLERANCE = 0.13
FP8_DEPTH_TOLERANCE = 0.17


def fp8_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., in] as the fp8 product sees it, in float64: quantized per row (absmax / 448) to e4m3."""
    x = x.float()
    sx = x.abs().amax(dim=-1, keepdim=True) / 448.0
    return (x / sx).clamp(-448, 448).to(torch.float8_e4m3fn).double() * sx.double()


def fp8_reference(x: torch.Tensor, w: Fp8Weight, start: int | None = None, end: int | None = None) -> torch.Tensor:
    """The fp8 product in float64: x's e4m3 rows times the stored e4m3 rows [start, end), times both
    scales -> [..., end - start]."""
    return fp8_activations(x) @ (w.q[start:end].double() * w.scale[start:end].double()).T


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_the_fp8_product(dtype: torch.dtype) -> None:
    """`Fp8Weight.linear` (on a CPU, its float32 stand-in for `torch._scaled_mm`) is the product of the
    e4m3 activations and weights, within float32 rounding, for any leading shape and any row slice."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 64, generator=g) / 8
    w = Fp8Weight(weight, dtype)
    assert w.q.dtype == torch.float8_e4m3fn and w.scale.dtype == torch.float32 and w.scale.shape == (96, 1)
    assert float(w.q.float().abs().amax()) == 448.0  # each row's absmax maps to e4m3's largest value
    x = torch.randn(2, 5, 64, generator=g).to(dtype)
    for start, end in ((None, None), (32, 80)):
        out = w.linear(x, start, end)
        ref = fp8_reference(x, w, start, end)
        assert out.dtype == dtype and out.shape == ref.shape
        rounding = 1e-6 if dtype == torch.float32 else 8e-3  # the result cast to x's dtype
        torch.testing.assert_close(out.double(), ref, rtol=rounding, atol=rounding * float(ref.abs().amax()))
        # and it is an 8-bit product: a few percent off the full-precision one
        exact = x.double() @ weight[start:end].double().T
        assert 0.01 < rel_error(out, exact) < 0.06, rel_error(out, exact)
    # the dequantized matrix (for whoever still asks for one) is the stored rows times their scales
    torch.testing.assert_close(w().float(), (w.q.float() * w.scale).to(dtype).float(), rtol=0, atol=0)
    torch.testing.assert_close(w.rows(32, 80), w()[32:80], rtol=0, atol=0)


@torch.no_grad()
def test_fp8_logits_stay_close_to_fp32() -> None:
    full, q = random_model("tiny", seed=1), random_model("tiny", seed=1, weights_dtype="fp8")
    # every bias-free linear and attention projection of the LM is fp8; nothing full-width is left
    assert not [n for n, m in q.lm.named_modules() if isinstance(m, nn.Linear) and m.bias is None]
    assert all(isinstance(m.in_proj_weight, Fp8Weight) for m in q.lm.modules() if isinstance(m, Attention))
    assert len(quantized_weights(q.lm, Fp8Weight)) == sum(isinstance(m, Fp8Linear) for m in q.lm.modules()) + sum(
        isinstance(m, Attention) for m in q.lm.modules())
    assert not quantized_weights(q.mimi, QuantWeight)  # Mimi stays as it is

    run = teacher_forced(full, q)
    text_err, depth_err = run.text_err, run.depth_err
    assert 0.05 < text_err < FP8_TEXT_TOLERANCE, text_err  # above int8's ~0.02: the fp8 products are what runs
    assert 0.05 < depth_err < FP8_DEPTH_TOLERANCE, depth_err
    # the streaming path runs the same fp8 products (a row slice per depth step)
    assert_streaming_uses_the_same_weights(q, run)


@torch.no_grad()
def test_fp8_depth_steps_use_their_own_rows() -> None:
    """A depth layer keeps each step's projections stacked along dim 0: step k's q, k, v and output
    are the fp8 products with rows [k * 3C, (k + 1) * 3C) and [k * C, (k + 1) * C) of the stacked
    matrices, checked against the dequantized matrices, step by step."""
    q = random_model("tiny", seed=2, weights_dtype="fp8")
    attn = q.lm.depformer.layers[0].self_attn
    C, H, steps = attn.dim, attn.num_heads, attn.steps
    w_in, w_out = attn.in_proj_weight, attn.out_proj.w
    assert isinstance(w_in, Fp8Weight) and w_in.q.shape == (steps * 3 * C, C) and w_out.q.shape == (steps * C, C)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 1, C, generator=g), torch.randn(3, H, 1, C // H, generator=g)
    rows_in = w_in().double().view(steps, 3 * C, C)  # the dequantized stacks, cut per step
    rows_out = w_out().double().view(steps, C, C)
    x_q, y_q = fp8_activations(x), fp8_activations(y.transpose(1, 2).reshape(3, 1, C))
    for k in range(steps):
        qkv = torch.cat([t.transpose(1, 2).reshape(3, 1, C) for t in attn.project_in(x, k)], dim=-1)  # [3, 1, 3C]
        torch.testing.assert_close(qkv.double(), x_q @ rows_in[k].T, rtol=1e-5, atol=1e-5)
        out = attn.project_out(y, k)  # [3, 1, C]
        torch.testing.assert_close(out.double(), y_q @ rows_out[k].T, rtol=1e-5, atol=1e-5)
        assert rel_error(out, y_q @ rows_out[(k + 1) % steps].T) > 0.5  # another step's rows: another result


def test_fp8_halves_the_quantized_weights_and_keeps_nothing_else() -> None:
    full = random_model("tiny", seed=1, dtype=torch.bfloat16)
    q = random_model("tiny", seed=1, dtype=torch.bfloat16, weights_dtype="fp8")
    weights = quantized_weights(q.lm, Fp8Weight)
    bf16 = sum(w.q.numel() * 2 for w in weights)
    fp8 = sum(w.q.numel() + w.scale.numel() * 4 for w in weights)  # e4m3 rows and one float32 scale per row
    assert all(w.q.dtype == torch.float8_e4m3fn and w.scale.dtype == torch.float32 for w in weights)
    assert 0.5 < fp8 / bf16 < 0.54  # measured 0.527 (the scales: 4 bytes per row of 64-528 entries)
    assert weight_bytes(q.lm) == weight_bytes(full.lm) - bf16 + fp8
    # the compute dtype is unchanged: activations, norms and what `rows` dequantizes to
    assert q.dtype == torch.bfloat16 and all(w.rows(0, 1).dtype == torch.bfloat16 for w in weights)


def test_fp8_needs_an_fp8_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--weights-dtype fp8` on a CPU, or on a GPU older than compute capability 8.9, is refused with
    the flag named, before any weight is read (the CLI turns the ValueError into its exit message)."""
    import argparse

    from npc_voice.model_args import add_model_args, load_model_from_args

    with pytest.raises(ValueError, match=r"--weights-dtype fp8 needs a CUDA GPU .*cpu: use --weights-dtype int8"):
        resolve_weights_dtype("fp8", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"--weights-dtype fp8 needs .*NVIDIA A100 is 8\.0"):
        resolve_weights_dtype("fp8", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_weights_dtype("fp8", "cuda") == "fp8"
    # `--int8` is `--weights-dtype int8`; the two cannot disagree
    assert resolve_weights_dtype("bf16", "cpu", int8=True) == resolve_weights_dtype("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="--int8 and --weights-dtype fp8 disagree"):
        resolve_weights_dtype("fp8", "cuda", int8=True)

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    with pytest.raises(SystemExit, match=r"npc-voice: --weights-dtype fp8 needs"):
        load_model_from_args(parser.parse_args(["--device", "cpu", "--weights-dtype", "fp8"]))
    model = load_model_from_args(parser.parse_args(["--device", "cpu", "--int8"]))
    assert isinstance(model.lm.text_linear, Int8Linear)
    assert parser.parse_args([]).weights_dtype == "bf16"
