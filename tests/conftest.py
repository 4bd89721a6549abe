"""Shared pytest helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden"


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
    """Every test starts from the same RNG state and single-threaded-friendly defaults."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Folder of the reference (Kyutai moshi 0.2.13) fixtures written by tools/golden/make_golden.py."""
    return GOLDEN_DIR
