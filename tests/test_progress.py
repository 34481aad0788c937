"""Progress on every stage that can take minutes at scale: one updating line on a terminal, a plain
line every 10 s otherwise (progress.py), here for progress.Each (a loop run by another function)
and the stages it reports: NPO's reference log-probs, RMU's activation cache, each attack."""
import io
import itertools
import re

import pytest

import job
import progress
import run


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_each_counts_the_items_as_the_loop_takes_them(monkeypatch):
    clock = itertools.count(0, 4)  # every call to time.time() advances 4 s
    monkeypatch.setattr("progress.time.time", lambda: next(clock))
    plain = io.StringIO()
    items = progress.Each(list("abcdefgh"), "cache: batch", stream=plain)
    assert len(items) == 8 and items[2] == "c"
    taken = []
    for x in items:
        taken.append((x, plain.getvalue().count("\n")))
    assert [x for x, _ in taken] == list("abcdefgh")
    lines = plain.getvalue().splitlines()
    # 8 s per item (two clock reads): a line at most every 10 s, and the last one always
    assert 3 <= len(lines) <= 5 and lines[-1].startswith("cache: batch 8/8") and "\r" not in plain.getvalue()
    assert taken[0][1] == 0  # the first item is yielded before any line: nothing done yet
    assert list(items) == list("abcdefgh")  # iterated again: a list in every other way, a second line run
    tty = Tty()
    for _ in progress.Each(range(5), "ref: batch", stream=tty):
        pass
    assert tty.getvalue().count("\r") == 5 and tty.getvalue().endswith("\n") and tty.getvalue().count("\n") == 1


def run_small(tmp_path, name, *extra):
    return job.main(run.parse_args(["--n-docs", "2", "--max-new-tokens", "4", "--no-eval-before",
                                    "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / name), *extra]))


def finished(text: str, label: str) -> bool:
    """A progress line of `label` that reached its total (k/k)."""
    return any(m.group(1) == m.group(2) for m in re.finditer(re.escape(label) + r" (\d+)/(\d+)", text))


@pytest.mark.parametrize("method, label", [("npo", "NPO reference: batch"), ("rmu", "RMU cache: batch")])
def test_the_reference_stages_print_progress(tmp_path, small_tiny, capsys, method, label):
    run_small(tmp_path, method, "--method", method, "--max-steps", "1", *(["--rmu-layer", "1"] * (method == "rmu")))
    assert finished(capsys.readouterr().out, label)


def test_each_attack_prints_progress(tmp_path, small_tiny, capsys):
    run_small(tmp_path, "attacks", "--method", "ga", "--max-steps", "1", "--attacks", "quant8,relearn")
    out = capsys.readouterr().out
    assert "attack 1/2: quant8" in out and "attack 2/2: relearn" in out
    assert finished(out, "attack relearn: step") and finished(out, "scoring relearn")
