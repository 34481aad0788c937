"""Where continuous batching spends a generation: 320 release items on the 13M hub-shaped OLMo, 256
new tokens; decode steps, rows per step, prefills and joins, with their times.
    python docs/repro/stream_steps.py /tmp/hub13m [batch]"""
import sys, time, random, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]  # the checkout; ../shared beside it
sys.path.insert(0, str(ROOT))
import data, generation, lume
model, tok = lume.load_pretrained(sys.argv[1])  # hub13m.py's output; model.eval()
rel = data.load_lume(ROOT.parent / "shared" / "lume-data" / "lume")
random.seed(0); items = random.sample(rel, 320)
prompts = [it.input for it in items]
cnt = {"step": 0, "rows": 0, "join": 0, "start": 0}
T = {"step": 0.0, "join": 0.0, "start": 0.0}
for name in ("step", "join", "start"):
    f = getattr(generation, name)
    def wrap(*a, f=f, name=name, **k):
        t = time.perf_counter(); r = f(*a, **k); T[name] += time.perf_counter() - t; cnt[name] += 1
        if name == "step": cnt["rows"] += a[3].shape[0]
        return r
    setattr(generation, name, wrap)
t = time.perf_counter()
generation.generate(model, tok, prompts, 256, batch_size=int(sys.argv[2]) if len(sys.argv) > 2 else 32)
print("total", time.perf_counter() - t, cnt, T, "rows/step", cnt["rows"] / cnt["step"])
