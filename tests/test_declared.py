"""A method is one declaration (methods.Method): one declared here runs end to end, killed and resumed;
no other module names a method; every real-model default is its source's number."""
import ast
import dataclasses
import functools
import json
import os
import signal

import pytest
import torch

import job
import lume
import methods
import run
from conftest import ROOT

# --- a method declared in this file, nowhere else


def ratio_loss(model, forget, retain, totals, *, ref):
    """mean_i pi_theta(y_i|x_i) / pi_ref(y_i|x_i) over the step's forget rows: at the start the
    gradient of GA on sequence sums, then weighted by how much of each answer is still there. ref:
    log pi_ref, prepared once from the model before unlearning: recomputing it after a resume would
    reset every ratio to 1 and change the run, so the checkpoint must carry it."""
    logp = lume.seq_logps(model, forget)  # (B,)
    ratio = torch.exp(logp - ref.to(logp.device, logp.dtype)[forget.idx])
    KILL["calls"] += 1
    if KILL["calls"] == KILL["at"]:  # SIGTERM arrives during this step: the run checkpoints, then stops
        os.kill(os.getpid(), signal.SIGTERM)
    return ratio.sum() / totals["forget_seqs"], {"ratio": ratio.sum().item() / totals["forget_seqs"]}


def ratio_prepare(p):
    if p.saved is not None:
        return {"ref": p.saved["ratio_ref"]}
    return {"ref": p.reference_logps(methods.first_forget_batches(p.plan, p.steps))}


KILL = {"calls": 0, "at": 0}
RATIO = methods.Method("RATIO", ratio_loss, prepare=ratio_prepare, state={"ratio_ref": ("ref", "shared")},
                       memory=methods.Memory(retain_rows=False, approx="a test's method"))


def test_a_method_declared_in_a_test_file_runs_checkpoints_and_resumes(tmp_path, small_tiny, monkeypatch):
    monkeypatch.setitem(methods.METHODS, "ratio", RATIO)  # methods.register, undone after the test
    argv = ["--method", "ratio", "--n-docs", "2", "--max-steps", "4", "--max-new-tokens", "4", "--no-eval-before",
            "--cache-dir", str(tmp_path / "cache")]
    whole = job.main(run.parse_args([*argv, "--out", str(tmp_path / "whole")]))
    KILL.update(calls=0, at=3)  # killed during step 3 of 4: checkpoint at step 3, then stop
    with pytest.raises(SystemExit):
        job.main(run.parse_args([*argv, "--save-every", "2", "--out", str(tmp_path / "killed")]))
    KILL.update(at=0)
    assert json.load(open(tmp_path / "killed" / "status.json"))["status"] == "failed"
    state = json.load(open(next((tmp_path / "killed" / "checkpoints").glob("step-*")) / "state.json"))
    assert "ratio_ref" in state  # the declared state, under its declared key
    resumed = job.main(run.parse_args(["--resume", str(tmp_path / "killed")]))
    assert (whole / "results.json").read_bytes() == (resumed / "results.json").read_bytes()
    assert (whole / "generations.jsonl").read_bytes() == (resumed / "generations.jsonl").read_bytes()
    losses = [[r["loss"] for r in map(json.loads, open(d / "log.jsonl"))] for d in (whole, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 4 and losses[0][0] == pytest.approx(1.0)
    setup = json.load(open(whole / "config.json"))["setup"]  # CPU, fp32: plain AdamW over every weight
    assert (setup["precision"], setup["autocast"], setup["grad_scaler"], setup["optimizer"]) == ("fp32", "off", False,
                                                                                                 "AdamW")
    assert setup["trains"] == "every weight" and setup["trainable_params"] == setup["params"] > 0
    assert (setup["forget_rows"], setup["retain_rows"], setup["memory_plan"]) == (4, 0, None)


def test_the_run_says_its_setup_before_the_first_step(tmp_path, small_tiny, capsys):
    """bf16 autocast over fp32 LoRA adapters on the CPU: the `setup:` line comes before the first step
    and says what lume.train does; config.json holds the same."""
    out = job.main(run.parse_args(["--method", "gd", "--n-docs", "2", "--max-steps", "1", "--max-new-tokens", "4",
                                   "--no-eval-before", "--precision", "bf16", "--lora-rank", "4",
                                   "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r")]))
    text = capsys.readouterr()
    lines = (text.out + text.err).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("setup: "))
    assert not any("unlearning: step" in line for line in lines[:at])
    assert lines[at].startswith("setup: bf16, autocast bf16, GradScaler off, AdamW lr 0.0003") and \
        "trains LoRA adapters (rank 4)" in lines[at] and "4 forget + 4 retain rows" in lines[at]
    setup = json.load(open(out / "config.json"))["setup"]
    assert 0 < setup["trainable_params"] < setup["params"] and setup["optimizer"] == "AdamW"  # fp32 adapters
    assert json.load(open(out / "config.json"))["resolved"]["lr"]["value"] == 3e-4  # LoRA's tiny lr, and why


# --- no module but methods.py names a method

READERS = ("run.py", "memory.py", "checks.py", "job.py", "sharded.py", "attacks.py")


def test_no_method_name_is_a_string_literal_outside_methods():
    names = set(methods.METHODS)
    for name in READERS:
        found = [(node.lineno, node.value) for node in ast.walk(ast.parse((ROOT / name).read_text()))
                 if isinstance(node, ast.Constant) and node.value in names]
        assert not found, f"{name} names methods at (line, name) {found}: read methods.METHODS instead"


# --- the real-model defaults, each pinned to its source's number
# (value, repository, file, key) transcribed from the authors' code; the declaration must quote them

SOURCES = {
    ("gd", "retain_weight"): (1.0, "OPTML-Group/Unlearn-Simple", "TOFU/dataloader.py", "forget_loss + retain_loss"),
    ("kl", "retain_weight"): (1.0, "OPTML-Group/Unlearn-Simple", "TOFU/dataloader.py", "forget_loss + retain_loss"),
    ("npo", "beta"): (0.1, "licong-lin/negative-preference-optimization", "config/forget.yaml", "beta: 0.1"),
    ("npo", "retain_weight"): (1.0, "licong-lin/negative-preference-optimization", "config/forget.yaml",
                               "grad_diff_coeff: 1.0"),
    ("simnpo", "beta"): (2.5, "OPTML-Group/Unlearn-Simple", "TOFU/run_scripts.py", "beta 2.5"),
    ("simnpo", "gamma"): (0.0, "OPTML-Group/Unlearn-Simple", "TOFU/config/forget.yaml", "gamma: 0.0"),
    ("simnpo", "retain_weight"): (0.1375, "OPTML-Group/Unlearn-Simple", "TOFU/run_scripts.py",
                                  "grad_diff_coeff=0.1375"),
    ("rmu", "rmu_layer"): (7, "centerforaisafety/wmdp", "rmu/unlearn.py", "--layer_id 7"),
    ("rmu", "rmu_coeff"): (6.5, "centerforaisafety/wmdp", "run_rmu_zephyr.ipynb", "--steering_coeffs 6.5,6.5"),
    ("rmu", "retain_weight"): (1200.0, "centerforaisafety/wmdp", "run_rmu_zephyr.ipynb", "--alpha 1200,1200"),
    ("rmu", "lr"): (5e-5, "centerforaisafety/wmdp", "run_rmu_zephyr.ipynb", "--lr 5e-5"),
    ("rmu", "rmu_params"): ("down", "centerforaisafety/wmdp", "rmu/unlearn.py", "--param_ids 6"),
    ("undial", "gamma"): (10.0, "locuslab/open-unlearning", "configs/trainer/UNDIAL.yaml", "beta: 10.0"),
    ("undial", "retain_weight"): (0.0, "locuslab/open-unlearning", "configs/trainer/UNDIAL.yaml", "alpha: 0.0"),
}


def test_every_real_default_is_its_sources_number():
    declared = {(m, f) for m, spec in methods.METHODS.items() for f in spec.defaults if m != "stat"}
    assert declared == set(SOURCES)  # STAT's weight comes from the paper's text (no code): its own line
    for (method, name), (value, repo, path, key) in SOURCES.items():
        d = methods.METHODS[method].defaults[name]
        assert d.real == value, f"{method} {name}: {d.real}, but {repo} {path} has {key}"
        assert all(s in d.source for s in (repo, path, key)), f"{method} {name}: the source must name {repo} {path}"
    assert "2025.semeval-1.264" in methods.METHODS["stat"].defaults["retain_weight"].source
    cfg = run.resolve_auto(run.Config(method="simnpo", model="olmo-7b"))  # what a 7B run resolves
    assert cfg.retain_weight == 0.1375 and cfg.resolved["retain_weight"]["why"].startswith("OPTML-Group")


def test_the_runs_loop_is_lume_train(tmp_path, small_tiny):
    """job.unlearn's flat loop does lume.train's operations in its order: the same loss and gradient
    norm at every step, with checkpoints and scoring between steps (eval mode, then train mode again)."""
    cfg = run.parse_args(["--n-docs", "2", "--max-steps", "3", "--max-new-tokens", "4", "--method", "npo",
                          "--no-eval-before", "--save-every", "1", "--eval-every", "2",
                          "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")])
    log = [json.loads(line) for line in open(job.main(cfg) / "log.jsonl")]
    lume.seed_everything(cfg.seed)  # as job.main does; then the reference loop on the same steps and options
    items, device, spec = job.load_inputs(cfg)[0], torch.device("cpu"), methods.METHODS[cfg.method]
    model, tok = job.load_model(cfg, items, device, torch.float32)
    plan, steps, retain = job.training_steps(cfg, tok, *job.split_items(cfg, items))
    options = job.method_options(cfg, model, tok, items, spec, plan, steps, retain, device, "fp32")
    hist = lume.train(model, steps, functools.partial(spec.loss, **options), lr=cfg.lr, warmup=cfg.warmup,
                      schedule=cfg.schedule, clip=cfg.clip, device=device)
    assert len(log) == 3 and [(r["loss"], r["grad_norm"]) for r in hist] == [(r["loss"], r["grad_norm"]) for r in log]


def test_the_config_is_resolved_once_into_a_new_frozen_one():
    """resolve_auto returns a new Config (the parsed one is left as it was) that nothing can change
    afterwards; config.json's `resolved` says why each auto value is what it is."""
    given = run.Config(method="npo", model="olmo-7b", lora_rank=8)
    cfg = run.resolve_auto(given)
    assert given.lr is None and given.lora_alpha == 0.0 and given.resolved == {}
    assert (cfg.lr, cfg.lora_alpha, cfg.beta, cfg.retain_weight) == (1e-4, 16.0, 0.1, 1.0)
    assert cfg.resolved["lr"]["why"].startswith("locuslab/open-unlearning") and "lora_alpha" in cfg.resolved
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


def defaults_table() -> str:
    """docs/methods.md's table of every declared default, from methods.METHODS and SHARED_DEFAULTS."""
    rows = ["| method | flag | tiny | other models | source of the other models' value |", "|---|---|---|---|---|"]
    for name, spec in methods.METHODS.items():
        for field, d in spec.defaults.items():
            rows.append(f"| {name} | `--{field.replace('_', '-')}` | {d.tiny:g} | {d.real:g} | {d.source} |"
                        if not isinstance(d.real, str) else
                        f"| {name} | `--{field.replace('_', '-')}` | {d.tiny} | {d.real} | {d.source} |")
    for field, d in methods.SHARED_DEFAULTS.items():
        if field in ("lr", "lora_lr", "epochs"):
            flag = "`--lr` with `--lora-rank`" if field == "lora_lr" else f"`--{field}`"
            rows.append(f"| every other | {flag} | {d.tiny:g} | {d.real:g} | {d.source} |")
    return "\n".join(rows)


def test_the_docs_table_of_defaults_is_the_declarations():
    assert defaults_table() in (ROOT / "docs" / "methods.md").read_text(), \
        "docs/methods.md's defaults table differs from methods.METHODS: paste tests/test_declared.defaults_table()"
