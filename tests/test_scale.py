"""Everything that runs on one process runs on two (torchrun, gloo on 127.0.0.1): LoRA and last-k
under FSDP2, relearn on the sharded model, sharded checkpoints (DCP) killed and resumed, resharded.

Each test is one or two small torchrun runs of the session's small target (tests/conftest.py)
compared with the same run in one process; the helpers are tests/test_dist.py's.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import job
import lora
import lume
import run
from conftest import ROOT
from test_dist import RUN, WEIGHT_ATOL, free_port, read_jsonl, torchrun

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


# --- sharded checkpoints: killed and resumed, on two ranks and resharded

def torchrun_argv(nproc: int, *args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "run.py", *map(str, args)]


def children(pid: int) -> list[int]:
    """The processes whose parent is pid (torchrun's workers: they run in sessions of their own)."""
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d))
    return out


def kill_after_checkpoint(argv, out):
    """Start argv (torchrun), SIGKILL its workers and itself once out has a checkpoint (a preempted node)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pointer, deadline = out / "checkpoints" / "latest.json", time.time() + 300
    while not pointer.is_file():
        assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    for pid in children(proc.pid):
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.communicate()
    assert "after" not in json.loads((out / "results.json").read_text())  # killed mid-run


def no_speed(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


KILLED = ["--data", "builtin", "--n-docs", "2", "--max-steps", "6", "--max-new-tokens", "8", "--task", "1",
          "--lr", "1e-3", "--batch-size", "3", "--grad-accum", "2", "--save-every", "2"]
RESHARD_RTOL = 1e-5  # measured <= 2e-7 relative on every logged term: fp32, only the summation order differs


def resume_one(run_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", "--resume", str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def resharded_and_refused(whole, killed, tmp_path, capsys):
    """Copies of a two-rank checkpoint resumed on one process: as it is, resharded (it completes within
    RESHARD_RTOL, saying so in one line); from another method, or with a rank's shards missing: one
    error line naming the field or the file, exit 2, before any training."""
    one, other, missing = tmp_path / "one", tmp_path / "other", tmp_path / "missing"
    for d in (one, other, missing):
        shutil.copytree(killed, d)
    r = resume_one(one)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming a checkpoint of 2 process(es) on 1" in r.stdout
    same_log(whole, one)  # LOSS_RTOL = RESHARD_RTOL
    assert json.load(open(one / "results.json")).keys() == json.load(open(whole / "results.json")).keys()
    cfg = json.load(open(other / "config.json"))
    (other / "config.json").write_text(json.dumps({**cfg, "method": "kl"}))
    for shard in (missing / "checkpoints").glob("step-*/dcp/__1_0.distcp"):
        shard.unlink()
    for d, why in ((other, "--method: checkpoint 'npo', this run 'kl'"), (missing, "__1_0.distcp: missing")):
        code, (out, err) = run.main(["--resume", str(d)]), capsys.readouterr()  # refused before any work: in process
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and why in errors[0], err[-3000:]
        assert "unlearning:" not in out and read_jsonl(d / "log.jsonl") == read_jsonl(killed / "log.jsonl")


@pytest.mark.parametrize("method,extra", [
    # KL (a second sharded copy as its reference) is slow-only: test_dist's two-rank KL equals one
    # process, and test_longrun's KL SIGKILL resume keeps the reference the target, in every suite run
    ("npo", ["--eval-every", "3"]), pytest.param("kl", ["--eval-every", "3"], marks=pytest.mark.slow),
    ("rmu", ["--rmu-layer", "1", "--rmu-coeff", "5", "--retain-weight", "10", "--retain-ratio", "2"])])
def test_sigkill_and_resume_on_two_ranks_equal_the_uninterrupted_run(small_target_dir, tmp_path, method, extra, capsys):
    argv = ["--model", small_target_dir, "--method", method, *KILLED, *extra]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    torchrun(2, "run.py", *argv, "--out", whole)
    kill_after_checkpoint(torchrun_argv(2, *argv, "--out", killed), killed)
    ckpt = killed / "checkpoints" / json.loads((killed / "checkpoints" / "latest.json").read_text())["dir"]
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"dcp/.metadata.json", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rank-0.json", "rank-1.json"} <= files.keys()
    if method == "rmu":  # each rank holds the frozen activations of the retain rows it trains on
        parts = [load_file(str(ckpt / f"rank-{r}.safetensors")) for r in (0, 1)]
        assert all(any("rmu" in k for k in p) for p in parts)
    if method == "npo":
        resharded_and_refused(whole, killed, tmp_path, capsys)
    torchrun(2, "run.py", "--resume", killed)
    for name in ("results.json", "trajectory.jsonl", "generations.jsonl"):
        if (whole / name).exists():
            assert (killed / name).read_text() == (whole / name).read_text(), name
    assert no_speed(read_jsonl(killed / "log.jsonl")) == no_speed(read_jsonl(whole / "log.jsonl"))
    assert not (killed / "checkpoints").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process
def test_dcp_metadata_is_read_without_running_code(tmp_path):
    import torch.distributed.checkpoint as dcp

    import sharded
    dcp.save({"model": {"w": torch.arange(6.0).reshape(2, 3)}}, storage_writer=sharded.Writer(str(tmp_path / "ok")))
    assert not (tmp_path / "ok" / ".metadata").exists()  # no pickle: DCP's metadata is JSON beside the shards
    meta = sharded.metadata_of(json.loads((tmp_path / "ok" / sharded.META).read_text()), tmp_path / "ok")
    assert list(meta.state_dict_metadata) == ["model.w"] and meta.state_dict_metadata["model.w"].size == (2, 3)
    for bad in ({"version": 1, "tensors": {"w": {"dtype": "Tensor", "size": [1], "chunks": []}}, "planner_data": {},
                 "storage": []},  # a class where a dtype belongs
                {"version": 1, "tensors": {}, "planner_data": {}, "storage": [{"fqn": "w", "file": "../x"}]}):
        with pytest.raises(sharded.CheckpointError, match="refused"):
            sharded.metadata_of(bad, tmp_path / "ok")


# --- two "nodes" of one rank each on this machine: torchrun --nnodes 2 with a c10d rendezvous endpoint

def test_two_nodes_with_a_rendezvous_endpoint_equal_one_process(small_target, tmp_path):
    argv = ["--model", small_target[0].name_or_path, "--method", "npo", *RUN, "--no-eval-before"]
    endpoint, env = f"127.0.0.1:{free_port()}", {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "t",
                               "run.py", *argv, "--out", str(tmp_path / "two"), "--rdzv-timeout", "60"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    job.main(run.parse_args([*argv, "--out", str(tmp_path / "one")]))
    assert json.load(open(tmp_path / "two" / "config.json"))["world_size"] == 2
    same_log(tmp_path / "one", tmp_path / "two")
