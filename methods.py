"""
Unlearning losses: Gradient Ascent, Gradient Difference, KL regularisation, NPO.

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
tokens' log-probabilities, and the loss is a mean over the step's sequences.
"""
import torch
import torch.nn.functional as F

from lume import nll_sum, seq_logps


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


METHODS = {"ga": ga, "gd": gd, "kl": kl, "npo": npo}
NEEDS_RETAIN = {"ga": False, "gd": True, "kl": True, "npo": True}
