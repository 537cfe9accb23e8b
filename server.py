"""An OpenAI-compatible server over a model.py checkpoint: /v1/completions (with log-probs and
echo), /v1/chat/completions and /v1/models, for a local teacher, the tests and the demo.

Copy with it: model.py, checkpoint.py, tokenizer.py, data.py.

    python server.py --checkpoint some-llama/ --port 8000     # then --base-url http://127.0.0.1:8000/v1
"""
import argparse
import codecs
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import data
from checkpoint import load_checkpoint
from model import generate, token_logprobs, without_stop
from tokenizer import Tokenizer

log = logging.getLogger("server")


# ---- 1. the model behind the server: OpenAI's answers from model.generate and token_logprobs

def chat_prompt(messages):
    """Chat messages as one Alpaca-template prompt: the system text (default: Alpaca's
    preamble), user turns as "### Instruction:", assistant turns as "### Response:",
    ending in "### Response:". One user message and no system message give exactly
    data.alpaca_prompt(content), the SFT model's own format."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    parts = [system or data.PROMPT_NO_INPUT.split("\n\n")[0]]
    for m in messages:
        if m["role"] == "user":
            parts.append(f"### Instruction:\n{m['content']}")
        elif m["role"] != "system":
            parts.append(f"### Response:{m['content']}")
    return "\n\n".join(parts) + "\n\n### Response:"


def _offsets(pieces, text_end):
    """Character offset of each token (bytes) in a text that ends with them at text_end
    (OpenAI counts from the prompt's start). Counted from the end: sentencepiece drops the
    leading space of a first piece."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    starts = []
    chars = 0
    for piece in pieces:
        starts.append(chars)
        chars += len(decoder.decode(piece))
    chars += len(decoder.decode(b"", final=True))
    return [max(0, text_end - chars + start) for start in starts]


class LocalTeacher:
    """The model behind the server: one model call at a time (a lock); the HTTP threads
    parse and format."""

    def __init__(self, model, tokenizer, name, seed=None):
        self.model = model
        self.tok = tokenizer
        self.name = name
        self.seed = seed
        self.device = model.tok_embeddings.weight.device
        self.lock = threading.Lock()

    def _text(self, token_id):
        return self.tok.piece_bytes(token_id).decode("utf-8", "replace")

    def _token(self, token_id, logprob):
        """One token of a chat answer's log-probs, as OpenAI's chat API lists it."""
        return {"token": self._text(token_id), "logprob": logprob,
                "bytes": list(self.tok.piece_bytes(token_id))}

    def _score(self, ids, top_k):
        """log p(ids[t] | ids[:t]) for t >= 1 (model.token_logprobs of the raw logits, as
        the OpenAI API reports them, and as training scores responses) and the top_k
        (log-prob, id) pairs per position."""
        with torch.no_grad():
            # (T - 1, vocab)
            logits = self.model(torch.tensor([ids], device=self.device))[0, :-1]
        chosen = token_logprobs(logits, torch.tensor(ids[1:], device=self.device)).tolist()
        if not top_k:
            return chosen, [[] for _ in chosen]
        values, indices = torch.log_softmax(logits.float(), -1).topk(top_k, -1)
        return chosen, [list(zip(v, i)) for v, i in zip(values.tolist(), indices.tolist())]

    def _run(self, prompt, n, temperature, top_p, max_tokens, seed, stop, top_k):
        ids = self.tok.encode(prompt, bos=True)
        limit = self.model.args.max_seq_len
        max_tokens = limit - len(ids) if max_tokens is None else max_tokens
        if len(ids) + max(max_tokens, 0) > limit:
            raise BadRequest(f"This model's maximum context length is {limit} tokens; the prompt has "
                             f"{len(ids)} tokens and max_tokens is {max_tokens}", "max_tokens")
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        stops = self.tok.stop_ids
        with self.lock:
            outs, _ = generate(self.model, [ids] * n, max_tokens, temperature=temperature, top_p=top_p,
                               eos_id=stops, generator=generator)
            outs = [without_stop(out, stops) for out in outs]
            scored = [self._score(ids + new, top_k) for new, _ in outs]
        choices = []
        for (new, stopped), (logprobs, tops) in zip(outs, scored):
            finish = "stop" if stopped else "length"
            logprobs = logprobs[len(ids) - 1:]
            tops = tops[len(ids) - 1:]
            pieces = [self.tok.piece_bytes(t) for t in new]
            text = b"".join(pieces).decode("utf-8", "replace")
            cut = min((at for at in (text.find(s) for s in stop) if at >= 0), default=-1)
            # the text ends before the stop sequence, and so do the tokens
            if cut >= 0:
                keep = sum(1 for at in _offsets(pieces, len(text)) if at < cut)
                new = new[:keep]
                logprobs = logprobs[:keep]
                tops = tops[:keep]
                text = text[:cut]
                finish = "stop"
            choices.append((new, logprobs, tops, text, finish))
        return ids, scored[0][0][:len(ids) - 1], scored[0][1][:len(ids) - 1], choices

    def _sampling(self, body, default_max_tokens):
        if body.get("stream"):
            raise BadRequest("stream is not supported by this server", "stream")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not _valid_stop(stop):
            raise BadRequest("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
        n = _option(body, "n", (int,), 1, lambda v: 1 <= v <= 16)
        temperature = _option(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2)
        top_p = _option(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1)
        max_tokens = _option(body, "max_tokens", (int,), default_max_tokens, lambda v: v >= 0)
        default_seed = self._default_seed(body)
        seed = _option(body, "seed", (int,), default_seed)
        return dict(n=n, temperature=float(temperature), top_p=float(top_p),
                    max_tokens=max_tokens, seed=seed, stop=stop)

    def _default_seed(self, body):
        """serve --seed S: a request without a seed samples from a generator seeded by (S,
        the request), so a run is reproducible whatever the order in which concurrent
        requests arrive."""
        if self.seed is None:
            return None
        request = json.dumps(body, sort_keys=True, ensure_ascii=False)
        digest = hashlib.sha256(f"{self.seed}:{request}".encode()).digest()
        return int.from_bytes(digest[:6], "little")

    def _answer(self, kind, choices, usage):
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.name, "choices": choices, "usage": usage}

    def completions(self, body):
        prompts = body.get("prompt")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not _non_empty_list_of(prompts, str):
            raise BadRequest("'prompt' must be a string or a non-empty list of strings", "prompt")
        sampling = self._sampling(body, 16)  # 16: the OpenAI default
        top_k = _option(body, "logprobs", (int,), None, lambda v: 0 <= v <= 5)
        echo = _option(body, "echo", (bool,), False)
        choices = []
        usage = dict(prompt_tokens=0, completion_tokens=0)
        for p, prompt in enumerate(prompts):
            ids, prompt_logprobs, prompt_tops, outs = self._run(prompt, top_k=top_k or 0, **sampling)
            usage["prompt_tokens"] += len(ids)
            for j, (new, logprobs, tops, text, finish) in enumerate(outs):
                usage["completion_tokens"] += len(new)
                # OpenAI counts text offsets from the prompt's start
                end = len(prompt) + len(text)
                # the prompt's tokens first (BOS is no text); the first has no context: None
                if echo:
                    # BOS, or nothing (SmolLM2, GPT-2)
                    start = len(self.tok.prefix_ids())
                    new = ids[start:] + new
                    text = prompt + text
                    logprobs = [None] + prompt_logprobs[start:] + logprobs
                    tops = [None] + prompt_tops[start:] + tops
                info = None
                if top_k is not None:
                    info = self._completion_logprobs(new, logprobs, tops, end)
                index = p * sampling["n"] + j
                choices.append({"text": text, "index": index, "logprobs": info,
                                "finish_reason": finish})
        return self._answer("text_completion", choices, usage)

    def _completion_logprobs(self, new, logprobs, tops, end):
        """/completions' logprobs object of one choice; `end`: where its text ends."""
        # tokens with equal texts: the best one's log-prob
        top_logprobs = []
        for top in tops:
            best = None if top is None else {self._text(i): lp for lp, i in reversed(top)}
            top_logprobs.append(best)
        pieces = [self.tok.piece_bytes(t) for t in new]
        return {"tokens": [self._text(t) for t in new],
                "token_logprobs": logprobs,
                "top_logprobs": top_logprobs,
                "text_offset": _offsets(pieces, end)}

    def chat(self, body):
        messages = body.get("messages")
        if not _non_empty_list_of(messages, dict) or not all(map(_valid_message, messages)):
            raise BadRequest("'messages' must be a non-empty list of {role: system|user|assistant, content: "
                             "string}", "messages")
        sampling = self._sampling(body, None)  # None: up to the end of the context
        want_logprobs = _option(body, "logprobs", (bool,), False)
        top_k = _option(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= 20)
        if top_k and not want_logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        ids, _, _, outs = self._run(chat_prompt(messages), top_k=top_k, **sampling)
        choices = []
        usage = dict(prompt_tokens=len(ids), completion_tokens=0)
        for j, (new, logprobs, tops, text, finish) in enumerate(outs):
            usage["completion_tokens"] += len(new)
            content = []
            for t, lp, top in zip(new, logprobs, tops):
                alternatives = [self._token(i, v) for v, i in top]
                content.append(dict(self._token(t, lp), top_logprobs=alternatives))
            message = {"role": "assistant", "content": text, "refusal": None}
            info = {"content": content, "refusal": None} if want_logprobs else None
            choices.append({"index": j, "message": message, "logprobs": info,
                            "finish_reason": finish})
        return self._answer("chat.completion", choices, usage)


# ---- 2. the request's fields, checked as OpenAI checks them

class BadRequest(ValueError):
    """A request the server cannot answer (HTTP 400); param: the body field at fault."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


def _non_empty_list_of(value, kind):
    """Whether value is a non-empty list of `kind`."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, kind) for v in value)


def _valid_stop(stop):
    """OpenAI's rule for "stop" (as a list): at most 4 non-empty strings."""
    return isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)


def _valid_message(message):
    """A chat message this server reads: a known role and a string content."""
    role_known = message.get("role") in ("system", "user", "assistant")
    return role_known and isinstance(message.get("content"), str)


def _option(body, name, kinds, default, valid=lambda value: True):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds) or not valid(value):
        raise BadRequest(f"Invalid value for '{name}': {value!r}", name)
    return value


# ---- 3. HTTP: OpenAI's routes, status codes and error bodies

def _error(message, kind="invalid_request_error", param=None, code=None):
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# OpenAI's status codes and error bodies (401 for a missing or wrong key, 404
# model_not_found, 400 invalid_request_error, 413 for a body over the limit), a listen
# backlog that takes a client's whole thread pool at once, and an API key compared in
# constant time.
# pending connections the kernel keeps (Python's default of 5 resets the rest)
LISTEN_BACKLOG = 1024
# a ranking request is ~10 KB; a bigger body is refused before it is read
MAX_BODY_BYTES = 8 * 2 ** 20
NO_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header using "
          "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")


class _Handler(BaseHTTPRequestHandler):
    def _send(self, status, answer):
        payload = json.dumps(answer, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def _refused(self):
        """An error answer (status, body) when the request lacks the server's API key,
        else None."""
        key = self.server.api_key
        if key is None:
            return None
        given = self.headers.get("Authorization", "")
        if not given.startswith("Bearer "):
            return 401, _error(NO_KEY)
        if not hmac.compare_digest(given[len("Bearer "):].strip().encode(), key.encode()):
            # never echo the key
            return 401, _error("Incorrect API key provided.", code="invalid_api_key")
        return None

    def do_GET(self):
        refused = self._refused()
        if refused:
            self._send(*refused)
        elif self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.teacher.name, "object": "model",
                                                         "created": 0, "owned_by": "tuna"}]})
        else:
            self._send(404, _error(f"Unknown URL: GET {self.path}", code="unknown_url"))

    def do_POST(self):
        teacher = self.server.teacher
        # None: an unknown URL, or an endpoint this backend does not answer
        route = getattr(teacher, ROUTES.get(self.path, ""), None)
        try:
            size = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            size = -1
        # answered unread: the connection closes after it
        if size < 0:
            self.close_connection = True
            message = "The Content-Length header is not a number of bytes."
            return self._send(400, _error(message))
        limit = self.server.max_body_bytes
        if size > limit:
            self.close_connection = True
            message = f"Request body of {size} bytes is over this server's limit of {limit} bytes."
            return self._send(413, _error(message, code="request_too_large"))
        try:
            raw = self.rfile.read(size)
            refused = self._refused()
            if refused:
                return self._send(*refused)
            if route is None:
                return self._send(404, _error(f"Unknown URL: POST {self.path}", code="unknown_url"))
            try:
                body = json.loads(raw)
            except ValueError:
                raise BadRequest("We could not parse the JSON body of your request.") from None
            if not isinstance(body, dict):
                raise BadRequest("The request body must be a JSON object.")
            # no model: the served one, as vLLM
            if body.get("model") not in (None, teacher.name):
                unknown = f"The model `{body['model']}` does not exist or you do not have access to it."
                return self._send(404, _error(unknown, code="model_not_found"))
            self._send(200, route(body))
        except BadRequest as e:
            self._send(400, _error(str(e), param=e.param))
        except Exception as e:  # never crash the server: a 500 the client may retry
            log.exception("POST %s failed", self.path)
            self._send(500, _error(f"Internal error: {type(e).__name__}: {e}", "server_error"))

    def log_message(self, format, *args):
        log.debug("%s " + format, self.address_string(), *args)


# URL -> the backend's method that answers it
ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


class _Server(ThreadingHTTPServer):
    request_queue_size = LISTEN_BACKLOG  # socket.listen()'s backlog
    daemon_threads = True


def backend_server(backend, host="127.0.0.1", port=0, api_key=None, max_body_bytes=MAX_BODY_BYTES):
    """A ThreadingHTTPServer (not started) with the OpenAI routes and error bodies,
    answered by `backend`: an object with .name, .completions(body) and .chat(body) ->
    answer dict (BadRequest -> 400). Port 0 picks a free port (server.server_port).
    api_key: requests must bring it as "Authorization: Bearer KEY" (else 401). Run it with
    serve_forever(), e.g. in a thread."""
    server = _Server((host, port), _Handler)
    server.teacher = backend
    server.api_key = api_key
    server.max_body_bytes = max_body_bytes
    return server


def make_server(model, tokenizer, host="127.0.0.1", port=0, model_name="tuna-local", seed=None, api_key=None,
                max_body_bytes=MAX_BODY_BYTES):
    """backend_server over a model.py model: /v1/completions, /v1/chat/completions and
    /v1/models."""
    backend = LocalTeacher(model, tokenizer, model_name, seed)
    return backend_server(backend, host, port, api_key, max_body_bytes)


def stop_on_signals(server):
    """SIGINT or SIGTERM: the server's serve_forever() returns (server.shutdown(), from a thread of its own
    since it waits for serve_forever). Nothing is raised inside the loop, whatever it was doing. Returns the
    list that receives the signal's name."""
    received = []

    def stop(signum, frame):
        received.append(signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, daemon=True).start()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    return received


# ---- 4. the command line

def serve(model_dir, host="127.0.0.1", port=8000, tokenizer_path=None, model_name=None, device="cpu",
          seed=None, api_key_env=None, max_body_bytes=MAX_BODY_BYTES):
    """python server.py: the checkpoint behind the OpenAI routes until SIGINT or SIGTERM.
    A host other than loopback needs an API key (the variable api_key_env names), as
    anyone who reaches the port may use it."""
    api_key = os.environ.get(api_key_env) if api_key_env else None
    if api_key_env and not api_key:
        raise ValueError(f"--api-key-env {api_key_env}: the environment variable {api_key_env} is not set")
    if api_key is None and not _is_loopback(host):
        raise ValueError(f"--host {host} serves anyone who can reach the port: give an API key with "
                         "--api-key-env NAME (the key in the environment variable NAME), or serve on "
                         "127.0.0.1")
    model = load_checkpoint(model_dir, device=device, dtype=torch.float32 if device == "cpu" else None)
    name = model_name or os.path.basename(os.path.normpath(model_dir))
    server = make_server(model, Tokenizer(tokenizer_path or model_dir), host, port, name, seed, api_key,
                         max_body_bytes)
    received = stop_on_signals(server)
    print(f"serving {model_dir} as model '{name}' at http://{host}:{server.server_port}/v1"
          + (f" (API key from ${api_key_env})" if api_key else ""), flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    print(f"server.py: stopped ({', '.join(received)})", flush=True)
    return 0


def _is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return host == "localhost"



def main(argv=None):
    description = "OpenAI-compatible server over a model.py checkpoint"
    parser = argparse.ArgumentParser(prog="server.py", description=description)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (Hugging Face or Meta layout)")
    parser.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json (default: the one in "
                        "--checkpoint)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="model name in answers (default: the checkpoint folder's name)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, help="requests without a seed sample reproducibly from (SEED, "
                        "the request)")
    parser.add_argument("--api-key-env", help="environment variable holding the API key that requests must "
                        "bring (Authorization: Bearer KEY); needed for a --host other than loopback")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies "
                        f"get HTTP 413 (default {MAX_BODY_BYTES})")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    try:
        return serve(args.checkpoint, args.host, args.port, args.tokenizer, args.model_name, args.device,
                     args.seed, args.api_key_env, args.max_body_bytes)
    # each names its file
    except (OSError, ValueError) as e:
        parser.exit(1, "server.py: error: " + " ".join(str(e).split()) + "\n")


if __name__ == "__main__":
    sys.exit(main())
