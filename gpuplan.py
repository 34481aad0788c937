"""
What the GPU report's sections and the 7B's full evaluation are planned to take on cards that are
not at hand, from the model configs alone (the meta device: shapes, no memory, no GPU):

    python gpuplan.py        # the plans at 24/40/80/141 GiB and the 7B's projected full evaluation

  scoring   memory.scoring_plan: the fixed-shape decode step's rows from the memory left
  adamw     the layers the AdamW comparison runs on (adamw_layers), and the setup training picks
  projection the full LUME evaluation of the 7B on an H100, by the report's own model (full_eval):
            a decode step reads the weights and every cache column of its rows at the copy rate,
            or runs its matmuls at the matmul rate, whichever is longer; every forward token
            (prompts, MIA, MMLU) costs 2N FLOP at the matmul rate. ASSUMED names each number taken.
gpureport.py prints them first (bench-gpu.json "plans") and measures what the card really gives.
"""
import sys

import memory

GiB = 2**30
# what one full LUME evaluation scores, counted with the OLMo tokenizer on the release (docs/performance.md)
FULL_EVAL = dict(items=5466, prompt_tokens=286371, new_tokens=610745, mia_docs=300, mia_tokens=67333,
                 mmlu_questions=14042, mmlu_suffix_tokens=2099787, mmlu_prefix_tokens=29628,  # whole prompts: 9,633,979
                 decode_steps=26416,  # the fixed-shape stream's steps at batch 32 (the 13M hub-shaped OLMo's
                 #   outputs, docs/repro/static_steps.py; 23.1 live rows a step). The batch-by-batch graph path
                 #   before it (2b71921), each batch run to its longest row, took 43,396 (the same script there).
                 step_row_positions=11900,  # rows x cache columns of those steps, on average (the same run)
                 prompts=(1, 290))  # the shortest and longest prompt in tokens
CARDS = {"H100 SXM 80GB": dict(copy_bytes_per_s=3.35e12, matmul_flop_per_s=989e12),  # HBM3; bf16 dense
         "H100 PCIe 80GB": dict(copy_bytes_per_s=2.0e12, matmul_flop_per_s=756e12)}   # HBM2e
ASSUMED = dict(bandwidth_fraction=0.8,  # of the card's memory bandwidth a decode step's reads reach
               matmul_fraction=0.6,  # of the bf16 dense peak a prefill-sized forward reaches
               live_fraction=610745 / 26416 / 32,  # of a step's rows decoding (measured at 32; assumed at more)
               mean_capacity=round(11900 / 32))  # cache columns a step reads, on average (measured at 32 rows)
ADAMW_MARGIN = 0.9  # of the free memory after memory.reserve: fused AdamW's and the allocator's slack



def scoring_table(name: str, gibs=(24, 40, 80, 141), prompts=(1, 290), new_tokens: int = 256) -> list[str]:
    """memory.scoring_plan of memory.OLMO_CONFIGS[name] in bf16 on cards of `gibs` GiB (97% free; the release's prompts
    of 1-290 OLMo tokens), alone and beside the training state memory.pick_setup's setup for npo 4 x 512 holds
    (--eval-every: gradients, optimizer, fp32 master weights where scoring runs a bf16 replica)."""
    config, lines, weights = memory.OLMO_CONFIGS[name], [], memory.param_bytes(memory.OLMO_CONFIGS[name], 2)
    for g in gibs:
        total, free = g * GiB, int(g * GiB * 0.97)
        alone = memory.scoring_plan(config, free, total, *prompts, new_tokens, weights=weights)
        try:
            setup, kind, plan = memory.pick_setup(config, "npo", 4, 512, free)
            master = kind["precision"] == "bf16" and not (kind["train_layers"] or kind["lora_rank"])
            # fp32 master weights: scoring runs a bf16 replica beside them; else the weights are scoring's own
            held = plan["grads"] + plan["optimizer"] + max(0, plan["weights"] - (0 if master else weights))
            beside = memory.scoring_plan(config, free, total, *prompts, new_tokens, weights=weights, held=held)
            train = f"beside {setup} training ({held / GiB:.1f} GiB held): {beside['rows']} rows"
        except memory.NoSetupFits:
            train = "no training setup fits"
        lines.append(f"{name} bf16 on {g} GiB: {memory.plan_line(alone)}; {train}")
    return lines


def adamw_counts(config) -> tuple[int, int]:
    """(parameters outside the decoder layers: embeddings, LM head, final norm; parameters of a layer)."""
    _, meta = memory.shapes(config)
    total, layer = (sum(p.numel() for p in m.parameters()) for m in (meta, memory.decoder_layer(meta)))
    return total - config["num_hidden_layers"] * layer, layer


def adamw_layers(config, free: int) -> int:
    """Decoder layers of this shape whose fp32 AdamW step fits ADAMW_MARGIN of `free` bytes beside
    memory.reserve: 16 bytes a parameter (weights, gradients, two states; the bf16 step needs half).
    The step is elementwise, so its time per parameter, which the ratio compares, does not depend on
    the layer count: the 7B's fp32 step needs 103 GiB, so with 80 GiB free it runs on 20 of its 32 layers."""
    rest, layer = adamw_counts(config)
    room = int((free - memory.reserve(free)) * ADAMW_MARGIN)
    return max(0, min(config["num_hidden_layers"], (room // 16 - rest) // layer))


def full_eval(config, copy_bytes_per_s: float, matmul_flop_per_s: float, rows: int, elem: int = 2) -> dict:
    """Seconds of one full LUME evaluation (two scoring stages: generation, MIA, MMLU) by the model
    in the module docstring, at ASSUMED's fractions of these rates, the decode step at `rows` rows."""
    _, meta = memory.shapes(config)
    n_all = sum(p.numel() for p in meta.parameters())
    N = n_all - meta.get_input_embeddings().weight.numel()  # matmul parameters: the input embedding is a lookup
    bw, flops, f = copy_bytes_per_s * ASSUMED["bandwidth_fraction"], matmul_flop_per_s * ASSUMED["matmul_fraction"], FULL_EVAL
    step = max((n_all * elem + memory.kv_bytes(config, rows, ASSUMED["mean_capacity"], elem)) / bw, 2 * N * rows / flops)
    steps = f["decode_steps"] if rows == 32 else round(f["new_tokens"] / (ASSUMED["live_fraction"] * rows))
    forward = lambda tokens: tokens * 2 * N / flops  # noqa: E731
    stage = {"prefill_s": forward(f["prompt_tokens"]), "decode_s": steps * step, "mia_s": forward(f["mia_tokens"]),
             "mmlu_s": forward(f["mmlu_suffix_tokens"] + f["mmlu_prefix_tokens"])}
    return {"rows": rows, "step_s": step, "steps": steps, **stage, "full_eval_s": 2 * sum(stage.values())}


def plans(say=print, names=("olmo-1b", "olmo-7b"), gibs=(24, 40, 80, 141)) -> dict:
    """Every plan above, printed one line each and returned for bench-gpu.json."""
    out = {"assumed": {**ASSUMED, "cards": CARDS}}
    for name in names:
        config, L = memory.OLMO_CONFIGS[name], memory.OLMO_CONFIGS[name]["num_hidden_layers"]
        lines = scoring_table(name, gibs, FULL_EVAL["prompts"])
        for g in gibs:
            free = int(g * GiB * 0.97)
            try:
                pick = memory.pick_setup(config, "npo", 4, 512, free)[0]
            except memory.NoSetupFits:
                pick = "none fits"
            k = adamw_layers(config, free)
            planned = (adamw_counts(config)[0] + k * adamw_counts(config)[1]) * 16
            lines.append(f"{name} on {g} GiB ({free / GiB:.1f} free): training npo 4 x 512 picks {pick}; the AdamW "
                         f"comparison runs on {k} of {L} layers ({planned / GiB:.1f} GiB planned in fp32)")
        out[name] = lines
    config = memory.OLMO_CONFIGS["olmo-7b"]
    rows = memory.scoring_plan(config, int(80 * GiB * 0.97), 80 * GiB, *FULL_EVAL["prompts"], 256,
                               weights=memory.param_bytes(config, 2))["rows"]
    out["projection"] = {card: {r: full_eval(config, **rates, rows=r) for r in (32, rows)} for card, rates in CARDS.items()}
    out["projection_lines"] = [projection_line(card, p) for card, ps in out["projection"].items() for p in ps.values()]
    for line in [x for n in names for x in out[n]] + out["projection_lines"]:
        say(f"gpu-report plan: {line}")
    return out


def projection_line(card: str, p: dict) -> str:
    return (f"olmo-7b full LUME evaluation on an {card} at {p['rows']} rows a step: {p['full_eval_s'] / 60:.1f} min "
            f"(per stage: prefill {p['prefill_s']:.0f} s, decode {p['steps']:,} steps x {p['step_s'] * 1e3:.1f} ms = "
            f"{p['decode_s']:.0f} s, MIA {p['mia_s']:.0f} s, MMLU {p['mmlu_s']:.0f} s)")


if __name__ == "__main__":
    plans()
    sys.exit(0)
