"""tokenizer.py's sentencepiece parity with transformers' slow LlamaTokenizer (transformers 4; the byte-level BPE
path is tests/test_bpe.py); data.py: the Alpaca template, SFT examples, and the readers' and writer's validation."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from data import (DataError, OutputLocked, RankedRecord, alpaca_prompt, append_jsonl, encode_prompt_response,
                  iter_jsonl, lock_output, read_alpaca, read_authors_ranking, read_jsonl_log, read_ranked_jsonl,
                  refuse_output_over_inputs, write_atomic, write_ranked_jsonl)
from tokenizer import Tokenizer, TokenizerError

# The two Stanford Alpaca prompts, written out in full (PROMPT_DICT in tatsu-lab/stanford_alpaca train.py).
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nName a color.\n\n### Response:"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate to French."
    "\n\n### Input:\ngood morning\n\n### Response:"
)

TEXTS = [
    "hello world",
    "  two  spaces   and three   ",
    " leading space",
    "trailing space ",
    "line one\nline two\n\n  indented\n",
    "\n",
    "tab\tseparated",
    "Add 123 and 4567: 5690.",
    "東京 café naïve résumé Ωmega ü",
    "emoji 🙂🎉 and rare 𝔘 letters",
    "x",
    "",
    ALPACA_NO_INPUT + "Red.",
    ALPACA_WITH_INPUT + "Bonjour.",
]


@pytest.fixture(scope="module")
def tok(spm_model_path):
    return Tokenizer(spm_model_path)


@pytest.fixture(scope="module")
def hf_tokenizer(spm_model_path):
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("transformers 5 removed the slow, sentencepiece-backed LlamaTokenizer: .ci/run runs this "
                    "module again with transformers 4.57.6")
    # legacy=True is plain sentencepiece, what Meta's llama tokenizer does; legacy=False changes the
    # handling of text after special tokens (and needs protobuf).
    return transformers.LlamaTokenizer(vocab_file=spm_model_path, legacy=True,
                                       add_bos_token=True, add_eos_token=True)


# ----------------------------------------------------------------------------- tokenizer

def test_special_ids_and_pad(tok):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 512)
    assert tok.pad_id == 0 and tok.sp.is_unknown(tok.pad_id)  # no pad piece: pad with unk, not EOS
    for text in TEXTS:  # byte fallback: real text never produces the pad id
        assert tok.pad_id not in tok.encode(text, bos=True, eos=True)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers_llama_tokenizer(tok, hf_tokenizer, text):
    assert tok.encode(text, bos=True, eos=True) == hf_tokenizer(text)["input_ids"]
    assert tok.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text, bos=True) == [1] + tok.encode(text)


def test_rare_unicode_uses_byte_fallback(tok):
    ids = tok.encode("🎉𝔘")
    assert ids and all(tok.sp.is_byte(i) for i in ids[1:])  # ids[0] is the dummy-prefix "▁"
    assert len(ids) - 1 == len("🎉𝔘".encode("utf-8"))


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tok, hf_tokenizer, text):
    ids = tok.encode(text, bos=True, eos=True)
    assert tok.decode(ids) == text
    if not text.startswith(" "):  # transformers' decode drops a leading space; sentencepiece keeps it
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_control_token_text_stays_text(tok):
    # As Meta's tokenizer: user text cannot inject BOS/EOS (transformers would parse "</s>" here).
    ids = tok.encode("a </s> b <s>")
    assert tok.eos_id not in ids and tok.bos_id not in ids
    assert tok.decode(ids) == "a </s> b <s>"


def test_tokenizer_file_errors(tmp_path, spm_model_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.model"))):
        Tokenizer(tmp_path / "missing.model")
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TokenizerError, match=re.escape(str(garbage)) + ".*not a sentencepiece model"):
        Tokenizer(garbage)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(open(spm_model_path, "rb").read())
    assert Tokenizer(folder).encode("hello") == Tokenizer(spm_model_path).encode("hello")


# ----------------------------------------------------------------------------- prompt

def test_alpaca_prompt_exact_text():
    assert alpaca_prompt("Name a color.") == ALPACA_NO_INPUT
    assert alpaca_prompt("Name a color.", "") == ALPACA_NO_INPUT
    assert alpaca_prompt("Translate to French.", "good morning") == ALPACA_WITH_INPUT
    assert alpaca_prompt("Use {input} and {}", "{instruction}").endswith(
        "### Instruction:\nUse {input} and {}\n\n### Input:\n{instruction}\n\n### Response:")


# ----------------------------------------------------------------------------- SFT examples

def test_sft_example_masks_exactly_the_prompt(tok):
    prompt, response = alpaca_prompt("Give three tips for staying healthy."), "Eat well, exercise, sleep."
    prompt_ids, response_ids = encode_prompt_response(tok, prompt, response)
    assert prompt_ids + response_ids == tok.encode(prompt + response, bos=True, eos=True)  # one tokenization
    assert prompt_ids == tok.encode(prompt, bos=True)  # here the prompt's tokens are a prefix (Alpaca's rule)
    assert response_ids[-1] == tok.eos_id and tok.decode(response_ids) == response


def test_split_where_the_prompt_tokens_are_not_a_prefix(tok):
    """Where prompt + response tokenizes differently at the seam, the split follows the text: no
    response character is masked, no token of pure prompt text is trained on."""
    irregular = 0
    for text in ["Reverse the string 'hello world' to get 'dlrow olleh'.", "東京 is Tokyo, café 🙂 ok",
                 ALPACA_NO_INPUT + "The capital of France is Paris."]:
        for cut in range(1, len(text)):
            prompt, response = text[:cut], text[cut:]
            prompt_ids, response_ids = encode_prompt_response(tok, prompt, response, max_len=10_000)
            assert prompt_ids + response_ids == tok.encode(text, bos=True, eos=True)
            assert prompt.startswith(tok.decode(prompt_ids))  # prompt side holds prompt text only
            first_response_text = tok.decode(prompt_ids + response_ids[:1])
            assert len(first_response_text) > len(prompt)  # the first trained token holds response text
            if tok.encode(text, bos=True)[:len(tok.encode(prompt, bos=True))] != tok.encode(prompt, bos=True):
                irregular += 1
    assert irregular > 10  # the slow path ran (Alpaca's "mask len(prompt ids)" would be off here)
    # A named case: alone, "...word banan" ends in the pieces "▁ban" "an"; followed by "a." the
    # full text has one piece "▁banana". That piece holds response text, so it is trained on;
    # Alpaca's rule (mask as many tokens as the prompt alone has) would mask the whole response.
    prompt, response = "Count the letters in the word banan", "a."
    prompt_ids, response_ids = encode_prompt_response(tok, prompt, response)
    assert tok.decode(prompt_ids) == "Count the letters in the word"
    assert tok.decode(prompt_ids + response_ids) == prompt + response
    assert len(tok.encode(prompt, bos=True)) >= len(prompt_ids + response_ids) - 1  # Alpaca: all masked


def test_truncation_cuts_the_response_and_never_empties_it(tok):
    prompt = alpaca_prompt("Sort the numbers.")
    n_prompt = len(tok.encode(prompt, bos=True))
    long_response = " ".join(["3, 7, 19, 42"] * 200)
    prompt_ids, response_ids = encode_prompt_response(tok, prompt, long_response, max_len=128)
    assert len(prompt_ids) == n_prompt and len(prompt_ids + response_ids) == 128
    assert prompt_ids + response_ids == tok.encode(prompt + long_response, bos=True)[:128]  # cut on the right
    assert response_ids[-1] != tok.eos_id  # a cut response does not teach stopping

    short = "3, 7."
    exact = n_prompt + len(tok.encode(prompt + short)) - len(tok.encode(prompt)) + 1
    assert encode_prompt_response(tok, prompt, short, max_len=exact)[1][-1] == tok.eos_id  # fits: EOS kept
    assert len(encode_prompt_response(tok, prompt, long_response, max_len=n_prompt + 1)[1]) == 1
    assert encode_prompt_response(tok, prompt, long_response, max_len=n_prompt) is None  # no room: reported
    assert encode_prompt_response(tok, prompt, short, max_len=5) is None


def test_empty_response_still_trains_eos(tok):
    prompt_ids, response_ids = encode_prompt_response(tok, alpaca_prompt("Say nothing."), "")
    assert response_ids == [tok.eos_id]


def test_a_response_cut_when_it_was_generated_gets_no_eos(tok):
    prompt = alpaca_prompt("Count to ten.")
    finished = encode_prompt_response(tok, prompt, "1, 2, 3, 4")
    cut = encode_prompt_response(tok, prompt, "1, 2, 3, 4", finished=False)
    assert cut == (finished[0], finished[1][:-1]) and finished[1][-1] == tok.eos_id
    assert encode_prompt_response(tok, prompt, "", finished=False) is None  # nothing to train on


# ----------------------------------------------------------------------------- readers

def write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def test_read_alpaca(tmp_path):
    path = write_json(tmp_path / "alpaca.json", [
        {"instruction": "Name a color.", "input": "", "output": "Red."},
        {"instruction": "Translate.", "input": "café", "output": "coffee", "extra": 1},
        {"instruction": "No input key.", "output": "Fine."},
    ])
    assert read_alpaca(path) == [
        {"instruction": "Name a color.", "input": "", "output": "Red."},
        {"instruction": "Translate.", "input": "café", "output": "coffee"},
        {"instruction": "No input key.", "input": "", "output": "Fine."},
    ]


GOOD_ALPACA = {"instruction": "i", "input": "", "output": "o"}


@pytest.mark.parametrize("records, message", [
    ([GOOD_ALPACA, {"instruction": "i", "input": ""}], r"record 1, field 'output': missing"),
    ([{"instruction": 3, "output": "o"}], r"record 0, field 'instruction': expected a string, got int"),
    ([GOOD_ALPACA, GOOD_ALPACA, {"instruction": "i", "output": "  "}], r"record 2, field 'output': empty"),
    ([{"instruction": "i", "input": None, "output": "o"}], r"record 0, field 'input': expected a string"),
    (["just a string"], r"record 0: expected a JSON object, got str"),
    ({"instruction": "i"}, r"expected a JSON list of records, got dict"),
])
def test_read_alpaca_errors(tmp_path, records, message):
    path = write_json(tmp_path / "alpaca.json", records)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + message):
        read_alpaca(path)


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "i", "output": "o"},\n  {"instruction": "i" "output": "o"}\n]\n')
    with pytest.raises(DataError, match=re.escape(str(path)) + r", line 3: malformed JSON"):
        read_alpaca(path)
    with pytest.raises(DataError, match=re.escape(str(path)) + r", line 3: malformed JSON"):
        read_authors_ranking(path)


def test_read_authors_ranking_sorts_highest_first(tmp_path):
    path = write_json(tmp_path / "authors.json", [
        {"instruction": ALPACA_NO_INPUT, "id": 7, "output": ["ok", "best", "worst", "tie"],
         "score": [-1.0, -0.5, -3, -1.0]},
        {"instruction": ALPACA_WITH_INPUT, "id": "x8", "output": ["a", "b"], "score": [0, 1]},
    ])
    first, second = read_authors_ranking(path)
    assert first.id == "7" and first.prompt == ALPACA_NO_INPUT
    assert first.candidates == ["best", "ok", "tie", "worst"]  # ties keep file order
    assert first.scores == [-0.5, -1.0, -1.0, -3.0]
    assert first.source == {"kind": "authors", "ranks": [1, 0, 3, 2]}
    assert (second.id, second.candidates) == ("x8", ["b", "a"])


GOOD_AUTHORS = {"instruction": "p", "id": 1, "output": ["a", "b"], "score": [0.1, 0.2]}


@pytest.mark.parametrize("record, message", [
    ({**GOOD_AUTHORS, "score": [0.1]}, r"record 1, field 'score': 1 scores for 2 candidates"),
    ({**GOOD_AUTHORS, "output": ["a"], "score": [0.1]}, r"record 1, field 'output': 1 candidate\(s\)"),
    ({**GOOD_AUTHORS, "output": ["a", ""]}, r"record 1, field 'output\[1\]': empty response"),
    ({**GOOD_AUTHORS, "score": [0.1, "high"]}, r"record 1, field 'score\[1\]': expected a finite number"),
    ({**GOOD_AUTHORS, "output": "a b"}, r"record 1, field 'output': expected a list of strings"),
    ({k: v for k, v in GOOD_AUTHORS.items() if k != "id"}, r"record 1, field 'id': missing"),
    ({**GOOD_AUTHORS, "id": True}, r"record 1, field 'id': expected a non-empty string or an integer"),
    ({**GOOD_AUTHORS, "id": 0}, r"record 1, field 'id': duplicate id '0' \(first at record 0\)"),
])
def test_read_authors_ranking_errors(tmp_path, record, message):
    path = write_json(tmp_path / "authors.json", [{**GOOD_AUTHORS, "id": 0}, record])
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + message):
        read_authors_ranking(path)
    if "empty response" not in message:  # a wrong shape stops the reader even when the caller takes skips
        with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + message):
            read_authors_ranking(path, skipped=[])


def test_one_bad_record_of_the_release_is_a_counted_named_skip(tmp_path):
    """One empty output or non-finite score among the 52K records skips that record, named, not the file."""
    records = [{**GOOD_AUTHORS, "id": i} for i in range(5)]
    records[1]["output"] = ["a", "  "]
    records[3]["score"] = [0.5, float("nan")]
    records[4]["score"] = [float("inf"), 0.1]
    path = tmp_path / "authors.json"
    path.write_text(json.dumps(records))  # Python's json writes NaN and Infinity, as the release was written
    assert "NaN" in path.read_text()
    skipped = []
    assert [r.id for r in read_authors_ranking(path, skipped=skipped)] == ["0", "2"]
    assert len(skipped) == 3 and all(str(path) in message and "record skipped" in message for message in skipped)
    assert "record 1, field 'output[1]': empty response (id 1)" in skipped[0]
    assert "record 3, field 'score[1]': expected a finite number, got nan (id 3)" in skipped[1]
    assert "record 4, field 'score[0]': expected a finite number, got inf (id 4)" in skipped[2]


# ----------------------------------------------------------------------------- ranked JSONL

def sample_records():
    return [
        RankedRecord(id="a1", prompt=ALPACA_NO_INPUT, candidates=["Red.", "Blue, I think.", "東京 🙂"],
                     instruction="Name a color.", scores=[-0.2, -0.9, -2.5],
                     source={"kind": "probabilistic", "teacher": "tiny"}),
        RankedRecord(id="a2", prompt=ALPACA_WITH_INPUT, candidates=["Bonjour.", "Salut."],
                     instruction="Translate to French.", input="good morning",
                     source={"kind": "contextual", "ranks": [1, 0], "raw_reply": "rank: [1, 0]"}),
    ]


def test_ranked_jsonl_round_trip(tmp_path):
    path = tmp_path / "ranked.jsonl"
    write_ranked_jsonl(path, sample_records())
    assert read_ranked_jsonl(path) == sample_records()
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 2 and "東京" in text  # one record a line, UTF-8 kept readable
    assert [line_no for line_no, _ in iter_jsonl(path)] == [1, 2]
    assert os.stat(path).st_mode & 0o777 == 0o644  # not the temporary file's private 0600


def jsonl(path, objects):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects))
    return path


GOOD_RANKED = {"id": "r0", "prompt": "p", "candidates": ["a", "b"]}


@pytest.mark.parametrize("line, message", [
    ('{"id": "r1", "prompt": "p", "candidates": ["a", "b"]', r"line 3: malformed JSON"),
    ({"id": "r1", "candidates": ["a", "b"]}, r"line 3, field 'prompt': missing"),
    ({**GOOD_RANKED, "id": 5}, r"line 3, field 'id': expected a string, got int"),
    ({**GOOD_RANKED, "id": "r1", "candidates": ["a"]}, r"line 3, field 'candidates': 1 candidate\(s\)"),
    ({**GOOD_RANKED, "id": "r1", "candidates": ["a", " "]}, r"line 3, field 'candidates\[1\]': empty"),
    ({**GOOD_RANKED, "id": "r1", "scores": [1.0]}, r"line 3, field 'scores': 1 scores for 2 candidates"),
    ('{"id": "r1", "prompt": "p", "candidates": ["a", "b"], "scores": [NaN, 1]}',
     r"line 3, field 'scores\[0\]': expected a finite number"),
    ({**GOOD_RANKED, "id": "r1", "source": []}, r"line 3, field 'source': expected an object"),
    ({**GOOD_RANKED, "id": "r1", "candidate": ["a"]}, r"line 3, field 'candidate': unknown field"),
    ({**GOOD_RANKED, "id": "r1", "source": {"unfinished": [2]}},
     r"line 3, field 'source.unfinished': expected distinct candidate positions 0..1, got \[2\]"),
    ({**GOOD_RANKED, "id": "r1", "source": {"unfinished": [0, 0]}}, r"line 3, field 'source.unfinished'"),
    (GOOD_RANKED, r"line 3, field 'id': duplicate id 'r0' \(first at line 1\)"),
    ("[1, 2]", r"line 3: expected a JSON object, got list"),
])
def test_read_ranked_jsonl_errors(tmp_path, line, message):
    path = jsonl(tmp_path / "ranked.jsonl", [GOOD_RANKED, "", line])  # line 2 blank: skipped, counted
    with pytest.raises(DataError, match=re.escape(str(path)) + ", " + message):
        read_ranked_jsonl(path)


def test_jsonl_not_utf8(tmp_path):
    path = tmp_path / "ranked.jsonl"
    path.write_bytes(json.dumps(GOOD_RANKED).encode() + b'\n{"id": "\xff"}\n')
    with pytest.raises(DataError, match=re.escape(str(path)) + r", line 2: not UTF-8"):
        read_ranked_jsonl(path)


@pytest.mark.parametrize("bad, message", [
    (RankedRecord(id="b", prompt="p", candidates=["a", "b"], source={"when": object()}),
     r"record 1, field 'source': not JSON-serialisable"),
    (RankedRecord(id="b", prompt="p", candidates=["a", ""]), r"record 1, field 'candidates\[1\]': empty"),
    (RankedRecord(id="a1", prompt="p", candidates=["a", "b"]), r"record 1, field 'id': duplicate id 'a1'"),
    ({"id": "b"}, r"record 1: expected a RankedRecord, got dict"),
])
def test_write_is_atomic_and_validates(tmp_path, bad, message):
    path = tmp_path / "ranked.jsonl"
    write_ranked_jsonl(path, sample_records())
    before = path.read_bytes()
    with pytest.raises(DataError, match=re.escape(str(path)) + ", " + message):
        write_ranked_jsonl(path, [sample_records()[0], bad])
    assert path.read_bytes() == before  # the old file is untouched
    assert os.listdir(tmp_path) == ["ranked.jsonl"]  # and no temporary file is left behind


# ----------------------------------------------------------------------------- logs a kill may cut short

def test_jsonl_log_survives_a_cut_line_and_appends_after_it(tmp_path):
    path = tmp_path / "log.jsonl"
    assert list(read_jsonl_log(path)) == []  # no file yet: no records
    assert append_jsonl(path, [{"a": 1}, {"b": "é"}]) == 0
    second = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b'{"c": [1, 2')  # a kill in the middle of a line
    assert append_jsonl(path, [{"d": 4}]) == second + len(b'{"c": [1, 2') + 1  # ends the cut line first
    with open(path, "ab") as f:
        f.write(b'[1, 2]\n\n"text"\n\xff\n')  # not objects, a blank line, not UTF-8
    skipped = []
    records = list(read_jsonl_log(path, skipped.append))
    assert [r for _, r in records] == [{"a": 1}, {"b": "é"}, {"d": 4}]
    for offset, record in records:  # each offset is where its line starts
        with open(path, "rb") as f:
            f.seek(offset)
            assert json.loads(f.readline()) == record
    assert [m.split(": ")[0] for m in skipped] == [f"{path}, line {n}" for n in (3, 5, 7, 8)]


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out.txt"
    write_atomic(path, "old")

    def lines():
        yield "new line 1\n"
        raise RuntimeError("killed while writing")
    with pytest.raises(RuntimeError):
        write_atomic(path, lines())
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
    write_atomic(path, (f"{i}\n" for i in range(3)))
    assert path.read_text() == "0\n1\n2\n" and oct(os.stat(path).st_mode & 0o777) == "0o644"


KILLED_WRITE = ("import sys, time, data\n"
                "def lines():\n    yield 'half of a file'\n    print('writing', flush=True)\n    time.sleep(120)\n"
                "data.write_atomic(sys.argv[1], lines())\n")
NEXT_WRITE = "import sys, data\ndata.write_atomic(sys.argv[1], 'new')\n"


def test_a_temporary_file_a_sigkill_left_is_cleared_by_the_next_write_of_the_same_path(tmp_path):
    """A write killed by SIGKILL leaves its temporary file (OUT.<8 characters>.tmp, gigabytes for a large output)
    beside the old file. The next write of the same path, in a later process, removes it: of this path, that
    pattern, and older than the process that writes, so no live write's. Anything else stays: other paths'
    temporaries, other names, and one younger than the writing process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out.jsonl"
    write_atomic(out, "old")
    killed = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, str(out)], cwd=root, stdout=subprocess.PIPE,
                              text=True)
    assert killed.stdout.readline() == "writing\n"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    left = [name for name in os.listdir(tmp_path) if name != "out.jsonl"]
    assert len(left) == 1 and re.fullmatch(r"out\.jsonl\.[a-z0-9_]{8}\.tmp", left[0]) and out.read_text() == "old"
    others = ["other.jsonl.abcd1234.tmp", "out.jsonl.notes.tmp", "out.jsonl.abcd1234.tmp.keep",
              "xout.jsonl.abcd1234.tmp"]
    for name in others:
        (tmp_path / name).write_text("not write_atomic's of out.jsonl")
        os.utime(tmp_path / name, (0, 0))  # as old as can be: only the name protects them
    (tmp_path / "out.jsonl.folder12.tmp").mkdir()
    os.utime(tmp_path / "out.jsonl.folder12.tmp", (0, 0))
    subprocess.run([sys.executable, "-c", NEXT_WRITE, str(out)], cwd=root, check=True)
    assert out.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == sorted(["out.jsonl", "out.jsonl.folder12.tmp", *others])
    (tmp_path / "out.jsonl.live1234.tmp").write_text("a write of a live process, begun after this one")
    write_atomic(out, "newer")
    assert out.read_text() == "newer" and (tmp_path / "out.jsonl.live1234.tmp").exists()


# ----------------------------------------------------------------------------- one writer per output

# a second process that holds data.lock_output(argv[1]) until it is killed
HOLD_LOCK = ("import sys, time, data\nwith data.lock_output(sys.argv[1]):\n"
             "    print('held', flush=True)\n    time.sleep(120)\n")


def test_lock_output_one_writer_and_a_killed_holder_never_blocks(tmp_path):
    """A second process refuses at once, naming the holder's pid; the OS drops the lock when its holder dies."""
    out = tmp_path / "runs" / "out.jsonl"  # the folder does not exist yet: the lock makes it
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OutputLocked, match=re.escape(f"{out} is being written by another process (pid "
                                                         f"{holder.pid}: -c {out})")):
            with lock_output(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lock_output(out) as lock_path:  # the killed holder's lock file is still there, but not its lock
        assert lock_path == f"{out}.lock" and open(lock_path).read().startswith(f"pid {os.getpid()}: ")
    with lock_output(out):  # released on leaving
        pass


def test_lock_output_opens_only_a_plain_file_never_through_a_symlink(tmp_path):
    """The lock file is opened without following a symlink and must be a plain file: a link to another file (whose
    content the lock would truncate), a dangling link (which would create its target), a folder or a FIFO is
    refused by name and left as it was."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    os.symlink(precious, tmp_path / "linked.lock")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.lock")
    (tmp_path / "folder.lock").mkdir()
    os.mkfifo(tmp_path / "fifo.lock")
    for name in ("linked", "dangling", "folder", "fifo"):
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / name}.lock: ") + "not a plain file"):
            with lock_output(tmp_path / name):
                pass
    assert precious.read_text() == "keep me" and not os.path.lexists(tmp_path / "nowhere")
    assert sorted(os.listdir(tmp_path)) == ["dangling.lock", "fifo.lock", "folder.lock", "linked.lock", "precious.txt"]


# ----------------------------------------------------------------------------- outputs never overwrite inputs

def test_an_output_that_is_inside_or_holds_an_input_is_refused_naming_both(tmp_path):
    """Paths are compared after resolving symlinks and `..`; a sibling whose name merely starts alike is apart."""
    checkpoint = tmp_path / "ck"
    checkpoint.mkdir()
    (checkpoint / "tokenizer.model").write_text("x")
    (tmp_path / "data.json").write_text("[]")
    os.symlink(checkpoint, tmp_path / "link")
    inputs = {"--init": str(checkpoint), "--data": str(tmp_path / "data.json"), "--tokenizer": None}
    for out, relation, name in (
            (checkpoint, "is", "--init"),
            (tmp_path / "link", "is", "--init"),                         # a symlink to the input
            (tmp_path / "other" / ".." / "ck", "is", "--init"),          # `..`
            (checkpoint / "run", "is inside", "--init"),
            (checkpoint / "tokenizer.model", "is inside", "--init"),
            (tmp_path, "holds", "--init"),
            (tmp_path / "data.json", "is", "--data")):
        with pytest.raises(DataError) as err:
            refuse_output_over_inputs(out, inputs)
        message = str(err.value)
        assert f"{out} {relation} {name} {inputs[name]}" in message, message
    for out in (tmp_path / "ck2", tmp_path / "runs" / "new", tmp_path / "data.json.out"):
        refuse_output_over_inputs(out, inputs)  # apart from every input: no error


# ----------------------------------------------------------------------------- JSON nested too deep for the reader

def test_json_nested_deeper_than_the_reader_allows_is_a_named_error(tmp_path):
    """100,000 nested lists would be a RecursionError from Python's JSON reader: each reader names the file
    (and line) instead; a log reader skips the line as it skips any malformed one."""
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.jsonl").write_text(json.dumps(GOOD_RANKED) + "\n" + '{"id": ' + deep + "}\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'deep.jsonl'}, line 2: ") + "JSON nested too deep"):
        read_ranked_jsonl(tmp_path / "deep.jsonl")
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'deep.json'}: ") + "JSON nested too deep"):
        read_alpaca(tmp_path / "deep.json")
    skipped = []
    (tmp_path / "log.jsonl").write_text('{"a": 1}\n' + deep + '\n{"b": 2}\n')
    assert [r for _, r in read_jsonl_log(tmp_path / "log.jsonl", skipped.append)] == [{"a": 1}, {"b": 2}]
    assert skipped and skipped[0].startswith(f"{tmp_path / 'log.jsonl'}, line 2: ")
