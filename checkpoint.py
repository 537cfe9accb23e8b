"""Reading and writing LLaMA checkpoints: Hugging Face and Meta folders <-> model.py's Transformer.

Hugging Face folders (config.json + model.safetensors, or shards with
model.safetensors.index.json) and Meta's (params.json + consolidated.*.pth) load into
a model.Transformer; save_hf_checkpoint writes Hugging Face's LlamaForCausalLM layout,
so every stage's output also loads in transformers and vLLM. Hugging Face names go
through hf_to_meta (key names plus the q/k row permutation); safetensors files are read
and written by hand (torch, numpy, the standard library). Every config field that would change
the computation is implemented or refused by name. Copy with it: model.py.

    import checkpoint
    net = checkpoint.load_checkpoint("llama-2-7b-hf/", device="cuda", dtype=torch.bfloat16)  # or Meta's
    checkpoint.save_hf_checkpoint(net, "out/")
"""
import glob
import hashlib
import json
import math
import mmap
import os
import re

import torch

from model import ROPE_SCALINGS, ModelArgs, Transformer


# ---- 1. loading and saving whole checkpoints

def load_checkpoint(path, device="cpu", dtype=None):
    """A Transformer (in eval mode) from a directory: Hugging Face (config.json +
    model.safetensors, or shards with model.safetensors.index.json) or Meta
    (params.json + consolidated.*.pth). The model is built on the meta device and
    takes over the memory-mapped tensors (assign=True), so the weights are never held
    twice in RAM."""
    if os.path.isfile(os.path.join(path, "config.json")):
        args = args_from_hf_config(os.path.join(path, "config.json"))
        state = hf_to_meta(_read_hf_weights(path), args)
    elif os.path.isfile(os.path.join(path, "params.json")):
        state = _read_meta_weights(path)
        # LLaMA-1 files carry Meta's precomputed frequencies; recomputed here
        state.pop("rope.freqs", None)
        embedding = state.get("tok_embeddings.weight")
        args = args_from_meta_params(os.path.join(path, "params.json"),
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


# ---- 2. Hugging Face <-> Meta names: module names and the q/k row permutation

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


# ---- 3. config.json / params.json -> ModelArgs, the rest refused by name

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


def args_from_hf_config(path):
    """ModelArgs from a Hugging Face config.json of a LLaMA (or Mistral) model, as
    transformers 4 or 5 writes it. Every field that changes the computation is
    implemented or refused with its value; fields transformers itself does not read
    for these models (e.g. SmolLM2's rope_interleaved) are ignored, as there."""
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
        return ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                         n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads"),
                         vocab_size=cfg["vocab_size"],
                         hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                         rope_theta=rope_theta, rope_scaling=rope_scaling, head_dim=cfg.get("head_dim"),
                         max_seq_len=max_positions, tie_embeddings=cfg.get("tie_word_embeddings", False),
                         bos_id=1 if bos is None else bos, eos_id=2 if eos is None else eos)
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e}") from None


def args_from_meta_params(path, vocab_size=None):
    """ModelArgs from Meta's params.json (LLaMA 1/2, Code Llama, Llama 3.x); vocab_size:
    the embedding's rows, for files that write -1. Keys Meta's reference code reads
    and model.py does not implement (vision, quantization, LoRA adapters) are refused
    by name, as is any other unknown key."""
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
    return ModelArgs(vocab_size=vocab, rope_scaling=scaling,
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


# ---- 4. safetensors: 8-byte little-endian header size, JSON header, raw little-endian bytes

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


# ---- 5. what a checkpoint is, for the caches of what it produced (student samples, eval answers)

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


# ---- 6. files: JSON and the one atomic write

def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def _write_atomic(path, chunks):
    """checkpoint.py's one atomic write: the byte chunks go to a temporary file, which
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
