"""Sharing a model (pretrained.py, export.py, openflamingo.py): save_pretrained and from_folder give the very same
logits, a folder with a missing or mis-shaped tensor is refused by the tensor's name, the folder travels (copied
base, hub cache, offline), sample.py / eval.py / train.py read it like a run's out_dir, push_to_hub talks to a
stand-in of huggingface_hub's API; and OpenFlamingo 2.0.1's own code, given the checkpoint.pt export.py writes,
computes our logits. CPU, no network."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import files
import hf
import openflamingo
import pretrained
from model import Flamingo
from test_model import OPTS, images_for, logits_of, open_gates_, randomize_
from test_train import ENV, ROOT, SMALL, make_assets, run_train

TEXT = torch.tensor([[257, 5, 6, 7, 258, 257, 9, 10, 11, 12]])  # <image> ... <|endofchunk|> <image> ...


@pytest.fixture(scope="module")
def lm_and_clip(tmp_path_factory):
    """A tiny GPT-2 in the Hugging Face layout and a tiny CLIP's weights file."""
    import open_clip
    from lm import LM, LMConfig
    from vision import register_clip_configs
    root = tmp_path_factory.mktemp("base")
    lm = LM(LMConfig(arch="gpt2", vocab_size=257, n_layer=4, n_head=4, n_embd=64, block_size=128))
    randomize_(lm, 0.2, seed=0)
    lm.save_pretrained(str(root / "lm"))
    register_clip_configs()
    torch.manual_seed(0)
    torch.save(open_clip.create_model("flamingo-tiny").state_dict(), root / "clip.pt")
    return str(root / "lm"), str(root / "clip.pt")


def trained_model(lm, clip_pretrained, seed=1, **kw):
    """A Flamingo whose trained parts are drawn at random, gates open: every tensor matters to the logits."""
    model = Flamingo.from_pretrained(lm=lm, clip_pretrained=clip_pretrained, **{**OPTS, **kw}).eval()
    randomize_(model.perceiver, 0.3, seed)
    randomize_(model.xattn, 0.3, seed + 1)
    with torch.no_grad():
        model.new_wte.normal_(0, 1.0)
        model.new_lm_head.normal_(0, 1.0)
    open_gates_(model, 0.7)
    return model


@pytest.mark.parametrize("tower", ["file", "random"])
def test_save_and_load_give_the_same_logits(lm_and_clip, tmp_path, tower):
    """The folder holds config.json, model.safetensors and a model card; a random tower (no weights file names it)
    is saved in it as vision.*, a named one is not. from_folder rebuilds the model: the same logits, bit for bit."""
    lm, clip = lm_and_clip
    model = trained_model(lm, clip if tower == "file" else None)
    model.save_pretrained(str(tmp_path / "f"), tokenizer="bytes")
    assert sorted(os.listdir(tmp_path / "f")) == ["README.md", "config.json", "model.safetensors"]
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "f" / "model.safetensors"))
    assert any(k.startswith("vision.") for k in saved) == (tower == "random")
    assert {k for k in saved if not k.startswith("vision.")} == set(model.trained_state_dict())
    card = (tmp_path / "f" / "README.md").read_text()
    assert card.startswith("---\n") and "| xattn |" in card and "Flamingo.from_folder" in card
    loaded, tokenizer = Flamingo.from_folder(str(tmp_path / "f"), verbose=False)
    images = images_for(2, seed=0)
    assert tokenizer == "bytes" and loaded.config == model.config
    assert torch.equal(logits_of(loaded.eval(), images, TEXT), logits_of(model, images, TEXT))


def test_tied_new_tokens_saved_once(lm_and_clip, tmp_path):
    """tie_new_tokens: the new tokens' output rows are their input rows, one tensor, saved once and tied again."""
    lm, clip = lm_and_clip
    model = trained_model(lm, clip, tie_new_tokens=True)
    assert model.new_lm_head is model.new_wte
    model.save_pretrained(str(tmp_path / "f"))
    loaded, _ = Flamingo.from_folder(str(tmp_path / "f"), verbose=False)
    assert loaded.new_lm_head is loaded.new_wte
    images = images_for(2, seed=0)
    assert torch.equal(logits_of(loaded.eval(), images, TEXT), logits_of(model, images, TEXT))


def test_a_finetuned_openflamingo_shared(tmp_path):
    """A model built on an OpenFlamingo checkpoint.pt, its LM's top layer trained too: the folder holds that layer
    (and names the checkpoint, whose LM table it reads), and rebuilds the same logits."""
    pytest.importorskip("transformers")
    from test_openflamingo import openflamingo_base, openflamingo_state_dict
    lm, clip = openflamingo_base(tmp_path, "mpt")
    torch.save(openflamingo_state_dict(), tmp_path / "checkpoint.pt")
    model = Flamingo.from_openflamingo(str(tmp_path / "checkpoint.pt"), lm, clip="flamingo-tiny", clip_pretrained=clip,
                                       verbose=False).eval()
    model.unfreeze_lm_layers(1)
    with torch.no_grad():
        for p in model.lm.transformer.h[-1].parameters():
            p.add_(0.05 * torch.randn(p.shape))
    model.save_pretrained(str(tmp_path / "f"), tokenizer=lm)
    assert (tmp_path / "f" / "tokenizer.json").exists()
    loaded, tokenizer = Flamingo.from_folder(str(tmp_path / "f"), verbose=False)
    assert tokenizer == str(tmp_path / "f" / "tokenizer.json") and loaded.config.train_lm_layers == 1
    img, eoc = model.media_token_id, model.eoc_token_id
    images, idx = images_for(2, seed=0), torch.tensor([[img, 5, 6, 7, eoc, img, 9, 10]])
    assert torch.equal(logits_of(loaded.eval(), images, idx), logits_of(model, images, idx))


def test_bad_folders_refused_by_name(lm_and_clip, tmp_path):
    """A missing tensor, an unexpected one and a mis-shaped one are refused with its name; so are a config.json that
    is not JSON or is of a newer format, weights that are not safetensors (a pickle is never unpickled), and an LM
    named by a path this machine does not have (the message says to pass --lm)."""
    from safetensors.torch import load_file, save_file
    lm, clip = lm_and_clip
    trained_model(lm, clip).save_pretrained(str(tmp_path / "good"))
    weights = load_file(str(tmp_path / "good" / "model.safetensors"))
    key = "xattn.1.attn.to_q.weight"
    assert key in weights

    def variant(name, tensors=None, config=None, raw=None):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        if tensors is not None:
            save_file(tensors, str(folder / "model.safetensors"))
        if raw is not None:
            (folder / "model.safetensors").write_bytes(raw)
        if config is not None:
            (folder / "config.json").write_text(config)
        return str(folder)

    config = json.loads((tmp_path / "good" / "config.json").read_text())
    cases = [
        (variant("missing", {k: v for k, v in weights.items() if k != key}), ValueError, f"missing ['{key}']"),
        (variant("extra", {**weights, "xattn.9.ff_gate": torch.zeros(1)}), ValueError, "'xattn.9.ff_gate'"),
        (variant("shape", {**weights, key: weights[key][:, :-1].contiguous()}), ValueError,
         f"{key}: checkpoint has shape"),
        (variant("notjson", config="{not json"), files.FileError, "config.json"),
        (variant("newer", config=json.dumps({**config, "format": 99})), files.FileError, "newer version"),
        (variant("pickle", raw=b"\x80\x04\x95" + b"\x00" * 64), files.FileError, "model.safetensors"),
        (variant("nolm", config=json.dumps({**config, "flamingo": {**config["flamingo"], "lm": "/nowhere/lm"}})),
         files.FileError, "pass --lm="),
        (variant("noof", config=json.dumps({**config, "flamingo": {**config["flamingo"], "openflamingo": "/no/c.pt"}})),
         files.FileError, "its openflamingo is /no/c.pt, which is not on this machine: put it there"),
    ]
    for folder, error, needle in cases:
        with pytest.raises(error) as e:
            Flamingo.from_folder(folder, verbose=False)
        assert needle in str(e.value), (folder, str(e.value))
    assert not pretrained.is_folder(str(tmp_path / "notjson")) and not pretrained.is_folder(str(tmp_path))


def test_with_base_travels(lm_and_clip, tmp_path, monkeypatch):
    """with_base: the LM's folder and the tower's weights copied in, named relative to the folder: moved elsewhere
    (its base gone from where it was), it loads the same model. Without, the paths are made absolute."""
    lm, clip = lm_and_clip
    base = tmp_path / "base"
    shutil.copytree(os.path.dirname(lm), base)
    model = trained_model(str(base / "lm"), str(base / "clip.pt"))
    model.save_pretrained(str(tmp_path / "a"), with_base=True)
    shutil.rmtree(base)
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())["flamingo"]
    assert (cfg["lm"], cfg["clip_pretrained"]) == ("lm", "vision.safetensors")  # the tower's .pt converted
    loaded, _ = Flamingo.from_folder(str(tmp_path / "b"), verbose=False)
    images = images_for(1, seed=2)
    assert torch.equal(logits_of(loaded.eval(), images, TEXT[:, :5]), logits_of(model, images, TEXT[:, :5]))
    # safetensors only: an LM whose weights are a pickle is not copied in; a folder naming a pickle is not read
    shutil.copytree(tmp_path / "b" / "lm", tmp_path / "binlm")
    (tmp_path / "binlm" / "model.safetensors").rename(tmp_path / "binlm" / "pytorch_model.bin")
    with pytest.raises(files.FileError, match="holds its weights as pickles"):
        pretrained.write(str(tmp_path / "d"), {**cfg, "lm": str(tmp_path / "binlm")}, "bytes", {}, "", with_base=True)
    shutil.copy(clip, tmp_path / "b" / "vision.pt")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    config["flamingo"]["clip_pretrained"] = "vision.pt"
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(files.FileError, match="vision.pt: not safetensors"):
        Flamingo.from_folder(str(tmp_path / "b"), verbose=False)
    monkeypatch.chdir(tmp_path)  # relative paths given by the user become absolute ones in the folder
    trained_model(os.path.relpath(lm), os.path.relpath(clip)).save_pretrained("c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())["flamingo"]
    assert (cfg["lm"], cfg["clip_pretrained"]) == (lm, clip)


def test_what_is_a_hub_id(tmp_path, monkeypatch):
    """user/name in the hub's characters, not a file's name, and nothing local by that name."""
    monkeypatch.chdir(tmp_path)
    names = ["me/tiny", "me/tiny.v2", "out/ckpt.pt", "out/model.safetensors", "out-shapes/", "a/b/c", "./x", "gpt2"]
    assert [pretrained.is_hub_id(n) for n in names] == [True, True] + [False] * 6
    os.makedirs("me/tiny")
    assert not pretrained.is_hub_id("me/tiny")  # a local folder wins


def test_push_to_hub_with_a_stand_in(tmp_path, monkeypatch):
    """push: create_repo then upload_folder of the whole folder, through huggingface_hub's HfApi (a stand-in here:
    the tests have no network); a refusal or HF_HUB_OFFLINE is one line saying how to upload later."""
    import huggingface_hub
    calls = []

    class HfApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message=""):
            calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path))))
            return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", HfApi)
    assert pretrained.push(str(tmp_path), "me/tiny", private=True) == "https://huggingface.co/me/tiny/commit/1"
    assert calls == [("create_repo", "me/tiny", True, True), ("upload_folder", "me/tiny", ["config.json"])]

    class Refusing(HfApi):
        def create_repo(self, *a, **kw):
            raise PermissionError("401 Client Error: Unauthorized\nmore lines")

    monkeypatch.setattr(huggingface_hub, "HfApi", Refusing)
    with pytest.raises(RuntimeError, match=r"PermissionError: 401 Client Error: Unauthorized\).*huggingface-cli upload"):
        pretrained.push(str(tmp_path), "me/tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
        pretrained.push(str(tmp_path), "me/tiny")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of 2 iterations of train.py on the shapes world (tiny LM and tower files), exported by export.py with
    its base copied in."""
    root = tmp_path_factory.mktemp("export")
    out = str(root / "out")
    run_train(out, *SMALL, *make_assets(str(root)), "--max_iters=2", "--eval_interval=2", "--eval_iters=1")
    p = script("export.py", f"--init_from={out}", f"--out_dir={root / 'shared'}", "--with_base=True")
    assert p.returncode == 0, p.stderr
    cfg = json.load(open(root / "shared" / "config.json"))["flamingo"]
    assert (cfg["lm"], cfg["clip_pretrained"]) == ("lm", "vision.safetensors")  # the base lives in the folder too
    return root, out, str(root / "shared")


def script(name, *args, env=None):
    return subprocess.run([sys.executable, name, *args], cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=300)


def test_scripts_read_the_folder_like_the_run(run, tmp_path):
    """The card holds the run's settings; sample.py gives the run's caption from the folder, eval.py its answers;
    train.py fine-tunes from the folder. The folder is also read by its hub id from the hub cache, offline."""
    import numpy as np
    from PIL import Image

    import shapes
    root, out, shared = run
    card = open(os.path.join(shared, "README.md")).read()
    assert "- max_iters: 2" in card and "- iterations done: 2" in card and "dataset: shapes" in card
    rng = np.random.default_rng(0)
    Image.fromarray(shapes.render(shapes.random_scene(rng), rng)).save(tmp_path / "a.png")
    sampled = []
    for init_from in (out, shared):
        p = script("sample.py", f"--init_from={init_from}", "--image", str(tmp_path / "a.png"), "--max_new_tokens=6")
        assert p.returncode == 0, p.stderr
        sampled.append(p.stdout.strip().splitlines()[-1])
    assert sampled[0] == sampled[1]

    folder = shapes.write_folder(str(tmp_path / "vqa"), "vqa", n_train=6, n_test=4)
    for init_from, name in ((out, "run.json"), (shared, "shared.json")):
        p = script("eval.py", f"--init_from={init_from}", "--task=vqa", f"--data_dir={folder}", "--shots=0",
                   "--num_samples=4", "--query_set_size=4", "--max_new_tokens=3", f"--results={tmp_path / name}")
        assert p.returncode == 0, p.stderr
    a, b = (json.load(open(tmp_path / n)) for n in ("run.json", "shared.json"))
    assert [r["predictions"] for r in a] == [r["predictions"] for r in b]
    p = script("export.py", f"--init_from={out}", f"--out_dir={tmp_path / 'carded'}",
               f"--eval_results={tmp_path / 'run.json'}")
    assert p.returncode == 0, p.stderr  # eval.py's table in the card
    assert "## Evaluation\n\n```\nvqa " in (tmp_path / "carded" / "README.md").read_text()
    p = script("export.py", f"--init_from={out}", f"--out_dir={tmp_path / 'x'}", f"--eval_results={tmp_path / 'a.png'}")
    assert p.returncode == 1 and "not a results file of eval.py" in p.stderr and "Traceback" not in p.stderr

    p = script("train.py", "config/finetune_folder.py", f"--init_from={shared}", f"--data_dir={folder}",
               f"--out_dir={tmp_path / 'ft'}", "--max_iters=1", "--eval_interval=1", "--eval_iters=1",
               "--batch_size=2", "--device=cpu", "--compile=False")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert Flamingo.from_checkpoint(str(tmp_path / "ft"), verbose=False)[1]["iter_num"] == 1
    p = script("train.py", f"--init_from={shared}", "--dry_run=True")  # sizes from config.json alone
    assert p.returncode == 0 and json.loads(p.stdout.strip().splitlines()[-1])["trained_params"] == sum(
        v.numel() for v in Flamingo.from_folder(shared, verbose=False)[0].trained_state_dict().values()), p.stderr

    snapshot = tmp_path / "hub" / "models--me--tiny" / "snapshots" / ("0" * 40)  # the hub cache's layout
    shutil.copytree(shared, snapshot)
    (tmp_path / "hub" / "models--me--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--me--tiny" / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    p = script("sample.py", "--init_from=me/tiny", "--image", str(tmp_path / "a.png"), "--max_new_tokens=6", env=env)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == sampled[0], p.stderr
    p = script("sample.py", "--init_from=me/other", "--image", str(tmp_path / "a.png"), env=env)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "huggingface-cli download me/other" in p.stderr


def test_export_py_errors_are_one_line(run, tmp_path):
    """Offline, --push_to_hub writes the folder and says how to upload it later; a model OpenFlamingo cannot build
    (GPT-2, a one-layer resampler) is refused with the reasons; nothing to write, nothing written."""
    root, out, _ = run
    p = script("export.py", f"--init_from={out}", f"--out_dir={tmp_path / 'f'}", "--push_to_hub=me/tiny",
               env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "huggingface-cli upload me/tiny" in p.stderr and pretrained.is_folder(str(tmp_path / "f"))
    p = script("export.py", f"--init_from={out}", f"--openflamingo={tmp_path / 'checkpoint.pt'}")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "not OpenFlamingo's layout: a gpt2 LM" in p.stderr and "resampler_depth=1" in p.stderr
    assert not os.path.exists(tmp_path / "checkpoint.pt")
    p = script("export.py", f"--init_from={out}")
    assert p.returncode == 1 and "nothing to write" in p.stderr


@pytest.mark.parametrize("arch, ln_post", [("mpt", True), ("neox", False)])
def test_openflamingo_runs_our_export(tmp_path, arch, ln_post):
    """A model built here in OpenFlamingo's layout (an MPT, whose head is tied, or a GPT-NeoX, whose head is its
    own; 6-layer resampler of 64 latents, 8 heads of 64, a gated block before every 2nd layer), its trained parts
    drawn at random with the gates open, written by openflamingo.checkpoint as checkpoint.pt: OpenFlamingo 2.0.1's
    create_model_and_transforms builds its model on the same LM and CLIP files, its load_state_dict(sd,
    strict=False) fills every trained tensor, and its logits are ours (the new tokens at their ids there). With
    vision_ln_post=False (OpenFlamingo's released models') its tower is told to skip ln_post, as export.py says.
    Here the model saved as a folder, and (before ln_post) the file read back by from_openflamingo, give our logits."""
    open_flamingo = pytest.importorskip("open_flamingo")
    from test_openflamingo import C, EVERY, LAYERS, openflamingo_base
    from tokenizer import get_tokenizer

    lm, clip = openflamingo_base(tmp_path, arch)
    ours = Flamingo.from_pretrained(lm=lm, clip="flamingo-tiny", clip_pretrained=clip, cross_attn_every_n_layers=EVERY,
                                    resampler_depth=6, num_latents=64, max_num_frames=0, vision_ln_post=ln_post,
                                    tie_new_tokens=arch == "mpt", verbose=False).eval()
    randomize_(ours.perceiver, 0.1, seed=3)
    randomize_(ours.xattn, 0.1, seed=4)
    with torch.no_grad():
        ours.new_wte.normal_(0, 0.1)
        ours.new_lm_head.normal_(0, 0.1)
    open_gates_(ours, 0.6)
    tok = get_tokenizer(os.path.join(lm, "tokenizer.json"), ours.lm.config.vocab_size, ours.config.new_tokens)
    sd = openflamingo.checkpoint(ours, tok.base_n_vocab)
    torch.save(sd, tmp_path / "checkpoint.pt")

    ref, _, ref_tok = open_flamingo.create_model_and_transforms("flamingo-tiny", clip, lm, lm,
                                                                cross_attn_every_n_layers=EVERY)
    assert len(ref_tok) == tok.base_n_vocab + 3
    trained = [p for p in ref.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trained:
            p.fill_(float("nan"))
    result = ref.load_state_dict(torch.load(tmp_path / "checkpoint.pt"), strict=False)
    assert set(result.unexpected_keys) <= set(hf.OPENFLAMINGO_HEAD)  # GPT-NeoX's head: the name of the other version
    assert not any(p.isnan().any() for p in trained)  # every trained tensor (and the twins' aliases) filled
    if not ln_post:
        ref.vision_encoder.ln_post = torch.nn.Identity()
    ref.eval()

    n_text, V = tok.base_n_vocab, ours.lm.config.vocab_size
    ours_ids = {t: V + i for i, t in enumerate(ours.config.new_tokens)}
    ref_ids = {t: ref_tok.encode(t)[-1] for t in ("<|endofchunk|>", "<image>")}
    columns = list(range(n_text)) + [ours_ids[t] for t in ref_ids]
    text = "<image>a red circle<|endofchunk|><image>two squares<|endofchunk|> and"
    x = torch.tensor([ref_tok(text)["input_ids"]])                # OpenFlamingo's ids
    mine = x.clone()
    for t, i in ref_ids.items():
        mine[x == i] = ours_ids[t]
    images = torch.randn(1, 2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(images, x).logits[..., :n_text + 2]            # the text tokens, <|endofchunk|>, <image>
        got = ours(images[0], mine)[0][..., columns]
    assert C == ours.lm.config.n_embd and len(ours.xattn) == LAYERS // EVERY
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())

    ours.save_pretrained(str(tmp_path / "f"), tokenizer=lm)  # and here, as a folder
    with torch.no_grad():
        assert torch.equal(Flamingo.from_folder(str(tmp_path / "f"), verbose=False)[0].eval()(images[0], mine)[0],
                           ours(images[0], mine)[0])
    p = script("export.py", f"--init_from={tmp_path / 'f'}", f"--openflamingo={tmp_path / 'cli.pt'}")
    assert p.returncode == 0 and "create_model_and_transforms(" in p.stdout, p.stderr  # the command, from the folder
    cli = torch.load(tmp_path / "cli.pt")
    assert cli.keys() == sd.keys() and all(torch.equal(cli[k], sd[k]) for k in sd)
    if not ln_post:  # back again: OpenFlamingo's reader, GPT-NeoX's head rows included
        back = Flamingo.from_openflamingo(str(tmp_path / "checkpoint.pt"), lm, clip="flamingo-tiny",
                                          clip_pretrained=clip, verbose=False).eval()
        with torch.no_grad():
            again = back(images[0], x)[0]
        torch.testing.assert_close(again[..., :n_text + 2], want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_openflamingo_layout_refused_by_reason(lm_and_clip):
    """What OpenFlamingo cannot build is named: the LM family, time embeddings, the resampler's size."""
    lm, clip = lm_and_clip
    model = trained_model(lm, clip, max_num_frames=2)
    with pytest.raises(ValueError, match="not OpenFlamingo's layout: a gpt2 LM") as e:
        openflamingo.checkpoint(model, 256)
    assert "max_num_frames=2" in str(e.value) and "resampler_depth=2 (OpenFlamingo's: 6)" in str(e.value)
