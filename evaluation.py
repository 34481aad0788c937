"""
What is scored: generations, MIA document losses and MMLU of a model, turned into the official
SemEval-2025 Task 4 results dict (metrics.aggregate), exactly as the official scorer
(evaluate_generations.py) computes them:

  regurgitation  ROUGE-L recall of the greedy continuation of every `sc` item's input
  knowledge      exact match of the greedy answer to every `qa` item's question
  MIA            loss of each whole member / nonmember document, labels = inputs
                 (`model(ids, labels=ids).loss`); AUC over minus the loss. From the same
                 forward, zlib, Min-K% and Min-K%++ (attacks.py), their AUCs in "mia_attacks"
  MMLU           Open-Instruct's 5-shot prompt (shots dropped to fit), the highest next-token
                 logit among " A", " B", " C", " D"

    python run.py --method none      # score the tiny target as it is

Generation is generation.generate (batched, left padded, KV cache); the numbers are metrics.py's.
Named evaluation.py, not evaluate.py, which would shadow the `evaluate` package.
"""
import contextlib

import torch
import torch.nn.functional as F

import attacks
import generation
import lume
import metrics

# -----------------------------------------------------------------------------
# MIA document losses and MMLU


@torch.inference_mode()
def doc_stats(model, tok, docs, batch_size: int = 16, max_tokens: int = 16384, autocast=None,
              extra: bool = True) -> list[dict]:
    """Per whole document: "loss", its mean token NLL (labels = inputs), as `model(ids,
    labels=ids).loss` of the official scorer, and from the same forward the extra MIA statistics
    of attacks.doc_scores (zlib, Min-K%, Min-K%++), unless extra=False; length-sorted right-padded
    batches."""
    device = next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext()
    enc = [tok(d).input_ids for d in docs]
    pad = lume.pad_of(tok)
    out = [None] * len(docs)
    for idx in lume.length_batches([len(e) for e in enc], batch_size, max_tokens):
        b = lume.make_batch([enc[i] for i in idx], [0] * len(idx), idx, pad).to(device)
        # next-token labels, -100 (ignored) on padding and after each row's last token
        labels = b.ids.roll(-1, dims=1).masked_fill(b.target_mask.roll(-1, dims=1) == 0, -100)
        with autocast:
            logits = model(input_ids=b.ids, attention_mask=b.attn).logits  # (B, T, V)
        # cross_entropy over a contiguous (B*T, V) view, as HF's loss does: the (B, V, T) layout
        # of token_logps is ~3x slower on CPU for log_softmax over the vocabulary
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
        loss = nll.view(labels.shape).sum(-1) / b.target_mask[:, 1:].sum(-1)
        if not extra:  # the official loss alone (bench.py times it against model(ids, labels=ids))
            for i, v in zip(idx, loss.tolist()):
                out[i] = {"loss": v}
            continue
        valid = labels != -100  # (B, T): the predicted positions, row-major = each row's tokens in order
        mu, sigma = attacks.next_token_moments(logits[valid])  # (N,) each
        counts = valid.sum(-1).tolist()
        logp = (-nll.view(labels.shape)[valid]).split(counts)
        for i, v, lp, m, s in zip(idx, loss.tolist(), logp, mu.split(counts), sigma.split(counts)):
            out[i] = {"loss": v, **attacks.doc_scores(docs[i], v, lp.cpu(), m.cpu(), s.cpu())}
    return out


def doc_losses(model, tok, docs, batch_size: int = 16, max_tokens: int = 16384, autocast=None) -> list[float]:
    """Mean token NLL of each whole document (doc_stats' "loss", without the extra statistics)."""
    return [s["loss"] for s in doc_stats(model, tok, docs, batch_size, max_tokens, autocast, extra=False)]


MMLU_MAX_TOKENS = 2048  # Open-Instruct's cap on the prompt, whatever the model's context


def mmlu_encode(tok, subject, shots, q, max_len: int = MMLU_MAX_TOKENS) -> list[int]:
    """Token ids of the 5-shot prompt, shots dropped from the end while it is longer than max_len
    (Open-Instruct: `while len(tokenized_prompt) > 2048: k -= 1`). When even the 0-shot prompt is
    too long (a small context), its last max_len tokens are kept: the question's end and 'Answer:'
    are what the prediction needs."""
    n_tokens = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731  (Open-Instruct counts so)
    try:
        return tok(metrics.mmlu_fit_prompt(subject, shots, q, n_tokens, max_len)).input_ids
    except ValueError:
        return tok(metrics.mmlu_prompt(subject, shots, q, k=0)).input_ids[-max_len:]


@torch.inference_mode()
def mmlu_choice_logits(model, tok, encoded, batch_size: int = 8, autocast=None) -> torch.Tensor:
    """(N, 4) next-token logits of " A", " B", " C", " D" after each encoded prompt, computed in
    length-sorted left-padded batches; positions count real tokens only, as for generation."""
    device = next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext()
    choice_ids = torch.tensor(metrics.mmlu_choice_ids(tok), device=device)
    out = torch.zeros(len(encoded), 4)
    for idx in lume.length_batches([len(e) for e in encoded], batch_size, 1 << 30):
        ids, attn = lume.left_pad([encoded[i] for i in idx], lume.pad_of(tok))
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        with autocast:
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=1).logits
        out[idx] = logits[:, -1, choice_ids].float().cpu()
    return out


def mmlu_records(model, tok, dev, test, limit: int = 0, batch_size: int = 8, autocast=None) -> list[tuple]:
    """(subject, predicted letter, answer letter) per question: 5-shot prompts (Open-Instruct
    protocol, from metrics.py) capped at 2,048 tokens, or the model's context when that is shorter;
    the prediction is the letter whose token gets the highest next-token logit after 'Answer:'."""
    max_len = min(MMLU_MAX_TOKENS, getattr(model.config, "max_position_embeddings", MMLU_MAX_TOKENS))
    records = []
    for subject in sorted(test):
        qs = test[subject][:limit] if limit else test[subject]
        encoded = [mmlu_encode(tok, subject, dev.get(subject, []), q, max_len) for q in qs]
        pick = mmlu_choice_logits(model, tok, encoded, batch_size, autocast).argmax(-1).tolist()
        records += [(subject, "ABCD"[p], q.answer) for q, p in zip(qs, pick)]
    return records


def mmlu_eval(model, tok, dev, test, limit: int = 0, batch_size: int = 8, autocast=None) -> dict:
    """MMLU accuracy: average_acc over all questions, and per subject (metrics.mmlu_accuracy)."""
    return metrics.mmlu_accuracy(mmlu_records(model, tok, dev, test, limit, batch_size, autocast))


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
    results = metrics.aggregate(gen_rows, mia_auc=auc, mmlu_average=mmlu_res["average_acc"] if mmlu_res else None)
    if mia_rows:  # beyond the official keys: the AUC of every MIA (attacks.py), "loss" == mia_loss_acc
        results["mia_attacks"] = attacks.mia_aucs(mia_rows)
    return results


def evaluate(model, tok, items, mia=None, mmlu=None, *, stage: str = "after", max_new_tokens: int = 256,
             batch_size: int = 32, mmlu_limit: int = 0, autocast=None, progress=None):
    """Score `items` (every task present), MIA documents and MMLU as the official scorer does.

    Returns (generation rows, MIA rows, MMLU dict or None, results dict with the official keys).
    """
    outs = generation.generate(model, tok, [it.input for it in items], max_new_tokens, batch_size, autocast=autocast,
                    progress=progress)
    gen_rows = generation_rows(items, outs, stage)
    mia_rows = []
    for name in ("member", "nonmember") if mia else ():
        stats = doc_stats(model, tok, [d.document for d in mia[name]], autocast=autocast)
        mia_rows += [{"stage": stage, "set": name, "id": d.id, **v} for d, v in zip(mia[name], stats)]
    mmlu_res = mmlu_eval(model, tok, *mmlu, limit=mmlu_limit, autocast=autocast) if mmlu else None
    return gen_rows, mia_rows, mmlu_res, official_results(gen_rows, mia_rows, mmlu_res)


