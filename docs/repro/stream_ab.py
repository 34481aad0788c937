"""Continuous batching (generation.greedy_stream, REFILL 4, 2, 1) against batch-by-batch eager decoding
(generation.greedy per length batch) on the bench model: 200 release items, 32 new tokens, batch 32,
four interleaved rounds (read the minimum of each)."""
import sys, time, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]  # the checkout; ../shared beside it
sys.path.insert(0, str(ROOT))
import bench, generation, lume
args = bench.parse_args([])
lume.seed_everything(0)
_, _, items, model, tok = bench.setup(args, torch.device("cpu"))
prompts = [it.input for it in items]
enc = [tok(p).input_ids for p in prompts]; pad = lume.pad_of(tok); stop = generation.stop_ids(model, tok)
def per_batch():
    for idx in lume.length_batches([len(e) for e in enc], 32, 16384):
        ids, attn = lume.left_pad([enc[i] for i in idx], pad)
        generation.greedy(model, ids, attn, 32, stop, static=False)
def stream(r):
    generation.REFILL = r
    generation.greedy_stream(model, enc, pad, 32, stop, 32, 16384)
for _ in range(4):
    for name, fn in (("per_batch", per_batch), ("stream4", lambda: stream(4)), ("stream2", lambda: stream(2)), ("stream1", lambda: stream(1))):
        t = time.perf_counter(); fn(); print(name, round(time.perf_counter() - t, 2), flush=True)
