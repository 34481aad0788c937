"""SimNPO and RMU against hand computation, their gradients in closed form, RMU's frozen-activation
cache against the frozen model, and sequential chunks / retain ratio in lume.plan_steps."""
import copy
import itertools
import math
import random

import pytest
import torch

import dist
import lume
import methods
import run
from test_methods import F_ROWS, R_ROWS, PrefixBag, flat_grad, hand_logp, toy_batch, totals_of


# --- SimNPO

def test_simnpo_matches_equation_by_hand():
    m, beta, gamma = PrefixBag(), 2.5, 0.4
    fb, rb = toy_batch(F_ROWS), toy_batch(R_ROWS)
    expect = 0.0
    for s, st in F_ROWS:
        lps = hand_logp(m, s, st)
        a = sum(lps) / len(lps)  # (1/|y|) log pi(y|x)
        z = -beta * a - gamma
        expect += -(2 / beta) * -math.log1p(math.exp(-z))  # log sigmoid(z) = -log(1 + e^-z)
    expect /= len(F_ROWS)
    loss, terms = methods.simnpo(m, fb, None, totals_of(fb), beta=beta, gamma=gamma, retain_weight=0.0)
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    r_tok = [lp for s, st in R_ROWS for lp in hand_logp(m, s, st)]
    loss, terms = methods.simnpo(m, fb, rb, totals_of(fb, rb), beta=beta, gamma=gamma, retain_weight=0.7)
    assert loss.item() == pytest.approx(expect + 0.7 * -sum(r_tok) / len(r_tok), rel=1e-6)


def test_simnpo_gradient_is_weighted_mean_token_loglik_gradient():
    # dL/da_i = 2 sigmoid(beta a_i + gamma) / n with a_i the mean answer-token log-prob of row i:
    # the weights are computed here from the hand log-probs, then the gradient of sum_i w_i a_i
    m, beta, gamma = PrefixBag(), 2.5, 0.3
    fb = toy_batch(F_ROWS)
    w = []
    for s, st in F_ROWS:
        lps = hand_logp(m, s, st)
        w.append(2 / (1 + math.exp(-(beta * sum(lps) / len(lps) + gamma))) / len(F_ROWS))
    m.zero_grad()
    methods.simnpo(m, fb, None, totals_of(fb), beta=beta, gamma=gamma, retain_weight=0.0)[0].backward()
    g = flat_grad(m)
    m.zero_grad()
    tok = lume.token_logps(m, fb)  # (B, T-1)
    a = tok.sum(-1) / fb.target_mask[:, 1:].sum(-1)
    (torch.tensor(w) * a).sum().backward()  # dL/da_i > 0: descending L lowers a_i, as gradient ascent
    torch.testing.assert_close(g, flat_grad(m))


def test_simnpo_padding_row_counts_nowhere():
    m = PrefixBag()
    fb = toy_batch(F_ROWS)
    padded = toy_batch(F_ROWS + [([1, 2], 2)])  # a row without answer tokens (as dist's padding rows)
    kw = dict(beta=2.5, gamma=1.0, retain_weight=0.0)
    a = methods.simnpo(m, fb, None, totals_of(fb), **kw)[0]
    b = methods.simnpo(m, padded, None, totals_of(padded), **kw)[0]
    assert b.item() == pytest.approx(a.item(), rel=1e-6)


# --- RMU

def test_masked_mse_sum_and_its_gradient_by_hand():
    h = torch.tensor([[[1.0, 2.0], [0.0, -1.0], [3.0, 3.0]]], requires_grad=True)  # (1, 3, 2)
    target = torch.tensor([0.5, 1.0])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    # token 0: ((0.5)^2 + 1^2)/2 = 0.625; token 2: (2.5^2 + 2^2)/2 = 5.125; token 1 masked
    out = methods.masked_mse_sum(h, target, mask)
    assert out.item() == pytest.approx(0.625 + 5.125)
    out.backward()  # d/dh mean_d (h - t)^2 = 2 (h - t) / H on unmasked tokens
    expect = torch.tensor([[[0.5, 1.0], [0.0, 0.0], [2.5, 2.0]]])
    torch.testing.assert_close(h.grad, expect)


def hidden_at(model, seq, layer):
    """Output of decoder layer `layer` on one unpadded sequence: HF hidden_states[layer + 1] (T, H);
    not for the last layer, whose hidden_states entry has the final norm applied."""
    assert layer + 1 < model.config.num_hidden_layers
    ids = torch.tensor([seq])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[layer + 1][0]


def encoded_rows(tok, items, split, n):
    its = [it for it in items if it.split == split][:n]
    return [lume.encode_pair(tok, it.input, it.output) for it in its]


def test_layer_output_stops_early_and_equals_hidden_states(small_target, small_data):
    model, tok = small_target
    enc = encoded_rows(tok, small_data[0], "forget", 3)
    b = lume.make_batch([e[0] for e in enc], [e[1] for e in enc], [0, 1, 2], tok.pad_token_id)
    with torch.no_grad():
        full = model(input_ids=b.ids, attention_mask=b.attn, output_hidden_states=True).hidden_states[1]
    hooks = dict(model.model.layers[0]._forward_hooks)  # transformers' own output-capturing hook
    with torch.no_grad():
        early = methods.layer_output(model, b, 0, stop=True)
        late = methods.layer_output(model, b, 0, stop=False)
    torch.testing.assert_close(early, full)
    torch.testing.assert_close(late, full)
    assert dict(model.model.layers[0]._forward_hooks) == hooks  # ours is removed


def test_rmu_cache_equals_frozen_activations_and_loss_by_hand(small_target, small_data):
    model, tok = small_target
    model = copy.deepcopy(model)
    layer, c, alpha = 0, 3.0, 5.0
    f_enc, r_enc = encoded_rows(tok, small_data[0], "forget", 3), encoded_rows(tok, small_data[0], "retain", 4)
    pad = tok.pad_token_id
    rb_all = [lume.make_batch([r_enc[j][0] for j in g], [r_enc[j][1] for j in g], g, pad) for g in ([3, 1], [2])]
    frozen = methods.rmu_reference(model, rb_all, 4, layer, torch.autocast("cpu", enabled=False), stop=True)
    assert frozen[0] is None  # item 0 was in no batch
    for j in (1, 2, 3):  # each item alone, unpadded: positions start-1 .. len-2 predict the answer
        seq, start = r_enc[j]
        torch.testing.assert_close(frozen[j], hidden_at(model, seq, layer)[start - 1:len(seq) - 1],
                                   rtol=1e-5, atol=1e-5)
    u = methods.rmu_control(model.config.hidden_size, seed=0)
    assert u.norm().item() == pytest.approx(1.0) and (u >= 0).all()
    with torch.no_grad():  # move the model away from the frozen one, so the retain term is not 0
        for p in model.model.layers[layer].mlp.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fb = lume.make_batch([e[0] for e in f_enc], [e[1] for e in f_enc], [0, 1, 2], pad)
    rb = lume.make_batch([r_enc[j][0] for j in (1, 3)], [r_enc[j][1] for j in (1, 3)], [1, 3], pad)
    # by hand: per answer position, mean over H of the squared difference, averaged over positions
    f_terms, r_terms = [], []
    for seq, start in f_enc:
        h = hidden_at(model, seq, layer)[start - 1:len(seq) - 1]
        f_terms += ((h - c * u) ** 2).mean(-1).tolist()
    for j in (1, 3):
        seq, start = r_enc[j]
        h = hidden_at(model, seq, layer)[start - 1:len(seq) - 1]
        r_terms += ((h - frozen[j]) ** 2).mean(-1).tolist()
    expect_f, expect_r = sum(f_terms) / len(f_terms), sum(r_terms) / len(r_terms)
    assert expect_r > 1e-6
    loss, terms = methods.rmu(model, fb, rb, totals_of(fb, rb), layer=layer, coeff=c, retain_weight=alpha,
                              control=u, frozen=frozen, stop=True)
    assert terms["forget_mse"] == pytest.approx(expect_f, rel=1e-4)
    assert terms["retain_mse"] == pytest.approx(expect_r, rel=1e-4)
    assert loss.item() == pytest.approx(expect_f + alpha * expect_r, rel=1e-4)


def test_rmu_gradient_at_reference_is_the_forget_term_alone(small_target, small_data):
    # at theta = frozen the retain MSE sits at its minimum (0) and adds no gradient
    model, tok = copy.deepcopy(small_target[0]), small_target[1]
    trained = methods.rmu_trainable(model, 1)
    assert trained and all(n.startswith(("model.layers.0.mlp.", "model.layers.1.mlp.")) for n in trained)
    assert {n.split(".")[2] for n in trained} == {"0", "1"}  # l-2 clipped at 0
    f_enc, r_enc = encoded_rows(tok, small_data[0], "forget", 2), encoded_rows(tok, small_data[0], "retain", 2)
    pad = tok.pad_token_id
    fb = lume.make_batch([e[0] for e in f_enc], [e[1] for e in f_enc], [0, 1], pad)
    rb = lume.make_batch([e[0] for e in r_enc], [e[1] for e in r_enc], [0, 1], pad)
    frozen = methods.rmu_reference(model, [rb], 2, 1, torch.autocast("cpu", enabled=False), stop=True)
    u, n = methods.rmu_control(model.config.hidden_size, 1), totals_of(fb, rb)
    kw = dict(layer=1, coeff=4.0, control=u, frozen=frozen, stop=True)
    params = [p for p in model.parameters() if p.requires_grad]
    loss, terms = methods.rmu(model, fb, rb, n, retain_weight=1000.0, **kw)
    assert terms["retain_mse"] < 1e-10
    g_all = torch.autograd.grad(loss, params)
    g_f = torch.autograd.grad(methods.rmu(model, fb, rb, n, retain_weight=0.0, **kw)[0], params)
    for a, b in zip(g_all, g_f):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="--rmu-layer 2: this model has decoder layers 0..1"):
        methods.rmu_trainable(model, 2)


# --- sequential chunks and retain ratio

def todays_plan(n_forget, n_retain, batch_size, grad_accum, epochs, max_steps, seed):
    """The oracle: plan_steps as it was before chunks (commit 940ac1f), without its lengths path."""
    rng = random.Random(seed)
    total = max_steps if max_steps > 0 else math.ceil(epochs * math.ceil(n_forget / (batch_size * grad_accum)))
    order = list(range(n_forget))
    rng.shuffle(order)
    fixed = [order[k:k + batch_size] for k in range(0, n_forget, batch_size)]
    steps, queue = [], []
    while len(steps) < total:
        if not queue:
            queue = rng.sample(fixed, len(fixed))
        steps.append([(f, [rng.randrange(n_retain) for _ in f] if n_retain else []) for f in queue[:grad_accum]])
        queue = queue[grad_accum:]
    return steps


@pytest.mark.parametrize("n,nr,bs,ga,ep,ms", itertools.product([1, 7, 24], [0, 5], [1, 4], [1, 2], [0.5, 3], [0, 4]))
def test_default_flags_give_todays_plan(n, nr, bs, ga, ep, ms):
    assert lume.plan_steps(n, nr, bs, ga, ep, ms, seed=3) == todays_plan(n, nr, bs, ga, ep, ms, seed=3)
    assert lume.plan_steps(n, nr, bs, ga, ep, ms, seed=3, chunk_size=n, retain_ratio=1) == todays_plan(
        n, nr, bs, ga, ep, ms, seed=3)


@pytest.mark.parametrize("n,chunk,bs,ga,epochs,ratio", [(24, 8, 4, 1, 3, 2), (23, 5, 2, 2, 2, 3), (10, 4, 3, 1, 1, 1),
                                                        (9, 20, 4, 1, 2, 4)])
def test_chunks_cover_each_item_once_per_epoch_in_their_chunk(n, chunk, bs, ga, epochs, ratio):
    plan = lume.plan_steps(n, 50, bs, ga, epochs, 0, seed=1, chunk_size=chunk, retain_ratio=ratio)
    rows = [f for micros in plan for f, _ in micros]
    seen = [i for f in rows for i in f]
    assert sorted(set(seen)) == list(range(n)) and len(seen) == epochs * n
    # the chunks, in the order they run: consecutive blocks of the visited items
    k, chunks = 0, []
    while k < len(seen):
        size = min(chunk, n - sum(map(len, chunks)))
        chunks.append(set(seen[k:k + size]))
        for e in range(epochs):  # each epoch of this chunk visits exactly its items once
            assert sorted(seen[k + e * size:k + (e + 1) * size]) == sorted(chunks[-1])
        k += epochs * size
    assert set().union(*chunks) == set(range(n)) and sum(map(len, chunks)) == n  # disjoint, complete
    assert len(chunks) == math.ceil(n / chunk)
    for micros in plan:  # a step never mixes chunks; every micro-batch has ratio retain rows per row
        step_items = {i for f, _ in micros for i in f}
        assert any(step_items <= c for c in chunks)
        for f, r in micros:
            assert len(f) <= bs and len(r) == ratio * len(f) and all(0 <= j < 50 for j in r)
    assert len(plan) == sum(math.ceil(epochs * math.ceil(len(c) / (bs * ga))) for c in chunks)


def test_max_steps_counts_per_chunk_and_reference_batches_cover_every_item():
    plan = lume.plan_steps(10, 0, 2, 1, 1, 3, seed=0, chunk_size=4)  # chunks of 4, 4, 2 items: 3 steps each
    assert len(plan) == 9
    plan = lume.plan_steps(12, 3, 2, 1, 2, 0, seed=0, chunk_size=4)
    firsts = methods.first_forget_batches(plan, plan)  # NPO's reference: every item, each once
    assert sorted(i for f in firsts for i in f) == list(range(12))


def test_two_ranks_split_retain_rows_with_their_forget_rows():
    plan = lume.plan_steps(5, 40, 3, 2, 1, 0, seed=2, retain_ratio=3)
    ranks = [dist.Dist(k, 2, torch.device("cpu")) for k in range(2)]

    def make(rows):
        return list(rows)
    per_rank = [dist.shard_steps(plan, make, make, d) for d in ranks]
    for s, micros in enumerate(plan):
        for m, (f, r) in enumerate(micros):
            got = [per_rank[k][s][m] for k in range(2)]
            real = [k for k in range(2) if f[k::2]]
            assert sorted(j for k in real for j in got[k][1]) == sorted(r)  # every retain row once
            for k in real:  # rank k's forget rows i come with r[3i:3i+3]
                mine = [i for i in range(len(f))][k::2]
                assert got[k][0] == [f[i] for i in mine]
                assert got[k][1] == [j for i in mine for j in r[3 * i:3 * i + 3]]


# --- flags

def test_method_defaults_and_bad_flags_at_argument_time(capsys, monkeypatch):
    monkeypatch.setattr(run.checks, "hub_problems", lambda name, repos: [])  # no hub here: olmo-7b's defaults only
    assert run.parse_args(["--method", "npo"]).beta == 0.1
    s = run.parse_args(["--method", "simnpo"])
    assert (s.beta, s.gamma) == (2.5, 0.0) and s.retain_weight == methods.METHODS["simnpo"].defaults["retain_weight"].tiny
    s = run.parse_args(["--method", "simnpo", "--model", "olmo-7b", "--beta", "4.5"])
    assert (s.beta, s.retain_weight) == (4.5, 0.1375)  # the authors' grad_diff_coeff (test_defaults_sources)
    r = run.parse_args(["--method", "rmu", "--model", "olmo-7b"])
    assert (r.rmu_layer, r.rmu_coeff, r.retain_weight, r.lr) == (7, 6.5, 1200.0, 5e-5)
    assert run.parse_args(["--method", "rmu", "--model", "olmo-7b", "--lr", "1e-4"]).lr == 1e-4
    assert run.parse_args(["--method", "npo", "--model", "olmo-7b"]).lr == 1e-5
    for argv, flag in ((["--chunk-size", "-2"], "--chunk-size"), (["--retain-ratio", "0"], "--retain-ratio"),
                       (["--method", "simnpo", "--beta", "-3"], "--beta"),
                       (["--method", "rmu", "--rmu-coeff", "-2"], "--rmu-coeff"),
                       (["--method", "rmu", "--lora-rank", "4"], "--lora-rank")):
        with pytest.raises(SystemExit):
            run.parse_args(argv)
        assert flag in capsys.readouterr().err
    assert run.parse_args(["--method", "rmu", "--save-every", "2"]).save_every == 2  # its cache is checkpointed
