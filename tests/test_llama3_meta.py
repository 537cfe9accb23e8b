"""Meta's own Llama 3 layout end to end: the real tiktoken tokenizer.model Meta ships (PyPI llama-models, fetched
by tests/fetch_real_files.py) beside a params.json and a consolidated.00.pth written here (Llama 3's vocabulary
of 128,256, tiny dimensions, random weights): `tuna.py sft` trains on it, the SFT checkpoint keeps the tokenizer,
and greedy generation (model.generate, and eval.py's answers on a Super-NI task) stops at the stop ids and
decodes. The weights are random: what is tested is the plumbing, not the text."""
import json
import os
import shutil

import torch

import checkpoint
import eval as E
import model
import teacher
import tokenizer
import tuna
from test_eval import SUPERNI

# Llama 3.1 8B's params.json with tiny dimensions (Meta's keys: use_scaled_rope, rope_theta 500000)
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 32,
          "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
EXAMPLES = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris. <|eot_id|> stays text."},
    {"instruction": "Give the opposite of the word.", "input": "hot", "output": "Cold."},
]


def meta_folder(path, tiktoken_model):
    """A folder in Meta's layout (as Meta's `original/` folders): tokenizer.model, params.json and
    consolidated.00.pth, the weights in Meta's module names."""
    os.makedirs(path)
    shutil.copyfile(tiktoken_model, os.path.join(path, "tokenizer.model"))
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(PARAMS, f)
    args = checkpoint.args_from_meta_params(os.path.join(path, "params.json"))
    torch.manual_seed(0)
    torch.save(model.Transformer(args).state_dict(), os.path.join(path, "consolidated.00.pth"))
    return str(path)


def test_sft_and_generation_on_metas_llama3_layout(real_files, tmp_path):
    init = meta_folder(tmp_path / "llama3-meta", os.path.join(real_files("llama3-tiktoken"), "tokenizer.model"))
    tok = tokenizer.Tokenizer(init)
    assert isinstance(tok.bpe, tokenizer.MetaLlama3Tiktoken)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (128256, 128000, 128001, 128004,
                                                                                 [128001])
    # 1. SFT: two steps; each response ends with EOS (<|end_of_text|>), "<|eot_id|>" in a response is text
    instructions = tmp_path / "alpaca.json"
    instructions.write_text(json.dumps(EXAMPLES))
    sft = str(tmp_path / "sft")
    assert tuna.main(["sft", "--init", init, "--data", str(instructions), "--out", sft, "--max-steps", "2",
                      "--batch-size", "2", "--precision", "fp32", "--save-every", "0", "--device", "cpu"]) == 0
    steps = [json.loads(line) for line in open(os.path.join(sft, "metrics.jsonl"))]
    assert [s["step"] for s in steps] == [1, 2] and all(s["mle"] > 0 for s in steps)
    for row in tuna.load_rows(str(instructions), tok, "sft"):
        response = [t for t, c in zip(row["target"], row["candidate"]) if c == 0]
        assert response[-1] == tok.eos_id and not set(response[:-1]) & set(tok.bpe.special_ids.values())
    # the SFT checkpoint (Hugging Face layout) holds the same tiktoken file and reads it alike
    net = checkpoint.load_checkpoint(sft).eval()
    assert net.args.vocab_size == 128256 and not os.path.exists(os.path.join(sft, "tokenizer.json"))
    saved = tokenizer.Tokenizer(sft)
    text = "Name a color. 東京 🙂 <|begin_of_text|>"
    assert isinstance(saved.bpe, tokenizer.MetaLlama3Tiktoken) and saved.encode(text) == tok.encode(text)

    # 2. generation: an Instruct folder's generation_config.json adds <|eot_id|> to the stop ids; a model that
    # always says <|eot_id|> stops at once, and the text leaves it out
    with open(os.path.join(sft, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 128000, "eos_token_id": [128001, 128009]}, f)
    instruct = tokenizer.Tokenizer(sft)
    assert instruct.stop_ids == [128001, 128009] and instruct.bpe.special_ids["<|eot_id|>"] == 128009
    prompt = [instruct.encode("Name a color.", bos=True)]
    with torch.no_grad():
        free, _ = model.generate(net, prompt, 6, eos_id=instruct.stop_ids)
        for layer in net.layers:  # the blocks add nothing, every embedding is all ones: only <|eot_id|> scores
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        net.tok_embeddings.weight.fill_(1.0)
        net.output.weight.zero_()
        net.output.weight[128009] = 1.0
        stopped, _ = model.generate(net, prompt, 6, eos_id=instruct.stop_ids)
    assert len(free[0]) == 6 or free[0][-1] in instruct.stop_ids
    assert stopped[0] == [128009] and teacher.without_stop(stopped[0], instruct.stop_ids)[0] == []
    assert isinstance(instruct.decode(free[0]), str)

    # 3. eval.py's greedy answers from the SFT checkpoint on a real Super-NI task file
    E.main(["--checkpoints", f"sft={sft}", "--superni", SUPERNI, "--out", str(tmp_path / "eval"),
            "--max-instances", "1", "--batch-size", "2", "--max-new-tokens", "6", "6", "6", "--device", "cpu",
            "--dtype", "float32"])
    items = json.loads((tmp_path / "eval" / "results.json").read_text())["models"]["sft"]["superni"]["items"]
    assert len(items) == 3 and all(isinstance(item["prediction"], str) for item in items)
