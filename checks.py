"""
Preflight: every mistake a user can make in a command line, found before any work.

    problems = checks.preflight(cfg)   # [] or one line per problem, each naming the flag / file / field

run.py prints each problem as `error: ...` and exits with status 2, before any model is loaded and
before the run directory is created, so a typo never costs a 7B evaluation and never leaves a
half-written directory behind. What is checked: numeric ranges, flag combinations, that the paths
exist and hold what they must (data, MIA and MMLU directories, a model directory's config and
weights, the run directory), the device, and whether a hub model can be reached at all (a few
seconds, instead of a minute of retries). The data files themselves are validated line by line
when they are read (data.py), still before any model work.
"""
import json
import math
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

import attacks
import lume
import methods

HUB_TIMEOUT = 5.0  # seconds to wait for the hub before saying it cannot be reached
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
DATA_KEYWORDS = ("auto", "builtin", "lume", "semeval")
MAX_STEPS = 200_000  # the plan (every step's batches) is built before training: bounded memory and time
BUILTIN_MAX_DOCS = 120  # data.builtin's word lists give ~150 documents per task and split; a margin


def under_torchrun() -> bool:
    """Started by torchrun with more than one process (WORLD_SIZE, which torchrun sets)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def range_problems(cfg) -> list[str]:
    """Numeric flags outside their range. Auto values are None here (resolved later), so a given 0
    is refused where 0 would mean nothing, instead of silently meaning "the default"."""
    rules = {  # name: (test, what it must be)
        "lr": (lambda v: v > 0 and v < 1, "> 0 and < 1"), "epochs": (lambda v: v > 0, "> 0"),
        "max_steps": (lambda v: 1 <= v <= MAX_STEPS, f">= 1 and <= {MAX_STEPS:,} (every step is planned up front)"),
        "n_docs": (lambda v: v >= 1, ">= 1"), "seed": (lambda v: 0 <= v < 2 ** 63, ">= 0 and < 2^63"),
        "batch_size": (lambda v: v >= 1, ">= 1"), "grad_accum": (lambda v: v >= 1, ">= 1"),
        "eval_batch_size": (lambda v: v >= 1, ">= 1"), "max_new_tokens": (lambda v: v >= 1, ">= 1"),
        "warmup": (lambda v: v >= 0, ">= 0"), "clip": (lambda v: v >= 0, ">= 0 (0 = off)"),
        "beta": (lambda v: v > 0, "> 0"), "retain_weight": (lambda v: v >= 0, ">= 0"),
        "mmlu_limit": (lambda v: v >= 0, ">= 0 (0 = all)"), "eval_every": (lambda v: v >= 0, ">= 0 (0 = never)"),
        "save_every": (lambda v: v >= 0, ">= 0 (0 = never)"), "rdzv_timeout": (lambda v: v > 0, "> 0"),
        "gamma": (lambda v: abs(v) < float("inf"), "finite"), "rmu_layer": (lambda v: v >= 0, ">= 0"),
        "rmu_coeff": (lambda v: v > 0, "> 0"), "chunk_size": (lambda v: v >= 0, ">= 0 (0 = the whole forget set)"),
        "retain_ratio": (lambda v: v >= 1, ">= 1 retain row per forget row"),
    }
    out = []
    for name, (ok, what) in rules.items():
        value = getattr(cfg, name, None)
        if value is not None and (value != value or not ok(value)):  # value != value: NaN
            out.append(f"{flag(name)} must be {what}, got {value}")
        elif isinstance(value, float) and math.isinf(value):
            out.append(f"{flag(name)} must be finite, got {value}")
    if cfg.n_docs and cfg.n_docs > BUILTIN_MAX_DOCS and (cfg.data == "builtin" or (cfg.data == "auto" and cfg.model == "tiny")):
        out.append(f"--n-docs {cfg.n_docs}: built-in data makes at most {BUILTIN_MAX_DOCS} documents per task and split")
    if cfg.warmup and cfg.max_steps and cfg.warmup >= cfg.max_steps:
        out.append(f"--warmup {cfg.warmup} is not shorter than --max-steps {cfg.max_steps}: the lr would never peak")
    return out


def combination_problems(cfg) -> list[str]:
    """Flags that make no sense together."""
    out = []
    if cfg.method == "none":
        for name in ("lr", "epochs", "max_steps", "beta", "gamma", "retain_weight", "rmu_layer", "rmu_coeff"):
            if getattr(cfg, name) is not None:
                out.append(f"{flag(name)} has no effect with --method none (nothing is trained)")
        for name in ("eval_every", "save_every"):
            if getattr(cfg, name):
                out.append(f"{flag(name)} has no effect with --method none (there are no training steps)")
        if not cfg.eval_before and not cfg.save:
            out.append("--no-eval-before with --method none would score nothing (add --save to export the target)")
    out += option_problems(cfg)
    own = cfg.method != "none" and methods.METHODS[cfg.method].own_params
    if own and (getattr(cfg, "lora_rank", 0) or getattr(cfg, "train_layers", 0)):
        out.append(f"--method {cfg.method} chooses its own trainable weights (no --lora-rank / --train-layers)")
    if cfg.keep == "best" and not cfg.eval_every:
        out.append("--keep best picks among the scored steps: give --eval-every N too")
    if cfg.epochs is not None and cfg.max_steps is not None:
        out.append("--epochs and --max-steps both given: --max-steps would silently win; give one")
    return out


def given(cfg, name: str) -> bool:
    """Whether a method option was given: not left at auto (None, or "auto" for a choice)."""
    return getattr(cfg, name, None) not in (None, "auto")


def option_problems(cfg) -> list[str]:
    """A method option given to a method that does not take it (each method's options and fields, in
    methods.METHODS), and the option values the method's own checks refuse (a NaN is range_problems')."""
    if cfg.method == "none":
        return []
    spec = methods.METHODS[cfg.method]
    used = set(spec.options.values()) | set(spec.fields)
    out = []
    if given(cfg, "retain_weight") and "retain_weight" not in used:
        out.append(f"--retain-weight: {cfg.method} has no retain term (use gd, kl or npo)")
    owners = {}  # option -> the methods that take it
    for name, m in methods.METHODS.items():
        for option in set(m.options.values()) | set(m.fields):
            owners.setdefault(option, []).append(m.title)
    for option, titles in owners.items():
        if option != "retain_weight" and given(cfg, option) and option not in used:
            out.append(f"{flag(option)} is {' and '.join(t + chr(39) + 's' for t in titles)}; "
                       f"--method {cfg.method} does not use it")
    return out + (spec.checks(cfg) if spec.checks else [])


def folder_problems(flag_name: str, value: str, keywords: tuple, needs: dict[str, str]) -> list[str]:
    """A directory given where a keyword could stand: it must exist and hold each entry of `needs`
    ({'file' or 'folder/': what to say when it is missing})."""
    if value in keywords:
        return []
    d = Path(value).expanduser()
    if not d.is_dir():
        return [f"{flag_name} {value}: no such directory (or use {', '.join(k for k in keywords if k)})"]
    return [f"{flag_name} {value}: {why}" for entry, why in needs.items()
            if not ((d / entry).is_dir() if entry.endswith("/") else (d / entry).is_file())]


def data_problems(cfg) -> list[str]:
    """Local data, MIA and MMLU directories that do not exist or do not hold what they must."""
    out = []
    if cfg.data not in DATA_KEYWORDS and not Path(cfg.data).expanduser().exists():
        out.append(f"--data {cfg.data}: no such file or directory (or use auto, builtin, lume, semeval)")
    out += folder_problems("--mia-data", cfg.mia_data, ("auto", "mia", "none", ""), {
        name: f"{name} missing (the MIA needs both member.jsonl and nonmember.jsonl)"
        for name in ("member.jsonl", "nonmember.jsonl")})
    out += folder_problems("--mmlu", cfg.mmlu, ("auto", "mmlu", "none", ""), {
        f"{split}/": f"no {split}/ directory of <subject>_{split}.csv files" for split in ("dev", "test")})
    return out


def is_local(name: str) -> bool:
    """A model name that names a directory (never sent to the hub), as lume.load_pretrained decides."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~"))


def model_problems(cfg) -> list[str]:
    """A local model directory must hold config.json, weights and a tokenizer; a hub id must look
    like one and be reachable (or in the local cache)."""
    if cfg.model == "tiny":
        return []
    repo, tok_repo = lume.resolve_model(cfg.model)
    if is_local(cfg.model):
        d = Path(cfg.model).expanduser()
        if not d.is_dir():
            return [f"--model {cfg.model}: no such directory"]
        out = []
        if not (d / "config.json").is_file():
            out.append(f"--model {cfg.model}: no config.json (not a directory written by save_pretrained)")
        else:
            out += json_object_problems(f"--model {cfg.model}", d / "config.json")
        out += [f"--model {cfg.model}: {why}" for f in sorted(d.glob("*.safetensors")) if (why := safetensors_problem(f))]
        if not any((d / f).is_file() for f in WEIGHT_FILES):
            out.append(f"--model {cfg.model}: no weights ({', '.join(WEIGHT_FILES[::2])})")
        if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            out.append(f"--model {cfg.model}: no tokenizer (tokenizer.json)")
        return out
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        return [f"--model {cfg.model}: not tiny, olmo-1b, olmo-7b, an existing directory or a hub id "
                "(owner/name)"]
    return hub_problems(cfg.model, [repo, tok_repo])


def json_object_problems(what: str, path: Path) -> list[str]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [f"{what}: {path.name} is not valid JSON ({lume.first_line(e)})"]
    return [] if isinstance(obj, dict) else [f"{what}: {path.name} is a JSON {type(obj).__name__}, not an object"]


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be whole (header unreadable, or shorter than its header says), or None."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n <= (100 << 20) else None
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"] if isinstance(header, dict) else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        ends = None
    if ends is None:
        return f"{path.name}: not a safetensors file (its header cannot be read)"
    size, need = path.stat().st_size, 8 + n + max(ends, default=0)
    return f"{path.name}: {size} bytes, its header needs {need} (truncated)" if size < need else None


def in_hub_cache(repo: str) -> bool:
    """Whether the hub's local cache already holds repo's config.json (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    hit = try_to_load_from_cache(repo, "config.json")
    return isinstance(hit, str) and os.path.isfile(hit)


def hub_reachable(timeout: float = HUB_TIMEOUT) -> str | None:
    """None when a TCP connection to the hub (HF_ENDPOINT) opens within timeout, else why not."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{host}:{port} cannot be reached within {timeout:.0f} s ({type(e).__name__}: {e})"


def hub_problems(name: str, repos: list[str]) -> list[str]:
    """An unreachable hub in one line, within seconds; HF_HUB_OFFLINE=1 means the local cache only.
    Reachable but cached: transformers goes on to check for updates itself."""
    cached = all(in_hub_cache(r) for r in dict.fromkeys(repos))
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        return [] if cached else [f"--model {name}: HF_HUB_OFFLINE is set and {', '.join(dict.fromkeys(repos))} "
                                  f"is not in the local hub cache. {lume.hub_fix(*repos)}"]
    why = hub_reachable()
    if why is None:
        return []
    if cached:  # use the cache without waiting on the network again
        os.environ["HF_HUB_OFFLINE"] = "1"
        return []
    return [f"--model {name}: the hub is unreachable ({why}) and the model is not in the local cache. "
            f"{lume.hub_fix(*repos)}"]


def device_problems(cfg) -> list[str]:
    if cfg.device in ("auto", "cpu"):
        return []
    try:
        dev = torch.device(cfg.device)
    except RuntimeError:
        return [f"--device {cfg.device}: not a device (auto, cpu, cuda, cuda:N)"]
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return [f"--device {cfg.device}: CUDA is not available on this machine (torch {torch.__version__}); "
                    "use --device cpu (or auto)"]
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return [f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA device(s)"]
    elif dev.type != "cpu":
        return [f"--device {cfg.device}: only cpu and cuda are supported"]
    return []


def out_problems(cfg) -> list[str]:
    """The run directory: a new one, never overwritten; the cache directory writable."""
    out = []
    if cfg.out and not cfg.resume:
        d = Path(cfg.out)
        if d.exists() and not d.is_dir():
            out.append(f"--out {cfg.out}: exists and is a file, not a directory; pass a new --out")
        elif d.exists() and any(d.iterdir()):
            out.append(f"--out {cfg.out}: exists and is not empty; pass a new --out (results are never "
                       "overwritten; --resume DIR continues a run)")
    run_dir = cfg.resume or cfg.out or "runs"
    if not out and not writable(Path(run_dir)):
        out.append(f"{'--resume' if cfg.resume else '--out'} {run_dir}: cannot be written (a read-only filesystem "
                   "or no permission); pass another --out")
    cache = Path(cfg.cache_dir).expanduser()
    blocking = next((p for p in [cache, *cache.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        out.append(f"--cache-dir {cfg.cache_dir}: {blocking} is a file, not a directory (set LUME_CACHE or "
                   "--cache-dir to a directory)")
    elif not writable(cache):
        out.append(f"--cache-dir {cfg.cache_dir}: not writable (set LUME_CACHE or --cache-dir to a writable "
                   "directory)")
    return out


def writable(d: Path) -> bool:
    """Whether d, or the nearest existing directory above it, can be written (a read-only mount says no
    even to root)."""
    d = d.expanduser().absolute()
    parent = next((p for p in [d, *d.parents] if p.exists()), None)
    return parent is not None and parent.is_dir() and os.access(parent, os.W_OK)


def trainable_problems(cfg) -> list[str]:
    """--lora-* and --train-layers (lora.py): ranges, one of the two, one process. --train-layers' upper
    bound (the model's layer count) and --lora-targets' names are checked once the model is loaded."""
    out = [f"--{name.replace('_', '-')} must be >= 0 and finite, got {getattr(cfg, name)}"
           for name in ("lora_rank", "lora_alpha", "train_layers") if not 0 <= getattr(cfg, name) < math.inf]
    if not 0 <= cfg.lora_dropout < 1:
        out.append(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.lora_rank and cfg.train_layers:
        out.append("--lora-rank and --train-layers choose what trains in two different ways: give one of them")
    if cfg.lora_rank and not [t for t in cfg.lora_targets.split(",") if t.strip()]:
        out.append("--lora-targets names no layer: give e.g. q_proj,v_proj")
    if cfg.train_layers and cfg.precision == "bf16-pure":
        out.append("--train-layers trains fp32 layers among bf16 ones, which needs autocast: use --precision bf16 "
                   "(the CUDA default) or fp32, not bf16-pure")
    return out


def attack_problems(cfg) -> list[str]:
    """--attacks: known names, none twice, an unlearned model to attack, the data each needs as far
    as the flags tell (the items themselves: attacks.input_problems, once read), and, under torchrun,
    only what was tested on shards: fine-tuning attacks on full-parameter runs (there the attacker's
    setup is the run's own: every weight already trains), quantisation without adapters."""
    try:
        asked = attacks.parse(cfg.attacks)
    except ValueError as e:
        return [f"--attacks {cfg.attacks!r}: {e}"]
    out = []
    if asked and cfg.method == "none":
        out.append("--attacks attacks an unlearned model: give an unlearning --method (not none)")
    if "unrelated" in asked and cfg.mia_data in ("none", ""):
        out.append(f"--attacks unrelated fine-tunes on the MIA non-member documents, and --mia-data {cfg.mia_data!r} "
                   "gives none: give --mia-data, or drop unrelated")
    if cfg.oracle and (cfg.method == "none" or under_torchrun() or (cfg.oracle == "tiny" and cfg.model != "tiny")):
        out.append("--oracle compares an unlearned model (a --method, not none) in one process (not torchrun); "
                   "--oracle tiny is the tiny target's oracle (--model tiny)")
    if asked and under_torchrun():
        own = cfg.method != "none" and methods.METHODS[cfg.method].own_params
        partial = own or getattr(cfg, "lora_rank", 0) or getattr(cfg, "train_layers", 0)
        single = [a for a in asked if a == "fewshot" or (partial and a in ("relearn", "unrelated"))
                  or (getattr(cfg, "lora_rank", 0) and a in ("quant8", "quant4"))
                  or a in ("nf4", "fp4", "int8-outlier")  # blocks / forwards across shards: untested
                  or (a == "relearn" and getattr(cfg, "relearn_grid", "auto") not in ("auto", "single"))]  # probes generate
        if single:
            out.append(f"--attacks {','.join(single)} is not supported under torchrun here (fewshot generates outside "
                       "the sharded loops; the full-weight attacker and LoRA's merge are tested on shards only for "
                       "full-parameter runs): run it in one process")
    return out


def preflight(cfg, resumed: bool = False) -> list[str]:
    """Every problem of cfg, in the order a user would fix them; [] when the run can start. A resumed
    run's config.json holds resolved values (no auto left), so its flag combinations are not judged."""
    problems = range_problems(cfg) + ([] if resumed else combination_problems(cfg))
    problems += trainable_problems(cfg) + attack_problems(cfg) + data_problems(cfg) + device_problems(cfg)
    problems += out_problems(cfg)
    if not problems:  # the hub check may take seconds: only for an otherwise valid command
        problems += model_problems(cfg)
    return problems


# -----------------------------------------------------------------------------
# once the data are read (job.main), before the rendezvous


def check_world(cfg, n: int) -> None:
    """Refuse before the rendezvous what cannot run: more ranks than forget items (a rank would never
    see one), fp16 under torchrun (FSDP would need a sharded GradScaler), a plan of over MAX_STEPS.
    n: the forget items of the task, once the data are read (after preflight)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and world > n:
        raise SystemExit(f"error: {world} ranks (WORLD_SIZE) but only {n} forget items for --task {cfg.task}: "
                         f"every rank needs at least one. Start at most {n} processes "
                         "(torchrun --nproc_per_node), or unlearn more items (--task all, more data).")
    size = min(cfg.chunk_size or n, n) or 1  # forget items per chunk (lume.plan_steps)
    per_chunk = cfg.max_steps or math.ceil((cfg.epochs or 0) * math.ceil(size / (cfg.batch_size * cfg.grad_accum)))
    steps = math.ceil(n / size) * per_chunk
    if cfg.method != "none" and steps > MAX_STEPS:  # planned up front: 10^8 steps would fill the memory
        raise SystemExit(f"error: this run would plan {steps:,} optimizer steps, more than {MAX_STEPS:,}: "
                         "lower --epochs or --max-steps")
    if world > 1 and cfg.precision == "fp16":
        raise SystemExit("error: --precision fp16 is not supported under torchrun (FSDP would need a "
                         "sharded GradScaler); use --precision bf16 or bf16-pure")
