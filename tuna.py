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
term), prefix sharing (an instruction's prompt and its K responses in one row) and the
training loop (one train_step, the schedule, the data order, the loop, its setup); then
the records read into packed rows, the pipeline and the command line. The run's plumbing
(run folders and resume, precision, several GPUs, LoRA, FLOPs) is training.py's.
The whole method offline on a CPU, with a results table: python demo.py --out runs/demo
"""
import argparse
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import checkpoint
import data
import tokenizer
import training

# ---- 1. the method's fixed values, with their sources

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


# ---- 2. the objective: candidate scores, the ranking loss, the MLE term

def candidate_scores(token_logprobs, token_candidate, num_candidates,
                     length_penalty=LENGTH_PENALTY):
    """s_k = (sum of log p over candidate k's response tokens) / (its token count) ** length_penalty.

    token_logprobs, token_candidate: (B, N), each scored token's log-prob and its
    candidate (-1 = padding, whose log-prob is 0). Returns (B, K). Length normalization,
    exponent 1 (LMOps tuna/src/custom.py, TunaTrainer.compute_loss: token_lprobs)."""
    # column 0 collects the padding, dropped below
    column = token_candidate + 1
    zeros = token_logprobs.new_zeros(token_logprobs.shape[0], num_candidates + 1)
    sums = zeros.scatter_add(1, column, token_logprobs)[:, 1:]
    lengths = zeros.scatter_add(1, column, torch.ones_like(token_logprobs))[:, 1:]
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
        count = valid.sum().clamp(min=1) if pair_counts is None else max(pair_counts[d - 1], 1)
        loss = loss + hinge.sum() / count
    return loss


def mle_loss(token_logprobs, token_candidate, best_only=False, token_count=None):
    """Token-level cross-entropy: mean -log p over the response tokens of all candidates
    (the authors' code: Hugging Face's loss over the B*K rows) or of the best one only (a
    paper reading). token_count, when given, is the count of the whole optimizer step (see
    rank_loss)."""
    # the best candidate is number 0; padding is -1
    used = (token_candidate == 0) if best_only else (token_candidate >= 0)
    count = used.sum().clamp(min=1) if token_count is None else max(token_count, 1)
    return -(token_logprobs * used).sum() / count


def tuna_loss(token_logprobs, token_candidate, candidate_mask, margin=MARGIN,
              mle_weight=MLE_WEIGHT, length_penalty=LENGTH_PENALTY, mle_best_only=False,
              token_count=None, pair_counts=None):
    """L = w_mle * L_MLE + L_rank -> (L, L_MLE, L_rank). SFT is the case K = 1: no pairs, L = L_MLE."""
    scores = candidate_scores(token_logprobs, token_candidate, candidate_mask.shape[1], length_penalty)
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


# ---- 3. prefix sharing: an instruction's prompt once, then its K responses, in one row

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


# ---- 4. the training loop: one optimizer step, its learning rate and data, the loop, its setup

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
        with training.gradient_sync(run.wrapped, last_micro_batch):
            with training.autocast(run):
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
    loss, mle, rank = parts.tolist()
    # clip; a non-finite loss or gradient stops the run before it reaches the weights
    grad_norm = training.clip_gradients(run.net, GRAD_CLIP)
    training.refuse_non_finite(run, step, batch_rows, loss, grad_norm)
    # step, at the scheduled learning rate
    lr = learning_rate(step, run.total_steps, run.args.lr, run.warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return dict(loss=loss, mle=mle, rank=rank, grad_norm=grad_norm, lr=lr)


def learning_rate(step, total_steps, peak_lr, warmup_steps):
    """Linear warm-up, then cosine decay towards 0 (the authors' Hugging Face cosine
    schedule; step is 0-based). HF's first step has lr 0; ours has peak/warmup, so no step
    is spent without moving."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_rows(run, step):
    """The instructions of one optimizer step: each epoch a shuffle that depends on the
    seed and the epoch only, so a resumed run sees exactly the batches an uninterrupted
    one would have seen."""
    epoch, index = divmod(step, run.steps_per_epoch)
    order = torch.randperm(len(run.rows), generator=torch.Generator().manual_seed(run.args.seed + epoch))
    start = index * run.args.batch_size
    return [run.rows[i] for i in order[start:start + run.args.batch_size].tolist()]


def train(args, kind):
    """One stage, checkpoint folder args.init -> checkpoint folder args.out (kind "sft" or "rank")."""
    run = setup(args, kind)
    if run.state == "done":
        training.log(f"{run.out}: already finished")
        if training.is_main():
            # left by a kill
            shutil.rmtree(os.path.join(run.out, "checkpoints"), ignore_errors=True)
        return run.out
    # only now: a run that failed in setup() left nothing behind
    if training.is_main():
        training.open_run_folder(run)
    training.log(f"tuna.py {kind}: {len(run.rows)} examples, {run.total_steps} steps of {args.batch_size} "
                 f"({run.world_size} process(es) x {run.micro_batches} micro-batch(es)), "
                 f"from step {run.start_step}, in {run.out}")
    began = time.time()
    for step in range(run.start_step, run.total_steps):
        batch_rows = step_rows(run, step)
        values = train_step(run, step, batch_rows)
        training.record_step(run, step, batch_rows, began, values)
        done = step + 1
        if args.save_every and done % args.save_every == 0 and done < run.total_steps:
            training.save_checkpoint(run, done)
    training.save_checkpoint(run, run.total_steps, finished=True)
    training.log(f"saved {run.out}")
    if dist.is_initialized():
        dist.barrier()
    return run.out


def setup(args, kind):
    """Data, model, optimizer and, with --resume, the last checkpoint's state. Writes
    nothing: a run that fails here (bad data, a missing or corrupt checkpoint) leaves no
    trace behind."""
    process_rank, world_size, device = training.start_processes(args.device)
    out = args.out.rstrip("/")
    if not os.path.isdir(args.init):
        raise training.TrainingError(f"--init {args.init}: no such folder")
    # a folder: its tokenizer.model, else tokenizer.json
    tok = tokenizer.Tokenizer(args.tokenizer or args.init)
    settings = training.run_settings(args, kind, tok.files, method_constants=dict(
        margin=MARGIN, mle_weight=MLE_WEIGHT, length_penalty=LENGTH_PENALTY,
        max_len=MAX_LEN, grad_clip=GRAD_CLIP))
    # main decides, all follow
    folder_state = training.broadcast_outcome(lambda: training.run_folder_state(out, settings, args))
    run = training.Run(args, kind, out, folder_state, settings, process_rank, world_size, device)
    if run.state == "done":
        return run
    # data: every process packs all rows, then takes its share of each batch (train_step)
    run.tokenizer_files = tok.files
    run.tokenizer_path = tok.path
    run.pad_id = tok.pad_id
    run.rows = load_rows(args.data, tok, kind)
    micro_batch_size = training.plan_steps(run)
    run.warmup_steps = RANK_WARMUP_STEPS if kind == "rank" else round(SFT_WARMUP_RATIO * run.total_steps)
    # model: from the last checkpoint when resumed (LoRA: the base model, then the adapters' state)
    checkpoint = training.latest_checkpoint(out) if run.state == "resume" else None
    state = training.read_training_state(checkpoint) if checkpoint else None
    net = training.load_model(run, tok, checkpoint, state)
    training.broadcast_outcome(lambda: training.refuse_rows_that_cannot_fit(run, net))
    run.peak_tflops = training.peak_tflops(device, args.peak_tflops)
    net.gradient_checkpointing = training.broadcast_outcome(
        lambda: training.choose_checkpointing(run, net, micro_batch_size))
    run.net = net
    run.wrapped = training.wrap_model(net, world_size, device, args.fsdp)
    run.optimizer = make_optimizer(net, args, device)
    if state:
        training.restore_training_state(run, state)
    return run


def make_optimizer(net, args, device):
    """AdamW (the authors' optim=adamw_torch) over the trainable weights; the fused kernel
    on CUDA, or where --fused-adam / --no-fused-adam say."""
    params = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY,
                             fused=training.on_cuda_unless_told(args.fused_adam, device))


# ---- 5. the data: each record's candidates, packed into one row (what setup reads)

# Candidates per record tuna.py trains on. The paper ranks 4 (probabilistic) and the contextual prompt
# names at most 17 (teacher.ranking_messages); a row packs every candidate, so a record of 10,000 is a
# mistake (one became a 228,913-token row), refused by name when the file is read.
MAX_CANDIDATES = 64


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
    for record_index, (record_id, prompt, candidates, unfinished) in enumerate(read_records(path, kind)):
        pairs = [data.encode_prompt_response(tok, prompt, candidate, MAX_LEN, finished=k not in unfinished)
                 for k, candidate in enumerate(candidates)]
        kept = [p for p in pairs if p is not None]
        dropped += len(pairs) - len(kept)
        if not kept:
            skipped += 1
            continue
        row = pack_example([prompt_ids for prompt_ids, _ in kept], [response_ids for _, response_ids in kept])
        # which record, for messages: its id and its place among the file's records (0-based)
        row["id"] = record_id
        row["record"] = record_index
        rows.append(row)
    if dropped:
        training.log(f"{path}: {dropped} candidate(s) dropped, {skipped} record(s) skipped: "
                     f"prompt longer than {MAX_LEN} tokens")
    if not rows:
        raise data.DataError(f"{path}: no usable record")
    return rows


def read_records(path, kind):
    """(id, prompt, candidates best first, indices of unfinished candidates) of each record."""
    if kind == "sft":
        return [(str(i), data.alpaca_prompt(example["instruction"], example["input"]), [example["output"]],
                 []) for i, example in enumerate(data.read_alpaca(path))]
    if str(path).endswith(".jsonl"):
        ranked = data.read_ranked_jsonl(path, max_candidates=MAX_CANDIDATES)
        return [(r.id, r.prompt, r.candidates, r.source.get("unfinished", [])) for r in ranked]
    bad = []
    ranked = data.read_authors_ranking(path, skipped=bad, max_candidates=MAX_CANDIDATES)
    if bad:
        training.log(f"{path}: {len(bad)} record(s) skipped, e.g. " + "; ".join(bad[:3]))
    return [(r.id, r.prompt, r.candidates, []) for r in ranked]


# ---- 6. the pipeline: Tuna_p, then Tuna_c from Tuna_p's own samples, in one command

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
        raise training.TrainingError("pipeline: give --contextual-data, or --instructions, "
                                     "--teacher-base-url and --teacher-model "
                                     "to build it from Tuna_p's samples with teacher.py")
    # hours of sampling would time out the other processes
    if build_contextual and "RANK" in os.environ:
        raise training.TrainingError("pipeline: under torchrun, build the contextual data first "
                                     "and pass --contextual-data")
    tuna_p = os.path.join(out, "tuna_p")
    command = contextual_command(args, contextual, tuna_p) if build_contextual else None
    if args.dry_run:
        return pipeline_dry_run(args, command)
    served = build_contextual and args.student_base_url
    if served:
        training.log(f"pipeline: Tuna_p and Tuna train here; Tuna_p's samples (the contextual stage) come "
                     f"from the student server at {args.student_base_url}, which must serve {tuna_p} once "
                     "it is trained")
    # the teacher is asked only after hours of training: check it first (reachable, key, model, chat); the
    # student server cannot serve Tuna_p before it exists
    if build_contextual and subprocess.run(contextual_command(args, contextual, tuna_p, student_server=False)
                                           + ["--preflight-only"]).returncode != 0:
        raise training.TrainingError("pipeline: the contextual teacher failed its pre-flight check "
                                     "(above); nothing was trained")
    stage = argparse.Namespace(**vars(args))
    stage.__dict__.update(out=tuna_p, data=args.probabilistic_data, lr=args.lr_probabilistic)
    tuna_p = train(stage, "rank")
    # the pipeline never starts a server: it says what to start, before any sample or Tuna_c
    if served and subprocess.run(command + ["--preflight-only"]).returncode != 0:
        raise training.TrainingError(student_server_missing(args, tuna_p))
    if build_contextual:
        training.log("pipeline: " + " ".join(shlex.quote(c) for c in command))
        if subprocess.run(command).returncode != 0:
            raise training.TrainingError(f"pipeline: teacher.py contextual failed; {out}/tuna_p is "
                                         "finished, rerun with --resume")
    # Tuna_c from Tuna_p, whose checkpoint folder holds the tokenizer
    stage.__dict__.update(init=tuna_p, out=os.path.join(out, "tuna"), data=contextual,
                          lr=args.lr_contextual, tokenizer=None)
    return train(stage, "rank")


def contextual_command(args, contextual, tuna_p, student_server=True):
    """`teacher.py contextual`: Tuna_p samples answers, on this run's device or through the student server
    (--student-base-url; left out with student_server=False), and the teacher ranks them into `contextual`."""
    served = ["--student-base-url", args.student_base_url, "--student-model", student_model(args, tuna_p),
              "--student-api-key-env", args.student_api_key_env] if args.student_base_url else []
    return [
        sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "teacher.py"), "contextual",
        "--data", args.instructions,
        "--out", contextual,
        "--base-url", args.teacher_base_url,
        "--model", args.teacher_model,
        "--student", tuna_p,
        "--student-batch-size", str(args.student_batch_size),
        "--device", args.device or checkpoint.default_device(),
        # rebuilt on every run of the pipeline, from teacher.py's caches
        "--resume",
        *(served if student_server else []),
        *shlex.split(args.teacher_args),
    ]


def student_model(args, tuna_p):
    """The name the student server serves Tuna_p under: --student-model, else Tuna_p's folder as given, the
    name `vllm serve OUT/tuna_p` gives it."""
    return args.student_model or tuna_p


def student_server_missing(args, tuna_p):
    """What to do when no student server serves Tuna_p: the command that starts one, then --resume."""
    model = student_model(args, tuna_p)
    return (f"pipeline: the student server at {args.student_base_url} failed its pre-flight check (above); "
            f"{tuna_p} is trained. Serve it there as '{model}', e.g. `vllm serve {tuna_p} "
            f"--served-model-name {model} --port PORT` (--tensor-parallel-size N for N GPUs) or `python "
            f"server.py --checkpoint {tuna_p} --model-name {model} --port PORT`, then rerun this command "
            "with --resume")


def pipeline_dry_run(args, command):
    """What the contextual teacher will be sent and cost; nothing trained, nothing sent."""
    if command is None:
        training.log("pipeline --dry-run: --contextual-data is given, so no teacher request would be sent")
        return None
    training.log("pipeline --dry-run: Tuna_p and Tuna are not trained; the contextual teacher's requests:")
    # the cost options given, passed on to teacher.py
    prices = []
    for name in ("count_tokenizer", "price_per_1m_input", "price_per_1m_output"):
        value = getattr(args, name)
        # a price of 0 is a price
        if value is not None:
            prices.append(f"--{name.replace('_', '-')}={value}")
    if subprocess.run(command + ["--dry-run", *prices]).returncode != 0:
        raise training.TrainingError("pipeline --dry-run: teacher.py contextual --dry-run failed (above)")
    return None


# ---- 7. the command line

def add_training_arguments(p, kind):
    """The flags a user changes: paths, length of training, batch, LoRA, precision, run
    folder, logging, processes. The method's fixed values are the constants at the top of
    this file."""
    lr, epochs, batch_size = ((SFT_LR, SFT_EPOCHS, SFT_BATCH_SIZE) if kind == "sft"
                              else (RANK_LR["probabilistic"], RANK_EPOCHS, RANK_BATCH_SIZE))
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
    p.add_argument("--precision", choices=list(training.PRECISIONS), default="bf16-mixed",
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
                   "(training.needs_checkpointing)")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's peak TFLOP/s, for the MFU in the log "
                   "(default: training.PEAK_TFLOPS by GPU name; none on a CPU)")
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
    p.add_argument("--student-base-url",
                   help="the contextual stage samples Tuna_p's candidates from this OpenAI-compatible server "
                   "(e.g. vLLM at http://127.0.0.1:8000/v1) instead of on --device; both trainings run here. "
                   "The pipeline never starts it: after training Tuna_p it stops, saying what to serve, "
                   "unless the server answers as --student-model; then rerun with --resume")
    p.add_argument("--student-model",
                   help="the name the student server serves OUT/tuna_p under "
                   "(default: OUT/tuna_p, as `vllm serve OUT/tuna_p` names it)")
    p.add_argument("--student-api-key-env", default="VLLM_API_KEY",
                   help="environment variable with the student server's API key (may be unset)")
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


def command_inputs(args):
    """The files and folders a command reads, by the flag that names them (None: not given)."""
    flags = ("init", "data", "tokenizer", "probabilistic_data", "contextual_data", "instructions")
    return {"--" + flag.replace("_", "-"): getattr(args, flag, None) for flag in flags}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tuna.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        subparser = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
    args = parser.parse_args(argv)
    # one writer per output folder (under torchrun, the main process holds the lock for all)
    try:
        # before anything is written: an --out over an input would destroy what the run reads
        data.refuse_output_over_inputs(args.out, command_inputs(args))
        writes = os.environ.get("RANK", "0") == "0" and not getattr(args, "dry_run", False)
        with data.lock_output(args.out) if writes else nullcontext():
            run_command = SUBCOMMANDS[args.command][2]
            run_command(args)
    # DataError is a ValueError
    except (training.TrainingError, data.OutputLocked, OSError, ValueError) as e:
        print(f"tuna.py {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
