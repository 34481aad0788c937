"""fetch.py against a real HTTP server on 127.0.0.1 serving the ../shared copies: first use fetches
and verifies, later uses make no request, a tampered file is refused with its name, a download cut
short or killed leaves nothing a later run reads, no server gives one clear line fast. The gated
hub parts: HF_HUB_OFFLINE=1 for real (subprocess), and the verification of files placed by a
stubbed snapshot_download."""
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

import data
import fetch
from conftest import ROOT, oracle

LUME_FILES = ("forget.jsonl", "retain.jsonl")
MMLU_ZIP = "/evaluation/mmlu/mmlu.zip"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@contextmanager
def serve(files: dict, cut=(), stall=()):
    """Serve {url path: bytes} on 127.0.0.1 (port 0) from a thread; `hits` lists every request.
    A path in `cut` gets its full Content-Length but half its body, then the connection closes;
    one in `stall` gets half its body, sets `half_sent` and hangs until the server stops."""
    hits, half_sent, stop = [], threading.Event(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = files.get(self.path)
            if body is None:
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path in cut or self.path in stall:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                half_sent.set()
                if self.path in stall:
                    stop.wait(60)
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{srv.server_port}", hits=hits, half_sent=half_sent)
    finally:
        stop.set()
        srv.shutdown()
        srv.server_close()


def lume_files(shared, tamper: str = "") -> dict:
    """The LUME release as GitHub serves it: /data/<file>; `tamper` gets one byte changed."""
    out = {f"/data/{f}": (shared / "lume-data" / "lume" / f).read_bytes() for f in LUME_FILES}
    if tamper:
        b = bytearray(out[f"/data/{tamper}"])
        b[100] ^= 1
        out[f"/data/{tamper}"] = bytes(b)
    return out


def mmlu_zip(shared, tamper: str = "") -> bytes:
    """An archive laid out as the pinned mmlu.zip (data/<split>/<file>), built from ../shared/mmlu."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for rel in fetch.SOURCES["mmlu"].files:
            body = (shared / "mmlu" / rel).read_bytes()
            z.writestr(f"data/{rel}", body + b"x" if rel == tamper else body)
    return buf.getvalue()


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No proxy for 127.0.0.1, no hub token, the cache in tmp_path."""
    for k in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(k, "127.0.0.1,localhost")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("LUME_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def dead_url() -> str:
    """http://127.0.0.1:<a port nothing listens on>."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def entries(cache):
    return sorted(p.name for p in (cache / "data").iterdir()) if (cache / "data").is_dir() else []


# -----------------------------------------------------------------------------
# the pins are the files the released targets memorised


def test_pinned_checksums_are_the_shared_copies(shared):
    lume, semeval = shared / "lume-data" / "lume", shared / "lume-data" / "semeval25"
    for name, folder in (("lume", lume), ("semeval", semeval / "data"), ("mia", semeval / "mia_data")):
        assert fetch.SOURCES[name].files == {p.name: fetch.sha256_file(p) for p in sorted(folder.iterdir())}
    listed = fetch._sums((shared / "mmlu" / "SHA256SUMS").read_text())
    assert fetch.SOURCES["mmlu"].files == listed and len(listed) == 171
    assert all(fetch.sha256_file(shared / "mmlu" / rel) == h for rel, h in listed.items())


# -----------------------------------------------------------------------------
# HTTP sources: fetch, verify, cache


def test_lume_fetched_verified_then_read_from_cache_without_a_request(shared, env, monkeypatch):
    with serve(lume_files(shared)) as srv:
        monkeypatch.setenv("LUME_DATA_URL", srv.url)
        path, rec = fetch.resolve("lume", env, log=lambda s: None)
        assert srv.hits == ["/data/forget.jsonl", "/data/retain.jsonl"]
        for f in LUME_FILES:
            body = (shared / "lume-data" / "lume" / f).read_bytes()
            assert (path / f).read_bytes() == body and rec["sha256"][f] == sha(body)
        assert path == env / "data" / "lume" and entries(env) == ["lume"]  # nothing half-done beside it
        assert (rec["source"], rec["url"], rec["revision"]) == ("lume", srv.url, fetch.LUME_COMMIT)
        again = fetch.resolve("lume", env, log=lambda s: None)
        assert srv.hits == ["/data/forget.jsonl", "/data/retain.jsonl"]  # the cache, no request
    monkeypatch.setenv("LUME_DATA_URL", dead_url())  # and no server at all
    assert fetch.resolve("lume", env, log=lambda s: None) == again == (path, rec)
    assert len(data.load_items(path)) == 2732 + 2734


def test_mmlu_archive_fetched_and_each_file_verified(shared, env, monkeypatch):
    logs = []
    with serve({MMLU_ZIP: mmlu_zip(shared)}) as srv:
        monkeypatch.setenv("LUME_MMLU_URL", srv.url)
        path, rec = fetch.resolve("mmlu", env, log=logs.append)
        fetch.resolve("mmlu", env, log=logs.append)
        assert srv.hits == [MMLU_ZIP]
    assert len(rec["sha256"]) == 171 and rec["revision"] == fetch.MMLU_COMMIT
    assert all((path / rel).read_bytes() == (shared / "mmlu" / rel).read_bytes() for rel in rec["sha256"])
    # our archive is a re-pack, not the pinned bytes: said once, and its files are what is checked
    assert sum("not the pinned archive" in line for line in logs) == 1
    dev, test = data.load_mmlu(path)
    assert len(dev) == len(test) == 57 and sum(map(len, test.values())) == 14042


def test_tampered_file_is_refused_with_its_name(shared, env, monkeypatch):
    with serve(lume_files(shared, tamper="retain.jsonl")) as srv:
        monkeypatch.setenv("LUME_DATA_URL", srv.url)
        for required in (True, False):  # a changed file is never a missing optional source
            with pytest.raises(SystemExit) as e:
                fetch.resolve("lume", env, required=required, log=lambda s: None)
            msg = str(e.value)
            assert "retain.jsonl" in msg and fetch.SOURCES["lume"].files["retain.jsonl"] in msg
            assert "forget.jsonl" not in msg and "\n" not in msg
    with serve({MMLU_ZIP: mmlu_zip(shared, tamper="test/anatomy_test.csv")}) as srv:
        monkeypatch.setenv("LUME_MMLU_URL", srv.url)
        with pytest.raises(SystemExit, match=r"test/anatomy_test\.csv .*does not match its pinned checksum"):
            fetch.resolve("mmlu", env, log=lambda s: None)
    assert entries(env) == []  # nothing cached, nothing left behind


def test_cut_short_download_leaves_nothing_then_fetches_whole(shared, env, monkeypatch):
    with serve(lume_files(shared), cut={"/data/retain.jsonl"}) as srv:
        monkeypatch.setenv("LUME_DATA_URL", srv.url)
        with pytest.raises(SystemExit) as e:
            fetch.resolve("lume", env, log=lambda s: None)
    msg = str(e.value)
    assert "retain.jsonl" in msg and "the connection closed after 520248 of 1040496 bytes" in msg
    assert entries(env) == []  # forget.jsonl came whole, yet nothing is published
    with serve(lume_files(shared)) as srv:
        monkeypatch.setenv("LUME_DATA_URL", srv.url)
        path, rec = fetch.resolve("lume", env, log=lambda s: None)
        assert srv.hits == ["/data/forget.jsonl", "/data/retain.jsonl"]
    assert rec["sha256"] == fetch.SOURCES["lume"].files and entries(env) == ["lume"]


def test_killed_download_leaves_nothing_a_later_run_reads(shared, env, monkeypatch):
    with serve(lume_files(shared), stall={"/data/retain.jsonl"}) as srv:
        child = dict(os.environ, LUME_DATA_URL=srv.url)
        proc = subprocess.Popen([sys.executable, "-c", f"import fetch; fetch.resolve('lume', {str(env)!r})"],
                                cwd=ROOT, env=child, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert srv.half_sent.wait(30), "the child never reached retain.jsonl"
        proc.kill()  # SIGKILL mid-body: no finally, no clean-up runs
        proc.wait(30)
    # what it left is a hidden staging directory holding forget.jsonl, never data/lume
    left = entries(env)
    assert len(left) == 1 and left[0].startswith(".lume.partial-") and "lume" not in left
    assert (env / "data" / left[0] / "forget.jsonl").is_file()
    with serve(lume_files(shared)) as srv:
        monkeypatch.setenv("LUME_DATA_URL", srv.url)
        path, rec = fetch.resolve("lume", env, log=lambda s: None)
        assert srv.hits == ["/data/forget.jsonl", "/data/retain.jsonl"]
    assert rec["sha256"] == fetch.SOURCES["lume"].files


def test_no_server_gives_one_clear_line_fast(env, monkeypatch):
    url = dead_url()
    monkeypatch.setenv("LUME_DATA_URL", url)
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        fetch.resolve("lume", env, log=lambda s: None)
    msg = str(e.value)
    assert time.perf_counter() - t0 < 3 and "\n" not in msg
    assert msg.startswith("error: cannot fetch the LUME release") and f"{url}/data/forget.jsonl" in msg
    assert "python data.py fetch" in msg and "LUME_CACHE" in msg and "--data" in msg
    # an optional source (MMLU) lets the run go on: None, the reason, one note about aggregate-score
    monkeypatch.setenv("LUME_MMLU_URL", url)
    logs = []
    path, rec = fetch.resolve("mmlu", env, required=False, log=logs.append)
    notes = [line for line in logs if line.startswith("note:")]
    assert path is None and rec["source"] == "mmlu" and "refused" in rec["error"].lower()
    assert len(notes) == 1 and "aggregate-score will be -1" in notes[0] and "--mmlu" in notes[0]
    assert entries(env) == []


def test_silent_server_times_out_after_one_try(env, monkeypatch):
    with socket.socket() as s:  # accepts connections (backlog) and never answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        monkeypatch.setenv("LUME_DATA_URL", f"http://127.0.0.1:{s.getsockname()[1]}")
        monkeypatch.setattr(fetch, "TIMEOUT", 0.5)
        t0 = time.perf_counter()
        with pytest.raises(SystemExit, match="timed out"):
            fetch.resolve("lume", env, log=lambda s: None)
        assert time.perf_counter() - t0 < 3
        s.settimeout(0.2)
        tries = 0
        with pytest.raises(TimeoutError):
            while True:
                s.accept()[0].close()
                tries += 1
    assert tries == 1  # no retries


def test_cache_edited_after_fetch_is_refused_with_its_name(shared, env, monkeypatch):
    with serve(lume_files(shared)) as srv:
        monkeypatch.setenv("LUME_DATA_URL", srv.url)
        path, _ = fetch.resolve("lume", env, log=lambda s: None)
        with open(path / "forget.jsonl", "ab") as f:
            f.write(b"\n")
        where = re.escape(str(path))
        with pytest.raises(SystemExit, match=rf"{where}/forget\.jsonl: sha256 .* delete {where}"):
            fetch.resolve("lume", env, log=lambda s: None)
        (path / "retain.jsonl").unlink()
        shutil.copy(shared / "lume-data" / "lume" / "forget.jsonl", path / "forget.jsonl")
        with pytest.raises(SystemExit, match=rf"{where}/retain\.jsonl: missing"):
            fetch.resolve("lume", env, log=lambda s: None)
        assert len(srv.hits) == 2  # a bad cache is reported, not silently fetched again


def test_another_process_publishing_first_is_used(shared, env, monkeypatch):
    """Ranks of one torchrun job fetch at once; the first rename wins, the others use its copy."""
    dest = env / "data" / "lume"

    def log(line):
        if line.startswith("data: fetching"):  # the other process finishes while this one downloads
            shutil.copytree(shared / "lume-data" / "lume", dest)
        logs.append(line)
    logs = []
    with serve(lume_files(shared)) as srv:
        monkeypatch.setenv("LUME_DATA_URL", srv.url)
        path, rec = fetch.resolve("lume", env, log=log)
    assert path == dest and rec["sha256"] == fetch.SOURCES["lume"].files and entries(env) == ["lume"]
    assert any("appeared meanwhile" in line for line in logs)


# -----------------------------------------------------------------------------
# the gated hub sources


def test_hub_offline_gives_one_line(env, tmp_path):
    script = ("import json, fetch, sys\n"
              "print(json.dumps(fetch.resolve('mia', sys.argv[1], required=False, log=lambda s: None)[1]))\n"
              "fetch.resolve('semeval', sys.argv[1], log=lambda s: None)\n")
    child = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    child.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", script, str(env)], cwd=ROOT, env=child, capture_output=True,
                       text=True, timeout=60)
    assert time.perf_counter() - t0 < 15, "the hub's offline answer took too long"
    rec = json.loads(r.stdout)
    assert rec["source"] == "mia" and rec["url"].endswith(fetch.SEMEVAL_REPO) and "error" in rec
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    line = r.stderr.strip()
    what = fetch.SOURCES["semeval"].what
    assert line.startswith(f"error: cannot fetch {what} from https://huggingface.co/datasets/{fetch.SEMEVAL_REPO}: ")
    assert "outgoing traffic has been disabled" in line  # the hub's own reason: HF_HUB_OFFLINE
    assert "hf auth login" in line and "HF_TOKEN" in line and "--data" in line
    assert entries(env) == []


@pytest.fixture
def hub(shared, tmp_path, monkeypatch):
    """A stub snapshot_download that places files of ../shared/lume-data/semeval25 in a hub-style
    snapshot folder; `edit(path, bytes)` changes what it places (None: leave the file out)."""
    huggingface_hub = oracle("huggingface_hub")
    stub = SimpleNamespace(calls=[], edits={}, snapshot=tmp_path / "hub" / "snapshots" / ("ab" * 20))

    def snapshot_download(repo_id, **kw):
        stub.calls.append((repo_id, kw))
        shutil.rmtree(stub.snapshot, ignore_errors=True)  # each call places exactly what `edits` says
        for pattern in kw["allow_patterns"]:
            body = stub.edits.get(pattern, (shared / "lume-data" / "semeval25" / pattern).read_bytes())
            if body is not None:
                (stub.snapshot / pattern).parent.mkdir(parents=True, exist_ok=True)
                (stub.snapshot / pattern).write_bytes(body)
        return str(stub.snapshot)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return stub


def test_hub_files_verified_and_cached(shared, env, hub):
    path, rec = fetch.resolve("mia", env, log=lambda s: None)
    repo, kw = hub.calls[0]
    assert repo == fetch.SEMEVAL_REPO and kw["repo_type"] == "dataset" and kw["revision"] == "main"
    assert kw["allow_patterns"] == ["mia_data/member.jsonl", "mia_data/nonmember.jsonl"]
    assert rec["revision"] == "ab" * 20 and rec["url"] == f"https://huggingface.co/datasets/{fetch.SEMEVAL_REPO}"
    for f in ("member.jsonl", "nonmember.jsonl"):
        body = (shared / "lume-data" / "semeval25" / "mia_data" / f).read_bytes()
        assert (path / f).read_bytes() == body and rec["sha256"][f] == sha(body)
    assert {k: len(v) for k, v in data.load_mia(path).items()} == {"member": 150, "nonmember": 150}
    assert fetch.resolve("mia", env, log=lambda s: None) == (path, rec) and len(hub.calls) == 1
    oracle("pyarrow")
    path, rec = fetch.resolve("semeval", env, log=lambda s: None)
    assert len(data.load_items(path)) == 2780 and len(rec["sha256"]) == 4


def test_hub_file_changed_or_missing_is_refused_with_its_name(shared, env, hub):
    body = (shared / "lume-data" / "semeval25" / "mia_data" / "nonmember.jsonl").read_bytes()
    hub.edits["mia_data/nonmember.jsonl"] = body.replace(b'"document"', b'"documenT"', 1)
    with pytest.raises(SystemExit, match=r"nonmember\.jsonl from https://huggingface.co/.* does not match"):
        fetch.resolve("mia", env, required=False, log=lambda s: None)
    hub.edits = {"mia_data/member.jsonl": None}
    with pytest.raises(SystemExit, match=r"has no mia_data/member\.jsonl at revision abab"):
        fetch.resolve("mia", env, log=lambda s: None)
    assert entries(env) == []


# -----------------------------------------------------------------------------
# python data.py fetch, and records of local directories


def test_data_py_fetch_reports_what_it_verified_and_what_it_could_not(shared, env, tmp_path, hub):
    files = {**lume_files(shared), MMLU_ZIP: mmlu_zip(shared)}
    to = tmp_path / "fetched"
    with serve(files) as srv:
        child = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
        child.update(LUME_DATA_URL=srv.url, LUME_MMLU_URL=srv.url, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
        r = subprocess.run([sys.executable, "data.py", "fetch", "--to", str(to)], cwd=ROOT, env=child,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
            f"error: could not fetch semeval, mia (see above); lume, mmlu verified in {to / 'data'}")
        assert f"lume     {to / 'data' / 'lume'}  2 files, sha256 verified" in r.stdout
        assert f"mmlu     {to / 'data' / 'mmlu'}  171 files, sha256 verified" in r.stdout
        assert "semeval: cannot fetch" in r.stdout and "hf auth login" in r.stdout
        logs = []  # the same with the hub reachable (stubbed): all four, and how to use them offline
        records = fetch.fetch_all(to, log=logs.append)
        assert srv.hits == ["/data/forget.jsonl", "/data/retain.jsonl", MMLU_ZIP]
    assert list(records) == ["lume", "semeval", "mia", "mmlu"] and entries(to) == list(sorted(records))
    assert all(rec["sha256"] == fetch.SOURCES[n].files for n, rec in records.items())
    assert logs[-1] == f"on a machine without network: LUME_CACHE={to} python run.py ..."


def test_local_record_says_which_pinned_source_a_directory_holds(shared, tmp_path):
    rec = fetch.local_record(shared / "lume-data" / "lume")
    assert rec["matches"] == ["lume"] and rec["sha256"] == fetch.SOURCES["lume"].files
    assert fetch.local_record(shared / "lume-data" / "semeval25")["matches"] == ["semeval", "mia"]
    copy = shutil.copytree(shared / "lume-data" / "lume", tmp_path / "copy")
    with open(copy / "retain.jsonl", "ab") as f:
        f.write(b"\n")
    rec = fetch.local_record(copy)
    assert rec["matches"] == [] and rec["sha256"]["retain.jsonl"] == sha((copy / "retain.jsonl").read_bytes())
    with pytest.raises(ValueError, match="unknown data source 'lumen': expected one of lume, semeval, mia, mmlu"):
        fetch.resolve("lumen", tmp_path)
