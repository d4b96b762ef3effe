"""
eval.py's prompts answered in batches, on one process or on several (torchrun).

eval.py draws a trial's test examples and their demonstrations, builds every prompt (token ids, and its images in
the order of its <image> tokens), then hands the list here with a function that answers a batch of them:

1. the processes: under torchrun, rank r takes prompts r, r + world, r + 2 world, ... and at the end every process
   receives every answer, in the prompts' order (all_gather_object: gloo on CPU, nccl on CUDA). Run alone, nothing
   of torch.distributed is used. The split changes no answer: a prompt is answered as it would be alone;
2. the images: a torch DataLoader decodes each prompt's images in worker processes (num_workers; 0 decodes in this
   one), batch_size prompts at a time, running ahead of the model. Image files go through CLIP's evaluation
   preprocessing (the tower's transform), video files (MSVD-QA's, MSRVTT-QA's) frame by frame after video.py reads
   them, the shapes worlds' uint8 arrays through data.normalize. An image or video that cannot be read (missing,
   truncated, a decompression bomb) makes its prompt a Skipped, which eval.py counts, and the rest of the batch is
   answered;
3. the model: the batch's readable prompts and all their media, (N, F, 3, H, W), go to `fn` at once.

Shapes: B prompts in a batch, N the media items of all of them, F frames each (1 for an image), H x W the tower's
input size.
"""

import os

import numpy as np
import torch
import torch.distributed as dist

import data
import files
import video


class Skipped(str):
    """The answer of a prompt that was not answered: why ("unreadable image (OSError)"). eval.py counts them."""


# -----------------------------------------------------------------------------
# 1. Processes

def rank_world():
    """(this process's rank, the number of processes): (0, 1) unless torch.distributed was started (eval.main)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def start_processes(device):
    """Under torchrun (RANK in the environment): join the process group and take this process's device
    (cuda:LOCAL_RANK under CUDA). -> the device to use. Alone: nothing started, the device as given."""
    if "RANK" not in os.environ:
        return device
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return device


def from_rank0(fn):
    """fn() run on rank 0 alone, its result (or the SystemExit it raised) given to every process, so that all of
    them take the same decision (eval.py: the results file's lock, which trials are done already)."""
    rank, world = rank_world()
    out = [None]
    if rank == 0:
        try:
            out[0] = ("ok", fn())
        except SystemExit as e:
            out[0] = ("exit", e.code)
    if world > 1:
        dist.broadcast_object_list(out, src=0)
    if out[0][0] == "exit":
        raise SystemExit(out[0][1] if rank == 0 else 1)  # the message once, from rank 0
    return out[0][1]


def gather(mine, n):
    """mine: this process's answers {prompt index: answer} -> the list of all n answers, on every process."""
    rank, world = rank_world()
    parts = [mine]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    out = [None] * n
    for part in parts:
        for i, a in part.items():
            out[i] = a
    return out


# -----------------------------------------------------------------------------
# 2. Images, decoded ahead of the model

class PromptImages(torch.utils.data.Dataset):
    """Item i: (i, prompt i's media (N_i, F, 3, H, W), or their list where F differs), or (i, Skipped) when one of
    them cannot be read. images: each prompt's list of image files (paths), uint8 (H, W, 3) arrays or clips
    (F, H, W, 3). transform: the tower's
    preprocessing of a PIL image (VisionEncoder.transform); mean and std normalise the arrays of the tower's (H, W)
    size."""

    def __init__(self, indices, images, transform, mean, std, size):
        self.indices, self.images = indices, images
        self.transform, self.mean, self.std = transform, mean, std
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (H, W): open_clip gives either

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = self.indices[j]
        try:
            items = [self.decode(im) for im in self.images[i]]                 # (F, 3, H, W) each
            return i, torch.stack(items) if len({len(x) for x in items}) <= 1 else items  # (N_i, F, 3, H, W)
        except Exception as e:  # any decoder's error, a decompression bomb (PIL): counted by eval.py, not fatal
            return i, Skipped(f"unreadable image ({type(e).__name__})")

    def decode(self, image):
        """One image -> (1, 3, H, W) float pixels, as the tower was trained to see them; a clip's frames (F, H, W, 3)
        -> (F, 3, H, W). Arrays of the tower's size (the shapes worlds' renders for their own towers) are only
        normalised; any other goes through the transform."""
        from PIL import Image
        if isinstance(image, np.ndarray):
            frames = image if image.ndim == 4 else image[None]                  # (F, H, W, 3)
            if tuple(frames.shape[1:3]) == self.size:
                return data.normalize(frames, self.mean, self.std)
            return torch.stack([self.transform(Image.fromarray(f)) for f in frames])
        if video.is_video(image):  # a clip: its frames at 1 FPS, at most 8 (video.py)
            return torch.stack([self.transform(f) for f in video.read_frames(image)])
        with Image.open(image) as im:
            return self.transform(im.convert("RGB"))[None]  # VisionEncoder.preprocess, without the tower itself


def let_go_of_locks(worker_id):
    """A DataLoader worker is a fork of this process and holds copies of its file descriptors, among them the
    --results lock's (files.lock): the worker closes its copies, so that the lock ends with this process, however
    it ends, and not with a worker that outlives it by a moment."""
    for fd in files._held.values():
        os.close(fd)


def as_list(batch):
    """The DataLoader's collate: a batch stays a list of (i, images or Skipped); prompts have their own N_i."""
    return batch


# -----------------------------------------------------------------------------
# 3. Answering

def answer(fn, prompts, vision, batch_size=8, num_workers=2, desc=None):
    """Answer every prompt: prompts is a list of (ids, images) (images as PromptImages takes them); fn(ids, x)
    answers a batch: ids a list of B token lists, x (N, F, 3, H, W) all their media in order -> B answers.
    -> the list of answers, in the prompts' order, on every process: fn's, or a Skipped. desc: a tqdm bar (on rank
    0) with this title; None for none."""
    from tqdm import tqdm
    rank, world = rank_world()
    mine = list(range(rank, len(prompts), world))  # this process's prompts
    dataset = PromptImages(mine, [images for _, images in prompts], vision.transform, vision.mean, vision.std,
                           vision.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=as_list,
                                         worker_init_fn=let_go_of_locks, prefetch_factor=4 if num_workers else None)
    answers = {}
    with tqdm(total=len(mine), desc=desc, disable=desc is None or rank != 0) as bar:
        for batch in loader:                                      # B prompts: (i, (N_i, 1, 3, H, W) or Skipped)
            ready = [(i, x) for i, x in batch if not isinstance(x, Skipped)]
            answers.update((i, x) for i, x in batch if isinstance(x, Skipped))
            if ready:  # the batch's media in order: (N, F, 3, H, W), or N items (F_i, 3, H, W) where F differs
                media = [m for _, items in ready for m in items]
                x = torch.stack(media) if len({len(m) for m in media}) == 1 else media
                out = fn([prompts[i][0] for i, _ in ready], x)
                answers.update((i, a) for (i, _), a in zip(ready, out))
            bar.update(len(batch))
    return gather(answers, len(prompts))
