"""The pieces people copy into their own projects work copied: each file, with only the project files its
docstring names ("Copy with it: ..."), in an empty folder, run by a fresh Python that sees nothing else of
this repository. A file that imports a project file its docstring does not name fails here."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import checkpoint
import model
from server import backend_server
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def named_companions(name):
    """The project files a file's docstring names on its "Copy with it:" line."""
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        docstring = ast.get_docstring(ast.parse(f.read()))
    line = re.search(r"Copy with it: ([^\n]*)", docstring)
    assert line, f"{name}'s docstring has no 'Copy with it:' line"
    return re.findall(r"\b(\w+\.py)\b", line.group(1))


def run_copied(name, script, tmp_path, timeout=120):
    """Copy `name` and its named companions into an empty folder and run `script` there with a fresh
    Python whose path holds that folder and the installed packages only; -> its stdout."""
    folder = tmp_path / "copied"
    folder.mkdir()
    for file in [name] + named_companions(name):
        shutil.copy(os.path.join(ROOT, file), folder)
    (folder / "use_it.py").write_text(textwrap.dedent(script))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "use_it.py"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{name} copied with {named_companions(name)}:\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_copyable_file_names_its_companions_and_they_are_project_files():
    for name in ("model.py", "tokenizer.py", "checkpoint.py", "client.py", "server.py"):
        for companion in named_companions(name):
            assert os.path.isfile(os.path.join(ROOT, companion)), (name, companion)
    assert named_companions("model.py") == [] and named_companions("tokenizer.py") == []


def test_model_py_alone_builds_and_generates_what_the_project_generates(tmp_path):
    torch.manual_seed(0)
    net = model.Transformer(model.ModelArgs.from_name("tiny"))
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    expected, _ = model.generate(net.eval(), [[1, 5, 9, 13]], max_new_tokens=12)
    out = run_copied("model.py", f"""
        import torch
        import model
        net = model.Transformer(model.ModelArgs.from_name("tiny"))
        net.load_state_dict(torch.load({str(tmp_path / "weights.pt")!r}, weights_only=True))
        tokens, _ = model.generate(net.eval(), [[1, 5, 9, 13]], max_new_tokens=12)
        print(tokens[0])
    """, tmp_path)
    assert out.split("\n")[0] == str(expected[0])


def test_checkpoint_py_with_model_py_loads_a_checkpoint_and_generates(tmp_path):
    torch.manual_seed(1)
    net = model.Transformer(model.ModelArgs.from_name("tiny")).eval()
    checkpoint.save_hf_checkpoint(net, str(tmp_path / "ck"))
    expected, _ = model.generate(net, [[1, 2, 3]], max_new_tokens=10)
    out = run_copied("checkpoint.py", f"""
        import checkpoint, model
        net = checkpoint.load_checkpoint({str(tmp_path / "ck")!r})
        tokens, _ = model.generate(net, [[1, 2, 3]], max_new_tokens=10)
        print(tokens[0])
    """, tmp_path)
    assert out.split("\n")[0] == str(expected[0])


def test_tokenizer_py_alone_encodes_and_decodes_a_publishers_file(tmp_path, real_files):
    folder = real_files("llama3")
    text = "Give three tips for staying healthy: 1) eat well, 2) sleep 8h. Ünïcödé 東京 🙂"
    expected = Tokenizer(folder).encode(text, bos=True)
    out = run_copied("tokenizer.py", f"""
        import json
        from tokenizer import Tokenizer
        tok = Tokenizer({folder!r})
        ids = tok.encode({text!r}, bos=True)
        print(json.dumps([ids, tok.decode(ids)]))
    """, tmp_path)
    ids, decoded = json.loads(out)
    assert ids == expected and decoded == text


class EchoBackend:
    """A backend for server.backend_server: one completion whose text repeats the prompt."""
    name = "echo"

    def completions(self, body):
        text = f"echo: {body['prompt']}"
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": self.name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def test_client_py_with_data_py_sends_one_request_to_a_server_and_caches_it(tmp_path):
    server = backend_server(EchoBackend())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        out = run_copied("client.py", f"""
            from client import TeacherClient
            client = TeacherClient({url!r}, "echo", cache_path={str(tmp_path / "cache.jsonl")!r})
            print(client.complete("hello", max_tokens=1)["choices"][0]["text"])
            print(client.complete("hello", max_tokens=1)["choices"][0]["text"], client.counts["cache_hits"])
        """, tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert out.split("\n")[:2] == ["echo: hello", "echo: hello 1"]


def test_server_py_with_its_companions_answers_completions(tmp_path, spm_model_path):
    torch.manual_seed(2)
    net = model.Transformer(model.ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32,
                                            max_seq_len=128)).eval()
    folder = tmp_path / "ck"
    checkpoint.save_hf_checkpoint(net, str(folder))
    shutil.copy(spm_model_path, folder / "tokenizer.model")
    prompt = "Count the letters in banana."
    tok = Tokenizer(str(folder))
    expected, _ = model.generate(net, [tok.encode(prompt, bos=True)], max_new_tokens=8, eos_id=tok.stop_ids)
    out = run_copied("server.py", f"""
        import json, subprocess, sys, requests
        server = subprocess.Popen([sys.executable, "server.py", "--checkpoint", {str(folder)!r}, "--port", "0"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().split(" at ")[1].split()[0]
            answer = requests.post(url + "/completions", json={{"prompt": {prompt!r}, "max_tokens": 8,
                                   "temperature": 0, "logprobs": 1}}, timeout=60).json()
            print(json.dumps(answer["choices"][0]))
        finally:
            server.terminate()
            server.wait(timeout=30)
    """, tmp_path)
    choice = json.loads(out)
    new_tokens, _ = model.without_stop(expected[0], tok.stop_ids)
    assert len(choice["logprobs"]["token_logprobs"]) == len(new_tokens)
    assert choice["text"] == b"".join(tok.piece_bytes(t) for t in new_tokens).decode("utf-8", "replace")


@pytest.mark.parametrize("name", ["model.py", "tokenizer.py", "checkpoint.py", "client.py", "server.py"])
def test_a_copied_file_imports_no_project_file_beyond_those_it_names(name):
    """The static side of the check: every top-level import of a project module is a named companion."""
    project = {file[:-3] for file in os.listdir(ROOT) if file.endswith(".py")}
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    named = {companion[:-3] for companion in named_companions(name)}
    assert (imported & project) - {name[:-3]} <= named, (name, sorted((imported & project) - named))
