"""
Training checkpoints that a killed run resumes from, bit for bit.

    python run.py --task 1 --method npo --save-every 20 --out runs/a   # killed at any moment...
    python run.py --resume runs/a                                     # ...continues, same results.json

A checkpoint holds what the rest of the run depends on: the trainable weights (safetensors), the
optimizer and GradScaler states, every RNG state, the step, the plan (data order), NPO's reference
log-probs, and the trajectory and best-step bookkeeping. Frozen weights are not saved: they are the
target's, reloaded on resume.

On disk, <run>/checkpoints/step-NNNNNN/ is written in a temporary directory and renamed whole, then
<run>/checkpoints/latest.json (itself written atomically) names it, then older ones are removed. A
kill at any moment leaves either the previous checkpoint or the new one named by latest.json, never
a half-written one that a resume would read.
"""
import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import lume


def rng_state() -> dict:
    """Every RNG the run draws from: Python's, torch's CPU and (when present) CUDA generators."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
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
    assert not missing and not unknown, f"checkpoint does not fit the model: missing {missing[:3]}, unknown {unknown[:3]}"
    with torch.no_grad():
        for name, w in weights.items():
            local(params[name]).copy_(w)


def save(run_dir, step: int, weights: dict, optimizer: dict, state: dict, best: dict | None = None) -> Path:
    """Write checkpoint `step` (steps done) atomically, point latest.json at it, drop older ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"

    def write(tmp):
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save({**state, "rng": rng_state(), "step": step}, tmp / "state.pt")
    if (root / name).exists():  # the same step again (a resumed run re-saving it): replace it
        shutil.rmtree(root / name)
    lume.write_atomic(root / name, write)
    lume.write_json_atomic(root / "latest.json", {"step": step, "dir": name})
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def load(run_dir) -> dict | None:
    """The checkpoint latest.json names ({'weights', 'optimizer', 'state', 'best', 'step'}), or None
    when the run has none yet. Leftover temporary directories of a killed save are ignored."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest.json"
    if not pointer.is_file():
        return None
    where = root / json.loads(pointer.read_text())["dir"]
    state = torch.load(where / "state.pt", weights_only=False)  # our own file: RNG states are tuples
    best = load_file(str(where / "best.safetensors")) if (where / "best.safetensors").is_file() else None
    return {"weights": load_file(str(where / "weights.safetensors")), "best": best,
            "optimizer": torch.load(where / "optimizer.pt", weights_only=True), "state": state,
            "step": state["step"]}
