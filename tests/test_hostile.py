"""Hostile run directories: a mutation harness over every file of a resumable run (one process's
checkpoint layout and the sharded DCP layout), and the breaks of issue 33 each as its own test.

A run directory someone sends you, or one a power loss or a careless hand damaged, must end a
--resume in one `error:` line naming the file (exit 2, nothing written) or resume correctly: never
a traceback, a hang, an unpickled object, or a write outside the run (a canary directory beside it
is hashed before and after every case).
"""
import hashlib
import json
import os
import pathlib
import pickle
import shutil
import signal
import stat

import pytest
import torch

import checkpoint
import job
import lume
import run
from conftest import SMALL_CONFIG  # noqa: F401  (the small target's shape: weights of a few hundred KB)

# one worker under pytest -n (--dist loadgroup): the tests share the run directories of one module fixture
pytestmark = pytest.mark.xdist_group("test_hostile")

BASE = ["--data", "builtin", "--n-docs", "2", "--max-new-tokens", "8", "--method", "npo", "--max-steps", "2",
        "--save-every", "1", "--task", "1"]


# -----------------------------------------------------------------------------
# the runs: each made once per module, copied per case


def stopped_run(target, out, *extra):
    """A run stopped after step 1 of 2 as SIGTERM stops one (its checkpoint written, exit 143)."""
    checkpoint.TERM["asked"] = True  # as if SIGTERM came during step 1: after_step saves, then stops
    try:
        with pytest.raises(SystemExit) as e:
            job.main(run.parse_args(["--model", str(target), *BASE, *extra, "--out", str(out)]))
        assert e.value.code == 143
    finally:
        checkpoint.TERM.update(defer=False, asked=False)
    return out


def as_sharded(single, out, target):
    """A copy of `single` whose checkpoint is in the sharded (DCP) layout: the same state saved by
    sharded.save in a one-rank gloo group (what a torchrun job writes, rank by rank)."""
    import torch.distributed as tdist

    import dist
    import sharded
    shutil.copytree(single, out)
    shutil.rmtree(out / "checkpoints")
    got = checkpoint.load(single)
    model, _ = lume.load_pretrained(str(target))
    checkpoint.load_trainable(model, got["weights"])
    opt = lume.make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-4)
    opt.load_state_dict(got["optimizer"])
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        state = got["state"]
        sharded.save(out, got["step"], model, opt, {"scaler": state["scaler"], "ref_logps": state["ref_logps"],
                                                     "track": state["track"]}, {"best": None, "rmu": None},
                     got["fingerprint"], dist.Dist(0, 1, torch.device("cpu")))
    finally:
        tdist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def runs(small_target_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    single = stopped_run(small_target_dir, tmp / "single")
    return {"single": single, "dcp": as_sharded(single, tmp / "dcp", small_target_dir), "target": small_target_dir}


def tree_hash(root, skip=()) -> str:
    """Every name, kind, size and content under root (links by their target, not followed)."""
    h = hashlib.sha256()
    for p in sorted(q for q in pathlib.Path(root).rglob("*") if q.name not in skip):
        st = p.lstat()
        h.update(f"{p.relative_to(root)} {stat.S_IFMT(st.st_mode)} {st.st_size}\n".encode())
        if stat.S_ISREG(st.st_mode):
            h.update(p.read_bytes())
        elif stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(p).encode())
    return h.hexdigest()


@pytest.fixture
def place(tmp_path):
    """(copy of a run, canary directory beside it holding a copy of it too, the canary's hash)."""
    def make(src):
        d, canary = tmp_path / "run", tmp_path / "canary"
        shutil.copytree(src, d, symlinks=True)
        shutil.copytree(src, canary / "victim", symlinks=True)
        return d, canary, tree_hash(canary)
    return make


class Poison:  # unpickled, it would make a directory in the canary
    def __init__(self, where):
        self.where = where

    def __reduce__(self):
        return (os.mkdir, (self.where,))


def poisoned_pickle(canary, size=0) -> bytes:
    """A pickle that, loaded by an unpickler that admits pathlib.PosixPath, sets the class attribute
    PosixPath._str (BUILD on the class: every Path in the process then prints as the sender's path),
    followed by one that makes a directory in the canary; padded to `size` with spaces."""
    def text(s):
        return b"X" + len(s.encode()).to_bytes(4, "little") + s.encode()
    body = b"\x80\x02cpathlib\nPosixPath\nN}" + text("_str") + text(str(canary)) + b"s\x86b."
    body += pickle.dumps(Poison(str(canary / "pwned")))
    return body + b" " * max(0, size - len(body))


def resume(d) -> int:
    """run.py --resume d in-process: its exit status (parse_args exits 2 itself)."""
    try:
        return run.main(["--resume", str(d)])
    except SystemExit as e:
        return e.code


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:") and "Traceback" not in err, err[-3000:]
    return lines[-1]


# -----------------------------------------------------------------------------
# the breaks of issue 33, each seen failing on 330b6fe


def test_a_poisoned_dcp_metadata_is_refused_in_one_line_and_changes_nothing(runs, place, capsys):
    d, canary, before = place(runs["dcp"])
    for meta in (d / "checkpoints").rglob(".metadata*"):  # the pickle DCP writes, or the JSON beside the shards
        meta.write_bytes(poisoned_pickle(canary, meta.stat().st_size))
    assert resume(d) == 2
    msg = one_line(capsys.readouterr().err)
    assert ".metadata" in msg and str(d) in msg
    assert str(pathlib.Path("/etc") / "x") == "/etc/x" and tree_hash(canary) == before


def test_a_symlinked_lock_never_truncates_its_target(runs, place, capsys):
    d, canary, before = place(runs["single"])
    (d / ".lock").unlink()
    (d / ".lock").symlink_to(canary / "victim" / "config.json")
    assert resume(d) == 2
    assert ".lock" in one_line(capsys.readouterr().err) and tree_hash(canary) == before


def test_a_symlinked_checkpoints_directory_is_refused(runs, place, capsys):
    d, canary, before = place(runs["single"])
    shutil.rmtree(d / "checkpoints")
    (d / "checkpoints").symlink_to(canary / "victim" / "checkpoints")
    assert resume(d) == 2
    assert "checkpoints" in one_line(capsys.readouterr().err) and tree_hash(canary) == before


def test_state_json_as_a_fifo_is_refused_without_hanging(runs, place, capsys):
    d, canary, before = place(runs["single"])
    state = next((d / "checkpoints").glob("step-*/state.json"))
    manifest = json.loads((state.parent / "manifest.json").read_text())  # the sender's manifest lists it not
    manifest["files"].pop("state.json")
    (state.parent / "manifest.json").write_text(json.dumps(manifest))
    state.unlink()
    os.mkfifo(state)
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("--resume hung on a FIFO"))
    signal.alarm(60)
    try:
        assert resume(d) == 2
    finally:
        signal.alarm(0)
    assert "state.json" in one_line(capsys.readouterr().err) and tree_hash(canary) == before


def test_same_size_damage_is_refused_in_one_line(runs, place, capsys):
    d, _, _ = place(runs["single"])
    weights = next((d / "checkpoints").glob("step-*/weights.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-len(data) // 4:] = bytes(len(data) // 4)  # a zeroed tail, as a power loss leaves one
    weights.write_bytes(bytes(data))
    status = (d / "status.json").read_bytes()
    assert resume(d) == 2
    assert "weights.safetensors" in one_line(capsys.readouterr().err)
    assert (d / "status.json").read_bytes() == status


def test_resume_of_a_model_directory_is_refused_and_writes_nothing(runs, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(runs["target"], model)
    before = tree_hash(model)
    assert resume(model) == 2
    assert "not a run directory" in one_line(capsys.readouterr().err) and tree_hash(model) == before


# -----------------------------------------------------------------------------
# the mutation harness: every mutation kind on every file and directory of both layouts


def text(path) -> bytes:
    return path.read_bytes() if path.is_file() and not path.is_symlink() else b""


def json_swapped(data: bytes, how: str) -> bytes | None:
    """A JSON (or JSON Lines) file with each value's type changed, or its numbers made huge; None
    when data is not JSON."""
    def swap(v):
        if how == "huge":
            return (1e400 if isinstance(v, float) else "__HUGE__") if type(v) in (int, float) else (
                {k: swap(x) for k, x in v.items()} if isinstance(v, dict) else [swap(x) for x in v]
                if isinstance(v, list) else v)
        return {k: ([] if not isinstance(x, list) else {"x": x}) for k, x in v.items()} if isinstance(v, dict) else {}
    try:
        rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()] if data.strip() else []
        if len(rows) != 1:
            rows = [json.loads(data)] if data.strip().startswith((b"{", b"[")) and b"\n{" not in data else rows
    except ValueError:
        return None
    if how == "huge":
        return "\n".join(json.dumps(swap(r)).replace("Infinity", "1e400").replace('"__HUGE__"', "9" * 5000)
                         for r in rows).encode() + b"\n"
    return "\n".join(json.dumps(swap(r)) for r in rows).encode() + b"\n"


MUTATIONS = ("truncate", "zero-tail", "symlink-out", "symlink-in", "fifo", "dir-for-file", "wrong-types",
             "nested", "huge", "pickle", "foreign")


def mutate(d, canary, rel, kind, other) -> bool:
    """Apply `kind` to d/rel (a file or a directory); False when it does not apply to it."""
    p = d / rel
    data = text(p)
    if p.is_dir():
        if kind == "symlink-out":  # the run's own directory swapped for a link to the canary's copy
            shutil.rmtree(p)
            p.symlink_to(canary / "victim" / rel)
        elif kind == "dir-for-file":
            shutil.rmtree(p)
            p.write_bytes(b"{}")
        else:
            return False
        return True
    new = {"truncate": data[: len(data) // 2], "zero-tail": data[: len(data) - max(1, len(data) // 4)]
           + bytes(max(1, len(data) // 4)) if data else None, "nested": b"[" * 100000 + b"]" * 100000,
           "pickle": poisoned_pickle(canary, len(data)),
           "wrong-types": json_swapped(data, "types"), "huge": json_swapped(data, "huge")}.get(kind, b"")
    if new is None:
        return False
    if kind == "foreign":
        src = other / rel if (other / rel).is_file() else next(
            (q for q in sorted(other.rglob("*" + p.suffix)) if q.is_file() and q.name != p.name), None)
        if src is None:
            return False
        new = src.read_bytes()
    p.unlink()
    if kind == "symlink-out":
        p.symlink_to(canary / "victim" / rel)
    elif kind == "symlink-in":
        p.symlink_to(d / ("config.json" if rel != "config.json" else "results.json"))
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "dir-for-file":
        p.mkdir()
        (p / "x").write_bytes(data)
    else:
        p.write_bytes(new)
    return True


class Light:
    """--resume up to the point where the checkpoint is validated and everything it reads is read (no
    training, no scoring): parse_args (marker, config.json, results.json), the lock, the fingerprint,
    checkpoint.load with sharded.read and its checks, job.rundir.read_prior (scores, log.jsonl)."""

    def __init__(self, target):
        self.model, self.tok = lume.load_pretrained(str(target))
        self.inputs = {}

    def __call__(self, d):
        cfg = run.parse_args(["--resume", str(d)])
        fd = checkpoint.lock_run(d)
        try:
            key = (cfg.data, cfg.n_docs, cfg.seed, cfg.mia_data, cfg.mmlu, cfg.model)
            if key not in self.inputs:
                self.inputs[key] = job.load_inputs(cfg)[:3]
            inputs = self.inputs[key]
            fp = job.run_fingerprint(cfg, inputs, self.model, self.tok, None, "fp32")
            got = job.resume_checkpoint(cfg, fp, self.model, len(job.split_items(cfg, inputs[0])[0]))
            job.rundir.read_prior(d, got, job.report.table)
            return got
        finally:
            os.close(fd)


def outcome(attempt, d, capsys):
    """'ok' and the checkpoint, or 'error' and its one line; anything else fails the test."""
    try:
        return "ok", attempt(d)
    except SystemExit as e:
        err = capsys.readouterr().err + (e.code if isinstance(e.code, str) else "")
        assert e.code == 2 or (isinstance(e.code, str) and e.code.startswith("error:")), (e.code, err)
        line = one_line(err)
        assert line.count("error:") == 1, line
        return "error", line


def test_every_mutation_of_every_file_is_one_line_or_a_correct_resume(runs, tmp_path, capsys):
    light = Light(runs["target"])
    pristine = {}
    for layout in ("single", "dcp"):
        got = light(runs[layout])
        pristine[layout] = got
        assert got["step"] == 1
    counts = {"cases": 0, "error": 0, "ok": 0}
    for layout, other in (("single", "dcp"), ("dcp", "single")):
        src, canary = runs[layout], tmp_path / f"canary-{layout}"  # beside every case's run directory
        shutil.copytree(src, canary / "victim", symlinks=True)
        before = tree_hash(canary)
        paths = sorted(p.relative_to(src).as_posix() for p in src.rglob("*"))
        for rel in paths:
            for kind in MUTATIONS:
                case = tmp_path / f"{counts['cases']}"
                d = case / "run"
                shutil.copytree(src, d, symlinks=True)
                if not mutate(d, canary, rel, kind, runs[other]):
                    shutil.rmtree(case)
                    continue
                counts["cases"] += 1
                result, detail = outcome(light, d, capsys)
                counts[result] += 1
                assert tree_hash(canary) == before, (layout, rel, kind)
                assert str(pathlib.Path("/etc") / "x") == "/etc/x", (layout, rel, kind)
                special = kind in ("symlink-out", "symlink-in", "fifo", "dir-for-file")
                assert not special or result == "error" or rel in ("status.json", "checkpoints/latest.json"), (
                    layout, rel, kind)  # never followed, never opened: the pointer alone may fall back
                if result == "ok":  # a correct resume: the checkpoint as saved, nothing of the mutation in it
                    checked = rel.startswith("checkpoints/") and not rel.endswith("latest.json")
                    assert not checked or kind in ("foreign",) and text(d / rel) == text(src / rel), (layout, rel, kind)
                    assert detail["step"] == 1 and detail["fingerprint"] == pristine[layout]["fingerprint"]
                else:
                    assert str(d) in detail, (layout, rel, kind, detail)
                shutil.rmtree(case, ignore_errors=True)
    print(f"mutation harness: {counts}")
    assert counts["cases"] >= 250 and counts["error"] > counts["ok"] > 0, counts


# -----------------------------------------------------------------------------
# a handful of full resumes, and the one-line errors of the other entry points


def test_a_handful_of_cases_resume_fully_and_give_the_same_results(runs, tmp_path):
    """The sharded layout in one process (sharded.Reader: JSON metadata, safetensors shards), and a
    one-process run whose latest.json is gone and whose status.json and .lock are damaged: both
    complete, with the same results."""
    results = []  # (the pristine one-process resume: tests/test_faults.py's SIGTERM test)
    for layout, damage in (("dcp", None), ("single", "latest.json+status+lock")):
        d = tmp_path / f"{layout}-{damage}"
        shutil.copytree(runs[layout], d)
        if damage:
            (d / "checkpoints" / "latest.json").unlink()
            (d / "status.json").write_bytes(b"\0" * 10)
            (d / ".lock").write_bytes(b"12345\n")
        assert resume(d) == 0, (layout, damage)
        results.append(json.loads((d / "results.json").read_text()))
        assert json.loads((d / "status.json").read_text())["status"] == "complete"
    assert all(r == results[0] for r in results[1:])


def test_sigterm_during_a_resumes_model_load_says_nothing_changed(runs, tmp_path, capsys, monkeypatch):
    d = tmp_path / "run"
    shutil.copytree(runs["single"], d)
    before = tree_hash(d, skip=(".lock",))  # the lock is taken first: its PID changes

    def killed(*a, **k):
        raise checkpoint.Terminated("terminated (SIGTERM)")
    monkeypatch.setattr(job, "load_model", killed)
    assert resume(d) == 143
    line = one_line(capsys.readouterr().err)
    assert "before the run directory was made" not in line and f"--resume {d}" in line
    assert tree_hash(d, skip=(".lock",)) == before


def test_status_json_is_whole_with_a_long_path_and_on_a_full_disk(tmp_path, monkeypatch):
    import rundir
    path = tmp_path / "status.json"
    long = "/very/long/" + "x" * 6000
    rundir.write_status(path, {"status": "failed", "reason": f"cannot write {long}", "next": f"see {long}"})
    assert json.loads(path.read_text())["reason"].endswith("x" * 100)  # whole: never cut mid-string
    rundir.write_status(path, {"status": "running"})
    size = path.stat().st_size

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(rundir, "write_atomic", full)  # the disk fills: rewritten in place, shortened to fit
    rundir.write_status(path, {"status": "failed", "reason": f"cannot write {long}"})
    assert path.stat().st_size == size and json.loads(path.read_text())["status"] == "failed"


def test_a_full_disk_in_safetensors_is_the_usual_one_line(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')
    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError) as e:
        checkpoint.save(tmp_path, 3, {"a": torch.ones(2)}, {}, {})
    assert e.value.errno == 28 and "no space left on device" in str(e.value) and "step-000003" in str(e.value)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name,content", [("adapter_config.json", b"[1, 2]"), ("adapter_config.json", b"{\"r\": \"8\"}"),
                                          ("adapter_config.json", b"[" * 100000),
                                          ("adapter_model.safetensors", b"\xff" * 64)],
                         ids=["list", "wrong-type", "nested", "not-safetensors"])
def test_merge_of_a_malformed_adapter_is_one_line(runs, tmp_path, capsys, name, content):
    import merge
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16,
                                                             "base_model_name_or_path": str(runs["target"])}))
    (adapter / name).write_bytes(content)
    assert merge.main([str(adapter), "--base", str(runs["target"]), "--out", str(tmp_path / "out")]) == 2
    assert name in one_line(capsys.readouterr().err) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("results", [b"[1]", b"{\"before\": 5}", b"{\"before\": {\"forget-set\": []}}", b"[" * 100000],
                         ids=["list", "wrong-type", "wrong-inner-type", "nested"])
def test_report_compare_of_malformed_results_is_one_line(runs, tmp_path, capsys, results):
    import report
    d = tmp_path / "run"
    shutil.copytree(runs["single"], d)
    (d / "results.json").write_bytes(results)
    assert report.main(["compare", str(d), str(runs["single"]), "--png", ""]) == 2
    assert "results.json" in one_line(capsys.readouterr().err)
