"""Wan 2.2 TI2V-5B with robot-state conditioning: the sampling track's model in one file.

The DiT computes what the reference (Wan-Video/Wan2.2 wan/modules/model.py) computes, checked
against diffusers' WanTransformer3DModel in test_all.py. On top of it, the two things the winning
solution added (paper sections 2.1, 2.2): AdaLN-Zero state conditioning and LoRA. Its files are
those of the Wan ecosystem: official or diffusers checkpoints in, LoRA out in the ComfyUI /
diffusers format and in from their formats.

API (the sampling scripts use these names):
    cfg = WanConfig()                      # TI2V-5B numbers; WanConfig.tiny() for tests / CPU
    model = WanDiT(cfg, state_cond=True)   # random init (state conditioning and LoRA add nothing yet)
    model = WanDiT.from_pretrained('Wan-AI/Wan2.2-TI2V-5B' or a local dir, official or diffusers layout,
                                   state_cond=True, device='cuda', dtype=None -> bf16 on CUDA)
    v_BCFHW = model(x_BCFHW, t, context_BLD, states_BTD=None, drop_states_B=None)
        t: [B] one timestep per sample (0..1000), [B, F] one per latent frame (frame_timesteps), or
            [B, L] one per token as the reference, L = F * H/2 * W/2 (same output, slower)
        context_BLD: [1 or B, <= 512, 4096]; a batch of 1 is shared by all samples (computed once)
        states_BTD: [B, 4 * (F - 1) + 1, 25] states after the 4x frame downsampling (None: the
            learned no-state embedding); drop_states_B: bool [B], True -> no-state embedding
    model.gradient_checkpointing = True    # recompute every block in backward (training); an int n:
                                           # only the first n blocks (trade memory for speed)
    model.compile_blocks()                 # torch.compile each block in place (same maths, fused kernels)
    model.flops_per_sample(F, H, W, lora_step=False, batch=1)   # matmul FLOPs (forward or LoRA step), for MFU
    model.set_dtype(torch.bfloat16)        # bf16 weights, fp32 where the reference is fp32
    t_BF = frame_timesteps(mask_BF, t_B)   # mask 0 = context frame -> t = 0 (per_token_timestep: [B, L])
    add_lora(model, rank=32, alpha=32); merge_lora(model); unmerge_lora(model)
    trainable_state_dict(model); save_trainable(model, path); load_trainable(model, path)
    export_lora(model, out_dir)            # lora.safetensors (ComfyUI, diffusers, DiffSynth read it)
                                           # + state_embedder.safetensors (nanoWM's own)
    load_lora(model, path_or_dir, merge=False)   # a Wan LoRA of ComfyUI, diffusers/PEFT, DiffSynth or kohya format
    vae = WanVAE.from_pretrained(repo_or_dir)    # official Wan2.2_VAE.pth or the diffusers vae/
    z = vae.encode(video_BCTHW); video = vae.decode(z)
    context_1LD = null_context(repo_or_dir)   # umT5 encoding of "" padded to 512 slots
    parameter_counts()                     # `python wan_state.py`; timings: `python bench.py --what=wan_fwd`
    `python wan_state.py export --ckpt out_sampling/ckpt.pt [--out DIR]`   # export_lora of a checkpoint

Precision: on the CPU everything is fp32. With bf16 weights (set_dtype / from_pretrained on
CUDA) the forward runs under bf16 autocast and keeps the residual stream, the timestep and state
modulation and the head in fp32, as the reference does.
"""
import json
import math
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

@dataclass
class WanConfig:
    dim: int = 3072
    ffn_dim: int = 14336
    num_layers: int = 30
    num_heads: int = 24            # head_dim 128
    in_dim: int = 48               # Wan 2.2 VAE latent channels
    out_dim: int = 48
    patch_size: tuple = (1, 2, 2)
    text_dim: int = 4096           # umT5-XXL width
    text_len: int = 512            # cross-attention slots; shorter contexts are zero-padded
    freq_dim: int = 256            # sinusoidal timestep features
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # state conditioning (paper 2.1)
    state_dim: int = 25            # 1X robot state: 21 joints, 2 hand closures, 2 velocities
    r_dim: int = 256               # state feature width
    state_freqs: int = 4           # sin/cos at frequencies 1, 2, 4, 8 per continuous dim

    @classmethod
    def tiny(cls, **overrides):
        """A few-thousand-parameter config for tests and CPU runs (same code paths)."""
        kw = dict(dim=64, ffn_dim=128, num_layers=2, num_heads=2, text_dim=32, text_len=16,
                  freq_dim=32, r_dim=32)
        kw.update(overrides)
        return cls(**kw)

    @property
    def head_dim(self):
        return self.dim // self.num_heads


# Columns of the 1X state vector (the 1X dataset's robot_states): 0-20 joint angles, 21-22 hand closure
# (0 open .. 1 closed), 23-24 linear / angular velocity. The hand closures are already in [0, 1]
# and pass through as they are; the rest get sin/cos features.
STATE_HAND_DIMS = (21, 22)


# ---------------------------------------------------------------------------------------------
# Small modules
# ---------------------------------------------------------------------------------------------

def sinusoidal_embedding(t, dim):
    """Timestep features as the reference: float64, cos half then sin half, 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angle = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1).float()


def rope_cos_sin(f, h, w, head_dim, theta, device):
    """3-axis RoPE tables for an (f, h, w) token grid: [f*h*w, head_dim/2] cos and sin.

    The head_dim/2 rotation pairs split frame/height/width as c - 2(c//3), c//3, c//3 (22/21/21
    for head_dim 128); each axis has its own frequencies 1/theta^(2i/d_axis) (reference model.py).
    """
    c = head_dim // 2
    angles = []
    for n, pairs in zip((f, h, w), (c - 2 * (c // 3), c // 3, c // 3)):
        freqs = 1.0 / theta ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float64, device=device) / (2 * pairs))
        angles.append(torch.outer(torch.arange(n, dtype=torch.float64, device=device), freqs))
    angle = torch.cat([angles[0][:, None, None].expand(f, h, w, -1),
                       angles[1][None, :, None].expand(f, h, w, -1),
                       angles[2][None, None, :].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, c)
    return torch.cos(angle).float(), torch.sin(angle).float()


def apply_rope(x_BHLD, cos_LC, sin_LC):
    """Rotate adjacent pairs (x[2i], x[2i+1]) by the position angles, in fp32."""
    x1, x2 = x_BHLD.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos_LC - x2 * sin_LC, x1 * sin_LC + x2 * cos_LC], dim=-1)
    return out.flatten(-2).type_as(x_BHLD)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight, normalising in fp32 (reference WanRMSNorm)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (reference WanLayerNorm)."""

    def forward(self, x):
        return super().forward(x.float())


class Attention(nn.Module):
    """Self- (rope given) or cross-attention (context given); q/k RMS-normed across all heads."""

    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)   # over the full dim, before the head split
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x_BLD, context_BSD=None, rope=None):
        src_BSD = x_BLD if context_BSD is None else context_BSD
        q = rearrange(self.norm_q(self.q(x_BLD)), 'b l (h d) -> b h l d', h=self.num_heads)
        k = rearrange(self.norm_k(self.k(src_BSD)), 'b s (h d) -> b h s d', h=self.num_heads)
        v = rearrange(self.v(src_BSD), 'b s (h d) -> b h s d', h=self.num_heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            q, k = q.type_as(v), k.type_as(v)
        if k.shape[0] != q.shape[0]:   # one context shared by the batch: its k, v were computed once
            k, v = (a.expand(q.shape[0], -1, -1, -1).contiguous() for a in (k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(rearrange(out, 'b h l d -> b l (h d)'))


def modulate(x_BLD, shift_BGD, scale_BGD):
    """x * (1 + scale) + shift (DiT's adaLN), one (shift, scale) per group of L / G consecutive
    tokens: G = F, one per latent frame (tokens are frame-major), or G = L, one per token."""
    B, L, D = x_BLD.shape
    G = shift_BGD.shape[1]
    x_BGND = x_BLD.view(B, G, L // G, D)
    return (x_BGND * (1 + scale_BGD[:, :, None]) + shift_BGD[:, :, None]).view(B, L, D)


def gated(y_BLD, gate_BGD):
    """The residual branch y times its gate, one gate per group of tokens as in modulate()."""
    B, L, D = y_BLD.shape
    G = gate_BGD.shape[1]
    return (y_BLD.float().view(B, G, L // G, D) * gate_BGD[:, :, None]).view(B, L, D)


class Block(nn.Module):
    """Wan DiT block: modulated self-attention, plain cross-attention, modulated GELU-tanh FFN."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(d, cfg.eps, elementwise_affine=True)   # the cross-attention norm
        self.cross_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate='tanh'), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d ** 0.5)

    def forward(self, x_BLD, e_BG6D, context_BSD, rope):
        # 6-way modulation in fp32: this block's learned offset + the timestep (+ state) embedding,
        # one per group of tokens (a latent frame, or a token: see WanDiT.forward)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e_BG6D).unbind(2)
        x_BLD = x_BLD + gated(self.self_attn(modulate(self.norm1(x_BLD), shift_sa, scale_sa), rope=rope), gate_sa)
        x_BLD = x_BLD + self.cross_attn(self.norm3(x_BLD), context_BSD).float()
        x_BLD = x_BLD + gated(self.ffn(modulate(self.norm2(x_BLD), shift_ff, scale_ff)), gate_ff)
        return x_BLD


class Head(nn.Module):
    """Output head: non-affine LayerNorm, 2-way modulation from the timestep embedding, Linear."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x_BLD, e_BGD):
        shift, scale = (self.modulation.float() + e_BGD[:, :, None]).unbind(2)
        return self.head(modulate(self.norm(x_BLD), shift, scale))


class StateEmbedder(nn.Module):
    """Robot states -> per-latent-frame AdaLN-Zero modulation (paper 2.1, Fig. 2).

    states [B, T, 25] (T = 4(F-1)+1 after the 4x frame downsampling, 21 for the challenge)
      -> raw continuous dims + sin/cos(2^k x), k < state_freqs, with the hand closures appended
      -> MLP to r_dim -> two Conv1d (kernel 3, stride 2, pad 1) that take T = 4k+1 to 2k+1 to
         k+1 = F, the VAE's latent length; latent frame j sees states 4j-3 .. 4j+3 (all states,
         past and future, are given in the challenge)
      -> Linear, SiLU, Linear to 6 x dim, the last layer zero-initialised so the model starts
         exactly as the base model (DiT's adaLN-Zero).
    A learned no-state embedding replaces the compressed features of dropped samples (CFG).
    """

    def __init__(self, cfg):
        super().__init__()
        r = cfg.r_dim
        self.cont_dims = [i for i in range(cfg.state_dim) if i not in STATE_HAND_DIMS]
        self.hand_dims = [i for i in STATE_HAND_DIMS if i < cfg.state_dim]
        self.register_buffer('freqs', 2.0 ** torch.arange(cfg.state_freqs), persistent=False)
        n_feat = len(self.cont_dims) * (1 + 2 * cfg.state_freqs) + len(self.hand_dims)
        self.mlp_in = nn.Sequential(nn.Linear(n_feat, r), nn.SiLU(), nn.Linear(r, r))
        self.conv = nn.Sequential(nn.Conv1d(r, r, 3, stride=2, padding=1), nn.SiLU(),
                                  nn.Conv1d(r, r, 3, stride=2, padding=1))
        self.null = nn.Parameter(torch.randn(r) * 0.02)
        self.mlp_out = nn.Sequential(nn.Linear(r, r), nn.SiLU(), nn.Linear(r, 6 * cfg.dim))
        nn.init.zeros_(self.mlp_out[2].weight)
        nn.init.zeros_(self.mlp_out[2].bias)

    def forward(self, states_BTD, drop_B, batch, num_frames):
        if states_BTD is None:
            r_BFR = self.null.float().expand(batch, num_frames, -1)
        else:
            s = states_BTD.float()
            cont_BTC = s[..., self.cont_dims]
            angle = cont_BTC[..., None] * self.freqs.to(s.device)
            feat_BTN = torch.cat([cont_BTC, torch.sin(angle).flatten(2), torch.cos(angle).flatten(2),
                                  s[..., self.hand_dims]], dim=-1)
            h_BRT = rearrange(self.mlp_in(feat_BTN), 'b t r -> b r t')
            r_BFR = rearrange(self.conv(h_BRT), 'b r f -> b f r')
            assert r_BFR.shape[1] == num_frames, (
                f"states have {states_BTD.shape[1]} time steps, which compress to {r_BFR.shape[1]} latent "
                f"frames, but the latents have {num_frames}: give 4 * (F - 1) + 1 = {4 * (num_frames - 1) + 1} "
                f"state rows (the states after the 4x frame downsampling)")
            if drop_B is not None:
                r_BFR = torch.where(drop_B.to(r_BFR.device).view(-1, 1, 1), self.null.float(), r_BFR)
        return rearrange(self.mlp_out(r_BFR), 'b f (six d) -> b f six d', six=6)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

def frame_timesteps(mask_BF, t_B):
    """[B, F] frame mask (0 = context frame, 1 = generated) x [B] timesteps -> [B, F] per frame.

    This is how TI2V holds its first frame fixed (Wan 2.2 TI2V: timestep 0 on its tokens); the paper
    holds several frames. The DiT takes it as it is (one modulation per latent frame).
    """
    assert mask_BF.ndim == 2 and t_B.shape == mask_BF.shape[:1], (
        f"mask must be [B, F] and t [B], got {tuple(mask_BF.shape)} and {tuple(t_B.shape)}")
    return mask_BF.float() * t_B.float()[:, None]


def per_token_timestep(mask_BF, t_B, tokens_per_frame):
    """The same timesteps one per token, [B, L], as the reference TI2V passes them (and diffusers'
    WanTransformer3DModel takes them); tokens_per_frame = (H / 2) * (W / 2). The DiT gives the same
    output for these as for frame_timesteps(), more slowly (bench.py measures by how much)."""
    return frame_timesteps(mask_BF, t_B).repeat_interleave(tokens_per_frame, dim=1)


class WanDiT(nn.Module):

    def __init__(self, cfg: WanConfig, state_cond: bool = True):
        super().__init__()
        self.cfg = cfg
        assert cfg.dim % cfg.num_heads == 0 and cfg.head_dim % 2 == 0, "dim / num_heads must be even"
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate='tanh'),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.state_embedder = StateEmbedder(cfg) if state_cond else None
        self.gradient_checkpointing = False
        if self.patch_embedding.weight.device.type != 'meta':
            self._init_weights()

    @property
    def state_cond(self):
        return self.state_embedder is not None

    def _init_weights(self):
        # the reference's init_weights (the state embedder keeps its own, zero-output init)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith('state_embedder'):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in [*self.text_embedding, *self.time_embedding]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def forward(self, x_BCFHW, t, context_BLD, states_BTD=None, drop_states_B=None):
        cfg = self.cfg
        B, C, Fr, H, W = x_BCFHW.shape
        pt, ph, pw = cfg.patch_size
        assert C == cfg.in_dim and Fr % pt == 0 and H % ph == 0 and W % pw == 0, (
            f"x must be [B, {cfg.in_dim}, F, H, W] with H, W divisible by {ph}, got {tuple(x_BCFHW.shape)}")
        f, h, w = Fr // pt, H // ph, W // pw
        L = f * h * w
        t = torch.as_tensor(t, device=x_BCFHW.device)
        assert t.shape in ((B,), (B, f), (B, L)), (
            f"t must be [B], [B, F] or [B, L] = [{B}], [{B}, {f}] or [{B}, {L}], got {tuple(t.shape)}")
        # Modulation groups: G = f (one timestep per latent frame) or G = L (one per token, as the
        # reference). Every token of a frame has the same timestep and the same states, so per
        # frame is the same maths with h * w times less modulation work and memory (bench.py).
        t_BG = t[:, None].expand(B, f) if t.ndim == 1 else t
        G = t_BG.shape[1]
        assert context_BLD.ndim == 3 and context_BLD.shape[0] in (1, B) and context_BLD.shape[2] == cfg.text_dim \
            and context_BLD.shape[1] <= cfg.text_len, (
                f"context must be [B or 1, <= {cfg.text_len}, {cfg.text_dim}], got {tuple(context_BLD.shape)}")
        assert self.state_cond or (states_BTD is None and drop_states_B is None), \
            "this WanDiT was built with state_cond=False; it takes no states"

        # bf16 weights -> bf16 autocast, with the fp32 islands below (as the reference runs)
        wdtype = self.patch_embedding.weight.dtype
        dev = x_BCFHW.device.type
        amp = torch.autocast(dev, dtype=wdtype) if wdtype in (torch.bfloat16, torch.float16) else nullcontext()
        fp32 = torch.autocast(dev, enabled=False)
        with amp:
            x_BLD = rearrange(self.patch_embedding(x_BCFHW), 'b d f h w -> b (f h w) d').float()
            with fp32:   # timestep embedding and modulation in fp32
                e_BGD = self.time_embedding(sinusoidal_embedding(t_BG, cfg.freq_dim))
                e0_BG6D = rearrange(self.time_projection(e_BGD), 'b g (six d) -> b g six d', six=6)
                if self.state_cond:   # paper 2.1: state modulation added to the timestep modulation
                    s_BF6D = self.state_embedder(states_BTD, drop_states_B, B, f)
                    e0_BG6D = e0_BG6D + s_BF6D.repeat_interleave(G // f, dim=1)
            # the reference zero-pads the text context to text_len slots, then embeds all of them;
            # a context shared by the batch (the empty prompt) is embedded once, not B times
            context_BSD = self.text_embedding(F.pad(context_BLD, (0, 0, 0, cfg.text_len - context_BLD.shape[1])))
            rope = rope_cos_sin(f, h, w, cfg.head_dim, cfg.rope_theta, x_BCFHW.device)
            n_ckpt = self.checkpointed_blocks() if torch.is_grad_enabled() else 0
            for i, block in enumerate(self.blocks):
                if i < n_ckpt:
                    x_BLD = checkpoint(block, x_BLD, e0_BG6D, context_BSD, rope, use_reentrant=False)
                else:
                    x_BLD = block(x_BLD, e0_BG6D, context_BSD, rope)
            with fp32:   # the head's modulation is the timestep's alone (no state term)
                out_BLP = self.head(x_BLD, e_BGD)
        return rearrange(out_BLP, 'b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)',
                         f=f, h=h, w=w, pt=pt, ph=ph, pw=pw)

    def checkpointed_blocks(self):
        """How many blocks (the first ones) recompute their activations in backward: all for
        gradient_checkpointing = True, none for False, n for an int n. Checkpointing only some
        blocks keeps the others' activations: faster when memory allows (same gradients)."""
        n = self.gradient_checkpointing
        if isinstance(n, bool):
            return len(self.blocks) if n else 0
        assert isinstance(n, int) and 0 <= n <= len(self.blocks), (
            f"gradient_checkpointing must be True, False or a block count in 0..{len(self.blocks)}, got {n!r}")
        return n

    def compile_blocks(self, **compile_kwargs):
        """torch.compile every block in place (nn.Module.compile: parameter names and state_dict keys
        stay as they are). The blocks are all the same, so one compiled graph serves all 30; the
        first forward pays the compilation."""
        for block in self.blocks:
            block.compile(**compile_kwargs)
        return self

    def flops_per_sample(self, num_frames, height, width, lora_step=False, batch=1):
        """Matmul FLOPs per sample (for MFU) of a forward on a batch of `batch` latents [in_dim,
        num_frames, height, width] with one timestep per latent frame and one text context shared
        by the batch (its embedding and cross-attention keys / values are computed once a batch).
        Elementwise work, norms, RoPE and the state embedder are left out (small next to the
        matmuls at full size; test_all.py checks the count against torch's FLOP counter).

        lora_step=False: one forward. True: a LoRA fine-tuning step on the frozen base: forward,
        then the backward of the activations (1x the linears the gradient passes through, 2x the
        attention products), no base weight gradients, and the LoRA matmuls (3 per adapter weight
        and token forward and backward, 2 where the input is the text context). Recomputation by
        gradient checkpointing is not counted: MFU counts the model's FLOPs, not the hardware's.
        """
        cfg = self.cfg
        pt, ph, pw = cfg.patch_size
        f, S, d = num_frames // pt, cfg.text_len, cfg.dim
        L = f * (height // ph) * (width // pw)
        patch = math.prod(cfg.patch_size)
        # the gradient flows through these (per block: q, k, v, o; cross-attention q, o; the FFN; the head)
        on_path = 2 * L * (cfg.num_layers * (6 * d * d + 2 * d * cfg.ffn_dim) + d * cfg.out_dim * patch)
        # ... and not through these: their inputs (latents, timesteps, text) need no gradient
        off_path = (2 * L * d * cfg.in_dim * patch + 2 * f * (cfg.freq_dim * d + d * d + d * 6 * d)
                    + (2 * S * (cfg.text_dim * d + d * d) + cfg.num_layers * 2 * S * 2 * d * d) / batch)
        # attention: scores and weighted sums, self over L keys and cross over the S text slots
        attn = cfg.num_layers * (4 * L * L * d + 4 * L * S * d)
        if not lora_step:
            return on_path + off_path + attn
        lora = 0
        for name, m in self.named_modules():
            if isinstance(m, LoRALinear):
                n_ab = m.rank * (m.in_features + m.out_features)
                lora += 4 * S * n_ab / batch if name.endswith(('cross_attn.k', 'cross_attn.v')) else 6 * L * n_ab
        assert lora > 0, "lora_step=True needs a model with LoRA adapters (add_lora)"
        return 2 * on_path + off_path + 3 * attn + lora

    def set_dtype(self, dtype):
        """Cast the weights to dtype (bf16 on GPU), keeping fp32 what the reference runs in fp32."""
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if _keeps_fp32(name) else dtype)
        return self

    @classmethod
    def from_pretrained(cls, repo_id_or_dir='Wan-AI/Wan2.2-TI2V-5B', state_cond=True, device='cpu', dtype=None,
                        **cfg_overrides):
        """Load the Wan 2.2 DiT from the Hub or a local dir, official or diffusers layout.

        Official: config.json + diffusion_pytorch_model.safetensors.index.json + shards, original
        key names. Diffusers: transformer/ with the same files and diffusers key names (mapped).
        The model is built on the meta device and the checkpoint tensors assigned, so only one
        copy of the weights is ever in memory. dtype defaults to bf16 on CUDA, fp32 elsewhere.
        The state embedder (not in the checkpoint) gets its zero-output init; cfg_overrides set
        the config fields a checkpoint does not store (r_dim, state_freqs, ...).
        """
        dtype = dtype or (torch.bfloat16 if str(device).startswith('cuda') else torch.float32)
        root = _resolve(repo_id_or_dir, ['config.json', 'diffusion_pytorch_model*', 'transformer/*'])
        if not _find_weights(root, 'diffusion_pytorch_model') and (root / 'transformer').is_dir():
            root = root / 'transformer'
        cfg = replace(_config_from_json(root / 'config.json'), **cfg_overrides)
        with torch.device('meta'):
            model = cls(cfg, state_cond=False)
        sd = {}
        for key, tensor in _read_safetensors(root, 'diffusion_pytorch_model', device):
            sd[key] = tensor.to(torch.float32 if _keeps_fp32(_official_name(key)) else dtype)
        if any(k.startswith('condition_embedder.') for k in sd):
            sd = {_official_name(k): v for k, v in sd.items()}
        _check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()},
                    {k: tuple(v.shape) for k, v in sd.items()}, root)
        model.load_state_dict(sd, strict=True, assign=True)
        if state_cond:
            model.state_embedder = StateEmbedder(cfg).to(device)
        return model


def _keeps_fp32(name):
    return (name.startswith(('time_embedding.', 'time_projection.', 'head.', 'state_embedder.'))
            or name.endswith('.modulation') or '.norm3.' in name or '.lora_' in name)


# ---------------------------------------------------------------------------------------------
# Checkpoint files: download, sharded safetensors, key names, checks
# ---------------------------------------------------------------------------------------------

def _resolve(repo_id_or_dir, allow_patterns):
    """A local directory as it is, else a Hub repo id downloaded (only allow_patterns files)."""
    p = Path(os.path.expanduser(str(repo_id_or_dir)))
    if p.is_dir():
        return p
    if p.exists() or str(repo_id_or_dir).startswith(('/', '.', '~')) or str(repo_id_or_dir).count('/') != 1:
        raise FileNotFoundError(f"{repo_id_or_dir}: not a directory, and not a Hub repo id like 'Wan-AI/Wan2.2-TI2V-5B'")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(repo_id_or_dir), allow_patterns=allow_patterns))
    except Exception as err:
        raise RuntimeError(f"could not download {repo_id_or_dir} from the Hugging Face Hub ({err}); "
                           f"download it elsewhere and pass the local directory instead") from err


def _find_weights(root, stem):
    """Shard files of a checkpoint: through <stem>.safetensors.index.json, or one <stem>.safetensors."""
    index = root / f'{stem}.safetensors.index.json'
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())['weight_map']
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index}: not a safetensors index json with a weight_map ({err})") from err
        shards = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        missing = [s for s in shards if not (root / s).exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) {missing} that are not in {root}; "
                                    f"the download is incomplete: download the checkpoint again")
        return shards
    single = root / f'{stem}.safetensors'
    return {single.name: None} if single.exists() else {}


def _safetensors_index(root, stem):
    """key -> shard path of a sharded or single-file safetensors checkpoint; every shard must open."""
    from safetensors import safe_open
    shards = _find_weights(root, stem)
    if not shards:
        raise FileNotFoundError(f"no {stem}.safetensors or {stem}.safetensors.index.json in {root}")
    where = {}
    for shard, keys in shards.items():
        try:
            with safe_open(str(root / shard), framework='pt') as f:
                present = set(f.keys())
        except Exception as err:
            raise ValueError(f"{root / shard}: cannot read this safetensors file ({err}); it is truncated "
                             f"or corrupt: download it again") from err
        lost = sorted(set(keys or []) - present)
        if lost:
            raise ValueError(f"{root / shard}: the index json lists {len(lost)} tensor(s) that are not in this "
                             f"shard, e.g. {lost[:3]}; the file is corrupt or from another checkpoint")
        where.update({k: root / shard for k in (keys if keys is not None else sorted(present))})
    return where


def _read_safetensors(root, stem, device='cpu'):
    """Yield (key, tensor) from a sharded or single-file safetensors checkpoint, one at a time."""
    from safetensors import safe_open
    where = _safetensors_index(root, stem)
    for path in dict.fromkeys(where.values()):
        with safe_open(str(path), framework='pt', device=str(device)) as f:
            for key in [k for k, p in where.items() if p == path]:
                yield key, f.get_tensor(key)


def _check_keys(expected, got, source):
    """Fail with a message listing missing, unexpected and wrong-shape tensors."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k}: checkpoint {got[k]} vs model {expected[k]}" for k in sorted(set(expected) & set(got))
             if got[k] != expected[k]]
    if missing or unexpected or wrong:
        def show(items):
            return ', '.join(items[:8]) + (f' ... ({len(items)} in all)' if len(items) > 8 else '')
        lines = [f"checkpoint {source} does not match the model config:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {show(unexpected)}")
        if wrong:
            lines.append(f"  wrong shape ({len(wrong)}): {show(wrong)}")
        raise ValueError('\n'.join(lines))


def _config_from_json(path):
    """WanConfig from an official config.json (dim, num_heads, ...) or a diffusers one."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a Wan checkpoint directory holds config.json next to its weights")
    raw = json.loads(path.read_text())
    if 'num_attention_heads' in raw:   # diffusers WanTransformer3DModel config
        raw = dict(dim=raw['num_attention_heads'] * raw['attention_head_dim'], num_heads=raw['num_attention_heads'],
                   in_dim=raw['in_channels'], out_dim=raw['out_channels'], ffn_dim=raw['ffn_dim'],
                   num_layers=raw['num_layers'], text_dim=raw.get('text_dim', 4096), freq_dim=raw['freq_dim'],
                   eps=raw['eps'], patch_size=raw['patch_size'])
    names = {fld.name for fld in fields(WanConfig)}
    kw = {k: v for k, v in raw.items() if k in names}
    if 'patch_size' in kw:
        kw['patch_size'] = tuple(kw['patch_size'])
    return WanConfig(**kw)


# official name prefix -> diffusers name prefix (the official Wan2.2 checkpoint; diffusers scripts/convert_wan_to_diffusers.py)
_TOP_KEYS = {'time_embedding.0.': 'condition_embedder.time_embedder.linear_1.',
             'time_embedding.2.': 'condition_embedder.time_embedder.linear_2.',
             'time_projection.1.': 'condition_embedder.time_proj.',
             'text_embedding.0.': 'condition_embedder.text_embedder.linear_1.',
             'text_embedding.2.': 'condition_embedder.text_embedder.linear_2.',
             'head.modulation': 'scale_shift_table', 'head.head.': 'proj_out.'}
_BLOCK_KEYS = {f'{a}.{o}.': f'{b}.{d}.' for a, b in (('self_attn', 'attn1'), ('cross_attn', 'attn2'))
               for o, d in (('q', 'to_q'), ('k', 'to_k'), ('v', 'to_v'), ('o', 'to_out.0'),
                            ('norm_q', 'norm_q'), ('norm_k', 'norm_k'))}
_BLOCK_KEYS.update({'norm3.': 'norm2.', 'ffn.0.': 'ffn.net.0.proj.', 'ffn.2.': 'ffn.net.2.',
                    'modulation': 'scale_shift_table'})


def _rename(key, top, block):
    m = re.match(r'blocks\.(\d+)\.(.*)', key)
    prefix, rest, table = (f'blocks.{m[1]}.', m[2], block) if m else ('', key, top)
    for a, b in table.items():
        if rest.startswith(a):
            return prefix + b + rest[len(a):]
    return key


def _diffusers_name(key):
    return _rename(key, _TOP_KEYS, _BLOCK_KEYS)


def _official_name(key):
    return _rename(key, {b: a for a, b in _TOP_KEYS.items()}, {b: a for a, b in _BLOCK_KEYS.items()})


def to_diffusers_state_dict(sd):
    """Our (official) key names -> diffusers WanTransformer3DModel key names."""
    return {_diffusers_name(k): v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------
# LoRA (paper 2.2: rank 32 on the DiT), hand-rolled as in minLoRA / loralib
# ---------------------------------------------------------------------------------------------

LORA_TARGETS = ('self_attn.q', 'self_attn.k', 'self_attn.v', 'self_attn.o',
                'cross_attn.q', 'cross_attn.k', 'cross_attn.v', 'cross_attn.o', 'ffn.0', 'ffn.2')


class LoRALinear(nn.Linear):
    """y = x W^T + b + (x A^T B^T) * alpha / rank; shares W and b with the Linear it replaces, so
    the base keys keep their names and the adapters save as <name>.lora_A.weight / lora_B.weight."""

    def __init__(self, base: nn.Linear, rank, alpha):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.merged = False
        # fp32 adapters: they are the trained weights (the optimizer's master copy)
        dev = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)   # B = 0: the model starts exactly as the base

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(x)) * self.scale

    def delta(self):
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def add_lora(model, rank=32, alpha=32, targets=LORA_TARGETS):
    """Wrap the target Linears of every block with LoRA; freeze all but LoRA and state params."""
    assert not lora_modules(model), "the model already has LoRA adapters"
    for block in model.blocks:
        for name in targets:
            parent_name, attr = name.rsplit('.', 1)
            parent = block.get_submodule(parent_name)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha))
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(_is_trainable(name))
    return model


@torch.no_grad()
def merge_lora(model):
    """W <- W + B A alpha / r, so inference runs at base speed (exact in fp32, rounded in bf16)."""
    for m in lora_modules(model):
        assert not m.merged, "LoRA is already merged"
        m.weight += m.delta().to(m.weight.dtype)
        m.merged = True


@torch.no_grad()
def unmerge_lora(model):
    for m in lora_modules(model):
        assert m.merged, "LoRA is not merged"
        m.weight -= m.delta().to(m.weight.dtype)
        m.merged = False


def _is_trainable(name):
    return '.lora_A.' in name or '.lora_B.' in name or name.startswith('state_embedder.')


def trainable_state_dict(model):
    """The LoRA adapters and the state-conditioning weights: what fine-tuning trains and saves."""
    return {k: v for k, v in model.state_dict().items() if _is_trainable(k)}


def save_trainable(model, path):
    from safetensors.torch import save_file
    assert not any(m.merged for m in lora_modules(model)), "unmerge_lora(model) before saving"
    sd = {k: v.detach().contiguous().cpu() for k, v in trainable_state_dict(model).items()}
    loras = lora_modules(model)
    meta = {'lora_rank': str(loras[0].rank), 'lora_alpha': str(loras[0].alpha)} if loras else {}
    save_file(sd, str(path), metadata=meta)


def load_trainable(model, path):
    """Load LoRA + state weights saved by save_trainable; adds LoRA first if the file has it."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework='pt') as f:
        meta = f.metadata() or {}
    sd = load_file(str(path))
    if any('.lora_' in k for k in sd) and not lora_modules(model):
        assert 'lora_rank' in meta, f"{path}: LoRA weights without lora_rank metadata; call add_lora first"
        add_lora(model, rank=int(meta['lora_rank']), alpha=float(meta['lora_alpha']))
    assert not any(m.merged for m in lora_modules(model)), "unmerge_lora(model) before loading"
    own = trainable_state_dict(model)
    _check_keys({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in sd.items()}, path)
    model.load_state_dict(sd, strict=False)
    return model


# ---------------------------------------------------------------------------------------------
# LoRA files other Wan tools read and write: ComfyUI, diffusers, DiffSynth-Studio, kohya / musubi
# ---------------------------------------------------------------------------------------------
# The same adapters under four key conventions (module names in the official Wan naming, ours):
#   ComfyUI / Wan     diffusion_model.blocks.0.self_attn.q.lora_A.weight, .lora_B.weight, .alpha
#   diffusers / PEFT  transformer.blocks.0.attn1.to_q.lora_A.weight (alpha in the file's metadata)
#   DiffSynth-Studio  blocks.0.self_attn.q.lora_A.default.weight (no alpha)
#   kohya / musubi    lora_unet_blocks_0_self_attn_q.lora_down.weight, .lora_up.weight, .alpha
# lora_A = lora_down [rank, in], lora_B = lora_up [out, rank]; the update is B @ A * alpha / rank,
# or B @ A where a file has no alpha (ComfyUI comfy/lora.py, diffusers lora_conversion_utils.py
# _convert_non_diffusers_wan_lora_to_diffusers / _convert_musubi_wan_lora_to_diffusers, DiffSynth
# GeneralLoRALoader, which ignores alpha).
_LORA_KEY = re.compile(r'(?:diffusion_model\.|transformer\.|base_model\.model\.|lora_unet_)?(.+?)'
                       r'\.(lora_A|lora_B|lora_down|lora_up|alpha)(?:\.default)?(?:\.weight)?')
_LORA_PART = {'lora_A': 'A', 'lora_down': 'A', 'lora_B': 'B', 'lora_up': 'B', 'alpha': 'alpha'}


def export_lora(model_or_trainable, out_dir, lora_alpha=None):
    """Write out_dir/lora.safetensors, which ComfyUI, diffusers and DiffSynth-Studio load for Wan 2.2
    TI2V-5B, and out_dir/state_embedder.safetensors (the robot-state conditioning: nanoWM's own,
    no other tool has it). Returns the paths written.

    model_or_trainable: a WanDiT with LoRA (merged or not), or a checkpoint's trainable tensors
    (ckpt['trainable']: blocks.N.<module>.lora_A.weight ..., state_embedder.*) with its lora_alpha.
    Keys diffusion_model.blocks.N.<module>.lora_A.weight [r, in], .lora_B.weight [out, r] and
    .alpha = r: alpha / rank is folded into lora_B, so B @ A is the whole update and loaders that
    read .alpha (ComfyUI, diffusers) and loaders that do not (DiffSynth) apply the same update."""
    if isinstance(model_or_trainable, nn.Module):
        loras = {n: (m.lora_A.weight, m.lora_B.weight, m.scale) for n, m in model_or_trainable.named_modules()
                 if isinstance(m, LoRALinear)}
        state = {k: v for k, v in model_or_trainable.state_dict().items() if k.startswith('state_embedder.')}
    else:
        sd = model_or_trainable
        a_keys = [k for k in sd if k.endswith('.lora_A.weight')]
        assert lora_alpha is not None or not a_keys, "a trainable state dict needs its lora_alpha (ckpt['config'])"
        loras = {k[:-len('.lora_A.weight')]: (sd[k], sd[k.replace('.lora_A.', '.lora_B.')],
                                              lora_alpha / sd[k].shape[0]) for k in a_keys}
        state = {k: v for k, v in sd.items() if k.startswith('state_embedder.')}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if loras:
        sd = {}
        for name, (A, B, scale) in loras.items():
            sd[f'diffusion_model.{name}.lora_A.weight'] = A.detach().float().cpu().contiguous()
            sd[f'diffusion_model.{name}.lora_B.weight'] = (B.detach().float().cpu() * scale).contiguous()
            sd[f'diffusion_model.{name}.alpha'] = torch.tensor(float(A.shape[0]))
        written.append(_save_atomic(sd, out_dir / 'lora.safetensors'))
    if state:
        written.append(_save_atomic({k: v.detach().float().cpu().contiguous() for k, v in state.items()},
                                    out_dir / 'state_embedder.safetensors'))
    return written


def _save_atomic(sd, path):
    """safetensors file written whole or not at all (a run killed while saving leaves the old one)."""
    from safetensors.torch import save_file
    save_file(sd, str(path) + '.tmp', metadata={'format': 'pt'})
    os.replace(str(path) + '.tmp', path)
    return path


def read_lora(path_or_state_dict, num_layers):
    """A Wan LoRA in any format above -> {our module name: (A [r, in], B [out, r], scale)}, fp32.
    The scale is alpha / rank from .alpha tensors, else from diffusers' lora_adapter_metadata
    (lora_alpha / r), else 1. Keys of other modules (time or head adapters, DoRA, diffs) are an error."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    sd, meta = path_or_state_dict, {}
    if not isinstance(sd, dict):
        with safe_open(str(sd), framework='pt') as f:
            meta = f.metadata() or {}
        sd = load_file(str(sd))
    peft = {k.split('.')[-1]: v for k, v in json.loads(meta.get('lora_adapter_metadata', '{}')).items()}
    default_scale = peft['lora_alpha'] / peft['r'] if 'lora_alpha' in peft and 'r' in peft else 1.0
    targets = [f'blocks.{i}.{t}' for i in range(num_layers) for t in LORA_TARGETS]
    underscored = {n.replace('.', '_'): n for n in targets}   # kohya / musubi write dots as _
    parts, unknown = {}, []
    for key, tensor in sd.items():
        m = _LORA_KEY.fullmatch(key)
        name = m and (underscored.get(m[1]) or _official_name(m[1] + '.weight')[:-len('.weight')])
        if name not in targets:
            unknown.append(key)
            continue
        parts.setdefault(name, {})[_LORA_PART[m[2]]] = tensor
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) are not LoRA adapters of the {len(LORA_TARGETS)} linears of a Wan "
                         f"block this loader knows ({', '.join(LORA_TARGETS)}), e.g. {unknown[:4]}")
    out = {}
    for name, p in parts.items():
        assert 'A' in p and 'B' in p, f"{name}: the file has {sorted(p)} but a LoRA needs both A (down) and B (up)"
        rank = p['A'].shape[0]
        out[name] = (p['A'].float(), p['B'].float(), p['alpha'].item() / rank if 'alpha' in p else default_scale)
    return out


@torch.no_grad()
def load_lora(model, path, merge=False):
    """Load a Wan LoRA of any format above (a file, or export_lora's folder: lora.safetensors and,
    if there, state_embedder.safetensors) into a WanDiT. Returns the model.

    merge=False: the file's adapters become the model's LoRA (unmerged, trainable: to start from
        or evaluate a LoRA trained elsewhere). A model without adapters gets add_lora with the file's
        rank and alpha; one with adapters keeps them (the file must have their rank) and those the
        file lacks get B = 0, so the model is the base plus exactly the file's update.
    merge=True: W += B @ A * scale into the base weights of any model, with or without adapters of
        its own (to stack LoRAs, or to sample at base speed)."""
    path = Path(path)
    lora_file, state_file = (path / 'lora.safetensors', path / 'state_embedder.safetensors') if path.is_dir() \
        else (path, None)
    loras = read_lora(lora_file, len(model.blocks)) if lora_file.exists() else {}
    if not loras and not (state_file and state_file.exists()):
        raise FileNotFoundError(f"{path}: no LoRA file (or export_lora folder) there")
    if merge:
        for name, (A, B, scale) in loras.items():
            w = model.get_submodule(name).weight
            w += ((B @ A) * scale).to(device=w.device, dtype=w.dtype)
    elif loras:
        if not lora_modules(model):
            ranks = {A.shape[0] for A, _, _ in loras.values()}
            assert len(ranks) == 1, f"{lora_file}: adapters of ranks {sorted(ranks)}; load it with merge=True"
            rank, scale = ranks.pop(), next(iter(loras.values()))[2]
            add_lora(model, rank=rank, alpha=scale * rank,
                     targets=sorted({n.split('.', 2)[2] for n in loras}, key=LORA_TARGETS.index))
        for name, m in ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)):
            assert not m.merged, "unmerge_lora(model) before loading adapters"
            A, B, scale = loras.pop(name, (None, None, None))
            if A is None:
                m.lora_B.weight.zero_()
                continue
            assert A.shape == m.lora_A.weight.shape and B.shape == m.lora_B.weight.shape, (
                f"{name}: the file's adapter is rank {A.shape[0]}, the model's rank {m.rank}; load with merge=True")
            m.lora_A.weight.copy_(A)
            m.lora_B.weight.copy_(B * (scale / m.scale))
        assert not loras, f"the model has no adapters on {sorted(loras)[:4]}...: add_lora with these targets first"
    if state_file is not None and state_file.exists():
        from safetensors.torch import load_file
        assert model.state_cond, f"{state_file}: state conditioning weights, but the model has state_cond=False"
        sd = load_file(str(state_file))
        own = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith('state_embedder.')}
        _check_keys(own, {k: tuple(v.shape) for k, v in sd.items()}, state_file)
        model.load_state_dict(sd, strict=False)
    return model


# ---------------------------------------------------------------------------------------------
# VAE: Wan 2.2 (48 channels, 4x16x16) through diffusers' AutoencoderKLWan
# ---------------------------------------------------------------------------------------------

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


def _vae_diffusers_name(key):
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
        into AutoencoderKLWan built with VAE22_CONFIG (config_overrides change it, for tests)."""
        from diffusers import AutoencoderKLWan
        p = Path(os.path.expanduser(str(repo_id_or_dir)))
        pth = p if p.is_file() else _resolve(repo_id_or_dir, [VAE_FILE, 'vae/*']) / VAE_FILE
        if not p.is_file():   # the official root's config.json is the DiT's: its .pth comes first
            root = pth.parent
            sub = next((d for d in (root / 'vae', root) if (d / 'config.json').exists()), None)
            if sub is not None and (sub != root or not pth.exists()):
                return cls(AutoencoderKLWan.from_pretrained(str(sub), torch_dtype=dtype).to(device))
            if not pth.exists():
                raise FileNotFoundError(f"{root} has neither {VAE_FILE} (the official Wan-AI/Wan2.2-TI2V-5B) nor "
                                        f"vae/config.json (Wan-AI/Wan2.2-TI2V-5B-Diffusers)")
        raw = torch.load(pth, map_location='cpu', mmap=True, weights_only=True)   # mmap: read lazily
        sd = {_vae_diffusers_name(k): v for k, v in raw.items()}
        with torch.device('meta'):
            vae = AutoencoderKLWan(**{**VAE22_CONFIG, **config_overrides})
        _check_keys({k: tuple(v.shape) for k, v in vae.state_dict().items()},
                    {k: tuple(v.shape) for k, v in sd.items()}, pth)
        vae.load_state_dict(sd, strict=True, assign=True)
        return cls(vae.to(device=device, dtype=dtype))

    @torch.no_grad()
    def encode(self, video_BCTHW):
        B, C, T, H, W = video_BCTHW.shape
        s = self.vae.spatial_compression_ratio
        assert C == 3 and (T - 1) % 4 == 0 and H % s == 0 and W % s == 0, (
            f"video must be [B, 3, 4k+1, H, W] with H, W divisible by {s}, got {tuple(video_BCTHW.shape)}")
        mu = self.vae.encode(video_BCTHW.to(self.dtype)).latent_dist.mode()   # the mean, as the reference
        return ((mu.float() - self.mean) / self.std)

    @torch.no_grad()
    def decode(self, z_BCFHW):
        video = self.vae.decode((z_BCFHW.float() * self.std + self.mean).to(self.dtype)).sample
        return video.float().clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# Empty-prompt text context (paper 2.1: condition on "" and keep cross-attention)
# ---------------------------------------------------------------------------------------------

UMT5_FILE = 'models_t5_umt5-xxl-enc-bf16.pth'


def null_context(repo_id_or_dir='Wan-AI/Wan2.2-TI2V-5B', cache_path=None, text_len=512, eos_id=1):
    """umT5-XXL encoding of "" as the DiT sees it: [1, text_len, 4096], row 0 the EOS output, zeros after.

    "" tokenises to the single EOS token. With one token, attention is softmax over one key = 1,
    so each layer's attention is o(v(norm1(x))) and relative position bias plays no part; the
    whole encoder is a few matrix-vector products, computed here in fp32 from the weights, no
    tokenizer needed. Reads the official models_t5_umt5-xxl-enc-bf16.pth or the diffusers
    text_encoder/ (transformers UMT5EncoderModel). The [1, 4096] result is cached as safetensors.
    """
    from safetensors.torch import load_file, save_file
    if cache_path is None:
        name = str(repo_id_or_dir).strip('/').replace('/', '--')
        cache_path = Path(os.environ.get('NANOWM_CACHE', '~/.cache/nanowm')).expanduser() / f'null_context_{name}.safetensors'
    cache_path = Path(cache_path)
    if cache_path.exists():
        eos_1D = load_file(str(cache_path))['context']
    else:
        eos_1D = _umt5_one_token(_resolve(repo_id_or_dir, [UMT5_FILE, 'text_encoder/*']), eos_id)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({'context': eos_1D.contiguous()}, str(cache_path))
    return F.pad(eos_1D, (0, 0, 0, text_len - eos_1D.shape[0]))[None]


def _umt5_one_token(root, token_id):
    """Read only what one token needs: one embedding row, v, o, the FFN and the norms of each layer."""
    from safetensors import safe_open
    if (root / UMT5_FILE).exists():   # original Wan keys (wan/modules/t5.py T5Encoder); mmap reads lazily
        sd = torch.load(root / UMT5_FILE, map_location='cpu', mmap=True, weights_only=True)
        keys, get, get_row = sd.keys(), sd.__getitem__, lambda key, i: sd[key][i:i + 1]
        n_layers = 1 + max(int(k.split('.')[1]) for k in keys if k.startswith('blocks.'))
        names = dict(emb='token_embedding.weight', final='norm.weight', n1='blocks.{}.norm1.weight',
                     v='blocks.{}.attn.v.weight', o='blocks.{}.attn.o.weight', n2='blocks.{}.norm2.weight',
                     gate='blocks.{}.ffn.gate.0.weight', fc1='blocks.{}.ffn.fc1.weight', fc2='blocks.{}.ffn.fc2.weight')
    else:   # transformers UMT5EncoderModel keys (diffusers text_encoder/, sharded safetensors)
        sub = root / 'text_encoder' if (root / 'text_encoder').is_dir() else root
        where = _safetensors_index(sub, 'model')
        keys = where.keys()

        def get(key):
            with safe_open(str(where[key]), framework='pt') as f:
                return f.get_tensor(key)

        def get_row(key, i):
            with safe_open(str(where[key]), framework='pt') as f:
                return f.get_slice(key)[i:i + 1]

        n_layers = 1 + max(int(k.split('.')[2]) for k in keys if k.startswith('encoder.block.'))
        emb = 'shared.weight' if 'shared.weight' in keys else 'encoder.embed_tokens.weight'
        p = 'encoder.block.{}.layer.'
        names = dict(emb=emb, final='encoder.final_layer_norm.weight', n1=p + '0.layer_norm.weight',
                     v=p + '0.SelfAttention.v.weight', o=p + '0.SelfAttention.o.weight', n2=p + '1.layer_norm.weight',
                     gate=p + '1.DenseReluDense.wi_0.weight', fc1=p + '1.DenseReluDense.wi_1.weight',
                     fc2=p + '1.DenseReluDense.wo.weight')

    def w(key, i=None):
        return get(names[key].format(i)).float()

    def rms(x, weight):   # T5 LayerNorm: no mean subtraction, no bias, eps 1e-6
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    x = get_row(names['emb'], token_id).float()
    for i in range(n_layers):
        x = x + rms(x, w('n1', i)) @ w('v', i).T @ w('o', i).T
        h = rms(x, w('n2', i))
        x = x + (F.gelu(h @ w('gate', i).T, approximate='tanh') * (h @ w('fc1', i).T)) @ w('fc2', i).T
    return rms(x, w('final'))


# ---------------------------------------------------------------------------------------------
# Size: `python wan_state.py` (parameter counts, meta device). Speed lives in bench.py.
# ---------------------------------------------------------------------------------------------

def parameter_counts(cfg=None, lora_rank=32):
    """Base / state-conditioning / LoRA parameter counts, built on the meta device (no memory)."""
    with torch.device('meta'):
        model = WanDiT(cfg or WanConfig(), state_cond=True)
        add_lora(model, rank=lora_rank, alpha=lora_rank)
    count = {'base': 0, 'state': 0, 'lora': 0}
    for name, p in model.named_parameters():
        count['lora' if '.lora_' in name else 'state' if name.startswith('state_embedder.') else 'base'] += p.numel()
    return count


def main(argv=None):
    """`python wan_state.py`: parameter counts. `python wan_state.py export --ckpt out_sampling/ckpt.pt
    [--out DIR]`: lora.safetensors + state_embedder.safetensors of a sampling checkpoint (export_lora).
    `python wan_state.py encode_raw --split DIR --out DIR [--stride 8]`: a raw split's clips as Wan
    2.2 VAE latents, what train_sampling.py --vae=wan trains on (it also encodes them itself)."""
    import argparse
    import data
    parser = argparse.ArgumentParser(prog='wan_state.py', description=main.__doc__)
    sub = parser.add_subparsers(dest='command')
    p = sub.add_parser('export', help="write a sampling checkpoint's LoRA in the ComfyUI / diffusers format")
    p.add_argument('--ckpt', required=True, help="a train_sampling.py checkpoint (ckpt.pt)")
    p.add_argument('--out', default=None, help="output folder (default: the checkpoint's folder)")
    p = sub.add_parser('encode_raw', help='encode every clip of a raw split to Wan 2.2 VAE latents (safetensors)')
    data.add_encode_arguments(p)
    p.add_argument('--vae_path', default='Wan-AI/Wan2.2-TI2V-5B-Diffusers', help='hub repo id or local folder of the Wan VAE')
    args = parser.parse_args(argv)
    if args.command == 'encode_raw':   # an fp32 VAE: encoding runs once, so spend the precision; bf16 latents on disk
        vae = WanVAE.from_pretrained(args.vae_path, device=args.device)
        n = data.encode_raw_split(args.split, args.out, vae, args.stride, args.batch_size, args.device, torch.bfloat16)
        print(f"encoded {n} clips of {args.split} to {args.out}")
        return
    if args.command == 'export':
        import run_dir   # weights_only loading, the track checked, a truncated file named
        ckpt = run_dir.load_checkpoint(args.ckpt, 'sampling')
        written = export_lora(ckpt['trainable'], args.out or Path(args.ckpt).parent, ckpt['config'].get('lora_alpha'))
        print('\n'.join(f"wrote {p}" for p in written) or f"{args.ckpt}: no LoRA or state weights to export")
        return
    c = parameter_counts()
    print(f"Wan 2.2 TI2V-5B DiT: {c['base']:,} base + {c['state']:,} state conditioning + "
          f"{c['lora']:,} LoRA (rank 32) = {sum(c.values()):,} parameters")


if __name__ == '__main__':
    main()
