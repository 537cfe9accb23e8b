"""`python demo.py --size ci`: the whole method end to end, offline, through the real commands.

One run (about 2 minutes on 2 cores) is shared by the tests below; a second run on the same folder must
redo nothing and pay for no teacher request. results.svg is read back as XML: one panel per stage whose
curves are the stage's metrics.jsonl, and the held-out scores of results.json."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest

import checkpoint
import data
import demo
import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["SFT (Alpaca)", "Tuna_p", "Tuna_c", "Tuna", "teacher (for reference)"]


def run_demo(out):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--size", "ci", "--out", str(out)],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    first = run_demo(out)
    return out, first


@pytest.mark.slow
def test_demo_table_covers_every_stage_and_ranking_does_not_hurt(demo_run):
    out, first = demo_run
    results = json.load(open(out / "results.json"))
    assert list(results) == MODELS
    heldout = json.load(open(out / "heldout.json"))
    for name in MODELS:
        r = results[name]
        assert r["items"] == len(heldout) == len(r["answers"]) == demo.SIZES["ci"]["heldout"]
        assert 0 <= r["exact_match"] <= 100 and 0 <= r["rouge_l"] <= 100
        # the table's figure is the mean of the per-item answers it keeps
        em = [a["answer"].strip().lower() == a["reference"].lower() for a in r["answers"]]
        assert r["exact_match"] == pytest.approx(100 * sum(em) / len(em))
    # the bar for the test-sized run: the final model is not below the SFT baseline
    assert results["Tuna"]["exact_match"] >= results["SFT (Alpaca)"]["exact_match"]
    table = open(out / "results.md").read()
    assert all(f"| {name} |" in table for name in MODELS) and "rule-based judge" in table
    assert "](results.svg)" in table                            # the picture is linked from the table
    assert table.splitlines()[2] in first.stdout               # the table is printed too


@pytest.mark.slow
def test_demo_artefacts_are_well_formed(demo_run):
    out, _ = demo_run
    train = json.load(open(out / "sft_data.json"))
    clean = json.load(open(out / "teacher_data.json"))
    heldout = json.load(open(out / "heldout.json"))
    assert not {e["instruction"] for e in heldout} & {e["instruction"] for e in train}
    assert [e["instruction"] for e in train] == [e["instruction"] for e in clean]
    wrong = sum(a["output"] != b["output"] for a, b in zip(train, clean)) / len(train)
    assert 0.25 < wrong < 0.45                                 # --noise 0.35: Alpaca-like imperfect answers
    probabilistic = data.read_ranked_jsonl(out / "probabilistic.jsonl")
    assert len(probabilistic) >= 100
    for record in probabilistic:
        assert record.source["kind"] == "probabilistic" and record.source["teacher"] == "demo-teacher"
        assert record.scores == sorted(record.scores, reverse=True)   # best first by mean token log-prob
    for path in (out / "contextual_sft.jsonl", out / "tuna" / "contextual.jsonl"):
        contextual = data.read_ranked_jsonl(path)
        assert len(contextual) >= 100
        solutions = {e["instruction"]: e["output"] for e in clean}
        for record in contextual:
            assert record.source["kind"] == "contextual" and record.source["teacher"] == demo.JUDGE
            assert "rank:" in record.source["raw_reply"]
            # the rule-based judge puts a correct answer first whenever there is one
            assert record.candidates[0] == solutions[record.instruction]
    for stage in ("teacher", "sft", "tuna_c", os.path.join("tuna", "tuna_p"), os.path.join("tuna", "tuna")):
        folder = out / stage
        net = checkpoint.load_checkpoint(folder)
        assert net.args.vocab_size == tokenizer.Tokenizer(folder / "tokenizer.model").vocab_size
        metrics = [json.loads(line) for line in open(folder / "metrics.jsonl")]
        assert metrics and all(m["loss"] == m["loss"] for m in metrics)   # logged, finite
    rank_metrics = [json.loads(line) for line in open(out / "tuna_c" / "metrics.jsonl")]
    assert any(m["rank"] > 0 for m in rank_metrics)             # the ranking term is live, not a silent zero


@pytest.mark.slow
def test_demo_picture_draws_each_stage_from_its_metrics(demo_run):
    out, _ = demo_run
    root = ElementTree.parse(out / "results.svg").getroot()   # well-formed, self-contained XML
    svg = "{http://www.w3.org/2000/svg}"
    assert root.tag == svg + "svg" and int(root.get("width")) == 960
    assert not [e for e in root.iter() if e.tag in (svg + "image", svg + "script", svg + "use")]
    panels = {g.get("data-stage"): g for g in root.iter(svg + "g") if g.get("class") == "stage"}
    assert list(panels) == ["SFT (Alpaca)", "Tuna_p", "Tuna_c", "Tuna"]   # one panel per stage
    for stage, panel in panels.items():
        metrics = [json.loads(line) for line in open(out / demo.MODELS[stage] / "metrics.jsonl")]
        assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))  # every step is logged
        lines = {p.get("class"): [tuple(map(float, xy.split(","))) for xy in p.get("points").split()]
                 for p in panel.iter(svg + "polyline")}
        assert set(lines) == {"loss", "mle", "rank"}
        xs = [x for x, _ in lines["loss"]]
        assert len(xs) == len(metrics) and xs == sorted(xs) and len(set(xs)) == len(xs)  # one point per step
        # every point's height is the same affine function of its value, for the three curves of a panel
        pairs = [(m[key], y) for key in lines for m, (_, y) in zip(metrics, lines[key])]
        (v0, y0), (v1, y1) = min(pairs), max(pairs)
        assert y1 < y0                                         # larger values are drawn higher
        for value, y in pairs:
            assert y == pytest.approx(y0 + (y1 - y0) * (value - v0) / (v1 - v0), abs=0.02)
        if stage == "SFT (Alpaca)":
            assert all(m["rank"] == 0 for m in metrics)        # one candidate: no ranking term
    results = json.load(open(out / "results.json"))
    bars = {r.get("data-model"): float(r.get("width")) for r in root.iter(svg + "rect")
            if r.get("class") == "exact_match"}
    assert list(bars) == MODELS
    for name, width in bars.items():
        assert width == pytest.approx(6.4 * results[name]["exact_match"], abs=0.06)
    texts = " ".join(t.text or "" for t in root.iter(svg + "text"))
    assert all(f"{results[name]['exact_match']:.1f} / {results[name]['rouge_l']:.1f}" in texts for name in MODELS)


@pytest.mark.slow
def test_demo_rerun_redoes_nothing_and_pays_nothing(demo_run):
    out, _ = demo_run
    before = json.load(open(out / "results.json"))
    cache_sizes = {p: os.path.getsize(out / p) for p in ("probabilistic.jsonl.cache.jsonl",
                                                         "contextual_sft.jsonl.cache.jsonl",
                                                         os.path.join("tuna", "contextual.jsonl.cache.jsonl"))}
    second = run_demo(out)
    assert second.stderr.count("already finished") == 5        # teacher, SFT, Tuna_p, Tuna, Tuna_c: not retrained
    summaries = [line for line in (second.stderr + second.stdout).splitlines() if " failed -> " in line]
    assert len(summaries) == 3                                  # probabilistic, the pipeline's (rebuilt from
    assert all("; requests 0 (" in line for line in summaries)  # its caches) and Tuna_c's: not one request sent
    assert {p: os.path.getsize(out / p) for p in cache_sizes} == cache_sizes
    after = json.load(open(out / "results.json"))
    # other settings on the same folder: refused, naming the record, before anything is overwritten
    data_before = (out / "sft_data.json").read_bytes()
    other = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--size", "ci", "--noise", "0.2",
                            "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert other.returncode == 1 and other.stderr.startswith(f"demo.py: error: {out / 'demo.json'}: ")
    assert "'noise': 0.35" in other.stderr and "Traceback" not in other.stderr
    assert (out / "sft_data.json").read_bytes() == data_before
    assert {k: v["exact_match"] for k, v in after.items()} == {k: v["exact_match"] for k, v in before.items()}


def test_an_out_that_is_not_a_demo_folder_is_refused_and_left_as_it_was(tmp_path, monkeypatch, capsys):
    """`demo.py --out .` in the repository would write the demo's files among the project's. The demo writes only
    into a new or empty folder, or one holding its demo.json: a folder that holds tuna.py, any other non-empty
    folder, or a file, is refused by name before anything is written, and no stage runs."""
    def no_stage(*args):
        raise demo.DemoError("a stage ran")
    monkeypatch.setattr(demo, "run_stage", no_stage)
    project = tmp_path / "project"
    project.mkdir()
    (project / "tuna.py").write_text("# the method\n")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("buy milk\n")
    (tmp_path / "file").write_text("x")
    before = {path: sorted(os.listdir(path)) for path in (tmp_path, project, notes, ROOT)}
    monkeypatch.chdir(ROOT)
    for out, refusal in ((project, f"--out {project} holds tuna.py"), (".", "--out . holds tuna.py"),
                         (notes, f"--out {notes} is a folder with other files and no demo.json"),
                         (tmp_path / "file", f"--out {tmp_path / 'file'} is a file, not a folder")):
        assert demo.main(["--size", "ci", "--out", str(out)]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"demo.py: error: {refusal}") and "Traceback" not in error, error
    assert {path: sorted(os.listdir(path)) for path in before} == before
    assert (notes / "todo.txt").read_text() == "buy milk\n" and (tmp_path / "file").read_text() == "x"


def test_rule_based_judge_answers_over_http_in_the_teachers_format():
    """The demo's judge goes through the real prompt, HTTP layer and parser: the correct candidate comes
    first, then the teacher's own answer where no candidate is right, the rest by closeness; an instruction
    it has no solution for is a 400, not a crash."""
    import requests
    import teacher
    instruction = "Sort the letters d b a alphabetically."
    server = demo.start_rule_judge({instruction: "a b d"})
    url = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
    try:
        def ranks(candidates, asked=instruction):
            messages = teacher.ranking_messages(data.alpaca_prompt(asked), candidates)
            reply = requests.post(url, json={"model": demo.JUDGE, "messages": messages}, timeout=10)
            return reply if reply.status_code != 200 else teacher.parse_ranking(
                reply.json()["choices"][0]["message"]["content"], len(candidates))
        assert ranks(["d b a", "a b d", "b a d", "a b d"]) == [1, 2, 0]      # right first, duplicate dropped
        assert ranks(["d b a", "b a d", "z"])[:1] == [3]                    # none right: its own answer first
        refused = ranks(["a", "b"], asked="What is the last of the letters x y?")
        assert refused.status_code == 400 and "no solution" in refused.json()["error"]["message"]
    finally:
        server.shutdown()
