"""explain.py and plot.py: the attention weights it reads are the ones the model uses, phi holds (no map, share and
dlogp exactly 0 before any image), a token's map moves only with its own image, and the files a user asks for are
written (sample.py --explain, plot.py); clear errors otherwise."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import explain
from lm import LM
from model import Flamingo
from test_model import IMG, LM_CONFIGS, OPTS, images_for, open_gates_, randomize_
import test_sample
from test_train import ENV, ROOT
from vision import register_clip_configs

files = test_sample.files  # a fixture: a checkpoint of train.py and two shapes-world PNGs


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny LLaMA-style Flamingo with random trained parts, open gates and 3 time embeddings (clips of 3 frames)."""
    import open_clip
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("explain")
    lm = LM(LM_CONFIGS["llama"])
    randomize_(lm, 0.2, seed=0)
    lm.save_pretrained(str(root / "lm"))
    register_clip_configs()
    torch.manual_seed(0)
    torch.save(open_clip.create_model("flamingo-tiny").state_dict(), str(root / "clip.pt"))
    m = Flamingo.from_pretrained(lm=str(root / "lm"), clip_pretrained=str(root / "clip.pt"),
                                 **{**OPTS, "max_num_frames": 3}).eval()
    randomize_(m.perceiver, 0.3, seed=10)
    randomize_(m.xattn, 0.3, seed=20)
    open_gates_(m, 1.0)
    return m


ROW = torch.tensor([5, 6, IMG, 7, 8, IMG, 9, 10, 11])  # text, an image, text, a clip, text


def items_for(seed=0):
    return [images_for(1, seed)[0], images_for(1, seed + 1, frames=3)[0]]  # (1, 3, H, W) and (3, 3, H, W)


def test_the_weights_are_those_the_model_uses(model):
    """Weights read off queries() and qkv() times the values give each module's own output."""
    x = torch.randn(1, len(ROW), 64)
    text_time = (ROW == IMG).cumsum(0)[None]
    blk = next(iter(model.xattn.values()))
    visual = torch.randn(1, 2, model.config.num_latents, model.vision.width)      # (B, M, R, D)
    k, v = blk.attn.media_kv(visual)
    q, mask, has_media = blk.attn.queries(x, text_time, 2, model.config.num_latents)
    out = (explain.attention_weights(q, k, mask) * has_media) @ v                   # (B, h, T, dh)
    want = blk.attn(x, text_time, (k, v), model.config.num_latents)
    torch.testing.assert_close(blk.attn.to_out(out.transpose(1, 2).flatten(2)), want)
    attn = model.perceiver.layers[0][0]
    feats, latents = torch.randn(2, 12, model.vision.width), torch.randn(2, model.config.num_latents, model.vision.width)
    q, k, v = attn.qkv(feats, latents)
    out = explain.attention_weights(q, k) @ v
    torch.testing.assert_close(attn.to_out(out.transpose(1, 2).flatten(2)), attn(feats, latents))


def test_rollout_by_hand(model):
    """C_l = (C_{l-1} + A_l[:, features] + A_l[:, latents] C_{l-1}) / 2 over the layers, rows within [0, 1]."""
    feats = model.vision(items_for()[1]).detach()                                   # (3, S, D)
    C = explain.rollout(model.perceiver, feats)
    x = (feats + model.perceiver.time_embeddings(3)[:, None]).reshape(1, -1, feats.shape[-1])
    lat, want = model.perceiver.latents[None], 0
    for attn, ff in model.perceiver.layers:
        A = explain.attention_weights(*attn.qkv(x, lat)[:2])[0].mean(0)           # (R, L + R)
        L = x.shape[1]
        want = (want + A[:, :L] + A[:, L:] @ want) / 2 if torch.is_tensor(want) else A[:, :L] / 2
        lat = lat + attn(x, lat)
        lat = lat + ff(lat)
    torch.testing.assert_close(C, want)
    assert C.shape == (model.config.num_latents, feats.shape[0] * feats.shape[1])
    assert (C >= 0).all() and (C.sum(1) <= 1 + 1e-6).all()


def test_records_follow_phi(model):
    recs = explain.explain(model, items_for(), ROW, 1, decode=lambda ids: f"t{ids[0]}")
    assert [r["id"] for r in recs] == ROW[1:].tolist() and recs[0]["token"] == "t6"
    # predicted from a position before the first image: nothing to look at, and the images change nothing
    for r in recs[:2]:
        assert r["image"] is None and r["grid"] is None and r["share"] == 0.0 and r["dlogp"] == 0.0
    assert [r["image"] for r in recs[2:]] == [0, 0, 0, 1, 1, 1]  # phi of the position before each token
    g = 4  # flamingo-tiny: 32 px images in 8 px patches
    for r in recs[2:]:
        grid = torch.tensor(r["grid"])
        assert grid.shape == ((1 if r["image"] == 0 else 3), g, g)
        assert abs(grid.sum().item() - 1) < 1e-5 and (grid >= 0).all()
        assert grid[tuple(r["peak"])] == grid.max()
        assert len(r["blocks"]) == len(model.xattn) and r["share"] > 0 and r["dlogp"] != 0
    # another first image: the first block's map of a token that sees the clip stays, bit for bit (its queries
    # have seen no image yet: the first block sits before LM layer 1; later blocks' queries carry the first image
    # through self-attention); a token that sees the first image looks elsewhere
    other = explain.explain(model, [images_for(1, 7)[0], items_for()[1]], ROW, 1)
    assert [b["layer"] for b in recs[-1]["blocks"]] == [1, 3]
    assert other[-1]["blocks"][0]["grid"] == recs[-1]["blocks"][0]["grid"]
    assert other[2]["blocks"][0]["grid"] != recs[2]["blocks"][0]["grid"]


def test_shut_gates_show_nothing_changed(model):
    """With the attention gates at 0 the images change no log-probability and add nothing."""
    shut = copy.deepcopy(model)
    with torch.no_grad():
        for blk in shut.xattn.values():
            blk.attn_gate.zero_()
    recs = explain.explain(shut, items_for(), ROW, 3)
    assert all(r["dlogp"] == 0.0 and r["share"] == 0.0 for r in recs)


def test_files_written(model, tmp_path):
    recs = explain.explain(model, items_for(), ROW, 1, decode=str)
    pictures = [explain.pixels(x, model.vision.mean, model.vision.std) for x in items_for()]
    explain.save(recs, str(tmp_path / "e.json"))
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads(json.dumps(recs))
    explain.save(recs, str(tmp_path / "e.png"), pictures)
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run(script, *args):
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_sample_explain_and_plot(files, tmp_path):
    out, pngs, _ = files
    prompt = "<image>Question:what color is the circle? Short answer:"
    rc, stdout, stderr = run("sample.py", f"--init_from={out}", "--image", pngs[0], f"--prompt={prompt}",
                             "--max_new_tokens=3", f"--explain={tmp_path / 'e.json'}")
    assert rc == 0, stderr[-2000:]
    recs = json.loads((tmp_path / "e.json").read_text())
    assert 1 <= len(recs) <= 3 and all(r["image"] == 0 and len(r["grid"][0]) == 8 for r in recs)  # shapes-rn: 8 x 8
    assert "".join(r["token"] for r in recs).startswith(stdout.splitlines()[-1])  # the continuation (+ its stop)
    rc, _, stderr = run("sample.py", f"--init_from={out}", "--image", pngs[0], f"--explain={tmp_path / 'e.png'}",
                        "--max_new_tokens=2")
    assert rc == 0 and (tmp_path / "e.png").stat().st_size > 1000, stderr[-2000:]
    rc, _, stderr = run("sample.py", f"--init_from={out}", "--image", pngs[0], "--explain=e.txt")
    assert rc != 0 and "error: --explain=e.txt: a .png or .json file" in stderr and "Traceback" not in stderr
    # plot.py on that run's log.jsonl, twice overlaid
    rc, stdout, stderr = run("plot.py", out, out, f"--out={tmp_path / 'c.png'}")
    assert rc == 0 and (tmp_path / "c.png").stat().st_size > 1000, stderr[-2000:]
    rc, _, stderr = run("plot.py", str(tmp_path / "nothing"))
    assert rc != 0 and "error: no training log at" in stderr and "Traceback" not in stderr


def test_without_matplotlib_a_clear_message(tmp_path):
    """matplotlib is optional: plot.py says how to get it (a stand-in package that cannot be imported)."""
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    log = tmp_path / "log.jsonl"
    log.write_text('{"iter": 0, "val_loss": 1.0}\n')
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, "plot.py", str(log)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0 and "pip install matplotlib" in p.stderr and "Traceback" not in p.stderr
