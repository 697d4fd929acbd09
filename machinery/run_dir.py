"""What a training run keeps in its out_dir, and how it keeps it safe (its checkpoints:
checkpoints.py). A long run (about 17 h for compression, 36 h on 32 GPUs for sampling) must never
lose its last good state, nor share its folder with another run.

    claim(out_dir, resume, overwrite)   no training over a checkpoint by accident, a writable folder,
                                        locked (run.lock) while the run lives; --overwrite moves the
                                        earlier run's files into previous_<time>/
    DivergenceGuard(out_dir, spike)     a NaN, inf or spiking loss stops the run, ckpt.pt and
                                        ckpt_prev.pt holding states from before the divergence
    RunLog(out_dir, ...)                log.jsonl (and TensorBoard, W&B, curves.png: trackers.py)
    checkpoint_bytes / disk_report      what a run will write, against the free space
"""
import atexit
import importlib.util
import json
import math
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections import deque
from contextlib import suppress

from tqdm import tqdm

from machinery.checkpoints import BEST, CKPT, DIVERGED, PREV, keep_last_good

LOCK = 'run.lock'
LOCK_STALE_S = 900   # a lock from another host not refreshed for this long is taken over
HEARTBEAT_S = 60     # a live run refreshes its lock this often (a thread: downloads and encoding included)
SPIKE_WINDOW, SPIKE_MIN = 100, 20   # the loss-spike rule: the median of the last 100 losses, once 20 are known


# --- Claiming the folder: no accidental overwrite, one writer at a time ----------------------

def _lock_is_stale(path):
    """(stale, whose lock): on this host a lock is stale once its process is gone, from another host
    once it is not refreshed for LOCK_STALE_S."""
    try:
        with open(path) as f:
            owner = json.load(f)
        pid, host, started = int(owner['pid']), str(owner['host']), owner.get('started', '?')
    except (OSError, ValueError, TypeError, KeyError, AttributeError):   # torn or foreign content
        try:
            return time.time() - os.path.getmtime(path) > 60, 'an unreadable lock file, not refreshed for a minute'
        except OSError:   # removed meanwhile
            return True, 'a lock file that is gone'
    who = f"pid {pid} on {host}, started {started}"
    if host != socket.gethostname():
        return time.time() - os.path.getmtime(path) > LOCK_STALE_S, who
    try:
        os.kill(pid, 0)   # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True, who
    except PermissionError:   # it exists, another user's
        pass
    return False, who


def _take_lock(out_dir):
    path = os.path.join(out_dir, LOCK)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            stale, who = _lock_is_stale(path)
            if not stale:
                raise SystemExit(f"{out_dir} is in use by another run ({who}): wait for it to finish, or pass "
                                 f"another --out_dir. If that run is gone, delete {path}.")
            print(f"taking over {path}: left by a run that is no longer running ({who})")
            os.remove(path)
            continue
        with os.fdopen(fd, 'w') as f:
            json.dump(dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime('%Y-%m-%d %H:%M:%S')), f)
        atexit.register(_release_lock, path, os.getpid())
        threading.Thread(target=_keep_lock_fresh, args=(path,), daemon=True).start()
        return
    raise SystemExit(f"could not lock {path}: another run keeps taking it")


def _keep_lock_fresh(path):
    """While this process lives, refresh its lock's time every HEARTBEAT_S: a run that spends hours
    downloading or encoding before its first step must not look dead to a run on another host."""
    while True:
        time.sleep(HEARTBEAT_S)
        with suppress(OSError):
            os.utime(path)


def _release_lock(path, pid):
    with suppress(OSError, ValueError, KeyError), open(path) as f:
        if json.load(f)['pid'] == pid:
            os.remove(path)


def claim(out_dir, resume, overwrite=False, resume_flag='--init_from=resume'):
    """Call on rank 0 before any work. Stops if out_dir holds a checkpoint and this is not a resume
    (unless overwrite), if a resume finds none, if the folder is not writable, or another run holds it."""
    ckpt = os.path.join(out_dir, CKPT)
    if resume and overwrite:
        raise SystemExit(f"--overwrite starts a new run in {out_dir}, {resume_flag} continues its run: drop one")
    if resume and not os.path.exists(ckpt):
        raise SystemExit(f"{resume_flag}: {ckpt} does not exist (train first, or pass the run's --out_dir)")
    if not resume and os.path.exists(ckpt) and not overwrite:
        raise SystemExit(f"{ckpt} already exists. To continue that run pass {resume_flag}; to start a new one "
                         f"pass another --out_dir, or --overwrite to train from scratch in this folder "
                         f"(the earlier run's files are moved into a previous_<time> folder in it).")
    if os.path.isfile(out_dir):
        raise SystemExit(f"--out_dir={out_dir} is a file, not a folder: pass a folder (it is made if missing)")
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()   # a file can be written there
    except OSError as e:
        raise SystemExit(f"--out_dir={out_dir} is not writable ({e.strerror}): pass a folder you can write to")
    _take_lock(out_dir)
    if overwrite and not resume:
        _move_earlier_run_aside(out_dir)


# What a run writes into its out_dir (with the LoRA export, and sample.py's samples/): --overwrite moves these
RUN_FILES = (CKPT, PREV, BEST, DIVERGED, 'log.jsonl', 'curves.png',
             'results.json', 'val', 'samples', 'lora.safetensors', 'state_embedder.safetensors', 'tensorboard',
             'wandb', 'wandb_id')


def _move_earlier_run_aside(out_dir):
    """--overwrite: the earlier run's files go to out_dir/previous_<time>/: a folder never mixes two runs."""
    names = sorted(n for n in os.listdir(out_dir) if n in RUN_FILES or n.endswith('.tmp')
                   or (n.startswith(('lora_', 'state_embedder_')) and n.endswith('.safetensors')))
    if not names:
        return
    aside = os.path.join(out_dir, 'previous_' + time.strftime('%Y%m%d-%H%M%S'))
    while os.path.exists(aside):
        aside += '_'
    os.makedirs(aside)
    for name in names:
        os.replace(os.path.join(out_dir, name), os.path.join(aside, name))
    print(f"--overwrite: moved the earlier run's files ({', '.join(names)}) to {aside}/")


# --- Divergence and logs ----------------------------------------------------------------------

class DivergenceGuard:
    """Stops a run that diverges, before the optimizer step, with ckpt.pt the last good state.
    Diverged: a NaN or inf loss or gradient norm, or a training loss above `spike` times the median of
    its last SPIKE_WINDOW values (once SPIKE_MIN are known; spike 0: off), a history that travels in the
    checkpoint (state_dict; `saved` on resume). Every rank checks the same (all-reduced) figures, so all
    stop together; the spike rule is the master's alone: the launcher stops the other ranks."""

    def __init__(self, out_dir, spike, master=True, start_step=0, saved=None):
        self.out_dir, self.spike, self.master, self.start_step = out_dir, spike, master, start_step
        saved = saved or {}
        self.losses = deque(saved.get('losses', ()), maxlen=SPIKE_WINDOW)
        # the first step whose weights' loss the spike rule checked (off: finiteness is all there is to check)
        self.checked_from = saved.get('checked_from', math.inf) if spike else 0

    def state_dict(self):
        return dict(losses=list(self.losses), checked_from=self.checked_from)

    def trusted(self, step):
        """Whether the state saved as `step` is known good: the one this run resumed from, or its loss passed."""
        return step is not None and (step == self.start_step or step >= self.checked_from)

    def check(self, figures, step):
        """figures of optimizer step `step` (the N-th step's: computed on the weights saved as step N - 1)."""
        for what, value in figures.items():   # a stop, not a skipped step: a run that diverges once usually does again
            if not math.isfinite(value):
                self.stop(f"the {what} is {value}", step)
        loss = figures['training loss']
        if self.master and self.spike and len(self.losses) >= SPIKE_MIN:
            median = statistics.median(self.losses)
            if loss > self.spike * median:
                self.stop(f"the training loss spiked to {loss:.4g}, over {self.spike:g} x {median:.4g} (the "
                          f"median of the last {len(self.losses)})", step)
            self.checked_from = min(self.checked_from, step - 1)
        self.losses.append(loss)

    def stop(self, reason, step):
        """Stop (exit 1; the master says why) at a divergence in the loss of the weights of step - 1."""
        if not self.master:
            raise SystemExit(1)
        raise SystemExit(f"step {step}: {reason}: stopping. {keep_last_good(self.out_dir, step, self.trusted)}. "
                         f"Lower --learning_rate, check the data, or resume from the checkpoint with other settings.")


# How the printed line shows the figures both trainers record every step (the others: log.jsonl only)
LINE_FORMATS = dict(loss='loss {:.4f}', lr='lr {:.2e}', grad_norm='grad norm {:.3g}',
                    samples_per_s='{:.2f} samples/s', mfu='MFU {:.1%}', max_mem_gib='{:.1f} GiB')


def check_log_with(log_with):
    """Stop at start, not at the first log line hours later, if --log_with's package is missing or broken."""
    if log_with == 'none':
        return
    if importlib.util.find_spec(log_with) is None:
        raise SystemExit(f"--log_with={log_with}: the {log_with} package is not installed (pip install {log_with})")
    try:   # what trackers.py imports
        importlib.import_module('torch.utils.tensorboard' if log_with == 'tensorboard' else log_with)
    except Exception as err:   # a broken install fails in many ways (ImportError, protobuf's TypeError, ...)
        first = (str(err).strip() or type(err).__name__).splitlines()[0][:200]
        raise SystemExit(f"--log_with={log_with}: the {log_with} package is installed but fails on import ({first}): "
                         f"reinstall it (pip install --force-reinstall {log_with}), or pass --log_with=none") from None


class RunLog:
    """One json line per record (with its unix time) in out_dir/log.jsonl, and a tracker if asked
    (log_with: 'tensorboard' or 'wandb', trackers.py). A record's step is N after N optimizer steps:
    the N-th step's loss, and the validation of its weights. On resume from step S, records after S
    are dropped first (TensorBoard's events too; W&B continues its run), so the log reads as one
    run. A figure that is None (no MFU on the CPU) is left out. With total (the last step), a
    progress bar; with log_interval, a line every log_interval steps and at the last, as nanoGPT
    prints its loss: `step 100: loss 2.1234, ..., MFU 8.9%`."""

    def __init__(self, out_dir, start_step=0, log_with='none', config=None, project='nanowm', run_name='',
                 total=None, log_interval=0):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, 'log.jsonl')
        self.total, self.log_interval = total, log_interval
        # disable=None: a bar on a terminal only (piped to a file, the log_interval lines say it all)
        self.bar = tqdm(total=total, initial=start_step, desc='train', dynamic_ncols=True,
                        disable=None) if total else None
        kept = [json.dumps(r) + '\n' for r in read_log(out_dir) if r.get('step', 0) <= start_step] \
            if start_step > 0 and os.path.exists(self.path) else []
        with open(self.path, 'w') as f:
            f.writelines(kept)
        self.tracker = None
        if log_with != 'none':   # optional packages, imported only when asked for
            from machinery import trackers
            self.tracker = trackers.TensorBoard(out_dir, start_step) if log_with == 'tensorboard' else \
                trackers.WandB(out_dir, start_step, config, project, run_name)

    def write(self, record, images=None):
        """images: name -> PNG path (validation pictures), sent to the tracker at this step."""
        record = {k: v for k, v in record.items() if v is not None}
        step = record['step']
        with open(self.path, 'a') as f:   # with the wall-clock time (unix seconds): when each step ended
            f.write(json.dumps(dict(record, time=round(time.time(), 3))) + '\n')
        figures = {k: v for k, v in record.items() if k != 'step' and isinstance(v, (int, float))}
        if self.tracker is not None:
            self.tracker.write(step, figures, images or {})
        if self.log_interval and (step % self.log_interval == 0 or step == self.total):
            tqdm.write(f"step {step}: " + ', '.join(LINE_FORMATS[k].format(v) for k, v in record.items()
                                                    if k in LINE_FORMATS))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}")
            self.bar.update(1)

    def close(self, curves=(), title=''):
        """curves: [(y label, [log keys])], a panel each of curves.png (trackers.plot_curves)."""
        if self.bar is not None:
            self.bar.close()
        if self.tracker is not None:
            self.tracker.close()
        if curves:
            from machinery.trackers import plot_curves
            plot_curves(self.out_dir, curves, title)


def read_log(out_dir):
    """The records of out_dir/log.jsonl. A line that is not JSON (a run killed while writing it
    leaves a torn last line) is skipped with a note, not an error: the log is never worth a run."""
    path, records, bad = os.path.join(out_dir, 'log.jsonl'), [], 0
    with open(path) as f:
        for line in filter(str.strip, f):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    if bad:
        print(f"note: {path}: skipped {bad} line(s) that are not JSON (a write cut short)")
    return records


# --- Disk space: what a run will write, against what is free ----------------------------------

def checkpoint_bytes(n_saved, n_trained):
    """The checkpoint files a run keeps at most: ckpt.pt, ckpt_prev.pt and ckpt_best.pt (distinct
    once the run has moved on), each n_saved fp32 weights and AdamW's two fp32 moments of the
    n_trained ones."""
    return 3 * 4 * (n_saved + 2 * n_trained)


def size(n):
    """n bytes at any scale: 2.00 TiB, 3.1 GiB, 12.0 MiB, 4.0 KiB, 10 bytes."""
    if n >= 2 ** 40:
        return f"{n / 2 ** 40:,.2f} TiB"
    for unit, power in (('GiB', 30), ('MiB', 20), ('KiB', 10)):
        if n >= 2 ** power / 10:
            return f"{n / 2 ** power:,.1f} {unit}"
    return f"{n:,} bytes"


def existing_parent(folder):
    """folder, or for a folder not created yet its nearest existing parent: the file system that
    will hold it (os.stat(...).st_dev names it)."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def disk_report(needs, usage=shutil.disk_usage):
    """needs: [(folder, bytes, what)]. One line per file system: what goes there, the sum, the
    free space; and the sentence of refusal when the sum exceeds the free space (else '')."""
    by_disk = {}
    for folder, n, what in needs:
        probe = existing_parent(folder)
        disk = by_disk.setdefault(os.stat(probe).st_dev, [probe, 0, []])
        disk[1] += n
        disk[2].append(f"{what} {size(n)}")
    lines, short = [], []
    for probe, n, whats in by_disk.values():
        free = usage(probe).free
        lines.append(f"disk: {', '.join(whats)} = {size(n)} to write on the disk of {probe} ({size(free)} free)")
        if n > free:
            short.append(f"{', '.join(whats)} need {size(n)} on the disk of {probe}, which has {size(free)} free")
    refusal = (f"not enough disk space: {'; '.join(short)}. Free space there, or pass an --out_dir (or --data_dir) "
               f"on a larger disk.") if short else ''
    return lines, refusal
