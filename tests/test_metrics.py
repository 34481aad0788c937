"""metrics.py against its oracles: rouge_score 0.1.2 and NLTK (ROUGE-L, Porter), sklearn (ROC-AUC),
open-instruct's MMLU prompt format (written out by hand), and the official SemEval aggregate
(worked out by hand). Runs on the real LUME release and MMLU files from ../shared."""
import csv
import dataclasses
import json
import random
import re
import warnings

import numpy as np
import pytest

from conftest import oracle
from metrics import (aggregate, exact_match, mia_auc, mia_score, mmlu_accuracy, mmlu_choice_ids,
                     mmlu_fit_prompt, mmlu_format, mmlu_prompt, porter_stem, roc_auc,
                     rouge_l_recall, score_item, tokenize)

# -----------------------------------------------------------------------------
# helpers and fixtures


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def lume_rows(shared):
    return [r for split in ("forget", "retain")
            for r in _read_jsonl(shared / "lume-data" / "lume" / f"{split}.jsonl")]


@dataclasses.dataclass(frozen=True)
class Q:  # the fields of data.MmluQuestion; metrics.py only duck-types them
    subject: str
    question: str
    choices: tuple
    answer: str


def _read_mmlu(path, subject):
    with open(path, newline="", encoding="utf-8") as f:  # fields may hold newlines / CR
        return [Q(subject, r[0], tuple(r[1:5]), r[5]) for r in csv.reader(f)]


@pytest.fixture(scope="module")
def rouge_oracle():
    rouge_scorer = oracle("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return lambda ref, cand: scorer.score(ref, cand)["rougeL"].recall

# -----------------------------------------------------------------------------
# ROUGE-L recall and tokenizer vs rouge_score 0.1.2


def test_rouge_l_matches_rouge_score_on_every_lume_sc_item(lume_rows, rouge_oracle):
    rng = random.Random(0)
    items = [r for r in lume_rows if r["id"][:-1].endswith("sc")]
    assert len(items) == 243 + 250 + 373 + 246 + 250 + 371  # README table, both files
    n = 0
    for r in items:
        ref = r["output"]
        words = ref.split()
        rng.shuffle(words)
        for cand in (r["input"], " ".join(words), ref[: len(ref) // 2], ref):
            assert rouge_l_recall(ref, cand) == rouge_oracle(ref, cand), (r["id"], cand[:80])
            n += 1
    assert n == 4 * len(items)


HAND_CASES = [
    ("!!! ... ???", "!!!"),                          # punctuation only: no tokens -> 0
    ("Call 555-1234 at 9pm", "call 5551234 at 9 pm"),  # digits, split and joined
    ("Café naïve résumé Zürich", "cafe naive resume zurich"),  # accents are separators
    ("東京 is in Japan 🇯🇵 😀", "Japan is in 東京"),   # CJK / emoji vanish
    ("İstanbul and ΣΊΣΥΦΟΣ", "istanbul"),          # 'İ'.lower() keeps an ascii 'i'
    ("", "anything"), ("anything", ""), ("", ""),
    ("   \n\t ", "words here"), ("words here", " \r\n "),
    ("The cats were running happily.", "The cats were running happily."),
    ("generously skies dying news", "generous sky die news"),
    ("a b a b a b", "b a b a"), ("x " * 100, "x " * 30 + "y " * 70),  # > 64 tokens: bit ops
]


@pytest.mark.parametrize("ref,cand", HAND_CASES)
def test_rouge_l_hand_cases(ref, cand, rouge_oracle):
    tokenizers = oracle("rouge_score.tokenizers")
    oracle_tok = tokenizers.DefaultTokenizer(use_stemmer=True)
    assert tokenize(ref) == oracle_tok.tokenize(ref)
    assert tokenize(cand) == oracle_tok.tokenize(cand)
    assert rouge_l_recall(ref, cand) == rouge_oracle(ref, cand)


def test_rouge_l_known_values():
    s = "The cats were running happily."
    assert rouge_l_recall(s, s) == 1.0
    assert rouge_l_recall("", "x") == 0.0 and rouge_l_recall("x", "  ") == 0.0
    assert rouge_l_recall("!!!", "!!!") == 0.0  # no tokens on either side
    assert rouge_l_recall("a b c d", "d c b a") == 0.25
    assert tokenize("Running, RUNS!! 42x") == ["run", "run", "42x"]


def test_rouge_l_random_token_strings(rouge_oracle):
    # small vocabulary -> many matches; lengths around and beyond a 64-bit word
    rng = random.Random(1)
    vocab = ["alpha", "beta", "gamma", "the", "a", "runs", "running", "7", "x9"]
    for _ in range(300):
        ref = " ".join(rng.choices(vocab, k=rng.randint(1, 150)))
        cand = " ".join(rng.choices(vocab, k=rng.randint(1, 150)))
        assert rouge_l_recall(ref, cand) == rouge_oracle(ref, cand)

# -----------------------------------------------------------------------------
# Porter stemmer vs NLTK (default NLTK_EXTENSIONS mode)

TRICKY = ["generously", "ies", "dying", "lying", "tying", "sky", "skies", "news", "proceed",
          "exceed", "succeeding", "succeed", "happily", "a", "is", "by", "ties", "died", "cried",
          "caresses", "ponies", "feed", "agreed", "plastered", "bled", "motoring", "sing",
          "conflated", "troubled", "sized", "hopping", "tanned", "falling", "hissing", "fizzed",
          "failing", "filing", "happy", "enjoy", "relational", "conditional", "rational",
          "radically", "fully", "hopefully", "analogously", "archaeology", "electrically",
          "formaliti", "sensibiliti", "triplicate", "adoption", "controlling", "rolling",
          "innings", "outings", "cannings", "howe", "ore", "syzygy", "yyyy", "ayyy", "Caresses",
          "GENERALLY", "1990s", "x9y", "abli", "conformably", "ie", "s", ""]


def test_porter_matches_nltk_on_tricky_words():
    porter = oracle("nltk.stem.porter")
    stemmer = porter.PorterStemmer()
    for w in TRICKY:
        assert porter_stem(w) == stemmer.stem(w), w


def test_porter_matches_nltk_on_every_lume_word(lume_rows):
    porter = oracle("nltk.stem.porter")
    stemmer = porter.PorterStemmer()
    words = {w for r in lume_rows for text in (r["input"], r["output"])
             for w in re.sub(r"[^a-z0-9]+", " ", text.lower()).split()}
    assert len(words) > 20000
    bad = [(w, porter_stem(w), stemmer.stem(w)) for w in sorted(words)
           if porter_stem(w) != stemmer.stem(w)]
    assert not bad, bad[:10]

# -----------------------------------------------------------------------------
# exact match and per-item dispatch


def test_exact_match_and_score_item():
    assert exact_match(" Paris\n", "paris") == 1
    assert exact_match("1990-01-02", "1990-01-02.") == 0
    assert score_item("qa", "ABC", " abc ") == 1.0
    assert score_item("sc", "a b c d", "a b") == 0.5
    with pytest.raises(ValueError):
        score_item("xx", "a", "a")

# -----------------------------------------------------------------------------
# ROC-AUC vs sklearn, MIA sign convention


def _sk_auc(pos, neg):
    skm = oracle("sklearn.metrics")
    labels = [1] * len(pos) + [0] * len(neg)
    fpr, tpr, _ = skm.roc_curve(labels, np.concatenate([pos, neg]))
    return float(skm.auc(fpr, tpr))


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_matches_sklearn_random(seed):
    rng = np.random.default_rng(seed)
    pos = rng.normal(0.3, 1.0, size=rng.integers(1, 200))
    neg = rng.normal(0.0, 1.0, size=rng.integers(1, 200))
    assert roc_auc(pos, neg) == pytest.approx(_sk_auc(pos, neg), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_matches_sklearn_with_heavy_ties(seed):
    rng = np.random.default_rng(100 + seed)
    pos = rng.integers(0, 4, size=rng.integers(1, 120)).astype(float)
    neg = rng.integers(0, 4, size=rng.integers(1, 120)).astype(float)
    assert roc_auc(pos, neg) == pytest.approx(_sk_auc(pos, neg), abs=1e-12)


def test_roc_auc_edge_cases():
    assert roc_auc([2, 3], [0, 1]) == 1.0
    assert roc_auc([0, 1], [2, 3]) == 0.0
    assert roc_auc([1, 1], [1, 1, 1]) == 0.5  # all tied: the diagonal
    assert roc_auc([1, 2], [1]) == 0.75       # one tie (1/2) and one win
    assert _sk_auc(np.array([1.0, 2.0]), np.array([1.0])) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        roc_auc([], [1.0])
    with pytest.raises(ValueError):
        roc_auc([1.0, float("nan")], [0.0])


def test_mia_auc_sign_and_score():
    members, nonmembers = [0.5, 0.7, 1.0], [2.0, 2.5, 0.6]  # members mostly have LOWER loss
    # member beats nonmember when its loss is lower: 0.5 beats all 3, 0.7 and 1.0 beat 2.0 and 2.5
    # -> (3 + 2 + 2) / 9 pairs
    assert mia_auc(members, nonmembers) == pytest.approx(7 / 9)
    assert mia_auc(nonmembers, members) == pytest.approx(2 / 9)
    assert mia_score(0.5) == 1.0 and mia_score(1.0) == 0.0 and mia_score(0.0) == 0.0
    assert mia_score(0.75) == 0.5

# -----------------------------------------------------------------------------
# MMLU (Open-Instruct format) on the real files

# open-instruct eval/mmlu/run_eval.py: format_subject() gives " abstract algebra" (leading space),
# hence the double space after "about"; examples end "Answer: X\n\n"; the test one ends "Answer:".
ABSTRACT_ALGEBRA_PROMPT = (
    "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
    "A. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
    "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | "
    "If H and K are subgroups of G then HK is a subgroup of G.\n"
    "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: B\n\n"
    "Statement 1 | Every element of a group generates a cyclic subgroup of the group. "
    "Statement 2 | The symmetric group S_10 has 10 elements.\n"
    "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: C\n\n"
    "Statement 1| Every function from a finite set onto itself must be one to one. "
    "Statement 2 | Every subgroup of an abelian group is abelian.\n"
    "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: A\n\n"
    "Find the characteristic of the ring 2Z.\n"
    "A. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
    "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
    "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
)


@pytest.fixture(scope="module")
def algebra(shared):
    subj = "abstract_algebra"
    dev = _read_mmlu(shared / "mmlu" / "dev" / f"{subj}_dev.csv", subj)
    test = _read_mmlu(shared / "mmlu" / "test" / f"{subj}_test.csv", subj)
    return subj, dev, test


def test_mmlu_prompt_matches_hand_written(algebra):
    subj, dev, test = algebra
    assert len(dev) == 5
    assert mmlu_prompt(subj, dev, test[0]) == ABSTRACT_ALGEBRA_PROMPT
    assert mmlu_format(test[0], include_answer=True).endswith("D. 6\nAnswer: B\n\n")
    header = ABSTRACT_ALGEBRA_PROMPT[: ABSTRACT_ALGEBRA_PROMPT.index("Find all")]
    assert mmlu_prompt(subj, dev, test[0], k=0) == header + mmlu_format(test[0], False)


def test_mmlu_fit_prompt_drops_shots_from_the_end(algebra):
    subj, dev, test = algebra
    n_tokens = lambda text: len(text.split())
    lengths = [n_tokens(mmlu_prompt(subj, dev, test[0], k)) for k in range(6)]
    assert lengths == sorted(lengths) and len(set(lengths)) == 6
    assert mmlu_fit_prompt(subj, dev, test[0], n_tokens, 10**6) == ABSTRACT_ALGEBRA_PROMPT
    # one token short of 5 shots -> 4 shots (the first four dev rows)
    assert (mmlu_fit_prompt(subj, dev, test[0], n_tokens, lengths[5] - 1)
            == mmlu_prompt(subj, dev, test[0], 4))
    # exactly the 3-shot length fits: open-instruct drops shots only while len > max
    assert (mmlu_fit_prompt(subj, dev, test[0], n_tokens, lengths[3])
            == mmlu_prompt(subj, dev, test[0], 3))
    assert mmlu_fit_prompt(subj, dev, test[0], n_tokens, lengths[0]).count("Answer:") == 1
    with pytest.raises(ValueError):
        mmlu_fit_prompt(subj, dev, test[0], n_tokens, lengths[0] - 1)


def test_mmlu_accuracy_always_A_on_real_test_set(shared):
    records, n_a, n = [], 0, 0
    per_subject = {}
    for path in sorted((shared / "mmlu" / "test").glob("*_test.csv")):
        subj = path.name[: -len("_test.csv")]
        with open(path, newline="", encoding="utf-8") as f:
            answers = [row[5] for row in csv.reader(f)]
        n_a += answers.count("A")
        n += len(answers)
        per_subject[subj] = answers.count("A") / len(answers)
        records += [(subj, "A", a) for a in answers]  # stub predictor: always 'A'
    assert n == 14042 and len(per_subject) == 57  # mmlu/README.md
    acc = mmlu_accuracy(records)
    assert acc["average_acc"] == pytest.approx(n_a / n, abs=1e-15)
    assert acc["subject_acc"] == pytest.approx(per_subject, abs=1e-15)
    # question-weighted, not the mean over subjects
    assert acc["average_acc"] != pytest.approx(sum(per_subject.values()) / 57, abs=1e-6)


def test_mmlu_accuracy_small():
    acc = mmlu_accuracy([("x", "A", "A"), ("x", "B", "A"), ("y", "C", "C")])
    assert acc == {"average_acc": 2 / 3, "subject_acc": {"x": 0.5, "y": 1.0}}
    with pytest.raises(ValueError):
        mmlu_accuracy([])


class _FakeTokenizer:
    """encode(" A") -> [SPACE, id('A')] when split_space, else the single token id(' A')."""

    def __init__(self, split_space):
        self.split_space = split_space

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False  # a BOS would otherwise be the (wrong) first id
        assert text in (" A", " B", " C", " D")
        letter = ord(text[1]) - ord("A")
        return [99, 10 + letter] if self.split_space else [200 + letter]


def test_mmlu_choice_ids_takes_the_last_id():
    assert mmlu_choice_ids(_FakeTokenizer(split_space=True)) == [10, 11, 12, 13]
    assert mmlu_choice_ids(_FakeTokenizer(split_space=False)) == [200, 201, 202, 203]

# -----------------------------------------------------------------------------
# aggregate: the official SemEval result dict, worked by hand


def _rows(split, task, sc, qa):
    return ([{"split": split, "task": task, "kind": "sc", "score": s} for s in sc]
            + [{"split": split, "task": task, "kind": "qa", "score": s} for s in qa])


def _example_rows(forget_task3_qa=(0,)):
    return (_rows("forget", 1, [0.5, 1.0], [1, 0])           # reg 0.75, kn 0.5
            + _rows("forget", 2, [0.2], [0, 0, 0, 1])         # reg 0.2,  kn 0.25
            + _rows("forget", 3, [0.4], list(forget_task3_qa))  # reg 0.4,  kn 0.0 (default)
            + _rows("retain", 1, [1.0], [1])                  # 1.0, 1.0
            + _rows("retain", 2, [0.5], [1, 1, 0, 0])         # 0.5, 0.5
            + _rows("retain", 3, [0.75, 0.25], [1]))          # 0.5, 1.0


def test_aggregate_hand_worked_example():
    res = aggregate(_example_rows(), mia_auc=0.6, mmlu_average=0.5)
    # forget terms = 1 - [0.75, 0.5, 0.2, 0.25, 0.4, 0.0] = [0.25, 0.5, 0.8, 0.75, 0.6, 1.0]
    # retain terms = [1.0, 1.0, 0.5, 0.5, 0.5, 1.0]
    terms = [0.25, 0.5, 0.8, 0.75, 0.6, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 1.0]
    assert res["aggregated-terms"] == pytest.approx(terms, abs=1e-12)
    # reciprocals 4 + 2 + 1.25 + 4/3 + 5/3 + 1 + 1 + 1 + 2 + 2 + 2 + 1 = 20.25
    # -> HM = 12 / 20.25 = 16/27
    assert res["harmonic-mean-task-aggregate"] == pytest.approx(16 / 27, abs=1e-12)
    # mia_final = 1 - 2*|0.6 - 0.5| = 0.8; aggregate = (16/27 + 0.5 + 0.8)/3 = 511/810
    assert res["mia_loss_acc"] == 0.6 and res["mmlu_average"] == 0.5
    assert res["mia_final_score"] == pytest.approx(0.8, abs=1e-12)
    assert res["aggregate-score"] == pytest.approx(511 / 810, abs=1e-12)
    # per split: overall means over all items, and per-task means under 'TaskN'
    f = res["forget-set"]
    assert f["overall-regurgitation-score"] == pytest.approx((0.5 + 1.0 + 0.2 + 0.4) / 4)
    assert f["overall-knowledge-score"] == pytest.approx(2 / 7)
    assert f["Task2"] == pytest.approx({"regurgitation-score": 0.2, "knowledge-score": 0.25})
    assert res["retain-set"]["Task3"] == {"regurgitation-score": 0.5, "knowledge-score": 1.0}
    assert res["notes"] == []
    assert list(res)[:2] == ["forget-set", "retain-set"]
    # json-serialisable, plain floats
    assert json.loads(json.dumps(res))["aggregated-terms"] == res["aggregated-terms"]
    assert all(type(t) is float for t in res["aggregated-terms"])


def test_aggregate_zero_term_and_missing_mmlu():
    # forget Task3 knowledge 1.0 -> term 1 - 1.0 = 0 -> harmonic mean 0 (statistics semantics)
    res = aggregate(_example_rows(forget_task3_qa=(1,)), mia_auc=0.6, mmlu_average=0.5)
    assert 0.0 in res["aggregated-terms"]
    assert res["harmonic-mean-task-aggregate"] == 0.0
    assert res["aggregate-score"] == pytest.approx((0.0 + 0.5 + 0.8) / 3)
    # without MMLU: no final score, aggregate-score stays -1, MIA still reported
    res = aggregate(_example_rows(), mia_auc=0.6)
    assert res["aggregate-score"] == -1 and "mia_final_score" not in res
    assert res["mia_loss_acc"] == 0.6 and "mmlu_average" not in res
    res = aggregate(_example_rows())
    assert res["aggregate-score"] == -1 and "mia_loss_acc" not in res


def test_aggregate_missing_task_is_left_out_with_a_note():
    rows = [r for r in _example_rows() if r["task"] != 2]
    res = aggregate(rows)
    # terms: forget T1 [0.25, 0.5], T3 [0.6, 1.0]; retain T1 [1, 1], T3 [0.5, 1.0]
    # reciprocals 4 + 2 + 5/3 + 1 + 1 + 1 + 2 + 1 = 41/3 -> HM = 8 / (41/3) = 24/41
    assert res["aggregated-terms"] == pytest.approx([0.25, 0.5, 0.6, 1.0, 1.0, 1.0, 0.5, 1.0])
    assert res["harmonic-mean-task-aggregate"] == pytest.approx(24 / 41, abs=1e-12)
    assert "Task2" not in res["forget-set"] and "Task2" not in res["retain-set"]
    assert len(res["notes"]) == 2 and all("Task2" in n for n in res["notes"])


def test_aggregate_mmlu_threshold_note_and_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note in the results, never a Python warning with a source path
        res = aggregate(_example_rows(), mia_auc=0.5, mmlu_average=0.3)
    assert any("0.371" in n for n in res["notes"])
    assert res["aggregate-score"] == pytest.approx((16 / 27 + 0.3 + 1.0) / 3)
    # a task with sc items but no qa items: the official scorer would produce NaN; we refuse
    rows = [r for r in _example_rows() if not (r["task"] == 3 and r["kind"] == "qa")]
    with pytest.raises(ValueError, match="Task3"):
        aggregate(rows)
    with pytest.raises(ValueError):
        aggregate([])
    with pytest.raises(ValueError, match="retain"):  # a whole split missing is an error, not a note
        aggregate([r for r in _example_rows() if r["split"] == "forget"])
    # 'TaskN' strings (the raw LUME files) work like ints
    rows = [{**r, "task": f"Task{r['task']}"} for r in _example_rows()]
    assert aggregate(rows)["aggregated-terms"] == aggregate(_example_rows())["aggregated-terms"]
