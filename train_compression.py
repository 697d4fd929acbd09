"""Train (or evaluate) the ST-Transformer of the compression track (paper section 3).

    python train_compression.py                    # CPU demo: synthetic data in the 1X layout, ~3.5 min
    torchrun --nproc_per_node 8 train_compression.py     # on CUDA GPUs: the paper's recipe (preset paper)
    python train_compression.py --preset=paper --dry_run # the paper's model, run length and disk, no data
    python train_compression.py --eval_only --out_dir=out/compression --split=val_v2.0
    python train_compression.py --init_from=resume       # continue out_dir/ckpt.pt

Settings are the module globals below; `--key=value` overrides them (configurator.py; `--help`
lists them). A plain `python` run uses preset cpu, torchrun on CUDA GPUs preset paper, which
downloads missing data first; `--preset=...` always wins, and later flags override it. Logs go to
out_dir/log.jsonl (and --log_with=tensorboard or wandb), curves to out_dir/curves.png. Ends with a
table: Top-500 CE (and full CE) of the model, teacher-forced and greedy autoregressive, next to
baselines and, on synthetic data, the exact Bayes floor.
"""
import json
import math
import os
import time
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from configurator import configure
from machinery import checkpoints, run_dir, synthetic_tokens, tokenized, written
from machinery.distributed import (finish, grad_accum_steps, mean_over_ranks, on_master, resolve_device, setup_distributed,
                         wait_for_all)
from metrics import cross_entropy_topk
from machinery.speed import StepSpeed
from st_transformer import STConfig, STTransformer

# --- settings (defaults: the CPU demo on synthetic data) ------------------------------------------
preset = 'cpu'             # 'cpu' (the demo) or 'paper' (PRESETS below)
# -- data --
data_dir = ''              # folder of train_v2.0/ and val_v2.0/ ('' = data/synthetic, written on first use)
download = False           # fetch missing or incomplete 1X splits into data_dir from the Hub (preset paper: on)
train_splits = 'train_v2.0'  # splits to train on, e.g. 'train_v2.0,val_v2.0' (val numbers then not comparable)
shards = ''                # shards of train_v2.0 to use, e.g. '0' or '0,1' ('' = all in metadata.json)
sample_stride = 1          # blocks between training samples: 1 = a sample at every block, 2 = non-overlapping
num_workers = 1            # DataLoader worker processes
# -- model (paper 3.1) --
vocab_size = 1000          # tokens lie in [0, vocab_size): the synthetic set uses 1000, the 1X data 64000
n_layer = 1                # ST blocks
n_head = 4                 # attention heads
n_embd = 64                # width
dropout = 0.0              # on attention, MLP and residual branches
state_window = data.STATE_WINDOW  # state rows per sample (the 64 frames ending with the sample)
use_states = True          # False: the state-blind ablation
# -- training (paper 3.2) --
global_batch_size = 4      # samples per optimizer step, over all processes and micro-steps
batch_size = 4             # samples per micro-step per process (gradient accumulation makes up the rest)
epochs = 0.0               # length of the run in passes over the training set, used when max_iters == 0
max_iters = 300            # length of the run in steps (0 = from epochs)
learning_rate = 5e-3       # peak; linear warmup then linear decay to 0
warmup_iters = 20          # steps of linear warmup
weight_decay = 0.05        # on matrices only (STTransformer.param_groups)
beta1 = 0.9                # AdamW beta1
beta2 = 0.95               # AdamW beta2
grad_clip = 1.0            # clip the gradient norm to this (0 = off); not stated in the paper, GPT-2's value
loss_spike = 10.0          # stop if the loss tops this x its median of the last 100 steps (0 = off)
loss_chunk = 4096          # tokens whose fp32 logits exist at once in the loss (head_cross_entropy)
seed = 1337                # initial weights, data order and dropout
# -- validation --
eval_interval = 25         # validate (teacher-forced and greedy autoregressive) every this many steps
eval_samples = 16          # the fixed val subset of each validation: its first eval_samples samples
eval_batch_size = 8        # samples per evaluation batch
final_eval = True          # print the table at the end of the run
final_eval_samples = 48    # val samples of the final table (0 = the whole split)
eval_only = False          # only evaluate a checkpoint (--ckpt) on --split, then exit
ckpt = ''                  # checkpoint for --eval_only ('' = out_dir/ckpt.pt)
split = 'val_v2.0'         # split that --eval_only evaluates
# -- logging --
log_interval = 10          # print the log's line every this many steps (log.jsonl gets every step)
log_with = 'none'          # also log to 'tensorboard' (out_dir/tensorboard) or 'wandb' (W&B; files in out_dir)
wandb_project = 'nanowm'   # W&B project
wandb_run_name = 'compression'  # W&B run name
# -- run folder --
out_dir = 'out/compression'  # checkpoints, log.jsonl, curves.png, results.json
init_from = 'scratch'      # 'scratch' or 'resume' (from out_dir/ckpt.pt: model, optimizer, step)
overwrite = False          # train from scratch even if out_dir holds a run (it moves to out_dir/previous_<time>/)
dry_run = False            # build the model on the meta device, print its size, the run length and disk, exit
ckpt_interval = 100        # save every this many steps (0 = only at the end)
stop_at = 0                # save and stop after this many steps without ending the schedule (0 = off)
# -- system --
device = 'auto'            # 'auto' (cuda if there is a GPU, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'bfloat16'         # on CUDA: bf16 autocast (paper 3.2) or 'float32' (fp16 would need a GradScaler); CPU: fp32
compile = False            # torch.compile each block in place (regional); preset paper: on

# --- presets --------------------------------------------------------------------------------------
PRESETS = {
    'cpu': {},   # the defaults above: a 1-layer model on synthetic data, a few minutes on a laptop CPU
    # paper 3.1: 24 layers, 8 heads, d = 512, T = 5, dropout 0.1 on the 64,000-token Cosmos vocabulary.
    # paper 3.2: effective batch 160, 80 epochs, warmup 2000 then linear from 8e-4 to 0, AdamW
    # (0.9, 0.95), weight decay 0.05 on matrices. The paper's ~306k samples per epoch (1.88B of the
    # 2.03B tokens) are non-overlapping two-block samples: sample_stride 2. Micro-batch 10 (our
    # choice) fits an 80 GB GPU with margin; 160 = 10 x GPUs x accumulation for 1, 2, 4, 8 or 16 GPUs.
    'paper': dict(data_dir='data/1x', download=True, sample_stride=2, vocab_size=data.VOCAB_SIZE, n_layer=24,
                  n_head=8, n_embd=512, dropout=0.1, global_batch_size=160, batch_size=10, epochs=80.0, max_iters=0,
                  learning_rate=8e-4, warmup_iters=2000, weight_decay=0.05, beta1=0.9, beta2=0.95,
                  eval_interval=2000, eval_samples=256, final_eval_samples=0, eval_batch_size=4,
                  log_interval=100, ckpt_interval=2000, num_workers=8, compile=True),
}

# --- configure: the preset, then config files and flags (configurator.py) -------------------------
given = configure(globals(), presets=PRESETS, gpu_preset='paper',
          choices=dict(sample_stride=(1, 2), dtype=('bfloat16', 'float32'),
                       init_from=('scratch', 'resume'), log_with=('none', 'tensorboard', 'wandb')),
          positive=('vocab_size', 'n_layer', 'n_head', 'n_embd', 'state_window', 'global_batch_size', 'batch_size',
                    'learning_rate', 'loss_chunk', 'eval_interval', 'eval_samples', 'eval_batch_size', 'log_interval'),
          nonnegative=('epochs', 'max_iters', 'warmup_iters', 'weight_decay', 'grad_clip', 'final_eval_samples',
                       'ckpt_interval', 'stop_at', 'num_workers', 'loss_spike'),
          fractions=('dropout', 'beta1', 'beta2'))

# --- derived settings and checks ------------------------------------------------------------------
# settings that define the model: a resume refuses other values given (every setting not given: the checkpoint's)
MODEL_KEYS = ('vocab_size', 'n_layer', 'n_head', 'n_embd', 'state_window', 'use_states')
if init_from == 'resume' and not eval_only:
    globals().update(checkpoints.settings_on_resume(out_dir, 'compression', globals(), given, MODEL_KEYS))
if max_iters == 0 and epochs == 0 and not eval_only:
    raise SystemExit("--max_iters=0 and --epochs=0: give the run a length (--max_iters=N steps, or --epochs=E)")
if n_embd % n_head:
    raise SystemExit(f"--n_embd={n_embd} must be divisible by --n_head={n_head}")
if global_batch_size % batch_size:
    raise SystemExit(f"--global_batch_size={global_batch_size} must be a multiple of --batch_size={batch_size}")
if shards and not all(s.strip().isdigit() for s in shards.split(',')):
    raise SystemExit(f"--shards={shards!r}: comma-separated shard numbers, e.g. --shards=0,1")
train_split_names = [s for s in train_splits.split(',') if s]
train_shards = [int(s) for s in shards.split(',')] if shards else None
if train_shards and len(set(train_shards)) < len(train_shards):
    raise SystemExit(f"--shards={shards!r} names a shard twice")
run_dir.check_log_with(log_with)
if state_window < data.SAMPLE_FRAMES:
    raise SystemExit(f"--state_window={state_window} must cover the {data.SAMPLE_FRAMES} frames of a sample")
config = {k: v for k, v in globals().items() if not k.startswith('_') and not k.isupper()
          and isinstance(v, (int, float, bool, str))}   # saved in checkpoints and the tracker
PAPER_TRAIN_SAMPLES = 306_000   # paper 3: the tokenized training set holds about 306,000 samples
T = data.SAMPLE_GRIDS - 1       # paper 3.1: T = 5 grids read (0..4), 1..5 predicted; fixed by the 6-grid sample
model_cfg = STConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, T=T, dropout=dropout,
                     state_window=state_window, use_states=use_states)

# --- the model's size (built on the meta device) and the disk the run will write ------------------
with torch.device('meta'):
    meta_model = STTransformer(model_cfg)
run_splits = [split] if eval_only else sorted(set(train_split_names) | {'val_v2.0'})   # the splits read
to_fetch = tokenized.tokenized_bytes(data_dir, run_splits, train_shards) if data_dir and download else 0
disk_lines, no_room = run_dir.disk_report(
    [(out_dir, run_dir.checkpoint_bytes(meta_model.num_params(), meta_model.num_params()), 'checkpoints')]
    + ([(data_dir, to_fetch, 'tokenized data to download')] if to_fetch else []))

# --- dry run: the model's size, the run's length and its disk, no data, no weights ----------------
if dry_run:
    print(f"settings: {json.dumps(config)}")
    print(f"{model_cfg}\nparameters: {meta_model.num_params():,} "
          f"(embedding/head {meta_model.tok_emb.weight.numel():,}, tied)\n"
          f"training FLOPs per sample: {meta_model.flops_per_sample():.3e}")
    if max_iters == 0:   # the real run counts its samples; the paper states about 306k
        print(f"steps: {epochs:g} epochs x {PAPER_TRAIN_SAMPLES:,} samples (the paper's count; a run counts "
              f"its data) / {global_batch_size} per step = {int(epochs * PAPER_TRAIN_SAMPLES // global_batch_size):,}")
    else:
        print(f"steps: {max_iters:,}")
    print(f"micro-batch {batch_size} per process: {global_batch_size} = {batch_size} x GPUs x accumulation "
          + ', '.join(f"({g} GPU{'s' if g > 1 else ''}: {global_batch_size // (batch_size * g)})"
                      for g in (1, 8, 16) if global_batch_size % (batch_size * g) == 0))
    print('\n'.join(disk_lines + [no_room] if no_room else disk_lines))
    raise SystemExit(0)
if no_room and not eval_only:
    raise SystemExit(no_room)


# --- helpers: the schedule, evaluation, checkpoints (of the data and model set up below) ----------
def get_lr(it, peak_lr, warmup_iters, max_iters):
    """Paper 3.2: linear warmup to peak_lr over warmup_iters steps, then linear decay to 0 at max_iters.
    Step it (from 0) takes get_lr(it): the peak at warmup_iters - 1 and warmup_iters, the last step
    (max_iters - 1) one decay step above 0; no step is wasted at learning rate 0."""
    if it < warmup_iters:
        return peak_lr * (it + 1) / warmup_iters
    return peak_lr * max(0.0, (max_iters - it) / max(1, max_iters - warmup_iters))


@torch.no_grad()
def evaluate(model, ds, num_samples, baselines=False):
    """Mean per-token Top-500 CE and full CE of the future grids 3, 4, 5 over the first
    num_samples samples of ds: teacher-forced (under autocast, as trained), greedy autoregressive
    (in fp32, paper 3.2-3.3), and the baselines if asked. Returns name -> (top500, full).
    A non-finite figure stops the run: a NaN metric is never printed as a result."""
    model.eval()
    V = model.cfg.vocab_size
    n = len(ds) if num_samples <= 0 else min(num_samples, len(ds))
    # own generator: evaluating must not draw from the global RNG (only rank 0 evaluates)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=eval_batch_size,
                                         num_workers=num_workers, generator=torch.Generator())
    world = ds.metadata.get('synthetic')
    sums, copy_src, targets = {}, [], []

    def add(name, logits, target):
        s = sums.setdefault(name, [0.0, 0.0, 0])
        logits_NV, target_N = logits.reshape(-1, V), target.reshape(-1)
        for i in range(0, len(target_N), 4096):  # in chunks: fp32 logits over 64k tokens are large
            chunk_NV, chunk_N = logits_NV[i:i + 4096].float(), target_N[i:i + 4096]
            s[0] += cross_entropy_topk(chunk_NV, chunk_N).sum().item()
            s[1] += torch.nn.functional.cross_entropy(chunk_NV, chunk_N, reduction='sum').item()
            s[2] += len(chunk_N)

    for z_BGHW, states_BLD in tqdm(loader, desc='eval', leave=False, disable=None if baselines else True):
        z_BGHW, states_BLD = z_BGHW.to(device), states_BLD.to(device)
        future_BMHW = z_BGHW[:, 3:]
        with autocast:
            add('model, teacher-forced', model(z_BGHW[:, :T], states_BLD, predict_from=2), future_BMHW)
        _, logits = model.generate(z_BGHW[:, :3], states_BLD, num_grids=3)
        add('model, greedy autoregressive', logits, future_BMHW)
        if baselines:
            add('uniform over the vocabulary', torch.zeros(1, V, device=device).expand(future_BMHW.numel(), V), future_BMHW)
            copy_src.append(z_BGHW[:, 2:3].expand_as(future_BMHW).cpu())
            targets.append(future_BMHW.cpu())
            if world is not None:
                for name, use in (('Bayes floor (states known)', True), ('state-blind floor', False)):
                    add(name, synthetic_tokens.synthetic_oracle_logits(z_BGHW.cpu(), states_BLD.cpu(), world, use).to(device), future_BMHW)
    if baselines:
        # copy the last context grid into grids 3, 4, 5, with the best constant confidence a:
        # p(copied token) = a, every other token (1 - a) / (V - 1); a = the fraction that matches
        src, tgt = torch.cat(copy_src).reshape(-1), torch.cat(targets).reshape(-1)
        a = min(max((src == tgt).double().mean().item(), 1e-6), 1 - 1e-6)
        for i in range(0, len(tgt), 4096):   # on the model's device: 64k-wide rows are slow on a CPU
            s, t = src[i:i + 4096].to(device), tgt[i:i + 4096].to(device)
            logits = torch.full((len(t), V), math.log((1 - a) / (V - 1)), device=device)
            add('copy the last context grid', logits.scatter_(1, s[:, None], math.log(a)), t)
    model.train()
    results = {k: (v[0] / v[2], v[1] / v[2]) for k, v in sums.items()}
    bad = [f"{name}: Top-500 CE {top}, CE {full}" for name, (top, full) in results.items()
           if not (math.isfinite(top) and math.isfinite(full))]
    if bad:
        raise SystemExit(f"evaluation on {ds.split_dir} gave non-finite figures ({'; '.join(bad)}): the model's "
                         f"weights or the data hold NaN/inf; nothing was saved from them: {checkpoints.CKPT} and "
                         f"{checkpoints.PREV} in {out_dir} (if any) hold earlier states")
    return results


def print_table(results, world=None):
    if world is not None:   # a synthetic set: its Bayes floor in closed form too
        floors = synthetic_tokens.synthetic_floors(world['vocab'], world['eps'], world['p_new'])
        results = {**results, 'Bayes floor, closed form': (floors['topk'], floors['full'])}
    print(f"{'':34s} {'Top-500 CE':>10s} {'full CE':>8s}")
    for name, (top, full) in results.items():
        print(f"{name:34s} {top:10.4f} {full:8.4f}")


def save_checkpoint(step, metric):
    state = dict(kind='compression', model=raw_model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                 model_cfg=dict(vars(model_cfg)), config=checkpoints.plain(config), guard=guard.state_dict())
    checkpoints.save_checkpoint(out_dir, state, metric, trusted=guard.trusted)   # and ckpt_prev.pt, ckpt_best.pt


# --- processes: DDP under torchrun, the precision; rank 0 claims out_dir --------------------------
# torchrun sets RANK: DDP, as nanoGPT
_, rank, world_size, device = setup_distributed(resolve_device(device, mps=True))
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu' if device == 'cpu' else device
ptdtype = torch.bfloat16 if device_type == 'cuda' and dtype == 'bfloat16' else torch.float32
autocast = torch.autocast(device_type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
if not eval_only:
    grad_accum = grad_accum_steps(global_batch_size, batch_size, world_size)
    # before any work: no training over a checkpoint by accident, a writable folder, one run at a time
    on_master(run_dir.claim, out_dir, init_from == 'resume', overwrite)
    if master:
        print(f"{world_size} process(es) x batch {batch_size} x {grad_accum} accumulation = global batch "
              f"{global_batch_size}")

# --- data: the 1X splits (missing ones downloaded) or the synthetic set ---------------------------
demo = not data_dir
if data_dir:   # whole, or (--download) every rank fetches its share of what is missing
    tokenized.tokenized_splits(data_dir, run_splits, train_shards, rank, world_size, download)
else:          # data/synthetic, written by rank 0 on first use
    on_master(synthetic_tokens.default_synthetic_dir)
    wait_for_all('the synthetic data')
    data_dir = synthetic_tokens.default_synthetic_dir()


def read_split(name, **kw):
    """data.TokenDataset of a split; a missing or damaged file stops the run with its name."""
    try:
        return data.TokenDataset(os.path.join(data_dir, name), **kw)
    except (ValueError, FileNotFoundError) as e:
        fix = f"\n({data_dir} is the demo's synthetic set: if a file there is damaged, delete the folder and the " \
              f"next run writes it anew)" if demo else ''
        raise SystemExit(f"{e}{fix}")


if eval_only:   # the checkpoint's model, as it was trained, on --split: the table, then exit
    ckpt = ckpt or os.path.join(out_dir, checkpoints.CKPT)
    state = checkpoints.load_checkpoint(ckpt, 'compression')
    raw_model = STTransformer(STConfig(**state['model_cfg'])).to(device)
    raw_model.load_state_dict(state['model'])
    eval_ds = read_split(split, vocab_size=raw_model.cfg.vocab_size, state_window=raw_model.cfg.state_window)
    n = len(eval_ds) if final_eval_samples <= 0 else min(final_eval_samples, len(eval_ds))
    print(f"{ckpt} (step {state['step']}) on {split}: its first {n} of {len(eval_ds)} samples "
          f"(--final_eval_samples=0: all)")
    print_table(evaluate(raw_model, eval_ds, final_eval_samples, baselines=True), eval_ds.metadata.get('synthetic'))
    raise SystemExit(0)

train_parts = [read_split(s, shards=train_shards if s == 'train_v2.0' else None, vocab_size=vocab_size,
                          state_window=state_window, stride=sample_stride) for s in train_split_names]
train_ds = torch.utils.data.ConcatDataset(train_parts)
val_ds = read_split('val_v2.0', vocab_size=vocab_size, state_window=state_window)
for ds in (*train_parts, val_ds):
    world = ds.metadata.get('synthetic')
    if world is not None and world['vocab'] != vocab_size:
        raise SystemExit(f"{ds.split_dir} is a synthetic set of vocabulary {world['vocab']}, but --vocab_size="
                         f"{vocab_size} (preset {preset}): pass --vocab_size={world['vocab']}, or a --data_dir "
                         f"with the 1X data")
if master:   # damage in the val split stops the run now, not at the first validation
    try:
        val_ds.check_tokens()
    except ValueError as e:
        raise SystemExit(f"the validation split: {e}")
if len(train_ds) < global_batch_size:
    raise SystemExit(f"the training set has {len(train_ds)} samples, fewer than --global_batch_size="
                     f"{global_batch_size}: lower --global_batch_size (and --batch_size), pass --sample_stride=1 for "
                     f"more samples, or more data")
if max_iters == 0:
    max_iters = int(epochs * len(train_ds) // global_batch_size)
if master:
    if 'val_v2.0' in train_split_names:
        print("training on val_v2.0 too: the validation figures below are not held-out numbers")
    print(f"data {data_dir}: {len(train_ds)} train samples ({', '.join(train_split_names)}, one every "
          f"{sample_stride} block{'s' if sample_stride > 1 else ''}) / {len(val_ds)} val; {max_iters} steps "
          f"({max_iters * global_batch_size / len(train_ds):.2f} epochs)")

# --- model and optimizer (and the state of a resumed run) -----------------------------------------
torch.manual_seed(seed)  # the same on every rank: identical initial weights
raw_model = STTransformer(model_cfg).to(device)
optimizer = torch.optim.AdamW(raw_model.param_groups(weight_decay), lr=learning_rate, betas=(beta1, beta2),
                              fused=device_type == 'cuda')  # paper 3.2: fused AdamW
start_step, saved_guard = 0, None
ckpt_path = os.path.join(out_dir, checkpoints.CKPT)
if init_from == 'resume':   # loaded to the CPU, tensors and plain data only (never runs code)
    state = checkpoints.load_checkpoint(ckpt_path, 'compression', expect={k: config[k] for k in MODEL_KEYS})
    raw_model.load_state_dict(state['model'])
    optimizer.load_state_dict(state['optimizer'])
    changed = checkpoints.optimizer_settings_on_resume(   # the flags given now (the lr follows get_lr every step)
        optimizer, [dict(weight_decay=wd, betas=(beta1, beta2)) for wd in (weight_decay, 0.0)], state['config'], config)
    start_step, saved_guard = state['step'], state.get('guard')   # the loss-spike rule's history too
    if master:
        print(f"resumed from {ckpt_path} at step {start_step}" + (f"; {changed}" if changed else ''))
if compile:   # regional: each block (one graph serves them all) and the loss chunk, so it compiles in about a minute
    raw_model.compile_blocks()
train_model = raw_model   # what the loop calls; raw_model is saved
if world_size > 1:   # one process has no gradients to sync: no DDP hooks for nothing
    train_model = DDP(train_model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)
if master:
    print(f"model: {raw_model.num_params():,} parameters, {raw_model.flops_per_sample():.3e} training FLOPs per sample, "
          f"device {device}")

# --- training loop --------------------------------------------------------------------------------
stop = min(max_iters, stop_at) if stop_at > 0 else max_iters
if start_step >= stop:
    raise SystemExit(f"{ckpt_path} is at step {start_step} already, and this run ends at step {stop} (--max_iters, "
                     f"--epochs, --stop_at): pass a later end to train on, or --eval_only to evaluate the checkpoint")
# this process's micro-batches, step by step: the rows of its positions in each step's global
# batch, the same under any world size (data.batch_rows)
micro_batches = (data.batch_rows(seed, s, data.batch_positions(micro, rank, world_size, batch_size),
                                 global_batch_size, len(train_ds))
                 for s in range(start_step, stop) for micro in range(grad_accum))
# own generator: building the loader must not draw from the global RNG that dropout uses
loader = iter(torch.utils.data.DataLoader(train_ds, batch_sampler=micro_batches, num_workers=num_workers,
                                          pin_memory=device_type == 'cuda', generator=torch.Generator(),
                                          persistent_workers=False))
log = run_dir.RunLog(out_dir, start_step, log_with, config, wandb_project, wandb_run_name, total=stop,
                     log_interval=log_interval) if master else None
speed = StepSpeed(device, global_batch_size, raw_model.flops_per_sample() * batch_size * grad_accum)
guard = run_dir.DivergenceGuard(out_dir, loss_spike, master, start_step, saved_guard)   # the loss-spike rule
t0 = time.time()
for step in range(start_step, stop):
    speed.start()
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        # dropout's masks from (seed, step, rank, micro-step): each rank draws its own, and a resumed run
        # draws what an uninterrupted one would (nothing else in training is random)
        torch.manual_seed(hash((seed, step, rank, micro)) % 2 ** 62)
        z_BGHW, states_BLD = (x.to(device, non_blocking=True) for x in next(loader))
        # gradients are all-reduced only on the last micro-step
        sync = nullcontext() if world_size == 1 or micro == grad_accum - 1 else train_model.no_sync()
        with sync:
            with autocast:   # the forward only (backward runs in the dtypes the forward chose)
                # positions 2..4 predict grids 3..5 (paper 3.2: the loss on the future grids only)
                loss = train_model(z_BGHW[:, :T], states_BLD, predict_from=2, targets_BTHW=z_BGHW[:, 3:T + 1],
                                   loss_chunk=loss_chunk)
            (loss / grad_accum).backward()
        loss_sum += loss.detach() / grad_accum
    loss_value = mean_over_ranks(loss_sum).item()   # the same on every rank: a NaN on one stops them all
    grad_norm = torch.nn.utils.clip_grad_norm_(train_model.parameters(), grad_clip or math.inf).item()   # 0: no clip
    # a NaN, inf or spiking loss stops the run before the weights change: ckpt.pt stays the last good state
    done = step + 1   # step N: after N optimizer steps, in the log, the console and ckpt.pt alike
    guard.check({'training loss': loss_value, 'gradient norm': grad_norm}, done)
    lr = get_lr(step, learning_rate, warmup_iters, max_iters)
    for group in optimizer.param_groups:
        group['lr'] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not master:
        continue
    record = dict(step=done, loss=loss_value, lr=lr, grad_norm=grad_norm, **speed.stop())
    if done % eval_interval == 0 or done == max_iters:
        # the fixed val subset, teacher-forced and greedy autoregressive (the challenge's number)
        val = evaluate(raw_model, val_ds, eval_samples)
        (tf_top, tf_ce), (ar_top, ar_ce) = val['model, teacher-forced'], val['model, greedy autoregressive']
        record.update(val_tf_top500=tf_top, val_tf_ce=tf_ce, val_ar_top500=ar_top, val_ar_ce=ar_ce)
    log.write(record)
    if 'val_ar_top500' in record:
        tqdm.write(f"step {done}: val Top-500 CE ({min(eval_samples, len(val_ds))} samples) teacher-forced "
                   f"{tf_top:.4f}, greedy autoregressive {ar_top:.4f}")
    if (ckpt_interval > 0 and done % ckpt_interval == 0) or done == stop:
        save_checkpoint(done, record.get('val_ar_top500'))   # ckpt_best.pt: the lowest greedy AR Top-500 CE

# --- the end: curves, the final table -------------------------------------------------------------
if master:
    print(f"trained to step {stop} in {time.time() - t0:.0f} s; checkpoint {ckpt_path}")
    log.close(curves=[('cross-entropy (nats)', ['loss', 'val_tf_ce', 'val_ar_ce']),
                      ('Top-500 CE (nats)', ['val_tf_top500', 'val_ar_top500'])],
              title=f'compression: train (teacher-forced) and val ({eval_samples} samples)')
if master and final_eval and stop == max_iters:
    results = evaluate(raw_model, val_ds, final_eval_samples, baselines=True)
    print(f"\nval_v2.0 ({len(val_ds) if final_eval_samples <= 0 else min(final_eval_samples, len(val_ds))} samples), "
          f"per token of the future grids 3-5, nats; Top-500 CE as defined in metrics.py:")
    print_table(results, val_ds.metadata.get('synthetic'))
    with written(os.path.join(out_dir, 'results.json'), 'then copy the table above') as tmp, open(tmp, 'w') as f:
        json.dump({k: dict(top500=v[0], ce=v[1]) for k, v in results.items()}, f, indent=1)
finish()   # every rank together, then the process groups go (distributed.py)
