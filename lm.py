"""
The decoder-only language model, in nanoGPT's style, for the families a Flamingo is built on:

- GPT-2: learned positions, LayerNorm, GELU (tanh), biases everywhere;
- Llama (Llama-2/3, SmolLM2, Qwen2, Mistral): RoPE (with Llama-3's rescaling), RMSNorm, SwiGLU, grouped-query
  attention, optional q/k/v biases (Qwen2);
- MPT, OpenFlamingo-3B's and -9B's LM: ALiBi, LayerNorm, exact GELU, optionally a LayerNorm on q and on k;
- GPT-NeoX (RedPajama-INCITE, OpenFlamingo-4B's LM; Pythia): RoPE on part of each head, a parallel or
  sequential residual.

Module names follow GPT-2's (nanoGPT's), so that each family's key map (hf.py) stays short. `LM.from_pretrained`
reads a Hugging Face checkpoint, every tensor mapped explicitly and checked; `lm.save_pretrained` writes one.

Shapes: B batch rows, T tokens, C width, h heads (kvh key/value heads) of hd dims each, V vocabulary.
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import hf


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


# -----------------------------------------------------------------------------
# Norms and positions


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


def attention_mask(T, past, real=None, slopes=None, device=None):
    """Which keys each of T new tokens may attend to, in the form scaled_dot_product_attention takes, or None when
    plain causal attention will do (SDPA's is_causal for a prompt, nothing at all for one new token).

    The new tokens sit at slots past .. past + T - 1 of their rows, after the `past` tokens of the KV cache. Token i
    sees slots j <= i (causal). real (B, past + T) bool says which slots hold real tokens: rows of different lengths
    are left-padded, and no real token sees the padding. A padding token sees itself only (its output is never read,
    but a row of the softmax with nothing to attend to would be NaN, and 0 * NaN spreads). slopes (h,): ALiBi's
    (Press et al. 2022), folded in as the additive bias -slope * (i - j); since padding is on the left, the distance
    between two real tokens is the same in slots as in their row's own positions.
    -> None; bool (B or 1, 1, T, past + T) True = may attend; or float (B or 1, h, T, past + T), -inf = may not."""
    if real is None and slopes is None and (past == 0 or T == 1):
        return None
    device = real.device if real is not None else device
    dist = (torch.arange(past + T, device=device)[None, :]
            - torch.arange(past, past + T, device=device)[:, None])          # (T, S): key slot - query slot
    allowed = (dist <= 0)[None]                                               # (1, T, S)
    if real is not None:
        allowed = allowed & (real[:, None, :] | (dist == 0))                 # (B, T, S)
    allowed = allowed[:, None]                                                # (B or 1, 1, T, S)
    if slopes is None:
        return allowed
    bias = slopes.to(device)[:, None, None] * dist.float()                   # (h, T, S), <= 0 where visible
    return bias.masked_fill(~allowed, float("-inf"))                          # (B or 1, h, T, S)


def row_positions(real):
    """Each token's position in its own row, counted from the row's first real token: (B, T) bool -> (B, T) long.
    A left-padded row then gets the positions it would have alone (padding gets 0; nothing reads it)."""
    return (real.long().cumsum(1) - 1).clamp(min=0)


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + rd/2) of x (B, h, T, hd)'s first rd = cos.shape[-1] dims (all of them but in GPT-NeoX's
    partial rotary): the 'rotate half' layout of HF Llama and GPT-NeoX checkpoints."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # angles in fp32, applied in x's dtype (as HF does): a bf16
    # LM would otherwise give fp32 q, k next to a bf16 v
    x, rest = x.split([cos.shape[-1], x.shape[-1] - cos.shape[-1]], dim=-1)  # (.., rd), (.., hd - rd): turned, kept
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x * cos + torch.cat((-x2, x1), dim=-1) * sin, rest], dim=-1)


# -----------------------------------------------------------------------------
# The layers


class KVCache:
    """The keys and values of the tokens seen so far, for one layer. They are written in place into tensors allocated
    once, for `size` tokens (generation knows its prompt and how many tokens it may add), so that a step copies only
    its own new entries; without a size, or past it, the room doubles. k and v are the filled part: (B, kvh, n, hd)."""

    def __init__(self, size=None):
        self.size, self.n = size, 0
        self._k = self._v = None  # (B, kvh, room, hd)

    @property
    def k(self):
        return None if self._k is None else self._k[:, :, :self.n]

    @property
    def v(self):
        return None if self._v is None else self._v[:, :, :self.n]

    def update(self, k, v):  # (B, kvh, T_new, hd) each -> the keys and values of all tokens so far
        n, T = self.n, k.shape[2]
        if self._k is None or n + T > self._k.shape[2]:  # allocate, or move to twice the room
            room = max(self.size or 0, n + T) if self._k is None else 2 * (n + T)
            old_k, old_v = self._k, self._v
            self._k = k.new_empty(k.shape[0], k.shape[1], room, k.shape[3])
            self._v = v.new_empty(v.shape[0], v.shape[1], room, v.shape[3])
            if n:
                self._k[:, :, :n], self._v[:, :, :n] = old_k[:, :, :n], old_v[:, :, :n]
        self._k[:, :, n:n + T] = k
        self._v[:, :, n:n + T] = v
        self.n = n + T
        return self.k, self.v  # (B, kvh, n + T_new, hd)

    def reorder(self, rows):
        """Keep these rows (B',) of the batch: beam search's surviving beams, or rows repeated. Only the filled part
        is copied (index_select: several times faster than indexing with a tensor on a CPU)."""
        k, v = self.k.index_select(0, rows), self.v.index_select(0, rows)  # (B', kvh, n, hd)
        if len(rows) != self._k.shape[0]:  # another number of rows: new room for them
            self._k, self._v = (t.new_empty(len(rows), *t.shape[1:]) for t in (self._k, self._v))
        self._k[:, :, :self.n], self._v[:, :, :self.n] = k, v


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

    def forward(self, x, rope=None, mask=None, cache=None):
        """rope: RoPE's (cos, sin) of the new tokens, or None; mask: from attention_mask (ALiBi's bias is in it, for
        MPT), or None for plain causal attention. GPT-2 has neither: its positions are in its embeddings (LM.embed)."""
        B, T, _ = x.shape
        h, kvh, hd = self.cfg.n_head, self.cfg.kv_heads, self.cfg.hd
        q, k, v = self.c_attn(x).split([h * hd, kvh * hd, kvh * hd], dim=-1)
        if self.cfg.qk_ln:
            q, k = self.q_ln(q), self.k_ln(k)
        q = q.view(B, T, h, hd).transpose(1, 2)    # (B, h, T, hd)
        k = k.view(B, T, kvh, hd).transpose(1, 2)  # (B, kvh, T, hd)
        v = v.view(B, T, kvh, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)              # (B, kvh, past + T, hd)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)                # ALiBi's bias in the attention's dtype
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=kvh != h)  # (B, h, T, hd)
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

    def forward(self, x, rope=None, mask=None, cache=None):
        if self.parallel:
            return x + self.attn(self.ln_1(x), rope, mask, cache) + self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x), rope, mask, cache)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# The LM


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
        self.make_buffers()
        self.apply(self._init_weights)

    def make_buffers(self):
        """What positions need, computed from the config rather than stored in checkpoints."""
        cfg = self.config
        if cfg.arch in ("llama", "neox"):
            self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        if cfg.arch == "mpt":
            self.register_buffer("slopes", alibi_slopes(cfg.n_head, cfg.alibi_bias_max), persistent=False)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # The three pieces of a forward pass, kept apart so that Flamingo can run its own layer loop.
    def embed(self, tok_emb, pos):
        """Add learned positions (GPT-2) to token embeddings (B, T, C); pos is (T,) or (B, T) (LM.positions)."""
        if self.transformer.wpe is not None:
            if pos.max() >= self.config.block_size:
                raise ValueError(f"sequence of {int(pos.max()) + 1} tokens is longer than the LM's "
                                 f"{self.config.block_size} positions")
            tok_emb = tok_emb + self.transformer.wpe(pos)
        return tok_emb

    def positions(self, pos, past=0, real=None):
        """What attention needs to know of where the new tokens are: (rope, mask).

        pos (T,) or (B, T): each new token's position in its row (row_positions, for left-padded rows); past: the
        tokens already in the KV cache; real (B, past + T): which slots hold real tokens (None: all of them).
        rope is RoPE's (cos, sin), each (T, rd) or (B, 1, T, rd) (llama, neox; rd = hd but in GPT-NeoX's partial
        rotary); mask is attention_mask's, ALiBi's bias folded in (mpt). GPT-2's positions are added to its
        embeddings instead (embed)."""
        slopes = self.slopes if self.config.arch == "mpt" else None
        mask = attention_mask(pos.shape[-1], past, real, slopes, pos.device)
        if self.config.arch not in ("llama", "neox"):
            return None, mask
        ang = pos.float()[..., None] * self.inv_freq         # (.., T, rd/2)
        ang = torch.cat([ang, ang], dim=-1)                  # (.., T, rd)
        if ang.ndim == 3:
            ang = ang[:, None]                               # (B, 1, T, rd): the same for every head
        return (ang.cos(), ang.sin()), mask

    def forward(self, idx, targets=None, caches=None):
        """idx (B, T) -> logits (B, T, vocab), loss (mean cross-entropy over targets != -1, or None)."""
        past = 0 if caches is None else caches[0].n
        pos = torch.arange(past, past + idx.shape[1], device=idx.device)
        x = self.embed(self.transformer.wte(idx), pos)      # (B, T, C)
        rope, mask = self.positions(pos, past)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, mask, None if caches is None else caches[i])
        logits = self.lm_head(self.transformer.ln_f(x))      # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints (the layouts and key maps are in hf.py)

    @staticmethod
    def config_from_hf(config_json: dict) -> LMConfig:
        """Our LMConfig from a Hugging Face config.json dict (read only; the dict is not changed)."""
        return LMConfig(**hf.lm_config_fields(config_json))

    @staticmethod
    def config_of(path_or_hub_id) -> LMConfig:
        """An LM's architecture without its weights or the network: the config.json of a local directory, else
        the table hf.KNOWN_LMS. For train.py's dry run, which builds the model on the meta device."""
        if os.path.exists(os.path.join(path_or_hub_id, "config.json")):
            return LM.config_from_hf(hf.read_config(path_or_hub_id))
        if path_or_hub_id in hf.KNOWN_LMS:
            return LM.config_from_hf(hf.KNOWN_LMS[path_or_hub_id])
        raise FileNotFoundError(f"no {os.path.join(path_or_hub_id, 'config.json')} and {path_or_hub_id!r} is not in "
                                f"hf.KNOWN_LMS ({', '.join(hf.KNOWN_LMS)}): pass a local checkpoint directory")

    @classmethod
    def from_pretrained(cls, path_or_hub_id, dtype=None, device="cpu"):
        """A Hugging Face decoder checkpoint -> LM, every tensor mapped explicitly and checked.

        `path_or_hub_id` is a local directory holding config.json and model.safetensors (or a sharded
        model.safetensors.index.json, or pytorch_model.bin), or a hub id downloaded once into the cache.
        """
        path = hf.resolve_checkpoint_dir(path_or_hub_id)
        cfg = cls.config_from_hf(hf.read_config(path))
        with torch.device("meta"):
            model = cls(cfg)  # no memory: the real tensors come from the checkpoint
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        model.load_state_dict(hf.read_as_ours(cfg, hf.load_state_dict(path, dtype), shapes), strict=True, assign=True)
        if cfg.tie_word_embeddings:  # assign=True replaced the tensor: tie again
            model.lm_head.weight = model.transformer.wte.weight
        model.make_buffers()  # computed, not loaded: built again off the meta device
        return model.to(device)

    def save_pretrained(self, path):
        """Write this LM in the Hugging Face layout (config.json + model.safetensors) that from_pretrained and
        transformers both read (GPT-2 and Llama-family LMs): how the shapes world's own LM is stored."""
        hf.write_lm(self.config, self.state_dict(), path)
