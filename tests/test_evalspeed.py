"""Faster scoring computes what the slower one did: MIA statistics over chunks of tokens equal the
whole-logits computation (the pre-issue-23 doc_stats, reference_doc_stats below) within fp32
tolerance; MMLU with each subject's 5-shot prefix computed once picks the same letters as whole
prompts, with the real tokenizer on every subject (a sample of questions each; the full 14,042 is
run by hand: docs/performance.md), including questions whose 2,048-token cap dropped shots; and
each scoring stage prints its progress line.
"""
import random

import pytest
import torch
import torch.nn.functional as F

import data
import evaluation
import lume
import membership
import metrics


def reference_moments(logits):
    """The Min-K%++ moments as doc_stats computed them before the fused pass: their own log-softmax."""
    logp = F.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    return mu, (p * (logp - mu[:, None]).square()).sum(-1).sqrt()


@torch.inference_mode()
def reference_doc_stats(model, tok, docs, batch_size=16):
    """doc_stats before issue 23: the batch's whole (B, T, V) logits, then NLL and moments."""
    enc = [tok(d).input_ids for d in docs]
    out = [None] * len(docs)
    for idx in lume.length_batches([len(e) for e in enc], batch_size, 16384):
        b = lume.make_batch([enc[i] for i in idx], [0] * len(idx), idx, lume.pad_of(tok))
        labels = b.ids.roll(-1, dims=1).masked_fill(b.target_mask.roll(-1, dims=1) == 0, -100)
        logits = model(input_ids=b.ids, attention_mask=b.attn).logits
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
        loss = nll.view(labels.shape).sum(-1) / b.target_mask[:, 1:].sum(-1)
        valid = labels != -100
        mu, sigma = reference_moments(logits[valid])
        counts = valid.sum(-1).tolist()
        logp = (-nll.view(labels.shape)[valid]).split(counts)
        for i, v, lp, m, s in zip(idx, loss.tolist(), logp, mu.split(counts), sigma.split(counts)):
            out[i] = {"loss": v, **membership.doc_scores(docs[i], v, lp, m, s)}
    return out


def test_chunked_mia_statistics_equal_the_whole_logits_ones(small_target, small_data):
    model, tok = small_target
    items, _ = small_data
    docs = [it.input + " " + it.output for it in items][:9]
    ref = reference_doc_stats(model, tok, docs, batch_size=4)
    for chunk in (7, 0):  # chunks that cut rows (7 tokens), and one chunk per batch
        got = membership.doc_stats(model, tok, docs, batch_size=4, chunk=chunk)
        for a, b in zip(got, ref):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), (chunk, k)


def test_one_log_softmax_gives_the_loss_and_moments_bit_for_bit():
    """token_stats (one log-softmax, blocks of rows) equals F.cross_entropy and the two-pass moments
    exactly: the fused pass changes no bit of mia.jsonl."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 777, generator=g) * 4
    logits[0] = 0.0  # uniform: sigma 0
    logits[1, 5] = 80.0  # one-hot to fp32 precision: p underflows to 0 elsewhere
    y = torch.randint(0, 777, (300,), generator=g)
    mu, sigma = reference_moments(logits)
    for rows in (64, 7, 1000):
        nll, m, s = membership.token_stats(logits, y, rows=rows)
        assert torch.equal(nll, F.cross_entropy(logits, y, reduction="none"))
        assert torch.equal(m, mu) and torch.equal(s, sigma), rows
    nll, m, s = membership.token_stats(logits, y, moments=False)
    assert m is None and s is None and torch.equal(nll, F.cross_entropy(logits, y, reduction="none"))


def test_mia_peak_memory_does_not_grow_with_the_batch(small_target, small_data, monkeypatch):
    """The largest logits block the statistics see is `chunk` rows, however many tokens a batch has."""
    model, tok = small_target
    items, _ = small_data
    docs = [it.input + " " + it.output for it in items][:8]
    seen = []
    real = membership.token_stats
    monkeypatch.setattr(membership, "token_stats", lambda x, *a, **k: seen.append(x.shape[0]) or real(x, *a, **k))
    membership.doc_stats(model, tok, docs, batch_size=8, chunk=16)
    assert max(seen) == 16 and sum(seen) > 64  # many tokens, never more than 16 at once


def test_mia_batches_hold_many_short_or_few_long_documents_within_the_token_budget(small_target, small_data):
    """A batch is <= MIA_ROWS rows and <= max_tokens padded tokens (mia_tokens on this device by
    default), every document in exactly one batch: short ones share a batch, long ones do not."""
    model, tok = small_target
    items, _ = small_data
    docs = [it.input + " " + it.output for it in items] + ["word " * 300]  # one longer than the budget / 2
    shapes = []
    hook = model.get_decoder().register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["input_ids"].shape)),
                                                         with_kwargs=True)
    try:
        membership.doc_stats(model, tok, docs, max_tokens=256)
        default = len(shapes)
        membership.doc_stats(model, tok, docs)
    finally:
        hook.remove()
    assert all(b * t <= 256 or b == 1 for b, t in shapes[:default]) and sum(b for b, _ in shapes[:default]) == len(docs)
    assert max(b for b, _ in shapes[:default]) > 4 and (1, len(tok(docs[-1]).input_ids)) in shapes[:default]
    assert membership.mia_tokens(model.device) == 1024 and membership.mia_tokens("cuda") == 8192
    assert all(b <= membership.MIA_ROWS and b * t <= 1024 for b, t in shapes[default:])


@pytest.fixture(scope="module")
def mmlu(shared):
    return data.load_mmlu(shared / "mmlu")


def test_mmlu_shared_prefix_picks_what_whole_prompts_pick(olmo, mmlu, monkeypatch):
    model, tok = olmo
    dev, test = mmlu
    rng = random.Random(0)
    sample = {s: rng.sample(qs, 1) for s, qs in test.items()}  # every subject, a question each
    assert len(sample) == 57
    calls = []
    real = evaluation.mmlu_shared_logits
    monkeypatch.setattr(evaluation, "mmlu_shared_logits", lambda *a, **k: calls.append(r := real(*a, **k)) or r)
    shared = evaluation.mmlu_records(model, tok, dev, sample)
    whole = evaluation.mmlu_records(model, tok, dev, sample, share_prefix=False)
    assert shared == whole
    assert sum(len(c) for c in calls) >= 50  # most questions really took the shared-prefix path
    # the logits themselves, on a few subjects: within fp32 tolerance of the whole prompts'
    for s in list(sample)[:3]:
        enc = [evaluation.mmlu_encode(tok, s, dev[s], q) for q in sample[s]]
        a = real(model, tok, enc, evaluation.mmlu_prefix_ids(tok, s, dev[s], sample[s][0]))
        b = evaluation.mmlu_choice_logits(model, tok, enc)
        assert len(a) == len(enc)
        torch.testing.assert_close(torch.stack([a[i] for i in range(len(enc))]), b, rtol=1e-4, atol=1e-4)


def test_mmlu_questions_whose_cap_dropped_shots_take_the_whole_prompt_path(olmo, mmlu, monkeypatch):
    model, tok = olmo
    dev, test = mmlu
    subject = "high_school_biology"
    qs = test[subject][:12]
    full = sorted(len(tok(metrics.mmlu_prompt(subject, dev[subject], q)).input_ids) for q in qs)
    cap = full[len(full) // 2]  # a cap half the 5-shot prompts are over: those drop shots
    monkeypatch.setattr(model.config, "max_position_embeddings", cap)
    enc = [evaluation.mmlu_encode(tok, subject, dev[subject], q, cap) for q in qs]
    prefix = evaluation.mmlu_prefix_ids(tok, subject, dev[subject], qs[0])
    kept = [e[:len(prefix)] == prefix for e in enc]
    assert any(kept) and not all(kept)
    shared = evaluation.mmlu_records(model, tok, dev, {subject: qs})
    assert shared == evaluation.mmlu_records(model, tok, dev, {subject: qs}, share_prefix=False)
    got = evaluation.mmlu_shared_logits(model, tok, enc, prefix)
    assert sorted(got) == [i for i, k in enumerate(kept) if k]


def test_each_scoring_stage_prints_progress(small_target, small_data, capsys, monkeypatch):
    model, tok = small_target
    monkeypatch.setattr(evaluation, "official_results", lambda *a: {})  # two items: not every task
    items, mia = small_data
    q = data.MmluQuestion("math", "What is 2 + 2?", ("3", "4", "5", "6"), "B")
    evaluation.evaluate(model, tok, items[:2], mia, ({"math": [q]}, {"math": [q, q]}), max_new_tokens=2,
                        progress=lambda done, total: None)
    out = capsys.readouterr().out
    assert f"MIA member documents {len(mia['member'])}/{len(mia['member'])}" in out
    assert f"MIA nonmember documents {len(mia['nonmember'])}/" in out and "MMLU questions 2/2" in out
    evaluation.evaluate(model, tok, items[:2], mia, None, max_new_tokens=2)
    assert "MIA" not in capsys.readouterr().out  # no progress asked (tests, bench), no lines
