"""lora.py: LoRA adapters (identity at initialisation, merge, PEFT's files, KL's adapters-off
reference, gradients) and last-k layers, on a tiny random OLMo; the flags; one run.py end to end."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import job
import lora
import lume
import methods
import run

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def olmo(seed=0):
    from transformers import OlmoConfig, OlmoForCausalLM
    torch.manual_seed(seed)
    return OlmoForCausalLM(OlmoConfig(**CONFIG)).eval()


def batch(seed=1, B=3, T=10):
    """Right-padded rows with prompt tokens masked: what the losses see."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(2, 64, (T - k,), generator=g).tolist() for k in range(B)]
    return lume.make_batch(seqs, [3] * B, list(range(B)), pad_id=0)


def randomise_adapters(model, seed=2):
    """B != 0 (as after training), so that the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def logits(model, b):
    with torch.no_grad():
        return model(input_ids=b.ids, attention_mask=b.attn).logits


def test_lora_at_init_gives_the_base_logits_exactly():
    base, b = olmo(), batch()
    model = lora.add_lora(copy.deepcopy(base), rank=4, alpha=8, targets=",".join(TARGETS))
    assert len(lora.lora_modules(model)) == 7 * CONFIG["num_hidden_layers"]
    assert torch.equal(logits(model, b), logits(base, b))  # B = 0: bit for bit, not approximately
    assert all(m.lora_A.weight.abs().sum() > 0 for m in lora.lora_modules(model).values())  # A is not 0


def test_merged_equals_unmerged_and_the_merged_state_dict_loads_into_the_base(tmp_path):
    base, b = olmo(), batch()
    model = lora.add_lora(copy.deepcopy(base), rank=4, alpha=8, targets=TARGETS, dropout=0.5)
    randomise_adapters(model)
    want = logits(model, b)  # an eval-mode model: its new LoRA layers are in eval mode too (no dropout)
    assert not torch.allclose(want, logits(base, b), atol=1e-3)  # the adapters do change the outputs
    plain = olmo(seed=5)  # other weights: everything must come from the merged state dict
    plain.load_state_dict(lora.merged_state_dict(model), strict=True)
    torch.testing.assert_close(logits(plain, b), want, rtol=1e-5, atol=1e-5)
    lora.merge(model)
    assert not lora.has_adapters(model) and set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(logits(model, b), want, rtol=1e-5, atol=1e-5)


def test_peft_files_have_peft_key_names_and_shapes(tmp_path):
    base, b = olmo(), batch()
    model = lora.add_lora(copy.deepcopy(base), rank=4, alpha=8, targets=TARGETS, dropout=0.1)
    randomise_adapters(model)
    lora.save_peft(model, tmp_path / "adapter", "some/base")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: cfg[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias",
                                "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
        "bias": "none", "base_model_name_or_path": "some/base"}
    assert sorted(cfg["target_modules"]) == sorted(TARGETS)
    sd = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    h, m = CONFIG["hidden_size"], CONFIG["intermediate_size"]
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
              "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}  # (in, out)
    want = {}
    for i in range(CONFIG["num_hidden_layers"]):
        for name, (n_in, n_out) in shapes.items():
            block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{i}.{block}.{name}"
            want[f"{key}.lora_A.weight"], want[f"{key}.lora_B.weight"] = (4, n_in), (n_out, 4)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    try:  # PEFT itself, where it happens to be installed (not a dependency)
        from peft import PeftModel
    except ImportError:
        return
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(peft_model, b), logits(model, b), rtol=1e-5, atol=1e-5)


def test_kl_with_adapters_off_equals_kl_against_a_frozen_copy():
    base, b = olmo(), batch()
    model = lora.add_lora(copy.deepcopy(base), rank=4, alpha=8, targets=TARGETS)
    randomise_adapters(model)
    frozen = copy.deepcopy(base).requires_grad_(False)
    kl_off = methods.kl_sum(model, lora.Reference(model), b)
    kl_copy = methods.kl_sum(model, frozen, b)
    assert kl_copy.item() > 1e-3  # the adapters moved the model away from its base
    torch.testing.assert_close(kl_off, kl_copy, rtol=0, atol=0)
    kl_off.backward()  # the reference added no graph and left the adapters on
    assert all(m.adapters_on for m in lora.lora_modules(model).values())
    assert all(m.lora_B.weight.grad is not None for m in lora.lora_modules(model).values())


def test_gradients_reach_only_the_adapters_and_the_optimizer_updates_only_them():
    model, b = olmo(), batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_lora(model, rank=4, alpha=8, targets=TARGETS)
    randomise_adapters(model)
    methods.ga(model, b, None, lume.step_totals([(b, None)]))[0].backward()
    for name, p in model.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        assert p.requires_grad == is_adapter and (p.grad is not None) == is_adapter, name
        assert p.dtype == torch.float32, name
    model.zero_grad()
    lume.train(model, [[(b, None)]] * 3, methods.ga, lr=1e-2)
    sd = lora.merged_state_dict(model)  # merged weights moved, the base's own weights did not
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])


def test_lora_on_a_bf16_base_without_autocast_trains_fp32_adapters():
    model, b = olmo().to(torch.bfloat16), batch()
    lora.add_lora(model, rank=2, alpha=4, targets=["q_proj", "v_proj"])
    loss = methods.ga(model, b, None, lume.step_totals([(b, None)]))[0]
    loss.backward()
    m = model.model.layers[0].self_attn.q_proj
    assert m.weight.dtype == torch.bfloat16 and m.lora_B.weight.dtype == torch.float32
    assert m.lora_B.weight.grad is not None and m.lora_B.weight.grad.abs().sum() > 0
    randomise_adapters(model)
    with lume.weights_as(model, torch.bfloat16) as w:  # evaluation's bf16 weights: a bf16 copy, adapters on
        assert w is not model and all(p.dtype == torch.bfloat16 for p in w.parameters())
        assert lora.has_adapters(w)
        torch.testing.assert_close(logits(w, b), logits(model, b), rtol=0.02, atol=0.02)
        with lora.adapters_off(model):
            assert not torch.allclose(logits(w, b), logits(model, b), rtol=0.02, atol=0.02)
    assert m.lora_B.weight.dtype == torch.float32  # the model itself is left as it was


def test_last_k_leaves_every_other_parameter_bit_identical():
    model, b = olmo(), batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora.train_last_layers(model, 1)
    lume.train(model, [[(b, None)]] * 3, methods.ga, lr=1e-2)
    last = "model.layers.2."
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(last), name
        same = torch.equal(p.detach(), before[name])
        assert same != name.startswith(last), name  # the last layer changed, nothing else by a single bit
    with pytest.raises(SystemExit, match=r"--train-layers 4: the model has 3 decoder layers"):
        lora.train_last_layers(olmo(), 4)


def test_flags_are_checked_at_argument_time(monkeypatch, capsys):
    def error(*argv):
        with pytest.raises(SystemExit):
            run.parse_args(list(argv))
        return capsys.readouterr().err
    assert "--lora-rank must be >= 0" in error("--lora-rank", "-1")
    assert "--lora-dropout must be in [0, 1)" in error("--lora-rank", "4", "--lora-dropout", "1")
    assert "give one of them" in error("--lora-rank", "4", "--train-layers", "2")
    assert "--train-layers must be >= 0" in error("--train-layers", "-2")
    assert "not bf16-pure" in error("--train-layers", "2", "--precision", "bf16-pure")
    monkeypatch.setenv("WORLD_SIZE", "2")  # LoRA runs under torchrun too (FSDP2: tests/test_scale.py)
    assert run.parse_args(["--lora-rank", "4", "--train-layers", "0"]).lora_rank == 4
    monkeypatch.delenv("WORLD_SIZE")
    assert run.parse_args(["--lora-rank", "8"]).lora_alpha == 16.0  # 0 = 2 * rank
    assert run.parse_args(["--lora-rank", "8", "--lora-alpha", "4"]).lora_alpha == 4.0
    assert run.parse_args(["--lora-rank", "8"]).lr == 3e-4  # LoRA's default step (docs/lora.md)
    assert run.resolve_auto(run.Config(lora_rank=8, model="olmo-7b")).lr == 1e-4  # (parse_args would ask the hub)
    assert run.parse_args(["--lora-rank", "8", "--lr", "5e-5"]).lr == 5e-5 and run.parse_args([]).lr == 1e-4
    picked = lora.apply(olmo(), run.Config(lora_rank=4))  # rank set after parse_args (the memory plan's pick)
    assert {m.scale for m in lora.lora_modules(picked).values()} == {2.0}
    with pytest.raises(SystemExit, match="--lora-targets: no nn.Linear named qproj"):
        lora.add_lora(olmo(), 2, 4, "qproj")


def test_run_with_lora_and_kl_saves_a_merged_model_and_a_peft_adapter(tmp_path, small_tiny):
    cfg = run.parse_args(["--n-docs", "2", "--max-steps", "3", "--max-new-tokens", "8", "--method", "kl",
                          "--lora-rank", "4", "--lr", "1e-2", "--save", "--cache-dir", str(tmp_path / "cache"),
                          "--out", str(tmp_path / "run")])
    out = job.main(cfg)
    assert json.load(open(out / "config.json"))["lora_rank"] == 4
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[0]["retain_kl"] == 0.0 and log[-1]["retain_kl"] > 0  # adapters off = the target at step 0
    merged, tok = lume.load_pretrained(str(out / "model"))
    base, _ = lume.load_pretrained(json.load(open(out / "adapter" / "adapter_config.json"))["base_model_name_or_path"])
    sd = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora.add_lora(base, 4, 8.0, cfg.lora_targets)
    base.load_state_dict({k.removeprefix("base_model.model."): v for k, v in sd.items()}, strict=False)
    b = batch(T=12)
    with lora.adapters_off(base):  # unlearning moved the adapters away from B = 0
        assert not torch.allclose(logits(merged, b), logits(base.eval(), b), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(logits(merged, b), logits(base.eval(), b), rtol=1e-4, atol=1e-4)
