"""tokenizer.py on the real tokenizer files their publishers shipped (tests/fetch_real_files.py),
against Hugging Face's `tokenizers` and transformers' AutoTokenizer on the same files: byte-level and
sentencepiece-style tokenizer.json files; sentencepiece tokenizer.model files (Llama 2, Mistral v0.1 and
v0.3) against sentencepiece and transformers 4.57's slow LlamaTokenizer; Meta's tiktoken tokenizer.model
(Llama 3) against the Hugging Face release's tokenizer.json.

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
import sentencepiece

import data
import tokenizer
from test_bpe import PARITY_TEXTS, random_texts

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tokenizer.json files tokenizer.py opens; llama2-json is sentencepiece-style (its vocabulary is Mistral 7B's)
IMPLEMENTED = ["smollm2-135m-instruct", "llama3", "llama3_1", "qwen3", "deepseek-v3", "gpt2", "llama2-json"]


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


def transformers_rebuilds(name, text):
    """Whether transformers' AutoTokenizer reads a text otherwise than the file says: transformers 5 builds its own
    pipeline for a file whose tokenizer_config.json names LlamaTokenizer (models/llama/tokenization_llama.py:
    no normalizer, Metaspace with prepend_scheme "always"), dropping llama2-json's Prepend normalizer, so a text
    that begins with a space gets one "▁" first, not two as the file (`tokenizers`, transformers 4.57 and
    sentencepiece) puts them."""
    return name == "llama2-json" and int(transformers.__version__.split(".")[0]) >= 5 and text.startswith(" ")


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
        agree = ids == expected.ids and ours.decode(ids) == expected_text
        if not transformers_rebuilds(name, text):
            agree = agree and from_auto == ids
        same += agree
        if not agree and differ < 5:
            differ += 1
            print(f"\n{name}: differs on {text[:60]!r}: {ids[:12]} vs {expected.ids[:12]}")
    rebuilt = sum(transformers_rebuilds(name, text) for text in texts)
    print(f"\n{name}: ids = tokenizers = transformers {transformers.__version__} on {same} of {len(texts)} "
          "texts" + f" ({rebuilt} that begin with a space: = tokenizers only, see transformers_rebuilds)" * bool(rebuilt))
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


# ---- sentencepiece-style files: tokenizer.model (sentencepiece itself), tokenizer.json (read by hand)

SENTENCEPIECE = ["llama2-spm", "mistral-v1", "mistral-v3"]  # Meta's Llama 2, Mistral 7B v0.1 and v0.3


def control_texts(sp):
    """Every control piece of a sentencepiece model (Mistral v0.3's [INST], [/INST], [TOOL_CALLS], ...) written
    into text, alone and among words."""
    controls = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i)]
    texts = [f"{piece}" for piece in controls] + [f"[INST] {piece} hi{piece}[/INST] x {piece}" for piece in controls]
    return texts + [" ".join(controls), "".join(controls), "[INST] What is 2+2? [/INST] 4</s>[INST] and 3+3?"]


@pytest.mark.parametrize("name", SENTENCEPIECE)
def test_sentencepiece_files_give_sentencepieces_and_the_slow_llama_tokenizers_ids(name, real_files):
    """Meta's Llama 2 and Mistral's v0.1 and v0.3 tokenizer.model: ids with BOS = sentencepiece's = transformers
    4.57's slow LlamaTokenizer with legacy=True (transformers 5 has no slow tokenizer: the transformers-4 pass
    compares with it), on every text; decoding = sentencepiece's; no control piece from text."""
    folder = real_files(name)
    ours = tokenizer.Tokenizer(folder)
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
    slow = None
    if int(transformers.__version__.split(".")[0]) < 5:
        slow = transformers.LlamaTokenizer(vocab_file=os.path.join(folder, "tokenizer.model"), legacy=True)
    assert ours.sp is not None and (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 0)
    assert ours.vocab_size == {"llama2-spm": 32000, "mistral-v1": 32000, "mistral-v3": 32768}[name]
    texts = TEXTS + NFC_TEXTS + control_texts(sp)
    control = {i for i in range(sp.get_piece_size()) if sp.is_control(i)}
    made = set()
    for text in texts:
        ids = ours.encode(text, bos=True)
        made.update(ids[1:])
        assert ids == [sp.bos_id()] + sp.encode(text), text
        assert ours.decode(ids) == sp.decode(ids[1:]), text
        if slow:
            assert ids == slow(text, split_special_tokens=True)["input_ids"], text
    assert not made & control and len(control) == {"mistral-v3": 750}.get(name, 2)  # v0.3: <s>, </s> and 748
    reference = f"sentencepiece and transformers {transformers.__version__}'s slow LlamaTokenizer" if slow \
        else "sentencepiece"
    print(f"\n{name}: ids = {reference} on {len(texts)} of {len(texts)} texts")


def test_mistral_v3_control_tokens_are_never_made_from_text(real_files):
    tok = tokenizer.Tokenizer(real_files("mistral-v3"))
    ids = tok.encode("[INST] Name a color. [/INST] Red.</s>[TOOL_CALLS] [AVAILABLE_TOOLS]", bos=True)
    assert [tok.sp.id_to_piece(i) for i in ids[:5]] == ["<s>", "▁[", "INST", "]", "▁Name"]
    assert not {i for i in ids[1:] if tok.sp.is_control(i)}  # [INST] is 3, [/INST] 4: neither is there
    assert tok.sp.piece_to_id("[INST]") == 3 and tok.sp.is_control(3)
    assert tok.decode(ids) == "[INST] Name a color. [/INST] Red.</s>[TOOL_CALLS] [AVAILABLE_TOOLS]"


def test_the_sentencepiece_style_tokenizer_json_equals_the_tokenizer_model_it_came_from(real_files, loaded, tmp_path):
    # llama2-json (read by hand: Prepend and Replace, BPE with byte fallback) gives mistral-v1's sentencepiece ids
    ours, _, _ = loaded("llama2-json")
    spm_model = tokenizer.Tokenizer(real_files("mistral-v1"))
    assert [ours.encode(text) for text in TEXTS] == [spm_model.encode(text) for text in TEXTS]
    assert ours.bpe.byte_fallback and ours.bpe.unk_token == "<unk>" and ours.bpe.fuse_unk
    assert [ours.bos_id, ours.eos_id, ours.pad_id] == [1, 2, 0]  # pad: <unk>, as for tokenizer.model
    both = tmp_path / "both"  # a folder holding the two, as Mistral's and Llama 2's releases do: tokenizer.model
    shutil.copytree(real_files("llama2-json"), both)
    shutil.copy(os.path.join(real_files("mistral-v1"), "tokenizer.model"), both)
    assert tokenizer.Tokenizer(both).sp is not None and tokenizer.Tokenizer(both / "tokenizer.json").bpe is not None
    # its added tokens looked for in the normalized text instead: then the text reaches the normalizer whole, and
    # Prepend leaves an empty one empty, as in `tokenizers`
    spec = json.load(open(ours.path, encoding="utf-8"))
    for token in spec["added_tokens"]:
        token["normalized"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    shutil.copy(os.path.join(real_files("llama2-json"), "tokenizer_config.json"), tmp_path)
    normalized = tokenizer.Tokenizer(tmp_path)
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    reference.encode_special_tokens = True
    for text in ["", " ", "<s>", " a</s>  b", *PARITY_TEXTS]:
        assert normalized.encode(text) == reference.encode(text, add_special_tokens=False).ids, text


METASPACE = [("first", False), ("always", True), ("never", True)]  # prepend_scheme, split


@pytest.mark.parametrize("scheme, split", METASPACE)
def test_metaspace_files_equal_tokenizers_and_transformers(scheme, split, real_files, tmp_path):
    """llama2-json's vocabulary and merges, written by the `tokenizers` library with the Metaspace pre-tokenizer
    (no normalizer) as newer Llama 2 and Mistral files are, with each prepend_scheme, and an added token that is
    not special (the text after it is not the text's first piece): ids and decoding = `tokenizers` = transformers
    on PARITY_TEXTS, 300 random texts, the edge texts and texts around the added tokens (a sample, for time);
    decoding also on random ids (byte pieces among them)."""
    source = tokenizers.Tokenizer.from_file(os.path.join(real_files("llama2-json"), "tokenizer.json"))
    source.normalizer = tokenizers.normalizers.Sequence([])
    source.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    source.add_tokens([tokenizers.AddedToken("<extra>", special=False, normalized=False),
                       tokenizers.AddedToken(" ⟨tab⟩", special=False, normalized=True)])
    source.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({  # read as written: not rebuilt as LlamaTokenizer
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "clean_up_tokenization_spaces": False}))
    ours = tokenizer.Tokenizer(tmp_path / "tokenizer.json")
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    reference.encode_special_tokens = True
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    spec = json.load(open(tmp_path / "tokenizer.json", encoding="utf-8"))
    texts = PARITY_TEXTS + random_texts(300, seed=2) + edge_texts()[::4] + added_token_texts(spec)[::2]
    texts += ["<extra>x", "x<extra> y", " <extra>  ⟨tab⟩ z", "⟨tab⟩", " ⟨tab⟩a"]
    theirs = reference.encode_batch(texts, add_special_tokens=False)
    auto_ids = auto(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    for text, expected, from_auto in zip(texts, theirs, auto_ids):
        ids = ours.encode(text)
        assert ids == expected.ids == from_auto, text
        assert ours.decode(ids) == reference.decode(ids) == auto.decode(ids, skip_special_tokens=True), text
    assert ours.encode("x", bos=True) == reference.encode("x").ids == auto("x")["input_ids"]
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 12))]
        ids += [rng.randrange(3, 259) for _ in range(rng.randint(0, 4))]  # byte pieces, valid UTF-8 or not
        assert ours.decode(ids) == reference.decode(ids), ids


# ---- Meta's Llama 3 tokenizer.model (tiktoken)

def test_metas_tiktoken_file_gives_the_hugging_face_releases_ids(real_files, loaded, tmp_path):
    """Meta's tokenizer.model (llama-models 0.3.0), read by hand: ids and decoding = the Hugging Face release's
    tokenizer.json (tokenizer.py and `tokenizers` on it) on every text; the special tokens where Meta's
    tokenizer.py puts them, never made from text; BOS, EOS and pad as Meta's code names them."""
    meta = tokenizer.Tokenizer(real_files("llama3-tiktoken"))
    hugging_face, reference, _ = loaded("llama3")
    assert isinstance(meta.bpe, tokenizer.MetaLlama3Tiktoken)
    texts = TEXTS + NFC_TEXTS + added_token_texts(json.load(open(hugging_face.path, encoding="utf-8")))
    theirs = reference.encode_batch(texts, add_special_tokens=False)
    made = set()
    for text, expected in zip(texts, theirs):
        ids = meta.encode(text)
        made.update(ids)
        assert ids == expected.ids == hugging_face.encode(text), text
        assert meta.decode(ids) == hugging_face.decode(ids), text
    assert max(made) < 128000 and meta.encode("Hi", bos=True) == [128000] + reference.encode("Hi").ids
    print(f"\nllama3-tiktoken: ids = the Hugging Face release's tokenizer.json on {len(texts)} of {len(texts)} "
          "texts")
    special = meta.bpe.special_ids
    assert (meta.vocab_size, meta.bos_id, meta.eos_id, meta.pad_id) == (128256, 128000, 128001, 128004)
    assert [special[name] for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                       "<|finetune_right_pad_id|>", "<|start_header_id|>", "<|end_header_id|>",
                                       "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
                                       "<|reserved_special_token_2|>", "<|reserved_special_token_245|>")] == \
        [128000, 128001, 128002, 128004, 128006, 128007, 128008, 128009, 128010, 128011, 128012, 128255]
    # the structural ones are where the Hugging Face releases of 3 and 3.1 put them
    assert all(special[name] == hugging_face.bpe.special_ids[name]
               for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"))
    assert meta.piece_bytes(128009) == b"" and meta.decode([128000, 9906, 128009]) == "Hello"
    # an Instruct folder's generation_config.json adds <|eot_id|> to the stop ids
    shutil.copy(meta.path, tmp_path / "tokenizer.model")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    assert tokenizer.Tokenizer(tmp_path).stop_ids == [128001, 128009]


def test_tiktoken_files_other_than_metas_llama3_are_refused_by_line(real_files, tmp_path):
    lines = open(os.path.join(real_files("llama3-tiktoken"), "tokenizer.model"), "rb").read().splitlines()
    for name, broken, message in [
            ("short", lines[:1000], r"tiktoken BPE file of 1000 ranks \(0 of the 256 bytes lacking\): only Meta's "
                                    r"Llama 3 one is implemented"),
            ("rank", lines[:5] + [lines[6]] + lines[6:], r"tiktoken BPE file, line 6: .* is not a base64 token and "
                                                         r"its rank 5"),
            ("base64", lines[:7] + [b"not-base64! 7"] + lines[8:], r"tiktoken BPE file, line 8: .* is not a base64")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.model").write_bytes(b"\n".join(broken) + b"\n")
        with pytest.raises(tokenizer.TokenizerError, match=rf"{name}/tokenizer.model: not a sentencepiece model but "
                                                           rf"a {message}"):
            tokenizer.Tokenizer(tmp_path / name)


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
