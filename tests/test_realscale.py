"""Correct at real scale: the released targets' tokenizer (OLMo-0724: 50,280 ids, pad 1 != EOS 50279,
no BOS), a hub-shaped model directory loaded the way users load the released targets, and the
numerical guards of the training loop.

The directory is built here: an OlmoConfig with the released targets' vocabulary (50,304 rows), pad
and EOS ids and context (4,096), two small layers trained briefly on real LUME items (so that greedy
outputs are text, not noise), written with save_pretrained beside the real tokenizer, and loaded
through `--model PATH` / lume.load_pretrained.
"""
import json
import math
import subprocess
import sys

import pytest
import torch

import data
import evaluation
import generation
import lume
import membership
import methods
import metrics
import job
import run
import tiny
from conftest import EOS, PAD, ROOT, qa_items


def test_loads_like_a_released_target(olmo):
    model, tok = olmo
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (PAD, EOS, None)
    assert model.config.vocab_size == 50304 and model.config.max_position_embeddings == 4096
    assert tok("Hello world").input_ids == [12092, 1533]  # no BOS, no EOS added
    assert generation.stop_ids(model, tok) == [EOS]


def test_training_sequence_is_the_official_prompt_then_answer_then_eos(olmo, release):
    model, tok = olmo
    rows = [it for it in release if it.split == "forget"][:40:4]  # all three tasks, sc and qa
    encoded = job.encode_items(tok, rows)
    for it, (ids, n) in zip(rows, encoded):
        assert ids[:n] == tok(it.input).input_ids  # what the official scorer feeds model.generate
        assert ids[n:-1] == tok(" " + it.output, add_special_tokens=False).input_ids  # one space
        assert ids[-1] == EOS and PAD not in ids
    b = job.batch_of(encoded, list(range(len(rows))), tok.pad_token_id)
    pads = b.ids == PAD
    assert pads.any() and not (b.target_mask.bool() & pads).any()  # no pad position is a target
    assert (b.attn.bool() == ~pads).all()
    for i, (ids, n) in enumerate(encoded):  # every answer token and EOS is a target, no prompt token
        assert b.target_mask[i].nonzero().flatten().tolist() == list(range(n, len(ids)))


def test_batched_generation_equals_model_generate_token_for_token(olmo, release):
    model, tok = olmo
    prompts = ([it.input for it in release if it.kind == "sc"][:6] + [it.input for it in qa_items(release)][:2]
               + [it.input for it in release if it.task == 2][:2])
    enc = [tok(p).input_ids for p in prompts]
    ids, attn = lume.left_pad(enc, tok.pad_token_id)
    assert len({len(e) for e in enc}) > 5 and (ids == PAD).any()  # really left padded, with pad != EOS
    new = generation.greedy(model, ids, attn, 20, generation.stop_ids(model, tok))
    outs = generation.generate(model, tok, prompts, max_new_tokens=20, batch_size=4)
    distinct = set()
    for i, p in enumerate(prompts):
        one = torch.tensor([enc[i]])
        ref = model.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=20, do_sample=False,
                             pad_token_id=PAD)[0, one.shape[1]:].tolist()
        mine = new[i, :len(ref)].tolist()
        assert mine == ref, (i, mine, ref)
        assert outs[i] == generation.decode_new(tok, ref, [EOS])
        distinct.add(tuple(ref))
    assert len(distinct) >= 3  # trained weights: not one constant continuation


def test_generation_stops_where_generation_config_says(olmo, release):
    """generation_config.eos_token_id may be a list with ids other than the tokenizer's EOS; the
    batched path stops where model.generate stops and decodes what the official scorer decodes."""
    model, tok = olmo
    memorised = qa_items(release)
    prompts = [it.input for it in memorised]
    free = generation.generate(model, tok, prompts, max_new_tokens=20)
    assert sum(o.strip() == it.output for o, it in zip(free, memorised)) >= 4  # it learned most answers
    enc = [tok(p).input_ids for p in prompts]
    ids, attn = lume.left_pad(enc, PAD)
    new = generation.greedy(model, ids, attn, 20, [EOS])
    longest = max(range(len(prompts)), key=lambda i: int((new[i] != EOS).sum()))
    extra = new[longest, 1].item()
    assert extra != EOS and new[longest, 2].item() != EOS  # the 2nd of 3+ tokens: make it a stop id too
    model.generation_config.eos_token_id = [EOS, extra]
    try:
        outs = generation.generate(model, tok, prompts, max_new_tokens=20, batch_size=4)
        for p, out in zip(prompts, outs):
            assert out == metrics.official_generate(model, tok, p, 20)  # model.generate reads the list
        assert sum(len(o) for o in outs) < sum(len(o) for o in free)  # it did stop earlier
    finally:
        model.generation_config.eos_token_id = EOS


def test_cache_is_passed_under_the_installed_keyword_and_an_ignored_cache_fails_loudly(olmo, monkeypatch):
    import inspect
    model, tok = olmo
    key = generation.cache_keyword(model)
    assert key in inspect.signature(model.forward).parameters
    ids = torch.tensor([tok("The city of Rijola").input_ids])
    real = type(model).forward

    def forgetful(self, *a, **kw):  # a transformers that reads the cache under neither name
        kw.pop("cache", None), kw.pop("past_key_values", None)
        return real(self, *a, **kw)
    monkeypatch.setattr(type(model), "forward", forgetful)
    with pytest.raises(RuntimeError, match="KV cache holds 0 positions after a prefill of"):
        generation.greedy(model, ids, torch.ones_like(ids), 4, [EOS])


def test_mia_losses_equal_hf_loss_per_document(olmo, shared):
    model, tok = olmo
    mia = data.load_mia(shared / "lume-data" / "semeval25" / "mia_data")
    docs = [d.document for d in mia["member"][:3] + mia["nonmember"][:3]]
    docs.append(max((d.document for d in mia["nonmember"]), key=len))  # the longest: padding matters
    lengths = [len(tok(d).input_ids) for d in docs]
    assert max(lengths) - min(lengths) > 100
    ref = [metrics.official_doc_loss(model, tok, d) for d in docs]
    assert membership.doc_losses(model, tok, docs, batch_size=4) == pytest.approx(ref, abs=1e-5)


def test_mmlu_prompts_are_capped_at_2048_tokens_whatever_the_context(olmo, shared, monkeypatch):
    """Open-Instruct drops shots while the prompt is over 2,048 tokens; the released targets have a
    4,096-token context, and with the real tokenizer high-school European history needs the cap."""
    model, tok = olmo
    dev, test = data.load_mmlu(shared / "mmlu")
    subject = "high_school_european_history"
    seen = []
    monkeypatch.setattr(evaluation, "mmlu_choice_logits", lambda m, t, enc, *a: seen.extend(enc) or torch.zeros(len(enc), 4))
    evaluation.mmlu_records(model, tok, dev, {subject: test[subject][:6]})
    n_tokens = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
    for q, enc in zip(test[subject][:6], seen):
        want = metrics.mmlu_fit_prompt(subject, dev[subject], q, n_tokens, 2048)  # Open-Instruct's loop
        assert enc == tok(want).input_ids and len(enc) <= 2048
    assert any(len(tok(metrics.mmlu_prompt(subject, dev[subject], q)).input_ids) > 2048 for q in test[subject][:6])


def test_evaluation_runs_on_weights_in_the_evaluation_dtype(olmo_dir, release, monkeypatch):
    """--eval-precision bf16 (the CUDA default, as the official scorer loads the targets) scores
    bf16 weights without autocast, and leaves the fp32 weights being trained untouched."""
    assert lume.resolve_eval_precision("auto", torch.device("cuda")) == "bf16"
    assert lume.resolve_eval_precision("auto", torch.device("cpu")) == "fp32"
    model, tok = lume.load_pretrained(str(olmo_dir))
    seen = {}

    def spy(m, *a, **kw):
        seen["dtypes"] = {p.dtype for p in m.parameters()}
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return [], [], None, {}
    monkeypatch.setattr(evaluation, "evaluate", spy)
    cfg = run.parse_args(["--model", str(olmo_dir), "--eval-precision", "bf16"])
    job.score(cfg, model, tok, (release[:2], None, None), "before", "bf16")
    assert seen == {"dtypes": {torch.bfloat16}, "autocast": False}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_run_py_end_to_end_on_the_hub_shaped_directory(olmo_dir, shared, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "run.py", "--model", str(olmo_dir), "--data",
                        str(shared / "lume-data" / "lume"), "--mia-data", "none", "--mmlu", "none",
                        "--n-docs", "1", "--method", "npo",
                        "--max-steps", "2", "--max-new-tokens", "8", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert set(res) == {"before", "after"} and len(res["after"]["aggregated-terms"]) == 12
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[0]["log_ratio"] == 0.0  # NPO's reference is the model at step 0, exactly
    gens = [json.loads(line) for line in open(out / "generations.jsonl")]
    assert len(gens) == 2 * 2 * (2 + 6 + 2)  # stages x splits x items of one document per task


# -----------------------------------------------------------------------------
# the training loop's guards (small target: seconds)


def _steps(tok, items, n=2, rows=4):
    enc = [lume.encode_pair(tok, it.input, it.output) for it in items[:rows]]
    b = lume.make_batch([e[0] for e in enc], [e[1] for e in enc], list(range(rows)), tok.pad_token_id)
    return [[(b, None)] for _ in range(n)]


def test_finite_loss_with_nonfinite_gradients_stops_before_the_update(small_target, small_data):
    model, tok = small_target
    model = lume.load_pretrained(model.name_or_path)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_grad(m, forget, retain, totals):  # value 0, gradient 0 * inf = NaN in every weight
        loss, terms = methods.ga(m, forget, retain, totals)
        w = sum(p.sum() for p in m.parameters())
        return loss + 0.0 * (w - w.detach()).abs().sqrt(), terms
    with pytest.raises(lume.TrainingDiverged, match="step 0: loss .* is finite but the gradient norm is nan"):
        lume.train(model, _steps(tok, small_data[0]), nan_grad, lr=1e-3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training  # eval mode again, though the loop raised


def test_dropout_is_off_so_npo_starts_at_its_reference(small_target, small_data):
    """A target whose config has dropout: the reference (eval mode) and the policy (train mode)
    agree at step 0, so pure NPO's loss is exactly -(2/beta) log sigmoid(0) = 20 log 2."""
    model, tok = small_target
    model = lume.load_pretrained(model.name_or_path)[0]
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    steps = _steps(tok, small_data[0], n=1)
    ref = lume.reference_logps(model, [steps[0][0][0]], 4, torch.autocast("cpu", enabled=False))

    def npo(m, f, r, totals):
        return methods.npo(m, f, r, totals, beta=0.1, retain_weight=0.0, ref_logps=ref)
    hist = lume.train(model, steps, npo, lr=1e-4)
    assert hist[0]["log_ratio"] == 0.0 and hist[0]["npo"] == pytest.approx(20 * math.log(2), rel=1e-6)


def test_npo_reference_is_computed_on_the_training_micro_batches(tmp_path, small_tiny, monkeypatch):
    seen = []
    real = lume.reference_logps
    monkeypatch.setattr(lume, "reference_logps", lambda m, batches, n, ac: seen.extend(batches) or real(m, batches, n, ac))
    trained = []
    real_step = lume.train_step
    monkeypatch.setattr(lume, "train_step", lambda model, opt, scaler, micros, *a, **k: (
        trained.extend(f for f, _ in micros), real_step(model, opt, scaler, micros, *a, **k))[1])
    out = job.main(run.parse_args(["--n-docs", "2", "--max-steps", "3", "--max-new-tokens", "4", "--batch-size", "3",
                                   "--precision", "bf16", "--no-eval-before", "--cache-dir", str(tmp_path / "c"),
                                   "--out", str(tmp_path / "o")]))
    first_epoch = trained[-3:-1]  # the unlearning steps come last (after building the target): 4 forget
    # items in micro-batches of 3 and 1 make the first epoch
    assert [b.idx.tolist() for b in seen] == [b.idx.tolist() for b in first_epoch]
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(seen, first_epoch))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[0]["log_ratio"] == 0.0  # under bf16 autocast too
