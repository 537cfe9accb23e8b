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
import dataclasses
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
    (params.json + consolidated.*.pth). Nothing is allocated before every config field
    is checked (type, range, divisibility) and the tensor names and shapes the config
    implies are compared with the weight files' headers (check_weight_shapes). The
    model is built on the meta device and takes over the memory-mapped tensors
    (assign=True), so the weights are never held twice in RAM."""
    if os.path.isfile(os.path.join(path, "config.json")):
        config = os.path.join(path, "config.json")
        args = args_from_hf_config(config)
        files = _hf_weight_files(path)
        check_weight_shapes(config, args, _hf_header_shapes(path, files), "num_hidden_layers")
        state = hf_to_meta({key: t for file in files for key, t in read_safetensors(file).items()}, args)
    elif os.path.isfile(os.path.join(path, "params.json")):
        config = os.path.join(path, "params.json")
        shards = _load_meta_shards(path)
        found = _meta_shapes(shards)
        found.pop("rope.freqs", None)
        embedding = found.get("tok_embeddings.weight")
        args = args_from_meta_params(config, vocab_size=None if embedding is None else embedding[2][0])
        check_weight_shapes(config, args, found, "n_layers")
        state = _merge_meta_shards(shards)
    else:
        raise FileNotFoundError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) found")
    # LLaMA-1 files carry Meta's precomputed frequencies; recomputed here
    state.pop("rope.freqs", None)
    if args.tie_embeddings and "tok_embeddings.weight" in state:
        # one matrix; HF stores only the embedding
        state["output.weight"] = state["tok_embeddings.weight"]
    with torch.device("meta"):
        model = Transformer(args)
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


def default_device():
    """Where a command runs a model unless told (--device): the GPU when torch sees one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    _remove_killed_writes(out_dir)
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


def _remove_killed_writes(out_dir):
    """Remove the temporary files (NAME.tmpPID, _write_atomic's) that a killed save left
    in out_dir beside the files save_hf_checkpoint writes: gigabytes each at 7B. A
    folder has one writer (the scripts hold OUT.lock while they write it)."""
    saved = r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?|config\.json|" + re.escape(IDENTITY_FILE)
    for name in os.listdir(out_dir):
        written, _, pid = name.rpartition(".tmp")
        if pid.isdigit() and re.fullmatch(saved, written):
            os.remove(os.path.join(out_dir, name))


def _hf_weight_files(path):
    """The safetensors files of a Hugging Face folder: model.safetensors, or the shards its
    index names."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: no weight_map object")
        shards = sorted(set(map(str, weight_map.values())))
        for shard in shards:
            if os.path.basename(shard) != shard:
                raise ValueError(f"{index_path}: shard {shard!r} is not a file name in {path}")
        return [os.path.join(path, shard) for shard in shards]
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return [os.path.join(path, "model.safetensors")]
    raise FileNotFoundError(f"{path}: has config.json but neither model.safetensors nor "
                            "model.safetensors.index.json")


def _hf_header_shapes(path, files):
    """{Meta key: (file, the name there, shape)} from the files' headers: no tensor read."""
    found = {}
    for file in files:
        for name, (_, shape, _, _) in read_safetensors_header(file)[0].items():
            # older HF files saved this computed buffer
            if not name.endswith("rotary_emb.inv_freq"):
                found[_rename(name, to_hf=False)] = (file, name, shape)
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        absent = sorted(set(_read_json(index_path)["weight_map"]) - {name for _, name, _ in found.values()})
        if absent:
            raise ValueError(f"{index_path}: keys listed but absent from their shards: {absent[:10]}")
    return found


# Meta's model-parallel shards (LLaMA 1/2, fairscale): column-parallel weights split
# rows, row-parallel ones columns, the embedding its feature dimension; norms are
# replicated.
MODEL_PARALLEL_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
                      "tok_embeddings": 1}


def _load_meta_shards(path):
    """{file: its tensors, memory-mapped (nothing read yet)} of a Meta folder's
    consolidated.*.pth, in order, each with the keys of the first."""
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not files:
        raise FileNotFoundError(f"{path}: has params.json but no consolidated.*.pth")
    shards = {}
    for file in files:
        try:
            shards[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch's messages do not name the file
            raise ValueError(f"{file}: torch.load(weights_only=True, mmap=True) failed: {e}") from e
        if not isinstance(shards[file], dict) or not all(torch.is_tensor(t) for t in shards[file].values()):
            raise ValueError(f"{file}: not a dictionary of tensors")
        if set(shards[file]) != set(shards[files[0]]):
            differing = sorted(set(shards[file]) ^ set(shards[files[0]]))[:10]
            raise ValueError(f"{file}: keys differ from {files[0]}: {differing}")
    return shards


def _model_parallel_dim(key):
    """The dimension a model-parallel weight is split along, None for a replicated one."""
    return MODEL_PARALLEL_DIM.get(key.split(".")[-2]) if key.count(".") else None


def _meta_shapes(shards):
    """{key: (first file, key, shape once merged)} from the shards' tensors: no data read."""
    files = list(shards)
    found = {}
    for key, tensor in shards[files[0]].items():
        dim = _model_parallel_dim(key)
        shape = list(tensor.shape)
        for file in files[1:]:
            other = list(shards[file][key].shape)
            if dim is None or len(other) != len(shape) or dim >= len(shape):
                same = other == shape
            else:
                same = other[:dim] + other[dim + 1:] == shape[:dim] + shape[dim + 1:]
                shape[dim] += other[dim]
            if not same:
                raise ValueError(f"{file}: tensor {key!r} has shape {other}, which does not merge with "
                                 f"{files[0]}'s {list(tensor.shape)}")
        found[key] = (files[0], key, shape)
    return found


def _merge_meta_shards(shards):
    """One state dict from the model-parallel shards (concatenated along each weight's
    split), replicated tensors taken from the first."""
    tensors = list(shards.values())
    if len(tensors) == 1:
        return dict(tensors[0])
    merged = {}
    for key in tensors[0]:
        dim = _model_parallel_dim(key)
        if dim is None:  # replicated in every shard
            merged[key] = tensors[0][key]
        else:
            merged[key] = torch.cat([shard[key] for shard in tensors], dim=dim)
    return merged


# ---- 2. Hugging Face <-> Meta names: module names and the q/k row permutation

# Meta -> Hugging Face module names, per layer and at the top
LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
               "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
               "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}
TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def _rename(key, to_hf):
    """One weight's Meta name -> Hugging Face's (to_hf), or back; an unknown name unchanged."""
    layers_from, layers_to = ("layers.", "model.layers.") if to_hf else ("model.layers.", "layers.")
    layer_names = LAYER_NAMES if to_hf else {hf: meta for meta, hf in LAYER_NAMES.items()}
    top_names = TOP_NAMES if to_hf else {hf: meta for meta, hf in TOP_NAMES.items()}
    if not key.endswith(".weight"):
        return key
    module = key[:-len(".weight")]
    if module in top_names:
        return f"{top_names[module]}.weight"
    index, _, rest = module[len(layers_from):].partition(".")
    if module.startswith(layers_from) and index.isdigit() and rest in layer_names:
        return f"{layers_to}{index}.{layer_names[rest]}.weight"
    return key


def _permute_qk_rows(weight, n_heads, to_hf):
    # Meta rotates channel pairs (2i, 2i+1) of each head; HF rotates (i, i + head_dim/2)
    # ("rotate_half"). Reordering the rows of wq / wk turns one layout into the other
    # with identical logits.
    head_dim = weight.shape[0] // n_heads
    split = (n_heads, head_dim // 2, 2, -1) if to_hf else (n_heads, 2, head_dim // 2, -1)
    # (n_heads * head_dim, dim)
    return weight.reshape(split).transpose(1, 2).reshape(weight.shape)


def _convert(state_dict, args, to_hf):
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):
            # older HF files saved this computed buffer
            continue
        meta_key = key if to_hf else _rename(key, to_hf=False)
        if meta_key.endswith(("attention.wq.weight", "attention.wk.weight")):
            n_heads = args.n_heads if ".wq." in meta_key else args.n_kv_heads
            tensor = _permute_qk_rows(tensor, n_heads, to_hf)
        out[_rename(key, to_hf)] = tensor
    return out


def meta_to_hf(state_dict, args):
    return _convert(state_dict, args, to_hf=True)


def hf_to_meta(state_dict, args):
    """Unknown keys pass through unchanged, so the strict load names them."""
    return _convert(state_dict, args, to_hf=False)


# ---- 3. config.json / params.json -> ModelArgs, each field checked; the weights' shapes against it

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


# What each field model.py reads must hold (type and range), before anything is sized by
# it: a string, a float or 0 where a count belongs is refused by name, not met as a
# TypeError, a ZeroDivisionError or an 8 GB allocation. name -> (what it must be, null
# allowed: the default applies).
POSITIVE_INTEGER = "a positive integer"
POSITIVE_NUMBER = "a positive finite number"
TRUE_OR_FALSE = "true or false"
TOKEN_IDS = "a token id (an integer >= 0) or a list of them"
HF_FIELDS = {"hidden_size": (POSITIVE_INTEGER, False), "intermediate_size": (POSITIVE_INTEGER, False),
             "num_hidden_layers": (POSITIVE_INTEGER, False), "num_attention_heads": (POSITIVE_INTEGER, False),
             "num_key_value_heads": (POSITIVE_INTEGER, True), "head_dim": (POSITIVE_INTEGER, True),
             "vocab_size": (POSITIVE_INTEGER, False), "max_position_embeddings": (POSITIVE_INTEGER, False),
             "sliding_window": (POSITIVE_INTEGER, True), "rms_norm_eps": (POSITIVE_NUMBER, False),
             "tie_word_embeddings": (TRUE_OR_FALSE, False), "bos_token_id": (TOKEN_IDS, True),
             "eos_token_id": (TOKEN_IDS, True)}
# vocab_size apart: Meta writes -1 (the size comes from the weights)
META_FIELDS = {"dim": (POSITIVE_INTEGER, False), "n_layers": (POSITIVE_INTEGER, False),
               "n_heads": (POSITIVE_INTEGER, False), "n_kv_heads": (POSITIVE_INTEGER, True),
               "multiple_of": (POSITIVE_INTEGER, False), "ffn_dim_multiplier": (POSITIVE_NUMBER, True),
               "norm_eps": (POSITIVE_NUMBER, False), "rope_theta": (POSITIVE_NUMBER, False),
               "use_scaled_rope": (TRUE_OR_FALSE, False)}


def _holds(value, kind):
    """Whether a JSON value is of the kind (POSITIVE_INTEGER, ...); a bool is no number."""
    if kind == TRUE_OR_FALSE:
        return isinstance(value, bool)
    if kind == TOKEN_IDS:
        ids = value if isinstance(value, list) and value else [value]
        return all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value <= 0):
        return False
    return kind == POSITIVE_NUMBER or isinstance(value, int)


def _check_fields(settings, path, fields):
    """Each present field of `fields` is of its kind (null only where allowed), or a
    ValueError naming the file, the field and its value."""
    for name, (kind, nullable) in fields.items():
        if name not in settings or (settings[name] is None and nullable):
            continue
        if not _holds(settings[name], kind):
            raise ValueError(f"{path}: {name}={settings[name]!r}: expected {kind}")


def _check_heads(path, names, dim, n_heads, n_kv_heads, head_dim):
    """Attention heads that model.py can build: query heads a multiple of key/value heads, an
    even head size (RoPE rotates pairs), and dim divisible by the heads where head_dim is not
    given. names: the file's names for (dim, n_heads, n_kv_heads, head_dim)."""
    dim_name, heads_name, kv_name, head_dim_name = names
    if n_heads % n_kv_heads:
        raise ValueError(f"{path}: {heads_name}={n_heads} is not a multiple of {kv_name}={n_kv_heads}")
    if head_dim is None and dim % n_heads:
        raise ValueError(f"{path}: {dim_name}={dim} is not a multiple of {heads_name}={n_heads} "
                         f"(and no {head_dim_name} is given)")
    if (head_dim or dim // n_heads) % 2:
        given = f"{head_dim_name}={head_dim}" if head_dim else f"{dim_name} / {heads_name} = {dim // n_heads}"
        raise ValueError(f"{path}: {given}: expected an even number (RoPE rotates pairs of channels)")


def args_from_hf_config(path):
    """ModelArgs from a Hugging Face config.json of a LLaMA (or Mistral) model, as
    transformers 4 or 5 writes it. Every field that changes the computation is
    implemented or refused with its value, and every field model.py reads is checked
    for type and range (HF_FIELDS); fields transformers itself does not read for these
    models (e.g. SmolLM2's rope_interleaved) are ignored, as there."""
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object")
    _check_fields(cfg, path, HF_FIELDS)
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
        heads = cfg["num_attention_heads"]
        _check_heads(path, ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"),
                     cfg["hidden_size"], heads, cfg.get("num_key_value_heads") or heads, cfg.get("head_dim"))
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
    if not isinstance(params, dict):
        raise ValueError(f"{path}: not a JSON object")
    missing = [key for key in ("dim", "n_layers", "n_heads") if key not in params]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}")
    _check_fields(params, path, META_FIELDS)
    known = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps",
             "rope_theta")
    unknown = sorted(set(params) - set(known) - {"vocab_size", "use_scaled_rope"})
    if unknown:
        raise ValueError(f"{path}: not supported by model.py: "
                         f"{', '.join(f'{key}={params[key]!r}' for key in unknown)}")
    # Meta writes -1: the size comes from the tokenizer or weights
    vocab = params.get("vocab_size", -1)
    if vocab != -1:
        _check_fields(params, path, {"vocab_size": (POSITIVE_INTEGER, False)})
    vocab = vocab if vocab != -1 else vocab_size
    if not vocab:
        raise ValueError(f"{path}: vocab_size is {params.get('vocab_size')} and no vocab_size was given")
    # Llama 3.1/3.2: Meta's reference code (llama-models, apply_scaling) fixes the
    # parameters in code
    scaling = dict(META_SCALED_ROPE) if params.get("use_scaled_rope") else None
    heads = params["n_heads"]
    _check_heads(path, ("dim", "n_heads", "n_kv_heads", "head_dim"), params["dim"], heads,
                 params.get("n_kv_heads") or heads, None)
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
    bad = [f"{key}={value!r}" for key, value in numbers.items() if not _holds(value, POSITIVE_NUMBER)]
    if kind == "llama3" and not bad and not numbers["low_freq_factor"] < numbers["high_freq_factor"]:
        bad.append("low_freq_factor >= high_freq_factor")
    if bad:
        raise ValueError(f"{path}: {where} with rope_type={kind!r}: missing or invalid: {', '.join(bad)}")
    scaling = {"rope_type": kind, **{key: numbers[key] for key in needed}} if needed else None
    return float(numbers["rope_theta"]), scaling


def expected_shapes(args):
    """{Meta key: shape} of Transformer(args)'s state dict, in its order, without building
    n_layers blocks: one block is built on the meta device and named for every layer."""
    with torch.device("meta"):
        one_block = Transformer(dataclasses.replace(args, n_layers=1))
    shapes = {}
    for key, tensor in one_block.state_dict().items():
        if key.startswith("layers.0."):
            shapes.update({f"layers.{i}.{key[len('layers.0.'):]}": tuple(tensor.shape)
                           for i in range(args.n_layers)})
        else:
            shapes[key] = tuple(tensor.shape)
    return shapes


def check_weight_shapes(config_path, args, found, layers_field):
    """The weights' layer count, then every tensor name and shape the config implies
    (expected_shapes), against found: {Meta key: (file, its name there, shape)} read from
    the files' headers. Runs before any tensor or block is allocated, so a config that
    says 10^5 layers or another width is an error naming the file and field or tensor."""
    path = os.path.dirname(config_path)
    if args.tie_embeddings and "tok_embeddings.weight" in found:
        # one matrix; HF stores only the embedding
        found = {**found, "output.weight": found["tok_embeddings.weight"]}
    layers = {int(key.split(".")[1]) for key in found if re.match(r"layers\.\d+\.", key)}
    held = max(layers) + 1 if layers else 0
    if held != args.n_layers:
        raise ValueError(f"{config_path}: {layers_field}={args.n_layers}, but the weights hold {held} layers")
    expected = expected_shapes(args)
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model built from its config: "
                         f"missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    for key, shape in expected.items():
        file, name, held_shape = found[key]
        if tuple(held_shape) != shape:
            raise ValueError(f"{file}: tensor {name!r} has shape {list(held_shape)}, but "
                             f"{os.path.basename(config_path)} makes it {list(shape)}")


# ---- 4. safetensors: 8-byte little-endian header size, JSON header, raw little-endian bytes

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


def read_safetensors(path):
    """All tensors of one .safetensors file, memory-mapped copy-on-write: a page is read
    when first used."""
    entries, data_start = read_safetensors_header(path)
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if begin == end:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        tensor = torch.frombuffer(buffer, dtype=dtype, count=math.prod(shape), offset=data_start + begin)
        aligned = (data_start + begin) % dtype.itemsize == 0
        # keep loads aligned
        tensors[name] = tensor.view(shape) if aligned else tensor.view(shape).clone()
    return tensors


def read_safetensors_header(path):
    """The tensors of one .safetensors file as its header describes them, every entry
    checked (dtype, shape, offsets inside the data, no overlap), nothing of the data
    read: ({name: (dtype, shape, begin, end)}, where the data starts)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 <= header_len <= min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{path}: header length {header_len} does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e})") from None
        except RecursionError:
            # a real header nests 3 levels; past the reader's limit (about 1,000)
            raise ValueError(f"{path}: header is {NESTED_TOO_DEEP}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + header_len, size - 8 - header_len
    entries, spans = {}, []
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
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{where}: {end - begin} bytes cannot hold shape {shape} of {info['dtype']}")
        entries[name] = (dtype, shape, begin, end)
        if begin < end:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise ValueError(f"{path}: tensors {first!r} and {second!r} overlap (bytes {begin} to {end})")
    return entries, data_start


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

# Python's JSON reader recurses once per level; a real header or config nests a few levels
NESTED_TOO_DEEP = "JSON nested too deep (deeper than Python's JSON reader allows)"


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: {NESTED_TOO_DEEP}") from None


def _write_atomic(path, chunks):
    """checkpoint.py's one atomic write: the byte chunks go to a temporary file
    (PATH.tmpPID), which reaches the disk (fsync) before it is renamed over path, so
    path holds the old file or the whole new one. A write that fails removes its
    temporary file; one a kill left is removed by the next save of the folder
    (save_hf_checkpoint)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_json(path, value, indent):
    text = json.dumps(value, indent=indent)
    _write_atomic(path, [text.encode("utf-8")])
