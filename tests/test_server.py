"""`server.py` under bad input: what no input may cost it. The key is checked from the headers before a body is
read; every connection has a read deadline; the connections served and the body bytes held are capped (503 past
a cap); a prompt that cannot fit the context is refused before it is tokenized; every invalid value is a 400 that
names its field, never a 500 (which the project's own client would retry). Every test talks real HTTP over
sockets on 127.0.0.1, bounded in connections and seconds, and measures that a normal request is still answered
within a second while the bad ones are held."""
import dataclasses
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

import checkpoint
import model as M
import tokenizer
from server import backend_server, make_server
from conftest import ServedInThread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY_ENV, KEY = "TUNA_TEST_SERVER_KEY", "sk-tuna-server-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
ASK = {"prompt": "Hi", "max_tokens": 1}  # a normal request


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Servers answer with one torch thread (as the served one in a process of its own): on a shared 2-core
    machine, two spinning intra-op threads take a tiny model's 15 ms answer to a second, which measures the
    machine, not the server."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, spm_model_path):
    """A tiny random LLaMA (context 256) and its sentencepiece tokenizer, saved as a checkpoint folder too."""
    torch.manual_seed(0)
    net = M.Transformer(dataclasses.replace(M.ModelArgs.from_name("tiny"), max_seq_len=256)).eval()
    folder = tmp_path_factory.mktemp("tiny")
    checkpoint.save_hf_checkpoint(net, str(folder))
    with open(spm_model_path, "rb") as src, open(folder / "tokenizer.model", "wb") as dst:
        dst.write(src.read())
    return net, tokenizer.Tokenizer(spm_model_path), str(folder)


class Running(ServedInThread):
    """A server (make_server or backend_server's) serving in a thread while the block runs."""

    def __init__(self, server):
        self.server = server
        self.port = server.server_port


# ----------------------------------------------------------------------------- raw HTTP, as a client sends it

def post_head(path, length, key=None):
    """The head of a POST with a JSON body of `length` bytes."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {length}\r\n\r\n").encode()


def read_reply(sock, timeout):
    """(status, headers, JSON body) of the reply read from sock within `timeout` seconds; None when none came
    (a timeout, or the server closed the connection without one)."""
    sock.settimeout(timeout)
    deadline, received = time.monotonic() + timeout, b""
    try:
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            received += chunk
        head, body = received.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except OSError:  # a timeout, or a reset
        return None
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


def closed_by_server(sock, timeout):
    """Whether the server closes sock (EOF or reset) within `timeout` seconds, whatever it sends before."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except socket.timeout:
        return False
    except OSError:  # reset
        return True


def is_openai_error(body, kind=None, code=None):
    error = (body or {}).get("error")
    shaped = isinstance(error, dict) and set(error) == {"message", "type", "param", "code"} and error["message"]
    return bool(shaped) and kind in (None, error["type"]) and code in (None, error["code"])


def timed(method, url, **kw):
    """(seconds, reply) of one request of a normal client."""
    started = time.monotonic()
    reply = requests.request(method, url, timeout=10, **kw)
    return time.monotonic() - started, reply


# ----------------------------------------------------------------------------- 1. the key before the body

def test_a_keyless_post_is_refused_from_its_headers_with_the_body_unread(tiny):
    """Before: the server read the whole body (up to --max-body-bytes) before looking at the key, so a keyless
    client's headers alone got no answer, and 40 of them sending just under 8 MiB held 320 MiB."""
    net, tok, _ = tiny
    with Running(make_server(net, tok, api_key=KEY)) as served:
        requests.post(served.url + "/completions", json=ASK, headers=AUTH, timeout=30)  # the model's first call
        with socket.create_connection(("127.0.0.1", served.port)) as sock:
            sock.sendall(post_head("/v1/completions", 8 * 2 ** 20 - 1))  # the body never comes
            reply = read_reply(sock, 1.0)
            assert reply is not None, "no answer within a second to a keyless POST whose body was not sent"
            status, headers, body = reply
            assert status == 401 and is_openai_error(body, "invalid_request_error")
            assert headers.get("connection") == "close" and closed_by_server(sock, 2.0)
        with socket.create_connection(("127.0.0.1", served.port)) as sock:  # a wrong key: the same
            sock.sendall(post_head("/v1/chat/completions", 2 ** 20, key="sk-wrong"))
            status, _, body = read_reply(sock, 1.0)
            assert status == 401 and body["error"]["code"] == "invalid_api_key" and "sk-wrong" not in str(body)
        seconds, reply = timed("POST", served.url + "/completions", json=ASK, headers=AUTH)
        assert reply.status_code == 200 and seconds < 1.0


# ----------------------------------------------------------------------------- 1. the read deadline

def test_a_slow_client_is_dropped_at_the_read_timeout(tiny):
    """Half-sent headers, headers trickled a byte at a time (each byte within any per-read timeout), a body that
    stops half-way, an idle kept-alive connection: each is closed when its request has not arrived within
    --read-timeout, without an answer that a client would retry. Before: held for ever, one thread each."""
    net, tok, _ = tiny
    read_timeout = 1.0
    with Running(make_server(net, tok, read_timeout=read_timeout)) as served:
        half = socket.create_connection(("127.0.0.1", served.port))
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        stalled = socket.create_connection(("127.0.0.1", served.port))
        stalled.sendall(post_head("/v1/completions", 100) + b'{"prompt": "')
        idle = socket.create_connection(("127.0.0.1", served.port))
        idle.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_reply(idle, 1.0)[0] == 200  # then nothing more on it
        trickle = socket.create_connection(("127.0.0.1", served.port))
        started = time.monotonic()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 40
        dropped_at = None
        for byte in head:
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                dropped_at = time.monotonic() - started
                break
            if closed_by_server(trickle, 0.1):
                dropped_at = time.monotonic() - started
                break
        seconds, reply = timed("POST", served.url + "/completions", json=ASK)
        assert reply.status_code == 200 and seconds < 1.0  # the server answers others meanwhile
        assert dropped_at is not None and dropped_at < read_timeout + 1.0, dropped_at
        for sock in (half, stalled, idle):
            assert closed_by_server(sock, read_timeout + 1.0)
            sock.close()
        trickle.close()


# ----------------------------------------------------------------------------- 1. the caps

class Blocking:
    """A backend whose answers wait until released: requests that hold their connections while answered."""
    name = "m"

    def __init__(self):
        self.release, self.entered = threading.Event(), threading.Semaphore(0)

    def completions(self, body):
        self.entered.release()
        self.release.wait(10)
        return {"choices": [{"text": "OK", "index": 0, "logprobs": None, "finish_reason": "stop"}]}

    chat = completions


def test_connections_past_the_cap_get_503_and_slow_ones_make_room():
    """--max-connections 4: with 4 requests being answered, a fifth connection gets OpenAI's 503 at once (with
    Retry-After); with 4 connections that only send half their headers, a normal request is still answered
    within a second (the oldest slow one makes room). Before: no cap, one thread per connection."""
    backend = Blocking()
    with Running(backend_server(backend, max_connections=4, read_timeout=5)) as served:
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(
            requests.post(served.url + "/completions", json=ASK, timeout=20).status_code)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for _ in range(4):
            assert backend.entered.acquire(timeout=5)
        with socket.create_connection(("127.0.0.1", served.port)) as sock:
            started = time.monotonic()
            sock.sendall(post_head("/v1/completions", len(json.dumps(ASK))) + json.dumps(ASK).encode())
            status, headers, body = read_reply(sock, 1.0)
            assert status == 503 and time.monotonic() - started < 1.0
            assert is_openai_error(body, "server_error", "server_is_overloaded") and "4" in body["error"]["message"]
            assert float(headers["retry-after"]) >= 1
        backend.release.set()
        for thread in threads:
            thread.join(10)
        assert answers == [200] * 4
        slow = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(4)]
        for sock in slow:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\n")
        time.sleep(1.2)  # held a while
        for _ in range(3):
            seconds, reply = timed("POST", served.url + "/completions", json=ASK)
            assert reply.status_code == 200 and seconds < 1.0
        assert sum(closed_by_server(sock, 0.5) for sock in slow) >= 1
        for sock in slow:
            sock.close()


def test_a_connection_dropped_to_make_room_has_ended_before_the_next_one_starts():
    """--max-connections 2, two connections sending half their headers, then a normal request: it takes the
    place of the oldest, whose thread ends first (its closing slowed to 0.3 s here, as on a loaded machine), so
    the connection threads alive at once never pass the cap, and the request is still answered within a
    second. Before: the new thread started beside the ending one (3 at once)."""
    backend = Blocking()
    backend.release.set()
    server = backend_server(backend, max_connections=2, read_timeout=5)
    alive, peak, lock = [0], [0], threading.Lock()
    serve_connection, close_connection = server.process_request_thread, server.shutdown_request

    def counted(request, client_address):  # a connection's thread, counted from its start
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        serve_connection(request, client_address)

    def slow_close(request):  # the end of a connection's thread, after its socket is closed
        time.sleep(0.3)
        close_connection(request)
        with lock:
            alive[0] -= 1

    server.process_request_thread, server.shutdown_request = counted, slow_close
    with Running(server) as served:
        slow = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(2)]
        for sock in slow:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\n")
        deadline = time.monotonic() + 5
        while alive[0] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        seconds, reply = timed("POST", served.url + "/completions", json=ASK)
        assert reply.status_code == 200 and seconds < 1.0
        assert peak[0] == 2
        for sock in slow:
            sock.close()


def test_body_bytes_held_at_once_are_capped_with_503_body_unread():
    """--max-body-bytes 2 MiB, --max-total-body-bytes 3 MiB: one client holding half of a 2 MiB body leaves
    room for small requests, not for a second 2 MiB body (503 at once, the body unread, the connection closed);
    once the first is gone, the second fits. Before: each connection could hold --max-body-bytes."""
    backend = Blocking()
    backend.release.set()
    limits = dict(max_body_bytes=2 * 2 ** 20, max_total_body_bytes=3 * 2 ** 20, read_timeout=5)
    with Running(backend_server(backend, **limits)) as served:
        first = socket.create_connection(("127.0.0.1", served.port))
        first.sendall(post_head("/v1/completions", 2 * 2 ** 20) + b" " * 2 ** 20)
        assert held_becomes(served.server, 2 * 2 ** 20)
        with socket.create_connection(("127.0.0.1", served.port)) as second:
            second.sendall(post_head("/v1/completions", 2 * 2 ** 20))
            status, headers, body = read_reply(second, 1.0)
            assert status == 503 and is_openai_error(body, "server_error", "server_is_overloaded")
            assert headers.get("connection") == "close" and "retry-after" in headers
        seconds, reply = timed("POST", served.url + "/completions", json=ASK)
        assert reply.status_code == 200 and seconds < 1.0  # a small body still fits
        first.close()
        assert held_becomes(served.server, 0)
        big = json.dumps(dict(ASK, padding="x" * (2 * 2 ** 20 - 100)))
        assert requests.post(served.url + "/completions", data=big, timeout=10).status_code == 200


def held_becomes(server, size, seconds=5):
    """Whether the server's count of body bytes held reaches `size` within `seconds` (its handler threads run
    when the machine lets them)."""
    deadline = time.monotonic() + seconds
    while server.body_bytes != size and time.monotonic() < deadline:
        time.sleep(0.01)
    return server.body_bytes == size


# ----------------------------------------------------------------------------- 1. all of it at once, measured

def proc_status(pid):
    """(threads, resident MiB) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024


def attack(port, keyless=30, half_headers=30, hold=3.5, body_bytes=8 * 2 ** 20 - 1, pid=None):
    """Keyless clients sending just under 8 MiB each and clients holding half-sent headers, while a normal client
    asks every 0.1 s; all on 127.0.0.1, stopped after `hold` seconds. Returns what was measured: the normal
    requests' (seconds, status), the keyless clients' replies to their headers, when the server dropped each
    half-header client (None: not by the end), and the server's peak threads and resident MiB above what it had
    before (pid: the server's process)."""
    stop, measured = threading.Event(), dict(normal=[], keyless=[], dropped=[], peak=(0, 0.0))
    before = proc_status(pid) if pid else None

    def normal():
        while not stop.is_set():
            try:
                seconds, reply = timed("POST", f"http://127.0.0.1:{port}/v1/completions", json=ASK, headers=AUTH)
                measured["normal"].append((seconds, reply.status_code))
            except requests.RequestException as e:
                measured["normal"].append((10.0, type(e).__name__))
            time.sleep(0.1)

    def half_header():
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bea")
            dropped = closed_by_server(sock, hold)
            measured["dropped"].append(time.monotonic() - started if dropped else None)

    def keyless_client():
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(post_head("/v1/completions", body_bytes))
            reply = read_reply(sock, 1.0)  # to the headers alone
            measured["keyless"].append(reply)
            sock.settimeout(hold)
            try:
                sock.sendall(b" " * (body_bytes - 1))  # all but the last byte, then hold the connection
            except OSError:
                pass
            stop.wait(hold)

    def watch():
        while not stop.is_set():
            threads, rss = proc_status(pid)
            measured["peak"] = (max(measured["peak"][0], threads - before[0]),
                                max(measured["peak"][1], rss - before[1]))
            time.sleep(0.05)

    workers = [threading.Thread(target=half_header) for _ in range(half_headers)]
    workers += [threading.Thread(target=keyless_client) for _ in range(keyless)]
    workers += [threading.Thread(target=normal)] + ([threading.Thread(target=watch)] if pid else [])
    for worker in workers:
        worker.start()
    time.sleep(hold)
    stop.set()
    for worker in workers:
        worker.join(hold + 5)
    return measured


def test_under_attack_a_normal_request_is_answered_within_a_second(tiny):
    """`python server.py` with a key, --max-connections 24, --read-timeout 2: 30 keyless clients sending just
    under 8 MiB and 30 clients holding half-sent headers, for 3.5 s. Measured: every normal request is answered
    (200) within a second; every keyless client gets its 401 from its headers alone; every half-header client is
    dropped within the read timeout (+1 s); the server's threads stay under the cap and its memory grows by less
    than 64 MiB (it read no keyless body). Before: 30 x 8 MiB read (+240 MiB), 60 threads held to the end."""
    port = free_port()
    command = [sys.executable, os.path.join(ROOT, "server.py"), "--checkpoint", tiny[2], "--port", str(port),
               "--api-key-env", KEY_ENV, "--max-connections", "24", "--read-timeout", "2"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, **{KEY_ENV: KEY, "OMP_NUM_THREADS": "1"}))
    try:
        wait_until_up(port, server)
        measured = attack(port, pid=server.pid)
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert "Traceback" not in stderr, stderr[-3000:]
    normal = measured["normal"]
    assert len(normal) >= 10 and all(status == 200 for _, status in normal), normal
    assert max(seconds for seconds, _ in normal) < 1.0, sorted(normal)[-3:]
    assert len(measured["keyless"]) == 30
    assert all(reply and reply[0] == 401 and is_openai_error(reply[2]) for reply in measured["keyless"])
    assert len(measured["dropped"]) == 30 and all(d is not None and d < 3.0 for d in measured["dropped"])
    threads, rss = measured["peak"]
    assert threads <= 24 + 2 and rss < 64, measured["peak"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port, process, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            requests.post(f"http://127.0.0.1:{port}/v1/completions", json=ASK, headers=AUTH, timeout=30)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError(f"server.py did not start: {process.communicate(timeout=10)}")


# ----------------------------------------------------------------------------- 2. length before tokenizing

class CountingTokenizer:
    """A tokenizer.Tokenizer that keeps the length of every text it encodes."""

    def __init__(self, tok):
        self.tok, self.encoded = tok, []

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text, **kw):
        self.encoded.append(len(text))
        return self.tok.encode(text, **kw)


ADDED = "<|an added token of many bytes|>"


def with_added_token(folder, out):
    """A copy of a tokenizer.json folder with one more added token, not special: a text that writes it out is
    one token (as DeepSeek's "<｜User｜>" or Qwen's "<think>")."""
    shutil.copytree(folder, out)
    with open(os.path.join(out, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    new_id = 1 + max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"])])
    spec["added_tokens"].append(dict(spec["added_tokens"][0], id=new_id, content=ADDED, special=False))
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    return str(out)


def test_a_prompt_the_context_cannot_hold_is_refused_before_it_is_tokenized(bpe_tokenizer_dir, tmp_path):
    """Context 256 tokens: a 32 KB prompt (or chat messages of 32 KB in all) is longer than 256 tokens of the
    vocabulary's longest piece could cover, so it gets OpenAI's context-length 400 within a second without being
    tokenized. A prompt of 200 added tokens written out (each longer than any piece, one token) still fits and is
    served. Before: the server tokenized the 32 KB first (22 s with the byte-level BPE before it was made
    faster); the 400 named max_tokens."""
    torch.manual_seed(0)
    tok = CountingTokenizer(tokenizer.Tokenizer(with_added_token(bpe_tokenizer_dir, tmp_path / "tok")))
    args = dataclasses.replace(M.ModelArgs.from_name("tiny"), vocab_size=tok.vocab_size, max_seq_len=256)
    net = M.Transformer(args).eval()
    long_word = "Supercalifragilistic" * 1600  # 32,000 bytes, one word
    with Running(make_server(net, tok)) as served:
        for path, body, param in [
                ("/completions", {"prompt": long_word, "max_tokens": 1}, "prompt"),
                ("/completions", {"prompt": ["Hi", long_word], "max_tokens": 1}, "prompt"),
                ("/chat/completions", {"messages": [{"role": "user", "content": long_word[:16000]}] * 2}, "messages")]:
            seconds, reply = timed("POST", served.url + path, json=body)
            error = reply.json()["error"]
            assert reply.status_code == 400 and seconds < 1.0, (seconds, reply.text[:300])
            assert error["param"] == param and error["code"] == "context_length_exceeded"
            assert "maximum context length is 256 tokens" in error["message"]
        assert all(length < 16000 for length in tok.encoded), tok.encoded
        added = ADDED * 200
        longest_piece = max(len(tok.piece_bytes(i)) for i in range(tok.vocab_size) if tok.piece_bytes(i) != ADDED.encode())
        assert len(tok.tok.encode(added)) == 200 and len(added.encode()) > 256 * longest_piece
        reply = requests.post(served.url + "/completions", json={"prompt": added, "max_tokens": 1}, timeout=30)
        assert reply.status_code == 200, reply.text[:300]


def test_llama3s_tokenizer_json_a_32_kb_prompt_is_refused_in_ms_not_tokenized(real_files):
    """Meta's Llama 3 tokenizer.json (longest piece 128 bytes) behind a context of 64 tokens: 32 KB of random
    letters cannot fit, and the 400 comes before the tokenizer runs. Before: the byte-level BPE merged that one
    32,000-letter word first (8,000 letters: 8.6 s on this machine; 32,000: minutes)."""
    tok = CountingTokenizer(tokenizer.Tokenizer(real_files("llama3")))
    args = dataclasses.replace(M.ModelArgs.from_name("tiny"), vocab_size=tok.vocab_size, max_seq_len=64)
    net = M.Transformer(args).eval()
    rng = random.Random(0)
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(32000))
    with Running(make_server(net, tok)) as served:
        seconds, reply = timed("POST", served.url + "/completions", json={"prompt": letters, "max_tokens": 1})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"
    assert seconds < 1.0 and tok.encoded == []


# ----------------------------------------------------------------------------- 3. 400, never 500

FIELDS = ["model", "prompt", "messages", "n", "temperature", "top_p", "max_tokens", "seed", "stop", "logprobs",
          "echo", "top_logprobs", "stream"]
ODD_VALUES = [True, -1, 0, 2 ** 63, 2 ** 70, -2 ** 70, 1e-300, 1e308, math.nan, math.inf, -math.inf, "", "\ud800",
              [], ["a"], [1], {}, {"a": 1}, [[[]]]]


def test_every_invalid_value_is_a_400_naming_its_field_never_a_500(tiny):
    """Each field of both endpoints set to each odd value (huge and negative integers, 1e-300, NaN and inf as
    Python's json reads them, a lone surrogate, wrong types), and bodies nested 100,000 deep or asking for more
    choices than reason: the answer is 200 or OpenAI's 400 naming the field (404 for a model name that is a
    string but not this one), never a 500. Before: seed 2**70 (Overflow), temperature or top_p 1e-300 (NaN
    probabilities), a lone surrogate (in the prompt or the model), deep nesting (RecursionError) were 500s, a
    non-string model a 404, and 100 prompts x n=16 were all generated."""
    net, tok, _ = tiny
    with Running(make_server(net, tok, seed=0)) as served:
        def post(path, raw):
            return requests.post(served.url + path, data=raw, timeout=60)

        odd = []
        for path, base in [("/completions", {"prompt": "Hi", "max_tokens": 2}),
                           ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})]:
            for field in FIELDS:
                for value in ODD_VALUES:
                    reply = post(path, json.dumps(dict(base, **{field: value})).encode())
                    error = reply.json().get("error") or {}
                    fine = reply.status_code == 200 or (reply.status_code == 400 and error.get("param") == field)
                    fine |= reply.status_code == 404 and field == "model" and isinstance(value, str)
                    if not fine:
                        odd.append((path, field, repr(value)[:20], reply.status_code, reply.text[:160]))
        assert odd == [], "\n".join(map(str, odd))
        for path, content in [("/chat/completions", [{"role": "user", "content": "a\ud800"}]),
                              ("/chat/completions", [{"role": "user", "content": "x"}, "no"])]:
            reply = post(path, json.dumps({"messages": content}).encode())
            assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
        deep = post("/completions", b'{"prompt": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        deeper = post("/completions", b"[" * 100_000 + b"]" * 100_000)
        assert deep.status_code == deeper.status_code == 400 and is_openai_error(deep.json())
        started = time.monotonic()
        many = post("/completions", json.dumps({"prompt": ["Hi"] * 100, "n": 16, "max_tokens": 16}).encode())
        assert many.status_code == 400 and many.json()["error"]["param"] == "n" and time.monotonic() - started < 1
        assert "1600 choices" in many.json()["error"]["message"]
        seconds, reply = timed("POST", served.url + "/completions", json=ASK)
        assert reply.status_code == 200 and seconds < 1.0
