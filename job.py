"""
One LUME run from a resolved Config (run.py): inputs, model, run directory, scoring before,
unlearning (with trajectory scoring and training checkpoints between steps), saving, scoring
after, and the report. run.py is the command line; this is what it runs.

    out = job.main(run.parse_args(["--task", "1", "--method", "npo"]))
"""
import contextlib
import copy
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import attacks
import checkpoint
import checks
import data
import dist as distributed
import evaluation
import fetch
import identity
import generation
import lora
import lume
import memory
import methods
import oracles
import progress
import report
import rundir
import sharded
import status
import tiny
import trajectory


# -----------------------------------------------------------------------------
# inputs, model, run directory


def make_out_dir(cfg) -> Path:
    """A fresh run directory; an existing non-empty one is refused, never overwritten (--resume
    continues in its own)."""
    if cfg.resume:
        return Path(cfg.resume)
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
    rundir.mark(out)  # recognised as a run directory before --resume writes anything into it
    return out


def data_source(cfg, value: str, names: tuple, fetch_auto: bool) -> tuple[str, dict | None]:
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


def load_inputs(cfg):
    """(items, MIA sets or None, MMLU (dev, test) or None, the sources' records for config.json),
    fetched if needed and validated before any model work."""
    data_dir, data_record = data_source(cfg, cfg.data, ("lume", "semeval"), fetch_auto=cfg.model != "tiny")
    real = data_dir != "builtin"  # auto MIA sets and MMLU follow the data: fetched for the real benchmark
    mia_dir, mia_record = data_source(cfg, cfg.mia_data, ("mia",), fetch_auto=real)
    mmlu_dir, mmlu_record = data_source(cfg, cfg.mmlu, ("mmlu",), fetch_auto=real)
    if data_dir == "builtin":
        try:
            items, mia = data.builtin(n_docs=cfg.n_docs or 8, seed=cfg.seed)
        except ValueError as e:  # word lists exhausted for this many documents
            raise data.DataError(f"--n-docs {cfg.n_docs}: {e}") from None
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


def load_model(cfg, items, device, dtype, precision: str = "fp32", dist=None):
    """(model, tokenizer) on device; under torchrun FSDP2-sharded (dist.shard), every rank loading
    on CPU and fully_shard moving its shard to the device layer by layer."""
    if cfg.model == "tiny":
        def build():
            return tiny.tiny_target(items, cfg.cache_dir, log=lume.print0, show_progress=True)
        path = dist.on_rank0(build) if dist else build()  # one rank builds it, the others wait
        model, tok = lume.load_pretrained(str(path), lora.load_dtype(cfg, precision, dtype))
    else:
        model, tok = lume.load_pretrained(cfg.model, lora.load_dtype(cfg, precision, dtype))
    if cfg.lora_rank or cfg.train_layers:  # what trains: LoRA adapters or the last K layers (lora.py)
        lume.print0(lora.describe(lora.apply(model, cfg)))
    if cfg.grad_checkpointing:
        lume.enable_checkpointing(model)
    if dist is not None:
        return distributed.shard(model, dist, precision).eval(), tok
    return model.to(device).eval(), tok


def split_items(cfg, items):
    """(forget, retain) items of the task being unlearned."""
    tasks = {1, 2, 3} if cfg.task == "all" else {int(cfg.task)}
    return ([it for it in items if it.split == "forget" and it.task in tasks],
            [it for it in items if it.split == "retain" and it.task in tasks])


# -----------------------------------------------------------------------------
# unlearning: the steps and what the method prepares


def encode_items(tok, items) -> list[tuple[list[int], int]]:
    """(prompt + answer + EOS ids, prompt length) of each item, as the losses see them."""
    return [lume.encode_pair(tok, it.input, it.output) for it in items]


def batch_of(encoded, idx, pad_id: int) -> lume.Batch:
    """The rows `idx` of `encoded` as one right-padded Batch (targets: answer tokens)."""
    return lume.make_batch([encoded[i][0] for i in idx], [encoded[i][1] for i in idx], idx, pad_id)


def frozen_reference(cfg, model, items, device, precision, dist=None):
    """A frozen reference model (methods.Prep.frozen_copy): with LoRA the same model with its adapters
    off (no second copy), else a copy in the training dtype (under torchrun loaded and sharded like
    the model)."""
    if lora.has_adapters(model):
        return lora.Reference(model)
    ref = copy.deepcopy(model) if dist is None else load_model(cfg, items, device, lume.weight_dtype(precision),
                                                               precision, dist)[0]
    return ref.eval().requires_grad_(False)


def saved_state(spec, resume, n_retain: int) -> dict | None:
    """A resumed run's method state (methods.Method.state) as prepare takes it back: None when the run
    starts afresh; a "retain rows" list is this rank's entries (sharded.rows_state)."""
    if resume is None:
        return None
    return {key: (resume["state"].get(key) if kind == "shared" else sharded.rows_state(resume, key, n_retain))
            for key, (_, kind) in spec.state.items()}


def method_state(spec, options: dict, steps) -> tuple[dict, dict]:
    """(what every rank shares, what is this rank's) of the method's checkpointed state: its
    methods.Method.state options, a "retain rows" list cut to the rows of this rank's steps."""
    shared = {key: options[opt] for key, (opt, kind) in spec.state.items() if kind == "shared"}
    mine = {key: sharded.rows_of(options[opt], steps) for key, (opt, kind) in spec.state.items() if kind != "shared"}
    return shared, mine


def reference_logps(model, batches, n: int, autocast, dist=None):
    """lume.reference_logps (methods.Prep.reference_logps), under torchrun sharded like the model."""
    if dist is not None:
        return distributed.reference_logps_sharded(model, batches, n, dist, autocast)
    return lume.reference_logps(model, batches, n, autocast)


def method_options(cfg, model, tok, items, spec, plan, steps, retain, device, precision, dist=None,
                   resume=None) -> dict:
    """The keyword options of the method's loss: its Config fields (spec.options) and what its
    prepare builds once before training (methods.Method) from the run's steps and retain encodings."""
    options = {name: getattr(cfg, field) for name, field in spec.options.items()}
    if spec.prepare is None:
        return options
    autocast = lume.autocast_ctx(device, precision)
    prep = methods.Prep(
        cfg=cfg, model=model, tok=tok, plan=plan, steps=steps, retain=retain, autocast=autocast, dist=dist,
        saved=saved_state(spec, resume, len(retain)),
        reference_logps=functools.partial(reference_logps, model, n=len(split_items(cfg, items)[0]),
                                          autocast=autocast, dist=dist),
        frozen_copy=functools.partial(frozen_reference, cfg, model, items, device, precision, dist),
        batch=functools.partial(batch_of, pad_id=tok.pad_token_id), each=progress.Each)
    try:
        return {**options, **spec.prepare(prep)}
    except ValueError as e:  # an option this model cannot take (e.g. --rmu-layer beyond its layers)
        raise SystemExit(f"error: {e}") from None


def training_steps(cfg, tok, forget, retain, dist=None) -> tuple[list, list, list]:
    """(plan: each optimizer step's micro-batches as item indices (lume.plan_steps), steps: the same as
    Batches, under torchrun this rank's rows of them (dist.shard_steps), the retain items' encodings:
    none when the method draws no retain rows (methods.uses_retain))."""
    forget_encoded = encode_items(tok, forget)
    retain_encoded = encode_items(tok, retain) if methods.uses_retain(cfg.method, cfg.retain_weight) else []
    plan = lume.plan_steps(len(forget_encoded), len(retain_encoded), cfg.batch_size, cfg.grad_accum,
                           cfg.epochs, cfg.max_steps or 0, cfg.seed, chunk_size=cfg.chunk_size,
                           retain_ratio=cfg.retain_ratio)
    forget_batch = functools.partial(batch_of, forget_encoded, pad_id=tok.pad_token_id)
    retain_batch = functools.partial(batch_of, retain_encoded, pad_id=tok.pad_token_id)
    if dist is not None:
        return plan, distributed.shard_steps(plan, forget_batch, retain_batch, dist), retain_encoded
    steps = [[(forget_batch(f), retain_batch(r) if r else None) for f, r in micros] for micros in plan]
    return plan, steps, retain_encoded


def restore(model, opt, scaler, resume: dict, dist=None) -> None:
    """A resumed run's trainable weights, optimizer, GradScaler and RNG states, from its checkpoint
    (checkpoint.load): torchrun's DCP layout (or another world size: resharded) through sharded.py."""
    if dist is not None or resume["layout"] == "dcp":
        return sharded.restore(model, opt, scaler, resume, dist)
    checkpoint.load_trainable(model, resume["weights"])
    opt.load_state_dict(resume["optimizer"])
    scaler.load_state_dict(resume["state"]["scaler"])
    checkpoint.set_rng_state(resume["state"]["rng"])


# -----------------------------------------------------------------------------
# unlearning: the loop


def unlearn(cfg, model, tok, inputs, out: Path, device, precision: str, eval_precision: str, dist=None,
            resume=None, fingerprint=None, log_rows=()) -> dict | None:
    """The chosen method on the chosen task's forget items (and retain items when it draws them), one
    optimizer step after another (lume.train's loop), under torchrun on this rank's rows of each step.
    Between steps, in eval mode: the trajectory (--eval-every), the best step's weights (--keep best),
    training checkpoints (--save-every, stamped with `fingerprint`) and a SIGTERM's stop. A resumed
    run continues from `resume` (resume_checkpoint), its log.jsonl rows before it being `log_rows`.
    Returns results.json's "kept" entry, or None (--keep last)."""
    items, mia, mmlu = inputs
    rank0 = dist is None or dist.rank == 0
    spec = methods.METHODS[cfg.method]
    forget, retain = split_items(cfg, items)
    assert forget, f"no forget items for task {cfg.task} in {cfg.data}"
    tasks = sorted({it.task for it in forget})
    # the trajectory's rows and the kept step's weights (host memory), a resumed run's from its checkpoint
    track = resume["state"]["track"] if resume else {"rows": [], "best": None}
    best = resume["best"] if resume else None
    subset = (trajectory.eval_subset(trajectory.picking_items(cfg, items), cfg.seed), mia, mmlu)
    if cfg.eval_every and not track["rows"]:  # step 0: the target itself
        if score_step(cfg, model, tok, subset, 0, track, tasks, eval_precision, out, dist):  # kept so far
            track["best"], best = 0, checkpoint.trainable_state(model)
    start = resume["step"] if resume else 0
    if rank0 and cfg.resume:  # drop what a killed run wrote after its checkpoint (all of it without one)
        rundir.write_jsonl_atomic(out / "log.jsonl", list(log_rows))  # rundir.read_prior: those before `start`
        rundir.write_jsonl_atomic(out / "trajectory.jsonl", track["rows"])
    checkpoint.TERM["defer"] = bool(cfg.save_every) and dist is None  # SIGTERM: checkpoint at the next step
    with open(out / "log.jsonl", "a") if rank0 else contextlib.nullcontext() as logf:
        # the steps, the method's options (what it prepares once, before any step), the setup
        plan, steps, retain_encoded = training_steps(cfg, tok, forget, retain, dist)
        options = method_options(cfg, model, tok, items, spec, plan, steps, retain_encoded, device, precision,
                                 dist, resume)
        loss_fn = functools.partial(spec.loss, **options)  # loss_fn(model, forget, retain, totals)
        if dist is not None:
            loss_fn = distributed.skip_padding(loss_fn)
        lume.print0(f"unlearning: {cfg.method} on task {cfg.task}: {len(forget)} forget items, "
                    f"{len(retain_encoded)} retain items, {len(steps)} steps"
                    + (f", resumed after step {start}" if resume else ""))
        if spec.note is not None:
            lume.print0(spec.note(cfg))
        if start > len(steps):
            raise SystemExit(f"error: the checkpoint is at step {start} but this run has {len(steps)} steps")
        setup = report.training_setup(cfg, model, spec, precision, len(steps), bool(retain_encoded))
        lume.print0(report.setup_line(report.record_setup(out, setup) if rank0 else setup))
        bar = progress.Progress("unlearning: step", len(steps), start=start)
        # AdamW and the GradScaler after KL's reference copy is made (it stays the target), then a
        # resumed run's states; as lume.train from here on
        autocast = lume.autocast_ctx(device, precision)
        opt, scaler = lume.optimizer_and_scaler(model, cfg.lr, precision, device, dist)
        if resume:
            restore(model, opt, scaler, resume, dist)
        lume.disable_dropout(model)
        model.train()
        try:
            for step in range(start, len(steps)):
                lr = lume.lr_at(step, len(steps), cfg.lr, cfg.warmup, cfg.schedule)
                rec = lume.train_step(model, opt, scaler, steps[step], loss_fn, step=step, lr=lr, clip=cfg.clip,
                                      autocast=autocast, device=device, dist=dist)
                log_step(logf, bar, rec, len(steps))
                if not (cfg.eval_every or cfg.save_every):  # nothing between steps: no switch to eval mode
                    continue
                model.eval()  # between steps: scoring, the kept weights, a checkpoint, a SIGTERM's stop
                done = step + 1
                if cfg.eval_every and (done % cfg.eval_every == 0 or done == len(steps)):
                    if score_step(cfg, model, tok, subset, done, track, tasks, eval_precision, out, dist):
                        track["best"], best = done, checkpoint.trainable_state(model)  # --keep best: this step
                stop = stop_asked(dist)  # SIGTERM during the step: checkpoint now, then stop
                if cfg.save_every and (done % cfg.save_every == 0 or done == len(steps) or stop):
                    save_step(out, done, model, opt, scaler, method_state(spec, options, steps), track, best,
                              fingerprint, dist)
                if stop:
                    raise checkpoint.Terminated("terminated (SIGTERM)")
                model.train()
        finally:
            model.eval()
    checkpoint.TERM["defer"] = False
    return kept_step(cfg, model, track, best, tasks, out, rank0)


def log_step(logf, bar, rec: dict, total: int) -> None:
    """One step's line of log.jsonl (rank 0: logf not None) and the progress line."""
    if logf is not None:
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
    terms = {k: v for k, v in rec.items() if k not in ("step", "lr", "tokens_per_s", "grad_norm")}
    bar.update(rec["step"] + 1, **terms, tokens_per_s=rec["tokens_per_s"])
    if rec["step"] + 1 == total:
        bar.close()


def score_step(cfg, model, tok, subset, done: int, track: dict, tasks, eval_precision: str, out: Path,
               dist=None) -> bool:
    """The evaluation subset scored after `done` steps: a row appended to track["rows"] (trajectory.jsonl
    on rank 0); True when --keep best keeps this step (trajectory.select_best)."""
    results = score(cfg, model, tok, subset, f"step {done}", eval_precision, dist,
                    mmlu_limit=trajectory.SUBSET_MMLU)[2]
    track["rows"].append(trajectory.row(done, results))
    if dist is None or dist.rank == 0:
        rundir.write_jsonl_atomic(out / "trajectory.jsonl", track["rows"])
    return cfg.keep == "best" and trajectory.select_best(track["rows"], tasks)[0]["step"] == done


def stop_asked(dist=None) -> bool:
    """Whether a SIGTERM came during the step (checkpoint.TERM); under torchrun whether it came to any
    rank, so every rank stops at the same step (the sharded save is collective)."""
    stop = checkpoint.TERM["asked"]
    return dist.all_reduce_float(float(stop)) > 0 if dist is not None else stop


def save_step(out: Path, done: int, model, opt, scaler, state: tuple[dict, dict], track: dict, best,
              fingerprint, dist=None) -> None:
    """The training checkpoint after `done` steps: trainable weights, optimizer, scaler, the method's
    state (method_state: what every rank shares, what is this rank's), the trajectory and the kept
    weights; under torchrun sharded (sharded.save), else written by this one process."""
    shared, mine = state
    if dist is not None:
        sharded.save(out, done, model, opt, {"scaler": scaler.state_dict(), **shared, "track": track},
                     {"best": best, **mine}, fingerprint, dist)
    else:
        checkpoint.save(out, done, checkpoint.trainable_state(model), opt.state_dict(),
                        {"scaler": scaler.state_dict(), **shared, "track": track, **mine}, best, fingerprint)


def kept_step(cfg, model, track: dict, best, tasks, out: Path, rank0: bool = True) -> dict | None:
    """After the last step: the trajectory's plot (--eval-every) and, with --keep best, the best step's
    weights loaded back (unless it is the last) and results.json's "kept" entry; None otherwise."""
    if cfg.eval_every and rank0:
        note = trajectory.plot(track["rows"], out / "trajectory.png")
        lume.print0(note or f"trajectory: {out / 'trajectory.png'}")
    if cfg.keep != "best":
        return None
    row, why = trajectory.select_best(track["rows"], tasks)
    if row["step"] != track["rows"][-1]["step"]:
        checkpoint.load_trainable(model, best)
    lume.print0(f"kept step {row['step']}: {why}")
    return {"step": row["step"], "why": why}


# -----------------------------------------------------------------------------
# scoring and the run


def score(cfg, model, tok, inputs, stage: str, eval_precision: str, dist=None, mmlu_limit=None):
    """One stage's (generation rows, MIA rows, results): evaluation.evaluate on the weights in the
    evaluation dtype (bf16 on CUDA, as the official scorer loads the targets; no autocast), or under
    torchrun dist.evaluate_sharded; the results carry the MMLU per-subject accuracies when MMLU is given."""
    items, mia, mmlu = inputs
    dtype = lume.DTYPES[eval_precision]
    bar = progress.Progress(f"scoring {stage}", len(items))
    options = dict(stage=stage, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                   mmlu_limit=cfg.mmlu_limit if mmlu_limit is None else mmlu_limit,
                   progress=lambda done, total: bar.update(done))
    if dist is not None:
        gen_rows, mia_rows, mmlu_res, results = distributed.evaluate_sharded(model, tok, items, mia, mmlu,
                                                                            dist=dist, dtype=dtype, **options)
    else:
        with lume.weights_as(model, dtype) as weights:
            gen_rows, mia_rows, mmlu_res, results = evaluation.evaluate(weights, tok, items, mia, mmlu, **options)
    bar.close()
    return gen_rows, mia_rows, results if mmlu_res is None else {**results, "mmlu": mmlu_res}


def add_stage(scored: dict, stage: str, gen_rows, mia_rows, results) -> dict:
    """scored (generation rows, MIA rows and results of the stages so far) with one more stage."""
    return {"generations": scored["generations"] + gen_rows, "mia": scored["mia"] + mia_rows,
            "results": {**scored["results"], stage: results}}


def write_scores(out: Path, scored: dict) -> None:
    """Every stage scored so far, each file replaced atomically."""
    rundir.write_jsonl_atomic(out / "generations.jsonl", scored["generations"])
    rundir.write_jsonl_atomic(out / "mia.jsonl", scored["mia"])
    rundir.write_json_atomic(out / "results.json", scored["results"])


class UserError(Exception):
    """A problem with the user's input found while reading it (bad data), before the run directory
    exists: run.py prints it as one `error:` line and exits with status 2."""


def main(cfg) -> Path:
    """The run of cfg; returns its directory. A failure after the run directory exists marks it
    failed (status.json) and ends with a SystemExit whose last line says what to do next."""
    t0 = time.time()
    lume.seed_everything(cfg.seed)
    try:
        items, mia, mmlu, sources = load_inputs(cfg)
    except data.DataError as e:
        raise UserError(str(e)) from None
    problems = attacks.input_problems(attacks.parse(cfg.attacks), items, mia,  # data the attacks need
                                      sorted({it.task for it in split_items(cfg, items)[0]}))
    if problems:
        raise UserError("\nerror: ".join(problems))  # run.py prints it after `error: `
    checks.check_world(cfg, len(split_items(cfg, items)[0]))  # before the rendezvous: every rank fails fast
    dist = distributed.init_distributed(cfg.device, cfg.rdzv_timeout)  # None unless started by torchrun
    where = {}  # the run directory, once it exists; its lock
    with status.on_sigterm():
        try:
            out = run_job(cfg, (items, mia, mmlu), dist, t0, sources, where)
        except BaseException as e:
            if dist is not None:  # a failing rank leaves at once (no barrier): torchrun stops the others
                dist.close(together=False)
            if "out" not in where:  # nothing was created: a user's error (one line) or a bug (traceback)
                if isinstance(e, checkpoint.Terminated):  # exit 143, as after any SIGTERM
                    print(f"error: terminated (SIGTERM) before {cfg.resume} was changed: continue it with: "
                          f"python run.py --resume {cfg.resume}" if cfg.resume else
                          "error: terminated (SIGTERM) before the run directory was made", file=sys.stderr)
                    raise SystemExit(143) from None
                raise
            raise status.failed(where["out"], e, cfg, rank0=dist is None or dist.rank == 0) from None
        finally:
            if "lock" in where:
                os.close(where["lock"])
    if dist is not None:
        dist.close()
    return out


def write_config(cfg, out: Path, device, precision: str, dist, sources, memory_plan=None, model=None) -> None:
    """config.json: the resolved arguments, what they resolved to and what produced the run
    (report.provenance of `model`, its name_or_path), before any work."""
    rundir.write_json_atomic(out / "config.json", {
        **dataclasses.asdict(cfg), "argv": sys.argv, "device": str(device), "resolved_precision": precision,
        "resolved_eval_precision": lume.resolve_eval_precision(cfg.eval_precision, device),
        "world_size": dist.world if dist else 1, "data_sources": sources, "torch": torch.__version__,
        "memory_plan": memory_plan, "provenance": report.provenance(model or cfg.model, device, sources),
        **trajectory.config_record(cfg)})


def run_job(cfg, inputs, dist, t0, sources=None, where=None) -> Path:
    """Score, unlearn, save, score again; under torchrun every rank runs this and rank 0 writes.
    The run directory is made once the model has loaded (a model that cannot load leaves nothing
    behind); where["out"] names it from then on."""
    items = inputs[0]
    rank0 = dist is None or dist.rank == 0
    device = dist.device if dist else lume.pick_device(cfg.device)  # torchrun: cuda:LOCAL_RANK or cpu
    # on one CUDA GPU with no setup flag given, the memory plan picks precision, checkpointing, layers
    cfg, plan = memory.auto_setup(cfg, device, sum(split_items(cfg, items), []), dist.world if dist else 1)
    precision = lume.resolve_precision(cfg.precision, device)
    if cfg.resume and rank0 and where is not None:  # one process per run directory, checked before any work
        where["lock"] = checkpoint.lock_run(cfg.resume)
    model, tok = load_model(cfg, items, device, lume.weight_dtype(precision), precision, dist)
    fp = (run_fingerprint(cfg, inputs, model, tok, dist, precision)
          if cfg.method != "none" and (cfg.save_every or cfg.resume) else None)
    resume = resume_checkpoint(cfg, fp, model, len(split_items(cfg, items)[0])) if cfg.resume and cfg.method != "none" \
        else None
    prior = rundir.read_prior(Path(cfg.resume), resume, report.table) if cfg.resume else None  # before anything is written there
    out = dist.on_rank0(lambda: make_out_dir(cfg)) if dist else make_out_dir(cfg)
    if rank0 and where is not None and "lock" not in where:
        where["lock"] = checkpoint.lock_run(out)
    if where is not None:
        where["out"] = out
    if rank0 and not cfg.resume:
        write_config(cfg, out, device, precision, dist, sources, plan, getattr(model, "name_or_path", cfg.model))
    if rank0:
        status.write_status(out, "running")
    lume.print0(f"run directory: {out}" + (f" ({dist.world} ranks, FSDP2 on {device.type})" if dist else "")
                + (" (resumed)" if cfg.resume else ""))
    eval_precision = lume.resolve_eval_precision(cfg.eval_precision, device)
    scored = ({k: prior[k] for k in ("generations", "mia", "results")} if cfg.resume
              else {"generations": [], "mia": [], "results": {}})
    if (cfg.method == "none" or cfg.eval_before) and "before" not in scored["results"]:
        scored = add_stage(scored, "before", *score(cfg, model, tok, inputs, "before", eval_precision, dist))
        if rank0:
            write_scores(out, scored)
    kept, losses = None, oracles.target_losses(cfg, model, tok, items, device)  # --oracle: the target's
    if cfg.method != "none":
        kept = unlearn(cfg, model, tok, inputs, out, device, precision, eval_precision, dist, resume=resume,
                       fingerprint=fp, log_rows=prior["log"] if prior else [])
    if cfg.save:
        (distributed.save_sharded(model, tok, out / "model", dist) if dist is not None
         else lora.save(model, tok, out))  # with LoRA: merged <out>/model and PEFT's <out>/adapter
    if cfg.method != "none":
        scored = add_stage(scored, "after", *score(cfg, model, tok, inputs, "after", eval_precision, dist))
        if kept:
            scored["results"]["kept"] = trajectory.kept_report(kept, scored, items, cfg.seed)
        if cfg.oracle:  # results.json "oracle": beside a retain-only model (oracles.py)
            scored = oracles.attach(cfg, model, tok, inputs, scored, device, lambda m, t: score(
                cfg, m, t, inputs, "oracle", eval_precision), losses)
        if rank0:
            write_scores(out, scored)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the run is complete
    if cfg.attacks:  # after --save and the after stage: neither sees an attacked weight
        scored = run_attacks(cfg, model, tok, inputs, scored, device, precision, eval_precision, dist)
        if rank0:
            write_scores(out, scored)
    if rank0:
        status.write_status(out, "complete")
    results = {k: v for k, v in scored["results"].items() if k not in ("kept", "robustness", "oracle")}
    if results:  # --method none --no-eval-before --save exports the target and scores nothing
        lume.print0(report.table(results))
        lume.print0(report.explain(results, sorted({it.task for it in split_items(cfg, items)[0]})))
    if cfg.attacks:
        lume.print0(attacks.summary(scored["results"]["robustness"]))
    lume.print0(f"done in {time.time() - t0:.0f}s: {out}")
    return out


def run_attacks(cfg, model, tok, inputs, scored, device, precision, eval_precision, dist) -> dict:
    """scored with results.json's "robustness" (attacks.run: --attacks on the unlearned model as
    deployed, each scored like a stage, weights restored after each; one attacker setup for every
    method, on CUDA the memory plan's pick) and the attacks' rows, stage = attack name."""
    items, mia, _ = inputs
    forget, retain = split_items(cfg, items)
    budget = {}
    if device.type == "cuda" and dist is None:  # the attacker's own plan: the GPU minus nothing else held
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        budget = dict(config=memory.model_config(cfg.model), batch=cfg.batch_size,
                      seq_len=memory.plan_seq_len(cfg.model, forget), gpu_bytes=torch.cuda.mem_get_info(device)[0] + held)
    setup = attacks.attacker_setup(precision, **budget)

    def generate(rows_items, stage):
        with lume.weights_as(model, lume.DTYPES[eval_precision]) as weights:
            outs = generation.generate(weights, tok, [it.input for it in rows_items], cfg.max_new_tokens,
                                       cfg.eval_batch_size)
        return evaluation.generation_rows(rows_items, outs, stage)
    robustness, gens, mias = attacks.run(
        attacks.parse(cfg.attacks), model, tok, {"forget": forget, "retain": [it for it in items if it.split == "retain"
                                                                               and it.task in {f.task for f in forget}],
                                                 "mia": mia}, scored,
        lambda stage: score(cfg, model, tok, inputs, stage, eval_precision, dist), generate,
        tasks=sorted({it.task for it in forget}), seed=cfg.seed,
        recipe=attacks.relearn_recipe(cfg.model == "tiny", cfg.batch_size), setup=setup, device=device, dist=dist,
        grid={"auto": "single" if dist else "small"}.get(cfg.relearn_grid, cfg.relearn_grid))
    return {"generations": scored["generations"] + gens, "mia": scored["mia"] + mias,
            "results": {**scored["results"], "robustness": robustness}}


read_run_config = rundir.read_run_config  # run.resumed_config's reader (run.py imports job, not rundir)


def run_fingerprint(cfg, inputs, model, tok, dist, precision: str) -> dict:
    """What this run's checkpoints depend on (identity.fingerprint): config, data, model, tokenizer,
    MIA and MMLU contents, world size."""
    items, mia, mmlu = inputs
    return identity.fingerprint(dataclasses.asdict(cfg), items, identity.model_identity(model.name_or_path),
                                dist.world if dist else 1, precision, identity.tokenizer_identity(tok),
                                identity.contents_sha256(mia, mmlu))


def resume_checkpoint(cfg, fp: dict, model=None, n_forget: int | None = None) -> dict | None:
    """The checkpoint --resume continues from (None: the run had none yet, it starts at step 0); one
    `error:` line, before the run directory is touched, when none is usable or it does not fit the
    run (fingerprint) or the model (shapes, state: sharded.fits)."""
    try:
        got = checkpoint.load(cfg.resume, log=lume.print0, read=sharded.read)  # either layout
        if got is not None:  # the fingerprint, another world size resharding (one line says so)
            sharded.check(got, fp, cfg.method, lume.print0)
            if model is not None:
                sharded.fits(got, model, n_forget)
        return got
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"error: --resume {cfg.resume}: {e}") from None
