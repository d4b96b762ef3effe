"""
Videos as media items (Flamingo, section 3.1.1: the model "seamlessly ingests images or videos"). A clip is read as F
frames sampled at 1 frame per second, the paper's rate; each frame is encoded by the vision tower exactly as an image
is, and the Perceiver Resampler adds a learned time embedding per frame and turns all F x S features into the same R
visual tokens an image gets (resampler.py). In a prompt a video sits where an `<image>` marker is, like an image.

Decoding is PyAV's (Python bindings of FFmpeg's libraries, which its wheels bundle: mp4, webm, avi, mkv, ... with
nothing else to install). torchcodec, the other well-kept choice, needs FFmpeg's libraries installed on the machine and
a release matched to the installed torch.

read_frames(path, fps, max_frames) -> the sampled frames as PIL images; frame_times says which ones. A file is taken
for a video by its extension (is_video); datasets and eval read theirs at FPS, at most MAX_FRAMES.
"""

import math

EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
FPS, MAX_FRAMES = 1.0, 8  # the paper's rate, and its training clips' length


def is_video(path):
    return str(path).lower().endswith(EXTENSIONS)


class VideoError(ValueError):
    """A video that cannot be read: missing, not a video, corrupt, no frames. Its message names the file."""


def frame_times(duration, fps=1.0, max_frames=8):
    """The times (seconds) at which to take frames of a clip `duration` seconds long: 0, 1/fps, 2/fps, ... while within
    the clip; when that is more than max_frames, max_frames times spread evenly over the whole clip instead, each at
    the middle of its equal share (so a long clip is seen from start to end, not only its first seconds)."""
    if fps <= 0 or max_frames < 1:
        raise ValueError(f"fps must be > 0 and max_frames >= 1, got {fps} and {max_frames}")
    n = max(1, math.ceil(duration * fps - 1e-6))
    if n <= max_frames:
        return [k / fps for k in range(n)]
    return [(k + 0.5) * duration / max_frames for k in range(max_frames)]


def read_frames(path, fps=FPS, max_frames=MAX_FRAMES, count_only=False):
    """A video file -> its frames at frame_times(duration, fps, max_frames), as RGB PIL images: at each time, the frame
    on screen then (the last one that starts at or before it). VideoError with the reason when it cannot be read.
    count_only: how many frames that is, from the file's headers alone where they tell the clip's length."""
    import av
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            duration = clip_duration(container, stream)
            times = frame_times(duration, fps, max_frames) if duration else None
            if times is None:  # no duration in the file's headers: decode once to find it
                starts = [float(f.time or 0.0) for f in container.decode(stream)]
                if not starts:
                    raise VideoError(f"{path}: no frames")
                rate = float(stream.average_rate or 1)
                times = frame_times(starts[-1] + 1 / rate, fps, max_frames)
                container.seek(0)
            if count_only:
                return len(times)
            chosen, k, shown = [], 0, None  # the decoded frames chosen, one per time; the frame on screen so far
            for frame in container.decode(stream):
                t = float(frame.time or 0.0)
                while k < len(times) and times[k] < t:  # time k comes before this frame: the one before was on
                    chosen.append(shown if shown is not None else frame)  # (before the first frame: the first)
                    k += 1
                if k == len(times):
                    break
                shown = frame
            chosen += [shown] * (len(times) - len(chosen)) if shown is not None else []  # the last frame stays on
            images = {}  # each chosen frame converted once, however many times it was chosen
            frames = [images.setdefault(id(f), f.to_image()) for f in chosen]  # RGB PIL images
    except VideoError:
        raise
    except FileNotFoundError:
        raise VideoError(f"video not found: {path}") from None
    except Exception as e:  # FFmpeg's errors (invalid data, unknown format), a truncated file, ...
        raise VideoError(f"cannot read video {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") \
            from None
    if not frames:
        raise VideoError(f"{path}: no frames")
    return frames


def clip_duration(container, stream):
    """The clip's length in seconds from the file's headers (the stream's, else the container's), or None."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # FFmpeg's AV_TIME_BASE: microseconds
    return None
