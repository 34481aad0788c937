"""report.py compare: the markdown table from given run directories, byte for byte, and its picture."""
import json

import pytest

import report


def result(f1, r1, f_other=1.0, r_other=1.0, auc=1.0):
    """An official results dict: Task1 forget/retain scores (regurgitation, knowledge) as given,
    Tasks 2 and 3 at f_other / r_other."""
    def split(t1, other):
        return {f"Task{t}": {"regurgitation-score": (t1 if t == 1 else (other, other))[0],
                             "knowledge-score": (t1 if t == 1 else (other, other))[1]} for t in (1, 2, 3)}
    return {"forget-set": split(f1, f_other), "retain-set": split(r1, r_other), "mia_loss_acc": auc,
            "harmonic-mean-task-aggregate": 0.0, "aggregate-score": -1}


def fake_run(path, config: dict, results: dict):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"task": "1", "lora_rank": 0, "chunk_size": 0, **config}))
    (path / "results.json").write_text(json.dumps(results))
    return str(path)


@pytest.fixture
def runs(tmp_path):
    target = result((1.0, 1.0), (1.0, 1.0))
    a = fake_run(tmp_path / "ga", {"method": "ga"}, {"before": target, "after": result((0.25, 0.5), (0.125, 0.5),
                                                                                       0.5, 0.75, auc=0.75)})
    robust = {"quant8": {"recovery": {"Task1": {"regurgitation": 0.1, "knowledge": None}}},
              "relearn": {"recovery": {"Task1": {"regurgitation": 0.5, "knowledge": 1.0}},
                          "V_knowledge": {"before": 1.0, "after": 0.25, "relearned": 1.0}}}
    b = fake_run(tmp_path / "npo", {"method": "npo", "lora_rank": 8},
                 {"after": result((0.169, 0.375), (1.0, 0.625)), "robustness": robust})
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "merge.json").write_text(json.dumps({"method": "ties"}))
    c = fake_run(tmp_path / "m", {"method": "none", "model": str(merged)}, {"before": result((0.5, 0.5), (0.9, 1.0))})
    return [a, b, c]


EXPECT = """\
| | target | GA | NPO LoRA 8 | TIES merge |
|---|---|---|---|---|
| forget Task1 regurgitation | 1.000 | 0.250 | 0.169 | 0.500 |
| forget Task2 / Task3 regurgitation | 1.000 / 1.000 | 0.500 / 0.500 | 1.000 / 1.000 | 1.000 / 1.000 |
| forget Task1 knowledge | 1.000 | 0.500 | 0.375 | 0.500 |
| forget Task2 / Task3 knowledge | 1.000 / 1.000 | 0.500 / 0.500 | 1.000 / 1.000 | 1.000 / 1.000 |
| retain Task1 regurgitation | 1.000 | 0.125 | 1.000 | 0.900 |
| retain Task2 / Task3 regurgitation | 1.000 / 1.000 | 0.750 / 0.750 | 1.000 / 1.000 | 1.000 / 1.000 |
| retain Task1 knowledge | 1.000 | 0.500 | 0.625 | 1.000 |
| retain Task2 / Task3 knowledge | 1.000 / 1.000 | 0.750 / 0.750 | 1.000 / 1.000 | 1.000 / 1.000 |
| MIA AUC (members: Task3 forget) | 1.000 | 0.750 | 1.000 | 1.000 |
| MIA score (1 - 2 abs(AUC - 0.5)) | 0.000 | 0.500 | 0.000 | 0.000 |
| harmonic-mean-task-aggregate | 0.000 | 0.000 | 0.000 | 0.000 |
| recovery after quant8 (regurgitation / knowledge) | | - | +0.10 / - | - |
| recovery after relearn (regurgitation / knowledge) | | - | +0.50 / +1.00 | - |
| relearn: held-out forget knowledge, after -> relearned | | - | 0.250 -> 1.000 | - |
| cost per step (x GA's, bench.py) | | 1.00 | 1.84 | - |"""


def test_compare_table_byte_for_byte(runs):
    bench = {"training": {"ga": {"step_vs_ga": 1.0}, "npo": {"step_vs_ga": 1.84}}}
    assert report.compare_table(runs, bench) == EXPECT


def test_compare_command_prints_the_table_and_refuses_a_non_run(runs, tmp_path, capsys):
    assert report.main(["compare", *runs, "--png", ""]) == 0
    assert capsys.readouterr().out == EXPECT.split("\n| cost")[0] + "\n"
    assert report.main(["compare", str(tmp_path), "--png", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}: no results.json")


def test_compare_png_is_drawn_when_matplotlib_is_there(runs, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "compare.png"
    assert report.compare_plot(runs, path) is None and path.stat().st_size > 1000
