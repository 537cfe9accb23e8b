"""Speed and memory of tuna's training and generation paths, measured in one run on one machine.

A developer tool, not part of the pipeline: the only top-level file that imports transformers, to
compare with LlamaForCausalLM at the same config, weights and batch. It prints
  1. train-step tokens/s (forward, cross-entropy, backward, AdamW): model.py vs LlamaForCausalLM
  2. the ranking step (tuna.py's loss and backward) with prefix sharing vs naive K rows, K = 4,
     prompt 100 tokens, responses 120-180 (mean 150, like Alpaca's), time and peak memory of each
  3. greedy generation tokens/s, batch 1 and 8: model.generate (KV cache) vs transformers' generate
Timings are medians of interleaved repeats (A, B, A, B, ...), so a busy machine slows both alike.

    python bench.py                               # CPU, config cpu-small: about two minutes
    python bench.py --config gpu-1b               # on a GPU, bf16 autocast (fp32 weights and Adam for
                                                  # two models: 7B configs do not fit one GPU)
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import model
import tuna

# cpu-small keeps LLaMA's proportions roughly (head dim 64, the output layer and attention a minor share
# of the work, as at 7B), so that its ratios say something about the real model; vocab 8192 to keep it fast.
BENCH_CONFIGS = {
    "cpu-small": dict(dim=1024, n_layers=4, n_heads=16, vocab_size=8192, multiple_of=64, max_seq_len=1024),
    "gpu-1b": dict(dim=2048, n_layers=16, n_heads=16, vocab_size=32000, max_seq_len=2048),
}
PROMPT_LEN, RESPONSE_LENS = 100, [120, 140, 160, 180]  # K = 4 candidates


def build(config, device, seed=0):
    torch.manual_seed(seed)
    args = model.ModelArgs(**BENCH_CONFIGS[config]) if config in BENCH_CONFIGS else model.ModelArgs.from_name(config)
    with torch.device(device):
        return model.Transformer(args)


def hf_twin(net):
    """transformers' LlamaForCausalLM with net's config and weights (SDPA attention, as model.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    a = net.args
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
                         num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                         head_dim=a.head_dim, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                         max_position_embeddings=a.max_seq_len, tie_word_embeddings=a.tie_embeddings,
                         bos_token_id=a.bos_id, eos_token_id=a.eos_id, attn_implementation="sdpa")
    device = net.tok_embeddings.weight.device
    with torch.device(device):
        hf = LlamaForCausalLM(config)
    hf.load_state_dict(model.meta_to_hf(net.state_dict(), a), strict=True)
    return hf


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def race(functions, device, repeats, warmup=1):
    """{name: median seconds}, the functions called in turn so that machine noise hits all alike."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------------------- 1. train step

def bench_train_step(net, hf, device, batch, seq, repeats):
    tokens = torch.randint(3, net.args.vocab_size, (batch, seq), device=device)

    def step(forward, optimizer):
        def run():
            with autocast(device):
                logits = forward(tokens)  # (B, T, V)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    fused = device.type == "cuda"
    ours = step(lambda t: net(t), torch.optim.AdamW(net.parameters(), lr=1e-6, fused=fused))
    theirs = step(lambda t: hf(input_ids=t, use_cache=False).logits, torch.optim.AdamW(hf.parameters(), lr=1e-6, fused=fused))
    times = race({"model.py": ours, "transformers": theirs}, device, repeats)
    return {name: batch * seq / t for name, t in times.items()}


# ---------------------------------------------------------------------------- 2. ranking step

def ranking_rows(vocab, instructions, seed=0):
    """Random token ids with the benchmark's lengths: (prefix-shared rows, naive rows)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    shared, naive = [], []
    for _ in range(instructions):
        prompt = [1] + ids(PROMPT_LEN - 1)
        responses = [ids(n - 1) + [2] for n in RESPONSE_LENS]
        shared.append(tuna.pack_example([prompt] * len(responses), responses))
        naive += [tuna.pack_example([prompt], [r]) for r in responses]  # one (prompt, response) per row
    return shared, naive


def ranking_loss(net, rows, naive, device, instructions):
    batch = tuna.collate(rows, pad_id=0, device=device)
    with autocast(device):
        token_logprobs = tuna.score_tokens(net, batch)
        if not naive:
            return tuna.tuna_loss(token_logprobs, batch["candidate"], batch["candidate_mask"])[0]
        K = len(RESPONSE_LENS)  # row b*K + k holds candidate k of instruction b
        scores = tuna.candidate_scores(token_logprobs, batch["candidate"], 1).view(instructions, K)
        mask = torch.ones(instructions, K, dtype=torch.bool, device=device)
        return tuna.mle_loss(token_logprobs, batch["candidate"]) + tuna.rank_loss(scores, mask)


def ranking_step(net, rows, naive, device, instructions):
    """Loss and gradients, the part prefix sharing changes. The AdamW update is left out: it is the
    same for both layouts and, over a real batch of 16 instructions, a small part of a step."""
    def run():
        ranking_loss(net, rows, naive, device, instructions).backward()
        net.zero_grad(set_to_none=True)
    return run


def bench_ranking(net, device, instructions, repeats):
    shared, naive = ranking_rows(net.args.vocab_size, instructions)
    with torch.no_grad():
        a = ranking_loss(net, shared, False, device, instructions).item()
        b = ranking_loss(net, naive, True, device, instructions).item()
    times = race({"prefix": ranking_step(net, shared, False, device, instructions),
                  "naive": ranking_step(net, naive, True, device, instructions)}, device, repeats)
    tokens = {"prefix": sum(len(r["tokens"]) for r in shared),
              "naive": len(naive) * max(len(r["tokens"]) for r in naive)}  # rows padded to the longest
    return times, tokens, abs(a - b)


def peak_memory(config, device, instructions, variant):
    """Peak memory of loss + backward above the model's weights. CUDA: max_memory_allocated. CPU: a
    fresh process's peak resident set (VmHWM) during two steps minus its resident set before them."""
    if device.type == "cuda":
        net = build(config, device)
        shared, naive = ranking_rows(net.args.vocab_size, instructions)
        step = ranking_step(net, naive if variant == "naive" else shared, variant == "naive", device, instructions)
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del net, step
        torch.cuda.empty_cache()
        return peak
    out = subprocess.run([sys.executable, __file__, "--memory-probe", variant, "--config", config,
                          "--instructions", str(instructions)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def resident_kib(field):
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in KiB. Not ru_maxrss: Linux carries
    that over from the parent across fork + exec, so a child of a big process reports the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_probe(config, instructions, variant):
    net = build(config, "cpu")
    shared, naive = ranking_rows(net.args.vocab_size, instructions)
    base = resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak (VmHWM) to the current RSS
        f.write("5")
    step = ranking_step(net, naive if variant == "naive" else shared, variant == "naive", torch.device("cpu"),
                        instructions)
    step()
    step()
    print(json.dumps({"peak_bytes": (resident_kib("VmHWM") - base) * 1024}))


# ---------------------------------------------------------------------------- 3. generation

def bench_generation(net, hf, device, batch, prompt_len, new_tokens, repeats):
    g = torch.Generator().manual_seed(batch)
    prompts = [[1] + torch.randint(3, net.args.vocab_size, (prompt_len - 1,), generator=g).tolist() for _ in range(batch)]
    input_ids = torch.tensor(prompts, device=device)
    results = {}

    def ours():
        with autocast(device):
            results["ours"] = model.generate(net, prompts, new_tokens, temperature=0.0, eos_id=-1)[0]  # never stops

    def theirs():
        with torch.no_grad(), autocast(device):
            out = hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        results["theirs"] = out[:, prompt_len:].tolist()

    times = race({"model.py": ours, "transformers": theirs}, device, repeats)
    same = sum(a == b for a, b in zip(results["ours"], results["theirs"])) / batch
    return {name: batch * new_tokens / t for name, t in times.items()}, same


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help=f"{', '.join(BENCH_CONFIGS)} or a model.py name "
                        "(default: cpu-small on CPU, gpu-1b on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats per measurement (default 5 CPU, 10 GPU)")
    parser.add_argument("--instructions", type=int, default=0, help="ranking batch (default 2 CPU, 16 GPU)")
    parser.add_argument("--memory-probe", choices=["prefix", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    config = args.config or ("gpu-1b" if gpu else "cpu-small")
    instructions = args.instructions or (16 if gpu else 1)
    if args.memory_probe:
        return memory_probe(config, instructions, args.memory_probe)
    repeats = args.repeats or (10 if gpu else 5)
    train_batch, train_seq = (8, 512) if gpu else (2, 256)
    gen_prompt, gen_new = (128, 128) if gpu else (32, 32)

    net = build(config, device)
    hf = hf_twin(net)
    a = net.args
    print(f"bench.py on {torch.cuda.get_device_name(device) if gpu else 'CPU'} ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, config {config}: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads, "
          f"vocab {a.vocab_size}; {'bf16 autocast' if gpu else 'float32'}")
    with torch.no_grad():
        probe = torch.randint(3, a.vocab_size, (2, 64), device=device)
        gap = (net(probe) - hf(input_ids=probe).logits.float()).abs().max().item()
    print(f"same weights: max |logits difference| model.py vs transformers = {gap:.2e}")

    speed = bench_train_step(net, hf, device, train_batch, train_seq, repeats)
    ratio = speed["model.py"] / speed["transformers"]
    print(f"\n1. train step, batch {train_batch} x {train_seq} tokens: model.py {speed['model.py']:.0f} tok/s, "
          f"transformers {speed['transformers']:.0f} tok/s -> {ratio:.2f}x (target >= 1.0x)")

    hf.cpu()
    del hf
    times, tokens, gap = bench_ranking(net, device, instructions, repeats)
    memory = {v: peak_memory(config, device, instructions, v) for v in ("prefix", "naive")}
    mib = lambda n: f"{n / 2**20:.0f} MiB" if n > 0 else "n/a (below resolution)"  # noqa: E731
    print(f"\n2. ranking loss + backward (tuna.py), {instructions} instruction(s) x K={len(RESPONSE_LENS)}, prompt "
          f"{PROMPT_LEN}, responses {RESPONSE_LENS} tokens (same loss: |difference| {gap:.1e})")
    for v in ("prefix", "naive"):
        print(f"   {v:6s}: {times[v] * 1000:7.0f} ms/step, {tokens[v]} tokens in the batch, "
              f"{instructions / times[v]:.2f} instructions/s, peak memory {mib(memory[v])}"
              f"{' (CUDA max_memory_allocated above the weights)' if gpu else ' (RSS peak above the weights, fresh process)'}")
    print(f"   prefix sharing: {times['naive'] / times['prefix']:.2f}x faster (target >= 1.4x), "
          f"{memory['naive'] / max(memory['prefix'], 1):.2f}x less memory")

    hf = hf_twin(net)
    net.eval()
    hf.eval()
    print(f"\n3. greedy generation, prompt {gen_prompt} tokens, {gen_new} new tokens:")
    for batch in (1, 8):
        speed, same = bench_generation(net, hf, device, batch, gen_prompt, gen_new, repeats)
        print(f"   batch {batch}: model.py {speed['model.py']:.0f} tok/s, transformers {speed['transformers']:.0f} tok/s"
              f" -> {speed['model.py'] / speed['transformers']:.2f}x (target >= 1.0x); same tokens in {same:.0%} of rows")


if __name__ == "__main__":
    main()
