"""
OpenFlamingo's side of bench.py's comparison, and the synthetic data both sides train on.

build() makes OpenFlamingo 2.0.1's own model (package `open_flamingo`) and ours from the same files: an MPT, a CLIP
with random weights, a GPT-NeoX-like tokenizer, and its checkpoint.pt (trained parts drawn at random, gates open).
Then, in fp32: of_pairs_batch / of_docs_batch build LAION and MMC4 batches with its own train/data.py functions,
labelled as its train_one_epoch labels them; of_rows_batch puts our rows in its tensors; of_train_step is its
training step; of_generate generates as its evaluation does. laion_like_pairs / mmc4_like_docs follow the published
statistics (section 5); ours_pairs / ours_docs are the same samples in our ids; count_targets counts either side's.

    python bench.py --size=tiny     # bench.py drives it; tests/test_bench.py checks it against our own code

"tiny": tests/test_openflamingo.py's sizes (flamingo-tiny CLIP at 32 px, MPT 4 x 32, a gated block every 2nd layer).
"small": GPT-2-small scale (CLIP ViT-B-32 at 224 px, MPT 12 x 768, 12 heads, ALiBi, no biases, a block every 4th
layer). Both: OpenFlamingo's default resampler and blocks (depth 6, 64 latents, 8 heads of 64); MPT-7B's 50432 rows
resized by OpenFlamingo to 50280 (GPT-NeoX's 50277, then <|endofchunk|>, <image>, <PAD>).

What each side trains on, given the same samples:
- LAION: OpenFlamingo pads a batch to its longest caption, cut at 32 tokens; we pack whole captions (ours_pairs with
  max_tokens=32 cuts too). Its targets are the caption, <|endofchunk|> and <|endoftext|> (its line that should mask
  <|endoftext|> compares ids with a string); ours end at <|endofchunk|>: one fewer per caption.
- MMC4: both cut documents at 256 tokens and predict the same tokens. OpenFlamingo pads each row to 256 tokens and 6
  images (zeros, all 6 through the tower and the resampler); it keeps an <image> the cut leaves last, with its image,
  we drop both; it drops half of the one-image documents at random (mmc4_like_docs(pair=...) draws that once).
"""

import base64
import functools
import importlib.util
import io
import json
import os
import random
import sys
import types
from dataclasses import dataclass

import numpy as np
import torch

from data import Batch
from shards import doc_to_ids, pair_to_ids
from tokenizer import EOC, IMAGE, get_tokenizer

SIZES = {"tiny": dict(clip="flamingo-tiny", d_model=32, n_heads=4, n_layers=4, max_seq_len=512, every=2),
         "small": dict(clip="ViT-B-32", d_model=768, n_heads=12, n_layers=12, max_seq_len=2048, every=4)}
NEOX_VOCAB = 50277  # GPT-NeoX's tokenizer: 50254 BPE entries, then 23 runs of 2 to 24 spaces
SIM_THRESHOLD, MAX_IMAGES, DOC_TOKENS, CAPTION_TOKENS = 0.24, 6, 256, 32  # OpenFlamingo's run_train.sh, data.py

# -----------------------------------------------------------------------------
# 1. English-like text and a GPT-NeoX-like tokenizer

COMMON = ("the of and to a in is for on that with by it as at from this be or are an was you your our we can all more "
          "new has have not one will its their about use up out how also time they so which if his her been may when "
          "who what other into two any first most some there only best").split()


@functools.cache
def lexicon(n=2000, seed=1234):
    """Common English words, then made-up ones of 1 to 4 syllables, shortest first, and the frequency of each (Zipf's
    law, the k-th word about 1/k): the vocabulary of the synthetic English."""
    r = np.random.default_rng(seed)
    onset = [""] + "b c d f g h j k l m n p r s t v w st th ch br tr pl gr sh cl sp fr wh".split()
    vowel, coda = "a e i o u ea ou ai ee y io".split(), ["", ""] + "n r s t l nd st ng ck m rt ll x ce se".split()
    found = dict.fromkeys(COMMON)
    while len(found) < n:
        syllables = r.choice([1, 1, 2, 2, 2, 3, 3, 4])
        w = "".join(r.choice(onset) + r.choice(vowel) + r.choice(coda) for _ in range(syllables))
        if len(w) > 1:
            found.setdefault(w)
    p = 1.0 / (np.arange(n) + 2.7)
    return COMMON + sorted(list(found)[len(COMMON):], key=len), p / p.sum()


def words(rng, n, title=False):
    """n words of the synthetic English, now and then a number, a capital, or (within a sentence) a comma."""
    lex, p = lexicon()
    out = [str(rng.integers(1, 2030)) if rng.random() < 0.04 else lex[k] for k in rng.choice(len(lex), n, p=p)]
    out = [w.capitalize() if title or rng.random() < 0.06 else w for w in out]
    return out if title else [w + "," if i < n - 1 and rng.random() < 0.07 else w for i, w in enumerate(out)]


def sentence(rng, n):
    w = words(rng, n)
    return " ".join([w[0].capitalize()] + w[1:]) + "."


def write_tokenizer(lm_dir, merges=6000, seed=0):
    """lm_dir/tokenizer.json, a byte-level BPE in GPT-NeoX's layout (NFC, ByteLevel, <|endoftext|> 0, <|padding|> 1,
    bytes and merges, runs of spaces as added tokens) and GPT-NeoX's size: `merges` entries learned from the synthetic
    English, which they cut as GPT-NeoX cuts English (1.3 tokens a word, 4.1 characters a token), then entries no merge
    makes (no text becomes one) up to 50277. Plus the tokenizer_config.json AutoTokenizer needs (as the tests)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    rng = np.random.default_rng(seed)
    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.decoder = normalizers.NFC(), decoders.ByteLevel()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=merges, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((sentence(rng, int(rng.integers(3, 25))) if i % 4 else  # every 4th line a caption
                             " ".join(words(rng, int(rng.integers(3, 15)), True)) for i in range(30000)), trainer)
    spec, spaces = json.loads(tok.to_str()), [" " * k for k in range(2, 25)]
    vocab = spec["model"]["vocab"]
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), NEOX_VOCAB - len(spaces))})
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_tokens([AddedToken(s, normalized=True) for s in spaces])
    assert tok.get_vocab_size(with_added_tokens=True) == NEOX_VOCAB
    tok.save(os.path.join(lm_dir, "tokenizer.json"))
    with open(os.path.join(lm_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}, f)


# -----------------------------------------------------------------------------
# 2. The pair of models


@dataclass
class Pair:
    ref: torch.nn.Module     # OpenFlamingo's model, built by its create_model_and_transforms
    ours: torch.nn.Module    # model.Flamingo.from_openflamingo on the same files
    tokenizer: object        # OpenFlamingo's (transformers), 50280 entries
    tok: object              # ours (tokenizer.py) on the same tokenizer.json: the same ids
    image_processor: object  # OpenFlamingo's: open_clip's evaluation transform of a PIL image
    ids: dict                # media, eoc, pad, eos
    image_size: int
    files: dict              # checkpoint, lm, clip


def draw_trained_parts(ref, seed):
    """OpenFlamingo's trained parts (resampler, gated blocks, the LM's input table) drawn afresh, in the spirit of
    tests/test_openflamingo.py: gates open (tanh between 0.46 and 0.91), LayerNorms near (1, 0), matrices of variance
    1/fan_in so that activations keep their scale at any width."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith("_gate"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim == 1:  # LayerNorms: OpenFlamingo's linear layers have no biases
                p.copy_(float(name.endswith("weight")) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


def allow_no_attention_mask():
    """transformers 5's generate leaves out an attention mask that is all ones (a batch of one prompt), and
    OpenFlamingo 2.0.1's LM wrapper takes one as a required argument: give it a default of None, which the LM under it
    reads as "all ones", the very mask that was left out. Nothing else of its code changes."""
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    forward = FlamingoLMMixin.forward
    if getattr(forward, "allows_no_mask", False):
        return

    def forward_mask_optional(self, input_ids, attention_mask=None, **kwargs):
        return forward(self, input_ids, attention_mask, **kwargs)

    forward_mask_optional.allows_no_mask = True
    FlamingoLMMixin.forward = forward_mask_optional


def build(workdir, size="small", seed=0):
    """Write an MPT, a CLIP, the tokenizer and OpenFlamingo's checkpoint.pt into workdir/<size>-<seed>/ (once: later
    calls read them), then build OpenFlamingo's model with its create_model_and_transforms and ours with
    Flamingo.from_openflamingo -> Pair, both in eval mode, fp32."""
    import open_clip
    import open_flamingo
    import transformers
    from model import Flamingo
    from vision import register_clip_configs
    s, d = SIZES[size], os.path.join(workdir, f"{size}-{seed}")
    lm, clip, ckpt = os.path.join(d, "lm"), os.path.join(d, "clip.pt"), os.path.join(d, "checkpoint.pt")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    register_clip_configs()
    allow_no_attention_mask()
    torch.manual_seed(seed)
    if not os.path.exists(ckpt):
        os.makedirs(lm, exist_ok=True)
        cfg = transformers.MptConfig(d_model=s["d_model"], n_heads=s["n_heads"], n_layers=s["n_layers"],
                                     vocab_size=50432, expansion_ratio=4, max_seq_len=s["max_seq_len"], no_bias=True,
                                     attn_config=dict(alibi=True, alibi_bias_max=8))
        transformers.MptForCausalLM(cfg).save_pretrained(lm)
        write_tokenizer(lm, seed=seed)
        tower = open_clip.create_model(s["clip"])
        with torch.no_grad():  # a trained tower's final norm is no identity: so reading before ln_post matters
            for p in (tower.visual.ln_post.weight, tower.visual.ln_post.bias):
                p.add_(0.5 * torch.randn_like(p))
        torch.save(tower.state_dict(), clip)
    ref, image_processor, tokenizer = open_flamingo.create_model_and_transforms(s["clip"], clip, lm, lm,
                                                                                cross_attn_every_n_layers=s["every"])
    if os.path.exists(ckpt):
        ref.load_state_dict(torch.load(ckpt), strict=False)  # as its evaluation loads a checkpoint
    else:
        draw_trained_parts(ref, seed + 1)
        trained = {n for n, p in ref.named_parameters() if p.requires_grad}
        torch.save({k: v for k, v in ref.state_dict().items() if k in trained}, ckpt)
    ref.vision_encoder.ln_post = torch.nn.Identity()  # its released models read open_clip's tokens before ln_post
    ours = Flamingo.from_openflamingo(ckpt, lm, clip=s["clip"], clip_pretrained=clip, verbose=False)
    tok = get_tokenizer(lm, lm_vocab_size=NEOX_VOCAB, new_tokens=(EOC, IMAGE, "<PAD>"))
    ids = dict(media=tokenizer.encode("<image>")[-1], eoc=tokenizer.encode("<|endofchunk|>")[-1],
               pad=tokenizer.pad_token_id, eos=tokenizer.eos_token_id)
    if not hasattr(tokenizer, "additional_special_tokens_ids"):  # transformers 5 renamed them; its data.py reads them
        tokenizer.additional_special_tokens = ["<|endofchunk|>", "<image>"]
        tokenizer.additional_special_tokens_ids = [ids["eoc"], ids["media"]]
    assert len(tokenizer) == NEOX_VOCAB + 3 and ours.lm.config.vocab_size == NEOX_VOCAB
    assert list(ids.values()) == [ours.media_token_id, ours.eoc_token_id, 50279, tok.eot_id] == \
        [tok.image_id, tok.eoc_id, 50279, 0]
    size = ours.vision.image_size
    return Pair(ref.eval(), ours.eval(), tokenizer, tok, image_processor, ids,
                size if isinstance(size, int) else size[0], dict(checkpoint=ckpt, lm=lm, clip=clip))


def check_same_logits(pair, rtol=1e-4):
    """Both models on a batch of 2 rows of 40 tokens with 3 and 2 images (OpenFlamingo's third slot of the second row
    zeros: it pads each row's images to the most any row has), text before the first image in the second: the same
    logits (B, T, 50280), to rtol and atol = rtol x the largest. -> the largest difference."""
    g, (m, e), S = torch.Generator().manual_seed(0), (pair.ids["media"], pair.ids["eoc"]), pair.image_size
    x = torch.randint(100, 5000, (2, 40), generator=g)                     # (B, T) text
    for b, t, tok in [(0, 0, m), (0, 10, e), (0, 11, m), (0, 25, e), (0, 26, m), (1, 6, m), (1, 20, e), (1, 21, m)]:
        x[b, t] = tok
    vision_x = torch.randn(2, 3, 1, 3, S, S, generator=g)                 # (B, T_img, F, 3, S, S)
    vision_x[1, 2] = 0
    with torch.no_grad():
        want = pair.ref(vision_x, x).logits
        got = pair.ours(torch.cat([vision_x[0], vision_x[1, :2]]), x)[0]  # (5, 1, 3, S, S): the real images only
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())
    return (got - want).abs().max().item()


# -----------------------------------------------------------------------------
# 3. OpenFlamingo's batches and training step


@functools.cache
def of_data():
    """OpenFlamingo's train/data.py as a module. It imports webdataset and its sibling data_utils, for its loaders:
    the preprocessing functions called here use neither, so empty stand-ins do where they are not installed."""
    import open_flamingo
    stubs = [n for n in ("webdataset", "data_utils") if importlib.util.find_spec(n) is None]
    sys.modules.update({n: types.ModuleType(n) for n in stubs})
    try:
        path = os.path.join(os.path.dirname(open_flamingo.__file__), "train", "data.py")
        spec = importlib.util.spec_from_file_location("open_flamingo_train_data", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for n in stubs:
            del sys.modules[n]
    return module


def laion_labels(input_ids, ids):
    """Labels as train_one_epoch sets a LAION batch's (the LM shifts them): padding and <image> masked, <|endoftext|>
    not (its line for it compares with a string)."""
    return input_ids.masked_fill((input_ids == ids["pad"]) | (input_ids == ids["media"]), -100)


def mmc4_labels(input_ids, ids):
    """Labels as train_one_epoch sets an MMC4 batch's (its loops, rewritten): masked are padding, all before a row's
    first <image>, all after each <|endofchunk|> up to the next <image>, and the <image> tokens."""
    labels = input_ids.masked_fill(input_ids == ids["pad"], -100)
    for row in labels:
        seen_image, after_eoc = False, False
        for t, tok in enumerate(row.tolist()):
            if tok == ids["media"]:
                seen_image, after_eoc = True, False
            elif not seen_image or after_eoc:
                row[t] = -100
            after_eoc |= tok == ids["eoc"]
    return labels.masked_fill(labels == ids["media"], -100)


def of_pairs_batch(pair, captions, images):
    """A LAION batch as OpenFlamingo's loader makes it: captions (text, or our pair ids, read back) through its
    preprocess_laion_text ("<image>{caption}<|endofchunk|><|endoftext|>", right-padded to the longest, cut at 32
    tokens), images (uint8 (S, S, 3)) through its preprocess_image (its transform, then one random horizontal flip)
    -> dict vision_x (B, 1, 1, 3, S, S), lang_x (B, T), attention_mask (B, T), labels (B, T)."""
    from PIL import Image
    eoc = pair.ids["eoc"]
    text = [c if isinstance(c, str) else pair.tokenizer.decode(c[1:c.index(eoc) if eoc in c else None])
            for c in captions]
    vision = of_data().preprocess_image([Image.fromarray(im) for im in images], pair.image_processor)  # (B, 3, S, S)
    input_ids, attention_mask = of_data().preprocess_laion_text(text, pair.tokenizer, max_tokens=CAPTION_TOKENS)
    return dict(vision_x=vision[:, None, None], lang_x=input_ids, attention_mask=attention_mask,
                labels=laion_labels(input_ids, pair.ids))


class _Keep:  # `random` for OpenFlamingo's data module once mmc4_like_docs has drawn which documents to keep
    random = staticmethod(lambda: 1.0)


def of_docs_batch(pair, docs):
    """MMC4 documents (mmc4_like_docs) as OpenFlamingo's loader makes them: each one's JSON through its
    preprocess_interleaved (similarity >= 0.24, at most 6 images, zero-padded to 6, 256 tokens padded to 256),
    stacked -> dict vision_x (B, 6, 1, 3, S, S), lang_x (B, 256), attention_mask (B, 256), labels (B, 256)."""
    data = of_data()
    data.random = _Keep
    try:
        out = [data.preprocess_interleaved((d["json"],), pair.tokenizer, pair.image_processor, SIM_THRESHOLD, 1,
                                           MAX_IMAGES, DOC_TOKENS) for d in docs]
    finally:
        data.random = random
    input_ids = torch.cat([ids for _, (ids, _) in out])
    return dict(vision_x=torch.stack([im for im, _ in out])[:, :, None], lang_x=input_ids,
                attention_mask=torch.cat([mask for _, (_, mask) in out]), labels=mmc4_labels(input_ids, pair.ids))


def of_rows_batch(pair, rows):
    """Our rows (ids, list of uint8 images) in OpenFlamingo's tensors, padded as its loaders pad: ids on the right
    with <PAD>, images with zeros to the most a row has; labels as it sets a document's (so: as ours)."""
    from PIL import Image
    T, N, S, B = max(len(r) for r, _ in rows), max(len(ims) for _, ims in rows), pair.image_size, len(rows)
    lang_x, vision_x = torch.full((B, T), pair.ids["pad"]), torch.zeros(B, N, 1, 3, S, S)
    for b, (r, ims) in enumerate(rows):
        lang_x[b, :len(r)] = torch.tensor(r)
        for i, im in enumerate(ims):
            vision_x[b, i, 0] = pair.image_processor(Image.fromarray(im))
    return dict(vision_x=vision_x, lang_x=lang_x, attention_mask=(lang_x != pair.ids["pad"]).long(),
                labels=mmc4_labels(lang_x, pair.ids))


def of_optimizer(pair, lr=1e-4, weight_decay=0.1):
    """AdamW over OpenFlamingo's trained parameters, with weight decay on the gated blocks only (its train.py)."""
    named = [(n, p) for n, p in pair.ref.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if "gated_cross_attn" in n]
    rest = [p for n, p in named if "gated_cross_attn" not in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr)


def of_train_step(pair, batch, optimizer):
    """OpenFlamingo's training step on one batch, as train_one_epoch takes it in fp32: forward with labels,
    backward, the input table's gradient kept on the rows of <image> and <|endofchunk|> only, the gradient's norm
    clipped to 1, the optimizer's step -> (loss, number of targets)."""
    ref = pair.ref.train()
    loss = ref(vision_x=batch["vision_x"], lang_x=batch["lang_x"], attention_mask=batch["attention_mask"],
               labels=batch["labels"]).loss
    loss.backward()
    grad = ref.lang_encoder.get_input_embeddings().weight.grad
    keep = torch.zeros_like(grad)
    keep[[pair.ids["media"], pair.ids["eoc"]]] = 1
    grad.mul_(keep)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ref.eval()
    return loss.item(), count_targets(batch)


def count_targets(batch):
    """The tokens a batch predicts: OpenFlamingo's (labels != -100 after the LM's shift) or ours (a data.Batch)."""
    if isinstance(batch, Batch):
        return int((batch.targets != -1).sum())
    return int((batch["labels"][:, 1:] != -100).sum())


# -----------------------------------------------------------------------------
# 4. Generation as OpenFlamingo's evaluation calls it


def of_generate(pair, prompts, images, max_new_tokens, num_beams=3, length_penalty=0.0, min_new_tokens=0,
                allow_image=True):
    """prompts: lists of ids; images: a (n_i, 3, S, S) tensor of normalized pixels each -> each row's new tokens, cut
    before the first <|endofchunk|> (the stop token). As its eval's get_outputs: ids left-padded with <PAD>, a bool
    attention mask, images zero-padded to (B, max n_i, 1, 3, S, S), then Flamingo.generate with evaluate.py's settings
    (3 beams, length_penalty 0.0, at least 0 new tokens). It encodes each image once per beam and recomputes the
    media keys and values at every step. allow_image=False bans <image> from the output, as our generation does."""
    B, T, N = len(prompts), max(len(p) for p in prompts), max(len(im) for im in images)
    lang_x, mask = torch.full((B, T), pair.ids["pad"]), torch.zeros(B, T, dtype=torch.bool)
    vision_x = torch.zeros(B, N, 1, *images[0].shape[1:])
    for b, (p, im) in enumerate(zip(prompts, images)):
        lang_x[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), True
        vision_x[b, :len(im), 0] = im
    extra = {} if allow_image else dict(suppress_tokens=[pair.ids["media"]])
    with torch.inference_mode():
        out = pair.ref.eval().generate(vision_x, lang_x, mask, min_new_tokens=min_new_tokens, num_beams=num_beams,
                                       max_new_tokens=max_new_tokens, length_penalty=length_penalty, **extra)
    new = out[:, T:].tolist()
    return [row[:row.index(pair.ids["eoc"])] if pair.ids["eoc"] in row else row for row in new]


# -----------------------------------------------------------------------------
# 5. Realistic synthetic data

# laion2B-en caption lengths in characters (LAION's statistics of the set, laion.ai/blog/laion-5b, "Dataset
# Statistics"): quantiles at 0.05, 0.10, ..., 0.95 below, average 67. Drawn by linear interpolation, from 5 characters
# at 0 (LAION drops shorter alt-texts) to 347 at 1 (what makes the mean 67). Here: median 13 tokens, mean 16.
LAION_LENGTH = (np.linspace(0, 1, 21),
                [5, 21, 25, 30, 33, 37, 40, 43, 47, 50, 54, 58, 62, 67, 72, 78, 85, 96, 114, 152, 347])
# MMC4 (Zhu et al. 2023, arXiv 2304.06939; version 1): 585M images and 43B tokens in 103M documents (Table 1; the
# README's version 1.1: 571M, 43B, 101.2M), so 5.7 images and 417 tokens a document. Figure 5: images per document
# mean 5.7 (sd 10.2), median 2; sentences mean 24.3, median 13; weakly correlated (Spearman 0.2); so 17 tokens a
# sentence. Figure 4a: the CLIP ViT-L/14 similarity of an image to its sentence (mean 0.240) is at least 0.10, 0.15,
# 0.20, 0.25, 0.30 for 99.95, 98.01, 72.53, 37.28, 9.27% of images. Counts are drawn from log-normals of those medians
# and means (correlated 0.2), each image given a sentence of its own (so 26 sentences on average); similarities by
# interpolating Figure 4a (0.05 and 0.45 its ends): 44% of images pass OpenFlamingo's 0.24.
MMC4_IMAGES, MMC4_SENTENCES, MMC4_WORDS = (2.0, 5.7), (13.0, 24.3), (11.0, 12.8)  # (median, mean) of each count
MMC4_SIM = ([0.0, 0.0005, 0.0199, 0.2747, 0.6272, 0.9073, 1.0], [0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.45])


def lognormal_count(z, median, mean, low=1):
    """A count from the log-normal of this median and mean, given a standard normal draw z."""
    return max(low, int(round(median * np.exp(z * np.sqrt(2 * np.log(mean / median))))))


def random_image(rng, size):
    """-> uint8 (size, size, 3) noise and its PNG: lossless, so both sides see the same pixels. OpenFlamingo drops
    MMC4 images of 10 kB or less: a small image's PNG carries a text chunk that makes it larger."""
    from PIL import Image, PngImagePlugin
    pixels, info, buf = rng.integers(0, 256, (size, size, 3), dtype=np.uint8), PngImagePlugin.PngInfo(), io.BytesIO()
    if size * size * 3 < 12000:
        info.add_text("pad", "x" * 12000)
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return pixels, buf.getvalue()


def laion_like_pairs(n, rng, image_size=224):
    """n pairs like laion2B-en's -> [{"caption", "image": uint8 (S, S, 3), "png"}]: alt-text of its lengths in
    characters, in title case half the time."""
    pairs = []
    for _ in range(n):
        target, caption, title = np.interp(rng.random(), *LAION_LENGTH), "", rng.random() < 0.5
        while len(caption) < target:
            longer = (caption + " " + words(rng, 1, title)[0]).strip()
            if caption and len(longer) - target > target - len(caption):
                break
            caption = longer
        pixels, png = random_image(rng, image_size)
        pairs.append(dict(caption=caption, image=pixels, png=png))
    return pairs


def mmc4_like_docs(n, rng, image_size=224, pair=None):
    """n documents like MMC4's -> [{"json": as OpenFlamingo's MMC4 shards hold it (text_list, image_info with
    matched_text_index, matched_sim and image_base64, similarity_matrix), "sentences", "images": {sentence index:
    uint8 (S, S, 3)} as shards.read_docs keeps them}]. Each image has a sentence of its own, in the text's order, its
    similarity highest there, so OpenFlamingo (argmax of similarity_matrix, image_info's order) and read_docs
    (matched_text_index) keep the same images. Given a pair: only the documents its preprocess_interleaved accepts
    (an image within 256 tokens; half of the one-image ones, drawn from rng)."""
    docs, pool = [], [random_image(rng, image_size) for _ in range(16)]
    while len(docs) < n:
        z = rng.multivariate_normal([0, 0], [[1, 0.2], [0.2, 1]])
        n_img = lognormal_count(z[0], *MMC4_IMAGES)
        sentences = [sentence(rng, lognormal_count(rng.normal(), *MMC4_WORDS, low=2))
                     for _ in range(max(n_img, lognormal_count(z[1], *MMC4_SENTENCES)))]
        info, matrix, images = [], [], {}
        for t, sim in zip(np.sort(rng.choice(len(sentences), n_img, replace=False)).tolist(),
                          np.interp(rng.random(n_img), *MMC4_SIM).tolist()):
            pixels, png = pool[rng.integers(len(pool))]
            info.append(dict(image_name=f"{len(info)}.png", matched_text_index=t, matched_sim=sim,
                             image_base64=base64.b64encode(png).decode()))
            matrix.append((sim - rng.uniform(0.01, 0.1, len(sentences))).tolist())
            matrix[-1][t] = sim
            if sim >= SIM_THRESHOLD and len(images) < MAX_IMAGES:
                images[t] = pixels
        doc = dict(json=json.dumps(dict(text_list=sentences, image_info=info, similarity_matrix=matrix)),
                   sentences=sentences, images=images)
        if pair is not None:
            data = of_data()
            data.random = random.Random(int(rng.integers(1 << 31)))
            try:
                data.preprocess_interleaved((doc["json"],), pair.tokenizer, pair.image_processor, SIM_THRESHOLD, 1,
                                            MAX_IMAGES, DOC_TOKENS)
            except ValueError:  # no image passed, none left within 256 tokens, or the coin of one-image documents
                continue
            finally:
                data.random = random
        docs.append(doc)
    return docs


def ours_pairs(pair, samples, max_tokens=None):
    """laion_like_pairs as shards.ShardDataset gives them: (pair_to_ids, [image]); max_tokens=32 cuts the ids as
    OpenFlamingo cuts its captions (ours are cut only by the row)."""
    return [(pair_to_ids(pair.tok, s["caption"])[:max_tokens], [s["image"]]) for s in samples]


def ours_docs(pair, docs):
    """mmc4_like_docs as shards.ShardDataset gives them: doc_to_ids(..., 256) -> (ids, images)."""
    return [doc_to_ids(pair.tok, d["sentences"], d["images"], DOC_TOKENS) for d in docs]


def interleaved_rows(pair, rng, B, T, n_images):
    """B of our rows of exactly T tokens with n_images images each, spread evenly (synthetic documents cut at T)."""
    rows = []
    while len(rows) < B:
        sentences = [sentence(rng, 12) for _ in range(T // 8)]
        ends = np.cumsum([len(pair.tok.encode(s)) + 1 for s in sentences])
        at = {int(np.searchsorted(ends, i * T / n_images)) for i in range(n_images)}
        ids, ims = doc_to_ids(pair.tok, sentences, {t: random_image(rng, pair.image_size)[0] for t in at}, T)
        if len(ids) == T and len(ims) == n_images:
            rows.append((ids, ims))
    return rows
