"""The sampling track's data on disk: the raw 1X videos (downloaded from the Hugging Face Hub) and
their latents, encoded once by a codec (machinery/vae.py) and trained on for many steps.

    raw_latents(data_dir, splits, vae, ...) -> (latent dirs, codec)   # train_sampling.py
    LatentClips(latent_dir)                  # the clips of an encoding: (latents, states), row by row
    latents_bytes(data_dir, splits, vae, stride, ...)   # what a run will still write (its disk check)
    download_raw(out, split), encode_raw_split(split_dir, out_dir, codec, stride)   # python -m machinery.prepare
"""
import glob
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from data import (CLIP_LEN, HF_REPO_RAW, SPLITS_1X, NUM_LATENTS, RAW_CLIP_LEN, STATE_DIM, RawShard, raw_shards,
                  read_json, repo_files, settings_differ, shard_paths)
from machinery import run_dir, written
from machinery.distributed import on_master, wait_for_all
from machinery.hub import hub_file
from machinery.vae import PixelCodec, frames_to_video


def _fetch_raw(repo_file, out):
    """One file of the raw dataset into out/repo_file (hub_file); one placed by an earlier run is kept."""
    dst = os.path.join(out, repo_file)
    if os.path.exists(dst):   # placed whole by an earlier run
        return dst
    return hub_file(HF_REPO_RAW, repo_file, out, "    python -m machinery.prepare download_raw --out DIR --split train_v2.0_raw\n"
                    "    python -m machinery.prepare download_raw --out DIR --split val_v2.0_raw\n"
                    "    python -m machinery.prepare encode_raw --codec=wan --stride=8 --split DIR/train_v2.0_raw "
                    "--out DIR/latents_wan/train_v2.0_raw\n")


def raw_split_is_whole(split_dir):
    """True if a raw split holds its metadata.json and every shard's four files."""
    try:
        return all(shard_paths(split_dir, i, 'mp4') for i in raw_shards(split_dir))
    except FileNotFoundError:
        return False


def download_raw(out, split='val_v2.0_raw', rank=0, world=1):
    """Fetch a raw split of 1x-technologies/worldmodel_raw_data into out/split with huggingface_hub:
    the split's metadata.json, then shard i's four files by rank i % world (out must be on storage
    every rank sees). Each file is placed whole (atomic) and kept by a rerun; states and segment
    files are checked against the sizes their metadata implies."""
    meta = read_json(_fetch_raw(f'{split}/metadata.json', out), counts=('num_shards',))
    mine = [i for i in range(meta['num_shards']) if i % world == rank]
    for i in tqdm(mine, desc=f'download {split}', unit='shard', disable=rank or None):   # on a terminal
        for f in repo_files(split, i, 'mp4').values():
            _fetch_raw(f, out)
        RawShard(os.path.join(out, split), i)   # sizes and finite states
    return os.path.join(out, split)


def encode_raw_split(split_dir, out_dir, codec, stride=RAW_CLIP_LEN, batch_size=8, device='cpu',
                     dtype=torch.float32, rank=0, world=1):
    """Encode every clip of a raw split with `codec` (vae.PixelCodec or vae.WanVAE) to
    out_dir/latents_{shard}.safetensors holding latents [N, 48, 6, h, w], states [N, 21, 25] and
    starts [N] (the raw frame each window starts at), and out_dir/encoding.json (the settings and
    the number of clips). Store bf16 for the Wan VAE, float32 for the lossless pixel codec.

    Safe to interrupt and to share: the shards are written to out_dir.partial, each file renamed
    into place whole; the settings go first to out_dir.partial/settings.json, so a rerun resumes
    at the first shard not written and refuses other settings (another stride, codec, frame size)
    instead of mixing them. With world > 1 process `rank` encodes shards rank, rank + world, ...
    and the master calls finish_encoding after all are done. A finished out_dir of the same
    settings is kept as it is; one of other settings is an error. Returns the number of clips
    when out_dir is finished (a finished one, or world == 1), else None. Latents that come out
    NaN or inf are an error naming the video."""
    out_dir = str(out_dir).rstrip('/')
    shards = raw_shards(split_dir)
    frame_size = RawShard(split_dir, shards[0]).read_frames(0, 1).shape[1:3]
    settings = dict(codec=type(codec).__name__, stride=stride, frame_size=list(frame_size), dtype=str(dtype),
                    split=os.path.basename(str(split_dir).rstrip('/')))
    if os.path.exists(out_dir):
        check_encoding(out_dir, settings)
        return read_json(os.path.join(out_dir, 'encoding.json'))['clips']
    partial = out_dir + '.partial'
    os.makedirs(partial, exist_ok=True)
    settings_json = os.path.join(partial, 'settings.json')
    if os.path.exists(settings_json):
        _same_settings(settings_json, settings, f"an interrupted encoding in {partial}", partial)
    elif rank == 0:   # the first shards' settings, before them
        with written(settings_json) as tmp, open(tmp, 'w') as f:
            json.dump(settings, f)
    for shard_id in tqdm(shards[rank::world], desc=f'encode {split_dir}', unit='shard', disable=rank or None):
        path = os.path.join(partial, f'latents_{shard_id}.safetensors')
        if os.path.exists(path):   # written whole by an interrupted run
            continue
        shard = RawShard(split_dir, shard_id, frame_size)
        starts = shard.clip_starts(stride)
        latents, states, batch = [], [], []
        for k, (_, frames_THWC, states_TD) in enumerate(tqdm(shard.iter_clips(starts), total=len(starts), leave=False,
                                                              desc=f'shard {shard_id}', disable=rank or None)):
            batch.append(torch.from_numpy(frames_THWC))
            states.append(torch.from_numpy(states_TD))
            if len(batch) == batch_size or k == len(starts) - 1:
                with torch.no_grad():
                    z = codec.encode(frames_to_video(torch.stack(batch)).to(device)).to('cpu', dtype)
                if not torch.isfinite(z).all():
                    bad = starts[k + 1 - len(batch) + int((~torch.isfinite(z)).flatten(1).any(1).nonzero()[0])]
                    raise ValueError(f"{shard.video_path}: the codec's latents of the clip at frame {bad} hold NaN or "
                                     f"inf (codec {type(codec).__name__}, {dtype}); check the video and the VAE")
                latents.append(z)
                batch = []
        with written(path) as tmp:
            save_file({'latents': torch.cat(latents).contiguous() if latents else torch.zeros(0),
                       'states': torch.stack(states).contiguous() if states else torch.zeros(0, CLIP_LEN, STATE_DIM),
                       'starts': torch.tensor(starts, dtype=torch.int64)}, tmp)
    if world == 1:
        return finish_encoding(split_dir, out_dir)


def finish_encoding(split_dir, out_dir):
    """After every rank's share: check that every shard is there, write encoding.json, rename
    out_dir.partial to out_dir. Returns the number of clips."""
    out_dir = str(out_dir).rstrip('/')
    partial = out_dir + '.partial'
    total = 0
    for shard_id in raw_shards(split_dir):
        path = os.path.join(partial, f'latents_{shard_id}.safetensors')
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing after encoding: a rank failed, or out_dir is not on storage that "
                             f"every node sees; rerun to resume")
        with safe_open(path, framework='pt') as f:
            total += f.get_slice('starts').get_shape()[0]
    settings = read_json(os.path.join(partial, 'settings.json'))
    with written(os.path.join(partial, 'encoding.json')) as tmp, open(tmp, 'w') as f:
        json.dump(dict(settings, clips=total), f)
    os.replace(partial, out_dir)
    return total


def _same_settings(path, settings, what, where):
    diffs = settings_differ(read_json(path), settings)
    if diffs:
        raise SystemExit(f"{what} has other settings ({diffs}): pass the same settings, another "
                         f"folder, or delete {where} to encode again")


def check_encoding(out_dir, settings):
    """A finished encoding in out_dir must have these settings (keys of encoding.json)."""
    path = os.path.join(out_dir, 'encoding.json')
    if not os.path.exists(path):
        raise SystemExit(f"{out_dir} exists but has no encoding.json: it is not a finished encoding; delete it")
    saved = read_json(path)
    if saved.get('stride') != settings.get('stride', saved.get('stride')):   # the flag users change most
        raise SystemExit(f"{out_dir} was encoded with stride {saved.get('stride')}: pass "
                         f"--clip_stride={saved.get('stride')} (encode_raw: --stride), or delete it to encode again")
    _same_settings(path, settings, f"the encoding in {out_dir}", out_dir)


class LatentClips(torch.utils.data.Dataset):
    """Pre-encoded clips (encode_raw_split's files), read row by row without loading whole shards.
    Only a finished encoding (with encoding.json) is read."""

    def __init__(self, latent_dir):
        if not os.path.exists(os.path.join(latent_dir, 'encoding.json')):
            raise FileNotFoundError(f"{latent_dir}/encoding.json missing: not a finished encoding; run "
                                    f"`python -m machinery.prepare encode_raw` (--codec=pixel or wan); "
                                    f"both resume an interrupted one")
        self.encoding = read_json(os.path.join(latent_dir, 'encoding.json'))
        paths = sorted(glob.glob(f'{latent_dir}/latents_*.safetensors'))
        try:   # safetensors checks each file's header against its size
            self.files = {p: safe_open(p, framework='pt') for p in paths}
            self.items = [(p, k) for p, f in self.files.items() for k in range(f.get_slice('starts').get_shape()[0])]
        except SafetensorError as e:
            raise ValueError(f"{latent_dir}: damaged latents ({e}): delete the folder to encode again") from None
        if not self.items:
            raise ValueError(f"{latent_dir}: no clips")

    def __getitem__(self, k):
        """(latents float32 [48, 6, h, w], states [21, 25]) of clip k, checked for NaN and inf (written finite)."""
        path, row = self.items[k]
        z, states = (self.files[path].get_slice(key)[row:row + 1][0].float() for key in ('latents', 'states'))
        if not (z.sum() + states.sum()).isfinite():   # NaN and inf carry through a sum: 30x cheaper than isfinite
            raise ValueError(f"{path}: clip {row} holds NaN or inf (a damaged file): delete its folder to encode again")
        return z, states

    def __len__(self):
        return len(self.items)


def load_codec(name, vae_path='', device='cpu'):
    """(codec, dtype the latents are stored in): 'pixel' the CPU demo's lossless codec (float32),
    'wan' the Wan 2.2 VAE from vae_path (a hub repo or folder), in fp32: encoding runs once, so
    spend the precision; its latents are stored bf16."""
    if name == 'wan':
        from machinery.vae import WanVAE
        return WanVAE.from_pretrained(vae_path, device=device), torch.bfloat16
    return PixelCodec(), torch.float32


# The raw 1X splits' frame counts: the raw recordings are the tokenized ones' (SPLITS_1X); what
# the disk estimate assumes before the data is on disk
RAW_FRAMES_1X = {f'{split}_raw': meta['num_images'] for split, meta in SPLITS_1X.items()}
RAW_FRAME_SIZE_1X = 512


def _raw_split_size(split_dir):
    """(frames, height, width) of a raw split on disk, or None if it is missing or damaged (the
    damage is named later, by the run's reader)."""
    try:
        frames = read_json(os.path.join(split_dir, 'metadata.json'))['num_images']
        h, w = RawShard(split_dir, raw_shards(split_dir)[0]).read_frames(0, 1).shape[1:3]
        return frames, h, w
    except (OSError, KeyError, IndexError, ValueError):
        return None


def latents_bytes(data_dir, splits, vae, stride, synthetic=None, assume_1x=True):
    """Bytes raw_latents will still write for `splits`: the synthetic raw set if it writes one
    (synthetic: its settings; none once synthetic.json is there), then the latents (a finished encoding
    counts 0): a window every `stride` frames (an upper bound: windows do not cross segments), each 48
    channels x 6 latent frames x (H/16) x (W/16), bf16 for the Wan VAE, fp32 for the pixel codec.
    The frame count and size come from the raw split on disk, else the synthetic settings, else the
    1X dataset's (assume_1x; else the split counts 0)."""
    synthetic_frames = {'train_v2.0_raw': synthetic['train_shards'] * synthetic['frames'],
                        'val_v2.0_raw': synthetic.get('val_frames') or synthetic['frames']} if synthetic else {}
    total = 0
    if synthetic and not os.path.exists(os.path.join(data_dir, 'synthetic.json')):
        # a synthetic frame: its mp4 (libx264 crf 0 of the synthetic world: measured 0.24 bytes a pixel at 32 px,
        # 0.07 at 256 px: a quarter byte bounds it), its state row and segment id
        total = sum(synthetic_frames.values()) * (synthetic['size'] ** 2 // 4 + (STATE_DIM + 1) * 4)
    for s in splits:
        if os.path.exists(os.path.join(data_dir, f'latents_{vae}', s, 'encoding.json')):
            continue
        size = _raw_split_size(os.path.join(data_dir, s))
        if size is None and s in synthetic_frames:
            size = (synthetic_frames[s], synthetic['size'], synthetic['size'])
        if size is None and assume_1x:
            size = (RAW_FRAMES_1X.get(s, 0), RAW_FRAME_SIZE_1X, RAW_FRAME_SIZE_1X)
        if size is not None:
            frames, h, w = size
            total += frames // stride * 48 * NUM_LATENTS * (h // 16) * (w // 16) * (2 if vae == 'wan' else 4)
    return total


def raw_latents(data_dir, splits, vae, vae_path, stride, batch_size, download, device, rank=0, world_size=1,
                synthetic=None):
    """The latents train_sampling.py trains on, made once: data_dir/latents_{vae}/SPLIT for each raw
    training split. synthetic (the settings of synthetic_video.write_synthetic_raw_set): first write
    that synthetic raw set into data_dir (a finished one of the same settings is kept). A split
    neither whole on disk nor encoded is fetched from the Hub if download, else an error
    (val_v2.0_raw, which validation reads raw, too); each split is then encoded, or its finished
    encoding checked against this stride and codec. With world_size > 1 every rank
    fetches and encodes its share of the shards, and rank 0 finishes. Returns ([latent dir per
    split], codec): validation decodes with the same codec."""
    try:   # a damaged or foreign data file (data.py's ValueError names it and what to do): no traceback
        if synthetic:   # rank 0 writes it, once
            from machinery.synthetic_video import write_synthetic_raw_set
            on_master(lambda: write_synthetic_raw_set(data_dir, **synthetic))
            wait_for_all('the synthetic data')
        split_dir = lambda name: os.path.join(data_dir, name)
        latent_dirs = {s: os.path.join(data_dir, f'latents_{vae}', s) for s in splits}
        missing = [s for s in sorted(set(splits) | {'val_v2.0_raw'}) if not raw_split_is_whole(split_dir(s))
                   and not (s in latent_dirs and os.path.exists(os.path.join(latent_dirs[s], 'encoding.json')))]
        if missing and not download:
            raise SystemExit(f"{data_dir} holds no whole {', '.join(missing)} (a mistyped --data_dir?). Pass the "
                             f"folder that holds the 1X raw data, --download to fetch it from the Hugging Face Hub "
                             f"(preset paper does), or --make_synthetic to write the synthetic demo set there. To "
                             f"prepare it elsewhere: `python -m machinery.prepare download_raw --out DIR --split "
                             f"train_v2.0_raw` (and val_v2.0_raw).")
        for s in missing:
            download_raw(data_dir, s, rank, world_size)
        if missing:
            wait_for_all(f"downloading {', '.join(missing)}")
            # the latents of what was downloaded: room for them before hours of encoding (the run checked the rest)
            _, no_room = run_dir.disk_report([(data_dir, latents_bytes(data_dir, splits, vae, stride), 'latents')])
            if no_room:
                raise SystemExit(no_room)
        codec, dtype = load_codec(vae, vae_path, device)
        for s, latent_dir in latent_dirs.items():
            if os.path.exists(latent_dir):   # a finished encoding: it must be of this stride and codec
                on_master(check_encoding, latent_dir, dict(stride=stride, codec=type(codec).__name__))
                continue
            encode_raw_split(split_dir(s), latent_dir, codec, stride, batch_size, device, dtype, rank, world_size)
            if world_size > 1:   # each rank wrote its share of the shards; rank 0 checks them all and finishes
                wait_for_all(f"encoding {s}")
                on_master(finish_encoding, split_dir(s), latent_dir)
                wait_for_all(f"the encoding of {s}")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return list(latent_dirs.values()), codec

