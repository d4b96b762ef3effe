"""
How much memory a training run needs per GPU: a rough estimate, which train.py's dry run prints (--dry_run=True)
before anything is allocated, so that a 9B configuration can be sized on a laptop.
"""


def estimate(model, batch_tokens, value_bytes, shards=1, activation_checkpointing=False):
    """A rough estimate of a training run's memory per GPU, in GB (1e9 bytes): (weights, activations).

    Weights: the frozen ones at value_bytes each (2 for bf16, 4 for fp32: the LM is read in the autocast dtype;
    the vision tower stays fp32, counted at value_bytes too), the trained ones 16 bytes each (fp32 weight,
    gradient and AdamW's 2 tensors); FSDP splits all of them over `shards` processes, DDP keeps a whole copy on
    each (its gradient buckets not counted). Activations kept for the backward pass, in the autocast dtype, for
    batch_tokens tokens of width C: about 16 values per token and unit of width in each LM layer and each gated
    block (Korthikanti et al. 2022, "Reducing Activation Recomputation", without dropout and with fused
    attention: no T x T matrix); with activation checkpointing only each layer's input (1 value) plus one LM
    layer and gated block recomputed (32); plus the logits, batch_tokens x (V + n), in fp32 for the loss and its
    gradient (8 bytes). Left out: the resampler's activations (small next to the LM's at a few images per row),
    the frozen vision encoder (no gradients), CUDA's own overhead."""
    trained, frozen = model.parameter_counts()["total"]
    C, L, V = model.lm.config.n_embd, model.lm.config.n_layer, model.lm.config.vocab_size
    weights = (frozen * value_bytes + trained * 16) / shards / 1e9
    values = L + 32 if activation_checkpointing else 16 * (L + len(model.xattn))  # (BT, C) values per token
    activations = (values * batch_tokens * C * value_bytes + batch_tokens * (V + len(model.new_wte)) * 8) / 1e9
    return weights, activations
