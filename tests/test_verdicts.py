"""Verdicts you can trust (issue 21): quantisation acts on the deployed (LoRA-merged) weights; one
attacker that fine-tunes every weight after any method; --keep best never keeps the target when a
later step forgets; the unrelated and fewshot probes never train on or show a forget item, take
their shots from the same task's retain split and restore every bit; bad --attacks input; RMU's
parameter sets."""
import copy

import pytest
import torch

import attacks
import checks
import data
import job
import lora
import memory
import methods
import run
import trajectory
from test_attacks import ByteTok, random_model

CPU = torch.device("cpu")
FULL = attacks.attacker_setup("fp32")


def with_lora(seed: int = 0, scale: float = 1e-3):
    """A random model with rank-4 adapters on every projection and a small nonzero update B A: the
    regime where quantising W0 and the adapters separately keeps the update (issue 21)."""
    model = lora.add_lora(random_model(seed), 4, 8.0, lora.DEFAULT_TARGETS)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.normal_(0, scale)
    return model


def snapshot(model) -> dict:
    return {n: (p.detach().clone(), p.requires_grad, p.dtype) for n, p in model.named_parameters()}


def same_as(model, snap) -> bool:
    now = dict(model.named_parameters())
    return now.keys() == snap.keys() and all(
        torch.equal(now[n].detach(), v) and now[n].requires_grad == g and now[n].dtype == d
        for n, (v, g, d) in snap.items())


# --- 1. quantisation of the deployed model


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_quantisation_equals_quantising_the_merged_model(bits):
    model = with_lora()
    merged = lora.merge(copy.deepcopy(model))  # plain nn.Linear holding W0 + (alpha/r) B A
    attacks.quantise_(merged, bits)
    ids = torch.randint(2, 258, (2, 12))
    before = snapshot(model)
    with attacks.restored(model), attacks.deployed(model):
        n = attacks.quantise_(model, bits)
        assert n == 2 * 7  # the base projections, never lora_A / lora_B
        for name, m in lora.lora_modules(model).items():
            assert torch.equal(m.weight, merged.get_submodule(name).weight), name
        assert torch.equal(model(input_ids=ids).logits, merged(input_ids=ids).logits)
    assert same_as(model, before) and all(m.adapters_on for m in lora.lora_modules(model).values())


@pytest.mark.parametrize("name", ["quant8", "quant4", "nf4", "fp4", "int8-outlier", "relearn"])
def test_every_weight_attack_of_a_lora_run_is_scored_on_the_deployed_model(name):
    model, ids = with_lora(2), torch.randint(2, 258, (2, 12))
    merged = lora.merge(copy.deepcopy(model))
    items = [it for it in data.builtin(n_docs=2, seed=0)[0] if it.split == "forget" and it.task == 1]
    recipe = {"lr": 1e-2, "steps": 2, "batch_size": 2}
    if name != "relearn":
        attacks.quantise_(merged, name)
    else:  # the same full fine-tune on the plain merged model, every weight trainable
        merged.requires_grad_(True)
        attacks.relearn_(merged, ByteTok(), attacks.split_halves([it for it in items if it.kind == "qa"], 0)[0],
                         recipe, seed=0, device=CPU, precision="fp32")
    before, seen = snapshot(model), {}
    res = {"forget-set": {"Task1": {"regurgitation-score": 0.5, "knowledge-score": 0.5}}}

    def score(stage):
        assert not any(m.adapters_on for m in lora.lora_modules(model).values())
        seen["logits"] = model(input_ids=ids).logits
        return [], [], res
    attacks.run([name], model, ByteTok(), {"forget": items, "retain": [], "mia": None},
                {"results": {"before": res, "after": res}, "generations": []}, score, None, tasks=[1], seed=0,
                recipe=recipe, setup=FULL, device=CPU)
    torch.testing.assert_close(seen["logits"], merged(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert same_as(model, before)


def test_deployed_weights_of_last_k_and_rmu_are_the_weights_as_they_are():
    for prepare in (lambda m: lora.train_last_layers(m, 1), lambda m: methods.rmu_trainable(m, 1, "down")):
        model = random_model(3)
        prepare(model)
        before = snapshot(model)
        with attacks.deployed(model):
            assert same_as(model, before)


# --- 2. one attacker for every method


@pytest.mark.parametrize("setup", ["rmu-mlp", "rmu-down", "lora", "last-k", "full"])
def test_the_attacker_trains_every_weight_of_the_deployed_model(setup):
    plain = random_model(4)
    n_full = sum(p.numel() for p in plain.parameters())
    model = copy.deepcopy(plain)
    if setup.startswith("rmu"):
        methods.rmu_trainable(model, 1, setup[4:])
    elif setup == "lora":
        model = with_lora(4)
    elif setup == "last-k":
        lora.train_last_layers(model, 1)
    before = snapshot(model)
    items = [it for it in data.builtin(n_docs=2, seed=0)[0] if it.kind == "qa"][:4]
    with attacks.restored(model), attacks.deployed(model), attacks.attacker(model, FULL) as n_train:
        assert n_train == n_full
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert sum(p.numel() for p in trained.values()) == n_full
        attacks.relearn_(model, ByteTok(), items, {"lr": 1e-2, "steps": 2, "batch_size": 2}, seed=0,
                         device=CPU, precision="fp32")
        now = dict(model.named_parameters())
        assert all(not torch.equal(now[n], v) for n, v in trained.items())  # every tensor moved
    assert same_as(model, before)  # weights, adapters, requires_grad and dtypes, bit for bit


def test_the_attackers_setup_on_a_gpu_budget_is_the_memory_plans_pick_never_lora():
    cfg, gib = memory.model_config("olmo-7b"), memory.GiB
    assert attacks.attacker_setup("bf16", cfg, 4, 512, 400 * gib)["setup"] == "full-fp32-master"
    assert attacks.attacker_setup("bf16", cfg, 4, 512, 80 * gib)["setup"] == "full-bf16-sr"
    small = attacks.attacker_setup("bf16", cfg, 4, 512, 24 * gib)  # memory's pick there is LoRA 16
    assert memory.pick_setup(cfg, "ga", 4, 512, 24 * gib)[0] == "lora-16"
    assert small == {"setup": "last-8", "precision": "bf16", "train_layers": 8, "grad_checkpointing": True}
    assert FULL == {"setup": "full", "precision": "fp32", "train_layers": 0, "grad_checkpointing": False}
    model = random_model(5)
    with attacks.deployed(model), attacks.attacker(model, {**small, "train_layers": 1, "grad_checkpointing": False}) as n:
        assert n == sum(p.numel() for p in lora.decoder_layers(model)[-1].parameters())


# --- 3. --keep best by one rule


def result(t1_forget: float, mmlu=None, agg=None) -> dict:
    forget = {f"Task{t}": {"regurgitation-score": t1_forget if t == 1 else 1.0,
                           "knowledge-score": t1_forget if t == 1 else 1.0} for t in (1, 2, 3)}
    retain = {f"Task{t}": {"regurgitation-score": 1.0, "knowledge-score": 1.0} for t in (1, 2, 3)}
    res = {"forget-set": forget, "retain-set": retain, "mia_loss_acc": 1.0}
    if mmlu is not None:  # the official aggregate of issue 21: the target wins it
        res.update({"mmlu_average": mmlu, "aggregate-score": agg})
    return res


@pytest.mark.parametrize("with_mmlu", [True, False])
def test_keep_best_keeps_the_forgotten_step_not_the_target(with_mmlu):
    rows = [trajectory.row(0, result(1.0, 0.400, 0.300) if with_mmlu else result(1.0)),
            trajectory.row(10, result(0.0, 0.395, 0.2983) if with_mmlu else result(0.0))]
    best, why = trajectory.select_best(rows, [1])
    assert best["step"] == 10, why
    assert ("MMLU >= 0.371" in why) == with_mmlu


def test_keep_best_without_a_passing_step_says_so_and_names_the_closest():
    rows = [trajectory.row(s, result(f, m, 0.0)) for s, f, m in [(0, 1.0, 0.30), (5, 0.5, 0.29), (10, 0.0, 0.25)]]
    best, why = trajectory.select_best(rows, [1])
    assert best["step"] == 10 and "no step that forgets kept MMLU >= 0.371" in why and "closest: step 5" in why
    still = [trajectory.row(s, result(1.0, 0.5, 0.3)) for s in (0, 5)]  # nothing forgotten: the target
    best, why = trajectory.select_best(still, [1])
    assert best["step"] == 0 and "forgot anything" in why


# --- the new probes


def test_unrelated_trains_only_on_non_members_never_a_forget_item_and_restores_every_bit():
    items, mia = data.builtin(n_docs=2, seed=0)
    forget = [it for it in items if it.split == "forget" and it.task == 1]
    model, seen = random_model(6), []
    before = snapshot(model)
    res = {"forget-set": {"Task1": {"regurgitation-score": 0.5, "knowledge-score": 0.5}}}

    def score(stage):
        assert not same_as(model, before)  # scored on the attacked weights
        return [], [], res
    rob, _, _ = attacks.run(["unrelated"], model, ByteTok(), {"forget": forget, "retain": [], "mia": mia},
                            {"results": {"before": res, "after": res}, "generations": []}, score, None, tasks=[1],
                            seed=0, recipe={"lr": 1e-2, "steps": 3, "batch_size": 2}, setup=FULL, device=CPU,
                            record=seen.append)
    trained = {i for batch in seen for i in batch}
    assert trained <= {d.id for d in mia["nonmember"]} and trained == set(rob["unrelated"]["docs"])
    assert trained.isdisjoint({it.doc_id for it in items}) and len(seen) == 3
    texts = [d.document for d in mia["nonmember"] if d.id in trained]
    assert not any(it.output in t for it in items if it.split == "forget" for t in texts)
    assert rob["unrelated"]["attacker"]["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert same_as(model, before)


def test_fewshot_shots_come_from_the_same_tasks_retain_split_and_change_no_weight():
    items, _ = data.builtin(n_docs=3, seed=0)
    forget = [it for it in items if it.split == "forget"]
    retain = [it for it in items if it.split == "retain"]
    by_id = {it.id: it for it in items}
    prompts = attacks.fewshot_prompts([it for it in forget if it.kind == "qa"],
                                      [it for it in retain if it.kind == "qa"], 2, seed=0)
    assert {it.task for it, _, _ in prompts} == {1, 2, 3}
    for it, prompt, shots in prompts:
        assert len(shots) == 2 and all(by_id[s].split == "retain" and by_id[s].kind == "qa"
                                       and by_id[s].task == it.task for s in shots)
        assert prompt == "".join(f"{by_id[s].input} {by_id[s].output}\n" for s in shots) + it.input
        assert not any(f.input in prompt for f in forget if f.id != it.id)  # no other forget item shown
    model, shown = random_model(7), []
    before = snapshot(model)

    def generate(rows_items, stage):
        shown.extend(rows_items)
        assert same_as(model, before)
        return [{"task": f"Task{r.task}", "score": float(k % 2), "id": r.id, "stage": stage}
                for k, r in enumerate(rows_items)]
    res = {"forget-set": {f"Task{t}": {"regurgitation-score": 0.5, "knowledge-score": k}
                          for t, k in ((1, 0.25), (2, 0.0), (3, 0.0))}}
    before_res = {"forget-set": {f"Task{t}": {"regurgitation-score": 1.0, "knowledge-score": 1.0} for t in (1, 2, 3)}}
    rob, gens, _ = attacks.run(["fewshot"], model, ByteTok(), {"forget": forget, "retain": retain, "mia": None},
                               {"results": {"before": before_res, "after": res}, "generations": []}, None, generate,
                               tasks=[1, 2, 3], seed=0, recipe={}, setup=FULL, device=CPU)
    assert [r.input for r in shown] == [p for _, p, _ in attacks.fewshot_prompts(
        [it for it in forget if it.kind == "qa"], [it for it in retain if it.kind == "qa"], attacks.FEWSHOT_K, 0)]
    k1 = rob["fewshot"]["knowledge"]["Task1"]
    want = sum(g["score"] for g in gens if g["task"] == "Task1") / sum(g["task"] == "Task1" for g in gens)
    assert k1["with_shots"] == pytest.approx(want) and k1["after"] == 0.25
    assert k1["recovery"] == pytest.approx((want - 0.25) / 0.75)
    assert same_as(model, before)


# --- bad input


@pytest.mark.parametrize("argv,says", [
    (["--attacks", "quant8,quant8"], "given twice: 'quant8'"),
    (["--attacks", "all,relearn"], "given twice: 'relearn'"),
    (["--attacks", "quant9"], "unknown attack(s) 'quant9'"),
    (["--attacks", "unrelated", "--mia-data", "none"], "--attacks unrelated fine-tunes on the MIA non-member"),
    (["--rmu-params", "down"], "--rmu-params is RMU's"),
])
def test_bad_attacks_are_one_error_line_before_any_work(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        run.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and err.count("error:") == 1, err


def test_an_attack_without_its_data_is_refused_after_reading_it_before_the_model(tmp_path, monkeypatch):
    items, mia = data.builtin(n_docs=2, seed=0)
    no_retain_qa = [it for it in items if not (it.split == "retain" and it.kind == "qa" and it.task == 1)]
    monkeypatch.setattr(job, "load_inputs", lambda cfg: (no_retain_qa, None, None, {}))
    monkeypatch.setattr(job, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = run.parse_args(["--attacks", "fewshot,unrelated", "--out", str(tmp_path / "r")])
    with pytest.raises(job.UserError) as e:
        job.main(cfg)
    msg = str(e.value)
    assert "fewshot" in msg and "task(s) 1 have none" in msg and "unrelated" in msg and "\nerror: " in msg
    assert not (tmp_path / "r").exists()
    assert attacks.input_problems(attacks.NAMES, items, mia, [1, 2, 3]) == []


# --- RMU's parameter set


def test_rmu_params_down_trains_only_down_proj_of_l_minus_2_to_l():
    model = random_model(8)
    down = methods.rmu_trainable(model, 1, "down")
    assert down == [f"model.layers.{k}.mlp.down_proj.weight" for k in (0, 1)]
    wide = methods.rmu_trainable(model, 1, "mlp")
    assert len(wide) == 6 and set(down) < set(wide)
    assert run.parse_args(["--method", "rmu"]).rmu_params == "mlp"  # tiny: today's set, today's results
    assert run.resolve_auto(run.Config(method="rmu", model="olmo-7b")).rmu_params == "down"  # WMDP's set
    assert run.resolve_auto(run.Config(method="npo")).rmu_params == "auto"
    assert checks.attack_problems(run.parse_args(["--attacks", "all"])) == []


# --- issue 36: the relearn sweep, selection apart from reporting, the retain-only oracle


def test_the_relearn_sweep_starts_every_point_from_the_same_weights_and_scores_the_best():
    model = random_model(4).requires_grad_(True)
    items = [it for it in data.builtin(n_docs=2, seed=0)[0] if it.split == "forget" and it.task == 1 and it.kind == "qa"]
    T, V = attacks.split_halves(items, 0)
    before, starts = snapshot(model), []
    grid = attacks.relearn_grid({"lr": 1e-3, "steps": 10, "batch_size": 2}, "small")
    assert [(g["lr"], g["steps"]) for g in grid][2] == (1e-3, 10) and len(grid) == 6  # the recipe is a point
    for g in grid:
        g["steps"] //= 5  # 2 and 6 steps: seconds

    def probe(V):  # every point must start from the weights the sweep was given
        return {"V_knowledge": 0.0, "V_nll": sum(attacks.item_nll(model, ByteTok(), V, CPU))}
    record = lambda ids: starts.append(same_as(model, before))  # noqa: E731  (called before training)
    points = attacks.sweep_(model, ByteTok(), T, V, grid, probe, seed=0, device=CPU, precision="fp32", record=record)
    assert all(starts) and same_as(model, before)  # restored bit for bit between points and after
    assert len({p["V_nll"] for p in points}) == len(points)  # every point trained differently
    best = attacks.best_point(points)
    assert best["V_nll"] == min(p["V_nll"] for p in points)  # equal exact match: the lowest NLL wins
    assert attacks.best_point([{**points[0], "V_knowledge": 1.0}] + points[1:]) is not best


def test_keep_best_picks_on_a_selection_subset_disjoint_from_the_reported_one():
    items = data.builtin(n_docs=8, seed=0)[0]
    sel, rep = trajectory.selection_split(items, seed=0)
    assert {it.id for it in sel}.isdisjoint({it.id for it in rep}) and len(sel) + len(rep) == len(items)
    assert trajectory.selection_split(items[::-1], seed=0)[0] == sel[::-1]  # the ids decide, not the order
    cfg = run.parse_args(["--eval-every", "5", "--keep", "best"])
    assert {it.id for it in trajectory.eval_subset(trajectory.picking_items(cfg, items), 0)} <= {it.id for it in sel}
    # the reported after scores read only the reported items: selection rows score 1, the others 0
    rows = [{"id": it.id, "stage": "after", "split": it.split, "task": it.task, "kind": it.kind,
             "score": float(it.id in {s.id for s in sel})} for it in items]
    kept = trajectory.kept_report({"step": 3, "why": "x"}, {"generations": rows, "results": {"after": {}}}, items, 0)
    rep_res = kept["after_reported"]
    assert rep_res["forget-set"]["Task1"]["knowledge-score"] == 0.0 and rep_res["retain-set"]["Task2"][
        "regurgitation-score"] == 0.0 and kept["after_includes_selection"] and kept["n_reported"] == len(rep)


def test_the_committed_oracle_never_saw_a_forget_item():
    import json

    import tiny
    items = tiny.default_items()
    meta = json.loads((tiny.ORACLE / "lume_target.json").read_text())
    forget = {it.id for it in items if it.split == "forget"}
    assert set(meta["trained_ids"]) == {it.id for it in tiny.oracle_items(items)}  # what the build trained on
    assert forget and not forget & set(meta["trained_ids"]) and meta["n_items"] == len(items) - len(forget)
    assert tiny.problems(tiny.ORACLE) == []  # checksummed, as target/
    key = tiny.fingerprint(tiny.oracle_items(items), {"recipe": tiny.TINY_RECIPE, "config": tiny.TINY,
                                                      "tokenizer": tiny.target_key(tiny.EMBEDDED)})
    assert meta["fingerprint"] == key  # built from the retain items of the default data, with target/'s tokenizer
    assert (tiny.ORACLE / "tokenizer.json").read_bytes() == (tiny.EMBEDDED / "tokenizer.json").read_bytes()


def test_ks_statistic_and_p_value_against_a_hand_computation_and_scipy():
    import oracles  # noqa: I001
    # x = [1, 2, 3], y = [2.5, 4]: CDF gaps at 1, 2, 2.5, 3, 4 -> 1/3, 2/3, 1/6, 1/2, 0: D = 2/3;
    # lattice paths (0,0)->(3,2) with |2i - 3j| < 4 at every point (blocked: (2,0), (3,0), (0,2), (1,2)):
    # 4 of C(5, 2) = 10 -> p = 1 - 4/10 = 0.6
    d, p = oracles.ks_2samp([1, 2, 3], [2.5, 4])
    assert d == pytest.approx(2 / 3) and p == pytest.approx(0.6)
    stats = pytest.importorskip("scipy.stats")
    rng = torch.Generator().manual_seed(0)
    for n, m in ((8, 8), (7, 12), (30, 45)):
        x, y = torch.randn(n, generator=rng).tolist(), (torch.randn(m, generator=rng) + 0.5).tolist()
        ref = stats.ks_2samp(x, y, method="exact")
        assert oracles.ks_2samp(x, y) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-9, abs=1e-12)
    d, p = oracles.ks_2samp(list(range(40)), [v + 0.5 for v in range(60)], exact_limit=0)  # the limit law
    assert p == pytest.approx(stats.kstwobign.sf(d * (40 * 60 / 100) ** 0.5), rel=1e-9)


def test_privleak_is_muses_relative_gap_and_separation_is_an_auc_over_items():
    import oracles
    assert oracles.privleak(0.9, 0.6) == pytest.approx(50.0) and oracles.privleak(0.3, 0.6) == pytest.approx(-50.0)
    assert oracles.privleak(0.6, 0.6) == 0.0 and oracles.privleak(None, 0.5) is None
    sep = oracles.separation({"loss": {"a": -0.1, "b": -0.2}, "knowledge": {}},
                             {"loss": {"a": -2.0, "b": -0.15}, "knowledge": {"a": 0.0}})
    assert sep == {"loss": 0.75, "knowledge": None}  # P(target > oracle): 3 of 4 pairs
