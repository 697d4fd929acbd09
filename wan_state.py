"""Wan 2.2 TI2V-5B with robot-state conditioning: the sampling track's model in one file.

Top to bottom in the paper's order: WanConfig; RoPE, norms and attention; modulate and gated_residual
(DiT's adaLN); Block and Head; StateEmbedder (paper 2.1: the robot states as an AdaLN-Zero
modulation added to the timestep's, one per latent frame); frame_timesteps (the held context
frames at timestep 0); WanDiT; LoRA (paper 2.2: rank 32 on the frozen DiT, hand-rolled as in
minLoRA). The DiT computes what the reference (Wan-Video/Wan2.2 wan/modules/model.py) computes;
test_all.py checks it against diffusers' WanTransformer3DModel.
Checkpoints and the umT5 context: machinery/wan_files.py; LoRA files: machinery/lora_files.py; the VAE:
machinery/vae.py.

Precision: fp32 on the CPU. With bf16 weights (set_dtype) the forward runs under bf16 autocast
and keeps the residual stream, the timestep and state modulation and the head in fp32, as the
reference does. `python wan_state.py` prints the parameter counts.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


# --- Config ---------------------------------------------------------------------------------------

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
    state_freqs: int = 4           # sin/cos at frequencies 1, 2, 4, 8 per continuous dim ('paper' embedder)
    state_embedder: str = 'paper'  # 'paper' (the report's text) or 'team' (the team's code, StateEmbedder)
    null_state: bool = True        # the learned no-state embedding (CFG): as the team's code, only for state dropout

    @classmethod
    def tiny(cls, **overrides):
        """A config of about 0.2M parameters for tests and CPU runs (the same code paths)."""
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


# --- Small modules: timestep features, RoPE, norms, attention -------------------------------------

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

    def forward(self, x):   # x * rsqrt(mean(x^2) + eps) in fp32: one fused kernel (torch's rms_norm)
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


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


# --- AdaLN (DiT): modulate the normalised input, gate the residual branch -------------------------

def modulate(x_BLD, shift_BGD, scale_BGD):
    """x * (1 + scale) + shift (DiT's adaLN), one (shift, scale) per group of L / G consecutive
    tokens: G = F, one per latent frame (tokens are frame-major), or G = L, one per token."""
    x_BGND = rearrange(x_BLD, 'b (g n) d -> b g n d', g=shift_BGD.shape[1])
    out_BGND = x_BGND * (1 + scale_BGD[:, :, None]) + shift_BGD[:, :, None]
    return rearrange(out_BGND, 'b g n d -> b (g n) d')


def gated_residual(x_BLD, y_BLD, gate_BGD):
    """x + gate * y: the residual branch y = f(x) times its gate, one gate per group of tokens as in
    modulate(), added to the fp32 residual stream (a bf16 y is promoted to fp32 by the product)."""
    x_BGND, y_BGND = (rearrange(a, 'b (g n) d -> b g n d', g=gate_BGD.shape[1]) for a in (x_BLD, y_BLD))
    return rearrange(x_BGND + gate_BGD[:, :, None] * y_BGND, 'b g n d -> b (g n) d')


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
        h_BLD = modulate(self.norm1(x_BLD), shift_sa, scale_sa)
        x_BLD = gated_residual(x_BLD, self.self_attn(h_BLD, rope=rope), gate_sa)
        x_BLD = x_BLD + self.cross_attn(self.norm3(x_BLD), context_BSD)   # a bf16 output adds in fp32
        h_BLD = modulate(self.norm2(x_BLD), shift_ff, scale_ff)
        return gated_residual(x_BLD, self.ffn(h_BLD), gate_ff)


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


# --- State conditioning (paper 2.1): AdaLN-Zero from the robot states -----------------------------

class StateEmbedder(nn.Module):
    """Robot states -> per-latent-frame AdaLN-Zero modulation (paper 2.1, Fig. 2).

    states [B, T, 25] (T = 4(F-1)+1 after the 4x frame downsampling, 21 for the challenge)
      -> raw continuous dims + sin/cos(2^k x), k < state_freqs, with the hand closures appended
      -> MLP to r_dim -> two Conv1d (kernel 3, stride 2, pad 1) that take T = 4k+1 to 2k+1 to
         k+1 = F, the VAE's latent length; latent frame j sees states 4j-3 .. 4j+3 (all states,
         past and future, are given in the challenge)
      -> Linear, SiLU, Linear to 6 x dim, the last layer zero-initialised so the model starts
         exactly as the base model (DiT's adaLN-Zero).
    A learned no-state embedding replaces the compressed features of dropped samples (CFG); only a
    model built with null_state has it (one trained with state dropout).

    state_embedder 'team': the modules of the team's own code (datacrunch-research/torchtitan,
    torchtitan/experiments/wan/model/model.py at a48283a, WanModel1x_ lines 437-518, the robot_modulation
    of layers.py 586-677, as train_1x.py sets them up): sin/cos at frequency 1 only; SiLU then
    GroupNorm(8) after each stride-2 convolution; Linear(r, dim) SiLU Linear(dim, dim) SiLU
    Linear(dim, 6 dim) with PyTorch's default init (not zero: the model does not start as the base);
    and a trainable per-block table (6, dim), zero at init, added to the states' modulation in every
    block (their default "additive" mode). 67.9M parameters at full size against 5.3M.
    """

    def __init__(self, cfg):
        super().__init__()
        r = cfg.r_dim
        self.cont_dims = [i for i in range(cfg.state_dim) if i not in STATE_HAND_DIMS]
        self.hand_dims = [i for i in STATE_HAND_DIMS if i < cfg.state_dim]
        if cfg.state_embedder not in ('paper', 'team'):
            raise ValueError(f"state_embedder={cfg.state_embedder!r}: 'paper' or 'team'")
        team = cfg.state_embedder == 'team'
        n_freqs = 1 if team else cfg.state_freqs
        self.register_buffer('freqs', 2.0 ** torch.arange(n_freqs), persistent=False)
        n_feat = len(self.cont_dims) * (1 + 2 * n_freqs) + len(self.hand_dims)
        self.mlp_in = nn.Sequential(nn.Linear(n_feat, r), nn.SiLU(), nn.Linear(r, r))
        conv = lambda: nn.Conv1d(r, r, 3, stride=2, padding=1)
        self.conv = nn.Sequential(conv(), nn.SiLU(), nn.GroupNorm(8, r), conv(), nn.SiLU(), nn.GroupNorm(8, r)) \
            if team else nn.Sequential(conv(), nn.SiLU(), conv())
        self.null = nn.Parameter(torch.randn(r) * 0.02) if cfg.null_state else None
        if team:
            d = cfg.dim
            self.mlp_out = nn.Sequential(nn.Linear(r, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 6 * d))
            self.block_tables = nn.Parameter(torch.zeros(cfg.num_layers, 6, d))
        else:
            self.mlp_out = nn.Sequential(nn.Linear(r, r), nn.SiLU(), nn.Linear(r, 6 * cfg.dim))
            nn.init.zeros_(self.mlp_out[2].weight)
            nn.init.zeros_(self.mlp_out[2].bias)
            self.block_tables = None

    def forward(self, states_BTD, drop_B, batch, num_frames):
        if self.null is None and (states_BTD is None or drop_B is not None):
            raise ValueError("this model has no no-state embedding (null_state=False: a run trained without state "
                             "dropout): give it the states, and drop_states=None")
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
            if r_BFR.shape[1] != num_frames:
                raise ValueError(
                    f"states have {states_BTD.shape[1]} time steps, which compress to {r_BFR.shape[1]} latent "
                    f"frames, but the latents have {num_frames}: give 4 * (F - 1) + 1 = {4 * (num_frames - 1) + 1} "
                    f"state rows (the states after the 4x frame downsampling)")
            if drop_B is not None:
                r_BFR = torch.where(drop_B.to(r_BFR.device).view(-1, 1, 1), self.null.float(), r_BFR)
        return rearrange(self.mlp_out(r_BFR), 'b f (six d) -> b f six d', six=6)


# --- The DiT --------------------------------------------------------------------------------------

def frame_timesteps(mask_BF, t_B):
    """[B, F] frame mask (0 = context frame, 1 = generated) x [B] timesteps -> [B, F] per frame.

    This is how TI2V holds its first frame fixed (Wan 2.2 TI2V: timestep 0 on its tokens); the paper
    holds several frames. The DiT takes it as it is (one modulation per latent frame); the reference
    (and diffusers) pass the same timesteps one per token, .repeat_interleave(tokens_per_frame, dim=1).
    """
    if mask_BF.ndim != 2 or t_B.shape != mask_BF.shape[:1]:
        raise ValueError(f"mask must be [B, F] and t [B], got {tuple(mask_BF.shape)} and {tuple(t_B.shape)}")
    return mask_BF.float() * t_B.float()[:, None]


class WanDiT(nn.Module):
    """The Wan 2.2 DiT with the state embedder (state_cond=False: the base model). forward(x [B,
    in_dim, F, H, W] latents, t [B], [B, F] or [B, L] timesteps in 0 .. 1000, context [B or 1, <=
    text_len, text_dim], states [B, 4(F-1)+1, state_dim] or None: the no-state embedding,
    drop_states_B [B] bool: samples given the no-state embedding, for CFG) -> the predicted
    velocity, x's shape."""

    def __init__(self, cfg: WanConfig, state_cond: bool = True):
        super().__init__()
        self.cfg = cfg
        if cfg.dim % cfg.num_heads or cfg.head_dim < 6 or cfg.head_dim % 2:
            raise ValueError(f"dim={cfg.dim} must be num_heads={cfg.num_heads} x an even head size >= 6 (RoPE rotates "
                             f"pairs of it, at least one pair per axis: frames, height, width)")
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
        # the reference's init_weights (the state embedder keeps its own init: StateEmbedder)
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
        (f, h, w), t_BG = self._check_inputs(x_BCFHW, t, context_BLD, states_BTD, drop_states_B)
        amp, fp32 = self._autocast(x_BCFHW.device.type)
        with amp:
            x_BLD = rearrange(self.patch_embedding(x_BCFHW), 'b d f h w -> b (f h w) d').float()
            if torch.is_grad_enabled() and not x_BLD.requires_grad:
                # a frozen patch embedding (LoRA): block 0's input would be the only one without
                # requires_grad, and a compiled block would compile a second graph just for it;
                # the gradient this adds is small: block 0's norm and q, k, v input gradients
                x_BLD.requires_grad_()
            with fp32:   # timestep embedding and modulation in fp32
                e_BGD = self.time_embedding(sinusoidal_embedding(t_BG, cfg.freq_dim))
                e0_BG6D = rearrange(self.time_projection(e_BGD), 'b g (six d) -> b g six d', six=6)
                if self.state_cond:   # paper 2.1, AdaLN-Zero: the states' modulation adds to the timestep's
                    s_BF6D = self.state_embedder(states_BTD, drop_states_B, x_BCFHW.shape[0], f)
                    e0_BG6D = e0_BG6D + s_BF6D.repeat_interleave(t_BG.shape[1] // f, dim=1)
            # the reference zero-pads the text context to text_len slots, then embeds all of them;
            # a context shared by the batch (the empty prompt) is embedded once, not B times
            context_BSD = self.text_embedding(F.pad(context_BLD, (0, 0, 0, cfg.text_len - context_BLD.shape[1])))
            rope = rope_cos_sin(f, h, w, cfg.head_dim, cfg.rope_theta, x_BCFHW.device)
            n_ckpt = self.checkpointed_blocks() if torch.is_grad_enabled() else 0
            tables = self.state_embedder.block_tables if self.state_cond else None   # 'team': per block
            for i, block in enumerate(self.blocks):   # the first n_ckpt recompute their activations in backward
                args = (x_BLD, e0_BG6D if tables is None else e0_BG6D + tables[i].float(), context_BSD, rope)
                x_BLD = checkpoint(block, *args, use_reentrant=False) if i < n_ckpt else block(*args)
            with fp32:   # the head's modulation is the timestep's alone (no state term)
                out_BLP = self.head(x_BLD, e_BGD)
        pt, ph, pw = cfg.patch_size
        return rearrange(out_BLP, 'b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)',
                         f=f, h=h, w=w, pt=pt, ph=ph, pw=pw)

    def _check_inputs(self, x, t, context, states, drop):
        """ValueError on inputs of the wrong shape; else the token grid (f, h, w) and the timesteps
        t_BG, one per modulation group: G = f (one timestep per latent frame) or G = L = f h w (one
        per token, as the reference). Every token of a frame has the same timestep and states, so
        per frame is the same maths with h * w times less modulation work and memory (measured by
        machinery/bench.py)."""
        cfg = self.cfg
        B, C, Fr, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        if C != cfg.in_dim or Fr % pt or H % ph or W % pw:
            raise ValueError(f"x must be [B, {cfg.in_dim}, F, H, W] with H, W divisible by {ph}, got {tuple(x.shape)}")
        f, h, w = Fr // pt, H // ph, W // pw
        t, L = torch.as_tensor(t, device=x.device), f * h * w
        if t.shape not in ((B,), (B, f), (B, L)):
            raise ValueError(f"t must be [B], [B, F] or [B, L] = [{B}], [{B}, {f}] or [{B}, {L}], got {tuple(t.shape)}")
        if (context.ndim != 3 or context.shape[0] not in (1, B) or context.shape[1] > cfg.text_len
                or context.shape[2] != cfg.text_dim):
            raise ValueError(f"context must be [B or 1, <= {cfg.text_len}, {cfg.text_dim}], got {tuple(context.shape)}")
        if not self.state_cond and (states is not None or drop is not None):
            raise ValueError("this WanDiT was built with state_cond=False; it takes no states")
        if states is not None and (states.ndim != 3 or states.shape[0] != B or states.shape[2] != cfg.state_dim):
            raise ValueError(f"states must be [B, 4 (F - 1) + 1, state_dim] = [{B}, {4 * (f - 1) + 1}, "
                             f"{cfg.state_dim}], got {tuple(states.shape)}")
        if drop is not None and tuple(drop.shape) != (B,):
            raise ValueError(f"drop_states must be [B] = [{B}] (one flag a sample), got {tuple(drop.shape)}")
        return (f, h, w), (t[:, None].expand(B, f) if t.ndim == 1 else t)

    def _autocast(self, device_type):
        """bf16 weights: bf16 autocast (amp), with fp32 islands (fp32) where the reference runs fp32."""
        wdtype = self.patch_embedding.weight.dtype
        amp = torch.autocast(device_type, dtype=wdtype) if wdtype in (torch.bfloat16, torch.float16) else nullcontext()
        return amp, torch.autocast(device_type, enabled=False)

    def checkpointed_blocks(self):
        """How many blocks (the first ones) recompute their activations in backward: all for
        gradient_checkpointing = True, none for False, n for an int n. Checkpointing only some
        blocks keeps the others' activations: faster when memory allows (same gradients)."""
        n = self.gradient_checkpointing
        if isinstance(n, bool):
            return len(self.blocks) if n else 0
        if not (isinstance(n, int) and 0 <= n <= len(self.blocks)):
            raise ValueError(f"gradient_checkpointing must be True, False or a block count in "
                             f"0..{len(self.blocks)}, got {n!r}")
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
        if not lora:
            raise ValueError("lora_step=True needs a model with LoRA adapters (add_lora)")
        return 2 * on_path + off_path + 3 * attn + lora

    def set_dtype(self, dtype):
        """Cast the weights to dtype (bf16 on GPU), keeping fp32 what the reference runs in fp32."""
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
        return self

    @classmethod
    def from_pretrained(cls, cfg, state_dict, state_cond=True, device='cpu'):
        """The DiT holding a checkpoint's weights (official key names, as machinery.wan_files.load_dit
        reads them from the Hub or a folder). Built on the meta device and the tensors assigned, so
        only one copy of the weights is ever in memory. The state embedder (in no Wan checkpoint) gets
        its own init: 'paper' is zero at its output, so the model starts as the base model (DiT's
        adaLN-Zero); 'team' is not, as in the team's code."""
        with torch.device('meta'):
            model = cls(cfg, state_cond=False)
        model.load_state_dict(state_dict, strict=True, assign=True)
        if state_cond:
            model.state_embedder = StateEmbedder(cfg).to(device)
        return model


def keeps_fp32(name):
    """Parameters the reference keeps in fp32 under bf16 weights (set_dtype, wan_files.load_dit)."""
    return (name.startswith(('time_embedding.', 'time_projection.', 'head.', 'state_embedder.'))
            or name.endswith('.modulation') or '.norm3.' in name or '.lora_' in name)


# --- LoRA (paper 2.2: rank 32 on the DiT), hand-rolled as in minLoRA / loralib --------------------

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

    addmm = False   # a speed lever, off until a GPU shows it pays (dev/gpu_check.sh times it beside the plain step)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        if self.addmm:   # the same sum, with B's product accumulated into y by the GEMM itself: no delta tensor
            return torch.addmm(y.flatten(0, -2), self.lora_A(x).flatten(0, -2), self.lora_B.weight.T.to(y.dtype),
                               alpha=self.scale).view_as(y)
        return y + self.lora_B(self.lora_A(x)) * self.scale

    def delta(self):
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def add_lora(model, rank=32, alpha=32, targets=LORA_TARGETS):
    """Wrap the target Linears of every block with LoRA; freeze all but LoRA and state params."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters")
    for block in model.blocks:
        for name in targets:
            parent_name, attr = name.rsplit('.', 1)
            parent = block.get_submodule(parent_name)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha))
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name))
    return model


@torch.no_grad()
def merge_lora(model):
    """W <- W + B A alpha / r, so inference runs at base speed (exact in fp32, rounded in bf16)."""
    for m in lora_modules(model):
        if m.merged:
            raise ValueError("LoRA is already merged")
        m.weight += m.delta().to(m.weight.dtype)
        m.merged = True


@torch.no_grad()
def unmerge_lora(model):
    """W <- W - B A alpha / r: the base again, exactly in fp32; in bf16 both roundings stay in W (up
    to 1e-3 per weight), so to train on, reload the base rather than unmerge."""
    for m in lora_modules(model):
        if not m.merged:
            raise ValueError("LoRA is not merged")
        m.weight -= m.delta().to(m.weight.dtype)
        m.merged = False


def remove_lora(model):
    """The adapters dropped: each LoRALinear back to the plain Linear whose W and b it shares (a merged
    update stays in W)."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        parent, attr = name.rsplit('.', 1)
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device='meta')
        plain.weight, plain.bias = m.weight, m.bias
        setattr(model.get_submodule(parent), attr, plain)
    return model


def is_trainable(name):
    return '.lora_A.' in name or '.lora_B.' in name or name.startswith('state_embedder.')


def trainable_state_dict(model):
    """The LoRA adapters and the state-conditioning weights: what fine-tuning trains and saves."""
    return {k: v for k, v in model.state_dict().items() if is_trainable(k)}


# --- Size: parameter counts on the meta device (speed: machinery/bench.py) ------------------------

def parameter_counts(cfg=None, lora_rank=32):
    """Base / state-conditioning / LoRA parameter counts, built on the meta device (no memory)."""
    with torch.device('meta'):
        model = WanDiT(cfg or WanConfig(), state_cond=True)
        add_lora(model, rank=lora_rank, alpha=lora_rank)
    count = {'base': 0, 'state': 0, 'lora': 0}
    for name, p in model.named_parameters():
        count['lora' if '.lora_' in name else 'state' if name.startswith('state_embedder.') else 'base'] += p.numel()
    return count


def main():
    c = parameter_counts()
    print(f"Wan 2.2 TI2V-5B DiT: {c['base']:,} base + {c['state']:,} state conditioning + "
          f"{c['lora']:,} LoRA (rank 32) = {sum(c.values()):,} parameters")


if __name__ == '__main__':
    main()
