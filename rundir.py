"""
The files of a run directory, and of any directory LUME writes or reads.

Writing: every file and model directory is written beside its place and renamed into it
(write_atomic, write_json_atomic, write_jsonl_atomic, save_model), so no reader sees half a file.

Reading: a directory someone else wrote (a run directory sent to you, a data or model directory)
is untrusted input: only regular files inside it are opened, bounded in size, and every JSON read
ends in one line naming the file and what is wrong (BadFile) rather than a traceback or a hang.

    text = rundir.read_json(run_dir, "checkpoints/latest.json", limit=rundir.SMALL, kind=dict)

How a file is opened (open_in): each directory on the way down from the directory named by the
user is opened with O_NOFOLLOW|O_DIRECTORY relative to the one before it (openat), and the file
itself with O_NOFOLLOW|O_NONBLOCK, then fstat'd: a symbolic link anywhere inside, a '..', a FIFO
(which would block a plain open forever), a device (/dev/zero would fill the memory) or a
directory where a file belongs is refused, and so is a file over the limit its reader gives.
The directory the user named may itself be a symbolic link: that is their choice, not the
sender's.

A run directory is recognised by MARKER, written when the run directory is made (job.py):
--resume of a directory without it (a model directory, an older LUME's run, a typo) is refused
before anything is written there.
"""
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import lume

MARKER = ".lume-run"  # {"lume": "run", "version": VERSION}, written first into every run directory
VERSION = 3  # run directories of this layout: checkpoints FORMAT 3, sha256-checked (checkpoint.py)
SMALL = 1 << 20          # a pointer, a manifest, a marker: 1 MB is far more than one needs
JSON_LIMIT = 1 << 30     # config, results, a checkpoint's state.json, scores: 1 GB
DEPTH = 200              # JSON nested deeper than this is refused (json would recurse until RecursionError)


class BadFile(ValueError):
    """A file that cannot be used as it is: str(e) is one line, '<path>: <what is wrong>'."""

    def __init__(self, path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = str(path), why


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def parts(rel) -> list[str]:
    """rel as path components, each a plain name: BadFile for an absolute path, '', '.' or '..'."""
    text = rel.as_posix() if isinstance(rel, Path) else rel
    bits = text.split("/") if isinstance(text, str) else []
    if not bits or any(b in ("", ".", "..") or "\\" in b or "\0" in b for b in bits):
        raise BadFile(rel, "not a plain relative path inside its directory: refused")
    return bits


def open_dir(root, rel="") -> int:
    """A descriptor of the directory root/rel, every component of rel a real directory (no symlink)."""
    root = Path(root)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise BadFile(root, "missing" if e.errno == errno.ENOENT else f"cannot be opened ({e.strerror})") from None
    where = root
    for name in (parts(rel) if rel else []):
        where = where / name
        try:
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except OSError as e:
            os.close(fd)
            raise _why(where, e, "a directory") from None
        os.close(fd)
        fd = nxt
    return fd


def _why(path, e: OSError, wanted: str) -> BadFile:
    """What an open refused with O_NOFOLLOW means, as a BadFile."""
    if e.errno == errno.ENOENT:
        return BadFile(path, "missing")
    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        try:
            mode = os.lstat(path).st_mode
            what = _kind(mode) if not stat.S_ISREG(mode) else "not a directory"
        except OSError:
            what = "not reachable"
        return BadFile(path, f"{what} where {wanted} belongs: refused (only regular files inside the directory "
                             "are read, no link is followed)")
    return BadFile(path, f"cannot be opened ({e.strerror})")


def open_in(root, rel, limit: int | None = JSON_LIMIT) -> tuple[int, int]:
    """(descriptor, size) of the regular file root/rel opened read-only (see the module docstring);
    BadFile otherwise or when it is over `limit` bytes."""
    bits = parts(rel)
    dfd = open_dir(root, "/".join(bits[:-1]))
    path = Path(root, *bits)
    try:
        fd = os.open(bits[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as e:
        raise _why(path, e, "a file") from None
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BadFile(path, f"{_kind(st.st_mode)} where a file belongs: refused (only regular files are read)")
    if limit is not None and st.st_size > limit:
        os.close(fd)
        raise BadFile(path, f"{st.st_size:,} bytes, more than the {limit:,} such a file can have: refused")
    return fd, st.st_size


def read_bytes(root, rel, limit: int | None = JSON_LIMIT) -> bytes:
    """The bytes of the regular file root/rel (open_in), at most `limit` even if it grows."""
    fd, size = open_in(root, rel, limit)
    with os.fdopen(fd, "rb") as f:
        data = f.read(size + 1 if limit is None else min(size, limit) + 1)
    if limit is not None and len(data) > limit:
        raise BadFile(Path(root, rel), f"more than the {limit:,} bytes such a file can have: refused")
    return data


def _no_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def _depth(obj, path):
    stack = [(obj, 0)]
    while stack:  # iterative: a deep structure must not recurse here either
        value, level = stack.pop()
        if level > DEPTH:
            raise BadFile(path, f"JSON nested more than {DEPTH} levels deep: refused")
        if isinstance(value, dict):
            stack.extend((v, level + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, level + 1) for v in value)


def parse_json(data: bytes, path, kind=None, line: int | None = None):
    """json.loads of data that names `path` (and its line) in one line when it is not JSON, holds
    NaN/Infinity, is nested too deep, or is not of type `kind`."""
    where = f"{path} line {line}" if line else str(path)
    try:
        obj = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise BadFile(where, f"JSON nested more than {DEPTH} levels deep: refused") from None
    except UnicodeDecodeError as e:
        raise BadFile(where, f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # JSONDecodeError; int() of a number over 4300 digits; NaN
        raise BadFile(where, f"not valid JSON ({str(e).splitlines()[0][:200]})") from None
    _depth(obj, where)
    if kind is not None and not isinstance(obj, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BadFile(where, f"JSON {type(obj).__name__} where a {names.replace('dict', 'object')} belongs")
    return obj


def read_json(root, rel, limit: int | None = JSON_LIMIT, kind=dict):
    """The JSON document root/rel (read_bytes, then parse_json)."""
    return parse_json(read_bytes(root, rel, limit), Path(root, rel), kind)


def read_jsonl(root, rel, limit: int | None = JSON_LIMIT, kind=dict) -> list:
    """The rows of the JSON Lines file root/rel, each of type kind; blank lines skipped."""
    data = read_bytes(root, rel, limit)
    return [parse_json(line, Path(root, rel), kind, n) for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]


def sha256_in(root, rel) -> tuple[str, int]:
    """(sha256 hex, bytes) of the regular file root/rel, streamed in 16 MB chunks."""
    fd, _ = open_in(root, rel, None)
    h, n = hashlib.sha256(), 0
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _fsync(path, flag: int) -> None:
    fd = os.open(path, os.O_RDONLY | flag | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path) -> None:
    """Flush a file just written (opened again without following a link) to the disk."""
    _fsync(path, os.O_NOFOLLOW)


def fsync_dir(path) -> None:
    """Flush a directory's entries (a rename into it, a new file) to the disk."""
    _fsync(path, os.O_DIRECTORY)


def real_dir(path) -> bool:
    """True when path is a directory itself (not a symbolic link to one); False when absent;
    BadFile when it is anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(mode):
        raise BadFile(path, f"{_kind(mode)} where a directory belongs: refused (a run directory's own "
                            "directories are never links)")
    return True


# -----------------------------------------------------------------------------
# the marker: a run directory is recognised before anything is written to it


def mark(out) -> None:
    """Write MARKER into a run directory just made (exclusive: an existing one is never replaced)."""
    fd = os.open(Path(out) / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"lume": "run", "version": VERSION}) + "\n")


def check_marker(run_dir) -> None:
    """BadFile unless run_dir holds this version's MARKER: a directory LUME did not make as a run
    directory (a model directory has a config.json too) is never written into by --resume."""
    try:
        marker = read_json(run_dir, MARKER, SMALL)
    except BadFile as e:
        if e.why != "missing":
            raise
        if not os.path.lexists(Path(run_dir) / "config.json"):
            raise BadFile(Path(run_dir) / MARKER, "missing, and no config.json there (not a run directory)") from None
        raise BadFile(Path(run_dir) / MARKER, "missing: not a run directory LUME made (a model directory or an older "
                                              "LUME's run is never written into): start a new run with --out") from None
    if marker.get("lume") != "run" or marker.get("version") != VERSION:
        raise BadFile(Path(run_dir) / MARKER, f"a run directory of layout {marker.get('version')!r}, this LUME resumes "
                                              f"layout {VERSION}: start it again with a new --out")


def read_run_config(run_dir) -> tuple[dict, bool]:
    """(config.json of the run in run_dir, whether it is complete), read as a hostile directory is
    (rundir): BadFile, one line, when run_dir is not a LUME run directory or a file is bad."""
    check_marker(run_dir)
    config = read_json(run_dir, "config.json", limit=SMALL)
    done = read_json(run_dir, "results.json") if os.path.lexists(Path(run_dir) / "results.json") else {}
    return config, "after" in done


def read_prior(out: Path, resume: dict | None, table=None) -> dict:
    """What a resumed run keeps, read before anything is written: the stages its directory already
    holds (not scored again) and the log.jsonl rows before its checkpoint's step (all of them are
    dropped without one). Each file one `error:` line when it is not what a run writes; table:
    report.table, which the results must go through at the end of the run."""
    def rows(name):
        return read_jsonl(out, name) if os.path.lexists(out / name) else []
    try:
        scored = {"generations": [], "mia": [], "results": {}}
        if os.path.lexists(out / "results.json"):
            scored = {"generations": rows("generations.jsonl"), "mia": rows("mia.jsonl"),
                      "results": read_json(out, "results.json")}
            try:  # what the run prints from it at the end
                (table or (lambda r: r))({k: v for k, v in scored["results"].items() if k in ("before", "after")})
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise BadFile(out / "results.json", f"not a run's results ({lume.first_line(e)})") from None
        log = [r for r in rows("log.jsonl") if type(r.get("step")) is int and r["step"] < (resume or {}).get("step", 0)]
    except BadFile as e:
        raise SystemExit(f"error: --resume {out}: {e}") from None
    return {**scored, "log": log}


# -----------------------------------------------------------------------------
# one process per run directory (the lock) and a status that a full disk cannot stop


class Locked(Exception):
    """Another process holds the lock file `path`; `holder`: the PID it wrote there."""

    def __init__(self, path, holder: str):
        super().__init__(f"{path} is held by process {holder or '?'}")
        self.path, self.holder = path, holder


def hold_lock(path, wait: bool = False) -> int:
    """An exclusive advisory lock (fcntl.flock) on the file path, held until the returned descriptor
    is closed or the process ends (the kernel drops it even after SIGKILL, so a crash never leaves a
    stale lock); the holder's PID is written in it. wait=False: Locked at once if another holds it.
    The file is opened without following a link, and used only when it is a regular file of its own
    (one link): BadFile otherwise, so a planted .lock never truncates a file elsewhere."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _why(path, e, "a lock file") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise BadFile(path, f"{_kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else 'a hard link'} "
                                   "where the lock file belongs: refused (remove it if it is yours)")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise Locked(path, holder) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:  # a full disk: the lock holds all the same, only the PID goes unsaid
        pass
    return fd


def lock_run(run_dir) -> int:
    """The run directory's lock (<run>/.lock), held for the run's life: a second run or --resume of
    the same directory is refused in one line naming the PID that holds it."""
    try:
        return hold_lock(Path(run_dir) / ".lock")
    except Locked as e:
        raise SystemExit(f"error: {run_dir} is in use by another LUME process (PID {e.holder or '?'}, "
                         f"{Path(run_dir) / '.lock'}): wait for it to end, or stop it, before --resume") from None
    except BadFile as e:
        raise SystemExit(f"error: {e}") from None


STATUS_BYTES = 4096  # status.json's reserved size


def _status_text(obj: dict, size: int | None) -> str:
    """obj as JSON padded with spaces to `size` (JSON allows trailing spaces); when it is longer, its
    longest strings are shortened (never cut mid-string) until it fits."""
    text = json.dumps(obj, indent=2)
    while len(text.encode()) > size - 1:
        key = max((k for k, v in obj.items() if isinstance(v, str)), key=lambda k: len(obj[k]), default=None)
        if key is None or len(obj[key]) < 8:
            obj = {k: v for k, v in obj.items() if k in ("status", "time")}
            text = json.dumps(obj, indent=2)
            break
        obj = {**obj, key: obj[key][: len(obj[key]) // 2] + "..."}
        text = json.dumps(obj, indent=2)
    return text + " " * max(0, size - 1 - len(text.encode())) + "\n"


def write_status(path, obj: dict) -> None:
    """status.json, written atomically in full and padded to at least STATUS_BYTES; when the disk is
    full, rewritten in place (opened without following a link) in the blocks reserved by the first
    write, its longest strings shortened to fit, so a run can still say it failed and why."""
    text = json.dumps(obj, indent=2)
    text += " " * max(0, STATUS_BYTES - 1 - len(text.encode())) + "\n"  # whole, however long
    try:
        write_atomic(path, lambda tmp: tmp.write_text(text), len(text))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            raise e from None
        with os.fdopen(fd, "r+b") as f:  # the same size: no new block is needed
            size = os.fstat(f.fileno()).st_size
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode) or size < 64:
                raise e from None
            f.write(_status_text(obj, size).encode()[:size])
            f.flush()
            os.fsync(f.fileno())


# -----------------------------------------------------------------------------
# writing: atomic, never a silent overwrite (run directories, the tiny target, checkpoints)


def write_atomic(path, write, needed: int | None = None) -> None:
    """write(tmp) beside path, then one rename: no reader sees half a file. tmp is unique per attempt
    (a killed writer's leftover never blocks the next, even as PID 1) and removed on any failure; out
    of space is an OSError(ENOSPC) naming path, saying how much it was writing (needed bytes)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) and e.filename != str(path):
            more = f" (it needs about {needed / 1e6:.2f} MB)" if needed else ""
            raise OSError(e.errno, f"no space left on device{more}", str(path)) from None
        raise


def write_json_atomic(path, obj) -> None:
    data = (json.dumps(obj, indent=2) + "\n").encode()
    write_atomic(path, lambda tmp: tmp.write_bytes(data), len(data))


def write_jsonl_atomic(path, rows) -> None:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    write_atomic(path, lambda tmp: tmp.write_bytes(data), len(data))


def save_model(model, tok, path) -> None:
    """save_pretrained (safetensors) and the tokenizer into a temporary directory, then one rename."""
    assert not Path(path).exists(), f"{path} exists; refusing to overwrite a checkpoint"
    lume.quiet_transformers()

    def write(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    write_atomic(path, write)
