"""The latent codecs of the sampling track: Wan 2.2's VAE, and the pixel codec that stands in
for it on the CPU. Both map a video in [-1, 1], [B, 3, T, H, W] with T = 4k + 1, to latents
[B, 48, k + 1, h, w] and back (encode / decode); frames_to_video and video_to_frames convert
from and to uint8 frames.

    vae = WanVAE.from_pretrained(repo_or_dir)   # official Wan2.2_VAE.pth or the diffusers vae/
    codec = PixelCodec()                        # lossless on keyframes, for the CPU demo
"""
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from machinery import need
from machinery.hub import resolve
from machinery.wan_files import check_finite, check_keys, read_pth


# --- Frames <-> the codecs' video convention ------------------------------------------------------

def frames_to_video(frames_BTHWC):
    """uint8 [B, T, H, W, 3] -> float [B, 3, T, H, W] in [-1, 1], the VAE's input convention."""
    return frames_BTHWC.permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def video_to_frames(video_BCTHW):
    """float [B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3], rounded as a saved image would be."""
    return ((video_BCTHW.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


# --- Wan 2.2 VAE (48 channels, 4x16x16) through diffusers' AutoencoderKLWan -----------------------

VAE_FILE = 'Wan2.2_VAE.pth'


# AutoencoderKLWan as the Wan 2.2 VAE (the -Diffusers repo's vae/config.json; the official .pth has
# weights only). Latent means and stds as wan/modules/vae2_2.py Wan2_2_VAE.
VAE22_CONFIG = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_temporal=4, scale_factor_spatial=16,
    latents_mean=[-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                  0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                  -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
                  -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                  0.3573, -0.0548, -0.1681, -0.0667],
    latents_std=[0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744])


# Official Wan2.2_VAE.pth name -> AutoencoderKLWan name, applied in order (diffusers
# scripts/convert_wan_to_diffusers.py convert_vae_22 does the same). The official stages are
# Sequentials of residual blocks with the resampler last; diffusers names them resnets and
# downsampler / upsampler. The residual Sequential is (norm, SiLU, conv, norm, SiLU, dropout, conv).
_VAE_KEYS = [(r'^conv1\.', 'quant_conv.'), (r'^conv2\.', 'post_quant_conv.'),
             (r'^(encoder|decoder)\.conv1\.', r'\1.conv_in.'),
             (r'^(encoder|decoder)\.head\.0\.', r'\1.norm_out.'), (r'^(encoder|decoder)\.head\.2\.', r'\1.conv_out.'),
             (r'^(encoder|decoder)\.middle\.0\.', r'\1.mid_block.resnets.0.'),
             (r'^(encoder|decoder)\.middle\.1\.', r'\1.mid_block.attentions.0.'),
             (r'^(encoder|decoder)\.middle\.2\.', r'\1.mid_block.resnets.1.'),
             (r'^encoder\.downsamples\.(\d+)\.downsamples\.\d+\.(resample|time_conv)',
              r'encoder.down_blocks.\1.downsampler.\2'),
             (r'^decoder\.upsamples\.(\d+)\.upsamples\.\d+\.(resample|time_conv)', r'decoder.up_blocks.\1.upsampler.\2'),
             (r'^encoder\.downsamples\.(\d+)\.downsamples\.', r'encoder.down_blocks.\1.resnets.'),
             (r'^decoder\.upsamples\.(\d+)\.upsamples\.', r'decoder.up_blocks.\1.resnets.'),
             (r'\.residual\.0\.', '.norm1.'), (r'\.residual\.2\.', '.conv1.'), (r'\.residual\.3\.', '.norm2.'),
             (r'\.residual\.6\.', '.conv2.'), (r'\.shortcut\.', '.conv_shortcut.')]


def _diffusers_vae_name(key):
    for pattern, repl in _VAE_KEYS:
        key = re.sub(pattern, repl, key)
    return key


class WanVAE:
    """encode(video in [-1, 1], [B, 3, T, H, W]) -> normalised latents [B, 48, 1 + (T-1)/4, H/16, W/16];
    decode does the reverse. Latents are (mu - mean) / std with the VAE's 48 means and stds."""

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        p = next(vae.parameters())
        self.mean = torch.tensor(vae.config.latents_mean, device=p.device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std, device=p.device).view(1, -1, 1, 1, 1)
        self.dtype = p.dtype

    @classmethod
    def from_pretrained(cls, repo_id_or_dir='Wan-AI/Wan2.2-TI2V-5B', device='cpu', dtype=torch.float32,
                        **config_overrides):
        """The official repo (Wan-AI/Wan2.2-TI2V-5B: its Wan2.2_VAE.pth alone is downloaded), the
        -Diffusers repo (its vae/), a local copy of either, or the path of a Wan2.2_VAE.pth. The
        .pth has original key names (wan/modules/vae2_2.py) and no config: its weights are renamed
        into AutoencoderKLWan built with VAE22_CONFIG (config_overrides change it, for tests). A file
        missing, damaged (NaN, inf too) or of another model stops with one sentence naming it."""
        AutoencoderKLWan = need('diffusers', 'the Wan 2.2 VAE').AutoencoderKLWan
        p = Path(os.path.expanduser(str(repo_id_or_dir)))
        pth = p if p.is_file() else resolve(repo_id_or_dir, [VAE_FILE, 'vae/*']) / VAE_FILE
        try:
            if not p.is_file():   # the official root's config.json is the DiT's: its .pth comes first
                root = pth.parent
                sub = next((d for d in (root / 'vae', root) if (d / 'config.json').exists()), None)
                if sub is not None and (sub != root or not pth.exists()):
                    vae = AutoencoderKLWan.from_pretrained(str(sub), torch_dtype=dtype)
                    check_finite(dict(vae.named_parameters()), sub)
                    return cls(vae.to(device))
                if not pth.exists():
                    raise ValueError(f"{root} has neither {VAE_FILE} (the official Wan-AI/Wan2.2-TI2V-5B) nor "
                                     f"vae/config.json (Wan-AI/Wan2.2-TI2V-5B-Diffusers)")
            # cast as read (diffusers' own .to(dtype) warns of fp32 modules that this VAE does not have)
            raw = read_pth(pth)
            check_finite(raw, pth)
            sd = {_diffusers_vae_name(k): v.to(dtype) for k, v in raw.items()}
            with torch.device('meta'):
                vae = AutoencoderKLWan(**{**VAE22_CONFIG, **config_overrides})
            check_keys(vae.state_dict(), sd, pth)
        except ValueError as err:
            raise SystemExit(f"the Wan 2.2 VAE: {err}") from None
        vae.load_state_dict(sd, strict=True, assign=True)
        return cls(vae.to(device))

    @torch.no_grad()
    def encode(self, video_BCTHW):
        B, C, T, H, W = video_BCTHW.shape
        s = self.vae.spatial_compression_ratio
        if C != 3 or (T - 1) % 4 or H % s or W % s:
            raise ValueError(f"video must be [B, 3, 4k+1, H, W] with H, W divisible by {s}, "
                             f"got {tuple(video_BCTHW.shape)}")
        mu = self.vae.encode(video_BCTHW.to(self.dtype)).latent_dist.mode()   # the mean, as the reference
        return ((mu.float() - self.mean) / self.std)

    @torch.no_grad()
    def decode(self, z_BCFHW):
        video = self.vae.decode((z_BCFHW.float() * self.std + self.mean).to(self.dtype)).sample
        return video.float().clamp(-1, 1)


# --- The pixel codec: the CPU demo's stand-in with the Wan latent layout --------------------------

class PixelCodec:
    """A deterministic stand-in for the Wan 2.2 VAE with its latent layout, for the CPU demo.

    A random-weight Wan VAE decodes noise, so PSNR through it means nothing. This codec keeps the
    layout the DiT sees (48 channels, 1 + (T - 1) / 4 latent frames; 4x spatial compression where
    Wan's is 16x): latent k = pixel_unshuffle by 4 of frame 4k. It is lossless on those keyframes, which
    include the target (clip frame 20 = latent 5); decode fills the frames in between by linear
    interpolation. Latents are pixels x 2 (exact in floating point), about unit variance as Wan's
    VAE normalises its latents, so flow matching's noise levels mean what they mean at full scale.
    It proves the pipeline, not the Wan VAE (full-scale runs use --vae=wan).
    """
    z_dim, spatial, temporal, scale = 48, 4, 4, 2.0

    def encode(self, video_BCTHW):
        B, C, T, H, W = video_BCTHW.shape
        if C != 3 or (T - 1) % 4:
            raise ValueError(f"video must be [B, 3, 4k+1, H, W], got {tuple(video_BCTHW.shape)}")
        if H % 4 or W % 4:
            raise ValueError(f"frame size {H}x{W} must be divisible by 4")
        keys_BCFHW = video_BCTHW[:, :, ::4]
        z = F.pixel_unshuffle(keys_BCFHW.transpose(1, 2).flatten(0, 1), 4)  # [B*F, 48, H/4, W/4]
        return z.unflatten(0, (B, -1)).transpose(1, 2) * self.scale

    def decode(self, z_BCFHW):
        B, C, Fz, h, w = z_BCFHW.shape
        if C != 48:
            raise ValueError(f"pixel-codec latents have 48 channels, got {C}")
        z_BCFHW = z_BCFHW / self.scale
        keys = F.pixel_shuffle(z_BCFHW.transpose(1, 2).flatten(0, 1), 4).unflatten(0, (B, Fz)).transpose(1, 2)
        if Fz == 1:
            return keys
        # the weight of the next keyframe at each of the 4 frames from one keyframe to the next
        a = torch.arange(4, dtype=keys.dtype, device=keys.device).div(4).view(1, 1, 1, 4, 1, 1)
        between = keys[:, :, :-1, None] * (1 - a) + keys[:, :, 1:, None] * a   # [B, 3, Fz-1, 4, H, W]
        return torch.cat([between.flatten(2, 3), keys[:, :, -1:]], dim=2)
