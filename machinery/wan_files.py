"""The Wan ecosystem's files that a sampling run reads: the DiT's checkpoint and the umT5 empty prompt.
A Hub repo id is downloaded through huggingface_hub (machinery/hub.py); a local folder is read as it is.

checkpoint files  sharded safetensors, config.json; check_keys(expected, got, source); read_pth(path):
                  a .pth read without running its code
key names         diffusers_name, official_name, to_diffusers_state_dict: official Wan <-> diffusers
the DiT           load_dit(repo_or_dir): official or diffusers layout
text context      null_context(repo_or_dir): umT5's encoding of "", padded to 512 slots (cached)
a run's model     build_model(...): the DiT a run trains (+ LoRA, + a LoRA file to start from; its base
                  Wan 2.2 or an earlier run: run_settings(pretrained));
                  text_context(cfg, text_encoder, device)
LoRA files in and out, the export command: machinery/lora_files.py.
"""
import json
import math
import os
import re
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from machinery import checkpoints, disk_error
from machinery.hub import resolve
from wan_state import WanConfig, WanDiT, add_lora, keeps_fp32


# --- Checkpoint files: sharded safetensors, config.json, checks -----------------------------------

def _safetensors_index(root, stem):
    """key -> shard path of a checkpoint: through <stem>.safetensors.index.json, or one
    <stem>.safetensors; every shard must be there, open, and hold the keys the index gives it."""
    index, single = root / f'{stem}.safetensors.index.json', root / f'{stem}.safetensors'
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
    elif single.exists():
        shards = {single.name: None}
    else:
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


def check_keys(expected, got, source):
    """expected, got: {name: tensor}. ValueError listing the missing, unexpected and wrong-shape tensors."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(set(expected) & set(got)) if got[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        lines = [f"checkpoint {source} does not match the model config:"]
        for what, items in (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)):
            if items:
                lines.append(f"  {what} ({len(items)}): {', '.join(items[:8])}"
                             + (f' ... ({len(items)} in all)' if len(items) > 8 else ''))
        raise ValueError('\n'.join(lines))


def check_finite(tensors, source):
    """ValueError naming source and the first tensor that holds NaN or inf (weights are checked as they load)."""
    bad = next((k for k, v in tensors.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"{source}: {bad} holds NaN or inf values: the file is damaged (or was saved from diverged "
                         f"weights); use a good copy")


def read_pth(path):
    """An official .pth weights file (Wan2.2_VAE.pth, the umT5 encoder), memory-mapped (read lazily),
    with torch.load(weights_only=True): tensors only, so a crafted file never runs code."""
    try:
        sd = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
    except Exception as err:   # UnpicklingError (objects, not tensors), RuntimeError (truncated), ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a weights file nanoWM can read ({first}); it holds Python objects rather than "
                         f"tensors, or it is truncated: download it again from the official repo") from None
    if not (isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise ValueError(f"{path}: not a weights file (it holds no dict of named tensors): download it again")
    return sd


def _config_from_json(path):
    """WanConfig from an official config.json (dim, num_heads, ...) or a diffusers one; ValueError
    naming the file if it is damaged or is no Wan config (a size that is no positive number)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a Wan checkpoint directory holds config.json next to its weights")
    try:
        raw = json.loads(path.read_text())
        if 'num_attention_heads' in raw:   # diffusers WanTransformer3DModel config
            raw = dict(dim=raw['num_attention_heads'] * raw['attention_head_dim'], num_heads=raw['num_attention_heads'],
                       in_dim=raw['in_channels'], out_dim=raw['out_channels'], ffn_dim=raw['ffn_dim'],
                       num_layers=raw['num_layers'], text_dim=raw.get('text_dim', 4096), freq_dim=raw['freq_dim'],
                       eps=raw['eps'], patch_size=raw['patch_size'])
        kw = {fld.name: raw[fld.name] for fld in fields(WanConfig) if fld.name in raw}
        if 'patch_size' in kw:
            kw['patch_size'] = tuple(kw['patch_size'])
    except (json.JSONDecodeError, KeyError, TypeError) as err:   # truncated, or another model's config
        raise ValueError(f"{path}: not the config.json of a Wan DiT ({type(err).__name__}: {err}); download it "
                         f"again") from None
    kinds = {fld.name: (int,) if type(fld.default) is int else (int, float) for fld in fields(WanConfig)
             if type(fld.default) in (int, float)}   # the sizes: counts, and eps, rope_theta
    wrong = [f'{k}={v!r}' for k, v in kw.items() if k in kinds and not (isinstance(v, kinds[k]) and 0 < v < math.inf)]
    if wrong:
        raise ValueError(f"{path}: {', '.join(wrong)}: a Wan DiT's sizes are positive numbers (whole for counts); "
                         f"the file is damaged or not a Wan config")
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
    if not list(root.glob('diffusion_pytorch_model.safetensors*')) and (root / 'transformer').is_dir():
        root = root / 'transformer'
    cfg = replace(_config_from_json(root / 'config.json'), **cfg_overrides)
    sd, where = {}, _safetensors_index(root, 'diffusion_pytorch_model')
    for path in dict.fromkeys(where.values()):   # shard by shard, each tensor cast as it is read
        with safe_open(str(path), framework='pt', device=str(device)) as f:
            shard = {key: f.get_tensor(key).to(torch.float32 if keeps_fp32(official_name(key)) else dtype)
                     for key in where if where[key] == path}
        check_finite(shard, path)
        sd.update(shard)
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
    if cache_path is None:
        name = str(repo_id_or_dir).strip('/').replace('/', '--')
        cache_dir = Path(os.environ.get('NANOWM_CACHE', '~/.cache/nanowm')).expanduser()
        cache_path = cache_dir / f'null_context_{name}.safetensors'
    cache_path = Path(cache_path)
    if cache_path.exists():
        eos_1D, source = load_file(str(cache_path))['context'], cache_path
    else:
        source = resolve(repo_id_or_dir, [UMT5_FILE, 'text_encoder/*'])
        try:   # another model's weights: a key it lacks, a shape that does not fit
            eos_1D = _umt5_one_token(source, eos_id)
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"{source}: not the weights of Wan's umT5-XXL encoder ({type(err).__name__}: {err}); "
                             f"download them again") from None
    if not torch.isfinite(eos_1D).all():   # NaN or inf in the weights it is computed from (or in the cache)
        raise ValueError(f"{source}: the umT5 encoding of the empty prompt holds NaN or inf values: the file is "
                         f"damaged; use a good copy (a cache file: delete it)")
    if source != cache_path:
        tmp = cache_path.with_name(f'{cache_path.name}.{os.getpid()}.tmp')   # whole, even with every rank writing
        try:   # a cache: a disk without room for it costs only the encoding next time
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            save_file({'context': eos_1D.contiguous()}, str(tmp))
            os.replace(tmp, cache_path)
        except Exception as err:
            tmp.unlink(missing_ok=True)
            if disk_error(err) is None:
                raise
            print(f"note: the empty prompt's encoding is not cached in {cache_path} ({disk_error(err)})")
    return F.pad(eos_1D, (0, 0, 0, text_len - eos_1D.shape[0]))[None]


def _umt5_one_token(root, token_id):
    """Read only what one token needs: one embedding row, v, o, the FFN and the norms of each layer."""
    if (root / UMT5_FILE).exists():   # original Wan keys (wan/modules/t5.py T5Encoder); mmap reads lazily
        sd = read_pth(root / UMT5_FILE)
        keys, get = sd.keys(), lambda key, rows=slice(None): sd[key][rows]
        n_layers = 1 + max((int(k.split('.')[1]) for k in keys if k.startswith('blocks.')), default=-1)
        names = dict(emb='token_embedding.weight', final='norm.weight', n1='blocks.{}.norm1.weight',
                     v='blocks.{}.attn.v.weight', o='blocks.{}.attn.o.weight', n2='blocks.{}.norm2.weight',
                     gate='blocks.{}.ffn.gate.0.weight', fc1='blocks.{}.ffn.fc1.weight', fc2='blocks.{}.ffn.fc2.weight')
    else:   # transformers UMT5EncoderModel keys (diffusers text_encoder/, sharded safetensors)
        sub = root / 'text_encoder' if (root / 'text_encoder').is_dir() else root
        where = _safetensors_index(sub, 'model')
        keys = where.keys()

        def get(key, rows=slice(None)):   # only those rows read from the file
            with safe_open(str(where[key]), framework='pt') as f:
                return f.get_slice(key)[rows]

        n_layers = 1 + max((int(k.split('.')[2]) for k in keys if k.startswith('encoder.block.')), default=-1)
        emb = 'shared.weight' if 'shared.weight' in keys else 'encoder.embed_tokens.weight'
        p = 'encoder.block.{}.layer.'
        names = dict(emb=emb, final='encoder.final_layer_norm.weight', n1=p + '0.layer_norm.weight',
                     v=p + '0.SelfAttention.v.weight', o=p + '0.SelfAttention.o.weight', n2=p + '1.layer_norm.weight',
                     gate=p + '1.DenseReluDense.wi_0.weight', fc1=p + '1.DenseReluDense.wi_1.weight',
                     fc2=p + '1.DenseReluDense.wo.weight')

    if n_layers < 1:
        raise KeyError(names['n1'].format(0))

    def w(key, i=None):
        return get(names[key].format(i)).float()

    def rms(x, weight):   # T5 LayerNorm: no mean subtraction, no bias, eps 1e-6
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    x = get(names['emb'], slice(token_id, token_id + 1)).float()
    for i in range(n_layers):
        x = x + rms(x, w('n1', i)) @ w('v', i).T @ w('o', i).T
        h = rms(x, w('n2', i))
        x = x + (F.gelu(h @ w('gate', i).T, approximate='tanh') * (h @ w('fc1', i).T)) @ w('fc2', i).T
    return rms(x, w('final'))


# --- What a run builds: the DiT it trains and its text context ------------------------------------

def run_settings(pretrained):
    """The saved settings (model, dim, ..., text_encoder) of the nanoWM sampling run in folder `pretrained`, or None."""
    path = os.path.join(str(pretrained), checkpoints.CKPT)
    return checkpoints.load_checkpoint(path, 'sampling')['config'] if os.path.isfile(path) else None


def _run_base(pretrained, device, dtype):
    """(WanConfig, base weights) of a run that trained every weight (the tiny stand-in for Wan's pretraining)."""
    state = checkpoints.load_checkpoint(os.path.join(pretrained, checkpoints.CKPT), 'sampling')
    run = state['config']
    if run['train_mode'] != 'full':   # its base is another model, and its adapters are not a base
        raise SystemExit(f"--pretrained={pretrained}: a LoRA run (train_mode {run['train_mode']}); a base is a run "
                         f"that trained every weight (--train_mode=full): pass that one (this run's adapters: "
                         f"--init_lora={pretrained})")
    cfg = WanConfig.tiny(**{k: run[k] for k in ('dim', 'num_layers', 'num_heads', 'ffn_dim')}) \
        if run['model'] == 'tiny' else WanConfig()
    return cfg, {k: v.to(device, torch.float32 if keeps_fp32(k) else dtype) for k, v in state['trainable'].items()
                 if not k.startswith('state_embedder.')}


def build_model(*, model, pretrained, train_mode, lora_rank, lora_alpha, init_seed, device, dtype, tiny,
                state_embedder='paper', null_state=True, init_lora='', state_cond=True):
    """The DiT to fine-tune. pretrained = '' builds random weights from init_seed (tiny demo, timing);
    a Hub repo or Wan folder loads Wan 2.2; a nanoWM sampling run's folder (train_mode full) loads its
    weights as the base, with its sizes (the CPU demo's two stages: a base without states, then LoRA
    and the states on it). train_mode 'lora': frozen base + LoRA + state parameters (the paper);
    'full': every weight. state_cond=False: no state embedder (a base model). null_state: the learned
    no-state embedding (a run with state dropout). init_lora: a LoRA file or export folder a new run
    starts from (machinery/lora_files.py): its update in the adapters, or merged into the weights
    (full). A pretrained checkpoint or a LoRA file that does not fit stops, named."""
    if model not in ('tiny', 'ti2v-5b'):
        raise ValueError(f"model={model!r}: 'tiny' or 'ti2v-5b'")
    if train_mode not in ('lora', 'full'):
        raise ValueError(f"train_mode={train_mode!r}: 'lora' or 'full'")
    torch.manual_seed(init_seed)
    states = dict(state_embedder=state_embedder, null_state=null_state)
    if pretrained and run_settings(pretrained) is not None:
        cfg, sd = _run_base(pretrained, device, dtype)
        try:
            net = WanDiT.from_pretrained(replace(cfg, **states), sd, state_cond, device)
        except RuntimeError as err:   # keys or shapes that do not fit its own settings: a damaged checkpoint
            raise SystemExit(f"--pretrained={pretrained}: its ckpt.pt does not fit its settings ({err})") from None
    elif pretrained:
        try:
            net = load_dit(pretrained, state_cond=state_cond, device=device, dtype=dtype, **states)
        except (ValueError, FileNotFoundError) as err:   # a damaged or foreign checkpoint, named by load_dit
            raise SystemExit(f"--pretrained={pretrained}: {err}") from None
    else:
        cfg = WanConfig.tiny(**tiny, **states) if model == 'tiny' else WanConfig(**states)
        net = WanDiT(cfg, state_cond=state_cond).to(device)
        if dtype != torch.float32:
            net.set_dtype(dtype)
    if train_mode == 'lora':
        add_lora(net, rank=lora_rank, alpha=lora_alpha)   # freezes all but LoRA and state params
    else:
        net.requires_grad_(True)
    for p in net.parameters():   # trained weights stay fp32: they are the optimizer's master copy
        if p.requires_grad:
            p.data = p.data.float()
    if init_lora:
        from machinery.lora_files import load_lora
        try:
            load_lora(net, init_lora, merge=train_mode == 'full')
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"--init_lora={init_lora}: {err}")
    return net


def text_context(cfg, text_encoder, device):
    """The empty-prompt context (paper 2.1: "" as the prompt, cross-attention kept). text_encoder
    'zeros': zeros [1, text_len, text_dim] (the tiny demo has no umT5); otherwise a hub repo or
    folder with Wan's umT5, encoded once by null_context and cached."""
    base = run_settings(text_encoder) if text_encoder != 'zeros' else None
    text_encoder = base['text_encoder'] if base else text_encoder   # a base run's folder: the context it trained on
    if text_encoder == 'zeros':
        return torch.zeros(1, cfg.text_len, cfg.text_dim, device=device)
    return null_context(text_encoder, text_len=cfg.text_len).to(device)
