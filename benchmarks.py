"""
The evaluation tasks' files, read into lists of examples: the benchmarks OpenFlamingo evaluates on, from their
published annotation files (`python download.py NAME` fetches the public ones), and your own folders.

An example is a dict: id, image (the path of an image, or of a video: MSVD-QA, MSRVTT-QA), and captions; or question
and answers; or text (the meme's words) and label (0/1). read_task returns (train, test, kind): the demonstration pool, the test set, and "captions", "vqa" or
"classification". A file that is not what its benchmark publishes is a ValueError naming it (never a traceback
from deep inside, nor a RecursionError: JSON is read with files.loads).
"""

import os

import files
import folders


def find_file(root, name, benchmark):
    """root/name or root/*/name (archives unpack into a folder of their own)."""
    for path in [os.path.join(root, name)] + [os.path.join(root, d, name) for d in sorted(os.listdir(root))
                                               if os.path.isdir(os.path.join(root, d))]:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{name} not found in {root} or its subfolders; "
                            f"`python download.py {benchmark} --data_dir={root}` fetches it where it is public")


def load_json(root, name, benchmark):
    path = find_file(root, name, benchmark)
    with open(path, "rb") as f:
        try:
            return files.loads(f.read().decode("utf-8"))
        except ValueError as e:
            raise ValueError(f"{path} is not {benchmark}'s JSON ({str(e).splitlines()[0]})") from None


def read_karpathy(root, name):
    """COCO or Flickr30K captions in Karpathy's split file (dataset_coco.json / dataset_flickr30k.json):
    the "train" images are the demonstration pool and the "test" images the test set, as OpenFlamingo."""
    out = {"train": [], "test": []}
    for im in load_json(root, f"dataset_{name}.json", name)["images"]:
        if im["split"] in out:
            folder = im.get("filepath", "flickr30k-images")  # COCO's entries name their folder (train2014, val2014)
            out[im["split"]].append({"id": im.get("cocoid", im.get("imgid")), "image": os.path.join(root, folder, im["filename"]),
                                     "captions": [s["raw"].strip() for s in im["sentences"]]})
    return out["train"], out["test"]


def read_vqa_pair(root, questions, annotations, image, benchmark):
    """VQA-format files (VQAv2, OK-VQA): questions {"questions": [...]}, annotations {"annotations": [...]}."""
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]]
               for a in load_json(root, annotations, benchmark)["annotations"]}
    return [{"id": q["question_id"], "image": image(q["image_id"]), "question": q["question"],
             "answers": answers[q["question_id"]]} for q in load_json(root, questions, benchmark)["questions"]]


def read_video_qa(root, name, split):
    """MSVD-QA or MSRVTT-QA in the layout their authors publish (Xu et al. 2017): {split}_qa.json, a list of
    {"id", "question", "answer", "video_id"}. MSVD-QA's clips are named by youtube_mapping.txt (lines "<YouTube name>
    vid<N>"): YouTubeClips/<YouTube name>.avi; MSRVTT-QA's are video<N>.mp4 in TrainValVideo/ and TestVideo/ (MSR-VTT's
    own folders). Either may also sit in video/ or next to the files. A missing clip is skipped when eval reads it."""
    if name == "msvdqa":
        with open(find_file(root, "youtube_mapping.txt", name), encoding="utf-8") as f:
            names = {vid: clip for clip, vid in (line.split() for line in f if line.strip())}
        folders_, file = ("YouTubeClips", "video", ""), lambda i: f"{names.get(f'vid{i}', f'vid{i}')}.avi"
    else:
        folders_, file = ("TestVideo", "TrainValVideo", "video", ""), lambda i: f"video{i}.mp4"

    def path(i):
        tries = [os.path.join(root, d, file(i)) for d in folders_]
        return next((t for t in tries if os.path.isfile(t)), tries[0])
    try:
        return [{"id": d["id"], "image": path(d["video_id"]), "question": d["question"], "answers": [str(d["answer"])]}
                for d in load_json(root, f"{split}_qa.json", name)]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{name}'s {split}_qa.json: not a list of {{id, question, answer, video_id}} ({e!r})") from None


def read_task(name, root):
    """(train, test) examples of a task, with the kind: "captions", "vqa" or "classification"."""
    if name in ("captions", "vqa"):  # a folder of your own (README, "Your own data")
        return folders.read_folder(root, "train", name), folders.read_folder(root, "test", name), name
    if name in ("coco", "flickr30k"):
        return (*read_karpathy(root, name), "captions")
    if name in ("vqav2", "okvqa"):
        prefix = "v2_" if name == "vqav2" else ""
        split = [read_vqa_pair(root, f"{prefix}OpenEnded_mscoco_{s}2014_questions.json",
                               f"{prefix}mscoco_{s}2014_annotations.json",
                               lambda i, s=s: os.path.join(root, f"{s}2014", f"COCO_{s}2014_{i:012d}.jpg"), name)
                 for s in ("train", "val")]
        return (*split, "vqa")
    if name == "textvqa":  # TextVQA 0.5.1; train and val images both live in train_images/
        split = [[{"id": d["question_id"], "image": os.path.join(root, "train_images", d["image_id"] + ".jpg"),
                   "question": d["question"], "answers": d["answers"]}
                  for d in load_json(root, f"TextVQA_0.5.1_{s}.json", name)["data"]] for s in ("train", "val")]
        return (*split, "vqa")
    if name == "vizwiz":
        split = [[{"id": d["image"], "image": os.path.join(root, s, d["image"]), "question": d["question"],
                   "answers": [a["answer"] for a in d["answers"]]} for d in load_json(root, f"{s}.json", name)]
                 for s in ("train", "val")]
        return (*split, "vqa")
    if name in ("msvdqa", "msrvttqa"):  # videos, open-ended answers; the test split scored, as Flamingo
        return read_video_qa(root, name, "train"), read_video_qa(root, name, "test"), "vqa"
    if name == "hateful_memes":  # train.jsonl; the test set is test_seen.jsonl when present, else dev_seen.jsonl
        def lines(file):
            out, path = [], find_file(root, file, name)
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        d = files.loads(line)
                        out.append({"id": d["id"], "image": os.path.join(root, d["img"]), "text": d["text"],
                                    "label": int(d["label"])})
                    except (ValueError, KeyError, TypeError) as e:  # also the unlabelled test_unseen lines
                        print(f"{path}:{n}: skipped: {type(e).__name__} {e}")
            return out
        test_file = "test_seen.jsonl" if os.path.exists(os.path.join(root, "test_seen.jsonl")) else "dev_seen.jsonl"
        return lines("train.jsonl"), lines(test_file), "classification"
    raise ValueError(f"unknown task {name!r}; known: shapes, shapes_video, coco, flickr30k, vqav2, okvqa, textvqa, "
                     "vizwiz, msvdqa, msrvttqa, hateful_memes, captions, vqa")
