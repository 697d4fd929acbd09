"""Train the sampling-track world model: Wan 2.2 TI2V-5B + state conditioning (paper 2.1, 2.2).

    python train_sampling.py                       # CPU demo: synthetic 32x32 clips, a tiny DiT, ~3.5 min
    torchrun --nnodes 4 --nproc_per_node 8 ... train_sampling.py   # on CUDA GPUs: the paper's recipe
    python train_sampling.py --preset=paper --dry_run   # print the paper recipe and the model size, exit
    python train_sampling.py --init_from=resume    # continue out_dir/ckpt.pt

Settings are the module globals below; `--key=value` or `--key value` overrides them
(configurator.py), `--help` lists them. A plain `python` run uses preset cpu, torchrun on CUDA
GPUs preset paper; `--preset=...` always wins. The demo writes its synthetic raw clips to
data/sampling_demo/ (the 1X layout) on first use. With preset paper and no data in data_dir, the
run downloads the raw 1X splits (huggingface_hub) and encodes them with the Wan VAE, the work
spread over all ranks (data_dir must be on storage every node sees), then trains.

The recipe (paper 2.2): flow matching as Wan does it, x_t = (1 - s) x0 + s noise, target
v = noise - x0, s drawn uniformly then shifted; the 2 context latents are held clean (per-token
timestep 0) and left out of the loss; empty-prompt text context; robot states through AdaLN-Zero;
LoRA rank 32 on a frozen bf16 base; AdamW at a constant 4e-4; global batch 1024 = per-GPU batch x
GPUs x accumulation. Logs: out_dir/log.jsonl (and W&B with --wandb_log); every eval_interval
steps the PSNR of frame 77 on a few val clips (single sample and a small ensemble), their PNGs
in out_dir/val/step_N/; curves.png at the end.

Exactness: every random draw of a sample (noise, timestep, state dropout) comes from a generator
seeded by (seed, step, position in the global batch), and every micro-batch has the same size, so
the run computes the same gradients whatever the number of GPUs, and a resumed run continues
exactly as if it had never stopped (tests check both). A NaN or inf loss stops every rank before
the optimizer step (exit code 1): ckpt.pt stays the last good state.
"""
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import pictures
import prepare
import run_dir
import synthetic
from configurator import configure
from distributed import on_master, setup_distributed, wait_for_all
from flow_matching import flow_matching_loss, predict_frame77, sample_draws
from metrics import psnr
from peak_flops import peak_flops
from vae import PixelCodec
from wan_files import build_model, export_lora, text_context

# --- settings (defaults: the CPU demo on synthetic clips) -----------------------------------
preset = 'cpu'              # 'cpu' (the demo), 'paper' (the 23.0 dB submission's recipe), 'paper_cfg' (PRESETS)
data_dir = ''               # folder of train_v2.0_raw/ and val_v2.0_raw/ ('' = data/sampling_demo, synthetic)
train_splits = 'train_v2.0_raw'  # raw splits to train on; 'train_v2.0_raw,val_v2.0_raw' as the 1st submission
make_synthetic = False      # write the synthetic raw set into an explicit data_dir that holds no data
download = False            # fetch missing raw splits from the Hugging Face Hub and encode them (preset paper)
synthetic_size = 32         # synthetic frame size (the real data is 512; 32 keeps the CPU demo minutes)
synthetic_shards = 16       # synthetic training shards of 1500 frames (~2000 clips: the model must learn the world)
                            # (the synthetic world's look, rim and arm discs: synthetic.SYNTHETIC_LOOK)
clip_stride = 8             # frames between training windows (a 77-frame window starts every 8 frames)
vae = 'pixel'               # 'pixel': the CPU-demo codec (vae.PixelCodec); 'wan': the Wan 2.2 VAE
vae_path = 'Wan-AI/Wan2.2-TI2V-5B-Diffusers'  # hub repo or folder of the Wan VAE (diffusers format)
encode_batch_size = 8       # clips the VAE encodes at once when the latents are prepared
model = 'tiny'              # 'tiny' (WanConfig.tiny with the sizes below) or 'ti2v-5b'
dim = 256                   # tiny model width: >= 192, the 48 x 2 x 2 values a token carries (64 plateaus)
num_layers = 2              # tiny model blocks
num_heads = 4               # tiny model attention heads
ffn_dim = 512               # tiny model feed-forward width
pretrained = ''             # hub repo or folder of Wan 2.2 TI2V-5B; '' = random init
text_encoder = 'zeros'      # 'zeros' (tiny demo) or a repo/folder with Wan's umT5 (the empty prompt, encoded once)
train_mode = 'full'         # 'lora' (paper: frozen base) or 'full' (the demo's random base)
lora_rank = 32              # paper 2.2: LoRA rank 32
lora_alpha = 32             # LoRA scale alpha / rank = 1
init_seed = 0               # random initial weights (and the state embedder's)
seed = 0                    # data order and per-sample draws
learning_rate = 1e-3        # constant (paper: 4e-4 for LoRA on the pretrained base)
weight_decay = 0.0          # AdamW weight decay (the team's trainer: 0.01)
grad_clip = 1.0             # clip the gradient norm to this (0 = off; the team's trainer: off)
shift = 12.0                # timestep shift (Wan: 5). The demo measured 1, 3, 6, 12, 24: 12 is best there
state_dropout = 0.1         # probability of the learned no-state embedding (sample.py's no-state row, --cfg)
batch_size = 8              # per process micro-batch
global_batch_size = 8       # samples per optimizer step over all processes (paper 2.2: 1024)
max_iters = 2400            # optimizer steps (paper 2.2: 23k; the demo's model needs 2400 to place the arms)
gradient_checkpointing = 0  # recompute the first n blocks in backward (0: none; preset paper: all 30)
dtype = 'bfloat16'          # precision on CUDA: bf16 frozen base weights and autocast; the CPU runs fp32
compile = False             # torch.compile the model
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', ...
out_dir = 'out_sampling'    # checkpoints, log.jsonl, curves.png, val/ PNGs
init_from = 'scratch'       # 'scratch' or 'resume' (from out_dir/ckpt.pt)
overwrite = False           # train from scratch even if out_dir holds a checkpoint (it gets replaced)
dry_run = False             # print the recipe and the model size (built on the meta device), then exit
log_interval = 100          # print the loss every this many steps (log.jsonl gets every step)
ckpt_interval = 400         # save every this many steps (and at the end)
eval_interval = 400         # validate every this many steps (and at the end)
val_clips = 4               # the fixed val clips of each validation (the first of val_v2.0_raw, 77 apart)
val_ensemble = 4            # ensemble size of the validation's ensemble PSNR
val_steps = 10              # sampler steps of a validation
wandb_log = False           # also log to Weights & Biases (pip install wandb)
wandb_project = 'nanowm'    # W&B project
wandb_run_name = 'sampling'  # W&B run name

# Sources: the technical report (paper 2.2: 23k steps, AdamW at a constant 4e-4, LoRA rank 32,
# global batch 1024 on 4 x 8 B200); the team's public DiffSynth-based trainer (train_1x.py in their
# torchtitan fork: a window every 8 frames, AdamW weight decay 0.01, no gradient clipping); Wan 2.2
# (shift 5, its flow-matching timesteps). Table 2 of the paper: the 23.0 dB submission was trained
# without classifier-free guidance; the CFG-trained runs (state dropout, evaluated with --cfg) are
# its other rows.
PAPER = dict(data_dir='data/1x', download=True, clip_stride=8, vae='wan', encode_batch_size=4, model='ti2v-5b',
             pretrained='Wan-AI/Wan2.2-TI2V-5B', text_encoder='Wan-AI/Wan2.2-TI2V-5B', train_mode='lora',
             learning_rate=4e-4, weight_decay=0.01, grad_clip=0.0, shift=5.0, state_dropout=0.0, batch_size=8,
             global_batch_size=1024, max_iters=23000, gradient_checkpointing=30, dtype='bfloat16',
             out_dir='out_sampling_paper', ckpt_interval=500, eval_interval=500, val_clips=8, val_ensemble=4,
             val_steps=20)
PRESETS = {
    'cpu': {},   # the defaults above
    'paper': PAPER,
    'paper_cfg': {**PAPER, 'state_dropout': 0.1, 'out_dir': 'out_sampling_paper_cfg'},   # sample with --cfg
}
configure(globals(), presets=PRESETS, gpu_preset='paper',
          choices=dict(vae=('pixel', 'wan'), model=('tiny', 'ti2v-5b'), train_mode=('lora', 'full'),
                       init_from=('scratch', 'resume'), dtype=('float32', 'bfloat16')),
          positive=('synthetic_size', 'synthetic_shards', 'clip_stride', 'encode_batch_size', 'dim', 'num_layers',
                    'num_heads', 'ffn_dim', 'lora_rank', 'lora_alpha', 'learning_rate', 'shift', 'batch_size',
                    'global_batch_size', 'max_iters', 'log_interval', 'ckpt_interval', 'eval_interval',
                    'val_clips', 'val_ensemble', 'val_steps'),
          nonnegative=('weight_decay', 'grad_clip', 'gradient_checkpointing'),
          fractions=('state_dropout',))
demo = not data_dir
data_dir = data_dir or 'data/sampling_demo'
train_split_names = [s for s in train_splits.split(',') if s]
for s in train_split_names:
    if s not in ('train_v2.0_raw', 'val_v2.0_raw'):
        raise SystemExit(f"--train_splits: {s!r} is not one of 'train_v2.0_raw', 'val_v2.0_raw'")
if model == 'tiny' and dim % num_heads:
    raise SystemExit(f"--dim={dim} must be divisible by --num_heads={num_heads}")
if global_batch_size % batch_size:
    raise SystemExit(f"--global_batch_size={global_batch_size} must be a multiple of --batch_size={batch_size}")
config = {k: v for k, v in globals().items() if not k.startswith('_') and not k.isupper()
          and isinstance(v, (int, float, bool, str))}   # saved in checkpoints and W&B
# settings that define the trained weights: a resume (and sample.py) must match them
MODEL_KEYS = ('model', 'dim', 'num_layers', 'num_heads', 'ffn_dim', 'pretrained', 'train_mode', 'lora_rank',
              'lora_alpha', 'vae')
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
ptdtype = torch.bfloat16 if device_type == 'cuda' and dtype == 'bfloat16' else torch.float32
tiny = dict(dim=dim, num_layers=num_layers, num_heads=num_heads, ffn_dim=ffn_dim)

if dry_run:   # the recipe as resolved, and the model's size; no data, no weights
    from wan_state import WanConfig, WanDiT, add_lora
    with torch.device('meta'):
        net = WanDiT(WanConfig.tiny(**tiny) if model == 'tiny' else WanConfig(), state_cond=True)
        if train_mode == 'lora':
            add_lora(net, rank=lora_rank, alpha=lora_alpha)
    n_all = sum(p.numel() for p in net.parameters())
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    print(f"model {model}: {n_all / 1e6:.1f}M parameters, {n_train / 1e6:.1f}M trained ({train_mode}, "
          f"LoRA rank {lora_rank})")
    for key in ('clip_stride', 'learning_rate', 'weight_decay', 'grad_clip', 'state_dropout', 'shift',
                'global_batch_size', 'batch_size', 'max_iters', 'train_splits', 'vae', 'pretrained', 'out_dir'):
        print(f"{key} = {globals()[key]!r}")
    raise SystemExit(0)

ddp, rank, world_size, device = setup_distributed(device)   # torchrun sets RANK: DDP, as nanoGPT
master = rank == 0



if global_batch_size % (batch_size * world_size):
    raise SystemExit(f"--global_batch_size={global_batch_size} must be a multiple of --batch_size={batch_size} x "
                     f"{world_size} process(es)")
grad_accum = global_batch_size // (batch_size * world_size)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
# before any work: no training over a checkpoint by accident, a writable folder, one run at a time
on_master(run_dir.claim, out_dir, init_from == 'resume', overwrite)
if master:
    print(f"{world_size} process(es) x batch {batch_size} x {grad_accum} accumulation = global batch {global_batch_size}")

# --- data: raw clips (synthetic, downloaded or given) -> latents on disk, once -------------------
split_dir = lambda name: os.path.join(data_dir, name)
needed = sorted(set(train_split_names) | {'val_v2.0_raw'})
latent_dirs = {s: os.path.join(data_dir, f'latents_{vae}', s) for s in train_split_names}
if demo or make_synthetic:   # written where the user asked for it only: the demo's folder, or --make_synthetic
    on_master(synthetic.write_synthetic_raw_set, data_dir, synthetic_shards, 1500, synthetic_size, seed, 1200)
    wait_for_all('the synthetic data')
missing = [s for s in needed if not data.raw_split_is_whole(split_dir(s))
           and not (s in latent_dirs and os.path.exists(os.path.join(latent_dirs[s], 'encoding.json')))]
if missing and not download:
    raise SystemExit(f"{data_dir} holds no whole {', '.join(missing)} (a mistyped --data_dir?). Pass the folder that "
                     f"holds the 1X raw data, --download to fetch it from the Hugging Face Hub (preset paper does), "
                     f"or --make_synthetic to write the synthetic demo set there. To prepare it elsewhere: "
                     f"`python prepare.py download_raw --out DIR --split train_v2.0_raw` (and val_v2.0_raw).")
for s in missing:   # every rank fetches its share of the shards
    prepare.download_raw(data_dir, s, rank, world_size)
if missing:
    wait_for_all(f"downloading {', '.join(missing)}")
codec = PixelCodec()
if vae == 'wan':   # fp32 VAE: encoding runs once, validation decodes a few clips
    from vae import WanVAE
    codec = WanVAE.from_pretrained(vae_path, device=device)
for s, latent_dir in latent_dirs.items():
    if os.path.exists(latent_dir):   # a finished encoding: it must be of this stride and codec
        on_master(prepare.check_encoding, latent_dir, dict(stride=clip_stride, codec=type(codec).__name__))
        continue
    prepare.encode_raw_split(split_dir(s), latent_dir, codec, clip_stride, encode_batch_size, device,
                          torch.bfloat16 if vae == 'wan' else torch.float32, rank, world_size)   # one process: finished
    if ddp:   # each rank wrote its share of the shards; the master checks them all and finishes
        wait_for_all(f"encoding {s}")
        on_master(prepare.finish_encoding, split_dir(s), latent_dir)
        wait_for_all(f"the encoding of {s}")
parts = [data.LatentClips(d) for d in latent_dirs.values()]
dataset = torch.utils.data.ConcatDataset(parts)
frame_size = parts[0].encoding.get('frame_size')
val_set = data.RawClips(split_dir('val_v2.0_raw'), stride=data.RAW_CLIP_LEN, max_clips=val_clips, frame_size=frame_size)
z_example, _ = dataset[0]
if len(dataset) < global_batch_size:
    raise SystemExit(f"the training set has {len(dataset)} clips, fewer than --global_batch_size={global_batch_size}")
if master:
    if 'val_v2.0_raw' in train_split_names:
        print("training on val_v2.0_raw too: the validation PSNR below is not a held-out number")
    print(f"{len(dataset)} training clips ({', '.join(train_split_names)}, a window every {clip_stride} frames) "
          f"from {data_dir}, latents {tuple(z_example.shape)}; {len(val_set)} val clips for validation")

# --- model, optimizer, checkpoint -------------------------------------------------------------
net = build_model(model=model, pretrained=pretrained, train_mode=train_mode, lora_rank=lora_rank,
                  lora_alpha=lora_alpha, init_seed=init_seed, device=device, dtype=ptdtype, tiny=tiny)
net.gradient_checkpointing = gradient_checkpointing
trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
optimizer = torch.optim.AdamW(trainable.values(), lr=learning_rate, weight_decay=weight_decay,
                              fused=device_type == 'cuda')
if master:
    print(f"model {model}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
          f"{sum(p.numel() for p in trainable.values()) / 1e6:.2f}M trained ({train_mode})")
start_step = 0
ckpt_path = os.path.join(out_dir, run_dir.CKPT)
if init_from == 'resume':   # loaded to the CPU, tensors and plain data only (never runs code)
    ckpt = run_dir.load_checkpoint(ckpt_path, 'sampling', expect={k: config[k] for k in MODEL_KEYS})
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(ckpt['trainable'][n])
    optimizer.load_state_dict(ckpt['optimizer'])
    start_step = ckpt['step']
    run_dir.set_rng_state(ckpt['rng'])
    if master:
        print(f"resumed from {ckpt_path} at step {start_step}")
context_1LD = text_context(net.cfg, text_encoder, device)
train_net = torch.compile(net) if compile else net
if ddp:   # DDP syncs the gradients of the trainable parameters only
    train_net = DDP(train_net, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)


def save_checkpoint(step, metric):
    state = dict(kind='sampling', trainable={n: p.detach().cpu() for n, p in trainable.items()},
                 optimizer=optimizer.state_dict(), step=step, config=run_dir.plain(dict(config, frame_size=frame_size)),
                 rng=run_dir.rng_state())
    run_dir.save_checkpoint(out_dir, state, metric, higher_is_better=True)   # ckpt_best.pt: the best val PSNR
    # the same weights for other tools: lora.safetensors (ComfyUI / diffusers keys, README) and the
    # state conditioning, which only nanoWM has, in state_embedder.safetensors
    export_lora(net, out_dir)


def validate(step):
    """PSNR of frame 77 on the fixed val clips: a single sample and the mean of val_ensemble
    (paper 2.3); the clips' PNGs (context | members | mean | truth | error) in out_dir/val/step_N/."""
    folder = os.path.join(out_dir, 'val', f'step_{step}')
    os.makedirs(folder, exist_ok=True)
    scores = {'val_psnr_single': [], 'val_psnr_ensemble': [], 'val_psnr_copy_last': []}
    for k in range(len(val_set)):
        item = val_set[k]
        frames_THWC, truth = item['frames_THWC'], item['frames_THWC'][-1].numpy()
        members, mean = predict_frame77(net, codec, frames_THWC, item['states_TD'], context_1LD, ensemble=val_ensemble,
                                        steps=val_steps, shift=shift,
                                        noise_seed=hash((seed, item['shard'], item['start'])) % 2 ** 62, device=device)
        scores['val_psnr_single'].append(psnr(members[0], truth))
        scores['val_psnr_ensemble'].append(psnr(mean, truth))
        scores['val_psnr_copy_last'].append(psnr(frames_THWC[data.NUM_CONTEXT_FRAMES - 1].numpy(), truth))
        pictures.clip_figure(frames_THWC[:data.NUM_CONTEXT_FRAMES].numpy(), members, mean, truth,
                             title=f'step {step}, val clip {k}').save(os.path.join(folder, f'clip_{k}.png'))
    return {key: float(np.mean(v)) for key, v in scores.items()}


# --- training loop ----------------------------------------------------------------------------
# MFU as nanoGPT prints it: this process's model FLOPs per step over its time and the device's
# bf16 peak (none on the CPU). A LoRA step is counted exactly (flops_per_sample); full training as
# 3 forwards (forward, activation and weight gradients), the usual estimate.
peak = peak_flops(device)
_, Fr, Hl, Wl = z_example.shape
flops_per_step = grad_accum * batch_size * (
    net.flops_per_sample(Fr, Hl, Wl, lora_step=True, batch=batch_size) if train_mode == 'lora'
    else 3 * net.flops_per_sample(Fr, Hl, Wl, batch=batch_size))
log = run_dir.RunLog(out_dir, start_step, wandb_project if wandb_log else '', wandb_run_name, config) if master else None
bar = tqdm(total=max_iters, initial=start_step, desc='train', disable=not master, dynamic_ncols=True)
t0 = time.time()
for step in range(start_step, max_iters):
    t_step = time.time()
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        # this micro-batch's positions in the step's global batch, the same under any world size
        first = (micro * world_size + rank) * batch_size
        positions = list(range(first, first + batch_size))
        rows = data.batch_rows(seed, step, positions, global_batch_size, len(dataset))
        z0, states = map(torch.stack, zip(*(dataset[r] for r in rows)))
        sigma, noise, drop = sample_draws(seed, step, positions, z0.shape[1:], shift, state_dropout)
        z0, states, sigma, noise, drop = (x.to(device) for x in (z0, states, sigma, noise, drop))
        sync = nullcontext() if not ddp or micro == grad_accum - 1 else train_net.no_sync()
        with sync:
            loss = flow_matching_loss(train_net, z0, states, context_1LD, sigma, noise, drop) / grad_accum
            loss.backward()
        loss_sum += loss.detach()
    if ddp:   # every rank sees the same mean loss, so a NaN on one rank stops them all together
        dist.all_reduce(loss_sum)
        loss_sum /= world_size
    loss_value = loss_sum.item()
    # a non-finite loss stops the run before the weights change: ckpt.pt stays the last good state.
    # A stop, not a skipped step: a run that diverges once usually diverges again.
    run_dir.stop_if_not_finite(loss_value, 'training loss', step, out_dir, master)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable.values(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not master:
        continue
    dt = time.time() - t_step
    record = dict(step=step, loss=loss_value, lr=learning_rate, samples_per_s=global_batch_size / dt)
    if peak:
        record['mfu'] = flops_per_step / dt / peak
    if device_type == 'cuda':
        record['max_mem_gib'] = torch.cuda.max_memory_allocated() / 2 ** 30
    metric = None
    if (step + 1) % eval_interval == 0 or step == max_iters - 1:
        try:
            record.update(validate(step + 1))
        except FloatingPointError as e:   # finite loss, broken samples: stop before saving them
            raise SystemExit(f"step {step + 1}: validation: {e}. {ckpt_path} (if any) is the last good state.")
        metric = record['val_psnr_ensemble']   # ckpt_best.pt: the best ensemble PSNR of frame 77
        tqdm.write(f"step {step + 1}: val PSNR of frame 77 ({len(val_set)} clips): single {record['val_psnr_single']:.2f}, "
                   f"ensemble of {val_ensemble} {metric:.2f}, copy-last {record['val_psnr_copy_last']:.2f} dB")
    log.write(record)
    if step % log_interval == 0 or step == max_iters - 1:
        mfu = f", MFU {100 * record['mfu']:.1f}%" if peak else ''
        tqdm.write(f"step {step}: loss {loss_value:.4f}, {dt * 1000:.0f} ms/step, "
                   f"{global_batch_size / dt:.2f} samples/s{mfu}")
    bar.set_postfix(loss=f'{loss_value:.4f}')
    bar.update(1)
    if (step + 1) % ckpt_interval == 0 or step == max_iters - 1:
        save_checkpoint(step + 1, metric)
bar.close()
if master:
    print(f"trained to step {max_iters} in {time.time() - t0:.0f} s; checkpoint {ckpt_path}")
    try:   # after the last checkpoint: a machine without matplotlib loses only the picture
        png = run_dir.plot_curves(out_dir, [('flow-matching loss', ['loss']),
                                            ('val PSNR of frame 77 (dB)', ['val_psnr_single', 'val_psnr_ensemble',
                                                                           'val_psnr_copy_last'])],
                                  title=f'sampling: {len(val_set)} val clips, ensemble of {val_ensemble}')
        print(f"curves: {png}")
    except ImportError as e:
        print(f"no curves.png ({e}: pip install matplotlib); the figures are in {out_dir}/log.jsonl")
if ddp:
    dist.destroy_process_group()
