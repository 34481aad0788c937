"""The fixed-shape (CUDA graph) decode path, run eagerly on CPU: its steps, their shapes and the
row-positions they attend over, on release items with the 13M hub-shaped OLMo, 256 new tokens.
Run it on two trees (TREE: a checkout, default this one) and compare the outputs it writes.
    python docs/repro/static_steps.py /tmp/hub13m out.json [items (320; 0 = the whole release)] [TREE]
REFILL=k in the environment: prompts enter once 1/k of the rows are free (generation.REFILL, 4).
Also prints the prefills (one per entry: on a GPU each reads the weights once, about one step)."""
import collections, json, os, random, sys, time
from pathlib import Path
TREE = Path(sys.argv[4] if len(sys.argv) > 4 else Path(__file__).resolve().parents[2])
sys.path.insert(0, str(TREE))
import data, generation, lume
model, tok = lume.load_pretrained(sys.argv[1])
rel = data.load_lume(Path(__file__).resolve().parents[3] / "shared" / "lume-data" / "lume")
n = int(sys.argv[3]) if len(sys.argv) > 3 else 320
random.seed(0); items = random.sample(rel, n) if n else rel
generation.static_default = lambda model, device: True  # the CUDA path's choice, here on CPU
generation.REFILL = int(os.environ.get("REFILL", generation.REFILL))
prefills, real_prefill = [0], generation.prefill
def prefill(*a, **k):
    prefills[0] += 1
    return real_prefill(*a, **k)
generation.prefill = prefill
shapes, real = collections.Counter(), generation.StaticStep.step
def counted(self):
    shapes[(self.S, self.C)] += 1
    return real(self)
generation.StaticStep.step = counted
t = time.perf_counter()
out = generation.generate(model, tok, [it.input for it in items], 256, batch_size=32)
steps = sum(shapes.values())
print(f"{TREE}: {len(items)} items, REFILL {generation.REFILL}, {steps} steps, {prefills[0]} prefills, {sum(s * c * k for (s, c), k in shapes.items()) / steps:.0f} "
      f"row-positions a step, {time.perf_counter() - t:.1f} s; (rows, positions): steps {sorted(shapes.items())}")
json.dump(out, open(sys.argv[2], "w"))
