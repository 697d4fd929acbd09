"""A run's checkpoints: written so that no state is ever lost, and read so that no file runs code.

    save_checkpoint(out_dir, state, metric)   ckpt.pt atomically, ckpt_prev.pt and ckpt_best.pt (hard
                                              links); a state holding NaN or inf is never written
    load_checkpoint(path, kind, expect)       tensors and plain data only; track and model settings checked
    model_settings_on_resume(...)             a resume takes the model settings of its checkpoint, and
    optimizer_settings_on_resume(...)         the optimizer flags given now (it says which changed)
    keep_last_good(out_dir, step)             after a divergence: ckpt.pt back to the last state before it
    plain(config)                             the settings as plain data, for a checkpoint
"""
import json
import math
import os
import pickle
import shutil

import torch

CKPT, PREV, BEST = 'ckpt.pt', 'ckpt_prev.pt', 'ckpt_best.pt'
DIVERGED = 'ckpt_diverged.pt'   # a saved state whose loss then diverged, moved out of ckpt.pt


def save_checkpoint(out_dir, state, metric=None, higher_is_better=False):
    """Write ckpt.pt atomically (a run killed while saving loses nothing); keep the previous one as
    ckpt_prev.pt; if `metric` is the best so far, ckpt.pt is also kept as ckpt_best.pt (best.json:
    its step and value). A state holding NaN or inf is never saved (the run stops, files untouched),
    nor is a full disk a traceback (the partial file is removed)."""
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


def _what_ckpt_holds(out_dir):
    ckpt = os.path.join(out_dir, CKPT)
    return f"{ckpt} (step {_peek(ckpt).get('step')}) is untouched" if os.path.exists(ckpt) else \
        "no checkpoint was written"


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
    now) are those of out_dir/ckpt.pt (read memory-mapped: only its config). One the user did not
    give (given: the names configure() returns) is taken from it, with a line naming each; one given
    that differs is refused by name. Returns the settings to use."""
    path = os.path.join(out_dir, CKPT)
    if not os.path.exists(path):   # claim() says so, with what to do
        return settings
    state = _peek(path)
    if state.get('kind') != kind:   # load_checkpoint stops saying what is wrong
        state = load_checkpoint(path, kind)
    saved = state.get('config', {})
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


def keep_last_good(out_dir, step):
    """After a divergence seen in optimizer step `step` (in the loss of the weights saved as step - 1): a
    checkpoint of those weights goes to ckpt_diverged.pt and ckpt.pt becomes ckpt_prev.pt again. Returns
    the sentence that says which file holds which step."""
    ckpt, prev = os.path.join(out_dir, CKPT), os.path.join(out_dir, PREV)
    if not os.path.exists(ckpt):
        return "no checkpoint was written"
    saved = _peek(ckpt).get('step')
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
    return f"{ckpt} and {prev} hold step {_peek(ckpt).get('step')}, saved before the loss diverged at step {step}; {said}"


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
