"""Unlearning losses against hand computation on a toy model, and their defining identities."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lume
import methods


class PrefixBag(torch.nn.Module):
    """Toy causal LM small enough to compute every log-probability by hand with explicit loops:
        logits_t = W[x_t] + (sum over s <= t with attention_mask_s = 1 of E[x_s]) @ U
    Its logits depend on the attention mask, so a test fails if a loss passes the target mask
    (answer tokens only) where the attention mask belongs, or drops the mask."""

    def __init__(self, V=7, d=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(V, V, generator=g))
        self.E = torch.nn.Parameter(torch.randn(V, d, generator=g))
        self.U = torch.nn.Parameter(torch.randn(d, V, generator=g))

    def forward(self, input_ids, attention_mask, **_):
        h = (self.E[input_ids] * attention_mask[..., None]).cumsum(1)  # (B, T, d)
        return type("Out", (), {"logits": self.W[input_ids] + h @ self.U})()


def toy_batch(rows, idx=None):
    """rows: (token list, prompt length)."""
    seqs, starts = [r[0] for r in rows], [r[1] for r in rows]
    return lume.make_batch(seqs, starts, idx or list(range(len(rows))), pad_id=0)


F_ROWS = [([1, 2, 3, 4], 2), ([5, 6, 2], 1), ([3, 3, 1, 2, 6], 3)]
R_ROWS = [([2, 4, 6, 1], 1), ([6, 5], 1)]


def hand_logits(m, seq, t):
    """The toy's next-token logits after seq[:t+1], by explicit loops over the real tokens."""
    h = sum(m.E[seq[s]].detach() for s in range(t + 1))
    return m.W[seq[t]].detach() + h @ m.U.detach()


def hand_logp(m, seq, start):
    """Per answer token log p, by explicit loops: token t (t >= max(start, 1)) given tokens < t."""
    out = []
    for t in range(max(start, 1), len(seq)):
        row = hand_logits(m, seq, t - 1)
        out.append(float(row[seq[t]] - torch.logsumexp(row, 0)))
    return out


def flat_grad(m) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in m.parameters()])


def totals_of(fb, rb=None):
    return lume.step_totals([(fb, rb)])


def test_nll_and_ga_gd_match_hand_computation():
    m = PrefixBag()
    fb, rb = toy_batch(F_ROWS), toy_batch(R_ROWS)
    f_tok = [lp for s, st in F_ROWS for lp in hand_logp(m, s, st)]
    r_tok = [lp for s, st in R_ROWS for lp in hand_logp(m, s, st)]
    assert totals_of(fb, rb) == {"forget_tokens": len(f_tok), "forget_seqs": 3,
                                 "retain_tokens": len(r_tok), "retain_seqs": 2}
    f_nll, r_nll = -sum(f_tok) / len(f_tok), -sum(r_tok) / len(r_tok)
    loss, terms = methods.ga(m, fb, None, totals_of(fb))
    assert loss.item() == pytest.approx(-f_nll, rel=1e-6)
    loss, terms = methods.gd(m, fb, rb, totals_of(fb, rb), retain_weight=0.7)
    assert loss.item() == pytest.approx(-f_nll + 0.7 * r_nll, rel=1e-6)
    assert terms["retain_nll"] == pytest.approx(r_nll, rel=1e-6)


def test_gd_equals_ga_plus_weighted_retain_nll_gradients():
    m = PrefixBag()
    fb, rb = toy_batch(F_ROWS), toy_batch(R_ROWS)
    n = totals_of(fb, rb)
    grads = {}
    for name, fn in [("gd", lambda: methods.gd(m, fb, rb, n, retain_weight=2.5)[0]),
                     ("ga", lambda: methods.ga(m, fb, rb, n)[0]),
                     ("ret", lambda: methods.nll_sum(m, rb) / n["retain_tokens"])]:
        m.zero_grad()
        fn().backward()
        grads[name] = flat_grad(m)
    torch.testing.assert_close(grads["gd"], grads["ga"] + 2.5 * grads["ret"])


def test_kl_matches_hand_and_is_zero_at_reference():
    m, ref = PrefixBag(seed=0), PrefixBag(seed=1)
    fb, rb = toy_batch(F_ROWS), toy_batch(R_ROWS)
    n = totals_of(fb, rb)
    kl_hand, count = 0.0, 0
    for s, st in R_ROWS:
        for t in range(max(st, 1), len(s)):
            p = F.log_softmax(hand_logits(ref, s, t - 1), 0)
            q = F.log_softmax(hand_logits(m, s, t - 1), 0)
            kl_hand += float((p.exp() * (p - q)).sum())
            count += 1
    _, terms = methods.kl(m, fb, rb, n, retain_weight=1.0, ref=ref)
    assert terms["retain_kl"] == pytest.approx(kl_hand / count, rel=1e-6)
    _, terms = methods.kl(m, fb, rb, n, retain_weight=1.0, ref=copy.deepcopy(m))
    assert terms["retain_kl"] == pytest.approx(0.0, abs=1e-7)


def test_npo_matches_equation_by_hand():
    m, beta = PrefixBag(), 0.3
    fb = toy_batch(F_ROWS)
    ref_logps = torch.tensor([-1.0, -2.5, -0.3], dtype=torch.float64)
    expect = 0.0
    for i, (s, st) in enumerate(F_ROWS):
        r = sum(hand_logp(m, s, st)) - float(ref_logps[i])
        expect += -(2 / beta) * math.log(1 / (1 + math.exp(beta * r)))  # log sigmoid(-beta r)
    expect /= len(F_ROWS)
    loss, _ = methods.npo(m, fb, None, totals_of(fb), beta=beta, retain_weight=0.0, ref_logps=ref_logps)
    assert loss.item() == pytest.approx(expect, rel=1e-6)


def test_npo_gradient_at_reference_is_mean_sequence_loglik_gradient():
    # At theta = theta_ref every r_i = 0 and dL/dr_i = 2 sigmoid(0) / n = 1/n.
    m = PrefixBag()
    fb = toy_batch(F_ROWS)
    n = totals_of(fb)
    with torch.no_grad():
        ref = lume.seq_logps(m, fb).double()
    m.zero_grad()
    methods.npo(m, fb, None, n, beta=0.1, retain_weight=0.0, ref_logps=ref)[0].backward()
    g_npo = flat_grad(m)
    m.zero_grad()
    (lume.seq_logps(m, fb).sum() / len(F_ROWS)).backward()
    torch.testing.assert_close(g_npo, flat_grad(m))
    assert methods.npo(m, fb, None, n, beta=0.1, retain_weight=0.0, ref_logps=ref)[0].item() == \
        pytest.approx(20 * math.log(2), rel=1e-6)  # -(2/beta) log sigmoid(0)


@pytest.mark.parametrize("method", ["ga", "gd", "kl", "npo", "simnpo", "stat", "undial"])
def test_grad_accumulation_equals_one_batch(method):
    # Token-normalised (NLL, KL) and sequence-normalised (NPO, SimNPO) terms divide by the step's totals,
    # so two micro-batches accumulate to exactly the gradient of one batch of the same rows: the
    # property that makes two ranks equal one process (test_dist), checked here for every loss.
    m, ref = PrefixBag(), PrefixBag(seed=3)
    kw = {"ga": {}, "gd": {"retain_weight": 0.5}, "kl": {"retain_weight": 0.5, "ref": ref},
          "npo": {"beta": 0.1, "retain_weight": 0.5,
                  "ref_logps": torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)},
          "simnpo": {"beta": 2.5, "gamma": 0.5, "retain_weight": 0.5},
          "stat": {"vocab": 7, "seed": 2, "retain_weight": 0.5},
          "undial": {"gamma": 3.0, "retain_weight": 0.5, "ref": ref}}[method]
    fn = methods.METHODS[method].loss
    whole = [(toy_batch(F_ROWS), toy_batch(R_ROWS))]
    split = [(toy_batch(F_ROWS[:1], [0]), toy_batch(R_ROWS[:1])),
             (toy_batch(F_ROWS[1:], [1, 2]), toy_batch(R_ROWS[1:]))]
    grads = []
    for micros in (whole, split):
        m.zero_grad()
        n = lume.step_totals(micros)
        for fb, rb in micros:
            fn(m, fb, rb, n, **kw)[0].backward()
        grads.append(flat_grad(m))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_options_are_keyword_only_without_defaults_and_retain_is_required():
    m = PrefixBag()
    fb, rb = toy_batch(F_ROWS), toy_batch(R_ROWS)
    n = totals_of(fb, rb)
    with pytest.raises(TypeError, match="retain_wieght"):  # a misspelt option is an error ...
        methods.gd(m, fb, rb, n, retain_wieght=2.0)
    with pytest.raises(TypeError, match="beta"):  # ... and so is a missing one
        methods.npo(m, fb, None, n, retain_weight=0.0, ref_logps=torch.zeros(3, dtype=torch.float64))
    for name, kw in (("gd", {"retain_weight": 1.0}), ("kl", {"retain_weight": 1.0, "ref": m})):
        with pytest.raises(ValueError, match=f"{name} needs retain items"):
            methods.METHODS[name].loss(m, fb, None, totals_of(fb), **kw)
