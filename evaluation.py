"""
What is scored: generations, MIA document losses and MMLU of a model, turned into the official
SemEval-2025 Task 4 results dict (metrics.aggregate), exactly as the official scorer
(evaluate_generations.py) computes them:

  regurgitation  ROUGE-L recall of the greedy continuation of every `sc` item's input
  knowledge      exact match of the greedy answer to every `qa` item's question
  MIA            loss of each whole member / nonmember document, labels = inputs
                 (`model(ids, labels=ids).loss`); AUC over minus the loss. From the same
                 forward, zlib, Min-K% and Min-K%++ (membership.py), their AUCs in "mia_attacks"
  MMLU           Open-Instruct's 5-shot prompt (shots dropped to fit), the highest next-token
                 logit among " A", " B", " C", " D"

    python run.py --method none      # score the tiny target as it is

Generation is generation.generate (batched, left padded, KV cache); the numbers are metrics.py's.
Named evaluation.py, not evaluate.py, which would shadow the `evaluate` package.
"""
import contextlib
import functools

import torch

import generation
import lume
import metrics
import membership
import progress as progress_lines

# -----------------------------------------------------------------------------
# MMLU


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
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=1, use_cache=False).logits
        out[idx] = logits[:, -1, choice_ids].float().cpu()
    return out


def mmlu_prefix_ids(tok, subject, shots, q) -> list[int]:
    """Token ids that every full-shot prompt of `subject` starts with: the header and the shots,
    tokenized alone, less their last token (BPE may merge it with the question's first characters;
    mmlu_choice_logits checks each question's ids start with these)."""
    k = min(5, len(shots))
    full = metrics.mmlu_prompt(subject, shots, q, k)
    return tok(full[:len(full) - len(metrics.mmlu_format(q, False))]).input_ids[:-1]


@functools.cache
def shared_prefix_classes():
    """(SharedPrefix, Cache), built once (transformers is imported lazily). SharedPrefix holds a
    prefix's keys and values (1, H, P, D) once for all B rows of a batch (a stride-0 expand, no copy
    per row); its update returns [prefix | the rows' suffix] for that layer's attention alone (SDPA
    takes one key tensor per row) and keeps nothing, so a batch holds the prefix once instead of B
    copies in every layer (32 copies of a 7B's 1.8k-token 5-shot prefix: ~34 GB)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class SharedPrefix(DynamicLayer):
        def __init__(self, k, v, B: int):
            super().__init__()
            self.keys, self.values = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)  # (B, H, P, D), views
            self.dtype, self.device, self.is_initialized = k.dtype, k.device, True

        def update(self, k, v, *args, **kwargs):  # k, v: (B, H, L, D) of the suffixes
            return torch.cat([self.keys, k], dim=-2), torch.cat([self.values, v], dim=-2)
    return SharedPrefix, Cache


def prefix_cache(prefix, B: int):
    """A cache for B rows that starts with `prefix` (a filled cache of one row), shared by reference."""
    SharedPrefix, Cache = shared_prefix_classes()
    return Cache(layers=[SharedPrefix(src.keys, src.values, B) for src in prefix.layers])


@torch.inference_mode()
def mmlu_shared_logits(model, tok, encoded, prefix, batch_size: int = 32, autocast=None):
    """({question index: (4,) logits}) for the questions whose ids start with `prefix`: the
    prefix's keys and values are computed once, then each batch of suffixes (the question, its
    choices and 'Answer:', about 20% of a 5-shot prompt) attends to them, held once (prefix_cache). A suffix row is
    left-padded after the prefix: [prefix | pads | suffix], its positions P, P+1, ... count real
    tokens only, so it computes what the whole prompt computes alone."""
    P = len(prefix)
    mine = [i for i, e in enumerate(encoded) if P > 0 and len(e) > P and e[:P] == prefix]
    if not mine:
        return {}
    device = next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext()
    choice_ids = torch.tensor(metrics.mmlu_choice_ids(tok), device=device)
    key = generation.cache_keyword(model)
    shared = generation.kv_cache(P)
    with autocast:
        model(input_ids=torch.tensor([prefix], device=device), position_ids=torch.arange(P, device=device)[None],
              use_cache=True, logits_to_keep=1, **{key: shared})
    out = {}
    suffixes = [encoded[i][P:] for i in mine]
    for idx in lume.length_batches([len(s) for s in suffixes], batch_size, 1 << 30):
        ids, attn = lume.left_pad([suffixes[j] for j in idx], lume.pad_of(tok))
        ids, attn = ids.to(device), attn.to(device)
        B, L = ids.shape
        pos = P + (attn.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([attn.new_ones(B, P), attn], dim=1)  # (B, P + L)
        cache = prefix_cache(shared, B)
        with autocast:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                           **{key: cache}).logits
        for j, row in zip(idx, logits[:, -1, choice_ids].float().cpu()):
            out[mine[j]] = row
    return out


def mmlu_records(model, tok, dev, test, limit: int = 0, batch_size: int = 8, autocast=None, progress=None,
                 share_prefix: bool = True) -> list[tuple]:
    """(subject, predicted letter, answer letter) per question: 5-shot prompts (Open-Instruct
    protocol, from metrics.py) capped at 2,048 tokens, or the model's context when that is shorter;
    the prediction is the letter whose token gets the highest next-token logit after 'Answer:'.
    The shots' keys and values are computed once per subject (mmlu_shared_logits); a question whose
    cap dropped shots (its prompt does not start with the subject's) takes the whole-prompt path."""
    max_len = min(MMLU_MAX_TOKENS, getattr(model.config, "max_position_embeddings", MMLU_MAX_TOKENS))
    records, done, total = [], 0, sum(len(test[s][:limit] if limit else test[s]) for s in test)
    for subject in sorted(test):
        qs = test[subject][:limit] if limit else test[subject]
        shots = dev.get(subject, [])
        encoded = [mmlu_encode(tok, subject, shots, q, max_len) for q in qs]
        shared = mmlu_shared_logits(model, tok, encoded, mmlu_prefix_ids(tok, subject, shots, qs[0]),
                                    4 * batch_size, autocast) if share_prefix and shots and qs else {}
        rest = [i for i in range(len(qs)) if i not in shared]
        logits = torch.zeros(len(qs), 4)
        if rest:
            logits[rest] = mmlu_choice_logits(model, tok, [encoded[i] for i in rest], batch_size, autocast)
        for i, row in shared.items():
            logits[i] = row
        records += [(subject, "ABCD"[p], q.answer) for q, p in zip(qs, logits.argmax(-1).tolist())]
        done += len(qs)
        if progress:
            progress(done, total)
    return records


def mmlu_eval(model, tok, dev, test, limit: int = 0, batch_size: int = 8, autocast=None, progress=None) -> dict:
    """MMLU accuracy: average_acc over all questions, and per subject (metrics.mmlu_accuracy)."""
    return metrics.mmlu_accuracy(mmlu_records(model, tok, dev, test, limit, batch_size, autocast, progress))


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
    if mia_rows:  # beyond the official keys: the AUC of every MIA (membership.py), "loss" == mia_loss_acc
        results["mia_attacks"] = membership.mia_aucs(mia_rows)
    return results


def stage_bar(label: str, total: int, on: bool):
    """(progress callback, close) of one scoring stage: progress.Progress's line (one updating line on
    a terminal, a plain line every 10 s in a log), or nothing when the caller asked for no progress."""
    if not on or not total:
        return None, lambda: None
    bar = progress_lines.Progress(label, total)
    return (lambda done, _total: bar.update(done)), bar.close


def evaluate(model, tok, items, mia=None, mmlu=None, *, stage: str = "after", max_new_tokens: int = 256,
             batch_size: int = 32, mmlu_limit: int = 0, autocast=None, progress=None):
    """Score `items` (every task present), MIA documents and MMLU as the official scorer does.
    progress(done, total) follows the generations; with it, MIA and MMLU print their own lines.

    Returns (generation rows, MIA rows, MMLU dict or None, results dict with the official keys).
    """
    outs = generation.generate(model, tok, [it.input for it in items], max_new_tokens, batch_size, autocast=autocast,
                    progress=progress)
    gen_rows = generation_rows(items, outs, stage)
    mia_rows = []
    for name in ("member", "nonmember") if mia else ():
        tick, close = stage_bar(f"scoring {stage}: MIA {name} documents", len(mia[name]), progress is not None)
        stats = membership.doc_stats(model, tok, [d.document for d in mia[name]], autocast=autocast, progress=tick)
        close()
        mia_rows += [{"stage": stage, "set": name, "id": d.id, **v} for d, v in zip(mia[name], stats)]
    mmlu_res = None
    if mmlu:
        n = sum(len(qs[:mmlu_limit] if mmlu_limit else qs) for qs in mmlu[1].values())
        tick, close = stage_bar(f"scoring {stage}: MMLU questions", n, progress is not None)
        mmlu_res = mmlu_eval(model, tok, *mmlu, limit=mmlu_limit, autocast=autocast, progress=tick)
        close()
    return gen_rows, mia_rows, mmlu_res, official_results(gen_rows, mia_rows, mmlu_res)
