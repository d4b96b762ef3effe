"""
Where each generated token looked, and how much the images mattered to it: the gated cross-attention read back
through the Perceiver Resampler onto each frame's patch grid.

    python sample.py --image scene.png --prompt "<image>Question:what color is the circle? Short answer:" \\
        --explain=look.png        # a picture; look.json: the same numbers
    python explain.py             # how often the map's peak falls on the object asked about (held-out shapes scenes)

A causal LM reads token t off the hidden state at t - 1, so a generated token's numbers are those of the position
that predicted it.

1. The blocks' attention. The queries of each GATED XATTN-DENSE block (xattn.py) attend over the R visual tokens of
   the image phi gives them (Flamingo Figure 6); their weights are averaged over the heads. The blocks are combined
   weighted by how open each is, |tanh(attn_gate)| (for a vector gate the mean over channels): a shut block adds
   nothing to the stream, so its attention counts for nothing.
2. Back through the resampler (Flamingo Figure 4): its R latents attend over concat(the F frames' features, the
   latents) in each layer. Attention rollout (Abnar & Zuidema 2020) carries a latent's share of each feature through
   the layers: what it reads from the features directly, plus what it reads from latents times their shares, with the
   residual path counted as half (the latents' learned starting values hold no image):
       C_0 = 0,    C_l = (C_{l-1} + A_l[:, features] + A_l[:, latents] @ C_{l-1}) / 2        (R, F*S)
   A token's map is w (R,) @ C_L over the F frames' S patches, normalised to sum to 1. A class token (IDEFICS) is no
   patch: its weight is reported apart and left out of the map.
3. How much the images mattered: `share`, the norm of what the blocks' cross-attention added to the residual
   stream over the norm of the stream entering each block (sums over the blocks); `dlogp`, the token's
   log-probability with the images minus that with every block's cross-attention removed (feed-forwards kept).
   A token before any image sees none (phi): no map, share and dlogp exactly 0.

Attention is not attribution: the map shows where the softmax put its weight, not what changed the answer (the
values' norms, the feed-forwards and the LM layers in between are not in it), and rollout's half for the residual is
a convention. dlogp is the causal number; the map is a picture of the mechanism.
"""

import math

import numpy as np
import torch

import files


def attention_weights(q, k, mask=None):
    """softmax(q k^T / sqrt(dh)), as scaled_dot_product_attention weighs its values: q (.., Tq, dh), k (.., Tk, dh),
    mask (True: may attend) -> (.., Tq, Tk)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1)


def rollout(perceiver, feats):
    """One item's features (F, S, D) -> C (R, F*S): each visual token's share of each frame patch (2. above)."""
    weights = []  # per layer (R, F*S + R): the latents' attention, averaged over heads
    keep = lambda m, args, out: weights.append(attention_weights(*m.qkv(*args)[:2])[0].mean(0))  # noqa: E731
    hooks = [attn.register_forward_hook(keep) for attn, _ in perceiver.layers]
    try:
        perceiver(feats[None])
    finally:
        for h in hooks:
            h.remove()
    L = feats.shape[0] * feats.shape[1]
    C = feats.new_zeros(weights[0].shape[0], L)                           # (R, F*S)
    for A in weights:
        C = (C + A[:, :L] + A[:, L:] @ C) / 2
    return C


class BlockRecorder:
    """Forward hooks on every gated block's cross-attention that keep, per block: its weights averaged over heads
    (B, T, M*R), the norm of the gated output it adds (B, T) and the norm of the stream entering it (B, T)."""

    def __init__(self, model):
        self.seen, self.hooks = {}, []
        for i, blk in model.xattn.items():
            self.hooks.append(blk.attn.register_forward_hook(self.keeper(i, blk)))

    def keeper(self, i, blk):
        def keep(m, args, out):
            x, text_time, (k, _), R = args
            q, mask, has_media = m.queries(x, text_time, k.shape[2] // R, R)
            w = attention_weights(q, k, mask) * has_media                   # (B, h, T, M*R)
            added = (out * blk.attn_gate.tanh()).norm(dim=-1)               # (B, T)
            self.seen[i] = (w.mean(1), added, x.norm(dim=-1))
        return keep

    def remove(self):
        for h in self.hooks:
            h.remove()


def grid_of(heat, F, cls):
    """A map over one item's F*S' features -> (F, g, g) patches (the class token's weight apart when cls) and that
    weight; a grid that is not square stays one row (F, 1, S)."""
    heat = heat.view(F, -1)                                                 # (F, S')
    class_weight = heat[:, 0].sum().item() if cls else 0.0
    heat = heat[:, 1:] if cls else heat                                     # (F, S)
    g = math.isqrt(heat.shape[1])
    grid = heat.view(heat.shape[0], g, g) if g * g == heat.shape[1] else heat[:, None]
    return grid / grid.sum().clamp(min=1e-12), class_weight


@torch.no_grad()
def explain(model, items, idx, start, decode=None):
    """Where each token of idx from `start` on looked (1.-3. above). items: the row's media items in the order of
    its <image> tokens, each (F, 3, H, W) pixels as the tower takes them; idx (T,) token ids, the prompt and
    then the continuation. -> one dict per token: token (decode([id]), if given), id, image (its 0-based index, None
    before any image), grid (F, g, g) lists summing to 1, peak [frame, row, col], class_token, blocks (layer, gate,
    grid, share each), share, dlogp. Only images or clips the tower encodes (no precomputed features)."""
    dtype = next(model.perceiver.parameters()).dtype
    feats = [model.vision(x).to(dtype) for x in items]                     # each (F, S', D)
    C = [rollout(model.perceiver, f) for f in feats]                       # each (R, F*S')
    idx = idx.view(1, -1)                                                  # (1, T)
    recorder = BlockRecorder(model)
    try:
        logits = model(None, idx, vision_features=feats or None)[0][0]    # (T, V)
    finally:
        recorder.remove()
    text_time = (idx == model.media_token_id).cumsum(1)                   # (1, T)
    bare = model.forward_lm(idx, text_time, {})[0]                         # (T, V): no block's cross-attention
    lp, lp_bare = logits.float().log_softmax(-1), bare.float().log_softmax(-1)
    gates = {i: model.xattn[i].attn_gate.tanh().abs().mean().item() for i in recorder.seen}
    norm = sum(gates.values()) or 1.0
    R, cls = model.config.num_latents, model.config.vision_class_token
    records = []
    for t in range(start, idx.shape[1]):
        p, tid = t - 1, idx[0, t].item()  # p: the position that predicted token t
        rec = {"token": decode([tid]) if decode else None, "id": tid, "image": None, "grid": None, "peak": None,
               "class_token": 0.0, "blocks": [], "share": 0.0, "dlogp": (lp[p, tid] - lp_bare[p, tid]).item()}
        records.append(rec)
        if not recorder.seen or text_time[0, p] == 0:  # phi: nothing to look at yet
            continue
        per_block = {i: w[0, p].view(-1, R) for i, (w, _, _) in recorder.seen.items()}  # {layer: (M, R)}
        combined = sum(gates[i] / norm * w for i, w in per_block.items())  # (M, R)
        m = int(combined.sum(-1).argmax()) if any(gates.values()) else int(text_time[0, p]) - 1
        grid, rec["class_token"] = grid_of(combined[m] @ C[m], len(items[m]), cls)        # (F, g, g)
        peak = np.unravel_index(int(grid.argmax()), tuple(grid.shape))      # (frame, row, col)
        rec.update(image=m, grid=grid.tolist(), peak=[int(v) for v in peak])
        added = sum(a[0, p] for _, a, _ in recorder.seen.values())
        rec["share"] = (added / sum(s[0, p] for _, _, s in recorder.seen.values())).item()
        for i, w in per_block.items():
            _, a, s = recorder.seen[i]
            block_grid = grid_of(w[m] @ C[m], len(items[m]), cls)[0]
            rec["blocks"].append({"layer": int(i), "gate": gates[i], "grid": block_grid.tolist(),
                                  "share": (a[0, p] / s[0, p]).item()})
    return records


# -----------------------------------------------------------------------------
# Writing it out

def pixels(item, mean, std):
    """An item's tower pixels (F, 3, H, W) back to what the tower saw, (F, H, W, 3) floats in [0, 1]."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (item.float().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def save(records, path, pictures=None, max_tokens=24):
    """records as JSON (path ends in .json), or a PNG of them over `pictures` (pixels(), one per item): a row per
    token (the first max_tokens), columns the image, the blocks combined, then each block. Atomic either way."""
    import json
    if path.endswith(".json"):
        files.atomic_write(path, lambda f: f.write(json.dumps(records, indent=1).encode()))
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = records[:max_tokens]
    layers = next((r["blocks"] for r in rows if r["blocks"]), [])
    F = max((len(p) for p in pictures), default=1)
    fig, axes = plt.subplots(len(rows), 2 + len(layers), squeeze=False,
                             figsize=((2 + len(layers)) * 1.6 * F + 1.2, 1.7 * len(rows) + 0.4))
    titles = ["image", "blocks combined\n(by |tanh gate|)"] + [f"block {b['layer']}\n|tanh gate| {b['gate']:.2f}"
                                                              for b in layers]
    for row, rec in zip(axes, rows):
        seen = "no image" if rec["image"] is None else f"image {rec['image'] + 1}"
        label = f"{rec['token']!r}\n{seen}\nshare {rec['share']:.2f}\ndlogp {rec['dlogp']:+.2f}"
        for j, ax in enumerate(row):
            ax.set_xticks([]), ax.set_yticks([])
            if rec is rows[0]:
                ax.set_title(titles[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
            if rec["image"] is None:
                ax.axis("off") if j else ax.text(0.5, 0.5, "before any image", ha="center", va="center", fontsize=7)
                continue
            frames = pictures[rec["image"]]                                # (F, H, W, 3)
            ax.imshow(np.concatenate(list(frames), axis=1))                # the frames side by side
            if j == 0:
                continue
            grid = np.array(rec["grid"] if j == 1 else rec["blocks"][j - 2]["grid"])  # (F, g, g)
            H, W = frames.shape[1:3]
            ax.imshow(np.concatenate(list(grid), axis=1), cmap="jet", alpha=0.5, interpolation="nearest",
                      extent=(0, W * len(frames), H, 0))
    if len(records) > max_tokens:
        fig.suptitle(f"the first {max_tokens} of {len(records)} tokens (the JSON has all)", fontsize=8)
    fig.tight_layout()
    files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)


# -----------------------------------------------------------------------------
# Does the map tell the truth? Held-out shapes scenes of 2 or 3 objects, "what color is the X?"

def cell_of(peak, g, size=64):
    """The shapes world's 3 x 3 grid cell (0..8, reading order) of patch `peak` [frame, row, col] of a g x g grid."""
    y, x = ((v + 0.5) * size / g for v in peak[1:])
    return int(y // (size / 3)) * 3 + int(x // (size / 3))


def measure(model, tok, n=200, seed=0, batch_size=16):
    """On n held-out scenes: the % of answers whose map peaks in the cell of the object asked about, the % expected
    for an object of the scene drawn at random, the % that peak on no object, and the answers' exact match."""
    import data
    import shapes
    from tqdm import tqdm
    hit = rand = empty = right = 0
    for b0 in tqdm(range(0, n, batch_size), desc="explain: peaks on held-out scenes", disable=None):
        cases = []
        for i in range(b0, min(n, b0 + batch_size)):
            rng = shapes.sample_rng("test", seed, i)
            scene = shapes.random_scene(rng, n_objects=2 + int(rng.integers(2)))
            image = shapes.render(scene, rng)
            asked = scene["objects"][int(rng.integers(len(scene["objects"])))]
            prompt = tok.encode_markup(shapes.question_chunk(f"what color is the {asked['shape']}?"))
            cases.append((scene, asked, prompt, data.normalize([image], model.vision.mean, model.vision.std)))
        x = torch.stack([c[3] for c in cases])                              # (B, 1, 3, H, W)
        answers = model.generate(x, [c[2] for c in cases], max_new_tokens=4, temperature=0.0)
        for (scene, asked, prompt, item), answer in zip(cases, answers):
            rec = explain(model, [item], torch.tensor(prompt + (answer or [model.eoc_token_id])[:1]), len(prompt))[0]
            cell = cell_of(rec["peak"], len(rec["grid"][0]))
            cells = [o["cell"] for o in scene["objects"]]
            hit += cell == asked["cell"]
            rand += cells.count(cell) / len(cells)
            empty += cell not in cells
            right += tok.decode(answer) == asked["color"]
    return {k: 100.0 * v / n for k, v in dict(peak_on_asked=hit, peak_on_random_object=rand, peak_on_no_object=empty,
                                              answer_exact_match=right).items()}


if __name__ == "__main__":
    from configurator import check, configure
    config = dict(init_from="out-shapes", num_samples=200, seed=0, batch_size=16)
    configure(config)
    check(config, at_least=dict(num_samples=1, batch_size=1))
    from files import LOAD_ERRORS
    from model import load_model
    from tokenizer import get_tokenizer
    try:
        model, tokenizer = load_model(config["init_from"])
    except LOAD_ERRORS as e:
        raise SystemExit(f"error: {files.message(e)}") from None
    model.eval()
    if model.vision.image_size not in (64, (64, 64)):  # the scenes are drawn at the shapes world's size
        raise SystemExit(f"error: {config['init_from']} is not a shapes-world model (its tower takes "
                         f"{model.vision.image_size} px images, the scenes are 64 px): explain.py measures those only")
    tok = get_tokenizer(tokenizer, lm_vocab_size=model.lm.config.vocab_size, new_tokens=model.config.new_tokens)
    result = measure(model, tok, config["num_samples"], config["seed"], config["batch_size"])
    print(", ".join(f"{k} {v:.1f}%" for k, v in result.items()))
