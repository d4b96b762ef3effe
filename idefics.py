"""
IDEFICS (Laurencon et al. 2023, "OBELICS: An Open Web-Scale Filtered Dataset of Interleaved Image-Text Documents";
Hugging Face's idefics-9b, idefics-9b-instruct, idefics-80b, idefics-80b-instruct), an open reproduction of
Flamingo, read into this project's modules: Flamingo.from_idefics(path or hub id) calls read() here.

An IDEFICS folder, as transformers' IdeficsForVisionText2Text saves it (config.json, model.safetensors or its shards),
holds the whole model: a LLaMA, a CLIP ViT (ViT-H/14 for the released ones), the resampler, the gated blocks and the
new token rows. It is Flamingo as OpenFlamingo builds it but for these differences, each a named option of our
modules (transformers' modeling_idefics.py, perceiver.py and vision.py are the reference):

    IDEFICS                                          here (FlamingoConfig)
    gated_cross_attn_layers[k] before layer k * n    xattn_at="start", cross_attn_every_n_layers=n
    the block's input/post_attention_layernorm       xattn_norm="rmsnorm", xattn_eps (the LM's rms_norm_eps)
    the block's mlp: LLaMA's SwiGLU                  xattn_ff="swiglu", xattn_ff_inner (intermediate_size)
    the block's heads: the LM's, hidden // heads     xattn_heads, xattn_dim_head
    qk_layer_norms: an RMSNorm per head on q and k   xattn_qk_norm
    alpha_type "float" | "vector"                    xattn_gate "scalar" | "vector" (one gate per channel)
    perceiver: ReLU MLP, qk_layer_norms_perceiver    resampler_ff_act="relu", resampler_qk_norm
    vision_model.last_hidden_state: class token      vision_class_token=True, vision_ln_post=False
      first, before post_layernorm
    vision_model in Hugging Face's CLIP layout       open_clip's VisionTransformer, weights renamed (q, k, v fused)
    embed_tokens.additional_embedding,               new_wte, new_lm_head: the rows of <fake_token_around_image>,
      lm_head.additional_fc                            <image> (and <end_of_utterance> where the config has 3)
    image_attention_mask: a token sees the last      phi (xattn.py): only_attend_immediate_media=True; a token
      image at or before it; none: zero output         before the first image gets exactly 0 from the attention

One difference is not carried over: IDEFICS's processor also hides the images from every token after an end of
document (`</s>`) until the next image, for rows packed with several documents; here a row is one document.
"""

import os
import re

import torch

import hf
from lm import LM, LMConfig
from vision import VisionEncoder

HUB_IDS = ("HuggingFaceM4/idefics-9b", "HuggingFaceM4/idefics-9b-instruct", "HuggingFaceM4/idefics-80b",
           "HuggingFaceM4/idefics-80b-instruct")
NEW_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>")  # the added tokens, in id order


def is_idefics(name):
    """A hub id of IDEFICS's, or a folder whose config.json says model_type "idefics"."""
    if os.path.isfile(os.path.join(name, "config.json")):
        return hf.read_config(name).get("model_type") == "idefics"
    return name.lower().startswith("huggingfacem4/idefics") and "idefics2" not in name.lower()


def options(config, new_tokens=None):
    """config.json (a dict) -> (LMConfig fields, FlamingoConfig options, open_clip overrides of the tower). new_tokens:
    the names of the rows after the LM's (added_tokens; None: IDEFICS's). Settings this code does not implement are
    refused, never ignored."""
    vc, pc = config.get("vision_config") or {}, config.get("perceiver_config") or {}
    if not config.get("use_resampler", pc.get("use_resampler")):
        raise NotImplementedError("IDEFICS without its Perceiver Resampler (use_resampler=false)")
    if vc.get("hidden_act", "gelu") not in ("gelu", "quick_gelu") or vc.get("layer_norm_eps", 1e-5) != 1e-5:
        raise NotImplementedError(f"a vision tower with {vc.get('hidden_act')} and LayerNorm eps "
                                  f"{vc.get('layer_norm_eps')} (open_clip's: gelu or quick_gelu, 1e-5)")
    L, n = config["num_hidden_layers"], config.get("cross_layer_interval", 1)
    if L % n:
        raise NotImplementedError(f"{L} layers with a gated block every {n}: IDEFICS's own code needs n to divide them")
    C, heads, eps = config["hidden_size"], config["num_attention_heads"], config.get("rms_norm_eps", 1e-6)
    lm = hf.lm_config_fields(config)
    D = vc.get("embed_dim", vc.get("hidden_size", 768))
    names = tuple(new_tokens or NEW_TOKENS[:config.get("additional_vocab_size", 0)])
    flamingo = dict(
        cross_attn_every_n_layers=n, xattn_at="start", xattn_heads=heads, xattn_dim_head=C // heads,
        xattn_norm="rmsnorm", xattn_ff="swiglu", xattn_ff_inner=config["intermediate_size"], xattn_eps=eps,
        xattn_qk_norm=bool(config.get("qk_layer_norms")), xattn_gate="vector" if config.get("alpha_type") == "vector"
        else "scalar", resampler_depth=pc.get("resampler_depth", 6), resampler_heads=pc.get("resampler_n_heads", 16),
        resampler_dim_head=pc.get("resampler_head_dim", 96), num_latents=pc.get("resampler_n_latents", 64),
        resampler_ff_act="relu", resampler_qk_norm=bool(pc.get("qk_layer_norms_perceiver")), max_num_frames=0,
        vision_ln_post=False, vision_class_token=True, new_tokens=tuple(names), clip="ViT-H-14", clip_pretrained=None,
        stop_token_id=config["vocab_size"] + names.index("<end_of_utterance>") if "<end_of_utterance>" in names
        else config.get("eos_token_id", 2))  # a turn of the instruct models ends at <end_of_utterance>, else at </s>
    if "<image>" not in names:
        raise ValueError(f"the new tokens {names} have no <image> (additional_vocab_size "
                         f"{config.get('additional_vocab_size', 0)})")
    size, patch = vc.get("image_size", 224), vc.get("patch_size", 14)
    tower = dict(embed_dim=8, quick_gelu=vc.get("hidden_act") == "quick_gelu", vision_cfg=dict(
        image_size=size, patch_size=patch, layers=vc.get("num_hidden_layers", 32), width=D,
        head_width=D // vc.get("num_attention_heads", 16), mlp_ratio=vc.get("intermediate_size", 5120) / D))
    return lm, flamingo, tower


def vision_names(key):
    """An IDEFICS vision_model name (HF CLIP's) -> open_clip VisionTransformer's, and which of q, k, v it is."""
    layer = re.match(r"encoder\.layers\.(\d+)\.(.*)", key)
    if not layer:
        return {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
                "embeddings.position_embedding.weight": "positional_embedding"}.get(key, key.replace(
                    "pre_layrnorm", "ln_pre").replace("post_layernorm", "ln_post")), None
    i, rest = layer.groups()
    qkv = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
    if qkv:
        return f"transformer.resblocks.{i}.attn.in_proj_{qkv.group(2)}", qkv.group(1)
    for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        rest = rest.replace(a, b)
    return f"transformer.resblocks.{i}.{rest}", None


def trained_names(key, n):
    """An IDEFICS name of a trained part -> (our name, which of k, v it is, or None)."""
    key = key.removeprefix("model.")
    if key in ("embed_tokens.additional_embedding.weight", "lm_head.additional_fc.weight"):
        return ("new_wte" if key.startswith("embed") else "new_lm_head"), None
    m = re.match(r"perceiver_resampler\.blocks\.(\d+)\.([01])\.(\w+)\.(\w+)", key)
    if m:
        j, part, mod, p = m.groups()
        if part == "1":  # the MLP: ln, fc, (ReLU), c_proj -> FeedForward's indices 0, 1, 3
            return f"perceiver.layers.{j}.1.{ {'ln': 0, 'fc': 1, 'c_proj': 3}[mod]}.{p}", None
        if mod in ("k_proj", "v_proj"):
            return f"perceiver.layers.{j}.0.to_kv.{p}", mod[0]
        ours = {"context_layer_norm": "norm_media", "latents_layer_norm": "norm_latents", "q_proj": "to_q",
                "output_proj": "to_out", "q_layer_norm": "q_norm", "k_layer_norm": "k_norm"}[mod]
        return f"perceiver.layers.{j}.0.{ours}.{p}", None
    if key.startswith("perceiver_resampler."):
        return key.replace("perceiver_resampler.layer_norm", "perceiver.norm").replace("perceiver_resampler.", "perceiver."), None
    m = re.match(r"gated_cross_attn_layers\.(\d+)\.(.*)", key)
    if not m:
        raise KeyError(f"unexpected tensor {key!r} in the checkpoint")
    k, rest = int(m.group(1)), m.group(2)
    if rest in ("cross_attn.k_proj.weight", "cross_attn.v_proj.weight"):
        return f"xattn.{k * n}.attn.to_kv.weight", rest.split(".")[1][0]
    for a, b in (("alpha_cross_attn", "attn_gate"), ("alpha_dense", "ff_gate"), ("input_layernorm", "attn.norm"),
                 ("post_attention_layernorm", "ff.norm"), ("cross_attn.q_proj", "attn.to_q"),
                 ("cross_attn.o_proj", "attn.to_out"), ("cross_attn.q_layer_norm", "attn.q_norm"),
                 ("cross_attn.k_layer_norm", "attn.k_norm"), ("mlp.", "ff.")):
        rest = rest.replace(a, b)
    return f"xattn.{k * n}.{rest}", None


def fuse(parts, order):
    """{our name: {which: tensor}} -> {our name: the tensors concatenated in `order` (q, k, v or k, v)}."""
    out = {}
    for name, pieces in parts.items():
        if sorted(pieces) != sorted(order):
            raise KeyError(f"{name}: the checkpoint has {sorted(pieces)} of {list(order)}")
        out[name] = torch.cat([pieces[w] for w in order])
    return out


def read(path_or_hub_id, dtype=None):
    """An IDEFICS folder or hub id -> (LM, VisionEncoder, FlamingoConfig options, the trained tensors under our names).
    The LM and the tower are loaded here (every tensor checked); the trained parts are left to Flamingo.load_trained,
    which checks them against the model the options build. dtype: the LM's (the tower and the trained parts stay fp32,
    as this project keeps them)."""
    path = hf.resolve_checkpoint_dir(path_or_hub_id)
    config = hf.read_config(path)
    if config.get("model_type") != "idefics":
        raise ValueError(f"{path}/config.json: model_type {config.get('model_type')!r}, not 'idefics'")
    lm_fields, flamingo, tower = options(config, added_tokens(path, config))
    flamingo["idefics"] = flamingo["lm"] = path_or_hub_id  # the LM is the folder's LLaMA
    sd = hf.load_state_dict(path)
    lm_sd = {k: v for k, v in sd.items() if k.startswith(("model.layers.", "model.norm.", "lm_head.weight"))}
    V = lm_fields["vocab_size"]
    lm_sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:V]
    cfg = LMConfig(**lm_fields)
    with torch.device("meta"):
        lm = LM(cfg)
    shapes = {k: v.shape for k, v in lm.state_dict().items()}
    lm_sd = {k: v if dtype is None else v.to(dtype) for k, v in lm_sd.items()}
    lm.load_state_dict(hf.read_as_ours(cfg, lm_sd, shapes), strict=True, assign=True)
    if cfg.tie_word_embeddings:
        lm.lm_head.weight = lm.transformer.wte.weight
    lm.make_buffers()
    lm.requires_grad_(False)

    vision = VisionEncoder("ViT-H-14", None, ln_post=False, class_token=True, overrides=tower, resize_mode="squash")
    vision.visual.proj = None  # CLIP's projection to the joint embedding: IDEFICS has none and never pools
    v_sd, qkv = {}, {}
    for k, t in sd.items():
        if k.startswith("model.vision_model."):
            name, which = vision_names(k.removeprefix("model.vision_model."))
            if which:
                qkv.setdefault(name, {})[which] = t.float()
            else:
                v_sd[name] = t.float().flatten() if name == "class_embedding" else t.float()
    try:
        vision.visual.load_state_dict({**v_sd, **fuse(qkv, "qkv")}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: the vision tower's tensors do not fit: {str(e).splitlines()[-1].strip()}") from None

    trained, kv = {}, {}
    n = flamingo["cross_attn_every_n_layers"]
    for k, t in sd.items():
        if k.startswith(("model.layers.", "model.norm.", "lm_head.weight", "model.vision_model.",
                         "model.embed_tokens.weight")) or k.endswith("rotary_emb.inv_freq"):
            continue
        name, which = trained_names(k, n)
        if which:
            kv.setdefault(name, {})[which] = t.float()
        else:  # the gates: IDEFICS's (1,) or (1, 1, C) -> ours (1,) or (C,)
            trained[name] = t.float().flatten() if name.endswith("_gate") else t.float()
    trained.update(fuse(kv, "kv"))
    return lm, vision, flamingo, trained


def added_tokens(path, config):
    """The names of the new token rows (ids vocab_size ...), as the folder's tokenizer.json has them; IDEFICS's
    defaults without one."""
    n, V = config.get("additional_vocab_size", 0), config["vocab_size"]
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        return NEW_TOKENS[:n]
    from tokenizers import Tokenizer
    added = {i: t.content for i, t in Tokenizer.from_file(file).get_added_tokens_decoder().items()}
    names = tuple(added.get(V + i) for i in range(n))
    return names if None not in names else NEW_TOKENS[:n]
