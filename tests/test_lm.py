"""The decoder LM against Hugging Face transformers, on tiny random checkpoints the tests write themselves.

Each reference model gets non-trivial random weights (not HF's near-zero init, not norms at exactly 1), so a
missing transpose, a wrong q/k/v or gate/up order, a dropped bias or a wrong rope layout changes the logits.
CPU only, no network.
"""

import copy
import hashlib
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")

from lm import LM, KVCache  # noqa: E402

V = 100  # vocabulary of every tiny model


def randomize(model, seed):
    """Re-draw every parameter: norm weights around 1, everything else N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is listed once
            if p.dim() == 1 and name.endswith("weight"):  # LayerNorm / RMSNorm gains
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def save(model, path, **kw):
    model.save_pretrained(path, **kw)
    return str(path)


def close(ours, theirs):
    """Logits agree to 1e-4 relative to their scale."""
    assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def ids(B=2, T=24, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def tiny_llama_config(**kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=0, eos_token_id=1)
    base.update(kw)
    return transformers.LlamaConfig(**base)


def files_digest(path):
    """{file name: sha256} of a checkpoint directory, to see that loading changes nothing on disk."""
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest() for f in sorted(os.listdir(path))}


def rewrite(src, dst, edit_tensors=None, edit_config=None):
    """Copy a checkpoint into one model.safetensors (+ config.json), editing its tensors or config on the way."""
    os.makedirs(dst)
    sd = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(src, f)))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if edit_tensors:
        edit_tensors(sd)
    if edit_config:
        edit_config(cfg)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


# -----------------------------------------------------------------------------
# Reference checkpoints, written once per module

@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=64,
                                  bos_token_id=0, eos_token_id=1)
    hf = randomize(transformers.GPT2LMHeadModel(cfg), seed=1)
    return save(hf, tmp_path_factory.mktemp("gpt2")), hf


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Llama with grouped-query attention (4 heads, 2 kv heads) and an untied head, saved in shards."""
    torch.manual_seed(0)
    hf = randomize(transformers.LlamaForCausalLM(tiny_llama_config()), seed=2)
    path = save(hf, tmp_path_factory.mktemp("llama"), max_shard_size="40KB")
    return path, hf


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """Qwen2: biases on q, k and v (not on o), tied embeddings."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   bos_token_id=0, eos_token_id=1)
    hf = randomize(transformers.Qwen2ForCausalLM(cfg), seed=3)
    return save(hf, tmp_path_factory.mktemp("qwen2")), hf


LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """Llama-3.1-style rope scaling. With head_dim 16 and theta 1e4 the wavelengths are 2 pi 10^(i/2), i < 8:
    one below original/high_freq_factor = 8 (kept), one between 8 and 32 (interpolated), the rest above (/8)."""
    torch.manual_seed(0)
    cfg = tiny_llama_config(rope_scaling=dict(LLAMA3_ROPE, rope_theta=10000.0))
    hf = randomize(transformers.LlamaForCausalLM(cfg), seed=4)
    return save(hf, tmp_path_factory.mktemp("llama3")), hf


def tiny_mpt_config(**attn):
    """MPT-7B's layout at toy size: ALiBi, no biases, tied embeddings. 6 heads: not a power of two, so the
    slopes take the interleaved branch (MPT-7B's 32 and mpt-1b's 16 heads take the plain one)."""
    return transformers.MptConfig(d_model=48, n_heads=6, n_layers=2, expansion_ratio=4, max_seq_len=64,
                                  vocab_size=V, no_bias=True, attn_config=dict(alibi=True, alibi_bias_max=8, **attn))


@pytest.fixture(scope="module")
def mpt(tmp_path_factory):
    torch.manual_seed(0)
    hf = randomize(transformers.MptForCausalLM(tiny_mpt_config()), seed=5)
    return save(hf, tmp_path_factory.mktemp("mpt")), hf


def tiny_neox_config(**kw):
    """GPT-NeoX at toy size. The default: RedPajama-INCITE-3B's choices (OpenFlamingo-4B's LM): RoPE over whole heads,
    sequential residual, untied head. neox_partial: Pythia's, RoPE over a quarter of each head, parallel residual."""
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, rotary_pct=1.0, use_parallel_residual=False, tie_word_embeddings=False)
    return transformers.GPTNeoXConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    hf = randomize(transformers.GPTNeoXForCausalLM(tiny_neox_config()), seed=6)
    return save(hf, tmp_path_factory.mktemp("neox")), hf


@pytest.fixture(scope="module")
def neox_partial(tmp_path_factory):
    hf = randomize(transformers.GPTNeoXForCausalLM(tiny_neox_config(rotary_pct=0.25, use_parallel_residual=True,
                                                                    rotary_emb_base=500.0)), seed=7)
    return save(hf, tmp_path_factory.mktemp("neox_partial")), hf


MOSAIC_NAMES = {"norm_1": "ln_1", "norm_2": "ln_2", "ffn.up_proj": "mlp.mlp_up", "ffn.down_proj": "mlp.mlp_down",
                "norm_f": "ln_f"}


def to_mosaic_gpt(src, dst, qk_ln=None):
    """The same weights in the older MosaicGPT layout of anas-awadalla/mpt-1b-redpajama-200b (model_type
    "mosaic_gpt", attention settings at the top level with an attn_ prefix, ln_1/mlp.mlp_up names); with
    qk_ln a dict {layer: (q_ln weight, k_ln weight)} of the attn_qk_ln variant that model uses."""
    def tensors(sd):
        for k in list(sd):
            new = k
            for a, b in MOSAIC_NAMES.items():
                new = new.replace(f".{a}.", f".{b}.")
            sd[new] = sd.pop(k)
        sd.pop("lm_head.weight", None)
        for i, (q, k) in (qk_ln or {}).items():
            sd[f"transformer.blocks.{i}.attn.q_ln.weight"] = q
            sd[f"transformer.blocks.{i}.attn.k_ln.weight"] = k

    def config(c):
        att = c.pop("attn_config")
        c.update(model_type="mosaic_gpt", mlp_ratio=c.pop("expansion_ratio"), alibi=att["alibi"],
                 alibi_bias_max=att["alibi_bias_max"], attn_qk_ln=qk_ln is not None, attn_clip_qkv=None)
    return rewrite(src, dst, tensors, config)


# -----------------------------------------------------------------------------
# Logits equal the reference


def test_gpt2_logits_and_loss(gpt2):
    path, hf = gpt2
    lm = LM.from_pretrained(path)
    assert lm.config.arch == "gpt2" and lm.config.tie_word_embeddings
    x = ids(T=40)
    with torch.no_grad():
        close(lm(x)[0], hf(x).logits)
        # HF shifts labels inside; ours takes targets already shifted. -1 (ours) / -100 (HF) are ignored.
        labels = x.clone()
        labels[0, 5:12] = -100
        out = hf(x, labels=labels)
        targets = labels[:, 1:].masked_fill(labels[:, 1:] == -100, -1)
        logits, loss = lm(x[:, :-1], targets=targets)
    close(logits, out.logits[:, :-1])
    assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)


def test_mpt_logits_and_loss(mpt):
    """transformers' MptForCausalLM (the layout of anas-awadalla/mpt-7b): ALiBi, exact GELU, no biases."""
    path, hf = mpt
    lm = LM.from_pretrained(path)
    c = lm.config
    assert (c.arch, c.bias, c.inner, c.tie_word_embeddings, c.qk_ln) == ("mpt", False, 192, True, False)
    assert lm.transformer.wpe is None and lm.lm_head.weight is lm.transformer.wte.weight
    x = ids(T=40)
    with torch.no_grad():
        close(lm(x)[0], hf(x).logits)
        out = hf(x, labels=x)
        assert_close(lm(x[:, :-1], targets=x[:, 1:])[1], out.loss, rtol=1e-5, atol=1e-6)


def test_mpt_older_mosaic_gpt_layout(mpt, tmp_path):
    """The same weights renamed into MosaicGPT's layout load to the same logits. Its attn_qk_ln (mpt-1b has it;
    transformers' MPT does not) is checked against the reference with a LayerNorm put on q and k by a hook."""
    path, hf = mpt
    x = ids(T=40)
    with torch.no_grad():
        close(LM.from_pretrained(to_mosaic_gpt(path, tmp_path / "plain"))(x)[0], hf(x).logits)
        g = torch.Generator().manual_seed(9)
        gains = {i: (1 + 0.3 * torch.randn(48, generator=g), 1 + 0.3 * torch.randn(48, generator=g)) for i in range(2)}
        lm = LM.from_pretrained(to_mosaic_gpt(path, tmp_path / "qk", qk_ln=gains))
        assert lm.config.qk_ln

        def hook(i):  # MosaicGPT: LayerNorm(d_model) on q and on k, before the split into heads
            def f(module, inputs, out):
                q, k, v = out.chunk(3, dim=-1)
                ln = lambda t, w: torch.nn.functional.layer_norm(t, (48,), w, None, 1e-5)
                return torch.cat([ln(q, gains[i][0]), ln(k, gains[i][1]), v], dim=-1)
            return f
        handles = [b.attn.Wqkv.register_forward_hook(hook(i)) for i, b in enumerate(hf.transformer.blocks)]
        try:
            close(lm(x)[0], hf(x).logits)
        finally:
            for h in handles:
                h.remove()


@pytest.mark.parametrize("which,pct,parallel", [("neox", 1.0, False), ("neox_partial", 0.25, True)])
def test_neox_logits_and_loss(which, pct, parallel, request):
    """transformers' GPTNeoXForCausalLM: q, k, v fused per head (de-interleaved on loading), RoPE over all or part
    of each head, sequential or parallel residual, biases everywhere, an untied head."""
    path, hf = request.getfixturevalue(which)
    lm = LM.from_pretrained(path)
    c = lm.config
    assert (c.arch, c.rotary_pct, c.parallel_residual, c.tie_word_embeddings, c.max_context) == \
        ("neox", pct, parallel, False, None)
    x = ids(T=40)
    with torch.no_grad():
        close(lm(x)[0], hf(x).logits)
        assert_close(lm(x[:, :-1], targets=x[:, 1:])[1], hf(x, labels=x).loss, rtol=1e-5, atol=1e-6)


def test_alibi_slopes_match_reference():
    from lm import alibi_slopes
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor
    for n in (4, 6, 16, 32, 12):
        ref = build_mpt_alibi_tensor(n, 2)[:, 0, 0]  # the bias of key 0 seen from key 1: -slope
        assert_close(alibi_slopes(n), -ref)


def test_llama_sharded_gqa_untied(llama):
    path, hf = llama
    files = os.listdir(path)
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) >= 3  # several shards really are read
    lm = LM.from_pretrained(path)
    c = lm.config
    assert (c.arch, c.n_head, c.kv_heads, c.hd, c.norm_eps, c.tie_word_embeddings) == ("llama", 4, 2, 16, 1e-5, False)
    assert lm.lm_head.weight is not lm.transformer.wte.weight
    assert not torch.equal(lm.lm_head.weight, lm.transformer.wte.weight)
    x = ids(T=40)
    with torch.no_grad():
        close(lm(x)[0], hf(x).logits)
        out = hf(x, labels=x)
        assert_close(lm(x[:, :-1], targets=x[:, 1:])[1], out.loss, rtol=1e-5, atol=1e-6)


def test_qwen2_qkv_bias_tied(qwen2):
    path, hf = qwen2
    lm = LM.from_pretrained(path)
    attn = lm.transformer.h[0].attn
    assert attn.c_attn.bias is not None and attn.c_proj.bias is None  # q/k/v biased, o not
    assert attn.c_attn.bias.abs().min() > 0                              # and loaded, not left at zero
    x = ids(T=40)
    with torch.no_grad():
        close(lm(x)[0], hf(x).logits)


def test_llama3_rope_scaling(llama3, tmp_path):
    path, hf = llama3
    lm = LM.from_pretrained(path)
    assert lm.config.rope_scaling["rope_type"] == "llama3"
    # the three bands of Llama-3's rescaling are all exercised (see the fixture)
    wavelen = 2 * math.pi / (10000.0 ** (-torch.arange(0, 16, 2) / 16))
    old, lo, hi = 32, 1.0, 4.0
    assert (wavelen < old / hi).any() and ((wavelen >= old / hi) & (wavelen <= old / lo)).any()
    assert (wavelen > old / lo).any()
    assert_close(lm.inv_freq, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    x = ids(T=100)  # longer than original_max_position_embeddings (32)
    with torch.no_grad():
        ref = hf(x).logits
        close(lm(x)[0], ref)
        # the scaling matters: without it the logits differ
        def unscaled(c):
            c.pop("rope_scaling", None)  # transformers 4.x
            c.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

        plain = LM.from_pretrained(rewrite(path, tmp_path / "plain", edit_config=unscaled))
        assert plain.config.rope_scaling is None
        assert (plain(x)[0] - ref).abs().max() > 1e-2


def test_llama3_rope_scaling_legacy_config(llama3, tmp_path):
    """Configs written by transformers 4.x keep rope_theta at the top and the scaling in rope_scaling."""
    path, hf = llama3

    def legacy(c):
        c.pop("rope_parameters", None)
        c.update(rope_theta=10000.0, rope_scaling=dict(LLAMA3_ROPE))

    lm = LM.from_pretrained(rewrite(path, tmp_path / "legacy", edit_config=legacy))
    x = ids(T=100)
    with torch.no_grad():
        close(lm(x)[0], hf(x).logits)


def test_bin_checkpoints(gpt2, llama, tmp_path):
    """pytorch_model.bin as older checkpoints have it: the original GPT-2 files lack the "transformer." prefix
    and carry causal-mask buffers (attn.bias, attn.masked_bias); old Llama files carry rotary_emb.inv_freq."""
    x = ids()
    for name, (path, hf) in [("gpt2", gpt2), ("llama", llama)]:
        d = tmp_path / name
        d.mkdir()
        shutil.copy(os.path.join(path, "config.json"), d)
        sd = {k: v.clone() for k, v in hf.state_dict().items()}
        if name == "gpt2":
            sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
            for i in range(2):
                sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
                sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        else:
            for i in range(2):
                sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = hf.model.rotary_emb.inv_freq.clone()
        # GPT-2's file predates torch's zip format (it cannot be memory-mapped): written that way here
        torch.save(sd, d / "pytorch_model.bin", _use_new_zipfile_serialization=name != "gpt2")
        lm = LM.from_pretrained(str(d))
        with torch.no_grad():
            close(lm(x)[0], hf(x).logits)


def test_sharded_bin_checkpoint(llama, tmp_path):
    """pytorch_model-0000k-of-0000n.bin shards with pytorch_model.bin.index.json (MPT-7B's layout), read shard by
    shard; with dtype=bfloat16 every floating tensor is cast as its shard is read."""
    path, hf = llama
    shutil.copy(os.path.join(path, "config.json"), tmp_path)
    sd, weight_map = hf.state_dict(), {}
    names = sorted(sd)
    for k in range(3):  # written by hand: recent transformers save only safetensors
        shard = f"pytorch_model-{k + 1:05d}-of-00003.bin"
        torch.save({n: sd[n].clone() for n in names[k::3]}, tmp_path / shard)
        weight_map.update({n: shard for n in names[k::3]})
    with open(tmp_path / "pytorch_model.bin.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    x = ids()
    with torch.no_grad():
        close(LM.from_pretrained(str(tmp_path))(x)[0], hf(x).logits)
    assert all(p.dtype == torch.bfloat16 for p in LM.from_pretrained(str(tmp_path), dtype=torch.bfloat16).parameters())


def test_dtype_and_device_arguments(llama):
    path, hf = llama
    lm = LM.from_pretrained(path, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in lm.parameters())
    assert lm.inv_freq.dtype == torch.float32  # rope angles stay in fp32
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
        assert_close(lm(x)[0].float(), ref, rtol=0.1, atol=0.1 * ref.abs().max().item())


# -----------------------------------------------------------------------------
# Loud failures


@pytest.mark.parametrize("which,key", [
    ("gpt2", "transformer.h.1.attn.c_proj.bias"),
    ("llama", "model.layers.1.self_attn.k_proj.weight"),
    ("llama", "lm_head.weight"),  # untied: the head must be there
])
def test_missing_tensor(which, key, request, tmp_path):
    path, _ = request.getfixturevalue(which)
    bad = rewrite(path, tmp_path / "bad", edit_tensors=lambda sd: sd.pop(key))
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        LM.from_pretrained(bad)


def test_mpt_missing_tensor(mpt, tmp_path):
    bad = rewrite(mpt[0], tmp_path / "bad", edit_tensors=lambda sd: sd.pop("transformer.blocks.1.ffn.up_proj.weight"))
    with pytest.raises(KeyError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight"):
        LM.from_pretrained(bad)


@pytest.mark.parametrize("which,key", [
    ("gpt2", "transformer.h.0.attn.c_attn.lora_A"),
    ("llama", "model.layers.0.self_attn.o_proj.bias"),
    ("qwen2", "model.layers.0.mlp.up_proj.bias"),
    ("mpt", "transformer.blocks.0.attn.Wqkv.bias"),
])
def test_unexpected_tensor(which, key, request, tmp_path):
    path, _ = request.getfixturevalue(which)
    bad = rewrite(path, tmp_path / "bad", edit_tensors=lambda sd: sd.update({key: torch.zeros(64)}))
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        LM.from_pretrained(bad)


@pytest.mark.parametrize("which,key,shape,named", [
    ("gpt2", "transformer.h.0.mlp.c_fc.bias", (255,), "transformer.h.0.mlp.c_fc.bias"),
    ("gpt2", "transformer.h.1.attn.c_proj.weight", (64, 48), "transformer.h.1.attn.c_proj.weight"),
    ("llama", "model.layers.0.mlp.down_proj.weight", (64, 95), "transformer.h.0.mlp.c_proj.weight"),
    # fused tensors: each part is checked, else a part's rows could slide into its neighbour's
    ("llama", "model.layers.1.self_attn.k_proj.weight", (32, 60), "model.layers.1.self_attn.k_proj.weight"),
    ("llama", "model.layers.1.mlp.up_proj.weight", (90, 64), "model.layers.1.mlp.up_proj.weight"),
    ("qwen2", "model.layers.0.self_attn.q_proj.bias", (60,), "model.layers.0.self_attn.q_proj.bias"),
])
def test_misshaped_tensor(which, key, shape, named, request, tmp_path):
    path, _ = request.getfixturevalue(which)
    bad = rewrite(path, tmp_path / "bad", edit_tensors=lambda sd: sd.update({key: torch.zeros(shape)}))
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        LM.from_pretrained(bad)


def test_q_rows_sliding_into_k_is_refused(llama, tmp_path):
    """q with 4 rows too few and k with 4 too many have the right fused size: only per-part checks see it."""
    path, _ = llama

    def slide(sd):
        p = "model.layers.0.self_attn."
        q, k = sd[p + "q_proj.weight"], sd[p + "k_proj.weight"]
        sd[p + "q_proj.weight"], sd[p + "k_proj.weight"] = q[:-4], torch.cat([q[-4:], k])

    with pytest.raises(ValueError, match=r"q_proj\.weight"):
        LM.from_pretrained(rewrite(path, tmp_path / "bad", edit_tensors=slide))


@pytest.mark.parametrize("which,field,named", [("gpt2", "n_embd", "transformer.wte.weight"),
                                               ("llama", "hidden_size", "model.layers.0.self_attn.q_proj.weight")])
def test_config_disagrees_with_weights(which, field, named, request, tmp_path):
    path, _ = request.getfixturevalue(which)
    bad = rewrite(path, tmp_path / "bad", edit_config=lambda c: c.update({field: 32}))
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        LM.from_pretrained(bad)


def test_unsupported_config_refused(gpt2, llama, qwen2, tmp_path):
    """Settings the LM does not implement are refused, not silently ignored."""
    cases = [(gpt2[0], {"scale_attn_by_inverse_layer_idx": True}), (gpt2[0], {"scale_attn_weights": False}),
             (gpt2[0], {"activation_function": "relu"}), (llama[0], {"hidden_act": "gelu"}),
             (llama[0], {"mlp_bias": True}), (llama[0], {"attention_bias": True}),  # Llama's: o_proj biased too
             (llama[0], {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}),
             (llama[0], {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}),
             (qwen2[0], {"use_sliding_window": True, "sliding_window": 8}), (llama[0], {"model_type": "falcon"})]
    for i, (path, change) in enumerate(cases):
        bad = rewrite(path, tmp_path / str(i), edit_config=lambda c: c.update(change))
        with pytest.raises(NotImplementedError):
            LM.from_pretrained(bad)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        LM.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": V, "n_layer": 1,
                                                               "n_head": 1, "n_embd": 8, "n_positions": 8}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LM.from_pretrained(str(tmp_path / "empty"))


# -----------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("which", ["gpt2", "llama", "mpt", "neox_partial"])
def test_kv_cache_matches_full_pass(which, request):
    path, _ = request.getfixturevalue(which)
    lm = LM.from_pretrained(path)
    x = ids(T=30, seed=5)
    P = 11  # cached prefix
    with torch.no_grad():
        full = lm(x)[0]

        # (a) prefix, then one token at a time
        caches = [KVCache() for _ in range(lm.config.n_layer)]
        steps = [lm(x[:, :P], caches=caches)[0]]
        for t in range(P, x.shape[1]):
            steps.append(lm(x[:, t:t + 1], caches=caches)[0])
        close(torch.cat(steps, dim=1), full)
        assert all(c.k.shape[2] == x.shape[1] for c in caches)
        assert caches[0].k.shape[1] == lm.config.kv_heads  # the cache holds kv heads, not repeated ones

        # (b) prefix, then chunks of several tokens (causal inside the chunk), then a single token
        caches = [KVCache() for _ in range(lm.config.n_layer)]
        parts = [lm(x[:, :P], caches=caches)[0]]
        for a, b in [(P, P + 7), (P + 7, P + 8), (P + 8, x.shape[1])]:
            parts.append(lm(x[:, a:b], caches=caches)[0])
        close(torch.cat(parts, dim=1), full)


# -----------------------------------------------------------------------------
# The loader leaves its inputs alone; tied heads stay tied


def test_from_pretrained_mutates_nothing_and_ties(qwen2, llama3):
    for path, _ in (qwen2, llama3):
        before = files_digest(path)
        with open(os.path.join(path, "config.json")) as f:
            hf_cfg = json.load(f)
        kept = copy.deepcopy(hf_cfg)
        cfg = LM.config_from_hf(hf_cfg)
        assert hf_cfg == kept
        if cfg.rope_scaling is not None:  # the LMConfig holds its own copy of nested settings
            cfg.rope_scaling["factor"] = 2.0
            assert hf_cfg == kept
        LM.from_pretrained(path)
        assert files_digest(path) == before
    legacy = {**hf_cfg, "rope_scaling": dict(LLAMA3_ROPE), "rope_theta": 10000.0}  # as transformers 4.x wrote it
    legacy.pop("rope_parameters")
    kept = copy.deepcopy(legacy)
    LM.config_from_hf(legacy).rope_scaling["factor"] = 2.0
    assert legacy == kept
    # qwen2 is tied: one Parameter, so training the embedding trains the head
    lm = LM.from_pretrained(qwen2[0])
    assert lm.lm_head.weight is lm.transformer.wte.weight
    assert len(list(lm.parameters())) == len(dict(lm.named_parameters(remove_duplicate=False))) - 1
    fresh = LM(lm.config)  # a model built from a config is tied too
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
