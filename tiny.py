"""
The embedded tiny target: a byte-level BPE tokenizer and an OLMo-architecture model (~2.7M
parameters) fine-tuned on CPU until it memorises the data, as the released SemEval targets
memorised LUME. Built once per (data, recipe, config), then cached under --cache-dir.

    python run.py --method none      # build (first time, ~3 min on 2 cores) and score it

It stands in for the released OLMo-7B / OLMo-1B targets so the whole pipeline runs in minutes
on a laptop; the released targets load through lume.load_pretrained instead.
"""
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

import checkpoint
import lume
import progress

# ~2.7M parameters (1.6M in the 4 blocks); memorises the default built-in data (every score >= 0.94
# on 3 data seeds) in ~2.7 minutes on 2 cores. 50 epochs left Task2 PII at 0.72-0.75 on one seed.
TINY = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=1024, vocab_size=4096)
# lr 3e-3 diverged into a plateau in trials; batch 4 gives enough updates to memorise PII digits
TINY_RECIPE = dict(epochs=80, lr=2e-3, warmup=20, batch_size=4, seed=0, version=2)  # bump version on change


def fingerprint(items, extra: dict) -> str:
    """Content hash of the training data and the recipe: the cache key of a tiny target."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for it in items:
        h.update(json.dumps([it.id, it.split, it.task, it.input, it.output]).encode())
    return h.hexdigest()[:16]


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


def tiny_target(items, cache_dir, device=None, log=print, recipe=None, config=None,
                show_progress: bool = False) -> Path:
    """Directory of a tiny target that memorised `items` (forget and retain, all tasks, full
    input + output sequences, as the released targets were fine-tuned); built once, then reused.
    show_progress: one updating progress line for the build instead of a log line every 50 steps."""
    recipe, config = {**TINY_RECIPE, **(recipe or {})}, {**TINY, **(config or {})}
    path = Path(cache_dir) / f"tiny-{fingerprint(items, {'recipe': recipe, 'config': config})}"
    if (path / "model.safetensors").exists():
        log(f"tiny target: reusing {path}")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    try:  # one build per cache entry: a second process waits for the first and reuses its build
        fd = checkpoint.hold_lock(lock)
    except checkpoint.Locked as e:
        log(f"tiny target: process {e.holder or '?'} is building {path}; waiting for it")
        fd = checkpoint.hold_lock(lock, wait=True)
    try:
        if (path / "model.safetensors").exists():
            log(f"tiny target: reusing {path} (built meanwhile by another process)")
            return path
        for leftover in path.parent.glob(f"*{path.name}.*tmp*"):  # a killed build's: we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        return build(items, path, recipe, config, device, log, show_progress)
    finally:
        os.close(fd)


def build(items, path: Path, recipe: dict, config: dict, device, log, show_progress: bool) -> Path:
    """Train the tiny target of tiny_target into path (atomically: never half a target there)."""
    from transformers import OlmoForCausalLM
    t0 = time.time()
    log(f"tiny target: building {path} ({len(items)} items; once, then cached)")
    tok = train_tokenizer([t for it in items for t in (it.input, it.output)], config["vocab_size"])
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
    lume.save_model(model, tok, path)  # atomic: a half-built target is never taken for a cached one
    lume.write_json_atomic(path / "lume_target.json", {"recipe": recipe, "config": config, "n_items": len(items),
                                                       "final_loss": last.get("loss"), "seconds": time.time() - t0})
    log(f"tiny target: built in {time.time() - t0:.0f}s, final loss {last.get('loss', float('nan')):.4f}")
    return path
