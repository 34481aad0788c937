"""Long runs: a run killed with SIGKILL and resumed ends with the uninterrupted run's results; the
trajectory rows equal a separate evaluation of the same weights; --keep best keeps the step it
names; --save --method none exports the target; progress lines; the end-of-run words."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import job
import lume
import metrics
import report
import run
import trajectory
from conftest import ROOT

# the small target on its own built-in data (2 documents per task and split: 40 items, 4 MIA docs)
BASE = ["--data", "builtin", "--n-docs", "2", "--max-new-tokens", "16"]


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def cli(target, out, *extra):
    return [sys.executable, "run.py", "--model", str(target), *BASE, "--out", str(out), *extra]


def start(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels in every process: bit-identical
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def kill_when(proc, ready, what: str):
    """SIGKILL proc as soon as ready() holds (polled every 10 ms); it must still be running then."""
    deadline = time.time() + 300
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"no {what} after 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def latest_step(out):
    pointer = out / "checkpoints" / "latest.json"
    return json.loads(pointer.read_text())["step"] if pointer.is_file() else 0


# kl: a reference model that must stay the target across two kills. npo (its cached reference
# log-probs through a checkpoint) is slow-only: test_faults' SIGTERM resume (npo, results equal) and
# test_scale's two-rank npo SIGKILL resume guard that state in every suite run.
@pytest.mark.parametrize("method", [pytest.param("npo", marks=pytest.mark.slow), "kl"])
def test_sigkill_then_resume_gives_the_uninterrupted_results(tmp_path, small_target_dir, method, capsys):
    """Killed twice (after the first checkpoint, then after a later one) and resumed each time, the
    run ends with the uninterrupted run's results.json, trajectory and log, bit for bit (CPU)."""
    extra = ["--method", method, "--max-steps", "8", "--save-every", "2", "--eval-every", "3",
             "--keep", "best"]  # trajectory rows at 0, 3, 6, 8: checkpoints fall between them
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finish(start(cli(small_target_dir, whole, *extra)))

    kill_when(start(cli(small_target_dir, killed, *extra)), lambda: latest_step(killed) >= 2, "a checkpoint")
    assert "after" not in json.loads((killed / "results.json").read_text())  # killed mid-run
    kill_when(start([sys.executable, "run.py", "--resume", str(killed)]), lambda: latest_step(killed) >= 6,
              "a later checkpoint")
    finish(start([sys.executable, "run.py", "--resume", str(killed)]))

    assert json.loads((killed / "results.json").read_text()) == json.loads((whole / "results.json").read_text())
    assert read_jsonl(killed / "trajectory.jsonl") == read_jsonl(whole / "trajectory.jsonl")
    drop_speed = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert drop_speed(read_jsonl(killed / "log.jsonl")) == drop_speed(read_jsonl(whole / "log.jsonl"))
    assert read_jsonl(killed / "generations.jsonl") == read_jsonl(whole / "generations.jsonl")
    assert not (killed / "checkpoints").exists()  # a finished run drops its training checkpoints
    with pytest.raises(SystemExit) as e:  # refused while parsing: in process, no second interpreter
        run.main(["--resume", str(killed)])
    assert e.value.code == 2 and "the run is complete" in capsys.readouterr().err


def test_resume_without_a_checkpoint_starts_over_cleanly(tmp_path, small_target_dir):
    """Killed before its first checkpoint, a resumed run trains from step 0 and its log has each step once."""
    out = tmp_path / "run"
    kill_when(start(cli(small_target_dir, out, "--method", "ga", "--max-steps", "3", "--save-every", "50")),
              lambda: (out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 1,
              "a step")
    finish(start([sys.executable, "run.py", "--resume", str(out)]))
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [0, 1, 2]


def test_trajectory_rows_equal_a_separate_evaluation(tmp_path, small_target_dir):
    cfg = run.parse_args(["--model", str(small_target_dir), *BASE, "--method", "ga", "--max-steps", "2",
                          "--eval-every", "2", "--save", "--out", str(tmp_path / "run")])
    out = job.main(cfg)
    rows = read_jsonl(out / "trajectory.jsonl")
    assert [r["step"] for r in rows] == [0, 2]
    items, mia, mmlu, _ = job.load_inputs(cfg)
    subset = (trajectory.eval_subset(items, cfg.seed), mia, mmlu)
    for step, model_dir in ((0, small_target_dir), (2, out / "model")):  # the target, then the saved step 2
        model, tok = lume.load_pretrained(str(model_dir))
        results = job.score(cfg, model, tok, subset, "check", "fp32", mmlu_limit=trajectory.SUBSET_MMLU)[2]
        assert trajectory.row(step, results) == rows[step // 2]
    assert rows[1] != rows[0]  # GA moved the scores: the rows do not all come from one model


def test_keep_best_keeps_the_step_it_names(tmp_path, small_target_dir):
    """With 2 documents the evaluation subset is the whole selection subset (issue 36: the steps see
    only it), so the after scores of the selection items must equal the kept row."""
    out = job.main(run.parse_args(["--model", str(small_target_dir), *BASE, "--method", "ga", "--lr", "3e-3",
                                   "--max-steps", "8", "--eval-every", "2", "--keep", "best", "--save",
                                   "--out", str(tmp_path / "run")]))
    res, rows = json.loads((out / "results.json").read_text()), read_jsonl(out / "trajectory.jsonl")
    best, why = trajectory.select_best(rows, [1])
    assert (res["kept"]["step"], res["kept"]["why"]) == (best["step"], why)
    assert best["step"] != rows[-1]["step"], "GA at lr 3e-3 should over-unlearn: the test needs an earlier best"
    chosen = set(res["kept"]["selection_ids"])
    mine = metrics.aggregate([r for r in read_jsonl(out / "generations.jsonl") if r["stage"] == "after"
                              and r["id"] in chosen], res["after"]["mia_loss_acc"])
    assert all(best[k] == mine[k] for k in ("forget-set", "retain-set")) and best["mia_loss_acc"] == mine["mia_loss_acc"]
    saved, tok = lume.load_pretrained(str(out / "model"))
    cfg = run.parse_args(["--model", str(small_target_dir), *BASE])
    after = job.score(cfg, saved, tok, (job.load_inputs(cfg)[0], None, None), "saved", "fp32")[2]
    assert after["forget-set"] == res["after"]["forget-set"]  # --save wrote the kept step's weights


def result_with(forget: float, retain: float, mmlu=None) -> dict:
    tasks = {f"Task{t}": {"regurgitation-score": forget, "knowledge-score": forget} for t in (1, 2, 3)}
    keep = {f"Task{t}": {"regurgitation-score": retain, "knowledge-score": retain} for t in (1, 2, 3)}
    res = {"forget-set": tasks, "retain-set": keep, "mia_loss_acc": 0.5}
    if mmlu is not None:
        res.update(mmlu_average=mmlu, **{"aggregate-score": (1 - forget + retain + mmlu) / 3})
    return res


def test_select_best_by_the_gate_and_by_retain_kept():
    rows = [trajectory.row(s, result_with(f, r, m)) for s, f, r, m in
            [(0, 1.0, 1.0, 0.5), (2, 0.5, 0.95, 0.45), (4, 0.1, 0.9, 0.36), (6, 0.0, 0.2, 0.25)]]
    best, why = trajectory.select_best(rows, [1])
    assert best["step"] == 2 and "MMLU >= 0.371" in why  # steps 4, 6 fail the gate despite lower forget
    no_mmlu = [{k: v for k, v in r.items() if k not in ("mmlu_average", "aggregate-score")} for r in rows]
    best, why = trajectory.select_best(no_mmlu, [1])
    assert best["step"] == 4 and "90%" in why  # step 6 keeps 20% of retain: excluded
    failing = [rows[0]] + [trajectory.row(2, result_with(0.0, 0.1, 0.2))]  # issue 21: never the target
    best, why = trajectory.select_best(failing, [1])  # when a later step forgets; the gate is named
    assert best["step"] == 2 and "no step that forgets kept MMLU >= 0.371 (closest: step 2" in why


def test_save_with_method_none_exports_the_target(tmp_path, small_target_dir):
    out = job.main(run.parse_args(["--model", str(small_target_dir), *BASE, "--method", "none", "--save",
                                   "--out", str(tmp_path / "run")]))
    target, _ = lume.load_pretrained(str(small_target_dir))
    saved, _ = lume.load_pretrained(str(out / "model"))
    for (name, a), (_, b) in zip(target.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_round_trip_and_a_half_written_save_is_never_read(tmp_path):
    w = {"a": torch.randn(3, 2), "b": torch.arange(4.0)}
    checkpoint.save(tmp_path, 3, w, {"state": {}}, {"ref_logps": torch.ones(2)})
    (tmp_path / "checkpoints" / ".step-000006.123-abcd.tmp").mkdir()  # a save killed before its rename
    got = checkpoint.load(tmp_path)
    assert got["step"] == 3 and all(torch.equal(got["weights"][k], w[k]) for k in w)
    for step in (6, 9):
        checkpoint.save(tmp_path, step, {k: v + step for k, v in w.items()}, {"state": {}}, {})
    assert checkpoint.load(tmp_path)["step"] == 9
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step-000006", "step-000009"]


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_updates_one_line_on_a_terminal_and_prints_plain_lines_otherwise(monkeypatch):
    clock = iter(range(0, 1000, 4))  # every call to time.time() advances 4 s
    monkeypatch.setattr("progress.time.time", lambda: next(clock))
    import progress
    tty = Tty()
    bar = progress.Progress("unlearning", 10, stream=tty)
    for i in range(1, 11):
        bar.update(i, loss=0.5, tokens_per_s=1234.0)
    bar.close()
    assert tty.getvalue().count("\r") == 10 and tty.getvalue().count("\n") == 1
    assert "unlearning 10/10" in tty.getvalue() and "1234 tok/s" in tty.getvalue()
    plain = io.StringIO()
    bar = progress.Progress("unlearning", 10, stream=plain, every=10.0)
    for i in range(1, 11):
        bar.update(i, loss=0.5)
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue() and 2 <= len(lines) <= 5 and lines[-1].startswith("unlearning 10/10")
    assert "left" in lines[0]


def test_the_report_says_why_the_aggregates_are_what_they_are():
    before, after = result_with(1.0, 1.0), result_with(0.2, 0.9)
    after["forget-set"]["Task2"] = {"regurgitation-score": 1.0, "knowledge-score": 1.0}
    after["aggregate-score"] = -1
    text = report.explain({"before": before, "after": after}, [1])
    assert "Forget Task1: regurgitation 1.000 -> 0.200" in text
    assert "Retain kept 90%" in text
    assert "aggregate-score is -1" in text and "missing here: MMLU (--mmlu)." in text  # MIA data was given
    assert "harmonic-mean-task-aggregate is 0" in text and "forget Task2 regurgitation (1.000, 1 - score)" in text
    assert "regurgitation" in report.table({"before": before, "after": after})
