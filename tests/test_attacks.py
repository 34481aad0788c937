"""attacks.py: each MIA score against its formula computed directly, one document at a time,
from the full softmax; the batched pass; RTN quantisation's error bound and idempotence; weights
restored bit for bit after every attack; relearning never trains on V; the recovery figure;
--attacks end to end (the deployed model, the attacker, unrelated and fewshot: test_verdicts.py)."""
import json
import math
import zlib

import pytest
import torch

import attacks
import data
import evaluation
import generation
import job
import lume
import membership
import metrics
import quant
import run


class ByteTok:
    """A byte-level tokenizer (id = byte + 2; pad 0, EOS 1): enough for doc_stats and encode_pair."""
    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=True):
        return type("Enc", (), {"input_ids": [b + 2 for b in text.encode("utf-8")]})()


def random_model(seed: int = 0):
    from transformers import OlmoConfig, OlmoForCausalLM
    torch.manual_seed(seed)
    cfg = OlmoConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                     tie_word_embeddings=False)
    return OlmoForCausalLM(cfg).eval()


DOCS = ["The quick brown fox.", "A", "Members are documents the model was trained on, nonmembers not.",
        "zzzz zzzz zzzz zzzz", "Ünïcödé bytes count in zlib.", "Short one."]


def direct_stats(model, tok, doc: str) -> dict:
    """The formulas, one document, no batching, float64 softmax over the full vocabulary."""
    ids = torch.tensor([tok(doc).input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()  # (n, V): position t predicts token t+1
    logp_all = torch.log_softmax(logits, -1)
    lp = logp_all.gather(1, ids[0, 1:, None])[:, 0]  # (n,)
    p = logp_all.exp()
    mu = (p * logp_all).sum(-1)
    sigma = ((p * (logp_all - mu[:, None]) ** 2).sum(-1)).sqrt()  # E[(log p - mu)^2]: the centred form
    z = (lp - mu) / sigma
    loss = -lp.mean().item()
    out = {"loss": loss, "zlib": loss / len(zlib.compress(doc.encode("utf-8")))}
    for k in (20, 40):
        m = max(1, math.floor(k * len(lp) / 100))
        out[f"min_k_{k}"] = lp.sort().values[:m].mean().item()
        out[f"min_k_pp_{k}"] = z.sort().values[:m].mean().item()
    return out


# --- MIA scores


def test_each_mia_score_equals_its_formula_per_document_in_the_batched_pass():
    model, tok = random_model(), ByteTok()
    docs = [d for d in DOCS if len(d) > 1]
    batched = membership.doc_stats(model, tok, docs, batch_size=3)  # padded batches of unequal lengths
    assert len({len(d) for d in docs}) == len(docs)
    for doc, got in zip(docs, batched, strict=True):
        want = direct_stats(model, tok, doc)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-5), (doc, k)
    # the same numbers one document at a time: padding and batch partners change nothing
    for doc, got in zip(docs, batched):
        alone = membership.doc_stats(model, tok, [doc])[0]
        for k in got:
            assert alone[k] == pytest.approx(got[k], rel=1e-5, abs=1e-6), (doc, k)
    assert membership.doc_losses(model, tok, docs, batch_size=3) == [s["loss"] for s in batched]


def test_min_k_takes_the_floor_of_k_percent_and_at_least_one_token():
    x = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0])
    assert membership.min_k(x, 20) == 1.0            # floor(0.2 * 5) = 1 token
    assert membership.min_k(x, 40) == 1.5            # floor(0.4 * 5) = 2 tokens: (1 + 2) / 2
    assert membership.min_k(x[:3], 20) == 1.0        # floor(0.6) = 0 -> at least one
    assert membership.min_k(torch.arange(15.0), 20) == 1.0   # floor(3.0) = 3: 0, 1, 2 (no 0.2 * 15 rounding)
    assert membership.min_k(torch.arange(9.0), 40) == 1.0    # floor(3.6) = 3: (0 + 1 + 2) / 3; ceil (4) gives 1.5


def test_mia_aucs_orient_every_score_higher_equals_member():
    # members: lower loss and zlib ratio, higher log-probs: every attack separates them perfectly
    mem = [{"set": "member", "loss": 1.0 + i, "zlib": 0.01 + i / 100, "min_k_20": -1 - i, "min_k_40": -1 - i,
            "min_k_pp_20": -0.1 - i, "min_k_pp_40": -0.1 - i} for i in range(3)]
    non = [{"set": "nonmember", "loss": 5.0 + i, "zlib": 0.1 + i / 100, "min_k_20": -9 - i, "min_k_40": -9 - i,
            "min_k_pp_20": -5 - i, "min_k_pp_40": -5 - i} for i in range(2)]
    assert membership.mia_aucs(mem + non) == dict.fromkeys(membership.SIGNS, 1.0)
    non[0]["loss"] = 2.5  # a nonmember between members 2 and 3: 5 of 6 pairs ordered
    aucs = membership.mia_aucs(mem + non)
    assert aucs["loss"] == pytest.approx(5 / 6) and aucs["zlib"] == 1.0
    assert aucs["loss"] == metrics.mia_auc([r["loss"] for r in mem], [r["loss"] for r in non])


def test_official_results_carry_every_mia_auc_and_keep_mia_loss_acc():
    model, tok = random_model(1), ByteTok()
    stats = membership.doc_stats(model, tok, [d for d in DOCS if len(d) > 1])
    rows = [{"set": "member" if i % 2 else "nonmember", "id": str(i), **s} for i, s in enumerate(stats)]
    gen = [{"split": sp, "task": 1, "kind": k, "score": 0.5} for sp in ("forget", "retain") for k in ("sc", "qa")]
    res = evaluation.official_results(gen, rows, None)
    assert set(res["mia_attacks"]) == {"loss", "zlib", "min_k_20", "min_k_40", "min_k_pp_20", "min_k_pp_40"}
    assert res["mia_attacks"]["loss"] == res["mia_loss_acc"]
    assert "mia_attacks" not in evaluation.official_results(gen, [], None)


# --- quantisation


@pytest.mark.parametrize("bits", [8, 4])
def test_rtn_error_at_most_half_a_step_per_channel_or_group(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 300) * torch.rand(16, 1) * 3  # 300 = 2 x 128 + 44: a short last group
    w[3, 7] = 40.0   # an outlier channel
    w[5] = 0.0       # an all-zero row stays zero
    w[:, 256:] *= 1e-3  # the short group is tiny: with a 128-group's scale its error would be huge
    dq = quant.fake_quant(w, bits)
    qmax = {8: 127, 4: 7}[bits]
    g = quant.GROUP[bits] or w.shape[1]  # 4-bit: columns 0-127, 128-255, 256-299
    for c in range(0, w.shape[1], g):
        x, x_dq = w[:, c:c + g], dq[:, c:c + g]
        step = x.abs().amax(1, keepdim=True) / qmax
        assert ((x - x_dq).abs() <= step / 2 * (1 + 1e-6)).all()  # fp32 rounding of x / s only
        q = x_dq / torch.where(step > 0, step, 1)  # on a grid of at most 2 qmax + 1 levels per row
        assert (q.abs() <= qmax * (1 + 1e-6)).all()
        assert all(len(set(r.tolist())) <= 2 * qmax + 1 for r in x_dq)
    assert (dq[5] == 0).all()
    assert (dq != w).any()


@pytest.mark.parametrize("bits", [8, 4])
def test_rtn_is_idempotent_bit_for_bit(bits):
    torch.manual_seed(1)
    for shape in [(8, 64), (8, 300), (4, 128)]:
        w = torch.randn(*shape) * 10 ** torch.empty(shape[0], 1).uniform_(-3, 1)
        once = quant.fake_quant(w, bits)
        assert torch.equal(quant.fake_quant(once, bits), once)


def test_quantise_touches_every_linear_but_the_head_and_attacks_restore_every_bit():
    model, tok = random_model(2), ByteTok()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = model.get_output_embeddings().weight
    names = [n for n, _ in attacks.quantisable(model)]
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)  # q k v o gate up down x 2 layers
    with attacks.restored(model):
        assert attacks.quantise_(model, 4) == len(names)
        sd = model.state_dict()
        assert all(not torch.equal(sd[n + ".weight"], before[n + ".weight"]) for n in names)
        assert torch.equal(head, before["lm_head.weight"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    items = [it for it in data.builtin(n_docs=2, seed=0)[0] if it.kind == "qa"][:4]
    with attacks.restored(model):
        attacks.relearn_(model, tok, items, {"lr": 1e-2, "steps": 2, "batch_size": 2}, seed=0,
                         device=torch.device("cpu"), precision="fp32")
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- relearning


def test_relearning_trains_on_t_only_never_on_v():
    items, _ = data.builtin(n_docs=4, seed=0)
    qa = [it for it in items if it.split == "forget" and it.task == 1 and it.kind == "qa"]
    T, V = attacks.split_halves(qa, seed=3)
    assert {it.id for it in T}.isdisjoint({it.id for it in V}) and len(T) + len(V) == len(qa)
    assert len(T) == len(qa) // 2 and T and V
    assert attacks.split_halves(qa[::-1], seed=3) == (T, V)  # the ids decide, not the order
    assert attacks.split_halves(qa, seed=4) != (T, V)
    seen = []
    attacks.relearn_(random_model(3), ByteTok(), T, {"lr": 1e-3, "steps": 6, "batch_size": 2}, seed=0,
                     device=torch.device("cpu"), precision="fp32", record=seen.append)
    trained = {i for batch in seen for i in batch}
    assert len(seen) == 6 and trained == {it.id for it in T}
    assert trained.isdisjoint({it.id for it in V})


def test_recovery_on_hand_examples():
    assert attacks.recovery(0.8, 0.2, 0.5) == pytest.approx(0.5)
    assert attacks.recovery(0.8, 0.2, 0.8) == pytest.approx(1.0)
    assert attacks.recovery(0.8, 0.2, 0.1) == pytest.approx(-1 / 6)
    assert attacks.recovery(0.4, 0.4, 0.9) is None   # unlearning changed nothing: 0 / 0
    assert attacks.recovery(None, 0.4, 0.9) is None  # no before stage
    res = lambda r, k: {"forget-set": {"Task1": {"regurgitation-score": r, "knowledge-score": k}}}  # noqa: E731
    got = attacks.forget_recovery({"before": res(1.0, 0.5), "after": res(0.2, 0.5)}, res(0.6, 0.75), [1])
    assert got == {"Task1": {"regurgitation": pytest.approx(0.5), "knowledge": None}}
    assert attacks.forget_recovery({"after": res(0.2, 0.5)}, res(0.6, 0.75), [1]) == \
        {"Task1": {"regurgitation": None, "knowledge": None}}


# --- the command line


def test_attacks_flag_is_checked_at_argument_time(monkeypatch, capsys):
    assert run.parse_args(["--attacks", "all"]).attacks == "all"
    assert attacks.parse("relearn, quant8") == ["quant8", "relearn"] and attacks.parse("") == []
    for argv, says in [(["--attacks", "quant8,quant3"], "unknown attack(s) 'quant3'"),
                       (["--attacks", "quant8", "--method", "none"], "--method")]:
        with pytest.raises(SystemExit):
            run.parse_args(argv)
        err = capsys.readouterr().err
        assert "--attacks" in err and says in err, err
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: what was tested on shards (tests/test_scale.py)
    assert run.parse_args(["--attacks", "quant8,quant4,relearn,unrelated"]).attacks == "quant8,quant4,relearn,unrelated"
    for argv, says in [(["--attacks", "fewshot"], "fewshot"),
                       (["--attacks", "relearn", "--method", "rmu"], "relearn"),
                       (["--attacks", "unrelated", "--train-layers", "2"], "unrelated"),
                       (["--attacks", "quant4", "--lora-rank", "4"], "quant4"),
                       (["--attacks", "relearn", "--relearn-grid", "small"], "relearn"),  # its probes generate
                       (["--attacks", "nf4"], "nf4")]:
        with pytest.raises(SystemExit):
            run.parse_args(argv)
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "torchrun" in err and says in err, err


def test_attacks_end_to_end(tmp_path, small_tiny):  # the one slow test: run.py with --attacks all
    out = job.main(run.parse_args(["--data", "builtin", "--n-docs", "2", "--max-steps", "2", "--max-new-tokens", "16",
                                   "--attacks", "all", "--save", "--out", str(tmp_path / "r"),
                                   "--cache-dir", str(tmp_path / "cache")]))
    res = json.load(open(out / "results.json"))
    assert set(res) == {"before", "after", "robustness"} and list(res["robustness"]) == list(attacks.NAMES)
    scored = [res["robustness"][a] for a in ("quant8", "quant4", "relearn", "unrelated")]
    for stage in (res["before"], res["after"], *scored):
        assert stage["mia_attacks"]["loss"] == stage["mia_loss_acc"]
        assert "forget-set" in stage and "retain-set" in stage
    for name, entry in res["robustness"].items():
        assert set(entry["recovery"]) == {"Task1"}
    v = res["robustness"]["relearn"]["V_knowledge"]
    assert set(v) == {"before", "after", "relearned", "recovery"} and v["before"] is not None
    gens = [json.loads(line) for line in open(out / "generations.jsonl")]
    assert {g["stage"] for g in gens} == {"before", "after", *attacks.NAMES}
    n_params = sum(p.numel() for p in lume.load_pretrained(str(out / "model"))[0].parameters())
    for a in ("relearn", "unrelated"):  # one attacker, every weight
        assert res["robustness"][a]["attacker"] == {"setup": "full", "precision": "fp32", "train_layers": 0,
                                                    "grad_checkpointing": False, "trainable_params": n_params,
                                                    "model_params": n_params}
    few = res["robustness"]["fewshot"]["knowledge"]["Task1"]
    assert few["after"] == res["after"]["forget-set"]["Task1"]["knowledge-score"] and few["with_shots"] is not None
    mia = [json.loads(line) for line in open(out / "mia.jsonl")]
    assert {"zlib", "min_k_20", "min_k_pp_40"} <= set(mia[0])
    after = [g for g in gens if g["stage"] == "after"]  # the saved model is the unlearned one, not an attacked one
    model, tok = lume.load_pretrained(str(out / "model"))
    assert generation.generate(model, tok, [g["input"] for g in after[:4]], 16) == [g["model_output"] for g in after[:4]]
