"""download.py against a local HTTP server on 127.0.0.1: an interrupted transfer resumes, a bad checksum leaves
nothing, no server fails fast; and `python download.py coco` (download.coco_folder) on fixture files: Karpathy's split
file in its zip and a few images, one transfer broken off (it resumes), one image missing and one corrupt (counted
skips); the folder it writes reads back; a second run fetches only what failed; offline, a message within seconds and
no traceback."""

import io
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

import download
import folders
from test_train import ENV, ROOT
from tokenizer import get_tokenizer


def serve_files(files, cut=None, cut_at=None):
    """A server on 127.0.0.1 for {path: bytes} that honours Range requests (404 for other paths); its first
    response for path `cut` breaks off after cut_at bytes. Returns (base url, requests seen as a list of
    (path, Range header), shutdown)."""
    import http.server
    import threading
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            rng = self.headers.get("Range")
            seen.append((self.path, rng))
            if self.path not in files:
                self.send_error(404)
                return
            start = int(rng.split("=")[1].split("-")[0]) if rng else 0
            body = files[self.path][start:]
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path == cut and sum(p == cut for p, _ in seen) == 1:
                self.wfile.write(body[:cut_at])  # then the connection drops
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", seen, server.shutdown


def serve(payload, cut_first_at=None):
    """One file at /file.bin (serve_files) -> (its url, requests seen, shutdown)."""
    base, seen, stop = serve_files({"/file.bin": payload}, None if cut_first_at is None else "/file.bin", cut_first_at)
    return f"{base}/file.bin", seen, stop


def test_download_resumes_an_interrupted_transfer(tmp_path):
    import hashlib
    payload = bytes(range(256)) * 4000  # ~1 MB
    url, seen, stop = serve(payload, cut_first_at=300_000)
    try:
        path = str(tmp_path / "sub" / "file.bin")
        download.download(url, path, size=len(payload), sha256=hashlib.sha256(payload).hexdigest(), retries=3)
        assert open(path, "rb").read() == payload and not os.path.exists(path + ".part")
        assert seen[0][1] is None and len(seen) == 2  # the retry asked only for the rest, from what had arrived
        assert 0 < int(seen[1][1][len("bytes="):-1]) <= 300_000
        download.download(url, path, size=len(payload))  # already there: no request
        assert len(seen) == 2
    finally:
        stop()


def test_download_never_leaves_a_partial_file_under_the_real_name(tmp_path):
    payload = b"x" * 10_000
    url, seen, stop = serve(payload)
    try:
        path = str(tmp_path / "f.bin")
        with pytest.raises(download.DownloadError, match="sha256"):
            download.download(url, path, sha256="0" * 64)
        assert not os.path.exists(path) and not os.path.exists(path + ".part")
    finally:
        stop()


def free_port():
    """A local port that nothing listens on: a download from it fails at once, as offline."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def test_download_unreachable_fails_fast_and_clearly(tmp_path):
    import time
    port = free_port()
    t0 = time.time()
    with pytest.raises(download.DownloadError, match=f"127.0.0.1:{port}.*3 tries"):
        download.download(f"http://127.0.0.1:{port}/x.zip", str(tmp_path / "x.zip"))
    assert time.time() - t0 < 10 and not os.path.exists(tmp_path / "x.zip")



# -----------------------------------------------------------------------------
# COCO as a dataset folder

SPLITS = ["train", "train", "restval", "train", "val", "test", "test", "train"]  # image i's Karpathy split


def jpeg(seed, size=(48, 64)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def fixture_files():
    images, files = [], {}
    for i, split in enumerate(SPLITS):
        folder = "val2014" if split in ("val", "restval", "test") else "train2014"
        name = f"COCO_{folder}_{i:012d}.jpg"
        images.append({"filepath": folder, "filename": name, "split": split, "cocoid": i, "imgid": i,
                       "sentences": [{"raw": f"image {i} caption {k}. ", "tokens": []} for k in range(5)]})
        files[f"/{folder}/{name}"] = jpeg(i, (400, 600) if i == 1 else (48, 64))  # 1: ~0.5 MB, broken off
    del files["/train2014/COCO_train2014_000000000003.jpg"]            # missing on the server: 404
    files["/train2014/COCO_train2014_000000000007.jpg"] = b"not a jpeg"  # corrupt
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("dataset_coco.json", json.dumps({"images": images, "dataset": "coco"}))
        z.writestr("dataset_flickr8k.json", "{}")
    files["/caption_datasets.zip"] = buf.getvalue()
    return files


@pytest.fixture
def server():
    files = fixture_files()
    cut = "/train2014/COCO_train2014_000000000001.jpg"  # its first response breaks off half-way
    base, seen, stop = serve_files(files, cut, len(files[cut]) // 2)
    yield base, seen, files
    stop()


def test_coco_folder_from_a_local_server(server, tmp_path):
    url, seen, files = server
    logged = []
    root = str(tmp_path / "coco")
    written = download.coco_folder(root, max_images=5, max_test=2, karpathy_url=url + "/caption_datasets.zip",
                               images_url=url, workers=2, log=logged.append)
    # train + restval in file order, the first 5: images 0, 1, 2, 3 (missing), 7 (corrupt)
    assert written == {"train": 3, "test": 2}
    text = "\n".join(logged)
    assert "COCO_train2014_000000000003.jpg" in text and "404" in text
    assert "COCO_train2014_000000000007.jpg" in text and "cannot be decoded" in text
    assert not os.path.exists(os.path.join(root, "train2014", "COCO_train2014_000000000007.jpg"))
    cut = [r for p, r in seen if p.endswith("000000000001.jpg")]
    assert len(cut) == 2 and cut[0] is None and cut[1].startswith("bytes=")  # resumed from where it broke off
    train = folders.read_folder(root, "train", "captions", log=logged.append)
    assert [os.path.basename(e["image"]) for e in train] == [
        "COCO_train2014_000000000000.jpg", "COCO_train2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"]
    assert train[1]["captions"] == [f"image 1 caption {k}." for k in range(5)]
    assert open(train[1]["image"], "rb").read() == files["/train2014/COCO_train2014_000000000001.jpg"]
    tok = get_tokenizer("bytes")
    rows = folders.FolderData(root, "train", tok, block_size=64, image_size=32, log=logged.append)
    assert len(rows.units) == 3 and rows.row(0)[1][0].shape == (32, 32, 3)
    # a second run: only the two that failed are asked for again
    n = len(seen)
    download.coco_folder(root, max_images=5, max_test=2, karpathy_url=url + "/caption_datasets.zip", images_url=url,
                     workers=2, log=logged.append)
    assert sorted(p for p, _ in seen[n:]) == ["/train2014/COCO_train2014_000000000003.jpg",
                                              "/train2014/COCO_train2014_000000000007.jpg"]


def test_coco_offline_fails_fast_and_clearly(tmp_path):
    port = free_port()
    t0 = time.time()
    p = subprocess.run([sys.executable, "download.py", "coco", f"--data_dir={tmp_path}",
                        f"--karpathy_url=http://127.0.0.1:{port}/caption_datasets.zip"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr and time.time() - t0 < 15
    assert f"could not download http://127.0.0.1:{port}/caption_datasets.zip (3 tries)" in p.stderr
    assert "Offline?" in p.stderr and not os.listdir(tmp_path)
