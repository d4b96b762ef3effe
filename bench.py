"""
Speed measurements, as ratios taken in one run (ours against a baseline on the same machine).

    python bench.py                  # generation: KV cache + media computed once, against recomputing everything
    python bench.py --what=features  # training steps on cached vision features, against running the tower

Generation at the shapes-world size (config/train_shapes.py) with random weights: a 4-shot task-by-example
prompt (5 images) and 32 new tokens, greedy, batch 1. Features: CLIP ViT-B/32 (random weights, 224 px) and a
tiny LM, training steps of 8 rows of 128 tokens on a folder of shapes captions (several images a row), with
train.py's cache_vision_features (folders.FeatureCache) and without.
"""

import tempfile
import time

import torch

import data
import folders
import shapes
from lm import LM, LMConfig
from model import Flamingo
from tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
what = "generate"  # or "features"
new_tokens = 32
repeats = 3
steps = 4          # training steps timed each way (features)
device = "cpu"
from configurator import configure  # noqa: E402
configure(globals())
# -----------------------------------------------------------------------------

torch.manual_seed(0)
if what == "features":
    with tempfile.TemporaryDirectory() as d:
        LM(LMConfig(arch="gpt2", vocab_size=257, n_layer=4, n_head=4, n_embd=64, block_size=512)).save_pretrained(d)
        model = Flamingo.from_pretrained(lm=d, clip="ViT-B-32", clip_pretrained=None, resampler_depth=2,
                                         num_latents=16, xattn_heads=4, xattn_dim_head=32, verbose=False).to(device)
        tok = get_tokenizer("bytes")
        folder = shapes.write_folder(f"{d}/folder", "captions", n_train=64, n_test=0)
        rows = folders.FolderData(folder, "train", tok, 128, 224, log=lambda m: None, mean=model.vision.mean,
                                  std=model.vision.std)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def seconds_per_step():
            t0 = time.perf_counter()
            for i in range(steps):
                b = rows.batch(i, 0, 1, 0, 1, 8).to(device)
                model(b.images, b.idx, b.targets, vision_features=b.vision_features)[1].backward()
                opt.step()
                opt.zero_grad()
            return (time.perf_counter() - t0) / steps, len(b.images if b.images is not None else b.vision_features)

        pixels, n = seconds_per_step()
        t0 = time.perf_counter()
        rows.features = folders.FeatureCache(f"{d}/features.npy", rows.image_paths(), lambda x: model.vision(x.to(device)),
                                          224, "bench", model.vision.mean, model.vision.std, log=lambda m: None)
        build = time.perf_counter() - t0
        cached, _ = seconds_per_step()
    print(f"{steps} steps each, {n} images a step, {torch.get_num_threads()} threads; the cache of "
          f"{len(rows.image_paths())} images took {build:.1f} s to build")
    print(f"tower on pixels: {pixels:6.2f} s/step")
    print(f"cached features: {cached:6.2f} s/step")
    print(f"speed-up: {pixels / cached:.1f}x")
    raise SystemExit
with tempfile.TemporaryDirectory() as d:
    LM(LMConfig(arch="gpt2", vocab_size=257, n_layer=4, n_head=4, n_embd=64, block_size=512)).save_pretrained(d)
    model = Flamingo.from_pretrained(lm=d, clip="shapes-vit", resampler_depth=2, resampler_heads=4,
                                     resampler_dim_head=32, num_latents=16, xattn_heads=4, xattn_dim_head=32)
model.eval().to(device)
for n, p in model.named_parameters():  # open the gates, so the blocks do their full work
    if n.endswith("_gate"):
        p.data.fill_(1.0)
tok = get_tokenizer("bytes")
text, imgs = shapes.shapes_sample("test", 0, 0, kind="task", n_chunks=5)
prompt = text[:text.rindex("Output:") + len("Output:")]  # the last answer dropped: 4 shots and a query
b = data.collate([(prompt, imgs)], tok, 512)
images, idx = b.images.to(device), b.idx.to(device)


def tokens_per_s(use_cache):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(images, idx, new_tokens, temperature=0, use_cache=use_cache, stop_token_id=-1)
        best = min(best, time.perf_counter() - t0)
    assert out.shape[1] == idx.shape[1] + new_tokens
    return new_tokens / best, out


cached, a = tokens_per_s(True)
uncached, b = tokens_per_s(False)
assert torch.equal(a, b), "cached and uncached generation disagree"
print(f"prompt {idx.shape[1]} tokens, {len(images)} images, {new_tokens} new tokens, {torch.get_num_threads()} threads")
print(f"generate with caches:    {cached:7.1f} tokens/s")
print(f"generate without caches: {uncached:7.1f} tokens/s")
print(f"speed-up: {cached / uncached:.1f}x")
