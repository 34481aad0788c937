"""
Memory plan: bytes per GPU of one full-parameter unlearning step, computed from the model config.

    python memory.py        # the README's table: OLMo 1B and 7B, every method, three setups

Weights, gradients, AdamW states, KL's reference copy, activations saved for backward, transient
workspace and compute-dtype copies, for fp32, bf16 autocast over fp32 master weights, or pure
bf16, on one GPU or FSDP-sharded over N (dist.shard). Checked at tiny scale against measured bytes
in tests/test_dist.py. Only planning: the engine (lume.py) never calls it.
"""
import math

import torch

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
ACT_COEF = {"fp32": (36, 16), "bf16": (28, 8), "bf16-pure": (22, 8)}


def memory_plan(config, method: str, precision: str, batch: int, seq_len: int, world: int = 1,
                grad_checkpointing: bool = False, grad_accum: int = 1) -> dict:
    """Bytes per GPU of one training step of `method` (ga, gd, kl, npo) at `precision` (fp32,
    bf16 = autocast over fp32 master weights, bf16-pure), FSDP over `world` GPUs. config: a
    transformers config or a dict of OlmoConfig fields; batch: forget rows per micro-batch (gd, kl,
    npo add as many retain rows); seq_len: tokens per row.

      weights, grads  the largest shard (rank 0's; dim 0 padded to a multiple of world) in the
                      master dtype (bf16 for bf16-pure)
      optimizer       AdamW exp_avg + exp_avg_sq in the master dtype + a 4-byte step per tensor
      reference       kl: a frozen sharded copy of the weights; npo: log-probs only (~0)
      activations     saved for backward: every layer's tensors (ACT_COEF) or, with checkpointing,
                      every layer's input; plus the fp32 log-softmax of the logits (kl: + p_ref)
      workspace       transient: one row set's logits (compute dtype + fp32 copy + fp32 gradient)
                      and, with checkpointing, the one layer being recomputed
      copies          compute-dtype weights alive during the step: world 1, autocast's cast cache
                      (bf16; only the head's with checkpointing); world > 1, FSDP's unsharded root
                      + 2 layers + 1 layer of gradients (x2 for kl's reference), plus the whole
                      unsharded gradient when grad_accum > 1 (no reduce-scatter until the last
                      micro-batch)
    Not counted: CUDA context and fragmentation (1-3 GB), evaluation (a full replica, no optimizer).
    """
    from transformers import AutoModelForCausalLM, OlmoConfig
    config = OlmoConfig(**config) if isinstance(config, dict) else config
    precision = "bf16" if precision == "fp16" else precision
    assert precision in ACT_COEF, f"precision must be one of {list(ACT_COEF)} (or fp16), got {precision!r}"
    assert method in ("ga", "gd", "kl", "npo"), f"unknown method {method!r}"
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    params = list(model.parameters())
    block = next(m for m in model.modules() if type(m).__name__ in set(model._no_split_modules or ()))
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
    tokens = rows * (2 if method in ("gd", "kl", "npo") else 1)
    saved = (L * r * H if grad_checkpointing else L * layer) + (r + c) * H + 4 * V
    plan = {"weights": n_shard * w, "grads": n_shard * w, "optimizer": 2 * n_shard * w + 4 * len(params),
            "reference": n_shard * w if method == "kl" else 0,
            "activations": tokens * saved + (rows * 4 * V if method == "kl" else 0),
            "workspace": rows * V * (c + 8) + (tokens * layer if grad_checkpointing else 0)}
    if world == 1:  # autocast casts matmul weights (not an untied embedding); checkpointed layers
        # recompute their casts in backward, so then only the head's stay
        emb = model.get_input_embeddings().weight
        tied = model.get_output_embeddings().weight is emb
        n_cast = (n_root if grad_checkpointing else n_all) - (0 if tied else emb.numel())
        plan["copies"] = n_cast * 2 if precision == "bf16" else 0
    else:
        plan["copies"] = ((n_root + 3 * n_block) * c * (2 if method == "kl" else 1)
                          + (n_all * c if grad_accum > 1 else 0))
    plan["total"] = sum(plan.values())
    return plan


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
            for method in ("ga", "gd", "kl", "npo"):
                p = memory_plan(OLMO_CONFIGS[name], method, precision, batch, seq_len, world, gc, grad_accum)
                cells = " | ".join(f"{p[k] / 2**30:.1f}" for k in keys)
                lines.append(f"| {name} | {label} | {method} | {cells} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    print_memory_table()
