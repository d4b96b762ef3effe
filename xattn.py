"""
Masked cross-attention from text to visual tokens, and the GATED XATTN-DENSE block (Flamingo, Figure 5):

    x = x + tanh(attn_gate) * xattn(q=LN(x), kv=visual)
    x = x + tanh(ff_gate)   * ffw(x)

Both gates start at 0, so a fresh block is the identity and the frozen LM is exactly the pretrained LM at step 0.

Flamingo's and OpenFlamingo's block: LayerNorms, a GELU feed-forward of ff_mult x C, one scalar per gate. IDEFICS
(Laurencon et al. 2023; transformers' modeling_idefics.py, IdeficsGatedCrossAttentionLayer) builds the same block
from its LM's parts, each a named option here: norm="rmsnorm", ff="swiglu" (the LLaMA MLP, ff_inner wide),
qk_norm=True (an RMSNorm on each head's queries and keys), gate="vector" (one gate per channel, its alpha_type).

Which image a text token sees (Flamingo, Figure 6, the function phi): each `<image>` token marks where
a media item sits. `text_time[b, t]` counts the `<image>` tokens of row b at or before position t, so
token t of row b belongs to image number text_time[b, t] of that row (1-based; 0 = no image yet).
A token attends only to the visual tokens of that one image. Tokens before the first image attend to
nothing, and their cross-attention output is exactly zero. With `only_attend_immediate_media=False`
a token attends to all the images at or before it instead.

Shapes: B rows, T tokens, C LM width, M media slots per row (the most images any row has),
R visual tokens per image, D vision width, h heads of dh.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from lm import RMSNorm
from resampler import FeedForward


def media_mask(text_time, M, R, only_immediate=True):
    """Which visual tokens each text token may see: (B, T) image numbers -> (B, 1, T, M*R) bool."""
    slot = torch.arange(1, M + 1, device=text_time.device)              # image numbers 1..M
    if only_immediate:
        mask = text_time[:, :, None] == slot                             # (B, T, M)
    else:
        mask = text_time[:, :, None] >= slot
    return mask.repeat_interleave(R, dim=-1)[:, None]                  # (B, 1, T, M*R)


def make_norm(kind, dim, eps):
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


class SwiGLU(nn.Module):
    """The LLaMA MLP (Shazeer 2020) behind its own norm: down(silu(gate(x)) * up(x)). Names as IDEFICS's."""

    def __init__(self, dim, inner, eps):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.gate_proj = nn.Linear(dim, inner, bias=False)
        self.up_proj = nn.Linear(dim, inner, bias=False)
        self.down_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x):
        x = self.norm(x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MaskedCrossAttention(nn.Module):
    def __init__(self, dim, dim_visual, heads=8, dim_head=64, only_attend_immediate_media=True, norm="layernorm",
                 qk_norm=False, eps=1e-5):
        super().__init__()
        self.heads = heads
        self.only_immediate = only_attend_immediate_media
        inner = heads * dim_head
        self.norm = make_norm(norm, dim, eps)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)  # keys, then values
        self.to_out = nn.Linear(inner, dim, bias=False)
        if qk_norm:  # over each head's dh dims, queries and keys apart (IDEFICS's qk_layer_norms)
            self.q_norm, self.k_norm = RMSNorm(dim_head, eps), RMSNorm(dim_head, eps)
        self.qk_norm = qk_norm

    def media_kv(self, visual, where=None):
        """Keys and values of the visual tokens -> two (B, h, M*R, dh) tensors. visual (B, M, R, D): every row's M
        slots; or the batch's N items (N, R, D) with where = (row, slot, B, M), each item's row and place in it
        (Flamingo.encode_media): the keys and values of real items only, put in their slots, zeros elsewhere.
        Generation computes these once per prompt and reuses them for every new token."""
        kv = self.to_kv(visual)                                           # (B, M, R, 2 inner) or (N, R, 2 inner)
        if where is not None:
            row, slot, B, M = where
            slots = kv.new_zeros(B, M, *kv.shape[1:])                     # (B, M, R, 2 inner)
            slots[row, slot] = kv
            kv = slots
        B, M, R, _ = kv.shape
        k, v = kv.view(B, M * R, -1).chunk(2, dim=-1)                    # (B, M*R, inner) each
        k, v = (t.view(B, M * R, self.heads, -1).transpose(1, 2) for t in (k, v))  # (B, h, M*R, dh)
        if self.qk_norm:
            k = self.k_norm(k)
        return k.contiguous(), v.contiguous()

    def queries(self, x, text_time, M, R):
        """The queries of x (B, T, C) -> (B, h, T, dh), the mask of what each may see (B, 1, T, M*R) and which tokens
        have an image at all (B, 1, T, 1). A token with no image would have an all-False row, and softmax over
        nothing is NaN: such rows see everything (any finite values), and their output is zeroed exactly."""
        B, T, _ = x.shape
        q = self.to_q(self.norm(x)).view(B, T, self.heads, -1).transpose(1, 2)  # (B, h, T, dh)
        if self.qk_norm:
            q = self.q_norm(q)
        has_media = (text_time > 0)[:, None, :, None]                     # (B, 1, T, 1)
        return q, media_mask(text_time, M, R, self.only_immediate) | ~has_media, has_media

    def forward(self, x, text_time, kv, R):
        B, T, _ = x.shape
        k, v = kv                                                         # (B, h, M*R, dh)
        q, mask, has_media = self.queries(x, text_time, k.shape[2] // R, R)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * has_media  # (B, h, T, dh)
        return self.to_out(out.transpose(1, 2).reshape(B, T, -1))        # (B, T, C)


class GatedCrossAttentionBlock(nn.Module):
    """GATED XATTN-DENSE: inserted before an LM layer; the identity while both gates are 0. The options are IDEFICS's
    (above): norm "layernorm" | "rmsnorm" (eps), ff "gelu" (ff_mult x dim) | "swiglu" (ff_inner), qk_norm, gate
    "scalar" (1,) | "vector" (dim,)."""

    def __init__(self, dim, dim_visual, heads=8, dim_head=64, ff_mult=4, only_attend_immediate_media=True,
                 norm="layernorm", ff="gelu", ff_inner=None, qk_norm=False, gate="scalar", eps=1e-5):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, heads, dim_head, only_attend_immediate_media, norm,
                                         qk_norm, eps)
        self.attn_gate = nn.Parameter(torch.zeros(dim if gate == "vector" else 1))
        self.ff = SwiGLU(dim, ff_inner or ff_mult * dim, eps) if ff == "swiglu" else FeedForward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(dim if gate == "vector" else 1))

    def forward(self, x, text_time, kv, R):
        """x (B, T, C); text_time (B, T) image numbers; kv from `attn.media_kv`, None without images."""
        if kv is not None:
            x = x + self.attn(x, text_time, kv, R) * self.attn_gate.tanh()
        return x + self.ff(x) * self.ff_gate.tanh()
