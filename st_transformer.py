"""The ST-Transformer world model of the compression track (paper section 3), in one file.

Given token grids z_0 .. z_{T-1} (each 32 x 32 Cosmos DV8x8x8 tokens) and the robot states of
the sample, it predicts every grid z_{t+1} from the grids up to z_t (teacher forcing in
training, greedy or sampled decoding in generate()). Read top to bottom:
  STConfig -> Attention (spatial, or causal temporal through causal_time_attention) -> MLP ->
  Block -> grid_frame_pool, StateEncoder ->
  STTransformer (forward, generate) -> the chunked training loss.
(The challenge's Top-500 cross-entropy, which scores it, is in metrics.py.)
Shape suffixes: B batch, T grids (time), H, W grid rows and columns, S = H * W token positions,
C channels, L state rows (frames), D state dims, V vocabulary, N tokens.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange


@dataclass
class STConfig:
    vocab_size: int = 64000     # Cosmos FSQ codebook (8*8*8*5*5*5); the synthetic CPU run uses less
    n_layer: int = 24           # paper 3.1: 24 layers, 8 heads, d = 512, T = 5, dropout 0.1
    n_head: int = 8
    n_embd: int = 512
    T: int = 5                  # grids read at once: 0..4 in, 1..5 predicted
    H: int = 32
    W: int = 32
    dropout: float = 0.1
    state_dim: int = 25
    state_window: int = 64      # state rows per sample (paper: s_{0:63}), see StateEncoder
    use_states: bool = True     # False: the state-blind ablation


class Attention(nn.Module):
    """Multi-head self-attention with QK-norm (paper 3.1) on x_BTSC, either spatial (over the S
    tokens of each grid) or causal temporal (over the T grids at each token position).

    Dropout (paper 3.1: 0.1 "on all attention, MLPs, and residual connections") acts on the
    attention's output, the MLP's output and the embeddings, not on the attention probabilities:
    1xgpt's GENIE (genie/attention.py, the ST-transformer the challenge's baseline and the paper
    follow) builds an `attn_drop` but never applies it, as its xformers kernel takes no dropout.
    So spatial attention may run on any SDPA kernel (cuDNN and the math path included)."""

    def __init__(self, cfg, causal):
        super().__init__()
        if cfg.n_embd % cfg.n_head != 0:
            raise ValueError(f"n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}")
        self.n_head, self.causal = cfg.n_head, causal
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        # QK-norm (paper 3.1, for stability): LayerNorm of queries and keys per head, on top of the
        # block's pre-LayerNorm (1xgpt drops the pre-LN when QK-norm is on; the paper keeps both)
        head_dim = cfg.n_embd // cfg.n_head
        self.q_norm, self.k_norm = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTSC, kv_cache=None):
        """kv_cache (temporal attention in generate only): a dict that keeps the keys and values of
        the grids seen so far, which the new grids of x_BTSC attend to as well (see generate)."""
        q, k, v = self.qkv(x_BTSC).unflatten(-1, (3, self.n_head, -1)).unbind(-3)   # each (B, T, S, heads, c)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.causal:
            y = causal_time_attention(q, k, v, kv_cache)
        else:   # SDPA over the tokens of each grid: (B T) heads S c, views of the (B, T, S, heads, c) layout
            q, k, v = (rearrange(a, 'b t s h c -> (b t) h s c') for a in (q, k, v))
            y = rearrange(F.scaled_dot_product_attention(q, k, v), '(b t) h s c -> b t s h c', b=x_BTSC.shape[0])
        return self.resid_drop(self.proj(y.flatten(-2)))


def causal_time_attention(q_BTSHc, k_BTSHc, v_BTSHc, kv_cache=None):
    """Causal softmax attention over the T axis (T = 5: 3 context grids and the predicted ones),
    written out in the layout the block holds, (B, T, S, heads, c): the T x T scores of each token
    position and head are c-wide dot products, a few elementwise kernels (fused by torch.compile),
    where SDPA would run B x S x heads problems of 5 tokens and need the time axis moved next to
    the channels. The same maths as softmax(q k^T / sqrt(c) + causal mask) v.

    kv_cache (generate): a dict. Empty: this call's keys and values are stored. Filled: the new
    grids (after the cached ones in time) attend to the cached keys and their own, causally; the
    new keys and values are appended."""
    if kv_cache is not None:
        if kv_cache:
            k_BTSHc, v_BTSHc = torch.cat([kv_cache['k'], k_BTSHc], dim=1), torch.cat([kv_cache['v'], v_BTSHc], dim=1)
        kv_cache['k'], kv_cache['v'] = k_BTSHc, v_BTSHc
    T, U = q_BTSHc.shape[1], k_BTSHc.shape[1]   # queries are the last T of the U key positions
    scores_BTUSH = (q_BTSHc[:, :, None] * k_BTSHc[:, None]).sum(-1) * q_BTSHc.shape[-1] ** -0.5
    future_TU = torch.arange(U, device=q_BTSHc.device) > torch.arange(U - T, U, device=q_BTSHc.device)[:, None]
    scores_BTUSH = scores_BTUSH.masked_fill(future_TU[:, :, None, None], float('-inf'))
    p_BTUSH = scores_BTUSH.softmax(dim=2)
    return (p_BTUSH[..., None] * v_BTSHc[:, None]).sum(2)   # (B, T, S, heads, c)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc, self.proj = nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """One ST block (paper 3.1, Fig. 3a): pre-LN spatial attention over the H x W tokens of one
    grid, then pre-LN causal temporal attention over the T grids at one token position, then a
    pre-LN MLP. Spatial attention never mixes grids; temporal attention never looks ahead. The
    residual stream stays (B, T, S, C) throughout: each attention picks its axis itself."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_s, self.ln_t, self.ln_m = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.spatial, self.temporal = Attention(cfg, causal=False), Attention(cfg, causal=True)
        self.mlp = MLP(cfg)

    def forward(self, x_BTSC, kv_cache=None):
        x_BTSC = x_BTSC + self.spatial(self.ln_s(x_BTSC))
        x_BTSC = x_BTSC + self.temporal(self.ln_t(x_BTSC), kv_cache)
        return x_BTSC + self.mlp(self.ln_m(x_BTSC))


def grid_frame_pool(T, state_window):
    """(T, state_window) averaging matrix from state rows to input positions.

    The state window ends with the sample's 34 frames (data.TokenDataset): two 17-frame blocks,
    and Cosmos DV8x8x8 is causal in time, so grid 0 of a block encodes its frame 0, grid 1 frames
    1-8, grid 2 frames 9-16. Input position t predicts grid t+1, so it gets the mean state feature
    of the frames grid t+1 encodes: the motion that turns grid t into grid t+1 (as Genie adds the
    action a_t to frame t to predict frame t+1). With causal temporal attention, position t thus
    sees the states of all frames up to the end of grid t+1. So only the sample's own frames
    reach the output (frame 0 through the kernel-3 convolution at frame 1): the rows before the
    sample (30 of the paper's 64) are read but, with this pooling, change nothing.
    """
    pool_TL = torch.zeros(T, state_window)
    start = state_window - 34  # first row of the sample's frames in the window
    for t in range(T):
        g = t + 1
        first = 17 * (g // 3) + (0, 1, 9)[g % 3]
        end = 17 * (g // 3) + (1, 9, 17)[g % 3]
        pool_TL[t, start + first:start + end] = 1 / (end - first)
    return pool_TL


class StateEncoder(nn.Module):
    """Paper 3.1, state conditioning (after Genie): states (L x 25) -> MLP -> Conv1d (k=3, p=1)
    over time -> + absolute position embedding of each state row -> pooled to the T input
    positions (grid_frame_pool) -> added to the token embeddings of that time step."""

    def __init__(self, cfg):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cfg.state_dim, cfg.n_embd), nn.GELU(), nn.Linear(cfg.n_embd, cfg.n_embd))
        self.conv = nn.Conv1d(cfg.n_embd, cfg.n_embd, kernel_size=3, padding=1)
        self.pos_emb_LC = nn.Parameter(torch.zeros(cfg.state_window, cfg.n_embd))
        self.register_buffer('pool_TL', grid_frame_pool(cfg.T, cfg.state_window), persistent=False)

    def forward(self, states_BLD, T):
        h_BLC = self.mlp(states_BLD)
        h_BLC = self.conv(h_BLC.transpose(1, 2)).transpose(1, 2) + self.pos_emb_LC
        return torch.einsum('tl,blc->btc', self.pool_TL[:T], h_BLC)


class STTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # learnable absolute position embeddings, spatial (32 x 32) and temporal (T) (paper 3.1)
        self.pos_emb_SC = nn.Parameter(torch.zeros(cfg.H * cfg.W, cfg.n_embd))
        self.pos_emb_TC = nn.Parameter(torch.zeros(cfg.T, cfg.n_embd))
        self.states = StateEncoder(cfg) if cfg.use_states else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # paper 3.2: tied input and output embeddings
        self.chunk_loss = _chunk_ce_sum  # the loss of one chunk of tokens (compile_blocks compiles it)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # paper 3.2: weights (embeddings included) N(0, 0.02), linear biases zero
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, 'bias', None) is not None:
                nn.init.zeros_(m.bias)
        for name, p in m.named_parameters(recurse=False):
            if name.startswith('pos_emb'):
                nn.init.normal_(p, std=0.02)

    def forward(self, z_BTHW, states_BLD=None, predict_from=0, targets_BTHW=None, loss_chunk=4096):
        """Logits (B, T - predict_from, H, W, V) for grids predict_from+1 .. T from grids 0 .. T-1;
        with targets_BTHW (the true grids predict_from+1 .. T), the mean cross-entropy instead.

        Only the positions that are scored get the output head: training scores the future
        grids 3, 4, 5 (paper 3.2), i.e. positions 2, 3, 4, and the 64k-way head is the largest
        cost of the model, so this is cheaper and exact. The loss holds the logits of loss_chunk
        tokens at a time (head_cross_entropy): at the paper's size the whole batch's would be 0.73 GiB
        in fp32 per sample (3 x 1024 tokens x 64,000)."""
        if targets_BTHW is None:
            return self.blocks_and_head(self.embed(z_BTHW, states_BLD), predict_from)
        h_BTSC = self.hidden(self.embed(z_BTHW, states_BLD), predict_from)
        if targets_BTHW.shape != h_BTSC.shape[:2] + (self.cfg.H, self.cfg.W):
            raise ValueError(f"targets must be the {h_BTSC.shape[1]} predicted grids, got {tuple(targets_BTHW.shape)}")
        return head_cross_entropy(h_BTSC.flatten(0, 2), self.head.weight, targets_BTHW.reshape(-1), loss_chunk,
                                  self.chunk_loss)

    def embed(self, z_BTHW, states_BLD=None, t0=0):
        """Input embeddings (B, T, S, C) of the grids at time positions t0 .. t0 + T - 1: token +
        spatial + temporal position embeddings (+ the state features of those positions)."""
        B, T, H, W = z_BTHW.shape
        cfg = self.cfg
        if (H, W) != (cfg.H, cfg.W):
            raise ValueError(f"token grids must be {cfg.H} x {cfg.W}, got {H} x {W}")
        if not (1 <= t0 + T <= cfg.T):
            raise ValueError(f"the model reads at most T={cfg.T} grids, got {t0 + T}")
        x_BTSC = self.tok_emb(rearrange(z_BTHW, 'b t h w -> b t (h w)'))
        x_BTSC = x_BTSC + self.pos_emb_SC + self.pos_emb_TC[t0:t0 + T, None]
        if self.states is not None:
            if not (states_BLD is not None and states_BLD.shape[1:] == (cfg.state_window, cfg.state_dim)):
                got = None if states_BLD is None else tuple(states_BLD.shape)
                raise ValueError(f"states must be (B, {cfg.state_window}, {cfg.state_dim}), got {got}")
            x_BTSC = x_BTSC + self.states(states_BLD, t0 + T)[:, t0:, None]
        return self.drop(x_BTSC)

    def hidden(self, x_BTSC, predict_from=0, kv_caches=None):
        """The ST blocks, then the final LayerNorm of the positions from predict_from on. kv_caches:
        one dict per block for the temporal KV cache of generate()."""
        for i, block in enumerate(self.blocks):
            x_BTSC = block(x_BTSC, None if kv_caches is None else kv_caches[i])
        return self.ln_f(x_BTSC[:, predict_from:])

    def blocks_and_head(self, x_BTSC, predict_from=0, kv_caches=None):
        """Logits (B, T', H, W, V) of the positions from predict_from on."""
        h_BTSC = self.hidden(x_BTSC, predict_from, kv_caches)
        return rearrange(self.head(h_BTSC), 'b t (h w) v -> b t h w v', h=self.cfg.H)

    @torch.no_grad()
    def generate(self, z_BTHW, states_BLD=None, num_grids=3, temperature=0.0, top_k=None, use_cache=True):
        """Predict the next num_grids grids after the context, one grid at a time: the 1024 tokens
        of a grid are predicted in parallel given the grids before it (paper 3.3). temperature 0
        is greedy decoding (the paper's choice); otherwise sample from the top_k logits at that
        temperature. Computed in fp32 (paper 3.2: inference in bf16 degraded).
        Returns the grids (B, num_grids, H, W) and their logits (B, num_grids, H, W, V).

        use_cache: a temporal KV cache. Spatial attention stays within a grid and temporal
        attention is causal, so a grid's activations never depend on later grids: each block keeps
        the temporal keys and values of the grids seen so far, and each step after the first runs
        only the newest grid through the blocks (its spatial attention over itself, its temporal
        attention over the cache). Same maths as rerunning the whole sequence, about 3 grids of
        work less for 3 new grids (test_all.py checks the greedy tokens are equal). Dropout is off."""
        if z_BTHW.shape[1] + num_grids - 1 > self.cfg.T:
            raise ValueError(f"{z_BTHW.shape[1]} context + {num_grids} new grids need "
                             f"T >= {z_BTHW.shape[1] + num_grids - 1}")
        was_training = self.training
        self.eval()
        kv_caches = [{} for _ in self.blocks] if use_cache else None
        grids, all_logits = z_BTHW, []
        with torch.autocast(z_BTHW.device.type, enabled=False):
            for i in range(num_grids):
                if use_cache:   # the context grids at once, then only the newest grid
                    t0 = 0 if i == 0 else grids.shape[1] - 1
                    x_BTSC = self.embed(grids[:, t0:], states_BLD, t0)
                    logits_BHWV = self.blocks_and_head(x_BTSC, x_BTSC.shape[1] - 1, kv_caches)[:, 0].float()
                else:
                    logits_BHWV = self.forward(grids, states_BLD, predict_from=grids.shape[1] - 1)[:, 0].float()
                if temperature == 0.0:
                    next_BHW = logits_BHWV.argmax(-1)
                else:
                    scaled = logits_BHWV / temperature
                    if top_k is not None:
                        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
                        scaled = scaled.masked_fill(scaled < kth, float('-inf'))
                    probs = F.softmax(scaled, dim=-1)
                    next_BHW = torch.multinomial(probs.flatten(0, -2), 1).view(probs.shape[:-1])
                grids = torch.cat([grids, next_BHW[:, None]], dim=1)
                all_logits.append(logits_BHWV)
        self.train(was_training)
        return grids[:, z_BTHW.shape[1]:], torch.stack(all_logits, dim=1)

    def param_groups(self, weight_decay):
        """Paper 3.2: weight decay on parameter matrices only; biases, norm gains and position
        embeddings are not decayed. (The tied embedding/head matrix is a matrix: decayed.)"""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            is_pos = name.split('.')[-1].startswith('pos_emb')
            (decay if p.dim() >= 2 and not is_pos else no_decay).append(p)
        return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]

    def compile_blocks(self, **compile_kwargs):
        """torch.compile each block in place (nn.Module.compile: parameter names and state_dict keys
        stay as they are) and the loss of one chunk of tokens. Regional compilation: the blocks are
        all the same code, so one compiled graph serves all of them; the embeddings, the state
        encoder and generate's loop stay eager."""
        # one block meets many shapes in a run: training, evaluation, generate's grids with and
        # without the KV cache, a last batch of another size. Past dynamo's limit of compiled
        # versions (8 by default) it would quietly run the block eager from then on.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in self.blocks:
            block.compile(**compile_kwargs)
        self.chunk_loss = torch.compile(_chunk_ce_sum, **compile_kwargs)
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() counts the tied matrix once

    def flops_per_sample(self, predict_grids=3):
        """Forward + backward FLOPs of one training sample (6 N per token for the matmuls, as in
        the PaLM appendix, plus attention scores and the head on the scored grids only)."""
        cfg = self.cfg
        S, C, T = cfg.H * cfg.W, cfg.n_embd, cfg.T
        n_block = sum(p.numel() for p in self.blocks.parameters())
        attn = cfg.n_layer * 2 * 2 * C * (S + T)  # QK^T and AV per token: spatial over S, temporal over T
        return 3 * (2 * n_block * T * S + attn * T * S + 2 * C * cfg.vocab_size * predict_grids * S)


def _chunk_ce_sum(h_NC, weight_VC, target_N):
    return F.cross_entropy(F.linear(h_NC, weight_VC).float(), target_N, reduction='sum')


def head_cross_entropy(h_NC, weight_VC, target_N, chunk=4096, chunk_loss=_chunk_ce_sum):
    """Mean cross-entropy of the logits h_NC @ weight_VC^T (fp32 log-softmax) against target_N, in equal
    chunks of at most `chunk` tokens (the fewest, or up to twice as many, that divide N: 8 x 3840 at batch
    10, so the compiled chunk_loss meets one shape), each checkpointed: its logits are made, reduced to a
    sum, freed, and made again in the backward. So one chunk's fp32 logits exist at a time (1 GiB at 4096 x
    64000), not the micro-batch's (7.3 GiB at batch 10), for a head matmul more. chunk=0: all at once, not
    recomputed (compiled, chunk_loss keeps only the bf16 logits). Equal to F.cross_entropy (test_all.py)."""
    N = len(target_N)
    if chunk == 0:
        return chunk_loss(h_NC, weight_VC, target_N) / N
    n = -(-N // chunk)   # the fewest chunks
    size = -(-N // next((k for k in range(n, 2 * n + 1) if N % k == 0), n))
    total = h_NC.new_zeros((), dtype=torch.float32)
    for i in range(0, N, size):
        total = total + torch.utils.checkpoint.checkpoint(chunk_loss, h_NC[i:i + size], weight_VC,
                                                          target_N[i:i + size], use_reentrant=False)
    return total / N
