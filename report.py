"""
What a run tells its user at the end: the before/after table of the official scores, with the
labels spelled out, and what happened in words: how far the unlearned task's forget scores fell,
how much of the retain scores was kept, the MIA and the MMLU gate, and why `aggregate-score` is -1
or the harmonic mean is 0 when they are.

    print(report.table(results))             # results: {"before": {...}, "after": {...}}
    print(report.explain(results, tasks=[1]))
"""
import metrics

SCORES = (("regurgitation-score", "regurgitation"), ("knowledge-score", "knowledge"))


def rows(result: dict) -> list[tuple[str, float]]:
    """(label, value) of one stage's official results: every task's forget and retain scores, then
    the MIA AUC, MMLU and the aggregates present."""
    out = []
    for split in ("forget-set", "retain-set"):
        for task in sorted(k for k in result[split] if k.startswith("Task")):
            for key, name in SCORES:
                out.append((f"{split[:-4]} {task} {name}", result[split][task][key]))
    for key, name in (("mia_loss_acc", "MIA AUC (0.5 = chance)"), ("mmlu_average", "MMLU accuracy"),
                      ("harmonic-mean-task-aggregate", "harmonic-mean-task-aggregate"),
                      ("aggregate-score", "aggregate-score")):
        if key in result:
            out.append((name, result[key]))
    return out


def table(results: dict) -> str:
    """The stages side by side (before, after, and any other stage the run scored)."""
    stages = list(results)
    labels = [name for name, _ in rows(results[stages[-1]])]
    values = {s: dict(rows(results[s])) for s in stages}
    lines = [f"{'':34s}" + "".join(f"{s:>10s}" for s in stages)]
    for name in labels:
        cells = "".join(f"{values[s][name]:10.3f}" if name in values[s] else f"{'-':>10s}" for s in stages)
        lines.append(f"{name:34s}{cells}")
    return "\n".join(lines)


def retain_kept(before: dict, after: dict) -> dict[str, float]:
    """{'Task2 knowledge': after / before} for every retain score that was above 0 before."""
    out = {}
    for task, scores in before["retain-set"].items():
        if task.startswith("Task"):
            for key, name in SCORES:
                if scores[key] > 0:
                    out[f"{task} {name}"] = after["retain-set"][task][key] / scores[key]
    return out


def zero_terms(result: dict) -> list[str]:
    """Names of the aggregated terms that are 0 (each makes the harmonic mean 0)."""
    names = []
    for split in ("forget-set", "retain-set"):
        for task in sorted(k for k in result[split] if k.startswith("Task")):
            for key, name in SCORES:
                score = result[split][task][key]
                term = 1 - score if split == "forget-set" else score
                if term == 0:
                    names.append(f"{split[:-4]} {task} {name} ({score:.3f}{', 1 - score' if split == 'forget-set' else ''})")
    return names


def explain(results: dict, tasks: list[int]) -> str:
    """What happened, in words, from the first and the last stage of `results`."""
    if "before" not in results or len(results) < 2:
        after = results[list(results)[-1]]
        return "\n".join(["Scored once (no unlearning).", *aggregate_notes(after)])
    before, after = results["before"], results[list(results)[-1]]
    lines = []
    for t in tasks:
        key = f"Task{t}"
        if key in before["forget-set"]:
            b, a = before["forget-set"][key], after["forget-set"][key]
            lines.append(f"Forget {key}: regurgitation {b['regurgitation-score']:.3f} -> {a['regurgitation-score']:.3f}, "
                         f"knowledge {b['knowledge-score']:.3f} -> {a['knowledge-score']:.3f}.")
    kept = retain_kept(before, after)
    if kept:
        low = min(kept, key=kept.get)
        lines.append(f"Retain kept {100 * sum(kept.values()) / len(kept):.0f}% of its scores on average "
                     f"(lowest: {low}, {100 * kept[low]:.0f}%).")
    if "mia_loss_acc" in after:
        lines.append(f"MIA AUC {before.get('mia_loss_acc', float('nan')):.3f} -> {after['mia_loss_acc']:.3f}: "
                     "0.5 means members (Task3 forget documents) look like nonmembers; 1.0, fully recognisable.")
    if "mmlu_average" in after:
        ok = after["mmlu_average"] >= metrics.MMLU_THRESHOLD
        lines.append(f"MMLU {before.get('mmlu_average', float('nan')):.3f} -> {after['mmlu_average']:.3f}: "
                     f"{'passes' if ok else 'FAILS'} the SemEval gate (>= {metrics.MMLU_THRESHOLD}).")
    return "\n".join(lines + aggregate_notes(after))


def aggregate_notes(result: dict) -> list[str]:
    """Why aggregate-score is -1 and why the harmonic mean is 0, when they are."""
    notes = []
    if result.get("aggregate-score") == -1:
        missing = [name for key, name in (("mmlu_average", "MMLU (--mmlu)"), ("mia_loss_acc", "MIA data (--mia-data)"))
                   if key not in result]
        notes.append(f"aggregate-score is -1: the official scorer needs both MMLU and MIA data; "
                     f"missing here: {', '.join(missing)}.")
    zeros = zero_terms(result)
    if zeros:
        notes.append("harmonic-mean-task-aggregate is 0 because a harmonic mean is 0 when any of its 12 terms is 0; "
                     f"zero here: {'; '.join(zeros)}.")
    return notes
