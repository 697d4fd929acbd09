"""A run's checkpoints: written so that no state is ever lost, and read so that no file runs code.

    save_checkpoint(out_dir, state, metric)   ckpt.pt atomically, ckpt_prev.pt and ckpt_best.pt (hard
                                              links); a state holding NaN or inf is never written
    load_checkpoint(path, kind, expect)       tensors and plain data only, finite; track and model settings checked
    settings_on_resume(...)                   a resume takes every setting not given from its checkpoint,
    optimizer_settings_on_resume(...)         and the optimizer flags given now (it says which changed)
    keep_last_good(out_dir, step, trusted)    after a divergence: ckpt.pt back to the last state before it
    plain(config)                             the settings as plain data, for a checkpoint
"""
import math
import os
import pickle
import shutil
from contextlib import suppress

import torch

from machinery import written

CKPT, PREV, BEST = 'ckpt.pt', 'ckpt_prev.pt', 'ckpt_best.pt'
DIVERGED = 'ckpt_diverged.pt'   # a saved state whose loss then diverged, moved out of ckpt.pt
EARLIER = f"{PREV} or {BEST} in the same folder (if there) hold earlier states: copy one over {CKPT} to resume from it"


def save_checkpoint(out_dir, state, metric=None, higher_is_better=False, trusted=None):
    """Write ckpt.pt atomically (a run killed while saving loses nothing), with `metric`; the state it
    replaces becomes ckpt_prev.pt, unless that would rotate out a known-good state for one that is not
    (trusted(step): DivergenceGuard.trusted; None: every state is). If `metric` beats the one ckpt_best.pt
    holds, ckpt.pt is also kept as ckpt_best.pt. A state holding NaN or inf is never saved (the run stops,
    files untouched), nor is a full disk a traceback (the partial file is removed)."""
    path, prev, best = (os.path.join(out_dir, name) for name in (CKPT, PREV, BEST))
    trusted = trusted or (lambda step: True)
    held = _peek(path).get('step')
    untouched = f"{path} (step {held}) is untouched" if os.path.exists(path) else "no checkpoint was written"
    bad = _non_finite(state)
    if bad:
        raise SystemExit(f"step {state.get('step')}: {bad} holds NaN or inf: stopping without saving. {untouched}. "
                         f"Lower --learning_rate, check the data, or resume from the checkpoint with other settings.")
    then = f"then resume with --init_from=resume: {untouched}"
    if os.path.exists(path) and (trusted(held) or not trusted(_peek(prev).get('step'))):
        _link_or_copy(path, prev, then)   # first: a kill before the write leaves ckpt.pt and its copy
    with written(path, then) as tmp:
        with open(tmp, 'wb') as f:   # a Python file: a full disk's OS reason reaches the message
            torch.save(dict(state, metric=metric), f)
            f.flush()
            os.fsync(f.fileno())
    if metric is not None and math.isfinite(metric):
        old = _peek(best).get('metric')   # ckpt_best.pt holds its own metric: no second file to disagree with
        if old is None or (metric > old if higher_is_better else metric < old):
            _link_or_copy(path, best, then)


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
    """A checkpoint on disk with its tensors left there (memory-mapped), or {} if unreadable: what
    a caller needs of it (its step, its config) is read without loading the weights."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:   # unreadable or not ours: the caller says so
        return {}
    return state if isinstance(state, dict) else {}


def _link_or_copy(src, dst, then):
    """dst becomes a hard link to src's current file (its content stays when src is replaced)."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return   # linked already (a rename onto a link of the same file would leave the .tmp beside it)
    with written(dst, then) as tmp:
        with suppress(FileNotFoundError):
            os.remove(tmp)   # left by a kill
        try:
            os.link(src, tmp)
        except OSError:   # a file system without hard links
            shutil.copyfile(src, tmp)


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
        raise SystemExit(f"{path} cannot be read ({str(e).splitlines()[0][:200]}): it may be truncated; {EARLIER}")
    if not isinstance(state, dict) or state.get('kind') != kind:
        found = state.get('kind', 'no track recorded') if isinstance(state, dict) else type(state).__name__
        raise SystemExit(f"{path} is not a {kind}-track checkpoint of nanoWM (it says: {found}); "
                         f"pass the checkpoint of a {kind} run")
    bad = _non_finite(state)
    if bad:
        raise SystemExit(f"{path}: {bad} holds NaN or inf, so it cannot be used; {EARLIER}")
    saved = state.get('config', {})
    diffs = [f"{k}={saved[k]!r} in the checkpoint, {v!r} now" for k, v in (expect or {}).items()
             if k in saved and saved[k] != v]   # a setting the checkpoint predates is not compared
    if diffs:
        raise SystemExit(f"{path} was trained with other model settings: " + '; '.join(diffs)
                         + ". Pass the same settings (or another --out_dir to start a new run).")
    return state


# What a command does, not what its run is: never taken from the checkpoint on resume (a preset is
# only a name: the values it set come back one by one; out_dir is where the checkpoint was found)
NOT_RESUMED = ('preset', 'init_from', 'overwrite', 'dry_run', 'eval_only', 'ckpt', 'split', 'stop_at', 'out_dir',
               'device')


def settings_on_resume(out_dir, kind, current, given, model_keys):
    """--init_from=resume continues the run as it was: each setting the user did not give (given: the
    names configure() returns) is the one saved in out_dir/ckpt.pt (read memory-mapped: only its
    config), except NOT_RESUMED; a typed one wins, but a model setting (model_keys) given that differs
    is refused by name. current: the script's globals. Returns the settings taken, said in one line."""
    path = os.path.join(out_dir, CKPT)
    if not os.path.exists(path):   # claim() says so, with what to do
        return {}
    state = _peek(path)
    if state.get('kind') != kind:   # load_checkpoint stops saying what is wrong
        state = load_checkpoint(path, kind)
    return settings_from(state.get('config', {}), current, given, model_keys, path, skip=NOT_RESUMED,
                         other=', or pass another --out_dir to start a new run')


def settings_from(saved, current, given, model_keys, source, skip=(), other=''):
    """The settings of `saved` (the config of the checkpoint `source`) that differ from `current` and were
    not given; a model setting given that differs is refused. Prints one line naming what is taken."""
    differ = {k: v for k, v in saved.items() if k in current and k not in skip and current[k] != v
              and isinstance(current[k], (int, float, bool, str))}
    clash = [f"{k}={v!r} in the checkpoint, {current[k]!r} now" for k, v in differ.items()
             if k in given and k in model_keys]
    if clash:
        raise SystemExit(f"{source} was trained with other model settings: {'; '.join(clash)}. Leave these settings "
                         f"out (flags or config file) to take the checkpoint's{other}.")
    taken = {k: v for k, v in differ.items() if k not in given}
    if taken and os.environ.get('RANK', '0') == '0':
        print(f"settings taken from {source} (not given now): " + ', '.join(f"{k}={v!r}" for k, v in taken.items()))
    return taken


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


def keep_last_good(out_dir, step, trusted):
    """After a divergence seen in optimizer step `step` (in the loss of the weights saved as step - 1): a
    checkpoint of those weights goes to ckpt_diverged.pt (and ckpt_best.pt, if it is that state, goes), and
    ckpt_prev.pt back to ckpt.pt. Returns the sentence that says which file holds which step, and which of
    them are known good (trusted(step): DivergenceGuard.trusted)."""
    ckpt, prev, best, diverged = (os.path.join(out_dir, name) for name in (CKPT, PREV, BEST, DIVERGED))
    saved, said = _peek(ckpt).get('step'), []
    if saved is not None and saved >= step - 1:   # the weights that diverged are those of step - 1
        os.replace(ckpt, diverged)
        said.append(f"the checkpoint of step {saved}, whose loss diverged, was moved to {diverged}")
        if _peek(best).get('step', -1) >= saved:
            os.remove(best)
            said[0] += f" ({BEST} was that state too and is removed)"
        if os.path.exists(prev):
            _link_or_copy(prev, ckpt, f"then copy {prev} to {ckpt}")
    held = {}
    for path in filter(os.path.exists, (ckpt, prev)):
        held.setdefault(_peek(path).get('step'), []).append(path)
    if not held:
        return f"{said[0]}; no checkpoint from before step {saved} exists" if said else "no checkpoint was written"
    for n, paths in held.items():
        said.append(f"{' and '.join(paths)} {'holds' if len(paths) == 1 else 'hold'} step {n}, " + (
            f"saved before the loss diverged at step {step}" if trusted(n) else
            "whose loss was finite but came before the spike rule could check it: it may have diverged too"))
    return '; '.join(said)
