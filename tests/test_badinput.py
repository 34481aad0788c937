"""Bad input never costs a run: each case below is one `error:` line naming the flag, file, line or
field, exit status 2, no traceback, and no run directory left behind. Later failures (Ctrl-C, a
diverged loss) keep what the run completed and mark the directory failed in status.json."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import run
from conftest import ROOT, default_sigint

def lume_copy(tmp_path, edit=None):
    """A LUME-format directory of the small built-in items, its lines edited by edit({split: lines})."""
    import data
    items, _ = data.builtin(n_docs=2, seed=0)
    d = tmp_path / "data"
    d.mkdir()
    rows = {s: [json.dumps({"id": it.id, "input": it.input, "output": it.output, "task": f"Task{it.task}",
                            "split": it.split}) for it in items if it.split == s] for s in ("forget", "retain")}
    if edit:
        edit(rows)
    for s, lines in rows.items():
        (d / f"{s}.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
    return d


def data_args(d):
    return ["--data", d, "--mia-data", "none", "--mmlu", "none"]  # nothing fetched: only the items are read


def bad_bytes(d):
    (d / "forget.jsonl").write_bytes((d / "forget.jsonl").read_bytes() + b'{"id": "x\xff"}\n')


def member_only(tmp_path):
    d = tmp_path / "mia"
    d.mkdir()
    (d / "member.jsonl").write_text('{"id": 1, "document": "a"}\n')
    return d


def mmlu_dir(tmp_path, row="q,a,b,c,d,A", test=True):
    d = tmp_path / "mmlu"
    for split in ("dev",) + (("test",) if test else ()):
        (d / split).mkdir(parents=True)
        (d / split / f"anatomy_{split}.csv").write_text(row + "\n")
    return d


def model_dir(tmp_path, weights=False):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    if weights:
        (d / "model.safetensors").write_bytes(b"")
    return d


def drop_field(rows):
    rec = json.loads(rows["forget"][0])
    del rec["output"]
    rows["forget"][0] = json.dumps(rec)


def duplicate(rows):
    rows["retain"].append(rows["retain"][0])


def model_dir_with(tmp_path, config="{}", weights=None):
    from safetensors.torch import save
    d = model_dir(tmp_path, weights=True)
    (d / "config.json").write_text(config)
    (d / "model.safetensors").write_bytes(save({"w": torch.zeros(2)}) if weights is None else weights)
    return d


def truncated_safetensors(tmp_path):
    from safetensors.torch import save
    whole = save({"w": torch.zeros(64, 64)})
    return model_dir_with(tmp_path, weights=whole[: len(whole) // 2])


def a_file(tmp_path, name="file"):
    (tmp_path / name).write_text("x")
    return tmp_path / name


def read_only_dir(tmp_path):
    """A read-only directory: a read-only tmpfs as root (root writes through permissions), else chmod 555."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)]).returncode != 0:
            pytest.skip("root but cannot mount a read-only tmpfs here")
        READ_ONLY.append(d)
    else:
        d.chmod(0o555)
    return d / "out"


READ_ONLY = []  # mounts to undo


@pytest.fixture(autouse=True)
def unmount():
    yield
    while READ_ONLY:
        subprocess.run(["umount", str(READ_ONLY.pop())])


def surrogate(rows):
    rec = json.loads(rows["forget"][0])
    rows["forget"][0] = json.dumps({**rec, "input": rec["input"] + "\ud800"})  # JSON's escape: a lone surrogate


def garbage_parquet(tmp_path):
    d = tmp_path / "semeval"
    d.mkdir()
    for split in ("forget", "retain"):
        for part in ("train", "validation"):
            (d / f"{split}_{part}-00000-of-00001.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    return d


# (name, argv builder (tmp_path -> list), what the one error line must say)
CASES = [
    ("negative lr", lambda t: ["--lr", "-1"], "--lr must be > 0"),
    ("zero lr", lambda t: ["--lr", "0"], "--lr must be > 0"),
    ("nan lr", lambda t: ["--lr", "nan"], "--lr must be > 0"),
    ("zero epochs", lambda t: ["--epochs", "0"], "--epochs must be > 0"),
    ("negative max steps", lambda t: ["--max-steps", "-5"], "--max-steps must be >= 1"),
    ("zero batch", lambda t: ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("zero grad accum", lambda t: ["--grad-accum", "0"], "--grad-accum must be >= 1"),
    ("zero eval batch", lambda t: ["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    ("zero new tokens", lambda t: ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ("zero beta", lambda t: ["--beta", "0"], "--beta must be > 0"),
    ("negative retain weight", lambda t: ["--retain-weight", "-1"], "--retain-weight must be >= 0"),
    ("zero docs", lambda t: ["--n-docs", "0"], "--n-docs must be >= 1"),
    ("negative warmup", lambda t: ["--warmup", "-1"], "--warmup must be >= 0"),
    ("negative clip", lambda t: ["--clip", "-0.5"], "--clip must be >= 0"),
    ("negative mmlu limit", lambda t: ["--mmlu-limit", "-1"], "--mmlu-limit must be >= 0"),
    ("negative eval every", lambda t: ["--eval-every", "-2"], "--eval-every must be >= 0"),
    ("warmup past the end", lambda t: ["--max-steps", "3", "--warmup", "3"], "never peak"),
    ("keep best alone", lambda t: ["--keep", "best"], "give --eval-every N too"),
    ("retain weight with ga", lambda t: ["--method", "ga", "--retain-weight", "1"], "ga has no retain term"),
    ("beta with gd", lambda t: ["--method", "gd", "--beta", "0.2"], "does not use it"),
    ("lr with method none", lambda t: ["--method", "none", "--lr", "1e-4"], "no effect with --method none"),
    ("method none scoring nothing", lambda t: ["--method", "none", "--no-eval-before"], "would score nothing"),
    ("epochs and max steps", lambda t: ["--epochs", "2", "--max-steps", "3"], "both given"),
    ("missing data dir", lambda t: ["--data", "/nonexistent"], "--data /nonexistent: no such file"),
    ("missing mmlu dir", lambda t: ["--mmlu", "/nonexistent"], "--mmlu /nonexistent: no such directory"),
    ("member without nonmember", lambda t: ["--mia-data", member_only(t)], "nonmember.jsonl missing"),
    ("mmlu without test", lambda t: ["--mmlu", mmlu_dir(t, test=False)], "no test/ directory"),
    ("missing model dir", lambda t: ["--model", "./no-such-dir"], "--model ./no-such-dir: no such directory"),
    ("model without weights", lambda t: ["--model", model_dir(t)], "no weights"),
    ("malformed hub id", lambda t: ["--model", "a/b/c"], "not tiny, olmo-1b, olmo-7b"),
    ("cuda without cuda", lambda t: ["--device", "cuda"], "CUDA is not available"),
    ("unknown device", lambda t: ["--device", "tpu"], "--device tpu: not a device"),
    ("out not empty", lambda t: ["--out", ROOT / "tests"], "exists and is not empty"),
    ("resume a non-run", lambda t: ["--resume", t], "no config.json there"),
    ("resume with a flag", lambda t: ["--resume", t, "--lr", "1e-3"], "give no other flag"),
    # the data itself: read and validated before any model work
    ("broken json line", lambda t: data_args(lume_copy(t, lambda r: r["forget"].insert(1, "{oops"))),
     r"forget.jsonl line 2: not valid JSON"),
    ("item without output", lambda t: data_args(lume_copy(t, drop_field)), "line 1: field 'output': missing"),
    ("duplicate ids", lambda t: data_args(lume_copy(t, duplicate)), "field 'id'"),
    ("empty split", lambda t: data_args(lume_copy(t, lambda r: r["forget"].clear())), "no items"),
    ("non-utf-8 file", lambda t: data_args((lambda d: (bad_bytes(d), d)[1])(lume_copy(t))), "not UTF-8 text"),
    ("bad mmlu row", lambda t: ["--mmlu", mmlu_dir(t, row="q,a,b,c,d,E")], "field 'answer': 'E' is not one of"),
    # values that slipped through before (issue 22)
    ("huge seed", lambda t: ["--seed", "99999999999999999999999"], "--seed must be >= 0 and < 2^63"),
    ("infinite epochs", lambda t: ["--epochs", "inf"], "--epochs must be finite"),
    ("epochs past the plan", lambda t: ["--epochs", "1e9"], "optimizer steps, more than 200,000"),
    ("huge max steps", lambda t: ["--max-steps", "100000000"], "--max-steps must be >= 1 and <= 200,000"),
    ("nan lora alpha", lambda t: ["--lora-rank", "4", "--lora-alpha", "nan"], "--lora-alpha must be >= 0 and finite"),
    ("model config a list", lambda t: ["--model", model_dir_with(t, config="[]")], "config.json is a JSON list"),
    ("truncated model weights", lambda t: ["--model", truncated_safetensors(t)], "its header needs"),
    ("read-only out", lambda t: ["--out", read_only_dir(t)], "cannot be written (a read-only filesystem"),
    ("cache dir a file", lambda t: ["--cache-dir", a_file(t)], "is a file, not a directory"),
    ("out a file", lambda t: ["--out", a_file(t, "out.txt")], "exists and is a file, not a directory"),
    ("lone surrogate", lambda t: data_args(lume_copy(t, surrogate)), "field 'input': not valid Unicode"),
    ("garbage parquet", lambda t: data_args(garbage_parquet(t)), "not a readable parquet file"),
    ("too many built-in documents", lambda t: ["--n-docs", "1000"], "at most 120 documents"),
]


@pytest.mark.parametrize("name,argv,says", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, name, argv, says):
    if name == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)  # a stray runs/ folder would appear here
    out = tmp_path / "out"
    extra = [] if name in ("out not empty", "read-only out", "out a file") or name.startswith("resume") else ["--out", out]
    with pytest.raises(SystemExit) as e:
        status = run.main([*map(str, argv(tmp_path)), *map(str, extra)])
        raise SystemExit(status)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2, (e.value.code, err)
    assert len([ln for ln in lines if "error:" in ln]) == 1 and says in err, err
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_unreachable_hub_is_one_line_within_seconds(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused at once
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        run.main(["--model", "someone/some-model", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and time.time() - t0 < 10
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "hub is unreachable" in err and "127.0.0.1:9" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        run.main(["--model", "someone/some-model", "--out", str(tmp_path / "out")])
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_bad_values_exit_2_without_traceback(capsys):
    """argparse's own errors and ours alike; the last through the real command line in a subprocess
    (`python run.py`: its exit status and stderr as a shell sees them)."""
    for argv, says in ((["--method", "sgd"], "invalid choice: 'sgd'"), (["--lr", "-1"], "--lr must be > 0")):
        with pytest.raises(SystemExit) as e:
            run.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and "Traceback" not in err, err
    r = subprocess.run([sys.executable, "run.py", "--data", "/nonexistent"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_ctrl_c_during_training_keeps_the_scores_and_marks_the_run_failed(tmp_path, small_target_dir):
    out = tmp_path / "run"
    argv = [sys.executable, "run.py", "--model", str(small_target_dir), "--data", "builtin", "--n-docs", "2",
            "--max-new-tokens", "16", "--method", "ga", "--max-steps", "400", "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=default_sigint)
    deadline = time.time() + 300
    while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: run failed: interrupted (Ctrl-C)") and "Next:" in last and "Traceback" not in err
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and "results.json" in status["completed"]
    assert list(json.loads((out / "results.json").read_text())) == ["before"]  # the completed stage, intact
    assert (out / "config.json").is_file() and not (out / "model").exists()


def test_a_complete_run_says_so(tmp_path, small_target_dir):
    out = tmp_path / "run"
    assert run.main(["--model", str(small_target_dir), "--data", "builtin", "--n-docs", "2", "--max-new-tokens",
                     "8", "--method", "ga", "--max-steps", "1", "--no-eval-before", "--out", str(out)]) == 0
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    shutil.rmtree(out)


def test_method_none_without_scoring_exports_the_target(tmp_path, small_target_dir):
    out = tmp_path / "run"
    assert run.main(["--model", str(small_target_dir), "--data", "builtin", "--n-docs", "2", "--method", "none",
                     "--no-eval-before", "--save", "--out", str(out)]) == 0
    assert (out / "model" / "model.safetensors").is_file()
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
