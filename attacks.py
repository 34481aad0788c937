"""
Is it really forgotten? Stronger membership inference and robustness attacks (issue 14).

  MIA beyond the loss attack, on the official member / nonmember documents, from the same batched
  forward pass as the official document losses (evaluation.doc_stats calls doc_scores here):
    loss       mean token NLL (the official mia_loss_acc)
    zlib       mean token NLL / zlib-compressed length in bytes (Carlini et al. 2021, USENIX Sec.)
    min_k_K    mean of the lowest K% token log-probs (Shi et al. 2024, ICLR, "Min-K% Prob")
    min_k_pp_K the same over standardised log-probs (Zhang et al. 2025, ICLR, "Min-K%++")
  -> results.json "mia_attacks" {loss, zlib, min_k_20, min_k_40, min_k_pp_20, min_k_pp_40} (AUCs).

  Robustness attacks on the unlearned model, after the after-evaluation (--attacks):
    quant8   round-to-nearest, symmetric, per output channel, int8 in [-127, 127]
    quant4   round-to-nearest, symmetric, groups of 128 along the input dim, int4 in [-7, 7]
             (Zhang et al. 2025, ICLR, "Catastrophic failure of LLM unlearning via quantization")
    relearn  fine-tune on half T of the forget QA items, score the other half V
             (Deeb & Roger 2024, "Do unlearning methods remove information from LM weights?")
  -> results.json "robustness": per attack the official results after it and the recovery.

    python run.py --task 1 --method npo --attacks all

Every attack runs on the model in place and restores its weights bit for bit afterwards
(`restored`), so a saved model (--save, written before) and later code never see them.
"""
import contextlib
import hashlib
import zlib

import numpy as np
import torch
import torch.nn.functional as F

import lume
import metrics

# -----------------------------------------------------------------------------
# MIA scores of one document from its token log-probs (the same pass as the official loss)

MIN_K = (20, 40)  # percent of a document's tokens that Min-K% and Min-K%++ average over
SIGMA_FLOOR = 1e-6  # Min-K%++ divides by sigma: a (numerically) one-hot next-token distribution has 0


def next_token_moments(logits: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) next-token logits -> (mu, sigma), each (N,) fp32: mean and standard deviation of
    log p(z) for z drawn from the model's own next-token distribution p (Min-K%++, eq. 2):
        mu = sum_z p_z log p_z,   sigma^2 = sum_z p_z (log p_z)^2 - mu^2.
    Chunks of `chunk` positions bound the extra (chunk, V) fp32 memory."""
    mus, sigmas = [], []
    for part in logits.split(chunk):
        logp = F.log_softmax(part.float(), dim=-1)  # finite for finite logits; p may underflow to 0
        p = logp.exp()
        mu = (p * logp).sum(-1)
        # the centred form sum_z p_z (log p_z - mu)^2 (equal to the one above): in fp32 the
        # difference E[(log p)^2] - mu^2 cancels catastrophically when p is near uniform (a
        # random or ascended-into-noise model: mu^2 ~ 30, sigma^2 ~ 1e-3), measured 5e-5 off
        var = (p * (logp - mu[:, None]).square()).sum(-1)
        mus.append(mu)
        sigmas.append(var.sqrt())
    if not mus:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(mus), torch.cat(sigmas)


def min_k(x: torch.Tensor, pct: int) -> float:
    """Mean of the lowest pct% of the values x (n,): floor(pct * n / 100) of them, at least one
    (as the Min-K% reference code's int(len * ratio), which would take none below 1/ratio tokens)."""
    n = x.numel()
    if n == 0:
        return float("nan")
    m = max(1, pct * n // 100)  # integer arithmetic: no 0.2 * 15 = 3.0000000000000004 surprises
    return torch.topk(x.double(), m, largest=False).values.mean().item()


def zlib_bytes(text: str) -> int:
    """Length in bytes of the zlib-compressed UTF-8 document (Carlini et al.'s zlib entropy)."""
    return len(zlib.compress(text.encode("utf-8")))


def doc_scores(text: str, loss: float, logp: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> dict:
    """The extra MIA statistics of one document (its mia.jsonl columns) from its official mean
    token NLL `loss` and, per predicted token t (every token but the first; (n,) each):
    logp = log p(x_t | x_<t), mu / sigma the moments of next_token_moments at that position.
      zlib        = loss / zlib_bytes(text)                  lower = member
      min_k_K     = mean of the lowest K% of logp            higher = member
      min_k_pp_K  = mean of the lowest K% of (logp - mu) / sigma   higher = member
    (sigma floored at SIGMA_FLOOR.)"""
    z = (logp.float() - mu) / sigma.clamp(min=SIGMA_FLOOR)
    out = {"zlib": loss / zlib_bytes(text)}
    for k in MIN_K:
        out[f"min_k_{k}"] = min_k(logp, k)
    for k in MIN_K:
        out[f"min_k_pp_{k}"] = min_k(z, k)
    return out


# -----------------------------------------------------------------------------
# MIA AUCs: members positive, every score oriented so that higher = member (as metrics.mia_auc
# turns the loss into minus the loss); 0.5 = chance, the official mia_loss_acc convention

SIGNS = {"loss": -1.0, "zlib": -1.0, **{f"min_k_{k}": 1.0 for k in MIN_K}, **{f"min_k_pp_{k}": 1.0 for k in MIN_K}}


def mia_aucs(rows) -> dict:
    """{attack: ROC-AUC} over mia.jsonl rows of one stage (set 'member' / 'nonmember'); "loss"
    equals the official mia_loss_acc exactly (same scores, same metrics.roc_auc)."""
    out = {}
    for name, sign in SIGNS.items():
        scores = {s: np.asarray([r[name] for r in rows if r["set"] == s], dtype=np.float64) for s in ("member", "nonmember")}
        out[name] = metrics.roc_auc(sign * scores["member"], sign * scores["nonmember"])
    return out


# -----------------------------------------------------------------------------
# weights: round-to-nearest quantisation, saved and restored

QMAX = {8: 127, 4: 7}  # symmetric ranges [-127, 127] and [-7, 7]: zero is exact, no offset
GROUP = {8: None, 4: 128}  # 8-bit: one scale per output channel (row); 4-bit: per 128 inputs


def quant_rows(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """Dequantised symmetric RTN of fp32 x (..., g), one scale per last-dim row:
        s = absmax / qmax,  q = clamp(round(x / s), -qmax, qmax),  x' = q s,  |x - x'| <= s / 2.
    Idempotent bit for bit: the row's largest element comes back as fl(qmax * fl(absmax / qmax)),
    which rounds back to absmax (0 exceptions in 10^7 draws per qmax; an arbitrary s would not: 1% of
    them fail fl(fl(127 s) / 127) == s), so a second pass finds the same s and the same q. An
    all-zero row has s = 0 and stays 0."""
    s = x.abs().amax(-1, keepdim=True) / qmax
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return (x / safe).round().clamp(-qmax, qmax) * s


def fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, in) weight -> its dequantised `bits`-bit RTN in w's dtype (math in fp32). 4-bit:
    groups of 128 consecutive inputs of a row; when `in` is not a multiple of 128 the last group
    of each row is the remaining in % 128 inputs, with its own scale."""
    x, qmax, g = w.float(), QMAX[bits], GROUP[bits]
    if g is None or x.shape[1] <= g:
        return quant_rows(x, qmax).to(w.dtype)
    n = x.shape[1] // g * g
    parts = [quant_rows(x[:, :n].reshape(x.shape[0], -1, g), qmax).reshape(x.shape[0], n)]
    if n < x.shape[1]:
        parts.append(quant_rows(x[:, n:], qmax))
    return torch.cat(parts, 1).to(w.dtype)


def local(p: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: an FSDP2 DTensor's shard (whole rows: FSDP2 shards dim 0,
    so per-row and per-group scales are computed on one rank), else p itself."""
    return p.to_local() if hasattr(p, "to_local") else p


def quantisable(model) -> list[tuple[str, torch.nn.Linear]]:
    """Every nn.Linear but the output head: bitsandbytes (LLM.int8, FP4/NF4 via transformers)
    keeps lm_head in full precision by default, and so do we (a tied head would also quantise the
    input embeddings)."""
    head = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


@torch.no_grad()
def quantise_(model, bits: int) -> int:
    """Replace every quantisable weight by its dequantised RTN in place; the number of layers."""
    layers = quantisable(model)
    for _, m in layers:
        w = local(m.weight)
        if w.numel():  # a rank may hold no rows of a small layer
            w.copy_(fake_quant(w, bits))
    return len(layers)


@contextlib.contextmanager
def restored(model):
    """Run the body on the model in place; afterwards every parameter is its value from before,
    bit for bit (a host copy: 28 GB for a 7B in fp32; buffers are never changed by an attack)."""
    saved = {n: local(p).detach().to("cpu", copy=True) for n, p in model.named_parameters()}
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                local(p).copy_(saved[n])
        model.eval()


# -----------------------------------------------------------------------------
# relearning: fine-tune on T, score V (never trained on)


def split_halves(items, seed: int) -> tuple[list, list]:
    """(T, V): the items ordered by sha256(f"{seed}:{id}"), T the first floor(n/2), V the rest.
    Depends only on the ids and the seed, not on the items' order."""
    key = lambda it: hashlib.sha256(f"{seed}:{it.id}".encode()).hexdigest()  # noqa: E731
    ordered = sorted(items, key=key)
    return ordered[:len(ordered) // 2], ordered[len(ordered) // 2:]


def relearn_recipe(tiny: bool, batch_size: int) -> dict:
    """Steps and lr of the relearning fine-tune: the unlearning default lr of each scale (1e-4 on
    the tiny target, 1e-5 on 7B, as Deeb & Roger's few-epoch fine-tunes), 10 AdamW steps of
    `batch_size` T items, constant lr, clip 1."""
    return {"lr": 1e-4 if tiny else 1e-5, "steps": 10, "batch_size": batch_size}


def nll_loss(model, batch, _retain, totals):
    """Relearning loss: answer-token NLL, token-normalised over the step (sum over the step's
    answer tokens / their number; prompt and padding masked)."""
    nll = lume.nll_sum(model, batch) / totals["forget_tokens"]
    return nll, {"relearn_nll": nll.item()}


def relearn_(model, tok, train_items, recipe: dict, *, seed: int, device, precision: str, record=None,
             dist=None):
    """Fine-tune the model in place on train_items (NLL on the answers); record(ids) is called
    with the item ids of every micro-batch trained on (tests check that V never is). Under
    torchrun (dist) on the sharded model itself, each rank on its rows of every micro-batch
    (dist.Dist.shard_steps), as unlearning trains: the update is the one-process one."""
    enc = [lume.encode_pair(tok, it.input, it.output) for it in train_items]
    plan = lume.plan_steps(len(enc), 0, recipe["batch_size"], 1, 0, recipe["steps"], seed)
    pad = lume.pad_of(tok)

    def batch(f):
        return lume.make_batch([enc[i][0] for i in f], [enc[i][1] for i in f], f, pad)
    if record is not None:
        for micros in plan:
            for f, _ in micros:
                record([train_items[i].id for i in f])
    if dist is not None:
        steps, loss = dist.shard_steps(plan, batch, None), dist.skip_padding(nll_loss)
    else:
        steps, loss = [[(batch(f), None) for f, _ in micros] for micros in plan], nll_loss
    return lume.train(model, steps, loss, lr=recipe["lr"], precision=precision, device=device, dist=dist)


# -----------------------------------------------------------------------------
# the attacks of a run and their recovery figures

NAMES = ("quant8", "quant4", "relearn")


def parse(value: str) -> list[str]:
    """--attacks value -> attack names in NAMES order ('' = none, 'all' = every one); ValueError
    naming the unknown ones."""
    asked = [s.strip() for s in value.split(",") if s.strip()]
    if "all" in asked:
        return list(NAMES)
    bad = [a for a in asked if a not in NAMES]
    if bad:
        raise ValueError(f"unknown attack(s) {', '.join(map(repr, bad))}; choose from {', '.join(NAMES)} or all")
    return [a for a in NAMES if a in asked]


def recovery(before, after, attacked):
    """(attacked - after) / (before - after): 0 = the attack brought nothing back, 1 = all of what
    unlearning removed. None without a before score or when unlearning changed nothing (0 / 0)."""
    if before is None or after is None or attacked is None or before == after:
        return None
    return (attacked - after) / (before - after)


def forget_recovery(results: dict, attacked: dict, tasks) -> dict:
    """{'Task1': {'regurgitation': r, 'knowledge': k}} for every unlearned task, from the stages'
    forget-set scores (results: "before" (maybe absent) and "after")."""
    out = {}
    for t in tasks:
        key, get = f"Task{t}", lambda res, k, t=f"Task{t}": res["forget-set"][t][k] if res else None  # noqa: E731
        if key in attacked["forget-set"]:
            out[key] = {name: recovery(get(results.get("before"), score), get(results["after"], score),
                                       get(attacked, score))
                        for score, name in (("regurgitation-score", "regurgitation"), ("knowledge-score", "knowledge"))}
    return out


def knowledge_on(gen_rows, ids, stage: str):
    """Mean exact match of the generation rows of `stage` whose id is in ids; None without any."""
    vals = [r["score"] for r in gen_rows if r["stage"] == stage and r["id"] in ids]
    return float(np.mean(vals)) if vals else None


def run(names, model, tok, forget_items, scored: dict, score, *, tasks, seed: int, recipe: dict, device,
        precision: str, record=None, dist=None) -> tuple[dict, list, list]:
    """Each attack in turn on the model in place, weights restored after each: ("robustness"
    dict, generation rows, MIA rows). score(stage) -> (generation rows, MIA rows, results) scores
    every item (and MIA and MMLU as configured), as the before/after stages are scored."""
    robustness, gens, mias = {}, [], []
    for name in names:
        extra = {}
        with restored(model):
            if name in ("quant8", "quant4"):
                bits = int(name[-1])
                extra = {"layers": quantise_(model, bits), "bits": bits, "group": GROUP[bits] or "output channel"}
            else:
                T, V = split_halves([it for it in forget_items if it.kind == "qa"], seed)
                relearn_(model, tok, T, recipe, seed=seed, device=device, precision=precision, record=record,
                         dist=dist)
                extra = {"recipe": recipe, "n_T": len(T), "n_V": len(V)}
            g, m, res = score(name)
        gens, mias = gens + g, mias + m
        entry = {**res, "recovery": forget_recovery(scored["results"], res, tasks), **extra}
        if name == "relearn":
            v = {it.id for it in V}
            kv = {s: knowledge_on(scored["generations"] + g, v, s) for s in ("before", "after", "relearn")}
            entry["V_knowledge"] = {"before": kv["before"], "after": kv["after"], "relearned": kv["relearn"],
                                    "recovery": recovery(kv["before"], kv["after"], kv["relearn"])}
        robustness[name] = entry
    return robustness, gens, mias


def summary(robustness: dict) -> str:
    """One line per attack: the forget scores' recovery (a user's first question: did it come back?)."""
    lines = []
    for name, entry in robustness.items():
        parts = [f"{t} {k} {'-' if v is None else f'{v:+.2f}'}" for t, rec in entry["recovery"].items()
                 for k, v in rec.items()]
        if "V_knowledge" in entry:
            vk = entry["V_knowledge"]
            fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
            parts.append(f"V knowledge {fmt(vk['before'])} -> {fmt(vk['after'])} -> relearned {fmt(vk['relearned'])}")
        lines.append(f"attack {name}: recovery " + ", ".join(parts))
    return "\n".join(lines + ["(recovery: 0 = nothing came back, 1 = back to before unlearning)"] if lines else [])
