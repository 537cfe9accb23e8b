"""An OpenAI-compatible server over a model.py checkpoint: /v1/completions (with log-probs and
echo), /v1/chat/completions and /v1/models, for a local teacher, the tests and the demo.

Copy with it: model.py, checkpoint.py, tokenizer.py, data.py.

    python server.py --checkpoint some-llama/ --port 8000     # then --base-url http://127.0.0.1:8000/v1
"""
import argparse
import codecs
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import data
from checkpoint import default_device, load_checkpoint
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


def longest_token_bytes(tok):
    """The most bytes of text that one token covers: its longest piece (an added token's is
    its text; special tokens are never read from text). Text that the tokenizer shortens
    first (NFC, or white space that an added token strips) could hold more a token; real
    prompts stay far below the bound this gives."""
    return max(len(tok.piece_bytes(i)) for i in range(tok.vocab_size))


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
        self.longest_token_bytes = longest_token_bytes(tokenizer)

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

    def _refuse_what_cannot_fit(self, text, param):
        """A BadRequest (OpenAI's context-length 400) for a text longer than the context
        could hold, found from its bytes before it is tokenized: a token covers at most
        the longest token's bytes. The exact count follows in _run."""
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            message = f"'{param}' is not valid Unicode text (it holds a lone surrogate)"
            raise BadRequest(message, param) from None
        limit = self.model.args.max_seq_len
        if size > limit * self.longest_token_bytes:
            fewest = -(-size // self.longest_token_bytes)
            raise BadRequest(f"This model's maximum context length is {limit} tokens; the prompt has {size} "
                             f"bytes, so at least {fewest} tokens", param, code="context_length_exceeded")

    def _run(self, prompt, n, temperature, top_p, max_tokens, seed, stop, top_k):
        ids = self.tok.encode(prompt, bos=True)
        limit = self.model.args.max_seq_len
        max_tokens = limit - len(ids) if max_tokens is None else max_tokens
        if len(ids) + max(max_tokens, 0) > limit:
            raise BadRequest(f"This model's maximum context length is {limit} tokens; the prompt has "
                             f"{len(ids)} tokens and max_tokens is {max_tokens}", "max_tokens",
                             code="context_length_exceeded")
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
        # what torch.Generator.manual_seed takes
        seed = _option(body, "seed", (int,), default_seed, lambda v: -2 ** 63 <= v < 2 ** 64)
        # the limits they tend to, as float32 sampling would give NaN below them
        temperature = 0.0 if temperature < MIN_TEMPERATURE else float(temperature)
        top_p = max(float(top_p), MIN_TOP_P)
        return dict(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, stop=stop)

    def _default_seed(self, body):
        """serve --seed S: a request without a seed samples from a generator seeded by (S,
        the request), so a run is reproducible whatever the order in which concurrent
        requests arrive."""
        if self.seed is None:
            return None
        request = json.dumps(body, sort_keys=True, ensure_ascii=False)
        # surrogatepass: a lone surrogate (refused later, by its field) hashes too
        digest = hashlib.sha256(f"{self.seed}:{request}".encode("utf-8", "surrogatepass")).digest()
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
        n = sampling["n"]
        if len(prompts) * n > MAX_CHOICES:
            raise BadRequest(f"{len(prompts)} prompts x n={n} = {len(prompts) * n} choices; this server "
                             f"answers at most {MAX_CHOICES} in one request", "n" if n > 1 else "prompt")
        for prompt in prompts:
            self._refuse_what_cannot_fit(prompt, "prompt")
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
        prompt = chat_prompt(messages)
        self._refuse_what_cannot_fit(prompt, "messages")
        ids, _, _, outs = self._run(prompt, top_k=top_k, **sampling)
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

# One request answers at most this many choices (prompts x n): each is a generation.
MAX_CHOICES = 128
# Below these, float32 sampling gives NaN (temperature) or keeps no token (top_p); both
# mean the most likely token, the limit the sampling tends to as they go to 0.
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-6
# deeper JSON is no request of OpenAI's API; Python's json recursion ends near 1000
MAX_JSON_DEPTH = 64


class BadRequest(ValueError):
    """A request the server cannot answer (HTTP 400); param: the body field at fault;
    code: OpenAI's error code, if it has one."""

    def __init__(self, message, param=None, code=None):
        super().__init__(message)
        self.param = param
        self.code = code


def request_body(raw):
    """The request's JSON object from its raw bytes, or a BadRequest: not JSON, not an
    object, nested deeper than MAX_JSON_DEPTH, or a model that is not a string."""
    too_deep = f"The JSON body of your request is nested more than {MAX_JSON_DEPTH} levels deep."
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest(too_deep) from None
    except ValueError:
        raise BadRequest("We could not parse the JSON body of your request.") from None
    if _depth(body) > MAX_JSON_DEPTH:
        raise BadRequest(too_deep)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    if not isinstance(body.get("model"), (str, type(None))):
        raise BadRequest(f"Invalid type for 'model': expected a string, got {type(body['model']).__name__}.",
                         "model")
    return body


def _depth(value):
    """How deep lists and objects nest in a JSON value (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((inner, depth + 1)
                         for inner in (value.values() if isinstance(value, dict) else value))
    return deepest


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
        # said back at most 100 characters long: a value may be megabytes
        raise BadRequest(f"Invalid value for '{name}': {repr(value)[:100]}", name)
    return value


# ---- 3. HTTP: OpenAI's routes, status codes and error bodies

def _error(message, kind="invalid_request_error", param=None, code=None):
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# OpenAI's status codes and error bodies: 401 for a missing or wrong key (read from the
# headers, before the body), 404 model_not_found, 400 invalid_request_error naming the
# field at fault (never a 500 for a bad value: the project's client retries 500s), 413 for
# a body over the limit, 503 server_is_overloaded past a cap (section 4). A listen backlog
# that takes a client's whole thread pool at once, and an API key compared in constant time.
# pending connections the kernel keeps (Python's default of 5 resets the rest)
LISTEN_BACKLOG = 1024
# a ranking request is ~10 KB; a bigger body is refused before it is read
MAX_BODY_BYTES = 8 * 2 ** 20
NO_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header using "
          "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
OVERLOADED = "server_is_overloaded"


class _Handler(BaseHTTPRequestHandler):
    def setup(self):
        super().setup()
        # every read of a request ends at its deadline (section 4), set per request
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self))

    def handle_one_request(self):
        self.deadline = time.monotonic() + self.server.read_timeout
        self.server.mark_waiting(self.connection, True)
        super().handle_one_request()

    def _send(self, status, answer, headers=()):
        try:
            payload = json.dumps(answer, ensure_ascii=False).encode("utf-8")
        # a lone surrogate of the request, said back in an error
        except UnicodeEncodeError:
            payload = json.dumps(answer).encode("ascii")
        # a client that does not read its answer is dropped as well
        self.connection.settimeout(self.server.read_timeout)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers:
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
        except OSError as e:
            self.close_connection = True
            log.debug("%s: the answer was not delivered: %s", self.address_string(), e)

    def _send_unread(self, status, answer, headers=()):
        """An answer to a request whose body stays unread; the connection closes after it.
        What the client still sends is read for a moment (at most LINGER_BYTES) so that it
        reads the answer rather than a reset."""
        self.close_connection = True
        self._send(status, answer, headers)
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.deadline = min(self.deadline, time.monotonic() + LINGER_SECONDS)
            self.rfile.read(LINGER_BYTES)
        except OSError:
            pass

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
        self.server.mark_waiting(self.connection, False)
        refused = self._refused()
        if refused:
            self._send(*refused)
        elif self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.teacher.name, "object": "model",
                                                         "created": 0, "owned_by": "tuna"}]})
        else:
            self._send(404, _error(f"Unknown URL: GET {self.path}", code="unknown_url"))

    def do_POST(self):
        # the headers say all these: the body is not read for them
        refused = self._refused()
        if refused:
            return self._send_unread(*refused)
        try:
            size = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            size = -1
        if size < 0:
            return self._send_unread(400, _error("The Content-Length header is not a number of bytes."))
        limit = self.server.max_body_bytes
        if size > limit:
            message = f"Request body of {size} bytes is over this server's limit of {limit} bytes."
            return self._send_unread(413, _error(message, code="request_too_large"))
        if not self.server.hold_body_bytes(size):
            message = (f"This server holds at most {self.server.max_total_body_bytes} bytes of request "
                       "bodies at once, and more are being read; try again later.")
            overloaded = _error(message, "server_error", code=OVERLOADED)
            return self._send_unread(503, overloaded, [("Retry-After", "1")])
        try:
            raw = self._read_body(size)
            if raw is not None:
                self.server.mark_waiting(self.connection, False)
                self._answer(raw)
        finally:
            self.server.release_body_bytes(size)

    def _read_body(self, size):
        """The body's bytes, or None (the connection dropped, nothing answered) when they
        do not all arrive by the read deadline."""
        try:
            raw = self.rfile.read(size)
        # the deadline, or the client went away
        except OSError:
            raw = b""
        if len(raw) < size:
            self.close_connection = True
            log.debug("%s: dropped after %d of %d body bytes", self.address_string(), len(raw), size)
            return None
        return raw

    def _answer(self, raw):
        teacher = self.server.teacher
        # None: an unknown URL, or an endpoint this backend does not answer
        route = getattr(teacher, ROUTES.get(self.path, ""), None)
        try:
            if route is None:
                return self._send(404, _error(f"Unknown URL: POST {self.path}", code="unknown_url"))
            body = request_body(raw)
            # no model: the served one, as vLLM
            if body.get("model") not in (None, teacher.name):
                unknown = f"The model `{body['model'][:100]}` does not exist or you do not have access to it."
                return self._send(404, _error(unknown, code="model_not_found"))
            self._send(200, route(body))
        except BadRequest as e:
            self._send(400, _error(str(e), param=e.param, code=e.code))
        except Exception as e:  # never crash the server: a 500 the client may retry
            log.exception("POST %s failed", self.path)
            self._send(500, _error(f"Internal error: {type(e).__name__}: {e}", "server_error"))

    def log_message(self, format, *args):
        log.debug("%s " + format, self.address_string(), *args)


# URL -> the backend's method that answers it
ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


# ---- 4. what no client may take: a deadline for each request, capped connections and body bytes

# A request (its line, headers and body) that has not arrived this long after the server
# began to wait for it is dropped, however slowly its bytes trickle: a slow client holds
# no thread for long.
READ_TIMEOUT = 30.0
# Connections served at once, a thread each. Past it, the connection that has waited
# longest for its request (a slow or idle client) is dropped to make room; when every
# connection is being answered, the new one gets 503 with Retry-After (OpenAI's status
# for an overloaded engine; 429 would say that this client sent too much).
MAX_CONNECTIONS = 256
# Bytes of request bodies held at once, over all connections (each body at most
# MAX_BODY_BYTES); past it, 503 with the body unread.
MAX_TOTAL_BODY_BYTES = 64 * 2 ** 20
# A refused request's unread body: what is still read, at most and for at most that long,
# so that its client reads the answer rather than a reset.
LINGER_BYTES, LINGER_SECONDS = 64 * 2 ** 10, 1.0
# How long a new connection past the cap waits for the thread of the connection dropped to
# make room to end (at once, normally: its read ends when the connection is shut down).
DROPPED_THREAD_WAIT = 1.0
# Connections answered 503 past the cap that may linger at once (a file descriptor each);
# the oldest is closed when more come.
MAX_LINGERING = 64


class _DeadlineReader(io.RawIOBase):
    """A connection's bytes, each read bounded by the deadline of the request being read
    (handler.deadline): however slowly a client trickles, its request ends there."""

    def __init__(self, handler):
        self.handler = handler

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the request did not arrive within {self.handler.server.read_timeout:g} s")
        self.handler.connection.settimeout(left)
        return self.handler.connection.recv_into(buffer)


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most max_connections of them, and at most
    max_total_body_bytes of request bodies held at once."""
    request_queue_size = LISTEN_BACKLOG  # socket.listen()'s backlog
    daemon_threads = True

    def __init__(self, address, max_connections, max_total_body_bytes, read_timeout):
        super().__init__(address, _Handler)
        self.max_connections = max_connections
        self.max_total_body_bytes = max_total_body_bytes
        self.read_timeout = read_timeout
        self.lock = threading.Lock()
        self.thread_ended = threading.Condition(self.lock)
        # connection -> since when it waits for (the rest of) its request; None: being answered
        self.connections = {}
        # connections dropped to make room whose threads have not ended yet: they count too
        self.dropping = set()
        self.body_bytes = 0
        # (connection, when to close it) of those answered 503 by the accepting thread
        self.refused = []

    def has_room(self):
        """Whether a thread may start for one more connection (self.lock held)."""
        return len(self.connections) + len(self.dropping) < self.max_connections

    def process_request(self, request, client_address):
        with self.lock:
            admitted = self.has_room()
            if not admitted and self._drop_longest_waiting():
                admitted = self.thread_ended.wait_for(self.has_room, DROPPED_THREAD_WAIT)
            if admitted:
                self.connections[request] = time.monotonic()
        if admitted:
            super().process_request(request, client_address)
        else:
            self._refuse(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.connections.pop(request, None)
                self.dropping.discard(request)
                self.thread_ended.notify_all()

    def _drop_longest_waiting(self):
        """Drop the connection that has waited longest for its request, if any waits
        (self.lock held): its thread's read ends at once, and its place is free when the
        thread has ended."""
        waiting = {connection: since for connection, since in self.connections.items() if since is not None}
        if not waiting:
            return False
        oldest = min(waiting, key=waiting.get)
        del self.connections[oldest]
        self.dropping.add(oldest)
        try:
            oldest.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        log.debug("connection cap (%d) reached: dropped the one waiting longest", self.max_connections)
        return True

    def _refuse(self, request):
        """503 to a connection past the cap, from the accepting thread without waiting; the
        connection closes later (service_actions), once the client has read it."""
        message = (f"This server serves at most {self.max_connections} connections at once, and all are "
                   "being answered; try again later.")
        payload = json.dumps(_error(message, "server_error", code=OVERLOADED)).encode()
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
                f"{len(payload)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.setblocking(False)
            request.send(head + payload)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.refused.append((request, time.monotonic() + LINGER_SECONDS))
        if len(self.refused) > MAX_LINGERING:
            self.refused.pop(0)[0].close()

    def service_actions(self):
        """Between accepts (at least every poll interval): the refused connections read
        what their clients still send, and close at EOF or after LINGER_SECONDS."""
        lingering = []
        for connection, close_at in self.refused:
            try:
                finished = connection.recv(LINGER_BYTES) == b""
            except BlockingIOError:
                finished = False
            except OSError:
                finished = True
            if finished or time.monotonic() > close_at:
                connection.close()
            else:
                lingering.append((connection, close_at))
        self.refused = lingering

    def server_close(self):
        super().server_close()
        for connection, _ in self.refused:
            connection.close()

    def mark_waiting(self, connection, waiting):
        """Say whether a connection waits for its request (it may be dropped to make room)
        or is being answered."""
        with self.lock:
            if connection in self.connections:
                self.connections[connection] = time.monotonic() if waiting else None

    def hold_body_bytes(self, size):
        """Whether `size` more body bytes may be held now (then they count until released)."""
        with self.lock:
            if self.body_bytes + size > self.max_total_body_bytes:
                return False
            self.body_bytes += size
            return True

    def release_body_bytes(self, size):
        with self.lock:
            self.body_bytes -= size

    def handle_error(self, request, client_address):
        # a client that went away is no error of the server's
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("connection from %s: %s", client_address, sys.exc_info()[1])
        else:
            super().handle_error(request, client_address)


def backend_server(backend, host="127.0.0.1", port=0, api_key=None, max_body_bytes=MAX_BODY_BYTES,
                   max_total_body_bytes=MAX_TOTAL_BODY_BYTES, max_connections=MAX_CONNECTIONS,
                   read_timeout=READ_TIMEOUT):
    """A ThreadingHTTPServer (not started) with the OpenAI routes and error bodies,
    answered by `backend`: an object with .name, .completions(body) and .chat(body) ->
    answer dict (BadRequest -> 400). Port 0 picks a free port (server.server_port).
    api_key: requests must bring it as "Authorization: Bearer KEY" (else 401). The caps and
    the read timeout: section 4. Run it with serve_forever(), e.g. in a thread."""
    server = _Server((host, port), max_connections, max_total_body_bytes, read_timeout)
    server.teacher = backend
    server.api_key = api_key
    server.max_body_bytes = max_body_bytes
    return server


def make_server(model, tokenizer, host="127.0.0.1", port=0, model_name="tuna-local", seed=None, api_key=None,
                **limits):
    """backend_server over a model.py model: /v1/completions, /v1/chat/completions and
    /v1/models. limits: backend_server's max_body_bytes, max_total_body_bytes,
    max_connections, read_timeout."""
    backend = LocalTeacher(model, tokenizer, model_name, seed)
    return backend_server(backend, host, port, api_key, **limits)


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


# ---- 5. the command line

def serve(model_dir, host="127.0.0.1", port=8000, tokenizer_path=None, model_name=None, device="cpu",
          seed=None, api_key_env=None, **limits):
    """python server.py: the checkpoint behind the OpenAI routes until SIGINT or SIGTERM.
    A host other than loopback needs an API key (the variable api_key_env names), as
    anyone who reaches the port may use it. limits: backend_server's caps and read timeout."""
    for name, value in limits.items():
        if not 0 < value < float("inf"):
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be a number above 0")
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
                         **limits)
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
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--seed", type=int, help="requests without a seed sample reproducibly from (SEED, "
                        "the request)")
    parser.add_argument("--api-key-env", help="environment variable holding the API key that requests must "
                        "bring (Authorization: Bearer KEY); needed for a --host other than loopback")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies "
                        f"get HTTP 413 (default {MAX_BODY_BYTES})")
    parser.add_argument("--max-total-body-bytes", type=int, default=MAX_TOTAL_BODY_BYTES, help="request "
                        "body bytes held at once; past it HTTP 503, body unread (default "
                        f"{MAX_TOTAL_BODY_BYTES})")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, help="connections served at "
                        "once; past it the one waiting longest for its request is dropped, or, if all are "
                        f"being answered, HTTP 503 (default {MAX_CONNECTIONS})")
    parser.add_argument("--read-timeout", type=float, default=READ_TIMEOUT, help="seconds for a request's "
                        "line, headers and body to arrive; a slower client is dropped (default "
                        f"{READ_TIMEOUT:g})")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    limits = dict(max_body_bytes=args.max_body_bytes, max_total_body_bytes=args.max_total_body_bytes,
                  max_connections=args.max_connections, read_timeout=args.read_timeout)
    try:
        return serve(args.checkpoint, args.host, args.port, args.tokenizer, args.model_name, args.device,
                     args.seed, args.api_key_env, **limits)
    # each names its file
    except (OSError, ValueError) as e:
        parser.exit(1, "server.py: error: " + " ".join(str(e).split()) + "\n")


if __name__ == "__main__":
    sys.exit(main())
