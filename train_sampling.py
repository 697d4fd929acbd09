"""Train the sampling-track world model: Wan 2.2 TI2V-5B + state conditioning (paper 2.1, 2.2).

CPU demo (no flags): writes synthetic raw clips to data/sampling_demo/ (the 1X layout, 32x32
frames that follow the states), encodes them with the pixel codec, trains a tiny WanDiT from
scratch for a few minutes and saves out_sampling/ckpt.pt. Then `python sample.py --ensemble=16`.

Full scale, the paper's recipe (README: data preparation first):
    torchrun --nnodes 4 --nproc_per_node 8 train_sampling.py --preset=paper --data_dir=data/1x

The recipe (paper 2.2): flow matching as Wan does it, x_t = (1 - s) x0 + s noise, target
v = noise - x0, s drawn uniformly then shifted; the 2 context latents are held clean (per-token
timestep 0) and left out of the loss; empty-prompt text context; robot states through AdaLN-Zero,
dropped with p = 0.1 for classifier-free guidance; LoRA rank 32 on a frozen bf16 base; AdamW at a
constant 4e-4; global batch 1024 = per-GPU batch x GPUs x accumulation.

Exactness: every random draw of a sample (noise, timestep, state dropout) comes from a generator
seeded by (seed, step, position in the global batch), and every micro-batch has the same size, so
the run computes the same gradients whatever the number of GPUs, and a resumed run continues
exactly as if it had never stopped (tests check both).
"""
import json
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import data
from wan_state import WanConfig, WanDiT, add_lora, frame_timesteps, null_context


# ---------------------------------------------------------------------------------------------
# Flow matching (shared with sample.py and the tests)
# ---------------------------------------------------------------------------------------------

def shift_sigma(u, shift):
    """Wan's timestep shift: s' = shift s / (1 + (shift - 1) s); shift > 1 spends more steps near noise."""
    return shift * u / (1 + (shift - 1) * u)


def latent_mask(batch, num_latents=data.NUM_LATENTS, num_context=data.NUM_CONTEXT_LATENTS, device='cpu'):
    """[B, F] frame mask: 0 on the context latents (held clean), 1 on the latents to generate."""
    mask_BF = torch.ones(batch, num_latents, device=device)
    mask_BF[:, :num_context] = 0
    return mask_BF


def flow_matching_loss(model, z0_BCFHW, states_BTD, context_BLD, sigma_B, noise_BCFHW, drop_B,
                       num_context=data.NUM_CONTEXT_LATENTS):
    """Mean squared error of the predicted velocity on the latents to generate (context excluded).

    The context latents enter clean, with timestep 0 on their tokens, as TI2V holds its first frame
    (../shared/WAN22.md); their output is not a prediction of anything, so it is left out of the loss.
    """
    B, C, Fr, H, W = z0_BCFHW.shape
    mask_BF = latent_mask(B, Fr, num_context, z0_BCFHW.device)
    s = sigma_B.view(B, 1, 1, 1, 1)
    x_t = (1 - s) * z0_BCFHW + s * noise_BCFHW
    x_t = torch.where(mask_BF.view(B, 1, Fr, 1, 1) == 0, z0_BCFHW, x_t)
    v_BCFHW = model(x_t, frame_timesteps(mask_BF, 1000 * sigma_B), context_BLD, states_BTD, drop_B)
    target = noise_BCFHW - z0_BCFHW
    return F.mse_loss(v_BCFHW[:, :, num_context:].float(), target[:, :, num_context:].float())


def sample_draws(seed, step, positions, latent_shape, shift, p_drop):
    """Per-sample randomness, a function of (seed, step, position in the global batch) only."""
    sigma, noise, drop = [], [], []
    for pos in positions:
        g = torch.Generator().manual_seed(hash((seed, step, pos)) % 2 ** 62)
        sigma.append(shift_sigma(torch.rand(1, generator=g), shift))
        noise.append(torch.randn(latent_shape, generator=g))
        drop.append(torch.rand(1, generator=g) < p_drop)
    return torch.cat(sigma), torch.stack(noise), torch.cat(drop)


def dataset_rows(seed, sample_numbers, n):
    """Dataset rows for the run's k-th samples (k counts every sample of every step): epoch after
    epoch through a permutation seeded by (seed, epoch)."""
    perms, rows = {}, []
    for number in sample_numbers:
        epoch, k = divmod(number, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(hash((seed, epoch)) % 2 ** 62))
        rows.append(int(perms[epoch][k]))
    return rows


# ---------------------------------------------------------------------------------------------
# Model and text context (shared with sample.py)
# ---------------------------------------------------------------------------------------------

def build_model(model, pretrained, train_mode, lora_rank, lora_alpha, init_seed, device, base_dtype, tiny):
    """The DiT to fine-tune. pretrained = '' builds random weights from init_seed (tiny demo, timing).
    train_mode 'lora': frozen base + LoRA + state parameters (the paper); 'full': every weight
    (the CPU demo, whose base is random: LoRA on a random base has nothing to adapt)."""
    torch.manual_seed(init_seed)
    if pretrained:
        net = WanDiT.from_pretrained(pretrained, state_cond=True, device=device, dtype=base_dtype)
    else:
        cfg = WanConfig.tiny(**tiny) if model == 'tiny' else WanConfig()
        assert model in ('tiny', 'ti2v-5b'), f"--model={model!r}: use 'tiny' or 'ti2v-5b'"
        net = WanDiT(cfg, state_cond=True).to(device)
        if base_dtype != torch.float32:
            net.set_dtype(base_dtype)
    if train_mode == 'lora':
        add_lora(net, rank=lora_rank, alpha=lora_alpha)   # freezes all but LoRA and state params
    else:
        assert train_mode == 'full', f"--train_mode={train_mode!r}: use 'lora' or 'full'"
        net.requires_grad_(True)
    for p in net.parameters():   # trained weights stay fp32: they are the optimizer's master copy
        if p.requires_grad:
            p.data = p.data.float()
    return net


def text_context(cfg, text_encoder, device):
    """The empty-prompt context (paper 2.1: "" as the prompt, cross-attention kept). text_encoder
    'zeros': zeros [1, text_len, text_dim] (the tiny demo has no umT5); otherwise a hub repo or
    folder with Wan's umT5, encoded once by wan_state.null_context and cached."""
    if text_encoder == 'zeros':
        return torch.zeros(1, cfg.text_len, cfg.text_dim, device=device)
    return null_context(text_encoder, text_len=cfg.text_len).to(device)


# ---------------------------------------------------------------------------------------------
# The training script
# ---------------------------------------------------------------------------------------------

if __name__ == '__main__':
    # settings: the CPU demo; --preset=paper switches to the paper's recipe (flags still override)
    preset = 'cpu'
    data_dir = 'data/sampling_demo'  # holds train_v2.0_raw/ and val_v2.0_raw/ (1X layout)
    latent_dir = ''             # pre-encoded latents; '' = {data_dir}/latents_{vae}/train
    make_synthetic = True       # if data_dir has no raw data, write the synthetic set there
    synthetic_size = 32         # synthetic frame size (the real data is 512; 32 keeps the CPU demo minutes)
    synthetic_shards = 16       # synthetic training shards of 1500 frames (16: ~2000 clips, enough textures
                                # that the tiny model learns the world rather than memorising 2 shards)
    clip_stride = 8             # frames between training windows (77 = no overlap)
    vae = 'pixel'               # 'pixel': the CPU-demo codec (data.PixelCodec); 'wan': Wan 2.2 VAE
    vae_path = 'Wan-AI/Wan2.2-TI2V-5B-Diffusers'
    model = 'tiny'              # 'tiny' (WanConfig.tiny with the sizes below) or 'ti2v-5b'
    # tiny sizes: dim must be >= 192, the 48 x 2 x 2 latent values a token carries, or the model
    # cannot even pass its input through (dim 64 plateaus at loss 0.84, dim 256 reaches 0.2)
    dim, num_layers, num_heads, ffn_dim = 256, 2, 4, 512
    pretrained = ''             # hub repo or folder of Wan 2.2 TI2V-5B; '' = random init
    text_encoder = 'zeros'      # 'zeros' (tiny demo) or a repo/folder with Wan's umT5 (null_context)
    train_mode = 'full'         # 'lora' (paper) or 'full' (the demo's random base)
    lora_rank, lora_alpha = 32, 32
    init_seed = 0
    seed = 0
    learning_rate = 1e-3        # constant; the paper's 4e-4 (--preset=paper) is for LoRA on a pretrained base
    weight_decay = 0.0          # not stated in the paper
    grad_clip = 1.0             # not stated in the paper; 0 disables
    shift = 12.0                # timestep shift (Wan: 5.0 at 704p). Shift > 1 trains more at high noise,
                                # where sampling starts; the demo measured 1, 3, 6, 12, 24: 12 is best
    state_dropout = 0.1         # paper 2.4: trained with CFG; the learned no-state embedding
    batch_size = 8              # per GPU micro-batch
    global_batch_size = 8       # paper 2.2: 1024
    max_iters = 800             # paper 2.2: 23k steps
    gradient_checkpointing = 0  # recompute the first n blocks in backward (0: none; the paper preset: all 30)
    base_dtype = 'float32'      # 'bfloat16' on GPUs: the frozen base
    compile = False
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    out_dir = 'out_sampling'
    init_from = 'scratch'       # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    log_interval = 10
    ckpt_interval = 100
    PAPER = dict(data_dir='data/1x', make_synthetic=False, clip_stride=77, vae='wan', model='ti2v-5b',
                 pretrained='Wan-AI/Wan2.2-TI2V-5B', text_encoder='Wan-AI/Wan2.2-TI2V-5B', train_mode='lora',
                 learning_rate=4e-4, shift=5.0, batch_size=8, global_batch_size=1024, max_iters=23000, gradient_checkpointing=30,
                 base_dtype='bfloat16', out_dir='out_sampling_paper', ckpt_interval=500)
    if '--preset=paper' in sys.argv[1:]:
        globals().update(PAPER)
    from configurator import configure
    configure(globals())
    assert preset in ('cpu', 'paper'), f"--preset={preset!r}: use 'cpu' or 'paper'"
    config = {k: v for k, v in globals().items() if not k.startswith('_') and k != 'PAPER'
              and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}

    ddp, rank, world, device = data.setup_distributed(device)   # torchrun sets RANK: DDP, as nanoGPT
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
    master = rank == 0
    assert global_batch_size % (batch_size * world) == 0, (
        f"--global_batch_size={global_batch_size} must be a multiple of --batch_size={batch_size} x {world} processes")
    accum = global_batch_size // (batch_size * world)
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[base_dtype]
    if master:
        print(f"{world} process(es) x batch {batch_size} x {accum} accumulation = global batch {global_batch_size}")

    # data: raw clips -> latents on disk (once). The synthetic set records its settings, and the
    # latents their stride, so that a flag that no longer matches what is on disk is an error,
    # not silently ignored
    train_raw = os.path.join(data_dir, 'train_v2.0_raw')
    latent_dir = latent_dir or os.path.join(data_dir, f'latents_{vae}', 'train')
    synthetic_json = os.path.join(data_dir, 'synthetic.json')
    wanted = dict(size=synthetic_size, shards=synthetic_shards, seed=seed)
    if master and not os.path.exists(os.path.join(train_raw, 'metadata.json')) and not os.path.isdir(latent_dir):
        assert make_synthetic, f"{train_raw} has no metadata.json: download the raw data (README) or --make_synthetic=True"
        print(f"writing synthetic raw clips ({synthetic_shards} shards, {synthetic_size}x{synthetic_size}) to {data_dir}")
        data.write_synthetic_raw(train_raw, num_shards=synthetic_shards, frames_per_shard=1500, size=synthetic_size,
                                 seed=seed)
        data.write_synthetic_raw(os.path.join(data_dir, 'val_v2.0_raw'), num_shards=1, frames_per_shard=1200,
                                 size=synthetic_size, seed=seed + 1, flat=True)
        with open(synthetic_json, 'w') as f:
            json.dump(wanted, f)
    elif make_synthetic and os.path.exists(synthetic_json):
        with open(synthetic_json) as f:
            on_disk = json.load(f)
        assert on_disk == wanted, (f"{data_dir} holds a synthetic set written with {on_disk}, not the {wanted} "
                                   f"asked for: pass another --data_dir, or delete {data_dir}")
    if master and not os.path.isdir(latent_dir):
        assert vae == 'pixel', f"{latent_dir} missing: encode first with `python data.py encode_raw --vae={vae} ...` (README)"
        data.encode_raw_split(train_raw, latent_dir, data.PixelCodec(), stride=clip_stride)
    if ddp:
        dist.barrier()
    encoding_json = os.path.join(latent_dir, 'encoding.json')
    if os.path.exists(encoding_json):
        with open(encoding_json) as f:
            stride_on_disk = json.load(f)['stride']
        assert stride_on_disk == clip_stride, (f"{latent_dir} was encoded with stride {stride_on_disk}: pass "
                                               f"--clip_stride={stride_on_disk}, or delete it to encode again")
    dataset = data.LatentClips(latent_dir)
    z_example, _ = dataset[0]
    if master:
        print(f"{len(dataset)} training clips from {latent_dir}, latents {tuple(z_example.shape)}")

    # model, optimizer, checkpoint
    net = build_model(model, pretrained, train_mode, lora_rank, lora_alpha, init_seed, device, dtype,
                      dict(dim=dim, num_layers=num_layers, num_heads=num_heads, ffn_dim=ffn_dim))
    net.gradient_checkpointing = gradient_checkpointing
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=learning_rate, weight_decay=weight_decay,
                                  fused=device_type == 'cuda')
    if master:
        print(f"model {model}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
              f"{sum(p.numel() for p in trainable.values()) / 1e6:.2f}M trained ({train_mode})")
    start_step = 0
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if init_from == 'resume':
        assert os.path.exists(ckpt_path), f"--init_from=resume but {ckpt_path} does not exist"
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        missing = set(trainable) ^ set(ckpt['trainable'])
        assert not missing, f"{ckpt_path} does not match this model (keys differ: {sorted(missing)[:5]}); same flags?"
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(ckpt['trainable'][n])
        optimizer.load_state_dict(ckpt['optimizer'])
        start_step = ckpt['step']
        torch.set_rng_state(ckpt['rng']['torch'])
        np.random.set_state(ckpt['rng']['numpy'])
        if master:
            print(f"resumed from {ckpt_path} at step {start_step}")
    context_1LD = text_context(net.cfg, text_encoder, device)
    train_net = torch.compile(net) if compile else net
    if ddp:   # DDP syncs the gradients of the trainable parameters only
        train_net = DDP(train_net, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)

    def save_checkpoint(step):
        os.makedirs(out_dir, exist_ok=True)
        ckpt = dict(trainable={n: p.detach().cpu() for n, p in trainable.items()}, optimizer=optimizer.state_dict(),
                    step=step, config=config, rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state()))
        torch.save(ckpt, ckpt_path + '.tmp')
        os.replace(ckpt_path + '.tmp', ckpt_path)   # never leave a half-written checkpoint
        print(f"saved {ckpt_path} at step {step}")

    # training loop. MFU as nanoGPT prints it: this process's model FLOPs per step over its time and
    # the device's bf16 peak (none on the CPU). A LoRA step is counted exactly (flops_per_sample);
    # full training as 3 forwards (forward, activation and weight gradients), the usual estimate.
    peak = data.peak_flops(device)
    _, Fr, Hl, Wl = z_example.shape
    flops_per_step = accum * batch_size * (
        net.flops_per_sample(Fr, Hl, Wl, lora_step=True, batch=batch_size) if train_mode == 'lora'
        else 3 * net.flops_per_sample(Fr, Hl, Wl, batch=batch_size))
    for step in range(start_step, max_iters):
        t_step = time.time()
        loss_sum = 0.0
        for micro in range(accum):
            # this micro-batch's positions in the step's global batch, the same under any world size
            first = (micro * world + rank) * batch_size
            positions = list(range(first, first + batch_size))
            rows = dataset_rows(seed, [step * global_batch_size + p for p in positions], len(dataset))
            z0, states = map(torch.stack, zip(*(dataset[r] for r in rows)))
            sigma, noise, drop = sample_draws(seed, step, positions, z0.shape[1:], shift, state_dropout)
            z0, states, sigma, noise, drop = (x.to(device) for x in (z0, states, sigma, noise, drop))
            sync = nullcontext() if not ddp or micro == accum - 1 else train_net.no_sync()
            with sync:
                loss = flow_matching_loss(train_net, z0, states, context_1LD, sigma, noise, drop) / accum
                loss.backward()
            loss_sum += loss.item()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable.values(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ddp:   # for logging only: the mean loss over all processes
            loss_t = torch.tensor(loss_sum, device=device)
            dist.all_reduce(loss_t, op=dist.ReduceOp.AVG)
            loss_sum = loss_t.item()
        if master and (step % log_interval == 0 or step == max_iters - 1):
            dt = time.time() - t_step
            mfu = f", MFU {100 * flops_per_step / dt / peak:.1f}%" if peak else ''
            print(f"step {step}: loss {loss_sum:.4f}, {dt * 1000:.0f} ms/step, "
                  f"{global_batch_size / dt / world:.2f} samples/s per process{mfu}")
        if master and ((step + 1) % ckpt_interval == 0 or step == max_iters - 1):
            save_checkpoint(step + 1)
    if ddp:
        dist.destroy_process_group()
