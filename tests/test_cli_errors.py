"""Every script's one error boundary (tuna.py, teacher.py, server.py, eval.py, demo.py, bench.py): known bad inputs,
each run through the script's command line in a subprocess, end as one line `SCRIPT: error: ...` naming the
file, field or URL, with a non-zero exit and no traceback; a training run that fails before its first step
leaves no run folder behind."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import data
import model
import tuna

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, spm_model_path):
    """A tiny checkpoint, a copy with its weights cut short, good and bad data files, and a run folder whose
    only checkpoint has a corrupt training state."""
    root = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    checkpoint.save_hf_checkpoint(model.Transformer(model.ModelArgs.from_name("tiny")), str(root / "init"))
    shutil.copyfile(spm_model_path, root / "init" / "tokenizer.model")
    shutil.copytree(root / "init", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    alpaca = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("yes", "no", "maybe", "never")]
    (root / "alpaca.json").write_text(json.dumps(alpaca))
    (root / "no_output.json").write_text(json.dumps([alpaca[0], {"instruction": "Say nothing."}]))
    records = [data.RankedRecord(id=str(i), prompt=data.alpaca_prompt(e["instruction"]),
                                 candidates=[e["output"], "no idea"]) for i, e in enumerate(alpaca)]
    data.write_ranked_jsonl(root / "ranked.jsonl", records)
    lines = (root / "ranked.jsonl").read_text().splitlines()
    (root / "cut.jsonl").write_text(lines[0] + "\n" + lines[1][:30] + "\n")
    (root / "not_a_tokenizer.model").write_text("not a sentencepiece model")
    (root / "vicuna").mkdir()
    (root / "vicuna" / "question.jsonl").write_text('{"question_id": 1, "turns": ["Hi?"]}\n')
    (root / "a_file").write_text("not a folder")
    (root / "other_demo").mkdir()
    (root / "other_demo" / "demo.json").write_text(json.dumps({"size": "ci", "noise": 0.9, "seed": 7}))
    # lr 1e30: step 2 is non-finite, so the run stops with the checkpoint of step 1 only
    assert tuna.main(["rank", "--init", str(root / "init"), "--data", str(root / "ranked.jsonl"), "--out",
                      str(root / "stopped"), "--batch-size", "2", "--lr", "1e30", "--save-every", "1"]) == 1
    state = root / "stopped" / "checkpoints" / "step-00000001" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    return root


TRAIN = ["--init", "{root}/init", "--data", "{root}/ranked.jsonl", "--out", "{root}/new_run"]
SFT = ["--data", "{root}/alpaca.json", "--out", "{root}/new_run"]
CASES = [  # (script and arguments, what the error line must contain)
    (["tuna.py", "sft", "--init", "{root}/missing", *SFT], "--init {root}/missing: no such folder"),
    (["tuna.py", "sft", "--init", "{root}/truncated", *SFT], "{root}/truncated/model.safetensors"),
    (["tuna.py", "sft", "--init", "{root}/init", "--data", "{root}/no_output.json", *SFT[2:]],
     "no_output.json, record 1, field 'output': missing"),
    (["tuna.py", "rank", *TRAIN[:3], "{root}/cut.jsonl", *TRAIN[4:]], "cut.jsonl, line 2: malformed JSON"),
    (["tuna.py", "rank", *TRAIN[:3], "{root}/missing.jsonl", *TRAIN[4:]], "{root}/missing.jsonl"),
    (["tuna.py", "rank", *TRAIN, "--tokenizer", "{root}/not_a_tokenizer.model"],
     "not_a_tokenizer.model: not a sentencepiece model"),
    (["tuna.py", "rank", *TRAIN[:5], "{root}/stopped", "--batch-size", "2", "--lr", "1e30", "--save-every",
      "1", "--resume"], "step-00000001/training_state.pt: cannot read the training state"),
    (["tuna.py", "rank", *TRAIN[:5], "{root}/stopped", "--batch-size", "2"], "{root}/stopped already exists"),
    (["tuna.py", "pipeline", "--init", "{root}/init", "--probabilistic-data", "{root}/ranked.jsonl", "--out",
      "{root}/new_run", "--batch-size", "2"], "give --contextual-data"),
    (["eval.py", "--checkpoints", "a={root}/missing", "--out", "{root}/eval"],
     "--checkpoints a={root}/missing"),
    (["eval.py", "--checkpoints", "a={root}/init", "--superni", "{root}/missing", "--out", "{root}/eval"],
     "--superni {root}/missing"),
    (["eval.py", "--checkpoints", "a={root}/init", "--lmentry", "{root}/missing", "--out", "{root}/eval"],
     "--lmentry {root}/missing"),
    (["eval.py", "--checkpoints", "a={root}/init", "--vicuna", "{root}/missing", "--out", "{root}/eval"],
     "--vicuna {root}/missing"),
    (["eval.py", "--checkpoints", "a={root}/truncated", "--vicuna", "{root}/vicuna", "--out", "{root}/eval",
      "--device", "cpu"], "{root}/truncated/model.safetensors"),
    (["eval.py", "--checkpoints", "{root}/init", "--out", "{root}/eval"], "is not NAME=DIR"),
    (["teacher.py", "probabilistic", "--data", "{root}/missing.json", "--out", "{root}/p.jsonl", "--base-url",
      "http://127.0.0.1:9/v1", "--model", "m"], "{root}/missing.json"),
    (["teacher.py", "probabilistic", "--data", "{root}/alpaca.json", "--out", "{root}/p.jsonl", "--base-url",
      "not-a-url", "--model", "m"], "not-a-url/completions"),
    (["teacher.py", "contextual", "--data", "{root}/alpaca.json", "--out", "{root}/c.jsonl", "--base-url",
      "http://127.0.0.1:9/v1", "--model", "m", "--student", "{root}/missing"], "{root}/missing"),
    (["teacher.py", "contextual", "--data", "{root}/alpaca.json", "--out", "{root}/c.jsonl", "--base-url",
      "http://127.0.0.1:9/v1", "--model", "m", "--student", "{root}/init", "--student-batch-size", "0"],
     "argument --student-batch-size: '0' is neither 'auto' nor a whole number of at least 1"),
    (["server.py", "--checkpoint", "{root}/truncated", "--port", "0"],
     "{root}/truncated/model.safetensors"),
    (["demo.py", "--out", "{root}/a_file"], "{root}/a_file"),
    (["bench.py", "--config", "no-such-config"], "--config no-such-config: not one of cpu-small"),
    (["bench.py", "--device", "cpu", "--memory-cap", "24"], "--memory-cap needs a CUDA GPU"),
    (["demo.py", "--out", "{root}/other_demo", "--size", "ci"],
     "{root}/other_demo/demo.json: this folder holds"),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(argv[:2]) + f" #{i}" for i, (argv, _) in
                                                      enumerate(CASES)])
def test_bad_input_ends_in_one_error_line(inputs, argv, expected):
    argv = [a.format(root=inputs) for a in argv]
    result = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], capture_output=True,
                            text=True, timeout=120, cwd=inputs)
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    script = argv[0] if argv[0] in ("eval.py", "demo.py", "bench.py", "server.py") else f"{argv[0]} {argv[1]}"
    assert last.startswith(f"{script}: error: "), result.stderr[-2000:]
    assert expected.format(root=inputs) in last, result.stderr[-2000:]
    assert not os.path.exists(inputs / "new_run")  # a run that fails before its first step leaves nothing
