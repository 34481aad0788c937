"""
The GPU evidence in one command: random-weight OLMo-1B and OLMo-7B shapes (memory.OLMO_CONFIGS, the
released OLMo-*-0724-hf config fields) built on one CUDA GPU, no hub access, in under 8 minutes.

    python bench.py --gpu-report                                  # one CUDA GPU -> bench-gpu.json
    python bench.py --gpu-report --device cpu --shapes tiny       # the same code on a tiny shape (CI)

Sections, each measured in this run and printed as a table, all written to bench-gpu.json:
  peak      bf16 (fp32 on CPU) matmul FLOP/s on 4096-sized products, device copy bytes/s
  memory    memory.py's plan against torch.cuda.max_memory_allocated, every setup of memory.SETUPS
            (npo, batch 4 x 512): a setup whose plan does not fit is skipped with the plan's words
  train     one optimizer step per method in the setup the plan picks: tokens/s and the fraction
            of the matmul peak (6N FLOP per token, + 2N per token of a reference forward for kl)
  adamw     lume.StochasticAdamW's step on bf16 weights against torch's fused AdamW on fp32 weights
  decode    generation.greedy (static cache, the step in a CUDA graph) at batch 1, 32 and 128, EOS
            suppressed so every row runs `new_tokens`, against the official loop (model.generate one
            prompt at a time); each step's time against its matmuls' time at the peak and against
            reading the weights once at the copy bandwidth
  identity  batched against one-at-a-time decoding on identical prompts: rows that differ, bf16
            (counted, not hidden) and fp32 (expected 0)
  projection the full LUME evaluation of the 7B (two scoring stages, MIA, MMLU) from these rates
A time guard skips what would not finish within the budget, saying so. A section that fails (an
out-of-memory the plan did not foresee, an op this torch lacks) is one error row, and bench-gpu.json
is rewritten after every section: one device session always yields what ran, even if killed.
"""
import gc
import os
import statistics
import time

import torch

import generation
import gpuplan
import lume
import membership
import memory
import methods
import rundir

SHAPES = {"olmo-1b": memory.OLMO_CONFIGS["olmo-1b"], "olmo-7b": memory.OLMO_CONFIGS["olmo-7b"],
          "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       vocab_size=512, tie_word_embeddings=False, max_position_embeddings=1024, pad_token_id=1,
                       eos_token_id=None, bos_token_id=None)}
TRAIN_ROWS = {"tiny": (2, 32)}  # (batch, seq_len) of the memory and training rows; the OLMo shapes: 4 x 512
TRAIN_METHODS = ("ga", "gd", "kl", "npo")  # the train section's
GiB = 2**30
CPU_FREE = 80 * GiB  # the card --device cpu plans for


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def guarded(what: str, fn, say, device):
    """fn(), or {"error": one line} if it raises: on a GPU lent for minutes, one section's failure
    (an out-of-memory the plan missed, an op this torch lacks) becomes a row beside the others
    instead of a traceback that loses the report. The failed section's memory is released first."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (KeyboardInterrupt and SystemExit still end the report)
        say(f"gpu-report: {what} failed ({lume.first_line(e)})")
        return {"error": lume.first_line(e)}
    finally:
        if device.type == "cuda":
            gc.collect()  # frames of the failed section, and cycles, hold its tensors
            torch.cuda.empty_cache()


def held_bytes(device) -> int:
    """Bytes held by live tensors: torch.cuda.memory_allocated on CUDA; on CPU, every tensor Python
    can reach (gc), each storage once, meta tensors not counted. A leak between sections shows in it."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    seen = {}
    for t in gc.get_objects():
        try:
            if issubclass(type(t), torch.Tensor) and t.device.type == "cpu":  # type(): no __class__ of a proxy
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, a tracing wrapper)
            pass
    return sum(seen.values())


def clean(device) -> dict:
    """A section's start from a clean device: the last section's captured steps (they hold its model
    and caches) released, cycles collected, cached blocks returned and the peak reset; its baseline
    (held_bytes, which every memory figure of the section is measured from) and the free memory."""
    generation.GRAPHS["steps"].clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else CPU_FREE
    return {"baseline_bytes": held_bytes(device), "free_bytes": free}


def peak_over(device, base: int) -> int:
    """The section's peak, less its baseline (CUDA; 0 on CPU, which has no peak counter)."""
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0


def timed(fn, device, repeats: int = 3) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peaks(device, dtype, n: int) -> dict:
    """Matmul FLOP/s of (n x n) @ (n x n) in dtype, and copy bytes/s (read + write) of n*n*16 bytes."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    s = timed(lambda: [torch.matmul(a, b) for _ in range(10)], device) / 10
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "matmul_flop_per_s": 2 * n ** 3 / s,
            "copy_bytes_per_s": copy_bandwidth(n * n * 16, device)}


def copy_bandwidth(nbytes: int, device) -> float:
    """Bytes/s (read + write) of copying a buffer of nbytes: the memory rate at that working-set
    size (a large last-level cache makes it depend on the size)."""
    x = torch.randn(max(nbytes // 4, 1 << 16), device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (timed(lambda: [y.copy_(x) for _ in range(10)], device) / 10)


def matmul_params(model) -> int:
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters()) - emb.numel()  # the input embedding is a lookup

# -----------------------------------------------------------------------------
# memory plan against measured, and training steps


def random_batches(vocab: int, batch: int, seq_len: int, steps: int, retain: bool, device):
    rows = lambda: lume.Batch(torch.randint(0, vocab, (batch, seq_len)), torch.ones(batch, seq_len, dtype=torch.long),  # noqa: E731
                              torch.ones(batch, seq_len), torch.arange(batch))
    return [[(rows(), rows() if retain else None)] for _ in range(steps)]


def train_setup(config, method: str, setup_name: str, batch: int, seq_len: int, device, steps: int = 3) -> dict:
    """steps optimizer steps of method in one of memory.SETUPS on random weights: the plan against
    the measured peak, and the median step time after the first."""
    setup = next(s for n, _, s in memory.SETUPS if n == setup_name)
    plan = memory.plan_setup(config, method, batch, seq_len, setup)
    cuda, base = device.type == "cuda", clean(device)["baseline_bytes"]
    model = memory.build_random(config, setup, device)
    weights = held_bytes(device) - base if cuda else sum(p.numel() * p.element_size() for p in model.parameters())
    options = {"ga": {}, "gd": dict(retain_weight=1.0), "kl": dict(retain_weight=1.0),
               "npo": dict(beta=0.1, retain_weight=1.0, ref_logps=torch.zeros(batch, device=device))}[method]
    if method == "kl":
        import copy
        options["ref"] = copy.deepcopy(model).eval().requires_grad_(False)
    loss, stamps = methods.METHODS[method].loss, []

    def after(done, opt, scaler):
        sync(device)
        stamps.append(time.perf_counter())
    lume.train(model, random_batches(config["vocab_size"], batch, seq_len, steps, methods.needs_retain(method), device),
               lambda m, f, r, totals: loss(m, f, r, totals, **options), lr=1e-5, precision=setup["precision"],
               device=device, after_step=after)
    peak = peak_over(device, base)
    step_s = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    tokens = batch * seq_len * (2 if methods.needs_retain(method) else 1)
    flops = 6 * matmul_params(model) * tokens + (2 * matmul_params(model) * batch * seq_len if method == "kl" else 0)
    if setup["train_layers"] or setup["lora_rank"]:  # a frozen base: no weight gradients below (backward ~1/2 as much)
        flops = None
    del model, options
    return {"setup": setup_name, "planned_bytes": plan["total"], "measured_peak_bytes": peak, "baseline_bytes": base,
            "planned_weights": plan["weights"], "measured_weights": weights,
            "plan_error": (peak - plan["total"]) / plan["total"] if cuda else None,
            "step_s": step_s, "tokens_per_s": tokens / step_s, "flops": flops}


def memory_section(name, config, device, free: int, say, budget) -> dict:
    """Every setup of memory.SETUPS for npo, batch 4 x 512: planned against measured."""
    out, (batch, seq) = {}, TRAIN_ROWS.get(name, (4, 512))
    for setup_name, words, setup in memory.SETUPS:
        plan = memory.plan_setup(config, "npo", batch, seq, setup)
        room = free - memory.reserve(free)
        if plan["total"] > room:
            out[setup_name] = {"skipped": f"plan {plan['total'] / GiB:.1f} GiB > {room / GiB:.1f} GiB free after the "
                                          f"reserve ({words})"}
        elif budget():
            out[setup_name] = {"skipped": "time budget"}
        else:
            out[setup_name] = guarded(f"{name} memory {setup_name}", lambda s=setup_name: train_setup(
                config, "npo", s, batch, seq, device, steps=2), say, device)
        say(f"gpu-report: {name} memory {setup_name}: {fmt_row(out[setup_name])}")
    return out


def train_section(name, config, device, free: int, peak: float, say, budget) -> dict:
    """One optimizer step per method in the setup the plan picks (as job.py picks it)."""
    out, (batch, seq) = {}, TRAIN_ROWS.get(name, (4, 512))
    for method in TRAIN_METHODS:
        try:
            pick, _, _ = memory.pick_setup(config, method, batch, seq, free)
        except memory.NoSetupFits as e:
            out[method] = {"skipped": str(e)}
            continue
        if budget():
            out[method] = {"skipped": "time budget"}
            continue
        r = guarded(f"{name} train {method}", lambda m=method, s=pick: train_setup(config, m, s, batch, seq, device),
                    say, device)
        if "error" not in r:
            r["peak_fraction"] = r["flops"] / r["step_s"] / peak if r["flops"] else None
        out[method] = r
        say(f"gpu-report: {name} train {method}: {fmt_row(r)}")
    return out


def fmt_row(r: dict) -> str:
    if "skipped" in r or "error" in r:
        return "skipped: " + r["skipped"] if "skipped" in r else "error: " + r["error"]
    frac = f", {r['peak_fraction']:.0%} of peak" if r.get("peak_fraction") else ""
    err = f" ({r['plan_error']:+.0%})" if r.get("plan_error") is not None else ""
    return (f"{r['setup']}: planned {r['planned_bytes'] / GiB:.2f} GiB, measured {r['measured_peak_bytes'] / GiB:.2f}"
            f"{err}; step {r['step_s'] * 1e3:.0f} ms, {r['tokens_per_s']:.0f} tok/s{frac}")


def adamw_section(config, device, free: int) -> dict:
    """The optimizer step alone on the shape's parameters: StochasticAdamW over bf16 weights and
    states against torch's fused AdamW over fp32 ones (the two full-parameter setups), on as many
    decoder layers as the fp32 step fits in `free`, measured at the section's start (adamw_layers);
    cached blocks are returned between the two. An out-of-memory is a result with its numbers (the
    layers tried, the bytes planned, free and held at the time), not a failed report."""
    from transformers import AutoModelForCausalLM, OlmoConfig
    layers, (rest, layer) = gpuplan.adamw_layers(config, free), gpuplan.adamw_counts(config)
    if layers == 0:
        return {"skipped": f"fp32 AdamW of one layer beside the embeddings does not fit {free / GiB:.1f} GiB free"}
    out = {"layers": layers, "of_layers": config["num_hidden_layers"], "free_bytes": free}
    for label, dtype, make in (("stochastic_adamw_bf16", torch.bfloat16, lambda p: lume.StochasticAdamW(p, lr=1e-5)),
                               ("torch_fused_adamw_fp32", torch.float32,
                                lambda p: torch.optim.AdamW(p, lr=1e-5, fused=True))):
        planned = (rest + layers * layer) * 4 * dtype.itemsize  # weights, gradients, two states
        base = clean(device)["baseline_bytes"]  # the bf16 run's cached blocks returned before the fp32 one
        try:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(OlmoConfig(**{**config, "num_hidden_layers": layers}), dtype=dtype)
            params = list(model.parameters())
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            opt = make(params)
            out[label] = {"step_s": timed(opt.step, device), "planned_bytes": planned,
                          "measured_peak_bytes": peak_over(device, base)}
        except torch.OutOfMemoryError as e:
            out[label] = {"out_of_memory": lume.first_line(e), "layers": layers, "planned_bytes": planned,
                          "free_bytes": free, "held_bytes": held_bytes(device) - base}
            return out  # the other optimizer needs as much or more: the result stands as it is
        finally:
            model = params = opt = None  # noqa: F841  (released before the next one is built)
    out["ratio"] = out["stochastic_adamw_bf16"]["step_s"] / out["torch_fused_adamw_fp32"]["step_s"]
    return out

# -----------------------------------------------------------------------------
# decoding


def eval_model(config, device, dtype):
    from transformers import AutoModelForCausalLM, GenerationConfig, OlmoConfig
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(OlmoConfig(**config), dtype=dtype).eval()
    model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=1)  # EOS suppressed
    return model


def kv_bytes(model, rows: int, positions: int) -> int:
    """memory.kv_bytes of this model's config in its weights' dtype: beside the weights, a decode
    step's memory traffic (the 7B's fixed-shape step at batch 32 reads 32 x 320 positions: 5.4 GB of
    keys and values against 13.8 GB of weights)."""
    return memory.kv_bytes(model.config, rows, positions, next(model.parameters()).element_size())


def prompts(vocab: int, n: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, length), generator=g)


def official_one(model, ids, new_tokens: int):
    """The official scorer's loop for one prompt: model.generate, greedy, EOS never stops it."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=1)[0, ids.shape[1]:]


def decode_plan(model, B: int, new_tokens: int, prompt_len: int) -> int:
    """Bytes a decode batch of equal prompts adds to the weights (memory.decode_bytes: one fixed-shape
    step of B rows x capacity and the prefill's own cache), in the weights' dtype."""
    return memory.decode_bytes(model.config, B, prompt_len, new_tokens, next(model.parameters()).element_size(),
                               generation.ROUND_TO)


def decode_section(model, device, batches, new_tokens: int, prompt_len: int, peak: dict, say, budget,
                   free: int) -> dict:
    vocab, N = model.config.vocab_size, matmul_params(model)
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    no_stop = [-1]  # an id no step produces: every row runs new_tokens
    one = prompts(vocab, 1, prompt_len).to(device)
    off_s = timed(lambda: official_one(model, one, new_tokens), device, repeats=1)
    out = {"official_tokens_per_s": new_tokens / off_s, "new_tokens": new_tokens, "prompt_len": prompt_len,
           "weight_bytes": wbytes, "graphs_off": None}
    C = generation.capacity(prompt_len, new_tokens, generation.ROUND_TO)
    for B in batches:
        need, room = decode_plan(model, B, new_tokens, prompt_len), free - memory.reserve(free) - wbytes
        if need > room or budget():
            out[f"batch_{B}"] = {"skipped": "time budget" if need <= room else
                                 f"keys and values {need / GiB:.2f} GiB > {room / GiB:.2f} GiB free beside the weights "
                                 "and the reserve"}
            continue

        def batch(B=B):
            ids = prompts(vocab, B, prompt_len).to(device)
            attn = torch.ones_like(ids)
            s = timed(lambda: generation.greedy(model, ids, attn, new_tokens, no_stop), device, repeats=1)
            step = s / new_tokens  # the prefill is one step's worth of weight reads: folded in
            return {"tokens_per_s": B * new_tokens / s, "step_s": step,
                    "vs_official": B * new_tokens / s / out["official_tokens_per_s"],
                    "decode_peak_fraction": 2 * N * B / peak["matmul_flop_per_s"] / step,
                    "weight_read_fraction": wbytes / peak["copy_bytes_per_s"] / step,
                    # the fixed-shape step reads every one of its C cache columns, filled or not
                    "bytes_fraction": (wbytes + kv_bytes(model, B, C)) / peak["copy_bytes_per_s"] / step}
        r = out[f"batch_{B}"] = guarded(f"decode batch {B}", batch, say, device)
        generation.GRAPHS["steps"].clear()  # this batch's captured steps hold its cache
        if "error" not in r:
            say(f"gpu-report: decode batch {B}: {r['tokens_per_s']:.0f} tok/s, step {r['step_s'] * 1e3:.2f} ms, "
                f"{r['vs_official']:.1f}x the official loop")
    out["graphs_off"] = generation.GRAPHS["off"]
    return out


def identity_section(model, device, n: int, new_tokens: int) -> dict:
    """Rows whose greedy tokens differ between one batch of n mixed-length prompts and each alone."""
    vocab = model.config.vocab_size
    enc = [prompts(vocab, 1, 8 + 5 * i, seed=i)[0].tolist() for i in range(n)]
    ids, attn = lume.left_pad(enc, 1)
    batched = generation.greedy(model, ids.to(device), attn.to(device), new_tokens, [-1]).cpu()
    alone = [generation.greedy(model, torch.tensor([e], device=device), torch.ones(1, len(e), dtype=torch.long,
                               device=device), new_tokens, [-1]).cpu()[0] for e in enc]
    diff = [i for i in range(n) if not torch.equal(batched[i], alone[i])]
    first = [int((batched[i] != alone[i]).nonzero()[0]) for i in diff]
    # continuous batching (generate's path on this device): n prompts through n // 4 slots, a stop id
    # taken from prompt 0's output so rows end at different steps and prompts enter beside running rows
    stop = int(alone[0][new_tokens // 2])
    stream = generation.greedy_static_stream if generation.static_default(model, device) else generation.greedy_stream
    streamed = stream(model, enc, 1, new_tokens, [stop], max(1, n // 4), 16384, device).cpu()
    want = [torch.where(torch.cumsum(a == stop, 0) > 0, stop, a) for a in alone]  # stop[0] after the stop id
    ends = {int((w == stop).nonzero()[0]) if (w == stop).any() else new_tokens for w in want}
    return {"prompts": n, "new_tokens": new_tokens, "rows_differing": len(diff), "first_difference_at": first,
            "stream_rows_differing": sum(not torch.equal(streamed[i], want[i]) for i in range(n)),
            "stream_row_ends": len(ends),
            "stream": stream.__name__}


def projection(decode: dict, prefill_tokens_per_s: float | None) -> dict:
    """Seconds of one full LUME evaluation: two stages of generation (prefill + decode), MIA and MMLU
    (forward tokens at the prefill rate), each stage as measured here. On CUDA a stage decodes with
    continuous batching on fixed shapes (greedy_static_stream): gpuplan.FULL_EVAL's decode_steps at the
    batch-32 step time measured on a cache of 320 positions, the shape of 63% of those steps (the
    rest attend over up to 576: 11.9k row-positions a step on average against 10.2k measured).
    `generation_s_per_stage_full_rows` counts only the tokens, every step with 32 live rows.
    `full_eval_s_batch_128`: the decode at the batch-128 step time, as many live rows a step as at 32
    (gpuplan.ASSUMED's live_fraction; an 80 GB card's scoring plan decodes at 128 or more)."""
    d = decode.get("batch_32", {})
    if "tokens_per_s" not in d:
        return {"skipped": "no batch-32 decode rate"}
    if not prefill_tokens_per_s:
        return {"skipped": "no prefill rate"}
    f = gpuplan.FULL_EVAL
    prefill = f["prompt_tokens"] / prefill_tokens_per_s
    gen = prefill + f["decode_steps"] * d["step_s"]
    mia = f["mia_tokens"] / prefill_tokens_per_s
    mmlu = (f["mmlu_suffix_tokens"] + f["mmlu_prefix_tokens"]) / prefill_tokens_per_s
    d128 = decode.get("batch_128", {})
    gen128 = prefill + f["new_tokens"] / (gpuplan.ASSUMED["live_fraction"] * 128) * d128["step_s"] if "step_s" in d128 else None
    return {"generation_s_per_stage": gen, "generation_s_per_stage_full_rows": prefill + f["new_tokens"] / d["tokens_per_s"],
            "mia_s_per_stage": mia, "mmlu_s_per_stage": mmlu, "full_eval_s": 2 * (gen + mia + mmlu), "counts": f,
            "full_eval_s_batch_128": 2 * (gen128 + mia + mmlu) if gen128 else None}


def prefill_rate(model, device, rows: int = 8, length: int = 512) -> float:
    ids = prompts(model.config.vocab_size, rows, length).to(device)
    with torch.inference_mode():
        s = timed(lambda: model(input_ids=ids, logits_to_keep=1, use_cache=False), device)  # MIA/MMLU: no KV cache
    return rows * length / s

# -----------------------------------------------------------------------------
# bench.py's memory and projection figures (CPU or GPU)


def peak_tensor_bytes(fn):
    """(fn(), the most bytes of tensor storage that fn's own ops held alive at once): every aten op's
    outputs are counted once per storage (views share it) until their storage is freed. Exact and
    the same on every run, unlike the process's RSS growth (0.9 to 94 MiB for the same work, as the
    allocator and the thread pools held more or less from before); what a kernel allocates inside itself
    is not seen."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    live, now, top = {}, [0], [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for k in [k for k, (ref, _) in live.items() if ref.expired()]:  # freed since the last op
                now[0] -= live.pop(k)[1]
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in live:
                    st = t.untyped_storage()
                    live[st._cdata] = (StorageWeakRef(st), st.nbytes())
                    now[0] += st.nbytes()
            top[0] = max(top[0], now[0])
            return out
    with Count():
        out = fn()
    return out, top[0]


def mia_memory(model, tok, docs, device) -> dict:
    """Peak memory of membership.doc_stats (every MIA statistic) in chunks, and in one chunk per batch:
    torch's allocator on CUDA, the tensors alive at once elsewhere (peak_tensor_bytes)."""
    out = {}
    for key, chunk in (("peak_bytes", membership.MIA_CHUNK), ("unchunked_peak_bytes", 0)):
        fn = lambda c=chunk: membership.doc_stats(model, tok, docs, chunk=c)  # noqa: E731
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            out[key] = torch.cuda.max_memory_allocated(device) - base
        else:
            out[key] = peak_tensor_bytes(fn)[1]
    return out


def project(res: dict) -> dict:
    """Seconds of one full LUME evaluation of this model at the rates measured here: two stages of
    generation (gpuplan.FULL_EVAL's token counts at the batch-32 decode rate), MIA at the batched
    docs' tokens/s, MMLU at the measured prompts/s."""
    f, g, m, q = gpuplan.FULL_EVAL, res["generation"], res["mia"], res.get("mmlu", {})
    if "prompts_per_s" not in q:
        return {"skipped": "no MMLU rate"}
    gen = f["items"] / g["ours_items_per_s"] * (f["new_tokens"] / f["items"]) / g["max_new_tokens"]
    mia = f["mia_tokens"] / (m["tokens"] / m["ours_s"])
    mmlu = f["mmlu_questions"] / q["prompts_per_s"]
    return {"generation_s_per_stage": gen, "mia_s_per_stage": mia, "mmlu_s_per_stage": mmlu,
            "full_eval_s": 2 * (gen + mia + mmlu)}


# -----------------------------------------------------------------------------
# the report


def run(device: str = "auto", shapes: str = "olmo-1b,olmo-7b", out: str = "bench-gpu.json", new_tokens: int = 256,
        batches=(1, 32, 128), limit_s: float = 420.0) -> int:
    """The whole report; 2 (one line) without CUDA unless --device cpu. Every section starts from a
    clean device (clean) and records its baseline_bytes and free_bytes."""
    if device != "cpu":  # before CUDA is initialised: blocks grow in place instead of splitting cached ones
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if device == "auto" and not torch.cuda.is_available():
        print("error: --gpu-report needs a CUDA GPU (none is visible to torch); --device cpu --shapes tiny runs "
              "the same code on a tiny shape")
        return 2
    dev = lume.pick_device(device)
    names = [s for s in shapes.split(",") if s]
    bad = [s for s in names if s not in SHAPES]
    if bad:
        print(f"error: --shapes: unknown {bad[0]!r} (known: {', '.join(SHAPES)})")
        return 2
    t0 = time.time()
    budget = lambda: time.time() - t0 > limit_s  # noqa: E731  (what starts after this is skipped)
    say = lambda s: print(s, flush=True)  # noqa: E731
    cuda = dev.type == "cuda"
    start = clean(dev)
    low = torch.bfloat16 if cuda else torch.float32  # bf16 matmuls on CPU are emulated: fp32 there
    res = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "free_bytes": start["free_bytes"],
           "baseline_bytes": start["baseline_bytes"], "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
           "shapes": {}, "plans": gpuplan.plans(say)}
    res["peak"] = peaks(dev, low, 4096 if cuda else 256)
    say(f"gpu-report: {res['device']}, torch {res['torch']}; matmul {res['peak']['matmul_flop_per_s'] / 1e12:.3g} "
        f"TFLOP/s ({res['peak']['dtype']}), copy {res['peak']['copy_bytes_per_s'] / 1e9:.3g} GB/s")
    peak = res["peak"]["matmul_flop_per_s"]
    write = lambda: rundir.write_json_atomic(out, res)  # noqa: E731  (after every section: a kill keeps what ran)
    for name in names:
        config = SHAPES[name]
        r = res["shapes"][name] = {"config": config}
        held = {}  # the low-precision model, from decode to identity_low

        def section(key, fn, needs_model=False):
            if needs_model and "model" not in held:
                r[key] = {"skipped": "no model (the decode row says why)"}
                return
            c = clean(dev)
            say(f"gpu-report: {name} {key}: from a clean device, {c['baseline_bytes'] / 2**20:.1f} MiB held, "
                f"{c['free_bytes'] / GiB:.2f} GiB free")
            r[key] = guarded(f"{name} {key}", lambda: fn(c["free_bytes"]), say, dev)
            r[key].update(baseline_bytes=c["baseline_bytes"], free_bytes=c["free_bytes"])
            write()

        def decode(free):
            held["model"] = eval_model(config, dev, low)
            return decode_section(held["model"], dev, batches, new_tokens, 64, res["peak"], say, budget, free)
        section("memory", lambda free: memory_section(name, config, dev, free, say, budget))
        section("train", lambda free: train_section(name, config, dev, free, peak, say, budget))
        section("adamw", lambda free: {"skipped": "time budget"} if budget() else adamw_section(config, dev, free))
        section("decode", decode)
        section("prefill", lambda free: {"tokens_per_s": prefill_rate(held["model"], dev, rows=8,
                                                                      length=512 if cuda else 64)}, True)
        section("identity_low", lambda free: identity_section(held["model"], dev, 8, 32 if cuda else 8), True)
        held.clear()  # the model goes before the next section's clean
        section("projection", lambda free: projection(r["decode"], r.get("prefill", {}).get("tokens_per_s")))
        if not budget() and name != "olmo-7b":  # fp32 identity: expected 0 rows (7B in fp32 takes 28 GB: skipped)
            section("identity_fp32", lambda free: identity_section(eval_model(config, dev, torch.float32), dev, 8,
                                                                   32 if cuda else 8))
    end = clean(dev)  # what the last section left: its steps and model released, as between sections
    res.update(elapsed_s=time.time() - t0, end_baseline_bytes=end["baseline_bytes"])
    write()
    print(table(res))
    errors = errors_in(res)
    print(f"\n{res['elapsed_s']:.0f}s; written to {out}" + (f"; {errors} section(s) failed (error rows)" if errors else ""))
    return 1 if errors else 0


def adamw_row(a: dict) -> str:
    oom = [(k, v) for k, v in a.items() if isinstance(v, dict) and "out_of_memory" in v]
    if oom:
        k, v = oom[0]
        return (f"{k}: out of memory on {v['layers']} of {a['of_layers']} layers, {v['planned_bytes'] / GiB:.1f} GiB "
                f"planned of {v['free_bytes'] / GiB:.1f} GiB free at the section's start, {v['held_bytes'] / GiB:.1f} "
                f"GiB held when it failed ({v['out_of_memory']})")
    return fmt_row(a) if "ratio" not in a else (
        f"{a['stochastic_adamw_bf16']['step_s'] * 1e3:.1f} ms vs {a['torch_fused_adamw_fp32']['step_s'] * 1e3:.1f} ms"
        f" ({a['ratio']:.2f}x), on {a['layers']} of {a['of_layers']} layers ({a['free_bytes'] / GiB:.1f} GiB free)")


def errors_in(x) -> int:
    """How many error rows a report holds, at any depth."""
    if isinstance(x, dict):
        return ("error" in x) + sum(errors_in(v) for v in x.values())
    return 0


def table(res: dict) -> str:
    """The report as a Markdown table; a section that failed, was skipped or was not reached (a
    report written before the run ended) is one row saying so."""
    lines = [f"GPU report: {res['device']}, torch {res['torch']}, transformers {res['transformers']}; matmul peak "
             f"{res['peak']['matmul_flop_per_s'] / 1e12:.3g} TFLOP/s {res['peak']['dtype']}, copy "
             f"{res['peak']['copy_bytes_per_s'] / 1e9:.3g} GB/s", "", "| shape | row | figure |", "|---|---|---|"]
    for name, r in res["shapes"].items():
        row = lambda what, text: lines.append(f"| {name} | {what} | {text} |")  # noqa: E731
        get = lambda key: r.get(key, {"skipped": "not reached"})  # noqa: E731
        for key, what in (("memory", "memory npo"), ("train", "train step")):
            if "skipped" in get(key) or "error" in get(key):
                row(what, fmt_row(get(key)))
                continue
            for k, v in r[key].items():
                if isinstance(v, dict):  # beside the rows: the section's baseline_bytes and free_bytes
                    row(f"{what} {k}", fmt_row(v))
        row("StochasticAdamW bf16 vs fused AdamW fp32", adamw_row(get("adamw")))
        d = get("decode")
        if "official_tokens_per_s" not in d:
            row("decode", fmt_row(d))
            d = {}
        else:
            row("decode, official loop", f"{d['official_tokens_per_s']:.0f} tok/s (batch 1, one at a time)")
        for k, v in d.items():
            if k.startswith("batch_"):
                row(f"decode {k.replace('_', ' ')}", fmt_row(v) if "tokens_per_s" not in v else
                    f"{v['tokens_per_s']:.0f} tok/s, {v['vs_official']:.1f}x official, step {v['step_s'] * 1e3:.2f} ms; "
                    f"matmuls at peak {v['decode_peak_fraction']:.0%} of it, weight read {v['weight_read_fraction']:.0%}")
        if d.get("graphs_off"):
            row("CUDA graphs", f"off: {d['graphs_off']}")
        for k in ("identity_low", "identity_fp32"):
            if k in r:
                i = r[k]
                row(f"batched vs alone ({res['peak']['dtype'] if k == 'identity_low' else 'float32'})", fmt_row(i) if "prompts" not in i else
                    f"{i['rows_differing']}/{i['prompts']} rows differ ({i['new_tokens']} tokens); "
                    f"{i['stream']}: {i['stream_rows_differing']}/{i['prompts']}")
        base = [f"{k} {v['baseline_bytes'] / 2**20:.1f}" for k, v in r.items() if isinstance(v, dict) and "baseline_bytes" in v]
        row("MiB held at each section's start", ", ".join(base))
        p = get("projection")
        row("projected full LUME evaluation", fmt_row(p) if "full_eval_s" not in p else
            f"{p['full_eval_s'] / 60:.1f} min (generation {p['generation_s_per_stage']:.0f} s, MIA "
            f"{p['mia_s_per_stage']:.0f} s, MMLU {p['mmlu_s_per_stage']:.0f} s per stage; generation "
            f"{p['generation_s_per_stage_full_rows']:.0f} s with every step full)"
            + (f"; {p['full_eval_s_batch_128'] / 60:.1f} min decoding at batch 128" if p.get("full_eval_s_batch_128") else ""))
    return "\n".join(lines)
