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

import checks
import job
import lume
import methods


def auto(name: str, lead: str = "") -> str:
    """The help text's "(default: auto = ...)" of a method option, read from the declarations
    (methods.METHODS: tiny and other models' values, each real one's source in docs/methods.md)."""
    parts = []
    for m in methods.METHODS.values():
        d = m.defaults.get(name)
        if d is not None:
            parts.append(f"{m.title} {d.tiny:g}" if d.tiny == d.real else f"{m.title} {d.tiny:g} for tiny, "
                         f"{d.real:g} otherwise")
    return f"{lead} (default: auto = {'; '.join(parts)}; the sources: docs/methods.md)"


def arg(default, help: str, **extra):
    """A Config field: its default, its --help text and any argparse extras (choices; type when the
    default is None, which means auto: resolved in parse_args, the resolved value in config.json)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)  # resolved once (resolve_auto, then memory.auto_setup on CUDA), never changed after
class Config:
    task: str = arg("1", "what is unlearned: 1, 2, 3 or all (evaluation covers every task)",
                    choices=["1", "2", "3", "all"])
    method: str = arg(methods.DEFAULT, "unlearning method (methods.py); none scores the target as it is",
                      choices=lambda: [*methods.METHODS, "none"])
    model: str = arg("tiny", "tiny (the committed target/ on the default built-in data, else built once, ~3 min on 2 cores), olmo-1b, olmo-7b (the released "
                             "SemEval targets; hub access: docs/data.md), a hub id, or a local save_pretrained directory")
    data: str = arg("auto", "the items: builtin (generated, for --model tiny), lume or semeval (the real benchmark, "
                            "fetched, verified and cached on first use: docs/data.md), or a LUME release directory / "
                            "a SemEval parquet directory (default: auto = builtin for --model tiny, lume otherwise)")
    n_docs: int = arg(None, "documents per task and split: built-in data makes this many, real data keeps the first N "
                            "(default: auto = 8 built-in documents; all documents of real data)", type=int)
    mia_data: str = arg("auto", "member/nonmember documents for the MIA AUC: mia (the official sets, fetched), none, "
                                "or a directory with member.jsonl and nonmember.jsonl (default: auto = built-in data "
                                "brings its own; real data fetches mia, skipped with a note if it cannot be). "
                                "aggregate-score needs both MIA data and MMLU, else it is -1")
    mmlu: str = arg("auto", "MMLU for the utility gate: mmlu (fetched), none, or a directory with dev/ and test/ CSVs "
                            "(default: auto = none with built-in data; real data fetches mmlu, skipped with a note "
                            "if it cannot be). aggregate-score needs both MIA data and MMLU, else it is -1")
    mmlu_limit: int = arg(0, "questions per MMLU subject, for a quick look (0 = all 14,042, as the official scorer)")
    lr: float = arg(None, "peak learning rate (default: auto = 1e-4 for --model tiny, 1e-5 for the released "
                          "targets and any other model; with --lora-rank 3e-4 for tiny, 1e-4 otherwise; RMU: "
                          "3e-3 for tiny, 5e-5 otherwise; the sources: docs/methods.md)", type=float)
    epochs: float = arg(None, "passes over the forget set (default: auto = 20 for --model tiny, 5 otherwise)",
                        type=float)
    max_steps: int = arg(None, "optimizer steps; replaces --epochs when given", type=int)
    batch_size: int = arg(4, "forget rows per micro-batch (GD, KL and NPO add as many retain rows)")
    grad_accum: int = arg(1, "micro-batches per optimizer step (losses token-normalised over the step: k "
                             "micro-batches equal one batch k times as large)")
    warmup: int = arg(0, "linear warmup steps")
    schedule: str = arg("constant", "lr after warmup", choices=["constant", "linear"])
    clip: float = arg(1.0, "gradient-norm clip (0 = off)")
    beta: float = arg(None, auto("beta", "inverse temperature of NPO and SimNPO (SimNPO's multiplies a per-token "
                                         "mean, NPO's a sequence sum)"), type=float)
    gamma: float = arg(None, auto("gamma", "SimNPO's reward margin, in the paper's convention: log sigmoid(-(beta/|y|) "
                                           "log pi - gamma); the official code's gamma is this one / beta: its "
                                           "MUSE-News beta 0.75, gamma 3.0 is --beta 0.75 --gamma 2.25 here. UNDIAL's "
                                           "adjustment of the label's logit, in (0, 100]"), type=float)
    retain_weight: float = arg(None, auto("retain_weight", "weight of the retain term (NPO with one: 'NPO-RT', 0 = "
                                                           "pure NPO; RMU's alpha); GA has none"), type=float)
    rmu_layer: int = arg(None, auto("rmu_layer", "RMU: decoder layer l (0-based) whose output is steered; layers "
                                                 "l-2..l train"), type=int)
    rmu_params: str = arg("auto", "RMU: what trains in layers l-2..l: down (mlp.down_proj only, WMDP's param_ids [6], "
                                  "for which its c, alpha and lr were tuned) or mlp (gate, up and down) (default: auto "
                                  "= down, except mlp for --model tiny, whose defaults were chosen on it)",
                          choices=["auto", "down", "mlp"])
    rmu_coeff: float = arg(None, auto("rmu_coeff", "RMU: steering coefficient c, forget activations pushed to c*u"),
                           type=float)
    chunk_size: int = arg(0, "sequential unlearning: forget items per chunk, chunks unlearned one after the other, "
                             "each for --epochs (0 = one chunk, the whole forget set)")
    retain_ratio: int = arg(1, "retain rows per forget row in every micro-batch")
    precision: str = arg("auto", "auto = fp32 on CPU; on CUDA the memory plan's pick (memory.py): bf16 autocast over "
                                 "fp32 weights if it fits. bf16-pure: bf16 weights and AdamW states, updated with "
                                 "stochastic rounding (lume.StochasticAdamW: no update lost at small lr)",
                         choices=list(lume.PRECISIONS))
    eval_precision: str = arg("auto", "weights' dtype when scoring: auto = bf16 on CUDA (as the official scorer "
                                      "loads the targets), fp32 on CPU", choices=list(lume.EVAL_PRECISIONS))
    grad_checkpointing: bool = arg(None, "recompute activations in backward (7B on one GPU) (default: auto = off, "
                                         "except where the memory plan on CUDA picks it)")
    lora_rank: int = arg(0, "LoRA rank r: train low-rank adapters over a frozen base (lora.py); 0 = off")
    lora_alpha: float = arg(0.0, "LoRA alpha: the update is (alpha/r) B A (0 = 2 * rank)")
    lora_targets: str = arg("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                            "comma-separated names of the nn.Linear layers that get adapters")
    lora_dropout: float = arg(0.0, "dropout on the adapters' input, in [0, 1)")
    train_layers: int = arg(0, "train only the last K decoder layers (fp32), the rest frozen (0 = all)")
    device: str = arg("auto", "auto, cpu, cuda, cuda:1, ...")
    max_new_tokens: int = arg(256, "generation length (the official scorer uses 256)")
    eval_batch_size: int = arg(32, "prompts per generation batch")
    eval_before: bool = arg(True, "also score the target before unlearning")
    seed: int = arg(0, "seeds data order, sampling of retain batches and torch")
    out: str = arg("", "run directory, created new; an existing non-empty one is refused, never overwritten "
                       "(default: runs/task<T>-<method>-<model>-<date>-<time>)")
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
    attacks: str = arg("", "after the after-evaluation, attack the unlearned model and score it again "
                           "(attacks.py, docs/attacks.md): comma list of quant8, quant4, relearn, unrelated, fewshot, or all; "
                           "'' = none")
    relearn_grid: str = arg("auto", "--attacks relearn's sweep of lr x steps around its recipe (attacks.GRIDS): single "
                                    "(the recipe alone), small (3 lr x 2 step counts) or full (5 x 3); the best "
                                    "attacker is scored; auto = small, single under torchrun",
                            choices=["auto", "single", "small", "full"])
    oracle: str = arg("", "a retain-only model to measure against (oracles.py, docs/attacks.md): a save_pretrained "
                          "directory or hub id, or tiny (the tiny recipe without the forget items: oracle/ for the "
                          "default data); '' = none")
    rdzv_timeout: float = arg(60.0, "torchrun: seconds to wait for every rank at MASTER_ADDR:MASTER_PORT "
                                    "before a clear error")
    # not a flag: what each auto value resolved to and why (resolve_auto), written to config.json
    resolved: dict = field(default_factory=dict)


def parser() -> argparse.ArgumentParser:
    """Every Config field as a --flag; its help ends with its default (auto ones spell out theirs)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    for f in dataclasses.fields(Config):
        if "help" not in f.metadata:  # resolved: written by resolve_auto, not given
            continue
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        choices = meta.get("choices")
        choices = choices() if callable(choices) else choices
        text = meta["help"] if "default:" in meta["help"] or f.default in ("", None) else \
            f"{meta['help']} (default: {f.default})"
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=text)
        else:
            p.add_argument(flag, type=meta.get("type", type(f.default)), default=f.default,
                           choices=choices, help=text, metavar=f.name.upper() if not choices else None)
    return p


def parse_args(argv=None) -> Config:
    """The command line as a Config, auto values resolved (after checks.preflight, so a given 0 is
    refused rather than taken for "auto"). Exits with status 2 and one `error:` line per problem."""
    p = parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.resume:
        cfg = resumed_config(cfg.resume, argv)
    problems = checks.preflight(cfg, resumed=bool(cfg.resume))
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return cfg if cfg.resume else resolve_auto(cfg)


def resolve_auto(cfg: Config) -> Config:
    """cfg with every auto value resolved, once, from the method's declaration (methods.METHODS: its
    defaults for the tiny target and for other models, each real one with its source) and the
    defaults all methods share (methods.SHARED_DEFAULTS); its `resolved` records each value and why
    (config.json). The tiny values were chosen on the built-in data (README table)."""
    is_tiny = cfg.model == "tiny"
    spec = methods.METHODS.get(cfg.method)
    values, resolved = {}, dict(cfg.resolved)  # the new Config's: field -> value, and why

    def unset(name):
        return values.get(name, getattr(cfg, name)) in (None, "auto")

    def put(name, value, why):
        values[name] = value
        resolved[name] = {"value": value, "why": why}

    def pick(name, d: methods.Default):
        put(name, d.tiny if is_tiny else d.real, methods.TINY if is_tiny else d.source)
    for name, d in (spec.defaults if spec else {}).items():
        if unset(name):
            pick(name, d)
    shared = methods.SHARED_DEFAULTS
    if cfg.lora_rank and unset("lr"):  # B starts at 0 and a rank-r update moves few directions: a larger
        pick("lr", shared["lora_lr"])  # step (tiny NPO r=8: 1e-4 forgot nothing, 2e-4 half; docs/lora.md)
    if cfg.lora_rank and not cfg.lora_alpha:
        put("lora_alpha", 2.0 * cfg.lora_rank, "2 x --lora-rank (the UNDIAL paper's rank 8, alpha 16)")
    for name in ("lr", "epochs", "beta", "gamma", "retain_weight"):
        if values.get(name, getattr(cfg, name)) is None:
            pick(name, shared[name])
    return dataclasses.replace(cfg, **values, resolved=resolved)


def resumed_config(run_dir: str, argv) -> Config:
    """The Config of the run in run_dir (its config.json, auto values resolved), to be continued there."""
    def fail(why):
        print(f"error: --resume {run_dir}: {why}", file=sys.stderr)
        raise SystemExit(2)
    if len([a for a in argv if a.startswith("--")]) > 1:
        fail("a resumed run continues with its own config.json: give no other flag")
    try:  # the marker first: nothing of a directory LUME did not make is read or written (job.read_run_config)
        saved, complete = job.read_run_config(run_dir)
    except ValueError as e:  # rundir.BadFile: the file and what is wrong with it
        fail(str(e))
    if complete:
        fail("the run is complete (results.json has its after-unlearning scores)")
    for f in dataclasses.fields(Config):  # config.json's values as argparse (or resolve_auto) would have made them
        v, choices = saved.get(f.name, f.default), f.metadata.get("choices")
        choices = choices() if callable(choices) else choices
        if f.default is dataclasses.MISSING:  # resolved: {option: {value, why}}, recorded, not read back
            want, ok = dict, isinstance(v, dict)
        else:
            want = f.metadata.get("type") or (bool if f.type in (bool, "bool") else type(f.default))
            ok = (v is None and f.default is None) or (type(v) is want) or (want is float and type(v) is int)
        if not ok or (choices and v not in choices):
            fail(f"{Path(run_dir) / 'config.json'}: {f.name} is {json.dumps(v)[:80]}, not a {want.__name__}"
                 + (f" in {choices}" if choices else ""))
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{**{k: v for k, v in saved.items() if k in names}, "resume": run_dir, "out": run_dir})


def main(argv=None) -> int:
    """The command: exit status 0, 2 for anything the user can fix before the run (one `error:` line
    each, no traceback), or job.main's status for a run that failed later (the run directory marked
    failed in its status.json)."""
    cfg = parse_args(argv)
    try:
        job.main(cfg)
    except job.UserError as e:  # bad data found while reading it: before the run directory exists
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # a one-line error before the run directory exists (model, fetch, torchrun)
        if isinstance(e.code, str):
            print(e.code if e.code.startswith("error:") else f"error: {e.code}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
