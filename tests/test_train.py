"""End-to-end tests of train.py, run as a subprocess on a tiny Flamingo (CPU, no network, a few seconds a run).

- 2 DDP processes with accumulation 1 follow the run of 1 process with accumulation 2 (train.py's docstring);
- a run stopped at a checkpoint and resumed is the uninterrupted run, bit for bit (weights, optimizer, log);
- a checkpoint write that dies leaves the previous checkpoint whole (files.atomic_save);
- the format of log.jsonl; a new run starts a new log, a resumed one drops what followed its checkpoint.
"""

import atexit
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import files
import model as model_module
from lm import LM, LMConfig
from vision import register_clip_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# transformers is a test-only requirement; open_clip imports it when it is installed, a second or more per
# subprocess. The scripts run here without it, as they do with requirements.txt alone.
NO_TRANSFORMERS = tempfile.mkdtemp(prefix="no-transformers-")
os.makedirs(os.path.join(NO_TRANSFORMERS, "transformers"))
with open(os.path.join(NO_TRANSFORMERS, "transformers", "__init__.py"), "w") as f:
    f.write("raise ImportError('hidden by tests/test_train.py')\n")
atexit.register(shutil.rmtree, NO_TRANSFORMERS, ignore_errors=True)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [NO_TRANSFORMERS, os.environ.get("PYTHONPATH")]))}
SMALL = ["--batch_size=2", "--block_size=128", "--resampler_depth=1", "--num_latents=4", "--resampler_heads=2",
         "--resampler_dim_head=8", "--xattn_heads=2", "--xattn_dim_head=8", "--eval_iters=2", "--log_interval=1",
         "--warmup_iters=2", "--learning_rate=1e-3", "--gate_lr_mult=10.0", "--device=cpu", "--dtype=float32",
         "--compile=False", "--pretrain_shapes=False", "--clip=shapes-vit", "--eval_interval=4",
         "--lr_decay_iters=8"]  # fixed: its default, max_iters, would differ between a stopped run and the full one


def make_assets(root):
    """A tiny random byte-level GPT-2 and shapes-vit weights, saved once so that every run starts the same."""
    import open_clip
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    torch.manual_seed(0)
    LM(LMConfig(arch="gpt2", vocab_size=257, n_layer=2, n_head=2, n_embd=32, block_size=512)).save_pretrained(
        os.path.join(root, "lm"))
    register_clip_configs()
    clip = open_clip.create_model("shapes-vit")
    save_file(clip.state_dict(), os.path.join(root, "vision.safetensors"))
    return [f"--lm={os.path.join(root, 'lm')}", f"--clip_pretrained={os.path.join(root, 'vision.safetensors')}"]


def run_train(out_dir, *args, nproc=1):
    """Run train.py; returns its log.jsonl records."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = launcher + ["train.py", f"--out_dir={out_dir}", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    with open(os.path.join(out_dir, "stdout.txt"), "w") as f:  # for tests that read what it printed
        f.write(p.stdout)
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(log):
    return {r["iter"]: r["loss"] for r in log if "loss" in r}


def val_losses(log):
    return {r["iter"]: r["val_loss"] for r in log if "val_loss" in r}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The uninterrupted run: 1 process, accumulation 2, 8 iterations, checkpoints at 4 and 8."""
    out = str(tmp_path_factory.mktemp("reference"))
    log = run_train(out, *SMALL, *assets, "--gradient_accumulation_steps=2", "--max_iters=8")
    return out, log


def test_log_format(reference):
    _, log = reference
    train = [r for r in log if "loss" in r]
    assert [r["iter"] for r in train] == list(range(1, 9))
    for r in train:
        assert set(r) == {"iter", "loss", "lr", "samples_per_s", "gates"}
        assert r["loss"] > 0 and r["lr"] > 0 and r["samples_per_s"] > 0
        assert len(r["gates"]) == 4  # 2 LM layers x (attn_gate, ff_gate)
        assert all(k.endswith(("attn_gate", "ff_gate")) and -1 < v < 1 for k, v in r["gates"].items())
    assert any(v != 0 for v in train[-1]["gates"].values())  # the gates moved (gate_lr_mult=10)
    assert list(val_losses(log)) == [0, 4, 8]


def test_ddp_equals_gradient_accumulation(assets, reference, tmp_path):
    """torchrun with 2 processes x accumulation 1 == 1 process x accumulation 2: the same global batches."""
    _, ref = reference
    log = run_train(str(tmp_path), *SMALL, *assets, "--gradient_accumulation_steps=1", "--max_iters=4", nproc=2)
    got, want = train_losses(log), {k: v for k, v in train_losses(ref).items() if k <= 4}
    assert list(got) == list(want) == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want.values())), rtol=1e-4, atol=0)
    got, want = val_losses(log), {k: v for k, v in val_losses(ref).items() if k <= 4}
    assert list(got) == list(want) == [0, 4]
    torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want.values())), rtol=1e-4, atol=0)
    # the same gates after 4 steps
    g = [r["gates"] for r in log if r.get("iter") == 4 and "gates" in r][0]
    g_ref = [r["gates"] for r in ref if r.get("iter") == 4 and "gates" in r][0]
    assert g.keys() == g_ref.keys() and all(abs(g[k] - g_ref[k]) <= 2e-4 for k in g)


def test_one_micro_batch_equals_gradient_accumulation(assets, reference, tmp_path):
    """1 process x 1 micro-batch of 4 rows == 1 process x accumulation 2 of 2 rows (and so == 2 processes of 2 rows):
    a loss is the mean over the target tokens of the whole global batch, however it is split, in training and in
    validation."""
    _, ref = reference
    log = run_train(str(tmp_path), *SMALL, *assets, "--batch_size=4", "--gradient_accumulation_steps=1",
                    "--max_iters=4")
    for losses in (train_losses, val_losses):
        got, want = losses(log), {k: v for k, v in losses(ref).items() if k <= 4}
        assert list(got) == list(want)
        torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want.values())), rtol=1e-4,
                                   atol=0)
    g = [r["gates"] for r in log if r.get("iter") == 4 and "gates" in r][0]
    g_ref = [r["gates"] for r in ref if r.get("iter") == 4 and "gates" in r][0]
    assert all(abs(g[k] - g_ref[k]) <= 2e-4 for k in g)


def test_fsdp_equals_gradient_accumulation_and_resumes(assets, reference, tmp_path):
    """torchrun with 2 processes and fsdp=True (fully_shard, gloo on CPU): the losses and gates of 1 process with
    accumulation 2 (to float rounding: gradients are reduce-scattered); its checkpoint holds the whole tensors
    (the 1-process ones, to rounding) and resumes under FSDP to the same losses."""
    ref_dir, ref = reference
    out = str(tmp_path)
    log = run_train(out, *SMALL, *assets, "--gradient_accumulation_steps=1", "--max_iters=4", "--fsdp=True", nproc=2)
    got, want = train_losses(log), {k: v for k, v in train_losses(ref).items() if k <= 4}
    assert list(got) == list(want) == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want.values())), rtol=1e-4, atol=0)
    got, want = val_losses(log), {k: v for k, v in val_losses(ref).items() if k <= 4}
    torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want.values())), rtol=1e-4, atol=0)
    g = [r["gates"] for r in log if r.get("iter") == 4 and "gates" in r][0]
    g_ref = [r["gates"] for r in ref if r.get("iter") == 4 and "gates" in r][0]
    assert g.keys() == g_ref.keys() and all(abs(g[k] - g_ref[k]) <= 2e-4 for k in g)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert all(type(v) is torch.Tensor for v in ckpt["model"].values())
    model, _ = model_module.Flamingo.from_checkpoint(out, verbose=False)  # rebuilds without FSDP
    # resume to 8 under FSDP: the reference's losses, and at 8 the reference's weights (to float rounding)
    log = run_train(out, *SMALL, *assets, "--gradient_accumulation_steps=1", "--max_iters=8", "--fsdp=True",
                    "--init_from=resume", nproc=2)
    got, want = train_losses(log), train_losses(ref)
    assert list(got) == list(want)
    torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want.values())), rtol=1e-4, atol=0)
    mine = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    theirs = torch.load(os.path.join(ref_dir, "ckpt.pt"), weights_only=True)
    assert mine["iter_num"] == theirs["iter_num"] == 8 and mine["model"].keys() == theirs["model"].keys()
    for k, v in theirs["model"].items():
        torch.testing.assert_close(mine["model"][k], v, rtol=1e-3, atol=1e-5)


def test_bf16_fsdp_equals_gradient_accumulation(assets, tmp_path):
    """--dtype=bfloat16 reads the frozen LM in bf16 (cast as it is read) next to the fp32 trained parts; under FSDP
    that puts two dtypes in the root unit. On CPU (gloo, autocast) 2 processes give 1 process's losses with
    twice the accumulation, to bf16's precision."""
    args = [*SMALL, *assets, "--dtype=bfloat16", "--max_iters=3", "--eval_interval=3"]
    ref = run_train(str(tmp_path / "one"), *args, "--gradient_accumulation_steps=2")
    log = run_train(str(tmp_path / "fsdp"), *args, "--gradient_accumulation_steps=1", "--fsdp=True", nproc=2)
    for losses in (train_losses, val_losses):
        got, want = losses(log), losses(ref)
        assert list(got) == list(want) and all(math.isfinite(v) for v in got.values())
        torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want.values())), rtol=1e-2,
                                   atol=0)


def test_stage_one_here_or_before_trains_alike(tmp_path):
    """config/train_shapes.py makes its stand-ins (stage 1) when they are missing, and reuses them after: the run
    that made them and a later one train the same stage 2 (stage 1's draws from the random generator do not leak
    into the trained parts' initial weights)."""
    pre = tmp_path / "pretrained"
    args = ["config/train_shapes.py", f"--lm={pre / 'lm'}", f"--clip_pretrained={pre / 'vision.safetensors'}",
            "--pretrain_lm_iters=3", "--pretrain_vision_iters=3", "--batch_size=4", "--eval_iters=1",
            "--eval_interval=3", "--log_interval=1", "--max_iters=3"]
    made = run_train(str(tmp_path / "made"), *args, f"--out_dir={tmp_path / 'made'}")  # after the config file's
    assert (pre / "lm" / "stage1.json").exists()
    reused = run_train(str(tmp_path / "reused"), *args, f"--out_dir={tmp_path / 'reused'}")
    assert train_losses(made) == train_losses(reused) and val_losses(made) == val_losses(reused)


def test_the_shapes_config_keeps_its_stand_ins_in_its_out_dir(tmp_path):
    """--out_dir=X alone: stage 1 writes X/pretrained/lm and X/pretrained/vision.safetensors, the checkpoint names
    them, and nothing is written to the config file's ./out-shapes."""
    out = tmp_path / "run"
    before = os.path.exists(os.path.join(ROOT, "out-shapes"))
    run_train(str(out), "config/train_shapes.py", "--pretrain_lm_iters=2", "--pretrain_vision_iters=2",
              "--batch_size=2", "--eval_iters=1", "--eval_interval=2", "--max_iters=2", f"--out_dir={out}")
    assert (out / "pretrained" / "lm" / "stage1.json").exists() and (out / "pretrained" / "vision.safetensors").exists()
    cfg = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["flamingo_config"]
    assert (cfg["lm"], cfg["clip_pretrained"]) == (str(out / "pretrained" / "lm"),
                                                   str(out / "pretrained" / "vision.safetensors"))
    assert os.path.exists(os.path.join(ROOT, "out-shapes")) == before


def test_rows_longer_than_the_lms_positions_stop_at_the_start(assets, tmp_path):
    cmd = [sys.executable, "train.py", f"--out_dir={tmp_path}", *SMALL, *assets, "--block_size=600"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "block_size 600 is longer than the LM's 512 positions" in p.stderr


def test_resume_is_the_uninterrupted_run(assets, reference, tmp_path):
    """Stop at the checkpoint of iteration 4, resume to 8: the same losses, weights and optimizer, exactly."""
    ref_dir, ref = reference
    out = str(tmp_path)
    common = [*SMALL, *assets, "--gradient_accumulation_steps=2"]
    with open(os.path.join(out, "log.jsonl"), "w") as f:  # an old run's log: a new run must not append to it
        f.write(json.dumps({"iter": 99, "loss": 1.0}) + "\n")
    first = run_train(out, *common, "--max_iters=4")
    assert [r["iter"] for r in first] == [0, 1, 2, 3, 4, 4]
    assert train_losses(first) == {k: v for k, v in train_losses(ref).items() if k <= 4}
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 4
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # logged after the checkpoint, by a run that then died
        f.write(json.dumps({"iter": 5, "loss": 1.0}) + "\n" + '{"iter": 6, "lo')  # ... in the middle of a line
    for leftover in ("ckpt.pt.tmp4242", "log.jsonl.tmp17", "notes.txt.tmp1"):  # writes killed mid-way; not ours
        open(os.path.join(out, leftover), "wb").close()
    log = run_train(out, *common, "--max_iters=8", "--init_from=resume")
    printed = open(os.path.join(out, "stdout.txt")).read()
    assert "log.jsonl: dropped 1 records after iter 4 and 1 torn or unreadable lines" in printed
    assert "ckpt.pt.tmp4242, a write a killed run left unfinished" in printed
    assert sorted(f for f in os.listdir(out) if ".tmp" in f) == ["notes.txt.tmp1"]

    def strip(records):  # everything but the timing
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]
    assert strip(log) == strip(ref)  # the whole log, once: no duplicated line for iteration 4
    a = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(ref_dir, "ckpt.pt"), weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 8 and a["best_val_loss"] == b["best_val_loss"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(a["rng"], b["rng"])


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    old = {"iter_num": 1, "w": torch.arange(1000.0)}
    files.atomic_save(old, path)
    before = open(path, "rb").read()

    def crashing_save(obj, f, *args, **kwargs):  # f: a path or an open file
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 half a zip file")
        else:
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(files.FileError, match="disk full"):
        files.atomic_save({"iter_num": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    got = torch.load(path, weights_only=True)
    assert got["iter_num"] == 1 and torch.equal(got["w"], old["w"])


KILLED_WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from files import atomic_save
for i in range(1, 1000):
    w = torch.full((8_000_000,), float(i))  # 32 MB
    atomic_save({{"i": i, "w": w}}, {path!r})
"""


def test_sigkill_during_save_leaves_a_whole_checkpoint(tmp_path):
    """A writer killed (SIGKILL) in the middle of writing leaves the old or the new checkpoint, never a part."""
    path = str(tmp_path / "ckpt.pt")
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER.format(root=ROOT, path=path)], env=ENV)
    partial = []
    try:
        deadline = time.time() + 60
        while not partial and time.time() < deadline and p.poll() is None:
            if os.path.exists(path):  # one save done: kill during a later one, once its temp file has bytes
                partial = [f for f in os.listdir(tmp_path) if ".tmp" in f and os.path.getsize(tmp_path / f) > 0]
            time.sleep(0.001)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert partial, "the writer was never caught in the middle of a save"
    got = torch.load(path, weights_only=True)
    assert got["w"].shape == (8_000_000,) and bool((got["w"] == got["i"]).all())
