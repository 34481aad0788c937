"""Runs that survive faults and hostile files: a checkpoint never runs code and never points outside
its run, a resume refuses what does not fit (each field by name), damaged checkpoints fall back or are
named, leftovers of killed saves never block, SIGTERM ends like Ctrl-C with a checkpoint, one process
per run directory and per tiny build, a full disk is one line, and archives cost no memory."""
import errno
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import zipfile
import zlib

import pytest
import torch

import checkpoint
import fetch
import run
import rundir
from conftest import ROOT, SMALL_CONFIG, SMALL_RECIPE

# one worker under pytest -n (--dist loadgroup): the SIGTERM tests share one terminated run (module fixture)
pytestmark = pytest.mark.xdist_group("test_faults")

BASE = ["--data", "builtin", "--n-docs", "2", "--max-new-tokens", "8"]


def save_two(tmp_path, fp=None, best=True):
    """A run directory holding checkpoints at steps 3 and 6 (weights w + step)."""
    w = {"a": torch.randn(3, 2), "b": torch.arange(4.0)}
    for step in (3, 6):
        checkpoint.save(tmp_path, step, {k: v + step for k, v in w.items()}, {"state": {}, "param_groups": []},
                        {"ref_logps": torch.ones(2), "track": {"rows": [], "best": None}},
                        {k: v * step for k, v in w.items()} if best else None, fp)
    return tmp_path / "checkpoints"


class Boom:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_a_crafted_pickle_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    where = tmp_path / "checkpoints" / "step-000002"
    where.mkdir(parents=True)
    torch.save({"step": 2, "x": Boom(sentinel)}, where / "state.pt")  # the old format's files, weaponised
    torch.save({}, where / "optimizer.pt")
    from safetensors.torch import save_file
    save_file({"a": torch.ones(1)}, str(where / "weights.safetensors"))
    (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step-000002"}))
    try:
        checkpoint.load(tmp_path)
    except Exception as e:  # refused, as it should be; what matters is that nothing ran
        assert "no usable checkpoint" in str(e) and "manifest.json: missing" in str(e)
    assert not sentinel.exists()
    # nowhere in the project is a file unpickled: not even DCP's metadata (sharded.py writes it as JSON)
    for py in [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py")]:
        if py.name not in ("test_faults.py", "test_scale.py", "test_hostile.py"):  # these files name them
            text = py.read_text()
            assert "weights_only=False" not in text and "torch.load(" not in text, py
            assert "pickle.load" not in text and "Unpickler" not in text, py


def test_a_path_outside_the_run_is_refused(tmp_path):
    elsewhere = save_two(tmp_path / "elsewhere")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    pointer = run_dir / "checkpoints" / "latest.json"
    for name in (str(elsewhere / "step-000006"), "../../elsewhere/checkpoints/step-000006"):
        pointer.write_text(json.dumps({"step": 6, "dir": name}))
        with pytest.raises(checkpoint.CheckpointError, match="refused") as e:
            checkpoint.load(run_dir)
        assert "\n" not in str(e.value)
    pointer.unlink()  # a step directory that is a symlink to another run's
    (run_dir / "checkpoints" / "step-000006").symlink_to(elsewhere / "step-000006")
    with pytest.raises(checkpoint.CheckpointError, match="outside"):
        checkpoint.load(run_dir)


FP = {"config": {"lr": 1e-5, "method": "npo", "task": "1", "max_steps": 10, "seed": 0, "batch_size": 4,
                 "schedule": "constant"},
      "precision": "fp32", "data_sha256": "a" * 64, "model": {"tiny": "0123456789abcdef"}, "world_size": 1}


@pytest.mark.parametrize("field,value,says", [
    ("lr", 1e-3, "--lr: checkpoint 1e-05, this run 0.001"), ("method", "gd", "--method: checkpoint 'npo'"),
    ("task", "2", "--task"), ("max_steps", 4, "--max-steps"), ("seed", 1, "--seed"), ("batch_size", 8, "--batch-size"),
    ("schedule", "linear", "--schedule"), ("precision", "bf16", "precision"), ("data_sha256", "b" * 64, "data_sha256"),
    ("model", {"tiny": "fedcba9876543210"}, "model"), ("world_size", 2, "world_size")])
def test_each_changed_field_is_refused_by_name(tmp_path, field, value, says):
    save_two(tmp_path, FP)
    now = json.loads(json.dumps(FP))
    (now["config"] if field in now["config"] else now)[field] = value
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(tmp_path, now)
    assert says in str(e.value) and "\n" not in str(e.value) and str(e.value).count(": checkpoint ") == 1
    assert checkpoint.load(tmp_path, FP)["step"] == 6  # the same fingerprint loads


def truncate(path):
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


@pytest.mark.parametrize("damage", ["truncate", "remove"])
@pytest.mark.parametrize("name", ["weights.safetensors", "best.safetensors", "state.safetensors", "state.json",
                                  "manifest.json"])
def test_a_damaged_checkpoint_file_is_named_and_the_previous_one_used(tmp_path, name, damage):
    root = save_two(tmp_path)
    (truncate if damage == "truncate" else pathlib.Path.unlink)(root / "step-000006" / name)
    notes = []
    got = checkpoint.load(tmp_path, log=notes.append)
    assert got["step"] == 3 and torch.equal(got["weights"]["b"], torch.arange(4.0) + 3)
    assert len(notes) == 1 and f"step-000006/{name}" in notes[0] and "resuming from step-000003" in notes[0]
    (truncate if damage == "truncate" else pathlib.Path.unlink)(root / "step-000003" / name)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(tmp_path)
    msg = str(e.value)
    assert "no usable checkpoint" in msg and f"step-000006/{name}" in msg and f"step-000003/{name}" in msg
    assert "new --out" in msg and "\n" not in msg


@pytest.mark.parametrize("pointer", ["", "not json", '{"step": 9, "dir": "step-000009"}'])
def test_a_bad_latest_json_falls_back_to_the_directories(tmp_path, pointer):
    root = save_two(tmp_path)
    (root / "latest.json").write_text(pointer)
    notes = []
    assert checkpoint.load(tmp_path, log=notes.append)["step"] == 6
    assert not notes or ("step-000009" in notes[0] and "missing" in notes[0])


def test_only_the_last_two_checkpoints_are_kept(tmp_path):
    root = save_two(tmp_path)
    checkpoint.save(tmp_path, 9, {"a": torch.ones(1)}, {}, {})
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-000006", "step-000009"]
    assert json.loads((root / "latest.json").read_text())["previous"] == "step-000006"


def test_a_stale_temporary_directory_under_pid_1_never_blocks(tmp_path, monkeypatch):
    """In a container every run is PID 1: what a killed save left under that PID must not block the next."""
    monkeypatch.setattr(os, "getpid", lambda: 1)
    root = save_two(tmp_path)
    leftovers = [root / "step-000009.tmp1", root / ".step-000009.1-00000000.tmp"]  # old and new naming
    for p in leftovers:
        p.mkdir()
        (p / "weights.safetensors").write_bytes(b"half")
    (tmp_path / "results.json.tmp1").write_text("{")  # a writer killed mid-file
    checkpoint.save(tmp_path, 9, {"a": torch.ones(1)}, {}, {})
    rundir.write_json_atomic(tmp_path / "results.json", {"ok": 1})
    assert checkpoint.load(tmp_path)["step"] == 9
    assert not any(p.exists() for p in leftovers)
    assert json.loads((tmp_path / "results.json").read_text()) == {"ok": 1}


def test_write_atomic_removes_its_temporary_file_on_any_failure(tmp_path):
    def half_then_full(tmp):
        tmp.write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as e:
        rundir.write_atomic(tmp_path / "big.json", half_then_full, 5_000_000)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "big.json")
    assert "5.00 MB" in str(e.value) and list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# whole runs


def cli(target, out, *extra):
    return [sys.executable, "run.py", "--model", str(target), *BASE, "--out", str(out), *extra]


def start(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels in every process: bit-identical
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


TRAIN = ["--method", "npo", "--max-steps", "24", "--save-every", "1000", "--no-eval-before"]


@pytest.fixture(scope="module")
def terminated(small_target_dir, tmp_path_factory):
    """(a run ended by SIGTERM mid-training, its exit status and stderr, an uninterrupted run)."""
    tmp = tmp_path_factory.mktemp("sigterm")
    whole = start(cli(small_target_dir, tmp / "whole", *TRAIN))
    proc = start(cli(small_target_dir, tmp / "run", *TRAIN))
    log, deadline = tmp / "run" / "log.jsonl", time.time() + 300
    while not (log.is_file() and log.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert whole.communicate(timeout=600)[0] is None and whole.returncode == 0
    return tmp / "run", proc.returncode, err, tmp / "whole"


def test_sigterm_ends_like_ctrl_c_with_a_checkpoint_and_resume_gives_the_same_results(terminated, tmp_path):
    out, code, err, whole = terminated
    assert code == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: run failed: terminated (SIGTERM)") and f"--resume {out}" in last, err[-2000:]
    assert "Traceback" not in err and err.count("error:") == 1
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and "SIGTERM" in status["reason"] and "--resume" in status["next"]
    step = json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
    assert 3 <= step < 24 and step == sum(1 for _ in open(out / "log.jsonl"))  # the step it was in, then stopped
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    r = subprocess.run([sys.executable, "run.py", "--resume", str(copy)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((copy / "results.json").read_text()) == json.loads((whole / "results.json").read_text())


def test_resume_refuses_an_edited_config_by_name_before_touching_the_run(terminated, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(terminated[0], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "lr": 1e-3, "method": "gd"}))
    status = (copy / "status.json").read_bytes()
    assert run.main(["--resume", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--lr: checkpoint 1e-05, this run 0.001" in err and "--method" in err
    assert (copy / "status.json").read_bytes() == status  # untouched


def test_a_second_process_on_a_locked_run_directory_is_refused(terminated, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(terminated[0], copy)
    fd = checkpoint.lock_run(copy)  # as a run still training there holds it
    try:
        assert run.main(["--resume", str(copy)]) == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"PID {os.getpid()}" in err and "in use" in err


def test_a_full_disk_is_one_line_status_failed_and_no_temporary_file(small_target_dir, tmp_path, capsys,
                                                                    monkeypatch):
    out, full = tmp_path / "run", []
    real = {name: getattr(pathlib.Path, name) for name in ("write_bytes", "write_text")}

    def writer(name):
        def write(self, data, *a, **k):
            if "generations" in self.name or full:  # the disk fills while the scores are written
                full.append(self.name)
                real[name](self, data[: len(data) // 2], *a, **k)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real[name](self, data, *a, **k)
        return write
    for name in real:
        monkeypatch.setattr(pathlib.Path, name, writer(name))
    with pytest.raises(SystemExit) as e:
        run.main(["--model", str(small_target_dir), *BASE, "--method", "ga", "--max-steps", "2", "--out", str(out)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "no space left on device" in lines[0] and "generations.jsonl" in lines[0] and "MB" in lines[0]
    assert f"free space, then continue it with: python run.py --resume {out}" in lines[0]
    status = json.loads((out / "status.json").read_text())  # rewritten in place: the disk is still full
    assert status["status"] == "failed" and "no space left" in status["reason"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], list(out.rglob("*"))


BUILD = """
import sys, data, tiny
items, _ = data.builtin(n_docs=2, seed=0)
print(tiny.tiny_target(items, sys.argv[1], recipe={recipe}, config={config}))
""".format(recipe={**SMALL_RECIPE, "epochs": 2}, config=SMALL_CONFIG)  # 2 epochs: the build only has to take a while


def test_two_concurrent_tiny_builds_build_once_and_both_succeed(tmp_path):
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(cache)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    text = "".join(o[0] for o in outs)
    assert text.count("tiny target: building") == 1 and text.count("reusing") == 1, text
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1 and (pathlib.Path(paths.pop()) / "model.safetensors").is_file()
    assert not [p for p in cache.iterdir() if "tmp" in p.name]


# -----------------------------------------------------------------------------
# archives


MEMBER = "data/dev/abstract_algebra_dev.csv"  # the first pinned member of mmlu.zip


def crafted_zip(body: bytes = b"q,a,b,c,d,A\n", **patch) -> bytes:
    """A zip holding MEMBER, its header fields patched in both headers: flag, method, crc, size
    (declared uncompressed size); corrupt=True overwrites the deflate stream's middle."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open(MEMBER, "w", force_zip64=False) as f:
            for k in range(0, len(body), 1 << 24):
                f.write(body[k:k + (1 << 24)])
    raw = bytearray(buf.getvalue())
    local, central = raw.index(b"PK\x03\x04"), raw.index(b"PK\x01\x02")
    fields = {"flag": (6, 8, 2), "method": (8, 10, 2), "crc": (14, 16, 4), "size": (22, 24, 4)}
    for name, value in patch.items():
        if name == "corrupt":
            start = local + 30 + len(MEMBER)
            raw[start + 2:start + 12] = b"\xff" * 10
            continue
        lo, co, n = fields[name]
        for at in (local + lo, central + co):
            raw[at:at + n] = value.to_bytes(n, "little")
    return bytes(raw)


@pytest.mark.parametrize("patch,says", [({"crc": 1234}, "CRC"), ({"flag": 1}, "encrypted"),
                                        ({"method": 99}, "compression method"), ({"corrupt": True}, "cannot be unpacked")])
def test_a_corrupt_archive_is_one_line_naming_the_archive_and_member(tmp_path, monkeypatch, patch, says):
    blob = crafted_zip(b"q,a,b,c,d,A\n" * 2000, **patch)
    monkeypatch.setattr(fetch, "download", lambda url: blob)
    with pytest.raises(SystemExit) as e:
        fetch.resolve("mmlu", tmp_path, log=lambda s: None)
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg and "mmlu.zip" in msg and MEMBER in msg and says in msg, msg
    assert not list((tmp_path / "data").iterdir())  # nothing cached, nothing left behind


LYING = """
import resource, sys, fetch, zlib
blob = open(sys.argv[1], "rb").read()
fetch.download = lambda url: blob
try:
    fetch.resolve("mmlu", sys.argv[2], log=lambda s: None)
except SystemExit as e:
    print(e.code)
# ru_maxrss carries over the parent's peak through fork and exec (pytest holds torch: ~330 MB); the
# peak of this process's own memory since exec is VmHWM (Linux), else ru_maxrss
hwm = [int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM")] if sys.platform == "linux" else []
print((hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) // 1024, "MB")
"""


def test_an_archive_that_lies_about_its_size_costs_no_memory(tmp_path):
    """1 GiB of zeros (1 MB compressed) declared as 1 KB: at most 200 MB peak and one line."""
    z = zlib.compressobj(1, zlib.DEFLATED, -15)
    body = b"".join(z.compress(bytes(1 << 20)) for _ in range(1024)) + z.flush()
    crc = 0
    for _ in range(1024):
        crc = zlib.crc32(bytes(1 << 20), crc)
    small = crafted_zip(b"x" * 1024)  # a 1 KB member, whose compressed data is swapped for the 1 GiB stream
    local = small.index(b"PK\x03\x04")
    start = local + 30 + len(MEMBER)
    central = small.index(b"PK\x01\x02")
    raw = bytearray(small[:start] + body + small[central:])
    shift = len(body) - (central - start)
    local_h, central_h = raw.index(b"PK\x03\x04"), raw.index(b"PK\x01\x02")
    for at in (local_h + 18, central_h + 20):  # compressed size: the real one
        raw[at:at + 4] = len(body).to_bytes(4, "little")
    for at in (local_h + 14, central_h + 16):
        raw[at:at + 4] = crc.to_bytes(4, "little")
    end = raw.index(b"PK\x05\x06")  # the central directory moved by `shift`
    offset = int.from_bytes(raw[end + 16:end + 20], "little") + shift
    raw[end + 16:end + 20] = offset.to_bytes(4, "little")
    (tmp_path / "mmlu.zip").write_bytes(bytes(raw))
    r = subprocess.run([sys.executable, "-c", LYING, str(tmp_path / "mmlu.zip"), str(tmp_path / "cache")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 2 and lines[0].startswith("error:") and MEMBER in lines[0], r
    assert int(lines[1].split()[0]) < 200, lines
