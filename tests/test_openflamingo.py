"""Flamingo.from_openflamingo: an OpenFlamingo checkpoint.pt, written here from the published key list (hf.py)
for a tiny MPT with MPT-7B's vocabulary (50432 padded rows, resized by OpenFlamingo to 50280), loads with every
tensor in its place; missing, extra or mis-shaped tensors are refused by name. CPU, no network."""

import re

import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")

from hf import OPENFLAMINGO, openflamingo_file  # noqa: E402
from model import Flamingo  # noqa: E402

C, D, LAYERS, EVERY, DEPTH, R, INNER = 32, 48, 4, 2, 2, 5, 128  # D: flamingo-tiny's ViT width; INNER = 2 heads x 64


@pytest.fixture(scope="module")
def mpt_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.MptConfig(d_model=C, n_heads=4, n_layers=LAYERS, expansion_ratio=4, max_seq_len=128,
                                 vocab_size=50432, no_bias=True, attn_config=dict(alibi=True, alibi_bias_max=8))
    hf = transformers.MptForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("mpt")
    hf.save_pretrained(path)
    return str(path), hf


def openflamingo_state_dict(seed=0, gates=0.5):
    """The trained parts and the resized input embedding, named as OpenFlamingo's checkpoint.pt names them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1
    sd = {"perceiver.latents": r(R, D), "perceiver.norm.weight": 1 + r(D), "perceiver.norm.bias": r(D)}
    for i in range(DEPTH):
        p = f"perceiver.layers.{i}."
        for n in ("norm_media", "norm_latents"):
            sd[p + f"0.{n}.weight"], sd[p + f"0.{n}.bias"] = 1 + r(D), r(D)
        sd[p + "0.to_q.weight"], sd[p + "0.to_kv.weight"], sd[p + "0.to_out.weight"] = r(INNER, D), r(2 * INNER, D), r(D, INNER)
        sd[p + "1.0.weight"], sd[p + "1.0.bias"] = 1 + r(D), r(D)
        sd[p + "1.1.weight"], sd[p + "1.3.weight"] = r(4 * D, D), r(D, 4 * D)
    for i in range(EVERY - 1, LAYERS, EVERY):
        p = f"lang_encoder.transformer.blocks.{i}.gated_cross_attn_layer."
        sd[p + "attn_gate"], sd[p + "ff_gate"] = torch.tensor([gates]), torch.tensor([gates])
        sd[p + "attn.norm.weight"], sd[p + "attn.norm.bias"] = 1 + r(C), r(C)
        sd[p + "attn.to_q.weight"], sd[p + "attn.to_kv.weight"], sd[p + "attn.to_out.weight"] = r(INNER, C), r(2 * INNER, D), r(C, INNER)
        sd[p + "ff.0.weight"], sd[p + "ff.0.bias"] = 1 + r(C), r(C)
        sd[p + "ff.1.weight"], sd[p + "ff.3.weight"] = r(4 * C, C), r(C, 4 * C)
    sd["lang_encoder.transformer.wte.weight"] = r(50280, C)
    return sd


def load(tmp_path, mpt_dir, sd, name="checkpoint.pt"):
    torch.save(sd, tmp_path / name)
    return Flamingo.from_openflamingo(str(tmp_path / name), mpt_dir[0], clip="flamingo-tiny", clip_pretrained=None,
                                      verbose=False)


def with_twins(sd):
    """OpenFlamingo's LM also lists its gated blocks as lang_encoder.gated_cross_attn_layers.{i}: a checkpoint may
    carry both names of the same tensors."""
    twins = {re.sub(r"transformer\.blocks\.(\d+)\.gated_cross_attn_layer", r"gated_cross_attn_layers.\1", k): v
             for k, v in sd.items() if "gated_cross_attn_layer." in k}
    return {**sd, **twins}


@pytest.mark.parametrize("prefix,twins", [("", False), ("module.", False), ("", True)])
def test_every_tensor_in_its_place(tmp_path, mpt_dir, prefix, twins):
    sd = openflamingo_state_dict()
    model = load(tmp_path, mpt_dir, {prefix + k: v for k, v in (with_twins(sd) if twins else sd).items()})
    c = model.config
    assert (c.cross_attn_every_n_layers, c.resampler_depth, c.num_latents, c.resampler_heads, c.xattn_heads) == \
        (EVERY, DEPTH, R, 2, 2)
    assert sorted(model.xattn) == ["1", "3"] and not c.vision_ln_post and c.max_num_frames == 0
    # OpenFlamingo's ids: GPT-NeoX's 50277 tokens, then <|endofchunk|>, <image>, <PAD>
    assert (model.lm.config.vocab_size, model.eoc_token_id, model.media_token_id) == (50277, 50277, 50278)
    wte = sd["lang_encoder.transformer.wte.weight"]
    assert torch.equal(model.lm.transformer.wte.weight, wte[:50277])
    assert torch.equal(model.new_wte, wte[50277:]) and model.new_lm_head is model.new_wte
    assert model.lm.lm_head.weight is model.lm.transformer.wte.weight  # MPT ties its head
    assert torch.equal(model.perceiver.layers[1][0].to_kv.weight, sd["perceiver.layers.1.0.to_kv.weight"])
    assert torch.equal(model.perceiver.layers[0][1][3].weight, sd["perceiver.layers.0.1.3.weight"])
    p = "lang_encoder.transformer.blocks.3.gated_cross_attn_layer."
    assert torch.equal(model.xattn["3"].attn.to_q.weight, sd[p + "attn.to_q.weight"])
    assert torch.equal(model.xattn["3"].ff[0].bias, sd[p + "ff.0.bias"])
    assert torch.equal(model.xattn["1"].attn_gate, sd[p.replace("3", "1") + "attn_gate"])
    x = torch.tensor([[50278, 5, 6, 7, 50277, 50278, 8, 9]])
    logits, _ = model(torch.randn(2, 1, 3, 32, 32), x)
    assert logits.shape == (1, 8, 50280) and torch.isfinite(logits).all()


def test_gates_closed_give_the_resized_mpt(tmp_path, mpt_dir):
    """With both gates of every block at 0 the model is OpenFlamingo's LM alone: transformers' MPT with its table
    resized to 50280 rows and set to the checkpoint's (tied head), whatever the images."""
    sd = openflamingo_state_dict(gates=0.0)
    model = load(tmp_path, mpt_dir, sd).eval()
    ref = transformers.MptForCausalLM(mpt_dir[1].config).eval()
    ref.load_state_dict(mpt_dir[1].state_dict())
    ref.resize_token_embeddings(50280)
    with torch.no_grad():
        ref.transformer.wte.weight.copy_(sd["lang_encoder.transformer.wte.weight"])
        x = torch.tensor([[50278, 11, 12, 13, 14, 50277, 50278, 15, 16, 17]])
        ours = model(torch.randn(2, 1, 3, 32, 32), x)[0]
        want = ref(x).logits
    assert_close(ours, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_missing_extra_misshaped_refused(tmp_path, mpt_dir):
    base = openflamingo_state_dict()
    key = "lang_encoder.transformer.blocks.1.gated_cross_attn_layer.ff.3.weight"
    cases = [
        ({k: v for k, v in base.items() if k != key}, ValueError, "xattn.1.ff.3.weight"),
        ({**base, "perceiver.layers.0.0.extra.weight": torch.zeros(3)}, ValueError, "perceiver.layers.0.0.extra.weight"),
        ({**base, "lang_encoder.transformer.blocks.0.attn.Wqkv.weight": torch.zeros(3)}, KeyError,
         "lang_encoder.transformer.blocks.0.attn.Wqkv.weight"),
        ({**base, "perceiver.latents": torch.zeros(R, D + 1)}, (ValueError, RuntimeError), "perceiver"),
        ({**base, "lang_encoder.transformer.wte.weight": torch.zeros(50280, C + 1)}, ValueError, "wte"),
        ({k: v for k, v in base.items() if not k.endswith("wte.weight")}, KeyError, "wte"),
        ({**with_twins(base), "lang_encoder.gated_cross_attn_layers.3.ff_gate": torch.tensor([9.0])}, ValueError,
         "lang_encoder.gated_cross_attn_layers.3.ff_gate"),
    ]
    for i, (sd, err, named) in enumerate(cases):
        with pytest.raises(err, match=re.escape(named)):
            load(tmp_path, mpt_dir, sd, name=f"bad{i}.pt")


def test_hub_names_and_offline_message(tmp_path, monkeypatch):
    assert OPENFLAMINGO["openflamingo/OpenFlamingo-9B-vitl-mpt7b"] == "anas-awadalla/mpt-7b"
    with pytest.raises(FileNotFoundError):
        openflamingo_file(str(tmp_path / "nothing.pt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="huggingface-cli download openflamingo/OpenFlamingo-9B-vitl-mpt7b"):
        openflamingo_file("openflamingo/OpenFlamingo-9B-vitl-mpt7b")


def test_sample_py_runs_an_openflamingo_checkpoint(tmp_path, mpt_dir):
    """sample.py with a local checkpoint.pt, its LM's directory (with a GPT-NeoX-layout tokenizer.json) and a
    tiny CLIP; and with a hub name while offline, a message saying what to download instead of a traceback."""
    import os
    import shutil
    import subprocess
    import sys

    import numpy as np
    from PIL import Image
    from test_tokenizer import neox_like

    lm = tmp_path / "lm"
    shutil.copytree(mpt_dir[0], lm)
    neox_like(lm)  # writes lm/tokenizer.json
    torch.save(openflamingo_state_dict(), tmp_path / "checkpoint.pt")
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "cat.png")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = lambda *a: subprocess.run([sys.executable, os.path.join(root, "sample.py"), *a], capture_output=True,
                                    text=True, cwd=tmp_path, env=env, timeout=300)
    r = run(f"--init_from={tmp_path / 'checkpoint.pt'}", f"--lm={lm}", "--clip=flamingo-tiny", "--clip_pretrained=None",
            "--image", "cat.png", "--max_new_tokens=5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()  # five tokens of a random model: something was printed
    # the LM read in bf16, the trained parts in fp32, generation under autocast
    r = run(f"--init_from={tmp_path / 'checkpoint.pt'}", f"--lm={lm}", "--clip=flamingo-tiny", "--clip_pretrained=None",
            "--image", "cat.png", "--max_new_tokens=5", "--dtype=bfloat16")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    # MPT's max_seq_len (128 here, 2048 for the released models) is a hard end, as in MosaicML's code
    r = run(f"--init_from={tmp_path / 'checkpoint.pt'}", f"--lm={lm}", "--clip=flamingo-tiny", "--clip_pretrained=None",
            "--image", "cat.png", "--prompt", "<image>" + " the cat" * 200)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "this LM reads at most 128" in r.stderr
    r = run("--init_from=openflamingo/OpenFlamingo-9B-vitl-mpt7b", "--image", "cat.png")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "huggingface-cli download openflamingo/OpenFlamingo-9B-vitl-mpt7b" in r.stderr


def test_hub_names_read_from_the_hub_cache(tmp_path, mpt_dir):
    """sample.py --init_from=openflamingo/<name> finds the checkpoint and its LM (tokenizer.json included) where
    `huggingface-cli download` leaves them: the hub cache, here written by hand in its layout and read offline."""
    import os
    import shutil
    import subprocess
    import sys

    import numpy as np
    from PIL import Image
    from test_tokenizer import neox_like

    def cached(repo):  # <cache>/models--<org>--<name>/snapshots/<commit>/, refs/main naming that commit
        root = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text("0" * 40)
        return root / "snapshots" / ("0" * 40)

    name = "openflamingo/OpenFlamingo-9B-vitl-mpt7b"
    ckpt_dir = cached(name)
    ckpt_dir.mkdir(parents=True)
    torch.save(openflamingo_state_dict(), ckpt_dir / "checkpoint.pt")
    lm = cached(OPENFLAMINGO[name])
    shutil.copytree(mpt_dir[0], lm)
    neox_like(lm)
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "cat.png")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = subprocess.run([sys.executable, os.path.join(root, "sample.py"), f"--init_from={name}", "--clip=flamingo-tiny",
                        "--clip_pretrained=None", "--image", "cat.png", "--max_new_tokens=3"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()


def test_finetune_an_openflamingo_checkpoint_on_a_folder(tmp_path, mpt_dir):
    """train.py fine-tunes a local OpenFlamingo checkpoint.pt on a folder (train_lm_layers=1): the checkpoint it
    writes rebuilds through from_checkpoint, with the trained parts (and the LM's top layer) moved, nothing else."""
    import shutil
    import subprocess
    import sys

    import shapes
    from test_tokenizer import neox_like
    from test_train import ENV, ROOT

    lm = tmp_path / "lm"
    shutil.copytree(mpt_dir[0], lm)
    neox_like(lm)
    torch.save(openflamingo_state_dict(), tmp_path / "checkpoint.pt")
    folder = shapes.write_folder(str(tmp_path / "folder"), "vqa", n_train=12, n_test=4, task_kind="size")
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", "config/finetune_folder.py", f"--init_from={tmp_path / 'checkpoint.pt'}",
           f"--lm={lm}", "--clip=flamingo-tiny", "--clip_pretrained=None", f"--data_dir={folder}",
           f"--out_dir={out}", "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--batch_size=2",
           "--train_lm_layers=1"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    ft, ckpt = Flamingo.from_checkpoint(str(out), verbose=False)
    assert ft.config.openflamingo and ft.config.train_lm_layers == 1 and ckpt["config"]["tokenizer"] == str(lm)
    before = dict(load(tmp_path, mpt_dir, openflamingo_state_dict()).named_parameters())
    top = f"lm.transformer.h.{LAYERS - 1}."
    for k, v in ft.named_parameters():
        if k.startswith("vision."):
            continue  # a random tower here (clip_pretrained=None): each build draws its own, the checkpoint keeps it
        trained = k.startswith(("perceiver.", "xattn.", "new_", top))
        assert torch.equal(v, before[k]) != trained, (k, trained)


def openflamingo_base(tmp_path, arch):
    """The files OpenFlamingo's create_model_and_transforms builds on: a tiny LM (an MPT, or a GPT-NeoX with
    RedPajama-INCITE-3B's choices) with a GPT-NeoX-like tokenizer, and a tiny CLIP's weights. -> their paths."""
    import json
    import open_clip

    from vision import register_clip_configs
    from test_tokenizer import neox_like

    torch.manual_seed(0)
    lm = tmp_path / "lm"
    if arch == "mpt":
        cfg = transformers.MptConfig(d_model=C, n_heads=4, n_layers=LAYERS, expansion_ratio=4, max_seq_len=128,
                                     vocab_size=50432, no_bias=True, attn_config=dict(alibi=True, alibi_bias_max=8))
        transformers.MptForCausalLM(cfg).save_pretrained(lm)
    else:
        cfg = transformers.GPTNeoXConfig(vocab_size=50432, hidden_size=C, intermediate_size=4 * C,
                                         num_hidden_layers=LAYERS, num_attention_heads=4, rotary_pct=1.0,
                                         use_parallel_residual=False, tie_word_embeddings=False)
        hf = transformers.GPTNeoXForCausalLM(cfg)
        with torch.no_grad():  # biases and norms away from 0 and 1, so that a dropped or misplaced one shows
            for n, p in hf.named_parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn(p.shape))
        hf.save_pretrained(lm)
    neox_like(lm)  # lm/tokenizer.json; AutoTokenizer reads it as a fast tokenizer through this config
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"},
              open(lm / "tokenizer_config.json", "w"))
    register_clip_configs()
    clip = open_clip.create_model("flamingo-tiny")
    with torch.no_grad():  # a trained tower's final norm is no identity: this makes "before ln_post" matter
        clip.visual.ln_post.weight.add_(torch.randn(D) * 0.5)
        clip.visual.ln_post.bias.add_(torch.randn(D) * 0.5)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    return str(lm), str(tmp_path / "clip.pt")


@pytest.mark.parametrize("arch", ["mpt", "neox"])
def test_same_logits_as_openflamingos_own_code(tmp_path, arch):
    """OpenFlamingo 2.0.1's own code (pip install --no-deps -r requirements-reference.txt) builds a model from a
    tiny CLIP and a tiny LM with its create_model_and_transforms: an MPT (the 3B and 9B models) or a GPT-NeoX
    with RedPajama-INCITE-3B's choices (the 4B models). Its trained parts, drawn at random with the gates open,
    are saved as its checkpoint.pt. from_openflamingo, given the same local files, gives the same logits, for
    rows with 1 to 3 images and text before the first one (OpenFlamingo pads the images of a batch to the most
    any row has; we encode only real ones)."""
    open_flamingo = pytest.importorskip("open_flamingo")
    lm, clip = openflamingo_base(tmp_path, arch)
    ref, _, tok = open_flamingo.create_model_and_transforms("flamingo-tiny", clip, lm, lm, cross_attn_every_n_layers=EVERY)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the trained parts and the input embedding, all drawn afresh: gates open, norms near 1
        for name, p in ref.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith("_gate"):
                p.copy_(torch.rand(1, generator=g) * 2 - 1)
            elif "norm" in name or name.endswith(("ff.0.weight", "1.0.weight")):  # LayerNorms: weight ~1, bias ~0
                p.copy_((p.ndim == 1) * (1 if name.endswith("weight") else 0) + torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    trained = {k for k, p in ref.named_parameters() if p.requires_grad}
    torch.save({k: v for k, v in ref.state_dict().items() if k in trained}, tmp_path / "checkpoint.pt")
    # OpenFlamingo's models were trained on open_clip's patch tokens before ln_post (open_clip < 2.23); the
    # open_clip installed now normalises them first, so the reference's tower drops ln_post to see them as then
    ref.vision_encoder.ln_post = torch.nn.Identity()
    ref.eval()

    ours = Flamingo.from_openflamingo(str(tmp_path / "checkpoint.pt"), lm, clip="flamingo-tiny", clip_pretrained=clip,
                                      verbose=False).eval()
    if arch == "neox":  # its untied head's rows for the new tokens: drawn when OpenFlamingo resized it, never saved
        V = ours.lm.config.vocab_size
        with torch.no_grad():
            ours.new_lm_head.copy_(ref.lang_encoder.get_output_embeddings().weight[V:])
    image = tok.encode("<image>")[-1]
    assert (ours.media_token_id, ours.eoc_token_id) == (image, tok.encode("<|endofchunk|>")[-1])
    rows = ["<image>a red circle<|endofchunk|><image>two squares<|endofchunk|><image>and a",
            "text before any image <image>the blue one<|endofchunk|> and <image>the",
            "<image>" + " the lazy dog" * 6]
    images = torch.randn(len(rows), 3, 1, 3, 32, 32)  # (B, T_img, F, 3, H, W): 3 slots, the spare ones padding
    for b, text in enumerate(rows):
        x = torch.tensor([tok(text)["input_ids"]])
        n = int((x == image).sum())
        with torch.no_grad():
            want = ref(images[b:b + 1], x).logits
            got = ours(images[b, :n], x)[0]                   # (n, F, 3, H, W): the row's images only
        assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
