"""
Checkpoint layouts of the Hugging Face hub, as plain key maps: the LMs (config.json + safetensors or .bin, sharded or
not) and OpenFlamingo's checkpoint.pt. Nothing here builds a model: lm.py and model.py ask this file what a
checkpoint holds and under which names, and build their own modules from the answer.

1. Finding and reading files: a local directory or a hub id, every tensor read shard by shard (weights_only).
2. A config.json's settings as LMConfig fields, and the config.json of a few public LMs for offline dry runs.
3. One key map per LM family: for each of our tensor names, the checkpoint's names that make it (Llama's q, k and v
   become our one c_attn), used both ways: reading any of them, writing GPT-2 and Llama layouts.
4. OpenFlamingo's checkpoint.pt: its trained parts under our names, and the layout they imply.

Our names are nanoGPT's (transformer.wte, transformer.h.{i}.attn.c_attn, ...), which are GPT-2's.
"""

import json
import os
import re

import torch

import files

# -----------------------------------------------------------------------------
# 1. Files


def resolve_checkpoint_dir(path_or_hub_id):
    """A local directory as it is; otherwise a hub id, downloaded once (config, tokenizer and weights only: the
    safetensors where the repository has both kinds, as IDEFICS's and many others do)."""
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id) or path_or_hub_id.startswith((".", "/")) or path_or_hub_id.count("/") > 1:
        raise FileNotFoundError(f"{path_or_hub_id!r} is not a checkpoint directory")
    try:
        from huggingface_hub import list_repo_files, snapshot_download
        try:
            safetensors = any(f.endswith(".safetensors") for f in list_repo_files(path_or_hub_id))
        except Exception:  # offline: what the cache holds
            safetensors = None
        weights = ["*.safetensors"] if safetensors else ["*.bin"] if safetensors is False else ["*.safetensors", "*.bin"]
        return snapshot_download(path_or_hub_id, allow_patterns=["*.json", "*.model", *weights])
    except Exception as e:
        raise RuntimeError(
            f"could not find {path_or_hub_id!r} locally nor download it from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Offline? Download it elsewhere (huggingface-cli download {path_or_hub_id}) and pass the local directory.") from None


def read_config(path):
    """A checkpoint directory's config.json as a dict; FileError when it is not a JSON object."""
    file = os.path.join(path, "config.json")
    with open(file, "rb") as f:
        try:
            config = files.loads(f.read().decode("utf-8"))
        except ValueError as e:  # not UTF-8, not JSON, nested too deep
            raise files.FileError(f"{file} is not a readable config ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise files.FileError(f"{file} is not a JSON object")
    return config


def load_state_dict(path, dtype=None):
    """All tensors of a checkpoint directory: safetensors or .bin (weights_only), single or sharded (an
    .index.json, as MPT-7B's two pytorch_model-0000k-of-00002.bin). Read shard by shard, each tensor cast to
    `dtype` as its shard is read: a bf16 run never holds the LM in fp32, only one shard at a time as stored."""
    from safetensors.torch import load_file
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = os.path.join(path, single + ".index.json")  # model.safetensors.index.json, pytorch_model.bin...
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(files.loads(f.read())["weight_map"].values()))
            break
        if os.path.exists(os.path.join(path, single)):
            shards = [single]
            break
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or their sharded .index.json) in {path}")
    sd = {}
    for shard in shards:
        file = os.path.join(path, shard)
        if shard.endswith(".safetensors"):
            part = load_file(file)
        else:
            try:  # mapped, not read whole; files older than torch 1.6's zip format cannot be mapped
                part = files.torch_load(file, map_location="cpu", mmap=True)
            except RuntimeError:
                part = files.torch_load(file, map_location="cpu")
        sd.update({k: v if dtype is None or not v.is_floating_point() else v.to(dtype) for k, v in part.items()})
        del part
    return sd


# -----------------------------------------------------------------------------
# 2. Configs


def lm_config_fields(hf: dict) -> dict:
    """The LMConfig fields of a Hugging Face config.json dict (read only: the dict is not changed). Settings the
    LM does not implement are refused (NotImplementedError), never ignored."""
    mt = hf.get("model_type")
    if mt == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise NotImplementedError(f"GPT-2 activation {hf['activation_function']!r}")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise NotImplementedError("GPT-2 attention scaled other than by 1/sqrt(head_dim)")
        return dict(arch="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                    n_embd=hf["n_embd"], n_inner=hf.get("n_inner"), block_size=hf["n_positions"], bias=True,
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=hf.get("tie_word_embeddings", True))
    if mt == "idefics":  # its LM is a LLaMA (idefics.py reads the rest)
        return lm_config_fields({**hf, "model_type": "llama", "num_key_value_heads": hf["num_attention_heads"],
                                 "head_dim": None})
    if mt in ("llama", "qwen2", "mistral"):
        if hf.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"activation {hf['hidden_act']!r}")
        rope = dict(hf.get("rope_parameters") or {})  # newer transformers keep rope settings here
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        scaling = None if scaling is None else dict(scaling)  # our own copy: the caller's dict stays theirs
        if hf.get("mlp_bias") or (mt == "llama" and hf.get("attention_bias")):
            raise NotImplementedError("biases in the MLP or on o_proj (Llama's mlp_bias, attention_bias)")
        if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
            raise NotImplementedError("rotary embeddings on part of each head (partial_rotary_factor)")
        if hf.get("use_sliding_window"):
            raise NotImplementedError("sliding-window attention (Qwen2's use_sliding_window) is not supported")
        if mt == "mistral" and hf.get("sliding_window"):
            raise NotImplementedError("sliding-window attention (Mistral) is not supported")
        return dict(arch="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                    n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                    n_embd=hf["hidden_size"], head_dim=hf.get("head_dim"), n_inner=hf["intermediate_size"],
                    block_size=hf.get("max_position_embeddings", 2048), bias=False,
                    qkv_bias=True if mt == "qwen2" else bool(hf.get("attention_bias", False)),
                    norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                    tie_word_embeddings=hf.get("tie_word_embeddings", False))
    if mt in ("mpt", "mosaic_gpt"):
        # two layouts of MosaicML's MPT: "mpt" (transformers' MptConfig, llm-foundry; anas-awadalla/mpt-7b) keeps
        # attention settings in attn_config; "mosaic_gpt" (the older MosaicGPT of anas-awadalla/mpt-1b-redpajama-200b)
        # keeps them at the top level with an attn_ prefix.
        att = hf.get("attn_config") or {}
        get = (lambda k, d=None: att.get(k, d)) if mt == "mpt" else (lambda k, d=None: hf.get("attn_" + k, d))
        alibi = get("alibi", False) if mt == "mpt" else hf.get("alibi", False)
        bias_max = get("alibi_bias_max", 8) if mt == "mpt" else hf.get("alibi_bias_max", 8)
        if not alibi:
            raise NotImplementedError("MPT with learned positions instead of ALiBi")
        if get("clip_qkv") or get("softmax_scale") or hf.get("softmax_scale") or hf.get("logit_scale"):
            raise NotImplementedError("MPT with clip_qkv, softmax_scale or logit_scale")
        if get("prefix_lm") or hf.get("prefix_lm"):
            raise NotImplementedError("MPT as a prefix LM")
        ratio = hf.get("expansion_ratio", 4) if mt == "mpt" else hf.get("mlp_ratio", 4)
        return dict(arch="mpt", vocab_size=hf["vocab_size"], n_layer=hf["n_layers"], n_head=hf["n_heads"],
                    n_embd=hf["d_model"], n_inner=int(ratio * hf["d_model"]), block_size=hf["max_seq_len"],
                    bias=not hf.get("no_bias", False), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                    alibi_bias_max=float(bias_max), qk_ln=bool(get("qk_ln", False)),
                    tie_word_embeddings=True)  # MPT always ties its output head to wte
    if mt == "gpt_neox":  # settings as older files name them (rotary_pct, ...) or transformers 5 (rope_parameters)
        rope = hf.get("rope_parameters") or {}
        if hf.get("hidden_act", "gelu") != "gelu" or hf.get("rope_scaling") or not hf.get("attention_bias", True) \
                or rope.get("rope_type", "default") != "default":
            raise NotImplementedError("GPT-NeoX with another activation than exact GELU, rope_scaling, or no biases")
        return dict(arch="neox", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                    n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"], n_inner=hf["intermediate_size"],
                    block_size=hf.get("max_position_embeddings", 2048), bias=True,
                    norm_eps=hf.get("layer_norm_eps", 1e-5),
                    rope_theta=rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)),
                    rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
                    parallel_residual=hf.get("use_parallel_residual", True),
                    tie_word_embeddings=hf.get("tie_word_embeddings", False))
    raise NotImplementedError(f"model_type {mt!r}: supported are gpt2, llama, qwen2, mistral, mpt, mosaic_gpt, gpt_neox")


def hf_config(cfg) -> dict:
    """The config.json that transformers reads for an LM of ours (the GPT-2 and Llama/Qwen2 layouts only)."""
    if cfg.arch == "gpt2":
        if not cfg.bias:
            raise NotImplementedError("the GPT-2 layout has biases everywhere")
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_inner=cfg.n_inner,
                    n_positions=cfg.block_size, layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                    tie_word_embeddings=cfg.tie_word_embeddings)
    if cfg.arch != "llama" or cfg.bias or cfg.rope_scaling:
        raise NotImplementedError(f"saving {cfg.arch} LMs (GPT-2 and unbiased, unscaled Llama-family ones only)")
    return dict(model_type="qwen2" if cfg.qkv_bias else "llama",
                architectures=["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
                vocab_size=cfg.vocab_size, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                num_key_value_heads=cfg.kv_heads, hidden_size=cfg.n_embd, head_dim=cfg.hd,
                intermediate_size=cfg.inner, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, hidden_act="silu", tie_word_embeddings=cfg.tie_word_embeddings)


# The config.json of some public LMs (only the fields lm_config_fields reads), so that a dry run can build them
# on the meta device offline (LM.config_of). Never used to load weights: from_pretrained reads the real file.
KNOWN_LMS = {
    # OpenFlamingo's LMs: MPT-7B in transformers' layout, MPT-1B in the older MosaicGPT one
    "anas-awadalla/mpt-7b": dict(
        model_type="mpt", vocab_size=50432, n_layers=32, n_heads=32, d_model=4096, expansion_ratio=4,
        max_seq_len=2048, no_bias=True, attn_config=dict(alibi=True, alibi_bias_max=8)),
    "anas-awadalla/mpt-1b-redpajama-200b": dict(
        model_type="mosaic_gpt", vocab_size=50432, n_layers=24, n_heads=16, d_model=2048, mlp_ratio=4,
        max_seq_len=2048, no_bias=True, alibi=True, alibi_bias_max=8, attn_qk_ln=True),
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_layer=12, n_head=12, n_embd=768, n_positions=1024,
                 layer_norm_epsilon=1e-5, activation_function="gelu_new", tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-135M": dict(
        model_type="llama", vocab_size=49152, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        hidden_size=576, intermediate_size=1536, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, hidden_act="silu", tie_word_embeddings=True),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", vocab_size=32000, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        hidden_size=4096, intermediate_size=11008, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False),
}

# -----------------------------------------------------------------------------
# 3. Key maps, one per family: (our tensor name, the LM's config, the names the checkpoint holds) -> [(the
# checkpoint's name, rows)]. One name: the tensor itself (rows None). Several: their rows concatenated, in order,
# make ours (Llama's q, k, v; gate, up); each part is checked against its own rows, since only the total would be
# checked later and a q with rows too few next to a k with as many too many would load silently.


def layer_of(key):
    """'transformer.h.3.attn.c_attn.weight' -> ('3', 'attn.c_attn.weight'); (None, key) outside the layers."""
    m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", key)
    return m.groups() if m else (None, key)


def gpt2_names(key, cfg, stored):
    """GPT-2's names are ours (nanoGPT took them); read_as_ours has already added a missing 'transformer.'."""
    return [(key, None)]


def llama_names(key, cfg, stored):
    """Llama, Qwen2, Mistral (model.layers.{i}.self_attn.q_proj, ...)."""
    i, name = layer_of(key)
    if i is None:
        return [({"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
                  "lm_head.weight": "lm_head.weight"}[key], None)]
    p, qkv = f"model.layers.{i}.", [cfg.n_head * cfg.hd, cfg.kv_heads * cfg.hd, cfg.kv_heads * cfg.hd]
    if name.startswith("attn.c_attn."):  # .weight or .bias (Qwen2)
        return [(p + f"self_attn.{x}_proj.{name.split('.')[-1]}", rows) for x, rows in zip("qkv", qkv)]
    if name == "mlp.c_fc.weight":  # SwiGLU: gate, then up
        return [(p + "mlp.gate_proj.weight", cfg.inner), (p + "mlp.up_proj.weight", cfg.inner)]
    return [(p + {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
                  "attn.c_proj.weight": "self_attn.o_proj.weight", "mlp.c_proj.weight": "mlp.down_proj.weight"}[name],
             None)]


MPT = {"ln_1": "norm_1", "ln_2": "norm_2", "attn.c_attn": "attn.Wqkv", "attn.c_proj": "attn.out_proj",
       "attn.q_ln": "attn.q_ln", "attn.k_ln": "attn.k_ln", "mlp.c_fc": "ffn.up_proj", "mlp.c_proj": "ffn.down_proj"}
MOSAIC_GPT = {**MPT, "ln_1": "ln_1", "ln_2": "ln_2", "mlp.c_fc": "mlp.mlp_up", "mlp.c_proj": "mlp.mlp_down"}


def mpt_names(key, cfg, stored):
    """MPT in llm-foundry's and transformers' layout (anas-awadalla/mpt-7b), or in the older MosaicGPT one of
    anas-awadalla/mpt-1b-redpajama-200b (ln_1, mlp.mlp_up, ln_f), told apart by the checkpoint's own names."""
    older = "transformer.blocks.0.ln_1.weight" in stored
    i, name = layer_of(key)
    if i is None:
        return [(key.replace("ln_f", "norm_f") if not older else key, None)]
    module, kind = name.rsplit(".", 1)
    return [(f"transformer.blocks.{i}.{(MOSAIC_GPT if older else MPT)[module]}.{kind}", None)]


def neox_names(key, cfg, stored):
    """GPT-NeoX (gpt_neox.layers.{i}.attention.query_key_value, ...)."""
    i, name = layer_of(key)
    if i is None:
        return [({"transformer.wte.weight": "gpt_neox.embed_in.weight", "lm_head.weight": "embed_out.weight",
                  "transformer.ln_f.weight": "gpt_neox.final_layer_norm.weight",
                  "transformer.ln_f.bias": "gpt_neox.final_layer_norm.bias"}[key], None)]
    module, kind = name.rsplit(".", 1)
    return [(f"gpt_neox.layers.{i}." + {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm",
                                        "attn.c_attn": "attention.query_key_value", "attn.c_proj": "attention.dense",
                                        "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"}[module]
             + "." + kind, None)]


KEY_MAPS = {"gpt2": gpt2_names, "llama": llama_names, "mpt": mpt_names, "neox": neox_names}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# tensors some files carry that are not weights: causal-mask buffers of old GPT-2 and GPT-NeoX files, RoPE's
# frequencies in old Llama files
NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")


def convert(cfg, key, v):
    """A checkpoint's tensor (its parts joined) as our module holds it. GPT-2's Conv1D stores (in, out), the
    transpose of a Linear's weight. GPT-NeoX fuses q, k, v per head: its query_key_value rows are (head, q|k|v,
    hd); ours are q, k, v of all heads one after the other."""
    if cfg.arch == "gpt2" and key.endswith(CONV1D):
        return v.t().contiguous()
    if cfg.arch == "neox" and key.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
        return v.view(cfg.n_head, 3, cfg.hd, -1).transpose(0, 1).reshape(v.shape)
    return v


def read_as_ours(cfg, sd, shapes):
    """A checkpoint's tensors `sd` renamed (and fused) into ours, whose shapes are `shapes` {our name: shape}.
    Fails on any missing, unexpected or mis-shaped tensor, naming it. A tied head comes back as wte itself."""
    sd = {k: v for k, v in sd.items() if not k.endswith(NOT_WEIGHTS)}  # (a copy: the caller's dict stays whole)
    if cfg.arch == "gpt2":  # GPT-2 checkpoints exist with and without the "transformer." prefix
        sd = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v for k, v in sd.items()}
    stored, tied = frozenset(sd), cfg.tie_word_embeddings
    names = lambda key: KEY_MAPS[cfg.arch](key, cfg, stored)  # noqa: E731
    if tied:  # a copy of the tied head, if the file carries one
        sd.pop(names("lm_head.weight")[0][0], None)
    out = {}
    for key, shape in shapes.items():
        if key == "lm_head.weight" and tied:
            continue
        parts = names(key)
        for name, rows in parts:
            if name not in sd:
                raise KeyError(f"checkpoint is missing {name!r}" + (f" (our {key})" if name != key else ""))
            if len(parts) > 1 and tuple(sd[name].shape) != (rows, *shape[1:]):
                raise ValueError(f"{name}: checkpoint has shape {tuple(sd[name].shape)}, the model expects "
                                 f"{(rows, *shape[1:])}")
        tensors = [sd.pop(name) for name, _ in parts]
        out[key] = convert(cfg, key, tensors[0] if len(tensors) == 1 else torch.cat(tensors))
    if sd:
        raise KeyError(f"checkpoint has {len(sd)} unexpected tensors, e.g. {sorted(sd)[:5]}")
    for key, v in out.items():
        if tuple(v.shape) != tuple(shapes[key]):
            name = names(key)[0][0]
            raise ValueError(f"{key}{f' ({name} in the checkpoint)' if name != key else ''}: checkpoint has shape "
                             f"{tuple(v.shape)}, the model expects {tuple(shapes[key])}")
    if tied:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def write_lm(cfg, sd, path):
    """Our LM's state dict `sd` written in the Hugging Face layout (config.json + model.safetensors), which
    LM.from_pretrained and transformers both read (GPT-2 and Llama-family LMs): the key maps above, backwards."""
    from safetensors.torch import save_file
    config = hf_config(cfg)
    names, out = KEY_MAPS[cfg.arch], {}
    for key, v in sd.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        v = convert(cfg, key, v.detach())  # (its own inverse: a transpose, for GPT-2)
        parts = names(key, cfg, frozenset())
        for (name, _), part in zip(parts, v.split([rows for _, rows in parts]) if len(parts) > 1 else [v]):
            out[name] = part.contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(out, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


# -----------------------------------------------------------------------------
# 4. OpenFlamingo's checkpoint.pt: a flat state dict of the trained parts (the resampler "perceiver.*", each gated
# block under its LM layer, and the LM's whole input table) for the released models below. All use CLIP ViT-L-14
# "openai" (OpenFlamingo's README and its open_flamingo/src/factory.py).

OPENFLAMINGO = {
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b": "anas-awadalla/mpt-1b-redpajama-200b",
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct": "anas-awadalla/mpt-1b-redpajama-200b-dolly",
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b": "togethercomputer/RedPajama-INCITE-Base-3B-v1",
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct": "togethercomputer/RedPajama-INCITE-Instruct-3B-v1",
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": "anas-awadalla/mpt-7b",
}
# where OpenFlamingo's LM keeps its decoder layers and its input table: MPT's names, or GPT-NeoX's (the 4B models)
OPENFLAMINGO_LM_KEYS = {"mpt": ("lang_encoder.transformer.blocks.", "lang_encoder.transformer.wte.weight"),
                        "neox": ("lang_encoder.gpt_neox.layers.", "lang_encoder.gpt_neox.embed_in.weight")}
# GPT-NeoX's own head (MPT ties its head to its table), as transformers < 5 names it (the released checkpoints) and >= 5
OPENFLAMINGO_HEAD = ("lang_encoder.embed_out.weight", "lang_encoder.lm_head.weight")
# OpenFlamingo's tokens after its LM's vocabulary, in this order (GPT-NeoX's 50277 tokens, then 50277, 50278, 50279)
OPENFLAMINGO_TOKENS = ("<|endofchunk|>", "<image>", "<PAD>")


def openflamingo_file(checkpoint):
    """An OpenFlamingo checkpoint.pt: the file, a directory holding it, or a hub id downloaded once."""
    if os.path.isdir(checkpoint):
        checkpoint = os.path.join(checkpoint, "checkpoint.pt")
    if os.path.isfile(checkpoint):
        return checkpoint
    if checkpoint.startswith((".", "/")) or checkpoint.count("/") != 1:
        raise FileNotFoundError(f"no OpenFlamingo checkpoint at {checkpoint!r}")
    try:
        from huggingface_hub import hf_hub_download
        return hf_hub_download(checkpoint, "checkpoint.pt")
    except Exception as e:
        raise RuntimeError(
            f"could not download {checkpoint}/checkpoint.pt from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e)[:200]}). Offline? On a machine with network run `huggingface-cli download {checkpoint} "
            f"checkpoint.pt` and `huggingface-cli download {OPENFLAMINGO.get(checkpoint, '<its LM>')}`, copy both "
            f"here, and pass the checkpoint's path as --init_from and the LM's directory as --lm.") from None


def read_openflamingo(path, arch, n_layer, n_embd):
    """An OpenFlamingo checkpoint.pt for an LM of family `arch`, `n_layer` layers of width `n_embd` ->
    (its trained parts under our names, "perceiver.*" and "xattn.{i}.*"; the LM's input table (V + 3, C) as
    OpenFlamingo trained it, the new tokens' rows last; the FlamingoConfig fields its layout implies: which
    layers have a gated block, the resampler's depth and latents, the heads). Every tensor must find its place.
    GPT-NeoX's head (V + 3, C), which OpenFlamingo's training saved too (it keeps names holding "embed", as
    transformers < 5's embed_out), comes back in the trained parts as "lm_head"."""
    sd = files.torch_load(path, map_location="cpu")
    if not isinstance(sd, dict):
        raise files.FileError(f"{path} is not an OpenFlamingo checkpoint (a state dict)")
    sd = {k.removeprefix("module."): v for k, v in sd.get("model_state_dict", sd).items()}
    if arch not in OPENFLAMINGO_LM_KEYS:
        raise NotImplementedError(f"OpenFlamingo checkpoints with a {arch} LM (MPT's and GPT-NeoX's only)")
    blocks, wte_key = OPENFLAMINGO_LM_KEYS[arch]
    if wte_key not in sd:
        raise KeyError(f"{path}: no {wte_key}: not an OpenFlamingo checkpoint of this LM ({arch})")
    wte = sd.pop(wte_key)
    heads = [sd.pop(k) for k in OPENFLAMINGO_HEAD if k in sd] if arch == "neox" else []
    trained = {"lm_head": heads[0]} if heads else {}
    for k in list(sd):
        m = re.fullmatch(re.escape(blocks) + r"(\d+)\.gated_cross_attn_layer\.(.+)", k) or \
            re.fullmatch(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)", k)  # the same modules, listed
        if m:                                                                    # again by OpenFlamingo's LM
            name, v = f"xattn.{m.group(1)}.{m.group(2)}", sd.pop(k)
            if name in trained and not torch.equal(trained[name], v):
                raise ValueError(f"{path}: {k} differs from the same block's tensor under {blocks}")
            trained[name] = v
        elif k.startswith("perceiver."):
            trained[k] = sd.pop(k)
    if sd:
        raise KeyError(f"{path}: unexpected tensors {sorted(sd)[:5]}")
    layers = sorted({int(k.split(".")[1]) for k in trained if k.startswith("xattn.")})
    every = layers[0] + 1 if layers else 0
    if not layers or layers != [i for i in range(n_layer) if (i + 1) % every == 0]:
        raise ValueError(f"{path}: gated blocks before layers {layers} of {n_layer}: not every n-th layer")
    x0 = f"xattn.{layers[0]}."
    layout = dict(  # heads: OpenFlamingo's are always 64 wide, so inner width / 64
        cross_attn_every_n_layers=every,
        resampler_depth=1 + max(int(k.split(".")[2]) for k in trained if k.startswith("perceiver.layers.")),
        resampler_heads=trained["perceiver.layers.0.0.to_q.weight"].shape[0] // 64, resampler_dim_head=64,
        num_latents=trained["perceiver.latents"].shape[0], max_num_frames=0,
        xattn_heads=trained[x0 + "attn.to_q.weight"].shape[0] // 64, xattn_dim_head=64,
        xattn_ff_mult=trained[x0 + "ff.1.weight"].shape[0] // n_embd, vision_ln_post=False,
        new_tokens=OPENFLAMINGO_TOKENS)
    return trained, wte, layout


def openflamingo_problems(cfg, arch):
    """What keeps a model of FlamingoConfig dict `cfg` over an LM of family `arch` from OpenFlamingo's layout, the
    one its create_model_and_transforms builds (open_flamingo/src: a resampler of 6 layers, 8 heads of 64 and 64
    latents, blocks of 8 heads of 64 before every n-th layer, feed-forwards 4x wide, no time embeddings): a list
    of reasons, empty when it fits."""
    want = dict(xattn_at="end", cross_attn_from_layer=0, resampler_depth=6, resampler_heads=8, resampler_dim_head=64,
                num_latents=64, max_num_frames=0, xattn_heads=8, xattn_dim_head=64, xattn_ff_mult=4,
                xattn_norm="layernorm", xattn_ff="gelu", xattn_qk_norm=False, xattn_gate="scalar", xattn_eps=1e-5,
                resampler_ff_act="gelu", resampler_qk_norm=False, only_attend_immediate_media=True,
                vision_class_token=False, vision_stage=None, freeze_vision=True, train_lm_layers=0)
    problems = [f"{k}={cfg.get(k)!r} (OpenFlamingo's: {v!r})" for k, v in want.items() if cfg.get(k) != v]
    if arch not in OPENFLAMINGO_LM_KEYS:
        problems.insert(0, f"a {arch} LM (OpenFlamingo's layout is known here for MPT and GPT-NeoX)")
    if not cfg.get("clip_pretrained"):
        problems.append("a randomly initialised tower (OpenFlamingo reads its CLIP by name and weights)")
    return problems


def write_openflamingo(trained, wte, head, arch):
    """The inverse of read_openflamingo: our trained parts ("perceiver.*", "xattn.{i}.*"), the input table (V + 3, C)
    with OpenFlamingo's three tokens last, and GPT-NeoX's head (V + 3, C) or None -> the state dict OpenFlamingo's
    checkpoint.pt holds, under its names (which its model.load_state_dict(sd, strict=False) reads)."""
    blocks, wte_key = OPENFLAMINGO_LM_KEYS[arch]
    sd = {}
    for k, v in trained.items():
        if k.startswith("xattn."):
            i, rest = k.removeprefix("xattn.").split(".", 1)
            sd[f"{blocks}{i}.gated_cross_attn_layer.{rest}"] = v
        elif k.startswith("perceiver."):
            sd[k] = v
        else:
            raise ValueError(f"{k}: OpenFlamingo's checkpoint holds the resampler, the gated blocks and the tables only")
    sd[wte_key] = wte
    if head is not None:  # under both names, one tensor (torch.save writes it once): strict=False loads the one it has
        sd.update({k: head for k in OPENFLAMINGO_HEAD})
    return sd
