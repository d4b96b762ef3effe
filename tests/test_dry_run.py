"""`python train.py <config> --dry_run=True` (CPU, offline, seconds), and activation checkpointing.

- every config in config/ builds on the meta device and ends with one JSON line of sizes and memory per GPU,
  in a process that stays small (no weights read or allocated: a 7B LM in bf16 alone would be 13.5 GB);
- config/9b.py has OpenFlamingo-9B's trained parts, counted exactly;
- the shapes config's dry run, before stage 1 has made its LM, counts the LM stage 1 would make, and makes nothing;
- checkpointing each LM layer gives the same loss and gradients as keeping its activations.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from model import Flamingo, FlamingoConfig
from test_model import EOC, IMG, LM_CONFIGS, OPTS, V, images_for, open_gates_, randomize_
from test_train import ENV, ROOT

# train.py run as __main__, its peak resident memory (RSS) written to stderr as it exits
RUN_WITH_RSS = ("import atexit, resource, runpy, sys; sys.path.insert(0, '.'); sys.argv = ['train.py', *sys.argv[1:]]; "
                "atexit.register(lambda: print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
                "file=sys.stderr)); runpy.run_path('train.py', run_name='__main__')")
MAX_RSS_GB = 1.5  # torch and open_clip alone take ~0.5-0.75 GB here; ViT-L/14 in fp32 alone would add 1.2 GB


def dry_run(*args):
    """Run a dry run; returns (its JSON record, its stdout, its peak RSS in GB)."""
    cmd = [sys.executable, "-c", RUN_WITH_RSS, *args, "--dry_run=True"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{' '.join(args)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    records = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 1 and p.stdout.splitlines()[-1] == records[0], p.stdout[-2000:]
    record = json.loads(records[0])
    assert set(record) == {"total_params", "trained_params", "memory_per_gpu_gb"}
    rss_gb = int(p.stderr.split("maxrss_kb")[-1]) * 1024 / 1e9
    assert rss_gb < MAX_RSS_GB, f"{args}: peak RSS {rss_gb:.2f} GB"
    return record, p.stdout, rss_gb


def xattn_block_params(C, D, heads=8, dim_head=64, ff_mult=4):
    """One GATED XATTN-DENSE block as OpenFlamingo builds it: LN + to_q + to_kv + to_out, LN + FFW, 2 gates."""
    inner = heads * dim_head
    return 2 * C + C * inner + D * 2 * inner + inner * C + 2 * C + 2 * C * ff_mult * C + 2


def resampler_params(D, depth=6, heads=8, dim_head=64, num_latents=64, ff_mult=4):
    inner = heads * dim_head
    layer = 4 * D + D * inner + D * 2 * inner + inner * D + 2 * D + 2 * D * ff_mult * D
    return num_latents * D + depth * layer + 2 * D


def test_9b():
    """OpenFlamingo-9B's layout and LM, MPT-7B. Trained: 8 gated blocks of width 4096 over vision width 1024 (139.5M
    each), the resampler (63.0M), the two new rows of the input embedding (their output rows are the same tensors,
    tie_new_tokens, as MPT's head is its table) and, as OpenFlamingo trains it, MPT-7B's whole input table (50432 x
    4096): 1,385,412,624, OpenFlamingo-9B's "1.4B". Total:
    the trained parts less that table + MPT-7B (6,649,286,656: its table, 32 layers of 201,334,784, the final norm)
    + CLIP ViT-L/14's vision tower (303,966,208) = 8.13B: "9B" is Flamingo-9B's name (its trained parts are larger)."""
    record, out, _ = dry_run("config/9b.py")
    table = 50432 * 4096
    trained = 8 * xattn_block_params(4096, 1024) + resampler_params(1024) + 2 * 4096 + table
    assert trained == 1_385_412_624
    assert record["trained_params"] == trained
    assert record["total_params"] == trained - table + 6_649_286_656 + 303_966_208
    # the frozen LM in bf16 (~13 GB) + ~1.4B trained parameters with AdamW (~22 GB) + a little
    # activation memory with checkpointing: fits an 80 GB GPU with DDP
    assert 36 < record["memory_per_gpu_gb"] < 43
    assert "activation checkpointing" in out and "DDP" in out
    fsdp, out, _ = dry_run("config/9b.py", "--fsdp=True")
    assert "FSDP over 8" in out
    assert fsdp["total_params"] == record["total_params"] and fsdp["trained_params"] == trained
    weights = (record["total_params"] - trained) * 2 + trained * 16  # bytes: frozen in bf16, trained with AdamW
    assert fsdp["memory_per_gpu_gb"] == pytest.approx(record["memory_per_gpu_gb"] - weights * 7 / 8 / 1e9, abs=0.02)
    # without OpenFlamingo's choice, every original LM weight stays frozen (Flamingo section 3)
    frozen_table, _, _ = dry_run("config/9b.py", "--train_lm_embeddings=False")
    assert frozen_table["trained_params"] == trained - table


def test_coco_tiny():
    """GPT-2 124M and ViT-B/32, both frozen; about 50M trained parameters; no data read (data/coco need not exist)."""
    record, out, _ = dry_run("config/train_coco_tiny.py")
    assert record["total_params"] - record["trained_params"] == 124_439_808 + 87_849_216  # GPT-2 + ViT-B/32 tower
    assert 40e6 < record["trained_params"] < 60e6
    assert record["memory_per_gpu_gb"] < 8  # a laptop


def test_shapes_before_stage_1(tmp_path):
    """Before stage 1 has made out-shapes/pretrained, the dry run counts the LM that pretrain_shapes.pretrain_lm
    would make, and makes nothing; the same numbers once that LM exists."""
    from pretrain_shapes import pretrain_lm
    missing = tmp_path / "not-yet" / "lm"
    before, out, _ = dry_run("config/train_shapes.py", f"--lm={missing}")
    assert "does not exist yet" in out
    assert not (tmp_path / "not-yet").exists()
    made = tmp_path / "lm"
    torch.manual_seed(0)
    pretrain_lm(str(made), iters=0, log=lambda *a: None)  # stage 1's LM, untrained: only its config matters
    after, out, _ = dry_run("config/train_shapes.py", f"--lm={made}")
    assert "does not exist yet" not in out
    assert after == before
    assert before["trained_params"] > before["total_params"] / 2  # tiny stand-ins: the trained parts dominate


def test_shapes_video(tmp_path):
    """The moving-shapes world's config: the image world's model with time embeddings for 4 frames, 3 more than the
    image model's one, as wide as the tower's features; nothing made."""
    missing = tmp_path / "not-yet" / "lm"
    video, out, _ = dry_run("config/train_shapes_video.py", f"--lm={missing}")
    image, _, _ = dry_run("config/train_shapes.py", f"--lm={missing}")
    extra = video["trained_params"] - image["trained_params"]
    assert video["total_params"] - image["total_params"] == extra and extra > 0 and extra % 3 == 0
    assert not (tmp_path / "not-yet").exists()


def test_every_config_has_a_dry_run():
    # finetune_folder.py's dry run needs a checkpoint: tests/test_folder_train.py writes one and runs it
    assert sorted(os.listdir(os.path.join(ROOT, "config"))) == [
        "9b.py", "clip", "finetune_folder.py", "tokenizer", "train_coco_tiny.py", "train_shapes.py",
        "train_shapes_video.py"], "a new config: add a dry run here"


# -----------------------------------------------------------------------------
# Activation checkpointing


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_activation_checkpointing_same_loss_and_gradients(arch):
    torch.manual_seed(0)
    opts = {k: v for k, v in OPTS.items() if k not in ("clip", "verbose")}
    m = Flamingo.from_config(FlamingoConfig(lm=arch, clip="flamingo-tiny", **opts), LM_CONFIGS[arch])
    randomize_(m.lm, 0.2, seed=1)
    randomize_(m.perceiver, 0.3, seed=2)
    randomize_(m.xattn, 0.3, seed=3)
    open_gates_(m, 1.0)  # gradients reach every trained part
    m.train()
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, V, (2, 16), generator=g)
    idx[0, [2, 9]] = IMG
    idx[1, 5] = IMG
    idx[1, 12] = EOC
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -1)], dim=1)
    images = images_for(3, seed=5)
    calls = []
    m.lm.transformer.h[0].register_forward_pre_hook(lambda *_: calls.append(1))  # a pre-hook: recomputation stops early

    def loss_and_grads(checkpointing):
        m.activation_checkpointing = checkpointing
        m.zero_grad(set_to_none=True)
        calls.clear()
        _, loss = m(images, idx, targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}, len(calls)

    loss, grads, n_calls = loss_and_grads(False)
    loss_ckpt, grads_ckpt, n_calls_ckpt = loss_and_grads(True)
    assert (n_calls, n_calls_ckpt) == (1, 2)  # checkpointed: layer 0 ran again in the backward pass
    assert torch.allclose(loss, loss_ckpt, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    for n in grads:
        assert grads[n].abs().sum() > 0 or n.startswith("new_"), f"{n}: no gradient, the test would prove nothing"
        assert torch.allclose(grads[n], grads_ckpt[n], rtol=1e-5, atol=1e-7), n
    with torch.no_grad():  # without gradients nothing is checkpointed (generation, evaluation)
        calls.clear()
        m(images, idx)
        assert len(calls) == 1

