"""A raw-HTTP client for OpenAI-compatible APIs: POST /completions and /chat/completions of any
such server (OpenAI, vLLM, llama.cpp, `python server.py`) with `requests` only.

Nothing lost, nothing paid twice: every answer is appended to a JSONL cache keyed by the request's
content (path + body, never the API key), so a killed run starts again where it stopped; timeouts,
dropped connections, 429 and 5xx are retried with exponential back-off (or as long as the server's
Retry-After says); an optional rate limit spaces requests; a pre-flight request checks the server,
the key, the model and the options a run needs before any long or paid work; a server that no
request reaches stops the run at once (RunError). map() runs a function over items on a bounded
thread pool with progress lines; counts and report() say what was sent, retried and cached.

Copy with it: data.py (the kill-tolerant JSONL log and the progress lines).
"""
import concurrent.futures
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
import urllib.parse

import requests

import data

# one logger for what is said about the teacher's requests (retries, progress), as teacher.py's
log = logging.getLogger("teacher")


# ---- 1. the client: a cache, sending with retries, the pre-flight check, a pool of workers

class TeacherError(RuntimeError):
    """A request that failed for good, or an answer without a needed field; names the URL,
    never the API key. status: the HTTP status of a refused request (4xx), else None."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class RunError(TeacherError):
    """A problem of the whole run, not of one item (no request reaches the server, every
    item failed, the server refuses a feature the run needs): the command stops, says so
    in one line and exits non-zero."""


# the pre-flight request's whole prompt
PREFLIGHT_TEXT = "This is a connection check. Reply with OK."


class TeacherClient:
    """One teacher: the server at base_url (e.g. https://api.openai.com/v1) and the model
    named in every request, its API key read from the environment variable api_key_env,
    its answers cached in cache_path (JSONL; None: in memory only)."""

    def __init__(self, base_url, model, api_key_env="OPENAI_API_KEY", cache_path=None, timeout=60.0,
                 max_retries=6, max_workers=4, requests_per_minute=None, backoff=1.0, max_backoff=60.0):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self._api_key = read_api_key(api_key_env)
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_workers = max_workers
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next_slot = 0.0
        self._lock = threading.Lock()
        # any HTTP answer yet; the RunError that stops all threads
        self._reached, self._stopped = False, None
        self.counts = dict(requests=0, retries=0, requests_failed=0, cache_hits=0, prompt_tokens=0,
                           completion_tokens=0, preflight_requests=0)
        # key -> byte offset of its line in cache_path (answers stay on disk: 52K of them
        # would not fit in RAM), or -> the answer itself when there is no cache file
        self.cache_path = cache_path
        self._cache = {}
        # the last line of a killed run may be cut short: its request is sent again
        if cache_path:
            for offset, entry in data.read_jsonl_log(cache_path, log.warning):
                self._cache[entry.get("key")] = offset

    def chat(self, messages, cache_only=False, **params):
        return self.request("/chat/completions", {"messages": messages, **params}, cache_only=cache_only)

    def complete(self, prompt, cache_only=False, **params):
        return self.request("/completions", {"prompt": prompt, **params}, cache_only=cache_only)

    def request(self, path, params, cache_only=False):
        """post() with this client's model in the body."""
        return self.post(path, {"model": self.model, **params}, cache_only=cache_only)

    def post(self, path, body, cache_only=False):
        """The answer (a dict) to POST base_url + path with a JSON body: from the cache,
        else from the server (None if cache_only and not cached)."""
        url = self.base_url + path
        key = self._key(path, body)
        with self._lock:
            where = self._cache.get(key)
            self.counts["cache_hits"] += where is not None
        if where is not None:
            if isinstance(where, dict):
                return where
            with open(self.cache_path, "rb") as f:
                f.seek(where)
                return json.loads(f.readline())["response"]
        if cache_only:
            return None
        answer = self._send(url, body)
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        entry = {"key": key, "path": path, "request": body, "response": answer}
        line = json.dumps(entry, ensure_ascii=False)
        # the server put the key into its answer: keep it out of every file
        if self._redact(line) != line:
            entry = json.loads(self._redact(line))
            answer = entry["response"]
        with self._lock:
            for name in ("prompt_tokens", "completion_tokens"):
                self.counts[name] += usage.get(name) if isinstance(usage.get(name), int) else 0
            # with a cache file, the offset of the answer's line; else the answer itself
            if self.cache_path:
                self._cache[key] = data.append_jsonl(self.cache_path, [entry])
            else:
                self._cache[key] = answer
        return answer

    # the request's content: the URL's path and the body, never the key
    def _key(self, path, body):
        request = [urllib.parse.urlparse(self.base_url + path).path, body]
        content = json.dumps(request, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(content.encode()).hexdigest()

    def is_cached(self, path, params):
        """Whether the answer to request(path, params) is in the cache (paid for already);
        sends nothing."""
        with self._lock:
            return self._key(path, {"model": self.model, **params}) in self._cache

    def check(self, chat, refused_hints=None, **options):
        """The pre-flight request: one answer of 1 token from the endpoint the run needs
        (chat or completions), with the options it needs (logprobs, echo), before any long
        or paid work. Not cached. An unreachable server, a refused key, an unknown model
        or option, or an answer without the fields the run reads stop the run (RunError
        naming the URL and the model); an answer without an option's field names the
        option the server ignored, and what works instead (WHAT_WORKS). refused_hints:
        {option: what to do instead}, said when the server refuses that option (HTTP 400
        naming it) or ignores it. Returns the answer."""
        path = "/chat/completions" if chat else "/completions"
        message = {"role": "user", "content": PREFLIGHT_TEXT}
        asked = dict(messages=[message]) if chat else dict(prompt=PREFLIGHT_TEXT)
        body = {"model": self.model, **asked, "max_tokens": 1, **options}
        # the error names the URL
        where = f"pre-flight check of model '{self.model}'"
        sent_before = self.counts["requests"]
        try:
            # a check, not a wait
            answer = self._send(self.base_url + path, body, max_retries=min(self.max_retries, 2))
            ignored = ignored_options(answer, self.base_url + path, chat, options)
        except TeacherError as e:
            check_key = f"; check the key in ${self.api_key_env}"
            hints = {401: check_key + ("" if self._api_key else " (not set)"), 403: check_key,
                     404: f"; check --base-url, and the model's name (GET {self.base_url}/models lists them)"}
            hint = hints.get(e.status, "")
            for option, refused_hint in (refused_hints or {}).items():
                if e.status == 400 and options.get(option) and option in str(e).lower():
                    hint = f": {refused_hint}"
            raise RunError(f"{where} failed: {one_line(e)}{hint}") from None
        finally:  # counted apart from the run's requests
            self.counts["preflight_requests"] += self.counts["requests"] - sent_before
            self.counts["requests"] = sent_before
        if ignored:
            # the option's own field first: what the server left out
            names = ", ".join(f"'{option}'" for option in ignored)
            hints = dict(WHAT_WORKS, **(refused_hints or {}))
            what_works = "; ".join(hints[option] for option in ignored)
            raise RunError(f"{where} failed: {next(iter(ignored.values()))}; the server ignored {names}: "
                           f"{what_works}")
        log.info("%s at %s: answered", where, self.base_url + path)
        return answer

    def _send(self, url, body, max_retries=None):
        max_retries = self.max_retries if max_retries is None else max_retries
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        for attempt in range(max_retries + 1):
            # another thread found that no request can reach the server
            if self._stopped:
                raise self._stopped
            self._wait_for_rate_limit()
            with self._lock:
                self.counts["requests"] += 1
            retry_after, unreached = None, None
            try:
                reply = requests.post(url, json=body, headers=headers, timeout=self.timeout)
            except (requests.Timeout, requests.ConnectionError,
                    requests.exceptions.ChunkedEncodingError) as e:
                problem = f"{type(e).__name__}: {e}"
                unreached = _unreached(e) if not self._reached else None
                # unknown host, TLS: no retry helps
                if unreached and not unreached.startswith("connection"):
                    break
            # the request cannot be sent as it is (a redirect loop, a malformed URL or header):
            # no retry helps, and the message may hold what was sent
            except (requests.RequestException, ValueError) as e:
                self._count_failure()
                raise TeacherError(self._redact(f"POST {url}: {type(e).__name__}: {one_line(e)}")) from None
            else:
                self._reached = True
                if 200 <= reply.status_code < 300:
                    try:
                        answer = reply.json()
                        if isinstance(answer, dict):
                            return answer
                        problem = f"answer is JSON {type(answer).__name__}, not an object"
                    # a cut-short body: usually a proxy or network glitch, so retried
                    except ValueError:
                        problem = f"malformed JSON in the answer ({len(reply.content)} bytes)"
                elif reply.status_code == 429 or reply.status_code >= 500:
                    problem = f"HTTP {reply.status_code}: {_server_message(reply, self._redact)}"
                    retry_after = _retry_after_seconds(reply.headers.get("Retry-After"))
                # other 4xx: the request itself is wrong, asking again cannot help
                else:
                    self._count_failure()
                    message = f"POST {url}: HTTP {reply.status_code}: {_server_message(reply, self._redact)}"
                    raise TeacherError(self._redact(message), reply.status_code)
            if attempt == max_retries:
                break
            # exponential back-off with jitter, unless the server said how long to wait (at
            # most max_backoff: a run does not wait a day on a header)
            backoff = min(self.max_backoff, self.backoff * 2 ** attempt)
            delay = backoff * random.uniform(0.5, 1.5)
            if retry_after is not None:
                delay = min(retry_after, self.max_backoff)
            with self._lock:
                self.counts["retries"] += 1
            log.warning(self._redact(f"POST {url}: {problem}; retry {attempt + 1}/{max_retries} in "
                                     f"{delay:.1f}s"))
            time.sleep(delay)
        self._count_failure()
        if unreached and not self._reached:
            raise self.stop(RunError(self._redact(f"no request reached {url}: {unreached}; check --base-url "
                                                  "and that the server is running")))
        raise TeacherError(self._redact(f"POST {url}: gave up after {max_retries + 1} attempts: "
                                        f"{problem}"))

    def stop(self, error):
        """Make every later request of every thread raise `error` (a RunError), as the
        caller does."""
        with self._lock:
            self._stopped = self._stopped or error
        return self._stopped

    def _count_failure(self):
        with self._lock:
            self.counts["requests_failed"] += 1

    def _wait_for_rate_limit(self):
        if not self._interval:
            return
        # each request takes the next free slot, interval seconds after the previous one
        with self._lock:
            now = time.monotonic()
            start = self._next_slot = max(now, self._next_slot)
            self._next_slot += self._interval
        time.sleep(start - now)

    # servers echo keys back in error messages ("Incorrect API key provided: ..."), as
    # written or escaped (in JSON, in a repr)
    def _redact(self, text):
        # a key of 1-3 characters would blank out ordinary text
        if not self._api_key or len(self._api_key) < 4:
            return text
        for written in {self._api_key, json.dumps(self._api_key)[1:-1], repr(self._api_key)[1:-1]}:
            text = text.replace(written, "***")
        return text

    def map(self, fn, items, what="teacher requests", failed=lambda result: False):
        """fn over items on a bounded thread pool, results in order; a progress line every
        5% (data.Progress: done/total, rate, failed(result) so far, ETA) with the
        requests, cache hits and tokens so far."""
        results = []
        progress = data.Progress(what, len(items), log.info, detail=self.report)
        pool = concurrent.futures.ThreadPoolExecutor(self.max_workers)
        try:
            for result in pool.map(fn, items):
                results.append(result)
                progress.advance(failed=int(bool(failed(result))))
        # on Ctrl-C, drop the queued items instead of waiting for all of them
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return results

    def report(self):
        c = self.counts
        requests_line = (f"requests {c['requests']} (retries {c['retries']}, "
                         f"failed {c['requests_failed']})")
        tokens = f"tokens {c['prompt_tokens']} prompt + {c['completion_tokens']} completion"
        preflight = f", pre-flight {c['preflight_requests']}" if c["preflight_requests"] else ""
        return f"{requests_line}, cache hits {c['cache_hits']}, {tokens}{preflight}"


# ---- 2. what a failed request or an answer says: masked, bounded, one line

def _unreached(error):
    """How a request failed to reach the server at all (None: it reached it, e.g. a read
    timeout)."""
    if isinstance(error, requests.exceptions.SSLError):
        return f"TLS failure ({one_line(str(error))[-160:]})"
    if not isinstance(error, requests.ConnectionError) or isinstance(error, requests.ReadTimeout):
        return None
    reason = getattr(error.args[0], "reason", None) if error.args else None
    if type(reason).__name__ == "NameResolutionError" or "Name or service not known" in str(error):
        host = urllib.parse.urlparse(error.request.url).hostname if error.request else None
        return f"unknown host {host!r}"
    if type(reason).__name__ in ("NewConnectionError", "ConnectTimeoutError"):
        if "refused" in str(reason):
            return "connection refused"
        return f"connection failed ({one_line(reason)})"
    return None


def one_line(text):
    """text on one line: every run of white space as one space."""
    return " ".join(str(text).split())


def read_api_key(env):
    """The API key in the environment variable `env`, or None when it is unset (a local
    server needs none). A RunError names the variable, never the value, when the key is
    empty or holds anything but printable ASCII without spaces: a key file with Windows
    line ends read by $(cat ...) keeps its "\r", which `requests` would print whole."""
    key = os.environ.get(env)
    if key is None:
        return None
    if not key:
        raise RunError(f"${env} is set but empty: put the API key in it, or unset it for a server "
                       "without keys")
    if not all("!" <= char <= "~" for char in key):
        raise RunError(f"the API key in ${env} holds white space or a control character (or another "
                       "character outside printable ASCII), as a key file with Windows line ends read by "
                       "$(cat ...) does: remove it (the key is not shown)")
    return key


def _server_message(reply, redact):
    """The error message of a refused request, its API key masked before the message is
    cut to 500 characters: a key across the cut would escape the mask."""
    try:
        message = str(reply.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = reply.text or reply.reason
    return redact(message)[:500]


def _retry_after_seconds(value):
    """Retry-After in seconds (a number or an HTTP date), or None when it says nothing
    usable: absent, not a number or a date, not finite, negative."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError, OverflowError):
            return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


# What works instead, when the pre-flight's answer shows that the server ignored an option
# the run needs (transformers serve ignores logprobs and echo); a caller's refused_hints
# say it for its own command line.
WHAT_WORKS = {
    "logprobs": "use a server that returns log-probs: vLLM, llama.cpp's server, `python server.py`, or "
                "OpenAI's completions",
    "echo": "use a server that returns the prompt's tokens with log-probs (echo): vLLM, `python server.py`",
}


def ignored_options(answer, url, chat, options):
    """{option: what its answer lacks} for each option of the pre-flight that the answer
    shows the server ignored: log-probs without their field, echo without the prompt's
    tokens (the check asks 1 token, so an echo has more). A TeacherError when the answer
    lacks its text."""
    get_field(answer, "choices.0.message.content" if chat else "choices.0.text", url)
    fields = {}
    if options.get("logprobs"):
        fields["logprobs"] = "choices.0.logprobs." + ("content" if chat else "token_logprobs")
    if options.get("echo"):
        fields["echo"] = "choices.0.logprobs.text_offset"
    ignored = {}
    for option, field in fields.items():
        try:
            get_field(answer, field, url)
        except TeacherError as e:
            ignored[option] = str(e)
    if "echo" in fields and not ignored:
        tokens = get_field(answer, "choices.0.logprobs.token_logprobs", url)
        if not isinstance(tokens, list) or len(tokens) < 2:
            ignored["echo"] = f"{url}: the answer's log-probs cover no token of the prompt"
    return ignored


def get_field(answer, dotted, url):
    """answer["choices"][0]["text"] for dotted = "choices.0.text", or a TeacherError
    naming URL and field."""
    value = answer
    for key in dotted.split("."):
        try:
            value = value[int(key) if key.isdigit() else key]
        except (KeyError, IndexError, TypeError):
            raise TeacherError(f"{url}: the answer has no field '{dotted}'") from None
    return value

