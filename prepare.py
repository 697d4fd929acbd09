"""Prepare the data: download the 1X datasets, write the synthetic ones, encode raw clips to
latents. One command line (as nanoGPT's prepare.py), and the functions the trainers call.

    python prepare.py download --out data/1x --split train_v2.0        # tokenized (compression)
    python prepare.py download_raw --out data/1x --split val_v2.0_raw  # raw videos (sampling)
    python prepare.py encode_raw --codec=wan --split data/1x/train_v2.0_raw --out data/1x/latents_wan/train_v2.0_raw --stride 8
    python prepare.py synthetic --out data/synthetic                   # small sets in the same layout
    python prepare.py synthetic_raw --out data/raw_demo
    python prepare.py own_clips --clips my_clips/ --out data/mine   # a folder of NAME.mp4 + NAME.npy (own_clips.py)

The trainers call one function each for their data, on every rank of a run (data_dir on storage
all ranks see), and one before it for the disk it will take (their dry runs print it):

    tokenized_splits(data_dir, splits, shards, rank, world_size, download)   # train_compression.py
    raw_latents(data_dir, splits, vae, ...) -> (latent dirs, codec)  # train_sampling.py
    tokenized_bytes(data_dir, splits, shards) / latents_bytes(data_dir, splits, vae, stride, ...)
"""
import argparse
import errno
import functools
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import own_clips
import run_dir
import synthetic
from data import (CLIP_LEN, HF_REPO_RAW, HF_REPO_TOKENIZED, NUM_LATENTS, RAW_CLIP_LEN, STATE_DIM, RawShard,
                  check_shards, expected_sizes, raw_shards, raw_split_is_whole, read_json, repo_files, settings_differ,
                  shard_paths)
from distributed import on_master, wait_for_all
from vae import PixelCodec, frames_to_video


# ---------------------------------------------------------------------------------------------
# Tokenized data (compression track): download and checks
# ---------------------------------------------------------------------------------------------

def tokenized_split_problems(split_dir, shards=None):
    """What is missing or the wrong size in a tokenized split (the sizes follow from the metadata,
    so a partial download is recognised); [] when it is whole."""
    meta = os.path.join(split_dir, 'metadata.json')
    if not os.path.exists(meta):
        return [f"{meta} is missing"]
    try:
        num_shards = read_json(meta, counts=('num_shards',))['num_shards']
    except ValueError as e:   # damaged: named (a download fetches it again)
        return [str(e)]
    problems = []
    if shards is not None:
        check_shards(shards, num_shards, meta)
    for i in range(num_shards) if shards is None else shards:
        try:
            paths = shard_paths(split_dir, i)
            n = read_json(paths['metadata'], counts=('shard_num_frames',))['shard_num_frames']
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e).split('. ')[0])
            continue
        for kind, size in expected_sizes(n).items():
            if os.path.getsize(paths[kind]) != size:
                problems.append(f"{paths[kind]} has {os.path.getsize(paths[kind])} bytes, not {size}")
    return problems


def hub_file(repo, repo_file, out, how_to_prepare, force=False):
    """One file of a Hugging Face dataset repo into out/repo_file, through the huggingface_hub cache
    (HF_HUB_CACHE: resumable, atomic per file), then hard-linked (or copied) into place atomically.
    Offline, stop with how_to_prepare: the commands that prepare the data on another machine."""
    from huggingface_hub import hf_hub_download
    try:
        cached = hf_hub_download(repo, repo_file, repo_type='dataset', force_download=force)
    except Exception as e:   # offline, no network, no such file, ... (huggingface_hub's errors vary by version)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if getattr(e, 'errno', None) == errno.ENOSPC or 'No space left on device' in str(e):
            raise SystemExit(f"the disk filled up while fetching {repo_file} of {repo} ({first}). Free space on the "
                             f"disks of {out} and of the huggingface_hub cache (HF_HUB_CACHE), then run the same "
                             f"command again: whole files are kept, the rest is fetched.")
        raise SystemExit(f"could not fetch {repo_file} of the Hugging Face dataset {repo} ({first}).\n"
                         f"Without network access here, prepare the data where there is one and copy the folder:\n"
                         f"{how_to_prepare}"
                         f"then pass --data_dir=DIR (or point HF_HUB_CACHE at a cache that holds the dataset).")
    dst = os.path.join(out, repo_file)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        os.link(os.path.realpath(cached), tmp)
    except OSError:   # another file system: copy
        shutil.copyfile(cached, tmp)
    os.replace(tmp, dst)
    return dst


def _fetch(repo_file, out, force=False):
    """One file of the tokenized dataset into out/repo_file (hub_file)."""
    return hub_file(HF_REPO_TOKENIZED, repo_file, out, "    python prepare.py download --out DIR --split train_v2.0\n"
                    "    python prepare.py download --out DIR --split val_v2.0\n", force)


def download_tokenized(out, split='val_v2.0', shards=None, rank=0, world=1):
    """Fetch a split of 1x-technologies/worldmodel into out/split with huggingface_hub: its
    metadata, then the shards (shards=[0]: one train shard to try; None: all), shard i by rank
    i % world, so every rank of a run shares the work (out must be on storage they all see).
    Every file is checked against the size its metadata implies and fetched again once if it is
    wrong. Train splits keep files in subfolders, the others flat (the dataset's layout)."""
    meta = read_json(_fetch(f'{split}/metadata.json', out), counts=('num_shards', 'num_images'))
    if shards is not None:
        check_shards(shards, meta['num_shards'], os.path.join(out, split, 'metadata.json'))
    check_room_for(out, split, meta, shards)
    mine = [i for i in (range(meta['num_shards']) if shards is None else shards) if i % world == rank]
    for i in tqdm(mine, desc=f'download {split}', unit='shard', disable=rank != 0):   # the overall progress
        files = repo_files(split, i)
        n = read_json(_fetch(files['metadata'], out), counts=('shard_num_frames',))['shard_num_frames']
        for kind, size in expected_sizes(n).items():
            path = os.path.join(out, files[kind])
            if os.path.exists(path) and os.path.getsize(path) == size:
                continue   # a resumed download: this file is whole
            if os.path.getsize(_fetch(files[kind], out)) != size:
                if os.path.getsize(_fetch(files[kind], out, force=True)) != size:
                    raise SystemExit(f"{path}: {os.path.getsize(path)} bytes after download, its metadata implies "
                                     f"{size}: the dataset on the Hub does not match its metadata")
    return os.path.join(out, split)


# The 1X tokenized splits (metadata.json: num_images, num_shards): what the disk estimate of a run
# assumes before a split is on disk
TOKENIZED_1X = {'train_v2.0': dict(num_images=11_254_161, num_shards=100), 'val_v2.0': dict(num_images=50_300,
                                                                                            num_shards=1)}


def tokenized_split_bytes(meta, shards=None):
    """Bytes of a tokenized split's files (all its shards, or `shards`) by its metadata.json: its
    num_images frames spread evenly over num_shards, in the three files of data.expected_sizes."""
    n_shards = meta['num_shards'] if shards is None else len(shards)
    return sum(expected_sizes(meta['num_images'] * n_shards // meta['num_shards']).values())


def tokenized_bytes(data_dir, splits, shards=None):
    """Bytes the tokenized splits will still download into data_dir (train_compression.py's disk
    check): each split's size by its metadata.json on disk, else by the 1X dataset's (TOKENIZED_1X;
    another split counts 0), less what its folder holds. shards: those of train_v2.0 (None: all)."""
    total = 0
    for s in splits:
        path = os.path.join(data_dir, s, 'metadata.json')
        try:
            meta = read_json(path, counts=('num_shards', 'num_images')) if os.path.exists(path) else TOKENIZED_1X.get(s)
        except ValueError:   # damaged: the download fetches it again
            meta = TOKENIZED_1X.get(s)
        if meta is not None:
            whole = tokenized_split_bytes(meta, shards if s == 'train_v2.0' else None)
            total += max(0, whole - _bytes_in([os.path.join(data_dir, s)]))
    return total


def check_room_for(out, split, meta, shards=None):
    """Stop before a download that would fill the disk: the split's shards (all, or `shards`) take
    the bytes its metadata.json implies (tokenized_split_bytes), less what out/split holds already.
    The huggingface_hub cache holds the files first: on the disk of out the files are hard links to
    it (counted once), on another disk they take room twice."""
    from huggingface_hub.constants import HF_HUB_CACHE
    total = tokenized_split_bytes(meta, shards)
    repo = os.path.join(HF_HUB_CACHE, f"datasets--{HF_REPO_TOKENIZED.replace('/', '--')}", 'snapshots')
    have, cached = _bytes_in([os.path.join(out, split)]), _bytes_in(
        [os.path.join(repo, rev, split) for rev in (os.listdir(repo) if os.path.isdir(repo) else [])])
    disk = lambda folder: os.stat(run_dir.existing_parent(folder)).st_dev
    if disk(HF_HUB_CACHE) == disk(out):
        needs = [(out, max(0, total - max(have, cached)), f'the {split} download')]
    else:
        needs = [(out, max(0, total - have), f'the {split} download'),
                 (HF_HUB_CACHE, max(0, total - cached), 'its huggingface_hub cache (HF_HUB_CACHE)')]
    _, refusal = run_dir.disk_report(needs)
    if refusal:
        raise SystemExit(refusal)


def _bytes_in(folders):
    """Bytes of the files under folders, each file once (the cache's snapshots link to its blobs)."""
    files = {os.path.realpath(os.path.join(d, f)) for folder in folders for d, _, names in os.walk(folder)
             for f in names}
    return sum(os.path.getsize(f) for f in files if os.path.exists(f))


def finish_download(out, split, shards=None):
    """After every rank's share: the whole split must be there (else data_dir is not shared)."""
    problems = tokenized_split_problems(os.path.join(out, split), shards)
    if problems:
        raise SystemExit(f"{os.path.join(out, split)} is incomplete after the download: {'; '.join(problems[:3])}. "
                         f"A multi-node run needs data_dir on storage that every node sees.")


def _is_synthetic(data_dir):
    """A folder synthetic.py wrote: its synthetic.json, or a split's metadata that says so."""
    def says_synthetic(split):
        try:
            return 'synthetic' in read_json(os.path.join(data_dir, split, 'metadata.json'))
        except (OSError, ValueError):
            return False
    return os.path.exists(os.path.join(data_dir, 'synthetic.json')) or any(map(says_synthetic, TOKENIZED_1X))


def tokenized_splits(data_dir, splits, shards=None, rank=0, world_size=1, download=False):
    """Make the tokenized splits a run reads whole in data_dir: with download, the missing or
    incomplete ones are fetched from the Hub (every rank its share of the shards), then rank 0
    checks each; without, or in a synthetic set, what is wrong stops the run. shards: the shards
    of train_v2.0 to use (None: all); the other splits are always whole."""
    shards_of = lambda split: shards if split == 'train_v2.0' else None
    try:
        problems = {s: tokenized_split_problems(os.path.join(data_dir, s), shards_of(s)) for s in splits}
    except ValueError as e:   # shards the split does not have
        raise SystemExit(f"--shards: {e}")
    missing = [s for s in splits if problems[s]]
    synthetic_set = bool(missing) and _is_synthetic(data_dir)   # never mixed with 1X files
    for s in missing:
        if synthetic_set or not download:
            fix = (f"It is a synthetic set: delete {data_dir} and write it again (`python prepare.py synthetic --out "
                   f"{data_dir}` with the --vocab and --seed it had)" if synthetic_set else
                   f"A mistyped --data_dir? Pass the folder of the 1X tokenized data, --download to fetch what is "
                   f"missing from the Hugging Face Hub (preset paper does), or prepare it where there is a network: "
                   f"`python prepare.py download --out DIR --split {s}`")
            more = f" (and {len(problems[s]) - 3} more)" if len(problems[s]) > 3 else ''
            raise SystemExit(f"{os.path.join(data_dir, s)} is not whole: {'; '.join(problems[s][:3])}{more}. {fix}.")
    for s in missing:
        try:
            download_tokenized(data_dir, s, shards_of(s), rank, world_size)
        except ValueError as e:   # shards the Hub's split does not have, a damaged metadata file
            raise SystemExit(str(e))
    if missing:
        wait_for_all(f"downloading {', '.join(missing)}")
        for s in missing:
            on_master(finish_download, data_dir, s, shards_of(s))
        wait_for_all('the split metadata')


# ---------------------------------------------------------------------------------------------
# Raw video data (sampling track): download, and latents on disk (encode once, train many steps)
# ---------------------------------------------------------------------------------------------

def _fetch_raw(repo_file, out):
    """One file of the raw dataset into out/repo_file (hub_file); one placed by an earlier run is kept."""
    dst = os.path.join(out, repo_file)
    if os.path.exists(dst):   # placed whole by an earlier run
        return dst
    return hub_file(HF_REPO_RAW, repo_file, out, "    python prepare.py download_raw --out DIR --split train_v2.0_raw\n"
                    "    python prepare.py download_raw --out DIR --split val_v2.0_raw\n"
                    "    python prepare.py encode_raw --codec=wan --stride=8 --split DIR/train_v2.0_raw "
                    "--out DIR/latents_wan/train_v2.0_raw\n")


def download_raw(out, split='val_v2.0_raw', rank=0, world=1):
    """Fetch a raw split of 1x-technologies/worldmodel_raw_data into out/split with huggingface_hub:
    the split's metadata.json, then shard i's four files by rank i % world (out must be on storage
    every rank sees). Each file is placed whole (atomic) and kept by a rerun; states and segment
    files are checked against the sizes their metadata implies."""
    meta = read_json(_fetch_raw(f'{split}/metadata.json', out), counts=('num_shards',))
    mine = [i for i in range(meta['num_shards']) if i % world == rank]
    for i in tqdm(mine, desc=f'download {split}', unit='shard', disable=rank != 0):   # the overall progress
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
    else:
        tmp = f"{settings_json}.tmp{rank}"
        with open(tmp, 'w') as f:
            json.dump(settings, f)
        os.replace(tmp, settings_json)
    for shard_id in tqdm(shards[rank::world], desc=f'encode {split_dir}', unit='shard', disable=rank != 0):
        path = os.path.join(partial, f'latents_{shard_id}.safetensors')
        if os.path.exists(path):   # written whole by an interrupted run
            continue
        shard = RawShard(split_dir, shard_id, frame_size)
        starts = shard.clip_starts(stride)
        latents, states, batch = [], [], []
        for k, (_, frames_THWC, states_TD) in enumerate(tqdm(shard.iter_clips(starts), total=len(starts), leave=False,
                                                              desc=f'shard {shard_id}')):
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
        save_file({'latents': torch.cat(latents).contiguous() if latents else torch.zeros(0),
                   'states': torch.stack(states).contiguous() if states else torch.zeros(0, CLIP_LEN, STATE_DIM),
                   'starts': torch.tensor(starts, dtype=torch.int64)}, path + '.tmp')
        os.replace(path + '.tmp', path)
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
    with open(os.path.join(partial, 'encoding.json'), 'w') as f:
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


def load_codec(name, vae_path='', device='cpu'):
    """(codec, dtype the latents are stored in): 'pixel' the CPU demo's lossless codec (float32),
    'wan' the Wan 2.2 VAE from vae_path (a hub repo or folder), in fp32: encoding runs once, so
    spend the precision; its latents are stored bf16."""
    if name == 'wan':
        from vae import WanVAE
        return WanVAE.from_pretrained(vae_path, device=device), torch.bfloat16
    return PixelCodec(), torch.float32


# The raw 1X splits' frame counts: the raw recordings are the tokenized ones' (TOKENIZED_1X); what
# the disk estimate assumes before the data is on disk
RAW_FRAMES_1X = {f'{split}_raw': meta['num_images'] for split, meta in TOKENIZED_1X.items()}
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


def latents_bytes(data_dir, splits, vae, stride, synthetic_frames=None, assume_1x=True):
    """Bytes of the latents raw_latents will still write for `splits` (a finished encoding counts
    0): a window every `stride` frames (an upper bound: windows do not cross segments), each 48
    channels x 6 latent frames x (H/16) x (W/16), bf16 for the Wan VAE, fp32 for the pixel codec.
    The frame count and size come from the raw split on disk, else synthetic_frames (frames, size)
    for a synthetic set not written yet, else the 1X dataset's (assume_1x; else the split counts 0)."""
    total = 0
    for s in splits:
        if os.path.exists(os.path.join(data_dir, f'latents_{vae}', s, 'encoding.json')):
            continue
        size = _raw_split_size(os.path.join(data_dir, s))
        if size is None and synthetic_frames:
            size = (synthetic_frames[0], synthetic_frames[1], synthetic_frames[1])
        if size is None and assume_1x:
            size = (RAW_FRAMES_1X.get(s, 0), RAW_FRAME_SIZE_1X, RAW_FRAME_SIZE_1X)
        if size is not None:
            frames, h, w = size
            total += frames // stride * 48 * NUM_LATENTS * (h // 16) * (w // 16) * (2 if vae == 'wan' else 4)
    return total


def raw_latents(data_dir, splits, vae, vae_path, stride, batch_size, download, device, rank=0, world_size=1):
    """The latents train_sampling.py trains on, made once: data_dir/latents_{vae}/SPLIT for each raw
    training split. A split neither whole on disk nor encoded is fetched from the Hub if download,
    else an error (val_v2.0_raw, which validation reads raw, too); each split is then encoded, or
    its finished encoding checked against this stride and codec. With world_size > 1 every rank
    fetches and encodes its share of the shards, and rank 0 finishes. Returns ([latent dir per
    split], codec): validation decodes with the same codec."""
    split_dir = lambda name: os.path.join(data_dir, name)
    latent_dirs = {s: os.path.join(data_dir, f'latents_{vae}', s) for s in splits}
    missing = [s for s in sorted(set(splits) | {'val_v2.0_raw'}) if not raw_split_is_whole(split_dir(s))
               and not (s in latent_dirs and os.path.exists(os.path.join(latent_dirs[s], 'encoding.json')))]
    if missing and not download:
        raise SystemExit(f"{data_dir} holds no whole {', '.join(missing)} (a mistyped --data_dir?). Pass the folder that "
                         f"holds the 1X raw data, --download to fetch it from the Hugging Face Hub (preset paper does), "
                         f"or --make_synthetic to write the synthetic demo set there. To prepare it elsewhere: "
                         f"`python prepare.py download_raw --out DIR --split train_v2.0_raw` (and val_v2.0_raw).")
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
    return list(latent_dirs.values()), codec


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def cmd_synthetic(args):
    world = synthetic.write_synthetic(args.out, seed=args.seed, vocab=args.vocab)   # reuses a finished set of these settings
    floors = synthetic.synthetic_floors(world['vocab'], world['eps'], world['p_new'])
    print(f"wrote {args.out}/train_v2.0 and {args.out}/val_v2.0 (vocab {world['vocab']}, eps {world['eps']})")
    print(f"Bayes-optimal teacher-forced CE per future token: full {floors['full']:.4f}, Top-500 {floors['topk']:.4f} nats")


def cmd_download(args):
    shards = None if args.shards is None else [int(s) for s in args.shards.split(',')]
    split_dir = download_tokenized(args.out, args.split, shards)
    finish_download(args.out, args.split, shards)
    print(f"downloaded to {split_dir}")


def cmd_synthetic_raw(args):
    written = synthetic.write_synthetic_raw_set(args.out, args.train_shards, args.frames, args.size, args.seed)
    print(f"{'wrote' if written else 'kept (already written with these settings)'} {args.out}/train_v2.0_raw and "
          f"{args.out}/val_v2.0_raw ({args.size}x{args.size})")


def cmd_encode_raw(args):
    codec, dtype = load_codec(args.codec, args.vae_path, args.device)
    n = encode_raw_split(args.split, args.out, codec, args.stride, args.batch_size, args.device, dtype)
    print(f"encoded {n} clips of {args.split} to {args.out}")


def cmd_own_clips(args):
    own_clips.run(args)


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except where there is none to show (required, or None)."""
    def _get_help_string(self, action):
        return action.help if action.required or action.default is None else super()._get_help_string(action)


def main(argv=None):
    """`python prepare.py <subcommand> ...`: each subcommand is one small block below; add yours beside."""
    parser = argparse.ArgumentParser(prog='prepare.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=DefaultsHelp)   # each subcommand's --help: defaults

    # --- section 1: tokenized data (compression track) ---
    p = sub.add_parser('synthetic', help='write a synthetic tokenized dataset in the 1X v2.0 layout')
    p.add_argument('--out', required=True, help='output folder (gets train_v2.0/ and val_v2.0/)')
    p.add_argument('--seed', type=int, default=0, help='random seed of the synthetic world')
    p.add_argument('--vocab', type=int, default=1000, help='tokens are drawn from [0, vocab)')
    p.set_defaults(run=cmd_synthetic)
    p = sub.add_parser('download', help='fetch the tokenized 1X dataset with huggingface_hub')
    p.add_argument('--out', required=True, help='local folder for the dataset')
    p.add_argument('--split', default='val_v2.0', help='train_v2.0, val_v2.0 or test_v2.0')
    p.add_argument('--shards', default=None, help='comma-separated shard numbers (train), e.g. 0,1; default all')
    p.set_defaults(run=cmd_download)

    # --- section 2: raw video data (sampling track) ---
    p = sub.add_parser('synthetic_raw', help='write synthetic raw clips (train_v2.0_raw/, val_v2.0_raw/) whose frames follow the states')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--size', type=int, default=64, help='frame size in pixels (the real data is 512)')
    p.add_argument('--train_shards', type=int, default=2, help='shards of the train split')
    p.add_argument('--frames', type=int, default=1200, help='frames per shard (30 Hz)')
    p.add_argument('--seed', type=int, default=0, help='random seed of the synthetic world')
    p.set_defaults(run=cmd_synthetic_raw)
    p = sub.add_parser('encode_raw', help='encode every clip of a raw split to latents (what train_sampling.py trains on; '
                                          'it also encodes them itself)')
    p.add_argument('--split', required=True, help='a raw split folder, e.g. data/1x/train_v2.0_raw')
    p.add_argument('--out', required=True, help='output folder for latents_{shard}.safetensors')
    p.add_argument('--codec', default='pixel', choices=('pixel', 'wan'), help="'pixel' (the CPU demo's) or 'wan' (the Wan 2.2 VAE)")
    p.add_argument('--vae_path', default='Wan-AI/Wan2.2-TI2V-5B-Diffusers', help='--codec=wan: hub repo id or local folder of the Wan VAE')
    p.add_argument('--stride', type=int, default=RAW_CLIP_LEN, help='frames between clip starts (77: no overlap)')
    p.add_argument('--batch_size', type=int, default=8, help='clips encoded at once')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='where the codec runs')
    p.set_defaults(run=cmd_encode_raw)
    p = sub.add_parser('download_raw', help='fetch a raw split of 1x-technologies/worldmodel_raw_data')
    p.add_argument('--out', required=True, help='local folder for the dataset')
    p.add_argument('--split', default='val_v2.0_raw', help='train_v2.0_raw or val_v2.0_raw')
    p.set_defaults(run=lambda a: print(f"downloaded to {download_raw(a.out, a.split)}"))
    p = sub.add_parser('own_clips', help='convert a folder of your own clips (NAME.mp4 + NAME.npy states, frames x 25) '
                                         'to the raw layout train_sampling.py reads (own_clips.py)')
    own_clips.add_arguments(p)
    p.set_defaults(run=cmd_own_clips)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as e:   # damaged input, a path that is no folder, ...: said without a traceback
        raise SystemExit(f"prepare.py {args.command}: {e}")


if __name__ == '__main__':
    main()
