"""Flow matching for the sampling track, as Wan 2.2 does it: what train_sampling.py and sample.py share.

    x_s = (1 - s) x0 + s noise,  target v = noise - x0,  timestep t = 1000 s   (s = 1: pure noise)

Sections: the noise schedule (Wan's shift, the reference sampler's sigmas), the training loss and
its per-sample random draws, the samplers (hand-written Euler on the reference schedule; diffusers'
UniPC, Wan's own default solver), and the ensemble (paper 2.3, predict_frame77): the prediction of
frame 77 that sample.py and the validation of a training run both use (its score, PSNR, is in
metrics.py).
"""
import torch

import data
from machinery import need
from machinery.vae import frames_to_video, video_to_frames
from wan_state import frame_timesteps

NUM_TRAIN_TIMESTEPS = 1000   # Wan 2.2: t = 1000 s


# --- Noise schedule -------------------------------------------------------------------------------

def shift_sigma(u, shift):
    """Wan's timestep shift: s' = shift s / (1 + (shift - 1) s); shift > 1 spends more steps near noise."""
    return shift * u / (1 + (shift - 1) * u)


def reference_sigmas(steps, shift):
    """The sampling schedule of the reference samplers (Wan 2.2's get_sampling_sigmas with its
    flow-matching Euler, and DiffSynth's FlowMatchScheduler): the N noise levels
    shift(linspace(1, 0, N + 1)[:N]), then 0, where the last step lands. float64 [N + 1].
    (diffusers' FlowMatchEulerDiscreteScheduler, built with shift=, shifts its smallest sigma
    twice: at shift 5 and 20 steps its last nonzero sigma is 0.024 instead of 0.208.)"""
    u = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:steps]
    return torch.cat([shift_sigma(u, shift), torch.zeros(1, dtype=torch.float64)])


# --- Training loss --------------------------------------------------------------------------------

def latent_mask(batch, num_latents=data.NUM_LATENTS, num_context=data.NUM_CONTEXT_LATENTS, device='cpu'):
    """[B, F] frame mask: 0 on the context latents (held clean), 1 on the latents to generate."""
    mask_BF = torch.ones(batch, num_latents, device=device)
    mask_BF[:, :num_context] = 0
    return mask_BF


def flow_matching_loss(model, z0_BCFHW, states_BTD, context_BLD, sigma_B, noise_BCFHW, drop_B, *,
                       num_context=data.NUM_CONTEXT_LATENTS, weight_B=None):
    """Mean squared error of the predicted velocity on the latents to generate (context excluded).

    The context latents enter clean, with timestep 0 for their frames, as Wan's TI2V holds its first
    frame; their output is not a prediction of anything, so it is left out of the loss. weight_B:
    one weight per sample (diffsynth_weight), multiplying its mean squared error; None: plain MSE.
    """
    B, K = z0_BCFHW.shape[0], num_context
    if not takes_states(model):
        states_BTD = drop_B = None
    s = sigma_B.view(B, 1, 1, 1, 1)
    x_t = (1 - s) * z0_BCFHW + s * noise_BCFHW
    x_t[:, :, :K] = z0_BCFHW[:, :, :K]   # the context latents enter clean
    t_BF = frame_timesteps(latent_mask(B, z0_BCFHW.shape[2], K, z0_BCFHW.device), NUM_TRAIN_TIMESTEPS * sigma_B)
    v_BCFHW = model(x_t, t_BF, context_BLD, states_BTD, drop_B)
    target = noise_BCFHW - z0_BCFHW
    err = (v_BCFHW[:, :, K:].float() - target[:, :, K:].float()).square()
    if weight_B is None:
        return err.mean()
    return (err.mean(dim=(1, 2, 3, 4)) * weight_B.to(err.device)).mean()


def takes_states(model):
    """False for a base model (WanDiT(state_cond=False), or DDP's wrapper of one): it is given no states."""
    return getattr(getattr(model, 'module', model), 'state_cond', True)


def diffsynth_weight(sigma_B, shift):
    """The loss weight of the team's trainer, which calls DiffSynth-Studio's flow-matching loss: its
    scheduler, set up with set_timesteps(1000, training=True), weights the 1000 training timesteps
    t_i = 1000 shift(u_i), u_i = linspace(1, 0, 1001)[:1000], by a Gaussian bump around t = 500,
    w_i = (y_i - min y) * 1000 / sum(y - min y), y = exp(-2 ((t_i - 500) / 1000)^2), and a sample
    takes the weight of the timestep nearest its own (DiffSynth 2.1: diffsynth/diffusion/flow_match.py,
    set_training_weight and training_weight; diffusion/loss.py FlowMatchSFTLoss). It moves loss mass
    from the noisiest samples (w < 0.64 above sigma 0.9) to the middle of the schedule (w = 2.08 at 0.5).
    DiffSynth draws t among the t_i; nanoWM draws sigma continuously: the same distribution."""
    u = torch.linspace(1, 0, NUM_TRAIN_TIMESTEPS + 1)[:-1]
    t = NUM_TRAIN_TIMESTEPS * shift_sigma(u, shift)
    y = torch.exp(-2 * ((t - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2)
    w = (y - y.min()) * (NUM_TRAIN_TIMESTEPS / (y - y.min()).sum())
    return w[(t[None] - NUM_TRAIN_TIMESTEPS * sigma_B.float().cpu()[:, None]).abs().argmin(dim=1)]


def sample_draws(seed, step, positions, latent_shape, shift, p_drop):
    """Per-sample randomness (noise level, noise, state dropout), a function of (seed, step,
    position in the global batch) only: the same under any number of GPUs, and after a resume."""
    sigma, noise, drop = [], [], []
    for pos in positions:
        g = torch.Generator().manual_seed(hash((seed, step, pos)) % 2 ** 62)
        sigma.append(shift_sigma(torch.rand(1, generator=g), shift))
        noise.append(torch.randn(latent_shape, generator=g))
        drop.append(torch.rand(1, generator=g) < p_drop)
    return torch.cat(sigma), torch.stack(noise), torch.cat(drop)


# --- Samplers -------------------------------------------------------------------------------------

@torch.no_grad()
def sample_latents(model, z_ctx_BCKHW, states_BTD, context_1LD, noise_BCFHW, *, steps, shift, cfg_scale=1.0,
                   scheduler='euler', no_states=False):
    """Denoise noise_BCFHW with the K context latents z_ctx held fixed; returns clean latents.

    scheduler 'euler': x <- x + (s_next - s) v on reference_sigmas(steps, shift) (Wan's and
    DiffSynth's flow-matching Euler). 'unipc': diffusers' UniPC with Wan's schedule; the model sees
    the scheduler's integer timesteps (999, 989, ...), as in Wan's pipeline, not 1000 x sigma.
    Each row of the batch is one sample (the caller repeats a clip's context and states for its
    ensemble members). Context tokens get timestep 0; after every solver step the context latents
    are put back exactly (bit for bit), as Wan's TI2V holds its first frame. With cfg_scale != 1
    the unconditional pass (the learned no-state embedding) runs in the same batch.
    no_states=True samples from the no-state embedding alone (the ablation: what the states add).
    """
    B, C, Fr, H, W = noise_BCFHW.shape
    K = z_ctx_BCKHW.shape[2]
    guided = cfg_scale != 1.0
    if z_ctx_BCKHW.shape != (B, C, K, H, W):
        raise ValueError(f"context latents {tuple(z_ctx_BCKHW.shape)} do not match noise {tuple(noise_BCFHW.shape)}")
    if guided and no_states:
        raise ValueError("no_states samples without the states: there is nothing to guide")
    if scheduler not in ('euler', 'unipc'):
        raise ValueError(f"scheduler={scheduler!r}: 'euler' or 'unipc'")
    if not takes_states(model) and (guided or no_states):
        raise ValueError("a model without state conditioning (state_cond=False) has no no-state embedding: "
                         "cfg_scale 1, no_states False")
    device, rows = noise_BCFHW.device, 2 * B if guided else B
    mask_BF = latent_mask(rows, Fr, K, device)
    if not takes_states(model):
        states_BTD = drop_B = None
    elif guided:   # rows B.. are the unconditional copies
        states_BTD = torch.cat([states_BTD, states_BTD])
        drop_B = torch.arange(rows, device=device) >= B
    else:   # no flags at all without no_states: a model trained without state dropout has no no-state embedding
        drop_B = torch.ones(B, dtype=torch.bool, device=device) if no_states else None

    def velocity(latent, t):
        x_in = torch.cat([latent, latent]) if guided else latent
        v = model(x_in, frame_timesteps(mask_BF, t.float().expand(rows)), context_1LD, states_BTD, drop_B).float()
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        return v

    def hold_context(latent):   # the context latents, exactly
        return torch.cat([z_ctx_BCKHW, latent[:, :, K:]], dim=2)

    latent = hold_context(noise_BCFHW)
    if scheduler == 'euler':
        sigmas = reference_sigmas(steps, shift).tolist()
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = velocity(latent, torch.tensor(NUM_TRAIN_TIMESTEPS * s, device=device))
            latent = hold_context(latent + (s_next - s) * v)
        return latent
    # diffusers' UniPC as Wan 2.2's TI2V pipeline configures it (order 2, x0 from the flow, Wan's sigmas)
    diffusers = need('diffusers', "the 'unipc' scheduler")
    sched = diffusers.UniPCMultistepScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, use_flow_sigmas=True,
                                              prediction_type='flow_prediction', flow_shift=shift)
    sched.set_timesteps(steps, device=device)
    for t in sched.timesteps:
        latent = hold_context(sched.step(velocity(latent, t), t, latent).prev_sample)
    return latent


# --- The ensemble (paper 2.3) ---------------------------------------------------------------------

def predict_frame77(net, codec, frames_THWC, states_TD, context_1LD, *, ensemble, steps, shift, noise_seed,
                    cfg_scale=1.0, scheduler='euler', decode_batch=4, device='cpu', no_states=False, videos=False):
    """The ensemble (paper 2.3): N = `ensemble` members, each from its own noise, denoised in one
    batch, decoded, and their frames 77 averaged in pixel space: the challenge's prediction for one
    clip (the mean's squared error is at most the members' average: a higher PSNR than a typical
    member, if blurrier).

    The 5 context frames are encoded once and held fixed in every member (sample_latents). Returns
    the members uint8 [N, H, W, 3] and their mean uint8 [H, W, 3]; with videos=True also every
    member's whole decoded clip, uint8 [N, 21, H, W, 3]. no_states: the no-state embedding instead
    of the states (states_TD is then ignored). A model without states (state_cond=False) ignores
    states_TD (None is fine). Non-finite latents are an error."""
    z_ctx = codec.encode(frames_to_video(frames_THWC[None, :data.NUM_CONTEXT_FRAMES]).to(device))
    latent_shape = (z_ctx.shape[1], data.NUM_LATENTS, *z_ctx.shape[3:])
    noise = torch.randn((ensemble, *latent_shape), generator=torch.Generator().manual_seed(noise_seed)).to(device)
    states_BTD = None if states_TD is None else states_TD[None].expand(ensemble, -1, -1).to(device)
    z = sample_latents(net, z_ctx.expand(ensemble, -1, -1, -1, -1), states_BTD, context_1LD, noise, steps=steps,
                       shift=shift, cfg_scale=cfg_scale, scheduler=scheduler, no_states=no_states)
    if not torch.isfinite(z).all():
        raise FloatingPointError(f"the model's sample holds {int((~torch.isfinite(z)).sum())} non-finite latent "
                                 f"values: the weights are broken (diverged training?), not the data")
    keep = slice(None) if videos else slice(-1, None)   # every frame, or frame 77 (the last) alone
    clips = [codec.decode(z[i:i + decode_batch])[:, :, keep] for i in range(0, ensemble, decode_batch)]
    video = torch.cat(clips).float().clamp(-1, 1)
    mean_HWC = video_to_frames(video[:, :, -1:].mean(0, keepdim=True))[0, 0].cpu().numpy()
    members_NHWC = video_to_frames(video[:, :, -1:])[:, 0].cpu().numpy()
    if videos:
        return members_NHWC, mean_HWC, video_to_frames(video).cpu().numpy()
    return members_NHWC, mean_HWC
