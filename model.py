"""
The Flamingo model, top to bottom, in one file:

1. `LM`: a decoder-only language model in nanoGPT's style that covers the GPT-2 family
   (learned positions, LayerNorm, GELU, biases), the Llama family (RoPE, RMSNorm, SwiGLU,
   grouped-query attention, optional q/k/v bias as in Qwen2), and OpenFlamingo's LMs: MPT (ALiBi)
   and GPT-NeoX (RoPE on part of each head, parallel residual). `LM.from_pretrained` reads a
   Hugging Face checkpoint (config.json + safetensors or .bin, sharded or not) with an explicit key map.
2. `VisionEncoder`: an open_clip vision tower that returns the grid of patch tokens.
3. `Flamingo`: the frozen LM and vision encoder joined by the trained Perceiver Resampler
   (resampler.py) and GATED XATTN-DENSE blocks (xattn.py), with forward, generate and checkpoints.

Shapes: B batch rows, T tokens, C LM width, N media items in the batch, F frames per item,
S patches per frame, D vision width, R visual tokens per item (the resampler's latents),
M the most media items any one row holds.
"""

import json
import math
import os
import re
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from resampler import PerceiverResampler
from xattn import GatedCrossAttentionBlock

# -----------------------------------------------------------------------------
# The language model


@dataclass
class LMConfig:
    arch: str = "gpt2"            # "gpt2" (learned positions, LayerNorm, GELU), "llama" (RoPE, RMSNorm, SwiGLU),
                                  # "mpt" (ALiBi, LayerNorm, exact GELU; OpenFlamingo's LMs) or "neox" (GPT-NeoX:
                                  # RoPE, LayerNorm, exact GELU; RedPajama-INCITE, the LM of OpenFlamingo-4B)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    n_embd: int = 768
    head_dim: int | None = None   # None = n_embd // n_head
    n_inner: int | None = None    # MLP hidden width; None = 4 * n_embd
    block_size: int = 1024        # learned positions (gpt2); MPT's max_seq_len; for llama only a documented limit
    bias: bool = True             # biases in every Linear and LayerNorm (gpt2)
    qkv_bias: bool | None = None  # bias on q/k/v only (Qwen2); None = same as bias
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.1 style {"rope_type": "llama3", ...}
    tie_word_embeddings: bool = True
    alibi_bias_max: float = 8.0   # mpt: head h's ALiBi slope is 2^(-alibi_bias_max * h / n_head)
    qk_ln: bool = False           # mpt: a LayerNorm on q and on k (the older MosaicGPT layout of mpt-1b)
    rotary_pct: float = 1.0       # neox: the share of each head's dims that RoPE turns (Pythia's 0.25)
    parallel_residual: bool = False  # neox: x + attn(ln_1(x)) + mlp(ln_2(x)), both read x (Pythia's layers)

    def __post_init__(self):
        assert self.arch in ("gpt2", "llama", "mpt", "neox"), f"unknown arch {self.arch!r}"
        # derived values are properties (below), never stored, so an override can't leave them stale

    @property
    def max_context(self):
        """The longest input this LM takes, or None: GPT-2's learned positions end at block_size, and MosaicML's
        MPT code (which OpenFlamingo's models ran) refuses more than max_seq_len tokens, though ALiBi itself
        would run on. RoPE (llama, neox) has no hard end."""
        return self.block_size if self.arch in ("gpt2", "mpt") else None

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def hd(self):
        return self.head_dim or self.n_embd // self.n_head

    @property
    def inner(self):
        return self.n_inner or 4 * self.n_embd


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # computed in fp32 as Llama does, then cast back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose weights take the input's dtype: a frozen LM kept in bf16 reads the fp32 residual stream
    that the gated blocks (trained, fp32) write. CUDA's autocast runs layer_norm in fp32 anyway; a CPU refuses
    bf16 weights on fp32 inputs."""

    def forward(self, x):
        cast = lambda t: None if t is None else t.to(x.dtype)  # noqa: E731
        return F.layer_norm(x, self.normalized_shape, cast(self.weight), cast(self.bias), self.eps)


def make_norm(cfg, dim):
    if cfg.arch in ("gpt2", "mpt", "neox"):
        return LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(dim, cfg.norm_eps)


def rope_frequencies(cfg):
    """Inverse frequencies of rotary embeddings (RoFormer eq. 15), with Llama-3's long-context rescaling. GPT-NeoX
    turns only the first rotary_pct of each head's dims."""
    rd = int(cfg.hd * cfg.rotary_pct) if cfg.arch == "neox" else cfg.hd
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
    rs = cfg.rope_scaling
    if rs is None or rs.get("rope_type", rs.get("type", "default")) == "default":
        return inv.float()
    if rs.get("rope_type", rs.get("type")) != "llama3":
        raise NotImplementedError(f"rope_scaling {rs} is not supported (only Llama-3's)")
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = ((old / wavelen) - lo) / (hi - lo)
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)  # long wavelengths: slowed down
    mid = (wavelen <= old / lo) & (wavelen >= old / hi)          # in between: interpolated
    scaled = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return scaled.float()


def alibi_slopes(n_head, bias_max=8.0):
    """ALiBi's per-head slopes (Press et al. 2022, section 3), as MPT computes them: for a power of two n,
    2^(-bias_max * h / n) for h = 1..n; otherwise those of the next power of two, odd heads first."""
    n2 = 2 ** math.ceil(math.log2(n_head))
    slopes = 2.0 ** (-bias_max * torch.arange(1, n2 + 1, dtype=torch.float64) / n2)
    if n2 != n_head:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_head]
    return slopes.float()


def alibi_bias(slopes, pos):
    """The additive attention bias of ALiBi with the causal mask folded in: (h, T, pos[-1] + 1) for queries at
    positions pos (T,) and keys at 0..pos[-1] (a KV cache always holds every earlier token).
    Query i, key j: -slope * (i - j) for j <= i, -inf after. MPT adds slope * (j - last), which differs by a
    constant per query row: the same softmax."""
    keys = torch.arange(int(pos[-1]) + 1, device=pos.device)
    dist = (keys[None, :] - pos[:, None]).float()                        # (T, S), <= 0 where visible
    bias = slopes.to(pos.device)[:, None, None] * dist                   # (h, T, S)
    return bias.masked_fill(dist > 0, float("-inf"))


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + rd/2) of x (B, h, T, hd)'s first rd = cos.shape[-1] dims (all of them but in GPT-NeoX's
    partial rotary): the 'rotate half' layout of HF Llama and GPT-NeoX checkpoints."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # angles in fp32, applied in x's dtype (as HF does): a bf16
    # LM would otherwise give fp32 q, k next to a bf16 v
    x, rest = x.split([cos.shape[-1], x.shape[-1] - cos.shape[-1]], dim=-1)  # (.., rd), (.., hd - rd): turned, kept
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x * cos + torch.cat((-x2, x1), dim=-1) * sin, rest], dim=-1)


class KVCache:
    """The keys and values of the tokens seen so far, one per layer; grows by concatenation."""

    def __init__(self):
        self.k = self.v = None

    def update(self, k, v):  # (B, h, T_new, hd) each
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v  # (B, h, T_past + T_new, hd)

    def reorder(self, rows):  # beam search: keep the caches of the surviving beams
        self.k, self.v = self.k[rows], self.v[rows]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
        # q, k and v in one Linear: (n_head + 2 * kv_heads) * hd outputs
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.hd, bias=qkv_bias)
        self.c_proj = nn.Linear(cfg.n_head * cfg.hd, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_ln:  # over all heads at once, before the split into heads (MosaicGPT's attn_qk_ln)
            self.q_ln = LayerNorm(cfg.n_head * cfg.hd, eps=cfg.norm_eps, bias=cfg.bias)
            self.k_ln = LayerNorm(cfg.kv_heads * cfg.hd, eps=cfg.norm_eps, bias=cfg.bias)

    def forward(self, x, rope=None, cache=None):
        """rope: the positions' part of attention, from LM.positions: RoPE's (cos, sin), ALiBi's bias
        (h, T, past + T) with the causal mask in it, or None (GPT-2's positions are in its embeddings)."""
        B, T, _ = x.shape
        h, kvh, hd = self.cfg.n_head, self.cfg.kv_heads, self.cfg.hd
        q, k, v = self.c_attn(x).split([h * hd, kvh * hd, kvh * hd], dim=-1)
        if self.cfg.qk_ln:
            q, k = self.q_ln(q), self.k_ln(k)
        q = q.view(B, T, h, hd).transpose(1, 2)    # (B, h, T, hd)
        k = k.view(B, T, kvh, hd).transpose(1, 2)  # (B, kvh, T, hd)
        v = v.view(B, T, kvh, hd).transpose(1, 2)
        if isinstance(rope, tuple):
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = 0
        if cache is not None:
            past = 0 if cache.k is None else cache.k.shape[2]
            k, v = cache.update(k, v)              # (B, kvh, past + T, hd)
        if torch.is_tensor(rope):  # ALiBi: the bias is the mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=rope.to(q.dtype), enable_gqa=kvh != h)
        elif past == 0 or T == 1:
            # the whole prefix is visible to a single new token; otherwise plain causal masking
            y = F.scaled_dot_product_attention(q, k, v, is_causal=(past == 0 and T > 1), enable_gqa=kvh != h)
        else:  # several new tokens after a cached prefix: causal mask shifted by `past`
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kvh != h)
        y = y.transpose(1, 2).reshape(B, T, h * hd)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.arch = cfg.arch
        # llama: gate and up projections fused in one Linear (2 * inner outputs), SwiGLU
        n_out = cfg.inner * (2 if cfg.arch == "llama" else 1)
        self.c_fc = nn.Linear(cfg.n_embd, n_out, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.inner, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        if self.arch == "llama":
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.c_proj(F.silu(gate) * up)
        if self.arch in ("mpt", "neox"):
            return self.c_proj(F.gelu(self.c_fc(x)))  # MPT's and GPT-NeoX's GELU is the exact one
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    """One pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x)); or, with parallel_residual,
    x + attn(ln_1(x)) + mlp(ln_2(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache=None):
        if self.parallel:
            return x + self.attn(self.ln_1(x), rope, cache) + self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class LM(nn.Module):
    """A decoder LM. Module names follow GPT-2's, so the key map to other families stays short."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.arch == "gpt2" else None,
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=make_norm(cfg, cfg.n_embd),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if cfg.arch in ("llama", "neox"):
            self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        if cfg.arch == "mpt":
            self.register_buffer("slopes", alibi_slopes(cfg.n_head, cfg.alibi_bias_max), persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # The three pieces of a forward pass, kept apart so that Flamingo can run its own layer loop.
    def embed(self, tok_emb, pos):
        """Add learned positions (GPT-2) to token embeddings (B, T, C); pos is (T,)."""
        if self.transformer.wpe is not None:
            if pos[-1] >= self.config.block_size:
                raise ValueError(f"sequence of {pos[-1] + 1} tokens is longer than the LM's "
                                 f"{self.config.block_size} positions")
            tok_emb = tok_emb + self.transformer.wpe(pos)
        return tok_emb

    def positions(self, pos):
        """What attention needs to know of positions pos (T,): RoPE's (cos, sin) of shape (T, rd) (llama, neox;
        rd = hd but in GPT-NeoX's partial rotary), ALiBi's bias (h, T, pos[-1] + 1) (mpt), or None (gpt2, whose
        positions are in its embeddings)."""
        if self.config.arch == "mpt":
            return alibi_bias(self.slopes, pos)
        if self.config.arch not in ("llama", "neox"):
            return None
        ang = pos.float()[:, None] * self.inv_freq[None, :]  # (T, rd/2)
        ang = torch.cat([ang, ang], dim=-1)                  # (T, rd)
        return ang.cos(), ang.sin()

    def forward(self, idx, targets=None, caches=None):
        """idx (B, T) -> logits (B, T, vocab), loss (mean cross-entropy over targets != -1, or None)."""
        past = 0 if caches is None or caches[0].k is None else caches[0].k.shape[2]
        pos = torch.arange(past, past + idx.shape[1], device=idx.device)
        x = self.embed(self.transformer.wte(idx), pos)      # (B, T, C)
        rope = self.positions(pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, None if caches is None else caches[i])
        logits = self.lm_head(self.transformer.ln_f(x))      # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    # -------------------------------------------------------------------------
    # Loading Hugging Face checkpoints

    @staticmethod
    def config_from_hf(hf: dict) -> LMConfig:
        """Our LMConfig from a Hugging Face config.json dict (read only; the dict is not changed)."""
        mt = hf.get("model_type")
        if mt == "gpt2":
            if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise NotImplementedError(f"GPT-2 activation {hf['activation_function']!r}")
            if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
                raise NotImplementedError("GPT-2 attention scaled other than by 1/sqrt(head_dim)")
            return LMConfig(arch="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                            n_head=hf["n_head"], n_embd=hf["n_embd"], n_inner=hf.get("n_inner"),
                            block_size=hf["n_positions"], bias=True,
                            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                            tie_word_embeddings=hf.get("tie_word_embeddings", True))
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
            return LMConfig(arch="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                            n_head=hf["num_attention_heads"],
                            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                            n_embd=hf["hidden_size"], head_dim=hf.get("head_dim"),
                            n_inner=hf["intermediate_size"],
                            block_size=hf.get("max_position_embeddings", 2048), bias=False,
                            qkv_bias=True if mt == "qwen2" else bool(hf.get("attention_bias", False)),
                            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                            tie_word_embeddings=hf.get("tie_word_embeddings", False))
        if mt in ("mpt", "mosaic_gpt"):
            # two layouts of MosaicML's MPT: "mpt" (transformers' MptConfig, llm-foundry; anas-awadalla/mpt-7b)
            # keeps attention settings in attn_config; "mosaic_gpt" (the older MosaicGPT of
            # anas-awadalla/mpt-1b-redpajama-200b) keeps them at the top level with an attn_ prefix.
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
            return LMConfig(arch="mpt", vocab_size=hf["vocab_size"], n_layer=hf["n_layers"], n_head=hf["n_heads"],
                            n_embd=hf["d_model"], n_inner=int(ratio * hf["d_model"]), block_size=hf["max_seq_len"],
                            bias=not hf.get("no_bias", False), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                            alibi_bias_max=float(bias_max), qk_ln=bool(get("qk_ln", False)),
                            tie_word_embeddings=True)  # MPT always ties its output head to wte
        if mt == "gpt_neox":  # settings as older files name them (rotary_pct, ...) or transformers 5 (rope_parameters)
            rope = hf.get("rope_parameters") or {}
            if hf.get("hidden_act", "gelu") != "gelu" or hf.get("rope_scaling") or not hf.get("attention_bias", True) \
                    or rope.get("rope_type", "default") != "default":
                raise NotImplementedError("GPT-NeoX with another activation than exact GELU, rope_scaling, or no biases")
            return LMConfig(arch="neox", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                            n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"], n_inner=hf["intermediate_size"],
                            block_size=hf.get("max_position_embeddings", 2048), bias=True,
                            norm_eps=hf.get("layer_norm_eps", 1e-5),
                            rope_theta=rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)),
                            rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
                            parallel_residual=hf.get("use_parallel_residual", True),
                            tie_word_embeddings=hf.get("tie_word_embeddings", False))
        raise NotImplementedError(f"model_type {mt!r}: supported are gpt2, llama, qwen2, mistral, mpt, mosaic_gpt, "
                                  "gpt_neox")

    @staticmethod
    def config_of(path_or_hub_id) -> LMConfig:
        """An LM's architecture without its weights or the network: the config.json of a local directory, else
        the table KNOWN_LMS (below). For train.py's dry run, which builds the model on the meta device."""
        path = os.path.join(path_or_hub_id, "config.json")
        if os.path.exists(path):
            with open(path) as f:
                return LM.config_from_hf(json.load(f))
        if path_or_hub_id in KNOWN_LMS:
            return LM.config_from_hf(KNOWN_LMS[path_or_hub_id])
        raise FileNotFoundError(f"no {path} and {path_or_hub_id!r} is not in model.KNOWN_LMS "
                                f"({', '.join(KNOWN_LMS)}): pass a local checkpoint directory")

    @classmethod
    def from_pretrained(cls, path_or_hub_id, dtype=None, device="cpu"):
        """A Hugging Face decoder checkpoint -> LM, every tensor mapped explicitly and checked.

        `path_or_hub_id` is a local directory holding config.json and model.safetensors (or a sharded
        model.safetensors.index.json, or pytorch_model.bin), or a hub id downloaded once into the cache.
        """
        path = resolve_checkpoint_dir(path_or_hub_id)
        with open(os.path.join(path, "config.json")) as f:
            cfg = cls.config_from_hf(json.load(f))
        with torch.device("meta"):
            model = cls(cfg)  # no memory: the real tensors come from the checkpoint
        ours = model.state_dict()
        sd = hf_to_ours(cfg, load_hf_state_dict(path, dtype), ours)
        for k, v in sd.items():
            if v.shape != ours[k].shape:
                raise ValueError(f"{k}: checkpoint has shape {tuple(v.shape)}, the model expects {tuple(ours[k].shape)}")
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_word_embeddings:  # assign=True replaced the tensor: tie again
            model.lm_head.weight = model.transformer.wte.weight
        if cfg.arch in ("llama", "neox"):  # buffers computed, not loaded: built again off the meta device
            model.inv_freq = rope_frequencies(cfg)
        if cfg.arch == "mpt":
            model.slopes = alibi_slopes(cfg.n_head, cfg.alibi_bias_max)
        return model.to(device)


# The config.json of some public LMs (only the fields config_from_hf reads), so that a dry run can build them
# on the meta device offline (LM.config_of). Never used to load weights: from_pretrained reads the real file.
KNOWN_LMS = {
    # OpenFlamingo's LMs (DESIGN section 9): MPT-7B in transformers' layout, MPT-1B in the older MosaicGPT one
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


def save_pretrained(lm: LM, path):
    """Write an LM in the Hugging Face layout (config.json + model.safetensors) that LM.from_pretrained and
    transformers both read: how the shapes world's own pretrained LM is stored."""
    from safetensors.torch import save_file
    cfg = lm.config
    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in lm.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    hf = {}
    if cfg.arch == "gpt2":
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        hf = {k: v.t().contiguous() if k.endswith(conv1d) else v for k, v in sd.items()}
        hf_cfg = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_inner=cfg.n_inner,
                      n_positions=cfg.block_size, layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                      tie_word_embeddings=cfg.tie_word_embeddings)
        if not cfg.bias:
            raise NotImplementedError("the GPT-2 layout has biases everywhere")
    else:
        hf["model.embed_tokens.weight"] = sd.pop("transformer.wte.weight")
        hf["model.norm.weight"] = sd.pop("transformer.ln_f.weight")
        if "lm_head.weight" in sd:
            hf["lm_head.weight"] = sd.pop("lm_head.weight")
        h, kvh, hd = cfg.n_head, cfg.kv_heads, cfg.hd
        for i in range(cfg.n_layer):
            p, q = f"model.layers.{i}.", f"transformer.h.{i}."
            hf[p + "input_layernorm.weight"] = sd.pop(q + "ln_1.weight")
            hf[p + "post_attention_layernorm.weight"] = sd.pop(q + "ln_2.weight")
            for kind in ("weight", "bias"):
                if q + f"attn.c_attn.{kind}" in sd:
                    qq, kk, vv = sd.pop(q + f"attn.c_attn.{kind}").split([h * hd, kvh * hd, kvh * hd])
                    hf.update({p + f"self_attn.q_proj.{kind}": qq, p + f"self_attn.k_proj.{kind}": kk,
                               p + f"self_attn.v_proj.{kind}": vv})
            hf[p + "self_attn.o_proj.weight"] = sd.pop(q + "attn.c_proj.weight")
            gate, up = sd.pop(q + "mlp.c_fc.weight").chunk(2)
            hf.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                       p + "mlp.down_proj.weight": sd.pop(q + "mlp.c_proj.weight")})
        assert not sd, f"unmapped tensors {list(sd)}"
        if cfg.bias or cfg.rope_scaling:
            raise NotImplementedError("saving biased or rope-scaled Llama-family LMs")
        hf_cfg = dict(model_type="qwen2" if cfg.qkv_bias else "llama",
                      architectures=["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
                      vocab_size=cfg.vocab_size, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                      num_key_value_heads=cfg.kv_heads, hidden_size=cfg.n_embd, head_dim=cfg.hd,
                      intermediate_size=cfg.inner, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                      rope_theta=cfg.rope_theta, hidden_act="silu", tie_word_embeddings=cfg.tie_word_embeddings)
    save_file({k: v.contiguous() for k, v in hf.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)


def resolve_checkpoint_dir(path_or_hub_id):
    """A local directory as it is; otherwise a hub id, downloaded once (config + weights only)."""
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id) or path_or_hub_id.startswith((".", "/")) or path_or_hub_id.count("/") > 1:
        raise FileNotFoundError(f"{path_or_hub_id!r} is not a checkpoint directory")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path_or_hub_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model"])
    except Exception as e:
        raise RuntimeError(
            f"could not find {path_or_hub_id!r} locally nor download it from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Offline? Download it elsewhere (huggingface-cli download {path_or_hub_id}) and pass the local directory.") from None


def load_hf_state_dict(path, dtype=None):
    """All tensors of a checkpoint directory: safetensors or .bin (weights_only), single or sharded (an
    .index.json, as MPT-7B's two pytorch_model-0000k-of-00002.bin). Read shard by shard, each tensor cast to
    `dtype` as its shard is read: a bf16 run never holds the LM in fp32, only one shard at a time as stored."""
    from safetensors.torch import load_file
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = os.path.join(path, single + ".index.json")  # model.safetensors.index.json, pytorch_model.bin...
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
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
                part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                part = torch.load(file, map_location="cpu", weights_only=True)
        sd.update({k: v if dtype is None or not v.is_floating_point() else v.to(dtype) for k, v in part.items()})
        del part
    return sd


def hf_to_ours(cfg, hf, ours):
    """Rename (and fuse) Hugging Face tensors into our names. Fails on any missing or unexpected key."""
    hf = dict(hf)
    out = {}

    def take(name):
        if name not in hf:
            raise KeyError(f"checkpoint is missing {name!r}")
        return hf.pop(name)

    def fuse(key, names, rows):
        """Concatenate HF tensors into our fused `key`, checking every part: only the total size is checked
        later, and a q with rows too few next to a k with as many too many would load silently."""
        parts = [take(n) for n in names]
        for n, p, r in zip(names, parts, rows):
            want = (r, *ours[key].shape[1:])
            if tuple(p.shape) != want:
                raise ValueError(f"{n}: checkpoint has shape {tuple(p.shape)}, the model expects {want}")
        return torch.cat(parts)

    if cfg.arch == "gpt2":
        # GPT-2 checkpoints exist with and without the "transformer." prefix; attn.bias/masked_bias are
        # causal-mask buffers of old versions, not weights.
        hf = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in hf.items()
              if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        for k in ours:
            if k == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if k == "lm_head.weight":
                out[k] = take(k)
                continue
            v = take(k)
            out[k] = v.t().contiguous() if k.endswith(conv1d) else v  # HF's Conv1D stores (in, out)
        hf.pop("lm_head.weight", None)  # a tied copy, if the checkpoint carries one
    elif cfg.arch == "mpt":
        # both MPT layouts, renamed to ours: (llm-foundry / transformers' MptForCausalLM, older MosaicGPT) -> ours
        names = {"norm_1": "ln_1", "ln_1": "ln_1", "norm_2": "ln_2", "ln_2": "ln_2",
                 "attn.Wqkv": "attn.c_attn", "attn.out_proj": "attn.c_proj", "attn.q_ln": "attn.q_ln",
                 "attn.k_ln": "attn.k_ln", "ffn.up_proj": "mlp.c_fc", "mlp.mlp_up": "mlp.c_fc",
                 "ffn.down_proj": "mlp.c_proj", "mlp.mlp_down": "mlp.c_proj"}
        hf.pop("lm_head.weight", None)  # MPT ties its head: a copy, if the file carries one
        for k in list(hf):
            m = re.fullmatch(r"transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)", k)
            new = f"transformer.h.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}" if m and m.group(2) in names \
                else k.replace("transformer.norm_f.", "transformer.ln_f.")
            if new in ours:  # anything else stays in hf and is refused below by its own name
                out[new] = take(k)
    elif cfg.arch == "neox":
        # GPT-NeoX fuses q, k, v per head: its query_key_value rows are (head, q|k|v, hd); ours are q, k, v of all
        # heads one after the other
        names = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "attention.query_key_value":
                 "attn.c_attn", "attention.dense": "attn.c_proj", "mlp.dense_h_to_4h": "mlp.c_fc",
                 "mlp.dense_4h_to_h": "mlp.c_proj"}
        hf = {k: v for k, v in hf.items() if not k.endswith((".attention.bias", ".attention.masked_bias"))}
        for k in list(hf):  # (old files keep the causal mask as buffers named like weights: dropped above)
            m = re.fullmatch(r"gpt_neox\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
            new = f"transformer.h.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}" if m and m.group(2) in names else \
                {"gpt_neox.embed_in.weight": "transformer.wte.weight", "embed_out.weight": "lm_head.weight",
                 "gpt_neox.final_layer_norm.weight": "transformer.ln_f.weight",
                 "gpt_neox.final_layer_norm.bias": "transformer.ln_f.bias"}.get(k)
            if new in ours and not (new == "lm_head.weight" and cfg.tie_word_embeddings):
                v = take(k)
                if new.endswith("c_attn.weight") or new.endswith("c_attn.bias"):
                    v = v.view(cfg.n_head, 3, cfg.hd, -1).transpose(0, 1).reshape(v.shape)  # per head -> per kind
                out[new] = v
    else:
        out["transformer.wte.weight"] = take("model.embed_tokens.weight")
        out["transformer.ln_f.weight"] = take("model.norm.weight")
        for i in range(cfg.n_layer):
            p, q = f"model.layers.{i}.", f"transformer.h.{i}."
            out[q + "ln_1.weight"] = take(p + "input_layernorm.weight")
            out[q + "ln_2.weight"] = take(p + "post_attention_layernorm.weight")
            a = p + "self_attn."
            qkv_rows = [cfg.n_head * cfg.hd, cfg.kv_heads * cfg.hd, cfg.kv_heads * cfg.hd]
            for kind in ("weight", "bias") if q + "attn.c_attn.bias" in ours else ("weight",):
                out[q + f"attn.c_attn.{kind}"] = fuse(q + f"attn.c_attn.{kind}", [a + f"{n}_proj.{kind}" for n in "qkv"], qkv_rows)
            out[q + "attn.c_proj.weight"] = take(a + "o_proj.weight")
            m = p + "mlp."
            out[q + "mlp.c_fc.weight"] = fuse(q + "mlp.c_fc.weight", [m + "gate_proj.weight", m + "up_proj.weight"], [cfg.inner] * 2)
            out[q + "mlp.c_proj.weight"] = take(m + "down_proj.weight")
        if cfg.tie_word_embeddings:
            hf.pop("lm_head.weight", None)
        else:
            out["lm_head.weight"] = take("lm_head.weight")
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer in old Llama files
    if hf:
        raise KeyError(f"checkpoint has {len(hf)} unexpected tensors, e.g. {sorted(hf)[:5]}")
    expected = {k for k in ours if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    if set(out) != expected:
        raise KeyError(f"key map mismatch: missing {sorted(expected - set(out))[:5]}, extra {sorted(set(out) - expected)[:5]}")
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out

# -----------------------------------------------------------------------------
# The vision encoder


def _register_clip_configs():
    """Our tiny open_clip configs (config/clip/*.json: tests and the shapes world) join open_clip's own."""
    import open_clip
    from pathlib import Path
    open_clip.add_model_config(Path(__file__).parent / "config" / "clip")


class VisionEncoder(nn.Module):
    """An open_clip vision tower, returning the grid of spatial features (not the pooled embedding).

    Two kinds of tower (Flamingo itself used a CNN, NFNet-F6, and fed its final grid to the resampler):
    - a ViT ("ViT-B-32", ...): the patch tokens of the last layer, class token dropped. `ln_post=False`
      gives them before the tower's final LayerNorm, as OpenFlamingo's models saw them.
    - a ModifiedResNet ("RN50", "shapes-rn", ...): the feature map after residual stage `stage` (1..4,
      None = 4, the last), flattened to tokens; the attention pool and any later stage are dropped.
    `pretrained` is an open_clip tag ("openai", "laion2b_s34b_b79k", ...) or a local weights file.
    """

    def __init__(self, name, pretrained=None, ln_post=True, stage=None):
        super().__init__()
        import logging
        import open_clip
        _register_clip_configs()
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # open_clip is chatty
        try:
            # open_clip moves the model to `device` at the end: under `with torch.device("meta")` that must be
            # meta too (a dry run: nothing allocated), where .to("cpu") would fail
            clip = open_clip.create_model(name, pretrained=pretrained, device=torch.get_default_device())
        except RuntimeError as e:
            raise RuntimeError(f"open_clip could not build {name!r} with weights {pretrained!r}: {e}\n"
                               "Offline? Pass a local weights file as clip_pretrained.") from None
        self.visual = clip.visual  # the text tower is dropped
        self.is_resnet = hasattr(self.visual, "layer4")
        if not self.is_resnet and not hasattr(self.visual, "_embeds"):
            raise NotImplementedError(f"{name!r}: only open_clip VisionTransformer and ModifiedResNet towers "
                                      "are supported")
        if self.is_resnet:
            self.stage = 4 if stage is None else stage
            if self.stage not in (1, 2, 3, 4):
                raise ValueError(f"vision stage must be 1..4 for a ResNet tower, got {stage}")
            self.width = getattr(self.visual, f"layer{self.stage}")[-1].bn3.num_features
            for k in range(self.stage + 1, 5):  # later stages and the attention pool never run: drop them
                setattr(self.visual, f"layer{k}", nn.Identity())
            self.visual.attnpool = nn.Identity()
        else:
            if stage is not None:
                raise ValueError(f"vision stage is for ResNet towers; {name!r} is a ViT")
            self.stage, self.width = None, self.visual.transformer.width
        self.name, self.pretrained, self.ln_post = name, pretrained, ln_post
        pp = self.visual.preprocess_cfg
        self.image_size, self.mean, self.std = pp["size"], tuple(pp["mean"]), tuple(pp["std"])

    def forward(self, x):
        """x (n, 3, H, W) preprocessed pixels -> (n, S, D) spatial tokens."""
        v = self.visual
        if self.is_resnet:
            x = v.stem(x)                               # (n, width, H/4, W/4)
            for k in range(1, self.stage + 1):
                x = getattr(v, f"layer{k}")(x)          # each later stage halves H and W
            return x.flatten(2).transpose(1, 2)         # (n, C, h, w) -> (n, S = h*w, D = C)
        x = v.transformer(v._embeds(x))   # (n, 1 + S, D): class token first
        if self.ln_post:
            x = v.ln_post(x)
        return x[:, 1:]                    # (n, S, D)


# -----------------------------------------------------------------------------
# Flamingo


@dataclass
class FlamingoConfig:
    lm: str = ""                          # LM.from_pretrained path or hub id
    clip: str = "ViT-B-32"                # open_clip model name
    clip_pretrained: str | None = None    # open_clip tag or local weights file
    cross_attn_every_n_layers: int = 1    # a GATED XATTN-DENSE block before layer i when (i + 1) % n == 0
    cross_attn_from_layer: int = 0        # ... and i >= this (1: the LM's first layer reads its own embeddings)
    resampler_depth: int = 6
    resampler_heads: int = 8
    resampler_dim_head: int = 64
    num_latents: int = 64
    max_num_frames: int = 1               # time embeddings for videos of up to this many frames; 0 = none
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    xattn_ff_mult: int = 4
    only_attend_immediate_media: bool = True  # False: a token sees all images at or before it
    vision_ln_post: bool = True
    vision_stage: int | None = None       # ResNet towers: the stage whose feature map is the grid (None = last)
    freeze_lm: bool = True
    freeze_vision: bool = True
    train_lm_layers: int = 0              # fine-tuning: the LM's top this many layers trained too (freeze_lm or not)
    train_lm_embeddings: bool = False     # the LM's whole input table trained too, as OpenFlamingo does (config/9b.py)
    new_tokens: tuple = ("<image>", "<|endofchunk|>")  # rows after the LM's vocabulary, in this order
    openflamingo: str | None = None       # an OpenFlamingo checkpoint.pt this model was built from (its LM rows)

    def __post_init__(self):
        self.new_tokens = tuple(self.new_tokens)  # hashable, whatever the saved form


class Flamingo(nn.Module):
    """A frozen vision encoder and a frozen LM, joined by a trained resampler and gated cross-attention."""

    def __init__(self, lm: LM, vision: VisionEncoder, cfg: FlamingoConfig, verbose=True):
        super().__init__()
        self.config = cfg
        self.lm, self.vision = lm, vision
        C, D = lm.config.n_embd, vision.width
        self.perceiver = PerceiverResampler(D, cfg.resampler_depth, cfg.resampler_heads, cfg.resampler_dim_head,
                                            cfg.num_latents, cfg.max_num_frames)
        n = cfg.cross_attn_every_n_layers
        self.xattn = nn.ModuleDict({
            str(i): GatedCrossAttentionBlock(C, D, cfg.xattn_heads, cfg.xattn_dim_head, cfg.xattn_ff_mult,
                                             cfg.only_attend_immediate_media)
            for i in range(lm.config.n_layer) if (i + 1) % n == 0 and i >= cfg.cross_attn_from_layer
        })
        if not self.xattn:
            raise ValueError(f"no layer of the {lm.config.n_layer}-layer LM gets a gated block "
                             f"(cross_attn_every_n_layers={n}, cross_attn_from_layer={cfg.cross_attn_from_layer})")
        # The new tokens get their own trained rows, appended after the LM's vocabulary, so that every
        # original LM weight stays bit-identical. They start at the mean of the existing rows. Ours are
        # <image>, <|endofchunk|>; OpenFlamingo's <|endofchunk|>, <image>, <PAD> (from_openflamingo).
        V, n = lm.config.vocab_size, len(cfg.new_tokens)
        self.media_token_id = V + cfg.new_tokens.index("<image>")
        self.eoc_token_id = V + cfg.new_tokens.index("<|endofchunk|>")
        wte, head = lm.transformer.wte.weight.detach(), lm.lm_head.weight.detach()
        self.new_wte = nn.Parameter(wte.float().mean(0).expand(n, -1).clone().to(wte.dtype))    # (n, C)
        self.new_lm_head = nn.Parameter(head.float().mean(0).expand(n, -1).clone().to(head.dtype))
        # Freezing is decided once, here: the optimizer only ever sees what requires grad.
        self.lm.requires_grad_(not cfg.freeze_lm)
        self.vision.requires_grad_(not cfg.freeze_vision)
        self.unfreeze_lm_layers(cfg.train_lm_layers, cfg.train_lm_embeddings)
        # Recompute each LM layer (and the gated block before it) in the backward pass instead of keeping its
        # activations (torch.utils.checkpoint): a training setting, switched on by train.py, not saved.
        self.activation_checkpointing = False
        self.train()
        if verbose:  # trained and frozen parameters, part by part
            counts = self.parameter_counts()
            print(f"{'Flamingo':<48}{'trained':>15}{'frozen':>15}")
            for part, name in [("vision", f"vision encoder {cfg.clip}"), ("lm", f"LM {cfg.lm}"),
                               ("perceiver", f"resampler ({cfg.resampler_depth} layers, {cfg.num_latents} latents)"),
                               ("xattn", f"gated xattn blocks ({len(self.xattn)} of {lm.config.n_layer} layers)"),
                               ("new_tokens", "new token rows (<image>, <|endofchunk|>)"), ("total", "total")]:
                t, f = counts.get(part, (0, 0))
                print(f"{name:<48}{t:>15,}{f:>15,}")

    def unfreeze_lm_layers(self, k, embeddings=False):
        """Train the LM's top k layers too (fine-tuning on a dataset of one's own), and with `embeddings` its whole
        input table (OpenFlamingo trains it: its create_model_and_transforms' freeze_lm_embeddings=False; a tied head,
        GPT-2's or MPT's, is the same tensor and trains with it). Recorded in the config, so that a checkpoint (which
        keeps every trained tensor) rebuilds the same model. k = 0 and embeddings=False change nothing."""
        layers = self.lm.transformer.h
        if not 0 <= k <= len(layers):
            raise ValueError(f"train_lm_layers={k}: the LM has {len(layers)} layers")
        for layer in list(layers)[len(layers) - k:] if k else []:
            layer.requires_grad_(True)
        if embeddings:
            self.lm.transformer.wte.weight.requires_grad_(True)
        self.config.train_lm_layers = max(self.config.train_lm_layers, k)
        self.config.train_lm_embeddings = self.config.train_lm_embeddings or embeddings
        for p in self.parameters():  # what is trained is kept in fp32 whatever the LM's dtype (a bf16 MPT-7B):
            if p.requires_grad:      # AdamW's small updates need it, and a checkpoint's trained tensors load back exactly
                p.data = p.data.float()

    def parameter_counts(self):
        """{part: (trained, frozen)} parameter counts of the parts vision, lm, perceiver, xattn, new_tokens, and their
        total. A tied weight (GPT-2's lm_head is its wte) counts once."""
        counts = {}
        for name, p in self.named_parameters():
            for part in ("new_tokens" if name.startswith("new_") else name.split(".")[0], "total"):
                t, f = counts.get(part, (0, 0))
                counts[part] = (t + p.numel(), f) if p.requires_grad else (t, f + p.numel())
        return counts

    def train(self, mode=True):
        super().train(mode)
        if self.config.freeze_vision:
            self.vision.eval()  # a frozen tower stays in eval mode (no patch dropout)
        return self

    @classmethod
    def from_pretrained(cls, lm, clip, clip_pretrained=None, cross_attn_every_n_layers=1, verbose=True,
                        dtype=None, **options):
        """A Flamingo from a pretrained LM (path or hub id) and an open_clip model name + weights."""
        cfg = FlamingoConfig(lm=lm, clip=clip, clip_pretrained=clip_pretrained,
                             cross_attn_every_n_layers=cross_attn_every_n_layers, **options)
        lm_model = LM.from_pretrained(lm, dtype=dtype)
        vision = VisionEncoder(clip, clip_pretrained, ln_post=cfg.vision_ln_post, stage=cfg.vision_stage)
        return cls(lm_model, vision, cfg, verbose=verbose)

    @classmethod
    def from_openflamingo(cls, checkpoint, lm, clip="ViT-L-14", clip_pretrained="openai", dtype=None, verbose=True):
        """A released OpenFlamingo model (DESIGN section 9): its checkpoint.pt (a hub id such as
        "openflamingo/OpenFlamingo-9B-vitl-mpt7b", a directory or the file), its LM (hub id or directory) and
        its CLIP. The layout comes from the checkpoint itself: which layers have a gated block, the resampler's
        depth and latents, the vocabulary (the LM's table resized to 50280 rows: GPT-NeoX's 50277 tokens, then
        <|endofchunk|>, <image>, <PAD>). Every tensor must find its place and fit it. Vision features are
        open_clip's patch tokens before ln_post, as OpenFlamingo's models were trained on."""
        path = openflamingo_file(checkpoint)
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = {k.removeprefix("module."): v for k, v in sd.get("model_state_dict", sd).items()}
        lm_model = LM.from_pretrained(lm, dtype=dtype)
        n_layer, C = lm_model.config.n_layer, lm_model.config.n_embd
        # where OpenFlamingo's LM keeps its layers and input table: MPT's names, or GPT-NeoX's (the 4B models)
        arch = lm_model.config.arch
        blocks, wte_key = {"mpt": ("lang_encoder.transformer.blocks.", "lang_encoder.transformer.wte.weight"),
                           "neox": ("lang_encoder.gpt_neox.layers.", "lang_encoder.gpt_neox.embed_in.weight")
                           }.get(arch, (None, None))
        if blocks is None:
            raise NotImplementedError(f"OpenFlamingo checkpoints with a {arch} LM (MPT's and GPT-NeoX's only)")
        if wte_key not in sd:
            raise KeyError(f"{path}: no {wte_key}: not an OpenFlamingo checkpoint of this LM ({arch})")
        wte = sd.pop(wte_key)  # (V + 3, C): every row trained by OpenFlamingo, the new ones last
        ours = {}
        for k in list(sd):
            m = re.fullmatch(re.escape(blocks) + r"(\d+)\.gated_cross_attn_layer\.(.+)", k) or \
                re.fullmatch(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)", k)  # the same modules, listed
            if m:                                                                # again by OpenFlamingo's LM
                name, v = f"xattn.{m.group(1)}.{m.group(2)}", sd.pop(k)
                if name in ours and not torch.equal(ours[name], v):
                    raise ValueError(f"{path}: {k} differs from the same block's tensor under {blocks}")
                ours[name] = v
            elif k.startswith("perceiver."):
                ours[k] = sd.pop(k)
        if sd:
            raise KeyError(f"{path}: unexpected tensors {sorted(sd)[:5]}")
        layers = sorted({int(k.split(".")[1]) for k in ours if k.startswith("xattn.")})
        every = layers[0] + 1 if layers else 0
        if not layers or layers != [i for i in range(n_layer) if (i + 1) % every == 0]:
            raise ValueError(f"{path}: gated blocks before layers {layers} of {n_layer}: not every n-th layer")
        depth = 1 + max(int(k.split(".")[2]) for k in ours if k.startswith("perceiver.layers."))
        R, D = ours["perceiver.latents"].shape
        x0 = f"xattn.{layers[0]}."
        cfg = FlamingoConfig(  # heads: OpenFlamingo's are always 64 wide, so inner width / 64
            lm=lm, clip=clip, clip_pretrained=clip_pretrained, cross_attn_every_n_layers=every,
            resampler_depth=depth, resampler_heads=ours["perceiver.layers.0.0.to_q.weight"].shape[0] // 64,
            resampler_dim_head=64, num_latents=R, max_num_frames=0,
            xattn_heads=ours[x0 + "attn.to_q.weight"].shape[0] // 64, xattn_dim_head=64,
            xattn_ff_mult=ours[x0 + "ff.1.weight"].shape[0] // C, vision_ln_post=False,
            new_tokens=("<|endofchunk|>", "<image>", "<PAD>"), openflamingo=checkpoint)
        V = wte.shape[0] - len(cfg.new_tokens)
        if wte.shape[1] != C or V > lm_model.config.vocab_size:
            raise ValueError(f"{path}: {wte_key} has shape {tuple(wte.shape)}; the LM {lm} has "
                             f"{lm_model.config.vocab_size} rows of width {C}")
        # OpenFlamingo resized the LM's table (MPT-7B: 50432 padded rows) to its tokenizer's and trained it all:
        # the LM gets the first V rows, the new-token rows get the rest. MPT ties its head, so both tie here too.
        # GPT-NeoX's head is its own, frozen: the LM keeps its first V rows, and the new tokens' head rows, which
        # OpenFlamingo drew at random when it built its model and never saved, start at the mean of the others.
        dt, tied = lm_model.transformer.wte.weight.dtype, lm_model.config.tie_word_embeddings
        head = None if tied else lm_model.lm_head.weight[:V].detach().clone()
        lm_model.transformer.wte = nn.Embedding(V, C, _weight=wte[:V].to(dt).clone(), _freeze=True)
        lm_model.lm_head = nn.Linear(C, V, bias=False)
        lm_model.lm_head.weight = lm_model.transformer.wte.weight if tied else nn.Parameter(head, requires_grad=False)
        lm_model.config.vocab_size = V
        vision = VisionEncoder(clip, clip_pretrained, ln_post=False)
        model = cls(lm_model, vision, cfg, verbose=verbose)
        with torch.no_grad():
            model.new_wte.copy_(wte[V:])
        if tied:
            model.new_lm_head = model.new_wte
        ours.update(new_wte=wte[V:], **({} if tied else {"new_lm_head": model.new_lm_head.detach().clone()}))
        try:
            model.load_trained(ours)
        except KeyError as e:  # name the checkpoint's keys too: xattn.{i}.X is <blocks>{i}.gated_cross_attn_layer.X
            raise KeyError(f"{path}: {e.args[0]} (xattn.{{i}}.X is {blocks}{{i}}.gated_cross_attn_layer.X)") from None
        return model

    @classmethod
    def from_config(cls, cfg: FlamingoConfig, lm_config: LMConfig, verbose=False):
        """A Flamingo of random weights: the LM lm_config and the tower cfg.clip, with no file read (not even
        cfg.clip_pretrained). Under `with torch.device("meta")` nothing is allocated either: train.py's dry run."""
        vision = VisionEncoder(cfg.clip, None, ln_post=cfg.vision_ln_post, stage=cfg.vision_stage)
        return cls(LM(lm_config), vision, cfg, verbose=verbose)

    # -------------------------------------------------------------------------
    # Forward: images -> visual tokens, then the LM's layers with the gated blocks in between

    def encode_media(self, images, idx, vision_features=None):
        """Resampled visual tokens of each row's images, in slots: (B, M, R, D), or None without images.

        `images` (N, F, 3, H, W) holds the N media items of the batch in the order of their `<image>`
        tokens, row by row. Only real images are encoded: a row with fewer images than M leaves zero
        slots that no token can attend to (see xattn.media_mask). vision_features (N, F, S, D) instead: the
        frozen tower's output for those images, computed once and cached (train.py's cache_vision_features).
        """
        if vision_features is not None:
            images = vision_features
        counts = (idx == self.media_token_id).sum(1)   # (B,) images per row
        n = int(counts.sum())
        if images is None or n == 0:
            if n or (images is not None and len(images)):
                raise ValueError(f"{n} <image> tokens but {0 if images is None else len(images)} images")
            return None
        if images.ndim not in (4, 5) or images.shape[0] != n or (images.ndim == 4) != (vision_features is not None):
            raise ValueError(f"images must be (N, F, 3, H, W), or vision_features (N, F, S, D), with N = {n} (the "
                             f"number of <image> tokens); got {tuple(images.shape)}")
        N, Fr = images.shape[:2]
        if vision_features is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision):
                feats = self.vision(images.flatten(0, 1))    # (N*F, S, D)
            feats = feats.view(N, Fr, *feats.shape[1:])      # (N, F, S, D)
        else:
            feats = vision_features.to(next(self.perceiver.parameters()).dtype)
        tokens = self.perceiver(feats)                       # (N, R, D)
        B, M = idx.shape[0], int(counts.max())
        row = torch.repeat_interleave(torch.arange(B, device=idx.device), counts)       # (N,) row of each item
        slot = torch.arange(N, device=idx.device) - (counts.cumsum(0) - counts)[row]  # (N,) its place in the row
        visual = tokens.new_zeros(B, M, *tokens.shape[1:])   # (B, M, R, D)
        visual[row, slot] = tokens
        return visual

    def media_kvs(self, visual):
        """Each xattn block's keys and values of the visual tokens: {layer: (k, v)}; {} without images."""
        if visual is None:
            return {}
        return {i: blk.attn.media_kv(visual) for i, blk in self.xattn.items()}

    def embed_tokens(self, idx):
        """Token embeddings (B, T, C): the frozen LM table, and the new trained rows for ids >= V."""
        V, n = self.lm.config.vocab_size, len(self.new_wte)
        if idx.numel() and (idx.max() >= V + n or idx.min() < 0):
            raise ValueError(f"token ids must be in [0, {V + n}): the LM's {V} and {', '.join(self.config.new_tokens)}")
        x = self.lm.transformer.wte(idx.clamp(max=V - 1))
        new = (idx >= V)[..., None]
        return torch.where(new, self.new_wte[(idx - V).clamp(min=0, max=n - 1)].to(x.dtype), x)

    def decode(self, idx, text_time, kvs, caches=None):
        """The LM's layers with a gated block before every n-th one (Flamingo Figure 3). -> logits (B, T, V+2).

        text_time (B, T): which image each token belongs to (xattn.py). kvs: from media_kvs.
        caches: one KVCache per LM layer for generation, or None.
        """
        lm, R = self.lm, self.config.num_latents
        past = 0 if caches is None or caches[0].k is None else caches[0].k.shape[2]
        pos = torch.arange(past, past + idx.shape[1], device=idx.device)
        x = lm.embed(self.embed_tokens(idx), pos)            # (B, T, C)
        rope = lm.positions(pos)

        def layer(x, i):  # the gated block before LM layer i, if there is one, then the layer
            if str(i) in self.xattn:
                x = self.xattn[str(i)](x, text_time, kvs.get(str(i)), R)
            return lm.transformer.h[i](x, rope, None if caches is None else caches[i])

        for i in range(lm.config.n_layer):
            if self.activation_checkpointing and torch.is_grad_enabled():  # keep only x; recompute in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, i, use_reentrant=False)
            else:
                x = layer(x, i)
        h = lm.transformer.ln_f(x)
        return torch.cat([lm.lm_head(h), h @ self.new_lm_head.to(h.dtype).t()], dim=-1)  # (B, T, V + 2)

    def forward(self, images, idx, targets=None, vision_features=None):
        """images (N, F, 3, H, W) or None, idx (B, T) -> logits (B, T, V + 2), loss or None.
        vision_features (N, F, S, D): the tower's output for the images, given instead of them (encode_media)."""
        visual = self.encode_media(images, idx, vision_features)  # (B, M, R, D)
        text_time = (idx == self.media_token_id).cumsum(1)       # (B, T): phi of Flamingo Figure 6
        logits = self.decode(idx, text_time, self.media_kvs(visual))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    # -------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, images, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, num_beams=1,
                 use_cache=True, stop_token_id=None, on_token=None):
        """The prompt idx (B, T) followed by up to max_new_tokens new tokens. temperature=0 is greedy.

        Stops at `<|endofchunk|>` (or stop_token_id); a row that stopped is padded with that token until
        all rows have. With use_cache, the media keys and values are computed once for the whole call and
        the text keys and values are cached (KVCache); use_cache=False recomputes everything at each step
        (the slow reference). `<image>` is never generated: no image could follow it.
        on_token(tokens (B, 1)) is called as each token is chosen (for streaming; not with beam search).
        """
        stop = self.eoc_token_id if stop_token_id is None else stop_token_id
        if num_beams > 1:
            return self._beam_search(images, idx, max_new_tokens, num_beams, use_cache, stop)
        step = self._stepper(images, idx, use_cache)
        logits = step(idx)                                            # (B, V + 2) at the last position
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p)     # (B, 1)
            nxt = torch.where(done[:, None], stop, nxt)
            idx = torch.cat([idx, nxt], dim=1)
            done |= nxt[:, 0] == stop
            if on_token is not None:
                on_token(nxt)
            if done.all() or i == max_new_tokens - 1:
                break
            logits = step(nxt)
        return idx

    def _stepper(self, images, idx, use_cache, num_beams=1):
        """A function new_tokens (B, t) -> next-token logits (B, V + 2) that remembers what it has seen.

        Beams: rows are expanded num_beams times (row b's beams are rows b*nb .. b*nb + nb-1); the
        returned function has a `.reorder(rows)` for beam search to pick surviving beams.
        """
        ids = {"seen": idx.repeat_interleave(num_beams, dim=0)}      # (B*nb, T)
        images = expand_media(images, idx, self.media_token_id, num_beams)
        if use_cache:
            visual = self.encode_media(images, ids["seen"])          # once per call
            kvs = self.media_kvs(visual)                             # once per call
            caches = [KVCache() for _ in self.lm.transformer.h]
            last_time = {"t": None}

        def step(new):
            if new is not idx:
                ids["seen"] = torch.cat([ids["seen"], new], dim=1)
            if not use_cache:  # the naive loop: the whole sequence and its images, every step
                return self.forward(images, ids["seen"])[0][:, -1].float().index_fill_(
                    1, torch.tensor([self.media_token_id], device=new.device), -float("inf"))
            x = ids["seen"] if new is idx else new
            base = 0 if last_time["t"] is None else last_time["t"]
            text_time = base + (x == self.media_token_id).cumsum(1)   # (B, t)
            last_time["t"] = text_time[:, -1:]
            logits = self.decode(x, text_time, kvs, caches)[:, -1].float()
            logits[:, self.media_token_id] = -float("inf")
            return logits

        def reorder(rows):
            ids["seen"] = ids["seen"][rows]
            if use_cache:
                for c in caches:
                    c.reorder(rows)
                last_time["t"] = last_time["t"][rows]
            # the media are the same for all beams of a row, and rows never move across batch rows

        step.reorder = reorder
        return step

    def _beam_search(self, images, idx, max_new_tokens, nb, use_cache, stop, length_penalty=1.0):
        """Beam search (as OpenFlamingo's evaluation uses, 3 beams). A finished hypothesis is scored by
        sum of log-probabilities / (number of new tokens) ** length_penalty; a row stops when it has nb
        finished hypotheses and no live beam can beat the worst of them."""
        B, T = idx.shape
        step = self._stepper(images, idx, use_cache, nb)
        seqs = idx.repeat_interleave(nb, dim=0)                        # (B*nb, T)
        scores = torch.full((B, nb), -float("inf"), device=idx.device)
        scores[:, 0] = 0.0                                             # beams start identical: keep one
        finished = [[] for _ in range(B)]                              # the best nb (score, tokens) per row
        row_done = [False] * B
        logits = step(idx)
        for t in range(1, max_new_tokens + 1):
            logp = F.log_softmax(logits, dim=-1).view(B, nb, -1)      # (B, nb, V)
            cand = (scores[..., None] + logp).view(B, -1)              # (B, nb*V)
            top, pos = cand.topk(2 * nb, dim=1)                        # enough to refill nb live beams
            V = logp.shape[-1]
            rows, new_tokens, new_scores = [], [], []
            for b in range(B):
                keep = []
                if row_done[b]:  # a finished row idles until the others finish
                    top[b] = -float("inf")
                for rank, (s, p) in enumerate(zip(top[b].tolist(), pos[b].tolist())):
                    beam, tok = divmod(p, V)
                    if s == -float("inf"):
                        break
                    if tok == stop:
                        if rank < nb:  # only a top-nb candidate may finish
                            hyp = torch.cat([seqs[b * nb + beam, T:], seqs.new_tensor([tok])])
                            finished[b] = sorted(finished[b] + [(s / t ** length_penalty, hyp)],
                                                 key=lambda h: -h[0])[:nb]  # the best nb only
                    else:
                        keep.append((s, beam, tok))
                    if len(keep) == nb:
                        break
                while len(keep) < nb:  # not enough live candidates (tiny vocabularies)
                    keep.append((-float("inf"), 0, stop))
                for s, beam, tok in keep:
                    rows.append(b * nb + beam)
                    new_tokens.append(tok)
                    new_scores.append(s)
            rows = torch.tensor(rows, device=idx.device)
            new = torch.tensor(new_tokens, device=idx.device)[:, None]
            seqs = torch.cat([seqs[rows], new], dim=1)
            scores = torch.tensor(new_scores, device=idx.device).view(B, nb)
            row_done = [d or (len(f) >= nb and f[-1][0] >= scores[b].max().item() / t ** length_penalty)
                        for b, (d, f) in enumerate(zip(row_done, finished))]
            if all(row_done) or t == max_new_tokens:
                break
            step.reorder(rows)
            logits = step(new)
        out = []
        for b in range(B):
            live = [(scores[b, j].item() / t ** length_penalty, seqs[b * nb + j, T:]) for j in range(nb)
                    if scores[b, j] > -float("inf")]
            if not row_done[b]:  # the length limit was hit: live beams compete with the finished ones
                finished[b] = finished[b] + live
            best = max(finished[b], key=lambda h: h[0])[1]
            out.append(best)
        L = max(len(o) for o in out)
        out = [torch.cat([o, o.new_full((L - len(o),), stop)]) for o in out]
        return torch.cat([idx, torch.stack(out)], dim=1)

    # -------------------------------------------------------------------------
    # Checkpoints: the trained parts, plus the config that rebuilds the rest

    def trained_state_dict(self):
        return {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}

    def save_checkpoint(self, path, trained=None, vision=None, **extra):
        """Write {"flamingo_config", "model" (trained parts only), **extra} atomically: a temp file, then a
        rename, so a run killed mid-write leaves the previous checkpoint whole. trained / vision: those state
        dicts as given (train.py gathers them whole from FSDP's shards first), else this model's own."""
        ckpt = {"flamingo_config": asdict(self.config), "model": trained or self.trained_state_dict(), **extra}
        if self.config.clip_pretrained is None and self.config.freeze_vision:
            # a randomly initialised tower cannot be rebuilt from its name alone: keep its weights
            ckpt["vision"] = vision or {k: v.detach() for k, v in self.vision.state_dict().items()}
        atomic_save(ckpt, path)

    @classmethod
    def from_checkpoint(cls, path, verbose=True, map_location="cpu", dtype=None):
        """Rebuild a model saved by save_checkpoint (a ckpt.pt file or the directory holding it); dtype: the frozen
        LM's, cast as it is read (the trained parts stay in fp32)."""
        if os.path.isdir(path):
            path = os.path.join(path, "ckpt.pt")
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        if "flamingo_config" not in ckpt:
            raise ValueError(f"{path} is not a checkpoint of this project (no flamingo_config); an OpenFlamingo "
                             "checkpoint.pt loads with Flamingo.from_openflamingo")
        cfg = dict(ckpt["flamingo_config"])
        base = os.path.dirname(os.path.abspath(path))
        for key in ("lm", "clip_pretrained", "openflamingo"):  # paths saved relative to the checkpoint travel with it
            if cfg.get(key) and not os.path.isabs(cfg[key]) and os.path.exists(os.path.join(base, cfg[key])):
                cfg[key] = os.path.join(base, cfg[key])
        if cfg.get("openflamingo"):  # built on an OpenFlamingo model: its LM rows come from its checkpoint
            model = cls.from_openflamingo(cfg["openflamingo"], cfg["lm"], cfg["clip"], cfg["clip_pretrained"],
                                          dtype=dtype, verbose=verbose)
            model.unfreeze_lm_layers(cfg.get("train_lm_layers", 0), cfg.get("train_lm_embeddings", False))
        else:
            model = cls.from_pretrained(verbose=verbose, dtype=dtype, **cfg)
        model.load_trained(ckpt["model"])
        if "vision" in ckpt:
            model.vision.load_state_dict(ckpt["vision"], strict=True)
        model.config = FlamingoConfig(**ckpt["flamingo_config"])
        return model, ckpt

    def load_trained(self, sd):
        """Load trained parts, refusing any missing, unexpected or mis-shaped tensor by name."""
        ours = self.trained_state_dict()
        missing, extra = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
        if missing or extra:
            raise KeyError(f"checkpoint does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
        for k, v in sd.items():
            if v.shape != ours[k].shape:
                raise ValueError(f"{k}: checkpoint has shape {tuple(v.shape)}, the model {tuple(ours[k].shape)}")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in sd.items():
                params[k].copy_(v)


# The released OpenFlamingo models, with their LM (DESIGN section 9). All use CLIP ViT-L-14 "openai".
OPENFLAMINGO = {
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b": "anas-awadalla/mpt-1b-redpajama-200b",
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct": "anas-awadalla/mpt-1b-redpajama-200b-dolly",
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b": "togethercomputer/RedPajama-INCITE-Base-3B-v1",
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct": "togethercomputer/RedPajama-INCITE-Instruct-3B-v1",
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": "anas-awadalla/mpt-7b",
}


def load_model(init_from, lm="", clip="ViT-L-14", clip_pretrained="openai", dtype=None, verbose=False):
    """What sample.py and eval.py load: (model, the name get_tokenizer takes). init_from is an out_dir of train.py
    (or its ckpt.pt), or an OpenFlamingo checkpoint: a hub id "openflamingo/<name>" (its LM known from
    OPENFLAMINGO) or a local checkpoint.pt with its LM's directory as `lm`; the tokenizer is that LM's
    tokenizer.json (GPT-NeoX's, for the MPT models). dtype: the frozen LM's ("bfloat16": run under autocast)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if init_from.startswith("openflamingo/") or lm:
        lm = lm or OPENFLAMINGO.get(init_from)
        if not lm:
            raise ValueError(f"which LM does {init_from} extend? Pass it as --lm (known: {', '.join(OPENFLAMINGO)})")
        model = Flamingo.from_openflamingo(init_from, lm, clip, clip_pretrained, dtype=dtype, verbose=verbose)
        return model, resolve_checkpoint_dir(lm)
    model, ckpt = Flamingo.from_checkpoint(init_from, verbose=verbose, dtype=dtype)
    return model, ckpt.get("config", {}).get("tokenizer", "bytes")


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


def atomic_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a power loss cannot leave a torn file either
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def expand_media(images, idx, media_token_id, n):
    """Repeat each row's media items n times, for rows repeated with repeat_interleave(n)."""
    if images is None or n == 1:
        return images
    counts = (idx == media_token_id).sum(1).tolist()
    if len(images) != sum(counts):  # checked here too: indexing would drop extra images silently
        raise ValueError(f"{sum(counts)} <image> tokens but {len(images)} images")
    starts = [sum(counts[:b]) for b in range(len(counts))]
    order = [i for b, c in enumerate(counts) for _ in range(n) for i in range(starts[b], starts[b] + c)]
    return images[torch.tensor(order, device=images.device)]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> next token (B, 1): greedy at temperature 0, else sampled after top-k / top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, -float("inf")))
    return torch.multinomial(logits.softmax(-1), num_samples=1)
