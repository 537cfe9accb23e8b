"""Text <-> token ids for a checkpoint: sentencepiece's tokenizer.model or a byte-level BPE tokenizer.json.

It works copied alone into another project: it needs the standard library and sentencepiece, nothing more
(not Hugging Face's `tokenizers`: tokenizer.json is read by hand). Three parts, in this order: 1. Tokenizer,
the one class a caller uses, with LLaMA's conventions (BOS, EOS, pad and stop ids); 2. byte-level BPE itself
(the byte table, merging a word by ranks, encode, decode); 3. reading a tokenizer.json (normalizers,
pre-tokenizers, added and special tokens), where whatever is not implemented is refused with a
TokenizerError that names the file and the field. Copy with it: nothing else of this project.

    from tokenizer import Tokenizer
    tok = Tokenizer("llama-2-7b-hf/")                  # its tokenizer.model, else its tokenizer.json
    ids = tok.encode("Name a color.", bos=True)        # [BOS, ...]: never a special token from text
    text, stop_ids = tok.decode(ids), tok.stop_ids     # eos_id first
"""
import functools
import json
import math
import os
import re
import sys
import unicodedata

import sentencepiece as spm


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read, or that asks for what is not implemented; the message names the
    file and the field: "llama3/tokenizer.json: model.dropout=0.1 is not implemented"."""


# ---- 1. the Tokenizer with LLaMA's conventions

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
            raise TokenizerError(f"{path}: not a sentencepiece model ({e}){_tiktoken_hint(path)}") from None
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
            raise TokenizerError(f"{path}: eos_token_id {value!r} is not a token id (vocabulary size "
                                 f"{vocab_size})")
    files["generation_config.json"] = path
    return list(dict.fromkeys([eos_id, *listed]))


def _tiktoken_hint(path):
    """Meta's Llama 3 folders hold a tiktoken file named tokenizer.model: say so, not "not sentencepiece"."""
    with open(path, "rb") as f:
        first = f.readline(200).split()
    if len(first) == 2 and re.fullmatch(rb"[A-Za-z0-9+/=]+", first[0]) and first[1].isdigit():
        return ("; it is a tiktoken BPE file (Meta's Llama 3 release), which tokenizer.py does not read: use "
                "the Hugging Face release's tokenizer.json")
    return ""


# ---- 2. byte-level BPE

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
# behaviours) is refused by name (section 3).

def _byte_to_char():
    """GPT-2's table: printable bytes stand for themselves, the other 68 for chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {char: byte for byte, char in BYTE_TO_CHAR.items()}


class BytePairEncoding:
    """Byte-level BPE itself: text -> ids (added tokens cut out, the rest normalized, pre-tokenized into
    words, each word's byte symbols merged by rank) and ids -> text (each token's bytes).

    It reads no file: ByteLevelBPE (section 3) reads a tokenizer.json into what is used here: vocab
    (token -> id), merge_ranks ((left, right) -> rank), ignore_merges, unk_token, fuse_unk, token_bytes
    (id -> bytes), normalize (text -> text), steps (the pre-tokenizer: functions piece -> pieces, applied in
    order), find_raw and find_normalized (text -> [(piece, added token or None)]) and cache (word -> ids)."""

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

    def piece_bytes(self, token_id):
        # special tokens (and unused ids) cover no text
        return self.token_bytes.get(int(token_id), b"")

    def decode(self, ids):
        return b"".join(self.piece_bytes(i) for i in ids).decode("utf-8", "replace")


# ---- 3. reading a tokenizer.json

# A tokenizer.json and the files beside it, read into what BytePairEncoding uses; whatever they say
# that is not implemented is refused with a TokenizerError naming the file and the field.

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
        return TokenizerError(f"{where}: {what} is not implemented (regex {pattern!r})")

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
        raise TokenizerError(f"{where}: regex {pattern!r} does not translate to Python's re ({e})") from None


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
        raise TokenizerError(f"{where}: expected an object, got {spec!r}")
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
            raise TokenizerError(f"{where}: Split with behavior={behavior!r}, invert={invert!r} is not "
                                 "implemented (only behavior 'Isolated', invert false)")
        if "Regex" in pattern:
            return [_split_isolated(_python_regex(pattern["Regex"], where))]
        if "String" in pattern:
            return [_split_isolated(re.compile(re.escape(pattern["String"])))]
        raise TokenizerError(f"{where}: Split pattern {pattern!r} is neither Regex nor String")
    raise TokenizerError(f"{where}: pre-tokenizer type {kind!r} is not implemented (ByteLevel, Split, "
                         "Digits, Sequence)")


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
    raise TokenizerError(f"{where} {kind!r} is not implemented (NFC, Sequence) ({spec!r})")


def _check_added_token(token, where):
    if not isinstance(token, dict) or not isinstance(token.get("content"), str) or not token["content"] \
            or type(token.get("id")) is not int:
        raise TokenizerError(f"{where}: {token!r} is not an added token (content, id)")
    for flag in ("special", "single_word", "lstrip", "rstrip", "normalized"):
        if not isinstance(token.get(flag, False), bool):
            raise TokenizerError(f"{where}: {flag}={token[flag]!r} is not true or false")


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


class ByteLevelBPE(BytePairEncoding):
    """A byte-level BPE tokenizer read from tokenizer.json, with its special tokens from the files beside it
    (the algorithm: BytePairEncoding).

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
                raise TokenizerError(f"{path}: {key}={spec[key]!r} is not implemented (it changes what "
                                     "encode returns)")
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
            raise TokenizerError(f"{path}: decoder {decoder.get('type')!r} is not implemented (ByteLevel "
                                 "only)")
        self.steps = _pre_tokenizer_steps(spec.get("pre_tokenizer"), f"{path}: pre_tokenizer")
        byte_level = [step.add_prefix_space for step in self.steps if hasattr(step, "add_prefix_space")]
        if len(byte_level) != 1:
            raise TokenizerError(f"{path}: pre_tokenizer {spec.get('pre_tokenizer')!r} has no ByteLevel step "
                                 "(or several): not a byte-level BPE tokenizer")
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
            raise TokenizerError(f"{where}.type={model.get('type')!r} is not implemented (BPE only)")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
            if model.get(key) not in (None, "", False):
                sentencepiece_style = key == "byte_fallback"
                hint = " (a sentencepiece-style BPE: open the folder's tokenizer.model)" * sentencepiece_style
                raise TokenizerError(f"{where}.{key}={model[key]!r} is not implemented{hint}")
        self.vocab, self.ignore_merges = model.get("vocab") or {}, bool(model.get("ignore_merges"))
        not_bytes = [t for t in self.vocab if t not in self.special_ids and t not in self.added
                     and any(c not in CHAR_TO_BYTE for c in t)]
        if not_bytes:
            raise TokenizerError(f"{where}: not a byte-level vocabulary: tokens outside GPT-2's byte "
                                 f"alphabet {not_bytes[:5]}")
        # A byte whose symbol the vocabulary lacks (SmolLM2 lacks 21 of 256) becomes
        # unk_token, or is dropped when there is none, before any merge, as `tokenizers`'
        # BPE.merge_word does.
        self.unk_token, self.fuse_unk = model.get("unk_token"), bool(model.get("fuse_unk"))
        if self.unk_token is not None and self.unk_token not in self.vocab:
            raise TokenizerError(f"{where}.unk_token={self.unk_token!r} is not a token of the vocabulary")
        # (left, right) -> rank: the earlier a merge was learned, the sooner it applies
        self.merge_ranks = {}
        for rank, merge in enumerate(model.get("merges") or []):
            # "a b" or ["a", "b"]
            pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
            if len(pair) != 2 or any(part not in self.vocab for part in (*pair, "".join(pair))):
                raise TokenizerError(f"{where}.merges[{rank}] {merge!r}: not two vocabulary tokens merging "
                                     "into one")
            self.merge_ranks.setdefault(pair, rank)

    def _read_tokenizer_config(self, folder):
        """tokenizer_config.json (and the older special_tokens_map.json), where present;
        settings transformers applies on top of tokenizer.json that tokenizer.py does not
        implement are refused."""
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                self.files[name] = path
                for key, value in _read_json_object(path).items():
                    if key in config and _special_token_content(config[key]) != _special_token_content(value):
                        raise TokenizerError(f"{folder}: special_tokens_map.json and tokenizer_config.json "
                                             f"disagree on {key}: {config[key]!r} and {value!r}")
                    config[key] = value
                    if key in ("add_eos_token", "do_lower_case") and value:
                        raise TokenizerError(f"{path}: {key}={value!r} is not implemented")
                    if key == "add_prefix_space" and value is not None and value != self.add_prefix_space:
                        raise TokenizerError(f"{path}: add_prefix_space={value!r} disagrees with "
                                             "tokenizer.json's ByteLevel "
                                             f"add_prefix_space={self.add_prefix_space!r}")
        return config

    def _token_id(self, content, where):
        found = self.special_ids.get(content, self.vocab.get(content))
        if found is None:
            raise TokenizerError(f"{where} {content!r} is not a token of {self.path}")
        return found

    def _bos_id(self, post_processor, config, folder):
        prefix = self._template_prefix(post_processor, f"{self.path}: post_processor")
        bos = _special_token_content(config.get("bos_token"))
        add_bos = config.get("add_bos_token")
        if add_bos is not None and bool(add_bos) != bool(prefix):
            if prefix or not bos:
                raise TokenizerError(f"{folder}: tokenizer_config.json's add_bos_token={add_bos!r} disagrees "
                                     f"with tokenizer.json's post_processor, which puts {prefix!r} before a "
                                     "text")
            prefix = [self._token_id(bos, f"{folder}: tokenizer_config.json: bos_token")]
        if len(prefix) > 1:
            raise TokenizerError(f"{self.path}: post_processor puts {prefix!r} before a text: more than one "
                                 "token (BOS) is not implemented")
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
            raise TokenizerError(f"{where}: type {spec.get('type')!r} is not implemented (ByteLevel, "
                                 "TemplateProcessing)")
        items = spec.get("single") or []
        named = spec.get("special_tokens") or {}
        if [k for k, item in enumerate(items) if "Sequence" in item] != [len(items) - 1]:
            raise TokenizerError(f"{where}: single template {items!r} is not implemented (special tokens, "
                                 "then $A)")
        names = [item.get("SpecialToken", {}).get("id") for item in items[:-1]]
        ids = [i for name in names for i in named.get(name, {}).get("ids") or []]
        if any(name not in named for name in names) or any(i not in self.special_ids.values() for i in ids):
            raise TokenizerError(f"{where}: single template {items!r} names tokens that are not special "
                                 "tokens")
        return ids

    def _eos_id(self, config, folder):
        eos = _special_token_content(config.get("eos_token"))
        if eos:
            return self._token_id(eos, f"{folder}: tokenizer_config.json: eos_token")
        generation = os.path.join(folder, "generation_config.json")
        eos = _read_json_object(generation).get("eos_token_id") if os.path.isfile(generation) else None
        if eos is None:
            raise TokenizerError(f"{self.path}: no EOS token: neither tokenizer_config.json's eos_token nor "
                                 f"generation_config.json's eos_token_id in {folder}")
        self.files["generation_config.json"] = generation
        # Llama 3 Instruct lists several; EOS is the first
        eos = eos[0] if isinstance(eos, list) else eos
        if eos not in self.special_ids.values():
            raise TokenizerError(f"{generation}: eos_token_id {eos!r} is not a special token of {self.path}")
        return eos


def _read_json_object(path):
    """A UTF-8 JSON file holding an object (tokenizer.json and the configs beside it); TokenizerError names
    the file, and the line of malformed JSON."""
    with open(path, encoding="utf-8") as f:
        try:
            spec = json.load(f)
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path}, line {e.lineno}: malformed JSON: {e.msg}, "
                                 f"column {e.colno}") from None
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(spec, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(spec).__name__}")
    return spec
