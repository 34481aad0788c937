"""
The docs/methods.md tables: each run directory's results.json (target = the "before" column of
the first run that scored it) side by side, one column per method, in markdown, with the MIA score and bench.py's cost
per step when a bench.json is given.

    python docs/methods_table.py runs/m1-ga runs/m1-gd ... [--bench bench.json]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metrics  # noqa: E402
import report  # noqa: E402


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories (results.json, config.json)")
    p.add_argument("--bench", default="", help="bench.json: adds each method's step time relative to GA's")
    args = p.parse_args(argv)
    res = [json.loads((Path(d) / "results.json").read_text()) for d in args.runs]
    names = [json.loads((Path(d) / "config.json").read_text())["method"].upper() for d in args.runs]
    target = next(r["before"] for r in res if "before" in r)  # one run scored the target (others: --no-eval-before)
    cols = [target] + [r["after"] for r in res]
    labels = [n for n, _ in report.rows(cols[0]) if n != "aggregate-score"]  # -1 without MMLU
    lines = ["| | target | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for label in labels + ["MIA score"]:  # the official 1 - 2|AUC - 0.5| (results.json has it only with MMLU)
        vals = [metrics.mia_score(c["mia_loss_acc"]) if label == "MIA score" else dict(report.rows(c)).get(label)
                for c in cols]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    if args.bench:
        t = json.loads(Path(args.bench).read_text())["training"]
        lines.append("| cost per step (x GA's, bench.py) | | " + " | ".join(
            f"{t[n.lower()]['step_vs_ga']:.2f}" if n.lower() in t else "-" for n in names) + " |")
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
