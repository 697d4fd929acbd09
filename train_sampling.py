"""Train the sampling-track world model: Wan 2.2 TI2V-5B + state conditioning (paper 2.1, 2.2).

    python train_sampling.py                       # CPU demo: synthetic 32x32 clips, a tiny DiT, ~3.5 min
    torchrun --nnodes 4 --nproc_per_node 8 ... train_sampling.py   # on CUDA GPUs: the paper's recipe
    python train_sampling.py --preset=paper --dry_run   # the paper recipe, the model size, the disk it needs
    python train_sampling.py --init_from=resume    # continue out_dir/ckpt.pt

Settings are the module globals below; `--key=value` or `--key value` overrides them
(configurator.py), `--help` lists them. A plain `python` run uses preset cpu, torchrun on CUDA
GPUs preset paper; `--preset=...` always wins. The demo writes its synthetic raw clips to
data/sampling_demo/ (the 1X layout) on first use. With preset paper and no data in data_dir, the
run downloads the raw 1X splits (huggingface_hub) and encodes them with the Wan VAE, the work
spread over all ranks (data_dir must be on storage every node sees), then trains.

The recipe (paper 2.2): flow matching as Wan does it, x_t = (1 - s) x0 + s noise, target
v = noise - x0, s drawn uniformly then shifted; the 2 context latents are held clean (timestep 0
for their frames) and left out of the loss; empty-prompt text context; robot states through AdaLN-Zero;
LoRA rank 32 on a frozen bf16 base; AdamW at a constant 4e-4; global batch 1024 = per-GPU batch x
GPUs x accumulation. Logs: out_dir/log.jsonl (and --log_with=tensorboard or wandb); every
eval_interval steps the PSNR of frame 77 on a few val clips (single sample and a small
ensemble), their PNGs in out_dir/val/step_N/ (step N: after N optimizer steps, as everywhere);
curves.png at the end. Every save also exports lora.safetensors (and lora_stepNNNNNNN.safetensors,
the newest keep_last kept) for ComfyUI / diffusers; --init_lora starts a new run from such a file.

Exactness: every random draw of a sample (noise, timestep, state dropout) comes from a generator
seeded by (seed, step, position in the global batch), and every micro-batch has the same size, so
the run computes the same gradients whatever the number of GPUs, and a resumed run continues
exactly as if it had never stopped (tests check both). A NaN or inf loss or gradient norm, or a
loss over loss_spike x its recent median, stops every rank before the optimizer step (exit code
1): ckpt.pt stays the last good state (run_dir.DivergenceGuard).
"""
import math
import os
import time
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from configurator import configure
from flow_matching import diffsynth_weight, flow_matching_loss, predict_frame77, sample_draws
from machinery import checkpoints, latents, pictures, run_dir
from machinery.distributed import (finish, grad_accum_steps, mean_over_ranks, on_master, resolve_device,
                                   setup_distributed)
from machinery.speed import StepSpeed
from machinery.wan_files import build_model, run_settings, text_context
from metrics import psnr
from wan_state import WanConfig, WanDiT, add_lora

# --- settings (defaults: the CPU demo on synthetic clips) -----------------------------------------
preset = 'cpu'              # 'cpu' (the demo), 'paper' (the 23.0 dB submission's recipe), 'paper_cfg', and the
                            # two-stage demo of the recipe: 'cpu_base', then 'cpu_lora' (PRESETS)
# -- data --
data_dir = ''               # folder of train_v2.0_raw/ and val_v2.0_raw/ ('' = data/sampling_demo, synthetic)
train_splits = 'train_v2.0_raw'  # raw splits to train on; 'train_v2.0_raw,val_v2.0_raw' as the 1st submission
make_synthetic = False      # write the synthetic raw set into an explicit data_dir that holds no data
download = False            # fetch missing raw splits from the Hugging Face Hub and encode them (preset paper)
synthetic_size = 32         # synthetic frame size (the real data is 512; 32 keeps the CPU demo minutes)
synthetic_shards = 16       # synthetic training shards of 1500 frames (~2000 clips: the model must learn the world)
                            # (the synthetic world's look, rim and arm discs: synthetic_video.SYNTHETIC_LOOK)
clip_stride = 8             # frames between training windows (a 77-frame window starts every 8 frames)
vae = 'pixel'               # 'pixel': the CPU-demo codec (vae.PixelCodec); 'wan': the Wan 2.2 VAE
vae_path = 'Wan-AI/Wan2.2-TI2V-5B-Diffusers'  # hub repo or folder of the Wan VAE (diffusers format)
encode_batch_size = 8       # clips the VAE encodes at once when the latents are prepared
# -- model (paper 2.1) --
model = 'tiny'              # 'tiny' (WanConfig.tiny with the sizes below) or 'ti2v-5b'
dim = 256                   # tiny model width: >= 192, the 48 x 2 x 2 values a token carries (64 plateaus)
num_layers = 2              # tiny model blocks
num_heads = 4               # tiny model attention heads
ffn_dim = 512               # tiny model feed-forward width
pretrained = ''             # hub repo or folder of Wan 2.2 TI2V-5B, or a nanoWM sampling run folder (the frozen
                            # base of preset cpu_lora: its sizes too); '' = random init
init_lora = ''              # a LoRA file (any format sample.py --lora reads) or an exported folder a new run
                            # starts from: its adapters (train_mode lora, its rank unless given) or merged (full)
text_encoder = ''           # repo/folder with Wan's umT5 (the empty prompt, encoded once); '' = pretrained's,
                            # or 'zeros' without one (the demo's random base)
train_mode = 'full'         # 'lora' (paper: frozen base) or 'full' (the demo's random base)
lora_rank = 32              # paper 2.2: LoRA rank 32
lora_alpha = 32             # LoRA scale alpha / rank (1 at rank 32, the team's alpha = rank)
state_embedder = 'paper'    # 'paper' (the report's text, 5.3M) or 'team' (the team's code, 67.9M; wan_state.py)
use_states = True           # False: the base model, no state embedder: stage 1 of the two-stage CPU demo
init_seed = 0               # random initial weights (and the state embedder's)
gradient_checkpointing = 0  # recompute the first n blocks in backward (0: none; preset paper: 12 of 30,
                            # an estimate for 80 GB at batch 8)
# -- training (paper 2.2) --
global_batch_size = 8       # samples per optimizer step over all processes (paper 2.2: 1024)
batch_size = 8              # samples per micro-step per process (gradient accumulation makes up the rest)
max_iters = 2400            # optimizer steps (paper 2.2: 23k; the demo's model needs 2400 to place the arms)
learning_rate = 1e-3        # constant (paper: 4e-4 for LoRA on the pretrained base)
weight_decay = 0.0          # AdamW weight decay (the team's trainer: 0.01)
grad_clip = 1.0             # clip the gradient norm to this (0 = off; the team's trainer: off)
loss_spike = 10.0           # stop if the loss tops this x its median of the last 100 steps (0 = off)
shift = 12.0                # timestep shift (Wan: 5). The demo measured 1, 3, 6, 12, 24: 12 is best there
state_dropout = 0.1         # probability of the learned no-state embedding (sample.py's no-state row, --cfg)
loss_weighting = 'none'     # 'none' (plain MSE) or 'diffsynth': the team's trainer's timestep weight
                            # (flow_matching.diffsynth_weight: less weight on the noisiest samples)
seed = 0                    # data order and per-sample draws
# -- validation --
eval_interval = 400         # validate every this many steps (and at the end)
eval_clips = 4              # the fixed val clips of each validation (the first of val_v2.0_raw, 77 apart)
eval_ensemble = 4           # ensemble size of the validation's ensemble PSNR
eval_steps = 10             # sampler steps of a validation
# -- logging --
log_interval = 100          # print the log's line every this many steps (log.jsonl gets every step)
log_with = 'none'           # also log to 'tensorboard' (out_dir/tensorboard) or 'wandb' (W&B; files in out_dir)
wandb_project = 'nanowm'    # W&B project
wandb_run_name = 'sampling'  # W&B run name
# -- run folder --
out_dir = 'out_sampling'    # checkpoints, log.jsonl, curves.png, val/ PNGs, lora.safetensors
init_from = 'scratch'       # 'scratch' or 'resume' (out_dir/ckpt.pt: weights, optimizer, step; settings not given)
overwrite = False           # train from scratch even if out_dir holds a run (it moves to out_dir/previous_<time>/)
dry_run = False             # print the recipe, the model size and the disk it needs, then exit
ckpt_interval = 400         # save every this many steps (0 = only at the end)
keep_last = 0               # step-numbered LoRA exports (lora_stepNNNNNNN.safetensors) to keep (0 = all)
# -- system --
device = 'auto'             # 'auto' (cuda if there is a GPU, else cpu), 'cpu', 'cuda', 'cuda:1'
dtype = 'bfloat16'          # on CUDA: bf16 frozen base weights and autocast (train_mode lora; full trains
                            # fp32 weights in fp32, TF32 matmuls); the CPU runs fp32
compile = False             # torch.compile each block in place (regional); preset paper: on

# --- presets --------------------------------------------------------------------------------------
# Sources: the technical report (paper 2.2: 23k steps, AdamW at a constant 4e-4, LoRA rank 32,
# global batch 1024 on 4 x 8 B200); the team's public DiffSynth-based trainer (train_1x.py in their
# torchtitan fork: a window every 8 frames, AdamW weight decay 0.01, no gradient clipping, and
# DiffSynth's loss weight); Wan 2.2 (shift 5, its flow-matching timesteps). Table 2 of the paper:
# the 23.0 dB submission was trained without classifier-free guidance; the CFG-trained runs (state
# dropout, evaluated with --cfg) are its other rows.
PAPER = dict(data_dir='data/1x', download=True, clip_stride=8, vae='wan', encode_batch_size=4, model='ti2v-5b',
             pretrained='Wan-AI/Wan2.2-TI2V-5B', text_encoder='Wan-AI/Wan2.2-TI2V-5B', train_mode='lora',
             learning_rate=4e-4, weight_decay=0.01, grad_clip=0.0, shift=5.0, state_dropout=0.0,
             loss_weighting='diffsynth', state_embedder='team', batch_size=8, global_batch_size=1024, max_iters=23000,
             gradient_checkpointing=12, compile=True, dtype='bfloat16',
             out_dir='out_sampling_paper', ckpt_interval=500, eval_interval=500, eval_clips=8, eval_ensemble=4,
             eval_steps=20)
# The paper's recipe on the CPU, in two stages: a tiny base learns the synthetic world without states (Wan's
# pretraining, in small), then LoRA and the AdaLN-Zero state embedder train on it, frozen (README)
PRESETS = {
    'cpu': {},   # the defaults above
    'paper': PAPER,
    'paper_cfg': {**PAPER, 'state_dropout': 0.1, 'out_dir': 'out_sampling_paper_cfg'},   # sample with --cfg
    'cpu_base': dict(use_states=False, out_dir='out_sampling_base'),
    'cpu_lora': dict(pretrained='out_sampling_base', train_mode='lora', lora_rank=16, lora_alpha=16,
                     learning_rate=2e-3, max_iters=1200, eval_interval=400, ckpt_interval=400,
                     out_dir='out_sampling_lora'),
}

# --- configure: the preset, then config files and flags (configurator.py) -------------------------
given = configure(globals(), presets=PRESETS, gpu_preset='paper',
          choices=dict(vae=('pixel', 'wan'), model=('tiny', 'ti2v-5b'), train_mode=('lora', 'full'),
                       init_from=('scratch', 'resume'), dtype=('float32', 'bfloat16'),
                       log_with=('none', 'tensorboard', 'wandb'),
                       loss_weighting=('none', 'diffsynth'), state_embedder=('paper', 'team')),
          positive=('synthetic_size', 'synthetic_shards', 'clip_stride', 'encode_batch_size', 'dim', 'num_layers',
                    'num_heads', 'ffn_dim', 'lora_rank', 'lora_alpha', 'learning_rate', 'shift', 'batch_size',
                    'global_batch_size', 'max_iters', 'log_interval', 'eval_interval', 'eval_clips', 'eval_ensemble',
                    'eval_steps'),
          nonnegative=('weight_decay', 'grad_clip', 'gradient_checkpointing', 'loss_spike', 'keep_last',
                       'ckpt_interval'),
          fractions=('state_dropout',))

# --- derived settings and checks ------------------------------------------------------------------
# settings that define the trained weights: a resume refuses other values given (every setting not given: the
# checkpoint's, as nanoGPT), as does a base that is a nanoWM run (its BASE_KEYS)
MODEL_KEYS = ('model', 'dim', 'num_layers', 'num_heads', 'ffn_dim', 'pretrained', 'train_mode', 'lora_rank',
              'lora_alpha', 'vae', 'state_embedder', 'text_encoder', 'null_state', 'use_states')
BASE_KEYS = ('model', 'dim', 'num_layers', 'num_heads', 'ffn_dim', 'vae', 'text_encoder')
null_state = use_states and state_dropout > 0   # the learned no-state embedding, only where state dropout trains it
if init_from == 'resume':   # the checkpoint's null_state: its trained no-state embedding is never dropped
    globals().update(checkpoints.settings_on_resume(out_dir, 'sampling', globals(), given, MODEL_KEYS))
    if init_lora:
        raise SystemExit(f"--init_lora={init_lora} starts a new run; a resume continues its checkpoint: drop one")
    if state_dropout > 0 and use_states and not null_state:
        raise SystemExit(f"--state_dropout={state_dropout} trains the no-state embedding, which {out_dir}/ckpt.pt was "
                         f"trained without (--state_dropout=0): resume with --state_dropout=0, or start a new run")
base_run = run_settings(pretrained) if pretrained else None   # a nanoWM run's weights as the base (stage 2 of the demo)
if pretrained and not base_run and '/' not in pretrained and not os.path.isdir(pretrained):   # no Hub repo either
    raise SystemExit(f"--pretrained={pretrained}: no such folder; train it first (the two-stage demo: python "
                     f"train_sampling.py --preset=cpu_base), or pass a Hub repo such as Wan-AI/Wan2.2-TI2V-5B")
if base_run:   # its model, as it was trained (and its text context: zeros for the demo's)
    globals().update(checkpoints.settings_from(base_run, {k: globals()[k] for k in BASE_KEYS}, given, BASE_KEYS,
                                               f"--pretrained={pretrained}"))
if init_lora and not os.path.exists(init_lora):   # before any download or encoding
    raise SystemExit(f"--init_lora={init_lora}: no such file or folder")


def lora_settings_of(path):
    """An --init_lora file's rank and alpha (machinery/lora_files.py, imported for such a run only)."""
    from machinery.lora_files import lora_rank_alpha
    return dict(zip(('lora_rank', 'lora_alpha'), lora_rank_alpha(path)))


if init_lora:   # its adapters' rank and alpha unless given; a damaged file stops here, before any data work
    in_file = lora_settings_of(init_lora)
    if 'lora_rank' in given and lora_rank != in_file['lora_rank'] and train_mode == 'lora':
        raise SystemExit(f"--init_lora={init_lora} holds adapters of rank {in_file['lora_rank']}, not --lora_rank="
                         f"{lora_rank}: pass --lora_rank={in_file['lora_rank']}, or leave it out to take the file's")
    globals().update({k: v for k, v in in_file.items() if k not in given})
    print(f"--init_lora={init_lora}: LoRA rank {lora_rank}, alpha {lora_alpha:g} (the file's unless given)")
demo = data_dir in ('', 'data/sampling_demo')   # '': the default; the folder: a resumed demo's saved data_dir
data_dir = data_dir or 'data/sampling_demo'
text_encoder = text_encoder or pretrained or 'zeros'   # a pretrained DiT was trained on umT5's encoding of ""
# the synthetic raw set is written where the user asked for it only: the demo's folder, or --make_synthetic
synthetic = dict(train_shards=synthetic_shards, frames=1500, size=synthetic_size, seed=seed,
                 val_frames=1200) if demo or make_synthetic else None
train_split_names = [s for s in train_splits.split(',') if s]
for s in train_split_names:
    if s not in ('train_v2.0_raw', 'val_v2.0_raw'):
        raise SystemExit(f"--train_splits: {s!r} is not one of 'train_v2.0_raw', 'val_v2.0_raw'")
if model == 'tiny' and (dim % num_heads or dim // num_heads < 6 or dim // num_heads % 2):
    raise SystemExit(f"--dim={dim} must be --num_heads={num_heads} x an even head size >= 6 (RoPE: a pair per axis)")
if global_batch_size % batch_size:
    raise SystemExit(f"--global_batch_size={global_batch_size} must be a multiple of --batch_size={batch_size}")
run_dir.check_log_with(log_with)
if train_mode == 'lora' and not pretrained:   # Wan's head starts at zero: no gradient reaches the adapters
    print("warning: --train_mode=lora on a random base (no --pretrained): the zero-initialised output head gives "
          "every adapter and the state embedder a zero gradient, so nothing trains. Fine for timing; for a result "
          "pass --pretrained=Wan-AI/Wan2.2-TI2V-5B, or --train_mode=full")
config = {k: v for k, v in globals().items() if not k.startswith('_') and not k.isupper()
          and isinstance(v, (int, float, bool, str))}   # saved in checkpoints and the tracker
tiny = dict(dim=dim, num_layers=num_layers, num_heads=num_heads, ffn_dim=ffn_dim)

# --- the model's size (built on the meta device) and the disk the run will write ------------------
with torch.device('meta'):
    cfg = WanConfig.tiny(**tiny) if model == 'tiny' else WanConfig()
    meta_model = WanDiT(replace(cfg, state_embedder=state_embedder, null_state=null_state), state_cond=use_states)
    if train_mode == 'lora':
        add_lora(meta_model, rank=lora_rank, alpha=lora_alpha)
n_all = sum(p.numel() for p in meta_model.parameters())
n_train = sum(p.numel() for p in meta_model.parameters() if p.requires_grad)
n_state = sum(p.numel() for n, p in meta_model.named_parameters() if n.startswith('state_embedder.'))
n_bare = n_state - cfg.r_dim * null_state   # without the no-state embedding (r_dim values)
n_export = sum(p.numel() for n, p in meta_model.named_parameters() if '.lora_' in n) + n_state
exports = 1 + min(keep_last or math.inf, math.ceil(max_iters / (ckpt_interval or max_iters)))   # 1: lora.safetensors
disk_lines, no_room = run_dir.disk_report([
    (out_dir, run_dir.checkpoint_bytes(n_train, n_train) + 4 * n_export * exports, 'checkpoints and LoRA exports'),
    (data_dir, latents.latents_bytes(data_dir, train_split_names, vae, clip_stride, synthetic, assume_1x=dry_run),
     'latents')])   # a run checks a download's after it

# --- dry run: the model's size, the run's length and its disk, no data, no weights ----------------
if dry_run:
    print(f"model {model}: {n_all / 1e6:.1f}M parameters, {n_train / 1e6:.1f}M trained ({train_mode}, "
          f"LoRA rank {lora_rank})")
    print(f"state embedder {state_embedder!r}: {n_bare:,} parameters ({n_bare + cfg.r_dim:,} with the no-state "
          f"embedding that --state_dropout > 0 trains)")
    for key in ('clip_stride', 'learning_rate', 'weight_decay', 'grad_clip', 'state_dropout', 'shift', 'loss_weighting',
                'global_batch_size', 'batch_size', 'max_iters', 'gradient_checkpointing', 'compile', 'train_splits', 'vae',
                'pretrained', 'text_encoder', 'out_dir'):
        print(f"{key} = {globals()[key]!r}")
    print('\n'.join(disk_lines + [no_room] if no_room else disk_lines))
    raise SystemExit(0)
if no_room:
    raise SystemExit(no_room)


# --- helpers: validation, checkpoints (of the data and model set up below) ------------------------
def evaluate(step):
    """PSNR of frame 77 on the fixed val clips: a single sample and the mean of eval_ensemble
    (paper 2.3); the clips' PNGs (context | members | mean | truth | error) in out_dir/val/step_NNNNNNN/
    (numbered as the LoRA exports: they sort by step). Returns the figures and {name: PNG path} (for the tracker)."""
    tqdm.write(f"validating at step {step}: {len(val_ds)} clips, ensemble {eval_ensemble}, {eval_steps} steps each...")
    folder = os.path.join(out_dir, 'val', f'step_{step:07d}')
    os.makedirs(folder, exist_ok=True)
    scores, pngs = {'val_psnr_single': [], 'val_psnr_ensemble': [], 'val_psnr_copy_last': []}, {}
    for k in range(len(val_ds)):
        item = val_ds[k]
        frames_THWC, truth = item['frames_THWC'], item['frames_THWC'][-1].numpy()
        members, mean = predict_frame77(raw_model, codec, frames_THWC, item['states_TD'], context_1LD,
                                        ensemble=eval_ensemble, steps=eval_steps, shift=shift,
                                        noise_seed=hash((seed, item['shard'], item['start'])) % 2 ** 62, device=device)
        scores['val_psnr_single'].append(psnr(members[0], truth))
        scores['val_psnr_ensemble'].append(psnr(mean, truth))
        scores['val_psnr_copy_last'].append(psnr(frames_THWC[data.NUM_CONTEXT_FRAMES - 1].numpy(), truth))
        pngs[f'val/clip_{k}'] = os.path.join(folder, f'clip_{k}.png')
        pictures.save_png(pictures.clip_figure(frames_THWC[:data.NUM_CONTEXT_FRAMES].numpy(), members, mean, truth,
                                               title=f'step {step}, val clip {k}'), pngs[f'val/clip_{k}'],
                          then='then resume with --init_from=resume')
    return {key: float(np.mean(v)) for key, v in scores.items()}, pngs


def save_checkpoint(step, metric):
    state = dict(kind='sampling', trainable={n: p.detach().cpu() for n, p in trainable.items()}, step=step,
                 optimizer=optimizer.state_dict(), config=checkpoints.plain(dict(config, frame_size=frame_size)),
                 guard=guard.state_dict())
    checkpoints.save_checkpoint(out_dir, state, metric, higher_is_better=True, trusted=guard.trusted)   # best: PSNR
    # the same weights for other tools: lora.safetensors (ComfyUI / diffusers keys, README) and the
    # state conditioning, which only nanoWM has, in state_embedder.safetensors; with a numbered history
    from machinery.lora_files import base_model, export_lora
    export_lora(raw_model, out_dir, step=step, keep_last=keep_last or None, info=dict(base_model=base_model(config)))


# --- processes: DDP under torchrun, the precision; rank 0 claims out_dir --------------------------
_, rank, world_size, device = setup_distributed(resolve_device(device))   # torchrun sets RANK: DDP, as nanoGPT
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
# bf16 frozen base weights; the model runs them under bf16 autocast itself (WanDiT._autocast)
ptdtype = {'bfloat16': torch.bfloat16, 'float32': torch.float32}[dtype] if device_type == 'cuda' else torch.float32
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
grad_accum = grad_accum_steps(global_batch_size, batch_size, world_size)
# before any work: no training over a checkpoint by accident, a writable folder, one run at a time
on_master(run_dir.claim, out_dir, init_from == 'resume', overwrite)
if master:
    print(f"{world_size} process(es) x batch {batch_size} x {grad_accum} accumulation = global batch {global_batch_size}")
try:   # the empty prompt, encoded once (paper 2.1), before any data work: a wrong --text_encoder stops now
    context_1LD = text_context(cfg, text_encoder, device)
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"--text_encoder={text_encoder}: {e}. Pass a repo or folder with Wan's umT5, or "
                     f"--text_encoder=zeros")

# --- data: raw clips (synthetic, downloaded or given) -> latents on disk, once --------------------
latent_dirs, codec = latents.raw_latents(data_dir, train_split_names, vae, vae_path, stride=clip_stride,
                                         batch_size=encode_batch_size, download=download, device=device,
                                         rank=rank, world_size=world_size, synthetic=synthetic)   # each rank its share
try:   # a latents file damaged since it was encoded: named
    train_parts = [latents.LatentClips(d) for d in latent_dirs]
except ValueError as e:
    raise SystemExit(f"the training split: {e}")
frame_size = train_parts[0].encoding.get('frame_size')
try:   # damage in the val split stops the run now, not at the first validation
    val_ds = data.RawClips(os.path.join(data_dir, 'val_v2.0_raw'), stride=data.RAW_CLIP_LEN, max_clips=eval_clips,
                           frame_size=frame_size)
    if master:
        val_ds.check()
except ValueError as e:
    raise SystemExit(f"the validation split: {e}")
train_ds = torch.utils.data.ConcatDataset(train_parts)
z_example, _ = train_ds[0]
if len(train_ds) < global_batch_size:
    raise SystemExit(f"the training set has {len(train_ds)} clips, fewer than --global_batch_size={global_batch_size}: "
                     f"lower --global_batch_size (and --batch_size), pass a smaller --clip_stride for more windows, "
                     f"or more data")
if master:
    if 'val_v2.0_raw' in train_split_names:
        print("training on val_v2.0_raw too: the validation PSNR below is not a held-out number")
    print(f"{len(train_ds)} training clips ({', '.join(train_split_names)}, a window every {clip_stride} frames) "
          f"from {data_dir}, latents {tuple(z_example.shape)}; {len(val_ds)} val clips for validation")

# --- model and optimizer (and the state of a resumed run) -----------------------------------------
try:
    raw_model = build_model(model=model, pretrained=pretrained, train_mode=train_mode, lora_rank=lora_rank,
                            lora_alpha=lora_alpha, init_seed=init_seed, device=device, dtype=ptdtype, tiny=tiny,
                            state_embedder=state_embedder, init_lora=init_lora, null_state=null_state,
                            state_cond=use_states)
except (FileNotFoundError, ValueError) as e:   # a damaged or foreign --pretrained checkpoint (load_dit names the file)
    raise SystemExit(f"--pretrained={pretrained}: {e}") if pretrained else e
raw_model.gradient_checkpointing = gradient_checkpointing
if master and init_lora:
    print(f"started from {init_lora} ({'merged into the weights' if train_mode == 'full' else 'its adapters'})")
trainable = {n: p for n, p in raw_model.named_parameters() if p.requires_grad}
optimizer = torch.optim.AdamW(trainable.values(), lr=learning_rate, weight_decay=weight_decay,
                              fused=device_type == 'cuda')
if master:
    print(f"model {model}: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, "
          f"{sum(p.numel() for p in trainable.values()) / 1e6:.2f}M trained ({train_mode}), device {device}")
start_step, saved_guard = 0, None
ckpt_path = os.path.join(out_dir, checkpoints.CKPT)
if init_from == 'resume':   # loaded to the CPU, tensors and plain data only (never runs code)
    state = checkpoints.load_checkpoint(ckpt_path, 'sampling', expect={k: config[k] for k in MODEL_KEYS})
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(state['trainable'][n])
    optimizer.load_state_dict(state['optimizer'])
    changed = checkpoints.optimizer_settings_on_resume(optimizer, [dict(lr=learning_rate, weight_decay=weight_decay)],
                                                   state['config'], config)   # the flags given now
    start_step, saved_guard = state['step'], state.get('guard')   # the loss-spike rule's history too
    if start_step >= max_iters:
        raise SystemExit(f"{ckpt_path} is at step {start_step} already, and this run ends at --max_iters={max_iters}: "
                         f"pass a larger --max_iters to train on, or evaluate the checkpoint with sample.py")
    if master:
        print(f"resumed from {ckpt_path} at step {start_step}" + (f"; {changed}" if changed else ''))
if compile:   # regional: each block (one graph serves them all), so it compiles in about a minute
    raw_model.compile_blocks()
train_model = raw_model   # what the loop calls; raw_model is saved
if world_size > 1:   # DDP syncs the gradients of the trainable parameters only (one process: nothing to sync)
    train_model = DDP(train_model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)

# --- training loop --------------------------------------------------------------------------------
log = run_dir.RunLog(out_dir, start_step, log_with, config, wandb_project, wandb_run_name, total=max_iters,
                     log_interval=log_interval) if master else None
# model FLOPs of a step: a LoRA step counted exactly (flops_per_sample); full training as 3
# forwards (forward, activation and weight gradients), the usual estimate
_, Fr, Hl, Wl = z_example.shape
flops_per_sample = (raw_model.flops_per_sample(Fr, Hl, Wl, lora_step=True, batch=batch_size) if train_mode == 'lora'
                    else 3 * raw_model.flops_per_sample(Fr, Hl, Wl, batch=batch_size))
guard = run_dir.DivergenceGuard(out_dir, loss_spike, master, start_step, saved_guard)   # the loss-spike rule
speed = StepSpeed(device, global_batch_size, flops_per_sample * batch_size * grad_accum)
t0 = time.time()
for step in range(start_step, max_iters):
    speed.start()
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        # the rows of this process's positions in the step's global batch, the same under any
        # world size (data.batch_rows), and each sample's draws (noise, timestep, state dropout)
        positions = data.batch_positions(micro, rank, world_size, batch_size)
        rows = data.batch_rows(seed, step, positions, global_batch_size, len(train_ds))
        try:
            z0, states = map(torch.stack, zip(*(train_ds[r] for r in rows)))
        except ValueError as e:   # a latents file damaged since it was encoded (LatentClips checks each clip)
            raise SystemExit(f"step {step + 1}: {e}")
        sigma, noise, drop = sample_draws(seed, step, positions, z0.shape[1:], shift, state_dropout)
        z0, states, sigma, noise, drop = (x.to(device) for x in (z0, states, sigma, noise, drop))
        # gradients are all-reduced only on the last micro-step
        sync = nullcontext() if world_size == 1 or micro == grad_accum - 1 else train_model.no_sync()
        with sync:
            loss = flow_matching_loss(train_model, z0, states, context_1LD, sigma, noise, drop if null_state else None,
                                      weight_B=diffsynth_weight(sigma, shift) if loss_weighting == 'diffsynth' else None)
            (loss / grad_accum).backward()
        loss_sum += loss.detach() / grad_accum
    loss_value = mean_over_ranks(loss_sum).item()   # the same on every rank: a NaN on one stops them all
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable.values(), grad_clip or math.inf).item()   # 0: no clip
    # a NaN, inf or spiking loss stops the run before the weights change: ckpt.pt stays the last good state
    done = step + 1   # step N: after N optimizer steps, in the log, the console, val/step_N and ckpt.pt alike
    guard.check({'training loss': loss_value, 'gradient norm': grad_norm}, done)
    optimizer.step()   # at the constant learning_rate (paper 2.2)
    optimizer.zero_grad(set_to_none=True)
    if not master:
        continue
    record, pngs = dict(step=done, loss=loss_value, grad_norm=grad_norm, **speed.stop()), {}
    if done % eval_interval == 0 or done == max_iters:
        try:
            val, pngs = evaluate(done)
        except FloatingPointError as e:   # finite loss, broken samples: stop before saving them
            raise SystemExit(f"step {done}: validation: {e}. {ckpt_path} (if any) is the last good state.")
        record.update(val)
    log.write(record, images=pngs)
    if pngs:
        tqdm.write(f"step {done}: val PSNR of frame 77 ({len(val_ds)} clips): single {record['val_psnr_single']:.2f}, "
                   f"ensemble of {eval_ensemble} {record['val_psnr_ensemble']:.2f}, "
                   f"copy-last {record['val_psnr_copy_last']:.2f} dB")
    if (ckpt_interval > 0 and done % ckpt_interval == 0) or done == max_iters:
        save_checkpoint(done, record.get('val_psnr_ensemble'))   # ckpt_best.pt: the best ensemble PSNR

# --- the end: curves ------------------------------------------------------------------------------
if master:
    print(f"trained to step {max_iters} in {time.time() - t0:.0f} s; checkpoint {ckpt_path}")
    log.close(curves=[('flow-matching loss', ['loss']),
                      ('val PSNR of frame 77 (dB)', ['val_psnr_single', 'val_psnr_ensemble', 'val_psnr_copy_last'])],
              title=f'sampling: {len(val_ds)} val clips, ensemble of {eval_ensemble}')
finish()   # every rank together, then the process groups go (machinery/distributed.py)
