"""Tuna: instruction tuning with ranking feedback from LLMs (METHOD.md), as one explicit training loop.

Read from the top: the objective (scores, ranking loss, MLE term, how they combine), then prefix
sharing (one prompt + K responses in one row), then the plumbing (data, LoRA, optimizer, checkpoints,
distributed) and the CLI:

    python tuna.py sft      --init LLAMA_DIR --data alpaca_data.json --out runs/alpaca
    python tuna.py rank     --init runs/alpaca --data ranked.jsonl --out runs/tuna_p        # lr 1e-5
    python tuna.py pipeline --init runs/alpaca --probabilistic-data p.jsonl --contextual-data c.jsonl --out runs/tuna
    torchrun --nproc_per_node 8 tuna.py rank ... [--fsdp]                                     # many GPUs
    python tuna.py demo     --out runs/demo        # all of it offline on a CPU, on a built-in suite (section 9)
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

import requests
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import eval as evaluation  # eval.py (renamed here so Python's eval() stays visible)
import model as llama
import teacher

# ============================================================================ 1. the objective

def candidate_scores(token_logprobs, token_candidate, num_candidates, length_penalty=1.0):
    """s_k = (sum of log p over candidate k's response tokens) / (its token count) ** length_penalty.

    token_logprobs, token_candidate: (B, N), each scored token's log-prob and its candidate (-1 =
    padding, whose log-prob is 0). Returns (B, K). METHOD.md: length normalization, exponent 1."""
    column = token_candidate + 1                             # column 0 collects the padding, dropped
    zeros = token_logprobs.new_zeros(token_logprobs.shape[0], num_candidates + 1)
    sums = zeros.scatter_add(1, column, token_logprobs)[:, 1:]
    lengths = zeros.scatter_add(1, column, torch.ones_like(token_logprobs))[:, 1:]
    return sums / lengths.clamp(min=1) ** length_penalty


def rank_loss(scores, candidate_mask, margin=0.1, pair_counts=None):
    """L_rank = sum over d = 1..K-1 of mean over j of max(0, s_{j+d} - s_j + m*d) (METHOD.md).

    scores, candidate_mask: (B, K), candidates best first, masked ones (dropped duplicates, padding)
    after the valid ones. "mean over j" is over every valid pair (j, j+d) of the whole batch, pooled
    across instructions: the authors' code flattens the (B, K-d) pairs of each d into one
    nn.MarginRankingLoss (mean); with unequal candidate counts we average over the pairs that exist.
    pair_counts[d-1], when given, is the pair count of the whole optimizer step (all micro-batches,
    all GPUs), so that splitting a batch never changes its loss or gradient."""
    loss = scores.new_zeros(())
    for d in range(1, scores.shape[1]):                      # rank distance d; each term is (B, K-d)
        better, worse = scores[:, :-d], scores[:, d:]
        valid = candidate_mask[:, :-d] & candidate_mask[:, d:]
        hinge = torch.clamp(worse - better + margin * d, min=0) * valid
        count = valid.sum().clamp(min=1) if pair_counts is None else max(pair_counts[d - 1], 1)
        loss = loss + hinge.sum() / count
    return loss


def mle_loss(token_logprobs, token_candidate, best_only=False, token_count=None):
    """Token-level cross-entropy: mean -log p over the response tokens of all candidates (the
    authors' code: Hugging Face's loss over the B*K rows) or of the best one only (a paper reading).
    token_count, when given, is the count of the whole optimizer step (see rank_loss)."""
    used = (token_candidate == 0) if best_only else (token_candidate >= 0)
    count = used.sum().clamp(min=1) if token_count is None else max(token_count, 1)
    return -(token_logprobs * used).sum() / count


def tuna_loss(token_logprobs, token_candidate, candidate_mask, margin=0.1, mle_weight=1.0,
              length_penalty=1.0, mle_best_only=False, token_count=None, pair_counts=None):
    """L = w_mle * L_MLE + L_rank -> (L, L_MLE, L_rank). SFT is the case K = 1: no pairs, L = L_MLE."""
    scores = candidate_scores(token_logprobs, token_candidate, candidate_mask.shape[1], length_penalty)
    mle = mle_loss(token_logprobs, token_candidate, mle_best_only, token_count)
    rank = rank_loss(scores, candidate_mask, margin, pair_counts)
    return mle_weight * mle + rank, mle, rank


def step_normalizers(examples, mle_best_only=False):
    """(response tokens, pairs per rank distance) of a whole optimizer step, for mle/rank_loss."""
    tokens = sum(sum(1 for c in e["candidate"] if c == 0 or not mle_best_only) for e in examples)
    max_k = max(e["num_candidates"] for e in examples)
    return tokens, [sum(max(e["num_candidates"] - d, 0) for e in examples) for d in range(1, max_k)]


# ============================================================================ 2. prefix sharing

def pack_example(prompts, responses):
    """One instruction's K candidates as one row: the shared prompt once, then each response.

    prompts[k], responses[k]: candidate k's ids (prompt with BOS, response ending in EOS), best first.
    The prompts are normally identical; where tokenization at the seam differed, the shared part is
    their longest common prefix and each candidate's own rest of prompt opens its segment, unscored.
    Each segment attends to the shared prompt and to itself (collate builds that mask) and its
    positions continue from the prompt's, so every response sees exactly what it would see alone in
    its own row: the naive K-row computation without K copies of the prompt. Scored tokens: the
    logits at row index `source` predict `target`, a token of candidate `candidate`."""
    shared = 0
    while all(len(p) > shared for p in prompts) and len({p[shared] for p in prompts}) == 1:
        shared += 1
    row = {"tokens": list(prompts[0][:shared]), "positions": list(range(shared)), "segment": [0] * shared,
           "source": [], "target": [], "candidate": [], "num_candidates": len(prompts)}
    for k, (prompt, response) in enumerate(zip(prompts, responses)):
        sequence = prompt + response
        start = len(row["tokens"])
        row_index = list(range(shared)) + list(range(start, start + len(sequence) - shared))
        row["tokens"] += sequence[shared:]
        row["positions"] += range(shared, len(sequence))
        row["segment"] += [k + 1] * (len(sequence) - shared)
        for p in range(len(prompt), len(sequence)):          # response tokens only are scored
            row["source"].append(row_index[p - 1])
            row["target"].append(sequence[p])
            row["candidate"].append(k)
    return row


def collate(rows, pad_id, device="cpu"):
    """Pad packed rows into tensors. mask (B, 1, T, T), True = may attend: causal, and a token sees the
    shared prompt (segment 0) and its own segment only. None (plain causal) when no row packs more
    than one candidate, so one-candidate batches (SFT) keep the fast causal attention path."""
    B, T, N = len(rows), max(len(r["tokens"]) for r in rows), max(len(r["target"]) for r in rows)
    K = max(r["num_candidates"] for r in rows)
    batch = {"tokens": torch.full((B, T), pad_id), "positions": torch.zeros(B, T, dtype=torch.long),
             "segment": torch.full((B, T), -1), "source": torch.zeros(B, N, dtype=torch.long),
             "target": torch.zeros(B, N, dtype=torch.long), "candidate": torch.full((B, N), -1)}
    for b, r in enumerate(rows):
        for key in ("tokens", "positions", "segment", "source", "target", "candidate"):
            batch[key][b, :len(r[key])] = torch.tensor(r[key], dtype=torch.long)
    batch["candidate_mask"] = torch.arange(K)[None, :] < torch.tensor([r["num_candidates"] for r in rows])[:, None]
    batch = {key: value.to(device) for key, value in batch.items()}
    batch["mask"] = None
    if K > 1:
        seg = batch["segment"]
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        visible = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)    # (B, T, T)
        batch["mask"] = (causal & visible)[:, None]                                # (B, 1, T, T)
    else:
        batch["positions"] = None                                                  # default arange
    return batch


def score_tokens(model, batch):
    """log p(target | all it may see) of every scored token: (B, N), 0 at padding. Only the positions
    that predict a scored token go through the vocabulary-sized output layer (output_positions), which
    skips prompts and padding and never holds (B, T, vocab) logits."""
    logits = model(batch["tokens"], batch["positions"], batch["mask"], output_positions=batch["source"])  # (B, N, V)
    return llama.token_logprobs(logits, batch["target"]) * (batch["candidate"] >= 0)


# ============================================================================ 3. data: files -> packed rows

def load_rows(path, tok, max_len, kind):
    """Packed rows of an Alpaca JSON (kind "sft": one candidate, the reference output) or a ranked file
    (.jsonl: the project's format; .json: the authors' release). A candidate that cannot keep one
    response token within max_len (prompt + response, METHOD.md) is dropped; the rest keep their order."""
    if kind == "sft":
        items = [(str(i), data.alpaca_prompt(e["instruction"], e["input"]), [e["output"]])
                 for i, e in enumerate(data.read_alpaca(path))]
    else:
        read = data.read_ranked_jsonl if str(path).endswith(".jsonl") else data.read_authors_ranking
        items = [(r.id, r.prompt, r.candidates) for r in read(path)]
    rows, dropped, skipped = [], 0, 0
    for record_id, prompt, candidates in items:
        pairs = [data.encode_prompt_response(tok, prompt, c, max_len) for c in candidates]
        kept = [p for p in pairs if p is not None]
        dropped += len(pairs) - len(kept)
        if not kept:
            skipped += 1
            continue
        row = pack_example([p for p, _ in kept], [r for _, r in kept])
        row["id"] = record_id
        rows.append(row)
    if dropped:
        log(f"{path}: {dropped} candidate(s) dropped, {skipped} record(s) skipped: prompt longer than max_len {max_len}")
    if not rows:
        raise data.DataError(f"{path}: no usable record")
    return rows


# ============================================================================ 4. LoRA (Hu et al. 2021)

class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x with W frozen, A (r, in) random, B (out, r) zero: training starts
    exactly at W and only A, B (and their Adam moments) take memory, so a 7B model fits one GPU."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        base.weight.requires_grad_(False)
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device))   # float32
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))                              # as nn.Linear

    def forward(self, x):
        update = F.linear(F.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b)
        return self.base(x) + (self.scale * update).to(x.dtype)


def add_lora(net, rank, alpha, targets):
    """Freeze every weight, then wrap the named linear layers of every block (e.g. wq, wv, w1)."""
    net.requires_grad_(False)
    for block in net.layers:
        for parent in (block.attention, block.feed_forward):
            for name in targets:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))


def plain_model(net, state):
    """A plain model.Transformer holding `state` (LoRA merged), to save with model.save_hf_checkpoint."""
    merged = {}
    for key, tensor in state.items():
        if key.endswith((".lora_a", ".lora_b")):
            continue
        if key.endswith(".base.weight"):
            lora = net.get_submodule(key[: -len(".base.weight")])
            a, b = state[key[: -len("base.weight")] + "lora_a"], state[key[: -len("base.weight")] + "lora_b"]
            tensor = (tensor.float() + lora.scale * b.float() @ a.float()).to(tensor.dtype)
            key = key[: -len(".base.weight")] + ".weight"
        merged[key] = tensor
    with torch.device("meta"):
        plain = llama.Transformer(net.args)
    plain.load_state_dict(merged, strict=True, assign=True)
    plain.reset_rope(plain.tok_embeddings.weight.device)     # buffers not in the state dict
    if net.args.tie_embeddings:
        plain.output.weight = plain.tok_embeddings.weight
    return plain


# ============================================================================ 5. optimizer and schedule

def make_optimizer(net, lr, weight_decay, betas, eps, device):
    """AdamW (METHOD.md: 0.9, 0.999, eps 1e-8, weight decay 0); decay, if any, on matrices only
    (not norms), as nanoGPT. Fused kernel on CUDA."""
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type == "cuda")


def learning_rate(step, total_steps, peak_lr, warmup_steps):
    """Linear warm-up, then cosine decay towards 0 (the authors' Hugging Face cosine schedule; step is
    0-based). HF's first step has lr 0; ours has peak/warmup, so no step is spent without moving."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ============================================================================ 6. run folders and checkpoints

class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says which file, step or setting."""


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def log(message):
    if is_main():
        print(message, file=sys.stderr, flush=True)


def run_identity(args, kind):
    """What makes two runs the same run: settings that change the math, and the data file's hash.
    (Micro-batch size and GPU count are not among them: they do not change the loss, see rank_loss.)"""
    keys = ("init", "lr", "epochs", "max_steps", "batch_size", "max_len", "warmup_steps", "weight_decay",
            "adam_betas", "adam_eps", "grad_clip", "seed", "margin", "mle_weight", "length_penalty",
            "mle_best_only", "lora_rank", "lora_alpha", "lora_targets", "dtype")
    identity = {key: getattr(args, key, None) for key in keys}
    identity["init"] = os.path.abspath(args.init)
    digest = hashlib.sha256()
    with open(args.data, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    identity.update(kind=kind, data=os.path.abspath(args.data), data_sha256=digest.hexdigest())
    return json.loads(json.dumps(identity))                  # tuples -> lists, as read back from run.json


def prepare_output(args, identity):
    """-> ("done", out) when --resume finds the run finished, else ("train", out + ".partial").

    A run trains in OUT.partial and is renamed to OUT when complete, so OUT is either absent or a
    whole checkpoint. An existing run is never replaced silently: --resume continues the same run
    (same run.json), --overwrite starts over."""
    out, partial = args.out.rstrip("/"), args.out.rstrip("/") + ".partial"
    for folder in (out, partial):
        stored = os.path.join(folder, "run.json")
        if not os.path.exists(folder) or args.overwrite:
            continue
        if not args.resume:
            raise TrainingError(f"{folder} already exists ({'a finished' if folder == out else 'an unfinished'} run): "
                                f"pass --resume to continue it or --overwrite to start over")
        previous = json.load(open(stored)) if os.path.isfile(stored) else {}
        changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        if changed:
            raise TrainingError(f"{stored}: this run was started with other settings ({', '.join(changed)}); "
                                f"use --overwrite to start over")
        if folder == out:
            return "done", out
        return "train", partial
    if os.path.exists(partial):
        shutil.rmtree(partial)
    os.makedirs(os.path.join(partial, "checkpoints"))
    with open(os.path.join(partial, "run.json"), "w") as f:
        json.dump(identity, f, indent=2)
    return "train", partial


def latest_checkpoint(run_dir):
    folder = os.path.join(run_dir, "checkpoints")
    steps = sorted(n for n in os.listdir(folder) if n.startswith("step-") and not n.endswith(".tmp")) \
        if os.path.isdir(folder) else []
    return os.path.join(folder, steps[-1]) if steps else None


def gather_state(wrapped, optimizer):
    """Full (unsharded) model and optimizer state on the CPU, from a plain, DDP or FSDP2 model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(wrapped, options=options)
    return model_state, (get_optimizer_state_dict(wrapped, optimizer, options=options) if optimizer else None)


def save_checkpoint(folder, net, wrapped, optimizer, step, tokenizer_path, data_position, finished=False):
    """HF checkpoint + tokenizer.model + training_state.pt, written to folder.tmp and renamed: a
    checkpoint folder either is complete or does not exist. Every rank calls it (FSDP gathers)."""
    model_state, optimizer_state = gather_state(wrapped, None if finished else optimizer)
    if not is_main():
        return
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    llama.save_hf_checkpoint(plain_model(net, model_state), tmp)
    shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"step": step, "finished": finished, "data_position": data_position, "optimizer": optimizer_state, "rng": rng,
                "lora": {k: v for k, v in model_state.items() if k.endswith((".lora_a", ".lora_b"))}},
               os.path.join(tmp, "training_state.pt"))
    os.rename(tmp, folder)


def finish_run(run_dir, out, final_checkpoint):
    """Move the final checkpoint's files up into the run folder, drop the step checkpoints, and
    rename OUT.partial -> OUT (an --overwrite'n old OUT is moved aside first, then deleted)."""
    for name in os.listdir(final_checkpoint):
        os.replace(os.path.join(final_checkpoint, name), os.path.join(run_dir, name))
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))
    old = out + ".old"
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(run_dir, out)
    shutil.rmtree(old, ignore_errors=True)


# ============================================================================ 7. several GPUs (torchrun)

def setup_distributed(device_name=None):
    """-> (rank, world size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPUs, gloo on CPU."""
    cuda = torch.cuda.is_available() and device_name != "cpu"
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device_name or (f"cuda:{local_rank}" if cuda else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        return 0, 1, device
    return dist.get_rank(), dist.get_world_size(), device


def wrap_model(net, world, device, fsdp):
    """DDP replicates the model on every GPU; FSDP2 (fully_shard, one unit per block) shards weights,
    gradients and optimizer state over the GPUs, for models that do not fit one."""
    if world == 1:
        return net
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        for block in net.layers:
            fully_shard(block, mesh=mesh)
        return fully_shard(net, mesh=mesh)
    return nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)


def gradient_sync(wrapped, enabled):
    """Gradient accumulation: reduce gradients over GPUs only at the last micro-batch of a step."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return nullcontext() if enabled else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):        # FSDP2
        wrapped.set_requires_gradient_sync(enabled)
    return nullcontext()


def broadcast(value):
    if dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


# ============================================================================ 8. the training loop

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train(args, kind):
    """One stage (kind "sft" or "rank"), checkpoint folder args.init -> checkpoint folder args.out."""
    rank, world, device = setup_distributed(args.device)
    tokenizer_path = args.tokenizer or os.path.join(args.init, "tokenizer.model")
    try:
        decision = prepare_output(args, run_identity(args, kind)) if is_main() else None
    except (TrainingError, OSError) as e:
        decision = ("error", str(e))
    what, run_dir = broadcast(decision)
    if what == "error":
        raise TrainingError(run_dir)
    if what == "done":
        log(f"{run_dir}: already finished")
        return run_dir
    tok = data.Tokenizer(tokenizer_path)
    rows = load_rows(args.data, tok, args.max_len, kind)
    micro = args.micro_batch_size or math.ceil(args.batch_size / world)
    accum = math.ceil(args.batch_size / (world * micro))    # micro-batches per GPU per optimizer step
    full_batches, rest = divmod(len(rows), args.batch_size)
    steps_per_epoch = full_batches + (rest >= world * accum)  # a last batch too small to split is dropped
    total = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
    warmup = args.warmup_steps if args.warmup_steps >= 0 else round(0.03 * total)  # Alpaca: 3% warm-up
    if total == 0:
        raise TrainingError(f"{args.data}: {len(rows)} usable example(s), fewer than one batch of "
                            f"{min(args.batch_size, world * accum)} can be made of")

    checkpoint = latest_checkpoint(run_dir)
    state = torch.load(os.path.join(checkpoint, "training_state.pt"), weights_only=True, mmap=True) if checkpoint else None
    if state and state["finished"]:
        if is_main():
            finish_run(run_dir, args.out.rstrip("/"), checkpoint)
        return args.out
    net = llama.load_checkpoint(checkpoint if checkpoint and not args.lora_rank else args.init, device, DTYPES[args.dtype])
    if tok.vocab_size > net.args.vocab_size:
        raise TrainingError(f"{tokenizer_path}: {tok.vocab_size} tokens, but {args.init} has {net.args.vocab_size} embeddings")
    if args.lora_rank:
        add_lora(net, args.lora_rank, args.lora_alpha, args.lora_targets.split(","))
        if state:
            net.load_state_dict(state["lora"], strict=False)
    net.train()
    net.gradient_checkpointing = args.gradient_checkpointing
    wrapped = wrap_model(net, world, device, args.fsdp)
    optimizer = make_optimizer(net, args.lr, args.weight_decay, tuple(args.adam_betas), args.adam_eps, device)
    params = [p for p in net.parameters() if p.requires_grad]
    start = 0
    if state:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(wrapped, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        start = state["step"]
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if is_main():                   # forget steps logged after the checkpoint (and a line cut by a kill)
        kept = [line for line in open(metrics_path) if line.endswith("\n")] if os.path.exists(metrics_path) else []
        with open(metrics_path, "w") as f:
            f.writelines(line for line in kept if json.loads(line)["step"] <= start)
    log(f"tuna.py {kind}: {len(rows)} examples, {total} steps of {args.batch_size} "
        f"({world} process(es) x {accum} micro-batch(es)), from step {start}, in {run_dir}")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and args.bf16 else nullcontext()
    loss_options = dict(margin=getattr(args, "margin", 0.1), mle_weight=getattr(args, "mle_weight", 1.0),
                        length_penalty=getattr(args, "length_penalty", 1.0), mle_best_only=getattr(args, "mle_best_only", False))
    began, tokens_seen, order, order_epoch = time.time(), 0, None, None
    for step in range(start, total):
        epoch, index = divmod(step, steps_per_epoch)
        if order_epoch != epoch:                             # data order: a function of seed and epoch only
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
            order_epoch = epoch
        batch_rows = [rows[i] for i in order[index * args.batch_size:(index + 1) * args.batch_size]]
        token_count, pair_counts = step_normalizers(batch_rows, loss_options["mle_best_only"])
        mine = batch_rows[rank::world]
        parts = torch.zeros(3, device=device)                # loss, mle, rank of the whole step
        for i in range(accum):
            batch = collate(mine[i * len(mine) // accum:(i + 1) * len(mine) // accum], tok.pad_id, device)
            with gradient_sync(wrapped, i == accum - 1):
                with autocast:
                    token_logprobs = score_tokens(wrapped, batch)
                    loss, mle, rank_part = tuna_loss(token_logprobs, batch["candidate"], batch["candidate_mask"],
                                                     token_count=token_count, pair_counts=pair_counts, **loss_options)
                (loss * world).backward()                    # DDP/FSDP average over GPUs; the loss is a sum
            parts += torch.stack([loss, mle, rank_part]).detach()
        if world > 1:
            dist.all_reduce(parts)
        loss_value, mle_value, rank_value = parts.tolist()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else math.inf)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise TrainingError(
                f"non-finite loss ({loss_value}) or gradient norm ({grad_norm}) at step {step + 1} (epoch {epoch}, "
                f"batch {index}, records {[r['id'] for r in batch_rows][:8]}...); stopped before the update; "
                f"last good checkpoint: {latest_checkpoint(run_dir) or args.init}")
        lr = learning_rate(step, total, args.lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_tokens = sum(len(r["tokens"]) for r in batch_rows)
        tokens_seen += step_tokens
        elapsed = time.time() - began
        if is_main() and ((step + 1) % args.log_every == 0 or step + 1 == total):
            eta = elapsed / (step + 1 - start) * (total - step - 1)
            log(f"step {step + 1}/{total} | loss {loss_value:.4f} (mle {mle_value:.4f}, rank {rank_value:.4f}) | "
                f"lr {lr:.2e} | {tokens_seen / elapsed:.0f} tok/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step + 1, "epoch": epoch, "loss": loss_value, "mle": mle_value,
                                    "rank": rank_value, "lr": lr, "grad_norm": grad_norm, "tokens": step_tokens,
                                    "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed}) + "\n")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            save_checkpoint(os.path.join(run_dir, "checkpoints", f"step-{step + 1:08d}"), net, wrapped, optimizer,
                            step + 1, tokenizer_path, dict(epoch=epoch, batches_done_in_epoch=index + 1, seed=args.seed))
            if is_main():                                    # keep only the newest
                for name in os.listdir(os.path.join(run_dir, "checkpoints")):
                    if name != f"step-{step + 1:08d}":
                        shutil.rmtree(os.path.join(run_dir, "checkpoints", name))
    final = os.path.join(run_dir, "checkpoints", f"step-{total:08d}-final")
    save_checkpoint(final, net, wrapped, None, total, tokenizer_path, dict(epochs=args.epochs), finished=True)
    if is_main():
        finish_run(run_dir, args.out.rstrip("/"), final)
        log(f"saved {args.out}")
    if dist.is_initialized():
        dist.barrier()
    return args.out


# ============================================================================ 9. the offline demo

# The demo's instruction suite: short tasks whose answers can be checked, so the final table can say
# whether ranking helped. Every answer is a function of what the instruction shows (no world knowledge),
# so held-out instructions are new instances of the same tasks. Each task also has one plausible wrong
# answer: the SFT data uses it for a share of the instructions, as Alpaca's distilled answers are
# sometimes wrong.
DEMO_TASKS = {  # name -> (instruction, correct answer, plausible wrong answer), from random letters or digits
    "first": lambda ls, ds: (f"What is the first of the letters {' '.join(ls)}?", ls[0], ls[-1]),
    "last": lambda ls, ds: (f"What is the last of the letters {' '.join(ls)}?", ls[-1], ls[0]),
    "count": lambda ls, ds: (f"How many letters are in {' '.join(ls)}?", str(len(ls)), str(len(ls) + 1)),
    "largest": lambda ls, ds: (f"Which is the largest of the digits {' '.join(ds)}?", max(ds), ds[0]),
    "smallest": lambda ls, ds: (f"Which is the smallest of the digits {' '.join(ds)}?", min(ds), max(ds)),
    "sort": lambda ls, ds: (f"Sort the letters {' '.join(ls)} alphabetically.", " ".join(sorted(ls)), " ".join(ls)),
}

DEMO_JUDGE = "rule-based-judge-checking-known-answers"  # its name in every data file it touches

# name -> settings; "full" is what the README's command runs, "ci" the test-sized variant.
DEMO_SIZES = {
    "full": dict(train=4000, heldout=300, ranked=2000, dim=64, layers=2, teacher_dim=96, teacher_layers=3,
                 sft_epochs=12, sft_lr=3e-3, rank_lr=1e-3),
    "ci": dict(train=2000, heldout=300, ranked=1000, dim=64, layers=2, teacher_dim=96, teacher_layers=3,
               sft_epochs=12, sft_lr=3e-3, rank_lr=1e-3),
}


def demo_suite(size, noise, seed):
    """(SFT examples with a share `noise` of wrong answers, the same instructions answered right for the
    teacher, held-out examples). Held-out instructions never appear in training."""
    rng, seen, suites = random.Random(seed), set(), {"heldout": [], "train": []}
    for split, count in (("heldout", size["heldout"]), ("train", size["train"])):
        while len(suites[split]) < count:
            task = list(DEMO_TASKS)[len(suites[split]) % len(DEMO_TASKS)]
            letters = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 5))
            instruction, right, wrong = DEMO_TASKS[task](letters, rng.sample("0123456789", rng.randint(3, 5)))
            if instruction not in seen:
                seen.add(instruction)
                suites[split].append({"instruction": instruction, "input": "", "output": right,
                                      "wrong": wrong, "task": task})
    student = [dict(e, output=e["wrong"] if rng.random() < noise else e["output"]) for e in suites["train"]]
    return student, suites["train"], suites["heldout"]


def demo_tokenizer(examples, path):
    """A LLaMA-style sentencepiece BPE tokenizer (byte fallback, split digits) trained on the suite."""
    import sentencepiece as spm
    text = [data.alpaca_prompt(e["instruction"]) + e["output"] for e in examples]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=path[: -len(".model")], model_type="bpe", vocab_size=400,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)


def rule_judge_reply(messages, solutions):
    """The demo's stand-in for GPT-4 in contextual ranking: a RULE-BASED JUDGE that checks each candidate
    against the known answer (a tiny model cannot judge), and answers in the teacher's format (METHOD.md:
    the five steps, "rank: [...]") so the real prompt, parser and validation are exercised."""
    user = messages[-1]["content"]
    found = re.search(r"### Instruction:\n(.*?)\n\n### Response:", user, re.DOTALL)
    if not found or found.group(1).strip() not in solutions:
        raise teacher.BadRequest("the rule-based judge knows no solution for this prompt's instruction", "messages")
    candidates = re.findall(r"###Response \d+:\n(.*?)(?=\n\n###Response \d+:|\n\nFollow these steps:)", user, re.DOTALL)
    solution = solutions[found.group(1).strip()]
    pool = [c.strip() for c in candidates] + [solution]
    kept = [i for i, c in enumerate(pool) if c not in pool[:i]]             # step 3: one of each duplicate
    score = {i: 15 if pool[i] == solution else round(10 * evaluation.rouge_l(pool[i], solution)) for i in kept}
    ranks = sorted(kept, key=lambda i: (-score[i], i != len(candidates), i))
    return ("(1) The instruction is close-ended.\n"
            f"(2) ###Response {len(candidates)}:\n{solution}\n"
            f"(3) Kept one of each duplicate: responses {kept}.\n"
            "(4) " + "\n".join(f"Response {i}: [{score[i]}]" for i in kept) + "\n"
            f"(5) rank: [{', '.join(map(str, ranks))}]")


class RuleJudge:
    """The rule-based judge behind teacher.py's OpenAI-compatible routes: chat completions only."""
    name = DEMO_JUDGE

    def __init__(self, solutions):
        self.solutions = solutions

    def chat(self, body):
        reply = rule_judge_reply(body["messages"], self.solutions)
        return {"object": "chat.completion", "model": self.name, "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

    def completions(self, body):
        raise teacher.BadRequest("the rule-based judge answers /v1/chat/completions only")


def start_rule_judge(solutions):
    """The rule-based judge served on 127.0.0.1 (a thread), with the same HTTP layer as `teacher.py serve`."""
    server = teacher.backend_server(RuleJudge(solutions))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_teacher_server(checkpoint):
    """`python teacher.py serve` on a free port of 127.0.0.1, as a user would start it -> (process, base URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    process = subprocess.Popen([sys.executable, os.path.join(here, "teacher.py"), "serve", "--checkpoint",
                                checkpoint, "--port", str(port), "--model-name", "demo-teacher", "--seed", "0"],
                               stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(300):
        try:
            if requests.get(url + "/models", timeout=1).ok:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.1)
    process.kill()
    raise TrainingError(f"demo: teacher.py serve did not answer at {url}")


def run_demo(args):
    """SFT, Tuna_p, Tuna_c and Tuna on a built-in suite, offline, on a CPU; every artefact in --out."""
    size, out, began = DEMO_SIZES[args.size], args.out.rstrip("/"), time.time()
    os.makedirs(out, exist_ok=True)
    path = lambda *names: os.path.join(out, *names)

    def stage(title, run, argv):          # each stage is the command a user would type; --resume: re-runs skip it
        log(f"\n=== demo [{time.time() - began:5.0f}s] {title}\n$ python {' '.join(argv)}")
        try:
            status = run(argv[1:])
        except SystemExit as e:                                  # argparse and teacher.py exit this way
            status = e.code
        if status != 0:
            raise TrainingError(f"demo: stage '{title}' failed; fix it and rerun the demo (finished stages are kept)")

    def write_once(name, value):                                   # atomically: a kill never leaves half a file
        if not os.path.exists(path(name)):
            with open(path(name) + ".tmp", "w") as f:
                json.dump(value, f, indent=1)
            os.replace(path(name) + ".tmp", path(name))

    # A folder holds one demo: its settings are recorded, and a rerun with others is refused rather than
    # overwriting the data under checkpoints that were trained on it.
    settings = {"size": args.size, "noise": args.noise, "seed": args.seed, **size}
    if os.path.exists(path("demo.json")):
        with open(path("demo.json")) as f:
            recorded = json.load(f)
        if recorded != settings:
            raise TrainingError(f"{path('demo.json')}: this folder holds a demo run with {recorded}, not {settings}; "
                                "use another --out or the same settings")
    write_once("demo.json", settings)
    student, teacher_data, heldout = demo_suite(size, args.noise, args.seed)
    for name, rows in (("sft_data.json", student), ("teacher_data.json", teacher_data), ("heldout.json", heldout)):
        write_once(name, rows)
    if not os.path.exists(path("tokenizer.model")):
        demo_tokenizer(teacher_data, path("tokenizer.model"))
    tok = data.Tokenizer(path("tokenizer.model"))
    for name, dim, layers in (("init_student", size["dim"], size["layers"]),
                              ("init_teacher", size["teacher_dim"], size["teacher_layers"])):
        if not os.path.exists(path(name, "config.json")):
            torch.manual_seed(args.seed)
            llama.save_hf_checkpoint(llama.Transformer(llama.ModelArgs(
                dim=dim, n_layers=layers, n_heads=4, vocab_size=tok.vocab_size, hidden_dim=3 * dim, max_seq_len=256,
                bos_id=tok.bos_id, eos_id=tok.eos_id)), path(name))
            shutil.copyfile(path("tokenizer.model"), path(name, "tokenizer.model"))
    common = ["--resume", "--seed", str(args.seed), "--save-every", "0", "--log-every", "25"]
    sft = ["--lr", str(size["sft_lr"]), "--epochs", str(size["sft_epochs"]), "--warmup-steps", "20", "--batch-size", "32"]
    stage("the teacher: SFT on correct answers (it stands for text-davinci-003)", main,
          ["tuna.py", "sft", "--init", path("init_teacher"), "--data", path("teacher_data.json"),
           "--out", path("teacher"), *common, *sft])
    stage("the student: SFT on answers that are sometimes wrong (the Alpaca baseline)", main,
          ["tuna.py", "sft", "--init", path("init_student"), "--data", path("sft_data.json"),
           "--out", path("sft"), *common, *sft])
    rank = [*common, "--batch-size", "16", "--epochs", "1"]
    limit = ["--limit", str(size["ranked"]), "--workers", "2"]
    process, teacher_url = start_teacher_server(path("teacher"))
    try:
        stage("probabilistic ranking data: the teacher samples 4 answers over HTTP, ranked by mean token log-prob",
              teacher.main, ["teacher.py", "probabilistic", "--data", path("sft_data.json"), "--out",
                             path("probabilistic.jsonl"), "--base-url", teacher_url, "--model", "demo-teacher",
                             "--max-tokens", "16", "--add-original", "scored", *limit])
    finally:
        process.kill()
    judge = start_rule_judge({e["instruction"]: e["output"] for e in teacher_data})
    judge_args = ["--base-url", f"http://127.0.0.1:{judge.server_port}/v1", "--model", DEMO_JUDGE,
                  "--student-max-tokens", "16", *limit]
    try:
        stage("Tuna = Tuna_p (ranking on the probabilistic data, from SFT), then contextual ranking on Tuna_p's "
              "own samples ranked by the RULE-BASED judge (lr / 10, as the authors)", main,
              ["tuna.py", "pipeline", "--init", path("sft"), "--probabilistic-data", path("probabilistic.jsonl"),
               "--lr-probabilistic", str(size["rank_lr"]), "--lr-contextual", str(size["rank_lr"] / 10),
               "--instructions", path("sft_data.json"), "--teacher-base-url", judge_args[1], "--teacher-model",
               DEMO_JUDGE, "--teacher-args", " ".join(judge_args[4:]), "--out", path("tuna"), *rank])
        stage("contextual ranking data for Tuna_c: the SFT student samples 4 answers, the RULE-BASED judge ranks "
              "them", teacher.main, ["teacher.py", "contextual", "--data", path("sft_data.json"), "--student",
                                     path("sft"), "--out", path("contextual_sft.jsonl"), *judge_args])
    finally:
        judge.shutdown()
    stage("Tuna_c: ranking training from SFT on the contextual data", main,
          ["tuna.py", "rank", "--init", path("sft"), "--data", path("contextual_sft.jsonl"), "--out", path("tuna_c"),
           "--lr", str(size["rank_lr"]), *rank])

    log(f"\n=== demo [{time.time() - began:5.0f}s] held-out evaluation: greedy answers to {len(heldout)} new instructions")
    models = {"SFT (Alpaca)": path("sft"), "Tuna_p": path("tuna", "tuna_p"), "Tuna_c": path("tuna_c"),
              "Tuna": path("tuna", "tuna"), "teacher (for reference)": path("teacher")}
    items = [{"id": str(i), "prompt": data.alpaca_prompt(e["instruction"])} for i, e in enumerate(heldout)]
    results = {}
    for name, checkpoint in models.items():
        answers = evaluation.generate_answers(                # eval.py's batched greedy path; kept, resumable
            os.path.basename(checkpoint), "demo", items, evaluation.model_loader(checkpoint, None, "cpu", torch.float32), out, 64, 16)
        answers = [answers[item["id"]] for item in items]
        em = [evaluation.exact_match(a, e["output"]) for a, e in zip(answers, heldout)]
        rl = [evaluation.rouge_l(a, e["output"]) for a, e in zip(answers, heldout)]
        by_task = {t: 100 * sum(x for x, e in zip(em, heldout) if e["task"] == t) /
                   sum(e["task"] == t for e in heldout) for t in DEMO_TASKS}
        results[name] = {"checkpoint": checkpoint, "items": len(heldout), "exact_match": 100 * sum(em) / len(em),
                         "rouge_l": 100 * sum(rl) / len(rl), "exact_match_by_task": by_task,
                         "answers": [{"instruction": e["instruction"], "reference": e["output"], "answer": a}
                                     for a, e in zip(answers, heldout)]}
    table = ["| model | exact match | ROUGE-L | " + " | ".join(DEMO_TASKS) + " | items |",
             "|---|---|---|" + "---|" * len(DEMO_TASKS) + "---|"]
    for name, r in results.items():
        table.append(f"| {name} | {r['exact_match']:.1f} | {r['rouge_l']:.1f} | "
                     + " | ".join(f"{r['exact_match_by_task'][t]:.0f}" for t in DEMO_TASKS) + f" | {r['items']} |")
    table += ["", f"Held-out instructions, greedy answers; exact match and ROUGE-L as Super-NI scores them (x100), then "
              f"exact match per task. SFT data: {args.noise:.0%} wrong answers. Contextual ranking was judged by a "
              f"rule-based judge that checks the known answers (a stand-in for GPT-4). Wall time "
              f"{time.time() - began:.0f} s."]
    with open(path("results.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    with open(path("results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n".join(table))
    log(f"every artefact is in {out}/ (data files, checkpoints with metrics.jsonl, generations/, results.md, results.json)")
    return results


def add_demo_arguments(p):
    p.add_argument("--out", default="runs/demo", help="folder for every artefact (default: runs/demo); "
                   "running the demo again continues what is there")
    p.add_argument("--size", choices=sorted(DEMO_SIZES), default="full", help="ci: the test-sized variant")
    p.add_argument("--noise", type=float, default=0.35, help="share of wrong answers in the student's SFT data")
    p.add_argument("--seed", type=int, default=0)


# ============================================================================ 10. command line

def add_training_arguments(p, lr, epochs, batch_size, warmup_steps, with_data=True):
    p.add_argument("--init", required=True, help="checkpoint folder to start from (HF or Meta layout)")
    p.add_argument("--out", required=True, help="checkpoint folder to write (HF layout, tokenizer.model beside)")
    if with_data:
        p.add_argument("--data", required=True)
        p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one in --init)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="instructions per optimizer step, all GPUs")
    p.add_argument("--micro-batch-size", type=int, default=0, help="instructions per forward pass (0: whole batch)")
    p.add_argument("--max-len", type=int, default=512, help="tokens of prompt + one response (METHOD.md)")
    p.add_argument("--warmup-steps", type=int, default=warmup_steps, help="-1: 3%% of the steps (Alpaca)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (HF's default; 0: none)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights as loaded and trained")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-rank", type=int, default=0, help="0: train all weights")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="wq,wk,wv,wo,w1,w2,w3")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="continue the run in OUT.partial")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT / OUT.partial")


def add_loss_arguments(p):
    p.add_argument("--margin", type=float, default=0.1)
    p.add_argument("--mle-weight", type=float, default=1.0)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--mle-best-only", action="store_true", help="MLE on the best candidate only (default: all)")


def add_sft_arguments(p):
    add_training_arguments(p, lr=2e-5, epochs=3, batch_size=128, warmup_steps=-1)  # Stanford Alpaca's recipe


def add_rank_arguments(p):
    add_training_arguments(p, lr=1e-5, epochs=1, batch_size=16, warmup_steps=2)    # METHOD.md, Tuna_p
    add_loss_arguments(p)


def add_pipeline_arguments(p):
    add_training_arguments(p, lr=None, epochs=1, batch_size=16, warmup_steps=2, with_data=False)
    add_loss_arguments(p)
    p.add_argument("--probabilistic-data", required=True, help="ranked file for Tuna_p")
    p.add_argument("--lr-probabilistic", type=float, default=1e-5)
    p.add_argument("--lr-contextual", type=float, default=1e-6)
    p.add_argument("--contextual-data", help="ranked file for Tuna_c; if absent, built from OUT/tuna_p's samples "
                   "by `teacher.py contextual` with the --teacher-* options")
    p.add_argument("--instructions", help="Alpaca JSON whose instructions Tuna_p answers for contextual ranking")
    p.add_argument("--teacher-base-url", help="OpenAI-compatible API of the ranking teacher, e.g. GPT-4's")
    p.add_argument("--teacher-model", help="teacher model name")
    p.add_argument("--teacher-args", default="", help="more `teacher.py contextual` options, e.g. '--limit 1000'")


def run_pipeline(args):
    """Tuna = probabilistic ranking (lr 1e-5) from the SFT model, then contextual ranking (lr 1e-6)
    from Tuna_p on candidates sampled from Tuna_p (METHOD.md, Pipeline 4). OUT/tuna_p and OUT/tuna
    are ordinary stage outputs; --resume skips a finished stage."""
    out = args.out.rstrip("/")
    stage = argparse.Namespace(**vars(args))
    stage.__dict__.update(out=os.path.join(out, "tuna_p"), data=args.probabilistic_data, lr=args.lr_probabilistic)
    tuna_p = train(stage, "rank")
    contextual = args.contextual_data or os.path.join(out, "contextual.jsonl")
    if not args.contextual_data and not (args.resume and os.path.exists(contextual)):
        if not (args.instructions and args.teacher_base_url and args.teacher_model):
            raise TrainingError("pipeline: give --contextual-data, or --instructions, --teacher-base-url and "
                                "--teacher-model to build it from Tuna_p's samples with teacher.py")
        if dist.is_initialized():                            # hours of sampling would time out the other ranks
            raise TrainingError("pipeline: under torchrun, build the contextual data first and pass --contextual-data")
        command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "teacher.py"),
                   "contextual", "--data", args.instructions, "--out", contextual, "--base-url",
                   args.teacher_base_url, "--model", args.teacher_model, "--student", tuna_p,
                   *shlex.split(args.teacher_args)]
        log("pipeline: " + " ".join(shlex.quote(c) for c in command))
        if subprocess.run(command).returncode != 0:
            raise TrainingError(f"pipeline: teacher.py contextual failed; {out}/tuna_p is finished, rerun with --resume")
    stage.__dict__.update(init=tuna_p, out=os.path.join(out, "tuna"), data=contextual, lr=args.lr_contextual,
                          tokenizer=None)
    return train(stage, "rank")


# name -> (help, add arguments, run): one line per subcommand
SUBCOMMANDS = {
    "sft": ("supervised fine-tuning on Alpaca JSON (the Alpaca baseline)", add_sft_arguments,
            lambda args: train(args, "sft")),
    "rank": ("ranking training on a ranked file (.jsonl ours, .json the authors')", add_rank_arguments,
             lambda args: train(args, "rank")),
    "pipeline": ("Tuna: Tuna_p (lr 1e-5) then Tuna_c (lr 1e-6) in one command", add_pipeline_arguments, run_pipeline),
    "demo": ("the whole method offline on a CPU: SFT, Tuna_p, Tuna_c, Tuna on a built-in suite", add_demo_arguments,
             run_demo),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tuna.py", description="Tuna: instruction tuning with ranking feedback")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        SUBCOMMANDS[args.command][2](args)
    except (TrainingError, data.DataError, FileNotFoundError) as e:
        print(f"tuna.py {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
