"""model.py against transformers' LlamaForCausalLM (the reference people know) and against itself.

Runs under transformers 5 (today's release, which writes RoPE settings as rope_parameters) and 4.57.6 (rope_theta and
rope_scaling at the top level); .ci/run runs it with both. Run with -s to see the parity figures (max abs logit
difference per config, config layout and checkpoint source)."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import checkpoint
import model as M
from conftest import RecordOps

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)  # Llama 3.1's config.json (and Meta's apply_scaling)

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
    "llama3.1_rope": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192,
                          multiple_of=32, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE),
}
VOCAB = 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_hf_model(name, seed=0):
    cfg = copy.deepcopy(HF_CONFIGS[name])  # transformers 5 writes rope_theta into a rope_scaling dict it is given
    cfg.pop("multiple_of")
    return randomize(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64,
                                                  bos_token_id=1, eos_token_id=2, attn_implementation="eager", **cfg)),
                     seed)


def randomize(hf, seed=0):
    """Weights large enough to give varied logits (HF's 0.02 init gives almost uniform ones, against which any bug
    would look like parity)."""
    torch.manual_seed(seed)
    hf.eval()
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


def rope_theta_of(config):
    return config.rope_parameters["rope_theta"] if TRANSFORMERS_5 else config.rope_theta


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
              "norm_eps": c.rms_norm_eps, "rope_theta": rope_theta_of(c), "vocab_size": -1}
    if HF_CONFIGS[name].get("rope_scaling") == LLAMA31_ROPE:
        params["use_scaled_rope"] = True  # Llama 3.1/3.2's params.json: the parameters are fixed in Meta's code
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
        model = checkpoint.load_checkpoint(path)
        diff = max_diff(our_logits(model, tokens), expected)
        print(f"\nparity {name:15s} HF {label:8s} max abs logit diff {diff:.2e}")
        assert diff <= 1e-4
    if name == "tied":
        assert model.output.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("name", ["mha", "gqa", "tied", "theta500_eps0.05", "llama3.1_rope"])  # no head_dim in Meta's
def test_logits_match_transformers_from_meta_checkpoint(name, tmp_path):
    hf = make_hf_model(name)
    write_meta_checkpoint(hf, name, tmp_path)
    tokens = tokens_for_test()
    diff = max_diff(our_logits(checkpoint.load_checkpoint(str(tmp_path)), tokens), hf_logits(hf, tokens))
    print(f"\nparity {name:15s} Meta .pth        max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_meta_model_parallel_shards_are_merged(tmp_path):
    hf = make_hf_model("gqa")
    write_meta_checkpoint(hf, "gqa", tmp_path, shards=2)
    tokens = tokens_for_test()
    diff = max_diff(our_logits(checkpoint.load_checkpoint(str(tmp_path)), tokens), hf_logits(hf, tokens))
    print(f"\nparity gqa             Meta 2 shards    max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_qk_permutation_matters_and_round_trips(hf_dirs):
    hf, single, _ = hf_dirs["gqa"]
    args = checkpoint.args_from_hf_config(os.path.join(single, "config.json"))
    sd = checkpoint.read_safetensors(os.path.join(single, "model.safetensors"))
    back = checkpoint.meta_to_hf(checkpoint.hf_to_meta(sd, args), args)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # Without the permutation the rotation pairs the wrong channels: logits must visibly change.
    model = checkpoint.load_checkpoint(single)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.copy_(
                checkpoint._permute_qk_rows(layer.attention.wq.weight, args.n_heads, to_hf=True))
            layer.attention.wk.weight.copy_(
                checkpoint._permute_qk_rows(layer.attention.wk.weight, args.n_kv_heads, to_hf=True))
    tokens = tokens_for_test()
    assert max_diff(our_logits(model, tokens), hf_logits(hf, tokens)) > 1e-2


@pytest.mark.parametrize("name", ["gqa", "tied", "head_dim_16", "llama3.1_rope"])
def test_save_hf_checkpoint_round_trip(name, hf_dirs, tmp_path):
    hf, single, _ = hf_dirs[name]
    model = checkpoint.load_checkpoint(single)
    tokens = tokens_for_test()
    for label, shard_bytes in (("single", 10**9), ("sharded", 30_000)):
        out = tmp_path / label
        checkpoint.save_hf_checkpoint(model, str(out), max_shard_bytes=shard_bytes)
        files = os.listdir(out)
        assert ("model.safetensors.index.json" in files) == (label == "sharded")
        assert not [f for f in files if ".tmp" in f]
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
        reloaded_hf = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        diff = max_diff(hf_logits(reloaded_hf, tokens), hf_logits(hf, tokens))
        print(f"\nround trip {name:11s} {label:8s} transformers.from_pretrained max abs logit diff {diff:.2e}")
        assert diff <= 1e-5
        again = checkpoint.load_checkpoint(str(out))
        assert again.args == model.args
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    # saving a single file over a sharded save removes the shards and the index that would shadow it
    checkpoint.save_hf_checkpoint(model, str(tmp_path / "sharded"))
    assert sorted(os.listdir(tmp_path / "sharded")) == ["checkpoint_identity.json", "config.json", "model.safetensors"]


def test_save_bfloat16(hf_dirs, tmp_path):
    model = checkpoint.load_checkpoint(hf_dirs["mha"][1])
    checkpoint.save_hf_checkpoint(model, str(tmp_path), dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = checkpoint.load_checkpoint(str(tmp_path))
    assert reloaded.tok_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(reloaded.layers[1].attention.wq.weight, model.layers[1].attention.wq.weight.bfloat16())
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


def test_missing_and_unexpected_keys_are_named(hf_dirs, tmp_path):
    sd = checkpoint.read_safetensors(os.path.join(hf_dirs["mha"][1], "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(hf_dirs["mha"][1], "config.json")).read())
    broken = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.down_proj.weight"}
    broken["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    checkpoint.write_safetensors(str(tmp_path / "model.safetensors"), broken, {"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.feed_forward.w2.weight'\].*"
                                         r"unexpected keys \['model.layers.1.mlp.extra.weight'\]") as err:
        checkpoint.load_checkpoint(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        checkpoint.load_checkpoint(str(tmp_path / "nothing"))
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    (meta_dir / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    (meta_dir / "consolidated.00.pth").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: torch.load\(weights_only=True, mmap=True\) failed"):
        checkpoint.load_checkpoint(str(meta_dir))


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


def target_logprobs(model, tokens, source, targets, chunk_tokens=None):
    """log p(target) at the source positions: chunk_tokens None -> from the whole logits (token_logprobs);
    else forward(targets=...) with LOGPROB_CHUNK_TOKENS set to chunk_tokens for this call."""
    if chunk_tokens is None:
        return M.token_logprobs(model(tokens, output_positions=source), targets)
    default, M.LOGPROB_CHUNK_TOKENS = M.LOGPROB_CHUNK_TOKENS, chunk_tokens
    try:
        return model(tokens, output_positions=source, targets=targets)
    finally:
        M.LOGPROB_CHUNK_TOKENS = default


def test_chunked_logprobs_give_the_whole_computations_values_and_gradients():
    """forward(targets=...) computes log p(target) a chunk of tokens at a time (LOGPROB_CHUNK_TOKENS, 5 here, which
    divides none of the shapes): in float64 its values and every weight's gradient are the whole computation's."""
    model = tiny_model().double().train()
    tokens = tokens_for_test(shape=(3, 11))
    source = torch.tensor([[2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6], [4, 5, 6, 7, 8, 9, 9]])  # (B, N)
    targets = tokens.gather(1, source + 1).masked_fill(source == 9, -100)  # the last row's end: ignored
    weights = torch.randn(source.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        logprobs = target_logprobs(model, tokens, source, targets, chunk_tokens=5 if chunked else None)
        (logprobs * weights).sum().backward()
        results.append((logprobs.detach(), [p.grad.clone() for p in model.parameters()]))
    (whole, whole_grads), (chunked, chunked_grads) = results
    assert chunked.dtype == whole.dtype == torch.float32 and torch.equal(chunked[2, -1], torch.tensor(0.0))
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-6)  # token_logprobs answers in float32
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(chunked_grads, whole_grads))
    assert any(g.abs().max() > 0 for g in chunked_grads)


def test_chunked_logprobs_never_keep_the_vocabulary_sized_logits_for_backward():
    """What autograd keeps for backward (saved_tensors_hooks): the whole computation keeps its (B, N, vocab)
    logits; the chunked one keeps no vocabulary-sized tensor (each chunk is recomputed in backward: the output
    layer runs once per chunk in forward and once more in backward)."""
    model = tiny_model().train()
    tokens = tokens_for_test(shape=(2, 13))
    source = torch.arange(12).expand(2, 12)
    targets = tokens[:, 1:]
    calls = []
    hook = model.output.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    kept = {}
    for chunked in (False, True):
        kept[chunked] = 0

        def keep(tensor, chunked=chunked):
            kept[chunked] += tensor.numel() if tensor.shape[-1:] == (VOCAB,) else 0
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            logprobs = target_logprobs(model, tokens, source, targets, chunk_tokens=7 if chunked else None)
        calls_before_backward = len(calls)
        logprobs.sum().backward()
    hook.remove()
    assert kept[False] >= 2 * 12 * VOCAB and kept[True] == 0
    # the chunked pass: 24 tokens in chunks of 7 (7, 7, 7, 3) in forward, and again (last first) in backward
    assert calls[1:calls_before_backward] == [7, 7, 7, 3] and calls[calls_before_backward:] == [3, 7, 7, 7]
    # one chunk holds all 24 tokens (the default 2048): kept whole, as without chunking, and not recomputed
    calls.clear()
    hook = model.output.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    model(tokens, output_positions=source, targets=targets).sum().backward()
    hook.remove()
    assert calls == [24]


def test_grouped_query_attention_matches_transformers_forward_and_gradients(hf_dirs):
    """8 query heads read 2 key/value heads in place (no repeated copies: SDPA's grouped-query support); logits,
    loss and every gradient equal transformers' eager attention, which repeats the key/value heads."""
    hf, single, _ = hf_dirs["gqa"]
    model = checkpoint.load_checkpoint(single)
    tokens = tokens_for_test(shape=(3, 17))
    recorded = RecordOps()

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())

    try:
        with recorded:
            ours = model(tokens)
            loss_of(ours).backward()
        theirs = hf(tokens).logits
        loss_of(theirs).backward()
        assert max_diff(ours, theirs) <= 1e-4
        gradients = checkpoint.meta_to_hf({name: p.grad for name, p in model.named_parameters()}, model.args)
        for name, p in hf.named_parameters():
            torch.testing.assert_close(gradients[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    finally:
        hf.zero_grad(set_to_none=True)
    ops = recorded.ops
    assert "repeat_interleave" not in ops and not ops & {"_scaled_dot_product_attention_math"}
    if not torch.cuda.is_available():  # on a CPU both directions run the fused (flash) kernel
        assert {"_scaled_dot_product_flash_attention_for_cpu",
                "_scaled_dot_product_flash_attention_for_cpu_backward"} <= ops


def test_masked_grouped_query_attention_gradients_equal_separate_rows():
    # The packed layout's mask path with 4 query / 2 key-value heads: the shared prompt's gradient sums both
    # responses' contributions, exactly as two separate rows do.
    model = tiny_model()
    prompt, first, second = [1, 5, 9, 14, 3], [40, 41, 42], [50, 51, 52, 53]
    n_p, n_1 = len(prompt), len(first)
    T = n_p + n_1 + len(second)
    positions = torch.tensor([list(range(n_p + n_1)) + list(range(n_p, n_p + len(second)))])
    segment = torch.tensor([0] * n_p + [1] * n_1 + [2] * len(second))
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool)) & ((segment[:, None] == segment[None, :]) |
                                                              (segment[None, :] == 0))
    weights = torch.randn(T, VOCAB, generator=torch.Generator().manual_seed(0))  # a loss that reads every logit

    def gradients(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    packed_loss, packed = gradients(lambda: (model(torch.tensor([prompt + first + second]), positions,
                                                   mask[None])[0, n_p:] * weights[n_p:]).sum())
    rows_loss, rows = gradients(lambda: (model(torch.tensor([prompt + first]))[0, n_p:] * weights[n_p:n_p + n_1]).sum()
                                + (model(torch.tensor([prompt + second]))[0, n_p:] * weights[n_p + n_1:]).sum())
    assert packed_loss == pytest.approx(rows_loss, abs=1e-3)
    for a, b in zip(packed, rows):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def packed_ranking_mask(rows, T):
    """tuna.collate's mask for rows given as segment lengths [prompt, candidate 1, ...], padded to T: causal,
    a token sees the shared prompt and its own segment. -> bool (B, 1, T, T)"""
    segments = torch.full((len(rows), T), -1)
    for b, lengths in enumerate(rows):
        segments[b, :sum(lengths)] = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])
    visible = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
    return (torch.ones(T, T, dtype=torch.bool).tril() & visible)[:, None]


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_masked_grouped_attention_paths_equal_per_head_attention(n_kv_heads):
    """Both paths of grouped-query attention with a mask, run on the CPU: grouped heads (the CPU's default)
    and keys/values repeated per query head (CUDA's default): the same output and gradients as attention
    computed head by head, query head h reading key/value head h // (n_heads / n_kv_heads), on packed
    ranking rows."""
    B, n_heads, T, head_dim = 2, 8, 16, 16
    mask = packed_ranking_mask([[4, 3, 2, 4], [5, 2, 3]], T)  # row 1: two candidates, then padding
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, n_heads, T, head_dim, generator=g)
    k, v = (torch.randn(B, n_kv_heads, T, head_dim, generator=g) for _ in range(2))

    def by_hand(group_of):
        heads = []
        for h in range(n_heads):
            scores = q[:, h] @ k[:, group_of(h)].transpose(-1, -2) / head_dim ** 0.5  # (B, T, T)
            weights = scores.masked_fill(~mask[:, 0], float("-inf")).softmax(-1)
            heads.append(weights @ v[:, group_of(h)])  # (B, T, head_dim)
        return torch.stack(heads, 1)  # (B, n_heads, T, head_dim)

    group = n_heads // n_kv_heads
    expected = by_hand(lambda h: h // group)
    outputs, grads = {}, {}
    for repeat_kv in (None, False, True):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        with RecordOps() as recorded:
            outputs[repeat_kv] = M.grouped_attention(*inputs, mask, repeat_kv=repeat_kv)
        attention_calls = [shapes for name, calls in recorded.shapes.items() if "scaled_dot_product" in name
                           for shapes in calls]
        key_heads = n_heads if repeat_kv else n_kv_heads  # the path asked for ran: keys repeated, or not
        assert [shapes[1] for shapes in attention_calls] == [(B, key_heads, T, head_dim)]
        (outputs[repeat_kv] * expected).sum().backward()
        grads[repeat_kv] = [t.grad for t in inputs]
        torch.testing.assert_close(outputs[repeat_kv], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(outputs[None], outputs[False])  # the CPU's default is the grouped path
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if n_kv_heads not in (1, n_heads):  # another grouping (head h reads h % n_kv_heads) is told apart
        assert max_diff(by_hand(lambda h: h % n_kv_heads), expected) > 0.1


@pytest.fixture(scope="module")
def gen_model(hf_dirs):
    hf, single, _ = hf_dirs["gqa"]
    return hf, checkpoint.load_checkpoint(single)


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


@pytest.mark.parametrize("probs, top_p, nucleus", [
    ([0.9, 0.1], 0.8, [1.0, 0.0]),                     # the first token alone reaches 0.8
    ([0.4, 0.3, 0.2, 0.1], 0.6, [4 / 7, 3 / 7, 0, 0]),  # 0.4 < 0.6: the second is needed; 0.7 reaches it
    ([0.4, 0.3, 0.2, 0.1], 0.75, [4 / 9, 3 / 9, 2 / 9, 0]),
    ([0.1, 0.6, 0.3], 0.5, [0, 1.0, 0]),               # sorted by probability, not by id
    ([0.25, 0.25, 0.5], 0.95, [0.25, 0.25, 0.5]),      # 0.5 + 0.25 = 0.75 < 0.95: all three
    ([0.9, 0.1], 1.0, [0.9, 0.1]),                     # top_p 1: no cut
])
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_top_p(probs, top_p, nucleus):
    """Nucleus sampling (Holtzman et al. 2020) on hand-made distributions: the most likely tokens up to and
    including the one whose cumulative mass reaches top_p, renormalised. Frequencies of 20000 draws, through a
    shared generator and through one generator per row."""
    draws = 20000
    logits = torch.tensor(probs).log().expand(draws, -1)  # softmax(log p) = p
    shared = M.sample_next(logits, 1.0, top_p, torch.Generator().manual_seed(0))
    per_row = M.sample_next(logits[:500], 1.0, top_p, [torch.Generator().manual_seed(i) for i in range(500)])
    frequencies = torch.bincount(shared, minlength=len(probs)) / draws
    assert frequencies.tolist() == pytest.approx(nucleus, abs=0.015)  # 3 standard deviations at p 0.5: 0.011
    outside = [token for token, p in enumerate(nucleus) if p == 0]
    assert not any(token in outside for token in per_row.tolist())
    assert set(per_row.tolist()) == {token for token, p in enumerate(nucleus) if p > 0}


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


def test_any_of_several_stop_ids_ends_a_row_as_transformers_does(gen_model):
    """Llama 3.x Instruct lists several EOS ids (generation_config.json: <|end_of_text|>, <|eom_id|>, <|eot_id|>):
    a row ends at the first token that is any of them, and transformers' generate given the same list agrees."""
    hf, model = gen_model
    free, free_logprobs = M.generate(model, PROMPTS, 12, eos_id=-1)
    primary = next(t for t in range(VOCAB) if all(t not in row for row in free))  # an EOS no row produces
    stops = [primary, free[0][3], free[1][5]]  # and two more, produced by rows 0 and 1 (and maybe others)
    stopped, stopped_logprobs = M.generate(model, PROMPTS, 12, eos_id=stops)
    for row, row_logprobs, full, full_logprobs in zip(stopped, stopped_logprobs, free, free_logprobs):
        end = min([full.index(t) for t in stops if t in full], default=len(full) - 1)
        assert row == full[:end + 1] and row_logprobs == pytest.approx(full_logprobs[:end + 1], abs=1e-5)
    assert len(stopped[0]) <= 4 and len(stopped[1]) <= 6
    assert {row[-1] for row in stopped if len(row) < 12} - {primary}  # rows ended at the non-primary ids
    assert M.generate(model, PROMPTS, 12, eos_id=primary)[0] == free  # the first id alone stops no row
    assert M.generate(model, PROMPTS, 12, eos_id=set(stops))[0] == stopped
    for prompt, row in zip(PROMPTS, stopped):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=stops,
                              pad_token_id=0)
        assert out[0, len(prompt):].tolist() == row


def rows_per_call(model):
    """A forward hook's record of the batch size of every model call, and the hook to remove."""
    sizes = []
    return sizes, model.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))


def test_batched_greedy_gives_the_one_at_a_time_tokens(gen_model):
    _, model = gen_model
    free, _ = M.generate(model, PROMPTS, 12, eos_id=-1)
    eos = free[1][5]  # rows that produce it stop early, at different steps, and leave the batch
    alone = [M.generate(model, [prompt], 12, eos_id=eos) for prompt in PROMPTS]
    for settings in ({}, {"num_samples": 3}, {"num_samples": 2, "batch_size": 4}, {"batch_size": 1}):
        n = settings.get("num_samples", 1)
        sizes, hook = rows_per_call(model)
        try:
            tokens, logprobs = M.generate(model, PROMPTS, 12, eos_id=eos, **settings)
        finally:
            hook.remove()
        assert tokens == [alone[i][0][0] for i in range(len(PROMPTS)) for _ in range(n)]
        for row, row_logprobs in enumerate(logprobs):
            assert torch.allclose(torch.tensor(row_logprobs), torch.tensor(alone[row // n][1][0]), atol=1e-5)
        if not settings:
            assert sizes[0] == len(PROMPTS) and min(sizes) < len(PROMPTS)  # finished rows left the batch
        prompts_per_batch = settings.get("batch_size", len(PROMPTS) * n) // n
        assert sizes[0] == prompts_per_batch and max(sizes) == prompts_per_batch * n  # one prefill per prompt
    assert len({len(t[0]) for t, _ in alone}) > 1 and any(eos in t[0] for t, _ in alone)


def test_batched_sampling_with_a_generator_per_row_gives_each_row_its_samples_alone(gen_model):
    """Each row draws from its own generator (as one seeded from (seed, item id) per row): its samples do not
    depend on which rows share its batch, on batch_size, or on when the other rows finish."""
    _, model = gen_model
    n, settings = 3, dict(temperature=1.0, top_p=0.95)
    rows = range(len(PROMPTS) * n)

    def generators(which=rows):
        return [torch.Generator().manual_seed(1000 + row) for row in which]

    free, _ = M.generate(model, PROMPTS, 10, eos_id=-1, num_samples=n, generator=generators(), **settings)
    eos = free[0][2]  # rows that sample it stop there, at different steps
    batched, batched_logprobs = M.generate(model, PROMPTS, 10, eos_id=eos, num_samples=n, generator=generators(),
                                           **settings)
    chunked, _ = M.generate(model, PROMPTS, 10, eos_id=eos, num_samples=n, generator=generators(), batch_size=5,
                            **settings)
    assert chunked == batched
    for row in rows:
        alone, alone_logprobs = M.generate(model, [PROMPTS[row // n]], 10, eos_id=eos, generator=generators([row]),
                                           **settings)
        assert batched[row] == alone[0] == free[row][:len(alone[0])]
        assert torch.allclose(torch.tensor(batched_logprobs[row]), torch.tensor(alone_logprobs[0]), atol=1e-5)
    assert 1 < len({len(row) for row in batched})  # rows ended at different steps
    assert len({tuple(row) for row in batched[:n]}) == n  # a prompt's rows differ: each has its own draws
    with pytest.raises(ValueError, match="one per row, len\\(prompts\\) \\* num_samples = 12"):
        M.generate(model, PROMPTS, 10, num_samples=n, generator=generators(range(4)), **settings)


def test_compiled_decode_step_gives_eager_tokens(gen_model):
    if not any(shutil.which(compiler) for compiler in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: torch.compile's CPU backend cannot build kernels here")
    _, model = gen_model
    M._compiled.clear()  # compile here, whatever an earlier test left
    n, settings = 2, dict(temperature=0.9, top_p=0.9)
    rows = range(len(PROMPTS) * n)

    def generators():
        return [torch.Generator().manual_seed(7 + row) for row in rows]

    free, _ = M.generate(model, PROMPTS, 10, eos_id=-1, num_samples=n, generator=generators(), **settings)
    # an EOS that stops some rows but leaves two or more running (a batch of one would compile once more)
    eos = next(t for t in free[0] if 1 <= sum(t in row for row in free) <= len(free) - 2)
    for kwargs in (dict(eos_id=-1), dict(eos_id=eos, num_samples=n, **settings)):
        runs = []
        for compile in (False, True):
            extra = {"generator": generators()} if "num_samples" in kwargs else {}
            runs.append(M.generate(model, PROMPTS, 10, compile=compile, **kwargs, **extra))
        assert "error" not in M._compiled and "cpu" in M._compiled
        (eager, eager_logprobs), (compiled, compiled_logprobs) = runs
        assert compiled == eager
        for a, b in zip(eager_logprobs, compiled_logprobs):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    assert len({len(row) for row in compiled}) > 1  # rows left the compiled batch at different steps


def test_decode_bucket_is_the_power_of_two_above_the_slot():
    # slot s reads slots 0..s: s + 1 of them, rounded up to a power of two, never past the cache's end
    assert [M.decode_bucket(s, 100) for s in (0, 1, 2, 3, 7, 8, 63, 64, 99)] == [1, 2, 4, 4, 8, 16, 64, 100, 100]
    assert M.decode_bucket(8, 12) == 12 and M.decode_bucket(5, 12) == 8


def test_static_cache_is_written_in_place_and_bucketed_steps_give_the_eager_logits(gen_model):
    """One cache allocation per generate() batch (rows that finish are compacted into its front, a prompt's
    samples copied into their rows, in place); the compiled path's bucketed step, run eagerly here, reads a
    power-of-two bucket of slots and gives the logits of the step that reads exactly the filled slots."""
    _, model = gen_model
    addresses, steps = set(), []

    def record(module, args, out):
        addresses.add(module.kv_cache.k.data_ptr())
    eager_step = M._eager_decode

    def both_steps(model, tokens, positions, pad_mask, slot):
        bucket = M.decode_bucket(slot, pad_mask.shape[1])
        state = [(layer.attention.kv_cache.k.clone(), layer.attention.kv_cache.v.clone()) for layer in model.layers]
        bucketed = M.bucketed_decode_step(model, tokens, positions, pad_mask[:, :bucket], torch.full((1,), slot))
        for layer, (k, v) in zip(model.layers, state):  # undo its cache write: the eager step writes it again
            layer.attention.kv_cache.k.copy_(k)
            layer.attention.kv_cache.v.copy_(v)
        eager = eager_step(model, tokens, positions, pad_mask, slot)
        steps.append((bucket, slot + 1, (bucketed - eager).abs().max().item()))
        return eager
    free, _ = M.generate(model, PROMPTS, 12, eos_id=-1)
    eos = free[1][5]
    hooks = [layer.attention.register_forward_hook(record) for layer in model.layers[:1]]
    try:
        M._eager_decode = both_steps
        tokens, _ = M.generate(model, PROMPTS, 12, eos_id=eos, num_samples=2)
    finally:
        M._eager_decode = eager_step
        for hook in hooks:
            hook.remove()
    assert len(addresses) == 1  # prefill, the samples' copies, compaction and decode steps: one storage
    assert min(len(row) for row in tokens) < 12  # rows finished and left the batch
    assert any(bucket > filled for bucket, filled, _ in steps)  # masked slots were read, and did not count
    assert max(gap for _, _, gap in steps) < 1e-5


def test_rows_that_fit_by_hand_and_the_cache_generate_allocates(gen_model):
    seven_b = M.ModelArgs.from_name("llama-7b")  # 32 layers, 32 kv heads of 128, dim 4096, hidden 11008
    # KV cache, bf16, 356 slots: 32 layers x 2 x 32 heads x 128 x 356 x 2 bytes
    assert M.kv_cache_bytes_per_row(seven_b, 356, 2) == 186_646_528
    # + vocabulary: 32000 x (6 x 4 + 8) = 1_024_000; + prefill of 100 prompt tokens: 100 x ((4 x 4096 + 2 x 4096
    # + 3 x 11008) x 2 + 32 heads x 100 keys x 4) = 100 x 128_000 = 12_800_000
    assert M.generation_bytes_per_row(seven_b, 356, 100, 2) == 186_646_528 + 1_024_000 + 12_800_000
    # 141e9 free x 0.9 - 13.5e9 of weights = 113.4e9 -> 565.67 rows of 200_470_528 bytes
    assert M.rows_that_fit(seven_b, 141e9, 356, 100, 2, weight_bytes=13.5e9) == 565
    assert M.rows_that_fit(seven_b, 1e9, 356, 100, 2) == 4 and M.rows_that_fit(seven_b, 1e6, 356, 100, 2) == 1
    _, model = gen_model
    assert M.auto_batch_rows(model, 64, 8, fallback=37) == 37  # not CUDA: the caller's fixed default
    sizes = []
    hook = model.layers[0].attention.register_forward_hook(
        lambda module, args, out: sizes.append(module.kv_cache.k.numel() * module.kv_cache.k.element_size()))
    try:
        M.generate(model, PROMPTS, 5, eos_id=-1, num_samples=3)
    finally:
        hook.remove()
    rows, slots = len(PROMPTS) * 3, max(map(len, PROMPTS)) + 5
    # what one layer's keys take is what the arithmetic gives a row, per layer and per keys-or-values
    assert set(sizes) == {rows * M.kv_cache_bytes_per_row(model.args, slots, 4) // (2 * model.args.n_layers)}


def test_compile_falls_back_to_eager_with_one_line_where_it_cannot_compile(tmp_path):
    script = (
        "import json, torch\n"
        "import model as M\n"
        "torch.manual_seed(0)\n"
        "net = M.Transformer(M.ModelArgs(**{**M.CONFIGS['tiny'], 'vocab_size': 128})).eval()\n"
        "prompts = [[1, 17, 33, 5], [1, 102]]\n"
        "eager = M.generate(net, prompts, 6, eos_id=-1)\n"
        "print(json.dumps([M.generate(net, prompts, 6, eos_id=-1, compile=True) == eager for _ in range(2)]))\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == [True, True]  # eager's tokens, both calls
    notices = [line for line in out.stderr.splitlines() if line.startswith("model.py: torch.compile cannot run")]
    assert len(notices) == 1 and "no-such-compiler" in notices[0] and notices[0].endswith("decoding eagerly")


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
    ours = checkpoint.read_safetensors(str(tmp_path / "theirs.safetensors"))
    assert set(ours) == set(tensors)
    for key, t in tensors.items():
        assert ours[key].dtype == t.dtype and ours[key].shape == t.shape and torch.equal(ours[key], t)
    checkpoint.write_safetensors(str(tmp_path / "ours.safetensors"), tensors, {"format": "pt", "note": "x"})
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
        checkpoint.read_safetensors(path)
    assert path in str(err.value)


# ---- config.json in both layouts: a table of configs, each supported one matches transformers, each other is refused
# (config class, its arguments, None or the refusal). Each is written by the running transformers release, then
# rewritten in the other release's RoPE layout, so both layouts meet both the loader and (where it reads them)
# transformers. Positions reach 40: past llama3_short's original context (32), so all three of its bands matter.
CONFIG_TABLE = {
    "default": ("llama", dict(), None),
    "theta500": ("llama", dict(rope_theta=500.0), None),
    "linear": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0}), None),
    "llama3.1": ("llama", dict(rope_theta=500000.0, rope_scaling=LLAMA31_ROPE), None),
    "llama3_short": ("llama", dict(rope_scaling=dict(LLAMA31_ROPE, factor=4.0, original_max_position_embeddings=32)),
                     None),
    "mistral": ("mistral", dict(sliding_window=None), None),
    "mistral_window_past_context": ("mistral", dict(sliding_window=4096), None),  # never reached: same computation
    "mistral_window": ("mistral", dict(sliding_window=16), r"sliding_window=16 is active"),
    "yarn": ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}),
             r"rope_type='yarn' is not supported"),
    "dynamic": ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), r"rope_type='dynamic' is not"),
    "attention_bias": ("llama", dict(attention_bias=True), r"attention_bias=True is not supported"),
    "mlp_bias": ("llama", dict(mlp_bias=True), r"mlp_bias=True is not supported"),
    "gelu": ("llama", dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    "attention_dropout": ("llama", dict(attention_dropout=0.1), r"attention_dropout=0.1 is not supported"),
}
CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
LAYOUTS = ("transformers4", "transformers5")  # rope_theta + rope_scaling at the top level / one rope_parameters


def in_layout(cfg, layout):
    """The same config.json with its RoPE settings in the given release's layout."""
    cfg = dict(cfg)
    settings = {**(cfg.pop("rope_scaling", None) or {}), **(cfg.pop("rope_parameters", None) or {})}
    theta = settings.pop("rope_theta", cfg.pop("rope_theta", 10000.0))
    settings["rope_type"] = settings.get("rope_type", settings.get("type", "default"))
    if layout == "transformers4":
        cfg.update(rope_theta=theta, rope_scaling=None if settings["rope_type"] == "default" else settings)
    else:
        cfg["rope_parameters"] = {"rope_theta": theta, **settings}
    return cfg


@pytest.fixture(scope="module")
def table_dirs(tmp_path_factory):
    """Per config: (the HF model or None, {layout: checkpoint folder}); the native layout is the file as written."""
    out = {}
    for name, (kind, arguments, refusal) in CONFIG_TABLE.items():
        config_class, model_class = CLASSES[kind]
        config = config_class(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=192, num_hidden_layers=2, max_position_embeddings=64,
                              bos_token_id=1, eos_token_id=2, **copy.deepcopy(arguments))
        native = tmp_path_factory.mktemp(name)
        hf = None
        if refusal is None:
            hf = randomize(model_class._from_config(config, attn_implementation="eager"))
            hf.save_pretrained(native)
        else:
            config.save_pretrained(native)
        written = json.loads((native / "config.json").read_text())
        assert ("rope_parameters" in written) == TRANSFORMERS_5  # the release writes its own layout
        folders = {}
        for layout in LAYOUTS:
            folders[layout] = native / layout
            folders[layout].mkdir()
            for file in os.listdir(native):
                if file.endswith(".safetensors"):
                    os.link(native / file, folders[layout] / file)
            (folders[layout] / "config.json").write_text(json.dumps(in_layout(written, layout), indent=2))
        out[name] = hf, folders
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(CONFIG_TABLE))
def test_config_table_supported_match_transformers_unsupported_are_refused(name, layout, table_dirs):
    hf, folders = table_dirs[name]
    path = str(folders[layout])
    refusal = CONFIG_TABLE[name][2]
    if refusal is not None:
        with pytest.raises(ValueError, match=refusal) as err:
            checkpoint.load_checkpoint(path)
        assert os.path.join(path, "config.json") in str(err.value)
        return
    tokens = tokens_for_test(shape=(2, 40))
    expected = hf_logits(hf, tokens)
    model = checkpoint.load_checkpoint(path)
    diff = max_diff(our_logits(model, tokens), expected)
    print(f"\nparity {name:28s} {layout} layout  max abs logit diff {diff:.2e}")
    assert diff <= 1e-4
    if TRANSFORMERS_5 or layout == "transformers4":  # transformers 4 does not read rope_parameters
        reread = type(hf).from_pretrained(path, attn_implementation="eager").eval()
        assert max_diff(hf_logits(reread, tokens), expected) == 0  # the rewritten layout says the same to transformers
    if model.args.rope_scaling:  # the scaling is really used: without it the logits move
        model.args.rope_scaling = None
        model.reset_rope()
        assert max_diff(our_logits(model, tokens), expected) > 1e-3


def test_configs_from_files(tmp_path, hf_dirs):
    args = checkpoint.args_from_hf_config(os.path.join(hf_dirs["head_dim_16"][1], "config.json"))
    assert (args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim) == (48, 4, 2, 16, 128)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 4096, "multiple_of": 256, "n_heads": 32,
                                                      "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1}))
    llama_7b = checkpoint.args_from_meta_params(str(tmp_path / "params.json"), vocab_size=32000)
    assert llama_7b == M.ModelArgs.from_name("llama-7b")
    with pytest.raises(ValueError, match="vocab_size is -1"):
        checkpoint.args_from_meta_params(str(tmp_path / "params.json"))
    # Llama 3.2 1B's params.json as Meta ships it; a quantized release's extra keys are refused by name
    llama32 = {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32, "n_kv_heads": 8,
               "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256}
    (tmp_path / "params.json").write_text(json.dumps(llama32))
    args = checkpoint.args_from_meta_params(str(tmp_path / "params.json"))
    assert args.rope_scaling == LLAMA31_ROPE and args.hidden_dim == 8192 and args.rope_theta == 500000.0
    (tmp_path / "params.json").write_text(json.dumps(dict(llama32, quantization_args={"group_size": 256})))
    with pytest.raises(ValueError, match=r"params.json: not supported by model.py: quantization_args="):
        checkpoint.args_from_meta_params(str(tmp_path / "params.json"))
    # RoPE objects that say too little, too much, or two different things
    base = json.loads(open(os.path.join(hf_dirs["head_dim_16"][1], "config.json")).read())
    for rope, message in (
            (dict(rope_scaling={"type": "linear"}), r"rope_scaling with rope_type='linear': missing or invalid: "
                                                    r"factor=None"),
            (dict(rope_scaling=dict(LLAMA31_ROPE, attention_factor=2.0)), r"not supported by model.py: attention_f"),
            (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}), r"missing or invalid: factor=None, "),
            (dict(rope_theta=1e4, rope_parameters={"rope_type": "default", "rope_theta": 5e5}), r"layouts disagree"),
            (dict(rope_parameters="default"), r"rope_parameters='default' is not an object"),
            (dict(rope_scaling=dict(LLAMA31_ROPE, low_freq_factor=4.0)), r"low_freq_factor >= high_freq_factor"),
            (dict(model_type="qwen2"), r"model_type='qwen2' is not supported"),
            (dict(quantization_config={"quant_method": "gptq"}), r"quantization_config=\{'quant_method': 'gptq'\}")):
        without_rope = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling", "rope_parameters")}
        (tmp_path / "config.json").write_text(json.dumps({**without_rope, **rope}))
        with pytest.raises(ValueError, match=f"config.json: .*{message}"):
            checkpoint.args_from_hf_config(str(tmp_path / "config.json"))
    # both layouts saying the same thing are read once
    (tmp_path / "config.json").write_text(json.dumps({**base, **in_layout(in_layout(base, "transformers4"),
                                                                          "transformers5"), "rope_theta": 10000.0}))
    assert checkpoint.args_from_hf_config(str(tmp_path / "config.json")).rope_theta == 10000.0


def test_checkpoint_identity_follows_the_weights(hf_dirs, tmp_path):
    """save_hf_checkpoint records a sha256 of config and weights; a copy keeps it, new weights change it, weights
    changed by another tool (or a folder another tool wrote) fall back to a sampled digest that still tells
    them apart."""
    import shutil
    model = checkpoint.load_checkpoint(hf_dirs["mha"][1])
    checkpoint.save_hf_checkpoint(model, str(tmp_path / "a"))
    saved = checkpoint.checkpoint_identity(str(tmp_path / "a"))
    assert saved.startswith("sha256:") and len(saved) == 7 + 64
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert checkpoint.checkpoint_identity(str(tmp_path / "copy")) == saved
    with torch.no_grad():
        model.norm.weight.add_(1e-3)  # a small change in a small tensor
    checkpoint.save_hf_checkpoint(model, str(tmp_path / "a"))
    assert checkpoint.checkpoint_identity(str(tmp_path / "a")) not in (saved, None)
    foreign = checkpoint.checkpoint_identity(hf_dirs["mha"][1])  # written by transformers: no record
    assert foreign.startswith("sampled-sha256:") and checkpoint.checkpoint_identity(hf_dirs["mha"][1]) == foreign
    weights = tmp_path / "copy" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # another tool rewrote the weights in place: the record no longer describes the files
    weights.write_bytes(bytes(blob))
    changed = checkpoint.checkpoint_identity(str(tmp_path / "copy"))
    assert changed.startswith("sampled-sha256:") and changed != checkpoint.checkpoint_identity(str(tmp_path / "a"))


# ---- a checkpoint's config and headers are checked before anything is allocated; RoPE follows the positions used

# checkpoint.load_checkpoint in a subprocess whose address space is capped at 2 GiB: an allocation sized by a bad
# config (RoPE tables for 1e9 positions, 1e5 layers) fails there. Prints "ValueError: ..." or, when it loads, the
# logits of 12 tokens into argv[2].
LOAD_CAPPED = """
import resource, sys
limit = 2 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import torch
import checkpoint
try:
    net = checkpoint.load_checkpoint(sys.argv[1])
except ValueError as e:
    print(f"ValueError: {e}")
else:
    with torch.no_grad():
        torch.save(net(torch.arange(12)[None] % net.args.vocab_size), sys.argv[2])
    print("loaded")
"""


def load_capped(folder, tmp_path):
    result = subprocess.run([sys.executable, "-c", LOAD_CAPPED, str(folder), str(tmp_path / "logits.pt")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stdout.strip()


HF_FIELD_CASES = [  # (config.json field, a bad value, the refusal)
    ("max_position_embeddings", 1e9, "max_position_embeddings=1000000000.0: expected a positive integer"),
    ("num_hidden_layers", 1e5, "num_hidden_layers=100000.0: expected a positive integer"),
    ("num_hidden_layers", 100_000, "num_hidden_layers=100000, but the weights hold 2 layers"),
    ("num_attention_heads", 0, "num_attention_heads=0: expected a positive integer"),
    ("hidden_size", "64", "hidden_size='64': expected a positive integer"),
    ("rms_norm_eps", "x", "rms_norm_eps='x': expected a positive finite number"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps=nan: expected a positive finite number"),
    ("rope_theta", float("inf"), "rope_theta=inf"),
    ("vocab_size", -1, "vocab_size=-1: expected a positive integer"),
    ("intermediate_size", True, "intermediate_size=True: expected a positive integer"),
    ("num_key_value_heads", 3, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("head_dim", 15, "head_dim=15: expected an even number"),
    ("tie_word_embeddings", "no", "tie_word_embeddings='no': expected true or false"),
    ("eos_token_id", [2, "x"], "eos_token_id=[2, 'x']: expected a token id"),
    ("sliding_window", "x", "sliding_window='x': expected a positive integer"),
    ("hidden_size", 48, "model.safetensors: tensor 'model.embed_tokens.weight' has shape [128, 64]"),
    ("intermediate_size", 96, "model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape [192, 64]"),
]


@pytest.mark.parametrize("field, value, refusal", HF_FIELD_CASES,
                         ids=[f"{field}={value!r}" for field, value, _ in HF_FIELD_CASES])
def test_config_json_fields_are_checked_before_anything_is_allocated(field, value, refusal, hf_dirs, tmp_path):
    """Every config.json field model.py reads is checked for type and range (and heads for divisibility), and the
    tensor names and shapes it implies are compared with the safetensors headers before a tensor or a layer is
    allocated: each bad value is one ValueError naming the file and the field (or tensor)."""
    folder = tmp_path / "ck"
    shutil.copytree(hf_dirs["mha"][1], folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    assert_refused(folder, tmp_path, value, refusal)


def assert_refused(folder, tmp_path, value, refusal):
    """load_checkpoint(folder) is one ValueError naming a file of the folder and saying `refusal`; a huge value
    is tried in the address space of LOAD_CAPPED, where an allocation it sizes fails."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1e5:
        said = load_capped(folder, tmp_path)
    else:
        with pytest.raises(ValueError) as err:
            checkpoint.load_checkpoint(str(folder))
        said = f"ValueError: {err.value}"
    assert said.startswith(f"ValueError: {folder}/") and refusal in said, said


META_FIELD_CASES = [  # (params.json field, a bad value, the refusal)
    ("dim", "64", "dim='64': expected a positive integer"),
    ("n_layers", 0, "n_layers=0: expected a positive integer"),
    ("n_layers", 100_000, "n_layers=100000, but the weights hold 2 layers"),
    ("n_heads", 1e5, "n_heads=100000.0: expected a positive integer"),
    ("norm_eps", "x", "norm_eps='x': expected a positive finite number"),
    ("rope_theta", 0, "rope_theta=0: expected a positive finite number"),
    ("multiple_of", -32, "multiple_of=-32: expected a positive integer"),
    ("ffn_dim_multiplier", -1.0, "ffn_dim_multiplier=-1.0: expected a positive finite number"),
    ("use_scaled_rope", "yes", "use_scaled_rope='yes': expected true or false"),
    ("n_kv_heads", 3, "n_heads=4 is not a multiple of n_kv_heads=3"),
    ("dim", 48, "consolidated.00.pth: tensor 'tok_embeddings.weight' has shape [128, 64]"),
]


@pytest.mark.parametrize("field, value, refusal", META_FIELD_CASES,
                         ids=[f"{field}={value!r}" for field, value, _ in META_FIELD_CASES])
def test_params_json_fields_are_checked_before_anything_is_allocated(field, value, refusal, tmp_path):
    folder = tmp_path / "meta"
    write_meta_checkpoint(make_hf_model("mha"), "mha", str(folder))
    params = json.loads((folder / "params.json").read_text())
    params[field] = value
    (folder / "params.json").write_text(json.dumps(params))
    assert_refused(folder, tmp_path, value, refusal)


def test_rope_follows_the_positions_used_not_max_position_embeddings(hf_dirs, tmp_path):
    """max_position_embeddings 1e9 (a valid integer) once allocated 8 GB of RoPE tables: the model now keeps only
    the head_dim/2 frequencies and computes cos and sin for the positions each call uses, so such a checkpoint
    loads in 2 GiB of address space and gives the logits of the original config, and the angles are exactly
    those of a table indexed by position."""
    folder = tmp_path / "ck"
    shutil.copytree(hf_dirs["llama3.1_rope"][1], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 10**9}))
    assert load_capped(folder, tmp_path) == "loaded"
    original = checkpoint.load_checkpoint(hf_dirs["llama3.1_rope"][1])
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), original(torch.arange(12)[None] % VOCAB))
    assert sum(b.numel() for b in original.buffers()) == original.args.head_dim // 2
    positions = torch.randint(0, 4000, (3, 50))
    cos, sin = M.rope_cos_sin(original.rope_inv_freq, positions)
    table = torch.outer(torch.arange(4000).float(), M.rope_frequencies(original.args))  # (4000, head_dim/2)
    assert torch.equal(cos, table.cos()[positions]) and torch.equal(sin, table.sin()[positions])


def test_a_deeply_nested_header_or_config_is_a_named_error(hf_dirs, tmp_path):
    """100,000 nested lists in a safetensors header or config.json would be a RecursionError: a ValueError naming
    the file instead; real headers (3 levels deep) read as before."""
    deep = b"[" * 100_000 + b"]" * 100_000
    path = write_raw(tmp_path / "deep.safetensors", b'{"a": ' + deep + b"}")
    with pytest.raises(ValueError, match=f"{path}: header is JSON nested too deep"):
        checkpoint.read_safetensors(path)
    folder = tmp_path / "ck"
    shutil.copytree(hf_dirs["mha"][1], folder)
    (folder / "config.json").write_bytes(b'{"hidden_size": ' + deep + b"}")
    with pytest.raises(ValueError, match=f"{folder / 'config.json'}: JSON nested too deep"):
        checkpoint.load_checkpoint(str(folder))


# ---- a failed or killed save leaves no temporary file that the next save does not clear

# save_hf_checkpoint in a subprocess that SIGKILLs itself when it fsyncs model.safetensors' temporary file
SAVE_KILLED = """
import os, signal, sys
import checkpoint, model
fsync = os.fsync
def killing_fsync(fd):
    if ".safetensors.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
        os.kill(os.getpid(), signal.SIGKILL)
    fsync(fd)
os.fsync = killing_fsync
checkpoint.save_hf_checkpoint(model.Transformer(model.ModelArgs.from_name("tiny")), sys.argv[1])
"""


def test_a_failed_or_killed_weight_write_leaves_no_temporary_file_behind(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    # a tensor that cannot be copied out (meta) fails the write after the header and the first tensor
    with pytest.raises(NotImplementedError):
        checkpoint.write_safetensors(str(folder / "model.safetensors"),
                                     {"a": torch.ones(1000), "b": torch.empty(10, device="meta")})
    assert os.listdir(folder) == []
    result = subprocess.run([sys.executable, "-c", SAVE_KILLED, str(folder)], cwd=ROOT, capture_output=True)
    assert result.returncode == -9 and [n[:21] for n in os.listdir(folder)] == ["model.safetensors.tmp"]
    net = tiny_model()
    checkpoint.save_hf_checkpoint(net, str(folder))  # the next save of the folder clears the killed one's file
    assert sorted(os.listdir(folder)) == ["checkpoint_identity.json", "config.json", "model.safetensors"]
