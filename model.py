"""LLaMA in plain PyTorch: the model, the log-probs training reads from it, and generation.

Self-contained (torch and the standard library), so it can be copied into another
project alone; it knows no files (checkpoint.py reads and writes checkpoints into
and from it). Module names follow Meta's first LLaMA release, so Meta checkpoints
load with strict=True. Tuna needs three things from it (README, "The objective"):
logits for the SFT and ranking losses, per-response log-prob sums for scores, and
sampling of candidates for contextual ranking. Copy with it: nothing else of this project.

    import model
    net = model.Transformer(model.ModelArgs.from_name("tiny"))   # or checkpoint.load_checkpoint(folder)
    tokens, logprobs = model.generate(net, [prompt_ids], max_new_tokens=128, temperature=0.7, top_p=0.9)
"""
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# ---- 1. the model: ModelArgs, RMSNorm, RoPE, attention, feed-forward, blocks; log-probs of targets

@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    # None -> n_heads (MHA); fewer -> grouped-query attention
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    # FFN inner size; None: LLaMA's rule from multiple_of / ffn_dim_multiplier
    hidden_dim: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or a ROPE_SCALINGS kind: {"rope_type": ..., and its parameters}
    rope_scaling: dict | None = None
    head_dim: int | None = None  # None -> dim // n_heads
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_id: int = 1
    # a list: any of them ends generation (Llama 3.x Instruct's config.json)
    eos_id: int | list[int] = 2

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.hidden_dim is None:
            # Meta's rule: 2/3 of 4*dim (SwiGLU has three matrices), rounded up
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            step = self.multiple_of
            self.hidden_dim = step * ((hidden + step - 1) // step)  # up to a multiple
        if self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ValueError(f"ModelArgs: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads}) and head_dim ({self.head_dim}) even")

    @classmethod
    def from_name(cls, name):
        if name not in CONFIGS:
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(CONFIGS)}")
        return cls(**CONFIGS[name])


CONFIGS = {
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-6),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-6),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, max_seq_len=4096),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, max_seq_len=4096),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                       multiple_of=4096, max_seq_len=4096),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                 max_seq_len=256),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 (a bf16 mean of squares loses digits), cast back before
        # the gain (Meta, HF)
        x32 = x.float()
        inverse_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x32 * inverse_rms).type_as(x)


# RoPE frequency schemes (transformers' rope_type names) and the parameters each needs;
# see rope_frequencies.
ROPE_SCALINGS = {"default": (), "linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings")}


def rope_frequencies(args, device=None):
    """theta^(-2i/head_dim) for i < head_dim/2 (float32, as Meta and HF compute it),
    rescaled for long contexts: "linear" divides every frequency by factor (position
    interpolation, Chen et al. 2023); "llama3" (Llama 3.1) divides only the low ones,
    those whose wavelength exceeds original_max_position_embeddings /
    low_freq_factor, keeps the high ones (wavelength below original /
    high_freq_factor) and blends the two in between."""
    # 2i / head_dim
    exponents = torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim
    inv_freq = 1.0 / args.rope_theta ** exponents
    scaling = args.rope_scaling or {"rope_type": "default"}
    kind = scaling.get("rope_type")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        raise ValueError(f"ModelArgs.rope_scaling: rope_type {kind!r} is not implemented "
                         f"({', '.join(ROPE_SCALINGS)})")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    # 0 at the long-wavelength end, 1 at the other
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelength > original / low, inv_freq / factor,
                       torch.where(wavelength < original / high, inv_freq, blended))


def rope_cos_sin(inv_freq, positions):
    """cos and sin of position * frequency for the positions a call uses: positions (B, T)
    long, inv_freq (head_dim/2,) float32 (rope_frequencies) -> each (B, T, head_dim/2)
    float32, the values a table of every position would hold. Computed per forward pass
    (a few operations per token, nothing beside the matrix products), so memory follows
    the positions used, never max_seq_len (a config may say 10^9)."""
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # Meta layout: channels (2i, 2i+1) rotate as one pair (HF q/k rows are permuted into
    # this order on load).
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, heads, head_dim/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    # (B, T, 1, head_dim/2): same angle for every head
    cos, sin = cos[:, :, None], sin[:, :, None]
    # (B, T, heads, hd/2, 2)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)  # (B, T, heads, head_dim)


def grouped_attention(q, k, v, mask, repeat_kv=None):
    """softmax(q k^T / sqrt(head_dim) + mask) v where query head h reads key/value head
    h // (n_heads / n_kv_heads) (Meta's and HF's grouping), without copying keys and
    values per query head. q (B, n_heads, T, hd); k, v (B, n_kv_heads, S, hd); mask
    bool (True = may attend) or additive float, broadcast to (B, 1, T, S), None =
    causal. -> (B, n_heads, T, hd)
    repeat_kv: with a mask (T > 1), copy keys and values per query head; None = on
    CUDA only (below). True runs CUDA's path on any device, so that a CPU test checks
    it."""
    B, n_heads, T, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if n_kv_heads == n_heads:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    if T == 1 and mask is not None:
        # decode: a group's query heads are the query rows of one attention call
        # (B, n_kv_heads, group, hd)
        grouped = q.reshape(B, n_kv_heads, n_heads // n_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask)
        return out.view(B, n_heads, 1, head_dim)
    if mask is not None and (q.is_cuda if repeat_kv is None else repeat_kv):
        # CUDA's fused kernels that take a mask do not take grouped heads (its math
        # fallback would hold a (T, S) matrix per head; transformers makes the same
        # choice): repeat keys and values there.
        group = n_heads // n_kv_heads
        k = k.repeat_interleave(group, 1)  # (B, n_heads, S, hd)
        v = v.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache = None  # a KVCache only while generate() runs

    def forward(self, x, cos, sin, mask, cache_start):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        # (B, T, n_kv_heads, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        q = q.transpose(1, 2)  # (B, n_heads, T, head_dim) for SDPA
        k = k.transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = v.transpose(1, 2)
        if self.kv_cache is not None:
            # (B, n_kv_heads, S, head_dim)
            k, v = self.kv_cache.update(cache_start, k, v, mask.shape[-1])
        out = grouped_attention(q, k, v, mask)  # (B, n_heads, T, head_dim)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_heads * head_dim)
        return self.wo(out)  # (B, T, dim)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention, self.feed_forward = Attention(args), FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache_start):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache_start)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # True: keep each block's input, recompute the rest in backward
        self.gradient_checkpointing = False
        self.reset_rope()

    def reset_rope(self, device=None):
        # Computed, not stored in checkpoints (persistent=False); rebuilt in float32 after a
        # load onto the meta device or a cast of the model.
        self.register_buffer("rope_inv_freq", rope_frequencies(self.args, device), persistent=False)

    def forward(self, tokens, positions=None, mask=None, *, cache_start=None, output_positions=None,
                targets=None):
        """tokens (B, T) long -> logits (B, T, vocab) float32. positions (B, T) long,
        default 0..T-1 (a packed row may restart them); mask bool (B, T, S) or (B, 1,
        T, S), True = may attend (or additive float, 0 or -inf), default causal;
        every query must see at least one key (itself, say), or attention gives NaN.
        cache_start: generation only (prefill, decode_step, which pass positions and a
        mask over the S cache slots): the KV-cache slot the keys and values go to.
        output_positions (B, N) long: logits only at these row indices -> (B, N,
        vocab), so prompts and padding never go through the vocabulary-sized output
        layer (training scores, the last prompt token in prefill). targets (B, T or
        N) long: instead of logits, log p(target) of each position
        -> (B, T or N) float32, computed a chunk at a time (chunked_token_logprobs):
        the training loss never holds the vocabulary-sized logits whole."""
        B, T = tokens.shape
        if positions is None:
            if T > self.args.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.args.max_seq_len}")
            positions = torch.arange(T, device=tokens.device).expand(B, T)  # (B, T)
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, T, S): one pattern for every head
        cos, sin = rope_cos_sin(self.rope_inv_freq, positions)  # (B, T, head_dim/2) each
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        # cache_start is None in training; generation passes its KV-cache slot through to attention
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # the authors trained with gradient checkpointing (microsoft/LMOps tuna/
                # training arguments); here on only where memory needs it (README,
                # "Speed and memory")
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, cache_start,
                                                      use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache_start)
        if output_positions is not None:
            h = h[torch.arange(B, device=h.device)[:, None], output_positions]  # (B, N, dim)
        if targets is not None:
            return chunked_token_logprobs(self.output, self.norm(h), targets)  # (B, T or N)
        return self.output(self.norm(h)).float()  # (B, T or N, vocab)


# The scoring training reads through forward(..., targets=): log p(token) per position, a
# chunk of tokens at a time. Tokens whose vocabulary-sized logits exist at once in
# chunked_token_logprobs: 2048 x 32000 float32 logits are 262 MB (and their bf16
# original, softmax and gradient as much again), against 13.6k x 32000 (1.7 GB a copy)
# for a 16-instruction ranking batch held whole.
LOGPROB_CHUNK_TOKENS = 2048


def token_logprobs(logits, targets, ignore_index=-100):
    """log p(targets[..., t]) under logits[..., t, :] -> float32 of targets' shape, 0
    where target == ignore_index. The project's one token log-prob: the training loss
    (tuna.score_tokens) and the teacher server's scores (server.LocalTeacher) go
    through it: what the teacher reports, training optimises."""
    flat = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index,
                           reduction="none")
    return -flat.view(targets.shape)


def chunked_token_logprobs(output, hidden, targets):
    """token_logprobs(output(hidden), targets) for hidden (..., dim), targets (...) ->
    float32 (...), with the logits of LOGPROB_CHUNK_TOKENS tokens at a time. Under autograd
    each chunk (of two or more) is checkpointed: backward recomputes its logits (one
    more pass through the output layer) instead of keeping them, so training holds
    one chunk's logits, never all (the idea of fused linear cross-entropy, e.g.
    Liger-Kernel's, in plain PyTorch). Same values and gradients as the whole
    computation."""
    chunk_tokens = LOGPROB_CHUNK_TOKENS
    flat_hidden = hidden.flatten(0, -2)  # (n, dim)
    flat_targets = targets.flatten()  # (n,)
    # one chunk: nothing to save
    recompute = torch.is_grad_enabled() and len(flat_targets) > chunk_tokens
    pieces = []
    for start in range(0, len(flat_targets), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        chunk = (output, flat_hidden[piece], flat_targets[piece])
        if recompute:
            pieces.append(torch.utils.checkpoint.checkpoint(_output_logprobs, *chunk, use_reentrant=False))
        else:
            pieces.append(_output_logprobs(*chunk))
    return torch.cat(pieces).view(targets.shape)


def _output_logprobs(output, hidden, targets):
    # token_logprobs computes in float32
    return token_logprobs(output(hidden), targets)  # (n,)


# ---- 2. generation: a static KV cache, sampling, prefill, decode steps, compiled decode, generate

class KVCache:
    """Keys and values of one attention layer for up to `rows` rows and `max_len` slots
    (gpt-fast's layout): a static cache, allocated once per generate() batch, on the
    first write, with the keys' dtype (which autocast may have changed) and device,
    and never again. The batch is its first B rows: a decode step writes one slot of
    them in place; rows that finish are compacted into the front (keep_rows), in
    place. One address for the whole batch, so CUDA graphs (torch.compile mode
    "reduce-overhead") write into it (mark_static_address); a plain object, not a
    module, so each call sizes its own."""

    def __init__(self, rows, max_len):
        self.rows = rows
        self.max_len = max_len
        self.k = None  # (rows, n_kv_heads, max_len, head_dim) after the first write
        self.v = None

    def update(self, start, k, v, read_len):
        # k, v: (B, n_kv_heads, T, head_dim); read_len: slots read back
        if self.k is None:
            # (rows, n_kv_heads, max_len, head_dim)
            shape = (self.rows, k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
            if self.k.is_cuda:
                # CUDA graphs write here; a new batch's cache re-records them, no
                # recompile
                torch._dynamo.mark_static_address(self.k)
                torch._dynamo.mark_static_address(self.v)
        # (B, n_kv_heads, max_len, head_dim): views
        keys, values = self.k[:k.shape[0]], self.v[:k.shape[0]]
        if torch.is_tensor(start):
            # the compiled decode step: slot `start` (1,)
            keys.index_copy_(2, start, k)
            values.index_copy_(2, start, v)
        else:  # slots [start, start + T)
            written = slice(start, start + k.shape[2])
            keys[:, :, written] = k
            values[:, :, written] = v
        # (B, n_kv_heads, read_len, head_dim)
        return keys[:, :, :read_len], values[:, :, :read_len]

    def keep_rows(self, rows):
        # rows (B',): the new batch, in order (a row may repeat: a prompt's samples)
        # index_select copies first (one layer's rows at a time), so rows may move
        # forward or repeat
        kept_keys = self.k.index_select(0, rows)
        kept_values = self.v.index_select(0, rows)
        self.k[:len(rows)] = kept_keys
        self.v[:len(rows)] = kept_values


def sample_next(logits, temperature, top_p, generator=None, finished=None):
    """Next token per row from logits (B, vocab): argmax at temperature 0, else nucleus
    (top-p) sampling.
    generator: None (torch's default), one torch.Generator that the rows draw from in
    turn, or a list of B generators, one per row, so that a row's draw depends only
    on its own logits and generator. finished: None or (B,) bool; with a list of
    generators a finished row draws nothing (token 0), so its generator is left as its
    own tokens left it, whichever rows share its batch."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, vocab)
    if top_p < 1.0:
        # keep the smallest set of most likely tokens whose mass reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # the mass before it suffices
        sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if isinstance(generator, (list, tuple)):
        done = [False] * len(generator) if finished is None else finished.tolist()
        draws = [probs.new_zeros(1, dtype=torch.long) if row_done else torch.multinomial(row, 1, generator=g)
                 for row, g, row_done in zip(probs, generator, done)]
        return torch.cat(draws)  # (B,)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def prefill(model, tokens, positions, mask):
    """Run the (left-padded) prompts, filling KV-cache slots from 0; logits after the
    last slot (B, vocab)."""
    last = torch.full((tokens.shape[0], 1), tokens.shape[1] - 1, device=tokens.device)
    return model(tokens, positions, mask, cache_start=0, output_positions=last)[:, -1]


def decode_step(model, tokens, positions, mask, slot):
    """One token per row, tokens (B,) at positions (B,), into cache slot `slot`; logits
    for the next token (B, vocab). mask (B, S): the cache slots each row reads, bool
    or additive float (generate passes a float mask, which SDPA takes as it is). S =
    slot + 1 for an int slot; a bucket of slots (bucketed_decode_step) for a (1,)
    tensor slot (the compiled step)."""
    return model(tokens[:, None], positions[:, None], mask[:, None, None], cache_start=slot)[:, -1]


def bucketed_decode_step(model, tokens, positions, pad_mask, slot):
    """decode_step with few distinct shapes, for torch.compile (as gpt-fast): slot is a
    (1,) tensor and each row reads the S cache slots of pad_mask (B, S), those after
    `slot` masked out. pad_mask: 0, or -inf on padding; S is slot + 1 rounded up to a
    power of two (decode_bucket)."""
    later = torch.arange(pad_mask.shape[1], device=pad_mask.device) > slot  # (S,)
    return decode_step(model, tokens, positions, pad_mask.masked_fill(later, float("-inf")), slot)


def decode_bucket(slot, max_len):
    """The cache slots a compiled step at `slot` reads: slot + 1 rounded up to a power
    of two (at most max_len). Attention then reads at most twice the filled part of
    the cache, never the whole of it, and a generate() call meets about log2(max_len)
    shapes: one CUDA graph each."""
    # the power of two above slot, i.e. >= slot + 1
    return min(max_len, 1 << slot.bit_length())


def _eager_decode(model, tokens, positions, pad_mask, slot):
    # a view: nothing allocated
    return decode_step(model, tokens, positions, pad_mask[:, :slot + 1], slot)


# device type ("cpu", "cuda") -> torch.compile(bucketed_decode_step), built once;
# "error": why it cannot run
_compiled = {}


def _compiled_decode(model, tokens, positions, pad_mask, slot):
    device = tokens.device.type
    if "error" not in _compiled:
        try:
            if device not in _compiled:
                # dynamic: batch size and cache length are symbols, so one compilation
                # serves every call and every batch that rows leave (a batch of one row
                # compiles once more). CUDA: "reduce-overhead" records the step as a
                # CUDA graph per shape, one launch instead of hundreds of kernels
                mode = "reduce-overhead" if device == "cuda" else None
                _compiled[device] = torch.compile(bucketed_decode_step, dynamic=True, mode=mode)
            slot_tensor = torch.full((1,), slot, device=tokens.device)
            read = decode_bucket(slot, pad_mask.shape[1])
            if device == "cuda":
                # a new decode step: the last step's graph outputs were read already
                torch.compiler.cudagraph_mark_step_begin()
            return _compiled[device](model, tokens, positions, pad_mask[:, :read], slot_tensor)
        except Exception as e:
            # no C++ compiler, a Python or platform torch.compile does not support, ...
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            _compiled["error"] = f"{type(e).__name__}: {first_line}"
            print(f"model.py: torch.compile cannot run here ({_compiled['error']}); decoding eagerly",
                  file=sys.stderr)
    # the failed call wrote nothing: redo it
    return _eager_decode(model, tokens, positions, pad_mask, slot)


# A finished row leaves the batch once this share of the batch has finished: copying the
# KV cache of the rows that stay costs about one decode step's attention, so compacting
# row by row would cost more than it saves.
COMPACT_AT_FINISHED_SHARE = 1 / 8


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, temperature=0.0, top_p=1.0, eos_id=None, generator=None,
             num_samples=1, batch_size=None, compile=False):
    """num_samples rows per prompt, prompt-major (prompt i's samples are rows i *
    num_samples ...): each row's new tokens (the stop token included if produced,
    nothing after it) and each token's log-prob under the raw distribution
    (log_softmax at temperature 1, no top-p), as OpenAI's logprobs. eos_id: the id
    that ends a row, or a list of ids any of which ends it, as transformers'
    eos_token_id (Llama 3.x Instruct ends a turn with <|eot_id|> or <|eom_id|>, not
    only <|end_of_text|>); None -> model.args.eos_id.

    Work: each prompt is prefilled once and its KV cache copied to its rows; rows
    that produce a stop id leave the batch (COMPACT_AT_FINISHED_SHARE), so they stop
    costing work. batch_size caps the rows decoding together (memory; one prompt's
    rows at least): prompts then go in order of length, so a batch pads little; the
    output keeps the input order. Rows are left-padded and padding is masked out, so
    a row's logits do not depend on its neighbours. generator: None (torch's
    default), one torch.Generator shared by the rows (they draw from it in turn, so a
    row's samples depend on its neighbours), or a list of len(prompts) * num_samples
    generators, one per row: a row's samples then depend only on its prompt and its
    own generator, however the rows are batched (e.g. one seeded from (seed, item id)
    per row, so a resumed run samples what an uninterrupted one would). Generators
    live on the model's device.
    compile: decode with a torch.compile'd step (few shapes: the cache read in
    power-of-two buckets, as decode_bucket; on CUDA replayed as CUDA graphs); the
    first calls compile (about a minute on a CPU), and where torch.compile cannot run
    one line goes to stderr and decoding stays eager, the reference."""
    n_rows = len(prompts) * num_samples
    per_row_generators = isinstance(generator, (list, tuple))
    if num_samples < 1 or (per_row_generators and len(generator) != n_rows):
        raise ValueError(f"generate: num_samples must be >= 1 ({num_samples}) and a list of generators must "
                         f"hold one per row, len(prompts) * num_samples = {n_rows}")
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in range(n_rows)], [[] for _ in range(n_rows)]
    _check_prompt_lengths(model, prompts, max_new_tokens)
    eos_id = model.args.eos_id if eos_id is None else eos_id
    stop_ids = [eos_id] if isinstance(eos_id, int) else sorted(set(eos_id))
    order = list(range(len(prompts)))
    if batch_size is None:
        per_batch = len(prompts)  # prompts per batch
    else:
        per_batch = max(1, batch_size // num_samples)
    if per_batch < len(prompts):
        order.sort(key=lambda i: len(prompts[i]))
    out_tokens = [None] * n_rows
    out_logprobs = [None] * n_rows
    step = _compiled_decode if compile else _eager_decode
    for start in range(0, len(order), per_batch):
        chunk = order[start:start + per_batch]
        rows = [i * num_samples + s for i in chunk for s in range(num_samples)]
        generators = [generator[r] for r in rows] if per_row_generators else generator
        batch_prompts = [prompts[i] for i in chunk]
        tokens, logprobs = _generate_batch(
            model, batch_prompts, num_samples, max_new_tokens,
            temperature, top_p, stop_ids, generators, step)
        for row, row_tokens, row_logprobs in zip(rows, tokens, logprobs):
            out_tokens[row] = row_tokens
            out_logprobs[row] = row_logprobs
    return out_tokens, out_logprobs


def without_stop(tokens, stops):
    """(the answer's tokens without the stop id that ended it, whether one did). Any of
    the tokenizer's stop_ids ends an answer (Llama 3.x Instruct: <|end_of_text|>,
    <|eom_id|>, <|eot_id|>), which is then finished and trained with the tokenizer's EOS
    (data.encode_prompt_response); generate stops at the first one, so it can only be the
    last token."""
    finished = bool(tokens) and tokens[-1] in stops
    return (tokens[:-1] if finished else tokens), finished


def _left_pad(prompts, total, device):
    """Left-pad so every row's next token lands in the same cache slot. Each row's
    positions start at 0 at its own first token and pad slots are masked out, so a
    row's tokens do not depend on its neighbours. -> tokens (n_prompts, P), positions
    and real (n_prompts, total), prompt_mask (n_prompts, P, P)."""
    P = max(map(len, prompts))
    pad = torch.tensor([P - len(p) for p in prompts], device=device)  # (n_prompts,)
    padded = [[0] * (P - len(p)) + list(p) for p in prompts]
    tokens = torch.tensor(padded, device=device)  # (n_prompts, P)
    slots = torch.arange(total, device=device)
    positions = (slots[None] - pad[:, None]).clamp(min=0)  # (n_prompts, total)
    real = slots[None] >= pad[:, None]  # (n_prompts, total): False on pad slots
    # prompt slot i sees real slots j <= i, and itself (so a pad slot's softmax row
    # is never empty: no NaN)
    causal = slots[None, :P] <= slots[:P, None]  # (P, P)
    causal_real = causal & real[:, None, :P]  # (n_prompts, P, P)
    itself = torch.eye(P, dtype=torch.bool, device=device)  # (P, P)
    prompt_mask = causal_real | itself  # (n_prompts, P, P)
    return tokens, positions, real, prompt_mask


def _prefill_rows(model, tokens, positions, real, prompt_mask, num_samples):
    """Prefill each prompt once, then give each of its num_samples rows a copy of its
    KV cache, next-token logits, positions and pad mask (rows prompt-major)."""
    n_prompts, P = tokens.shape
    logits = prefill(model, tokens, positions[:, :P], prompt_mask)  # (n_prompts, vocab)
    # Decode steps read an additive mask in the cache's dtype, sliced per step
    # (SDPA converts bool ones)
    cache_dtype = model.layers[0].attention.kv_cache.k.dtype
    pad_mask = torch.zeros(real.shape, dtype=cache_dtype, device=tokens.device)
    pad_mask = pad_mask.masked_fill(~real, float("-inf"))  # (n_prompts, total)
    prompt_ids = torch.arange(n_prompts, device=tokens.device)
    prompt_of_row = prompt_ids.repeat_interleave(num_samples)  # (B,)
    if num_samples > 1:  # a prompt's rows share its prefill
        for layer in model.layers:
            layer.attention.kv_cache.keep_rows(prompt_of_row)
    logits = logits[prompt_of_row]
    positions = positions[prompt_of_row]
    pad_mask = pad_mask[prompt_of_row]
    return logits, positions, pad_mask


def _check_prompt_lengths(model, prompts, max_new_tokens):
    if min(map(len, prompts)) == 0:
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    total = max(map(len, prompts)) + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(f"generate: prompt + max_new_tokens = {total} exceeds max_seq_len "
                         f"{model.args.max_seq_len}")


def _generate_batch(model, prompts, num_samples, max_new_tokens, temperature, top_p, stop_ids, generator,
                    step):
    device = model.tok_embeddings.weight.device
    stop_ids = torch.tensor(stop_ids, dtype=torch.long, device=device)  # (n_stop,)
    P = max(map(len, prompts))
    total = P + max_new_tokens
    tokens, positions, real, prompt_mask = _left_pad(prompts, total, device)
    for layer in model.layers:
        layer.attention.kv_cache = KVCache(len(prompts) * num_samples, total)
    try:
        logits, positions, pad_mask = _prefill_rows(
            model, tokens, positions, real, prompt_mask, num_samples)
        B = len(logits)
        row_of = torch.arange(B, device=device)  # the output row of each batch row
        new_tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        new_logprobs = torch.zeros(B, max_new_tokens, device=device)
        lengths = torch.full((B,), max_new_tokens, device=device)
        # produced a stop id, still in the batch
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step_index in range(max_new_tokens):
            token = sample_next(logits, temperature, top_p, generator, finished)  # (b,)
            new_tokens[row_of, step_index] = token
            logprobs = torch.log_softmax(logits.float(), -1)  # (B, vocab)
            new_logprobs[row_of, step_index] = logprobs.gather(-1, token[:, None])[:, 0]
            ended = torch.isin(token, stop_ids) & ~finished
            lengths[row_of[ended]] = step_index + 1
            finished |= ended
            n_finished = int(finished.sum())  # the one host sync per step
            if step_index == max_new_tokens - 1 or n_finished == len(finished):
                break
            compact_at = max(1, int(len(finished) * COMPACT_AT_FINISHED_SHARE))
            if n_finished >= compact_at:  # finished rows leave
                keep = (~finished).nonzero()[:, 0]
                for layer in model.layers:
                    layer.attention.kv_cache.keep_rows(keep)
                token, positions = token[keep], positions[keep]
                pad_mask, row_of = pad_mask[keep], row_of[keep]
                finished = finished[keep]
                if isinstance(generator, list):
                    generator = [generator[i] for i in keep.tolist()]
            slot = P + step_index
            logits = step(model, token, positions[:, slot], pad_mask, slot)
    finally:
        for layer in model.layers:
            layer.attention.kv_cache = None
    lengths = lengths.tolist()
    return ([row[:n] for row, n in zip(new_tokens.tolist(), lengths)],
            [row[:n] for row, n in zip(new_logprobs.tolist(), lengths)])


# ---- 3. how many rows decode together: from free device memory

# Share of free memory the rows may take: the rest is headroom for the allocator's
# fragmentation and for the small tensors of each step (masks, tokens, positions).
GENERATION_MEMORY_SHARE = 0.9


def kv_cache_bytes_per_row(args, max_len, dtype_bytes):
    """One row's static KV cache: layers x (keys, values) x kv_heads x head_dim x
    max_len slots x bytes."""
    return args.n_layers * 2 * args.n_kv_heads * args.head_dim * max_len * dtype_bytes


def generation_bytes_per_row(args, max_len, prompt_len, dtype_bytes):
    """What one row holds while generate() runs: its KV cache; its decode step's
    vocabulary-sized float32 tensors (logits, log_softmax, softmax, top-p's sorted
    probabilities, their cumulative sum and the scatter back: 6 x 4 bytes, and the
    sort's int64 order: 8 bytes); and, counted per row though a prompt's samples
    share it, its prompt's prefill in one layer (hidden state, q, k, v, attention
    output: 4 x dim + 2 x kv_dim; the feed-forward's three hidden-sized tensors) plus
    a float32 score per head and key, the math attention's (the worst case: fused
    kernels keep none)."""
    cache = kv_cache_bytes_per_row(args, max_len, dtype_bytes)
    vocabulary = args.vocab_size * (6 * 4 + 8)
    kv_dim = args.n_kv_heads * args.head_dim
    prefill = prompt_len * ((4 * args.dim + 2 * kv_dim + 3 * args.hidden_dim) * dtype_bytes
                            + args.n_heads * prompt_len * 4)
    return cache + vocabulary + prefill


def rows_that_fit(args, free_bytes, max_len, prompt_len, dtype_bytes, weight_bytes=0):
    """Rows that may decode together in free_bytes of device memory (at least 1): what
    is left of GENERATION_MEMORY_SHARE of it after weight_bytes (0 when the model is
    loaded already, so that its weights are out of free_bytes), divided by
    generation_bytes_per_row."""
    usable = free_bytes * GENERATION_MEMORY_SHARE - weight_bytes
    return max(1, int(usable // generation_bytes_per_row(args, max_len, prompt_len, dtype_bytes)))


def free_memory(device):
    """Bytes this process may still allocate. CUDA: what the driver reports free plus
    what torch's allocator holds unused, within the cap of
    torch.cuda.set_per_process_memory_fraction if one is set. A CPU (Linux):
    MemAvailable from /proc/meminfo, RAM shared with the rest of the machine."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        free += torch.cuda.memory_reserved(device) - allocated
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        fraction = 1.0 if get_fraction is None else get_fraction(device)
        return min(free, int(fraction * total) - allocated)
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def auto_batch_rows(model, max_len, prompt_len, fallback):
    """Rows per generate() call for a loaded model: on CUDA, rows_that_fit its
    free_memory, with the cache in the weights' dtype; on other devices `fallback`: a
    CPU's RAM is shared with the rest of the machine, and a CPU's decode step costs
    in proportion to its rows, so the gain of a big batch is a GPU's."""
    weight = model.tok_embeddings.weight
    if weight.device.type != "cuda":
        return fallback
    free_bytes = free_memory(weight.device)
    dtype_bytes = weight.element_size()
    return rows_that_fit(model.args, free_bytes, max_len, prompt_len, dtype_bytes)
