"""The memory plan of LoRA and the last K layers against measured bytes at tiny scale, and the setup
a run picks from it: 7B at 80 GiB fits, 12 GiB refuses naming what would fit, an explicit flag wins,
CPU and the embedded default keep their setup. The full-parameter plan is checked in test_dist.py."""
import json
import math

import pytest
import torch

import job
import lume
import memory
import run
from test_dist import saved_bytes

CFG = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
           vocab_size=700, max_position_embeddings=512, tie_word_embeddings=False)
GiB = 2**30


class LoRALinear(torch.nn.Module):
    """The test's own LoRA (lora.py lives on another branch): y = base(x) + B(A(x)) * alpha / r, A (r x in)
    and B (out x r) fp32 and trained, the base frozen."""

    def __init__(self, base: torch.nn.Linear, r: int):
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter(torch.randn(r, base.in_features) * 0.01)
        self.B = torch.nn.Parameter(torch.randn(base.out_features, r) * 0.01)

    def forward(self, x):
        return self.base(x) + (x @ self.A.T) @ self.B.T * 2.0


def frozen_model(k: int, r: int, gc: bool, cfg=CFG):
    """cfg's OLMo in bf16, frozen, with the last k layers trainable in fp32 or LoRA rank r on every projection."""
    from transformers import OlmoConfig, OlmoForCausalLM
    torch.manual_seed(0)
    model = OlmoForCausalLM(OlmoConfig(**cfg)).bfloat16().requires_grad_(False).train()
    for layer in model.model.layers[cfg["num_hidden_layers"] - k:] if k else []:
        layer.float().requires_grad_(True)
    for layer in model.model.layers if r else []:
        for mod in (layer.self_attn, layer.mlp):
            for name, child in list(mod.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(mod, name, LoRALinear(child, r))
    if gc:
        lume.enable_checkpointing(model)
    return model


def activation_bytes(model, B: int, T: int) -> int:
    """Bytes autograd saves for one gd step (a forget and a retain forward, both graphs alive)."""
    batch = lume.Batch(torch.randint(0, 700, (B, T)), torch.ones(B, T, dtype=torch.long), torch.ones(B, T),
                       torch.arange(B))
    loss = []

    def step():
        with lume.autocast_ctx(torch.device("cpu"), "bf16"):
            loss.append(lume.token_logps(model, batch).sum() - lume.token_logps(model, batch).sum())
    return saved_bytes(model, step), loss[0]


@pytest.mark.parametrize("k,r", [(1, 0), (2, 0), (0, 4)])
@pytest.mark.parametrize("gc", [False, True])
def test_frozen_base_plan_matches_measured_bytes(k, r, gc):
    B, T = 3, 40
    plan = memory.memory_plan(CFG, "gd", "bf16", B, T, grad_checkpointing=gc, train_layers=k, lora_rank=r)
    model = frozen_model(k, r, gc)
    act, loss = activation_bytes(model, B, T)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert nbytes(model.parameters()) == plan["weights"]
    loss.backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert nbytes(p.grad for p in trainable) == plan["grads"]
    opt = torch.optim.AdamW(trainable)
    opt.step()
    assert nbytes(t for s in opt.state.values() for t in s.values()) == plan["optimizer"]
    # activations are an estimate (per-layer coefficients): within 10%; the saved tensors include
    # autocast's bf16 casts of the fp32 trainables (plan["copies"])
    assert act == pytest.approx(plan["activations"] + plan["copies"], rel=0.10), (act, plan)


@pytest.mark.parametrize("k,r", [(1, 0), (0, 4)])
@pytest.mark.parametrize("gc", [False, True])
def test_what_two_more_frozen_layers_save_is_planned_exactly(k, r, gc):
    """The plan's assumptions on layers, exactly: under checkpointing every layer keeps its bf16
    input (frozen ones too); without it, last K's frozen layers save nothing and LoRA's a whole layer."""
    B, T = 3, 40
    deeper = {**CFG, "num_hidden_layers": CFG["num_hidden_layers"] + 2}
    plans = [memory.memory_plan(c, "gd", "bf16", B, T, grad_checkpointing=gc, train_layers=k, lora_rank=r)
             for c in (CFG, deeper)]
    acts = [activation_bytes(frozen_model(k, r, gc, c), B, T)[0] for c in (CFG, deeper)]
    planned = [p["activations"] + p["copies"] for p in plans]
    if gc or k:
        assert acts[1] - acts[0] == planned[1] - planned[0] == (2 * 2 * B * T * 2 * CFG["hidden_size"] if gc else 0)
    else:  # LoRA, no checkpointing: two more layers' tensors, the estimate within 10%
        assert acts[1] - acts[0] == pytest.approx(planned[1] - planned[0], rel=0.10)


def test_kl_reference_of_lora_is_free_and_of_last_k_a_copy():
    lora = memory.memory_plan(CFG, "kl", "bf16", 2, 8, lora_rank=4)
    last = memory.memory_plan(CFG, "kl", "bf16", 2, 8, train_layers=1)
    assert lora["reference"] == 0 and last["reference"] == last["weights"]
    npo = memory.memory_plan(CFG, "npo", "bf16", 2, 8, train_layers=1)
    assert npo["reference"] == 0


# --- the pick


def test_7b_npo_at_80_gib_picks_a_setup_that_fits_and_24_40_pick_smaller_ones():
    seven = memory.OLMO_CONFIGS["olmo-7b"]
    picks = {}
    for gib in (24, 40, 80, 200):
        name, setup, plan = memory.pick_setup(seven, "npo", 4, 512, gib * GiB)
        assert plan["total"] + memory.reserve(gib * GiB) <= gib * GiB
        names = [n for n, _, _ in memory.SETUPS]
        for earlier in names[:names.index(name)]:  # every setup before the pick does not fit
            s = next(s for n, _, s in memory.SETUPS if n == earlier)
            assert memory.plan_setup(seven, "npo", 4, 512, s)["total"] + memory.reserve(gib * GiB) > gib * GiB
        picks[gib] = name
    assert picks == {24: "lora-16", 40: "lora-16", 80: "full-bf16-sr", 200: "full-fp32-master"}
    # the number: the CUDA default needs ~142 GiB
    assert memory.plan_setup(seven, "npo", 4, 512, memory.SETUPS[0][2])["total"] == pytest.approx(141.7 * GiB, rel=0.01)


def test_12_gib_refuses_naming_torchrun_with_the_fewest_gpus():
    seven = memory.OLMO_CONFIGS["olmo-7b"]
    with pytest.raises(memory.NoSetupFits) as e:
        memory.pick_setup(seven, "npo", 4, 512, 12 * GiB)
    msg = str(e.value)
    assert "no LoRA rank or --train-layers on one GPU (the frozen weights alone are 12.8 GiB)" in msg
    assert "lora-16 16.9" in msg
    n = int(msg.split("--nproc_per_node ")[1].split()[0])
    gc = "--grad-checkpointing" in msg
    budget = 12 * GiB - memory.reserve(12 * GiB)

    def fits(n, gc):
        return memory.memory_plan(seven, "npo", "bf16", math.ceil(4 / n), 512, world=n,
                                  grad_checkpointing=gc)["total"] <= budget
    assert fits(n, gc) and not fits(n - 1, True) and not fits(n - 1, False)


def test_a_smaller_budget_names_the_lora_rank_and_layers_that_fit():
    one = memory.OLMO_CONFIGS["olmo-1b"]
    lora8 = memory.memory_plan(one, "npo", "bf16", 4, 512, grad_checkpointing=True, lora_rank=8)["total"]
    lora16 = memory.memory_plan(one, "npo", "bf16", 4, 512, grad_checkpointing=True, lora_rank=16)["total"]
    assert lora8 < lora16
    budget = (lora8 + lora16) // 2  # rank 8 fits, rank 16 does not
    text = memory.alternatives(one, "npo", 4, 512, budget)
    assert text.startswith("--lora-rank 8 (") and "--train-layers" not in text and "torchrun --nproc_per_node" in text


def fake_cfg(*flags, model="olmo-7b"):
    """The Config of these flags as the command line gives it (no preflight: the 7B is not downloaded)."""
    return run.Config(**vars(run.parser().parse_args(["--model", model, "--method", "npo", *flags])))


def test_auto_setup_applies_the_pick_and_an_explicit_flag_wins(monkeypatch):
    monkeypatch.setattr(memory, "plan_seq_len", lambda name, items: 512)  # no tokenizer download
    cuda = torch.device("cuda")
    cfg = fake_cfg()
    assert cfg.grad_checkpointing is None and cfg.precision == "auto"
    cfg, rec = memory.auto_setup(cfg, cuda, [], free_bytes=80 * GiB)
    assert (cfg.precision, cfg.grad_checkpointing, cfg.train_layers, cfg.lora_rank) == ("bf16-pure", True, 0, 0)
    assert rec["setup"] == "full-bf16-sr" and rec["planned_gib"] <= 80 and rec["seq_len"] == 512
    assert cfg.resolved["precision"] == {"value": "bf16-pure", "why": cfg.resolved["precision"]["why"]}
    assert cfg.resolved["precision"]["why"].startswith("memory plan: full-bf16-sr")  # config.json says why
    json.dumps(rec)  # config.json can hold it
    for flags, want in [(["--precision", "bf16"], ("bf16", False)), (["--grad-checkpointing"], ("auto", True)),
                        (["--no-grad-checkpointing"], ("auto", False)), (["--train-layers", "4"], ("auto", False)),
                        (["--lora-rank", "8"], ("auto", False))]:
        cfg, rec = memory.auto_setup(fake_cfg(*flags), cuda, [], free_bytes=80 * GiB)
        assert rec is None, flags
        assert (cfg.precision, cfg.grad_checkpointing) == want, flags
    cfg, rec = memory.auto_setup(fake_cfg(), torch.device("cpu"), [], free_bytes=80 * GiB)  # CPU: no plan
    assert rec is None
    assert (cfg.precision, cfg.grad_checkpointing) == ("auto", False)
    with pytest.raises(SystemExit, match="no single-GPU setup fits.*torchrun --nproc_per_node"):
        memory.auto_setup(fake_cfg(), cuda, [], free_bytes=12 * GiB)
    cfg = fake_cfg()  # 24 GiB picks LoRA: it needs lora.py (another branch)
    if (memory.Path(memory.__file__).parent / "lora.py").is_file():
        cfg, rec = memory.auto_setup(cfg, cuda, [], free_bytes=24 * GiB)
        assert rec["setup"] == "lora-16" and cfg.lora_rank == 16
    else:
        with pytest.raises(SystemExit, match="picks lora-16 .* needs lora.py"):
            memory.auto_setup(cfg, cuda, [], free_bytes=24 * GiB)


def test_embedded_default_on_cuda_keeps_its_setup(small_data):
    items = [it for it in small_data[0] if it.task == 1]
    cfg = fake_cfg(model="tiny")
    cfg, rec = memory.auto_setup(cfg, torch.device("cuda"), items, free_bytes=8 * GiB)
    # the setup "auto" always meant on CUDA: bf16 autocast over fp32 weights, no checkpointing
    assert rec["setup"] == "full-fp32-master" and (cfg.precision, cfg.grad_checkpointing) == ("bf16", False)
    longest = max(len((it.input + " " + it.output).encode()) for it in items)
    assert rec["seq_len"] == longest + 2


def test_cli_marks_the_pick_and_measure_needs_cuda(capsys, monkeypatch):
    assert memory.main(["--model", "olmo-7b", "--method", "npo", "--gpu-gib", "80"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["", "*", "", ""] and "full-bf16-sr" in rows[2]
    table = memory.print_setup_table()
    rows = [r for r in table.splitlines() if r.startswith("| olmo-")]
    assert len(rows) == 8 and rows[-1].split(" | ")[-3:] == ["lora-16", "lora-16", "full-bf16-sr |"]  # 7B npo
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory.main(["--measure", "--model", "olmo-7b"]) == 2
    assert "needs CUDA" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        memory.main(["--gpu-gib", "0"])
    assert "--gpu-gib must be > 0" in capsys.readouterr().err


def test_cpu_run_records_no_plan(tmp_path, small_tiny):
    out = job.main(run.parse_args(["--n-docs", "2", "--max-steps", "1", "--max-new-tokens", "4", "--method", "ga",
                                   "--no-eval-before", "--cache-dir", str(tmp_path / "cache"),
                                   "--out", str(tmp_path / "run")]))
    cfg = json.load(open(out / "config.json"))
    assert cfg["memory_plan"] is None and cfg["grad_checkpointing"] is False and cfg["resolved_precision"] == "fp32"


@pytest.mark.parametrize("method,setup", [("kl", "last-8"), ("npo", "full-bf16-sr"), ("gd", "full-fp32-master")])
def test_measure_runs_its_steps_on_cpu(method, setup, capsys):
    """--measure's code path (random model in the setup's layout, lume.train steps, the table) on CPU,
    where no bytes are counted: a GPU is needed for the numbers."""
    rows = memory.measure("tiny", method, 2, 16, setup, steps=1, device="cpu")
    planned, measured = rows["optimizer states"]
    assert planned == measured > 0  # the model was built in the setup's layout (fp32 vs bf16, last 8 only)
    out = capsys.readouterr().out
    assert f"tiny {method}: {setup}, batch 2 x 16 tokens" in out and "| optimizer states |" in out


def test_every_method_has_a_plan_at_least_its_cost_twin():
    """auto_setup plans every method --method accepts (it asserted on simnpo, rmu, stat and undial);
    each is planned as a method whose step costs at least as much (its methods.Memory)."""
    import methods
    seven = memory.OLMO_CONFIGS["olmo-7b"]
    twins = {"simnpo": "npo", "rmu": "gd", "stat": "gd", "undial": "kl"}
    for m in methods.METHODS:
        name, _, plan = memory.pick_setup(seven, m, 4, 512, 80 * GiB)
        twin = twins.get(m, m)
        assert plan == memory.plan_setup(seven, twin, 4, 512, next(s for n, _, s in memory.SETUPS if n == name))
        assert bool(methods.METHODS[m].memory.approx) == (m in twins), m
    assert methods.METHODS["undial"].prepare is methods.frozen_reference  # a frozen copy, planned as KL's
