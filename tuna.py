"""Tuna: instruction tuning with ranking feedback from LLMs (Li et al., EMNLP 2023), as one explicit loop.

    # the Alpaca baseline
    python tuna.py sft --init LLAMA_DIR --data alpaca_data.json --out runs/alpaca
    # Tuna_p, lr 1e-5
    python tuna.py rank --init runs/alpaca --data ranked.jsonl --out runs/tuna_p
    # Tuna_p, then Tuna
    python tuna.py pipeline --init runs/alpaca --probabilistic-data p.jsonl \
        --contextual-data c.jsonl --out runs/tuna
    # several GPUs
    torchrun --nproc_per_node 8 tuna.py rank ... [--fsdp]
    # after a kill
    python tuna.py rank ... --resume

Read from the top: the method's fixed values, the objective (scores, ranking loss, MLE
term), prefix sharing (an instruction's prompt and its K responses in one row), the
training loop (setup, then one train_step), and below it the plumbing: run folders and
checkpoints, several GPUs, LoRA, the command line.
The whole method offline on a CPU, with a results table: python demo.py --out runs/demo
"""
import argparse
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import model as llama
import tokenizer

# ==== the method's fixed values, with their sources
# The paper's method and the authors' code (LMOps tuna/src/train_tuna.py,
# TrainingArguments; tuna/src/train_tuna.sh): the same for both rankings.
MARGIN = 0.1          # m: the ranking margin, grown linearly with the rank distance d
MLE_WEIGHT = 1.0      # w_mle in L = w_mle * L_MLE + L_rank
LENGTH_PENALTY = 1.0  # s_i = (log-prob sum of r_i) / (its token count) ** LENGTH_PENALTY
MAX_LEN = 512         # tokens of prompt + one response; longer ones are cut on the right
# Tuna_p from SFT, then Tuna_c from Tuna_p
RANK_LR = {"probabilistic": 1e-5, "contextual": 1e-6}
# instructions per step (the authors': per GPU; their GPU count is not stated)
RANK_BATCH_SIZE = 16
RANK_EPOCHS = 1
RANK_WARMUP_STEPS = 2  # linear warm-up, then cosine decay
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.0
# The SFT baseline Tuna starts from: Stanford Alpaca's recipe (its train.py and README).
SFT_LR = 2e-5
SFT_EPOCHS = 3
SFT_BATCH_SIZE = 128
SFT_WARMUP_RATIO = 0.03
# Not set by the authors: the Hugging Face Trainer default their runs and Alpaca's inherit.
GRAD_CLIP = 1.0


# ==== 1. the objective: candidate scores, the ranking loss, the MLE term

def candidate_scores(token_logprobs, token_candidate, num_candidates,
                     length_penalty=LENGTH_PENALTY):
    """s_k = (sum of log p over candidate k's response tokens) / (its token count) ** length_penalty.

    token_logprobs, token_candidate: (B, N), each scored token's log-prob and its
    candidate (-1 = padding, whose log-prob is 0). Returns (B, K). Length normalization,
    exponent 1 (LMOps tuna/src/custom.py, TunaTrainer.compute_loss: token_lprobs)."""
    # column 0 collects the padding, dropped below
    column = token_candidate + 1
    batch_size = token_logprobs.shape[0]
    zeros = token_logprobs.new_zeros(batch_size, num_candidates + 1)
    sums = zeros.scatter_add(1, column, token_logprobs)[:, 1:]
    ones = torch.ones_like(token_logprobs)
    lengths = zeros.scatter_add(1, column, ones)[:, 1:]
    return sums / lengths.clamp(min=1) ** length_penalty


def rank_loss(scores, candidate_mask, margin=MARGIN, pair_counts=None):
    """L_rank = sum over d = 1..K-1 of mean over j of max(0, s_{j+d} - s_j + m*d) (paper,
    "Probabilistic Ranking"; LMOps tuna/src/custom.py, TunaTrainer.compute_loss).

    scores, candidate_mask: (B, K), candidates best first, masked ones (dropped
    duplicates, padding) after the valid ones. "mean over j" is over every valid pair (j,
    j+d) of the whole batch, pooled across instructions: the authors' code flattens the
    (B, K-d) pairs of each d into one nn.MarginRankingLoss (mean); with unequal candidate
    counts we average over the pairs that exist. pair_counts[d-1], when given, is the pair
    count of the whole optimizer step (all micro-batches, all processes), so that
    splitting a batch never changes its loss or gradient."""
    loss = scores.new_zeros(())
    # rank distance d; each term is (B, K-d)
    for d in range(1, scores.shape[1]):
        better = scores[:, :-d]
        worse = scores[:, d:]
        valid = candidate_mask[:, :-d] & candidate_mask[:, d:]
        violation = worse - better + margin * d
        hinge = torch.clamp(violation, min=0) * valid
        if pair_counts is None:
            count = valid.sum().clamp(min=1)
        else:
            count = max(pair_counts[d - 1], 1)
        loss = loss + hinge.sum() / count
    return loss


def mle_loss(token_logprobs, token_candidate, best_only=False, token_count=None):
    """Token-level cross-entropy: mean -log p over the response tokens of all candidates
    (the authors' code: Hugging Face's loss over the B*K rows) or of the best one only (a
    paper reading). token_count, when given, is the count of the whole optimizer step (see
    rank_loss)."""
    # the best candidate is number 0; padding is -1
    used = (token_candidate == 0) if best_only else (token_candidate >= 0)
    if token_count is None:
        count = used.sum().clamp(min=1)
    else:
        count = max(token_count, 1)
    return -(token_logprobs * used).sum() / count


def tuna_loss(token_logprobs, token_candidate, candidate_mask, margin=MARGIN,
              mle_weight=MLE_WEIGHT, length_penalty=LENGTH_PENALTY, mle_best_only=False,
              token_count=None, pair_counts=None):
    """L = w_mle * L_MLE + L_rank -> (L, L_MLE, L_rank). SFT is the case K = 1: no pairs, L = L_MLE."""
    num_candidates = candidate_mask.shape[1]
    scores = candidate_scores(token_logprobs, token_candidate, num_candidates, length_penalty)
    mle = mle_loss(token_logprobs, token_candidate, mle_best_only, token_count)
    rank = rank_loss(scores, candidate_mask, margin, pair_counts)
    return mle_weight * mle + rank, mle, rank


def step_normalizers(examples, mle_best_only=False):
    """(response tokens, pairs per rank distance) of a whole optimizer step, for mle/rank_loss."""
    candidates = [c for e in examples for c in e["candidate"]]
    tokens = sum(1 for c in candidates if c == 0 or not mle_best_only)
    counts = [e["num_candidates"] for e in examples]
    # rank distance d pairs candidate j with j + d: K - d pairs among K candidates
    pairs = [sum(max(k - d, 0) for k in counts) for d in range(1, max(counts))]
    return tokens, pairs


# ==== 2. prefix sharing: an instruction's prompt once, then its K responses, in one row

def pack_example(prompts, responses):
    """One instruction's K candidates as one row: the shared prompt once, then each response.

    prompts[k], responses[k]: candidate k's ids (prompt with BOS, response ending in EOS),
    best first. The prompts are normally identical; where tokenization at the seam
    differed, the shared part is their longest common prefix and each candidate's own rest
    of prompt opens its segment, unscored. Each segment attends to the shared prompt and
    to itself (collate builds that mask) and its positions continue from the prompt's, so
    every response sees exactly what it would see alone in its own row: the naive K-row
    computation without K copies of the prompt. Scored tokens: the logits at row index
    `source` predict `target`, a token of candidate `candidate`."""
    # the prompts' longest common prefix
    shared = 0
    while all(len(p) > shared for p in prompts) and len({p[shared] for p in prompts}) == 1:
        shared += 1
    row = {
        "tokens": list(prompts[0][:shared]),
        "positions": list(range(shared)),
        "segment": [0] * shared,
        "source": [],
        "target": [],
        "candidate": [],
        "num_candidates": len(prompts),
    }
    for k, (prompt, response) in enumerate(zip(prompts, responses)):
        sequence = prompt + response
        # this candidate's segment: the rest of its prompt, then its response
        own = sequence[shared:]
        start = len(row["tokens"])
        # where each token of `sequence` sits in the row
        row_index = list(range(shared)) + list(range(start, start + len(own)))
        row["tokens"] += own
        row["positions"] += range(shared, len(sequence))
        row["segment"] += [k + 1] * len(own)
        # response tokens only are scored
        for p in range(len(prompt), len(sequence)):
            row["source"].append(row_index[p - 1])
            row["target"].append(sequence[p])
            row["candidate"].append(k)
    return row


def collate(rows, pad_id, device="cpu"):
    """Pad packed rows into tensors. mask (B, 1, T, T), True = may attend: causal, and a
    token sees the shared prompt (segment 0) and its own segment only. None (plain causal)
    when no row packs more than one candidate, so one-candidate batches (SFT) keep the
    fast causal attention path."""
    B = len(rows)
    T = max(len(r["tokens"]) for r in rows)
    N = max(len(r["target"]) for r in rows)
    K = max(r["num_candidates"] for r in rows)
    batch = {
        "tokens": torch.full((B, T), pad_id),
        "positions": torch.zeros(B, T, dtype=torch.long),
        "segment": torch.full((B, T), -1),
        "source": torch.zeros(B, N, dtype=torch.long),
        "target": torch.zeros(B, N, dtype=torch.long),
        "candidate": torch.full((B, N), -1),
    }
    for b, row in enumerate(rows):
        for key, padded in batch.items():
            padded[b, :len(row[key])] = torch.tensor(row[key], dtype=torch.long)
    counts = torch.tensor([r["num_candidates"] for r in rows])
    batch["candidate_mask"] = torch.arange(K)[None, :] < counts[:, None]  # (B, K)
    batch = {key: value.to(device) for key, value in batch.items()}
    batch["mask"] = None
    if K > 1:
        segment = batch["segment"]
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        same_segment = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
        shared_prompt = segment[:, None, :] == 0                   # (B, 1, T)
        visible = same_segment | shared_prompt
        batch["mask"] = (causal & visible)[:, None]  # (B, 1, T, T)
    else:
        # the model's default positions: arange
        batch["positions"] = None
    return batch


def score_tokens(model, batch):
    """log p(target | all it may see) of every scored token: (B, N), 0 at padding. Only
    the positions that predict a scored token go through the vocabulary-sized output layer
    (output_positions), which skips prompts and padding, and only a chunk of them at a
    time (model.chunked_token_logprobs)."""
    # chunk by chunk: never the whole (B, N, vocab)
    token_logprobs = model(batch["tokens"], batch["positions"], batch["mask"],
                           output_positions=batch["source"], targets=batch["target"])
    scored = batch["candidate"] >= 0
    return token_logprobs * scored  # (B, N)


# ==== 3. the training loop: one optimizer step, then the loop over steps

def train_step(run, step, batch_rows):
    """One optimizer step on one batch of instructions -> the step's loss terms, gradient norm and lr."""
    # the whole step's token and pair counts: micro-batches and processes then never change the loss
    token_count, pair_counts = step_normalizers(batch_rows, run.args.mle_best_only)
    mine = batch_rows[run.process_rank::run.world_size]
    # loss, MLE, ranking term of the whole step
    parts = torch.zeros(3, device=run.device)
    for i in range(run.micro_batches):
        start = i * len(mine) // run.micro_batches
        stop = (i + 1) * len(mine) // run.micro_batches
        batch = collate(mine[start:stop], run.pad_id, run.device)
        last_micro_batch = i == run.micro_batches - 1
        with gradient_sync(run.wrapped, last_micro_batch):
            with autocast(run):
                # forward: every response token's log-prob; an instruction's candidates share a row
                token_logprobs = score_tokens(run.wrapped, batch)
                # both loss terms: L = w_mle * L_MLE + L_rank
                loss, mle, rank = tuna_loss(
                    token_logprobs, batch["candidate"], batch["candidate_mask"],
                    mle_best_only=run.args.mle_best_only,
                    token_count=token_count, pair_counts=pair_counts)
            # backward: DDP and FSDP average the processes' gradients; the step's loss is their sum
            (loss * run.world_size).backward()
        parts += torch.stack([loss, mle, rank]).detach()
    if run.world_size > 1:
        dist.all_reduce(parts)
    # clip; a non-finite loss or gradient stops the run before it reaches the weights
    grad_norm = clip_gradients(run.net, GRAD_CLIP)
    step_loss = parts[0].item()
    refuse_non_finite(run, step, batch_rows, step_loss, grad_norm)
    # step, at the scheduled learning rate
    lr = learning_rate(step, run.total_steps, run.args.lr, run.warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss, mle, rank = parts.tolist()
    return dict(loss=loss, mle=mle, rank=rank, grad_norm=grad_norm, lr=lr)


def train(args, kind):
    """One stage, checkpoint folder args.init -> checkpoint folder args.out (kind "sft" or "rank")."""
    run = setup(args, kind)
    if run.state == "done":
        log(f"{run.out}: already finished")
        if is_main():
            # left by a kill
            shutil.rmtree(os.path.join(run.out, "checkpoints"), ignore_errors=True)
        return run.out
    # only now: a run that failed in setup() left nothing behind
    if is_main():
        open_run_folder(run)
    layout = f"{run.world_size} process(es) x {run.micro_batches} micro-batch(es)"
    log(f"tuna.py {kind}: {len(run.rows)} examples, {run.total_steps} steps of {args.batch_size} "
        f"({layout}), from step {run.start_step}, in {run.out}")
    began = time.time()
    for step in range(run.start_step, run.total_steps):
        batch_rows = step_rows(run, step)
        values = train_step(run, step, batch_rows)
        record_step(run, step, batch_rows, began, values)
        done = step + 1
        save_due = args.save_every and done % args.save_every == 0
        if save_due and done < run.total_steps:
            save_checkpoint(run, done)
    save_checkpoint(run, run.total_steps, finished=True)
    log(f"saved {run.out}")
    if dist.is_initialized():
        dist.barrier()
    return run.out


@dataclass
class Run:
    """One stage's training, as setup() builds it: what train_step and the loop need."""
    args: argparse.Namespace
    kind: str                   # "sft" or "rank"
    out: str                    # the run folder (becomes the checkpoint folder when finished)
    state: str                  # "new", "resume" or "done" (see run_folder_state)
    settings: dict              # what makes two runs the same run (run.json)
    process_rank: int = 0       # this process among world_size (torchrun)
    world_size: int = 1
    device: torch.device = None
    tokenizer_path: str = ""
    # name -> source path, copied into every checkpoint (tokenizer.Tokenizer.files)
    tokenizer_files: dict = None
    pad_id: int = 0
    rows: list = None           # the packed instructions (load_rows)
    micro_batches: int = 1      # forward passes per process per optimizer step
    steps_per_epoch: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    start_step: int = 0         # > 0 when resumed from a checkpoint
    net: nn.Module = None       # the model (with LoRA adapters, if any)
    # the same model under DDP or FSDP2: what the forward pass calls
    wrapped: nn.Module = None
    optimizer: torch.optim.Optimizer = None
    # matrix products in this dtype; None: in the weights' dtype
    autocast_dtype: torch.dtype = None
    tokens_seen: int = 0        # since this process started (for tokens per second)
    flops_seen: tuple = (0, 0)  # model and hardware FLOPs since then (step_flops), for MFU
    peak_tflops: float = None   # of one device (peak_tflops); None: MFU not reported


def setup(args, kind):
    """Data, model, optimizer and, with --resume, the last checkpoint's state. Writes
    nothing: a run that fails here (bad data, a missing or corrupt checkpoint) leaves no
    trace behind."""
    process_rank, world_size, device = start_processes(args.device)
    out = args.out.rstrip("/")
    settings = run_settings(args, kind)
    # main decides, all follow
    state = broadcast_outcome(lambda: run_folder_state(out, settings, args))
    run = Run(args, kind, out, state, settings, process_rank, world_size, device)
    if run.state == "done":
        return run
    if not os.path.isdir(args.init):
        raise TrainingError(f"--init {args.init}: no such folder")
    # data: every process packs all rows, then takes its share of each batch (train_step)
    # a folder: its tokenizer.model, else tokenizer.json
    tok = tokenizer.Tokenizer(args.tokenizer or args.init)
    run.tokenizer_files = tok.files
    run.tokenizer_path = tok.path
    run.pad_id = tok.pad_id
    run.rows = load_rows(args.data, tok, kind)
    micro_batch_size = plan_steps(run)
    # model: from the last checkpoint when resumed (LoRA: the base model, then the adapters' state)
    checkpoint = latest_checkpoint(out) if run.state == "resume" else None
    state = read_training_state(checkpoint) if checkpoint else None
    net = load_model(run, tok, checkpoint, state)
    run.peak_tflops = peak_tflops(device, args.peak_tflops)
    checkpointing = broadcast_outcome(lambda: choose_checkpointing(run, net, micro_batch_size))
    net.gradient_checkpointing = checkpointing
    run.net = net
    run.wrapped = wrap_model(net, world_size, device, args.fsdp)
    run.optimizer = make_optimizer(net, args, device)
    if state:
        restore_training_state(run, state)
    return run


def load_rows(path, tok, kind):
    """Packed rows of an Alpaca JSON (kind "sft": one candidate, the reference output) or
    a ranked file (.jsonl: the project's format; .json: the authors' release, whose
    records with an empty output or a non-finite score are skipped and named). A candidate
    that cannot keep one response token within MAX_LEN is dropped; the rest keep their
    order. A candidate that a token limit cut when it was generated (source["unfinished"])
    is trained without EOS: the model must not learn to stop there."""
    rows = []
    dropped = 0
    skipped = 0
    for record_id, prompt, candidates, unfinished in read_records(path, kind):
        pairs = []
        for k, candidate in enumerate(candidates):
            finished = k not in unfinished
            pair = data.encode_prompt_response(tok, prompt, candidate, MAX_LEN, finished=finished)
            pairs.append(pair)
        kept = [p for p in pairs if p is not None]
        dropped += len(pairs) - len(kept)
        if not kept:
            skipped += 1
            continue
        prompt_ids = [ids for ids, _ in kept]
        response_ids = [ids for _, ids in kept]
        row = pack_example(prompt_ids, response_ids)
        row["id"] = record_id
        rows.append(row)
    if dropped:
        log(f"{path}: {dropped} candidate(s) dropped, {skipped} record(s) skipped: "
            f"prompt longer than {MAX_LEN} tokens")
    if not rows:
        raise data.DataError(f"{path}: no usable record")
    return rows


def read_records(path, kind):
    """(id, prompt, candidates best first, indices of unfinished candidates) of each record."""
    if kind == "sft":
        records = []
        for i, example in enumerate(data.read_alpaca(path)):
            prompt = data.alpaca_prompt(example["instruction"], example["input"])
            records.append((str(i), prompt, [example["output"]], []))
        return records
    if str(path).endswith(".jsonl"):
        ranked = data.read_ranked_jsonl(path)
        return [(r.id, r.prompt, r.candidates, r.source.get("unfinished", [])) for r in ranked]
    bad = []
    ranked = data.read_authors_ranking(path, skipped=bad)
    if bad:
        log(f"{path}: {len(bad)} record(s) skipped, e.g. " + "; ".join(bad[:3]))
    return [(r.id, r.prompt, r.candidates, []) for r in ranked]


def plan_steps(run):
    """Micro-batches per step, steps per epoch and in all, warm-up steps; -> the micro-batch size."""
    args = run.args
    processes = run.world_size
    micro_batch_size = args.micro_batch_size or math.ceil(args.batch_size / processes)
    run.micro_batches = math.ceil(args.batch_size / (processes * micro_batch_size))
    full_batches, rest = divmod(len(run.rows), args.batch_size)
    # a last, partial batch counts if every micro-batch of every process gets a row; else dropped
    run.steps_per_epoch = full_batches + (rest >= processes * run.micro_batches)
    run.total_steps = min(run.steps_per_epoch * args.epochs, args.max_steps or math.inf)
    if run.total_steps == 0:
        smallest_batch = min(args.batch_size, processes * run.micro_batches)
        raise TrainingError(f"{args.data}: {len(run.rows)} usable example(s), "
                            f"fewer than one batch of {smallest_batch}")
    if run.kind == "rank":
        run.warmup_steps = RANK_WARMUP_STEPS
    else:
        run.warmup_steps = round(SFT_WARMUP_RATIO * run.total_steps)
    return micro_batch_size


def load_model(run, tok, checkpoint, state):
    """The model in --precision's dtype, LoRA adapters added if asked, in training mode."""
    args = run.args
    weights_dtype, autocast_dtype = PRECISIONS[args.precision]
    if args.autocast and autocast_dtype is None:
        raise TrainingError(f"--autocast needs --precision bf16-mixed (not {args.precision})")
    # bf16-mixed autocasts on CUDA; --autocast / --no-autocast choose on any device
    # (--autocast on a CPU runs the CUDA path there, so tests can compare it)
    if on_cuda_unless_told(args.autocast, run.device):
        run.autocast_dtype = autocast_dtype
    # LoRA resumes from the base model: the adapters' state is in training_state.pt
    start_from = checkpoint if checkpoint and not args.lora_rank else args.init
    net = llama.load_checkpoint(start_from, run.device, weights_dtype)
    check_fits(net, tok, run)
    if args.lora_rank:
        targets = args.lora_targets.split(",")
        add_lora(net, args.lora_rank, args.lora_alpha, targets)
        if state:
            net.load_state_dict(state["lora"], strict=False)
    net.train()
    return net


def make_optimizer(net, args, device):
    """AdamW (the authors' optim=adamw_torch) over the trainable weights; the fused kernel
    on CUDA, or where --fused-adam / --no-fused-adam say."""
    params = [p for p in net.parameters() if p.requires_grad]
    fused = on_cuda_unless_told(args.fused_adam, device)
    return torch.optim.AdamW(params, lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                             weight_decay=WEIGHT_DECAY, fused=fused)


def step_rows(run, step):
    """The instructions of one optimizer step: each epoch a shuffle that depends on the
    seed and the epoch only, so a resumed run sees exactly the batches an uninterrupted
    one would have seen."""
    epoch, index = divmod(step, run.steps_per_epoch)
    shuffle = torch.Generator().manual_seed(run.args.seed + epoch)
    order = torch.randperm(len(run.rows), generator=shuffle)
    batch_size = run.args.batch_size
    start = index * batch_size
    chosen = order[start:start + batch_size].tolist()
    return [run.rows[i] for i in chosen]


def learning_rate(step, total_steps, peak_lr, warmup_steps):
    """Linear warm-up, then cosine decay towards 0 (the authors' Hugging Face cosine
    schedule; step is 0-based). HF's first step has lr 0; ours has peak/warmup, so no step
    is spent without moving."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_gradients(net, max_norm):
    """The total gradient norm (every shard under FSDP); clips the gradients to max_norm."""
    params = [p for p in net.parameters() if p.requires_grad]
    # max_norm 0: measured, not clipped
    limit = max_norm if max_norm > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    # FSDP2: a sharded DTensor
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def refuse_non_finite(run, step, batch_rows, loss, grad_norm):
    """A NaN or inf stops the run before the update, naming the step, its records and
    the last good checkpoint."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    record_ids = [r["id"] for r in batch_rows][:8]
    last_good = latest_checkpoint(run.out) or run.args.init
    raise TrainingError(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step + 1} "
                        f"(records {record_ids}...); stopped before the update; "
                        f"last good checkpoint: {last_good}")


# --precision -> (weights' and optimizer's dtype, autocast dtype)
PRECISIONS = {
    # float32 weights, bfloat16 matrix products (by default on CUDA only:
    # a CPU computes in float32, see --autocast)
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "fp32": (torch.float32, None),
    # bfloat16 weights: half the memory, coarser updates
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
}


def on_cuda_unless_told(flag, device):
    """The flag if given, else on CUDA only (autocast, the fused AdamW kernel)."""
    return device.type == "cuda" if flag is None else flag


def choose_checkpointing(run, net, micro_batch_size):
    """--gradient-checkpointing on, off, or auto: needs_checkpointing for the largest
    micro-batch this run can meet (micro_batch_size rows, each padded to the longest row),
    logged with its figures."""
    choice = run.args.gradient_checkpointing
    if choice != "auto":
        return choice == "on"
    tokens = micro_batch_size * max(len(r["tokens"]) for r in run.rows)
    # activations are kept in autocast's dtype where the step autocasts (load_model decides)
    if run.autocast_dtype is not None:
        dtype_bytes = run.autocast_dtype.itemsize
    else:
        dtype_bytes = net.tok_embeddings.weight.element_size()
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    free = llama.free_memory(run.device)
    on = needs_checkpointing(net.args, tokens, free, trainable, dtype_bytes)
    kept = activation_bytes(net.args, tokens, False, dtype_bytes)
    switch = "on" if on else "off"
    kept_gib = kept / 2**30
    free_gib = free / 2**30
    log(f"gradient checkpointing {switch} (auto): {tokens} tokens per micro-batch keep about "
        f"{kept_gib:.1f} GiB of activations without it; {free_gib:.1f} GiB free on {run.device.type}")
    return on


def autocast(run):
    """Matrix products in run.autocast_dtype; weights and optimizer keep their dtype."""
    if run.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(run.device.type, dtype=run.autocast_dtype)


def record_step(run, step, batch_rows, began, values):
    """Each step's loss terms to OUT/metrics.jsonl; a console line every --log-every steps."""
    if not is_main():
        return
    tokens = sum(len(r["tokens"]) for r in batch_rows)
    recompute = run.net.gradient_checkpointing
    model_flops, hardware_flops = step_flops(run.net, batch_rows, recompute)
    run.tokens_seen += tokens
    model_flops_seen = run.flops_seen[0] + model_flops
    hardware_flops_seen = run.flops_seen[1] + hardware_flops
    run.flops_seen = (model_flops_seen, hardware_flops_seen)
    elapsed = time.time() - began
    speed = dict(tokens_per_s=run.tokens_seen / elapsed,
                 model_flops_per_token=model_flops / tokens,
                 hardware_flops_per_token=hardware_flops / tokens)
    # the FLOPs done so far over what all processes' devices could do in that time
    if run.peak_tflops:
        peak = run.peak_tflops * 1e12 * run.world_size * elapsed
        speed.update(mfu=model_flops_seen / peak, hfu=hardware_flops_seen / peak)
    metrics = dict(step=step + 1, epoch=step // run.steps_per_epoch, **values,
                   tokens=tokens, **speed, elapsed_s=elapsed)
    data.append_jsonl(os.path.join(run.out, "metrics.jsonl"), [metrics])
    done = step + 1
    if done % run.args.log_every and done != run.total_steps:
        return
    eta = elapsed / (done - run.start_step) * (run.total_steps - done)
    mfu = ""
    if run.peak_tflops:
        mfu = f", MFU {speed['mfu']:.1%} (with recomputation {speed['hfu']:.1%})"
    gflop_per_token = model_flops / tokens / 1e9
    log(f"step {done}/{run.total_steps} | loss {values['loss']:.4f} (mle {values['mle']:.4f}, "
        f"rank {values['rank']:.4f}) | lr {values['lr']:.2e} | "
        f"{speed['tokens_per_s']:.0f} tok/s x {gflop_per_token:.3g} GFLOP/token{mfu} | "
        f"ETA {data.duration_text(eta)}")


# ---- speed (MFU) and memory: FLOPs of a step, activations, when to recompute them
# Peak dense (no sparsity) bf16 tensor-core TFLOP/s from the vendors' datasheets, matched
# in this order against torch.cuda.get_device_name (H100 PCIe before H100, L40S and L40
# before L4); --peak-tflops supplies or overrides it.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX A6000", 154.8),
)
# Share of free memory the training step may take (the rest: the allocator's
# fragmentation, small tensors)
TRAINING_MEMORY_SHARE = 0.9


def peak_tflops(device, override=None):
    """Peak bf16 TFLOP/s: the override, else PEAK_TFLOPS by name; None where unknown (a CPU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for known, tflops in PEAK_TFLOPS if known in name), None)


def step_flops(net, rows, recompute):
    """(model FLOPs, hardware FLOPs) of a training step on packed rows: 2 per multiply-add
    of the matrix products (norms, RoPE, softmax and the optimizer left out). Per token,
    forward: every linear layer of the blocks (LoRA's A and B included) and attention (q
    k^T and the weighted sum of v over the keys the token sees: its position + 1, exact
    under prefix sharing's mask); the output layer only for scored tokens. Backward: the
    gradient of every activation (the forward's work again; attention's twice), plus the
    weights' gradients of trainable layers only (a frozen base under LoRA has none). Full
    fine-tuning is so PaLM's 6N + attention (Chowdhery et al. 2022, appendix B); LoRA's
    frozen base 4N. Model FLOPs give the MFU; hardware FLOPs add what is computed again:
    the blocks' forward under gradient checkpointing (`recompute`) and, where the step
    scores more tokens than one chunk (model.LOGPROB_CHUNK_TOKENS), the output layer's
    (model.chunked_token_logprobs recomputes its chunks in backward)."""
    # multiply-adds per token in the blocks' linear layers
    frozen = 0
    trainable = 0
    for module in net.layers.modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            trainable += module.in_features * module.out_features
        elif isinstance(module, nn.Linear):
            frozen += module.in_features * module.out_features
        elif isinstance(module, LoRALinear):
            trainable += module.lora_a.numel() + module.lora_b.numel()
    shape = net.args
    tokens = sum(len(r["tokens"]) for r in rows)
    keys_seen = sum(p + 1 for r in rows for p in r["positions"])
    attention = 2 * shape.n_layers * shape.n_heads * shape.head_dim * keys_seen
    scored = sum(len(r["target"]) for r in rows)
    output = net.output.in_features * net.output.out_features * scored
    blocks = (frozen + trainable) * tokens + attention
    forward = blocks + output
    output_weights = output * net.output.weight.requires_grad
    backward = forward + attention + trainable * tokens + output_weights
    again = 0
    if recompute:
        again += blocks
    if scored > llama.LOGPROB_CHUNK_TOKENS:
        again += output
    return 2 * (forward + backward), 2 * (forward + backward + again)


def activation_bytes(args, tokens, checkpointing, activation_dtype_bytes):
    """What autograd keeps for backward in a step of `tokens` tokens (an estimate). Per
    token and block: Korthikanti et al. 2022 (section 4.1) count 34 x dim bytes at 16-bit
    activations for a GPT block with fused attention (no attention scores kept); with its
    4 x dim GeLU terms (16 x dim) replaced by SwiGLU's four hidden-sized tensors (gate, its
    SiLU, up, product) that is (9 x dim + 4 x hidden_dim) activations, plus the two
    RMSNorms' float32 inputs (model.py normalises in float32). Gradient checkpointing keeps
    each block's float32 input instead, and one block's whole set while it is recomputed."""
    activations = 9 * args.dim + 4 * args.hidden_dim
    norm_inputs = 2 * 4 * args.dim
    per_block = activations * activation_dtype_bytes + norm_inputs
    if checkpointing:
        return tokens * (args.n_layers * 4 * args.dim + per_block)
    return tokens * args.n_layers * per_block


def needs_checkpointing(args, tokens, free_bytes, trainable_params, activation_dtype_bytes):
    """--gradient-checkpointing auto: on when the activations of `tokens` tokens without it
    exceed what is left of TRAINING_MEMORY_SHARE of free memory (measured with the weights
    loaded) once the trainable parameters' float32 gradients and Adam's two moments (12
    bytes each) are allocated."""
    budget = free_bytes * TRAINING_MEMORY_SHARE - trainable_params * 12
    without = activation_bytes(args, tokens, False, activation_dtype_bytes)
    return without > budget


# ==== 4. run folders and checkpoints: what a run writes, and how it resumes
# OUT is the run folder from the first step on: run.json (the settings), metrics.jsonl,
# and the newest checkpoints/step-N (each written to step-N.tmp and renamed: whole or
# absent). When the run ends, the final weights are written into OUT itself, config.json
# last, so OUT/config.json marks a finished run.

class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says which file, step or setting."""


def run_settings(args, kind):
    """What makes two runs the same run, recorded in OUT/run.json: the settings that
    change the math (the micro-batch size and the process count do not, see rank_loss),
    the method's constants, and the data file's SHA-256, so that --resume never continues
    a run on other data."""
    names = ("lr", "epochs", "max_steps", "batch_size", "seed", "precision",
             "lora_rank", "lora_alpha", "lora_targets", "mle_best_only")
    settings = {name: getattr(args, name) for name in names}
    return dict(
        kind=kind,
        init=os.path.abspath(args.init),
        data=os.path.abspath(args.data),
        data_sha256=data.file_sha256(args.data),
        **settings,
        margin=MARGIN,
        mle_weight=MLE_WEIGHT,
        length_penalty=LENGTH_PENALTY,
        max_len=MAX_LEN,
        grad_clip=GRAD_CLIP,
    )


def run_folder_state(out, settings, args):
    """What to do with OUT, without changing it: "new" (absent, or --overwrite), "resume"
    (--resume on an unfinished run with the same settings) or "done" (--resume on a
    finished one). Anything else is refused: an existing run is never replaced silently."""
    if not os.path.exists(out) or args.overwrite:
        return "new"
    if not args.resume:
        raise TrainingError(f"{out} already exists: pass --resume to continue its run "
                            "or --overwrite to start over")
    stored = os.path.join(out, "run.json")
    if not os.path.isfile(stored):
        raise TrainingError(f"{out} is not a run folder of tuna.py (no run.json): "
                            "pass --overwrite to replace it, or choose another --out")
    try:
        with open(stored, encoding="utf-8") as f:
            previous = json.load(f)
    except ValueError as e:
        raise TrainingError(f"{stored}: not readable JSON ({e}); use --overwrite to start over") from None
    keys = set(previous) | set(settings)
    changed = sorted(k for k in keys if previous.get(k) != settings.get(k))
    if changed:
        names = ", ".join(changed)
        raise TrainingError(f"{stored}: this run was started with other settings ({names}); "
                            "use --overwrite to start over")
    finished = os.path.isfile(os.path.join(out, "config.json"))
    return "done" if finished else "resume"


def open_run_folder(run):
    """A new run: OUT (an --overwrite'n one removed first) with run.json. A resumed one:
    its metrics from after the checkpoint are forgotten, as the steps that made them are
    trained again."""
    metrics = os.path.join(run.out, "metrics.jsonl")
    if run.state == "new":
        if os.path.isdir(run.out):
            shutil.rmtree(run.out)
        elif os.path.exists(run.out):
            os.remove(run.out)
        os.makedirs(os.path.join(run.out, "checkpoints"))
        settings = json.dumps(run.settings, indent=2)
        data.write_atomic(os.path.join(run.out, "run.json"), settings)
    else:
        records = [r for _, r in data.read_jsonl_log(metrics)]
        kept = [r for r in records if r.get("step", 0) <= run.start_step]
        data.write_atomic(metrics, (json.dumps(r) + "\n" for r in kept))


def latest_checkpoint(out):
    """The newest whole checkpoints/step-N of run folder `out`, or None."""
    folder = os.path.join(out, "checkpoints")
    if not os.path.isdir(folder):
        return None
    names = os.listdir(folder)
    # a .tmp folder is one a kill interrupted
    steps = sorted(n for n in names if n.startswith("step-") and not n.endswith(".tmp"))
    return os.path.join(folder, steps[-1]) if steps else None


def read_training_state(checkpoint):
    path = os.path.join(checkpoint, "training_state.pt")
    try:
        return torch.load(path, weights_only=True, mmap=True)
    # torch's messages do not name the file
    except Exception as e:
        raise TrainingError(f"{path}: cannot read the training state ({type(e).__name__}: {e}); "
                            f"remove {checkpoint} to resume from the checkpoint before it") from None


def restore_training_state(run, state):
    """Optimizer moments, random states, step: the run goes on exactly where it stopped."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(run.wrapped, run.optimizer, state["optimizer"], options=options)
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    run.start_step = state["step"]


def check_fits(net, tok, run):
    """Token ids and the longest packed row must fit the model: an error, not an index error."""
    shape = net.args
    if tok.vocab_size > shape.vocab_size:
        raise TrainingError(f"{run.tokenizer_path}: {tok.vocab_size} tokens, "
                            f"but {run.args.init} has {shape.vocab_size} embeddings")
    longest = max(run.rows, key=lambda r: max(r["positions"]))
    positions = max(longest["positions"]) + 1
    if positions > shape.max_seq_len:
        raise TrainingError(f"{run.args.data}: record {longest['id']!r} needs {positions} positions, "
                            f"more than {run.args.init}'s max_seq_len {shape.max_seq_len}")


def save_checkpoint(run, step, finished=False):
    """HF checkpoint (config.json last) + the tokenizer's files + training_state.pt
    (optimizer, step, data position, random states). A step checkpoint goes to
    checkpoints/step-N.tmp, renamed when whole, and replaces the older ones; the final one
    goes into OUT itself. Every process calls it (FSDP gathers)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(run.wrapped, options=options)
    optimizer_state = None
    if not finished:
        optimizer_state = get_optimizer_state_dict(run.wrapped, run.optimizer, options=options)
    if not is_main():
        return
    checkpoints = os.path.join(run.out, "checkpoints")
    name = f"step-{step:08d}"
    folder = run.out if finished else os.path.join(checkpoints, name + ".tmp")
    if not finished:
        # a half-written one left by a kill
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
    for file_name, source in run.tokenizer_files.items():
        shutil.copyfile(source, os.path.join(folder, file_name))
    state = training_state(run, step, finished, optimizer_state, model_state)
    torch.save(state, os.path.join(folder, "training_state.pt"))
    # weights, then config.json
    llama.save_hf_checkpoint(plain_model(run.net, model_state), folder)
    if finished:
        shutil.rmtree(checkpoints, ignore_errors=True)
        return
    os.rename(folder, os.path.join(checkpoints, name))
    # keep only the newest
    for older in os.listdir(checkpoints):
        if older != name:
            shutil.rmtree(os.path.join(checkpoints, older))


def training_state(run, step, finished, optimizer_state, model_state):
    """training_state.pt: what --resume needs beyond the weights (the LoRA adapters too)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    epoch, batches_done = divmod(step, run.steps_per_epoch)
    position = dict(epoch=epoch, batches_done_in_epoch=batches_done, seed=run.args.seed)
    lora = {k: v for k, v in model_state.items() if k.endswith((".lora_a", ".lora_b"))}
    return {
        "step": step,
        "finished": finished,
        "optimizer": optimizer_state,
        "rng": rng,
        "data_position": position,
        "lora": lora,
    }


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def log(message):
    if is_main():
        print(message, file=sys.stderr, flush=True)


# ==== 5. several processes (torchrun): start them, share decisions, wrap the model

def start_processes(device_name=None):
    """-> (process rank, world size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK;
    NCCL on GPUs, gloo on CPUs."""
    cuda = torch.cuda.is_available() and device_name != "cpu"
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    # this process's GPU on its machine
    gpu_index = int(os.environ.get("LOCAL_RANK", 0))
    default_device = f"cuda:{gpu_index}" if cuda else "cpu"
    device = torch.device(device_name or default_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        return 0, 1, device
    return dist.get_rank(), dist.get_world_size(), device


def broadcast_outcome(decide):
    """decide() on the main process, its result (or its error) on every process."""
    try:
        outcome = ("ok", decide()) if is_main() else None
    except (TrainingError, OSError, ValueError) as e:
        outcome = ("error", str(e))
    if dist.is_initialized():
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if outcome[0] == "error":
        raise TrainingError(outcome[1])
    return outcome[1]


def wrap_model(net, world_size, device, fsdp):
    """DDP replicates the model on every GPU; FSDP2 (fully_shard, one unit per block)
    shards weights, gradients and optimizer state over the GPUs, for models that do not
    fit one."""
    if world_size == 1:
        return net
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world_size,))
        for block in net.layers:
            fully_shard(block, mesh=mesh)
        return fully_shard(net, mesh=mesh)
    device_ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=device_ids)


def gradient_sync(wrapped, enabled):
    """Gradient accumulation: processes reduce gradients at a step's last micro-batch only."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return nullcontext() if enabled else wrapped.no_sync()
    # FSDP2
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(enabled)
    return nullcontext()


# ==== 6. LoRA (Hu et al. 2021): low-rank adapters on frozen weights, merged when saved

class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x with W frozen, A (r, in) random, B (out, r) zero:
    training starts exactly at W and only A, B (and their Adam moments) take memory, so a
    7B model fits one GPU."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        base.weight.requires_grad_(False)
        device = base.weight.device
        # float32
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        # as nn.Linear initialises its weight
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x):
        x_adapter = x.to(self.lora_a.dtype)
        down = F.linear(x_adapter, self.lora_a)  # (..., r)
        update = F.linear(down, self.lora_b)     # (..., out)
        return self.base(x) + (self.scale * update).to(x.dtype)


def add_lora(net, rank, alpha, targets):
    """Freeze every weight, then wrap the named linear layers of every block (e.g. wq, wv, w1)."""
    net.requires_grad_(False)
    for block in net.layers:
        for parent in (block.attention, block.feed_forward):
            for name in targets:
                layer = getattr(parent, name, None)
                if isinstance(layer, nn.Linear):
                    setattr(parent, name, LoRALinear(layer, rank, alpha))


def plain_model(net, state):
    """A plain model.Transformer with `state` (LoRA merged), for model.save_hf_checkpoint."""
    merged = {}
    for key, tensor in state.items():
        if key.endswith((".lora_a", ".lora_b")):
            continue
        if key.endswith(".base.weight"):
            prefix = key[: -len("base.weight")]
            lora = net.get_submodule(prefix[:-1])
            a = state[prefix + "lora_a"]
            b = state[prefix + "lora_b"]
            update = lora.scale * b.float() @ a.float()
            tensor = (tensor.float() + update).to(tensor.dtype)
            key = prefix + "weight"
        merged[key] = tensor
    with torch.device("meta"):
        plain = llama.Transformer(net.args)
    plain.load_state_dict(merged, strict=True, assign=True)
    # buffers not in the state dict
    plain.reset_rope(plain.tok_embeddings.weight.device)
    if net.args.tie_embeddings:
        plain.output.weight = plain.tok_embeddings.weight
    return plain


# ==== 7. pipeline and command line: Tuna_p then Tuna_c in one command; the flags

def run_pipeline(args):
    """Tuna = probabilistic ranking (lr 1e-5) from the SFT model, then contextual ranking
    (lr 1e-6) from Tuna_p on candidates sampled from Tuna_p (the paper's sequential
    recipe). OUT/tuna_p and OUT/tuna are ordinary stage outputs; --resume skips a finished
    stage."""
    out = args.out.rstrip("/")
    contextual = args.contextual_data or os.path.join(out, "contextual.jsonl")
    # built from this Tuna_p on every run (teacher.py's caches make that free when nothing
    # changed), so that the samples of an older Tuna_p are never trained on after a
    # retraining
    build_contextual = not args.contextual_data
    teacher_given = args.instructions and args.teacher_base_url and args.teacher_model
    if build_contextual and not teacher_given:
        raise TrainingError("pipeline: give --contextual-data, or --instructions, "
                            "--teacher-base-url and --teacher-model "
                            "to build it from Tuna_p's samples with teacher.py")
    # hours of sampling would time out the other processes
    if build_contextual and "RANK" in os.environ:
        raise TrainingError("pipeline: under torchrun, build the contextual data first "
                            "and pass --contextual-data")
    tuna_p = os.path.join(out, "tuna_p")
    command = contextual_command(args, contextual, tuna_p) if build_contextual else None
    if args.dry_run:
        return pipeline_dry_run(args, command)
    # the teacher is asked only after hours of training: check it first (reachable, key, model, chat)
    if build_contextual and subprocess.run(command + ["--preflight-only"]).returncode != 0:
        raise TrainingError("pipeline: the contextual teacher failed its pre-flight check (above); "
                            "nothing was trained")
    stage = argparse.Namespace(**vars(args))
    stage.__dict__.update(out=tuna_p, data=args.probabilistic_data, lr=args.lr_probabilistic)
    tuna_p = train(stage, "rank")
    if build_contextual:
        log("pipeline: " + " ".join(shlex.quote(c) for c in command))
        if subprocess.run(command).returncode != 0:
            raise TrainingError(f"pipeline: teacher.py contextual failed; {out}/tuna_p is finished, "
                                "rerun with --resume")
    # Tuna_c from Tuna_p, whose checkpoint folder holds the tokenizer
    tuna = os.path.join(out, "tuna")
    stage.__dict__.update(init=tuna_p, out=tuna, data=contextual, lr=args.lr_contextual,
                          tokenizer=None)
    return train(stage, "rank")


def contextual_command(args, contextual, tuna_p):
    """`teacher.py contextual`: Tuna_p samples answers, the teacher ranks them into `contextual`."""
    teacher_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "teacher.py")
    return [
        sys.executable, teacher_py, "contextual",
        "--data", args.instructions,
        "--out", contextual,
        "--base-url", args.teacher_base_url,
        "--model", args.teacher_model,
        "--student", tuna_p,
        "--student-batch-size", str(args.student_batch_size),
        *shlex.split(args.teacher_args),
    ]


def pipeline_dry_run(args, command):
    """What the contextual teacher will be sent and cost; nothing trained, nothing sent."""
    if command is None:
        log("pipeline --dry-run: --contextual-data is given, so no teacher request would be sent")
        return None
    log("pipeline --dry-run: Tuna_p and Tuna are not trained; the contextual teacher's requests:")
    # the cost options given, passed on to teacher.py
    prices = []
    for name in ("count_tokenizer", "price_per_1m_input", "price_per_1m_output"):
        value = getattr(args, name)
        # a price of 0 is a price
        if value is not None:
            prices.append(f"--{name.replace('_', '-')}={value}")
    if subprocess.run(command + ["--dry-run", *prices]).returncode != 0:
        raise TrainingError("pipeline --dry-run: teacher.py contextual --dry-run failed (above)")
    return None


def add_training_arguments(p, kind):
    """The flags a user changes: paths, length of training, batch, LoRA, precision, run
    folder, logging, processes. The method's fixed values are the constants at the top of
    this file."""
    if kind == "sft":
        lr, epochs, batch_size = SFT_LR, SFT_EPOCHS, SFT_BATCH_SIZE
    else:
        lr, epochs, batch_size = RANK_LR["probabilistic"], RANK_EPOCHS, RANK_BATCH_SIZE
    p.add_argument("--init", required=True,
                   help="checkpoint folder to start from (HF or Meta layout)")
    p.add_argument("--out", required=True,
                   help="run folder; the checkpoint (HF layout, the tokenizer's files beside) "
                   "when finished")
    if kind != "pipeline":
        p.add_argument("--data", required=True,
                       help="Alpaca JSON (sft); ranked .jsonl or the authors' .json")
        p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json (default: the one in --init)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many steps (0: all epochs)")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"instructions per optimizer step, all processes (default {batch_size})")
    p.add_argument("--micro-batch-size", type=int, default=0,
                   help="instructions per forward pass (0: whole batch); changes memory, not the loss")
    p.add_argument("--seed", type=int, default=42, help="data order and LoRA initialisation")
    p.add_argument("--precision", choices=list(PRECISIONS), default="bf16-mixed",
                   help="bf16-mixed: float32 weights, bfloat16 autocast on CUDA "
                   "(float32 on a CPU, unless --autocast)")
    p.add_argument("--autocast", action=argparse.BooleanOptionalAction,
                   help="bf16-mixed's bfloat16 autocast (default: on CUDA only)")
    p.add_argument("--fused-adam", action=argparse.BooleanOptionalAction,
                   help="AdamW's fused kernel (default: on CUDA only)")
    p.add_argument("--gradient-checkpointing", nargs="?", const="on", default="auto",
                   choices=["auto", "on", "off"],
                   help="recompute activations in backward: on, off, or auto (default): "
                   "on when the activations of the largest micro-batch would not fit in free memory "
                   "(tuna.needs_checkpointing)")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's peak TFLOP/s, for the MFU in the log "
                   "(default: tuna.PEAK_TFLOPS by GPU name; none on a CPU)")
    p.add_argument("--lora-rank", type=int, default=0, help="0: train all weights")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="wq,wk,wv,wo,w1,w2,w3")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT (or skip it if finished)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--save-every", type=int, default=500,
                   help="a checkpoint every N steps (0: none)")
    p.add_argument("--log-every", type=int, default=1, help="a console line every N steps")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK if available, else cpu")
    # a README faithfulness note: the authors' code puts MLE on every candidate
    if kind != "sft":
        p.add_argument("--mle-best-only", action="store_true",
                       help="MLE on the best candidate only "
                       "(a paper reading; default: all candidates, as the authors' code)")
    else:
        p.set_defaults(mle_best_only=False)


def add_pipeline_arguments(p):
    add_training_arguments(p, "pipeline")
    p.add_argument("--probabilistic-data", required=True, help="ranked file for Tuna_p")
    p.add_argument("--lr-probabilistic", type=float, default=RANK_LR["probabilistic"])
    p.add_argument("--lr-contextual", type=float, default=RANK_LR["contextual"])
    p.add_argument("--contextual-data",
                   help="ranked file for Tuna_c; if absent, built from OUT/tuna_p's samples "
                   "by `teacher.py contextual` with the --teacher-* options")
    p.add_argument("--instructions",
                   help="Alpaca JSON: what Tuna_p answers for contextual ranking")
    p.add_argument("--teacher-base-url",
                   help="OpenAI-compatible API of the ranking teacher, e.g. GPT-4's")
    p.add_argument("--teacher-model", help="teacher model name")
    p.add_argument("--student-batch-size", type=data.rows_option, default="auto",
                   help="rows of Tuna_p's samples decoding together; "
                   "auto (default): as many as fit in free GPU memory")
    p.add_argument("--teacher-args", default="",
                   help="more `teacher.py contextual` options ('--limit 9')")
    data.add_cost_arguments(p, "print the contextual teacher's requests, tokens and cost "
                            "(teacher.py contextual --dry-run); train nothing, send nothing")


# name -> (help, add arguments, run)
SUBCOMMANDS = {
    "sft": (
        "supervised fine-tuning on Alpaca JSON (the Alpaca baseline)",
        lambda p: add_training_arguments(p, "sft"),
        lambda args: train(args, "sft"),
    ),
    "rank": (
        "ranking training on a ranked file (.jsonl ours, .json the authors')",
        lambda p: add_training_arguments(p, "rank"),
        lambda args: train(args, "rank"),
    ),
    "pipeline": (
        "Tuna: Tuna_p (lr 1e-5) then Tuna_c (lr 1e-6) in one command",
        add_pipeline_arguments,
        run_pipeline,
    ),
}


def main(argv=None):
    summary = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="tuna.py", description=summary)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        subparser = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
    args = parser.parse_args(argv)
    # one writer per output folder (under torchrun, the main process holds the lock for all)
    try:
        main_process = os.environ.get("RANK", "0") == "0"
        writes = main_process and not getattr(args, "dry_run", False)
        with data.lock_output(args.out) if writes else nullcontext():
            run_command = SUBCOMMANDS[args.command][2]
            run_command(args)
    # DataError is a ValueError
    except (TrainingError, data.OutputLocked, OSError, ValueError) as e:
        print(f"tuna.py {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
