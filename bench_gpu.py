"""
GPU benchmark of our training step, as train.py runs it (frozen LM in bf16, frozen fp32 tower, trained parts in fp32,
bf16 autocast, forward with targets, backward, grad clip 1.0, fused AdamW, zero_grad; no activation checkpointing), on
OpenFlamingo-3B- and -9B-like models with random weights, eagerly and with torch.compile(model) (train.py's compile).

    pip install --no-deps .whl/*.whl            # open_clip_torch 3.3.0, ftfy 6.3.1, wcwidth 0.9.4 (wheels, git-ignored)
    PYTHONUNBUFFERED=1 timeout -k 10 290 python bench_gpu.py      # one H200: about 3 minutes; writes bench_gpu.json
    python bench_gpu.py --tiny --device=cpu     # the same code at tiny sizes, on a CPU (a test)

Needs torch, numpy, regex, tqdm, huggingface_hub, safetensors, timm>=1.0.17, torchvision, tiktoken (for data.py),
open_clip_torch, ftfy, wcwidth. Downloads nothing. Options (--key=value): models (9b,3b), compile (off,on),
batch_3b (32 rows), batch_9b (16), layers_3b (4 of 24), layers_9b (8 of 32; 0 or the full count: no reduction), T (256
tokens a row), full_eager (1), warmup (2), compile_warmup (3), steps (10), dtype (bfloat16), grad_clip (1.0),
train_lm_embeddings (0; config/9b.py's 1 trains the LM's tied table), validate (1), out (bench_gpu.json).

3b: CLIP ViT-L/14 (224 px, tokens before ln_post) + MPT-1B (24 x 2048, 16 heads, qk_ln, ALiBi, vocab 50432), a gated
block before every layer. 9b: ViT-L/14 + MPT-7B (32 x 4096, 32 heads, ALiBi), a block before every 4th layer
(config/9b.py). Both: OpenFlamingo's resampler (depth 6, 64 latents, 8 x 64) and blocks (8 x 64), no time embeddings.
Rows of 256 tokens (MMC4's), 3 to 6 images a row, targets as data.collate makes them (data.chunk_mask).

Phases: each model eagerly at full depth, then at a reduced depth (fewer LM layers, the same pattern of gated blocks)
eagerly (and one step under FlopCounterMode); then each reduced model compiled: compiling the full depths would not fit
in 5 minutes. Full-depth compiled time, estimated: t_compiled(reduced) * t_eager(full) / t_eager(reduced) (compile's
speed-up at the reduced depth carried over); plain layer-count scaling t(reduced) * L_full / L_reduced is printed too
(it repeats the tower, resampler, head and optimizer: too high), with its error on the eager runs where both are
measured. Each configuration: warm-up steps (synchronized, timed: the first compiles), then timed steps between CUDA
events, median; peak memory from max_memory_allocated, reset before each; the JSON rewritten after each.
"""

import argparse
import dataclasses
import gc
import json
import logging
import os
import signal
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch._dynamo.utils import counters

from lm import LM, LMConfig
from model import Flamingo, FlamingoConfig

T0 = time.time()
# Dense (no sparsity) bf16 tensor-core peaks, NVIDIA's datasheets; the first key in torch.cuda.get_device_name() wins
PEAKS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989.4e12), ("H100", 989.4e12), ("H800", 989.4e12),
         ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", None),
         ("A10", 125e12)]
OF = dict(clip="ViT-L-14", vision_ln_post=False, resampler_depth=6, resampler_heads=8, resampler_dim_head=64,
          num_latents=64, max_num_frames=0, xattn_heads=8, xattn_dim_head=64)
TINY = dict(OF, clip="flamingo-tiny", resampler_depth=2, resampler_heads=2, resampler_dim_head=16, num_latents=8,
            xattn_heads=2, xattn_dim_head=16)
OPTIONS = dict(models="9b,3b", compile="off,on", batch_3b=0, batch_9b=0, layers_3b=0, layers_9b=0, T=0, full_eager=1,
               warmup=2, compile_warmup=3, steps=10, dtype="bfloat16", grad_clip=1.0, train_lm_embeddings=0, validate=1,
               out="bench_gpu.json")


def log(msg):
    print(f"[{time.time() - T0:6.1f} s] {msg}", flush=True)


def model_specs(a):
    """{key: (title, LMConfig at full depth, FlamingoConfig options, batch rows, reduced depth)}."""
    if a.tiny:
        lm = LMConfig(arch="mpt", vocab_size=512, n_layer=4, n_head=4, n_embd=64, bias=False, qk_ln=True)
        return {"3b": ("tiny 3B-like: flamingo-tiny + MPT 4 x 64, a block every layer", lm,
                       dict(TINY, cross_attn_every_n_layers=1), a.batch_3b or 4, a.layers_3b or 2),
                "9b": ("tiny 9B-like: flamingo-tiny + MPT 4 x 64, a block every 2nd layer", lm,
                       dict(TINY, cross_attn_every_n_layers=2), a.batch_9b or 4, a.layers_9b or 2)}
    return {"3b": ("OpenFlamingo-3B-like: ViT-L/14 + MPT-1B (24 x 2048), a block every layer",
                   LM.config_of("anas-awadalla/mpt-1b-redpajama-200b"), dict(OF, cross_attn_every_n_layers=1),
                   a.batch_3b or 32, a.layers_3b or 4),
            "9b": ("OpenFlamingo-9B-like: ViT-L/14 + MPT-7B (32 x 4096), a block every 4th layer",
                   LM.config_of("anas-awadalla/mpt-7b"), dict(OF, cross_attn_every_n_layers=4),
                   a.batch_9b or 16, a.layers_9b or 8)}


def build(spec, n_layer, device, a):
    """Random weights, built on the device (Flamingo.from_config). Then, as LM.from_pretrained(dtype=bfloat16) reads a
    real LM, every frozen LM weight in bf16 (buffers stay fp32); the trained parts and the frozen tower stay fp32."""
    torch.manual_seed(0)
    cfg = FlamingoConfig(lm="random", clip_pretrained=None, train_lm_embeddings=bool(a.train_lm_embeddings), **spec[2])
    with torch.device(device):
        model = Flamingo.from_config(cfg, dataclasses.replace(spec[1], n_layer=n_layer))
    for p in model.lm.parameters():
        if not p.requires_grad and a.dtype == "bfloat16":
            p.data = p.data.to(torch.bfloat16)
    return model


def make_batch(model, B, T, device, per_row=(3, 4, 5, 6), prefix=8):
    """B rows of T random ids: `prefix` text tokens, then 3, 4, 5, 6, 3, ... chunks `<image> text <|endofchunk|>`
    filling the row; targets as data.collate makes them. -> images (N, 1, 3, H, W), idx (B, T), targets (B, T)."""
    import data
    g = torch.Generator().manual_seed(0)
    idx, n = torch.randint(0, model.lm.config.vocab_size, (B, T), generator=g), 0
    for b in range(B):
        k = per_row[b % len(per_row)]
        starts = [prefix + j * ((T - prefix) // k) for j in range(k)]
        idx[b, starts] = model.media_token_id
        idx[b, [s - 1 for s in starts[1:] + [T]]] = model.eoc_token_id
        n += k
    is_target = data.chunk_mask(idx, model.media_token_id, model.eoc_token_id)
    targets = torch.full_like(idx, -1)
    targets[:, :-1] = torch.where(is_target[:, 1:], idx[:, 1:], -1)
    size = model.vision.image_size if isinstance(model.vision.image_size, int) else model.vision.image_size[0]
    return torch.randn(n, 1, 3, size, size, generator=g).to(device), idx.to(device), targets.to(device)


def step_flops(model, B, T, N, M, K, n_layer=None, attn_bwd=2.0):
    """FLOPs of one training step, counted from what our code runs: 2 m k n for each (m x k) @ (k x n) product
    (Linears, the patch convolution, attention's two products); norms, softmax, GELU, the loss, AdamW (elementwise) are
    not counted. B rows of T tokens, N images, M the most images of a row, K targets. A backward costs 1x a Linear's
    forward for its input gradient and 1x for its weight gradient, attn_bwd x for attention (2.0: dQ, dK, dV, dP, the
    "model FLOPs" of MFU; fused flash / memory-efficient kernels also recompute the scores, which FlopCounterMode
    counts: 2.5). All T x T scores counted (ALiBi's dense bias reaches a kernel that skips none: no causal halving).
    - vision (frozen, under no_grad): forward only. Per image a patch conv, then per layer 24 S D^2 + 4 S^2 D (S patches
      + the class token, MLP 4D).
    - perceiver (trained): forward + 2x Linears + attn_bwd x attention. Keys/values over the S-1 patches and the R
      latents (the features' LayerNorm is trained, so their rows get input gradients too).
    - xattn (trained, as the resampler): media_kv's to_kv on the N*R visual tokens of real images (not the empty slots
      of rows with fewer), to_q, to_out and the FFW on all B*T tokens, attention B x T x M*R (masked, not skipped).
    - lm_layers (frozen): forward 24 B T C^2 + 4 B T^2 C (MPT); backward the input gradient only (no weight gradients),
      in EVERY layer, below the first gated block too: the new <image>/<|endofchunk|> rows (new_wte) are trained, so
      the embeddings require grad and autograd carries gradients down to them.
    - head: at the K targets only (loss_at), the frozen V rows and the 2 new ones; backward: the input gradient, the new
      rows' weight gradient (and the LM head's, when train_lm_embeddings trains the tied table).
    -> {part: (forward, backward)}."""
    lmc, cfg, v = model.lm.config, model.config, model.vision.visual
    L, C, V, nt, BT, a = n_layer or lmc.n_layer, lmc.n_embd, lmc.vocab_size, len(cfg.new_tokens), B * T, attn_bwd
    mm = lambda m, k, n: 2 * m * k * n  # noqa: E731
    D, Sp = model.vision.width, v.grid_size[0] * v.grid_size[1]
    S, Hv = Sp + 1, v.transformer.resblocks[0].mlp.c_fc.out_features
    layer = mm(S, D, 3 * D) + 2 * mm(S, D, S) + mm(S, D, D) + mm(S, D, Hv) + mm(S, Hv, D)
    parts = {"vision": (N * (mm(Sp, v.conv1.weight[0].numel(), D) + len(v.transformer.resblocks) * layer), 0)}
    R, I = cfg.num_latents, cfg.resampler_heads * cfg.resampler_dim_head
    Hr = model.perceiver.layers[0][1][1].out_features  # its FFW's width
    lin = mm(R, D, I) + mm(Sp + R, D, 2 * I) + mm(R, I, D) + mm(R, D, Hr) + mm(R, Hr, D)
    att, n = 2 * mm(R, I, Sp + R), N * cfg.resampler_depth
    parts["perceiver"] = (n * (lin + att), n * (2 * lin + a * att))
    blocks = [i for i in range(L) if (i + 1) % cfg.cross_attn_every_n_layers == 0 and i >= cfg.cross_attn_from_layer]
    Ix, Hx = cfg.xattn_heads * cfg.xattn_dim_head, C * cfg.xattn_ff_mult
    kv, att = mm(N * R, D, 2 * Ix), B * 2 * mm(T, Ix, M * R)
    lin = mm(BT, C, Ix) + mm(BT, Ix, C) + mm(BT, C, Hx) + mm(BT, Hx, C)
    parts["xattn"] = (len(blocks) * (kv + lin + att), len(blocks) * (2 * kv + 2 * lin + a * att))
    h, kvh, hd, inner = lmc.n_head, lmc.kv_heads, lmc.hd, lmc.inner
    lin = (mm(BT, C, (h + 2 * kvh) * hd) + mm(BT, h * hd, C) + mm(BT, C, inner * (2 if lmc.arch == "llama" else 1))
           + mm(BT, inner, C))
    att, trained = B * h * 2 * mm(T, hd, T), min(cfg.train_lm_layers, L)  # top layers fine-tuned: weight gradients
    emb = model.new_wte.requires_grad or model.lm.transformer.wte.weight.requires_grad
    first = 0 if emb else min(blocks + [L - trained])  # the lowest layer whose input needs a gradient
    parts["lm_layers"] = (L * (lin + att), (L - first) * (lin + a * att) + trained * lin)
    rows = K if hasattr(model, "loss_at") else BT  # logits at the targets only (loss_at), else everywhere
    head_w = model.lm.lm_head.weight.requires_grad
    parts["head"] = (mm(rows, C, V) + mm(rows, C, nt), mm(rows, C, V) * (1 + head_w) + 2 * mm(rows, C, nt))
    return parts


def count_flops(model, batch, amp, device):
    """FlopCounterMode on one step -> ({part: forward FLOPs}, backward FLOPs): the forward by module, the backward as a
    total (FlopCounterMode's attribution of backward ops to modules is loose). On a CPU with SDPA's math path: its
    flash kernel has no FLOP formula there, the math path is counted as its matmuls (attention backward 2x)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # else in fp32 (no autocast) the tower's nn.MultiheadAttention
    with sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext():  # takes a fused op it can't see
        with FlopCounterMode(display=False) as fwd, amp:
            loss = model(*batch)[1]
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    model.zero_grad(set_to_none=True)
    torch.backends.mha.set_fastpath_enabled(fast)
    by = {k: sum(v.values()) for k, v in fwd.get_flop_counts().items()}
    of = lambda pre, dots: sum(v for k, v in by.items() if k.startswith(pre) and k.count(".") == dots)  # noqa: E731
    got = {"vision": by.get("Flamingo.vision", 0), "perceiver": by.get("Flamingo.perceiver", 0),  # media_kv: to_kv
           "xattn": of("Flamingo.xattn.", 2) + sum(v for k, v in by.items() if k.endswith(".attn.to_kv")),
           "lm_layers": of("Flamingo.lm.transformer.h.", 4)}
    got["head"] = fwd.get_total_flops() - sum(got.values())  # lm_head and the new rows' product, at the top level
    return got, bwd.get_total_flops()


def timed(model, step_model, opt, batch, amp, a, device, warmup):
    """Warm-up steps (synchronized and timed each: the first compiles), then a.steps timed ones -> a record."""
    params, cuda = [p for p in model.parameters() if p.requires_grad], device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        with amp:
            loss = step_model(*batch)[1]  # (None, loss) or (logits, loss): only the loss is read
        loss.backward()
        if a.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    warm = []
    for _ in range(warmup):
        t = time.perf_counter()
        step()
        sync()
        warm.append(round(time.perf_counter() - t, 3))
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(a.steps + 1)] if cuda else []
    marks = [time.perf_counter()]
    if cuda:
        ev[0].record()
    for i in range(a.steps):
        loss = step()
        ev[i + 1].record() if cuda else marks.append(time.perf_counter())
    sync()
    wall = (time.perf_counter() - marks[0]) / a.steps
    times = [ev[i].elapsed_time(ev[i + 1]) / 1e3 if cuda else marks[i + 1] - marks[i] for i in range(a.steps)]
    return dict(warmup_s=warm, step_s=times, median_s=statistics.median(times), wall_per_step_s=wall, loss=loss.item())


def estimates(res, key, L_full, L_red, peak):
    """Full-depth times not measured: compile's speed-up at the reduced depth carried over (or layer-count scaling)."""
    ok = {(r["layers"], r["compile"]): r for r in res["runs"] if r["model"] == key and "median_s" in r}
    fl, out = res["models"].get(key, {}).get("flops"), []
    if not fl or L_red == L_full:
        return out
    F = sum(f + b for f, b in fl.values())
    for comp in ("off", "on"):
        if (L_full, comp) in ok or (L_red, comp) not in ok:
            continue
        r = ok[(L_red, comp)]
        e = dict(model=key, layers=L_full, compile=comp, layer_scaled_s=r["median_s"] * L_full / L_red,
                 formula=f"t({L_red}L) * {L_full} / {L_red}")
        if comp == "on" and (L_full, "off") in ok and (L_red, "off") in ok:
            e.update(ratio_s=r["median_s"] * ok[(L_full, "off")]["median_s"] / ok[(L_red, "off")]["median_s"],
                     formula=f"t_compiled({L_red}L) * t_eager({L_full}L) / t_eager({L_red}L)")
        t = e.get("ratio_s", e["layer_scaled_s"])
        e.update(median_s=t, tokens_per_s=r["tokens_per_s"] * r["median_s"] / t, flops=F, tflops=F / t / 1e12,
                 target_tokens_per_s=r["target_tokens_per_s"] * r["median_s"] / t, mfu=F / t / peak if peak else None)
        out.append(e)
    if (L_full, "off") in ok and (L_red, "off") in ok:  # how far off layer-count scaling is, where both are measured
        out.append(dict(model=key, check="eager", measured_s=ok[(L_full, "off")]["median_s"],
                        layer_scaled_s=ok[(L_red, "off")]["median_s"] * L_full / L_red))
    return out


def report(res, peak):
    rows = [(r, "") for r in res["runs"]] + [(e, "*") for e in res["estimates"] if "median_s" in e]
    u, un = (1e12, "T") if max([r.get("flops", 0) for r, _ in rows] + [0]) > 1e12 else (1e9, "G")
    print(f"\nmodel  layers compile  rows x T  images  targets   ms/step   tokens/s  target tok/s  {un}FLOP/step"
          f"  {un}FLOP/s    MFU  peak GB")
    for r, star in rows:
        m = res["models"].get(r["model"], {})
        head = (f"{r['model']:<6} {str(r['layers']) + star:>6} {r['compile']:>7} {m.get('rows', 0):>5} x"
                f" {m.get('T', 0):<3} {m.get('images', 0):>6} {m.get('targets', 0):>8}")
        if "median_s" in r:
            print(f"{head} {r['median_s'] * 1e3:9.1f} {r['tokens_per_s']:10.0f} {r['target_tokens_per_s']:13.0f}"
                  f" {r['flops'] / u:11.3f} {r['flops'] / r['median_s'] / u:8.1f}"
                  f" {format(r['mfu'], '.1%') if r.get('mfu') else '-':>6} {r.get('peak_gb') or 0:8.1f}")
        else:
            print(f"{head}  {r.get('error', '')[:70]}")
    for e in res["estimates"]:
        if "check" in e:
            print(f"  {e['model']} eager, full depth: measured {e['measured_s'] * 1e3:.1f} ms, layer-count scaling of"
                  f" the reduced depth would say {e['layer_scaled_s'] * 1e3:.1f} ms")
        else:
            print(f"* {e['model']} compile {e['compile']}, estimated: {e['formula']} = {e['median_s'] * 1e3:.1f} ms"
                  f" (layer-count scaling: {e['layer_scaled_s'] * 1e3:.1f} ms)")
    print(f"MFU = step_flops (model FLOPs, attention backward 2x) / median step time / {peak:.4g} FLOP/s (dense bf16)"
          if peak else "no MFU: no known peak for this device")


def main(argv=None):
    p = argparse.ArgumentParser(description="GPU benchmark of our training step (see the module docstring)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for k, v in OPTIONS.items():
        p.add_argument(f"--{k}", type=type(v), default=v)
    a = p.parse_args(argv)
    a.T, device, peak, gpu = a.T or (64 if a.tiny else 256), torch.device(a.device), None, "cpu"
    res = dict(meta=dict(args=vars(a), torch=torch.__version__), models={}, runs=[], estimates=[], flop_validation=[])

    def save():
        with open(a.out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(a.out + ".tmp", a.out)

    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        peak = next((pk for key, pk in PEAKS if key in gpu), None)
        x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        for i in range(23):  # 3 warm-up products, 20 timed
            if i == 3:
                torch.cuda.synchronize()
                t = time.perf_counter()
            x @ x
        torch.cuda.synchronize()
        res["meta"]["matmul_8192_tflops"] = round(20 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12, 1)
        del x
    res["meta"].update(gpu=gpu, peak_flops=peak)
    log(f"{gpu}: dense bf16 peak " + (f"{peak / 1e12:.1f} TFLOP/s" if peak else "unknown: no MFU, TFLOP/s only")
        + (f"; an 8192^3 bf16 matmul: {res['meta']['matmul_8192_tflops']} TFLOP/s" if gpu != "cpu" else ""))
    signal.signal(signal.SIGTERM, lambda *_: (report(res, peak), save(), sys.exit(124)))  # `timeout`: still the table
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph breaks: counted in the JSON instead
    specs, keys, comps = model_specs(a), a.models.split(","), a.compile.split(",")
    depth = {k: (specs[k][1].n_layer, min(specs[k][4], specs[k][1].n_layer)) for k in keys}  # (full, reduced)
    phases = [(k, L, "off") for k in keys if "off" in comps  # eager first (seconds), compiled last (minutes)
              for L in ([depth[k][0]] if a.full_eager and depth[k][1] < depth[k][0] else []) + [depth[k][1]]]
    phases += [(k, depth[k][1], "on") for k in keys if "on" in comps]
    for key, L, comp in phases:
        spec, (L_full, L_red) = specs[key], depth[key]
        rec = dict(model=key, layers=L, full_layers=L_full, compile=comp)
        log(f"{key}: {spec[0]}, {L} of {L_full} LM layers, compile {comp}: building")
        model = opt = batch = step_model = None
        try:  # out of memory (or a compile failure): reported, and on to the next
            model = build(spec, L, device, a)
            batch = make_batch(model, spec[3], a.T, device)
            N, M, K = len(batch[0]), int((batch[1] == model.media_token_id).sum(1).max()), int((batch[2] != -1).sum())
            if key not in res["models"]:
                fl = step_flops(model, spec[3], a.T, N, M, K, n_layer=L_full)
                res["models"][key] = dict(title=spec[0], layers=L_full, rows=spec[3], T=a.T, images=N, max_images_row=M,
                                          targets=K, flops=fl, params=model.parameter_counts())
                u, un = (1e12, "TFLOP") if sum(map(sum, fl.values())) > 1e12 else (1e9, "GFLOP")
                log(f"{key}: batch {spec[3]} rows x {a.T} tokens, {N} images (<= {M} a row), {K} targets; {un} of a "
                    f"step at full depth ({L_full} layers), forward + backward = step:")
                for part, (f, b) in list(fl.items()) + [("total", [sum(x) for x in zip(*fl.values())])]:
                    print(f"    {part:<10} {f / u:10.3f} + {b / u:10.3f} = {(f + b) / u:10.3f}")
            rec.update(rows=spec[3], T=a.T, images=N, targets=K, flops=sum(map(sum, step_flops(
                model, spec[3], a.T, N, M, K).values())))
            opt = model.configure_optimizer(1e-4, 0.1, (0.9, 0.95), fused=device.type == "cuda")
            amp = torch.autocast(device.type, dtype=torch.bfloat16) if a.dtype == "bfloat16" else nullcontext()
            if a.validate and L == L_red and comp == "off":
                got, got_bwd = count_flops(model, batch, amp, device)
                for attn_bwd in (2.0, 2.5):
                    want = step_flops(model, spec[3], a.T, N, M, K, attn_bwd=attn_bwd)
                    wf, wb = sum(f for f, _ in want.values()), sum(b for _, b in want.values())
                    v = dict(model=key, layers=L, attn_bwd=attn_bwd, counted_forward=got, counted_backward=got_bwd,
                             analytic=want, ratio=(sum(got.values()) + got_bwd) / (wf + wb),
                             ratio_forward=sum(got.values()) / wf, ratio_backward=got_bwd / wb)
                    res["flop_validation"].append(v)
                    log(f"{key} ({L} layers): FlopCounterMode / step_flops(attn_bwd={attn_bwd}): step {v['ratio']:.4f},"
                        f" backward {v['ratio_backward']:.4f}, forward {v['ratio_forward']:.4f} = "
                        + ", ".join(f"{k} {got[k] / max(f, 1):.4f}" for k, (f, _) in want.items()))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                rec["allocated_gb_before"] = torch.cuda.memory_allocated(device) / 1e9
            counters.clear()
            step_model = torch.compile(model) if comp == "on" else model
            log(f"{key} ({L} layers, compile {comp}): warm-up, then {a.steps} timed steps")
            warmup = a.compile_warmup if comp == "on" else a.warmup
            rec.update(timed(model, step_model, opt, batch, amp, a, device, warmup))
            t = rec["median_s"]
            rec.update(tokens_per_s=spec[3] * a.T / t, target_tokens_per_s=K / t, tflops=rec["flops"] / t / 1e12,
                       mfu=rec["flops"] / t / peak if peak else None)
            rec["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
            if comp == "on":
                rec.update(graphs=counters["stats"]["unique_graphs"],  # and each graph break's reason, its first line
                           graph_breaks={k.split("\n")[0][:100]: n for k, n in counters["graph_break"].items()})
            log(f"  median {t * 1e3:.1f} ms a step (warm-up {rec['warmup_s']} s), {rec['tflops']:.2f} TFLOP/s"
                + (f", MFU {rec['mfu']:.1%}" if peak else "")
                + (f", peak {rec['peak_gb']:.1f} GB" if rec["peak_gb"] is not None else "")
                + (f", {rec['graphs']} graphs" if comp == "on" else ""))
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
            log(f"  failed: {rec['error'][:300]}")
        res["runs"].append(rec)
        model = opt = batch = step_model = None
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        res["estimates"] = [e for k in keys for e in estimates(res, k, *depth[k], peak)]
        save()
    report(res, peak)
    log(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
