"""
Batched greedy generation as the official SemEval scorer generates, only faster: raw `input` as the
prompt (no chat template), greedy decoding, up to 256 new tokens, stopping where model.generate
stops (generation_config's EOS ids), the new tokens decoded with special tokens skipped and the
scorer's space clean-up.

Prompts are sorted by length and left-padded into batches; positions count real tokens only, pads
are masked out of attention, and a KV cache written in place holds keys and values, so a batched
row gives exactly what the same prompt gives alone through model.generate (tests/test_engine.py,
tests/test_realscale.py with the real OLMo tokenizer). bench.py measures the gain.
"""
import contextlib
import inspect

import torch

import lume

def preallocated_cache(capacity: int):
    """A KV cache whose keys and values live in buffers allocated once for `capacity` positions.

    DynamicCache appends each token with torch.cat, re-copying (and re-allocating) the whole
    cache every step, so decoding long left-padded batches was memory-bound on CPU (bench model,
    2 cores, the 64 longest bench prompts x 128 new tokens: 19-28 s with DynamicCache, 12-13 s
    with this). StaticCache avoids the copy but attends over all `capacity` slots from the first
    step. Here each step writes one slot and attention sees views of the filled part: exactly
    the keys and values DynamicCache holds.
    """
    from transformers.cache_utils import Cache, DynamicLayer

    class BufferLayer(DynamicLayer):
        def update(self, k, v, *args, **kwargs):
            if not self.is_initialized:
                B, H, _, D = k.shape  # (B, heads, T, head_dim)
                self.kbuf, self.vbuf = k.new_empty(B, H, capacity, D), v.new_empty(B, H, capacity, v.shape[-1])
                self.dtype, self.device, self.n, self.is_initialized = k.dtype, k.device, 0, True
            n, T = self.n, k.shape[-2]
            assert n + T <= capacity, f"KV cache of {capacity} positions is full"
            self.kbuf[:, :, n:n + T], self.vbuf[:, :, n:n + T] = k, v
            self.n = n + T
            self.keys, self.values = self.kbuf[:, :, :n + T], self.vbuf[:, :, :n + T]
            return self.keys, self.values

    return Cache(layer_class_to_replicate=BufferLayer)


def cache_keyword(model) -> str:
    """The keyword under which the installed transformers' forward takes a KV cache: `cache` since
    5.2x (`past_key_values` is deprecated there, to be removed in 5.40), `past_key_values` before.
    A cache passed under a name the forward ignores would leave it empty (see greedy's check)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def stop_ids(model, tok) -> list[int]:
    """Ids that end a generation, as model.generate stops: generation_config.eos_token_id (an id or
    a list; the released targets' may differ from the tokenizer's), and the tokenizer's EOS."""
    cfg = getattr(model, "generation_config", None)
    ids = getattr(cfg, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return list(dict.fromkeys(ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])))


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, attn: torch.Tensor, max_new_tokens: int, stop: list[int]) -> torch.Tensor:
    """(B, T) left-padded prompts -> (B, N) new tokens, N <= max_new_tokens; a row that produced a
    stop id is filled with stop[0] after it.

    Positions count real tokens only ((cumsum - 1) on the mask), so a left-padded row sees
    the same positions as the same prompt alone, and pads are masked out of attention.
    """
    B, T = ids.shape
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = preallocated_cache(T + max_new_tokens)
    key = cache_keyword(model)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{key: cache})
    if cache.get_seq_length() != T:  # the forward ignored the cache: every decode step would see only
        raise RuntimeError(  # its newest token and every generation would be garbage, silently
            f"the KV cache holds {cache.get_seq_length()} positions after a prefill of {T}: this transformers "
            f"version's forward did not take it as `{key}=`. Install a transformers version in "
            "requirements.txt's range.")
    stop_t = torch.tensor(stop, device=ids.device)
    nxt = out.logits[:, -1].argmax(-1)  # (B,)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    new = []
    for t in range(max_new_tokens):
        nxt = torch.where(done, torch.full_like(nxt, stop[0]), nxt)
        new.append(nxt)
        done |= torch.isin(nxt, stop_t)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        attn = torch.cat([attn, attn.new_ones(B, 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, use_cache=True,
                    **{key: cache})
        nxt = out.logits[:, -1].argmax(-1)
    return torch.stack(new, dim=1) if new else ids.new_zeros(B, 0)


def clean_up_tokenization(text: str) -> str:
    """The space clean-up the official scorer gets from `batch_decode(..., clean_up_tokenization_spaces=True)`
    (transformers 4.x applied it to every tokenizer; 5.x skips it for BPE, so we apply it ourselves)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def decode_new(tok, new_ids, stop=None) -> str:
    """New tokens up to and including the first stop id (default: EOS), special tokens skipped, as
    the official scorer decodes model.generate's output (the stop id is kept there, and skipped
    when it is a special token)."""
    ids, stop = list(new_ids), set(stop or [tok.eos_token_id])
    end = next((i for i, t in enumerate(ids) if t in stop), None)
    ids = ids if end is None else ids[:end + 1]
    return clean_up_tokenization(tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


@torch.inference_mode()
def generate(model, tok, prompts, max_new_tokens: int = 256, batch_size: int = 32,
             max_tokens: int = 16384, autocast=None, progress=None) -> list[str]:
    """Greedy completions of raw prompts (no chat template), batched by prompt length."""
    device = next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext()
    enc = [tok(p).input_ids for p in prompts]
    outs = [None] * len(prompts)
    pad, stop = lume.pad_of(tok), stop_ids(model, tok)
    done = 0
    for idx in lume.length_batches([len(e) for e in enc], batch_size, max_tokens):
        ids, attn = lume.left_pad([enc[i] for i in idx], pad)
        with autocast:
            new = greedy(model, ids.to(device), attn.to(device), max_new_tokens, stop)
        for i, row in zip(idx, new.tolist()):
            outs[i] = decode_new(tok, row, stop)
        done += len(idx)
        if progress:
            progress(done, len(prompts))
    return outs
