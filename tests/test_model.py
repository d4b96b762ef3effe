"""Tests for the Flamingo model (model.py, xattn.py, resampler.py). CPU, no network, tiny sizes.

The backbone is equivalence and perturbation: closed gates give the bare LM; each image influences
exactly the tokens phi (Flamingo Figure 6) assigns to it; masked cross-attention and the resampler equal
naive loops written here; cached generation equals uncached and a hand loop; training touches only the
trained parts; checkpoints round-trip and refuse what does not fit.
"""

import copy
import dataclasses
import math
import os

import pytest
import torch

import xattn
from lm import LM, LMConfig
from model import Flamingo
from vision import register_clip_configs
from resampler import PerceiverResampler
from xattn import GatedCrossAttentionBlock, MaskedCrossAttention

V = 257                   # LM vocabulary: <image> = 257, <|endofchunk|> = 258
IMG, EOC = V, V + 1
OPTS = dict(clip="flamingo-tiny", cross_attn_every_n_layers=2, resampler_depth=2, num_latents=8,
            resampler_heads=2, resampler_dim_head=16, xattn_heads=2, xattn_dim_head=16, verbose=False)
LM_CONFIGS = {
    "llama": LMConfig(arch="llama", vocab_size=V, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, block_size=128, bias=False),
    "gpt2": LMConfig(arch="gpt2", vocab_size=V, n_layer=4, n_head=4, n_embd=64, block_size=128),
}


def randomize_(module, std, seed):
    """Non-trivial weights: matrices N(0, std), norm weights around 1, biases around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(r * std)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)


def open_gates_(model, value=1.0):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.fill_(value)


def images_for(n, seed, frames=1):
    return torch.randn(n, frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits_of(model, images, idx):
    with torch.no_grad():
        return model(images, idx)[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and immune to other processes on a small machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny LMs in the Hugging Face layout and a tiny CLIP weights file, written here (no hub)."""
    import open_clip
    root = tmp_path_factory.mktemp("assets")
    lm_dirs = {}
    for i, (arch, cfg) in enumerate(LM_CONFIGS.items()):
        lm = LM(cfg)
        randomize_(lm, 0.2, seed=i)
        lm_dirs[arch] = str(root / arch)
        lm.save_pretrained(lm_dirs[arch])
    # A weights file for the vision tower: a checkpoint must rebuild the very same frozen tower.
    register_clip_configs()
    torch.manual_seed(0)
    clip = open_clip.create_model("flamingo-tiny")
    clip_path = str(root / "clip.pt")
    torch.save(clip.state_dict(), clip_path)
    return dict(lm=lm_dirs, clip=clip_path)


@pytest.fixture(scope="module")
def fresh(assets):
    """Freshly built Flamingos (gates at 0), one per LM family. Tests that change them work on copies."""
    return {arch: Flamingo.from_pretrained(lm=d, clip_pretrained=assets["clip"], **OPTS).eval()
            for arch, d in assets["lm"].items()}


@pytest.fixture(scope="module")
def opened(fresh):
    """Copies with open gates and random trained parts, so that images visibly matter."""
    out = {}
    for i, (arch, m) in enumerate(fresh.items()):
        m = copy.deepcopy(m)
        randomize_(m.perceiver, 0.3, seed=10 + i)
        randomize_(m.xattn, 0.3, seed=20 + i)
        with torch.no_grad():
            m.new_wte.normal_(0, 1.0)
        open_gates_(m, 1.0)
        out[arch] = m
    return out


def test_fresh_model_basics(fresh):
    m = fresh["llama"]
    assert (m.media_token_id, m.eoc_token_id) == (IMG, EOC)
    assert sorted(m.xattn, key=int) == ["1", "3"]  # before layer i when (i + 1) % 2 == 0
    gates = [p for n, p in m.named_parameters() if n.endswith(("attn_gate", "ff_gate"))]
    assert len(gates) == 4 and all((g == 0).all() for g in gates)
    idx = torch.tensor([[1, IMG, 2, 3, EOC, 4]])
    assert logits_of(m, images_for(1, 0), idx).shape == (1, 6, V + 2)


def test_cross_attn_from_layer(assets, tmp_path):
    """No gated block before the LM's layers below cross_attn_from_layer; the layout survives a checkpoint."""
    opts = dict(OPTS, cross_attn_every_n_layers=1, cross_attn_from_layer=1)
    m = Flamingo.from_pretrained(lm=assets["lm"]["gpt2"], clip_pretrained=assets["clip"], **opts)
    assert sorted(m.xattn, key=int) == ["1", "2", "3"]
    m.save_checkpoint(str(tmp_path / "ckpt.pt"))
    assert sorted(Flamingo.from_checkpoint(str(tmp_path), verbose=False)[0].xattn, key=int) == ["1", "2", "3"]
    with pytest.raises(ValueError, match="no layer"):
        Flamingo.from_pretrained(lm=assets["lm"]["gpt2"], clip_pretrained=assets["clip"],
                                 **dict(opts, cross_attn_from_layer=4))


# -----------------------------------------------------------------------------
# 1. Closed gates: the bare LM


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_closed_gates_equal_bare_lm(fresh, arch):
    m = fresh[arch]
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m.lm(idx)[0]
    logits = logits_of(m, None, idx)
    assert logits.shape == (2, 20, V + 2)
    assert torch.equal(logits[..., :V], ref)

    # With images: images change nothing, and with the new embedding rows set to LM rows the logits are
    # exactly the LM's on the text where those LM tokens stand in for <image> and <|endofchunk|>.
    idx_img = idx.clone()
    idx_img[0, [3, 9]] = IMG
    idx_img[1, 0] = IMG
    idx_img[1, [4, 15]] = EOC
    a = logits_of(m, images_for(3, 0), idx_img)
    b = logits_of(m, images_for(3, 1) * 3, idx_img)
    assert torch.equal(a, b)
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        m2.new_wte[0] = m2.lm.transformer.wte.weight[7]
        m2.new_wte[1] = m2.lm.transformer.wte.weight[9]
    sub = torch.where(idx_img == IMG, 7, torch.where(idx_img == EOC, 9, idx_img))
    with torch.no_grad():
        assert torch.equal(logits_of(m2, images_for(3, 0), idx_img)[..., :V], m2.lm(sub)[0])


# -----------------------------------------------------------------------------
# 2. Each image influences exactly the tokens phi assigns to it (whole model, gates open)

# row 0: text, then 3 images; row 1: text, then 1 image. Media order: row 0's three, then row 1's.
T_ = 14
IMG_POS = {0: [3, 7, 10], 1: [5]}
MEDIA = [(0, 3), (0, 7), (0, 10), (1, 5)]  # (row, position) of each media item, in batch order


def interleaved_batch(seed=3):
    idx = torch.randint(0, V, (2, T_), generator=torch.Generator().manual_seed(seed))
    for r, ps in IMG_POS.items():
        idx[r, ps] = IMG
    return idx


def positions_of(k, only_immediate=True):
    """Positions of media item k's row that may see it: up to the next <image> (or all later ones)."""
    r, p = MEDIA[k]
    later = [q for q in IMG_POS[r] if q > p]
    end = T_ if (later == [] or not only_immediate) else later[0]
    return r, p, end


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_image_perturbation_logits(opened, arch):
    m = opened[arch]
    idx = interleaved_batch()
    images = images_for(4, 0)
    base = logits_of(m, images, idx)
    for k in range(4):
        pert = images.clone()
        pert[k] = images_for(1, 100 + k)[0]
        out = logits_of(m, pert, idx)
        r, p, end = positions_of(k)
        assert torch.equal(out[r, :p], base[r, :p]), f"image {k} leaked into earlier tokens"
        diff = (out[r, p:end] - base[r, p:end]).abs().amax(-1)
        assert (diff > 1e-4).all(), f"image {k} does not reach all of its tokens: {diff}"
        assert torch.equal(out[1 - r], base[1 - r]), f"image {k} leaked into the other row"
        # Later tokens change too, but only through the LM's self-attention (tested below, after the
        # first gated block, where self-attention has not mixed anything in yet).
    # Text before a row's first image depends on no image: same with all images replaced, and the same
    # as the text-only forward pass on that prefix.
    out = logits_of(m, images_for(4, 7) * 2, idx)
    for r, ps in IMG_POS.items():
        first = ps[0]
        assert torch.equal(out[r, :first], base[r, :first])
        prefix = logits_of(m, None, idx[r:r + 1, :first])[0]
        torch.testing.assert_close(prefix, base[r, :first], atol=1e-5, rtol=0)


@pytest.mark.parametrize("only_immediate", [True, False])
def test_image_perturbation_after_first_block(opened, only_immediate):
    """The output of the first gated block (before LM layer 1; layer 0 saw text only) shows the mask
    phi itself: token t changes with image k iff t may see k, whole pipeline included."""
    src = opened["llama"]
    cfg = dataclasses.replace(src.config, only_attend_immediate_media=only_immediate)
    m = Flamingo(copy.deepcopy(src.lm), copy.deepcopy(src.vision), cfg, verbose=False).eval()
    m.load_trained(src.trained_state_dict())
    assert all(b.attn.only_immediate == only_immediate for b in m.xattn.values())
    seen = {}
    m.xattn["1"].register_forward_hook(lambda mod, args, out: seen.__setitem__("x", out))
    idx = interleaved_batch()
    images = images_for(4, 0)
    logits_of(m, images, idx)
    base = seen["x"]
    for k in range(4):
        pert = images.clone()
        pert[k] = images_for(1, 100 + k)[0]
        logits_of(m, pert, idx)
        r, p, end = positions_of(k, only_immediate)
        changed = (seen["x"] != base).any(-1)                    # (B, T)
        expected = torch.zeros_like(changed)
        expected[r, p:end] = True
        assert torch.equal(changed, expected), f"image {k}: changed {changed.int().tolist()}"


# -----------------------------------------------------------------------------
# 3. Masked cross-attention against a naive loop


def naive_phi(idx, media_id):
    """For each token, the number of <image> tokens at or before it (1-based image of its row; 0 = none)."""
    B, T = idx.shape
    tt = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        n = 0
        for t in range(T):
            n += int(idx[b, t] == media_id)
            tt[b, t] = n
    return tt


def naive_xattn(mod, x, tt, visual, only_immediate):
    """Per row and token: the visible visual tokens, softmax attention per head by hand; zero when none."""
    B, T, C = x.shape
    _, M, R, D = visual.shape
    h = mod.heads
    out = torch.zeros(B, T, C)
    for b in range(B):
        for t in range(T):
            n = int(tt[b, t])
            if n == 0:
                continue  # before the first image: exactly zero
            slots = [n - 1] if only_immediate else list(range(n))
            vis = visual[b, slots].reshape(-1, D)                 # (len(slots) * R, D)
            q = mod.to_q(mod.norm(x[b, t]))                       # (h * dh,)
            k, v = mod.to_kv(vis).chunk(2, dim=-1)               # (L, h * dh) each
            dh = q.shape[0] // h
            heads = []
            for j in range(h):
                s = slice(j * dh, (j + 1) * dh)
                w = torch.softmax(k[:, s] @ q[s] / math.sqrt(dh), dim=0)
                heads.append(w @ v[:, s])
            out[b, t] = mod.to_out(torch.cat(heads))
    return out


def xattn_inputs(seed=0):
    """Three rows: three images, none at all, one image (its two other slots are padding)."""
    g = torch.Generator().manual_seed(seed)
    B, T, C, M, R, D = 3, 11, 12, 3, 4, 10
    idx = torch.randint(0, 50, (B, T), generator=g)
    idx[0, [2, 5, 6]] = 99  # two images in a row: the first one's span is the <image> token alone
    idx[2, 4] = 99
    x = torch.randn(B, T, C, generator=g)
    visual = torch.randn(B, M, R, D, generator=g)
    visual[1] = 100 * torch.randn(M, R, D, generator=g)     # padding slots hold garbage, never seen
    visual[2, 1:] = 100 * torch.randn(M - 1, R, D, generator=g)
    return idx, x, visual, R


@pytest.mark.parametrize("only_immediate", [True, False])
def test_masked_cross_attention_matches_naive(only_immediate):
    torch.manual_seed(0)
    mod = MaskedCrossAttention(12, 10, heads=3, dim_head=4, only_attend_immediate_media=only_immediate)
    idx, x, visual, R = xattn_inputs()
    tt = naive_phi(idx, 99)
    assert torch.equal(tt, (idx == 99).cumsum(1))  # what model.py computes
    with torch.no_grad():
        out = mod(x, tt, mod.media_kv(visual), R)
        ref = naive_xattn(mod, x, tt, visual, only_immediate)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out[tt == 0] == 0).all()                    # exactly zero, not a uniform average
    assert (out[1] == 0).all()                          # the row without images
    # padding slots are never attended: changing them changes nothing at all
    visual2 = visual.clone()
    visual2[1] = torch.randn_like(visual2[1])
    visual2[2, 1:] = torch.randn_like(visual2[2, 1:])
    with torch.no_grad():
        assert torch.equal(mod(x, tt, mod.media_kv(visual2), R), out)
    # tokens one at a time (as cached generation feeds them) give the same outputs
    with torch.no_grad():
        kv = mod.media_kv(visual)
        for t in [0, 3, 5, 10]:
            torch.testing.assert_close(mod(x[:, t:t + 1], tt[:, t:t + 1], kv, R)[:, 0], out[:, t], atol=1e-6, rtol=0)


def test_gated_block():
    torch.manual_seed(0)
    blk = GatedCrossAttentionBlock(12, 10, heads=3, dim_head=4)
    idx, x, visual, R = xattn_inputs(1)
    tt = naive_phi(idx, 99)
    with torch.no_grad():
        kv = blk.attn.media_kv(visual)
        assert torch.equal(blk(x, tt, kv, R), x)       # fresh gates: the identity, exactly
        assert torch.equal(blk(x, tt, None, R), x)
        blk.attn_gate.fill_(0.5)
        blk.ff_gate.fill_(-0.7)
        y = x + math.tanh(0.5) * naive_xattn(blk.attn, x, tt, visual, True)
        y = y + math.tanh(-0.7) * blk.ff(y)
        torch.testing.assert_close(blk(x, tt, kv, R), y, atol=1e-5, rtol=0)
        # no images at all: only the gated feed-forward
        torch.testing.assert_close(blk(x, tt, None, R), x + math.tanh(-0.7) * blk.ff(x), atol=1e-6, rtol=0)


def test_media_mask():
    tt = torch.tensor([[0, 1, 1, 2, 3]])
    m = xattn.media_mask(tt, M=3, R=2, only_immediate=True)[0, 0]   # (T, M*R)
    assert m.int().tolist() == [[0] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]]
    m = xattn.media_mask(tt, M=3, R=2, only_immediate=False)[0, 0]
    assert m.int().tolist() == [[0] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1] * 6]


# -----------------------------------------------------------------------------
# 4. Perceiver Resampler


def naive_resampler(rs, x):
    """The paper's pseudo-code (Flamingo Figure 4), one media item at a time, heads by hand."""
    N, Fr, S, D = x.shape
    outs = []
    for n in range(N):
        feats = x[n] + (rs.frame_embs[:Fr, None] if rs.frame_embs is not None else 0)
        feats = feats.reshape(Fr * S, D)
        lat = rs.latents
        for attn, ff in rs.layers:
            xm, l = attn.norm_media(feats), attn.norm_latents(lat)
            q = attn.to_q(l)
            k, v = attn.to_kv(torch.cat([xm, l])).chunk(2, dim=-1)
            dh = q.shape[1] // attn.heads
            heads = []
            for j in range(attn.heads):
                s = slice(j * dh, (j + 1) * dh)
                heads.append(torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(dh), dim=-1) @ v[:, s])
            lat = lat + attn.to_out(torch.cat(heads, dim=-1))
            lat = lat + ff(lat)
        outs.append(rs.norm(lat))
    return torch.stack(outs)


def test_resampler():
    torch.manual_seed(0)
    rs = PerceiverResampler(16, depth=2, heads=2, dim_head=8, num_latents=5, max_num_frames=3).eval()
    with torch.no_grad():
        rs.frame_embs.normal_()
        for N, Fr, S in [(1, 1, 4), (3, 1, 9), (2, 3, 4), (2, 2, 1)]:
            x = torch.randn(N, Fr, S, 16)
            out = rs(x)
            assert out.shape == (N, 5, 16)
            torch.testing.assert_close(out, naive_resampler(rs, x), atol=1e-5, rtol=0)
            # items are independent of each other
            torch.testing.assert_close(rs(x[-1:]), out[-1:], atol=1e-6, rtol=0)

        video = torch.randn(1, 2, 4, 16)
        out = rs(video)
        # patches within a frame carry no order (no positions) ...
        torch.testing.assert_close(rs(video[:, :, [2, 0, 3, 1]]), out, atol=1e-5, rtol=0)
        # ... but frames do: the time embeddings tell them apart
        assert not torch.allclose(rs(video[:, [1, 0]]), out, atol=1e-4)
        saved = rs.frame_embs.clone()
        rs.frame_embs[1] += torch.randn(16)  # (not a constant shift: the LayerNorm would remove that)
        assert not torch.allclose(rs(video), out, atol=1e-4)
        rs.frame_embs.copy_(saved)
        rs.frame_embs[2] += torch.randn(16)  # the third time embedding is unused by a 2-frame video
        assert torch.equal(rs(video), out)

        # more frames than were learned: the 3 learned embeddings interpolated over 5 frames (the paper's way)
        time = rs.time_embeddings(5)
        assert torch.equal(time[[0, 2, 4]], rs.frame_embs) and torch.allclose(time[1], rs.frame_embs[:2].mean(0))
        x = torch.randn(1, 5, 4, 16)
        with torch.no_grad():
            saved = rs.frame_embs
            rs.frame_embs = torch.nn.Parameter(time)
            want = rs(x)
            rs.frame_embs = saved
        torch.testing.assert_close(rs(x), want, atol=0, rtol=0)
        # items of different frame counts in one call: each the same as alone
        items = [torch.randn(2, 4, 16), torch.randn(1, 4, 16), torch.randn(3, 4, 16), torch.randn(1, 4, 16)]
        out = rs(items)
        for item, o in zip(items, out):
            torch.testing.assert_close(rs(item[None])[0], o, atol=1e-6, rtol=0)
        # one time embedding (an image model) or none (OpenFlamingo's released models): single frames only
        rs1 = PerceiverResampler(16, depth=1, heads=2, dim_head=8, num_latents=5, max_num_frames=1)
        rs0 = PerceiverResampler(16, depth=1, heads=2, dim_head=8, num_latents=5, max_num_frames=0)
        assert rs0.frame_embs is None and rs0(torch.randn(2, 1, 4, 16)).shape == (2, 5, 16)
        for r in (rs0, rs1):
            with pytest.raises(ValueError, match="cannot tell frames apart in time"):
                r(torch.randn(2, 2, 4, 16))


def test_video_through_model(opened):
    """Videos (F > 1) flow through the whole model, with more frames than max_num_frames too (interpolated time)."""
    src = opened["llama"]
    cfg = dataclasses.replace(src.config, max_num_frames=2)
    m = Flamingo(copy.deepcopy(src.lm), copy.deepcopy(src.vision), cfg, verbose=False).eval()
    open_gates_(m)
    idx = torch.tensor([[1, IMG, 2, 3]])
    video = images_for(1, 0, frames=2)
    base = logits_of(m, video, idx)
    assert not torch.allclose(logits_of(m, video[:, [1, 0]], idx), base, atol=1e-5)
    assert logits_of(m, images_for(1, 0, frames=3), idx).shape == base.shape


def test_images_and_videos_mixed(opened):
    """Items of different frame counts in one batch (a list, no padding frames): each row's logits those it gets
    alone; a list of items of one frame count gives the tensor's logits; generation cached = uncached (beams too)."""
    src = opened["llama"]
    m = Flamingo(copy.deepcopy(src.lm), copy.deepcopy(src.vision), dataclasses.replace(src.config, max_num_frames=2),
                 verbose=False).eval()
    open_gates_(m)
    idx = torch.tensor([[1, IMG, 2, IMG, 3], [4, 5, IMG, 6, 7]])
    items = [images_for(1, 0)[0], images_for(1, 1, frames=2)[0], images_for(1, 2, frames=3)[0]]  # (F, 3, H, W)
    both = logits_of(m, items, idx)
    torch.testing.assert_close(both[:1], logits_of(m, items[:2], idx[:1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1:], logits_of(m, items[2][None], idx[1:]), atol=1e-5, rtol=0)
    same = [images_for(1, 3, frames=2)[0], images_for(1, 4, frames=2)[0], images_for(1, 5, frames=2)[0]]
    torch.testing.assert_close(logits_of(m, same, idx), logits_of(m, torch.stack(same), idx), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="a list of"):
        logits_of(m, items[:2], idx)
    prompts = [[1, IMG, 2, IMG, 3], [4, 5, IMG]]
    cached = m.generate(items, prompts, 6, temperature=0)
    assert cached == m.generate(items, prompts, 6, temperature=0, use_cache=False)
    beams = m.generate(items, prompts, 6, num_beams=2)
    assert beams == m.generate(items, prompts, 6, num_beams=2, use_cache=False)


# -----------------------------------------------------------------------------
# 5. Generation


def greedy_reference(model, images, idx, n, stop=EOC):
    """The naive loop: the whole sequence and its images every step, argmax without <image>."""
    done = torch.zeros(idx.shape[0], dtype=torch.bool)
    for _ in range(n):
        logits = logits_of(model, images, idx)[:, -1].clone()
        logits[:, IMG] = -float("inf")
        nxt = torch.where(done, stop, logits.argmax(-1))
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        done |= nxt == stop
        if done.all():
            break
    return idx


def gen_prompt():
    idx = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(5))
    idx[0, [1, 4]] = IMG
    idx[1, 0] = IMG
    return idx, images_for(3, 9)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation(opened, arch):
    m = opened[arch]
    idx, images = gen_prompt()
    out = m.generate(images, idx, 8, temperature=0)
    assert out.shape == (2, 15) and torch.equal(out[:, :7], idx)
    assert torch.equal(out, m.generate(images, idx, 8, temperature=0, use_cache=False))
    assert torch.equal(out, greedy_reference(m, images, idx, 8))
    assert len(set(out[:, 7:].flatten().tolist())) > 2  # a real test: not one repeated token
    # each row alone gives the same as in the batch
    assert torch.equal(m.generate(images[:2], idx[:1], 8, temperature=0), out[:1])
    assert torch.equal(m.generate(images[2:], idx[1:], 8, temperature=0), out[1:])
    # text only
    txt = idx[:, 2:].clamp(max=V - 1)
    assert torch.equal(m.generate(None, txt, 5, temperature=0), greedy_reference(m, None, txt, 5))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_beam_search(opened, arch):
    m = opened[arch]
    idx, images = gen_prompt()
    out = m.generate(images, idx, 6, num_beams=3)
    assert out.shape[0] == 2 and torch.equal(out[:, :7], idx) and out.shape[1] <= 13
    assert torch.equal(out, m.generate(images, idx, 6, num_beams=3, use_cache=False))
    a = m.generate(images[:2], idx[:1], 6, num_beams=3)
    b = m.generate(images[2:], idx[1:], 6, num_beams=3)
    L = out.shape[1]
    pad = lambda t: torch.cat([t, t.new_full((1, L - t.shape[1]), EOC)], dim=1)  # noqa: E731
    assert torch.equal(out, torch.cat([pad(a), pad(b)]))
    assert (out[:, 7:] != IMG).all()


def favour_(m, images, idx, row):
    """Make new token `row` (0 <image>, 1 <|endofchunk|>) the model's favourite after the prompt: its
    output row points along the final hidden states of the last prompt tokens."""
    hs = {}
    hook = m.lm.transformer.ln_f.register_forward_hook(lambda mod, a, out: hs.__setitem__("h", out))
    logits_of(m, images, idx)
    hook.remove()
    h = hs["h"][:, -1]
    with torch.no_grad():
        m.new_lm_head[row] = 1e3 * h.sum(0) / h.norm(dim=-1).pow(2).sum()
    assert (logits_of(m, images, idx)[:, -1].argmax(-1) == V + row).all()


def test_generation_stops_at_eoc(opened):
    m = copy.deepcopy(opened["llama"])
    idx, images = gen_prompt()
    favour_(m, images, idx, 1)
    for use_cache in (True, False):
        out = m.generate(images, idx, 5, temperature=0, use_cache=use_cache)
        assert torch.equal(out, torch.cat([idx, torch.full((2, 1), EOC)], dim=1)), out[:, 7:]
        out = m.generate(images, idx, 5, num_beams=3, use_cache=use_cache)
        assert torch.equal(out[:, 7:], torch.full((2, 1), EOC)), out[:, 7:]


def test_generation_never_emits_image(opened):
    """No image could follow a generated <image>: generation skips it, even when it is the favourite."""
    m = copy.deepcopy(opened["llama"])
    idx, images = gen_prompt()
    favour_(m, images, idx, 0)
    for use_cache in (True, False):
        out = m.generate(images, idx, 4, temperature=0, use_cache=use_cache)
        assert torch.equal(out, greedy_reference(m, images, idx, 4))
        assert (out[:, 7:] != IMG).all()
        assert (m.generate(images, idx, 4, num_beams=3, use_cache=use_cache)[:, 7:] != IMG).all()
        assert (m.generate(images, idx, 4, temperature=5.0, use_cache=use_cache)[:, 7:] != IMG).all()


def test_generation_pads_stopped_rows(opened, monkeypatch):
    """One row stops early (forced through the logits) and is padded with <|endofchunk|>; the other goes on."""
    m = copy.deepcopy(opened["llama"])
    idx, images = gen_prompt()
    free = m.generate(images, idx, 6, temperature=0)
    trigger = free[0, 7 + 1].item()           # row 0's second new token ...
    assert trigger not in free[1, 7:].tolist() and trigger not in free[0, 7:8].tolist()
    forward_lm = m.forward_lm

    def forced(x, *args, **kwargs):           # ... is followed by <|endofchunk|> in row 0
        logits = forward_lm(x, *args, **kwargs)
        logits[0, -1, EOC] += 1e4 * (x[0, -1] == trigger)
        return logits

    monkeypatch.setattr(m, "forward_lm", forced)
    expected = free.clone()
    expected[0, 7 + 2:] = EOC
    for use_cache in (True, False):
        assert torch.equal(m.generate(images, idx, 6, temperature=0, use_cache=use_cache), expected)
    assert torch.equal(greedy_reference(m, images, idx, 6), expected)


def test_media_encoded_once_per_generate(opened, monkeypatch):
    m = opened["llama"]
    idx, images = gen_prompt()
    calls = {"perceiver": 0, "media_kv": 0}
    perceiver_forward = m.perceiver.forward
    media_kv = MaskedCrossAttention.media_kv

    def count_perceiver(*a, **k):
        calls["perceiver"] += 1
        return perceiver_forward(*a, **k)

    def count_media_kv(self, *a, **k):
        calls["media_kv"] += 1
        return media_kv(self, *a, **k)

    monkeypatch.setattr(m.perceiver, "forward", count_perceiver)
    monkeypatch.setattr(MaskedCrossAttention, "media_kv", count_media_kv)
    nb = len(m.xattn)
    out = m.generate(images, idx, 6, temperature=0)
    assert out.shape[1] == 13 and calls == {"perceiver": 1, "media_kv": nb}
    calls.update(perceiver=0, media_kv=0)
    m.generate(images, idx, 6, num_beams=3)
    assert calls == {"perceiver": 1, "media_kv": nb}
    calls.update(perceiver=0, media_kv=0)
    m.generate(images, idx, 6, temperature=0, use_cache=False)
    assert calls["perceiver"] >= 6 and calls["media_kv"] == nb * calls["perceiver"]


def test_sampling(opened):
    m = opened["llama"]
    idx, images = gen_prompt()
    torch.manual_seed(0)
    a = m.generate(images, idx, 5, temperature=1.0, top_k=10, top_p=0.9)
    torch.manual_seed(0)
    b = m.generate(images, idx, 5, temperature=1.0, top_k=10, top_p=0.9, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 12) and (a[:, 7:] != IMG).all()
    # top_k=1 is greedy
    assert torch.equal(m.generate(images, idx, 5, temperature=0.7, top_k=1), m.generate(images, idx, 5, temperature=0))


# -----------------------------------------------------------------------------
# 6. A training step changes only the trained parts


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_at_targets_equals_the_full_cross_entropy(opened, arch):
    """The training loss, computed at the target positions only without concatenating the two heads' logits,
    equals the cross-entropy of the full (B, T, V + n) logits, and so do the gradients of every trained tensor
    (with the LM's input table trained too: GPT-2's head is that table, so the head's rows get gradients)."""
    m = copy.deepcopy(opened[arch])
    m.unfreeze_lm_layers(0, embeddings=True)
    idx = interleaved_batch(seed=4)
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -1
    targets[0, :3] = -1                       # text before the first image: no target
    targets[1, [2, 8]] = EOC                  # a new token as the target
    targets[0, 5] = IMG
    images = images_for(4, 0)
    trained = [p for p in m.parameters() if p.requires_grad]
    loss = m(images, idx, targets)[1]
    grads = torch.autograd.grad(loss, trained)
    logits = m(images, idx)[0]
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    want_grads = torch.autograd.grad(want, trained)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())
    assert any((g != 0).any() for g in grads[:1]) and sum(int((g != 0).any()) for g in grads) > 5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_step(fresh, arch):
    m = copy.deepcopy(fresh[arch])
    m.train()
    assert m.training and m.perceiver.training and m.xattn.training
    assert not m.vision.training and not any(mod.training for mod in m.vision.modules())
    assert not any(p.requires_grad for p in m.lm.parameters())
    assert not any(p.requires_grad for p in m.vision.parameters())
    frozen = {k: v.clone() for k, v in list(m.lm.state_dict().items()) + [("v." + k, v) for k, v in m.vision.state_dict().items()]}
    trained = {k: v.clone() for k, v in m.trained_state_dict().items()}
    assert trained and not any(k.startswith(("lm.", "vision.")) for k in trained)

    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    idx[0, [1, 6]] = IMG
    idx[1, 2] = IMG
    idx[0, 5] = EOC
    idx[1, 10] = EOC
    # no weight decay: a parameter moves only if its gradient is not zero
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    _, loss = m(images_for(3, 0), idx[:, :-1], targets=idx[:, 1:])
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()

    assert all(p.grad is None for p in m.lm.parameters()) and all(p.grad is None for p in m.vision.parameters())
    # closed gates: only the gates and the new token rows get a gradient at step 0
    assert m.new_wte.grad.abs().amax(-1).gt(0).all() and m.new_lm_head.grad.abs().amax(-1).gt(0).all()
    assert all(b.attn_gate.grad.abs() > 0 and b.ff_gate.grad.abs() > 0 for b in m.xattn.values())
    assert all((p.grad is None or (p.grad == 0).all()) for p in list(m.perceiver.parameters())
               + [p for n, p in m.xattn.named_parameters() if not n.endswith("gate")])
    now = {k: v for k, v in list(m.lm.state_dict().items()) + [("v." + k, v) for k, v in m.vision.state_dict().items()]}
    changed = [k for k in frozen if not torch.equal(frozen[k], now[k])]
    assert changed == [], f"frozen weights moved: {changed}"
    after = m.trained_state_dict()
    for k in trained:
        if k.endswith(("attn_gate", "ff_gate")) or k in ("new_wte", "new_lm_head"):
            assert not torch.equal(after[k], trained[k]), f"{k} did not move"
    for row in (0, 1):
        assert not torch.equal(after["new_wte"][row], trained["new_wte"][row])
    assert not m.vision.training  # still, after the step


# -----------------------------------------------------------------------------
# 7. Checkpoints


def test_checkpoint_roundtrip(opened, tmp_path, monkeypatch):
    m = opened["llama"]
    path = str(tmp_path / "ckpt.pt")
    m.save_checkpoint(path, step=3)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["step"] == 3 and set(raw["model"]) == set(m.trained_state_dict())
    assert not any(k.startswith(("lm.", "vision.")) for k in raw["model"])

    loads = []
    torch_load = torch.load

    def spy(*a, **k):
        loads.append(k.get("weights_only"))
        return torch_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    m2, ckpt = Flamingo.from_checkpoint(str(tmp_path), verbose=False)
    monkeypatch.undo()
    assert loads and all(w is True for w in loads), loads
    assert ckpt["step"] == 3 and m2.config == m.config
    idx = interleaved_batch()
    images = images_for(4, 0)
    assert torch.equal(logits_of(m2.eval(), images, idx), logits_of(m, images, idx))


def test_train_lm_embeddings(assets, tmp_path):
    """train_lm_embeddings (OpenFlamingo's choice, config/9b.py): a step moves the LM's input table, and a tied head
    with it (GPT-2's is the same tensor), and no other LM weight; the checkpoint keeps the table and rebuilds."""
    m = Flamingo.from_pretrained(lm=assets["lm"]["gpt2"], clip_pretrained=assets["clip"], train_lm_embeddings=True,
                                 **OPTS)
    wte = m.lm.transformer.wte.weight
    assert wte.requires_grad and m.lm.lm_head.weight is wte and "lm.transformer.wte.weight" in m.trained_state_dict()
    before = {k: v.clone() for k, v in m.lm.state_dict().items()}
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    idx[:, 0] = IMG
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    m(images_for(2, 0), idx[:, :-1], targets=idx[:, 1:])[1].backward()
    opt.step()
    moved = sorted(k for k, v in m.lm.state_dict().items() if not torch.equal(v, before[k]))
    assert moved == ["lm_head.weight", "transformer.wte.weight"]
    m.save_checkpoint(str(tmp_path / "ckpt.pt"))
    m2, _ = Flamingo.from_checkpoint(str(tmp_path), verbose=False)
    assert m2.config.train_lm_embeddings and torch.equal(m2.lm.transformer.wte.weight, wte)
    assert m2.lm.lm_head.weight is m2.lm.transformer.wte.weight


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_lm_with_fp32_trained_parts(assets, tmp_path, arch):
    """dtype=bfloat16 (train.py's on a GPU, sample.py's --dtype): the frozen LM is read in bf16, what is trained stays
    fp32; a step runs under CPU autocast (LayerNorm's weights follow its input's dtype), and the checkpoint's fp32
    trained tensors load back exactly into a model rebuilt in bf16."""
    m = Flamingo.from_pretrained(lm=assets["lm"][arch], clip_pretrained=assets["clip"], dtype=torch.bfloat16,
                                 train_lm_layers=1, **OPTS)
    assert {p.dtype for p in m.lm.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in m.parameters() if p.requires_grad} == {torch.float32}
    open_gates_(m, 0.5)
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    idx[:, 0] = IMG
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(images_for(2, 0), idx[:, :-1], targets=idx[:, 1:])[1]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(p.grad.dtype == torch.float32 for p in m.parameters() if p.grad is not None)
    m.save_checkpoint(str(tmp_path / "ckpt.pt"))
    m2, _ = Flamingo.from_checkpoint(str(tmp_path), verbose=False, dtype=torch.bfloat16)
    assert m2.lm.transformer.ln_f.weight.dtype == torch.bfloat16
    for k, v in m.trained_state_dict().items():
        assert torch.equal(m2.trained_state_dict()[k], v), k


def test_checkpoint_refuses_mismatch(opened, tmp_path):
    m = opened["llama"]
    path = str(tmp_path / "ckpt.pt")
    m.save_checkpoint(path)
    good = torch.load(path, weights_only=True)
    target = copy.deepcopy(opened["llama"])

    bad = dict(good["model"])
    del bad["xattn.3.ff_gate"]
    torch.save({**good, "model": bad}, path)
    with pytest.raises(ValueError, match=r"xattn\.3\.ff_gate"):
        Flamingo.from_checkpoint(path, verbose=False)

    bad = dict(good["model"], **{"xattn.5.attn_gate": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"xattn\.5\.attn_gate"):
        target.load_trained(bad)

    bad = dict(good["model"], **{"perceiver.latents": torch.zeros(9, 48)})
    with pytest.raises(ValueError, match=r"perceiver\.latents"):
        target.load_trained(bad)
    # a refused checkpoint changed nothing
    assert all(torch.equal(v, m.trained_state_dict()[k]) for k, v in target.trained_state_dict().items())


# -----------------------------------------------------------------------------
# 8. Bad input


def test_bad_input(opened):
    m = opened["llama"]
    idx = torch.tensor([[1, IMG, 2, IMG, 3], [4, 5, IMG, 6, 7]])
    for n in (2, 4):
        with pytest.raises(ValueError, match="<image>"):
            logits_of(m, images_for(n, 0), idx)
        for beams in (1, 3):
            with pytest.raises(ValueError, match="<image>"):
                m.generate(images_for(n, 0), idx, 2, temperature=0, num_beams=beams)
    with pytest.raises(ValueError, match="<image>"):
        logits_of(m, None, idx)
    with pytest.raises(ValueError, match="<image>"):
        logits_of(m, images_for(1, 0), idx.clamp(max=V - 1))
    with pytest.raises(ValueError, match="N, F, 3, H, W"):
        logits_of(m, images_for(3, 0)[:, 0], idx)  # (N, 3, H, W): the frame axis is missing
    # text only, without images
    txt = idx.clamp(max=V - 1)
    (logits, _), (none, loss) = m(None, txt), m(None, txt, targets=txt)
    assert logits.shape == (2, 5, V + 2) and none is None and torch.isfinite(loss)
    assert m.generate(None, txt, 3, num_beams=2).shape[0] == 2
