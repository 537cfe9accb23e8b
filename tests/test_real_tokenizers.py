"""tokenizer.py on the real tokenizer files their publishers shipped (tests/fetch_real_files.py),
against Hugging Face's `tokenizers` and transformers' AutoTokenizer on the same files.

Texts: the benchmark texts the tests hold (Super-NI, LMentry, Vicuna under tests/fixtures/eval), the project's
own source code, the hand-written texts and random strings of tests/test_bpe.py, and texts made for the edges:
every control character, CJK and emoji, rare Unicode planes (unassigned and private use), long digit runs and
random code points (fixed seed). Run with -s to see the counts per file. Each file loads once per module."""
import glob
import json
import os
import random
import shutil
import string
import time
import unicodedata

import pytest

import data
import tokenizer
from test_bpe import PARITY_TEXTS, random_texts

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLEMENTED = ["smollm2-135m-instruct", "llama3", "llama3_1", "qwen3", "deepseek-v3", "gpt2"]  # tokenizer.py opens


def benchmark_texts():
    """Instructions, inputs and answers of the benchmark files the tests hold, and Alpaca prompts of them."""
    texts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests/fixtures/eval/superni/tasks/*.json"))):
        task = json.load(open(path, encoding="utf-8"))
        texts += task["Definition"]
        for k, instance in enumerate(task["Instances"]):
            texts += [instance["input"], *instance["output"]]
            if k < 50:  # whole prompts: long, and their words are in the texts already
                prompt = data.alpaca_prompt(task["Definition"][0], instance["input"])
                texts.append(prompt + instance["output"][0])
    for path in sorted(glob.glob(os.path.join(ROOT, "tests/fixtures/eval/lmentry/*.json"))):
        examples = json.load(open(path, encoding="utf-8"))["examples"].values()
        texts += [example["input"] for example in examples]
    for path in sorted(glob.glob(os.path.join(ROOT, "tests/fixtures/eval/vicuna/*.jsonl"))):
        for line in open(path, encoding="utf-8"):
            record = json.loads(line)
            texts += record.get("turns") or [turn for choice in record.get("choices", [])
                                             for turn in choice.get("turns", [])]
    return texts


def code_texts():
    """The project's own Python files, 25 lines at a time."""
    texts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        lines = open(path, encoding="utf-8").read().splitlines(keepends=True)
        texts += ["".join(lines[k:k + 25]) for k in range(0, len(lines), 25)]
    return texts


def edge_texts(seed=0):
    """Control characters, CJK, emoji, rare planes, long digit runs and random code points."""
    rng = random.Random(seed)
    controls = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]]
    texts = [f"a{c}b" for c in controls] + [c * 3 for c in controls] + [f" {c} x{c}" for c in controls]
    texts += ["".join(controls), "tab\there\x0bvt\x0cff\rcr\x1cfs\x1dgs\x1ers\x1fus\x85nel"]
    cjk = [(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x20000, 0x2A6DF)]
    emoji = [(0x1F300, 0x1FAFF), (0x2600, 0x27BF)]
    planes = [(0x10000, 0x1FFFF), (0x20000, 0x3FFFF), (0x40000, 0x7FFFF), (0xE0000, 0xE01EF),
              (0xF0000, 0x10FFFF)]  # SMP, CJK extensions, unassigned planes 4-7, tags, private use
    for ranges in (cjk, emoji, planes):
        for _ in range(150):
            texts.append("".join(chr(rng.randint(*rng.choice(ranges))) if rng.random() < 0.7
                                 else rng.choice(" a1.\n") for _ in range(rng.randint(1, 20))))
    texts += ["1" * n for n in range(1, 41)] + ["9" * 100, "0" * 257, "3.14159265358979323846264338327950288"]
    texts += ["".join(rng.choice("0123456789 ,.") for _ in range(rng.randint(20, 200))) for _ in range(50)]
    texts += ["٠١٢٣٤٥٦٧٨٩ ०१२३ ①②③ ¹²³ Ⅻ 𝟘𝟙𝟚 ১২৩", "東京タワー 한국 中文，标点。「引号」", "👨‍👩‍👧‍👦🏳️‍🌈🇺🇳 1️⃣ ✊🏿"]
    def code_point():  # any but the surrogates, which are not text
        code = rng.randint(0, 0x10FFFF - 0x800)
        return chr(code + 0x800 if code >= 0xD800 else code)
    texts += ["".join(code_point() for _ in range(rng.randint(1, 30))) for _ in range(500)]
    return texts


TEXTS = PARITY_TEXTS + random_texts() + benchmark_texts() + code_texts() + edge_texts()
# NFC changes these (Qwen's normalizer): decomposed accents, Hangul jamo, compatibility-free compositions
NFC_TEXTS = ["cafe\u0301 nai\u0308ve", "A\u030a ngstro\u0308m", "\u1100\u1161\u11a8 \u1112\u1161\u11ab",
             "e\u0301\u0301 o\u0302\u0323 Z\u030c", "\u212b \u2126 \u0958 \uf900"]


def added_token_texts(spec, seed=0):
    """Every added token of a tokenizer.json (special or not) written into text: alone, twice, between
    letters, spaces and newlines, and among random characters."""
    rng = random.Random(seed)
    around = ["", " ", "  ", "\n", "a", "word", "1", "é", "<", "|", "\t ", "\u00a0", "\x1f", "_", "\u0301",
              "½"]
    texts = []
    special = [token for token in spec["added_tokens"] if token["special"]]
    for token in [token for token in spec["added_tokens"] if not token["special"]] + special[:100]:
        content = token["content"]  # (DeepSeek's 800 special ones are mostly place holders)
        texts += [content, content * 2, f"x{content}y", f" {content} ", f"{content}\n{content}"]
        texts += ["".join(rng.choice(around) for _ in range(2)) + content + "".join(rng.choice(around)
                                                                                   for _ in range(2))]
    contents = [token["content"] for token in spec["added_tokens"]]
    texts += ["".join(rng.choice(contents + around) for _ in range(8)) for _ in range(200)]
    return texts


@pytest.fixture(scope="module")
def loaded(real_files):
    """name -> (tokenizer.Tokenizer, tokenizers.Tokenizer, transformers' AutoTokenizer), each file read once."""
    cache = {}

    def load(name):
        if name not in cache:
            folder = real_files(name)
            reference = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
            reference.encode_special_tokens = True  # tokenizer.py never makes a special token from text
            auto = transformers.AutoTokenizer.from_pretrained(folder)
            cache[name] = tokenizer.Tokenizer(folder), reference, auto
        return cache[name]
    return load


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_ids_equal_tokenizers_and_transformers_on_every_text(name, loaded):
    ours, reference, auto = loaded(name)
    texts = TEXTS + NFC_TEXTS + added_token_texts(json.load(open(ours.path, encoding="utf-8")))
    theirs = reference.encode_batch(texts, add_special_tokens=False)
    auto_ids = auto(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    decoded = reference.decode_batch([expected.ids for expected in theirs])
    same = differ = 0
    made = set()
    for text, expected, from_auto, expected_text in zip(texts, theirs, auto_ids, decoded):
        ids = ours.encode(text)
        made.update(ids)
        agree = ids == expected.ids == from_auto and ours.decode(ids) == expected_text
        same += agree
        if not agree and differ < 5:
            differ += 1
            print(f"\n{name}: differs on {text[:60]!r}: {ids[:12]} vs {expected.ids[:12]}")
    print(f"\n{name}: ids = tokenizers = transformers {transformers.__version__} on {same} of {len(texts)} "
          "texts")
    assert same == len(texts)
    # the texts reach what the file has: its added tokens that are not special are made from text
    assert all(token["id"] in made for token in ours.bpe.added.values())
    assert not made & set(ours.bpe.special_ids.values())


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_bos_and_eos_are_the_files(name, loaded):
    ours, reference, auto = loaded(name)
    text = "Name a color."
    assert ours.eos_id == auto.eos_token_id
    assert ours.bos_id in (None, auto.bos_token_id)
    if name == "deepseek-v3":  # add_bos_token=true, and a post_processor that adds nothing:
        # transformers 4.57's LlamaTokenizerFast puts BOS first (as DeepSeek's chat template does);
        # transformers 5 loads the file as TokenizersBackend, which puts nothing
        assert ours.encode(text, bos=True) == [auto.bos_token_id] + reference.encode(text).ids
        return
    assert ours.encode(text, bos=True) == reference.encode(text).ids == auto(text)["input_ids"]


REFUSED = {  # real files whose tokenizer.json tokenizer.py does not implement: the refusal names field and value
    "llama2-json": r"tokenizer.json: model.byte_fallback=True is not implemented \(a sentencepiece-style "
                   r"BPE: open the folder's tokenizer.model\)",
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_real_files_not_implemented_are_refused_by_field(name, real_files):
    folder = real_files(name)
    with pytest.raises(tokenizer.TokenizerError, match=REFUSED[name]) as refused:
        tokenizer.Tokenizer(folder)
    assert str(refused.value).startswith(os.path.join(folder, "tokenizer.json"))


def test_smollm2_drops_the_bytes_its_vocabulary_lacks(loaded):
    ours, reference, _ = loaded("smollm2-135m-instruct")
    lacking = [byte for byte, char in tokenizer.BYTE_TO_CHAR.items() if char not in ours.bpe.vocab]
    assert len(lacking) == 21 and 0x04 in lacking and 0xC0 in lacking  # the real file lacks 21 of 256
    assert ours.encode("a\x04b") == ours.encode("a b")[:1] + ours.encode("b")
    assert ours.encode("\x04\x06") == [] == reference.encode("\x04\x06").ids
    # dropped before any merge: the bytes on either side become neighbours and merge ("!\x04!" is one word)
    assert ours.encode("!\x04!") == reference.encode("!\x04!").ids == [ours.bpe.vocab["!!"]]
    # U+40000 (plane 4) is F1 80 80 80 in UTF-8: F1 has no symbol and goes, the three 80s stay
    continuation = ours.bpe.vocab[tokenizer.BYTE_TO_CHAR[0x80]]
    assert ours.encode("\U00040000") == reference.encode("\U00040000").ids == [continuation] * 3


def test_gpt2_has_no_special_token_but_eos_and_pads_with_it_safely(loaded):
    import torch

    import model
    import tuna
    gpt2, _, auto = loaded("gpt2")
    assert list(gpt2.bpe.special_ids) == ["<|endoftext|>"] and gpt2.bos_id is None
    assert gpt2.eos_id == gpt2.pad_id == auto.eos_token_id == 50256
    # safe because every mask comes from lengths: rows padded with EOS score as rows padded with another id,
    # and the responses' own EOS stays a scored target
    torch.manual_seed(0)
    net = model.Transformer(model.ModelArgs(**{**model.CONFIGS["tiny"], "vocab_size": gpt2.vocab_size}))
    prompt = data.alpaca_prompt("Name a color.")
    answers = ("Red.", "A deep, warm red.", "Blue")
    pairs = [data.encode_prompt_response(gpt2, prompt, answer) for answer in answers]
    rows = [tuna.pack_example([p for p, _ in pairs[:2]], [r for _, r in pairs[:2]]),
            tuna.pack_example([pairs[2][0]], [pairs[2][1]])]
    with torch.no_grad():
        scores = {pad: tuna.score_tokens(net, tuna.collate(rows, pad)) for pad in (gpt2.pad_id, 0)}
    batch = tuna.collate(rows, gpt2.pad_id)
    assert (batch["tokens"] == gpt2.eos_id).sum() > 3  # padding is there, and it is EOS
    assert torch.equal(scores[gpt2.pad_id], scores[0])
    assert ((batch["target"] == gpt2.eos_id) & (batch["candidate"] >= 0)).sum() == 3  # each response's EOS


def test_unk_token_stands_for_bytes_without_a_symbol(loaded, tmp_path):
    # a BPE with unk_token: a byte without a symbol becomes it (one per run with fuse_unk), as in `tokenizers`
    ours, _, _ = loaded("smollm2-135m-instruct")
    texts = [t for t in TEXTS if any(c in t for c in "\x04\x06\x13\x14\x16\x1d")] + edge_texts()[-500:]
    for fuse_unk in (False, True):
        folder = tmp_path / f"unk_{fuse_unk}"
        folder.mkdir()
        shutil.copyfile(os.path.join(os.path.dirname(ours.path), "tokenizer_config.json"),
                        folder / "tokenizer_config.json")
        spec = json.load(open(ours.path, encoding="utf-8"))
        spec["model"].update(unk_token="<|endoftext|>", fuse_unk=fuse_unk)
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        with_unk = tokenizer.Tokenizer(folder)
        reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        reference.encode_special_tokens = True
        assert all(with_unk.encode(t) == reference.encode(t).ids for t in texts)
        assert with_unk.encode("\x04\x06") == [0] * (1 if fuse_unk else 2)


# generation_config.json exactly as Meta ships it with Llama 3.1 8B Instruct
LLAMA31_INSTRUCT_GENERATION_CONFIG = """{
  "bos_token_id": 128000,
  "do_sample": true,
  "eos_token_id": [
    128001,
    128008,
    128009
  ],
  "temperature": 0.6,
  "top_p": 0.9,
  "transformers_version": "4.42.3"
}
"""


def test_llama31_instruct_stop_ids_are_its_generation_config(loaded, real_files, tmp_path, spm_model_path):
    assert loaded("llama3_1")[0].stop_ids == [128009]  # no generation_config.json: tokenizer_config's EOS
    folder = tmp_path / "llama3_1"
    shutil.copytree(real_files("llama3_1"), folder)
    (folder / "generation_config.json").write_text(LLAMA31_INSTRUCT_GENERATION_CONFIG)
    tok = tokenizer.Tokenizer(folder)
    content = {i: token for token, i in tok.bpe.special_ids.items()}
    assert tok.eos_id == 128009  # what training ends responses with, and the first stop id
    assert tok.stop_ids == [128009, 128001, 128008]
    # this file names 128008 <|reserved_special_token_4|> (Meta's 3.1 release: <|eom_id|>)
    assert [content[i] for i in tok.stop_ids[:2]] == ["<|eot_id|>", "<|end_of_text|>"] and 128008 in content
    # saved checkpoints copy it, and stop alike
    assert tok.files["generation_config.json"] == str(folder / "generation_config.json")
    sentencepiece = tmp_path / "sentencepiece"  # the same for a sentencepiece folder
    sentencepiece.mkdir()
    shutil.copyfile(spm_model_path, sentencepiece / "tokenizer.model")
    (sentencepiece / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert tokenizer.Tokenizer(sentencepiece).stop_ids == [2, 7]
    for bad in (512, "7", True):
        (sentencepiece / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, bad]}))
        message = rf"generation_config.json: eos_token_id {bad!r} is not a token id"
        with pytest.raises(tokenizer.TokenizerError, match=message):
            tokenizer.Tokenizer(sentencepiece)


def test_qwen3_normalizes_to_nfc(loaded):
    ours, reference, _ = loaded("qwen3")
    for text in NFC_TEXTS:
        nfc = unicodedata.normalize("NFC", text)
        assert nfc != text and ours.encode(text) == ours.encode(nfc) == reference.encode(text).ids


FLAGS = [dict(lstrip=True), dict(rstrip=True), dict(lstrip=True, rstrip=True), dict(single_word=True),
         dict(normalized=False), dict(single_word=True, lstrip=True, rstrip=True, normalized=False), {}]


def test_added_token_flags_match_as_tokenizers_matches_them(loaded, tmp_path):
    # Qwen3's file (NFC) with its added tokens given each combination of flags in turn, plus decomposed ones
    # that NFC composes (they match composed text only where normalized=true)
    ours, _, _ = loaded("qwen3")
    spec = json.load(open(ours.path, encoding="utf-8"))
    last = max(token["id"] for token in spec["added_tokens"])
    contents = [f"<re\u0301sume\u0301{k}>" for k in range(len(FLAGS))]
    contents += ["<thi", "<tool"]  # prefixes of others: the longest match wins
    contents += ["im_start"]  # inside a special token, which stays text: not looked for there either
    spec["added_tokens"] += [dict(spec["added_tokens"][-1], id=last + 1 + k, content=content)
                             for k, content in enumerate(contents)]
    not_special = [token for token in spec["added_tokens"] if not token["special"]]
    for k, token in enumerate(not_special):
        token.update(FLAGS[k % len(FLAGS)])
    assert all(any(token[f] for token in not_special) for f in ("lstrip", "rstrip", "single_word"))
    folder = tmp_path / "flags"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    shutil.copyfile(os.path.join(os.path.dirname(ours.path), "tokenizer_config.json"),
                    folder / "tokenizer_config.json")
    flagged = tokenizer.Tokenizer(folder)
    reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    reference.encode_special_tokens = True
    texts = added_token_texts(spec, seed=1) + [f"a <résumé{k}>b" for k in range(len(FLAGS))]
    texts += ["<|im_start|>user im_start"]
    differ = [t for t in texts if flagged.encode(t) != reference.encode(t, add_special_tokens=False).ids]
    made = {i for text in texts for i in flagged.encode(text)}
    assert not differ, differ[:3]
    assert all(token["id"] in made for token in not_special)


def test_a_16k_letter_word_on_llama3_is_quick_and_gives_tokenizers_ids(loaded):
    """One 16,000-letter word (random letters: no cache, not a token itself) on Llama 3's real file: well under
    a second (0.08 s; `tokenizers` 0.02 s). The earlier merge, one pass over the word per merge applied, took
    8 s on a quiet machine and 17 s on a loaded 2-core one."""
    ours, reference, _ = loaded("llama3")
    rng = random.Random(0)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(16_000))
    start = time.perf_counter()
    ids = ours.encode(word)
    seconds = time.perf_counter() - start
    print(f"\n16,000-letter word on Llama 3: {seconds:.3f} s, {len(ids)} tokens")
    assert ids == reference.encode(word, add_special_tokens=False).ids
    assert seconds < 2.0
