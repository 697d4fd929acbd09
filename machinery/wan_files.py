"""The Wan ecosystem's files: what nanoWM reads from and writes for the other Wan 2.2 tools.
A Hub repo id is downloaded through huggingface_hub; a local folder is read as it is. In order:

checkpoint files  resolve(repo_id_or_dir, allow_patterns): a folder, or a Hub download (into
                  NANOWM_MODELS_DIR if set: one copy); check_keys(expected, got, source);
                  read_pth(path): a .pth read without running its code
key names         diffusers_name, official_name, to_diffusers_state_dict: official Wan <-> diffusers
the DiT           load_dit(repo_or_dir): official or diffusers layout, sharded safetensors
text context      null_context(repo_or_dir): umT5's encoding of "", padded to 512 slots (cached)
a run's model     build_model(...): the DiT a run trains (+ LoRA); text_context(cfg, text_encoder, device)
nanoWM's weights  save_trainable, load_trainable: the LoRA adapters + the state conditioning
LoRA files        export_lora(model, out_dir): lora.safetensors, which ComfyUI, diffusers and DiffSynth
                  read, + state_embedder.safetensors (step=N: a numbered history too); read_lora,
                  load_lora(model, path, merge=False, scale=1.0): a Wan LoRA of ComfyUI, diffusers /
                  PEFT (also the legacy .lora.down naming), DiffSynth or kohya / musubi format
command line      python -m machinery.wan_files export --ckpt out_sampling/ckpt.pt [--out DIR] [--overwrite]
"""
import json
import math
import os
import re
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery.hub import resolve
from wan_state import (LORA_TARGETS, LoRALinear, WanConfig, WanDiT, add_lora, keeps_fp32, lora_modules,
                       trainable_state_dict)


# --- Checkpoint files: download, sharded safetensors, config.json, checks -------------------------

def _find_weights(root, stem):
    """Shard files of a checkpoint: through <stem>.safetensors.index.json, or one <stem>.safetensors."""
    index = root / f'{stem}.safetensors.index.json'
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())['weight_map']
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index}: not a safetensors index json with a weight_map ({err})") from err
        shards = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        missing = [s for s in shards if not (root / s).exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) {missing} that are not in {root}; "
                                    f"the download is incomplete: download the checkpoint again")
        return shards
    single = root / f'{stem}.safetensors'
    return {single.name: None} if single.exists() else {}


def _safetensors_index(root, stem):
    """key -> shard path of a sharded or single-file safetensors checkpoint; every shard must open."""
    from safetensors import safe_open
    shards = _find_weights(root, stem)
    if not shards:
        raise FileNotFoundError(f"no {stem}.safetensors or {stem}.safetensors.index.json in {root}")
    where = {}
    for shard, keys in shards.items():
        try:
            with safe_open(str(root / shard), framework='pt') as f:
                present = set(f.keys())
        except Exception as err:
            raise ValueError(f"{root / shard}: cannot read this safetensors file ({err}); it is truncated "
                             f"or corrupt: download it again") from err
        lost = sorted(set(keys or []) - present)
        if lost:
            raise ValueError(f"{root / shard}: the index json lists {len(lost)} tensor(s) that are not in this "
                             f"shard, e.g. {lost[:3]}; the file is corrupt or from another checkpoint")
        where.update({k: root / shard for k in (keys if keys is not None else sorted(present))})
    return where


def _read_safetensors(root, stem, device='cpu'):
    """Yield (key, tensor) from a sharded or single-file safetensors checkpoint, one at a time."""
    from safetensors import safe_open
    where = _safetensors_index(root, stem)
    for path in dict.fromkeys(where.values()):
        with safe_open(str(path), framework='pt', device=str(device)) as f:
            for key in [k for k, p in where.items() if p == path]:
                yield key, f.get_tensor(key)


def check_keys(expected, got, source):
    """expected, got: {name: tensor}. ValueError listing the missing, unexpected and wrong-shape tensors."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(set(expected) & set(got)) if got[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        def show(items):
            return ', '.join(items[:8]) + (f' ... ({len(items)} in all)' if len(items) > 8 else '')
        lines = [f"checkpoint {source} does not match the model config:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {show(unexpected)}")
        if wrong:
            lines.append(f"  wrong shape ({len(wrong)}): {show(wrong)}")
        raise ValueError('\n'.join(lines))


def read_pth(path):
    """An official .pth weights file (Wan2.2_VAE.pth, the umT5 encoder), memory-mapped (read lazily),
    with torch.load(weights_only=True): tensors only, so a crafted file never runs code."""
    try:
        return torch.load(path, map_location='cpu', mmap=True, weights_only=True)
    except Exception as err:   # UnpicklingError (objects, not tensors), RuntimeError (truncated), ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a weights file nanoWM can read ({first}); it holds Python objects rather than "
                         f"tensors, or it is truncated: download it again from the official repo") from None


def _config_from_json(path):
    """WanConfig from an official config.json (dim, num_heads, ...) or a diffusers one."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a Wan checkpoint directory holds config.json next to its weights")
    raw = json.loads(path.read_text())
    if 'num_attention_heads' in raw:   # diffusers WanTransformer3DModel config
        raw = dict(dim=raw['num_attention_heads'] * raw['attention_head_dim'], num_heads=raw['num_attention_heads'],
                   in_dim=raw['in_channels'], out_dim=raw['out_channels'], ffn_dim=raw['ffn_dim'],
                   num_layers=raw['num_layers'], text_dim=raw.get('text_dim', 4096), freq_dim=raw['freq_dim'],
                   eps=raw['eps'], patch_size=raw['patch_size'])
    names = {fld.name for fld in fields(WanConfig)}
    kw = {k: v for k, v in raw.items() if k in names}
    if 'patch_size' in kw:
        kw['patch_size'] = tuple(kw['patch_size'])
    return WanConfig(**kw)


# --- Key names: official Wan <-> diffusers WanTransformer3DModel ----------------------------------

# official name prefix -> diffusers name prefix (diffusers scripts/convert_wan_to_diffusers.py)
_TOP_KEYS = {'time_embedding.0.': 'condition_embedder.time_embedder.linear_1.',
             'time_embedding.2.': 'condition_embedder.time_embedder.linear_2.',
             'time_projection.1.': 'condition_embedder.time_proj.',
             'text_embedding.0.': 'condition_embedder.text_embedder.linear_1.',
             'text_embedding.2.': 'condition_embedder.text_embedder.linear_2.',
             'head.modulation': 'scale_shift_table', 'head.head.': 'proj_out.'}


_BLOCK_KEYS = {f'{a}.{o}.': f'{b}.{d}.' for a, b in (('self_attn', 'attn1'), ('cross_attn', 'attn2'))
               for o, d in (('q', 'to_q'), ('k', 'to_k'), ('v', 'to_v'), ('o', 'to_out.0'),
                            ('norm_q', 'norm_q'), ('norm_k', 'norm_k'))}
_BLOCK_KEYS.update({'norm3.': 'norm2.', 'ffn.0.': 'ffn.net.0.proj.', 'ffn.2.': 'ffn.net.2.',
                    'modulation': 'scale_shift_table'})


def _rename(key, top, block):
    m = re.match(r'blocks\.(\d+)\.(.*)', key)
    prefix, rest, table = (f'blocks.{m[1]}.', m[2], block) if m else ('', key, top)
    for a, b in table.items():
        if rest.startswith(a):
            return prefix + b + rest[len(a):]
    return key


def diffusers_name(key):
    return _rename(key, _TOP_KEYS, _BLOCK_KEYS)


def official_name(key):
    return _rename(key, {b: a for a, b in _TOP_KEYS.items()}, {b: a for a, b in _BLOCK_KEYS.items()})


def to_diffusers_state_dict(sd):
    """Our (official) key names -> diffusers WanTransformer3DModel key names."""
    return {diffusers_name(k): v for k, v in sd.items()}


# --- The DiT from a checkpoint --------------------------------------------------------------------

def load_dit(repo_id_or_dir='Wan-AI/Wan2.2-TI2V-5B', state_cond=True, device='cpu', dtype=None, **cfg_overrides):
    """Load the Wan 2.2 DiT from the Hub or a local dir, official or diffusers layout.

    Official: config.json + diffusion_pytorch_model.safetensors.index.json + shards, original
    key names. Diffusers: transformer/ with the same files and diffusers key names (mapped).
    The model is built on the meta device and the checkpoint tensors assigned, so only one
    copy of the weights is ever in memory. dtype defaults to bf16 on CUDA, fp32 elsewhere.
    The state embedder (not in the checkpoint) gets its own init (WanDiT.from_pretrained);
    cfg_overrides set the config fields a checkpoint does not store (r_dim, state_freqs, ...).
    """
    dtype = dtype or (torch.bfloat16 if str(device).startswith('cuda') else torch.float32)
    root = resolve(repo_id_or_dir, ['config.json', 'diffusion_pytorch_model*', 'transformer/*'])
    if not _find_weights(root, 'diffusion_pytorch_model') and (root / 'transformer').is_dir():
        root = root / 'transformer'
    cfg = replace(_config_from_json(root / 'config.json'), **cfg_overrides)
    sd = {}
    for key, tensor in _read_safetensors(root, 'diffusion_pytorch_model', device):
        sd[key] = tensor.to(torch.float32 if keeps_fp32(official_name(key)) else dtype)
    if any(k.startswith('condition_embedder.') for k in sd):
        sd = {official_name(k): v for k, v in sd.items()}
    with torch.device('meta'):
        expected = WanDiT(cfg, state_cond=False).state_dict()
    check_keys(expected, sd, root)
    return WanDiT.from_pretrained(cfg, sd, state_cond, device)


# --- Empty-prompt text context (paper 2.1: condition on "" and keep cross-attention) --------------

UMT5_FILE = 'models_t5_umt5-xxl-enc-bf16.pth'


def null_context(repo_id_or_dir='Wan-AI/Wan2.2-TI2V-5B', cache_path=None, text_len=512, eos_id=1):
    """umT5-XXL encoding of "" as the DiT sees it: [1, text_len, 4096], row 0 the EOS output, zeros after.

    "" tokenises to the single EOS token. With one token, attention is softmax over one key = 1,
    so each layer's attention is o(v(norm1(x))) and relative position bias plays no part; the
    whole encoder is a few matrix-vector products, computed here in fp32 from the weights, no
    tokenizer needed. Reads the official models_t5_umt5-xxl-enc-bf16.pth or the diffusers
    text_encoder/ (transformers UMT5EncoderModel). The [1, 4096] result is cached as safetensors.
    """
    from safetensors.torch import load_file, save_file
    if cache_path is None:
        name = str(repo_id_or_dir).strip('/').replace('/', '--')
        cache_dir = Path(os.environ.get('NANOWM_CACHE', '~/.cache/nanowm')).expanduser()
        cache_path = cache_dir / f'null_context_{name}.safetensors'
    cache_path = Path(cache_path)
    if cache_path.exists():
        eos_1D = load_file(str(cache_path))['context']
    else:
        eos_1D = _umt5_one_token(resolve(repo_id_or_dir, [UMT5_FILE, 'text_encoder/*']), eos_id)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f'{cache_path.name}.{os.getpid()}.tmp')   # whole, even with every rank writing
        save_file({'context': eos_1D.contiguous()}, str(tmp))
        os.replace(tmp, cache_path)
    return F.pad(eos_1D, (0, 0, 0, text_len - eos_1D.shape[0]))[None]


def _umt5_one_token(root, token_id):
    """Read only what one token needs: one embedding row, v, o, the FFN and the norms of each layer."""
    from safetensors import safe_open
    if (root / UMT5_FILE).exists():   # original Wan keys (wan/modules/t5.py T5Encoder); mmap reads lazily
        sd = read_pth(root / UMT5_FILE)
        keys, get, get_row = sd.keys(), sd.__getitem__, lambda key, i: sd[key][i:i + 1]
        n_layers = 1 + max(int(k.split('.')[1]) for k in keys if k.startswith('blocks.'))
        names = dict(emb='token_embedding.weight', final='norm.weight', n1='blocks.{}.norm1.weight',
                     v='blocks.{}.attn.v.weight', o='blocks.{}.attn.o.weight', n2='blocks.{}.norm2.weight',
                     gate='blocks.{}.ffn.gate.0.weight', fc1='blocks.{}.ffn.fc1.weight', fc2='blocks.{}.ffn.fc2.weight')
    else:   # transformers UMT5EncoderModel keys (diffusers text_encoder/, sharded safetensors)
        sub = root / 'text_encoder' if (root / 'text_encoder').is_dir() else root
        where = _safetensors_index(sub, 'model')
        keys = where.keys()

        def get(key):
            with safe_open(str(where[key]), framework='pt') as f:
                return f.get_tensor(key)

        def get_row(key, i):
            with safe_open(str(where[key]), framework='pt') as f:
                return f.get_slice(key)[i:i + 1]

        n_layers = 1 + max(int(k.split('.')[2]) for k in keys if k.startswith('encoder.block.'))
        emb = 'shared.weight' if 'shared.weight' in keys else 'encoder.embed_tokens.weight'
        p = 'encoder.block.{}.layer.'
        names = dict(emb=emb, final='encoder.final_layer_norm.weight', n1=p + '0.layer_norm.weight',
                     v=p + '0.SelfAttention.v.weight', o=p + '0.SelfAttention.o.weight', n2=p + '1.layer_norm.weight',
                     gate=p + '1.DenseReluDense.wi_0.weight', fc1=p + '1.DenseReluDense.wi_1.weight',
                     fc2=p + '1.DenseReluDense.wo.weight')

    def w(key, i=None):
        return get(names[key].format(i)).float()

    def rms(x, weight):   # T5 LayerNorm: no mean subtraction, no bias, eps 1e-6
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    x = get_row(names['emb'], token_id).float()
    for i in range(n_layers):
        x = x + rms(x, w('n1', i)) @ w('v', i).T @ w('o', i).T
        h = rms(x, w('n2', i))
        x = x + (F.gelu(h @ w('gate', i).T, approximate='tanh') * (h @ w('fc1', i).T)) @ w('fc2', i).T
    return rms(x, w('final'))


# --- What a run builds: the DiT it trains and its text context ------------------------------------

def build_model(*, model, pretrained, train_mode, lora_rank, lora_alpha, init_seed, device, dtype, tiny,
                state_embedder='paper'):
    """The DiT to fine-tune. pretrained = '' builds random weights from init_seed (tiny demo, timing).
    train_mode 'lora': frozen base + LoRA + state parameters (the paper); 'full': every weight
    (the CPU demo, whose base is random: LoRA on a random base has nothing to adapt)."""
    if model not in ('tiny', 'ti2v-5b'):
        raise ValueError(f"model={model!r}: 'tiny' or 'ti2v-5b'")
    if train_mode not in ('lora', 'full'):
        raise ValueError(f"train_mode={train_mode!r}: 'lora' or 'full'")
    torch.manual_seed(init_seed)
    if pretrained:
        net = load_dit(pretrained, state_cond=True, device=device, dtype=dtype, state_embedder=state_embedder)
    else:
        cfg = WanConfig.tiny(**tiny, state_embedder=state_embedder) if model == 'tiny' \
            else WanConfig(state_embedder=state_embedder)
        net = WanDiT(cfg, state_cond=True).to(device)
        if dtype != torch.float32:
            net.set_dtype(dtype)
    if train_mode == 'lora':
        add_lora(net, rank=lora_rank, alpha=lora_alpha)   # freezes all but LoRA and state params
    else:
        net.requires_grad_(True)
    for p in net.parameters():   # trained weights stay fp32: they are the optimizer's master copy
        if p.requires_grad:
            p.data = p.data.float()
    return net


def text_context(cfg, text_encoder, device):
    """The empty-prompt context (paper 2.1: "" as the prompt, cross-attention kept). text_encoder
    'zeros': zeros [1, text_len, text_dim] (the tiny demo has no umT5); otherwise a hub repo or
    folder with Wan's umT5, encoded once by null_context and cached."""
    if text_encoder == 'zeros':
        return torch.zeros(1, cfg.text_len, cfg.text_dim, device=device)
    return null_context(text_encoder, text_len=cfg.text_len).to(device)


# --- nanoWM's own trained weights: LoRA adapters + state conditioning -----------------------------

def _check_unmerged(model, before):
    if any(m.merged for m in lora_modules(model)):
        raise ValueError(f"unmerge_lora(model) before {before}")


def save_trainable(model, path):
    """The LoRA adapters (rank and alpha in the metadata) and the state-conditioning weights."""
    from safetensors.torch import save_file
    _check_unmerged(model, 'saving')
    sd = {k: v.detach().contiguous().cpu() for k, v in trainable_state_dict(model).items()}
    loras = lora_modules(model)
    meta = {'lora_rank': str(loras[0].rank), 'lora_alpha': str(loras[0].alpha)} if loras else {}
    save_file(sd, str(path), metadata=meta)


def load_trainable(model, path):
    """Load LoRA + state weights saved by save_trainable; adds LoRA first if the file has it."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework='pt') as f:
        meta = f.metadata() or {}
    sd = load_file(str(path))
    if any('.lora_' in k for k in sd) and not lora_modules(model):
        if 'lora_rank' not in meta:
            raise ValueError(f"{path}: LoRA weights without lora_rank metadata; call add_lora first")
        add_lora(model, rank=int(meta['lora_rank']), alpha=float(meta['lora_alpha']))
    _check_unmerged(model, 'loading')
    check_keys(trainable_state_dict(model), sd, path)
    model.load_state_dict(sd, strict=False)
    return model


# --- LoRA files of the other Wan tools: ComfyUI, diffusers, DiffSynth-Studio, kohya / musubi ------

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


def export_lora(model_or_trainable, out_dir, lora_alpha=None, step=None, keep_last=None):
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
    keep_last: keep only the newest keep_last step-numbered files (None: all of them)."""
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last={keep_last!r}: a count >= 1 of step-numbered LoRA files to keep (None: all)")
    if isinstance(model_or_trainable, nn.Module):
        loras = {n: (m.lora_A.weight, m.lora_B.weight, m.scale) for n, m in model_or_trainable.named_modules()
                 if isinstance(m, LoRALinear)}
        state = {k: v for k, v in model_or_trainable.state_dict().items() if k.startswith('state_embedder.')}
    else:
        sd = model_or_trainable
        a_keys = [k for k in sd if k.endswith('.lora_A.weight')]
        if a_keys and lora_alpha is None:
            raise ValueError("a trainable state dict needs its lora_alpha (ckpt['config'])")
        loras = {k[:-len('.lora_A.weight')]: (sd[k], sd[k.replace('.lora_A.', '.lora_B.')],
                                              lora_alpha / sd[k].shape[0]) for k in a_keys}
        state = {k: v for k, v in sd.items() if k.startswith('state_embedder.')}
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f'.write_test_{os.getpid()}'
        probe.write_text('ok')
        probe.unlink()
    except OSError as err:   # a file where the folder should be, a read-only folder, a full disk
        raise ValueError(f"cannot write the LoRA files into {out_dir} ({err.strerror}): give a folder you "
                         f"can write to") from None
    files = {}
    if loras:
        sd = {}
        for name, (A, B, scale) in loras.items():
            sd[f'diffusion_model.{name}.lora_A.weight'] = A.detach().float().cpu().contiguous()
            sd[f'diffusion_model.{name}.lora_B.weight'] = (B.detach().float().cpu() * scale).contiguous()
            sd[f'diffusion_model.{name}.alpha'] = torch.tensor(float(A.shape[0]))
        files['lora'] = sd
    if state:
        files['state_embedder'] = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    written = []
    for stem, sd in files.items():
        if step is not None:
            written.append(save_atomic(sd, out_dir / f'{stem}_step{step:07d}.safetensors'))
            if keep_last is not None:   # files of later steps (a run started over here) are left alone
                history = sorted(p for p in out_dir.glob(f'{stem}_step' + '[0-9]' * 7 + '.safetensors')
                                 if int(p.stem[-7:]) <= step)
                for old in history[:-keep_last]:
                    old.unlink()
        written.append(save_atomic(sd, out_dir / f'{stem}.safetensors'))
    return written


def save_atomic(sd, path):
    """safetensors file written whole or not at all (a run killed while saving leaves the old one).
    Written through open(), so its mode follows the umask as ckpt.pt's does (readable by the group
    under the usual umask; safetensors' own save_file writes 0600)."""
    from safetensors.torch import save
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'wb') as f:
            f.write(save(sd, metadata={'format': 'pt'}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:   # a full disk: no half-written .tmp left behind, the old file kept
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"could not write {path} ({err.strerror}): free space on its disk, then resume "
                         f"or export again (the previous {os.path.basename(path)}, if any, is untouched)")
    return Path(path)


def read_lora(path_or_state_dict, num_layers):
    """A Wan LoRA in any format above -> {our module name: (A [r, in], B [out, r], scale)}, fp32.

    The scale is alpha / rank, alpha as each tool reads it: a .alpha tensor (kohya and musubi read
    alpha 0 as alpha = rank); else diffusers / PEFT's lora_adapter_metadata (lora_alpha, with its
    alpha_pattern per module); else rank (scale 1). Every tensor is checked before anything is
    returned: keys of modules this loader does not know (time or head adapters, DoRA, diffs), a
    module given twice (two formats in one file), A without B, ranks of A and B that differ, and
    NaN or inf values are errors that name the key."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    sd, meta, source = path_or_state_dict, {}, 'the LoRA'
    if not isinstance(sd, dict):
        source = str(sd)
        try:
            with safe_open(source, framework='pt') as f:
                meta = f.metadata() or {}
            sd = load_file(source)
        except Exception as err:   # safetensors raises its own error types for a non-safetensors file
            raise ValueError(f"{source}: not a readable safetensors LoRA file ({err})") from None
    peft = {k.split('.')[-1]: v for k, v in json.loads(meta.get('lora_adapter_metadata', '{}')).items()}
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
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: {key} holds NaN or inf values: the LoRA is broken")
        parts.setdefault(name, {})[part] = (key, tensor)
        file_names[name] = m[1]
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) are not LoRA adapters of the {len(LORA_TARGETS)} linears of a Wan "
                         f"block this loader knows ({', '.join(LORA_TARGETS)}), e.g. {unknown[:4]}")
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
            alpha = p['alpha'][1].item()
            alpha = alpha or (rank if a_key.startswith('lora_unet_') else 0.0)   # kohya, musubi: 0 means rank
        elif 'lora_alpha' in peft:   # PEFT: lora_alpha, or the alpha_pattern entry that matches the module
            alpha = next((v for k, v in peft.get('alpha_pattern', {}).items()
                          if re.fullmatch(rf'(.*\.)?{k}', file_names[name])), peft['lora_alpha'])
        else:
            alpha = rank
        out[name] = (A.float(), B.float(), alpha / rank)
    return out


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
    path = Path(path)
    lora_file, state_file = (path / 'lora.safetensors', path / 'state_embedder.safetensors') if path.is_dir() \
        else (path, None)
    if not lora_file.exists() and not (state_file and state_file.exists()):
        raise FileNotFoundError(f"{path}: no LoRA file (or export_lora folder) there")
    loras = read_lora(lora_file, len(model.blocks)) if lora_file.exists() else {}
    # --- checks: nothing below them fails on the file's content
    for name, (A, B, _) in loras.items():
        linear = model.get_submodule(name)
        if (A.shape[1], B.shape[0]) != (linear.in_features, linear.out_features):
            raise ValueError(f"{lora_file}: {name} has A {tuple(A.shape)} and B {tuple(B.shape)}, but the model's "
                             f"linear maps {linear.in_features} -> {linear.out_features}: the LoRA is for another model")
    own = lora_modules(model)
    if loras and not merge:
        ranks = sorted({A.shape[0] for A, _, _ in loras.values()})
        if len(ranks) != 1:
            raise ValueError(f"{lora_file}: adapters of ranks {ranks}; trainable adapters need one rank, so load "
                             f"it with merge=True")
        if own and ranks[0] != own[0].rank:
            raise ValueError(f"{lora_file}: adapters of rank {ranks[0]}, the model's of rank {own[0].rank}: give the "
                             f"model rank-{ranks[0]} adapters (train_sampling.py --lora_rank={ranks[0]}) to continue from this file, "
                             f"or load it with merge=True")
        _check_unmerged(model, 'loading adapters')
        if own:
            lacking = sorted(set(loras) - {n for n, m in model.named_modules() if isinstance(m, LoRALinear)})
            if lacking:
                raise ValueError(f"the model has no adapters on {lacking[:4]}...: add_lora with these targets first")
    state_sd = None
    if state_file is not None and state_file.exists():
        from safetensors.torch import load_file
        if not model.state_cond:
            raise ValueError(f"{state_file}: state conditioning weights, but the model has state_cond=False")
        state_sd = load_file(str(state_file))
        check_keys({k: v for k, v in model.state_dict().items() if k.startswith('state_embedder.')}, state_sd, state_file)
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
            A, B, file_scale = loras.get(name, (None, None, None))
            if A is None:
                m.lora_B.weight.zero_()
                continue
            m.lora_A.weight.copy_(A)
            m.lora_B.weight.copy_(B * (file_scale * scale / m.scale))   # B A m.scale = the file's update x scale
    if state_sd is not None:
        model.load_state_dict(state_sd, strict=False)
    return model


# --- Command line ---------------------------------------------------------------------------------

def main(argv=None):
    """`python -m machinery.wan_files export --ckpt out_sampling/ckpt.pt [--out DIR] [--overwrite]`:
    lora.safetensors + state_embedder.safetensors of a sampling checkpoint (export_lora)."""
    import argparse
    from machinery import checkpoints   # weights_only loading, the track checked, a truncated file named
    parser = argparse.ArgumentParser(prog='python -m machinery.wan_files', description=main.__doc__)
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
        written = export_lora(ckpt['trainable'], out, ckpt['config'].get('lora_alpha'))
    except ValueError as err:
        raise SystemExit(str(err))
    print('\n'.join(f"wrote {p}" for p in written) or f"{args.ckpt}: no LoRA or state weights to export")
    if ckpt['config'].get('train_mode') == 'full':
        print(f"no lora.safetensors: {args.ckpt} trained every weight (train_mode full), so there are no LoRA "
              f"adapters to export; its weights are in the checkpoint")


if __name__ == '__main__':
    main()
