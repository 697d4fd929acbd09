"""nanoWM data: the 1X World Model Challenge v2.0 datasets, read exactly as published, and the
order in which both trainers draw their batches.

    TokenDataset(split_dir)    compression track: 6 token grids + 64 state rows per sample
    RawShard(split_dir, shard) sampling track: one shard's mp4, states and segment ids
    RawClips(split_dir)        sampling track: 21 frames (raw 0, 4, ..., 76, 76) + states per clip
    LatentClips(latent_dir)    the same clips pre-encoded (machinery/latents.py)
    batch_positions, batch_rows a process's micro-batch: its rows of the step's global batch, the
                               same under any world size

Bad files and bad arguments are ValueError (FileNotFoundError for a missing file) with a message
that names the file and the problem. Writing data (downloads, synthetic sets, encoding) is
machinery's job (machinery/prepare.py).
"""
import collections
import functools
import hashlib
import itertools
import json
import math
import os

import numpy as np
import torch

# --- Layout of the 1X datasets ----------------------------------------------------------------

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
# The published splits' metadata.json (num_images, num_shards): what a disk estimate assumes before a
# split is on disk. The raw videos are the same recordings (train_v2.0_raw, val_v2.0_raw).
SPLITS_1X = {'train_v2.0': dict(num_images=11_254_161, num_shards=100), 'val_v2.0': dict(num_images=50_300, num_shards=1)}


def read_json(path, counts=()):
    """A metadata file, or an error that names it (a truncated download is the usual cause).
    counts: keys that must hold a count (an int >= 0), e.g. 'num_shards', 'shard_num_frames'."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:   # not JSON (JSONDecodeError), or not text (UnicodeDecodeError)
        raise ValueError(f"{path} is not valid JSON ({e}): the file is truncated or damaged; download or write "
                         f"it again") from None
    for key in counts:
        value = meta.get(key) if isinstance(meta, dict) else None
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise ValueError(f"{path} has no count {key!r} (got {value!r}): it is not a 1X metadata file, or "
                             f"damaged; download or write it again")
    return meta


def check_shards(shards, num_shards, meta_path):
    """Shards asked for (None: all) must each exist (0 .. num_shards - 1 by the split's metadata.json) and be
    named once."""
    if shards is not None and (len(set(shards)) != len(shards) or not all(0 <= i < num_shards for i in shards)):
        raise ValueError(f"shards {shards}: {meta_path} lists {num_shards} shards, 0-{num_shards - 1}; name each "
                         f"at most once")


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


def shard_paths(split_dir, i, video_ext='bin'):
    """The four files of shard i (tokenized: video_ext 'bin', raw: 'mp4'), nested (train splits) or
    flat (val splits) as its video is: both are tried."""
    files = shard_files(i, video_ext)
    nested = os.path.exists(layout_path(split_dir, *files['video'], nested=True))
    paths = {kind: layout_path(split_dir, folder, name, nested) for kind, (folder, name) in files.items()}
    for kind, path in paths.items():
        if not os.path.exists(path):
            folder, name = files[kind]
            fix = ("Download it with `python -m machinery.prepare download` or pass --shards to read only the shards "
                   "you have" if video_ext == 'bin' else "Is this a 1X raw split folder (train_v2.0_raw/ or "
                   "val_v2.0_raw/)? `python -m machinery.prepare synthetic_raw --out DIR` writes a small one")
            raise FileNotFoundError(f"missing shard file {path} (shard {i}, {kind}). Tried {split_dir}/{folder}/{name} "
                                    f"and {split_dir}/{name}. {fix}.")
    return paths


def expected_sizes(num_frames):
    """Bytes of the binary files of a tokenized shard of num_frames frames."""
    blocks = math.ceil(num_frames / FRAMES_PER_BLOCK)
    return dict(video=blocks * GRIDS_PER_BLOCK * GRID_H * GRID_W * 4, states=num_frames * STATE_DIM * 4,
                segment_idx=num_frames * 4)


def _check_size(path, expected_bytes, what):
    size = os.path.getsize(path)
    if size != expected_bytes:
        raise ValueError(f"{path}: {size} bytes, but the shard metadata implies {expected_bytes} ({what}). "
                         f"The file is truncated or does not belong to this metadata; download or write it again.")


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


# --- Tokenized data (compression track) -------------------------------------------------------

class TokenDataset(torch.utils.data.Dataset):
    """Samples of the 1X tokenized v2.0 data: 6 token grids (2 blocks) and 64 state rows.

    A sample starts at block k of a shard and covers frames 17k .. 17k+33, all of one segment id
    (frames of different ids are not contiguous). stride 1 starts a sample at every block; stride
    2 only at even blocks: non-overlapping samples, the paper's ~306k per epoch. Returns
      tokens_GHW  int64 (6, 32, 32)   grids 0-2 are the context, 3-5 the future (paper 3)
      states_LD   float32 (64, 25)    the state_window frames ending at the sample's last frame.
    The paper does not say how 64 state rows align with 34 frames; we take the window that ends
    with the sample (st_transformer.grid_frame_pool uses only its last 34 rows) and repeat the
    segment's first row where the window would reach before it, so a window never mixes episodes.
    Shards are memory-mapped lazily, so DataLoader workers share nothing. Robot states are checked
    for NaN and inf when a shard is opened, tokens outside [0, vocab_size) when a sample is read.
    """

    def __init__(self, split_dir, shards=None, vocab_size=VOCAB_SIZE, state_window=STATE_WINDOW, stride=1):
        meta_path = os.path.join(split_dir, 'metadata.json')
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: {split_dir} is not a 1X tokenized split folder "
                                    f"(expected e.g. .../train_v2.0 or .../val_v2.0 with metadata.json).")
        self.metadata = read_json(meta_path, counts=('num_shards',))
        if stride not in (1, 2):
            raise ValueError(f"stride={stride}: 1 (a sample at every block) or 2 (non-overlapping samples)")
        if state_window < SAMPLE_FRAMES:
            raise ValueError(f"state_window={state_window} must cover the {SAMPLE_FRAMES} sample frames")
        self.split_dir, self.vocab_size, self.state_window = split_dir, vocab_size, state_window
        self.shards = list(range(self.metadata['num_shards'])) if shards is None else list(shards)
        check_shards(self.shards, self.metadata['num_shards'], meta_path)
        self.files, self.num_frames, index = {}, {}, []
        for i in self.shards:
            paths = shard_paths(split_dir, i)
            n = read_json(paths['metadata'], counts=('shard_num_frames',))['shard_num_frames']
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
            run = np.concatenate([[0], np.cumsum(seg[1:] != seg[:-1])])   # frames of one run share a segment id
            # block k is a valid sample start if frames 17k .. 17k+33 exist and lie in one run
            f0 = np.arange(0, (n - SAMPLE_FRAMES) // FRAMES_PER_BLOCK + 1, stride) * FRAMES_PER_BLOCK
            index += [(i, int(f) // FRAMES_PER_BLOCK) for f in f0[run[f0] == run[f0 + SAMPLE_FRAMES - 1]]]
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

    def check_tokens(self, chunk=1 << 22):
        """Every token in [0, vocab_size), read in chunks (__getitem__ checks a sample when read;
        this finds a bad file at start, not at the first validation). Stops with the file and block."""
        for i in self.shards:
            blocks = np.memmap(self.files[i]['video'], dtype=np.int32, mode='r').reshape(-1, GRIDS_PER_BLOCK * GRID_H * GRID_W)
            rows = max(1, chunk // blocks.shape[1])
            for b in range(0, len(blocks), rows):
                self._check_vocab(i, np.asarray(blocks[b:b + rows]), b)

    def _check_vocab(self, i, tokens_BN, first_block):
        """Stop at the first of the blocks (first_block, ...) of shard i that holds a token outside the vocabulary."""
        bad_BN = (tokens_BN < 0) | (tokens_BN >= self.vocab_size)
        if bad_BN.any():
            row = int(bad_BN.any(1).nonzero()[0][0])
            raise ValueError(f"{self.files[i]['video']}: block {first_block + row} holds token "
                             f"{int(tokens_BN[row][bad_BN[row]][0])}, outside the vocabulary [0, {self.vocab_size}). "
                             f"Wrong file, or set vocab_size.")

    def __getitem__(self, j):
        i, k = (int(v) for v in self.index[j])
        video, states, seg = self._open(i)
        tokens_GHW = np.asarray(video[k:k + SAMPLE_BLOCKS]).reshape(SAMPLE_GRIDS, GRID_H, GRID_W)
        self._check_vocab(i, tokens_GHW.reshape(SAMPLE_BLOCKS, -1), k)
        last = k * FRAMES_PER_BLOCK + SAMPLE_FRAMES - 1
        first = last - self.state_window + 1
        seg_w = seg[max(first, 0):last + 1]
        start = max(first, 0) + int(np.nonzero(seg_w != seg_w[-1])[0].max() + 1 if (seg_w != seg_w[-1]).any() else 0)
        rows = np.clip(np.arange(first, last + 1), start, None)  # edge-pad before the segment start
        states_LD = np.asarray(states[rows], dtype=np.float32)
        return torch.from_numpy(tokens_GHW.astype(np.int64)), torch.from_numpy(states_LD)


# --- Raw video data (sampling track) ----------------------------------------------------------

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
REDO_RAW = "delete it and fetch it again (--download); for a synthetic or own-clips split write the split again"


def clip_frame_indices():
    """Raw frame index of each of the 21 clip frames: min(4 j, 76) for j = 0..20. 77 frames at
    stride 4 give only 20 frames (0, 4, ..., 76), but Wan's VAE encodes 4k + 1 frames (frame 0
    alone, then chunks of 4). Our choice: repeat frame 76 as the 21st frame, so the target is the
    last clip frame, which the causal VAE puts in the last latent, and the context frames 0, 4, 8,
    12, 16 fill exactly latents 0 and 1. States are downsampled the same way."""
    return [min(TIME_STRIDE * j, TARGET_FRAME) for j in range(CLIP_LEN)]


class RawShard:
    """One shard of the raw data: one long 30 Hz mp4 with a state row and a segment id per frame.
    Checked when opened: sizes, states for NaN and inf, the video's sha256 if its metadata has one (nanoWM's
    writers; 1X's have none). When decoded: frames damaged (as the decoder sees) or lost, or not frame_size."""

    def __init__(self, split_dir, shard, frame_size=None):
        paths = shard_paths(split_dir, shard, 'mp4')
        self.video_path, states_path, segment_path = paths['video'], paths['states'], paths['segment_idx']
        meta = read_json(paths['metadata'], counts=('shard_num_frames',))
        self.num_frames, self.frame_size = meta['shard_num_frames'], frame_size
        with open(self.video_path, 'rb') as f:   # the sets nanoWM writes keep a sha256: damage no decoder sees
            if 'sha256' in meta and hashlib.sha256(f.read()).hexdigest() != meta['sha256']:
                raise ValueError(f"{self.video_path}: not the bytes its metadata's sha256 names: {REDO_RAW}")
        sizes = expected_sizes(self.num_frames)
        _check_size(states_path, sizes['states'], f"float32 states ({self.num_frames}, {STATE_DIM})")
        _check_size(segment_path, sizes['segment_idx'], f"int32 segment id per frame, {self.num_frames} frames")
        self.states_ND = np.memmap(states_path, dtype=np.float32, mode='r', shape=(self.num_frames, STATE_DIM))
        self.segment_N = np.memmap(segment_path, dtype=np.int32, mode='r', shape=(self.num_frames,))
        check_finite_rows(states_path, self.states_ND, 'robot states')

    def clip_starts(self, stride=RAW_CLIP_LEN):
        """Starts of the 77-frame windows whose frames all share one segment id (contiguous video)."""
        seg = np.asarray(self.segment_N)
        run = np.concatenate([[0], np.cumsum(seg[1:] != seg[:-1])])   # frames of one run share a segment id
        last, starts = run[RAW_CLIP_LEN - 1:], []   # the run of each window's last frame
        for s in np.flatnonzero(run[:len(last)] == last):
            if not starts or s >= starts[-1] + stride:
                starts.append(int(s))
        return starts

    def _decode_from(self, start):
        """(frame index, uint8 [H, W, 3]) for every frame from `start` to the end of the video:
        seek to the keyframe before `start`, decode forward."""
        from machinery import need   # only the sampling track reads videos
        av = need('av', 'reading the raw mp4 videos')
        try:
            with av.open(self.video_path) as container:
                if not container.streams.video or container.streams.video[0].codec_context is None:
                    raise ValueError(f"{self.video_path} holds no video stream FFmpeg can decode: {REDO_RAW}")
                stream = container.streams.video[0]
                stream.thread_type = 'AUTO'
                size = (stream.codec_context.height, stream.codec_context.width)
                if self.frame_size is not None and size != tuple(self.frame_size):
                    raise ValueError(f"{self.video_path}: frames are {size[0]}x{size[1]}, expected "
                                     f"{self.frame_size[0]}x{self.frame_size[1]} (the size the other shards, or the "
                                     f"model's training data, have); the file is from another dataset")
                fps, tb = stream.average_rate, stream.time_base
                t0, want = stream.start_time or 0, start   # want: the frame that must come next
                container.seek(t0 + int(max(start - 16, 0) / fps / tb), stream=stream, backward=True)
                for frame in container.decode(stream):
                    idx = round((frame.pts - t0) * tb * fps)
                    if idx >= start and (frame.is_corrupt or idx != want):   # damage the decoder saw, a lost frame
                        raise ValueError(f"{self.video_path}: frame {want} is damaged or lost: {REDO_RAW}")
                    if idx >= start:
                        want += 1
                        yield idx, frame.to_ndarray(format='rgb24')
        except (av.FFmpegError, TypeError, ZeroDivisionError) as e:   # no rate or time base: not a video either
            raise ValueError(f"{self.video_path} cannot be decoded ({type(e).__name__}: {e}): the file is damaged "
                             f"or truncated: {REDO_RAW}") from None

    def read_frames(self, start, count):
        """Frames start .. start+count-1 as uint8 [count, H, W, 3]."""
        frames = [frame for _, frame in itertools.takewhile(lambda f: f[0] < start + count, self._decode_from(start))]
        if len(frames) != count:
            raise ValueError(f"{self.video_path}: got {len(frames)} frames from frame {start}, expected {count}; "
                             f"the video is shorter than its metadata says (truncated download?)")
        return np.stack(frames)

    def clip_states(self, start):
        """The states float32 [21, 25] the model sees of the window at `start` (no video decoded)."""
        return np.array(self.states_ND[start + np.array(clip_frame_indices())])

    def read_clip(self, start):
        """The model's view of the window at `start`: frames uint8 [21, H, W, 3], states float32 [21, 25]."""
        return self.read_frames(start, RAW_CLIP_LEN)[np.array(clip_frame_indices())], self.clip_states(start)

    def iter_clips(self, starts):
        """read_clip for each of the sorted `starts`, decoding the video front to back once (for
        pre-encoding: read_clip seeks and decodes 77 frames per clip, which overlapping clips repeat)."""
        idx, pending = np.array(clip_frame_indices()), list(starts)
        window = collections.deque(maxlen=RAW_CLIP_LEN)   # the last 77 frames: frames n - 76 .. n
        for n, frame in self._decode_from(pending[0]) if pending else ():
            window.append(frame)
            while pending and n == pending[0] + TARGET_FRAME:   # the window holds the clip of pending[0]
                s = pending.pop(0)
                yield s, np.stack([window[i] for i in idx]), self.clip_states(s)
            if not pending:
                return
        if pending:
            raise ValueError(f"{self.video_path}: the video ends before frame {pending[0] + TARGET_FRAME}; it "
                             f"is shorter than its metadata says (truncated download?)")


def raw_shards(split_dir):
    """Shard indices of a raw split, from its metadata.json."""
    path = os.path.join(split_dir, 'metadata.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} missing: point at a 1X raw split folder (train_v2.0_raw/ or val_v2.0_raw/)")
    num_shards = read_json(path, counts=('num_shards',))['num_shards']
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
        if not self.items:
            raise ValueError(f"{split_dir}: no 77-frame window lies inside one segment")

    def __len__(self):
        return len(self.items)

    def check(self):
        """Decode every clip once: a damaged, truncated or resized video is found now (an error
        naming it), not at the first validation."""
        for shard, start in self.items:
            self.shards[shard].read_frames(start, RAW_CLIP_LEN)

    def states(self, k):
        """states_TD [21, 25] of clip k alone (no video decoded)."""
        shard, start = self.items[k]
        return torch.from_numpy(self.shards[shard].clip_states(start))

    def __getitem__(self, k):
        shard, start = self.items[k]
        frames_THWC, states_TD = self.shards[shard].read_clip(start)
        return dict(frames_THWC=torch.from_numpy(frames_THWC), states_TD=torch.from_numpy(states_TD),
                    shard=shard, start=start)


# --- The batch order of both trainers ---------------------------------------------------------

def batch_positions(micro, rank, world_size, batch_size):
    """Positions in a step's global batch of the micro-batch that process `rank` takes at
    micro-step `micro`: the global batch is cut into micro-batches of batch_size, micro-step by
    micro-step, rank by rank."""
    first = (micro * world_size + rank) * batch_size
    return range(first, first + batch_size)


def batch_rows(seed, step, positions, global_batch_size, n):
    """Dataset rows of positions `positions` of step `step`'s global batch. The run's k-th sample
    (k = step * global_batch_size + position: every sample of every step) is row order[k mod n]
    of epoch k // n, order a permutation seeded by (seed, epoch). So the data of a step depends
    only on (seed, step), never on the number of processes or on a resume."""
    rows = []
    for pos in positions:
        epoch, k = divmod(step * global_batch_size + pos, n)
        rows.append(int(_epoch_order(seed, epoch, n)[k]))
    return rows


@functools.lru_cache(maxsize=2)
def _epoch_order(seed, epoch, n):
    """One epoch's permutation of the rows (made once: 1.4M rows at full scale)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(hash((seed, epoch)) % 2 ** 62))
