"""The decode loop (generation.greedy) is token-identical to the loop it replaced: a DynamicCache
that grows by torch.cat and a batch that runs until its longest row ends (reference_greedy below,
the pre-issue-23 path), in batches with mixed prompt lengths and rows that finish early, on the
small memorising target and on a hub-shaped OLMo with the real tokenizer (pad != EOS). Both decode
ways are checked: eager with finished rows leaving the batch (the CPU default) and the fixed-shape
step that CUDA captures in a graph (run eagerly here; the GPU report counts its differences there).
Continuous batching (generation.greedy_stream: finished rows' slots taken by the next prompts, the
running cache and the new prompts' joined) gives each prompt what it gets alone through model.generate.
"""
import contextlib

import pytest
import torch

import generation
import lume
import metrics
from conftest import EOS, PAD


@torch.inference_mode()
def reference_greedy(model, ids, attn, max_new_tokens, stop):
    """Today's loop before issue 23: DynamicCache, the mask grown by torch.cat, every row run until
    the batch's last one stops, finished rows fed stop[0]."""
    from transformers import DynamicCache
    B = ids.shape[0]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    cache, key = DynamicCache(), generation.cache_keyword(model)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1, **{key: cache})
    stop_t = torch.tensor(stop)
    nxt, done, new = out.logits[:, -1].argmax(-1), torch.zeros(B, dtype=torch.bool), []
    for t in range(max_new_tokens):
        nxt = torch.where(done, torch.full_like(nxt, stop[0]), nxt)
        new.append(nxt)
        done |= torch.isin(nxt, stop_t)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        attn = torch.cat([attn, attn.new_ones(B, 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, use_cache=True, **{key: cache})
        nxt = out.logits[:, -1].argmax(-1)
    return torch.stack(new, dim=1)


def check_identity(model, tok, prompts, n, stop):
    ids, attn = lume.left_pad([tok(p).input_ids for p in prompts], lume.pad_of(tok))
    ref = reference_greedy(model, ids, attn, n, stop)
    lengths = [int(next((i for i, t in enumerate(r) if t in stop), len(r) - 1)) + 1 for r in ref.tolist()]
    assert len(set(lengths)) > 2 and min(lengths) < ref.shape[1]  # rows really finish at different steps
    for static in (False, True):
        got = generation.greedy(model, ids, attn, n, stop, static=static)
        assert got.shape == ref.shape and torch.equal(got, ref), (static, got, ref)
    return ref


def test_decode_equals_the_reference_loop_on_the_small_target(small_target, small_data):
    model, tok = small_target
    items, _ = small_data
    prompts = [it.input for it in items][:12]  # sc and qa inputs: 3-40 words
    check_identity(model, tok, prompts, 24, generation.stop_ids(model, tok))


def test_decode_equals_the_reference_loop_with_the_real_tokenizer(olmo, release):
    model, tok = olmo
    assert tok.pad_token_id == PAD != EOS
    prompts = [it.input for it in release if it.kind == "qa" and it.task in (1, 3)][:8] + \
        [it.input for it in release if it.kind == "sc"][:4]
    check_identity(model, tok, prompts, 20, [EOS])


@pytest.mark.parametrize("batch_size,max_tokens", [(3, 16384), (4, 60)])
def test_continuous_batching_on_fixed_shapes_gives_each_prompt_what_it_gets_alone(small_target, small_data,
                                                                                  monkeypatch, batch_size, max_tokens):
    """The CUDA path (greedy_static_stream, run eagerly here): prompts enter the fixed-shape step's
    buffers beside the live rows, and every output is the prompt's alone. The step is kept across
    entries while its shape holds (its graph is replayed); once no prompt waits, the live rows move
    to steps of fewer rows."""
    model, tok = small_target
    items, _ = small_data
    prompts = [it.input for it in items][:14]
    built, entries, real_init, real_enter = [], [], generation.StaticStep.__init__, generation.enter

    def init(self, model, S, C, device):
        built.append((S, C))
        real_init(self, model, S, C, device)

    def buffers(st):  # the addresses a captured graph reads and writes
        return [t.data_ptr() for t in (st.ids, st.pos, st.slot, st.mask, st.nxt)] + \
            [t.data_ptr() for layer in st.cache.layers for t in (layer.kbuf, layer.vbuf)]

    def enter(*a, **k):
        out = real_enter(*a, **k)  # (step, live rows' rows, new rows' rows)
        entries.append((id(out[0]), buffers(out[0])))
        return out
    monkeypatch.setattr(generation.StaticStep, "__init__", init)
    monkeypatch.setattr(generation, "enter", enter)
    monkeypatch.setattr(generation, "static_default", lambda model, device: True)
    generation.GRAPHS["steps"].clear()
    got = generation.generate(model, tok, prompts, max_new_tokens=24, batch_size=batch_size, max_tokens=max_tokens)
    assert got == [alone(model, tok, p, 24) for p in prompts]
    assert len(entries) >= 4 and len(built) < len(entries)  # entries into a step already built
    same = [(a, b) for a, b in zip(entries, entries[1:]) if a[0] == b[0]]
    assert same and all(a[1] == b[1] for a, b in same)  # written in place: a graph would replay them
    assert all(S <= batch_size for S, _ in built) and built[-1][0] < batch_size  # drained on fewer rows


class FakeStreams:
    """torch.cuda's streams on CPU: which stream is current, and every wait (a log of events)."""

    def __init__(self, monkeypatch):
        self.log, self.current = [], "main"
        fake = self

        class Stream:
            def __init__(self, device=None):
                self.name = "side"

            def wait_stream(self, other):
                fake.log.append(f"{self.name} waits {other.name}")

        class Main(Stream):
            def __init__(self):
                self.name = "main"

        @contextlib.contextmanager
        def stream(s):
            fake.current = s.name
            yield
            fake.current = "main"
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Main())
        monkeypatch.setattr(torch.cuda, "stream", stream)


def test_a_failed_capture_says_why_in_one_line_and_decodes_eagerly(small_target, small_data, monkeypatch, capsys):
    model, tok = small_target
    items, _ = small_data
    FakeStreams(monkeypatch)

    class Refused:
        def __init__(self):
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
    monkeypatch.setattr(generation, "capturable", lambda device: True)  # as on CUDA
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Refused)
    monkeypatch.setitem(generation.GRAPHS, "off", None)
    generation.GRAPHS["steps"].clear()
    check_identity(model, tok, [it.input for it in items][:12], 24, generation.stop_ids(model, tok))
    lines = [s for s in capsys.readouterr().out.splitlines() if "CUDA graph" in s]
    assert lines == ["generation: CUDA graph capture failed, decoding eagerly (RuntimeError: operation not "
                     "permitted when stream is capturing)"]
    assert generation.GRAPHS["off"].startswith("RuntimeError")  # later batches decode eagerly, no new attempt


# ops that wait for the device (a host value: .item(), bool(), nonzero's data-dependent shape) or copy
# host data to it (torch.tensor inside the forward): inside torch.cuda.graph they raise, and scoring
# decodes eagerly, several times slower on a 7B
HOST_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "masked_select", "unique",
            "_unique2", "unique_consecutive", "repeat_interleave", "equal", "lift_fresh", "lift_fresh_copy"}


def ops_of(fn) -> set:
    """The aten ops fn() runs (their names, without overloads)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func._schema.name.split("::")[-1])
            return func(*args, **(kwargs or {}))
    seen = set()
    with Log():
        fn()
    return seen


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_the_fixed_shape_step_runs_no_op_a_cuda_graph_refuses(small_target, small_data, lora_rank):
    """CPU evidence that CUDA can capture the decode step: StaticStep.run() (the forward of the
    installed transformers on a 4D bool mask, the per-row cache write, the pick and the advances)
    runs no op that needs a host value or host data, plain and LoRA-wrapped (--lora-rank scores
    the wrapped model). A transformers release that checks the mask's values on the host fails here."""
    import copy
    import lora
    model, tok = small_target
    items, _ = small_data
    if lora_rank:
        model = lora.add_lora(copy.deepcopy(model), rank=lora_rank, alpha=8, targets=["q_proj", "v_proj"]).eval()
    enc = [tok(it.input).input_ids for it in items[:3]]
    with torch.inference_mode():
        ids, attn = lume.left_pad(enc, lume.pad_of(tok))
        fresh = generation.kv_cache(ids.shape[1])
        nxt, last = generation.prefill(model, ids, attn, fresh)
        st, _, _ = generation.enter(model, None, torch.arange(0), fresh, attn, nxt, last, 8, 4, 16384, 64)
        st.run()  # the warm-up call, eager on CUDA too
        ops = ops_of(st.run)
    assert {"scaled_dot_product_attention", "index_put_", "scatter_", "max"} <= ops  # the step was traced
    assert not ops & HOST_OPS, ops & HOST_OPS
    with torch.inference_mode():  # the check itself sees a host op where there is one
        for host in (lambda: int(st.nxt.sum()), lambda: bool(st.mask.all()), lambda: st.slot.nonzero()):
            assert ops_of(host) & HOST_OPS


def replay_steps(monkeypatch) -> list:
    """CUDA graph semantics on CPU: each fixed-shape step runs eagerly once (the warm-up), is then
    traced (make_fx: its aten ops on the step's own buffers, every Python value frozen as at
    capture; the trace's own run is undone, as a capture runs nothing) and from then on replayed.
    A buffer that enter() replaced instead of writing in place, or a Python value that should change
    from step to step, then shows in the outputs. A CUDA graph's own tensors (made during capture)
    live in its pool and are overwritten by the next replay: the step may keep none of them (every
    tensor the step and its cache hold after the trace is one it held before), and the trace's output
    is one buffer, rewritten by every replay, as a graph's is. Returns the (rows, positions) of each trace."""
    from torch.fx.experimental.proxy_tensor import make_fx
    traces = []

    def held(self):  # every tensor the step, its cache and its layers hold
        return {id(v) for o in [self, self.cache, self.cache.box] + list(self.cache.layers)
                for v in (o.values() if isinstance(o, dict) else vars(o).values()) if torch.is_tensor(v)}

    def step(self):
        if not self.warm:
            self.run()
            self.warm = True
            return
        if self.graph is None:
            bufs = [self.ids, self.pos, self.slot, self.mask, self.nxt] + \
                [t for layer in self.cache.layers for t in (layer.kbuf, layer.vbuf)]
            saved, before = [t.clone() for t in bufs], held(self)
            traced = make_fx(lambda _: (self.run(), self.nxt)[1])(torch.zeros(1))
            assert held(self) <= before, "the step keeps a tensor made during capture (the graph's pool)"
            for t, b in zip(bufs, saved):
                t.copy_(b)
            out = torch.empty_like(self.nxt)  # the graph's output: one buffer, every replay writes it
            self.graph = lambda _: out.copy_(traced(_))
            traces.append((self.S, self.C))
        self.graph(torch.zeros(1))
    monkeypatch.setattr(generation.StaticStep, "step", step)
    monkeypatch.setattr(generation, "static_default", lambda model, device: True)
    generation.GRAPHS["steps"].clear()
    return traces


@pytest.mark.parametrize("batch_size,max_tokens", [(3, 16384), (4, 60)])
def test_continuous_batching_through_replayed_steps_gives_each_prompt_what_it_gets_alone(
        small_target, small_data, monkeypatch, batch_size, max_tokens):
    """The CUDA path as CUDA runs it, a trace of each step replayed (replay_steps): prompts enter
    the rows of a step whose trace is already made, and every output is still the prompt's alone."""
    model, tok = small_target
    items, _ = small_data
    prompts = [it.input for it in items][:14]
    traces, into_traced, real_enter = replay_steps(monkeypatch), [], generation.enter

    def enter(*a, **k):
        out = real_enter(*a, **k)
        into_traced.append(out[0].graph is not None)
        return out
    monkeypatch.setattr(generation, "enter", enter)
    got = generation.generate(model, tok, prompts, max_new_tokens=24, batch_size=batch_size, max_tokens=max_tokens)
    assert got == [alone(model, tok, p, 24) for p in prompts]
    assert traces and sum(into_traced) >= 2  # prompts entered steps already traced, which were replayed


# -----------------------------------------------------------------------------
# continuous batching


def alone(model, tok, prompt, n):
    """The official protocol: the prompt alone through model.generate, greedy, new tokens decoded."""
    return metrics.official_generate(model, tok, prompt, n)


def spy_joins(monkeypatch):
    """Record each join's (running rows, joining rows)."""
    joins, real = [], generation.join

    def spy(a, b, N):
        joins.append((len(a), len(b)))
        return real(a, b, N)
    monkeypatch.setattr(generation, "join", spy)
    return joins


@pytest.mark.parametrize("batch_size,max_tokens", [(3, 16384), (4, 60)])
def test_continuous_batching_gives_each_prompt_what_it_gets_alone(small_target, small_data, monkeypatch,
                                                                   batch_size, max_tokens):
    """More prompts than slots, mixed lengths, rows finishing early: prompts join running rows (a
    tight max_tokens also holds joins back), and every output is the prompt's alone."""
    model, tok = small_target
    items, _ = small_data
    prompts = [it.input for it in items][:14]
    joins = spy_joins(monkeypatch)
    got = generation.generate(model, tok, prompts, max_new_tokens=24, batch_size=batch_size, max_tokens=max_tokens)
    assert got == [alone(model, tok, p, 24) for p in prompts]
    assert len(joins) >= 3 and all(a >= 1 and a + b <= batch_size for a, b in joins)
    assert len(set(got)) >= 8  # varied outputs: the equality is not trivial


@pytest.mark.parametrize("static", [False, True, "replay"])
def test_continuous_batching_with_the_real_tokenizer(olmo, release, monkeypatch, static):
    """pad != EOS, prompts of 10 to 60 tokens joining rows that have run for a while; eager (join)
    and on fixed shapes (enter), run eagerly and replayed as CUDA replays them (replay_steps)."""
    model, tok = olmo
    traces = replay_steps(monkeypatch) if static == "replay" else None
    prompts = [it.input for it in release if it.kind == "qa" and it.task in (1, 3)][:8] + \
        [it.input for it in release if it.kind == "sc"][:6]
    joins, entries, real_enter = spy_joins(monkeypatch), [], generation.enter
    monkeypatch.setattr(generation, "enter", lambda *a, **k: entries.append(1) or real_enter(*a, **k))
    monkeypatch.setattr(generation, "static_default", lambda model, device: bool(static))
    got = generation.generate(model, tok, prompts, max_new_tokens=20, batch_size=4)
    assert len(entries if static else joins) >= 2 and (traces is None or traces)
    assert got == [alone(model, tok, p, 20) for p in prompts]


@torch.inference_mode()
def test_a_join_moves_columns_but_not_what_a_row_attends_to(small_target, small_data):
    """The running rows' next logits are the same after a join (their columns moved right, the
    joining prompts' rows beside them) as without it, and the joining rows' the same as alone."""
    model, tok = small_target
    items, _ = small_data
    qa = [tok(it.input).input_ids for it in items if it.kind == "qa"]
    enc = qa[:3] + [qa[3] * 4, qa[4]]  # a joining prompt longer than the running rows: they shift right
    assert len(enc[3]) > max(len(e) for e in enc[:3]) + 3
    pad, key = lume.pad_of(tok), generation.cache_keyword(model)
    run = generation.start(model, enc, [0, 1, 2], pad, 8, torch.device("cpu"))
    for _ in range(3):
        run.nxt, run.last = generation.step(model, run.cache, run.mask, run.nxt, run.last, key)
    fresh = generation.start(model, enc, [3, 4], pad, 8, torch.device("cpu"))
    joined = generation.join(run, fresh, 8)
    assert joined.cache.layers[0].n == max(run.longest(), fresh.cache.layers[0].n) == len(enc[3])
    logits = {}
    for name, r in (("run", run), ("fresh", fresh), ("joined", joined)):
        n = r.cache.layers[0].n
        r.mask[:, n] = 1
        out = model(input_ids=r.nxt[:, None], attention_mask=r.mask[:, :n + 1], position_ids=r.last[:, None] + 1,
                    use_cache=True, **{key: r.cache})
        logits[name] = out.logits[:, -1]
    torch.testing.assert_close(logits["joined"], torch.cat([logits["run"], logits["fresh"]]), rtol=0, atol=1e-5)


def test_take_keeps_a_batch_within_max_tokens():
    """Prompts leave the length-sorted queue while (rows + taken) x the widest stays <= max_tokens;
    one is always taken when nothing runs, whatever its length."""
    import collections
    enc = [[0] * n for n in (5, 8, 8, 20, 90)]
    q = collections.deque(range(5))
    assert generation.take(q, 4, 2, 10, enc, 40) == [0, 1]  # (2 + 2) x 10 = 40 fits; (2 + 3) x 10 would not
    assert generation.take(q, 4, 0, 0, enc, 16) == [2]  # a second row, 2 x 20, would not fit
    assert generation.take(q, 4, 3, 30, enc, 16) == []  # the running rows alone exceed it: nothing joins
    assert generation.take(q, 4, 0, 0, enc, 16) == [3]  # nothing runs: one prompt, over the cap or not
    assert generation.take(q, 1, 0, 0, enc, 10 ** 6) == [4] and not q


def test_the_greedy_pick_is_argmax_including_ties():
    """generation.pick (max(-1).indices, faster on CPU) returns torch.argmax's index, the first of
    equal maxima, at every position of a 50,304-wide row."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 50304, generator=g)
    for r, (i, j) in enumerate([(0, 1), (5, 50303), (100, 40000), (7, 8), (33333, 33334)] * 12):
        x[r, [i, j]] = 10.0  # a tie at the maximum
    x[60:] = 0.0  # whole rows tied
    assert torch.equal(generation.pick(x), x.argmax(-1))
    assert generation.pick(x)[:5].tolist() == [0, 5, 100, 7, 33333]


def test_continuous_batching_on_bf16_weights(small_target, small_data, monkeypatch):
    """--eval-precision bf16 scores bf16 weights: joined caches keep their dtype (a float32 buffer
    beside bf16 queries would fail in attention), and each row's tokens are counted against the
    prompt alone, the rule for bf16 (batched and alone may round differently)."""
    import copy
    model, tok = small_target
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    items, _ = small_data
    prompts = [it.input for it in items if it.kind == "qa"][:6]
    dtypes, real = [], generation.join

    def spy(a, b, N):
        out = real(a, b, N)
        dtypes.append({layer.kbuf.dtype for layer in out.cache.layers})
        return out
    monkeypatch.setattr(generation, "join", spy)
    got = generation.generate(bf16, tok, prompts, max_new_tokens=8, batch_size=2)
    assert dtypes and all(d == {torch.bfloat16} for d in dtypes)
    alone = [generation.generate(bf16, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert sum(a != b for a, b in zip(got, alone)) <= len(prompts) // 2  # counted, and most agree


def test_a_dropped_cache_is_freed_at_once(small_target, small_data, monkeypatch):
    """Each join drops the running cache: its buffers must go with the last reference, not wait for
    Python's cyclic GC (a cache class made per cache closed over its cache, a cycle; the full
    release's peak RSS doubled). With the GC off, no cache a join or a finished batch dropped
    survives generate."""
    import gc
    import weakref
    model, tok = small_target
    items, _ = small_data
    prompts = [it.input for it in items][:10]
    dropped, real = [], generation.join

    def spy(a, b, N):
        dropped.extend(weakref.ref(layer.kbuf) for c in (a.cache, b.cache) for layer in c.layers)
        return real(a, b, N)
    monkeypatch.setattr(generation, "join", spy)
    generation.kv_cache(4)  # its first use imports transformers' cache module, whose frames live on
    gc.collect()
    gc.disable()
    try:
        generation.generate(model, tok, prompts, max_new_tokens=12, batch_size=3)
        assert len(dropped) >= 4 and not [r for r in dropped if r() is not None]
    finally:
        gc.enable()


def test_scoring_keeps_no_fixed_shape_step_or_model_alive(small_target, small_data, monkeypatch):
    """The fixed-shape steps hold the model they run (scoring's bf16 copy of a 7B: 14 GB) and
    their caches: generate lets them go, so the copy is freed when scoring drops it, before
    training goes on beside it."""
    import copy
    import gc
    import weakref
    model, tok = small_target
    items, _ = small_data
    twin = copy.deepcopy(model)  # as lume.weights_as makes for scoring
    ref = weakref.ref(twin)
    monkeypatch.setattr(generation, "static_default", lambda model, device: True)
    generation.generate(twin, tok, [it.input for it in items][:6], max_new_tokens=8, batch_size=2)
    assert not generation.GRAPHS["steps"]
    gc.collect()
    gc.disable()
    try:
        del twin
        assert ref() is None
    finally:
        gc.enable()


def test_fixed_shapes_on_a_lora_model(small_target, small_data, monkeypatch):
    """--lora-rank scores the wrapped model: the fixed-shape stream (CUDA's path) gives what the
    eager stream gives, with a nonzero adapter update that changes the outputs."""
    import copy
    import lora
    model, tok = small_target
    items, _ = small_data
    prompts = [it.input for it in items][:10]
    wrapped = lora.add_lora(copy.deepcopy(model), rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora.lora_modules(wrapped).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.5)
    eager = generation.generate(wrapped, tok, prompts, max_new_tokens=16, batch_size=3)
    assert eager != generation.generate(model, tok, prompts, max_new_tokens=16, batch_size=3)  # the adapters count
    monkeypatch.setattr(generation, "static_default", lambda model, device: True)
    assert generation.generate(wrapped, tok, prompts, max_new_tokens=16, batch_size=3) == eager


# -----------------------------------------------------------------------------
# the capture, checked without a GPU: side-stream warm-up, the 7B-shaped step on the meta device


def static_step_of(model, tok, items):
    """A fixed-shape step of 4 rows holding 3 prefilled prompts, as generate builds it (after enter)."""
    enc = [tok(it.input).input_ids for it in items[:3]]
    ids, attn = lume.left_pad(enc, lume.pad_of(tok))
    fresh = generation.kv_cache(ids.shape[1])
    nxt, last = generation.prefill(model, ids, attn, fresh)
    return generation.enter(model, None, torch.arange(0), fresh, attn, nxt, last, 8, 4, 16384, 64)[0]


def test_the_warm_up_runs_on_a_side_stream_before_the_capture(small_target, small_data, monkeypatch):
    """CUDA graph capture requires the eager warm-up on a side stream that waits for the current one
    (the step's buffers were written there), and the current stream waits for it before capturing."""
    model, tok = small_target
    items, _ = small_data
    streams = FakeStreams(monkeypatch)
    log = streams.log

    class Graph:
        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def graph(g):
        log.append("capture")
        yield
    monkeypatch.setattr(generation, "capturable", lambda device: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setitem(generation.GRAPHS, "off", None)
    real = generation.StaticStep.run
    monkeypatch.setattr(generation.StaticStep, "run", lambda self: (log.append(f"run on {streams.current}"), real(self)))
    with torch.inference_mode():
        st = static_step_of(model, tok, items)
        for _ in range(3):
            st.step()
    assert log == ["side waits main", "run on side", "main waits side", "capture", "run on main", "replay", "replay"]


def test_scoring_on_fixed_shapes_takes_its_rows_from_the_memory_plan(small_target, small_data, monkeypatch, capsys):
    """On CUDA, generate sizes the fixed-shape step from memory.scoring_plan on the memory free now
    (prompts' lengths, the reserve), prints the plan in one line, and decodes what the eager path does."""
    import memory
    model, tok = small_target
    items, _ = small_data
    prompts = [it.input for it in items][:12]
    eager = generation.generate(model, tok, prompts, max_new_tokens=12, batch_size=3)
    enc = [tok(p).input_ids for p in prompts]
    total = 2 * memory.GiB
    one = memory.scoring_plan(model.config, total, total, min(map(len, enc)), max(map(len, enc)), 12, 4,
                              generation.ROUND_TO)
    per_row = one["planned_bytes"] / one["max_tokens"] * generation.capacity(min(map(len, enc)), 12, generation.ROUND_TO)
    free = memory.reserve(total) + 8 * 8 * model.config.vocab_size * 64 + int(8.5 * per_row)  # 8 rows and a half
    shapes = []
    real = generation.static_step
    monkeypatch.setattr(generation, "static_step", lambda m, S, C, d: (shapes.append(S), real(m, S, C, d))[1])
    monkeypatch.setattr(generation, "static_default", lambda model, device: True)
    monkeypatch.setattr(generation, "free_bytes", lambda device: (free, total))
    plan = generation.scoring_plan(model, enc, 12, torch.device("cpu"))
    assert plan["rows"] == 8 and plan["max_tokens"] >= 8 * plan["capacity"][0]
    assert generation.generate(model, tok, prompts, max_new_tokens=12, batch_size=3) == eager
    assert shapes[0] == 8  # the plan's rows, not batch_size 3
    assert capsys.readouterr().out.count("scoring plan: 8 rows a step") == 1


def copied_prefix_cache(prefix, B: int):
    """MMLU's cache before: every row's own copy of the prefix's keys and values in every layer."""
    from transformers.cache_utils import Cache, DynamicLayer
    layers = []
    for src in prefix.layers:
        layer = DynamicLayer()
        layer.lazy_initialization(src.keys, src.values)
        layer.keys, layer.values = src.keys.repeat(B, 1, 1, 1), src.values.repeat(B, 1, 1, 1)  # (B, H, P, D)
        layers.append(layer)
    return Cache(layers=layers)


def test_mmlu_shares_the_prefix_by_reference_and_gives_the_copied_logits(small_target, monkeypatch):
    """evaluation.prefix_cache holds a subject's 5-shot prefix once for all rows (a stride-0 view of
    the one-row cache): the logits are bit-identical to the per-row copies it replaced."""
    import data
    import evaluation
    model, tok = small_target
    qs = [data.MmluQuestion("anatomy", f"Which bone is number {i} in the list of {i * 3} bones?",
                            (f"the {i}th", "the femur", f"bone {i + 1}", "none"), "ABCD"[i % 4]) for i in range(11)]
    enc = [evaluation.mmlu_encode(tok, "anatomy", qs[:5], q, 512) for q in qs[5:]]
    prefix = evaluation.mmlu_prefix_ids(tok, "anatomy", qs[:5], qs[5])
    held = []
    real = evaluation.prefix_cache
    monkeypatch.setattr(evaluation, "prefix_cache", lambda p, B: (held.append((p, c := real(p, B))), c)[1])
    shared = evaluation.mmlu_shared_logits(model, tok, enc, prefix, batch_size=4)
    assert len(shared) == len(enc) and len(held) == 2  # every question, in two batches
    for p, c in held:
        for src, layer in zip(p.layers, c.layers):  # the prefix's one row, not a copy per row
            assert layer.keys.stride(0) == 0 and layer.keys.data_ptr() == src.keys.data_ptr()
    monkeypatch.setattr(evaluation, "prefix_cache", copied_prefix_cache)
    copied = evaluation.mmlu_shared_logits(model, tok, enc, prefix, batch_size=4)
    assert all(torch.equal(shared[i], copied[i]) for i in copied) and shared.keys() == copied.keys()
