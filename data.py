"""Tokenizer, Alpaca prompt, training examples and the data files of the Tuna pipeline (METHOD.md).

No model here: the teacher, the evaluation and the training loop all read and write data through
this file. Every reader validates what it reads and fails with a DataError that names the file, the
line (JSONL) or record index (JSON) and the field, never with a bare traceback from deep inside.
"""
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field

import sentencepiece as spm

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
    pad token instead). Still, build masks from lengths, not by comparing ids with pad_id.
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


def encode_prompt_response(tok: Tokenizer, prompt: str, response: str, max_len: int = 512):
    """(prompt ids starting with BOS, response ids ending in EOS), or None.

    One tokenization of BOS + prompt + response + EOS, as Alpaca's train.py (METHOD.md, Pipeline 1),
    split where the prompt text ends (see _count_prompt_tokens). Longer than max_len: the sequence is
    cut on the right like Alpaca's `truncation=True`, so a truncated response loses its EOS (we do not
    teach the model to stop mid-sentence). None when not even one response token fits: the caller
    counts and reports such examples instead of training on an all-masked row.
    """
    full_ids = tok.sp.encode(prompt + response)
    n_prompt = _count_prompt_tokens(tok, full_ids, prompt, prompt + response)
    prompt_ids = [tok.bos_id] + full_ids[:n_prompt]
    response_ids = full_ids[n_prompt:] + [tok.eos_id]
    room = max_len - len(prompt_ids)
    if room < 1:
        return None
    return prompt_ids, response_ids[:room]


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
                    "teacher": ..., "raw_reply": ..., "ranks": [...], ...}
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


def read_authors_ranking(path) -> list[RankedRecord]:
    """The authors' ranking release: JSON list of {instruction (already templated), id, output: [str],
    score: [float]}. Candidates are sorted by score, highest first, ties kept in file order (a stable
    sort, as the authors' code); source["ranks"] keeps the original positions, best first."""
    records, seen = [], {}
    for i, obj in enumerate(_read_json_list(path)):
        where = f"record {i}"
        _require(obj, ("instruction", "id", "output", "score"), path, where)
        record_id = obj["id"]
        if isinstance(record_id, bool) or not isinstance(record_id, (int, str)) or str(record_id) == "":
            raise _fail(path, where, "id", f"expected a non-empty string or an integer, got {record_id!r}")
        _check_unique_id(seen, str(record_id), path, where)
        outputs = _check_texts(obj["output"], path, where, "output", 2)
        scores = _check_scores(obj["score"], len(outputs), path, where, "score")
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
    """Write records as ranked JSONL atomically (write_atomic): a bad record leaves the old file as it was."""
    def lines():
        seen = {}
        for i, record in enumerate(records):
            where = f"record {i}"
            if not isinstance(record, RankedRecord):
                raise _fail(path, where, None, f"expected a RankedRecord, got {type(record).__name__}")
            obj = asdict(record)
            _check_unique_id(seen, _ranked_record_from_dict(obj, path, where).id, path, where)  # as read
            try:
                yield json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n"
            except (TypeError, ValueError) as e:
                raise _fail(path, where, "source", f"not JSON-serialisable ({e})") from None
    write_atomic(path, lines())


# ----------------------------------------------------------------------------- files a kill may interrupt

def write_atomic(path, text):
    """Write text (a string, or an iterable of strings written one by one) to path as UTF-8, through a
    temporary file in the same folder and a rename: a kill or an error leaves the old file or the new
    one, never half of one. The project's one way to replace a file."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(fd, 0o644)  # mkstemp makes it private (0600); a data file is meant to be shared
            f.writelines([text] if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def read_jsonl_log(path, skipped=None):
    """(byte offset, record) for each line of an append-only JSONL log (a cache, metrics, finished
    answers) that a kill may have cut short: a line that is not a whole JSON object is passed to
    skipped(message) and left out, never an error. A missing file holds no records. The project's one
    way to read such a file (data files are read strictly, with iter_jsonl)."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        offset = 0
        for line_no, line in enumerate(f, start=1):
            try:
                record = json.loads(line.decode("utf-8")) if line.strip() else None
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = False
            if isinstance(record, dict):
                yield offset, record
            elif record is not None and skipped:
                skipped(f"{path}, line {line_no}: malformed JSON line (one cut short by a kill?), skipped")
            offset += len(line)


def append_jsonl(path, records):
    """Append records to a JSONL log, one line each, and close the file, so each line survives a kill of
    this process. A last line cut short by an earlier kill is ended first, so the new line stands on
    its own. Returns the byte offset where the first new line starts."""
    with open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                end += f.write(b"\n")
        f.write(b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records))
    return end
