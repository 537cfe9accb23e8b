"""tokenizer.py's byte-level BPE (tokenizer.json read by hand) against Hugging Face's `tokenizers` and transformers.

The tokenizers are trained here, one per supported pre-tokenizer (conftest.BPE_STYLES), and compared on a varied
corpus plus seeded random strings; everything tokenizer.py does not implement must be refused by name. Run with -s to
see the parity counts per pre-tokenizer and the characters where Python's Unicode tables differ from `tokenizers`'."""
import json
import os
import random
import re
import shutil
import string
import sys
import time
import unicodedata

import pytest

import data
import tokenizer
from conftest import BPE_STYLES, CORPUS_LINES, LLAMA3_PATTERN, build_bpe_tokenizer

tokenizers = pytest.importorskip("tokenizers")

# Written out by hand: prose, code, whitespace runs, tabs and newlines, digits and long numbers, contractions,
# accents (precomposed and combining), CJK, emoji (with modifiers, ZWJ sequences and flags), other scripts.
PARITY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Below is an instruction that describes a task.\n\n### Instruction:\nName a color.\n\n### Response:Red.",
    "def add(a, b):\n    return a + b  # sum\n\n\nclass Foo(Bar):\n\tpass\n",
    "for (int i = 0; i < n; ++i) { total += x[i] * 2; }  // C++",
    "    four leading spaces", "trailing spaces    ", "a  b   c    d     e", " ", "  ", "\n", "\n\n\n", "\t\t", "",
    "line one\r\nline two\r\n", "tabs\tbetween\twords", "mixed \t \n \r\n whitespace",
    "0", "42", "1234567890", "3.14159265358979", "1,000,000 and 10 000 000", "year 2023-11-25 at 12:34:56",
    "room 101b, 7th floor, +1-555-0100", "x1y22z333w4444",
    "It's, it's, IT'S; I'm, you're, we've, they'll, he'd; don't; o'clock; 'quoted'", "it'ſ the Kelvin K",
    "café, naïve, résumé, Ångström, façade, Ωmega", "cafe\u0301 nai\u0308ve (combining marks)", "Zürich Straße",
    "東京は日本の首都です。北京是中国的首都。", "한국어 텍스트입니다", "ひらがな カタカナ",
    "emoji 🙂🎉 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️", "Привет, мир! Γειά σου Κόσμε", "مرحبا بالعالم", "नमस्ते दुनिया",
    "math: ∑ x² ≤ ½ · ∞, roman Ⅻ, digits ٣٤ ५", "no\u00a0break\u2009thin\u3000ideographic\u2028separator",
    "control \x00\x01\x1b[31m red \x1c\x1f end", "<|endoftext|> <s> </s> <|begin_of_text|> as plain text",
    "https://example.com/path?q=1&r=two#frag", "\"double\" 'single' `back` «guillemets» „low“",
]
RANDOM_POOL = ("abcxyzABCXYZ  \t\n\r0123456789'\".,;:!?-_()[]{}<>/\\|@#$%^&*+=~`éèüñçßøÅ\u0301\u0308日本語中文한국어"
               "🙂👍🏽\u200d🇫🇷\u00a0\u2028\u3000½²٣ſK𝔘sStTdDmM")


def random_texts(count=1000, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(RANDOM_POOL) for _ in range(rng.randint(0, 40))) for _ in range(count)]


TRAINING_TEXTS = CORPUS_LINES * 10 + PARITY_TEXTS * 3 + random_texts(300, seed=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    return {style: build_bpe_tokenizer(root / style, style, TRAINING_TEXTS) for style in BPE_STYLES}


def reference(folder):
    """`tokenizers` on the same file, with special tokens never matched inside text (as tokenizer.py's encode)."""
    ref = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    ref.encode_special_tokens = True
    return ref


@pytest.mark.parametrize("style", list(BPE_STYLES))
def test_ids_decode_and_bos_equal_the_tokenizers_package(style, folders):
    ours, ref = tokenizer.Tokenizer(folders[style]), reference(folders[style])
    texts = PARITY_TEXTS + random_texts()
    same = 0
    for text in texts:
        ids = ref.encode(text, add_special_tokens=False).ids
        agree = (ours.encode(text) == ids and ours.encode(text, bos=True) == ref.encode(text).ids
                 and ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
                 and b"".join(map(ours.piece_bytes, ids)) == ours.decode(ids).encode("utf-8"))
        same += agree
        if not agree:
            print(f"\n{style}: differs on {text!r}: {ours.encode(text)} vs {ids}")
    print(f"\nparity {style:18s} ({BPE_STYLES[style][0]}): {same}/{len(texts)} texts identical "
          f"(ids, ids with BOS, decode)")
    assert same == len(texts)


def test_the_styles_differ_where_their_pre_tokenizers_do(folders):
    # the parity above means something only if the pre-tokenizers really split differently
    text = "It's 2024: 12345 tokens"
    words = {style: [tokenizer.Tokenizer(folders[style]).decode([i]) for i in tokenizer.Tokenizer(folders[style]).encode(text)]
             for style in ("gpt2", "llama3", "smollm2", "digit_runs")}
    assert all("".join(pieces) == text for pieces in words.values())
    assert "1" in words["smollm2"] and "5" in words["smollm2"]  # one digit per token
    assert not any(len(re.sub(r"\D", "", p)) > 3 for p in words["llama3"])  # at most three digits a token
    assert tokenizer.Tokenizer(folders["gpt2_prefix_space"]).decode(tokenizer.Tokenizer(folders["gpt2_prefix_space"])
                                                               .encode("word")) == " word"


@pytest.mark.parametrize("style", ["llama3", "smollm2"])
def test_transformers_reads_the_same_ids_bos_eos_and_pad_from_the_folder(style, folders):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(folders[style])
    ours = tokenizer.Tokenizer(folders[style])
    for text in PARITY_TEXTS:
        if "<|" in text or "<s>" in text:  # transformers matches special tokens inside text; tokenizer.py never does
            continue
        assert ours.encode(text, bos=True) == theirs(text)["input_ids"], text
    assert ours.eos_id == theirs.eos_token_id
    assert ours.bos_id == (theirs.bos_token_id if style == "llama3" else None)  # this style puts nothing first
    special = set(theirs.all_special_ids) | {i for i, t in theirs.added_tokens_decoder.items() if t.special}
    assert ours.pad_id in special and ours.pad_id != ours.eos_id


def test_special_tokens_pad_and_files(folders, tmp_path):
    llama3 = tokenizer.Tokenizer(folders["llama3"])
    ids = {name: llama3.bpe.special_ids[name] for name in BPE_STYLES["llama3"][2]}
    assert (llama3.bos_id, llama3.eos_id) == (ids["<|begin_of_text|>"], ids["<|end_of_text|>"])
    assert llama3.pad_id == ids["<|reserved_special_token_0|>"]  # the first special token that is neither
    assert sorted(llama3.files) == ["tokenizer.json", "tokenizer_config.json"]
    for text in PARITY_TEXTS + random_texts(200):  # special ids never come from text, "<|end_of_text|>" included
        assert not set(llama3.encode(text)) & set(ids.values())
    assert llama3.decode(llama3.encode("a <|end_of_text|> b", bos=True, eos=True)) == "a <|end_of_text|> b"
    assert llama3.piece_bytes(llama3.eos_id) == b"" and llama3.piece_bytes(10**9) == b""
    smollm2 = tokenizer.Tokenizer(folders["smollm2"])
    special = smollm2.bpe.special_ids
    # pad_token is EOS there (as SmolLM2-Instruct ships it): it could be taken for text's end, so another is used
    assert smollm2.bos_id is None and smollm2.eos_id == special["<|im_end|>"]
    assert smollm2.pad_id == special["<|endoftext|>"]
    assert smollm2.encode("hi", bos=True, eos=True) == smollm2.encode("hi") + [smollm2.eos_id]
    # EOS from generation_config.json (the first of Llama 3 Instruct's list) when tokenizer_config.json has none
    folder = tmp_path / "generation"
    shutil.copytree(folders["llama3"], folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids["<|eot_id|>"], 5]}))
    from_generation = tokenizer.Tokenizer(folder)
    assert from_generation.eos_id == ids["<|eot_id|>"] and "generation_config.json" in from_generation.files
    # add_bos_token in tokenizer_config.json, where the post_processor adds nothing
    folder = tmp_path / "add_bos"
    shutil.copytree(folders["gpt2"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, add_bos_token=True)))
    assert tokenizer.Tokenizer(folder).encode("x", bos=True)[0] == tokenizer.Tokenizer(folder).bpe.special_ids["<|endoftext|>"]


def test_both_merge_encodings_and_ignore_merges(folders, tmp_path):
    spec = json.loads(open(os.path.join(folders["gpt2"], "tokenizer.json"), encoding="utf-8").read())
    assert isinstance(spec["model"]["merges"][0], list)  # what tokenizers >= 0.20 writes
    spec["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]  # what older releases wrote
    folder = tmp_path / "string_merges"
    shutil.copytree(folders["gpt2"], folder)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    old, new, ref = tokenizer.Tokenizer(folder), tokenizer.Tokenizer(folders["gpt2"]), reference(str(folder))
    for text in PARITY_TEXTS:
        assert old.encode(text) == new.encode(text) == ref.encode(text, add_special_tokens=False).ids
    # ignore_merges (Llama 3): a word that is itself a token stays whole even where the merges would not build it
    vocab = {char: i for i, char in enumerate(sorted(tokenizer.CHAR_TO_BYTE))}
    vocab.update({"ab": 256, "abc": 257, "<eos>": 258, "<pad>": 259})
    hand_made = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None,
                 "added_tokens": [{"id": 258, "content": "<eos>", "special": True, "single_word": False,
                                   "lstrip": False, "rstrip": False, "normalized": False},
                                  {"id": 259, "content": "<pad>", "special": True, "single_word": False,
                                   "lstrip": False, "rstrip": False, "normalized": False}],
                 "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                   "use_regex": True},
                 "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                                                     "trim_offsets": True, "use_regex": True},
                 "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                           "vocab": vocab, "merges": [["a", "b"]]}}
    for ignore_merges, expected in ((False, ["ab", "c"]), (True, ["abc"])):
        folder = tmp_path / f"ignore_merges_{ignore_merges}"
        folder.mkdir()
        hand_made["model"]["ignore_merges"] = ignore_merges
        (folder / "tokenizer.json").write_text(json.dumps(hand_made))
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
        ids = tokenizer.Tokenizer(folder).encode("abc abc")
        assert ids == reference(str(folder)).encode("abc abc").ids
        assert ids[:len(expected)] == [vocab[token] for token in expected]


def words_of(tok, text):
    """The byte-symbol words a text's pre-tokenizer makes (no added tokens in the text), as tokenizer.py
    merges them."""
    pieces = [text] if text else []
    for step in tok.bpe.steps:
        pieces = [part for piece in pieces for part in step(piece, True)]
    return [tok.bpe._symbols(piece) for piece in pieces]


def test_the_fast_merge_equals_the_rule(folders, tmp_path):
    # merge_by_rank_fast (a heap over a linked list) against merge_by_rank (BPE's rule, read off one merge at a
    # time) on every word of the texts, for every style
    texts = PARITY_TEXTS + random_texts()
    for style in BPE_STYLES:
        tok = tokenizer.Tokenizer(folders[style])
        for word in (word for text in texts for word in words_of(tok, text)):
            assert tokenizer.merge_by_rank_fast(word, tok.bpe.merge_ranks) == \
                tokenizer.merge_by_rank(word, tok.bpe.merge_ranks), word
    # merges in an order no training makes (a longer token may come before its parts), and words of one or two
    # letters repeated: ties between equal ranks and queue entries that go stale; `tokenizers` agrees
    rng = random.Random(0)
    vocab = {char: i for i, char in enumerate(sorted(tokenizer.CHAR_TO_BYTE))}
    tokens = {"".join(rng.choice("ab") for _ in range(rng.randint(2, 5))) for _ in range(40)}
    for token in sorted(tokens, key=len):
        vocab.setdefault(token, len(vocab))
    merges = [[token[:k], token[k:]] for token in vocab if len(token) > 1 for k in range(1, len(token))
              if token[:k] in vocab and token[k:] in vocab]
    rng.shuffle(merges)
    spec = json.loads(open(os.path.join(folders["gpt2"], "tokenizer.json"), encoding="utf-8").read())
    spec["model"].update(vocab=vocab, merges=merges)
    spec["added_tokens"] = [dict(token, id=len(vocab) + k) for k, token in enumerate(spec["added_tokens"])]
    shutil.copytree(folders["gpt2"], tmp_path / "shuffled")
    (tmp_path / "shuffled" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    shuffled, ref = tokenizer.Tokenizer(tmp_path / "shuffled"), reference(str(tmp_path / "shuffled"))
    texts = ["".join(rng.choice(["a", "b", "aa", "ab", "ba"]) for _ in range(rng.randint(1, 30)))
             for _ in range(500)] + ["a" * n for n in range(1, 20)] + ["ab" * n for n in range(1, 20)]
    for text in texts:
        (word,) = words_of(shuffled, text)
        assert tokenizer.merge_by_rank_fast(word, shuffled.bpe.merge_ranks) == \
            tokenizer.merge_by_rank(word, shuffled.bpe.merge_ranks), text
        assert shuffled.encode(text) == ref.encode(text).ids, text


def test_a_16k_letter_word_encodes_in_n_log_n_time(tmp_path):
    """One 16,000-letter word (no spaces: one word to merge, no cache, not a token itself) on a tokenizer whose
    2,700 merges of letters apply to it: well under a second (0.05 s; `tokenizers` 0.01 s), with `tokenizers`'
    ids. The earlier merge, one pass over the word per merge applied, took 7 s here on a loaded 2-core machine,
    and 8-17 s on Llama 3's real file (tests/test_real_tokenizers.py)."""
    rng = random.Random(0)
    letter_words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 12)))
                    for _ in range(20_000)]
    folder = build_bpe_tokenizer(tmp_path / "letters", "llama3", [" ".join(letter_words)] * 2, 3000)
    tok, ref = tokenizer.Tokenizer(folder), reference(folder)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(16_000))
    start = time.perf_counter()
    ids = tok.encode(word)
    seconds = time.perf_counter() - start
    print(f"\n16,000-letter word: {seconds:.3f} s, {len(ids)} tokens")
    assert ids == ref.encode(word, add_special_tokens=False).ids
    assert seconds < 2.0


def onig_members(pattern, chars):
    """The characters `tokenizers`' regex engine (Oniguruma) matches with a one-character pattern."""
    split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="removed")
    kept = set("".join(piece for piece, _ in split.pre_tokenize_str("".join(chars))))
    return set(chars) - kept


@pytest.mark.parametrize("name, pattern", [("L", r"\p{L}"), ("N", r"\p{N}"), ("White_Space", r"\s")])
def test_unicode_classes_equal_oniguruma_but_for_characters_newer_than_pythons_tables(name, pattern):
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]  # surrogates: not text
    ours = set(re.findall(f"[{tokenizer._unicode_class(name)}]", "".join(chars)))
    theirs = onig_members(pattern, chars)
    differ = sorted(ours ^ theirs)
    print(f"\n\\p{{{name}}}: {len(theirs)} characters in tokenizers, {len(differ)} differ" + (
        f", all unassigned in Python's Unicode {unicodedata.unidata_version} tables (assigned later): "
        f"{', '.join(f'U+{ord(c):04X}' for c in differ[:5])}{' ...' if len(differ) > 5 else ''}" if differ else ""))
    # The only difference: characters that Python's tables do not know yet (category Cn), which tokenizers'
    # newer tables class as letters or numbers; text written before they were assigned never holds them.
    assert all(unicodedata.category(c) == "Cn" and c in theirs for c in differ)
    assert len(differ) < 0.1 * len(theirs)


def test_regex_translation_keeps_meaning(folders):
    llama3 = tokenizer._python_regex(LLAMA3_PATTERN, "test")
    assert llama3.findall("I'M 12345 héllo\n\n  x") == ["I", "'M", " ", "123", "45", " héllo", "\n\n", " ", " x"]
    assert tokenizer._python_regex(r"\s+", "test").findall("a\x1c\x1fb \u3000c") == [" \u3000"]  # \x1c: not space
    assert tokenizer._python_regex(r"[^\s\p{L}]+", "test").findall("ab 12!é") == ["12!"]


GOOD = "llama3"
REFUSED = [  # (what is changed in tokenizer.json or beside it, the message)
    ("normalizer", {"type": "NFKC"}, r"normalizer 'NFKC' is not implemented"),
    ("normalizer", {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]},
     r"normalizer.normalizers\[1\] 'Lowercase' is not implemented"),
    ("model.unk_token", "<no such token>", r"model.unk_token='<no such token>' is not a token of the"),
    ("model.type", "WordPiece", r"model.type='WordPiece' is not implemented"),
    ("model.byte_fallback", True, r"model.byte_fallback=True is not implemented"),
    ("model.dropout", 0.1, r"model.dropout=0.1 is not implemented"),
    ("model.continuing_subword_prefix", "##", r"continuing_subword_prefix='##' is not implemented"),
    ("pre_tokenizer", {"type": "Metaspace", "replacement": "▁"}, r"pre-tokenizer type 'Metaspace' is not"),
    ("pre_tokenizer", {"type": "Split", "pattern": {"Regex": " "}, "behavior": "Isolated", "invert": False},
     r"no ByteLevel step"),
    ("pre_tokenizer.pretokenizers.0.behavior", "MergedWithPrevious", r"behavior='MergedWithPrevious'"),
    ("pre_tokenizer.pretokenizers.0.pattern.Regex", r"\w+|\s+", r"the escape \\w is not implemented"),
    ("pre_tokenizer.pretokenizers.0.pattern.Regex", r"\p{Letter}+", r"the Unicode property"),
    ("pre_tokenizer.pretokenizers.0.pattern.Regex", r"[\p{L}&&[a-z]]", r"nested or intersected"),
    # quantified groups holding a quantifier: Python's re could take exponential time on them
    ("pre_tokenizer.pretokenizers.0.pattern.Regex", r"(a+)+",
     r"pre_tokenizer.pretokenizers\[0\] Split pattern '\(a\+\)\+' has a nested quantifier '\(a\+\)\+'"),
    ("pre_tokenizer.pretokenizers.0.pattern.Regex", r"\s+|(\w*)*", r"has a nested quantifier '\(\\\\w\*\)\*'"),
    ("pre_tokenizer.pretokenizers.0.pattern.Regex", r"(?:x+y?)+|\p{L}", r"nested quantifier '\(\?:x\+y\?\)\+'"),
    ("pre_tokenizer.pretokenizers.0.pattern.Regex", r"((\p{L})+ )+", r"nested quantifier '\(\(\\\\p\{L\}\)\+ \)\+'"),
    ("added_tokens.1.special", "no", r"added_tokens\[1\]: special='no' is not true or false"),
    ("added_tokens.1.content", "", r"added_tokens\[1\]: .* is not an added token"),
    ("truncation", {"max_length": 8}, r"truncation=.* is not implemented"),
    ("decoder", {"type": "Metaspace"}, r"decoder 'Metaspace' is not implemented"),
    ("post_processor.processors.1.single", [{"Sequence": {"id": "A", "type_id": 0}},
                                            {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}],
     r"single template .* is not implemented"),
    ("post_processor.processors.0.type", "BertProcessing", r"type 'BertProcessing' is not implemented"),
    ("model.merges.0", ["Ġ", "no-such-token"], r"model.merges\[0\] .* not two vocabulary tokens"),
    ("tokenizer_config.json:eos_token", None, r"no EOS token"),
    ("tokenizer_config.json:add_prefix_space", True, r"tokenizer_config.json: add_prefix_space=True disagrees"),
    ("tokenizer_config.json:add_bos_token", False, r"add_bos_token=False disagrees"),
    ("tokenizer_config.json:eos_token", "<|not a token|>", r"eos_token '<\|not a token\|>' is not a token"),
    # every token tokenizer_config.json names must be one of the file's
    ("tokenizer_config.json:pad_token", "<|no pad|>",
     r"tokenizer_config.json: pad_token '<\|no pad\|>' is not a token"),
    ("tokenizer_config.json:unk_token", {"content": "<unk>", "__type": "AddedToken"},
     r"tokenizer_config.json: unk_token '<unk>' is not a token"),
    ("tokenizer_config.json:bos_token", "<s>", r"tokenizer_config.json: bos_token '<s>' is not a token"),
]


@pytest.mark.parametrize("where, value, message", REFUSED, ids=[f"{w}={v!r}"[:60] for w, v, _ in REFUSED])
def test_what_is_not_implemented_is_refused_by_name(where, value, message, folders, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(folders[GOOD], folder)
    file, _, key = where.rpartition(":")
    path = folder / (file or "tokenizer.json")
    spec = json.loads(path.read_text(encoding="utf-8"))
    *parents, last = key.split(".")
    target = spec
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    target[int(last) if isinstance(target, list) else last] = value
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(tokenizer.TokenizerError, match=message) as err:
        tokenizer.Tokenizer(folder)
    assert str(folder) in str(err.value)


def test_nested_quantifiers_are_found_and_the_real_patterns_have_none():
    nested = [r"(a+)+", r"(\w*)*", r"(?:x+y?)+", r"(?:(a)+)+", r"(a+){2,}", r"((a+)b)*", r"(?i:\p{L}+)+"]
    assert [tokenizer._nested_quantifier(pattern) for pattern in nested] == nested
    # a group quantified at most once, a group without a quantifier inside, quantifiers inside classes
    single = [r"(a+)?", r"(?:ab)+", r"(?:'s|'t)*", r"(a+){1}", r"[(a+)]+", r"\(a+\)+", r"(?!\S)\s+"]
    real = [tokenizer.GPT2_PATTERN, LLAMA3_PATTERN, r"\p{N}{1,3}",  # DeepSeek-V3's, then Qwen3's
            r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
            r"| ?[\p{P}\p{S}]+[\r\n]*",
            LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")]
    assert [tokenizer._nested_quantifier(pattern) for pattern in single + real] == [None] * (len(single + real))


def test_json_nested_too_deep_is_refused_by_name(folders, tmp_path):
    folder = tmp_path / "deep"
    shutil.copytree(folders[GOOD], folder)
    path = folder / "tokenizer.json"
    # 100,000 lists, past what Python's json reads (a RecursionError before), and 40 Sequences (80 levels)
    deep_normalizer = {"type": "NFC"}
    for _ in range(40):
        deep_normalizer = {"type": "Sequence", "normalizers": [deep_normalizer]}
    spec = json.loads(path.read_text(encoding="utf-8"))
    for text in ('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}",
                 json.dumps(dict(spec, normalizer=deep_normalizer), ensure_ascii=False)):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(tokenizer.TokenizerError, match=r"tokenizer.json: JSON nested more than 32 lists or "
                                                            r"objects deep"):
            tokenizer.Tokenizer(folder)
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    assert tokenizer.Tokenizer(folder).encode("ok")  # the files beside it too:
    (folder / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(tokenizer.TokenizerError, match=r"tokenizer_config.json: JSON nested more than 32"):
        tokenizer.Tokenizer(folder)


def test_folder_dispatch_and_file_errors(folders, spm_model_path, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(folders[GOOD], both)
    shutil.copyfile(spm_model_path, both / "tokenizer.model")
    assert tokenizer.Tokenizer(both).sp is not None  # sentencepiece first, as LLaMA 1/2 folders ship both
    assert tokenizer.Tokenizer(both / "tokenizer.json").bpe is not None
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model .* nor tokenizer.json"):
        tokenizer.Tokenizer(tmp_path)
    tiktoken = tmp_path / "meta" / "tokenizer.model"  # Meta's own Llama 3 folder: base64 token, rank
    tiktoken.parent.mkdir()
    tiktoken.write_text("IQ== 0\nIg== 1\nIw== 2\n")
    with pytest.raises(tokenizer.TokenizerError, match=r"tokenizer.model: not a sentencepiece model .* tiktoken BPE file"):
        tokenizer.Tokenizer(tiktoken.parent)


def test_an_eos_that_is_an_added_token_but_not_special_ends_generation_and_responses(folders, tmp_path):
    """tokenizer_config.json may name as EOS (or pad) an added token that is not special: it is looked up among
    every token tokenizer.json defines, as transformers does; generation stops there and responses are trained to
    end with it. (Being not special, it is also made from text that holds it, as `tokenizers` makes it.)"""
    import model
    import teacher
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "added_eos"
    shutil.copytree(folders["llama3"], folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    end = 1 + max(spec["model"]["vocab"].values())
    spec["added_tokens"] += [{"id": end, "content": "<|end|>", "special": False, "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False},
                             {"id": end + 1, "content": "<|fill|>", "special": False, "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False}]
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(eos_token={"content": "<|end|>", "__type": "AddedToken", "special": False}, pad_token="<|fill|>",
                  unk_token="Ġthe")  # a vocabulary token
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = tokenizer.Tokenizer(folder)
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    assert (tok.eos_id, tok.pad_id, tok.stop_ids) == (end, end + 1, [end]) == (auto.eos_token_id,
                                                                                auto.pad_token_id, [end])
    assert tok.encode("a<|end|>", bos=True) == auto("a<|end|>")["input_ids"] == tok.encode("a", bos=True) + [end]
    prompt_ids, response_ids = data.encode_prompt_response(tok, data.alpaca_prompt("Name a color."), "Red.")
    assert response_ids[-1] == end and tok.decode(response_ids) == "Red.<|end|>"
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = model.Transformer(model.ModelArgs(**{**model.CONFIGS["tiny"], "vocab_size": tok.vocab_size})).eval()
    with torch.no_grad():  # the blocks add nothing, every embedding is all ones: only <|end|> scores
        for layer in net.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        net.tok_embeddings.weight.fill_(1.0)
        net.output.weight.zero_()
        net.output.weight[end] = 1.0
        outs, _ = model.generate(net, [prompt_ids], 5, eos_id=tok.stop_ids)
    assert outs == [[end]] and teacher.without_stop(outs[0], tok.stop_ids) == ([], True)


def test_sft_example_on_a_bpe_tokenizer_masks_the_prompt_and_ends_with_eos(folders):
    for style in ("llama3", "smollm2"):
        tok = tokenizer.Tokenizer(folders[style])
        prompt, response = data.alpaca_prompt("Name the capital of France."), "Paris, 2 million people."
        prompt_ids, response_ids = data.encode_prompt_response(tok, prompt, response)
        assert prompt_ids == tok.encode(prompt, bos=True) and response_ids[-1] == tok.eos_id
        assert tok.decode(response_ids[:-1]) == response
        assert (prompt_ids[0] == tok.bos_id) == (style == "llama3")
