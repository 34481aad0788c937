"""lume.py, evaluation.py and tiny.py: loading, batching, generation, MIA losses, MMLU scoring,
the training loop and its precision paths, the cached tiny target."""
import pytest
import torch

import evaluation
import generation
import lume
import methods
import rundir
import tiny


def test_alias_table_and_unreachable_hub(monkeypatch):
    assert lume.resolve_model("olmo-7b") == (
        "llmunlearningsemeval2025organization/olmo-finetuned-semeval25-unlearning",
        "allenai/OLMo-7B-0724-Instruct-hf")
    assert lume.resolve_model("olmo-1b") == (
        "llmunlearningsemeval2025organization/olmo-1B-model-semeval25-unlearning", "allenai/OLMo-1B-0724-hf")
    assert lume.resolve_model("some/repo") == ("some/repo", "some/repo")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: patch the constant it consults, or the
    # call goes to the network and waits out its retries (~50 s here) before failing the same way
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match=r"'olmo-1b' \(llmunlearningsemeval2025organization/olmo-1B.*from the hub: "
                                         r".*Error.*local directory.*HF_TOKEN"):
        lume.load_pretrained("olmo-1b")


def test_local_paths_are_never_sent_to_the_hub(tmp_path):
    with pytest.raises(SystemExit, match="no/such/ckpt is not a directory written by save_pretrained"):
        lume.load_pretrained(str(tmp_path / "no" / "such" / "ckpt"))
    with pytest.raises(SystemExit, match="no config.json"):  # exists, but holds no checkpoint
        lume.load_pretrained(str(tmp_path))


def test_local_directory_round_trip(small_target, tmp_path):
    model, tok = small_target
    rundir.save_model(model, tok, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    again, tok2 = lume.load_pretrained(str(tmp_path / "ckpt"))
    ids = torch.tensor([tok("Hello world").input_ids])
    torch.testing.assert_close(model(input_ids=ids).logits, again(input_ids=ids).logits)
    with pytest.raises(AssertionError, match="refusing to overwrite"):
        rundir.save_model(model, tok, tmp_path / "ckpt")


def test_encode_pair_masks_prompt(small_target):
    _, tok = small_target
    ids, n = lume.encode_pair(tok, "What is the city?", "Rijola")
    assert ids[:n] == tok("What is the city?").input_ids and ids[-1] == tok.eos_token_id
    b = lume.make_batch([ids, ids[:3]], [n, 1], [0, 1], tok.pad_token_id)
    assert b.target_mask[0].tolist() == [0.0] * n + [1.0] * (len(ids) - n)
    assert b.target_mask[1].sum() == 2 and b.attn[1].sum() == 3


def test_batched_generation_equals_one_at_a_time(small_target, small_data):
    # each equals the official model.generate (metrics.official_generate): tests/test_reference.py
    model, tok = small_target
    items, _ = small_data
    prompts = [it.input for it in items[:12]]
    batched = generation.generate(model, tok, prompts, max_new_tokens=24, batch_size=5)
    single = [generation.generate(model, tok, [p], max_new_tokens=24)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) >= 6  # varied outputs: the equality is not trivial


def test_plan_steps_covers_each_forget_item_once_per_epoch():
    steps = lume.plan_steps(10, 4, batch_size=3, grad_accum=2, epochs=2, max_steps=0, seed=1, lengths=list(range(10)))
    assert len(steps) == 4  # ceil(10 / 6) per epoch
    seen = [i for s in steps for f, _ in s for i in f]
    assert sorted(seen) == sorted(list(range(10)) * 2)
    assert all(len(r) == len(f) and all(0 <= j < 4 for j in r) for s in steps for f, r in s)
    assert lume.plan_steps(10, 0, 3, 1, 1, 0, 1) == lume.plan_steps(10, 0, 3, 1, 1, 0, 1)
    assert len(lume.plan_steps(10, 0, 3, 1, 1, max_steps=7, seed=1)) == 7


def test_lr_schedule():
    assert [lume.lr_at(s, 10, 1.0, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lume.lr_at(2, 10, 1.0, 2, "linear") == 1.0 and lume.lr_at(6, 10, 1.0, 2, "linear") == 0.5


def _steps(tok, items, n=2):
    enc = [lume.encode_pair(tok, it.input, it.output) for it in items[:4]]
    b = lume.make_batch([e[0] for e in enc], [e[1] for e in enc], [0, 1, 2, 3], tok.pad_token_id)
    return [[(b, None)] for _ in range(n)]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "bf16-pure"])
def test_amp_paths_give_the_fp32_gradient(small_target, small_data, precision, monkeypatch):
    """Each precision path's step-0 gradient norm (the unscaled one clip_grad_norm_ logs) equals
    fp32's within bf16/fp16 rounding: a missing unscale_ (fp16 grads x 65536) or a path that
    computes another loss fails. A GradScaler is enabled exactly for fp16."""
    model, tok = small_target
    fp32 = lume.load_pretrained(model.name_or_path)[0]
    want = lume.train(fp32, _steps(tok, small_data[0], 1), methods.ga, lr=1e-4)[0]["grad_norm"]
    model = lume.load_pretrained(model.name_or_path, lume.weight_dtype(precision))[0]
    used = {}
    real = torch.amp.GradScaler

    def spy(device, enabled=True, **kw):
        used["enabled"] = enabled
        return real(device, enabled=enabled, **kw)
    monkeypatch.setattr(torch.amp, "GradScaler", spy)
    hist = lume.train(model, _steps(tok, small_data[0]), methods.ga, lr=1e-4, precision=precision)
    assert used["enabled"] == (precision == "fp16")  # a scaler exactly when fp16
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    # measured: relative differences 0.2-2% (bf16 autocast 0.4%, fp16 0.2%, bf16-pure 1.6%)
    assert hist[0]["grad_norm"] == pytest.approx(want, rel=0.05), (hist[0]["grad_norm"], want)
    if precision == "bf16-pure":
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with lume.autocast_ctx(torch.device("cpu"), precision):
        dtype = model(input_ids=torch.tensor([[1, 2, 3]])).logits.dtype
    assert dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16-pure": torch.bfloat16}[precision]


def test_nan_loss_stops_before_the_update(small_target, small_data):
    model, tok = small_target
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_loss(m, forget, retain, totals):
        loss, terms = methods.ga(m, forget, retain, totals)
        return loss * float("nan"), terms
    with pytest.raises(lume.TrainingDiverged, match="step 0: loss is nan"):
        lume.train(model, _steps(tok, small_data[0]), nan_loss, lr=1e-3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_tiny_target_is_cached_and_reused(small_data, tmp_path, monkeypatch):
    from conftest import SMALL_CONFIG
    items, _ = small_data
    kw = dict(log=lambda s: None, recipe={"epochs": 1, "batch_size": 8}, config=SMALL_CONFIG)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    p1 = tiny.tiny_target(items, tmp_path, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # building left the caller's draws as they were
    monkeypatch.setattr(lume, "train", lambda *a, **k: pytest.fail("rebuilt a cached target"))
    assert tiny.tiny_target(items, tmp_path, **kw) == p1
    assert tiny.fingerprint(items, {"a": 1}) != tiny.fingerprint(items[1:], {"a": 1})


def test_mmlu_batched_logits_equal_one_question_at_a_time(small_target, shared):
    """Left-padded MMLU batches of real 5-shot prompts give each question the logits it gets
    alone (padding, positions and the last-token pick are right), and mmlu_eval's accuracy is
    the argmax of those logits, question by question."""
    import data
    import metrics
    model, tok = small_target
    dev, test = data.load_mmlu(shared / "mmlu")
    test = {s: test[s][:3] for s in ("abstract_algebra", "college_medicine", "high_school_european_history")}
    max_len = model.config.max_position_embeddings  # 512: european history keeps only a 0-shot tail
    enc = [evaluation.mmlu_encode(tok, s, dev[s], q, max_len) for s in test for q in test[s]]
    assert len({len(e) for e in enc}) >= 5  # rows of a batch are padded differently
    batched = evaluation.mmlu_choice_logits(model, tok, enc, batch_size=4)
    alone = torch.cat([evaluation.mmlu_choice_logits(model, tok, [e], batch_size=1) for e in enc])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    assert batched.std(0).min() > 0  # the logits depend on the question: not a constant
    res = evaluation.mmlu_eval(model, tok, dev, test)
    truth = [q.answer for s in test for q in test[s]]
    picks = ["ABCD"[i] for i in alone.argmax(-1).tolist()]
    hits = [p == a for p, a in zip(picks, truth)]
    assert res["average_acc"] == pytest.approx(sum(hits) / len(hits))
    assert res["subject_acc"]["abstract_algebra"] == pytest.approx(sum(hits[:3]) / 3)
    assert metrics.mmlu_choice_ids(tok) == [tok.encode(" " + c, add_special_tokens=False)[-1] for c in "ABCD"]
