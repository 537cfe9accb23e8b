"""Text <-> token ids for a checkpoint: sentencepiece's tokenizer.model, a BPE tokenizer.json or Meta's
tiktoken.

It works copied alone into another project: it needs the standard library and sentencepiece, nothing more
(not Hugging Face's `tokenizers`: tokenizer.json is read by hand). Four parts, in this order: 1. Tokenizer,
the one class a caller uses, with LLaMA's conventions (BOS, EOS, pad and stop ids); 2. BPE itself (the
byte table, merging a word by ranks, encode, decode); 3. reading a tokenizer.json, byte-level (GPT-2,
Llama 3) or sentencepiece-style (Llama 2, Mistral): normalizers, pre-tokenizers, decoders, added and special
tokens, where whatever is not implemented is refused with a TokenizerError that names the file and the
field; 4. reading Meta's Llama 3 tokenizer.model (tiktoken). Copy with it: nothing else of
this project.

    from tokenizer import Tokenizer
    tok = Tokenizer("llama-2-7b-hf/")                  # its tokenizer.model, else its tokenizer.json
    ids = tok.encode("Name a color.", bos=True)        # [BOS, ...]: never a special token from text
    text, stop_ids = tok.decode(ids), tok.stop_ids     # eos_id first
"""
import base64
import binascii
import functools
import heapq
import json
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
    tokenizer.model when the folder has one (sentencepiece: LLaMA 1/2, Mistral, TinyLlama; or
    tiktoken: Meta's own Llama 3 folders, see MetaLlama3Tiktoken), else tokenizer.json
    (BPE, byte-level: Llama 3, SmolLM2, or sentencepiece-style: Llama 2, Mistral; see
    TokenizerJson). A file path opens that file.

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
    A BPE tokenizer pads with a special token other than EOS (TokenizerJson), or with
    EOS where it has no other (GPT-2): safe here, as every mask the project builds comes from
    lengths, never from comparing ids with pad_id.
"""

    def __init__(self, model_path):
        path = str(model_path)
        # a checkpoint folder: tokenizer.model first, as LLaMA 1/2 and Mistral folders hold both (they can
        # differ on spaces: README, Models)
        if os.path.isdir(path):
            found = [os.path.join(path, name) for name in ("tokenizer.model", "tokenizer.json")
                     if os.path.isfile(os.path.join(path, name))]
            if not found:
                raise FileNotFoundError(f"tokenizer model not found: {path} has neither tokenizer.model "
                                        "(sentencepiece or tiktoken) nor tokenizer.json (BPE)")
            path = found[0]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        self.sp = self.bpe = None
        if path.endswith(".json"):
            self.bpe = TokenizerJson(path)
        elif _is_tiktoken_file(path):
            self.bpe = MetaLlama3Tiktoken(path)
        else:
            self._open_sentencepiece(path)
        if self.bpe:
            self.vocab_size, self.bos_id, self.eos_id = self.bpe.vocab_size, self.bpe.bos_id, self.bpe.eos_id
            self.pad_id, self.files = self.bpe.pad_id, self.bpe.files
        folder = os.path.dirname(os.path.abspath(path))
        self.stop_ids = _stop_ids(self.eos_id, folder, self.vocab_size, self.files)

    def _open_sentencepiece(self, path):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        # sentencepiece raises OSError or RuntimeError depending on version
        except Exception as e:
            raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from None
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


def _is_tiktoken_file(path):
    """Whether a tokenizer.model is a tiktoken BPE file (Meta's Llama 3 folders): text whose first line is a
    base64 token and its rank. A sentencepiece model is a binary protobuf."""
    with open(path, "rb") as f:
        first = f.readline(200).split()
    return len(first) == 2 and bool(re.fullmatch(rb"[A-Za-z0-9+/=]+", first[0])) and first[1].isdigit()


# ---- 2. BPE

# The tokenizer of GPT-2, Llama 2 and 3, Mistral, SmolLM2 and most recent models, read from Hugging Face's
# tokenizer.json (or Meta's tiktoken file) by hand: the `tokenizers` package is not needed. Encoding a text
# takes these steps, as in `tokenizers`:
#   0. added tokens that are not special (DeepSeek's "<｜User｜>", Qwen's "<think>") are cut out of the text
#      first, and the rest is normalized (NFC for Qwen; "▁" for spaces in Llama 2's file; most have none);
#   1. pre-tokenize: regexes cut the text into words ("Hello", " world", "!", " 123"); byte-level files then
#      spell each word's UTF-8 bytes with printable characters, one per byte (GPT-2's table), so any text is
#      spelled with 256 symbols (a vocabulary lacking a symbol drops that byte, as `tokenizers` does);
#      sentencepiece-style files write each space as "▁" (Metaspace) instead, or in the normalizer;
#   2. BPE: from single symbols (characters; in a sentencepiece-style file a character the vocabulary lacks
#      becomes its bytes, "<0xE6>" pieces), the adjacent pair with the lowest merge rank is merged until no
#      pair has one.
# Decoding runs the file's decoder over the tokens' strings. Special tokens are never produced from text.
# Everything else a tokenizer.json may say (another normalizer, model type, decoder, other pre-tokenizers or
# split behaviours) is refused by name (section 3).

def _byte_to_char():
    """GPT-2's table: printable bytes stand for themselves, the other 68 for chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {char: byte for byte, char in BYTE_TO_CHAR.items()}


def merge_by_rank(symbols, merge_ranks):
    """BPE's rule: merge the adjacent pair with the lowest rank (the leftmost of equals) into one symbol,
    until no adjacent pair has a rank, as `tokenizers` applies it. symbols: a word's byte symbols;
    merge_ranks: (left, right) -> rank. Quadratic in the word's length: the reference merge_by_rank_fast is
    tested equal to."""
    parts = list(symbols)
    while True:
        ranked = [(merge_ranks[pair], k) for k, pair in enumerate(zip(parts, parts[1:]))
                  if pair in merge_ranks]
        if not ranked:
            return parts
        _, k = min(ranked)
        parts[k:k + 2] = [parts[k] + parts[k + 1]]


def merge_by_rank_fast(symbols, merge_ranks):
    """merge_by_rank in O(n log n) for a word of n symbols, as `tokenizers`' Word::merge_all: a heap of the
    adjacent pairs' (rank, position) over a linked list of the symbols. Positions are those of the symbols
    before any merge (a merged symbol keeps its left one's), so the smallest is the leftmost; an entry whose
    pair has changed since it was queued is skipped when it comes up."""
    parts = list(symbols)
    end = len(parts)
    # the linked list: the position of the symbol after / before each one (end / -1: none)
    after = list(range(1, end + 1))
    before = list(range(-1, end - 1))
    queue = [(merge_ranks[pair], k, pair) for k, pair in enumerate(zip(parts, parts[1:]))
             if pair in merge_ranks]
    heapq.heapify(queue)
    while queue:
        _, left, pair = heapq.heappop(queue)
        right = after[left]
        # stale: merged into its left neighbour, or it or its right neighbour has grown since
        if parts[left] is None or right == end or (parts[left], parts[right]) != pair:
            continue
        parts[left] += parts[right]
        parts[right] = None
        after[left] = after[right]
        if after[left] != end:
            before[after[left]] = left
        # the two pairs the merged symbol now forms
        for first, second in ((before[left], left), (left, after[left])):
            new_pair = (parts[first], parts[second]) if first >= 0 and second != end else None
            if new_pair in merge_ranks:
                heapq.heappush(queue, (merge_ranks[new_pair], first, new_pair))
    return [part for part in parts if part is not None]


class BytePairEncoding:
    """BPE itself: text -> ids (added tokens cut out, the rest normalized, pre-tokenized into words, each
    word's symbols merged by rank) and ids -> text (the tokens' strings through the file's decoder).

    It reads no file: TokenizerJson (section 3) and MetaLlama3Tiktoken (section 4) read one into what is used
    here: vocab (token -> id), merge_ranks ((left, right) -> rank), ignore_merges, byte_fallback, unk_token,
    fuse_unk, normalize (text -> text), steps (the pre-tokenizer: functions (piece, at_start) -> pieces,
    applied in order), find_raw and find_normalized (text -> [(piece, added token or None)]), tokens (id ->
    token, special ones left out), decoders (a list of (kind, setting), see decode_tokens), token_bytes (id ->
    bytes) and cache (word -> ids)."""

    def _merge(self, word):
        """BPE on one pre-tokenized word (merge_by_rank_fast), its ids cached."""
        if word in self.cache:
            return self.cache[word]
        # Llama 3: a word that is a token stays whole
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        parts = merge_by_rank_fast(self._symbols(word), self.merge_ranks)
        if len(self.cache) > 100_000:
            self.cache.clear()
        ids = self.cache[word] = [self.vocab[part] for part in parts]
        return ids

    def _symbols(self, word):
        """The word's symbols before any merge: its characters (in a byte-level file, one per byte). One the
        vocabulary lacks becomes its UTF-8 bytes as "<0xNN>" pieces with byte_fallback, else unk_token (one
        for a run of them with fuse_unk), else is dropped, as `tokenizers`' BPE.merge_word."""
        symbols = []
        for char in word:
            if char in self.vocab:
                symbols.append(char)
            elif self.byte_fallback:  # (the vocabulary holds all 256 byte pieces: section 3)
                symbols += [f"<0x{byte:02X}>" for byte in char.encode("utf-8")]
            elif self.unk_token is not None and not (self.fuse_unk and symbols and symbols[-1] is None):
                # an unknown run, fused or not; None marks it until the run ends
                symbols.append(None)
        return [self.unk_token if symbol is None else symbol for symbol in symbols]

    def encode(self, text):
        """Added tokens first (those matched as written, then, in the normalized rest, the
        others), then the pre-tokenizer and BPE on each piece between them, as
        `tokenizers`' AddedVocabulary.extract_and_normalize followed by the pipeline."""
        ids = []
        for k, (raw, raw_token) in enumerate(self.find_raw(text)):
            found = [(raw, raw_token)] if raw_token else self.find_normalized(self.normalize(raw))
            for j, (piece, token) in enumerate(found):
                ids += [token["id"]] if token else self._encode_text(piece, at_start=k == j == 0)
        return ids

    def _encode_text(self, text, at_start):
        """The pre-tokenizer and BPE on a text between added tokens; at_start: the text begins the whole text
        (Metaspace's prepend_scheme "first" puts "▁" there only)."""
        pieces = [(text, at_start)] if text else []
        for step in self.steps:
            pieces = [(part, first and k == 0) for piece, first in pieces
                      for k, part in enumerate(step(piece, first))]
        return [i for piece, _ in pieces for i in self._merge(piece)]

    def piece_bytes(self, token_id):
        # special tokens (and unused ids) cover no text
        return self.token_bytes.get(int(token_id), b"")

    def decode(self, ids):
        """The tokens' strings (special ones left out) through the file's decoder, as `tokenizers`' decode
        with skip_special_tokens."""
        return decode_tokens([self.tokens[i] for i in map(int, ids) if i in self.tokens], self.decoders)


def decode_tokens(tokens, decoders):
    """Token strings -> text, as `tokenizers`' decoders do it: each (kind, setting) of decoders turns the list
    of strings into another, in order, and the last list is joined. ByteLevel: each token's characters as
    the bytes GPT-2's table gives them, then the bytes as UTF-8; Replace (old, new) in each string;
    ByteFallback: runs of "<0xNN>" pieces as the UTF-8 text of their bytes (one U+FFFD per byte where
    invalid); Fuse: one string of all; Strip (character, start, stop): up to start of it cut from each
    string's start, up to stop from its end."""
    for kind, setting in decoders:
        if kind == "ByteLevel":
            tokens = [b"".join(map(byte_level_bytes, tokens)).decode("utf-8", "replace")]
        elif kind == "Replace":
            tokens = [token.replace(*setting) for token in tokens]
        elif kind == "ByteFallback":
            tokens = _byte_fallback(tokens)
        elif kind == "Fuse":
            tokens = ["".join(tokens)]
        elif kind == "Strip":
            tokens = [_strip(token, *setting) for token in tokens]
    return "".join(tokens)


def byte_level_bytes(token):
    """A byte-level token's bytes: its characters through GPT-2's table; an added token whose characters are
    not all in it (DeepSeek's "<｜User｜>") is its own UTF-8, as `tokenizers`' ByteLevel decoder."""
    if all(char in CHAR_TO_BYTE for char in token):
        return bytes(CHAR_TO_BYTE[char] for char in token)
    return token.encode("utf-8")


def _byte_fallback(tokens):
    merged = []
    run = []  # the bytes of consecutive "<0xNN>" pieces
    for token in [*tokens, None]:
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token) if token is not None else None
        if byte:
            run.append(int(byte.group(1), 16))
            continue
        if run:
            try:
                merged.append(bytes(run).decode("utf-8"))
            except UnicodeDecodeError:
                merged += ["\ufffd"] * len(run)
            run = []
        if token is not None:
            merged.append(token)
    return merged


def _strip(token, char, start, stop):
    begin = 0
    while begin < min(start, len(token)) and token[begin] == char:
        begin += 1
    end = len(token)
    while len(token) - end < stop and end > begin and token[end - 1] == char:
        end -= 1
    return token[begin:end]


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


# a quantifier (?, *, +, {n}, {n,}, {n,m}, {,m}) with the ? (lazy) or + (possessive) that belongs to it; an
# atom: an escape (\p{L} whole), a character class, or one character
QUANTIFIER = re.compile(r"(?:[?*+]|\{(?=,?\d)\d*,?\d*\})[?+]?")
ATOM = re.compile(r"\\(?:[pPx]\{[^}]*\}|.)|\[\^?\]?(?:\\.|[^\]\\])*\]|.", re.DOTALL)


def _nested_quantifier(pattern):
    """The first group of a regex that repeats (*, +, {n,m} with m > 1) and holds a quantifier itself, as
    written ("(a+)+"), or None. Python's re backtracks through every way of sharing a text between the two
    quantifiers, exponentially many where the rest does not match ("(a+)+b" on "aaa...a")."""
    open_groups = []  # [where it starts, holds a quantifier] of each group open here
    last = None  # the same for the atom or group just before, which a quantifier applies to
    i = 0
    while i < len(pattern):
        quantifier = QUANTIFIER.match(pattern, i)
        if quantifier and last is not None:
            start, holds = last
            if holds and _repeats(quantifier.group()):
                return pattern[start:quantifier.end()]
            if open_groups:
                open_groups[-1][1] = True
            last = None
            i = quantifier.end()
        elif pattern[i] == "(":
            # past "(?:", "(?i:", "(?!", "(?<=", "(?<name>": none of them is a quantifier
            prefix = re.match(r"\((?:\?(?:[imsx-]*:|[=!>]|<[=!]|P?<\w+>))?", pattern[i:])
            open_groups.append([i, False])
            last = None
            i += prefix.end()
        elif pattern[i] == ")" and open_groups:
            last = open_groups.pop()
            if last[1] and open_groups:
                open_groups[-1][1] = True
            i += 1
        else:
            last = [i, False]
            i = ATOM.match(pattern, i).end()
    return None


def _repeats(quantifier):
    """Whether a quantifier ("+", "{1,3}", "?") lets what it follows match more than once."""
    counts = re.fullmatch(r"\{(\d*)(,?)(\d*)\}[?+]?", quantifier)
    if counts is None:
        return quantifier[0] in "*+"
    low, comma, high = counts.groups()
    unbounded = comma and not high
    return bool(unbounded) or int(high or low) > 1


def _split_isolated(regex):
    """A pre-tokenizer step: every match of regex becomes a piece of its own, and so does
    the text between matches (`tokenizers`' "Isolated" split behaviour)."""
    def split(piece, at_start):
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
    def whole(piece, at_start):
        return [piece]
    split = _split_isolated(_python_regex(GPT2_PATTERN, where)) if use_regex else whole

    def step(piece, at_start):
        if add_prefix_space and not piece.startswith(" "):
            piece = " " + piece
        return ["".join(BYTE_TO_CHAR[b] for b in part.encode("utf-8")) for part in split(piece, at_start)]
    return step


def _metaspace(spec, where):
    """The Metaspace pre-tokenizer of sentencepiece-style files: every space becomes the replacement ("▁"),
    one is put first where the piece lacks it (prepend_scheme "always": every piece; "first": the text's
    first piece only; "never"), and with split each replacement begins a new piece, as `tokenizers` does.
    Older files without prepend_scheme mean "always", or "never" with add_prefix_space false, and split
    defaults to true (`tokenizers`' Metaspace deserializer)."""
    replacement = spec.get("replacement")
    scheme = "never" if spec.get("add_prefix_space") is False else spec.get("prepend_scheme", "always")
    split = spec.get("split", True)
    if not isinstance(replacement, str) or len(replacement) != 1:
        raise TokenizerError(f"{where}: Metaspace replacement={replacement!r} is not one character")
    if scheme not in ("first", "always", "never") or not isinstance(split, bool):
        raise TokenizerError(f"{where}: Metaspace prepend_scheme={scheme!r}, split={split!r} is not "
                             "implemented (prepend_scheme first, always or never; split true or false)")

    def step(piece, at_start):
        piece = piece.replace(" ", replacement)
        prepend = scheme == "always" or scheme == "first" and at_start
        if prepend and not piece.startswith(replacement):
            piece = replacement + piece
        if not split:
            return [piece]
        # each replacement begins a piece (`tokenizers`' MergedWithNext)
        return [part for part in re.split(f"(?={re.escape(replacement)})", piece) if part]
    return step


def _pre_tokenizer_steps(spec, where, byte_level):
    """tokenizer.json's pre_tokenizer -> a list of functions, (piece, at_start) -> pieces,
    applied in order. byte_level: the file's decoder is ByteLevel, so exactly one ByteLevel
    step must be among them (TokenizerJson checks) and no Metaspace; else no ByteLevel step."""
    if spec is None and not byte_level:  # sentencepiece-style files from before Metaspace: the normalizer
        return []
    if not isinstance(spec, dict):
        raise TokenizerError(f"{where}: expected an object, got {spec!r}")
    kind = spec.get("type")
    if kind == "Sequence":
        return [step for k, inner in enumerate(spec.get("pretokenizers") or [])
                for step in _pre_tokenizer_steps(inner, f"{where}.pretokenizers[{k}]", byte_level)]
    if kind == "ByteLevel" and byte_level:
        step = _byte_level(spec.get("add_prefix_space", True), spec.get("use_regex", True), where)
        # marks the ByteLevel step (TokenizerJson)
        step.add_prefix_space = spec.get("add_prefix_space", True)
        return [step]
    if kind == "Metaspace" and not byte_level:
        return [_metaspace(spec, where)]
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
            nested = _nested_quantifier(pattern["Regex"])
            if nested:
                raise TokenizerError(f"{where} Split pattern {pattern['Regex']!r} has a nested quantifier "
                                     f"{nested!r}, on which Python's re can take exponential time: not "
                                     "implemented")
            return [_split_isolated(_python_regex(pattern["Regex"], where))]
        if "String" in pattern:
            return [_split_isolated(re.compile(re.escape(pattern["String"])))]
        raise TokenizerError(f"{where}: Split pattern {pattern!r} is neither Regex nor String")
    decoder = "ByteLevel" if byte_level else "not ByteLevel"
    raise TokenizerError(f"{where}: pre-tokenizer type {kind!r} is not implemented where the decoder is "
                         f"{decoder} (ByteLevel or Metaspace, Split, Digits, Sequence)")


def _normalizer(spec, where):
    """tokenizer.json's normalizer -> a function text -> text: none, NFC (Qwen, OLMo), Prepend and Replace
    (Llama 2's "▁" for spaces) or a Sequence of them."""
    kind = spec.get("type") if isinstance(spec, dict) else spec
    if spec is None:
        return lambda text: text
    if kind == "NFC":
        return functools.partial(unicodedata.normalize, "NFC")
    if kind == "Prepend":
        prepend = spec.get("prepend")
        if not isinstance(prepend, str):
            raise TokenizerError(f"{where}: Prepend prepend={prepend!r} is not a string")
        # to a text that is not empty, as tokenizers does
        return lambda text: prepend + text if text else text
    if kind == "Replace":
        old, new = _string_replacement(spec, where)
        return lambda text: text.replace(old, new)
    if kind == "Sequence":
        steps = [_normalizer(inner, f"{where}.normalizers[{k}]")
                 for k, inner in enumerate(spec.get("normalizers") or [])]
        return functools.partial(functools.reduce, lambda text, step: step(text), steps)
    raise TokenizerError(f"{where} {kind!r} is not implemented (NFC, Prepend, Replace, Sequence) ({spec!r})")


def _string_replacement(spec, where):
    """A Replace normalizer's or decoder's (old, new) strings; a Regex pattern is refused."""
    pattern = spec.get("pattern") or {}
    old, new = pattern.get("String"), spec.get("content")
    if set(pattern) != {"String"} or not isinstance(old, str) or not old or not isinstance(new, str):
        raise TokenizerError(f"{where}: Replace pattern={pattern!r}, content={new!r} is not implemented "
                             "(a non-empty String pattern and a string content)")
    return old, new


def _decoders(spec, where):
    """tokenizer.json's decoder -> the (kind, setting) list decode_tokens runs: ByteLevel, or Replace,
    ByteFallback, Fuse and Strip (sentencepiece-style files), alone or in a Sequence."""
    kind = spec.get("type") if isinstance(spec, dict) else spec
    if kind == "Sequence":
        return [step for k, inner in enumerate(spec.get("decoders") or [])
                for step in _decoders(inner, f"{where}.decoders[{k}]")]
    if kind in ("ByteLevel", "ByteFallback", "Fuse"):
        return [(kind, None)]
    if kind == "Replace":
        return [(kind, _string_replacement(spec, where))]
    if kind == "Strip":
        setting = (spec.get("content"), spec.get("start"), spec.get("stop"))
        char, start, stop = setting
        if not isinstance(char, str) or len(char) != 1 or type(start) is not int or type(stop) is not int:
            raise TokenizerError(f"{where}: Strip content={char!r}, start={start!r}, stop={stop!r} is not "
                                 "one character and two counts")
        return [(kind, setting)]
    raise TokenizerError(f"{where} {kind!r} is not implemented (ByteLevel; or Replace, ByteFallback, Fuse, "
                         "Strip, Sequence)")


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


class TokenizerJson(BytePairEncoding):
    """A BPE tokenizer read from tokenizer.json, with its special tokens from the files beside it (the
    algorithm: BytePairEncoding). Two kinds, told apart by the decoder, as `tokenizers` builds them:
    byte-level (decoder ByteLevel: GPT-2, Llama 3, Qwen, SmolLM2), whose vocabulary spells bytes with GPT-2's
    table and whose pre-tokenizer has one ByteLevel step; and sentencepiece-style (decoders Replace,
    ByteFallback, Fuse, Strip: Llama 2, Mistral), whose vocabulary holds characters and "▁" for a space, put
    in by the normalizer (Prepend, Replace) or the Metaspace pre-tokenizer, and, with byte_fallback, the 256
    "<0xNN>" pieces for characters it lacks.

    BOS is what the checkpoint's own tokenizer puts before a text: tokenizer.json's
    post_processor (a TemplateProcessing "<|begin_of_text|> $A", as Llama 3's) or
    tokenizer_config.json's add_bos_token; None if neither (GPT-2). EOS is
    tokenizer_config.json's eos_token (special_tokens_map.json's in older folders), else
    generation_config.json's eos_token_id (the first of a list). Every token
    tokenizer_config.json names (bos, eos, pad, unk) must be one of the file's: in the
    vocabulary or an added token, special or not. The pad id is tokenizer_config.json's
    pad_token unless it is EOS, else the first special token (never produced from text)
    that is neither BOS nor EOS, else BOS, else EOS itself (GPT-2: see Tokenizer)."""

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
        # first: the decoder says which kind of tokenizer this is
        self.decoders = _decoders(spec.get("decoder"), f"{path}: decoder")
        self.byte_level = ("ByteLevel", None) in self.decoders
        self._read_model(spec.get("model") or {})
        self.normalize = _normalizer(spec.get("normalizer"), f"{path}: normalizer")
        self.steps = _pre_tokenizer_steps(spec.get("pre_tokenizer"), f"{path}: pre_tokenizer",
                                          self.byte_level)
        byte_level = [step.add_prefix_space for step in self.steps if hasattr(step, "add_prefix_space")]
        if self.byte_level and len(byte_level) != 1:
            raise TokenizerError(f"{path}: pre_tokenizer {spec.get('pre_tokenizer')!r} has no ByteLevel step "
                                 "(or several): not a byte-level BPE tokenizer")
        self.add_prefix_space = byte_level[0] if self.byte_level else None
        # added tokens are found in the text before anything else, in two passes: those
        # with normalized=false in the text as given, the others in the normalized text
        # (special ones too, then skipped: see encode)
        added_tokens = spec.get("added_tokens") or []
        self.find_raw = _added_token_finder([t for t in added_tokens if not t.get("normalized", True)], str)
        self.find_normalized = _added_token_finder([t for t in added_tokens if t.get("normalized", True)],
                                                   self.normalize)
        added_ids = [token["id"] for token in added_tokens]
        self.vocab_size = 1 + max([*self.vocab.values(), *added_ids])
        # what decode reads: the vocabulary's tokens, and the added ones that are not special as their text
        self.tokens = {i: token for token, i in self.vocab.items() if i not in added_ids}
        self.tokens.update({token["id"]: content for content, token in self.added.items()})
        self.token_bytes = {i: self._token_bytes(token) for i, token in self.tokens.items()}
        self.cache = {}  # word -> ids: text repeats its words
        folder = os.path.dirname(os.path.abspath(path))
        config = self._read_tokenizer_config(folder)
        self.bos_id = self._bos_id(spec.get("post_processor"), config, folder)
        self.eos_id = self._eos_id(config, folder)
        special = set(self.special_ids.values())
        pad_content = _special_token_content(config.get("pad_token"))
        where = f"{folder}: tokenizer_config.json: pad_token"
        preferred = [self._token_id(pad_content, where)] if pad_content else []
        candidates = preferred + sorted(special - {self.bos_id}) + [self.bos_id]
        # GPT-2 has no special token but EOS: padding with it is safe, as the project
        # builds every mask from lengths and never compares ids with pad_id (README,
        # Models)
        self.pad_id = next((i for i in candidates if (i in special or i in preferred) and i != self.eos_id),
                           self.eos_id)

    def _read_model(self, model):
        where = f"{self.path}: model"
        if model.get("type") != "BPE":
            raise TokenizerError(f"{where}.type={model.get('type')!r} is not implemented (BPE only)")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key) not in (None, "", False):
                raise TokenizerError(f"{where}.{key}={model[key]!r} is not implemented")
        self.vocab, self.ignore_merges = model.get("vocab") or {}, bool(model.get("ignore_merges"))
        self.byte_fallback = model.get("byte_fallback")
        if self.byte_fallback is not None and type(self.byte_fallback) is not bool:
            raise TokenizerError(f"{where}.byte_fallback={self.byte_fallback!r} is not true or false")
        if self.byte_level:
            if self.byte_fallback:
                raise TokenizerError(f"{where}.byte_fallback=True is not implemented in a byte-level BPE "
                                     "(decoder ByteLevel): every byte has a symbol")
            not_bytes = [t for t in self.vocab if t not in self.special_ids and t not in self.added
                         and any(c not in CHAR_TO_BYTE for c in t)]
            if not_bytes:
                raise TokenizerError(f"{where}: not a byte-level vocabulary: tokens outside GPT-2's byte "
                                     f"alphabet {not_bytes[:5]}")
        byte_pieces = [f"<0x{byte:02X}>" for byte in range(256)]
        lacking = [piece for piece in byte_pieces if piece not in self.vocab]
        if self.byte_fallback and lacking:
            raise TokenizerError(f"{where}.byte_fallback=True with a vocabulary lacking {len(lacking)} of "
                                 f"the 256 byte pieces ({lacking[:3]}...) is not implemented")
        # A symbol the vocabulary lacks (SmolLM2 lacks 21 of the 256 bytes) becomes
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

    def _token_bytes(self, token):
        """piece_bytes: the bytes of normalized text a token stands for. Byte-level: its characters through
        GPT-2's table; sentencepiece-style: a "<0xNN>" piece's byte, else the token as the decoder's Replace
        steps write it ("▁" a space)."""
        if self.byte_level:
            return byte_level_bytes(token)
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
        if byte and ("ByteFallback", None) in self.decoders:
            return bytes([int(byte.group(1), 16)])
        return decode_tokens([token],
                             [step for step in self.decoders if step[0] == "Replace"]).encode("utf-8")

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
                    if key == "add_prefix_space" and value is not None and not self.byte_level:
                        # transformers' LlamaTokenizerFast then rebuilds the tokenizer from tokenizer.model
                        raise TokenizerError(f"{path}: add_prefix_space={value!r} is not implemented for a "
                                             "sentencepiece-style tokenizer.json")
                    if key == "add_prefix_space" and value is not None and value != self.add_prefix_space:
                        raise TokenizerError(f"{path}: add_prefix_space={value!r} disagrees with "
                                             "tokenizer.json's ByteLevel "
                                             f"add_prefix_space={self.add_prefix_space!r}")
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            content = _special_token_content(config.get(key))
            if content is not None:
                self._token_id(content, f"{folder}: tokenizer_config.json: {key}")
        return config

    def _token_id(self, content, where):
        """The id of a token the configs name: a special token, another added one, or one of the
        vocabulary."""
        found = self.special_ids.get(content, self.added.get(content, {}).get("id", self.vocab.get(content)))
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
        if eos not in self.special_ids.values() and eos not in self.tokens:
            raise TokenizerError(f"{generation}: eos_token_id {eos!r} is not a token of {self.path}")
        return eos


# The real files nest 7 lists or objects deep at most (Llama 3.1's post_processor: a Sequence of processors,
# one a template of special tokens); section 3 reads the pipeline's parts recursively.
MAX_JSON_DEPTH = 32


def _read_json_object(path):
    """A UTF-8 JSON file holding an object, nested at most MAX_JSON_DEPTH deep (tokenizer.json and the configs
    beside it); TokenizerError names the file, and the line of malformed JSON."""
    with open(path, encoding="utf-8") as f:
        try:
            spec = json.load(f)
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path}, line {e.lineno}: malformed JSON: {e.msg}, "
                                 f"column {e.colno}") from None
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
        # Python's json recurses once per level, up to the interpreter's limit (1000)
        except RecursionError:
            spec = None
    if spec is None or _nesting_depth(spec) > MAX_JSON_DEPTH:
        raise TokenizerError(f"{path}: JSON nested more than {MAX_JSON_DEPTH} lists or objects deep; no "
                             "tokenizer file nests more than a few")
    if not isinstance(spec, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(spec).__name__}")
    return spec


def _nesting_depth(value):
    """How many lists and objects deep a JSON value nests (a number or a string: 0), level by level: no
    recursion."""
    depth = 0
    containers = [value] if isinstance(value, (dict, list)) else []
    while containers:
        depth += 1
        items = [item for outer in containers
                 for item in (outer.values() if isinstance(outer, dict) else outer)]
        containers = [item for item in items if isinstance(item, (dict, list))]
    return depth


# ---- 4. Meta's Llama 3 tokenizer.model (tiktoken)

# Meta's own Llama 3 folders (params.json, consolidated.00.pth; the `original/` folder of a Hugging Face
# release) hold a tiktoken BPE file named tokenizer.model: a line per token, its bytes in base64 and its rank.
# tiktoken's rule is BPE's: the adjacent pair whose joined bytes are the lowest-ranked token merges first,
# and a word that is a token stays whole. The regex that cuts text into words and the 256 special tokens
# after the 128,000 ranks are not in the file but in Meta's code (llama-models, models/llama3/tokenizer.py),
# written out here as it writes them. The Hugging Face release's tokenizer.json is the same tokenizer.

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_RANKS = 128_000
LLAMA3_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>",  # end of message
    "<|eot_id|>",  # end of turn
    "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIAL_TOKENS = LLAMA3_NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{2 + k}|>" for k in range(256 - len(LLAMA3_NAMED_SPECIAL_TOKENS))]


class MetaLlama3Tiktoken(BytePairEncoding):
    """Meta's Llama 3 tokenizer.model (tiktoken) with Meta's conventions: BOS <|begin_of_text|> (128000),
    EOS <|end_of_text|> (128001), pad <|finetune_right_pad_id|> (128004); the special tokens are never
    produced from text (Meta's encode with disallowed_special=()). Meta's encode also cuts runs of more than
    25,000 characters without (or with only) whitespace before encoding them, a limit of the tiktoken
    library; the Hugging Face release does not, and neither does this. A tiktoken file of another size
    (another model's) is refused: its special tokens are not known."""

    def __init__(self, path):
        where = f"{path}: not a sentencepiece model but a tiktoken BPE file"
        self.path, self.files = path, {"tokenizer.model": path}
        self.vocab = {}
        with open(path, "rb") as f:
            for line_number, line in enumerate(f, 1):
                fields = line.split()
                try:
                    token = base64.b64decode(fields[0], validate=True)
                    rank = int(fields[1])
                except (IndexError, ValueError, binascii.Error):
                    fields = None
                if fields is None or len(fields) != 2 or rank != line_number - 1:
                    raise TokenizerError(f"{where}, line {line_number}: {line[:60]!r} is not a base64 token "
                                         f"and its rank {line_number - 1}")
                self.vocab["".join(BYTE_TO_CHAR[byte] for byte in token)] = rank
        lacking = [byte for byte, char in BYTE_TO_CHAR.items() if char not in self.vocab]
        if len(self.vocab) != LLAMA3_RANKS or lacking:
            raise TokenizerError(f"{where} of {len(self.vocab)} ranks ({len(lacking)} of the 256 bytes "
                                 f"lacking): only Meta's Llama 3 one is implemented ({LLAMA3_RANKS:,} ranks, "
                                 "every byte; the special tokens after them are in Meta's code)")
        # tiktoken's rule as merge ranks: a pair of tokens merges at the rank of the token they make
        self.merge_ranks = {(token[:k], token[k:]): rank for token, rank in self.vocab.items()
                            for k in range(1, len(token))
                            if token[:k] in self.vocab and token[k:] in self.vocab}
        self.ignore_merges, self.byte_fallback, self.unk_token, self.fuse_unk = True, False, None, False
        self.normalize = str
        self.steps = [_split_isolated(_python_regex(LLAMA3_PATTERN, path)), _byte_level(False, False, path)]
        self.find_raw = self.find_normalized = lambda text: [(text, None)]  # no added tokens
        self.special_ids = {token: LLAMA3_RANKS + k for k, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.tokens = {rank: token for token, rank in self.vocab.items()}
        self.decoders = [("ByteLevel", None)]
        self.token_bytes = {rank: byte_level_bytes(token) for rank, token in self.tokens.items()}
        self.cache = {}
        self.vocab_size = LLAMA3_RANKS + len(LLAMA3_SPECIAL_TOKENS)
        self.bos_id = self.special_ids["<|begin_of_text|>"]
        self.eos_id = self.special_ids["<|end_of_text|>"]
        self.pad_id = self.special_ids["<|finetune_right_pad_id|>"]
