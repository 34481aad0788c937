"""Where the bench model's bare forward spends its time (issue 37): one 16 x 64 batch without padding,
the decoder alone (no LM head), torch.profiler's self time per op, and the isolated matmul rate of
the same Linear shapes beside it.

    python docs/repro/forward_profile.py     # bench.py's model, this CPU, ~1 min

The matmuls run at their isolated rate inside the forward; what the forward adds is its own
elementwise kernels (rotary, SwiGLU, norms, residuals) and attention, which no scorer of this model
can avoid."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench  # noqa: E402


@torch.inference_mode()
def main() -> None:
    args = bench.parse_args([])
    device = torch.device("cpu")
    _, _, items, model, _ = bench.setup(args, device)
    body, ids = model.get_decoder(), torch.randint(0, model.config.vocab_size, (16, 64))
    for _ in range(3):
        body(input_ids=ids, use_cache=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            body(input_ids=ids, use_cache=False)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    for e in ops[:8]:
        print(f"{e.key:50s} {e.self_cpu_time_total / total:6.1%}")
    mm = sum(e.self_cpu_time_total for e in ops if e.key == "aten::mm") / 1e6 / 5  # seconds per forward
    flop = 2 * sum(m.weight.numel() for m in body.modules() if isinstance(m, torch.nn.Linear)) * ids.numel()
    peak = bench.matmul_peak(body, ids.numel(), args.repeats, device, spin_s=3.0)["flop_per_s"]
    print(f"matmuls in the forward: {flop / mm / 1e9:.0f} GFLOP/s; the same shapes alone (best of): {peak / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
