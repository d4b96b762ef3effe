"""Checkpoints written before the code was split into its present files still load, and still mean the same.

tests/fixtures/checkpoint_f8f664f/ was written by commit f8f664f's train.py (model.py and data.py whole, before the
redesign), from its own tiny GPT-2 (lm/, saved by that commit's save_pretrained, torch.manual_seed(0)):

    python train.py --out_dir=. --lm=lm --clip=shapes-rn --vision_stage=1 --tokenizer=bytes --batch_size=2 \
        --block_size=128 --resampler_depth=1 --num_latents=4 --resampler_heads=2 --resampler_dim_head=8 \
        --xattn_heads=2 --xattn_dim_head=8 --xattn_ff_mult=2 --eval_iters=1 --log_interval=1 --warmup_iters=1 \
        --learning_rate=1e-2 --gate_lr_mult=10.0 --device=cpu --dtype=float32 --eval_interval=3 --max_iters=3 \
        --cross_attn_from_layer=1 --train_lm_layers=1          (OMP_NUM_THREADS=1)

A random ResNet tower (its weights in the checkpoint), a trained LM layer, a gated block before layers 1 and 2 only.
expected.safetensors holds what that commit's Flamingo.from_checkpoint gave on two shapes test questions: the
logits and loss, and the greedy, beam (2) and sampled (seed 0, top-k 50) continuations of the first question; and
the resumed run's losses below are what that commit's train.py --init_from=resume logged to iteration 5.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
from model import Flamingo, load_model
from test_train import ENV, ROOT

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "checkpoint_f8f664f")
ARGS = ["--clip=shapes-rn", "--vision_stage=1", "--tokenizer=bytes", "--batch_size=2", "--block_size=128",
        "--resampler_depth=1", "--num_latents=4", "--resampler_heads=2", "--resampler_dim_head=8", "--xattn_heads=2",
        "--xattn_dim_head=8", "--xattn_ff_mult=2", "--eval_iters=1", "--log_interval=1", "--warmup_iters=1",
        "--learning_rate=1e-2", "--gate_lr_mult=10.0", "--device=cpu", "--dtype=float32", "--eval_interval=3",
        "--cross_attn_from_layer=1", "--train_lm_layers=1"]


@pytest.fixture(scope="module")
def expected():
    return load_file(os.path.join(FIXTURE, "expected.safetensors"))


def test_old_checkpoint_gives_the_same_logits_and_tokens(expected):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, ckpt = Flamingo.from_checkpoint(FIXTURE, verbose=False)
        model.eval()
        assert ckpt["iter_num"] == 3 and model.config.train_lm_layers == 1 and sorted(model.xattn) == ["1", "2"]
        images = data.normalize(expected["pixels"].numpy(), model.vision.mean, model.vision.std)[:, None]
        with torch.no_grad():
            logits = model(images, expected["idx"])[0]                    # every position's logits
            loss = model(images, expected["idx"], expected["targets"])[1]  # the loss, computed at the targets only
        torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss.reshape(1), expected["loss"], rtol=1e-6, atol=0)
        prompt, first = expected["prompt"], images[:1]
        assert torch.equal(model.generate(first, prompt, 8, temperature=0, stop_token_id=-1), expected["greedy"])
        assert torch.equal(model.generate(first, prompt, 8, temperature=0, num_beams=2, stop_token_id=-1),
                           expected["beams"])
        torch.manual_seed(0)
        assert torch.equal(model.generate(first, prompt, 12, temperature=1.0, top_k=50, stop_token_id=-1),
                           expected["sampled"])
    finally:
        torch.set_num_threads(n)


def test_old_checkpoint_through_load_model():
    """What sample.py and eval.py load: the model and the name of its tokenizer."""
    model, tokenizer = load_model(FIXTURE)
    assert tokenizer == "bytes" and model.config.vision_stage == 1


def test_old_checkpoint_resumes_as_that_commit_resumed_it(tmp_path):
    """train.py --init_from=resume on a copy of the old out_dir: its optimizer state, step, random state and log
    carry on, and iterations 4 and 5 log the losses that commit's own resume logged."""
    out = tmp_path / "out"
    shutil.copytree(FIXTURE, out)
    cmd = [sys.executable, "train.py", f"--out_dir={out}", *ARGS, "--max_iters=5", "--init_from=resume"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["iter"] for r in log] == [0, 1, 2, 3, 3, 4, 5, 5]
    train = {r["iter"]: r["loss"] for r in log if "loss" in r}
    val = {r["iter"]: r["val_loss"] for r in log if "val_loss" in r}
    assert train[4] == pytest.approx(5.43991231918335, rel=1e-6) and train[5] == pytest.approx(5.4092535972595215, rel=1e-6)
    assert val[5] == pytest.approx(5.424877166748047, rel=1e-6)
