"""Predict frame 77 of every clip of a split and score it as the challenge does (paper 2.3, 2.4).

    python sample.py --ensemble=20 --steps=20 [--cfg=1.5] [--blur=False]

For each clip: encode the 5 context frames (raw 0, 4, 8, 12, 16) to the 2 context latents; the N
ensemble members run as one batch (2N with classifier-free guidance), each denoised from its own
noise by diffusers' flow-matching scheduler, the context latents re-imposed after every step;
decode; average the N predicted frames in pixel space (paper 2.3: the mean of an ensemble blurs
where the future is uncertain, which PSNR rewards). Prints and writes per clip PSNR and SSIM of:
copy-last-context-frame, a single sample, the ensemble mean, and the earlier baseline (Gaussian
blur + histogram matching to the last context frame, applied to the single sample).
Outputs in {out_dir}/samples/ (--results_dir to keep runs apart): clip_{k}.png (context | members |
mean | truth | error) and metrics.csv.
"""
import csv
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
from wan_state import frame_timesteps, merge_lora


# ---------------------------------------------------------------------------------------------
# Sampling (shared with the tests)
# ---------------------------------------------------------------------------------------------

def make_scheduler(kind, shift):
    """diffusers' flow-matching solvers with Wan's shift: 'euler' or 'unipc' (Wan's default solver)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
    if kind == 'euler':
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    assert kind == 'unipc', f"--scheduler={kind!r}: use 'euler' or 'unipc'"
    return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type='flow_prediction',
                                   use_flow_sigmas=True, flow_shift=shift)


@torch.no_grad()
def sample_latents(model, z_ctx_BCKHW, states_BTD, context_1LD, noise_BCFHW, steps, cfg_scale=1.0,
                   shift=5.0, scheduler='euler'):
    """Denoise noise_BCFHW with the K context latents z_ctx held fixed; returns clean latents.

    Each row of the batch is one sample (the caller repeats a clip's context and states for its
    ensemble members). Context tokens get timestep 0; after every solver step the context latents
    are put back exactly (torch.where, bit for bit), as Wan's TI2V holds its first frame. With
    cfg_scale != 1 the unconditional pass (the learned no-state embedding) runs in the same batch.
    """
    B, C, Fr, H, W = noise_BCFHW.shape
    K = z_ctx_BCKHW.shape[2]
    assert z_ctx_BCKHW.shape == (B, C, K, H, W), (
        f"context latents {tuple(z_ctx_BCKHW.shape)} do not match noise {tuple(noise_BCFHW.shape)}")
    mask_BF = torch.ones(B, Fr, device=noise_BCFHW.device)
    mask_BF[:, :K] = 0
    is_ctx = (mask_BF == 0).view(B, 1, Fr, 1, 1)
    z_ctx_full = F.pad(z_ctx_BCKHW, (0, 0, 0, 0, 0, Fr - K))
    guided = cfg_scale != 1.0
    if guided:   # rows B.. are the unconditional copies
        states_BTD = torch.cat([states_BTD, states_BTD])
        drop_B = torch.arange(2 * B, device=noise_BCFHW.device) >= B
    else:
        drop_B = torch.zeros(B, dtype=torch.bool, device=noise_BCFHW.device)
    sched = make_scheduler(scheduler, shift)
    sched.set_timesteps(steps, device=noise_BCFHW.device)
    latent = torch.where(is_ctx, z_ctx_full, noise_BCFHW)
    for t in sched.timesteps:
        x_in = torch.cat([latent, latent]) if guided else latent
        t_BF = frame_timesteps(torch.cat([mask_BF] * (2 if guided else 1)), t.float().expand(x_in.shape[0]))
        v = model(x_in, t_BF, context_1LD, states_BTD, drop_B).float()
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        latent = sched.step(v, t, latent).prev_sample
        latent = torch.where(is_ctx, z_ctx_full, latent)
    return latent


# ---------------------------------------------------------------------------------------------
# Metrics and the blur baseline (images: uint8 [H, W, 3] numpy arrays)
# ---------------------------------------------------------------------------------------------

def psnr(pred_HWC, target_HWC):
    """PSNR in dB with pixels in [0, 1] (the challenge metric; paper 2, problem statement)."""
    mse = np.mean((pred_HWC.astype(np.float64) / 255 - target_HWC.astype(np.float64) / 255) ** 2)
    return float(10 * np.log10(1.0 / max(mse, 1e-10)))


def _gaussian_kernel(sigma, radius=None):
    radius = radius if radius is not None else max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def _blur_NCHW(x, k, padding_mode):
    r = len(k) // 2
    C = x.shape[1]
    if padding_mode:
        x = F.pad(x, (r, r, r, r), mode=padding_mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1).to(x), groups=C)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1).to(x), groups=C)


def ssim(pred_HWC, target_HWC):
    """SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, pixels in
    [0, 1], valid windows only, mean over pixels and channels."""
    x, y = (torch.from_numpy(a.astype(np.float64) / 255).permute(2, 0, 1)[None] for a in (pred_HWC, target_HWC))
    k = _gaussian_kernel(1.5, radius=5)
    mu_x, mu_y = _blur_NCHW(x, k, None), _blur_NCHW(y, k, None)
    var_x = _blur_NCHW(x * x, k, None) - mu_x ** 2
    var_y = _blur_NCHW(y * y, k, None) - mu_y ** 2
    cov = _blur_NCHW(x * y, k, None) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


def gaussian_blur(img_HWC, sigma):
    x = torch.from_numpy(img_HWC.astype(np.float64)).permute(2, 0, 1)[None]
    out = _blur_NCHW(x, _gaussian_kernel(sigma), 'reflect')
    return out[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)


def match_histograms(img_HWC, ref_HWC):
    """Map each channel's values so its histogram matches the reference's (quantile mapping)."""
    out = np.empty_like(img_HWC)
    for c in range(img_HWC.shape[2]):
        values, inverse, counts = np.unique(img_HWC[..., c], return_inverse=True, return_counts=True)
        ref_values, ref_counts = np.unique(ref_HWC[..., c], return_counts=True)
        quantiles = np.cumsum(counts) / img_HWC[..., c].size
        ref_quantiles = np.cumsum(ref_counts) / ref_HWC[..., c].size
        out[..., c] = np.round(np.interp(quantiles, ref_quantiles, ref_values))[inverse].reshape(img_HWC.shape[:2])
    return out


def blur_baseline(pred_HWC, last_context_HWC, sigma):
    """The earlier post-processing (paper 2.3, after Team Duke [24]): Gaussian blur, then match the
    colour histogram to the last context frame."""
    return match_histograms(gaussian_blur(pred_HWC, sigma), last_context_HWC)


def save_png(path, context_THWC, members_NHWC, mean_HWC, truth_HWC):
    """One row: 5 context frames | ensemble members | their mean | ground truth | error map (|mean - truth| x 4)."""
    err = np.abs(mean_HWC.astype(np.int16) - truth_HWC.astype(np.int16)).mean(-1)
    err_HWC = np.repeat(np.clip(err * 4, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    row = [*context_THWC, *members_NHWC, mean_HWC, truth_HWC, err_HWC]
    gap = np.full((truth_HWC.shape[0], 2, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([a for img in row for a in (img, gap)][:-1], axis=1)).save(path)


# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------

if __name__ == '__main__':
    out_dir = 'out_sampling'    # where train_sampling.py saved ckpt.pt
    results_dir = ''            # where the PNGs and metrics.csv go; '' = {out_dir}/samples
    init_from = 'checkpoint'    # 'checkpoint' or 'random' (random weights from the train flags: timing only)
    split = ''                  # a raw split folder; '' = {data_dir of the run}/val_v2.0_raw
    max_clips = 0               # 0 = every clip of the split
    clip_stride = 77            # frames between evaluated windows (77 = no overlap)
    ensemble = 16               # N members, averaged in pixel space (paper: 20)
    steps = 20                  # solver steps (paper: 20)
    cfg = 1.0                   # classifier-free guidance scale; 1.0 = off (paper's best: 1.0 or 1.5)
    scheduler = 'euler'         # 'euler' (FlowMatchEulerDiscreteScheduler) or 'unipc'
    shift = 0.0                 # 0 = the shift the model was trained with
    blur = True                 # also score the blur + histogram-matching baseline
    blur_sigma = 1.0            # Gaussian sigma in pixels for the blur baseline
    png_members = 4             # members drawn in each PNG
    compile = False             # torch.compile the DiT blocks (GPU; the first clip is slower)
    decode_batch = 4            # members the VAE decodes at once (more: faster on a large GPU, more memory)
    vae_dtype = 'float32'       # the Wan VAE's precision: 'float32' (the reference's) or 'bfloat16' (faster)
    seed = 0
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    # used only with --init_from=random (otherwise read from the checkpoint)
    model = 'ti2v-5b'
    vae = 'wan'
    vae_path = 'Wan-AI/Wan2.2-TI2V-5B-Diffusers'
    data_dir = 'data/1x'
    from configurator import configure
    configure(globals())
    assert vae_dtype in ('float32', 'bfloat16'), f"--vae_dtype={vae_dtype!r}: use 'float32' or 'bfloat16'"
    assert ensemble >= 1 and decode_batch >= 1, "--ensemble and --decode_batch must be at least 1"
    from train_sampling import build_model, text_context

    if init_from == 'checkpoint':
        ckpt_path = os.path.join(out_dir, 'ckpt.pt')
        assert os.path.exists(ckpt_path), f"{ckpt_path} not found: train first (python train_sampling.py) or pass --out_dir"
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=False)
        run = ckpt['config']
        print(f"{ckpt_path}: step {ckpt['step']}, model {run['model']}, vae {run['vae']}, {run['train_mode']}")
    else:
        assert init_from == 'random', f"--init_from={init_from!r}: use 'checkpoint' or 'random'"
        ckpt, run = None, dict(model=model, pretrained='', train_mode='full', lora_rank=32, lora_alpha=32,
                               init_seed=0, dim=0, num_layers=0, num_heads=0, ffn_dim=0, vae=vae, vae_path=vae_path,
                               data_dir=data_dir, shift=5.0, text_encoder='zeros', base_dtype='bfloat16')
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    base_dtype = torch.bfloat16 if device_type == 'cuda' and run['base_dtype'] == 'bfloat16' else torch.float32
    net = build_model(run['model'], run['pretrained'], run['train_mode'], run['lora_rank'], run['lora_alpha'],
                      run['init_seed'], device, base_dtype, dict(dim=run['dim'], num_layers=run['num_layers'],
                                                                 num_heads=run['num_heads'], ffn_dim=run['ffn_dim']))
    if ckpt is not None:
        with torch.no_grad():
            params = dict(net.named_parameters())
            for n, v in ckpt['trainable'].items():
                params[n].copy_(v)
    net.eval().requires_grad_(False)
    if run['train_mode'] == 'lora':   # W + B A alpha / r once: sampling then runs at the base model's cost
        merge_lora(net)
    if base_dtype != torch.float32:   # bf16 inference on GPUs (fp32 kept where the reference keeps it)
        net.set_dtype(base_dtype)
    if compile:   # fused kernels for the 30 identical blocks; the first clip pays the compilation
        net.compile_blocks()
    context_1LD = text_context(net.cfg, run['text_encoder'], device)   # [1, 512, 4096]: shared by every row
    shift = shift or run['shift']
    if run['vae'] == 'pixel':
        codec = data.PixelCodec()
    else:
        from wan_state import WanVAE
        codec = WanVAE.from_pretrained(run['vae_path'], device=device, dtype=getattr(torch, vae_dtype))

    split = split or os.path.join(run['data_dir'], 'val_v2.0_raw')
    clips = data.RawClips(split, stride=clip_stride, max_clips=max_clips or None)
    results_dir = results_dir or os.path.join(out_dir, 'samples')
    os.makedirs(results_dir, exist_ok=True)
    print(f"{len(clips)} clips of {split}; ensemble {ensemble}, {steps} {scheduler} steps, shift {shift}, cfg {cfg}")
    rows, seconds = [], []
    for k in tqdm(range(len(clips)), desc='clips'):
        item = clips[k]
        frames_THWC, states_TD = item['frames_THWC'], item['states_TD']
        if device_type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.time()
        # only the 5 context frames are encoded: the target never reaches the model
        z_ctx = codec.encode(data.frames_to_video(frames_THWC[None, :data.NUM_CONTEXT_FRAMES]).to(device))
        latent_shape = (z_ctx.shape[1], data.NUM_LATENTS, *z_ctx.shape[3:])
        g = torch.Generator().manual_seed(hash((seed, item['shard'], item['start'])) % 2 ** 62)
        noise = torch.randn((ensemble, *latent_shape), generator=g).to(device)
        z = sample_latents(net, z_ctx.expand(ensemble, -1, -1, -1, -1), states_TD[None].expand(ensemble, -1, -1).to(device),
                           context_1LD, noise, steps, cfg, shift, scheduler)
        pred = torch.cat([codec.decode(z[i:i + decode_batch])[:, :, -1]   # [N, 3, H, W]: frame 77
                          for i in range(0, ensemble, decode_batch)]).float().clamp(-1, 1)   # images, then the mean
        mean = data.video_to_frames(pred.mean(0)[None, :, None])[0, 0].cpu().numpy()
        if device_type == 'cuda':
            torch.cuda.synchronize()
        seconds.append(time.time() - t0)
        members = data.video_to_frames(pred[:, :, None])[:, 0].cpu().numpy()
        truth = frames_THWC[-1].numpy()
        last_ctx = frames_THWC[data.NUM_CONTEXT_FRAMES - 1].numpy()
        preds = {'copy_last': last_ctx, 'single': members[0], f'ensemble_{ensemble}': mean}
        if blur:
            preds['blur'] = blur_baseline(members[0], last_ctx, blur_sigma)
        row = dict(clip=k, shard=item['shard'], start=item['start'], seconds=round(seconds[-1], 3))
        for name, img in preds.items():
            row[f'psnr_{name}'] = round(psnr(img, truth), 4)
            row[f'ssim_{name}'] = round(ssim(img, truth), 4)
        rows.append(row)
        save_png(os.path.join(results_dir, f'clip_{k}.png'), frames_THWC[:data.NUM_CONTEXT_FRAMES].numpy(),
                 members[:png_members], mean, truth)
    with open(os.path.join(results_dir, 'metrics.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{'prediction of frame 77':<28} {'PSNR (dB)':>10} {'SSIM':>8}   ({len(rows)} clips)")
    for name in preds:
        label = {'copy_last': 'copy last context frame', 'single': 'single sample',
                 'blur': 'blur + histogram matching'}.get(name, f'ensemble of {ensemble}')
        print(f"{label:<28} {np.mean([r[f'psnr_{name}'] for r in rows]):>10.2f} "
              f"{np.mean([r[f'ssim_{name}'] for r in rows]):>8.3f}")
    print(f"{np.mean(seconds[1:] or seconds):.2f} s per clip on {device} (ensemble {ensemble}, {steps} steps, cfg {cfg})")
    print(f"wrote {results_dir}/metrics.csv and clip_*.png")
