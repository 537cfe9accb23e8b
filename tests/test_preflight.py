"""Long and paid work checks its server first, says what it will send before it sends, and shows where it stands;
`server.py` takes a client's whole thread pool, limits bodies, and wants its key. Every server is real HTTP on
127.0.0.1: the project's own server over a tiny model (it counts a request's prompt tokens itself, in usage)."""
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

import checkpoint
import data
import eval as E
import model as M
import teacher
import tokenizer
from client import PREFLIGHT_TEXT, TeacherClient
from server import backend_server, BadRequest, LocalTeacher, NO_KEY
import tuna
from conftest import ServedInThread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the quick brown fox jumps over lazy dog cat sleeps in sun capital of France is Paris tips add sort".split()
KEY_ENV, KEY = "TUNA_TEST_TEACHER_KEY", "sk-tuna-test-0123456789abcdef"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, spm_model_path):
    """A tiny random LLaMA saved as a checkpoint folder with its tokenizer (the student, the eval models, the
    served teacher)."""
    torch.manual_seed(0)
    net = M.Transformer(dataclasses.replace(M.ModelArgs.from_name("tiny"), max_seq_len=2048)).eval()
    folder = tmp_path_factory.mktemp("tiny")
    checkpoint.save_hf_checkpoint(net, str(folder))
    with open(spm_model_path, "rb") as src, open(folder / "tokenizer.model", "wb") as dst:
        dst.write(src.read())
    return net, tokenizer.Tokenizer(spm_model_path), str(folder)


class Counting:
    """The project's LocalTeacher behind the project's server, keeping every request body and the usage the
    server itself counted. A ranking request's reply is replaced by a valid ranking (a random tiny model cannot
    rank), so a contextual run finishes; its usage stays the server's."""

    def __init__(self, inner):
        self.inner, self.name, self.seen, self.lock = inner, inner.name, [], threading.Lock()

    def _keep(self, body, answer):
        with self.lock:
            self.seen.append((body, answer["usage"]))
        return answer

    def completions(self, body):
        return self._keep(body, self.inner.completions(body))

    def chat(self, body):
        answer = self.inner.chat(dict(body, max_tokens=min(body.get("max_tokens") or 2, 2)))  # a judge asks 2048
        if "###Response 0:" in body["messages"][-1]["content"]:
            answer["choices"][0].update(finish_reason="stop", message={
                "role": "assistant", "content": "(1) open\n(2) ###Response 2: A reference.\n(3) none\n(5) rank: [2, 0, 1]"})
        return self._keep(body, answer)

    def counted(self):  # (bodies, prompt tokens) of the run's requests, the pre-flight check left out
        run = [(b, u) for b, u in self.seen if PREFLIGHT_TEXT not in json.dumps(b)]
        return [b for b, _ in run], sum(u["prompt_tokens"] for _, u in run)


class Served(ServedInThread):
    def __init__(self, tiny, api_key=None, **kw):
        net, tok, _ = tiny
        self.backend = Counting(LocalTeacher(net, tok, "tiny-teacher", seed=0))
        self.server = backend_server(self.backend, api_key=api_key, **kw)


def alpaca_file(path, count, seed=0):
    """count instructions of 3-40 words, a third with an input, a few of them repeated words."""
    rng = random.Random(seed)
    say = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    examples = [{"instruction": say(3, 40), "input": say(2, 20) if i % 3 == 0 else "", "output": f"Gold {i}."}
                for i in range(count)]
    path.write_text(json.dumps(examples))
    return str(path)


def figure(report, name):
    """The number on a dry run's line `name:` (the first number after it)."""
    line = next(line for line in report.splitlines() if line.strip().startswith(name + ":"))
    return int(re.search(r"[\d,]+", line.split(":", 1)[1]).group().replace(",", ""))


def cached_figure(report):
    return int(re.search(r"([\d,]+) in the cache", report).group(1).replace(",", ""))


# ----------------------------------------------------------------------------- --dry-run = what the run sends

class Lines(logging.Handler):
    """The messages teacher.py logs (its progress lines), while the test runs."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        teacher.log.addHandler(self)
        return self.messages

    def __exit__(self, *exc):
        teacher.log.removeHandler(self)


def test_probabilistic_dry_run_counts_what_the_run_then_sends(tiny, tmp_path, capsys):
    _, tok, _ = tiny
    alpaca = alpaca_file(tmp_path / "alpaca.json", 300)
    out = str(tmp_path / "p.jsonl")
    with Served(tiny) as served:
        args = ["probabilistic", "--data", alpaca, "--out", out, "--base-url", served.url, "--model", "tiny-teacher",
                "--n", "2", "--max-tokens", "2", "--add-original", "scored", "--workers", "4"]
        assert teacher.main(args + ["--dry-run", "--count-tokenizer", tok.path, "--price-per-1m-input", "2.5",
                                    "--price-per-1m-output", "10"]) == 0
        report = capsys.readouterr().out
        assert served.backend.seen == [] and not os.path.exists(out)  # a dry run sends and writes nothing
        with Lines() as logged:
            assert teacher.main(args) == 0
        bodies, prompt_tokens = served.backend.counted()
        again = teacher.main(args + ["--dry-run"]) or capsys.readouterr().out
    first = [b for b in bodies if "seed" not in b]  # top-ups (seed k, 1 choice) depend on answers: a note only
    assert len(first) == figure(report, "requests") == 600  # 300 x (samples + the original's scoring)
    assert sum(served.backend.seen[i][1]["prompt_tokens"] for i, (b, _) in enumerate(served.backend.seen)
               if b in first) == figure(report, "prompt tokens")
    assert len(bodies) - len(first) == 0 or prompt_tokens > figure(report, "prompt tokens")
    assert figure(report, "completion tokens") == 300 * 2 * 2
    cost = 2.5 * figure(report, "prompt tokens") / 1e6 + 10 * 1200 / 1e6
    assert f"= ${cost:,.2f} (at $2.5 / $10 per 1M tokens)" in report
    assert figure(again, "requests") == 0 and cached_figure(again) == 600  # what is paid is said so
    lines = [line for line in logged if line.startswith("probabilistic ranking ")]
    assert len(lines) == 20 and lines[-1].startswith("probabilistic ranking 300/300 | ")  # every 5%
    assert all(re.search(r"\d+/300 \| [\d.]+ items/s \| \d+ failed \| ETA \d+:\d\d:\d\d \| requests", line)
               for line in lines)


def test_contextual_dry_run_bounds_then_counts_what_the_run_then_sends(tiny, tmp_path, capsys):
    _, tok, student = tiny
    alpaca = alpaca_file(tmp_path / "alpaca.json", 300, seed=1)
    out = str(tmp_path / "c.jsonl")
    with Served(tiny) as served:
        args = ["contextual", "--data", alpaca, "--out", out, "--base-url", served.url, "--model", "tiny-teacher",
                "--student", student, "--n", "2", "--student-max-tokens", "3", "--tries", "1",
                "--teacher-max-tokens", "2", "--workers", "4", "--count-tokenizer", tok.path]
        assert teacher.main(args + ["--dry-run"]) == 0
        before = capsys.readouterr().out
        assert served.backend.seen == [] and not os.path.exists(out + ".student.jsonl")
        assert teacher.main(args) == 0
        bodies, prompt_tokens = served.backend.counted()
        # the student's samples are known now: a dry run for a fresh teacher cache counts them exactly
        assert teacher.main(args + ["--dry-run", "--cache", str(tmp_path / "other.cache.jsonl")]) == 0
        exact = capsys.readouterr().out
        assert len(served.backend.counted()[0]) == 300  # the dry runs sent nothing
    assert len(bodies) == figure(before, "requests") == figure(exact, "requests") == 300
    assert "estimated: 300 of 300 instructions not sampled yet" in before
    assert figure(exact, "prompt tokens") == prompt_tokens
    # the estimate counts each candidate at its most tokens; a random model's samples nearly all reach it, and
    # decoded text can split into other tokens inside the ranking prompt: within 2% here
    assert abs(figure(before, "prompt tokens") - prompt_tokens) < 0.02 * prompt_tokens
    assert "all 300 instructions' student samples are in the cache" in exact
    assert figure(exact, "completion tokens") == 300 * 2


def test_eval_dry_run_counts_the_judge_requests_of_the_run(tiny, tmp_path, capsys):
    _, tok, folder = tiny
    vicuna = tmp_path / "vicuna"
    vicuna.mkdir()
    (vicuna / "question.jsonl").write_text("".join(json.dumps(
        {"question_id": i, "category": "generic", "turns": [f"Question {i}: " + " ".join(WORDS[:i + 3])]}) + "\n"
        for i in range(6)))
    with Served(tiny) as served:
        options = ["--checkpoints", f"a={folder}", f"b={folder}", "--vicuna", str(vicuna), "--judge-url",
                   served.url, "--judge-model", "tiny-teacher", "--max-new-tokens", "4", "4", "4", "--device", "cpu"]
        args = options + ["--out", str(tmp_path / "eval")]
        E.main(args + ["--dry-run", "--count-tokenizer", tok.path])
        before = capsys.readouterr().out
        assert served.backend.seen == [] and not (tmp_path / "eval").exists()
        assert "answers to generate, a: vicuna 6 of 6" in before
        E.main(args)
        bodies, prompt_tokens = served.backend.counted()
        capsys.readouterr()
        E.main(args + ["--dry-run", "--count-tokenizer", tok.path])
        after = capsys.readouterr().out
        shutil.copytree(tmp_path / "eval" / "generations", tmp_path / "fresh" / "generations")  # no judge cache
        E.main(options + ["--out", str(tmp_path / "fresh"), "--dry-run", "--count-tokenizer", tok.path])
        exact = capsys.readouterr().out
        assert len(served.backend.counted()[0]) == 12  # the dry runs sent nothing
    assert len(bodies) == figure(before, "requests") == figure(exact, "requests") == 12  # 6 questions, both orders
    assert "estimated: 12 judgment(s) with an answer not generated yet" in before
    assert abs(figure(before, "prompt tokens") - prompt_tokens) < 0.02 * prompt_tokens  # answers at their most
    assert figure(exact, "prompt tokens") == prompt_tokens and "every answer is generated" in exact
    assert "answers to generate, b: vicuna 0 of 6" in after and figure(after, "requests") == 0
    assert cached_figure(after) == 12


# ----------------------------------------------------------------------------- pre-flight: nothing before the check

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def broken_teacher(tiny, monkeypatch, request):
    """(base URL, model, what the one-line error says) of a teacher that cannot work: unreachable, a rejected
    key, an unknown model."""
    monkeypatch.setenv(KEY_ENV, "sk-a-wrong-key")
    if request.param == "unreachable":
        yield f"http://127.0.0.1:{free_port()}/v1", "tiny-teacher", "connection refused"
        return
    with Served(tiny, api_key=KEY) as served:
        if request.param == "bad key":
            yield served.url, "tiny-teacher", f"HTTP 401: Incorrect API key provided.; check the key in ${KEY_ENV}"
        else:
            monkeypatch.setenv(KEY_ENV, KEY)
            yield served.url, "gpt-17", "HTTP 404: The model `gpt-17` does not exist"
        assert served.backend.seen == []  # the pre-flight was refused before the model saw anything


CASES = ["unreachable", "bad key", "unknown model"]


def one_line_error(err, prefix, url, model):
    """The error line of `prefix`; it names the model and the URL."""
    line = next((line for line in err.strip().splitlines() if line.startswith(prefix)), "")
    assert f"pre-flight check of model '{model}' failed" in line and url in line, err
    return line


@pytest.mark.parametrize("broken_teacher", CASES, indirect=True)
def test_contextual_stops_before_sampling(broken_teacher, tiny, tmp_path, capsys):
    url, model, reason = broken_teacher
    out = tmp_path / "c.jsonl"
    with pytest.raises(SystemExit) as stopped:
        teacher.main(["contextual", "--data", alpaca_file(tmp_path / "a.json", 5), "--out", str(out), "--base-url", url,
                      "--model", model, "--student", tiny[2], "--api-key-env", KEY_ENV, "--max-retries", "0"])
    line = one_line_error(capsys.readouterr().err, "teacher.py contextual: error: ", url, model)
    assert stopped.value.code == 1 and reason in line and "sk-a-wrong-key" not in line
    assert not os.path.exists(str(out) + ".student.jsonl") and not out.exists()  # no student sample


def pipeline_command(tiny, tmp_path, url, model):
    """tuna.py pipeline on 4 ranked instructions and 4 Alpaca instructions for contextual ranking."""
    ranked = tmp_path / "ranked.jsonl"
    data.write_ranked_jsonl(ranked, [data.RankedRecord(id=str(i), prompt=data.alpaca_prompt(f"Task {i}"),
                                                       candidates=["a b", "c d e"]) for i in range(4)])
    return ["pipeline", "--init", tiny[2], "--probabilistic-data", str(ranked), "--out", str(tmp_path / "tuna"),
            "--batch-size", "2", "--instructions", alpaca_file(tmp_path / "a.json", 4),
            "--teacher-base-url", url, "--teacher-model", model]


@pytest.mark.parametrize("broken_teacher", CASES, indirect=True)
def test_pipeline_stops_before_training_tuna_p(broken_teacher, tiny, tmp_path, capfd):
    url, model, reason = broken_teacher
    out = tmp_path / "tuna"
    code = tuna.main(pipeline_command(tiny, tmp_path, url, model)
                     + ["--teacher-args", f"--api-key-env {KEY_ENV} --max-retries 0"])
    err = capfd.readouterr().err
    assert code == 1 and "failed its pre-flight check (above); nothing was trained" in err
    assert reason in one_line_error(err, "teacher.py contextual: error: ", url, model)
    assert not (out / "tuna_p").exists() and not (out / "contextual.jsonl.student.jsonl").exists()


def test_pipeline_dry_run_passes_every_given_cost_option_on_a_price_of_0_included(tiny, tmp_path, capfd):
    """pipeline --dry-run runs teacher.py contextual --dry-run with the cost options given; a free input
    (price 0) is still a price, so the cost is computed, not asked for. Nothing is trained or sent."""
    out = tmp_path / "tuna"
    code = tuna.main(pipeline_command(tiny, tmp_path, "http://127.0.0.1:9/v1", "gpt-4")
                     + ["--dry-run", "--price-per-1m-input", "0", "--price-per-1m-output", "2"])
    printed = capfd.readouterr()
    assert code == 0, printed.err
    cost = next(line for line in printed.out.splitlines() if line.strip().startswith("cost:"))
    assert "at most $0.00 input + $" in cost and "give --price-per-1m-input" not in cost
    assert not out.exists()


@pytest.mark.parametrize("broken_teacher", CASES, indirect=True)
def test_eval_stops_before_generating_answers(broken_teacher, tiny, tmp_path, capsys):
    url, model, reason = broken_teacher
    vicuna = tmp_path / "vicuna"
    vicuna.mkdir()
    (vicuna / "question.jsonl").write_text(json.dumps({"question_id": 1, "category": "generic", "turns": ["Hi?"]}))
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as stopped:
        E.main(["--checkpoints", f"a={tiny[2]}", f"b={tiny[2]}", "--vicuna", str(vicuna), "--judge-url", url,
                "--judge-model", model, "--judge-api-key-env", KEY_ENV, "--out", str(out), "--device", "cpu"])
    line = one_line_error(capsys.readouterr().err, "eval.py: error: ", url, model)
    assert stopped.value.code == 1 and reason in line
    assert not (out / "generations").exists() and not (out / "results.json").exists()  # no answer


class WithoutField:
    """A server that ignores an option: its completions lack `logprobs` (or only their text offsets, which
    scoring the original answer with echo reads)."""
    name = "m"

    def __init__(self, missing):
        self.missing, self.bodies = missing, []

    def completions(self, body):
        self.bodies.append(body)
        logprobs = {"tokens": ["OK"], "token_logprobs": [-0.1], "top_logprobs": None, "text_offset": [0]}
        logprobs.pop(self.missing)
        return {"choices": [{"text": "OK", "index": 0, "logprobs": logprobs, "finish_reason": "length"}]}

    def chat(self, body):
        raise BadRequest("completions only")


@pytest.mark.parametrize("missing, options", [("token_logprobs", []), ("text_offset", ["--add-original", "scored"])])
def test_preflight_refuses_a_server_without_a_field_the_run_reads(missing, options, tmp_path, capsys):
    backend = WithoutField(missing)
    server = backend_server(backend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    out = tmp_path / "p.jsonl"
    try:
        with pytest.raises(SystemExit) as stopped:
            teacher.main(["probabilistic", "--data", alpaca_file(tmp_path / "a.json", 5), "--out", str(out),
                          "--base-url", url, "--model", "m", *options])
    finally:
        server.shutdown()
        server.server_close()
    line = one_line_error(capsys.readouterr().err, "teacher.py probabilistic: error: ", url, "m")
    assert stopped.value.code == 1 and f"the answer has no field 'choices.0.logprobs.{missing}'" in line
    assert len(backend.bodies) == 1 and not out.exists()  # the check only, nothing paid for the data


# ----------------------------------------------------------------------------- server.py's plumbing

class CompletionsOnly:
    """A backend with no chat method (backend_server's contract names both)."""
    name = "m"

    def completions(self, body):
        return {"choices": [{"text": "OK", "index": 0, "logprobs": None, "finish_reason": "stop"}]}


def test_a_backend_without_an_endpoint_answers_it_with_openais_404():
    """The missing method is an unknown URL (404 unknown_url, JSON), not a dropped connection; the other
    endpoint still answers."""
    server = backend_server(CompletionsOnly())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        chat = requests.post(url + "/chat/completions", json={"messages": []}, timeout=10)
        completion = requests.post(url + "/completions", json={"prompt": "x"}, timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    assert chat.status_code == 404
    assert chat.json()["error"]["code"] == "unknown_url"
    assert chat.json()["error"]["message"] == "Unknown URL: POST /v1/chat/completions"
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"] == "OK"


def test_serve_answers_128_concurrent_connections(tiny):
    """A client's 128 threads connect at once: the listen backlog keeps every one (Python's default of 5 leaves
    the rest to SYN retries a second later, or to resets where the kernel aborts on overflow)."""
    with Served(tiny) as served:
        port, go, answers = served.server.server_port, threading.Event(), []

        def connect_and_ask():
            go.wait()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.9) as s:  # under a SYN retry's 1 s
                    s.settimeout(30)
                    s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    reply = b"".join(iter(lambda: s.recv(65536), b""))
                answers.append(reply.split(b"\r\n")[0])
            except OSError as e:
                answers.append(repr(e))

        threads = [threading.Thread(target=connect_and_ask) for _ in range(128)]
        for thread in threads:
            thread.start()
        go.set()
        for thread in threads:
            thread.join()
    assert answers == [b"HTTP/1.0 200 OK"] * 128, set(answers)


def test_serve_refuses_an_oversized_body_with_413_unread(tiny):
    with Served(tiny, max_body_bytes=1 << 20) as served:
        reply = requests.post(served.url + "/chat/completions", data=b"x" * (30 << 20), timeout=60)
        assert reply.status_code == 413 and served.backend.seen == []
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_too_large"
        assert "31457280 bytes" in error["message"] and "1048576" in error["message"]
        small = requests.post(served.url + "/completions", json={"prompt": "ok", "max_tokens": 1})
        assert small.status_code == 200  # just under the limit is served, and the server lives on


def test_serve_wants_its_key_and_the_projects_client_brings_it(tiny, monkeypatch):
    with Served(tiny, api_key=KEY) as served:
        body = {"model": "tiny-teacher", "prompt": "Hi", "max_tokens": 1}
        missing = requests.post(served.url + "/completions", json=body)
        wrong = requests.post(served.url + "/completions", json=body, headers={"Authorization": "Bearer sk-nope"})
        assert missing.status_code == wrong.status_code == 401 and served.backend.seen == []
        assert missing.json() == {"error": {"message": NO_KEY, "type": "invalid_request_error",
                                            "param": None, "code": None}}
        assert wrong.json()["error"]["code"] == "invalid_api_key" and "sk-nope" not in wrong.text
        assert requests.get(served.url + "/models").status_code == 401
        monkeypatch.setenv(KEY_ENV, KEY)
        client = TeacherClient(served.url, "tiny-teacher", api_key_env=KEY_ENV)
        client.check(chat=False, logprobs=1, echo=True)
        assert client.complete("Hi", max_tokens=1)["choices"][0]["text"] is not None
        assert len(served.backend.seen) == 2 and client.counts["requests"] == client.counts["preflight_requests"] == 1
        unknown = requests.post(served.url + "/completions", json=dict(body, model="gpt-17"),
                                headers={"Authorization": f"Bearer {KEY}"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_serve_refuses_an_open_host_without_a_key_and_stops_cleanly_on_sigterm(tiny, tmp_path, monkeypatch):
    command = [sys.executable, os.path.join(ROOT, "server.py"), "--checkpoint", tiny[2]]
    monkeypatch.delenv(KEY_ENV, raising=False)
    refused = subprocess.run(command + ["--host", "0.0.0.0", "--port", str(free_port())], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and "--host 0.0.0.0 serves anyone who can reach the port" in refused.stderr
    unset = subprocess.run(command + ["--api-key-env", KEY_ENV], capture_output=True, text=True, timeout=60)
    assert unset.returncode == 1 and f"the environment variable {KEY_ENV} is not set" in unset.stderr
    port = free_port()
    server = subprocess.Popen(command + ["--port", str(port), "--api-key-env", KEY_ENV], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, **{KEY_ENV: KEY}))
    try:
        for _ in range(300):
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        assert answer.json()["data"][0]["id"] == os.path.basename(tiny[2])
        server.send_signal(signal.SIGTERM)
        stdout, stderr = server.communicate(timeout=30)
    finally:
        server.kill()
    assert server.returncode == 0 and "stopped (SIGTERM)" in stdout and "Traceback" not in stderr
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)


# ----------------------------------------------------------------------------- one progress helper

def test_progress_lines_every_five_percent_with_rate_eta_and_failures(monkeypatch):
    clock = iter(range(0, 1000, 2))  # 2 s per call to the clock
    monkeypatch.setattr(data.time, "monotonic", lambda: next(clock))
    lines = []
    progress = data.Progress("teacher requests", 40, lines.append, detail=lambda: "requests 9")
    for i in range(40):
        progress.advance(failed=int(i % 10 == 0))
    assert len(lines) == 20 and lines[0] == "teacher requests 2/40 | 1.00 items/s | 1 failed | ETA 0:00:38 | requests 9"
    assert lines[-1] == "teacher requests 40/40 | 1.00 items/s | 4 failed | ETA 0:00:00 | requests 9"
    assert data.duration_text(90061) == "25:01:01"
