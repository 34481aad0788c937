"""STAT (pseudo-token relabelling) and UNDIAL (self-distillation on adjusted logits) against hand
computation on the toy model, UNDIAL's starting gradient in closed form, STAT's pseudo tokens, and
the per-method declarations (methods.SPECS) that job.unlearn reads instead of method names."""
import math

import pytest
import torch

import checks
import methods
import run
from test_methods import F_ROWS, R_ROWS, PrefixBag, hand_logits, hand_logp, toy_batch, totals_of


# --- STAT

def test_pseudo_tokens_never_equal_the_true_token_and_keep_prompt_and_eos():
    # a 3-token vocabulary makes a collision likely on every draw if the skip were missing
    rows = [([1, 2, 1, 2, 1, 2, 0, 1, 2, 1], 2), ([2, 2, 2, 2, 2, 1], 1), ([0, 1, 2], 3)]
    b = toy_batch(rows, idx=[4, 7, 9])
    for seed in range(20):
        ids = methods.pseudo_answers(b, vocab=3, seed=seed)
        for i, (seq, st) in enumerate(rows):
            T = len(seq)
            assert ids[i, :max(st, 1)].tolist() == seq[:max(st, 1)]  # the prompt stays
            assert ids[i, T - 1].item() == seq[T - 1]  # the last answer token (EOS) stays
            assert ids[i, T:].tolist() == b.ids[i, T:].tolist()  # padding stays
            for t in range(max(st, 1), T - 1):
                assert ids[i, t].item() != seq[t] and 0 <= ids[i, t].item() < 3


def test_pseudo_tokens_depend_on_the_item_and_seed_not_on_the_batch():
    rows = [([1, 2, 3, 4, 5, 6, 6], 1), ([3, 3, 1, 2, 6, 5], 2)]
    together = methods.pseudo_answers(toy_batch(rows, idx=[3, 8]), vocab=7, seed=5)
    alone = methods.pseudo_answers(toy_batch(rows[1:], idx=[8]), vocab=7, seed=5)
    assert together[1, :6].tolist() == alone[0, :6].tolist()
    assert methods.pseudo_answers(toy_batch(rows, idx=[3, 8]), vocab=7, seed=6).tolist() != together.tolist()


def test_stat_loss_is_the_nll_of_the_pseudo_answers_plus_the_retain_nll():
    m = PrefixBag()
    fb, rb = toy_batch(F_ROWS), toy_batch(R_ROWS)
    ids = methods.pseudo_answers(fb, vocab=7, seed=1)
    pseudo_rows = [(ids[i, :len(s)].tolist(), st) for i, (s, st) in enumerate(F_ROWS)]
    f_tok = [lp for s, st in pseudo_rows for lp in hand_logp(m, s, st)]
    r_tok = [lp for s, st in R_ROWS for lp in hand_logp(m, s, st)]
    loss, terms = methods.stat(m, fb, None, totals_of(fb), vocab=7, seed=1, retain_weight=0.0)
    assert loss.item() == pytest.approx(-sum(f_tok) / len(f_tok), rel=1e-6)
    loss, terms = methods.stat(m, fb, rb, totals_of(fb, rb), vocab=7, seed=1, retain_weight=0.5)
    assert loss.item() == pytest.approx(-sum(f_tok) / len(f_tok) - 0.5 * sum(r_tok) / len(r_tok), rel=1e-6)


# --- UNDIAL

def hand_undial(m, ref, rows, gamma):
    """mean over answer tokens of -sum_v q[v] log p[v], q = softmax(z_ref - gamma e_y), by loops."""
    total, n = 0.0, 0
    for seq, st in rows:
        for t in range(max(st, 1), len(seq)):
            z_ref = hand_logits(ref, seq, t - 1).clone()
            z_ref[seq[t]] -= gamma
            q = torch.softmax(z_ref, 0)
            logp = torch.log_softmax(hand_logits(m, seq, t - 1), 0)
            total += float(-(q * logp).sum())
            n += 1
    return total / n


def test_undial_loss_matches_hand_computation():
    m, ref = PrefixBag(seed=0), PrefixBag(seed=1)  # different weights: the two logits differ
    fb, rb = toy_batch(F_ROWS), toy_batch(R_ROWS)
    gamma = 2.0
    loss, terms = methods.undial(m, fb, None, totals_of(fb), gamma=gamma, retain_weight=0.0, ref=ref)
    assert loss.item() == pytest.approx(hand_undial(m, ref, F_ROWS, gamma), rel=1e-6)
    r_tok = [lp for s, st in R_ROWS for lp in hand_logp(m, s, st)]
    loss, _ = methods.undial(m, fb, rb, totals_of(fb, rb), gamma=gamma, retain_weight=0.7, ref=ref)
    assert loss.item() == pytest.approx(hand_undial(m, ref, F_ROWS, gamma) - 0.7 * sum(r_tok) / len(r_tok), rel=1e-6)


class Logits(torch.nn.Module):
    """A 'model' whose logits are a free parameter (B, T, V): the gradient w.r.t. them is the loss's."""

    def __init__(self, z):
        super().__init__()
        self.z = torch.nn.Parameter(z.clone())

    def forward(self, input_ids, attention_mask, **_):
        return type("Out", (), {"logits": self.z})()


def test_undial_gradient_at_the_start_is_p_minus_q_in_closed_form():
    # theta = ref: dL/dz_t = (p_t - q_t) / N on answer positions, with p = softmax(z) and
    # q_y = p_y e^-g / (1 - p_y + p_y e^-g), q_v = p_v / (1 - p_y + p_y e^-g) for v != y; 0 elsewhere
    fb = toy_batch(F_ROWS)
    B, T, V, gamma = fb.ids.shape[0], fb.ids.shape[1], 7, 1.5
    z = torch.randn(B, T, V, generator=torch.Generator().manual_seed(3))
    m, ref = Logits(z), Logits(z)
    loss, _ = methods.undial(m, fb, None, totals_of(fb), gamma=gamma, retain_weight=0.0, ref=ref)
    loss.backward()
    expect, N = torch.zeros(B, T, V), totals_of(fb)["forget_tokens"]
    for i in range(B):
        for t in range(T - 1):
            if fb.target_mask[i, t + 1]:
                p, y = torch.softmax(z[i, t], 0), fb.ids[i, t + 1]
                norm = 1 - p[y] + p[y] * math.exp(-gamma)
                q = p / norm
                q[y] = p[y] * math.exp(-gamma) / norm
                expect[i, t] = (p - q) / N
    torch.testing.assert_close(m.z.grad, expect, rtol=1e-5, atol=1e-7)
    assert expect.abs().sum() > 0


def test_undial_gamma_zero_distils_the_model_into_itself():
    # q = p at theta = ref when gamma = 0: the loss is the entropy and the gradient vanishes
    fb = toy_batch(F_ROWS)
    z = torch.randn(*fb.ids.shape, 7, generator=torch.Generator().manual_seed(4))
    m = Logits(z)
    methods.undial(m, fb, None, totals_of(fb), gamma=0.0, retain_weight=0.0, ref=Logits(z))[0].backward()
    assert m.z.grad.abs().max() < 1e-7


# --- declarations and flags

def test_every_method_has_a_spec_and_its_options_are_config_fields():
    fields = set(run.Config.__dataclass_fields__)
    assert set(run.parser()._option_string_actions["--method"].choices) == set(methods.METHODS) | {"none"}
    for name, spec in methods.METHODS.items():
        assert set(spec.options.values()) | set(spec.fields) | set(spec.defaults) <= fields, name
        assert spec.retain in ("no", "yes", "weighted")
    assert not methods.uses_retain("npo", 0.0) and methods.uses_retain("npo", 3.0) and methods.uses_retain("gd", 0.0)
    assert not methods.uses_retain("ga", None)


def problems(argv):
    return checks.preflight(run.Config(**vars(run.parser().parse_args(argv))))


def test_undial_gamma_out_of_range_is_one_line_and_in_range_passes():
    for bad in ("0", "-1", "101", "nan"):
        got = problems(["--method", "undial", "--gamma", bad])
        assert len(got) == 1 and "--gamma" in got[0], (bad, got)
    assert problems(["--method", "undial", "--gamma", "30"]) == []
    assert problems(["--method", "simnpo", "--gamma", "0"]) == []  # SimNPO's margin may be 0
    assert run.parse_args(["--method", "undial"]).gamma == 10.0
    got = problems(["--method", "stat", "--gamma", "1"])
    assert len(got) == 1 and "does not use it" in got[0]
    assert problems(["--method", "stat", "--beta", "1"]) and problems(["--method", "undial", "--rmu-layer", "1"])
