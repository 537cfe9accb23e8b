"""Speed and memory of tuna's training and generation paths, measured in one run on one machine.

A developer tool, not part of the pipeline: the only top-level file that imports
transformers, to compare with LlamaForCausalLM at the same config, weights and batch. It
prints
  1. train-step tokens/s (forward, cross-entropy, backward, AdamW): model.py vs
     LlamaForCausalLM, on the multi-head config and on its grouped-query twin (a quarter
     of the key/value heads, as Llama 3); the FLOPs per token it assumes
     (training.step_flops), the FLOP/s reached, and the MFU where the peak is known
  2. the ranking step (tuna.py's loss and backward) with prefix sharing vs naive K rows,
     K = 4 (probabilistic ranking) and K = 5 (contextual: 4 samples + the teacher's
     answer), prompt 100 tokens, responses 120-180 (mean 150, like Alpaca's), time and
     peak memory of each
  3. greedy generation tokens/s, batch 1 and 8: model.generate (KV cache), eager and with
     the compiled decode step, vs transformers' generate, and batch 1 against the rate
     of one pass over the weights (which every new token reads)
  4. contextual ranking's student sampling (teacher.sample_diverse), 32 instructions x 4
     samples: 128 rows decoding together vs one instruction (4 rows) at a time,
     samples/s, each row with its own generator
  5. the byte-level BPE (tokenizer.py) encoding one word of 16,000 random letters vs
     `tokenizers`, on the real Llama 3 tokenizer.json tests/fetch_real_files.py caches
Timings are medians of interleaved repeats (A, B, A, B, ...), so a busy machine slows
both alike.

    # CPU, config cpu-small: about four minutes on 2 cores
    python bench.py
    # on a GPU, bf16 autocast (fp32 weights and Adam for two models: 7B configs do not
    # fit one GPU)
    python bench.py --config gpu-1b
    # on a GPU: hours of a whole one-GPU reproduction, from model.py's measured per-token
    # costs at LLaMA-7B's shape, each stage's peak memory, and the training MFU
    python bench.py --config gpu-7b
    # the same within 24 GiB: what fits a smaller card
    python bench.py --config gpu-7b --memory-cap 24
"""
import argparse
import functools
import importlib.util
import json
import os
import random
import statistics
import string
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import checkpoint
import model
import tokenizer
import training
import tuna

# ---- 0. configs and timing, which every measurement below uses

# cpu-small keeps LLaMA's proportions roughly (head dim 64, the output layer and attention
# a minor share of the work, as at 7B), so that its ratios say something about the real
# model; vocab 8192 to keep it fast.
BENCH_CONFIGS = {
    "cpu-small": dict(dim=1024, n_layers=4, n_heads=16, vocab_size=8192, multiple_of=64,
                      max_seq_len=1024),
    "gpu-1b": dict(dim=2048, n_layers=16, n_heads=16, vocab_size=32000, max_seq_len=2048),
}
PROMPT_LEN = 100
RESPONSE_LENS = [120, 140, 160, 180]  # K = 4: probabilistic ranking (the teacher's 4 answers)
# K = 5: contextual ranking (4 samples + the teacher's answer)
RESPONSE_LENS_K5 = [120, 135, 150, 165, 180]
# the longest row bench.py builds: one prefix-shared K=5 instruction
LONGEST_ROW = PROMPT_LEN + sum(RESPONSE_LENS_K5)


def build(config, device, seed=0, **overrides):
    """model.py's Transformer at a bench.py or model.py config, seeded; overrides change
    fields."""
    torch.manual_seed(seed)
    fields = BENCH_CONFIGS[config] if config in BENCH_CONFIGS else model.CONFIGS[config]
    args = model.ModelArgs(**{**fields, **overrides})
    # a shorter config (model.py's "tiny": 256) gets a longer RoPE table; no weight
    # depends on its length
    args.max_seq_len = max(args.max_seq_len, LONGEST_ROW)
    with torch.device(device):
        return model.Transformer(args)


def hf_twin(net):
    """transformers' LlamaForCausalLM with net's config and weights (SDPA attention, as
    model.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    a = net.args
    config = LlamaConfig(vocab_size=a.vocab_size,
                         hidden_size=a.dim,
                         intermediate_size=a.hidden_dim,
                         num_hidden_layers=a.n_layers,
                         num_attention_heads=a.n_heads,
                         num_key_value_heads=a.n_kv_heads,
                         head_dim=a.head_dim,
                         rms_norm_eps=a.norm_eps,
                         rope_theta=a.rope_theta,
                         max_position_embeddings=a.max_seq_len,
                         tie_word_embeddings=a.tie_embeddings,
                         bos_token_id=a.bos_id,
                         eos_token_id=a.eos_id,
                         attn_implementation="sdpa")
    device = net.tok_embeddings.weight.device
    with torch.device(device):
        hf = LlamaForCausalLM(config)
    hf.load_state_dict(checkpoint.meta_to_hf(net.state_dict(), a), strict=True)
    return hf


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def race(functions, device, repeats, warmup=1, every_round=False):
    """{name: median seconds} ({name: [seconds of each round]} if every_round), the
    functions called in turn so that machine noise hits all alike."""
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
    if every_round:
        return times
    return {name: statistics.median(t) for name, t in times.items()}


def autocast(device, enabled=None):
    """bfloat16 autocast, by default on CUDA only (a CPU measures float32); enabled=True: on
    a CPU too."""
    enabled = training.on_cuda_unless_told(enabled, device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# ---- 1. train step

def train_step_flops_per_token(net, seq):
    """training.step_flops of section 1's step per token: a row of seq tokens at positions
    0..seq-1 (causal), every position through the output layer, every weight trained (6N +
    attention, PaLM's count)."""
    row = {"tokens": [0] * seq, "positions": list(range(seq)), "target": [0] * seq}
    return training.step_flops(net, [row], recompute=False)[0] / seq


def next_token_loss(logits, tokens):
    """Cross-entropy of each position's logits against the token after it."""
    predicted = logits[:, :-1].flatten(0, 1).float()  # (B * (T - 1), V)
    following = tokens[:, 1:].flatten()
    return F.cross_entropy(predicted, following)


def hf_logits(hf, tokens):
    """transformers' forward in model.py's form: token ids (B, T) -> logits (B, T, V)."""
    return hf(input_ids=tokens, use_cache=False).logits


def train_step(forward, optimizer, tokens, device):
    """A function running one training step of `forward` on `tokens`."""
    def run():
        with autocast(device):
            logits = forward(tokens)  # (B, T, V)
            loss = next_token_loss(logits, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def bench_train_step(net, hf, device, batch, seq, repeats):
    """tokens/s of a training step, model.py against transformers; the median and range of
    the per-round ratio transformers / model.py."""
    tokens = torch.randint(3, net.args.vocab_size, (batch, seq), device=device)
    fused = training.on_cuda_unless_told(None, device)  # as tuna.py's optimizer
    our_optimizer = torch.optim.AdamW(net.parameters(), lr=1e-6, fused=fused)
    ours = train_step(net, our_optimizer, tokens, device)
    their_optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-6, fused=fused)
    theirs = train_step(functools.partial(hf_logits, hf), their_optimizer, tokens, device)
    times = race({"model.py": ours, "transformers": theirs}, device, repeats, every_round=True)
    # the ratio within each round (the two steps ran back to back), so that drift between
    # rounds cancels
    ratios = sorted(b / a for a, b in zip(times["model.py"], times["transformers"]))
    speed = {name: batch * seq / statistics.median(t) for name, t in times.items()}
    return speed, statistics.median(ratios), (ratios[0], ratios[-1])


# ---- 2. ranking step

def random_ids(vocab, count, generator):
    """`count` token ids past the special ones (0-2: unknown, BOS, EOS)."""
    return torch.randint(3, vocab, (count,), generator=generator).tolist()


def ranking_rows(vocab, instructions, response_lens=RESPONSE_LENS, seed=0):
    """Random token ids with the benchmark's lengths: (prefix-shared rows, naive rows)."""
    g = torch.Generator().manual_seed(seed)
    shared = []
    naive = []
    for _ in range(instructions):
        prompt = [1] + random_ids(vocab, PROMPT_LEN - 1, g)
        responses = [random_ids(vocab, n - 1, g) + [2] for n in response_lens]
        shared.append(tuna.pack_example([prompt] * len(responses), responses))
        # one (prompt, response) per row
        naive += [tuna.pack_example([prompt], [r]) for r in responses]
    return shared, naive


def ranking_loss(net, rows, naive, device, instructions, use_autocast=None):
    """tuna.py's loss over prefix-shared rows (tuna_loss), or over naive rows (one candidate
    a row): the same MLE and ranking terms."""
    batch = tuna.collate(rows, pad_id=0, device=device)
    with autocast(device, use_autocast):
        token_logprobs = tuna.score_tokens(net, batch)
        token_candidate = batch["candidate"]
        if not naive:
            loss, _, _ = tuna.tuna_loss(token_logprobs, token_candidate, batch["candidate_mask"])
            return loss
        K = len(rows) // instructions  # row b*K + k holds candidate k of instruction b
        row_scores = tuna.candidate_scores(token_logprobs, token_candidate, 1)
        scores = row_scores.view(instructions, K)
        mask = torch.ones(instructions, K, dtype=torch.bool, device=device)
        mle = tuna.mle_loss(token_logprobs, token_candidate)
        return mle + tuna.rank_loss(scores, mask)


def ranking_step(net, rows, naive, device, instructions, optimizer=None):
    """Loss and gradients, the part prefix sharing changes. The AdamW update is left out
    (optimizer None): it is the same for both layouts and, over a real batch of 16
    instructions, a small part of a step."""
    def run():
        ranking_loss(net, rows, naive, device, instructions).backward()
        if optimizer is not None:
            optimizer.step()
        net.zero_grad(set_to_none=True)
    return run


def bench_ranking(net, device, instructions, response_lens, repeats):
    """Median seconds of a step, tokens in the batch, and the gap between the two layouts'
    losses."""
    shared, naive = ranking_rows(net.args.vocab_size, instructions, response_lens)
    with torch.no_grad():
        shared_loss = ranking_loss(net, shared, False, device, instructions).item()
        naive_loss = ranking_loss(net, naive, True, device, instructions).item()
    steps = {"prefix": ranking_step(net, shared, False, device, instructions),
             "naive": ranking_step(net, naive, True, device, instructions)}
    times = race(steps, device, repeats)
    # naive rows are padded to the longest
    tokens = {"prefix": sum(len(r["tokens"]) for r in shared),
              "naive": len(naive) * max(len(r["tokens"]) for r in naive)}
    return times, tokens, abs(shared_loss - naive_loss)


def peak_memory(config, device, instructions, response_lens, variant):
    """Peak memory of loss + backward above the model's weights. CUDA:
    max_memory_allocated. CPU: a fresh process's peak resident set (VmHWM) during two
    steps minus its resident set before them."""
    if device.type == "cuda":
        return cuda_peak_memory(config, device, instructions, response_lens, variant)
    command = [sys.executable, __file__, "--memory-probe", variant,
               "--config", config,
               "--instructions", str(instructions),
               "--candidates", str(len(response_lens))]
    probe = subprocess.run(command, capture_output=True, text=True, check=True)
    last_line = probe.stdout.strip().splitlines()[-1]
    return json.loads(last_line)["peak_bytes"]


def probe_step(config, device, instructions, response_lens, variant):
    """A ranking step of `variant` ("prefix" or "naive") on a fresh model, for the peak
    memory probes; its rows are built, the step not yet run."""
    net = build(config, device)
    shared, naive = ranking_rows(net.args.vocab_size, instructions, response_lens)
    is_naive = variant == "naive"
    rows = naive if is_naive else shared
    return ranking_step(net, rows, is_naive, device, instructions)


def cuda_peak_memory(config, device, instructions, response_lens, variant):
    """CUDA's max_memory_allocated during a second step, above what the first left
    allocated (the weights: ranking_step frees the gradients)."""
    step = probe_step(config, device, instructions, response_lens, variant)
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # the step holds the model
    del step
    torch.cuda.empty_cache()
    return peak


def resident_kib(field):
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in KiB. Not ru_maxrss:
    Linux carries that over from the parent across fork + exec, so a child of a big
    process reports the parent's peak."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1])  # "VmRSS:   1234 kB"


def memory_probe(config, instructions, response_lens, variant):
    """The child process of peak_memory on a CPU: prints {"peak_bytes": ...} as its last
    line."""
    cpu = torch.device("cpu")
    step = probe_step(config, cpu, instructions, response_lens, variant)
    base = resident_kib("VmRSS")
    # "5": reset the peak (VmHWM) to the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    step()
    peak_kib = resident_kib("VmHWM") - base
    print(json.dumps({"peak_bytes": peak_kib * 1024}))


# ---- 3. generation

def random_prompts(vocab, lengths, seed):
    """BOS, then random ids: a prompt of each length."""
    g = torch.Generator().manual_seed(seed)
    return [[1] + random_ids(vocab, n - 1, g) for n in lengths]


def bench_generation(net, hf, device, batch, prompt_len, new_tokens, repeats):
    """tokens/s of greedy generation: model.generate eager and compiled, transformers'
    generate; the share of rows where all three gave the same tokens; seconds of the
    compiled step's first call (compilation)."""
    prompts = random_prompts(net.args.vocab_size, [prompt_len] * batch, seed=batch)
    input_ids = torch.tensor(prompts, device=device)
    results = {}

    def ours(compile):
        def run():
            # eos_id -1: never stops, every row makes new_tokens tokens
            with autocast(device):
                out = model.generate(net, prompts, new_tokens, eos_id=-1, compile=compile)
                results[compile] = out[0]
        return run

    def theirs():
        with torch.no_grad(), autocast(device):
            out = hf.generate(input_ids=input_ids,
                              attention_mask=torch.ones_like(input_ids),
                              do_sample=False,
                              max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens,
                              pad_token_id=0)
        results["theirs"] = out[:, prompt_len:].tolist()

    start = time.perf_counter()
    ours(True)()
    compile_seconds = time.perf_counter() - start
    arms = {"eager": ours(False), "compiled": ours(True), "transformers": theirs}
    times = race(arms, device, repeats)
    # where each row's three outputs first differ (new_tokens: nowhere; every row makes
    # new_tokens tokens): in bf16 a random model's near-tied logits part ways after a few
    # tokens
    outputs = zip(results[False], results[True], results["theirs"])
    first_difference = [first_disagreement(row, new_tokens) for row in outputs]
    same = sum(at == new_tokens for at in first_difference) / batch
    speed = {name: batch * new_tokens / t for name, t in times.items()}
    median_first = statistics.median(first_difference)
    return speed, (same, median_first), compile_seconds


def first_disagreement(outputs, length):
    """The first position where the token lists in `outputs` differ; `length` where none
    does."""
    positions = enumerate(zip(*outputs))
    return next((i for i, tokens in positions if len(set(tokens)) > 1), length)


def weight_pass_rate(net, device, repeats):
    """(passes/s, bytes) of one pass that sums every weight matrix. Each new token of
    batch-1 decoding reads every weight matrix once (of the embedding table, one row), so
    its tokens/s stays near this rate. Not a strict ceiling: a matrix-vector product may
    stream memory faster than a sum does (on this project's CPU, model.py's compiled
    decode has run at up to 1.17x it)."""
    embedding = net.tok_embeddings.weight
    # an untied embedding table is read one row a token: left out
    weights = [w for w in net.parameters() if w is not embedding or net.args.tie_embeddings]

    def read_all():
        for w in weights:
            w.sum()

    seconds = race({"read": read_all}, device, repeats)["read"]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    return 1 / seconds, weight_bytes


def per_row_generators(device, seed, rows):
    """A generator per row, seeded by the row's number: a row draws the same in any batch."""
    return [torch.Generator(device).manual_seed(seed * 1_000_003 + row) for row in rows]


class IdsAsText:
    """What teacher.sample_diverse asks of a tokenizer, over random token ids: prompt i is
    the text "i", a response's text is its ids, and EOS is -1, so a random model never
    ends and every row makes all its tokens in both arms."""
    eos_id = -1
    stop_ids = [eos_id]  # tokenizer.Tokenizer's: what generation stops at, EOS first

    def __init__(self, prompts):
        self.prompts = prompts

    def encode(self, text, bos=True):
        return self.prompts[int(text)]

    def decode(self, ids):
        return " ".join(map(str, ids))


# ---- 4. student sampling: the diversity rule's batched path

def bench_sampling(net, device, prompts, samples, new_tokens, repeats, batch_size=128,
                   temperature=0.8):
    """samples/s of contextual ranking's student sampling, teacher.sample_diverse (the
    diversity rule included): batch_size rows decoding together vs one instruction (its
    rows) at a time; each row draws from its own generator, so both must give the same
    samples."""
    import teacher  # imports requests: only this section needs it
    tok = IdsAsText(prompts)
    results = {}

    def arm(name, rows):
        def run():
            generators = [per_row_generators(device, 0, range(i * samples, (i + 1) * samples))
                          for i in range(len(prompts))]
            texts = [str(i) for i in range(len(prompts))]
            with autocast(device):
                results[name] = teacher.sample_diverse(net, tok, texts, samples, temperature,
                                                       new_tokens, generators=generators,
                                                       batch_size=rows)
        return run

    arms = {"batched": arm("batched", batch_size),
            "one instruction at a time": arm("one", samples)}
    times = race(arms, device, repeats)
    pairs = zip(results["batched"], results["one"])
    same = sum(a["candidates"] == b["candidates"] for a, b in pairs)
    rounds = statistics.mean(result["round"] for result in results["batched"])
    speed = {name: len(prompts) * samples / t for name, t in times.items()}
    return speed, same / len(prompts), rounds


# ---- 5. byte-level BPE on a long word

def real_llama3_tokenizer():
    """The real Llama 3 tokenizer.json that tests/fetch_real_files.py caches, or None where it is not
    there."""
    cache = os.environ.get("TUNA_REAL_FILES") or os.path.expanduser("~/.cache/tuna/real-files")
    path = os.path.join(cache, "llama3", "tokenizer.json")
    return path if os.path.isfile(path) else None


def bench_bpe_word(path, letters, repeats):
    """tokenizer.py and `tokenizers` encoding one word of random letters (no spaces: a single word to merge,
    not itself a token) with the same tokenizer.json: {name: median seconds}, and whether the ids agree."""
    import tokenizers

    ours, theirs = tokenizer.Tokenizer(path), tokenizers.Tokenizer.from_file(path)
    word = "".join(random.Random(0).choice(string.ascii_lowercase) for _ in range(letters))

    def encode_with_tokenizer_py():
        ours.bpe.cache.clear()  # it remembers words; `tokenizers` keeps none this long
        return ours.encode(word)
    times = race({"tokenizer.py": encode_with_tokenizer_py,
                  "tokenizers": lambda: theirs.encode(word, add_special_tokens=False)},
                 torch.device("cpu"), repeats)
    return times, ours.encode(word) == theirs.encode(word, add_special_tokens=False).ids


# ---- 6. a whole reproduction (GPU)

# What a one-GPU reproduction processes (README, "A real reproduction, stage by stage";
# token counts as the benchmarks above).
ALPACA = 52_002  # instructions
SFT_EPOCHS = 3  # Alpaca's recipe
# student samples for contextual ranking (one round; diversity retries add more)
SAMPLES_PER_INSTRUCTION = 4
EVAL_ANSWERS = 12_000  # Super-NI 119 x 100 + LMentry + Vicuna
EVAL_CHECKPOINTS = 3  # Alpaca, Tuna_p, Tuna
EVAL_PROMPT_LEN = 200
EVAL_NEW_TOKENS = 128
# README's 1-GPU command
LORA = dict(rank=64, alpha=16.0, targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"])


def measure_stage(device, fn, repeats):
    """fn's median seconds (race) and the peak of CUDA memory allocated meanwhile (weights
    included: what must fit), or (None, None) where it ran out of memory (under
    --memory-cap: the stage does not fit)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds = race({"stage": fn}, device, repeats)["stage"]
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None
    return seconds, torch.cuda.max_memory_allocated(device)


def generate_stage(net, device, prompts, new_tokens, per_prompt, temperature):
    """One generation stage of a reproduction: per_prompt rows a prompt, each with its own
    generator when sampling; greedy at temperature 0."""
    generators = None
    if temperature:
        generators = per_row_generators(device, 0, range(len(prompts) * per_prompt))
    model.generate(net, prompts, new_tokens, temperature=temperature, eos_id=-1,
                   num_samples=per_prompt, generator=generators, compile=True)


def reproduction_hours(args, device, repeats, instructions=16, peak=None):
    """Expected hours of each stage of a one-GPU reproduction, from model.py's measured
    per-token costs at the shape `args` (bf16 weights; training with LoRA, as README's
    one-GPU command, gradient checkpointing where training.needs_checkpointing says memory
    needs it; 16 instructions per step as the authors), with each stage's peak memory and
    the settings it ran with. Generation: the compiled decode step (CUDA graphs), as many
    rows as fit (model.auto_batch_rows). Teacher API time is not included. Generation runs
    every row to its length (a random model never ends): its hours are upper bounds for
    those lengths. peak: TFLOP/s, for MFU."""
    torch.manual_seed(0)
    with torch.device(device):
        net = model.Transformer(args)
    net = net.to(torch.bfloat16).eval()
    net.reset_rope(device)  # RoPE tables stay float32
    mean_response = sum(RESPONSE_LENS_K5) // len(RESPONSE_LENS_K5)

    costs = {}
    memory = {}
    settings = {}
    mfu = {}
    # contextual ranking's student samples (batched as in section 4), then eval's greedy
    # answers
    for name, temperature, prompt_len, new_tokens, per_prompt, seed in (
            ("sample", 0.8, PROMPT_LEN, mean_response, SAMPLES_PER_INSTRUCTION, 1),
            ("answer", 0.0, EVAL_PROMPT_LEN, EVAL_NEW_TOKENS, 1, 2)):
        # rows from the memory free now (the last stage's CUDA graphs may hold some); 128 if
        # none reported
        rows = model.auto_batch_rows(net, prompt_len + new_tokens, prompt_len, 128)
        prompt_count = max(1, rows // per_prompt)
        prompts = random_prompts(args.vocab_size, [prompt_len] * prompt_count, seed=seed)
        run = functools.partial(generate_stage, net, device, prompts, new_tokens, per_prompt,
                                temperature)
        seconds, memory[name] = measure_stage(device, run, repeats)
        items = len(prompts) * per_prompt
        # seconds per sample, per greedy answer
        costs[name] = seconds / items if seconds else None
        settings[name] = f"{items} rows (auto), compiled decode step"
    training.add_lora(net, LORA["rank"], LORA["alpha"], LORA["targets"])
    net.train()
    trained = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-6)
    trainable = sum(p.numel() for p in trained)
    for name, lens in (("sft", [mean_response]), ("rank", RESPONSE_LENS_K5)):
        rows, _ = ranking_rows(args.vocab_size, instructions, lens)
        tokens = sum(len(r["tokens"]) for r in rows)
        free = model.free_memory(device)
        checkpointing = training.needs_checkpointing(args, tokens, free, trainable, 2)
        net.gradient_checkpointing = checkpointing
        step = ranking_step(net, rows, False, device, instructions, optimizer)
        seconds, memory[name] = measure_stage(device, step, repeats)
        costs[name] = seconds / tokens if seconds else None  # seconds per trained token
        flops = training.step_flops(net, rows, checkpointing)
        known = seconds and peak  # a measured time and a known peak
        mfu[name] = tuple(f / seconds / (peak * 1e12) for f in flops) if known else None
        settings[name] = (f"LoRA rank {LORA['rank']}, {instructions} instructions per step, "
                          f"gradient checkpointing {'on' if checkpointing else 'off'} (auto)")
    hours = [(name, what, count * costs[key] / 3600 if costs[key] else None, key)
             for name, key, count, what in reproduction_stages(mean_response)]
    return costs, hours, memory, settings, mfu


def reproduction_stages(mean_response):
    """[(stage, the cost it is made of, how many units, what they are)]."""
    sft_row = PROMPT_LEN + mean_response
    # one prefix-shared row per instruction
    rank_tokens = ALPACA * (PROMPT_LEN + sum(RESPONSE_LENS_K5))
    return [("SFT", "sft", ALPACA * SFT_EPOCHS * sft_row,
             f"{ALPACA} x {SFT_EPOCHS} epochs x {sft_row} tokens"),
            ("Tuna_p", "rank", rank_tokens,
             f"{ALPACA} x (prompt + 5 candidates) = {rank_tokens / 1e6:.0f}M tokens"),
            ("student sampling", "sample", ALPACA * SAMPLES_PER_INSTRUCTION,
             f"{ALPACA} x {SAMPLES_PER_INSTRUCTION} samples of {mean_response} tokens"),
            ("Tuna_c", "rank", rank_tokens,
             f"{ALPACA} x (prompt + 4 samples + the teacher's answer)"),
            ("eval", "answer", EVAL_CHECKPOINTS * EVAL_ANSWERS,
             f"{EVAL_CHECKPOINTS} checkpoints x {EVAL_ANSWERS} greedy answers "
             f"of <= {EVAL_NEW_TOKENS} tokens")]


def rate(cost, unit):
    """Seconds per unit as units per second."""
    return f"{1 / cost:.1f} {unit}" if cost else "does not fit"


def mib(size):
    """Bytes as MiB; 0 or less: the measure could not see it."""
    return f"{size / 2**20:.0f} MiB" if size > 0 else "n/a (below resolution)"


def print_reproduction_hours(device, repeats, peak, memory_cap):
    """Section 6 (--config gpu-7b): each stage's hours and peak memory at LLaMA-7B's shape."""
    args = model.ModelArgs.from_name("llama-7b")
    cap = f", memory capped at {memory_cap:g} GiB" if memory_cap else ""
    device_name = torch.cuda.get_device_name(device)
    print(f"bench.py on {device_name}, torch {torch.__version__}: a one-GPU reproduction "
          f"at LLaMA-7B's shape (bf16, LoRA rank {LORA['rank']}){cap}, from measured costs")
    costs, stages, memory, settings, mfu = reproduction_hours(args, device, repeats, peak=peak)
    sft_rate = rate(costs["sft"], "tok/s")
    rank_rate = rate(costs["rank"], "tok/s")
    sample_rate = rate(costs["sample"], "samples/s")
    answer_rate = rate(costs["answer"], "greedy answers/s")
    print(f"measured: train {sft_rate} (SFT rows), {rank_rate} (K=5 prefix-shared rows); "
          f"{sample_rate}; {answer_rate}")
    for key, what in (("sft", "SFT"), ("rank", "ranking")):
        if mfu.get(key):
            plain, recomputed = mfu[key]
            print(f"   {what} training: MFU {plain:.1%}, with recomputation {recomputed:.1%} "
                  f"of {peak:g} TFLOP/s (training.step_flops)")
    for name, what, hours, key in stages:
        used = f"{memory[key] / 2**30:5.1f} GiB peak" if memory[key] else "does not fit"
        spent = f"{hours:7.1f} h" if hours is not None else "      - h"
        print(f"   {name:17s} {spent}   {used}   {what}; {settings[key]}")
    if all(hours is not None for _, _, hours, _ in stages):
        total = sum(h for _, _, h, _ in stages)
        print(f"   {'total':17s} {total:7.1f} h   (teacher API calls not included)")


# ---- 7. the command line

def parse_args():
    description = __doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog="bench.py", description=description)
    parser.add_argument("--config", default=None,
                        help=f"{', '.join(BENCH_CONFIGS)}, gpu-7b or a model.py name "
                        "(default: cpu-small on CPU, gpu-1b on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed repeats per measurement (default 5 CPU, 10 GPU)")
    parser.add_argument("--instructions", type=int, default=0,
                        help="ranking batch (default 1 CPU, 16 GPU)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak TFLOP/s, for MFU "
                        "(default: training.PEAK_TFLOPS by GPU name; none on a CPU)")
    parser.add_argument("--memory-cap", type=float, metavar="GB",
                        help="CUDA: use at most this many GiB "
                        "(torch.cuda.set_per_process_memory_fraction), "
                        "to measure what fits a smaller card")
    parser.add_argument("--memory-probe", choices=["prefix", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--candidates", type=int, default=4, choices=[4, 5],
                        help=argparse.SUPPRESS)
    return parser, parser.parse_args()


def main():
    parser, args = parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    config = args.config or ("gpu-1b" if gpu else "cpu-small")
    known_configs = (*BENCH_CONFIGS, "gpu-7b", *model.CONFIGS)
    if config not in known_configs:  # bad input: one line, never a traceback
        parser.error(f"--config {config}: not one of {', '.join(known_configs)}")
    if importlib.util.find_spec("transformers") is None:
        parser.exit(1, "bench.py: error: transformers is not installed (the comparison needs it): "
                       "pip install -r tests/requirements.txt\n")
    instructions = args.instructions or (16 if gpu else 1)
    if args.memory_probe:
        lens = RESPONSE_LENS if args.candidates == 4 else RESPONSE_LENS_K5
        return memory_probe(config, instructions, lens, args.memory_probe)
    repeats = args.repeats or (10 if gpu else 5)
    if args.memory_cap:
        if not gpu:
            parser.error("--memory-cap needs a CUDA GPU "
                         "(torch.cuda.set_per_process_memory_fraction)")
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, args.memory_cap * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    peak = training.peak_tflops(device, args.peak_tflops)
    if config == "gpu-7b":
        if not gpu:
            sys.exit("bench.py: error: --config gpu-7b needs a CUDA GPU: "
                     "it measures a 7B model's per-token costs there")
        return print_reproduction_hours(device, min(repeats, 3), peak, args.memory_cap)
    net = build(config, device)
    hf = hf_twin(net)
    print_parity(net, hf, config, device)
    print_train_step(net, hf, config, device, repeats, peak)
    hf.cpu()
    del hf
    print_ranking(net, config, device, instructions, repeats)
    print_generation(net, device, repeats)
    print_sampling(net, device, repeats)
    print_bpe_word()


def print_parity(net, hf, config, device):
    """The machine, the model, and that model.py and transformers compute the same logits."""
    gpu = device.type == "cuda"
    a = net.args
    device_name = torch.cuda.get_device_name(device) if gpu else "CPU"
    precision = "bf16 autocast" if gpu else "float32"
    print(f"bench.py on {device_name} ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, config {config}: dim {a.dim}, {a.n_layers} layers, "
          f"{a.n_heads} heads, vocab {a.vocab_size}; {precision}")
    with torch.no_grad():
        probe = torch.randint(3, a.vocab_size, (2, 64), device=device)
        ours = net(probe)
        theirs = hf(input_ids=probe).logits.float()
        gap = (ours - theirs).abs().max().item()
    print(f"same weights: max |logits difference| model.py vs transformers = {gap:.2e}")


def print_train_step(net, hf, config, device, repeats, peak):
    """Section 1: a training step, model.py against transformers, with and without
    grouped-query attention."""
    gpu = device.type == "cuda"
    train_batch = 8 if gpu else 2
    train_seq = 512 if gpu else 256
    rounds = max(repeats, 9)
    a = net.args
    print(f"\n1. train step, batch {train_batch} x {train_seq} tokens (target >= 1.0x):")
    for label, kv_heads in (("multi-head", a.n_heads), ("grouped-query", a.n_heads // 4)):
        multi_head = kv_heads == a.n_heads
        twin_net = net if multi_head else build(config, device, n_kv_heads=kv_heads)
        twin_hf = hf if multi_head else hf_twin(twin_net)
        speed, ratio, (low, high) = bench_train_step(twin_net, twin_hf, device, train_batch,
                                                     train_seq, rounds)
        flops = train_step_flops_per_token(twin_net, train_seq)
        achieved = speed["model.py"] * flops / 1e12  # TFLOP/s
        utilisation = f", MFU {achieved / peak:.1%} of {peak:g}" if peak else ""
        print(f"   {label:13s} ({a.n_heads} query / {kv_heads} key-value heads): "
              f"model.py {speed['model.py']:.0f} tok/s, "
              f"transformers {speed['transformers']:.0f} tok/s -> {ratio:.2f}x "
              f"(median of {rounds} paired rounds, {low:.2f}-{high:.2f}); "
              f"model.py {flops / 1e9:.3f} GFLOP/token "
              f"-> {achieved * 1000:.1f} GFLOP/s{utilisation}")
        del twin_net, twin_hf


def print_ranking(net, config, device, instructions, repeats):
    """Section 2: the ranking step on prefix-shared rows against one row per candidate, K = 4
    and 5."""
    if device.type == "cuda":
        where = " (CUDA max_memory_allocated above the weights)"
    else:
        where = " (RSS peak above the weights, fresh process)"
    print(f"\n2. ranking loss + backward (tuna.py), {instructions} instruction(s), "
          f"prompt {PROMPT_LEN} tokens (target >= 1.4x at K=4){where}")
    for lens in (RESPONSE_LENS, RESPONSE_LENS_K5):
        times, tokens, gap = bench_ranking(net, device, instructions, lens, repeats)
        layouts = ("prefix", "naive")
        memory = {v: peak_memory(config, device, instructions, lens, v) for v in layouts}
        print(f"   K={len(lens)}, responses {lens} tokens (same loss: |difference| {gap:.1e})")
        for v in layouts:
            print(f"      {v:6s}: {times[v] * 1000:7.0f} ms/step, "
                  f"{tokens[v]} tokens in the batch, "
                  f"{instructions / times[v]:.2f} instructions/s, "
                  f"peak memory {mib(memory[v])}")
        speedup = times["naive"] / times["prefix"]
        saving = memory["naive"] / max(memory["prefix"], 1)
        print(f"      prefix sharing: {speedup:.2f}x faster, {saving:.2f}x less memory")


def print_generation(net, device, repeats):
    """Section 3: greedy decoding, eager and compiled, against transformers, at batch 1 and
    8."""
    gpu = device.type == "cuda"
    gen_prompt = 128 if gpu else 32
    gen_new = 128 if gpu else 32
    hf = hf_twin(net)
    net.eval()
    hf.eval()
    print(f"\n3. greedy generation, prompt {gen_prompt} tokens, {gen_new} new tokens "
          "(target >= 2x at batch 1):")
    batch_1 = None
    for batch in (1, 8):
        speed, (same, first), compile_seconds = bench_generation(net, hf, device, batch,
                                                                 gen_prompt, gen_new, repeats)
        if batch == 1:
            batch_1 = speed
        if "error" in model._compiled:
            compiled = f"compiled: unavailable ({model._compiled['error']})"
        else:
            ratio = speed['compiled'] / speed['transformers']
            compiled = (f"compiled {speed['compiled']:.0f} tok/s ({ratio:.2f}x; first call "
                        f"{compile_seconds:.0f} s)")
        eager_ratio = speed["eager"] / speed["transformers"]
        agreement = f"same tokens in {same:.0%} of rows"
        if same != 1:
            agreement += f" (rows part at token {first:.0f}, median)"
        print(f"   batch {batch}: transformers {speed['transformers']:.0f} tok/s; "
              f"model.py eager {speed['eager']:.0f} tok/s ({eager_ratio:.2f}x), {compiled}; "
              f"{agreement}")
    passes, weight_bytes = weight_pass_rate(net, device, repeats)
    # compiled may be missing (unavailable): eager then
    best = max(batch_1.get("compiled", 0), batch_1["eager"])
    print(f"   batch 1 reads all {weight_bytes / 2**20:.0f} MiB of weights a token; "
          f"a pass summing them runs {passes:.0f} times/s here: model.py's best batch-1 "
          f"decode is {best / passes:.2f}x that rate, transformers' "
          f"{batch_1['transformers'] / passes:.2f}x")
    hf.cpu()
    del hf


def print_sampling(net, device, repeats):
    """Section 4: contextual ranking's student sampling, batched against one instruction at
    a time."""
    gpu = device.type == "cuda"
    sample_lens = (64, 192) if gpu else (16, 64)
    sample_new = 128 if gpu else 32
    lengths_generator = torch.Generator().manual_seed(0)
    prompt_lens = torch.randint(*sample_lens, (32,), generator=lengths_generator).tolist()
    prompts = random_prompts(net.args.vocab_size, prompt_lens, seed=3)
    speed, same, rounds = bench_sampling(net, device, prompts, 4, sample_new, max(3, repeats // 2))
    batched = speed["batched"]
    one_at_a_time = speed["one instruction at a time"]
    print(f"\n4. student sampling (teacher.sample_diverse), 32 instructions of "
          f"{sample_lens[0]}-{sample_lens[1]} tokens x 4 samples of {sample_new} tokens, "
          "temperature 0.8, a generator per row (target >= 3x):")
    print(f"   batched (128 rows) {batched:.1f} samples/s, "
          f"one instruction (4 rows) at a time {one_at_a_time:.1f} samples/s "
          f"-> {batched / one_at_a_time:.2f}x; "
          f"same samples for {same:.0%} of instructions; "
          f"diversity rule: {rounds:.1f} rounds per instruction "
          "(mean; samples/s counts the kept 4)")


def print_bpe_word(letters=16_000, repeats=3):
    """Section 5: the byte-level BPE's merge on one long word, against `tokenizers` on the same file."""
    path = real_llama3_tokenizer()
    if path is None:
        print("\n5. byte-level BPE: skipped, no Llama 3 tokenizer.json cached "
              "(python tests/fetch_real_files.py fetches it)")
        return
    times, same = bench_bpe_word(path, letters, repeats)
    print(f"\n5. byte-level BPE, one word of {letters:,} random letters, Llama 3's tokenizer.json "
          f"(median of {repeats}):")
    print(f"   tokenizer.py {times['tokenizer.py']:.3f} s, tokenizers {times['tokenizers']:.3f} s -> "
          f"{times['tokenizer.py'] / times['tokenizers']:.1f}x the time; same ids: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
