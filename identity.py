"""
What a run's checkpoints depend on: the fingerprint that --resume compares, field by field, with
the run's own before it continues from a checkpoint (checkpoint.load, sharded.check).

    fp = identity.fingerprint(dataclasses.asdict(cfg), items, identity.model_identity(path), 1, "fp32", ...)

Fields:
  config.<field>  every run.py Config field except NOT_FINGERPRINTED (where the run is written, how
                  often it checkpoints, which device, cache and timeouts: nothing that changes a number)
  precision       the resolved training precision (fp32, bf16, fp16, bf16-pure)
  data_sha256     sha256 of every item (id, split, task, input, output) in order: data_sha256()
  model           model_identity(model.name_or_path): tiny -> its cache fingerprint; a hub id -> the
                  snapshot commit of the local hub cache; a local directory -> the sha256 of config.json
                  and every weight file (a hub-cache blob's name is its sha256: not re-read), by content,
                  so a moved directory still fits
  tokenizer       tokenizer_identity(tok): its definition and special ids, whatever files it came from
  mia_sha256, mmlu_sha256   the MIA documents and MMLU questions scored (contents_sha256)
  world_size      processes that trained it (torchrun's WORLD_SIZE; 1 without torchrun)

"""
import dataclasses
import hashlib
import json
import re
from pathlib import Path

# Config fields that change no number of the run (everything else is in the fingerprint)
NOT_FINGERPRINTED = ("out", "resume", "save_every", "save", "device", "cache_dir", "rdzv_timeout")


def data_sha256(items) -> str:
    """sha256 of the items in order (what training and scoring read of the data)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, it.split, it.task, it.input, it.output]).encode())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
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
            _IDENTITY[key] = {"sha256": {p.name: file_sha256(p) for p in files}}
    return dict(_IDENTITY[key])


def tokenizer_identity(tok) -> str:
    """sha256 of what the tokenizer does: its whole definition (a fast tokenizer's vocabulary, merges,
    normalizer and added tokens: backend_tokenizer.to_str()) and its special ids (pad, EOS, BOS, ...),
    whatever files it came from."""
    special = {k: getattr(tok, k, None) for k in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id")}
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(json.dumps([body, special, getattr(tok, "padding_side", None)]).encode()).hexdigest()


def contents_sha256(mia, mmlu) -> dict:
    """sha256 of the MIA documents ({'member', 'nonmember'} of data.MiaDoc) and of the MMLU questions
    ((dev, test) of {subject: [data.MmluQuestion]}) the run scores; None for what it does not have."""
    def digest(obj):
        return hashlib.sha256(json.dumps(obj, default=lambda o: dataclasses.astuple(o)).encode()).hexdigest()
    return {"mia_sha256": None if mia is None else digest(mia), "mmlu_sha256": None if mmlu is None else digest(mmlu)}


def fingerprint(config: dict, items, model: dict, world_size: int, precision: str, tokenizer: str | None = None,
                contents: dict | None = None) -> dict:
    """The fingerprint of a run (see the module docstring): config = dataclasses.asdict(cfg), model =
    model_identity(...), tokenizer = tokenizer_identity(tok), contents = contents_sha256(mia, mmlu).
    Plain JSON types only, compared field by field by differences()."""
    kept = {k: v for k, v in sorted(config.items()) if k not in NOT_FINGERPRINTED}
    return {"config": kept, "precision": precision, "data_sha256": data_sha256(items), "model": model,
            "tokenizer": tokenizer, **(contents or {}), "world_size": world_size}


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
