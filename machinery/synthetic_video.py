"""The sampling track's synthetic world: raw clips in the exact 1X layout (mp4, states, segments)
whose frames follow the robot's states, so the CPU demo has something to learn and sample.py
can score a prediction against the true frame of any other future.

    write_synthetic_raw_set(out)   train_v2.0_raw/ and val_v2.0_raw/: a textured world panned by the
                                   robot's head, with two arm discs placed by its joints
    synthetic_frame(split, ...)    any frame redrawn for other states: sample.py's counterfactual truth
"""
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data import NUM_CONTEXT_FRAMES, RAW_HZ, STATE_DIM, layout_path, read_json, shard_files, synthetic_is_written
from machinery import need, written


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
    Videos are libx264 at crf 0 in yuv444p, so decoding returns the rendered colours up to rounding;
    each shard's metadata keeps its video's sha256, which data.RawShard checks.
    The split is written to SPLIT.partial and renamed into place whole: a killed write leaves no
    split that looks finished (SPLIT.partial is deleted by the next write).
    """
    av = need('av', 'writing the synthetic mp4 videos')
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
        with written(paths['video']) as tmp, av.open(tmp, 'w', format='mp4') as container:
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
        for array, path in ((states_ND, paths['states']), (segment_N, paths['segment_idx'])):
            with written(path) as tmp:
                array.tofile(tmp)
        sha256 = hashlib.sha256(Path(paths['video']).read_bytes()).hexdigest()   # damage no decoder sees is found
        with written(paths['metadata']) as tmp, open(tmp, 'w') as f:
            json.dump({'shard_num_frames': frames_per_shard, 'shard_ind': shard, 'sha256': sha256}, f)
    with written(os.path.join(split_dir, 'metadata.json')) as tmp, open(tmp, 'w') as f:
        json.dump({'num_shards': num_shards, 'query': None, 'hz': RAW_HZ, 'num_images': num_shards * frames_per_shard,
                   'synthetic': dict(seed=seed, size=size, look=look)}, f)
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
    with written(os.path.join(out, 'synthetic.json')) as tmp, open(tmp, 'w') as f:   # last: the set is finished
        json.dump(settings, f)
    return True
