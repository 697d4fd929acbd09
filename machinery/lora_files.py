"""LoRA files: the adapters a sampling run trains, written for the other Wan 2.2 tools and read from them.

    export_lora(model, out_dir)        lora.safetensors (ComfyUI / diffusers / DiffSynth keys) and
                                       state_embedder.safetensors (step=N: a numbered history too)
    read_lora, load_lora(model, path)  a Wan LoRA of ComfyUI, diffusers / PEFT (also the legacy .lora.down
                                       naming), DiffSynth or kohya / musubi, or export_lora's folder
    stack_loras(model, [(path, s)])    several, each at its strength, their updates added
    lora_rank_alpha(path)              a file's rank and alpha, read without a model
    save_trainable, load_trainable     the adapters (rank, alpha in the metadata) + the state conditioning
    python -m machinery.lora_files export --ckpt out_sampling/ckpt.pt [--out DIR] [--overwrite]
"""
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save, save_file

from machinery import written
from machinery.wan_files import check_finite, check_keys, diffusers_name, official_name
from wan_state import LORA_TARGETS, LoRALinear, add_lora, lora_modules, remove_lora, trainable_state_dict

# The same adapters under four key conventions (module names in the official Wan naming, ours):
#   ComfyUI / Wan     diffusion_model.blocks.0.self_attn.q.lora_A.weight, .lora_B.weight, .alpha
#   diffusers / PEFT  transformer.blocks.0.attn1.to_q.lora_A.weight (alpha in the file's metadata)
#   DiffSynth-Studio  blocks.0.self_attn.q.lora_A.default.weight (no alpha)
#   kohya / musubi    lora_unet_blocks_0_self_attn_q.lora_down.weight, .lora_up.weight, .alpha
#   legacy diffusers  transformer.blocks.0.attn1.to_q.lora.down.weight, .lora.up.weight (diffusers
#                     utils/state_dict_utils.py maps .lora.down -> .lora_A; ComfyUI reads it with .alpha)
# lora_A = lora_down [rank, in], lora_B = lora_up [out, rank]; the update is B @ A * alpha / rank,
# or B @ A where a file has no alpha (ComfyUI comfy/lora.py, diffusers lora_conversion_utils.py
# _convert_non_diffusers_wan_lora_to_diffusers / _convert_musubi_wan_lora_to_diffusers, DiffSynth
# GeneralLoRALoader, which ignores alpha).
_LORA_KEY = re.compile(r'(?:diffusion_model\.|transformer\.|base_model\.model\.|lora_unet_)?(.+?)'
                       r'\.(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|alpha)(?:\.default)?(?:\.weight)?')
_LORA_PART = {'lora_A': 'A', 'lora_down': 'A', 'lora.down': 'A', 'lora_B': 'B', 'lora_up': 'B', 'lora.up': 'B',
              'alpha': 'alpha'}


def _read(path):
    """(tensors, metadata) of a safetensors file, its tensors checked for NaN and inf; ValueError naming it."""
    try:
        with safe_open(str(path), framework='pt') as f:
            sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as err:   # safetensors raises its own error types for a non-safetensors file
        raise ValueError(f"{path}: not a readable safetensors LoRA file ({err})") from None
    check_finite(sd, path)
    return sd, meta


# A LoRA's alpha, as large as any tool writes (the rank, or a small multiple of it) and far below the
# sizes that make a sample nothing but NaN
MAX_ALPHA = 10_000


def _alpha(value, source, key):
    """A LoRA alpha (a number, a one-element tensor or the text of a number) as a float; ValueError
    naming the file and the key if it is none, or NaN, inf or beyond MAX_ALPHA."""
    try:
        alpha = float(value)
    except (TypeError, ValueError, RuntimeError):
        alpha = math.nan
    if isinstance(value, bool) or not abs(alpha) <= MAX_ALPHA:
        raise ValueError(f"{source}: {key} is {value!r}, not a LoRA alpha (a number of at most {MAX_ALPHA:,} in size; "
                         f"the update is B A alpha / rank): the file is damaged")
    return alpha


def _check_unmerged(model, before):
    if any(m.merged for m in lora_modules(model)):
        raise ValueError(f"unmerge_lora(model) before {before}")


# --- Out: the run's adapters for the other tools --------------------------------------------------

def export_lora(model_or_trainable, out_dir, lora_alpha=None, step=None, keep_last=None, info=None):
    """Write out_dir/lora.safetensors, which ComfyUI, diffusers and DiffSynth-Studio load for Wan 2.2
    TI2V-5B, and out_dir/state_embedder.safetensors (the robot-state conditioning: nanoWM's own,
    no other tool has it). Returns the paths written.

    model_or_trainable: a WanDiT with LoRA (merged or not), or a checkpoint's trainable tensors
    (ckpt['trainable']: blocks.N.<module>.lora_A.weight ..., state_embedder.*) with its lora_alpha.
    Keys diffusion_model.blocks.N.<module>.lora_A.weight [r, in], .lora_B.weight [out, r] and
    .alpha = r: alpha / rank is folded into lora_B, so B @ A is the whole update and loaders that
    read .alpha (ComfyUI, diffusers) and loaders that do not (DiffSynth) apply the same update.

    step: also keep this save as lora_step{step:07d}.safetensors (and state_embedder_step...),
    the history musubi-tuner and diffusers' examples keep; lora.safetensors stays the latest.
    keep_last: keep only the newest keep_last step-numbered files (None: all of them).
    info: the run's metadata (base_model(config), and the step where step is not given), written in
    both files with what the LoRA file holds (lora_metadata: rank, alpha, what diffusers and kohya read)."""
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last={keep_last!r}: a count >= 1 of step-numbered LoRA files to keep (None: all)")
    if isinstance(model_or_trainable, torch.nn.Module):
        loras = {n: (m.lora_A.weight, m.lora_B.weight, m.scale) for n, m in model_or_trainable.named_modules()
                 if isinstance(m, LoRALinear)}
        sd = model_or_trainable.state_dict()
    else:
        sd = model_or_trainable
        a_keys = [k for k in sd if k.endswith('.lora_A.weight')]
        if a_keys and lora_alpha is None:
            raise ValueError("a trainable state dict needs its lora_alpha (ckpt['config'])")
        loras = {k[:-len('.lora_A.weight')]: (sd[k], sd[k.replace('.lora_A.', '.lora_B.')],
                                              lora_alpha / sd[k].shape[0]) for k in a_keys}
    state = {k: v.detach().float().cpu().contiguous() for k, v in sd.items() if k.startswith('state_embedder.')}
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:   # a file where the folder should be (a full disk: save_atomic says it)
        raise SystemExit(f"cannot write the LoRA files into {out_dir} ({err.strerror}): give a folder you "
                         f"can write to") from None
    files = {}
    if loras:
        files['lora'] = {}
        for name, (A, B, scale) in loras.items():
            files['lora'][f'diffusion_model.{name}.lora_A.weight'] = A.detach().float().cpu().contiguous()
            files['lora'][f'diffusion_model.{name}.lora_B.weight'] = (B.detach().float().cpu() * scale).contiguous()
            files['lora'][f'diffusion_model.{name}.alpha'] = torch.tensor(float(A.shape[0]))
    if state:
        files['state_embedder'] = state
    meta = {k: str(v) for k, v in dict(info or {}, step=step if step is not None else (info or {}).get('step')).items()
            if v is not None}
    written = []
    for stem, sd in files.items():
        if stem == 'lora':
            meta = lora_metadata(loras, meta)
        if step is not None:
            written.append(save_atomic(sd, out_dir / f'{stem}_step{step:07d}.safetensors', meta))
            if keep_last is not None:   # files of later steps (a run started over here) are left alone
                history = sorted(p for p in out_dir.glob(f'{stem}_step' + '[0-9]' * 7 + '.safetensors')
                                 if int(p.stem[-7:]) <= step)
                for old in history[:-keep_last]:
                    old.unlink()
        written.append(save_atomic(sd, out_dir / f'{stem}.safetensors', meta))
    return written


def lora_metadata(loras, meta):
    """An export's metadata: its rank and alpha (alpha = rank: the run's alpha / rank is folded into B) as
    nanoWM, diffusers (lora_adapter_metadata: the LoraConfig of the transformer, which diffusers' loader
    builds from it) and kohya / musubi (ss_*, informative: they apply the .alpha tensors) write them."""
    rank = next(iter(loras.values()))[0].shape[0]
    targets = sorted({diffusers_name(f'{n}.weight').split('.', 2)[2][:-len('.weight')] for n in loras})
    peft = {'transformer.r': rank, 'transformer.lora_alpha': rank, 'transformer.target_modules': targets}
    return dict(meta, lora_rank=str(rank), lora_alpha=str(rank), lora_adapter_metadata=json.dumps(peft),
                ss_network_module='networks.lora_wan', ss_network_dim=str(rank), ss_network_alpha=str(rank),
                **({'ss_base_model_version': meta['base_model']} if 'base_model' in meta else {}))


def save_atomic(sd, path, metadata=None):
    """safetensors file written whole or not at all (machinery.written: a kill or a full disk leaves
    the old one, and a full disk is one sentence). Written through open(), so its mode follows the
    umask as ckpt.pt's does (readable by the group under the usual umask; save_file writes 0600)."""
    with written(str(path), then=f"then resume or export again (the previous {os.path.basename(path)}, if any, "
                                 f"is untouched)") as tmp:
        with open(tmp, 'wb') as f:
            f.write(_sorted_metadata(save(sd, metadata={'format': 'pt', **(metadata or {})})))
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def _sorted_metadata(blob):
    """safetensors bytes with the metadata in sorted order: safetensors writes it in a random order (a Rust
    HashMap), so that the same export would differ byte for byte. Header: its length (8 bytes), JSON padded
    with spaces to a multiple of 8, then the tensors' data, whose offsets count from the header's end."""
    n = int.from_bytes(blob[:8], 'little')
    header = json.loads(blob[8:8 + n])
    header['__metadata__'] = dict(sorted(header['__metadata__'].items()))
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)
    return len(text).to_bytes(8, 'little') + text + blob[8 + n:]


# --- In: a LoRA file of any Wan tool --------------------------------------------------------------

def read_lora(path_or_state_dict, num_layers):
    """A Wan LoRA in any format above -> {our module name: (A [r, in], B [out, r], scale)}, fp32.

    The scale is alpha / rank, alpha as each tool reads it: a .alpha tensor (kohya and musubi read
    alpha 0 as alpha = rank); else diffusers / PEFT's lora_adapter_metadata (lora_alpha, with its
    alpha_pattern per module); else rank (scale 1). Every tensor is checked before anything is
    returned: keys of modules this loader does not know (time or head adapters, DoRA, diffs), a
    module given twice (two formats in one file), A without B, ranks of A and B that differ, and
    NaN or inf values are errors that name the key."""
    sd, meta, source = path_or_state_dict, {}, 'the LoRA'
    if isinstance(sd, dict):
        check_finite(sd, source)
    else:
        source = str(sd)
        sd, meta = _read(source)
    try:
        peft = {k.split('.')[-1]: v for k, v in json.loads(meta.get('lora_adapter_metadata', '{}')).items()}
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{source}: its lora_adapter_metadata is not a JSON object ({err}): the file is damaged")
    targets = [f'blocks.{i}.{t}' for i in range(num_layers) for t in LORA_TARGETS]
    underscored = {n.replace('.', '_'): n for n in targets}   # kohya / musubi write dots as _
    parts, file_names, unknown = {}, {}, []
    for key, tensor in sd.items():
        m = _LORA_KEY.fullmatch(key)
        name = m and (underscored.get(m[1]) or official_name(m[1] + '.weight')[:-len('.weight')])
        if name not in targets:
            unknown.append(key)
            continue
        part = _LORA_PART[m[2]]
        if part in parts.get(name, {}):
            raise ValueError(f"{source}: {name} has its {part} twice ({parts[name][part][0]} and {key}): the file "
                             f"mixes two LoRA formats; keep one")
        parts.setdefault(name, {})[part] = (key, tensor)
        file_names[name] = m[1]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} key(s) are not LoRA adapters of the {len(LORA_TARGETS)} linears "
                         f"of a Wan block this loader knows ({', '.join(LORA_TARGETS)}), e.g. {unknown[:4]}")
    out = {}
    for name, p in parts.items():
        if 'A' not in p or 'B' not in p:
            raise ValueError(f"{source}: {name} has {sorted(p)} but a LoRA needs both A (down) and B (up)")
        (a_key, A), (b_key, B) = p['A'], p['B']
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"{source}: {a_key} is {tuple(A.shape)} and {b_key} {tuple(B.shape)}: A must be "
                             f"[rank, in] and B [out, rank] with the same rank")
        rank = A.shape[0]
        if 'alpha' in p:
            alpha = _alpha(p['alpha'][1], source, p['alpha'][0])
            alpha = alpha or (rank if a_key.startswith('lora_unet_') else 0.0)   # kohya, musubi: 0 means rank
        elif 'lora_alpha' in peft:   # PEFT: lora_alpha, or the alpha_pattern entry that matches the module
            alpha = _alpha(next((v for k, v in peft.get('alpha_pattern', {}).items()
                                 if re.fullmatch(rf'(.*\.)?{k}', file_names[name])), peft['lora_alpha']),
                           source, "a lora_alpha in its lora_adapter_metadata")
        else:
            alpha = rank
        out[name] = (A.float(), B.float(), alpha / rank)
    return out


def _files_of(path):
    """(LoRA file, state file or None) of a LoRA file or an export_lora folder; FileNotFoundError if neither."""
    path = Path(path)
    lora_file, state_file = (path / 'lora.safetensors', path / 'state_embedder.safetensors') if path.is_dir() \
        else (path, None)
    if not lora_file.exists() and not (state_file and state_file.exists()):
        raise FileNotFoundError(f"{path}: no LoRA file (or export_lora folder) there")
    return lora_file, state_file


def _fitting_loras(model, lora_file):
    """read_lora of a file (none: {}) whose every adapter fits the model's linear; ValueError naming it."""
    loras = read_lora(lora_file, len(model.blocks)) if lora_file.exists() else {}
    if lora_file.exists() and not loras:   # loaded, it would change nothing (or, in place of adapters, zero them)
        raise ValueError(f"{lora_file} holds no LoRA tensors: an empty or unfinished file; give the LoRA itself")
    for name, (A, B, _) in loras.items():
        linear = model.get_submodule(name)
        if (A.shape[1], B.shape[0]) != (linear.in_features, linear.out_features):
            raise ValueError(f"{lora_file}: {name} has A {tuple(A.shape)} and B {tuple(B.shape)}, but the model's "
                             f"linear maps {linear.in_features} -> {linear.out_features}: the LoRA is for another "
                             f"model")
    return loras


def _fitting_states(model, state_file):
    """An export folder's state_embedder.safetensors checked against the model's state embedder (None: no file)."""
    if state_file is None or not state_file.exists():
        return None
    if not model.state_cond:
        raise ValueError(f"{state_file}: state conditioning weights, but the model has state_cond=False")
    state_sd, _ = _read(state_file)
    embedder = {k: v for k, v in model.state_dict().items() if k.startswith('state_embedder.')}
    null = 'state_embedder.null'   # the no-state embedding: only a run trained with state dropout has one
    if (null in state_sd) != (null in embedder):
        print(f"note: {state_file}: " + (f"{null} left out (this model has no no-state embedding)" if null in
                                         state_sd else f"no {null} in it: the model keeps its own"))
        state_sd.pop(null, None)
        embedder.pop(null, None)
    check_keys(embedder, state_sd, state_file)
    return state_sd


@torch.no_grad()
def load_lora(model, path, merge=False, scale=1.0):
    """Load a Wan LoRA of any format above (a file, or export_lora's folder: lora.safetensors and,
    if there, state_embedder.safetensors) into a WanDiT. Returns the model. Everything is checked
    before the model changes: a file that does not fit leaves the model as it was.

    merge=False: the file's adapters become the model's LoRA (unmerged, trainable: to continue
        training from a LoRA file, or to evaluate one trained elsewhere). A model without adapters
        gets add_lora with the file's rank and alpha; one with adapters (the zero-initialised ones of
        a new run, or a checkpoint's, which the file's replace) keeps the modules, the file must have
        their rank, and those the file lacks get B = 0, so the model is the base plus exactly the
        file's update.
    merge=True: W += B @ A * alpha / rank into the base weights of any model, with or without
        adapters of its own (to stack LoRAs, or to sample at base speed).
    scale: the strength of the file's update, as ComfyUI's strength_model and diffusers'
        set_adapters weight: 0 is the base model, 0.5 half the update, 1 the file as written. It
        scales the adapters' update only; state_embedder.safetensors loads as it is."""
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"LoRA scale {scale!r}: a finite number (1.0 applies the file as written)")
    lora_file, state_file = _files_of(path)
    loras = _fitting_loras(model, lora_file)
    # --- checks: nothing below them fails on the file's content
    own = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if loras and not merge:
        ranks = sorted({A.shape[0] for A, _, _ in loras.values()})
        if len(ranks) != 1:
            raise ValueError(f"{lora_file}: adapters of ranks {ranks}; trainable adapters need one rank, so load "
                             f"it with merge=True")
        own_rank = next(iter(own.values())).rank if own else ranks[0]
        if ranks[0] != own_rank:
            raise ValueError(f"{lora_file}: adapters of rank {ranks[0]}, the model's of rank {own_rank}: unmerged, "
                             f"they take the place of adapters of their own rank (a run trained with "
                             f"--lora_rank={ranks[0]}); merge=True adds them into the weights of any model")
        _check_unmerged(model, 'loading adapters')
        lacking = sorted(set(loras) - set(own)) if own else []
        if lacking:
            raise ValueError(f"the model has no adapters on {lacking[:4]}...: add_lora with these targets first")
    state_sd = _fitting_states(model, state_file)
    # --- the changes
    if merge:
        for name, (A, B, file_scale) in loras.items():
            w = model.get_submodule(name).weight
            w += ((B @ A) * (file_scale * scale)).to(device=w.device, dtype=w.dtype)
    elif loras:
        if not own:   # one rank (checked above); alpha: the first module's (an alpha of 0 adds nothing)
            A, _, file_scale = next(iter(loras.values()))
            add_lora(model, rank=A.shape[0], alpha=(file_scale or 1.0) * A.shape[0],
                     targets=sorted({n.split('.', 2)[2] for n in loras}, key=LORA_TARGETS.index))
        for name, m in ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)):
            if name not in loras:
                m.lora_B.weight.zero_()
                continue
            A, B, file_scale = loras[name]
            m.lora_A.weight.copy_(A)
            m.lora_B.weight.copy_(B * (file_scale * scale / m.scale))   # B A m.scale = the file's update x scale
    if state_sd is not None:
        model.load_state_dict(state_sd, strict=False)
    return model


def lora_rank_alpha(path):
    """(rank, alpha) of a LoRA file or export_lora folder, read without a model (a new run builds its
    adapters with them): alpha as read_lora reads it (the rank where a file has none). Every tensor is
    checked as load_lora checks it; a bad, empty or mixed-rank file is a SystemExit naming it. A folder
    of state weights alone: (None, None)."""
    try:
        lora_file, state_file = _files_of(path)
        if state_file and state_file.exists():
            _read(state_file)
        if not lora_file.exists():
            return None, None
        keys = _read(lora_file)[0]   # the block count, from the keys
        blocks = [int(m[1]) for k in keys if (m := re.search(r'blocks[._](\d+)[._]', k))]
        loras = read_lora(lora_file, 1 + max(blocks, default=-1))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(str(err)) from None
    if not loras:
        raise SystemExit(f"{lora_file} holds no LoRA tensors: an empty or unfinished file; give the LoRA itself")
    ranks = sorted({A.shape[0] for A, _, _ in loras.values()})
    if len(ranks) != 1:
        raise SystemExit(f"{lora_file}: adapters of ranks {ranks}; trainable adapters need one rank (train_mode full "
                         f"merges it into the weights)")
    _, _, scale = next(iter(loras.values()))   # the first module's alpha, as load_lora's add_lora takes it
    return ranks[0], (scale or 1.0) * ranks[0]


@torch.no_grad()
def stack_loras(model, files):
    """Several LoRA files or export_lora folders [(path, strength)], stacked as ComfyUI and musubi stack
    them: the model's adapters (a LoRA run's, if any) are replaced by adapters whose update is the sum
    of the files' updates, sum_i strength_i B_i A_i alpha_i / rank_i, whatever their ranks. One folder
    at most brings its state_embedder.safetensors. Everything is checked before the model changes."""
    # Ranks concatenated, A = [A_1; A_2], B = [s_1 B_1, s_2 B_2] (zeros where a file lacks a module): B A is the
    # sum exactly, and unmerged it keeps the adapters' numerics (merged into a bf16 base, the sum would round).
    parts, state_sd = [], None
    for path, strength in files:
        if not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ValueError(f"{path}: strength {strength!r}: a finite number (1.0 applies the file as written)")
        lora_file, state_file = _files_of(path)
        loras = _fitting_loras(model, lora_file)
        parts.append((max((A.shape[0] for A, _, _ in loras.values()), default=0), strength, loras))
        states = _fitting_states(model, state_file)
        if states is not None and state_sd is not None:
            raise ValueError(f"{state_file}: a second folder of state weights: give the others' lora.safetensors")
        state_sd = states if states is not None else state_sd
    _check_unmerged(model, 'loading adapters')
    names = sorted({n for _, _, loras in parts for n in loras}, key=lambda n: (int(n.split('.')[1]), n))
    remove_lora(model)   # back to the base: the new adapters hold every file's update
    if names:
        rank = sum(r for r, _, _ in parts)
        add_lora(model, rank=rank, alpha=rank, targets=sorted({n.split('.', 2)[2] for n in names},
                                                              key=LORA_TARGETS.index))
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        As, Bs = [], []
        for r, strength, loras in parts:
            A, B, file_scale = loras.get(name, (torch.zeros(0, m.in_features), torch.zeros(m.out_features, 0), 0.0))
            As.append(F.pad(A, (0, 0, 0, r - A.shape[0])))   # a file's smaller ranks padded with zeros
            Bs.append(F.pad(B * (file_scale * strength), (0, r - B.shape[1])))
        m.lora_A.weight.copy_(torch.cat(As))
        m.lora_B.weight.copy_(torch.cat(Bs, dim=1))
    if state_sd is not None:
        model.load_state_dict(state_sd, strict=False)
    return model


# --- nanoWM's own file of the trained weights: adapters + state conditioning ----------------------

def save_trainable(model, path):
    """The LoRA adapters (rank and alpha in the metadata) and the state-conditioning weights."""
    _check_unmerged(model, 'saving')
    sd = {k: v.detach().contiguous().cpu() for k, v in trainable_state_dict(model).items()}
    loras = lora_modules(model)
    meta = {'lora_rank': str(loras[0].rank), 'lora_alpha': str(loras[0].alpha)} if loras else {}
    save_file(sd, str(path), metadata=meta)


def load_trainable(model, path):
    """Load LoRA + state weights saved by save_trainable; adds LoRA first if the file has it."""
    sd, meta = _read(path)
    if any('.lora_' in k for k in sd) and not lora_modules(model):
        if 'lora_rank' not in meta:
            raise ValueError(f"{path}: LoRA weights without lora_rank metadata; call add_lora first")
        add_lora(model, rank=int(meta['lora_rank']), alpha=_alpha(meta.get('lora_alpha'), path, 'lora_alpha'))
    _check_unmerged(model, 'loading')
    check_keys(trainable_state_dict(model), sd, path)
    model.load_state_dict(sd, strict=False)
    return model


def base_model(config):
    """What a run's adapters were trained on, for an export's metadata: its --pretrained, or its random init."""
    return config.get('pretrained') or f"random init ({config.get('model')}, init_seed {config.get('init_seed')})"


# --- Command line ---------------------------------------------------------------------------------

def main(argv=None):
    """`python -m machinery.lora_files export --ckpt out_sampling/ckpt.pt [--out DIR] [--overwrite]`:
    lora.safetensors + state_embedder.safetensors of a sampling checkpoint (export_lora)."""
    import argparse
    from machinery import checkpoints   # weights_only loading, the track checked, a truncated file named
    parser = argparse.ArgumentParser(prog='python -m machinery.lora_files', description=main.__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('export', help="write a sampling checkpoint's LoRA in the ComfyUI / diffusers format")
    p.add_argument('--ckpt', required=True, help="a train_sampling.py checkpoint (ckpt.pt, ckpt_best.pt)")
    p.add_argument('--out', default=None, help="output folder (default: the checkpoint's folder)")
    p.add_argument('--overwrite', action='store_true', help="replace LoRA files already in the output folder")
    args = parser.parse_args(argv)
    out = Path(args.out or Path(args.ckpt).parent)
    there = [out / f for f in ('lora.safetensors', 'state_embedder.safetensors') if (out / f).exists()]
    if there and not args.overwrite:   # a run folder holds its latest export: ckpt_best.pt must not replace it
        raise SystemExit(f"{there[0]} exists: pass --out with another folder, or --overwrite to replace it")
    ckpt = checkpoints.load_checkpoint(args.ckpt, 'sampling')
    try:
        written = export_lora(ckpt['trainable'], out, ckpt['config'].get('lora_alpha'),
                              info=dict(base_model=base_model(ckpt['config']), step=ckpt.get('step')))
    except ValueError as err:
        raise SystemExit(str(err))
    print('\n'.join(f"wrote {p}" for p in written) or f"{args.ckpt}: no LoRA or state weights to export")
    if ckpt['config'].get('train_mode') == 'full':
        print(f"no lora.safetensors: {args.ckpt} trained every weight (train_mode full), so there are no LoRA "
              f"adapters to export; its weights are in the checkpoint")


if __name__ == '__main__':
    main()
