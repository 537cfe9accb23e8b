"""Student samples and eval answers from an inference server (teacher.py contextual --student-base-url, eval.py
--served, tuna.py pipeline's student-server flags), and the device every command that runs a model picks. The
servers are the project's own (server.py's LocalTeacher behind backend_server) over tiny checkpoints on 127.0.0.1,
counting every request they answer, so "asked once" is measured, not assumed."""
import argparse
import collections
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest
import torch

import checkpoint
import data
import eval as E
import model as M
import server
import teacher
import tokenizer
import tuna
from client import PREFLIGHT_TEXT, RunError, TeacherClient
from server import BadRequest, LocalTeacher, backend_server
from conftest import ServedInThread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- servers that count what they answer

class CountingStudent:
    """The project's LocalTeacher over a model, counting each /completions request it answers by its body (the
    pre-flight checks apart). hang_after: after that many answers, the next request waits for `release` and is
    never answered (a run killed in the middle of an item)."""

    def __init__(self, net, tok, name, hang_after=None):
        self.inner, self.name = LocalTeacher(net, tok, name), name
        self.answered, self.bodies, self.preflights = collections.Counter(), [], 0
        self.lock, self.hang_after = threading.Lock(), hang_after
        self.hanging, self.release = threading.Event(), threading.Event()

    def rename(self, name):
        self.name = self.inner.name = name

    def completions(self, body):
        if body.get("prompt") == PREFLIGHT_TEXT:
            self.preflights += 1
            return self.inner.completions(body)
        with self.lock:
            hang = self.hang_after is not None and len(self.bodies) >= self.hang_after
        if hang:
            self.hanging.set()
            self.release.wait(120)
            raise BadRequest("this request is never answered")
        answer = self.inner.completions(body)
        with self.lock:
            self.answered[json.dumps(body, sort_keys=True)] += 1
            self.bodies.append((body, answer))
        return answer

    def chat(self, body):
        raise BadRequest("completions only")


class RankingTeacher:
    """A teacher that ranks whatever it is shown: its own answer first, then the candidates in order."""
    name = "ranking-teacher"

    def completions(self, body):
        raise BadRequest("chat only")

    def chat(self, body):
        text = body["messages"][-1]["content"]
        n = int(text.split(" responses to it")[0].rsplit(" ", 1)[1]) if " responses to it" in text else 1
        reply = f"(1) open\n(2) ###Response {n}: A reference.\n(3) none\n(5) rank: {[n, *range(n)]}"
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class Serving(ServedInThread):
    """backend_server over a backend, on 127.0.0.1 (port 0: a free one), for a `with` block."""

    def __init__(self, backend, port=0):
        self.backend, self.server = backend, backend_server(backend, port=port)


def tiny_student(seed=0, scale=1.0, max_seq_len=256):
    """A tiny random LLaMA; scale multiplies its output logits (30: sampled rows often agree, so the diversity
    rule samples some prompts again, hotter)."""
    torch.manual_seed(seed)
    net = M.Transformer(dataclasses.replace(M.ModelArgs.from_name("tiny"), max_seq_len=max_seq_len)).eval()
    with torch.no_grad():
        net.output.weight.mul_(scale)
    return net


def save_student(net, folder, tok):
    checkpoint.save_hf_checkpoint(net, str(folder))
    shutil.copy(tok.path, os.path.join(folder, "tokenizer.model"))
    return str(folder)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def instructions(count, words=0):
    return [{"instruction": f"Name fruit number {i}." + " and a colour" * (words * i), "input": "", "output": "x"}
            for i in range(count)]


def without_settings(samples):
    return {item_id: {k: v for k, v in entry.items() if k != "settings"} for item_id, entry in samples.items()}


# ----------------------------------------------------------------------------- the default device

def test_every_command_that_runs_a_model_uses_cuda_where_there_is_one(monkeypatch):
    """teacher.py contextual, server.py, eval.py and the pipeline's contextual stage: CUDA when torch sees it
    (checkpoint.default_device), unless told; the pipeline hands its device to teacher.py contextual."""
    for available, expected in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        contextual = ["contextual", "--data", "a.json", "--out", "c.jsonl", "--base-url", "http://127.0.0.1:9/v1",
                      "--model", "m", "--student", "runs/tuna_p"]
        assert teacher.argument_parser().parse_args(contextual).device == expected
        assert E.argument_parser().parse_args(["--checkpoints", "a=b", "--out", "o"]).device == expected
        served = []
        monkeypatch.setattr(server, "serve", lambda *args, **kwargs: served.append((args, kwargs)) or 0)
        server.main(["--checkpoint", "runs/tuna_p"])
        (args, kwargs), = served
        assert kwargs.get("device", args[5] if len(args) > 5 else None) == expected
        pipeline = argparse.ArgumentParser()
        tuna.add_pipeline_arguments(pipeline)
        given = ["--init", "runs/sft", "--out", "runs/tuna", "--probabilistic-data", "p.jsonl", "--instructions",
                 "a.json", "--teacher-base-url", "http://127.0.0.1:9/v1", "--teacher-model", "m"]
        for device, passed in ((None, expected), ("cuda:1", "cuda:1"), ("cpu", "cpu")):
            options = pipeline.parse_args(given + (["--device", device] if device else []))
            command = tuna.contextual_command(options, "c.jsonl", "runs/tuna/tuna_p")
            assert command[command.index("--device") + 1] == passed
            assert teacher.argument_parser().parse_args(command[2:]).device == passed


def test_the_pipeline_passes_the_student_server_on_except_to_the_check_before_tuna_p():
    pipeline = argparse.ArgumentParser()
    tuna.add_pipeline_arguments(pipeline)
    options = pipeline.parse_args([
        "--init", "runs/sft", "--out", "runs/tuna", "--probabilistic-data", "p.jsonl", "--instructions", "a.json",
        "--teacher-base-url", "http://127.0.0.1:9/v1", "--teacher-model", "m",
        "--student-base-url", "http://127.0.0.1:8000/v1"])
    command = tuna.contextual_command(options, "c.jsonl", "runs/tuna/tuna_p")
    parsed = teacher.argument_parser().parse_args(command[2:])
    # vLLM names a model by the folder it serves: OUT/tuna_p
    assert (parsed.student_base_url, parsed.student_model) == ("http://127.0.0.1:8000/v1", "runs/tuna/tuna_p")
    assert parsed.student_api_key_env == "VLLM_API_KEY"
    before_tuna_p = tuna.contextual_command(options, "c.jsonl", "runs/tuna/tuna_p", student_server=False)
    assert "--student-base-url" not in before_tuna_p


# ----------------------------------------------------------------------------- the same samples, whoever draws them

def test_greedy_candidates_through_the_server_equal_model_generate(tmp_path, spm_model_path):
    """Temperature 0, one round: the candidates server.py returns are model.generate's greedy answers (decoded and
    stripped as the local path does), for short prompts and one that leaves fewer tokens than max_new_tokens; the
    whole result equals sample_candidates' (the settings apart, which name the server)."""
    tok = tokenizer.Tokenizer(spm_model_path)
    net = tiny_student()
    examples = instructions(4, words=2)
    words = 1
    while len(tok.encode(data.alpaca_prompt("Count: " + "one " * (words + 1)), bos=True)) < net.args.max_seq_len - 4:
        words += 1
    examples.append({"instruction": "Count: " + "one " * words, "input": "", "output": "x"})
    options = dict(n=3, temperature=0.0, max_new_tokens=12, tries=1, seed=0, student="s")
    with Serving(CountingStudent(net, tok, "student")) as served:
        client = TeacherClient(served.url, "student")
        remote = teacher.sample_candidates_served(client, tok, examples, str(tmp_path / "remote.jsonl"),
                                                  context_length=net.args.max_seq_len, **options)
        assert len(served.backend.bodies) == 5
    local = teacher.sample_candidates(net, tok, examples, str(tmp_path / "local.jsonl"), **options)
    assert without_settings(remote) == without_settings(local)
    budgets = []
    for item_id, _, prompt in teacher._items(examples):
        ids = tok.encode(prompt, bos=True)
        budgets.append(min(12, net.args.max_seq_len - len(ids)))
        outs, _ = M.generate(net, [ids], budgets[-1], temperature=0.0, eos_id=tok.stop_ids)
        answer, finished = M.without_stop(outs[0], tok.stop_ids)
        assert remote[item_id]["candidates"] == [tok.decode(answer).strip()] * 3
        assert remote[item_id]["finished"] == [finished] * 3
    assert budgets[-1] < 12 and [body["max_tokens"] for body, _ in served.backend.bodies] == budgets


def test_sampled_rounds_follow_the_diversity_rule_and_cache_as_the_local_path(tmp_path, spm_model_path):
    """Sampling (temperature 0.8, 3 tries) through the server: each item's requests are the rule's rounds, 0.1
    hotter each, one seed per item and round; an item is sampled again exactly while its round has a pair at
    ROUGE-L >= 0.8, and keeps its most diverse round; its cache line has the local path's shape. The seed makes
    the samples: the same seed draws them again, another seed draws others."""
    tok = tokenizer.Tokenizer(spm_model_path)
    net = tiny_student(scale=30.0)
    examples = instructions(8)
    options = dict(n=3, temperature=0.8, max_new_tokens=6, tries=3, seed=1, student="s")
    with Serving(CountingStudent(net, tok, "student")) as served:
        def draw(name, **changed):
            client = TeacherClient(served.url, "student", max_workers=3)
            return teacher.sample_candidates_served(client, tok, examples, str(tmp_path / name),
                                                    context_length=256, **dict(options, **changed))
        remote = draw("remote.jsonl")
        bodies = list(served.backend.bodies)
        assert without_settings(draw("again.jsonl")) == without_settings(remote)
        other_seed = draw("other.jsonl", seed=2)
    assert without_settings(other_seed) != without_settings(remote)
    rounds_sampled = collections.Counter()
    for item_id, _, prompt in teacher._items(examples):
        mine = [(body, answer) for body, answer in bodies if body["prompt"] == prompt]
        rounds_sampled[len(mine)] += 1
        assert [body["temperature"] for body, _ in mine] == [0.8, 0.9, 1.0][:len(mine)]
        assert [body["seed"] for body, _ in mine] == [teacher.round_seed(1, item_id, r) for r in range(len(mine))]
        assert all(body["n"] == 3 and body["top_p"] == 1 and body["stop_token_ids"] == tok.stop_ids
                   for body, _ in mine)
        texts = [[choice["text"].strip() for choice in answer["choices"]] for _, answer in mine]
        pairs = [teacher.pairwise_rouge_l(round_texts) for round_texts in texts]
        assert all(max(p) >= 0.8 for p in pairs[:-1]) and (len(mine) == 3 or max(pairs[-1]) < 0.8)
        means = [sum(p) / len(p) for p in pairs]
        kept = means.index(min(means))
        assert remote[item_id]["round"] == kept + 1 and remote[item_id]["candidates"] == texts[kept]
        assert remote[item_id]["temperature"] == [0.8, 0.9, 1.0][kept]
    assert rounds_sampled[1] and rounds_sampled[2] + rounds_sampled[3]  # some items were sampled again
    teacher.sample_candidates(net, tok, examples, str(tmp_path / "local.jsonl"), **options)
    served_lines, local_lines = read_lines(tmp_path / "remote.jsonl"), read_lines(tmp_path / "local.jsonl")
    assert len(served_lines) == len(local_lines) == 8
    for served_line, local_line in zip(served_lines, local_lines):
        assert served_line.keys() == local_line.keys()
        assert {k: type(v) for k, v in served_line.items()} == {k: type(v) for k, v in local_line.items()}
        assert len(served_line["candidates"]) == len(served_line["finished"]) == 3
    settings = served_lines[0]["settings"]
    assert set(settings) ^ set(local_lines[0]["settings"]) == {"server", "request_seeds", "row_seeds"}
    assert settings["server"] == {"base_url": served.url, "model": "student"}


def test_samples_from_another_served_model_are_drawn_again(tmp_path, spm_model_path):
    """The student cache keys samples by the server too: the same checkpoint served under another name is asked
    again; the same name again is not."""
    tok = tokenizer.Tokenizer(spm_model_path)
    examples = instructions(3)
    options = dict(n=2, temperature=0.8, max_new_tokens=6, tries=1, seed=0, student="s", context_length=256)
    cache = str(tmp_path / "student.jsonl")
    with Serving(CountingStudent(tiny_student(), tok, "student-a")) as served:
        teacher.sample_candidates_served(TeacherClient(served.url, "student-a"), tok, examples, cache, **options)
        served.backend.rename("student-b")
        teacher.sample_candidates_served(TeacherClient(served.url, "student-b"), tok, examples, cache, **options)
        assert len(served.backend.bodies) == 6
        teacher.sample_candidates_served(TeacherClient(served.url, "student-b"), tok, examples, cache, **options)
        assert len(served.backend.bodies) == 6
    assert [line["settings"]["server"]["model"] for line in read_lines(cache)] == ["student-a"] * 3 + ["student-b"] * 3


def test_a_server_that_caps_n_or_names_another_model_fails_its_preflight(spm_model_path):
    tok = tokenizer.Tokenizer(spm_model_path)

    class OneChoice(CountingStudent):
        def completions(self, body):
            answer = self.inner.completions(dict(body, n=1))
            return dict(answer, model="someone-else") if self.name == "liar" else answer

    with Serving(OneChoice(tiny_student(), tok, "student")) as served:
        with pytest.raises(RunError, match=r"1 choice\(s\) for n=4.*vLLM, server\.py"):
            teacher.preflight_served(TeacherClient(served.url, "student"), 4, tok.stop_ids)
        served.backend.rename("liar")
        with pytest.raises(RunError, match="answers as model 'someone-else'"):
            teacher.preflight_served(TeacherClient(served.url, "liar"), 1, tok.stop_ids)


# ----------------------------------------------------------------------------- contextual ranking end to end

def contextual_command(data_path, out, student, teacher_url, student_url, *extra):
    return [sys.executable, os.path.join(ROOT, "teacher.py"), "contextual", "--data", str(data_path), "--out",
            str(out), "--base-url", teacher_url, "--model", "ranking-teacher", "--student", student,
            "--student-base-url", student_url, "--student-model", "student", "--n", "3", "--student-temperature",
            "0", "--student-max-tokens", "6", "--tries", "3", "--workers", "1", "--timeout", "60", *extra]


@pytest.mark.slow
def test_contextual_with_a_student_server_killed_resumed_and_resampled_for_a_new_checkpoint(tmp_path,
                                                                                          spm_model_path):
    """teacher.py contextual --student-base-url in a subprocess: no student is loaded, its candidates come from the
    server (at temperature 0 the first round's answers agree, so every item is sampled again, hotter). Killed in
    the middle of an item, then rerun: finished items are read from the student cache, finished rounds from the
    request cache, and no request reaches the server twice. Retrained in place (same folder, same served name):
    every item is asked again."""
    tok = tokenizer.Tokenizer(spm_model_path)
    net = tiny_student()
    student = save_student(net, tmp_path / "tuna_p", tok)
    examples = instructions(5)
    (tmp_path / "a.json").write_text(json.dumps(examples))
    out = tmp_path / "contextual.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    backend = CountingStudent(net, tok, "student", hang_after=5)
    with Serving(RankingTeacher()) as ranking, Serving(backend) as served:
        command = contextual_command(tmp_path / "a.json", out, student, ranking.url, served.url)
        run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert backend.hanging.wait(120), run.communicate()[0]
        run.send_signal(signal.SIGKILL)
        run.wait()
        finished = read_lines(str(out) + ".student.jsonl")
        assert 1 <= len(finished) < 5 and not out.exists()
        backend.hang_after = None
        backend.release.set()
        resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert set(backend.answered.values()) == {1}  # nothing asked twice, the unanswered request apart
        assert backend.preflights == 2
        entries = read_lines(str(out) + ".student.jsonl")
        assert entries[:len(finished)] == finished and len(entries) == 5
        assert all(entry["round"] >= 2 and entry["settings"]["server"]["model"] == "student" for entry in entries)
        records = data.read_ranked_jsonl(out)
        assert [r.id for r in records] == ["0", "1", "2", "3", "4"]
        identity = checkpoint.checkpoint_identity(student)
        assert all(r.source["student"]["checkpoint"] == identity for r in records)
        assert all(r.candidates[0] == "A reference." and set(r.candidates[1:]) <= set(r.source["student_candidates"])
                   for r in records)
        asked = len(backend.bodies)
        # retrained in place, served again under the same name: every item asked again
        retrained = tiny_student(seed=1)
        save_student(retrained, tmp_path / "tuna_p", tok)
        backend.inner = LocalTeacher(retrained, tok, "student")
        again = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
    assert len(backend.bodies) > asked + 5 and len(read_lines(str(out) + ".student.jsonl")) == 10
    new_identity = checkpoint.checkpoint_identity(student)
    assert new_identity != identity
    assert all(r.source["student"]["checkpoint"] == new_identity for r in data.read_ranked_jsonl(out))


def test_the_pipeline_trains_tuna_p_then_says_what_to_serve_and_resumes_through_the_server(tmp_path, spm_model_path,
                                                                                           capfd):
    """tuna.py pipeline --student-base-url with no server there: Tuna_p is trained, then it stops with the
    command that serves OUT/tuna_p, before any sample or Tuna_c. With the server started, --resume samples
    through it (nothing loaded) and trains Tuna_c."""
    tok = tokenizer.Tokenizer(spm_model_path)
    init = save_student(tiny_student(max_seq_len=512), tmp_path / "init", tok)
    ranked = tmp_path / "ranked.jsonl"
    data.write_ranked_jsonl(ranked, [data.RankedRecord(id=str(i), prompt=data.alpaca_prompt(f"Task {i}"),
                                                       candidates=["a b", "c d e"]) for i in range(4)])
    (tmp_path / "a.json").write_text(json.dumps(instructions(3)))
    out = tmp_path / "tuna"
    port = free_port()
    with Serving(RankingTeacher()) as ranking:
        command = ["pipeline", "--init", init, "--probabilistic-data", str(ranked), "--out", str(out),
                   "--batch-size", "2", "--instructions", str(tmp_path / "a.json"), "--teacher-base-url", ranking.url,
                   "--teacher-model", "ranking-teacher", "--student-base-url", f"http://127.0.0.1:{port}/v1",
                   "--teacher-args", "--n 2 --tries 1 --student-max-tokens 4 --workers 2 --max-retries 0"]
        assert tuna.main(command) == 1
        err = capfd.readouterr().err
        tuna_p = str(out / "tuna_p")
        assert f"`vllm serve {tuna_p} --served-model-name {tuna_p}" in err and "with --resume" in err
        assert "connection refused" in err
        assert os.path.isfile(os.path.join(tuna_p, "config.json")) and not (out / "tuna").exists()
        assert not (out / "contextual.jsonl.student.jsonl").exists()
        backend = CountingStudent(checkpoint.load_checkpoint(tuna_p), tok, tuna_p)
        with Serving(backend, port=port):
            assert tuna.main(command + ["--resume"]) == 0
    assert len(backend.bodies) == 3 and backend.preflights == 2  # the pipeline's check, then teacher.py's own
    records = data.read_ranked_jsonl(out / "contextual.jsonl")
    assert len(records) == 3 and all(r.source["student"]["checkpoint"] == checkpoint.checkpoint_identity(tuna_p)
                                     for r in records)
    assert os.path.isfile(out / "tuna" / "config.json")


# ----------------------------------------------------------------------------- eval answers through a server

def test_eval_answers_through_the_server_equal_local_ones(benchmarks, spm_model_path, tmp_path, monkeypatch):
    """eval.py --served: every benchmark's answers from server.py over the checkpoint equal the answers generated
    here (greedy, the same prompts, max_new_tokens and stop ids), nothing is loaded, and they are kept like local
    answers, keyed by the server's model name too: a rerun asks nothing, another served name asks again."""
    tok = tokenizer.Tokenizer(spm_model_path)
    net = tiny_student(max_seq_len=2048)
    folder = save_student(net, tmp_path / "model", tok)
    options = dict(superni_dir=str(benchmarks / "superni"), lmentry_dir=str(benchmarks / "lmentry"),
                   vicuna_dir=str(benchmarks / "vicuna"), max_instances=3, max_new_tokens=(8, 6, 10), batch_size=4)
    local = E.evaluate({"m": folder}, str(tmp_path / "local"), device="cpu", **options)
    backend = CountingStudent(checkpoint.load_checkpoint(folder), tok, "m-served")
    monkeypatch.setattr(E.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("a served model was loaded"))
    with Serving(backend) as served:
        E.main(["--checkpoints", f"m={folder}", "--superni", options["superni_dir"], "--lmentry",
                options["lmentry_dir"], "--vicuna", options["vicuna_dir"], "--max-instances", "3", "--max-new-tokens",
                "8", "6", "10", "--batch-size", "4", "--out", str(tmp_path / "remote"), "--served",
                f"m=m-served@{served.url}", "--served-workers", "3"])
        remote = json.loads((tmp_path / "remote" / "results.json").read_text())
        asked = len(backend.bodies)
        assert asked == 6 + 18 + 4 and backend.preflights == 1
        assert {body["temperature"] for body, _ in backend.bodies} == {0}
        E.evaluate({"m": folder}, str(tmp_path / "remote"), served={"m": ("m-served", served.url)}, **options)
        assert len(backend.bodies) == asked and backend.preflights == 1  # nothing due: the server is not asked
        backend.rename("m-other")
        E.evaluate({"m": folder}, str(tmp_path / "remote"), served={"m": ("m-other", served.url)}, **options)
        assert len(backend.bodies) == 2 * asked
    for bench in ("superni", "lmentry", "vicuna"):
        here = {line["id"]: line["output"] for line in read_lines(tmp_path / "local" / "generations" / "m" /
                                                                   f"{bench}.jsonl")}
        there = read_lines(tmp_path / "remote" / "generations" / "m" / f"{bench}.jsonl")
        assert {line["id"]: line["output"] for line in there} == here
        assert any(here.values())
    assert remote["models"]["m"]["server"] == {"base_url": served.url, "model": "m-served"}
    assert remote["models"]["m"]["superni"]["overall"] == local["models"]["m"]["superni"]["overall"]
    assert remote["models"]["m"]["producer"]["served_model"] == "m-served"


def test_eval_served_option_names_a_checkpoint_and_is_well_formed(tmp_path, capsys):
    with pytest.raises(SystemExit):
        E.main(["--checkpoints", "a=x", "--out", str(tmp_path), "--served", "a=no-url"])
    assert "is not NAME=MODEL@URL" in capsys.readouterr().err
    with pytest.raises(E.EvalError, match="'b' is not one of the checkpoints"):
        E.check_checkpoints({"a": "x"}, None, None, {"b": ("m", "http://127.0.0.1:9/v1")})
