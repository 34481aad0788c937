"""merge.py: TIES and linear merging against hand computation, identities (a model merged with
itself; LoRA adapters merged like their merged checkpoints), one parameter per model in memory,
and bad input as one error line."""
import copy
import json
import math
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
import lume
import merge


def fake_model(path, tensors: dict, arch="ToyForCausalLM"):
    """A save_pretrained-shaped directory: config.json and model.safetensors (no real architecture)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "architectures": [arch]}))
    save_file({k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}, str(path / "model.safetensors"))
    return str(path)


BASE = [1.0, 1.0, 1.0]
TAUS = [[1.0, -2.0, 3.0], [-3.0, 1.0, 0.5], [2.0, 0.5, -1.0]]


@pytest.fixture
def three(tmp_path):
    base = fake_model(tmp_path / "base", {"w": BASE})
    models = [fake_model(tmp_path / f"m{i}", {"w": [b + t for b, t in zip(BASE, tau)]}) for i, tau in enumerate(TAUS)]
    return base, models


def merged(base, models, out, **kw):
    return load_file(str(merge.merge(base, models, str(out), log=lambda s: None, **kw) / "model.safetensors"))["w"]


def test_ties_by_hand_trim_elect_disjoint_mean(three, tmp_path):
    base, models = three
    # density 2/3: k = 2 of 3 per vector. trimmed: [0,-2,3], [-3,1,0], [2,0,-1]
    # summed mass: [-1, -1, 2] -> signs [-, -, +]; agreeing: p0 {-3}, p1 {-2}, p2 {3}
    got = merged(base, models, tmp_path / "t1", method="ties", density=2 / 3, lam=0.5)
    torch.testing.assert_close(got, torch.tensor(BASE) + 0.5 * torch.tensor([-3.0, -2.0, 3.0]))
    # weights 1,3,1: trimmed and weighted [0,-2,3], [-9,3,0], [2,0,-1]; mass [-7, 1, 2]: p1's sign flips
    # to +, where only model 1 agrees: 3 / 3 = 1; p0: -9 / 3 = -3; p2: 3 / 1 = 3
    got = merged(base, models, tmp_path / "t2", method="ties", density=2 / 3, lam=1.0, weights=[1.0, 3.0, 1.0])
    torch.testing.assert_close(got, torch.tensor(BASE) + torch.tensor([-3.0, 1.0, 3.0]))
    # density 1: nothing trimmed; mass [0, -0.5, 2.5]: p0 cancels (base kept), p1 mean of -2 -> -2,
    # p2 mean of 3, 0.5 -> 1.75
    got = merged(base, models, tmp_path / "t3", method="ties", density=1.0, lam=1.0)
    torch.testing.assert_close(got, torch.tensor(BASE) + torch.tensor([0.0, -2.0, 1.75]))


def test_linear_is_weighted_task_arithmetic(three, tmp_path):
    base, models = three
    got = merged(base, models, tmp_path / "l", method="linear", lam=0.5, weights=[1.0, 2.0, -1.0])
    expect = torch.tensor(BASE) + 0.5 * (torch.tensor(TAUS[0]) + 2 * torch.tensor(TAUS[1]) - torch.tensor(TAUS[2]))
    torch.testing.assert_close(got, expect)


def test_a_model_merged_with_itself_is_itself(small_target, small_target_dir, tmp_path):
    model = lora_run(small_target, 5, tmp_path / "run") / "model"  # differs from the base in q and down_proj
    out = merge.merge(str(small_target_dir), [str(model)] * 2, str(tmp_path / "self"), density=1.0,
                      lam=1.0, log=lambda s: None)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(model / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, tok = lume.load_pretrained(str(out))  # the output is a loadable save_pretrained directory
    assert tok is not None and not (out / "lume_target.json").exists()


def lora_run(small_target, seed, out):
    """A LoRA model of the small target with random (nonzero) B, saved as a run saves it: <out>/model
    merged, <out>/adapter in PEFT's format."""
    model, tok = small_target
    import copy
    m = lora.add_lora(copy.deepcopy(model), rank=2, alpha=4, targets=["q_proj", "down_proj"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in lora.lora_modules(m).values():
            mod.lora_B.weight.copy_(0.05 * torch.randn(mod.lora_B.weight.shape, generator=g))
    lora.save(m, tok, out)
    return out


def test_lora_adapters_merge_like_their_merged_checkpoints(small_target, small_target_dir, tmp_path):
    runs = [lora_run(small_target, s, tmp_path / f"run{s}") for s in (1, 2)]
    a = merge.merge(str(small_target_dir), [str(r / "adapter") for r in runs], str(tmp_path / "a"), density=0.3,
                    log=lambda s: None)
    m = merge.merge(str(small_target_dir), [str(r / "model") for r in runs], str(tmp_path / "m"), density=0.3,
                    log=lambda s: None)
    ta, tm = load_file(str(a / "model.safetensors")), load_file(str(m / "model.safetensors"))
    base = load_file(str(small_target_dir / "model.safetensors"))
    for k in ta:
        torch.testing.assert_close(ta[k], tm[k], rtol=0, atol=2e-6)
    assert not torch.equal(ta["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(ta["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])


def test_one_parameter_of_each_model_in_memory_at_a_time(tmp_path, monkeypatch):
    n, size = 200, 1000  # 200 parameters of 4 kB each: everything at once would be 800 kB a model
    tensors = lambda s: {f"p{i}": torch.randn(size, generator=torch.Generator().manual_seed(s + i))  # noqa: E731
                         for i in range(n)}
    base = fake_model(tmp_path / "base", tensors(0))
    models = [fake_model(tmp_path / f"m{j}", tensors(1000 * (j + 1))) for j in range(2)]
    live, peak = {}, {}  # bytes of the tensors read and still alive, per model (and the base)
    real_get = merge.Weights.get

    def counted_get(self, key):
        t = real_get(self, key)
        nbytes, who = t.numel() * t.element_size(), id(self)
        live[who] = live.get(who, 0) + nbytes
        peak[who] = max(peak.get(who, 0), live[who])
        peak["all"] = max(peak.get("all", 0), sum(v for k, v in live.items() if k != "all"))
        weakref.finalize(t, lambda: live.__setitem__(who, live[who] - nbytes))
        return t
    monkeypatch.setattr(merge.Weights, "get", counted_get)
    merge.merge(base, models, str(tmp_path / "out"), density=0.5, log=lambda s: None)
    assert len(peak) == 4 and all(peak[k] == size * 4 for k in peak if k != "all")  # one parameter each
    assert peak["all"] <= 3 * size * 4 and sum(live.values()) == 0


def run_main(argv, capsys):
    rc = merge.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def fake_adapter(path, base_name: str, module="lin", shape=(2, 3), r=1):
    """A PEFT LoRA adapter directory for one module `module` (B: out x r, A: r x in)."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                          "base_model_name_or_path": base_name}))
    save_file({f"base_model.model.{module}.lora_A.weight": torch.ones(r, shape[1]),
               f"base_model.model.{module}.lora_B.weight": torch.ones(shape[0], r)}, str(path / "adapter_model.safetensors"))
    return str(path)


def test_bad_input_is_one_error_line_naming_model_and_parameter(tmp_path, capsys):
    base = fake_model(tmp_path / "base", {"w": BASE, "lin.weight": [[0.0] * 3] * 2})
    models = [fake_model(tmp_path / "m0", {"w": BASE, "lin.weight": [[1.0] * 3] * 2})]
    other = fake_model(tmp_path / "other", {"w": [1.0, 2.0], "lin.weight": [[0.0] * 3] * 2})
    arch = fake_model(tmp_path / "arch", {"w": BASE, "lin.weight": [[0.0] * 3] * 2}, arch="OtherForCausalLM")
    extra = fake_model(tmp_path / "extra", {"w": BASE, "lin.weight": [[0.0] * 3] * 2, "v": [1.0]})
    cases = [
        (["--base", base, other], f"{other}: parameter w has shape [2]"),
        (["--base", base, arch], "architectures"),
        (["--base", base, extra], "parameter v is only in"),
        (["--base", base, "--density", "0", models[0]], "--density must be in (0, 1]"),
        (["--base", base, "--density", "1.5", models[0]], "--density must be in (0, 1]"),
        (["--base", base, "--weights", "1,2", models[0]], "2 weights for 1 models"),
        (["--base", base, fake_adapter(tmp_path / "a1", str(tmp_path / "elsewhere"))], "an adapter of base"),
        (["--base", base, fake_adapter(tmp_path / "a2", base, shape=(3, 3))], "parameter lin.weight: the adapter's B A is 3 x 3"),
    ]
    for k, (argv, says) in enumerate(cases):
        out = tmp_path / f"out{k}"
        rc, err = run_main([*argv, "--out", str(out)], capsys)
        assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and says in err[0], (argv, err)
        assert not out.exists() and not list(tmp_path.glob(f"out{k}*"))
    rc, err = run_main(["--base", base, "--density", "1", fake_adapter(tmp_path / "ok", base), "--out",
                        str(tmp_path / "good")], capsys)
    assert rc == 0 and load_file(str(tmp_path / "good" / "model.safetensors"))["lin.weight"].eq(2.0).all()  # (2/1) B A


# -----------------------------------------------------------------------------
# exact trim counts; PEFT's factor-wise TIES (what ZJUKLAB ran) against PEFT and against full-delta TIES


def test_trim_counts_are_exact_integers():
    assert merge.keep_count(0.07, 100) == 7  # ceil(0.07 * 100.0) = ceil(7.000000000000001) = 8
    assert merge.keep_count(0.29, 100, math.floor) == 29  # int(0.29 * 100) = 28
    assert merge.keep_count(2 / 3, 3) == 2 and merge.keep_count(1.0, 5) == 5 and merge.keep_count(0.01, 10) == 1
    assert int((merge.trim(torch.arange(1.0, 101.0), 0.07) != 0).sum()) == 7


def random_factors(seed, n=64, r=8, k=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, n, generator=g, dtype=torch.float64), torch.randn(n, r, generator=g, dtype=torch.float64))
            for _ in range(k)]


def test_factor_wise_ties_is_not_ties_of_the_deltas():
    """PEFT's TIES on the stacked factors is TIES(B) TIES(A), cross terms B_i A_j included: on random
    rank-8 adapters (64 x 64, ZJUKLAB's density 0.8, weights 1, 1) it is ~110% (relative norm) away
    from TIES on the full deltas B_i A_i (docs/methods.md). With one adapter at density 1 they agree."""
    pairs = random_factors(0)
    full = merge.ties([b @ a for a, b in pairs], [1.0, 1.0], 0.8)
    factor = merge.ties_factor([b for _, b in pairs], [1.0, 1.0], 0.8) @ merge.ties_factor([a for a, _ in pairs], [1.0, 1.0], 0.8)
    rel = ((factor - full).norm() / full.norm()).item()
    assert 0.9 < rel < 1.4, rel
    (a, b), = random_factors(1, k=1)
    s = 2.0  # alpha / r: each factor weighted sqrt(s)
    one = merge.ties_factor([b], [math.sqrt(s)], 1.0) @ merge.ties_factor([a], [math.sqrt(s)], 1.0)
    torch.testing.assert_close(one, s * b @ a)


def test_peft_ties_equals_peft_add_weighted_adapter(tmp_path):
    from conftest import oracle
    peft = oracle("peft")
    from transformers import OlmoConfig, OlmoForCausalLM
    torch.manual_seed(0)
    base = OlmoForCausalLM(OlmoConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64)).eval()
    base.save_pretrained(tmp_path / "base")
    adapters = []
    for i, (r_alpha, targets) in enumerate([(8.0, ["q_proj", "v_proj", "down_proj"]), (16.0, ["q_proj", "up_proj"])]):
        m = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=r_alpha, target_modules=targets))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3)
        m.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
        m.save_pretrained(tmp_path / f"a{i}")
        adapters.append(str(tmp_path / f"a{i}" if (tmp_path / f"a{i}" / "adapter_config.json").is_file() else
                            tmp_path / f"a{i}" / "default"))
    ours = load_file(str(merge.merge(str(tmp_path / "base"), adapters, str(tmp_path / "ours"), method="peft-ties",
                                     density=0.8, weights=[1.0, 0.5], log=lambda s: None) / "model.safetensors"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapters[0], adapter_name="a0")
    pm.load_adapter(adapters[1], adapter_name="a1")
    pm.add_weighted_adapter(["a0", "a1"], [1.0, 0.5], "m", combination_type="ties", density=0.8)
    pm.set_adapter("m")
    theirs = pm.merge_and_unload().state_dict()
    assert any(not torch.equal(ours[k], base.state_dict()[k]) for k in ours)
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=1e-6)
