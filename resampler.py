"""
The Perceiver Resampler (Flamingo, Figure 4 and section 3.1.1).

A vision encoder gives a variable number of features per media item: S patches for each of F frames.
The language model wants a fixed, small number of visual tokens. The resampler turns (F, S, D)
features into (R, D) tokens: R learned latent vectors are queries, and the keys and values are the
features *concatenated with the latents themselves*. The paper's pseudo-code, for one media item:

    x_f = x_f + time_embeddings            # (F, S, D): one learned vector per frame
    x_f = flatten(x_f)                     # (F*S, D)
    for i in range(num_layers):
        x = x + attention_i(q=x, kv=concat([x_f, x]))
        x = x + ffw_i(x)
    return x                               # (R, D)

Module names follow OpenFlamingo's (`latents`, `layers.{i}.0.to_q`, ...; its open_flamingo/src/helpers.py) so
that its checkpoints load with a short key map. IDEFICS's resampler (transformers' idefics/perceiver.py) is the same
with two options: ff_act="relu" in its feed-forward, and qk_norm=True, a LayerNorm on each head's queries and keys.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def FeedForward(dim, mult=4, act="gelu"):
    """LayerNorm, Linear up, GELU (or ReLU), Linear down, no biases (indices 0, 1, 3 as in OpenFlamingo)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.ReLU() if act == "relu" else nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to concat(features, latents). Separate pre-LayerNorms for the two inputs."""

    def __init__(self, dim, heads=8, dim_head=64, qk_norm=False):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)  # keys, then values
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm, self.k_norm = nn.LayerNorm(dim_head), nn.LayerNorm(dim_head)

    def qkv(self, x, latents):
        """x (N, L, D) media features, latents (N, R, D) -> queries (N, h, R, dh), keys and values (N, h, L + R, dh)
        (explain.py reads the attention weights off these)."""
        x, latents = self.norm_media(x), self.norm_latents(latents)
        N = latents.shape[0]
        q = self.to_q(latents)                                       # (N, R, inner)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)  # (N, L + R, inner) each
        q, k, v = (t.view(N, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (N, h, *, dh)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x, latents):
        N, R, _ = latents.shape
        out = F.scaled_dot_product_attention(*self.qkv(x, latents))  # (N, h, R, dh): no mask, all see all
        return self.to_out(out.transpose(1, 2).reshape(N, R, -1))  # (N, R, D)


class PerceiverResampler(nn.Module):
    def __init__(self, dim, depth=6, heads=8, dim_head=64, num_latents=64, max_num_frames=1, ff_mult=4, ff_act="gelu",
                 qk_norm=False):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        # One learned vector per frame (the paper's time embeddings). OpenFlamingo's released models
        # have none (max_num_frames=0): then every item must be a single frame.
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim) * 0.02) if max_num_frames else None
        self.layers = nn.ModuleList([
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head, qk_norm), FeedForward(dim, ff_mult, ff_act)])
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim)

    def time_embeddings(self, Fr):
        """The time embeddings of an item of Fr frames, (Fr, D): the first Fr learned ones; for more frames than were
        learned (max_num_frames, the clip length trained on), the learned ones linearly interpolated to Fr points over
        the same span, as the Flamingo paper evaluates on longer clips than its 8 training frames. A resampler with one
        time embedding (trained on images) or none (OpenFlamingo's) cannot order frames in time: refused."""
        T = 0 if self.frame_embs is None else self.frame_embs.shape[0]
        if Fr <= T:
            return self.frame_embs[:Fr]
        if T <= 1 and Fr > 1:
            raise ValueError(f"an item of {Fr} frames, but this resampler has {T or 'no'} time embedding(s): "
                             "trained on images only, it cannot tell frames apart in time (train on videos, "
                             "max_num_frames >= 2)")
        if T == 0:
            return None
        return F.interpolate(self.frame_embs.t()[None], size=Fr, mode="linear", align_corners=True)[0].t()

    def forward(self, x):
        """x: (N, F, S, D) features of N media items, or a list of N items (F_i, S, D) of different frame counts (each
        group of one F runs as a batch: no padding frames) -> (N, R, D) visual tokens, whatever F and S are."""
        if isinstance(x, (list, tuple)):
            out = [None] * len(x)
            for Fr in sorted({t.shape[0] for t in x}):
                group = [i for i, t in enumerate(x) if t.shape[0] == Fr]
                for i, tokens in zip(group, self(torch.stack([x[i] for i in group]))):
                    out[i] = tokens
            return torch.stack(out)                                  # (N, R, D)
        N, Fr, S, D = x.shape
        time = self.time_embeddings(Fr)                              # (F, D), or None: no time embeddings
        if time is not None:
            x = x + time[:, None, :]                                 # (N, F, S, D)
        x = x.reshape(N, Fr * S, D)                                  # (N, F*S, D)
        latents = self.latents.expand(N, -1, -1)                     # (N, R, D)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm(latents)                                    # (N, R, D)
