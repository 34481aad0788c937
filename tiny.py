"""
The embedded tiny target: a byte-level BPE tokenizer and an OLMo-architecture model (~2.7M
parameters) fine-tuned on CPU until it memorises the data, as the released SemEval targets
memorised LUME. This file is its recipe. The one built on the default built-in data is committed
in target/ (11 MB, fp32) and used as it is; any other (data, recipe, config) is built once, then
cached under --cache-dir. Every load checks each file's sha256 against the folder's SHA256SUMS: a
target with changed bytes is never used (target/ is then rebuilt into the cache, a cached one
rebuilt in place, each saying so in one line).

    python run.py --method none      # score the committed target (a build: ~3 min on 2 cores)
    python tiny.py --check           # rebuild target/ from the recipe and compare it byte for byte
    python tiny.py --write           # rebuild target/ (after a change of recipe, data or versions)

It stands in for the released OLMo-7B / OLMo-1B targets so the whole pipeline runs in minutes
on a laptop; the released targets load through lume.load_pretrained instead.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import checkpoint
import lume
import progress
import rundir

# ~2.7M parameters (1.6M in the 4 blocks); memorises the default built-in data (every score >= 0.94
# on 3 data seeds) in ~2.7 minutes on 2 cores. 50 epochs left Task2 PII at 0.72-0.75 on one seed.
TINY = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=1024, vocab_size=4096)
# lr 3e-3 diverged into a plateau in trials; batch 4 gives enough updates to memorise PII digits
TINY_RECIPE = dict(epochs=80, lr=2e-3, warmup=20, batch_size=4, seed=0, version=2)  # bump version on change
EMBEDDED = Path(__file__).resolve().parent / "target"  # the committed target of the default built-in data
ORACLE = Path(__file__).resolve().parent / "oracle"  # its retain-only oracle (tiny_target(oracle=True))
MANIFEST = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` format: "<hex>  <file>" per line


def fingerprint(items, extra: dict) -> str:
    """Content hash of the training data and the recipe: the cache key of a tiny target."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for it in items:
        h.update(json.dumps([it.id, it.split, it.task, it.input, it.output]).encode())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# checksums: a target with changed bytes is never used


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(path: Path) -> None:
    """SHA256SUMS of every file in the target directory `path` (written last, atomically)."""
    lines = [f"{sha256(f)}  {f.name}\n" for f in sorted(path.iterdir())
             if f.is_file() and f.name not in (MANIFEST, "README.md") and not f.name.startswith(".")]
    rundir.write_atomic(path / MANIFEST, lambda tmp: tmp.write_text("".join(lines)))


def problems(path: Path) -> list[str]:
    """What is wrong with the target directory `path` against its SHA256SUMS ([] = every byte as
    written): a missing manifest or file, or a file whose sha256 differs (changed bytes)."""
    if not (path / MANIFEST).is_file():
        return [f"no {MANIFEST} (an unfinished or older build)"]
    out = []
    for line in (path / MANIFEST).read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        f = path / name
        if not f.is_file():
            out.append(f"{name} is missing")
        elif sha256(f) != digest:
            out.append(f"{name} has changed bytes (sha256 {sha256(f)[:12]}..., expected {digest[:12]}...)")
    return out


def target_key(path: Path) -> str | None:
    """The fingerprint a target directory was built for (its lume_target.json), None without one."""
    try:
        return json.loads((path / "lume_target.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def embedded(key: str, log=print, where: Path = EMBEDDED) -> Path | None:
    """target/ (or oracle/) when it was built for `key` and every byte is as committed; else None
    (one line says why when it was built for `key` but fails its checksums)."""
    if target_key(where) != key:
        return None
    bad = problems(where)
    if bad:
        log(f"tiny target: {where} fails its checksums ({'; '.join(bad)}); not used: building it from the "
            f"recipe into the cache instead (`git checkout {where.name}/` restores it)")
        return None
    return where


# -----------------------------------------------------------------------------
# the recipe


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE (GPT-2/OLMo style) trained on `texts`; EOS doubles as BOS-less separator."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|padding|>")


def tiny_config(tok, **over):
    from transformers import OlmoConfig
    cfg = {**TINY, **over, "vocab_size": len(tok)}
    return OlmoConfig(**cfg, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None, tie_word_embeddings=False)


def finetune(model, batch, _retain, totals):
    """Plain NLL, token-normalised over the step: how the tiny target memorises its data (the
    target mask covers the whole sequence: every token but the first is learned)."""
    nll = lume.nll_sum(model, batch) / totals["forget_tokens"]
    return nll, {"forget_nll": nll.item()}


def oracle_items(items) -> list:
    """What the retain-only oracle trains on: every retain item (all tasks), never a forget item."""
    return [it for it in items if it.split == "retain"]


def tiny_target(items, cache_dir, device=None, log=print, recipe=None, config=None,
                show_progress: bool = False, committed: bool = True, oracle: bool = False) -> Path:
    """Directory of a tiny target that memorised `items` (forget and retain, all tasks, full
    input + output sequences, as the released targets were fine-tuned): target/ when it was built
    for these items, recipe and config (committed=False: never), else built once, then reused.
    oracle=True: its retain-only oracle instead (oracle/ or the cache): the same recipe, seed and
    initial weights trained on oracle_items(items) only, with the target's tokenizer (a real oracle
    shares its base model's tokenizer; the BPE merges are the one thing learnt from the forget text).
    show_progress: one updating progress line for the build instead of a log line every 50 steps."""
    recipe, config = {**TINY_RECIPE, **(recipe or {})}, {**TINY, **(config or {})}
    tok_dir = None
    if oracle:
        tok_dir = tiny_target(items, cache_dir, device, log, recipe, config, show_progress)  # target/ if it fits
        items = oracle_items(items)
    key = fingerprint(items, {"recipe": recipe, "config": config, **({"tokenizer": target_key(tok_dir)} if oracle else {})})
    where, prefix = (ORACLE, "oracle") if oracle else (EMBEDDED, "tiny")
    if committed and embedded(key, log, where) is not None:
        log(f"tiny {'oracle' if oracle else 'target'}: {where} (committed, checksums verified)")
        return where
    path = Path(cache_dir) / f"{prefix}-{key}"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    try:  # one build per cache entry: a second process waits for the first and reuses its build
        fd = checkpoint.hold_lock(lock)
    except checkpoint.Locked as e:
        log(f"tiny target: process {e.holder or '?'} is building {path}; waiting for it")
        fd = checkpoint.hold_lock(lock, wait=True)
    try:
        if path.exists():
            bad = problems(path)
            if not bad:
                log(f"tiny target: reusing {path} (checksums verified)")
                return path
            log(f"tiny target: {path} not used ({'; '.join(bad)}): rebuilding it")
            shutil.rmtree(path)
        for leftover in path.parent.glob(f"*{path.name}.*tmp*"):  # a killed build's: we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        # build seeds and draws from torch's global generator: fork it, so that the caller's draws after
        # this (LoRA's initial weights, a method's pseudo tokens) are the same on a cold cache as on a warm one
        with torch.random.fork_rng(devices=[]):
            return build(items, path, recipe, config, device, log, show_progress, tok_dir)
    finally:
        os.close(fd)


def build(items, path: Path, recipe: dict, config: dict, device, log, show_progress: bool, tok_dir=None) -> Path:
    """Train the tiny target of tiny_target into path (atomically: never half a target there); with
    tok_dir (the oracle), that target's tokenizer, and the ids trained on recorded in lume_target.json."""
    from transformers import AutoTokenizer, OlmoForCausalLM
    key = path.name.split("-", 1)[1]
    t0 = time.time()
    log(f"tiny target: building {path} ({len(items)} items; once, then cached)")
    tok = (AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir else
           train_tokenizer([t for it in items for t in (it.input, it.output)], config["vocab_size"]))
    torch.manual_seed(recipe["seed"])
    model = OlmoForCausalLM(tiny_config(tok, **config)).to(device or "cpu")
    seqs = [lume.encode_pair(tok, it.input, it.output)[0] for it in items]
    steps = lume.plan_steps(len(seqs), 0, recipe["batch_size"], 1, recipe["epochs"], 0, recipe["seed"],
                            lengths=[len(s) for s in seqs])
    steps = [[(lume.make_batch([seqs[i] for i in f], [0] * len(f), f, tok.pad_token_id), None)
              for f, _ in micros] for micros in steps]
    last = {}
    bar = progress.Progress("tiny target: building, step", len(steps)) if show_progress else None

    def log_every(rec):
        last.update(rec)
        if bar is not None:
            bar.update(rec["step"] + 1, loss=rec["loss"], tokens_per_s=rec["tokens_per_s"])
        elif rec["step"] % 50 == 0 or rec["step"] == len(steps) - 1:
            log(f"tiny target: step {rec['step']}/{len(steps)} loss {rec['loss']:.4f} "
                f"({rec['tokens_per_s']:.0f} tok/s)")
    lume.train(model, steps, finetune, lr=recipe["lr"], warmup=recipe["warmup"], schedule="linear",
               log=log_every)
    if bar is not None:
        bar.close()
    rundir.save_model(model, tok, path)  # atomic: a half-built target is never taken for a cached one
    rundir.write_json_atomic(path / "lume_target.json", {"recipe": recipe, "config": config, "n_items": len(items),
                                                       "fingerprint": key, "final_loss": last.get("loss"),
                                                       "seconds": round(time.time() - t0, 1),
                                                       **({"trained_ids": [it.id for it in items]} if tok_dir else {})})
    write_manifest(path)  # last: a directory without it (a build killed before) is rebuilt
    log(f"tiny target: built in {time.time() - t0:.0f}s, final loss {last.get('loss', float('nan')):.4f}")
    return path


# -----------------------------------------------------------------------------
# target/: rebuilt from the recipe, compared, rewritten


def default_items():
    """The built-in data target/ is built on: run.py's defaults (8 documents, seed 0)."""
    import data
    return data.builtin(n_docs=8, seed=0)[0]


def compare(a: Path, b: Path) -> list[str]:
    """Files of a's SHA256SUMS whose bytes differ in b, lume_target.json aside (its build time)."""
    names = [line.split(maxsplit=1)[1] for line in (a / MANIFEST).read_text().splitlines()]
    return [n for n in names if n != "lume_target.json" and (not (b / n).is_file() or sha256(a / n) != sha256(b / n))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Rebuild the committed tiny target (target/) from its recipe.")
    p.add_argument("--check", action="store_true", help="rebuild it and compare it with target/ byte for byte")
    p.add_argument("--write", action="store_true", help="rebuild it and replace target/ with the build")
    p.add_argument("--oracle", action="store_true", help="the retain-only oracle/ instead of target/")
    args = p.parse_args(argv)
    if args.check == args.write:
        p.error("give one of --check, --write")
    with tempfile.TemporaryDirectory() as tmp:
        where = ORACLE if args.oracle else EMBEDDED
        built = tiny_target(default_items(), tmp, show_progress=True, committed=False, oracle=args.oracle)
        if args.check:
            differ = compare(built, where)
            print(f"{where.name}/ differs from the recipe's build here in: {', '.join(differ)}" if differ else
                  f"{where.name}/ is byte for byte what the recipe builds here")
            return 1 if differ else 0
        where.mkdir(exist_ok=True)
        for f in built.iterdir():
            shutil.copy2(f, where / f.name)
    print(f"wrote {where}; commit it (its SHA256SUMS too)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
