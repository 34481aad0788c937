"""
Several GPUs: torchrun + FSDP2 (torch.distributed.fsdp.fully_shard) around lume.train's plain loop.

    torchrun --nproc_per_node N run.py ...   # NCCL on cuda:LOCAL_RANK; without CUDA, gloo on CPU

What is split across the N ranks, and why the result is the single-process one:
  weights, grads, AdamW  1/N each: fully_shard on every decoder layer, then on the root (embeddings,
                final norm, head). --precision bf16: bf16 all-gather, compute and reduce-scatter
                over fp32 sharded master weights (micro-batches without sync also accumulate
                in bf16: a coarser sum than one GPU's fp32 grads); fp32, bf16-pure: no casting.
  training      rank r takes rows r::N of every global micro-batch of lume.plan_steps. The step's
                totals (lume.step_totals) are all-reduced and gradients SUMMED over ranks (divide
                factor 1), so the update is the single-process one. Reduce-scatter runs on a step's
                last micro-batch only. A rank left without rows runs a padding row (no targets,
                loss x 0): FSDP forwards are collectives, so every rank must run each one.
  NPO reference rows r::N of the forget set in lockstep batches, then summed over ranks.
  KL reference  a second copy, loaded and sharded the same way, frozen.
  evaluation    greedy decoding stops early per batch, which would break FSDP's lockstep: each
                rank gathers the full weights into a plain replica (7B: 14 GB bf16, 28 GB fp32)
                and scores a contiguous slice of the items, MIA documents and MMLU subjects; rows
                are all-gathered in item order, so each item is scored exactly once.
  checkpoint    the full state dict is gathered to rank 0's CPU, which writes save_pretrained.
Only rank 0 writes files and prints (lume.print0). Tested on CPU with gloo on 127.0.0.1
(tests/test_dist.py).
"""
import gc
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM

import evaluation
import generation
import lora
import lume
import membership
import metrics
import rundir

COLLECTIVE_TIMEOUT = 7200  # s: ranks wait at a gather while the slowest one finishes its eval slice


class Dist:
    """This process's place in a torchrun job and the collectives the run needs
    (lume.train calls all_reduce_dict, all_reduce_float and set_sync)."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device, self.mesh = rank, world, device, None

    def all_reduce_dict(self, d: dict) -> dict:
        """{name: float} summed over ranks (same keys in the same order on every rank)."""
        t = torch.tensor([float(v) for v in d.values()], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return dict(zip(d, t.tolist()))

    def all_reduce_float(self, x: float) -> float:
        return self.all_reduce_dict({"x": x})["x"]

    def set_sync(self, model, sync: bool) -> None:
        model.set_requires_gradient_sync(sync)  # False: grads accumulate unsharded, no reduce-scatter

    def rows(self, idx) -> tuple[list, bool]:
        """Rows rank::world of a global batch; (first row, False) when that is empty: padding."""
        idx = list(idx)
        mine = idx[self.rank::self.world]
        return (mine, True) if mine else (idx[:1], False)

    def span(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n items; shares differ by at most one."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def shard_steps(self, plan, make_f, make_r) -> list:
        """shard_steps(plan, make_f, make_r, self): for callers that get a Dist but do not import
        this file (attacks.relearn_)."""
        return shard_steps(plan, make_f, make_r, self)

    @staticmethod
    def skip_padding(loss_fn):
        return skip_padding(loss_fn)

    def gather(self, part: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank."""
        parts = [None] * self.world
        tdist.all_gather_object(parts, part)
        return [x for p in parts for x in p]

    def on_rank0(self, fn):
        """fn() on rank 0 only (files, building the tiny target); its result, or its SystemExit,
        on every rank. Also a barrier."""
        box = [None]
        if self.rank == 0:
            try:
                box = [(fn(), None)]
            except SystemExit as e:
                box = [(None, str(e.code))]
        tdist.broadcast_object_list(box, src=0)
        if box[0][1] is not None:
            raise SystemExit(box[0][1])
        return box[0][0]

    def close(self, together: bool = True) -> None:
        """Leave the job; `together` (a finished run): after every rank is done. Without the barrier
        a rank could destroy its gloo group while the other still worked (rank 0 writing files),
        and without dropping what holds the group (the mesh, FSDP modules) gloo's threads could
        outlive it into interpreter shutdown: either way a finished run aborted at exit
        ('terminate called without an active exception': 1 of 12 two-rank runs on this CPU
        before, 0 of 30 after)."""
        if together:
            tdist.barrier()
        self.mesh = None
        gc.collect()
        tdist.destroy_process_group()


def init_distributed(device: str = "auto", timeout: float = 60.0) -> Dist | None:
    """Join the torchrun job this process belongs to; None outside torchrun (WORLD_SIZE <= 1).

    env:// rendezvous (torchrun sets MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) that
    waits at most `timeout` seconds, then exits naming the address. NCCL on cuda:LOCAL_RANK when
    CUDA is available and --device is not cpu, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = not device.startswith("cpu") and torch.cuda.is_available()
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    where = f"MASTER_ADDR={os.environ.get('MASTER_ADDR')} MASTER_PORT={os.environ.get('MASTER_PORT')}"
    try:
        store, _, _ = next(tdist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
    except (RuntimeError, ValueError, OSError) as e:  # DistNetworkError, DistStoreError, unset variables
        raise SystemExit(
            f"error: rank {rank} of {world}: no rendezvous at {where} within {timeout:g}s "
            f"({lume.first_line(e)}). Start the job with `torchrun --nproc_per_node N run.py ...` "
            "(it sets these variables), make MASTER_ADDR reachable from every rank and MASTER_PORT free "
            "and open on it, or raise --rdzv-timeout.") from None
    if cuda:
        torch.cuda.set_device(dev)
    store.set_timeout(timedelta(seconds=COLLECTIVE_TIMEOUT))
    tdist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                             timeout=timedelta(seconds=COLLECTIVE_TIMEOUT), device_id=dev if cuda else None)
    return Dist(rank, world, dev)


def shard(model, dist: Dist, precision: str):
    """FSDP2 in place: fully_shard every decoder layer (the model's _no_split_modules), then the root."""
    assert precision != "fp16", "fp16 needs a sharded GradScaler: use --precision bf16 or bf16-pure"
    if dist.mesh is None:
        dist.mesh = init_device_mesh(dist.device.type, (dist.world,))
    bf16 = torch.bfloat16
    mp = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16) if precision == "bf16" else MixedPrecisionPolicy()
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    assert blocks, f"{type(model).__name__} declares no _no_split_modules: cannot find its decoder layers"
    # LoRA's fp32 adapters are units of their own: FSDP2 all-gathers a unit's parameters in one
    # buffer and wants one dtype per unit, and the frozen base under them is bf16 with --precision
    # bf16 (lora.load_dtype). Last-k needs nothing more: its fp32 layers are whole units.
    adapters = [m for lin in lora.lora_modules(model).values() for m in (lin.lora_A, lin.lora_B)]
    for m in adapters + blocks + [model]:
        fully_shard(m, mesh=dist.mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):  # sum over ranks: every loss is divided by the global totals
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


def as_padding(b):
    """b without target tokens: a row a rank runs only to keep FSDP's collectives in lockstep."""
    return None if b is None else lume.Batch(b.ids, b.attn, torch.zeros_like(b.target_mask), b.idx)


def skip_padding(loss_fn):
    """loss_fn giving 0 (loss and terms) on a padding micro-batch; lume.step_totals counts it nowhere."""
    def fn(model, forget, retain, totals):
        loss, terms = loss_fn(model, forget, retain, totals)
        if forget.target_mask.sum() > 0:
            return loss, terms
        return loss * 0.0, dict.fromkeys(terms, 0.0)
    return fn


def shard_steps(plan, make_f, make_r, dist: Dist):
    """lume.plan_steps' global micro-batches cut to this rank's rows: lists of (forget, retain|None) Batches."""
    steps = []
    for micros in plan:
        mine = []
        for f, r in micros:  # r: k = len(r) // len(f) retain rows per forget row (--retain-ratio), or []
            rows, real = dist.rows(f)  # a forget row's k retain rows go with it: empty slices together
            k = len(r) // len(f)
            mine_r = [j for g in dist.rows([r[i * k:(i + 1) * k] for i in range(len(f))])[0] for j in g]
            fb, rb = make_f(rows), (make_r(mine_r) if r else None)
            mine.append((fb, rb) if real else (as_padding(fb), as_padding(rb)))
        steps.append(mine)
    return steps


def reference_logps_sharded(model, batches, n: int, dist: Dist, autocast) -> torch.Tensor:
    """lume.reference_logps of this rank's rows of the training micro-batches (every rank runs the
    same number of forwards, padding rows included: FSDP forwards are collectives); each item is
    computed on exactly one rank, and a sum over ranks assembles the table."""
    out = lume.reference_logps(model, batches, n, autocast).to(dist.device)
    model.reshard()  # the root stays unsharded after a no-grad forward, and its grads would be lost
    tdist.all_reduce(out)
    return out.cpu()


def plain_model(model, sd: dict):
    """A plain HF model of model.config holding sd's tensors (no copy) and model's buffers."""
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(sd, assign=True)
    dev = next(iter(sd.values())).device
    for name, buf in model.named_buffers():  # non-persistent ones (rotary inv_freq) are not in sd
        mod, _, leaf = name.rpartition(".")
        setattr(plain.get_submodule(mod), leaf, buf.to(dev))
    if getattr(model.config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval().requires_grad_(False)


def full_replica(model, dtype: torch.dtype | None = None):
    """An unsharded copy of an FSDP model on every rank (all-gathered full state dict), its
    floating-point weights cast to `dtype` when given (evaluation's dtype, lume.resolve_eval_precision);
    LoRA adapters merged into their layers."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if lora.has_adapters(model):  # the replica is the plain model: W + (alpha/r) B A, as --save writes it
        sd = lora.merged_state_dict(model, sd)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return plain_model(model, sd)


def save_sharded(model, tok, path, dist: Dist) -> None:
    """rundir.save_model of an FSDP model: the full state dict on rank 0's CPU, written by rank 0.
    With LoRA adapters, as lora.save: the merged weights in `path`, PEFT's adapter beside it."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write():
        if not lora.has_adapters(model):
            return rundir.save_model(plain_model(model, sd), tok, path)
        rundir.save_model(plain_model(model, lora.merged_state_dict(model, sd)), tok, path)
        lora.save_peft(model, Path(path).parent / "adapter", model.config.name_or_path, sd)
    dist.on_rank0(write)


def evaluate_sharded(model, tok, items, mia=None, mmlu=None, *, dist: Dist, stage: str = "after",
                     max_new_tokens: int = 256, batch_size: int = 32, mmlu_limit: int = 0, autocast=None,
                     progress=None, dtype: torch.dtype | None = None):
    """evaluation.evaluate() of an FSDP model, each rank scoring a contiguous slice on a full replica
    (weights in `dtype` when given); the same return value on every rank (progress counts rank 0's slice)."""
    replica = full_replica(model, dtype)
    lo, hi = dist.span(len(items))
    outs = dist.gather(generation.generate(replica, tok, [it.input for it in items[lo:hi]], max_new_tokens,
                                     batch_size, autocast=autocast, progress=progress))
    gen_rows = evaluation.generation_rows(items, outs, stage)
    mia_rows = []
    if mia:
        docs = [(name, d) for name in ("member", "nonmember") for d in mia[name]]
        lo, hi = dist.span(len(docs))
        stats = dist.gather(membership.doc_stats(replica, tok, [d.document for _, d in docs[lo:hi]],
                                                 autocast=autocast))  # rows of plain floats: gathered as objects
        mia_rows = [{"stage": stage, "set": name, "id": d.id, **v} for (name, d), v in zip(docs, stats)]
    mmlu_res = None
    if mmlu:  # whole subjects per rank; the (subject, prediction, answer) records are gathered, so
        dev, test = mmlu  # average_acc counts every question once, as one process counts them
        subjects = sorted(test)
        lo, hi = dist.span(len(subjects))
        mine = {s: test[s] for s in subjects[lo:hi]}
        records = evaluation.mmlu_records(replica, tok, dev, mine, limit=mmlu_limit, autocast=autocast) if mine else []
        mmlu_res = metrics.mmlu_accuracy(dist.gather(records))
    return gen_rows, mia_rows, mmlu_res, evaluation.official_results(gen_rows, mia_rows, mmlu_res)
