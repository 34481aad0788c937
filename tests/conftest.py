"""Shared test fixtures: where the real data lives, and the repo root on sys.path."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # CI has ../shared beside the checkout
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "lume-data").is_dir():
        pytest.skip(f"real data not found at {SHARED} (CI has ../shared beside the checkout)")
    return SHARED
