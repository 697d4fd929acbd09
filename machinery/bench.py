"""Time nanoWM's models: training steps, decoding and sampling, in samples/s, tokens/s and MFU.

As nanoGPT's bench.py: untimed warm-up calls, then timed calls with device synchronisation.

    python -m machinery.bench                                   # CPU: tiny configs, the same code (smoke test)
    python -m machinery.bench --preset=full                     # GPU: the paper's sizes (defaults to full on CUDA)
    python -m machinery.bench --preset=full --what=st_train --compile
    python -m machinery.bench --preset=full --what=wan_lora --wan_lora_batch=4 --wan_ckpt_blocks=10
    python -m machinery.bench --preset=full --what=wan_lora --compile --act_budget=0.5   # selective act. checkpointing
    python -m machinery.bench --preset=full --what=st_train --compile --st_loss_chunk=4096,0   # a row per loss chunk
    python -m machinery.bench --preset=full --what=wan_fwd --profile   # where the time goes (torch.profiler)
    python -m machinery.bench --preset=full --what=st_train,wan_fwd --sdpa=flash,efficient,cudnn,math   # a row per kernel
    python -m machinery.bench --device=cpu --preset=cpu_ratios          # the ratios on the CPU (KV cache, batched ensemble)
    python -m machinery.bench --preset=full --what=ensemble,vae         # sample.py's seconds per clip, random weights

What each benchmark times (--what=all runs them all; or name some, e.g. --what=st_decode,ensemble):
  st_train   one optimizer step of the compression ST-transformer (paper 3.1-3.2: 24 layers,
             d 512, T 5, bf16 autocast, fused AdamW), random tokens of the real shapes; the
             training loss of train_compression.py: cross-entropy of the predicted grids 3-5
             only, at most --st_loss_chunk tokens of logits at a time in equal chunks (0: all at
             once, not recomputed; st_transformer.head_cross_entropy); several: a row each (st_train_chunkN)
  st_decode  greedy decoding of 3 grids from 3 context grids (STTransformer.generate, fp32 as the
             paper decodes), with and without the temporal KV cache, next to one teacher-forced
             forward of the same 5 grids in the same precision (the target: cached decoding
             <= 1.3x that forward)
  wan_fwd    one forward of the Wan 2.2 TI2V-5B DiT on a 512x512, 21-frame clip (6 x 32 x 32
             latents, 1536 tokens), bf16 weights with the fp32 modulation of the reference
  wan_lora   one LoRA fine-tuning step (rank 32, frozen bf16 base, flow-matching loss of
             flow_matching.py, fused AdamW), gradient checkpointing on the first
             --wan_ckpt_blocks blocks
  ensemble   sample.py's sampler (flow_matching.sample_latents): --ensemble members x --steps
             solver steps as one batch, and, for comparison, the same members one at a time (the
             DiT only)
  vae        the rest of sample.py's work on a clip: encode the 5 context frames, decode the
             members' latents 4 at a time (Wan 2.2 VAE architecture, random weights), fp32 as
             sample.py runs it by default, then bf16 (--vae_dtype=bfloat16) with the PSNR of its
             frame 77 against fp32's; ensemble + vae = sample.py's seconds per clip

The ensemble and vae rows are also how to time sample.py with random weights, before any run has
trained: --what=ensemble,vae with the --ensemble and --steps sample.py would use (its --cfg: --cfg_scale).

Every transformer benchmark runs with only the attention kernels of --sdpa allowed in
F.scaled_dot_product_attention (default flash), so a run that leaves that path fails loudly
instead of running slowly; fp32 decoding, which CUDA's flash kernel does not take, also allows the
memory-efficient one. A list (--sdpa=flash,efficient,cudnn,math) times the rows once per kernel,
named row_kernel; a kernel the device or the shapes do not have is skipped with a note. 'any'
lets torch choose. The VAE row has no such check (its attention is fp32, single-head, with 640 /
1024 channels: no fused kernel takes it). --profile prints the operators and kernels that took the
most device time (CPU time on the CPU) in each benchmark's timed calls. --compile compiles block by
block (compile_blocks of both models), as the training scripts do, with static shapes: a row's shapes
never change, so each compiles once (a shape seen first is static in the scripts too). MFU = model FLOPs / time / the
device's dense bf16 peak (machinery/speed.py); it is n/a on the CPU and for the fp32 decoding rows.
"""
import math
import time
from contextlib import nullcontext

import torch
import torch._functorch.config

import data
from configurator import configure
from flow_matching import flow_matching_loss, latent_mask, sample_latents
from machinery.speed import peak_flops
from st_transformer import STConfig, STTransformer
from wan_state import WanConfig, WanDiT, add_lora, frame_timesteps, lora_modules

# --- settings --------------------------------------------------------------------------------
preset = 'full' if torch.cuda.is_available() else 'cpu'  # 'cpu' (tiny), 'cpu_ratios', 'full' (the paper's sizes)
what = 'all'               # all, or some of st_train,st_decode,wan_fwd,ensemble,wan_lora,vae
device = 'auto'            # 'auto', 'cpu', 'cuda', 'cuda:1'
compile = False            # torch.compile the blocks of the ST-transformer and the DiT (and the ST loss chunk),
                           # static shapes (dynamic=False: each row's shapes are fixed, one graph a row)
act_budget = 1.0           # with --compile: its activation memory budget (0-1). Below 1 the compiled training
                           # blocks save that fraction of their activations (the matmuls' first) and recompute
                           # the rest (elementwise work) in the backward: selective activation checkpointing
sdpa = 'flash'             # attention kernels allowed: flash, efficient, cudnn, math or any; a comma list: rows per kernel
warmup = 1                 # untimed calls first (compilation, cuDNN autotuning, allocator)
iters = 2                  # timed calls, averaged
profile = False            # also print torch.profiler's top operators of each benchmark's timed calls
seed = 0                   # seed of the random weights and inputs
threads = 0                # CPU threads for torch (0 = torch's default)
# compression ST-transformer (PRESETS below fill these)
st_layers = 2              # blocks (paper 3.1: 24)
st_heads = 2               # attention heads (paper: 8)
st_embd = 32               # width (paper: 512)
st_vocab = 512             # token vocabulary (paper: 64000)
st_grid = 8                # token grid height = width (paper: 32)
st_batch = 2               # training samples per step
st_loss_chunk = (4096,)    # at most this many tokens' fp32 logits at once in the loss (train_compression.py's
                           # loss_chunk; 0: all at once, not recomputed); several (--st_loss_chunk=4096,0): a row each
decode_batch = 2           # samples decoded at once
# sampling-track DiT
wan_model = 'tiny'         # 'tiny' (WanConfig.tiny with the sizes below) or 'ti2v-5b'
wan_dim = 64               # the tiny DiT's width
wan_layers = 2             # the tiny DiT's blocks
wan_heads = 2              # the tiny DiT's attention heads
wan_ffn = 128              # the tiny DiT's feed-forward width
latent_hw = 8              # latent height = width (512 px / 16 = 32 at full size)
wan_batch = 1              # clips per forward
wan_fwd_per_token = True   # also time the reference's per-token timesteps (with --compile: one more graph)
wan_lora_batch = 1         # clips per LoRA step
wan_ckpt_blocks = 0        # blocks with gradient checkpointing in the LoRA step (0 = none)
lora_addmm = False         # LoRA's B product accumulated by the base GEMM (wan_state.LoRALinear.addmm)
ensemble = 4               # members (paper: 20)
steps = 2                  # solver steps (paper: 20)
cfg_scale = 1.0            # classifier-free guidance (1.0 = off, the paper's choice; else 2N rows)
ensemble_looped = True     # also time the members one at a time (the batched / looped ratio)
vae = 'tiny'               # 'tiny' (a few channels, same architecture) or 'wan2.2' (TI2V-5B's VAE)

PRESETS = {
    # the defaults above: a smoke test that runs in seconds. One thread: tiny models gain nothing
    # from more, and on a busy machine competing OpenMP threads make them many times slower
    'cpu': dict(threads=1),
    # the ratios that justify the design (decoding with / without the KV cache, batched / looped
    # ensemble, per-frame / per-token modulation), on the CPU, at sizes where compute, not Python
    # overhead, dominates:
    # real 32 x 32 token grids, and the real 1536-token clip through a small DiT with the full
    # model's head width (128) and FFN ratio
    'cpu_ratios': dict(threads=1, what='st_decode,wan_fwd,ensemble', st_layers=4, st_heads=4, st_embd=128,
                       st_vocab=4096, st_grid=data.GRID_H, decode_batch=2, latent_hw=32, wan_dim=256, wan_heads=2,
                       wan_ffn=1195, wan_batch=4, ensemble=8, steps=4, warmup=1, iters=3),
    # paper 3.1: 24 layers, 8 heads, d 512, 64k vocabulary, 32 x 32 grids; Wan 2.2 TI2V-5B at
    # 512 x 512, 21 frames; sample.py --ensemble 20 --steps 20
    'full': dict(st_layers=24, st_heads=8, st_embd=512, st_vocab=data.VOCAB_SIZE, st_grid=data.GRID_H,
                 st_batch=8, decode_batch=8, wan_model='ti2v-5b', latent_hw=32, wan_batch=4, wan_lora_batch=2,
                 ensemble=20, steps=20, vae='wan2.2', warmup=2, iters=5),
}
configure(globals(), presets=PRESETS, choices=dict(vae=('tiny', 'wan2.2'), wan_model=('tiny', 'ti2v-5b')),
          positive=('iters', 'st_batch', 'decode_batch', 'wan_batch', 'wan_lora_batch', 'ensemble',
                    'steps'),
          nonnegative=('warmup', 'threads', 'wan_ckpt_blocks'), fractions=('act_budget',))
WHAT = ('st_train', 'st_decode', 'wan_fwd', 'ensemble', 'wan_lora', 'vae')
selected = WHAT if what == 'all' else tuple(what.split(','))
if not set(selected) <= set(WHAT):
    raise SystemExit(f"--what={what}: unknown; choose all or some of {', '.join(WHAT)}, comma-separated")
SDPA_KERNELS = ('flash', 'efficient', 'cudnn', 'math', 'any')
backends = tuple(sdpa.split(','))
if not (backends and set(backends) <= set(SDPA_KERNELS) and len(set(backends)) == len(backends)):
    raise SystemExit(f"--sdpa={sdpa}: choose one or more of {', '.join(SDPA_KERNELS)}, comma-separated")
if not (st_loss_chunk and all(isinstance(c, int) and c >= 0 for c in st_loss_chunk)):
    raise SystemExit(f"--st_loss_chunk={','.join(map(str, st_loss_chunk))}: give token counts >= 0, comma-separated")

# --- setup -----------------------------------------------------------------------------------
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
cuda = device.startswith('cuda')
if act_budget != 1.0 and not compile:
    raise SystemExit(f"--act_budget={act_budget} acts on compiled blocks only: add --compile")
torch._functorch.config.activation_memory_budget = act_budget
budget = f', budget {act_budget:g}' if act_budget != 1.0 else ''   # in the training rows' shapes
if threads > 0:
    torch.set_num_threads(threads)
if cuda:   # set_device needs an index: plain 'cuda' is the current device
    index = torch.device(device).index
    device = f'cuda:{torch.cuda.current_device() if index is None else index}'
    torch.cuda.set_device(device)
torch.manual_seed(seed)
peak = peak_flops(device)
device_name = torch.cuda.get_device_name(device) if cuda else f'CPU ({torch.get_num_threads()} threads)'
autocast = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else nullcontext()

# the benchmarks' shapes: tokens of an ST grid; latent frames of a clip and of its context, the
# DiT's tokens (2 x 2 latent patches) per frame and per clip
S = st_grid * st_grid
Fr, K = data.NUM_LATENTS, data.NUM_CONTEXT_LATENTS
tokens_per_frame = (latent_hw // 2) * (latent_hw // 2)
L = Fr * tokens_per_frame
clip = f'{latent_hw * 16}x{latent_hw * 16} x 21 frames'


def sync():
    if cuda:
        torch.cuda.synchronize()


backend = backends[0]   # the kernel the rows being timed allow (the run loops over --sdpa's list)


def attention_kernels(kernels):
    """Allow only the --sdpa kernel (`backend`) in F.scaled_dot_product_attention for the
    transformers' rows (kernels='bf16'), so that SDPA raises an error rather than silently falling
    back to another path; for their fp32 decoding rows (kernels='fp32') with flash, the
    memory-efficient one too (CUDA's flash kernel takes no fp32). kernels=None: no restriction (the
    VAE: its attention in diffusers is fp32 and single-head with 640 / 1024 channels)."""
    if backend == 'any' or kernels is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    allowed = [dict(flash=SDPBackend.FLASH_ATTENTION, efficient=SDPBackend.EFFICIENT_ATTENTION,
                    cudnn=SDPBackend.CUDNN_ATTENTION, math=SDPBackend.MATH)[backend]]
    if backend == 'flash' and kernels == 'fp32':
        allowed.append(SDPBackend.EFFICIENT_ATTENTION)
    return sdpa_kernel(allowed)


def timed(fn, kernels='bf16', warm=None):
    """Mean seconds per call of fn after warm-up calls, synchronised; the peak GiB on CUDA; and
    the output of the last call. warm: a cheaper warm-up call with fn's shapes (compilation and
    autotuning see what the timed calls will), instead of fn itself. With --profile, the timed
    calls run under torch.profiler (which slows them a little) and its table of the most expensive
    operators is printed."""
    with attention_kernels(kernels):
        for _ in range(warmup):
            (warm or fn)()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if cuda else [])) if profile else nullcontext()
        with prof:
            t0 = time.perf_counter()
            for _ in range(iters):
                out = fn()
            sync()
            seconds = (time.perf_counter() - t0) / iters
    if profile:   # the operators and kernels themselves (self time), most expensive first
        print(prof.key_averages().table(sort_by='self_device_time_total' if cuda else 'self_cpu_time_total',
                                        row_limit=20, max_name_column_width=60))
    return seconds, (torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float('nan')), out


rows = []   # one dict per row: name, shape, seconds, samples_per_s, tokens_per_s, mfu (or None), gib


def report(name, shape, seconds, gib, samples, tokens, flops=None):
    if len(backends) > 1 or backend != 'flash':
        name = f'{name}_{backend}'   # the row of one --sdpa kernel
    rows.append(dict(name=name, shape=shape, seconds=seconds, samples_per_s=samples / seconds,
                     tokens_per_s=tokens / seconds, mfu=(flops / seconds / peak) if flops and peak else None, gib=gib))
    r = rows[-1]
    mfu = f"{100 * r['mfu']:5.1f}%" if r['mfu'] is not None else '   n/a'
    print(f"{name:24s} {shape:42s} {seconds * 1000:10.2f} {r['samples_per_s']:10.2f} {r['tokens_per_s']:12.0f} "
          f"{mfu:>7s} {'   n/a' if math.isnan(gib) else '%6.1f' % gib}", flush=True)   # NaN: no peak memory on a CPU


# --- compression: the ST-transformer ----------------------------------------------------------
def build_st():
    """The ST-transformer of the --st_* sizes (its blocks and loss chunk compiled with --compile),
    and random tokens and states for the larger of the training and decoding batches."""
    cfg = STConfig(vocab_size=st_vocab, n_layer=st_layers, n_head=st_heads, n_embd=st_embd, T=5,
                   H=st_grid, W=st_grid, dropout=0.1)
    st = STTransformer(cfg).to(device)
    if compile:
        st.compile_blocks(dynamic=False)
    z_BGHW = torch.randint(0, st_vocab, (max(st_batch, decode_batch), 6, st_grid, st_grid), device=device)
    states_BLD = torch.randn(max(st_batch, decode_batch), cfg.state_window, cfg.state_dim, device=device)
    return st, z_BGHW, states_BLD


def bench_st_train(st, z_BGHW, states_BLD, loss_chunk):
    """One optimizer step of the ST-transformer, exactly train_compression.py's: bf16 autocast,
    fused AdamW, the training loss (the predicted grids 3-5 only, loss_chunk tokens of logits at a
    time at most: st_transformer.head_cross_entropy splits the tokens into equal chunks)."""
    optimizer = torch.optim.AdamW(st.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    z, s = z_BGHW[:st_batch], states_BLD[:st_batch]

    def st_step():
        # grids 3..5 predicted from positions 2..4, the loss chunk by chunk as train_compression.py
        with autocast:
            loss = st(z[:, :5], s, predict_from=2, targets_BTHW=z[:, 3:], loss_chunk=loss_chunk)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    st.train()
    sec, gib, _ = timed(st_step)
    name = f'st_train_chunk{loss_chunk}' if len(st_loss_chunk) > 1 else 'st_train'
    loss = f'chunk <= {loss_chunk}' if loss_chunk else 'no loss chunks'
    report(name, f'{st_batch} x 5 x {st_grid}x{st_grid}, L{st_layers} d{st_embd}, {loss}{budget}', sec, gib,
           st_batch, st_batch * 5 * S, st_batch * st.flops_per_sample())


def bench_st_decode(st, z_BGHW, states_BLD):
    """Greedy decoding of 3 grids from 3 context grids with the temporal KV cache and without,
    next to one teacher-forced forward of the same 5 grids, all fp32 as the paper decodes. The
    cache is worth its code if decoding with it costs little more than that one forward (the
    target: <= 1.3x), runs faster than without it, and changes no token."""
    st.eval()
    z, s = z_BGHW[:decode_batch], states_BLD[:decode_batch]
    shape = f'{decode_batch} x (3 + 3) x {st_grid}x{st_grid}'
    with torch.no_grad(), torch.autocast(device.split(':')[0], enabled=False):
        sec_tf, gib, _ = timed(lambda: st(z[:, :5], s, predict_from=2), kernels='fp32')
        report('st_forward_fp32', f'{decode_batch} x 5 x {st_grid}x{st_grid} (teacher-forced)', sec_tf, gib,
               decode_batch, decode_batch * 3 * S)
        sec_c, gib, (grids_c, _) = timed(lambda: st.generate(z[:, :3], s, num_grids=3, use_cache=True),
                                         kernels='fp32')
        report('st_decode_cache', shape, sec_c, gib, decode_batch, decode_batch * 3 * S)
        sec_u, gib, (grids_u, _) = timed(lambda: st.generate(z[:, :3], s, num_grids=3, use_cache=False),
                                         kernels='fp32')
        report('st_decode_nocache', shape, sec_u, gib, decode_batch, decode_batch * 3 * S)
    return {'decode with cache / teacher-forced forward': sec_c / sec_tf,
            'decode without cache / with cache': sec_u / sec_c,
            'decode greedy tokens that differ with / without cache': (grids_c != grids_u).sum().item()}


# --- sampling track: the Wan DiT ---------------------------------------------------------------
def build_dit():
    """The frozen DiT of --wan_model (bf16 weights on CUDA), and random inputs of a clip's shapes
    for the largest batch: latents, states, one text context and the mask of the context latents."""
    wcfg = (WanConfig.tiny(dim=wan_dim, num_layers=wan_layers, num_heads=wan_heads, ffn_dim=wan_ffn)
            if wan_model == 'tiny' else WanConfig())
    with torch.device(device):
        net = WanDiT(wcfg, state_cond=True)
    if cuda:
        net.set_dtype(torch.bfloat16)   # bf16 weights, the reference's fp32 modulation, norms and head
    net.requires_grad_(False)
    if compile:
        net.compile_blocks(dynamic=False)
    n_max = max(wan_batch, wan_lora_batch, ensemble)
    x_BCFHW = torch.randn(n_max, wcfg.in_dim, Fr, latent_hw, latent_hw, device=device)
    wstates_BTD = torch.randn(n_max, 4 * (Fr - 1) + 1, wcfg.state_dim, device=device)
    context_1LD = torch.randn(1, wcfg.text_len, wcfg.text_dim, device=device)   # umT5("") stand-in
    mask_BF = latent_mask(n_max, Fr, K, device)   # the 2 context latents at t = 0 (paper 2.1)
    return net, x_BCFHW, wstates_BTD, context_1LD, mask_BF


def bench_wan_fwd(net, x_BCFHW, wstates_BTD, context_1LD, mask_BF):
    """One DiT forward as we run it (a timestep per frame, one text context shared by the batch)
    next to the reference's way (a timestep per token, the context once per sample): the same
    maths, so the ratio is what the per-frame modulation and the shared context save."""
    b = wan_batch
    t_B = torch.full((b,), 500.0, device=device)
    flops = b * net.flops_per_sample(Fr, latent_hw, latent_hw, batch=b)
    with torch.no_grad():
        sec, gib, _ = timed(lambda: net(x_BCFHW[:b], frame_timesteps(mask_BF[:b], t_B), context_1LD, wstates_BTD[:b]))
        report('wan_fwd', f'{b} x {clip}', sec, gib, b, b * L, flops)
        if not wan_fwd_per_token:
            return {}
        t_BL = frame_timesteps(mask_BF[:b], t_B).repeat_interleave(tokens_per_frame, dim=1)
        sec_ref, gib, _ = timed(lambda: net(x_BCFHW[:b], t_BL, context_1LD.expand(b, -1, -1), wstates_BTD[:b]))
        report('wan_fwd_per_token', f'{b} x {clip}, t per token', sec_ref, gib, b, b * L, flops)
    return {'DiT forward, per-token timesteps and per-sample context / per-frame and shared': sec_ref / sec}


def bench_ensemble(net, x_BCFHW, wstates_BTD, context_1LD):
    """sample.py's sampler: the --ensemble members of one clip through --steps solver steps as one
    batch, and (with --ensemble_looped) the same members one at a time. Batching is worth it if it
    is faster and its latents are the looped ones (the same maths, up to float rounding). Returns
    the batched seconds (sample.py's DiT time per clip) and the ratios."""
    n = ensemble
    z_ctx = x_BCFHW[:1, :, :K].expand(n, -1, -1, -1, -1)   # one clip's context, repeated per member
    noise = torch.randn(n, net.cfg.in_dim, Fr, latent_hw, latent_hw, device=device)
    states_n = wstates_BTD[:1].expand(n, -1, -1)
    rows_per_member = 2 if cfg_scale != 1.0 else 1
    flops = n * steps * rows_per_member * net.flops_per_sample(Fr, latent_hw, latent_hw, batch=n * rows_per_member)

    def batched():
        return sample_latents(net, z_ctx, states_n, context_1LD, noise, steps=steps, shift=5.0, cfg_scale=cfg_scale)

    def looped():
        return torch.cat([sample_latents(net, z_ctx[i:i + 1], states_n[i:i + 1], context_1LD, noise[i:i + 1],
                                         steps=steps, shift=5.0, cfg_scale=cfg_scale) for i in range(n)])

    def one_step():   # the warm-up: the DiT sees the shapes of every step
        return sample_latents(net, z_ctx, states_n, context_1LD, noise, steps=1, shift=5.0, cfg_scale=cfg_scale)

    sec_b, gib, z_batched = timed(batched, warm=one_step)
    report('ensemble_batched', f'{n} members x {steps} steps, {clip}', sec_b, gib, n, n * steps * L, flops)
    if not ensemble_looped:
        return sec_b, {}
    sec_l, gib, z_looped = timed(looped)
    report('ensemble_looped', f'{n} x (1 member x {steps} steps)', sec_l, gib, n, n * steps * L, flops)
    return sec_b, {'ensemble looped / batched': sec_l / sec_b,
                   'ensemble max |batched - looped| latent (same maths)': (z_batched - z_looped).abs().max().item()}


def bench_wan_lora(net, x_BCFHW, wstates_BTD, context_1LD):
    """One LoRA fine-tuning step of the DiT (rank 32, frozen base, flow_matching.py's loss, fused
    AdamW), with gradient checkpointing on the first --wan_ckpt_blocks blocks. Adds LoRA to net."""
    b = wan_lora_batch
    if not lora_modules(net):   # (the rows of a second --sdpa kernel reuse the adapters)
        add_lora(net, rank=32, alpha=32)   # freezes the base; fp32 adapters and state weights train
    net.gradient_checkpointing = wan_ckpt_blocks
    for m in lora_modules(net):
        m.addmm = lora_addmm
    trainable = [p for p in net.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()   # the optimizer's master copy (as wan_files.build_model)
    optimizer = torch.optim.AdamW(trainable, lr=4e-4, fused=cuda)
    g = torch.Generator(device=device).manual_seed(seed)
    sigma_B = torch.rand(b, device=device, generator=g)
    noise_B = torch.randn(b, net.cfg.in_dim, Fr, latent_hw, latent_hw, device=device, generator=g)
    drop_B = torch.zeros(b, dtype=torch.bool, device=device)

    def lora_step():
        loss = flow_matching_loss(net, x_BCFHW[:b], wstates_BTD[:b], context_1LD, sigma_B, noise_B, drop_B)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    net.train()
    sec, gib, _ = timed(lora_step)
    report('wan_lora', f'{b} x {clip}, ckpt {net.checkpointed_blocks()}/{net.cfg.num_layers}{budget}'
           f"{', addmm' if lora_addmm else ''}", sec, gib, b,
           b * L, b * net.flops_per_sample(Fr, latent_hw, latent_hw, lora_step=True, batch=b))


# --- sampling track: the VAE work of sample.py on one clip --------------------------------------
def bench_vae():
    """The rest of sample.py's work on a clip: encode the context frames, decode the --ensemble
    members' latents 4 at a time (the Wan 2.2 VAE's architecture, random weights), in fp32 as
    sample.py runs it by default and in bf16 (its --vae_dtype=bfloat16) with the same weights.
    Returns the seconds of each dtype and the ratios: bf16's speed-up, and how far its frames are from
    fp32's as PSNR (dB, uint8 frames as sample.py scores them; independent errors add in MSE, so at
    40 dB a score near 23 dB moves by under 0.1 dB)."""
    import copy
    from machinery import need
    from machinery.vae import WanVAE, video_to_frames
    from metrics import psnr
    AutoencoderKLWan = need('diffusers', 'the vae benchmark').AutoencoderKLWan
    # Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json (48 channels, 2x2 patchify, 16x16x4)
    size = dict(tiny=dict(base_dim=8, decoder_base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
                **{'wan2.2': dict(base_dim=160, decoder_base_dim=256, dim_mult=[1, 2, 4, 4], num_res_blocks=2)})
    fp32 = AutoencoderKLWan(z_dim=48, temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                            latents_mean=[0.0] * 48, latents_std=[1.0] * 48, **size[vae]).to(device)
    frames = torch.rand(1, 3, data.NUM_CONTEXT_FRAMES, latent_hw * 16, latent_hw * 16, device=device) * 2 - 1
    latents = torch.randn(ensemble, 48, data.NUM_LATENTS, latent_hw, latent_hw, device=device)
    shape = f'encode 5 + decode {ensemble} x 21 frames, {latent_hw * 16}px'
    seconds, videos = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        codec = WanVAE(fp32 if dtype == torch.float32 else copy.deepcopy(fp32).bfloat16())

        def vae_clip(members=ensemble):   # as sample.py: encode the context frames, decode 4 members at a time
            codec.encode(frames)
            return torch.cat([codec.decode(latents[i:i + 4]) for i in range(0, members, 4)])

        name = 'vae_clip' if dtype == torch.float32 else 'vae_clip_bf16'
        # not a transformer: any attention kernel; the warm-up decodes one batch of 4 (the same shapes)
        seconds[dtype], gib, videos[dtype] = timed(vae_clip, kernels=None, warm=lambda: vae_clip(4))
        report(name, shape, seconds[dtype], gib, ensemble, ensemble * data.NUM_LATENTS * latent_hw ** 2)
    # frame 77 of each member (the scored frame), as sample.py turns it into an image
    f32, b16 = (video_to_frames(videos[d][:, :, -1:]).cpu().numpy() for d in (torch.float32, torch.bfloat16))
    return seconds, {
        'VAE fp32 / bf16 seconds': seconds[torch.float32] / seconds[torch.bfloat16],
        'VAE bf16 frame 77 against fp32, PSNR dB (random weights)': min(psnr(b, f) for b, f in zip(b16, f32))}


# --- run ---------------------------------------------------------------------------------------
def unless_no_kernel(name, fn, *args):
    """fn(*args), or None with a note when the --sdpa kernel being timed cannot run these shapes
    or dtypes on this device (SDPA: no available kernel)."""
    try:
        return fn(*args)
    except RuntimeError as e:
        if 'No available kernel' not in str(e) and 'No viable backend' not in str(e):
            raise
        print(f"{name}_{backend}: skipped, the {backend} kernel does not run here ({str(e).strip().splitlines()[0][:100]})")
        sync()
        return None


def per_kernel(ratios_of_a_row):
    """A row's ratios, named for the --sdpa kernel when the run times more than one."""
    return {(f'{k} [{backend}]' if len(backends) > 1 else k): v for k, v in (ratios_of_a_row or {}).items()}


print(f"device: {device_name}; preset {preset}; peak bf16 "
      f"{'%.0f TFLOP/s' % (peak / 1e12) if peak else 'n/a'}; compile {compile}; sdpa {sdpa}; "
      f"warm-up {warmup}, {iters} timed calls; torch {torch.__version__}")
print(f"{'benchmark':24s} {'shape':42s} {'ms / call':>10s} {'samples/s':>10s} {'tokens/s':>12s} {'MFU':>7s} "
      f"{'GiB':>6s}")
ratios = {}   # the comparisons, printed after the table
sec_ensemble = None

if any(w in selected for w in ('st_train', 'st_decode')):
    st, z_BGHW, states_BLD = build_st()
    for backend in backends:
        for loss_chunk in st_loss_chunk if 'st_train' in selected else ():
            unless_no_kernel('st_train', bench_st_train, st, z_BGHW, states_BLD, loss_chunk)
        if 'st_decode' in selected:
            ratios.update(per_kernel(unless_no_kernel('st_decode', bench_st_decode, st, z_BGHW, states_BLD)))
    del st
    if cuda:
        torch.cuda.empty_cache()

if any(w in selected for w in ('wan_fwd', 'wan_lora', 'ensemble')):
    net, x_BCFHW, wstates_BTD, context_1LD, mask_BF = build_dit()
    for backend in backends:
        if 'wan_fwd' in selected:
            ratios.update(per_kernel(unless_no_kernel('wan_fwd', bench_wan_fwd, net, x_BCFHW, wstates_BTD, context_1LD,
                                                      mask_BF)))
        if 'ensemble' in selected:
            sec_ensemble, ensemble_ratios = unless_no_kernel('ensemble', bench_ensemble, net, x_BCFHW, wstates_BTD,
                                                             context_1LD) or (None, {})
            ratios.update(per_kernel(ensemble_ratios))
    for backend in backends:   # last: it adds LoRA to net
        if 'wan_lora' in selected:
            unless_no_kernel('wan_lora', bench_wan_lora, net, x_BCFHW, wstates_BTD, context_1LD)

if 'vae' in selected:
    sec_vae, vae_ratios = bench_vae()
    ratios.update(vae_ratios)
    if sec_ensemble is not None:
        ratios['sample.py seconds per clip (ensemble_batched + vae_clip)'] = sec_ensemble + sec_vae[torch.float32]
        ratios['sample.py --vae_dtype=bfloat16 seconds per clip (+ vae_clip_bf16)'] = (sec_ensemble
                                                                                        + sec_vae[torch.bfloat16])

for name, value in ratios.items():
    print(f"{name}: {value:.3g}")
