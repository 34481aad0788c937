"""bench.py smoke test: a very small setting runs every row, writes the documented json keys, and
its identity checks ran. No timing is asserted (figures depend on the machine)."""
import json

import pytest
import torch

import bench
import generation
import gpureport
from conftest import SMALL_CONFIG, oracle

KEYS = {"generation_speedup", "mia_speedup", "mia_peak_fraction", "npo_step_speedup", "npo_memory_ratio", "ga_peak_fraction",
        "rouge_speedup", "device"}


def test_bench_small_setting_writes_every_figure(tmp_path, small_tiny, capsys):
    oracle("rouge_score")  # row 5 compares with it: without it (not in CI) the test skips
    out = tmp_path / "bench.json"
    res = bench.main(["--model", "tiny", "--data", "builtin", "--items", "16", "--repeats", "1",
                      "--max-new-tokens", "8", "--rouge-items", "12", "--cache-dir", str(tmp_path / "cache"),
                      "--out", str(out)])
    saved = json.load(open(out))
    assert KEYS <= set(saved) and saved["device"] == "cpu"
    assert saved["generation_speedup"] == res["generation_speedup"] > 0
    # the identity checks ran (they assert inside bench.py, so reaching here means they passed)
    assert saved["generation"]["identical_outputs"] and saved["generation"]["items"] == 16
    assert saved["mia"]["max_abs_diff"] <= 1e-5
    assert saved["mia"]["forward_s"] > 0 and saved["mia"]["ours_vs_forward"] == pytest.approx(
        saved["mia"]["forward_s"] / saved["mia"]["ours_s"])  # the bare forward ran beside it, every round
    assert len(saved["mia"]["forward_times"]) == len(saved["mia"]["ours_times"]) == 1
    assert all(saved["npo"][k]["max_loss_diff"] <= 1e-4 for k in ("npo", "npo_rt"))
    assert saved["npo_memory_ratio"] > 1.9  # two parameter copies vs one (+ a few cached floats)
    for m in ("ga", "gd", "kl", "npo"):
        assert saved["training"][m]["tokens_per_s"] > 0 and 0 < saved["training"][m]["peak_fraction"]
    for m in ("ga", "gd", "kl", "npo", "simnpo", "rmu"):
        assert saved["training"][m]["step_vs_ga"] == pytest.approx(
            saved["training"][m]["step_s"] / saved["training"]["ga"]["step_s"])
    assert saved["training"]["rmu"]["peak_fraction"] is None
    assert saved["data"] == "builtin" and saved["rouge_speedup"] > 0
    assert saved["identity_checks"]["rouge"] and saved["rouge"]["pairs"] == 12
    table = capsys.readouterr().out
    assert "bare forward" in table
    for row in ("1 generation", "2 MIA statistics", "3 train step GA", "3 train step SIMNPO", "3 train step RMU",
                "4 NPO step", "5 ROUGE-L"):
        assert row in table
    assert saved["shape"]["hidden"] == SMALL_CONFIG["hidden_size"] and "2L x d64" in table


def test_bench_identity_check_catches_a_wrong_fast_path(tmp_path, small_tiny, monkeypatch):
    """A batched path that returns different generations must fail the benchmark, not report a figure."""
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: [s + "!" for s in real(*a, **k)])
    with pytest.raises(AssertionError, match="generation: batched output differs"):
        bench.main(["--model", "tiny", "--data", "builtin", "--items", "8", "--repeats", "1", "--max-new-tokens", "4",
                    "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "b.json")])


def test_gpu_report_runs_on_a_tiny_shape_on_cpu(tmp_path, capsys):
    """`--gpu-report --device cpu --shapes tiny`: the GPU report's code end to end (CI keeps it from rotting)."""
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit) as e:
        bench.main(["--gpu-report", "--device", "cpu", "--shapes", "tiny", "--gpu-new-tokens", "4", "--out", str(out)])
    assert e.value.code == 0
    r = json.load(open(out))["shapes"]["tiny"]
    assert set(r["memory"]) - {"baseline_bytes", "free_bytes"} == {"full-fp32-master", "full-bf16-sr", "last-8", "lora-16"}
    assert {"baseline_bytes", "free_bytes"} <= set(r["memory"])  # every section records where it started
    assert all(r["train"][m]["tokens_per_s"] > 0 for m in ("ga", "gd", "kl", "npo"))
    assert r["adamw"]["ratio"] > 0 and r["decode"]["batch_128"]["vs_official"] > 0
    assert r["identity_fp32"]["rows_differing"] == 0 and r["projection"]["full_eval_s"] > 0
    assert r["identity_fp32"]["stream_rows_differing"] == 0 and r["identity_fp32"]["stream"] == "greedy_stream"
    assert "| tiny | decode batch 32 |" in capsys.readouterr().out


def test_gpu_report_without_cuda_says_what_it_needs(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    with pytest.raises(SystemExit) as e:
        bench.main(["--gpu-report"])
    assert e.value.code == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "needs a CUDA GPU" in out[0] and "--device cpu" in out[0]


def test_the_gpu_projection_counts_the_steps_the_graph_path_runs():
    """A stage costs the steps the CUDA path runs on the release (26,416 at batch 32: rows leave and
    enter, 23.1 live a step) at the step time, not its 610,745 tokens at the full-rows rate, which
    would count every step as 32 tokens (1.4x fewer decode seconds)."""
    step, prefill = 0.005, 1e5  # a 5 ms batch-32 step (the 7B's weight read on an H100), 100k tok/s prefill
    p = gpureport.projection({"batch_32": {"step_s": step, "tokens_per_s": 32 / step}}, prefill)
    assert p["generation_s_per_stage"] == pytest.approx(286371 / 1e5 + 26416 * 0.005)
    assert p["generation_s_per_stage_full_rows"] == pytest.approx(286371 / 1e5 + 610745 / 6400)
    assert p["full_eval_s"] == pytest.approx(2 * (p["generation_s_per_stage"] + (67333 + 2099787 + 29628) / 1e5))
    assert gpureport.projection({}, prefill) == {"skipped": "no batch-32 decode rate"}


def test_a_failed_gpu_report_section_is_a_row_and_the_rest_still_runs(tmp_path, capsys, monkeypatch):
    """On a GPU lent for minutes, an out-of-memory the plan missed (here the AdamW comparison and the
    batch-128 decode) is an error row; every other section runs, the table and bench-gpu.json hold
    them, and the exit status says a section failed."""
    import torch


    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")
    real = generation.greedy
    monkeypatch.setattr(gpureport, "adamw_section", oom)
    monkeypatch.setattr(generation, "greedy", lambda model, ids, *a, **k: oom() if ids.shape[0] == 128 else
                        real(model, ids, *a, **k))
    out = tmp_path / "gpu.json"
    assert gpureport.run("cpu", "tiny", str(out), new_tokens=4) == 1
    r = json.load(open(out))["shapes"]["tiny"]
    error = "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert r["adamw"]["error"] == error and r["decode"]["batch_128"] == {"error": error}
    assert set(r["adamw"]) == {"error", "baseline_bytes", "free_bytes"}  # the failed section's start is kept
    assert r["decode"]["batch_32"]["tokens_per_s"] > 0 and r["identity_fp32"]["rows_differing"] == 0
    assert r["projection"]["full_eval_s"] > 0 and all(r["train"][m]["tokens_per_s"] > 0 for m in ("ga", "npo"))
    printed = capsys.readouterr().out
    assert f"| tiny | StochasticAdamW bf16 vs fused AdamW fp32 | error: {error} |" in printed
    assert f"| tiny | decode batch 128 | error: {error} |" in printed and "2 section(s) failed" in printed


def test_a_killed_gpu_report_keeps_what_ran(tmp_path, monkeypatch):
    """bench-gpu.json is rewritten after every section: a report stopped midway (a device call's
    time limit) leaves what ran on disk, and table() renders it, the rest marked as not reached."""


    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(gpureport, "identity_section", killed)
    out = tmp_path / "gpu.json"
    with pytest.raises(KeyboardInterrupt):
        gpureport.run("cpu", "tiny", str(out), new_tokens=4)
    res = json.load(open(out))
    r = res["shapes"]["tiny"]
    assert r["decode"]["batch_32"]["tokens_per_s"] > 0 and r["adamw"]["ratio"] > 0 and "identity_low" not in r
    assert "| tiny | projected full LUME evaluation | skipped: not reached |" in gpureport.table(res)


def test_the_adamw_comparison_runs_on_the_layers_that_fit():
    """The fp32 AdamW step of the 7B needs 16 bytes x 6.89e9 parameters (103 GiB), more than an
    80 GB card: it runs on the decoder layers that fit beside memory.reserve, counted here from the
    config (OLMo-0724: untied embeddings, no norm weights, 4d^2 + 3 d ffn per layer)."""
    import gpuplan

    GiB = 2**30
    c = gpureport.SHAPES["olmo-7b"]
    d, ffn, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    layer, rest = 4 * d * d + 3 * d * ffn, 2 * V * d
    assert rest + L * layer == 6_888_095_744  # the released OLMo-7B-0724's parameter count
    for free in (80 * GiB, 24 * GiB):
        fit = (int((free - GiB - free // 20) * 0.9) // 16 - rest) // layer  # a 10% margin beside the reserve
        assert gpuplan.adamw_layers(c, free) == fit < L
    assert gpuplan.adamw_layers(c, 80 * GiB) == 20 and gpuplan.adamw_layers(c, 141 * GiB) == L
    assert gpuplan.adamw_layers(gpureport.SHAPES["olmo-1b"], 80 * GiB) == 16
    assert gpuplan.adamw_layers(c, 3 * GiB) == 0


def test_a_decode_batch_whose_keys_and_values_do_not_fit_is_skipped_with_the_plan():
    """A decode row whose cache would not fit beside the weights (batch 128 of a 7B on a 40 GB card)
    is skipped with the plan's numbers before anything is allocated; the rows that fit still run."""
    import torch

    dev, c = torch.device("cpu"), gpureport.SHAPES["tiny"]
    model = gpureport.eval_model(c, dev, torch.float32)
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    need = {B: gpureport.decode_plan(model, B, 4, 64) for B in (32, 128)}
    # K and V of every layer: the step's 128 positions (64 + 4 rounded up to 64) and the prefill's 64
    assert need[128] == 2 * c["num_hidden_layers"] * 128 * (128 + 64) * c["hidden_size"] * 4 == 4 * need[32]
    free = int((2**30 + wbytes + (need[32] + need[128]) // 2) / 0.95)  # room between the two
    peak = gpureport.peaks(dev, torch.float32, 64)
    d = gpureport.decode_section(model, dev, (32, 128), 4, 64, peak, print, lambda: False, free)
    assert d["batch_32"]["tokens_per_s"] > 0
    # bytes_fraction: the weights and every one of the fixed-shape step's 128 cache columns (not 64 + 4 / 2)
    assert d["batch_32"]["bytes_fraction"] == pytest.approx(
        (wbytes + gpureport.kv_bytes(model, 32, 128)) / peak["copy_bytes_per_s"] / d["batch_32"]["step_s"])
    assert d["batch_128"]["skipped"].startswith("keys and values 0.02 GiB > 0.01 GiB free beside the weights")
    from transformers import AutoModelForCausalLM, OlmoConfig
    with torch.device("meta"):  # the 7B in bf16, shapes only: 128 rows x (320 + 64) positions x 32 layers x 8 KiB
        olmo7b = AutoModelForCausalLM.from_config(OlmoConfig(**gpureport.SHAPES["olmo-7b"]), dtype=torch.bfloat16)
    assert gpureport.decode_plan(olmo7b, 128, 256, 64) == 24 * 2**30  # docs/performance.md's figure


def test_every_gpu_report_section_starts_from_the_same_clean_baseline(tmp_path, monkeypatch):
    """Each section starts from a clean device (gpureport.clean: the last section's fixed-shape steps
    and model released) and records baseline_bytes, the memory held at its start (on CPU, every live
    tensor). Run twice in one process on CUDA's fixed-shape decode path (the steps that held the 1B's
    fp32 identity model into the 7B's sections), no section's baseline may grow, nor may the run end
    holding more than it started with."""

    monkeypatch.setattr(generation, "static_default", lambda model, device: True)  # CUDA's path, eagerly
    # a lean report: the training rows leave nothing behind (their baselines are still taken); the rest runs
    monkeypatch.setattr(gpureport, "memory_section", lambda *a, **k: {})
    monkeypatch.setattr(gpureport, "train_section", lambda *a, **k: {})
    runs = []
    for i in range(2):
        assert gpureport.run("cpu", "tiny", str(tmp_path / f"{i}.json"), new_tokens=4, batches=(2,)) == 0
        runs.append(json.load(open(tmp_path / f"{i}.json")))
    tiny = [r["shapes"]["tiny"] for r in runs]
    sections = [k for k, v in tiny[0].items() if isinstance(v, dict) and "baseline_bytes" in v]
    assert {"memory", "train", "adamw", "decode", "prefill", "identity_low", "identity_fp32"} <= set(sections)
    model_bytes = 4 * sum(p.numel() for p in gpureport.eval_model(gpureport.SHAPES["tiny"], "cpu", torch.float32).parameters())
    for key in sections:  # a leaked tiny model is 0.6 MB; allocator noise is far less
        assert tiny[1][key]["baseline_bytes"] - tiny[0][key]["baseline_bytes"] < model_bytes // 4, key
    for r in runs:
        assert r["end_baseline_bytes"] - r["baseline_bytes"] < model_bytes // 4
    assert not generation.GRAPHS["steps"]


def test_an_out_of_memory_in_the_adamw_comparison_is_a_measured_row(monkeypatch):
    """The optimizer comparison is sized from the free memory measured at its start (gpuplan.adamw_layers,
    with memory.reserve and a margin); if the fp32 step still runs out of memory, the row says so with
    its numbers (layers tried, bytes planned, free at the start) and is not an error: the report exits 0."""

    import gpuplan

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB\nmore")
    monkeypatch.setattr(torch.optim, "AdamW", oom)
    c, free = gpureport.SHAPES["tiny"], 2**30 * 3 // 2
    a = gpureport.adamw_section(c, torch.device("cpu"), free)
    layers = gpuplan.adamw_layers(c, free)
    rest, layer = gpuplan.adamw_counts(c)
    assert layers == c["num_hidden_layers"] and a["stochastic_adamw_bf16"]["step_s"] > 0
    assert a["torch_fused_adamw_fp32"] == {"out_of_memory": "OutOfMemoryError: CUDA out of memory. Tried to allocate "
                                           "3.00 GiB", "layers": layers, "planned_bytes": (rest + layers * layer) * 16,
                                           "free_bytes": free, "held_bytes": a["torch_fused_adamw_fp32"]["held_bytes"]}
    assert gpureport.errors_in({"adamw": a}) == 0 and "ratio" not in a
    assert gpureport.adamw_row(a).startswith(f"torch_fused_adamw_fp32: out of memory on {layers} of 2 layers, ")


def test_the_gpu_call_refuses_without_the_pinned_wheel(tmp_path):
    """docs/repro/gpu_call.sh in a copy of the tree: without .whl/transformers-<pin>-*.whl (or with
    another version's wheel) it refuses in one line, exit 2, before anything runs; with the pinned one
    its dry mode prints the versions a call would run."""
    import shutil
    import subprocess
    from conftest import ROOT
    pin = next(l.split("==")[1].strip() for l in open(ROOT / ".ci/constraints.txt") if l.startswith("transformers=="))
    (tmp_path / "docs/repro").mkdir(parents=True)
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / "docs/repro/gpu_call.sh", tmp_path / "docs/repro")
    shutil.copy(ROOT / ".ci/constraints.txt", tmp_path / ".ci")
    call = lambda *a: subprocess.run(["bash", str(tmp_path / "docs/repro/gpu_call.sh"), *a], capture_output=True,  # noqa: E731
                                     text=True, timeout=60)
    (tmp_path / ".whl").mkdir()
    for wheel in (None, "transformers-5.17.0-py3-none-any.whl"):
        if wheel:
            (tmp_path / ".whl" / wheel).touch()
        r = call()
        assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
        assert r.stderr.startswith(f"error: gpu_call.sh: no .whl/transformers-{pin}-*.whl")
    assert not (tmp_path / "gpu-out").exists()  # nothing ran
    (tmp_path / ".whl" / f"transformers-{pin}-py3-none-any.whl").touch()
    r = call("--dry")
    assert r.returncode == 0 and f"transformers {pin} (.whl/transformers-{pin}-py3-none-any.whl)" in r.stdout
    assert r.stdout.startswith(f"torch {torch.__version__}")


def test_the_scoring_plan_decodes_the_7b_at_128_rows_or_more_on_an_80gb_card():
    """memory.scoring_plan, the one definition gpureport.decode_plan shares (memory.decode_bytes): on
    an 80 GiB card (97% free) the 7B in bf16 decodes the release's prompts (1-290 tokens, 256 new) at
    128 rows or more, fewer on 24 and 40 GiB, and beside training's state (--eval-every) fewer still;
    the planned bytes stay within the room left after the weights and the reserve."""
    import gpuplan
    import memory
    c, GiB = memory.OLMO_CONFIGS["olmo-7b"], 2**30
    rows = {}
    for g in (24, 40, 80, 141):
        p = memory.scoring_plan(c, int(g * GiB * 0.97), g * GiB, *gpuplan.FULL_EVAL["prompts"], 256,
                                weights=memory.param_bytes(c, 2))
        assert p["planned_bytes"] <= p["room_bytes"] and p["rows"] % 8 == 0
        rows[g] = p["rows"]
    assert rows[80] >= 128 and rows[24] < rows[40] < rows[80] < rows[141]
    # per row-position at the longest prompt's 576 columns: two steps' K/V, the prefill's, 512 KiB each
    per_pos = memory.decode_bytes(c, 1, 320, 256, 2, 64, moves=True) / 576
    assert per_pos == (2 * 576 + 320) * 512 * 1024 / 576
    beside = memory.scoring_plan(c, int(80 * GiB * 0.97), 80 * GiB, 1, 290, 256, weights=memory.param_bytes(c, 2),
                                 held=30 * GiB)
    assert beside["rows"] < rows[80]


def test_the_7b_evaluation_is_projected_under_10_minutes_on_an_h100_at_the_planned_rows():
    """gpuplan.full_eval, the report's model of one full LUME evaluation (docs/performance.md names its
    assumptions): a decode step reads the weights and its rows' cache columns at 80% of the card's
    bandwidth; at the rows an 80 GiB card's plan gives, both H100 kinds finish under 10 minutes, where
    batch 32 on the PCIe card does not."""
    import gpuplan
    import memory
    c = memory.OLMO_CONFIGS["olmo-7b"]
    p = gpuplan.plans(say=lambda s: None, names=())
    for card, by_rows in p["projection"].items():
        rows = max(by_rows)
        assert rows >= 128 and by_rows[rows]["full_eval_s"] < 600, (card, by_rows[rows])
        q = by_rows[32]
        bw = gpuplan.CARDS[card]["copy_bytes_per_s"] * 0.8
        assert q["steps"] == 26416 and q["step_s"] == pytest.approx((6_888_095_744 * 2 + 32 * 372 * 512 * 1024) / bw)
    assert p["projection"]["H100 PCIe 80GB"][32]["full_eval_s"] > 600


def test_matmul_peak_is_the_best_timing(monkeypatch):
    """A timing that a neighbour slowed must not lower the peak: the fastest after the warm-up counts."""
    model = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False))  # x 2,048 rows: 1 GFLOP, 3 matmuls a timing
    ticks = iter([0.0, 0.0,  # no spin (spin_s=0): its deadline is read, and passed
                  0.0, 9.0, 10.0, 13.0, 14.0, 15.0, 20.0, 22.0])  # warm-up 9 s, then 3, 1, 2 s per timing
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    monkeypatch.setattr(bench, "sync", lambda device: None)
    monkeypatch.setattr(torch, "matmul", lambda a, b: None)  # the clock is fake: nothing to multiply
    p = bench.matmul_peak(model, rows=2048, repeats=3, device="cpu")
    assert p["flop_per_s"] == pytest.approx(2 * 2048 * 512 * 512 / (1.0 / 3))


def test_peak_tensor_bytes_counts_what_is_alive_at_once():
    """Exact bytes: a view shares its storage (counted once), a freed tensor stops counting."""
    def fn():
        a = torch.zeros(1000)  # 4,000 bytes
        v = a[:10].add_(1)  # a view, changed in place: no new storage
        b = torch.ones(3000)  # 12,000: 16,000 alive
        del a, v
        d = torch.ones(1500)  # 6,000: 18,000 alive (22,000 if a were still counted)
        return b, d
    (b, d), peak = gpureport.peak_tensor_bytes(fn)
    assert peak == 18_000 and b.sum().item() == 3000
