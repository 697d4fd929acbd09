"""What a training run keeps in its out_dir, and how it keeps it safe.

A long run (about 17 h for compression, 36 h on 32 GPUs for sampling) must never lose its last
good state. Both training scripts use these few functions:

    claim(out_dir, resume, overwrite)   refuse to train from scratch over an existing checkpoint,
                                        check the folder is writable, and lock it (run.lock) so
                                        that a second run cannot write into it at the same time
                                        (refreshed by a thread while the run lives); --overwrite
                                        moves the earlier run's files into previous_<time>/
    save_checkpoint(out_dir, state)     ckpt.pt written atomically; the one before it kept as
                                        ckpt_prev.pt, and the best by a validation metric as
                                        ckpt_best.pt (hard links: no extra disk); a state holding
                                        NaN or inf is never written
    load_checkpoint(path, kind, expect) torch.load(weights_only=True): a checkpoint holds tensors
                                        and plain data only, so loading one never runs code; the
                                        track and the model settings are checked
    check_log_with(log_with)            a tracker whose package is missing stops the run at its start
    RunLog(out_dir, ...)                log.jsonl (and TensorBoard or Weights & Biases, if asked
                                        for); on the terminal a progress bar and a line every
                                        log_interval steps. Step N: after N optimizer steps, in the
                                        log, the console, val/step_N, best.json and ckpt.pt alike
    model_settings_on_resume(...)       a resume takes the model settings of its checkpoint, and
    optimizer_settings_on_resume(...)   the optimizer flags given now (it says which changed)
    plain(config)                       the settings as plain data, for a checkpoint
    checkpoint_bytes / disk_report      what a run will write, against the free space
    plot_curves(out_dir, panels)        curves.png from log.jsonl
    DivergenceGuard(out_dir, spike)     a NaN or inf loss (or gradient norm), or a loss far above its
                                        recent median, stops the run; ckpt.pt and ckpt_prev.pt keep
                                        only states from before the divergence
"""
import atexit
import importlib.util
import json
import math
import os
import pickle
import shutil
import socket
import statistics
import threading
import time
import uuid
from collections import deque

import numpy as np
import torch
from tqdm import tqdm

CKPT, PREV, BEST, LOCK = 'ckpt.pt', 'ckpt_prev.pt', 'ckpt_best.pt', 'run.lock'
DIVERGED = 'ckpt_diverged.pt'   # a saved state whose loss then diverged, moved out of ckpt.pt
LOCK_STALE_S = 900   # a lock from another host not refreshed for this long is taken over
HEARTBEAT_S = 60     # a live run refreshes its lock this often (a thread: downloads and encoding included)
SPIKE_WINDOW, SPIKE_MIN = 100, 20   # the loss-spike rule: the median of the last 100 losses, once 20 are known


# ---------------------------------------------------------------------------------------------
# Claiming the folder: no accidental overwrite, one writer at a time
# ---------------------------------------------------------------------------------------------

def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_is_stale(path):
    try:
        with open(path) as f:
            owner = json.load(f)
        owner = dict(pid=int(owner['pid']), host=str(owner['host']), started=owner.get('started', '?'))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):   # torn or foreign content
        try:
            return time.time() - os.path.getmtime(path) > 60, 'an unreadable lock file, not refreshed for a minute'
        except OSError:   # removed meanwhile
            return True, 'a lock file that is gone'
    who = f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
    if owner['host'] == socket.gethostname():
        return not _pid_alive(owner['pid']), who
    return time.time() - os.path.getmtime(path) > LOCK_STALE_S, who


def _take_lock(out_dir):
    path = os.path.join(out_dir, LOCK)
    me = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime('%Y-%m-%d %H:%M:%S'))
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
            json.dump(me, f)
        atexit.register(_release_lock, path, os.getpid())
        threading.Thread(target=_keep_lock_fresh, args=(out_dir,), daemon=True).start()
        return path
    raise SystemExit(f"could not lock {path}: another run keeps taking it")


def _keep_lock_fresh(out_dir):
    """While this process lives, refresh its lock every HEARTBEAT_S: a run that spends hours
    downloading or encoding before its first step must not look dead to a run on another host."""
    while True:
        time.sleep(HEARTBEAT_S)
        heartbeat(out_dir)


def _release_lock(path, pid):
    try:
        with open(path) as f:
            if json.load(f)['pid'] == pid:
                os.remove(path)
    except (OSError, ValueError, KeyError):
        pass


def claim(out_dir, resume, overwrite=False, resume_flag='--init_from=resume'):
    """Call on the process that saves (rank 0) before any work. Stops with a message if out_dir
    holds a checkpoint and this is not a resume (unless overwrite), if a resume finds none, if the
    folder cannot be written, or if another live run holds it."""
    ckpt = os.path.join(out_dir, CKPT)
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
        probe = os.path.join(out_dir, f'.write_test_{os.getpid()}')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--out_dir={out_dir} is not writable ({e.strerror}): pass a folder you can write to")
    _take_lock(out_dir)
    if overwrite and not resume:
        _move_earlier_run_aside(out_dir)


# What a run writes into its out_dir (with the LoRA export, and sample.py's samples/): --overwrite moves these
RUN_FILES = ('ckpt.pt', 'ckpt_prev.pt', 'ckpt_best.pt', DIVERGED, 'best.json', 'log.jsonl', 'curves.png',
             'results.json', 'val', 'samples', 'lora.safetensors', 'state_embedder.safetensors', 'tensorboard',
             'wandb', 'wandb_id')


def _move_earlier_run_aside(out_dir):
    """--overwrite: the earlier run's files go to out_dir/previous_<time>/, so the new run's folder
    never mixes two runs (a best checkpoint or an exported LoRA of the old one beside the new)."""
    names = sorted(n for n in os.listdir(out_dir) if n in RUN_FILES or n.endswith('.tmp')
                   or (n.startswith(('lora_', 'state_embedder_')) and n.endswith('.safetensors')))
    if not names:
        return None
    aside = os.path.join(out_dir, 'previous_' + time.strftime('%Y%m%d-%H%M%S'))
    while os.path.exists(aside):
        aside += '_'
    os.makedirs(aside)
    for name in names:
        os.replace(os.path.join(out_dir, name), os.path.join(aside, name))
    print(f"--overwrite: moved the earlier run's files ({', '.join(names)}) to {aside}/")
    return aside


def heartbeat(out_dir):
    """Refresh the lock's time, so a run on another host knows this one is alive."""
    try:
        os.utime(os.path.join(out_dir, LOCK))
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def save_checkpoint(out_dir, state, metric=None, higher_is_better=False):
    """Write ckpt.pt atomically; keep the previous one as ckpt_prev.pt; if `metric` is given and
    is the best so far, ckpt.pt is also kept as ckpt_best.pt (best.json says its step and value).
    At every moment ckpt.pt is a whole checkpoint: a run killed while saving loses nothing. A state
    holding NaN or inf is never saved (the run stops, files untouched), nor is a full disk a
    traceback (the partial file is removed)."""
    path = os.path.join(out_dir, CKPT)
    bad = _non_finite(state)
    if bad:
        raise SystemExit(f"step {state.get('step')}: {bad} holds NaN or inf: stopping without saving. "
                         f"{_what_ckpt_holds(out_dir)}. Lower --learning_rate, check the data, or resume "
                         f"from the checkpoint with other settings.")
    try:
        torch.save(state, path + '.tmp')
        with open(path + '.tmp', 'rb') as f:
            os.fsync(f.fileno())
        if os.path.exists(path):
            _link_or_copy(path, os.path.join(out_dir, PREV))
        os.replace(path + '.tmp', path)
    except OSError as e:   # a full disk, a quota, a folder gone read-only
        for tmp in (path + '.tmp', os.path.join(out_dir, PREV) + '.tmp'):
            if os.path.exists(tmp):
                os.remove(tmp)
        raise SystemExit(f"could not save {path} ({e.strerror or e}): free space (or fix the permissions) on the "
                         f"disk of --out_dir={out_dir}, then resume. {_what_ckpt_holds(out_dir)}.")
    if metric is not None and math.isfinite(metric):
        best_json = os.path.join(out_dir, 'best.json')
        best = _read_json_or_none(best_json, 'the next finite metric becomes the best')
        if best is None or (metric > best['value'] if higher_is_better else metric < best['value']):
            _link_or_copy(path, os.path.join(out_dir, BEST))
            with open(best_json + '.tmp', 'w') as f:
                json.dump(dict(step=state.get('step'), value=metric, higher_is_better=higher_is_better), f)
            os.replace(best_json + '.tmp', best_json)
    heartbeat(out_dir)


def _non_finite(obj, name=''):
    """The name of the first floating-point tensor in obj (nested dicts and lists) holding NaN or
    inf, or None."""
    if isinstance(obj, torch.Tensor):
        return name if obj.is_floating_point() and not torch.isfinite(obj).all() else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        bad = _non_finite(value, f"{name}.{key}" if name else str(key))
        if bad:
            return bad
    return None


def _peek(path):
    """A checkpoint on disk with its tensors left there (memory-mapped), or None if unreadable:
    what a caller needs of it (its step, its config) is read without loading the weights."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:   # unreadable or not ours: the caller says so
        return None
    return state if isinstance(state, dict) else None


def _saved_step(path):
    """The step of a checkpoint on disk, or None."""
    return (_peek(path) or {}).get('step')


def _what_ckpt_holds(out_dir):
    ckpt = os.path.join(out_dir, CKPT)
    if not os.path.exists(ckpt):
        return "no checkpoint was written"
    return f"{ckpt} (step {_saved_step(ckpt)}) is untouched"


def _link_or_copy(src, dst):
    """dst becomes a hard link to src's current file (its content stays when src is replaced)."""
    tmp = dst + '.tmp'
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:   # a file system without hard links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path, kind, expect=None):
    """Load a checkpoint with weights_only=True (tensors and plain data only: never runs code).
    kind: 'compression' or 'sampling'. expect: settings that must equal the checkpoint's
    config (the model's shape); each difference is named."""
    if not os.path.exists(path):
        raise SystemExit(f"{path} does not exist")
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"{path}: refusing to load it: it holds Python objects, not only tensors and plain data "
                         f"({first}). nanoWM loads checkpoints with torch.load(weights_only=True), so a file "
                         f"that would run code is rejected; only load checkpoints you trust and that nanoWM wrote.")
    except (RuntimeError, EOFError, OSError) as e:
        raise SystemExit(f"{path} cannot be read ({str(e).splitlines()[0][:200]}): it may be truncated; {PREV} or "
                         f"{BEST} in the same folder (if there) hold earlier states: copy one over {CKPT} to resume "
                         f"from it")
    if not isinstance(state, dict) or state.get('kind') != kind:
        found = state.get('kind', 'no track recorded') if isinstance(state, dict) else type(state).__name__
        raise SystemExit(f"{path} is not a {kind}-track checkpoint of nanoWM (it says: {found}); "
                         f"pass the checkpoint of a {kind} run")
    saved = state.get('config', {})
    diffs = [f"{k}={saved[k]!r} in the checkpoint, {v!r} now" for k, v in (expect or {}).items()
             if k in saved and saved[k] != v]   # a setting the checkpoint predates is not compared
    if diffs:
        raise SystemExit(f"{path} was trained with other model settings: " + '; '.join(diffs)
                         + ". Pass the same settings (or another --out_dir to start a new run).")
    return state


def model_settings_on_resume(out_dir, kind, settings, given):
    """--init_from=resume, as nanoGPT: the settings that shape the model (settings: name -> value
    now) are those of out_dir/ckpt.pt. One the user did not give (given: the names configure()
    returns, set by a flag or a config file) is taken from the checkpoint, with a line naming
    each; one given that differs is refused by name. Returns the settings to use. Reads the
    checkpoint memory-mapped: only its config is touched."""
    path = os.path.join(out_dir, CKPT)
    if not os.path.exists(path):   # claim() says so, with what to do
        return settings
    saved = _saved_config(path, kind)
    differ = {k: v for k, v in settings.items() if k in saved and saved[k] != v}
    clash = [f"{k}={saved[k]!r} in the checkpoint, {v!r} now" for k, v in differ.items() if k in given]
    if clash:
        raise SystemExit(f"{path} was trained with other model settings: {'; '.join(clash)}. Leave these settings "
                         f"out (flags or config file) to take the checkpoint's, or pass another --out_dir to start "
                         f"a new run.")
    taken = {k: saved[k] for k in differ}
    if taken and os.environ.get('RANK', '0') == '0':
        print(f"resume: model settings taken from {path}: " + ', '.join(f"{k}={v!r}" for k, v in taken.items()))
    return {**settings, **taken}


def _saved_config(path, kind):
    """A checkpoint's config, its tensors left on disk (memory-mapped)."""
    state = _peek(path)
    if state is None or state.get('kind') != kind:   # load_checkpoint stops saying what is wrong
        state = load_checkpoint(path, kind)
    return state.get('config', {})


def optimizer_settings_on_resume(optimizer, group_settings, saved_config, config):
    """optimizer.load_state_dict brings back the saved learning rate, weight decay and betas; a
    resumed run must take the ones given now (lowering the learning rate after a divergence is why
    one resumes). group_settings: each param group's settings now. Returns a line naming each
    optimizer flag that differs from the checkpoint's, or '' if none does."""
    for group, settings in zip(optimizer.param_groups, group_settings):
        group.update(settings)
    changed = [f"--{k}={config[k]!r} (the checkpoint's: {saved_config.get(k)!r})"
               for k in ('learning_rate', 'weight_decay', 'beta1', 'beta2')
               if k in config and k in saved_config and saved_config[k] != config[k]]
    return f"resuming with {', '.join(changed)}" if changed else ''


def plain(config):
    """The settings as plain data (what weights_only loading accepts): tuples become lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()
            if isinstance(v, (int, float, bool, str, type(None), list, tuple))}


# ---------------------------------------------------------------------------------------------
# Logs and curves
# ---------------------------------------------------------------------------------------------

def stop_if_not_finite(figures, step, out_dir, master=True):
    """A NaN or inf among figures ({'training loss': value, ...}) of optimizer step `step` stops
    the run (exit code 1) before that step updates the weights. A stop, not a skipped step, is the
    safe default: a run that diverges once usually diverges again. Every rank calls it with the
    same (all-reduced) figures, so all stop together; only the master prints why."""
    for what, value in figures.items():
        if not math.isfinite(value):
            stop_diverged(f"the {what} is {value}", step, out_dir, master)


class DivergenceGuard:
    """Stops a run that diverges, before the optimizer step, with ckpt.pt the last good state.
    Diverged: a NaN or inf loss or gradient norm, or a training loss above `spike` times the
    median of its last SPIKE_WINDOW values (once SPIKE_MIN are known; spike 0: off), so a run that
    explodes but stays finite stops too, before its checkpoints are overwritten. Every rank calls
    check with the same (all-reduced) figures; the spike rule is the master's alone (it continues
    its history from log.jsonl on resume), and the launcher stops the other ranks when it exits."""

    def __init__(self, out_dir, spike, master=True, start_step=0):
        self.out_dir, self.spike, self.master = out_dir, spike, master
        self.losses = deque(maxlen=SPIKE_WINDOW)
        if master and start_step > 0 and os.path.exists(os.path.join(out_dir, 'log.jsonl')):
            self.losses.extend(r['loss'] for r in read_log(out_dir)
                               if r.get('step', start_step) <= start_step and isinstance(r.get('loss'), (int, float)))

    def check(self, figures, step):
        """figures of optimizer step `step` (the N-th step's: computed on the weights saved as step N - 1)."""
        stop_if_not_finite(figures, step, self.out_dir, self.master)
        loss = figures['training loss']
        if self.master and self.spike and len(self.losses) >= SPIKE_MIN:
            median = statistics.median(self.losses)
            if loss > self.spike * median:
                stop_diverged(f"the training loss spiked to {loss:.4g}, over {self.spike:g} x {median:.4g} (the "
                              f"median of the last {len(self.losses)})", step, self.out_dir, self.master)
        self.losses.append(loss)


def stop_diverged(reason, step, out_dir, master=True):
    """Stop (exit code 1) for a divergence seen in optimizer step `step`, i.e. in the loss of the
    weights saved as step `step` - 1 (step N: after N optimizer steps): a checkpoint of those
    weights (saved just before) goes to ckpt_diverged.pt, and ckpt.pt becomes ckpt_prev.pt again
    (both then hold the state before). The message says which file holds which step."""
    if not master:
        raise SystemExit(1)
    raise SystemExit(f"step {step}: {reason}: stopping. {_keep_last_good(out_dir, step)}. Lower --learning_rate, "
                     f"check the data, or resume from the checkpoint with other settings.")


def _keep_last_good(out_dir, step):
    ckpt, prev = os.path.join(out_dir, CKPT), os.path.join(out_dir, PREV)
    if not os.path.exists(ckpt):
        return "no checkpoint was written"
    saved = _saved_step(ckpt)
    if saved is None or saved < step - 1:   # the weights that diverged are those of step - 1
        return f"{ckpt} holds step {saved}, saved before the divergence at step {step}"
    os.replace(ckpt, os.path.join(out_dir, DIVERGED))
    said = f"the checkpoint of step {saved}, whose loss diverged, was moved to {os.path.join(out_dir, DIVERGED)}"
    best_json = os.path.join(out_dir, 'best.json')
    best = _read_json_or_none(best_json, 'it is replaced')
    if best is not None and best.get('step') is not None and best['step'] >= saved:   # the best was that state too
        for path in (os.path.join(out_dir, BEST), best_json):
            if os.path.exists(path):
                os.remove(path)
        said += f" ({BEST} was that state too and is removed)"
    if not os.path.exists(prev):
        return f"{said}; no checkpoint from before step {saved} exists"
    _link_or_copy(prev, ckpt)
    return f"{ckpt} and {prev} hold step {_saved_step(ckpt)}, saved before the loss diverged at step {step}; {said}"


# How the printed line shows the figures both trainers record every step (the others: log.jsonl only)
LINE_FORMATS = dict(loss='loss {:.4f}', lr='lr {:.2e}', grad_norm='grad norm {:.3g}',
                    samples_per_s='{:.2f} samples/s', mfu='MFU {:.1%}', max_mem_gib='{:.1f} GiB')


def check_log_with(log_with):
    """Stop at start, not at the first log line hours later, if --log_with's package is missing."""
    if log_with != 'none' and importlib.util.find_spec(log_with) is None:
        raise SystemExit(f"--log_with={log_with}: the {log_with} package is not installed (pip install {log_with})")


class RunLog:
    """One json line per record (with its unix time) in out_dir/log.jsonl, and a tracker if asked
    (log_with: 'none', 'tensorboard' or 'wandb'; the package imported only then). A record's step
    is N after N optimizer steps: the N-th step's loss, and the validation of its weights. On
    resume from step S, records after S are dropped first, so the log reads as one uninterrupted
    run. A figure that is None (no MFU on the CPU) is left out.
    TensorBoard writes out_dir/tensorboard (events after S dropped on resume); W&B keeps its files
    in out_dir/wandb and its run id in out_dir/wandb_id, so a resume continues the same W&B run.
    With total (the last step), a progress bar; with log_interval, a line every log_interval
    steps and at the last, as nanoGPT prints its loss: `step 100: loss 2.1234, ..., MFU 8.9%`."""

    def __init__(self, out_dir, start_step=0, log_with='none', config=None, project='nanowm', run_name='',
                 total=None, log_interval=0):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, 'log.jsonl')
        self.total, self.log_interval = total, log_interval
        self.bar = tqdm(total=total, initial=start_step, desc='train', dynamic_ncols=True) if total else None
        kept = []
        if start_step > 0 and os.path.exists(self.path):
            kept = [json.dumps(r) + '\n' for r in read_log(out_dir) if r.get('step', 0) <= start_step]
        with open(self.path, 'w') as f:
            f.writelines(kept)
        self.tensorboard = self.wandb = None
        if log_with == 'tensorboard':   # optional: pip install tensorboard
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: events of steps after the resumed one (written before a crash) are dropped
            self.tensorboard = SummaryWriter(os.path.join(out_dir, 'tensorboard'),
                                             purge_step=start_step + 1 if start_step else None)
        elif log_with == 'wandb':       # optional: pip install wandb
            import wandb
            id_path = os.path.join(out_dir, 'wandb_id')
            if start_step > 0 and os.path.exists(id_path):   # the run resumed: its W&B run continues
                run_id = open(id_path).read().strip()
            else:
                run_id = uuid.uuid4().hex[:8]
                with open(id_path, 'w') as f:
                    f.write(run_id)
            self.wandb_module = wandb
            self.wandb = wandb.init(project=project, name=run_name or None, config=config, dir=out_dir, id=run_id,
                                    resume='allow')

    def write(self, record, images=None):
        """images: name -> PNG path (validation pictures), sent to the tracker at this step."""
        record = {k: v for k, v in record.items() if v is not None}
        step = record['step']
        with open(self.path, 'a') as f:   # with the wall-clock time (unix seconds): when each step ended
            f.write(json.dumps(dict(record, time=round(time.time(), 3))) + '\n')
        figures = {k: v for k, v in record.items() if k != 'step' and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for k, v in figures.items():
                self.tensorboard.add_scalar(k, v, step)
            for name, path in (images or {}).items():
                from PIL import Image
                self.tensorboard.add_image(name, np.asarray(Image.open(path).convert('RGB')), step, dataformats='HWC')
        if self.wandb is not None:
            self.wandb.log({**figures, **{name: self.wandb_module.Image(path) for name, path in (images or {}).items()}},
                           step=step)
        heartbeat(self.out_dir)
        if self.log_interval and (step % self.log_interval == 0 or step == self.total):
            tqdm.write(f"step {step}: " + ', '.join(LINE_FORMATS[k].format(v) for k, v in record.items()
                                                    if k in LINE_FORMATS))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}")
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


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


def _read_json_or_none(path, then):
    """A small JSON file of the run folder, or None (with a note saying what happens) when it is
    missing or unreadable."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, OSError) as err:
        print(f"note: {path} cannot be read ({err}); {then}")
        return None


def plot_curves(out_dir, panels, title=''):
    """curves.png in out_dir: one panel per (y label, [log keys]), step on the x axis. Prints where
    it is; without matplotlib says so and returns None (a finished run loses only the picture)."""
    try:
        import matplotlib
    except ImportError as e:
        print(f"no curves.png ({e}: pip install matplotlib); the figures are in {out_dir}/log.jsonl")
        return None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    records = read_log(out_dir)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (ylabel, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(r['step'], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker='o' if len(points) < 30 else None, markersize=3, label=key)
        ax.set_xlabel('step')
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(out_dir, 'curves.png')
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"curves: {path}")
    return path


# ---------------------------------------------------------------------------------------------
# Disk space: what a run will write, against what is free
# ---------------------------------------------------------------------------------------------

def checkpoint_bytes(n_saved, n_trained):
    """The checkpoint files a run keeps at most: ckpt.pt, ckpt_prev.pt and ckpt_best.pt (distinct
    once the run has moved on), each n_saved fp32 weights and AdamW's two fp32 moments of the
    n_trained ones."""
    return 3 * 4 * (n_saved + 2 * n_trained)


def gib(n):
    return f"{n / 2 ** 30:,.1f} GiB" if n < 2 ** 40 else f"{n / 2 ** 40:,.2f} TiB"


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
        disk[2].append(f"{what} {gib(n)}")
    lines, short = [], []
    for probe, n, whats in by_disk.values():
        free = usage(probe).free
        lines.append(f"disk: {', '.join(whats)} = {gib(n)} to write on the disk of {probe} ({gib(free)} free)")
        if n > free:
            short.append(f"{', '.join(whats)} need {gib(n)} on the disk of {probe}, which has {gib(free)} free")
    refusal = (f"not enough disk space: {'; '.join(short)}. Free space there, or pass an --out_dir (or --data_dir) "
               f"on a larger disk.") if short else ''
    return lines, refusal
