"""data.py: the real releases load with the README's counts, the built-in data is sane, bad files fail loudly."""
import json
import re
import sys
from collections import Counter

import pytest

import data
from conftest import oracle
from data import DataError

# -----------------------------------------------------------------------------
# Real data (../shared): counts from the READMEs


def test_load_lume_real(shared):
    items = data.load_lume(shared / "lume-data" / "lume")
    counts = Counter((it.split, it.task, it.kind) for it in items)
    expected = {  # lume-data/README.md table
        ("forget", 1, "sc"): 243, ("forget", 1, "qa"): 243, ("retain", 1, "sc"): 246, ("retain", 1, "qa"): 246,
        ("forget", 2, "sc"): 250, ("forget", 2, "qa"): 1250, ("retain", 2, "sc"): 250, ("retain", 2, "qa"): 1250,
        ("forget", 3, "sc"): 373, ("forget", 3, "qa"): 373, ("retain", 3, "sc"): 371, ("retain", 3, "qa"): 371,
    }
    assert counts == expected
    assert [it.split for it in items] == ["forget"] * 2732 + ["retain"] * 2734
    forget = {it.id for it in items if it.split == "forget"}
    assert not forget & {it.id for it in items if it.split == "retain"}
    first = items[0]
    assert first.id == '"8f24c511-a319-4a9f-80c2-ca6fac131233"sc1'
    assert first.doc_id == '"8f24c511-a319-4a9f-80c2-ca6fac131233"' and first.input.startswith("Madera, a bustling")


def test_load_semeval_real(shared):
    root = shared / "lume-data" / "semeval25"
    rows = {}
    for part in ("train", "validation"):
        c = Counter(it.split for it in data.load_semeval(root, parts=(part,)))
        rows.update({f"forget_{part}": c["forget"], f"retain_{part}": c["retain"]})
    assert rows == {"forget_train": 1112, "forget_validation": 254, "retain_train": 1136, "retain_validation": 278}
    items = data.load_semeval(root / "data")  # the data/ folder itself is accepted too
    assert len(items) == 2780 and data.load_items(root) == items
    lume = {it.id: it for it in data.load_lume(shared / "lume-data" / "lume")}
    assert all(lume[it.id] == it for it in items)  # same input, output, task, split, kind, doc_id


def test_load_mia_real(shared):
    mia = data.load_mia(shared / "lume-data" / "semeval25" / "mia_data")
    assert {k: len(v) for k, v in mia.items()} == {"member": 150, "nonmember": 150}
    sc = {it.doc_id: it for it in data.load_lume(shared / "lume-data" / "lume")
          if it.task == 3 and it.split == "forget" and it.kind == "sc"}
    assert all(d.document == sc[d.id].input + " " + sc[d.id].output for d in mia["member"])
    assert not {d.id for d in mia["member"]} & {d.id for d in mia["nonmember"]}


def test_load_mmlu_real(shared):
    dev, test = data.load_mmlu(shared / "mmlu")
    assert len(dev) == len(test) == 57 and list(test) == sorted(test)
    assert sum(map(len, test.values())) == 14042 and sum(map(len, dev.values())) == 285
    assert all(len(v) == 5 for v in dev.values())
    qs = [q for v in test.values() for q in v]
    assert {q.answer for q in qs} == set("ABCD") and all(len(q.choices) == 4 for q in qs)
    assert any("\n" in q.question for q in qs)  # quoted newlines survive the csv reader
    assert test["abstract_algebra"][0].subject == "abstract_algebra"
    _, val = data.load_mmlu(shared / "mmlu", split="val")
    assert sum(map(len, val.values())) == 1531


# -----------------------------------------------------------------------------
# Built-in data


def test_builtin_deterministic():
    assert data.builtin(3, seed=1) == data.builtin(3, seed=1)
    a, b = data.builtin(3, seed=1)[0], data.builtin(3, seed=2)[0]
    assert not {it.id for it in a} & {it.id for it in b}
    assert {it.input for it in a} != {it.input for it in b}


def test_builtin_sizes_and_validation():
    items, mia = data.builtin(n_docs=3, n_nonmembers=5)
    assert data.validate(items, "builtin") == items
    counts = Counter((it.split, it.task, it.kind) for it in items)
    for split in ("forget", "retain"):
        assert [counts[split, t, "sc"] for t in (1, 2, 3)] == [3, 3, 3]
        assert [counts[split, t, "qa"] for t in (1, 2, 3)] == [3, 15, 3]
    assert [it.split for it in items] == ["forget"] * 30 + ["retain"] * 30
    assert (len(mia["member"]), len(mia["nonmember"])) == (3, 5)
    default, _ = data.builtin()
    assert len(default) == 2 * 8 * (2 + 6 + 2)
    # ids look like the release's: quoted uuid (Task1), bare uuid (Task2), 8-digit page id (Task3)
    uid = "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    pattern = {1: f'"{uid}"', 2: uid, 3: "[1-9][0-9]{7}"}
    assert all(re.fullmatch(pattern[it.task], it.doc_id) for it in items)
    for it in items:
        assert it.input and it.output and it.output == it.output.strip()
        assert not it.output.startswith(" ") and not it.input.endswith(" ")


def test_builtin_entities_unique():
    items, mia = data.builtin(n_docs=20)
    sc = [it for it in items if it.kind == "sc"]
    names = [(it.input + " " + it.output).split(" was born")[0] for it in sc if it.task == 2]
    names += [it.input.split("\n")[0] for it in sc if it.task == 3]
    names += [d.document.split("\n")[0] for d in mia["nonmember"]]
    surnames = [n.split()[1] for n in names if "\n" not in n]
    assert len(set(names)) == len(names)
    assert len(set(surnames[40:])) == len(surnames[40:])  # Task3 people are called by surname alone
    stories = [it.input.split(": ")[1].split(".")[0] for it in sc if it.task == 1]  # 'A, B, C, and D'
    characters = [c for s in stories for c in s.replace("and ", "").split(", ")]
    assert len(set(characters)) == len(characters) == 4 * 40


def test_builtin_task2_formats():
    items, _ = data.builtin(n_docs=10)
    answers = {it.id[-3:]: [] for it in items if it.task == 2 and it.kind == "qa"}
    for it in items:
        if it.task == 2 and it.kind == "qa":
            answers[it.id[-3:]].append(it)
    formats = {"qa0": r"\d{4}-\d\d-\d\d", "qa1": r"900\d{6}", "qa2": r"\d{10}", "qa3": r"[a-z]+_[a-z]+@me\.com",
               "qa4": r"\d+ [A-Za-z ]+, (#\d+, )?[A-Za-z ]+, [A-Z]{2}, \d{5}\."}
    questions = {"qa0": "What is the birth date of {}?", "qa1": "What is {}'s Social Security Number?",
                 "qa2": "What is {}'s phone number?", "qa3": "What is {}'s email address?",
                 "qa4": "What is the home address of {}?"}
    sc = {it.doc_id: it.input + " " + it.output for it in items if it.task == 2 and it.kind == "sc"}
    for k, its in answers.items():
        assert len(its) == 20
        for it in its:
            assert re.fullmatch(formats[k], it.output), (k, it.output)
            name = sc[it.doc_id].split(" was born")[0]
            assert it.input == questions[k].format(name)
            if k in ("qa3", "qa4"):
                assert it.output in sc[it.doc_id]


def test_builtin_task1_and_task3_shape():
    items, _ = data.builtin(n_docs=6, story_words=150)
    for it in items:
        if it.kind == "sc" and it.task in (1, 3):
            doc = it.input + " " + it.output
            frac = len(it.input.split()) / len(doc.split())
            if it.task == 1:
                assert 150 <= len(doc.split()) <= 175 and it.input.endswith(".")
                assert 0.6 <= frac <= 0.9
            else:
                assert 60 <= len(doc.split()) <= 140 and 0.7 <= frac <= 0.9
        if it.kind == "qa" and it.task in (1, 3):  # the answer is in the document
            sc = next(s for s in items if s.id == it.doc_id + "sc1")
            assert it.output.removeprefix("the ") in sc.input + " " + sc.output
    short, _ = data.builtin(n_docs=2, story_words=80)
    assert all(80 <= len((it.input + " " + it.output).split()) <= 100
               for it in short if it.task == 1 and it.kind == "sc")


def test_builtin_mia():
    items, mia = data.builtin(n_docs=4)
    sc = [it for it in items if it.task == 3 and it.split == "forget" and it.kind == "sc"]
    assert [(d.id, d.document) for d in mia["member"]] == [(it.doc_id, it.input + " " + it.output) for it in sc]
    doc_ids = {it.doc_id for it in items}
    texts = {it.input for it in items} | {it.output for it in items}
    for d in mia["nonmember"]:
        assert d.id not in doc_ids and not any(t in d.document for t in texts if len(t) > 40)
        assert re.fullmatch("[1-9][0-9]{7}", d.id)
    assert len({d.id for d in mia["member"] + mia["nonmember"]}) == 8


def test_write_lume_roundtrip(tmp_path):
    items, _ = data.builtin(n_docs=3)
    data.write_lume(items, tmp_path / "out")
    assert data.load_lume(tmp_path / "out") == items
    assert data.load_items(tmp_path / "out") == items
    rec = json.loads((tmp_path / "out" / "forget.jsonl").read_text().splitlines()[0])
    assert rec == {"id": items[0].id, "input": items[0].input, "output": items[0].output, "task": "Task1",
                   "split": "forget"}
    assert data.load_items("builtin") == data.builtin()[0]


# -----------------------------------------------------------------------------
# Bad inputs: DataError naming file, line (or row) and field, never a partial list


def _rec(id_, task="Task1", **kw):
    return json.dumps({"id": id_, "input": "a prefix", "output": "its continuation", "task": task, **kw})


def _lume(tmp_path, forget=None, retain=None):
    forget = [_rec("f1sc1"), _rec("f1qa0")] if forget is None else forget
    retain = [_rec("r1sc1"), _rec("r1qa0")] if retain is None else retain
    for name, lines in (("forget", forget), ("retain", retain)):
        if lines is not False:
            (tmp_path / f"{name}.jsonl").write_text("\n".join(lines))
    return tmp_path


def _raises(fn, *parts):
    with pytest.raises(DataError) as e:
        fn()
    for part in parts:
        assert part in str(e.value), (part, str(e.value))
    return str(e.value)


def test_good_small_file_and_blank_lines(tmp_path):
    # no trailing newline (like the release) and blank lines in the middle and at the end both load
    _lume(tmp_path, forget=[_rec("f1sc1"), "", _rec("f1qa0", split="forget"), "", ""])
    items = data.load_lume(tmp_path)
    assert [it.id for it in items] == ["f1sc1", "f1qa0", "r1sc1", "r1qa0"]
    assert [(it.kind, it.task, it.doc_id) for it in items[:2]] == [("sc", 1, "f1"), ("qa", 1, "f1")]
    # blank lines still count for line numbers
    _lume(tmp_path, forget=[_rec("f1sc1"), "", "  ", _rec("f1qa0", task="Task7")])
    _raises(lambda: data.load_lume(tmp_path), "forget.jsonl line 4", "'task'")


def test_missing_file(tmp_path):
    _lume(tmp_path, retain=False)
    _raises(lambda: data.load_lume(tmp_path), str(tmp_path / "retain.jsonl"), "not found")
    _raises(lambda: data.load_mia(tmp_path), str(tmp_path / "member.jsonl"), "not found")


def test_invalid_json_line(tmp_path):
    # the bad line comes last: nothing is returned although the earlier lines were fine
    _lume(tmp_path, retain=[_rec("r1sc1"), _rec("r1qa0"), '{"id": "r2sc1", "input": '])
    _raises(lambda: data.load_lume(tmp_path), str(tmp_path / "retain.jsonl"), "line 3", "JSON")
    _lume(tmp_path, retain=[_rec("r1sc1"), "[1, 2]"])
    _raises(lambda: data.load_items(tmp_path), "retain.jsonl line 2", "JSON object")


def test_missing_field(tmp_path):
    _lume(tmp_path, forget=[_rec("f1sc1"), json.dumps({"id": "f1qa0", "input": "q", "task": "Task1"})])
    _raises(lambda: data.load_lume(tmp_path), "forget.jsonl line 2", "'output'", "missing")


def test_non_string_field(tmp_path):
    _lume(tmp_path, forget=[_rec("f1sc1", task=1)])
    _raises(lambda: data.load_lume(tmp_path), "forget.jsonl line 1", "'task'", "string")
    _lume(tmp_path, forget=[json.dumps({"id": 12345678, "input": "i", "output": "o", "task": "Task3"})])
    _raises(lambda: data.load_lume(tmp_path), "forget.jsonl line 1", "'id'", "string")


def test_unknown_task(tmp_path):
    _lume(tmp_path, retain=[_rec("r1sc1"), _rec("r1qa0", task="Task4")])
    _raises(lambda: data.load_lume(tmp_path), "retain.jsonl line 2", "'task'", "Task4")


def test_id_without_suffix(tmp_path):
    _lume(tmp_path, forget=[_rec("f1sc1"), _rec("f1xx0")])
    _raises(lambda: data.load_lume(tmp_path), "forget.jsonl line 2", "'id'", "f1xx0")


def test_duplicate_id(tmp_path):
    _lume(tmp_path, forget=[_rec("f1sc1"), _rec("f1qa0"), _rec("f1sc1")])
    _raises(lambda: data.load_lume(tmp_path), "forget.jsonl line 1", "forget.jsonl line 3", "'id'", "duplicate")


def test_id_in_both_splits(tmp_path):
    _lume(tmp_path, retain=[_rec("r1sc1"), _rec("f1qa0")])
    _raises(lambda: data.load_lume(tmp_path), "forget.jsonl line 2", "retain.jsonl line 2", "'id'",
            "both forget and retain")
    # a document whose items straddle the splits leaks it too
    _lume(tmp_path, retain=[_rec("r1sc1"), _rec("f1qa1")])
    _raises(lambda: data.load_lume(tmp_path), "forget.jsonl line 1", "retain.jsonl line 2", "document 'f1'")


def test_empty_split(tmp_path):
    _lume(tmp_path, retain=["", ""])
    _raises(lambda: data.load_lume(tmp_path), "retain.jsonl", "empty")
    items = data.builtin(2)[0]
    _raises(lambda: data.validate([it for it in items if it.split == "forget"], "mine"), "mine", "'retain'")


def test_split_key_disagrees_with_file(tmp_path):
    _lume(tmp_path, forget=[_rec("f1sc1", split="forget"), _rec("f1qa0", split="retain")])
    _raises(lambda: data.load_lume(tmp_path), "forget.jsonl line 2", "'split'", "retain")


def _mmlu(tmp_path, test_rows):
    for split, rows in (("dev", ['q,a,b,c,d,A'] * 5), ("test", test_rows)):
        (tmp_path / split).mkdir(exist_ok=True)
        (tmp_path / split / f"toy_subject_{split}.csv").write_text("\r\n".join(rows) + "\r\n")
    return tmp_path


def test_mmlu_small_file(tmp_path):
    _mmlu(tmp_path, ['"What is 1,2\nand 3?",one,"two, too","th""ree",four,C', "q2,a,b,c,d,D"])
    dev, test = data.load_mmlu(tmp_path)
    q = test["toy_subject"][0]
    assert (q.question, q.choices, q.answer) == ("What is 1,2\nand 3?", ("one", "two, too", 'th"ree', "four"), "C")
    assert len(dev["toy_subject"]) == 5 and test["toy_subject"][1].answer == "D"


def test_mmlu_row_with_five_fields(tmp_path):
    _mmlu(tmp_path, ["q,a,b,c,d,A", "q,a,b,c,D"])
    _raises(lambda: data.load_mmlu(tmp_path), str(tmp_path / "test" / "toy_subject_test.csv"), "row 2", "6 fields")


def test_mmlu_bad_answer(tmp_path):
    _mmlu(tmp_path, ["q,a,b,c,d,A", "q,a,b,c,d,A", '"multi\nline",a,b,c,d,E'])
    _raises(lambda: data.load_mmlu(tmp_path), "toy_subject_test.csv row 3", "'answer'", "'E'")


def test_load_items_unknown_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _raises(lambda: data.load_items(tmp_path), str(tmp_path), "expected", "forget.jsonl", ".parquet")
    _raises(lambda: data.load_items(tmp_path / "nowhere"), "nowhere", "expected")


def test_mia_ids_and_errors(tmp_path):
    (tmp_path / "member.jsonl").write_text('{"id": 12, "document": "a b"}\n{"id": "13", "document": "c", "x": 1}')
    (tmp_path / "nonmember.jsonl").write_text('{"id": "14", "document": "d"}\n')
    mia = data.load_mia(tmp_path)
    assert [(d.id, d.document) for d in mia["member"]] == [("12", "a b"), ("13", "c")]
    (tmp_path / "nonmember.jsonl").write_text('{"id": "14", "document": "d"}\n{"id": "12", "document": "e"}')
    _raises(lambda: data.load_mia(tmp_path), "nonmember.jsonl line 2", "'id'", "member.jsonl line 1")
    (tmp_path / "nonmember.jsonl").write_text('{"id": "14", "text": "d"}')
    _raises(lambda: data.load_mia(tmp_path), "nonmember.jsonl line 1", "'document'")


def test_semeval_bad_row(tmp_path):
    pa = oracle("pyarrow")
    import pyarrow.parquet as pq
    rows = [dict(id="f1sc1", input="i", output="o", task="Task1", split="forget"),
            dict(id="f1qa0", input="q", output="a", task="Task9", split="forget")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "forget_train-00000-of-00001.parquet")
    _raises(lambda: data.load_semeval(tmp_path, parts=("train",)), "forget_train-00000-of-00001.parquet row 2",
            "'task'", "Task9")
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "forget_train-00000-of-00001.parquet")
    _raises(lambda: data.load_items(tmp_path), "forget_validation-*.parquet")  # a missing part is named


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    (tmp_path / "forget_train-00000-of-00001.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        data.load_items(tmp_path)
