"""The committed tiny target (target/): the default run uses it without building, it memorises
every built-in item, and no target with changed bytes is ever used (committed: rebuilt into the
cache; cached: rebuilt in place), each time said in one line. That it memorises every item is
test_run.py's test of the README's first command; the slow test here rebuilds it from the recipe
and compares it byte for byte."""
import shutil

import pytest
import torch

import lume
import tiny
from conftest import SMALL_CONFIG


class Built(Exception):
    """Raised in place of lume.train: the code went on to build a target."""


def no_build(*a, **k):
    raise Built


def flip_byte(path, offset: int = -100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_default_run_takes_the_committed_target_without_building(tmp_path, monkeypatch):
    logs = []
    monkeypatch.setattr(lume, "train", no_build)
    assert tiny.problems(tiny.EMBEDDED) == []  # every byte as SHA256SUMS says
    path = tiny.tiny_target(tiny.default_items(), tmp_path, log=logs.append)
    assert path == tiny.EMBEDDED and list(tmp_path.iterdir()) == [], logs
    assert logs == [f"tiny target: {tiny.EMBEDDED} (committed, checksums verified)"]
    with pytest.raises(Built):  # other data (another seed): not the committed target's, built
        import data
        tiny.tiny_target(data.builtin(n_docs=8, seed=1)[0], tmp_path, log=logs.append)


def test_a_changed_byte_in_the_committed_target_is_never_used(tmp_path, monkeypatch):
    copy = tmp_path / "target"
    shutil.copytree(tiny.EMBEDDED, copy)
    monkeypatch.setattr(tiny, "EMBEDDED", copy)
    monkeypatch.setattr(lume, "train", no_build)
    items = tiny.default_items()
    assert tiny.tiny_target(items, tmp_path / "cache", log=lambda s: None) == copy  # intact: used
    flip_byte(copy / "model.safetensors")
    logs = []
    with pytest.raises(Built):  # changed: it goes on to build from the recipe
        tiny.tiny_target(items, tmp_path / "cache", log=logs.append)
    assert len([s for s in logs if "checksums" in s]) == 1, logs  # said in one line
    assert "model.safetensors has changed bytes" in logs[0] and "not used" in logs[0], logs
    (copy / "model.safetensors").unlink()
    assert tiny.problems(copy) == ["model.safetensors is missing"]


def test_a_changed_byte_in_a_cached_target_is_found_and_it_is_rebuilt_the_same(small_data, tmp_path):
    """The recipe is deterministic on this CPU: the rebuild is byte for byte the first build."""
    items, _ = small_data
    kw = dict(recipe={"epochs": 2, "batch_size": 8}, config=SMALL_CONFIG)
    path = tiny.tiny_target(items, tmp_path, log=lambda s: None, **kw)
    sums = (path / tiny.MANIFEST).read_text()
    assert "model.safetensors" in sums and "tokenizer.json" in sums and tiny.problems(path) == []
    for name, offset in (("model.safetensors", -100), ("tokenizer.json", 200)):
        flip_byte(path / name, offset)
        assert len(tiny.problems(path)) == 1 and name in tiny.problems(path)[0]
        logs = []
        assert tiny.tiny_target(items, tmp_path, log=logs.append, **kw) == path
        assert sum("not used" in s and f"{name} has changed bytes" in s for s in logs) == 1, logs
        assert tiny.problems(path) == [] and tiny.compare(path, path) == []
        assert [line for line in (path / tiny.MANIFEST).read_text().splitlines() if "lume_target" not in line] == \
               [line for line in sums.splitlines() if "lume_target" not in line]  # rebuilt bit for bit
    (path / tiny.MANIFEST).unlink()  # a build killed before its manifest: rebuilt, never trusted
    logs = []
    tiny.tiny_target(items, tmp_path, log=logs.append, **kw)
    assert any("no SHA256SUMS" in s for s in logs) and tiny.problems(path) == []


@pytest.fixture(scope="module")
def committed():
    return lume.load_pretrained(str(tiny.EMBEDDED))


def test_the_committed_target_is_fp32_and_says_what_built_it(committed):
    import json
    model, _ = committed
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    meta = json.loads((tiny.EMBEDDED / "lume_target.json").read_text())
    assert meta["recipe"] == tiny.TINY_RECIPE and meta["config"] == tiny.TINY and meta["n_items"] == 160
    assert 2.5e6 < sum(p.numel() for p in model.parameters()) < 3e6


@pytest.mark.slow
def test_the_recipe_rebuilds_the_committed_target_byte_for_byte(tmp_path):
    """`python tiny.py --check`: minutes on 2 cores. Bit for bit only with the same kernels (CPU
    ISA, thread count, torch/tokenizers versions) as the build in target/README.md."""
    built = tiny.tiny_target(tiny.default_items(), tmp_path, log=lambda s: None, committed=False)
    assert tiny.compare(tiny.EMBEDDED, built) == []
