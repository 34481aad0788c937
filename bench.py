"""
LUME benchmark: the project's way of doing each job against the official / peers' way, same process.

    python bench.py                          # 200 LUME items, the bench model (built once, cached), CPU, < 10 min
    python bench.py --quick                  # smoke run, ~1.5 min: 40 items, 2 repeats (not the targets' setting)
    python bench.py --model tiny             # the project's tiny target (tiny.TINY) built on the bench items
    python bench.py --model olmo-1b --device cuda --out bench-1b.json   # any model lume.load_pretrained takes

Every figure is a ratio of two ways of doing the same work, measured in this process on the same
model and items, each way timed --repeats times (interleaved, after a warm-up) and the median kept.
  1. generation  generation.generate (length-sorted left-padded batches, KV cache) vs the official scorer's
                 loop: each item alone through model.generate (metrics.official_generate)
  2. MIA         membership.doc_stats (every statistic, length-sorted batches) vs model(ids, labels=ids).loss per
                 document; throughput against the matmul peak and the model's bare forward on the same batches
  3. training    a lume.train step of each declared method (methods.METHODS): time, ratio to GA's, tokens/s and
                 FLOP/s (6N a token forward+backward, 2N a token of a reference forward) as a fraction of the
                 matmul peak of the model's own Linear shapes, measured here (not RMU's: it runs layers 0..l)
  4. NPO         cached reference log-probs (methods.npo, ref_logps) vs a reference model run on every forget batch
  5. ROUGE-L     metrics.rouge_l_recall vs rouge_score 0.1.2 on every sc item of the LUME release
Identity checks are asserted inside the benchmark: a fast wrong path fails instead of reporting a figure.
Results: a markdown table on stdout and --out (bench.json), written atomically.
"""
import argparse
import collections
import contextlib
import copy
import functools
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import data
import evaluation
import generation
import gpureport
import lume
import membership
import methods
import metrics
import rundir
import tiny

LUME_DIR = Path(__file__).resolve().parent.parent / "shared" / "lume-data" / "lume"  # beside the checkout

# The bench model: OLMo architecture, hidden 512 so every Linear is a matmul of >= 512 x 512 and
# the matmuls, not Python or elementwise kernels, dominate a training step on a 2-core CPU.
# ~18M parameters (15.7M in matmuls: 4 blocks of 3.4M + a 2.1M LM head; the 2.1M input embedding is a lookup).
BENCH_CONFIG = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                    max_position_embeddings=1024, vocab_size=4096)
# Short recipe: enough for peaked next-token distributions (no argmax near-ties between batched and
# one-at-a-time decoding), not full memorisation; bump version on change (it is part of the cache key).
BENCH_RECIPE = dict(epochs=3, lr=2e-3, warmup=10, batch_size=8, seed=0, version=1)

TARGETS = {"generation_speedup": 10.0, "decode_peak_fraction": 0.5, "mia_speedup": 3.0, "mia_peak_fraction": 0.75, "ga_peak_fraction": 0.5, "npo_step_speedup": 1.3,
           "rouge_speedup": 1.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="bench", help="bench (BENCH_CONFIG, built and cached), tiny (tiny.TINY "
                   "target built on the items), olmo-1b, olmo-7b, a hub id or a local save_pretrained dir")
    p.add_argument("--data", default="auto", help="where the items come from: auto (the LUME release at "
                   f"{LUME_DIR} when present, else builtin), builtin, or a LUME / SemEval directory")
    p.add_argument("--items", type=int, default=200, help="LUME items (half sc, half qa) for generation and MIA")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median kept)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length, the same for both ways")
    p.add_argument("--gen-batch", type=int, default=32, help="prompts per generation.generate batch (run.py default)")
    p.add_argument("--train-batch", type=int, default=4, help="rows per forget / retain micro-batch (run.py default)")
    p.add_argument("--rouge-items", type=int, default=0, help="sc items scored for ROUGE (0 = every one)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--cache-dir", default=os.environ.get("LUME_CACHE", str(Path.home() / ".cache" / "lume")),
                   help="where the bench model is cached (env LUME_CACHE)")
    p.add_argument("--out", default="bench.json", help="json file with every figure")
    p.add_argument("--quick", action="store_true", help="40 items, 2 repeats, 16 new tokens, 300 ROUGE items")
    p.add_argument("--seed", type=int, default=0, help="item sampling and model building")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default, one per core)")
    p.add_argument("--gpu-report", action="store_true", help="the GPU evidence (gpureport.py): OLMo-1B/7B shapes, "
                   "random weights, < 8 min on one CUDA GPU; writes --out (default bench-gpu.json)")
    p.add_argument("--shapes", default="olmo-1b,olmo-7b", help="--gpu-report shapes: olmo-1b, olmo-7b, tiny")
    p.add_argument("--gpu-new-tokens", type=int, default=256, help="--gpu-report decode length per row")
    args = p.parse_args(argv)
    if args.quick:
        args.items, args.repeats, args.max_new_tokens = min(args.items, 40), min(args.repeats, 2), 16
        args.rouge_items = args.rouge_items or 300
    for name in ("items", "repeats", "max_new_tokens", "gen_batch", "train_batch"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.items < 8:
        p.error(f"--items must be >= 8 (forget and retain micro-batches), got {args.items}")
    return args

# -----------------------------------------------------------------------------
# timing: interleaved repeats, medians


sync = gpureport.sync  # waits for the device's queued work before a clock is read


def compare(ours, theirs, repeats: int, device, warm_ours=None, warm_theirs=None, also=None) -> dict:
    """Time two callables doing the same work (and any `also` {name: callable} beside them): one
    warm-up each, then `repeats` rounds, each round running every way (interleaved, so drifting
    background load hits them alike). Medians as "<name>_s", outputs as "<name>_out"."""
    ways = {"ours": ours, "theirs": theirs, **(also or {})}
    for fn in ({**ways, "ours": warm_ours or ours, "theirs": warm_theirs or theirs}).values():
        fn()
    times, out = {k: [] for k in ways}, {}
    for _ in range(repeats):
        for name, fn in ways.items():
            sync(device)
            t = time.perf_counter()
            out[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {**{f"{k}_s": v for k, v in med.items()}, "speedup": med["theirs"] / med["ours"],
            **{f"{k}_times": v for k, v in times.items()}, **{f"{k}_out": v for k, v in out.items()}}


def strip_outputs(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.endswith("_out")}

# -----------------------------------------------------------------------------
# items and model


def load_pool(source: str, n_docs: int, seed: int):
    """(every item of `source`, its name): a LUME / SemEval directory, or the built-in stand-in
    (n_docs documents per task and split); auto is the release beside the checkout if present."""
    if source == "auto":
        source = str(LUME_DIR) if LUME_DIR.is_dir() else "builtin"
    if source == "builtin":
        return data.builtin(n_docs=n_docs, seed=seed)[0], "builtin"
    return data.load_items(source), source


def bench_items(pool, n: int, seed: int):
    """n items drawn at random, half `sc` and half `qa`, both splits, in file order."""
    rng = random.Random(seed)
    sc = [i for i, it in enumerate(pool) if it.kind == "sc"]
    qa = [i for i, it in enumerate(pool) if it.kind == "qa"]
    k = min(n // 2, len(sc))
    pick = sorted(rng.sample(sc, k) + rng.sample(qa, min(n - k, len(qa))))
    return [pool[i] for i in pick]


def setup(args, device):
    """(pool, source, items, model, tok): the bench's release pool, its items and model, as main and docs/repro/ load them."""
    pool, source = load_pool(args.data, max(2, args.items // 6 + 1), args.seed)
    items = bench_items(pool, args.items, args.seed)
    return (pool, source, items, *load_model(args, items, device))


def load_model(args, items, device):
    """(model, tokenizer): the bench or tiny target built on `items` (cached), or any model
    lume.load_pretrained takes; fp32 weights, eval mode."""
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.model in ("bench", "tiny"):
        over = {} if args.model == "tiny" else {"recipe": BENCH_RECIPE, "config": BENCH_CONFIG}
        path = tiny.tiny_target(items, args.cache_dir, device=device, log=log, **over)
        model, tok = lume.load_pretrained(str(path))
    else:
        model, tok = lume.load_pretrained(args.model)
    return model.to(device).eval(), tok


def model_shape(model) -> dict:
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    # N of the 6N rule: parameters that take part in matmuls (an untied input embedding is a lookup)
    n_matmul = total - (emb.numel() if emb is not head else 0)
    return {"arch": type(model).__name__, "hidden": c.hidden_size, "intermediate": c.intermediate_size,
            "layers": c.num_hidden_layers, "heads": c.num_attention_heads, "vocab": c.vocab_size,
            "params": total, "matmul_params": n_matmul, "dtype": str(next(model.parameters()).dtype)}


def shape_str(s: dict) -> str:
    return (f"{s['arch']} {s['layers']}L x d{s['hidden']} (ffn {s['intermediate']}, {s['heads']} heads, "
            f"vocab {s['vocab']}), {s['params'] / 1e6:.1f}M params ({s['matmul_params'] / 1e6:.1f}M in matmuls), "
            f"{s['dtype'].replace('torch.', '')}")

# -----------------------------------------------------------------------------
# 1. generation and 2. MIA losses, against the official scorer's one-item loops (metrics.official_*)


def bench_generation(model, tok, items, args, device, peak: float) -> dict:
    prompts = [it.input for it in items]
    m = args.max_new_tokens
    official = lambda ps: [metrics.official_generate(model, tok, p, m) for p in ps]  # noqa: E731  (each prompt alone)
    r = compare(lambda: generation.generate(model, tok, prompts, m, batch_size=args.gen_batch), lambda: official(prompts),
                args.repeats, device, warm_theirs=lambda: official(prompts[:4]),
                warm_ours=lambda: generation.generate(model, tok, prompts[-args.gen_batch:], m, batch_size=args.gen_batch))
    ours, theirs = r["ours_out"], r["theirs_out"]
    diff = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert not diff, (f"generation: batched output differs from model.generate on {len(diff)}/{len(items)} "
                      f"items, first {items[diff[0]].id}: {ours[diff[0]]!r} vs {theirs[diff[0]]!r}")
    n = len(prompts)
    # the prompts' forward matmuls at peak: what batching cannot shrink (one prompt alone is one matmul)
    prompt_s = sum(2 * model_shape(model)["matmul_params"] * len(tok(p).input_ids) for p in prompts) / peak
    return {**strip_outputs(r), **decode_step(model, tok, prompts, args, device, peak), "items": n,
            "prompt_bound_s": prompt_s, "speedup_bound_free_decode": r["theirs_s"] / prompt_s,
            "max_new_tokens": m,
            "ours_items_per_s": n / r["ours_s"], "theirs_items_per_s": n / r["theirs_s"],
            "identical_outputs": True, "n_sc": sum(it.kind == "sc" for it in items)}


def decode_step(model, tok, prompts, args, device, peak: float) -> dict:
    """One decode step of a batch of gen_batch prompts (EOS suppressed: every row runs every step)
    against the time of its matmuls (2N FLOP per row) at the matmul peak measured in this run."""
    enc = [tok(p).input_ids for p in prompts[:args.gen_batch]]
    ids, attn = lume.left_pad(enc, lume.pad_of(tok))
    ids, attn, m = ids.to(device), attn.to(device), args.max_new_tokens
    one = lambda n: generation.greedy(model, ids, attn, n, [-1])  # noqa: E731  (-1: no id stops a row)
    s = compare(lambda: one(m + 1), lambda: one(1), args.repeats, device)  # minus the prefill and first token
    step = (s["ours_s"] - s["theirs_s"]) / m
    B, flop = len(enc), 2 * model_shape(model)["matmul_params"] * len(enc)
    # What a step cannot beat on this machine: its matmuls at the rate these shapes reach with B rows
    # (skinny: far below the peak of the training shapes), then its read of the cache's keys and
    # values (mean length over the m steps) at the copy bandwidth of a buffer that size.
    kv = gpureport.kv_bytes(model, B, ids.shape[1] + 1 + m // 2)
    rows_peak, bw = matmul_peak(model, B, args.repeats, device)["flop_per_s"], gpureport.copy_bandwidth(kv, device)
    bound = flop / rows_peak + kv / bw
    return {"decode_batch": B, "decode_step_s": step, "decode_matmul_s": flop / peak,
            "decode_peak_fraction": flop / peak / step, "decode_tokens_per_s": B / step,
            "decode_rows_flop_per_s": rows_peak, "decode_kv_bytes": kv, "copy_bytes_per_s": bw,
            "decode_bound_s": bound, "decode_bound_fraction": bound / step}


def bench_mmlu(model, tok, args, device, peak: float) -> dict:
    """evaluation.mmlu_records with each subject's shots computed once against whole prompts, on the
    first questions of a few subjects of the MMLU beside the LUME release (skipped without it)."""
    path = LUME_DIR.parent.parent / "mmlu"
    if not path.is_dir():
        return {"skipped": f"no MMLU at {path}"}
    dev, test = data.load_mmlu(path)
    n = 8 if args.quick else 16
    test = {s: test[s][:n] for s in sorted(test)[:4]}
    r = compare(lambda: evaluation.mmlu_records(model, tok, dev, test),
                lambda: evaluation.mmlu_records(model, tok, dev, test, share_prefix=False), args.repeats, device)
    assert r["ours_out"] == r["theirs_out"], "MMLU: the shared-prefix picks differ from the whole prompts'"
    q = sum(len(v) for v in test.values())
    tokens = 0
    for s, qs in test.items():
        prefix = evaluation.mmlu_prefix_ids(tok, s, dev[s], qs[0])
        enc = [evaluation.mmlu_encode(tok, s, dev[s], x) for x in qs]
        tokens += len(prefix) + sum(len(e) - len(prefix) if e[:len(prefix)] == prefix else len(e) for e in enc)
    bound = 2 * model_shape(model)["matmul_params"] * tokens / peak  # the forward tokens it must compute
    return {**strip_outputs(r), "questions": q, "prompts_per_s": q / r["ours_s"], "whole_prompts_per_s": q / r["theirs_s"],
            "forward_tokens": tokens, "peak_fraction": bound / r["ours_s"], "identical_picks": True}


@torch.inference_mode()
def bare_forward(model, tok, docs, device, batch_size: int = membership.MIA_ROWS, max_tokens: int = 0) -> None:
    """The model's own forward, `model(ids, attention_mask).logits`, over doc_stats' batches (the same
    arguments) and nothing computed from it: the ceiling of any batched scorer of this model (its
    attention and elementwise kernels, the padding), measured beside the statistics so their cost shows."""
    for _, b in membership.mia_batches(tok, docs, batch_size, max_tokens or membership.mia_tokens(device), device):
        model(input_ids=b.ids, attention_mask=b.attn, use_cache=False)


def bench_mia(model, tok, items, args, device, peak: float) -> dict:
    """membership.doc_stats (every statistic of mia.jsonl) vs the official loss alone: ours does more work.
    The model's bare forward over the same batches runs beside them in every round."""
    docs = [it.input + " " + it.output for it in items]  # how the official MIA documents are built
    memory = gpureport.mia_memory(model, tok, docs, device)  # the most tensor bytes alive at once, chunked and not
    stats = lambda d: [s["loss"] for s in membership.doc_stats(model, tok, d)]  # noqa: E731
    official = lambda d: [metrics.official_doc_loss(model, tok, x) for x in d]  # noqa: E731  (one document at a time)
    r = compare(lambda: stats(docs), lambda: official(docs), args.repeats, device, warm_ours=lambda: stats(docs[:16]),
                warm_theirs=lambda: official(docs[:16]), also={"forward": lambda: bare_forward(model, tok, docs, device)})
    err = max(abs(a - b) for a, b in zip(r["ours_out"], r["theirs_out"]))
    assert err <= 1e-5, f"MIA: batched losses differ from model(ids, labels=ids).loss by up to {err:.2e}"
    ntok = sum(len(tok(d).input_ids) for d in docs)
    flops = 2 * model_shape(model)["matmul_params"] * ntok  # forward only, the same matmuls every way
    return {**strip_outputs(r), **memory, "docs": len(docs), "tokens": ntok,
            "max_abs_diff": err, "ours_docs_per_s": len(docs) / r["ours_s"], "theirs_docs_per_s": len(docs) / r["theirs_s"],
            "ours_peak_fraction": flops / r["ours_s"] / peak, "theirs_peak_fraction": flops / r["theirs_s"] / peak,
            "forward_peak_fraction": flops / r["forward_s"] / peak, "ours_vs_forward": r["forward_s"] / r["ours_s"],
            "speedup_bound_at_peak": r["theirs_s"] / (flops / peak)}  # ours at 100% of the matmul peak

# -----------------------------------------------------------------------------
# 3. training steps per method, against the matmul peak of the model's shapes


def matmul_peak(model, rows: int, repeats: int, device, spin_s: float = 0.0) -> dict:
    """FLOP/s of torch.matmul over the model's own Linear shapes (rows x in @ in x out, each shape weighted by
    how often the model has it), in the model's dtype, best of repeats: the ceiling a step can reach. First
    `spin_s` seconds of matmuls: the cores come out of idle slowly (on the 2-core AMD EPYC the peak read
    144, 167, 171, 184, 191 GFLOP/s over a process's first 3 s, and dipped again after a 5 s sleep)."""
    shapes = collections.Counter((m.in_features, m.out_features) for m in model.modules()
                                 if isinstance(m, torch.nn.Linear))  # in order of first appearance
    dtype, flops, secs = next(model.parameters()).dtype, 0.0, 0.0
    for (k, n), count in shapes.items():
        x, w = torch.randn(rows, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        end, spin_s = time.perf_counter() + spin_s, 0.0
        while time.perf_counter() < end:
            torch.matmul(x, w), sync(device)
        reps = max(3, int(2e9 / (2 * rows * k * n)))  # ~2 GFLOP per timing, so small shapes are not noise
        times = []
        for _ in range(repeats + 1):
            sync(device)
            t = time.perf_counter()
            for _ in range(reps):
                torch.matmul(x, w)
            sync(device)
            times.append((time.perf_counter() - t) / reps)
        flops += count * 2 * rows * k * n
        # the best of the timings after the warm-up: a neighbour or a clock dip only ever slows one, so the
        # fastest is the ceiling (their median moved between 132 and 182 GFLOP/s from one quiet run to the next)
        secs += count * min(times[1:])
    return {"rows": rows, "shapes": {f"{k}x{n}": c for (k, n), c in shapes.items()}, "flop_per_s": flops / secs}


def train_batches(tok, items, bs: int):
    """(forget Batch, retain Batch, forget and retain encodings): the bs longest of each, encoded as run.py
    encodes them (answer-token mask): the longest rows carry most of a run's tokens, with little padding."""
    def longest(split):
        its = [it for it in items if it.split == split]
        assert its, f"no {split} items among the {len(items)} bench items; pass more --items"
        enc = [lume.encode_pair(tok, it.input, it.output) for it in its]
        idx = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))[-bs:]
        return lume.make_batch([enc[i][0] for i in idx], [enc[i][1] for i in idx], idx, tok.pad_token_id), enc
    (fb, fenc), (rb, renc) = longest("forget"), longest("retain")
    return fb, rb, fenc, renc


def time_steps(ways: dict, fb, rb, rounds: int, steps: int, device) -> dict:
    """{name: (median seconds of a lume.train optimizer step, step losses)} for ways {name: (model,
    loss_fn)} on the same batch. Each round runs every way in turn for `steps` steps; the first
    step of each run is a warm-up (AdamW state init) and is not timed. Several rounds interleave
    the ways, so drifting background load hits them alike. The models are trained (lr 1e-5)."""
    out = {}
    for _ in range(rounds):
        for name, (model, fn) in ways.items():
            stamps = []
            hist = lume.train(model, [[(fb, rb)]] * steps, fn, lr=1e-5, device=device,
                              log=lambda rec: (sync(device), stamps.append(time.perf_counter())))
            times, losses = out.setdefault(name, ([], []))
            times += [b - a for a, b in zip(stamps, stamps[1:])]
            losses += [h["loss"] for h in hist]
    return {name: (statistics.median(t), losses) for name, (t, losses) in out.items()}


def method_step(name: str, model, tok, fb, rb, fenc, renc, args, device):
    """(model copy, loss_fn, retain batch or None, extra forward-only tokens) of `name` as job.py builds it from its
    declaration: options as run.py resolves them (tiny's on bench's own models), its prepare; extra: see below."""
    spec, m, none = methods.METHODS[name], copy.deepcopy(model), contextlib.nullcontext()
    values = {k: d.tiny if args.model in ("bench", "tiny") else d.real
              for k, d in {**methods.SHARED_DEFAULTS, **spec.defaults}.items()}
    cfg = SimpleNamespace(**{**values, "rmu_layer": min(values.get("rmu_layer", 0), model.config.num_hidden_layers // 2)},
                          method=name, batch_size=args.train_batch, seed=args.seed)  # RMU's layer: in a small model too
    r = rb if methods.uses_retain(name, cfg.retain_weight) else None
    options = {k: getattr(cfg, f) for k, f in spec.options.items()}
    if spec.prepare is not None:
        options.update(spec.prepare(methods.Prep(
            cfg=cfg, model=m, tok=tok, plan=[[(fb.idx.tolist(), [] if r is None else r.idx.tolist())]], steps=[[(fb, r)]],
            retain=renc, autocast=none, dist=None, saved=None, each=lambda batches, label: batches,
            frozen_copy=lambda: copy.deepcopy(m).eval().requires_grad_(False),
            reference_logps=lambda b: lume.reference_logps(m, b, len(fenc), none),
            batch=lambda enc, i: lume.make_batch([enc[j][0] for j in i], [enc[j][1] for j in i], i, tok.pad_token_id))))
    fn, seen = functools.partial(spec.loss, **options), []
    if isinstance(options.get("ref"), torch.nn.Module):  # extra: its tokens forward (2N FLOPs each), counted untimed
        hook = options["ref"].register_forward_pre_hook(
            lambda mod, a, kw: seen.append(int(kw["attention_mask"].sum())), with_kwargs=True)
        with torch.no_grad():
            fn(m, fb.to(device), None if r is None else r.to(device), lume.step_totals([(fb, r)]))
        hook.remove()
    return m, fn, r, sum(seen)


def bench_training(model, tok, fb, rb, fenc, renc, args, device, peak: dict) -> dict:
    """A step of every declared method on one forget batch (and retain batch where it draws one): time, tokens/s,
    FLOP/s as a fraction of the matmul peak (not for one that picks what trains: RMU runs layers 0..l)."""
    N = model_shape(model)["matmul_params"]
    out = {"peak": peak, "forget_batch": list(fb.ids.shape), "retain_batch": list(rb.ids.shape)}
    for name, spec in methods.METHODS.items():
        m, fn, r, extra = method_step(name, model, tok, fb, rb, fenc, renc, args, device)
        dt, _ = time_steps({name: (m, fn)}, fb, r, 1, args.repeats + 1, device)[name]
        ntok = int(fb.attn.sum()) + (int(r.attn.sum()) if r is not None else 0)
        flops = 6 * N * ntok + 2 * N * extra
        out[name] = {"step_s": dt, "tokens": ntok, "tokens_per_s": ntok / dt, "flop_per_s": flops / dt,
                     "peak_fraction": None if spec.own_params else flops / dt / peak["flop_per_s"],
                     "extra_forward_tokens": extra}
    for name in methods.METHODS:  # cost per step relative to GA's
        out[name]["step_vs_ga"] = out[name]["step_s"] / out["ga"]["step_s"]
    return out

# -----------------------------------------------------------------------------
# 4. NPO: cached reference log-probs vs a reference model run on every forget batch


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bench_npo(model, tok, fb, rb, fenc, args, device) -> dict:
    """Both ways on the same forget (and retain) batch: pure NPO (retain weight 0, eq. 3 alone, where
    the reference enters) and NPO-RT (retain weight 3 with a retain batch, run.py's default)."""
    pad = tok.pad_token_id
    all_f = [lume.make_batch([fenc[i][0] for i in idx], [fenc[i][1] for i in idx], idx, pad).to(device)
             for idx in lume.length_batches([len(e[0]) for e in fenc], 32, 16384)]
    t = time.perf_counter()
    ref_logps = lume.reference_logps(model, all_f, len(fenc), contextlib.nullcontext())  # once, before training
    cache_s = time.perf_counter() - t
    ref = copy.deepcopy(model).eval().requires_grad_(False)  # the peers' second model

    def peers_npo(m, f, r, totals, retain_weight):
        with torch.no_grad():  # log pi_ref of this batch, from the held reference model
            lp = lume.seq_logps(ref, f).double()
        table = torch.zeros(len(fenc), dtype=torch.float64, device=lp.device).index_copy(0, f.idx, lp)
        return methods.npo(m, f, r, totals, beta=0.1, retain_weight=retain_weight, ref_logps=table)

    out = {"ref_cache_s": cache_s, "ref_cache_items": len(fenc)}
    for name, weight, r in (("npo", 0.0, None), ("npo_rt", 3.0, rb)):
        def ours_fn(m, f, rr, n, a=weight):  # the cached log pi_ref, looked up by item index
            return methods.npo(m, f, rr, n, beta=0.1, retain_weight=a, ref_logps=ref_logps)

        def peers_fn(m, f, rr, n, a=weight):
            return peers_npo(m, f, rr, n, a)
        ways = {"ours": (copy.deepcopy(model), ours_fn), "peers": (copy.deepcopy(model), peers_fn)}
        t = time_steps(ways, fb, r, args.repeats, 2, device)
        (ours_s, ours_loss), (peers_s, peers_loss) = t["ours"], t["peers"]
        err = max(abs(a - b) for a, b in zip(ours_loss, peers_loss))
        assert err <= 1e-4 * max(1.0, abs(ours_loss[0])), f"{name}: losses of the two ways differ by {err:.2e}"
        out[name] = {"ours_step_s": ours_s, "peers_step_s": peers_s, "speedup": peers_s / ours_s,
                     "max_loss_diff": err, "steps": len(ours_loss)}
    ours_b, peers_b = param_bytes(model) + ref_logps.numel() * ref_logps.element_size(), param_bytes(model) + param_bytes(ref)
    out.update(ours_bytes=ours_b, peers_bytes=peers_b, memory_ratio=peers_b / ours_b,
               retain_tokens=int(rb.attn.sum()))
    return out


# -----------------------------------------------------------------------------
# 5. ROUGE-L recall against rouge_score 0.1.2


def bench_rouge(pool, args) -> dict:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        return {"skipped": "rouge_score not installed (pip install rouge-score==0.1.2)"}
    sc = [it for it in pool if it.kind == "sc"]
    sc = sc[:args.rouge_items] if args.rouge_items else sc
    # expected output vs a candidate: the item's input (a long text with partial word overlap)
    pairs = [(it.output, it.input) for it in sc]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    theirs = lambda pairs=pairs: [scorer.score(r, c)["rougeL"].recall for r, c in pairs]  # noqa: E731

    def ours():
        metrics.porter_stem.cache_clear()  # every repeat starts cold, as a fresh scoring run does
        return [metrics.rouge_l_recall(r, c) for r, c in pairs]
    r = compare(ours, theirs, args.repeats, torch.device("cpu"), warm_theirs=lambda: theirs(pairs[:50]))
    bad = sum(a != b for a, b in zip(r["ours_out"], r["theirs_out"]))
    assert bad == 0, f"ROUGE-L: {bad}/{len(pairs)} values differ from rouge_score"
    return {**strip_outputs(r), "sc_items": len(sc), "pairs": len(pairs), "identical_values": True}

# -----------------------------------------------------------------------------
# report


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def table(res: dict) -> str:
    g, m, t, n, r = (res[k] for k in ("generation", "mia", "training", "npo", "rouge"))
    ok = lambda key: "yes" if res[key] is not None and res[key] >= TARGETS[key] else "**no**"  # noqa: E731
    rows = [
        ("1 generation", f"{g['ours_items_per_s']:.2f} items/s ({fmt_s(g['ours_s'])})",
         f"{g['theirs_items_per_s']:.2f} items/s ({fmt_s(g['theirs_s'])})",
         f"{g['speedup']:.2f}x", ">= 10x", ok("generation_speedup"), "outputs identical"),
        ("1 decode step, batch 32", f"{fmt_s(g['decode_step_s'])} ({g['decode_tokens_per_s']:.0f} tok/s)",
         f"matmuls at peak {fmt_s(g['decode_matmul_s'])}", f"{g['decode_peak_fraction']:.0%} of peak", ">= 50%",
         ok("decode_peak_fraction"), "EOS suppressed"),
        ("1 decode step, its kernels", fmt_s(g["decode_step_s"]),
         f"matmuls at {g['decode_rows_flop_per_s'] / 1e9:.0f} GFLOP/s + KV at {g['copy_bytes_per_s'] / 1e9:.0f} GB/s "
         f"{fmt_s(g['decode_bound_s'])}", f"{g['decode_bound_fraction']:.0%} of bound", "", "",
         f"{g['decode_kv_bytes'] / 2**20:.0f} MiB of keys and values"),
        ("2 MIA statistics", f"{m['ours_docs_per_s']:.1f} docs/s ({fmt_s(m['ours_s'])})",
         f"{m['theirs_docs_per_s']:.1f} docs/s ({fmt_s(m['theirs_s'])}), loss only", f"{m['speedup']:.2f}x", ">= 3x",
         ok("mia_speedup"), f"loss max diff {m['max_abs_diff']:.1e}"),
        ("2 MIA statistics, matmuls", f"{m['tokens']} tokens", f"bare forward {m['forward_peak_fraction']:.0%} of peak",
         f"{m['ours_peak_fraction']:.0%} of peak", ">= 75%", ok("mia_peak_fraction"), f"{m['ours_vs_forward']:.0%} of the bare forward's speed"),
        ("2 MIA statistics memory", f"{m['peak_bytes'] / 2**20:.0f} MiB peak", f"{m['unchunked_peak_bytes'] / 2**20:.0f} "
         "MiB whole logits", f"{m['unchunked_peak_bytes'] / max(m['peak_bytes'], 1):.1f}x less", "", "", "live tensor bytes"),
    ]
    q = res.get("mmlu", {})
    if "prompts_per_s" in q:
        rows.append(("6 MMLU prompts", f"{q['prompts_per_s']:.1f} prompts/s ({fmt_s(q['ours_s'])})",
                     f"{q['whole_prompts_per_s']:.1f} prompts/s", f"{q['speedup']:.2f}x", "", "",
                     f"picks identical; {q['peak_fraction']:.0%} of peak"))
    if "full_eval_s" in res.get("projection", {}):
        rows.append(("7 projection", f"{res['projection']['full_eval_s'] / 60:.1f} min full LUME evaluation", "", "",
                     "", "", "both stages, MIA, MMLU at these rates"))
    for meth in methods.METHODS:
        x = t[meth]
        frac = "n/a" if x["peak_fraction"] is None else f"{x['peak_fraction']:.0%} of peak"
        rows.append((f"3 train step {meth.upper()}",
                     f"{fmt_s(x['step_s'])}, {x['tokens_per_s']:.0f} tok/s, {x['flop_per_s'] / 1e9:.1f} GFLOP/s",
                     f"peak {t['peak']['flop_per_s'] / 1e9:.1f} GFLOP/s", frac,
                     ">= 50%" if meth == "ga" else "", ok("ga_peak_fraction") if meth == "ga" else "",
                     f"step {x['step_vs_ga']:.2f}x GA's"))
    for key, label in (("npo", "4 NPO step"), ("npo_rt", "4 NPO-RT step")):
        x = n[key]
        rows.append((label, fmt_s(x["ours_step_s"]), fmt_s(x["peers_step_s"]), f"{x['speedup']:.2f}x",
                     ">= 1.3x" if key == "npo" else "", ok("npo_step_speedup") if key == "npo" else "",
                     f"losses equal ({x['max_loss_diff']:.0e})"))
    rows.append(("4 NPO param memory", f"{n['ours_bytes'] / 2**20:.1f} MiB", f"{n['peers_bytes'] / 2**20:.1f} MiB",
                 f"{n['memory_ratio']:.2f}x", "", "", "one model vs two"))
    if "skipped" in r:
        rows.append(("5 ROUGE-L", "", "", "skipped", ">= 1x", "", r["skipped"]))
    else:
        rows.append(("5 ROUGE-L", fmt_s(r["ours_s"]), fmt_s(r["theirs_s"]), f"{r['speedup']:.2f}x", ">= 1x",
                     ok("rouge_speedup"), f"{r['pairs']} values identical"))
    head = ("row", "ours", "official / peers", "figure", "target", "met", "identity check")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows] + [""] + notes(res))


def notes(res: dict) -> list[str]:
    """Why a figure is where it is, from quantities measured in this run."""
    m, n, t = res["mia"], res["npo"], res["training"]
    f, r = t["npo"]["tokens"] - n["retain_tokens"], n["retain_tokens"]
    g = res["generation"]
    return [
        f"- Generation: the prompts' forward matmuls alone take {fmt_s(g['prompt_bound_s'])} at the matmul peak, "
        f"and no batching shrinks them: even with free decoding the speedup would be at most "
        f"{g['speedup_bound_free_decode']:.1f}x. A batch-{g['decode_batch']} decode step's matmuls have "
        f"{g['decode_batch']} rows and reach {g['decode_rows_flop_per_s'] / 1e9:.0f} GFLOP/s, not the "
        f"{res['matmul_peak_flop_per_s'] / 1e9:.0f} of the training shapes, and it reads "
        f"{g['decode_kv_bytes'] / 2**20:.0f} MiB of keys and values: its own kernels need "
        f"{fmt_s(g['decode_bound_s'])}, so {g['decode_matmul_s'] / g['decode_bound_s']:.0%} of the peak is the most it can reach.",
        f"- MIA: both ways run the same forward matmuls ({m['tokens']} tokens); one document at a time "
        f"already reaches {m['theirs_peak_fraction']:.0%} of the matmul peak, the batched way "
        f"{m['ours_peak_fraction']:.0%}: at 100% of peak the speedup would be {m['speedup_bound_at_peak']:.2f}x. The model's "
        f"bare forward over the same batches (logits only: its attention, elementwise kernels and padding) reaches "
        f"{m['forward_peak_fraction']:.0%}, the ceiling of any batched scorer of this model.",
        f"- NPO: the peers' extra work is one no-grad forward of the forget batch, 2N per token against "
        f"6N for the step: by FLOPs 1.33x for pure NPO, {1 + 2 * f / (6 * (f + r)):.2f}x for NPO-RT (its retain "
        f"forward+backward is the same both ways); the measured ratio is higher where that forward's non-matmul "
        f"work (full-vocabulary log-softmax, attention) weighs more than in a step.",
    ]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.gpu_report:
        out = args.out if args.out != "bench.json" else "bench-gpu.json"
        sys.exit(gpureport.run(args.device, args.shapes, out, args.gpu_new_tokens))
    t0 = time.time()
    lume.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = lume.pick_device(args.device)
    pool, source, items, model, tok = setup(args, device)
    shape = model_shape(model)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    say(f"bench: {len(items)} items from {source}; model {shape_str(shape)}; {device}, "
        f"{torch.get_num_threads()} threads; {args.repeats} repeats")
    res = {"device": str(device), "model": args.model, "shape": shape, "shape_str": shape_str(shape),
           "items": len(items), "data": source, "repeats": args.repeats, "argv": sys.argv if argv is None else argv,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine()}
    fb, rb, fenc, renc = train_batches(tok, items, args.train_batch)
    peak = matmul_peak(model, fb.ids.numel(), args.repeats, device, spin_s=3.0)  # rows = the GA step's B x T
    for name, fn in (("mia", lambda: bench_mia(model, tok, items, args, device, peak["flop_per_s"])),
                     ("generation", lambda: bench_generation(model, tok, items, args, device, peak["flop_per_s"])),
                     ("training", lambda: bench_training(model, tok, fb, rb, fenc, renc, args, device, peak)),
                     ("npo", lambda: bench_npo(model, tok, fb, rb, fenc, args, device)),
                     ("rouge", lambda: bench_rouge(pool, args)),
                     ("mmlu", lambda: bench_mmlu(model, tok, args, device, peak["flop_per_s"]))):
        t = time.time()
        res[name] = fn()
        say(f"bench: {name} done in {time.time() - t:.0f}s")
    r = res["rouge"]
    res["projection"] = gpureport.project(res)
    res.update(decode_peak_fraction=res["generation"]["decode_peak_fraction"], generation_speedup=res["generation"]["speedup"], mia_speedup=res["mia"]["speedup"], mia_peak_fraction=res["mia"]["ours_peak_fraction"],
               npo_step_speedup=res["npo"]["npo"]["speedup"], npo_rt_step_speedup=res["npo"]["npo_rt"]["speedup"],
               npo_memory_ratio=res["npo"]["memory_ratio"], ga_peak_fraction=res["training"]["ga"]["peak_fraction"],
               rouge_speedup=None if "skipped" in r else r["speedup"], matmul_peak_flop_per_s=peak["flop_per_s"], targets=TARGETS,
               identity_checks={"generation": True, "mia": True, "npo_losses": True, "rouge": "skipped" not in r},
               elapsed_s=time.time() - t0)
    rundir.write_json_atomic(args.out, res)
    print(f"model: {shape_str(shape)}; {len(items)} items ({source}); device {device}; "
          f"{args.repeats} repeats, medians; {res['elapsed_s']:.0f}s total\n")
    print(table(res))
    return res


if __name__ == "__main__":
    main()
