"""namm_eval.metrics against values worked out by hand from the metric definitions."""
import pytest

from namm_eval import metrics as M
from namm_eval.metrics import (
    LONGBENCH_DATASET_METRIC,
    LONGBENCH_MAX_NEW_TOKENS,
    METRICS,
    classification_score,
    code_sim_score,
    contains_answer,
    count_score,
    exact_match,
    normalize_answer,
    normalize_zh_answer,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
    score_prediction,
)

approx = pytest.approx


# ---------------------------------------------------------------- normalisation

def test_normalize_answer():
    # lower -> "the u.s. army's  best!"; punctuation deleted -> "the us armys  best";
    # article "the" -> " "; whitespace collapsed.
    assert normalize_answer("The U.S. Army's  best!") == "us armys best"
    # punctuation goes before articles, so "the-cat" becomes the single word "thecat"
    assert normalize_answer("the-cat") == "thecat"
    # only whole words are articles
    assert normalize_answer("An anthem, a theme") == "anthem theme"
    assert normalize_answer("  ...  ") == ""


def test_normalize_zh_answer():
    # lower, drop ASCII and Chinese punctuation, drop all whitespace
    assert normalize_zh_answer("Hello， 世界！ “好”") == "hello世界好"
    # LongBench's punctuation list strips the closing book-title mark but not the opening one,
    # nor the full-width full stop U+FF0E; kept identical for comparable scores.
    assert normalize_zh_answer("《书》") == "《书"
    assert normalize_zh_answer("a．b") == "a．b"


# ---------------------------------------------------------------- QA F1

def test_qa_f1_by_hand():
    # "cat sat" vs "cat sat down": overlap 2, precision 2/2, recall 2/3 -> 2*(1*2/3)/(1+2/3) = 0.8
    assert qa_f1_score("the cat sat", "a cat sat down") == approx(0.8)
    # multiset overlap: {cat:2, dog:1} & {cat:1, dog:2} = 2 words; P = R = 2/3 -> F1 = 2/3
    assert qa_f1_score("cat cat dog", "cat dog dog") == approx(2 / 3)
    assert qa_f1_score("Paris.", "paris") == 1.0
    assert qa_f1_score("London", "Paris") == 0.0


def test_qa_f1_empty():
    assert qa_f1_score("", "Paris") == 0.0
    assert qa_f1_score("...", "Paris") == 0.0          # punctuation only normalises to nothing
    assert qa_f1_score("Paris", "") == 0.0


def test_jieba_tokenisation_used_below():
    # The expected values below are computed from these (jieba 0.42.1, precise mode, HMM on).
    words = M._jieba_words
    assert words("他毕业于清华大学计算机系") == ["他", "毕业", "于", "清华大学", "计算机系"]
    assert words("北京是中国的首都。") == ["北京", "是", "中国", "的", "首都", "。"]
    assert words("中国的首都是北京") == ["中国", "的", "首都", "是", "北京"]
    assert words("《红楼梦》的作者是曹雪芹") == ["《", "红楼梦", "》", "的", "作者", "是", "曹雪芹"]


def test_qa_f1_zh_by_hand():
    # 5 words vs ["清华大学"]: overlap 1, P = 1/5, R = 1 -> 2*(1/5)/(6/5) = 1/3
    assert qa_f1_zh_score("他毕业于清华大学计算机系", "清华大学") == approx(1 / 3)
    # "。" normalises away: the same 5 words in another order -> 1.0
    assert qa_f1_zh_score("北京是中国的首都。", "中国的首都是北京") == approx(1.0)
    # "》" is dropped but "《" stays a word: 6 words, P = 1/6, R = 1 -> 2*(1/6)/(7/6) = 2/7
    assert qa_f1_zh_score("《红楼梦》的作者是曹雪芹", "曹雪芹") == approx(2 / 7)
    assert qa_f1_zh_score("", "曹雪芹") == 0.0


# ---------------------------------------------------------------- ROUGE-L

def test_rouge_l_by_hand():
    # 6 tokens each, LCS "the cat on the mat" = 5 -> P = R = 5/6 -> F = 5/6
    assert rouge_score("the cat sat on the mat", "the cat is on the mat") == approx(5 / 6)
    # tokens are case-sensitive (as in the `rouge` package): LCS is "cat" only -> P = R = 1/2
    assert rouge_score("The cat", "the cat") == approx(0.5)
    # "." separates words like whitespace does; other punctuation stays on the word
    assert rouge_score("Hello.World", "Hello World") == approx(1.0)
    assert rouge_score("cat,", "cat") == 0.0
    # repeats count: LCS 2, P = 2/2, R = 2/5 -> F = 2*0.4/1.4 = 4/7 (the `rouge` package,
    # counting distinct words, would give R = 2/4 and F = 2/3)
    assert rouge_score("the dog", "the cat and the dog") == approx(4 / 7)


def test_rouge_l_empty():
    assert rouge_score("", "some reference") == 0.0
    assert rouge_score("...", "some reference") == 0.0


def test_rouge_zh_by_hand():
    # pred words: 北京 是 中国 的 首都 。 (6); ref words: 中国 的 首都 是 北京 (5)
    # LCS "中国 的 首都" = 3 -> P = 3/6, R = 3/5 -> F = 2*0.3/1.1 = 6/11
    assert rouge_zh_score("北京是中国的首都。", "中国的首都是北京") == approx(6 / 11)
    assert rouge_zh_score("", "中国的首都是北京") == 0.0


# ---------------------------------------------------------------- classification

CLASSES = ["Food", "Animal", "Location"]


def test_classification_by_hand():
    assert classification_score("Food", "Food", CLASSES) == 1.0
    # two classes mentioned, one right -> 1/2
    assert classification_score("Food or Animal", "Food", CLASSES) == 0.5
    assert classification_score("Animal", "Food", CLASSES) == 0.0
    assert classification_score("no idea", "Food", CLASSES) == 0.0
    assert classification_score("", "Food", CLASSES) == 0.0


def test_classification_drops_parts_of_the_answer():
    # "location" and "Other" are proper substrings of the right class, so naming "Other location"
    # does not count as also naming them: 1 candidate left -> 1.0. (LongBench's loop, removing while
    # iterating, would skip "location" after removing "Other" and give 1/2.)
    classes = ["Other", "location", "Other location", "city"]
    assert classification_score("Other location", "Other location", classes) == 1.0
    assert classification_score("Other location or city", "Other location", classes) == 0.5


def test_classification_needs_classes():
    with pytest.raises(ValueError):
        classification_score("Food", "Food")


# ---------------------------------------------------------------- retrieval and count

def test_retrieval_by_hand():
    # integers in the prediction: 3, 5; one equals 3 -> 1/2
    assert retrieval_score("Paragraph 3 and Paragraph 5", "Paragraph 3") == 0.5
    assert retrieval_score("The answer is Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 13", "Paragraph 3") == 0.0     # whole numbers, not digits
    assert retrieval_score("I don't know", "Paragraph 3") == 0.0
    assert retrieval_score("", "Paragraph 3") == 0.0
    assert retrieval_score("Paragraph 3", "3") == 1.0                 # bare-number ground truth


def test_retrieval_zh_by_hand():
    assert retrieval_zh_score("段落3", "段落3") == 1.0
    assert retrieval_zh_score("答案是段落3和段落12", "段落3") == 0.5
    assert retrieval_zh_score("不知道", "段落3") == 0.0


def test_count_by_hand():
    assert count_score("there are 4 or 5", "4") == 0.5
    assert count_score("4", "4") == 1.0
    assert count_score("4, 4 and 5", "4") == approx(2 / 3)
    assert count_score("04", "4") == 0.0                               # compared as text
    assert count_score("no idea", "4") == 0.0
    assert count_score("", "4") == 0.0


# ---------------------------------------------------------------- code similarity

def test_code_sim_by_hand():
    # "x = 1" vs "x = 2": LCS 4 of total length 10 -> 2*4/10 = 0.8
    assert code_sim_score("x = 1", "x = 2") == approx(0.8)
    assert code_sim_score("x = foo(1)", "x = foo(1)") == 1.0
    # leading blank lines, a markdown fence and comment lines are skipped; the next line is scored
    assert code_sim_score("\n\n```python\n# set x\n// also a comment\nx = 1\ny = 2\n```", "x = 2") == approx(0.8)
    # a line with "#" anywhere is skipped, even inside a string literal
    assert code_sim_score('s = "#"\nx = 1', "x = 2") == approx(0.8)


def test_code_sim_empty():
    assert code_sim_score("", "x = 2") == 0.0
    assert code_sim_score("# only a comment", "x = 2") == 0.0


# ---------------------------------------------------------------- exact match, contains

def test_exact_match():
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("cat sat", "cat") == 0.0
    assert exact_match("", "") == 0.0                                  # nothing is never a match


def test_contains_answer():
    assert contains_answer("The pass key is 71432.", "71432") == 1.0
    assert contains_answer("It is the Eiffel Tower!", "The eiffel tower") == 1.0
    assert contains_answer("The pass key is 714.", "71432") == 0.0
    assert contains_answer("", "71432") == 0.0
    assert contains_answer("anything", "the") == 0.0                   # normalises to nothing


# ---------------------------------------------------------------- registry and datasets

def test_metrics_registry():
    assert set(METRICS) == {
        "qa_f1_score", "qa_f1_zh_score", "rouge_score", "rouge_zh_score", "classification_score",
        "retrieval_score", "retrieval_zh_score", "count_score", "code_sim_score", "exact_match",
        "contains_answer", "recall_contained"}
    for name, fn in METRICS.items():
        value = fn("Paragraph 1 has 2 cats, 段落1", "Paragraph 1", all_classes=["cats"])
        assert isinstance(value, float) and 0.0 <= value <= 1.0, name


def test_longbench_tables():
    assert len(LONGBENCH_DATASET_METRIC) == 21 + 13          # LongBench + LongBench-E
    assert set(LONGBENCH_MAX_NEW_TOKENS) == set(LONGBENCH_DATASET_METRIC)
    assert set(LONGBENCH_DATASET_METRIC.values()) <= set(METRICS)
    assert LONGBENCH_DATASET_METRIC["multifieldqa_zh"] == "qa_f1_zh_score"
    assert LONGBENCH_DATASET_METRIC["dureader"] == "rouge_zh_score"
    assert LONGBENCH_DATASET_METRIC["lsht"] == "classification_score"
    assert LONGBENCH_DATASET_METRIC["passage_retrieval_zh"] == "retrieval_zh_score"
    assert LONGBENCH_DATASET_METRIC["repobench-p_e"] == "code_sim_score"
    assert LONGBENCH_MAX_NEW_TOKENS["gov_report"] == 512
    assert LONGBENCH_MAX_NEW_TOKENS["samsum"] == 128
    assert LONGBENCH_MAX_NEW_TOKENS["hotpotqa_e"] == 32
    assert LONGBENCH_MAX_NEW_TOKENS["lcc"] == 64


# ---------------------------------------------------------------- score_prediction

def test_best_over_answers():
    # 0 for "dog", 0.8 for "cat sat down" -> 0.8
    assert score_prediction("the cat sat", ["dog", "cat sat down"], "qa_f1_score") == approx(0.8)
    assert score_prediction("cat sat", ["dog", "cat sat down", "cat sat"], "qa_f1_score") == 1.0
    assert score_prediction("cat sat", "cat sat", "qa_f1_score") == 1.0       # a single answer string
    assert score_prediction("cat sat", [], "qa_f1_score") == 0.0
    assert score_prediction("x", ["x"], exact_match) == 1.0                   # a metric function


def test_first_line_post_processing():
    pred = "\nParis\nQuestion: what is the capital? Answer: London"
    # whole prediction: "paris question what is capital answer london" = 7 words, P = 1/7, R = 1
    # -> F1 = 2*(1/7)/(8/7) = 0.25
    assert score_prediction(pred, ["Paris"], "qa_f1_score") == approx(0.25)
    assert score_prediction(pred, ["Paris"], "qa_f1_score", dataset="hotpotqa") == approx(0.25)
    # triviaqa predictions are cut at the first line (leading line breaks ignored) -> "Paris"
    assert score_prediction(pred, ["Paris"], "qa_f1_score", dataset="triviaqa") == 1.0
    assert score_prediction(pred, ["Paris"], "qa_f1_score", dataset="triviaqa_e") == 1.0
    # trec: "Food" only, not the made-up next example's "Animal" -> 1 instead of 1/2
    trec = "Food\nQuestion: what eats mice?\nType: Animal"
    assert score_prediction(trec, ["Food"], "classification_score", CLASSES) == 0.5
    assert score_prediction(trec, ["Food"], "classification_score", CLASSES, dataset="trec") == 1.0
    # the dataset's own metric when none is given
    assert score_prediction(trec, ["Food"], None, CLASSES, dataset="trec") == 1.0


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric"):
        score_prediction("x", ["x"], "bleu")


def test_recall_contained_scores_the_whole_answer_list():
    # 2 of the 3 required values appear -> 2/3; the best-over-answers rule does not apply
    assert score_prediction("values are 12 and 34", ["12", "34", "56"], "recall_contained") == pytest.approx(2 / 3)
    assert score_prediction("nothing here", ["12"], "recall_contained") == 0.0
    assert score_prediction("12 34 56", ["12", "34", "56"], "recall_contained") == 1.0


def test_result_header_ignores_result_files_but_not_code(tmp_path):
    """A result file's header says "with uncommitted changes" when code differs from the commit,
    not when only bench/results/ does (a board writes its parquet between commits)."""
    import shutil
    import subprocess

    from namm_eval import report

    repo = tmp_path / "repo"
    (repo / "namm_eval").mkdir(parents=True)
    (repo / "bench" / "results").mkdir(parents=True)
    shutil.copy(report.__file__, repo / "namm_eval" / "report.py")
    (repo / "bench" / "results" / "board.parquet").write_text("rows")
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "x", "--allow-empty")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "y")
    import importlib.util
    spec = importlib.util.spec_from_file_location("report_copy", repo / "namm_eval" / "report.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    (repo / "bench" / "results" / "board.parquet").write_text("more rows")
    assert "uncommitted" not in copy.result_header(["bench/x.py"])
    (repo / "namm_eval" / "report.py").write_text((repo / "namm_eval" / "report.py").read_text() + "\n# changed\n")
    assert "(with uncommitted changes)" in copy.result_header(["bench/x.py"])


def test_result_header_names_the_machine():
    """Timings depend on the CPU's bf16 instructions: every result file says what it ran on."""
    import torch

    from namm_eval import report

    header = report.result_header(["bench/x.py"])
    machine = [line for line in header.splitlines() if line.startswith("Machine: ")]
    assert len(machine) == 1
    assert f"{torch.get_num_threads()} torch threads" in machine[0] and torch.__version__ in machine[0]


def test_the_cpu_and_its_bf16_instructions_are_read_from_cpuinfo():
    from namm_eval.report import cpu_from_cpuinfo

    text = ("processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu avx2 avx512f amx_bf16\n\n"
            "processor\t: 1\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu\n")
    model, flags = cpu_from_cpuinfo(text)
    assert model == "Some CPU @ 2.0GHz" and {"avx2", "avx512f", "amx_bf16"} <= flags and "avx512_bf16" not in flags
    assert cpu_from_cpuinfo("") == ("", set())
