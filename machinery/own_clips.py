"""A folder of a user's own robot clips -> the raw 1X layout the sampling track trains on.

    python -m machinery.prepare own_clips --clips my_clips/ --out data/mine [--val 1] [--size 512]
    python train_sampling.py --data_dir=data/mine ...

The folder holds pairs NAME.mp4 + NAME.npy: a video and its robot states, one row of 25 values per
video frame (the 1X layout, data.STATE_DIM: 21 joint angles, left and right hand closure from 0
open to 1 closed, linear and angular velocity). Every pair is checked before anything is
written: a missing partner, a states array of another width or with NaN, a video whose frames
are not size x size, or a video with another number of frames than its states, stops with a
message naming the file and what is expected.

Output, as the 1X raw data and data.RawShard read it: out/train_v2.0_raw/ (files in subfolders)
and out/val_v2.0_raw/ (flat; the last `val` videos by name), one shard per video: video_{i}.mp4
(re-encoded with libx264 at 30 Hz), states_{i}.bin (float32 [frames, 25]), segment_idx_{i}.bin
(int32, one segment: a video is one contiguous recording), metadata_{i}.json (its frame count, source
file and the sha256 of video_{i}.mp4, which data.RawShard checks), and metadata.json. A split is
written to SPLIT.partial and renamed into place whole.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from data import RAW_CLIP_LEN, RAW_HZ, STATE_DIM, check_finite_rows, layout_path, shard_files
from machinery import need, written

SPLITS = ('train_v2.0_raw', 'val_v2.0_raw')


def find_pairs(clips_dir):
    """[(NAME.mp4, NAME.npy)] sorted by name; every video needs its states and every states file its video."""
    clips_dir = Path(clips_dir)
    if not clips_dir.is_dir():
        raise ValueError(f"{clips_dir}: not a folder; pass --clips with the folder of NAME.mp4 + NAME.npy pairs")
    videos = {p.stem: p for p in clips_dir.iterdir() if p.suffix.lower() == '.mp4'}
    states = {p.stem: p for p in clips_dir.iterdir() if p.suffix.lower() == '.npy'}
    if not videos and not states:
        raise ValueError(f"{clips_dir}: no .mp4 videos and no .npy states in it")
    lonely = [f"{videos[n].name} has no {n}.npy" for n in sorted(set(videos) - set(states))] + \
             [f"{states[n].name} has no {n}.mp4" for n in sorted(set(states) - set(videos))]
    if lonely:
        raise ValueError(f"{clips_dir}: {'; '.join(lonely[:5])}: each video needs its states array of the same name")
    return [(videos[n], states[n]) for n in sorted(videos)]


def read_states(path):
    """float32 [frames, 25] from NAME.npy, or an error that names the file and the expected shape."""
    try:
        states_ND = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a numpy array file ({err})") from None
    if states_ND.ndim != 2 or states_ND.shape[1] != STATE_DIM:
        raise ValueError(f"{path}: states of shape {states_ND.shape}, expected (frames, {STATE_DIM}): one row of "
                         f"{STATE_DIM} values per video frame, in the 1X order (21 joint angles, left and right "
                         f"hand closure, linear and angular velocity)")
    if not np.issubdtype(states_ND.dtype, np.number) or np.iscomplexobj(states_ND):
        raise ValueError(f"{path}: states of dtype {states_ND.dtype}, expected real numbers (float32)")
    states_ND = states_ND.astype(np.float32)
    check_finite_rows(path, states_ND, 'robot states')
    return states_ND


def video_header(path):
    """(height, width, frame count or 0 when the container does not say, frames per second)."""
    av = need('av', 'reading your mp4 videos')
    try:
        with av.open(str(path)) as container:
            if not container.streams.video or container.streams.video[0].codec_context is None:
                raise ValueError(f"{path} holds no video stream FFmpeg can decode")
            stream = container.streams.video[0]
            return (stream.codec_context.height, stream.codec_context.width, stream.frames,
                    float(stream.average_rate or 0))
    except av.FFmpegError as err:
        raise ValueError(f"{path} cannot be opened as a video ({err})") from None


def check_pair(video, states_path, size):
    """The states of a pair, after every check that needs no decoding."""
    states_ND = read_states(states_path)
    height, width, frames, fps = video_header(video)
    if (height, width) != (size, size):
        raise ValueError(f"{video}: frames are {height}x{width} (height x width), expected {size}x{size} (--size; the "
                         f"1X data and the paper's model use 512x512): crop or scale the clips first, e.g. "
                         f"ffmpeg -i IN.mp4 -vf \"crop='min(iw,ih)':'min(iw,ih)',scale={size}:{size}\" OUT.mp4")
    if frames and frames != len(states_ND):
        raise ValueError(f"{video} has {frames} frames but {states_path} {len(states_ND)} state rows: one row per "
                         f"frame is needed")
    if len(states_ND) < RAW_CLIP_LEN:
        raise ValueError(f"{states_path}: {len(states_ND)} frames; a training clip needs {RAW_CLIP_LEN} "
                         f"({RAW_CLIP_LEN / RAW_HZ:.1f} s at {RAW_HZ} Hz)")
    if fps and abs(fps - RAW_HZ) > 0.01:
        print(f"note: {video} runs at {fps:g} frames/s; the 1X data is {RAW_HZ} Hz, so a {RAW_CLIP_LEN}-frame clip "
              f"spans {RAW_CLIP_LEN / fps:.1f} s here (its frames are kept, one state row each)")
    return states_ND


def write_shard(split_dir, shard, video, states_ND, nested, crf):
    """Re-encode `video` as shard `shard` of a raw split, with its states, one segment and its metadata."""
    av = need('av', 'writing the raw mp4 videos')
    paths = {kind: layout_path(split_dir, folder, name, nested)
             for kind, (folder, name) in shard_files(shard, 'mp4').items()}
    for path in paths.values():
        os.makedirs(os.path.dirname(path), exist_ok=True)
    n = 0
    with av.open(str(video)) as src, written(paths['video']) as tmp, av.open(tmp, 'w', format='mp4') as dst:
        out = dst.add_stream('libx264', rate=RAW_HZ)
        out.width, out.height = src.streams.video[0].codec_context.width, src.streams.video[0].codec_context.height
        out.pix_fmt = 'yuv444p'   # no chroma subsampling: the colours the VAE sees stay the recorded ones
        out.options = {'crf': str(crf), 'preset': 'veryfast'}
        try:
            for frame in src.decode(video=0):
                rgb = av.VideoFrame.from_ndarray(frame.to_ndarray(format='rgb24'), format='rgb24')
                dst.mux(out.encode(rgb))
                n += 1
        except av.FFmpegError as err:
            raise ValueError(f"{video} cannot be decoded after frame {n} ({err}): the file is damaged") from None
        dst.mux(out.encode())
    if n != len(states_ND):
        raise ValueError(f"{video} has {n} frames but its states {len(states_ND)} rows: one row per frame is needed")
    for array, path in ((states_ND, paths['states']), (np.full(n, shard, dtype=np.int32), paths['segment_idx'])):
        with written(path) as tmp:
            array.tofile(tmp)
    sha256 = hashlib.sha256(Path(paths['video']).read_bytes()).hexdigest()   # data.RawShard checks it
    with written(paths['metadata']) as tmp, open(tmp, 'w') as f:
        json.dump({'shard_num_frames': n, 'shard_ind': shard, 'source': Path(video).name, 'sha256': sha256}, f)
    return n


def convert(clips_dir, out, val=1, size=512, crf=18):
    """Write out/train_v2.0_raw and out/val_v2.0_raw from the pairs in clips_dir (module docstring).
    Returns {split: [source video names]}."""
    from tqdm import tqdm
    pairs = find_pairs(clips_dir)
    if not 1 <= val < len(pairs):
        raise ValueError(f"--val={val}: the validation split takes the last `val` videos and training needs at least "
                         f"one; {clips_dir} has {len(pairs)} video(s)")
    for split in SPLITS:
        if os.path.exists(os.path.join(out, split)):
            raise ValueError(f"{os.path.join(out, split)} exists: pass another --out, or delete it to convert again")
    states = [check_pair(video, states_path, size) for video, states_path in pairs]   # all checked before writing
    parts = {'train_v2.0_raw': list(range(len(pairs) - val)), 'val_v2.0_raw': list(range(len(pairs) - val, len(pairs)))}
    for split, members in parts.items():
        split_dir = os.path.join(out, split + '.partial')
        shutil.rmtree(split_dir, ignore_errors=True)
        frames = 0
        for shard, k in enumerate(tqdm(members, desc=split, unit='video')):
            frames += write_shard(split_dir, shard, pairs[k][0], states[k], split.startswith('train'), crf)
        with written(os.path.join(split_dir, 'metadata.json')) as tmp, open(tmp, 'w') as f:
            json.dump({'num_shards': len(members), 'query': None, 'hz': RAW_HZ, 'num_images': frames}, f)
    for split in SPLITS:   # both splits whole, or neither in place
        os.replace(os.path.join(out, split + '.partial'), os.path.join(out, split))
    return {split: [pairs[k][0].name for k in members] for split, members in parts.items()}


def add_arguments(parser):
    parser.add_argument('--clips', required=True, help='folder of NAME.mp4 videos and NAME.npy states (frames x 25)')
    parser.add_argument('--out', required=True, help='output folder: gets train_v2.0_raw/ and val_v2.0_raw/')
    parser.add_argument('--val', type=int, default=1,
                        help='the last this many videos (by name) form the val split (default: %(default)s)')
    parser.add_argument('--size', type=int, default=512,
                        help='the frame size every video must have, in pixels (default: %(default)s)')
    parser.add_argument('--crf', type=int, default=18,
                        help='libx264 quality of the re-encoded videos, 0 lossless (default: %(default)s)')


def main(argv=None):
    """Convert a folder of own clips (module docstring); errors stop with their message."""
    import argparse
    parser = argparse.ArgumentParser(prog='python -m machinery.prepare own_clips', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))


def run(args):
    """The command (`python -m machinery.prepare own_clips` and `python -m machinery.own_clips`): convert, then say what was written."""
    try:
        written = convert(args.clips, args.out, val=args.val, size=args.size, crf=args.crf)
    except ValueError as err:
        raise SystemExit(str(err))
    for split, names in written.items():
        print(f"{os.path.join(args.out, split)}: {len(names)} video(s): {', '.join(names[:5])}"
              + (' ...' if len(names) > 5 else ''))
    print(f"train on it: python train_sampling.py --data_dir={args.out}")


if __name__ == '__main__':
    main()
