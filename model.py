"""LLaMA in plain PyTorch: the model, generation, scoring and checkpoints.

Self-contained (torch, numpy, the standard library), so it can be copied into another
project alone. Module names follow Meta's first LLaMA release, so Meta checkpoints
load with strict=True; Hugging Face checkpoints go through hf_to_meta (key names plus
the q/k row permutation). Tuna needs three things from it (README, "The objective"):
logits for the SFT and ranking losses, sampling of candidates for contextual ranking,
and per-response log-prob sums for scores:

    import model
    net = model.load_checkpoint("llama-2-7b-hf/", device="cuda", dtype=torch.bfloat16)  # or a Meta folder
    tokens, logprobs = model.generate(net, [prompt_ids], max_new_tokens=128, temperature=0.7, top_p=0.9)
"""
import glob
import hashlib
import json
import math
import mmap
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ---- the model: its shape (ModelArgs), RMSNorm, RoPE, attention, feed-forward, blocks
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

    @classmethod
    def from_hf_config(cls, path):
        """A Hugging Face config.json; read and checked with the checkpoints
        (_args_from_hf_config)."""
        return _args_from_hf_config(cls, path)

    @classmethod
    def from_meta_params(cls, path, vocab_size=None):
        """Meta's params.json; read and checked with the checkpoints
        (_args_from_meta_params)."""
        return _args_from_meta_params(cls, path, vocab_size)


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


def rope_tables(args, device=None):
    """cos and sin of position * frequency (rope_frequencies), each (max_seq_len,
    head_dim/2), float32."""
    positions = torch.arange(args.max_seq_len, device=device).float()
    angles = torch.outer(positions, rope_frequencies(args, device))  # (max_seq_len, head_dim/2)
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
        # Computed, not stored in checkpoints (persistent=False); rebuilt after a load
        # onto the meta device.
        cos, sin = rope_tables(self.args, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens, positions=None, mask=None, *, cache_start=None, output_positions=None,
                targets=None):
        """tokens (B, T) long -> logits (B, T, vocab) float32. positions (B, T) long,
        default 0..T-1 (a packed row may restart them); mask bool (B, T, S) or (B, 1,
        T, S), True = may attend (or additive float, 0 or -inf), default causal;
        every query must see at least one key (itself, say), or attention gives NaN.
        cache_start: write keys/values to KV-cache slots from there (generation
        only); keys span S slots. A (1,) tensor (the compiled decode step, with
        positions and mask given) writes that one slot and reads the mask's S slots.
        output_positions (B, N) long: logits only at these row indices -> (B, N,
        vocab), so prompts and padding never go through the vocabulary-sized output
        layer (training scores, the last prompt token in prefill). targets (B, T or
        N) long: instead of logits, log p(target) of each position
        -> (B, T or N) float32, computed a chunk at a time (chunked_token_logprobs):
        the training loss never holds the vocabulary-sized logits whole."""
        B, T = tokens.shape
        # cache_start: an int slot (prefill, eager decode) or a (1,) tensor slot (the
        # compiled decode step, which passes positions and a mask, so the first slot is
        # not needed here)
        slot_is_tensor = torch.is_tensor(cache_start)
        start = 0 if slot_is_tensor or cache_start is None else cache_start
        if positions is None:
            if start + T > self.args.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len "
                                 f"{self.args.max_seq_len}")
            # (B, T)
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        if mask is None and cache_start is not None:
            # slot start + i sees slots 0 .. start + i
            slots = torch.arange(start + T, device=tokens.device)
            mask = slots[None, :] <= slots[start:, None]  # (T, S)
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, T, S): one pattern for every head
        cos = self.rope_cos[positions]  # (B, T, head_dim/2)
        sin = self.rope_sin[positions]
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # the authors trained with gradient checkpointing (microsoft/LMOps tuna/
                # training arguments); here on only where memory needs it (README,
                # "Speed and memory")
                h = checkpoint(layer, h, cos, sin, mask, cache_start, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache_start)
        if output_positions is not None:
            h = h[torch.arange(B, device=h.device)[:, None], output_positions]  # (B, N, dim)
        if targets is not None:
            return chunked_token_logprobs(self.output, self.norm(h), targets)  # (B, T or N)
        return self.output(self.norm(h)).float()  # (B, T or N, vocab)


# ---- generation: a static KV cache, prefill, decode steps, sampling, generate
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


# ---- how many rows decode together: from free device memory
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


# ---- scoring: log p(token) per position, a chunk of tokens at a time
# Tokens whose vocabulary-sized logits exist at once in chunked_token_logprobs: 2048 x
# 32000 float32 logits are 262 MB (and their bf16 original, softmax and gradient as much
# again), against 13.6k x 32000 (1.7 GB a copy) for a 16-instruction ranking batch held
# whole.
LOGPROB_CHUNK_TOKENS = 2048


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
            pieces.append(checkpoint(_output_logprobs, *chunk, use_reentrant=False))
        else:
            pieces.append(_output_logprobs(*chunk))
    return torch.cat(pieces).view(targets.shape)


def _output_logprobs(output, hidden, targets):
    # token_logprobs computes in float32
    return token_logprobs(output(hidden), targets)  # (n,)


def token_logprobs(logits, targets, ignore_index=-100):
    """log p(targets[..., t]) under logits[..., t, :] -> float32 of targets' shape, 0
    where target == ignore_index. The project's one token log-prob: the training loss
    (tuna.score_tokens) and the teacher server's scores (server.LocalTeacher) go
    through it: what the teacher reports, training optimises."""
    flat = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index,
                           reduction="none")
    return -flat.view(targets.shape)



# ---- checkpoints: Hugging Face <-> Meta names
# Meta -> Hugging Face module names, per layer and at the top
LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
               "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
               "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}
TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def _meta_to_hf_names(args):
    names = {f"{meta}.weight": f"{hf}.weight" for meta, hf in TOP_NAMES.items()}
    for i in range(args.n_layers):
        names.update({f"layers.{i}.{meta}.weight": f"model.layers.{i}.{hf}.weight"
                      for meta, hf in LAYER_NAMES.items()})
    return names


def _permute_qk_rows(weight, n_heads, to_hf):
    # Meta rotates channel pairs (2i, 2i+1) of each head; HF rotates (i, i + head_dim/2)
    # ("rotate_half"). Reordering the rows of wq / wk turns one layout into the other
    # with identical logits.
    head_dim = weight.shape[0] // n_heads
    split = (n_heads, head_dim // 2, 2, -1) if to_hf else (n_heads, 2, head_dim // 2, -1)
    # (n_heads * head_dim, dim)
    return weight.reshape(split).transpose(1, 2).reshape(weight.shape)


def _convert(state_dict, args, to_hf):
    names = _meta_to_hf_names(args)
    names = names if to_hf else {hf: meta for meta, hf in names.items()}
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):
            # older HF files saved this computed buffer
            continue
        meta_key = key if to_hf else names.get(key, key)
        if meta_key.endswith(("attention.wq.weight", "attention.wk.weight")):
            n_heads = args.n_heads if ".wq." in meta_key else args.n_kv_heads
            tensor = _permute_qk_rows(tensor, n_heads, to_hf)
        out[names.get(key, key)] = tensor
    return out


def meta_to_hf(state_dict, args):
    return _convert(state_dict, args, to_hf=True)


def hf_to_meta(state_dict, args):
    """Unknown keys pass through unchanged, so the strict load names them."""
    return _convert(state_dict, args, to_hf=False)


# ---- safetensors: 8-byte little-endian header size, JSON header, raw little-endian bytes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


def read_safetensors(path):
    """All tensors of one .safetensors file, memory-mapped copy-on-write: a page is read
    when first used."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 <= header_len <= min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{path}: header length {header_len} does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e})") from None
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + header_len, size - 8 - header_len
    tensors, spans = {}, []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        info = info if isinstance(info, dict) else {}
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise ValueError(f"{where}: unknown dtype {info.get('dtype')!r} (known: "
                             f"{', '.join(SAFETENSORS_DTYPES)})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"{where}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{where}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise ValueError(f"{where}: data_offsets [{begin}, {end}] lie outside the {data_size} data bytes")
        numel = math.prod(shape)
        if end - begin != numel * dtype.itemsize:
            raise ValueError(f"{where}: {end - begin} bytes cannot hold shape {shape} of {info['dtype']}")
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        spans.append((begin, end, name))
        tensor = torch.frombuffer(buffer, dtype=dtype, count=numel, offset=data_start + begin).view(shape)
        aligned = (data_start + begin) % dtype.itemsize == 0
        # keep loads aligned
        tensors[name] = tensor if aligned else tensor.clone()
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise ValueError(f"{path}: tensors {first!r} and {second!r} overlap (bytes {begin} to {end})")
    return tensors


def write_safetensors(path, tensors, metadata=None):
    """Write tensors (on any device) atomically (_write_atomic)."""
    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
    # largest items first: every tensor then starts at a multiple of its item size (data
    # begins 8-aligned)
    order = sorted(tensors, key=lambda name: -tensors[name].element_size())
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in codes:
            raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot "
                             "store")
        end = offset + tensor.numel() * tensor.element_size()
        header[name] = {"dtype": codes[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    # trailing spaces are allowed and keep the data 8-byte aligned
    blob += b" " * (-len(blob) % 8)
    header_bytes = len(blob).to_bytes(8, "little") + blob
    _write_atomic(path, _safetensors_chunks(header_bytes, tensors, order))


def _safetensors_chunks(header_bytes, tensors, order):
    yield header_bytes
    for name in order:  # one tensor at a time on the CPU
        tensor = tensors[name].detach().to("cpu")
        flat = tensor.contiguous().reshape(-1)  # (numel,) in row-major order
        yield flat.view(torch.uint8).numpy().data


# ---- checkpoint configs: config.json / params.json -> ModelArgs, the rest refused by name
# config.json fields that change the computation, with the one value model.py implements
# (an absent field means transformers' default, which is that value). Sliding windows
# and RoPE settings are checked apart.
HF_IMPLEMENTED_VALUES = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                         "attention_dropout": 0.0, "partial_rotary_factor": 1.0, "quantization_config": None}
# Mistral's model is LLaMA's plus a sliding window. pretraining_tp (LLaMA 2) splits
# matrix products into slices in transformers, the same products: it is not read here.
HF_MODEL_TYPES = ("llama", "mistral")
META_SCALED_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}


def _args_from_hf_config(cls, path):
    """A Hugging Face config.json of a LLaMA (or Mistral) model, as transformers 4 or 5
    writes it. Every field that changes the computation is implemented or refused
    with its value; fields transformers itself does not read for these models (e.g.
    SmolLM2's rope_interleaved) are ignored, as there."""
    cfg = _read_json(path)
    if cfg.get("model_type", "llama") not in HF_MODEL_TYPES:
        raise ValueError(f"{path}: model_type={cfg['model_type']!r} is not supported by model.py "
                         f"(supported: {', '.join(HF_MODEL_TYPES)})")
    for key, implemented in HF_IMPLEMENTED_VALUES.items():
        if cfg.get(key, implemented) != implemented:
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported by model.py (it implements "
                             f"{key}={implemented!r})")
    max_positions = cfg.get("max_position_embeddings", 2048)
    window = cfg.get("sliding_window")
    if window is not None and window < max_positions:
        # Mistral 7B v0.1: 4096 of 32768
        raise ValueError(f"{path}: sliding_window={window!r} is active (below max_position_embeddings="
                         f"{max_positions}); model.py attends to every earlier token")
    rope_theta, rope_scaling = _hf_rope_settings(cfg, path)
    # eos: an id, or a list (Llama 3.x)
    bos, eos = cfg.get("bos_token_id"), cfg.get("eos_token_id")
    try:
        return cls(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                   n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads"),
                   vocab_size=cfg["vocab_size"],
                   hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                   rope_theta=rope_theta, rope_scaling=rope_scaling, head_dim=cfg.get("head_dim"),
                   max_seq_len=max_positions, tie_embeddings=cfg.get("tie_word_embeddings", False),
                   bos_id=1 if bos is None else bos, eos_id=2 if eos is None else eos)
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e}") from None


def _args_from_meta_params(cls, path, vocab_size=None):
    """Meta's params.json (LLaMA 1/2, Code Llama, Llama 3.x). Keys Meta's reference code
    reads and model.py does not implement (vision, quantization, LoRA adapters) are
    refused by name, as is any other unknown key."""
    params = _read_json(path)
    missing = [key for key in ("dim", "n_layers", "n_heads") if key not in params]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}")
    known = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps",
             "rope_theta")
    unknown = sorted(set(params) - set(known) - {"vocab_size", "use_scaled_rope"})
    if unknown:
        raise ValueError(f"{path}: not supported by model.py: "
                         f"{', '.join(f'{key}={params[key]!r}' for key in unknown)}")
    # Meta writes -1: the size comes from the tokenizer or weights
    vocab = params.get("vocab_size", -1)
    vocab = vocab if vocab > 0 else vocab_size
    if not vocab:
        raise ValueError(f"{path}: vocab_size is {params.get('vocab_size')} and no vocab_size was given")
    # Llama 3.1/3.2: Meta's reference code (llama-models, apply_scaling) fixes the
    # parameters in code
    scaling = dict(META_SCALED_ROPE) if params.get("use_scaled_rope") else None
    return cls(vocab_size=vocab, rope_scaling=scaling,
               **{key: params[key] for key in known if params.get(key) is not None})


def _hf_rope_settings(cfg, path):
    """(rope_theta, rope_scaling or None) from either layout: transformers 4 writes
    rope_theta and rope_scaling at the top level, transformers 5 one rope_parameters
    object ({"rope_theta", "rope_type", parameters}). A file holding both must say
    the same in both."""
    layouts = {}
    if "rope_theta" in cfg or cfg.get("rope_scaling"):
        layouts["rope_scaling"] = {"rope_theta": cfg.get("rope_theta", 10000.0),
                                   **(cfg.get("rope_scaling") or {})}
    if cfg.get("rope_parameters") is not None:
        layouts["rope_parameters"] = cfg["rope_parameters"]
    read = {where: _rope_settings(settings, path, where) for where, settings in layouts.items()}
    if len({repr(settings) for settings in read.values()}) > 1:
        raise ValueError(f"{path}: the two RoPE layouts disagree: rope_theta={cfg.get('rope_theta')!r}, "
                         f"rope_scaling={cfg.get('rope_scaling')!r}, "
                         f"rope_parameters={cfg['rope_parameters']!r}")
    # 10000: LlamaConfig's and MistralConfig's default
    return next(iter(read.values()), (10000.0, None))


def _rope_settings(settings, path, where):
    """One layout's RoPE object -> (rope_theta, rope_scaling or None); unknown types,
    parameters: refused."""
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: {where}={settings!r} is not an object")
    # "type": transformers' older name
    kind = settings.get("rope_type", settings.get("type", "default"))
    if "type" in settings and settings["type"] != kind:
        raise ValueError(f"{path}: {where} has type={settings['type']!r} and rope_type={kind!r}")
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"{path}: {where}.rope_type={kind!r} is not supported by model.py "
                         f"(supported: {', '.join(ROPE_SCALINGS)})")
    needed = ROPE_SCALINGS[kind]
    known = {"rope_theta", "rope_type", "type", *needed}
    extra = {key: value for key, value in settings.items() if key not in known}
    if extra:
        raise ValueError(f"{path}: {where} with rope_type={kind!r}: not supported by model.py: "
                         f"{', '.join(f'{key}={value!r}' for key, value in extra.items())}")
    numbers = {"rope_theta": settings.get("rope_theta", 10000.0),
               **{key: settings.get(key) for key in needed}}
    bad = [f"{key}={value!r}" for key, value in numbers.items()
           if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0]
    if kind == "llama3" and not bad and not numbers["low_freq_factor"] < numbers["high_freq_factor"]:
        bad.append("low_freq_factor >= high_freq_factor")
    if bad:
        raise ValueError(f"{path}: {where} with rope_type={kind!r}: missing or invalid: {', '.join(bad)}")
    scaling = {"rope_type": kind, **{key: numbers[key] for key in needed}} if needed else None
    return float(numbers["rope_theta"]), scaling


# ---- loading and saving whole checkpoints
def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def _write_atomic(path, chunks):
    """model.py's one atomic write: the byte chunks go to a temporary file, which
    reaches the disk (fsync) before it is renamed over path, so path holds the old
    file or the whole new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path, value, indent):
    text = json.dumps(value, indent=indent)
    _write_atomic(path, [text.encode("utf-8")])


def _read_hf_weights(path):
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: no weight_map object")
        state = {}
        for shard in sorted(set(weight_map.values())):
            if os.path.basename(shard) != shard:
                raise ValueError(f"{index_path}: shard {shard!r} is not a file name in {path}")
            state.update(read_safetensors(os.path.join(path, shard)))
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise ValueError(f"{index_path}: keys listed but absent from their shards: {absent[:10]}")
        return state
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return read_safetensors(os.path.join(path, "model.safetensors"))
    raise FileNotFoundError(f"{path}: has config.json but neither model.safetensors nor "
                            "model.safetensors.index.json")


# Meta's model-parallel shards (LLaMA 1/2, fairscale): column-parallel weights split
# rows, row-parallel ones columns, the embedding its feature dimension; norms are
# replicated.
MODEL_PARALLEL_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
                      "tok_embeddings": 1}


def _read_meta_weights(path):
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not files:
        raise FileNotFoundError(f"{path}: has params.json but no consolidated.*.pth")
    shards = []
    for file in files:
        try:
            shards.append(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # torch's messages do not name the file
            raise ValueError(f"{file}: torch.load(weights_only=True, mmap=True) failed: {e}") from e
    if len(shards) == 1:
        return shards[0]
    for file, shard in zip(files[1:], shards[1:]):
        if set(shard) != set(shards[0]):
            differing = sorted(set(shard) ^ set(shards[0]))[:10]
            raise ValueError(f"{file}: keys differ from {files[0]}: {differing}")
    merged = {}
    for key in shards[0]:
        dim = MODEL_PARALLEL_DIM.get(key.split(".")[-2]) if key.count(".") else None
        if dim is None:  # replicated in every shard
            merged[key] = shards[0][key]
        else:
            merged[key] = torch.cat([shard[key] for shard in shards], dim=dim)
    return merged


def load_checkpoint(path, device="cpu", dtype=None):
    """A Transformer (in eval mode) from a directory: Hugging Face (config.json +
    model.safetensors, or shards with model.safetensors.index.json) or Meta
    (params.json + consolidated.*.pth). The model is built on the meta device and
    takes over the memory-mapped tensors (assign=True), so the weights are never held
    twice in RAM."""
    if os.path.isfile(os.path.join(path, "config.json")):
        args = ModelArgs.from_hf_config(os.path.join(path, "config.json"))
        state = hf_to_meta(_read_hf_weights(path), args)
    elif os.path.isfile(os.path.join(path, "params.json")):
        state = _read_meta_weights(path)
        # LLaMA-1 files carry Meta's precomputed frequencies; recomputed here
        state.pop("rope.freqs", None)
        embedding = state.get("tok_embeddings.weight")
        args = ModelArgs.from_meta_params(os.path.join(path, "params.json"),
                                          vocab_size=None if embedding is None else embedding.shape[0])
    else:
        raise FileNotFoundError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) found")
    if args.tie_embeddings and "tok_embeddings.weight" in state:
        # one matrix; HF stores only the embedding
        state["output.weight"] = state["tok_embeddings.weight"]
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model built from its config: "
                         f"missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    state = {key: t.to(device, dtype if dtype is not None and t.is_floating_point() else t.dtype)
             # one tensor at a time; a no-op (still memory-mapped) on the CPU
             for key, t in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path}: {e}") from None
    if args.tie_embeddings:
        # assign=True replaced both parameters; make them one again
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope(device)
    return model.eval()


def save_hf_checkpoint(model, out_dir, dtype=None, max_shard_bytes=5 * 10**9):
    """config.json + safetensors in Hugging Face's LlamaForCausalLM layout, sharded with
    model.safetensors.index.json above max_shard_bytes. Each file is written to a
    temporary name, then renamed; config.json comes after the weights."""
    args = model.args
    dtype = dtype or model.tok_embeddings.weight.dtype
    state = model.state_dict()
    if args.tie_embeddings:
        # HF stores a tied matrix once, as the embedding
        state.pop("output.weight")
    shards, size = [[]], 0  # Meta key names per shard
    for key, tensor in state.items():
        if shards[-1] and size + tensor.numel() * dtype.itemsize > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(key)
        size += tensor.numel() * dtype.itemsize
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    os.makedirs(out_dir, exist_ok=True)
    weight_map = {}
    for name, keys in zip(names, shards):
        # one shard at a time in RAM, whatever the model's device
        tensors = meta_to_hf({key: state[key].detach().to("cpu", dtype) for key in keys}, args)
        write_safetensors(os.path.join(out_dir, name), tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() for t in state.values()) * dtype.itemsize},
                 "weight_map": weight_map}
        names.append("model.safetensors.index.json")
        _write_json(os.path.join(out_dir, names[-1]), index, indent=2)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
              "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
              "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
              "head_dim": args.head_dim,
              "hidden_act": "silu", "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
              # transformers 4's layout, which transformers 5 reads too
              "rope_scaling": args.rope_scaling,
              "attention_bias": False, "mlp_bias": False, "vocab_size": args.vocab_size,
              "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
              "bos_token_id": args.bos_id, "eos_token_id": args.eos_id,
              "torch_dtype": str(dtype).split(".")[-1],
              "use_cache": True}
    _write_json(os.path.join(out_dir, "config.json"), config, indent=2)
    for stale in os.listdir(out_dir):
        # weights of an earlier save that the index or loader could pick up
        weights = re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", stale)
        if weights and stale not in names:
            os.remove(os.path.join(out_dir, stale))
    write_checkpoint_identity(out_dir)


# ---- what a checkpoint is, for the caches of what it produced (student samples, eval answers)
IDENTITY_FILE = "checkpoint_identity.json"


def _checkpoint_files(path):
    """{name: (size, mtime_ns)} of the files that make a checkpoint: its config and
    weights."""
    weights = r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?|consolidated\.\d+\.pth"
    names = [name for name in sorted(os.listdir(path))
             if name in ("config.json", "params.json") or re.fullmatch(weights, name)]
    stats = {name: os.stat(os.path.join(path, name)) for name in names}
    return {name: (stat.st_size, stat.st_mtime_ns) for name, stat in stats.items()}


def _files_digest(path, files, blocks=None):
    """sha256 over each file's name, size and bytes: all of them, or `blocks` blocks of
    64 KiB spread evenly and the last 64 KiB."""
    digest = hashlib.sha256()
    for name, (size, _) in files.items():
        digest.update(f"{name}\0{size}\0".encode())
        with open(os.path.join(path, name), "rb") as f:
            if blocks is None:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    digest.update(chunk)
                continue
            for at in [size * i // blocks for i in range(blocks)] + [max(0, size - (1 << 16))]:
                f.seek(at)
                digest.update(f.read(1 << 16))
    return digest.hexdigest()


def write_checkpoint_identity(path):
    """Record the sha256 of a checkpoint folder's config and weights (and their sizes
    and modification times, so that a later change by another tool is noticed) in
    IDENTITY_FILE; save_hf_checkpoint calls it."""
    files = _checkpoint_files(path)
    record = {"sha256": _files_digest(path, files),
              "files": {name: list(stat) for name, stat in files.items()}}
    _write_json(os.path.join(path, IDENTITY_FILE), record, indent=1)


def checkpoint_identity(path):
    """A string that changes whenever the config or weights in a checkpoint folder
    change: "sha256:..." as save_hf_checkpoint recorded it, while the files are the
    ones it recorded; else (another tool's checkpoint, or files changed since)
    "sampled-sha256:...", over each file's name, size and 65 blocks of 64 KiB spread
    over it, its end included: cheap for a 13 GB folder, and retraining changes every
    block it reads."""
    files = _checkpoint_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no config.json, params.json or weight files")
    try:
        with open(os.path.join(path, IDENTITY_FILE), encoding="utf-8") as f:
            record = json.load(f)
        if {name: tuple(stat) for name, stat in record["files"].items()} == files:
            return "sha256:" + record["sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # absent or unreadable: sampled below
    return "sampled-sha256:" + _files_digest(path, files, blocks=64)
