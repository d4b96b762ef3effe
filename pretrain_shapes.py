"""
Stage 1 of the shapes world: the stand-ins for the pretrained models that a real Flamingo downloads.

Flamingo never trains its vision encoder or its LM: it takes a contrastively pretrained image encoder
and a pretrained LM and freezes both (paper section 3). Offline there is nothing to download, so this
file makes the two in about two minutes on a 2-core CPU (600 LM steps, 500 vision steps),
then train.py freezes them exactly as it would a real CLIP and GPT-2:

1. the LM: a small GPT-2 (the "shapes" BPE tokenizer, tokenizer.py) trained on the *text* of shapes sequences,
   half of its rows at random offsets as GPT-2 read its text, each image a random ordinary token and
   `<|endofchunk|>` written as a newline. It learns the formats and,
   from task-by-example text, to answer in the kind its examples use; it cannot know what any image shows.
   A second loss makes its state where an answer begins carry the question's words, as a real LM's does.
   Saved in the Hugging Face layout (config.json + model.safetensors), loaded by LM.from_pretrained.
2. the vision encoder: the open_clip ModifiedResNet "shapes-rn" (config/clip) up to its stage 2, whose
   8 x 8 feature map is the grid of visual tokens; trained to tell, for every token, the shape, color
   and size of the object under it and that object's cell. This replaces CLIP's contrastive
   pretraining, which collapsed at this scale (docs/shapes.md). Saved as an open_clip weights file,
   loaded with `clip_pretrained=<file>`.

    python pretrain_shapes.py --out_dir=out-shapes/pretrained
"""

import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import files
import shapes
from lm import LM, LMConfig
from tokenizer import EOC, get_tokenizer
from vision import VisionEncoder

# -----------------------------------------------------------------------------
# 1. The language model

QUESTION_LOSS = 3.0  # weight of the second loss (below)
LM_RECIPE = 5  # written beside each stand-in LM (stage1.json): a stand-in of another recipe is refused (pretrain);
#               raise it whenever the LM's recipe changes (docs/shapes.md lists the recipes)


def lm_text(text):
    """A Flamingo sequence as the LM sees it in stage 1: chunks ended by a newline. Each <image> stays, as a
    marker that pretrain_lm fills with a random ordinary token (below)."""
    return text.replace(EOC, "\n")


def lm_row(seed, index, tok, block_size, g):
    """Row `index` of stage 1's text, as ids: at most block_size tokens of whole samples packed up to twice
    that. Half the rows (drawn from generator g) begin where a sample begins, as every stage-2 row does; the
    others at a random offset, as GPT-2 read its text, so that a prompt may begin anywhere (eval's 0-shot prompt
    begins with a text-only "Question"; docs/shapes.md). A row that begins inside a question: the second loss
    (question_words) asks at its ":" only for the words the row holds."""
    ids = tok.encode_markup(lm_text(shapes.packed_sample("train", seed, index, tok, 2 * block_size)[0]))
    if torch.rand((), generator=g) < 0.5:
        return ids[:block_size]
    start = int(torch.randint(max(1, len(ids) - block_size // 2), (), generator=g))
    return ids[start:start + block_size]


def question_words(rows, tok):
    """Where the LM must know what a question asks: for the ":" that ends each "Short answer:", the color and
    shape words since its "Question" -> a list of (row, position, word id). Empty for a tokenizer that does not
    write those words as single tokens (the "bytes" one)."""
    words = {tok.encode(" " + w)[0] for w in (*shapes.SHAPES, *shapes.COLORS) if len(tok.encode(" " + w)) == 1}
    if len(words) < len(shapes.SHAPES) + len(shapes.COLORS):
        return []
    question, end = tok.encode("Question"), tok.encode(" Short answer:")
    found = []
    for b, r in enumerate(rows):
        start = 0
        for t in range(len(r)):
            if r[t:t + len(question)] == question:
                start = t
            elif t + 1 >= len(end) and r[t + 1 - len(end):t + 1] == end:
                found += [(b, t, w) for w in sorted(set(r[start:t]) & words)]
    return found


def lm_config(tokenizer="shapes", n_layer=4, n_embd=64, n_head=4):
    """The stand-in LM's architecture: a small GPT-2 over the tokenizer's vocabulary (train.py's dry run counts it
    before stage 1 has made it)."""
    return LMConfig(arch="gpt2", vocab_size=get_tokenizer(tokenizer).base_n_vocab, n_layer=n_layer, n_head=n_head,
                    n_embd=n_embd, block_size=512)


def pretrain_lm(out, tokenizer="shapes", iters=600, batch_size=16, block_size=256, lr=3e-3, seed=0, n_layer=4,
                n_embd=64, n_head=4, embedding_std=0.25, question_loss=QUESTION_LOSS, log=print):
    torch.manual_seed(seed)
    tok = get_tokenizer(tokenizer)
    lm = LM(lm_config(tokenizer, n_layer, n_embd, n_head))
    # The token embeddings (tied to the output head) start large: N(0, embedding_std), not nanoGPT's 0.02.
    # In this text every color is interchangeable with every other, and every shape with every other: from the
    # usual small start their rows collapse onto one vector, and a frozen LM that cannot tell "circle" from
    # "square" in its input or its head cannot be taught by stage 2 to say which one it sees. From a large start
    # each row keeps its own random part: distinct words, as a real LM has from the many contexts of real text
    # (docs/shapes.md has the measurements, and why not larger still).
    with torch.no_grad():
        lm.transformer.wte.weight.normal_(0, embedding_std)
    # The second loss. Each gated block reads its query from the LM's state where the answer begins, at the ":"
    # of "Short answer:". A real LM's state there carries what the question asked: predicting real text needs
    # it. In shapes text it never does (no answer can be told from the words alone), so without this loss the
    # state there is almost all ":", and stage 2 cannot learn which object a question names. So the LM's state
    # after each layer but the last, read through its own final norm and head (a "logit lens"), must also name
    # the question's color and shape words there (docs/shapes.md).
    hidden = {}
    hooks = [block.register_forward_hook(lambda m, args, x, i=i: hidden.__setitem__(i, x))
             for i, block in enumerate(lm.transformer.h[:-1])]
    # An <image> marker becomes a random token of the LM's vocabulary (<|endoftext|> too), never a target: stage 2
    # puts a token there this LM never saw (the new <image> row), and the LM must read the question after it
    # whatever it is.
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0 = time.time()
    for it in range(iters):
        rows = [lm_row(seed, it * batch_size + b, tok, block_size, g) for b in range(batch_size)]
        T = max(len(r) for r in rows)
        idx = torch.full((batch_size, T), tok.eot_id)
        targets = torch.full((batch_size, T), -1)
        for b, r in enumerate(rows):
            r = torch.tensor(r)
            marker = r == tok.image_id
            r[marker] = torch.randint(tok.base_n_vocab, (int(marker.sum()),), generator=g)
            idx[b, :len(r)] = r
            targets[b, :len(r) - 1] = r[1:].masked_fill(marker[1:], -1)
        for group in opt.param_groups:  # linear warmup over 30 steps, then cosine to 10%
            group["lr"] = lr * min(1, (it + 1) / 30) * (0.55 + 0.45 * np.cos(np.pi * it / iters))
        _, loss = lm(idx, targets)
        aux = torch.zeros(())
        found = question_words(rows, tok) if question_loss else []
        if found and hidden:  # (a 1-layer LM has no layer but the last)
            qb, qt, qw = (torch.tensor(v) for v in zip(*found))  # (n,) each: row, position of ":", word id
            aux = sum(F.cross_entropy(lm.lm_head(lm.transformer.ln_f(h[qb, qt])), qw)  # h[qb, qt] (n, C) -> (n, V)
                      for h in hidden.values())
            aux = aux / len(hidden)
        opt.zero_grad(set_to_none=True)
        (loss + question_loss * aux).backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        if it % 50 == 0 or it == iters - 1:
            log(f"lm    step {it:4d} loss {loss.item():.3f} question words {aux.item():.3f}  ({time.time() - t0:.0f}s)")
    for hook in hooks:
        hook.remove()
    lm.save_pretrained(out)
    with open(os.path.join(out, "stage1.json"), "w") as f:  # how it was made: pretrain() checks the recipe
        json.dump({"recipe": LM_RECIPE, "seed": seed, "embedding_std": embedding_std}, f)
    return lm


# -----------------------------------------------------------------------------
# 2. The vision encoder

def patch_labels(scene, n=8):
    """For each patch of an n x n grid: (shape, color, size, cell) of the object covering most of it,
    0 = nothing (shapes, colors and sizes are 1-based); cell is the patch's own cell when empty. -> (n*n, 4)"""
    P = shapes.IMAGE_SIZE // n  # pixels per patch side
    owner = np.zeros((shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), dtype=np.int64)  # 0 = background, k = object k
    for k, o in enumerate(scene["objects"], 1):
        s = shapes.SIZES[o["size"]]
        y0, x0 = o["cy"] - s // 2, o["cx"] - s // 2
        owner[y0:y0 + s, x0:x0 + s][shapes.MASKS[o["shape"], o["size"]]] = k
    counts = np.stack([(owner == k).reshape(n, P, n, P).sum((1, 3)) for k in range(len(scene["objects"]) + 1)])
    counts[0] = np.where(counts[1:].max(0, initial=0) >= P * P // 10, 0, P * P)  # an object owns a patch from 10% up
    who = counts.argmax(0).reshape(-1)  # (n*n,) object index per patch
    centre = (np.arange(n) * P + P // 2) * 3 // shapes.IMAGE_SIZE  # grid row/col of patch centres
    own_cell = (centre[:, None] * 3 + centre[None, :]).reshape(-1)
    labels = np.zeros((n * n, 4), dtype=np.int64)
    for p, k in enumerate(who):
        if k == 0:
            labels[p] = (0, 0, 0, own_cell[p])
        else:
            o = scene["objects"][k - 1]
            labels[p] = (1 + shapes.SHAPES.index(o["shape"]), 1 + list(shapes.COLORS).index(o["color"]),
                         1 + list(shapes.SIZES).index(o["size"]), o["cell"])
    return labels


HEADS = (1 + len(shapes.SHAPES), 1 + len(shapes.COLORS), 1 + len(shapes.SIZES), 9)  # shape, color, size, cell


def pretrain_vision(out, clip="shapes-rn", stage=2, iters=500, batch_size=64, lr=3e-3, seed=0, log=print):
    """Train the tower with a linear head on its spatial tokens (patch labels above), save it as an open_clip
    weights file. A small CNN (open_clip's ModifiedResNet, 53K parameters up to stage 2) learns these
    labels far faster than a ViT of the same size (docs/shapes.md)."""
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    enc = VisionEncoder(clip, stage=stage)  # the same forward Flamingo uses
    with torch.no_grad():  # the token grid is n x n (eval mode: the probe must not touch BatchNorm's statistics)
        n = int(enc.eval()(torch.zeros(1, 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)).shape[1] ** 0.5)
    enc.train()
    head = nn.Linear(enc.width, sum(HEADS))
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng([seed, 7])
    t0 = time.time()
    for it in range(iters):
        scenes = [shapes.random_scene(rng) for _ in range(batch_size)]
        x = data.normalize([shapes.render(s, rng) for s in scenes])          # (B, 3, 64, 64), CLIP's statistics
        y = torch.from_numpy(np.stack([patch_labels(s, n) for s in scenes]))  # (B, n*n, 4)
        logits = head(enc(x)).split(HEADS, dim=-1)                           # 4 x (B, n*n, classes)
        losses = [F.cross_entropy(l.flatten(0, 1), y[..., j].flatten()) for j, l in enumerate(logits)]
        loss = sum(losses)
        for g in opt.param_groups:
            g["lr"] = lr * min(1, (it + 1) / 30) * (0.55 + 0.45 * np.cos(np.pi * it / iters))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 100 == 0 or it == iters - 1:
            on = y[..., 0] > 0  # accuracy on the patches that show an object (most patches are background)
            acc = [(l.argmax(-1) == y[..., j])[on].float().mean().item() for j, l in enumerate(logits)]
            log(f"vision step {it:4d} loss {loss.item():.3f} object-patch accuracy shape/color/size/cell "
                + "/".join(f"{a:.2f}" for a in acc) + f"  ({time.time() - t0:.0f}s)")
    # a whole open_clip checkpoint, so that open_clip itself loads it: the stages the encoder dropped (never
    # trained, never used) keep their initial values
    full = open_clip.create_model(clip).state_dict()
    full.update({"visual." + k: v for k, v in enc.visual.state_dict().items()})
    save_file({k: v.contiguous() for k, v in full.items()}, out)
    return enc


def pretrain(lm_dir, vision_file, tokenizer="shapes", lm_iters=600, vision_iters=500, seed=0, clip="shapes-rn",
             vision_stage=2, embedding_std=0.25, log=print):
    """Both stand-ins, into lm_dir and vision_file, skipping any already there. A stand-in LM that an older
    recipe made (stage1.json missing or another LM_RECIPE) stops the run with what to do: reused, it would
    quietly give a worse model."""
    os.makedirs(os.path.dirname(os.path.abspath(vision_file)), exist_ok=True)
    if os.path.exists(os.path.join(lm_dir, "model.safetensors")):
        try:
            with open(os.path.join(lm_dir, "stage1.json"), "rb") as f:
                recipe = files.loads(f.read()).get("recipe")
        except FileNotFoundError:
            recipe = 1  # made before stage1.json existed
        except (ValueError, AttributeError):
            recipe = "unreadable stage1.json"
        if recipe != LM_RECIPE:
            raise SystemExit(f"{lm_dir} holds a stand-in LM from an older stage-1 recipe ({recipe}, now {LM_RECIPE}): "
                             f"delete {lm_dir} and run again to remake it")
    else:
        pretrain_lm(lm_dir, tokenizer, iters=lm_iters, seed=seed, embedding_std=embedding_std, log=log)
    if not os.path.exists(vision_file):
        pretrain_vision(vision_file, clip, vision_stage, iters=vision_iters, seed=seed, log=log)
    return lm_dir, vision_file


if __name__ == "__main__":
    from configurator import configure
    out_dir, tokenizer, lm_iters, vision_iters, seed, clip, vision_stage, embedding_std = \
        "out-shapes/pretrained", "shapes", 600, 500, 0, "shapes-rn", 2, 0.25
    configure(globals(), exit_on_error=True)
    pretrain(os.path.join(out_dir, "lm"), os.path.join(out_dir, "vision.safetensors"), tokenizer, lm_iters,
             vision_iters, seed, clip, vision_stage, embedding_std)
