"""
Scores during training, and which step to keep.

    python run.py --task 1 --method npo --eval-every 10 --keep best

Every --eval-every optimizer steps (and before the first), the run scores a fixed evaluation subset
and appends a row with the official keys to trajectory.jsonl; at the end it draws trajectory.png
(matplotlib, optional). The subset: every QA item (answers are short and where unlearning shows
first), SUBSET_SC sentence-completion items per task and split (a seeded sample, the same at every
step), every MIA document, and MMLU at SUBSET_MMLU questions per subject when MMLU is given.

--keep best keeps the step that select_best picks, by one rule with or without MMLU: among the
steps that forget something (an unlearned task's forget score below step 0's), the best harmonic
mean of the unlearned tasks' forget terms (1 - score) and all retain terms (ties: the higher mean
of those terms, then the earliest step). A filter comes first: with MMLU, the SemEval gate (MMLU >=
0.371, the award rule); without, keeping at least RETAIN_KEPT of step 0's retain scores. When no
step passes the filter, the rule ranks all of them and `why` says so, naming the step closest to it.
Step 0 (the target) is kept only when no later step forgets anything. The official aggregate would
not do: unlearning one task leaves the other tasks' forget terms at 0, so its harmonic mean is 0
at every step, and the target itself would win on MMLU (issue 21).

Selection apart from reporting (issue 36): under --keep best the scored steps see only the
selection subset (selection_split: per task, split and kind, the first half, rounded up, of the
items ordered by sha256(f"{seed}:select:{id}")), and results.json's "kept" reports the after scores
on the other half ("after_reported"); "after" itself scores every item, the selection items
included, so it is biased upward by the pick. The MIA term plays no part in the pick (select_best
reads the forget and retain scores and, with MMLU, the gate), so MIA documents are not split; the
MMLU gate reads the first SUBSET_MMLU questions per subject, which the after stage scores too.
"""
import hashlib
import math
import random
import statistics

import metrics

SUBSET_SC = 16      # sc items per task and split in the evaluation subset
SUBSET_MMLU = 10    # MMLU questions per subject in the evaluation subset (570 in all)
RETAIN_KEPT = 0.9   # --keep best without MMLU: a step must keep this share of the retain scores


def eval_subset(items, seed: int = 0) -> list:
    """Every QA item and SUBSET_SC seeded SC items per (task, split), in item order."""
    rng = random.Random(seed)
    keep = {it.id for it in items if it.kind == "qa"}
    for task in sorted({it.task for it in items}):
        for split in ("forget", "retain"):
            sc = [it.id for it in items if it.kind == "sc" and it.task == task and it.split == split]
            keep.update(rng.sample(sc, min(SUBSET_SC, len(sc))))
    return [it for it in items if it.id in keep]


def selection_split(items, seed: int) -> tuple[list, list]:
    """(selection, reported): per (task, split, kind), the items ordered by sha256(f"{seed}:select:{id}"),
    the first ceil(n / 2) to pick the kept step on, the rest to report; disjoint, in item order."""
    key = lambda it: hashlib.sha256(f"{seed}:select:{it.id}".encode()).hexdigest()  # noqa: E731
    chosen = set()
    for group in {(it.task, it.split, it.kind) for it in items}:
        members = sorted((it for it in items if (it.task, it.split, it.kind) == group), key=key)
        chosen.update(it.id for it in members[:math.ceil(len(members) / 2)])
    return [it for it in items if it.id in chosen], [it for it in items if it.id not in chosen]


def picking_items(cfg, items) -> list:
    """The items the scored steps see: the selection subset under --keep best, else every item."""
    return selection_split(items, cfg.seed)[0] if cfg.keep == "best" else items


RULE = ("the scored steps see only the selection subset; select_best picks among them (forget and retain scores, "
        "the MMLU gate with MMLU; the MIA term plays no part); after_reported scores the other items")


def kept_report(kept: dict, scored: dict, items, seed: int) -> dict:
    """results.json's "kept": the step and why, the rule, the selection subset and the after stage's
    official results on the reported items only (the MIA AUC and MMLU as the after stage's: the
    pick did not read MIA, and MMLU is not split)."""
    selection, reported = selection_split(items, seed)
    ids, after = {it.id for it in reported}, scored["results"]["after"]
    rows = [r for r in scored["generations"] if r["stage"] == "after" and r["id"] in ids]
    try:
        rep = metrics.aggregate(rows, after.get("mia_loss_acc"), after.get("mmlu_average"))
    except (AssertionError, ValueError) as e:  # a task whose sc or qa items all went to the selection
        rep = {"error": str(e)}
    return {**kept, "rule": RULE, "selection_ids": [it.id for it in selection], "n_reported": len(reported),
            "after_reported": rep, "after_includes_selection": True}


def config_record(cfg) -> dict:
    """config.json's record of the --keep best rule (nothing under --keep last)."""
    return {"keep_best_rule": {"rule": RULE, "selection": "per task, split and kind: the first ceil(n/2) by "
                               f"sha256('{cfg.seed}:select:<id>')"}} if cfg.keep == "best" else {}


def row(step: int, result: dict) -> dict:
    """One trajectory.jsonl row: the step (optimizer steps done) and the official results."""
    return {"step": step, **result}


def task_terms(result: dict, tasks: list[int]) -> list[float]:
    """The unlearned tasks' forget terms (1 - score) and every retain term."""
    terms = []
    for split in ("forget-set", "retain-set"):
        for task, scores in sorted(result[split].items()):
            if not task.startswith("Task") or (split == "forget-set" and int(task[4:]) not in tasks):
                continue
            for key in ("regurgitation-score", "knowledge-score"):
                terms.append(1 - scores[key] if split == "forget-set" else scores[key])
    return terms


def retain_mean(result: dict) -> float:
    vals = [s[k] for t, s in result["retain-set"].items() if t.startswith("Task")
            for k in ("regurgitation-score", "knowledge-score")]
    return sum(vals) / len(vals)


def forgets(r: dict, first: dict, tasks: list[int]) -> bool:
    """Whether row r has some unlearned task's forget score below its value in row `first`."""
    return any(r["forget-set"][f"Task{t}"][k] < first["forget-set"][f"Task{t}"][k]
               for t in tasks for k in ("regurgitation-score", "knowledge-score"))


def select_best(rows: list[dict], tasks: list[int]) -> tuple[dict, str]:
    """(the row to keep, why) among trajectory rows; rows[0] is step 0 (before unlearning)."""
    later = [r for r in rows[1:] if forgets(r, rows[0], tasks)]
    if not later:
        return rows[0], "no scored step forgot anything: the target before unlearning"
    if all("mmlu_average" in r for r in rows):
        passed = [r for r in later if r["mmlu_average"] >= metrics.MMLU_THRESHOLD]
        closest = max(later, key=lambda r: (r["mmlu_average"], -r["step"]))
        gate = (f"MMLU >= {metrics.MMLU_THRESHOLD}" if passed else
                f"no step that forgets kept MMLU >= {metrics.MMLU_THRESHOLD} (closest: step {closest['step']}, "
                f"MMLU {closest['mmlu_average']:.4f}), so all of them")
    else:
        floor = RETAIN_KEPT * retain_mean(rows[0])
        passed = [r for r in later if retain_mean(r) >= floor]
        closest = max(later, key=lambda r: (retain_mean(r), -r["step"]))
        gate = (f"that keep >= {RETAIN_KEPT:.0%} of the retain scores" if passed else
                f"no step that forgets kept >= {RETAIN_KEPT:.0%} of the retain scores (closest: step "
                f"{closest['step']}, {retain_mean(closest) / retain_mean(rows[0]):.0%}), so all of them")
    pool = passed or later
    # statistics.harmonic_mean, as metrics.aggregate takes the official one: 0 when any term is 0,
    # so the terms' plain mean breaks its ties (a step that forgot more of a half-forgotten task)
    rank = {r["step"]: (statistics.harmonic_mean(task_terms(r, tasks)), statistics.fmean(task_terms(r, tasks)))
            for r in pool}
    best = max(pool, key=lambda r: (*rank[r["step"]], -r["step"]))
    return best, (f"best harmonic mean of the unlearned tasks' forget terms and the retain terms "
                  f"({rank[best['step']][0]:.4f}) among the {len(pool)} of {len(rows)} scored steps that "
                  f"forget something, {gate}")


def plot(rows: list[dict], path) -> str | None:
    """trajectory.png: per task, forget and retain regurgitation and knowledge against the step;
    MIA AUC and MMLU on their own axes. Returns a note instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "trajectory.png not drawn: matplotlib is not installed (pip install matplotlib)"
    tasks = sorted(t for t in rows[0]["forget-set"] if t.startswith("Task"))
    extra = [k for k in ("mia_loss_acc", "mmlu_average") if k in rows[0]]
    fig, axes = plt.subplots(1, len(tasks) + len(extra), figsize=(4 * (len(tasks) + len(extra)), 3.4),
                             squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, task in zip(axes[0], tasks):
        for split, style in (("forget-set", "-"), ("retain-set", "--")):
            for key, name, colour in (("regurgitation-score", "regurgitation", "C0"),
                                      ("knowledge-score", "knowledge", "C1")):
                ax.plot(steps, [r[split][task][key] for r in rows], style, color=colour, marker=".",
                        label=f"{split[:-4]} {name}")
        ax.set(title=task, xlabel="optimizer step", ylim=(-0.03, 1.03))
    axes[0][0].legend(fontsize=7, loc="lower left")
    for ax, key in zip(axes[0][len(tasks):], extra):
        ax.plot(steps, [r[key] for r in rows], marker=".", color="C2")
        label = "MIA AUC (0.5 = chance)" if key == "mia_loss_acc" else "MMLU accuracy"
        ax.set(title=label, xlabel="optimizer step", ylim=(-0.03, 1.03))
        if key == "mmlu_average":
            ax.axhline(metrics.MMLU_THRESHOLD, color="grey", lw=0.8, ls=":")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
