"""quant.py against hand-computed blocks (NF4, FP4, LLM.int8) and, where bitsandbytes is importable,
against bitsandbytes itself (it is no dependency and not in tests/requirements.txt: those tests skip
without it, in CI too; `pip install bitsandbytes` runs them on CPU)."""
import pytest
import torch

import quant


def test_code_books_are_bitsandbytes_values():
    assert len(quant.NF4) == 16 and quant.NF4[0] == -1.0 and quant.NF4[7] == 0.0 and quant.NF4[-1] == 1.0
    assert sorted(quant.NF4) == list(quant.NF4)
    # FP4: sign bit + e2m1 (bias 3): 0b011 = 2^(4-1) * 1.5 = 12 -> 1.0; 0b001 the subnormal 0.0625 / 12
    assert quant.FP4[3] == 1.0 and quant.FP4[1] == 0.0625 / 12 and quant.FP4[11] == -1.0
    assert sorted(abs(v) for v in quant.FP4[:8]) == [0, 0.0625 / 12, 2 / 12, 3 / 12, 4 / 12, 6 / 12, 8 / 12, 1]


def test_nf4_and_fp4_on_a_hand_computed_block():
    # one block of 4 values (block=4): absmax 2, normalised 1, 0.3, -0.5, 0.01
    w = torch.tensor([[2.0, 0.6, -1.0, 0.02]])
    # NF4 nearest: 1 -> 1; 0.3 -> 0.33791524 (|0.3-0.3379| < |0.3-0.2461|); -0.5 -> -0.5250731; 0.01 -> 0
    nf4 = quant.blockwise_4bit(w, "nf4", block=4)
    torch.testing.assert_close(nf4, torch.tensor([[2.0, 2 * 0.33791524171829224, -2 * 0.5250730514526367, 0.0]]))
    # FP4 magnitudes /12: 0.3 -> 0.3333 (4/12; 0.25 is farther), 0.5 -> 0.5, 0.01 -> 0.0052083 (0.0625/12)
    fp4 = quant.blockwise_4bit(w, "fp4", block=4)
    torch.testing.assert_close(fp4, torch.tensor([[2.0, 2 * 4 / 12, -1.0, 2 * 0.0625 / 12]]))


def test_blocks_are_64_consecutive_weights_of_the_flattened_tensor():
    torch.manual_seed(0)
    w = torch.randn(3, 100)  # 300 values: blocks 0-63, 64-127, ..., 256-299 (44), across rows
    w.view(-1)[70] = 50.0  # one huge value flattens its own block only
    dq = quant.blockwise_4bit(w, "nf4")
    flat, dflat = w.view(-1), dq.view(-1)
    assert (dflat[64:128] == 0).sum() >= 55 and dflat[70] == 50.0  # the rest of that block rounds to 0
    assert (dflat[:64] != 0).sum() > 40 and (dflat[128:] != 0).sum() > 100  # the others do not
    for lo in range(0, 300, 64):
        blk, dblk = flat[lo:lo + 64], dflat[lo:lo + 64]
        assert dblk.abs().max() == blk.abs().max()  # absmax maps onto +-1 exactly
    assert torch.equal(quant.blockwise_4bit(torch.zeros(2, 64), "fp4"), torch.zeros(2, 64))  # no 0/0


def test_llm_int8_on_a_hand_computed_case():
    W = torch.tensor([[1.0, -0.5, 0.25], [0.1, 0.2, -0.4]])
    x = torch.tensor([[1.0, 8.0, -2.0], [0.5, 0.5, 0.5]])  # column 1 holds an outlier (8 >= 6)
    cb, scb = quant.int8_weight(W)
    assert torch.equal(cb, torch.tensor([[127.0, -64.0, 32.0], [32.0, 64.0, -127.0]]))  # round(W 127 / absmax)
    assert torch.equal(scb, torch.tensor([1.0, 0.4]))
    wd = cb * scb[:, None] / 127
    # row 0: outlier entry zeroed -> [1, 0, -2], SCA = 2, CA = round([63.5, 0, -127]) = [64, 0, -127]
    # row 1: SCA = 0.5, CA = [127, 127, 127]; then column 1 zeroed in every row
    ca, sca = torch.tensor([[64.0, 0, -127], [127, 0, 127]]), torch.tensor([2.0, 0.5])
    want = (ca @ cb.T) * sca[:, None] * scb[None, :] / 127 ** 2 + x[:, 1:2] @ wd[:, 1:2].T
    got = quant.int8_matmul(x, cb, scb)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - x @ W.T).abs().max() < 0.05  # close to the float product, not equal


def test_int8_forward_replaces_and_drop_restores_the_linear():
    torch.manual_seed(1)
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(2, 3, 8) * 3
    ref = lin(x)
    w0 = lin.weight.detach().clone()
    quant.use_int8(lin)
    cb, scb = lin.lume_int8
    torch.testing.assert_close(lin(x), quant.int8_matmul(x, cb, scb, lin.bias), rtol=0, atol=0)
    assert not torch.equal(lin.weight, w0) and "lume_int8" not in lin.state_dict()
    quant.drop_int8(lin)
    with torch.no_grad():
        lin.weight.copy_(w0)
    assert torch.equal(lin(x), ref)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_equals_bitsandbytes(kind):
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed (optional)")
    torch.manual_seed(2)
    w = torch.randn(16, 192) * 0.02
    q, state = F.quantize_4bit(w, blocksize=64, quant_type=kind)
    ref = F.dequantize_4bit(q, state, blocksize=64, quant_type=kind)
    torch.testing.assert_close(quant.blockwise_4bit(w, kind), ref, rtol=0, atol=0)


def test_int8_outlier_equals_bitsandbytes_vectorwise_quant():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (optional)")
    torch.manual_seed(3)
    x = torch.randn(5, 32) * 2
    x[1, 4] = 9.0
    out_row, row_stats, cols = torch.ops.bitsandbytes.int8_vectorwise_quant.default(x.clone(), quant.THRESHOLD)
    big = x.abs() >= quant.THRESHOLD
    az = x.masked_fill(big, 0)
    sca = az.abs().amax(1)
    ca = torch.round(az * (127.0 / sca)[:, None])
    ca[:, big.any(0)] = 0
    assert torch.equal(row_stats, sca) and torch.equal(out_row.float(), ca) and cols.tolist() == [4]
    cb, scb = torch.ops.bitsandbytes.int8_vectorwise_quant.default(torch.randn(6, 32))[:2]
    w = cb.float() * scb[:, None] / 127
    mine_cb, mine_scb = quant.int8_weight(w)
    assert torch.equal(mine_cb, cb.float()) and torch.allclose(mine_scb, scb)
