"""Shared test fixtures: a tiny LLaMA-style sentencepiece tokenizer trained in the test session."""
import io
import os
import sys

import pytest
import torch

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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end checks (still run in CI)")


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
