"""bench.py's MIA row alone, for two batchings side by side in one process (issue 37):

    python docs/repro/bench_mia.py            # bench.py's model and 200 items, 3 repeats, this CPU
    python docs/repro/bench_mia.py now        # one of the two alone
    python docs/repro/bench_mia.py before

membership.doc_stats (every statistic of mia.jsonl) against the official loss one document at a
time, once with its defaults (MIA_ROWS rows, mia_tokens(device) padded tokens a batch) and once
with the batching it had before (16 rows, up to 16,384 tokens). Each prints its fraction of the
matmul peak measured in this run (best of its timings, after 3 s of matmuls), the bare forward's
over the same batches, its speedup and its peak memory (bench.bench_mia; the most tensor bytes alive
at once, exact). Times vary by ~10% between runs on a shared 2-core machine: read them side by side."""
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

import bench  # noqa: E402
import membership  # noqa: E402


def main() -> None:
    args = bench.parse_args([])
    device = torch.device("cpu")
    _, _, items, model, tok = bench.setup(args, device)
    peak = bench.matmul_peak(model, bench.train_batches(tok, items, args.train_batch)[0].ids.numel(), args.repeats,
                             device, spin_s=3.0)["flop_per_s"]
    (real, real_forward), which = (membership.doc_stats, bench.bare_forward), sys.argv[1:] or ["before", "now"]
    ways = {"before": ("before: 16 rows, <= 16,384 tokens", 16, 16384),
            "now": (f"now: {membership.MIA_ROWS} rows, <= {membership.mia_tokens(device):,} tokens", membership.MIA_ROWS, 0)}
    for name, rows, tokens in (ways[w] for w in which):
        membership.doc_stats = functools.partial(real, batch_size=rows, max_tokens=tokens)  # what bench_mia calls,
        bench.bare_forward = functools.partial(real_forward, batch_size=rows, max_tokens=tokens)  # on the same batches
        m = bench.bench_mia(model, tok, items, args, device, peak)
        print(f"{name}: {m['ours_s']:.2f} s, {m['ours_peak_fraction']:.2f} of the matmul peak "
              f"({peak / 1e9:.0f} GFLOP/s; the bare forward {m['forward_peak_fraction']:.2f}, so "
              f"{m['ours_vs_forward']:.2f} of its speed), {m['speedup']:.2f}x the official loss alone, peak memory "
              f"{m['peak_bytes'] / 2**20:.1f} MiB (whole logits {m['unchunked_peak_bytes'] / 2**20:.1f} MiB), "
              f"loss max diff {m['max_abs_diff']:.1e}")
    membership.doc_stats, bench.bare_forward = real, real_forward


if __name__ == "__main__":
    main()
