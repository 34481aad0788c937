"""Fetch the real LUME benchmark data on first use: download, verify against pinned sha256, cache.

Four sources, each a directory that a loader of data.py reads (docs/data.md: licences, mirrors,
running offline):
  lume     the LUME release: forget.jsonl, retain.jsonl   GitHub amazon-science/lume-llm-unlearning
  semeval  SemEval-2025 Task 4 split: 4 parquet files     Hugging Face dataset (gated), data/
  mia      official MIA sets: member.jsonl, nonmember     Hugging Face dataset (gated), mia_data/
  mmlu     MMLU dev/val/test CSVs, 57 subjects            GitHub hiyouga/LLaMA-Factory, mmlu.zip
GitHub files come over plain HTTPS from a pinned commit (the base is overridable for mirrors and
tests: LUME_DATA_URL, LUME_MMLU_URL); the gated repository through huggingface_hub, which honours
HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE.

Every file a loader reads is pinned at the end of this file by its sha256: those of the files the
released targets memorised. A file that differs is an error naming it, never a silent change of
benchmark. A source is downloaded into a fresh directory beside its place in the cache, verified,
then renamed into place in one step, so <cache>/data/<name>/ exists only complete; later runs
read it (re-hashed, milliseconds) without touching the network.

    python data.py fetch [--to DIR]       # all four, ahead of a GPU job without network
    python -c "import fetch; print(fetch.resolve('lume', fetch.default_cache()))"
"""
import hashlib
import http.client
import io
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = 10.0  # seconds per socket operation, one try and no retries: nothing reachable answers fast
MAX_BYTES = 64 << 20  # the largest pinned download is 2.3 MB; a server sending more is not serving it
MAX_MEMBER = 8 << 20  # an archive member unpacks to at most this: every pinned MMLU file is well under it


@dataclass(frozen=True)
class Source:
    what: str       # for messages
    kind: str       # 'http' (files under base/remote), 'zip' (archive base/remote), 'hub' (gated dataset)
    base: str       # default base URL (GitHub raw at the pinned commit), or the hub repo id
    remote: str     # folder of the files under the base, or the archive's path under it
    revision: str   # the pinned commit (GitHub) or revision (hub)
    flag: str       # the run.py flag that takes a local directory instead
    files: dict     # path in the local directory -> pinned sha256
    env: str = ""   # variable that overrides the base (mirrors, tests)
    inside: str = ""          # zip: folder of the files inside the archive
    archive_sha256: str = ""  # zip: the pinned archive (a mirror's re-pack may differ; its files may not)
    without: str = ""         # what a run loses without it


class Unreachable(Exception):
    """A source could not be fetched (offline, refused, gated, timed out, cut short)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason.rstrip(".")  # messages add their own full stop


def default_cache() -> Path:
    """The project's cache root: $LUME_CACHE, else ~/.cache/lume (as run.py's --cache-dir)."""
    return Path(os.environ.get("LUME_CACHE") or Path.home() / ".cache" / "lume").expanduser()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


# -----------------------------------------------------------------------------
# the API: resolve one source, fetch all


def resolve(name: str, cache_dir, *, required: bool = True, log=print) -> tuple[Path | None, dict]:
    """(directory a data.py loader reads, record for config.json) of source `name`: from the cache
    <cache_dir>/data/<name>/ (verified again, no network), else fetched, verified and cached.
    record = {source, url, revision, path, sha256: {file: digest}}. When the source cannot be
    reached: required -> SystemExit with one line (what, from where, the two ways out); otherwise
    (None, {source, url, error}) and one logged note. A file that does not match its pinned
    checksum is a SystemExit naming it either way."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}: expected one of {', '.join(SOURCES)}")
    src = SOURCES[name]
    try:
        return _resolve(name, Path(cache_dir).expanduser(), log)
    except Unreachable as e:
        if required:
            raise SystemExit(f"error: cannot fetch {src.what} from {e.where}: {e.reason}. {_ways_out(src)}") from None
        log(f"note: cannot fetch {src.what} from {e.where} ({e.reason}); the run goes on without "
            f"it{src.without}. {_ways_out(src)}")
        return None, {"source": name, "url": e.where, "error": e.reason}


def fetch_all(to=None, log=print) -> dict[str, dict]:
    """Fetch and verify every source into the cache root `to` (default: default_cache()), ahead of
    a job on a machine without network; print where each went and what was verified. Exits with
    one line naming what could not be fetched (the rest is kept)."""
    root = Path(to).expanduser() if to else default_cache()
    records, failed = {}, []
    for name, src in SOURCES.items():
        try:
            records[name] = _resolve(name, root, log)[1]
        except Unreachable as e:
            log(f"{name}: cannot fetch {src.what} from {e.where}: {e.reason}. {_ways_out(src, fetching=True)}")
            failed.append(name)
    log(f"cache {root}:" if records else f"cache {root}: nothing fetched")
    for name, rec in records.items():
        log(f"  {name:8s} {rec['path']}  {len(rec['sha256'])} files, sha256 verified  "
            f"({rec['url']} @ {rec['revision']})")
    if failed:
        raise SystemExit(f"error: could not fetch {', '.join(failed)} (see above); "
                         f"{', '.join(records) or 'nothing'} verified in {root / 'data'}")
    log(f"on a machine without network: LUME_CACHE={root} python run.py ...")
    return records


def local_record(path) -> dict:
    """config.json record of a local directory: the sha256 of every file under it (hidden ones
    skipped) and `matches`, the sources whose pinned files are all among them, wherever placed."""
    root = Path(path)
    files = [p for p in sorted(root.rglob("*")) if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    sums = {p.relative_to(root).as_posix(): sha256_file(p) for p in files}
    have = set(sums.values())
    return {"source": "local", "path": str(root.resolve()), "sha256": sums,
            "matches": [n for n, s in SOURCES.items() if set(s.files.values()) <= have]}


def _ways_out(src: Source, fetching: bool = False) -> str:
    """The two ways out of a source that cannot be fetched (`fetching`: said to `python data.py fetch`)."""
    if src.kind == "hub":
        fix = "log in with `hf auth login` or set HF_TOKEN (the dataset is gated: accept its terms on its page first)"
    elif fetching:
        fix = f"set {src.env} to a mirror this machine can reach"
    else:
        fix = (f"run `python data.py fetch --to DIR` where there is network and set LUME_CACHE=DIR "
               f"(or set {src.env} to a mirror)")
    return f"Either {fix}, or pass a local directory with {src.flag}" + (" to run.py." if fetching else ".")


# -----------------------------------------------------------------------------
# the cache: verified on every read, published by one rename


def _resolve(name: str, cache: Path, log) -> tuple[Path, dict]:
    src, dest = SOURCES[name], cache / "data" / name
    if dest.is_dir():
        how = "from cache"
    else:
        _publish(name, src, dest, log)
        how = "fetched"
    sums = verify_dir(dest, src)
    meta = dest / "source.json"  # absent when the files were placed there by hand
    try:
        rec = json.loads(meta.read_text()) if meta.is_file() else {"source": name, "url": None,
                                                                  "revision": src.revision}
        rec = {**rec}  # an object, or TypeError below
    except (OSError, ValueError, TypeError, RecursionError) as e:
        raise SystemExit(f"error: {meta}: not the record a fetch writes ({_one_line(e)}); remove {dest} to fetch "
                         "it again") from None
    log(f"data: {name} {how}: {dest} ({len(sums)} files, sha256 verified)")
    return dest, {**rec, "path": str(dest), "sha256": sums}


def verify_dir(folder: Path, src: Source) -> dict[str, str]:
    """{file: sha256} of the source's pinned files in folder; SystemExit naming the first that is
    missing or differs (a cache edited after it was verified)."""
    sums = {}
    for rel, pinned in src.files.items():
        path = folder / rel
        if not path.is_file():
            raise SystemExit(f"error: {path}: missing from the cached {src.what}; delete {folder} to fetch "
                             "it again")
        sums[rel] = sha256_file(path)
        if sums[rel] != pinned:
            raise SystemExit(f"error: {path}: sha256 {sums[rel]} is not the pinned {pinned}: the file changed "
                             f"after it was fetched and verified; delete {folder} to fetch it again")
    return sums


def _publish(name: str, src: Source, dest: Path, log) -> None:
    """Fetch into a fresh staging directory beside dest, then rename it to dest: an interrupted
    fetch leaves only a hidden '.<name>.partial-*' directory, which nothing reads."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=dest.parent))
    except OSError as e:
        raise SystemExit(f"error: cannot write the cache {dest.parent} ({_one_line(e)}); set LUME_CACHE to "
                         "a writable directory") from None
    try:
        log(f"data: fetching {src.what} into {dest}")
        record = FETCHERS[src.kind](name, src, staging, log)
        (staging / "source.json").write_text(json.dumps(record, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; a shared cache must stay readable
        try:
            os.rename(staging, dest)  # one step: dest appears complete or not at all
        except OSError:
            if not dest.is_dir():
                raise
            log(f"data: {dest} appeared meanwhile (another process fetched it); using that one")
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename


def _check(data: bytes, pinned: str, rel: str, url: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != pinned:
        raise SystemExit(f"error: {rel} from {url} does not match its pinned checksum: sha256 {got} "
                         f"({len(data)} bytes), pinned {pinned}. Refused: the benchmark is the files the "
                         "released targets memorised, pinned in fetch.py, and must not change silently")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# -----------------------------------------------------------------------------
# fetchers: each writes the verified files into staging and returns the record


def download(url: str) -> bytes:
    """The body of url in one try, TIMEOUT per socket operation; Unreachable on any network failure
    and on a body shorter than its Content-Length (urllib's read() returns a short body silently)."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            size, chunks, n = r.headers.get("Content-Length"), [], 0
            while chunk := r.read(1 << 20):
                n += len(chunk)
                if n > MAX_BYTES:
                    raise Unreachable(url, f"more than {MAX_BYTES >> 20} MB, larger than any pinned file")
                chunks.append(chunk)
    except urllib.error.HTTPError as e:
        raise Unreachable(url, f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise Unreachable(url, str(e.reason)) from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, malformed or cut chunked bodies
        raise Unreachable(url, _one_line(e)) from None
    if size is not None and size.isdigit() and n != int(size):
        raise Unreachable(url, f"the connection closed after {n} of {size} bytes")
    return b"".join(chunks)


def _base(src: Source) -> str:
    return (os.environ.get(src.env) or src.base).rstrip("/")


def _fetch_http(name: str, src: Source, staging: Path, log) -> dict:
    base = _base(src)
    for rel, pinned in src.files.items():
        url = f"{base}/{src.remote}/{rel}"
        data = download(url)
        _check(data, pinned, rel, url)
        _write(staging / rel, data)
    return {"source": name, "url": base, "revision": src.revision}


def _fetch_zip(name: str, src: Source, staging: Path, log) -> dict:
    base = _base(src)
    url = f"{base}/{src.remote}"
    blob = download(url)  # at most MAX_BYTES: the archive itself is bounded
    digest = hashlib.sha256(blob).hexdigest()
    if digest != src.archive_sha256:  # the files are what is pinned; the archive's bytes may differ
        log(f"note: {url} is not the pinned archive (sha256 {digest}, pinned {src.archive_sha256}: a "
            "mirror's re-pack?); each file in it is verified against its pinned checksum")
    try:
        archive = zipfile.ZipFile(io.BytesIO(blob))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as e:
        raise SystemExit(f"error: {url} ({len(blob)} bytes, sha256 {digest}) is not a zip archive "
                         f"({_one_line(e)})") from None
    for rel, pinned in src.files.items():
        _unpack_member(archive, f"{src.inside}/{rel}", pinned, staging / rel, f"{url} ({src.inside}/{rel})", url)
    return {"source": name, "url": base, "revision": src.revision, "archive": src.remote,
            "archive_sha256": digest}


def _unpack_member(archive, member: str, pinned: str, dest: Path, where: str, url: str) -> None:
    """Stream one pinned member of the archive into dest, in chunks: at most MAX_MEMBER bytes ever
    unpacked (whatever the archive declares), the sha256 computed on the way. Anything zipfile or
    zlib raise (bad CRC, encryption, an unknown method, a corrupt stream) is one line naming it."""
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise SystemExit(f"error: {url} has no {member}: not the pinned archive") from None
    if info.file_size > MAX_MEMBER:
        raise SystemExit(f"error: {where}: declares {info.file_size} bytes unpacked, more than any pinned file "
                         f"({MAX_MEMBER >> 20} MB); refused")
    h, n = hashlib.sha256(), 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with archive.open(info) as f, open(dest, "wb") as out:
            while chunk := f.read(1 << 20):  # zipfile inflates at most this much per read
                n += len(chunk)
                if n > MAX_MEMBER:
                    raise SystemExit(f"error: {where}: unpacks to more than {MAX_MEMBER >> 20} MB, more than any "
                                     "pinned file; refused")
                h.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError, ValueError) as e:
        dest.unlink(missing_ok=True)
        raise SystemExit(f"error: {where}: cannot be unpacked ({_one_line(e)}); the archive is damaged or not "
                         "the pinned one") from None
    if h.hexdigest() != pinned:
        dest.unlink(missing_ok=True)
        raise SystemExit(f"error: {member} from {url} does not match its pinned checksum: sha256 {h.hexdigest()} "
                         f"({n} bytes), pinned {pinned}. Refused: the benchmark is the files the released targets "
                         "memorised, pinned in fetch.py, and must not change silently")


def _fetch_hub(name: str, src: Source, staging: Path, log) -> dict:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/datasets/{src.base}"
    try:  # optional dependency (installed with transformers): only the gated sources need it
        from huggingface_hub import snapshot_download
    except ImportError:
        raise Unreachable(url, "huggingface_hub is not installed (pip install huggingface_hub)") from None
    try:  # into the hub's own cache: files a user already has (HF_HUB_OFFLINE too) are not fetched again
        snap = Path(snapshot_download(src.base, repo_type="dataset", revision=src.revision,
                                      allow_patterns=[f"{src.remote}/{rel}" for rel in src.files],
                                      etag_timeout=TIMEOUT))
    except Exception as e:  # offline, gated without a token, no such revision: OSError, ValueError, httpx
        raise Unreachable(url, _one_line(e)) from None
    for rel, pinned in src.files.items():
        file = snap / src.remote / rel
        if not file.is_file():
            raise SystemExit(f"error: {url} has no {src.remote}/{rel} at revision {snap.name}: "
                             f"not the repository of {src.what}")
        data = file.read_bytes()
        _check(data, pinned, rel, f"{url} ({src.remote}/{rel} at {snap.name})")
        _write(staging / rel, data)
    # the hub cache's snapshot folder is named by the commit the revision resolved to
    commit = snap.name if len(snap.name) == 40 else src.revision
    return {"source": name, "url": url, "revision": commit}


FETCHERS = {"http": _fetch_http, "zip": _fetch_zip, "hub": _fetch_hub}

# -----------------------------------------------------------------------------
# the pinned sources: where each comes from, and the sha256 of every file (docs/data.md)

LUME_COMMIT = "b2fa8f9c567715f1e2c6d442213f33b2e9a28fe6"  # 'Adding validation data from SemEval challenge'
MMLU_COMMIT = "465ee8119aa489a41bee0b01b3c105a2f3dd137f"  # LLaMA-Factory 'add MMLU and C-Eval script'
SEMEVAL_REPO = "llmunlearningsemeval2025organization/semeval25-unlearning-dataset-public"
# No commit of the gated repository could be read here (no hub access); the checksums pin its
# content, and the record names the commit that 'main' resolved to when it was fetched.
SEMEVAL_REVISION = "main"
_AGG = ", so aggregate-score will be -1 (official scorer: it needs both MMLU and the MIA sets)"


def _sums(text: str) -> dict[str, str]:
    """{path: sha256} of `sha256sum` output lines."""
    return {p.removeprefix("./"): h for h, p in (line.split() for line in text.strip().splitlines())}


# the 171 CSVs of MMLU (../shared/mmlu/SHA256SUMS; identical to those inside the pinned mmlu.zip)
_MMLU_SHA256SUMS = """
bd8c73f3c75bea9db82d281d9da6949cea687b987dba24a142c638e758046624  dev/abstract_algebra_dev.csv
0985685cf5ab13ccc1629f03a1308a9add8767582ffeb195b68b18c3415c9993  dev/anatomy_dev.csv
bb03eca519a3fbc04017dc4783635763ac928f0811ce6243dbcbf0d526dbe1e3  dev/astronomy_dev.csv
7cd487e4ba7d9fe423bcc259ad852e963dc370629b8d61881b61ed0ae84c0b46  dev/business_ethics_dev.csv
13c88c266cf2a8aa20a062e9b901ee372431e75669fa3c80865613fa2b7f61af  dev/clinical_knowledge_dev.csv
31f4ae0707ba3f742e0d5546ff970949be8a05e217921fe87b1814d6a0ab8184  dev/college_biology_dev.csv
9ba27ba571b8ad40d35a2a88a60acf434ca5f37962c2eba8f9d0aa89edb4c1c7  dev/college_chemistry_dev.csv
fc1a43187cd68390d663e0a1849688b13a4cd75ab17616558f4e584a4a8ae2bd  dev/college_computer_science_dev.csv
27731ee1402e720ee01ad6fa6a969a0d0978a0e9b4c385d328a61869a43f321f  dev/college_mathematics_dev.csv
63928a944fda769d7e52a3a4549d4f37f094896e65e7db35029261e1ae79909b  dev/college_medicine_dev.csv
6e043d6c566091c5ad1d8bc1d002900e1aa0bff114f98d5e3f2e4f645efce100  dev/college_physics_dev.csv
09e276300dbd2d07906dbe4ff82aabf45b9765f933eb7d0f35ea3ea97dee8020  dev/computer_security_dev.csv
5e65be1f6fdd82f4887e3747af790a747191b1b732dd2bea76306388d5ee3719  dev/conceptual_physics_dev.csv
7a01a925199c246decd0f1fc7a1b8dc28136b19d793e5b1e0d97142c118a2940  dev/econometrics_dev.csv
5aad11b1d1c8dc1a431c3e79a047cba56d691a60403ddffaf5fbd45e9c82bc0d  dev/electrical_engineering_dev.csv
9aca9cd215b7c170020fd5f7db1c9c3d5cbf6df9ee7b970a4810649a87245011  dev/elementary_mathematics_dev.csv
e4b579358ed4878f6c91bfea0ccc51efdd15a28401f86da9ee8f6c0af37cf36d  dev/formal_logic_dev.csv
685577fc3f0bf09a3f5c741ef062d6328aec843069862b83b64eb3638466505f  dev/global_facts_dev.csv
6a200085c150794846d4bab43bb0e22ceec9f99576dfc25f5c5d8faa9595ae13  dev/high_school_biology_dev.csv
1ba44aeea98ca22342b6525a3a9ebb62003b2a8289fa42d7c844e2139557ec5b  dev/high_school_chemistry_dev.csv
5de3800dfbbfaa89050413a765deaf774fdb0611e370951383fb50fac774663e  dev/high_school_computer_science_dev.csv
a3677065cf51abc32901cdcf88ed64121f5595e3a5a67f86ae2570f866fe87c5  dev/high_school_european_history_dev.csv
e43fc27b9fa8b808773a2871007b39e012a1cc1ec902f85d85cc9c27cc12883d  dev/high_school_geography_dev.csv
daf013a3eae04b5904e6a706cf0574df2c881e00d46a979cb34c6e2968ad1c90  dev/high_school_government_and_politics_dev.csv
23ed995071c47e627c4e6adbce63a9144920441abb7e69f8b4dfac5fdc4e402d  dev/high_school_macroeconomics_dev.csv
d7401d5cbad5ae697bfa480e35d85de8ebf1232589a3c59b010782ee49cbe18c  dev/high_school_mathematics_dev.csv
a409b422561f1fb02e6d1bc044657cfff7779b13146edfd937d2573423c2c49b  dev/high_school_microeconomics_dev.csv
5f008c3a44e7b14d86f6c1cbde28892fd0d97ae424e8af9901d75c4ee03972cc  dev/high_school_physics_dev.csv
b39b304a436fa6239a4bb8c1dc4ca3693edec2876926851f3d512d1da9e280ab  dev/high_school_psychology_dev.csv
9441f8da50bfb93158d9b2645909cf1bc5837e8078c0eab923cf0fe761f7754e  dev/high_school_statistics_dev.csv
028b3c81c7be1138ad50b4afa1835773788e4557426a40abfaf132b11edab541  dev/high_school_us_history_dev.csv
b6e87a14718b0415241dfe10dd86605de5b6e5995fa57580e9e2d7c56fe147a1  dev/high_school_world_history_dev.csv
d2439fb3c2292e7dca8244cd98dd7ca746f8424347f171345f6b396f568b0870  dev/human_aging_dev.csv
0da7f8f7aeb6d5a08f0413489aa5d5b84ff8ac971952ea66242762f779cb6794  dev/human_sexuality_dev.csv
6f7f1c0191c0bcfe195d0ed39942a605012967a04d855c6482dc7e7a9f95e4d8  dev/international_law_dev.csv
27533d974102031088bc5c47fc008538ab3d08ca75e127fb64ff04cdd1562da2  dev/jurisprudence_dev.csv
4de026c2d116c381dcc1b65e91a28ba3d124398f920b0f3904ec5b641deb28f4  dev/logical_fallacies_dev.csv
e4b1b09985dbdc499d51a2a2e83d93ae05bfe72ea7407c18e3aa3d2ab9ce7517  dev/machine_learning_dev.csv
f75224958ab245d86c335d6886f8689247a9f83691ad63bb7ef3196641be9e52  dev/management_dev.csv
15b3cf450ebc11e122886a5bad41e78260228259fa184eaa4ba566bdf37f0315  dev/marketing_dev.csv
70cd9ff940bef360693eeb4e05b5b8e53ad75a81d6b74a784222d4cae6dcb896  dev/medical_genetics_dev.csv
72f74676c37fe477720d8b55e84517bd21daf1fe24f99dd33f1b0a636d31782e  dev/miscellaneous_dev.csv
c80d35650189d23777fff1a4a53ff4387128c2536cbbd417d7e9103eeeb0d054  dev/moral_disputes_dev.csv
dbe2196287f89a6c4be4f31a1897bf0d0f8612a5ab22451a856496df2e0c5100  dev/moral_scenarios_dev.csv
84444f3a5c5bf3ccbe87f361b8dca56b9e0c5594fda2c4b558c66c37f47f5b24  dev/nutrition_dev.csv
587be220837bbe089702aa27cda03fbf72a7b959a9a4425e70d598026614cf11  dev/philosophy_dev.csv
f62e146bc64a3335bafde9af63b43e4a863246da743cd49f6daf5d5e9614ff81  dev/prehistory_dev.csv
efc070ed71676829c67497542e3571f50a868036a17f93d00a56a4f85767ae0d  dev/professional_accounting_dev.csv
15d8589900ccf4725e1bad17837d48cc18c8bf033cd9b5d6bacf28a2a8f1064f  dev/professional_law_dev.csv
486456d578890d4700dd8044ac236c8ac2ee3389e35fc81ac37529f4f4487785  dev/professional_medicine_dev.csv
222e690db42dfb217a7c56a6ac693b73cf0168e344d75f28618c62ad9d2c0261  dev/professional_psychology_dev.csv
8895f665f4c696ae76d34210546d0ab4b21b79d2fd8534cd2e8002e8ed0969dc  dev/public_relations_dev.csv
c726278f37ce15489b22190771041bd459065016e3891148ef147ae7cf1a0c35  dev/security_studies_dev.csv
2e2bb34b4cabdc50e2c43097d1cfe91560224f9e1224adc19a01e922d1c49414  dev/sociology_dev.csv
3a9677a89fd67c3a891671a2a6a14ff69ab37bdd54fb687c2f8334c8a3fa1543  dev/us_foreign_policy_dev.csv
30af41f604f2ee7f5585361df6a7022b4eaf126eeb91494f225841908f06034a  dev/virology_dev.csv
d4f7550bb8a32a599dc2ffa0a53e85e81096f441bcca1be3a412d690ade8eaa0  dev/world_religions_dev.csv
4be89c0fb1d2419722e88880f6da3da95750367185ecd36f6492a6f74785cf64  test/abstract_algebra_test.csv
966dfd5c4579885ebdb8c05d6754ae5834f672632586d8595be3c0f9360e6f4e  test/anatomy_test.csv
87c9c3cb5a55395c70dd9ed521dd7d2629fd4ff236c5ab647102e007f52a9341  test/astronomy_test.csv
cd3fc3a85a34cb17e6c5b2fb68ea61e7800b31120d92934019f1e17f4832fbd4  test/business_ethics_test.csv
06a1ea973000d5ef5d2664c4ac1c68d0423f1cab6b3b682be7942633740811f1  test/clinical_knowledge_test.csv
e1204cb9d19887ea266145f038b5d4cc1fbc33d7efce186259c4ecca1cbe3119  test/college_biology_test.csv
4d61d7887f845b887c52ac928b6dffdcf2468d79f3d0fbb4d1731092a51d2552  test/college_chemistry_test.csv
d53a1d0d1c4362dacf92a4ff1d6a755beb5a87f24a7301c3c4391fcacc6530b4  test/college_computer_science_test.csv
8b5bef14d4209c7918eaf947e4f12a5ae9470567722d8ba9761302d733e8ac71  test/college_mathematics_test.csv
9c533cfff89edaa317b2e79bbabcdd5e2e522e019679cb4a6475e5f2a1861b1e  test/college_medicine_test.csv
079c3696eda22c13b0472de245c7bb4918315b59481964109a4f65d2a35b4243  test/college_physics_test.csv
8e40f809858db9dd8585036b53984e570b6101f72be2214b85e979c7fafa307f  test/computer_security_test.csv
7b39a241bb20424fd2a4e0e37ce05d94865ffc44191d8be4063be0e973312256  test/conceptual_physics_test.csv
10eb6b2d3a519a463872ef75902991b51ebf45865b29888e86d40228ace24029  test/econometrics_test.csv
8b0d747a97cb2cbbd8926c8deb2cda6073da6d5d3cc099693aa7761be938f5e4  test/electrical_engineering_test.csv
65a46a0e1927ea37aabd031ddcb6d81eef70a7eee1e9e0af94ec8e3fa21d728b  test/elementary_mathematics_test.csv
bc2dc7373a664ae72e166dcbe3f7aaf1bb65b99f106f1831f335c53467f35248  test/formal_logic_test.csv
a81058ee8e2385edaf42b8847ec9db01221fa4b16d262db415f3370884745ff9  test/global_facts_test.csv
cfaba2b58b9714d2a6983a90bce17f14cc44cfc8195b20f8f65fef70d21331b9  test/high_school_biology_test.csv
0e3d94da331d1eb3cafecd64a6f0f64e6fd2410b0a76676b2c0728dc5c1374f5  test/high_school_chemistry_test.csv
63806168fb0e5a72fe5bfb880f19816d8997e28d3f312c6b1831f4d40f432059  test/high_school_computer_science_test.csv
09983655452c3c40ba466050ec82252f02a235e5946734f4d73b73688fc9509b  test/high_school_european_history_test.csv
c6acdaa9d94c88cdefb9dd569e376733d9ba670c07db12cdff36ccdc18c2ab0c  test/high_school_geography_test.csv
fbd7a89eb2c7806097e18b40950e44e0580e6f97cd151f01a216bb575c2d7903  test/high_school_government_and_politics_test.csv
354b12cc74d2806c44d1fea42efba04ec12f10233e5169466080a1d1a6f8bba5  test/high_school_macroeconomics_test.csv
fe8f7a154834bba30947401ba37ea6c7afdcfba82ddc341c79b5d3016991d290  test/high_school_mathematics_test.csv
a250cc4976654e479cecdb7b66046ce2412df3e5e1b9c3d145ed344eae9a2256  test/high_school_microeconomics_test.csv
573e0f8d8309e4669f53a4b13248a908507b6d5d4c97c977f7bb9814658fee54  test/high_school_physics_test.csv
88c33b6b0ade567d07b8b5b074effdb52f31d773541fd71e86cb0d85a8daf7bf  test/high_school_psychology_test.csv
d62843d2fd084d6af1c8a0a6491d0aa642c34a7a68476605b9b3db5841e63d3f  test/high_school_statistics_test.csv
0338dea3b11881be53c2208ae8dbb571c792c0dca6f0b36a352147c0be81625e  test/high_school_us_history_test.csv
7787343ae18e4e1ef833c8630c0c914c62f42c2f35d8b90f4bec2eecccfc161e  test/high_school_world_history_test.csv
01299d7e0ae4a8d082daeecc140445ce7393b464040bd810b0a60a370ae5502e  test/human_aging_test.csv
43ca779587725f126d07733b33ba339ce27cca6f85056872eccf4b0377e28a90  test/human_sexuality_test.csv
51b3a6d74cc84651b2355d2823c30d993015ddfe8ef39725da4e0442f29489fc  test/international_law_test.csv
bf7a770aebfbdb181abc2c26ffd7a01ab31f93c7e2dfe6924c57c7bca4a0dff6  test/jurisprudence_test.csv
3fe8b48c74832525556455d49960cc0c3cff37496783348043ff69a1863c2244  test/logical_fallacies_test.csv
05984b90f887a7da12b3dd8e41e6c34fa856b2c939ea3124975d90910ceb2af0  test/machine_learning_test.csv
4a535a11bb480a09a302e86d157ae2d33e054cfa00e4265fe300a9408b87ec6b  test/management_test.csv
ecf0ae0ae906194d033ca7d7746eaf201232eccb78ee24147e737473f751233d  test/marketing_test.csv
cc30c698e94f12c00e610a39c62d1a1d9587fa53c005359317346081f722c5e6  test/medical_genetics_test.csv
061b283bb264072321d848b3b7f409a932a11ffa023fc94898dd31d2a4c80c7e  test/miscellaneous_test.csv
673f5e9054f55fc5e165a3ed01e1b13eb1ee5a3405055818b50532e05de9bfdd  test/moral_disputes_test.csv
128d7bd823d793f8b7faf28f98f4b3c737b3e84d4b42c06c13458d36075a423a  test/moral_scenarios_test.csv
309432be237ac2b659acd10fdd4347d32cdc60aa9daeafbac78486a8744fa0b6  test/nutrition_test.csv
a0f0c6fc9e4f08c04ff3a339996c4ed688a9fbe75d205fff4b9d3549fb49fa1e  test/philosophy_test.csv
8d44938332ea3d199cfa51a18ef69af972aa33ca4af7b5f5bc62e768a31f949a  test/prehistory_test.csv
27071efa2f8fd8502d01e80b8d7c69439586019f59e416ce039968417ef41355  test/professional_accounting_test.csv
eeb81cac576a5f537485b6befd25837b55f64b57e9b2a7e409210d7c8d608820  test/professional_law_test.csv
a034bf0dda10cb0848bdd3097eb1547d61ca2dac9e9b871563691621c38d51e9  test/professional_medicine_test.csv
99785591dfe18717736c0c296c9d9840c832f98749060975f7e2d976ad204bf7  test/professional_psychology_test.csv
3712f955d0c38b073b188a175a8d9a6ce64601f0ae9c98d8cfc37461c4cb5933  test/public_relations_test.csv
ab7634702670ee0d5e98b852f5bcfad2821ff9a2e909d223de05422c948f6638  test/security_studies_test.csv
f6c464600032aa2bb53294ad53217fbb650601eee206af947b3ce4c587ff5bed  test/sociology_test.csv
2821ee009a2b1b7d4adc5a212a0bad7fe05d377455de0fe0841beab8f00142e1  test/us_foreign_policy_test.csv
4355b9d79142da0e44a767a495a277733fd89ad67236cbbe3f42ff3a6d46b483  test/virology_test.csv
3be96b2465419289c4fe0c8a0d003003facd243c8982c6daafc6ac90a40bd507  test/world_religions_test.csv
ab0c6d19c4523969ec7b553ed49adecdb9cc00decc76c26c56c42ba198d8047c  val/abstract_algebra_val.csv
09e9959486ebf3643e4ecbf173a77b029c6f08665ab8f89daf99399956f26b8e  val/anatomy_val.csv
3dbe51f827890dd079e04c8ab024c5a2a7829033cd16913744af99f7b3a46328  val/astronomy_val.csv
929daf023cce06fa7558595ff8c329a3c9211693f8a46977997435da52876cc3  val/business_ethics_val.csv
85f87578c62618aeb64778fd9831201430e36e58d01e62b32fb8d2babc8bd516  val/clinical_knowledge_val.csv
f624eaf75ee2add75a9f2b189bb703e0a2591981d45c60bb5f9dcd9bfe168456  val/college_biology_val.csv
7d0594e7f35c83099ad2a23dc424cd1073dbf5883d7254b60395fd1642d860a7  val/college_chemistry_val.csv
4f7a08808c39218f0a8a8b945cadcc40dbf3d254962e620f7dccdea8a0596259  val/college_computer_science_val.csv
12621b0f192fe8773cac843c5bdc4777cc81d66b31c41188a3096e20dde143f8  val/college_mathematics_val.csv
9a490f6aaeb2e7c15cc8ce4c5745ff449568971ac447c4aa616858f7f4dcef35  val/college_medicine_val.csv
55c80f8fdd225c5ff57ab952d583fa5f20ac719e2432e9062fd5fb00e4abe42e  val/college_physics_val.csv
52faa1f86a4fa029d1953443ac636c359c9487efa1259d6212ea052018bc1582  val/computer_security_val.csv
dba647511d25b8defe1325268913d5b5853f3692af104176b88948bf89f06b95  val/conceptual_physics_val.csv
062b8b3ae560c7bf1bde9fb64958949ce74093eec3761dc3227e6e777168aaf1  val/econometrics_val.csv
31462254765b0525942d28da430d168dc012c64fd63140ee7c4d1cb42ebea6f5  val/electrical_engineering_val.csv
bc9806fe460cac380621592710b4eb64051151f7adfc7d87bfc4616a4473cff9  val/elementary_mathematics_val.csv
306d64079d5a16516470cc059e8e313abc06ceeec8c1131af582e30fb6f21667  val/formal_logic_val.csv
c32a9e14e2994414db70cbc85d89671f31be7ab3cc16fa905f8346e0c9e4061c  val/global_facts_val.csv
c0b264a94514f7326499c11e2b69f3991655391208d7c58c40b55e97404d4549  val/high_school_biology_val.csv
ed0c2c9846a709332f679a14dc0f99b68d61b6161e7f86aaf9012a11f9617e3b  val/high_school_chemistry_val.csv
5e40b8773655e59293ecf6a3e60346f3dc23273a808e64a9cd415b8dd2d55381  val/high_school_computer_science_val.csv
82f2bbbf8148f3c7bfe8936278f8b3713686b5aa0bba43cadf4f59b7f8d192f2  val/high_school_european_history_val.csv
94444fda55747826967db7d9eb4a977edc34a64c0cdf2a8e865c382a8610d96b  val/high_school_geography_val.csv
0fd2fd6ec975ed75c36eb6b826e4906ccdfa0275b915fa5b97499e6906a87777  val/high_school_government_and_politics_val.csv
3533d53f9f803657e25acd63fd98f2e24626008ff2fb793e2077feccd3d97f3c  val/high_school_macroeconomics_val.csv
233f0811fb852a080f52c9e9cb3ce7cfb76f54661dd6f8fddfdac6b8e2a989b2  val/high_school_mathematics_val.csv
51a6993ff0e2de9dcfc1c292efa4f4d983fd2397d5a28453c075272b7ba698f8  val/high_school_microeconomics_val.csv
3861ace8d359bac8b8560481599212193d38120fc350082680d99ad2090eeb0e  val/high_school_physics_val.csv
785e5c3e90eafb1cbeca4fd6c8d4d061d0358f5c4cdc5a916c77aa038cec0f9a  val/high_school_psychology_val.csv
ee65f842e44b0f9ada3919f64459c9b6a7aec190a26be00e037289279574d63c  val/high_school_statistics_val.csv
b28f9c1a3382cb1ccba85b70ed1a3f555a37b01788cc0b96f8be08a72b29d8b7  val/high_school_us_history_val.csv
7ba62c498d5bbe64423f6dca9db97b8240b87aee8a8559cafe5bca0e8b82fd4b  val/high_school_world_history_val.csv
5f4e2e4eebf704c4f19a6b54e58570b5f7d3928bedc807a24ff95dc296431de0  val/human_aging_val.csv
3f8b1c5317703fd7974ba1a07393b2ce66e171bc9ae8d1230455d7f42f152346  val/human_sexuality_val.csv
627a60c75899197670999963d6a2814b2bc7b4f7afc176a6bd665a0a2289a18a  val/international_law_val.csv
a54d080420bbdb866fb18ff9eb6e8eb524df0dc1d25724997f73ac860fd3c8ec  val/jurisprudence_val.csv
35820dc5ddf469d073691f4634edb87955902dd4d90b45f62f848ccd88dc4817  val/logical_fallacies_val.csv
23ea00a670424f7f7f54c3d32a04f470983234ffa7c6356eab8f4f7c6150fce4  val/machine_learning_val.csv
73f1407eedac9d6b02494b8e5292daa905993ed086883b56f4f0e52aea0e61bc  val/management_val.csv
521b52fd9be14088e8b3194088edd4de306e960d4a15558a0b0ea5f074ab158c  val/marketing_val.csv
03d44b759f35da638d7432bb7f050cc0bc5886497285980e91d387fe23478d6a  val/medical_genetics_val.csv
ae3d2dd1438655b9de855bae3832d3ef05a48a71ccbbb935850761284574c521  val/miscellaneous_val.csv
941826c9761dade3ebfb3a6a9c18e36994c3fcff2b10ffbe8830cf41b9e6cad0  val/moral_disputes_val.csv
73735e0bf74f045cf611f5b356082f083a401f283b9187bb2510e60d8efbcf61  val/moral_scenarios_val.csv
b9c542cf888e13a534cf23bcb603c9194829dd17c9fcfb116fbea068241302db  val/nutrition_val.csv
e190e2653bf42254783e4ed04d8016e5aedcb050a4496d3de0d737f84c79755a  val/philosophy_val.csv
08d0748aa24b77a3ca1e95897d6c77585c728b098a5a91501015552f1f331086  val/prehistory_val.csv
865b30e9a3c8dedbcedf9f50ac290571a729e1c7968485b203d328e55bbf6dca  val/professional_accounting_val.csv
175350a6b9a39a1f3118b3d700068f06ea1b59fa361d40f719fc3769c3e01601  val/professional_law_val.csv
8ccce8d3ca49f2a8ff645a12151ec36f4d567b53bf146bcefcb44c993efd7392  val/professional_medicine_val.csv
ef9cac4327293305ab3becdd4e8bc7ddeb56c3e43766ef4c9b8f506a3a69107c  val/professional_psychology_val.csv
7acad9ec286d30324ecec4888789abf73903d8e3222cef8650e7f294310a7957  val/public_relations_val.csv
5287f8757b00302ebcfddfe6c510e06a21c3b697e17cdefe40dfe180a619c6ca  val/security_studies_val.csv
593bf2643ee40f288dc1104fe2994ec343e7db0f11970a9d449220daf4b38846  val/sociology_val.csv
c427b2d9da8929924583eb4d6a32956d112cb9c43448225833c0d581a25ca1df  val/us_foreign_policy_val.csv
bfd8a9560123c397d4697333b59e1230b4154c466c9361530381434e2c6fd401  val/virology_val.csv
4352332375435709451e5782ede6700752db0b289602e572927d30ee0289125f  val/world_religions_val.csv
"""

SOURCES = {
    "lume": Source(
        what="the LUME release (forget.jsonl, retain.jsonl)", kind="http", env="LUME_DATA_URL",
        base=f"https://raw.githubusercontent.com/amazon-science/lume-llm-unlearning/{LUME_COMMIT}",
        remote="data", revision=LUME_COMMIT, flag="--data", files={
            "forget.jsonl": "3a74f30223c35b173664dfea5b1c5939587f1eac868a9764891f30c2c317c381",
            "retain.jsonl": "ec8826a91d9fb9e5a50ba732549e8eff75fc99c2f67d6873d1ea36fd403a003d"}),
    "semeval": Source(
        what="the SemEval-2025 Task 4 public split (data/*.parquet)", kind="hub", base=SEMEVAL_REPO,
        remote="data", revision=SEMEVAL_REVISION, flag="--data", files={
            "forget_train-00000-of-00001.parquet": "b82f81fcfc29a6c131bcacf9fc5943f10ee50abf1086a45ccdb11d2a050e5bde",
            "forget_validation-00000-of-00001.parquet":
                "591b79b1c31060de51859f4ee531b901e8f7e578321e6395c9067fb08432ad5f",
            "retain_train-00000-of-00001.parquet": "03e6202ee2d569d5a5d984f23a59d79dcbc7858e6dc49a73fcf3b368d6a35b6f",
            "retain_validation-00000-of-00001.parquet":
                "54fe101d31f3145be7c8fccc4722acf14a6ad06dfe28b5da488cc9cd4ea3ecae"}),
    "mia": Source(
        what="the SemEval-2025 Task 4 MIA sets (mia_data/member.jsonl, nonmember.jsonl)", kind="hub",
        base=SEMEVAL_REPO, remote="mia_data", revision=SEMEVAL_REVISION, flag="--mia-data", without=_AGG, files={
            "member.jsonl": "46476d20b21dbab766ef9c06fc519f76f6faf1995ebafdaa4107a667b8e7497d",
            "nonmember.jsonl": "55f918ce91c48e67955fe70c423457c2b5d9d0ff6894cca9c9fcd355131d58c3"}),
    "mmlu": Source(
        what="MMLU (dev/val/test CSVs)", kind="zip", env="LUME_MMLU_URL",
        base=f"https://raw.githubusercontent.com/hiyouga/LLaMA-Factory/{MMLU_COMMIT}",
        remote="evaluation/mmlu/mmlu.zip", inside="data", revision=MMLU_COMMIT, flag="--mmlu", without=_AGG,
        archive_sha256="9e2b2d78bf59d80baf271a13005568ef0aca17bd663f2e5ebfecdc07a68f0edc",  # 2,336,375 bytes
        files=_sums(_MMLU_SHA256SUMS)),
}
