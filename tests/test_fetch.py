"""fetch.py against a local stand-in for GitHub (http.server on 127.0.0.1, in a thread): small files whose
git blob ids the test computes, and a tree listing for the inputs read by folder or task list. A good file
lands; a corrupted one is refused by name and leaves nothing; a cut or killed download resumes with a Range
request; a second run asks the server nothing; an unreachable host or a refusal is one line and exit 1."""
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import fetch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "c0ffee" + "0" * 34


def git_blob_id(content):
    """What `git hash-object` prints for these bytes, computed apart from fetch.blob_id."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


# ---- 1. The stand-in server

class StandIn(ThreadingHTTPServer):
    """Serves `files` {url path: bytes} as raw.githubusercontent.com and api.github.com would, Range
    requests included, and records every request as (path, Range header or None). A path in `cut_once` is
    answered once with half its body and the connection closed; a path in `hold` sends half its body, then
    waits for the event before the rest."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = {}
        self.requests = []
        self.cut_once = set()
        self.hold = {}

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        pass  # a client killed mid-answer is what some tests do


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        path = self.path
        byte_range = self.headers.get("Range")
        server.requests.append((path, byte_range))
        if path not in server.files:
            self.send_error(404)
            return
        body = server.files[path]
        start = int(byte_range.removeprefix("bytes=").rstrip("-")) if byte_range else 0
        if start >= len(body) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        rest = body[start:]
        if path in server.cut_once:
            server.cut_once.discard(path)
            self.wfile.write(rest[:len(rest) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if path in server.hold:
            self.wfile.write(rest[:len(rest) // 2])
            self.wfile.flush()
            server.hold[path].wait(timeout=20)
            rest = rest[len(rest) // 2:]
        self.wfile.write(rest)


@pytest.fixture
def server():
    standin = StandIn()
    thread = threading.Thread(target=standin.serve_forever, daemon=True)
    thread.start()
    yield standin
    for event in standin.hold.values():
        event.set()
    standin.shutdown()
    standin.server_close()


# ---- 2. Stand-in inputs: pinned files, a folder, a task list

SINGLE = {"bench/sub/questions.jsonl": b'{"question_id": 1}\n' * 50, "bench/notes.txt": b"notes\n"}
FOLDER = {"data/a.json": b'{"a": 1}\n', "data/b.json": b'{"b": 2}\n' * 30, "README.md": b"not fetched\n"}
TASKS = {"splits/default/test_tasks.txt": b"task1\ntask2\n", "tasks/task1.json": b'{"t": 1}\n',
         "tasks/task2.json": b'{"t": 2}\n', "tasks/task3.json": b'{"t": 3, "not": "listed"}\n'}


def tree_listing(files):
    """GitHub's git-trees answer for a commit holding these files (and their folders)."""
    folders = sorted({path.rsplit("/", 1)[0] for path in files if "/" in path})
    entries = [{"path": folder, "mode": "040000", "type": "tree", "sha": "f" * 40} for folder in folders]
    entries += [{"path": path, "mode": "100644", "type": "blob", "sha": git_blob_id(content),
                 "size": len(content)} for path, content in files.items()]
    return json.dumps({"sha": "e" * 40, "tree": entries, "truncated": False}).encode()


def stand_in_inputs(server):
    """Three inputs of the three kinds fetch.py knows, served by `server`."""
    task_list = "splits/default/test_tasks.txt"
    repos = {"single": ("owner/single", SINGLE), "folder": ("owner/folder", FOLDER),
             "tasks": ("owner/tasks", TASKS)}
    for repo, files in repos.values():
        for path, content in files.items():
            server.files[f"/{repo}/{COMMIT}/{path}"] = content
        server.files[f"/repos/{repo}/git/trees/{COMMIT}?recursive=1"] = tree_listing(files)
    return {
        "single": fetch.Input("owner/single", COMMIT, "CC0 (a stand-in)", strip="bench/",
                              files={path: git_blob_id(content) for path, content in SINGLE.items()}),
        "folder": fetch.Input("owner/folder", COMMIT, "MIT (a stand-in)", folder="data/", strip="data/"),
        "tasks": fetch.Input("owner/tasks", COMMIT, "Apache-2.0 (a stand-in)",
                             files={"splits/default/test_tasks.txt": git_blob_id(TASKS[task_list])},
                             task_list=task_list),
    }


@pytest.fixture
def inputs(server, monkeypatch):
    stand_ins = stand_in_inputs(server)
    monkeypatch.setattr(fetch, "INPUTS", stand_ins)
    return stand_ins


def run(server, out, *names):
    return fetch.main([*names, "--out", str(out), "--raw-url", server.url, "--api-url", server.url])


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(parent, name), folder)
                  for parent, _, names in os.walk(folder) for name in names)


def read(path):
    with open(path, "rb") as f:
        return f.read()


# ---- 3. Tests

def test_blob_id_is_gits(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert fetch.blob_id(empty) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob
    text = tmp_path / "text"
    text.write_bytes(b"hello\n")
    assert fetch.blob_id(text) == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object


def test_the_real_pins_are_whole():
    assert set(fetch.INPUTS) == {"alpaca", "tuna-release", "superni", "lmentry", "vicuna"}
    for name, source in fetch.INPUTS.items():
        ids = [source.commit, *source.files.values()]
        assert all(len(i) == 40 and set(i) <= set("0123456789abcdef") for i in ids), name
        assert source.files or source.folder, name
        assert source.licence, name
        assert all(path.startswith(source.strip) for path in source.files), name
    assert "NON-COMMERCIAL" in fetch.INPUTS["alpaca"].licence
    assert "NON-COMMERCIAL" in fetch.INPUTS["tuna-release"].licence


def test_good_files_land_where_the_scripts_read_them_and_a_second_run_fetches_nothing(
        server, inputs, tmp_path, capsys):
    out = tmp_path / "inputs"
    assert run(server, out, "all") == 0
    printed = capsys.readouterr().out
    assert files_under(out / "single") == ["notes.txt", os.path.join("sub", "questions.jsonl")]
    assert read(out / "single" / "sub" / "questions.jsonl") == SINGLE["bench/sub/questions.jsonl"]
    assert files_under(out / "folder") == ["a.json", "b.json"]  # README.md is outside data/
    assert read(out / "folder" / "b.json") == FOLDER["data/b.json"]
    assert files_under(out / "tasks") == [os.path.join("splits", "default", "test_tasks.txt"),
                                          os.path.join("tasks", "task1.json"),
                                          os.path.join("tasks", "task2.json")]  # task3 is not listed
    assert sorted(os.listdir(out / ".trees")) == [f"owner+folder@{COMMIT}.json", f"owner+tasks@{COMMIT}.json"]
    for source in inputs.values():  # each licence once
        assert printed.count(source.licence) == 1
    assert "tasks: 3 files" in printed and "(3 fetched, 0 kept" in printed

    server.requests.clear()
    assert run(server, out, "single", "folder", "tasks") == 0
    assert server.requests == []  # neither a file nor a tree listing asked again
    printed = capsys.readouterr().out
    assert printed.count("(0 fetched,") == 3
    assert "folder: 2 files" in printed


def test_a_corrupted_file_is_refused_by_name_and_leaves_nothing(server, inputs, tmp_path, capsys):
    server.files[f"/owner/single/{COMMIT}/bench/notes.txt"] = b"notes, changed\n"
    out = tmp_path / "inputs"
    assert run(server, out, "single") == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    expected = inputs["single"].files["bench/notes.txt"]
    assert os.path.join("single", "notes.txt") in error[0]
    assert expected in error[0] and git_blob_id(b"notes, changed\n") in error[0]
    assert not (out / "single" / "notes.txt").exists()
    assert not [name for name in files_under(out) if name.endswith(".part")]


def test_a_cut_download_resumes_with_a_range_request(server, inputs, tmp_path, capsys):
    path = f"/owner/folder/{COMMIT}/data/big.json"
    big = bytes(range(256)) * 1200  # 307 kB: the half sent before the cut holds whole 64 KiB chunks
    files = {**FOLDER, "data/big.json": big}
    server.files[path] = big
    server.files[f"/repos/owner/folder/git/trees/{COMMIT}?recursive=1"] = tree_listing(files)
    server.cut_once.add(path)
    out = tmp_path / "inputs"
    assert run(server, out, "folder") == 0
    asked = [byte_range for p, byte_range in server.requests if p == path]
    assert asked[0] is None and len(asked) == 2
    resumed_from = int(asked[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= len(big) // 2
    assert read(out / "folder" / "big.json") == big
    assert "resuming" in capsys.readouterr().out


DRIVER = """
import json, sys
sys.path.insert(0, {root!r})
import fetch
fetch.INPUTS = {{name: fetch.Input(**fields) for name, fields in json.loads(sys.argv[1]).items()}}
sys.exit(fetch.main(sys.argv[2:]))
"""


def test_a_killed_download_resumes_where_it_stopped(server, inputs, tmp_path):
    path = f"/owner/single/{COMMIT}/bench/sub/questions.jsonl"
    big = b"".join(b'{"question_id": %d}\n' % i for i in range(20000))  # 0.4 MB
    server.files[path] = big
    pinned = {**inputs["single"].files, "bench/sub/questions.jsonl": git_blob_id(big)}
    single = inputs["single"] = dataclasses.replace(inputs["single"], files=pinned)
    server.hold[path] = threading.Event()
    out = tmp_path / "inputs"
    part = out / "single" / "sub" / ".questions.jsonl.part"
    spec = json.dumps({"single": dataclasses.asdict(single)})
    process = subprocess.Popen([sys.executable, "-c", DRIVER.format(root=ROOT), spec, "single",
                                "--out", str(out), "--raw-url", server.url, "--api-url", server.url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    server.hold[path].set()
    kept = part.stat().st_size
    assert 0 < kept < len(big) and not (out / "single" / "sub" / "questions.jsonl").exists()

    assert run(server, out, "single") == 0
    assert [r for p, r in server.requests if p == path][-1] == f"bytes={kept}-"
    assert read(out / "single" / "sub" / "questions.jsonl") == big
    assert not part.exists()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_host_is_one_line_and_exit_1(inputs, tmp_path, capsys):
    out = tmp_path / "inputs"
    dead = f"http://127.0.0.1:{free_port()}"
    assert fetch.main(["single", "--out", str(out), "--raw-url", dead, "--api-url", dead]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert f"cannot reach {dead}/owner/single/{COMMIT}/bench/" in error[0] and "refused" in error[0]
    assert not out.exists() or files_under(out) == []


def test_a_refused_file_or_tree_is_one_line_naming_the_url(server, inputs, tmp_path, capsys):
    out = tmp_path / "inputs"
    del server.files[f"/repos/owner/folder/git/trees/{COMMIT}?recursive=1"]
    assert run(server, out, "folder") == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"fetch.py: error: {server.url}/repos/owner/folder/git/trees/{COMMIT}?recursive=1: "
                     "HTTP 404 Not Found"]
    assert not out.exists() or files_under(out) == []


def test_a_file_there_with_another_id_is_refused_and_left_as_it_was(server, inputs, tmp_path, capsys):
    out = tmp_path / "inputs"
    (out / "single").mkdir(parents=True)
    (out / "single" / "notes.txt").write_bytes(b"my own notes\n")
    assert run(server, out, "single") == 1
    error = capsys.readouterr().err
    assert os.path.join("single", "notes.txt") in error and git_blob_id(b"my own notes\n") in error
    assert read(out / "single" / "notes.txt") == b"my own notes\n"


def test_a_symlink_in_a_files_place_or_its_parts_is_refused_and_nothing_behind_it_is_written(server, inputs, tmp_path,
                                                                                             capsys):
    """fetch.py writes only files of its own: a symlink where a file lands that leads nowhere (the rename would
    replace it), or one where a download's partial file goes (its bytes would go to the link's target, which a
    mismatch would then lose), is refused by name and left as it was, its target untouched."""
    out = tmp_path / "inputs"
    (out / "single" / "sub").mkdir(parents=True)
    (tmp_path / "precious").write_bytes(b"keep me\n")
    part = out / "single" / "sub" / ".questions.jsonl.part"
    os.symlink(tmp_path / "precious", part)
    assert run(server, out, "single") == 1
    error = capsys.readouterr().err
    assert f"{part}: a symlink, not a partial download of fetch.py" in error, error
    assert os.path.islink(part) and read(tmp_path / "precious") == b"keep me\n"
    os.remove(part)
    os.symlink(tmp_path / "nowhere", out / "single" / "notes.txt")
    assert run(server, out, "single") == 1
    error = capsys.readouterr().err
    assert f"{out / 'single' / 'notes.txt'}: a symlink to nothing" in error, error
    assert os.path.islink(out / "single" / "notes.txt") and not os.path.lexists(tmp_path / "nowhere")
