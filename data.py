"""nanoWM data: the 1X World Model Challenge v2.0 datasets, read exactly as published, and small
synthetic datasets written in the same layout.

Sections:
  1. tokenized data (compression track): reader, synthetic writer, download
  2. raw video data (sampling track): reader, synthetic writer, latent pre-encoding
  3. command line: `python data.py synthetic --out DIR`, ...
"""

import functools
import json
import math
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from metrics import P_FLOOR

# ---------------------------------------------------------------------------------------------
# 1. Tokenized data (compression track)
# ---------------------------------------------------------------------------------------------

# Facts of the 1X v2.0 tokenized data (its dataset card and the 1xgpt code). No 1X file states the vocabulary:
# 64,000 is the size of the Cosmos DV8x8x8 FSQ codebook (levels 8,8,8,5,5,5).
VOCAB_SIZE = 64000
FRAMES_PER_BLOCK = 17      # one Cosmos DV8x8x8 block: 17 frames at 30 Hz ...
GRIDS_PER_BLOCK = 3        # ... encoded into 3 token grids
GRID_H = GRID_W = 32       # of 32 x 32 tokens (256 x 256 px / 8)
STATE_DIM = 25             # robot state row per frame (joint angles, hand closure, velocities)
SAMPLE_BLOCKS = 2          # a sample is two consecutive blocks: 6 grids, 34 frames
SAMPLE_GRIDS = SAMPLE_BLOCKS * GRIDS_PER_BLOCK
SAMPLE_FRAMES = SAMPLE_BLOCKS * FRAMES_PER_BLOCK
STATE_WINDOW = 64          # paper 3: states s_{0:63}, 64 x 25 per sample
# Cosmos DV8x8x8 is causal in time: of a 17-frame block, grid 0 encodes frame 0, grid 1 frames
# 1-8, grid 2 frames 9-16. (first frame, end frame) of each grid, relative to its block.
GRID_FRAMES = ((0, 1), (1, 9), (9, 17))
HF_REPO_TOKENIZED = '1x-technologies/worldmodel'


def read_json(path):
    """A metadata file, or an error that names it (a truncated download is the usual cause)."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): the file is truncated or "
                         f"damaged; download or write it again") from None


def grid_frames(g):
    """Frames [first, end) of the sample that grid g (0..5) of a sample encodes."""
    first, end = GRID_FRAMES[g % GRIDS_PER_BLOCK]
    return FRAMES_PER_BLOCK * (g // GRIDS_PER_BLOCK) + first, FRAMES_PER_BLOCK * (g // GRIDS_PER_BLOCK) + end


def shard_files(i, video_ext='bin'):
    """(subfolder, file name) of each of the four files of shard i, in both 1X datasets (video_ext
    'bin' for the tokenized data, 'mp4' for the raw videos). Train splits keep each file in its
    subfolder, val splits keep them all flat in the split folder."""
    return dict(video=('videos', f'video_{i}.{video_ext}'), states=('robot_states', f'states_{i}.bin'),
                segment_idx=('segment_indices', f'segment_idx_{i}.bin'), metadata=('metadata', f'metadata_{i}.json'))


def repo_files(split, i, video_ext='bin'):
    """Paths in the Hugging Face dataset repo ('/'-separated) of shard i's four files: train splits
    nested, the others flat, as on disk (layout_path)."""
    nested = split.startswith('train')
    return {kind: f'{split}/{folder}/{name}' if nested else f'{split}/{name}'
            for kind, (folder, name) in shard_files(i, video_ext).items()}


def layout_path(split_dir, folder, name, nested):
    return os.path.join(split_dir, folder, name) if nested else os.path.join(split_dir, name)


def shard_paths(split_dir, i):
    """The four files of tokenized shard i, nested (train_v2.0) or flat (val_v2.0): try both."""
    files = shard_files(i)
    nested = os.path.exists(layout_path(split_dir, *files['video'], nested=True))
    paths = {kind: layout_path(split_dir, folder, name, nested) for kind, (folder, name) in files.items()}
    for kind, path in paths.items():
        if not os.path.exists(path):
            folder, name = files[kind]
            raise FileNotFoundError(f"missing shard file {path} (shard {i}, {kind}). Tried {split_dir}/{folder}/{name} "
                                    f"and {split_dir}/{name}. Download it with `python data.py download` "
                                    f"or pass shards= to read only the shards you have.")
    return paths


def _check_size(path, expected_bytes, what):
    size = os.path.getsize(path)
    if size != expected_bytes:
        raise ValueError(f"{path}: {size} bytes, but the shard metadata implies {expected_bytes} ({what}). "
                         f"The file is truncated or does not belong to this metadata; download it again.")


def check_finite_rows(path, array_ND, what, chunk=1 << 16):
    """Stop with the file, row (frame) and column of the first NaN or inf in array_ND (a memmap is
    read in chunks of rows: cheap next to a training run)."""
    for start in range(0, len(array_ND), chunk):
        ok_ND = np.isfinite(array_ND[start:start + chunk])
        if not ok_ND.all():
            row, col = (int(v) for v in np.argwhere(~ok_ND)[0])
            bad = float(array_ND[start + row, col])
            raise ValueError(f"{path}: {what} hold {bad} at row (frame) {start + row}, column {col}: the file is "
                             f"damaged or was written from bad data; fix or replace it (or leave out its shard).")


class TokenDataset(torch.utils.data.Dataset):
    """Samples of the 1X tokenized v2.0 data: 6 token grids (2 blocks) and 64 state rows.

    A sample starts at block k of a shard and covers frames 17k .. 17k+33; it is valid only if
    all those frames share one segment id (frames of different ids are not contiguous). stride 1
    starts a sample at every block (samples overlap by one block); stride 2 only at even blocks:
    non-overlapping samples, the paper's ~306k per epoch (2 x 306k blocks = 92% of the data). Returns
      tokens_GHW  int64 (6, 32, 32)   grids 0-2 are the context, 3-5 the future (paper 3)
      states_LD   float32 (64, 25)    the state_window frames ending at the sample's last frame.
    The paper does not say how 64 state rows align with 34 frames; we take the window that ends
    with the sample (30 frames of history + the 34 frames of the sample) and repeat the first row
    of the segment where the window would reach before the segment (or shard) start, so a window
    never mixes episodes. Shards are memory-mapped lazily, so DataLoader workers share nothing.
    Robot states are checked for NaN and inf when a shard is opened (an error names the file and
    the first bad row); tokens outside [0, vocab_size) are an error when a sample is read.
    """

    def __init__(self, split_dir, shards=None, vocab_size=VOCAB_SIZE, state_window=STATE_WINDOW, stride=1):
        meta_path = os.path.join(split_dir, 'metadata.json')
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: {split_dir} is not a 1X tokenized split folder "
                                    f"(expected e.g. .../train_v2.0 or .../val_v2.0 with metadata.json).")
        self.metadata = read_json(meta_path)
        assert stride in (1, 2), f"stride={stride}: 1 (a sample at every block) or 2 (non-overlapping samples)"
        assert state_window >= SAMPLE_FRAMES, f"state_window={state_window} must cover the {SAMPLE_FRAMES} sample frames"
        self.split_dir, self.vocab_size, self.state_window = split_dir, vocab_size, state_window
        self.shards = list(range(self.metadata['num_shards'])) if shards is None else list(shards)
        self.files, self.num_frames, index = {}, {}, []
        for i in self.shards:
            paths = shard_paths(split_dir, i)
            n = read_json(paths['metadata'])['shard_num_frames']
            blocks = math.ceil(n / FRAMES_PER_BLOCK)
            _check_size(paths['video'], expected_sizes(n)['video'],
                        f"int32 tokens ({blocks}, {GRIDS_PER_BLOCK}, {GRID_H}, {GRID_W}) for {n} frames")
            _check_size(paths['segment_idx'], n * 4, f"int32 segment id per frame, {n} frames")
            state_bytes = os.path.getsize(paths['states'])
            if state_bytes != n * STATE_DIM * 4:
                width = state_bytes / (n * 4)
                raise ValueError(f"{paths['states']}: {state_bytes} bytes = {n} frames x {width:g} float32, "
                                 f"but robot states must be {STATE_DIM} wide ({n * STATE_DIM * 4} bytes).")
            self.files[i], self.num_frames[i] = paths, n
            check_finite_rows(paths['states'], np.memmap(paths['states'], dtype=np.float32, mode='r').reshape(n, STATE_DIM),
                              'robot states')
            seg = np.fromfile(paths['segment_idx'], dtype=np.int32)
            # block k is a valid sample start if frames 17k .. 17k+33 exist and share one segment id
            for k in range(0, (n - SAMPLE_FRAMES) // FRAMES_PER_BLOCK + 1, stride):
                f0 = k * FRAMES_PER_BLOCK
                if seg[f0] == seg[f0 + SAMPLE_FRAMES - 1] and (seg[f0:f0 + SAMPLE_FRAMES] == seg[f0]).all():
                    index.append((i, k))
        self.index = np.array(index, dtype=np.int64).reshape(-1, 2)
        self._mmaps = {}
        if len(self.index) == 0:
            raise ValueError(f"{split_dir}: no window of {SAMPLE_FRAMES} frames lies inside one segment")

    def __len__(self):
        return len(self.index)

    def _open(self, i):
        if i not in self._mmaps:  # opened in the worker that first needs it
            p, n = self.files[i], self.num_frames[i]
            self._mmaps[i] = (
                np.memmap(p['video'], dtype=np.int32, mode='r').reshape(-1, GRIDS_PER_BLOCK, GRID_H, GRID_W),
                np.memmap(p['states'], dtype=np.float32, mode='r').reshape(n, STATE_DIM),
                np.memmap(p['segment_idx'], dtype=np.int32, mode='r'))
        return self._mmaps[i]

    def __getitem__(self, j):
        i, k = (int(v) for v in self.index[j])
        video, states, seg = self._open(i)
        tokens_GHW = np.asarray(video[k:k + SAMPLE_BLOCKS]).reshape(SAMPLE_GRIDS, GRID_H, GRID_W)
        lo, hi = int(tokens_GHW.min()), int(tokens_GHW.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"{self.files[i]['video']}: blocks {k}-{k + 1} hold token {lo if lo < 0 else hi}, "
                             f"outside the vocabulary [0, {self.vocab_size}). Wrong file, or set vocab_size.")
        last = k * FRAMES_PER_BLOCK + SAMPLE_FRAMES - 1
        first = last - self.state_window + 1
        seg_w = seg[max(first, 0):last + 1]
        start = max(first, 0) + int(np.nonzero(seg_w != seg_w[-1])[0].max() + 1 if (seg_w != seg_w[-1]).any() else 0)
        rows = np.clip(np.arange(first, last + 1), start, None)  # edge-pad before the segment start
        states_LD = np.asarray(states[rows], dtype=np.float32)
        return torch.from_numpy(tokens_GHW.astype(np.int64)), torch.from_numpy(states_LD)


# --- the synthetic world --------------------------------------------------------------------
# The robot looks around three places: at each grid it looks at one of them, uniformly at
# random (state dim 21 holds the place). A place it saw within the last 3 grids looks as it
# did then, with a fraction eps of the tokens replaced by uniform random ones; a place unseen
# for longer (or not yet in this segment) has changed completely: uniform random tokens. State
# dim 20 holds the lag: how many grids ago the place was last seen (1, 2 or 3), or 0 when it is
# new. A future grid g (at least 3 grids into its segment, as every future grid of a sample is)
# is new with probability p_new = (2/3)^3 = 8/27 (its place is none of 3 independent uniform
# draws), so the teacher-forced Bayes-optimal predictive is known exactly: for a copy, the
# copied token with probability q = 1 - eps + eps/V and every other token eps/V; for a new
# place, uniform. A model that ignores the states can at best mix over the three places
# (different places hold independent tokens). (A spatial world, e.g. grids rolled by a
# state-given offset, needs far more than a 5-minute CPU run to learn relative positions from
# absolute 32 x 32 embeddings; this one exercises the causal temporal attention and the states.)
SYNTHETIC_PLACES = 3
SYNTHETIC_P_NEW = 8 / 27        # derived above
LAG_DIM, PLACE_DIM = 20, 21


def write_shard(out_dir, i, tokens_BGHW, states_FD, segment_F, nested):
    """Write one shard in the 1X layout: nested (train) or flat (val)."""
    paths = {kind: layout_path(out_dir, folder, name, nested) for kind, (folder, name) in shard_files(i).items()}
    for p in paths.values():
        os.makedirs(os.path.dirname(p), exist_ok=True)
    np.ascontiguousarray(tokens_BGHW, dtype=np.int32).tofile(paths['video'])
    np.ascontiguousarray(states_FD, dtype=np.float32).tofile(paths['states'])
    np.ascontiguousarray(segment_F, dtype=np.int32).tofile(paths['segment_idx'])
    with open(paths['metadata'], 'w') as f:
        json.dump({'shard_num_frames': int(len(segment_F)), 'shard_ind': i}, f)


def synthetic_shard(rng, num_frames, vocab, eps, seg_id0=0, min_seg=40, max_seg=400):
    """Tokens (ceil(F/17), 3, 32, 32), states (F, 25), segment ids (F,) of one synthetic shard."""
    seg_len = []
    while sum(seg_len) < num_frames:
        seg_len.append(int(rng.integers(min_seg, max_seg + 1)))
    segment_F = np.repeat(np.arange(len(seg_len)) + seg_id0, seg_len)[:num_frames].astype(np.int32)
    blocks = math.ceil(num_frames / FRAMES_PER_BLOCK)
    n_grids = blocks * GRIDS_PER_BLOCK
    states_FD = rng.standard_normal((num_frames, STATE_DIM)).astype(np.float32)
    tokens_GHW = np.empty((n_grids, GRID_H, GRID_W), dtype=np.int32)
    prev_seg, places = None, []  # places: the place of each grid so far in the current segment
    for g in range(n_grids):
        b, j = divmod(g, GRIDS_PER_BLOCK)
        f0, f1 = FRAMES_PER_BLOCK * b + GRID_FRAMES[j][0], min(FRAMES_PER_BLOCK * b + GRID_FRAMES[j][1], num_frames)
        segs = set(segment_F[f0:f1].tolist())
        seg = segs.pop() if len(segs) == 1 and f1 > f0 else None  # None: straddles a boundary or the shard end
        if seg is None or seg != prev_seg:
            places = []
        prev_seg = seg
        place = int(rng.integers(SYNTHETIC_PLACES))
        lag = next((k for k in (1, 2, 3) if len(places) >= k and places[-k] == place), 0)
        places.append(place)
        states_FD[f0:f1, LAG_DIM], states_FD[f0:f1, PLACE_DIM] = lag, place
        if lag == 0:
            tokens_GHW[g] = rng.integers(vocab, size=(GRID_H, GRID_W))
            continue
        grid = tokens_GHW[g - lag].copy()
        noise = rng.random((GRID_H, GRID_W)) < eps
        grid[noise] = rng.integers(vocab, size=int(noise.sum()))
        tokens_GHW[g] = grid
    return tokens_GHW.reshape(blocks, GRIDS_PER_BLOCK, GRID_H, GRID_W), states_FD, segment_F


def write_synthetic(out, seed=0, vocab=1000, eps=0.1, train_shards=2, train_frames=6800, val_frames=1700):
    """Write out/train_v2.0 (nested layout) and out/val_v2.0 (flat layout) and out/synthetic.json
    (the settings). Deterministic in the settings. Each split is written to SPLIT.partial and
    renamed into place whole, and synthetic.json comes last: a folder without it is unfinished,
    and is written again. A folder written with other settings is an error, never reused."""
    assert vocab > 500, f"vocab={vocab}: Top-500 CE needs more than 500 tokens"
    settings = dict(seed=seed, vocab=vocab, eps=eps, train_shards=train_shards, train_frames=train_frames,
                    val_frames=val_frames)
    if synthetic_is_written(out, settings):
        return read_json(os.path.join(out, 'synthetic.json'))['world']
    rng = np.random.default_rng(seed)
    world = dict(vocab=vocab, eps=eps, places=SYNTHETIC_PLACES, p_new=SYNTHETIC_P_NEW, seed=seed)
    seg_id0 = 0
    for split, n_shards, frames, nested in (('train_v2.0', train_shards, train_frames, True),
                                            ('val_v2.0', 1, val_frames, False)):
        split_dir = os.path.join(out, split)
        partial = split_dir + '.partial'
        shutil.rmtree(partial, ignore_errors=True)   # left by an interrupted run
        for i in range(n_shards):
            tokens, states, segment = synthetic_shard(rng, frames, vocab, eps, seg_id0)
            seg_id0 = int(segment.max()) + 1
            write_shard(partial, i, tokens, states, segment, nested)
        with open(os.path.join(partial, 'metadata.json'), 'w') as f:
            json.dump({'num_shards': n_shards, 'query': None, 'hz': 30, 'num_images': n_shards * frames,
                       'synthetic': world}, f)
        if os.path.exists(split_dir):   # an unfinished synthetic split: replaced (never a real one)
            shutil.rmtree(split_dir)
        os.replace(partial, split_dir)
    with open(os.path.join(out, 'synthetic.json.tmp'), 'w') as f:
        json.dump(dict(settings=settings, world=world), f)
    os.replace(os.path.join(out, 'synthetic.json.tmp'), os.path.join(out, 'synthetic.json'))
    return world


def settings_differ(saved, settings):
    """'key=on disk, asked for' for each setting that differs ('' when they agree)."""
    return '; '.join(f"{k}={saved.get(k)!r} on disk, {v!r} asked for" for k, v in settings.items()
                     if saved.get(k) != v)


def synthetic_is_written(out, settings, splits=('train_v2.0', 'val_v2.0')):
    """True if out holds a finished synthetic set of these settings; False if it holds none or an
    unfinished one (no synthetic.json, which is written last); an error if it holds one of other
    settings or real data. Both tracks' synthetic writers ask this first."""
    path = os.path.join(out, 'synthetic.json')
    if os.path.exists(path):
        saved = read_json(path)
        diffs = settings_differ(saved.get('settings', saved), settings)   # the raw set's file: the settings alone
        if diffs:
            raise SystemExit(f"{out} holds a synthetic set written with other settings ({diffs}): pass another "
                             f"folder, or delete {out} to write it again")
        return True
    for split in splits:
        meta = os.path.join(out, split, 'metadata.json')
        if os.path.exists(os.path.join(out, split)) and not (os.path.exists(meta) and 'synthetic' in read_json(meta)):
            raise SystemExit(f"{os.path.join(out, split)} exists and is not a synthetic split: refusing to write "
                             f"synthetic data over it; pass another folder")
    return False


def synthetic_floors(vocab, eps, p_new=SYNTHETIC_P_NEW, k=500, p_floor=None):
    """Closed-form teacher-forced Bayes CE per future token of the synthetic world (nats).

    A copied grid (probability 1 - p_new): q = 1 - eps + eps/V is the probability that a token
    is the copied one (a random replacement may draw it too); each of the other V - 1 tokens has
    probability eps/V.
      full CE   = -q log q - (1 - q) log(eps / V)
      Top-k CE  = keep the copied token and k - 1 of the equally likely others, renormalised over
                  them (the best any predictor can do under this metric: the kept set must hold
                  k tokens, and the loss on it is least for the true probabilities restricted to
                  it); a true token among the V - k dropped ones scores -log p_floor.
    A new place (probability p_new) is uniform: log V, and under Top-k: k/V of the tokens are
    kept at probability 1/k, the rest score -log p_floor.
    """
    p_floor = P_FLOOR if p_floor is None else p_floor
    q, r = 1 - eps + eps / vocab, eps / vocab
    copy_full = -q * math.log(q) - (1 - q) * math.log(r)
    z = q + (k - 1) * r
    kept = (k - 1) / (vocab - 1)  # chance that a non-copied true token is among the kept others
    copy_topk = -q * math.log(q / z) - (1 - q) * (kept * math.log(r / z) + (1 - kept) * math.log(p_floor))
    new_topk = k / vocab * math.log(k) - (1 - k / vocab) * math.log(p_floor)
    return dict(full=(1 - p_new) * copy_full + p_new * math.log(vocab),
                topk=(1 - p_new) * copy_topk + p_new * new_topk)


def synthetic_oracle_logits(tokens_BGHW, states_BLD, world, use_states=True):
    """Log-probabilities (B, 3, 32, 32, V) of the Bayes-optimal teacher-forced predictor of the
    future grids 3, 4, 5 of synthetic samples, given the true earlier grids. use_states=False
    gives the best predictor that does not see the states of the grid it predicts (it may know
    the places of the earlier grids: their tokens show them): each place with probability 1/3,
    a copy of the last grid that showed it within 3 grids, else new. Used for the floors in the
    results table."""
    V, eps = world['vocab'], world['eps']
    B, L = states_BLD.shape[:2]
    state = lambda g, dim: states_BLD[:, L - SAMPLE_FRAMES + grid_frames(g)[0], dim].round().long()
    probs = torch.zeros(B, SAMPLE_GRIDS // 2, GRID_H, GRID_W, V)
    for t, g in enumerate(range(SAMPLE_GRIDS // 2, SAMPLE_GRIDS)):
        if use_states:
            lag = state(g, LAG_DIM)
            w_B = {k: (lag == k).float() for k in (0, 1, 2, 3)}
        else:  # a place is last seen at lag k if grid g-k shows it and no later grid does
            seen = [state(g - k, PLACE_DIM) for k in (1, 2, 3)]
            w_B = {1: torch.full((B,), 1 / 3), 2: (seen[1] != seen[0]).float() / 3,
                   3: ((seen[2] != seen[0]) & (seen[2] != seen[1])).float() / 3}
            w_B[0] = 1 - w_B[1] - w_B[2] - w_B[3]
        probs[:, t] += (w_B[0] / V + (w_B[1] + w_B[2] + w_B[3]) * eps / V)[:, None, None, None]
        for lag in (1, 2, 3):
            src = tokens_BGHW[:, g - lag, :, :, None]
            probs[:, t].scatter_add_(-1, src, ((1 - eps) * w_B[lag])[:, None, None, None].expand(-1, GRID_H, GRID_W, 1))
    return probs.log()


def default_synthetic_dir():
    """data/synthetic next to this file, written on first use (the no-flag default of train_compression.py)."""
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'synthetic')
    if not synthetic_is_written(out, dict(seed=0, vocab=1000, eps=0.1, train_shards=2, train_frames=6800,
                                          val_frames=1700)):
        print(f"writing the synthetic dataset to {out} (first use)")
        write_synthetic(out)
    return out


def tokenized_split_problems(split_dir, shards=None):
    """What is missing or the wrong size in a tokenized split (the sizes follow from the metadata,
    so a partial download is recognised); [] when it is whole."""
    meta = os.path.join(split_dir, 'metadata.json')
    if not os.path.exists(meta):
        return [f"{meta} is missing"]
    problems = []
    for i in range(read_json(meta)['num_shards']) if shards is None else shards:
        try:
            paths = shard_paths(split_dir, i)
            n = read_json(paths['metadata'])['shard_num_frames']
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e).split('. ')[0])
            continue
        for kind, size in expected_sizes(n).items():
            if os.path.getsize(paths[kind]) != size:
                problems.append(f"{paths[kind]} has {os.path.getsize(paths[kind])} bytes, not {size}")
    return problems


def expected_sizes(num_frames):
    """Bytes of the binary files of a tokenized shard of num_frames frames."""
    blocks = math.ceil(num_frames / FRAMES_PER_BLOCK)
    return dict(video=blocks * GRIDS_PER_BLOCK * GRID_H * GRID_W * 4, states=num_frames * STATE_DIM * 4,
                segment_idx=num_frames * 4)


def hub_file(repo, repo_file, out, how_to_prepare, force=False):
    """One file of a Hugging Face dataset repo into out/repo_file, through the huggingface_hub cache
    (HF_HUB_CACHE: resumable, atomic per file), then hard-linked (or copied) into place atomically.
    Offline, stop with how_to_prepare: the commands that prepare the data on another machine."""
    from huggingface_hub import hf_hub_download
    try:
        cached = hf_hub_download(repo, repo_file, repo_type='dataset', force_download=force)
    except Exception as e:   # offline, no network, no such file, ... (huggingface_hub's errors vary by version)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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
    return hub_file(HF_REPO_TOKENIZED, repo_file, out, "    python data.py download --out DIR --split train_v2.0\n"
                    "    python data.py download --out DIR --split val_v2.0\n", force)


def download_tokenized(out, split='val_v2.0', shards=None, rank=0, world=1):
    """Fetch a split of 1x-technologies/worldmodel into out/split with huggingface_hub: its
    metadata, then the shards (shards=[0]: one train shard to try; None: all), shard i by rank
    i % world, so every rank of a run shares the work (out must be on storage they all see).
    Every file is checked against the size its metadata implies and fetched again once if it is
    wrong. Train splits keep files in subfolders, the others flat (the dataset's layout)."""
    meta = read_json(_fetch(f'{split}/metadata.json', out))
    for i in range(meta['num_shards']) if shards is None else shards:
        if i % world != rank:
            continue
        files = repo_files(split, i)
        n = read_json(_fetch(files['metadata'], out))['shard_num_frames']
        for kind, size in expected_sizes(n).items():
            path = os.path.join(out, files[kind])
            if os.path.exists(path) and os.path.getsize(path) == size:
                continue   # a resumed download: this file is whole
            if os.path.getsize(_fetch(files[kind], out)) != size:
                if os.path.getsize(_fetch(files[kind], out, force=True)) != size:
                    raise SystemExit(f"{path}: {os.path.getsize(path)} bytes after download, its metadata implies "
                                     f"{size}: the dataset on the Hub does not match its metadata")
    return os.path.join(out, split)


def finish_download(out, split, shards=None):
    """After every rank's share: the whole split must be there (else data_dir is not shared)."""
    problems = tokenized_split_problems(os.path.join(out, split), shards)
    if problems:
        raise SystemExit(f"{os.path.join(out, split)} is incomplete after the download: {'; '.join(problems[:3])}. "
                         f"A multi-node run needs data_dir on storage that every node sees.")


def cmd_synthetic(args):
    world = write_synthetic(args.out, seed=args.seed, vocab=args.vocab)   # reuses a finished set of these settings
    floors = synthetic_floors(world['vocab'], world['eps'], world['p_new'])
    print(f"wrote {args.out}/train_v2.0 and {args.out}/val_v2.0 (vocab {world['vocab']}, eps {world['eps']})")
    print(f"Bayes-optimal teacher-forced CE per future token: full {floors['full']:.4f}, Top-500 {floors['topk']:.4f} nats")


def cmd_download(args):
    shards = None if args.shards is None else [int(s) for s in args.shards.split(',')]
    split_dir = download_tokenized(args.out, args.split, shards)
    finish_download(args.out, args.split, shards)
    print(f"downloaded to {split_dir}")


# (end of section 1)

# ---------------------------------------------------------------------------------------------
# 2. Raw video data (sampling track)
# ---------------------------------------------------------------------------------------------

RAW_CLIP_LEN = 77       # a challenge clip: frames 0..76 at 30 Hz (paper 2, problem statement)
RAW_CONTEXT_LEN = 17    # frames 0..16 are given; frame 76 is predicted
RAW_HZ = 30             # states: one STATE_DIM row per frame, as in the tokenized data (section 1)
HF_REPO_RAW = '1x-technologies/worldmodel_raw_data'
TIME_STRIDE = 4         # paper 2, data pre-processing: downsample the 77 frames by four
CLIP_LEN = 21           # frames the model sees: Wan's VAE needs 4k + 1 frames
NUM_CONTEXT_FRAMES = 5  # clip frames 0..4 = raw frames 0, 4, 8, 12, 16
NUM_LATENTS = 6         # 1 + (21 - 1) / 4 Wan latent frames
NUM_CONTEXT_LATENTS = 2  # latent 0 = clip frame 0, latent 1 = clip frames 1..4: all context
TARGET_FRAME = RAW_CLIP_LEN - 1  # raw frame 76, clip frame 20, inside the last latent


def clip_frame_indices():
    """Raw frame index of each of the 21 clip frames: min(4 j, 76) for j = 0..20.

    77 frames at stride 4 give only 20 frames (0, 4, ..., 76), but Wan's VAE encodes 4k + 1
    frames (frame 0 alone, then chunks of 4). Our choice: repeat frame 76 as the 21st frame, so the
    target is the last clip frame, which the causal VAE puts in the last latent, and the context
    frames 0, 4, 8, 12, 16 fill exactly latents 0 and 1. States are downsampled the same way.
    """
    return [min(TIME_STRIDE * j, TARGET_FRAME) for j in range(CLIP_LEN)]


def _split_file(split_dir, folder, name):
    """train_v2.0_raw keeps files in subfolders, val_v2.0_raw keeps them flat: try both."""
    for path in (layout_path(split_dir, folder, name, True), layout_path(split_dir, folder, name, False)):
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{split_dir}: neither {folder}/{name} nor {name} exists; is this a "
                            f"1X raw split folder (train_v2.0_raw/ or val_v2.0_raw/)? "
                            f"`python data.py synthetic_raw --out DIR` writes a small one")


class RawShard:
    """One shard of the raw data: one long 30 Hz mp4 with a state row and a segment id per frame.

    Checked when opened: file sizes against the metadata, robot states for NaN and inf (the error
    names the file and the frame). Checked when decoded: a damaged mp4, and frames of another size
    than frame_size (None: any size), are errors that name the video."""

    def __init__(self, split_dir, shard, frame_size=None):
        paths = {kind: _split_file(split_dir, *file) for kind, file in shard_files(shard, 'mp4').items()}
        self.video_path, states_path, segment_path = paths['video'], paths['states'], paths['segment_idx']
        self.num_frames = read_json(paths['metadata'])['shard_num_frames']
        self.frame_size = frame_size
        for path, nbytes in ((states_path, self.num_frames * STATE_DIM * 4), (segment_path, self.num_frames * 4)):
            if os.path.getsize(path) != nbytes:
                raise ValueError(f"{path} has {os.path.getsize(path)} bytes, expected {nbytes} for "
                                 f"shard_num_frames={self.num_frames}; the file is truncated or from another shard")
        self.states_ND = np.memmap(states_path, dtype=np.float32, mode='r', shape=(self.num_frames, STATE_DIM))
        self.segment_N = np.memmap(segment_path, dtype=np.int32, mode='r', shape=(self.num_frames,))
        check_finite_rows(states_path, self.states_ND, 'robot states')

    def clip_starts(self, stride=RAW_CLIP_LEN):
        """Starts of the 77-frame windows whose frames all share one segment id (contiguous video)."""
        seg = np.asarray(self.segment_N)
        new_run = np.concatenate([[True], seg[1:] != seg[:-1]])
        run_start = np.maximum.accumulate(np.where(new_run, np.arange(len(seg)), 0))  # first frame of my run
        starts = []
        for s in range(0, len(seg) - RAW_CLIP_LEN + 1):
            if run_start[s + RAW_CLIP_LEN - 1] <= s and (not starts or s >= starts[-1] + stride):
                starts.append(s)
        return starts

    def _decode_from(self, start):
        """(frame index, uint8 [H, W, 3]) for every frame from `start` to the end of the video:
        seek to the keyframe before `start`, decode forward."""
        import av   # only the sampling track reads videos
        try:
            with av.open(self.video_path) as container:
                if not container.streams.video:
                    raise ValueError(f"{self.video_path} holds no video stream")
                stream = container.streams.video[0]
                stream.thread_type = 'AUTO'
                size = (stream.codec_context.height, stream.codec_context.width)
                if self.frame_size is not None and size != tuple(self.frame_size):
                    raise ValueError(f"{self.video_path}: frames are {size[0]}x{size[1]}, expected "
                                     f"{self.frame_size[0]}x{self.frame_size[1]} (the size the other shards, or the "
                                     f"model's training data, have); the file is from another dataset")
                fps, tb = stream.average_rate, stream.time_base
                t0 = stream.start_time or 0
                container.seek(t0 + int(start / fps / tb), stream=stream, backward=True)
                for frame in container.decode(stream):
                    idx = round((frame.pts - t0) * tb * fps)
                    if idx >= start:
                        yield idx, frame.to_ndarray(format='rgb24')
        except (av.FFmpegError, TypeError, ZeroDivisionError) as e:   # no rate or time base: not a video either
            raise ValueError(f"{self.video_path} cannot be decoded ({type(e).__name__}: {e}): the file is damaged "
                             f"or truncated; download or write it again") from None

    def read_frames(self, start, count):
        """Frames start .. start+count-1 as uint8 [count, H, W, 3]."""
        frames = []
        for idx, frame in self._decode_from(start):
            if idx >= start + count:
                break
            frames.append(frame)
        if len(frames) != count:
            raise ValueError(f"{self.video_path}: got {len(frames)} frames from frame {start}, expected {count}; "
                             f"the video is shorter than its metadata says (truncated download?)")
        return np.stack(frames)

    def read_clip(self, start):
        """The model's view of the window at `start`: frames uint8 [21, H, W, 3], states float32 [21, 25]."""
        idx = np.array(clip_frame_indices())
        frames_THWC = self.read_frames(start, RAW_CLIP_LEN)[idx]
        states_TD = np.array(self.states_ND[start + idx])
        return frames_THWC, states_TD

    def iter_clips(self, starts):
        """read_clip for each of the sorted `starts`, decoding the video front to back once (for
        pre-encoding: read_clip seeks and decodes 77 frames per clip, which overlapping clips repeat)."""
        idx = np.array(clip_frame_indices())
        pending, buf = list(starts), {}
        if not pending:
            return
        for n, frame in self._decode_from(pending[0]):
            if n < pending[0]:   # between two windows
                continue
            buf[n] = frame
            while pending and n == pending[0] + TARGET_FRAME:
                s = pending.pop(0)
                yield s, np.stack([buf[s + i] for i in idx]), np.array(self.states_ND[s + idx])
            if not pending:
                return
            buf = {k: v for k, v in buf.items() if k >= pending[0]}
        raise ValueError(f"{self.video_path}: the video ends before frame {pending[0] + TARGET_FRAME}; it is "
                         f"shorter than its metadata says (truncated download?)")


def raw_shards(split_dir):
    """Shard indices of a raw split, from its metadata.json."""
    path = os.path.join(split_dir, 'metadata.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} missing: point at a 1X raw split folder (train_v2.0_raw/ or val_v2.0_raw/)")
    num_shards = read_json(path)['num_shards']
    if os.path.exists(os.path.join(split_dir, 'metadata')):
        return [int(n[len('metadata_'):-len('.json')]) for n in sorted(os.listdir(os.path.join(split_dir, 'metadata')))
                if n.startswith('metadata_')][:num_shards]
    return list(range(num_shards))


class RawClips(torch.utils.data.Dataset):
    """All valid 77-frame windows of a raw split, `stride` frames apart at least. Item: dict with
    frames_THWC uint8 [21, H, W, 3] (clip frame 20 = raw frame 76 = the target), states_TD [21, 25]."""

    def __init__(self, split_dir, stride=RAW_CLIP_LEN, max_clips=None, frame_size=None):
        self.shards = {i: RawShard(split_dir, i, frame_size) for i in raw_shards(split_dir)}
        self.items = [(i, s) for i, shard in self.shards.items() for s in shard.clip_starts(stride)][:max_clips]
        assert self.items, f"{split_dir}: no 77-frame window lies inside one segment"

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        shard, start = self.items[k]
        frames_THWC, states_TD = self.shards[shard].read_clip(start)
        return dict(frames_THWC=torch.from_numpy(frames_THWC), states_TD=torch.from_numpy(states_TD),
                    shard=shard, start=start)


def frames_to_video(frames_BTHWC):
    """uint8 [B, T, H, W, 3] -> float [B, 3, T, H, W] in [-1, 1], the VAE's input convention."""
    return frames_BTHWC.permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def video_to_frames(video_BCTHW):
    """float [B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3], rounded as a saved image would be."""
    return ((video_BCTHW.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


class PixelCodec:
    """A deterministic stand-in for the Wan 2.2 VAE with its latent layout, for the CPU demo.

    A random-weight Wan VAE decodes noise, so PSNR through it means nothing. This codec keeps the
    layout the DiT sees (48 channels, 1 + (T - 1) / 4 latent frames; 4x spatial compression where
    Wan's is 16x): latent k = pixel_unshuffle by 4 of frame 4k. It is lossless on those keyframes, which
    include the target (clip frame 20 = latent 5); decode fills the frames in between by linear
    interpolation. Latents are pixels x 2 (exact in floating point), about unit variance as Wan's
    VAE normalises its latents, so flow matching's noise levels mean what they mean at full scale.
    It proves the pipeline, not the Wan VAE (full-scale runs use --vae=wan).
    """
    z_dim, spatial, temporal, scale = 48, 4, 4, 2.0

    def encode(self, video_BCTHW):
        B, C, T, H, W = video_BCTHW.shape
        assert C == 3 and (T - 1) % 4 == 0, f"video must be [B, 3, 4k+1, H, W], got {tuple(video_BCTHW.shape)}"
        assert H % 4 == 0 and W % 4 == 0, f"frame size {H}x{W} must be divisible by 4"
        keys_BCFHW = video_BCTHW[:, :, ::4]
        z = F.pixel_unshuffle(keys_BCFHW.transpose(1, 2).flatten(0, 1), 4)  # [B*F, 48, H/4, W/4]
        return z.unflatten(0, (B, -1)).transpose(1, 2) * self.scale

    def decode(self, z_BCFHW):
        B, C, Fz, h, w = z_BCFHW.shape
        assert C == 48, f"pixel-codec latents have 48 channels, got {C}"
        z_BCFHW = z_BCFHW / self.scale
        keys = F.pixel_shuffle(z_BCFHW.transpose(1, 2).flatten(0, 1), 4).unflatten(0, (B, Fz)).transpose(1, 2)
        if Fz == 1:
            return keys
        a = torch.arange(4, dtype=keys.dtype, device=keys.device).div(4).view(1, 1, 1, 4, 1, 1)  # weight of the next keyframe
        between = keys[:, :, :-1, None] * (1 - a) + keys[:, :, 1:, None] * a   # [B, 3, Fz-1, 4, H, W]
        return torch.cat([between.flatten(2, 3), keys[:, :, -1:]], dim=2)


# --- synthetic raw data: frames that depend on the states --------------------------------------

def _smooth_states(rng, n):
    """Smooth joint trajectories in [-1, 1]: a few slow sinusoids per joint (periods 2-8 s)."""
    t = np.arange(n)[:, None]
    states = np.zeros((n, STATE_DIM), np.float32)
    for _ in range(3):
        period = rng.uniform(60, 240, STATE_DIM)
        states += rng.uniform(0.2, 0.4, STATE_DIM) * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi, STATE_DIM))
    return np.clip(states, -1, 1)


def _texture(rng, size):
    """A colourful smooth texture, size x size x 3 uint8: random colour grid upsampled bicubically."""
    grid = torch.from_numpy(rng.uniform(30, 225, (1, 3, 6, 6)).astype(np.float32))
    tex = F.interpolate(grid, size=(size, size), mode='bicubic', align_corners=False)
    return tex[0].permute(1, 2, 0).clamp(0, 255).numpy()


# The synthetic world's look (sizes as fractions of the frame). Written into each split's metadata,
# so a split is always drawn again (synthetic_frame) with the look it was written with.
SYNTHETIC_LOOK = dict(
    pan=0.25,            # the texture is (1 + pan) x the frame: hip yaw and neck pitch pan the camera over it
    disc=[0.15, 0.25],   # arm disc radius, hand open .. closed (a list: it reads back from JSON the same)
    rim=1 / 16,          # a fixed rim around the picture, each side its own colour (render_synthetic_frame)
)
RIM_COLOURS = dict(left=(20, 20, 20), top=(20, 20, 20), right=(235, 235, 235), bottom=(120, 80, 40))


def render_synthetic_frame(texture_SSC, state_D, size, look=SYNTHETIC_LOOK):
    """One frame: a size x size window of the texture panned by hip yaw (state 0) and neck pitch
    (state 20), with a left-arm disc placed by left shoulder pitch and elbow pitch (states 6, 9)
    and a right-arm disc by states 13, 16, their radius growing with hand closure (21, 22), all
    inside a fixed rim. Why the rim: Wan's 3D RoPE tells a token only where the others are
    relative to it, so a DiT trained from scratch can tell where in the picture it is only from
    something fixed in the picture (a real robot camera always shows part of the robot; the
    pretrained Wan has learned its sense of place from millions of videos). Without the rim the
    demo's tiny model never learned to place the arm discs (README, sampling demo)."""
    span = texture_SSC.shape[0] - size
    x0 = int(round((state_D[0] + 1) / 2 * span))
    y0 = int(round((state_D[20] + 1) / 2 * span))
    frame = texture_SSC[y0:y0 + size, x0:x0 + size].copy()
    yy, xx = np.mgrid[0:size, 0:size]
    r_open, r_closed = look['disc']
    for joint_x, joint_y, hand, colour in ((6, 9, 21, (255, 140, 0)), (13, 16, 22, (40, 90, 255))):
        cx = size / 2 + size / 3 * state_D[joint_x]
        cy = size * 0.65 + size / 4 * state_D[joint_y]
        r = size * (r_open + (r_closed - r_open) * (state_D[hand] + 1) / 2)
        frame[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = colour
    b = int(round(size * look['rim']))
    if b:
        frame[:, :b], frame[:, -b:] = RIM_COLOURS['left'], RIM_COLOURS['right']
        frame[:b], frame[-b:] = RIM_COLOURS['top'], RIM_COLOURS['bottom']
    return frame.astype(np.uint8)


def synthetic_raw_world(num_shards, frames_per_shard, size, seed, look=SYNTHETIC_LOOK):
    """The synthetic world of a raw split, deterministic from `seed`: per shard its segment id per
    frame [N], its states [N, 25] and one texture per segment (what write_synthetic_raw renders,
    and what synthetic_frame renders again for other states). Segments are 100-400 frames long."""
    rng = np.random.default_rng(seed)
    segment_id, shards = 0, []
    for _ in range(num_shards):
        lengths = []
        while sum(lengths) < frames_per_shard:
            lengths.append(int(rng.integers(100, 400)))
        lengths[-1] -= sum(lengths) - frames_per_shard
        segment_N = np.concatenate([np.full(n, segment_id + k, np.int32) for k, n in enumerate(lengths)])
        segment_id += len(lengths)
        states_ND = np.concatenate([_smooth_states(rng, n) for n in lengths])
        textures = [_texture(rng, size + int(round(size * look['pan']))) for _ in lengths]
        shards.append((segment_N, states_ND, textures))
    return shards


def write_synthetic_raw(split_dir, num_shards=1, frames_per_shard=1200, size=64, seed=0, flat=False):
    """Write a raw split in the 1X layout (train: subfolders; flat=True: val's flat layout).

    Deterministic from `seed` (synthetic_raw_world). Each segment has its own texture, so the
    context frames are needed to know the scene and the states to know where the camera and arms go.
    Videos are libx264 at crf 0 in yuv444p, so decoding returns the rendered colours up to rounding.
    The split is written to SPLIT.partial and renamed into place whole: a killed write leaves no
    split that looks finished (SPLIT.partial is deleted by the next write).
    """
    import av   # only the sampling track writes videos
    assert size % 16 == 0, f"size={size}: use a multiple of 16 (VAE and patch strides)"
    final_dir = str(split_dir).rstrip('/')
    split_dir = final_dir + '.partial'
    shutil.rmtree(split_dir, ignore_errors=True)
    look = SYNTHETIC_LOOK
    for shard, (segment_N, states_ND, textures) in enumerate(synthetic_raw_world(num_shards, frames_per_shard,
                                                                                 size, seed, look)):
        paths = {kind: layout_path(split_dir, folder, name, not flat)
                 for kind, (folder, name) in shard_files(shard, 'mp4').items()}
        for path in paths.values():
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with av.open(paths['video'], 'w') as container:
            stream = container.add_stream('libx264', rate=RAW_HZ)
            stream.width = stream.height = size
            stream.pix_fmt = 'yuv444p'
            stream.options = {'crf': '0', 'preset': 'veryfast'}
            for n in range(frames_per_shard):
                tex = textures[segment_N[n] - segment_N[0]]
                frame = av.VideoFrame.from_ndarray(render_synthetic_frame(tex, states_ND[n], size, look),
                                                   format='rgb24')
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        states_ND.tofile(paths['states'])
        segment_N.tofile(paths['segment_idx'])
        with open(paths['metadata'], 'w') as f:
            json.dump({'shard_num_frames': frames_per_shard, 'shard_ind': shard}, f)
    with open(os.path.join(split_dir, 'metadata.json'), 'w') as f:
        json.dump({'num_shards': num_shards, 'query': None, 'hz': RAW_HZ,
                   'num_images': num_shards * frames_per_shard, 'synthetic': dict(seed=seed, size=size, look=look)},
                  f)
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(split_dir, final_dir)


SYNTHETIC_ARM_X = (6, 13)   # the joints the synthetic renderer reads for the x of the left and right arm discs


def arms_swing_across(states_TD, num_context=NUM_CONTEXT_FRAMES):
    """A hand-made future for the counterfactual test: after the context frames both arms swing,
    at an even pace, to the far side of where they were (joints SYNTHETIC_ARM_X to -0.8 x their
    sign), and every other joint holds its last context value: camera and body stand still."""
    s = np.array(states_TD, dtype=np.float32, copy=True)
    last = s[num_context - 1]
    future = np.repeat(last[None], len(s) - num_context, axis=0)
    ramp = np.linspace(0, 1, len(s) - num_context + 1)[1:, None]
    for j in SYNTHETIC_ARM_X:
        goal = -0.8 if last[j] >= 0 else 0.8
        future[:, j] = last[j] + (goal - last[j]) * ramp[:, 0]
    s[num_context:] = future
    return s


@functools.lru_cache(maxsize=4)
def _cached_world(num_shards, frames_per_shard, size, seed, look_json):
    return synthetic_raw_world(num_shards, frames_per_shard, size, seed, json.loads(look_json))


def synthetic_frame(split_dir, shard, frame, state_D):
    """The frame the synthetic world shows at `frame` of `shard` when the robot is in state state_D:
    the scene (that segment's texture) as recorded, the camera and arms where state_D puts them.
    With the recorded state it is the recorded frame (up to the video's rounding); with another
    state it is the true frame of a counterfactual future (sample.py scores predictions against it)."""
    meta = read_json(os.path.join(split_dir, 'metadata.json'))
    if 'look' not in meta.get('synthetic', {}):
        raise ValueError(f"{split_dir} is not a synthetic split of this version (its metadata.json has no "
                         f"'synthetic' look): only the synthetic world can be drawn for states other than the "
                         f"recorded ones")
    world = meta['synthetic']
    segment_N, _, textures = _cached_world(meta['num_shards'], meta['num_images'] // meta['num_shards'],
                                           world['size'], world['seed'], json.dumps(world['look'], sort_keys=True))[shard]
    return render_synthetic_frame(textures[segment_N[frame] - segment_N[0]], np.asarray(state_D, np.float32),
                                  world['size'], world['look'])


def write_synthetic_raw_set(out, train_shards=2, frames=1200, size=64, seed=0, val_frames=None):
    """out/train_v2.0_raw and out/val_v2.0_raw (one shard), then out/synthetic.json with the
    settings, last. A finished set of the same settings is kept; one of other settings is an error
    (never mixed or silently reused); a set without synthetic.json (an interrupted write) is written
    again; a folder holding real data is never written over."""
    settings = dict(train_shards=train_shards, frames=frames, val_frames=val_frames or frames, size=size, seed=seed,
                    look=SYNTHETIC_LOOK)
    if synthetic_is_written(out, settings, ('train_v2.0_raw', 'val_v2.0_raw')):
        return False
    for name in os.listdir(out) if os.path.isdir(out) else []:   # latents of an unfinished set: stale
        if name.startswith('latents_'):
            shutil.rmtree(os.path.join(out, name))
    write_synthetic_raw(os.path.join(out, 'train_v2.0_raw'), train_shards, frames, size, seed)
    write_synthetic_raw(os.path.join(out, 'val_v2.0_raw'), 1, val_frames or frames, size, seed + 1, flat=True)
    path = os.path.join(out, 'synthetic.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(settings, f)
    os.replace(path + '.tmp', path)
    return True


# --- latents on disk: encode once, train many steps ---------------------------------------------

def encode_raw_split(split_dir, out_dir, codec, stride=RAW_CLIP_LEN, batch_size=8, device='cpu',
                     dtype=torch.float32, rank=0, world=1):
    """Encode every clip of a raw split with `codec` (PixelCodec or wan_state.WanVAE) to
    out_dir/latents_{shard}.safetensors holding latents [N, 48, 6, h, w], states [N, 21, 25] and
    starts [N] (the raw frame each window starts at), and out_dir/encoding.json (the settings and
    the number of clips). Store bf16 for the Wan VAE, float32 for the lossless pixel codec.

    Safe to interrupt and to share: the shards are written to out_dir.partial, each file renamed
    into place whole; the settings go first to out_dir.partial/settings.json, so a rerun resumes
    at the first shard not written and refuses other settings (another stride, codec, frame size)
    instead of mixing them. With world > 1 process `rank` encodes shards rank, rank + world, ...
    and the master calls finish_encoding after all are done. A finished out_dir of the same
    settings is kept as it is; one of other settings is an error. Returns the number of clips
    (world == 1) or None. Latents that come out NaN or inf are an error naming the video."""
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
    for shard_id in shards[rank::world]:
        path = os.path.join(partial, f'latents_{shard_id}.safetensors')
        if os.path.exists(path):   # written whole by an interrupted run
            continue
        shard = RawShard(split_dir, shard_id, frame_size)
        starts = shard.clip_starts(stride)
        latents, states, batch = [], [], []
        for k, (_, frames_THWC, states_TD) in enumerate(tqdm(shard.iter_clips(starts), total=len(starts),
                                                              desc=f'encode {split_dir} shard {shard_id}')):
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
                   'states': torch.stack(states).contiguous() if states else torch.zeros(0, RAW_CLIP_LEN, STATE_DIM),
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


class LatentClips(torch.utils.data.Dataset):
    """Pre-encoded clips (encode_raw_split's files), read row by row without loading whole shards.
    Only a finished encoding (with encoding.json) is read."""

    def __init__(self, latent_dir):
        if not os.path.exists(os.path.join(latent_dir, 'encoding.json')):
            raise FileNotFoundError(f"{latent_dir}/encoding.json missing: not a finished encoding; run "
                                    f"`python data.py encode_raw` (pixel codec) or `python wan_state.py encode_raw` (Wan VAE); "
                                    f"both resume an interrupted one")
        self.encoding = read_json(os.path.join(latent_dir, 'encoding.json'))
        names = sorted(n for n in os.listdir(latent_dir) if n.startswith('latents_') and n.endswith('.safetensors'))
        self.files = [safe_open(os.path.join(latent_dir, n), framework='pt') for n in names]
        self.items = [(f, k) for f in self.files for k in range(f.get_slice('starts').get_shape()[0])]
        assert self.items, f"{latent_dir}: no clips"

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        f, row = self.items[k]
        return f.get_slice('latents')[row:row + 1][0].float(), f.get_slice('states')[row:row + 1][0]


def _fetch_raw(repo_file, out):
    """One file of the raw dataset into out/repo_file (hub_file); one placed by an earlier run is kept."""
    dst = os.path.join(out, repo_file)
    if os.path.exists(dst):   # placed whole by an earlier run
        return dst
    return hub_file(HF_REPO_RAW, repo_file, out, "    python data.py download_raw --out DIR --split train_v2.0_raw\n"
                    "    python data.py download_raw --out DIR --split val_v2.0_raw\n"
                    "    python wan_state.py encode_raw --stride=8 --split DIR/train_v2.0_raw "
                    "--out DIR/latents_wan/train_v2.0_raw\n")


def download_raw(out, split='val_v2.0_raw', rank=0, world=1):
    """Fetch a raw split of 1x-technologies/worldmodel_raw_data into out/split with huggingface_hub:
    the split's metadata.json, then shard i's four files by rank i % world (out must be on storage
    every rank sees). Each file is placed whole (atomic) and kept by a rerun; states and segment
    files are checked against the sizes their metadata implies."""
    meta = read_json(_fetch_raw(f'{split}/metadata.json', out))
    for i in range(meta['num_shards']):
        if i % world != rank:
            continue
        for f in repo_files(split, i, 'mp4').values():
            _fetch_raw(f, out)
        RawShard(os.path.join(out, split), i)   # sizes and finite states
    return os.path.join(out, split)


def raw_split_is_whole(split_dir):
    """True if a raw split holds its metadata.json and every shard's four files."""
    try:
        return all(os.path.exists(_split_file(split_dir, *f)) for i in raw_shards(split_dir)
                   for f in shard_files(i, 'mp4').values())
    except FileNotFoundError:
        return False


def cmd_synthetic_raw(args):
    written = write_synthetic_raw_set(args.out, args.train_shards, args.frames, args.size, args.seed)
    print(f"{'wrote' if written else 'kept (already written with these settings)'} {args.out}/train_v2.0_raw and "
          f"{args.out}/val_v2.0_raw ({args.size}x{args.size})")


def cmd_encode_raw(args):
    n = encode_raw_split(args.split, args.out, PixelCodec(), args.stride, args.batch_size, args.device)
    print(f"encoded {n} clips of {args.split} to {args.out}")


# (end of section 2)

# ---------------------------------------------------------------------------------------------
# 3. Command line
# ---------------------------------------------------------------------------------------------

def add_encode_arguments(p):
    """The arguments of an encode_raw command (this file's, with the pixel codec; wan_state.py's, with
    the Wan VAE)."""
    p.add_argument('--split', required=True, help='a raw split folder, e.g. data/1x/train_v2.0_raw')
    p.add_argument('--out', required=True, help='output folder for latents_{shard}.safetensors')
    p.add_argument('--stride', type=int, default=RAW_CLIP_LEN, help='frames between clip starts (77: no overlap)')
    p.add_argument('--batch_size', type=int, default=8)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')


def main(argv=None):
    """`python data.py <subcommand> ...`: each subcommand is one small block below; add yours beside."""
    import argparse
    parser = argparse.ArgumentParser(prog='data.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)

    # --- section 1: tokenized data (compression track) ---
    p = sub.add_parser('synthetic', help='write a synthetic tokenized dataset in the 1X v2.0 layout')
    p.add_argument('--out', required=True, help='output folder (gets train_v2.0/ and val_v2.0/)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--vocab', type=int, default=1000, help='tokens are drawn from [0, vocab)')
    p.set_defaults(run=lambda a: cmd_synthetic(a))
    p = sub.add_parser('download', help='fetch the tokenized 1X dataset with huggingface_hub')
    p.add_argument('--out', required=True, help='local folder for the dataset')
    p.add_argument('--split', default='val_v2.0', help='train_v2.0, val_v2.0 or test_v2.0')
    p.add_argument('--shards', default=None, help='comma-separated shard numbers (train), e.g. 0,1; default all')
    p.set_defaults(run=lambda a: cmd_download(a))

    # --- section 2: raw video data (sampling track) ---
    p = sub.add_parser('synthetic_raw', help='write synthetic raw clips (train_v2.0_raw/, val_v2.0_raw/) whose frames follow the states')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--size', type=int, default=64, help='frame size in pixels (the real data is 512)')
    p.add_argument('--train_shards', type=int, default=2)
    p.add_argument('--frames', type=int, default=1200, help='frames per shard (30 Hz)')
    p.add_argument('--seed', type=int, default=0)
    p.set_defaults(run=lambda a: cmd_synthetic_raw(a))
    p = sub.add_parser('encode_raw', help='encode every clip of a raw split to pixel-codec latents (the CPU demo\'s); '
                                          'the Wan VAE\'s: python wan_state.py encode_raw')
    add_encode_arguments(p)
    p.set_defaults(run=lambda a: cmd_encode_raw(a))
    p = sub.add_parser('download_raw', help='fetch a raw split of 1x-technologies/worldmodel_raw_data')
    p.add_argument('--out', required=True)
    p.add_argument('--split', default='val_v2.0_raw', help='train_v2.0_raw or val_v2.0_raw')
    p.set_defaults(run=lambda a: print(f"downloaded to {download_raw(a.out, a.split)}"))

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == '__main__':
    main()
