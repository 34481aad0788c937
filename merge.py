"""
Merge models that share a base: TIES (Yadav et al. 2023, "TIES-Merging: Resolving Interference
When Merging Models", NeurIPS 2023, arXiv 2306.01708), PEFT's factor-wise TIES of LoRA adapters
(what ZJUKLAB ran) or linear task arithmetic (Ilharco et al. 2023, arXiv 2212.04089), the baseline.

    python merge.py --base BASE --method ties --density 0.2 --lambda 1.0 --out DIR A B ...
    python merge.py --base olmo-7b --method peft-ties --density 0.8 --out DIR RUN1/adapter RUN2/adapter
    python merge.py --base BASE --method linear --weights 1,0.5 --out DIR A B
    python run.py --method none --model DIR ...        # score the merged model

BASE is what run.py's --model takes: an alias (olmo-7b, olmo-1b), a hub id (its snapshot in the
local Hugging Face cache, downloaded if it is not there and the hub is reachable) or a
save_pretrained directory. Each of A, B, ... is a save_pretrained directory of the same architecture
or a PEFT LoRA adapter directory (a run's <out>/adapter, lora.py), whose task vector is (alpha/r) B A
on each adapted weight (alpha/sqrt(r) with rsLoRA) and 0 elsewhere; an adapter records its base as
the hub id it was trained from or a directory, and either must be BASE. DIR is a new save_pretrained
directory (one model.safetensors in the base's dtypes, the base's config, and the tokenizer: the
base's files, or for a hub target that ships none, the one run.py loads for it), written atomically.

Task vectors tau_i = theta_i - theta_base, weighted by w_i (--weights, default 1 each). TIES, eq. 1-3
of the paper, for each parameter entry p:
    trim      keep the top-k magnitudes of each tau_i (k = ceil(density * n)), zero the rest
    elect     gamma_p = sign(sum_i trimmed_i[p])                     (the summed mass's sign)
    merge     tau_m[p] = sum_{i in A_p} w_i tau_i[p] / sum_{i in A_p} w_i,
              A_p = {i : sign(tau_i[p]) = gamma_p}                   (the disjoint mean)
    out       theta[p] = theta_base[p] + lambda * tau_m[p]
An entry whose summed mass is exactly 0 (or that every model trims away) keeps the base's value.
Linear: theta = theta_base + lambda * sum_i w_i tau_i. k is an exact integer: density is read as the
decimal it is written as (0.07 of 100 entries keeps 7, not the 8 that ceil(0.07 * 100.0) gives).

peft-ties (adapters only): PEFT's add_weighted_adapter(..., combination_type="ties") runs TIES on
the adapters' factors, not on their products: A_m = TIES_f({A_i}, sqrt(w_i s_i)), B_m = TIES_f({B_i},
sqrt(w_i s_i)) (s_i = alpha_i / r_i), and tau = B_m A_m, cross terms B_i A_j included. TIES_f is
PEFT's variant: keep floor(density * n) entries of each factor, elect the sign of the unweighted sum
(+ where it is 0), average the agreeing weighted entries over their count. docs/methods.md measures
how far it is from TIES on the full deltas.

Trim granularity: the paper keeps the top-k% of each task vector over ALL its parameters; here the
top-k% is taken per parameter tensor. One pass, one parameter of each model in memory at a time
(a 7B merge fits in host RAM), and every tensor keeps `density` of its own entries, so a layer whose
task vector is small overall (an embedding, a norm) is not trimmed to nothing by the large ones.
The two coincide at density 1 and for a model of one tensor; at density < 1 they differ in which
entries survive (docs/methods.md).

Bad input (different architectures, keys or shapes, an adapter whose base is not BASE, a base that
is neither a directory nor in the hub cache and the hub unreachable, a density outside (0, 1], a
weight count that does not match) is one `error:` line naming the model and the parameter, exit 2,
before anything is written. A full model records no base: for it, the architecture, the keys and
the shapes are what is checked.
"""
import argparse
import json
import math
import shutil
import struct
import sys
from fractions import Fraction
from pathlib import Path

import torch
from safetensors import safe_open

import lume
import rundir

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
METHODS = ("ties", "peft-ties", "linear")


class MergeError(Exception):
    """Bad input: printed as one `error:` line (exit 2)."""


# -----------------------------------------------------------------------------
# reading: one tensor at a time


class Weights:
    """The tensors of a save_pretrained directory (one safetensors file or an index of shards),
    read one at a time through safe_open (memory-mapped: nothing else is loaded)."""

    def __init__(self, path: Path):
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = read_json(index).get("weight_map")
            if not isinstance(shards, dict) or not all(isinstance(v, str) and "/" not in v and v not in (".", "..")
                                                       for v in shards.values()):
                raise MergeError(f"{index}: weight_map is not {{parameter: file name in {path}}}")
        elif (path / "model.safetensors").is_file():
            with opened(path / "model.safetensors") as f:
                shards = {k: "model.safetensors" for k in f.keys()}
        else:
            raise MergeError(f"{path}: no model.safetensors (nor an index of shards); merge.py reads "
                             "save_pretrained directories with safetensors weights, or PEFT adapters")
        self.file_of, self.handles = shards, {}

    def keys(self) -> list[str]:
        return list(self.file_of)

    def handle(self, key: str):
        name = self.file_of[key]
        if name not in self.handles:
            self.handles[name] = opened(self.path / name)
        return self.handles[name]

    def meta(self, key: str) -> tuple[list[int], str]:
        """(shape, safetensors dtype name) without reading the tensor."""
        s = self.handle(key).get_slice(key)
        return list(s.get_shape()), s.get_dtype()

    def get(self, key: str) -> torch.Tensor:
        return self.handle(key).get_tensor(key)


class Adapter:
    """A PEFT LoRA adapter directory: task vector (alpha/r) B A on each adapted weight, 0 elsewhere."""

    def __init__(self, path: Path):
        self.path = path
        self.config = c = read_json(path / "adapter_config.json")
        if c.get("peft_type", "LORA") != "LORA" or c.get("use_dora") or c.get("rank_pattern") or c.get("alpha_pattern"):
            raise MergeError(f"{path}: only plain LoRA adapters merge here (no DoRA, rank_pattern or alpha_pattern)")
        r, alpha = c.get("r"), c.get("lora_alpha")
        if type(r) is not int or r <= 0 or type(alpha) not in (int, float) or not math.isfinite(alpha):
            raise MergeError(f"{path / 'adapter_config.json'}: r {r!r} and lora_alpha {alpha!r}: a rank > 0 and a number")
        self.scale = alpha / (math.sqrt(r) if c.get("use_rslora") else r)
        self.file = opened(path / "adapter_model.safetensors")
        self.modules = {}  # base weight key -> (A key, B key)
        for key in self.file.keys():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                self.modules[name + ".weight"] = (key, key.replace(".lora_A.", ".lora_B."))

    def delta(self, key: str, like: torch.Tensor) -> torch.Tensor | None:
        """(alpha/r) B A for base weight `key` (fp32, like's shape), or None if it is not adapted."""
        if key not in self.modules:
            return None
        a, b = (self.file.get_tensor(k).float() for k in self.modules[key])  # (r, in), (out, r)
        return self.scale * (b @ a)  # shapes checked by open_inputs


def read_json(path: Path) -> dict:
    """A JSON object file of an input directory; MergeError naming it when it is not one. Links are
    followed (a hub snapshot's files are links into its blobs; these are inputs, not a run directory
    that --resume writes into), but only to a regular file, read with the run files' size bound."""
    try:
        real = path.resolve(strict=True)
        if not real.is_file():  # a FIFO, a device or a directory: never opened
            raise MergeError(f"{path}: not a regular file")
        with open(real, "rb") as f:
            data = f.read(rundir.JSON_LIMIT + 1)
        if len(data) > rundir.JSON_LIMIT:
            raise MergeError(f"{path}: larger than {rundir.JSON_LIMIT:,} bytes")
        return rundir.parse_json(data, path, dict)
    except OSError as e:
        raise MergeError(f"{path}: cannot be read ({e.strerror or e})") from None
    except rundir.BadFile as e:
        raise MergeError(str(e)) from None


def opened(path: Path):
    """safe_open of a safetensors file of an input; MergeError naming it when it cannot be read."""
    try:
        return safe_open(str(path), "pt")
    except Exception as e:  # safetensors' own error type: a damaged header, not a safetensors file
        raise MergeError(f"{path}: not a readable safetensors file ({lume.first_line(e)})") from None


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def same_base(named: str, base: Path, names=()) -> bool:
    """Whether an adapter's base_model_name_or_path names the directory `base`: that directory, one of
    `names` (the alias or hub id --base was given as), or a hub id whose cached snapshot is `base`."""
    p = Path(named).expanduser()
    if named.rstrip("/") in names or named.rstrip("/") == str(base).rstrip("/"):
        return True
    if p.exists():
        return p.resolve() == base.resolve()
    snap = cached_snapshot(named)
    return snap is not None and snap.resolve() == base.resolve()


def cached_snapshot(repo: str) -> Path | None:
    """The local Hugging Face cache's snapshot directory of a hub repo (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(repo, "config.json")
    except (ImportError, ValueError):  # ValueError: not a repo id
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def resolve_base(name: str) -> tuple[Path, tuple[str, ...], str | None]:
    """(the base's directory, the names an adapter may record for it, where its tokenizer loads
    from) for what run.py's --model takes: a directory as it is; an alias or a hub id through
    lume.resolve_model to its snapshot in the local hub cache, downloaded when absent (the hub must
    be reachable: HF_HUB_OFFLINE=1 means the cache only)."""
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return Path(name).expanduser(), (name,), None  # its tokenizer files are copied as they are
    repo, tok_repo = lume.resolve_model(name)
    snap = cached_snapshot(repo)
    if snap is None:
        try:
            from huggingface_hub import snapshot_download
            snap = Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as e:  # offline, unreachable, gated, no such repo: all one line
            raise MergeError(f"--base {name}: {repo} is not in the local hub cache and cannot be downloaded "
                             f"({lume.first_line(e)}). {lume.hub_fix(repo, tok_repo)}") from None
    return snap, (name, repo), tok_repo


# -----------------------------------------------------------------------------
# checks: everything before anything is written


def open_inputs(base_dir: str, model_dirs: list[str], names=()):
    """(base Weights, [Weights | Adapter]) with every architecture, key, shape and base checked;
    names: what else an adapter may call the base (resolve_base)."""
    base_path = Path(base_dir)
    if not (base_path / "config.json").is_file():
        raise MergeError(f"--base {base_dir}: no config.json (not a save_pretrained directory)")
    base = Weights(base_path)
    base_cfg = read_json(base_path / "config.json")
    base_meta = {k: base.meta(k) for k in base.keys()}
    models = []
    for d in model_dirs:
        path = Path(d)
        if not path.is_dir():
            raise MergeError(f"{d}: no such directory")
        if is_adapter(path):
            m = Adapter(path)
            named = m.config.get("base_model_name_or_path") or ""
            if not same_base(named, base_path, names):
                raise MergeError(f"{d}: an adapter of base {named!r}, not of --base {base_dir}")
            for key, (a, b) in m.modules.items():
                if key not in base_meta:
                    raise MergeError(f"{d}: parameter {key} is adapted but the base has no such weight")
                ab = [m.file.get_slice(b).get_shape()[0], m.file.get_slice(a).get_shape()[1]]
                if ab != base_meta[key][0]:
                    raise MergeError(f"{d}: parameter {key}: the adapter's B A is {ab[0]} x {ab[1]}, the "
                                     f"base's weight {base_meta[key][0][0]} x {base_meta[key][0][1]}")
            models.append(m)
            continue
        if not (path / "config.json").is_file():
            raise MergeError(f"{d}: neither a save_pretrained directory (config.json) nor an adapter "
                             "(adapter_config.json)")
        cfg = read_json(path / "config.json")
        for field in ("model_type", "architectures"):
            if cfg.get(field) != base_cfg.get(field):
                raise MergeError(f"{d}: {field} {cfg.get(field)} differs from the base's {base_cfg.get(field)}")
        m = Weights(path)
        keys = set(m.keys())
        for key in sorted(set(base_meta) ^ keys):
            where = "the base" if key in base_meta else d
            raise MergeError(f"{d}: parameter {key} is only in {where}")
        for key, (shape, _) in base_meta.items():
            if m.meta(key)[0] != shape:
                raise MergeError(f"{d}: parameter {key} has shape {m.meta(key)[0]}, the base's is {shape}")
        models.append(m)
    return base, models


def task_vector(model, key: str, base_t: torch.Tensor) -> torch.Tensor:
    """tau = theta_model - theta_base for one parameter (fp64, like base_t); an adapter's (alpha/r) B A or 0."""
    if isinstance(model, Adapter):
        d = model.delta(key, base_t)
        return torch.zeros_like(base_t) if d is None else d.to(base_t.dtype)
    return model.get(key).to(base_t.dtype) - base_t


# -----------------------------------------------------------------------------
# the merges, one parameter at a time


def keep_count(density: float, n: int, rounding=math.ceil) -> int:
    """How many of n entries a trim keeps, an exact integer: density is read as the decimal it is
    written as (str: the shortest repr), so 0.07 of 100 is 7, where ceil(0.07 * 100) in floating
    point is ceil(7.000000000000001) = 8."""
    return int(rounding(Fraction(str(density)) * n))


def trim(tau: torch.Tensor, density: float, k: int | None = None) -> torch.Tensor:
    """tau with all but its k = ceil(density * numel) largest magnitudes set to 0 (ties broken by
    position, as torch.topk does: exactly k entries survive)."""
    k = keep_count(density, tau.numel()) if k is None else k
    if k >= tau.numel():
        return tau
    flat = tau.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return (flat * keep).view_as(tau)


def ties(taus: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """The TIES task vector of one parameter: trim, elect the sign of the summed mass, disjoint mean."""
    t = torch.stack([w * trim(tau, density) for tau, w in zip(taus, weights)])  # (n, *shape)
    sign = torch.sign(t.sum(0))  # (shape) gamma_p; 0 where the mass cancels
    agree = (torch.sign(t) == sign) & (t != 0)  # (n, *shape) i in A_p
    w = torch.tensor(weights, dtype=t.dtype).view(-1, *[1] * (t.dim() - 1))
    return (t * agree).sum(0) / (w * agree).sum(0).clamp(min=1e-300) * agree.any(0)


def ties_factor(factors: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """PEFT's TIES of one LoRA factor (peft.utils.merge_utils.ties, majority_sign_method "total"):
    keep floor(density * n) magnitudes of each factor (all at density 1), elect the sign of the
    UNweighted trimmed sum (+ where it is 0), then the weighted agreeing entries summed and divided
    by their count (not by their weights, as the paper's disjoint mean does)."""
    t = torch.stack([trim(f, density, keep_count(density, f.numel(), math.floor)) if density < 1 else f
                     for f in factors])  # (n, *shape)
    sign = torch.where(t.sum(0) >= 0, 1.0, -1.0).to(t.dtype)  # (shape)
    agree = torch.sign(t) == sign  # (n, *shape); a trimmed (zero) entry never agrees
    w = torch.tensor(weights, dtype=t.dtype).view(-1, *[1] * (t.dim() - 1))
    return (t * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def peft_ties(adapters: list, key: str, weights: list[float], density: float) -> torch.Tensor | None:
    """The factor-wise TIES delta of one weight (fp64), as PEFT's add_weighted_adapter(...,
    combination_type="ties") and merge_and_unload give it: A_m = ties_factor({A_i}, sqrt(w_i s_i)),
    B_m = ties_factor({B_i}, sqrt(w_i s_i)) (the sign of w_i s_i on A's side), delta = B_m A_m (the
    merged adapter's scaling is 1). Only the adapters that adapt `key` take part; None if none does."""
    pairs = [(m, w * m.scale) for m, w in zip(adapters, weights) if key in m.modules]
    if not pairs:
        return None
    a = [m.file.get_tensor(m.modules[key][0]).double() for m, _ in pairs]  # (r, in) each
    b = [m.file.get_tensor(m.modules[key][1]).double() for m, _ in pairs]  # (out, r) each
    root = [math.sqrt(abs(ws)) for _, ws in pairs]
    a_m = ties_factor(a, [math.copysign(r, ws) for r, (_, ws) in zip(root, pairs)], density)  # (r, in)
    return ties_factor(b, root, density) @ a_m  # (out, r) @ (r, in)


def linear(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Task arithmetic: sum_i w_i tau_i."""
    return sum(w * tau for tau, w in zip(taus, weights))


def merge_one(key: str, base, models, method: str, weights, density: float, lam: float) -> torch.Tensor:
    """The merged value of one parameter, in the base's dtype: only this parameter of each model is
    read (their tensors are freed when this returns)."""
    base_t = base.get(key)
    if not base_t.is_floating_point():  # integer buffers: the base's
        return base_t
    # fp64: the difference of two fp32 (or bf16) values is exact in it, so base + tau gives a model
    # back bit for bit (a model merged with itself at density 1, lambda 1 returns it)
    b = base_t.double()
    if method == "peft-ties":
        tau = peft_ties(models, key, weights, density)
        return base_t if tau is None else (b + lam * tau).to(base_t.dtype)
    taus = [task_vector(m, key, b) for m in models]
    tau = ties(taus, weights, density) if method == "ties" else linear(taus, weights)
    return (b + lam * tau).to(base_t.dtype)


# -----------------------------------------------------------------------------
# writing: a safetensors file streamed tensor by tensor


def write_streaming(path: Path, specs: list[tuple[str, list[int], str]], produce) -> None:
    """One safetensors file holding specs' tensors (key, shape, dtype name) in order, produce(key)
    giving each in turn: the header is written first (shapes and dtypes are known), then each
    tensor's bytes, so no more than one tensor is held (the format: an 8-byte little-endian header
    length, the JSON header padded with spaces to a multiple of 8, then the data)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype in specs:
        n = math.prod(shape) * torch.empty(0, dtype=DTYPES[dtype]).element_size()
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype in specs:
            t = produce(key)
            assert list(t.shape) == shape and NAMES[t.dtype] == dtype, f"{key}: {t.shape} {t.dtype} != {shape} {dtype}"
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def merge(base_dir: str, model_dirs: list[str], out: str, method: str = "ties", density: float = 0.2,
          lam: float = 1.0, weights: list[float] | None = None, log=print) -> Path:
    """Merge model_dirs over base_dir into the new directory `out` (see the module docstring)."""
    weights = weights or [1.0] * len(model_dirs)
    problems = arg_problems(model_dirs, out, method, density, lam, weights)
    if problems:
        raise MergeError(problems[0])
    base_path, names, tok_source = resolve_base(base_dir)
    base, models = open_inputs(str(base_path), model_dirs, names)
    if method == "peft-ties":
        adapter_problems(models, model_dirs)
    specs = [(k, *base.meta(k)) for k in base.keys()]

    def write(tmp: Path):
        tmp.mkdir()  # a failure inside leaves only this .tmp directory, never `out`
        for f in base_path.iterdir():  # config, generation config, tokenizer: the base's (a snapshot's links followed)
            if f.is_file() and f.name not in ("lume_target.json", "merge.json") and not f.name.startswith(
                    ("model.safetensors", "model-", "pytorch_model")):
                shutil.copy2(f, tmp / f.name)
        if tok_source and not any((tmp / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            save_tokenizer(tok_source, tmp)  # a hub target ships none: the one run.py loads for it
        write_streaming(tmp / "model.safetensors", specs,
                        lambda key: merge_one(key, base, models, method, weights, density, lam))
        (tmp / "merge.json").write_text(json.dumps({
            "method": method, "density": density if "ties" in method else None, "lambda": lam,
            "weights": weights, "base": str(base_dir), "base_path": str(base_path), "models": list(model_dirs),
            "trim": {"ties": "per parameter tensor", "peft-ties": "per LoRA factor"}.get(method)}, indent=2) + "\n")
    rundir.write_atomic(Path(out), write)
    log(f"merged {len(models)} models ({method}) over {base_dir}: {len(specs)} parameters -> {out}")
    return Path(out)


def save_tokenizer(source: str, where: Path) -> None:
    """The tokenizer run.py loads for the base (lume.resolve_model's), saved into `where`."""
    from transformers import AutoTokenizer
    try:
        AutoTokenizer.from_pretrained(source).save_pretrained(where)
    except (OSError, ValueError) as e:
        raise MergeError(f"the base has no tokenizer and {source} cannot be loaded ({lume.first_line(e)}). "
                         f"{lume.hub_fix(source)}") from None


def adapter_problems(models, model_dirs) -> None:
    """peft-ties merges LoRA factors: every model an adapter, all of one rank (PEFT stacks them)."""
    for m, d in zip(models, model_dirs):
        if not isinstance(m, Adapter):
            raise MergeError(f"{d}: --method peft-ties merges LoRA adapters (adapter_config.json), not full models")
    ranks = {m.config["r"] for m in models}
    if len(ranks) > 1:
        raise MergeError(f"--method peft-ties: the adapters have ranks {sorted(ranks)}; PEFT's factor-wise TIES needs one")


def arg_problems(model_dirs, out, method, density, lam, weights) -> list[str]:
    """The command line's own mistakes, before any file is opened."""
    out_problems = []
    if method not in METHODS:
        out_problems.append(f"--method {method}: {', '.join(METHODS)}")
    if not model_dirs:
        out_problems.append("give at least one model to merge (A B ...)")
    if not (density == density and 0 < density <= 1):
        out_problems.append(f"--density must be in (0, 1], got {density}")
    if not math.isfinite(lam):
        out_problems.append(f"--lambda must be finite, got {lam}")
    if len(weights) != len(model_dirs):
        out_problems.append(f"--weights gives {len(weights)} weights for {len(model_dirs)} models")
    elif not all(math.isfinite(w) for w in weights) or (method == "ties" and not all(w > 0 for w in weights)):
        out_problems.append(f"--weights {weights}: finite, and > 0 for ties (its disjoint mean divides by them)")
    if Path(out).exists():
        out_problems.append(f"--out {out}: exists; pass a new directory (a merge never overwrites)")
    return out_problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("models", nargs="+", help="save_pretrained directories or PEFT adapter directories")
    p.add_argument("--base", required=True, help="what every model was trained from, as run.py's --model takes it: "
                   "olmo-7b, olmo-1b, a hub id (its local cache snapshot) or a save_pretrained directory")
    p.add_argument("--method", default="ties", choices=METHODS, help="ties: TIES on each full task vector; peft-ties: "
                   "PEFT's TIES on the LoRA factors (ZJUKLAB's); linear: task arithmetic")
    p.add_argument("--density", type=float, default=0.2, help="TIES: fraction of each task vector kept, in (0, 1]")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="scale of the merged task vector")
    p.add_argument("--weights", default="", help="comma-separated weight of each model (default: 1 each)")
    p.add_argument("--out", required=True, help="the new save_pretrained directory")
    a = p.parse_args(argv)
    try:
        weights = [float(w) for w in a.weights.split(",")] if a.weights else None
    except ValueError:
        print(f"error: --weights {a.weights!r}: comma-separated numbers, one per model", file=sys.stderr)
        return 2
    try:
        merge(a.base, a.models, a.out, a.method, a.density, a.lam, weights)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
