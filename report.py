"""
What a run tells its user at the end: the before/after table of the official scores, with the
labels spelled out, and what happened in words: how far the unlearned task's forget scores fell,
how much of the retain scores was kept, the MIA and the MMLU gate, and why `aggregate-score` is -1
or the harmonic mean is 0 when they are.

    print(report.table(results))             # results: {"before": {...}, "after": {...}}
    print(report.explain(results, tasks=[1]))

and, across runs, the comparison the README's method table is made by (a markdown table on stdout,
the picture compare.png: forget against retain per run):

    python report.py compare runs/m1-ga runs/m1-npo ... [--bench bench.json] [--png compare.png]
"""
import argparse
import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

import identity
import metrics
import rundir

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
        head = ("Scored once (no unlearning)." if list(results) == ["before"] else
                f"Scored {' and '.join(results)} unlearning only (--no-eval-before): no scores before it to compare with.")
        return "\n".join([head, *gate_line(after), *aggregate_notes(after)])
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


def gate_line(result: dict) -> list[str]:
    """The MMLU gate in a line of the run's own (metrics.aggregate's note), when MMLU was scored."""
    if "mmlu_average" not in result:
        return []
    ok = result["mmlu_average"] >= metrics.MMLU_THRESHOLD
    return [f"MMLU {result['mmlu_average']:.3f}: {'passes' if ok else 'FAILS'} the SemEval gate (>= {metrics.MMLU_THRESHOLD})"
            + ("." if ok else ": such a run would not be considered in the final ranking.")]


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


# -----------------------------------------------------------------------------
# provenance: what produced a run (config.json's "provenance"; compare prints it under the table)


def provenance(model: str, device, sources: dict | None) -> dict:
    """The versions (transformers, peft when installed, torch, CUDA), the device's name, the model
    (model_provenance), one digest per data source over fetch's per-file sha256 records, and the
    code's git commit (None without git or outside a checkout)."""
    import torch

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    data = {k: {"files": len(r["sha256"]), "sha256": hashlib.sha256("".join(
        f"{d}  {f}\n" for f, d in sorted(r["sha256"].items())).encode()).hexdigest()}
        for k, r in (sources or {}).items() if r and r.get("sha256")}
    return {"transformers": version("transformers"), "peft": version("peft"), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device_name": name, "model": model_provenance(model), "data": data,
            "git": git_commit()}


def model_provenance(name_or_path: str) -> dict:
    """identity.model_identity (a directory's sha256 of config.json and the weights, the tiny
    target's fingerprint, a hub id's cached snapshot revision) and, for a hub snapshot, the sha256
    of its config and weights too (the cache names a weight's blob by it: nothing is re-read)."""
    ident = identity.model_identity(name_or_path)
    if ident.get("hub") and ident.get("revision"):
        from huggingface_hub import try_to_load_from_cache
        snap = Path(try_to_load_from_cache(ident["hub"], "config.json")).parent
        ident["sha256"] = {p.name: identity.file_sha256(p) for p in sorted(snap.iterdir())
                           if p.name == "config.json" or p.suffix in (".safetensors", ".bin")}
    return ident


def git_commit() -> dict | None:
    """{"commit", "dirty"} of the checkout this file is in, or None (no git, not a checkout)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


# -----------------------------------------------------------------------------
# the run's setup (config.json "setup", the `setup:` line before the first step)


def training_setup(cfg, model, spec, precision: str, n_steps: int, retain_rows: bool) -> dict:
    """How this run trains, as lume.train will (config.json's "setup", the `setup:` line): precision,
    autocast and GradScaler (lume.autocast_ctx, GradScaler for fp16 only), the optimizer
    (lume.make_optimizer: StochasticAdamW when the trained weights are bf16), what trains, the
    accumulation and the micro-batch."""
    params = list(model.parameters())
    train = [p for p in params if p.requires_grad]
    what = (f"LoRA adapters (rank {cfg.lora_rank})" if cfg.lora_rank else
            f"the last {cfg.train_layers} decoder layers" if cfg.train_layers else
            f"{spec.title}'s own set" if spec.own_params else "every weight")
    bf16 = any(p.dtype == torch.bfloat16 for p in train)
    return {"precision": precision, "autocast": precision if precision in ("bf16", "fp16") else "off",
            "grad_scaler": precision == "fp16", "optimizer": "StochasticAdamW" if bf16 else "AdamW",
            "lr": cfg.lr, "schedule": cfg.schedule, "warmup": cfg.warmup, "clip": cfg.clip, "trains": what,
            "trainable_params": sum(p.numel() for p in train), "params": sum(p.numel() for p in params),
            "grad_checkpointing": bool(cfg.grad_checkpointing), "grad_accum": cfg.grad_accum,
            "forget_rows": cfg.batch_size, "retain_rows": cfg.batch_size * cfg.retain_ratio if retain_rows else 0,
            "steps": n_steps}


def record_setup(out: Path, setup: dict) -> dict:
    """setup with the memory plan's numbers (config.json's "memory_plan": on CUDA, else none), written
    into config.json beside it."""
    config = json.loads((out / "config.json").read_text())
    plan = config.get("memory_plan")
    setup = {**setup, "memory_plan": {k: plan[k] for k in ("setup", "planned_gib", "free_gib", "seq_len")}
             if plan else None}
    rundir.write_json_atomic(out / "config.json", {**config, "setup": setup})
    return setup


def setup_line(s: dict) -> str:
    """The `setup:` line printed before the first step."""
    plan = s.get("memory_plan")
    return (f"setup: {s['precision']}, autocast {s['autocast']}, GradScaler {'on' if s['grad_scaler'] else 'off'}, "
            f"{s['optimizer']} lr {s['lr']:g} ({s['schedule']}, warmup {s['warmup']}, clip {s['clip']:g}), trains "
            f"{s['trains']}: {s['trainable_params']:,} of {s['params']:,} parameters, grad checkpointing "
            f"{'on' if s['grad_checkpointing'] else 'off'}, {s['grad_accum']} micro-batch(es) per step of "
            f"{s['forget_rows']} forget + {s['retain_rows']} retain rows, {s['steps']} steps; memory plan: "
            + (f"{plan['setup']}, {plan['planned_gib']} GiB planned of {plan['free_gib']} GiB free" if plan
               else "none (CPU, torchrun or an explicit setup flag)"))


def provenance_line(config: dict) -> str:
    """One line of a run's config.json provenance (older runs have none: '-')."""
    p = config.get("provenance")
    if not p:
        return "-"
    m, g = p["model"], p.get("git")
    model = (f"{m['hub']}@{(m.get('revision') or '?')[:12]}" if "hub" in m else f"tiny {m['tiny']}" if "tiny" in m
             else f"revision {m['revision'][:12]}" if "revision" in m else
             "sha256 " + ",".join(f"{k}:{v[:12]}" for k, v in m.get("sha256", {}).items()))
    data = ", ".join(f"{k} {v['sha256'][:12]}" for k, v in p["data"].items()) or "built-in"
    code = f"{g['commit'][:12]}{' (dirty)' if g['dirty'] else ''}" if g else "no git"
    return (f"model {model}; data {data}; code {code}; transformers {p['transformers']}, torch {p['torch']}"
            f"{', peft ' + p['peft'] if p.get('peft') else ''}, CUDA {p['cuda'] or '-'}, {p['device_name']}")


# -----------------------------------------------------------------------------
# compare: runs side by side (python report.py compare RUN...)


def run_label(config: dict) -> str:
    """A column's name: the method (a merged model scored with --method none: its merge.json's
    method), with LoRA rank and sequential chunks when used."""
    if config["method"] == "none":
        merged = Path(config["model"]) / "merge.json"
        return f"{json.loads(merged.read_text())['method'].upper()} merge" if merged.is_file() else "none"
    name = config["method"].upper().replace("SIMNPO", "SimNPO").replace("UNDIAL", "UNDIAL")
    if config.get("lora_rank"):
        name += f" LoRA {config['lora_rank']}"
    if config.get("chunk_size"):
        name += f" chunks {config['chunk_size']}"
    return name


def read_run(d) -> tuple[dict, dict]:
    """(results.json, config.json) of a run directory."""
    return rundir.read_json(d, "results.json"), rundir.read_json(d, "config.json")


def scored(results: dict) -> dict:
    """The run's own scores: after unlearning, or (--method none) the only stage."""
    return results["after"] if "after" in results else results["before"]


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def unlearned_tasks(configs) -> list[str]:
    tasks = {c["task"] for c in configs if c["method"] != "none"} or {"1"}
    return [f"Task{t}" for t in ((1, 2, 3) if "all" in tasks else sorted(map(int, tasks)))]


def score_rows(cols: list[dict], tasks: list[str]) -> list[str]:
    """Official scores: the unlearned tasks one row each, the others "a / b" in one row."""
    out = []
    all_tasks = sorted(k for k in cols[0]["forget-set"] if k.startswith("Task"))
    others = [t for t in all_tasks if t not in tasks]
    for split in ("forget-set", "retain-set"):
        for key, name in SCORES:
            for t in tasks:
                out.append(f"| {split[:-4]} {t} {name} | " + " | ".join(fmt(c[split][t][key]) for c in cols) + " |")
            if others:
                out.append(f"| {split[:-4]} {' / '.join(others)} {name} | " + " | ".join(
                    " / ".join(fmt(c[split][t][key]) for t in others) for c in cols) + " |")
    out.append("| MIA AUC (members: Task3 forget) | " + " | ".join(fmt(c.get("mia_loss_acc")) for c in cols) + " |")
    out.append("| MIA score (1 - 2 abs(AUC - 0.5)) | " + " | ".join(
        fmt(metrics.mia_score(c["mia_loss_acc"]) if "mia_loss_acc" in c else None) for c in cols) + " |")
    out.append("| harmonic-mean-task-aggregate | " + " | ".join(
        fmt(c.get("harmonic-mean-task-aggregate")) for c in cols) + " |")
    if any("mmlu_average" in c for c in cols):
        out.append("| MMLU accuracy | " + " | ".join(fmt(c.get("mmlu_average")) for c in cols) + " |")
    if any(c.get("aggregate-score", -1) != -1 for c in cols):
        out.append("| aggregate-score | " + " | ".join(fmt(c.get("aggregate-score")) for c in cols) + " |")
    return out


def mean_recovery(entry: dict) -> str:
    """'regurgitation / knowledge' recovery of an attack, each a mean over the unlearned tasks."""
    def mean(key):
        vals = [r[key] for r in entry["recovery"].values() if r.get(key) is not None]
        return f"{sum(vals) / len(vals):+.2f}" if vals else "-"
    return f"{mean('regurgitation')} / {mean('knowledge')}"


def robustness_rows(results: list[dict]) -> list[str]:
    """One row per attack any run made: its recovery (0 = nothing came back, 1 = all of it)."""
    names = list(dict.fromkeys(n for r in results for n in r.get("robustness", {})))
    out = []
    for name in names:
        out.append(f"| recovery after {name} (regurgitation / knowledge) | | " + " | ".join(
            mean_recovery(r["robustness"][name]) if name in r.get("robustness", {}) else "-" for r in results) + " |")
    if "relearn" in names:
        def v(r):
            vk = r.get("robustness", {}).get("relearn", {}).get("V_knowledge")
            return f"{fmt(vk['after'])} -> {fmt(vk['relearned'])}" if vk else "-"
        out.append("| relearn: held-out forget knowledge, after -> relearned | | " + " | ".join(map(v, results)) + " |")
    return out


def compare_table(run_dirs, bench: dict | None = None, labels=None) -> str:
    """The markdown table: the target (the "before" of the first run that unlearned) and every run's
    official scores, robustness rows when a run made attacks, and bench.json's cost per step."""
    runs = [read_run(d) for d in run_dirs]
    results, configs = [r for r, _ in runs], [c for _, c in runs]
    names = labels or [run_label(c) for c in configs]
    target = next((r["before"] for r, c in runs if c["method"] != "none" and "before" in r), None)
    oracle = next((r["oracle"] for r in results if "oracle" in r), None)  # --oracle: a retain-only model's column
    cols = ([target] if target else []) + [scored(r) for r in results] + ([oracle["results"]] if oracle else [])
    head = (["target"] if target else []) + names + (["oracle (retain-only)"] if oracle else [])
    lines = ["| | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    lines += score_rows(cols, unlearned_tasks(configs))
    for key, show in (("ks", lambda o: f"{o['ks']['statistic']:.3f} ({o['ks']['p_value']:.2g})"),
                      ("privleak", lambda o: f"{o['privleak']['loss']:+.1f}%" if o["privleak"].get("loss") is not None
                       else "-")) if oracle else ():
        lines.append(f"| {'KS D (p), forget losses vs oracle' if key == 'ks' else 'PrivLeak (loss MIA) vs oracle'} |"
                     + (" |" if target else "") + " " + " | ".join(show(r["oracle"]) if "oracle" in r else "-"
                                                                   for r in results) + " | |")
    lines += [row if target else row.replace("| | ", "| ", 1) for row in robustness_rows(results)]
    if bench:
        t = bench["training"]
        lines.append("| cost per step (x GA's, bench.py) |" + (" |" if target else "") + " " + " | ".join(
            f"{t[c['method']]['step_vs_ga']:.2f}" if c["method"] in t else "-" for c in configs) + " |")
    return "\n".join(lines)


def mean_score(result: dict, split: str, tasks) -> float:
    """Mean of the regurgitation and knowledge scores of `tasks` in one split."""
    vals = [result[split][t][key] for t in tasks for key, _ in SCORES]
    return sum(vals) / len(vals)


def compare_plot(run_dirs, path, labels=None) -> str | None:
    """compare.png: each run's forget score (mean regurgitation and knowledge of the unlearned tasks)
    against its retain score, the target marked, a run below the MMLU gate hollow. Returns a note
    instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "compare.png not drawn: matplotlib is not installed (pip install matplotlib)"
    runs = [read_run(d) for d in run_dirs]
    tasks = unlearned_tasks([c for _, c in runs])
    names = labels or [run_label(c) for _, c in runs]
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    target = next((r["before"] for r, c in runs if c["method"] != "none" and "before" in r), None)
    if target:
        ax.scatter([mean_score(target, "retain-set", tasks)], [mean_score(target, "forget-set", tasks)], marker="*",
                   s=160, color="black", label="target (before unlearning)", zorder=3)
    gated = False
    for k, ((res, _), name) in enumerate(zip(runs, names)):
        r = scored(res)
        fails = "mmlu_average" in r and r["mmlu_average"] < metrics.MMLU_THRESHOLD
        gated |= "mmlu_average" in r
        x, y = mean_score(r, "retain-set", tasks), mean_score(r, "forget-set", tasks)
        ax.scatter([x], [y], s=50, color=f"C{k % 10}", facecolors="none" if fails else f"C{k % 10}", zorder=2)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.scatter([1.0], [0.0], marker="x", s=80, color="grey", label="aim: forget 0, retain 1")
    ax.set(xlabel=f"retain score (mean, {', '.join(tasks)})", ylabel=f"forget score (mean, {', '.join(tasks)})",
           xlim=(-0.03, 1.08), ylim=(-0.03, 1.08),
           title="hollow: below the MMLU gate (%.3f)" % metrics.MMLU_THRESHOLD if gated else
           "MMLU not scored: gate (%.3f) not applied" % metrics.MMLU_THRESHOLD)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Runs side by side: python report.py compare RUN...")
    p.add_argument("command", choices=["compare"])
    p.add_argument("runs", nargs="+", help="run directories (results.json, config.json)")
    p.add_argument("--bench", default="", help="bench.json (python bench.py --quick): adds the cost per step")
    p.add_argument("--labels", default="", help="comma-separated column names (default: the method of each run)")
    p.add_argument("--png", default="compare.png", help="where the picture goes ('' = none)")
    a = p.parse_args(argv)
    labels = a.labels.split(",") if a.labels else None
    for d in a.runs:
        missing = [f for f in ("results.json", "config.json") if not (Path(d) / f).is_file()]
        if missing:
            print(f"error: {d}: no {' or '.join(missing)} (not a finished run directory)", file=sys.stderr)
            return 2
    if labels and len(labels) != len(a.runs):
        print(f"error: --labels gives {len(labels)} names for {len(a.runs)} runs", file=sys.stderr)
        return 2
    try:  # every file one line naming it: unreadable, not JSON, or not what a run (or bench.py) writes
        bench = rundir.read_json(Path(a.bench).parent, Path(a.bench).name) if a.bench else None
        for d in a.runs:
            try:
                read_run(d) and compare_table([d])
                provenance_line(read_run(d)[1])
            except rundir.BadFile:
                raise
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                raise rundir.BadFile(Path(d), f"results.json or config.json is not a run's ({e!r:.200})") from e
        table = compare_table(a.runs, bench, labels)
    except rundir.BadFile as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print("what produced each run (config.json's provenance):", file=sys.stderr)  # stdout: the table alone
    for d, name in zip(a.runs, labels or [run_label(read_run(d)[1]) for d in a.runs]):
        print(f"- {name} ({d}): {provenance_line(read_run(d)[1])}", file=sys.stderr)
    if a.png:
        note = compare_plot(a.runs, a.png, labels)
        print(note or f"picture: {a.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
