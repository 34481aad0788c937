"""
Scores during training, and which step to keep.

    python run.py --task 1 --method npo --eval-every 10 --keep best

Every --eval-every optimizer steps (and before the first), the run scores a fixed evaluation subset
and appends a row with the official keys to trajectory.jsonl; at the end it draws trajectory.png
(matplotlib, optional). The subset: every QA item (answers are short and where unlearning shows
first), SUBSET_SC sentence-completion items per task and split (a seeded sample, the same at every
step), every MIA document, and MMLU at SUBSET_MMLU questions per subject when MMLU is given.

--keep best keeps the step that select_best picks: with MMLU, the best official aggregate-score
among the steps that pass the SemEval gate (MMLU >= 0.371, the award rule); otherwise, among the
steps whose retain scores keep at least RETAIN_KEPT of their value at step 0, the best harmonic mean
of the unlearned tasks' forget terms (1 - score) and all retain terms. The full official harmonic
mean would not do here: unlearning one task leaves the other tasks' forget terms at 0, so it is 0 at
every step. Ties go to the earliest step.
"""
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


def select_best(rows: list[dict], tasks: list[int]) -> tuple[dict, str]:
    """(the row to keep, why) among trajectory rows; rows[0] is step 0 (before unlearning)."""
    with_mmlu = [r for r in rows if "mmlu_average" in r]
    if with_mmlu and all("mia_loss_acc" in r for r in with_mmlu):
        passed = [r for r in with_mmlu if r["mmlu_average"] >= metrics.MMLU_THRESHOLD]
        if passed:
            best = max(passed, key=lambda r: (r["aggregate-score"], -r["step"]))
            return best, (f"best aggregate-score ({best['aggregate-score']:.4f}) among the {len(passed)} of "
                          f"{len(rows)} scored steps with MMLU >= {metrics.MMLU_THRESHOLD}")
        return rows[0], f"no scored step kept MMLU >= {metrics.MMLU_THRESHOLD}: the target before unlearning"
    floor = RETAIN_KEPT * retain_mean(rows[0])
    kept = [r for r in rows if retain_mean(r) >= floor]
    # statistics.harmonic_mean, as metrics.aggregate takes the official one: 0 when any term is 0
    hmean = {r["step"]: statistics.harmonic_mean(task_terms(r, tasks)) for r in kept}
    best = max(kept, key=lambda r: (hmean[r["step"]], -r["step"]))
    return best, (f"best harmonic mean of the unlearned tasks' forget terms and the retain terms "
                  f"({hmean[best['step']]:.4f}) among the {len(kept)} of {len(rows)} scored "
                  f"steps that keep >= {RETAIN_KEPT:.0%} of the retain scores")


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
