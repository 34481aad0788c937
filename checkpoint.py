"""
Training checkpoints that a killed run resumes from, bit for bit, and that are as safe to resume
from a downloaded run directory as a safetensors file is to load: nothing in them is pickled.

    python run.py --task 1 --method npo --save-every 20 --out runs/a   # killed at any moment...
    python run.py --resume runs/a                                     # ...continues, same results.json

A checkpoint holds what the rest of the run depends on: the trainable weights, the optimizer and
GradScaler states, every RNG state, the step, NPO's reference log-probs, and the trajectory and
best-step bookkeeping. Frozen weights are not saved: they are the target's, reloaded on resume.

On disk (FORMAT 2):

    <run>/checkpoints/
      latest.json                 {"format": 2, "step": 6, "dir": "step-000006", "previous": "step-000003"}
      step-000006/                the newest checkpoint; the one before it is kept too (KEEP = 2)
        manifest.json             {"format", "step", "fingerprint", "files": {relative path: bytes}}
        weights.safetensors       trainable parameters by name
        best.safetensors          --keep best: the best step's trainable parameters (absent otherwise)
        state.safetensors         every tensor of the state below, keyed by its path ("optimizer/state/0/exp_avg")
        state.json                the state's structure in plain JSON, each tensor a {"__tensor__": key}:
                                  optimizer (torch's state_dict), scaler, rng (Python's as lists, torch's
                                  as uint8 tensors), ref_logps, track, step
      .step-000009.<pid>-<random>.tmp/   a save in progress (or killed): never read, removed by the next save/load

A save fills a fresh temporary directory (its name unique per attempt), writes manifest.json last,
renames it whole to step-NNNNNN, then rewrites latest.json (atomically) and removes all but the
newest KEEP checkpoints. A kill at any moment leaves complete checkpoints only.

Loading (load) never unpickles: JSON and safetensors only. Every path it reads is resolved inside
<run>/checkpoints/ (confined): latest.json may only name a direct child called step-<digits>, and no
file of a checkpoint may resolve (symlinks followed) outside it; anything else is refused with one
line (CheckpointError). It tries the newest checkpoint first (latest.json's, then the others by
step); one that fails to read (missing or truncated file, bad JSON, sizes that differ from its
manifest) is named by file and the previous one is used, with a note; when none can be read, one
line says so and what to do.

The fingerprint (fingerprint()) is what a checkpoint's numbers depend on; --resume refuses a
checkpoint whose fingerprint differs from the run's, naming every differing field:
  config.<field>  every run.py Config field except NOT_FINGERPRINTED (where the run is written, how
                  often it checkpoints, which device, cache and timeouts: nothing that changes a number)
  precision       the resolved training precision (fp32, bf16, fp16, bf16-pure)
  data_sha256     sha256 of every item (id, split, task, input, output) in order: data_sha256()
  model           model_identity(model.name_or_path): tiny -> its cache fingerprint; a hub id -> the
                  snapshot commit of the local hub cache; a local directory -> the sha256 of config.json
                  and every weight file (a hub-cache blob's name is its sha256: not re-read), by content,
                  so a moved directory still fits
  world_size      processes that trained it (torchrun's WORLD_SIZE; 1 without torchrun)

Sharded (DCP) checkpoints under torchrun build on publish(): it gives a temporary directory inside
<run>/checkpoints/ to fill, records every file and the fingerprint in manifest.json, publishes it
under its step and keeps the last KEEP; load(read=...) falls back across checkpoints with any reader.
"""
import hashlib
import json
import os
import random
import re
import secrets
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import lume

FORMAT = 2
KEEP = 2  # checkpoints kept: the newest and the one before it, the fallback when the newest cannot be read
STEP_DIR = re.compile(r"step-(\d{6,})")
# Config fields that change no number of the run (everything else is in the fingerprint)
NOT_FINGERPRINTED = ("out", "resume", "save_every", "save", "device", "cache_dir", "rdzv_timeout")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: its one-line message says which file and what to do."""


# -----------------------------------------------------------------------------
# what a checkpoint depends on: the fingerprint


def data_sha256(items) -> str:
    """sha256 of the items in order (what training and scoring read of the data)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, it.split, it.task, it.input, it.output]).encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    target = path.resolve()
    if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name  # the hub cache names a large file's blob by its sha256
    h = hashlib.sha256()
    with open(target, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


_IDENTITY: dict = {}  # path -> identity: a 7B directory is hashed once per process


def model_identity(name_or_path: str) -> dict:
    """What the model is (model.name_or_path): a directory by content, not by where it lies --
    {'tiny': its cache fingerprint}, {'revision': a hub snapshot's commit} or {'sha256': {file: digest}
    of config.json and the weights}; a hub id -> {'hub': id, 'revision': the commit of the snapshot
    the local hub cache holds (no network), or None}."""
    where = Path(name_or_path).expanduser()
    if not where.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache
            hit = try_to_load_from_cache(name_or_path, "config.json")
        except (ImportError, ValueError):
            hit = None
        return {"hub": name_or_path, "revision": Path(hit).parent.name if isinstance(hit, str) else None}
    key = str(where.resolve())
    if key not in _IDENTITY:
        tiny = re.fullmatch(r"tiny-([0-9a-f]{16})", where.name)
        if tiny:
            _IDENTITY[key] = {"tiny": tiny.group(1)}
        elif where.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", where.name):
            _IDENTITY[key] = {"revision": where.name}
        else:
            files = sorted(p for p in where.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
            _IDENTITY[key] = {"sha256": {p.name: _file_sha256(p) for p in files}}
    return dict(_IDENTITY[key])


def fingerprint(config: dict, items, model: dict, world_size: int, precision: str) -> dict:
    """The fingerprint of a run (see the module docstring): config = dataclasses.asdict(cfg), model =
    model_identity(...). Plain JSON types only, compared field by field by differences()."""
    kept = {k: v for k, v in sorted(config.items()) if k not in NOT_FINGERPRINTED}
    return {"config": kept, "precision": precision, "data_sha256": data_sha256(items), "model": model,
            "world_size": world_size}


def _flat(fp: dict) -> dict:
    out = {}
    for key, value in fp.items():
        if key == "config":
            out.update({f"config.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def differences(saved: dict, now: dict) -> list[str]:
    """'field: checkpoint X, this run Y' for every field that differs (config fields by flag name)."""
    a, b = _flat(saved), _flat(now)
    return [f"{k.replace('config.', '--').replace('_', '-') if k.startswith('config.') else k}: "
            f"checkpoint {a.get(k)!r}, this run {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


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


def confined(root: Path, name: str) -> Path:
    """root/name when name is a step directory directly inside root (symlinks resolved), else
    CheckpointError: a run directory never makes a resume read anything outside it."""
    if not isinstance(name, str) or not STEP_DIR.fullmatch(name):
        raise CheckpointError(f"{root / 'latest.json'} names {name!r}, not a step-NNNNNN directory inside "
                              f"{root}: refused (a checkpoint never points outside its run)")
    where = root / name
    if where.resolve().parent != root.resolve():
        raise CheckpointError(f"{where} resolves to {where.resolve()}, outside {root}: refused (a checkpoint "
                              "never points outside its run)")
    return where


def clean_temporary(root: Path, keep: Path | None = None) -> None:
    """Remove what killed saves left: '.step-*.tmp' (this format) and 'step-*.tmp<pid>' (the old one).
    Safe: the run-directory lock (job.py) means no other process saves here."""
    for p in root.glob("*"):
        if p != keep and (re.fullmatch(r"\.step-\d+\..*\.tmp", p.name) or re.fullmatch(r"step-\d+\.tmp.*", p.name)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def steps_on_disk(root: Path) -> list[int]:
    """Steps of the step-NNNNNN directories under root, newest first."""
    return sorted((int(m.group(1)) for p in root.glob("step-*") if (m := STEP_DIR.fullmatch(p.name))), reverse=True)


def publish(run_dir, step: int, write, fingerprint: dict | None) -> Path:
    """write(tmp) fills a fresh temporary directory inside <run>/checkpoints/; then manifest.json
    (every file's size, the fingerprint) is written, the directory renamed to step-NNNNNN (replacing
    one of the same step), latest.json pointed at it, and all but the newest KEEP removed."""
    root = root_of(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    clean_temporary(root)
    name = f"step-{step:06d}"
    tmp = root / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir()
        write(tmp)
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        lume.write_json_atomic(tmp / "manifest.json", {"format": FORMAT, "step": step, "fingerprint": fingerprint,
                                                       "files": files})
        if (root / name).exists():  # the same step again (a resumed run re-saving it): swap it out
            old = root / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
            os.rename(root / name, old)
            os.rename(tmp, root / name)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    steps = steps_on_disk(root)
    previous = next((f"step-{s:06d}" for s in steps if s < step), None)
    lume.write_json_atomic(root / "latest.json", {"format": FORMAT, "step": step, "dir": name, "previous": previous})
    for s in steps:
        if s != step and f"step-{s:06d}" != previous:
            shutil.rmtree(root / f"step-{s:06d}", ignore_errors=True)
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
    return publish(run_dir, step, write, fingerprint)


# -----------------------------------------------------------------------------
# reading: newest readable first, each file named when it cannot be read


def read_manifest(where: Path) -> dict:
    """where's manifest.json, after checking every file it lists is inside where with its recorded
    size; CheckpointError naming the file otherwise."""
    path = where / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        files, step = manifest["files"], int(manifest["step"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a checkpoint manifest ({lume.first_line(e)})") from None
    if manifest.get("format") != FORMAT or f"step-{step:06d}" != where.name:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, step {step} (expected format {FORMAT} "
                              f"and {where.name})")
    for rel, size in files.items():
        f = where / rel
        if where.resolve() not in f.resolve().parents:
            raise CheckpointError(f"{f}: resolves outside {where}: refused")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, {size} when saved (truncated or changed)")
    return manifest


def _tensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' own error type: a damaged header or data
        raise CheckpointError(f"{path}: cannot be read ({lume.first_line(e)})") from None


def read(where: Path) -> dict:
    """One checkpoint directory -> {'weights', 'optimizer', 'state', 'best', 'step', 'fingerprint', 'dir'}."""
    manifest = read_manifest(where)
    try:
        plain = json.loads((where / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where / 'state.json'}: cannot be read ({lume.first_line(e)})") from None
    try:
        state = decode(plain, _tensors(where / "state.safetensors"))
        optimizer = state.pop("optimizer")
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where / 'state.json'}: does not match state.safetensors ({lume.first_line(e)})") from None
    best = _tensors(where / "best.safetensors") if "best.safetensors" in manifest["files"] else None
    return {"weights": _tensors(where / "weights.safetensors"), "best": best, "optimizer": optimizer,
            "state": state, "step": manifest["step"], "fingerprint": manifest["fingerprint"], "dir": where}


def candidates(root: Path) -> list[Path]:
    """Checkpoint directories to try, newest first: latest.json's (confined; refused when it points
    elsewhere), then every other step directory by step."""
    named = []
    pointer = root / "latest.json"
    if pointer.is_file():
        try:
            name = json.loads(pointer.read_text())["dir"]
        except (OSError, ValueError, KeyError, TypeError):
            name = None  # unreadable pointer: the directories themselves are the truth
        if name is not None:
            named.append(confined(root, name))
    others = [confined(root, f"step-{s:06d}") for s in steps_on_disk(root)]
    return named + [p for p in others if p not in named]


def load(run_dir, fingerprint: dict | None = None, log=print, read=read) -> dict | None:
    """The newest checkpoint of run_dir that reads, or None when the run has none. A newer one that
    cannot be read is named in a note and the previous one is used; none readable, a mismatched
    fingerprint or a path outside the run: CheckpointError (one line: which file, what to do)."""
    root = root_of(run_dir)
    if not root.is_dir():
        return None
    clean_temporary(root)
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
            diff = differences(got["fingerprint"] or {}, fingerprint)
            if diff:
                raise CheckpointError(f"{where} was saved by a different run: {'; '.join(diff)}. Refused: resume "
                                      "with the config.json, data and model it was saved with, or start a new --out")
        return got
    if tried:
        raise CheckpointError(f"no usable checkpoint in {root}: {'; '.join(tried)}. Start again with a new --out "
                              f"(or delete {root} to start this run over from step 0)")
    return None
