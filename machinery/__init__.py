"""What runs the two recipes but is not the recipe, one job a module:
run_dir (a run's folder: lock, divergence guard, log, disk check), checkpoints (atomic saves, loads that
run no code), trackers (TensorBoard, W&B, curves.png), distributed (the processes torchrun starts), speed
(samples/s, MFU), hub (Hugging Face downloads), tokenized and latents (each track's data on disk), vae
(the codecs), wan_files (Wan checkpoints, the umT5 empty prompt), lora_files (LoRA files in and out),
image_scores (LPIPS, FID), synthetic_tokens and synthetic_video (the two synthetic worlds), own_clips
(your clips in the 1X layout), pictures (frame figures), prepare (`python -m machinery.prepare`: the data
commands), bench (`python -m machinery.bench`), slurm_sampling.sh (the paper's 4-node run under SLURM).
Optional packages are imported where used, through need(); files are written through written(), so a
full disk is a sentence and never leaves a partial file.
"""
import errno
import importlib
import os
from contextlib import contextmanager, suppress


def need(package, what):
    """The optional package `what` needs, imported; or a stop naming the pip line that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise SystemExit(f"{what} needs the {package} package ({err}): pip install -r requirements-sampling.txt"
                         ) from None


# A write stopped by a full disk, a quota, ulimit -f or a read-only folder: an OSError from Python (numpy's has
# no errno), an error of safetensors' Rust code, or PyTorch's RuntimeError (an iostream error behind "unexpected pos")
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)
DISK_WORDS = ('No space left', 'os error 28', 'Disk quota', 'File too large', 'Read-only file system',
              'requested and', 'file write failed', 'open file failed', 'iostream error', 'unexpected pos')


def disk_error(err):
    """Why a write failed for want of room or rights (one line), or None for any other error (a bug)."""
    chain = []
    while err is not None and err not in chain:   # the error and those it was raised while handling
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e.strerror or str(e)
    text = str(chain[0]).strip()
    return text.splitlines()[0][:200] if any(w in str(e) for e in chain for w in DISK_WORDS) else None


@contextmanager
def written(path, then='then run again'):
    """Write `path` through the yielded path + '.tmp', moved into place when the body ends: a kill
    leaves the earlier file whole. A disk error (disk_error) removes the partial file and stops with
    one sentence naming path and, after freeing space, `then`; any other error keeps its traceback."""
    tmp = os.fspath(path) + '.tmp'
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as err:
        with suppress(OSError):
            os.remove(tmp)
        reason = disk_error(err)
        if reason is None:
            raise
        raise SystemExit(f"could not write {path} ({reason}): free space on its disk (or fix its permissions), "
                         f"{then}") from None
