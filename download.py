"""
Downloads: a resumable, atomic downloader, and every "fetch a dataset" command in one command line.

    python download.py coco [--max_images=5000] [--max_test=500]  # COCO captions as a dataset folder, data/coco
    python download.py vqav2 [--images=True]                       # a benchmark's published files, data/vqav2
    python download.py NAME --data_dir=DIR                         # coco, flickr30k, vqav2, okvqa, textvqa,
                                                                   # vizwiz, hateful_memes

COCO becomes a dataset folder (train.jsonl, test.jsonl: the format folders.read_folder reads, so train.py and
eval.py --task=captions read it as any folder) from Karpathy's split file and the images one file each;
--images=True fetches COCO's whole image archives first (13 GB for train2014), after which no image is fetched
one by one. The benchmarks' files keep their published names, where eval.py --task=NAME reads them. Offline,
each says what it tried and what to copy where; files already there are never fetched again.
"""

import json
import os
import sys
import zipfile

import files
import folders

class DownloadError(RuntimeError):
    pass


def download(url, path, size=None, sha256=None, retries=3, timeout=30, progress=True):
    """Fetch `url` into `path` with a progress bar, and return path.

    Resumable: bytes arrive in path + ".part"; a retry, or a later call after an interrupted run, asks the
    server for the rest (an HTTP Range request) and starts over only if the server ignores it. Atomic: the
    file takes its name only when it is complete and verified (its announced length, and `size` / `sha256`
    when given), so a partial file is never taken for a whole one. An existing `path` is trusted (and
    checked against `size` when given). Raises DownloadError, saying what it tried, after `retries` failures.
    progress=False: no bar of its own (many small files under one bar: coco_folder).
    """
    import hashlib
    import time
    import requests
    from tqdm import tqdm
    if os.path.exists(path) and (size is None or os.path.getsize(path) == size):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part, error = path + ".part", None
    for attempt in range(retries):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            with requests.get(url, headers={"Range": f"bytes={have}-"} if have else {}, stream=True,
                              timeout=timeout) as r:
                if r.status_code == 416:  # nothing left to send: the .part file is already whole
                    break
                r.raise_for_status()
                if r.status_code != 206:  # the server sent the whole file
                    have = 0
                length = r.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as f, \
                        tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(path),
                             disable=not progress) as bar:
                    for block in r.iter_content(1 << 16):
                        f.write(block)
                        bar.update(len(block))
            if total is not None and os.path.getsize(part) != total:
                raise OSError(f"the connection closed after {os.path.getsize(part)} of {total} bytes")
            break
        except (requests.RequestException, OSError) as e:
            error = e
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                raise DownloadError(f"could not download {url}: {e}") from None  # not there: no point retrying
            if attempt + 1 < retries:
                time.sleep(0.5 * 2 ** attempt)
    else:
        raise DownloadError(f"could not download {url} ({retries} tries): {error}")
    got = os.path.getsize(part)
    if size is not None and got != size:
        os.remove(part)
        raise DownloadError(f"{url}: {got} bytes, expected {size}; the partial file was removed")
    if sha256 is not None:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != sha256:
            os.remove(part)
            raise DownloadError(f"{url}: sha256 {h.hexdigest()}, expected {sha256}; the file was removed")
    os.replace(part, path)
    return path


# -----------------------------------------------------------------------------
# COCO captions as a dataset folder

COCO_KARPATHY = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
COCO_IMAGES = "http://images.cocodataset.org"  # + /train2014/COCO_train2014_000000000009.jpg, one file each


def coco_folder(root, max_images=5000, max_test=500, karpathy_url=COCO_KARPATHY, images_url=COCO_IMAGES,
                workers=8, log=print):
    """
    python download.py coco: COCO captions as a dataset folder (the format read_folder reads and FolderData trains
    on). Downloads Karpathy's split file (caption_datasets.zip: every COCO image's five captions and
    its split), then the first max_images images of its train + restval split and the first max_test of its
    test split, one file each from COCO's server (workers at a time), and writes train.jsonl / test.jsonl
    with their captions. Every file is resumable and atomic (download()); a run stopped half-way picks up
    where it was. An image that fails to download or to decode is skipped, counted and named in the log.
    Also leaves dataset_coco.json, so that eval.py --task=coco runs on the same directory (the test images not
    fetched are skipped there). Returns {split: examples written}.
    """
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm
    os.makedirs(root, exist_ok=True)
    split_file = os.path.join(root, "dataset_coco.json")
    if not os.path.exists(split_file):
        archive = download(karpathy_url, os.path.join(root, "caption_datasets.zip"))
        with zipfile.ZipFile(archive) as z:
            name = next((n for n in z.namelist() if n.endswith("dataset_coco.json")), None)
            if name is None:
                raise DownloadError(f"{archive} holds no dataset_coco.json: remove it and run again")
            with z.open(name) as src, open(split_file + ".part", "wb") as dst:
                dst.write(src.read())
        os.replace(split_file + ".part", split_file)
    with open(split_file, "rb") as f:
        images = files.loads(f.read())["images"]
    chosen = {"train": [im for im in images if im["split"] in ("train", "restval")][:max_images],
              "test": [im for im in images if im["split"] == "test"][:max_test]}

    def fetch(im):  # -> the folder's line, or a str: why it was skipped
        rel = f"{im['filepath']}/{im['filename']}"
        try:
            download(f"{images_url}/{rel}", os.path.join(root, rel), retries=3, progress=False)
            folders.folder_image(root, rel, check=True)
        except (DownloadError, ValueError) as e:
            if os.path.exists(os.path.join(root, rel)):
                os.remove(os.path.join(root, rel))  # undecodable: fetched again by the next run
            return f"{rel}: {e}"
        return {"image": rel, "captions": [c["raw"].strip() for c in im["sentences"]], "id": im["cocoid"]}

    written = {}
    for split, ims in chosen.items():
        lines, failed = [], []
        with ThreadPoolExecutor(workers) as pool:
            for out in tqdm(pool.map(fetch, ims), total=len(ims), desc=f"COCO {split} images"):
                (failed if isinstance(out, str) else lines).append(out)
        for why in failed:
            log(f"skipped: {why}")
        if ims and not lines:
            raise DownloadError(f"none of the {len(ims)} {split} images could be fetched from {images_url} "
                                f"({failed[0]})")
        with open(os.path.join(root, f"{split}.jsonl.part"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        os.replace(os.path.join(root, f"{split}.jsonl.part"), os.path.join(root, f"{split}.jsonl"))
        log(f"{root}/{split}.jsonl: {len(lines)} images with their captions" +
            (f", {len(failed)} skipped" if failed else ""))
        written[split] = len(lines)
    return written


# -----------------------------------------------------------------------------
# The benchmarks of eval.py

# The benchmarks' published files, where they have a public address (the paths are as their authors publish
# them): (annotations, image archives). COCO's annotations are Karpathy's split file (coco_folder reads it too).
BENCHMARKS = {
    "coco": ([COCO_KARPATHY], [f"{COCO_IMAGES}/zips/train2014.zip", f"{COCO_IMAGES}/zips/val2014.zip"]),
    "flickr30k": (["https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"], []),
    "vqav2": ([f"https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_{k}_{s}_mscoco.zip"
               for k in ("Questions", "Annotations") for s in ("Train", "Val")],
              ["http://images.cocodataset.org/zips/train2014.zip", "http://images.cocodataset.org/zips/val2014.zip"]),
    "okvqa": ([f"https://okvqa.allenai.org/static/data/{f}.json.zip" for f in (
        "OpenEnded_mscoco_train2014_questions", "OpenEnded_mscoco_val2014_questions",
        "mscoco_train2014_annotations", "mscoco_val2014_annotations")],
              ["http://images.cocodataset.org/zips/train2014.zip", "http://images.cocodataset.org/zips/val2014.zip"]),
    "textvqa": ([f"https://dl.fbaipublicfiles.com/textvqa/data/TextVQA_0.5.1_{s}.json" for s in ("train", "val")],
                ["https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip"]),
    "vizwiz": (["https://vizwiz.cs.colorado.edu/VizWiz_final/vqa_data/Annotations.zip"],
               [f"https://vizwiz.cs.colorado.edu/VizWiz_final/images/{s}.zip" for s in ("train", "val")]),
    "hateful_memes": ([], []),
}
BY_HAND = {
    "flickr30k": "the Flickr30K images are given on request (https://shannon.cs.illinois.edu/DenotationGraph/): "
                 "put them in DATA_DIR/flickr30k-images/",
    "hateful_memes": "HatefulMemes is under Facebook's licence, with no public address: get it from "
                     "https://hatefulmemeschallenge.com (or the Hugging Face hub) and put train.jsonl, "
                     "dev_seen.jsonl or test_seen.jsonl and img/ into DATA_DIR",
}


def fetch_benchmark(name, root, images=False, log=print):
    """Download a benchmark's public files into root and unpack the archives (each only once); images=True: its
    image archives too. Raises DownloadError (with what to copy where, offline)."""
    annotations, image_zips = BENCHMARKS[name]
    for url in annotations + (image_zips if images else []):
        path = os.path.join(root, os.path.basename(url))
        try:
            download(url, path)
        except DownloadError as e:
            raise DownloadError(f"{e}\nOffline? Fetch {url} on a machine with network and copy it to {path}; "
                                "this command then only unpacks it.") from None
        if path.endswith(".zip") and not os.path.exists(path + ".unpacked"):
            with zipfile.ZipFile(path) as z:
                z.extractall(root)
            open(path + ".unpacked", "w").close()
    if name in BY_HAND:
        log("by hand: " + BY_HAND[name].replace("DATA_DIR", root))
    if image_zips and not images:
        log(f"annotations in {root}; the images with --images=True ({len(image_zips)} archives)")


if __name__ == "__main__":
    from configurator import configure
    name = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else ""
    if name not in BENCHMARKS:
        sys.exit(f"usage: python download.py NAME [--data_dir=DIR] [--images=True]; NAME is one of {', '.join(BENCHMARKS)}")
    opts = dict(data_dir=f"data/{name}", images=False, max_images=5000, max_test=500, karpathy_url=COCO_KARPATHY,
                images_url=COCO_IMAGES, workers=8)
    configure(opts, sys.argv[2:], exit_on_error=True)
    try:
        if name != "coco":
            fetch_benchmark(name, opts["data_dir"], opts["images"])
            sys.exit()
        if opts["images"]:  # the archives, unpacked where coco_folder looks for each image (train2014/, val2014/)
            fetch_benchmark(name, opts["data_dir"], images=True)
        coco_folder(opts["data_dir"], opts["max_images"], opts["max_test"], opts["karpathy_url"], opts["images_url"],
                    opts["workers"])
    except DownloadError as e:
        sys.exit(f"error: {e}\nOffline? On a machine with network, fetch {opts['karpathy_url']} and the images "
                 f"({opts['images_url']}/train2014/..., or the train2014 / val2014 zips of cocodataset.org), put them "
                 "in the data directory (caption_datasets.zip, train2014/, val2014/) and run this again: files "
                 "already there are not fetched again." if name == "coco" else f"error: {e}")
