"""Shared test fixtures: where the real data lives, the test-only oracles, a small memorising target.

Outside CI a test that needs the real data (../shared beside the checkout) or an oracle package
(rouge-score, nltk, scikit-learn, pyarrow: tests/requirements.txt) skips, saying what is missing
and where it goes. Under CI (LUME_CI=1, set by .ci/run) the same test FAILS instead: CI has both,
and a test that silently stopped checking would hide a regression.
"""
import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # CI has ../shared beside the checkout
sys.path.insert(0, str(ROOT))
STRICT = os.environ.get("LUME_CI") == "1"


def missing(reason: str):
    """Skip (a user's machine) or fail (CI: LUME_CI=1) a test that lacks what it needs."""
    if STRICT:
        pytest.fail(f"{reason} (LUME_CI=1: CI must have it, so this fails instead of skipping)")
    pytest.skip(reason)


def oracle(module: str):
    """Import a test-only oracle (tests/requirements.txt); skip without it, fail in CI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        missing(f"oracle {module} is not installed: pip install -r tests/requirements.txt")


@pytest.fixture(scope="session")
def shared() -> Path:
    for name in ("lume-data", "mmlu", "olmo-tokenizer"):
        if not (SHARED / name).is_dir():
            missing(f"real data not found: {SHARED / name} (the LUME release, MMLU and the OLMo tokenizer "
                    f"go in a folder 'shared' beside the checkout: {SHARED})")
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
def small_target_dir(small_data, tmp_path_factory):
    """save_pretrained directory of a tiny OLMo trained briefly on 2 built-in documents per task/split
    (what `--model DIR --data builtin --n-docs 2` runs on, in a subprocess too)."""
    import tiny
    items, _ = small_data
    return tiny.tiny_target(items, tmp_path_factory.mktemp("cache"), log=lambda s: None,
                            recipe=SMALL_RECIPE, config=SMALL_CONFIG)


@pytest.fixture(scope="session")
def small_target(small_target_dir):
    """(model, tokenizer) of the small target."""
    import lume
    return lume.load_pretrained(str(small_target_dir))


@pytest.fixture
def small_tiny(monkeypatch):
    """Make --model tiny build the small test target (seconds) instead of the default one."""
    import tiny
    monkeypatch.setattr(tiny, "TINY", {**tiny.TINY, **SMALL_CONFIG})
    monkeypatch.setattr(tiny, "TINY_RECIPE", {**tiny.TINY_RECIPE, **SMALL_RECIPE})
