"""
Weight quantisation of a deployed model, in plain PyTorch (attacks.py's quant8, quant4, nf4, fp4 and
int8-outlier; docs/attacks.md). Every quantiser returns the dequantised weight (fake quantisation:
the model keeps computing in its own dtype), so the attacked model is scored like any stage.

Two families, which are different threats:

  RTN (ours, round-to-nearest on a uniform symmetric grid, no library follows it exactly):
    quant8   one scale per output row, q in [-127, 127]:  s = absmax(row) / 127, w' = round(w / s) s
    quant4   the same per group of 128 inputs of a row, q in [-7, 7] (15 levels)

  bitsandbytes' formats, as Zhang et al. (arXiv 2410.16454, "Catastrophic failure of LLM unlearning
  via quantization") loaded their models: transformers' BitsAndBytesConfig(load_in_4bit=True) (whose
  default quant type is fp4, no double quantisation, blocks of 64) and (load_in_8bit=True) (LLM.int8,
  threshold 6.0); the output head stays in full precision in both (llm_int8_skip_modules):
    nf4      blockwise absmax over 64 consecutive weights of the flattened (row-major) tensor, each
             w / absmax rounded to the nearest of NF4's 16 values (QLoRA, Dettmers et al. 2023: quantiles
             of N(0, 1) scaled to [-1, 1], with an exact 0), w' = code * absmax
    fp4      the same with bitsandbytes' FP4 code: a sign bit and e2m1 magnitudes {0, 0.0625, 2, 3, 4, 6,
             8, 12} (2 exponent bits, bias 3, 1 mantissa bit; 0.0625 the subnormal), divided by 12
    int8-outlier  LLM.int8 (Dettmers et al. 2022) as bitsandbytes runs it for inference
             (has_fp16_weights=False): the weight stored row-wise absmax int8, CB = round(W * 127 /
             SCB), SCB = absmax of the row; at each forward the input columns holding any |x| >= 6.0
             (the outliers) are multiplied in floating point with the dequantised weight columns
             CB * SCB / 127, and every other column in int8: x quantised row-wise (per token, absmax
             over its non-outlier entries), the int32 product rescaled by SCA SCB / 127^2.

Read from bitsandbytes' source (functional.get_4bit_type, the CUDA kernels' dQuantize/dDequantize
trees, the default backend's int8_vectorwise_quant and MatMul8bitLt), written here from those facts.
Nearest rounding: the kernels' decision trees compare with the midpoints between code values
(x > midpoint takes the upper one), which is torch.bucketize(x, midpoints) (right=False). The
normalisation multiplies by 1 / absmax, as the kernels do. Differences from bitsandbytes: we compute
in fp32 where it runs fp16/bf16 (its absmax is stored in fp32 too), and an all-zero block stays 0
(bitsandbytes divides by 0). tests/test_quant.py checks each against a hand-computed block and, where
bitsandbytes is installed, against it.
"""
import types

import torch

# -----------------------------------------------------------------------------
# RTN: round-to-nearest on a uniform symmetric grid (quant8, quant4)

QMAX = {8: 127, 4: 7}  # symmetric ranges [-127, 127] and [-7, 7]: zero is exact, no offset
GROUP = {8: None, 4: 128}  # 8-bit: one scale per output channel (row); 4-bit: per 128 inputs


def quant_rows(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """Dequantised symmetric RTN of fp32 x (..., g), one scale per last-dim row:
        s = absmax / qmax,  q = clamp(round(x / s), -qmax, qmax),  x' = q s,  |x - x'| <= s / 2.
    Idempotent bit for bit: the row's largest element comes back as fl(qmax * fl(absmax / qmax)),
    which rounds back to absmax (0 exceptions in 10^7 draws per qmax; an arbitrary s would not: 1% of
    them fail fl(fl(127 s) / 127) == s), so a second pass finds the same s and the same q. An
    all-zero row has s = 0 and stays 0."""
    s = x.abs().amax(-1, keepdim=True) / qmax
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return (x / safe).round().clamp(-qmax, qmax) * s


def fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, in) weight -> its dequantised `bits`-bit RTN in w's dtype (math in fp32). 4-bit:
    groups of 128 consecutive inputs of a row; when `in` is not a multiple of 128 the last group
    of each row is the remaining in % 128 inputs, with its own scale."""
    x, qmax, g = w.float(), QMAX[bits], GROUP[bits]
    if g is None or x.shape[1] <= g:
        return quant_rows(x, qmax).to(w.dtype)
    n = x.shape[1] // g * g
    parts = [quant_rows(x[:, :n].reshape(x.shape[0], -1, g), qmax).reshape(x.shape[0], n)]
    if n < x.shape[1]:
        parts.append(quant_rows(x[:, n:], qmax))
    return torch.cat(parts, 1).to(w.dtype)


# -----------------------------------------------------------------------------
# bitsandbytes' 4-bit formats: NF4 and FP4, blockwise absmax over 64 weights

BLOCK = 64  # bitsandbytes' quantize_4bit blocksize as transformers loads a model (bnb_4bit default)
# NF4's 16 values (functional.get_4bit_type("nf4")): 8 positive and 7 negative N(0,1) quantiles,
# normalised to [-1, 1], with an exact 0 (QLoRA, Appendix E)
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)
# FP4's magnitudes (the 3 bits after the sign: exponent e1 e2, mantissa m; bias 3): 0b000 = 0,
# 0b001 = 0.0625 (subnormal), else 2^(4 - e) (1 + m / 2) for e = 2 e1 + e2; normalised by 12
FP4_E2M1 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4 = tuple(v / 12 for v in FP4_E2M1) + tuple(-v / 12 for v in FP4_E2M1)  # code index = sign * 8 + bits
CODES = {"nf4": NF4, "fp4": FP4}


def nearest(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Each x (normalised to [-1, 1]) replaced by the nearest of the sorted `values`, a tie to the
    lower one (the kernels' x > midpoint -> upper)."""
    mids = (values[1:] + values[:-1]) / 2
    return values[torch.bucketize(x, mids)]


def blockwise_4bit(w: torch.Tensor, kind: str, block: int = BLOCK) -> torch.Tensor:
    """w (any shape) -> its dequantised NF4 / FP4 in w's dtype (math in fp32): the flattened tensor
    cut into blocks of `block` consecutive values (the last one shorter), per block
        absmax = max |w|,   w' = code(w * (1 / absmax)) * absmax
    with code the nearest value of CODES[kind]; FP4 rounds the magnitude and keeps the sign bit
    (-0 is 0). An all-zero block stays 0."""
    flat = w.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % block
    x = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block)  # zeros never change an absmax
    absmax = x.abs().amax(1, keepdim=True)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    z = x * inv  # in [-1, 1]
    if kind == "nf4":
        q = nearest(z, torch.tensor(NF4))
    else:
        mags = torch.tensor(sorted(FP4_E2M1)) / 12
        q = torch.sign(z) * nearest(z.abs(), mags)
    return (q * absmax).reshape(-1)[:n].reshape(w.shape).to(w.dtype)


# -----------------------------------------------------------------------------
# LLM.int8: row-wise absmax int8 weights, int8 activations, fp outlier columns at |x| >= 6

THRESHOLD = 6.0  # LLM.int8's outlier threshold (BitsAndBytesConfig's llm_int8_threshold default)


def int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB, SCB): (out, in) weight -> int8 codes CB = round(W * (127 / SCB)) (as floats) and the
    row absmax SCB (out,), fp32 (bitsandbytes' int8_vectorwise_quant without threshold)."""
    x = w.detach().float()
    scb = x.abs().amax(1)
    safe = torch.where(scb > 0, scb, torch.ones_like(scb))
    return torch.round(x * (127.0 / safe)[:, None]), scb


def int8_matmul(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias=None,
                threshold: float = THRESHOLD) -> torch.Tensor:
    """LLM.int8's y = x W^T + b for x (..., in), W = (CB, SCB) of int8_weight; fp32 math, out in x's dtype.
      outlier columns  O = {j : any |x_ij| >= threshold}: x[:, O] (CB[:, O] SCB / 127)^T in floating point
      the others       CA = round(x' * 127 / SCA) per row, x' = x with the outlier ENTRIES zeroed and
                       SCA its row absmax; CA[:, O] = 0;  (CA CB^T) * SCA SCB / 127^2
    The integer product is exact in float64 (|sums| < 2^53)."""
    a = x.reshape(-1, x.shape[-1]).float()
    big = a.abs() >= threshold
    cols = big.any(0)
    az = a.masked_fill(big, 0.0)
    sca = az.abs().amax(1)
    safe = torch.where(sca > 0, sca, torch.ones_like(sca))
    ca = torch.round(az * (127.0 / safe)[:, None])
    ca[:, cols] = 0
    y = (ca.double() @ cb.double().T).float() * (sca[:, None] * scb[None, :]) * (1 / 127 ** 2)
    if cols.any():
        y = y + a[:, cols] @ (cb[:, cols] * (scb[:, None] / 127.0)).T
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def int8_forward(self, x):
    """nn.Linear.forward under LLM.int8 (bound to a module by use_int8)."""
    cb, scb = self.lume_int8
    return int8_matmul(x, cb, scb, self.bias)


def use_int8(module: torch.nn.Linear) -> None:
    """Make `module` compute as LLM.int8 with its current weight, which is replaced by the
    dequantised int8 weight CB SCB / 127 (what the outlier columns multiply with; restored by the
    caller, attacks.restored); off with drop_int8. The codes live as plain attributes, not buffers:
    the state dict is unchanged."""
    cb, scb = int8_weight(module.weight)
    with torch.no_grad():
        module.weight.copy_((cb * (scb[:, None] / 127.0)).to(module.weight.dtype))
    module.lume_int8 = (cb, scb)
    module.forward = types.MethodType(int8_forward, module)


def drop_int8(module: torch.nn.Linear) -> None:
    """Undo use_int8's forward (the weight is restored by the caller)."""
    module.__dict__.pop("forward", None)
    module.__dict__.pop("lume_int8", None)
