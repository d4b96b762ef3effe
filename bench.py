"""
Speed, measured side by side with OpenFlamingo 2.0.1's own code on the same weights, in one run.

    python bench.py                          # GPT-2-small scale on a CPU, fp32, 1 thread: about an hour
    python bench.py --size=tiny              # the tests' sizes: about a minute, a check that all of it runs
    python bench.py --what=generate,data     # some of: train, generate, eval, data (default: all four)
    python bench.py --what=features          # ours alone: training on cached tower features against pixels
    python bench.py --what=head              # ours alone: four ways to compute the loss over the two heads
    python bench.py --what=chat              # ours alone: a chat's turn 5 with its cache against all 5 turns again
    python bench.py --device=cuda            # ours alone on a GPU: bench_gpu.py (bf16, compile, MFU)

OpenFlamingo's code is the test-only requirement (pip install --no-deps -r requirements-reference.txt).
bench_openflamingo.py builds its model and ours from the same files: an MPT of 12 layers x 768 with MPT-7B's padded
vocabulary (resized to 50280 rows), CLIP ViT-B/32 at 224 px, a gated block before every 4th layer, OpenFlamingo's
resampler and blocks, all weights random, the gates open. It drives OpenFlamingo's code as its own training and
evaluation scripts do: its data functions pad, its forward computes the loss, its generate (Hugging Face's) decodes.

Each measurement runs each side once to warm up, then `repeats` times, alternating (ours, OpenFlamingo's, ours, ...),
and reports the median times and the median of the per-pair ratios OpenFlamingo / ours (above 1: ours is faster).
The two sides must agree: the same loss on the training batch, the same generated tokens (asserted).

- train: one training step (forward with the loss, backward, gradients clipped to norm 1, AdamW) on 4 rows of 128
  tokens with 2 images a row. Each side trains what OpenFlamingo trains: the resampler, the gated blocks and the
  rows of <image> and <|endofchunk|> (OpenFlamingo computes the gradient of its whole input table, which MPT ties
  to its head, and then keeps only those rows of it).
- generate: up to 32 new tokens after a 4-shot caption prompt (5 images), batch 1 and 8, greedy and 3 beams
  (OpenFlamingo's evaluation: length_penalty 0). The prompt pass (images encoded, the prompt run, a first token)
  is timed apart; the rest is reported per new token.
- eval: caption examples a second as eval.py runs them (4 shots, 3 beams, 20 new tokens, images read from files):
  ours at batch 1 and batch 8, against OpenFlamingo's evaluation at its batch of 8.
- data: LAION-like pairs and MMC4-like documents (their statistics: bench_openflamingo.py, section 5). OpenFlamingo
  pads a batch of pairs to its longest caption (at most 32 tokens) and each document to 256 tokens and 6 images;
  we pack the same samples into rows of 256 tokens (shards.pack). Target tokens and samples trained a second.
"""

import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import data
from shards import pack
from tokenizer import CAPTION, EOC

# -----------------------------------------------------------------------------
what = "train,generate,eval,data"  # or features, head, chat (ours alone); --device=cuda runs bench_gpu.py instead
size = "small"                     # small: GPT-2-small scale; tiny: the tests' sizes
repeats = 5                        # timed pairs per measurement of train and data, after a warm-up
slow_repeats = 2                   # ... of generate and eval (OpenFlamingo's batch of 8 takes minutes)
threads = 1                        # torch threads on each side (1: the steadiest timings on a shared CPU)
workdir = os.path.join(tempfile.gettempdir(), "bench-flamingo")  # the two models' files, written once, reused
out = "bench.json"                 # every number measured, as JSON
device = "cpu"
# -----------------------------------------------------------------------------


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def side_by_side(label, ours, theirs, n, agree=False):
    """Warm up each, then n pairs alternating ours and theirs -> a record of the times and their ratios. agree: what
    they return must be equal (asserted)."""
    a, b = ours(), theirs()
    assert not agree or a == b, f"{label}: ours and OpenFlamingo's disagree:\n{a}\n{b}"
    t_ours, t_of = [], []
    for _ in range(n):
        t_ours.append(timed(ours)[0])
        t_of.append(timed(theirs)[0])
    rec = dict(label=label, ours_s=statistics.median(t_ours), openflamingo_s=statistics.median(t_of),
               ratio=statistics.median(o / u for u, o in zip(t_ours, t_of)), ours_all=t_ours, openflamingo_all=t_of)
    print(f"{label:<52} ours {rec['ours_s']:8.3f} s  OpenFlamingo {rec['openflamingo_s']:8.3f} s  "
          f"ratio {rec['ratio']:5.2f}x")
    return rec


# -----------------------------------------------------------------------------
# train: one step on the same batch


def our_step(model, opt, batch):
    """One training step of ours, as train.py takes it (fp32) -> the loss."""
    model.train()
    loss = model(batch.images, batch.idx, batch.targets)[1]
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def bench_train(pair, of, rng):
    ours = pair.ours
    rows = of.interleaved_rows(pair, rng, 4, 128, 2)                      # 4 rows of 128 tokens, 2 images each
    batch = data.collate(rows, pair.tok, 128, ours.vision.mean, ours.vision.std)
    theirs = of.of_rows_batch(pair, rows)
    with torch.no_grad():  # the same loss before any step: the same model, the same targets
        want = pair.ref(theirs["vision_x"], theirs["lang_x"], theirs["attention_mask"], theirs["labels"]).loss.item()
        got = ours(batch.images, batch.idx, batch.targets)[1].item()
    assert abs(got - want) <= 1e-4 * abs(want), (got, want)
    opt_ours, opt_of = ours.configure_optimizer(1e-4, 0.1, (0.9, 0.999)), of.of_optimizer(pair)
    print(f"train: {tuple(batch.idx.shape)} tokens, {len(batch.images)} images, {of.count_targets(batch)} targets; "
          f"the same loss before a step ({got:.4f} / {want:.4f})")
    rec = side_by_side("training step, 4 x 128 tokens, 2 images a row", lambda: our_step(ours, opt_ours, batch),
                       lambda: of.of_train_step(pair, theirs, opt_of), repeats)
    return [dict(rec, targets=of.count_targets(batch))]


# -----------------------------------------------------------------------------
# generate: batch 1 and 8, greedy and 3 beams


def caption_prompts(pair, rng, n, shots=4):
    """n prompts of `shots` LAION-like captions and a query, "<image>Output:{caption}<|endofchunk|>" each, and their
    images as each side takes them: ours (all prompts' images in order) and OpenFlamingo's (a tensor per prompt)."""
    of, tok, ours = sys.modules["bench_openflamingo"], pair.tok, pair.ours
    prompts, images = [], []
    for _ in range(n):
        samples = of.laion_like_pairs(shots + 1, rng, pair.image_size)
        ids = [t for s in samples[:shots] for t in tok.encode_template(CAPTION, caption=s["caption"])]
        prompts.append(ids + tok.encode_template(CAPTION[:-len(EOC)], caption=""))
        images.append(data.normalize([s["image"] for s in samples], ours.vision.mean, ours.vision.std))  # (5, 3, S, S)
    return prompts, torch.cat(images)[:, None], images


def bench_generate(pair, of, rng):
    records = []
    for B in (1, 8):
        prompts, ours_images, of_images = caption_prompts(pair, rng, B)
        for beams in (1, 3):
            def ours(n):
                return pair.ours.generate(ours_images, prompts, n, temperature=0, num_beams=beams, length_penalty=0.0)

            def theirs(n):
                return of.of_generate(pair, prompts, of_images, n, num_beams=beams, allow_image=False)

            label = f"generate, batch {B}, {'greedy' if beams == 1 else f'{beams} beams'}"
            ours(2), theirs(2)                                          # warm-up
            t = {k: [] for k in ("ours1", "of1", "ours", "of")}
            for r in range(slow_repeats):
                t["ours1"].append(timed(lambda: ours(1))[0])
                t["of1"].append(timed(lambda: theirs(1))[0])
                dt, new = timed(lambda: ours(32))
                t["ours"].append(dt)
                dt, new_of = timed(lambda: theirs(32))
                t["of"].append(dt)
                assert new == new_of, f"{label}: different tokens\n{new}\n{new_of}"
            steps = max(len(r) for r in new)
            per_tok = lambda a, b: [(y - x) / max(steps - 1, 1) for x, y in zip(t[a], t[b])]  # noqa: E731
            ours_tok, of_tok = per_tok("ours1", "ours"), per_tok("of1", "of")
            rec = dict(label=label, batch=B, beams=beams, prompt_tokens=[len(p) for p in prompts], new_tokens=steps,
                       prompt_ours_s=statistics.median(t["ours1"]), prompt_openflamingo_s=statistics.median(t["of1"]),
                       prompt_ratio=statistics.median(o / u for u, o in zip(t["ours1"], t["of1"])),
                       per_token_ours_s=statistics.median(ours_tok), per_token_openflamingo_s=statistics.median(of_tok),
                       per_token_ratio=statistics.median(o / u for u, o in zip(ours_tok, of_tok)),
                       total_ratio=statistics.median(o / u for u, o in zip(t["ours"], t["of"])), times=t)
            print(f"{label:<28} {steps} new tokens, identical.  prompt pass: ours {rec['prompt_ours_s']:7.3f} s, "
                  f"OpenFlamingo {rec['prompt_openflamingo_s']:7.3f} s ({rec['prompt_ratio']:.2f}x);  per new token: "
                  f"ours {rec['per_token_ours_s'] * 1e3:7.1f} ms, OpenFlamingo "
                  f"{rec['per_token_openflamingo_s'] * 1e3:7.1f} ms ({rec['per_token_ratio']:.2f}x)")
            records.append(rec)
    return records


# -----------------------------------------------------------------------------
# eval: caption examples a second, as eval.py answers them and as OpenFlamingo's evaluate.py does


def caption_folder(pair, rng, path, n_train=32, n_test=8):
    """A dataset folder of LAION-like captions (eval --task=captions): PNG images of the tower's size (so that
    neither side resizes them), train.jsonl for the demonstrations, test.jsonl for the queries."""
    of = sys.modules["bench_openflamingo"]
    os.makedirs(os.path.join(path, "images"), exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(os.path.join(path, f"{split}.jsonl"), "w") as f:
            for i, s in enumerate(of.laion_like_pairs(n, rng, pair.image_size)):
                with open(os.path.join(path, "images", f"{split}{i}.png"), "wb") as im:
                    im.write(s["png"])
                f.write(json.dumps({"id": f"{split}{i}", "image": f"images/{split}{i}.png",
                                    "captions": [s["caption"]]}) + "\n")
    return path


def bench_eval(pair, of, rng, shots=4, n=8):
    """eval.run_trial at batch 1 and 8 against OpenFlamingo's evaluation of the same prompts at its batch of 8: each
    batch's images read from their files and preprocessed in its loop (its datasets open them in __getitem__, its
    eval model runs image_processor on each), then its generate. The same captions (asserted)."""
    import eval as ev
    from benchmarks import read_task
    from PIL import Image
    train, test, kind = read_task("captions", caption_folder(pair, rng, os.path.join(workdir, f"captions-{size}")))
    trial = dict(k=shots, seed=42, num_samples=n, max_new_tokens=20, num_beams=3)

    def ours(batch_size):
        return ev.run_trial(pair.ours, pair.tok, kind, train, test, **trial, batch_size=batch_size)["predictions"]

    def theirs():
        _, prompts, _ = ev.trial_prompts(pair.ours, pair.tok, kind, train, test, shots, 42, None, n, 2048, 20)
        out = []
        for b in range(0, len(prompts), 8):
            batch = prompts[b:b + 8]
            images = [torch.stack([pair.image_processor(Image.open(p).convert("RGB")) for p in paths])
                      for _, paths in batch]                                    # (n_i, 3, S, S) each
            new = of.of_generate(pair, [ids for ids, _ in batch], images, 20, num_beams=3, allow_image=False)
            out += [ev.postprocess(pair.tok.decode(t)) for t in new]
        return out

    ours(8)                                                                        # warm-up (ours: its workers)
    t = {"ours1": [], "ours8": [], "of8": []}
    for r in range(slow_repeats):
        dt, a = timed(lambda: ours(1))
        t["ours1"].append(dt)
        dt, b = timed(lambda: ours(8))
        t["ours8"].append(dt)
        dt, c = timed(theirs)
        t["of8"].append(dt)
        assert a == b and [p for _, p in a] == c, f"eval: different captions\n{a}\n{b}\n{c}"
    rec = dict(label="eval, captions", shots=shots, examples=n, beams=3, max_new_tokens=20, times=t,
               **{f"{k}_examples_per_s": n / statistics.median(v) for k, v in t.items()},
               batch8_vs_batch1=statistics.median(x / y for x, y in zip(t["ours1"], t["ours8"])),
               ours8_vs_openflamingo8=statistics.median(y / x for x, y in zip(t["ours8"], t["of8"])))
    print(f"eval, {n} caption examples, {shots} shots, 3 beams, 20 new tokens: examples/s ours at batch 1 "
          f"{rec['ours1_examples_per_s']:.3f}, at batch 8 {rec['ours8_examples_per_s']:.3f} "
          f"({rec['batch8_vs_batch1']:.2f}x), OpenFlamingo at batch 8 {rec['of8_examples_per_s']:.3f} (ours "
          f"{rec['ours8_vs_openflamingo8']:.2f}x); the same captions")
    return [rec]


# -----------------------------------------------------------------------------
# data: realistic pairs and documents, OpenFlamingo's padded batches against our packed rows


def bench_data(pair, of, rng):
    ours, tok, records = pair.ours, pair.tok, []
    pairs = of.laion_like_pairs(32, rng, pair.image_size)
    docs = of.mmc4_like_docs(8, rng, pair.image_size, pair)
    for kind, n, theirs_batch, samples in (
            ("LAION-like pairs", len(pairs), of.of_pairs_batch(pair, [p["caption"] for p in pairs],
                                                                [p["image"] for p in pairs]),
             of.ours_pairs(pair, pairs, of.CAPTION_TOKENS)),  # cut at 32 tokens, as OpenFlamingo cuts them
            ("MMC4-like documents", len(docs), of.of_docs_batch(pair, docs), of.ours_docs(pair, docs))):
        rows = list(pack(samples, 256))
        batch = data.collate(rows, tok, 256, ours.vision.mean, ours.vision.std)
        k_ours, k_of = of.count_targets(batch), of.count_targets(theirs_batch)
        opt_ours, opt_of = ours.configure_optimizer(1e-4, 0.1, (0.9, 0.999)), of.of_optimizer(pair)
        print(f"{kind}: {n} samples. OpenFlamingo {tuple(theirs_batch['lang_x'].shape)} tokens, "
              f"{theirs_batch['vision_x'].shape[0] * theirs_batch['vision_x'].shape[1]} image slots, {k_of} targets; "
              f"ours packed {tuple(batch.idx.shape)}, {len(batch.images)} images, {k_ours} targets")
        rec = side_by_side(f"{kind}, a batch of {n}", lambda: our_step(ours, opt_ours, batch),
                           lambda: of.of_train_step(pair, theirs_batch, opt_of), repeats)
        rec.update(samples=n, ours_targets=k_ours, openflamingo_targets=k_of,
                   ours_target_tokens_per_s=k_ours / rec["ours_s"], openflamingo_target_tokens_per_s=k_of / rec[
                       "openflamingo_s"], ours_samples_per_s=n / rec["ours_s"], openflamingo_samples_per_s=n / rec[
                       "openflamingo_s"], ours_shape=list(batch.idx.shape), openflamingo_shape=list(
                       theirs_batch["lang_x"].shape))
        rec["target_tokens_per_s_ratio"] = rec["ours_target_tokens_per_s"] / rec["openflamingo_target_tokens_per_s"]
        print(f"    target tokens/s: ours {rec['ours_target_tokens_per_s']:.1f}, OpenFlamingo "
              f"{rec['openflamingo_target_tokens_per_s']:.1f} ({rec['target_tokens_per_s_ratio']:.2f}x); samples/s: "
              f"ours {rec['ours_samples_per_s']:.2f}, OpenFlamingo {rec['openflamingo_samples_per_s']:.2f}")
        records.append(rec)
    return records


# -----------------------------------------------------------------------------
# features (ours alone): training steps on the frozen tower's cached output against running it on the pixels


def bench_features(steps=4):
    """CLIP ViT-B/32 (random weights, 224 px) and a tiny LM, 8 rows of 128 tokens holding several images each, from
    a folder of shapes captions: seconds a step with train.py's feature cache (folders.FeatureCache) and without."""
    import folders
    import shapes
    from lm import LM, LMConfig
    from model import Flamingo
    from tokenizer import get_tokenizer
    with tempfile.TemporaryDirectory() as d:
        LM(LMConfig(arch="gpt2", vocab_size=257, n_layer=4, n_head=4, n_embd=64, block_size=512)).save_pretrained(d)
        model = Flamingo.from_pretrained(lm=d, clip="ViT-B-32", clip_pretrained=None, resampler_depth=2,
                                         num_latents=16, xattn_heads=4, xattn_dim_head=32, verbose=False).to(device)
        rows = folders.FolderData(shapes.write_folder(f"{d}/folder", "captions", n_train=64, n_test=0), "train",
                                  get_tokenizer("bytes"), 128, 224, log=lambda m: None, mean=model.vision.mean,
                                  std=model.vision.std)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def seconds_per_step():
            t0 = time.perf_counter()
            for i in range(steps):
                b = rows.batch(i, 0, 1, 0, 1, 8).to(device)
                model(b.images, b.idx, b.targets, vision_features=b.vision_features)[1].backward()
                opt.step()
                opt.zero_grad()
            return (time.perf_counter() - t0) / steps

        pixels = seconds_per_step()
        build, _ = timed(lambda: setattr(rows, "features", folders.FeatureCache(
            f"{d}/features.npy", rows.image_paths(), lambda x: model.vision(x.to(device)), 224, "bench",
            model.vision.mean, model.vision.std, log=lambda m: None)))
        cached = seconds_per_step()
    print(f"{steps} steps each; the cache of {len(rows.image_paths())} images took {build:.1f} s to build\n"
          f"tower on pixels: {pixels:6.2f} s/step\ncached features: {cached:6.2f} s/step\nspeed-up: {pixels / cached:.1f}x")
    return [dict(label="features", pixels_s=pixels, cached_s=cached, build_s=build, ratio=pixels / cached)]


# -----------------------------------------------------------------------------
# head (ours alone): ways to compute the loss over the frozen head's V rows and the new tokens' n rows


def bench_head(K=400, B=4, T=128, C=768, V=50277, n=3):
    """The loss and its backward at GPT-2-small scale, B x T positions of which K have a target, four ways: every
    position's logits concatenated (K, V + n) then cross_entropy (as before); the same at the K targets only; at
    the targets, logsumexp of each part; at the targets, the frozen part's log-sum-exp from cross_entropy's fused
    kernel plus a dot product (Flamingo.loss_at). Medians of `repeats` rounds, alternating."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    W, new = torch.randn(V, C, generator=g) * 0.02, (torch.randn(n, C, generator=g) * 0.02).requires_grad_()
    targets = torch.full((B * T,), -1)
    targets[torch.randperm(B * T, generator=g)[:K]] = torch.randint(0, V + n, (K,), generator=g)

    def everywhere(h):
        return F.cross_entropy(torch.cat([h @ W.t(), h @ new.t()], -1), targets, ignore_index=-1)

    def at_targets(h):
        h, t = h[targets != -1], targets[targets != -1]
        return F.cross_entropy(torch.cat([h @ W.t(), h @ new.t()], -1), t)

    def logsumexp(h):
        h, t = h[targets != -1], targets[targets != -1]
        a, b = h @ W.t(), h @ new.t()
        lse = torch.logaddexp(a.logsumexp(-1), b.logsumexp(-1))
        return (lse - torch.where(t < V, a.gather(1, t.clamp(max=V - 1)[:, None])[:, 0],
                                  b.gather(1, (t - V).clamp(min=0)[:, None])[:, 0])).mean()

    def fused(h):  # Flamingo.loss_at's way
        h, t = h[targets != -1], targets[targets != -1]
        w = W[t.clamp(max=V - 1)]
        lse = torch.logaddexp(F.cross_entropy(h @ W.t(), t.clamp(max=V - 1), reduction="none") + (h * w).sum(-1),
                              (h @ new.t()).logsumexp(-1))
        return (lse - torch.where(t < V, (h * w).sum(-1), (h * new[(t - V).clamp(min=0)]).sum(-1))).mean()

    ways, h = [everywhere, at_targets, logsumexp, fused], torch.randn(B * T, C, generator=g, requires_grad=True)
    losses = [f(h).item() for f in ways]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0]), losses
    times = {f.__name__: [] for f in ways}
    for _ in range(repeats):
        for f in ways:
            times[f.__name__].append(timed(lambda: f(h).backward())[0])
    rec = {k: statistics.median(v) for k, v in times.items()}
    print(f"the loss over {V} + {n} rows at {K} of {B * T} positions, forward and backward (median of {repeats}): "
          + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in rec.items()))
    return [dict(label="head", K=K, positions=B * T, times=times, **{f"{k}_s": v for k, v in rec.items()})]


# -----------------------------------------------------------------------------
# chat (ours alone): a conversation's turn with the keys and values of the turns before it, against all of it again


def bench_chat(turns=5, max_new=10):
    """GPT-2-small scale (12 x 768, vocabulary 50,257) and CLIP ViT-B/32 at 224 px, random weights, gates open; each
    turn an image and a question (the bytes tokenizer: about 50 tokens a message), answers of max_new tokens. The
    last turn through chat.Conversation (its cache) against generate over the whole conversation, alternating."""
    from chat import Conversation
    from lm import LMConfig
    from model import Flamingo, FlamingoConfig
    from tokenizer import get_tokenizer
    torch.manual_seed(0)
    cfg = FlamingoConfig(clip="ViT-B-32", cross_attn_every_n_layers=4, resampler_depth=2)
    model = Flamingo.from_config(cfg, LMConfig(arch="gpt2", vocab_size=50257, n_layer=12, n_head=12, n_embd=768,
                                               block_size=1024)).eval()
    with torch.no_grad():
        for blk in model.xattn.values():
            blk.attn_gate.fill_(0.5), blk.ff_gate.fill_(0.5)
    tok = get_tokenizer("bytes", lm_vocab_size=50257)
    g = torch.Generator().manual_seed(0)
    x = [torch.rand(1, 1, 3, 224, 224, generator=g) for _ in range(turns)]
    texts = [f"what color is the {w} in this picture?" for w in ("car", "house", "dog", "sky", "boat")][:turns]
    times = {"cached": [], "again": []}
    with torch.no_grad():
        for _ in range(repeats):
            conv = Conversation(model, tok, limit=1024)
            for t in range(turns - 1):
                conv.say(texts[t], x[t], max_new)
            history = [i for _, ids, _ in conv.turns for i in ids] + conv.pending + conv.message_ids(texts[-1], 1)
            dt, _ = timed(lambda: conv.say(texts[-1], x[-1], max_new))
            times["cached"].append(dt)
            dt, again = timed(lambda: model.generate(torch.cat(x), [history], max_new, temperature=0)[0])
            times["again"].append(dt)
            assert again == conv.answer_ids, "the cached turn and the whole conversation disagree"
    rec = {k: statistics.median(v) for k, v in times.items()}
    print(f"chat, turn {turns} ({len(history)} tokens, {turns} images so far, {max_new} new tokens): with the cache "
          f"{rec['cached']:.2f} s, the whole conversation again {rec['again']:.2f} s ({rec['again'] / rec['cached']:.1f}x)")
    return [dict(label="chat", turns=turns, tokens=len(history), max_new=max_new, times=times, **rec)]


# -----------------------------------------------------------------------------


def main():
    from configurator import check, configure
    configure(globals())
    parts = [p for p in what.split(",") if p]
    check(globals(), at_least=dict(repeats=1, slow_repeats=1, threads=1), choices=dict(size=("small", "tiny")))
    unknown = set(parts) - {"train", "generate", "eval", "data", "features", "head", "chat"}
    if unknown:
        raise SystemExit(f"error: --what: unknown {sorted(unknown)}; known: train, generate, eval, data, features, "
                         "head, chat")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    results = dict(size=size, threads=threads, repeats=repeats, slow_repeats=slow_repeats, torch=torch.__version__,
                   parts={})
    for part in ("features", "head", "chat"):  # ours alone
        if part in parts:
            results["parts"][part] = globals()[f"bench_{part}"]()
    parts = [p for p in ("generate", "eval", "train", "data") if p in parts]  # training last: it moves the weights
    if parts:
        try:
            import bench_openflamingo as of
        except ImportError as e:
            raise SystemExit(f"error: {e}: OpenFlamingo's code is needed (pip install --no-deps -r "
                             "requirements-reference.txt; and -r requirements-test.txt for transformers)") from None
        import warnings
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' notes on what OpenFlamingo calls
        t0 = time.perf_counter()
        pair = of.build(workdir, size)
        print(f"built OpenFlamingo's model and ours ({size}) in {time.perf_counter() - t0:.0f} s; the same logits "
              f"(largest difference {of.check_same_logits(pair):.1e}); {threads} thread(s)")
        for part in parts:
            rng = np.random.default_rng(["generate", "eval", "train", "data"].index(part))
            results["parts"][part] = globals()[f"bench_{part}"](pair, of, rng)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    if any(a in ("--device=cuda", "--device=cuda:0") for a in sys.argv[1:]):  # the GPU benchmark: ours alone
        import bench_gpu
        bench_gpu.main([a for a in sys.argv[1:] if not a.startswith("--device")])
    else:
        main()
