"""
Caption an image, or answer about it, with a trained Flamingo:

    python sample.py --image cat.jpg
    python sample.py --image cat.jpg --prompt "<image>Question:what color is the circle? Short answer:"

Few-shot prompts are written inline: one `--image` per `<image>` in the prompt, in order.

    python sample.py --image a.png --image b.png --image c.png \
        --prompt "<image>Output:red<|endofchunk|><image>Output:blue<|endofchunk|><image>Output:"

A video is a media item like an image, in the place of an `<image>` marker: its frames sampled at --fps (1, the
paper's rate), at most --max_frames, spread evenly over a longer clip (video.py); --image and --video mix in one
prompt, each in the order of the markers.

    python sample.py --video clip.mp4 --prompt "<image>Question:which way does the circle move? Short answer:"
    python sample.py --video a.mp4 --image b.png --prompt "<image>Output:a circle moving left<|endofchunk|><image>Output:"

The continuation is printed as it is generated; the last line of output is the continuation. --explain=look.png
(or .json) also writes where each generated token looked in its image and how much the images mattered (explain.py).

A conversation, images added by a line `/image PATH` (chat.py has the format):

    python sample.py --chat
"""

import os
import sys

# -----------------------------------------------------------------------------
init_from = "out-shapes"      # out_dir (or ckpt.pt), a shared folder or user/name, openflamingo/<name>, an IDEFICS
lm = ""                       # the LM of a local OpenFlamingo checkpoint.pt (a directory), or a shared folder's own
dtype = "float32"             # of the frozen LM ("bfloat16" halves MPT-7B's 27 GB; run under autocast)
clip = "ViT-L-14"             # and their CLIP: open_clip name, and tag or local weights file
clip_pretrained = "openai"
prompt = ""                   # "": the captioning prompt "<image>Output:" (one image or video only)
max_new_tokens = 40
temperature = 0.0             # 0 = greedy
top_k = None
top_p = None
num_beams = 1
chat = False                  # a conversation in the terminal (chat.py) instead of one continuation
fps = 1.0                     # videos: frames sampled per second (the paper's 1)
max_frames = 8                # ... and at most this many, spread evenly over a longer clip (the paper trains on 8)
explain = ""                  # a file: where each generated token looked, a picture (.png) or its numbers (.json)
seed = 1337
device = "cpu"
# --image and --video may repeat, so they are taken out of the arguments before the configurator sees them, in order
_media, _argv, _i = [], [], 0  # underscored: not config keys. _media: ("image" or "video", path), in order
while _i < len(sys.argv[1:]):
    _a = sys.argv[1 + _i]
    if _a in ("--image", "--video") and _i + 1 < len(sys.argv[1:]):
        _media.append((_a[2:], sys.argv[2 + _i]))
        _i += 2
        continue
    if _a.startswith(("--image=", "--video=")):
        _media.append((_a[2:7], _a.split("=", 1)[1]))
    else:
        _argv.append(_a)
    _i += 1
from configurator import check, configure  # noqa: E402
configure(globals(), _argv, exit_on_error=True)
check(globals(), at_least=dict(max_new_tokens=1, temperature=0, top_k=1, top_p=0, num_beams=1, max_frames=1),
      at_most=dict(top_p=1), choices=dict(dtype=("float32", "bfloat16", "float16")), may_be_none=("top_k", "top_p"))
# -----------------------------------------------------------------------------


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


# a released model: OpenFlamingo's (a hub id, or a checkpoint.pt with its --lm), IDEFICS's (a hub id or a folder);
# or a shared one (a folder with a config.json, or "user/name" on the hub: pretrained.py)
# (user/name: a loose test before torch is imported; pretrained.is_hub_id decides when the model is loaded)
hub_id = init_from.count("/") == 1 and not init_from.startswith((".", "/")) and not os.path.exists(init_from)
openflamingo = init_from.startswith(("openflamingo/", "HuggingFaceM4/")) or bool(lm) or hub_id \
    or os.path.isfile(os.path.join(init_from, "config.json"))
ckpt = os.path.join(init_from, "ckpt.pt") if os.path.isdir(init_from) or not init_from.endswith(".pt") else init_from
if not openflamingo and not os.path.exists(ckpt):
    fail(f"no checkpoint at {ckpt}. Train one first:  python train.py config/train_shapes.py"
         + ("" if init_from == "out-shapes" else f" --out_dir={os.path.dirname(ckpt) or '.'}"))
if chat and (_media or prompt or num_beams > 1):
    fail("--chat takes its images and messages as you type them (/image PATH), and no beams")
if not _media and not chat:
    fail("give an image or a video: python sample.py --image cat.jpg")
if explain and (chat or not explain.endswith((".png", ".json"))):
    fail(f"--explain={explain}: a .png or .json file, for one continuation (not --chat)")
if explain.endswith(".png"):
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        fail("--explain draws with matplotlib: pip install matplotlib (or write the numbers: --explain=out.json)")

from PIL import Image  # noqa: E402

import video  # noqa: E402

# every argument is checked, every image and video read, before the slow imports and the model load
if not prompt and not chat:
    if len(_media) > 1:
        fail(f"{len(_media)} images and videos: write a --prompt with one <image> for each")
    prompt = "<image>Output:"  # OpenFlamingo's captioning prompt
if not chat and prompt.count("<image>") != len(_media):
    fail(f"the prompt has {prompt.count('<image>')} <image> markers but {len(_media)} images and videos were given")
frames = []  # per media item, its frames as PIL images: one for an image
for kind, path in _media:
    try:
        if kind == "video":
            frames.append(video.read_frames(path, fps, max_frames))
            continue
        with Image.open(path) as im:
            frames.append([im.convert("RGB")])
    except video.VideoError as e:
        fail(str(e))
    except FileNotFoundError:
        fail(f"image not found: {path}")
    except Exception as e:  # not an image, truncated, a decompression bomb (PIL refuses over 179M pixels), ...
        fail(f"cannot read image {path}: {type(e).__name__}: {e}")

import torch  # noqa: E402
from files import LOAD_ERRORS, message  # noqa: E402
from model import load_model  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

torch.manual_seed(seed)
try:
    model, tokenizer = load_model(init_from if openflamingo else ckpt, lm, clip, clip_pretrained, dtype)
except LOAD_ERRORS as e:  # offline, a missing or bad file: say what to do
    fail(message(e))
model.eval().to(device)
tok = get_tokenizer(tokenizer, lm_vocab_size=model.lm.config.vocab_size, new_tokens=model.config.new_tokens)
limit = model.lm.config.max_context  # GPT-2's learned positions, MPT's max_seq_len; None: no hard end
from contextlib import nullcontext  # noqa: E402
device_type = "cuda" if "cuda" in device else "cpu"
amp = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))

if chat:
    import chat as conversation

    def preprocess(path):
        """An image file -> (3, H, W) pixels as the tower takes them; ValueError with the reason."""
        try:
            with Image.open(path) as im:
                return model.vision.preprocess(im.convert("RGB"))
        except Exception as e:  # missing, not an image, truncated, a decompression bomb
            raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None

    with torch.no_grad(), amp:
        conversation.run(model, tok, preprocess, limit, max_new_tokens, temperature, top_k, top_p)
    sys.exit(0)

# images and video frames: the tower's evaluation preprocessing (CLIP's: resize the short side, centre crop, normalise)
items = [torch.stack([model.vision.preprocess(im) for im in item]).to(device) for item in frames]  # (F, 3, H, W) each
images = torch.stack(items) if len({len(t) for t in items}) == 1 else items  # (N, F, 3, H, W), or the list
start = [tok.bos_id] if model.config.idefics and tok.bos_id is not None else []  # IDEFICS's prompts begin with <s>
idx = torch.tensor([start + tok.encode_markup(prompt)], device=device)  # (1, T)
if limit and idx.shape[1] >= limit:
    fail(f"the prompt is {idx.shape[1]} tokens; this LM reads at most {limit}")
if limit:
    max_new_tokens = min(max_new_tokens, limit - idx.shape[1])

new_ids, printed = [], ""


def stream(token):
    global printed
    if token.item() != model.eoc_token_id:
        new_ids.append(token.item())
    text = tok.decode(new_ids)
    if not text.endswith("\ufffd"):  # wait for the rest of a character split over several tokens
        print(text[len(printed):], end="", flush=True)
        printed = text


try:
    with amp:
        out = model.generate(images, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             num_beams=num_beams, on_token=stream if num_beams == 1 else None)
except ValueError as e:  # what this model cannot read: a video for a model trained on images only, ...
    fail(str(e))
continuation = out[0, idx.shape[1]:].tolist()
if model.eoc_token_id in continuation:
    continuation = continuation[:continuation.index(model.eoc_token_id)]
text = tok.decode(continuation)
if num_beams == 1:
    print(text[len(printed):])  # the streamed line already is the continuation, but for a last partial character
else:
    print(text)
if explain:  # where each generated token looked: one more pass over the prompt and the continuation (explain.py)
    import explain as looking
    from files import FileError
    with torch.no_grad(), amp:
        records = looking.explain(model, items, torch.tensor(idx[0].tolist() + continuation, device=device),
                                  idx.shape[1], tok.decode)
    try:
        looking.save(records, explain, [looking.pixels(x, model.vision.mean, model.vision.std) for x in items])
    except FileError as e:
        fail(str(e))
    print(f"wrote {explain}", file=sys.stderr)
