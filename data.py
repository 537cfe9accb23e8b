"""Tokenizer, Alpaca prompt, training examples and the data files of the Tuna pipeline (METHOD.md).

No model here: the teacher, the evaluation and the training loop all read and write data through
this file. Every reader validates what it reads and fails with a DataError that names the file, the
line (JSONL) or record index (JSON) and the field, never with a bare traceback from deep inside.
"""
import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import sentencepiece as spm

# PyTorch's cross_entropy ignores this label by default; being negative it is never a token id.
IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad input data; the message names the file, the line (1-based) or record index (0-based, in a
    JSON list), and the field: "alpaca.json, record 3, field 'output': empty"."""


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """Thin wrapper over a sentencepiece tokenizer.model with LLaMA's conventions.

    encode() is plain sentencepiece, as Meta's llama does it (and transformers' slow LlamaTokenizer
    with legacy=True): text that looks like "</s>" is encoded as text, never as a control token.

    Padding: LLaMA's model has no pad piece (sentencepiece pad_id() == -1, which no embedding can
    look up). Alpaca and Tuna add a "[PAD]" token and resize the embeddings; we do not, so checkpoints
    keep their shapes. We pad with the unknown-piece id (0 in LLaMA) instead: with byte fallback,
    sentencepiece encodes every string without it, so a pad can never be mistaken for text. Not EOS:
    code that masks `ids == pad_id` (Alpaca's collator and Tuna's labels do) would then drop every
    real EOS from the loss and the model would never learn to stop (METHOD.md: the authors added a
    pad token instead). Still, build masks from lengths, not by
    comparing ids with pad_id; labels at padded and prompt positions are IGNORE_INDEX.
    """

    def __init__(self, model_path):
        path = str(model_path)
        if os.path.isdir(path):  # a checkpoint folder holding tokenizer.model
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except Exception as e:  # sentencepiece raises OSError or RuntimeError depending on version
            raise DataError(f"{path}: not a sentencepiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text) + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])  # BOS/EOS (control pieces) decode to nothing

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes of the normalized text a token covers ("▁" is a space, "<0xE6>" one byte)."""
        if self.sp.is_byte(token_id):
            return bytes([int(self.sp.id_to_piece(token_id)[3:5], 16)])
        if self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
            return b""
        return self.sp.id_to_piece(token_id).replace("\u2581", " ").encode("utf-8")


# ----------------------------------------------------------------------------- prompt and examples

# The Stanford Alpaca template, both variants (METHOD.md, Pipeline 1). The response follows
# "### Response:" directly, with no space or newline, exactly as Alpaca's and Tuna's training code.
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
    # Alpaca picks the variant by `input != ""`. format() parses only the template, so braces in
    # the instruction or input are kept as they are.
    template = PROMPT_WITH_INPUT if input != "" else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input)


def _count_prompt_tokens(tok: Tokenizer, full_ids: list[int], prompt: str, full_text: str) -> int:
    """How many leading tokens of the tokenized prompt+response hold prompt text only.

    Usually the prompt's own tokens are a prefix of the full tokenization. At the seam they can
    differ: a piece may span the last prompt characters and the first response characters
    ("...word banan" + "a." -> "▁banana"), or the prompt's last word may be split differently.
    We then walk the full tokenization's pieces by byte length: a token that holds any response
    byte belongs to the response (it is trained on), so no response text is ever masked; the
    prompt ids then decode to the prompt minus its last few characters.
    """
    prompt_ids = tok.sp.encode(prompt)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return len(prompt_ids)
    ends, total = [], 0
    for token_id in full_ids:
        total += len(tok.piece_bytes(token_id))
        ends.append(total)
    text_bytes = len(full_text.encode("utf-8"))
    if total in (text_bytes, text_bytes + 1):  # identity normalization (LLaMA), +1 for the dummy "▁"
        boundary = len(prompt.encode("utf-8")) + (total - text_bytes)
        return sum(1 for end in ends if end <= boundary)
    # Another normalization (e.g. NFKC) or an unknown piece changed the length: fall back to the
    # longest common prefix of the two tokenizations (commonprefix works on any lists).
    return len(os.path.commonprefix([full_ids, prompt_ids]))


def encode_prompt_response(tok: Tokenizer, prompt: str, response: str, max_len: int = 512,
                           finished: bool = True):
    """(prompt ids starting with BOS, response ids ending in EOS), or None.

    One tokenization of BOS + prompt + response + EOS, as Alpaca's train.py (METHOD.md, Pipeline 1),
    split where the prompt text ends (see _count_prompt_tokens). Longer than max_len: the sequence is
    cut on the right like Alpaca's `truncation=True`, so a truncated response loses its EOS (we do not
    teach the model to stop mid-sentence). finished=False is a response that a token limit cut when it
    was generated: no EOS either, for the same reason. None when not even one response token fits: the
    caller counts and reports such examples instead of training on an all-masked row.
    """
    full_ids = tok.sp.encode(prompt + response)
    n_prompt = _count_prompt_tokens(tok, full_ids, prompt, prompt + response)
    prompt_ids = [tok.bos_id] + full_ids[:n_prompt]
    response_ids = full_ids[n_prompt:] + ([tok.eos_id] if finished else [])
    room = max_len - len(prompt_ids)
    if room < 1 or not response_ids:
        return None
    return prompt_ids, response_ids[:room]


def build_sft_example(tok: Tokenizer, prompt: str, response: str, max_len: int = 512):
    """(input_ids, labels) for cross-entropy on the response only, or None (see above).

    labels are aligned with input_ids (not shifted: the loss shifts), IGNORE_INDEX over the prompt.
    """
    pair = encode_prompt_response(tok, prompt, response, max_len)
    if pair is None:
        return None
    prompt_ids, response_ids = pair
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


# ----------------------------------------------------------------------------- records and files

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


def _check_texts(value, path, where, name, min_count):
    if not isinstance(value, list):
        raise _fail(path, where, name, f"expected a list of strings, got {type(value).__name__}")
    if len(value) < min_count:
        raise _fail(path, where, name, f"{len(value)} candidate(s), a ranking needs at least {min_count}")
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


def _ranked_record_from_dict(obj, path, where) -> RankedRecord:
    _require(obj, ("id", "prompt", "candidates"), path, where)
    unknown = sorted(set(obj) - {"id", "prompt", "candidates", "instruction", "input", "scores", "source"})
    if unknown:
        raise _fail(path, where, unknown[0], f"unknown field(s) {unknown}")
    candidates = _check_texts(obj["candidates"], path, where, "candidates", 2)
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
            yield line_no, obj


def _read_json_list(path) -> list:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            problem = f"malformed JSON: {e.msg}, column {e.colno}"
            raise _fail(path, f"line {e.lineno}", None, problem) from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


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


def read_authors_ranking(path, skipped=None) -> list[RankedRecord]:
    """The authors' ranking release: JSON list of {instruction (already templated), id, output: [str],
    score: [float]}. Candidates are sorted by score, highest first, ties kept in file order (a stable
    sort, as the authors' code); source["ranks"] keeps the original positions, best first.

    skipped: a list to receive one message per record left out because of its content (an empty
    output, a non-finite score), so that one bad record among 52K does not stop a run; the caller
    reports them. Without it such a record raises, as does anything that is not the release's shape."""
    records, seen = [], {}
    for i, obj in enumerate(_read_json_list(path)):
        where = f"record {i}"
        _require(obj, ("instruction", "id", "output", "score"), path, where)
        record_id = obj["id"]
        if isinstance(record_id, bool) or not isinstance(record_id, (int, str)) or str(record_id) == "":
            raise _fail(path, where, "id", f"expected a non-empty string or an integer, got {record_id!r}")
        _check_unique_id(seen, str(record_id), path, where)
        try:
            outputs = _check_texts(obj["output"], path, where, "output", 2)
            scores = _check_scores(obj["score"], len(outputs), path, where, "score")
        except DataError as e:
            outputs, scores = obj["output"], obj["score"]
            empty = isinstance(outputs, list) and any(isinstance(x, str) and not x.strip() for x in outputs)
            infinite = isinstance(scores, list) and any(
                isinstance(x, float) and not math.isfinite(x) for x in scores)
            if skipped is None or not (empty or infinite):  # a wrong shape is no release file: stop
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


def read_ranked_jsonl(path) -> list[RankedRecord]:
    """The project's ranked JSONL (format in RankedRecord's docstring)."""
    records, seen = [], {}
    for line_no, obj in iter_jsonl(path):
        where = f"line {line_no}"
        record = _ranked_record_from_dict(obj, path, where)
        _check_unique_id(seen, record.id, path, where)
        records.append(record)
    return records


def write_ranked_jsonl(path, records) -> None:
    """Write records as ranked JSONL, atomically: into a temporary file in the same folder, then
    os.replace, so a crash or a bad record never leaves a half-written or clobbered file."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(fd, 0o644)  # mkstemp makes it private (0600); a data file is meant to be shared
            seen = {}
            for i, record in enumerate(records):
                where = f"record {i}"
                if not isinstance(record, RankedRecord):
                    raise _fail(path, where, None, f"expected a RankedRecord, got {type(record).__name__}")
                obj = asdict(record)
                _check_unique_id(seen, _ranked_record_from_dict(obj, path, where).id, path, where)  # as read
                try:
                    line = json.dumps(obj, ensure_ascii=False, allow_nan=False)
                except (TypeError, ValueError) as e:
                    raise _fail(path, where, "source", f"not JSON-serialisable ({e})") from None
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


# ----------------------------------------------------------------------------- files shared by processes

class OutputLocked(RuntimeError):
    """Another live process is writing the same output."""


@contextlib.contextmanager
def lock_output(path):
    """Hold PATH.lock while writing PATH (a file or a folder): one writer per output. A second process
    refuses at once, naming the first (its pid and command line are in the lock file). The lock is an
    fcntl.flock, which the OS drops when its holder dies, so a killed run never blocks the next; the
    lock file itself stays (deleting it could let two processes hold two different files)."""
    import fcntl  # POSIX only; imported here so that data.py still imports elsewhere
    lock_path = str(path).rstrip("/") + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
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


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
