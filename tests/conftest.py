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


# a small memorising target shared by the engine tests: seconds to build, cached per session
SMALL_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    vocab_size=512, max_position_embeddings=512)
SMALL_RECIPE = dict(epochs=20, lr=3e-3, warmup=5, batch_size=4)


@pytest.fixture(scope="session")
def small_data():
    import data
    return data.builtin(n_docs=2, seed=0)


@pytest.fixture(scope="session")
def small_target(small_data, tmp_path_factory):
    """(model, tokenizer) of a tiny OLMo trained briefly on 2 built-in documents per task/split."""
    import lume
    items, _ = small_data
    path = lume.tiny_target(items, tmp_path_factory.mktemp("cache"), log=lambda s: None,
                            recipe=SMALL_RECIPE, config=SMALL_CONFIG)
    return lume.load_pretrained(str(path))
