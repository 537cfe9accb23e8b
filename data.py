"""Tokenizer, Alpaca prompt, training examples and the data files of the Tuna pipeline.

No model here: the teacher, the evaluation and the training loop all read and write data through
this file. Every reader validates what it reads and fails with a DataError that names the file, the
line (JSONL) or record index (JSON) and the field, never with a bare traceback from deep inside. The
files a long run appends to and a kill may cut short have their own helpers: one atomic write
(write_atomic), one tolerant log reader and appender (read_jsonl_log, append_jsonl), one output lock.

    import data
    tok = data.Tokenizer("llama-2-7b-hf/")                       # tokenizer.model, else tokenizer.json
    prompt_ids, response_ids = data.encode_prompt_response(tok, data.alpaca_prompt("Name a color."), "Red.")
    records = data.read_ranked_jsonl("ranked.jsonl")           # DataError: file, line and field of a problem
"""
import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
import unicodedata
from dataclasses import asdict, dataclass, field

import sentencepiece as spm

class DataError(ValueError):
    """Bad input data; the message names the file, the line (1-based) or record index
    (0-based, in a JSON list), and the field: "alpaca.json, record 3, field 'output':
    empty"."""


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """The checkpoint's tokenizer with LLaMA's conventions: Tokenizer(folder) opens
    tokenizer.model (sentencepiece: LLaMA 1/2, Mistral, TinyLlama) when the folder has
    one, else tokenizer.json (byte-level BPE: Llama 3, SmolLM2; see ByteLevelBPE). A file
    path opens that file.

    eos_id ends every training response; stop_ids are all the ids generation stops at: eos_id, then
    generation_config.json's eos_token_id beside the file (Llama 3.x Instruct lists 128001, 128008, 128009:
    end of text, end of a tool call's message, end of a turn).

    encode() never produces a control or special token from text: text that looks like
    "</s>" or "<|end_of_text|>" is encoded as text, as Meta's llama does it (and
    transformers' slow LlamaTokenizer with legacy=True). bos_id is None where the
    checkpoint's tokenizer puts nothing before a text (GPT-2 style).

    Padding: LLaMA's model has no pad piece (sentencepiece pad_id() == -1, which no embedding can
    look up). Alpaca and Tuna add a "[PAD]" token and resize the embeddings; we do not, so checkpoints
    keep their shapes. We pad with the unknown-piece id (0 in LLaMA) instead: with byte fallback,
    sentencepiece encodes every string without it, so a pad can never be mistaken for text. Not EOS:
    code that masks `ids == pad_id` (Alpaca's collator and Tuna's labels do) would then drop every
    real EOS from the loss and the model would never learn to stop (the authors added a
    pad token instead: LMOps tuna/src/train_tuna.py, smart_tokenizer_and_embedding_resize).
    A BPE tokenizer pads with a special token other than EOS (ByteLevelBPE), or with
    EOS where it has no other (GPT-2): safe here, as every mask the project builds comes from
    lengths, never from comparing ids with pad_id.
"""

    def __init__(self, model_path):
        path = str(model_path)
        # a checkpoint folder: sentencepiece first, as LLaMA 1/2 folders hold both
        if os.path.isdir(path):
            found = [os.path.join(path, name) for name in ("tokenizer.model", "tokenizer.json")
                     if os.path.isfile(os.path.join(path, name))]
            if not found:
                raise FileNotFoundError(f"tokenizer model not found: {path} has neither tokenizer.model "
                                        "(sentencepiece) nor tokenizer.json (byte-level BPE)")
            path = found[0]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        self.sp = self.bpe = None
        if path.endswith(".json"):
            self.bpe = ByteLevelBPE(path)
            self.vocab_size, self.bos_id, self.eos_id = self.bpe.vocab_size, self.bpe.bos_id, self.bpe.eos_id
            self.pad_id, self.files = self.bpe.pad_id, self.bpe.files
        else:
            self._open_sentencepiece(path)
        folder = os.path.dirname(os.path.abspath(path))
        self.stop_ids = _stop_ids(self.eos_id, folder, self.vocab_size, self.files)

    def _open_sentencepiece(self, path):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        # sentencepiece raises OSError or RuntimeError depending on version
        except Exception as e:
            raise DataError(f"{path}: not a sentencepiece model ({e}){_tiktoken_hint(path)}") from None
        # name in a checkpoint -> this file: what a saved one copies
        self.files = {"tokenizer.model": path}
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.bpe.encode(text) if self.bpe else self.sp.encode(text)
        bos_ids = [self.bos_id] if bos and self.bos_id is not None else []
        return bos_ids + ids + ([self.eos_id] if eos else [])

    def prefix_ids(self) -> list[int]:
        """The ids put before every text: [BOS], or none where the checkpoint's tokenizer
        adds nothing (SmolLM2, GPT-2)."""
        return self.encode("", bos=True)

    def decode(self, ids: list[int]) -> str:
        if self.bpe:
            return self.bpe.decode(ids)
        # BOS/EOS (control pieces) decode to nothing
        return self.sp.decode([int(i) for i in ids])

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes of the normalized text a token covers ("▁" is a space, "<0xE6>" one
        byte); b"" for control and special tokens."""
        if self.bpe:
            return self.bpe.piece_bytes(token_id)
        if self.sp.is_byte(token_id):
            return bytes([int(self.sp.id_to_piece(token_id)[3:5], 16)])
        if self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
            return b""
        return self.sp.id_to_piece(token_id).replace("\u2581", " ").encode("utf-8")


def _stop_ids(eos_id, folder, vocab_size, files):
    """[eos_id] + generation_config.json's eos_token_id (one id or a list) not already in
    it; the file joins files (what a saved checkpoint copies) so that the checkpoint stops
    where this one does."""
    path = os.path.join(folder, "generation_config.json")
    listed = _read_json_object(path).get("eos_token_id") if os.path.isfile(path) else None
    if listed is None:
        return [eos_id]
    listed = listed if isinstance(listed, list) else [listed]
    for value in listed:
        if type(value) is not int or not 0 <= value < vocab_size:
            raise DataError(f"{path}: eos_token_id {value!r} is not a token id (vocabulary size "
                            f"{vocab_size})")
    files["generation_config.json"] = path
    return list(dict.fromkeys([eos_id, *listed]))


def _tiktoken_hint(path):
    """Meta's Llama 3 folders hold a tiktoken file named tokenizer.model: say so, not "not sentencepiece"."""
    with open(path, "rb") as f:
        first = f.readline(200).split()
    if len(first) == 2 and re.fullmatch(rb"[A-Za-z0-9+/=]+", first[0]) and first[1].isdigit():
        return ("; it is a tiktoken BPE file (Meta's Llama 3 release), which data.py does not read: use the "
                "Hugging Face release's tokenizer.json")
    return ""


# ---------------------------------------------------------------------- byte-level BPE (tokenizer.json)
#
# The tokenizer of GPT-2, Llama 3, SmolLM2 and most recent models, read from Hugging
# Face's tokenizer.json by hand (the `tokenizers` package is not needed). Encoding a text
# takes these steps, as in `tokenizers`:
#   0. added tokens that are not special (DeepSeek's "<｜User｜>", Qwen's "<think>") are cut out of the text
#      first, and the rest is normalized (NFC for Qwen; most files have no normalizer);
#   1. pre-tokenize: regexes cut the text into words ("Hello", " world", "!", " 123");
#   2. byte level: each word's UTF-8 bytes become printable characters, one per byte (GPT-2's table), so any
#      text is spelled with 256 symbols (a vocabulary lacking a symbol drops that byte, as `tokenizers` does);
#   3. BPE: from single bytes, the adjacent pair with the lowest merge rank is merged until no pair has one.
# Special tokens are never produced from text. Everything else a tokenizer.json may say
# (another normalizer, another model type, byte fallback, other pre-tokenizers or split
# behaviours) is refused by name.

def _byte_to_char():
    """GPT-2's table: printable bytes stand for themselves, the other 68 for chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {char: byte for byte, char in BYTE_TO_CHAR.items()}

# What the ByteLevel pre-tokenizer splits with (use_regex=True): GPT-2's pattern, in
# Oniguruma syntax as `tokenizers` writes it; _python_regex translates it like any other.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _white_space(char):
    r"""Unicode's White_Space: Oniguruma's \s and Rust's char::is_whitespace (not Python's isspace)."""
    return char in "\t\n\x0b\x0c\r\x85" or unicodedata.category(char) in ("Zs", "Zl", "Zp")


@functools.lru_cache(maxsize=None)
def _unicode_class(name):
    r"""The body of a regex character class ("a-zà-ö...") holding every code point in a Unicode general
    category ("L", "N", "Lu", ...) or, for "White_Space", Oniguruma's \s (\t-\r, U+0085 and the Z categories).

    Python's re has no \p{..}, so the sets come from Python's unicodedata. They equal Oniguruma's (which
    `tokenizers` uses) except for characters assigned after Python's Unicode version (14.0 in Python 3.11):
    those are unassigned here, so not letters or numbers; tests/test_bpe.py lists and counts them."""
    def member(char):
        return _white_space(char) if name == "White_Space" else unicodedata.category(char).startswith(name)

    def escape(code):  # the characters with a meaning inside [...]
        return "\\" + chr(code) if chr(code) in "\\]^-[" else chr(code)

    ranges = []
    start = None
    for code in range(sys.maxunicode + 2):
        inside = code <= sys.maxunicode and member(chr(code))
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            ranges.append((start, code - 1))
            start = None
    return "".join(escape(a) if a == b else f"{escape(a)}-{escape(b)}" for a, b in ranges)


UNICODE_CATEGORIES = {"L", "Lu", "Ll", "Lt", "Lm", "Lo", "M", "Mn", "Mc", "Me", "N", "Nd", "Nl", "No", "P",
                      "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "S", "Sm", "Sc", "Sk", "So", "Z", "Zs", "Zl",
                      "Zp"}


def _python_regex(pattern, where):
    r"""A `tokenizers` regex (Oniguruma syntax) as a compiled Python re: \p{X} / \P{X} become explicit classes
    of the Unicode category X, \s / \S Oniguruma's whitespace (Python's \s also takes \x1c-\x1f). Syntax
    whose meaning differs between the two engines (\d, \w, \b, anchors, nested or intersected classes) is
    refused."""
    def refuse(what):
        return DataError(f"{where}: {what} is not implemented (regex {pattern!r})")

    out = []
    i = 0
    in_class = False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            code = pattern[i + 1]
            if code in "pP":
                found = re.match(r"\{(\^?)(\w+)\}", pattern[i + 2:])
                if not found or found.group(2) not in UNICODE_CATEGORIES:
                    raise refuse(f"the Unicode property {pattern[i:i + 12]!r}")
                body = _unicode_class(found.group(2))
                negated = (code == "P") != bool(found.group(1))
                i += 2 + found.end()
            elif code in "sS":
                body = _unicode_class("White_Space")
                negated = code == "S"
                i += 2
            # control characters, escaped punctuation: the same
            elif code in "rntfv" or not code.isalnum():
                out.append(pattern[i:i + 2])
                i += 2
                continue
            else:
                raise refuse(f"the escape \\{code}")
            if in_class and negated:
                raise refuse("a negated property inside [...]")
            out.append(body if in_class else f"[{'^' if negated else ''}{body}]")
            continue
        if char == "[" and in_class or pattern.startswith("&&", i) and in_class:
            raise refuse("a nested or intersected character class")
        if char in "^$" and not in_class:
            raise refuse(f"the anchor {char!r}")
        out.append(char)
        i += 1
        if char == "[":
            in_class = True
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):  # a "]" first in a class is a literal
                out.append("\\]")
                i += 1
        elif char == "]" and in_class:
            in_class = False
    try:
        return re.compile("".join(out))
    except re.error as e:
        raise DataError(f"{where}: regex {pattern!r} does not translate to Python's re ({e})") from None


def _split_isolated(regex):
    """A pre-tokenizer step: every match of regex becomes a piece of its own, and so does
    the text between matches (`tokenizers`' "Isolated" split behaviour)."""
    def split(piece):
        pieces = []
        end = 0
        for match in regex.finditer(piece):
            if match.end() == match.start():  # an empty match cuts nothing
                continue
            if match.start() > end:
                pieces.append(piece[end:match.start()])
            pieces.append(match.group())
            end = match.end()
        if end < len(piece):
            pieces.append(piece[end:])
        return pieces
    return split


def _byte_level(add_prefix_space, use_regex, where):
    """The ByteLevel pre-tokenizer: a space before each piece that lacks one
    (add_prefix_space), GPT-2's split (use_regex), then every byte as its printable
    character."""
    split = _split_isolated(_python_regex(GPT2_PATTERN, where)) if use_regex else lambda piece: [piece]

    def step(piece):
        if add_prefix_space and not piece.startswith(" "):
            piece = " " + piece
        return ["".join(BYTE_TO_CHAR[b] for b in part.encode("utf-8")) for part in split(piece)]
    return step


def _pre_tokenizer_steps(spec, where):
    """tokenizer.json's pre_tokenizer -> a list of functions, piece -> pieces, applied in
    order. Exactly one ByteLevel step must be among them (else this is not a byte-level
    BPE)."""
    if not isinstance(spec, dict):
        raise DataError(f"{where}: expected an object, got {spec!r}")
    kind = spec.get("type")
    if kind == "Sequence":
        return [step for k, inner in enumerate(spec.get("pretokenizers") or [])
                for step in _pre_tokenizer_steps(inner, f"{where}.pretokenizers[{k}]")]
    if kind == "ByteLevel":
        step = _byte_level(spec.get("add_prefix_space", True), spec.get("use_regex", True), where)
        # marks the ByteLevel step (ByteLevelBPE)
        step.add_prefix_space = spec.get("add_prefix_space", True)
        return [step]
    # tokenizers splits on char::is_numeric, the Unicode categories Nd, Nl and No
    if kind == "Digits":
        run = "" if spec.get("individual_digits", False) else "+"
        return [_split_isolated(_python_regex(r"\p{N}" + run, where))]
    if kind == "Split":
        pattern = spec.get("pattern") or {}
        behavior = spec.get("behavior")
        invert = spec.get("invert", False)
        if behavior != "Isolated" or invert:
            raise DataError(f"{where}: Split with behavior={behavior!r}, invert={invert!r} is not "
                            "implemented (only behavior 'Isolated', invert false)")
        if "Regex" in pattern:
            return [_split_isolated(_python_regex(pattern["Regex"], where))]
        if "String" in pattern:
            return [_split_isolated(re.compile(re.escape(pattern["String"])))]
        raise DataError(f"{where}: Split pattern {pattern!r} is neither Regex nor String")
    raise DataError(f"{where}: pre-tokenizer type {kind!r} is not implemented (ByteLevel, Split, Digits, "
                    "Sequence)")


def _normalizer(spec, where):
    """tokenizer.json's normalizer -> a function text -> text: none, NFC (Qwen, OLMo) or a Sequence."""
    kind = spec.get("type") if isinstance(spec, dict) else spec
    if spec is None:
        return lambda text: text
    if kind == "NFC":
        return functools.partial(unicodedata.normalize, "NFC")
    if kind == "Sequence":
        steps = [_normalizer(inner, f"{where}.normalizers[{k}]")
                 for k, inner in enumerate(spec.get("normalizers") or [])]
        return functools.partial(functools.reduce, lambda text, step: step(text), steps)
    raise DataError(f"{where} {kind!r} is not implemented (NFC, Sequence) ({spec!r})")


def _check_added_token(token, where):
    if not isinstance(token, dict) or not isinstance(token.get("content"), str) or not token["content"] \
            or type(token.get("id")) is not int:
        raise DataError(f"{where}: {token!r} is not an added token (content, id)")
    for flag in ("special", "single_word", "lstrip", "rstrip", "normalized"):
        if not isinstance(token.get(flag, False), bool):
            raise DataError(f"{where}: {flag}={token[flag]!r} is not true or false")


def _word_char(char):
    r"""Rust regex's \w, which single_word tests next to a match: Unicode Alphabetic (taken as the letters,
    the letter numbers and the circled and squared Latin letters), marks, decimal digits, connector
    punctuation and the joiners."""
    if not char:
        return False
    category = unicodedata.category(char)
    code = ord(char)
    return (category[0] in "LM" or category in ("Nd", "Nl", "Pc") or char in "\u200c\u200d"
            or 0x24B6 <= code <= 0x24E9 or 0x1F130 <= code <= 0x1F149 or 0x1F150 <= code <= 0x1F169
            or 0x1F170 <= code <= 0x1F189)


def _added_token_finder(tokens, normalize):
    """A function text -> [(piece, added token or None)] covering the text, as
    `tokenizers`' AddedVocabulary finds its tokens: at the leftmost place where any
    matches, the longest (its content normalized when the token says normalized=true);
    single_word drops a match inside a word, lstrip / rstrip take the whitespace before /
    after a match into it. A special token found is left as text (encode never makes one),
    and no other token is looked for inside it: `tokenizers` with
    encode_special_tokens=True does the same."""
    by_pattern = {}
    # tokenizers: special ones first
    for token in sorted(tokens, key=lambda token: not token.get("special")):
        by_pattern.setdefault(normalize(token["content"]), token)
    if not by_pattern:
        return lambda text: [(text, None)]
    # longest first: Python's re takes the first alternative that matches at the leftmost place
    regex = re.compile("|".join(map(re.escape, sorted(by_pattern, key=len, reverse=True))))

    def find(text):
        pieces = []
        done = 0
        for match in regex.finditer(text):
            token = by_pattern[match.group()]
            start = match.start()
            stop = match.end()
            if token.get("special"):
                continue
            inside_a_word = _word_char(text[start - 1:start]) or _word_char(text[stop:stop + 1])
            if token.get("single_word") and inside_a_word:
                continue
            while token.get("lstrip") and start > done and _white_space(text[start - 1]):
                start -= 1
            while token.get("rstrip") and stop < len(text) and _white_space(text[stop]):
                stop += 1
            if done < start:
                pieces.append((text[done:start], None))
            pieces.append((text[start:stop], token))
            done = stop
        return pieces + [(text[done:], None)] * (done < len(text))
    return find


def _special_token_content(value):
    """tokenizer_config.json writes a special token as its text or as {"content": text, ...}."""
    return value.get("content") if isinstance(value, dict) else value


class ByteLevelBPE:
    """A byte-level BPE tokenizer read from tokenizer.json, with its special tokens from the files beside it.

    BOS is what the checkpoint's own tokenizer puts before a text: tokenizer.json's
    post_processor (a TemplateProcessing "<|begin_of_text|> $A", as Llama 3's) or
    tokenizer_config.json's add_bos_token; None if neither (GPT-2). EOS is
    tokenizer_config.json's eos_token (special_tokens_map.json's in older folders), else
    generation_config.json's eos_token_id (the first of a list). The pad id is a special
    token (never produced from text) other than EOS: tokenizer_config.json's pad_token if
    it is one, else the first special token that is neither BOS nor EOS, else BOS, else
    EOS itself (GPT-2: see Tokenizer)."""

    def __init__(self, path):
        spec = _read_json_object(path)
        # file name in a checkpoint -> the file read
        self.path, self.files = path, {"tokenizer.json": path}
        for key in ("truncation", "padding"):
            if spec.get(key) is not None:
                raise DataError(f"{path}: {key}={spec[key]!r} is not implemented (it changes what encode "
                                "returns)")
        # content -> id: special added tokens; content -> the others
        self.special_ids, self.added = {}, {}
        for k, token in enumerate(spec.get("added_tokens") or []):
            _check_added_token(token, f"{path}: added_tokens[{k}]")
            if token["special"]:
                self.special_ids[token["content"]] = token["id"]
            else:
                self.added[token["content"]] = token
        # first: it says best what kind of tokenizer this is
        self._read_model(spec.get("model") or {})
        self.normalize = _normalizer(spec.get("normalizer"), f"{path}: normalizer")
        decoder = spec.get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            raise DataError(f"{path}: decoder {decoder.get('type')!r} is not implemented (ByteLevel only)")
        self.steps = _pre_tokenizer_steps(spec.get("pre_tokenizer"), f"{path}: pre_tokenizer")
        byte_level = [step.add_prefix_space for step in self.steps if hasattr(step, "add_prefix_space")]
        if len(byte_level) != 1:
            raise DataError(f"{path}: pre_tokenizer {spec.get('pre_tokenizer')!r} has no ByteLevel step (or "
                            "several): not a byte-level BPE tokenizer")
        self.add_prefix_space = byte_level[0]
        # added tokens are found in the text before anything else, in two passes: those
        # with normalized=false in the text as given, the others in the normalized text
        # (special ones too, then skipped: see encode)
        added_tokens = spec.get("added_tokens") or []
        self.find_raw = _added_token_finder([t for t in added_tokens if not t.get("normalized", True)], str)
        self.find_normalized = _added_token_finder([t for t in added_tokens if t.get("normalized", True)],
                                                   self.normalize)
        added_ids = [token["id"] for token in added_tokens]
        self.vocab_size = 1 + max([*self.vocab.values(), *added_ids])
        self.token_bytes = {i: bytes(CHAR_TO_BYTE[c] for c in token) for token, i in self.vocab.items()
                            if i not in added_ids}
        # decoded as their text, as `tokenizers` decodes them
        for content, token in self.added.items():
            self.token_bytes[token["id"]] = content.encode("utf-8")
        self.cache = {}  # word -> ids: text repeats its words
        folder = os.path.dirname(os.path.abspath(path))
        config = self._read_tokenizer_config(folder)
        self.bos_id = self._bos_id(spec.get("post_processor"), config, folder)
        self.eos_id = self._eos_id(config, folder)
        special = set(self.special_ids.values())
        pad_content = _special_token_content(config.get("pad_token"))
        preferred = [self.special_ids[pad_content]] if pad_content in self.special_ids else []
        candidates = preferred + sorted(special - {self.bos_id}) + [self.bos_id]
        # GPT-2 has no special token but EOS: padding with it is safe, as the project
        # builds every mask from lengths and never compares ids with pad_id (README,
        # Models)
        self.pad_id = next((i for i in candidates if i in special and i != self.eos_id), self.eos_id)

    def _read_model(self, model):
        where = f"{self.path}: model"
        if model.get("type") != "BPE":
            raise DataError(f"{where}.type={model.get('type')!r} is not implemented (BPE only)")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
            if model.get(key) not in (None, "", False):
                sentencepiece_style = key == "byte_fallback"
                hint = " (a sentencepiece-style BPE: open the folder's tokenizer.model)" * sentencepiece_style
                raise DataError(f"{where}.{key}={model[key]!r} is not implemented{hint}")
        self.vocab, self.ignore_merges = model.get("vocab") or {}, bool(model.get("ignore_merges"))
        not_bytes = [t for t in self.vocab if t not in self.special_ids and t not in self.added
                     and any(c not in CHAR_TO_BYTE for c in t)]
        if not_bytes:
            raise DataError(f"{where}: not a byte-level vocabulary: tokens outside GPT-2's byte alphabet "
                            f"{not_bytes[:5]}")
        # A byte whose symbol the vocabulary lacks (SmolLM2 lacks 21 of 256) becomes
        # unk_token, or is dropped when there is none, before any merge, as `tokenizers`'
        # BPE.merge_word does.
        self.unk_token, self.fuse_unk = model.get("unk_token"), bool(model.get("fuse_unk"))
        if self.unk_token is not None and self.unk_token not in self.vocab:
            raise DataError(f"{where}.unk_token={self.unk_token!r} is not a token of the vocabulary")
        # (left, right) -> rank: the earlier a merge was learned, the sooner it applies
        self.merge_ranks = {}
        for rank, merge in enumerate(model.get("merges") or []):
            # "a b" or ["a", "b"]
            pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
            if len(pair) != 2 or any(part not in self.vocab for part in (*pair, "".join(pair))):
                raise DataError(f"{where}.merges[{rank}] {merge!r}: not two vocabulary tokens merging into "
                                "one")
            self.merge_ranks.setdefault(pair, rank)

    def _read_tokenizer_config(self, folder):
        """tokenizer_config.json (and the older special_tokens_map.json), where present;
        settings transformers applies on top of tokenizer.json that data.py does not
        implement are refused."""
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                self.files[name] = path
                for key, value in _read_json_object(path).items():
                    if key in config and _special_token_content(config[key]) != _special_token_content(value):
                        raise DataError(f"{folder}: special_tokens_map.json and tokenizer_config.json "
                                        f"disagree on {key}: {config[key]!r} and {value!r}")
                    config[key] = value
                    if key in ("add_eos_token", "do_lower_case") and value:
                        raise DataError(f"{path}: {key}={value!r} is not implemented")
                    if key == "add_prefix_space" and value is not None and value != self.add_prefix_space:
                        raise DataError(f"{path}: add_prefix_space={value!r} disagrees with tokenizer.json's "
                                        f"ByteLevel add_prefix_space={self.add_prefix_space!r}")
        return config

    def _token_id(self, content, where):
        found = self.special_ids.get(content, self.vocab.get(content))
        if found is None:
            raise DataError(f"{where} {content!r} is not a token of {self.path}")
        return found

    def _bos_id(self, post_processor, config, folder):
        prefix = self._template_prefix(post_processor, f"{self.path}: post_processor")
        bos = _special_token_content(config.get("bos_token"))
        add_bos = config.get("add_bos_token")
        if add_bos is not None and bool(add_bos) != bool(prefix):
            if prefix or not bos:
                raise DataError(f"{folder}: tokenizer_config.json's add_bos_token={add_bos!r} disagrees with "
                                f"tokenizer.json's post_processor, which puts {prefix!r} before a text")
            prefix = [self._token_id(bos, f"{folder}: tokenizer_config.json: bos_token")]
        if len(prefix) > 1:
            raise DataError(f"{self.path}: post_processor puts {prefix!r} before a text: more than one token "
                            "(BOS) is not implemented")
        return prefix[0] if prefix else None

    def _template_prefix(self, spec, where):
        """The ids a post_processor puts before the text: none (no post_processor,
        ByteLevel) or a TemplateProcessing's special tokens before $A. Tokens after $A are
        refused (encode appends EOS only where asked)."""
        if spec is None or spec.get("type") == "ByteLevel":
            return []
        if spec.get("type") == "Sequence":
            return [i for k, inner in enumerate(spec.get("processors") or [])
                    for i in self._template_prefix(inner, f"{where}.processors[{k}]")]
        if spec.get("type") != "TemplateProcessing":
            raise DataError(f"{where}: type {spec.get('type')!r} is not implemented (ByteLevel, "
                            "TemplateProcessing)")
        items = spec.get("single") or []
        named = spec.get("special_tokens") or {}
        if [k for k, item in enumerate(items) if "Sequence" in item] != [len(items) - 1]:
            raise DataError(f"{where}: single template {items!r} is not implemented (special tokens, then "
                            "$A)")
        names = [item.get("SpecialToken", {}).get("id") for item in items[:-1]]
        ids = [i for name in names for i in named.get(name, {}).get("ids") or []]
        if any(name not in named for name in names) or any(i not in self.special_ids.values() for i in ids):
            raise DataError(f"{where}: single template {items!r} names tokens that are not special tokens")
        return ids

    def _eos_id(self, config, folder):
        eos = _special_token_content(config.get("eos_token"))
        if eos:
            return self._token_id(eos, f"{folder}: tokenizer_config.json: eos_token")
        generation = os.path.join(folder, "generation_config.json")
        eos = _read_json_object(generation).get("eos_token_id") if os.path.isfile(generation) else None
        if eos is None:
            raise DataError(f"{self.path}: no EOS token: neither tokenizer_config.json's eos_token nor "
                            f"generation_config.json's eos_token_id in {folder}")
        self.files["generation_config.json"] = generation
        # Llama 3 Instruct lists several; EOS is the first
        eos = eos[0] if isinstance(eos, list) else eos
        if eos not in self.special_ids.values():
            raise DataError(f"{generation}: eos_token_id {eos!r} is not a special token of {self.path}")
        return eos

    def encode(self, text):
        """Added tokens first (those matched as written, then, in the normalized rest, the
        others), then the pre-tokenizer and BPE on each piece between them, as
        `tokenizers`' AddedVocabulary.extract_and_normalize followed by the pipeline."""
        ids = []
        for raw, raw_token in self.find_raw(text):
            found = [(raw, raw_token)] if raw_token else self.find_normalized(self.normalize(raw))
            for piece, token in found:
                ids += [token["id"]] if token else self._encode_text(piece)
        return ids

    def _encode_text(self, text):
        pieces = [text] if text else []
        for step in self.steps:
            pieces = [part for piece in pieces for part in step(piece)]
        return [i for piece in pieces for i in self._merge(piece)]

    def _merge(self, word):
        """BPE on one pre-tokenized word: merge the lowest-ranked adjacent pair, all its
        occurrences left to right, until no adjacent pair has a rank (for merge lists
        learned in order, the same as `tokenizers`' queue)."""
        if word in self.cache:
            return self.cache[word]
        # Llama 3: a word that is a token stays whole
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        parts = self._symbols(word)
        while len(parts) > 1:
            rank, pair = min((self.merge_ranks.get(pair, math.inf), pair) for pair in zip(parts, parts[1:]))
            if rank == math.inf:
                break
            merged = []
            k = 0
            while k < len(parts):
                if k + 1 < len(parts) and (parts[k], parts[k + 1]) == pair:
                    merged.append(parts[k] + parts[k + 1])
                    k += 2
                else:
                    merged.append(parts[k])
                    k += 1
            parts = merged
        if len(self.cache) > 100_000:
            self.cache.clear()
        ids = self.cache[word] = [self.vocab[part] for part in parts]
        return ids

    def _symbols(self, word):
        """The word's byte symbols before any merge. One the vocabulary lacks is dropped,
        or becomes unk_token (one for a run of them with fuse_unk), as `tokenizers`'
        BPE.merge_word."""
        symbols = []
        for char in word:
            if char in self.vocab:
                symbols.append(char)
            elif self.unk_token is not None and not (self.fuse_unk and symbols and symbols[-1] is None):
                # an unknown run, fused or not; None marks it until the run ends
                symbols.append(None)
        return [self.unk_token if symbol is None else symbol for symbol in symbols]

    def piece_bytes(self, token_id):
        # special tokens (and unused ids) cover no text
        return self.token_bytes.get(int(token_id), b"")

    def decode(self, ids):
        return b"".join(self.piece_bytes(i) for i in ids).decode("utf-8", "replace")


# ----------------------------------------------------------------------------- prompt and examples

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


def _count_prompt_tokens(tok: Tokenizer, full_ids: list[int], prompt: str, full_text: str) -> int:
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


def encode_prompt_response(tok: Tokenizer, prompt: str, response: str, max_len: int = 512,
                           finished: bool = True):
    """(prompt ids starting with BOS (if the tokenizer has one), response ids ending in EOS), or None.

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


def _read_json(path, expected_type, what):
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            problem = f"malformed JSON: {e.msg}, column {e.colno}"
            raise _fail(path, f"line {e.lineno}", None, problem) from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(data, expected_type):
        raise DataError(f"{path}: expected {what}, got {type(data).__name__}")
    return data


def _read_json_list(path) -> list:
    return _read_json(path, list, "a JSON list of records")


def _read_json_object(path) -> dict:
    return _read_json(path, dict, "a JSON object")


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
    """The authors' ranking release: JSON list of {instruction (already templated), id,
    output: [str], score: [float]}. Candidates are sorted by score, highest first, ties
    kept in file order (a stable sort, as the authors' code); source["ranks"] keeps the
    original positions, best first.

    skipped: a list to receive one message per record left out because of its content (an
    empty output, a non-finite score), so that one bad record among 52K does not stop a
    run; the caller reports them. Without it such a record raises, as does anything that
    is not the release's shape."""
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
            outputs = _check_texts(obj["output"], path, where, "output", 2)
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


def read_ranked_jsonl(path) -> list[RankedRecord]:
    """The project's ranked JSONL (format in RankedRecord's docstring)."""
    records = []
    seen = {}
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
            # as read
            _check_unique_id(seen, _ranked_record_from_dict(obj, path, where).id, path, where)
            try:
                yield json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n"
            except (TypeError, ValueError) as e:
                raise _fail(path, where, "source", f"not JSON-serialisable ({e})") from None
    write_atomic(path, lines())


# ----------------------------------------------------------------------------- files a kill may interrupt

def write_atomic(path, text):
    """Write text (a string, or an iterable of strings written one by one) to path as
    UTF-8, through a temporary file in the same folder and a rename: a kill or an error
    leaves the old file or the new one, never half of one. The project's one way to
    replace a file."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
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
            except (UnicodeDecodeError, json.JSONDecodeError):
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


# ----------------------------------------------------------------------------- files shared by processes

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


# ----------------------------------------------------------------------------- progress of long work

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


# ----------------------------------------------------------------------------- command-line values
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
                        "folder or file data.Tokenizer reads; default: estimated at 4 characters a token)")
    parser.add_argument("--price-per-1m-input", type=float, help="--dry-run: dollars per 1M prompt tokens")
    parser.add_argument("--price-per-1m-output", type=float,
                        help="--dry-run: dollars per 1M completion tokens")


# ----------------------------------------------------------------------------- generate once and keep it

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
