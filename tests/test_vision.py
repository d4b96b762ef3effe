"""The vision encoder (vision.VisionEncoder) with an open_clip ResNet tower, and the shapes world's stage-1
vision training (pretrain_shapes.py). CPU, no network, tiny sizes."""

import json

import numpy as np
import pytest
import torch

import pretrain_shapes
import shapes
from lm import LM, LMConfig
from model import Flamingo
from tokenizer import get_tokenizer
from vision import VisionEncoder


def test_resnet_stage_grid():
    """shapes-rn up to stage 2 gives the 8 x 8 feature map as 64 tokens, equal to open_clip's own blocks
    run by hand; the stages after it and the attention pool are gone (no dead frozen weights)."""
    torch.manual_seed(0)
    enc = VisionEncoder("shapes-rn", stage=2).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = enc(x)
        v = enc.visual
        ref = v.layer2(v.layer1(v.stem(x)))                         # (3, C, 8, 8)
    assert enc.width == ref.shape[1] == out.shape[-1]
    assert out.shape == (3, 64, enc.width)
    assert torch.equal(out, ref.flatten(2).transpose(1, 2))
    # token s is pixel row s // 8, column s % 8 of the map
    assert torch.equal(out[:, 8 * 2 + 5], ref[:, :, 2, 5])
    names = [n for n, _ in enc.named_parameters()]
    assert not any(n.startswith(("visual.layer3", "visual.layer4", "visual.attnpool")) for n in names)
    last = VisionEncoder("shapes-rn")  # default: the last stage, a 2 x 2 map for 64 px
    assert last(x).shape == (3, 4, last.width) and last.width == 32 * 16


def test_stage_errors():
    with pytest.raises(ValueError, match="1..4"):
        VisionEncoder("shapes-rn", stage=5)
    with pytest.raises(ValueError, match="ResNet"):
        VisionEncoder("shapes-vit", stage=2)


def test_patch_labels():
    scene = dict(background=10, objects=[dict(shape="square", color="red", size="large", cell=0, cx=11, cy=11)])
    y = pretrain_shapes.patch_labels(scene, 8)                       # (64, 4)
    # the 18 px square covers pixels 2..19: patches (0..2, 0..2) hold at least 10% of it
    on = y[:, 0].reshape(8, 8) > 0
    assert on[:3, :3].all() and on.sum() == 9
    assert tuple(y[0]) == (1 + shapes.SHAPES.index("square"), 1 + list(shapes.COLORS).index("red"),
                           1 + list(shapes.SIZES).index("large"), 0)
    assert tuple(y[63]) == (0, 0, 0, 8)  # background patch at the bottom right: its own cell


def test_pretrained_vision_loads_as_open_clip_weights(tmp_path):
    """Stage 1 saves a whole open_clip checkpoint; loaded back with clip_pretrained it gives the features of the
    tower it trained, and a Flamingo built on it (and rebuilt from its checkpoint) uses exactly those."""
    path = str(tmp_path / "vision.safetensors")
    enc = pretrain_shapes.pretrain_vision(path, "shapes-rn", 2, iters=3, batch_size=4, log=lambda *_: None)
    again = VisionEncoder("shapes-rn", path, stage=2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(enc.eval()(x), again.eval()(x))
    before = {k: v.clone() for k, v in again.state_dict().items()}
    assert any(not torch.equal(v, VisionEncoder("shapes-rn", stage=2).state_dict()[k]) for k, v in before.items())

    lm_dir = str(tmp_path / "lm")
    LM(LMConfig(arch="gpt2", vocab_size=257, n_layer=2, n_head=2, n_embd=32, block_size=64)).save_pretrained(lm_dir)
    model = Flamingo.from_pretrained(lm=lm_dir, clip="shapes-rn", clip_pretrained=path, vision_stage=2,
                                     resampler_depth=1, num_latents=4, resampler_heads=2, resampler_dim_head=8,
                                     xattn_heads=2, xattn_dim_head=8, verbose=False)
    model.train()
    assert not model.vision.training  # frozen BatchNorm statistics stay frozen in training
    model.save_checkpoint(str(tmp_path / "ckpt.pt"))
    model2, _ = Flamingo.from_checkpoint(str(tmp_path), verbose=False)
    assert model2.config.vision_stage == 2
    for k, v in model2.vision.state_dict().items():
        assert torch.equal(v, before[k]), k
    img = shapes.render(shapes.random_scene(np.random.default_rng(0)), np.random.default_rng(0))
    idx = torch.tensor([[257, 5, 6, 7]])
    pix = (torch.from_numpy(img).permute(2, 0, 1).float() / 255)[None, None]
    with torch.no_grad():
        assert torch.equal(model.eval()(pix, idx)[0], model2.eval()(pix, idx)[0])


def test_pretrained_lm_embeddings_start_large(tmp_path, monkeypatch):
    """Stage 1's LM starts its token embeddings at N(0, embedding_std) (pretrain_shapes.py says why), and what
    it saves loads back through LM.from_pretrained."""
    seen = {}
    real_init = torch.optim.AdamW.__init__

    def spy(self, params, *a, **k):  # the embedding table as the optimizer first sees it, before any step
        params = list(params)
        seen["wte"] = [p.detach().clone() for p in params if p.dim() == 2 and p.shape[1] == 32][0]
        real_init(self, params, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", spy)
    lm = pretrain_shapes.pretrain_lm(str(tmp_path / "lm"), "bytes", iters=1, batch_size=2, block_size=64,
                                     n_layer=1, n_embd=32, n_head=2, log=lambda *_: None)
    assert abs(seen["wte"].std().item() - 0.25) < 0.02  # nanoGPT's init would give 0.02
    again = LM.from_pretrained(str(tmp_path / "lm"))
    assert torch.equal(again.transformer.wte.weight, lm.transformer.wte.weight)


def test_question_words_name_what_each_question_asks():
    """Stage 1's second loss: at the ":" of each "Short answer:", the color and shape words of that question only."""
    tok = get_tokenizer("shapes")
    text = ("<image>Output:a large red circle at the top.<|endofchunk|><image>Question:is there a green square? "
            "Short answer:no<|endofchunk|><image>Question:how many objects are there? Short answer:2<|endofchunk|>"
            "<image>Question:what color is the cross? Short answer:blue<|endofchunk|>")
    rows = [tok.encode_markup(pretrain_shapes.lm_text(text))]
    found = pretrain_shapes.question_words(rows, tok)
    got = [(tok.decode(rows[0][t - 2:t + 1]), tok.decode([w])) for _, t, w in found]
    assert sorted(got) == sorted([(" Short answer:", " green"), (" Short answer:", " square"),
                                  (" Short answer:", " cross")])
    assert pretrain_shapes.question_words(rows, get_tokenizer("bytes")) == []  # words are not single tokens


def test_stage_one_rows_begin_anywhere():
    """Stage 1 (lm_row): about half its rows begin at a sample's <image>, the others at a random offset, so at
    many different tokens; each holds at most block_size tokens (at least half that here)."""
    tok = get_tokenizer("shapes")
    g = torch.Generator().manual_seed(0)
    rows = [pretrain_shapes.lm_row(0, i, tok, 64, g) for i in range(60)]
    assert all(32 < len(r) <= 64 for r in rows)
    firsts = [r[0] for r in rows]
    assert 15 <= firsts.count(tok.image_id) <= 45 and len(set(firsts)) >= 10, [tok.decode([t]) for t in firsts]
    assert pretrain_shapes.lm_row(0, 0, tok, 64, torch.Generator().manual_seed(0)) == rows[0]  # (seed, index, g)


def test_stage_one_lm_learns_the_question_words(tmp_path):
    """A few steps of stage 1 with the shapes tokenizer: both losses fall."""
    logged = []
    pretrain_shapes.pretrain_lm(str(tmp_path / "lm"), "shapes", iters=20, batch_size=4, block_size=128,
                                n_layer=2, n_embd=32, n_head=2, log=logged.append)
    first, last = (tuple(float(x) for x in (m.split()[4], m.split()[7])) for m in (logged[0], logged[-1]))
    assert last[0] < first[0] and 0 < last[1] < first[1], logged
    made = json.loads((tmp_path / "lm" / "stage1.json").read_text())  # how it was made, kept beside it
    assert made == {"recipe": pretrain_shapes.LM_RECIPE, "seed": 0, "embedding_std": 0.25}


def test_a_stand_in_lm_from_an_older_recipe_is_refused(tmp_path):
    """Stage 1 skips stand-ins already there, but not an LM an older recipe made (no stage1.json): a clear stop."""
    lm_dir, vision = tmp_path / "lm", tmp_path / "vision.safetensors"
    lm_dir.mkdir()
    (lm_dir / "model.safetensors").write_bytes(b"old")
    vision.write_bytes(b"old")
    with pytest.raises(SystemExit, match="older stage-1 recipe") as stop:
        pretrain_shapes.pretrain(str(lm_dir), str(vision))
    assert f"delete {lm_dir} and run again" in str(stop.value)  # the folder to delete is the LM's
    (lm_dir / "stage1.json").write_text("{not json")  # a broken tag is refused the same way, not a traceback
    with pytest.raises(SystemExit, match="unreadable stage1.json"):
        pretrain_shapes.pretrain(str(lm_dir), str(vision))
    (lm_dir / "stage1.json").write_text(json.dumps({"recipe": pretrain_shapes.LM_RECIPE}))
    assert pretrain_shapes.pretrain(str(lm_dir), str(vision)) == (str(lm_dir), str(vision))  # both kept as they are


def test_stage_one_passes_its_settings_to_the_lm(tmp_path, monkeypatch):
    """pretrain() (and so `python pretrain_shapes.py --embedding_std=... --seed=...`) reaches pretrain_lm."""
    seen = {}
    monkeypatch.setattr(pretrain_shapes, "pretrain_lm", lambda out, tokenizer, **kw: seen.update(kw))
    vision = tmp_path / "vision.safetensors"
    vision.write_bytes(b"there already")  # so stage 1 makes only the LM
    pretrain_shapes.pretrain(str(tmp_path / "lm"), str(vision), seed=4, embedding_std=0.4)  # not the defaults
    assert seen["seed"] == 4 and seen["embedding_std"] == 0.4
