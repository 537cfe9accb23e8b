"""Alpaca prompt, training examples and the data files of the Tuna pipeline.

No model and no tokenizer here (tokenizer.py; encode_prompt_response takes any tokenizer object): the
teacher, the evaluation and the training loop all read and write data through this file. Every reader
validates what it reads and fails with a DataError that names the file, the line (JSONL) or record index
(JSON) and the field, never with a bare traceback from deep inside. The files a long run appends to and a
kill may cut short have their own helpers: one atomic write (write_atomic), one tolerant log reader and
appender (read_jsonl_log, append_jsonl), one output lock.

    import data
    prompt = data.alpaca_prompt("Name a color.")               # the Stanford Alpaca template
    records = data.read_ranked_jsonl("ranked.jsonl")           # DataError: file, line and field of a problem
"""
import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import re
import stat
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field


class DataError(ValueError):
    """Bad input data; the message names the file, the line (1-based) or record index
    (0-based, in a JSON list), and the field: "alpaca.json, record 3, field 'output':
    empty"."""


# ---- 1. prompt and examples

# The Stanford Alpaca template, both variants (LMOps tuna/src/train_tuna.py, PROMPT_DICT).
# The response follows "### Response:" directly, with no space or newline, exactly as
# Alpaca's and Tuna's training code.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    # Alpaca picks the variant by `input != ""`. format() parses only the template, so
    # braces in the instruction or input are kept as they are.
    template = PROMPT_WITH_INPUT if input != "" else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input)


def _count_prompt_tokens(tok, full_ids: list[int], prompt: str, full_text: str) -> int:
    """How many leading tokens of the tokenized prompt+response hold prompt text only.

    Usually the prompt's own tokens are a prefix of the full tokenization. At the seam
    they can differ: a piece may span the last prompt characters and the first response
    characters ("...word banan" + "a." -> "▁banana"), or the prompt's last word may be
    split differently. We then walk the full tokenization's pieces by byte length: a token
    that holds any response byte belongs to the response (it is trained on), so no
    response text is ever masked; the prompt ids then decode to the prompt minus its last
    few characters.
"""
    prompt_ids = tok.encode(prompt)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return len(prompt_ids)
    ends = []
    total = 0
    for token_id in full_ids:
        total += len(tok.piece_bytes(token_id))
        ends.append(total)
    text_bytes = len(full_text.encode("utf-8"))
    # identity normalization (LLaMA, BPE), +1: a dummy prefix "▁"
    if total in (text_bytes, text_bytes + 1):
        boundary = len(prompt.encode("utf-8")) + (total - text_bytes)
        return sum(1 for end in ends if end <= boundary)
    # Another normalization (e.g. NFKC) or an unknown piece changed the length: fall back
    # to the longest common prefix of the two tokenizations (commonprefix works on any
    # lists).
    return len(os.path.commonprefix([full_ids, prompt_ids]))


def encode_prompt_response(tok, prompt: str, response: str, max_len: int = 512, finished: bool = True):
    """(prompt ids starting with BOS (if the tokenizer has one), response ids ending in EOS), or None.

    tok: any tokenizer with encode(text), prefix_ids(), piece_bytes(id) and eos_id, as tokenizer.py's
    Tokenizer.

    One tokenization of BOS + prompt + response + EOS, as Alpaca's train.py (its
    preprocess), split where the prompt text ends (see _count_prompt_tokens). Longer than
    max_len: the sequence is cut on the right like Alpaca's `truncation=True`, so a
    truncated response loses its EOS (we do not teach the model to stop mid-sentence).
    finished=False is a response that a token limit cut when it was generated: no EOS
    either, for the same reason. None when not even one response token fits: the caller
    counts and reports such examples instead of training on an all-masked row.
"""
    full_ids = tok.encode(prompt + response)
    n_prompt = _count_prompt_tokens(tok, full_ids, prompt, prompt + response)
    # BOS where the checkpoint's tokenizer has it
    prompt_ids = tok.prefix_ids() + full_ids[:n_prompt]
    response_ids = full_ids[n_prompt:] + ([tok.eos_id] if finished else [])
    room = max_len - len(prompt_ids)
    if room < 1 or not response_ids:
        return None
    return prompt_ids, response_ids[:room]


# ---- 2. records and files

@dataclass
class RankedRecord:
    """One instruction with its candidate responses, best first: the project's ranked-record format.

    On disk (read_ranked_jsonl / write_ranked_jsonl) a ranked file is UTF-8 JSONL, one record a
    line, one JSON object per record with these keys:
      "id"          string, unique in the file
      "prompt"      string, the exact Alpaca-formatted prompt the student conditions on
      "candidates"  list of at least 2 non-empty strings, best first
      "instruction", "input"  strings, the prompt's parts where known (else "")
      "scores"      null or a list of finite numbers parallel to "candidates" (for probabilistic
                    ranking the teacher's mean token log-probability; only the order is trained on)
      "source"      object, the audit trail: {"kind": "probabilistic" | "contextual" | "authors",
                    "teacher": ..., "raw_reply": ..., "ranks": [...], ...}; its optional "unfinished"
                    lists the positions (in "candidates") of responses a token limit cut when they were
                    generated: they are trained without EOS (encode_prompt_response, finished=False)
    Unknown keys are refused, so a typo cannot silently drop a field. Blank lines are skipped.
"""
    id: str
    prompt: str
    candidates: list[str]
    instruction: str = ""
    input: str = ""
    scores: list[float] | None = None
    source: dict = field(default_factory=dict)


def _fail(path, where, field_name, problem):
    at = f"{path}, {where}" + (f", field '{field_name}'" if field_name else "")
    return DataError(f"{at}: {problem}")


def _check_text(value, path, where, name, allow_empty=False):
    if not isinstance(value, str):
        raise _fail(path, where, name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _fail(path, where, name, "empty")
    return value


def _check_texts(value, path, where, name, min_count, max_count=None):
    if not isinstance(value, list):
        raise _fail(path, where, name, f"expected a list of strings, got {type(value).__name__}")
    if len(value) < min_count:
        raise _fail(path, where, name, f"{len(value)} candidate(s), a ranking needs at least {min_count}")
    if max_count is not None and len(value) > max_count:
        raise _fail(path, where, name, f"{len(value)} candidates, more than the {max_count} a record "
                    "may hold for training")
    for k, text in enumerate(value):
        if not isinstance(text, str) or not text.strip():
            raise _fail(path, where, f"{name}[{k}]", "empty response" if isinstance(text, str)
                        else f"expected a string, got {type(text).__name__}")
    return value


def _check_scores(value, n_candidates, path, where, name):
    if not isinstance(value, list):
        raise _fail(path, where, name, f"expected a list of numbers, got {type(value).__name__}")
    if len(value) != n_candidates:
        raise _fail(path, where, name, f"{len(value)} scores for {n_candidates} candidates")
    for k, score in enumerate(value):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise _fail(path, where, f"{name}[{k}]", f"expected a finite number, got {score!r}")
    return [float(s) for s in value]


def _require(obj, keys, path, where):
    if not isinstance(obj, dict):
        raise _fail(path, where, None, f"expected a JSON object, got {type(obj).__name__}")
    for key in keys:
        if key not in obj:
            raise _fail(path, where, key, "missing")


def _ranked_record_from_dict(obj, path, where, max_candidates=None) -> RankedRecord:
    _require(obj, ("id", "prompt", "candidates"), path, where)
    unknown = sorted(set(obj) - {"id", "prompt", "candidates", "instruction", "input", "scores", "source"})
    if unknown:
        raise _fail(path, where, unknown[0], f"unknown field(s) {unknown}")
    candidates = _check_texts(obj["candidates"], path, where, "candidates", 2, max_candidates)
    scores = obj.get("scores")
    if scores is not None:
        scores = _check_scores(scores, len(candidates), path, where, "scores")
    source = obj.get("source", {})
    if not isinstance(source, dict):
        raise _fail(path, where, "source", f"expected an object, got {type(source).__name__}")
    unfinished = source.get("unfinished", [])
    if not isinstance(unfinished, list) or len(set(map(str, unfinished))) != len(unfinished) or not all(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(candidates) for k in unfinished):
        raise _fail(path, where, "source.unfinished",
                    f"expected distinct candidate positions 0..{len(candidates) - 1}, got {unfinished!r}")
    return RankedRecord(
        id=_check_text(obj["id"], path, where, "id"),
        prompt=_check_text(obj["prompt"], path, where, "prompt"),
        candidates=list(candidates),
        instruction=_check_text(obj.get("instruction", ""), path, where, "instruction", allow_empty=True),
        input=_check_text(obj.get("input", ""), path, where, "input", allow_empty=True),
        scores=scores,
        source=source,
    )


def _check_unique_id(seen: dict, record_id, path, where):
    if record_id in seen:
        raise _fail(path, where, "id", f"duplicate id {record_id!r} (first at {seen[record_id]})")
    seen[record_id] = where


# Python's JSON reader recurses once per level of nesting: past the interpreter's recursion limit (about 1,000
# levels) a file would be a RecursionError. No data file of the project nests more than a few levels.
NESTED_TOO_DEEP = "JSON nested too deep (deeper than Python's JSON reader allows)"


def iter_jsonl(path):
    """Yield (line number, parsed object) for each non-blank line of a UTF-8 JSONL file."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _fail(path, f"line {line_no}", None, f"not UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"malformed JSON: {e.msg}, column {e.colno}"
                raise _fail(path, f"line {line_no}", None, problem) from None
            except RecursionError:
                raise _fail(path, f"line {line_no}", None, NESTED_TOO_DEEP) from None
            yield line_no, obj


def _read_json(path, expected_type, what):
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            problem = f"malformed JSON: {e.msg}, column {e.colno}"
            raise _fail(path, f"line {e.lineno}", None, problem) from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except RecursionError:
            raise DataError(f"{path}: {NESTED_TOO_DEEP}") from None
    if not isinstance(data, expected_type):
        raise DataError(f"{path}: expected {what}, got {type(data).__name__}")
    return data


def _read_json_list(path) -> list:
    return _read_json(path, list, "a JSON list of records")


def read_alpaca(path) -> list[dict]:
    """Alpaca's JSON list of {instruction, input, output}; "input" may be absent (read as "")."""
    examples = []
    for i, obj in enumerate(_read_json_list(path)):
        where = f"record {i}"
        _require(obj, ("instruction", "output"), path, where)
        examples.append({
            "instruction": _check_text(obj["instruction"], path, where, "instruction"),
            "input": _check_text(obj.get("input", ""), path, where, "input", allow_empty=True),
            "output": _check_text(obj["output"], path, where, "output"),
        })
    return examples


def read_authors_ranking(path, skipped=None, max_candidates=None) -> list[RankedRecord]:
    """The authors' ranking release: JSON list of {instruction (already templated), id,
    output: [str], score: [float]}. Candidates are sorted by score, highest first, ties
    kept in file order (a stable sort, as the authors' code); source["ranks"] keeps the
    original positions, best first.

    skipped: a list to receive one message per record left out because of its content (an
    empty output, a non-finite score), so that one bad record among 52K does not stop a
    run; the caller reports them. Without it such a record raises, as does anything that
    is not the release's shape. max_candidates: more outputs in a record are refused by name."""
    records = []
    seen = {}
    for i, obj in enumerate(_read_json_list(path)):
        where = f"record {i}"
        _require(obj, ("instruction", "id", "output", "score"), path, where)
        record_id = obj["id"]
        if isinstance(record_id, bool) or not isinstance(record_id, (int, str)) or str(record_id) == "":
            raise _fail(path, where, "id", f"expected a non-empty string or an integer, got {record_id!r}")
        _check_unique_id(seen, str(record_id), path, where)
        try:
            outputs = _check_texts(obj["output"], path, where, "output", 2, max_candidates)
            scores = _check_scores(obj["score"], len(outputs), path, where, "score")
        except DataError as e:
            outputs = obj["output"]
            scores = obj["score"]
            empty = isinstance(outputs, list) and any(isinstance(x, str) and not x.strip() for x in outputs)
            infinite = isinstance(scores, list) and any(
                isinstance(x, float) and not math.isfinite(x) for x in scores)
            # a wrong shape is no release file: stop
            if skipped is None or not (empty or infinite):
                raise
            skipped.append(f"{e} (id {record_id!r}): record skipped")
            continue
        order = sorted(range(len(outputs)), key=lambda k: scores[k], reverse=True)
        records.append(RankedRecord(
            id=str(record_id),
            prompt=_check_text(obj["instruction"], path, where, "instruction"),
            candidates=[outputs[k] for k in order],
            scores=[scores[k] for k in order],
            source={"kind": "authors", "ranks": order},
        ))
    return records


def read_ranked_jsonl(path, max_candidates=None) -> list[RankedRecord]:
    """The project's ranked JSONL (format in RankedRecord's docstring); max_candidates: a record
    of more is refused by name (training's limit, tuna.MAX_CANDIDATES)."""
    records = []
    seen = {}
    for line_no, obj in iter_jsonl(path):
        where = f"line {line_no}"
        record = _ranked_record_from_dict(obj, path, where, max_candidates)
        _check_unique_id(seen, record.id, path, where)
        records.append(record)
    return records


def write_ranked_jsonl(path, records) -> None:
    """Write records as ranked JSONL atomically (write_atomic): a bad record leaves the old file as it was."""
    def lines():
        seen = {}
        for i, record in enumerate(records):
            where = f"record {i}"
            if not isinstance(record, RankedRecord):
                raise _fail(path, where, None, f"expected a RankedRecord, got {type(record).__name__}")
            obj = asdict(record)
            # as read
            _check_unique_id(seen, _ranked_record_from_dict(obj, path, where).id, path, where)
            try:
                yield json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n"
            except (TypeError, ValueError) as e:
                raise _fail(path, where, "source", f"not JSON-serialisable ({e})") from None
    write_atomic(path, lines())


# ---- 3. files a kill may interrupt

# when this process began, near enough (its scripts import data.py first thing): a temporary
# file of write_atomic's older than that is no write of this process's
PROCESS_STARTED = time.time()


def write_atomic(path, text):
    """Write text (a string, or an iterable of strings written one by one) to path as
    UTF-8, through a temporary file in the same folder and a rename: a kill or an error
    leaves the old file or the new one, never half of one; the temporary file a kill left
    is removed by the next write of the same path (remove_killed_temporaries). The
    project's one way to replace a file."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    remove_killed_temporaries(folder, os.path.basename(path))
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # mkstemp makes it private (0600); a data file is meant to be shared
            os.fchmod(fd, 0o644)
            f.writelines([text] if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def remove_killed_temporaries(folder, name):
    """Remove the temporary files of write_atomic's for folder/name (NAME.<8 characters>.tmp,
    mkstemp's names) that a killed write left: plain files older than this process. No live
    write owns one: this process's own are younger, and one process at a time writes an
    output (lock_output)."""
    own_name = re.compile(re.escape(name) + r"\.[a-z0-9_]{8}\.tmp")
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return  # no folder to write in: mkstemp names it
    for entry in entries:
        if not (own_name.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)):
            continue
        if entry.stat(follow_symlinks=False).st_mtime < PROCESS_STARTED:
            # another process's write of the same path may have cleared it first
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path)


def read_jsonl_log(path, skipped=None):
    """(byte offset, record) for each line of an append-only JSONL log (a cache, metrics,
    finished answers) that a kill may have cut short: a line that is not a whole JSON
    object is passed to skipped(message) and left out, never an error. A missing file
    holds no records. The project's one way to read such a file (data files are read
    strictly, with iter_jsonl)."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        offset = 0
        for line_no, line in enumerate(f, start=1):
            try:
                record = json.loads(line.decode("utf-8")) if line.strip() else None
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                record = False
            if isinstance(record, dict):
                yield offset, record
            elif record is not None and skipped:
                skipped(f"{path}, line {line_no}: malformed JSON line (one cut short by a kill?), skipped")
            offset += len(line)


def append_jsonl(path, records):
    """Append records to a JSONL log, one line each, and close the file, so each line
    survives a kill of this process. A last line cut short by an earlier kill is ended
    first, so the new line stands on its own. Returns the byte offset where the first new
    line starts."""
    with open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                end += f.write(b"\n")
        f.write(b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records))
    return end


# ---- 4. outputs: apart from the inputs, one writer each

def refuse_output_over_inputs(out, inputs):
    """A DataError naming both paths when the output `out` is an input, lies inside one or holds
    one (compared after resolving symlinks and `..`), before anything is written: replacing or
    filling such an output would destroy what the command reads (`tuna.py sft --init ck --out ck
    --overwrite` once removed its own starting checkpoint). inputs: {name the user knows it by,
    e.g. "--init": path or None}."""
    output = os.path.realpath(out)
    for name, path in inputs.items():
        if path is None:
            continue
        source = os.path.realpath(path)
        if output == source:
            relation = "is"
        elif os.path.commonpath([output, source]) == source:
            relation = "is inside"
        elif os.path.commonpath([output, source]) == output:
            relation = "holds"
        else:
            continue
        raise DataError(f"the output {out} {relation} {name} {path}: an output must lie apart from "
                        "the inputs; choose another")


class OutputLocked(RuntimeError):
    """Another live process is writing the same output."""


@contextlib.contextmanager
def lock_output(path):
    """Hold PATH.lock while writing PATH (a file or a folder): one writer per output. A
    second process refuses at once, naming the first (its pid and command line are in the
    lock file). The lock is an fcntl.flock, which the OS drops when its holder dies, so a
    killed run never blocks the next; the lock file itself stays (deleting it could let
    two processes hold two different files)."""
    import fcntl  # POSIX only; imported here so that data.py still imports elsewhere
    lock_path = str(path).rstrip("/") + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    fd = _open_lock_file(lock_path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "pid unknown"
        os.close(fd)
        raise OutputLocked(f"{path} is being written by another process ({holder}); wait for it to end "
                           "or stop it, then run again") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)}\n".encode("utf-8"), 0)
        yield lock_path
    finally:
        os.close(fd)  # closing the descriptor drops the lock


def _open_lock_file(lock_path):
    """The lock file, opened for writing (created if absent) only if it is a plain file: the lock
    truncates it, so a symlink is never followed (O_NOFOLLOW: a link to another file would lose that
    file's content, a dangling one would create its target) and a folder or FIFO is refused by name."""
    refusal = DataError(f"{lock_path}: not a plain file (a symlink, folder, FIFO or device); the lock file "
                        "must be one: remove it, then run again")
    try:
        # O_NONBLOCK: opening a FIFO or a device never waits
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        # ELOOP: a symlink (O_NOFOLLOW); EISDIR: a folder
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise refusal from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refusal
    return fd


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- 5. progress of long work

def duration_text(seconds):
    """H:MM:SS (hours beyond 24 kept), the form of every ETA the project prints."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# lines a long phase prints: one every 5% of it
PROGRESS_LINES = 20


class Progress:
    """One line every 5% of a long phase, and at its end, in training's form:
    "teacher requests 2600/52002 | 3.12 items/s | 4 failed | ETA 4:37:40 | <detail()>".
    Made when the work begins (the rate's clock starts then); write: where lines go
    (default stderr); detail: more to say at the end of each line. Thread-safe: workers
    may call advance() at once."""

    def __init__(self, what, total, write=None, detail=None):
        self.what = what
        self.total = total
        self.detail = detail
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.step = max(1, math.ceil(total / PROGRESS_LINES))
        self.done = 0
        self.failed = 0
        self.began = time.monotonic()
        self.lock = threading.Lock()

    def advance(self, count=1, failed=0):
        with self.lock:
            before = self.done
            self.done += count
            self.failed += failed
            next_step = self.done // self.step > before // self.step
            finished = self.done >= self.total > before
            if not (next_step or finished):
                return
            # a line is written only after done has grown: the rate is above 0
            elapsed = max(time.monotonic() - self.began, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate
            line = (f"{self.what} {self.done}/{self.total} | {rate:.2f} items/s "
                    f"| {self.failed} failed | ETA {duration_text(eta)}")
            if self.detail:
                line += f" | {self.detail()}"
            self.write(line)


# ---- 6. command-line values

def rows_option(text):
    """argparse type of a rows-per-batch option: "auto" (sized from free device memory) or a number >= 1."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a whole number of at least 1")
    return int(text)


def add_cost_arguments(parser, dry_run_help):
    """--dry-run and what its report of paid work needs: the tokenizer that counts prompt tokens and the
    prices (teacher.py's two kinds, tuna.py pipeline and eval.py's judge share them)."""
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    parser.add_argument("--count-tokenizer", help="--dry-run: count prompt tokens with this tokenizer (a "
                        "folder or file tokenizer.Tokenizer reads; default: estimated at 4 characters a "
                        "token)")
    parser.add_argument("--price-per-1m-input", type=float, help="--dry-run: dollars per 1M prompt tokens")
    parser.add_argument("--price-per-1m-output", type=float,
                        help="--dry-run: dollars per 1M completion tokens")


# ---- 7. generate once and keep it

class KeptLog:
    """Results generated once and kept in an append-only JSONL log (student samples, eval answers), each
    line keyed by what made it (the model's identity, the settings, the prompt). keys: {item id: the key
    it would be made under now}; key_of(line): the key a line was made under, None for a line that is
    no result. A line made otherwise is never reused: it stays in the file, and its item is made again.
    kept: {item id: its line} of the items the log holds; made_otherwise: ids held under another key."""

    def __init__(self, path, keys, key_of, skipped=None):
        self.path = path
        held = {}
        for _, line in read_jsonl_log(path, skipped):
            key = key_of(line)
            if key is not None and "id" in line:
                held[line["id"], key] = line
        self.kept = {item_id: held[item_id, key] for item_id, key in keys.items() if (item_id, key) in held}
        held_ids = {item_id for item_id, _ in held}
        self.made_otherwise = held_ids - set(self.kept)

    def keep(self, lines):
        """Append newly made results as they finish: a kill loses none of them."""
        append_jsonl(self.path, lines)
