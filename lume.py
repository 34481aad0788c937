"""
LUME engine: device and precision, loading, encoding and batching, log-probabilities, the one
training loop, batched greedy generation, atomic writers.

    python run.py --task 1 --method npo                   # tiny embedded target, CPU, minutes
    python run.py --task 1 --method npo --model olmo-7b   # the released SemEval target (GPU)

Everything here is model-facing and method-agnostic. What is scored lives in evaluation.py, the
losses in methods.py, the numbers in metrics.py, the data in data.py, torchrun/FSDP2 in dist.py
and the embedded tiny target in tiny.py. Paper: Ramakrishna et al. 2025, "LUME: LLM Unlearning
with Multitask Evaluations", arXiv 2502.15097. The official SemEval-2025 Task 4 scorer
(evaluate_generations.py) is the protocol we reproduce: raw `input` as the prompt (no chat
template), greedy decoding, 256 new tokens, new tokens decoded with special tokens skipped.
"""
import contextlib
import json
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
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


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


def weight_dtype(precision: str) -> torch.dtype:
    # bf16-pure keeps weights, grads and AdamW states in bf16 (7B on one GPU); all else fp32 master
    return torch.bfloat16 if precision == "bf16-pure" else torch.float32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# model and tokenizer loading

# name -> (model repo, tokenizer repo). The released targets memorised all three tasks.
ALIASES = {
    "olmo-7b": ("llmunlearningsemeval2025organization/olmo-finetuned-semeval25-unlearning",
                "allenai/OLMo-7B-0724-Instruct-hf"),
    "olmo-1b": ("llmunlearningsemeval2025organization/olmo-1B-model-semeval25-unlearning",
                "allenai/OLMo-1B-0724-hf"),
}


def resolve_model(name: str) -> tuple[str, str]:
    """Alias, local directory or hub id -> (model path, tokenizer path)."""
    if name in ALIASES:
        return ALIASES[name]
    return name, name


def first_line(e: BaseException) -> str:
    """'ErrorType: first line of its message' (at most 300 characters): one line for a user."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0][:300].rstrip('.')}" if lines else type(e).__name__


def load_pretrained(name: str, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer with from_pretrained; one clear line when it cannot."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
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
        where = "this local directory" if is_local else "the hub"
        raise SystemExit(
            f"error: cannot load model {name!r} ({model_path}, tokenizer {tok_path}) from {where}: {first_line(e)}. "
            "Fix: pass a local directory written by save_pretrained (--model PATH); for the gated SemEval "
            "repos, accept their terms on the hub and log in (`hf auth login`) or set HF_TOKEN.") from None
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
    logits = model(input_ids=b.ids, attention_mask=b.attn).logits[:, :-1]  # (B, T-1, V)
    logp = -F.cross_entropy(logits.float().transpose(1, 2), b.ids[:, 1:], reduction="none")
    return logp * b.target_mask[:, 1:]


def seq_logps(model, b: Batch) -> torch.Tensor:
    """(B,) summed answer-token log-probability log pi(y|x) of each row."""
    return token_logps(model, b).sum(-1)


def nll_sum(model, b: Batch) -> torch.Tensor:
    """Sum of answer-token negative log-likelihoods of a batch (scalar)."""
    return -token_logps(model, b).sum()


@torch.inference_mode()
def reference_logps(model, batches, n: int, autocast) -> torch.Tensor:
    """log pi_ref(y_i|x_i) for every item i, once, before training (NPO's frozen reference)."""
    out = torch.zeros(n, dtype=torch.float64)
    for b in batches:
        with autocast:
            out[b.idx.cpu()] = seq_logps(model, b).double().cpu()
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
               max_steps: int, seed: int, lengths=None) -> list[list[tuple[list[int], list[int]]]]:
    """Optimizer steps as lists of micro-batches (forget indices, retain indices).

    The forget set defines an epoch (shuffled each epoch); each forget micro-batch is paired
    with a retain micro-batch of the same size drawn at random (empty when n_retain is 0).
    The last partial step of an epoch is kept (its loss is normalised by its own counts).
    With `lengths`, each window of 16 micro-batches is sorted by length before it is cut, so
    rows of a micro-batch have similar lengths (less padding), and the windows stay random.
    """
    rng = random.Random(seed)
    per_step = batch_size * grad_accum
    steps_per_epoch = math.ceil(n_forget / per_step)
    total = max_steps if max_steps > 0 else math.ceil(epochs * steps_per_epoch)
    steps, order = [], []
    while len(steps) < total:
        if not order:
            order = list(range(n_forget))
            rng.shuffle(order)
            if lengths is not None:
                w = 16 * batch_size
                order = [i for k in range(0, n_forget, w) for i in sorted(order[k:k + w], key=lengths.__getitem__)]
                micro = [order[k:k + batch_size] for k in range(0, n_forget, batch_size)]
                rng.shuffle(micro)
                order = [i for m in micro for i in m]
        chunk, order = order[:per_step], order[per_step:]
        micros = []
        for i in range(0, len(chunk), batch_size):
            f = chunk[i:i + batch_size]
            r = [rng.randrange(n_retain) for _ in f] if n_retain else []
            micros.append((f, r))
        steps.append(micros)
    return steps


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


def train(model, steps, loss_fn, *, lr: float, warmup: int = 0, schedule: str = "constant",
          clip: float = 1.0, precision: str = "fp32", device=None, log=None, dist=None):
    """AdamW over `steps` (each a list of (forget Batch, retain Batch|None) micro-batches).

    loss_fn(model, forget, retain, totals) -> (loss, {term: float}) for one micro-batch, already
    divided by the step's totals (step_totals). Manual AMP: autocast for bf16/fp16, a GradScaler
    for fp16 only (bf16 has fp32's exponent range). A non-finite loss raises TrainingDiverged
    before the optimizer step, so the weights are never updated with it.
    """
    device = device or next(model.parameters()).device
    autocast = autocast_ctx(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach=False: fused/foreach kernels are not implemented for every sharded (DTensor) layout
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=dist is None)
    model.train()
    history = []
    for step, micros in enumerate(steps):
        t0 = time.time()
        micros = [(f.to(device), r.to(device) if r is not None else None) for f, r in micros]
        totals = step_totals(micros)
        if dist is not None:
            totals = dist.all_reduce_dict(totals)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, len(steps), lr, warmup, schedule)
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
            raise TrainingDiverged(
                f"step {step}: loss is {loss_sum} ({terms_sum}); stopping without saving. "
                "Lower --lr, use --precision fp32/bf16, or raise --beta for NPO.")
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ntok = sum(int(f.attn.sum()) + (int(r.attn.sum()) if r is not None else 0) for f, r in micros)
        if dist is not None:
            ntok = int(dist.all_reduce_float(ntok))
        dt = time.time() - t0
        rec = {"step": step, "loss": loss_sum, **terms_sum, "grad_norm": float(gnorm),
               "lr": opt.param_groups[0]["lr"], "tokens_per_s": ntok / max(dt, 1e-9)}
        history.append(rec)
        if log is not None:
            log(rec)
    model.eval()
    return history


# -----------------------------------------------------------------------------
# generation: batched greedy decoding, left padding, KV cache


def preallocated_cache(capacity: int):
    """A KV cache whose keys and values live in buffers allocated once for `capacity` positions.

    DynamicCache appends each token with torch.cat, re-copying (and re-allocating) the whole
    cache every step, so decoding long left-padded batches was memory-bound on CPU (bench model,
    2 cores, the 64 longest bench prompts x 128 new tokens: 19-28 s with DynamicCache, 12-13 s
    with this). StaticCache avoids the copy but attends over all `capacity` slots from the first
    step. Here each step writes one slot and attention sees views of the filled part: exactly
    the keys and values DynamicCache holds.
    """
    from transformers.cache_utils import Cache, DynamicLayer

    class BufferLayer(DynamicLayer):
        def update(self, k, v, *args, **kwargs):
            if not self.is_initialized:
                B, H, _, D = k.shape  # (B, heads, T, head_dim)
                self.kbuf, self.vbuf = k.new_empty(B, H, capacity, D), v.new_empty(B, H, capacity, v.shape[-1])
                self.dtype, self.device, self.n, self.is_initialized = k.dtype, k.device, 0, True
            n, T = self.n, k.shape[-2]
            assert n + T <= capacity, f"KV cache of {capacity} positions is full"
            self.kbuf[:, :, n:n + T], self.vbuf[:, :, n:n + T] = k, v
            self.n = n + T
            self.keys, self.values = self.kbuf[:, :, :n + T], self.vbuf[:, :, :n + T]
            return self.keys, self.values

    return Cache(layer_class_to_replicate=BufferLayer)


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, attn: torch.Tensor, max_new_tokens: int, eos_id: int) -> torch.Tensor:
    """(B, T) left-padded prompts -> (B, N) new tokens, N <= max_new_tokens, EOS-filled after EOS.

    Positions count real tokens only ((cumsum - 1) on the mask), so a left-padded row sees
    the same positions as the same prompt alone, and pads are masked out of attention.
    """
    B, T = ids.shape
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = preallocated_cache(T + max_new_tokens)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1)  # (B,)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    new = []
    for t in range(max_new_tokens):
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        new.append(nxt)
        done |= nxt == eos_id
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        attn = torch.cat([attn, attn.new_ones(B, 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos,
                    past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
    return torch.stack(new, dim=1) if new else ids.new_zeros(B, 0)


def clean_up_tokenization(text: str) -> str:
    """The space clean-up the official scorer gets from `batch_decode(..., clean_up_tokenization_spaces=True)`
    (transformers 4.x applied it to every tokenizer; 5.x skips it for BPE, so we apply it ourselves)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def decode_new(tok, new_ids) -> str:
    """New tokens up to the first EOS, special tokens skipped, as the official scorer decodes."""
    ids = list(new_ids)
    if tok.eos_token_id in ids:
        ids = ids[:ids.index(tok.eos_token_id)]
    return clean_up_tokenization(tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


@torch.inference_mode()
def generate(model, tok, prompts, max_new_tokens: int = 256, batch_size: int = 32,
             max_tokens: int = 16384, autocast=None, progress=None) -> list[str]:
    """Greedy completions of raw prompts (no chat template), batched by prompt length."""
    device = next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext()
    enc = [tok(p).input_ids for p in prompts]
    outs = [None] * len(prompts)
    pad = pad_of(tok)
    done = 0
    for idx in length_batches([len(e) for e in enc], batch_size, max_tokens):
        ids, attn = left_pad([enc[i] for i in idx], pad)
        with autocast:
            new = greedy(model, ids.to(device), attn.to(device), max_new_tokens, tok.eos_token_id)
        for i, row in zip(idx, new.tolist()):
            outs[i] = decode_new(tok, row)
        done += len(idx)
        if progress:
            progress(done, len(prompts))
    return outs


# -----------------------------------------------------------------------------
# files: atomic writes, never a silent overwrite


def write_atomic(path, write) -> None:
    """write(tmp) beside path, then one rename: a reader never sees a half-written file or dir."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_json_atomic(path, obj) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def write_jsonl_atomic(path, rows) -> None:
    write_atomic(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))


def save_model(model, tok, path) -> None:
    """save_pretrained (safetensors) and the tokenizer into a temporary directory, then one rename."""
    assert not Path(path).exists(), f"{path} exists; refusing to overwrite a checkpoint"

    def write(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    write_atomic(path, write)


def print0(*a, **k):
    """Print on rank 0 only (RANK is set by torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, **k, flush=True)
