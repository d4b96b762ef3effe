"""Nothing lost, nothing confusing: a corpus of hostile inputs and failures built here, each checked for its message
or its count and for what it must not lose.

- files.py: JSON nested too deep; a full or read-only disk at a write; a kill at every point of the rewrite of
  log.jsonl on resume; the out_dir lock against a second process, gone with a killed one; each way a checkpoint
  file can be wrong;
- train.py, sample.py, eval.py as users run them: one `error:` line for every load failure and bad setting, two
  runs on one out_dir, a full or read-only disk at a checkpoint (the run stops, the previous checkpoint kept);
- data: nested JSON and symbolic links out of the folder in dataset folders, nested JSON in tar shards, a
  decompression bomb in eval.py (a counted skip; finished trials kept through a kill, a rerun skipping them) and in
  sample.py.
"""

import builtins
import errno
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter

import pytest
import torch
from PIL import Image

import files
import folders
import hf
import shards
from test_eval import custom_folder, png
from test_train import ENV, ROOT, SMALL, make_assets, run_train

DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested 100,000 deep


def run(script, *args, prelude=""):
    """A script as a user runs it (or, with a prelude, after the prelude ran in its process): (rc, stdout, stderr)."""
    cmd = [sys.executable, script, *args] if not prelude else \
        [sys.executable, "-c", prelude + f"\nimport runpy, sys\nsys.argv[0] = {script!r}\n"
         f"runpy.run_path({script!r}, run_name='__main__')", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def assert_one_error_line(rc, stdout, stderr, *needles):
    assert rc != 0 and "Traceback" not in stdout + stderr, stdout[-2000:] + stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), stderr[-2000:]
    for n in needles:
        assert n in last, last
    return last


# -----------------------------------------------------------------------------
# files.py

def test_json_nested_too_deep_is_a_value_error():
    with pytest.raises(ValueError, match="nested too deep"):
        files.loads(DEEP)
    assert files.loads('{"a": [1, 2]}') == {"a": [1, 2]}


class FullDisk(io.FileIO):
    """A file on a disk that takes `room` more bytes, then fails as a full (or a read-only) disk does."""
    room, code = 4096, errno.ENOSPC

    def write(self, b):
        b = bytes(b)
        if self.tell() + len(b) <= self.room:
            return super().write(b)
        super().write(b[:max(0, self.room - self.tell())])
        raise OSError(self.code, os.strerror(self.code))


def failing_open(match, code):
    FullDisk.code = code
    return lambda p, mode="r", *a, **k: FullDisk(p, "a" if "a" in mode else "w") if match in str(p) else \
        builtins.open(p, mode, *a, **k)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk full writing"), (errno.EROFS, "Read-only file system")])
def test_a_failed_write_says_why_and_keeps_the_old_file(tmp_path, monkeypatch, code, words):
    path = str(tmp_path / "ckpt.pt")
    files.atomic_save({"w": torch.arange(10.0)}, path)
    before = open(path, "rb").read()
    monkeypatch.setattr(files, "open", failing_open(".tmp", code), raising=False)
    with pytest.raises(files.FileError) as e:
        files.atomic_save({"w": torch.zeros(1_000_000)}, path)  # 4 MB (torch.save reports ENOSPC as RuntimeError)
    msg = str(e.value)
    assert words in msg and path in msg and "the previous file is kept" in msg and "\n" not in msg
    if code == errno.ENOSPC:
        assert "about 4.0 MB needed" in msg and "B free there" in msg
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left
    log = str(tmp_path / "log.jsonl")
    monkeypatch.setattr(files, "open", failing_open("log.jsonl", code), raising=False)
    FullDisk.room = 10
    try:
        with pytest.raises(files.FileError, match=words):
            files.append_log(log, {"iter": 1, "loss": 2.0})
    finally:
        FullDisk.room = 4096


def log_lines():
    lines = []
    for it in range(13):
        if it % 4 == 0:
            lines.append(json.dumps({"iter": it, "val_loss": 3.0 - it / 10}))
        if it:
            lines.append(json.dumps({"iter": it, "loss": 4.0 - it / 10, "lr": 1e-3}))
    return lines


KILL_AT = """
import os, sys
sys.path.insert(0, {root!r})
import files
point, real_open, real_replace = {point!r}, open, os.replace


def dying_open(p, mode="r", *a, **k):
    f = real_open(p, mode, *a, **k)
    if ".tmp" not in str(p):
        return f
    if point == "created":  # the temp file exists, empty
        os._exit(9)

    class Half:  # half of the new log written, then killed
        def __enter__(self): return self
        def __exit__(self, *e): pass
        def write(self, b): f.write(b[:len(b) // 2]); f.flush(); os._exit(9)
    return Half()


if point in ("created", "half written"):
    files.open = dying_open
elif point == "written":  # killed before the fsync
    os.fsync = lambda fd: os._exit(9)
elif point == "synced":  # before the rename
    os.replace = lambda a, b: os._exit(9)
elif point == "renamed":  # after it, before the folder's fsync
    os.replace = lambda a, b: (real_replace(a, b), os._exit(9))
files.resume_log({path!r}, 8)
"""


@pytest.mark.parametrize("point", ["created", "half written", "written", "synced", "renamed"])
def test_a_kill_anywhere_in_the_logs_rewrite_loses_nothing(tmp_path, point):
    """The resume of a run whose checkpoint is at iter 8 and whose log goes on to 12, with a torn last line: killed
    at each point of the rewrite, the log is the old one or the new one, and the next resume completes it."""
    path = str(tmp_path / "log.jsonl")
    old = "\n".join(log_lines()) + '\n{"iter": 13, "lo'
    want = "".join(line + "\n" for line in log_lines() if json.loads(line)["iter"] <= 8)
    open(path, "w").write(old)
    p = subprocess.run([sys.executable, "-c", KILL_AT.format(root=ROOT, point=point, path=path)], env=ENV)
    assert p.returncode == 9
    assert open(path).read() in (old, want)
    files.remove_leftovers(str(tmp_path), ["log.jsonl"])  # what train.py does at its start, holding the lock
    assert os.listdir(tmp_path) == ["log.jsonl"]
    files.resume_log(path, 8)
    assert open(path).read() == want
    assert files.resume_log(path, 8) is None  # a log that is already right is not rewritten


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
import files
files.lock({path!r}, "out_dir x")
print("locked", flush=True)
time.sleep(120)
"""


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    path = str(tmp_path / "train.lock")
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, path=path)], env=ENV, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(files.FileError, match=rf"out_dir x is in use by another run \(pid {p.pid}\)"):
            files.lock(path, "out_dir x")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    files.lock(path, "out_dir x")  # a killed holder leaves no stale lock
    assert open(path).read().strip() == str(os.getpid())


def test_leftovers_of_ours_only(tmp_path):
    for f in ("ckpt.pt", "ckpt.pt.tmp123", "ckpt.pt.tmpx", "log.jsonl.tmp9", "vision_features.npy.part", "a.tmp1"):
        open(tmp_path / f, "w").close()
    gone = files.remove_leftovers(str(tmp_path), ["ckpt.pt", "log.jsonl", "vision_features.npy"])
    assert gone == ["ckpt.pt.tmp123", "log.jsonl.tmp9", "vision_features.npy.part"]
    assert sorted(os.listdir(tmp_path)) == ["a.tmp1", "ckpt.pt", "ckpt.pt.tmpx"]


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # what loading would run, if it ran anything


def bad_checkpoints(folder, good=None):
    """{kind: path} of files that are not loadable checkpoints (good: a real ckpt.pt to damage)."""
    os.makedirs(folder, exist_ok=True)
    paths = {k: os.path.join(folder, k, "ckpt.pt") for k in ("empty", "text", "tensor", "code", "truncated", "keys")}
    for p in paths.values():
        os.makedirs(os.path.dirname(p), exist_ok=True)
    open(paths["empty"], "wb").close()
    open(paths["text"], "w").write("hello, I am not a checkpoint\n")
    torch.save(torch.zeros(3), paths["tensor"])
    torch.save({"flamingo_config": {}, "model": Evil(os.path.join(folder, "PWNED"))}, paths["code"])
    if good:
        raw = open(good, "rb").read()
        open(paths["truncated"], "wb").write(raw[:len(raw) // 2])
        ckpt = torch.load(good, weights_only=True)
        ckpt["model"]["xattn.9.attn_gate"] = torch.zeros(1)  # another config's checkpoint
        torch.save(ckpt, paths["keys"])
    else:
        del paths["truncated"], paths["keys"]
    return paths


BAD_CHECKPOINT_WORDS = {"empty": "is empty or truncated", "text": "is not a PyTorch file",
                        "tensor": "not a checkpoint of this project", "code": "holds Python objects other than tensors",
                        "truncated": "is truncated or not a PyTorch file", "keys": "unexpected ['xattn.9.attn_gate']"}


def test_each_bad_checkpoint_is_one_sentence(tmp_path):
    from model import Flamingo
    for kind, path in bad_checkpoints(str(tmp_path)).items():
        with pytest.raises(files.FileError, match=BAD_CHECKPOINT_WORDS[kind]):
            Flamingo.from_checkpoint(path, verbose=False)
    assert not os.path.exists(tmp_path / "PWNED")  # nothing in the file ran
    with pytest.raises(files.FileError, match="no such file"):
        files.torch_load(str(tmp_path / "missing.pt"))


def test_nested_json_in_a_checkpoints_config(tmp_path):
    (tmp_path / "config.json").write_text(DEEP)
    with pytest.raises(files.FileError, match="nested too deep"):
        hf.read_config(str(tmp_path))


# -----------------------------------------------------------------------------
# Data: folders and tar shards

def test_folders_skip_nested_json_and_links_out_of_the_folder(tmp_path):
    root = custom_folder(str(tmp_path / "folder"))
    png(str(tmp_path / "outside.png"))
    os.symlink(tmp_path / "outside.png", tmp_path / "folder" / "img" / "link.png")
    os.symlink(tmp_path, tmp_path / "folder" / "up")  # a linked folder on the way
    with open(os.path.join(root, "train.jsonl"), "a") as f:
        f.write(DEEP + "\n")
        for name in ("img/link.png", "up/outside.png"):
            f.write(json.dumps({"image": name, "question": "q", "answers": ["a"]}) + "\n")
    said = []
    examples = folders.read_folder(root, "train", "vqa", log=said.append)
    assert len(examples) == 6 and all("outside" not in ex["image"] and "link" not in ex["image"] for ex in examples)
    assert any(":13: skipped: JSON nested too deep" in s for s in said), said
    assert sum("links to a file outside the folder" in s for s in said) == 2, said


def test_shards_count_nested_json(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    members = [("a.png", buf.getvalue()), ("a.json", DEEP.encode()), ("b.png", buf.getvalue()), ("b.txt", b"ok")]
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    skipped = Counter()
    assert [k for k, _, _ in shards.read_pairs([str(tmp_path / "s.tar")], skipped, image_size=8)] == ["b"]
    assert skipped == {"bad json": 1}
    skipped = Counter()
    assert not list(shards.read_docs([str(tmp_path / "s.tar")], skipped, image_size=8))
    assert skipped["bad json"] == 2  # a's is nested too deep; b has none


# -----------------------------------------------------------------------------
# The scripts as users run them

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(assets arguments, an out_dir of train.py with a checkpoint at iter 2)."""
    root = tmp_path_factory.mktemp("robust")
    assets = make_assets(str(root))
    out = str(root / "out")
    run_train(out, *SMALL, *assets, "--max_iters=2", "--eval_interval=2", "--eval_iters=1")
    return assets, out


@pytest.mark.parametrize("arg, words", [
    ("--eval_interval=0", "eval_interval=0: must be a number >= 1"),
    ("--log_interval=0", "log_interval=0: must be a number >= 1"),
    ("--batch_size=0", "batch_size=0: must be a number >= 1"),
    ("--batch_size=None", "batch_size=None: must be a number >= 1"),
    ("--max_iters=-1", "max_iters=-1: must be a number >= 0"),
    ("--dtype=float64", "dtype='float64': must be one of 'float32', 'bfloat16', 'float16'"),
    ("--eval_intervall=3", "unknown config key 'eval_intervall'"),
])
def test_train_refuses_bad_settings_at_the_start(tmp_path, arg, words):
    assert_one_error_line(*run("train.py", f"--out_dir={tmp_path}", arg), words)
    assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.parametrize("script, arg, words", [
    ("sample.py", "--top_k=0", "top_k=0: must be a number >= 1 (or None)"),
    ("sample.py", "--max_new_tokens=-1", "max_new_tokens=-1: must be a number >= 1"),
    ("sample.py", "--top_p=1.5", "top_p=1.5: must be a number <= 1"),
    ("eval.py", "--num_trials=0", "num_trials=0: must be a number >= 1"),
    ("eval.py", "--num_samples=0", "num_samples=0: must be a number >= 1 (or None)"),
])
def test_sample_and_eval_refuse_bad_settings(script, arg, words):
    assert_one_error_line(*run(script, arg), words)


def test_every_load_failure_is_one_line(trained, tmp_path):
    assets, out = trained
    bad = bad_checkpoints(str(tmp_path), os.path.join(out, "ckpt.pt"))
    png(str(tmp_path / "a.png"))
    for i, (kind, path) in enumerate(bad.items()):
        folder = os.path.dirname(path)
        script = ("sample.py", "eval.py", "train.py")[i % 3]  # each script meets two kinds
        args = {"sample.py": [f"--init_from={folder}", "--image", str(tmp_path / "a.png")],
                "eval.py": [f"--init_from={folder}"],
                "train.py": [f"--out_dir={folder}", "--init_from=resume", *SMALL, *assets]}[script]
        assert_one_error_line(*run(script, *args), BAD_CHECKPOINT_WORDS[kind])
    assert not os.path.exists(tmp_path / "PWNED")
    empty = str(tmp_path / "fresh")
    assert_one_error_line(*run("train.py", f"--out_dir={empty}", "--init_from=resume", *SMALL, *assets),
                          "init_from='resume', but", "does not exist")


def test_two_runs_on_one_out_dir(trained, tmp_path):
    assets, _ = trained
    out = str(tmp_path / "out")
    args = [f"--out_dir={out}", *SMALL, *assets, "--max_iters=100000"]
    first = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "ckpt.pt")) and time.time() < deadline:
            time.sleep(0.2)
        assert os.path.exists(os.path.join(out, "ckpt.pt")), "the first run never saved"
        for extra in ([], ["--init_from=resume"]):  # a second run, or a resume while the first still runs
            assert_one_error_line(*run("train.py", *args, *extra), f"out_dir {out} is in use by another run "
                                                                   f"(pid {first.pid})")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    rc, stdout, stderr = run("train.py", *args[:-1], "--max_iters=2", "--init_from=resume")  # the lock died with it
    assert rc == 0, stderr[-3000:]


DISK = """
import builtins, errno, io, os
real_open, saves = builtins.open, []


class Full(io.FileIO):
    def write(self, b):
        if self.tell() + len(b) > 4096:
            raise OSError({code}, os.strerror({code}))
        return super().write(b)


def open_(p, mode="r", *a, **k):
    if "ckpt.pt.tmp" in str(p):
        saves.append(p)
        if len(saves) >= {fail_at}:
            return Full(p, "w")
    return real_open(p, mode, *a, **k)


builtins.open = open_
if {lock_fails}:
    real_os_open = os.open
    os.open = lambda p, *a, **k: (_ for _ in ()).throw(OSError({code}, os.strerror({code}))) \\
        if str(p).endswith("train.lock") else real_os_open(p, *a, **k)
"""


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk full writing"), (errno.EROFS, "Read-only file system")])
def test_a_full_or_read_only_disk_stops_the_run_and_keeps_the_checkpoint(trained, tmp_path, code, words):
    assets, _ = trained
    out = str(tmp_path / "out")
    args = [f"--out_dir={out}", *SMALL, *assets, "--max_iters=8"]
    last = assert_one_error_line(*run("train.py", *args, prelude=DISK.format(code=code, fail_at=2, lock_fails=False)),
                                 words, os.path.join(out, "ckpt.pt"), "training stopped at iter 8")
    assert "previous file is kept" in last
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 4
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl", "train.lock"]  # no temp file left
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["iter"] for r in log] == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 8]  # all that was trained, logged
    rc, _, stderr = run("train.py", *args, "--init_from=resume")  # once there is room: on from iter 4
    assert rc == 0, stderr[-3000:]
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["iter"] for r in log] == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 8]
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 8
    if code == errno.EROFS:  # read-only from the start: refused before anything is loaded
        rc, stdout, stderr = run("train.py", *args, prelude=DISK.format(code=code, fail_at=99, lock_fails=True))
        assert_one_error_line(rc, stdout, stderr, f"cannot write in {out}: Read-only file system")


def bomb(path):
    """A PNG of 15,000 x 15,000 pixels in a few kB: PIL refuses to decode it (DecompressionBombError)."""
    Image.new("1", (15000, 15000)).save(path)
    return path


def test_sample_refuses_a_decompression_bomb(trained, tmp_path):
    _, out = trained
    path = bomb(str(tmp_path / "bomb.png"))
    assert_one_error_line(*run("sample.py", f"--init_from={out}", "--image", path), "cannot read image", path,
                          "DecompressionBombError")


def test_eval_counts_bad_examples_and_keeps_finished_trials(trained, tmp_path):
    """A decompression bomb among the test images is a counted skip; eval.py killed after its first trial keeps
    that trial's record, and the rerun with the same --results runs only the trials not done."""
    _, out = trained
    root = custom_folder(str(tmp_path / "folder"))
    bomb(os.path.join(root, "img", "test1.png"))
    res = str(tmp_path / "r.json")
    args = ["eval.py", f"--init_from={out}", "--task=vqa", f"--data_dir={root}", "--shots=0", "--num_trials=6",
            "--max_new_tokens=2", "--num_beams=1", f"--results={res}"]
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(res) and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    first = json.load(open(res))  # whole, however the kill fell
    assert 1 <= len(first) < 6
    rc, stdout, stderr = run(*args)
    assert rc == 0, stderr[-3000:]
    records = json.load(open(res))
    assert records[:len(first)] == first and [r["seed"] for r in records] == list(range(42, 48))
    for r in records:
        assert r["n"] == 3 and r["skipped"] == {"unreadable image (DecompressionBombError)": 1}
    assert stdout.count("not run again") == len(first)
    rc, stdout, _ = run(*args)  # everything done: nothing runs
    assert rc == 0 and stdout.count("not run again") == 6 and json.load(open(res)) == records


def test_eval_results_have_one_writer(trained, tmp_path):
    _, out = trained
    res = str(tmp_path / "r.json")
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, path=res + ".lock")], env=ENV,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        assert_one_error_line(*run("eval.py", f"--init_from={out}", f"--results={res}"),
                              f"--results {res} is in use by another run (pid {p.pid})")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not os.path.exists(res)
