"""model.py against transformers' LlamaForCausalLM (the reference people know) and against itself.

Run with -s to see the parity figures (max abs logit difference per config and checkpoint source)."""
import json
import os

import pytest
import safetensors.torch
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import model as M

# Tiny random configs covering what the loader must get right. intermediate_size follows Meta's rule
# (2/3 of 4*dim rounded up to multiple_of) so the same weights can also be written as a Meta params.json.
HF_CONFIGS = {
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=192, multiple_of=32,
                rms_norm_eps=1e-5),
    "gqa": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=192, multiple_of=32),
    "tied": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, multiple_of=32,
                 tie_word_embeddings=True),
    "theta500_eps0.05": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192,
                           multiple_of=32, rope_theta=500.0, rms_norm_eps=0.05),  # an eps that shows if ignored
    "head_dim_16": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        intermediate_size=128, multiple_of=32),  # 16 != 48 / 4
}
VOCAB = 128


def make_hf_model(name, seed=0):
    """A random LlamaForCausalLM whose weights are large enough to give varied logits (HF's 0.02 init gives
    almost uniform ones, against which any bug would look like parity)."""
    cfg = dict(HF_CONFIGS[name])
    cfg.pop("multiple_of")
    config = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2, attn_implementation="eager", **cfg)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)  # norm gains
            elif "embed_tokens" in key:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return hf


def tokens_for_test(seed=1, shape=(2, 13)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits.float()


def our_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


# The Meta layout written out here, independently of model.py: HF stores each head's q/k rows as
# [all real parts..., all imaginary parts...]; Meta interleaves them (re0, im0, re1, im1, ...).
def hf_rows_to_meta(weight, n_heads):
    head_dim = weight.shape[0] // n_heads
    out = torch.empty_like(weight)
    for h in range(n_heads):
        for i in range(head_dim // 2):
            out[h * head_dim + 2 * i] = weight[h * head_dim + i]
            out[h * head_dim + 2 * i + 1] = weight[h * head_dim + head_dim // 2 + i]
    return out


def write_meta_checkpoint(hf, name, out_dir, shards=1):
    c = hf.config
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"].clone(),  # tied HF model: Meta stores its own copy
            "rope.freqs": torch.zeros(c.head_dim // 2)}  # LLaMA-1 files carry this; the loader must skip it
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        wq, wk = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        meta[f"layers.{i}.attention.wq.weight"] = hf_rows_to_meta(wq, c.num_attention_heads)
        meta[f"layers.{i}.attention.wk.weight"] = hf_rows_to_meta(wk, c.num_key_value_heads)
        meta[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        meta[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        meta[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        meta[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        meta[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        meta[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        meta[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "multiple_of": HF_CONFIGS[name]["multiple_of"],
              "norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "vocab_size": -1}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(params, f)
    # fairscale model parallelism as Meta shipped 13B/70B: wq/wk/wv/w1/w3/output split their output rows,
    # wo/w2 their input columns, the embedding its feature columns; norms are copied to every shard.
    split_dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    for s in range(shards):
        part = {}
        for key, t in meta.items():
            dim = split_dim.get(key.split(".")[-2])
            part[key] = t if dim is None else t.chunk(shards, dim=dim)[s].clone()
        torch.save(part, os.path.join(out_dir, f"consolidated.{s:02d}.pth"))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Per config: the HF model and checkpoints written by transformers' save_pretrained, single and sharded."""
    out = {}
    for name in HF_CONFIGS:
        hf = make_hf_model(name)
        single, sharded = tmp_path_factory.mktemp(f"{name}-single"), tmp_path_factory.mktemp(f"{name}-sharded")
        hf.save_pretrained(single)
        hf.save_pretrained(sharded, max_shard_size="20KB")
        out[name] = (hf, str(single), str(sharded))
    return out


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers_from_hf_checkpoints(name, hf_dirs):
    hf, single, sharded = hf_dirs[name]
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    tokens = tokens_for_test()
    expected = hf_logits(hf, tokens)
    assert expected.std() > 0.5  # varied logits, so a wrong rotation or norm cannot hide
    for label, path in (("single", single), ("sharded", sharded)):
        model = M.load_checkpoint(path)
        diff = max_diff(our_logits(model, tokens), expected)
        print(f"\nparity {name:15s} HF {label:8s} max abs logit diff {diff:.2e}")
        assert diff <= 1e-4
    if name == "tied":
        assert model.output.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("name", ["mha", "gqa", "tied", "theta500_eps0.05"])  # Meta's params.json has no head_dim
def test_logits_match_transformers_from_meta_checkpoint(name, tmp_path):
    hf = make_hf_model(name)
    write_meta_checkpoint(hf, name, tmp_path)
    tokens = tokens_for_test()
    diff = max_diff(our_logits(M.load_checkpoint(str(tmp_path)), tokens), hf_logits(hf, tokens))
    print(f"\nparity {name:15s} Meta .pth        max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_meta_model_parallel_shards_are_merged(tmp_path):
    hf = make_hf_model("gqa")
    write_meta_checkpoint(hf, "gqa", tmp_path, shards=2)
    tokens = tokens_for_test()
    diff = max_diff(our_logits(M.load_checkpoint(str(tmp_path)), tokens), hf_logits(hf, tokens))
    print(f"\nparity gqa             Meta 2 shards    max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_qk_permutation_matters_and_round_trips(hf_dirs):
    hf, single, _ = hf_dirs["gqa"]
    args = M.ModelArgs.from_hf_config(os.path.join(single, "config.json"))
    sd = M.read_safetensors(os.path.join(single, "model.safetensors"))
    back = M.meta_to_hf(M.hf_to_meta(sd, args), args)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # Without the permutation the rotation pairs the wrong channels: logits must visibly change.
    model = M.load_checkpoint(single)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.copy_(M._permute_qk_rows(layer.attention.wq.weight, args.n_heads, to_hf=True))
            layer.attention.wk.weight.copy_(M._permute_qk_rows(layer.attention.wk.weight, args.n_kv_heads, to_hf=True))
    tokens = tokens_for_test()
    assert max_diff(our_logits(model, tokens), hf_logits(hf, tokens)) > 1e-2


@pytest.mark.parametrize("name", ["gqa", "tied", "head_dim_16"])
def test_save_hf_checkpoint_round_trip(name, hf_dirs, tmp_path):
    hf, single, _ = hf_dirs[name]
    model = M.load_checkpoint(single)
    tokens = tokens_for_test()
    for label, shard_bytes in (("single", 10**9), ("sharded", 30_000)):
        out = tmp_path / label
        M.save_hf_checkpoint(model, str(out), max_shard_bytes=shard_bytes)
        files = os.listdir(out)
        assert ("model.safetensors.index.json" in files) == (label == "sharded")
        assert not [f for f in files if ".tmp" in f]
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
        reloaded_hf = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        diff = max_diff(hf_logits(reloaded_hf, tokens), hf_logits(hf, tokens))
        print(f"\nround trip {name:11s} {label:8s} transformers.from_pretrained max abs logit diff {diff:.2e}")
        assert diff <= 1e-5
        again = M.load_checkpoint(str(out))
        assert again.args == model.args
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    # saving a single file over a sharded save removes the shards and the index that would shadow it
    M.save_hf_checkpoint(model, str(tmp_path / "sharded"))
    assert sorted(os.listdir(tmp_path / "sharded")) == ["config.json", "model.safetensors"]


def test_save_bfloat16(hf_dirs, tmp_path):
    model = M.load_checkpoint(hf_dirs["mha"][1])
    M.save_hf_checkpoint(model, str(tmp_path), dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = M.load_checkpoint(str(tmp_path))
    assert reloaded.tok_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(reloaded.layers[1].attention.wq.weight, model.layers[1].attention.wq.weight.bfloat16())
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


def test_missing_and_unexpected_keys_are_named(hf_dirs, tmp_path):
    sd = M.read_safetensors(os.path.join(hf_dirs["mha"][1], "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(hf_dirs["mha"][1], "config.json")).read())
    broken = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.down_proj.weight"}
    broken["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    M.write_safetensors(str(tmp_path / "model.safetensors"), broken, {"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.feed_forward.w2.weight'\].*"
                                         r"unexpected keys \['model.layers.1.mlp.extra.weight'\]") as err:
        M.load_checkpoint(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        M.load_checkpoint(str(tmp_path / "nothing"))
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    (meta_dir / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    (meta_dir / "consolidated.00.pth").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: torch.load\(weights_only=True, mmap=True\) failed"):
        M.load_checkpoint(str(meta_dir))


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return M.Transformer(M.ModelArgs(**{**M.CONFIGS["tiny"], "vocab_size": VOCAB, **overrides})).eval()


def test_block_mask_packs_prompt_and_responses():
    model = tiny_model()
    prompt, first, second = [1, 5, 9, 14, 3], [40, 41, 42], [50, 51, 52, 53]
    n_p, n_1, n_2 = len(prompt), len(first), len(second)
    T = n_p + n_1 + n_2
    # each response restarts its positions after the prompt and sees the prompt and itself, never the other one
    positions = torch.tensor([list(range(n_p + n_1)) + list(range(n_p, n_p + n_2))])
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    segment = torch.tensor([0] * n_p + [1] * n_1 + [2] * n_2)
    mask = causal & ((segment[:, None] == segment[None, :]) | (segment[None, :] == 0))
    with torch.no_grad():
        packed = model(torch.tensor([prompt + first + second]), positions, mask[None])[0]
        alone_1 = model(torch.tensor([prompt + first]))[0]
        alone_2 = model(torch.tensor([prompt + second]))[0]
    assert max_diff(packed[: n_p + n_1], alone_1) < 1e-5
    assert max_diff(packed[n_p + n_1:], alone_2[n_p:]) < 1e-5
    # and the mask is really used: the causal default would let the second response see the first
    with torch.no_grad():
        unmasked = model(torch.tensor([prompt + first + second]), positions)[0]
    assert max_diff(unmasked[n_p + n_1:], alone_2[n_p:]) > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    tokens = tokens_for_test(shape=(2, 9))
    grads = []
    for flag in (False, True):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = flag
        model(tokens).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


@pytest.fixture(scope="module")
def gen_model(hf_dirs):
    hf, single, _ = hf_dirs["gqa"]
    return hf, M.load_checkpoint(single)


PROMPTS = [[1, 17, 33, 5], [1, 90, 4, 4, 61, 7, 12, 8], [1, 102], [1, 45, 46, 47, 48, 49]]


def greedy_without_cache(model, prompt, n):
    seq, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.argmax()))
            logprobs.append(logits.log_softmax(-1)[seq[-1]].item())
    return seq[len(prompt):], logprobs


def test_greedy_matches_transformers_and_no_cache_loop(gen_model):
    hf, model = gen_model
    batch_tokens, batch_logprobs = M.generate(model, PROMPTS, 12, eos_id=-1)
    for prompt, tokens, logprobs in zip(PROMPTS, batch_tokens, batch_logprobs):
        reference, reference_logprobs = greedy_without_cache(model, prompt, 12)
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert tokens == reference == out[0, len(prompt):].tolist()
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(reference_logprobs), atol=1e-5)
        alone_tokens, alone_logprobs = M.generate(model, [prompt], 12, eos_id=-1)
        assert alone_tokens[0] == tokens  # a ragged batch gives each row what it gets alone
        assert torch.allclose(torch.tensor(alone_logprobs[0]), torch.tensor(logprobs), atol=1e-5)
    assert len({tuple(t) for t in batch_tokens}) > 1  # rows differ: padding did not leak a shared answer


def test_sampled_logprobs_equal_a_fresh_forward_pass_and_respect_top_p(gen_model):
    _, model = gen_model
    temperature, top_p = 0.9, 0.8
    tokens, logprobs = M.generate(model, PROMPTS, 10, temperature=temperature, top_p=top_p, eos_id=-1,
                                  generator=torch.Generator().manual_seed(3))
    for prompt, new, new_logprobs in zip(PROMPTS, tokens, logprobs):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + new]))[0, len(prompt) - 1:-1]  # (n, vocab) logits before each
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(new)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(new_logprobs), expected, atol=1e-5)
        # every sampled token lies in the top-p nucleus of the temperature-scaled distribution
        probs = (logits / temperature).softmax(-1)
        for step, token in enumerate(new):
            sorted_probs = probs[step].sort(descending=True).values
            nucleus = int((sorted_probs.cumsum(0) - sorted_probs < top_p).sum())
            assert probs[step, token] >= sorted_probs[nucleus - 1] - 1e-7
    again, _ = M.generate(model, PROMPTS, 10, temperature=temperature, top_p=top_p, eos_id=-1,
                          generator=torch.Generator().manual_seed(3))
    other, _ = M.generate(model, PROMPTS, 10, temperature=temperature, top_p=top_p, eos_id=-1,
                          generator=torch.Generator().manual_seed(4))
    assert again == tokens and other != tokens


def test_eos_stops_each_row(gen_model):
    _, model = gen_model
    free, free_logprobs = M.generate(model, PROMPTS, 12, eos_id=-1)
    eos = free[0][3]  # a token row 0 produces at step 3 (or earlier): make it the end of sequence
    stopped, stopped_logprobs = M.generate(model, PROMPTS, 12, eos_id=eos)
    for row, row_logprobs, full, full_logprobs in zip(stopped, stopped_logprobs, free, free_logprobs):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert row == expected and len(row_logprobs) == len(row)
        assert torch.allclose(torch.tensor(row_logprobs), torch.tensor(full_logprobs[: len(row)]), atol=1e-5)
    assert len(stopped[0]) <= 4 and any(len(row) == 12 for row in stopped)
    # once every row has stopped, generation stops calling the model
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert M.generate(model, PROMPTS[:1], 12, eos_id=eos)[0] == stopped[:1]
    finally:
        hook.remove()
    assert len(calls) == len(stopped[0])  # one prefill, then one decode step per token before EOS


def test_token_logprobs_match_transformers_by_hand(gen_model):
    hf, model = gen_model
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 2], [1, 9, 10, 11, 12, 13, 14]])
    targets = torch.cat([tokens[:, 1:], torch.tensor([[-100], [-100]])], 1)  # position t predicts token t + 1
    with torch.no_grad():
        got = M.token_logprobs(model(tokens), targets)
    expected = hf_logits(hf, tokens).log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    assert torch.allclose(got[:, :-1], expected, atol=1e-4) and (got[:, -1] == 0).all()
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[1, -100, 6], [-100, 0, 2]])
    got = M.token_logprobs(logits, targets)
    assert got[0, 1] == 0 and torch.isclose(got[1, 2], logits[1, 2].log_softmax(-1)[2])


# ---- safetensors reader and writer -------------------------------------------------------------------------------
def test_safetensors_reader_and_writer_agree_with_the_safetensors_package(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 3).half(),
               "i64": torch.arange(7), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4)}
    safetensors.torch.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    ours = M.read_safetensors(str(tmp_path / "theirs.safetensors"))
    assert set(ours) == set(tensors)
    for key, t in tensors.items():
        assert ours[key].dtype == t.dtype and ours[key].shape == t.shape and torch.equal(ours[key], t)
    M.write_safetensors(str(tmp_path / "ours.safetensors"), tensors, {"format": "pt", "note": "x"})
    theirs = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(theirs[k], t) and theirs[k].dtype == t.dtype for k, t in tensors.items())
    with safetensors.safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}


def write_raw(path, header, data=b"", header_len=None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write((len(blob) if header_len is None else header_len).to_bytes(8, "little") + blob + data)
    return str(path)


@pytest.mark.parametrize("header, data, header_len, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None,
     r"tensor 'a': data_offsets \[0, 8\] lie outside the 4 data bytes"),
    ({"a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, r"tensor 'a': unknown dtype 'F7'"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, r"tensors 'a' and 'b' overlap"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     r"8 bytes cannot hold shape \[3\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**12,
     r"header length 1000000000000 does not fit"),
    (b"{not json", b"", None, r"header is not valid JSON"),
], ids=["offsets-past-end", "unknown-dtype", "overlap", "size-mismatch", "header-too-long", "bad-json"])
def test_corrupted_safetensors_are_refused(tmp_path, header, data, header_len, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(ValueError, match=message) as err:
        M.read_safetensors(path)
    assert path in str(err.value)


def test_configs_from_files(tmp_path, hf_dirs):
    args = M.ModelArgs.from_hf_config(os.path.join(hf_dirs["head_dim_16"][1], "config.json"))
    assert (args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim) == (48, 4, 2, 16, 128)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 4096, "multiple_of": 256, "n_heads": 32,
                                                      "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1}))
    llama_7b = M.ModelArgs.from_meta_params(str(tmp_path / "params.json"), vocab_size=32000)
    assert llama_7b == M.ModelArgs.from_name("llama-7b")
    with pytest.raises(ValueError, match="vocab_size is -1"):
        M.ModelArgs.from_meta_params(str(tmp_path / "params.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_scaling": {"type": "linear"}}))
    with pytest.raises(ValueError, match="config.json: not supported by model.py: rope_scaling"):
        M.ModelArgs.from_hf_config(str(tmp_path / "config.json"))
