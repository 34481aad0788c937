"""End to end: run.py on a very small built-in dataset writes every file with the documented keys."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

import data
import lume
import metrics
import job
import run
import tiny
from conftest import ROOT


def args(tmp_path, out, *extra):
    return run.parse_args(["--n-docs", "2", "--max-steps", "3", "--max-new-tokens", "16",
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / out), *extra])


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_end_to_end_writes_every_file(tmp_path, small_tiny):
    out = job.main(args(tmp_path, "run", "--task", "1", "--method", "npo", "--save"))
    cfg = json.load(open(out / "config.json"))
    assert cfg["method"] == "npo" and cfg["seed"] == 0 and cfg["retain_weight"] == 3.0 and "argv" in cfg
    log = read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in log] == [0, 1, 2]
    assert {"loss", "npo", "retain_nll", "grad_norm", "lr", "tokens_per_s"} <= set(log[0])
    gens = read_jsonl(out / "generations.jsonl")
    assert {"id", "task", "input", "expected_output", "model_output", "stage", "split", "kind", "score"} == set(gens[0])
    assert len(gens) == 2 * 40 and {g["stage"] for g in gens} == {"before", "after"}
    assert {g["task"] for g in gens} == {"Task1", "Task2", "Task3"}  # every task scored, not only task 1
    mia = read_jsonl(out / "mia.jsonl")
    assert {"stage", "set", "id", "loss", "zlib", "min_k_20", "min_k_40", "min_k_pp_20", "min_k_pp_40"} == set(mia[0])
    assert len(mia) == 2 * 4
    res = json.load(open(out / "results.json"))
    for stage in ("before", "after"):
        r = res[stage]
        assert {"forget-set", "retain-set", "mia_loss_acc", "aggregated-terms", "harmonic-mean-task-aggregate",
                "aggregate-score"} <= set(r)
        assert set(r["forget-set"]) == {"overall-regurgitation-score", "overall-knowledge-score", "Task1", "Task2", "Task3"}
        assert len(r["aggregated-terms"]) == 12 and r["aggregate-score"] == -1  # no MMLU given
    assert (out / "model" / "model.safetensors").exists()
    # a run directory is never overwritten: refused before any work (run.py), and again when it is made
    with pytest.raises(SystemExit) as e:
        args(tmp_path, "run", "--method", "ga")
    assert e.value.code == 2
    cfg = args(tmp_path, "other", "--method", "ga")
    cfg = dataclasses.replace(cfg, out=str(out))  # a frozen Config: a new one
    with pytest.raises(SystemExit, match="not empty"):
        job.main(cfg)


def test_same_seed_same_results(tmp_path, small_tiny):
    a = job.main(args(tmp_path, "a", "--method", "gd", "--no-eval-before"))
    b = job.main(args(tmp_path, "b", "--method", "gd", "--no-eval-before"))
    assert json.load(open(a / "results.json")) == json.load(open(b / "results.json"))
    assert [r["loss"] for r in read_jsonl(a / "log.jsonl")] == [r["loss"] for r in read_jsonl(b / "log.jsonl")]


def test_nan_run_saves_no_model(tmp_path, small_tiny, monkeypatch):
    import methods
    monkeypatch.setitem(methods.METHODS, "ga", dataclasses.replace(methods.METHODS["ga"], loss=lambda m, f, r, t: (
        methods.ga(m, f, r, t)[0] * float("inf"), {})))
    with pytest.raises(SystemExit) as e:  # lume.TrainingDiverged, reported as a failed run
        job.main(args(tmp_path, "nan", "--method", "ga", "--save", "--no-eval-before"))
    assert e.value.code == 1
    assert not (tmp_path / "nan" / "model").exists()
    assert not (tmp_path / "nan" / "results.json").exists()
    status = json.load(open(tmp_path / "nan" / "status.json"))
    assert status["status"] == "failed" and "TrainingDiverged: step 0: loss is" in status["reason"], status


def test_method_none_scores_once_and_cli_rejects_bad_values(tmp_path, small_tiny, capsys):
    out = job.main(run.parse_args(["--n-docs", "2", "--max-new-tokens", "16", "--cache-dir", str(tmp_path / "cache"),
                                   "--out", str(tmp_path / "none"), "--method", "none"]))
    assert list(json.load(open(out / "results.json"))) == ["before"]
    assert not (out / "log.jsonl").exists()
    # in process (run.py's __main__ is run.main(): the same parse_args; the embedded-default test
    # below runs the script itself): exit 2 and the argparse line on stderr
    for argv, says in ((["--method", "sgd"], "invalid choice: 'sgd'"), (["--batch-size", "0"], "--batch-size must be >= 1")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run.parse_args(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_real_lume_release_end_to_end(tmp_path, small_tiny, shared):
    # the tiny target built on (the first 2 documents per task and split of) the real release
    out = job.main(args(tmp_path, "real", "--data", str(shared / "lume-data" / "lume"), "--method", "gd",
                        "--mia-data", str(shared / "lume-data" / "semeval25" / "mia_data"), "--mmlu", "none"))
    sources = json.load(open(out / "config.json"))["data_sources"]
    assert sources["data"]["matches"] == ["lume"] and sources["mmlu"] is None  # the pinned release, by hash
    gens = read_jsonl(out / "generations.jsonl")
    assert len(gens) == 2 * 2 * (2 * 2 + 2 * 6 + 2 * 2)  # stages x splits x (Task1 + Task2 + Task3 items)
    assert any(g["id"].startswith('"') for g in gens)  # Task1 ids keep their literal quotes
    mia = read_jsonl(out / "mia.jsonl")
    assert len(mia) == 2 * 300  # the official 150 + 150 documents
    res = json.load(open(out / "results.json"))
    for stage in ("before", "after"):  # the AUC is the official one of the rows written beside it
        rows = [r for r in mia if r["stage"] == stage]
        auc = metrics.mia_auc([r["loss"] for r in rows if r["set"] == "member"],
                              [r["loss"] for r in rows if r["set"] == "nonmember"])
        assert res[stage]["mia_loss_acc"] == auc
    # the before-stage losses are the official scorer's model(ids, labels=ids).loss of the target
    items = job.load_inputs(run.parse_args(["--n-docs", "2", "--data", str(shared / "lume-data" / "lume"),
                                            "--mia-data", "none", "--mmlu", "none"]))[0]
    model, tok = lume.load_pretrained(str(tiny.tiny_target(items, tmp_path / "cache", log=lambda s: None)))
    docs = {d.id: d.document for name in ("member", "nonmember")
            for d in data.load_mia(shared / "lume-data" / "semeval25" / "mia_data")[name]}
    for r in [r for r in mia if r["stage"] == "before"][::50]:  # 6 documents, members and nonmembers
        assert r["loss"] == pytest.approx(metrics.official_doc_loss(model, tok, docs[r["id"]]), abs=1e-5)


def test_embedded_default_memorises_then_npo_forgets_task1(tmp_path):
    """The README's first command as a user runs it (`python run.py --task 1 --method npo`): the
    committed tiny target (target/, never built here) memorised every task and split, and NPO with
    the defaults halves task 1 forget while retain keeps most of its value. The suite's slowest
    test (~30 s on 2 cores): the claim the README makes."""
    out = tmp_path / "default"
    r = subprocess.run([sys.executable, "run.py", "--task", "1", "--method", "npo", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "LUME_CACHE": str(tmp_path / "empty-cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"tiny target: {ROOT / 'target'} (committed, checksums verified)" in r.stdout
    assert not (tmp_path / "empty-cache").exists()  # nothing built, nothing cached
    assert "forget Task1 reg" in r.stdout  # the before/after table is printed
    res = json.load(open(out / "results.json"))
    before, after = res["before"], res["after"]
    keys = ("regurgitation-score", "knowledge-score")
    # the committed target (target/) memorised, as the released 7B target did: measured here every
    # score 1.0 but forget Task2 regurgitation 0.992 and retain Task2 knowledge 0.975 (one PII answer)
    scores = {(split, task, key): before[split][task][key] for split in ("forget-set", "retain-set")
              for task in ("Task1", "Task2", "Task3") for key in keys}
    assert min(scores.values()) >= 0.97 and sum(v == 1.0 for v in scores.values()) >= 10, scores
    assert before["mia_loss_acc"] >= 0.8
    for key in keys:  # task 1 forgotten ...
        assert after["forget-set"]["Task1"][key] <= 0.5 * before["forget-set"]["Task1"][key], key
    # ... while retain is far less affected: every score keeps >= 60% of its value and >= 90% on
    # average. A knowledge score counts 8 questions (one question = 12.5%); measured on an AVX2 CPU
    # with the micro-batch NPO reference (issue 11): forget Task1 0.169 / 0.375, retain 94% on
    # average, lowest retain Task1 knowledge 0.625 (5 of 8); earlier, data seeds 0-2 kept >= 90% each
    kept = {(task, key): after["retain-set"][task][key] / before["retain-set"][task][key]
            for task in ("Task1", "Task2", "Task3") for key in keys}
    assert min(kept.values()) >= 0.6 and sum(kept.values()) / len(kept) >= 0.9, kept


def test_auto_data_sources_follow_the_model(monkeypatch, tmp_path):
    """--data/--mia-data/--mmlu auto: built-in data and its own MIA sets for the tiny target; for any
    other model the real benchmark, fetched (fetch.resolve): the items required, MIA and MMLU not."""
    calls = []
    monkeypatch.setattr(job.fetch, "resolve", lambda name, cache, required=True, log=print: (
        calls.append((name, required)), (None, {"source": name}))[1])
    cfg = run.parse_args(["--cache-dir", str(tmp_path)])
    assert [job.data_source(cfg, cfg.data, ("lume", "semeval"), cfg.model != "tiny"),
            job.data_source(cfg, cfg.mia_data, ("mia",), False)] == [("builtin", None), ("", None)]
    assert calls == []  # the embedded default never touches the network
    monkeypatch.setattr(run.checks, "hub_problems", lambda name, repos: [])  # no hub here
    cfg = run.parse_args(["--model", "olmo-7b", "--cache-dir", str(tmp_path)])
    job.data_source(cfg, cfg.data, ("lume", "semeval"), True)
    job.data_source(cfg, cfg.mia_data, ("mia",), True)
    job.data_source(cfg, cfg.mmlu, ("mmlu",), True)
    job.data_source(cfg, "semeval", ("lume", "semeval"), True)  # a named source is required
    assert calls == [("lume", True), ("mia", False), ("mmlu", False), ("semeval", True)]
    assert job.data_source(cfg, "none", ("mmlu",), True) == ("", None)
