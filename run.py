"""
Unlearn a LUME target and score it before and after, as the SemEval-2025 Task 4 scorer does.

    python run.py --task 1 --method npo                     # tiny embedded target on built-in data (CPU)
    python run.py --task 1 --method npo --model olmo-7b     # the released 7B target on the real benchmark
                                                            # (data fetched, verified, cached on first use)
    torchrun --nproc_per_node 2 run.py ...                   # the same run, FSDP2-sharded

The configuration is the dataclass below: every field is a --flag with its default and help in
one place. A run directory gets config.json, log.jsonl, generations.jsonl, mia.jsonl,
results.json (official keys under "before" and "after") and, with --save, a checkpoint.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data
import dist as distributed
import evaluation
import fetch
import lume
import methods
import tiny


def arg(default, help: str, **extra):
    """A Config field: its default, its --help text and any argparse extras (choices)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class Config:
    task: str = arg("1", "what is unlearned: 1, 2, 3 or all (evaluation covers every task)",
                    choices=["1", "2", "3", "all"])
    method: str = arg("npo", "unlearning method; none scores the target as it is",
                      choices=["ga", "gd", "kl", "npo", "none"])
    model: str = arg("tiny", "tiny (built locally), olmo-1b, olmo-7b, a hub id or a local "
                             "save_pretrained directory")
    data: str = arg("auto", "auto (builtin for --model tiny, else lume), builtin, lume, semeval (fetched, "
                            "verified, cached: docs/data.md), or a LUME release dir / a SemEval parquet dir")
    n_docs: int = arg(0, "documents per task per split: built-in data makes this many (0 = 8), "
                         "real data keeps the first N (0 = all)")
    mia_data: str = arg("auto", "auto (built-in data brings its own; real data: mia, or none with a note if it "
                                "cannot be fetched), mia, none, or a dir with member.jsonl + nonmember.jsonl")
    mmlu: str = arg("auto", "auto (none with built-in data; real data: mmlu, or none with a note if it cannot "
                            "be fetched), mmlu, none, or an MMLU dir (dev/, test/ CSVs)")
    mmlu_limit: int = arg(0, "questions per MMLU subject (0 = all)")
    lr: float = arg(0.0, "peak learning rate (0 = 1e-4 for tiny, 1e-5 otherwise)")
    epochs: float = arg(0.0, "passes over the forget set (0 = 20 for tiny, 5 otherwise)")
    max_steps: int = arg(0, "optimizer steps; > 0 overrides --epochs")
    batch_size: int = arg(4, "forget (and retain) rows per micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step (token-normalised)")
    warmup: int = arg(0, "linear warmup steps")
    schedule: str = arg("constant", "lr after warmup", choices=["constant", "linear"])
    clip: float = arg(1.0, "gradient-norm clip (0 = off)")
    beta: float = arg(0.1, "NPO inverse temperature")
    retain_weight: float = arg(-1.0, "weight of the retain term of GD, KL and NPO (NPO-RT; 0 = pure NPO); "
                                     "-1 = 1 for GD/KL, 3 for NPO")
    precision: str = arg("auto", "auto = bf16 autocast on CUDA, fp32 on CPU", choices=list(lume.PRECISIONS))
    eval_precision: str = arg("auto", "weights' dtype when scoring: auto = bf16 on CUDA (as the official scorer "
                                      "loads the targets), fp32 on CPU", choices=list(lume.EVAL_PRECISIONS))
    grad_checkpointing: bool = arg(False, "recompute activations in backward (7B on one GPU)")
    device: str = arg("auto", "auto, cpu, cuda, cuda:1, ...")
    max_new_tokens: int = arg(256, "generation length (the official scorer uses 256)")
    eval_batch_size: int = arg(32, "prompts per generation batch")
    eval_before: bool = arg(True, "also score the target before unlearning")
    seed: int = arg(0, "seeds data order, sampling of retain batches and torch")
    out: str = arg("", "run directory (default runs/task<T>-<method>-<model>-<time>); never overwritten")
    save: bool = arg(False, "save the unlearned model (save_pretrained, safetensors) to <out>/model")
    cache_dir: str = arg(os.environ.get("LUME_CACHE", str(Path.home() / ".cache" / "lume")),
                         "where the tiny target and the fetched data are cached (env LUME_CACHE)")
    rdzv_timeout: float = arg(60.0, "torchrun: seconds to wait for every rank at MASTER_ADDR:MASTER_PORT "
                                    "before a clear error")


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=meta["help"])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, choices=meta.get("choices"),
                           help=meta["help"])
    cfg = Config(**vars(p.parse_args(argv)))
    # model-dependent defaults, resolved here once and recorded in config.json. The tiny values
    # were chosen on the built-in data (README table); 1e-5 x 5 epochs is the usual 7B setting.
    is_tiny = cfg.model == "tiny"
    cfg.lr = cfg.lr or (1e-4 if is_tiny else 1e-5)
    cfg.epochs = cfg.epochs or (20.0 if is_tiny else 5.0)
    if cfg.retain_weight < 0:  # NPO's retain NLL competes with a loss ~(2/beta)log2 = 14: weigh it more
        cfg.retain_weight = 3.0 if cfg.method == "npo" else 1.0
    for name in ("epochs", "batch_size", "grad_accum", "max_new_tokens", "eval_batch_size"):
        if getattr(cfg, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.beta <= 0:
        p.error(f"--beta must be > 0, got {cfg.beta}")
    return cfg


# -----------------------------------------------------------------------------
# inputs, model, run directory


def make_out_dir(cfg: Config) -> Path:
    """A fresh run directory; an existing non-empty one is refused, never overwritten."""
    if cfg.out:
        out = Path(cfg.out)
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"error: run directory {out} exists and is not empty; pass a new --out "
                             "(results are never overwritten)")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = f"runs/task{cfg.task}-{cfg.method}-{Path(cfg.model).name}-{stamp}"
        out, k = Path(base), 1
        while out.exists():
            k += 1
            out = Path(f"{base}-{k}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def data_source(cfg: Config, value: str, names: tuple, fetch_auto: bool) -> tuple[str, dict | None]:
    """A --data / --mia-data / --mmlu value -> (what the loader reads: 'builtin', '' for none, or a
    directory; its record for config.json). `auto` fetches the source names[0] when fetch_auto (on
    first use, fetch.py; a source that auto cannot fetch is skipped with a note, except the items),
    else means builtin for --data and none otherwise (built-in data brings its own MIA sets). A
    named source is required; a local directory is hashed as it is."""
    if value == "auto" and not fetch_auto:
        return ("builtin" if "lume" in names else ""), None
    if value == "auto":
        path, record = fetch.resolve(names[0], cfg.cache_dir, required="lume" in names, log=lume.print0)
        return (str(path) if path else ""), record
    if value in names:
        path, record = fetch.resolve(value, cfg.cache_dir, log=lume.print0)
        return str(path), record
    if value in ("", "none", "builtin"):
        return ("" if value == "none" else value), None
    return value, fetch.local_record(value)


def load_inputs(cfg: Config):
    """(items, MIA sets or None, MMLU (dev, test) or None, the sources' records for config.json),
    fetched if needed and validated before any model work."""
    data_dir, data_record = data_source(cfg, cfg.data, ("lume", "semeval"), fetch_auto=cfg.model != "tiny")
    real = data_dir != "builtin"  # auto MIA sets and MMLU follow the data: fetched for the real benchmark
    mia_dir, mia_record = data_source(cfg, cfg.mia_data, ("mia",), fetch_auto=real)
    mmlu_dir, mmlu_record = data_source(cfg, cfg.mmlu, ("mmlu",), fetch_auto=real)
    if data_dir == "builtin":
        items, mia = data.builtin(n_docs=cfg.n_docs or 8, seed=cfg.seed)
    else:
        items, mia = data.load_items(data_dir), None
        if cfg.n_docs:  # a quick subset of a real release: the first N documents of each task and split
            keep = {}
            for it in items:
                docs = keep.setdefault((it.split, it.task), [])
                if it.doc_id not in docs and len(docs) < cfg.n_docs:
                    docs.append(it.doc_id)
            items = [it for it in items if it.doc_id in keep[(it.split, it.task)]]
    if mia_dir:
        mia = data.load_mia(mia_dir)
    mmlu = data.load_mmlu(mmlu_dir) if mmlu_dir else None
    return items, mia, mmlu, {"data": data_record, "mia_data": mia_record, "mmlu": mmlu_record}


def load_model(cfg: Config, items, device, dtype, precision: str = "fp32", dist=None):
    """(model, tokenizer) on device; under torchrun FSDP2-sharded (dist.shard), every rank loading
    on CPU and fully_shard moving its shard to the device layer by layer."""
    if cfg.model == "tiny":
        def build():
            return tiny.tiny_target(items, cfg.cache_dir, log=lume.print0)
        path = dist.on_rank0(build) if dist else build()  # one rank builds it, the others wait
        model, tok = lume.load_pretrained(str(path), dtype)
    else:
        model, tok = lume.load_pretrained(cfg.model, dtype)
    if cfg.grad_checkpointing:
        lume.enable_checkpointing(model)
    if dist is not None:
        return distributed.shard(model, dist, precision).eval(), tok
    return model.to(device).eval(), tok


def split_items(cfg: Config, items):
    """(forget, retain) items of the task being unlearned."""
    tasks = {1, 2, 3} if cfg.task == "all" else {int(cfg.task)}
    return ([it for it in items if it.split == "forget" and it.task in tasks],
            [it for it in items if it.split == "retain" and it.task in tasks])


def check_world(cfg: Config, items) -> None:
    """Under torchrun, refuse before the rendezvous what cannot run: more ranks than forget items
    (a rank would never see one), and fp16 (FSDP would need a sharded GradScaler)."""
    world, n = int(os.environ.get("WORLD_SIZE", "1")), len(split_items(cfg, items)[0])
    if world > 1 and world > n:
        raise SystemExit(f"error: {world} ranks (WORLD_SIZE) but only {n} forget items for --task {cfg.task}: "
                         f"every rank needs at least one. Start at most {n} processes "
                         "(torchrun --nproc_per_node), or unlearn more items (--task all, more data).")
    if world > 1 and cfg.precision == "fp16":
        raise SystemExit("error: --precision fp16 is not supported under torchrun (FSDP would need a "
                         "sharded GradScaler); use --precision bf16 or bf16-pure")


# -----------------------------------------------------------------------------
# unlearning


def encode_items(tok, items) -> list[tuple[list[int], int]]:
    """(prompt + answer + EOS ids, prompt length) of each item, as the losses see them."""
    return [lume.encode_pair(tok, it.input, it.output) for it in items]


def batch_of(encoded, idx, pad_id: int) -> lume.Batch:
    """The rows `idx` of `encoded` as one right-padded Batch (targets: answer tokens)."""
    return lume.make_batch([encoded[i][0] for i in idx], [encoded[i][1] for i in idx], idx, pad_id)


def first_forget_batches(plan, steps) -> list:
    """This process's forget micro-batch at every place of the plan where rows are seen for the
    first time (plan: global indices; steps: the Batches this process trains on, aligned with it)."""
    seen, out = set(), []
    for global_micros, micros in zip(plan, steps):
        for (rows, _), (forget, _) in zip(global_micros, micros):
            if not seen.issuperset(rows):
                seen.update(rows)
                out.append(forget)
    return out


def npo_reference(model, plan, steps, n_forget: int, autocast, dist=None) -> torch.Tensor:
    """log pi_ref(y_i|x_i) of every forget item under the model as it is now (before unlearning),
    computed on the training micro-batches themselves (lume.plan_steps keeps their rows fixed), so
    NPO's log-ratio is exactly 0 at step 0; under torchrun each rank runs its rows."""
    batches = first_forget_batches(plan, steps)
    if dist is not None:
        return distributed.reference_logps_sharded(model, batches, n_forget, dist, autocast)
    return lume.reference_logps(model, batches, n_forget, autocast)


def unlearn(cfg: Config, model, tok, items, device, precision, log, dist=None):
    """Run the chosen method on the chosen task's forget items (retain items for GD/KL/NPO-RT);
    under torchrun on this rank's rows of every micro-batch (dist.shard_steps)."""
    forget, retain = split_items(cfg, items)
    assert forget, f"no forget items for task {cfg.task} in {cfg.data}"
    use_retain = methods.NEEDS_RETAIN[cfg.method] and not (cfg.method == "npo" and cfg.retain_weight == 0)
    forget_encoded = encode_items(tok, forget)
    retain_encoded = encode_items(tok, retain) if use_retain else []
    plan = lume.plan_steps(len(forget_encoded), len(retain_encoded), cfg.batch_size, cfg.grad_accum,
                           cfg.epochs, cfg.max_steps, cfg.seed)
    pad = tok.pad_token_id

    def forget_batch(idx):
        return batch_of(forget_encoded, idx, pad)

    def retain_batch(idx):
        return batch_of(retain_encoded, idx, pad)
    if dist is None:
        steps = [[(forget_batch(f), retain_batch(r) if r else None) for f, r in micros] for micros in plan]
    else:
        steps = distributed.shard_steps(plan, forget_batch, retain_batch, dist)
    autocast = lume.autocast_ctx(device, precision)
    options = {} if cfg.method == "ga" else {"retain_weight": cfg.retain_weight}
    if cfg.method == "npo":
        options.update(beta=cfg.beta, ref_logps=npo_reference(model, plan, steps, len(forget), autocast, dist))
    if cfg.method == "kl":  # frozen reference in the training dtype, for retain distributions
        ref = copy.deepcopy(model) if dist is None else load_model(  # sharded like the model
            cfg, items, device, lume.weight_dtype(precision), precision, dist)[0]
        options["ref"] = ref.eval().requires_grad_(False)
    loss = methods.METHODS[cfg.method]

    def loss_fn(model, forget, retain, totals):
        return loss(model, forget, retain, totals, **options)
    if dist is not None:
        loss_fn = distributed.skip_padding(loss_fn)
    lume.print0(f"unlearning: {cfg.method} on task {cfg.task}: {len(forget)} forget items, "
                f"{len(retain_encoded)} retain items, {len(steps)} steps")
    return lume.train(model, steps, loss_fn, lr=cfg.lr, warmup=cfg.warmup, schedule=cfg.schedule,
                      clip=cfg.clip, precision=precision, device=device, log=log, dist=dist)


# -----------------------------------------------------------------------------
# scoring and the run


def score(cfg: Config, model, tok, inputs, stage: str, eval_precision: str, dist=None):
    """One stage's (generation rows, MIA rows, results): evaluation.evaluate on the weights in the
    evaluation dtype (bf16 on CUDA, as the official scorer loads the targets; no autocast), or under
    torchrun dist.evaluate_sharded; the results carry the MMLU per-subject accuracies when MMLU is given."""
    items, mia, mmlu = inputs
    dtype = lume.DTYPES[eval_precision]

    def progress(done, total):
        lume.print0(f"eval {stage}: {done}/{total} items generated")
    options = dict(stage=stage, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                   mmlu_limit=cfg.mmlu_limit, progress=progress)
    if dist is not None:
        gen_rows, mia_rows, mmlu_res, results = distributed.evaluate_sharded(model, tok, items, mia, mmlu,
                                                                            dist=dist, dtype=dtype, **options)
    else:
        with lume.weights_as(model, dtype) as weights:
            gen_rows, mia_rows, mmlu_res, results = evaluation.evaluate(weights, tok, items, mia, mmlu, **options)
    return gen_rows, mia_rows, results if mmlu_res is None else {**results, "mmlu": mmlu_res}


def add_stage(scored: dict, stage: str, gen_rows, mia_rows, results) -> dict:
    """scored (generation rows, MIA rows and results of the stages so far) with one more stage."""
    return {"generations": scored["generations"] + gen_rows, "mia": scored["mia"] + mia_rows,
            "results": {**scored["results"], stage: results}}


def write_scores(out: Path, scored: dict) -> None:
    """Every stage scored so far, each file replaced atomically."""
    lume.write_jsonl_atomic(out / "generations.jsonl", scored["generations"])
    lume.write_jsonl_atomic(out / "mia.jsonl", scored["mia"])
    lume.write_json_atomic(out / "results.json", scored["results"])


def step_logger(logf):
    """log(rec) for lume.train: one line of log.jsonl (rank 0, logf not None) and one printed line."""
    def log(rec):
        if logf is not None:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
        extra = " ".join(f"{k} {v:.4f}" for k, v in rec.items() if k not in ("step", "lr", "tokens_per_s"))
        lume.print0(f"step {rec['step']}: {extra} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s")
    return log


def summary(results: dict) -> str:
    """A short before/after table of the headline numbers."""
    stages = list(results)
    rows = []
    for split in ("forget-set", "retain-set"):
        for task in sorted(k for k in results[stages[-1]][split] if k.startswith("Task")):
            for key, short in (("regurgitation-score", "reg"), ("knowledge-score", "kn")):
                rows.append((f"{split[:-4]} {task} {short}", [results[s][split][task][key] for s in stages]))
    for key in ("mia_loss_acc", "mmlu_average", "harmonic-mean-task-aggregate", "aggregate-score"):
        if key in results[stages[-1]]:
            rows.append((key, [results[s].get(key) for s in stages]))
    lines = [f"{'':32s}" + "".join(f"{s:>10s}" for s in stages)]
    lines += [f"{name:32s}" + "".join(f"{v:10.3f}" for v in vals) for name, vals in rows]
    return "\n".join(lines)


def main(cfg: Config) -> Path:
    t0 = time.time()
    lume.seed_everything(cfg.seed)
    items, mia, mmlu, sources = load_inputs(cfg)
    check_world(cfg, items)  # before the rendezvous: every rank fails fast
    dist = distributed.init_distributed(cfg.device, cfg.rdzv_timeout)  # None unless started by torchrun
    try:
        out = run_job(cfg, (items, mia, mmlu), dist, t0, sources)
    except BaseException:
        if dist is not None:  # a failing rank leaves at once (no barrier): torchrun stops the others
            dist.close(together=False)
        raise
    if dist is not None:
        dist.close()
    return out


def run_job(cfg: Config, inputs, dist, t0, sources=None) -> Path:
    """Score, unlearn, save, score again; under torchrun every rank runs this and rank 0 writes."""
    items = inputs[0]
    rank0 = dist is None or dist.rank == 0
    device = dist.device if dist else lume.pick_device(cfg.device)  # torchrun: cuda:LOCAL_RANK or cpu
    precision = lume.resolve_precision(cfg.precision, device)
    out = dist.on_rank0(lambda: make_out_dir(cfg)) if dist else make_out_dir(cfg)
    if rank0:
        lume.write_json_atomic(out / "config.json", {**dataclasses.asdict(cfg), "argv": sys.argv,
                                                     "device": str(device), "resolved_precision": precision,
                                                     "resolved_eval_precision": lume.resolve_eval_precision(
                                                         cfg.eval_precision, device),
                                                     "world_size": dist.world if dist else 1,
                                                     "data_sources": sources,
                                                     "torch": torch.__version__})
    lume.print0(f"run directory: {out}" + (f" ({dist.world} ranks, FSDP2 on {device.type})" if dist else ""))
    model, tok = load_model(cfg, items, device, lume.weight_dtype(precision), precision, dist)
    eval_precision = lume.resolve_eval_precision(cfg.eval_precision, device)
    scored = {"generations": [], "mia": [], "results": {}}
    if cfg.method == "none" or cfg.eval_before:  # method none: the target as it is, scored once
        scored = add_stage(scored, "before", *score(cfg, model, tok, inputs, "before", eval_precision, dist))
        if rank0:
            write_scores(out, scored)
    if cfg.method != "none":
        with open(out / "log.jsonl", "a") if rank0 else contextlib.nullcontext() as logf:
            unlearn(cfg, model, tok, items, device, precision, step_logger(logf), dist)
        if cfg.save and dist is not None:
            distributed.save_sharded(model, tok, out / "model", dist)
        elif cfg.save:
            lume.save_model(model, tok, out / "model")
        scored = add_stage(scored, "after", *score(cfg, model, tok, inputs, "after", eval_precision, dist))
        if rank0:
            write_scores(out, scored)
    lume.print0(summary(scored["results"]))
    lume.print0(f"done in {time.time() - t0:.0f}s: {out}")
    return out


if __name__ == "__main__":
    main(parse_args())
