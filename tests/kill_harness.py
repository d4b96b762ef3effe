"""SIGKILL a tiny shapes run again and again, resuming it each time, then compare its final log and weights with an
uninterrupted run (docs/measurements.md has what it measured). Not a test: it runs for minutes.

    python tests/kill_harness.py [KILLS] [SEED] [MAX_ITERS]

Every second kill falls at a random moment 2 to 8 s into a run, the others the instant a temp file shows in an
out_dir that holds a checkpoint (a later checkpoint's write, or the rewrite of log.jsonl on resume, in progress)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # the tests' helpers, and the project's modules they import
from test_train import ENV, ROOT, SMALL, make_assets  # noqa: E402

given = [int(a) for a in sys.argv[1:4]]
kills, seed, max_iters = given + [12, 0, 100][len(given):]
rng = random.Random(seed)
base = tempfile.mkdtemp(prefix="kill-harness-")
args = [*SMALL, *make_assets(base), "--gradient_accumulation_steps=2", f"--max_iters={max_iters}",
        "--eval_interval=2"]


def train(out, *extra):
    return subprocess.Popen([sys.executable, "train.py", f"--out_dir={out}", *args, *extra], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


assert train(f"{base}/ref").wait() == 0
out, killed, inside, resumes = f"{base}/victim", 0, 0, 0
while True:
    resume = os.path.exists(f"{out}/ckpt.pt")
    resumes += resume
    p = train(out, *(["--init_from=resume"] if resume else []))
    if killed < kills and killed % 2 == 0:
        try:
            p.wait(timeout=rng.uniform(2.0, 8.0))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            killed += 1
    elif killed < kills:
        while p.poll() is None:
            if os.path.exists(f"{out}/ckpt.pt") and any(".tmp" in f for f in os.listdir(out)):  # an old one to lose
                p.send_signal(signal.SIGKILL)
                killed, inside = killed + 1, inside + 1
                break
            time.sleep(0.0005)
    rc = p.wait()
    if rc not in (0, -signal.SIGKILL):
        sys.exit(f"a run failed ({rc}): {p.stderr.read().decode()[-3000:]}")
    if rc == 0:
        break


def log(d):  # the records, less the timing
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in open(f"{d}/log.jsonl")]


a, b = (torch.load(f"{d}/ckpt.pt", weights_only=True)["model"] for d in (out, f"{base}/ref"))
print(json.dumps({"seed": seed, "max_iters": max_iters, "kills": killed, "inside_writes": inside, "resumes": resumes,
                  "log_equal": log(out) == log(f"{base}/ref"),
                  "weights_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b),
                  "leftovers": [f for f in os.listdir(out) if ".tmp" in f or f.endswith(".part")]}))
shutil.rmtree(base)
