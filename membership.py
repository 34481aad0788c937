"""
The MIA statistics of every evaluation: per whole member / nonmember document, from one batched
forward pass, the official loss and the stronger membership-inference scores, and their AUCs.

  loss       mean token NLL, labels = inputs: `model(ids, labels=ids).loss` of the official scorer
             (metrics.official_doc_loss is the one-document reference, tested equal)
  zlib       mean token NLL / zlib-compressed length in bytes (Carlini et al. 2021, USENIX Sec.)
  min_k_K    mean of the lowest K% token log-probs (Shi et al. 2024, ICLR, "Min-K% Prob")
  min_k_pp_K the same over standardised log-probs (Zhang et al. 2025, ICLR, "Min-K%++")
-> mia.jsonl's columns per document; results.json "mia_attacks" {loss, zlib, min_k_20, ...} (AUCs);
"loss" is the official mia_loss_acc.

doc_stats runs the decoder once per length-sorted batch (~1k tokens on a CPU) and the LM head over
chunks of predicted tokens, so memory stays bounded whatever the batch; token_stats takes one log-softmax
per position for the NLL and the moments.
The robustness attacks that reuse these scores live in attacks.py.
"""
import contextlib
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


STATS_ROWS = 64  # positions per log-softmax block: (64, V) fp32 temporaries stay in cache (64 x 50,304 = 12.9 MB)


def token_stats(logits: torch.Tensor, labels: torch.Tensor, moments: bool = True, rows: int = STATS_ROWS):
    """(n, V) next-token logits, (n,) labels -> (nll, mu, sigma), each (n,) fp32, from one
    log-softmax per position (the official loss and the Min-K%++ moments share it):
        nll   = -log p(label)                       F.cross_entropy(reduction="none"): nll_loss(log_softmax)
        mu    = sum_z p_z log p_z                   Min-K%++ (eq. 2): mean of log p(z), z ~ p
        sigma = sqrt(sum_z p_z (log p_z - mu)^2)    its standard deviation
    mu and sigma are None when moments=False. The work goes `rows` positions at a time, so each
    pass over a (rows, V) block reads it from cache, not memory; every value is per position, so
    the block size changes no bit."""
    nll, mus, sigmas = [], [], []
    for part, y in zip(logits.split(rows), labels.split(rows)):
        logp = F.log_softmax(part.float(), dim=-1)  # finite for finite logits; p may underflow to 0
        nll.append(-logp.gather(1, y[:, None])[:, 0])
        if not moments:
            continue
        p = logp.exp()
        tmp = torch.mul(p, logp)
        mu = tmp.sum(-1)
        # the centred form sum_z p_z (log p_z - mu)^2, not E[(log p)^2] - mu^2: in fp32 that
        # difference cancels catastrophically when p is near uniform (a random or ascended-into-noise
        # model: mu^2 ~ 30, sigma^2 ~ 1e-3), measured 5e-5 off. In place in tmp: no more (rows, V) buffers
        var = torch.sub(logp, mu[:, None], out=tmp).square_().mul_(p).sum(-1)
        mus.append(mu)
        sigmas.append(var.sqrt())
    cat = lambda xs: torch.cat(xs) if xs else logits.new_zeros(0, dtype=torch.float32)  # noqa: E731
    return cat(nll), (cat(mus) if moments else None), (cat(sigmas) if moments else None)


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
    logp = log p(x_t | x_<t), mu / sigma the moments of token_stats at that position.
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
# the batched forward: every document's statistics


def body_and_head(model):
    """(the decoder without the LM head, the head) when the logits are head(hidden) and nothing
    more (OLMo, Llama: no soft-capping or logit scale), else None (the whole model's logits)."""
    c = model.config
    if any(getattr(c, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    try:
        body, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return (body, head) if body is not None and head is not None else None


MIA_CHUNK = 1024  # predicted tokens per logits chunk: 1,024 x 50,304 fp32 = 206 MB, whatever the batch
# A batch is at most MIA_ROWS rows and mia_tokens(device) padded tokens: many short documents or a few
# long ones, and sorted lengths keep padding low. On a CPU ~1k tokens keep a batch's activations in
# cache: docs/repro/bench_mia.py measures every statistic of 200 LUME documents on bench.py's model in
# 16-22% less time than in batches of 16 rows and up to 16,384 tokens, and 43 MiB of live tensors against
# 145 MiB; either way at 0.9-0.99 of the speed of the model's bare forward over the same batches. A GPU's
# matmuls want more rows.
MIA_ROWS = 64


def mia_tokens(device) -> int:
    """Padded tokens per MIA batch on this device: 1,024 on a CPU (cache), 8,192 on a GPU (parallelism)."""
    return 1024 if torch.device(device).type == "cpu" else 8192


def mia_batches(tok, docs, batch_size: int, max_tokens: int, device):
    """(document indices, right-padded Batch on device) of doc_stats' batches: length-sorted, at most
    batch_size rows and max_tokens padded tokens (bench.py runs the bare forward over the same ones)."""
    enc, pad = [tok(d).input_ids for d in docs], lume.pad_of(tok)
    for idx in lume.length_batches([len(e) for e in enc], batch_size, max_tokens):
        yield idx, lume.make_batch([enc[i] for i in idx], [0] * len(idx), idx, pad).to(device)


@torch.inference_mode()
def doc_stats(model, tok, docs, batch_size: int = MIA_ROWS, max_tokens: int = 0, autocast=None,
              extra: bool = True, chunk: int = MIA_CHUNK, progress=None) -> list[dict]:
    """Per whole document: "loss", its mean token NLL (labels = inputs), as `model(ids,
    labels=ids).loss` of the official scorer (metrics.official_doc_loss, tested equal), and from
    the same forward the extra MIA statistics of doc_scores (zlib, Min-K%, Min-K%++),
    unless extra=False; length-sorted right-padded batches of at most batch_size rows and max_tokens
    padded tokens (0: mia_tokens(device)).

    Bounded memory: the decoder runs once per batch, and the LM head, the NLL and the next-token
    moments run over `chunk` predicted tokens at a time, so a batch never holds its (B, T, V)
    logits (8,192 x 50,304 fp32 = 1.6 GB, and as much again for their log-softmax); chunk 0 = one
    chunk per batch. The per-token values are the same either way; the loss sums them per row as before.
    Within a chunk, token_stats takes one log-softmax per position for the NLL and the
    moments (two before), over blocks of rows that stay in cache: the same bits, less memory traffic.
    """
    device = next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext()
    max_tokens = max_tokens or mia_tokens(device)
    split = body_and_head(model)
    out, done = [None] * len(docs), 0
    for idx, b in mia_batches(tok, docs, batch_size, max_tokens, device):
        # next-token labels, -100 (ignored) on padding and after each row's last token
        labels = b.ids.roll(-1, dims=1).masked_fill(b.target_mask.roll(-1, dims=1) == 0, -100)
        valid = labels != -100  # (B, T): the predicted positions, row-major = each row's tokens in order
        with autocast:
            if split:
                h = split[0](input_ids=b.ids, attention_mask=b.attn, use_cache=False).last_hidden_state[valid]  # (N, H)
            else:
                h = model(input_ids=b.ids, attention_mask=b.attn, use_cache=False).logits[valid]  # (N, V)
        nll, mu, sigma = [], [], []
        for part, y in zip(h.split(chunk or len(h)), labels[valid].split(chunk or len(h))):
            with autocast:
                logits = split[1](part) if split else part  # (n, V)
            n, m, s = token_stats(logits, y, moments=extra)  # one log-softmax for all three
            nll.append(n)
            if extra:
                mu.append(m), sigma.append(s)
        full = torch.zeros(labels.shape, device=device)  # (B, T) NLL, 0 where not predicted: summed per
        full[valid] = torch.cat(nll)  # row in the same order as before the chunks
        loss = full.sum(-1) / b.target_mask[:, 1:].sum(-1)
        done += len(idx)
        if progress:
            progress(done, len(docs))
        if not extra:  # the official loss alone (bench.py times it against model(ids, labels=ids))
            for i, v in zip(idx, loss.tolist()):
                out[i] = {"loss": v}
            continue
        counts = valid.sum(-1).tolist()
        logp = (-full[valid]).split(counts)
        mu, sigma = torch.cat(mu), torch.cat(sigma)
        for i, v, lp, m, s in zip(idx, loss.tolist(), logp, mu.split(counts), sigma.split(counts)):
            out[i] = {"loss": v, **doc_scores(docs[i], v, lp.cpu(), m.cpu(), s.cpu())}
    return out


def doc_losses(model, tok, docs, batch_size: int = MIA_ROWS, max_tokens: int = 0, autocast=None) -> list[float]:
    """Mean token NLL of each whole document (doc_stats' "loss", without the extra statistics)."""
    return [s["loss"] for s in doc_stats(model, tok, docs, batch_size, max_tokens, autocast, extra=False)]
