"""
Memory plan: bytes per GPU of one unlearning step, computed from the model config, and the setup
a run picks from it.

    python memory.py                                             # the README's table (full parameter)
    python memory.py --setups                                    # the README's single-GPU setups table
    python memory.py --model olmo-7b --method npo --gpu-gib 80   # every single-GPU setup, the pick marked
    python memory.py --measure --model olmo-7b --method npo      # CUDA: random weights, planned vs measured

Weights, gradients, AdamW states, KL's reference copy, activations saved for backward, transient
workspace and compute-dtype copies, for fp32, bf16 autocast over fp32 master weights, or pure bf16
(weights and AdamW states in bf16, updated with stochastic rounding by lume.StochasticAdamW: no
more bytes), on one GPU or FSDP-sharded over N (dist.shard); on one GPU also for LoRA adapters or
the last K decoder layers training over a frozen base; and the setup a run reports (`setup:`,
config.json's "setup"). Checked at tiny scale against measured
bytes in tests/test_dist.py and tests/test_plan.py. The engine (lume.py) never calls it; job.py
asks it for the setup on CUDA (auto_setup) before any weight is loaded.
"""
import argparse
import contextlib
import copy
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

import lora
import lume
import methods
import tiny

# The bases of the released targets (config.json). OLMo-1B-0724-hf is untied, unlike OLMo-1B-hf:
# the SemEval 1B target ships 4.71 GB + 412 MB of fp32 safetensors = 1.28B parameters.
OLMO_CONFIGS = {
    "olmo-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, intermediate_size=8192,
                    vocab_size=50304, tie_word_embeddings=False, max_position_embeddings=4096),
    "olmo-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008,
                    vocab_size=50304, tie_word_embeddings=False, max_position_embeddings=4096),
}
# Bytes saved for backward per token by one decoder layer = cH * hidden + cI * intermediate, measured
# on OLMo with saved_tensors_hooks (tests/test_dist.py). SDPA attention (no T x T matrix); bf16
# autocast keeps the residual stream in fp32. Eager attention would add ~heads * T * 2 bytes.
# A layer training over a frozen bf16 embedding (LoRA, last K) has a bf16 residual stream: bf16-pure's.
ACT_COEF = {"fp32": (36, 16), "bf16": (28, 8), "bf16-pure": (22, 8)}
# run.py's auto lr for a released target, full parameters and LoRA: declared once in methods.py
FULL_LR, LORA_LR = methods.SHARED_DEFAULTS["lr"].real, methods.SHARED_DEFAULTS["lora_lr"].real
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # lora.py's default --lora-targets
GiB = 2**30


def shapes(config):
    """(config as a transformers config, the model built on the meta device: shapes, no memory),
    built once per config (pick_setup's fallbacks plan dozens of variants of one model)."""
    from transformers import AutoModelForCausalLM, OlmoConfig
    config = OlmoConfig(**config) if isinstance(config, dict) else config
    key = config.to_json_string()
    if key not in SHAPES:
        with torch.device("meta"):
            SHAPES[key] = config, AutoModelForCausalLM.from_config(config)
    return SHAPES[key]


SHAPES = {}

# A step is planned from the method's declaration (methods.Memory): whether it runs retain rows and
# holds a frozen reference copy. An NLL fine-tune (the attacks' relearning) is forget rows alone.
FINE_TUNE = methods.Memory(retain_rows=False)


def profile(method) -> "methods.Memory":
    """The memory profile of a method name (methods.METHODS) or a methods.Memory as it is."""
    return method if isinstance(method, methods.Memory) else methods.METHODS[method].memory


def exact_methods() -> list[str]:
    """The methods whose plan is their own (methods.Memory.approx empty): the README's tables."""
    return [name for name, m in methods.METHODS.items() if not m.memory.approx]


def memory_plan(config, method: str, precision: str, batch: int, seq_len: int, world: int = 1,
                grad_checkpointing: bool = False, grad_accum: int = 1, train_layers: int = 0,
                lora_rank: int = 0, lora_targets: str = LORA_TARGETS) -> dict:
    """Bytes per GPU of one training step of `method` (a methods.METHODS name or a methods.Memory) at
    `precision` (fp32, bf16 = autocast over fp32 master weights, bf16-pure), FSDP over `world` GPUs.
    config: a transformers config or a dict of OlmoConfig fields; batch: forget rows per micro-batch
    (a method with retain_rows adds as many retain rows); seq_len: tokens per row. train_layers K > 0 or lora_rank R > 0:
    one GPU, a frozen base (frozen_base_plan).

      weights, grads  the largest shard (rank 0's; dim 0 padded to a multiple of world) in the
                      master dtype (bf16 for bf16-pure)
      optimizer       AdamW exp_avg + exp_avg_sq in the master dtype + a 4-byte step per tensor
                      (bf16-pure: lume.StochasticAdamW, the same states; its fp32 work is chunked)
      reference       frozen_copy (KL): a frozen sharded copy of the weights; NPO's log-probs ~0
      activations     saved for backward: every layer's tensors (ACT_COEF) or, with checkpointing,
                      every layer's input; plus the fp32 log-softmax of the logits (+ p_ref with
                      a frozen_copy)
      workspace       transient: one row set's logits (compute dtype + fp32 copy + fp32 gradient)
                      and, with checkpointing, the one layer being recomputed
      copies          compute-dtype weights alive during the step: world 1, autocast's cast cache
                      (bf16; only the head's with checkpointing); world > 1, FSDP's unsharded root
                      + 2 layers + 1 layer of gradients (x2 with a frozen_copy), plus the whole
                      unsharded gradient when grad_accum > 1 (no reduce-scatter until the last
                      micro-batch)
    Not counted: CUDA context and fragmentation (1-3 GB: fits() keeps a reserve), evaluation (a
    bf16 replica of fp32 weights while scoring, no optimizer; with --eval-every, beside it).
    """
    precision = "bf16" if precision == "fp16" else precision
    method = profile(method)
    assert precision in ACT_COEF, f"precision must be one of {list(ACT_COEF)} (or fp16), got {precision!r}"
    config, model = shapes(config)
    if train_layers or lora_rank:
        assert world == 1, "LoRA and --train-layers are planned on one GPU"
        return frozen_base_plan(config, model, method, precision, batch, seq_len, grad_checkpointing,
                                train_layers, lora_rank, lora_targets)
    params = list(model.parameters())
    block = decoder_layer(model)
    n_all, n_block = sum(p.numel() for p in params), sum(p.numel() for p in block.parameters())
    n_root = n_all - config.num_hidden_layers * n_block
    n_shard = sum(math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0]) for p in params)
    w = 2 if precision == "bf16-pure" else 4   # master weights, grads, AdamW moments
    c = 4 if precision == "fp32" else 2        # compute (activations)
    r = 2 if precision == "bf16-pure" else 4   # residual stream
    H, I, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    cH, cI = ACT_COEF[precision]
    layer = cH * H + cI * I                    # per token
    rows = batch * seq_len                     # tokens of one row set
    tokens = rows * (2 if method.retain_rows else 1)
    saved = (L * r * H if grad_checkpointing else L * layer) + (r + c) * H + 4 * V
    plan = {"weights": n_shard * w, "grads": n_shard * w, "optimizer": 2 * n_shard * w + 4 * len(params),
            "reference": n_shard * w if method.frozen_copy else 0,
            "activations": tokens * saved + (rows * 4 * V if method.frozen_copy else 0),
            "workspace": rows * V * (c + 8) + (tokens * layer if grad_checkpointing else 0)}
    if world == 1:  # autocast casts matmul weights (not an untied embedding); checkpointed layers
        # recompute their casts in backward, so then only the head's stay
        emb = model.get_input_embeddings().weight
        tied = model.get_output_embeddings().weight is emb
        n_cast = (n_root if grad_checkpointing else n_all) - (0 if tied else emb.numel())
        plan["copies"] = n_cast * 2 if precision == "bf16" else 0
    else:
        plan["copies"] = ((n_root + 3 * n_block) * c * (2 if method.frozen_copy else 1)
                          + (n_all * c if grad_accum > 1 else 0))
    plan["total"] = sum(plan.values())
    return plan


def decoder_layer(model):
    """The first decoder layer (the model's _no_split_modules class): every layer has its shapes."""
    return next(m for m in model.modules() if type(m).__name__ in set(model._no_split_modules or ()))


def frozen_base_plan(config, model, method, precision, batch, seq_len, grad_checkpointing, train_layers,
                     lora_rank, lora_targets) -> dict:
    """memory_plan for a frozen base in the training dtype (bf16 unless fp32) under autocast, with
    fp32 trainables, grads and AdamW: LoRA adapters A (r x in) and B (out x r) on every `lora_targets`
    projection of every layer, or the last `train_layers` decoder layers (embeddings, final norm and
    head frozen). Assumed, and measured at tiny scale (tests/test_plan.py):
      - the residual stream is bf16 (the frozen bf16 embedding starts it), so a trained layer saves
        bf16-pure's ACT_COEF; LoRA adds each adapter's r-wide bf16 input to B.
      - without checkpointing, last K: layers before the first trained one save nothing (no input
        or weight needs a gradient); LoRA: every layer saves (the gradient reaches layer 0's adapters).
      - with checkpointing, every layer saves its input, frozen ones too (torch's non-reentrant
        checkpoint keeps the inputs of every checkpointed call for its recomputation).
      - KL's reference: LoRA, the same model with the adapters off (0 bytes); last K, a deep copy of
        the model as job.unlearn makes it (frozen part included; copying only the K layers would do).
      - NPO: cached reference log-probs (~0)."""
    f = 4 if precision == "fp32" else 2  # frozen weights, compute dtype and residual stream
    H, I, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    cH, cI = ACT_COEF["fp32" if precision == "fp32" else "bf16-pure"]
    layer = cH * H + cI * I
    block = decoder_layer(model)
    n_all = sum(p.numel() for p in model.parameters())
    if lora_rank:
        names = set(lora_targets.split(","))
        targets = [m for name, m in block.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in names]
        assert targets, f"no projection of a decoder layer is named in lora_targets {lora_targets!r}"
        n_train = L * sum(lora_rank * (m.in_features + m.out_features) for m in targets)
        n_tensors, n_frozen, grad_layers = L * 2 * len(targets), n_all, L
        layer += lora_rank * len(targets) * f
    else:
        k = min(train_layers, L)
        n_train = k * sum(p.numel() for p in block.parameters())
        n_tensors, n_frozen, grad_layers = k * len(list(block.parameters())), n_all - n_train, k
    rows = batch * seq_len
    tokens = rows * (2 if method.retain_rows else 1)
    saved = (L * f * H if grad_checkpointing else grad_layers * layer) + 2 * f * H + 4 * V
    weights = n_frozen * f + n_train * 4
    plan = {"weights": weights, "grads": n_train * 4, "optimizer": 2 * n_train * 4 + 4 * n_tensors,
            "reference": weights if method.frozen_copy and not lora_rank else 0,
            "activations": tokens * saved + (rows * 4 * V if method.frozen_copy else 0),
            "workspace": rows * V * (f + 8) + (tokens * layer if grad_checkpointing else 0),
            # autocast's cast cache of the fp32 trainables (recomputed in backward with checkpointing)
            "copies": 0 if grad_checkpointing or precision == "fp32" else n_train * 2}
    plan["total"] = sum(plan.values())
    return plan


# -----------------------------------------------------------------------------
# the setup a run picks


# The single-GPU setups in the order a run tries them: the most exact training first. Full
# parameters with fp32 master weights is plain AdamW; bf16 weights with stochastic rounding update
# every parameter unbiasedly but with rounding noise; the last 8 layers (the SemEval-2025 winner's
# choice) and LoRA (the runner-up's) change fewer parameters, LoRA the fewest bytes.
SETUPS = [
    ("full-fp32-master", "full parameters, bf16 autocast over fp32 weights + AdamW",
     dict(precision="bf16", grad_checkpointing=False, train_layers=0, lora_rank=0)),
    ("full-bf16-sr", "full parameters, bf16 weights + AdamW with stochastic rounding, checkpointing",
     dict(precision="bf16-pure", grad_checkpointing=True, train_layers=0, lora_rank=0)),
    ("last-8", "last 8 decoder layers in fp32 + AdamW, the rest frozen in bf16, checkpointing",
     dict(precision="bf16", grad_checkpointing=True, train_layers=8, lora_rank=0)),
    ("lora-16", "LoRA rank 16 on every projection, fp32 adapters + AdamW, frozen bf16 base, checkpointing",
     dict(precision="bf16", grad_checkpointing=True, train_layers=0, lora_rank=16)),
]


def reserve(gpu_bytes: int) -> int:
    """Bytes kept free beside the plan: 1 GiB (CUDA context, cuBLAS workspace) + 5% (allocator
    fragmentation). 80 GiB: 5 GiB."""
    return GiB + gpu_bytes // 20


def plan_setup(config, method: str, batch: int, seq_len: int, setup: dict, world: int = 1) -> dict:
    """memory_plan of one of SETUPS' setups."""
    return memory_plan(config, method, setup["precision"], batch, seq_len, world, setup["grad_checkpointing"],
                       train_layers=setup["train_layers"], lora_rank=setup["lora_rank"])


class NoSetupFits(ValueError):
    pass


def pick_setup(config, method: str, batch: int, seq_len: int, gpu_bytes: int) -> tuple[str, dict, dict]:
    """(name, setup, plan) of the first of SETUPS whose plan fits gpu_bytes with reserve(); else
    NoSetupFits naming what would: a smaller LoRA rank or fewer --train-layers, or torchrun with N GPUs."""
    budget = gpu_bytes - reserve(gpu_bytes)
    tried = []
    for name, _, setup in SETUPS:
        plan = plan_setup(config, method, batch, seq_len, setup)
        if plan["total"] <= budget:
            return name, setup, plan
        tried.append(f"{name} {plan['total'] / GiB:.1f}")
    raise NoSetupFits(f"no single-GPU setup fits {method if isinstance(method, str) else 'a fine-tune'} (batch {batch} x {seq_len} tokens) in "
                      f"{gpu_bytes / GiB:.1f} GiB ({budget / GiB:.1f} GiB after the reserve); planned GiB: "
                      f"{', '.join(tried)}. What would fit: {alternatives(config, method, batch, seq_len, budget)}")


def alternatives(config, method: str, batch: int, seq_len: int, budget: int) -> str:
    """The fallbacks that fit `budget`, in words: the largest LoRA rank, the most --train-layers,
    the fewest torchrun GPUs (FSDP, bf16 autocast over fp32 weights, as run.py shards)."""
    config, _ = shapes(config)
    base = dict(precision="bf16", grad_checkpointing=True, train_layers=0, lora_rank=0)
    options = []
    for rank in (8, 4, 2, 1):
        plan = plan_setup(config, method, batch, seq_len, {**base, "lora_rank": rank})
        if plan["total"] <= budget:
            options.append(f"--lora-rank {rank} ({plan['total'] / GiB:.1f} GiB)")
            break
    for k in range(min(8, config.num_hidden_layers) - 1, 0, -1):
        plan = plan_setup(config, method, batch, seq_len, {**base, "train_layers": k})
        if plan["total"] <= budget:
            options.append(f"--train-layers {k} ({plan['total'] / GiB:.1f} GiB)")
            break
    if not options:
        frozen = plan_setup(config, method, 1, 1, {**base, "lora_rank": 1})["weights"]
        options.append(f"no LoRA rank or --train-layers on one GPU (the frozen weights alone are "
                       f"{frozen / GiB:.1f} GiB)")

    def sharded(n, gc):  # each rank trains its rows of a micro-batch: ceil(batch / n) of them
        return memory_plan(config, method, "bf16", math.ceil(batch / n), seq_len, world=n, grad_checkpointing=gc)

    def fewest(gc):
        return next((n for n in range(2, 257) if sharded(n, gc)["total"] <= budget), None)
    found = [(n, gc) for gc in (False, True) if (n := fewest(gc))]
    if found:
        n, gc = min(found)
        options.append(f"torchrun --nproc_per_node {n} run.py ...{' --grad-checkpointing' if gc else ''} on {n} "
                       f"such GPUs (FSDP, {sharded(n, gc)['total'] / GiB:.1f} GiB each)")
    return "; ".join(options)


def setup_table(config, method: str, batch: int, seq_len: int, gpu_bytes: int) -> str:
    """Every setup's plan (GiB) for one budget, the one a run picks marked with *."""
    try:
        pick = pick_setup(config, method, batch, seq_len, gpu_bytes)[0]
        note = f"a run picks {pick}"
    except NoSetupFits as e:
        pick, note = None, f"error: {e}"
    keys = ["weights", "grads", "optimizer", "reference", "activations", "workspace", "copies", "total"]
    lines = [f"GiB; {method}, batch {batch} forget rows (+{batch} retain rows for gd/kl/npo) x {seq_len} tokens, "
             f"{gpu_bytes / GiB:.0f} GiB GPU ({reserve(gpu_bytes) / GiB:.1f} GiB reserve)", "",
             "| | setup | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name, words, setup in SETUPS:
        plan = plan_setup(config, method, batch, seq_len, setup)
        cells = " | ".join(f"{plan[k] / GiB:.1f}" for k in keys)
        lines.append(f"| {'*' if name == pick else ''} | {name}: {words} | {cells} |")
    return "\n".join(lines + ["", note])


def print_setup_table(batch: int = 4, seq_len: int = 512, budgets=(24, 40, 80)) -> str:
    """The README's single-GPU table: total GiB of every setup for OLMo 1B and 7B and every method,
    and the setup a run picks on GPUs of `budgets` GiB ('-' where none fits)."""
    names = [n for n, _, _ in SETUPS]
    lines = [f"GiB on one GPU; batch {batch} forget rows (+{batch} retain rows for gd/kl/npo) x {seq_len} tokens", "",
             "| model | method | " + " | ".join(names) + " | " + " | ".join(f"pick on {g} GiB" for g in budgets) + " |",
             "|---" * (2 + len(names) + len(budgets)) + "|"]
    for model in ("olmo-1b", "olmo-7b"):
        for method in exact_methods():
            totals = [plan_setup(OLMO_CONFIGS[model], method, batch, seq_len, s)["total"] / GiB for _, _, s in SETUPS]
            picks = []
            for g in budgets:
                try:
                    picks.append(pick_setup(OLMO_CONFIGS[model], method, batch, seq_len, g * GiB)[0])
                except NoSetupFits:
                    picks.append("-")
            lines.append(f"| {model} | {method} | " + " | ".join(f"{t:.1f}" for t in totals) + " | "
                         + " | ".join(picks) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def print_memory_table(batch: int = 4, seq_len: int = 512, grad_accum: int = 1) -> str:
    """The README's table: GiB per GPU for OLMo 1B and 7B, every method, three setups."""
    setups = [("bf16 autocast, fp32 weights + AdamW, 1 GPU", "bf16", 1, False),
              ("bf16 autocast, fp32 weights + AdamW, FSDP 8 GPUs", "bf16", 8, False),
              ("bf16-pure + grad checkpointing, 1 GPU", "bf16-pure", 1, True)]
    keys = ["weights", "grads", "optimizer", "reference", "activations", "workspace", "copies", "total"]
    lines = [f"GiB per GPU; batch {batch} forget rows (+{batch} retain rows for gd/kl/npo) x {seq_len} tokens"
             f"{f', grad_accum {grad_accum}' if grad_accum > 1 else ''}", "",
             "| model | setup | method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 3) + "|"]
    for name in ("olmo-1b", "olmo-7b"):
        for label, precision, world, gc in setups:
            for method in exact_methods():
                p = memory_plan(OLMO_CONFIGS[name], method, precision, batch, seq_len, world, gc, grad_accum)
                cells = " | ".join(f"{p[k] / GiB:.1f}" for k in keys)
                lines.append(f"| {name} | {label} | {method} | {cells} |")
    text = "\n".join(lines)
    print(text)
    return text


# -----------------------------------------------------------------------------
# a run's setup (job.py), before any weight is loaded


def model_config(name: str):
    """The config of --model without loading weights: the released targets' bases and the tiny
    target from this file and tiny.py, anything else from its config.json (AutoConfig)."""
    if name in OLMO_CONFIGS:
        return OLMO_CONFIGS[name]
    if name == "tiny":
        return {**tiny.TINY, "tie_word_embeddings": False}
    from transformers import AutoConfig
    return from_hub(lambda: AutoConfig.from_pretrained(lume.resolve_model(name)[0]), "config", lume.resolve_model(name)[0])


def plan_seq_len(name: str, items) -> int:
    """The longest training row (prompt + answer + EOS) of `items`, in tokens: the tokenizer's count,
    or for the tiny target (its tokenizer is built with it) the UTF-8 bytes + 2, a byte-level BPE bound."""
    if name == "tiny":
        return max((len((it.input + " " + it.output).encode()) + 2 for it in items), default=1)
    from transformers import AutoTokenizer
    path = lume.resolve_model(name)[1]
    tok = from_hub(lambda: AutoTokenizer.from_pretrained(path if not Path(path).expanduser().exists()
                                                         else str(Path(path).expanduser())), "tokenizer", path)
    return max((len(lume.encode_pair(tok, it.input, it.output)[0]) for it in items), default=1)


def from_hub(load, what: str, repo: str):
    """load() of a config or tokenizer the plan reads before lume.load_pretrained; a hub or cache
    that cannot give it is one `error:` line (SystemExit), as load_pretrained's, not a traceback."""
    try:
        return load()
    except (OSError, ValueError) as e:  # offline with nothing cached, unreachable, gated, no such repo
        raise SystemExit(f"error: cannot load the {what} of {repo} for the memory plan: {lume.first_line(e)}. "
                         f"{lume.hub_fix(repo)}.") from None


def explicit_flags(cfg) -> list[str]:
    """The setup flags the user gave: --precision (not auto), --grad-checkpointing (not None = auto),
    --train-layers and --lora-rank (> 0; the fields come with lora.py)."""
    given = [("--precision", cfg.precision != "auto"), ("--grad-checkpointing", cfg.grad_checkpointing is not None),
             ("--train-layers", getattr(cfg, "train_layers", 0) > 0), ("--lora-rank", getattr(cfg, "lora_rank", 0) > 0)]
    return [flag for flag, yes in given if yes]


def auto_setup(cfg, device, items, world: int = 1, free_bytes: int | None = None) -> tuple[object, dict | None]:
    """(cfg with the setup, config.json's "memory_plan" record or None). On one CUDA GPU, when the user
    gave none of the setup flags (explicit_flags): the first of SETUPS that fits the GPU's free memory
    (torch.cuda.mem_get_info, or free_bytes) sets precision, grad_checkpointing, train_layers and
    lora_rank, each recorded in cfg.resolved with the plan's numbers as the reason, and is printed.
    Otherwise (CPU, torchrun, an explicit flag, --method none) cfg keeps its own setup, checkpointing
    off unless asked, and the record is None. items: the rows trained on. cfg is a frozen run.Config:
    the new one is a copy (dataclasses.replace)."""
    if device.type != "cuda" or world > 1 or explicit_flags(cfg) or cfg.method == "none":
        return dataclasses.replace(cfg, grad_checkpointing=bool(cfg.grad_checkpointing)), None
    free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
    seq_len = plan_seq_len(cfg.model, items)
    try:
        name, setup, plan = pick_setup(model_config(cfg.model), cfg.method, cfg.batch_size, seq_len, free)
    except NoSetupFits as e:
        raise SystemExit(f"error: --model {cfg.model} on {device}: {e}") from None
    why = f"memory plan: {name}, {plan['total'] / GiB:.1f} GiB planned of {free / GiB:.1f} GiB free"
    values, resolved = dict(setup), dict(cfg.resolved)  # run.resolve_auto's record of each auto value
    resolved.update({key: {"value": value, "why": why} for key, value in setup.items()})
    if setup["lora_rank"] and cfg.lr == FULL_LR:  # the auto lr of full fine-tuning: LoRA's instead (run.py)
        values.update(lr=LORA_LR, lora_alpha=2.0 * setup["lora_rank"])
        for key in ("lr", "lora_alpha"):
            resolved[key] = {"value": values[key], "why": f"{why}: LoRA's (methods.SHARED_DEFAULTS)"}
        lume.print0(f"memory plan: LoRA picked, so the auto lr {FULL_LR:g} becomes LoRA's {LORA_LR:g}")
    lume.print0(f"memory plan: {name} ({plan['total'] / GiB:.1f} GiB planned of {free / GiB:.1f} GiB free, "
                f"batch {cfg.batch_size} x {seq_len} tokens); an explicit --precision, --grad-checkpointing, "
                "--train-layers or --lora-rank overrides it (python memory.py shows every setup)")
    record = {"setup": name, "planned_gib": round(plan["total"] / GiB, 2), "free_gib": round(free / GiB, 2),
              "batch": cfg.batch_size, "seq_len": seq_len, **setup, "plan_bytes": plan}
    return dataclasses.replace(cfg, **values, resolved=resolved), record


# -----------------------------------------------------------------------------
# scoring: the decode batch of generation's fixed-shape stream, from the memory left


def capacity(s: int, N: int, round_to: int) -> int:
    """Cache positions for rows of s tokens and N more, rounded up: close lengths share a step (and graph)."""
    return -(-(s + N) // round_to) * round_to


def kv_bytes(config, rows: int, positions: int, elem: int) -> int:
    """Bytes of keys and values of `rows` rows over `positions` cache positions, every layer, `elem`
    bytes a value: what a decode step reads beside the weights (the 7B in bf16: 512 KiB a row-position)."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    heads = get("num_key_value_heads") or get("num_attention_heads")
    head_dim = get("head_dim") or get("hidden_size") // get("num_attention_heads")
    return 2 * get("num_hidden_layers") * rows * positions * heads * head_dim * elem


def decode_bytes(config, rows: int, prompt_len: int, new_tokens: int, elem: int, round_to: int,
                 moves: bool = False) -> int:
    """Bytes a decode of `rows` rows adds to the weights, as generation allocates them: the fixed-shape
    step's keys and values (rows x capacity(prompt_len, new_tokens)) and the prefill's own cache
    (rows x prompt_len); with moves, a second step's (generation.enter copies the live rows into a
    step of another shape while the old one is held)."""
    return ((2 if moves else 1) * kv_bytes(config, rows, capacity(prompt_len, new_tokens, round_to), elem)
            + kv_bytes(config, rows, prompt_len, elem))


def scoring_plan(config, free: int, total: int, short: int, long: int, new_tokens: int, elem: int = 2,
                 round_to: int = 64, weights: int = 0, held: int = 0, most: int = 512) -> dict:
    """Rows of generation's fixed-shape decode step and its cap on row-positions (max_tokens) from the
    memory left: `free` less the weights, anything else `held` (training's state beside scoring with
    --eval-every; 0 where `free` was measured with them loaded) and reserve(total). Prompts of
    `short` to `long` tokens, `new_tokens` each.

    max_tokens M bounds every step's rows x capacity (generation.enter) and every batch's rows x
    tokens (generation.take). At any moment two steps are held (a move to a step of another shape,
    <= M positions each) beside the prefill's cache and activations (new prompts of <= C - N tokens
    in a step of capacity C): decode_bytes with moves per row, whose cost per position is highest at
    the longest prompt's capacity; M is the room over that. rows = M // the shortest prompt's
    capacity, at most `most`: long prompts run on fewer rows."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    act = (4 * get("hidden_size") + 3 * get("intermediate_size")) * elem  # a prefill token's transient values
    C = capacity(long, new_tokens, round_to)
    per_pos = (decode_bytes(config, 1, C - new_tokens, new_tokens, elem, round_to, moves=True)
               + (C - new_tokens) * act) / C
    room = free - weights - held - reserve(total)  # M: less every row's fp32 logits, twice
    M = int(max(0, room - most * 8 * get("vocab_size")) // per_pos)
    c0 = capacity(short, new_tokens, round_to)
    rows = max(1, min(most, M // c0 // 8 * 8 or M // c0))  # a multiple of 8 when 8 fit
    return {"rows": rows, "max_tokens": max(M, rows * c0), "rows_longest": min(rows, M // C), "capacity": (c0, C),
            "planned_bytes": int(M * per_pos),
            "room_bytes": room, "free_bytes": free, "weights_bytes": weights, "held_bytes": held,
            "reserve_bytes": reserve(total), "prompts": (short, long), "new_tokens": new_tokens, "fits": M >= C}


def plan_line(p: dict) -> str:  # printed at the start of scoring on CUDA, and by the GPU report
    return (f"{p['rows']} rows a step ({p['rows_longest']} at the longest prompt), <= {p['max_tokens']:,} "
            f"row-positions (caches of {p['capacity'][0]}-{p['capacity'][1]} positions: prompts of "
            f"{p['prompts'][0]}-{p['prompts'][1]} tokens + {p['new_tokens']}); {p['planned_bytes'] / GiB:.1f} GiB "
            f"planned of {p['room_bytes'] / GiB:.1f} GiB left ({p['free_bytes'] / GiB:.1f} free - "
            f"{p['weights_bytes'] / GiB:.1f} weights - {p['held_bytes'] / GiB:.1f} held - "
            f"{p['reserve_bytes'] / GiB:.1f} reserve)" + ("" if p["fits"] else "; not even one row fits"))


def param_bytes(config, elem: int) -> int:  # the weights at elem bytes a parameter (the meta model's count)
    return sum(p.numel() for p in shapes(config)[1].parameters()) * elem


# -----------------------------------------------------------------------------
# planned vs measured on a CUDA GPU


def build_random(config, setup: dict, device):
    """A random-weight model of config's shape built directly on `device` in the setup's layout."""
    from transformers import AutoModelForCausalLM, OlmoConfig
    config = OlmoConfig(**config) if isinstance(config, dict) else config
    frozen_base = setup["train_layers"] or setup["lora_rank"]
    dtype = torch.bfloat16 if setup["precision"] == "bf16-pure" or frozen_base else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if setup["train_layers"]:
        lora.train_last_layers(model, min(setup["train_layers"], config.num_hidden_layers))  # a small test shape
    if setup["lora_rank"]:
        lora.add_lora(model, rank=setup["lora_rank"], alpha=2.0 * setup["lora_rank"], targets=LORA_TARGETS)
    if setup["grad_checkpointing"]:
        lume.enable_checkpointing(model)
    return model


def measure(name: str, method: str, batch: int, seq_len: int, setup_name: str | None = None, steps: int = 3,
            device: str = "cuda") -> dict | None:
    """Build `name`'s shape with random weights on the GPU, run `steps` optimizer steps of the setup
    a run would pick (or setup_name) through lume.train, print planned against measured bytes and
    return both ({term: (planned, measured)}), or None without CUDA. device "cpu" runs the same
    path, counting only the optimizer states (the tests' check of the code)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("memory.py --measure needs CUDA (it builds the model on the GPU); use --gpu-gib N for the plan alone")
        return None
    config = model_config(name)
    free = torch.cuda.mem_get_info(device)[0] if cuda else 80 * GiB
    if setup_name:
        setup = next(s for n, _, s in SETUPS if n == setup_name)
        plan = plan_setup(config, method, batch, seq_len, setup)
    else:
        setup_name, setup, plan = pick_setup(config, method, batch, seq_len, free)
    print(f"{name} {method}: {setup_name}, batch {batch} x {seq_len} tokens, {free / GiB:.1f} GiB free")
    model = build_random(config, setup, device)
    weights = torch.cuda.memory_allocated(device) if cuda else 0
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = lambda: lume.Batch(torch.randint(0, vocab, (batch, seq_len)), torch.ones(batch, seq_len,  # noqa: E731
                              dtype=torch.long), torch.ones(batch, seq_len), torch.arange(batch))
    spec = methods.METHODS[method]
    steps_of = [[(rows(), rows() if spec.retain != "no" else None)] for _ in range(steps)]
    # the loss's options at their tiny defaults (the bytes do not depend on them), and what its prepare
    # builds: a frozen copy (LoRA: lora.py switches the adapters off instead), the reference log-probs
    options = {k: spec.defaults.get(f, methods.SHARED_DEFAULTS.get(f)).tiny for k, f in spec.options.items()}
    if spec.prepare is not None:
        options.update(spec.prepare(methods.Prep(
            cfg=None, model=model, tok=None, plan=[[(list(range(batch)), [])]] * steps, steps=steps_of, retain=[],
            autocast=contextlib.nullcontext(), dist=None, saved=None, batch=None, each=lambda b, _: b,
            reference_logps=lambda b: lume.reference_logps(model, b, batch, contextlib.nullcontext()),
            frozen_copy=lambda: copy.deepcopy(model).eval().requires_grad_(False))))
    loss, got = spec.loss, {}

    def after(done, opt, scaler):
        got["optimizer"] = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                               if torch.is_tensor(t))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    lume.train(model, steps_of, lambda m, f, r, totals: loss(m, f, r, totals, **options), lr=1e-5,
               precision=setup["precision"], device=device, after_step=after)
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    rows = {"weights": (plan["weights"], weights), "optimizer states": (plan["optimizer"], got["optimizer"]),
            "peak (torch.cuda.max_memory_allocated)": (plan["total"], peak)}
    print(f"{steps} steps in {time.time() - t0:.1f}s\n\n| | planned GiB | measured GiB |\n|---|---|---|")
    for term, (planned, measured) in rows.items():
        print(f"| {term} | {planned / GiB:.2f} | {measured / GiB:.2f} |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The memory plan of one unlearning step; the setup a run picks.")
    p.add_argument("--model", default="", help="olmo-1b, olmo-7b, tiny, a hub id or a save_pretrained directory "
                                                "(none: the README's full-parameter table)")
    p.add_argument("--method", default=methods.DEFAULT, choices=exact_methods())
    p.add_argument("--batch", type=int, default=4, help="forget rows per micro-batch (run.py --batch-size)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="the GPU's memory in GiB")
    p.add_argument("--measure", action="store_true", help="CUDA: random weights on the GPU, a few steps of "
                                                          "the picked setup, planned vs measured peak")
    p.add_argument("--setups", action="store_true", help="the README's single-GPU table: every setup for "
                                                         "OLMo 1B and 7B, every method, the picks on 24/40/80 GiB")
    p.add_argument("--setup", default="", choices=[""] + [n for n, _, _ in SETUPS], help="--measure this setup")
    a = p.parse_args(argv)
    for flag in ("batch", "seq_len", "gpu_gib"):
        if getattr(a, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(a, flag)}")
    if a.measure:
        return 0 if measure(a.model or "olmo-7b", a.method, a.batch, a.seq_len, a.setup or None) else 2
    if a.setups:
        print_setup_table(a.batch, a.seq_len)
        return 0
    if not a.model:
        print_memory_table(a.batch, a.seq_len)
        return 0
    print(setup_table(model_config(a.model), a.method, a.batch, a.seq_len, int(a.gpu_gib * GiB)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
