"""
How a run ends, as a user and a scheduler see it: status.json (running, complete, or failed with
the reason and the next step), SIGTERM handled like Ctrl-C, and the last line of a failed run.
job.py runs the run; this says how it went.

    status.json   {"status": "failed", "reason": "terminated (SIGTERM)", "next": "continue it with: ..."}
    exit status   130 Ctrl-C, 143 SIGTERM, 1 any other failure (2: bad input, before any work)
"""
import contextlib
import errno
import os
import sys
import time
from pathlib import Path

import torch

import checkpoint
import lume
import rundir


@contextlib.contextmanager
def on_sigterm():
    """SIGTERM ends the run like Ctrl-C (checkpoint.on_sigterm), where a handler can be set (the main thread)."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, checkpoint.on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
        checkpoint.TERM.update(defer=False, asked=False)


def write_status(out: Path, status: str, **fields) -> None:
    """status.json: running, complete or failed (with the reason and what to do next); reserved at
    its full size, so that a full disk cannot keep it from saying failed (rundir.write_status)."""
    rundir.write_status(out / "status.json", {"status": status, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                  **fields})


def failed(out: Path, e: BaseException, cfg, rank0: bool = True) -> SystemExit:
    """Mark the run directory failed, print why and what to do next as the last line, and return the
    SystemExit to end with (130 after Ctrl-C, 1 otherwise). What the run completed stays as it is."""
    checkpoints = (out / "checkpoints" / "latest.json").is_file()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: the same launch (or another N: resharded)
    launch = f"torchrun --nproc_per_node {world} run.py" if world > 1 else "python run.py"
    again = (f"continue it with: {launch} --resume {out}" if checkpoints else
             "run it again with a new --out (add --save-every N to be able to resume)")
    code = 1
    if isinstance(e, KeyboardInterrupt):
        reason, code = "interrupted (Ctrl-C)", 130
    elif isinstance(e, checkpoint.Terminated):
        reason, code = "terminated (SIGTERM)", 143
    elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = f"{e.strerror} writing {e.filename or out}"
        again = f"free space, then continue it with: python run.py --resume {out}"
    elif isinstance(e, lume.TrainingDiverged):
        reason, again = lume.first_line(e), "lower --lr, or see the message above; " + again
    elif isinstance(e, torch.OutOfMemoryError):
        reason = lume.first_line(e)
        again = ("lower --batch-size / --eval-batch-size, add --grad-checkpointing, or see "
                 "`python memory.py`; " + again)
    elif isinstance(e, SystemExit):
        reason = str(e.code).removeprefix("error: ") if isinstance(e.code, str) else f"exit {e.code}"
    elif isinstance(e, (checkpoint.CheckpointError, rundir.BadFile)):  # a file of the run, not a bug
        reason, again = lume.first_line(e).split(": ", 1)[1], "start it again with a new --out"
    else:  # not something a user caused: keep the traceback for the report
        import traceback
        traceback.print_exception(e)
        reason = lume.first_line(e)
        again = ("this is a bug: please report it with the traceback above; "
                 + (again if not cfg.resume else "run it again with a new --out"))  # a resume would fail again
    done = [name for name in ("results.json", "trajectory.jsonl", "log.jsonl") if (out / name).is_file()]
    if rank0:
        write_status(out, "failed", reason=reason, next=again, completed=done)
        print(f"error: run failed: {reason}. Kept in {out}: {', '.join(done) or 'config.json only'} "
              f"(status.json says failed). Next: {again}", file=sys.stderr, flush=True)
    return SystemExit(code)
