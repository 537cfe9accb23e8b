"""eval.py's scoring, checked against figures worked out independently: Super-NI on the real task files
(tests/fixtures/eval/superni, copied unchanged from allenai/natural-instructions), ROUGE-L against rouge_score called the way the
official script calls it and against a hand LCS, the Vicuna judge over HTTP. The end-to-end run with tiny checkpoints is in test_eval_e2e.py."""
import json
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import eval as E
from conftest import EVAL_FIXTURES as FIXTURES
SUPERNI = os.path.join(FIXTURES, "superni")


@pytest.fixture(autouse=True)
def fresh_problems():
    E.PROBLEMS.clear()  # each test sees only the problems it caused


def task_file(name):
    with open(os.path.join(SUPERNI, "tasks", name + ".json"), encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- Super-NI: reading and prompts
def test_superni_reads_the_split_and_first_100_instances(tmp_path):
    items = E.read_superni(SUPERNI)
    by_task = {}
    for item in items:
        by_task.setdefault(item["task"], []).append(item)
    assert sorted(by_task) == ["task121_zest_text_modification", "task1393_superglue_copa_text_completion",
                               "task648_answer_generation"]
    for name, rows in by_task.items():
        assert [r["id"] for r in rows] == [inst["id"] for inst in task_file(name)["Instances"][:100]]
    assert {r["category"] for r in by_task["task648_answer_generation"]} == {"coreference_resolution"}
    assert {r["category"] for r in by_task["task121_zest_text_modification"]} == {"question_rewriting"}
    assert any("116 of 119 tasks have no file" in p for p in E.PROBLEMS)  # the split has 119 tasks, 3 files here
    assert len(E.read_superni(SUPERNI, max_instances=7)) == 21


def test_superni_prompt_is_definition_and_input_in_the_alpaca_template():
    item = next(i for i in E.read_superni(SUPERNI) if i["task"].startswith("task1393"))
    definition = task_file("task1393_superglue_copa_text_completion")["Definition"][0].strip()
    expected = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{definition}\n\n"  # ends in '"' (punctuation): no period added
                "### Input:\nThe man fell unconscious. (A) The assailant struck the man in the head. (B) The assailant "
                "took the man's wallet., Question: cause.\n\n### Response:")  # the period rule added "."
    assert item["prompt"] == expected
    assert E.with_period("no period") == "no period." and E.with_period("  done! ") == "done!"


def test_superni_bad_task_files_are_reported_and_skipped(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "test_tasks.txt").write_text("task_empty\ntask_badref\ntask_broken\n")
    (tmp_path / "tasks" / "task_empty.json").write_text(json.dumps(
        {"Definition": ["Do it."], "Categories": ["Title Generation"], "Instances": []}))
    (tmp_path / "tasks" / "task_badref.json").write_text(json.dumps(
        {"Definition": "Do it.", "Categories": ["Title Generation"],
         "Instances": [{"id": "x-1", "input": "a", "output": []}, {"id": "x-2", "input": "b", "output": ["B"]}]}))
    (tmp_path / "tasks" / "task_broken.json").write_text("{not json")
    items = E.read_superni(str(tmp_path))
    assert [i["id"] for i in items] == ["x-2"]  # a bare-string Definition (older format) is accepted
    assert any("task_empty.json" in p and "Instances" in p for p in E.PROBLEMS)
    assert any("task_badref.json" in p and "x-1" in p and "reference" in p for p in E.PROBLEMS)
    assert any("task_broken.json" in p and "JSON" in p for p in E.PROBLEMS)


# ----------------------------------------------------------------------------- Super-NI: metrics
def hand_tokens(text):
    """rouge_score's default tokenizer written out from its description (rouge_score/tokenize.py): lowercase, runs of
    non-[a-z0-9] to spaces, split, Porter-stem tokens longer than 3 characters."""
    from nltk.stem import porter
    stemmer = porter.PorterStemmer()
    tokens = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return [stemmer.stem(t) if len(t) > 3 else t for t in tokens]


def hand_rouge_l(prediction, reference):
    p, r = hand_tokens(prediction), hand_tokens(reference)
    lcs = [[0] * (len(r) + 1) for _ in range(len(p) + 1)]
    for i, a in enumerate(p):
        for j, b in enumerate(r):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if a == b else max(lcs[i][j + 1], lcs[i + 1][j])
    n = lcs[-1][-1]
    if not p or not r or n == 0:
        return 0.0
    precision, recall = n / len(p), n / len(r)
    return 2 * precision * recall / (precision + recall)


def test_rouge_l_by_hand():
    # 4 predicted tokens, 1 reference token, LCS 1: P = 1/4, R = 1, F = 0.4
    assert E.rouge_l("The answer is A.", "A") == pytest.approx(0.4)
    # LCS("the cat sat on the mat", "the cat is on a mat") = the cat on mat = 4; P = 4/6, R = 4/6
    assert E.rouge_l("the cat sat on the mat", "the cat is on a mat") == pytest.approx(4 / 6)
    # order matters: LCS("b a", "a b") = 1 -> P = R = 1/2
    assert E.rouge_l("b a", "a b") == pytest.approx(0.5)
    # stemming (tokens longer than 3 characters only): running/runs -> run; "was"/"is" stay different
    assert E.rouge_l("He was running", "he is runs") == pytest.approx(2 / 3)
    assert E.rouge_l("", "anything") == 0.0 and E.rouge_l("!!!", "!!!") == 0.0  # empty token lists
    assert E.rouge_l("Café naïve", "caf na ve") == pytest.approx(1.0)  # non [a-z0-9] chars become spaces


def test_rouge_l_parity_with_the_official_call_and_a_hand_lcs():
    """On real pairs (task121: every instance's input against each of its references, and the references against
    each other) our ROUGE-L equals rouge_score called as the official script calls it, and the hand LCS."""
    from rouge_score import rouge_scorer
    official = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # eval/automatic/evaluation.py @ 8540acd3
    pairs = []
    for inst in task_file("task121_zest_text_modification")["Instances"]:
        pairs += [(inst["input"], ref) for ref in inst["output"]] + [(inst["output"][0], r) for r in inst["output"][1:]]
    ours = [E.rouge_l(p, r) for p, r in pairs]
    theirs = [official.score(prediction=p, target=r)["rougeL"].fmeasure for p, r in pairs]
    by_hand = [hand_rouge_l(p, r) for p, r in pairs]
    assert len(pairs) > 130 and max(abs(a - b) for a, b in zip(ours, theirs)) == 0.0
    assert max(abs(a - b) for a, b in zip(ours, by_hand)) < 1e-12
    assert 0.1 < sum(ours) / len(ours) < 0.9  # real overlap, neither trivial 0 nor 1


def test_exact_match_normalisation():
    assert E.normalize_answer("  The  City, Councilmen! ") == "the city councilmen"
    assert E.exact_match("The city councilmen.", "the city councilmen") == 1.0
    assert E.exact_match("city councilmen", "the city councilmen") == 0.0  # articles are kept
    assert E.exact_match("A", "B") == 0.0 and E.exact_match("(A)", "a") == 1.0
    assert E.exact_match("naïve", "naive") == 0.0  # only string.punctuation is removed
    assert E.superni_metrics(["a", "x"], [["b", "A."], ["y"]]) == {"exact_match": 50.0, "rougeL": 50.0}


def test_superni_scores_on_the_real_task_files():
    """Known predictions, figures worked out by hand: task1393 all "A" (its first 100 are 50 A / 50 B) -> 50/50;
    task648 the reference with a capital and a period -> 100/100; task121 its second reference where it has one,
    else nothing -> max over references gives 100 on those, 0 on the rest."""
    items = E.read_superni(SUPERNI)
    t121 = task_file("task121_zest_text_modification")["Instances"][:100]
    with_two = {inst["id"]: inst["output"][1] for inst in t121 if len(inst["output"]) > 1}
    outputs = {}
    for item in items:
        if item["task"].startswith("task1393"):
            outputs[item["id"]] = "A"
        elif item["task"].startswith("task648"):
            outputs[item["id"]] = item["references"][0].capitalize() + "."
        elif item["id"] in with_two:
            outputs[item["id"]] = with_two[item["id"]]
    k = len(with_two)
    assert 0 < k < 100
    result = E.score_superni(items, outputs)
    assert result["per_task"]["task1393_superglue_copa_text_completion"] == {"exact_match": 50.0, "rougeL": 50.0}
    assert result["per_task"]["task648_answer_generation"] == {"exact_match": 100.0, "rougeL": 100.0}
    assert result["per_task"]["task121_zest_text_modification"] == {"exact_match": float(k), "rougeL": float(k)}
    assert result["overall"] == {"exact_match": round((50 + 100 + k) / 3, 4), "rougeL": round((50 + 100 + k) / 3, 4)}
    assert result["per_category"]["cause_effect_classification"] == {"exact_match": 50.0, "rougeL": 50.0,
                                                                    "metric": "exact_match"}
    assert result["per_category"]["question_rewriting"]["metric"] == "rougeL"
    assert len(result["items"]) == 300 and "prompt" not in result["items"][0]
    # a wrong word order: EM 0, ROUGE-L from the LCS; a missing prediction is scored as ""
    one = [i for i in items if i["task"].startswith("task648")][:2]
    ref = one[0]["references"][0]  # "the city councilmen"
    scored = E.score_superni(one, {one[0]["id"]: "councilmen city the"})
    assert ref == "the city councilmen" and scored["items"][0]["exact_match"] == 0.0
    assert scored["items"][0]["rougeL"] == pytest.approx(1 / 3) and scored["items"][1]["rougeL"] == 0.0
    assert scored["overall"] == {"exact_match": 0.0, "rougeL": round(100 * (1 / 3) / 2, 4)}


# ----------------------------------------------------------------------------- Vicuna QA
def test_verdicts_and_both_orders_rule():
    assert E.parse_verdict("... so [[B]]") == "B" and E.parse_verdict("[[C]]") == "tie"
    assert E.parse_verdict("first [[B]] then [[A]]") == "A"  # FastChat's substring order: [[A]] is tested first
    assert E.parse_verdict("Assistant A is better.") == "error"
    assert E.combine_games("A", "B") == "win" and E.combine_games("B", "A") == "lose"
    assert E.combine_games("A", "A") == "tie"  # position bias: the orders disagree
    assert E.combine_games("tie", "tie") == "tie" and E.combine_games("tie", "B") == "tie"
    assert E.combine_games("B", "tie") == "tie" and E.combine_games("error", "A") == "error"


def test_judge_prompt_structure():
    general = E.judge_messages("Q?", "ans a", "ans b")
    assert [m["role"] for m in general] == ["system", "user"]
    assert "[[A]]" in general[0]["content"] and "[[C]]" in general[0]["content"]
    assert "helpfulness" in general[0]["content"] and "Reference" not in general[1]["content"]
    user = general[1]["content"]
    assert user.index("Q?") < user.index("ans a") < user.index("ans b")
    math = E.judge_messages("Q?", "ans a", "ans b", reference="42")
    assert "reference answer" in math[0]["content"].lower() and "correctness" in math[0]["content"]
    user = math[1]["content"]
    assert user.index("Q?") < user.index("42") < user.index("ans a") < user.index("ans b")


class JudgeHandler(BaseHTTPRequestHandler):
    """A test-only OpenAI-shaped judge: prefers the longer answer; "ALWAYS_A" questions get [[A]] in both orders;
    "NO_VERDICT" questions get a reply without a verdict."""
    requests_seen = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        JudgeHandler.requests_seen.append(body)
        user = body["messages"][-1]["content"]
        answers = re.findall(r"\[The Start of Assistant [AB]'s Answer\]\n(.*?)\n\[The End", user, flags=re.S)
        a, b = answers if len(answers) == 2 else ("", "")
        if len(answers) != 2:  # not a judgment: the pre-flight request
            text = "OK"
        elif "NO_VERDICT" in user:
            text = "Both answers have merits; I cannot decide."
        elif "ALWAYS_A" in user:
            text = "Assistant A. [[A]]"
        else:
            text = "Longer is better. " + ("[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]")
        reply = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    JudgeHandler.requests_seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_vicuna_judge_counts_both_orders_and_reports_no_verdict(judge_url, tmp_path):
    from client import TeacherClient
    questions = [{"id": "1", "category": "generic", "question": "Q one"},
                 {"id": "2", "category": "generic", "question": "Q two"},
                 {"id": "3", "category": "generic", "question": "Q three ALWAYS_A"},
                 {"id": "4", "category": "generic", "question": "Q four NO_VERDICT"},
                 {"id": "61", "category": "coding", "question": "Write code"}]
    answers = {"m1": {"1": "a long answer", "2": "s", "3": "x", "4": "y", "61": "code code"},
               "m2": {"1": "short", "2": "a longer one", "3": "z", "4": "w", "61": "c"}}
    references = {"61": "REFERENCE CODE"}
    client = TeacherClient(judge_url, "judge", cache_path=str(tmp_path / "cache.jsonl"))
    E.PROBLEMS.clear()
    result = E.judge_vicuna(client, questions, references, answers, [("m1", "m2")])
    counts = result["pairs"]["m1 vs m2"]
    assert (counts["win"], counts["lose"], counts["tie"], counts["error"]) == (2, 1, 1, 1)
    assert counts["win_rate"] == 0.5 and counts["adjusted_win_rate"] == 0.625
    assert any("question 4" in p and "no verdict" in p for p in E.PROBLEMS)
    assert len(JudgeHandler.requests_seen) == 10
    coding = [r for r in JudgeHandler.requests_seen if "Write code" in r["messages"][-1]["content"]]
    assert len(coding) == 2 and all("REFERENCE CODE" in r["messages"][-1]["content"] for r in coding)
    assert all(r["temperature"] == 0 and r["max_tokens"] == 2048 for r in JudgeHandler.requests_seen)
    game2 = [j for j in result["judgments"] if j["question_id"] == "1"][0]
    assert (game2["g1_verdict"], game2["g2_verdict"], game2["result_for_model_1"]) == ("A", "B", "win")
    # resumable: a second run over the same cache sends nothing
    again = E.judge_vicuna(TeacherClient(judge_url, "judge", cache_path=str(tmp_path / "cache.jsonl")),
                           questions, references, answers, [("m1", "m2")])
    assert len(JudgeHandler.requests_seen) == 10 and again["pairs"] == result["pairs"]


def test_vicuna_reader_reports_malformed_lines(tmp_path):
    (tmp_path / "question.jsonl").write_text(
        '{"question_id": 1, "category": "generic", "turns": ["Hi?"]}\n{"question_id": 2, "categ\n'
        '{"question_id": 3, "category": "math", "text": "1+1?"}\n{"category": "x"}\n')
    questions, references = E.read_vicuna(str(tmp_path))
    assert [q["id"] for q in questions] == ["1", "3"] and references == {}
    assert questions[1]["prompt"].endswith("### Instruction:\n1+1?\n\n### Response:")
    assert any("question.jsonl, line 2" in p and "malformed" in p for p in E.PROBLEMS)
    assert any("question.jsonl" in p and "record 3" in p for p in E.PROBLEMS)
    real, refs = E.read_vicuna(os.path.join(FIXTURES, "vicuna"))
    assert len(real) == 80 and sorted(refs, key=int) == [str(i) for i in range(61, 71)]
    assert sum(q["category"] in E.REFERENCE_CATEGORIES for q in real) == 10


def test_vicuna_references_in_fastchats_folder_layout_and_both_layouts_refused(tmp_path):
    """FastChat keeps GPT-4's answers in reference_answer/gpt-4.jsonl; the flat file is read the same, and a
    folder holding both is refused by name rather than one overriding the other."""
    shutil.copy(os.path.join(FIXTURES, "vicuna", "question.jsonl"), tmp_path)
    (tmp_path / "reference_answer").mkdir()
    flat = os.path.join(FIXTURES, "vicuna", "reference_answer_gpt-4.jsonl")
    shutil.copy(flat, tmp_path / "reference_answer" / "gpt-4.jsonl")
    _, from_folder = E.read_vicuna(str(tmp_path))
    _, from_flat = E.read_vicuna(os.path.join(FIXTURES, "vicuna"))
    assert from_folder == from_flat and len(from_folder) == 10
    shutil.copy(flat, tmp_path)
    with pytest.raises(E.EvalError, match=r"both .*reference_answer_gpt-4\.jsonl and .*gpt-4\.jsonl exist"):
        E.read_vicuna(str(tmp_path))
