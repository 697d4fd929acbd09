"""nanoWM data: the 1X World Model Challenge v2.0 datasets, read exactly as published, and small
synthetic datasets written in the same layout. Facts: ../shared/1X-DATA.md.

Sections:
  1. tokenized data (compression track): reader, synthetic writer, download
  2. raw video data (sampling track): reader, synthetic writer, latent pre-encoding
  3. training setup shared by both tracks: distributed processes, the device's peak FLOP/s
  4. command line: `python data.py synthetic --out DIR`, ...
"""

import json
import math
import os

import av
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------
# 1. Tokenized data (compression track)
# ---------------------------------------------------------------------------------------------

# Facts of the 1X v2.0 tokenized data (../shared/1X-DATA.md). No 1X file states the vocabulary:
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


class TokenDataset(torch.utils.data.Dataset):
    """Samples of the 1X tokenized v2.0 data: 6 token grids (2 blocks) and 64 state rows.

    A sample starts at block k of a shard and covers frames 17k .. 17k+33; it is valid only if
    all those frames share one segment id (1X-DATA.md). Returns
      tokens_GHW  int64 (6, 32, 32)   grids 0-2 are the context, 3-5 the future (paper 3)
      states_LD   float32 (64, 25)    the state_window frames ending at the sample's last frame.
    The paper does not say how 64 state rows align with 34 frames; we take the window that ends
    with the sample (30 frames of history + the 34 frames of the sample) and repeat the first row
    of the segment where the window would reach before the segment (or shard) start, so a window
    never mixes episodes. Shards are memory-mapped lazily, so DataLoader workers share nothing.
    """

    def __init__(self, split_dir, shards=None, vocab_size=VOCAB_SIZE, state_window=STATE_WINDOW):
        meta_path = os.path.join(split_dir, 'metadata.json')
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: {split_dir} is not a 1X tokenized split folder "
                                    f"(expected e.g. .../train_v2.0 or .../val_v2.0 with metadata.json).")
        with open(meta_path) as f:
            self.metadata = json.load(f)
        assert state_window >= SAMPLE_FRAMES, f"state_window={state_window} must cover the {SAMPLE_FRAMES} sample frames"
        self.split_dir, self.vocab_size, self.state_window = split_dir, vocab_size, state_window
        self.shards = list(range(self.metadata['num_shards'])) if shards is None else list(shards)
        self.files, self.num_frames, index = {}, {}, []
        for i in self.shards:
            paths = shard_paths(split_dir, i)
            with open(paths['metadata']) as f:
                n = json.load(f)['shard_num_frames']
            blocks = math.ceil(n / FRAMES_PER_BLOCK)
            _check_size(paths['video'], blocks * GRIDS_PER_BLOCK * GRID_H * GRID_W * 4,
                        f"int32 tokens ({blocks}, {GRIDS_PER_BLOCK}, {GRID_H}, {GRID_W}) for {n} frames")
            _check_size(paths['segment_idx'], n * 4, f"int32 segment id per frame, {n} frames")
            state_bytes = os.path.getsize(paths['states'])
            if state_bytes != n * STATE_DIM * 4:
                width = state_bytes / (n * 4)
                raise ValueError(f"{paths['states']}: {state_bytes} bytes = {n} frames x {width:g} float32, "
                                 f"but robot states must be {STATE_DIM} wide ({n * STATE_DIM * 4} bytes).")
            self.files[i], self.num_frames[i] = paths, n
            seg = np.fromfile(paths['segment_idx'], dtype=np.int32)
            # block k is a valid sample start if frames 17k .. 17k+33 exist and share one segment id
            for k in range((n - SAMPLE_FRAMES) // FRAMES_PER_BLOCK + 1):
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
    """Write out/train_v2.0 (nested layout) and out/val_v2.0 (flat layout). Deterministic in seed."""
    assert vocab > 500, f"vocab={vocab}: Top-500 CE needs more than 500 tokens"
    rng = np.random.default_rng(seed)
    world = dict(vocab=vocab, eps=eps, places=SYNTHETIC_PLACES, p_new=SYNTHETIC_P_NEW, seed=seed)
    seg_id0 = 0
    for split, n_shards, frames, nested in (('train_v2.0', train_shards, train_frames, True),
                                            ('val_v2.0', 1, val_frames, False)):
        split_dir = os.path.join(out, split)
        for i in range(n_shards):
            tokens, states, segment = synthetic_shard(rng, frames, vocab, eps, seg_id0)
            seg_id0 = int(segment.max()) + 1
            write_shard(split_dir, i, tokens, states, segment, nested)
        with open(os.path.join(split_dir, 'metadata.json'), 'w') as f:
            json.dump({'num_shards': n_shards, 'query': None, 'hz': 30, 'num_images': n_shards * frames,
                       'synthetic': world}, f)
    return world


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
    from st_transformer import P_FLOOR
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
    if not os.path.exists(os.path.join(out, 'val_v2.0', 'metadata.json')):
        print(f"writing the synthetic dataset to {out} (first use)")
        write_synthetic(out)
    return out


def download_tokenized(out, split='val_v2.0', shards=None):
    """Fetch a split of 1x-technologies/worldmodel with huggingface_hub. shards=[0] fetches one
    train shard to try (allow_patterns), plus the split's metadata.json."""
    from huggingface_hub import snapshot_download
    if shards is None:
        patterns = [f'{split}/*', f'{split}/**']
    else:
        patterns = [f'{split}/metadata.json'] + [f'{split}/{p}' for i in shards for folder, name in shard_files(i).values()
                                                 for p in (f'{folder}/{name}', name)]   # nested or flat
    snapshot_download(HF_REPO_TOKENIZED, repo_type='dataset', local_dir=out, allow_patterns=patterns)
    return os.path.join(out, split)


def cmd_synthetic(args):
    world = write_synthetic(args.out, seed=args.seed, vocab=args.vocab)
    floors = synthetic_floors(world['vocab'], world['eps'], world['p_new'])
    print(f"wrote {args.out}/train_v2.0 and {args.out}/val_v2.0 (vocab {world['vocab']}, eps {world['eps']})")
    print(f"Bayes-optimal teacher-forced CE per future token: full {floors['full']:.4f}, Top-500 {floors['topk']:.4f} nats")


def cmd_download(args):
    shards = None if args.shards is None else [int(s) for s in args.shards.split(',')]
    print(f"downloaded to {download_tokenized(args.out, args.split, shards)}")


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
    """One shard of the raw data: one long 30 Hz mp4 with a state row and a segment id per frame."""

    def __init__(self, split_dir, shard):
        paths = {kind: _split_file(split_dir, *file) for kind, file in shard_files(shard, 'mp4').items()}
        self.video_path, states_path, segment_path = paths['video'], paths['states'], paths['segment_idx']
        with open(paths['metadata']) as f:
            self.num_frames = json.load(f)['shard_num_frames']
        for path, nbytes in ((states_path, self.num_frames * STATE_DIM * 4), (segment_path, self.num_frames * 4)):
            if os.path.getsize(path) != nbytes:
                raise ValueError(f"{path} has {os.path.getsize(path)} bytes, expected {nbytes} for "
                                 f"shard_num_frames={self.num_frames}; the file is truncated or from another shard")
        self.states_ND = np.memmap(states_path, dtype=np.float32, mode='r', shape=(self.num_frames, STATE_DIM))
        self.segment_N = np.memmap(segment_path, dtype=np.int32, mode='r', shape=(self.num_frames,))

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
        with av.open(self.video_path) as container:
            stream = container.streams.video[0]
            stream.thread_type = 'AUTO'
            fps, tb = stream.average_rate, stream.time_base
            t0 = stream.start_time or 0
            container.seek(t0 + int(start / fps / tb), stream=stream, backward=True)
            for frame in container.decode(stream):
                idx = round((frame.pts - t0) * tb * fps)
                if idx >= start:
                    yield idx, frame.to_ndarray(format='rgb24')

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
    with open(path) as f:
        num_shards = json.load(f)['num_shards']
    if os.path.exists(os.path.join(split_dir, 'metadata')):
        return [int(n[len('metadata_'):-len('.json')]) for n in sorted(os.listdir(os.path.join(split_dir, 'metadata')))
                if n.startswith('metadata_')][:num_shards]
    return list(range(num_shards))


class RawClips(torch.utils.data.Dataset):
    """All valid 77-frame windows of a raw split, `stride` frames apart at least. Item: dict with
    frames_THWC uint8 [21, H, W, 3] (clip frame 20 = raw frame 76 = the target), states_TD [21, 25]."""

    def __init__(self, split_dir, stride=RAW_CLIP_LEN, max_clips=None):
        self.shards = {i: RawShard(split_dir, i) for i in raw_shards(split_dir)}
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
        a = torch.arange(4, dtype=keys.dtype).div(4).view(1, 1, 1, 4, 1, 1)  # weight of the next keyframe
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


def render_synthetic_frame(texture_SSC, state_D, size):
    """One frame: a size x size window of the texture panned by hip yaw (state 0) and neck pitch
    (state 20), with a left-arm disc placed by left shoulder pitch and elbow pitch (states 6, 9)
    and a right-arm disc by states 13, 16, their radius growing with hand closure (21, 22)."""
    span = texture_SSC.shape[0] - size
    x0 = int(round((state_D[0] + 1) / 2 * span))
    y0 = int(round((state_D[20] + 1) / 2 * span))
    frame = texture_SSC[y0:y0 + size, x0:x0 + size].copy()
    yy, xx = np.mgrid[0:size, 0:size]
    for joint_x, joint_y, hand, colour in ((6, 9, 21, (255, 140, 0)), (13, 16, 22, (40, 90, 255))):
        cx = size / 2 + size / 3 * state_D[joint_x]
        cy = size * 0.65 + size / 4 * state_D[joint_y]
        r = size * (0.08 + 0.06 * (state_D[hand] + 1) / 2)
        frame[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = colour
    return frame.astype(np.uint8)


def write_synthetic_raw(split_dir, num_shards=1, frames_per_shard=1200, size=64, seed=0, flat=False):
    """Write a raw split in the 1X layout (train: subfolders; flat=True: val's flat layout).

    Deterministic from `seed`. Each segment (100-400 frames) has its own texture, so the context
    frames are needed to know the scene and the states to know where the camera and arms go.
    Videos are libx264 at crf 0 in yuv444p, so decoding returns the rendered colours up to rounding.
    """
    assert size % 16 == 0, f"size={size}: use a multiple of 16 (VAE and patch strides)"
    rng = np.random.default_rng(seed)
    segment_id = 0
    for shard in range(num_shards):
        paths = {kind: layout_path(split_dir, folder, name, not flat)
                 for kind, (folder, name) in shard_files(shard, 'mp4').items()}
        for path in paths.values():
            os.makedirs(os.path.dirname(path), exist_ok=True)
        lengths = []
        while sum(lengths) < frames_per_shard:
            lengths.append(int(rng.integers(100, 400)))
        lengths[-1] -= sum(lengths) - frames_per_shard
        segment_N = np.concatenate([np.full(n, segment_id + k, np.int32) for k, n in enumerate(lengths)])
        segment_id += len(lengths)
        states_ND = np.concatenate([_smooth_states(rng, n) for n in lengths])
        textures = [_texture(rng, size * 3 // 2) for _ in lengths]
        with av.open(paths['video'], 'w') as container:
            stream = container.add_stream('libx264', rate=RAW_HZ)
            stream.width = stream.height = size
            stream.pix_fmt = 'yuv444p'
            stream.options = {'crf': '0', 'preset': 'veryfast'}
            for n in range(frames_per_shard):
                tex = textures[segment_N[n] - segment_N[0]]
                frame = av.VideoFrame.from_ndarray(render_synthetic_frame(tex, states_ND[n], size), format='rgb24')
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        states_ND.tofile(paths['states'])
        segment_N.tofile(paths['segment_idx'])
        with open(paths['metadata'], 'w') as f:
            json.dump({'shard_num_frames': frames_per_shard, 'shard_ind': shard}, f)
    with open(os.path.join(split_dir, 'metadata.json'), 'w') as f:
        json.dump({'num_shards': num_shards, 'query': None, 'hz': RAW_HZ,
                   'num_images': num_shards * frames_per_shard}, f)


# --- latents on disk: encode once, train many steps ---------------------------------------------

def encode_raw_split(split_dir, out_dir, codec, stride=RAW_CLIP_LEN, batch_size=8, device='cpu',
                     dtype=torch.float32):
    """Encode every clip of a raw split with `codec` (PixelCodec or wan_state.WanVAE) to
    out_dir/latents_{shard}.safetensors holding latents [N, 48, 6, h, w], states [N, 21, 25] and
    starts [N] (the raw frame each window starts at), and out_dir/encoding.json (codec, stride,
    clips). Store bf16 for the Wan VAE, float32 for the lossless pixel codec. Returns the number
    of clips. The shards are written to out_dir.partial, each file renamed into place whole, and
    the folder renamed to out_dir at the end: an interrupted run leaves no out_dir that looks
    finished, and running it again resumes at the first shard it had not written."""
    out_dir = str(out_dir).rstrip('/')
    assert not os.path.exists(out_dir), f"{out_dir} exists: delete it to encode again"
    partial = out_dir + '.partial'
    os.makedirs(partial, exist_ok=True)
    total = 0
    for shard_id in raw_shards(split_dir):
        path = os.path.join(partial, f'latents_{shard_id}.safetensors')
        if os.path.exists(path):   # written whole by an interrupted run
            with safe_open(path, framework='pt') as f:
                total += f.get_slice('starts').get_shape()[0]
            continue
        shard = RawShard(split_dir, shard_id)
        starts = shard.clip_starts(stride)
        latents, states, batch = [], [], []
        for k, (_, frames_THWC, states_TD) in enumerate(tqdm(shard.iter_clips(starts), total=len(starts),
                                                              desc=f'encode {split_dir} shard {shard_id}')):
            batch.append(torch.from_numpy(frames_THWC))
            states.append(torch.from_numpy(states_TD))
            if len(batch) == batch_size or k == len(starts) - 1:
                with torch.no_grad():
                    latents.append(codec.encode(frames_to_video(torch.stack(batch)).to(device)).to('cpu', dtype))
                batch = []
        if starts:
            save_file({'latents': torch.cat(latents).contiguous(), 'states': torch.stack(states).contiguous(),
                       'starts': torch.tensor(starts, dtype=torch.int64)}, path + '.tmp')
            os.replace(path + '.tmp', path)
        total += len(starts)
    with open(os.path.join(partial, 'encoding.json'), 'w') as f:
        json.dump(dict(codec=type(codec).__name__, stride=stride, clips=total, split=str(split_dir)), f)
    os.replace(partial, out_dir)
    return total


class LatentClips(torch.utils.data.Dataset):
    """Pre-encoded clips (encode_raw_split's files), read row by row without loading whole shards."""

    def __init__(self, latent_dir):
        names = sorted(n for n in os.listdir(latent_dir) if n.startswith('latents_') and n.endswith('.safetensors'))
        assert names, f"{latent_dir}: no latents_*.safetensors; run `python data.py encode_raw` first"
        self.files = [safe_open(os.path.join(latent_dir, n), framework='pt') for n in names]
        self.items = [(f, k) for f in self.files for k in range(f.get_slice('states').get_shape()[0])]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        f, row = self.items[k]
        return f.get_slice('latents')[row:row + 1][0].float(), f.get_slice('states')[row:row + 1][0]


def download_raw(out, split='val_v2.0_raw'):
    """Fetch a raw split of 1x-technologies/worldmodel_raw_data with huggingface_hub."""
    from huggingface_hub import snapshot_download
    snapshot_download(HF_REPO_RAW, repo_type='dataset', local_dir=out, allow_patterns=[f'{split}/*', f'{split}/**'])
    return os.path.join(out, split)


def cmd_synthetic_raw(args):
    write_synthetic_raw(os.path.join(args.out, 'train_v2.0_raw'), args.train_shards, args.frames, args.size, args.seed)
    write_synthetic_raw(os.path.join(args.out, 'val_v2.0_raw'), 1, args.frames, args.size, args.seed + 1, flat=True)
    print(f"wrote {args.out}/train_v2.0_raw and {args.out}/val_v2.0_raw ({args.size}x{args.size})")


def cmd_encode_raw(args):
    if args.vae == 'pixel':
        codec, dtype = PixelCodec(), torch.float32
    else:
        from wan_state import WanVAE  # fp32 VAE: encoding runs once, so spend the precision
        codec, dtype = WanVAE.from_pretrained(args.vae_path, device=args.device), torch.bfloat16
    n = encode_raw_split(args.split, args.out, codec, args.stride, args.batch_size, args.device, dtype)
    print(f"encoded {n} clips of {args.split} to {args.out}")


# (end of section 2)

# ---------------------------------------------------------------------------------------------
# 3. Training setup shared by both tracks: distributed processes, the device's peak
# ---------------------------------------------------------------------------------------------

def setup_distributed(device):
    """DDP when launched by torchrun (RANK set), as nanoGPT: NCCL on GPUs, gloo on the CPU, and
    each process on the GPU of its LOCAL_RANK. Returns (ddp, rank, world_size, device)."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 1, device
    import torch.distributed as dist
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        device = f'cuda:{int(os.environ["LOCAL_RANK"])}'
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


# Dense bf16 peak FLOP/s (vendor datasheets, without sparsity), for MFU; the first name that
# occurs in torch.cuda.get_device_name() wins, so the PCIe H100 comes before the SXM one.
PEAK_BF16_FLOPS = (('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12),
                   ('B200', 2250e12), ('A100', 312e12))


def peak_flops(device):
    """The device's dense bf16 peak FLOP/s, or None (the CPU, an unlisted GPU: no MFU)."""
    if not str(device).startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


# ---------------------------------------------------------------------------------------------
# 4. Command line
# ---------------------------------------------------------------------------------------------

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
    p = sub.add_parser('encode_raw', help='encode every clip of a raw split to latents (safetensors) for training')
    p.add_argument('--split', required=True, help='a raw split folder, e.g. data/1x/train_v2.0_raw')
    p.add_argument('--out', required=True, help='output folder for latents_{shard}.safetensors')
    p.add_argument('--vae', default='pixel', choices=['pixel', 'wan'], help='pixel: the CPU-demo codec; wan: Wan 2.2 VAE')
    p.add_argument('--vae_path', default='Wan-AI/Wan2.2-TI2V-5B-Diffusers', help='hub repo id or local folder of the Wan VAE')
    p.add_argument('--stride', type=int, default=RAW_CLIP_LEN, help='frames between clip starts (77: no overlap)')
    p.add_argument('--batch_size', type=int, default=8)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.set_defaults(run=lambda a: cmd_encode_raw(a))
    p = sub.add_parser('download_raw', help='fetch a raw split of 1x-technologies/worldmodel_raw_data')
    p.add_argument('--out', required=True)
    p.add_argument('--split', default='val_v2.0_raw', help='train_v2.0_raw or val_v2.0_raw')
    p.set_defaults(run=lambda a: print(f"downloaded to {download_raw(a.out, a.split)}"))

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == '__main__':
    main()
