"""The decode loop (generation.greedy) is token-identical to the loop it replaced: a DynamicCache
that grows by torch.cat and a batch that runs until its longest row ends (reference_greedy below,
the pre-issue-23 path), in batches with mixed prompt lengths and rows that finish early, on the
small memorising target and on a hub-shaped OLMo with the real tokenizer (pad != EOS). Both decode
ways are checked: eager with finished rows leaving the batch (the CPU default) and the fixed-shape
step that CUDA captures in a graph (run eagerly here; the GPU report counts its differences there).
"""
import pytest
import torch

import generation
import lume
from test_realscale import EOS, PAD, olmo, olmo_dir, release  # noqa: F401  (module fixtures)


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


def test_decode_equals_the_reference_loop_with_the_real_tokenizer(olmo, release):  # noqa: F811
    model, tok = olmo
    assert tok.pad_token_id == PAD != EOS
    prompts = [it.input for it in release if it.kind == "qa" and it.task in (1, 3)][:8] + \
        [it.input for it in release if it.kind == "sc"][:4]
    check_identity(model, tok, prompts, 20, [EOS])


def test_static_steps_move_to_smaller_shapes_as_rows_finish(small_target, small_data, monkeypatch):
    """The fixed-shape path halves its rows when half have finished: a 12-row batch runs steps of
    16, 8, ... rows, each built once, and the outputs stay the reference's."""
    model, tok = small_target
    items, _ = small_data
    built = []
    real = generation.StaticStep.__init__

    def spy(self, model, S, C, device):
        built.append(S)
        real(self, model, S, C, device)
    monkeypatch.setattr(generation.StaticStep, "__init__", spy)
    generation.GRAPHS["steps"].clear()
    prompts = [it.input for it in items][:12]
    check_identity(model, tok, prompts, 24, generation.stop_ids(model, tok))
    assert built[0] == 12 and len(built) >= 2 and all(s & (s - 1) == 0 for s in built[1:])
    assert built[1:] == sorted(built[1:], reverse=True)


def test_a_failed_capture_says_why_in_one_line_and_decodes_eagerly(small_target, small_data, monkeypatch, capsys):
    model, tok = small_target
    items, _ = small_data

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
