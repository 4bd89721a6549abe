"""The int8-weight kernel (`npc_voice/model/int8_matmul.py`), run under Triton's interpreter: the
product of the int8 rows and their scales, for the shapes a tick uses (1 to 64 activation rows, a
slice of a matrix's rows as the depth transformer takes them, sizes that are not whole tiles)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # a test dependency on Linux x86-64 (pyproject's test extra)

from npc_voice.model.int8_matmul import int8_linear  # noqa: E402
from npc_voice.model.quant import Int8Weight  # noqa: E402


@pytest.mark.parametrize("M, N, K", [(1, 48, 64), (5, 40, 300), (64, 96, 128), (70, 33, 272)])
def test_the_kernel_equals_the_dequantized_product(M, N, K) -> None:
    g = torch.Generator().manual_seed(M * 1000 + N)
    w = Int8Weight(torch.randn(N, K, generator=g), torch.float32)
    x = torch.randn(2, M, K, generator=g) if M == 70 else torch.randn(M, K, generator=g)
    ours = int8_linear(x, w.q, w.scale)
    ref = torch.nn.functional.linear(x.double(), w.q.double() * w.scale.double())
    assert ours.shape == (*x.shape[:-1], N) and ours.dtype == x.dtype
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)


def test_a_slice_of_rows_and_a_strided_input() -> None:
    g = torch.Generator().manual_seed(3)
    w = Int8Weight(torch.randn(64, 96, generator=g), torch.float32)
    x = torch.randn(3, 2 * 96, generator=g)[:, ::2]  # not contiguous in K: copied first
    ours = int8_linear(x, w.q[16:48], w.scale[16:48])
    torch.testing.assert_close(ours, w.linear(x, 16, 48), rtol=1e-4, atol=1e-4)


def test_narrower_strips_for_a_small_matrix_give_the_same_product(monkeypatch) -> None:
    from npc_voice.model import int8_matmul

    g = torch.Generator().manual_seed(5)
    w = Int8Weight(torch.randn(96, 64, generator=g), torch.float32)
    x = torch.randn(3, 64, generator=g)
    wide = int8_linear(x, w.q, w.scale)  # 2 strips of 64 rows
    monkeypatch.setitem(int8_matmul.CONFIG, "min_programs", 6)  # 16-row strips: 6 programs
    torch.testing.assert_close(int8_linear(x, w.q, w.scale), wide, rtol=1e-5, atol=1e-5)


def test_it_refuses_what_it_cannot_multiply() -> None:
    w = Int8Weight(torch.randn(32, 64), torch.float32)
    with pytest.raises(ValueError, match="int8 rows"):
        int8_linear(torch.randn(2, 32), w.q, w.scale)  # K does not match
    with pytest.raises(ValueError, match="int8 rows"):
        int8_linear(torch.randn(2, 64), w.q.float(), w.scale)


def test_the_operator_is_one_node_of_a_compiled_graph() -> None:
    """`int8_linear_op`: torch.compile keeps the kernel whole (no graph break, no tracing into Triton's
    launcher) and the compiled product is the kernel's."""
    from npc_voice.model.int8_matmul import int8_linear_op

    g = torch.Generator().manual_seed(9)
    w = Int8Weight(torch.randn(40, 64, generator=g), torch.float32)
    x = torch.randn(2, 3, 64, generator=g)
    compiled = torch.compile(lambda x: int8_linear_op(x, w.q, w.scale) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), 2 * int8_linear(x, w.q, w.scale))


@pytest.mark.parametrize("N, K, block_n, stages", [(48, 64, 16, 0), (40, 300, 8, 0), (96, 1000, 32, 0), (40, 700, 4, 3)])
def test_the_one_row_kernel_equals_the_dequantized_product(monkeypatch, N, K, block_n, stages) -> None:
    """One activation row (`int8_matmul.GEMV`): the product summed on the CUDA cores, sizes that are
    not whole tiles, strips narrowed for a small matrix, the loop over K pipelined or not."""
    from npc_voice.model import int8_matmul

    monkeypatch.setitem(int8_matmul.GEMV, "enabled", True)
    monkeypatch.setitem(int8_matmul.GEMV, "num_stages", stages)
    monkeypatch.setitem(int8_matmul.GEMV, "block_n", block_n)
    monkeypatch.setitem(int8_matmul.GEMV, "block_k", 128)
    g = torch.Generator().manual_seed(N + K)
    w = Int8Weight(torch.randn(N, K, generator=g), torch.float32)
    for x in (torch.randn(1, K, generator=g), torch.randn(1, 1, K, generator=g)):
        ref = torch.nn.functional.linear(x.double(), w.q.double() * w.scale.double())
        ours = int8_linear(x, w.q, w.scale)
        assert ours.shape == (*x.shape[:-1], N)
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)
