"""
Training checkpoints under torchrun: every rank writes its own shards with torch.distributed.checkpoint
(DCP), as torchtitan and torchtune checkpoint FSDP2 runs; no gather to one rank.

    torchrun --nproc_per_node 8 run.py --task all --method npo --save-every 50 --out runs/a   # preempted...
    torchrun --nproc_per_node 8 run.py --resume runs/a                                       # ...continues

On disk, published by checkpoint.publish (manifest.json with every file's size and the run's
fingerprint, one atomic rename, latest.json, the last checkpoint.KEEP kept), as on one process:

    <run>/checkpoints/step-NNNNNN/
      dcp/.metadata, dcp/__R_0.distcp   DCP: the trainable parameters (model/<name>) and AdamW's tensors
                                        (optim/<name>/exp_avg, ...), each rank's shards in its own file
      state.json, state.safetensors     rank 0: what all ranks share (checkpoint.encode, no pickle):
                                        AdamW's param_groups, scaler, NPO's ref_logps, trajectory, world
      rank-R.json, rank-R.safetensors   rank R's own: its RNG states (bf16-pure's rounding generators
                                        too), --keep best's shards, RMU's frozen activations of the
                                        retain items rank R trains on

Resume (restore): the same world size loads every rank's shards back, bit for bit. Another world size
(or a one-process checkpoint under torchrun, or this layout in one process) reshards through DCP's
planner (model and optimizer), saying so in one line; --keep best's per-rank shards cannot be, and
such a checkpoint is refused in one line before training; RMU's per-rank cache is recomputed.

Safety: the .distcp files are read by DCP with torch.load and weights_only=True; .metadata is a pickle
DCP writes itself, read here by SafeReader with an unpickler that admits only DCP's metadata
classes, torch.Size, dtypes, layouts and paths (none of which runs code), and refuses any entry
stored as pickled bytes (every value saved here is a tensor: param_groups go to state.json).
Everything is read from inside the checkpoint directory (checkpoint.read_manifest confines it).
"""
import json
import os
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

import checkpoint
from checkpoint import CheckpointError

# -----------------------------------------------------------------------------
# DCP's .metadata without arbitrary unpickling


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only DCP's metadata dataclasses and a few plain torch/pathlib
    types; anything else (BytesStorageMetadata included: pickled objects) raises."""
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
    METADATA = ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")

    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in self.ALLOWED or dtype or (
                module == "torch.distributed.checkpoint.metadata" and name in self.METADATA):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a tensor-only DCP checkpoint")


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata goes through SafeUnpickler (DCP's own uses pickle.load)."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = SafeUnpickler(f).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{path}: refused ({e})") from None
        from torch.distributed.checkpoint.metadata import StorageMeta
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# -----------------------------------------------------------------------------
# what is saved: trainable parameters and AdamW's tensors (DTensor shards under FSDP2)


def trainable_names(model) -> list[str]:
    """The parameters that train, in model.parameters() order (lume.train's optimizer order)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def model_state(model) -> dict:
    """get_model_state_dict of the trainable parameters only (frozen ones are the target's)."""
    keep = set(trainable_names(model))
    return {k: v for k, v in get_model_state_dict(model).items() if k in keep}


def optim_state(model, opt) -> tuple[dict, list]:
    """(AdamW's per-parameter tensors keyed by parameter name, param_groups): DCP takes the first,
    state.json the second (plain numbers)."""
    osd = get_optimizer_state_dict(model, opt)
    return osd["state"], osd["param_groups"]


def write_pair(where: Path, name: str, obj) -> None:
    """<name>.json and <name>.safetensors: checkpoint.encode's JSON and its tensors."""
    tensors = {}
    plain = checkpoint.encode(obj, tensors)
    save_file(tensors, str(where / f"{name}.safetensors"))
    (where / f"{name}.json").write_text(json.dumps(plain) + "\n")


def read_pair(where: Path, name: str):
    try:
        plain = json.loads((where / f"{name}.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where / f'{name}.json'}: cannot be read ({e})") from None
    return checkpoint.decode(plain, checkpoint._tensors(where / f"{name}.safetensors"))


def save(run_dir, step: int, model, opt, shared: dict, mine: dict, fingerprint, dist) -> Path:
    """Checkpoint `step` written by every rank (a collective: all ranks call it at the same step
    boundary). shared: rank 0's state (scaler, ref_logps, track); mine: this rank's (best, rmu)."""
    msd, (ost, groups) = model_state(model), optim_state(model, opt)
    # bf16-pure: StochasticAdamW's rounding generators (per rank: each rounds its own shards)
    generators = {d: g.get_state() for d, g in getattr(opt, "generators", {}).items()}

    def fill(tmp: Path):  # every rank: its own file, then DCP's collective save (which waits for all)
        write_pair(tmp, f"rank-{dist.rank}", {**mine, "rng": checkpoint.rng_state(), "generators": generators})
        if dist.rank == 0:
            write_pair(tmp, "state", {**shared, "param_groups": groups, "step": step, "world": dist.world})
        dcp.save({"model": msd, "optim": ost}, storage_writer=FileSystemWriter(str(tmp / "dcp")))

    box = [None]
    if dist.rank == 0:
        def write(tmp):
            tdist.broadcast_object_list([str(tmp)], src=0)
            fill(tmp)
        try:
            box = [(str(checkpoint.publish(run_dir, step, write, fingerprint)), None)]
        except Exception as e:  # the others wait below: tell them
            box = [(None, f"{type(e).__name__}: {e}")]
    else:
        where = [None]
        tdist.broadcast_object_list(where, src=0)
        fill(Path(where[0]))
    tdist.broadcast_object_list(box, src=0)
    if box[0][1] is not None:
        raise RuntimeError(f"checkpoint at step {step} failed on rank 0: {box[0][1]}")
    return Path(box[0][0])


# -----------------------------------------------------------------------------
# reading (checkpoint.load's read=) and restoring


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def read(where: Path) -> dict:
    """A checkpoint directory of either layout, for checkpoint.load(read=read). One process's layout:
    checkpoint.read plus layout 'single'. DCP's: rank 0's shared state, this rank's own part (None
    when this world size has no such rank), the DCP metadata checked with SafeReader; the tensors
    are loaded by restore() once the optimizer exists."""
    manifest = checkpoint.read_manifest(where)
    if "dcp/.metadata" not in manifest["files"]:
        return {**checkpoint.read(where), "layout": "single", "world": 1}
    state = read_pair(where, "state")
    mine = read_pair(where, f"rank-{rank()}") if f"rank-{rank()}.json" in manifest["files"] else None
    SafeReader(str(where / "dcp")).read_metadata()  # refused now, before any training, if unsafe
    same = state["world"] == int(os.environ.get("WORLD_SIZE", "1"))
    best = (mine or {}).get("best") if same else None
    return {"layout": "dcp", "dir": where, "step": manifest["step"], "fingerprint": manifest["fingerprint"],
            "state": state, "mine": mine if same else None, "world": state["world"], "best": best,
            "weights": None, "optimizer": None}


def check(got: dict, fp: dict | None, method: str, log) -> None:
    """The fingerprint check with world size apart: another world size reshards (one line says so),
    unless --keep best's per-rank shards would be needed: CheckpointError. (RMU's per-rank cache is
    then recomputed from the target, which the model still is when unlearn() builds RMU's options.)"""
    if fp is None:
        return
    saved = dict(got["fingerprint"] or {})
    world = saved.get("world_size", got["world"])
    diff = checkpoint.differences({**saved, "world_size": fp["world_size"]}, fp)
    if diff:
        raise CheckpointError(f"{got['dir']} was saved by a different run: {'; '.join(diff)}. Refused: resume "
                              "with the config.json, data and model it was saved with, or start a new --out")
    if world == fp["world_size"]:
        return
    if got["state"].get("track", {}).get("best") is not None:
        raise CheckpointError(f"{got['dir']} holds --keep best's weights as {world} ranks' shards: resume it on "
                              f"{world} process(es) (torchrun --nproc_per_node {world}, or python run.py for 1)")
    log(f"note: resuming a checkpoint of {world} process(es) on {fp['world_size']}: the shards are resharded, "
        "and results may differ from an uninterrupted run in the last digits (summation order)")


def restore(model, opt, scaler, got: dict, dist=None) -> None:
    """Load a checkpoint (read()) into the model, the optimizer (which lume.train has just made) and
    the scaler, on every rank; this rank's RNG states when the world size is the saved one."""
    names = trainable_names(model)
    if got["layout"] == "single":  # one process's full tensors: each rank takes its shards
        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, got["weights"], options=full)
        osd = got["optimizer"]  # torch's state_dict: parameters by index in `names` order
        by_name = {"state": {names[int(i)]: s for i, s in osd["state"].items()},
                   "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in osd["param_groups"]]}
        set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))
        rng = got["state"]["rng"] if dist is None else None
    else:
        msd, (ost, _) = model_state(model), optim_state(model, opt)
        with warnings.catch_warnings():  # one process: "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": msd, "optim": ost}, storage_reader=SafeReader(str(got["dir"] / "dcp")))
        set_model_state_dict(model, msd, options=StateDictOptions(strict=False))
        set_optimizer_state_dict(model, opt, {"state": ost, "param_groups": got["state"]["param_groups"]})
        rng = got["mine"]["rng"] if got["mine"] else None
        for d, state in (got["mine"] or {}).get("generators", {}).items():
            opt.generator(d).set_state(state)
    scaler.load_state_dict(got["state"]["scaler"])
    if rng is not None:
        checkpoint.set_rng_state(rng)


# -----------------------------------------------------------------------------
# a method's per-retain-item state (methods.Method.state "retain rows", e.g. RMU's frozen-activation
# cache): each rank keeps the entries of the retain items it trains on


def rows_of(values: list, steps) -> dict:
    """{str(retain index): value} of the retain rows in `steps` (this rank's micro-batches; all of
    them in one process), entries that are None left out."""
    rows = {j for micros in steps for _, r in micros if r is not None for j in r.idx.tolist()}
    return {str(j): values[j] for j in sorted(rows) if values[j] is not None}


def rows_state(resume: dict, key: str, n: int) -> list | None:
    """rows_of's dict under `key` of a checkpoint back as a list of n entries (None where absent):
    this rank's part (DCP layout) or the whole (one process's); None when the checkpoint has none
    (another world size: prepare recomputes it)."""
    part = (resume.get("mine") or {}).get(key) if resume.get("layout") == "dcp" else resume["state"].get(key)
    if part is None:
        return None
    out = [None] * n
    for j, t in part.items():
        out[int(j)] = t
    return out
