"""
Flamingo (Alayrac et al. 2022, Figure 3): a frozen vision encoder (vision.py) and a frozen language model (lm.py),
joined by the two trained parts, the Perceiver Resampler (resampler.py) and GATED XATTN-DENSE blocks (xattn.py)
inserted between the LM's layers.

Read top to bottom: the config; building and freezing; one forward pass (images -> visual tokens -> keys and
values per gated block -> the LM's layers with the blocks between them -> logits); generation (generation.py does
the work); the ways to build one (from a pretrained LM and CLIP, from OpenFlamingo's and IDEFICS's released models,
at random for a dry run); this project's checkpoints (memory.py estimates what a training run needs).

Shapes: B batch rows, T tokens, C LM width, N media items in the batch, F frames per item, S patches per frame,
D vision width, R visual tokens per item (the resampler's latents), M the most media items any one row holds,
V the LM's vocabulary (the new tokens' rows come after it).
"""

import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import files
import generation
import hf
import idefics
import openflamingo
import pretrained
from lm import LM, LMConfig, row_positions
from resampler import PerceiverResampler
from vision import VisionEncoder
from xattn import GatedCrossAttentionBlock


@dataclass
class FlamingoConfig:
    lm: str = ""                          # LM.from_pretrained path or hub id
    clip: str = "ViT-B-32"                # open_clip model name
    clip_pretrained: str | None = None    # open_clip tag or local weights file
    cross_attn_every_n_layers: int = 1    # a GATED XATTN-DENSE block before layer i when (i + 1) % n == 0
    cross_attn_from_layer: int = 0        # ... and i >= this (1: the LM's first layer reads its own embeddings)
    xattn_at: str = "end"                 # "start": before layers i % n == 0 instead: 0, n, 2n, ... (IDEFICS)
    resampler_depth: int = 6
    resampler_heads: int = 8
    resampler_dim_head: int = 64
    num_latents: int = 64
    max_num_frames: int = 1               # time embeddings for videos of up to this many frames; 0 = none
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    xattn_ff_mult: int = 4
    # IDEFICS's gated blocks (xattn.py): "rmsnorm"; "swiglu" of xattn_ff_inner; q/k RMSNorms; "vector" gates
    xattn_norm: str = "layernorm"
    xattn_ff: str = "gelu"
    xattn_ff_inner: int | None = None
    xattn_qk_norm: bool = False
    xattn_gate: str = "scalar"
    xattn_eps: float = 1e-5
    resampler_ff_act: str = "gelu"        # IDEFICS's resampler (resampler.py): "relu", and q/k LayerNorms
    resampler_qk_norm: bool = False
    only_attend_immediate_media: bool = True  # False: a token sees all images at or before it
    vision_ln_post: bool = True
    vision_class_token: bool = False      # the resampler reads the tower's class token too (IDEFICS)
    vision_stage: int | None = None       # ResNet towers: the stage whose feature map is the grid (None = last)
    freeze_lm: bool = True
    freeze_vision: bool = True
    train_lm_layers: int = 0              # fine-tuning: the LM's top this many layers trained too (freeze_lm or not)
    train_lm_embeddings: bool = False     # the LM's whole input table trained too, as OpenFlamingo does (config/9b.py)
    new_tokens: tuple = ("<image>", "<|endofchunk|>")  # rows after the LM's vocabulary, in this order
    tie_new_tokens: bool = False          # their output rows are their input rows (OpenFlamingo's MPT; README)
    openflamingo: str | None = None       # an OpenFlamingo checkpoint.pt this model was built from (its LM rows)
    idefics: str | None = None            # an IDEFICS folder or hub id this model was built from (idefics.py)
    stop_token_id: int | None = None      # ends a chunk where <|endofchunk|> is not a new token (IDEFICS's)

    def __post_init__(self):
        self.new_tokens = tuple(self.new_tokens)  # hashable, whatever the saved form
        for key, kinds in (("xattn_at", ("end", "start")), ("xattn_norm", ("layernorm", "rmsnorm")),
                           ("xattn_ff", ("gelu", "swiglu")), ("xattn_gate", ("scalar", "vector")),
                           ("resampler_ff_act", ("gelu", "relu"))):
            if getattr(self, key) not in kinds:
                raise ValueError(f"{key}={getattr(self, key)!r}: one of {kinds}")


class Flamingo(nn.Module):
    """A frozen vision encoder and a frozen LM, joined by a trained resampler and gated cross-attention."""

    def __init__(self, lm: LM, vision: VisionEncoder, cfg: FlamingoConfig, verbose=True):
        super().__init__()
        self.config = cfg
        self.lm, self.vision = lm, vision
        C, D = lm.config.n_embd, vision.width
        self.perceiver = PerceiverResampler(D, cfg.resampler_depth, cfg.resampler_heads, cfg.resampler_dim_head,
                                            cfg.num_latents, cfg.max_num_frames, ff_act=cfg.resampler_ff_act,
                                            qk_norm=cfg.resampler_qk_norm)
        n, first = cfg.cross_attn_every_n_layers, cfg.xattn_at == "start"
        self.xattn = nn.ModuleDict({
            str(i): GatedCrossAttentionBlock(C, D, cfg.xattn_heads, cfg.xattn_dim_head, cfg.xattn_ff_mult,
                                             cfg.only_attend_immediate_media, cfg.xattn_norm, cfg.xattn_ff,
                                             cfg.xattn_ff_inner, cfg.xattn_qk_norm, cfg.xattn_gate, cfg.xattn_eps)
            for i in range(lm.config.n_layer) if (i + (not first)) % n == 0 and i >= cfg.cross_attn_from_layer
        })
        if not self.xattn:
            raise ValueError(f"no layer of the {lm.config.n_layer}-layer LM gets a gated block "
                             f"(cross_attn_every_n_layers={n}, cross_attn_from_layer={cfg.cross_attn_from_layer})")
        # The new tokens get their own trained rows, appended after the LM's vocabulary, so that every
        # original LM weight stays bit-identical. They start at the mean of the existing rows. Ours are
        # <image>, <|endofchunk|>; OpenFlamingo's <|endofchunk|>, <image>, <PAD> (from_openflamingo); IDEFICS's
        # <fake_token_around_image>, <image>, and the instruct models' <end_of_utterance> (from_idefics).
        V, n = lm.config.vocab_size, len(cfg.new_tokens)
        self.media_token_id = V + cfg.new_tokens.index("<image>")
        self.eoc_token_id = V + cfg.new_tokens.index("<|endofchunk|>") if "<|endofchunk|>" in cfg.new_tokens \
            else cfg.stop_token_id
        wte, head = lm.transformer.wte.weight.detach(), lm.lm_head.weight.detach()
        self.new_wte = nn.Parameter(wte.float().mean(0).expand(n, -1).clone().to(wte.dtype))    # (n, C)
        self.new_lm_head = nn.Parameter(head.float().mean(0).expand(n, -1).clone().to(head.dtype))
        if cfg.tie_new_tokens:
            self.new_lm_head = self.new_wte
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
                               ("new_tokens", f"new token rows ({', '.join(cfg.new_tokens)})"), ("total", "total")]:
                t, f = counts.get(part, (0, 0))
                print(f"{name[:47]:<48}{t:>15,}{f:>15,}")

    def unfreeze_lm_layers(self, k, embeddings=False):
        """Train the LM's top k layers too (fine-tuning on one's own data), and with `embeddings` its whole input table
        (as OpenFlamingo: freeze_lm_embeddings=False; a tied head, GPT-2's or MPT's, trains with it). Recorded in the
        config, so that a checkpoint rebuilds the same model. k = 0 and embeddings=False change nothing."""
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

    def configure_optimizer(self, learning_rate, weight_decay, betas, gate_lr_mult=1.0, fused=False):
        """AdamW over what is trained, in three groups: weight decay on the trained matrices only (not on norms, gates,
        latents or token tables: OpenFlamingo decays none of its embedding), none on the rest, and the tanh gates at
        gate_lr_mult times the others' rate (their group's "lr_mult", applied by train.py's schedule): with Adam a
        gate moves about lr per step at most, and a short run needs them open long before the paper's 500k steps."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        is_gate = lambda n: n.endswith(("attn_gate", "ff_gate"))  # noqa: E731
        is_decay = lambda n, p: p.dim() >= 2 and not any(s in n for s in ("latents", "new_", "wte"))  # noqa: E731
        return torch.optim.AdamW([
            {"params": [p for n, p in named if is_decay(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not is_decay(n, p) and not is_gate(n)], "weight_decay": 0.0},
            {"params": [p for n, p in named if is_gate(n)], "weight_decay": 0.0, "lr_mult": gate_lr_mult},
        ], lr=learning_rate, betas=betas, fused=fused)

    def train(self, mode=True):
        super().train(mode)
        if self.config.freeze_vision:
            self.vision.eval()  # a frozen tower stays in eval mode (no patch dropout)
        return self

    def fully_shard(self):
        """Shard the model over the processes with PyTorch's FSDP (fully_shard; under torchrun): each LM layer, each
        gated block (its cross-attention apart: generation and encode_media call its media_kv outside its forward),
        the resampler and the tower become units whose weights (DTensors, which train.py gathers whole to save them),
        gradients and optimizer state are split over the processes; the root keeps embeddings, head, new token rows."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        for unit in self.lm.transformer.h:
            fully_shard(unit)
        for blk in self.xattn.values():
            fully_shard(blk.attn)
            register_fsdp_forward_method(blk.attn, "media_kv")
            fully_shard(blk)
        fully_shard(self.perceiver)
        fully_shard(self.vision)
        fully_shard(self)

    # -------------------------------------------------------------------------
    # Forward: images -> visual tokens, then the LM's layers with the gated blocks in between

    def forward(self, images, idx, targets=None, vision_features=None, attention_mask=None):
        """images (N, F, 3, H, W) or None, idx (B, T) -> (logits (B, T, V + n), None), or with targets (B, T)
        (None, loss): the mean cross-entropy over the targets != -1, with logits computed at those positions only
        (loss_at), never for the others, and not returned.
        vision_features (N, F, S, D): the tower's output for the images, given instead of them (encode_media).
        attention_mask (B, T): 1 at real tokens, 0 at left padding (rows of different lengths); None: all real."""
        media = self.encode_media(images, idx, vision_features)   # (N, R, D) visual tokens, and their rows and slots
        text_time = (idx == self.media_token_id).cumsum(1)       # (B, T): phi of Flamingo Figure 6
        real = None if attention_mask is None else attention_mask.bool()
        pos = None if real is None else row_positions(real)       # (B, T): each row's own positions
        kvs = self.media_kvs(media)                               # {layer: (k, v)}, each (B, h, M*R, dh)
        if targets is None:
            return self.forward_lm(idx, text_time, kvs, real=real, pos=pos), None
        return None, self.loss_at(self.hidden_states(idx, text_time, kvs, real=real, pos=pos), targets)

    def encode_media(self, images, idx, vision_features=None):
        """The resampled visual tokens of the batch's media items and where they go: (tokens (N, R, D), (row, slot,
        B, M)), row and slot (N,) each item's row and its place among that row's items; None without images.

        `images` (N, F, 3, H, W) holds the N media items of the batch in the order of their `<image>`
        tokens, row by row; a list of N items (F_i, 3, H, W) when their frame counts differ (images and videos mixed:
        every real frame is encoded once, no padding frames). Only real items are encoded, and only their keys and
        values computed (media_kvs): a row with fewer items than M (the most any row has) gets zero slots that no token
        attends to (xattn.media_mask). vision_features (N, F, S, D), or a list of (F_i, S, D), instead: the frozen
        tower's output for those images, computed once and cached (folders.FeatureCache).
        """
        if vision_features is not None:
            images = vision_features
        counts = (idx == self.media_token_id).sum(1)   # (B,) images per row
        n = int(counts.sum())
        if images is None or n == 0:
            if n or (images is not None and len(images)):
                raise ValueError(f"{n} <image> tokens but {0 if images is None else len(images)} images")
            return None
        items = list(images) if isinstance(images, (list, tuple)) else None
        dims = {t.ndim + 1 for t in items} if items else {images.ndim}  # 5: pixels, 4: features
        if len(images) != n or dims != {4 if vision_features is not None else 5}:
            raise ValueError(f"images must be (N, F, 3, H, W) or a list of (F, 3, H, W), vision_features (N, F, S, D) "
                             f"or a list of (F, S, D), with N = {n} (the number of <image> tokens); got "
                             f"{[tuple(t.shape) for t in items] if items else tuple(images.shape)}")
        frames = torch.cat(items) if items else images.flatten(0, 1)      # (sum of F, ...): every real frame once
        if vision_features is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision):
                frames = self.vision(frames)                               # (sum of F, S, D)
        frames = frames.to(next(self.perceiver.parameters()).dtype)
        feats = frames.split([len(t) for t in items]) if items else frames.view(*images.shape[:2], *frames.shape[1:])
        tokens = self.perceiver(feats)                       # (N, R, D): feats (N, F, S, D) or N of (F_i, S, D)
        N = len(tokens)
        B, M = idx.shape[0], int(counts.max())
        row = torch.repeat_interleave(torch.arange(B, device=idx.device), counts)       # (N,) row of each item
        slot = torch.arange(N, device=idx.device) - (counts.cumsum(0) - counts)[row]  # (N,) its place in the row
        return tokens, (row, slot, B, M)

    def media_kvs(self, media):
        """Each xattn block's keys and values of the media (encode_media's), each (B, h, M*R, dh): {layer: (k, v)};
        {} without images."""
        if media is None:
            return {}
        return {i: blk.attn.media_kv(*media) for i, blk in self.xattn.items()}

    def embed_tokens(self, idx):
        """Token embeddings (B, T, C): the frozen LM table, and the new trained rows for ids >= V."""
        V, n = self.lm.config.vocab_size, len(self.new_wte)
        if idx.numel() and (idx.max() >= V + n or idx.min() < 0):
            raise ValueError(f"token ids must be in [0, {V + n}): the LM's {V} and {', '.join(self.config.new_tokens)}")
        x = self.lm.transformer.wte(idx.clamp(max=V - 1))
        new = (idx >= V)[..., None]
        return torch.where(new, self.new_wte[(idx - V).clamp(min=0, max=n - 1)].to(x.dtype), x)

    def hidden_states(self, idx, text_time, kvs, caches=None, real=None, pos=None):
        """The LM's layers with a gated block before every n-th one (Flamingo Figure 3), then its final norm:
        idx (B, T) -> (B, T, C).

        text_time (B, T): which image each token belongs to (xattn.py). kvs: from media_kvs.
        caches: one KVCache per LM layer for generation, or None. real (B, past + T): which tokens are real, False
        at left padding (None: all). pos (B, T): each token's position in its row (None: past .. past + T - 1).
        """
        lm, R = self.lm, self.config.num_latents
        past = 0 if caches is None else caches[0].n
        if pos is None:
            pos = torch.arange(past, past + idx.shape[1], device=idx.device)
        x = lm.embed(self.embed_tokens(idx), pos)            # (B, T, C)
        rope, mask = lm.positions(pos, past, real)

        def layer(x, i):  # the gated block before LM layer i, if there is one, then the layer
            if str(i) in self.xattn:
                x = self.xattn[str(i)](x, text_time, kvs.get(str(i)), R)
            return lm.transformer.h[i](x, rope, mask, None if caches is None else caches[i])

        for i in range(lm.config.n_layer):
            if self.activation_checkpointing and torch.is_grad_enabled():  # keep only x; recompute in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, i, use_reentrant=False)
            else:
                x = layer(x, i)
        return lm.transformer.ln_f(x)

    def forward_lm(self, idx, text_time, kvs, caches=None, real=None, pos=None, last_only=False):
        """hidden_states, then the logits (B, T, V + n); with last_only those of each row's last token only,
        (B, 1, V + n): all that generation reads (rows are left-padded, so every row ends at T - 1)."""
        h = self.hidden_states(idx, text_time, kvs, caches, real, pos)
        return self.head(h[:, -1:] if last_only else h)

    def head(self, h):
        """Logits of hidden states (.., C) -> (.., V + n): the LM's frozen head, then the new tokens' rows."""
        return torch.cat([self.lm.lm_head(h), h @ self.new_lm_head.to(h.dtype).t()], dim=-1)

    def loss_at(self, h, targets):
        """The mean cross-entropy of the targets != -1 (B, T) given the hidden states h (B, T, C), computed at those
        K positions only, in fp32 whatever the autocast dtype.

        The softmax runs over the frozen head's V rows and the new tokens' n rows, without concatenating their
        (K, V) and (K, n) logits: the loss is logaddexp(lse_lm, lse_new) - (the target's logit), each part's
        log-sum-exp taken apart. lse_lm comes from cross_entropy's fused kernel, the fastest pass over (K, V) here
        (docs/measurements.md): cross_entropy(a, t) = lse(a) - a[t] for any LM row t, so lse(a) is that plus a[t],
        one dot product of h with row t. Target logits are such dot products too, never a gather from (K, V),
        whose backward would write another (K, V)."""
        keep = targets != -1                                  # (B, T)
        h, t = h[keep], targets[keep]                         # (K, C), (K,)
        V, new = self.lm.config.vocab_size, self.new_lm_head.to(h.dtype)
        t_lm = t.clamp(max=V - 1)                             # the target's LM row (any row where it is a new token)
        w_lm = self.lm.lm_head.weight[t_lm].to(h.dtype)       # (K, C)
        dot = lambda a, b: (a.float() * b.float()).sum(-1)  # noqa: E731  (K,)
        lse_lm = F.cross_entropy(self.lm.lm_head(h).float(), t_lm, reduction="none") + dot(h, w_lm)   # (K,)
        lse = torch.logaddexp(lse_lm, (h @ new.t()).float().logsumexp(-1))                           # (K,)
        target = torch.where(t < V, dot(h, w_lm), dot(h, new[(t - V).clamp(min=0)]))                  # (K,)
        return (lse - target).mean()

    # -------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, images, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, num_beams=1,
                 use_cache=True, stop_token_id=None, on_token=None, length_penalty=1.0):
        """Continue each prompt by up to max_new_tokens new tokens. temperature=0 is greedy; num_beams > 1 is beam
        search, whose finished hypotheses are ranked by their summed log-probability / (new tokens) ** length_penalty
        (OpenFlamingo's evaluation passes 0: the plain sum).

        prompts: a list of token-id lists of any lengths -> a list of each prompt's new tokens (without the stop
        token); or a tensor (B, T) of prompts of one length -> (B, T + new), the prompts and their continuations,
        a row that stopped padded with the stop token until all rows have. images (N, F, 3, H, W): the media
        items of all prompts, in the order of their <image> tokens, prompt by prompt (as forward takes them).
        Stops at `<|endofchunk|>` (or stop_token_id). With use_cache, the media keys and values are computed once
        for the whole call and the text keys and values are cached (lm.KVCache); use_cache=False recomputes
        everything at each step (the slow reference). `<image>` is never generated: no image could follow it.
        on_token(tokens (B, 1)) is called as each token is chosen (for streaming; not with beam search).
        """
        return generation.generate(self, images, prompts, max_new_tokens, temperature, top_k, top_p, num_beams,
                                   use_cache, stop_token_id, on_token, length_penalty)

    # -------------------------------------------------------------------------
    # Building one

    @classmethod
    def from_pretrained(cls, lm, clip, clip_pretrained=None, cross_attn_every_n_layers=1, verbose=True,
                        dtype=None, **options):
        """A Flamingo from a pretrained LM (path or hub id) and an open_clip model name + weights."""
        cfg = FlamingoConfig(lm=lm, clip=clip, clip_pretrained=clip_pretrained,
                             cross_attn_every_n_layers=cross_attn_every_n_layers, **options)
        lm_model = LM.from_pretrained(lm, dtype=dtype)
        vision = VisionEncoder(clip, clip_pretrained, cfg.vision_ln_post, cfg.vision_stage, cfg.vision_class_token)
        return cls(lm_model, vision, cfg, verbose=verbose)

    @classmethod
    def from_config(cls, cfg: FlamingoConfig, lm_config: LMConfig, verbose=False):
        """A Flamingo of random weights: the LM lm_config and the tower cfg.clip, with no file read (not even
        cfg.clip_pretrained). Under `with torch.device("meta")` nothing is allocated either: train.py's dry run."""
        vision = VisionEncoder(cfg.clip, None, cfg.vision_ln_post, cfg.vision_stage, cfg.vision_class_token)
        return cls(LM(lm_config), vision, cfg, verbose=verbose)

    @classmethod
    def from_openflamingo(cls, checkpoint, lm, clip="ViT-L-14", clip_pretrained="openai", dtype=None, verbose=True):
        """A released OpenFlamingo model: its checkpoint.pt (a hub id of hf.OPENFLAMINGO, a directory or the file), its
        LM (hub id or directory) and its CLIP; the layout read off the checkpoint, every tensor fitted to its place
        (openflamingo.py). Vision features: patch tokens before ln_post, as OpenFlamingo's released models saw them."""
        lm_model, vision, options, trained, path = openflamingo.read(checkpoint, lm, clip, clip_pretrained, dtype)
        model = cls(lm_model, vision, FlamingoConfig(**options), verbose=verbose)
        try:
            model.load_trained(trained)
        except ValueError as e:  # name the file and its keys too: xattn.{i}.X is <blocks>{i}.gated_cross_attn_layer.X
            blocks = hf.OPENFLAMINGO_LM_KEYS[model.lm.config.arch][0]
            raise ValueError(f"{path}: {e} (xattn.{{i}}.X is {blocks}{{i}}.gated_cross_attn_layer.X)") from None
        return model

    @classmethod
    def from_idefics(cls, path_or_hub_id, dtype=None, verbose=True):
        """A released IDEFICS model ("HuggingFaceM4/idefics-9b-instruct", ...) or any folder in the layout transformers'
        IdeficsForVisionText2Text saves (config.json, safetensors): its LLaMA, its CLIP tower and its trained parts,
        every tensor placed and its shape checked (idefics.py holds the key map and the options it sets)."""
        lm_model, vision, options, trained = idefics.read(path_or_hub_id, dtype)
        model = cls(lm_model, vision, FlamingoConfig(**options), verbose=verbose)
        if lm_model.config.tie_word_embeddings:  # IDEFICS ties the new rows of its head to those of its table too
            model.new_lm_head = model.new_wte
            trained.pop("new_lm_head", None)
        model.load_trained(trained)
        return model

    # -------------------------------------------------------------------------
    # Checkpoints: the trained parts, plus the config that rebuilds the rest

    def trained_state_dict(self):
        return {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}

    def frozen_tower(self):
        """The tower's tensors where only they rebuild it (a random frozen one; IDEFICS's is in its folder), else None."""
        if self.config.clip_pretrained is None and self.config.freeze_vision and not self.config.idefics:
            return {k: v.detach() for k, v in self.vision.state_dict().items()}

    def save_checkpoint(self, path, trained=None, vision=None, **extra):
        """Write {"flamingo_config", "model" (trained parts only), **extra} atomically: a temp file, then a
        rename, so a run killed mid-write leaves the previous checkpoint whole. trained / vision: those state
        dicts as given (train.py gathers them whole from FSDP's shards first), else this model's own."""
        ckpt = {"flamingo_config": asdict(self.config), "model": trained or self.trained_state_dict(), **extra}
        if (tower := self.frozen_tower()) is not None:
            ckpt["vision"] = vision or tower
        files.atomic_save(ckpt, path)

    def save_pretrained(self, folder, tokenizer="bytes", card=None, with_base=False):
        """This model as a folder to share (pretrained.py): config.json, model.safetensors of the trained parts, the
        model card (README.md: `card`, else pretrained.model_card's), the tokenizer (a name, or the path of its
        tokenizer.json); with_base: the LM's folder and the tower's weights copied in when they are local."""
        tensors = {**self.trained_state_dict(), **{"vision." + k: v for k, v in (self.frozen_tower() or {}).items()}}
        card = card or (lambda cfg: pretrained.model_card(self, folder, cfg))
        return pretrained.write(folder, asdict(self.config), tokenizer, tensors, card, with_base)

    @classmethod
    def from_folder(cls, path_or_hub_id, lm=None, clip_pretrained=None, dtype=None, verbose=True):
        """A model saved by save_pretrained: a folder or a hub id, downloaded once; the LM and the tower fetched by
        the names its config.json gives them (or lm / clip_pretrained instead). -> (model, its tokenizer's name)."""
        folder, cfg, tokenizer, trained, vision = pretrained.read(path_or_hub_id, lm=lm, clip_pretrained=clip_pretrained)
        return cls.from_saved(cfg, trained, vision, dtype, verbose, folder), tokenizer

    @classmethod
    def from_checkpoint(cls, path, verbose=True, map_location="cpu", dtype=None):
        """Rebuild a model saved by save_checkpoint (a ckpt.pt file or the directory holding it); dtype: the frozen
        LM's, cast as it is read (the trained parts stay in fp32)."""
        path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
        ckpt = files.torch_load(path, map_location=map_location)  # FileError: missing, truncated, holds code, ...
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("flamingo_config"), dict) or "model" not in ckpt:
            raise files.FileError(f"{path} is not a checkpoint of this project (no flamingo_config and model); an "
                                  "OpenFlamingo checkpoint.pt loads with --lm=<its LM> (README)")
        cfg = pretrained.resolve(ckpt["flamingo_config"], os.path.dirname(os.path.abspath(path)))  # relative: from it
        model = cls.from_saved(cfg, ckpt["model"], ckpt.get("vision"), dtype, verbose, path)
        model.config = FlamingoConfig(**ckpt["flamingo_config"])  # as saved: relative paths stay relative
        return model, ckpt

    @classmethod
    def from_saved(cls, cfg, trained, vision=None, dtype=None, verbose=True, source="the checkpoint"):
        """The model a FlamingoConfig dict describes, its frozen parts read by name (or the tower's tensors `vision`),
        then its trained tensors placed, each checked (load_trained)."""
        if unknown := sorted(set(cfg) - set(FlamingoConfig.__dataclass_fields__)):
            raise files.FileError(f"{source} was saved with model keys this code does not know: {unknown[:5]}")
        if cfg.get("openflamingo") or cfg.get("idefics"):  # built on a released model: its tensors come from it
            model = cls.from_idefics(cfg["idefics"], dtype, verbose) if cfg.get("idefics") else \
                cls.from_openflamingo(cfg["openflamingo"], cfg["lm"], cfg["clip"], cfg["clip_pretrained"], dtype=dtype,
                                      verbose=verbose)
            model.unfreeze_lm_layers(cfg.get("train_lm_layers", 0), cfg.get("train_lm_embeddings", False))
        else:
            model = cls.from_pretrained(verbose=verbose, dtype=dtype, **cfg)
        model.load_trained(trained)
        if vision:
            model.vision.load_state_dict(vision, strict=True)
        model.config = FlamingoConfig(**cfg)
        return model

    def load_trained(self, sd):
        """Load trained parts, refusing any missing, unexpected or mis-shaped tensor by name."""
        current = self.trained_state_dict()
        missing, extra = sorted(set(current) - set(sd)), sorted(set(sd) - set(current))
        if missing or extra:  # another config's or another version's checkpoint
            raise ValueError(f"the checkpoint's trained tensors do not fit the model its config builds: "
                             f"missing {missing[:5]}, unexpected {extra[:5]}")
        for k, v in sd.items():
            if v.shape != current[k].shape:
                raise ValueError(f"{k}: checkpoint has shape {tuple(v.shape)}, the model {tuple(current[k].shape)}")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in sd.items():
                params[k].copy_(v)


def load_model(init_from, lm="", clip="ViT-L-14", clip_pretrained="openai", dtype=None, verbose=False):
    """What sample.py, eval.py and train.py's fine-tuning load: (model, the name get_tokenizer takes). init_from: an
    out_dir of train.py (or its ckpt.pt); a save_pretrained folder or its hub id "user/name" (lm, clip_pretrained: its
    LM and tower, if not where it says); an OpenFlamingo checkpoint, "openflamingo/<name>" (its LM in hf.OPENFLAMINGO)
    or a checkpoint.pt with its LM's directory as `lm`; or an IDEFICS. dtype: the frozen LM's (else autocast)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if idefics.is_idefics(init_from):
        return Flamingo.from_idefics(init_from, dtype, verbose), hf.resolve_checkpoint_dir(init_from)
    if pretrained.is_folder(init_from) or (pretrained.is_hub_id(init_from) and not init_from.startswith("openflamingo/")):
        return Flamingo.from_folder(init_from, lm, None if clip_pretrained == "openai" else clip_pretrained, dtype, verbose)
    if init_from.startswith("openflamingo/") or lm:
        lm = lm or hf.OPENFLAMINGO.get(init_from)
        if not lm:
            raise ValueError(f"which LM does {init_from} extend? Pass it as --lm (known: {', '.join(hf.OPENFLAMINGO)})")
        model = Flamingo.from_openflamingo(init_from, lm, clip, clip_pretrained, dtype=dtype, verbose=verbose)
        return model, hf.resolve_checkpoint_dir(lm)
    model, ckpt = Flamingo.from_checkpoint(init_from, verbose=verbose, dtype=dtype)
    return model, ckpt.get("config", {}).get("tokenizer", "bytes")

