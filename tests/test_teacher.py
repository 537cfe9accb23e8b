"""teacher.py over real HTTP on 127.0.0.1: the project's server with a tiny random model (checked with the
official openai client and against model.py's own scoring), and a fault-injecting fake teacher that counts
every request by body hash, so "nothing lost, nothing paid twice" is measured, not assumed."""
import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import requests
import torch

import checkpoint
import data
import model as M
import teacher
import tokenizer
from client import get_field, PREFLIGHT_TEXT, RunError, TeacherClient, TeacherError
from server import chat_prompt, make_server
from server import main as server_main
from conftest import ServedInThread, sequence_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "sk-TUNA-test-secret-0123456789abcdef"


# ----------------------------------------------------------------------------- the fake teacher

class FakeTeacher(ServedInThread, ThreadingHTTPServer):
    """OpenAI-shaped answers computed from the request body; FAULT:<name> in the body picks a fault.
    seen counts requests per body hash; repeats counts requests for a body that already got a good answer."""

    def __init__(self, hang_after=None):
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.server = self
        self.daemon_threads = True
        self.lock = threading.Lock()
        self.seen, self.times = collections.Counter(), collections.defaultdict(list)
        self.delivered, self.repeats, self.answered, self.auth, self.fault_of = set(), 0, 0, [], {}
        self.bodies = []  # every request body, in arrival order
        self.preflights = []  # the pre-flight requests' bodies
        self.hang_after, self.hanging, self.release = hang_after, threading.Event(), threading.Event()

    def __exit__(self, *exc):
        self.release.set()
        super().__exit__(*exc)


def fake_answer(path, body, h, fault):
    number = int(h[:8], 16)
    usage = {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}
    # ignore_n: one choice whatever n is (llama.cpp's server); cap_n: at most 2 (a server that caps n)
    choices_count = {"ignore_n": 1, "cap_n": min(2, body.get("n", 1))}.get(fault, body.get("n", 1))
    finish = lambda j: "length" if fault == "cut" and j == 1 else "stop"  # choice 1 (a unique text) hit max_tokens
    if path.endswith("/completions") and "messages" not in body:
        texts = [f"Answer {(number + j) % 3} for {h[:6]}" for j in range(choices_count)]
        logprobs = lambda j: "oops" if fault == "badlogprobs" else [-((number >> j) % 50) / 10 - 0.1] * 3
        choices = [{"text": " " + text, "index": j, "finish_reason": finish(j),
                    "logprobs": {"tokens": text.split(), "token_logprobs": logprobs(j),
                                 "top_logprobs": None, "text_offset": [0, 7, 9]}} for j, text in enumerate(texts)]
        return {"id": "cmpl-1", "object": "text_completion", "model": body["model"], "choices": choices, "usage": usage}
    user = body["messages"][-1]["content"]
    if body.get("logprobs"):  # probabilistic ranking over chat
        choices = [{"index": j, "finish_reason": finish(j),
                    "message": {"role": "assistant", "content": f"Chat {j} {h[:6]}"},
                    "logprobs": {"content": [{"token": "x", "logprob": -j - 0.5, "bytes": [120], "top_logprobs": []}]}}
                   for j in range(choices_count)]
    else:  # a contextual-ranking reply
        n = len(re.findall(r"^###Response \d+:\n", user, re.M))
        order = sorted(range(n + 1), key=lambda i: hashlib.sha256(f"{h}{i}".encode()).hexdigest())
        rank = {"badrank": "I like them all.", "dupe": "rank: [1, 1, 0]", "range": "rank: [9, 0]",
                "short": "rank: [2, 4, 0]"}.get(fault, f"rank: {order}")
        if fault == "badrank_once" and "seed" not in body:
            rank = "ranking of the responses: unclear"
        header = "" if fault == "noheader" else f"###Response {n}: "  # noheader: the answer is not marked
        content = (f"(1) The instruction is open-ended.\n(2) {header}The reference answer {h[:6]}.\n"
                   f"(3) No duplicates.\n(4) Response 0: [11]\n(5) {rank}\nThat is all 42 of it.")
        if fault == "keyecho":
            content += " " + body.get("echo_key", "")
        choices = [{"index": 0, "finish_reason": "length" if fault == "cutreply" else "stop",
                    "message": {"role": "assistant", "content": content}}]
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"], "choices": choices,
            "usage": usage}


class FakeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, answer, headers=(), cut=False):
        payload = json.dumps(answer).encode()
        payload = payload[:len(payload) // 2] if cut else payload
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        h = hashlib.sha256(json.dumps([self.path, body], sort_keys=True).encode()).hexdigest()
        auth = self.headers.get("Authorization", "")
        if PREFLIGHT_TEXT in json.dumps(body):  # counted apart: the tests below count the run's requests
            with server.lock:
                server.preflights.append(body)
            return self.reply(200, fake_answer(self.path, body, h, None))
        with server.lock:
            server.bodies.append(body)
            k = server.seen[h]
            server.seen[h] += 1
            server.repeats += h in server.delivered
            server.times[h].append(time.monotonic())
            server.auth.append(auth)
            hang = server.hang_after is not None and server.answered >= server.hang_after
        if hang:  # never answered: the test kills the client now
            server.hanging.set()
            server.release.wait(60)
            return
        found = re.search(r"FAULT:(\w+)", json.dumps(body))
        fault = server.fault_of[h] = found.group(1) if found else None
        error = lambda message: {"error": {"message": message, "type": "x", "param": None, "code": None}}
        if fault == "429" and k == 0:
            return self.reply(429, error("Rate limit reached"), [("Retry-After", "1")])
        if (fault == "500" and k < 2) or fault == "always500":
            return self.reply(500, error(f"The server had an error ({auth})"))
        if fault == "drop" and k == 0:
            return  # closes the connection without a response
        if fault == "slow" and k == 0:
            time.sleep(2.5)  # beyond the client's timeout (1.5 s, room for a busy machine); then hang up
            return
        if fault == "trunc" and k == 0:
            return self.reply(200, fake_answer(self.path, body, h, fault), cut=True)
        if fault == "400":
            return self.reply(400, error("Invalid value for 'max_tokens': too many tokens"))
        if fault == "noecho" and body.get("echo"):  # OpenAI's answer since gpt-3.5-turbo-instruct
            return self.reply(400, error("Setting 'echo' and 'logprobs' at the same time is not supported for this "
                                         "model."))
        if fault == "key":
            return self.reply(401, error(f"Incorrect API key provided: {auth.removeprefix('Bearer ')}"))
        answer = {"id": "cmpl-2", "object": "text_completion"} if fault == "missing" else \
            fake_answer(self.path, dict(body, echo_key=auth), h, fault)
        self.reply(200, answer)
        with server.lock:
            server.delivered.add(h)
            server.answered += 1


def example(i, marker=""):
    return {"instruction": f"Task {i} {marker}".strip(), "input": "" if i % 2 else f"input {i}", "output": f"Gold {i}."}


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def client_for(server, tmp_path, **kw):
    options = dict(cache_path=str(tmp_path / "cache.jsonl"), timeout=1.5, max_retries=3, backoff=0.01,
                   max_workers=4)
    return TeacherClient(server.url, "fake-teacher", **dict(options, **kw))


# ----------------------------------------------------------------------------- faults, cache, resume

FAULTS = ["", "429", "500", "drop", "slow", "trunc", "always500", "missing", "400", "", "badlogprobs"]


def test_probabilistic_faults_nothing_lost_nothing_paid_twice(tmp_path, caplog):
    examples = [example(i, f"FAULT:{fault}" if fault else "") for i, fault in enumerate(FAULTS)]
    out, failures = str(tmp_path / "p.jsonl"), str(tmp_path / "p.failures.jsonl")
    with FakeTeacher() as server:
        client = client_for(server, tmp_path)
        counts = teacher.build_probabilistic(client, examples, out, failures)
        first_requests = sum(server.seen.values())
        # 2 ok, 429+1, 500x2+1, drop+1, slow+1, trunc+1, always500 1+3, missing 1, 400 1, badlogprobs 1
        assert counts["requests"] == first_requests == 20
        assert (counts["done"], counts["failed"], counts["retries"], counts["requests_failed"]) == (7, 4, 9, 2)
        assert counts["prompt_tokens"] == 10 * 8  # usage of the 8 good answers ("missing" has none)
        records, failed = data.read_ranked_jsonl(out), read_jsonl(failures)
        assert sorted([r.id for r in records] + [f["id"] for f in failed], key=int) == [str(i) for i in range(11)]
        reasons = {f["id"]: f["error"] for f in failed}
        assert set(reasons) == {"6", "7", "8", "10"} and "malformed log-probs in choices[0]" in reasons["10"]
        assert "gave up after 4 attempts" in reasons["6"] and server.url in reasons["6"]
        assert "no field 'choices'" in reasons["7"] and server.url + "/completions" in reasons["7"]
        assert "Invalid value for 'max_tokens': too many tokens" in reasons["8"] and "HTTP 400" in reasons["8"]
        (first_try, retry), = [server.times[h] for h, fault in server.fault_of.items() if fault == "429"]
        assert retry - first_try >= 1.0  # Retry-After: 1 honoured
        for record in records:
            assert record.scores == sorted(record.scores, reverse=True) and len(record.candidates) >= 2
            assert record.source["kind"] == "probabilistic" and record.source["teacher"] == "fake-teacher"
        assert server.repeats == 0
        # a second run reads every good answer from the cache; only the failed requests are sent again
        again = teacher.build_probabilistic(client_for(server, tmp_path), examples, out, failures)
        assert (again["done"], again["failed"], again["cache_hits"]) == (7, 4, 9)
        assert sum(server.seen.values()) - first_requests == 4 + 1  # always500 again, 400 again
        assert server.repeats == 0 and data.read_ranked_jsonl(out) == records
    assert "retry 1/3" in caplog.text


def test_contextual_parse_failures_recorded_and_retried_later(tmp_path):
    markers = ["", "badrank", "badrank_once", "dupe", "range", "short", "429", ""]
    examples = [example(i, f"FAULT:{m}" if m else "") for i, m in enumerate(markers)]
    samples = {str(i): {"candidates": [f"Student {i}.{j}" for j in range(4)], "temperature": 0.8} for i in range(8)}
    out = str(tmp_path / "c.jsonl")
    with FakeTeacher() as server:
        counts = teacher.build_contextual(client_for(server, tmp_path), examples, samples, out)
        failed = {f["id"]: f for f in read_jsonl(out + ".failures.jsonl")}
        records = {r.id: r for r in data.read_ranked_jsonl(out)}
        assert (counts["done"], counts["failed"]) == (4, 4) and set(failed) == {"1", "2", "3", "4"}
        assert set(records) | set(failed) == {str(i) for i in range(8)}
        assert "I like them all." in failed["1"]["raw_reply"] and "no 'rank:'" in failed["1"]["error"]
        assert "appears twice" in failed["3"]["error"] and "out of range 0..4" in failed["4"]["error"]
        short = records["5"]  # the teacher dropped two duplicates: 3 ranked, its own answer (4) second
        assert short.candidates == ["Student 5.2", short.source["reference"], "Student 5.0"]
        assert short.source["reference"].startswith("The reference answer") and short.source["ranks"] == [2, 4, 0]
        for record in records.values():
            ranks = record.source["ranks"]
            pool = samples[record.id]["candidates"] + [record.source["reference"]]
            assert record.candidates == [pool[i] for i in ranks] and record.source["kind"] == "contextual"
        requests_before = sum(server.seen.values())
        # a plain re-run pays nothing; --retry-failures sends one new request (seed=1) per failed item
        teacher.build_contextual(client_for(server, tmp_path), examples, samples, out)
        assert sum(server.seen.values()) == requests_before
        again = teacher.build_contextual(client_for(server, tmp_path), examples, samples, out, retry_failures=True)
        assert sum(server.seen.values()) == requests_before + 4 and (again["done"], again["failed"]) == (5, 3)
        fixed = {r.id: r for r in data.read_ranked_jsonl(out)}["2"]
        assert fixed.source["attempt"] == 1
        teacher.build_contextual(client_for(server, tmp_path), examples, samples, out)  # the fix is remembered
        assert "2" in {r.id for r in data.read_ranked_jsonl(out)} and sum(server.seen.values()) == requests_before + 4
        assert server.repeats == 0


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    examples = [example(i, "FAULT:missing" if i == 5 else "") for i in range(8)]
    with open(tmp_path / "alpaca.json", "w") as f:
        json.dump(examples, f)
    out = tmp_path / "killed" / "p.jsonl"
    out.parent.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def command(url):
        return [sys.executable, os.path.join(ROOT, "teacher.py"), "probabilistic",
                "--data", str(tmp_path / "alpaca.json"),
                "--out", str(out), "--base-url", url, "--model", "fake-teacher", "--workers", "1", "--timeout", "60"]

    with FakeTeacher(hang_after=3) as server:
        run = subprocess.Popen(command(server.url), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert server.hanging.wait(60), run.communicate()[0]
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert not out.exists() and len(read_jsonl(str(out) + ".cache.jsonl")) == 3
        server.hang_after = None
        server.release.set()
        resumed = subprocess.run(command(server.url), env=env, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        assert "7 done, 1 failed" in resumed.stdout and "cache hits 3" in resumed.stdout
        # 3 answered + 1 never answered before the kill, then that one again + 4 more: no answer paid twice
        assert sum(server.seen.values()) == 9 and server.repeats == 0 and len(server.delivered) == 8
    with FakeTeacher() as fresh:
        reference = tmp_path / "reference.jsonl"
        client = TeacherClient(fresh.url, "fake-teacher", cache_path=str(tmp_path / "ref.cache.jsonl"))
        teacher.build_probabilistic(client, examples, str(reference))
    assert out.read_bytes() == reference.read_bytes()
    killed_failures = read_jsonl(str(tmp_path / "killed" / "p.jsonl.failures.jsonl"))
    reference_failures = read_jsonl(str(tmp_path / "reference.jsonl.failures.jsonl"))
    for failure in killed_failures + reference_failures:  # the error names the URL: two servers, two ports
        failure["error"] = re.sub(r"127\.0\.0\.1:\d+", "HOST", failure["error"])
    assert killed_failures == reference_failures and len(killed_failures) == 1
    keys = [e["key"] for e in read_jsonl(str(out) + ".cache.jsonl")]
    assert len(keys) == len(set(keys)) == 8


def test_cut_short_cache_line_is_skipped_and_resent(tmp_path):
    with FakeTeacher() as server:
        client = client_for(server, tmp_path)
        first = client.complete("Hello", n=2, logprobs=1)
        second = client.complete("World", n=2, logprobs=1)
        cache = tmp_path / "cache.jsonl"
        cache.write_bytes(cache.read_bytes()[:-40])  # a run killed while writing the second entry
        again = client_for(server, tmp_path)
        assert again.complete("Hello", n=2, logprobs=1) == first and again.counts["requests"] == 0
        assert again.complete("World", n=2, logprobs=1) == second and again.counts["requests"] == 1
        third = client_for(server, tmp_path)  # the new entry did not glue onto the cut-short line
        assert third.complete("World", n=2, logprobs=1) == second and third.counts["requests"] == 0


SAMPLING_CHANGES = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 32, "seed": 2, "n": 2, "logprobs": 2}


@pytest.mark.parametrize("endpoint", ["complete", "chat"])
def test_requests_that_differ_in_one_setting_reach_the_server_and_are_cached_apart(tmp_path, endpoint):
    """A rerun at another temperature (top_p, max_tokens, seed, n, logprobs) pays for new answers and never
    gets the old ones back; a client started from the cache file then answers every one without a request."""
    def ask(client, **settings):
        if endpoint == "complete":
            return client.complete("Name a colour.", **settings)
        return client.chat([{"role": "user", "content": "Name a colour."}], **settings)

    base = dict(temperature=0.0, top_p=1.0, max_tokens=16, seed=1, n=1, logprobs=1)
    if endpoint == "chat":  # chat's logprobs is a boolean, top_logprobs the count
        base, changes = dict(base, logprobs=True, top_logprobs=1), dict(SAMPLING_CHANGES, top_logprobs=2)
        del changes["logprobs"]
    else:
        changes = SAMPLING_CHANGES
    with FakeTeacher() as server:
        client = client_for(server, tmp_path)
        first = ask(client, **base)
        answers = {name: ask(client, **dict(base, **{name: value})) for name, value in changes.items()}
        assert len(server.bodies) == 1 + len(changes) and client.counts["cache_hits"] == 0  # each one sent
        assert [body[name] for body, name in zip(server.bodies[1:], changes)] == list(changes.values())
        assert len({json.dumps(a, sort_keys=True) for a in [first, *answers.values()]}) == 1 + len(changes)
        again = client_for(server, tmp_path)
        assert ask(again, **base) == first
        assert {name: ask(again, **dict(base, **{name: value})) for name, value in changes.items()} == answers
        assert len(server.bodies) == 1 + len(changes) and again.counts["cache_hits"] == 1 + len(changes)
    keys = [entry["key"] for entry in read_jsonl(tmp_path / "cache.jsonl")]
    assert len(keys) == len(set(keys)) == 1 + len(changes)


# ----------------------------------------------------------------------------- the API key, 4xx, rate limit

def test_api_key_never_in_errors_logs_or_cache(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("TUNA_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    with FakeTeacher() as server:
        client = client_for(server, tmp_path, api_key_env="TUNA_TEST_KEY", max_retries=1)
        with pytest.raises(TeacherError) as info:
            client.chat([{"role": "user", "content": "FAULT:key"}])
        assert "Incorrect API key provided: ***" in str(info.value) and server.url in str(info.value)
        with pytest.raises(TeacherError) as info_500:
            client.chat([{"role": "user", "content": "FAULT:always500"}])
        answer = client.chat([{"role": "user", "content": "FAULT:keyecho ###Response 0: a"}])
        assert server.auth[0] == f"Bearer {SECRET}"  # it was sent, in the header only
        assert client.counts["requests"] == 1 + 2 + 1
        samples = {"0": {"candidates": ["a", "b"]}}
        with pytest.raises(RunError, match="every item failed") as all_failed:
            teacher.build_contextual(client, [example(0, "FAULT:key")], samples, str(tmp_path / "c.jsonl"))
    texts = [str(info.value), repr(info.value), str(info_500.value), repr(client), caplog.text, str(all_failed.value),
             "".join(capsys.readouterr()), (tmp_path / "cache.jsonl").read_text(),
             (tmp_path / "c.jsonl.failures.jsonl").read_text()]
    assert "Bearer ***" in json.dumps(answer) and SECRET not in json.dumps(answer)
    assert all(SECRET not in text for text in texts)
    assert "Incorrect API key" in texts[-1]


def test_4xx_fails_fast_with_server_message(tmp_path):
    with FakeTeacher() as server:
        client = client_for(server, tmp_path)
        started = time.monotonic()
        with pytest.raises(TeacherError, match=r"HTTP 400: Invalid value for 'max_tokens': too many tokens"):
            client.complete("FAULT:400")
        assert client.counts["requests"] == 1 and time.monotonic() - started < 5.0  # no back-off
        with pytest.raises(TeacherError, match="no field 'choices.0.message.content'"):
            get_field({"choices": [{}]}, "choices.0.message.content", server.url)


def test_requests_per_minute_limit(tmp_path):
    with FakeTeacher() as server:
        client = client_for(server, tmp_path, requests_per_minute=600, cache_path=None)  # one per 0.1 s
        client.map(lambda i: client.complete(f"rate {i}"), range(5))
        starts = sorted(t for times in server.times.values() for t in times)
        assert len(starts) == 5 and starts[-1] - starts[0] >= 0.38


# ----------------------------------------------------------------------------- ranking prompt and parser

def test_ranking_prompt_structure():
    system, user = teacher.ranking_messages(data.alpaca_prompt("Name a fruit."), ["Apple.", "Pear.", "Fig.", "Kiwi."])
    assert system["role"] == "system" and "professional, experienced data annotator" in system["content"]
    assert user["content"].index("### Instruction:\nName a fruit.") < user["content"].index("###Response 0:\nApple.")
    positions = [user["content"].index(f"###Response {i}:") for i in range(4)]
    assert positions == sorted(positions) and "###Response 4" in user["content"]
    # placeholders, as the authors' prompt: concrete indices in presentation order would suggest an answer
    assert all(f"({k})" in user["content"] for k in range(1, 6)) and "rank: [i, j, k, l, m]" in user["content"]
    assert "0, 1, 2, 3, 4" not in user["content"]
    assert "rank: [i, j, k]" in teacher.ranking_messages("P", ["A.", "B."])[1]["content"]
    assert "open-ended" in user["content"] and "close-ended" in user["content"] and "0 to 15" in user["content"]


@pytest.mark.parametrize("reply, ranks", [
    ("...(5) rank: [2, 0, 4, 1, 3]", [2, 0, 4, 1, 3]),
    ("(5) RANK: [3,1,0]\nThere were 2 duplicates among 4 responses.", [3, 1, 0]),  # stray digits after the list
    ("Ranking: 4 > 1 > 0 > 2\n\n5 stars", [4, 1, 0, 2]),
    ("I rank: carefully.\n(5) rank: [1, 0]", [1, 0]),  # the last "rank:" wins
])
def test_parse_ranking(reply, ranks):
    assert teacher.parse_ranking(reply, 4) == ranks


@pytest.mark.parametrize("reply, message", [
    ("no ranking here", "no 'rank:'"), ("rank: [0, 5]", "out of range 0..4"),
    ("rank: [1, 2, 1]", "appears twice"), ("rank: [3]", "need 2+"), ("rank: none", "need 2+"),
])
def test_parse_ranking_rejects(reply, message):
    with pytest.raises(teacher.ReplyError, match=re.escape(message)) as info:
        teacher.parse_ranking(reply, 4)
    assert info.value.raw == reply


def test_reference_answer_extraction():  # the shapes of strong chat models' replies: tests/test_teacher_replies.py
    reply = ("(1) Close-ended.\n(2) ###Response 4: Paris is the capital.\n1. It is in France.\n"
             "(3) Responses 0 and 2 are duplicates.\n(4) Response 0: [12]\n(5) rank: [4, 0, 1]")
    assert teacher.parse_ranking(reply, 4) == [4, 0, 1]
    assert teacher.reference_answer(reply, 4) == ("Paris is the capital.\n1. It is in France.", None)
    assert teacher.reference_answer("rank: [4, 0]", 4) == (None, "no '###Response 4' in the reply")


def test_keep_reference_false_drops_the_teachers_answer(tmp_path):
    samples = {"0": {"candidates": ["A.", "B.", "C.", ""]}}
    with FakeTeacher() as server:
        client = client_for(server, tmp_path)
        teacher.build_contextual(client, [example(0, "FAULT:short")], samples, str(tmp_path / "k.jsonl"),
                                 keep_reference=False)
    record = data.read_ranked_jsonl(tmp_path / "k.jsonl")[0]
    assert record.candidates == ["C.", "A."] and record.source["ranks"] == [2, 4, 0]


def test_empty_and_duplicate_candidates_are_left_out(tmp_path):
    samples = {"0": {"candidates": ["Same.", "", "Same.", "Other."]}}
    with FakeTeacher() as server:
        teacher.build_contextual(client_for(server, tmp_path), [example(0)], samples, str(tmp_path / "d.jsonl"))
    record = data.read_ranked_jsonl(tmp_path / "d.jsonl")[0]
    ranks, kept = record.source["ranks"], record.source["kept_ranks"]
    assert sorted(ranks) == [0, 1, 2, 3, 4] and len(kept) == 3 and 1 not in kept
    assert sorted(record.candidates) == sorted(["Same.", "Other.", record.source["reference"]])
    assert kept == [i for i in ranks if i != 1 and not (i in (0, 2) and ranks.index(i) > ranks.index(2 - i))]


# ----------------------------------------------------------------------------- the diversity rule

def test_diversity_rule_resamples_hotter_and_keeps_most_diverse(monkeypatch, spm_model_path):
    tok = tokenizer.Tokenizer(spm_model_path)
    rounds = [["the cat sat"] * 4, ["the cat sat", "the cat sat", "a dog ran far", "the cat sat"],
              ["the cat sat", "the cat sat down", "the cat sat", "the cat sat"]]
    temperatures = []

    def fake_generate(model, prompts, max_new_tokens, *, temperature, **kw):
        temperatures.append(temperature)
        return [tok.encode(t) + [tok.eos_id] for t in rounds[len(temperatures) - 1]], None

    monkeypatch.setattr(teacher, "generate", fake_generate)
    model = types.SimpleNamespace(args=types.SimpleNamespace(max_seq_len=1024),  # fake_generate does the work;
                                  tok_embeddings=torch.nn.Embedding(1, 1))  # on the CPU: batch_size "auto" -> 64 rows
    best = teacher.sample_diverse(model, tok, ["Say something."], n=4, temperature=0.7, tries=3)[0]
    assert temperatures == [0.7, 0.8, 0.9]
    assert best["candidates"] == rounds[1] and best["round"] == 2 and best["temperature"] == 0.8
    temperatures.clear()
    rounds[0] = ["one apple", "two bears", "three cars", "four dogs"]
    assert teacher.sample_diverse(model, tok, ["Say something."], tries=3)[0]["round"] == 1 and len(temperatures) == 1
    # ROUGE-L with the Porter stemmer, as the authors (rouge_scorer, use_stemmer=True): these two differ only by
    # inflection (F1 1.0 stemmed, 0.25 not), so the round is sampled again
    temperatures.clear()
    rounds[0] = ["cats jumped over walls", "cat jumps over wall", "one apple", "two bears"]
    rounds[1] = ["one apple", "two bears", "three cars", "four dogs"]
    assert teacher.sample_diverse(model, tok, ["Say something."], tries=3)[0]["round"] == 2 and temperatures == [0.8, 0.9]


# ----------------------------------------------------------------------------- the project's server


def test_diversity_rule_in_batches_each_prompt_its_own_rounds(monkeypatch, spm_model_path):
    """Many prompts at once: one generate call per round for the prompts in it (shortest first, n rows each), a
    prompt that must be sampled again waits for a full batch of the same round or for the fresh prompts to run
    out, and each result is handed over (on_done) as soon as it is final."""
    tok = tokenizer.Tokenizer(spm_model_path)
    prompts = ["Say something.", "Say something else, please.", "Say one more thing, if you would, now."]
    replies = {(0, 1): ["the cat sat"] * 4, (1, 1): ["one apple", "two bears", "three cars", "four dogs"],
               (2, 1): ["a b", "a b", "c d", "e f"], (0, 2): ["red", "green", "blue", "black"],
               (2, 2): ["up", "down", "left", "right"]}
    calls, done = [], []

    def fake_generate(model, batch, max_new_tokens, *, temperature, num_samples, **kw):
        which = [[i for i, p in enumerate(prompts) if tok.encode(p, bos=True) == ids][0] for ids in batch]
        calls.append((which, temperature, num_samples))
        round_index = 1 if temperature == 0.8 else 2
        return [tok.encode(t) + [tok.eos_id] for i in which for t in replies[i, round_index]], None

    monkeypatch.setattr(teacher, "generate", fake_generate)
    model = types.SimpleNamespace(args=types.SimpleNamespace(max_seq_len=1024))
    results = teacher.sample_diverse(model, tok, prompts, n=4, tries=2, batch_size=8,
                                     on_done=lambda i, best: done.append((i, best["round"])))
    assert calls == [([0, 1], 0.8, 4), ([2], 0.8, 4), ([0, 2], 0.9, 4)]
    assert done == [(1, 1), (0, 2), (2, 2)]
    assert [r["candidates"] for r in results] == [replies[0, 2], replies[1, 1], replies[2, 2]]


def test_batched_diversity_rule_gives_each_prompt_what_the_rule_gives_it(tiny, monkeypatch):
    """The fast path against the rule, as pack_example is tested against K naive rows: sample_diverse (10 prompts'
    rows in 64-row batches, round queues, rows leaving as they end) gives each prompt exactly what diverse_samples
    gives it alone, from per-row generators seeded alike (candidates, finished, temperature, round, mean ROUGE-L).
    Some prompts pass at once, others are sampled a second and a third time, hotter, and some keep an earlier,
    more diverse round than their last."""
    model, tok, _ = tiny
    prompts = [data.alpaca_prompt(f"Name fruit number {i}" + " and a colour" * i) for i in range(10)]
    temperatures = []

    def counting_generate(*args, temperature, **kw):
        temperatures.append(temperature)
        return M.generate(*args, temperature=temperature, **kw)

    monkeypatch.setattr(teacher, "generate", counting_generate)
    rounds_sampled, kept_an_earlier_round = set(), False
    # the eos-prone student's rows end at different steps, so rows leave a batch while others go on; threshold 0
    # samples every prompt three times
    for student, threshold in ((model, 0.2), (eos_prone_student(tok, p_eos=0.05), 0.2), (model, 0.0)):
        options = dict(n=4, temperature=0.8, max_new_tokens=12, tries=3, threshold=threshold)
        rule, sampled = [], []
        for i, prompt in enumerate(prompts):
            temperatures.clear()
            rule.append(teacher.diverse_samples(student, tok, prompt, generators=row_generators(5, i, 4), **options))
            sampled.append(list(temperatures))
        assert all(t == [0.8, 0.9, 1.0][:len(t)] for t in sampled)
        rounds_sampled |= {len(t) for t in sampled}
        kept_an_earlier_round |= any(best["round"] < len(t) for best, t in zip(rule, sampled))
        generators = [row_generators(5, i, 4) for i in range(len(prompts))]
        batched = teacher.sample_diverse(student, tok, prompts, generators=generators, batch_size=64, **options)
        for i, (fast, alone) in enumerate(zip(batched, rule)):
            assert fast == alone, f"prompt {i}, threshold {threshold}"
    assert rounds_sampled == {1, 2, 3} and kept_an_earlier_round


def test_student_batch_size_auto_is_the_fixed_default_on_a_cpu(monkeypatch, spm_model_path):
    """batch_size "auto" sizes batches from free GPU memory (model.auto_batch_rows, tested in test_model.py); a
    CPU reports none, so 20 prompts x 4 samples go as STUDENT_BATCH_ROWS = 64 rows (16 prompts), then 4."""
    tok = tokenizer.Tokenizer(spm_model_path)
    prompts = [f"Say thing number {i}." for i in range(20)]
    calls = []

    def fake_generate(model, batch, max_new_tokens, *, num_samples, batch_size, **kw):
        calls.append((len(batch), batch_size))
        return [tok.encode(word) + [tok.eos_id] for _ in batch for word in ("red", "green", "blue", "black")], None

    monkeypatch.setattr(teacher, "generate", fake_generate)
    model = M.Transformer(M.ModelArgs.from_name("tiny"))
    teacher.sample_diverse(model, tok, prompts, n=4, tries=1, max_new_tokens=8, batch_size="auto")
    assert calls == [(16, 64), (4, 16)]


@pytest.fixture(scope="module")
def tiny(spm_model_path):
    torch.manual_seed(0)
    args = dataclasses.replace(M.ModelArgs.from_name("tiny"), max_seq_len=1024)
    model = M.Transformer(args).eval()
    tok = tokenizer.Tokenizer(spm_model_path)
    server = make_server(model, tok, "127.0.0.1", 0, "tiny-teacher")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield model, tok, f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_openai_client_reads_logprobs_equal_to_model_scoring(tiny):
    model, tok, url = tiny
    client = openai.OpenAI(base_url=url, api_key="unused")
    prompt = data.alpaca_prompt("Give three tips for staying healthy.")
    answer = client.completions.create(model="tiny-teacher", prompt=prompt, n=2, max_tokens=12, temperature=1.0,
                                       logprobs=3, seed=7)
    ids = tok.encode(prompt, bos=True)
    new, new_logprobs = M.generate(model, [ids] * 2, 12, temperature=1.0, eos_id=tok.eos_id,
                                   generator=torch.Generator().manual_seed(7))
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == sum(
        len([t for t in row if t != tok.eos_id]) for row in new)
    for choice, row, row_logprobs in zip(answer.choices, new, new_logprobs):
        body = [t for t in row if t != tok.eos_id]
        lp = choice.logprobs
        assert choice.finish_reason == ("stop" if tok.eos_id in row else "length")
        assert lp.tokens == [tok.piece_bytes(t).decode("utf-8", "replace") for t in body]
        assert lp.token_logprobs == pytest.approx(row_logprobs[:len(body)], abs=1e-4)  # generate's incremental pass
        total, count = sequence_logprobs(model, [ids], [body])
        assert sum(lp.token_logprobs) == pytest.approx(total.item(), abs=1e-3) and count.item() == len(body)
        with torch.no_grad():  # the top-3 at each position (tokens with the same text share one key)
            logp = torch.log_softmax(model(torch.tensor([ids + body]))[0, len(ids) - 1:-1].float(), -1)
        for top, expected in zip(lp.top_logprobs, logp.topk(3, -1).values.tolist()):
            assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(expected[0], abs=1e-4)
            assert all(min(abs(value - e) for e in expected) < 1e-4 for value in top.values())
        assert choice.text == b"".join(tok.piece_bytes(t) for t in body).decode("utf-8", "replace")
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == len(prompt)  # from the prompt's start
    # echo scores a given text: the prompt's tokens (the first has no log-prob), as model.py scores them
    echo = client.completions.create(model="tiny-teacher", prompt="Paris is the capital of France.", max_tokens=0,
                                     echo=True, logprobs=1)
    ids = tok.encode("Paris is the capital of France.", bos=True)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text == "Paris is the capital of France." and lp.token_logprobs[0] is None
    assert len(lp.tokens) == len(ids) - 1 and lp.text_offset[0] == 0
    total, _ = sequence_logprobs(model, [ids[:2]], [ids[2:]])
    assert sum(lp.token_logprobs[1:]) == pytest.approx(total.item(), abs=1e-3)
    # chat: the Alpaca template, logprobs as content[{token, logprob, bytes, top_logprobs}]
    chat = client.chat.completions.create(model="tiny-teacher", messages=[{"role": "user", "content": "Count to 3."}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    ids = tok.encode(data.alpaca_prompt("Count to 3."), bos=True)
    greedy, _ = M.generate(model, [ids], 6, temperature=0.0, eos_id=tok.eos_id)
    content = chat.choices[0].logprobs.content
    body = [t for t in greedy[0] if t != tok.eos_id]
    assert [c.bytes for c in content] == [list(tok.piece_bytes(t)) for t in body]
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5) for c in content)  # greedy = top-1
    total, _ = sequence_logprobs(model, [ids], [body])
    assert sum(c.logprob for c in content) == pytest.approx(total.item(), abs=1e-3)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert [m.id for m in client.models.list().data] == ["tiny-teacher"]


def test_server_stop_sequences_and_prompt_lists(tiny):
    model, tok, url = tiny
    request = {"prompt": "Hello", "max_tokens": 20, "temperature": 0, "logprobs": 0}
    plain = requests.post(url + "/completions", json=request).json()["choices"][0]
    text = plain["text"]
    stop = text[8:11]
    cut = requests.post(url + "/completions", json=dict(request, prompt=["Hello", "Hello"], stop=stop, n=2)).json()
    assert len(cut["choices"]) == 4 and [c["index"] for c in cut["choices"]] == [0, 1, 2, 3]
    first = cut["choices"][0]
    assert first["text"] == text[:text.index(stop)] and first["finish_reason"] == "stop"
    assert plain["finish_reason"] == "length" and len(text) > 11
    kept = sum(1 for at in plain["logprobs"]["text_offset"] if at < len("Hello") + text.index(stop))
    assert first["logprobs"]["tokens"] == plain["logprobs"]["tokens"][:kept] < plain["logprobs"]["tokens"]
    assert all(top == {} for top in first["logprobs"]["top_logprobs"])  # logprobs=0: the sampled token only


@pytest.mark.parametrize("path, body, param", [
    ("/completions", {"prompt": 3}, "prompt"),
    ("/completions", {"prompt": "x", "n": 0}, "n"),
    ("/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/completions", {"prompt": "x", "logprobs": 9}, "logprobs"),
    ("/completions", {"prompt": "x", "max_tokens": 5000}, "max_tokens"),
    ("/completions", {"prompt": "x", "stream": True}, "stream"),
    ("/completions", {"prompt": "x", "echo": "yes"}, "echo"),
    ("/completions", {"prompt": []}, "prompt"),
    ("/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/completions", {"prompt": "x", "stop": 3}, "stop"),
    ("/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/completions", "[1, 2]", None),
    ("/completions", "{not json", None),
])
def test_server_bad_requests_get_openai_style_400(tiny, path, body, param):
    _, _, url = tiny
    reply = requests.post(url + path, data=body if isinstance(body, str) else json.dumps(body))
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    assert requests.post(url + "/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200  # alive


def test_server_unknown_url_and_chat_template(tiny):
    _, _, url = tiny
    assert requests.post(url + "/embeddings", json={}).status_code == 404
    assert requests.get(url + "/nothing").json()["error"]["code"] == "unknown_url"
    assert chat_prompt([{"role": "user", "content": "Hi"}]) == data.alpaca_prompt("Hi")
    prompt = chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert prompt == ("Be brief.\n\n### Instruction:\nHi\n\n### Response:Hello.\n\n"
                      "### Instruction:\nBye\n\n### Response:")


def test_server_seed_makes_unseeded_requests_reproducible(tiny):
    model, tok, _ = tiny
    body = {"model": "m", "prompt": "Name a colour.", "n": 3, "max_tokens": 12, "temperature": 1.0}

    def texts(server_seed, request):
        server = make_server(model, tok, "127.0.0.1", 0, "m", seed=server_seed)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_port}/v1/completions"
            return [c["text"] for c in requests.post(url, json=request).json()["choices"]]
        finally:
            server.shutdown()
            server.server_close()

    first = texts(7, body)
    assert texts(7, body) == first                              # same server seed, same request: same samples
    assert texts(8, body) != first                              # another server seed: other samples
    assert texts(7, dict(body, prompt="Name a fruit.")) != first  # the seed follows the request's content
    unseeded = [texts(None, body) for _ in range(3)]
    assert len({tuple(t) for t in unseeded}) > 1                # no --seed: random, as the OpenAI API


# ----------------------------------------------------------------------------- both builders end to end

def test_probabilistic_end_to_end_with_the_local_teacher(tiny, tmp_path):
    model, tok, url = tiny
    examples = [{"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
                {"instruction": "Add 123 and 456.", "input": "", "output": "579"},
                {"instruction": "Reverse the string.", "input": "hello world", "output": "dlrow olleh"}]
    client = TeacherClient(url, "tiny-teacher", cache_path=str(tmp_path / "cache.jsonl"))
    counts = teacher.build_probabilistic(client, examples, str(tmp_path / "p.jsonl"), n=4, max_tokens=8,
                                         add_original="scored")
    records = data.read_ranked_jsonl(tmp_path / "p.jsonl")
    assert counts["done"] + counts["failed"] == 3 and len(records) == counts["done"] >= 2
    for record in records:
        assert record.scores == sorted(record.scores, reverse=True) and all(s < 0 for s in record.scores)
        original = examples[int(record.id)]["output"]
        assert record.candidates[record.source["original_index"]] == original
        # the original's score is its mean token log-prob as model.py scores it (the training-side split)
        prompt_ids, response_ids = data.encode_prompt_response(tok, record.prompt, original)
        total, count = sequence_logprobs(model, [prompt_ids], [response_ids[:-1]])  # the API has no EOS
        assert record.scores[record.source["original_index"]] == pytest.approx(total.item() / count.item(), abs=1e-4)
        assert record.prompt == data.alpaca_prompt(record.instruction, record.input)
    assert counts["requests"] == 6 and counts["completion_tokens"] > 0
    chat = teacher.build_probabilistic(TeacherClient(url, "tiny-teacher"), examples[:2],
                                       str(tmp_path / "chat.jsonl"), n=3, max_tokens=6, chat=True,
                                       add_original="first")
    for record in data.read_ranked_jsonl(tmp_path / "chat.jsonl"):
        assert record.candidates[0] == examples[int(record.id)]["output"] and record.scores is None
    assert chat["done"] + chat["failed"] == 2


def test_contextual_end_to_end_student_and_teachers(tiny, tmp_path, monkeypatch):
    model, tok, url = tiny
    examples = [{"instruction": f"Give tip number {i} for staying healthy.", "input": "", "output": "x"}
                for i in range(3)]
    student_cache = str(tmp_path / "student.jsonl")
    options = dict(n=4, max_new_tokens=8, seed=3, student="tiny-teacher, seed 0")
    samples = teacher.sample_candidates(model, tok, examples, student_cache, **options)
    assert sorted(samples) == ["0", "1", "2"] and all(len(s["candidates"]) == 4 for s in samples.values())
    # resumable: a re-run reads the cache, a run killed after item 0 samples the rest exactly as in one go
    monkeypatch.setattr(teacher, "generate", lambda *a, **k: pytest.fail("sampled again"))
    assert teacher.sample_candidates(model, tok, examples, student_cache, **options) == samples
    monkeypatch.undo()
    partial = str(tmp_path / "partial.jsonl")
    teacher.sample_candidates(model, tok, examples[:1], partial, **options)
    assert teacher.sample_candidates(model, tok, examples, partial, **options) == samples
    # the project's server as teacher: a random tiny model cannot rank (and its 16 tokens are cut), so every reply
    # is a recorded failure, and a run where every item failed is an error that writes no ranked file
    local = TeacherClient(url, "tiny-teacher")
    with pytest.raises(RunError, match=r"every item failed \(3 of 3"):
        teacher.build_contextual(local, examples, samples, str(tmp_path / "local.jsonl"), max_tokens=16)
    failed = read_jsonl(str(tmp_path / "local.jsonl.failures.jsonl"))
    assert len(failed) == 3 and local.counts["requests"] == 3 and not (tmp_path / "local.jsonl").exists()
    assert all(isinstance(f["raw_reply"], str) and f["kind"] == "contextual" for f in failed)
    # a teacher that ranks: records hold the student's candidates (non-empty ones) in the teacher's order
    with FakeTeacher() as server:
        counts = teacher.build_contextual(client_for(server, tmp_path), examples, samples, str(tmp_path / "c.jsonl"))
    for record in data.read_ranked_jsonl(tmp_path / "c.jsonl"):
        pool = samples[record.id]["candidates"] + [record.source["reference"]]
        assert record.candidates == [pool[i] for i in record.source["kept_ranks"]]
        assert record.source["student_candidates"] == samples[record.id]["candidates"]
    assert counts["done"] + counts["failed"] == 3


def row_generators(seed, item_id, n):
    """Row s of an item draws from a generator seeded from sha256("seed:id:s") (teacher.sample_candidates)."""
    digests = [hashlib.sha256(f"{seed}:{item_id}:{s}".encode()).digest() for s in range(n)]
    return [torch.Generator().manual_seed(int.from_bytes(digest[:6], "little")) for digest in digests]


def prompts_of_many_lengths(tok, max_seq_len, new_tokens):
    """Instructions from a few tokens to one whose prompt leaves fewer than new_tokens tokens for the answer."""
    examples = [{"instruction": "Name a fruit " + "and a colour " * (5 * i), "input": "", "output": "x"}
                for i in range(9)]

    def length(words):
        return len(tok.encode(data.alpaca_prompt("Count: " + "one " * words, ""), bos=True))

    words = 1
    while length(words + 1) < max_seq_len - 2:
        words += 1
    assert max_seq_len - new_tokens < length(words) < max_seq_len
    long = {"instruction": "Count: " + "one " * words, "input": "", "output": "x"}
    return examples[:4] + [long] + examples[4:]


def test_batched_sampling_gives_each_instruction_what_it_gets_alone(tiny, tmp_path):
    """Rows = instructions x n decoding together (shortest prompts first, rows leaving as they end, a long prompt
    with a smaller token budget among them): each item's samples equal those drawn one instruction at a time, and
    each row's tokens are what model.generate draws from that row's own generator seeded from (seed, id, row)."""
    model, tok, _ = tiny
    for name, student in (("random", model), ("eos-prone", eos_prone_student(tok, p_eos=0.1))):
        examples = prompts_of_many_lengths(tok, student.args.max_seq_len, 12)
        options = dict(n=4, max_new_tokens=12, tries=2, seed=7, student="s")
        one_at_a_time = teacher.sample_candidates(student, tok, examples, str(tmp_path / f"{name}-a.jsonl"),
                                                  batch_size=4, **options)
        batched = teacher.sample_candidates(student, tok, examples, str(tmp_path / f"{name}-b.jsonl"),
                                            batch_size=64, **options)
        assert batched == one_at_a_time and len(batched) == 10
        for item_id, _, prompt in list(teacher._items(examples))[3:6]:
            ids = tok.encode(prompt, bos=True)
            outs, _ = M.generate(student, [ids] * 4, min(12, student.args.max_seq_len - len(ids)), temperature=0.8,
                                 eos_id=tok.eos_id, generator=row_generators(7, item_id, 4))
            texts = [tok.decode([t for t in out if t != tok.eos_id]).strip() for out in outs]
            assert batched[item_id]["round"] == 2 or batched[item_id]["candidates"] == texts
        flags = [f for s in batched.values() for f in s["finished"]]
        assert name == "random" or (True in flags and False in flags)


KILLED_SAMPLER = """
import json, os, signal, sys
sys.path.insert(0, {root!r})
import checkpoint, data, teacher
from tokenizer import Tokenizer
appended = 0
append_jsonl = data.append_jsonl
def append_then_die(path, entries):  # SIGKILL right after the third finished item is written
    global appended
    append_jsonl(path, entries)
    appended += 1
    if appended == 3:
        os.kill(os.getpid(), signal.SIGKILL)
data.append_jsonl = append_then_die
examples = json.load(open({examples!r}))
teacher.sample_candidates(checkpoint.load_checkpoint({student!r}), Tokenizer({tokenizer!r}), examples, {cache!r},
                          n=4, max_new_tokens=10, tries=2, seed=5, student="s", batch_size=8)
"""


def test_batched_sampling_killed_and_resumed_writes_what_an_uninterrupted_run_writes(tiny, tmp_path):
    """A run killed (SIGKILL) after 3 items' samples were cached, the batch in flight lost, then resumed: the cache
    holds each item once, and the same samples as a run in one go with another batch size."""
    model, tok, _ = tiny
    student = tmp_path / "student"
    checkpoint.save_hf_checkpoint(model, str(student))
    examples = prompts_of_many_lengths(tok, model.args.max_seq_len, 10)
    with open(tmp_path / "alpaca.json", "w") as f:
        json.dump(examples, f)
    cache = str(tmp_path / "killed.jsonl")
    script = KILLED_SAMPLER.format(root=ROOT, examples=str(tmp_path / "alpaca.json"), student=str(student),
                                   tokenizer=tok.path, cache=cache)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(read_jsonl(cache)) == 3
    options = dict(n=4, max_new_tokens=10, tries=2, seed=5, student="s")
    resumed = teacher.sample_candidates(checkpoint.load_checkpoint(str(student)), tok, examples, cache, batch_size=8,
                                        **options)
    entries = read_jsonl(cache)
    assert len(entries) == len(examples) and len({e["id"] for e in entries}) == len(examples)
    whole = teacher.sample_candidates(model, tok, examples, str(tmp_path / "whole.jsonl"), batch_size=128, **options)
    assert resumed == whole
    assert {e["id"]: e for e in entries} == {e["id"]: e for e in read_jsonl(str(tmp_path / "whole.jsonl"))}

@pytest.mark.slow
def test_contextual_cli_kill_and_resume(tiny, tmp_path):
    """teacher.py contextual in a subprocess: killed after 2 teacher answers, restarted, equal to a run in one go;
    the student's samples are read back, not drawn again, and no teacher answer is paid twice."""
    model, tok, _ = tiny
    student = tmp_path / "student"
    checkpoint.save_hf_checkpoint(model, str(student))
    with open(tok.path, "rb") as src, open(student / "tokenizer.model", "wb") as dst:
        dst.write(src.read())
    examples = [{"instruction": f"Name fruit number {i}.", "input": "", "output": "x"} for i in range(5)]
    with open(tmp_path / "alpaca.json", "w") as f:
        json.dump(examples, f)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def command(url, out):
        return [sys.executable, os.path.join(ROOT, "teacher.py"), "contextual", "--data", str(tmp_path / "alpaca.json"),
                "--out", str(out), "--base-url", url, "--model", "fake-teacher", "--student", str(student),
                "--student-max-tokens", "8", "--tries", "2", "--seed", "5", "--workers", "1", "--timeout", "60"]

    out = tmp_path / "killed.jsonl"
    with FakeTeacher(hang_after=2) as server:
        run = subprocess.Popen(command(server.url, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert server.hanging.wait(120), run.communicate()[0]
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert len(read_jsonl(str(out) + ".student.jsonl")) == 5 and not out.exists()
        server.hang_after = None
        server.release.set()
        resumed = subprocess.run(command(server.url, out), env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert sum(server.seen.values()) == 2 + 1 + 3 and server.repeats == 0
    assert len(read_jsonl(str(out) + ".student.jsonl")) == 5  # nothing sampled twice
    with FakeTeacher() as fresh:
        reference = tmp_path / "reference.jsonl"
        whole = subprocess.run(command(fresh.url, reference), env=env, capture_output=True, text=True, timeout=300)
        assert whole.returncode == 0, whole.stderr
    assert out.read_bytes() == reference.read_bytes() and len(data.read_ranked_jsonl(out)) >= 1


def test_cli_help_and_errors_name_the_file(tmp_path, capsys):
    for main, command in ((server_main, []), (teacher.main, ["probabilistic"]), (teacher.main, ["contextual"])):
        with pytest.raises(SystemExit) as shown:
            main(command + ["--help"])
        assert shown.value.code == 0 and "--" in capsys.readouterr().out
    missing = str(tmp_path / "nope.json")
    with pytest.raises(SystemExit) as failed:
        teacher.main(["probabilistic", "--data", missing, "--out", str(tmp_path / "o.jsonl"),
                      "--base-url", "http://127.0.0.1:9/v1", "--model", "m"])
    assert failed.value.code == 1 and missing in capsys.readouterr().err


# ----------------------------------------------------------------------------- servers with fewer choices than n

def test_servers_that_ignore_or_cap_n_are_topped_up_one_choice_at_a_time(tmp_path):
    """llama.cpp's server returns one choice whatever n is, others cap n: further requests ask for one choice
    each, with seeds 1, 2, ..., until n samples; each is cached by its content, so a re-run pays nothing."""
    examples = [example(0, "FAULT:ignore_n"), example(1, "FAULT:cap_n"), example(2)]
    out = str(tmp_path / "p.jsonl")
    with FakeTeacher() as server:
        counts = teacher.build_probabilistic(client_for(server, tmp_path, max_workers=1), examples, out, n=4)
        records = {r.id: r for r in data.read_ranked_jsonl(out)}
        assert counts["done"] == 3 and counts["requests"] == 4 + 3 + 1 == sum(server.seen.values())
        assert [records[i].source["requests"] for i in "012"] == [4, 3, 1]
        asked = lambda marker: [(b["n"], b.get("seed")) for b in server.bodies if marker in b["prompt"]]  # noqa
        assert asked("FAULT:ignore_n") == [(4, None), (1, 1), (1, 2), (1, 3)]
        assert asked("FAULT:cap_n") == [(4, None), (1, 1), (1, 2)]
        assert len(records["0"].candidates) == len(records["1"].candidates) == 4  # 4 distinct samples each
        assert len(set(server.seen)) == sum(server.seen.values())  # no two requests alike
        again = teacher.build_probabilistic(client_for(server, tmp_path), examples, out, n=4)
        assert again["requests"] == 0 and again["cache_hits"] == 8 and data.read_ranked_jsonl(out) == list(
            records.values())


def test_a_killed_top_up_resumes_without_paying_twice(tmp_path):
    with open(tmp_path / "alpaca.json", "w") as f:
        json.dump([example(0, "FAULT:ignore_n"), example(1, "FAULT:ignore_n")], f)
    out = tmp_path / "p.jsonl"
    command = lambda url: [sys.executable, os.path.join(ROOT, "teacher.py"), "probabilistic", "--data",  # noqa
                           str(tmp_path / "alpaca.json"), "--out", str(out), "--base-url", url, "--model", "m",
                           "--workers", "1", "--timeout", "60"]
    with FakeTeacher(hang_after=2) as server:  # item 0: its n=4 request and one top-up answered, the next hangs
        run = subprocess.Popen(command(server.url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert server.hanging.wait(60), run.communicate()[0]
        run.send_signal(signal.SIGKILL)
        run.wait()
        server.hang_after = None
        server.release.set()
        resumed = subprocess.run(command(server.url), capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        assert "2 done, 0 failed" in resumed.stdout and "cache hits 2" in resumed.stdout
        assert sum(server.seen.values()) == 2 + 1 + 2 + 4 and server.repeats == 0 and len(server.delivered) == 8
    assert [r.source["requests"] for r in data.read_ranked_jsonl(out)] == [4, 4]


# ----------------------------------------------------------------------------- cut candidates, cut replies

def eos_prone_student(tok, p_eos=0.3, temperature=0.8, stop_id=None):
    """A real model.py Transformer whose next token, sampled at `temperature`, is EOS (or stop_id) with probability
    p_eos at every step whatever came before: the blocks add nothing to the residual stream, every embedding is the
    same vector, and only EOS has a non-zero logit. With a small max_new_tokens some samples end in EOS and some
    run out of tokens; greedy decoding ends at once."""
    torch.manual_seed(0)
    net = M.Transformer(dataclasses.replace(M.ModelArgs.from_name("tiny"), max_seq_len=256)).eval()
    with torch.no_grad():
        for layer in net.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        net.tok_embeddings.weight.fill_(1.0)
        net.output.weight.zero_()
        logit = torch.tensor(p_eos * (tok.vocab_size - 1) / (1 - p_eos)).log() * temperature
        net.output.weight[tok.eos_id if stop_id is None else stop_id] = logit / net.args.dim  # hidden: all ones
    return net


def test_cut_candidates_are_never_trained_as_finished(tmp_path, spm_model_path):
    """A teacher sample with finish_reason "length" and a student sample that hit max_new_tokens without EOS stay
    candidates, listed in source["unfinished"], and tuna.py trains them without EOS; a ranking reply cut at
    max_tokens is a failure (its ranking may be incomplete)."""
    import tuna
    tok = tokenizer.Tokenizer(spm_model_path)
    with FakeTeacher() as server:
        client = client_for(server, tmp_path)
        teacher.build_probabilistic(client, [example(0, "FAULT:cut"), example(1)], str(tmp_path / "p.jsonl"))
        answer, = [e["response"] for e in read_jsonl(str(tmp_path / "cache.jsonl"))
                   if "FAULT:cut" in e["request"]["prompt"]]
        assert answer["choices"][1]["finish_reason"] == "length"
        probabilistic = {r.id: r for r in data.read_ranked_jsonl(tmp_path / "p.jsonl")}
        cut = probabilistic["0"].candidates.index(answer["choices"][1]["text"].strip())
        assert probabilistic["0"].source["unfinished"] == [cut]
        assert probabilistic["1"].source["unfinished"] == []
        # the student: samples that ran out of its 3 new tokens are flagged as generate() produced them
        student = eos_prone_student(tok)
        examples = [example(i) for i in range(4)]
        samples = teacher.sample_candidates(student, tok, examples, str(tmp_path / "s.jsonl"), n=4, max_new_tokens=3,
                                            tries=1, seed=1, student="eos-prone")
        for item_id, _, prompt in teacher._items(examples):
            outs, _ = M.generate(student, [tok.encode(prompt, bos=True)] * 4, 3, temperature=0.8, eos_id=tok.eos_id,
                                 generator=row_generators(1, item_id, 4))
            assert samples[item_id]["finished"] == [tok.eos_id in out for out in outs]
        flags = [f for s in samples.values() for f in s["finished"]]
        assert True in flags and False in flags
        teacher.build_contextual(client_for(server, tmp_path), examples, samples, str(tmp_path / "c.jsonl"))
        with pytest.raises(RunError):
            teacher.build_contextual(client_for(server, tmp_path), [example(0, "FAULT:cutreply")],
                                     {"0": {"candidates": ["A.", "B."]}}, str(tmp_path / "cut.jsonl"))
    cut_reply = read_jsonl(str(tmp_path / "cut.jsonl.failures.jsonl"))[0]
    assert "cut at max_tokens=2048 (finish_reason 'length')" in cut_reply["error"]
    assert "rank:" in cut_reply["raw_reply"]
    contextual = data.read_ranked_jsonl(tmp_path / "c.jsonl")
    for record in contextual:
        finished = samples[record.id]["finished"]
        assert record.source["unfinished"] == [k for k, i in enumerate(record.source["kept_ranks"])
                                               if i < 4 and not finished[i]]
    assert any(r.source["unfinished"] for r in contextual)
    # training: an unfinished candidate's tokens end without EOS, a finished one's with it
    for path, records in ((tmp_path / "p.jsonl", list(probabilistic.values())), (tmp_path / "c.jsonl", contextual)):
        rows = {row["id"]: row for row in tuna.load_rows(str(path), tok, "rank")}
        for record in records:
            row = rows[record.id]
            for k in range(record_candidates := len(record.candidates)):
                targets = [t for t, c in zip(row["target"], row["candidate"]) if c == k]
                assert (targets[-1] == tok.eos_id) == (k not in record.source["unfinished"]), (record.id, k)
            assert row["num_candidates"] == record_candidates


def test_a_reference_that_cannot_be_cut_out_leaves_the_ranking_and_says_why(tmp_path):
    samples = {"0": {"candidates": [f"Student {j}." for j in range(4)]}}
    with FakeTeacher() as server:
        teacher.build_contextual(client_for(server, tmp_path), [example(0, "FAULT:noheader")], samples,
                                 str(tmp_path / "c.jsonl"))
    record = data.read_ranked_jsonl(tmp_path / "c.jsonl")[0]
    assert record.source["reference"] is None and record.source["reference_problem"] == \
        "no '###Response 4' in the reply"
    assert sorted(record.source["ranks"]) == [0, 1, 2, 3, 4] and record.source["kept_ranks"] == [
        i for i in record.source["ranks"] if i != 4]
    assert record.candidates == [f"Student {i}." for i in record.source["kept_ranks"]]


# ----------------------------------------------------------------------------- runs that cannot work

def teacher_cli(*argv, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "teacher.py"), *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout)


def test_no_request_reaches_the_server_one_line_and_non_zero(tmp_path):
    with open(tmp_path / "alpaca.json", "w") as f:
        json.dump([example(i) for i in range(6)], f)
    with socket_free_port() as port:  # nothing listens there: connection refused
        refused_url = f"http://127.0.0.1:{port}/v1"
    with FakeTeacher() as plain_http:
        tls_url = f"https://127.0.0.1:{plain_http.server_port}/v1"  # a TLS client meets a plain HTTP server
        for url, reason in ((refused_url, "connection refused"), ("http://no-such-host.invalid/v1", "unknown host"),
                            (tls_url, "TLS failure")):
            started = time.monotonic()
            run = teacher_cli("probabilistic", "--data", tmp_path / "alpaca.json", "--out", tmp_path / "p.jsonl",
                              "--base-url", url, "--model", "m", "--max-retries", "1")
            error = run.stderr.strip().splitlines()[-1]
            assert run.returncode == 1 and error.startswith("teacher.py probabilistic: error: pre-flight check of "
                                                            "model 'm' failed: no request reached ")
            assert reason in error and url in error and "check --base-url" in error, run.stderr
            assert time.monotonic() - started < 60 and not (tmp_path / "p.jsonl").exists()
        assert plain_http.answered == 0


class socket_free_port:
    def __enter__(self):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        pass


def test_every_item_failed_exits_non_zero_and_keeps_the_earlier_output(tmp_path):
    """E.g. every request refused with a 400 because prompt + max_tokens exceed the teacher's context."""
    with open(tmp_path / "alpaca.json", "w") as f:
        json.dump([example(i) for i in range(3)], f)
    out = tmp_path / "p.jsonl"
    with FakeTeacher() as server:
        args = ["probabilistic", "--data", tmp_path / "alpaca.json", "--out", out, "--base-url", server.url]
        assert teacher_cli(*args, "--model", "m").returncode == 0
        before = out.read_bytes()
        run = teacher_cli(*args, "--model", "m FAULT:400", "--resume")
    assert run.returncode == 1 and out.read_bytes() == before  # nothing already written is lost
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("teacher.py probabilistic: error: every item failed (3 of 3") and "HTTP 400" in error
    assert str(out) + ".failures.jsonl" in error and len(read_jsonl(str(out) + ".failures.jsonl")) == 3


def test_a_server_that_refuses_echo_stops_add_original_scored_and_says_what_to_do(tmp_path, capsys):
    """OpenAI's current completion models answer echo + logprobs with a 400: scoring the dataset's own answer is
    impossible there, for every item; the run stops at the first refusal instead of paying for every item."""
    with open(tmp_path / "alpaca.json", "w") as f:
        json.dump([example(i, "FAULT:noecho") for i in range(5)], f)
    with FakeTeacher() as server:
        with pytest.raises(SystemExit) as stopped:
            teacher.main(["probabilistic", "--data", str(tmp_path / "alpaca.json"), "--out", str(tmp_path / "p.jsonl"),
                          "--base-url", server.url, "--model", "m", "--add-original", "scored", "--workers", "1"])
        assert sum(server.seen.values()) == 2  # item 0's samples and its refused echo request, nothing more
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 1 and "Setting 'echo' and 'logprobs' at the same time is not supported" in error
    assert "use --add-original first" in error and not (tmp_path / "p.jsonl").exists()


# ----------------------------------------------------------------------------- one writer per output

def test_a_second_run_on_the_same_output_refuses_at_once_naming_the_first(tmp_path):
    with open(tmp_path / "alpaca.json", "w") as f:
        json.dump([example(i) for i in range(3)], f)
    out = tmp_path / "p.jsonl"
    command = [sys.executable, os.path.join(ROOT, "teacher.py"), "probabilistic", "--data",
               str(tmp_path / "alpaca.json"), "--out", str(out), "--model", "m", "--workers", "1", "--timeout", "60"]
    with FakeTeacher(hang_after=0) as server:  # the first run waits for its first answer, holding the output
        first = subprocess.Popen(command + ["--base-url", server.url], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
        assert server.hanging.wait(60), first.communicate()[0]
        second = teacher_cli(*command[2:], "--base-url", server.url)
        assert second.returncode == 1 and sum(server.seen.values()) == 1  # it paid for nothing
        error = second.stderr.strip().splitlines()[-1]
        assert f"{out} is being written by another process (pid {first.pid}: " in error and "probabilistic" in error
        first.send_signal(signal.SIGKILL)  # a killed run's lock never blocks the next one
        first.wait()
        server.hang_after = None
        server.release.set()
        third = teacher_cli(*command[2:], "--base-url", server.url)
        assert third.returncode == 0 and "3 done, 0 failed" in third.stdout, third.stderr
        assert server.repeats == 0


# ----------------------------------------------------------------------------- nothing a user names is destroyed

def test_an_existing_output_is_rewritten_only_with_resume_or_overwrite(tmp_path):
    """`probabilistic --out p.jsonl` a second time once replaced p.jsonl silently. An existing OUT is refused without
    --resume (rebuilt from the caches: nothing is asked twice) or --overwrite; either rewrites only a ranked JSONL
    file of teacher.py (--resume only one of the same kind), and a --failures file only if it is teacher.py's:
    anything else is refused by name, before any request, and left as it was."""
    with open(tmp_path / "alpaca.json", "w") as f:
        json.dump([example(i) for i in range(3)], f)
    out = tmp_path / "p.jsonl"
    with FakeTeacher() as server:
        args = ["probabilistic", "--data", tmp_path / "alpaca.json", "--base-url", server.url, "--model", "m"]
        assert teacher_cli(*args, "--out", out).returncode == 0
        first, asked = out.read_bytes(), len(server.bodies)
        again = teacher_cli(*args, "--out", out)
        error = again.stderr.strip().splitlines()[-1]
        assert again.returncode == 1 and error == (
            f"teacher.py probabilistic: error: {out} already exists: pass --resume to rebuild it from the caches "
            "(what was asked and sampled before is read back, not paid for again) or --overwrite to replace it")
        assert out.read_bytes() == first and len(server.bodies) == asked and len(server.preflights) == 1
        resumed = teacher_cli(*args, "--out", out, "--resume")
        assert resumed.returncode == 0 and "cache hits 3" in resumed.stdout and "requests 0 (" in resumed.stdout
        assert out.read_bytes() == first and len(server.bodies) == asked
        assert teacher_cli(*args, "--out", out, "--overwrite").returncode == 0 and out.read_bytes() == first
        # another kind of ranking: --resume refuses it, --overwrite replaces it
        contextual = tmp_path / "c.jsonl"
        data.write_ranked_jsonl(contextual, [data.RankedRecord(id="0", prompt="p", candidates=["a", "b"],
                                                               source={"kind": "contextual"})])
        kept = contextual.read_bytes()
        refused = teacher_cli(*args, "--out", contextual, "--resume")
        assert refused.returncode == 1 and contextual.read_bytes() == kept
        assert refused.stderr.strip().splitlines()[-1] == (
            f"teacher.py probabilistic: error: --resume: {contextual} holds contextual ranking, not probabilistic: "
            "pass --overwrite to replace it")
        assert teacher_cli(*args, "--out", contextual, "--overwrite").returncode == 0
        assert [r.source["kind"] for r in data.read_ranked_jsonl(contextual)] == ["probabilistic"] * 3
        # what teacher.py did not write: never replaced, whatever the flag
        (tmp_path / "notes.json").write_text(json.dumps([example(0)]) + "\n")
        (tmp_path / "folder").mkdir()
        os.symlink(out, tmp_path / "link.jsonl")
        (tmp_path / "notes.txt").write_text("my notes\n")
        asked, checked = len(server.bodies), len(server.preflights)
        for flags, refusal in (
                (["--out", tmp_path / "notes.json", "--overwrite"], f"--out {tmp_path / 'notes.json'} is not"),
                (["--out", tmp_path / "folder", "--resume"], f"--out {tmp_path / 'folder'} is not"),
                (["--out", tmp_path / "link.jsonl", "--overwrite"], f"--out {tmp_path / 'link.jsonl'} is not"),
                (["--out", out, "--resume", "--failures", tmp_path / "notes.txt"],
                 f"--failures {tmp_path / 'notes.txt'} is not")):
            run = teacher_cli(*args, *flags)
            error = run.stderr.strip().splitlines()[-1]
            assert run.returncode == 1 and refusal in error and "it is left as it is" in error, error
        assert (len(server.bodies), len(server.preflights)) == (asked, checked)  # not even a pre-flight
    assert (tmp_path / "notes.json").read_text() == json.dumps([example(0)]) + "\n"
    assert (tmp_path / "notes.txt").read_text() == "my notes\n" and os.listdir(tmp_path / "folder") == []
    assert os.path.islink(tmp_path / "link.jsonl") and out.read_bytes() == first


def test_an_output_over_an_input_is_refused_before_anything_is_written(tmp_path, capsys):
    """`probabilistic --data d.json --out d.json` replaced the Alpaca input with ranked JSONL. An --out, --failures,
    --cache or --student-cache that is, holds or lies inside an input (--data, --student, --tokenizer,
    --count-tokenizer), or an --out or --failures that is a cache (whose paid answers it would replace), is refused
    by name before anything is written: no request, no lock file, no cache."""
    alpaca = tmp_path / "d.json"
    alpaca.write_text(json.dumps([example(i) for i in range(2)]))
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text("{}")
    (student / "tokenizer.model").write_text("x")
    before = sorted(os.listdir(tmp_path))
    with FakeTeacher() as server:
        common = ["--data", str(alpaca), "--base-url", server.url, "--model", "m"]
        contextual = ["contextual", *common, "--student", str(student)]
        cases = [
            (["probabilistic", *common, "--out", str(alpaca)], f"{alpaca} is --data {alpaca}"),
            (["probabilistic", *common, "--out", str(tmp_path / "p.jsonl"), "--failures", str(alpaca)],
             f"{alpaca} is --data {alpaca}"),
            (["probabilistic", *common, "--out", str(tmp_path / "p.jsonl"), "--cache", str(alpaca)],
             f"{alpaca} is --data {alpaca}"),
            (["probabilistic", *common, "--out", str(tmp_path / "p.jsonl"), "--cache", str(tmp_path / "p.jsonl")],
             f"{tmp_path / 'p.jsonl'} is --cache {tmp_path / 'p.jsonl'}"),
            (["probabilistic", *common, "--out", str(tmp_path), "--dry-run"], f"{tmp_path} holds --data {alpaca}"),
            (contextual + ["--out", str(student / "c.jsonl")], f"{student / 'c.jsonl'} is inside --student {student}"),
            (contextual + ["--out", str(tmp_path / "c.jsonl"), "--student-cache", str(student / "tokenizer.model"),
                           "--tokenizer", str(student / "tokenizer.model")],
             f"{student / 'tokenizer.model'} is inside --student {student}"),
            (["probabilistic", *common, "--out", str(tmp_path / "t.model"), "--count-tokenizer",
              str(tmp_path / "t.model")], f"{tmp_path / 't.model'} is --count-tokenizer {tmp_path / 't.model'}"),
        ]
        for argv, refusal in cases:
            with pytest.raises(SystemExit) as stopped:
                teacher.main(argv)
            error = capsys.readouterr().err
            assert stopped.value.code == 1 and refusal in error and "an output must lie apart" in error, error
        assert server.bodies == [] and server.preflights == []
    assert sorted(os.listdir(tmp_path)) == before and json.loads(alpaca.read_text())[0] == example(0)
    assert sorted(os.listdir(student)) == ["config.json", "tokenizer.model"]


# ----------------------------------------------------------------------------- caches that know what made them

def test_student_samples_know_the_checkpoint_that_drew_them(tiny, tmp_path):
    """Retrain (new weights in the same folder), rerun: new samples; the same checkpoint, or a copy of it: none."""
    model, tok, _ = tiny
    student, cache = tmp_path / "student", str(tmp_path / "student.jsonl")
    checkpoint.save_hf_checkpoint(model, str(student))
    examples = [example(i) for i in range(2)]

    def draw():
        return teacher.sample_candidates(checkpoint.load_checkpoint(str(student)), tok, examples, cache, n=2,
                                         max_new_tokens=6, tries=1,
                                         student=teacher.producer_identity(str(student), tok.path))

    first = draw()
    assert len(read_jsonl(cache)) == 2 and draw() == first and len(read_jsonl(cache)) == 2  # read back, not drawn
    retrained = checkpoint.load_checkpoint(str(student))
    with torch.no_grad():
        for weight in retrained.parameters():
            weight.add_(torch.randn_like(weight) * 0.5)
    # "retrained" in place, as `tuna.py pipeline --overwrite` does
    checkpoint.save_hf_checkpoint(retrained, str(student))
    second = draw()
    assert len(read_jsonl(cache)) == 4 and second != first  # drawn again from the new weights
    ids = [entry["settings"]["student"]["checkpoint"] for entry in read_jsonl(cache)]
    assert ids[0] == ids[1] != ids[2] == ids[3] and all(i.startswith("sha256:") for i in ids)
    assert draw() == second and len(read_jsonl(cache)) == 4


def test_a_sample_ended_by_any_stop_id_is_finished_and_trained_with_eos(tmp_path, spm_model_path):
    """A student that ends its answers with a stop id other than EOS (Llama 3.x Instruct's <|eot_id|>; here a
    text piece stands in, so that a stop id left in an answer would show in its text): student sampling, the
    server and eval's answers stop there, call the answer finished, and training gives it the tokenizer's EOS."""
    import eval as E
    import tuna
    eot = tokenizer.Tokenizer(spm_model_path).encode("Paris")[-1]
    folder = tmp_path / "student"
    folder.mkdir()
    shutil.copy(spm_model_path, folder / "tokenizer.model")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, eot]}))  # as Llama 3.x's
    tok = tokenizer.Tokenizer(folder)
    assert tok.stop_ids == [tok.eos_id, eot]
    student = eos_prone_student(tok, stop_id=eot)
    examples = [example(i) for i in range(4)]
    samples = teacher.sample_candidates(student, tok, examples, str(tmp_path / "s.jsonl"), n=4, max_new_tokens=3,
                                        tries=1, seed=1, student="eot-prone")
    for item_id, _, prompt in teacher._items(examples):
        outs, _ = M.generate(student, [tok.encode(prompt, bos=True)] * 4, 3, temperature=0.8,
                             eos_id=[tok.eos_id, eot], generator=row_generators(1, item_id, 4))
        assert samples[item_id]["finished"] == [out[-1] == eot for out in outs]
        assert samples[item_id]["candidates"] == [tok.decode(out[:-1] if out[-1] == eot else out).strip()
                                                  for out in outs]
    flags = [f for s in samples.values() for f in s["finished"]]
    assert True in flags and False in flags
    with FakeTeacher() as server:
        teacher.build_contextual(client_for(server, tmp_path), examples, samples, str(tmp_path / "c.jsonl"))
    contextual = data.read_ranked_jsonl(tmp_path / "c.jsonl")
    rows = {row["id"]: row for row in tuna.load_rows(str(tmp_path / "c.jsonl"), tok, "rank")}
    trained = []
    for record in contextual:
        for k, text in enumerate(record.candidates):
            targets = [t for t, c in zip(rows[record.id]["target"], rows[record.id]["candidate"]) if c == k]
            assert (targets[-1] == tok.eos_id) == (k not in record.source["unfinished"])
            trained.append(k not in record.source["unfinished"] and text in samples[record.id]["candidates"])
    assert any(trained)  # some finished student samples were trained, each ending in EOS
    # the server: finish_reason "stop" at the stop id, which is neither in the text nor among the tokens
    server = make_server(student, tok, "127.0.0.1", 0, "eot-prone")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reply = requests.post(f"http://127.0.0.1:{server.server_port}/v1/completions", json={
            "prompt": "Hello", "max_tokens": 3, "temperature": 0.8, "n": 16, "seed": 3, "logprobs": 0}).json()
    finally:
        server.shutdown()
        server.server_close()
    outs, _ = M.generate(student, [tok.encode("Hello", bos=True)] * 16, 3, temperature=0.8, eos_id=[tok.eos_id, eot],
                         generator=torch.Generator().manual_seed(3))
    for choice, out in zip(reply["choices"], outs):
        body = out[:-1] if out[-1] == eot else out
        assert choice["finish_reason"] == ("stop" if out[-1] == eot else "length")
        assert choice["text"] == tok.decode(body) and len(choice["logprobs"]["tokens"]) == len(body)
    assert {c["finish_reason"] for c in reply["choices"]} == {"stop", "length"}
    # eval's greedy answers: the stop id is the student's first choice, so every answer is empty
    items = [{"id": str(i), "prompt": data.alpaca_prompt(e["instruction"])} for i, e in enumerate(examples)]
    answers = E.generate_answers("eot", "bench", items, lambda: (student, tok), str(tmp_path), 4, 3, "eot-prone")
    assert answers == {item["id"]: "" for item in items}
    tok = tokenizer.Tokenizer(spm_model_path)  # without the second stop id the same student says "Paris" three times
    assert E.generate_answers("eos", "bench", items, lambda: (student, tok), str(tmp_path), 4, 3, "eos-only") == \
        {item["id"]: tok.decode([eot] * 3).strip() for item in items}


def test_echo_returns_every_prompt_token_whatever_the_tokenizer_puts_first(tmp_path, spm_model_path):
    """echo (how --add-original scored has a text scored) lists the prompt's tokens after what the tokenizer puts
    first: after BOS for LLaMA's, from the first token for one that puts nothing (SmolLM2, GPT-2). The first has
    no context, so no log-prob, as OpenAI's; the others are model.py's scores."""
    from conftest import CORPUS_LINES, build_bpe_tokenizer
    no_bos = tokenizer.Tokenizer(build_bpe_tokenizer(tmp_path / "smollm2", "smollm2", CORPUS_LINES * 20))
    text = "Paris is the capital of France."
    for tok in (tokenizer.Tokenizer(spm_model_path), no_bos):
        torch.manual_seed(0)
        net = M.Transformer(dataclasses.replace(M.ModelArgs.from_name("tiny"), vocab_size=tok.vocab_size)).eval()
        server = make_server(net, tok, "127.0.0.1", 0, "tiny")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            reply = requests.post(f"http://127.0.0.1:{server.server_port}/v1/completions", json={
                "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1}).json()["choices"][0]
        finally:
            server.shutdown()
            server.server_close()
        lp, start, ids = reply["logprobs"], tok.encode("", bos=True), tok.encode(text)
        assert "".join(lp["tokens"]).lstrip() == reply["text"] == text  # (sentencepiece: a space before the first)
        assert len(lp["tokens"]) == len(ids)
        assert lp["token_logprobs"][0] is None and lp["text_offset"][0] == 0
        total, _ = sequence_logprobs(net, [start + ids[:1]], [ids[1:]])
        assert sum(lp["token_logprobs"][1:]) == pytest.approx(total.item(), abs=1e-3)
    assert no_bos.bos_id is None
