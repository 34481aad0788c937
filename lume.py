"""
LUME engine: device and precision, loading, encoding and batching, log-probabilities, the one
training loop and its optimizer (AdamW; for bf16 weights with stochastic rounding).

    python run.py --task 1 --method npo                   # tiny embedded target, CPU, minutes
    python run.py --task 1 --method npo --model olmo-7b   # the released SemEval target (GPU)

Everything here is model-facing and method-agnostic. Batched greedy decoding lives in
generation.py, what is scored in evaluation.py, the losses in methods.py, the numbers in
metrics.py, the data in data.py, torchrun/FSDP2 in dist.py, the embedded tiny target in tiny.py,
and writing files atomically (results, checkpoints, save_model) in rundir.py. Paper: Ramakrishna
et al. 2025, "LUME: LLM Unlearning with Multitask Evaluations", arXiv 2502.15097. The official
SemEval-2025 Task 4 scorer (evaluate_generations.py) is the protocol we reproduce: raw `input` as the
prompt (no chat template), greedy decoding, 256 new tokens, new tokens decoded with special tokens
skipped. The optimizer stays here because lume.train, the reference loop, makes it.
"""
import contextlib
import copy
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# device, precision, seeding

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16-pure")


def pick_device(name: str = "auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def resolve_precision(precision: str, device: torch.device) -> str:
    # On this kind of CPU bf16/fp16 matmuls run ~100x slower than fp32 (no native units),
    # so CPU defaults to fp32; CUDA defaults to bf16 autocast over fp32 master weights.
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    assert precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {precision!r}"
    return precision


def autocast_ctx(device: torch.device, precision: str):
    """Mixed precision as a context: autocast for bf16/fp16, nothing for fp32 and pure bf16."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


EVAL_PRECISIONS = ("auto", "bf16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_eval_precision(eval_precision: str, device: torch.device) -> str:
    """auto = bf16 weights on CUDA, as the official scorer loads the targets (torch_dtype=bfloat16),
    and fp32 elsewhere (bf16 matmuls are ~100x slower on these CPUs). Evaluation runs on weights of
    that dtype without autocast, never on autocast over fp32 weights: greedy near-ties and MIA
    losses would differ from the official numbers."""
    if eval_precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    assert eval_precision in EVAL_PRECISIONS, f"--eval-precision must be one of {EVAL_PRECISIONS}"
    return eval_precision


@contextlib.contextmanager
def weights_as(model, dtype: torch.dtype):
    """The model with its floating-point weights in `dtype`: the model itself when they already
    are, else a temporary copy in that dtype (7B: 14 GB more in bf16), freed on exit."""
    if all(p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        yield model
        return
    # the parameters go straight into the copy in `dtype` (no transient full-precision copy);
    # buffers (rotary inv_freq) stay as they are, as from_pretrained(dtype=...) leaves them
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
            for p in model.parameters() if p.is_floating_point()}
    twin = copy.deepcopy(model, memo)
    try:
        yield twin.eval()
    finally:
        del twin


def weight_dtype(precision: str) -> torch.dtype:
    # bf16-pure keeps weights, grads and AdamW states in bf16 (7B on one GPU); all else fp32 master
    return torch.bfloat16 if precision == "bf16-pure" else torch.float32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# model and tokenizer loading

# name -> (model repo, tokenizer repo). The released targets memorised all three tasks.
ALIASES = {"olmo-7b": ("llmunlearningsemeval2025organization/olmo-finetuned-semeval25-unlearning",
                       "allenai/OLMo-7B-0724-Instruct-hf"),
           "olmo-1b": ("llmunlearningsemeval2025organization/olmo-1B-model-semeval25-unlearning",
                       "allenai/OLMo-1B-0724-hf")}


def resolve_model(name: str) -> tuple[str, str]:
    """Alias, local directory or hub id -> (model path, tokenizer path)."""
    if name in ALIASES:
        return ALIASES[name]
    return name, name


def first_line(e: BaseException) -> str:
    """'ErrorType: first line of its message' (at most 300 characters): one line for a user."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0][:300].rstrip('.')}" if lines else type(e).__name__


def hub_fix(*repos) -> str:
    """What to do when hub repos cannot be loaded: the end of a one-line `error:` message."""
    return (f"Fix: fetch {' and '.join(dict.fromkeys(repos))} where there is network (`hf download REPO` or snapshot_download), then run with "
            "HF_HUB_OFFLINE=1 and the same HF_HOME, or pass a local directory; gated SemEval repos: accept their terms, set HF_TOKEN")


def quiet_transformers() -> None:
    """No tqdm bars from transformers' loading and saving: the run prints its own progress lines."""
    from transformers.utils import logging
    logging.disable_progress_bar()


def load_pretrained(name: str, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer with from_pretrained; one clear line when it cannot."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    quiet_transformers()
    model_path, tok_path = resolve_model(name)
    local = Path(model_path).expanduser()
    # A path-like name is never sent to the hub: a typo in a local path should say so, not
    # blame the network (transformers would try it as a repo id).
    is_local = local.exists() or name.startswith((".", "/", "~"))
    if is_local:
        if not (local / "config.json").is_file():
            raise SystemExit(f"error: --model {name}: {local} is not a directory written by save_pretrained "
                             "(no config.json there)")
        model_path = tok_path = str(local)
    try:
        tok = AutoTokenizer.from_pretrained(tok_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    except (OSError, ValueError) as e:  # hub errors subclass OSError; bad repo ids, ValueError
        fix = "Fix: pass a directory written by save_pretrained" if is_local else hub_fix(model_path, tok_path)
        raise SystemExit(f"error: cannot load model {name!r} ({model_path}, tokenizer {tok_path}) from "
                         f"{'this local directory' if is_local else 'the hub'}: {first_line(e)}. {fix}.") from None
    if tok.pad_token_id is None:  # the official scorer pads with EOS
        tok.pad_token = tok.eos_token
    return model, tok


def enable_checkpointing(model) -> None:
    """Recompute each layer's activations in backward (7B on one GPU). Non-reentrant: composes with
    FSDP2 and needs no input gradients. transformers 5 renamed gradient_ to activation_checkpointing."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


# -----------------------------------------------------------------------------
# tokenization and batching


def encode_pair(tok, prompt: str, answer: str) -> tuple[list[int], int]:
    """(prompt ids + answer ids + EOS, number of prompt ids).

    The prompt is tokenized exactly as the official scorer tokenizes it for generation
    (`tok(prompt)`), so training and generation see the same prompt tokens. The answer is
    tokenized on its own after a single space (the separator the MIA documents use:
    document = input + " " + output), and ends with EOS so the model learns where to stop.
    """
    p = tok(prompt).input_ids
    sep = "" if (not answer or answer[0].isspace() or not prompt or prompt[-1].isspace()) else " "
    a = tok(sep + answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return p + a, len(p)


@dataclass
class Batch:
    ids: torch.Tensor    # (B, T) right padded
    attn: torch.Tensor   # (B, T) 1 on real tokens
    target_mask: torch.Tensor  # (B, T) 1 on tokens that are predicted targets (answer tokens)
    idx: torch.Tensor    # (B,) index of each row's item in its source list (NPO reference lookup)

    def to(self, device):
        return Batch(*(t.to(device) for t in (self.ids, self.attn, self.target_mask, self.idx)))


def make_batch(seqs, starts, idx, pad_id: int) -> Batch:
    """Right-pad token lists; targets are positions >= start (start 0: every token but the first)."""
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        mask[i, max(st, 1):len(s)] = 1.0  # token 0 has no prediction
    return Batch(ids, attn, mask, torch.tensor(idx, dtype=torch.long))


def pad_of(tok) -> int:
    """The tokenizer's pad id, else EOS: the official scorer pads with EOS."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def left_pad(seqs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding for generation: every row's last prompt token sits at column T-1."""
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        attn[i, T - len(s):] = 1
    return ids, attn


def length_batches(lengths, max_batch: int, max_tokens: int):
    """Group indices sorted by length into batches of <= max_batch rows and <= max_tokens padded
    tokens: sorting cuts padding waste, the token cap bounds memory for long documents."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch = []
    for i in order:
        if batch and (len(batch) == max_batch or (len(batch) + 1) * lengths[i] > max_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


# -----------------------------------------------------------------------------
# log-probabilities


def token_logps(model, b: Batch) -> torch.Tensor:
    """(B, T-1) log p(ids[:, t+1] | ids[:, :t+1]), zero where target_mask[:, 1:] is 0. fp32 softmax."""
    logits = model(input_ids=b.ids, attention_mask=b.attn, use_cache=False).logits[:, :-1]  # (B, T-1, V); no KV cache
    logp = -F.cross_entropy(logits.float().transpose(1, 2), b.ids[:, 1:], reduction="none")
    return logp * b.target_mask[:, 1:]


def seq_logps(model, b: Batch) -> torch.Tensor:
    """(B,) summed answer-token log-probability log pi(y|x) of each row."""
    return token_logps(model, b).sum(-1)


def nll_sum(model, b: Batch) -> torch.Tensor:
    """Sum of answer-token negative log-likelihoods of a batch (scalar)."""
    return -token_logps(model, b).sum()


@torch.no_grad()  # not inference_mode: FSDP must not create its unsharded parameters as inference tensors
def reference_logps(model, batches, n: int, autocast) -> torch.Tensor:
    """log pi_ref(y_i|x_i) of every item i, once, before training (NPO's frozen reference), from
    the training micro-batches themselves: the same rows, padding and autocast give the same
    rounding, so log pi_theta - log pi_ref is exactly 0 at step 0, in bf16 too. Rows without
    targets (dist's padding rows) are skipped; items never in `batches` stay 0."""
    out = torch.zeros(n, dtype=torch.float64)
    device = next(model.parameters()).device
    for b in batches:
        b = b.to(device)
        with autocast:
            lp = seq_logps(model, b).double().cpu()
        real = (b.target_mask[:, 1:].sum(-1) > 0).cpu()
        out[b.idx.cpu()[real]] = lp[real]
    return out


# -----------------------------------------------------------------------------
# the training loop (one for every method, and for building the tiny target)


class TrainingDiverged(RuntimeError):
    pass


def lr_at(step: int, total: int, lr: float, warmup: int, schedule: str) -> float:
    """Linear warmup over `warmup` steps, then constant or linear decay to 0 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "linear":
        return lr * max(0.0, (total - step) / max(1, total - warmup))
    assert schedule == "constant", f"unknown schedule {schedule!r}"
    return lr


def plan_steps(n_forget: int, n_retain: int, batch_size: int, grad_accum: int, epochs: float,
               max_steps: int, seed: int, lengths=None, chunk_size: int = 0,
               retain_ratio: int = 1) -> list[list[tuple[list[int], list[int]]]]:
    """Optimizer steps as lists of micro-batches (forget indices, retain indices).

    The forget set is shuffled once (seeded) and cut into chunks of chunk_size items (0: one chunk,
    the whole set), unlearned one after the other (sequential unlearning, AILS-NTUA's recipe).
    Within a chunk, its micro-batches of batch_size rows are formed once and visited in a new
    seeded order each epoch, grad_accum of them per step, for `epochs` epochs (max_steps > 0:
    that many steps per chunk instead); the last partial step of an epoch is kept (its loss is
    normalised by its own totals). A row thus always meets the same batch partners and padding,
    which is what lets NPO's reference log-probs be computed once, in exactly the shapes training
    uses (methods.npo_prepare). Each forget micro-batch of b rows is paired with retain_ratio * b
    retain rows drawn at random, grouped by forget row (empty when n_retain is 0).
    With `lengths` (building the tiny target; one chunk), the forget set is reshuffled every epoch
    instead, and each window of 16 micro-batches is sorted by length before it is cut, so rows of
    a micro-batch have similar lengths (less padding) while the windows stay random.
    """
    rng = random.Random(seed)
    chunks = [None]  # None: micro-batches formed afresh each epoch (lengths)
    if lengths is None:
        order = list(range(n_forget))
        rng.shuffle(order)
        size = chunk_size or max(n_forget, 1)
        chunks = [[c[k:k + batch_size] for k in range(0, len(c), batch_size)]
                  for c in (order[j:j + size] for j in range(0, n_forget, size))]
    else:
        assert chunk_size == 0, "sequential chunks keep micro-batches fixed: not with lengths"
    steps = []
    for fixed in chunks:
        n = n_forget if fixed is None else sum(map(len, fixed))
        total = max_steps if max_steps > 0 else math.ceil(epochs * math.ceil(n / (batch_size * grad_accum)))
        queue, start = [], len(steps)
        while len(steps) - start < total:
            if not queue:
                queue = epoch_micro_batches(rng, n_forget, batch_size, fixed, lengths)
            micros = []
            for f in queue[:grad_accum]:
                r = [rng.randrange(n_retain) for _ in range(retain_ratio * len(f))] if n_retain else []
                micros.append((f, r))
            queue = queue[grad_accum:]
            steps.append(micros)
    return steps


def epoch_micro_batches(rng, n_forget: int, batch_size: int, fixed=None, lengths=None) -> list[list[int]]:
    """One epoch's forget micro-batches in visiting order: the fixed ones in a new order, or (no
    fixed ones) a fresh shuffle of the items, length-sorted within windows when lengths are given."""
    if fixed is not None:
        return rng.sample(fixed, len(fixed))
    order = list(range(n_forget))
    rng.shuffle(order)
    if lengths is not None:
        w = 16 * batch_size
        order = [i for k in range(0, n_forget, w) for i in sorted(order[k:k + w], key=lengths.__getitem__)]
        micro = [order[k:k + batch_size] for k in range(0, n_forget, batch_size)]
        rng.shuffle(micro)
        order = [i for m in micro for i in m]
    return [order[k:k + batch_size] for k in range(0, n_forget, batch_size)]


def step_totals(micros) -> dict:
    """What one optimizer step's loss terms are divided by, summed over all its micro-batches:
    answer tokens and sequences, forget and retain. A loss term is a sum over the step's tokens
    (or sequences) divided by its total, so k micro-batches give the same gradient as one batch
    of the same examples (token-normalised accumulation)."""
    totals = {"forget_tokens": 0.0, "forget_seqs": 0.0, "retain_tokens": 0.0, "retain_seqs": 0.0}
    for forget, retain in micros:
        totals["forget_tokens"] += float(forget.target_mask[:, 1:].sum())
        # a sequence counts if it has targets: a padding row (see dist.skip_padding) counts nowhere
        totals["forget_seqs"] += float((forget.target_mask[:, 1:].sum(-1) > 0).sum())
        if retain is not None:
            totals["retain_tokens"] += float(retain.target_mask[:, 1:].sum())
            totals["retain_seqs"] += float((retain.target_mask[:, 1:].sum(-1) > 0).sum())
    return totals


def disable_dropout(model) -> None:
    """Dropout off for training: unlearning compares the policy with its reference (NPO's
    log-ratio, KL's distributions), and a dropout mask in train mode would make them differ at
    step 0 on a target whose config has dropout (as TRL's preference trainers do too). nn.Dropout
    modules get p = 0; HF attention modules read their `attention_dropout` attribute."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def train(model, steps, loss_fn, *, lr: float, warmup: int = 0, schedule: str = "constant",
          clip: float = 1.0, precision: str = "fp32", device=None, log=None, dist=None, after_step=None):
    """AdamW over `steps` (each a list of (forget Batch, retain Batch|None) micro-batches): the short
    reference loop (job.unlearn is the same loop with a run's scoring and checkpoints between steps).

    loss_fn(model, forget, retain, totals) -> (loss, {term: float}) for one micro-batch, already
    divided by the step's totals (step_totals). Manual AMP: autocast for bf16/fp16, a GradScaler
    for fp16 only (bf16 has fp32's exponent range). A non-finite loss, or (without a GradScaler,
    which skips such steps itself) a non-finite gradient norm, raises TrainingDiverged before the
    optimizer step, so the weights are never updated with it. Dropout is off (disable_dropout);
    the model leaves in eval mode however the loop ends. after_step(steps_done, opt, scaler) runs
    after every step with the model in eval mode (a timer's stamp), and training goes on in train mode.
    """
    device = device or next(model.parameters()).device
    autocast = autocast_ctx(device, precision)
    opt, scaler = optimizer_and_scaler(model, lr, precision, device, dist)  # bf16 weights: stochastic rounding
    disable_dropout(model)
    model.train()
    history = []
    try:
        for step in range(len(steps)):
            rec = train_step(model, opt, scaler, steps[step], loss_fn, step=step, lr=lr_at(step, len(steps), lr,
                             warmup, schedule), clip=clip, autocast=autocast, device=device, dist=dist)
            history.append(rec)
            if log is not None:
                log(rec)
            if after_step is not None:
                model.eval()
                after_step(step + 1, opt, scaler)
                model.train()
    finally:
        model.eval()
    return history


def optimizer_and_scaler(model, lr: float, precision: str, device, dist=None):
    """(AdamW over the trainable weights (make_optimizer), the GradScaler: enabled for fp16 only)."""
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return make_optimizer([p for p in model.parameters() if p.requires_grad], lr, dist), scaler


def train_step(model, opt, scaler, micros, loss_fn, *, step: int, lr: float, clip: float, autocast,
               device, dist=None) -> dict:
    """One optimizer step over its micro-batches; the log record of the step."""
    t0 = time.time()
    micros = [(f.to(device), r.to(device) if r is not None else None) for f, r in micros]
    totals = step_totals(micros)
    if dist is not None:
        totals = dist.all_reduce_dict(totals)
    for group in opt.param_groups:
        group["lr"] = lr
    loss_sum, terms_sum = 0.0, {}
    for k, (forget, retain) in enumerate(micros):
        if dist is not None:  # reduce-scatter gradients only on the last micro-batch
            dist.set_sync(model, k == len(micros) - 1)
        with autocast:
            loss, terms = loss_fn(model, forget, retain, totals)
        scaler.scale(loss).backward()
        loss_sum += loss.item()
        for name, v in terms.items():
            terms_sum[name] = terms_sum.get(name, 0.0) + v
    if dist is not None:
        loss_sum = dist.all_reduce_float(loss_sum)
        terms_sum = dist.all_reduce_dict(terms_sum)
    if not math.isfinite(loss_sum):
        opt.zero_grad(set_to_none=True)
        raise TrainingDiverged(
            f"step {step}: loss is {loss_sum} ({terms_sum}); stopping without saving. "
            "Lower --lr, use --precision fp32/bf16, or raise --beta for NPO.")
    scaler.unscale_(opt)
    params = [p for group in opt.param_groups for p in group["params"]]
    gnorm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
    if not math.isfinite(gnorm) and not scaler.is_enabled():  # fp16: the scaler skips the step
        opt.zero_grad(set_to_none=True)
        raise TrainingDiverged(
            f"step {step}: loss {loss_sum:.4g} is finite but the gradient norm is {gnorm}; stopping without "
            "saving. Lower --lr or use --precision fp32.")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    ntok = sum(int(f.attn.sum()) + (int(r.attn.sum()) if r is not None else 0) for f, r in micros)
    if dist is not None:
        ntok = int(dist.all_reduce_float(ntok))
    dt = time.time() - t0
    return {"step": step, "loss": loss_sum, **terms_sum, "grad_norm": gnorm,
            "lr": opt.param_groups[0]["lr"], "tokens_per_s": ntok / max(dt, 1e-9)}


# -----------------------------------------------------------------------------
# AdamW for bf16 weights: stochastic rounding, no lost updates


def round_stochastic(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x (fp32) -> bf16, rounded up with probability = the fraction of the gap to the next bf16, so
    E[result] = x: add 16 random bits below bf16's mantissa to the fp32 bits, truncate. Round-to-nearest
    drops updates under half an ulp: 19% of the mass applied at lr 1e-5 on N(0, 0.02) (tests/test_sr.py)."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=gen)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 = 0xFFFF0000


class StochasticAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (no amsgrad) for weights of any dtype: the step is computed in fp32 and written
    back to bf16 weights and moments with round_stochastic (expected update = the fp32 step); fp32
    tensors get torch's single-tensor step op for op. States as torch's, in the weight's dtype; the fp32
    work runs in chunks of 2^24 elements (~0.3 GiB transient). The bits come from a generator per
    device seeded with `seed`, whose state travels in state_dict() (a resumed run continues it)."""
    CHUNK = 1 << 24

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed, self.generators = seed, {}

    def generator(self, device) -> torch.Generator:
        if str(device) not in self.generators:
            self.generators[str(device)] = torch.Generator(device).manual_seed(self.seed)
        return self.generators[str(device)]

    def state_dict(self):
        return {**super().state_dict(), "generators": {d: g.get_state() for d, g in self.generators.items()}}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        for d, s in state_dict.pop("generators", {}).items():
            self.generator(d).set_state(s)
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):  # closure: torch.distributed.checkpoint calls step(closure=None)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # torch's layout: a CPU fp32 step, moments like the weight
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                local = [t.to_local() if hasattr(t, "to_local") else t  # FSDP2: this rank's shard
                         for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                flat = [t.view(-1) for t in local]
                for k in range(0, flat[0].numel(), self.CHUNK):
                    self.update(*(t[k:k + self.CHUNK] for t in flat), group, float(state["step"]))

    def update(self, w, g, m, v, group, step: float) -> None:
        """One AdamW step on 1-D slices, in place (Loshchilov & Hutter 2019, Alg. 2; torch's order):
        w *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
        w -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps), per element (no reduction)."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        w32, m32, v32, g32 = (t if t.dtype == torch.float32 else t.float() for t in (w, m, v, g))
        w32.mul_(1 - lr * wd)
        m32.lerp_(g32, 1 - beta1)
        v32.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
        denom = (v32.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
        w32.addcdiv_(m32, denom, value=-lr / (1 - beta1 ** step))
        for dst, src in ((w, w32), (m, m32), (v, v32)):
            if dst.dtype != torch.float32:
                dst.copy_(round_stochastic(src, self.generator(dst.device)))


def make_optimizer(params, lr: float, dist=None) -> torch.optim.Optimizer:
    """AdamW, no weight decay; StochasticAdamW for bf16 weights (bf16-pure), seeded by seed_everything."""
    if any(p.dtype == torch.bfloat16 for p in params):
        return StochasticAdamW(params, lr=lr, weight_decay=0.0, seed=torch.initial_seed())
    # foreach=False: fused/foreach kernels are not implemented for every sharded (DTensor) layout
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=dist is None)


def print0(*a, **k):
    """Print on rank 0 only (RANK is set by torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, **k, flush=True)
