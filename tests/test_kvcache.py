"""The 8-bit KV cache: quantization error bounds, a streamed LM that stays close to the
full-precision one, slots that stay independent, installs in the cache's own form, and the
`--kv-dtype` choices a machine cannot honour refused by name."""

from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest
import torch

from npc_voice.engine import Engine, Persona
from npc_voice.model.generator import Generator
from npc_voice.model.kvcache import KVCache, QuantKVCache, dequantize, quantize_rows, resolve_kv_dtype
from npc_voice.model.loading import random_model
from npc_voice.model_args import add_model_args, load_model_from_args
from test_lm import SMALL, lm, random_tokens, skip_and_reset_slot_1  # noqa: F401  (the `lm` fixture)

EIGHT_BIT = [torch.int8, torch.float8_e4m3fn]


@pytest.mark.parametrize("dtype", EIGHT_BIT)
def test_quantized_rows_come_back_within_half_a_step(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 50, 32, generator=g) * torch.rand(3, 4, 50, 1, generator=g) * 10
    x[0, 0, 0] = 0  # an all-zero row (a fresh cache row) stays exactly zero
    values, scale = quantize_rows(x, dtype)
    assert values.dtype == dtype and scale.shape == x.shape[:-1] and scale.dtype == torch.float32
    back = dequantize(values, scale, torch.float32)
    err = (back - x).abs()
    if dtype == torch.int8:  # uniform steps of absmax / 127: at most half a step off
        assert bool((err <= scale[..., None] * 0.5 + 1e-6).all())
    else:  # e4m3 keeps 3 mantissa bits: within 1/16 of each value (subnormals: half their step)
        assert bool((err <= x.abs() / 16 + scale[..., None] * 2.0**-10).all())
    assert torch.equal(back[0, 0, 0], torch.zeros(32))


@pytest.mark.parametrize("dtype", EIGHT_BIT)
@torch.no_grad()
def test_an_8bit_cache_streams_close_to_the_full_precision_one(lm, dtype) -> None:  # noqa: F811
    B, T = 2, 30  # past the context of 12: the ring wraps
    tokens = random_tokens(SMALL, B, T, seed=5)
    full = lm.init_state(B)
    quant = lm.transformer.init_state(B, kv_dtype=dtype)
    assert isinstance(full.layers[0], KVCache) and isinstance(quant.layers[0], QuantKVCache)
    assert quant.layers[0].keys.nbytes * 4 == full.layers[0].keys.nbytes  # fp32 -> 8 bits
    ref = torch.cat([lm.step_text(tokens[:, :, t : t + 1], full)[1] for t in range(T)], 1)
    got = torch.cat([lm.step_text(tokens[:, :, t : t + 1], quant)[1] for t in range(T)], 1)
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < (0.01 if dtype == torch.int8 else 0.05), rel
    # and the whole-sequence pass agrees with it to the same degree
    whole = lm.forward_text(tokens)[1]
    assert float((got - whole).norm() / whole.norm()) < (0.01 if dtype == torch.int8 else 0.05)


@pytest.mark.parametrize("dtype", EIGHT_BIT)
def test_skipping_or_resetting_a_slot_leaves_others_bit_identical_in_8bit(lm, dtype) -> None:  # noqa: F811
    q = copy.copy(lm)  # the same weights; only the slots' cache differs
    q.kv_dtype = dtype
    gen = Generator(q)
    assert isinstance(gen.init_state(1).temporal.layers[0], QuantKVCache)
    users = torch.randint(0, SMALL.card, (16, 3, gen.num_user), generator=torch.Generator().manual_seed(2))
    skip_and_reset_slot_1(gen, users)


def test_an_8bit_engine_installs_the_quantized_prefix_and_keeps_other_sessions_unchanged() -> None:
    model = random_model("tiny", seed=3)
    model.lm.kv_dtype = torch.int8
    rate = model.config.mimi.sample_rate
    t = np.arange(rate) / rate
    voice = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    inn = Persona("You keep the inn.", voice_samples=voice)
    smith = Persona("You forge blades.", voice_samples=voice[::-1].copy())

    def run(second: bool) -> tuple[list, Engine, object]:
        engine = Engine(model, slots=2)
        a = engine.open(inn, seed=1)
        heard = []
        for i in range(8):
            if second and i == 2:
                engine.open(smith, seed=2)
            heard += [(e.text_token, e.pcm) for e in engine.tick() if e.session_id == a.id]
        return heard, engine, a

    alone, engine, a = run(False)
    crowded, _, _ = run(True)
    assert len(alone) == len(crowded) == 8
    for (t1, p1), (t2, p2) in zip(alone, crowded):
        assert t1 == t2 and np.array_equal(p1, p2)
    # the slot holds the prefix's rows in 8-bit form: the builder's full-precision rows, quantized
    prefix = engine.cache.lookup(inn.prompt_key())
    n = prefix.keys.shape[2]
    capacity = engine.step.capacity
    for layer, cache in enumerate(engine.state.temporal.layers):
        assert isinstance(cache, QuantKVCache) and cache.keys.dtype == torch.int8
        kq, ks = quantize_rows(prefix.keys[layer], torch.int8)  # [H, n, D], [H, n]
        if n <= capacity:  # rows 0..n-1 hold the prompt until the conversation overwrites them
            kept = prefix.length - n  # first kept position
            assert kept == 0 and torch.equal(cache.keys[a.slot, :, :1], kq[:, :1])
            assert torch.equal(cache.key_scale[a.slot, :, :1], ks[:, :1])


def test_resolve_kv_dtype_defaults_and_refusals() -> None:
    assert resolve_kv_dtype("auto", "cpu") is None  # a CPU keeps the full-precision cache
    assert resolve_kv_dtype("bf16", "cpu") is None
    for name in ("int8", "fp8"):
        with pytest.raises(ValueError, match=f"--kv-dtype {name} needs a CUDA GPU"):
            resolve_kv_dtype(name, "cpu")
    with pytest.raises(ValueError, match="--kv-dtype 'int4'"):
        resolve_kv_dtype("int4", "cpu")


def test_the_command_line_refuses_an_8bit_cache_on_a_cpu_before_loading() -> None:
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--device", "cpu", "--kv-dtype", "int8"])
    with pytest.raises(SystemExit, match="--kv-dtype int8 needs a CUDA GPU"):
        load_model_from_args(args)
    assert parser.parse_args([]).kv_dtype == "auto"
