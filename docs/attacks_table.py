"""Markdown tables of docs/attacks.md from the runs' results.json (python table.py DIR...)."""
import json
import sys
from pathlib import Path

MIAS = ("loss", "zlib", "min_k_20", "min_k_40", "min_k_pp_20", "min_k_pp_40")
f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
g = lambda x: "-" if x is None else f"{x:+.2f}"  # noqa: E731


def forget(res, tasks):
    """(regurgitation, knowledge) of the unlearned tasks: the task's, or the overall of the forget set."""
    fs = res["forget-set"]
    if len(tasks) == 1:
        return fs[tasks[0]]["regurgitation-score"], fs[tasks[0]]["knowledge-score"]
    return fs["overall-regurgitation-score"], fs["overall-knowledge-score"]


def mean_rec(rec, key):
    vals = [r[key] for r in rec.values() if r[key] is not None]
    return sum(vals) / len(vals) if vals else None


runs = [(Path(d), json.load(open(Path(d) / "results.json")), json.load(open(Path(d) / "config.json"))) for d in sys.argv[1:]]
print("| run | stage | forget regurgitation | forget knowledge | recovery regurgitation | recovery knowledge | V knowledge (exact match) |")
print("|---|---|---|---|---|---|---|")
for d, res, cfg in runs:
    name = f"{cfg['method'].upper()} task {cfg['task']}"
    tasks = list(res["robustness"]["quant8"]["recovery"])
    v = res["robustness"].get("relearn", {}).get("V_knowledge", {})
    for stage in ("before", "after", "quant8", "quant4", "relearn"):
        r = res[stage] if stage in ("before", "after") else res["robustness"][stage]
        reg, know = forget(r, tasks)
        rec = r.get("recovery")
        vk = {"before": v.get("before"), "after": v.get("after"), "relearn": v.get("relearned")}.get(stage)
        print(f"| {name} | {stage} | {f(reg)} | {f(know)} | {g(mean_rec(rec, 'regurgitation')) if rec else ''} | "
              f"{g(mean_rec(rec, 'knowledge')) if rec else ''} | {f(vk) if stage in ('before', 'after', 'relearn') else ''} |")
print()
print("| run | stage | " + " | ".join(MIAS) + " |")
print("|---|---|" + "---|" * len(MIAS))
for d, res, cfg in runs:
    name = f"{cfg['method'].upper()} task {cfg['task']}"
    for stage in ("before", "after", "quant8", "quant4", "relearn"):
        r = res[stage] if stage in ("before", "after") else res["robustness"][stage]
        print(f"| {name} | {stage} | " + " | ".join(f(r["mia_attacks"][m]) for m in MIAS) + " |")
