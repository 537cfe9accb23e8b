"""Shared test fixtures: tiny tokenizers trained in the test session, a LLaMA-style sentencepiece model and
byte-level BPE tokenizer.json folders in the styles real checkpoints ship."""
import collections
import json
import os
import shutil
import sys
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def sequence_logprobs(net, prompts, responses):
    """The naive reference the packed and served scores must equal: each (prompt, response) alone in its own
    row through model.py -> (sum of the response tokens' log-probs, their count) per pair. Gradients flow."""
    import model
    sums = []
    for prompt, response in zip(prompts, responses):
        logits = net(torch.tensor([list(prompt) + list(response)]))[0, len(prompt) - 1:-1]  # predict the response
        sums.append(model.token_logprobs(logits, torch.tensor(response, dtype=torch.long)).sum())
    return torch.stack(sums), torch.tensor([len(r) for r in responses])


class RecordOps(TorchDispatchMode):
    """The names of the aten operations that run inside it (ops), and the shapes of each one's tensor
    arguments (shapes: name -> list of calls): which kernel a path really ran."""

    def __init__(self):
        super().__init__()
        self.shapes = collections.defaultdict(list)

    @property
    def ops(self):
        return set(self.shapes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.shapes[func.overloadpacket.__name__].append([tuple(a.shape) for a in args if torch.is_tensor(a)])
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="session")
def real_files():
    """real_files(name) -> the folder of a real file its publisher shipped, fetched by
    tests/fetch_real_files.py. Under CI=true a missing one fails the test; elsewhere it skips."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fetch_real_files

    def folder(name):
        path = fetch_real_files.real_file_dir(name)
        if path:
            return path
        message = f"real file '{name}' not fetched: run python tests/fetch_real_files.py"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return folder


class ServedInThread:
    """For a `with` block: self.server (an http.server on 127.0.0.1; port 0 picks a free one) answers on a
    thread; url is its /v1 base URL. A test server sets self.server (to itself where it is the http.server)."""

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end checks (still run in CI)")


def pytest_collection_modifyitems(items):
    """The modules that hold a slow test first, each module's tests in their order: on two workers
    (tests/run_all.sh, --no-loadscope-reorder) the longest start at once instead of last."""
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_modules)


# Enough varied text for a 512-piece BPE vocabulary: prose, the Alpaca template, digits, unicode.
CORPUS_LINES = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "### Instruction:", "### Input:", "### Response:",
    "Give three tips for staying healthy. Eat a balanced diet, exercise regularly and sleep well.",
    "What is the capital of France? The capital of France is Paris.",
    "Sort the numbers 42, 7, 19 and 3 in increasing order: 3, 7, 19, 42.",
    "Count the letters in the word banana. The word banana has 6 letters.",
    "Reverse the string 'hello world' to get 'dlrow olleh'.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Translate to French: good morning -> bonjour; thank you -> merci; café, naïve, résumé.",
    "Unicode text: 東京 is Tokyo, Ωmega and ü, emoji 🙂 are rare in this corpus.",
    "Rank the responses from best to worst and explain the scores of each response.",
    "Add 123 and 456. The sum of 123 and 456 is 579.",
    "def add(a, b):\n    return a + b\n",
]


@pytest.fixture(scope="session")
def spm_model_path(tmp_path_factory):
    """Path of a tokenizer.model trained with LLaMA's settings (BPE, byte fallback, split digits,
    BOS=1, EOS=2, UNK=0, no pad piece)."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("tokenizer")
    text = "\n".join(CORPUS_LINES * 20)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n")),
        model_prefix=str(out / "tokenizer"),
        model_type="bpe",
        vocab_size=512,
        byte_fallback=True,
        split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        minloglevel=2,
    )
    return str(out / "tokenizer.model")


def pytest_terminal_summary(terminalreporter):
    """Which transformers release the parity tests compared with (.ci/run runs two)."""
    try:
        import transformers
        terminalreporter.write_line(f"parity reference: transformers {transformers.__version__}")
    except ImportError:
        terminalreporter.write_line("parity reference: transformers not installed")


# ----------------------------------------------------------------------------- byte-level BPE tokenizers
# Built with Hugging Face's `tokenizers` (test-only) the way real checkpoints ship them: tokenizer.json plus a
# tokenizer_config.json naming the special tokens. tokenizer.py reads them by hand.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's tokenizer.json, Split pre-tokenizer
BPE_STYLES = {  # pre-tokenizer, ignore_merges, special tokens, BOS template, tokenizer_config.json
    "gpt2": ("ByteLevel", False, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None,
             {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}),
    "gpt2_prefix_space": ("ByteLevel add_prefix_space", False, ["<|endoftext|>", "<|pad|>"], None,
                          {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}),
    "llama3": ("Split(Llama 3 regex) + ByteLevel", True,
               ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eot_id|>"],
               "<|begin_of_text|>", {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}),
    "smollm2": ("Digits(individual) + ByteLevel", False, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None,
                {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}),
    "digit_runs": ("Digits + ByteLevel", False, ["<s>", "</s>", "<pad>"], "<s>",
                   {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}),
}


def build_bpe_tokenizer(folder, style, texts, vocab_size=700):
    """Train a byte-level BPE tokenizer of the given BPE_STYLES style on texts; write tokenizer.json and
    tokenizer_config.json into folder (created) and return the folder's path."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    pre_tokenizer, ignore_merges, specials, bos, config = BPE_STYLES[style]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space="add_prefix_space" in pre_tokenizer,
                                          use_regex="Split" not in pre_tokenizer)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = {
        "Split(Llama 3 regex) + ByteLevel": lambda: pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"), byte_level]),
        "Digits(individual) + ByteLevel": lambda: pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "Digits + ByteLevel": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(), byte_level]),
    }.get(pre_tokenizer, lambda: byte_level)()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos:
        steps.append(processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]))
    tok.post_processor = processors.Sequence(steps)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    if ignore_merges:  # as Llama 3's file says: a word that is a vocabulary token is not split
        with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
            spec = json.load(f)
        spec["model"]["ignore_merges"] = True
        with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(spec, f, ensure_ascii=False)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                   "model_max_length": 2048, **config}, f)
    return str(folder)


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory):
    """A Llama 3-style byte-level BPE tokenizer folder (tokenizer.json + tokenizer_config.json), trained on
    the corpus the sentencepiece fixture uses."""
    return build_bpe_tokenizer(tmp_path_factory.mktemp("bpe_tokenizer"), "llama3", CORPUS_LINES * 20, 600)


# eval.py's benchmark folders, for test_eval_e2e.py and test_bpe_pipeline.py
EVAL_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    """Small folders in the benchmarks' layouts: 2 real Super-NI tasks + one without Instances + one missing;
    the LMentry fixtures + an unreadable file; 4 Vicuna questions (one coding) + a malformed line."""
    root = tmp_path_factory.mktemp("bench")
    (root / "superni" / "tasks").mkdir(parents=True)
    names = ["task648_answer_generation", "task1393_superglue_copa_text_completion"]
    for name in names:
        shutil.copy(os.path.join(EVAL_FIXTURES, "superni", "tasks", name + ".json"), root / "superni" / "tasks")
    (root / "superni" / "tasks" / "task_no_instances.json").write_text(json.dumps(
        {"Definition": ["Say hi."], "Categories": ["Title Generation"], "Instances": []}))
    (root / "superni" / "test_tasks.txt").write_text("\n".join(names + ["task_no_instances", "task_missing"]) + "\n")
    shutil.copytree(os.path.join(EVAL_FIXTURES, "lmentry"), root / "lmentry")
    (root / "lmentry" / "homophones.json").write_text('{"settings": ')
    (root / "vicuna").mkdir()
    with open(os.path.join(EVAL_FIXTURES, "vicuna", "question.jsonl")) as f:
        lines = [line for line in f if json.loads(line)["question_id"] in (1, 2, 61, 71)]
    (root / "vicuna" / "question.jsonl").write_text("".join(lines[:2]) + '{"question_id": 99, "turns": [\n'
                                                    + "".join(lines[2:]))
    shutil.copy(os.path.join(EVAL_FIXTURES, "vicuna", "reference_answer_gpt-4.jsonl"), root / "vicuna")
    return root
