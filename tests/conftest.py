"""Shared pytest helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden"


def load_golden_reference(golden_dir: Path = GOLDEN_DIR) -> dict[str, torch.Tensor]:
    """`reference.safetensors` of the golden fixtures, with the full depth logits rebuilt.

    The fixtures store the depth transformer's outputs rather than the depth logits (see
    tests/fixtures/golden/README.md); this adds `depth_logits` [B, T, dep_q, card], computed in fp32
    from them and the checkpoint's `linears.K.weight` (equal to moshi's own logits to ~1e-7), and
    returns `pcm` as fp32. Everything else is returned as stored.
    """
    from safetensors.torch import load_file

    ref = load_file(str(golden_dir / "reference.safetensors"))
    weights = load_file(str(golden_dir / "model.safetensors"))
    dep_q = ref["depth_hidden"].shape[2]
    w_depth = torch.stack([weights[f"linears.{k}.weight"].float() for k in range(dep_q)])
    ref["depth_logits"] = torch.einsum("btkd,kcd->btkc", ref["depth_hidden"], w_depth)
    ref["pcm"] = ref["pcm"].float()
    return ref


@pytest.fixture
def seeded():
    """Seed torch's global RNG; returns a function to reseed with another value."""

    def _seed(value: int = 0) -> torch.Generator:
        torch.manual_seed(value)
        return torch.Generator().manual_seed(value)

    _seed(0)
    return _seed


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Folder of the reference (Kyutai moshi 0.2.13) fixtures written by tools/golden/make_golden.py."""
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def golden_reference(golden_dir: Path) -> dict[str, torch.Tensor]:
    """See `load_golden_reference`."""
    return load_golden_reference(golden_dir)
