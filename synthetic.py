"""The synthetic worlds: small datasets in the exact layout of the 1X data, so that every
command runs on a CPU and the tests know the right answer.

    write_synthetic(out)           tokenized: a world of three places whose Bayes floor under the
                                   Top-500 CE is known in closed form (synthetic_floors)
    write_synthetic_raw_set(out)   raw video: a textured world panned by the robot's head, with two
                                   arm discs placed by its joints (synthetic_frame redraws any frame
                                   for other states: the counterfactual truth of sample.py)
"""
import functools
import json
import math
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F

from data import (FRAMES_PER_BLOCK, GRID_FRAMES, GRID_H, GRID_W, GRIDS_PER_BLOCK, NUM_CONTEXT_FRAMES, SAMPLE_FRAMES,
                  RAW_HZ, SAMPLE_GRIDS, STATE_DIM, layout_path, read_json, settings_differ, grid_frames, shard_files)
from metrics import P_FLOOR


# ---------------------------------------------------------------------------------------------
# Tokenized (compression track): three places, a known Bayes floor
# ---------------------------------------------------------------------------------------------

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
    if vocab <= 500:
        raise ValueError(f"vocab={vocab}: Top-500 CE needs more than 500 tokens")
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


# ---------------------------------------------------------------------------------------------
# Raw video (sampling track): frames that depend on the states
# ---------------------------------------------------------------------------------------------

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
    if size % 16 != 0:
        raise ValueError(f"size={size}: use a multiple of 16 (VAE and patch strides)")
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
# every joint the renderer reads for the arm discs: x, y of the left and right disc, then the hand closures
SYNTHETIC_ARM_JOINTS = (6, 9, 13, 16, 21, 22)


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
    again (with the encodings of it); a folder holding real data, or latents of other data, is never
    written over or beside."""
    settings = dict(train_shards=train_shards, frames=frames, val_frames=val_frames or frames, size=size, seed=seed,
                    look=SYNTHETIC_LOOK)
    splits = ('train_v2.0_raw', 'val_v2.0_raw')
    if synthetic_is_written(out, settings, splits):
        return False
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        encodings = [os.path.join(out, name, s + end) for s in splits for end in ('', '.partial')]
        for encoded in filter(os.path.exists, encodings if name.startswith('latents_') else []):
            split = os.path.basename(encoded).removesuffix('.partial')
            if not os.path.exists(os.path.join(out, split)):   # encoded from data no longer here: not ours
                raise SystemExit(f"{encoded} holds an encoding of other {split} data: refusing to write synthetic "
                                 f"clips beside it (a run would train on those latents); pass another folder")
            shutil.rmtree(encoded)   # encoded from the unfinished synthetic split written again below
    write_synthetic_raw(os.path.join(out, 'train_v2.0_raw'), train_shards, frames, size, seed)
    write_synthetic_raw(os.path.join(out, 'val_v2.0_raw'), 1, val_frames or frames, size, seed + 1, flat=True)
    path = os.path.join(out, 'synthetic.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(settings, f)
    os.replace(path + '.tmp', path)
    return True
