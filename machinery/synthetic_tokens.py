"""The compression track's synthetic world: small tokenized sets in the exact 1X layout, whose
Bayes floor under the Top-500 CE is known in closed form, so every command runs on a CPU and the
tests know the right answer: write_synthetic (train_v2.0/ and val_v2.0/ of a world of three
places), synthetic_floors (its Bayes floor, closed form; synthetic_oracle_logits: per sample),
default_synthetic_dir (data/synthetic, the no-flag default of train_compression.py).
"""
import json
import math
import os
import shutil

import numpy as np
import torch

from data import (FRAMES_PER_BLOCK, GRID_FRAMES, GRID_H, GRID_W, GRIDS_PER_BLOCK, SAMPLE_FRAMES, SAMPLE_GRIDS,
                  STATE_DIM, grid_frames, layout_path, read_json, shard_files, synthetic_is_written)
from machinery import written
from metrics import P_FLOOR

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
    with written(os.path.join(out, 'synthetic.json')) as tmp, open(tmp, 'w') as f:   # last: the set is whole
        json.dump(dict(settings=settings, world=world), f)
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
    """data/synthetic in the repository, written on first use (the no-flag default of train_compression.py)."""
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'synthetic')
    if not os.path.exists(os.path.join(out, 'synthetic.json')):   # written last: a finished set has it
        print(f"writing the synthetic dataset to {out} (first use)")
    write_synthetic(out)   # a finished set of these settings is reused; one of other settings stops the run
    return out
