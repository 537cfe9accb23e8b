"""tuna.py's objective and prefix sharing: hand-computed losses, the authors' formula, and packed == naive K rows;
training.py's LoRA, FLOPs and gradient-checkpointing rule, by hand."""
import argparse
import math

import pytest
import torch
import torch.nn as nn

import data
import model
import tokenizer
import training
import tuna
from conftest import sequence_logprobs


def scores_of(rows):
    return torch.tensor(rows, dtype=torch.float32)


def full_mask(scores):
    return torch.ones_like(scores, dtype=torch.bool)


# ---------------------------------------------------------------------------- ranking loss, hand-computed

def test_correct_order_with_enough_margin_costs_nothing():
    s = scores_of([[-0.1, -0.5, -0.9]])  # gaps 0.4 > m*1 and 0.8 > m*2
    assert tuna.rank_loss(s, full_mask(s), margin=0.1).item() == 0.0


def test_correct_order_inside_the_margin_costs_the_shortfall():
    s = scores_of([[-0.10, -0.15]])  # gap 0.05 < 0.1: loss 0.1 - 0.05
    assert tuna.rank_loss(s, full_mask(s), margin=0.1).item() == pytest.approx(0.05, abs=1e-6)


def test_fully_inverted_ranking():
    s = scores_of([[-0.9, -0.5, -0.1]])  # best candidate scored lowest
    # d=1: pairs (0,1): -0.5+0.9+0.1 = 0.5, (1,2): -0.1+0.5+0.1 = 0.5 -> mean 0.5
    # d=2: pair (0,2): -0.1+0.9+0.2 = 1.0                                 -> 1.0
    assert tuna.rank_loss(s, full_mask(s), margin=0.1).item() == pytest.approx(1.5, abs=1e-6)


def test_two_candidates():
    s = scores_of([[-1.0, -0.95], [-0.2, -0.7]])  # first inverted (0.05 + 0.1), second fine (0)
    assert tuna.rank_loss(s, full_mask(s), margin=0.1).item() == pytest.approx(0.15 / 2, abs=1e-6)


def test_ties_cost_the_margin_times_the_distance():
    s = scores_of([[-0.5, -0.5, -0.5, -0.5]])
    assert tuna.rank_loss(s, full_mask(s), margin=0.1).item() == pytest.approx(0.1 + 0.2 + 0.3, abs=1e-6)


def test_masked_candidates_are_left_out_of_sums_and_means():
    s = scores_of([[-0.9, -0.5, -0.1], [-0.2, -0.6, 123.0]])  # row 1 has 2 candidates; its 3rd is padding
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # d=1: valid pairs row0 (0.5, 0.5), row1 (0,1): max(0, -0.6+0.2+0.1) = 0 -> 1.0 / 3 pairs
    # d=2: only row 0: 1.0 / 1 pair
    expected = 1.0 / 3 + 1.0
    assert tuna.rank_loss(s, mask, margin=0.1).item() == pytest.approx(expected, abs=1e-6)
    s2 = s.clone()
    s2[1, 2] = -1e9  # whatever a masked candidate scores, nothing changes
    assert tuna.rank_loss(s2, mask, margin=0.1).item() == pytest.approx(expected, abs=1e-6)


def test_single_candidate_has_no_pairs():
    s = scores_of([[-3.0]])
    assert tuna.rank_loss(s, full_mask(s)).item() == 0.0


def test_equals_the_authors_margin_ranking_loss_formula():
    # The authors' code (LMOps tuna/src/custom.py, TunaTrainer.compute_loss): for i in 1..n-1, nn.MarginRankingLoss(m*i) over the flattened
    # pairs (scores[:, :-i], scores[:, i:]) with target 1, mean reduction; summed over i.
    torch.manual_seed(0)
    s = torch.randn(6, 5)
    expected = sum(nn.MarginRankingLoss(0.1 * i)(s[:, :-i].reshape(-1), s[:, i:].reshape(-1),
                                                 torch.ones(6 * (5 - i))) for i in range(1, 5))
    assert tuna.rank_loss(s, full_mask(s), margin=0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_pushes_the_worse_candidate_down_and_the_better_up():
    s = scores_of([[-0.9, -0.2]]).requires_grad_()  # inverted: the worse candidate (index 1) scores higher
    tuna.rank_loss(s, full_mask(s), margin=0.1).backward()
    assert s.grad[0, 1] > 0 and s.grad[0, 0] < 0  # gradient descent lowers s_1 and raises s_0
    s.data -= 0.1 * s.grad
    assert tuna.rank_loss(s, full_mask(s), margin=0.1).item() < 0.8  # it was 0.8


def test_split_batch_with_step_normalizers_equals_whole_batch():
    torch.manual_seed(1)
    s = torch.randn(4, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    whole = tuna.rank_loss(s, mask)
    counts = [int((mask[:, :-d] & mask[:, d:]).sum()) for d in range(1, 4)]
    halves = tuna.rank_loss(s[:2], mask[:2], pair_counts=counts) + tuna.rank_loss(s[2:], mask[2:], pair_counts=counts)
    assert halves.item() == pytest.approx(whole.item(), rel=1e-6)
    rows = [{"num_candidates": int(m.sum()), "candidate": [k for k in range(int(m.sum())) for _ in range(3)]}
            for m in mask]
    assert tuna.step_normalizers(rows) == (3 * int(mask.sum()), counts)
    assert tuna.step_normalizers(rows, mle_best_only=True)[0] == 3 * 4


# ---------------------------------------------------------------------------- scores and the MLE term

def test_candidate_scores_are_length_normalised_sums():
    lp = torch.tensor([[-1.0, -3.0, -2.0, 0.0]])  # candidate 0: two tokens, candidate 1: one, then padding
    cand = torch.tensor([[0, 0, 1, -1]])
    assert tuna.candidate_scores(lp, cand, 2).tolist() == [[-2.0, -2.0]]
    assert tuna.candidate_scores(lp, cand, 2, length_penalty=0.0).tolist() == [[-4.0, -2.0]]
    assert tuna.candidate_scores(lp, cand, 3)[0, 2].item() == 0.0  # a candidate with no token


def test_mle_is_token_level_over_all_candidates_or_best_only():
    lp = torch.tensor([[-1.0, -3.0, -2.0, 0.0], [-4.0, 0.0, 0.0, 0.0]])
    cand = torch.tensor([[0, 0, 1, -1], [1, -1, -1, -1]])
    assert tuna.mle_loss(lp, cand).item() == pytest.approx((1 + 3 + 2 + 4) / 4)  # mean over tokens, not rows
    assert tuna.mle_loss(lp, cand, best_only=True).item() == pytest.approx((1 + 3) / 2)


def test_total_is_weighted_mle_plus_rank():
    lp = torch.tensor([[-1.0, -1.0, -3.0]])
    cand = torch.tensor([[0, 0, 1]])
    mask = torch.tensor([[True, True]])
    total, mle, rank = tuna.tuna_loss(lp, cand, mask, margin=0.1, mle_weight=0.5)
    assert mle.item() == pytest.approx(5 / 3)
    assert rank.item() == pytest.approx(0.0)  # -1 vs -3: gap 2 > 0.1
    assert total.item() == pytest.approx(0.5 * 5 / 3)


def test_learning_rate_warms_up_then_decays_with_a_cosine():
    lrs = [tuna.learning_rate(step, 10, 1e-5, 2) for step in range(10)]
    assert lrs[0] == pytest.approx(0.5e-5) and lrs[1] == pytest.approx(1e-5) and lrs[2] == pytest.approx(1e-5)
    assert lrs[6] == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0


# ---------------------------------------------------------------------------- prefix sharing

def test_pack_layout_positions_and_mask():
    row = tuna.pack_example([[1, 5, 6], [1, 5, 6]], [[7, 8], [9, 2]])
    assert row["tokens"] == [1, 5, 6, 7, 8, 9, 2]
    assert row["positions"] == [0, 1, 2, 3, 4, 3, 4]  # both responses start right after the prompt
    assert row["segment"] == [0, 0, 0, 1, 1, 2, 2]
    # the last prompt token (index 2) predicts the first token of both responses
    assert list(zip(row["source"], row["target"], row["candidate"])) == [(2, 7, 0), (3, 8, 0), (2, 9, 1), (5, 2, 1)]
    mask = tuna.collate([row], pad_id=0)["mask"][0, 0]
    assert mask[6].tolist() == [True, True, True, False, False, True, True]  # prompt + itself, not response 0
    assert mask[4].tolist() == [True, True, True, True, True, False, False]
    assert mask[1].tolist() == [True, True, False, False, False, False, False]  # the prompt stays causal


def test_pack_with_prompts_that_differ_at_the_seam():
    row = tuna.pack_example([[1, 5, 6], [1, 5, 4, 3]], [[7], [9, 2]])
    assert row["tokens"] == [1, 5, 6, 7, 4, 3, 9, 2]  # shared [1, 5]; each rest of prompt opens its segment
    assert row["positions"] == [0, 1, 2, 3, 2, 3, 4, 5]
    assert list(zip(row["source"], row["target"])) == [(2, 7), (5, 9), (6, 2)]


def test_single_candidate_batches_use_plain_causal_attention():
    batch = tuna.collate([tuna.pack_example([[1, 5]], [[7, 2]])], pad_id=0)
    assert batch["mask"] is None and batch["positions"] is None


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return model.Transformer(model.ModelArgs.from_name("tiny")).train()


def naive_loss(net, prompts_per_row, responses_per_row, **options):
    """The K-row computation the packed row must reproduce: each (prompt, response) alone in its own row,
    scored with the naive sequence_logprobs of conftest (mean log-prob), losses from the scores and token sums."""
    K = max(map(len, responses_per_row))
    flat_prompts = [p for ps in prompts_per_row for p in ps]
    flat_responses = [r for rs in responses_per_row for r in rs]
    sums, counts = sequence_logprobs(net, flat_prompts, flat_responses)
    scores = torch.zeros(len(prompts_per_row), K)
    mask = torch.zeros(len(prompts_per_row), K, dtype=torch.bool)
    i = 0
    for b, rs in enumerate(responses_per_row):
        for k in range(len(rs)):
            scores[b, k], mask[b, k] = sums[i] / counts[i], True
            i += 1
    mle = -sums.sum() / counts.sum()
    rank = tuna.rank_loss(scores, mask, options.get("margin", 0.1))
    return scores, options.get("mle_weight", 1.0) * mle + rank


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_scores_loss_and_gradients_equal_naive_k_rows(spm_model_path, tiny_model, checkpointing):
    tok = tokenizer.Tokenizer(spm_model_path)
    prompt = data.alpaca_prompt("Give three tips for staying healthy.")
    answers = [["Eat a balanced diet, exercise regularly and sleep well.", "Sleep well.",
                "The quick brown fox jumps over the lazy dog while the cat sleeps."],
               ["Paris.", "The capital of France is Paris."]]  # 3 and 2 candidates: a masked slot
    prompts2 = data.alpaca_prompt("What is the capital of France?")
    pairs = [[data.encode_prompt_response(tok, prompt, a, 128) for a in answers[0]],
             [data.encode_prompt_response(tok, prompts2, a, 128) for a in answers[1]]]
    prompts_per_row = [[p for p, _ in row] for row in pairs]
    responses_per_row = [[r for _, r in row] for row in pairs]
    tiny_model.gradient_checkpointing = checkpointing

    tiny_model.zero_grad()
    batch = tuna.collate([tuna.pack_example(p, r) for p, r in zip(prompts_per_row, responses_per_row)], tok.pad_id)
    assert batch["tokens"].shape[1] < sum(len(p) + len(r) for p, r in zip(prompts_per_row[0], responses_per_row[0]))
    token_logprobs = tuna.score_tokens(tiny_model, batch)
    packed_scores = tuna.candidate_scores(token_logprobs, batch["candidate"], 3)
    packed_loss, _, _ = tuna.tuna_loss(token_logprobs, batch["candidate"], batch["candidate_mask"])
    packed_loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}

    tiny_model.zero_grad()
    naive_scores, naive = naive_loss(tiny_model, prompts_per_row, responses_per_row)
    naive.backward()
    tiny_model.gradient_checkpointing = False

    torch.testing.assert_close(packed_scores * batch["candidate_mask"], naive_scores, atol=1e-5, rtol=1e-5)
    assert packed_loss.item() == pytest.approx(naive.item(), abs=1e-5)
    for name, p in tiny_model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packing_a_seam_mismatch_still_equals_naive_rows(tiny_model):
    prompts, responses = [[1, 50, 60], [1, 50, 61, 62]], [[70, 80, 2], [90, 2]]
    batch = tuna.collate([tuna.pack_example(prompts, responses)], pad_id=0)
    with torch.no_grad():
        lp = tuna.score_tokens(tiny_model, batch)
        sums, counts = sequence_logprobs(tiny_model, prompts, responses)
    torch.testing.assert_close(tuna.candidate_scores(lp, batch["candidate"], 2)[0], sums / counts, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- LoRA

def test_lora_starts_at_the_base_model_trains_only_adapters_and_merges_exactly(tiny_model):
    torch.manual_seed(3)
    net = model.Transformer(model.ModelArgs.from_name("tiny"))
    net.load_state_dict(tiny_model.state_dict())
    tokens = torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        before = net(tokens)
    training.add_lora(net, rank=4, alpha=8, targets=["wq", "wv", "w2"])
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    assert len(trainable) == 2 * 3 * net.args.n_layers
    with torch.no_grad():
        torch.testing.assert_close(net(tokens), before)  # B = 0: the adapters start as a no-op
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net(tokens).logsumexp(-1).mean().backward()
    optimizer.step()
    with torch.no_grad():
        after = net(tokens)
        merged = training.plain_model(net, net.state_dict())
        assert not torch.allclose(after, before)
        torch.testing.assert_close(merged(tokens), after, atol=1e-5, rtol=1e-5)
    assert set(merged.state_dict()) == set(tiny_model.state_dict())


@pytest.mark.parametrize("rank, alpha, lora_a, lora_b, expected", [
    # W = I, x = (1, 2): A x = (1, 2), B swaps it: B A x = (2, 1); scale 8 / 2 = 4: y = x + 4 (2, 1) = (9, 6)
    (2, 8.0, [[1, 0], [0, 1]], [[0, 1], [1, 0]], [9.0, 6.0]),
    # A x = (1, 2, 1, 2), B A x = (1, 2); scale 2 / 4 = 0.5: y = (1, 2) + 0.5 (1, 2) = (1.5, 3)
    (4, 2.0, [[1, 0], [0, 1], [1, 0], [0, 1]], [[1, 0, 0, 0], [0, 0, 0, 1]], [1.5, 3.0]),
])
def test_lora_adds_alpha_over_rank_times_b_a_x(rank, alpha, lora_a, lora_b, expected):
    """y = W x + (alpha / r) B A x (Hu et al. 2021, section 4.1), with a non-zero B, worked out by hand."""
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
    layer = training.LoRALinear(base, rank, alpha)
    with torch.no_grad():
        layer.lora_a.copy_(torch.tensor(lora_a, dtype=torch.float32))
        layer.lora_b.copy_(torch.tensor(lora_b, dtype=torch.float32))
        assert layer(torch.tensor([[1.0, 2.0]]))[0].tolist() == expected


def test_lora_merge_is_the_base_weight_plus_alpha_over_rank_times_b_a(tiny_model):
    """The saved (merged) weight of a LoRA layer is W + (alpha / r) B A; rank 4, alpha 16: 4 B A."""
    net = model.Transformer(model.ModelArgs.from_name("tiny"))
    net.load_state_dict(tiny_model.state_dict())
    training.add_lora(net, rank=4, alpha=16, targets=["wq"])
    layer = net.layers[0].attention.wq
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=g))
        layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g))
        x = torch.randn(3, net.args.dim, generator=g)
        W, A, B = layer.base.weight, layer.lora_a, layer.lora_b
        torch.testing.assert_close(layer(x), x @ W.T + 4 * (x @ A.T) @ B.T)
        merged = training.plain_model(net, net.state_dict())
    torch.testing.assert_close(merged.layers[0].attention.wq.weight, W + 4 * B @ A)


@pytest.mark.parametrize("candidates", [4, 5])
def test_bench_compares_layouts_that_compute_the_same_loss(candidates):
    import bench  # its naive K-row baseline must be the same computation, or its speed-up means nothing
    # `bench.py --config tiny`: model.py's tiny config (max_seq_len 256) with rows of 280 positions
    net = bench.build("tiny", "cpu")
    lens = bench.RESPONSE_LENS if candidates == 4 else bench.RESPONSE_LENS_K5
    assert len(lens) == candidates
    shared, naive = bench.ranking_rows(512, 2, lens)
    assert sum(len(r["tokens"]) for r in shared) == 2 * (bench.PROMPT_LEN + sum(lens))
    assert len(naive) == 2 * candidates
    with torch.no_grad():
        packed = bench.ranking_loss(net, shared, False, torch.device("cpu"), 2)
        rows = bench.ranking_loss(net, naive, True, torch.device("cpu"), 2)
    assert packed.item() == pytest.approx(rows.item(), abs=1e-5)


def test_bench_bf16_autocast_path_on_a_cpu_is_float32_within_bfloat16_precision():
    """bench.py's GPU arm (bfloat16 autocast), chosen on the CPU: the ranking loss of both layouts is the
    float32 loss within bfloat16's relative step (2 ** -8), and not the float32 loss itself."""
    import bench
    net = bench.build("tiny", "cpu")
    shared, naive = bench.ranking_rows(512, 2, bench.RESPONSE_LENS)
    cpu = torch.device("cpu")
    with torch.no_grad():
        float32 = bench.ranking_loss(net, shared, False, cpu, 2).item()
        for rows, is_naive in ((shared, False), (naive, True)):
            bf16 = bench.ranking_loss(net, rows, is_naive, cpu, 2, use_autocast=True).item()
            assert bf16 == pytest.approx(float32, rel=2 ** -8) and bf16 != float32


# ----------------------------------------------------------------------------- speed (MFU) and memory
def flops_row():
    # prompt [1, 5, 6] (shared), responses [7, 8, 2] and [9, 2]: 8 tokens at positions 0 1 2 | 3 4 5 | 3 4
    # (keys seen: 1 + 2 + 3 + 4 + 5 + 6 + 4 + 5 = 30), 5 scored tokens
    return tuna.pack_example([[1, 5, 6]] * 2, [[7, 8, 2], [9, 2]])


def test_step_flops_by_hand_full_fine_tuning_and_lora(monkeypatch):
    net = model.Transformer(model.ModelArgs.from_name("tiny"))  # dim 64, 2 layers, 4 heads of 16, 2 kv, ffn 192
    # multiply-adds per token and layer: wq, wo 64 x 64; wk, wv 64 x 32; w1, w2, w3 64 x 192 -> 49_152; 2 layers
    # attention: 2 layers x 2 (q k^T, weights x v) x 4 heads x 16 x 30 keys = 7_680; output: 64 x 512 x 5 = 163_840
    # full: forward 98_304 x 8 + 7_680 + 163_840 = 957_952; backward: again + attention + weights' gradients
    # (98_304 x 8 + 163_840) = 1_915_904; x 2 FLOPs -> 5_747_712 = 6N per token + 6 x attention (PaLM's count)
    assert training.step_flops(net, [flops_row()], recompute=False) == (5_747_712, 5_747_712)
    # recomputation: the blocks' forward (98_304 x 8 + 7_680) once more
    assert training.step_flops(net, [flops_row()], recompute=True)[1] == 5_747_712 + 2 * 794_112
    # and the output layer's (163_840) where the 5 scored tokens take more than one chunk of log-probs
    monkeypatch.setattr(model, "LOGPROB_CHUNK_TOKENS", 4)
    assert training.step_flops(net, [flops_row()], recompute=True)[1] == 5_747_712 + 2 * (794_112 + 163_840)
    # LoRA rank 4 on all seven: 4 x (in + out) per layer = 512 + 384 + 384 + 512 + 3 x 1_024 = 4_864, 2 layers;
    # forward (98_304 + 9_728) x 8 + 7_680 + 163_840 = 1_035_776; backward: again + 7_680 + 9_728 x 8 (the
    # adapters' gradients; the frozen base and output layer have none) = 1_121_280
    training.add_lora(net, 4, 16.0, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    assert training.step_flops(net, [flops_row()], recompute=False) == (4_314_112, 4_314_112 + 2 * 163_840)


def test_peak_tflops_by_device_name_and_override():
    assert training.peak_tflops(torch.device("cpu")) is None and training.peak_tflops(torch.device("cpu"), 2.5) == 2.5
    names = dict(training.PEAK_TFLOPS)
    first = lambda name: next(t for known, t in training.PEAK_TFLOPS if known in name)  # noqa: E731 (its matching)
    assert first("NVIDIA H100 PCIe") == names["H100 PCIe"] == 756.0 and first("NVIDIA H100 80GB HBM3") == 989.0
    assert first("NVIDIA L40S") == 362.0 and first("NVIDIA L4") == 121.0 and first("NVIDIA H200") == 989.0


@pytest.mark.parametrize("autocast_dtype, expected", [(torch.bfloat16, 2), (None, 4)])
def test_checkpointing_auto_counts_activations_in_the_dtype_the_step_runs_in(autocast_dtype, expected,
                                                                             monkeypatch):
    """--gradient-checkpointing auto sizes activations in autocast's dtype wherever the step autocasts (--autocast
    on a CPU included), else in the weights' dtype (float32 here)."""
    torch.manual_seed(0)
    net = model.Transformer(model.ModelArgs(**model.CONFIGS["tiny"]))
    seen = []
    monkeypatch.setattr(training, "needs_checkpointing", lambda *a: seen.append(a[-1]) or False)
    args = argparse.Namespace(gradient_checkpointing="auto")
    run = training.Run(args, "rank", "out", "new", {}, device=torch.device("cpu"), rows=[{"tokens": [1] * 10}],
                   autocast_dtype=autocast_dtype)
    assert training.choose_checkpointing(run, net, 2) is False
    assert seen == [expected]


def test_checkpointing_rule_by_hand_at_llama_7b():
    seven_b = model.ModelArgs.from_name("llama-7b")  # dim 4096, hidden 11008, 32 layers
    # per token and block: (9 x 4096 + 4 x 11008) x 2 bytes + 2 x 4 x 4096 = 161_792 + 32_768 = 194_560
    tokens = 16 * 850  # 16 instructions of a prompt and 5 candidates, ~850 tokens each
    assert training.activation_bytes(seven_b, tokens, False, 2) == tokens * 32 * 194_560 == 84_672_512_000
    assert training.activation_bytes(seven_b, tokens, True, 2) == tokens * (32 * 4 * 4096 + 194_560)
    lora = 32 * (4 * 64 * 8192 + 3 * 64 * (4096 + 11008))  # rank 64 on all seven: 159_907_840 parameters
    # an H200 (141e9 - 13.5e9 of bf16 weights free): 0.9 x 127.5e9 - 12 x lora = 112.8e9 > 84.7e9: off
    assert not training.needs_checkpointing(seven_b, tokens, 127.5e9, lora, 2)
    # an 80 GB card: 0.9 x 66.5e9 - 1.9e9 = 57.9e9 < 84.7e9: on; at 8 instructions (42.3e9) off again
    assert training.needs_checkpointing(seven_b, tokens, 66.5e9, lora, 2)
    assert not training.needs_checkpointing(seven_b, tokens // 2, 66.5e9, lora, 2)
    # 95e9 free: 85.5e9 would hold the activations, but not once the adapters' gradients and Adam take 1.9e9
    assert training.needs_checkpointing(seven_b, tokens, 95e9, lora, 2)
