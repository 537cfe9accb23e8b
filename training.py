"""The plumbing of a tuna.py training run: run folders and resume, precision, processes, LoRA, speed, memory.

tuna.py holds the method and its loop; what its train_step and setup call is here, each under a name that
says what it does: the run's state and step plan (Run, plan_steps), the model in its precision with LoRA
adapters (load_model, autocast), the update's guards (clip_gradients, refuse_non_finite), run folders and
checkpoints that resume exactly, several processes under torchrun (DDP or FSDP2), FLOPs, MFU and when to
recompute activations, and each step's metrics line. Imports model.py and data.py; never tuna.py or
teacher.py.
"""
import argparse
import json
import math
import os
import random
import shutil
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
from checkpoint import checkpoint_identity, load_checkpoint, save_hf_checkpoint

# ---- 1. a run: what tuna.setup builds and the loop carries; its steps, errors and messages

@dataclass
class Run:
    """One stage's training, as tuna.setup builds it: what train_step and the loop need."""
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
    rows: list = None           # the packed instructions (tuna.load_rows)
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


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says which file, step or setting."""


def is_main():
    """Whether this is the process that writes files and logs (rank 0, or the only one)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def log(message):
    """A line on stderr, from the main process only."""
    if is_main():
        print(message, file=sys.stderr, flush=True)


def plan_steps(run):
    """Micro-batches per process and step, steps per epoch and in all; -> the micro-batch size."""
    args = run.args
    processes = run.world_size
    micro_batch_size = args.micro_batch_size or math.ceil(args.batch_size / processes)
    run.micro_batches = math.ceil(args.batch_size / (processes * micro_batch_size))
    full_batches, rest = divmod(len(run.rows), args.batch_size)
    # a last, partial batch counts if every micro-batch of every process gets a row; else dropped
    run.steps_per_epoch = full_batches + (rest >= processes * run.micro_batches)
    run.total_steps = min(run.steps_per_epoch * args.epochs, args.max_steps or math.inf)
    if run.total_steps == 0:
        raise TrainingError(f"{args.data}: {len(run.rows)} usable example(s), fewer than one batch of "
                            f"{min(args.batch_size, processes * run.micro_batches)}")
    return micro_batch_size


# ---- 2. the model to train: its precision, LoRA adapters, autocast

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


def load_model(run, tok, checkpoint, state):
    """The model in --precision's dtype, LoRA adapters added if asked, in training mode; sets
    run.autocast_dtype. checkpoint, state: the checkpoint resumed from and its training state, or None."""
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
    net = load_checkpoint(start_from, run.device, weights_dtype)
    check_fits(net, tok, run)
    if args.lora_rank:
        add_lora(net, args.lora_rank, args.lora_alpha, args.lora_targets.split(","))
        if state:
            net.load_state_dict(state["lora"], strict=False)
    net.train()
    return net


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


def autocast(run):
    """Matrix products in run.autocast_dtype; weights and optimizer keep their dtype."""
    if run.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(run.device.type, dtype=run.autocast_dtype)


# ---- 3. the update's guards: clip the gradients, refuse a non-finite step

def clip_gradients(net, max_norm):
    """The total gradient norm (every shard under FSDP); clips the gradients to max_norm."""
    params = [p for p in net.parameters() if p.requires_grad]
    # max_norm 0: measured, not clipped
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    # FSDP2: a sharded DTensor
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def refuse_non_finite(run, step, batch_rows, loss, grad_norm):
    """A NaN or inf stops the run before the update, naming the step, its records and
    the last good checkpoint."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    raise TrainingError(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step + 1} "
                        f"(records {[r['id'] for r in batch_rows][:8]}...); stopped before the update; "
                        f"last good checkpoint: {latest_checkpoint(run.out) or run.args.init}")


# ---- 4. run folders and checkpoints: what a run writes, and how it resumes

# OUT is the run folder from the first step on: run.json (the settings), metrics.jsonl,
# and the newest checkpoints/step-N (each written to step-N.tmp and renamed: whole or
# absent). When the run ends, the final weights are written into OUT itself, config.json
# last, so OUT/config.json marks a finished run.

def run_settings(args, kind, tokenizer_files, method_constants):
    """What makes two runs the same run, recorded in OUT/run.json: the settings that
    change the math (the micro-batch size and the process count do not, see tuna.rank_loss),
    the method's fixed values (method_constants: name -> value, tuna.py's), and what the
    inputs hold: the data file's SHA-256, the identity of the --init checkpoint
    (checkpoint.checkpoint_identity: a LoRA run resumes from the base model there) and
    each tokenizer file's SHA-256 (tokenizer_files: name -> path), so that --resume never
    continues a run on other data, another base model or another tokenizer under the same
    paths."""
    names = ("lr", "epochs", "max_steps", "batch_size", "seed", "precision",
             "lora_rank", "lora_alpha", "lora_targets", "mle_best_only")
    settings = {name: getattr(args, name) for name in names}
    return dict(
        kind=kind,
        init=os.path.abspath(args.init),
        init_identity=checkpoint_identity(args.init),
        tokenizer_sha256={name: data.file_sha256(path) for name, path in sorted(tokenizer_files.items())},
        data=os.path.abspath(args.data),
        data_sha256=data.file_sha256(args.data),
        **settings,
        **method_constants,
    )


def run_folder_state(out, settings, args):
    """What to do with OUT, without changing it: "new" (absent, or --overwrite on a run
    folder or an empty folder), "resume" (--resume on an unfinished run with the same
    settings) or "done" (--resume on a finished one). Anything else is refused: an
    existing run is never replaced silently, and nothing but a run is replaced."""
    if not os.path.lexists(out):
        return "new"
    if args.overwrite:
        refuse_replacing(out)
        return "new"
    if not args.resume:
        raise TrainingError(f"{out} already exists: pass --resume to continue its run "
                            "or --overwrite to start over")
    stored = os.path.join(out, "run.json")
    if not os.path.isfile(stored):
        raise TrainingError(f"{out} is not a run folder of tuna.py (no run.json): choose another --out")
    try:
        with open(stored, encoding="utf-8") as f:
            previous = json.load(f)
    except ValueError as e:
        raise TrainingError(f"{stored}: not readable JSON ({e}); use --overwrite to start over") from None
    keys = set(previous) | set(settings)
    changed = sorted(k for k in keys if previous.get(k) != settings.get(k))
    if changed:
        raise TrainingError(f"{stored}: this run was started with other settings ({', '.join(changed)}); "
                            "use --overwrite to start over")
    return "done" if os.path.isfile(os.path.join(out, "config.json")) else "resume"


def refuse_replacing(out):
    """--overwrite replaces a run folder of tuna.py (its run.json names a kind of run) or an
    empty folder, never anything else a user may have named by mistake (a project, a
    checkpoint, a file, a symlink): those are refused by name and left as they are."""
    if os.path.isdir(out) and not os.path.islink(out):
        if not os.listdir(out):
            return
        try:
            with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
                settings = json.load(f)
            if isinstance(settings, dict) and settings.get("kind") in ("sft", "rank"):
                return
        except (OSError, ValueError):
            pass  # no run.json of tuna.py: refused below
    raise TrainingError(f"--overwrite: {out} is not a run folder of tuna.py (a folder with its run.json) "
                        "nor an empty folder, so it is left as it is: choose another --out, or remove it "
                        "yourself")


def open_run_folder(run):
    """A new run: OUT (an --overwrite'n run folder removed first) with run.json. A resumed
    one: what a kill left half-written is removed (remove_killed_writes), and its metrics
    from after the checkpoint are forgotten, as the steps that made them are trained
    again."""
    metrics = os.path.join(run.out, "metrics.jsonl")
    if run.state == "new":
        if os.path.isdir(run.out):
            shutil.rmtree(run.out)
        os.makedirs(os.path.join(run.out, "checkpoints"))
        data.write_atomic(os.path.join(run.out, "run.json"), json.dumps(run.settings, indent=2))
    else:
        remove_killed_writes(run.out)
        kept = [r for _, r in data.read_jsonl_log(metrics) if r.get("step", 0) <= run.start_step]
        data.write_atomic(metrics, (json.dumps(r) + "\n" for r in kept))


def remove_killed_writes(out):
    """The temporary files and folders a killed run left in its run folder: step
    checkpoints not yet renamed (checkpoints/step-N.tmp, gigabytes at 7B) and
    data.write_atomic's files (run.json.*.tmp, metrics.jsonl.*.tmp). The final save's
    weights clear their own (checkpoint.save_hf_checkpoint)."""
    checkpoints = os.path.join(out, "checkpoints")
    for name in os.listdir(checkpoints) if os.path.isdir(checkpoints) else []:
        if name.startswith("step-") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(checkpoints, name))
    for name in os.listdir(out):
        if name.startswith(("run.json.", "metrics.jsonl.")) and name.endswith(".tmp"):
            os.remove(os.path.join(out, name))


def latest_checkpoint(out):
    """The newest whole checkpoints/step-N of run folder `out`, or None."""
    folder = os.path.join(out, "checkpoints")
    if not os.path.isdir(folder):
        return None
    # a .tmp folder is one a kill interrupted
    steps = sorted(n for n in os.listdir(folder) if n.startswith("step-") and not n.endswith(".tmp"))
    return os.path.join(folder, steps[-1]) if steps else None


def read_training_state(checkpoint):
    """checkpoint/training_state.pt (see training_state), or an error naming it."""
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
    set_optimizer_state_dict(run.wrapped, run.optimizer, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    run.start_step = state["step"]


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
    optimizer_state = None if finished else get_optimizer_state_dict(run.wrapped, run.optimizer,
                                                                     options=options)
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
    torch.save(training_state(run, step, finished, optimizer_state, model_state),
               os.path.join(folder, "training_state.pt"))
    # weights, then config.json
    save_hf_checkpoint(plain_model(run.net, model_state), folder)
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
    return {
        "step": step,
        "finished": finished,
        "optimizer": optimizer_state,
        "rng": rng,
        "data_position": dict(epoch=epoch, batches_done_in_epoch=batches_done, seed=run.args.seed),
        "lora": {k: v for k, v in model_state.items() if k.endswith((".lora_a", ".lora_b"))},
    }


# ---- 5. several processes (torchrun): start them, share decisions, wrap the model

def start_processes(device_name=None):
    """-> (process rank, world size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK;
    NCCL on GPUs, gloo on CPUs."""
    cuda = torch.cuda.is_available() and device_name != "cpu"
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    # this process's GPU on its machine
    default_device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
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
    return nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)


def gradient_sync(wrapped, enabled):
    """Gradient accumulation: processes reduce gradients at a step's last micro-batch only."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return nullcontext() if enabled else wrapped.no_sync()
    # FSDP2
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(enabled)
    return nullcontext()


# ---- 6. LoRA (Hu et al. 2021): low-rank adapters on frozen weights, merged when saved

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
    """A plain model.Transformer with `state` (LoRA merged), for checkpoint.save_hf_checkpoint."""
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


# ---- 7. speed (MFU) and memory: FLOPs of a step, activations, when to recompute them

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
    return next((tflops for known, tflops in PEAK_TFLOPS if known in torch.cuda.get_device_name(device)),
                None)


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


def row_bytes(args, tokens, multiple_candidates, dtype_bytes):
    """The least memory a step on one packed row of `tokens` tokens takes (an estimate):
    its activations with gradient checkpointing (activation_bytes) and, for a row of
    several candidates, its (T, T) attention mask. tuna.collate builds the bool mask from
    two more bool (T, T) tensors (same segment, visible: 3 T^2 bytes at its peak, T^2
    kept for the step), and SDPA turns a bool mask into an additive one in the compute
    dtype at each attention call (T^2 x dtype bytes; one layer's at a time when blocks are
    recomputed). Not counted: the (n_heads, T, T) float32 scores SDPA's math path would
    hold. With a mask, model.grouped_attention's calls run fused kernels that take the
    mask as a bias and keep no scores (on a CPU the flash kernel, on CUDA the
    memory-efficient one, after repeating keys and values), and counting the math path
    (n_heads x 4 bytes per T^2) would refuse rows that those kernels train."""
    mask = tokens * tokens * (3 + dtype_bytes) if multiple_candidates else 0
    return activation_bytes(args, tokens, True, dtype_bytes) + mask


def refuse_rows_that_cannot_fit(run, net):
    """Each packed row must fit alone, with gradient checkpointing (row_bytes: the least a
    step on it takes), in what TRAINING_MEMORY_SHARE of free memory leaves once the
    trainable parameters' gradients and Adam moments (12 bytes each) are allocated; else
    a DataError naming the file, the record and its tokens, before anything is written.
    (One record of 10,000 candidates once packed 228,913 tokens whose 52 GB mask failed
    after run.json was written.)"""
    dtype_bytes = activation_dtype_bytes(run, net)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    free = llama.free_memory(run.device)
    budget = free * TRAINING_MEMORY_SHARE - trainable * 12
    for row in run.rows:
        tokens = len(row["tokens"])
        need = row_bytes(net.args, tokens, row["num_candidates"] > 1, dtype_bytes)
        if need > budget:
            raise data.DataError(
                f"{run.args.data}, record {row['record']} (id {row['id']!r}): its {tokens} tokens in one row "
                f"need about {need / 2**30:.2f} GiB (activations with gradient checkpointing and a "
                f"{tokens} x {tokens} attention mask), more than the {max(budget, 0) / 2**30:.2f} GiB "
                f"that {free / 2**30:.2f} GiB free on {run.device.type} leave for it: shorten or split "
                "the record")


def activation_dtype_bytes(run, net):
    """Bytes of an activation: autocast's dtype where the step autocasts (load_model decides),
    else the weights'."""
    if run.autocast_dtype is None:
        return net.tok_embeddings.weight.element_size()
    return run.autocast_dtype.itemsize


def choose_checkpointing(run, net, micro_batch_size):
    """--gradient-checkpointing on, off, or auto: needs_checkpointing for the largest
    micro-batch this run can meet (micro_batch_size rows, each padded to the longest row),
    logged with its figures."""
    choice = run.args.gradient_checkpointing
    if choice != "auto":
        return choice == "on"
    tokens = micro_batch_size * max(len(r["tokens"]) for r in run.rows)
    dtype_bytes = activation_dtype_bytes(run, net)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    free = llama.free_memory(run.device)
    on = needs_checkpointing(net.args, tokens, free, trainable, dtype_bytes)
    log(f"gradient checkpointing {'on' if on else 'off'} (auto): {tokens} tokens per micro-batch keep "
        f"about {activation_bytes(net.args, tokens, False, dtype_bytes) / 2**30:.1f} GiB of activations "
        f"without it; {free / 2**30:.1f} GiB free on {run.device.type}")
    return on


# ---- 8. the metrics line: each step's loss terms, speed and MFU

def record_step(run, step, batch_rows, began, values):
    """Each step's loss terms to OUT/metrics.jsonl; a console line every --log-every steps."""
    if not is_main():
        return
    tokens = sum(len(r["tokens"]) for r in batch_rows)
    model_flops, hardware_flops = step_flops(run.net, batch_rows, run.net.gradient_checkpointing)
    run.tokens_seen += tokens
    run.flops_seen = (run.flops_seen[0] + model_flops, run.flops_seen[1] + hardware_flops)
    elapsed = time.time() - began
    speed = dict(tokens_per_s=run.tokens_seen / elapsed,
                 model_flops_per_token=model_flops / tokens,
                 hardware_flops_per_token=hardware_flops / tokens)
    # the FLOPs done so far over what all processes' devices could do in that time
    if run.peak_tflops:
        peak = run.peak_tflops * 1e12 * run.world_size * elapsed
        speed.update(mfu=run.flops_seen[0] / peak, hfu=run.flops_seen[1] / peak)
    metrics = dict(step=step + 1, epoch=step // run.steps_per_epoch, **values,
                   tokens=tokens, **speed, elapsed_s=elapsed)
    data.append_jsonl(os.path.join(run.out, "metrics.jsonl"), [metrics])
    done = step + 1
    if done % run.args.log_every and done != run.total_steps:
        return
    mfu = f", MFU {speed['mfu']:.1%} (with recomputation {speed['hfu']:.1%})" if run.peak_tflops else ""
    log(f"step {done}/{run.total_steps} | loss {values['loss']:.4f} (mle {values['mle']:.4f}, "
        f"rank {values['rank']:.4f}) | lr {values['lr']:.2e} | "
        f"{speed['tokens_per_s']:.0f} tok/s x {model_flops / tokens / 1e9:.3g} GFLOP/token{mfu} | "
        f"ETA {data.duration_text(elapsed / (done - run.start_step) * (run.total_steps - done))}")
