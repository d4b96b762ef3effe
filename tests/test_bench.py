"""bench.py's comparison holds what it says: OpenFlamingo 2.0.1's own model and ours, built by bench_openflamingo.py
from the same files, give the same logits, the same generated tokens (prompts of different lengths, greedy and 3
beams) and the same training loss; the synthetic samples in our format are exactly what shards.py reads from tar
shards of them; OpenFlamingo's padded batches hold our ids, then padding; and bench.py runs end to end. Tiny sizes,
CPU, no network; skipped without OpenFlamingo's code (requirements-reference.txt)."""

import io
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("open_flamingo")

import bench_openflamingo as of  # noqa: E402
from data import collate, normalize  # noqa: E402
from shards import ShardDataset  # noqa: E402
from test_train import ROOT  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    return of.build(str(tmp_path_factory.mktemp("bench")), "tiny")


def test_same_logits(pair):
    assert of.check_same_logits(pair) < 1e-4


def test_samples_are_what_shards_read(pair, tmp_path):
    """The LAION-like pairs and MMC4-like documents, written as tar shards, come out of shards.ShardDataset as
    ours_pairs / ours_docs give them; OpenFlamingo's batches of them start with the same ids, then padding."""
    rng, S = np.random.default_rng(0), pair.image_size
    pairs, docs = of.laion_like_pairs(8, rng, S), of.mmc4_like_docs(4, rng, S, pair)
    ours_p, ours_d = of.ours_pairs(pair, pairs), of.ours_docs(pair, docs)
    pair_files = [(f"{i:04d}.{e}", raw) for i, p in enumerate(pairs)
                  for e, raw in (("png", p["png"]), ("txt", p["caption"].encode()))]
    doc_files = [(f"{i:04d}.json", d["json"].encode()) for i, d in enumerate(docs)]
    for kind, files, want in (("pairs", pair_files, ours_p), ("docs", doc_files, ours_d)):
        with tarfile.open(tmp_path / f"{kind}.tar", "w") as tar:
            for name, raw in files:
                info = tarfile.TarInfo(name)
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
        got = list(ShardDataset([str(tmp_path / f"{kind}.tar")], kind, pair.tok, image_size=S, log=lambda m: None))
        assert [i for i, _ in got] == [i for i, _ in want], kind
        assert all(np.array_equal(a, b) for g, w in zip(got, want) for a, b in zip(g[1], w[1], strict=True)), kind
    assert sum(len(ims) for _, ims in ours_d) > len(ours_d)  # documents with several images
    bp = of.of_pairs_batch(pair, [p["caption"] for p in pairs], [p["image"] for p in pairs])
    bd = of.of_docs_batch(pair, docs)
    for batch, samples in ((bp, of.ours_pairs(pair, pairs, of.CAPTION_TOKENS)), (bd, ours_d)):
        for row, (ids, _) in zip(batch["lang_x"].tolist(), samples):
            assert row[:len(ids)] == ids and set(row[len(ids):]) <= set(pair.ids.values())
    # documents: the same targets on both sides, row by row
    mean, std = pair.ours.vision.mean, pair.ours.vision.std
    for b, s in enumerate(ours_d):
        row = {k: v[b:b + 1] for k, v in bd.items() if k != "vision_x"}
        assert of.count_targets(row) == of.count_targets(collate([s], pair.tok, of.DOC_TOKENS, mean, std))


def test_same_tokens_and_loss(pair):
    """Generation: prompts of different lengths in one batch, greedy and 3 beams (length_penalty 0, OpenFlamingo's
    evaluation): the same new tokens. Training: the same loss on our rows put in OpenFlamingo's tensors."""
    rng, S = np.random.default_rng(1), pair.image_size
    mean, std = pair.ours.vision.mean, pair.ours.vision.std
    samples = of.laion_like_pairs(4, rng, S)
    chunk = of.ours_pairs(pair, samples[:1])[0][0][:-1]                  # a shot: <image>caption<|endofchunk|>
    query = pair.tok.encode_markup("<image>Output:")
    prompts = [chunk + query, query, chunk + chunk + query]
    per_prompt = [normalize([s["image"] for s in samples[:n]], mean, std) for n in (2, 1, 3)]
    for beams in (1, 3):
        ours = pair.ours.generate(torch.cat(per_prompt)[:, None], prompts, 8, temperature=0, num_beams=beams,
                                  length_penalty=0.0)
        assert ours == of.of_generate(pair, prompts, per_prompt, 8, num_beams=beams, allow_image=False)
        assert all(ours)
    rows = of.interleaved_rows(pair, rng, 2, 64, 2)
    batch, theirs = collate(rows, pair.tok, 64, mean, std), of.of_rows_batch(pair, rows)
    with torch.no_grad():
        want = pair.ref(theirs["vision_x"], theirs["lang_x"], theirs["attention_mask"], theirs["labels"]).loss
        got = pair.ours(batch.images, batch.idx, batch.targets)[1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert of.count_targets(batch) == of.count_targets(theirs)


def test_bench_runs_end_to_end(tmp_path):
    """python bench.py at tiny sizes, one timed pair each: every part runs, agrees, and writes its numbers."""
    import json
    import os
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # transformers needed: OpenFlamingo's
    p = subprocess.run([sys.executable, "bench.py", "--size=tiny", "--repeats=1", "--slow_repeats=1",
                        f"--workdir={tmp_path}", f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    parts = json.load(open(out))["parts"]
    assert sorted(parts) == ["data", "eval", "generate", "train"]
    assert len(parts["generate"]) == 4 and all(r["per_token_ratio"] > 0 for r in parts["generate"])
    assert [r["samples"] for r in parts["data"]] == [32, 8]
