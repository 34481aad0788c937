"""The bench's generation (200 release items, 32 new tokens, batch 32, the bench model) through the
generation.py of another checkout, to compare trees on one host: run it once per tree, alternating.
    python docs/repro/gen_ab.py OTHER_TREE     # e.g. a worktree of ac1cdf0 (before issue 23), then this checkout's path
Prints the tree, three timed runs after a warm-up, and a digest of the outputs (equal across trees)."""
import hashlib, sys, time, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]  # this checkout: its bench model, items and cache
sys.path.insert(0, str(ROOT))
import bench, lume
args = bench.parse_args([])
lume.seed_everything(0)
_, _, items, model, tok = bench.setup(args, torch.device("cpu"))
tree = str(Path(sys.argv[1]).resolve())
sys.path.insert(0, tree)
for name in ("generation", "lume"):  # the other tree's modules from here on
    sys.modules.pop(name, None)
import generation  # noqa: E402
assert generation.__file__.startswith(tree), generation.__file__
prompts = [it.input for it in items]
generation.generate(model, tok, prompts[-32:], 32, batch_size=32)
times = []
for _ in range(3):
    t = time.perf_counter()
    out = generation.generate(model, tok, prompts, 32, batch_size=32)
    times.append(round(time.perf_counter() - t, 2))
print(tree, times, hashlib.sha256("\n".join(out).encode()).hexdigest()[:12])
