"""
Training checkpoints that a killed run resumes from, bit for bit, and that are as safe to resume
from a downloaded run directory as a safetensors file is to load: nothing in them is pickled.

    python run.py --task 1 --method npo --save-every 20 --out runs/a   # killed at any moment...
    python run.py --resume runs/a                                     # ...continues, same results.json

A checkpoint holds what the rest of the run depends on: the trainable weights, the optimizer and
GradScaler states, every RNG state, the step, NPO's reference log-probs, and the trajectory and
best-step bookkeeping. Frozen weights are not saved: they are the target's, reloaded on resume.

On disk (FORMAT 3):

    <run>/checkpoints/
      latest.json                 {"format": 3, "step": 6, "dir": "step-000006", "previous": "step-000003"}
      step-000006/                the newest checkpoint; the one before it is kept too (KEEP = 2)
        manifest.json             {"format", "step", "fingerprint", "files": {relative path: {"bytes", "sha256"}}}
        weights.safetensors       trainable parameters by name
        best.safetensors          --keep best: the best step's trainable parameters (absent otherwise)
        state.safetensors         every tensor of the state below, keyed by its path ("optimizer/state/0/exp_avg")
        state.json                the state's structure in plain JSON, each tensor a {"__tensor__": key}:
                                  optimizer (torch's state_dict), scaler, rng (Python's as lists, torch's
                                  as uint8 tensors), ref_logps, track, step
      .step-000009.<pid>-<random>.tmp/   a save in progress (or killed): never read, removed by the next save

A save fills a fresh temporary directory (its name unique per attempt), hashes and flushes (fsync)
every file, writes manifest.json last, renames it whole to step-NNNNNN, flushes the directory, then
rewrites latest.json (atomically, flushed) and removes all but the newest KEEP checkpoints. A kill
or a power loss at any moment leaves complete checkpoints only.

Loading (load) never unpickles and never writes: JSON and safetensors only, each file opened through
rundir.open_in (a regular file inside the run, no link followed anywhere below the run directory,
no FIFO or device, bounded where it is JSON). latest.json may only name a direct child called
step-<digits>; <run>/checkpoints itself must be a real directory. Every file the manifest lists is
checked against its size and sha256 (streamed) before it is used, and state.json against the state
restore() needs (check_state). It tries the newest checkpoint first (latest.json's, then the others
by step); one that fails (missing, truncated or same-size damaged file, bad JSON, wrong JSON types)
is named by file and the previous one is used, with a note; when none can be read, one line says so
and what to do (CheckpointError).

The fingerprint (identity.py) is what a checkpoint's numbers depend on; --resume refuses a
checkpoint whose fingerprint differs from the run's, naming every differing field.

Sharded (DCP) checkpoints under torchrun build on publish(): it gives a temporary directory inside
<run>/checkpoints/ to fill, records every file and the fingerprint in manifest.json, publishes it
under its step and keeps the last KEEP; load(read=...) falls back across checkpoints with any reader.
"""
import errno
import json
import os
import random
import re
import secrets
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import identity
import lume
import rundir

FORMAT = 3
KEEP = 2  # checkpoints kept: the newest and the one before it, the fallback when the newest cannot be read
STEP_DIR = re.compile(r"step-(\d{6,})")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: its one-line message says which file and what to do."""


# -----------------------------------------------------------------------------
# state <-> JSON + tensors (no pickle)


def encode(obj, tensors: dict, path: str = "s"):
    """obj (dicts, lists, tuples, tensors, numbers, strings, None) as plain JSON; each tensor moved
    into `tensors` under its path and replaced by {'__tensor__': path}. Dicts whose keys are not all
    strings (torch's optimizer state: {param index: ...}) and tuples keep their type."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[k, encode(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state at {path}: {type(obj).__name__} is not a plain type or a tensor")


def decode(obj, tensors: dict):
    """encode's inverse."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {(tuple(k) if isinstance(k, list) else k): decode(v, tensors) for k, v in obj["__items__"]}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


# -----------------------------------------------------------------------------
# RNG and trainable weights


def rng_state() -> dict:
    """Every RNG the run draws from: Python's, torch's CPU and (when present) CUDA generators."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]  # JSON gives lists back: random wants tuples
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: its shard under FSDP2 (a DTensor), else the tensor."""
    return p.to_local() if hasattr(p, "to_local") else p


def trainable_state(model) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that train (the others are the target's, unchanged); under
    FSDP2, of this rank's shards (--keep best holds one per rank)."""
    return {name: local(p.detach()).to("cpu", copy=True) for name, p in model.named_parameters()
            if p.requires_grad}


def load_trainable(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters back into the model, in place, checking names and shapes."""
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise CheckpointError(f"the checkpoint does not fit the model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, w in weights.items():
            if local(params[name]).shape != w.shape:
                raise CheckpointError(f"the checkpoint does not fit the model: {name} is {tuple(w.shape)} there, "
                                      f"{tuple(local(params[name]).shape)} here")
            local(params[name]).copy_(w)


# -----------------------------------------------------------------------------
# the directory: confined paths, temporary names, publish, keep the last KEEP


def root_of(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def real_root(root: Path) -> bool:
    """True when <run>/checkpoints is a real directory, False when absent; CheckpointError when it is a
    link or anything else (a link would make a save or a cleanup write and delete elsewhere)."""
    try:
        return rundir.real_dir(root)
    except rundir.BadFile as e:
        raise CheckpointError(str(e)) from None


def confined(root: Path, name: str) -> Path:
    """root/name when name is a step directory directly inside root, else CheckpointError: a run
    directory never makes a resume read anything outside it (the files are opened through
    rundir.open_in, which follows no link)."""
    if not isinstance(name, str) or not STEP_DIR.fullmatch(name):
        raise CheckpointError(f"{root / 'latest.json'} names {name!r}, not a step-NNNNNN directory inside "
                              f"{root}: refused (a checkpoint never points outside its run)")
    return root / name


def clean_temporary(root: Path, keep: Path | None = None) -> None:
    """Remove what killed saves left: '.step-*.tmp' (this format) and 'step-*.tmp<pid>' (the old one).
    Safe: the run-directory lock (job.py) means no other process saves here."""
    for p in root.glob("*"):
        if p != keep and (re.fullmatch(r"\.step-\d+\..*\.tmp", p.name) or re.fullmatch(r"step-\d+\.tmp.*", p.name)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def steps_on_disk(root: Path) -> list[int]:
    """Steps of the step-NNNNNN directories under root, newest first."""
    return sorted((int(m.group(1)) for p in root.glob("step-*") if (m := STEP_DIR.fullmatch(p.name))), reverse=True)


def _no_space(e: BaseException) -> int | None:
    """ENOSPC/EDQUOT when e says the disk is full: an OSError, or safetensors' own error type, which
    carries the OS error only in its text ("Os { code: 28, kind: StorageFull ... }")."""
    if isinstance(e, OSError):
        return e.errno if e.errno in (errno.ENOSPC, errno.EDQUOT) else None
    text = str(e)
    if type(e).__name__ == "SafetensorError" and ("code: 28" in text or "StorageFull" in text or "No space" in text):
        return errno.ENOSPC
    if type(e).__name__ == "SafetensorError" and ("code: 122" in text or "QuotaExceeded" in text):
        return errno.EDQUOT
    return None


def write_json_synced(path: Path, obj) -> None:
    """rundir.write_json_atomic, the file and its directory flushed to the disk before and after the rename."""
    def write(tmp):
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        rundir.fsync_file(tmp)
    rundir.write_atomic(path, write)
    rundir.fsync_dir(path.parent)


def sealed(tmp: Path) -> dict:
    """{relative path: {"bytes", "sha256"}} of every file written into tmp, each flushed to the disk
    (a power loss must not leave a checkpoint whose latest.json points at zeroed blocks)."""
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(tmp).as_posix()
            digest, size = rundir.sha256_in(tmp, rel)
            rundir.fsync_file(p)
            files[rel] = {"bytes": size, "sha256": digest}
    for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}):
        rundir.fsync_dir(d)
    return files


def publish(run_dir, step: int, write, fingerprint: dict | None, needed: int | None = None) -> Path:
    """write(tmp) fills a fresh temporary directory inside <run>/checkpoints/; then manifest.json
    (every file's size and sha256, the fingerprint) is written, every file and directory flushed,
    the directory renamed to step-NNNNNN (replacing one of the same step), latest.json pointed at
    it, and all but the newest KEEP removed. <run>/checkpoints that is a link: CheckpointError."""
    root = root_of(run_dir)
    if not real_root(root):
        root.mkdir(parents=True, exist_ok=True)
    real_root(root)
    clean_temporary(root)
    name = f"step-{step:06d}"
    tmp = root / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir()
        write(tmp)
        manifest = {"format": FORMAT, "step": step, "fingerprint": fingerprint, "files": sealed(tmp)}
        write_json_synced(tmp / "manifest.json", manifest)
        if (root / name).exists() or (root / name).is_symlink():  # the same step again (a resumed run): swap it
            old = root / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
            os.rename(root / name, old)
            os.rename(tmp, root / name)
            shutil.rmtree(old, ignore_errors=True) if not old.is_symlink() else old.unlink()
        else:
            os.rename(tmp, root / name)
        rundir.fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _no_space(e)
        if full:
            more = f" (the checkpoint needs about {needed / 1e6:.1f} MB)" if needed else ""
            raise OSError(full, f"no space left on device{more}", str(root / name)) from None
        raise
    steps = steps_on_disk(root)
    previous = next((f"step-{s:06d}" for s in steps if s < step), None)
    write_json_synced(root / "latest.json", {"format": FORMAT, "step": step, "dir": name, "previous": previous})
    for s in steps:
        old = root / f"step-{s:06d}"
        if s != step and old.name != previous:
            shutil.rmtree(old, ignore_errors=True) if not old.is_symlink() else old.unlink()
    return root / name


def save(run_dir, step: int, weights: dict, optimizer: dict, state: dict, best: dict | None = None,
         fingerprint: dict | None = None) -> Path:
    """Write checkpoint `step` (steps done): weights and best as safetensors, optimizer + state + RNG
    as state.json with its tensors in state.safetensors; publish() makes it atomic."""
    tensors = {}
    plain = encode({"optimizer": optimizer, **state, "rng": rng_state(), "step": step}, tensors)

    def write(tmp):
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(plain) + "\n")
    needed = sum(t.numel() * t.element_size() for d in (weights, best or {}, tensors) for t in d.values())
    return publish(run_dir, step, write, fingerprint, needed)


# -----------------------------------------------------------------------------
# reading: newest readable first, each file named when it cannot be read; every file opened through
# rundir (regular files inside the run only) and checked against its sha256 before it is used


def _in_run(where: Path, rel: str) -> tuple[Path, str]:
    """(run directory, path inside it) of a file of the checkpoint where = <run>/checkpoints/step-N."""
    return where.parent.parent, f"checkpoints/{where.name}/{rel}"


def _manifest_problem(manifest: dict) -> str | None:
    files, step, fp = manifest.get("files"), manifest.get("step"), manifest.get("fingerprint")
    if manifest.get("format") != FORMAT:
        return (f"format {manifest.get('format')!r}, this LUME reads format {FORMAT} (a checkpoint of an older "
                "LUME: start the run again with a new --out)")
    if type(step) is not int or not 0 <= step < 10 ** 9:
        return f"step {step!r} is not a step number"
    if not isinstance(files, dict) or not files:
        return f"files is a {type(files).__name__}, not an object of file: {{bytes, sha256}}"
    for rel, rec in files.items():
        try:
            rundir.parts(rel)
        except rundir.BadFile as e:
            return str(e)
        if (not isinstance(rec, dict) or type(rec.get("bytes")) is not int or rec["bytes"] < 0
                or not isinstance(rec.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", rec["sha256"])):
            return f"files[{rel!r}] is not {{\"bytes\": N, \"sha256\": hex}}"
    if fp is not None and (not isinstance(fp, dict) or not isinstance(fp.get("config", {}), dict)):
        return "fingerprint is not an object"
    return None


def read_manifest(where: Path) -> dict:
    """where's manifest.json, after checking every file it lists is a regular file inside where with
    its recorded size and sha256 (streamed); CheckpointError naming the file otherwise."""
    path = where / "manifest.json"
    try:
        manifest = rundir.read_json(*_in_run(where, "manifest.json"), limit=rundir.JSON_LIMIT)
    except rundir.BadFile as e:
        raise CheckpointError(str(e) if e.why == "missing" else f"not a checkpoint manifest ({e})") from None
    problem = _manifest_problem(manifest)
    if problem is None and f"step-{manifest['step']:06d}" != where.name:
        problem = f"step {manifest['step']}, but it is in {where.name}"
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    for rel, rec in manifest["files"].items():
        try:
            digest, size = rundir.sha256_in(*_in_run(where, rel))
        except rundir.BadFile as e:
            raise CheckpointError(str(e)) from None
        if size != rec["bytes"]:
            raise CheckpointError(f"{where / rel}: {size} bytes, {rec['bytes']} when saved (truncated or changed)")
        if digest != rec["sha256"]:
            raise CheckpointError(f"{where / rel}: its content differs from what was saved (sha256 {digest[:12]}..., "
                                  f"{rec['sha256'][:12]}... when saved): damaged or changed")
    return manifest


def listed(manifest: dict, where: Path, *names) -> None:
    """CheckpointError unless every file in names is in the manifest (so checked by its sha256):
    nothing of a checkpoint is read by name alone."""
    missing = [n for n in names if n not in manifest["files"]]
    if missing:
        raise CheckpointError(f"{where / 'manifest.json'}: does not list {', '.join(missing)}: refused (every file "
                              "a checkpoint is read from is listed with its sha256)")


def tensors_of(where: Path, rel: str) -> dict:
    """A safetensors file of the checkpoint (checked by read_manifest), opened through rundir.open_in
    and read from that very descriptor (/proc/self/fd on Linux)."""
    try:
        fd, _ = rundir.open_in(*_in_run(where, rel), limit=None)
    except rundir.BadFile as e:
        raise CheckpointError(str(e)) from None
    try:
        proc = f"/proc/self/fd/{fd}"
        return load_file(proc if os.path.exists(proc) else str(where / rel))
    except Exception as e:  # safetensors' own error type: a damaged header or data
        raise CheckpointError(f"{where / rel}: cannot be read ({lume.first_line(e)})") from None
    finally:
        os.close(fd)


def json_of(where: Path, rel: str):
    """A JSON file of the checkpoint (checked by read_manifest) as plain values; CheckpointError."""
    try:
        return rundir.read_json(*_in_run(where, rel), kind=(dict, list))
    except rundir.BadFile as e:
        raise CheckpointError(str(e)) from None


def read(where: Path, manifest: dict | None = None) -> dict:
    """One checkpoint directory -> {'weights', 'optimizer', 'state', 'best', 'step', 'fingerprint', 'dir'}
    (manifest: read_manifest(where), when the caller has checked it already)."""
    manifest = manifest or read_manifest(where)
    listed(manifest, where, "state.json", "state.safetensors", "weights.safetensors")
    plain = json_of(where, "state.json")
    try:
        state = decode(plain, tensors_of(where, "state.safetensors"))
        optimizer = state.pop("optimizer")
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{where / 'state.json'}: does not match state.safetensors ({lume.first_line(e)})") from None
    if not isinstance(state, dict) or state.get("step") != manifest["step"]:
        raise CheckpointError(f"{where / 'state.json'}: not the state of step {manifest['step']}")
    best = tensors_of(where, "best.safetensors") if "best.safetensors" in manifest["files"] else None
    return {"weights": tensors_of(where, "weights.safetensors"), "best": best, "optimizer": optimizer,
            "state": state, "step": manifest["step"], "fingerprint": manifest["fingerprint"], "dir": where}


def _number(v) -> bool:
    return type(v) in (int, float) and abs(v) < 1e300


def check_rng(rng, where) -> None:
    """CheckpointError unless rng is a state set_rng_state takes (tried, then this process's put back)."""
    before = rng_state()
    try:
        if not isinstance(rng, dict) or not isinstance(rng.get("python"), (list, tuple)) or len(rng["python"]) != 3:
            raise TypeError("not {python: [version, state, gauss], torch: tensor}")
        set_rng_state(rng)
    except (TypeError, ValueError, RuntimeError, KeyError, OverflowError) as e:
        raise CheckpointError(f"{where}: its RNG state cannot be restored ({lume.first_line(e)})") from None
    finally:
        set_rng_state(before)


PLAIN = ("scaler", "ref_logps", "track", "rng", "step", "optimizer", "param_groups", "world", "generators", "best")


def check_state(state: dict, where, shapes: dict | None = None, n_forget: int | None = None) -> None:
    """CheckpointError naming `where` unless the state holds what restore() and the run read from it,
    of the right types: scaler numbers, NPO's reference (one log-prob per forget item), the
    trajectory bookkeeping, a method's per-row state, and (shapes: {index: parameter shape}, the optimizer's
    parameters in order) torch's optimizer state with moments shaped like their parameters. A
    matching fingerprint says which run wrote the checkpoint; this says its files hold what such a
    run writes (a hand-made checkpoint can carry any fingerprint)."""
    def bad(why):
        raise CheckpointError(f"{where}: {why}: refused (not what LUME writes)")
    scaler, ref, track = state.get("scaler"), state.get("ref_logps"), state.get("track")
    if not isinstance(scaler, dict) or not all(_number(v) for v in scaler.values()):
        bad("scaler is not an object of numbers")
    if ref is not None and (not isinstance(ref, torch.Tensor) or ref.dim() != 1 or not ref.is_floating_point()
                            or (n_forget is not None and ref.numel() != n_forget)):
        bad(f"ref_logps is not {n_forget or 'N'} log-probs")
    if (not isinstance(track, dict) or not isinstance(track.get("rows"), list)
            or not all(isinstance(r, dict) and type(r.get("step")) is int for r in track["rows"])
            or not (track.get("best") is None or type(track["best"]) is int)):
        bad("track is not {rows: [{step, ...}], best: step or null}")
    for key, rows in state.items():  # a method's state (methods.Method.state): tensors, by name or by row
        if key not in PLAIN and isinstance(rows, dict) and not all(
                isinstance(k, str) and (v is None or isinstance(v, torch.Tensor)) for k, v in rows.items()):
            bad(f"{key} is not {{name or retain index: tensor}}")
    if shapes is None:
        return
    opt = state.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        bad("optimizer is not {state, param_groups}")
    listed = [i for g in opt["param_groups"] if isinstance(g, dict) and isinstance(g.get("params"), list)
              for i in g["params"]]
    if not all(type(i) is int for i in listed) or sorted(listed) != sorted(shapes):
        bad(f"the optimizer's param_groups do not list the {len(shapes)} trainable parameters")
    for i, entry in opt["state"].items():
        if i not in shapes or not isinstance(entry, dict):
            bad(f"optimizer state {i!r} is not that of a trainable parameter")
        for k, t in entry.items():
            if not isinstance(t, torch.Tensor) or (t.dim() and tuple(t.shape) != shapes[i]):
                bad(f"optimizer state {i}/{k} is not a tensor shaped {shapes[i]}")


def check_fits(got: dict, model, n_forget: int | None = None) -> None:
    """check_state and check_rng of a one-process checkpoint, and its weights (and --keep best's)
    named and shaped as the model's parameters: CheckpointError naming the file otherwise."""
    params = {n: tuple(local(p).shape) for n, p in model.named_parameters()}
    for key in ("weights", "best"):
        for name, t in (got[key] or {}).items():
            if params.get(name) != tuple(t.shape) or not t.is_floating_point():
                raise CheckpointError(f"{got['dir'] / (key + '.safetensors')}: {name} is {tuple(t.shape)} {t.dtype} "
                                      f"there, {params.get(name, 'not a parameter')} in the model: refused")
    names = [n for n in params if n in got["weights"]]  # the optimizer's order: model.parameters()'
    state = {**got["state"], "optimizer": got["optimizer"]}
    check_state(state, got["dir"] / "state.json", {i: params[n] for i, n in enumerate(names)}, n_forget)
    check_rng(got["state"].get("rng"), got["dir"] / "state.json")


def candidates(root: Path) -> list[Path]:
    """Checkpoint directories to try, newest first: latest.json's (confined; refused when it points
    elsewhere), then every other step directory by step."""
    named = []
    try:
        pointer = rundir.read_json(root.parent, "checkpoints/latest.json", limit=rundir.SMALL)
        name = pointer.get("dir")
    except rundir.BadFile:
        name = None  # unreadable pointer: the directories themselves are the truth
    if name is not None:
        named.append(confined(root, name))
    others = [confined(root, f"step-{s:06d}") for s in steps_on_disk(root)]
    return named + [p for p in others if p not in named]


def load(run_dir, fingerprint: dict | None = None, log=print, read=read) -> dict | None:
    """The newest checkpoint of run_dir that reads, or None when the run has none. A newer one that
    cannot be read is named in a note and the previous one is used; none readable, a mismatched
    fingerprint or a path outside the run: CheckpointError (one line: which file, what to do).
    Nothing is written or removed here."""
    root = root_of(run_dir)
    if not real_root(root):
        return None
    tried = []
    for where in candidates(root):
        try:
            got = read(where)
        except CheckpointError as e:
            tried.append(str(e))
            continue
        if tried:
            log(f"note: {'; '.join(tried)}: resuming from {where.name} instead")
        if fingerprint is not None:
            diff = identity.differences(got["fingerprint"] or {}, fingerprint)
            if diff:
                raise CheckpointError(f"{where} was saved by a different run: {'; '.join(diff)}. Refused: resume "
                                      "with the config.json, data and model it was saved with, or start a new --out")
        return got
    if tried:
        raise CheckpointError(f"no usable checkpoint in {root}: {'; '.join(tried)}. Start again with a new --out "
                              f"(or delete {root} to start this run over from step 0)")
    return None


# -----------------------------------------------------------------------------
# the run directory: one process at a time, a status that a full disk cannot stop, SIGTERM


# the lock and status.json live in rundir.py; these names stay for their callers (tiny.py, status.py)
Locked, hold_lock, lock_run, STATUS_BYTES, write_status = (rundir.Locked, rundir.hold_lock, rundir.lock_run,
                                                          rundir.STATUS_BYTES, rundir.write_status)


class Terminated(BaseException):
    """SIGTERM (a scheduler's preemption, `timeout`, `kill`): the run ends like Ctrl-C, exit 143."""


TERM = {"defer": False, "asked": False}  # defer: training with --save-every, stop at the next step


def on_sigterm(signum, frame) -> None:
    """Raise Terminated now, or with --save-every during training, note it: the step ends, a
    checkpoint is written (job.py), then Terminated. A second SIGTERM stops at once."""
    if TERM["defer"] and not TERM["asked"]:
        TERM["asked"] = True
        lume.print0("SIGTERM: finishing this step and writing a checkpoint, then stopping", file=sys.stderr)
        return
    raise Terminated("terminated (SIGTERM)")
