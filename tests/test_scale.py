"""Everything that runs on one process runs on two (torchrun, gloo on 127.0.0.1): LoRA and last-k
under FSDP2, relearn on the sharded model, sharded checkpoints (DCP) killed and resumed, resharded.

Each test is one or two small torchrun runs of the session's small target (tests/conftest.py)
compared with the same run in one process; the helpers are tests/test_dist.py's.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import job
import lora
import lume
import run
from conftest import ROOT
from test_dist import RUN, WEIGHT_ATOL, read_jsonl, torchrun

LOSS_RTOL = 1e-5  # fp32, only the reduction order differs (tests/test_dist.py)


def same_log(one, two):
    """log.jsonl of two runs: the same steps, every term within LOSS_RTOL (tokens/s aside)."""
    log1, log2 = read_jsonl(one / "log.jsonl"), read_jsonl(two / "log.jsonl")
    assert [r["step"] for r in log1] == [r["step"] for r in log2]
    for a, b in zip(log1, log2, strict=True):
        for k in a.keys() - {"tokens_per_s"}:
            assert b[k] == pytest.approx(a[k], rel=LOSS_RTOL, abs=1e-6), (a["step"], k, a[k], b[k])
    return log1


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --- LoRA and last-k under FSDP2

@pytest.mark.parametrize("extra", [["--lora-rank", "4"], ["--train-layers", "2"]])
def test_lora_and_last_k_on_two_ranks_equal_one_process(small_target, tmp_path, extra):
    target = small_target[0].name_or_path
    # KL: its reference is the model with adapters off (LoRA) or a second sharded copy (last-k)
    argv = ["--model", target, "--method", "kl", *RUN, "--no-eval-before", *extra]
    torchrun(2, "run.py", *argv, "--out", tmp_path / "two")
    job.main(run.parse_args([*argv, "--out", str(tmp_path / "one")]))
    one, two = tmp_path / "one", tmp_path / "two"
    log = same_log(one, two)
    assert log[0]["retain_kl"] == 0.0 and log[-1]["retain_kl"] > 0  # the reference is the target
    weights = lambda d: load_file(str(d / "model" / "model.safetensors"))  # noqa: E731
    w0, w1, w2 = small_target[0].state_dict(), weights(one), weights(two)
    assert max_diff(w1, w2) <= WEIGHT_ATOL
    moved = {k for k in w1 if (w1[k] - w0[k]).abs().max() > 1e-4}
    if extra[0] == "--train-layers":  # only the last 2 decoder layers (all of this target's) moved
        assert moved and all(k.startswith("model.layers.") for k in moved)
    else:  # LoRA: PEFT's adapter, gathered on rank 0, equals one process's; it loads onto the base
        assert moved
        a1, a2 = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (one, two))
        assert max_diff(a1, a2) <= WEIGHT_ATOL
        cfg = json.load(open(two / "adapter" / "adapter_config.json"))
        base, _ = lume.load_pretrained(cfg["base_model_name_or_path"])
        lora.add_lora(base, cfg["r"], cfg["lora_alpha"], cfg["target_modules"])
        missing, unknown = base.load_state_dict({k.removeprefix("base_model.model."): v for k, v in a2.items()},
                                                strict=False)
        assert not unknown and all(".lora_" not in k for k in missing)
        merged, _ = lume.load_pretrained(str(two / "model"))
        ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
        torch.testing.assert_close(base.eval()(input_ids=ids).logits, merged(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    assert json.load(open(two / "results.json")).keys() == {"after"}


# --- relearn on the sharded model

RELEARN = '''
import sys, torch
sys.path.insert(0, sys.argv[1])
import attacks, data, dist as distributed, lume
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
d = distributed.init_distributed("cpu", 30)
model, tok = lume.load_pretrained(sys.argv[2])
model = distributed.shard(model, d, "fp32")
full = lambda: get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
T = [it for it in data.builtin(n_docs=2, seed=0)[0] if it.split == "forget" and it.kind == "qa"]
with attacks.restored(model):  # 3 items a step over 2 ranks: rank 1 runs a padding row
    attacks.relearn_(model, tok, T, {"lr": 1e-2, "steps": 3, "batch_size": 3}, seed=0, device=d.device,
                     precision="fp32", dist=d)
    relearned = full()
restored = full()
if d.rank == 0:
    save_file(relearned, sys.argv[3] + "/relearned.safetensors")
    save_file(restored, sys.argv[3] + "/restored.safetensors")
d.close()
'''


def test_relearn_on_two_ranks_equals_one_process(small_target, tmp_path):
    import attacks
    import data
    script = tmp_path / "relearn.py"
    script.write_text(RELEARN)
    target = small_target[0].name_or_path
    torchrun(2, script, ROOT, target, tmp_path)
    model, tok = lume.load_pretrained(target)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    T = [it for it in data.builtin(n_docs=2, seed=0)[0] if it.split == "forget" and it.kind == "qa"]
    attacks.relearn_(model, tok, T, {"lr": 1e-2, "steps": 3, "batch_size": 3}, seed=0, device=torch.device("cpu"),
                     precision="fp32")
    w1 = model.state_dict()
    two = load_file(str(tmp_path / "relearned.safetensors"))
    assert max_diff(w0, w1) > 1e-3  # relearning moved the weights...
    assert max_diff(w1, two) <= WEIGHT_ATOL  # ...on two ranks as in one process
    assert max_diff(w0, load_file(str(tmp_path / "restored.safetensors"))) == 0.0  # restored on every rank, bit for bit
