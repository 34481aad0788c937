"""Unlearning losses against hand computation on a toy model, and their defining identities."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lume
import methods


class Bigram(torch.nn.Module):
    """Toy causal LM whose next-token logits depend on the current token only: logits = W[token].
    Small enough to compute every log-probability by hand with explicit loops."""

    def __init__(self, V=7, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(V, V, generator=g))

    def forward(self, input_ids, attention_mask=None, **_):
        return type("Out", (), {"logits": self.W[input_ids]})()


def toy_batch(rows, idx=None):
    """rows: (token list, prompt length)."""
    seqs, starts = [r[0] for r in rows], [r[1] for r in rows]
    return lume.make_batch(seqs, starts, idx or list(range(len(rows))), pad_id=0)


F_ROWS = [([1, 2, 3, 4], 2), ([5, 6, 2], 1), ([3, 3, 1, 2, 6], 3)]
R_ROWS = [([2, 4, 6, 1], 1), ([6, 5], 1)]


def hand_logp(W, seq, start):
    """Per answer token log p, by explicit loops: token t (t >= max(start, 1)) given token t-1."""
    out = []
    for t in range(max(start, 1), len(seq)):
        row = W[seq[t - 1]]
        out.append(float(row[seq[t]] - torch.logsumexp(row, 0)))
    return out


def norm_of(fb, rb=None):
    return lume.step_norm([(fb, rb)])


def test_nll_and_ga_gd_match_hand_computation():
    m = Bigram()
    fb, rb = toy_batch(F_ROWS), toy_batch(R_ROWS)
    W = m.W.detach()
    f_tok = [lp for s, st in F_ROWS for lp in hand_logp(W, s, st)]
    r_tok = [lp for s, st in R_ROWS for lp in hand_logp(W, s, st)]
    assert norm_of(fb, rb) == {"f_tok": len(f_tok), "f_seq": 3, "r_tok": len(r_tok), "r_seq": 2}
    f_nll, r_nll = -sum(f_tok) / len(f_tok), -sum(r_tok) / len(r_tok)
    loss, terms = methods.ga(m, fb, None, norm_of(fb))
    assert loss.item() == pytest.approx(-f_nll, rel=1e-6)
    loss, terms = methods.gd(m, fb, rb, norm_of(fb, rb), alpha=0.7)
    assert loss.item() == pytest.approx(-f_nll + 0.7 * r_nll, rel=1e-6)
    assert terms["retain_nll"] == pytest.approx(r_nll, rel=1e-6)


def test_gd_equals_ga_plus_alpha_retain_nll_gradients():
    m = Bigram()
    fb, rb = toy_batch(F_ROWS), toy_batch(R_ROWS)
    n = norm_of(fb, rb)
    grads = {}
    for name, fn in [("gd", lambda: methods.gd(m, fb, rb, n, alpha=2.5)[0]),
                     ("ga", lambda: methods.ga(m, fb, rb, n)[0]),
                     ("ret", lambda: methods.nll_sum(m, rb) / n["r_tok"])]:
        m.zero_grad()
        fn().backward()
        grads[name] = m.W.grad.clone()
    torch.testing.assert_close(grads["gd"], grads["ga"] + 2.5 * grads["ret"])


def test_kl_matches_hand_and_is_zero_at_reference():
    m, ref = Bigram(seed=0), Bigram(seed=1)
    fb, rb = toy_batch(F_ROWS), toy_batch(R_ROWS)
    n = norm_of(fb, rb)
    kl_hand, count = 0.0, 0
    for s, st in R_ROWS:
        for t in range(max(st, 1), len(s)):
            p = F.log_softmax(ref.W[s[t - 1]].detach(), 0)
            q = F.log_softmax(m.W[s[t - 1]].detach(), 0)
            kl_hand += float((p.exp() * (p - q)).sum())
            count += 1
    _, terms = methods.kl(m, fb, rb, n, alpha=1.0, ref=ref)
    assert terms["retain_kl"] == pytest.approx(kl_hand / count, rel=1e-6)
    _, terms = methods.kl(m, fb, rb, n, ref=copy.deepcopy(m))
    assert terms["retain_kl"] == pytest.approx(0.0, abs=1e-7)


def test_npo_matches_equation_by_hand():
    m, beta = Bigram(), 0.3
    fb = toy_batch(F_ROWS)
    ref_logps = torch.tensor([-1.0, -2.5, -0.3], dtype=torch.float64)
    W = m.W.detach()
    expect = 0.0
    for i, (s, st) in enumerate(F_ROWS):
        r = sum(hand_logp(W, s, st)) - float(ref_logps[i])
        expect += -(2 / beta) * math.log(1 / (1 + math.exp(beta * r)))  # log sigmoid(-beta r)
    expect /= len(F_ROWS)
    loss, _ = methods.npo(m, fb, None, norm_of(fb), beta=beta, alpha=0.0, ref_logps=ref_logps)
    assert loss.item() == pytest.approx(expect, rel=1e-6)


def test_npo_gradient_at_reference_is_mean_sequence_loglik_gradient():
    # At theta = theta_ref every r_i = 0 and dL/dr_i = 2 sigmoid(0) / n = 1/n.
    m = Bigram()
    fb = toy_batch(F_ROWS)
    n = norm_of(fb)
    with torch.no_grad():
        ref = lume.seq_logps(m, fb).double()
    m.zero_grad()
    methods.npo(m, fb, None, n, beta=0.1, alpha=0.0, ref_logps=ref)[0].backward()
    g_npo = m.W.grad.clone()
    m.zero_grad()
    (lume.seq_logps(m, fb).sum() / len(F_ROWS)).backward()
    torch.testing.assert_close(g_npo, m.W.grad)
    assert methods.npo(m, fb, None, n, beta=0.1, alpha=0.0, ref_logps=ref)[0].item() == \
        pytest.approx(20 * math.log(2), rel=1e-6)  # -(2/beta) log sigmoid(0)


@pytest.mark.parametrize("method", ["ga", "gd", "kl", "npo"])
def test_grad_accumulation_equals_one_batch(method):
    # Token-normalised (NLL, KL) and sequence-normalised (NPO) terms divide by the step's totals,
    # so two micro-batches accumulate to exactly the gradient of one batch of the same rows.
    m, ref = Bigram(), Bigram(seed=3)
    kw = {"ref": ref, "ref_logps": torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64), "alpha": 0.5}
    fn = methods.METHODS[method]
    whole = [(toy_batch(F_ROWS), toy_batch(R_ROWS))]
    split = [(toy_batch(F_ROWS[:1], [0]), toy_batch(R_ROWS[:1])),
             (toy_batch(F_ROWS[1:], [1, 2]), toy_batch(R_ROWS[1:]))]
    grads = []
    for micros in (whole, split):
        m.zero_grad()
        n = lume.step_norm(micros)
        for fb, rb in micros:
            fn(m, fb, rb, n, **kw)[0].backward()
        grads.append(m.W.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
