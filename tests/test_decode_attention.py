"""The fused 8-bit decode attention (Triton, run here under its interpreter) computes what PyTorch's
attention computes on the dequantized cache, for every layout a tick can give it."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")  # a test dependency on Linux x86-64 (pyproject's test extra)

from npc_voice.model import decode_attention as da  # noqa: E402
from npc_voice.model.kvcache import QuantKVCache, attend_dequantized  # noqa: E402


def filled_cache(B: int, H: int, S: int, D: int, dtype: torch.dtype, seed: int) -> QuantKVCache:
    g = torch.Generator().manual_seed(seed)
    cache = QuantKVCache.empty((B, H, S + 1, D), "cpu", dtype)
    k = torch.randn(B, H, S, D, generator=g) * torch.rand(B, H, S, 1, generator=g) * 4  # rows of varied size
    v = torch.randn(B, H, S, D, generator=g)
    cache.write(torch.arange(S).expand(B, S), k, v)
    return cache


def mask(B: int, W: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask [B, 1, 1, W] as a step builds it: slot 0 sees a prefix of the window
    (a young conversation), slot 1 a ring with a hole, slot 2 one row only (a skipped slot)."""
    g = torch.Generator().manual_seed(seed)
    visible = torch.ones(B, W, dtype=torch.bool)
    visible[0, W // 3 :] = False
    if B > 1:
        start = int(torch.randint(1, W - 1, (1,), generator=g))
        visible[1, start : start + W // 4] = False
    if B > 2:
        visible[2] = False
        visible[2, 0] = True
    return torch.zeros(B, 1, 1, W, dtype=dtype).masked_fill_(~visible[:, None, None], float("-inf"))


CASES = [  # B, H, S, D, W, cache dtype, query dtype, mode
    (3, 2, 100, 16, 100, torch.int8, torch.float32, "fma"),  # one split (a float32 query: float32 math)
    (3, 4, 300, 16, 257, torch.int8, torch.bfloat16, "offset"),  # splits, a last partial tile
    (3, 4, 300, 32, 300, torch.float8_e4m3fn, torch.bfloat16, "offset"),
    (2, 3, 90, 32, 90, torch.float8_e4m3fn, torch.float16, "offset"),
    (3, 2, 300, 16, 200, torch.int8, torch.float16, "dot"),  # (fp16: the interpreter's bf16 dot is wrong)
    (2, 3, 90, 32, 90, torch.float8_e4m3fn, torch.float16, "dot"),
    (3, 2, 300, 32, 300, torch.float8_e4m3fn, torch.bfloat16, "fma"),
    (1, 1, 700, 24, 640, torch.int8, torch.float16, "offset"),  # head dim not a power of two, many splits
    (3, 4, 300, 32, 257, torch.int8, torch.bfloat16, "imma"),  # integer dots for the keys
    (1, 2, 700, 40, 640, torch.int8, torch.float16, "imma"),
    (3, 4, 300, 32, 300, torch.int8, torch.bfloat16, "imma_pv"),  # and for the values
    (1, 1, 700, 48, 640, torch.int8, torch.float16, "imma_pv"),
    (2, 3, 90, 32, 90, torch.float8_e4m3fn, torch.bfloat16, "imma"),  # an fp8 cache: "offset" instead
]


@pytest.mark.parametrize("B, H, S, D, W, kv, qdt, mode", CASES)
def test_kernel_equals_attention_over_the_dequantized_cache(B, H, S, D, W, kv, qdt, mode) -> None:
    seed = hash((B, H, S, D, W, str(kv), mode)) % 10_000
    cache = filled_cache(B, H, S, D, kv, seed)
    q = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(seed + 1)).to(qdt)
    bias = mask(B, W, seed, qdt)
    out = da.decode_attention(q, cache.keys, cache.key_scale, cache.values, cache.value_scale, bias, W, mode=mode)
    ref = attend_dequantized(q.double(), cache.keys, cache.key_scale, cache.values, cache.value_scale,
                             bias.double(), W)
    assert out.shape == (B, H, 1, D) and out.dtype == qdt
    assert torch.isfinite(out).all()
    rel = float((out.double() - ref).norm() / ref.norm())
    # float32 math lands far under 1e-5; a 16-bit query/output rounds at ~1e-3
    assert rel < (1e-5 if qdt == torch.float32 else 6e-3), rel


def test_rows_past_the_window_and_masked_rows_are_never_read() -> None:
    B, H, S, D, W = 2, 2, 200, 16, 130
    cache = filled_cache(B, H, S, D, torch.int8, seed=4)
    q = torch.randn(B, H, 1, D)
    bias = mask(B, W, 4, torch.float32)
    before = da.decode_attention(q, cache.keys, cache.key_scale, cache.values, cache.value_scale, bias, W, mode="fma")
    cache.keys[:, :, W:] = 127  # rows past the window
    cache.value_scale[:, :, W:] = float("nan")
    hidden = torch.isinf(bias[:, 0, 0])  # [B, W] rows the mask hides
    # rows the mask hides: what a slot's previous conversation left there
    cache.values[:, :, :W][hidden[:, None, :, None].expand(B, H, W, D)] = -128
    cache.key_scale[:, :, :W][hidden[:, None, :].expand(B, H, W)] = 1e3
    after = da.decode_attention(q, cache.keys, cache.key_scale, cache.values, cache.value_scale, bias, W, mode="fma")
    assert torch.equal(before, after)


def test_the_launch_plan_fills_the_gpu_with_whole_tiles() -> None:
    for B, H, W in [(1, 32, 3000), (64, 32, 3000), (128, 32, 3000), (1, 32, 64), (8, 32, 1024)]:
        splits, chunk = da.plan(B, H, W)
        assert chunk % da.CONFIG["block_n"] == 0
        assert splits * chunk >= W and (splits - 1) * chunk < W  # every row covered, no split empty
        most = max(1, math.ceil(W / da.CONFIG["block_n"]) // da.CONFIG["min_tiles"])  # splits of min_tiles tiles
        assert B * H * splits >= min(da.CONFIG["programs"], B * H * most) // 2


def test_gpu_only_launch_choices_leave_the_numbers_alone(monkeypatch) -> None:
    """"packed" (PTX, an int8 cache on a GPU) and a register cap only change how a GPU runs the
    kernel: here (the interpreter) they give exactly what "offset" gives. (Their GPU results are
    checked against the dequantized cache by `tools/bench/gpu_kv.py checks`.)"""
    B, H, S, D, W = 2, 2, 300, 32, 280
    cache = filled_cache(B, H, S, D, torch.int8, seed=5)
    q = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    bias = mask(B, W, 5, torch.bfloat16)
    args = (q, cache.keys, cache.key_scale, cache.values, cache.value_scale, bias, W)
    offset = da.decode_attention(*args, mode="offset")
    monkeypatch.setitem(da.CONFIG, "maxnreg", 168)
    assert torch.equal(da.decode_attention(*args, mode="packed"), offset)


@pytest.mark.parametrize("kv, mode", [(torch.int8, "offset"), (torch.float8_e4m3fn, "offset"), (torch.int8, "imma_pv")])
def test_tiles_fetched_by_descriptor_give_what_pointer_loads_give(monkeypatch, kv, mode) -> None:
    """`CONFIG["tma"]`: tiles fetched whole through a tensor descriptor, the last one running past the
    window into the next head's rows (and past the cache's end, zero-filled) where garbage is stored:
    exactly what the masked pointer loads give."""
    B, H, S, D, W = 3, 2, 300, 32, 277
    cache = filled_cache(B, H, S, D, kv, seed=6)
    cache.keys[:, :, W:] = cache.keys[:, :, :1].expand(B, H, S + 1 - W, D)  # rows past the window: not zeros
    cache.values[:, :, W:] = cache.values[:, :, 1:2].expand(B, H, S + 1 - W, D)
    q = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    args = (q, cache.keys, cache.key_scale, cache.values, cache.value_scale, mask(B, W, 6, torch.bfloat16), W)
    loads = da.decode_attention(*args, mode=mode)
    monkeypatch.setitem(da.CONFIG, "tma", True)
    assert torch.equal(da.decode_attention(*args, mode=mode), loads)


def test_a_small_batch_gives_each_split_at_least_min_tiles(monkeypatch) -> None:
    monkeypatch.setitem(da.CONFIG, "min_tiles", 3)
    block = da.CONFIG["block_n"]
    assert da.plan(1, 32, 3000) == (8, 3 * block)  # 24 tiles: 8 splits of 3, not 24 of 1
    assert da.plan(64, 32, 3000) == da.plan(64, 32, 3000, min_tiles=1)  # 12 tiles a split already
    assert da.plan(1, 32, 2 * block) == (1, 2 * block)  # fewer tiles than that: one split


def test_it_refuses_what_it_cannot_compute() -> None:
    cache = filled_cache(1, 1, 10, 16, torch.int8, seed=0)
    with pytest.raises(ValueError, match="one query position"):
        da.decode_attention(torch.zeros(1, 1, 2, 16), cache.keys, cache.key_scale, cache.values, cache.value_scale,
                            torch.zeros(1, 1, 2, 10), 10)


def test_the_fused_write_stores_what_the_cache_writes() -> None:
    """`write_rows` (one kernel per layer) leaves an int8 cache exactly as `QuantKVCache.write` does:
    new rows at their ring rows (a skipped slot's in the scratch row), everything else untouched; v
    is a strided view, as the projections give it. (fp8 is checked on the GPU, `gpu_kv.py kernel`:
    the interpreter's float32 -> e4m3 conversion loses the carry when rounding up to a power of two.)"""
    kv = torch.int8
    B, H, T, S, D = 3, 4, 2, 20, 24
    g = torch.Generator().manual_seed(7)
    k = torch.randn(B, H, T, D, generator=g) * 3
    v = torch.randn(B, T, 3, H, D, generator=g).permute(2, 0, 3, 1, 4)[1]  # [B, H, T, D], not contiguous
    k[0, 0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 127.0])  # ties: half to even
    rows = torch.tensor([[3, 4], [19, 0], [S, S]])  # a wrap; slot 2 skipped (scratch row)
    ours, ref = filled_cache(B, H, S, D, kv, seed=3), filled_cache(B, H, S, D, kv, seed=3)
    da.write_rows(rows, k, v, ours.keys, ours.key_scale, ours.values, ours.value_scale)
    ref.write(rows, k, v)
    for a, b in zip(ours.tensors(), ref.tensors()):
        assert torch.equal(a, b)
    # An install's form: one batch entry into the slot a device tensor names (`write_slot`).
    slot, ring = torch.tensor([1]), torch.tensor([5, 6])
    da.write_rows(ring[None], k[2:], v[2:], ours.keys, ours.key_scale, ours.values, ours.value_scale, slots=slot)
    ref.write_slot(slot, ring, k[2:], v[2:])  # on the CPU: PyTorch's quantization and index_put
    for a, b in zip(ours.tensors(), ref.tensors()):
        assert torch.equal(a, b)
    assert not torch.equal(ours.keys[1, :, 5:7], filled_cache(B, H, S, D, kv, seed=3).keys[1, :, 5:7])
