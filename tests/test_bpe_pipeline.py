"""The pipeline once on a checkpoint whose tokenizer is byte-level BPE (tokenizer.json, Llama 3 style) instead of
sentencepiece: SFT (EOS appended and learned, prompt masked), `server.py`, Tuna's pipeline with contextual
sampling through teacher.py and a judge over HTTP, and eval.py. The sentencepiece versions are test_tuna_train.py,
test_teacher.py and test_eval_e2e.py; this reuses their data, helpers and benchmark fixtures."""
import json
import os
import random
import shutil

import pytest
import requests
import torch

import checkpoint
import data
import demo
import eval as E
import model
import tokenizer
import tuna
from test_tuna_train import WORDS

tokenizers = pytest.importorskip("tokenizers")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft(tmp_path_factory, bpe_tokenizer_dir):
    """A tiny random LLaMA with the conftest BPE tokenizer, SFT-trained with tuna.py until it has learned 8 short
    answers (as test_tuna_train.py's data: random words); -> (root folder, tokenizer, the Alpaca examples)."""
    root = tmp_path_factory.mktemp("bpe_pipeline")
    tok = tokenizer.Tokenizer(bpe_tokenizer_dir)
    torch.manual_seed(0)
    args = model.ModelArgs(**{**model.CONFIGS["tiny"], "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                              "eos_id": tok.eos_id})
    checkpoint.save_hf_checkpoint(model.Transformer(args), str(root / "init"))
    for name, source in tok.files.items():
        shutil.copyfile(source, root / "init" / name)
    rng = random.Random(0)
    say = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    examples = [{"instruction": say(3, 8), "input": "", "output": say(2, 10)} for _ in range(8)]
    (root / "alpaca.json").write_text(json.dumps(examples))
    records = [data.RankedRecord(id=str(i), prompt=data.alpaca_prompt(e["instruction"]), instruction=e["instruction"],
                                 candidates=[e["output"], say(2, 10)], source={"kind": "probabilistic"})
               for i, e in enumerate(examples)]
    data.write_ranked_jsonl(root / "ranked.jsonl", records)
    assert tuna.main(["sft", "--init", str(root / "init"), "--data", str(root / "alpaca.json"), "--out",
                      str(root / "sft"), "--batch-size", "4", "--lr", "1e-2", "--epochs", "20",
                      "--log-every", "100"]) == 0
    return root, tok, examples


def test_sft_rows_mask_the_prompt_end_in_eos_and_the_model_learns_to_stop(sft):
    root, tok, examples = sft
    for name in tok.files:  # the checkpoint carries its tokenizer: tokenizer.json and tokenizer_config.json
        assert (root / "sft" / name).read_bytes() == (root / "init" / name).read_bytes()
    assert tokenizer.Tokenizer(root / "sft").bpe is not None
    for row, example in zip(tuna.load_rows(str(root / "alpaca.json"), tok, "sft"), examples):
        prompt = tok.encode(data.alpaca_prompt(example["instruction"]), bos=True)
        assert row["tokens"][:len(prompt)] == prompt and prompt[0] == tok.bos_id
        assert row["target"][-1] == tok.eos_id and tok.decode(row["target"][:-1]) == example["output"]
        assert min(row["source"]) == len(prompt) - 1  # only response tokens (and EOS) are trained on
    net = checkpoint.load_checkpoint(str(root / "sft"))
    prompts = [tok.encode(data.alpaca_prompt(e["instruction"]), bos=True) for e in examples]
    answers, _ = model.generate(net, prompts, 40, eos_id=tok.eos_id)
    learned = [a[-1] == tok.eos_id and tok.decode(a[:-1]) == e["output"] for a, e in zip(answers, examples)]
    assert sum(learned) >= len(examples) // 2, answers  # greedy answers stop at EOS and decode to the trained text


def test_teacher_serve_answers_with_text_decoded_as_tokenizers_does(sft):
    root, tok, examples = sft
    reference = tokenizers.Tokenizer.from_file(str(root / "sft" / "tokenizer.json"))
    net = checkpoint.load_checkpoint(str(root / "sft"))
    process, url = demo.start_teacher_server(str(root / "sft"))  # `python server.py`, as a user starts it
    finished = []
    try:
        for example in examples[:4]:
            prompt = data.alpaca_prompt(example["instruction"])
            reply = requests.post(url + "/completions", json={"model": "demo-teacher", "prompt": prompt,
                                                              "max_tokens": 40, "temperature": 0, "logprobs": 1})
            choice = reply.json()["choices"][0]
            ids, _ = model.generate(net, [tok.encode(prompt, bos=True)], 40, eos_id=tok.eos_id)
            body = [i for i in ids[0] if i != tok.eos_id]
            assert choice["text"] == reference.decode(body, skip_special_tokens=True)
            assert choice["finish_reason"] == ("stop" if ids[0][-1] == tok.eos_id else "length")
            finished.append(choice["finish_reason"])
            assert "".join(choice["logprobs"]["tokens"]) == choice["text"]  # every token here is whole UTF-8
    finally:
        process.kill()
        process.wait()
    assert "stop" in finished  # the server stopped on the BPE tokenizer's EOS


def test_pipeline_with_contextual_sampling_and_a_judge_over_http(sft, tmp_path):
    root, tok, examples = sft
    judge = demo.start_rule_judge({e["instruction"]: e["output"] for e in examples})
    try:
        out = tmp_path / "tuna"
        assert tuna.main(["pipeline", "--init", str(root / "sft"), "--probabilistic-data", str(root / "ranked.jsonl"),
                          "--instructions", str(root / "alpaca.json"), "--out", str(out),
                          "--batch-size", "4", "--teacher-base-url", f"http://127.0.0.1:{judge.server_port}/v1",
                          "--teacher-model", demo.JUDGE, "--teacher-args",
                          "--limit 4 --n 2 --tries 1 --student-max-tokens 24 --workers 1"]) == 0
    finally:
        judge.shutdown()
    records = data.read_ranked_jsonl(out / "contextual.jsonl")
    failures = [json.loads(line) for line in open(f"{out / 'contextual.jsonl'}.failures.jsonl")] \
        if os.path.exists(f"{out / 'contextual.jsonl'}.failures.jsonl") else []
    assert len(records) + len(failures) == 4 and records
    by_instruction = {e["instruction"]: e["output"] for e in examples}
    for record in records:  # Tuna_p's own samples, decoded, ranked by the judge (the known answer first)
        assert record.candidates[0] == by_instruction[record.instruction]
        assert all(tok.decode(tok.encode(c)) == c for c in record.source["student_candidates"])
    for stage in ("tuna_p", "tuna"):
        assert tokenizer.Tokenizer(out / stage).encode("Paris") == tok.encode("Paris")
        checkpoint.load_checkpoint(str(out / stage))


def test_eval_on_the_bpe_checkpoint(sft, benchmarks, tmp_path):
    root, tok, examples = sft
    E.main(["--checkpoints", f"bpe={root / 'sft'}", "--superni", str(benchmarks / "superni"), "--out",
            str(tmp_path), "--max-instances", "3", "--batch-size", "4", "--max-new-tokens", "8", "8", "8",
            "--device", "cpu"])  # the tokenizer is the checkpoint's own tokenizer.json
    items = json.loads((tmp_path / "results.json").read_text())["models"]["bpe"]["superni"]["items"]
    assert len(items) == 6 and all(isinstance(item["prediction"], str) for item in items)
    # eval's batched greedy path answers the training instructions with the trained answers, as generate does
    prompts = [{"id": str(i), "prompt": data.alpaca_prompt(e["instruction"])} for i, e in enumerate(examples)]
    answers = E.generate_answers("bpe", "train", prompts, E.model_loader(str(root / "sft"), None, "cpu", None),
                                 str(tmp_path), 4, 40, E.answer_producer(str(root / "sft")))
    assert sum(answers[str(i)] == e["output"] for i, e in enumerate(examples)) >= len(examples) // 2
