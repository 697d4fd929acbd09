"""Prepare the data on its own, one subcommand per job (the trainers call the same functions):

    python -m machinery.prepare download --out data/1x --split train_v2.0        # tokenized (compression)
    python -m machinery.prepare download_raw --out data/1x --split val_v2.0_raw  # raw videos (sampling)
    python -m machinery.prepare encode_raw --codec=wan --split data/1x/train_v2.0_raw --out data/1x/latents_wan/train_v2.0_raw --stride 8
    python -m machinery.prepare synthetic --out data/synthetic                   # small sets in the same layout
    python -m machinery.prepare synthetic_raw --out data/raw_demo
    python -m machinery.prepare own_clips --clips my_clips/ --out data/mine      # NAME.mp4 + NAME.npy pairs
"""
import argparse
import functools

import torch

from data import RAW_CLIP_LEN
from machinery import latents, own_clips, synthetic_tokens, synthetic_video, tokenized


def cmd_synthetic(args):
    world = synthetic_tokens.write_synthetic(args.out, seed=args.seed, vocab=args.vocab)   # reuses a finished set of these settings
    floors = synthetic_tokens.synthetic_floors(world['vocab'], world['eps'], world['p_new'])
    print(f"wrote {args.out}/train_v2.0 and {args.out}/val_v2.0 (vocab {world['vocab']}, eps {world['eps']})")
    print(f"Bayes-optimal teacher-forced CE per future token: full {floors['full']:.4f}, Top-500 {floors['topk']:.4f} nats")


def cmd_download(args):
    shards = None if args.shards is None else [int(s) for s in args.shards.split(',')]
    split_dir = tokenized.download_tokenized(args.out, args.split, shards)
    tokenized.finish_download(args.out, args.split, shards)
    print(f"downloaded to {split_dir}")


def cmd_synthetic_raw(args):
    written = synthetic_video.write_synthetic_raw_set(args.out, args.train_shards, args.frames, args.size, args.seed)
    print(f"{'wrote' if written else 'kept (already written with these settings)'} {args.out}/train_v2.0_raw and "
          f"{args.out}/val_v2.0_raw ({args.size}x{args.size})")


def cmd_encode_raw(args):
    codec, dtype = latents.load_codec(args.codec, args.vae_path, args.device)
    n = latents.encode_raw_split(args.split, args.out, codec, args.stride, args.batch_size, args.device, dtype)
    print(f"encoded {n} clips of {args.split} to {args.out}")


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except where there is none to show (required, or None)."""
    def _get_help_string(self, action):
        return action.help if action.required or action.default is None else super()._get_help_string(action)


def main(argv=None):
    """`python -m machinery.prepare <subcommand> ...`: each subcommand is one small block below; add yours beside."""
    parser = argparse.ArgumentParser(prog='python -m machinery.prepare', description=__doc__,
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
    p.set_defaults(run=lambda a: print(f"downloaded to {latents.download_raw(a.out, a.split)}"))
    p = sub.add_parser('own_clips', help='convert a folder of your own clips (NAME.mp4 + NAME.npy states, frames x 25) '
                                         'to the raw layout train_sampling.py reads (machinery/own_clips.py)')
    own_clips.add_arguments(p)
    p.set_defaults(run=own_clips.run)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as e:   # damaged input, a path that is no folder, ...: said without a traceback
        raise SystemExit(f"machinery.prepare {args.command}: {e}")


if __name__ == '__main__':
    main()
