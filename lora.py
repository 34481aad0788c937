"""
Which parameters train: LoRA adapters over a frozen base, or only the last K decoder layers.

    python run.py --task 1 --method npo --lora-rank 8       # adapters on q,k,v,o,gate,up,down
    python run.py --task 1 --method npo --train-layers 2    # the last 2 decoder layers only

LoRA (Hu et al. 2021, arXiv 2106.09685, eq. 3) replaces each targeted nn.Linear's forward by
    y = W x + b + (alpha / r) * B A dropout(x),    W (out, in) frozen, A (r, in), B (out, r)
with A Kaiming-uniform and B zeros, so at initialisation the model computes exactly the base's
logits. The base stays in its loaded dtype (bf16 on CUDA); A and B, and so their AdamW states, are
fp32. The LoRA layer subclasses nn.Linear and keeps `weight`/`bias` where HF expects them, so the
state dict's base keys are unchanged and the adapter keys are `<module>.lora_A.weight` and
`<module>.lora_B.weight`, PEFT's names without its adapter name. KL's reference is the same model
under adapters_off (no second copy); NPO's cached reference log-probs are taken before any update.
On disk (save): <out>/model, the merged weights W + (alpha/r) B A as a save_pretrained checkpoint,
and <out>/adapter in PEFT's format (adapter_config.json, adapter_model.safetensors), so that
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "<out>/adapter")
loads it. Last-k (the SemEval-2025 winner, AILS-NTUA, trained the last 8 of 32 layers): every
parameter frozen in the training dtype, the last K decoder layers trained with fp32 weights.
"""
import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import rundir

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


# -----------------------------------------------------------------------------
# the LoRA layer


class LoRALinear(nn.Linear):
    """An nn.Linear (its own frozen weight and bias) plus a trainable low-rank update:
    forward(x) = F.linear(x, W, b) + scale * lora_B(lora_A(dropout(x))), scale = alpha / r."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        with torch.device("meta"):  # no throwaway weight: the base's Parameters are taken over below
            super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # U(-1/sqrt(in), 1/sqrt(in)), as PEFT
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the update B A is 0, the base's output exactly
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # a float, not an nn.Dropout: lume.disable_dropout zeroes nn.Dropout modules (the target's own
        # dropout); --lora-dropout is the user's explicit choice for the adapter path and is kept
        self.lora_dropout = dropout
        self.adapters_on = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if not self.adapters_on:
            return y
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        # fp32 adapters over a bf16 input without autocast (bf16-pure): run the adapter path in the
        # adapters' dtype (under autocast the matmuls still run in bf16), add it in y's dtype
        delta = self.lora_B(self.lora_A(h.to(self.lora_A.weight.dtype))) * self.scale  # (..., out)
        return y + delta.to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, computed in fp32, in W's dtype and device: (out, in)."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (out, r) @ (r, in)
        return (self.weight.float() + self.scale * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, alpha={self.alpha}, dropout={self.lora_dropout}"


def lora_modules(model) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} of the model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_adapters(model) -> bool:
    return bool(lora_modules(model))


def add_lora(model, rank: int, alpha: float, targets, dropout: float = 0.0):
    """Freeze every parameter of the model and wrap each nn.Linear whose attribute name is in
    `targets` (e.g. q_proj) in a LoRALinear with fp32 adapters; in place, returns the model."""
    assert rank >= 1, f"--lora-rank must be >= 1 here, got {rank}"
    targets = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    model.requires_grad_(False)
    found = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and name.rpartition(".")[2] in targets]
    missing = sorted(set(targets) - {name.rpartition(".")[2] for name in found})
    if missing:
        linears = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise SystemExit(f"error: --lora-targets: no nn.Linear named {', '.join(missing)} in "
                         f"{type(model).__name__}; its linear layers are named {', '.join(linears)}")
    for name in found:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        layer = LoRALinear(getattr(owner, leaf), rank, alpha, dropout)
        setattr(owner, leaf, layer.train(owner.training))  # a new module would be in train mode (dropout on)
    return model


@contextlib.contextmanager
def adapters_off(model):
    """The model computing its base's outputs (every adapter skipped), restored on exit."""
    mods = list(lora_modules(model).values())
    before = [m.adapters_on for m in mods]
    for m in mods:
        m.adapters_on = False
    try:
        yield model
    finally:
        for m, on in zip(mods, before):
            m.adapters_on = on


class Reference:
    """KL's frozen reference without a second copy: calls the model with its adapters off, without
    gradients (methods.kl_sum calls ref(input_ids=..., attention_mask=...) under no_grad)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), adapters_off(self.model):
            return self.model(*args, **kwargs)


# -----------------------------------------------------------------------------
# merging and saving


def merged_state_dict(model, sd: dict | None = None) -> dict[str, torch.Tensor]:
    """The state dict sd (default: the model's) with each LoRA layer's weight replaced by
    W + (alpha/r) B A and the adapter keys dropped: the base model's keys, on CPU. The model itself
    is left as it is; under FSDP2 sd is the gathered full state dict (dist.save_sharded)."""
    mods = lora_modules(model)
    sd = model.state_dict() if sd is None else sd
    out = {}
    for key, t in sd.items():
        owner, _, leaf = key.rpartition(".")
        if owner.endswith((".lora_A", ".lora_B")):
            continue
        if owner in mods and leaf == "weight":  # (out, r) @ (r, in) in fp32, back in W's dtype
            delta = sd[f"{owner}.lora_B.weight"].float() @ sd[f"{owner}.lora_A.weight"].float()
            t = (t.float() + mods[owner].scale * delta).to(t.dtype)
        out[key] = t.detach().cpu()
    return out


def merge(model):
    """Replace every LoRA layer by a plain nn.Linear holding W + (alpha/r) B A (in W's dtype); in
    place, returns the model (save_pretrained then writes a plain checkpoint)."""
    for name, m in lora_modules(model).items():
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                          device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(m.merged_weight())
            if m.bias is not None:
                plain.bias.copy_(m.bias)
        plain.requires_grad_(False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, plain)
    return model


def peft_state_dict(model, sd: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's key names: base_model.model.<module>.lora_A.weight (r, in) and
    ...lora_B.weight (out, r), fp32, on CPU (PEFT drops its adapter name 'default' on save); taken
    from sd (the gathered full state dict under FSDP2) when given."""
    sd = model.state_dict() if sd is None else sd
    out = {}
    for name in lora_modules(model):
        for ab in ("lora_A", "lora_B"):
            out[f"base_model.model.{name}.{ab}.weight"] = sd[f"{name}.{ab}.weight"].detach().cpu().contiguous()
    return out


def peft_config(model, base_name: str) -> dict:
    """adapter_config.json: the LoraConfig fields PEFT reads back (plain LoRA, scale alpha/r)."""
    mods = list(lora_modules(model).items())
    first = mods[0][1]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": first.lora_dropout,
            "target_modules": sorted({name.rpartition(".")[2] for name, _ in mods}), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "use_rslora": False, "use_dora": False, "revision": None}


def save_peft(model, path, base_name: str, sd: dict | None = None) -> None:
    """<path>/adapter_config.json and <path>/adapter_model.safetensors, written atomically (the
    adapters from sd when given: peft_state_dict)."""
    assert not Path(path).exists(), f"{path} exists; refusing to overwrite an adapter"

    def write(tmp):
        tmp.mkdir()
        save_file(peft_state_dict(model, sd), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config(model, base_name), indent=2) + "\n")
    rundir.write_atomic(path, write)


def save(model, tok, out) -> None:
    """--save: <out>/model (merged, save_pretrained: lume.load_pretrained and the official scorer load
    it) and, with adapters, <out>/adapter (PEFT format, base = the checkpoint the run loaded)."""
    if not has_adapters(model):
        rundir.save_model(model, tok, Path(out) / "model")
        return
    assert not (Path(out) / "model").exists(), f"{out}/model exists; refusing to overwrite a checkpoint"
    sd = merged_state_dict(model)

    def write(tmp):
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        tok.save_pretrained(tmp)
    rundir.write_atomic(Path(out) / "model", write)
    save_peft(model, Path(out) / "adapter", model.config.name_or_path)


# -----------------------------------------------------------------------------
# last-k layers


def decoder_layers(model) -> list[nn.Module]:
    """The decoder layers in order (the modules the model declares as _no_split_modules)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    assert layers, f"{type(model).__name__} declares no _no_split_modules: cannot find its decoder layers"
    return layers


def train_last_layers(model, k: int):
    """Freeze every parameter, then train the last k decoder layers with fp32 weights; in place."""
    layers = decoder_layers(model)
    if not 1 <= k <= len(layers):
        raise SystemExit(f"error: --train-layers {k}: the model has {len(layers)} decoder layers; "
                         f"give 1 to {len(layers)} (0 trains every parameter)")
    model.requires_grad_(False)
    for layer in layers[-k:]:
        layer.float().requires_grad_(True)
    return model


# -----------------------------------------------------------------------------
# the run's one call (job.load_model)


def load_dtype(cfg, precision: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the base is loaded in: with LoRA or last-k under bf16 (autocast or pure), the
    frozen weights are bf16, the dtype autocast computes in anyway (7B: 14 GB, not 28); the
    trainable ones become fp32 in apply(). Otherwise the run's weight dtype."""
    if (cfg.lora_rank or cfg.train_layers) and precision in ("bf16", "bf16-pure"):
        return torch.bfloat16
    return dtype


def apply(model, cfg):
    """LoRA adapters (--lora-rank) or the last K layers (--train-layers) as the trainable
    parameters; the model unchanged when both are 0."""
    if cfg.lora_rank:  # alpha 0 = 2 r also here: memory.auto_setup may set lora_rank after parse_args
        alpha = cfg.lora_alpha or 2.0 * cfg.lora_rank
        return add_lora(model, cfg.lora_rank, alpha, cfg.lora_targets, cfg.lora_dropout)
    if cfg.train_layers:
        return train_last_layers(model, cfg.train_layers)
    return model


def describe(model) -> str:
    """One line: trainable and total parameters, and the dtypes of each."""
    params = list(model.parameters())
    train = [p for p in params if p.requires_grad]
    dtypes = lambda ps: "/".join(sorted({str(p.dtype).replace("torch.", "") for p in ps}))  # noqa: E731
    n_train, n_all = sum(p.numel() for p in train), sum(p.numel() for p in params)
    return (f"trainable parameters: {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%, {dtypes(train)}); "
            f"frozen: {dtypes([p for p in params if not p.requires_grad]) or 'none'}")
