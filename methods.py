"""
Unlearning losses: Gradient Ascent, Gradient Difference, KL regularisation, NPO, SimNPO, RMU, STAT
(pseudo-token relabelling) and UNDIAL (self-distillation on adjusted logits), each with what it
prepares before training beside it; and, at the end, each method's declaration (METHODS: its loss,
options, preparation, defaults with their sources, memory plan, checks and checkpointed state), which
is all the rest of the project reads about a method. A new method is a loss and a declaration here.

Each function is one micro-batch's contribution to one optimizer step's loss:
    loss_fn(model, forget, retain, totals) -> (loss tensor, {term name: float})
forget / retain are lume.Batch (retain is None when a method needs no retain data); totals
holds the step's totals over all its micro-batches (and all ranks), from lume.step_totals:
forget_tokens / retain_tokens answer tokens, forget_seqs / retain_seqs sequences. Dividing sums
by these totals makes gradient accumulation of k micro-batches equal one batch of the same
examples. retain_weight (--retain-weight) weighs the retain term of GD, KL and NPO-RT. Options
are keyword-only and have no defaults: a misspelt or missing one is a TypeError, never a
silent default.

Reduction, for every method: only answer tokens count (prompt and padding are masked out; the
answer ends with EOS). Token-level terms (NLL, KL) are token-normalised: the sum over the step's
answer tokens divided by their number. NPO is sequence-level: log pi(y|x) is the SUM of the answer
tokens' log-probabilities, and the loss is a mean over the step's sequences. SimNPO is sequence-level
too, on the MEAN of a sequence's answer-token log-probabilities. RMU is token-level on hidden states:
the hidden state at the position that predicts each answer token (as the NLL uses it), a mean over
the hidden dimension per token, then token-normalised as above. STAT and UNDIAL are token-level
(their NLL / cross-entropy is token-normalised as above).
"""
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import lume
from lume import Batch, nll_sum, seq_logps, token_logps


def ga(model, forget, retain, totals):
    """Gradient Ascent: minimise L = -NLL(forget) (Jang et al. 2023; LUME paper Sec. 4)."""
    nll = nll_sum(model, forget) / totals["forget_tokens"]
    return -nll, {"forget_nll": nll.item()}


def need_retain(method: str, retain) -> None:
    """A method with a retain term refuses a micro-batch without retain rows, in words."""
    if retain is None:
        raise ValueError(f"{method} needs retain items (its retain term), but this step has none: "
                         "unlearn a task whose retain split is not empty")


def gd(model, forget, retain, totals, *, retain_weight: float):
    """Gradient Difference: L = -NLL(forget) + retain_weight * NLL(retain) (Liu et al. 2022)."""
    need_retain("gd", retain)
    f = nll_sum(model, forget) / totals["forget_tokens"]
    r = nll_sum(model, retain) / totals["retain_tokens"]
    return -f + retain_weight * r, {"forget_nll": f.item(), "retain_nll": r.item()}


def kl_sum(model, ref, b) -> torch.Tensor:
    """Sum over answer tokens of KL(p_ref || p_theta) of the next-token distributions.

    Only answer tokens count, unlike several peers that average KL over every position,
    prompt and padding included. The reference runs frozen under no_grad.
    """
    logits = model(input_ids=b.ids, attention_mask=b.attn).logits[:, :-1].float()  # (B, T-1, V)
    with torch.no_grad():
        ref_logits = ref(input_ids=b.ids, attention_mask=b.attn).logits[:, :-1].float()
    logp, ref_logp = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (B, T-1)
    return (kl * b.target_mask[:, 1:]).sum()


def kl(model, forget, retain, totals, *, retain_weight: float, ref):
    """KL regularisation: L = -NLL(forget) + retain_weight * KL(p_ref || p_theta) on retain answer tokens."""
    need_retain("kl", retain)
    f = nll_sum(model, forget) / totals["forget_tokens"]
    k = kl_sum(model, ref, retain) / totals["retain_tokens"]
    return -f + retain_weight * k, {"forget_nll": f.item(), "retain_kl": k.item()}


def frozen_reference(p) -> dict:
    """KL's and UNDIAL's preparation: a frozen reference, the model as it is now (the target; with
    LoRA the same model with its adapters off, no second copy: Prep.frozen_copy)."""
    return {"ref": p.frozen_copy()}


def npo(model, forget, retain, totals, *, beta: float, retain_weight: float, ref_logps: torch.Tensor):
    """Negative Preference Optimization (Zhang et al. 2024, arXiv 2404.05868, eq. 3):

        L_NPO = -(2/beta) * mean_i log sigmoid(-beta * (log pi_theta(y_i|x_i) - log pi_ref(y_i|x_i)))

    plus retain_weight * NLL(retain) (NPO-RT; retain_weight 0 gives pure NPO). pi_ref is the
    model before unlearning, frozen; the forget data are fixed, so log pi_ref(y_i|x_i) is computed
    once before training (ref_logps, indexed by item) and no second model is held.
    At theta = theta_ref, dL/dr_i = (2/beta) * beta * sigmoid(0) / n = 1/n: the NPO gradient
    equals the gradient of the mean summed answer log-likelihood (GA on sequence sums).
    """
    logp = seq_logps(model, forget)  # (B,)
    r = logp - ref_logps.to(logp.device, logp.dtype)[forget.idx]
    loss_f = -(2.0 / beta) * F.logsigmoid(-beta * r).sum() / totals["forget_seqs"]
    terms = {"npo": loss_f.item(), "log_ratio": r.sum().item() / totals["forget_seqs"]}
    if retain_weight and retain is not None:
        ret = nll_sum(model, retain) / totals["retain_tokens"]
        terms["retain_nll"] = ret.item()
        return loss_f + retain_weight * ret, terms
    return loss_f, terms


def first_forget_batches(plan, steps) -> list:
    """This process's forget micro-batch at every place of the plan where rows are seen for the
    first time (plan: global indices; steps: the Batches this process trains on, aligned with it)."""
    seen, out = set(), []
    for global_micros, micros in zip(plan, steps):
        for (rows, _), (forget, _) in zip(global_micros, micros):
            if not seen.issuperset(rows):
                seen.update(rows)
                out.append(forget)
    return out


def npo_prepare(p) -> dict:
    """NPO's preparation: log pi_ref(y_i|x_i) of every forget item under the model as it is now (before
    unlearning), computed on the training micro-batches themselves (lume.plan_steps keeps their rows
    fixed), so NPO's log-ratio is exactly 0 at step 0; a resumed run takes its checkpoint's."""
    if p.saved is not None:
        return {"ref_logps": p.saved["ref_logps"]}
    batches = p.each(first_forget_batches(p.plan, p.steps), "NPO reference: batch")  # minutes on a 7B
    return {"ref_logps": p.reference_logps(batches)}


def simnpo(model, forget, retain, totals, *, beta: float, gamma: float, retain_weight: float):
    """SimNPO (Fan et al. 2024, arXiv 2410.07163), reference-free and length-normalised:

        L_SimNPO = -(2/beta) * mean_i log sigmoid(-(beta/|y_i|) * log pi_theta(y_i|x_i) - gamma)

    plus retain_weight * NLL(retain) (as NPO-RT; 0 gives pure SimNPO). |y_i| is row i's number of
    answer tokens (EOS included), so (1/|y_i|) log pi is the mean answer-token log-probability a_i;
    the loss is a mean over the step's sequences. dL/da_i = 2 sigmoid(beta a_i + gamma) / n: a
    weighted GA on token means whose weight falls as a_i drops (a forgotten row stops pulling).
    gamma is the paper's. The official code (OPTML-Group/Unlearn-Simple; open-unlearning) writes
    -(2/beta) log sigmoid(beta * (NLL_mean_i - gamma')), NLL_mean_i = -a_i, so gamma = beta * gamma':
    its MUSE-News recipe beta 0.75, gamma' 3.0 is beta 0.75, gamma 2.25 here.
    """
    n_tok = forget.target_mask[:, 1:].sum(-1)  # (B,) |y_i|; 0 on dist's padding rows
    a = token_logps(model, forget).sum(-1) / n_tok.clamp(min=1)  # (B,) mean answer log-prob
    per_seq = F.logsigmoid(-beta * a - gamma) * (n_tok > 0)  # a padding row counts nowhere
    loss_f = -(2.0 / beta) * per_seq.sum() / totals["forget_seqs"]
    terms = {"simnpo": loss_f.item(), "mean_logp": (a * (n_tok > 0)).sum().item() / totals["forget_seqs"]}
    if retain_weight and retain is not None:
        ret = nll_sum(model, retain) / totals["retain_tokens"]
        terms["retain_nll"] = ret.item()
        return loss_f + retain_weight * ret, terms
    return loss_f, terms


# -----------------------------------------------------------------------------
# RMU: representation misdirection for unlearning (Li et al. 2024, WMDP, arXiv 2403.03218)


class _Stop(Exception):
    """Raised by the layer hook to end a forward once decoder layer l has run."""


def decoder_layers(model):
    """The decoder's list of layers (HF: model.model.layers, found through get_decoder)."""
    layers = getattr(model.get_decoder(), "layers", None)
    assert layers is not None, f"{type(model).__name__}: no decoder .layers list: RMU cannot find layer l"
    return layers


def layer_output(model, b, layer: int, stop: bool) -> torch.Tensor:
    """(B, T, H) output of decoder layer `layer` (0-based; HF hidden_states[layer + 1]) from a forward
    hook. stop: end the forward there (the layers above and the LM head never run; a single process
    only, since under FSDP2 the root's post-forward must run); else the forward runs to the end."""
    out = {}

    def hook(_mod, _args, output):
        if "h" not in out:  # first call only: gradient checkpointing may run the layer again
            out["h"] = output[0] if isinstance(output, tuple) else output
            if stop:
                raise _Stop
    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        model(input_ids=b.ids, attention_mask=b.attn)
    except _Stop:
        pass
    finally:
        handle.remove()
    return out["h"]


def masked_mse_sum(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over masked positions of mean_d (h - target)^2: h (B, T, H), target broadcastable, mask (B, T)."""
    return (((h.float() - target.float()) ** 2).mean(-1) * mask).sum()


def rmu_positions(b) -> torch.Tensor:
    """(B, T-1) mask of the positions whose hidden state predicts an answer token (h[:, :-1])."""
    return b.target_mask[:, 1:]


def frozen_rows(frozen: list, b, like: torch.Tensor) -> torch.Tensor:
    """The cached frozen activations of b's rows laid out like h[:, :-1] (B, T-1, H): row i's
    cache frozen[b.idx[i]] (its answer positions, in order) goes where rmu_positions is 1."""
    out = torch.zeros_like(like)
    mask = rmu_positions(b).bool()
    for i, j in enumerate(b.idx.tolist()):
        if mask[i].any():
            out[i, mask[i]] = frozen[j].to(out)
    return out


@torch.no_grad()  # not inference_mode: FSDP must not create its unsharded parameters as inference tensors
def rmu_reference(model, batches, n: int, layer: int, autocast, stop: bool) -> list:
    """Layer l's activations of the frozen model (the target, before unlearning) at every answer
    position of every retain item in `batches`, once, before training: a list of n entries,
    (answer tokens, H) CPU tensors (None for items never used). No second model is held."""
    out = [None] * n
    device = next(model.parameters()).device
    for b in batches:
        b = b.to(device)
        with autocast:
            h = layer_output(model, b, layer, stop)[:, :-1].detach()
        mask = rmu_positions(b).bool()
        for i, j in enumerate(b.idx.tolist()):
            if mask[i].any():
                out[j] = h[i, mask[i]].cpu()
    return out


def rmu_control(hidden: int, seed: int) -> torch.Tensor:
    """u: a fixed random unit vector (H,), uniform [0, 1) entries normalised, as the WMDP code draws it."""
    u = torch.rand(hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u / u.norm()).float()


RMU_PARAMS = ("down", "mlp")  # --rmu-params: WMDP's code (down_proj), or the whole MLP (the tiny default)


def rmu_trainable(model, layer: int, params: str = "mlp") -> list[str]:
    """Freeze every weight except, in decoder layers l-2..l (the steered layer and the two below),
    mlp.down_proj (params "down": WMDP's code, param_ids [6], for which its c, alpha and lr were
    tuned) or the whole MLP (params "mlp": gate, up and down, three times as many parameters);
    returns the trained parameter names. Under FSDP2 the unsharded parameters follow the sharded
    ones' requires_grad."""
    assert params in RMU_PARAMS, f"--rmu-params must be one of {RMU_PARAMS}, got {params!r}"
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"--rmu-layer {layer}: this model has decoder layers 0..{len(layers) - 1}")
    model.requires_grad_(False)
    for k in range(max(0, layer - 2), layer + 1):
        (layers[k].mlp.down_proj if params == "down" else layers[k].mlp).requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def rmu(model, forget, retain, totals, *, layer: int, coeff: float, retain_weight: float,
        control: torch.Tensor, frozen: list, stop: bool):
    """RMU (Li et al. 2024, WMDP, arXiv 2403.03218), h = output of decoder layer l:

        L = mean_t mean_d (h_theta(x_t) - c u)_d^2          over forget answer positions t
          + alpha * mean_t mean_d (h_theta(x_t) - h_frozen(x_t))_d^2   over retain answer positions

    alpha = retain_weight (--retain-weight), c = coeff, u = control (unit vector). The paper writes
    squared L2 norms (a sum over d); the WMDP code, whose c and alpha we quote, means over d (mse_loss).
    h_frozen comes from the cache (rmu_reference), row by row through the batch's item indices.
    """
    need_retain("rmu", retain)
    hf = layer_output(model, forget, layer, stop)[:, :-1]  # (B, T-1, H)
    f = masked_mse_sum(hf, coeff * control.to(hf.device), rmu_positions(forget)) / totals["forget_tokens"]
    hr = layer_output(model, retain, layer, stop)[:, :-1]
    r = masked_mse_sum(hr, frozen_rows(frozen, retain, hr.float()), rmu_positions(retain)) / totals["retain_tokens"]
    return f + retain_weight * r, {"forget_mse": f.item(), "retain_mse": r.item()}


def rmu_prepare(p) -> dict:
    """RMU's preparation: only --rmu-params of layers l-2..l left trainable, the control vector u
    (seeded) and the frozen model's layer-l activations on every retain item the plan uses, computed
    once from the model as it is now (the target), in length-sorted batches, or taken from the
    checkpoint of a resumed run. Under torchrun every rank computes the whole cache (the same forwards
    everywhere: FSDP forwards are collectives); after a no-grad forward the FSDP root stays unsharded."""
    cfg = p.cfg
    rmu_trainable(p.model, cfg.rmu_layer, cfg.rmu_params)
    used = sorted({j for micros in p.plan for _, r in micros for j in r})
    groups = lume.length_batches([len(p.retain[j][0]) for j in used], cfg.batch_size, 1 << 30)
    batches = p.each([p.batch(p.retain, [used[k] for k in g]) for g in groups], "RMU cache: batch")
    cached = (p.saved or {}).get("rmu")
    if cached is None:
        cached = rmu_reference(p.model, batches, len(p.retain), cfg.rmu_layer, p.autocast, stop=p.dist is None)
        if p.dist is not None:
            p.model.reshard()
    return {"control": rmu_control(p.model.config.hidden_size, cfg.seed), "frozen": cached, "stop": p.dist is None}


def plus_retain_nll(model, f, terms: dict, retain, totals, retain_weight: float):
    """(f + retain_weight * NLL(retain) / retain tokens, terms with "retain_nll"), or (f, terms) when
    the weight is 0 or the step has no retain rows: STAT's and UNDIAL's optional retain term."""
    if retain_weight and retain is not None:
        r = nll_sum(model, retain) / totals["retain_tokens"]
        terms["retain_nll"] = r.item()
        return f + retain_weight * r, terms
    return f, terms


# -----------------------------------------------------------------------------
# STAT: synthetic token alternative training (YNU, SemEval-2025 Task 4, 3rd on the 7B)


def pseudo_answers(b, vocab: int, seed: int) -> torch.Tensor:
    """b.ids with every answer token but the last (EOS) replaced by a seeded random token of
    [0, vocab) that is never the true token at that position: (B, T). Row i's draw depends only on
    (seed, item b.idx[i]), so an item keeps the same pseudo answer in every epoch, batch and rank
    (STAT's first stage generates them once). EOS stays, so the model still learns where to stop."""
    ids = b.ids.clone()
    mask = b.target_mask.bool().clone()
    last = mask.cumsum(-1) == mask.sum(-1, keepdim=True)  # (B, T) the last answer token (EOS) ...
    mask &= ~last  # ... keeps its true id
    for i, item in enumerate(b.idx.tolist()):
        n = int(mask[i].sum())
        if n:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + item)
            r = torch.randint(0, vocab - 1, (n,), generator=gen).to(ids.device)
            true = ids[i, mask[i]]
            ids[i, mask[i]] = r + (r >= true).long()  # skip the true id: uniform over the other vocab - 1
    return ids


def stat(model, forget, retain, totals, *, vocab: int, seed: int, retain_weight: float):
    """STAT (Chen, Luo and Tang, "YNU at SemEval-2025 Task 4: Synthetic Token Alternative Training for
    LLM Unlearning", SemEval 2025, aclanthology 2025.semeval-1.264). Stage 1: each forget answer's
    tokens are replaced by random vocabulary tokens y~ (pseudo_answers); stage 2: the model is trained
    with the ordinary NLL on these pseudo-token samples, alternating with unmodified retain samples:

        L = NLL(y~ | x) over forget answer tokens + retain_weight * NLL(y | x) over retain answer tokens

    both token-normalised (the sum over the step's answer tokens / their number). A LUME step pairs
    each forget micro-batch with its retain rows, so one optimizer step holds one forget and one
    retain batch: the alternation at the granularity of a step's two halves (the paper alternates
    batches between optimizer steps; here their gradients are summed, docs/methods.md). The NLL is
    minimised, never maximised: the answer is overwritten rather than pushed to infinite loss.
    """
    pseudo = Batch(pseudo_answers(forget, vocab, seed), forget.attn, forget.target_mask, forget.idx)
    f = nll_sum(model, pseudo) / totals["forget_tokens"]
    return plus_retain_nll(model, f, {"pseudo_nll": f.item()}, retain, totals, retain_weight)


def stat_prepare(p) -> dict:
    """STAT's preparation: the vocabulary its pseudo tokens are drawn from (the tokenizer's ids that the
    model has rows for) and the seed that fixes each item's draw."""
    return {"vocab": min(len(p.tok), p.model.config.vocab_size), "seed": p.cfg.seed}


# -----------------------------------------------------------------------------
# UNDIAL: self-distillation with adjusted logits (Dong et al., NAACL 2025, arXiv 2402.10052)


def undial_targets(ref_logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """q = softmax(z_ref - gamma * onehot(y)): (..., V) fp32, the frozen model's next-token
    distribution with the label's logit lowered by gamma (the others keep their ratios)."""
    z = ref_logits.float().clone()
    z.scatter_add_(-1, labels.unsqueeze(-1), torch.full_like(labels, -gamma, dtype=z.dtype).unsqueeze(-1))
    return F.softmax(z, -1)


def undial(model, forget, retain, totals, *, gamma: float, retain_weight: float, ref):
    """UNDIAL (Dong et al. 2025, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning
    in Large Language Models", NAACL 2025, eq. 2-3): self-distillation toward the frozen model's
    distribution with the true token's logit lowered by gamma (the paper's beta, "strength"),

        q_t = softmax(z_ref(x_<t) - gamma * e_{y_t}),   L = mean_t CE(q_t, p_theta(. | x_<t))
            = -(1/N) sum_t sum_v q_t[v] log p_theta(v | x_<t)

    over forget answer tokens t (N: the step's forget answer tokens, token-normalised as every
    token-level term here; open-unlearning's reference code means over every position of the
    batch instead), plus retain_weight * NLL(retain) (0, the paper's: no retain rows). The frozen
    logits z_ref come from `ref` under no_grad once per micro-batch. At the start (theta = ref) the
    gradient w.r.t. the logits of answer token t is (p_t - q_t) / N, zero except through gamma: the
    label's probability is lowered to p_y e^-gamma / (1 - p_y + p_y e^-gamma), the rest rescaled.
    """
    logits = model(input_ids=forget.ids, attention_mask=forget.attn).logits[:, :-1].float()  # (B, T-1, V)
    with torch.no_grad():
        ref_logits = ref(input_ids=forget.ids, attention_mask=forget.attn).logits[:, :-1]
        q = undial_targets(ref_logits, forget.ids[:, 1:], gamma)  # (B, T-1, V)
    ce = -(q * F.log_softmax(logits, -1)).sum(-1)  # (B, T-1)
    f = (ce * forget.target_mask[:, 1:]).sum() / totals["forget_tokens"]
    return plus_retain_nll(model, f, {"undial_ce": f.item()}, retain, totals, retain_weight)


# -----------------------------------------------------------------------------
# the declarations: one per method, all the rest of the project reads about a method


@dataclass
class Prep:
    """What a method's prepare function may use: the run's Config, model, tokenizer, plan (global row
    indices) and steps (this process's Batches), the retain encodings (lume.encode_pair's), autocast,
    dist (None in one process), saved (checkpoint key -> value of a resumed run, else None), and the
    run's plumbing: reference_logps(batches) -> (n forget,) log pi(y|x) of the model as it is (sharded
    under torchrun), frozen_copy() -> a frozen reference model, batch(encoded, idx) -> a Batch,
    each(batches, label) -> the batches with a progress line."""
    cfg: object
    model: object
    tok: object
    plan: list
    steps: list
    retain: list
    autocast: object
    dist: object
    saved: dict | None
    reference_logps: Callable
    frozen_copy: Callable
    batch: Callable
    each: Callable


@dataclass(frozen=True)
class Default:
    """A value an "auto" flag resolves to: for the tiny target, for any other model, and the source
    of the real one (paper or repository, file, key), or why it was chosen where there is none."""
    tiny: object
    real: object
    source: str


@dataclass(frozen=True)
class Memory:
    """How memory.py plans a step of the method: retain_rows (a step runs as many retain rows as
    forget rows), frozen_copy (a frozen reference model beside the trained one, its full-vocabulary
    distributions kept for the backward). approx: why the plan is an upper bound rather than the
    method's own, or "" when it is the method's exactly (memory.py's tables list those)."""
    retain_rows: bool
    frozen_copy: bool = False
    approx: str = ""


@dataclass(frozen=True)
class Method:
    """One unlearning method, declared once:

    title      its name in messages ("NPO")
    loss       loss(model, forget, retain, totals, **options) -> (loss, {term: float})
    retain     "no" (no retain rows), "yes" (always: its loss has a retain term), or "weighted"
               (retain rows only when --retain-weight > 0: its pure form has none)
    options    loss keyword <- Config field, passed as they are (e.g. layer <- rmu_layer)
    fields     other Config fields it reads (in prepare), refused for every other method
    prepare    prepare(p: Prep) -> more loss options, built once before training (a reference, a cache)
    defaults   Config field -> Default: what its "auto" resolves to, with the source
    memory     Memory: how the memory plan counts a step
    checks     checks(cfg) -> [problem lines]: option values only this method refuses
    state      checkpoint key -> (option, "shared" | "retain rows"): what --save-every writes and
               --resume hands back to prepare (Prep.saved): a value every rank holds, or a list per
               retain item of which each rank keeps the entries of the rows it trains on
    own_params prepare chooses the trainable weights itself (no --lora-rank / --train-layers)
    note       note(cfg) -> a line printed at the start, or None
    """
    title: str
    loss: Callable
    retain: str = "no"
    options: dict = field(default_factory=dict)
    fields: tuple = ()
    prepare: Callable | None = None
    defaults: dict = field(default_factory=dict)
    memory: Memory = Memory(retain_rows=True)
    checks: Callable | None = None
    state: dict = field(default_factory=dict)
    own_params: bool = False
    note: Callable | None = None


def npo_note(cfg) -> str:
    return (f"  the NPO loss starts at (2/beta) log 2 = {2 / cfg.beta * 0.6931:.2f} per batch (the model is "
            "its own reference) and falls toward 0 as the batch's answers become unlikely; batches swing "
            "between the two while some answers are forgotten and others not yet")


GAMMA_UNDIAL = (0.0, 100.0)  # UNDIAL's gamma: > 0 (0 would distil the model into itself); beyond 100, e^-gamma
# is 0 in fp32 already (the paper's grid: 3, 10, 30)


def undial_checks(cfg) -> list[str]:
    low, high = GAMMA_UNDIAL
    if cfg.gamma is not None and cfg.gamma == cfg.gamma and not low < cfg.gamma <= high:  # NaN: range_problems'
        return [f"--gamma for undial (the label logit's adjustment) must be in ({low:g}, {high:g}], got {cfg.gamma}"]
    return []


# The sources of the real-model defaults (the authors' code where there is code; each number at the
# file and key named). TINY: chosen on the built-in data with the tiny target (docs/methods.md).
TINY = "tiny: chosen on the built-in data (docs/methods.md)"
UNLEARN_SIMPLE = "OPTML-Group/Unlearn-Simple (SimNPO, Fan et al. 2024)"
NPO_REPO = "licong-lin/negative-preference-optimization (NPO, Zhang et al. 2024)"
WMDP = ("centerforaisafety/wmdp (RMU, Li et al. 2024): run_rmu_zephyr.ipynb's command for Zephyr-7B, "
        "rmu/unlearn.py for the rest")
OPEN_UNLEARNING = "locuslab/open-unlearning"
RW = {"retain_weight": "retain_weight"}

METHODS = {
    "ga": Method("GA", ga, memory=Memory(retain_rows=False)),
    "gd": Method("GD", gd, "yes", RW, defaults={"retain_weight": Default(
        1.0, 1.0, f"{UNLEARN_SIMPLE}, TOFU/dataloader.py, grad_diff: loss = forget_loss + retain_loss")}),
    "kl": Method("KL", kl, "yes", RW, prepare=frozen_reference, memory=Memory(True, frozen_copy=True),
                 defaults={"retain_weight": Default(
                     1.0, 1.0, f"{UNLEARN_SIMPLE}, TOFU/dataloader.py, KL: loss = forget_loss + retain_loss")}),
    "npo": Method("NPO", npo, "weighted", {"beta": "beta", **RW}, prepare=npo_prepare, note=npo_note,
                  state={"ref_logps": ("ref_logps", "shared")}, defaults={
                      "beta": Default(0.1, 0.1, f"{NPO_REPO}, config/forget.yaml, beta: 0.1"),
                      # tiny: NPO's retain NLL competes with a loss ~(2/beta) log 2 = 14: weighed more
                      "retain_weight": Default(3.0, 1.0, f"{NPO_REPO}, config/forget.yaml, grad_diff_coeff: 1.0 "
                                               "(npo_coeff: 1.0; TOFU/dataloader.py npo_grad_diff: "
                                               "npo_coeff * forget_loss + grad_diff_coeff * retain_loss)")}),
    "simnpo": Method("SimNPO", simnpo, "weighted", {"beta": "beta", "gamma": "gamma", **RW},
                     memory=Memory(True, approx="planned as NPO, whose cached reference log-probs it lacks"),
                     defaults={
                         "beta": Default(2.5, 2.5, f"{UNLEARN_SIMPLE}, TOFU/run_scripts.py, "
                                         "gen_commands_simnpo_tofu_forget05: beta 2.5 of its grid (the paper's "
                                         "TOFU forget05 value)"),
                         "gamma": Default(0.0, 0.0, f"{UNLEARN_SIMPLE}, TOFU/config/forget.yaml, gamma: 0.0"),
                         "retain_weight": Default(1.0, 0.1375, f"{UNLEARN_SIMPLE}, TOFU/run_scripts.py, forget05: "
                                                  "grad_diff_coeff=0.1375 with TOFU/config/forget.yaml npo_coeff: "
                                                  "1.0 (TOFU/dataloader.py simnpo_grad_diff: npo_coeff * "
                                                  "forget_loss + grad_diff_coeff * retain_loss)")}),
    "rmu": Method("RMU", rmu, "yes", {"layer": "rmu_layer", "coeff": "rmu_coeff", **RW}, ("rmu_params",),
                  prepare=rmu_prepare, state={"rmu": ("frozen", "retain rows")}, own_params=True,
                  memory=Memory(True, approx="planned as GD: its few trainable MLPs and its layer-l cache "
                                             "cost less than GD's full gradients"),
                  defaults={
                      "rmu_layer": Default(2, 7, f"{WMDP}: --layer_id 7 (layers 5, 6, 7 train)"),
                      "rmu_coeff": Default(100.0, 6.5, f"{WMDP}: --steering_coeffs 6.5,6.5"),
                      "retain_weight": Default(10.0, 1200.0, f"{WMDP}: --alpha 1200,1200"),
                      "lr": Default(3e-3, 5e-5, f"{WMDP}: --lr 5e-5"),
                      "rmu_params": Default("mlp", "down", f"{WMDP}: --param_ids 6 (mlp.down_proj)")}),
    "stat": Method("STAT", stat, "weighted", RW, prepare=stat_prepare,
                   memory=Memory(True, approx="planned as GD (forget and retain rows, full gradients)"),
                   defaults={"retain_weight": Default(
                       1.0, 1.0, "Chen, Luo and Tang 2025 (YNU, SemEval 2025, aclanthology 2025.semeval-1.264), "
                                 "as the paper describes it: pseudo-token and retain batches alternate, unweighted (no code of "
                                 "theirs checked)")}),
    "undial": Method("UNDIAL", undial, "weighted", {"gamma": "gamma", **RW}, prepare=frozen_reference,
                     checks=undial_checks, memory=Memory(True, frozen_copy=True, approx="planned as KL, which "
                                                        "also runs retain rows: an upper bound"),
                     defaults={
                         "gamma": Default(10.0, 10.0, f"{OPEN_UNLEARNING}, configs/trainer/UNDIAL.yaml, beta: 10.0 "
                                                      "(the paper's strength, mid-grid of 3/10/30)"),
                         "retain_weight": Default(0.0, 0.0, f"{OPEN_UNLEARNING}, configs/trainer/UNDIAL.yaml, "
                                                            "alpha: 0.0 (the paper uses no retain set)")}),
}
DEFAULT = "npo"  # run.py's --method when none is given: the LUME paper's strongest baseline
# What every method shares, where its own declaration says nothing (run.py's resolution reads both).
SHARED_DEFAULTS = {
    "lr": Default(1e-4, 1e-5, f"{NPO_REPO}, config/forget.yaml, lr: 1e-5 (also {UNLEARN_SIMPLE}, "
                              "TOFU/config/forget.yaml)"),
    "lora_lr": Default(3e-4, 1e-4, f"{OPEN_UNLEARNING}, community/methods/UNDIAL/README.md: LoRA "
                                   "(rank 8, alpha 16) with learning rate 1e-4"),
    "epochs": Default(20.0, 5.0, "project choice: no single source (NPO's config/forget.yaml 10, "
                                 "AILS-NTUA's 7 per chunk)"),
    "beta": Default(0.1, 0.1, "unused by this method; recorded as NPO's"),
    "gamma": Default(0.0, 0.0, "unused by this method"),
    "retain_weight": Default(1.0, 1.0, "unused by this method"),
}


def register(name: str, method: Method) -> None:
    """Add a method (a test's or a fork's) under --method name: everything reads METHODS."""
    assert name not in METHODS and name != "none", f"--method {name} exists already"
    METHODS[name] = method


def uses_retain(method: str, retain_weight) -> bool:
    """Whether a run of `method` draws retain rows (retain_weight: the resolved --retain-weight)."""
    spec = METHODS[method]
    return spec.retain == "yes" or (spec.retain == "weighted" and retain_weight != 0)


def needs_retain(method: str) -> bool:
    """Whether `method` may draw retain rows at all (the memory plan and gpureport count them)."""
    return METHODS[method].retain != "no"
