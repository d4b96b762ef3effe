"""Tar shard readers (shards.py): LAION-style pairs, MMC4-style documents, shard splitting, skips."""

import base64
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import shapes
import shards
from tokenizer import EOC, EOT, IMAGE, get_tokenizer


def scene(seed):
    rng = np.random.default_rng(seed)
    return shapes.render(shapes.random_scene(rng), rng)  # (64, 64, 3) uint8


def encode(img, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, members):
    """members: [(name, bytes)] in order."""
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(path)


def truncate_in_last_member(path):
    """Cut the file in the middle of its last member's data (a cut inside a header: the test below)."""
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    with open(path, "r+b") as f:
        f.truncate(last.offset_data + last.size // 2)


# -----------------------------------------------------------------------------
# image-text pairs

def test_pairs_read_good_samples_and_count_bad_ones(tmp_path):
    good = {}  # key -> (caption, image)
    members = []
    for i in range(4):
        key, img = f"{i:06d}", scene(i)
        good[key] = (f"caption number {i}", img)
        if i % 2:  # img2dataset writes .txt and .json; a .json caption alone is enough
            members += [(f"{key}.png", encode(img)), (f"{key}.json", json.dumps({"caption": good[key][0]}).encode())]
        else:
            members += [(f"{key}.png", encode(img)), (f"{key}.txt", good[key][0].encode()),
                        (f"{key}.json", b'{"url": "http://x"}')]
    members += [
        ("badimg.jpg", b"\xff\xd8 not a jpeg at all"), ("badimg.txt", b"a broken image"),
        ("nocap.jpg", encode(scene(10), "JPEG")),
        ("badjson.jpg", encode(scene(11), "JPEG")), ("badjson.json", b'{"caption": "unterminated'),
        ("orphan.txt", b"a caption without its image"),
    ]
    shard0 = write_tar(tmp_path / "000.tar", members)
    # a second shard, truncated inside the data of its third sample: the first two are still read
    members = []
    for i in range(4, 7):
        key, img = f"{i:06d}", scene(i)
        members += [(f"{key}.txt", f"caption number {i}".encode()), (f"{key}.png", encode(img))]
        if i < 6:
            good[key] = (f"caption number {i}", img)
    shard1 = write_tar(tmp_path / "001.tar", members)
    truncate_in_last_member(shard1)

    skipped = Counter()
    got = {key: (cap, img) for key, cap, img in shards.read_pairs([shard0, shard1, str(tmp_path / "gone.tar")],
                                                                skipped, image_size=64)}
    assert sorted(got) == sorted(good)
    for key, (cap, img) in good.items():
        assert got[key][0] == cap
        assert got[key][1].dtype == np.uint8 and np.array_equal(got[key][1], img)  # PNG at its own size: exact
    assert skipped == {"bad image": 1, "no caption": 1, "bad json": 1, "no image": 1, "bad shard": 1,
                       "shard truncated after 2 samples: 001.tar": 1}


def test_a_truncated_shard_counts_what_it_lost(tmp_path):
    """Cut anywhere (inside a 512-byte header, inside a member's data, before the end-of-archive blocks), a shard
    yields the samples before the cut and says how many, never ends in silence as if it were whole."""
    members = [(f"{i:04d}.{ext}", bytes([i]) * (300 + 37 * i)) for i in range(8) for ext in ("jpg", "txt")]
    whole = open(write_tar(tmp_path / "whole.tar", members), "rb").read()
    skipped = Counter()
    assert len(list(shards.tar_groups(str(tmp_path / "whole.tar"), skipped))) == 8 and not skipped
    end = whole.rindex(bytes([7]) * (300 + 37 * 7)) + 300 + 37 * 7  # the last member's data ends here
    for cut in list(range(0, end, 97)) + [end, end + 1]:
        (tmp_path / "cut.tar").write_bytes(whole[:cut])
        skipped = Counter()
        groups = list(shards.tar_groups(str(tmp_path / "cut.tar"), skipped))
        assert skipped == {f"shard truncated after {len(groups)} samples: cut.tar": 1}, cut
        assert [k for k, _ in groups] == [f"{i:04d}" for i in range(len(groups))]
        assert all(g == {"jpg": bytes([i]) * (300 + 37 * i), "txt": bytes([i]) * (300 + 37 * i)}
                   for i, (_, g) in enumerate(groups))


def test_pairs_resize_and_centre_crop(tmp_path):
    img = np.zeros((32, 96, 3), np.uint8)  # left third red, middle green, right third blue
    img[:, :32, 0] = img[:, 32:64, 1] = img[:, 64:, 2] = 255
    shard = write_tar(tmp_path / "a.tar", [("k.jpg", encode(img, "JPEG")), ("k.txt", b"three bars")])
    ((_, _, out),) = shards.read_pairs([shard], Counter(), image_size=16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out[:, 4:12, 1] > 200).all() and (out[:, 4:12, [0, 2]] < 60).all()  # the middle (green) bar


def test_literal_markers_in_a_caption_stay_text(tmp_path):
    tok = get_tokenizer("bytes")
    caption = f"a sign that reads {IMAGE} and {EOC}"
    shard = write_tar(tmp_path / "a.tar", [("k.png", encode(scene(0))), ("k.txt", caption.encode())])
    ((_, cap, _),) = shards.read_pairs([shard], Counter(), image_size=64)
    assert cap == caption
    ids = shards.pair_to_ids(tok, cap)
    assert ids.count(tok.image_id) == 1 and ids.count(tok.eoc_id) == 1  # only the ones the format puts there
    assert ids[0] == tok.image_id and ids[-2:] == [tok.eoc_id, tok.eot_id] and tok.decode(ids[1:-2]) == caption
    assert shards.pair_to_ids(tok, "a red circle") == tok.encode_markup(f"{IMAGE}a red circle{EOC}{EOT}")


# -----------------------------------------------------------------------------
# MMC4-style documents

def b64(img):
    return base64.b64encode(encode(img)).decode()


def doc_json(sentences, infos):
    return json.dumps({"text_list": sentences, "image_info": infos}).encode()


def test_docs_threshold_order_member_images_and_skips(tmp_path):
    tok = get_tokenizer("bytes")
    s = ["First sentence.", "Second one.", "Third one.", "Fourth one."]
    imgs = [scene(20 + i) for i in range(4)]
    members = [
        # inline images; the one matched to sentence 3 is below the similarity threshold
        ("a.json", doc_json(s, [
            {"image_name": "x.jpg", "matched_text_index": 2, "matched_sim": 0.30, "image_base64": b64(imgs[2])},
            {"image_name": "y.jpg", "matched_text_index": 0, "matched_sim": 0.25, "image_base64": b64(imgs[0])},
            {"image_name": "z.jpg", "matched_text_index": 3, "matched_sim": 0.10, "image_base64": b64(imgs[3])}])),
        # images as members of the document's group; a second image for sentence 1 is ignored (one per sentence)
        ("b.json", doc_json(s, [
            {"image_name": "b.1.png", "matched_text_index": 1, "matched_sim": 0.5},
            {"image_name": "b.3.png", "matched_text_index": 3, "matched_sim": 0.5},
            {"image_name": "b.0.png", "matched_text_index": 1, "matched_sim": 0.5}])),
        ("b.0.png", encode(imgs[0])), ("b.1.png", encode(imgs[1])), ("b.3.png", encode(imgs[3])),
        # all below the threshold: skipped
        ("c.json", doc_json(s, [{"image_name": "c.jpg", "matched_text_index": 0, "matched_sim": 0.2,
                                 "image_base64": b64(imgs[0])}])),
        ("d.json", b"{not json"),
        ("e.json", json.dumps({"text_list": "not a list", "image_info": []}).encode()),
        # a bad base64 image and a missing member image; the good one keeps the document
        ("f.json", doc_json(s, [
            {"image_name": "f.jpg", "matched_text_index": 0, "matched_sim": 0.9, "image_base64": "@@@"},
            {"image_name": "f.1.png", "matched_text_index": 1, "matched_sim": 0.9},
            {"image_name": "f.jpg", "matched_text_index": 2, "matched_sim": 0.9, "image_base64": b64(imgs[2])}])),
    ]
    skipped = Counter()
    docs = {k: (sent, ims) for k, sent, ims in shards.read_docs([write_tar(tmp_path / "d.tar", members)], skipped,
                                                               image_size=64)}
    assert sorted(docs) == ["a", "b", "f"]
    assert skipped == {"image below sim_threshold": 2, "document with no image": 1, "bad json": 1,
                       "bad document": 1, "bad image": 1, "missing image": 1}

    sent, ims = docs["a"]
    assert list(ims) == [0, 2] and np.array_equal(ims[0], imgs[0]) and np.array_equal(ims[2], imgs[2])
    ids, images = shards.doc_to_ids(tok, sent, ims)
    # OpenFlamingo's string: <image> before its sentence, <|endofchunk|> before the next <image> and at the end
    assert ids == tok.encode_markup(f"{IMAGE}First sentence. Second one.{EOC}{IMAGE}Third one. Fourth one.{EOC}{EOT}")
    assert len(images) == 2 and images[0] is ims[0] and images[1] is ims[2]

    sent, ims = docs["b"]
    assert list(ims) == [1, 3] and np.array_equal(ims[1], imgs[1]) and np.array_equal(ims[3], imgs[3])
    ids, _ = shards.doc_to_ids(tok, sent, ims)
    assert ids == tok.encode_markup(f"First sentence.{IMAGE}Second one. Third one.{EOC}{IMAGE}Fourth one.{EOC}{EOT}")
    assert list(docs["f"][1]) == [2]


def test_docs_max_images_and_literal_markers(tmp_path):
    tok = get_tokenizer("bytes")
    s = [f"Sentence {i} mentions {IMAGE}." for i in range(8)]
    infos = [{"image_name": f"{i}.png", "matched_text_index": i, "matched_sim": 0.3, "image_base64": b64(scene(i))}
             for i in reversed(range(8))]  # image_info out of text order: max_images keeps the text's first
    shard = write_tar(tmp_path / "d.tar", [("g.json", doc_json(s, infos))])
    ((_, sent, ims),) = shards.read_docs([shard], Counter(), image_size=64, max_images=6)
    assert list(ims) == [0, 1, 2, 3, 4, 5]
    ids, images = shards.doc_to_ids(tok, sent, ims, max_tokens=10_000)
    assert ids.count(tok.image_id) == len(images) == 6  # the literal "<image>" in each sentence stayed text
    assert tok.decode(ids).count(IMAGE) == 6 + 8


def test_doc_token_budget_keeps_images_and_markers_equal():
    tok = get_tokenizer("shapes")
    sentences = ["an intro with no image.", "a red circle.", "a blue square on the left.", "nothing here.",
                 "a green cross.", "the end."]
    ims = {1: scene(1), 2: scene(2), 4: scene(4)}
    full, _ = shards.doc_to_ids(tok, sentences, ims, max_tokens=10_000)
    for budget in range(1, len(full) + 2):
        ids, images = shards.doc_to_ids(tok, sentences, ims, max_tokens=budget)
        assert len(ids) <= budget and ids == full[:len(ids)]
        assert ids.count(tok.image_id) == len(images)
        assert [id(im) for im in images] == [id(ims[i]) for i in sorted(ims)][:len(images)]
        if images:  # the last <image> kept has some of its text after it
            last = len(ids) - 1 - ids[::-1].index(tok.image_id)
            assert any(t not in (tok.image_id, tok.eoc_id, tok.eot_id) for t in ids[last + 1:])
    # a cut right after an <image> drops that <image> and its image
    second = [i for i, t in enumerate(full) if t == tok.image_id][1]
    ids, images = shards.doc_to_ids(tok, sentences, ims, max_tokens=second + 1)
    assert ids == full[:second] and len(images) == 1


# -----------------------------------------------------------------------------
# splitting over ranks and DataLoader workers

def pair_shards(tmp_path, n_shards, per_shard):
    paths = []
    for s in range(n_shards):
        members = []
        for j in range(per_shard):
            key = f"{s:03d}{j:03d}"
            members += [(f"{key}.png", encode(scene(s * per_shard + j))), (f"{key}.txt", f"sample {key}".encode())]
        paths.append(write_tar(tmp_path / f"shard-{s:03d}.tar", members))
    return paths


def test_split_shards():
    paths = [f"s{i}.tar" for i in range(7)]
    parts = [shards.split_shards(paths[::-1], r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(p for part in parts for p in part) == paths  # each shard exactly once, whatever the input order
    assert parts[0] == ["s0.tar", "s4.tar"] and parts[3] == ["s3.tar"]
    with pytest.raises(ValueError, match="3 shards for 4 readers"):
        shards.split_shards(paths[:3], 0, 2, 0, 2)


def test_two_ranks_two_workers_see_every_sample_once(tmp_path):
    tok = get_tokenizer("bytes")
    paths = pair_shards(tmp_path, n_shards=6, per_shard=3)
    seen, logs = [], []
    for rank in range(2):
        ds = shards.ShardDataset(paths, "pairs", tok, rank=rank, world_size=2, image_size=32, log=logs.append)
        for ids, images in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2):
            assert ids.count(tok.image_id) == len(images) == 1 and images[0].shape == (32, 32, 3)
            seen.append(tok.decode(ids[1:-2]))
    expected = [f"sample {s:03d}{j:03d}" for s in range(6) for j in range(3)]
    assert len(seen) == len(set(seen)) and sorted(seen) == expected


def test_dataset_docs_and_summary(tmp_path):
    tok = get_tokenizer("bytes")
    long = "x" * 300  # longer than the budget: the image after it cannot fit
    members = [
        ("a.json", doc_json(["Hello.", "World."], [{"image_name": "a.0.png", "matched_text_index": 1,
                                                     "matched_sim": 0.3}])), ("a.0.png", encode(scene(0))),
        ("b.json", doc_json([long, "late."], [{"image_name": "b.jpg", "matched_text_index": 1, "matched_sim": 0.3,
                                                "image_base64": b64(scene(1))}])),
        ("c.json", b"[1, 2"),
    ]
    shard = write_tar(tmp_path / "d.tar", members)
    ds = shards.ShardDataset([shard], "docs", tok, image_size=64, max_tokens=256, log=lambda s: None)
    ((ids, images),) = list(ds)
    assert ids == tok.encode_markup(f"Hello.{IMAGE}World.{EOC}{EOT}") and len(images) == 1
    assert ds.summary() == "1 samples; skipped: 1 bad json, 1 no image within max_tokens"


# -----------------------------------------------------------------------------
# train.py on shards: pairs and documents mixed by loss weight, and an exact resume

def doc_shards(tmp_path, n_shards, per_shard):
    paths = []
    for s in range(n_shards):
        members = []
        for j in range(per_shard):
            key, k = f"doc{s:03d}{j:03d}", s * per_shard + j
            infos = [{"image_name": f"{key}.{i}.png", "matched_text_index": i, "matched_sim": 0.3} for i in range(2)]
            members += [(f"{key}.json", doc_json([f"first {k}.", f"second {k}.", "end."], infos)),
                        (f"{key}.0.png", encode(scene(100 + k))), (f"{key}.1.png", encode(scene(200 + k)))]
        members.append((f"bad{s}.json", b"{not json"))  # one bad document a shard: skipped, counted
        paths.append(write_tar(tmp_path / f"docs-{s:03d}.tar", members))
    return paths


def test_train_py_mixes_pairs_and_documents_and_resumes_exactly(tmp_path):
    from test_train import SMALL, make_assets, run_train
    assets = make_assets(str(tmp_path / "assets"))
    pair_shards(tmp_path, n_shards=4, per_shard=5)
    doc_shards(tmp_path, n_shards=4, per_shard=3)
    mix = ["--dataset=folder", f"--data_dir=pairs:{tmp_path}/shard-*.tar,docs:{tmp_path}/docs-*.tar",
           "--data_weights=(0.2, 1.0)", "--data_batch_sizes=(4, 2)", "--num_workers=2", "--eval_interval=2",
           "--shuffle_buffer=6"]
    log = run_train(str(tmp_path / "full"), *SMALL, *assets, *mix, "--max_iters=6")
    losses = [r["source_losses"] for r in log if "source_losses" in r]
    assert len(losses) == 6 and all(set(x) == {mix[1][len("--data_dir="):].split(",")[0],
                                               mix[1].split(",")[1]} for x in losses)
    run_train(str(tmp_path / "cut"), *SMALL, *assets, *mix, "--max_iters=2")
    resumed = run_train(str(tmp_path / "cut"), *SMALL, *assets, *mix, "--max_iters=6", "--init_from=resume")
    full_w = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["model"]
    cut_w = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(full_w[k], cut_w[k]) for k in full_w)  # the resumed run skipped to the same rows
    assert [r["loss"] for r in resumed if "loss" in r] == [r["loss"] for r in log if "loss" in r]


def test_shard_stream_shuffle_buffer_is_seeded(tmp_path):
    tok = get_tokenizer("bytes")
    pair_shards(tmp_path, n_shards=2, per_shard=6)
    pattern = str(tmp_path / "shard-*.tar")

    def captions(shuffle, seed, n=24):
        stream = shards.ShardStream("pairs", pattern, tok, block_size=8, image_size=32, shuffle=shuffle, seed=seed,
                                  log=lambda m: None)  # block_size 8: one pair a row
        return [tok.decode(next(stream.stream)[0][1:-2]) for _ in range(n)]

    in_order = captions(0, 0)
    assert in_order[:12] == [f"sample {s:03d}{j:03d}" for s in range(2) for j in range(6)] and in_order[12:] == in_order[:12]
    shuffled = captions(5, 0)
    assert shuffled == captions(5, 0) != in_order and shuffled != captions(5, 1)
    assert set(shuffled) <= set(in_order) and len(set(shuffled[:12])) > 6


def test_pack_fills_rows_first_fit():
    """shards.pack: every sample whole in exactly one row, in order within its row, its images with it; no row over
    block_size but a sample alone too long; first fit fills what next fit (open_rows=1) leaves empty."""
    from shards import pack
    lengths = [68, 86, 256, 256, 120, 256, 98, 256, 300, 10, 5]
    samples = [([i] * n, [f"img{i}"] * (i % 3)) for i, n in enumerate(lengths)]
    for open_rows in (1, 2, 8):
        rows = list(pack(samples, 256, open_rows))
        seen = sorted(t for ids, _ in rows for t in ids)
        assert seen == sorted(t for ids, _ in samples for t in ids)  # nothing lost or repeated
        for ids, images in rows:
            assert len(ids) <= 256 or len(set(ids)) == 1              # only a sample alone is too long
            order = list(dict.fromkeys(ids))
            assert order == sorted(order) and ids == [t for i in order for t in [i] * lengths[i]]  # whole, in order
            assert images == [im for i in order for im in [f"img{i}"] * (i % 3)]
    next_fit, first_fit = list(pack(samples, 256, 1)), list(pack(samples, 256, 8))
    assert [len(r) for r, _ in next_fit] == [154, 256, 256, 120, 256, 98, 256, 300, 15]
    assert [len(r) for r, _ in first_fit] == [252, 256, 256, 135, 256, 256, 300]  # 2 rows fewer: 98 and 10+5 fit
