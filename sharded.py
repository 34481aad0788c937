"""
Training checkpoints under torchrun: every rank writes its own shards with torch.distributed.checkpoint
(DCP), as torchtitan and torchtune checkpoint FSDP2 runs; no gather to one rank.

    torchrun --nproc_per_node 8 run.py --task all --method npo --save-every 50 --out runs/a   # preempted...
    torchrun --nproc_per_node 8 run.py --resume runs/a                                       # ...continues

On disk, published by checkpoint.publish (manifest.json with every file's size and the run's
fingerprint, one atomic rename, latest.json, the last checkpoint.KEEP kept), as on one process:

    <run>/checkpoints/step-NNNNNN/
      dcp/.metadata.json, dcp/__R_0.distcp   DCP's metadata (JSON) and shards (safetensors): the
                                        trainable parameters (model/<name>) and AdamW's tensors
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

Safety: nothing of a checkpoint is unpickled and no torch.load runs. The shards are safetensors
(FileSystemWriter's SAFETENSORS format), read by Reader from the checkpoint's own files; DCP's
metadata, a pickle in DCP's own layout, is written by Writer as plain JSON (META) and rebuilt by
metadata_of from checked plain values (dtypes by name, integer sizes, every shard a plain
__R_N.distcp name). Every file is listed with its sha256 in manifest.json and opened through
rundir.open_in (checkpoint.read_manifest): a regular file inside the checkpoint, no link followed.
"""
import json
import os
import re
import warnings
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import SerializationFormat, _StorageInfo
from torch.futures import Future
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

import checkpoint
import identity
from checkpoint import CheckpointError

# -----------------------------------------------------------------------------
# DCP's metadata as plain JSON, its shards as safetensors: nothing of a checkpoint is unpickled

META = ".metadata.json"  # beside the shards, instead of DCP's pickled .metadata
SHARD = re.compile(r"__\d{1,6}_\d{1,6}\.distcp")  # the names FileSystemWriter gives the shards


class Writer(FileSystemWriter):
    """FileSystemWriter with its shards in safetensors and its metadata as JSON (META), not a pickle."""

    def __init__(self, path):
        super().__init__(path, serialization_format=SerializationFormat.SAFETENSORS)

    def finish(self, metadata, results) -> None:
        storage = [{"fqn": wr.index.fqn, "offset": list(wr.index.offset or []), "index": wr.index.index,
                    "file": wr.storage_data.relative_path} for rs in results for wr in rs]
        tensors = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):  # every value saved here is a tensor
                raise TypeError(f"{fqn}: only tensors go into a sharded checkpoint (param_groups go to state.json)")
            tensors[fqn] = {"dtype": str(md.properties.dtype).removeprefix("torch."), "size": list(md.size),
                            "chunks": [[list(c.offsets), list(c.sizes)] for c in md.chunks]}
        plan = {k: list(v) for k, v in (metadata.planner_data or {}).items()}
        path = Path(self.path) / META
        path.write_text(json.dumps({"version": 1, "tensors": tensors, "planner_data": plan, "storage": storage}) + "\n")


def _ints(v, n=None) -> bool:
    return isinstance(v, list) and all(type(x) is int and 0 <= x < 1 << 40 for x in v) and (n is None or len(v) == n)


def metadata_of(plain, path: Path) -> Metadata:
    """DCP's Metadata rebuilt from META's plain values, each checked: known dtypes, integer sizes,
    chunks inside their tensor, every shard a plain file name of this checkpoint."""
    def bad(why):
        raise CheckpointError(f"{path}: {why}: refused")
    if not isinstance(plain, dict) or plain.get("version") != 1:
        bad("not a sharded checkpoint's metadata (version 1)")
    tensors, plan, storage = plain.get("tensors"), plain.get("planner_data"), plain.get("storage")
    if not isinstance(tensors, dict) or not isinstance(plan, dict) or not isinstance(storage, list):
        bad("tensors, planner_data or storage missing or of the wrong type")
    sdm = {}
    for fqn, t in tensors.items():
        dtype = getattr(torch, t.get("dtype", ""), None) if isinstance(t, dict) and isinstance(t.get("dtype"), str) else None
        if not isinstance(dtype, torch.dtype) or not _ints(t.get("size")) or not isinstance(t.get("chunks"), list):
            bad(f"tensor {fqn!r} is not {{dtype, size, chunks}}")
        chunks = []
        for c in t["chunks"]:
            n = len(t["size"])
            if not (isinstance(c, list) and len(c) == 2 and _ints(c[0], n) and _ints(c[1], n)
                    and all(o + s <= full for o, s, full in zip(c[0], c[1], t["size"]))):
                bad(f"tensor {fqn!r} has a chunk outside its size")
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(c[0]), sizes=torch.Size(c[1])))
        sdm[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(t["size"]), chunks)
    if not all(isinstance(v, list) and all(isinstance(x, (str, int)) for x in v) for v in plan.values()):
        bad("planner_data is not {key: [path]}")
    data = {}
    for rec in storage:
        if not (isinstance(rec, dict) and rec.get("fqn") in sdm and _ints(rec.get("offset"))
                and (rec.get("index") is None or type(rec["index"]) is int)
                and isinstance(rec.get("file"), str) and SHARD.fullmatch(rec["file"])):
            bad(f"a storage entry is not {{fqn, offset, index, file: __R_N.distcp}}: {str(rec)[:80]}")
        data[MetadataIndex(rec["fqn"], rec["offset"], rec["index"])] = _StorageInfo(rec["file"], 0, 0)
    return Metadata(state_dict_metadata=sdm, planner_data={k: tuple(v) for k, v in plan.items()}, storage_data=data,
                    storage_meta=StorageMeta(), version="1.0.0")


class Reader(FileSystemReader):
    """FileSystemReader of a Writer's checkpoint <step>/dcp: the metadata from META (JSON), each shard
    a safetensors file of the checkpoint's manifest (sha256-checked by checkpoint.read_manifest),
    opened through checkpoint.tensors_of (no link followed), each tensor checked against the chunk
    it fills. No pickle and no torch.load."""

    def __init__(self, where: Path, files: dict):
        super().__init__(str(where / "dcp"))
        self.where, self.files = where, files  # files: the manifest's, each sha256-checked

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self.where / "dcp" / META
        meta = metadata_of(checkpoint.json_of(self.where, f"dcp/{META}"), path)
        meta.storage_meta.load_id = self.load_id
        return meta

    def read_data(self, plan, planner):
        shards = {}
        for req in plan.items:
            file = self.storage_data[req.storage_index].relative_path
            if file not in shards:
                checkpoint.listed({"files": self.files}, self.where, f"dcp/{file}")
                shards[file] = checkpoint.tensors_of(self.where, f"dcp/{file}")
            fqn = req.storage_index.fqn
            saved = shards[file].get(fqn)
            if saved is None:
                raise CheckpointError(f"{self.where / 'dcp' / file}: has no {fqn}: refused")
            try:
                tensor = saved
                for dim, (at, n) in enumerate(zip(req.storage_offsets, req.lengths, strict=True)):
                    tensor = tensor.narrow(dim, at, n)
                target = planner.resolve_tensor(req).detach()
                if target.size() != tensor.size():
                    raise ValueError(f"{tuple(tensor.size())} there, {tuple(target.size())} here")
            except (ValueError, IndexError, RuntimeError) as e:
                raise CheckpointError(f"{self.where / 'dcp' / file}: {fqn} does not fit ({e}): refused") from None
            target.copy_(tensor)
            planner.commit_tensor(req, target)
        fut = Future()
        fut.set_result(None)
        return fut


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
    """checkpoint.decode of <name>.json and <name>.safetensors (both checked by read_manifest)."""
    plain = checkpoint.json_of(where, f"{name}.json")
    try:
        obj = checkpoint.decode(plain, checkpoint.tensors_of(where, f"{name}.safetensors"))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{where / f'{name}.json'}: does not match {name}.safetensors ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where / f'{name}.json'}: not an object")
    return obj


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
        dcp.save({"model": msd, "optim": ost}, storage_writer=Writer(str(tmp / "dcp")))

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
    when this world size has no such rank), the DCP metadata (Reader: JSON, checked); the tensors
    are loaded by restore() once the optimizer exists."""
    manifest = checkpoint.read_manifest(where)
    if f"dcp/{META}" not in manifest["files"]:
        return {**checkpoint.read(where, manifest), "layout": "single", "world": 1}
    mine_listed = f"rank-{rank()}.json" in manifest["files"]
    checkpoint.listed(manifest, where, "state.json", "state.safetensors",
                      *([f"rank-{rank()}.safetensors"] if mine_listed else []))
    state = read_pair(where, "state")
    mine = read_pair(where, f"rank-{rank()}") if mine_listed else None
    meta = Reader(where, manifest["files"]).read_metadata()  # refused now, before any training, if it does not hold
    checkpoint.listed(manifest, where, *sorted({f"dcp/{i.relative_path}" for i in meta.storage_data.values()}))
    world = state.get("world")
    if type(world) is not int or not 1 <= world <= 1 << 16 or state.get("step") != manifest["step"]:
        raise CheckpointError(f"{where / 'state.json'}: world {world!r}, step {state.get('step')!r}: not the state "
                              f"of step {manifest['step']}")
    if not isinstance(state.get("param_groups"), list) or not all(isinstance(g, dict) for g in state["param_groups"]):
        raise CheckpointError(f"{where / 'state.json'}: param_groups is not a list of objects")
    checkpoint.check_state(state, where / "state.json")
    same = world == int(os.environ.get("WORLD_SIZE", "1"))
    if mine is not None and same:
        checkpoint.check_state({**state, **mine}, where / f"rank-{rank()}.json")
        checkpoint.check_rng(mine.get("rng"), where / f"rank-{rank()}.json")
    best = (mine or {}).get("best") if same else None
    return {"layout": "dcp", "dir": where, "step": manifest["step"], "fingerprint": manifest["fingerprint"],
            "state": state, "mine": mine if same else None, "world": world, "best": best,
            "weights": None, "optimizer": None, "metadata": meta, "files": manifest["files"]}


def fits(got: dict, model, n_forget: int | None = None) -> None:
    """CheckpointError unless the checkpoint fits the model: checkpoint.check_fits (one process's
    layout), or every trainable parameter and its AdamW moments in DCP's metadata at the parameter's
    full shape, and NPO's reference one log-prob per forget item."""
    if got["layout"] == "single":
        return checkpoint.check_fits(got, model, n_forget)
    checkpoint.check_state(got["state"], got["dir"] / "state.json", None, n_forget)
    tensors = got["metadata"].state_dict_metadata
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for key in (f"model.{name}", f"optim.{name}.exp_avg", f"optim.{name}.exp_avg_sq"):
            md = tensors.get(key)
            if md is not None and tuple(md.size) != tuple(p.shape):
                raise CheckpointError(f"{got['dir'] / 'dcp' / META}: {key} is {tuple(md.size)} there, "
                                      f"{tuple(p.shape)} in the model: refused")


def check(got: dict, fp: dict | None, method: str, log) -> None:
    """The fingerprint check with world size apart: another world size reshards (one line says so),
    unless --keep best's per-rank shards would be needed: CheckpointError. (RMU's per-rank cache is
    then recomputed from the target, which the model still is when unlearn() builds RMU's options.)"""
    if fp is None:
        return
    saved = dict(got["fingerprint"] or {})
    world = saved.get("world_size", got["world"])
    diff = identity.differences({**saved, "world_size": fp["world_size"]}, fp)
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
            try:
                dcp.load({"model": msd, "optim": ost}, storage_reader=Reader(got["dir"], got["files"]))
            except Exception as e:  # DCP wraps a rank's error (Reader's CheckpointError) in its own
                inner = next(iter(getattr(e, "failures", {}).values()), None)
                inner = getattr(inner, "exception", inner)
                if isinstance(inner, CheckpointError):
                    raise CheckpointError(str(inner)) from None
                raise
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
        if not (isinstance(j, str) and j.isdigit() and len(j) < 10) or int(j) >= n:  # checkpoint.check_state took the keys as digits: the range is checked here
            raise CheckpointError(f"{resume['dir']}: its {key} names retain item {j}, but there are {n}: refused")
        out[int(j)] = t
    return out
