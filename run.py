"""
Unlearn a LUME target and score it before and after, as the SemEval-2025 Task 4 scorer does.

    python run.py --task 1 --method npo                     # tiny embedded target on built-in data (CPU)
    python run.py --task 1 --method npo --model olmo-7b     # the released 7B target on the real benchmark
                                                            # (data fetched, verified, cached on first use)
    torchrun --nproc_per_node 2 run.py ...                   # the same run, FSDP2-sharded

The configuration is the dataclass below: every field is a --flag with its default and help in
one place. A run directory gets config.json, log.jsonl, generations.jsonl, mia.jsonl,
results.json (official keys under "before" and "after") and, with --save, a checkpoint.
"""
import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import job
import lume


def arg(default, help: str, **extra):
    """A Config field: its default, its --help text and any argparse extras (choices)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class Config:
    task: str = arg("1", "what is unlearned: 1, 2, 3 or all (evaluation covers every task)",
                    choices=["1", "2", "3", "all"])
    method: str = arg("npo", "unlearning method; none scores the target as it is",
                      choices=["ga", "gd", "kl", "npo", "simnpo", "rmu", "none"])
    model: str = arg("tiny", "tiny (built locally), olmo-1b, olmo-7b, a hub id or a local "
                             "save_pretrained directory")
    data: str = arg("auto", "auto (builtin for --model tiny, else lume), builtin, lume, semeval (fetched, "
                            "verified, cached: docs/data.md), or a LUME release dir / a SemEval parquet dir")
    n_docs: int = arg(0, "documents per task per split: built-in data makes this many (0 = 8), "
                         "real data keeps the first N (0 = all)")
    mia_data: str = arg("auto", "auto (built-in data brings its own; real data: mia, or none with a note if it "
                                "cannot be fetched), mia, none, or a dir with member.jsonl + nonmember.jsonl")
    mmlu: str = arg("auto", "auto (none with built-in data; real data: mmlu, or none with a note if it cannot "
                            "be fetched), mmlu, none, or an MMLU dir (dev/, test/ CSVs)")
    mmlu_limit: int = arg(0, "questions per MMLU subject (0 = all)")
    lr: float = arg(0.0, "peak learning rate (0 = 1e-4 for tiny, 1e-5 otherwise; RMU: METHOD_DEFAULTS)")
    epochs: float = arg(0.0, "passes over the forget set (0 = 20 for tiny, 5 otherwise)")
    max_steps: int = arg(0, "optimizer steps; > 0 overrides --epochs")
    batch_size: int = arg(4, "forget (and retain) rows per micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step (token-normalised)")
    warmup: int = arg(0, "linear warmup steps")
    schedule: str = arg("constant", "lr after warmup", choices=["constant", "linear"])
    clip: float = arg(1.0, "gradient-norm clip (0 = off)")
    beta: float = arg(-1.0, "NPO / SimNPO inverse temperature; -1 = 0.1 for NPO, for SimNPO 2.5 (paper, TOFU; "
                            "its beta multiplies a per-token mean, NPO's a sequence sum) or the tiny value")
    gamma: float = arg(0.0, "SimNPO reward margin (paper, TOFU: 0)")
    retain_weight: float = arg(-1.0, "weight of the retain term of GD, KL, NPO (NPO-RT; 0 = pure NPO), SimNPO and "
                                     "RMU (its alpha); -1 = 1 for GD/KL, 3 for NPO, METHOD_DEFAULTS for SimNPO/RMU")
    rmu_layer: int = arg(-1, "RMU: decoder layer l (0-based) whose output is steered; MLPs of l-2..l train "
                             "(-1 = METHOD_DEFAULTS)")
    rmu_coeff: float = arg(-1.0, "RMU: steering coefficient c (forget activations pushed to c*u; -1 = METHOD_DEFAULTS)")
    chunk_size: int = arg(0, "sequential unlearning: forget items per chunk, chunks unlearned one after the "
                             "other, each for --epochs (0 = one chunk, the whole forget set)")
    retain_ratio: int = arg(1, "retain rows per forget row in every micro-batch")
    precision: str = arg("auto", "auto = bf16 autocast on CUDA, fp32 on CPU", choices=list(lume.PRECISIONS))
    eval_precision: str = arg("auto", "weights' dtype when scoring: auto = bf16 on CUDA (as the official scorer "
                                      "loads the targets), fp32 on CPU", choices=list(lume.EVAL_PRECISIONS))
    grad_checkpointing: bool = arg(False, "recompute activations in backward (7B on one GPU)")
    device: str = arg("auto", "auto, cpu, cuda, cuda:1, ...")
    max_new_tokens: int = arg(256, "generation length (the official scorer uses 256)")
    eval_batch_size: int = arg(32, "prompts per generation batch")
    eval_before: bool = arg(True, "also score the target before unlearning")
    seed: int = arg(0, "seeds data order, sampling of retain batches and torch")
    out: str = arg("", "run directory (default runs/task<T>-<method>-<model>-<time>); never overwritten")
    save: bool = arg(False, "save the model (save_pretrained, safetensors) to <out>/model: the unlearned one (the "
                            "kept step with --keep best), or with --method none the target as it is")
    eval_every: int = arg(0, "score the evaluation subset (trajectory.py) every N optimizer steps and before the "
                             "first, into trajectory.jsonl and trajectory.png (0 = never)")
    keep: str = arg("last", "which weights end the run: last, or best (the scored step trajectory.select_best "
                            "picks; needs --eval-every; a host-memory copy of the trainable weights)",
                    choices=["last", "best"])
    save_every: int = arg(0, "write a training checkpoint every N optimizer steps (0 = never); a killed run "
                             "continues with --resume")
    resume: str = arg("", "continue the run in this directory from its last checkpoint, with its own "
                          "config.json (give no other flag)")
    cache_dir: str = arg(os.environ.get("LUME_CACHE", str(Path.home() / ".cache" / "lume")),
                         "where the tiny target and the fetched data are cached (env LUME_CACHE)")
    rdzv_timeout: float = arg(60.0, "torchrun: seconds to wait for every rank at MASTER_ADDR:MASTER_PORT "
                                    "before a clear error")


# (tiny target, any other model) defaults of method options left at -1. Other models: the papers'
# values, SimNPO's from Fan et al.'s TOFU forget05 recipe (beta 2.5, gamma 0, forget term weighted
# 0.1375 against retain 1, i.e. retain_weight 1/0.1375), RMU's from WMDP's Zephyr-7B run (l 7,
# c 6.5, alpha 1200, lr 5e-5). Tiny: chosen on the built-in data (docs/methods.md).
METHOD_DEFAULTS = {"simnpo": {"beta": (2.5, 2.5), "retain_weight": (1.0, 7.27)},
                   "rmu": {"rmu_layer": (2, 7), "rmu_coeff": (100.0, 6.5), "retain_weight": (10.0, 1200.0),
                           "lr": (3e-3, 5e-5)}}


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=meta["help"])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, choices=meta.get("choices"),
                           help=meta["help"])
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.resume:
        return resumed_config(p, cfg.resume, argv if argv is not None else sys.argv[1:])
    # model-dependent defaults, resolved here once and recorded in config.json. The tiny values
    # were chosen on the built-in data (README table); 1e-5 x 5 epochs is the usual 7B setting.
    is_tiny = cfg.model == "tiny"
    for name, values in METHOD_DEFAULTS.get(cfg.method, {}).items():
        if getattr(cfg, name) == (0 if name == "lr" else -1):  # the sentinel only: others are checked below
            setattr(cfg, name, type(getattr(cfg, name))(values[0 if is_tiny else 1]))
    cfg.lr = cfg.lr or (1e-4 if is_tiny else 1e-5)
    cfg.epochs = cfg.epochs or (20.0 if is_tiny else 5.0)
    if cfg.retain_weight < 0:  # NPO's retain NLL competes with a loss ~(2/beta)log2 = 14: weigh it more
        cfg.retain_weight = 3.0 if cfg.method == "npo" else 1.0
    if cfg.beta == -1:
        cfg.beta = 0.1
    for name in ("epochs", "batch_size", "grad_accum", "max_new_tokens", "eval_batch_size"):
        if getattr(cfg, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.beta <= 0:
        p.error(f"--beta must be > 0, got {cfg.beta}")
    if cfg.chunk_size < 0:
        p.error(f"--chunk-size must be >= 0 (0 = the whole forget set), got {cfg.chunk_size}")
    if cfg.retain_ratio < 1:
        p.error(f"--retain-ratio must be >= 1 retain row per forget row, got {cfg.retain_ratio}")
    if cfg.method == "rmu" and (cfg.rmu_layer < 0 or cfg.rmu_coeff <= 0):
        p.error(f"--rmu-layer must be >= 0 and --rmu-coeff > 0, got {cfg.rmu_layer} and {cfg.rmu_coeff}")
    if cfg.method == "rmu" and cfg.save_every:
        p.error("--save-every: RMU's training checkpoints (with its frozen-activation cache) are not supported yet")
    if cfg.keep == "best" and not cfg.eval_every:
        p.error("--keep best picks among the scored steps: give --eval-every N too")
    return cfg


def resumed_config(p, run_dir: str, argv) -> Config:
    """The Config of the run in run_dir (its config.json), to be continued there."""
    if len([a for a in argv if a.startswith("--")]) > 1:
        p.error("--resume continues a run with its own config.json: give no other flag")
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        p.error(f"--resume {run_dir}: no config.json there (not a run directory)")
    saved = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{**{k: v for k, v in saved.items() if k in names}, "resume": run_dir, "out": run_dir})


if __name__ == "__main__":
    job.main(parse_args())
