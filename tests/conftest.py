"""Shared test fixtures: where the real data lives, the test-only oracles, a small memorising target.

Outside CI a test that needs the real data (../shared beside the checkout) or an oracle package
(rouge-score, nltk, scikit-learn, pyarrow: tests/requirements.txt) skips, saying what is missing
and where it goes. Under CI (LUME_CI=1, set by .ci/run) the same test FAILS instead: CI has both,
and a test that silently stopped checking would hide a regression.

The expensive things are built once per session; reuse them rather than building your own (the
whole suite has 6 minutes on 2 cores):
- `shared`: ../shared (the LUME release, MMLU, the OLMo tokenizer), or skip / fail as above.
- `small_data`: (items, MIA sets) of data.builtin(n_docs=2, seed=0): 40 items, 4 MIA documents.
- `small_target_dir`: the small tiny target (SMALL_CONFIG, SMALL_RECIPE) trained on small_data, a
  save_pretrained directory (`--model DIR --data builtin --n-docs 2` in a subprocess too); never
  write into it. `small_target`: its (model, tokenizer), loaded once: a test that trains it must
  train a copy (copy.deepcopy).
- `small_tiny`: `--model tiny` runs (job.main, run.parse_args with `--n-docs 2`) get the small
  target of their data, built once per session in `small_cache` whatever --cache-dir they pass:
  with the built-in data that is small_target_dir's build, reused.
- The embedded default (`python run.py` with no --model/--data/--n-docs/--seed) loads the committed
  target/ (tiny.EMBEDDED): no build, whatever LUME_CACHE holds.
- `olmo_dir` / `olmo`: a hub-shaped OLMo directory (real tokenizer, the released vocabulary and
  pad/EOS ids, two small layers trained briefly on real items) and its (model, tokenizer), built
  once per session (test_realscale, test_decode, test_evalspeed); `release`: the LUME items.
- `default_sigint`: preexec_fn for a child that a test interrupts with SIGINT (see its docstring).
Only `--slow` (or LUME_SLOW=1) runs the tests marked @pytest.mark.slow (minutes each).
The README runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`), one thread each (set
here, inherited by every process a test starts); a module whose tests share a run or a module fixture
is one `xdist_group`.
"""
import importlib
import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # CI has ../shared beside the checkout
sys.path.insert(0, str(ROOT))
STRICT = os.environ.get("LUME_CI") == "1"
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: two workers on two cores, one thread each, and
    os.environ["OMP_NUM_THREADS"] = "1"     # so every process they start (two spinning OpenMP pools on two cores stall)


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


def default_sigint():
    """preexec_fn for a child that must take SIGINT as from a terminal (KeyboardInterrupt): a suite
    started in the background (`python -m pytest &`, nohup, some CI runners) hands its children
    SIGINT ignored, and Python then installs no KeyboardInterrupt handler, so the child would ignore
    the test's Ctrl-C and run on."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (minutes each)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes on 2 cores; run with --slow or LUME_SLOW=1")
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist runs the group's tests on one worker")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow") or os.environ.get("LUME_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow (minutes on 2 cores): run with --slow or LUME_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared() -> Path:
    for name in ("lume-data", "mmlu", "olmo-tokenizer"):
        if not (SHARED / name).is_dir():
            missing(f"real data not found: {SHARED / name} (the LUME release, MMLU and the OLMo tokenizer "
                    f"go in a folder 'shared' beside the checkout: {SHARED})")
    return SHARED


# a hub-shaped OLMo (the released targets' vocabulary, pad 1 != EOS 50279, the real tokenizer), tiny weights
PAD, EOS = 1, 50279


def qa_items(release):
    """The items the hub-shaped model memorises: 8 questions of tasks 1 and 3 with their answers."""
    return [it for it in release if it.kind == "qa" and it.task in (1, 3)][:8]


@pytest.fixture(scope="session")
def olmo_dir(shared, tmp_path_factory):
    """A hub-shaped OLMo directory: real tokenizer, released-target config fields, tiny weights
    trained briefly on real items (tests/test_realscale.py, test_decode.py, test_evalspeed.py)."""
    import data
    import lume
    import tiny
    import torch
    from transformers import GenerationConfig, OlmoConfig, OlmoForCausalLM, PreTrainedTokenizerFast
    path = tmp_path_factory.mktemp("olmo") / "olmo-tiny"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(shared / "olmo-tokenizer" / "tokenizer.json"),
                                  eos_token="<|endoftext|>", pad_token="<|padding|>")
    assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (PAD, EOS, 50280)
    config = OlmoConfig(vocab_size=50304, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=4096, pad_token_id=PAD,
                        eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = OlmoForCausalLM(config)
    # short real items (questions and answers of tasks 1 and 3): a full-vocabulary head makes every
    # training token cost 50,304 logits, so the memorised items are few and short
    items = qa_items(data.load_lume(shared / "lume-data" / "lume"))
    seqs = [lume.encode_pair(tok, it.input, it.output)[0] for it in items]
    plan = lume.plan_steps(len(seqs), 0, 4, 1, 30, 0, 0, lengths=[len(s) for s in seqs])
    steps = [[(lume.make_batch([seqs[i] for i in f], [0] * len(f), f, PAD), None) for f, _ in micros]
             for micros in plan]
    lume.train(model, steps, tiny.finetune, lr=1e-2, warmup=5)
    model.generation_config = GenerationConfig(eos_token_id=EOS, pad_token_id=PAD)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def olmo(olmo_dir):
    """(model, tokenizer) of olmo_dir, loaded once: a test that changes it must change a copy."""
    import lume
    return lume.load_pretrained(str(olmo_dir))


@pytest.fixture(scope="session")
def release(shared):
    """The LUME release's items (data.load_lume)."""
    import data
    return data.load_lume(shared / "lume-data" / "lume")


# a small memorising target shared by the engine tests: seconds to build, cached per session
SMALL_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    vocab_size=512, max_position_embeddings=512)
SMALL_RECIPE = dict(epochs=20, lr=3e-3, warmup=5, batch_size=4)


@pytest.fixture(scope="session")
def small_data():
    import data
    return data.builtin(n_docs=2, seed=0)


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    """The session's cache of small tiny targets (small_target_dir's and small_tiny's builds)."""
    return tmp_path_factory.mktemp("small-cache")


@pytest.fixture(scope="session")
def small_target_dir(small_data, small_cache):
    """save_pretrained directory of a tiny OLMo trained briefly on 2 built-in documents per task/split
    (what `--model DIR --data builtin --n-docs 2` runs on, in a subprocess too)."""
    import tiny
    items, _ = small_data
    return tiny.tiny_target(items, small_cache, log=lambda s: None, recipe=SMALL_RECIPE, config=SMALL_CONFIG)


@pytest.fixture(scope="session")
def small_target(small_target_dir):
    """(model, tokenizer) of the small target."""
    import lume
    return lume.load_pretrained(str(small_target_dir))


@pytest.fixture
def small_tiny(monkeypatch, small_cache):
    """Make --model tiny build the small test target (seconds) instead of the default one, once per
    session and data (in small_cache, whatever cache directory the run names): with the built-in
    data, the same recipe and config give small_target_dir's fingerprint, so that build is reused."""
    import tiny
    build = tiny.tiny_target
    monkeypatch.setattr(tiny, "TINY", {**tiny.TINY, **SMALL_CONFIG})
    monkeypatch.setattr(tiny, "TINY_RECIPE", {**tiny.TINY_RECIPE, **SMALL_RECIPE})
    monkeypatch.setattr(tiny, "tiny_target", lambda items, cache_dir, **kw: build(items, small_cache, **kw))


# -----------------------------------------------------------------------------
# a Hugging Face cache laid down by the tests: `--model olmo-7b` offline, as after a download


@pytest.fixture(scope="session")
def hub_cache(shared, tmp_path_factory) -> Path:
    """A directory with hf/ (HF_HOME: a hub-shaped tiny OLMo under the real repo ids of olmo-7b and
    olmo-1b and their tokenizer repos, docs/repro/hub_cache.py, the real OLMo-0724 tokenizer copied
    in from ../shared), lume-cache/ (--cache-dir / LUME_CACHE: data/lume, data/mia and data/mmlu as
    fetch.py leaves them, copies of ../shared, verified against the pinned sha256 on every read),
    and the small inputs a quick run scores: mia-small/ (the first 4 official members and
    nonmembers) and mmlu-small/ (2 subjects). Never write into it."""
    import importlib.util
    import shutil
    spec = importlib.util.spec_from_file_location("hub_cache_repro", ROOT / "docs" / "repro" / "hub_cache.py")
    repro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(repro)
    root = tmp_path_factory.mktemp("hub")
    repro.lay_down(root / "hf", shared / "olmo-tokenizer" / "tokenizer.json")
    copy = lambda src, dst: shutil.copytree(src, dst, copy_function=shutil.copyfile)  # noqa: E731 (not ../shared's modes)
    copy(shared / "lume-data" / "lume", root / "lume-cache" / "data" / "lume")
    copy(shared / "lume-data" / "semeval25" / "mia_data", root / "lume-cache" / "data" / "mia")
    copy(shared / "mmlu", root / "lume-cache" / "data" / "mmlu")
    (root / "mia-small").mkdir()
    for name in ("member", "nonmember"):
        lines = (shared / "lume-data" / "semeval25" / "mia_data" / f"{name}.jsonl").read_text().splitlines()
        (root / "mia-small" / f"{name}.jsonl").write_text("\n".join(lines[:4]) + "\n")
    for split in ("dev", "test"):
        (root / "mmlu-small" / split).mkdir(parents=True)
        for subject in ("astronomy", "virology"):
            shutil.copyfile(shared / "mmlu" / split / f"{subject}_{split}.csv", root / "mmlu-small" / split / f"{subject}_{split}.csv")
    return root


@pytest.fixture
def hub_env(hub_cache, monkeypatch) -> Path:
    """This process and its children see hub_cache as a user's machine after a download, offline:
    HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE=1 in the environment (subprocesses), and in
    huggingface_hub's constants, which it reads once at import (in-process runs); LUME_CACHE at
    its data. Returns hub_cache."""
    from huggingface_hub import constants
    env = {"HF_HOME": str(hub_cache / "hf"), "HF_HUB_CACHE": str(hub_cache / "hf" / "hub"), "HF_HUB_OFFLINE": "1",
           "LUME_CACHE": str(hub_cache / "lume-cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache
