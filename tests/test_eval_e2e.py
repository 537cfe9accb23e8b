"""eval.py end to end: two tiny random checkpoints (model.py) and the conftest tokenizer, evaluated on small
benchmark folders built from the fixtures (with bad input mixed in), the judge a test-only HTTP server;
then a run killed after its first batch resumes without regenerating finished items."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import pytest
import torch

import checkpoint
import data
import eval as E
import model as M
import tokenizer
from test_data import HOLD_LOCK
from test_eval import FIXTURES, JudgeHandler


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, seed in (("alpaca", 0), ("tuna", 1)):
        torch.manual_seed(seed)
        args = M.ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=512)
        directory = tmp_path_factory.mktemp(name)
        checkpoint.save_hf_checkpoint(M.Transformer(args).eval(), str(directory))
        out[name] = str(directory)
    return out


@pytest.fixture(scope="module")
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def run_cli(checkpoints, benchmarks, judge_url, spm_model_path, out):
    E.main(["--checkpoints"] + [f"{n}={d}" for n, d in checkpoints.items()] + [
        "--tokenizer", spm_model_path, "--superni", str(benchmarks / "superni"), "--lmentry",
        str(benchmarks / "lmentry"), "--vicuna", str(benchmarks / "vicuna"), "--judge-url", judge_url,
        "--judge-model", "test-judge", "--out", str(out), "--max-instances", "3", "--batch-size", "4",
        "--max-new-tokens", "6", "6", "6", "--device", "cpu"])
    with open(out / "results.json") as f:
        return json.load(f), (out / "results.md").read_text()


def test_cli_writes_results_table_and_json(checkpoints, benchmarks, judge_url, spm_model_path, tmp_path, capsys):
    results, markdown = run_cli(checkpoints, benchmarks, judge_url, spm_model_path, tmp_path)
    lines = markdown.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("| Model |")))
    assert "Super-NI ROUGE-L" in lines[header] and "LMentry" in lines[header] and "Vicuna QA vs alpaca" in lines[header]
    alpaca, tuna = lines[header + 2].split(" | "), lines[header + 3].split(" | ")
    assert alpaca[0] == "| alpaca" and tuna[0] == "| tuna" and alpaca[-1] == "— |"
    win, lose, tie = map(int, tuna[-1].rstrip(" |").split(" / "))
    assert win + lose + tie == 4  # questions 1, 2, 61 (coding, with its reference) and 71
    for name in ("alpaca", "tuna"):
        row = results["models"][name]
        assert len(row["superni"]["items"]) == 6 and 0 <= row["superni"]["overall"]["rougeL"] <= 100
        assert all(isinstance(i["prediction"], str) and "rougeL" in i for i in row["superni"]["items"])
        assert len(row["lmentry"]["items"]) == 18 and row["lmentry"]["tasks_scored"] == 3
        assert [a["question_id"] for a in row["vicuna_answers"]] == ["1", "2", "61", "71"]
        assert f"| {name} | {row['superni']['overall']['rougeL']} |" in markdown
    pair = results["vicuna"]["pairs"]["tuna vs alpaca"]
    assert pair["error"] == 0 and (pair["win"], pair["lose"], pair["tie"]) == (win, lose, tie)
    judged = results["vicuna"]["judgments"]
    assert len(judged) == 4 and all(j["g1_judgment"] and j["g2_judgment"] for j in judged)
    skipped = "\n".join(results["skipped"])
    assert "task_no_instances.json" in skipped and "1 of 4 tasks have no file" in skipped
    assert "homophones.json" in skipped and "question.jsonl, line 3" in skipped and "22 of the 25 core" in skipped
    assert f"## Skipped ({len(results['skipped'])})" in markdown and "task_no_instances.json" in markdown
    assert "| Model 1 vs model 2 |" in markdown and "coreference_resolution" in markdown
    assert "| tuna |" in capsys.readouterr().out


def test_killed_run_resumes_without_regenerating(checkpoints, benchmarks, judge_url, spm_model_path, tmp_path,
                                                 monkeypatch):
    real_generate, calls = M.generate, []

    def counting_generate(lm, prompts, *args, **kwargs):
        if kill_after is not None and len(calls) == kill_after:
            raise KeyboardInterrupt  # as if the run were killed here
        calls.append(len(prompts))
        return real_generate(lm, prompts, *args, **kwargs)
    monkeypatch.setattr(E.model, "generate", counting_generate)
    kill_after = 1
    with pytest.raises(KeyboardInterrupt):
        run_cli(checkpoints, benchmarks, judge_url, spm_model_path, tmp_path)
    assert calls == [4]
    path = tmp_path / "generations" / "alpaca" / "superni.jsonl"
    with open(path, "a") as f:
        f.write('{"id": "task648-half-written", "out')  # a line cut short by the kill
    kill_after, calls[:] = None, []
    results, _ = run_cli(checkpoints, benchmarks, judge_url, spm_model_path, tmp_path)
    # per model: superni 6 + lmentry 18 + vicuna 4 = 28 items, alpaca's first 4 were finished before the kill
    assert sum(calls) == 2 * 28 - 4
    assert any("superni.jsonl" in p and "malformed" in p for p in results["skipped"])
    with open(path) as f:
        ids = [json.loads(line)["id"] for line in f if line.strip().endswith("}")]
    assert len(ids) == len(set(ids)) == 6
    # a third run finds everything done: no model is even loaded, and the results are the same
    monkeypatch.setattr(E.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("loaded a model"))
    calls[:] = []
    again, _ = run_cli(checkpoints, benchmarks, judge_url, spm_model_path, tmp_path)
    assert calls == [] and again["models"] == results["models"] and again["vicuna"] == results["vicuna"]


def test_answers_know_the_checkpoint_and_settings_that_made_them(checkpoints, spm_model_path, tmp_path, capsys):
    """A new checkpoint under the same name (retrained in place) or another max_new_tokens generates again; the
    same checkpoint, or a copy of its folder, reuses the answers."""
    folder = tmp_path / "model"
    shutil.copytree(checkpoints["alpaca"], folder)  # a copy keeps the checkpoint's identity
    items = [{"id": str(i), "prompt": f"### Instruction:\nSay {word}.\n\n### Response:"}
             for i, word in enumerate(["yes", "no", "maybe"])]
    loads = []

    def answers(max_new_tokens=5, out=tmp_path / "eval"):
        get_model = E.model_loader(str(folder), spm_model_path, "cpu", torch.float32)
        counted = lambda: (loads.append(1), get_model())[1]  # noqa: E731
        return E.generate_answers("m", "bench", items, counted, str(out), 2, max_new_tokens,
                                  E.answer_producer(str(folder), spm_model_path))

    first = answers()
    assert answers() == first and len(loads) == 1  # read back: the model is not even loaded
    assert E.answer_producer(str(folder), spm_model_path) == E.answer_producer(checkpoints["alpaca"], spm_model_path)
    # another model under the same name
    checkpoint.save_hf_checkpoint(checkpoint.load_checkpoint(checkpoints["tuna"]), str(folder))
    second = answers()
    assert len(loads) == 2 and "3 answer(s) made by another checkpoint" in capsys.readouterr().err
    assert second == answers(out=tmp_path / "fresh") and second != first  # the new model's own answers
    longer = answers(max_new_tokens=7)
    assert len(loads) == 4 and answers(max_new_tokens=7) == longer and len(loads) == 4
    lines = [json.loads(line) for line in open(tmp_path / "eval" / "generations" / "m" / "bench.jsonl")]
    assert len(lines) == 9 and len({line["made_by"] for line in lines}) == 9  # old lines stay, ignored


def test_batch_size_auto_is_the_fixed_default_on_a_cpu(checkpoints, spm_model_path, tmp_path, monkeypatch):
    """--batch-size auto sizes batches from free GPU memory (model.auto_batch_rows, tested in test_model.py); a
    CPU reports none: 10 answers go as EVAL_BATCH_ROWS = 8, then 2, and are those of a fixed batch size."""
    items = [{"id": str(i), "prompt": f"### Instruction:\nSay {i}.\n\n### Response:"} for i in range(10)]
    get_model = E.model_loader(checkpoints["alpaca"], spm_model_path, "cpu", torch.float32)
    producer = E.answer_producer(checkpoints["alpaca"], spm_model_path)
    sizes, generate = [], M.generate
    monkeypatch.setattr(E.model, "generate", lambda lm, prompts, *a, **k: (sizes.append(len(prompts)),
                                                                          generate(lm, prompts, *a, **k))[1])
    auto = E.generate_answers("m", "bench", items, get_model, str(tmp_path / "auto"), "auto", 4, producer)
    assert sizes == [8, 2]
    assert auto == E.generate_answers("m", "bench", items, get_model, str(tmp_path / "three"), 3, 4, producer)


def test_a_second_evaluation_on_the_same_output_refuses_at_once(checkpoints, spm_model_path, tmp_path, capsys):
    out = tmp_path / "eval"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for locked in (out, out / "generations" / "alpaca" / "lmentry.jsonl"):  # the run, or one answer file
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(locked)], cwd=root, stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout.readline() == "held\n"
            with pytest.raises(SystemExit) as refused:
                E.main(["--checkpoints", f"alpaca={checkpoints['alpaca']}", "--tokenizer", spm_model_path,
                        "--lmentry", os.path.join(FIXTURES, "lmentry"), "--out", str(out), "--device", "cpu",
                        "--max-new-tokens", "4", "4", "4"])
            error = capsys.readouterr().err.strip().splitlines()[-1]
            assert refused.value.code == 1
            assert f"{locked} is being written by another process (pid {holder.pid}" in error
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
    E.main(["--checkpoints", f"alpaca={checkpoints['alpaca']}", "--tokenizer", spm_model_path, "--lmentry",
            os.path.join(FIXTURES, "lmentry"), "--out", str(out), "--device", "cpu",
            "--max-new-tokens", "4", "4", "4"])
    assert (out / "results.json").exists()  # the killed holders block nothing


# ----------------------------------------------------------------------------- nothing a user names is destroyed

def test_an_output_over_an_input_or_a_name_that_leaves_its_folder_is_refused(checkpoints, benchmarks, spm_model_path,
                                                                             tmp_path, capsys):
    """`--out` a checkpoint folder once filled it with generations/ and results.md. An --out that is, holds or lies
    inside an input (a --checkpoints folder, --tokenizer, --superni, --lmentry, --vicuna, --count-tokenizer) is
    refused by name before anything is written, OUT.lock included; a --checkpoints or --served NAME, which names
    the folder OUT/generations/NAME, must be a plain folder name."""
    model = tmp_path / "model"
    shutil.copytree(checkpoints["alpaca"], model)
    before = sorted(os.listdir(model))
    vicuna = benchmarks / "vicuna"

    def refused(*argv):
        with pytest.raises(SystemExit) as stopped:
            E.main(["--tokenizer", spm_model_path, "--vicuna", str(vicuna), "--device", "cpu", "--max-new-tokens",
                    "4", "4", "4", *map(str, argv)])
        return stopped.value.code, capsys.readouterr().err

    cases = [
        ([f"a={model}", "--out", model], f"{model} is --checkpoints a {model}"),
        ([f"a={model}", "--out", model / "eval"], f"{model / 'eval'} is inside --checkpoints a {model}"),
        ([f"a={model}", "--out", tmp_path], f"{tmp_path} holds --checkpoints a {model}"),
        ([f"a={model}", "--out", os.path.dirname(spm_model_path)],
         f"{os.path.dirname(spm_model_path)} holds --tokenizer {spm_model_path}"),
        ([f"a={model}", "--out", vicuna / "eval"], f"{vicuna / 'eval'} is inside --vicuna {vicuna}"),
        ([f"a={model}", "--out", tmp_path / "t.model", "--count-tokenizer", tmp_path / "t.model", "--dry-run"],
         f"{tmp_path / 't.model'} is --count-tokenizer {tmp_path / 't.model'}"),
    ]
    for argv, refusal in cases:
        code, err = refused("--checkpoints", *argv)
        assert code == 1 and refusal in err and "an output must lie apart" in err, err
    rule = "must not be empty, '.' or '..', nor hold '/' or a NUL character"
    for name in ("../../up", "a/b", ".", "..", "/abs"):
        code, err = refused("--checkpoints", f"{name}={model}", "--out", tmp_path / "eval")
        assert code == 2 and f"--checkpoints: {name + '=' + str(model)!r}: NAME" in err and rule in err, err
    code, err = refused("--checkpoints", f"a={model}", "--out", tmp_path / "eval", "--served", "../a=m@http://h/v1")
    assert code == 2 and "--served: '../a=m@http://h/v1': NAME" in err and rule in err, err
    assert sorted(os.listdir(model)) == before and sorted(os.listdir(tmp_path)) == ["model"]
    assert sorted(os.listdir(vicuna)) == ["question.jsonl", "reference_answer_gpt-4.jsonl"]


def test_an_existing_output_keeps_its_answers_and_only_its_own_results_are_rewritten(checkpoints, spm_model_path,
                                                                                    tmp_path, capsys):
    """eval.py continues in an existing --out by design: the answers in generations/ and the judge's cache are kept
    and added to, results.md and results.json rewritten. A results.md or results.json that eval.py did not write
    (a demo's table, a user's notes), or an --out that is a file, is refused by name before any answer and left
    as it was."""
    out = tmp_path / "eval"

    def evaluate():
        E.main(["--checkpoints", f"alpaca={checkpoints['alpaca']}", "--tokenizer", spm_model_path, "--lmentry",
                os.path.join(FIXTURES, "lmentry"), "--out", str(out), "--device", "cpu",
                "--max-new-tokens", "4", "4", "4"])

    out.mkdir()
    for name, text in (("results.md", "# My notes\n"), ("results.json", '{"mine": 1}\n')):
        (out / name).write_text(text)
        with pytest.raises(SystemExit) as refused:
            evaluate()
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert refused.value.code == 1 and f"{out / name} was not written by eval.py" in error, error
        assert (out / name).read_text() == text and sorted(os.listdir(out)) == [name]
        (out / name).unlink()
    evaluate()
    answers = (out / "generations" / "alpaca" / "lmentry.jsonl").read_bytes()
    assert (out / "results.md").read_text().startswith("# Evaluation results")
    evaluate()  # again: the answers kept, the results rewritten
    assert (out / "generations" / "alpaca" / "lmentry.jsonl").read_bytes() == answers
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file"
    with pytest.raises(SystemExit) as refused:
        evaluate()
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert refused.value.code == 1 and f"--out {out} is a file, not a folder" in error, error
    assert (tmp_path / "file").read_text() == "x"


class TwoTokenStart(tokenizer.Tokenizer):
    """A tokenizer whose template puts two special tokens before every text (a chat-style start), not one BOS."""

    def encode(self, text, bos=False, eos=False):
        ids = super().encode(text, bos=False, eos=eos)
        return ([self.bos_id, self.pad_id] if bos else []) + ids


def test_a_long_prompt_keeps_the_tokenizers_start_whole_and_its_end(spm_model_path, tmp_path, monkeypatch):
    """A prompt longer than the context keeps what the tokenizer puts first (one BOS, nothing, or several tokens)
    and its last tokens, so it still ends in "### Response:"; the text's first token is never kept as if BOS."""
    from conftest import CORPUS_LINES, build_bpe_tokenizer
    no_bos = tokenizer.Tokenizer(build_bpe_tokenizer(tmp_path / "smollm2", "smollm2", CORPUS_LINES * 20))
    prompt = data.alpaca_prompt(" ".join(CORPUS_LINES))
    real_generate, seen = M.generate, []
    monkeypatch.setattr(E.model, "generate", lambda lm, prompts, *a, **k: (seen.extend(prompts),
                                                                           real_generate(lm, prompts, *a, **k))[1])
    for name, tok, start in (("bos", tokenizer.Tokenizer(spm_model_path), 1), ("none", no_bos, 0),
                             ("two", TwoTokenStart(spm_model_path), 2)):
        assert no_bos.bos_id is None and len(tok.encode(prompt)) > 60
        torch.manual_seed(0)
        net = M.Transformer(M.ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=tok.vocab_size, multiple_of=32,
                                        max_seq_len=64)).eval()
        seen.clear()
        E.generate_answers(name, "bench", [{"id": "0", "prompt": prompt}], lambda: (net, tok), str(tmp_path), 1, 4,
                           name)
        text_ids, full = tok.encode(prompt), tok.encode(prompt, bos=True)
        assert seen == [full[:start] + text_ids[len(text_ids) - (60 - start):]]  # 64 - 4 new tokens
        assert tok.decode(seen[0][start:]).endswith("### Response:")
