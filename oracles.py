"""
Measured against a retain-only oracle (--oracle MODEL): does the unlearned model look like a model
that never saw the forget set?

    python run.py --task 1 --method npo --oracle tiny        # oracle/: the tiny recipe without the forget items
    python run.py --task 1 --method npo --model olmo-7b --oracle DIR   # a model trained on the retain sets

The oracle is scored once like a stage (every item, MIA and MMLU as configured; rows with stage
"oracle"), cached under --cache-dir by its identity (identity.model_identity: the weights' sha256)
and what is scored, and results.json gets "oracle" (a new key: every other key is as without it):
  scores      each official score of the unlearned model beside the oracle's
  privleak    per MIA statistic, MUSE's PrivLeak (Shi et al. 2024, arXiv 2407.06460, eval.py):
                  100 (AUC_unlearned - AUC_oracle) / AUC_oracle   (percent; 0 = as the oracle,
              > 0 under-unlearned, < 0 over-unlearned); MUSE reports it for Min-40% (min_k_40), the
              official LUME MIA is `loss`. The oracle's own AUC is the reference point, not 0.5.
  ks          the two-sample Kolmogorov-Smirnov statistic and p-value between the unlearned and the
              oracle's per-item forget losses (mean answer-token NLL, attacks.item_nll). TOFU's
              "forget quality" is the KS p-value of truth ratios, which need perturbed answers that
              LUME lacks: this is the KS test on the losses, named as such.
  separation  per metric, the AUC over forget items (MIA statistics: over member documents) of the
              target's values against the oracle's, each oriented so that higher = holds the
              knowledge (OpenUnlearning, arXiv 2506.12618: how well a metric tells the two apart;
              1 = always, 0.5 = not at all). Needs the before stage.
"""
import hashlib
import json
import math
from pathlib import Path

import numpy as np

import attacks
import identity
import lume
import membership
import metrics
import rundir
import tiny

# -----------------------------------------------------------------------------
# the statistics


def ks_2samp(x, y, exact_limit: int = 1_000_000) -> tuple[float, float]:
    """(D, p): two-sided two-sample KS. D = max_t |F_x(t) - F_y(t)| over the pooled values (empirical
    CDFs). p = P(D' >= D) under H0 (continuous, no ties): exact when n m <= exact_limit, by counting
    the monotone lattice paths (0,0) -> (n,m) that stay strictly inside |i m - j n| < D n m (all
    integers), p = 1 - inside / C(n+m, n); else Kolmogorov's limit 2 sum_k (-1)^(k-1) e^(-2 k^2 t^2),
    t = D sqrt(n m / (n + m)) (scipy.stats.ks_2samp's method="exact"; its "asymp" uses kstwo at
    round(n m / (n + m)) instead of the limit law, which differs at small n)."""
    x, y = np.sort(np.asarray(x, np.float64)), np.sort(np.asarray(y, np.float64))
    n, m = len(x), len(y)
    if not n or not m:
        raise ValueError("ks_2samp needs two non-empty samples")
    pooled = np.concatenate([x, y])
    i = np.searchsorted(x, pooled, side="right")  # n F_x at each pooled value
    j = np.searchsorted(y, pooled, side="right")
    k = int(np.abs(i * m - j * n).max())  # D n m, an integer
    d = k / (n * m)
    if n * m <= exact_limit:
        row = [1] + [0] * m  # paths to (i, j) staying inside, row i at a time
        for a in range(n + 1):
            for b in range(m + 1):
                if abs(a * m - b * n) >= k:
                    row[b] = 0
                elif a or b:
                    row[b] = (row[b] if a else 0) + (row[b - 1] if b else 0)
        return d, max(0.0, min(1.0, 1 - row[m] / math.comb(n + m, n)))
    t = d * math.sqrt(n * m / (n + m))
    p = 2 * sum((-1) ** (q - 1) * math.exp(-2 * q * q * t * t) for q in range(1, 101))
    return d, max(0.0, min(1.0, p))


def privleak(auc_unlearned, auc_oracle):
    """MUSE's PrivLeak, percent: 100 (AUC_unlearned - AUC_oracle) / AUC_oracle (None if either is missing)."""
    if auc_unlearned is None or auc_oracle is None or not auc_oracle:
        return None
    return 100 * (auc_unlearned - auc_oracle) / auc_oracle


def stage_values(gen_rows, mia_rows, stage: str, forget_ids: set) -> dict:
    """{metric: {key: value}} of one stage, each oriented higher = holds the knowledge: the forget
    items' regurgitation (ROUGE-L recall, sc) and knowledge (exact match, qa), and per member
    document every MIA statistic (membership.SIGNS)."""
    out = {"regurgitation": {}, "knowledge": {}}
    for r in gen_rows:
        if r["stage"] == stage and r["id"] in forget_ids:
            out["regurgitation" if r["kind"] == "sc" else "knowledge"][r["id"]] = r["score"]
    for name, sign in membership.SIGNS.items():
        out[f"mia_{name}"] = {r["id"]: sign * r[name] for r in mia_rows if r["stage"] == stage and r["set"] == "member"}
    return out


def separation(target: dict, oracle: dict) -> dict:
    """{metric: AUC of the target's values against the oracle's} (metrics.roc_auc: P(target > oracle)
    + 1/2 P(tie)); None for a metric with no values."""
    return {k: metrics.roc_auc(list(target[k].values()), list(oracle[k].values()))
            if target.get(k) and oracle.get(k) else None for k in oracle}


def flat_scores(res: dict) -> dict:
    """{'forget Task1 regurgitation-score': x, ..., 'mia_loss_acc': y, ...} of an official results dict."""
    out = {}
    for split in ("forget-set", "retain-set"):
        for task, scores in sorted(res.get(split, {}).items()):
            if isinstance(scores, dict):
                out.update({f"{split[:-4]} {task} {k}": v for k, v in scores.items()})
            else:
                out[f"{split[:-4]} {task}"] = scores
    out.update({k: v for k, v in res.items() if not isinstance(v, dict)})
    return out


def compare(results: dict, oracle: dict, losses: dict, gen_rows, mia_rows, forget_ids) -> dict:
    """results.json's "oracle": results = the run's stages; oracle = the oracle's cached scores
    ("results", "generations", "mia", "losses"); losses = {"target", "after"}: per forget item."""
    after, ores = results["after"], oracle["results"]
    au, ao = after.get("mia_attacks", {}), ores.get("mia_attacks", {})
    d, p = ks_2samp(losses["after"], oracle["losses"])
    out = {"model": oracle["model"], "results": ores,
           "scores": {k: {"unlearned": v, "oracle": flat_scores(ores).get(k)} for k, v in flat_scores(after).items()},
           "mia_auc": {k: {"unlearned": au.get(k), "oracle": v} for k, v in ao.items()},
           "privleak": {k: privleak(au.get(k), v) for k, v in ao.items()},
           "ks": {"statistic": d, "p_value": p, "n_unlearned": len(losses["after"]), "n_oracle": len(oracle["losses"]),
                  "what": "two-sample KS between per-item forget losses (not TOFU's forget quality)"},
           "forget_loss_mean": {"unlearned": float(np.mean(losses["after"])), "oracle": float(np.mean(oracle["losses"]))}}
    if "before" in results and losses.get("target") is not None:
        theirs = stage_values(oracle["generations"], oracle["mia"], "oracle", forget_ids)
        ours = stage_values(gen_rows, mia_rows, "before", forget_ids)
        ours["loss"] = {i: -v for i, v in zip(sorted(forget_ids), losses["target"])}
        theirs["loss"] = {i: -v for i, v in zip(sorted(forget_ids), oracle["losses"])}
        out["separation"] = separation(ours, theirs)
        out["ks_target"] = dict(zip(("statistic", "p_value"), ks_2samp(losses["target"], oracle["losses"])))
    return out


# -----------------------------------------------------------------------------
# the oracle's scores, computed once and cached


def cache_key(model_name: str, what: dict) -> str:
    """The oracle's scores' cache key: its identity (weights' sha256) and what is scored."""
    ident = identity.model_identity(model_name)
    return hashlib.sha256(json.dumps([ident, what], sort_keys=True, default=str).encode()).hexdigest()[:16]


def oracle_scores(path: str, cache_dir, what: dict, load, score, forget_items, device, log=lume.print0) -> dict:
    """{"model", "results", "generations", "mia", "losses"} of the oracle at `path`: from
    <cache_dir>/oracle-scores/<key>.json when there, else load() -> (model, tok), score(model, tok)
    -> (generation rows, MIA rows, results) and the per-item forget losses (in sorted id order),
    written there atomically."""
    f = Path(cache_dir) / "oracle-scores" / f"{cache_key(path, what)}.json"
    if f.is_file():
        log(f"oracle: cached scores {f}")
        return json.loads(f.read_text())
    model, tok = load()
    g, m, res = score(model, tok)
    items = sorted(forget_items, key=lambda it: it.id)
    out = {"model": str(path), "results": res, "generations": g, "mia": m,
           "losses": attacks.item_nll(model, tok, items, device)}
    f.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_json_atomic(f, out)
    return out


# -----------------------------------------------------------------------------
# a run's "oracle" entry (job.run_job's two calls)


def forget_items(cfg, items) -> list:
    """The unlearned tasks' forget items, sorted by id (the order of every per-item loss list)."""
    tasks = {1, 2, 3} if cfg.task == "all" else {int(cfg.task)}
    return sorted((it for it in items if it.split == "forget" and it.task in tasks), key=lambda it: it.id)


def target_losses(cfg, model, tok, items, device):
    """The target's per-item forget losses (before unlearning), when there is an oracle to compare with."""
    return attacks.item_nll(model, tok, forget_items(cfg, items), device) if cfg.oracle else None


def oracle_path(cfg, items) -> str:
    """--oracle's model: tiny = the tiny recipe's retain-only oracle of these items (oracle/ for the
    default data, else built once into the cache), anything else as given."""
    if cfg.oracle == "tiny":
        return str(tiny.tiny_target(items, cfg.cache_dir, log=lume.print0, oracle=True))
    return cfg.oracle


def attach(cfg, model, tok, inputs, scored: dict, device, score, losses_before) -> dict:
    """scored with results.json's "oracle" (compare) and the oracle's rows (stage "oracle");
    score(model, tok) -> the oracle's (generation rows, MIA rows, results) as a stage is scored."""
    items = inputs[0]
    path = oracle_path(cfg, items)
    what = {"items": tiny.fingerprint(items, {}), "mia": sorted(d.id for s in (inputs[1] or {}).values() for d in s),
            "mmlu": bool(inputs[2]), "mmlu_limit": cfg.mmlu_limit, "max_new_tokens": cfg.max_new_tokens,
            "eval_precision": cfg.eval_precision, "forget": [it.id for it in forget_items(cfg, items)]}
    got = oracle_scores(path, cfg.cache_dir, what, lambda: lume.load_pretrained(path), score,
                        forget_items(cfg, items), device)
    losses = {"target": losses_before, "after": attacks.item_nll(model, tok, forget_items(cfg, items), device)}
    entry = compare(scored["results"], got, losses, scored["generations"], scored["mia"],
                    {it.id for it in forget_items(cfg, items)})
    pl = entry["privleak"].get("loss")
    lume.print0(f"oracle {path}: KS between per-item forget losses D = {entry['ks']['statistic']:.3f} "
                f"(p = {entry['ks']['p_value']:.3g}); PrivLeak (loss MIA) "
                f"{'-' if pl is None else f'{pl:+.1f}%'} (oracle AUC {entry['mia_auc'].get('loss', {}).get('oracle')})")
    return {"generations": scored["generations"] + got["generations"], "mia": scored["mia"] + got["mia"],
            "results": {**scored["results"], "oracle": entry}}
