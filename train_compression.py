"""Train (or evaluate) the ST-Transformer of the compression track (paper section 3).

    python train_compression.py                    # CPU, synthetic data in the 1X layout, < 5 min
    python train_compression.py --preset=paper --data_dir=/data/1x   # the paper's model
    torchrun --nproc_per_node 8 train_compression.py --preset=paper --data_dir=/data/1x
    python train_compression.py --eval_only --ckpt=out/compression/ckpt.pt --split=val_v2.0
    python train_compression.py --preset=paper --dry_run            # parameter count, no data

Settings are the module globals below; `--key=value` overrides them (configurator.py).
`--preset=paper` first sets the paper's numbers, then the other flags override those.
Ends with a table: Top-500 CE (and full CE) of the model, teacher-forced and greedy
autoregressive, next to baselines and, on synthetic data, the exact Bayes floor.
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from st_transformer import STConfig, STTransformer, cross_entropy_topk, get_lr

# --- settings (defaults: the CPU run on synthetic data) ---------------------------------------
preset = 'cpu'             # 'cpu' or 'paper' (PRESETS below)
data_dir = ''              # folder holding train_v2.0/ and val_v2.0/; '' = data/synthetic, made on first use
download = False           # fetch the data into data_dir with huggingface_hub first
shards = ''                # train shards to use, e.g. '0' or '0,1' ('' = all in metadata.json)
out_dir = 'out/compression'
eval_only = False
ckpt = ''                  # checkpoint for --eval_only
split = 'val_v2.0'         # split that --eval_only evaluates
resume = False             # continue from out_dir/ckpt.pt
dry_run = False            # build the model on the meta device, print its size, exit
# model
vocab_size = 1000          # synthetic tokens lie in [0, 1000); the real data needs 64000
n_layer = 1
n_head = 4
n_embd = 64
T = 5                      # paper 3.1: grids 0..4 are read, grids 1..5 predicted
dropout = 0.0
state_window = data.STATE_WINDOW
use_states = True
# optimisation (paper 3.2)
total_batch_size = 4       # samples per optimizer step (paper: 160), via gradient accumulation
batch_size = 4             # samples per micro-step per process
epochs = 0.0               # length of the run in passes over the training set ...
max_iters = 300            # ... or in steps, when epochs == 0
learning_rate = 5e-3       # peak; linear warmup then linear decay to 0 (paper: 8e-4)
warmup_iters = 20
weight_decay = 0.05        # on matrices only (STTransformer.param_groups)
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0            # not stated in the paper; the usual GPT-2 value
# evaluation and bookkeeping
eval_interval = 100
eval_samples = 16          # teacher-forced val samples at each eval_interval
final_eval_samples = 48    # samples for the final table (0 = the whole split)
final_eval = True          # print the table at the end of the run
eval_batch_size = 8
ckpt_interval = 0          # save every this many steps (0 = only at the end)
stop_at = 0                # save and stop after this many steps without ending the schedule (0 = off)
num_workers = 1
seed = 1337
device = 'auto'            # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'bfloat16'         # autocast dtype on CUDA (paper 3.2: bf16 AMP); the CPU runs in fp32
compile = False

_settings = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
PRESETS = {
    # paper 3.1-3.2: 24 layers, 8 heads, d = 512, T = 5, dropout 0.1, batch 160, 80 epochs,
    # warmup 2000, peak 8e-4 linear to 0, AdamW (0.9, 0.95), wd 0.05 on matrices.
    'paper': dict(vocab_size=data.VOCAB_SIZE, n_layer=24, n_head=8, n_embd=512, T=5, dropout=0.1,
                  total_batch_size=160, batch_size=20, epochs=80.0, learning_rate=8e-4, warmup_iters=2000,
                  weight_decay=0.05, beta1=0.9, beta2=0.95, eval_interval=2000, eval_samples=512,
                  final_eval_samples=0, eval_batch_size=4, ckpt_interval=2000, num_workers=8),
}
for _arg in sys.argv[1:]:  # the preset goes first so that every other flag can override it
    if _arg.startswith('--preset='):
        preset = _arg.split('=', 1)[1]
        if preset != 'cpu' and preset not in PRESETS:
            raise SystemExit(f"--preset={preset}: unknown; choose cpu or {', '.join(PRESETS)}")
        globals().update(PRESETS.get(preset, {}))
from configurator import configure  # noqa: E402
configure(globals())
config = {k: globals()[k] for k in _settings}  # saved in checkpoints


class StepBatches(torch.utils.data.Sampler):
    """Index lists of the micro-batches of this process, from step `start` on.

    Step s of a run uses samples perm[s * total : (s + 1) * total] of a per-epoch permutation
    (seeded by seed + epoch), and micro-step m of rank r takes the slice (m * world + r) of
    them. So the data of a step depends only on (seed, step): resuming is exact, and 2 ranks x 1
    micro-step see the same samples as 1 rank x 2 micro-steps."""

    def __init__(self, n, start, stop, batch, accum, world, rank, seed):
        self.n, self.start, self.stop, self.batch, self.accum = n, start, stop, batch, accum
        self.world, self.rank, self.seed = world, rank, seed
        self.total = batch * accum * world
        assert n >= self.total, f"the training set has {n} samples, fewer than total_batch_size={self.total}"

    def __len__(self):
        return (self.stop - self.start) * self.accum

    def __iter__(self):
        per_epoch = self.n // self.total  # the last partial batch of each epoch is dropped
        for step in range(self.start, self.stop):
            epoch, s = divmod(step, per_epoch)
            perm = np.random.default_rng(self.seed + epoch).permutation(self.n)
            for m in range(self.accum):
                first = s * self.total + (m * self.world + self.rank) * self.batch
                yield perm[first:first + self.batch].tolist()


@torch.no_grad()
def evaluate(model, ds, num_samples, autoregressive, autocast):
    """Mean per-token Top-500 CE and full CE of the future grids 3, 4, 5 over the first
    num_samples samples of ds (teacher-forced; and greedy autoregressive if asked, in fp32),
    with the baselines. Returns a dict of name -> (top500, full)."""
    model.eval()
    dev = next(model.parameters()).device
    V = model.cfg.vocab_size
    n = len(ds) if num_samples <= 0 else min(num_samples, len(ds))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=eval_batch_size,
                                         num_workers=num_workers)
    world = ds.metadata.get('synthetic')
    sums, copy_src, targets = {}, [], []

    def add(name, logits, target):
        s = sums.setdefault(name, [0.0, 0.0, 0])
        logits_NV, target_N = logits.reshape(-1, V), target.reshape(-1)
        for i in range(0, len(target_N), 4096):  # in chunks: fp32 logits over 64k tokens are large
            chunk_NV, chunk_N = logits_NV[i:i + 4096].float(), target_N[i:i + 4096]
            s[0] += cross_entropy_topk(chunk_NV, chunk_N).sum().item()
            s[1] += F.cross_entropy(chunk_NV, chunk_N, reduction='sum').item()
            s[2] += len(chunk_N)

    for z_BGHW, states_BLD in tqdm(loader, desc='eval', leave=False, disable=not autoregressive):
        z_BGHW, states_BLD = z_BGHW.to(dev), states_BLD.to(dev)
        future_BMHW = z_BGHW[:, 3:]
        with autocast:
            add('model, teacher-forced', model(z_BGHW[:, :T], states_BLD, predict_from=2), future_BMHW)
        if autoregressive:
            _, logits = model.generate(z_BGHW[:, :3], states_BLD, num_grids=3)
            add('model, greedy autoregressive', logits, future_BMHW)
            add('uniform over the vocabulary', torch.zeros(1, V, device=dev).expand(future_BMHW.numel(), V), future_BMHW)
            copy_src.append(z_BGHW[:, 2:3].expand_as(future_BMHW).cpu())
            targets.append(future_BMHW.cpu())
            if world is not None:
                for name, use in (('Bayes floor (states known)', True), ('state-blind floor', False)):
                    add(name, data.synthetic_oracle_logits(z_BGHW.cpu(), states_BLD.cpu(), world, use).to(dev), future_BMHW)
    if autoregressive:
        # copy the last context grid into grids 3, 4, 5, with the best constant confidence a:
        # p(copied token) = a, every other token (1 - a) / (V - 1); a = the fraction that matches
        src, tgt = torch.cat(copy_src).reshape(-1), torch.cat(targets).reshape(-1)
        a = min(max((src == tgt).double().mean().item(), 1e-6), 1 - 1e-6)
        for i in range(0, len(tgt), 4096):
            s, t = src[i:i + 4096], tgt[i:i + 4096]
            logits = torch.full((len(t), V), math.log((1 - a) / (V - 1))).scatter_(1, s[:, None], math.log(a))
            add('copy the last context grid', logits, t)
    model.train()
    return {k: (v[0] / v[2], v[1] / v[2]) for k, v in sums.items()}


def print_table(results, world=None):
    lines = [f"{'':34s} {'Top-500 CE':>10s} {'full CE':>8s}"]
    for name, (top, full) in results.items():
        lines.append(f"{name:34s} {top:10.4f} {full:8.4f}")
    if world is not None:
        floors = data.synthetic_floors(world['vocab'], world['eps'], world['p_new'])
        lines.append(f"{'Bayes floor, closed form':34s} {floors['topk']:10.4f} {floors['full']:8.4f}")
    print('\n'.join(lines))


# --- setup: device, distributed, data, model ---------------------------------------------------
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
ddp, rank, world_size, device = data.setup_distributed(device)   # torchrun sets RANK: DDP
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu' if device == 'cpu' else device
autocast = (torch.autocast(device_type, dtype={'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype])
            if device_type == 'cuda' else nullcontext())
torch.manual_seed(seed)  # the same on every rank: identical initial weights

model_cfg = STConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, T=T, dropout=dropout,
                     state_window=state_window, use_states=use_states)
if dry_run:
    with torch.device('meta'):
        meta_model = STTransformer(model_cfg)
    print(f"settings: {json.dumps(config)}")
    print(f"{model_cfg}\nparameters: {meta_model.num_params():,} "
          f"(embedding/head {meta_model.tok_emb.weight.numel():,}, tied)\n"
          f"training FLOPs per sample: {meta_model.flops_per_sample():.3e}")
    raise SystemExit(0)

train_shards = [int(s) for s in shards.split(',')] if shards else None
if download:
    assert data_dir, "--download needs --data_dir=<folder to download into>"
    if master:
        data.download_tokenized(data_dir, 'train_v2.0', train_shards)
        data.download_tokenized(data_dir, 'val_v2.0')
    if ddp:
        dist.barrier()
if not data_dir:
    if master:
        data.default_synthetic_dir()  # rank 0 writes it on first use
    if ddp:
        dist.barrier()
    data_dir = data.default_synthetic_dir()
split_dir = lambda name: os.path.join(data_dir, name)

if eval_only:
    assert ckpt, "--eval_only needs --ckpt=<path to ckpt.pt>"
    state = torch.load(ckpt, map_location='cpu', weights_only=False)
    model = STTransformer(STConfig(**state['model_cfg'])).to(device)
    model.load_state_dict(state['model'])
    ds = data.TokenDataset(split_dir(split), vocab_size=model.cfg.vocab_size, state_window=model.cfg.state_window)
    print(f"{ckpt} (step {state['step']}) on {split} ({len(ds)} samples):")
    print_table(evaluate(model, ds, final_eval_samples, True, autocast), ds.metadata.get('synthetic'))
    raise SystemExit(0)

train_ds = data.TokenDataset(split_dir('train_v2.0'), train_shards, vocab_size=vocab_size, state_window=state_window)
val_ds = data.TokenDataset(split_dir('val_v2.0'), vocab_size=vocab_size, state_window=state_window)
assert total_batch_size % (batch_size * world_size) == 0, \
    f"total_batch_size={total_batch_size} must be a multiple of batch_size={batch_size} x {world_size} processes"
grad_accum = total_batch_size // (batch_size * world_size)
if epochs > 0:
    max_iters = int(epochs * len(train_ds) // total_batch_size)

model = STTransformer(model_cfg).to(device)
optimizer = torch.optim.AdamW(model.param_groups(weight_decay), lr=learning_rate, betas=(beta1, beta2),
                              fused=device_type == 'cuda')  # paper 3.2: fused AdamW
step = 0
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if resume:
    assert os.path.exists(ckpt_path), f"--resume but {ckpt_path} does not exist (train first, or pass --out_dir)"
    state = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    model.load_state_dict(state['model'])
    optimizer.load_state_dict(state['optimizer'])
    step = state['step']
    torch.set_rng_state(state['rng_cpu'])  # dropout continues exactly where it stopped
    if device_type == 'cuda' and state.get('rng_cuda') is not None:
        torch.cuda.set_rng_state(state['rng_cuda'])
    print(f"resumed from {ckpt_path} at step {step}")
raw_model = model
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"data {data_dir}: {len(train_ds)} train / {len(val_ds)} val samples; {world_size} process(es) x "
          f"{grad_accum} micro-steps x {batch_size} = {total_batch_size} samples per step, {max_iters} steps")
    print(f"model: {raw_model.num_params():,} parameters, {raw_model.flops_per_sample():.3e} training FLOPs per sample, "
          f"device {device}")


def save_checkpoint():
    state = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                 model_cfg=vars(model_cfg), config=config, rng_cpu=torch.get_rng_state(),
                 rng_cuda=torch.cuda.get_rng_state() if device_type == 'cuda' else None)
    torch.save(state, ckpt_path + '.tmp')
    os.replace(ckpt_path + '.tmp', ckpt_path)  # never leave a half-written checkpoint


# --- training loop -------------------------------------------------------------------------
stop = min(max_iters, stop_at) if stop_at > 0 else max_iters
sampler = StepBatches(len(train_ds), step, stop, batch_size, grad_accum, world_size, rank, seed)
# own generator: building the loader must not draw from the global RNG that dropout uses
loader = iter(torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=num_workers,
                                          pin_memory=device_type == 'cuda', generator=torch.Generator(),
                                          persistent_workers=False))
log = open(os.path.join(out_dir, 'log.jsonl'), 'a') if master else None
bar = tqdm(total=stop, initial=step, desc='train', disable=not master, dynamic_ncols=True)
t0 = time.time()
# MFU as nanoGPT prints it: this process's model FLOPs per step over its time and the device's
# bf16 peak (None on the CPU and unknown GPUs: then no MFU), averaged once warm-up has passed
peak = data.peak_flops(device)
flops_per_step = raw_model.flops_per_sample() * batch_size * grad_accum
first_step, running_mfu = step, -1.0
while step < stop:
    t_step = time.time()
    lr = get_lr(step, learning_rate, warmup_iters, max_iters)
    for group in optimizer.param_groups:
        group['lr'] = lr
    loss_sum = 0.0
    for micro in range(grad_accum):
        z_BGHW, states_BLD = (x.to(device, non_blocking=True) for x in next(loader))
        # gradients are all-reduced only on the last micro-step
        sync = nullcontext() if (not ddp or micro == grad_accum - 1) else model.no_sync()
        with sync, autocast:
            logits = model(z_BGHW[:, :T], states_BLD, predict_from=2)  # positions 2..4 -> grids 3..5
            loss = F.cross_entropy(logits.flatten(0, -2).float(), z_BGHW[:, 3:T + 1].reshape(-1))
            (loss / grad_accum).backward()
        loss_sum += loss.item() / grad_accum
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dt = time.time() - t_step
    step += 1
    if master:
        record = dict(step=step - 1, loss=loss_sum, lr=lr, samples_per_s=total_batch_size / dt)
        postfix = dict(loss=f'{loss_sum:.4f}', lr=f'{lr:.2e}', samples_s=f'{total_batch_size / dt:.1f}')
        if peak and step - first_step > 5:
            mfu = flops_per_step / dt / peak
            running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
            record['mfu'] = running_mfu
            postfix['mfu'] = f'{100 * running_mfu:.1f}%'
        if step % eval_interval == 0 or step == max_iters:
            val = evaluate(raw_model, val_ds, eval_samples, False, autocast)['model, teacher-forced']
            record.update(val_top500=val[0], val_ce=val[1])
            tqdm.write(f"step {step}: val teacher-forced Top-500 CE {val[0]:.4f}, CE {val[1]:.4f}")
        log.write(json.dumps(record) + '\n')
        log.flush()
        bar.set_postfix(**postfix)
        bar.update(1)
        if (ckpt_interval > 0 and step % ckpt_interval == 0) or step == stop:
            save_checkpoint()
bar.close()
if master:
    print(f"trained {step} steps in {time.time() - t0:.0f} s; checkpoint {ckpt_path}")
if step == max_iters and master and final_eval:
    results = evaluate(raw_model, val_ds, final_eval_samples, True, autocast)
    print(f"\nval_v2.0 ({len(val_ds) if final_eval_samples <= 0 else min(final_eval_samples, len(val_ds))} samples), "
          f"per token of the future grids 3-5, nats; Top-500 CE as defined in st_transformer.py:")
    print_table(results, val_ds.metadata.get('synthetic'))
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
        json.dump({k: dict(top500=v[0], ce=v[1]) for k, v in results.items()}, f, indent=1)
if ddp:
    dist.destroy_process_group()
