"""Each fast path equals the short reference it replaces, in metrics.py: the official scorer's two
model calls, one item at a time.

- membership.doc_stats (length-sorted right-padded batches, the LM head in chunks) gives each
  document metrics.official_doc_loss, `model(ids, labels=ids).loss`;
- generation.generate (left padding, KV cache, continuous batching) gives each prompt
  metrics.official_generate, `model.generate` greedy on the prompt alone, decoded as the scorer does.
The same identities on the real OLMo tokenizer: tests/test_realscale.py.
"""
import pytest

import generation
import membership
import metrics


def test_batched_chunked_mia_losses_equal_the_official_loss_per_document(small_target, small_data):
    model, tok = small_target
    items, mia = small_data
    docs = [d.document for d in mia["member"] + mia["nonmember"]] + ["Short one.", items[0].input]
    lengths = [len(tok(d).input_ids) for d in docs]
    assert max(lengths) > 4 * min(lengths)  # one batch: the short rows are mostly padding
    ref = [metrics.official_doc_loss(model, tok, d) for d in docs]
    assert max(ref) - min(ref) > 0.5  # distinct losses: the equality is not trivial
    whole = membership.doc_stats(model, tok, docs, batch_size=len(docs), chunk=7)  # chunks cut rows
    assert [s["loss"] for s in whole] == pytest.approx(ref, abs=1e-5)
    assert membership.doc_losses(model, tok, docs, batch_size=3) == pytest.approx(ref, abs=1e-5)


def test_continuous_batching_gives_the_official_greedy_decode(small_target, small_data):
    model, tok = small_target
    items, _ = small_data
    retain = [it for it in items if it.split == "retain"]
    picked = [retain[i] for i in (0, 8, 16, 17, 10, 4)]  # Task 1 sc, Task 2 qa, Task 3 sc and qa, Task 2 sc, qa
    prompts = [it.input for it in picked]
    assert len({len(tok(p).input_ids) for p in prompts}) >= 5  # 9 to 329 tokens: left padding matters
    got = generation.generate(model, tok, prompts, max_new_tokens=12, batch_size=2)  # rows join as others end
    ref = [metrics.official_generate(model, tok, p, max_new_tokens=12) for p in prompts]
    assert got == ref
    assert len(set(ref)) >= 5  # varied outputs: the equality is not trivial
    # rows stop at different steps: at EOS first (""), after a memorised answer, or at 12 tokens
    assert "" in ref and sum(o.strip() == it.output for o, it in zip(ref, picked)) >= 2
