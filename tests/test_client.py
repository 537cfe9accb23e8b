"""`client.py` against servers that misbehave, over real HTTP on 127.0.0.1: an API key never reaches an error
line, a log or a file (a key with a carriage return is refused when read, naming only its variable; a server that
echoes the key, in JSON or not, however long its body); every transport error is one masked line; Retry-After is
bounded; and the pre-flight says which option a server ignored and what works, tested against `transformers
serve` itself."""
import dataclasses
import email.utils
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import checkpoint
import model as M
import teacher
import tokenizer
from client import RunError, TeacherClient, TeacherError
from conftest import ServedInThread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY_ENV = "TUNA_TEST_CLIENT_KEY"
KEY = "sk-tuna-client-test-8f3a9c2e7b1d4605"
ANSWER = {"id": "cmpl-1", "object": "text_completion", "model": "m",
          "choices": [{"text": " OK", "index": 0, "logprobs": None, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def pieces_of(key, length=8):
    """Every piece of `length` characters of the key: none may appear anywhere."""
    return {key[i:i + length] for i in range(len(key) - length + 1)}


def leaks(text, key=KEY):
    return sorted(piece for piece in pieces_of(key) if piece in text)


# ----------------------------------------------------------------------------- a server that misbehaves

class Misbehaving(ServedInThread, ThreadingHTTPServer):
    """Answers as the request's prompt says: "echo-json 401", "echo-text 500 PAD" (the Authorization header said
    back in an error body, JSON or an HTML page, after PAD characters), "retry-after VALUE" (429 with that
    Retry-After the first time, 200 after), "redirect" (307 to itself, for ever); else 200. Counts requests."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), MisbehavingHandler)
        self.server = self
        self.requests, self.lock = [], threading.Lock()


class MisbehavingHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, payload, content_type="application/json", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = str(body.get("prompt", ""))
        auth = self.headers.get("Authorization", "")
        with self.server.lock:
            seen = sum(1 for earlier in self.server.requests if earlier == prompt)
            self.server.requests.append(prompt)
        words = prompt.split()
        if prompt.startswith("echo-json"):
            error = {"message": f"Incorrect API key provided: {auth.removeprefix('Bearer ')}.", "type": "x",
                     "param": None, "code": "invalid_api_key"}
            return self.reply(int(words[1]), json.dumps({"error": error}).encode())
        if prompt.startswith("echo-text"):  # a proxy's HTML page, the header at character PAD
            page = "<html><body>" + "x" * (int(words[2]) - 12) + f"{auth} was refused</body></html>" + "y" * 3000
            return self.reply(int(words[1]), page.encode(), "text/html")
        if prompt.startswith("retry-after") and seen == 0:
            value = prompt.split(" ", 1)[1]
            return self.reply(429, b'{"error": {"message": "Rate limit reached"}}', headers=[("Retry-After", value)])
        if prompt == "redirect":
            return self.reply(307, b"", headers=[("Location", self.path)])
        self.reply(200, json.dumps(ANSWER).encode())


# ----------------------------------------------------------------------------- 4. the key never in an error

def test_a_key_with_a_carriage_return_is_refused_when_read_naming_only_the_variable(tmp_path):
    """A key file with Windows line ends read with $(cat key.txt) keeps its "\\r". teacher.py stops at once
    with one line naming the variable, never the value. Before: requests raised InvalidHeader with the whole
    header in its message, and teacher.py died with a traceback that printed the key."""
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}]))
    with Misbehaving() as server:
        run = subprocess.run([sys.executable, os.path.join(ROOT, "teacher.py"), "probabilistic", "--data",
                              str(alpaca), "--out", str(tmp_path / "p.jsonl"), "--base-url", server.url,
                              "--model", "m", "--api-key-env", KEY_ENV], capture_output=True, text=True,
                             timeout=120, env=dict(os.environ, **{KEY_ENV: KEY + "\r"}))
        assert server.requests == []  # refused before any request
    assert run.returncode == 1 and "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("teacher.py probabilistic: error: ") and f"${KEY_ENV}" in line
    assert "white space or a control character" in line
    assert leaks(run.stdout + run.stderr) == []
    for bad in ["", " ", "sk-with space", "sk-tab\there", "sk-é-accent", "sk-bell\a"]:
        os.environ[KEY_ENV] = bad
        try:
            with pytest.raises(RunError, match=re.escape(f"${KEY_ENV}")) as refused:
                TeacherClient("http://127.0.0.1:9/v1", "m", api_key_env=KEY_ENV)
            assert bad.strip() == "" or bad not in str(refused.value)
        finally:
            del os.environ[KEY_ENV]


@pytest.mark.parametrize("prompt, masked", [("echo-json 401", True), ("echo-json 500", True),
                                            ("echo-text 401 470", True), ("echo-text 503 470", True),
                                            ("echo-text 401 495", False), ("echo-text 500 20", True)])
def test_a_server_that_says_the_key_back_never_gets_it_printed(prompt, masked, tmp_path, monkeypatch, caplog):
    """A real server puts the Authorization header into its 4xx/5xx body: JSON, or an HTML page where the key
    sits across the 500th character (where error bodies are cut: PAD 470 puts 23 of its characters before the
    cut, 495 none). Nothing the client raises or logs, nor its cache, holds 8 characters of the key in a row.
    Before: the HTML body was cut at 500 characters and then masked, so the key's first 23 characters, cut off
    from the rest, were printed."""
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    with Misbehaving() as server:
        client = TeacherClient(server.url, "m", api_key_env=KEY_ENV, cache_path=str(tmp_path / "cache.jsonl"),
                               max_retries=1, backoff=0.01)
        with pytest.raises(TeacherError) as failed:
            client.complete(prompt, max_tokens=1)
        assert len(server.requests) in (1, 2)  # sent: the key went in the header
    texts = [str(failed.value), repr(failed.value), caplog.text]
    assert all(leaks(text) == [] for text in texts), [leaks(text) for text in texts]
    assert ("***" in str(failed.value)) == masked and len(str(failed.value)) < 1200
    assert not (tmp_path / "cache.jsonl").exists() or leaks((tmp_path / "cache.jsonl").read_text()) == []


def test_every_transport_error_is_one_masked_line(monkeypatch):
    """A server that redirects for ever makes `requests` raise TooManyRedirects, which no retry helps: one
    TeacherError naming the URL (masked), not a traceback. Before: it left client.py uncaught."""
    monkeypatch.setenv(KEY_ENV, KEY)
    with Misbehaving() as server:
        client = TeacherClient(server.url, "m", api_key_env=KEY_ENV, max_retries=2, backoff=0.01)
        with pytest.raises(TeacherError) as failed:
            client.complete("redirect")
    message = str(failed.value)
    assert "TooManyRedirects" in message and server.url in message and leaks(message) == []
    assert client.counts["requests"] == 1  # not retried


# ----------------------------------------------------------------------------- 5. Retry-After, bounded

FAR_FUTURE = email.utils.format_datetime(email.utils.parsedate_to_datetime("Fri, 31 Dec 9999 23:59:59 GMT"))


@pytest.mark.parametrize("value", ["1e9", "inf", "nan", "-5", FAR_FUTURE, "soon"])
def test_retry_after_is_bounded_by_max_backoff(value):
    """429 with Retry-After 1e9 s, inf, nan, -5, a date in the year 9999, or nonsense: the client waits at most
    max_backoff (0.5 s here), then gets its answer. Measured in a thread bounded at 10 s. Before: 1e9 and the
    date were waited (for ever, as far as a run goes), inf crashed time.sleep with OverflowError."""
    outcome = {}

    def ask():
        started = time.monotonic()
        try:
            outcome["answer"] = client.complete(f"retry-after {value}")
        except Exception as e:  # kept for the assertion below
            outcome["error"] = f"{type(e).__name__}: {e}"
        outcome["seconds"] = time.monotonic() - started

    with Misbehaving() as server:
        client = TeacherClient(server.url, "m", max_retries=2, backoff=0.05, max_backoff=0.5)
        waiting = threading.Thread(target=ask, daemon=True)
        waiting.start()
        waiting.join(10)
    assert not waiting.is_alive(), f"still waiting after 10 s on Retry-After: {value}"
    assert "error" not in outcome, outcome["error"]
    assert outcome["answer"]["choices"][0]["text"] == " OK" and outcome["seconds"] < 0.5 + 1.0
    assert client.counts["retries"] == 1


# ----------------------------------------------------------------------------- 6. transformers serve

CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                 "assistant:")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def transformers_serve(tmp_path_factory, bpe_tokenizer_dir):
    """`transformers serve` (transformers 5's own OpenAI-compatible server, tests/requirements.txt's serving
    extras) on a free port of 127.0.0.1, offline, pinned to a tiny random LLaMA checkpoint written here with a
    byte-level BPE tokenizer and a chat template. Yields (base URL, model name = the folder, its log file)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    folder = tmp_path_factory.mktemp("tiny-hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(bpe_tokenizer_dir, name), "rb") as src:
            (folder / name).write_bytes(src.read())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=CHAT_TEMPLATE)))
    tok = tokenizer.Tokenizer(str(folder))
    torch.manual_seed(0)
    args = dataclasses.replace(M.ModelArgs.from_name("tiny"), vocab_size=tok.vocab_size, bos_id=tok.bos_id,
                               eos_id=tok.eos_id, max_seq_len=4096)
    checkpoint.save_hf_checkpoint(M.Transformer(args), str(folder))
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-log") / "serve.log"
    # the `transformers` command of this interpreter's transformers
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--log-level", "info"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        assert process.poll() is None, log_path.read_text()[-3000:]
        yield f"http://127.0.0.1:{port}/v1", str(folder), log_path
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def posts_served(log_path, path):
    """How many POSTs to `path` the server's access log shows."""
    return len(re.findall(rf'"POST {re.escape(path)} HTTP/1.1" \d+', log_path.read_text()))


def test_transformers_serve_ignores_logprobs_and_the_preflight_says_so(transformers_serve, tmp_path, capsys):
    """transformers serve answers /v1/completions but ignores logprobs and echo ("Ignoring unsupported fields"):
    `teacher.py probabilistic` stops at its pre-flight with one line that names the ignored option and the
    servers that return log-probs, exit 1, having sent the check alone. Before: the line said only that the
    answer had no field 'choices.0.logprobs.token_logprobs'."""
    url, name, log_path = transformers_serve
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(3)]))
    before = posts_served(log_path, "/v1/completions")
    for options in ([], ["--add-original", "scored"]):
        with pytest.raises(SystemExit) as stopped:
            teacher.main(["probabilistic", "--data", str(alpaca), "--out", str(tmp_path / "p.jsonl"), "--base-url",
                          url, "--model", name, "--max-retries", "0", *options])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert stopped.value.code == 1 and line.startswith("teacher.py probabilistic: error: pre-flight check")
        assert "the answer has no field 'choices.0.logprobs.token_logprobs'" in line
        assert "the server ignored 'logprobs'" in line and "vLLM" in line and "server.py" in line
        if options:
            assert "'echo'" in line and "--add-original first" in line
    assert posts_served(log_path, "/v1/completions") - before == 2  # the two checks, nothing for the data
    assert not (tmp_path / "p.jsonl").exists()


def test_transformers_serve_carries_a_ranking_request_parsed_or_recorded_as_a_failure(transformers_serve, tmp_path):
    """The chat endpoint of transformers serve answers the contextual-ranking request (teacher.ranking_request);
    its reply (a tiny random model's) is parsed, or recorded in the failures file with the reason: never a
    crash."""
    url, name, log_path = transformers_serve
    client = TeacherClient(url, name, max_retries=0, timeout=120)
    client.check(chat=True, temperature=1.0)  # the contextual run's pre-flight passes
    path, params = teacher.ranking_request("### Instruction:\nSay hi.\n\n### Response:", ["Hi.", "Hello!"],
                                           max_tokens=8)
    answer = client.request(path, params)
    assert isinstance(answer["choices"][0]["message"]["content"], str)
    examples = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(2)]
    samples = {str(i): {"candidates": ["Hi.", "Hello!"]} for i in range(2)}
    out, failures = tmp_path / "c.jsonl", tmp_path / "c.jsonl.failures.jsonl"
    try:
        teacher.build_contextual(client, examples, samples, str(out), max_tokens=8)
    except RunError as e:  # every item failed: said so, with the failures file
        assert "every item failed" in str(e) and failures.exists()
    recorded = out.read_text().splitlines() if out.exists() else []
    failed = [json.loads(line) for line in failures.read_text().splitlines()]
    assert len(recorded) + len(failed) == 2 and all(row["error"] for row in failed), failed
