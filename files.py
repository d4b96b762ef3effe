"""
A run's files: written whole or not at all, owned by one run at a time, and read without surprises.

Training runs for days; it is killed, started twice on one out_dir by mistake, and fills disks, and users point
the scripts at the wrong file. Everything here turns those into one clear line (FileError, which the scripts print
as `error: ...`) or into something the next run can repair:

1. JSON a line nested 100,000 deep cannot turn into a RecursionError: loads().
2. Atomic writes: a temp file next to the target, fsync, rename (atomic on POSIX), the folder fsynced. A reader
   sees the old file or the new one, never half of one, whenever the writer dies. A failed write removes its temp
   file and says what failed where (a full disk: how much was needed); the old file stays. A write killed
   mid-way leaves its temp file, which the next run of that out_dir removes (remove_leftovers).
3. One writer per out_dir: lock(), an OS file lock (flock) that the kernel drops when its process dies, so a
   killed run never leaves a stale lock behind.
4. log.jsonl is only appended to, one fsynced line at a time, or replaced atomically: a torn last line (a kill or
   a full disk mid-write) and the records a resume goes back over are dropped by an atomic rewrite (resume_log).
5. torch_load(): weights_only (a file can hold tensors, never code), each way a file can be wrong one line.
"""

import errno
import json
import os
import pickle
import re
import shutil

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock; lock() is then a no-op (the project's scripts target Linux and macOS)
    fcntl = None


class FileError(Exception):
    """A file that cannot be read or written, with a one-line reason that says what to do."""


LOAD_ERRORS = (FileError, OSError, ValueError, KeyError, RuntimeError)  # what loading a model can raise for a bad file


def message(e):
    """An exception as one line for `error: ...` (a KeyError's str() would quote its message)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return str(text).strip() or type(e).__name__


# -----------------------------------------------------------------------------
# 1. JSON

def loads(text):
    """json.loads that raises ValueError, never RecursionError, for JSON nested too deep (CPython's decoder
    recurses once per level; its limit is the interpreter's recursion limit)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


# -----------------------------------------------------------------------------
# 2. Atomic writes

def temp_path(path):
    """Where a write of `path` goes first: next to it (a rename never crosses a disk), named for this process."""
    return f"{path}.tmp{os.getpid()}"


def os_error(e):
    """The OSError behind an exception: itself, or one in its chain (torch.save reports a full disk as a
    RuntimeError "unexpected pos" whose cause is the ENOSPC)."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def write_failure(path, err, needed=None):
    """One line for a failed write of `path`: a full disk says how much was needed and how much is free."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        size = lambda n: f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"  # noqa: E731
        need = f"about {size(needed)} needed, " if needed else ""
        return f"disk full writing {path} ({need}{size(free)} free there); the previous file is kept"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {path}: {err.strerror} (a read-only folder?); the previous file is kept"
    return f"cannot write {path}: {err.strerror or err}"


def fsync_dir(folder):
    """Make a rename in `folder` durable (a power loss after it cannot bring the old name back)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def atomic_write(path, write, needed=None):
    """write(f) into a temp file opened "wb", fsync it, rename it over `path`. FileError when the disk is full,
    read-only or otherwise refuses (`needed`: the bytes it would take, for the message); the temp file is gone
    and `path` untouched either way."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a power loss cannot leave a torn file either
        os.replace(tmp, path)
    except Exception as e:
        err = os_error(e)
        if os.path.exists(tmp):
            os.remove(tmp)
        if err is None:
            raise
        raise FileError(write_failure(path, err, needed)) from None
    except BaseException:  # KeyboardInterrupt: no temp file left behind either
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def tensor_bytes(obj):
    """The bytes of the tensors in a nest of dicts, lists and tuples: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def atomic_save(obj, path):
    """torch.save(obj) to `path` through atomic_write."""
    atomic_write(path, lambda f: torch.save(obj, f), needed=tensor_bytes(obj))


def remove_leftovers(folder, names):
    """Remove the temp files that killed writes of `names` (files in `folder`) left: "{name}.tmp{pid}" and
    "{name}.part". Call it holding the folder's lock: no other writer of these names can be running. Returns
    the names removed."""
    pattern = re.compile("(" + "|".join(re.escape(n) for n in names) + r")\.(tmp\d+|part)")
    gone = sorted(f for f in os.listdir(folder) if pattern.fullmatch(f))
    for f in gone:
        os.remove(os.path.join(folder, f))
    return gone


# -----------------------------------------------------------------------------
# 3. One writer at a time

_held = {}  # path -> file descriptor: a lock lives as long as its descriptor is open (here: the process)


def lock(path, what):
    """Take the lock file at `path` for this process, for good (the kernel drops it when the process ends, however
    it ends). FileError naming the holder's pid when another process has it, or when the folder cannot be written
    (read-only, missing permission). `what`: the thing locked, for the message ("out_dir out-shapes")."""
    if fcntl is None or path in _held:
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise FileError(f"cannot write in {os.path.dirname(path) or '.'}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FileError(f"{what} is in use by another run (pid {holder}): wait for it to end, or choose "
                        "another folder") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:
        os.close(fd)
        raise FileError(write_failure(path, e)) from None
    _held[path] = fd


# -----------------------------------------------------------------------------
# 4. log.jsonl

def read_log(path):
    """(records, their raw lines, lines dropped, whether the file ends with a newline) of a log.jsonl: every line
    that is a JSON object with an "iter", in order; a torn last line (cut off, not JSON) and any other bad line are
    dropped."""
    if not os.path.exists(path):
        return [], [], 0, True
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    ends_whole = lines[-1] == b""  # every record is written with its newline in one write
    records, raw, dropped = [], [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            r = loads(line.decode("utf-8"))
            if not isinstance(r, dict) or not isinstance(r.get("iter"), int):
                raise ValueError("not a record")
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            dropped += 1
            continue
        records.append(r)
        raw.append(line)
    return records, raw, dropped, ends_whole


def resume_log(path, iter_num):
    """Make log.jsonl the log of a run resumed at iter_num: its records up to iter_num (what the checkpoint had
    seen), nothing torn. Untouched when it already is; else replaced atomically, so a kill at any moment leaves
    the old file or the new one, and either resumes to the same log. Returns a message, or None."""
    records, raw, dropped, ends_whole = read_log(path)
    keep = [line for r, line in zip(records, raw) if r["iter"] <= iter_num]
    if not dropped and ends_whole and len(keep) == len(records):
        return None
    atomic_write(path, lambda f: f.write(b"".join(line + b"\n" for line in keep)))
    parts = [f"{len(records) - len(keep)} records after iter {iter_num}"] if len(keep) < len(records) else []
    parts += [f"{dropped} torn or unreadable lines"] if dropped else []
    return f"{path}: dropped {' and '.join(parts)}" if parts else None


def new_log(path):
    """An empty log.jsonl for a new run, replacing any old one atomically."""
    atomic_write(path, lambda f: None)


def append_log(path, record):
    """Append one record as a line, fsynced (a checkpoint written after it cannot be on disk without it)."""
    line = (json.dumps(record) + "\n").encode()
    try:
        with open(path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise FileError(write_failure(path, e, len(line))) from None


# -----------------------------------------------------------------------------
# 5. Reading checkpoints

def torch_load(path, **kwargs):
    """torch.load(path, weights_only=True, **kwargs): tensors and plain containers only, never code. Every way
    the file can be wrong is a FileError saying which: missing, empty, truncated, not a PyTorch file, holding
    Python objects other than tensors."""
    if not os.path.isfile(path):
        raise FileError(f"no such file: {path}")
    size = os.path.getsize(path)
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise FileError(f"{path} holds Python objects other than tensors, which could run code when loaded: not "
                            "loaded (only a file from someone you trust may be opened with "
                            "torch.load(weights_only=False))") from None
        raise FileError(f"{path} is not a PyTorch file ({size} bytes)") from None
    except EOFError:
        raise FileError(f"{path} is empty or truncated ({size} bytes): not a checkpoint") from None
    except RuntimeError as e:
        if "zip archive" in str(e) or "PytorchStreamReader" in str(e):
            raise FileError(f"{path} is truncated or not a PyTorch file ({size} bytes)") from None
        raise
    except (KeyError, ValueError, IndexError, TypeError, MemoryError, OverflowError):  # a file of other bytes
        raise FileError(f"{path} is not a PyTorch file ({size} bytes)") from None
