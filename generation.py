"""
Batched greedy generation as the official SemEval scorer generates, only faster: raw `input` as the
prompt (no chat template), greedy decoding, up to 256 new tokens, stopping where model.generate
stops (generation_config's EOS ids), the new tokens decoded with special tokens skipped and the
scorer's space clean-up.

Prompts are sorted by length and left-padded; positions count real tokens only, pads are masked
out of attention, and a KV cache written in place holds keys and values, so a batched row gives
exactly what the same prompt gives alone through model.generate, metrics.official_generate
(tests/test_reference.py, tests/test_decode.py, tests/test_realscale.py with the real OLMo
tokenizer). Eagerly (the CPU default) the prompts are continuously batched: a finished row's slot
goes to the next prompts (greedy_stream). On CUDA the same runs on fixed shapes, its step replayed as a CUDA graph
(greedy_static_stream). bench.py measures the gain.
"""
import collections
import contextlib
import functools
import inspect

import torch

import lume
import memory
import metrics

# -----------------------------------------------------------------------------
# the KV cache: buffers allocated once per batch, rows dropped when they finish


def kv_cache(capacity: int, static: bool = False):
    """A KV cache whose keys and values live in buffers of `capacity` positions, allocated at the
    prefill (B, kv_heads, capacity, head_dim per layer) and never re-allocated by a step.

    DynamicCache appends each token with torch.cat, re-copying (and re-allocating) the whole cache
    every step. Here each step writes its slot in place. Two ways to hand the keys to attention:
      views   (eager, the CPU default) views of the filled part: exactly DynamicCache's keys, and
              attention never reads the empty slots (StaticCache attends over all of them);
      static  (fixed shapes, for CUDA graphs) every slot, the 4D mask hiding the unwritten ones;
              each row writes its one token at its own column `cache.slot[row]`, a device
              tensor (S,) the step itself advances.
    cache.keep(rows) drops finished rows (one copy of the buffers, only when a row finishes).
    The cache holds no reference cycle, so its buffers are freed as soon as it is dropped, not at
    the next cyclic garbage collection (continuous batching drops one cache per join).
    """
    BufferLayer, KV = cache_classes()
    box = {"slot": None, "rows": None}  # the static step's write columns (S,), shared with the layers
    cache = KV(layer_class_to_replicate=functools.partial(BufferLayer, capacity, static, box))
    cache.box = box
    return cache


@functools.cache
def cache_classes():
    """(BufferLayer, KV), built once on first use (transformers is imported lazily). Defined at
    module level rather than per cache: a class made inside kv_cache closes over the cache, and
    that cycle kept every dropped cache's buffers alive until Python's cyclic GC ran."""
    from transformers.cache_utils import Cache, DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self, capacity: int, static: bool, box: dict):
            super().__init__()
            self.capacity, self.static, self.box = capacity, static, box

        def update(self, k, v, *args, **kwargs):
            capacity = self.capacity
            if not self.is_initialized:
                B, H, _, D = k.shape  # (B, kv_heads, T, head_dim)
                self.kbuf, self.vbuf = k.new_zeros(B, H, capacity, D), v.new_zeros(B, H, capacity, v.shape[-1])
                self.dtype, self.device, self.n, self.is_initialized = k.dtype, k.device, 0, True
            if self.static:  # row r at column slot[r], device tensors: no host value, so a CUDA graph replays it
                assert k.shape[-2] == 1, "a fixed-shape cache takes one token a row (prompts are prefilled apart)"
                rows, slot = self.box["rows"], self.box["slot"]
                self.kbuf[rows, :, slot], self.vbuf[rows, :, slot] = k[:, :, -1], v[:, :, -1]  # (S, H, D)
                self.keys, self.values = self.kbuf, self.vbuf
                return self.keys, self.values
            n, T = self.n, k.shape[-2]
            assert n + T <= capacity, f"KV cache of {capacity} positions is full"
            self.kbuf[:, :, n:n + T], self.vbuf[:, :, n:n + T] = k, v
            self.n = n + T
            self.keys, self.values = self.kbuf[:, :, :n + T], self.vbuf[:, :, :n + T]
            return self.keys, self.values

        def keep(self, rows):
            self.kbuf, self.vbuf = self.kbuf[rows], self.vbuf[rows]
            n = self.capacity if self.static else self.n
            self.keys, self.values = self.kbuf[:, :, :n], self.vbuf[:, :, :n]

        def hold(self, kbuf, vbuf, n: int):
            """Take these buffers (B, H, capacity, D), their first n positions filled."""
            self.kbuf, self.vbuf, self.n, self.is_initialized = kbuf, vbuf, n, True
            self.dtype, self.device = kbuf.dtype, kbuf.device
            self.keys, self.values = kbuf[:, :, :n], vbuf[:, :, :n]

    class KV(Cache):
        @property
        def slot(self):
            return self.box["slot"]

        @slot.setter
        def slot(self, value):
            self.box["slot"] = value

        def keep(self, rows):
            for layer in self.layers:
                layer.keep(rows)

    return BufferLayer, KV


def cache_keyword(model) -> str:
    """The keyword under which the installed transformers' forward takes a KV cache: `cache` since
    5.2x (`past_key_values` is deprecated there, to be removed in 5.40), `past_key_values` before.
    A cache passed under a name the forward ignores would leave it empty (see prefill's check)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def stop_ids(model, tok) -> list[int]:
    """Ids that end a generation, as model.generate stops: generation_config.eos_token_id (an id or
    a list; the released targets' may differ from the tokenizer's), and the tokenizer's EOS."""
    cfg = getattr(model, "generation_config", None)
    ids = getattr(cfg, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return list(dict.fromkeys(ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])))


def prefill(model, ids, attn, cache):
    """The prompts' forward that fills the cache; (B,) next tokens. Positions count real tokens only
    ((cumsum - 1) on the mask), so a left-padded row sees what the same prompt alone sees."""
    T = ids.shape[1]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    key = cache_keyword(model)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1, **{key: cache})
    filled = cache.layers[0].n if cache.layers else 0  # a views cache (the fixed-shape step is never prefilled)
    if filled != T:  # the forward ignored the cache: every decode step would see only its newest
        raise RuntimeError(  # token and every generation would be garbage, silently
            f"the KV cache holds {filled} positions after a prefill of {T}: this transformers "
            f"version's forward did not take it as `{key}=`. Install a transformers version in "
            "requirements.txt's range.")
    return pick(out.logits[:, -1]), pos[:, -1]


def pick(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) the greedy token: the first index of each row's maximum, the one torch.argmax
    (model.generate's pick) returns. max(-1).indices finds the same index 2.6x faster on CPU over a
    50,304-wide vocabulary (1.6 ms of a 6 ms decode step at batch 32 went to argmax)."""
    return logits.max(-1).indices


class Rows:
    """Which prompt each row of the running batch decodes, and the tokens each prompt got.
    new: (B + 1, N) filled with stop[0]; index B marks a row that finished (it leaves the batch
    before the next step); a row that produced a stop id is filled with stop[0] after it, as before."""

    def __init__(self, B: int, N: int, stop: list[int], device):
        self.B, self.t = B, 0
        self.new = torch.full((B + 1, N), stop[0], dtype=torch.long, device=device)
        self.rows = torch.arange(B, device=device)
        self.stop = torch.tensor(stop, device=device)

    def record(self, nxt) -> torch.Tensor:
        """Write step t's tokens; (live rows mask) after this step."""
        self.new[self.rows, self.t] = nxt
        self.t += 1
        self.rows = torch.where(torch.isin(nxt, self.stop), self.B, self.rows)
        return self.rows != self.B

    def result(self) -> torch.Tensor:
        return self.new[:self.B, :self.t]


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, attn: torch.Tensor, max_new_tokens: int, stop: list[int],
           static: bool | None = None) -> torch.Tensor:
    """(B, T) left-padded prompts -> (B, N) new tokens, N <= max_new_tokens; a row that produced a
    stop id is filled with stop[0] after it.

    Eager (one batch; generate's CPU default is greedy_stream over all prompts, with the same
    step): a row that finishes leaves the batch (its cache rows are dropped), so
    a batch costs its rows' real lengths, not B x its longest. The attention mask is one buffer of
    the final length, the cache is written in place: a step allocates nothing of its own.
    static (the CUDA default): fixed shapes, captured in a CUDA graph (greedy_static_stream).
    """
    if static is None:
        static = static_default(model, ids.device)
    if static:  # the fixed-shape stream over these rows, trimmed to the steps the batch ran
        enc = [row[m.bool()].tolist() for row, m in zip(ids, attn)]
        new = greedy_static_stream(model, enc, 0, max_new_tokens, stop, len(enc), attn.numel(), ids.device)
        ended = torch.isin(new, torch.tensor(stop, device=new.device))
        return new[:, :int(torch.where(ended.any(1), ended.int().argmax(1) + 1, new.shape[1]).max())]
    B, T = ids.shape
    cache = kv_cache(T + max_new_tokens)
    mask = attn.new_zeros(B, T + max_new_tokens)  # (B, T + N): filled one column per step
    mask[:, :T] = attn
    nxt, last = prefill(model, ids, attn, cache)
    rows, key = Rows(B, max_new_tokens, stop, ids.device), cache_keyword(model)
    for t in range(max_new_tokens):
        live = rows.record(nxt)
        if t == max_new_tokens - 1:
            break
        n_live = int(live.sum())
        if n_live == 0:
            break
        if n_live < live.numel():  # finished rows leave the batch: the cache, mask and positions follow
            keep = live.nonzero().squeeze(1)
            cache.keep(keep)
            rows.rows, nxt, last, mask = rows.rows[keep], nxt[keep], last[keep], mask[keep]
        nxt, last = step(model, cache, mask, nxt, last, key)
    return rows.result()


def static_default(model, device) -> bool:
    """Fixed shapes and CUDA graphs on CUDA with SDPA (the static step's 4D bool mask is SDPA's;
    eager attention adds float masks), unless a capture has failed in this process."""
    return (device.type == "cuda" and GRAPHS["off"] is None
            and getattr(model.config, "_attn_implementation", "sdpa") == "sdpa")


def step(model, cache, mask, nxt, last, key):
    """One decode step of the eager loops: the newest tokens nxt (B,) at positions last + 1, the
    mask (B, C) opened one column; (B,) next tokens, (B,) their positions."""
    n = cache.layers[0].n
    mask[:, n] = 1
    last = last + 1
    out = model(input_ids=nxt[:, None], attention_mask=mask[:, :n + 1], position_ids=last[:, None],
                use_cache=True, **{key: cache})
    return pick(out.logits[:, -1]), last

# -----------------------------------------------------------------------------
# continuous batching: the slot of a finished row takes the next prompt

REFILL = 4  # prompts join when >= 1/REFILL of the slots are free: a join costs a prefill and one
#             copy of the running cache, so prompts join in groups rather than one per step


class Running:
    """The rows being decoded: their cache (R, H, C, D per layer), mask (R, C) over its positions,
    prompt index `who`, tokens made so far `count`, newest token `nxt` and its position `last`."""

    def __init__(self, cache, mask, who, count, nxt, last):
        self.cache, self.mask, self.who, self.count, self.nxt, self.last = cache, mask, who, count, nxt, last

    def __len__(self):
        return len(self.who)

    def keep(self, rows):
        self.cache.keep(rows)
        self.mask, self.who, self.count, self.nxt, self.last = (
            x[rows] for x in (self.mask, self.who, self.count, self.nxt, self.last))

    def record(self, new, stop, N: int) -> int:
        """new[who, count] <- each row's newest token; the rows that are done (a stop id, or N
        tokens) leave; how many left."""
        new[self.who, self.count] = self.nxt
        self.count = self.count + 1
        done = torch.isin(self.nxt, stop) | (self.count == N)
        n = int(done.sum())
        if n:
            self.keep((~done).nonzero().squeeze(1))
        return n

    def longest(self) -> int:
        """The most real tokens (prompt and new) of any row: the cache's other columns are padding."""
        return int(self.mask.sum(-1).max()) if len(self) else 0


def start(model, enc, idx, pad: int, N: int, device) -> Running:
    """The prompts `idx`, left-padded and prefilled into a cache with room for N more tokens."""
    ids, attn = (x.to(device) for x in lume.left_pad([enc[i] for i in idx], pad))
    B, T = ids.shape
    cache, mask = kv_cache(T + N), attn.new_zeros(B, T + N)
    mask[:, :T] = attn
    nxt, last = prefill(model, ids, attn, cache)
    return Running(cache, mask, torch.tensor(idx, device=device), torch.zeros_like(nxt), nxt, last)


def join(a: Running, b: Running, N: int) -> Running:
    """a's rows then b's in one batch with room for N more tokens. Each row keeps its keys, values,
    mask and positions; only its columns move: every row's tokens end at column c (the longest
    row's length), and a's columns that are padding for all its rows are dropped."""
    na, nb, la = a.cache.layers[0].n, b.cache.layers[0].n, a.longest()
    c, Ra, R = max(la, nb), len(a), len(a) + len(b)
    cache = kv_cache(c + N)
    for x, y in zip(a.cache.layers, b.cache.layers):
        k = x.kbuf.new_zeros(R, x.kbuf.shape[1], c + N, x.kbuf.shape[-1])
        v = x.vbuf.new_zeros(R, x.vbuf.shape[1], c + N, x.vbuf.shape[-1])
        k[:Ra, :, c - la:c], v[:Ra, :, c - la:c] = x.kbuf[:, :, na - la:na], x.vbuf[:, :, na - la:na]
        k[Ra:, :, c - nb:c], v[Ra:, :, c - nb:c] = y.kbuf[:, :, :nb], y.vbuf[:, :, :nb]
        layer = cache.layer_class_to_replicate()
        layer.hold(k, v, c)
        cache.layers.append(layer)
    mask = a.mask.new_zeros(R, c + N)
    mask[:Ra, c - la:c], mask[Ra:, c - nb:c] = a.mask[:, na - la:na], b.mask[:, :nb]
    cat = lambda f: torch.cat([getattr(a, f), getattr(b, f)])  # noqa: E731
    return Running(cache, mask, cat("who"), cat("count"), cat("nxt"), cat("last"))


def take(queue, free: int, rows: int, width: int, enc, max_tokens: int) -> list[int]:
    """Up to `free` prompts off the (length-sorted) queue, while the batch they make with `rows`
    running rows of `width` tokens stays within max_tokens padded positions (the cap that bounds
    a batch's cache and prefill); at least one when nothing runs."""
    idx = []
    while queue and len(idx) < free and (not idx and not rows or
                                         (rows + len(idx) + 1) * max(width, len(enc[queue[0]])) <= max_tokens):
        idx.append(queue.popleft())
    return idx


@torch.inference_mode()
def greedy_stream(model, enc, pad: int, max_new_tokens: int, stop: list[int], batch_size: int = 32,
                  max_tokens: int = 16384, device="cpu", on_done=None) -> torch.Tensor:
    """Prompts (lists of ids) -> (P, N) new tokens, stop[0] after a stop id: greedy() over all
    prompts at once with continuous batching. Prompts start in length order, a finished row leaves
    and, once a quarter of the slots are free, the next prompts are prefilled and join the running
    rows (join: the cache is copied once, each row keeping its columns' contents). So a batch stays
    full to the end instead of decoding its last rows alone. on_done(n) after rows finish."""
    N, key = max_new_tokens, cache_keyword(model)
    queue = collections.deque(sorted(range(len(enc)), key=lambda i: len(enc[i])))
    new = torch.full((len(enc), N), stop[0], dtype=torch.long, device=device)
    stop_t, run, done = torch.tensor(stop, device=device), None, 0
    while True:
        rows = len(run) if run else 0
        idx = take(queue, batch_size - rows, rows, run.longest() if rows else 0, enc, max_tokens) \
            if queue and batch_size - rows >= max(1, batch_size // REFILL) else []
        if idx:
            fresh = start(model, enc, idx, pad, N, device)
            finished = fresh.record(new, stop_t, N)
            if len(fresh):
                run = join(run, fresh, N) if rows else fresh
        elif rows:
            run.nxt, run.last = step(model, run.cache, run.mask, run.nxt, run.last, key)
            finished = run.record(new, stop_t, N)
        else:
            return new
        done += finished
        if finished and on_done:
            on_done(done)

# -----------------------------------------------------------------------------
# fixed shapes: the decode step captured once per shape in a CUDA graph

GRAPHS = {"off": None, "steps": {}}  # why graphs are off (printed once); the captured steps by shape


def capturable(device) -> bool:
    return device.type == "cuda"


class StaticStep:
    """One decode step on fixed buffers: S rows, a cache of C positions. run() reads ids/pos/slot,
    writes nxt and advances them, so replaying it (a CUDA graph) is the whole step: no host work,
    no allocation. Each row's tokens start at column 0 and it writes at its own column slot[row];
    the 4D bool mask (S, 1, 1, C) says which columns each row attends to."""

    def __init__(self, model, S: int, C: int, device):
        self.model, self.S, self.C, self.key = model, S, C, cache_keyword(model)
        self.cache = kv_cache(C, static=True)
        self.ids = torch.zeros(S, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(S, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(S, dtype=torch.long, device=device)  # each row's next cache column
        self.cache.slot, self.cache.box["rows"] = self.slot, torch.arange(S, device=device)
        self.mask = torch.zeros(S, 1, 1, C, dtype=torch.bool, device=device)
        self.nxt = torch.zeros(S, dtype=torch.long, device=device)
        self.graph, self.warm = None, False

    def run(self):
        self.mask.view(self.S, self.C).scatter_(1, self.slot[:, None], True)  # each row opens its column
        logits = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                            **{self.key: self.cache}).logits  # (S, 1, V)
        self.nxt.copy_(pick(logits[:, -1]))
        self.ids.copy_(self.nxt[:, None])
        self.pos.add_(1)
        self.slot.add_(1).clamp_(max=self.C - 1)  # a free row runs on past its end: it stays in bounds

    def step(self):
        """Eager on a shape's first call (the warm-up, on a side stream), then captured once and replayed."""
        if self.graph is None and self.warm and capturable(self.ids.device) and GRAPHS["off"] is None:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # records the kernels, runs none of them
                    self.run()
                self.graph = graph
            except Exception as e:  # noqa: BLE001  an op that cannot be captured: eager from here on
                GRAPHS["off"] = lume.first_line(e)
                print(f"generation: CUDA graph capture failed, decoding eagerly ({GRAPHS['off']})", flush=True)
        if self.graph is not None:
            self.graph.replay()
        elif capturable(self.ids.device) and GRAPHS["off"] is None:
            self.warm_up()
        else:
            self.run()

    def warm_up(self):
        """The eager run before a capture, on a side stream as CUDA graph capture requires (lazy
        initialisations and cuBLAS workspaces made off the capturing stream); the current stream waits."""
        here, side = torch.cuda.current_stream(self.ids.device), torch.cuda.Stream(self.ids.device)
        side.wait_stream(here)  # the step's buffers were written on the current stream
        with torch.cuda.stream(side):
            self.run()
        here.wait_stream(side)
        self.warm = True


def static_step(model, S: int, C: int, device) -> StaticStep:
    """The step of shape (S, C) for this model, built once and kept (its graph with it); steps of another
    capacity or model are dropped: batches come sorted by length, and their buffers hold the cache."""
    steps, key = GRAPHS["steps"], (id(model), S, C)
    if key not in steps:
        for k in [k for k in steps if k[0] != id(model) or k[2] != C]:
            del steps[k]
        steps[key] = StaticStep(model, S, C, device)
    return steps[key]


ROUND_TO = 64  # cache positions of a fixed-shape step are a multiple of this: close lengths share a graph
capacity = memory.capacity  # one definition: memory.scoring_plan counts the cache a step builds


def enter(model, st, live, fresh, attn, nxt, last, N: int, S0: int, max_tokens: int, round_to: int, rows=None):
    """The fixed-shape step that decodes st's live rows and the freshly prefilled prompts (their
    eager cache `fresh`, (k, T) mask `attn`, next tokens and positions); (step, the live rows' rows
    in it, the new prompts' rows). Every row keeps its columns (its tokens from column 0, its write
    column slot[row]); a new row takes columns 0..T-1, pads masked. While T + N fits st's capacity
    the new prompts take free rows of st in place: nothing moves, and its graph replays. Else the
    live rows move to the first rows of a step of capacity C = T + N rounded up and at most
    max_tokens // C rows, the new ones after them. With no new prompts (fresh None) and
    `rows`: the live rows move to a step of that many rows. Free rows decode into a sink."""
    nl, (nk, T) = len(live), attn.shape if fresh is not None else (0, 0)
    if st is not None and T + N <= st.C and rows is None:  # in place
        free = torch.ones(st.S, dtype=torch.bool, device=live.device)
        free[live] = False
        dst, lrows, jrows = st, live, free.nonzero().squeeze(1)[:nk]
    else:
        C = st.C if st is not None and T + N <= st.C else capacity(T, N, round_to)
        S = rows or max(nl + nk, min(S0, max_tokens // C))  # max_tokens bounds rows x capacity
        dst = static_step(model, S, C, st.slot.device if st is not None else attn.device)
        lrows, jrows = torch.arange(nl, device=dst.slot.device), torch.arange(nl, nl + nk, device=dst.slot.device)
        if not dst.cache.layers:
            for f in (fresh or st.cache).layers:
                layer = dst.cache.layer_class_to_replicate()
                shape = (S, f.kbuf.shape[1], C, f.kbuf.shape[-1])
                layer.hold(f.kbuf.new_zeros(shape), f.vbuf.new_zeros(shape), C)
                dst.cache.layers.append(layer)
        if nl:  # copies (indexed by rows) taken before dst, which may share st's buffers (same shape), is written
            m = int(st.slot[live].max())  # the columns the live rows use
            old = [(x.kbuf[live, :, :m], x.vbuf[live, :, :m]) for x in st.cache.layers]
            state = st.mask[live, :, :, :m], st.ids[live], st.pos[live], st.slot[live]
        for buf in (dst.mask, dst.ids, dst.pos, dst.slot):
            buf.zero_()
        if nl:
            for d, (k, v) in zip(dst.cache.layers, old):
                d.kbuf[:nl, :, :m], d.vbuf[:nl, :, :m] = k, v
            dst.mask[:nl, :, :, :m], dst.ids[:nl], dst.pos[:nl], dst.slot[:nl] = state
    if nk:
        for d, f in zip(dst.cache.layers, fresh.layers):
            d.kbuf[jrows, :, :T], d.vbuf[jrows, :, :T] = f.kbuf[:, :, :T], f.vbuf[:, :, :T]
        dst.mask[jrows] = False
        dst.mask[jrows, 0, 0, :T] = attn.bool()
        dst.ids[jrows, 0], dst.pos[jrows, 0], dst.slot[jrows] = nxt, last + 1, T
    return dst, lrows, jrows


def place(S: int, P: int, who, count, live, lrows, jrows, idx):
    """The prompt of each of the step's S rows (P: free) and its tokens so far, after enter put the
    live rows at lrows and the new prompts idx (one token made) at jrows."""
    w, c = who.new_full((S,), P), count.new_zeros(S)
    w[lrows], c[lrows] = who[live], count[live]
    w[jrows], c[jrows] = idx, 1
    return w, c


@torch.inference_mode()
def greedy_static_stream(model, enc, pad: int, max_new_tokens: int, stop: list[int], batch_size: int = 32,
                         max_tokens: int = 16384, device="cpu", on_done=None, round_to: int = ROUND_TO) -> torch.Tensor:
    """greedy_stream on fixed shapes (the CUDA default): one step of S rows and C cache positions,
    captured once in a CUDA graph and replayed; each row writes its own next column. Prompts are
    prefilled apart (an eager cache) and, once a quarter of the rows are free, `enter` free rows of
    the step in place (nothing moves; the graph is kept while the shape holds). A finished row writes
    into a sink row until a prompt takes its place; once no prompt waits and half the rows are
    free, the live ones move to a step of the next power of two rows (as the run drains).
    One host sync a step (how many rows finished). (P, N) new tokens, stop[0] after a stop id."""
    N, P = max_new_tokens, len(enc)
    S0 = min(batch_size, P)
    queue = collections.deque(sorted(range(P), key=lambda i: len(enc[i])))
    new = torch.full((P + 1, N), stop[0], dtype=torch.long, device=device)  # row P: the sink
    stop_t, st, done = torch.tensor(stop, device=device), None, 0
    who = torch.full((S0,), P, dtype=torch.long, device=device)  # the prompt of each row, P when free
    count, nl = torch.zeros_like(who), 0  # tokens each row's prompt has made; live rows
    while True:
        S, idx, finished = st.S if st is not None else S0, [], 0
        if queue and S - nl >= max(1, S // REFILL):
            live = (who != P).nonzero().squeeze(1)
            width = int(st.mask[live, 0, 0].sum(-1).max()) if nl else 0  # the longest live row's tokens
            idx = take(queue, S - nl, nl, width, enc, max_tokens)
        if idx:
            ids, attn = lume.left_pad([enc[i] for i in idx], pad)
            ids, attn, idx = ids.to(device), attn.to(device), torch.tensor(idx, device=device)
            fresh = kv_cache(ids.shape[1])
            nxt, last = prefill(model, ids, attn, fresh)
            new[idx, 0] = nxt
            stay = ~torch.isin(nxt, stop_t) if N > 1 else torch.zeros_like(nxt, dtype=torch.bool)
            finished = len(idx) - int(stay.sum())
            if finished < len(idx):
                k = stay.nonzero().squeeze(1)
                fresh.keep(k)
                st, lrows, jrows = enter(model, st, live, fresh, attn[k], nxt[k], last[k], N, S0, max_tokens, round_to)
                who, count = place(st.S, P, who, count, live, lrows, jrows, idx[k])
                nl += len(k)
        elif not queue and 0 < nl <= S // 2:  # draining: fewer rows, fewer keys and values read
            live = (who != P).nonzero().squeeze(1)
            rows = 1 << (nl - 1).bit_length()  # the next power of two
            st, lrows, _ = enter(model, st, live, None, None, None, None, N, S0, max_tokens, round_to, rows=rows)
            who, count = place(st.S, P, who, count, live, lrows, lrows[:0], who[:0])
            continue
        elif nl:
            st.step()
            new[who, count.clamp(max=N - 1)] = st.nxt  # free rows write into the sink row P
            count = count + (who != P)
            end = (who != P) & (torch.isin(st.nxt, stop_t) | (count >= N))
            finished = int(end.sum())
            who, nl = torch.where(end, P, who), nl - finished
        else:
            return new[:P]
        done += finished
        if finished and on_done:
            on_done(done)


def decode_new(tok, new_ids, stop=None) -> str:
    """New tokens up to and including the first stop id (default: EOS), special tokens skipped, as
    the official scorer decodes model.generate's output (the stop id is kept there, and skipped
    when it is a special token)."""
    ids, stop = list(new_ids), set(stop or [tok.eos_token_id])
    end = next((i for i, t in enumerate(ids) if t in stop), None)
    ids = ids if end is None else ids[:end + 1]
    return metrics.clean_up_tokenization(tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def free_bytes(device) -> tuple[int, int] | None:
    """(bytes new tensors can take: the driver's free and what torch's allocator holds unused, the
    total) on CUDA; None elsewhere (no plan: the step keeps the caller's batch_size and max_tokens)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total


def scoring_plan(model, enc, max_new_tokens: int, device) -> dict | None:
    """memory.scoring_plan for these prompts' lengths on the memory free now: the weights
    and training's state beside scoring (--eval-every) are already out of it; K/V in the compute dtype."""
    if (got := free_bytes(device)) is None:
        return None
    elem = 2 if torch.is_autocast_enabled(device.type) else next(model.parameters()).element_size()
    return memory.scoring_plan(model.config, *got, min(map(len, enc)), max(map(len, enc)), max_new_tokens,
                               elem, ROUND_TO)


@torch.inference_mode()
def generate(model, tok, prompts, max_new_tokens: int = 256, batch_size: int = 32,
             max_tokens: int = 16384, autocast=None, progress=None) -> list[str]:
    """Greedy completions of raw prompts (no chat template), batched by prompt length. On CUDA (fixed
    shapes) the step's rows and the row-position cap come from scoring_plan, printed in one line;
    batch_size and max_tokens are the eager path's."""
    device = next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext()
    enc = [tok(p).input_ids for p in prompts]
    pad, stop = lume.pad_of(tok), stop_ids(model, tok)
    on_done = (lambda n: progress(n, len(prompts))) if progress else None
    stream = greedy_static_stream if static_default(model, device) else greedy_stream  # CUDA graphs, or eager
    try:
        with autocast:
            plan = scoring_plan(model, enc, max_new_tokens, device) if stream is greedy_static_stream and enc else None
            if plan:  # rows from the memory left (CUDA; the eager path keeps its own)
                lume.print0(f"scoring plan: {memory.plan_line(plan)}")
                batch_size, max_tokens = plan["rows"], plan["max_tokens"]
            new = stream(model, enc, pad, max_new_tokens, stop, batch_size, max_tokens, device, on_done)
    finally:  # the captured steps hold the model (scoring's bf16 copy: 14 GB on a 7B) and their caches;
        GRAPHS["steps"].clear()  # kept past scoring, they would sit beside training's optimizer
    return [decode_new(tok, row, stop) for row in new.tolist()]
