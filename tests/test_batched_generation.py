"""Prompts of different lengths in one batch (generation.py): left-padded, each row with its own positions and no
token attending to padding, so that every row generates exactly what it generates alone. For each LM family (GPT-2's
learned positions, Llama's RoPE, MPT's ALiBi, GPT-NeoX's partial RoPE), with rows of 1 to 5 images and text before
the first image. CPU, tiny random models, no files."""

import pytest
import torch

from lm import KVCache, LMConfig, attention_mask, row_positions
from model import Flamingo, FlamingoConfig
from vision import register_clip_configs

V = 300
IMG, EOC = V, V + 1
LM_CONFIGS = {
    "gpt2": LMConfig(arch="gpt2", vocab_size=V, n_layer=3, n_head=4, n_embd=64, block_size=128),
    "llama": LMConfig(arch="llama", vocab_size=V, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, bias=False,
                      tie_word_embeddings=False),
    "mpt": LMConfig(arch="mpt", vocab_size=V, n_layer=3, n_head=4, n_embd=64, block_size=128, bias=False,
                    tie_word_embeddings=False),  # untied: a tied random head repeats its last token forever
    "neox": LMConfig(arch="neox", vocab_size=V, n_layer=3, n_head=4, n_embd=64, rotary_pct=0.25,
                     parallel_residual=True, tie_word_embeddings=False),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models():
    """A tiny Flamingo per LM family, all weights random and far from their starting values, gates open."""
    register_clip_configs()
    out = {}
    for i, (arch, lm_cfg) in enumerate(LM_CONFIGS.items()):
        torch.manual_seed(i)
        cfg = FlamingoConfig(clip="flamingo-tiny", cross_attn_every_n_layers=1, resampler_depth=1, num_latents=4,
                             resampler_heads=2, resampler_dim_head=16, xattn_heads=2, xattn_dim_head=16)
        m = Flamingo.from_config(cfg, lm_cfg).eval()
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.startswith("vision."):
                    continue
                r = torch.randn(p.shape, generator=g)
                p.copy_(r * 0.3 if p.ndim >= 2 else (0.5 + 0.2 * r if name.endswith("_gate") else
                                                      1 + 0.1 * r if name.endswith("weight") else 0.1 * r))
        out[arch] = m
    return out


def prompts_and_images():
    """Four prompts of 6 to 23 tokens with 1 to 5 images, one with text before its first image; the images of
    all prompts in order, and each prompt's own."""
    g = torch.Generator().manual_seed(7)
    layouts = [[IMG, 5, 9, 11, 2, 8],                                          # 1 image, first
               [4, 8, 15, 16, IMG, 23, 42, EOC, IMG, 7, 3],                    # text before the first image, 2 images
               [IMG, 1, 2, EOC, IMG, 3, 4, EOC, IMG, 5, 6, EOC, IMG, 9],       # 4 images
               [IMG, 10, EOC, IMG, 11, EOC, IMG, 12, 13, EOC, IMG, 14, EOC, IMG, 15, 16, 17, 18, 19, 20, 21, 22,
                23]]                                                           # 5 images
    prompts = [[t if t in (IMG, EOC) else int(torch.randint(0, V, (1,), generator=g)) for t in p] for p in layouts]
    counts = [p.count(IMG) for p in prompts]
    images = torch.randn(sum(counts), 1, 3, 32, 32, generator=g)
    starts = [sum(counts[:b]) for b in range(len(prompts))]
    return prompts, images, [images[s:s + c] for s, c in zip(starts, counts)]


@pytest.mark.parametrize("arch", list(LM_CONFIGS))
def test_padded_rows_give_the_logits_they_give_alone(models, arch):
    """forward with an attention mask: each left-padded row's logits, at its real tokens, are its logits alone."""
    m = models[arch]
    prompts, images, per_row = prompts_and_images()
    T = max(map(len, prompts))
    idx = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        batched = m(images, idx, attention_mask=mask)[0]
        for b, p in enumerate(prompts):
            alone = m(per_row[b], torch.tensor([p]))[0][0]
            torch.testing.assert_close(batched[b, T - len(p):], alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())
        assert torch.isfinite(batched).all()  # padding tokens too: no NaN to spread


@pytest.mark.parametrize("arch", list(LM_CONFIGS))
@pytest.mark.parametrize("beams", [1, 3])
def test_each_row_generates_what_it_generates_alone(models, arch, beams):
    m = models[arch]
    prompts, images, per_row = prompts_and_images()
    batched = m.generate(images, prompts, 8, temperature=0, num_beams=beams)
    assert len(batched) == len(prompts)
    for b, p in enumerate(prompts):
        alone = m.generate(per_row[b], [p], 8, temperature=0, num_beams=beams)[0]
        assert batched[b] == alone, (b, batched[b], alone)
        # the tensor form of one prompt gives the same tokens
        full = m.generate(per_row[b], torch.tensor([p]), 8, temperature=0, num_beams=beams)[0, len(p):].tolist()
        assert alone == (full[:full.index(EOC)] if EOC in full else full)
    # the uncached reference path (the whole padded sequence every step) agrees
    assert m.generate(images, prompts, 8, temperature=0, num_beams=beams, use_cache=False) == batched
    assert len({tuple(row) for row in batched}) == len(prompts) and all(batched)  # a real test: four continuations


def test_stopped_rows_are_cut(models):
    """A list of prompts gets each row's new tokens without the stop token; the tensor form pads with it."""
    m = models["llama"]
    prompts, images, _ = prompts_and_images()
    free = m.generate(images, prompts, 6, temperature=0)
    stop = free[1][2]  # row 1's third new token, as the stop token
    cut = m.generate(images, prompts, 6, temperature=0, stop_token_id=stop)
    for b in range(len(prompts)):
        want = free[b][:free[b].index(stop)] if stop in free[b] else free[b]
        assert cut[b] == want
    assert len(cut[1]) == 2


def test_sampling_with_top_k_1_is_greedy_batched(models):
    m = models["mpt"]
    prompts, images, _ = prompts_and_images()
    assert m.generate(images, prompts, 5, temperature=0.8, top_k=1) == m.generate(images, prompts, 5, temperature=0)


def test_bad_prompts(models):
    m = models["gpt2"]
    with pytest.raises(ValueError, match="empty"):
        m.generate(None, [[1, 2], []], 3, temperature=0)
    with pytest.raises(ValueError, match="empty"):
        m.generate(None, [], 3, temperature=0)


def test_kv_cache_is_written_in_place():
    """Allocated once for its size: every update writes into the same storage; past it, the room grows."""
    c = KVCache(size=10)
    k = torch.randn(2, 3, 4, 8)
    c.update(k, k)
    ptr = c._k.data_ptr()
    for _ in range(6):
        c.update(k[:, :, :1], k[:, :, :1])
    assert c._k.data_ptr() == ptr and c.n == 10 and c.k.shape == (2, 3, 10, 8)
    assert torch.equal(c.k[:, :, :4], k) and torch.equal(c.k[:, :, 9], k[:, :, 0])
    c.update(k, k)  # past its size: moved to a larger allocation, contents kept
    assert c.n == 14 and torch.equal(c.k[:, :, :4], k) and torch.equal(c.k[:, :, 10:], k)


def test_attention_mask():
    """Causal, padding keys hidden from real tokens, a padding token attending to itself only; ALiBi's bias."""
    real = torch.tensor([[False, False, True, True], [True, True, True, True]])
    m = attention_mask(4, 0, real)[:, 0]  # (B, T, S)
    assert m[0].tolist() == [[True, False, False, False], [False, True, False, False],
                             [False, False, True, False], [False, False, True, True]]
    assert torch.equal(m[1], torch.ones(4, 4, dtype=torch.bool).tril())
    assert attention_mask(4, 0) is None and attention_mask(1, 5) is None
    assert row_positions(real).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    bias = attention_mask(2, 2, real, slopes=torch.tensor([0.5]))  # 2 new tokens after 2 cached: (B, h, 2, 4)
    assert bias[0, 0].tolist() == [[float("-inf"), float("-inf"), 0.0, float("-inf")],
                                   [float("-inf"), float("-inf"), -0.5, 0.0]]
    assert bias[1, 0].tolist() == [[-1.0, -0.5, 0.0, float("-inf")], [-1.5, -1.0, -0.5, 0.0]]
