"""Markdown tables of docs/attacks.md from the runs' results.json (python docs/attacks_table.py DIR...):
per run and stage the unlearned tasks' forget scores and recoveries, the one-line summary per run
(the README's), and the MIA AUCs. With --verdicts first (runs with --attacks nf4,fp4,int8-outlier,relearn
--oracle tiny): the verdict table of docs/attacks.md (issue 36): relearn's recipe alone beside the sweep's best,
the bitsandbytes quantisers' recovery, KS and PrivLeak against the retain-only oracle, and the oracle's
own scores."""
import json
import sys
from pathlib import Path

MIAS = ("loss", "zlib", "min_k_20", "min_k_40", "min_k_pp_20", "min_k_pp_40")
STAGES = ("before", "after", "quant8", "quant4", "relearn", "unrelated", "fewshot")
f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
g = lambda x: "-" if x is None else f"{x:+.2f}"  # noqa: E731


def forget(res, tasks):
    """(regurgitation, knowledge) of the unlearned tasks: the task's, or the overall of the forget set."""
    fs = res["forget-set"]
    if len(tasks) == 1:
        return fs[tasks[0]]["regurgitation-score"], fs[tasks[0]]["knowledge-score"]
    return fs["overall-regurgitation-score"], fs["overall-knowledge-score"]


def mean(vals):
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def name_of(cfg) -> str:
    extra = (f" LoRA {cfg['lora_rank']}" if cfg.get("lora_rank") else f" last-{cfg['train_layers']}"
             if cfg.get("train_layers") else f" ({cfg['rmu_params']})" if cfg["method"] == "rmu" and
             cfg.get("rmu_params", "auto") != "auto" else "")
    return f"{cfg['method'].upper()}{extra} task {cfg['task']}"


def stage_row(res, stage, tasks):
    """(regurgitation, knowledge, recovery regurgitation, recovery knowledge, attacker params) of a stage."""
    rob = res.get("robustness", {})
    if stage in ("before", "after"):
        return (*forget(res[stage], tasks), None, None, None)
    e = rob[stage]
    rec = e["recovery"]
    params = e.get("attacker", {}).get("trainable_params")
    if stage == "fewshot":  # the knowledge with the shots; regurgitation is not asked
        return (None, mean(k["with_shots"] for k in e["knowledge"].values()), None,
                mean(r["knowledge"] for r in rec.values()), None)
    return (*forget(e, tasks), mean(r["regurgitation"] for r in rec.values()),
            mean(r["knowledge"] for r in rec.values()), params)


def verdicts(runs):
    """The verdict table (docs/attacks.md): one column per run, and the oracle's."""
    cols = [name_of(c) for _, c in runs]
    print("| | " + " | ".join(cols) + " | oracle (retain-only) |")
    print("|---" * (len(cols) + 2) + "|")
    tasks = [[f"Task{c['task']}"] if c["task"] != "all" else ["Task1", "Task2", "Task3"] for _, c in runs]

    def row(label, cells, oracle=""):
        print(f"| {label} | " + " | ".join(cells) + f" | {oracle} |")
    o = runs[0][0]["oracle"]["results"]
    row("forget knowledge after unlearning", [f(forget(r["after"], t)[1]) for (r, _), t in zip(runs, tasks)],
        f(forget(o, tasks[0])[1]))
    row("forget regurgitation after unlearning", [f(forget(r["after"], t)[0]) for (r, _), t in zip(runs, tasks)],
        f(forget(o, tasks[0])[0]))
    row("retain knowledge (mean of tasks)", [f(mean(r["after"]["retain-set"][k]["knowledge-score"] for k in
                                                    ("Task1", "Task2", "Task3"))) for r, _ in runs],
        f(mean(o["retain-set"][k]["knowledge-score"] for k in ("Task1", "Task2", "Task3"))))
    rel = [r["robustness"]["relearn"] for r, _ in runs]
    recipe = [next(p for p in e["sweep"]["points"] if (p["lr"], p["steps"]) == (e["sweep"]["base"]["lr"],
                                                                               e["sweep"]["base"]["steps"])) for e in rel]
    row("relearn V knowledge: after -> recipe alone (lr x1, 10 steps)",
        [f"{f(e['V_knowledge']['after'])} -> {f(p['V_knowledge'])}" for e, p in zip(rel, recipe)])
    row("relearn V knowledge: after -> sweep's best (its lr, steps)",
        [f"{f(e['V_knowledge']['after'])} -> {f(e['V_knowledge']['relearned'])} ({e['sweep']['best']['lr']:.0e}, "
         f"{e['sweep']['best']['steps']})" for e in rel])
    row("relearn V recovery: recipe alone / sweep's best",
        [f"{g(p.get('V_recovery'))} / {g(e['V_knowledge']['recovery'])}" for e, p in zip(rel, recipe)])
    for q in ("nf4", "fp4", "int8-outlier"):
        row(f"recovery after {q} (regurgitation / knowledge)",
            [f"{g(stage_row(r, q, t)[2])} / {g(stage_row(r, q, t)[3])}" for (r, _), t in zip(runs, tasks)])
    row("MIA AUC (loss)", [f(r["after"]["mia_loss_acc"]) for r, _ in runs], f(o["mia_loss_acc"]))
    row("PrivLeak vs oracle: loss / min_k_40 (%)", [f"{r['oracle']['privleak']['loss']:+.1f} / "
                                                    f"{r['oracle']['privleak']['min_k_40']:+.1f}" for r, _ in runs])
    row("KS D (p): per-item forget losses vs oracle", [f"{r['oracle']['ks']['statistic']:.3f} "
                                                       f"({r['oracle']['ks']['p_value']:.2g})" for r, _ in runs])
    row("mean forget loss (nats/token)", [f"{r['oracle']['forget_loss_mean']['unlearned']:.2f}" for r, _ in runs],
        f"{runs[0][0]['oracle']['forget_loss_mean']['oracle']:.2f}")


VERDICTS = sys.argv[1:2] == ["--verdicts"]
runs = [(json.load(open(Path(d) / "results.json")), json.load(open(Path(d) / "config.json")))
        for d in sys.argv[1 + VERDICTS:]]
if VERDICTS:
    verdicts(runs)
    sys.exit(0)
print("| run | stage | forget regurgitation | forget knowledge | recovery regurgitation | recovery knowledge "
      "| V knowledge (exact match) | attacker trains |")
print("|---|---|---|---|---|---|---|---|")
for res, cfg in runs:
    tasks = [f"Task{cfg['task']}"] if cfg["task"] != "all" else ["Task1", "Task2", "Task3"]
    v = res["robustness"].get("relearn", {}).get("V_knowledge", {})
    for stage in STAGES:
        if stage not in res and stage not in res["robustness"]:
            continue
        reg, know, rreg, rknow, params = stage_row(res, stage, tasks)
        vk = {"before": v.get("before"), "after": v.get("after"), "relearn": v.get("relearned")}.get(stage)
        shown = stage if stage != "fewshot" else f"fewshot ({res['robustness']['fewshot']['k']} shots)"
        print(f"| {name_of(cfg)} | {shown} | {f(reg)} | {f(know)} | {g(rreg) if stage in res['robustness'] else ''} "
              f"| {g(rknow) if stage in res['robustness'] else ''} | {f(vk) if stage in ('before', 'after', 'relearn') else ''} "
              f"| {'' if params is None else f'{params:,}'} |")
print()
print("| run | forget knowledge after | quant4 recovery (regurg. / knowl.) | relearn: V after -> relearned "
      "| unrelated recovery (regurg. / knowl.) | fewshot: knowledge without -> with shots |")
print("|---|---|---|---|---|---|")
for res, cfg in runs:
    tasks = [f"Task{cfg['task']}"] if cfg["task"] != "all" else ["Task1", "Task2", "Task3"]
    rob = res["robustness"]
    q = stage_row(res, "quant4", tasks)
    u = stage_row(res, "unrelated", tasks)
    v = rob["relearn"]["V_knowledge"]
    fk = stage_row(res, "fewshot", tasks)[1]
    print(f"| {name_of(cfg)} | {f(forget(res['after'], tasks)[1])} | {g(q[2])} / {g(q[3])} | "
          f"{f(v['after'])} -> {f(v['relearned'])} | {g(u[2])} / {g(u[3])} | {f(forget(res['after'], tasks)[1])} -> {f(fk)} |")
print()
print("| run | stage | " + " | ".join(MIAS) + " |")
print("|---|---|" + "---|" * len(MIAS))
for res, cfg in runs:
    for stage in STAGES[:-1]:
        r = res[stage] if stage in ("before", "after") else res["robustness"][stage]
        print(f"| {name_of(cfg)} | {stage} | " + " | ".join(f(r["mia_attacks"][m]) for m in MIAS) + " |")
