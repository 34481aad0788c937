"""The headline path as a user runs it, offline after a download: `--model olmo-7b` through a
Hugging Face cache laid down under the real repo ids (conftest's hub_cache: a hub-shaped tiny OLMo,
the real OLMo-0724 tokenizer, HF_HUB_OFFLINE=1), the real LUME items read through the project's
data cache (--data lume, verified against the pinned sha256), every method with its non-tiny
defaults (run.parse_args resolves them as for a user), LoRA and last-K, the AILS-NTUA and ZJUKLAB
recipes as docs/methods.md writes them, --attacks all, --save, --keep best, merge.py, then
report.py compare on the lot. The weights are random: what is asserted is that each path runs and
its outputs are complete and scored, not what the scores are. Also: an empty cache offline is one
`error:` line and exit 2 (CPU, and the CUDA setup's branch), and no forward that does not
generate builds a KV cache.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import attacks
import evaluation
import job
import lume
import membership
import memory
import merge
import methods
import report
import run
from conftest import ROOT

# one worker under pytest -n (--dist loadgroup): the last test compares the runs the others made (RUNS)
pytestmark = pytest.mark.xdist_group("test_hub")

RUNS = {}  # label -> run directory, for test_report_compare_on_the_lot (the last test)
OUT = {}


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hub-runs")


def quick(hub, out, *flags) -> list[str]:
    """A run sized for CI (1 document per task and split, 1 step, 2 new tokens, 4 + 4 MIA documents,
    2 MMLU questions), the data through the project's cache (--data lume: hub/lume-cache/data/lume)."""
    return ["--model", "olmo-7b", "--data", "lume", "--n-docs", "1", "--max-steps", "1", "--max-new-tokens", "2",
            "--mia-data", hub / "mia-small", "--mmlu", hub / "mmlu-small", "--mmlu-limit", "1",
            "--cache-dir", hub / "lume-cache", "--out", out, *flags]


def well_formed(out, stages=("after",)) -> dict:
    """results.json's official keys scored in every stage (scores in [0, 1], aggregate-score not -1:
    MIA and MMLU were both scored), a complete status, a config.json with the run's provenance."""
    results = json.loads((out / "results.json").read_text())
    for stage in stages:
        r = results[stage]
        for split in ("forget-set", "retain-set"):
            assert {f"Task{t}" for t in (1, 2, 3)} <= set(r[split])
            for t in (1, 2, 3):
                assert all(0 <= r[split][f"Task{t}"][k] <= 1 for k in ("regurgitation-score", "knowledge-score"))
        assert 0 <= r["mia_loss_acc"] <= 1 and 0 <= r["mmlu_average"] <= 1 and r["aggregate-score"] != -1
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    config = json.loads((out / "config.json").read_text())
    p = config["provenance"]
    assert p["model"].get("hub") == lume.ALIASES["olmo-7b"][0] or config["model"] != "olmo-7b"
    assert p["torch"] == torch.__version__ and p["transformers"] and "data" in p["data"]
    return results


def documented(command: str) -> list[str]:
    """A command's flags as docs/methods.md writes them, less --epochs: quick()'s --max-steps 1 sizes
    the run (run.py refuses both at once)."""
    flags = command.split()
    i = flags.index("--epochs")
    return flags[:i] + flags[i + 2:]


def in_process(hub, out, *flags):
    cfg = run.parse_args(quick(hub, out, *flags))
    job.main(cfg)
    return cfg


def test_headline_command_in_a_subprocess(hub_env, out_root):
    """`python run.py --task 1 --method npo --model olmo-7b` as a user types it, offline."""
    out = out_root / "npo"
    argv = ["--task", "1", "--method", "npo", *map(str, quick(hub_env, out))]
    want = run.parse_args(argv)  # the defaults as they resolve for a user (methods.py's real-model column)
    p = subprocess.run([sys.executable, "run.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "Warning" not in p.stderr + p.stdout, p.stderr[-3000:]
    well_formed(out, ("before", "after"))
    config = json.loads((out / "config.json").read_text())
    snap = hub_env / "hf" / "hub" / ("models--" + lume.ALIASES["olmo-7b"][0].replace("/", "--")) / "refs" / "main"
    m = config["provenance"]["model"]
    assert m["revision"] == snap.read_text() and set(m["sha256"]) == {"config.json", "model.safetensors"}
    assert config["data_sources"]["data"]["path"] == str(hub_env / "lume-cache" / "data" / "lume")
    assert all(config[k] == getattr(want, k) for k in ("beta", "retain_weight", "lr", "epochs", "max_steps"))
    assert "Forget Task1: regurgitation" in p.stdout and "MMLU" in p.stdout
    RUNS["NPO"] = out


@pytest.mark.parametrize("method", ["ga", "gd", "kl", "simnpo", "rmu", "stat", "undial"])
def test_every_method_with_its_real_model_defaults(hub_env, out_root, method, capsys):
    out = out_root / method
    cfg = in_process(hub_env, out, "--task", "1", "--method", method, "--no-eval-before")
    for name, d in methods.METHODS[method].defaults.items():  # each "auto" took its real-model value
        assert getattr(cfg, name) == d.real, name
    if method == "rmu":
        assert (cfg.rmu_layer, cfg.rmu_params) == (7, "down")  # WMDP's layer, which the 8-layer cache has
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 1 and math.isfinite(log[0]["loss"])
    well_formed(out)
    said = capsys.readouterr().out
    assert "Scored once (no unlearning)" not in said and "unlearning only (--no-eval-before)" in said
    RUNS[method.upper()] = out


def test_lora_and_last_k(hub_env, out_root):
    out = out_root / "lora"
    in_process(hub_env, out, "--task", "1", "--method", "npo", "--lora-rank", "4", "--save", "--no-eval-before")
    well_formed(out)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == lume.ALIASES["olmo-7b"][0]  # the hub id, as PEFT records it
    assert (out / "model" / "model.safetensors").is_file()
    out = out_root / "lastk"
    in_process(hub_env, out, "--task", "1", "--method", "gd", "--train-layers", "2", "--no-eval-before")
    well_formed(out)
    RUNS["NPO LoRA 4"] = out_root / "lora"


def test_ails_ntua_recipe_as_documented(hub_env, out_root):
    """docs/methods.md's command, sized by --max-steps 1 (and the quick inputs)."""
    out = out_root / "ails"
    in_process(hub_env, out, *documented("--task all --method gd --train-layers 8 --chunk-size 32 --epochs 7 "
                                         "--retain-ratio 7 --retain-weight 3.5 --lr 1e-5 --batch-size 1 "
                                         "--grad-checkpointing --save"), "--no-eval-before")
    well_formed(out)
    assert (out / "model" / "config.json").is_file()
    RUNS["AILS-NTUA"] = out


def test_attacks_all_and_keep_best(hub_env, out_root):
    out = out_root / "attacks"
    cfg = in_process(hub_env, out, "--task", "1", "--method", "npo", "--attacks", "all", "--no-eval-before",
                     "--eval-every", "1", "--keep", "best", "--max-steps", "2",  # the last flag wins:
                     "--n-docs", "2")  # relearn splits task 1's forget QA items into T and V: 2 documents
    assert cfg.max_steps == 2
    results = well_formed(out)
    assert set(results["robustness"]) == set(attacks.parse("all"))  # every attack, the quantisers of quant.py too
    assert results["kept"]["step"] in (0, 1, 2)
    assert len([json.loads(line) for line in open(out / "trajectory.jsonl")]) == 3
    RUNS["NPO attacked"] = out


def test_zjuklab_recipe_merge_and_score(hub_env, out_root, capsys):
    """docs/methods.md's ZJUKLAB commands: two LoRA NPO runs, merge.py --base olmo-7b (the adapters
    record the hub id), the merged directory scored with --model DIR."""
    z = documented("--task all --method npo --lora-rank 32 --lora-alpha 32 --lora-dropout 0.05 --lr 1e-4 --epochs 5 "
                   "--save") + ["--no-eval-before"]
    in_process(hub_env, out_root / "zju1", *z, "--retain-weight", "0.5", "--batch-size", "1", "--grad-accum", "4")
    in_process(hub_env, out_root / "zju2", *z, "--retain-weight", "1.33", "--batch-size", "2", "--grad-accum", "4")
    adapters = [str(out_root / f"zju{i}" / "adapter") for i in (1, 2)]
    for method in ("ties", "peft-ties"):
        rc = merge.main(["--base", "olmo-7b", "--method", method, "--density", "0.8", "--weights", "1,1",
                         "--out", str(out_root / f"zju-{method}"), *adapters])
        assert rc == 0, capsys.readouterr().err
        merged = out_root / f"zju-{method}"
        assert (merged / "tokenizer.json").is_file() and json.loads((merged / "merge.json").read_text())["method"] == method
    out = out_root / "zju-score"
    flags = quick(hub_env, out)[2:]
    i = flags.index("--max-steps")  # --method none trains nothing: run.py refuses --max-steps
    cfg = run.parse_args(["--method", "none", "--model", out_root / "zju-peft-ties", *flags[:i], *flags[i + 2:]])
    job.main(cfg)
    results = well_formed(out, ("before",))
    assert results["before"]["mmlu_average"] >= 0
    RUNS["ZJUKLAB merge"] = out


def test_report_compare_on_the_lot(hub_env, out_root, capsys, tmp_path):
    assert len(RUNS) >= 10, f"the runs above did not all finish: {sorted(RUNS)}"
    rc = report.main(["compare", *map(str, RUNS.values()), "--png", str(tmp_path / "compare.png")])
    said = capsys.readouterr()
    assert rc == 0 and "PEFT-TIES merge" in said.out and "| forget Task1 regurgitation |" in said.out
    assert said.err.count("model llmunlearningsemeval2025organization/") >= 9  # the provenance lines


# -----------------------------------------------------------------------------
# offline with an empty cache: one line, exit 2, nothing written


def test_offline_with_an_empty_cache_is_one_error_line(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_CACHE": str(tmp_path / "empty" / "hub"),
           "HF_HUB_OFFLINE": "1", "LUME_CACHE": str(tmp_path / "lc")}
    p = subprocess.run([sys.executable, "run.py", "--task", "1", "--method", "npo", "--model", "olmo-7b",
                        "--out", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert all(s in lines[0] for s in (*lume.ALIASES["olmo-7b"], "HF_HUB_OFFLINE", "hf download", "HF_TOKEN"))
    assert not (tmp_path / "run").exists()


def test_offline_errors_past_preflight_are_one_line_on_cpu_and_cuda(tmp_path, monkeypatch, capsys):
    """Past run.py's preflight (the cache emptied in between): lume.load_pretrained on CPU, and on
    CUDA the memory plan, which reads the tokenizer first (the device check monkeypatched)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        lume.load_pretrained("olmo-7b")
    assert str(e.value.code).count("\n") == 0 and "HF_HUB_OFFLINE" in str(e.value.code)
    cfg = run.Config(model="olmo-7b", method="npo")
    with pytest.raises(SystemExit) as e:
        memory.auto_setup(cfg, torch.device("cuda"), [], free_bytes=80 << 30)
    msg = str(e.value.code)
    assert msg.startswith("error:") and "\n" not in msg and lume.ALIASES["olmo-7b"][1] in msg and "HF_TOKEN" in msg


# -----------------------------------------------------------------------------
# no KV cache where nothing is generated


def test_no_forward_that_does_not_generate_builds_a_kv_cache(small_target, monkeypatch):
    from transformers import cache_utils
    built = []
    init = cache_utils.DynamicCache.__init__
    monkeypatch.setattr(cache_utils.DynamicCache, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])
    model, tok = small_target
    seqs = [lume.encode_pair(tok, "The capital of France", "is Paris")[0], lume.encode_pair(tok, "One", "two")[0]]
    b = lume.make_batch(seqs, [1, 1], [0, 1], lume.pad_of(tok))
    lume.token_logps(model, b)
    membership.doc_stats(model, tok, ["a whole document", "another one, longer than the first"])
    evaluation.mmlu_choice_logits(model, tok, [tok("Question? Answer:").input_ids])
    methods.kl_sum(model, model, b)
    methods.undial(model, b, None, {"forget_tokens": 1.0}, gamma=10.0, retain_weight=0.0, ref=model)
    methods.layer_output(model, b, 0, stop=True)
    assert built == []
    model(input_ids=b.ids, attention_mask=b.attn)  # the guard sees a default forward's cache
    assert built
