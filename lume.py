"""
LUME engine: loading, batching, the one training loop, batched generation, evaluation.

    python run.py --task 1 --method npo                   # tiny embedded target, CPU, minutes
    python run.py --task 1 --method npo --model olmo-7b   # the released SemEval target (GPU)

Everything model-facing lives here; the losses are in methods.py, the numbers in metrics.py,
the data in data.py. Paper: Ramakrishna et al. 2025, "LUME: LLM Unlearning with Multitask
Evaluations", arXiv 2502.15097. The official SemEval-2025 Task 4 scorer (evaluate_generations.py)
is the protocol we reproduce: raw `input` as the prompt (no chat template), greedy decoding,
256 new tokens, new tokens decoded with special tokens skipped; MIA score = loss of the whole
document with labels = inputs.
"""
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import metrics

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


def _first_line(e: BaseException) -> str:
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
            f"error: cannot load model {name!r} ({model_path}, tokenizer {tok_path}) from {where}: {_first_line(e)}. "
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
    mask: torch.Tensor   # (B, T) 1 on tokens that are predicted targets (answer tokens)
    idx: torch.Tensor    # (B,) index of each row's item in its source list (NPO reference lookup)

    def to(self, device):
        return Batch(*(t.to(device) for t in (self.ids, self.attn, self.mask, self.idx)))


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
    """(B, T-1) log p(ids[:, t+1] | ids[:, :t+1]), zero where mask[:, 1:] is 0. fp32 softmax."""
    logits = model(input_ids=b.ids, attention_mask=b.attn).logits[:, :-1]  # (B, T-1, V)
    logp = -F.cross_entropy(logits.float().transpose(1, 2), b.ids[:, 1:], reduction="none")
    return logp * b.mask[:, 1:]


def seq_logps(model, b: Batch) -> torch.Tensor:
    """(B,) summed answer-token log-probability log pi(y|x) of each row."""
    return token_logps(model, b).sum(-1)


@torch.inference_mode()
def reference_logps(model, batches, n: int, ctx) -> torch.Tensor:
    """log pi_ref(y_i|x_i) for every item i, once, before training (NPO's frozen reference)."""
    out = torch.zeros(n, dtype=torch.float64)
    for b in batches:
        with ctx:
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


def step_norm(micros) -> dict:
    """Normalisers for one optimizer step, summed over all its micro-batches: a loss term is
    a sum over the step's tokens (or sequences) divided by these, so k micro-batches give the
    same gradient as one batch of the same examples (token-normalised accumulation)."""
    norm = {"f_tok": 0.0, "f_seq": 0.0, "r_tok": 0.0, "r_seq": 0.0}
    for fb, rb in micros:
        norm["f_tok"] += float(fb.mask[:, 1:].sum())
        # a sequence counts if it has targets: a padding row (see skip_padding) counts nowhere
        norm["f_seq"] += float((fb.mask[:, 1:].sum(-1) > 0).sum())
        if rb is not None:
            norm["r_tok"] += float(rb.mask[:, 1:].sum())
            norm["r_seq"] += float((rb.mask[:, 1:].sum(-1) > 0).sum())
    return norm


def train(model, steps, loss_fn, *, lr: float, warmup: int = 0, schedule: str = "constant",
          clip: float = 1.0, precision: str = "fp32", device=None, log=None, dist=None):
    """AdamW over `steps` (each a list of (forget Batch, retain Batch|None) micro-batches).

    loss_fn(model, fb, rb, norm) -> (loss, {term: float}) for one micro-batch, already divided by
    the step's normalisers. Manual AMP: autocast for bf16/fp16, a GradScaler for fp16 only
    (bf16 has fp32's exponent range). A non-finite loss raises TrainingDiverged before the
    optimizer step, so the weights are never updated with it.
    """
    device = device or next(model.parameters()).device
    ctx = autocast_ctx(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach=False: fused/foreach kernels are not implemented for every sharded (DTensor) layout
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=dist is None)
    model.train()
    history = []
    for step, micros in enumerate(steps):
        t0 = time.time()
        micros = [(fb.to(device), rb.to(device) if rb is not None else None) for fb, rb in micros]
        norm = step_norm(micros)
        if dist is not None:
            norm = dist.all_reduce_dict(norm)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, len(steps), lr, warmup, schedule)
        loss_sum, terms_sum = 0.0, {}
        for k, (fb, rb) in enumerate(micros):
            if dist is not None:  # reduce-scatter gradients only on the last micro-batch
                dist.set_sync(model, k == len(micros) - 1)
            with ctx:
                loss, terms = loss_fn(model, fb, rb, norm)
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
        ntok = sum(int(fb.attn.sum()) + (int(rb.attn.sum()) if rb is not None else 0) for fb, rb in micros)
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
             max_tokens: int = 16384, ctx=None, progress=None) -> list[str]:
    """Greedy completions of raw prompts (no chat template), batched by prompt length."""
    device = next(model.parameters()).device
    ctx = ctx or contextlib.nullcontext()
    enc = [tok(p).input_ids for p in prompts]
    outs = [None] * len(prompts)
    pad = pad_of(tok)
    done = 0
    for idx in length_batches([len(e) for e in enc], batch_size, max_tokens):
        ids, attn = left_pad([enc[i] for i in idx], pad)
        with ctx:
            new = greedy(model, ids.to(device), attn.to(device), max_new_tokens, tok.eos_token_id)
        for i, row in zip(idx, new.tolist()):
            outs[i] = decode_new(tok, row)
        done += len(idx)
        if progress:
            progress(done, len(prompts))
    return outs


# -----------------------------------------------------------------------------
# MIA losses and MMLU


@torch.inference_mode()
def doc_losses(model, tok, docs, batch_size: int = 16, max_tokens: int = 16384, ctx=None) -> list[float]:
    """Mean token NLL of each whole document (labels = inputs), as `model(ids, labels=ids).loss`
    of the official scorer, computed in length-sorted right-padded batches."""
    device = next(model.parameters()).device
    ctx = ctx or contextlib.nullcontext()
    enc = [tok(d).input_ids for d in docs]
    pad = pad_of(tok)
    out = [None] * len(docs)
    for idx in length_batches([len(e) for e in enc], batch_size, max_tokens):
        b = make_batch([enc[i] for i in idx], [0] * len(idx), idx, pad).to(device)
        # next-token labels, -100 (ignored) on padding and after each row's last token
        labels = b.ids.roll(-1, dims=1).masked_fill(b.mask.roll(-1, dims=1) == 0, -100)
        with ctx:
            logits = model(input_ids=b.ids, attention_mask=b.attn).logits  # (B, T, V)
        # cross_entropy over a contiguous (B*T, V) view, as HF's loss does: the (B, V, T) layout
        # of token_logps is ~3x slower on CPU for log_softmax over the vocabulary
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
        loss = nll.view(labels.shape).sum(-1) / b.mask[:, 1:].sum(-1)
        for i, v in zip(idx, loss.tolist()):
            out[i] = v
    return out


def mmlu_encode(tok, subject, shots, q, max_len: int) -> list[int]:
    """Token ids of the 5-shot prompt, shots dropped from the end until it fits `max_len`. When
    even the 0-shot prompt is too long (a small context), its last max_len tokens are kept:
    the question's end and 'Answer:' are what the prediction needs."""
    n_tokens = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731  (Open-Instruct counts so)
    try:
        return tok(metrics.mmlu_fit_prompt(subject, shots, q, n_tokens, max_len)).input_ids
    except ValueError:
        return tok(metrics.mmlu_prompt(subject, shots, q, k=0)).input_ids[-max_len:]


@torch.inference_mode()
def mmlu_eval(model, tok, dev, test, limit: int = 0, batch_size: int = 8, ctx=None) -> dict:
    """5-shot MMLU (Open-Instruct protocol, prompts from metrics.py): the answer is the letter
    whose token gets the highest next-token logit after 'Answer:'."""
    device = next(model.parameters()).device
    ctx = ctx or contextlib.nullcontext()
    max_len = getattr(model.config, "max_position_embeddings", 2048)
    choice_ids = torch.tensor(metrics.mmlu_choice_ids(tok), device=device)
    pad = pad_of(tok)
    records = []
    for subject in sorted(test):
        qs = test[subject][:limit] if limit else test[subject]
        enc = [mmlu_encode(tok, subject, dev.get(subject, []), q, max_len) for q in qs]
        for idx in length_batches([len(e) for e in enc], batch_size, 1 << 30):
            ids, attn = left_pad([enc[i] for i in idx], pad)
            ids, attn = ids.to(device), attn.to(device)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            with ctx:
                logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=1).logits
            pick = logits[:, -1, choice_ids].argmax(-1).tolist()
            records += [(subject, "ABCD"[p], qs[i].answer) for i, p in zip(idx, pick)]
    return metrics.mmlu_accuracy(records)


# -----------------------------------------------------------------------------
# evaluation: generations + MIA + MMLU -> the official results dict


def generation_rows(items, outs, stage: str) -> list[dict]:
    """One generations.jsonl row per item (evaluate and evaluate_sharded)."""
    return [{"id": it.id, "task": f"Task{it.task}", "input": it.input, "expected_output": it.output,
             "model_output": out, "stage": stage, "split": it.split, "kind": it.kind,
             "score": metrics.score_item(it.kind, it.output, out)} for it, out in zip(items, outs, strict=True)]


def official_results(gen_rows, mia_rows, mmlu_res) -> dict:
    """The official results dict of one stage: aggregate of the generation rows, with the MIA AUC
    (members vs nonmembers of mia_rows; none without rows) and MMLU's average_acc when given."""
    auc = None
    if mia_rows:
        auc = metrics.mia_auc([r["loss"] for r in mia_rows if r["set"] == "member"],
                              [r["loss"] for r in mia_rows if r["set"] == "nonmember"])
    return metrics.aggregate(gen_rows, mia_auc=auc, mmlu_average=mmlu_res["average_acc"] if mmlu_res else None)


def evaluate(model, tok, items, mia=None, mmlu=None, *, stage: str = "after", max_new_tokens: int = 256,
             batch_size: int = 32, mmlu_limit: int = 0, ctx=None, progress=None):
    """Score `items` (every task present), MIA documents and MMLU as the official scorer does.

    Returns (generation rows, MIA rows, MMLU dict or None, results dict with the official keys).
    """
    outs = generate(model, tok, [it.input for it in items], max_new_tokens, batch_size, ctx=ctx,
                    progress=progress)
    gen_rows = generation_rows(items, outs, stage)
    mia_rows = []
    for name in ("member", "nonmember") if mia else ():
        losses = doc_losses(model, tok, [d.document for d in mia[name]], ctx=ctx)
        mia_rows += [{"stage": stage, "set": name, "id": d.id, "loss": v} for d, v in zip(mia[name], losses)]
    mmlu_res = mmlu_eval(model, tok, *mmlu, limit=mmlu_limit, ctx=ctx) if mmlu else None
    return gen_rows, mia_rows, mmlu_res, official_results(gen_rows, mia_rows, mmlu_res)


# -----------------------------------------------------------------------------
# the tiny embedded target: a BPE tokenizer and an OLMo-architecture model that memorised the data

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


def tiny_target(items, cache_dir, device=None, log=print, recipe=None, config=None) -> Path:
    """Directory of a tiny target that memorised `items` (forget and retain, all tasks, full
    input + output sequences, as the released targets were fine-tuned); built once, then reused."""
    from transformers import OlmoForCausalLM
    recipe, config = {**TINY_RECIPE, **(recipe or {})}, {**TINY, **(config or {})}
    path = Path(cache_dir) / f"tiny-{fingerprint(items, {'recipe': recipe, 'config': config})}"
    if (path / "model.safetensors").exists():
        log(f"tiny target: reusing {path}")
        return path
    t0 = time.time()
    log(f"tiny target: building {path} ({len(items)} items; once, then cached)")
    tok = train_tokenizer([t for it in items for t in (it.input, it.output)], config["vocab_size"])
    torch.manual_seed(recipe["seed"])
    model = OlmoForCausalLM(tiny_config(tok, **config)).to(device or "cpu")
    seqs = [encode_pair(tok, it.input, it.output)[0] for it in items]
    steps = plan_steps(len(seqs), 0, recipe["batch_size"], 1, recipe["epochs"], 0, recipe["seed"],
                       lengths=[len(s) for s in seqs])
    steps = [[(make_batch([seqs[i] for i in f], [0] * len(f), f, tok.pad_token_id), None)
              for f, _ in micros] for micros in steps]
    import methods
    last = {}
    def log_every(rec):
        last.update(rec)
        if rec["step"] % 50 == 0 or rec["step"] == len(steps) - 1:
            log(f"tiny target: step {rec['step']}/{len(steps)} loss {rec['loss']:.4f} "
                f"({rec['tokens_per_s']:.0f} tok/s)")
    train(model, steps, methods.finetune, lr=recipe["lr"], warmup=recipe["warmup"], schedule="linear",
          log=log_every)
    save_model(model, tok, path)  # atomic: a half-built target is never taken for a cached one
    write_json_atomic(path / "lume_target.json", {"recipe": recipe, "config": config, "n_items": len(items),
                                                  "final_loss": last.get("loss"), "seconds": time.time() - t0})
    log(f"tiny target: built in {time.time() - t0:.0f}s, final loss {last.get('loss', float('nan')):.4f}")
    return path


# -----------------------------------------------------------------------------
# distributed: torchrun + FSDP2 (torch.distributed.fsdp.fully_shard); train() above stays plain
#
#   torchrun --nproc_per_node N run.py ...   # NCCL on cuda:LOCAL_RANK; without CUDA, gloo on CPU
#
# What is split across the N ranks, and why the result is the single-process one:
#   weights, grads, AdamW  1/N each: fully_shard on every decoder layer, then on the root (embeddings,
#                 final norm, head). --precision bf16: bf16 all-gather, compute and reduce-scatter
#                 over fp32 sharded master weights (micro-batches without sync also accumulate
#                 in bf16: a coarser sum than one GPU's fp32 grads); fp32, bf16-pure: no casting.
#   training      rank r takes rows r::N of every global micro-batch of plan_steps. step_norm's totals
#                 are all-reduced and gradients SUMMED over ranks (divide factor 1), so the update is
#                 the single-process one. Reduce-scatter runs on a step's last micro-batch only. A rank
#                 left without rows runs a padding row (no targets, loss x 0): FSDP forwards are
#                 collectives, so every rank must run each one.
#   NPO reference rows r::N of the forget set in lockstep batches, then summed over ranks.
#   KL reference  a second copy, loaded and sharded the same way, frozen.
#   evaluation    greedy decoding stops early per batch, which would break FSDP's lockstep: each
#                 rank gathers the full weights into a plain replica (7B: 14 GB bf16, 28 GB fp32)
#                 and scores a contiguous slice of the items, MIA documents and MMLU subjects; rows
#                 are all-gathered in item order, so each item is scored exactly once.
#   checkpoint    the full state dict is gathered to rank 0's CPU, which writes save_pretrained.
# Only rank 0 writes files and prints (print0).

COLLECTIVE_TIMEOUT = 7200  # s: ranks wait at a gather while the slowest one finishes its eval slice


class Dist:
    """This process's place in a torchrun job and the collectives the run needs
    (train() calls all_reduce_dict, all_reduce_float and set_sync)."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device, self.mesh = rank, world, device, None

    def all_reduce_dict(self, d: dict) -> dict:
        """{name: float} summed over ranks (same keys in the same order on every rank)."""
        import torch.distributed as tdist
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

    def gather(self, part: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank."""
        import torch.distributed as tdist
        parts = [None] * self.world
        tdist.all_gather_object(parts, part)
        return [x for p in parts for x in p]

    def on_rank0(self, fn):
        """fn() on rank 0 only (files, building the tiny target); its result, or its SystemExit,
        on every rank. Also a barrier."""
        import torch.distributed as tdist
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
        import gc
        import torch.distributed as tdist
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
    from datetime import timedelta
    import torch.distributed as tdist
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = not device.startswith("cpu") and torch.cuda.is_available()
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    where = f"MASTER_ADDR={os.environ.get('MASTER_ADDR')} MASTER_PORT={os.environ.get('MASTER_PORT')}"
    try:
        store, _, _ = next(tdist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
    except (RuntimeError, ValueError, OSError) as e:  # DistNetworkError, DistStoreError, unset variables
        raise SystemExit(
            f"error: rank {rank} of {world}: no rendezvous at {where} within {timeout:g}s "
            f"({_first_line(e)}). Start the job with `torchrun --nproc_per_node N run.py ...` "
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
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    assert precision != "fp16", "fp16 needs a sharded GradScaler: use --precision bf16 or bf16-pure"
    if dist.mesh is None:
        dist.mesh = init_device_mesh(dist.device.type, (dist.world,))
    bf16 = torch.bfloat16
    mp = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16) if precision == "bf16" else MixedPrecisionPolicy()
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    assert blocks, f"{type(model).__name__} declares no _no_split_modules: cannot find its decoder layers"
    for m in blocks + [model]:
        fully_shard(m, mesh=dist.mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):  # sum over ranks: every loss is divided by the global totals
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


def as_padding(b):
    """b without target tokens: a row a rank runs only to keep FSDP's collectives in lockstep."""
    return None if b is None else Batch(b.ids, b.attn, torch.zeros_like(b.mask), b.idx)


def skip_padding(loss_fn):
    """loss_fn giving 0 (loss and terms) on a padding micro-batch; step_norm counts it nowhere."""
    def fn(model, fb, rb, norm):
        loss, terms = loss_fn(model, fb, rb, norm)
        if fb.mask.sum() > 0:
            return loss, terms
        return loss * 0.0, dict.fromkeys(terms, 0.0)
    return fn


def shard_steps(plan, make_f, make_r, dist: Dist):
    """plan_steps' global micro-batches cut to this rank's rows: lists of (forget, retain|None) Batches."""
    steps = []
    for micros in plan:
        mine = []
        for f, r in micros:  # len(r) == len(f) or r == []: both slices are empty together
            rows, real = dist.rows(f)
            fb, rb = make_f(rows), (make_r(dist.rows(r)[0]) if r else None)
            mine.append((fb, rb) if real else (as_padding(fb), as_padding(rb)))
        steps.append(mine)
    return steps


@torch.no_grad()  # not inference_mode: FSDP must not create its unsharded parameters as inference tensors
def reference_logps_sharded(model, make, n: int, batch_size: int, dist: Dist, ctx) -> torch.Tensor:
    """reference_logps with rows split over ranks: global batches of batch_size * N items, rank r
    runs rows r::N of each; every item is computed on exactly one rank, a sum assembles them."""
    import torch.distributed as tdist
    out = torch.zeros(n, dtype=torch.float64, device=dist.device)
    for lo in range(0, n, batch_size * dist.world):
        rows, real = dist.rows(range(lo, min(lo + batch_size * dist.world, n)))
        with ctx:
            lp = seq_logps(model, make(rows).to(dist.device)).double()
        if real:
            out[rows] = lp
    model.reshard()  # the root stays unsharded after a no-grad forward, and its grads would be lost
    tdist.all_reduce(out)
    return out.cpu()


def plain_model(model, sd: dict):
    """A plain HF model of model.config holding sd's tensors (no copy) and model's buffers."""
    from transformers import AutoModelForCausalLM
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


def full_replica(model):
    """An unsharded copy of an FSDP model on every rank (all-gathered full state dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return plain_model(model, get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))


def save_sharded(model, tok, path, dist: Dist) -> None:
    """save_model of an FSDP model: the full state dict on rank 0's CPU, written by rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    dist.on_rank0(lambda: save_model(plain_model(model, sd), tok, path))


def evaluate_sharded(model, tok, items, mia=None, mmlu=None, *, dist: Dist, stage: str = "after",
                     max_new_tokens: int = 256, batch_size: int = 32, mmlu_limit: int = 0, ctx=None,
                     progress=None):
    """evaluate() of an FSDP model, each rank scoring a contiguous slice on a full replica; the
    same return value on every rank (progress counts rank 0's slice)."""
    replica = full_replica(model)
    lo, hi = dist.span(len(items))
    outs = dist.gather(generate(replica, tok, [it.input for it in items[lo:hi]], max_new_tokens,
                                batch_size, ctx=ctx, progress=progress))
    gen_rows = generation_rows(items, outs, stage)
    mia_rows = []
    if mia:
        docs = [(name, d) for name in ("member", "nonmember") for d in mia[name]]
        lo, hi = dist.span(len(docs))
        losses = dist.gather(doc_losses(replica, tok, [d.document for _, d in docs[lo:hi]], ctx=ctx))
        mia_rows = [{"stage": stage, "set": name, "id": d.id, "loss": v} for (name, d), v in zip(docs, losses)]
    mmlu_res = None
    if mmlu:  # whole subjects per rank; average_acc over all questions, as mmlu_accuracy
        dev, test = mmlu
        subjects = sorted(test)
        lo, hi = dist.span(len(subjects))
        mine = {s: test[s] for s in subjects[lo:hi]}
        acc = dict(dist.gather(list(mmlu_eval(replica, tok, dev, mine, limit=mmlu_limit, ctx=ctx)
                                    ["subject_acc"].items()) if mine else []))
        n = {s: len(test[s][:mmlu_limit] if mmlu_limit else test[s]) for s in subjects}
        mmlu_res = {"average_acc": sum(round(acc[s] * n[s]) for s in subjects) / sum(n.values()),
                    "subject_acc": {s: acc[s] for s in subjects}}
    return gen_rows, mia_rows, mmlu_res, official_results(gen_rows, mia_rows, mmlu_res)


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
