"""nanoWM's tests: a specification of each file of the repository. CPU only, tiny configs.

One section per file, each test one behaviour with the numbers that matter, in the order of the files:
the compression track (st_transformer.py, metrics.py, data.py, train_compression.py), the sampling
track (wan_state.py, flow_matching.py, train_sampling.py, sample.py), configurator.py, then machinery/
one module at a time. Tests that start a process (a script, torchrun) or train or compile for more than
a few seconds are marked `slow` (pytest.ini):

    python -m pytest -q test_all.py                  # everything, as CI runs it (.ci/run)
    python -m pytest -q -m "not slow" test_all.py    # the fast specification: under a minute on 2 cores
"""

from pathlib import Path
import csv
import errno
import importlib.util
import inspect
import json
import math
import os
import pickle
import re
import resource
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.request
import warnings

import numpy as np
from PIL import Image
import pytest
from safetensors.torch import load_file
import torch
import torch._functorch.config
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import configurator
import data
import machinery
import wan_state
from machinery import (checkpoints, hub, image_scores, latents, own_clips, pictures, prepare, run_dir, synthetic_tokens,
                       synthetic_video, tokenized, trackers)
from flow_matching import (diffsynth_weight, flow_matching_loss, predict_frame77, reference_sigmas, sample_draws,
                           sample_latents, shift_sigma)
from metrics import P_FLOOR, blur_baseline, cross_entropy_topk, match_histograms, psnr, ssim
from machinery.image_scores import (MetricUnavailable, fid_network, frechet_distance, inception_features, lpips_distance,
                                    lpips_network)
from machinery.lora_files import (export_lora, load_lora, load_trainable, lora_rank_alpha, read_lora, save_atomic,
                                  save_trainable, stack_loras)
from machinery.lora_files import main as lora_files_main
from machinery.speed import StepSpeed, peak_flops
from st_transformer import Block, STConfig, STTransformer, _chunk_ce_sum, head_cross_entropy
from machinery.vae import PixelCodec, WanVAE, frames_to_video
from machinery.hub import resolve
from machinery.wan_files import (build_model, load_dit, null_context, read_pth, run_settings, text_context,
                                 to_diffusers_state_dict)
from wan_state import (LORA_TARGETS, LoRALinear, WanConfig, WanDiT, add_lora, frame_timesteps, lora_modules, merge_lora,
                       parameter_counts, rope_cos_sin, trainable_state_dict, unmerge_lora)


REPO = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: they gain nothing from threads, and on a busy 2-core machine two
    OpenMP threads made them up to 50x slower. Scripts run in subprocesses keep their own setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize(model, std=0.1, seed=0):
    """Random values in every parameter (zero-initialised heads and gates would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def run_script(script, *args, cwd=REPO, nproc=0, fails=False):
    """Run a repo script the way a user does (under torchrun with nproc processes, one thread each).
    Return its stdout, or fail with its output; fails=True: it must fail, return its stderr."""
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] \
        if nproc else [sys.executable]
    # torchrun runs use gloo on the CPU even on a GPU machine: two processes on one GPU would ask for cuda:1
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='') if nproc else dict(os.environ)
    # a module of the package (machinery.bench) runs as `python -m` from anywhere, with the repository on the path
    target = [os.path.join(REPO, script)] if script.endswith('.py') else ['-m', script]
    env['PYTHONPATH'] = REPO
    cmd = [*launcher, *target, *args]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if fails:
        assert res.returncode != 0, f"{' '.join(cmd)} should have failed:\n{res.stdout[-3000:]}"
        return res.stderr
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


# ===============================================================================================
# st_transformer.py: the compression model (the ST block, KV-cache decoding, the chunked loss, FLOPs, compiled blocks)
# ===============================================================================================


ST_TINY = dict(vocab_size=1000, n_layer=1, n_head=2, n_embd=32, dropout=0.0)


def tiny_st_model(**kw):
    torch.manual_seed(0)
    return STTransformer(STConfig(**{**ST_TINY, **kw}))


def st_model(dropout=0.0):
    cfg = STConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, T=5, H=4, W=4, dropout=dropout, state_window=64)
    return randomize(STTransformer(cfg), std=0.3), cfg


def st_inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    z_BTHW = torch.randint(0, cfg.vocab_size, (3, 3, cfg.H, cfg.W), generator=g)
    return z_BTHW, torch.randn(3, cfg.state_window, cfg.state_dim, generator=g)


def counted_flops(fn):
    """FLOPs that torch counts for fn (math attention, so that the attention products are counted)."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope='module')
def synthetic_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('synthetic'))
    synthetic_tokens.write_synthetic(out, seed=0)
    return out


ST_CFG = STConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, H=4, W=4, dropout=0.0)


def sdpa_attention(attn, x_BNC, causal):
    """Attention over the second axis of x_BNC with F.scaled_dot_product_attention (the old path)."""
    q, k, v = rearrange(attn.qkv(x_BNC), 'b n (three h c) -> three b h n c', three=3, h=attn.n_head)
    y = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v, is_causal=causal)
    return attn.resid_drop(attn.proj(rearrange(y, 'b h n c -> b n (h c)')))


def sdpa_block(block, x_BTSC):
    """Block.forward with the residual in (B T) S C for spatial and (B S) T C for temporal attention."""
    B = x_BTSC.shape[0]
    x = rearrange(x_BTSC, 'b t s c -> (b t) s c')
    x = x + sdpa_attention(block.spatial, block.ln_s(x), causal=False)
    x = rearrange(x, '(b t) s c -> (b s) t c', b=B)
    x = x + sdpa_attention(block.temporal, block.ln_t(x), causal=True)
    x = x + block.mlp(block.ln_m(x))
    return rearrange(x, '(b s) t c -> b t s c', b=B)


def st_block(seed=0):
    torch.manual_seed(seed)
    return randomize(Block(ST_CFG), std=0.3, seed=seed)


def graph_breaks(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_break_count


def test_forward_gives_the_logits_of_the_grids_after_predict_from():
    model = tiny_st_model().eval()
    z = torch.randint(0, 1000, (2, 6, 32, 32))
    s = torch.randn(2, 64, 25)
    assert model(z[:, :5], s).shape == (2, 5, 32, 32, 1000)
    assert model(z[:, :5], s, predict_from=2).shape == (2, 3, 32, 32, 1000)


def test_greedy_decoding_takes_the_argmax_of_the_teacher_forced_logits_of_its_own_grids():
    model = tiny_st_model().eval()
    z = torch.randint(0, 1000, (2, 6, 32, 32))
    s = torch.randn(2, 64, 25)
    grids, logits = model.generate(z[:, :3], s, num_grids=3)
    assert grids.shape == (2, 3, 32, 32) and grids.dtype == torch.int64
    assert logits.shape == (2, 3, 32, 32, 1000) and logits.dtype == torch.float32
    # greedy decoding: each grid is the argmax of its logits, and its logits are the
    # teacher-forced logits of the sequence built from the earlier generated grids
    assert torch.equal(grids, logits.argmax(-1))
    tf = model(torch.cat([z[:, :3], grids[:, :2]], 1), s, predict_from=2)
    torch.testing.assert_close(tf, logits, rtol=1e-4, atol=1e-4)


def test_sampled_decoding_draws_the_grids_asked_for():
    model = tiny_st_model().eval()
    z = torch.randint(0, 1000, (2, 3, 32, 32))
    sampled, _ = model.generate(z, torch.randn(2, 64, 25), num_grids=2, temperature=1.0, top_k=5)
    assert sampled.shape == (2, 2, 32, 32) and sampled.min() >= 0 and sampled.max() < 1000


def test_a_token_attends_within_its_grid_or_to_earlier_grids():
    model = tiny_st_model(n_layer=2).eval()
    z = torch.randint(0, 1000, (1, 5, 32, 32))
    s = torch.randn(1, 64, 25)
    z2 = z.clone()
    z2[:, 3] = torch.randint(0, 1000, (32, 32))  # change grid 3 only
    out, out2 = model(z, s), model(z2, s)
    # positions 0..2 can see neither grid 3 through temporal attention (causal) nor through
    # spatial attention (it stays within one grid): bit-identical
    assert torch.equal(out[:, :3], out2[:, :3])
    assert not torch.allclose(out[:, 3:], out2[:, 3:])
    # one changed token at grid 3 spreads over all tokens of grid 3 (spatial attention) and on
    # to grid 4 at every position after two layers
    z3 = z.clone()
    z3[0, 3, 0, 0] = (z[0, 3, 0, 0] + 1) % 1000
    diff = (model(z3, s) - out).abs().amax(-1)[0]
    assert (diff[3] > 0).all() and (diff[4] > 0).all() and (diff[:3] == 0).all()


def test_position_t_reads_the_states_of_the_frames_grid_t_plus_1_encodes():
    model = tiny_st_model().eval()
    z, s = torch.randint(0, 1000, (1, 5, 32, 32)), torch.randn(1, 64, 25)
    out = model(z, s)
    # the sample's frames are rows 30-63; grid 2 of the first block encodes frames 9-16 (rows 39-46),
    # so a change there reaches position 1 (which predicts grid 2) and later ones, never position 0
    s2 = s.clone()
    s2[0, 42] += 1.0
    diff = (model(z, s2) - out).abs().amax((-1, -2, -3))[0]
    assert diff[0] == 0 and (diff[1:] > 0).all()
    # the 30 rows before the sample change nothing (the kernel-3 convolution reaches back to row 30
    # from row 31, grid 1's first frame, and no further)
    s3 = s.clone()
    s3[0, :30] = torch.randn(30, 25) * 100
    assert torch.equal(model(z, s3), out)


def test_output_head_is_tied_to_token_embedding():
    model = tiny_st_model()
    assert model.head.weight is model.tok_emb.weight
    untied = sum(p.numel() for p in model.parameters()) + model.tok_emb.weight.numel()
    assert model.num_params() == untied - 1000 * 32


def test_init_follows_paper():
    model = tiny_st_model(n_embd=256)
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.002
    assert abs(model.pos_emb_SC.std().item() - 0.02) < 0.002


def test_weight_decay_groups_match_paper():
    with torch.device('meta'):
        model = STTransformer(STConfig())
    decay, no_decay = model.param_groups(0.05)
    assert decay['weight_decay'] == 0.05 and no_decay['weight_decay'] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay['params']}
    kept = {names[id(p)] for p in no_decay['params']}
    assert 'tok_emb.weight' in decayed and 'states.conv.weight' in decayed
    assert 'blocks.0.spatial.qkv.weight' in decayed and 'blocks.23.mlp.proj.weight' in decayed
    # biases, LayerNorm gains (block, final, QK-norm) and all position embeddings are not decayed
    assert {'pos_emb_SC', 'pos_emb_TC', 'states.pos_emb_LC', 'ln_f.weight', 'blocks.0.spatial.q_norm.weight',
            'blocks.0.ln_s.weight', 'blocks.0.mlp.fc.bias'} <= kept
    assert all(n.endswith('.weight') and 'ln' not in n and 'norm' not in n for n in decayed)
    assert all(n.endswith('.bias') or 'ln' in n or 'norm' in n or 'pos_emb' in n for n in kept)
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_chunked_loss_equals_cross_entropy_on_the_full_logits():
    model = randomize(tiny_st_model(), std=0.05)
    z, s = torch.randint(0, 1000, (2, 6, 32, 32)), torch.randn(2, 64, 25)
    full = F.cross_entropy(model(z[:, :5], s, predict_from=2).flatten(0, -2), z[:, 3:].reshape(-1))
    grads = torch.autograd.grad(full, list(model.parameters()))
    chunked = model(z[:, :5], s, predict_from=2, targets_BTHW=z[:, 3:], loss_chunk=1000)   # 8 chunks of 768
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    for g_full, g_chunk in zip(grads, torch.autograd.grad(chunked, list(model.parameters()))):
        torch.testing.assert_close(g_chunk, g_full, rtol=1e-4, atol=1e-7)


def test_greedy_decoding_with_kv_cache_equals_without_token_for_token():
    model, cfg = st_model()
    z_BTHW, states_BLD = st_inputs(cfg)
    grids_c, logits_c = model.generate(z_BTHW, states_BLD, num_grids=3, use_cache=True)
    grids_u, logits_u = model.generate(z_BTHW, states_BLD, num_grids=3, use_cache=False)
    assert grids_c.shape == (3, 3, cfg.H, cfg.W)
    assert torch.equal(grids_c, grids_u)
    assert torch.allclose(logits_c, logits_u, atol=1e-5, rtol=1e-5)
    # and both are what the model predicts teacher-forced on its own output
    full = torch.cat([z_BTHW, grids_c[:, :2]], dim=1)
    assert torch.allclose(model(full, states_BLD, predict_from=2), logits_c, atol=1e-5, rtol=1e-5)


def test_sampled_decoding_with_kv_cache_equals_without_for_the_same_seed():
    model, cfg = st_model()
    z_BTHW, states_BLD = st_inputs(cfg, seed=2)
    torch.manual_seed(5)
    grids_c, _ = model.generate(z_BTHW, states_BLD, num_grids=3, temperature=1.0, top_k=10, use_cache=True)
    torch.manual_seed(5)
    grids_u, _ = model.generate(z_BTHW, states_BLD, num_grids=3, temperature=1.0, top_k=10, use_cache=False)
    assert torch.equal(grids_c, grids_u)


def test_kv_cache_runs_only_the_new_grid_through_the_blocks():
    model, cfg = st_model()
    z_BTHW, states_BLD = st_inputs(cfg)
    grids_seen = []
    hook = model.blocks[0].register_forward_hook(lambda mod, args, out: grids_seen.append(args[0].shape[1]))
    model.generate(z_BTHW, states_BLD, num_grids=3, use_cache=True)
    cached, grids_seen[:] = list(grids_seen), []
    model.generate(z_BTHW, states_BLD, num_grids=3, use_cache=False)
    hook.remove()
    assert cached == [3, 1, 1]          # the 3 context grids, then one new grid per step
    assert grids_seen == [3, 4, 5]      # without the cache: the whole sequence every step


def test_generate_decodes_in_eval_mode_whatever_the_models_mode():
    model, cfg = st_model(dropout=0.5)
    z_BTHW, states_BLD = st_inputs(cfg)
    model.eval()
    want, _ = model.generate(z_BTHW, states_BLD, use_cache=False)
    model.train()
    for use_cache in (True, False):
        got, _ = model.generate(z_BTHW, states_BLD, use_cache=use_cache)
        assert torch.equal(got, want) and model.training


def test_st_transformer_training_flops_match_torch_flop_counter():
    cfg = STConfig(vocab_size=1024, n_layer=2, n_head=4, n_embd=64, H=8, W=8, dropout=0.0)
    model = STTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    z = torch.randint(0, cfg.vocab_size, (1, 6, 8, 8), generator=g)
    states = torch.randn(1, cfg.state_window, cfg.state_dim, generator=g)

    def train_step():
        logits = model(z[:, :5], states, predict_from=2)
        F.cross_entropy(logits.flatten(0, -2), z[:, 3:].reshape(-1)).backward()
    assert abs(model.flops_per_sample() / counted_flops(train_step) - 1) < 0.02


@pytest.mark.slow
def test_tiny_model_overfits_one_batch(synthetic_dir):
    ds = data.TokenDataset(os.path.join(synthetic_dir, 'train_v2.0'), vocab_size=1000)
    z, s = (torch.stack(x) for x in zip(ds[0], ds[1]))
    target = z[:, 3:].reshape(-1)
    bayes = F.cross_entropy(synthetic_tokens.synthetic_oracle_logits(z, s, ds.metadata['synthetic']).reshape(-1, 1000), target)
    model = tiny_st_model(n_embd=64, n_head=4)
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-2)
    losses = []
    for _ in range(45):
        loss = F.cross_entropy(model(z[:, :5], s, predict_from=2).flatten(0, -2), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # below the Bayes CE of these grids, which no predictor that generalises can beat: memorised
    assert losses[0] > 6.5 and losses[-1] < bayes.item() - 0.5, (losses[::10], bayes.item())


@pytest.mark.parametrize('train', [False, True])
def test_st_block_with_explicit_causal_time_attention_equals_the_sdpa_block(train):
    block = st_block().train(train)
    x = torch.randn(3, 5, 16, 32, requires_grad=True)
    got = block(x)
    grads_got = torch.autograd.grad(got.square().sum(), [x, *block.parameters()])
    want = sdpa_block(block, x)
    grads_want = torch.autograd.grad(want.square().sum(), [x, *block.parameters()])
    assert want.abs().max() > 1
    assert (got - want).abs().max() < 1e-5
    # fp32 rounding against the gradients' scale (some are 0 exactly: a key bias moves no softmax)
    scale = max(w.abs().max().item() for w in grads_want)
    assert scale > 1e3 and max((g - w).abs().max().item() for g, w in zip(grads_got, grads_want)) < 1e-6 * scale


def test_temporal_kv_cache_gives_the_sdpa_block_output_grid_by_grid():
    block = st_block(1).eval()
    x = torch.randn(2, 5, 16, 32)
    with torch.no_grad():
        want = sdpa_block(block, x)
        cache = {}
        got = [block(x[:, :3], cache)] + [block(x[:, t:t + 1], cache) for t in (3, 4)]
    assert cache['k'].shape == (2, 5, 16, 2, 16)   # (B, grids seen, S, heads, head_dim)
    assert (torch.cat(got, 1) - want).abs().max() < 1e-5


def test_causal_time_attention_looks_at_no_later_grid():
    block = st_block(2).eval()
    x = torch.randn(1, 5, 16, 32)
    x2 = x.clone()
    x2[:, 3] += 1.0
    with torch.no_grad():
        out, out2 = block.temporal(x), block.temporal(x2)
    assert torch.equal(out[:, :3], out2[:, :3]) and (out[:, 3:] - out2[:, 3:]).abs().min() > 0


@pytest.mark.parametrize('which', ['spatial', 'temporal'])
def test_dropout_acts_on_the_attention_output_not_on_the_attention_probabilities(which):
    # paper 3.1 with 1xgpt's genie/attention.py: attn_drop is built there but never applied
    torch.manual_seed(0)
    block = randomize(Block(STConfig(**{**ST_CFG.__dict__, 'dropout': 0.1})), std=0.3)
    attn = getattr(block, which)
    x = torch.randn(4, 5, 16, 32)
    with torch.no_grad():
        plain = attn.eval()(x)
        dropped = attn.train()(x)
    kept = dropped != 0
    assert 0.08 < 1 - kept.float().mean().item() < 0.12   # 10% of the output zeroed ...
    assert (dropped[kept] * 0.9 - plain[kept]).abs().max() < 1e-6   # ... the rest the eval output / 0.9


def test_st_block_in_training_has_no_graph_breaks():
    block = st_block().train()
    block.spatial.resid_drop.p = block.temporal.resid_drop.p = block.mlp.drop.p = 0.1
    assert graph_breaks(block, torch.randn(2, 5, 16, 32, requires_grad=True)) == 0


def test_chunked_loss_has_no_graph_breaks():
    h, w = torch.randn(40, 32, requires_grad=True), torch.randn(64, 32, requires_grad=True)
    from st_transformer import _chunk_ce_sum
    assert graph_breaks(_chunk_ce_sum, h, w, torch.randint(0, 64, (40,))) == 0


def test_compiled_st_blocks_serve_a_whole_run_without_falling_back_to_eager():
    # a run's shapes through one compiled block: training, evaluation and generate (with and without
    # the KV cache), then a last batch of another size; dynamo's default limit (8 versions) is hit
    torch._dynamo.reset()
    model = STTransformer(STConfig(**{**ST_CFG.__dict__, 'n_layer': 2, 'dropout': 0.1})).compile_blocks(backend='eager')
    z, s = torch.randint(0, 64, (3, 6, 4, 4)), torch.randn(3, 64, 25)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for b in (3, 2):
            model.train()
            model(z[:b, :5], s[:b], predict_from=2, targets_BTHW=z[:b, 3:], loss_chunk=20).backward()
            model.eval()
            with torch.no_grad():
                for use_cache in (True, False):
                    grids, _ = model.generate(z[:b, :3], s[:b], use_cache=use_cache)
                    assert grids.shape == (b, 3, 4, 4)


@pytest.mark.slow
def test_compiled_st_training_step_equals_eager():
    torch._dynamo.reset()
    model = randomize(STTransformer(STConfig(**{**ST_CFG.__dict__, 'n_layer': 2})), std=0.3)
    z, s = torch.randint(0, 64, (2, 6, 4, 4)), torch.randn(2, 64, 25)

    def loss_and_grads():
        loss = model(z[:, :5], s, predict_from=2, targets_BTHW=z[:, 3:], loss_chunk=20)   # 96 tokens: 6 chunks of 16
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    want, want_grads = loss_and_grads()
    model.compile_blocks(fullgraph=True)   # a graph break would raise
    got, got_grads = loss_and_grads()
    assert all(b._compiled_call_impl is not None for b in model.blocks)
    assert abs(got.item() - want.item()) < 1e-5
    assert max((g - w).abs().max().item() for g, w in zip(got_grads, want_grads)) < 1e-5


def chunk_sizes_and_loss(h_NC, w_VC, target_N, chunk):
    """The mean loss of head_cross_entropy and the token count of each chunk it computed."""
    sizes = []

    def recording_chunk_loss(h, w, t):
        sizes.append(len(t))
        return _chunk_ce_sum(h, w, t)

    return head_cross_entropy(h_NC, w_VC, target_N, chunk, recording_chunk_loss), sizes


def test_loss_chunks_are_equal_where_a_count_near_the_fewest_divides_the_tokens():
    h, w, t = torch.randn(30720, 4), torch.randn(16, 4), torch.randint(0, 16, (30720,))
    # micro-batch 10 of the paper preset: 3 x 1024 x 10 tokens, 8 chunks of 3,840 (not 7 x 4,096 + 2,048)
    assert chunk_sizes_and_loss(h, w, t, 4096)[1] == [3840] * 8
    assert set(chunk_sizes_and_loss(h[:9 * 3072], w, t[:9 * 3072], 4096)[1]) == {3456}   # batch 9: 8 of 3,456
    assert set(chunk_sizes_and_loss(h[:8 * 3072], w, t[:8 * 3072], 4096)[1]) == {4096}
    # a prime count has no equal split: the fewest chunks of at most 4,096, the last one shorter
    assert chunk_sizes_and_loss(h[:4099], w, t[:4099], 4096)[1] == [2050, 2049]


@pytest.mark.parametrize('N, chunk', [(6144, 4096), (4099, 4096), (96, 20), (96, 0)])
def test_equal_loss_chunks_give_the_plain_cross_entropy_and_its_gradients(N, chunk):
    # 6,144 tokens (2 samples) in 2 chunks of 3,072; a prime count in 2050 + 2049; 96 in 6 of 16;
    # chunk 0: the 96 at once, not recomputed
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    target = torch.randint(0, 50, (N,), generator=g)
    plain = F.cross_entropy(h @ w.T, target)
    want = torch.autograd.grad(plain, (h, w))
    chunked, sizes = chunk_sizes_and_loss(h, w, target, chunk)
    assert sizes == [N] if chunk == 0 else len(sizes) > 1 and max(sizes) <= chunk
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for got, ref in zip(torch.autograd.grad(chunked, (h, w)), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_loss_without_chunks_keeps_only_the_low_precision_logits_for_the_backward():
    # the lever loss_chunk=0 (no recomputation of the head): compiled, the fp32 upcast and the
    # log-softmax fuse into reductions, so of the tokens x vocabulary tensors only the bf16 logits
    # are saved for the backward (eager would keep the fp32 logits and log-probabilities as well)
    torch._dynamo.reset()
    N, C, V = 96, 32, 1000
    h, w = torch.randn(N, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    target = torch.randint(0, V, (N,))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autocast('cpu', dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = head_cross_entropy(h, w, target, 0, torch.compile(_chunk_ce_sum, dynamic=False))
    assert [d for shape, d in saved if shape == (N, V)] == [torch.bfloat16], saved
    with torch.autocast('cpu', dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(h, w).float(), target)
    torch.testing.assert_close(got, want)
    for g, ref in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        torch.testing.assert_close(g, ref, rtol=2e-2, atol=1e-3)   # bf16 matmuls, rounded in another order


def bench_rows(out):
    """{row name: its columns after the shape} of machinery.bench's table."""
    return {m[1]: m[2].split() for m in re.finditer(r'^(\w+) .*?\s((?:[\d.]+\s+){3}(?:n/a|[\d.]+%)\s+\S+)$', out, re.M)}


# ===============================================================================================
# metrics.py: the challenge's scores (Top-500 CE, PSNR, SSIM) and the blur baseline
# ===============================================================================================


def brute_force_topk_ce(logits_NV, target_N, k, p_floor):
    losses = []
    for row, t in zip(logits_NV.double().tolist(), target_N.tolist()):
        top = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        if t not in top:
            losses.append(-math.log(p_floor))
            continue
        z = sum(math.exp(row[i]) for i in top)
        losses.append(-(row[t] - math.log(z)))
    return torch.tensor(losses)


def test_top500_cross_entropy_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 1200, generator=g) * 3
    target = torch.randint(0, 1200, (40,), generator=g)
    target[:10] = logits[:10].argmax(-1)    # surely in the top 500
    target[10:20] = logits[10:20].argmin(-1)  # surely outside the top 500
    ours = cross_entropy_topk(logits, target, k=500)
    ref = brute_force_topk_ce(logits, target, 500, P_FLOOR)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[10:20], torch.full((10,), -math.log(P_FLOOR)))
    assert (ours[:10] < F.cross_entropy(logits[:10], target[:10], reduction='none')).all()
    # with k = V it is the plain cross-entropy
    torch.testing.assert_close(cross_entropy_topk(logits, target, k=1200), F.cross_entropy(logits, target, reduction='none'))


def test_top500_cross_entropy_of_tied_logits_is_the_expectation_over_which_are_kept():
    V, k, floor = 1000, 500, -math.log(P_FLOOR)
    # uniform logits: any 500 of the 1000 are kept, so every token scores the same, whatever its id
    target = torch.tensor([0, 10, 499, 500, 999])
    expected = k / V * math.log(k) + (1 - k / V) * floor
    torch.testing.assert_close(cross_entropy_topk(torch.zeros(5, V), target, k), torch.full((5,), expected))
    # one token above the rest: it is kept; 499 of the 999 tied others are
    logits = torch.zeros(2, V)
    logits[:, 7] = 3.0
    z = math.exp(3.0) + 499
    got = cross_entropy_topk(logits, torch.tensor([7, 900]), k)
    torch.testing.assert_close(got, torch.tensor([-(3.0 - math.log(z)), 499 / 999 * math.log(z) + 500 / 999 * floor]))
    # -inf logits (masked tokens) give finite scores, and with k = V still the plain cross-entropy
    masked = torch.full((2, V), float('-inf'))
    masked[:, :10] = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 9])
    torch.testing.assert_close(cross_entropy_topk(masked, t, k=V), F.cross_entropy(masked, t, reduction='none'))
    assert torch.isfinite(cross_entropy_topk(masked, t, k)).all()


def random_image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def normal_image(seed=1):
    return np.random.default_rng(seed).normal(120, 20, (32, 32, 3)).clip(0, 255).astype(np.uint8)


def test_psnr_is_minus_10_log10_of_the_mse_of_pixels_in_0_1():
    img = random_image()
    assert psnr(img, img) == 100.0   # the mse floor of 1e-10
    off = np.clip(img.astype(int) + 10, 0, 255).astype(np.uint8)
    assert psnr(off, img) == pytest.approx(10 * np.log10(1 / np.mean(((off.astype(float) - img) / 255) ** 2)))


def test_ssim_of_an_image_with_itself_is_1():
    assert ssim(random_image(), random_image()) == pytest.approx(1.0)


def test_histogram_matching_maps_the_values_monotonically_onto_the_references_histogram():
    img, ref = random_image(), normal_image()
    matched = match_histograms(img, ref)   # uniform values take the reference's normal histogram
    assert abs(matched.mean() - ref.mean()) < 1 and abs(matched.std() - ref.std()) < 1
    order = np.argsort(img[..., 0], axis=None)
    assert np.all(np.diff(matched[..., 0].ravel()[order].astype(int)) >= 0)   # a monotone map of the values


def test_the_blur_baseline_is_no_sharper_than_the_frame_it_matches():
    assert blur_baseline(random_image(), normal_image(), 1.0).std() <= normal_image().std() + 1


# ===============================================================================================
# data.py: the 1X layouts read as published, the batch order of both trainers
# ===============================================================================================


def write_known_shard(split_dir, i, nested, segment_F, vocab=1000, seed=0):
    rng = np.random.default_rng(seed)
    n = len(segment_F)
    tokens = rng.integers(0, vocab, size=(math.ceil(n / 17), 3, 32, 32)).astype(np.int32)
    states = rng.standard_normal((n, 25)).astype(np.float32)
    synthetic_tokens.write_shard(split_dir, i, tokens, states, np.asarray(segment_F, np.int32), nested)
    return tokens, states


def write_meta(split_dir, num_shards, frames):
    with open(os.path.join(split_dir, 'metadata.json'), 'w') as f:
        json.dump({'num_shards': num_shards, 'query': None, 'hz': 30, 'num_images': frames}, f)


SIZE = 32   # synthetic frames: 32x32 -> pixel-codec latents [48, 6, 8, 8], 16 tokens per latent frame


def test_the_micro_batches_of_all_ranks_cover_the_global_batch_once():
    for world_size, grad_accum in ((1, 4), (2, 2), (4, 1)):
        positions = [p for micro in range(grad_accum) for rank in range(world_size)
                     for p in data.batch_positions(micro, rank, world_size, batch_size=2)]
        assert sorted(positions) == list(range(8))


def test_batch_order_visits_every_row_once_an_epoch():
    n, global_batch_size = 10, 4
    rows = [r for step in range(5) for r in data.batch_rows(7, step, range(global_batch_size), global_batch_size, n)]
    assert sorted(rows[:10]) == sorted(rows[10:20]) == list(range(10)) and rows[:10] != rows[10:20]


def test_the_rows_of_a_step_are_a_function_of_seed_with_step():
    n, global_batch_size = 10, 4
    rows = [r for step in range(5) for r in data.batch_rows(7, step, range(global_batch_size), global_batch_size, n)]
    # a process that asks for positions 2, 3 of step 3 gets what a single process gets there
    assert data.batch_rows(7, 3, [2, 3], global_batch_size, n) == rows[14:16]
    assert data.batch_rows(8, 0, range(4), global_batch_size, n) != rows[:4]


@pytest.mark.parametrize('nested', [True, False], ids=['train-subfolders', 'val-flat'])
def test_token_reader_gives_the_written_windows_inside_one_segment(tmp_path, nested):
    # 10 blocks minus 5 frames (a partial last block); segments change at frames 40 and 100
    n = 165
    segment = np.repeat([7, 8, 9], [40, 60, 65])
    tokens, states = write_known_shard(str(tmp_path), 0, nested, segment)
    write_meta(str(tmp_path), 1, n)
    assert os.path.exists(tmp_path / ('videos/video_0.bin' if nested else 'video_0.bin'))
    ds = data.TokenDataset(str(tmp_path), vocab_size=1000)
    # brute force: block k starts a sample if frames 17k .. 17k+33 exist and share one id
    expect = [k for k in range(10) if 17 * k + 34 <= n and len(set(segment[17 * k:17 * k + 34])) == 1]
    assert [int(k) for _, k in ds.index] == expect == [0, 3, 6, 7]
    for j, k in enumerate(expect):
        z, s = ds[j]
        assert torch.equal(z, torch.from_numpy(tokens[k:k + 2].reshape(6, 32, 32)).long())
        last = 17 * k + 33
        assert torch.equal(s[-34:], torch.from_numpy(states[last - 33:last + 1]))
        # rows before the segment start (or frame 0) repeat the segment's first row
        seg_start = int(np.argmax(segment == segment[last]))
        rows = np.clip(np.arange(last - 63, last + 1), seg_start, None)
        assert torch.equal(s, torch.from_numpy(states[rows]))


def test_token_reader_errors_name_the_file_with_its_problem(tmp_path):
    segment = np.zeros(68, np.int32)
    write_known_shard(str(tmp_path), 0, True, segment)
    write_meta(str(tmp_path), 2, 136)
    with pytest.raises(FileNotFoundError, match=r'videos/video_1\.bin'):
        data.TokenDataset(str(tmp_path))
    assert len(data.TokenDataset(str(tmp_path), shards=[0], vocab_size=1000)) == 3
    with pytest.raises(ValueError, match=r'outside the vocabulary \[0, 500\)'):
        data.TokenDataset(str(tmp_path), shards=[0], vocab_size=500)[0]
    video = tmp_path / 'videos' / 'video_0.bin'
    video.write_bytes(video.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r'video_0\.bin.*truncated'):
        data.TokenDataset(str(tmp_path), shards=[0])
    write_known_shard(str(tmp_path), 0, True, segment)
    states = tmp_path / 'robot_states' / 'states_0.bin'
    states.write_bytes(np.zeros((68, 24), np.float32).tobytes())
    with pytest.raises(ValueError, match=r'states_0\.bin.*68 frames x 24 float32.*25 wide'):
        data.TokenDataset(str(tmp_path), shards=[0])
    with pytest.raises(FileNotFoundError, match='metadata.json'):
        data.TokenDataset(str(tmp_path / 'nowhere'))
    # shards that do not exist or come twice; metadata without its counts
    for shards in ([2], [0, 0]):
        with pytest.raises(ValueError, match=r'lists 2 shards, 0-1; name each at most once'):
            data.TokenDataset(str(tmp_path), shards=shards)
    (tmp_path / 'metadata' / 'metadata_0.json').write_text('{"shard_num_frames": "68"}')
    with pytest.raises(ValueError, match=r"metadata_0\.json has no count 'shard_num_frames' \(got '68'\)"):
        data.TokenDataset(str(tmp_path), shards=[0])
    (tmp_path / 'metadata.json').write_text('[]')
    with pytest.raises(ValueError, match=r"metadata\.json has no count 'num_shards' \(got None\)"):
        data.TokenDataset(str(tmp_path))


def test_paper_epoch_is_non_overlapping_samples_inside_segments(tmp_path):
    segment = np.repeat([0, 1, 2], [120, 200, 100])   # 420 frames: 25 blocks
    write_known_shard(str(tmp_path), 0, True, segment)
    write_meta(str(tmp_path), 1, len(segment))
    every = data.TokenDataset(str(tmp_path), vocab_size=1000)
    paper = data.TokenDataset(str(tmp_path), vocab_size=1000, stride=2)
    # brute force: samples of blocks (2j, 2j + 1) whose 34 frames share one segment id
    expect = [2 * j for j in range(25 // 2) if len(set(segment[34 * j:34 * j + 34])) == 1]
    assert [int(k) for _, k in paper.index] == expect == [0, 2, 4, 8, 10, 12, 14, 16, 20, 22]
    every_expect = [k for k in range(25) if 17 * k + 34 <= 420 and len(set(segment[17 * k:17 * k + 34])) == 1]
    assert len(every) == len(every_expect) == 19   # a sample at every block: about twice as many


def test_clip_frames_fit_wans_latents_with_frame_76_last():
    idx = data.clip_frame_indices()
    assert idx == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 76]
    assert idx[:data.NUM_CONTEXT_FRAMES] == [0, 4, 8, 12, 16] and max(idx[data.NUM_CONTEXT_FRAMES:]) == 76
    # Wan's causal VAE: latent 0 = clip frame 0, latent k = clip frames 4k-3 .. 4k
    frames_of_latent = [[0]] + [list(range(4 * k - 3, 4 * k + 1)) for k in range(1, data.NUM_LATENTS)]
    context = [idx[j] for k in range(data.NUM_CONTEXT_LATENTS) for j in frames_of_latent[k]]
    assert context == [0, 4, 8, 12, 16]                       # latents 0-1 hold exactly the given frames
    assert idx[frames_of_latent[-1][-1]] == data.TARGET_FRAME == 76   # the target is the last clip frame


def test_a_truncated_raw_states_file_is_named_as_truncated(tmp_path):
    synthetic_video.write_synthetic_raw(tmp_path / 'raw', num_shards=1, frames_per_shard=200, size=SIZE, seed=0, flat=True)
    with open(tmp_path / 'raw' / 'states_0.bin', 'r+b') as f:
        f.truncate(100)
    with pytest.raises(ValueError, match='states_0.bin.*truncated'):
        data.RawShard(tmp_path / 'raw', 0)


def test_a_folder_that_is_no_raw_split_is_named_by_its_missing_metadata(tmp_path):
    with pytest.raises(FileNotFoundError, match='metadata.json'):
        data.RawClips(tmp_path / 'nothing')


def test_a_video_shorter_than_its_metadata_fails_clearly(tmp_path):
    synthetic_video.write_synthetic_raw(tmp_path / 'raw', num_shards=1, frames_per_shard=200, size=SIZE, seed=0, flat=True)
    synthetic_video.write_synthetic_raw(tmp_path / 'short', num_shards=1, frames_per_shard=120, size=SIZE, seed=0, flat=True)
    os.replace(tmp_path / 'short' / 'video_0.mp4', tmp_path / 'raw' / 'video_0.mp4')   # 120 of the 200 frames
    meta = tmp_path / 'raw' / 'metadata_0.json'   # no sha256: the reader itself must find the missing frames
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != 'sha256'}))
    shard = data.RawShard(tmp_path / 'raw', 0)
    late = [s for s in shard.clip_starts(1) if s + data.RAW_CLIP_LEN > 120]
    assert late
    with pytest.raises(ValueError, match=r'video_0\.mp4: got \d+ frames .*shorter than its metadata'):
        shard.read_clip(late[0])
    with pytest.raises(ValueError, match=r'video_0\.mp4: the video ends before frame .*shorter than its metadata'):
        list(shard.iter_clips(late))


def test_a_token_outside_the_vocabulary_is_found_by_the_split_check(tmp_path, synthetic_dir):
    bad = tmp_path / 'data'
    shutil.copytree(synthetic_dir, bad)
    tokens = np.fromfile(bad / 'val_v2.0' / 'video_0.bin', np.int32)
    tokens[32 * 32 * 3 * 40 + 5] = 1000   # block 40
    tokens.tofile(bad / 'val_v2.0' / 'video_0.bin')
    ds = data.TokenDataset(str(bad / 'val_v2.0'), vocab_size=1000)
    with pytest.raises(ValueError, match=r'video_0.bin: block 40 holds token 1000, outside the vocabulary \[0, 1000\)'):
        ds.check_tokens(chunk=32 * 32 * 3 * 7)   # small chunks: the block number counts across them
    data.TokenDataset(os.path.join(synthetic_dir, 'val_v2.0'), vocab_size=1000).check_tokens()


def raw_split(root, frames=300, size=SIZE, seed=1, as_1x=False):
    """A flat (val-style) synthetic raw split of one shard; as_1x: without the sha256 our writers keep in the
    shard's metadata (the 1X files have none), so only the decoder can find damage."""
    synthetic_video.write_synthetic_raw(root, num_shards=1, frames_per_shard=frames, size=size, seed=seed, flat=True)
    if as_1x:
        meta = json.loads((root / 'metadata_0.json').read_text())
        (root / 'metadata_0.json').write_text(json.dumps({k: v for k, v in meta.items() if k != 'sha256'}))
    return root


def flip_bytes_of_frame(video, frame, n=8):
    """Invert n bytes in the middle of the coded bytes of `frame` (the packet of that timestamp)."""
    import av
    with av.open(str(video)) as container:
        packet = next(p for p in container.demux(video=0) if p.size and p.pts == frame * 512)   # time base 1/15360
    data_ = bytearray(video.read_bytes())
    for i in range(n):
        data_[packet.pos + packet.size // 2 + i] ^= 0xFF
    video.write_bytes(bytes(data_))


def test_bytes_flipped_in_a_frame_are_named_by_the_decoder_never_returned_as_pixels(tmp_path):
    split = raw_split(tmp_path / 'val', size=64, as_1x=True)
    truth = data.RawShard(split, 0).read_frames(0, 300)
    flip_bytes_of_frame(split / 'video_0.mp4', 150)
    shard = data.RawShard(split, 0)
    assert np.array_equal(shard.read_frames(0, 77), truth[:77])   # frames before the damage are whole
    with pytest.raises(ValueError, match=r'val/video_0\.mp4: frame 150 is damaged or lost: delete it and fetch it '
                                         r'again \(--download\); for a synthetic or own-clips split write the split'):
        shard.read_frames(100, 77)
    with pytest.raises(ValueError, match=r'video_0\.mp4: frame 150 is damaged or lost'):
        data.RawClips(split, stride=77).check()
    with pytest.raises(ValueError, match=r'video_0\.mp4: frame 150 is damaged or lost'):
        list(shard.iter_clips([90]))


def test_a_frame_lost_from_a_video_is_named(tmp_path):
    import av
    split = raw_split(tmp_path / 'val', as_1x=True)
    with av.open(str(split / 'video_0.mp4')) as src, av.open(str(split / 'cut.mp4'), 'w', format='mp4') as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(video=0):
            if packet.dts is not None and packet.pts != 100 * 512:   # all but frame 100, timestamps kept
                packet.stream = stream
                dst.mux(packet)
    os.replace(split / 'cut.mp4', split / 'video_0.mp4')
    with pytest.raises(ValueError, match=r'video_0\.mp4: frame 100 is damaged or lost'):
        data.RawShard(split, 0).read_frames(80, 77)


def test_any_change_to_a_video_nanowm_wrote_is_found_by_its_sha256_when_opened(tmp_path):
    # at 32 px the decoder misses about a third of such flips (their bits still parse); the hash misses none
    split = raw_split(tmp_path / 'val')
    assert len(json.loads((split / 'metadata_0.json').read_text())['sha256']) == 64
    video = bytearray((split / 'video_0.mp4').read_bytes())
    video[len(video) // 2] ^= 1   # one bit
    (split / 'video_0.mp4').write_bytes(bytes(video))
    with pytest.raises(ValueError, match=r"val/video_0\.mp4: not the bytes its metadata's sha256 names: delete it"):
        data.RawShard(split, 0)


def test_every_clip_of_a_video_with_open_gops_and_b_frames_reads_exactly(tmp_path):
    # mp4 seeks find keyframes by decode time: a clip starting at a B-frame shown before an open-GOP keyframe
    # (frames 29, 59, 89 here) lost its first frames ("shorter than its metadata") before the reader seeked
    # 16 frames early
    import av
    split = raw_split(tmp_path / 'val', frames=240, size=64, as_1x=True)
    frames = data.RawShard(split, 0).read_frames(0, 240)
    with av.open(str(split / 'video_0.mp4'), 'w') as container:
        stream = container.add_stream('libx264', rate=30)
        stream.width = stream.height = 64
        stream.pix_fmt, stream.options = 'yuv420p', {'crf': '23', 'x264-params': 'open-gop=1:keyint=30:bframes=3'}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
        container.mux(stream.encode())
    shard = data.RawShard(split, 0)
    truth = shard.read_frames(0, 240)
    for start in [k + d for k in (30, 60, 90, 120, 150) for d in (-3, -2, -1, 0, 1)]:   # around each keyframe
        assert np.array_equal(shard.read_frames(start, 77), truth[start:start + 77]), start
    for start, frames_THWC, _ in shard.iter_clips(list(range(20, 163, 11))):
        assert np.array_equal(frames_THWC, truth[start + np.array(data.clip_frame_indices())])


@pytest.mark.parametrize('what', ['latents', 'states'])
def test_a_nan_in_a_latents_file_is_named_with_its_clip(tmp_path, what):
    split = raw_split(tmp_path / 'raw', frames=200)
    latents.encode_raw_split(split, tmp_path / 'latents', PixelCodec(), stride=8)
    path = tmp_path / 'latents' / 'latents_0.safetensors'
    tensors = load_file(str(path))
    tensors[what][3].view(-1)[5] = float('inf' if what == 'states' else 'nan')
    from safetensors.torch import save_file
    save_file(tensors, str(path))
    clips = latents.LatentClips(tmp_path / 'latents')
    assert torch.isfinite(clips[2][0]).all()
    with pytest.raises(ValueError, match=rf'{path}: clip 3 holds NaN or inf \(a damaged file\): delete its folder'):
        clips[3]


# ===============================================================================================
# train_compression.py: the compression trainer, run as a user runs it
# ===============================================================================================


SMALL_RUN = ['--n_embd=32', '--n_head=2', '--eval_interval=1000', '--eval_samples=2', '--final_eval=False', '--num_workers=0',
             '--learning_rate=1e-3', '--warmup_iters=1']


def results_of(out_dir):
    with open(os.path.join(out_dir, 'results.json')) as f:
        return json.load(f)


LEARN_RUN = ['--max_iters=80', '--batch_size=4', '--global_batch_size=4', '--final_eval_samples=16',
             '--eval_interval=1000', '--eval_samples=2', '--num_workers=0']


COMPRESSION_RUN = ['--n_embd=32', '--n_head=2', '--eval_samples=2', '--eval_batch_size=2', '--final_eval=False',
                   '--num_workers=0', '--batch_size=2', '--global_batch_size=2']


def run_compression(*args, cwd, fails=False):
    return run_script('train_compression.py', *COMPRESSION_RUN, *args, cwd=cwd, fails=fails)


def all_finite(path):
    state = torch.load(path, weights_only=True)
    return all(torch.isfinite(t).all() for t in state['model'].values())


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('pwned')",)


def fake_hub(root, synthetic_dir, repo_id=data.HF_REPO_TOKENIZED, splits=('train_v2.0', 'val_v2.0')):
    """A Hugging Face cache holding a dataset repo, as huggingface_hub lays it out: the offline
    stand-in for the Hub (HF_HUB_OFFLINE=1 serves files from it)."""
    rev = 'a' * 40
    repo = root / f"datasets--{repo_id.replace('/', '--')}"
    for split in splits:
        shutil.copytree(os.path.join(synthetic_dir, split), repo / 'snapshots' / rev / split)
        meta = repo / 'snapshots' / rev / split / 'metadata.json'   # the Hub's keys only (no synthetic world)
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != 'synthetic'}))
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(rev)
    return dict(HF_HUB_CACHE=str(root), HF_HUB_OFFLINE='1')


def settings(**extra):
    """A script's globals as configure() sees them."""
    return dict(__file__=os.path.join(REPO, 'train_compression.py'), preset='cpu', batch_size=4, shards='',
                learning_rate=1e-3, compile=False, mode='a', dropout=0.1, sizes=[1, 2], **extra)


def configure(argv, cfg=None, **kw):
    cfg = settings() if cfg is None else cfg
    configurator.configure(cfg, argv=argv, presets={'cpu': {}, 'paper': dict(batch_size=20, mode='b')},
                           gpu_preset='paper', choices={'mode': ('a', 'b')},
                           positive=('batch_size', 'learning_rate'), fractions=('dropout',), **kw)
    return cfg


def save(out, step, value=1.0, metric=None):
    checkpoints.save_checkpoint(str(out), dict(kind='compression', step=step, config={}, model=dict(w=torch.full((3,), value))),
                            metric=metric)


def step_of(path):
    return torch.load(path, weights_only=True)['step']


def read_log(out):
    return [json.loads(line) for line in open(Path(out) / 'log.jsonl')]


@pytest.mark.slow
def test_the_compression_track_trains_with_none_of_the_optional_packages(tmp_path, synthetic_dir):
    # the six packages of requirements.txt only: av, Pillow, diffusers, matplotlib, ... as if not installed
    blocked = ('av', 'PIL', 'diffusers', 'matplotlib', 'lpips', 'torchvision', 'torchmetrics', 'tensorboard', 'wandb')
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({blocked!r}))\n"
            f"sys.argv = ['train_compression.py', *{COMPRESSION_RUN!r}, '--max_iters=2', '--eval_interval=2', "
            f"'--data_dir={synthetic_dir}', '--out_dir={tmp_path}/run']\n"
            "runpy.run_path('train_compression.py', run_name='__main__')\n")
    res = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'no curves.png' in res.stdout and (tmp_path / 'run' / 'ckpt.pt').exists()


@pytest.mark.slow
def test_paper_preset_dry_run(tmp_path):
    out = run_script('train_compression.py', '--preset=paper', '--dry_run', cwd=tmp_path)
    cfg = json.loads(out.split('settings: ', 1)[1].splitlines()[0])
    assert (cfg['n_layer'], cfg['n_head'], cfg['n_embd'], cfg['dropout']) == (24, 8, 512, 0.1)
    assert (cfg['global_batch_size'], cfg['epochs'], cfg['warmup_iters'], cfg['learning_rate']) == (160, 80.0, 2000, 8e-4)
    assert (cfg['beta1'], cfg['beta2'], cfg['weight_decay'], cfg['vocab_size']) == (0.9, 0.95, 0.05, 64000)
    # one 80 GB GPU per process: micro-batch 10; the paper's epoch: non-overlapping samples
    assert (cfg['batch_size'], cfg['sample_stride'], cfg['max_iters'], cfg['data_dir']) == (10, 2, 0, 'data/1x')
    assert cfg['compile'] is True   # regional compile of the blocks and the loss chunk (on CUDA: about a minute)
    assert 'T=5' in out
    assert '/ 160 per step = 153,000' in out and '(1 GPU: 16), (8 GPUs: 2), (16 GPUs: 1)' in out
    # --max_iters alone shortens the paper run
    assert 'steps: 1,000\n' in run_script('train_compression.py', '--preset=paper', '--dry_run', '--max_iters', '1000')
    n = int(out.split('parameters: ', 1)[1].split()[0].replace(',', ''))
    # 24 blocks of (2 x 4d^2 attention + 8d^2 MLP) + 64000 x 512 tied embedding, plus small parts
    assert 24 * 16 * 512 ** 2 + 64000 * 512 < n < 24 * 16 * 512 ** 2 + 64000 * 512 + 2_000_000


@pytest.mark.slow
def test_two_process_ddp_takes_the_same_step_as_one_process_with_accumulation(tmp_path, synthetic_dir):
    common = SMALL_RUN + [f'--data_dir={synthetic_dir}', '--max_iters=1', '--global_batch_size=4', '--batch_size=2']
    run_script('train_compression.py', *common, f'--out_dir={tmp_path}/one', cwd=tmp_path)
    run_script('train_compression.py', *common, f'--out_dir={tmp_path}/ddp', cwd=tmp_path, nproc=2)
    one = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=False)
    ddp = torch.load(tmp_path / 'ddp' / 'ckpt.pt', weights_only=False)
    torch.manual_seed(1337)  # the script's seed: its initial weights
    init = STTransformer(STConfig(**one['model_cfg'])).state_dict()
    # the same step up to fp32 summation order: within 1% of the step size (lr = 1e-3; Adam's
    # first step moves every weight by about lr, and gradients near its eps = 1e-8 amplify
    # rounding differences)
    for name, p in one['model'].items():
        torch.testing.assert_close(ddp['model'][name], p, rtol=0, atol=1e-5)
    # the step changed every weight matrix by about the learning rate (Adam's first step)
    delta = [(one['model'][n] - init[n]).abs().max().item() for n in init if init[n].dim() >= 2]
    assert min(delta) > 5e-4, delta


@pytest.mark.slow
def test_resume_gives_the_same_next_loss_as_not_stopping(tmp_path, synthetic_dir):
    # two processes with dropout, and a validation (rank 0 only) before the stop: neither may shift
    # the random draws of training
    common = SMALL_RUN + [f'--data_dir={synthetic_dir}', '--max_iters=5', '--batch_size=1', '--global_batch_size=2',
                          '--dropout=0.1', '--eval_interval=2']
    run_script('train_compression.py', *common, f'--out_dir={tmp_path}/full', cwd=tmp_path, nproc=2)
    run_script('train_compression.py', *common, f'--out_dir={tmp_path}/split', '--stop_at=3', cwd=tmp_path, nproc=2)
    run_script('train_compression.py', *common, f'--out_dir={tmp_path}/split', '--init_from=resume', cwd=tmp_path,
               nproc=2)
    log = lambda d: [json.loads(line) for line in open(tmp_path / d / 'log.jsonl')]
    full, split = log('full'), log('split')
    assert [r['step'] for r in split] == [1, 2, 3, 4, 5]
    assert [r['loss'] for r in split] == [r['loss'] for r in full]  # exact, dropout included
    assert [r['val_ar_top500'] for r in split if 'val_ar_top500' in r] == \
        [r['val_ar_top500'] for r in full if 'val_ar_top500' in r]
    assert [r['lr'] for r in split] == [r['lr'] for r in full]
    # paper 3.2's schedule: linear warmup (here 1 step) to the peak 1e-3, then linear decay to 0 at max_iters
    assert [r['lr'] for r in full] == pytest.approx([1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])


@pytest.mark.slow
def test_short_run_learns_beyond_the_baselines(tmp_path, synthetic_dir):
    """80 steps of batch 4 (the README default is longer; neither reaches the Bayes floor)."""
    run_script('train_compression.py', *LEARN_RUN, f'--data_dir={synthetic_dir}', f'--out_dir={tmp_path}', cwd=tmp_path)
    r = results_of(tmp_path)
    model, copy_last = r['model, teacher-forced'], r['copy the last context grid']
    assert model['top500'] < copy_last['top500'] - 0.3 and model['ce'] < copy_last['ce'] - 0.3
    assert model['ce'] < r['uniform over the vocabulary']['ce'] - 1.0
    assert model['ce'] > r['Bayes floor (states known)']['ce'] - 0.05  # nothing beats the floor
    assert r['model, greedy autoregressive']['top500'] < r['uniform over the vocabulary']['top500']


@pytest.mark.slow
def test_model_without_states_cannot_beat_the_state_blind_floor(tmp_path, synthetic_dir):
    run_script('train_compression.py', *LEARN_RUN, f'--data_dir={synthetic_dir}', f'--out_dir={tmp_path}',
               '--use_states=False', cwd=tmp_path)
    r = results_of(tmp_path)
    model, blind = r['model, teacher-forced'], r['state-blind floor']
    assert model['ce'] < r['uniform over the vocabulary']['ce'] - 0.5  # it learned something
    # but it cannot see where the robot looks next: above the best state-blind predictor,
    # which is most of a nat above the Bayes floor
    assert model['ce'] > blind['ce'] - 0.05
    assert blind['ce'] > r['Bayes floor (states known)']['ce'] + 0.5


@pytest.mark.slow
def test_compression_compiled_trains_the_same_steps_as_eager(tmp_path, synthetic_dir):
    losses = {}
    for compile in (False, True):
        out = tmp_path / f'compile_{compile}'
        run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--max_iters=3', f'--compile={compile}',
                        '--log_interval=1', cwd=tmp_path)
        losses[compile] = [r['loss'] for r in run_dir.read_log(out) if 'loss' in r]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)   # compiled blocks and loss chunk: the same maths


@pytest.mark.slow
def test_compression_stops_at_a_nan_loss_without_saving_it(tmp_path, synthetic_dir):
    run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={tmp_path}', '--max_iters=2', cwd=tmp_path)
    err = run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={tmp_path}', '--max_iters=30', '--overwrite',
                          '--learning_rate=1e6', '--ckpt_interval=1', cwd=tmp_path, fails=True)
    assert re.search(r'step \d+: the (training loss|gradient norm) is (nan|inf): stopping', err), err
    assert all_finite(tmp_path / 'ckpt.pt') and all_finite(tmp_path / 'ckpt_prev.pt')


@pytest.mark.slow
def test_a_nan_in_robot_states_stops_compression_naming_its_row(tmp_path, synthetic_dir):
    bad = tmp_path / 'data'
    shutil.copytree(synthetic_dir, bad)
    states = np.fromfile(bad / 'val_v2.0' / 'states_0.bin', np.float32).reshape(-1, 25)
    states[77, 3] = np.nan
    states.tofile(bad / 'val_v2.0' / 'states_0.bin')
    err = run_compression(f'--data_dir={bad}', f'--out_dir={tmp_path}/run', '--max_iters=1', cwd=tmp_path, fails=True)
    assert re.search(r'val_v2.0/states_0.bin: robot states hold nan at row \(frame\) 77, column 3', err), err
    assert not (tmp_path / 'run' / 'ckpt.pt').exists() and 'Traceback' not in err


@pytest.mark.slow
def test_compression_names_a_damaged_synthetic_file_instead_of_downloading(tmp_path, synthetic_dir):
    bad = tmp_path / 'bad'
    shutil.copytree(synthetic_dir, bad)
    video = bad / 'train_v2.0' / 'videos' / 'video_1.bin'
    video.write_bytes(video.read_bytes()[:100000])
    err = run_compression(f'--data_dir={bad}', f'--out_dir={tmp_path}/run', '--max_iters=1', '--download', cwd=tmp_path,
                          fails=True)
    assert f'{video} has 100000 bytes, not ' in err and f'It is a synthetic set: delete {bad}' in err
    assert 'Traceback' not in err and not (tmp_path / 'run' / 'ckpt.pt').exists()
    # its metadata damaged too: still the synthetic set (synthetic.json says so), never a download
    (bad / 'train_v2.0' / 'metadata.json').write_text('{"num_sh')
    err = run_compression(f'--data_dir={bad}', f'--out_dir={tmp_path}/run', '--max_iters=1', '--download', cwd=tmp_path,
                          fails=True)
    assert 'metadata.json is not valid JSON' in err and f'It is a synthetic set: delete {bad}' in err
    assert 'Traceback' not in err
    # shards the split does not have: named, no traceback
    err = run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={tmp_path}/run', '--max_iters=1', '--shards=5',
                          cwd=tmp_path, fails=True)
    assert '--shards: shards [5]: ' in err and 'lists 2 shards, 0-1' in err and 'Traceback' not in err


@pytest.mark.slow
def test_compression_refuses_bad_starts_before_any_work(tmp_path, synthetic_dir):
    out = tmp_path / 'run'
    run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--max_iters=1', cwd=tmp_path)
    before = (out / 'ckpt.pt').read_bytes()
    for args, message in ((['--max_iters=1'], 'already exists. To continue that run pass --init_from=resume'),
                          (['--max_iters=1', '--batch_size=0'], '--batch_size=0 must be positive'),
                          (['--max_iters=0'], '--max_iters=0 and --epochs=0: give the run a length'),
                          (['--max_iters=1', '--sample_stride=3'], '--sample_stride=3 is not one of 1, 2'),
                          (['--max_iters=1', '--init_from=Resume'], "--init_from='Resume' is not one of 'scratch', 'resume'"),
                          (['--max_iters=1', '--dry_run', '--global_batch_size=3'],
                           '--global_batch_size=3 must be a multiple of --batch_size=2'),
                          (['--max_iters=1', '--shards=0,0'], "--shards='0,0' names a shard twice"),
                          (['--max_iters=1', '--dtype=float16'], "--dtype='float16' is not one of 'bfloat16', 'float32'")):
        assert message in run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', *args, cwd=tmp_path,
                                          fails=True)
    assert (out / 'ckpt.pt').read_bytes() == before
    (tmp_path / 'file').write_text('')
    err = run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={tmp_path}/file/run', '--max_iters=1',
                          cwd=tmp_path, fails=True)
    assert 'is not writable' in err
    err = run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={tmp_path}/file', '--max_iters=1',
                          cwd=tmp_path, fails=True)
    assert f'--out_dir={tmp_path}/file is a file, not a folder' in err


@pytest.mark.slow
def test_compression_resume_says_which_optimizer_flags_it_takes_from_now(tmp_path, synthetic_dir):
    out = tmp_path / 'run'
    run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--max_iters=2', '--stop_at=1', cwd=tmp_path)
    said = run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--max_iters=2', '--init_from=resume',
                           '--weight_decay=0.1', '--beta2=0.99', cwd=tmp_path)
    assert 'resuming with --weight_decay=0.1 (the checkpoint\'s: 0.05), --beta2=0.99 (the checkpoint\'s: 0.95)' in said
    decay, no_decay = torch.load(out / 'ckpt.pt', weights_only=True)['optimizer']['param_groups']
    assert (decay['weight_decay'], no_decay['weight_decay'], tuple(decay['betas'])) == (0.1, 0.0, (0.9, 0.99))


@pytest.mark.slow
def test_flags_the_machine_cannot_serve_are_refused_by_name_before_any_work(tmp_path):
    fails = lambda script, *args: run_script(script, *args, f'--out_dir={tmp_path}/run', cwd=tmp_path, fails=True)
    assert "--shards='0,x': comma-separated shard numbers" in fails('train_compression.py', '--shards=0,x')
    if importlib.util.find_spec('wandb') is None:
        assert '--log_with=wandb: the wandb package is not installed' in fails('train_compression.py', '--log_with=wandb')
        assert '--log_with=wandb: the wandb package is not installed' in fails('train_sampling.py', '--log_with=wandb')
    if not torch.cuda.is_available():
        assert '--device=cuda: this torch' in fails('train_sampling.py', '--device=cuda', '--max_iters=1')
    assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_compression_loads_only_plain_checkpoints_of_its_own_track(tmp_path, synthetic_dir):
    out = tmp_path / 'run'
    run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--max_iters=1', cwd=tmp_path)
    err = run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--max_iters=2', '--init_from=resume',
                          '--n_layer=2', cwd=tmp_path, fails=True)
    assert 'n_layer=1 in the checkpoint, 2 now' in err
    marker = tmp_path / 'pwned.txt'
    torch.save(dict(kind='compression', step=1, config={}, evil=_Payload(str(marker))), tmp_path / 'evil.pt')
    torch.save(dict(kind='sampling', step=1, config={}), tmp_path / 'sampling.pt')
    for name, message in (('evil.pt', 'refusing to load it'), ('sampling.pt', 'not a compression-track checkpoint')):
        err = run_compression(f'--data_dir={synthetic_dir}', '--eval_only', f'--ckpt={tmp_path / name}',
                              cwd=tmp_path, fails=True)
        assert message in err
    assert not marker.exists()


@pytest.mark.slow
def test_compression_runs_from_an_empty_folder_to_a_validated_log(tmp_path, synthetic_dir,
                                                                                      monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'empty_cache'))
    # without --download (preset paper sets it) a folder without the data is a mistake, named
    err = run_compression('--data_dir', str(tmp_path / 'data'), '--out_dir', str(tmp_path / 'run'), '--max_iters', '2',
                          cwd=tmp_path, fails=True)
    assert f"{tmp_path / 'data' / 'train_v2.0'} is not whole: " in err and 'A mistyped --data_dir?' in err
    err = run_compression('--data_dir', str(tmp_path / 'data'), '--out_dir', str(tmp_path / 'run'), '--max_iters', '2',
                          '--download', cwd=tmp_path, fails=True)
    assert 'could not fetch train_v2.0/metadata.json' in err and 'python -m machinery.prepare download --out DIR' in err
    for key, value in fake_hub(tmp_path / 'hub', synthetic_dir).items():
        monkeypatch.setenv(key, value)
    args = ['--data_dir', str(tmp_path / 'data'), '--out_dir', str(tmp_path / 'run'), '--max_iters', '2',
            '--eval_interval', '1', '--train_splits=train_v2.0,val_v2.0', '--download']
    out = run_compression(*args, cwd=tmp_path)
    video = tmp_path / 'data' / 'train_v2.0' / 'videos' / 'video_1.bin'
    assert video.read_bytes() == open(os.path.join(synthetic_dir, 'train_v2.0/videos/video_1.bin'), 'rb').read()
    n_train, n_val = (len(data.TokenDataset(os.path.join(synthetic_dir, s), vocab_size=1000)) for s in ('train_v2.0', 'val_v2.0'))
    assert f'{n_train + n_val} train samples (train_v2.0, val_v2.0' in out and 'not held-out numbers' in out
    log = run_dir.read_log(str(tmp_path / 'run'))
    assert [r['step'] for r in log] == [1, 2]
    assert all(math.isfinite(r[k]) for r in log for k in ('loss', 'val_tf_top500', 'val_ar_top500', 'val_ar_ce'))
    assert (tmp_path / 'run' / 'curves.png').exists() and (tmp_path / 'run' / 'ckpt_best.pt').exists()
    # a short file (e.g. an interrupted copy of the folder) is recognised and fetched again
    short = video.read_bytes()[:1000]
    video.unlink()   # a new file: the downloaded one is a hard link into the cache
    video.write_bytes(short)
    run_compression(*args, '--overwrite', cwd=tmp_path)
    assert video.stat().st_size == os.path.getsize(os.path.join(synthetic_dir, 'train_v2.0/videos/video_1.bin'))


@pytest.mark.slow
def test_compression_stops_at_a_finite_explosion_with_the_checkpoint_from_before_it(tmp_path, synthetic_dir):
    out = tmp_path / 'run'
    args = (f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--max_iters=40', '--ckpt_interval=10',
            '--eval_interval=1000')
    run_compression(*args, '--stop_at=30', cwd=tmp_path)
    state = torch.load(out / 'ckpt.pt', weights_only=True)   # an exploded but finite state as step 30
    state['model'] = {k: v * 30 if v.is_floating_point() else v for k, v in state['model'].items()}
    torch.save(state, out / 'ckpt.pt')
    err = run_compression(*args, '--init_from=resume', cwd=tmp_path, fails=True)
    assert re.search(r'step 31: the training loss spiked to [\d.e+]+, over 10 x [\d.]+ \(the median of the last 30\)',
                     err), err[-2000:]
    assert f'{out}/ckpt.pt and {out}/ckpt_prev.pt hold step 20, saved before the loss diverged at step 31' in err
    assert (step_of(out / 'ckpt.pt'), step_of(out / 'ckpt_prev.pt'), step_of(out / 'ckpt_diverged.pt')) == (20, 20, 30)


@pytest.mark.slow
def test_compression_reports_a_bad_val_token_before_the_first_step(tmp_path, synthetic_dir):
    bad = tmp_path / 'data'
    shutil.copytree(synthetic_dir, bad)
    tokens = np.fromfile(bad / 'val_v2.0' / 'video_0.bin', np.int32)
    tokens[-1] = 5000   # in the last block: the first validation (2 samples) never reads it
    tokens.tofile(bad / 'val_v2.0' / 'video_0.bin')
    err = run_compression(f'--data_dir={bad}', f'--out_dir={tmp_path}/run', '--max_iters=5', cwd=tmp_path, fails=True)
    assert re.search(r'the validation split: .*val_v2.0/video_0.bin: block \d+ holds token 5000', err), err[-2000:]
    assert not (tmp_path / 'run' / 'log.jsonl').exists()


@pytest.mark.slow
def test_resume_says_which_model_settings_it_takes_from_the_checkpoint(tmp_path, synthetic_dir):
    out = tmp_path / 'run'
    run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--max_iters=2', '--stop_at=1', '--n_layer=2',
                    cwd=tmp_path)
    said = run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--max_iters=2', '--init_from=resume',
                           cwd=tmp_path)
    assert f'settings taken from {out}/ckpt.pt (not given now): ' in said and 'n_layer=2' in said
    state = torch.load(out / 'ckpt.pt', weights_only=True)
    assert state['step'] == 2 and state['model_cfg']['n_layer'] == 2


@pytest.mark.slow
def test_dry_run_prints_what_the_run_will_write(tmp_path):
    out = run_script('train_sampling.py', '--preset=paper', '--dry_run', f'--data_dir={tmp_path}/1x', cwd=tmp_path)
    assert re.search(r'^disk: checkpoints and LoRA exports [\d.,]+ GiB, latents 772\.8 GiB = ', out, re.M), out
    out = run_script('train_compression.py', '--preset=paper', '--dry_run', cwd=tmp_path)
    assert re.search(r'^disk: checkpoints [\d.,]+ GiB, tokenized data to download 8\.7 GiB = ', out, re.M), out
    assert not (tmp_path / 'data').exists()   # a dry run writes nothing


@pytest.mark.slow
def test_a_diverging_resume_keeps_the_state_it_resumed_from(tmp_path, synthetic_dir):
    out = tmp_path / 'run'
    run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--max_iters=4', cwd=tmp_path)
    resumed_from = torch.load(out / 'ckpt.pt', weights_only=True)['model']
    err = run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--init_from=resume',
                          '--learning_rate=1e6', '--ckpt_interval=1', '--max_iters=30', cwd=tmp_path, fails=True)
    assert re.search(rf'step \d+: the (training loss|gradient norm) is (nan|inf): stopping\. the checkpoint of step '
                     rf'\d+, whose loss diverged, was moved to {out}/ckpt_diverged\.pt; {out}/ckpt\.pt and '
                     rf'{out}/ckpt_prev\.pt hold step 4, saved before the loss diverged', err), err[-2000:]
    for name in ('ckpt.pt', 'ckpt_prev.pt'):
        state = torch.load(out / name, weights_only=True)
        assert state['step'] == 4 and all(torch.equal(v, resumed_from[k]) for k, v in state['model'].items())
    assert 'Traceback' not in err


@pytest.mark.slow
def test_a_resumed_compression_run_checks_for_spikes_from_its_first_step(tmp_path, synthetic_dir):
    out = tmp_path / 'run'
    run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--max_iters=40', '--stop_at=25', cwd=tmp_path)
    (out / 'log.jsonl').unlink()   # the history travels in the checkpoint, not in the log
    err = run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--max_iters=40', '--init_from=resume',
                          '--learning_rate=1e6', cwd=tmp_path, fails=True)
    # step 26's loss is of the weights resumed from; step 27's of the first update at the bad learning rate
    assert re.search(r'step 27: the training loss spiked to [\d.e+]+, over 10 x [\d.]+ \(the median of the last 26\): '
                     r'stopping\. ' + re.escape(f'{out}/ckpt.pt holds step 25, saved before the loss diverged at step 27'),
                     err), err[-2000:]


@pytest.mark.slow
def test_a_compression_resume_with_nothing_left_to_train_is_refused(tmp_path, synthetic_dir):
    out = tmp_path / 'run'
    run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--max_iters=4', cwd=tmp_path)
    before = (out / 'ckpt.pt').read_bytes()
    for end in ('--max_iters=2', '--max_iters=4'):
        err = run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--init_from=resume', end,
                              cwd=tmp_path, fails=True)
        assert (f"{out}/ckpt.pt is at step 4 already, and this run ends at step {end[-1]} (--max_iters, --epochs, "
                f"--stop_at): pass a later end to train on, or --eval_only to evaluate the checkpoint") in err, err
        assert 'Traceback' not in err
    err = run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--init_from=resume', '--overwrite',
                          '--max_iters=8', cwd=tmp_path, fails=True)
    assert '--overwrite starts a new run in' in err and 'drop one' in err
    assert (out / 'ckpt.pt').read_bytes() == before


@pytest.mark.slow
def test_a_resume_without_flags_continues_the_runs_trackers_and_intervals(tmp_path, synthetic_dir):
    out = tmp_path / 'run'
    run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--max_iters=4', '--stop_at=2',
                    '--log_with=tensorboard', '--eval_interval=2', '--log_interval=1', cwd=tmp_path)
    said = run_compression(f'--out_dir={out}', '--init_from=resume', '--max_iters=5', cwd=tmp_path)
    line = next(l for l in said.splitlines() if l.startswith('settings taken from'))
    for setting in (f"data_dir='{synthetic_dir}'", "log_with='tensorboard'", 'eval_interval=2', 'log_interval=1'):
        assert setting in line, line
    assert 'max_iters' not in line and 'stop_at' not in line   # typed now; a command's own
    assert step_lines(said) == [3, 4, 4, 5, 5]   # each step's line, the validation of steps 4 and 5 (the end)
    events = tensorboard_events(out / 'tensorboard')
    assert [e.step for e in events.Scalars('loss')] == [1, 2, 3, 4, 5]   # the same folder, on after the resume
    assert torch.load(out / 'ckpt.pt', weights_only=True)['step'] == 5


# ===============================================================================================
# wan_state.py: the Wan 2.2 DiT (equal to diffusers'), AdaLN-Zero states, LoRA, checkpointing, compiled blocks
# ===============================================================================================


B, C, NF, H, W = 2, 48, 3, 8, 8          # 3 latent frames of 8x8 -> 3 x 16 tokens


TOKENS_PER_FRAME = (H // 2) * (W // 2)


NS = 4 * (NF - 1) + 1                    # state rows for 3 latent frames


def per_token(mask_BF, t_B, tokens_per_frame=TOKENS_PER_FRAME):
    """The per-frame timesteps one per token, [B, L], as the reference TI2V passes them (and diffusers'
    WanTransformer3DModel takes them)."""
    return frame_timesteps(mask_BF, t_B).repeat_interleave(tokens_per_frame, dim=1)


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, NF, H, W, generator=g)
    context = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    mask_BF = torch.tensor([[0, 1, 1], [0, 0, 1]])       # first frame(s) held as context
    t_BL = per_token(mask_BF, torch.tensor([999.0, 421.5]))
    states = torch.randn(B, NS, 25, generator=g)
    states[..., 21:23] = torch.rand(B, NS, 2, generator=g)
    return x, t_BL, context, states


def diffusers_twin(cfg):
    from diffusers import WanTransformer3DModel
    return WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
        qk_norm='rms_norm_across_heads', eps=cfg.eps)


def wan_inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_dim, 3, 8, 8, generator=g)
    t_BL = per_token(torch.tensor([[0, 1, 1], [0, 0, 1]]), torch.tensor([999.0, 421.5]), 16)
    return x, t_BL, torch.randn(2, cfg.text_len, cfg.text_dim, generator=g), torch.randn(2, 9, 25, generator=g)


def wan_lora_block():
    """Block 0 of a tiny DiT with LoRA adapters (alpha / rank = 2) and the team's per-block state
    table added to the modulation, as a training step calls it."""
    torch.manual_seed(0)
    net = randomize(WanDiT(WanConfig.tiny(state_embedder='team'), state_cond=True), std=0.1)
    add_lora(net, rank=4, alpha=8)
    for m in wan_state.lora_modules(net):
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    cfg, block = net.cfg, net.blocks[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3 * 16, cfg.dim, generator=g, requires_grad=True)
    e = torch.randn(2, 3, 6, cfg.dim, generator=g) + net.state_embedder.block_tables[0]
    context = torch.randn(1, cfg.text_len, cfg.dim, generator=g)
    return block, (x, e, context, rope_cos_sin(3, 4, 4, cfg.head_dim, cfg.rope_theta, 'cpu'))


def fwd_bwd(module, *args):
    out = module(*args)
    params = [p for p in module.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.float().square().mean(), [args[0], *params])


def test_frame_timesteps_give_the_context_frames_timestep_0():
    t_BF = frame_timesteps(torch.tensor([[0, 1, 1], [0, 0, 1]]), torch.tensor([700.0, 300.0]))
    assert t_BF.tolist() == [[0.0, 700.0, 700.0], [0.0, 0.0, 300.0]]


def test_dit_matches_diffusers_with_per_token_timestep():
    cfg = WanConfig.tiny()
    ours = randomize(WanDiT(cfg, state_cond=False))
    ref = diffusers_twin(cfg)
    ref.load_state_dict(to_diffusers_state_dict(ours.state_dict()), strict=True)
    x, t_BL, context, _ = inputs(cfg)
    with torch.no_grad():
        out = ours(x, t_BL, context)
        want = ref(x, t_BL, context).sample
        out_B = ours(x, torch.tensor([999.0, 3.0]), context)          # one timestep per sample
        want_B = ref(x, torch.tensor([999.0, 3.0]), context).sample
    assert out.shape == (B, C, NF, H, W)
    assert want.abs().max() > 1.0    # a real signal, not zeros
    # diffusers builds the timestep sinusoid in fp32, the reference (and we) in fp64: ~1e-5 apart
    assert (out - want).abs().max() < 1e-4
    assert (out_B - want_B).abs().max() < 1e-4


def test_per_frame_timesteps_with_one_shared_context_give_the_reference_output():
    # the scripts pass one timestep per latent frame and one context for the batch; the reference
    # (and diffusers) one timestep per token and a context per sample: the same maths, less work
    cfg = WanConfig.tiny()
    model = randomize(WanDiT(cfg, state_cond=True), std=0.1)
    x, _, context, states = inputs(cfg)
    mask_BF, t_B = torch.tensor([[0, 1, 1], [0, 0, 1]]), torch.tensor([999.0, 421.5])
    drop = torch.tensor([False, True])
    with torch.no_grad():
        want = model(x, per_token(mask_BF, t_B), context[:1].expand(B, -1, -1), states, drop)
        got = model(x, frame_timesteps(mask_BF, t_B), context[:1], states, drop)
        want_B = model(x, per_token(torch.ones(B, NF), t_B), context, states)
        got_B = model(x, t_B, context, states)   # [B]: one timestep for every frame of a sample
    assert want.abs().max() > 0.1
    assert (got - want).abs().max() < 1e-5
    assert (got_B - want_B).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r'\[B\], \[B, F\] or \[B, L\]'):
        model(x, torch.zeros(B, 5), context, states)


def test_short_context_is_zero_padded_to_text_len():
    cfg = WanConfig.tiny()
    model = randomize(WanDiT(cfg, state_cond=False))
    x, t_BL, context, _ = inputs(cfg)
    short = context[:, :3]
    padded = torch.cat([short, torch.zeros(B, cfg.text_len - 3, cfg.text_dim)], dim=1)
    with torch.no_grad():
        assert torch.equal(model(x, t_BL, short), model(x, t_BL, padded))


def test_full_config_parameter_count_on_meta():
    with torch.device('meta'):
        base = {k: v for k, v in WanDiT(WanConfig(), state_cond=False).state_dict().items()}
    assert len(base) == 825                   # the official checkpoint's tensor count
    count = parameter_counts(WanConfig(), lora_rank=32)
    assert count['base'] == sum(v.numel() for v in base.values()) == 4_999_787_712    # "about 5.0B"
    assert count['lora'] == 30 * 32 * (8 * (3072 + 3072) + 2 * (3072 + 14336))       # 10 linears a block
    assert 5e6 < count['state'] < 6e6


def test_both_state_embedders_have_their_published_sizes():
    # paper 2.1's text, as nanoWM reads it, and the team's code (5 ways apart: wan_state.StateEmbedder)
    assert parameter_counts(WanConfig())['state'] == 5_316_352
    assert parameter_counts(WanConfig(state_embedder='team'))['state'] == 67_903_488   # the team's 67.9M
    cfg = WanConfig.tiny(state_embedder='team')
    torch.manual_seed(0)
    model = WanDiT(cfg)
    emb = model.state_embedder
    assert emb.freqs.tolist() == [1.0] and [type(m).__name__ for m in emb.conv] == [
        'Conv1d', 'SiLU', 'GroupNorm', 'Conv1d', 'SiLU', 'GroupNorm']
    assert emb.block_tables.shape == (cfg.num_layers, 6, cfg.dim) and not emb.block_tables.any()
    assert emb.mlp_out[-1].weight.abs().max() > 0   # not zero-initialised: the states act from step 0
    x, t, context, states = inputs(cfg)
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.1)   # the base head starts at zero: make the output visible
        a, b = model(x, t, context, states), model(x, t, context, torch.randn_like(states))
    assert (a - b).abs().max() > 1e-4
    model(x, t, context, states).square().mean().backward()
    assert emb.block_tables.grad[0].abs().max() > 0 and emb.block_tables.grad[1].abs().max() > 0
    with pytest.raises(ValueError, match="state_embedder='other': 'paper' or 'team'"):
        WanDiT(WanConfig.tiny(state_embedder='other'))


def test_gradient_checkpointing_gives_same_gradients():
    cfg = WanConfig.tiny()
    model = randomize(WanDiT(cfg))
    x, t_BL, context, states = inputs(cfg)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(x, t_BL, context, states, torch.tensor([False, True])).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_checkpointing_the_first_n_blocks_changes_no_gradient():
    cfg = WanConfig.tiny(num_layers=3)
    model = randomize(WanDiT(cfg), std=0.1)
    x, t_BL, context, states = wan_inputs(cfg)
    calls = [0] * 3
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: calls.__setitem__(i, calls[i] + 1))
    results = {}
    for setting, want_n in ((False, 0), (1, 1), (2, 2), (True, 3)):   # True == 1 in Python: not a dict
        model.zero_grad()
        calls[:] = [0] * 3
        model.gradient_checkpointing = setting
        loss = model(x, t_BL, context, states, torch.tensor([False, True])).square().mean()
        loss.backward()
        n = model.checkpointed_blocks()
        assert n == want_n
        assert calls == [2 if i < n else 1 for i in range(3)]   # checkpointed blocks rerun in backward
        results[n] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
    loss0, grad0 = results[0]
    for n, (loss, grad) in results.items():
        assert loss == loss0 and torch.allclose(grad, grad0, atol=1e-6), f"{n} checkpointed blocks"


def test_checkpointing_more_blocks_than_the_model_has_fails_clearly():
    model = WanDiT(WanConfig.tiny(num_layers=2))
    model.gradient_checkpointing = 3
    x, t_BL, context, states = wan_inputs(model.cfg)
    with pytest.raises(ValueError, match='block count in 0..2'):
        model(x, t_BL, context, states)


@pytest.mark.slow
def test_compiled_dit_blocks_give_the_eager_output():
    # sample.py / bench.py --compile: torch.compile each block (inductor; needs a C compiler on the CPU)
    model = randomize(WanDiT(WanConfig.tiny()), std=0.1).eval()
    x, t_BL, context, states = wan_inputs(model.cfg)
    t_BF = t_BL[:, ::16]   # one timestep per latent frame, as the scripts pass them
    with torch.no_grad():
        want = model(x, t_BF, context[:1], states)
        model.compile_blocks()
        got = model(x, t_BF, context[:1], states)
    assert want.abs().max() > 0.1 and (got - want).abs().max() < 1e-5
    assert all(block._compiled_call_impl is not None for block in model.blocks)


def test_bf16_weights_run_under_autocast_with_fp32_islands():
    cfg = WanConfig.tiny()
    model = randomize(WanDiT(cfg))
    x, t_BL, context, states = inputs(cfg)
    with torch.no_grad():
        want = model(x, t_BL, context, states)
        model.set_dtype(torch.bfloat16)
        got = model(x, t_BL, context, states)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32 and model.time_embedding[0].weight.dtype == torch.float32
    assert got.dtype == torch.float32
    assert (got - want).abs().max() / want.abs().max() < 0.05   # bf16 rounding only


def test_wan_flop_estimates_match_torch_flop_counter():
    cfg = WanConfig.tiny(num_layers=3)
    model = WanDiT(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_dim, 6, 16, 16, generator=g)
    mask_BF = torch.ones(2, 6)
    mask_BF[:, :2] = 0
    t_BF = frame_timesteps(mask_BF, torch.tensor([500.0, 100.0]))
    # one context for the batch of 2, as the scripts pass the empty prompt: counted once
    context, states = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g), torch.randn(2, 21, 25, generator=g)
    with torch.no_grad():
        fwd = counted_flops(lambda: model(x, t_BF, context, states)) / 2
    assert abs(model.flops_per_sample(6, 16, 16, batch=2) / fwd - 1) < 0.01
    add_lora(model)
    step = counted_flops(lambda: model(x, t_BF, context, states).square().mean().backward()) / 2
    assert abs(model.flops_per_sample(6, 16, 16, lora_step=True, batch=2) / step - 1) < 0.01


def test_state_conditioning_changes_nothing_at_init_then_learns():
    cfg = WanConfig.tiny()
    base = randomize(WanDiT(cfg, state_cond=False))
    model = WanDiT(cfg, state_cond=True)
    model.load_state_dict(base.state_dict(), strict=False)
    x, t_BL, context, states = inputs(cfg)
    with torch.no_grad():
        want = base(x, t_BL, context)
        assert torch.equal(model(x, t_BL, context, states), want)
        assert torch.equal(model(x, t_BL, context, None), want)
    add_lora(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x, t_BL, context, states).square().mean().backward()
    assert model.state_embedder.mlp_out[2].weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    model(x, t_BL, context, states).square().mean().backward()   # second step reaches the inner layers
    opt.step()
    with torch.no_grad():
        with_states = model(x, t_BL, context, states)
        other_states = model(x, t_BL, context, states.flip(1))
        dropped = model(x, t_BL, context, states, drop_states_B=torch.tensor([True, False]))
        none = model(x, t_BL, context, None)
    assert (with_states - want).abs().max() > 1e-4
    assert (with_states - other_states).abs().max() > 1e-6        # the states matter
    assert torch.equal(dropped[0], none[0])                      # dropped = the no-state embedding
    assert torch.equal(dropped[1], with_states[1])


def test_states_of_wrong_shape_fail_clearly():
    cfg = WanConfig.tiny()
    model = WanDiT(cfg)
    x, t_BL, context, states = inputs(cfg)
    B = x.shape[0]
    with pytest.raises(ValueError, match=r'give 4 \* \(F - 1\) \+ 1 = 9 state rows'):
        model(x, t_BL, context, states[:, :5])
    # a state column missing or extra, one clip's states for a batch, a drop flag not one a sample
    for bad in (states[..., :24], torch.cat([states, states[..., :1]], -1), states[:1]):
        with pytest.raises(ValueError, match=rf'states must be \[B, 4 \(F - 1\) \+ 1, state_dim\] = \[{B}, 9, 25\]'):
            model(x, t_BL, context, bad)
    with pytest.raises(ValueError, match=rf'drop_states must be \[B\] = \[{B}\]'):
        model(x, t_BL, context, states, torch.zeros(1, dtype=torch.bool))
    with pytest.raises(ValueError, match='must be num_heads=64 x an even head size >= 6'):
        WanDiT(WanConfig.tiny(dim=256, num_heads=64))


def lora_on_a_random_base():
    """A tiny random DiT, its output before LoRA, its base weights, and the same model with rank-4 adapters."""
    cfg = WanConfig.tiny()
    model = randomize(WanDiT(cfg, state_cond=False))
    args = inputs(cfg)[:3]
    with torch.no_grad():
        want = model(*args)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    return add_lora(model, rank=4, alpha=8), args, want, base_before


def lora_step(model, args):
    """One SGD step of the adapters on a square loss."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(*args).square().mean().backward()
    opt.step()


def test_lora_starts_as_the_base_model():
    model, args, want, _ = lora_on_a_random_base()
    assert len(lora_modules(model)) == 10 * model.cfg.num_layers
    with torch.no_grad():
        assert torch.equal(model(*args), want)


def test_lora_training_changes_only_the_adapters():
    model, args, want, base_before = lora_on_a_random_base()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all('.lora_' in n for n in trainable)
    lora_step(model, args)
    assert all(p.grad is None for n, p in model.named_parameters() if '.lora_' not in n)   # frozen base
    with torch.no_grad():
        assert (model(*args) - want).abs().max() > 1e-4
    for k, v in base_before.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_remove_lora_gives_back_the_base_model_sharing_its_weights():
    model, args, want, base_before = lora_on_a_random_base()
    lora_step(model, args)
    weight = model.blocks[0].self_attn.q.weight
    wan_state.remove_lora(model)
    assert not lora_modules(model) and model.blocks[0].self_attn.q.weight is weight   # the same W, no copy
    with torch.no_grad():
        assert torch.equal(model(*args), want)


def test_merge_then_unmerge_keeps_the_lora_models_output():
    model, args, _, base_before = lora_on_a_random_base()
    lora_step(model, args)
    with torch.no_grad():
        tuned = model(*args)
        merge_lora(model)
        assert (model(*args) - tuned).abs().max() < 1e-5
        unmerge_lora(model)
        assert (model(*args) - tuned).abs().max() < 1e-5
    for k, v in base_before.items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k


def test_wan_training_block_has_no_graph_breaks():
    block, args = wan_lora_block()
    assert graph_breaks(block, *args) == 0
    with torch.autocast('cpu', dtype=torch.bfloat16):   # the bf16 path
        assert graph_breaks(block, *args) == 0


@pytest.mark.slow
def test_compiled_wan_lora_block_equals_eager():
    torch._dynamo.reset()
    block, args = wan_lora_block()
    want, want_grads = fwd_bwd(block, *args)
    block.compile(fullgraph=True)
    got, got_grads = fwd_bwd(block, *args)
    assert want.abs().max() > 0.1 and (got - want).abs().max() < 1e-5
    assert max((g - w).abs().max().item() for g, w in zip(got_grads, want_grads)) < 1e-5


@pytest.mark.slow
def test_compiled_dit_with_checkpointed_blocks_equals_eager():
    # what train_sampling.py runs on CUDA: LoRA, state conditioning, compiled blocks, 1 of 2 checkpointed
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomize(WanDiT(WanConfig.tiny(), state_cond=True), std=0.1)
    add_lora(model, rank=4, alpha=4)
    for m in wan_state.lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    model.gradient_checkpointing = 1
    x, t_BL, context, states = wan_inputs(model.cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads():
        loss = model(x, t_BL[:, ::16], context[:1], states).square().mean()
        grads = torch.autograd.grad(loss, trainable, allow_unused=True)   # (the no-state embedding: unused)
        return loss, [g for g in grads if g is not None]

    want, want_grads = loss_and_grads()
    model.compile_blocks()
    with torch._dynamo.config.patch(error_on_recompile=True):   # one graph serves every block, the first too
        got, got_grads = loss_and_grads()
    assert abs(got.item() - want.item()) < 1e-6 * abs(want.item()) and len(got_grads) == len(want_grads) > 40
    assert max((g - w).abs().max().item() for g, w in zip(got_grads, want_grads)) < 1e-5


@pytest.mark.parametrize('alpha', [4, 8])
def test_lora_linear_is_base_plus_scaled_delta(alpha):
    torch.manual_seed(0)
    lin = LoRALinear(torch.nn.Linear(16, 8), rank=4, alpha=alpha)
    torch.nn.init.normal_(lin.lora_B.weight)
    x = torch.randn(5, 16)
    want = x @ lin.weight.T + lin.bias + x @ lin.lora_A.weight.T @ lin.lora_B.weight.T * (alpha / 4)
    assert (lin(x) - want).abs().max() < 1e-5


def test_lora_accumulated_by_the_base_gemm_gives_the_plain_output_and_gradients():
    # the speed lever LoRALinear.addmm: y + (x A^T) B^T * scale inside one GEMM, against the plain sum
    model, args, _, _ = lora_on_a_random_base()
    for m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    outputs, grads = [], []
    for addmm in (False, True):
        for m in lora_modules(model):
            m.addmm = addmm
        model.zero_grad()
        out = model(*args)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert outputs[0].abs().max() > 0.1 and (outputs[1] - outputs[0]).abs().max() < 1e-5
    for name, g in grads[0].items():
        assert g.abs().max() > 0 and (grads[1][name] - g).abs().max() <= 1e-5 * g.abs().max(), name


def test_wan_block_gives_each_frames_modulation_to_that_frames_tokens():
    # the block's per-frame modulation (one shift / scale / gate per latent frame) against the
    # per-token form of the reference: every frame's values repeated over its 16 tokens
    block, (x, e, context, rope) = wan_lora_block()
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (block.modulation.float() + e).unbind(2)

    def per_frame(a):   # (B, 3 frames, D) -> (B, 48 tokens, D)
        return a.repeat_interleave(16, dim=1)

    with torch.no_grad():
        h = block.norm1(x) * (1 + per_frame(scale_sa)) + per_frame(shift_sa)
        want = x + block.self_attn(h, rope=rope).float() * per_frame(gate_sa)
        want = want + block.cross_attn(block.norm3(want), context).float()
        h = block.norm2(want) * (1 + per_frame(scale_ff)) + per_frame(shift_ff)
        want = want + block.ffn(h).float() * per_frame(gate_ff)
        got = block(x, e, context, rope)
    assert want.abs().max() > 1 and (got - want).abs().max() < 1e-5


@pytest.mark.slow
def test_compiled_lora_step_under_an_activation_budget_saves_less_for_the_same_gradients():
    # bench.py --act_budget (selective activation checkpointing of the compiled blocks): the
    # partitioner recomputes the cheapest activations in the backward; the maths stays the same
    cfg = WanConfig.tiny(dim=64, num_layers=2, num_heads=2, ffn_dim=128)
    net = randomize(WanDiT(cfg, state_cond=True), std=0.1)
    add_lora(net, 4, 4)
    g = torch.Generator().manual_seed(0)
    x, noise = (torch.randn(2, cfg.in_dim, 6, 8, 8, generator=g) for _ in range(2))
    states, context = torch.randn(2, 21, cfg.state_dim, generator=g), torch.randn(1, 8, cfg.text_dim, generator=g)
    sigma, drop = torch.rand(2, generator=g), torch.zeros(2, dtype=torch.bool)
    trained = [p for p in net.parameters() if p.requires_grad]

    def loss_grads_and_saved_bytes():
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = flow_matching_loss(net, x, states, context, sigma, noise, drop)
        return loss, torch.autograd.grad(loss, trained), sum(saved)

    want, want_grads, _ = loss_grads_and_saved_bytes()
    net.compile_blocks(dynamic=False)
    saved = {}
    for budget in (1.0, 0.5):
        torch._dynamo.reset()
        with torch._functorch.config.patch(activation_memory_budget=budget):
            got, got_grads, saved[budget] = loss_grads_and_saved_bytes()
        torch.testing.assert_close(got, want)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert saved[0.5] < 0.75 * saved[1.0], saved
    torch._dynamo.reset()


def test_a_model_without_state_dropout_has_no_no_state_embedding():
    cfg = WanConfig.tiny(null_state=False)
    net = randomize(WanDiT(cfg))
    assert 'state_embedder.null' not in net.state_dict()
    assert 'state_embedder.null' in WanDiT(WanConfig.tiny()).state_dict()
    x, t_BL, context, states = inputs(cfg)
    with torch.no_grad():
        assert torch.isfinite(net(x, t_BL, context, states)).all()
        with pytest.raises(ValueError, match='has no no-state embedding .*give it the states, and drop_states=None'):
            net(x, t_BL, context)
        with pytest.raises(ValueError, match='has no no-state embedding'):
            net(x, t_BL, context, states, torch.tensor([False, False]))


def test_the_team_embedder_has_256_parameters_more_with_the_no_state_token():
    # preset paper (the team's embedder, full size, state dropout 0) against paper_cfg (state dropout 0.1)
    counts = {}
    for null_state in (False, True):
        with torch.device('meta'):
            net = WanDiT(WanConfig(state_embedder='team', null_state=null_state))
        counts[null_state] = sum(p.numel() for n, p in net.named_parameters() if n.startswith('state_embedder.'))
    assert counts == {False: 67_903_232, True: 67_903_488}


# ===============================================================================================
# flow_matching.py: Wan's schedule, the loss, the samplers
# ===============================================================================================


# DiffSynth-Studio 2.1.12 (pip package diffsynth), FlowMatchScheduler('Wan'), set_timesteps(1000, training=True,
# shift=5), then training_weight(torch.tensor(t)) for these timesteps t: its own numbers, copied here
DIFFSYNTH_WAN_WEIGHTS = {999.0: 0.006427387241274118, 990.0: 0.06389988213777542, 950.0: 0.31837648153305054,
                         900.0: 0.6309027671813965, 800.0: 1.2086209058761597, 700.0: 1.6713616847991943,
                         500.0: 2.0764002799987793, 300.0: 1.6712682247161865, 100.0: 0.6380054950714111,
                         20.0: 0.12594835460186005, 5.0: 0.031879011541604996}


WAN_TINY = dict(dim=32, num_layers=1, num_heads=2, ffn_dim=64)


def tiny_wan_model(seed=0):
    net = build_model(model='tiny', pretrained='', train_mode='full', lora_rank=32, lora_alpha=32, init_seed=seed,
                      device='cpu', dtype=torch.float32, tiny=WAN_TINY)
    torch.nn.init.normal_(net.head.head.weight, std=0.02)   # the zero-init head would output 0 everywhere
    return net


def test_diffsynth_loss_weight_is_diffsynths_own():
    t = torch.tensor(list(DIFFSYNTH_WAN_WEIGHTS))
    assert diffsynth_weight(t / 1000, shift=5.0).tolist() == pytest.approx(list(DIFFSYNTH_WAN_WEIGHTS.values()),
                                                                            rel=1e-6)


def test_weighted_loss_is_the_weighted_mean_of_per_sample_errors():
    net = tiny_wan_model()
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 2, 48, 6, 8, 8, generator=g)
    states, sigma, drop = torch.randn(2, 21, 25, generator=g), torch.tensor([0.3, 0.9]), torch.tensor([False, False])
    ctx = text_context(net.cfg, 'zeros', 'cpu')
    loss = lambda **kw: flow_matching_loss(net, z0, states, ctx, sigma, noise, drop, **kw).item()
    plain = loss()
    assert loss(weight_B=torch.ones(2)) == pytest.approx(plain, rel=1e-6)
    first, second = loss(weight_B=torch.tensor([2.0, 0.0])), loss(weight_B=torch.tensor([0.0, 2.0]))
    assert first + second == pytest.approx(2 * plain, rel=1e-6) and first != pytest.approx(second)


def test_shifted_sigma_matches_wan():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_sigma(u, 5.0), torch.tensor([0.0, 1.25 / 2.0, 2.5 / 3.0, 1.0]))
    assert torch.equal(shift_sigma(u, 1.0), u)


def test_euler_sampler_steps_down_wans_reference_sigmas_to_zero():
    # Wan 2.2 (get_sampling_sigmas) and DiffSynth: sigmas = shift(linspace(1, 0, N + 1)[:N]), then 0
    sigmas = reference_sigmas(20, 5.0)
    u = np.linspace(1, 0, 21)[:20]
    assert np.allclose(sigmas.numpy(), np.append(5 * u / (1 + 4 * u), 0.0), atol=1e-12)
    assert sigmas[0] == 1.0 and sigmas[-2].item() == pytest.approx(0.25 / 1.2) and sigmas[-1] == 0   # 0.208, not 0.024
    seen = []

    def constant(x, t_BF, *args):   # v = 1 everywhere: Euler from s = 1 to 0 moves each latent by -1
        seen.append(t_BF[0, -1].item())
        return torch.ones_like(x)
    noise = torch.randn(1, 48, 6, 4, 4)
    z = sample_latents(constant, torch.zeros(1, 48, 2, 4, 4), torch.zeros(1, 21, 25), None, noise, steps=20, shift=5.0)
    assert np.allclose(seen, 1000 * sigmas[:-1].numpy(), rtol=1e-6)      # t = 1000 sigma, as Wan's timesteps
    assert torch.allclose(z[:, :, 2:], noise[:, :, 2:] - 1, atol=1e-5) and torch.equal(z[:, :, :2], torch.zeros(1, 48, 2, 4, 4))


def test_loss_is_the_velocity_error_of_the_generated_latents_only():
    net = tiny_wan_model()
    z0 = torch.randn(3, 48, 6, 8, 8)
    states = torch.randn(3, 21, 25)
    sigma, noise, drop = sample_draws(0, 0, [0, 1, 2], z0.shape[1:], 3.0, 0.0)
    ctx = text_context(net.cfg, 'zeros', 'cpu')
    seen = {}

    def oracle(x_t, t_BF, context, states_BTD, drop_B):   # predicts noise - x0 exactly, garbage on context
        seen.update(x_t=x_t, t_BF=t_BF)
        v = noise - z0
        v[:, :, :2] = 1e6
        return v
    assert flow_matching_loss(oracle, z0, states, ctx, sigma, noise, drop).item() == 0.0
    assert torch.equal(seen['x_t'][:, :, :2], z0[:, :, :2])              # context enters clean ...
    assert torch.all(seen['t_BF'][:, :2] == 0)                           # ... at timestep 0
    assert torch.allclose(seen['t_BF'][:, 2:], 1000 * sigma[:, None].expand(3, 4))
    # the real model: changing its output on the context latents leaves the loss unchanged
    base = flow_matching_loss(net, z0, states, ctx, sigma, noise, drop)

    def perturbed(*args):
        v = net(*args)
        return torch.cat([v[:, :, :2] + 100.0, v[:, :, 2:]], dim=2)
    assert flow_matching_loss(perturbed, z0, states, ctx, sigma, noise, drop).item() == base.item()


@pytest.mark.parametrize('scheduler,cfg_scale', [('euler', 1.0), ('unipc', 1.5)])
def test_sampling_keeps_context_latents_bit_identical(scheduler, cfg_scale):
    net = tiny_wan_model()
    g = torch.Generator().manual_seed(0)
    z_ctx = torch.randn(2, 48, 2, 8, 8, generator=g)
    noise = torch.randn(2, 48, 6, 8, 8, generator=g)
    inputs = []

    def recording(x, *args):
        inputs.append(x.clone())
        return net(x, *args)
    recording.cfg = net.cfg
    z = sample_latents(recording, z_ctx, torch.randn(2, 21, 25, generator=g), text_context(net.cfg, 'zeros', 'cpu'),
                       noise, steps=4, cfg_scale=cfg_scale, shift=3.0, scheduler=scheduler)
    assert len(inputs) == 4 and inputs[0].shape[0] == (4 if cfg_scale != 1.0 else 2)   # CFG: one batch of 2B
    for x in [*inputs, z]:
        assert torch.equal(x[:2, :, :2], z_ctx)
    assert (z[:, :, 2:] - noise[:, :, 2:]).abs().mean() > 0.01   # the other latents moved


def test_sampling_without_states_uses_the_no_state_embedding_whatever_the_states():
    net = tiny_wan_model()
    with torch.no_grad():
        net.state_embedder.mlp_out[2].weight.normal_(std=0.5)   # zero-initialised: make the states matter
    g = torch.Generator().manual_seed(0)
    z_ctx, noise = torch.randn(2, 48, 2, 8, 8, generator=g), torch.randn(2, 48, 6, 8, 8, generator=g)
    states_a, states_b = torch.randn(2, 2, 21, 25, generator=g)
    run = lambda states, **kw: sample_latents(net, z_ctx, states, text_context(net.cfg, 'zeros', 'cpu'), noise,
                                              steps=3, shift=3.0, **kw)
    assert torch.equal(run(states_a, no_states=True), run(states_b, no_states=True))   # the states are not read
    assert not torch.allclose(run(states_a), run(states_b))                            # ... but they matter
    assert not torch.allclose(run(states_a, no_states=True), run(states_a))
    with pytest.raises(ValueError, match='nothing to guide'):
        run(states_a, no_states=True, cfg_scale=2.0)


def test_sampling_a_model_without_the_no_state_token_needs_the_states():
    net = build_model(model='tiny', pretrained='', train_mode='full', lora_rank=4, lora_alpha=4, init_seed=0,
                      device='cpu', dtype=torch.float32, tiny=WAN_TINY, null_state=False)
    assert net.state_embedder.null is None
    g = torch.Generator().manual_seed(0)
    z_ctx, noise = torch.randn(2, 48, 2, 8, 8, generator=g), torch.randn(2, 48, 6, 8, 8, generator=g)
    states = torch.randn(2, 21, 25, generator=g)
    run = lambda **kw: sample_latents(net, z_ctx, states, text_context(net.cfg, 'zeros', 'cpu'), noise,
                                      steps=2, shift=3.0, **kw)
    assert torch.isfinite(run()).all()
    for kw in (dict(no_states=True), dict(cfg_scale=2.0)):
        with pytest.raises(ValueError, match='has no no-state embedding'):
            run(**kw)


def test_loss_and_samplers_give_a_model_without_states_no_states(tmp_path):
    torch.manual_seed(0)
    net = randomize(WanDiT(WanConfig.tiny(**WAN_TINY), state_cond=False))
    x, t_BL, context, states = inputs(net.cfg)
    sigma, noise = torch.tensor([0.3, 0.8]), torch.randn_like(x)
    loss = flow_matching_loss(net, x, states, context, sigma, noise, torch.tensor([True, False]))
    assert torch.equal(loss, flow_matching_loss(net, x, None, context, sigma, noise, None))
    z = sample_latents(net, x[:, :, :1], states, context, noise, steps=2, shift=5.0)
    assert torch.equal(z, sample_latents(net, x[:, :, :1], None, context, noise, steps=2, shift=5.0))
    with pytest.raises(ValueError, match='without state conditioning'):
        sample_latents(net, x[:, :, :1], None, context, noise, steps=2, shift=5.0, cfg_scale=2.0)
    frames = torch.randint(0, 256, (data.NUM_CONTEXT_FRAMES, 32, 32, 3), dtype=torch.uint8)   # the context alone
    _, mean = predict_frame77(net, PixelCodec(), frames, None, context[:1], ensemble=2, steps=1, shift=5.0,
                              noise_seed=0)
    assert mean.shape == (32, 32, 3)


# ===============================================================================================
# train_sampling.py: the sampling trainer, run as a user runs it
# ===============================================================================================


@pytest.fixture(scope='module')
def raw_data(tmp_path_factory):
    """A small raw_data raw dataset in the 1X layout, with its training latents encoded."""
    root = tmp_path_factory.mktemp('sampling_data')
    synthetic_video.write_synthetic_raw(root / 'train_v2.0_raw', num_shards=2, frames_per_shard=1500, size=SIZE, seed=0)
    synthetic_video.write_synthetic_raw(root / 'val_v2.0_raw', num_shards=1, frames_per_shard=1200, size=SIZE, seed=1, flat=True)
    latents.encode_raw_split(root / 'train_v2.0_raw', root / 'latents_pixel' / 'train_v2.0_raw', PixelCodec(), stride=8)
    return root


def write_official_checkpoint(model, root, n_shards=2):
    """The layout of Wan-AI/Wan2.2-TI2V-5B: config.json, index json, sharded safetensors."""
    from safetensors.torch import save_file
    cfg = model.cfg
    root.mkdir(parents=True, exist_ok=True)
    (root / 'config.json').write_text(json.dumps(dict(
        _class_name='WanModel', model_type='ti2v', dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, in_dim=cfg.in_dim, out_dim=cfg.out_dim, text_len=cfg.text_len, eps=cfg.eps,
        freq_dim=cfg.freq_dim, text_dim=cfg.text_dim)))
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith('state_embedder.')}
    keys = sorted(sd)
    weight_map = {}
    for i in range(n_shards):
        name = f'diffusion_pytorch_model-{i + 1:05d}-of-{n_shards:05d}.safetensors'
        part = keys[i::n_shards]
        save_file({k: sd[k] for k in part}, str(root / name))
        weight_map.update({k: name for k in part})
    (root / 'diffusion_pytorch_model.safetensors.index.json').write_text(json.dumps(
        {'metadata': {'total_size': 0}, 'weight_map': weight_map}))
    return root


def random_lora(cfg, rank=4, seed=5):
    """{module: (A [r, in], B [out, r])} on every LoRA target of every block, official names."""
    g = torch.Generator().manual_seed(seed)
    model = WanDiT(cfg, state_cond=False)
    out = {}
    for i in range(cfg.num_layers):
        for t in LORA_TARGETS:
            lin = model.blocks[i].get_submodule(t)
            out[f'blocks.{i}.{t}'] = (torch.randn(rank, lin.in_features, generator=g) * 0.1,
                                      torch.randn(lin.out_features, rank, generator=g) * 0.1)
    return out


VAL = ['--eval_clips=1', '--eval_ensemble=2', '--eval_steps=2']


def train_args(raw_data, out, *extra):
    return ['train_sampling.py', f'--data_dir={raw_data}', '--make_synthetic=False', f'--out_dir={out}',
            *(f'--{k}={v}' for k, v in WAN_TINY.items()), '--batch_size=2', '--global_batch_size=8',
            '--log_interval=1', *VAL, *extra]


def trained(out):
    return torch.load(Path(out) / 'ckpt.pt', weights_only=False)


@pytest.fixture(scope='module')
def straight_run(raw_data, tmp_path_factory):
    """4 uninterrupted steps in one process: the reference for the DDP and resume tests."""
    out = tmp_path_factory.mktemp('straight')
    run_script(*train_args(raw_data, out, '--max_iters=4'))
    return trained(out)


@pytest.fixture(scope='module')
def one_step_run(raw_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('one_step')
    run_script(*train_args(raw_data, out, '--max_iters=1'))
    return out


def weights_finite(path):
    return all(torch.isfinite(t).all() for t in torch.load(path, weights_only=True)['trainable'].values())


def save_lora(path, lora, naming, metadata=None):
    """The same adapters under diffusers' current (PEFT) or legacy key names."""
    from safetensors.torch import save_file
    part = {'peft': ('lora_A', 'lora_B'), 'legacy': ('lora.down', 'lora.up')}[naming]
    sd = {f'transformer.{k}': v.contiguous() for k, v in to_diffusers_state_dict(
        {f'{n}.{p}.weight': w for n, (A, B) in lora.items() for p, w in zip(part, (A, B))}).items()}
    save_file(sd, str(path), metadata=metadata)
    return path


def step_lines(printed):
    """The step numbers of the printed `step N: ...` lines, in order."""
    return [int(n) for n in re.findall(r'^step (\d+):', printed, re.M)]


def lora_file(path, rank=4):
    """A LoRA of the tiny run's model (PEFT naming, alpha = rank: B @ A is the whole update)."""
    lora = random_lora(WanConfig.tiny(**WAN_TINY), rank=rank)
    return save_lora(path, lora, 'peft'), lora


@pytest.fixture(scope='module')
def lora_run(raw_data, tmp_path_factory):
    """3 steps of a LoRA run started from a LoRA file, validated and saved at every step, logged to
    TensorBoard. A random base's zero-initialised head passes no gradient, so the adapters stay
    exactly the file's: what --init_lora loaded is what the checkpoint holds."""
    tmp = tmp_path_factory.mktemp('lora_run')
    path, lora = lora_file(tmp / 'start.safetensors')
    out = tmp / 'run'
    printed = run_script(*train_args(raw_data, out, '--train_mode=lora', '--lora_rank=4', '--lora_alpha=4',
                                     f'--init_lora={path}', '--max_iters=3', '--eval_interval=1', '--ckpt_interval=1',
                                     '--keep_last=2', '--log_with=tensorboard'))
    return dict(out=out, printed=printed, lora=lora)


@pytest.mark.slow
def test_train_sampling_refuses_data_on_disk_that_its_flags_do_not_describe(raw_data, tmp_path):
    def fails(*args):
        return run_script('train_sampling.py', *args, f'--out_dir={tmp_path}', cwd=tmp_path, fails=True)
    # latents encoded with stride 8 (the fixture) asked for with stride 77
    assert 'encoded with stride 8: pass --clip_stride=8' in fails(f'--data_dir={raw_data}', '--make_synthetic=False',
                                                                  '--clip_stride=77')
    # a synthetic set written with other settings
    demo = tmp_path / 'demo'
    (demo / 'train_v2.0_raw').mkdir(parents=True)
    (demo / 'train_v2.0_raw' / 'metadata.json').write_text('{}')
    (demo / 'synthetic.json').write_text(json.dumps(dict(train_shards=2, frames=1500, val_frames=1200, size=32, seed=0,
                                                         look=synthetic_video.SYNTHETIC_LOOK)))
    assert ("holds a synthetic set written with other settings (train_shards=2 on disk, 16 asked for)"
            in fails(f'--data_dir={demo}', '--make_synthetic'))


@pytest.mark.slow
def test_paper_presets_hold_the_submissions_recipes(tmp_path):
    out = run_script('train_sampling.py', '--preset=paper', '--dry_run', cwd=tmp_path)
    for line in ('clip_stride = 8', 'learning_rate = 0.0004', 'weight_decay = 0.01', 'grad_clip = 0.0',
                 'state_dropout = 0.0', 'shift = 5.0', "loss_weighting = 'diffsynth'", 'global_batch_size = 1024',
                 'max_iters = 23000', 'compile = True', 'gradient_checkpointing = 12',
                 "vae = 'wan'", 'LoRA rank 32'):
        assert line in out, (line, out)
    assert ("state embedder 'team': 67,903,232 parameters (67,903,488 with the no-state embedding that "
            "--state_dropout > 0 trains)") in out   # the team's state embedder
    assert 'state_dropout = 0.1' in run_script('train_sampling.py', '--preset=paper_cfg', '--dry_run', cwd=tmp_path)
    assert run_script('train_sampling.py', '--dry_run', cwd=tmp_path).startswith('preset cpu: the default of a plain')
    # a pretrained base reads umT5's empty prompt from its own files unless told otherwise; the demo: zeros
    out = run_script('train_sampling.py', '--pretrained=my/wan', '--dry_run', cwd=tmp_path)
    assert "text_encoder = 'my/wan'" in out
    assert "text_encoder = 'zeros'" in run_script('train_sampling.py', '--dry_run', cwd=tmp_path)
    # torchrun on CUDA GPUs, simulated: torchrun's variables and a torch that reports a GPU
    (tmp_path / 'sitecustomize.py').write_text('import torch\ntorch.cuda.is_available = lambda: True\n')
    env = dict(os.environ, LOCAL_RANK='0', WORLD_SIZE='1', PYTHONPATH=str(tmp_path))
    res = subprocess.run([sys.executable, os.path.join(REPO, 'train_sampling.py'), '--dry_run'], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.stdout.startswith('preset paper: launched by torchrun on CUDA GPUs') and 'max_iters = 23000' in res.stdout


@pytest.mark.slow
def test_ddp_two_processes_equals_single_process(raw_data, straight_run, tmp_path):
    out = run_script(*train_args(raw_data, tmp_path, '--max_iters=4'), nproc=2)
    assert '2 process(es) x batch 2 x 2 accumulation' in out   # the single process accumulates 4
    two = trained(tmp_path)
    init = build_model(model='tiny', pretrained='', train_mode='full', lora_rank=32, lora_alpha=32, init_seed=0,
                       device='cpu', dtype=torch.float32, tiny=WAN_TINY).state_dict()
    # equal up to float summation order; AdamW turns the ~1e-9 gradient noise of weights whose true
    # gradient is 0 (cross-attention key biases) into updates of ~1e-6, hence atol 1e-5 (lr 1e-3 x 4 steps)
    for n, p in straight_run['trainable'].items():
        assert torch.allclose(p, two['trainable'][n], atol=1e-5, rtol=1e-4), n
    assert max((p - init[n]).abs().max().item() for n, p in straight_run['trainable'].items()) > 1e-4   # it trained


@pytest.mark.slow
def test_resume_equals_no_stop(raw_data, straight_run, tmp_path):
    run_script(*train_args(raw_data, tmp_path, '--max_iters=2'))
    run_script(*train_args(raw_data, tmp_path, '--max_iters=4', '--init_from=resume'))
    a, b = straight_run, trained(tmp_path)
    assert a['step'] == b['step'] == 4
    for n, p in a['trainable'].items():
        assert torch.equal(p, b['trainable'][n]), n
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert torch.equal(sa['exp_avg'], sb['exp_avg']) and torch.equal(sa['exp_avg_sq'], sb['exp_avg_sq'])


@pytest.mark.slow
def test_sample_py_scores_a_lora_run_as_its_validation_did(raw_data, tmp_path):
    # the paper's mode through both scripts: a base in the official layout, frozen; LoRA and state
    # conditioning trained; sample.py keeps the adapters unmerged, so on the same clip and noise it
    # predicts exactly what the run's validation predicted
    base = write_official_checkpoint(randomize(WanDiT(WanConfig.tiny(**WAN_TINY), state_cond=False), std=0.1),
                                     tmp_path / 'base')
    # the text context comes from the pretrained folder unless given; this tiny base has no umT5: said at once
    err = run_script(*train_args(raw_data, tmp_path / 'no_umt5', '--max_iters=2', f'--pretrained={base}',
                                 '--train_mode=lora', '--lora_rank=4'), fails=True)
    assert f'--text_encoder={base}: ' in err and 'or --text_encoder=zeros' in err and 'Traceback' not in err
    run_script(*train_args(raw_data, tmp_path, '--max_iters=2', f'--pretrained={base}', '--train_mode=lora',
                           '--lora_rank=4', '--text_encoder=zeros', '--seed=3'))
    trainable = trained(tmp_path)['trainable']
    assert trainable and all('.lora_' in n or n.startswith('state_embedder.') for n in trainable)
    assert any(n.endswith('lora_B.weight') and p.abs().max() > 0 for n, p in trainable.items())   # B left 0
    out = run_script('sample.py', f'--out_dir={tmp_path}', '--ensemble=2', '--steps=2', '--max_clips=1')
    assert 'lora' in out
    with open(tmp_path / 'samples' / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and all(math.isfinite(float(v)) for k, v in rows[0].items() if k.startswith('psnr'))
    # the same clip, steps and noise (sample.py's default seed is the run's, 3 here)
    val = [r for r in run_dir.read_log(str(tmp_path)) if 'val_psnr_ensemble' in r][-1]
    assert float(rows[0]['psnr_ensemble_2']) == round(val['val_psnr_ensemble'], 4)
    assert float(rows[0]['psnr_single']) == round(val['val_psnr_single'], 4)


@pytest.mark.slow
def test_a_nan_loss_stops_every_sampling_rank_at_the_last_good_checkpoint(raw_data, tmp_path):
    run_script(*train_args(raw_data, tmp_path, '--max_iters=1'))
    err = run_script(*train_args(raw_data, tmp_path, '--max_iters=30', '--overwrite', '--learning_rate=1e6',
                                 '--ckpt_interval=1', '--eval_interval=100'), nproc=2, fails=True)
    assert re.search(r'step \d+: the training loss is (nan|inf): stopping', err), err[-2000:]
    assert weights_finite(tmp_path / 'ckpt.pt') and weights_finite(tmp_path / 'ckpt_prev.pt')


@pytest.mark.slow
def test_sampling_nan_in_states_or_samples_names_the_file_the_row_or_the_clip(raw_data, one_step_run, tmp_path):
    bad = tmp_path / 'data'
    shutil.copytree(raw_data, bad)
    states = np.fromfile(bad / 'val_v2.0_raw' / 'states_0.bin', np.float32).reshape(-1, 25)
    states[100, 3] = np.nan
    states.tofile(bad / 'val_v2.0_raw' / 'states_0.bin')
    message = r'val_v2.0_raw/states_0.bin: robot states hold nan at row \(frame\) 100, column 3'
    err = run_script(*train_args(bad, tmp_path / 'run', '--max_iters=1'), fails=True)
    assert re.search(message, err) and not (tmp_path / 'run' / 'ckpt.pt').exists(), err[-2000:]
    assert re.search(message, run_script('sample.py', f'--out_dir={one_step_run}', f'--split={bad}/val_v2.0_raw',
                                         f'--results_dir={tmp_path}/res', fails=True))
    # weights that give NaN: an error, never a `nan` in the table
    state = torch.load(one_step_run / 'ckpt.pt', weights_only=True)
    state['trainable']['head.head.weight'][:] = 3e38   # finite weights whose output overflows
    (tmp_path / 'nan_run').mkdir()
    torch.save(state, tmp_path / 'nan_run' / 'ckpt.pt')
    err = run_script('sample.py', f'--out_dir={tmp_path}/nan_run', '--max_clips=1', '--ensemble=2', '--steps=2',
                     fails=True)
    assert 'clip 0 (shard 0, frame' in err and 'non-finite latent values' in err
    # a damaged video after good ones: named, and metrics.csv keeps the scores of the clips before it
    two = tmp_path / 'two_shards'
    shutil.copytree(raw_data / 'val_v2.0_raw', two)
    for name in ('metadata_{}.json', 'states_{}.bin', 'segment_idx_{}.bin'):
        shutil.copy(two / name.format(0), two / name.format(1))
    meta = json.loads((two / 'metadata.json').read_text())
    (two / 'metadata.json').write_text(json.dumps(dict(meta, num_shards=2, num_images=2 * meta['num_images'])))
    video = (two / 'video_0.mp4').read_bytes()
    (two / 'video_1.mp4').write_bytes(video[:len(video) * 6 // 10])
    meta1 = two / 'metadata_1.json'   # no sha256 (as the 1X data): the damage is found when the clip is decoded
    meta1.write_text(json.dumps({k: v for k, v in json.loads(meta1.read_text()).items() if k != 'sha256'}))
    n = len(data.RawClips(str(raw_data / 'val_v2.0_raw')))   # the good clips, all of shard 0
    err = run_script('sample.py', f'--out_dir={one_step_run}', f'--split={two}', f'--results_dir={tmp_path}/res2',
                     f'--max_clips={n + 1}', '--ensemble=2', '--steps=2', '--ablation=False', '--counterfactual=False',
                     '--lpips_fid=False', '--gif=False', fails=True)
    assert f'clip {n}: {two}/video_1.mp4' in err
    assert f"metrics.partial.csv holds the scores of this run's {n} clip(s) so far" in err
    assert not (tmp_path / 'res2' / 'metrics.csv').exists()   # no result until every clip is scored
    with open(tmp_path / 'res2' / 'metrics.partial.csv') as f:
        assert [int(r['clip']) for r in csv.DictReader(f)] == list(range(n))


@pytest.mark.slow
def test_sampling_refuses_bad_starts_before_any_work(raw_data, one_step_run, tmp_path):
    import socket
    before = (one_step_run / 'ckpt.pt').read_bytes()
    for args, message in (([], 'already exists. To continue that run pass --init_from=resume'),
                          (['--init_from=Resume'], "--init_from='Resume' is not one of 'scratch', 'resume'"),
                          (['--preset=gpu'], "--preset='gpu' is not one of 'cpu', 'paper', 'paper_cfg'"),
                          (['--vae=wan2'], "--vae='wan2' is not one of 'pixel', 'wan'"),
                          (['--batch_size=0'], '--batch_size=0 must be positive'),
                          (['--eval_ensemble=0'], '--eval_ensemble=0 must be positive'),
                          (['--state_dropout=1.5'], '--state_dropout=1.5 must lie in [0, 1]')):
        assert message in run_script(*train_args(raw_data, one_step_run, '--max_iters=2', *args), fails=True)
    for args, message in ((['--ensemble=0'], '--ensemble=0 must be positive'), (['--steps=0'], '--steps=0 must be'),
                          (['--scheduler=ddim'], "--scheduler='ddim' is not one of 'euler', 'unipc'")):
        assert message in run_script('sample.py', f'--out_dir={one_step_run}', *args, fails=True)
    (one_step_run / 'run.lock').write_text(json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), started='now')))
    try:
        assert 'is in use by another run' in run_script(*train_args(raw_data, one_step_run, '--max_iters=2',
                                                                    '--init_from=resume'), fails=True)
    finally:
        (one_step_run / 'run.lock').unlink()
    assert (one_step_run / 'ckpt.pt').read_bytes() == before
    (tmp_path / 'file').write_text('')
    assert 'is not writable' in run_script(*train_args(raw_data, tmp_path / 'file' / 'run', '--max_iters=1'), fails=True)


@pytest.mark.slow
def test_sampling_resume_says_it_takes_the_learning_rate_given_now(raw_data, one_step_run, tmp_path):
    shutil.copytree(one_step_run, tmp_path / 'run')
    said = run_script(*train_args(raw_data, tmp_path / 'run', '--max_iters=2', '--init_from=resume',
                                  '--learning_rate=5e-4', '--weight_decay=0.02'))
    assert "resuming with --learning_rate=0.0005 (the checkpoint's: 0.001), --weight_decay=0.02" in said
    (group,) = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['optimizer']['param_groups']
    assert (group['lr'], group['weight_decay']) == (5e-4, 0.02)


@pytest.mark.slow
def test_sampling_loads_only_plain_checkpoints_of_its_own_track(raw_data, one_step_run, tmp_path):
    assert 'dim=32 in the checkpoint, 64 now' in run_script(
        *train_args(raw_data, one_step_run, '--max_iters=2', '--init_from=resume', '--dim=64'), fails=True)
    marker = tmp_path / 'pwned.txt'
    for name, state, message in (('evil', dict(kind='sampling', step=1, config={}, evil=_Payload(str(marker))),
                                  'refusing to load it'),
                                 ('compression', dict(kind='compression', step=1, config={}),
                                  'not a sampling-track checkpoint')):
        (tmp_path / name).mkdir()
        torch.save(state, tmp_path / name / 'ckpt.pt')
        assert message in run_script('sample.py', f'--out_dir={tmp_path / name}', fails=True)
        assert message in run_script(*train_args(raw_data, tmp_path / name, '--max_iters=2', '--init_from=resume'),
                                     fails=True)
    assert not marker.exists()


@pytest.mark.slow
def test_sampling_touches_only_the_data_it_is_asked_to_write(raw_data, one_step_run, tmp_path):
    # a mistyped --data_dir is an error, not a fresh synthetic set
    err = run_script('train_sampling.py', f'--data_dir={tmp_path}/dta', f'--out_dir={tmp_path}/run', fails=True)
    assert 'holds no whole train_v2.0_raw, val_v2.0_raw (a mistyped --data_dir?)' in err
    assert not (tmp_path / 'dta').exists()
    # an interrupted raw_data write (a split half written, no synthetic.json) is written again, not reused
    small = dict(train_shards=1, frames=200, size=SIZE, seed=0)
    synthetic_video.write_synthetic_raw_set(tmp_path / 'syn', **small)
    video = tmp_path / 'syn' / 'val_v2.0_raw' / 'video_0.mp4'
    good = video.read_bytes()
    (tmp_path / 'syn' / 'synthetic.json').unlink()
    video.write_bytes(good[:48])
    (tmp_path / 'syn' / 'train_v2.0_raw.partial').mkdir()
    assert synthetic_video.write_synthetic_raw_set(tmp_path / 'syn', **small)
    assert video.read_bytes() == good and not (tmp_path / 'syn' / 'train_v2.0_raw.partial').exists()
    with pytest.raises(SystemExit, match=r'other settings \(size=32 on disk, 64 asked for\)'):
        synthetic_video.write_synthetic_raw_set(tmp_path / 'syn', **{**small, 'size': 64})
    # a damaged mp4, frames of another size, a truncated metadata file: errors that name the file
    with pytest.raises(ValueError, match=r'video_0.mp4: frames are 32x32, expected 64x64'):
        data.RawShard(tmp_path / 'syn' / 'val_v2.0_raw', 0, frame_size=(64, 64)).read_frames(0, 1)
    video.write_bytes(good[:48])
    with pytest.raises(ValueError, match=r"video_0.mp4: not the bytes its metadata's sha256 names"):
        data.RawShard(tmp_path / 'syn' / 'val_v2.0_raw', 0)
    err = run_script('sample.py', f'--out_dir={one_step_run}', f'--split={tmp_path}/syn/val_v2.0_raw', fails=True)
    assert "video_0.mp4: not the bytes its metadata's sha256 names" in err
    (tmp_path / 'syn' / 'val_v2.0_raw' / 'metadata_0.json').write_text('{"shard_num_fr')
    with pytest.raises(ValueError, match='metadata_0.json is not valid JSON'):
        data.RawShard(tmp_path / 'syn' / 'val_v2.0_raw', 0)


@pytest.mark.slow
def test_sampling_runs_from_an_empty_folder_on_two_ranks_to_a_validated_log(raw_data, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'empty_cache'))
    args = ['train_sampling.py', '--data_dir', str(tmp_path / 'data'), '--out_dir', str(tmp_path / 'run'), '--download',
            '--clip_stride', '77', '--max_iters', '2', '--eval_interval', '1', '--batch_size=2', '--global_batch_size=4',
            '--dim=32', '--num_layers=1', '--num_heads=2', '--ffn_dim=64', *VAL]
    err = run_script(*args, fails=True)
    assert 'could not fetch train_v2.0_raw/metadata.json' in err and 'python -m machinery.prepare download_raw --out DIR' in err
    for key, value in fake_hub(tmp_path / 'hub', raw_data, data.HF_REPO_RAW, ('train_v2.0_raw', 'val_v2.0_raw')).items():
        monkeypatch.setenv(key, value)
    out = run_script(*args, '--train_splits=train_v2.0_raw,val_v2.0_raw', nproc=2)
    video = tmp_path / 'data' / 'train_v2.0_raw' / 'videos' / 'video_1.mp4'
    assert video.read_bytes() == (raw_data / 'train_v2.0_raw' / 'videos' / 'video_1.mp4').read_bytes()
    n_train, n_val = (len(data.RawClips(raw_data / s, stride=77)) for s in ('train_v2.0_raw', 'val_v2.0_raw'))
    assert f'{n_train + n_val} training clips (train_v2.0_raw, val_v2.0_raw' in out and 'not a held-out number' in out
    log = run_dir.read_log(str(tmp_path / 'run'))
    assert [r['step'] for r in log] == [1, 2]
    assert all(math.isfinite(r[k]) for r in log for k in ('loss', 'val_psnr_single', 'val_psnr_ensemble'))
    for path in ('val/step_0000001/clip_0.png', 'val/step_0000002/clip_0.png', 'curves.png', 'ckpt_best.pt', 'log.jsonl'):
        assert (tmp_path / 'run' / path).exists(), path


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['truncated', 'resized'])
def test_sampling_reports_a_damaged_val_video_before_the_first_step(raw_data, tmp_path, damage):
    data_dir = tmp_path / 'data'
    shutil.copytree(raw_data, data_dir, ignore=shutil.ignore_patterns('val_v2.0_raw'))
    if damage == 'truncated':
        shutil.copytree(raw_data / 'val_v2.0_raw', data_dir / 'val_v2.0_raw')
        video = data_dir / 'val_v2.0_raw' / 'video_0.mp4'
        video.write_bytes(video.read_bytes()[:len(video.read_bytes()) // 20])
        said = r"video_0.mp4: not the bytes its metadata's sha256 names"
    else:
        synthetic_video.write_synthetic_raw(data_dir / 'val_v2.0_raw', 1, 200, 2 * SIZE, seed=1, flat=True)
        said = rf'video_0.mp4: frames are {2 * SIZE}x{2 * SIZE}, expected {SIZE}x{SIZE}'
    err = run_script(*train_args(data_dir, tmp_path / 'run', '--max_iters=2'), cwd=tmp_path, fails=True)
    assert re.search('the validation split: .*' + said, err), err[-2000:]
    assert not (tmp_path / 'run' / 'log.jsonl').exists()


@pytest.mark.slow
def test_a_run_started_from_a_lora_file_holds_its_update(lora_run):
    assert 'started from' in lora_run['printed'] and 'its adapters' in lora_run['printed']
    trainable = torch.load(lora_run['out'] / 'ckpt.pt', weights_only=True)['trainable']
    for name, (A, B) in lora_run['lora'].items():   # alpha = rank: scale 1
        update = trainable[f'{name}.lora_B.weight'] @ trainable[f'{name}.lora_A.weight']
        torch.testing.assert_close(update, B @ A, rtol=0, atol=1e-6)
    exported = load_file(str(lora_run['out'] / 'lora.safetensors'))   # and the run's export passes it on
    A, B = lora_run['lora']['blocks.0.self_attn.q']
    key = 'diffusion_model.blocks.0.self_attn.q.lora_{}.weight'
    torch.testing.assert_close(exported[key.format('B')] @ exported[key.format('A')], B @ A, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_keep_last_keeps_the_newest_step_numbered_exports(lora_run):
    names = sorted(p.name for p in lora_run['out'].glob('*.safetensors'))
    assert names == ['lora.safetensors', 'lora_step0000002.safetensors', 'lora_step0000003.safetensors',
                     'state_embedder.safetensors', 'state_embedder_step0000002.safetensors',
                     'state_embedder_step0000003.safetensors']


@pytest.mark.slow
def test_every_record_numbers_a_step_by_the_optimizer_steps_done(lora_run):
    out, printed = lora_run['out'], lora_run['printed']
    log = read_log(out)
    assert [r['step'] for r in log] == [1, 2, 3]
    assert sorted(os.listdir(out / 'val')) == ['step_0000001', 'step_0000002', 'step_0000003']
    assert step_lines(printed) == [1, 1, 2, 2, 3, 3]   # the loss line, then the val line, of each step
    best = torch.load(out / 'ckpt_best.pt', weights_only=True)
    assert best['metric'] == max(r['val_psnr_ensemble'] for r in log)
    assert best['metric'] == next(r['val_psnr_ensemble'] for r in log if r['step'] == best['step'])
    assert torch.load(out / 'ckpt.pt', weights_only=True)['step'] == log[-1]['step'] == 3


@pytest.mark.slow
def test_a_fully_trained_run_started_from_a_lora_file_has_it_merged_into_its_weights(raw_data, tmp_path):
    from machinery.wan_files import build_model
    path, lora = lora_file(tmp_path / 'start.safetensors')
    run_script(*train_args(raw_data, tmp_path / 'run', f'--init_lora={path}', '--max_iters=1', '--learning_rate=1e-9'))
    base = build_model(model='tiny', pretrained='', train_mode='full', lora_rank=32, lora_alpha=32, init_seed=0,
                       device='cpu', dtype=torch.float32, tiny=WAN_TINY).state_dict()
    trained = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['trainable']
    for name, (A, B) in lora.items():   # one step at lr 1e-9 moves a weight by about 1e-9
        torch.testing.assert_close(trained[f'{name}.weight'], base[f'{name}.weight'] + B @ A, rtol=0, atol=1e-6)
    assert (trained['blocks.0.self_attn.q.weight'] - base['blocks.0.self_attn.q.weight']).abs().max() > 1e-3


@pytest.mark.slow
def test_init_lora_with_a_resume_is_refused_before_any_work(tmp_path):
    err = run_script('train_sampling.py', '--init_from=resume', '--init_lora=x.safetensors',
                     f'--out_dir={tmp_path}/run', cwd=tmp_path, fails=True)
    assert '--init_lora=x.safetensors starts a new run; a resume continues its checkpoint' in err
    assert not (tmp_path / 'run').exists()
    # a file that is not there is named before any download (preset paper would fetch the data and the VAE first)
    err = run_script('train_sampling.py', '--preset=paper', '--init_lora=nope.safetensors', f'--out_dir={tmp_path}/run',
                     cwd=tmp_path, fails=True)
    assert '--init_lora=nope.safetensors: no such file or folder' in err and not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_init_lora_of_another_rank_stops_the_script_with_the_rank_to_pass(raw_data, tmp_path):
    path, _ = lora_file(tmp_path / 'rank4.safetensors', rank=4)
    err = run_script(*train_args(raw_data, tmp_path / 'run', '--train_mode=lora', '--lora_rank=8',
                                 f'--init_lora={path}', '--max_iters=1'), fails=True)
    assert f'--init_lora={path} holds adapters of rank 4, not --lora_rank=8: pass --lora_rank=4' in err


@pytest.mark.slow
def test_train_sampling_names_a_truncated_raw_metadata_json_without_a_traceback(raw_data, tmp_path):
    bad = tmp_path / 'data'
    shutil.copytree(raw_data, bad, ignore=shutil.ignore_patterns('latents_*'))
    meta = bad / 'train_v2.0_raw' / 'metadata.json'
    meta.write_text(meta.read_text()[:20])
    err = run_script(*train_args(bad, tmp_path / 'run', '--max_iters=1'), fails=True)
    assert 'Traceback' not in err and re.search(rf'{meta} is not valid JSON .*truncated or damaged', err), err[-2000:]


@pytest.mark.slow
def test_a_sampling_resume_with_nothing_left_to_train_is_refused(raw_data, one_step_run, tmp_path):
    shutil.copytree(one_step_run, tmp_path / 'run')
    err = run_script(*train_args(raw_data, tmp_path / 'run', '--max_iters=1', '--init_from=resume'), fails=True)
    assert (f"{tmp_path}/run/ckpt.pt is at step 1 already, and this run ends at --max_iters=1: pass a larger "
            f"--max_iters to train on, or evaluate the checkpoint with sample.py") in err and 'Traceback' not in err
    # the spike rule's history travels in the checkpoint of either trainer
    assert torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['guard']['losses'] == [
        r['loss'] for r in run_dir.read_log(str(tmp_path / 'run'))]


@pytest.mark.slow
def test_the_no_state_embedding_is_built_only_where_state_dropout_trains_it(raw_data, tmp_path):
    out = run_script('train_sampling.py', '--preset=paper', '--dry_run', f'--data_dir={tmp_path}/1x', cwd=tmp_path)
    assert ("state embedder 'team': 67,903,232 parameters (67,903,488 with the no-state embedding that "
            "--state_dropout > 0 trains)") in out
    run_script(*train_args(raw_data, tmp_path / 'off', '--max_iters=1', '--state_dropout=0'))
    run_script(*train_args(raw_data, tmp_path / 'on', '--max_iters=1', '--state_dropout=0.5'))
    names = {run: set(trained(tmp_path / run)['trainable']) for run in ('off', 'on')}
    assert names['on'] - names['off'] == {'state_embedder.null'}
    # a resume keeps what its checkpoint has: a trained no-state embedding is never dropped, nor one invented
    said = run_script(*train_args(raw_data, tmp_path / 'on', '--max_iters=2', '--init_from=resume', '--state_dropout=0'))
    assert 'null_state=True' in said and 'state_embedder.null' in trained(tmp_path / 'on')['trainable']
    err = run_script(*train_args(raw_data, tmp_path / 'off', '--max_iters=2', '--init_from=resume',
                                 '--state_dropout=0.1'), fails=True)
    assert ('--state_dropout=0.1 trains the no-state embedding, which' in err and 'resume with --state_dropout=0, '
            'or start a new run' in err and 'Traceback' not in err)


@pytest.mark.slow
def test_a_full_disk_while_writing_validation_pictures_is_a_sentence(raw_data, tmp_path):
    limit = 4000   # ulimit -f: the lock and the log lines fit, a validation PNG does not
    cmd = [sys.executable, *train_args(raw_data, tmp_path / 'run', '--max_iters=1', '--eval_interval=1')]
    cmd[1] = os.path.join(REPO, cmd[1])
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO),
                         timeout=600, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr[-2000:]
    assert re.search(r'could not write .*/run/val/step_0000001/clip_0\.png \(File too large\): free space on its disk',
                     res.stderr), res.stderr[-2000:]
    assert not [n for n in os.listdir(tmp_path / 'run' / 'val' / 'step_0000001') if n.endswith('.tmp')]


@pytest.mark.slow
def test_a_damaged_pretrained_checkpoint_is_a_sentence_naming_the_flag(raw_data, tmp_path):
    base = write_official_checkpoint(WanDiT(WanConfig.tiny(**WAN_TINY), state_cond=False), tmp_path / 'base')
    shard = sorted(base.glob('*.safetensors'))[0]
    shard.write_bytes(shard.read_bytes()[:100])   # a download cut short
    err = run_script(*train_args(raw_data, tmp_path / 'run', '--max_iters=1', f'--pretrained={base}',
                                 '--text_encoder=zeros'), fails=True)
    assert f'--pretrained={base}: {shard}' in err and 'Traceback' not in err, err[-2000:]


@pytest.mark.slow
def test_the_disk_check_counts_the_lora_exports_a_run_makes_not_keep_last(tmp_path):
    out = run_script('train_sampling.py', '--preset=paper_cfg', '--dry_run', '--keep_last=1000000000',
                     f'--data_dir={tmp_path}/1x', cwd=tmp_path)
    assert re.search(r'^disk: checkpoints and LoRA exports [\d.]+ GiB, latents 772\.8 GiB = ', out, re.M), out


@pytest.mark.slow
def test_the_two_stage_demo_trains_lora_and_states_on_a_frozen_base_trained_without_states(raw_data, tmp_path):
    base, lora = tmp_path / 'base', tmp_path / 'lora'
    run_script(*train_args(raw_data, base, '--use_states=False', '--max_iters=2'))
    stage1 = trained(base)
    assert not any(n.startswith('state_embedder.') for n in stage1['trainable'])   # stage 1: no states at all
    base_bytes = (base / 'ckpt.pt').read_bytes()
    # stage 2: its sizes and text context from the base run, LoRA and the state embedder trained on it, frozen
    printed = run_script(*train_without_sizes(raw_data, lora, f'--pretrained={base}', '--train_mode=lora',
                                              '--lora_rank=4', '--max_iters=2', '--eval_interval=2'))
    assert (f"settings taken from --pretrained={base} (not given now): dim=32, num_layers=1, num_heads=2, "
            f"ffn_dim=64, text_encoder='zeros'") in printed
    assert 'on a random base' not in printed and 'validating at step 2: 1 clips' in printed
    assert (lora / 'val' / 'step_0000002' / 'clip_0.png').exists()   # numbered as the LoRA exports
    stage2 = trained(lora)
    assert (base / 'ckpt.pt').read_bytes() == base_bytes
    trainable = stage2['trainable']
    assert all('.lora_' in n or n.startswith('state_embedder.') for n in trainable)   # the base: none of it
    assert any(n.endswith('lora_B.weight') and p.abs().max() > 0 for n, p in trainable.items())   # B left 0
    assert any(n.startswith('state_embedder.') for n in trainable)
    assert all(r['grad_norm'] > 0 for r in read_log(lora))   # the trained base's head passes gradients
    # the model the run trained: stage 1's weights, every one of them, frozen; the adapters and states on top
    model = build_model(model='tiny', pretrained=str(base), train_mode='lora', lora_rank=4, lora_alpha=32, init_seed=0,
                        device='cpu', dtype=torch.float32, tiny=WAN_TINY)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert sorted(frozen) == sorted(stage1['trainable'])
    assert all(torch.equal(p, stage1['trainable'][n]) for n, p in frozen.items())
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(trainable)


@pytest.mark.slow
def test_the_demos_second_stage_names_the_first_when_it_is_missing(tmp_path):
    err = run_script('train_sampling.py', '--preset=cpu_lora', cwd=tmp_path, fails=True)
    assert ('--pretrained=out_sampling_base: no such folder; train it first (the two-stage demo: python '
            'train_sampling.py --preset=cpu_base)') in err and 'Traceback' not in err
    assert not (tmp_path / 'out_sampling_lora').exists()


@pytest.mark.slow
def test_a_resumed_sampling_run_continues_its_demo_data_and_tensorboard(raw_data, tmp_path):
    out = tmp_path / 'run'
    run_script(*train_args(raw_data, out, '--max_iters=2', '--log_with=tensorboard', '--keep_last=1',
                           '--eval_interval=2', '--train_mode=lora', '--lora_rank=4'))
    said = run_script('train_sampling.py', f'--out_dir={out}', '--init_from=resume', '--max_iters=3', cwd=tmp_path)
    line = next(l for l in said.splitlines() if l.startswith('settings taken from'))
    for setting in (f"data_dir='{raw_data}'", "log_with='tensorboard'", 'keep_last=1', 'dim=32', 'lora_rank=4',
                    "train_mode='lora'", 'eval_interval=2', 'batch_size=2'):
        assert setting in line, line
    assert [e.step for e in tensorboard_events(out / 'tensorboard').Scalars('loss')] == [1, 2, 3]
    assert sorted(p.name for p in out.glob('lora_step*')) == ['lora_step0000003.safetensors']   # keep_last=1 still


@pytest.mark.slow
def test_init_lora_takes_its_rank_from_the_file_and_is_checked_before_any_data_work(raw_data, tmp_path):
    path, lora = lora_file(tmp_path / 'rank4.safetensors', rank=4)
    said = run_script(*train_args(raw_data, tmp_path / 'run', '--train_mode=lora', f'--init_lora={path}',
                                  '--max_iters=1'))
    assert f'--init_lora={path}: LoRA rank 4, alpha 4 (the file\'s unless given)' in said
    assert trained(tmp_path / 'run')['config']['lora_rank'] == 4
    # a rank given that differs, and a damaged file: refused before the data or the run folder is touched
    err = run_script('train_sampling.py', '--train_mode=lora', '--lora_rank=8', f'--init_lora={path}',
                     f'--data_dir={tmp_path}/none', f'--out_dir={tmp_path}/run2', fails=True)
    assert f'--init_lora={path} holds adapters of rank 4, not --lora_rank=8: pass --lora_rank=4' in err
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(path.read_bytes()[:200])
    err = run_script('train_sampling.py', '--train_mode=lora', f'--init_lora={bad}', f'--data_dir={tmp_path}/none',
                     f'--out_dir={tmp_path}/run2', fails=True)
    assert str(bad) in err and 'Traceback' not in err
    assert not (tmp_path / 'none').exists() and not (tmp_path / 'run2').exists()


@pytest.mark.slow
def test_too_few_clips_names_the_flags_that_fix_it_and_a_file_gets_no_progress_bar(raw_data, tmp_path):
    res = subprocess.run([sys.executable, os.path.join(REPO, 'train_sampling.py'),
                          *train_args(raw_data, tmp_path / 'run', '--max_iters=2')[1:]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and '\r' not in res.stderr and 'train:' not in res.stderr   # no bar fragments
    assert step_lines(res.stdout) == [1, 2, 2]
    err = run_script(*train_args(raw_data, tmp_path / 'run2', '--global_batch_size=100000'), fails=True)
    assert ('fewer than --global_batch_size=100000: lower --global_batch_size (and --batch_size), pass a smaller '
            '--clip_stride for more windows, or more data') in err


@pytest.mark.slow
def test_train_sampling_help_describes_each_setting_with_its_own_comment(tmp_path):
    printed = run_script('train_sampling.py', '--help', cwd=tmp_path)
    lines = {l.split()[0]: l for l in printed.splitlines() if l.startswith('  --')}
    assert "repo/folder with Wan's umT5" in lines['--text_encoder']
    assert 'RNG' not in lines['--init_from'] and 'settings not given' in lines['--init_from']
    assert 'stage 1 of the two-stage CPU demo' in lines['--use_states']


# ===============================================================================================
# sample.py: the ensemble and the scores of a trained run
# ===============================================================================================


@pytest.fixture(scope='module')
def demo_metrics(raw_data, tmp_path_factory):
    """Train a tiny model on the raw_data clips and evaluate it on the validation split."""
    out = tmp_path_factory.mktemp('demo')
    run_script('train_sampling.py', f'--data_dir={raw_data}', '--make_synthetic=False', f'--out_dir={out}',
               '--max_iters=300', '--log_interval=50')   # the demo's defaults: dim 256, 2 layers, batch 8, shift 12
    run_script('sample.py', f'--out_dir={out}', '--ensemble=16', '--steps=10', '--max_clips=8')
    with open(out / 'samples' / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all((out / 'samples' / f).exists() for f in ('clip_0.png', 'counterfactual_0.png',
                                                                           'clip_0.gif'))
    return {k: np.mean([float(r[k]) for r in rows]) for k in rows[0] if k.startswith(('psnr', 'ssim'))}


def no_downloads(monkeypatch, tmp_path):
    """An empty weights cache and no way out: what a machine offline sees."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    for var in ('https_proxy', 'HTTPS_PROXY', 'http_proxy', 'HTTP_PROXY'):
        monkeypatch.setenv(var, 'http://127.0.0.1:9')   # port 9 refuses: a download fails at once
    for var in ('no_proxy', 'NO_PROXY'):
        monkeypatch.delenv(var, raising=False)


def random_weights_in_the_cache(torch_home, monkeypatch):
    """Random AlexNet and Inception weights under the file names the packages download to: a cached
    file is loaded as it is, so sample.py takes its LPIPS / FID path offline (numbers of no meaning)."""
    import torchvision
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    folder = torch_home / 'hub' / 'checkpoints'
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), folder / 'alexnet-owt-7be5be79.pth')
    with monkeypatch.context() as m:   # the Inception built with its random init, nothing loaded
        m.setattr(fidelity, 'load_state_dict_from_url', lambda *args, **kwargs: {})
        m.setattr(fidelity.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, sd: None)
        inception = fidelity.FeatureExtractorInceptionV3('inception-v3-compat', ['2048'])
    torch.save(inception.state_dict(), folder / os.path.basename(fidelity.URL_INCEPTION_V3))


def scores(out_dir, *args):
    run_script('sample.py', f'--out_dir={out_dir}', '--ensemble=2', '--steps=2', '--max_clips=1', '--gif=False',
               '--lpips_fid=False', *args)
    with open(out_dir / 'samples' / 'metrics.csv') as f:
        row = next(csv.DictReader(f))
    return {k: float(v) for k, v in row.items() if k.startswith(('psnr', 'ssim'))}


def with_lora_B(src, dst, make_B):
    """A copy of run src whose adapters' B are make_B(B) (the state weights as trained)."""
    dst.mkdir()
    ckpt = torch.load(src / 'ckpt.pt', weights_only=True)
    ckpt['trainable'] = {n: make_B(p) if n.endswith('lora_B.weight') else p for n, p in ckpt['trainable'].items()}
    torch.save(ckpt, dst / 'ckpt.pt')
    return ckpt


@pytest.mark.slow
def test_sample_py_says_when_the_no_state_embedding_was_never_trained(raw_data, tmp_path):
    # preset paper trains without state dropout: its no-state embedding keeps its random init
    run_script(*train_args(raw_data, tmp_path, '--max_iters=1', '--state_dropout=0'))
    sample = ['sample.py', f'--out_dir={tmp_path}', '--ensemble=2', '--steps=1', '--max_clips=2', '--gif=False']
    err = run_script(*sample, '--cfg=2.0', fails=True)
    assert 'state_dropout=0: its no-state embedding was never trained' in err and '--cfg=2.0' in err
    assert "it has no no-state embedding: no 'no states' row" in run_script(*sample)


@pytest.mark.slow
def test_the_prediction_follows_the_robot_states(demo_metrics):
    # the same clips and noise under another clip's states for the frames to predict: the own
    # states must predict frame 77 better, and each counterfactual future must come out closer to
    # the frame the raw_data world draws for it than to the recorded frame. Measured on this run
    # (300 steps, 2 shards): own 14.80 vs another clip's 13.92 dB; another clip's future 14.80 vs
    # its truth, 13.92 vs recorded; arms swung across 14.00 vs 13.42 (the README's demo: 3.6-4.4 dB)
    assert demo_metrics['psnr_ensemble_16'] > demo_metrics['psnr_other_states'] + 0.3, demo_metrics
    for future in ('other', 'arms', 'swing'):
        assert demo_metrics[f'psnr_cf_{future}_truth'] > demo_metrics[f'psnr_cf_{future}_recorded'] + 0.2, \
            demo_metrics


@pytest.mark.slow
def test_trained_tiny_model_beats_copy_last_frame(demo_metrics):
    # measured on the 2 test shards after 300 steps (shift 12): copy-last 12.17, single 13.85,
    # ensemble of 16 14.80 dB; a single sample must already beat copying the last context frame
    assert demo_metrics['psnr_single'] > demo_metrics['psnr_copy_last'] + 0.1, demo_metrics
    assert demo_metrics['psnr_ensemble_16'] > demo_metrics['psnr_copy_last'] + 1.0, demo_metrics


@pytest.mark.slow
def test_ensemble_mean_beats_a_single_sample(demo_metrics):
    assert demo_metrics['psnr_ensemble_16'] > demo_metrics['psnr_single'] + 0.5, demo_metrics


@pytest.mark.slow
def test_sample_py_without_the_metric_weights_says_what_to_fetch(one_step_run, monkeypatch, tmp_path):
    no_downloads(monkeypatch, tmp_path)   # run_script passes this environment to the script
    results = tmp_path / 'samples'
    out = run_script('sample.py', f'--out_dir={one_step_run}', f'--results_dir={results}', '--ensemble=2',
                     '--steps=1', '--max_clips=2', '--gif=False')
    header = next(line for line in out.splitlines() if line.startswith('prediction of frame 77'))
    assert 'PSNR (dB)' in header and 'SSIM' in header and 'LPIPS' not in header and 'FID' not in header
    assert 'ensemble of 2' in out
    assert re.search(r'^clip 2/2: ensemble PSNR [\d.]+ dB, [\d.]+ s$', out, re.M)   # no bar in a file: a line a clip
    folder = f"{tmp_path / 'torch_home'}/hub/checkpoints/"
    lines = [line for line in out.splitlines() if line.startswith('not computed: ')]
    assert len(lines) == 2
    assert lines[0].startswith(f'not computed: LPIPS needs {folder}alexnet-owt-7be5be79.pth, which could not be')
    assert lines[1].startswith(f'not computed: FID needs {folder}weights-inception-2015-12-05')
    assert all('offline?): download https://' in line for line in lines)
    assert all(folder in line for line in lines)
    with open(results / 'metrics.csv') as f:
        assert not any(k.startswith(('lpips', 'fid')) for k in next(csv.DictReader(f)))


@pytest.mark.slow
def test_sample_py_scores_lpips_per_clip_with_fid_over_the_clips(one_step_run, monkeypatch, tmp_path):
    pytest.importorskip('lpips')
    pytest.importorskip('torchmetrics')
    no_downloads(monkeypatch, tmp_path)
    random_weights_in_the_cache(tmp_path / 'torch_home', monkeypatch)
    results = tmp_path / 'samples'
    out = run_script('sample.py', f'--out_dir={one_step_run}', f'--results_dir={results}', '--ensemble=2',
                     '--steps=1', '--max_clips=3', '--gif=False', '--ablation=False', '--blur=False')
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('prediction of frame 77'))
    assert lines[header].split()[-6:] == ['(dB)', 'SSIM', 'LPIPS', 'FID', '(3', 'clips)']
    for line in lines[header + 1:header + 4]:   # copy last, single sample, ensemble: 4 finite numbers each
        values = [float(v) for v in line.split()[-4:]]
        assert all(np.isfinite(values)) and values[2] >= 0 and values[3] >= 0, line
    assert 'not computed' not in out
    with open(results / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(np.isfinite(float(r['lpips_ensemble_2'])) for r in rows)


@pytest.mark.slow
def test_sample_py_lora_scale_sets_the_files_strength(raw_data, tmp_path):
    # a LoRA run on a frozen base; alpha = rank, so the file's update is the run's bit for bit.
    # Its B are drawn large (one training step moves them little), so that the LoRA changes the prediction.
    base = write_official_checkpoint(randomize(WanDiT(WanConfig.tiny(**WAN_TINY), state_cond=False), std=0.1),
                                     tmp_path / 'base')
    run_script(*train_args(raw_data, tmp_path / 'trained', '--max_iters=1', f'--pretrained={base}',
                           '--train_mode=lora', '--lora_rank=4', '--lora_alpha=4', '--text_encoder=zeros'))
    g = torch.Generator().manual_seed(0)
    run = with_lora_B(tmp_path / 'trained', tmp_path / 'run', lambda B: torch.randn(B.shape, generator=g))
    with_lora_B(tmp_path / 'trained', tmp_path / 'no_lora', torch.zeros_like)   # the base + the state weights
    export_lora(run['trainable'], tmp_path / 'exported', run['config']['lora_alpha'])
    the_run, the_base = scores(tmp_path / 'run'), scores(tmp_path / 'no_lora')
    assert abs(the_run['psnr_ensemble_2'] - the_base['psnr_ensemble_2']) > 0.01   # the LoRA matters
    assert scores(tmp_path / 'run', f'--lora={tmp_path / "exported"}', '--lora_scale=0') == the_base
    assert scores(tmp_path / 'no_lora', f'--lora={tmp_path / "exported"}', '--lora_scale=1') == the_run
    # the file alone (no folder, so the run's own state weights) at its written strength: the run again
    assert scores(tmp_path / 'no_lora', f'--lora={tmp_path / "exported" / "lora.safetensors"}') == the_run


@pytest.mark.slow
def test_sample_py_refuses_a_lora_it_cannot_apply(one_step_run, tmp_path):
    err = run_script('sample.py', f'--out_dir={one_step_run}', '--lora_scale=0.5', fails=True)
    assert '--lora_scale=0.5 sets the strength of --lora' in err
    (tmp_path / 'bad.safetensors').write_bytes(b'not a safetensors file')
    err = run_script('sample.py', f'--out_dir={one_step_run}', f'--lora={tmp_path / "bad.safetensors"}', fails=True)
    assert f'--lora={tmp_path / "bad.safetensors"}: ' in err and 'not a readable safetensors LoRA file' in err


@pytest.mark.slow
def test_sample_py_help_says_compile_runs_on_cuda_only():
    out = run_script('sample.py', '--help')
    line = next(line for line in out.splitlines() if line.strip().startswith('--compile '))
    assert 'True' in line and 'the DiT blocks on CUDA' in line and 'the CPU runs eager' in line
    assert '--compile=False turns it off' in line
    assert any(line.strip().startswith('--lora_scale ') and 'strength of --lora' in line for line in out.splitlines())


@pytest.mark.slow
def test_sample_py_refuses_flags_out_of_range_before_any_work(one_step_run, tmp_path):
    (tmp_path / 'lora.safetensors').write_bytes(b'')
    for args, message in ((['--cfg=1e999'], '--cfg=inf'), (['--cfg=25'], '--cfg=25.0 is out of range: at most 20'),
                          (['--shift=1e999'], '--shift=inf'), (['--shift=500'], '--shift=500.0 is out of range'),
                          (['--blur_sigma=1e999'], '--blur_sigma=inf'),
                          (['--blur_sigma=100'], '--blur_sigma=100.0 is out of range: at most 64'),
                          ([f'--lora={tmp_path}/lora.safetensors', '--lora_scale=1e30'],
                           '--lora_scale=1e+30 is out of range: at most 10 in size'),
                          ([f'--split={tmp_path}/no'], f'--split={tmp_path}/no: {tmp_path}/no/metadata.json missing')):
        err = run_script('sample.py', f'--out_dir={one_step_run}', f'--results_dir={tmp_path}/res', *args, fails=True)
        assert message in err and 'Traceback' not in err, err[-2000:]
    assert not (tmp_path / 'res').exists()   # stopped before any work


@pytest.mark.slow
def test_sample_py_on_cuda_without_a_gpu_is_one_sentence(one_step_run):
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    err = run_script('sample.py', f'--out_dir={one_step_run}', '--device=cuda', fails=True)
    assert '--device=cuda: this torch' in err and 'sees 0 CUDA GPU(s); pass --device=cpu' in err
    assert 'Traceback' not in err


@pytest.mark.slow
def test_sample_py_keeps_the_earlier_metrics_until_every_clip_is_scored(one_step_run, tmp_path):
    results = tmp_path / 'res'
    run_script('sample.py', f'--out_dir={one_step_run}', f'--results_dir={results}', *FAST)
    earlier = (results / 'metrics.csv').read_bytes()
    assert not (results / 'metrics.partial.csv').exists()
    # a failing flag: the earlier result whole (it was deleted at the start)
    run_script('sample.py', f'--out_dir={one_step_run}', f'--results_dir={results}', '--shift=1e999', fails=True)
    assert (results / 'metrics.csv').read_bytes() == earlier
    # a full disk (ulimit -f) while writing the first clip's PNG: one sentence, the earlier result whole
    for png in results.glob('*.png'):
        png.unlink()
    limit = 2000   # room for the rows of a clip, not for its PNG
    res = subprocess.run([sys.executable, os.path.join(REPO, 'sample.py'), f'--out_dir={one_step_run}',
                          f'--results_dir={results}', *FAST], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO),
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert res.returncode != 0 and 'Traceback' not in res.stderr, res.stderr[-2000:]
    assert re.search(r'could not write .*clip_0.png \(File too large\): free space on its disk .*then run again '
                     r'\(.*metrics.csv \(an earlier result, if any\) is untouched\)', res.stderr), res.stderr[-2000:]
    assert (results / 'metrics.csv').read_bytes() == earlier
    assert sorted(p.name for p in results.iterdir()) == ['metrics.csv']   # no partial PNG, no .tmp


@pytest.mark.slow
def test_sample_py_on_a_run_without_state_dropout_has_no_no_states_row(raw_data, tmp_path):
    run_script(*train_args(raw_data, tmp_path, '--max_iters=1', '--state_dropout=0'))
    assert 'state_embedder.null' not in trained(tmp_path)['trainable']
    sample = ['sample.py', f'--out_dir={tmp_path}', *FAST]
    err = run_script(*sample, '--cfg=2.0', fails=True)
    assert 'state_dropout=0: its no-state embedding was never trained' in err and '--cfg=2.0' in err
    out = run_script(*sample)
    assert "it has no no-state embedding: no 'no states' row" in out
    assert not any(line.startswith('ensemble, no states') for line in out.splitlines())
    with open(tmp_path / 'samples' / 'metrics.csv') as f:
        row = next(csv.DictReader(f))
    assert 'psnr_other_states' in row and 'psnr_no_states' not in row


@pytest.mark.slow
def test_sample_py_refuses_an_empty_lora_file_rather_than_zeroing_the_runs_adapters(one_step_run, tmp_path):
    from safetensors.torch import save_file
    save_file({}, str(tmp_path / 'empty.safetensors'))
    err = run_script('sample.py', f'--out_dir={one_step_run}', f'--lora={tmp_path}/empty.safetensors', fails=True)
    assert f'--lora={tmp_path}/empty.safetensors: {tmp_path}/empty.safetensors holds no LoRA tensors' in err
    assert 'Traceback' not in err


@pytest.mark.slow
def test_sample_py_says_a_missing_metric_network_before_it_reads_the_run(tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / 'torch'))   # no weights here; offline: no download either
    out = subprocess.run([sys.executable, 'sample.py', f'--out_dir={tmp_path / "none"}'], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    printed = out.stdout + out.stderr
    assert out.returncode != 0 and 'Traceback' not in printed
    missing = printed.index(f'{tmp_path / "none" / "ckpt.pt"} not found')
    said = [m.start() for m in re.finditer('not computed: ', printed)]
    if not said:   # a machine that has or downloads the networks has nothing to say
        pytest.skip('the LPIPS and FID networks are on this machine')
    assert max(said) < missing


@pytest.mark.slow
def test_sample_py_refuses_a_lora_strength_it_cannot_read_before_any_work(tmp_path):
    for spec, said in (('a.safetensors:strong', "'a.safetensors:strong' is no path:strength"),
                       ('a.safetensors:0.5,b.safetensors:inf', 'strength inf of b.safetensors: at most 10')):
        err = run_script('sample.py', f'--out_dir={tmp_path}', f'--lora={spec}', '--lpips_fid=False', fails=True)
        assert f'--lora={spec}: {said}' in err and 'not found' not in err


@pytest.mark.slow
def test_sample_py_help_gives_each_setting_its_own_text():
    out = run_script('sample.py', '--help')
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith('--')}
    assert "'a.safetensors:0.8,b.safetensors:0.5'" in lines['--lora']
    assert "strength of --lora paths without ':strength'" in lines['--lora_scale']
    assert 'no-state embedding' in lines['--ablation'] and 'state futures' in lines['--counterfactual']


# ===============================================================================================
# configurator.py: flags, config files, presets, --help
# ===============================================================================================


FAKE_SCRIPT = '''"""A training script."""
preset = 'cpu'              # which preset
# -- data --
data_dir = ''               # where the data is
batch_size = 4              # samples per step
                            # (per process)
# -- training --
learning_rate = 1e-3        # the step size
max_iters = 10              # optimizer steps
# -- logging --
wandb_log = False           # also log to W&B
# -- setup (after configure) --
batch_size = int(batch_size)
'''


def fake_script(tmp_path, text):
    path = tmp_path / 'train_fake.py'
    path.write_text(text)
    config = {'__file__': str(path), '__doc__': 'A training script.'}
    exec(compile(text, str(path), 'exec'), config)
    return config


def help_text(config, capsys, module=configurator):
    with pytest.raises(SystemExit) as stop:
        module.configure(config, argv=['--help'], presets={'cpu': {}})
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_key_space_value_parses_as_key_equals_value():
    a = configure(['--batch_size=8', '--shards=0,1', '--learning_rate=3e-4', '--compile', '--sizes=3'])
    b = configure(['--batch_size', '8', '--shards', '0,1', '--learning_rate', '3e-4', '--compile', 'True',
                   '--sizes', '3'])
    for cfg in (a, b):
        assert (cfg['batch_size'], cfg['shards'], cfg['learning_rate'], cfg['compile'], cfg['sizes']) == \
            (8, '0,1', 3e-4, True, [3])
    assert configure(['--shards=0'])['shards'] == '0'   # a string setting keeps the text as typed


def test_a_bad_flag_is_named_with_what_is_allowed():
    cases = [(['--batch_size=0'], '--batch_size=0 must be positive'),
             (['--batch_size=-4'], '--batch_size=-4 must be positive'),
             (['--dropout=1.5'], '--dropout=1.5 must lie in [0, 1]'),
             (['--mode=c'], "--mode='c' is not one of 'a', 'b'"),
             (['--preset=Paper'], "--preset='Paper' is not one of 'cpu', 'paper'"),
             (['--batch_sise=8'], 'unknown setting --batch_sise'),
             (['--batch_size=eight'], '--batch_size=eight has type str, expected int'),
             (['--batch_size'], '--batch_size needs a value')]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=re.escape(message)):
            configure(argv)


def test_a_config_file_is_held_to_the_rules_of_the_flags(tmp_path):
    def run_file(text):
        path = tmp_path / 'my_run.py'
        path.write_text(text)
        return configure([str(path)]), str(path)
    cfg, _ = run_file('import math\n_base = 2e-4\nlearning_rate = _base * 2\nbatch_size = 2 ** 3\n'
                      "shards = ','.join(str(i) for i in range(2))\nsizes = [s * 2 for s in (1, 2)]\n"
                      'def _helper():\n    x = 3\n    return x\nif True:\n    dropout = 0.2\n')
    assert (cfg['learning_rate'], cfg['batch_size'], cfg['shards'], cfg['sizes'], cfg['dropout']) == \
        (4e-4, 8, '0,1', [2, 4], 0.2)
    for text, message in [('batch_sise = 8\n', 'batch_sise is not a setting; did you mean batch_size?'),
                          ("batch_size = '8'\n", "batch_size = '8' has type str, expected int"),
                          ('compile = 1\n', 'compile = 1 has type int, expected bool'),
                          ('batch_size = 0\n', '--batch_size=0 must be positive'),
                          ("preset = 'paper'\n", 'sets preset: give it as --preset=NAME')]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            run_file(text)


@pytest.mark.slow
def test_help_lists_every_setting_with_its_comment():
    out = run_script('train_compression.py', '--help')
    for line in ('--batch_size', '--learning_rate', '--max_iters', '--preset', 'paper:'):
        assert line in out
    assert run_script('train_compression.py', '-h') == out
    assert re.search(r'^  --batch_size +\d+ +\S', out, re.M), "every setting of the training script has a one-line comment"


def test_torchrun_on_cuda_picks_the_paper_preset_plain_python_the_demo_explicit_wins(monkeypatch, capsys):
    monkeypatch.setattr(configurator, '_cuda_available', lambda: True)
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    assert configure([])['batch_size'] == 4
    assert 'preset cpu' in capsys.readouterr().out
    monkeypatch.setenv('LOCAL_RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '32')
    cfg = configure(['--batch_size=10'])
    assert (cfg['preset'], cfg['mode'], cfg['batch_size']) == ('paper', 'b', 10)   # later flags win
    assert 'preset paper: launched by torchrun on CUDA GPUs' in capsys.readouterr().out
    assert configure(['--preset', 'cpu'])['batch_size'] == 4
    monkeypatch.setattr(configurator, '_cuda_available', lambda: False)   # torchrun on CPUs (the tests): demo
    assert configure([])['preset'] == 'cpu'


def test_an_unknown_flag_suggests_the_nearest_setting(tmp_path):
    config = fake_script(tmp_path, FAKE_SCRIPT)
    for typed, meant in (('learning_rte', 'learning_rate'), ('batchsize', 'batch_size'), ('max_iter', 'max_iters')):
        with pytest.raises(SystemExit, match=f'unknown setting --{typed}; did you mean --{meant}\\?'):
            configurator.configure(dict(config), argv=[f'--{typed}=1'], presets={'cpu': {}})
    with pytest.raises(SystemExit, match='unknown setting --zzz; known settings: batch_size, data_dir, '):
        configurator.configure(dict(config), argv=['--zzz=1'], presets={'cpu': {}})


def test_help_groups_the_settings_under_their_section_markers(tmp_path, capsys):
    out = help_text(fake_script(tmp_path, FAKE_SCRIPT), capsys)
    body = out.split('settings (default, then what it is):\n')[1].splitlines()
    assert [line.split()[0] for line in body if line] == [
        '--preset', 'data:', '--data_dir', '--batch_size', 'training:', '--learning_rate', '--max_iters',
        'logging:', '--wandb_log']
    assert body[1] == '' and body[2] == 'data:'                      # a blank line before each title
    assert 'samples per step (per process)' in out                  # comments continue as before


def test_help_of_a_script_without_markers_is_one_flat_list(tmp_path, capsys):
    text = '\n'.join(line for line in FAKE_SCRIPT.splitlines() if not line.startswith('# --'))
    out = help_text(fake_script(tmp_path, text), capsys)
    assert out.split('settings (default, then what it is):\n')[1] == (
        "  --preset         'cpu'         which preset\n"
        "  --data_dir       ''            where the data is\n"
        "  --batch_size     4             samples per step (per process)\n"
        "  --learning_rate  0.001         the step size\n"
        "  --max_iters      10            optimizer steps\n"
        "  --wandb_log      False         also log to W&B\n")


@pytest.mark.parametrize('script, titles', [
    ('train_compression.py', ['data', 'model (paper 3.1)', 'training (paper 3.2)', 'validation', 'logging',
                              'run folder', 'system']),
    ('train_sampling.py', ['data', 'model (paper 2.1)', 'training (paper 2.2)', 'validation', 'logging', 'run folder',
                           'system'])])
@pytest.mark.slow
def test_help_of_each_trainer_shows_its_settings_in_sections(script, titles):
    out = run_script(script, '--help')
    body = out.split('settings (default, then what it is):\n')[1]
    assert re.findall(r'^(\S.*):$', body, re.M) == titles
    logging = body.split('\nlogging:\n')[1].split('\n\n')[0]
    assert [line.split()[0] for line in logging.splitlines()] == ['--log_interval', '--log_with', '--wandb_project',
                                                                 '--wandb_run_name']
    assert '--wandb_log' not in out


def test_a_non_finite_float_setting_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match=r'^--learning_rate=inf is not a finite number$'):
        configure(['--learning_rate=1e999'])
    cfg_file = tmp_path / 'run.py'
    cfg_file.write_text("dropout = float('nan')\n")
    with pytest.raises(SystemExit, match=r'^--dropout=nan is not a finite number$'):
        configure([str(cfg_file)])
    assert configure(['--learning_rate=1e-3'])['learning_rate'] == 1e-3


def test_a_config_file_with_a_syntax_error_is_one_sentence(tmp_path):
    cfg_file = tmp_path / 'run.py'
    cfg_file.write_text("batch_size = 8\nlearning_rate = (1e-3\n")
    with pytest.raises(SystemExit, match=re.escape(f"{cfg_file}, line 2: '(' was never closed (a config file holds "
                                                   f"Python assignments)")):
        configure([str(cfg_file)])


def test_another_tools_name_of_a_setting_points_to_nanowms(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown setting --max_train_steps; another Wan tool's name \(musubi-tuner, "
                                         r"diffusers\); nanoWM's is --max_iters \(--help"):
        configure(['--max_train_steps=10'], settings(max_iters=5))
    for theirs, ours in (('resume_from_checkpoint', '--init_from=resume'), ('report_to', '--log_with'),
                         ('network_weights', '--init_lora'), ('save_last_n_steps', '--keep_last'),
                         ('checkpoints_total_limit', '--keep_last'), ('lora_multiplier', '--lora_scale')):
        cfg = settings(max_iters=5, init_from='scratch', log_with='none', init_lora='', keep_last=0, lora_scale=1.0)
        with pytest.raises(SystemExit, match=f"nanoWM's is {ours}"):
            configure([f'--{theirs}=1'], cfg)
    # a script without the setting: no look-alike (--lora_weight is not --loss_weighting)
    with pytest.raises(SystemExit) as e:
        configure(['--lora_weight=x.safetensors'], settings(loss_weighting='none'))
    assert 'loss_weighting?' not in str(e.value) and 'known settings:' in str(e.value)


def test_help_shows_each_settings_own_comment_not_a_later_lines(tmp_path, capsys):
    script = tmp_path / 'script.py'
    script.write_text("text_encoder = ''   # the umT5 folder; '' = pretrained's\n"
                      "text_encoder = text_encoder or 'zeros'   # a later derivation's comment\n")
    with pytest.raises(SystemExit):
        configurator.configure(dict(__file__=str(script), text_encoder=''), argv=['--help'])
    assert "the umT5 folder; '' = pretrained's" in capsys.readouterr().out


# ===============================================================================================
# machinery/__init__.py: the optional packages, imported where used; files written whole or not at all
# ===============================================================================================


def test_a_missing_optional_package_stops_with_the_pip_line_that_installs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, 'av', None)   # as if PyAV were not installed
    with pytest.raises(SystemExit, match=r"^reading mp4 videos needs the av package \(.*\): "
                                         r"pip install -r requirements-sampling\.txt$"):
        machinery.need('av', 'reading mp4 videos')


def test_a_write_that_fails_for_want_of_room_is_a_sentence_and_a_bug_keeps_its_traceback(tmp_path):
    path = tmp_path / 'out.bin'
    path.write_bytes(b'the earlier file')
    # PyTorch's C++ writer: its first words (an iostream error) behind a later "unexpected pos"
    try:
        try:
            raise RuntimeError('basic_ios::clear: iostream error')
        except RuntimeError:
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')
    except RuntimeError as err:
        torch_full = err
    for error in (OSError(errno.ENOSPC, 'No space left on device'), OSError('1000 requested and 12 written'),
                  torch_full, RuntimeError('Error while serializing: I/O error: Disk quota exceeded (os error 122)')):
        with pytest.raises(SystemExit, match=rf'^could not write {path} \(.+\): free space on its disk .*, then '
                                             r'resume$'):
            with machinery.written(path, then='then resume') as tmp:
                open(tmp, 'wb').write(b'half')
                raise error
        assert path.read_bytes() == b'the earlier file' and not os.path.exists(f'{path}.tmp')
    for bug in (ValueError('a bug'), KeyError('w'), FileNotFoundError(errno.ENOENT, 'a file read in the body')):
        with pytest.raises(type(bug)):
            with machinery.written(path) as tmp:
                open(tmp, 'wb').write(b'half')
                raise bug
        assert not os.path.exists(f'{path}.tmp')
    with machinery.written(path) as tmp:
        open(tmp, 'wb').write(b'new')
    assert path.read_bytes() == b'new'


# ===============================================================================================
# machinery/run_dir.py: the folder's lock, the divergence guard, the log, the disk check
# ===============================================================================================



def feed(guard, losses, first_step=0):
    for step, loss in enumerate(losses, first_step):
        guard.check({'training loss': loss, 'gradient norm': 0.5}, step)


class FakeUsage:
    def __init__(self, free):
        self.free = free

    def __call__(self, path):
        return self


def test_claim_refuses_to_train_over_a_checkpoint_unless_resuming_or_overwriting(tmp_path):
    out = tmp_path / 'run'
    run_dir.claim(str(out), resume=False)
    checkpoints.save_checkpoint(str(out), dict(kind='compression', step=1))
    run_dir._release_lock(str(out / 'run.lock'), os.getpid())
    before = (out / 'ckpt.pt').read_bytes()
    with pytest.raises(SystemExit, match='already exists. To continue that run pass --init_from=resume'):
        run_dir.claim(str(out), resume=False)
    with pytest.raises(SystemExit, match='does not exist'):
        run_dir.claim(str(tmp_path / 'empty'), resume=True)
    assert (out / 'ckpt.pt').read_bytes() == before
    run_dir.claim(str(out), resume=True)
    run_dir._release_lock(str(out / 'run.lock'), os.getpid())
    run_dir.claim(str(out), resume=False, overwrite=True)


@pytest.mark.slow
def test_only_a_live_run_holds_the_lock(tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (out / 'run.lock').write_text(json.dumps(dict(pid=sleeper.pid, host=__import__('socket').gethostname(),
                                                      started='then')))
        with pytest.raises(SystemExit, match=f'in use by another run \\(pid {sleeper.pid}'):
            run_dir.claim(str(out), resume=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    run_dir.claim(str(out), resume=False)   # the owner is gone: the lock is taken over
    assert json.loads((out / 'run.lock').read_text())['pid'] == os.getpid()


def test_a_non_finite_loss_stop_names_the_checkpoint_kept(tmp_path):
    guard = run_dir.DivergenceGuard(str(tmp_path), spike=10.0)
    guard.check({'training loss': 1.5, 'gradient norm': 0.2}, 3)
    with pytest.raises(SystemExit, match='step 7: the gradient norm is inf: stopping. no checkpoint was written'):
        guard.check({'training loss': 1.5, 'gradient norm': float('inf')}, 7)


def test_the_log_of_a_resumed_run_reads_as_one_run(tmp_path):
    out = str(tmp_path)
    log = run_dir.RunLog(out)
    for step in range(1, 7):
        log.write(dict(step=step, loss=1.0 / step, val=None if step % 2 else 2.0 - step / 10))
    log = run_dir.RunLog(out, start_step=4)   # resumed from the checkpoint of step 4: 5, 6 are redone
    log.write(dict(step=5, loss=0.1))
    assert [r['step'] for r in run_dir.read_log(out)] == [1, 2, 3, 4, 5]
    png = trackers.plot_curves(out, [('loss', ['loss']), ('val', ['val'])])
    assert Image.open(png).size[0] > 500


def test_a_torn_log_line_is_skipped_with_a_note_not_a_traceback(tmp_path, capsys):
    out = str(tmp_path)
    log = run_dir.RunLog(out)
    for step in range(3):
        log.write(dict(step=step, loss=1.0))
    with open(tmp_path / 'log.jsonl', 'a') as f:
        f.write('{"step": 3, "lo')   # a run killed while writing its log
    run_dir.RunLog(out, start_step=3)   # the resume keeps steps 0-2
    assert [r['step'] for r in run_dir.read_log(out)] == [0, 1, 2]
    assert 'skipped 1 line(s) that are not JSON' in capsys.readouterr().out


def test_a_loss_spike_moves_the_checkpoint_it_came_from_aside(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20, metric=0.5)   # the best so far, then its loss spikes
    guard = run_dir.DivergenceGuard(str(tmp_path), spike=10.0, start_step=10,
                                    saved=dict(losses=[1.0 + 0.01 * (k % 3) for k in range(20)]))
    with pytest.raises(SystemExit) as stop:
        guard.check({'training loss': 50.0, 'gradient norm': 0.5}, 21)   # step 21: the loss of the weights saved as step 20
    message = str(stop.value)
    assert 'step 21: the training loss spiked to 50, over 10 x 1.01 (the median of the last 20): stopping' in message
    assert f"{tmp_path}/ckpt.pt and {tmp_path}/ckpt_prev.pt hold step 10, saved before the loss diverged at step 21" \
        in message
    assert (step_of(tmp_path / 'ckpt.pt'), step_of(tmp_path / 'ckpt_prev.pt')) == (10, 10)
    assert step_of(tmp_path / 'ckpt_diverged.pt') == 20
    assert not (tmp_path / 'ckpt_best.pt').exists()


def test_a_spike_after_the_last_save_leaves_every_checkpoint_as_it_is(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20)
    before = {name: (tmp_path / name).read_bytes() for name in ('ckpt.pt', 'ckpt_prev.pt')}
    guard = run_dir.DivergenceGuard(str(tmp_path), spike=10.0)
    feed(guard, [2.0] * 25)
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path}/ckpt.pt holds step 20, saved before the loss diverged "
                                                   f"at step 25")):
        guard.check({'training loss': 2e6, 'gradient norm': 0.5}, 25)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not (tmp_path / 'ckpt_diverged.pt').exists()


def test_the_spike_rule_acts_from_20_losses_unless_off(tmp_path):
    warming = run_dir.DivergenceGuard(str(tmp_path), spike=10.0)
    feed(warming, [1.0] * 19 + [11.0])   # the 20th loss: only 19 known before it
    off = run_dir.DivergenceGuard(str(tmp_path), spike=0)
    feed(off, [1.0] * 30 + [1e9])
    falling = run_dir.DivergenceGuard(str(tmp_path), spike=10.0)
    feed(falling, [7.0 * 0.9 ** k for k in range(150)])   # a falling loss never trips it
    with pytest.raises(SystemExit, match='the training loss spiked to 10.5'):
        feed(run_dir.DivergenceGuard(str(tmp_path), spike=10.0), [1.0] * 20 + [10.5])


def test_a_nan_loss_also_moves_a_checkpoint_of_its_step_aside(tmp_path):
    save(tmp_path, 3)
    guard = run_dir.DivergenceGuard(str(tmp_path), spike=10.0)
    with pytest.raises(SystemExit, match=re.escape("step 4: the training loss is nan: stopping. the checkpoint of "
                                                   "step 3, whose loss diverged, was moved to")) as stop:
        guard.check({'training loss': float('nan'), 'gradient norm': 0.5}, 4)   # the weights of step 3
    assert 'no checkpoint from before step 3 exists' in str(stop.value)
    assert not (tmp_path / 'ckpt.pt').exists() and step_of(tmp_path / 'ckpt_diverged.pt') == 3


@pytest.mark.parametrize('content', ['garbage', '[1, 2]', '{"pid": "x", "host": 3}', '{"host": "h"}'])
def test_a_malformed_lock_is_a_sentence_then_taken_over_once_stale(tmp_path, content):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'run.lock').write_text(content)
    with pytest.raises(SystemExit, match=r'in use by another run \(an unreadable lock file, not refreshed for a minute\)'):
        run_dir.claim(str(out), resume=False)
    old = time.time() - 120
    os.utime(out / 'run.lock', (old, old))
    run_dir.claim(str(out), resume=False)
    assert json.loads((out / 'run.lock').read_text())['pid'] == os.getpid()
    run_dir._release_lock(str(out / 'run.lock'), os.getpid())


def test_the_lock_stays_fresh_while_a_long_preparation_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(run_dir, 'HEARTBEAT_S', 0.05)
    monkeypatch.setattr(run_dir, 'LOCK_STALE_S', 0.5)
    out = tmp_path / 'run'
    run_dir.claim(str(out), resume=False)
    lock = out / 'run.lock'
    owner = json.loads(lock.read_text())
    lock.write_text(json.dumps(dict(owner, host='another-host')))   # as a run on another host sees it
    time.sleep(1.5)   # 3 x the staleness time without a log line or a save: a download, an encoding
    stale, who = run_dir._lock_is_stale(str(lock))
    assert not stale and time.time() - os.path.getmtime(lock) < 0.5, who
    lock.write_text(json.dumps(owner))
    run_dir._release_lock(str(lock), os.getpid())


def test_overwrite_moves_the_earlier_runs_files_aside(tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    run_files = ['ckpt.pt', 'ckpt_best.pt', 'ckpt_prev.pt', 'log.jsonl', 'lora.safetensors',
                 'lora_step0000400.safetensors', 'state_embedder.safetensors', 'val']
    for name in run_files:
        (out / name).mkdir() if name == 'val' else (out / name).write_text(name)
    (out / 'notes.txt').write_text('mine')
    run_dir.claim(str(out), resume=False, overwrite=True)
    run_dir._release_lock(str(out / 'run.lock'), os.getpid())
    aside = [p for p in out.iterdir() if p.name.startswith('previous_')]
    assert len(aside) == 1 and sorted(os.listdir(aside[0])) == run_files
    assert sorted(os.listdir(out)) == ['notes.txt', aside[0].name]
    assert (aside[0] / 'ckpt_best.pt').read_text() == 'ckpt_best.pt'
    assert "--overwrite: moved the earlier run's files (ckpt.pt, ckpt_best.pt" in capsys.readouterr().out


def test_every_log_line_has_its_time(tmp_path):
    log = run_dir.RunLog(str(tmp_path))
    before = time.time()
    log.write(dict(step=0, loss=1.0))
    record, = run_dir.read_log(str(tmp_path))
    assert record['step'] == 0 and before - 1 <= record['time'] <= time.time() + 1


@pytest.mark.slow
def test_a_missing_tracker_package_is_refused_by_name_before_any_work(tmp_path):
    for package in ('tensorboard', 'wandb'):
        if importlib.util.find_spec(package) is not None:
            continue
        for script in ('train_compression.py', 'train_sampling.py'):
            err = run_script(script, f'--log_with={package}', f'--out_dir={tmp_path}/run', cwd=tmp_path, fails=True)
            assert f'--log_with={package}: the {package} package is not installed (pip install {package})' in err
    assert not (tmp_path / 'run').exists()


def test_checkpoint_bytes_count_three_files_of_weights_with_adam_moments():
    assert run_dir.checkpoint_bytes(n_saved=1000, n_trained=100) == 3 * 4 * (1000 + 200)


def test_a_run_that_needs_more_than_the_free_space_is_refused_in_one_sentence(tmp_path):
    needs = [(str(tmp_path / 'run'), 3 * 2 ** 30, 'checkpoints'), (str(tmp_path / 'data'), 5 * 2 ** 30, 'latents')]
    lines, refusal = run_dir.disk_report(needs, usage=FakeUsage(100 * 2 ** 30))
    assert lines == [f'disk: checkpoints 3.0 GiB, latents 5.0 GiB = 8.0 GiB to write on the disk of {tmp_path} '
                     f'(100.0 GiB free)'] and refusal == ''
    _, refusal = run_dir.disk_report(needs, usage=FakeUsage(6 * 2 ** 30))
    assert refusal == (f'not enough disk space: checkpoints 3.0 GiB, latents 5.0 GiB need 8.0 GiB on the disk of '
                       f'{tmp_path}, which has 6.0 GiB free. Free space there, or pass an --out_dir (or --data_dir) '
                       f'on a larger disk.')


def guarded_save(out, guard, step, value=1.0, metric=None):
    state = dict(kind='compression', step=step, config={}, model=dict(w=torch.full((3,), value)),
                 guard=guard.state_dict())
    checkpoints.save_checkpoint(str(out), state, metric=metric, trusted=guard.trusted)


def checks(guard, steps, loss=1.0):
    for step in steps:
        guard.check({'training loss': loss, 'gradient norm': 0.5}, step)


def test_the_spike_rule_acts_from_the_first_step_of_a_resumed_run(tmp_path):
    guard = run_dir.DivergenceGuard(str(tmp_path), spike=10.0)
    checks(guard, range(1, 26))
    saved = guard.state_dict()   # what ckpt.pt of step 25 holds
    assert saved == dict(losses=[1.0] * 25, checked_from=20)
    resumed = run_dir.DivergenceGuard(str(tmp_path), spike=10.0, start_step=25, saved=saved)
    with pytest.raises(SystemExit, match=r'step 26: the training loss spiked to 50, over 10 x 1 \(the median of the '
                                         r'last 25\)'):
        resumed.check({'training loss': 50.0, 'gradient norm': 0.5}, 26)


def test_a_state_is_trusted_once_its_loss_passed_the_armed_spike_rule_or_it_was_resumed_from(tmp_path):
    guard = run_dir.DivergenceGuard(str(tmp_path), spike=10.0, start_step=4, saved=dict(losses=[1.0] * 4))
    checks(guard, range(5, 21))   # 4 + 16 = 20 losses known only after step 20
    assert [n for n in range(30) if guard.trusted(n)] == [4]
    checks(guard, [21])   # the first check with the rule armed: the loss of the weights of step 20
    assert [n for n in range(25) if guard.trusted(n)] == [4, 20, 21, 22, 23, 24] and not guard.trusted(None)
    off = run_dir.DivergenceGuard(str(tmp_path), spike=0)   # finiteness is all there is to check
    assert off.trusted(1) and off.trusted(7)


def test_saves_before_the_spike_rule_can_check_never_rotate_out_the_state_resumed_from(tmp_path):
    # the issue's case in one process: resumed at step 4 (4 losses known), a bad learning rate, a save every step
    save(tmp_path, 4)
    guard = run_dir.DivergenceGuard(str(tmp_path), spike=10.0, start_step=4, saved=dict(losses=[1.0] * 4))
    for step in range(5, 8):   # the losses of the weights of steps 4, 5, 6: finite, huge, the rule not armed
        checks(guard, [step], loss=10.0 ** step)
        guarded_save(tmp_path, guard, step, value=10.0 ** step)
    assert (step_of(tmp_path / 'ckpt.pt'), step_of(tmp_path / 'ckpt_prev.pt')) == (7, 4)
    with pytest.raises(SystemExit) as stop:
        guard.check({'training loss': float('nan'), 'gradient norm': 0.5}, 8)
    said = str(stop.value)
    assert said.startswith(f"step 8: the training loss is nan: stopping. the checkpoint of step 7, whose loss "
                           f"diverged, was moved to {tmp_path}/ckpt_diverged.pt; {tmp_path}/ckpt.pt and "
                           f"{tmp_path}/ckpt_prev.pt hold step 4, saved before the loss diverged at step 8."), said
    for name in ('ckpt.pt', 'ckpt_prev.pt'):
        assert torch.load(tmp_path / name, weights_only=True)['model']['w'].abs().max() == 1.0
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


def test_without_a_known_good_state_saves_rotate_and_the_stop_says_they_were_not_checked(tmp_path):
    guard = run_dir.DivergenceGuard(str(tmp_path), spike=10.0)   # a new run: nothing is checked for 20 steps
    for step in range(1, 5):
        checks(guard, [step])
        guarded_save(tmp_path, guard, step)
    assert (step_of(tmp_path / 'ckpt.pt'), step_of(tmp_path / 'ckpt_prev.pt')) == (4, 3)
    checks(guard, range(5, 9))
    with pytest.raises(SystemExit) as stop:
        guard.check({'training loss': float('inf'), 'gradient norm': 0.5}, 9)
    unchecked = 'whose loss was finite but came before the spike rule could check it: it may have diverged too'
    assert (f"step 9: the training loss is inf: stopping. {tmp_path}/ckpt.pt holds step 4, {unchecked}; "
            f"{tmp_path}/ckpt_prev.pt holds step 3, {unchecked}. Lower --learning_rate") in str(stop.value)
    assert not (tmp_path / 'ckpt_diverged.pt').exists()


def test_once_the_spike_rule_has_checked_a_state_saves_rotate_it_into_ckpt_prev(tmp_path):
    guard = run_dir.DivergenceGuard(str(tmp_path), spike=10.0)
    checks(guard, range(1, 11))
    guarded_save(tmp_path, guard, 10)   # unchecked
    checks(guard, range(11, 21))
    guarded_save(tmp_path, guard, 20)   # replaces 10, which nothing checked: nothing known good to keep
    checks(guard, range(21, 31))   # step 21 checks the weights of step 20 with the rule armed
    guarded_save(tmp_path, guard, 30)
    checks(guard, range(31, 41))
    guarded_save(tmp_path, guard, 40)
    assert (step_of(tmp_path / 'ckpt.pt'), step_of(tmp_path / 'ckpt_prev.pt')) == (40, 30)
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path}/ckpt.pt and {tmp_path}/ckpt_prev.pt hold step 30, "
                                                   f"saved before the loss diverged at step 41")):
        guard.check({'training loss': 1e3, 'gradient norm': 0.5}, 41)
    assert step_of(tmp_path / 'ckpt_diverged.pt') == 40


def test_overwrite_together_with_resume_is_refused(tmp_path):
    save(tmp_path, 2)
    with pytest.raises(SystemExit, match=re.escape(f"--overwrite starts a new run in {tmp_path}, --init_from=resume "
                                                   f"continues its run: drop one")):
        run_dir.claim(str(tmp_path), resume=True, overwrite=True)
    assert not (tmp_path / 'run.lock').exists() and step_of(tmp_path / 'ckpt.pt') == 2


def test_sizes_read_at_any_scale(tmp_path):
    assert [run_dir.size(n) for n in (0, 100, 5000, 12 * 2 ** 20, 200 * 2 ** 20, 3 * 2 ** 30, 2 ** 41)] == [
        '0 bytes', '100 bytes', '4.9 KiB', '12.0 MiB', '0.2 GiB', '3.0 GiB', '2.00 TiB']
    _, refusal = run_dir.disk_report([(str(tmp_path), 3 * 2 ** 20, 'checkpoints')], usage=FakeUsage(2 ** 20))
    assert refusal.startswith(f'not enough disk space: checkpoints 3.0 MiB need 3.0 MiB on the disk of {tmp_path}, '
                              f'which has 1.0 MiB free.')


@pytest.mark.parametrize('failure', ['raise ImportError("cannot import name \'x\' from \'google.protobuf\'")',
                                     'raise TypeError("Descriptors cannot be created directly")'])
def test_a_tracker_package_that_fails_on_import_is_refused_at_start(tmp_path, monkeypatch, failure):
    (tmp_path / 'wandb').mkdir()
    (tmp_path / 'wandb' / '__init__.py').write_text(failure + '\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, 'wandb', raising=False)
    with pytest.raises(SystemExit, match=r"^--log_with=wandb: the wandb package is installed but fails on import \("
                                         r".+\): reinstall it \(pip install --force-reinstall wandb\), or pass "
                                         r"--log_with=none$"):
        run_dir.check_log_with('wandb')
    run_dir.check_log_with('none')


@pytest.mark.slow
def test_a_broken_tensorboard_stops_both_trainers_before_any_work(tmp_path):
    (tmp_path / 'fake' / 'tensorboard').mkdir(parents=True)
    (tmp_path / 'fake' / 'tensorboard' / '__init__.py').write_text('raise ImportError("broken install")\n')
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'fake'}{os.pathsep}{REPO}")
    for script in ('train_compression.py', 'train_sampling.py'):
        res = subprocess.run([sys.executable, os.path.join(REPO, script), '--log_with=tensorboard',
                              f'--out_dir={tmp_path}/run', '--max_iters=1'], cwd=tmp_path, capture_output=True,
                             text=True, env=env, timeout=600)
        assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr[-2000:]
        assert ('--log_with=tensorboard: the tensorboard package is installed but fails on import (' in res.stderr
                and 'broken install' in res.stderr), res.stderr[-2000:]
    assert not (tmp_path / 'run').exists()


# ===============================================================================================
# machinery/checkpoints.py: atomic saves, loads that run no code, the settings of a resume
# ===============================================================================================


def test_loading_a_crafted_pickle_runs_no_code(tmp_path):
    marker = tmp_path / 'pwned.txt'
    torch.save(dict(kind='compression', step=1, config={}, evil=_Payload(str(marker))), tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit, match='refusing to load it'):
        checkpoints.load_checkpoint(str(tmp_path / 'ckpt.pt'), 'compression')
    assert not marker.exists()


def test_checkpoint_of_the_other_track_or_other_model_settings_is_named(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    torch.save(dict(kind='sampling', step=1, config=dict(n_layer=2)), path)
    with pytest.raises(SystemExit, match='not a compression-track checkpoint'):
        checkpoints.load_checkpoint(path, 'compression')
    with pytest.raises(SystemExit, match=re.escape('n_layer=2 in the checkpoint, 24 now')):
        checkpoints.load_checkpoint(path, 'sampling', expect=dict(n_layer=24))
    (tmp_path / 'cut.pt').write_bytes(open(path, 'rb').read()[:100])
    with pytest.raises(SystemExit, match='may be truncated'):
        checkpoints.load_checkpoint(str(tmp_path / 'cut.pt'), 'sampling')


def test_weights_with_inf_are_never_saved(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    before = {name: (tmp_path / name).read_bytes() for name in ('ckpt.pt', 'ckpt_prev.pt')}
    with pytest.raises(SystemExit, match=re.escape(f"step 3: model.w holds NaN or inf: stopping without saving. "
                                                   f"{tmp_path}/ckpt.pt (step 2) is untouched")):
        save(tmp_path, 3, value=float('inf'))
    state = dict(kind='compression', step=3, config={}, model=dict(w=torch.ones(3)),
                 optimizer=dict(state={0: dict(exp_avg_sq=torch.tensor([1.0, float('nan')]))}))
    with pytest.raises(SystemExit, match='optimizer.state.0.exp_avg_sq holds NaN or inf'):
        checkpoints.save_checkpoint(str(tmp_path), state)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'ckpt_prev.pt']


def test_a_model_flag_that_differs_from_the_checkpoint_is_refused_by_name(tmp_path):
    checkpoints.save_checkpoint(str(tmp_path), dict(kind='compression', step=1, config=dict(n_layer=2, n_embd=64)))
    with pytest.raises(SystemExit, match=r'n_layer=2 in the checkpoint, 1 now\. Leave these settings out'):
        checkpoints.settings_on_resume(str(tmp_path), 'compression', dict(n_layer=1, n_embd=64), {'n_layer'},
                                       ('n_layer',))
    # not given: the checkpoint's (the settings taken are returned); given and equal: kept
    assert checkpoints.settings_on_resume(str(tmp_path), 'compression', dict(n_layer=1, n_embd=64), {'n_embd'},
                                          ('n_layer',)) == dict(n_layer=2)
    # what configure() reports as given: flags and a config file's assignments, not a preset's
    cfg_file = tmp_path / 'my_run.py'
    cfg_file.write_text('n_layer = 1\nif True:\n    learning_rate = 2e-4\n')
    given = configurator.configure(dict(settings(), n_layer=24, preset='cpu'),
                                   argv=[str(cfg_file), '--batch_size=8', '--preset=paper'],
                                   presets={'cpu': {}, 'paper': dict(batch_size=20, mode='b')})
    assert given == {'n_layer', 'learning_rate', 'batch_size'}


def test_ckpt_best_holds_its_own_metric_so_a_kill_between_writes_leaves_nothing_that_disagrees(tmp_path, monkeypatch):
    out = str(tmp_path)
    checkpoints.save_checkpoint(out, dict(kind='compression', step=1, config={}), metric=5.0)
    link = checkpoints._link_or_copy

    def killed_at_the_best(src, dst, then):
        if dst.endswith(checkpoints.BEST):
            raise KeyboardInterrupt   # a kill after ckpt.pt is written, before it is linked as the best
        link(src, dst, then)
    monkeypatch.setattr(checkpoints, '_link_or_copy', killed_at_the_best)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(out, dict(kind='compression', step=2, config={}), metric=4.0)
    monkeypatch.undo()
    best = torch.load(tmp_path / 'ckpt_best.pt', weights_only=True)
    assert (best['step'], best['metric'], step_of(tmp_path / 'ckpt.pt')) == (1, 5.0, 2)   # one file, its own record
    checkpoints.save_checkpoint(out, dict(kind='compression', step=3, config={}), metric=4.5)   # the resumed run
    best = torch.load(tmp_path / 'ckpt_best.pt', weights_only=True)
    assert (best['step'], best['metric']) == (3, 4.5)
    checkpoints.save_checkpoint(out, dict(kind='compression', step=4, config={}), metric=4.7)   # worse: kept
    assert step_of(tmp_path / 'ckpt_best.pt') == 3 and not (tmp_path / 'best.json').exists()


def test_saves_keep_the_previous_checkpoint_beside_the_best_that_says_its_metric(tmp_path):
    out = str(tmp_path)
    for step, val in ((1, 5.0), (2, 4.0), (3, 4.5)):   # step 3 is worse than step 2
        checkpoints.save_checkpoint(out, dict(kind='compression', step=step, config={}), metric=val)
    load = lambda name: checkpoints.load_checkpoint(os.path.join(out, name), 'compression')
    assert (load('ckpt.pt')['step'], load('ckpt_prev.pt')['step'], load('ckpt_best.pt')['step']) == (3, 2, 2)
    assert load('ckpt_best.pt')['metric'] == 4.0
    os.remove(tmp_path / 'ckpt_prev.pt')
    os.link(tmp_path / 'ckpt.pt', tmp_path / 'ckpt_prev.pt')   # one file twice, as after a divergence
    checkpoints.save_checkpoint(out, dict(kind='compression', step=4, config={}))
    assert (load('ckpt.pt')['step'], load('ckpt_prev.pt')['step']) == (4, 3)
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'ckpt_best.pt', 'ckpt_prev.pt']   # no .tmp beside the links


@pytest.mark.parametrize('error', [RuntimeError('[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0'),
                                   RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed'),
                                   OSError(errno.ENOSPC, 'No space left on device')])
def test_a_full_disk_during_a_save_is_a_sentence_whatever_torch_raises(tmp_path, monkeypatch, error):
    save(tmp_path, 1)
    before = (tmp_path / 'ckpt.pt').read_bytes()

    def full(state, f):
        f.write(b'half a checkpoint')
        raise error
    monkeypatch.setattr(checkpoints.torch, 'save', full)
    with pytest.raises(SystemExit) as stop:
        save(tmp_path, 2)
    monkeypatch.undo()
    assert str(stop.value).startswith(f"could not write {tmp_path}/ckpt.pt (")
    assert str(stop.value).endswith(f"): free space on its disk (or fix its permissions), then resume with "
                                    f"--init_from=resume: {tmp_path}/ckpt.pt (step 1) is untouched")
    assert (tmp_path / 'ckpt.pt').read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


def test_a_folder_gone_read_only_at_the_rename_is_a_sentence_with_the_old_checkpoint_kept(tmp_path, monkeypatch):
    save(tmp_path, 1)
    before = (tmp_path / 'ckpt.pt').read_bytes()
    rename = os.replace

    def read_only(src, dst):
        if dst.endswith(os.sep + 'ckpt.pt'):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        rename(src, dst)
    monkeypatch.setattr(os, 'replace', read_only)
    with pytest.raises(SystemExit, match=re.escape(f"could not write {tmp_path}/ckpt.pt (Read-only file system): "
                                                   f"free space on its disk (or fix its permissions)")):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert (tmp_path / 'ckpt.pt').read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


SAVE_UNDER_A_LIMIT = '''
import sys, torch
from machinery import checkpoints
checkpoints.save_checkpoint(sys.argv[1], dict(kind='compression', step=2, config={}, model=dict(w=torch.ones(10 ** 6))))
'''


@pytest.mark.slow
def test_a_save_stopped_by_a_file_size_limit_names_the_os_reason_and_leaves_no_partial_file(tmp_path):
    save(tmp_path, 1)
    before = (tmp_path / 'ckpt.pt').read_bytes()
    limit = 200_000   # ulimit -f: the 4 MB state cannot be written
    res = subprocess.run([sys.executable, '-c', SAVE_UNDER_A_LIMIT, str(tmp_path)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO), timeout=300,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr[-2000:]
    assert f"could not write {tmp_path}/ckpt.pt (File too large): free space on its disk" in res.stderr
    assert (tmp_path / 'ckpt.pt').read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


def test_a_checkpoint_holding_nan_is_refused_when_loaded(tmp_path):
    state = dict(kind='compression', step=3, config={}, model=dict(w=torch.tensor([1.0, float('nan')])))
    torch.save(state, tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit, match=re.escape(
            f"{tmp_path}/ckpt.pt: model.w holds NaN or inf, so it cannot be used; ckpt_prev.pt or ckpt_best.pt in the "
            f"same folder (if there) hold earlier states: copy one over ckpt.pt to resume from it")):
        checkpoints.load_checkpoint(str(tmp_path / 'ckpt.pt'), 'compression')


def train_without_sizes(raw_data, out, *extra):
    """train_args without the model's sizes: what a run takes from elsewhere (its base, its checkpoint)."""
    return [a for a in train_args(raw_data, out, *extra) if a.split('=')[0] not in
            {f'--{k}' for k in WAN_TINY}]


def test_a_resume_takes_every_setting_not_given_from_the_checkpoint_in_one_line(tmp_path, capsys):
    saved = dict(n_layer=2, max_iters=40, log_with='tensorboard', keep_last=3, eval_interval=5, out_dir='elsewhere',
                 preset='paper', init_from='scratch', device='cuda:1', stop_at=20)
    checkpoints.save_checkpoint(str(tmp_path), dict(kind='compression', step=1, config=saved))
    now = dict(n_layer=1, max_iters=42, log_with='none', keep_last=0, eval_interval=5, out_dir=str(tmp_path),
               preset='cpu', init_from='resume', device='auto', stop_at=0, learning_rate=1e-3)
    taken = checkpoints.settings_on_resume(str(tmp_path), 'compression', now, {'max_iters'}, ('n_layer',))
    # the typed --max_iters wins (it extends the run); what a command does (preset, out_dir, ...) stays its own
    assert taken == dict(n_layer=2, log_with='tensorboard', keep_last=3)
    assert capsys.readouterr().out == (f"settings taken from {tmp_path}/ckpt.pt (not given now): n_layer=2, "
                                       f"log_with='tensorboard', keep_last=3\n")
    # a model setting given that differs is refused by name; another given one simply wins
    with pytest.raises(SystemExit, match=r"n_layer=2 in the checkpoint, 1 now\. Leave these settings out .* to take "
                                         r"the checkpoint's, or pass another --out_dir"):
        checkpoints.settings_on_resume(str(tmp_path), 'compression', now, {'n_layer'}, ('n_layer',))
    assert checkpoints.settings_on_resume(str(tmp_path), 'compression', now, {'max_iters', 'log_with', 'keep_last'},
                                          ('n_layer',)) == dict(n_layer=2)


# ===============================================================================================
# machinery/trackers.py: TensorBoard and W&B at the log's steps
# ===============================================================================================


def images(n, size=64, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3), dtype=np.uint8)


def tensorboard_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={'scalars': 0, 'images': 0})
    events.Reload()
    return events


FAKE_WANDB = '''
"""A stand-in for wandb: records init's arguments and every log call in $FAKE_WANDB_RECORD."""
import json
import os


def _record(entry):
    with open(os.environ['FAKE_WANDB_RECORD'], 'a') as f:
        f.write(json.dumps(entry) + '\\n')


class Image:
    def __init__(self, path):
        self.path = path


class Run:
    def log(self, data, step=None):
        _record(dict(call='log', step=step, data={k: {'image': v.path} if isinstance(v, Image) else v
                                                  for k, v in data.items()}))

    def finish(self):
        _record(dict(call='finish'))


def init(**kwargs):
    _record(dict(call='init', kwargs={k: v for k, v in kwargs.items() if k != 'config'}))
    return Run()
'''


@pytest.mark.slow
def test_tensorboard_gets_every_logged_figure_at_its_step(lora_run):
    events = tensorboard_events(lora_run['out'] / 'tensorboard')
    log = read_log(lora_run['out'])
    for key in ('loss', 'grad_norm', 'val_psnr_ensemble'):
        assert [(e.step, pytest.approx(e.value)) for e in events.Scalars(key)] == [(r['step'], r[key]) for r in log]
    pictures = events.Images('val/clip_0')
    assert [p.step for p in pictures] == [1, 2, 3] and pictures[0].width > 100


def test_tensorboard_of_a_resumed_run_reads_as_one_run(tmp_path):
    log = run_dir.RunLog(str(tmp_path), log_with='tensorboard')
    for step in range(1, 6):
        log.write(dict(step=step, loss=float(step)))
    log.close()
    log = run_dir.RunLog(str(tmp_path), start_step=3, log_with='tensorboard')   # from the checkpoint of step 3
    log.write(dict(step=4, loss=40.0))
    log.close()
    events = tensorboard_events(tmp_path / 'tensorboard')
    assert [(e.step, e.value) for e in events.Scalars('loss')] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


@pytest.mark.slow
def test_compressions_tensorboard_steps_are_its_logs(tmp_path, synthetic_dir):
    printed = run_compression(f'--data_dir={synthetic_dir}', f'--out_dir={tmp_path}', '--max_iters=2',
                              '--eval_interval=1', '--log_interval=1', '--log_with=tensorboard', cwd=tmp_path)
    log = read_log(tmp_path)
    assert [r['step'] for r in log] == [1, 2] and step_lines(printed) == [1, 1, 2, 2]
    events = tensorboard_events(tmp_path / 'tensorboard')
    for key in ('loss', 'lr', 'val_ar_top500'):
        assert [(e.step, pytest.approx(e.value)) for e in events.Scalars(key)] == [(r['step'], r[key]) for r in log]
    assert step_of(tmp_path / 'ckpt_best.pt') in (1, 2)


@pytest.mark.slow
def test_wandb_keeps_one_run_in_out_dir_across_a_resume(raw_data, tmp_path):
    (tmp_path / 'fake' / 'wandb').mkdir(parents=True)
    (tmp_path / 'fake' / 'wandb' / '__init__.py').write_text(FAKE_WANDB)
    record = tmp_path / 'wandb_calls.jsonl'
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'fake'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               FAKE_WANDB_RECORD=str(record))
    out = tmp_path / 'run'
    for extra in (['--max_iters=1'], ['--max_iters=2', '--init_from=resume']):
        args = train_args(raw_data, out, '--log_with=wandb', '--eval_interval=1', *extra)
        res = subprocess.run([sys.executable, os.path.join(REPO, args[0]), *args[1:]], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    calls = [json.loads(line) for line in open(record)]
    inits = [c['kwargs'] for c in calls if c['call'] == 'init']
    assert len(inits) == 2 and inits[0]['dir'] == inits[1]['dir'] == str(out)
    assert inits[0]['id'] == inits[1]['id'] == (out / 'wandb_id').read_text() and inits[1]['resume'] == 'allow'
    logs = [c for c in calls if c['call'] == 'log']
    assert [c['step'] for c in logs] == [1, 2]
    assert all(c['data']['val/clip_0']['image'] == str(out / 'val' / f"step_{c['step']:07d}" / 'clip_0.png') for c in logs)
    assert logs[0]['data']['loss'] == read_log(out)[0]['loss']


# ===============================================================================================
# machinery/distributed.py: both trainers on two nodes
# ===============================================================================================


def free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def run_on_two_nodes(*args, cwd):
    """`torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint HOST:PORT SCRIPT ...`
    typed on two nodes, as a cluster runs it: here two launchers on one machine (gloo on the CPU),
    which meet at the c10d rendezvous the first of them hosts. Returns node 0's output."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    nodes = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1',
                               f'--node_rank={rank}', '--rdzv_backend=c10d', f'--rdzv_endpoint=localhost:{port}',
                               '--rdzv_id=two_nodes', '--rdzv_conf=join_timeout=120', '--max_restarts=0',
                               os.path.join(REPO, args[0]), *args[1:]],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    deadline = time.time() + 300
    while any(node.poll() is None for node in nodes) and time.time() < deadline:
        if any(node.poll() not in (None, 0) for node in nodes):
            break   # one node failed: the other would wait for it at torchrun's exit barrier for minutes
        time.sleep(0.2)
    for node in nodes:
        if node.poll() is None:
            node.kill()
    outputs = [node.communicate() for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, f"{' '.join(node.args)} failed:\n{out[-3000:]}\n{err[-3000:]}"
    return outputs[0][0] + outputs[1][0]


@pytest.mark.slow
def test_compression_on_two_nodes_takes_the_step_of_one_process(tmp_path, synthetic_dir):
    common = SMALL_RUN + [f'--data_dir={synthetic_dir}', '--max_iters=1', '--global_batch_size=4', '--batch_size=2']
    run_script('train_compression.py', *common, f'--out_dir={tmp_path}/one', cwd=tmp_path)
    out = run_on_two_nodes('train_compression.py', *common, f'--out_dir={tmp_path}/nodes', cwd=tmp_path)
    assert '2 processes on 2 nodes' in out
    one = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=False)
    nodes = torch.load(tmp_path / 'nodes' / 'ckpt.pt', weights_only=False)
    for name, p in one['model'].items():   # equal up to fp32 summation order (as the one-node DDP test)
        torch.testing.assert_close(nodes['model'][name], p, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sampling_on_two_nodes_takes_the_steps_of_one_process(raw_data, tmp_path):
    run_script(*train_args(raw_data, tmp_path / 'one', '--max_iters=4'))
    out = run_on_two_nodes(*train_args(raw_data, tmp_path / 'nodes', '--max_iters=4'), cwd=tmp_path)
    assert '2 processes on 2 nodes' in out and '2 process(es) x batch 2 x 2 accumulation' in out
    one, nodes = trained(tmp_path / 'one'), trained(tmp_path / 'nodes')
    assert one['step'] == nodes['step'] == 4
    for n, p in one['trainable'].items():   # tolerance as test_all.py's one-node DDP test
        assert torch.allclose(p, nodes['trainable'][n], atol=1e-5, rtol=1e-4), n


# ===============================================================================================
# machinery/slurm_sampling.sh: the paper's multi-node launch under SLURM, with stand-ins for srun and scontrol
# ===============================================================================================


def _fake_slurm(tmp_path, hide_probe=False):
    """Stand-ins for srun (runs its command once, here: one node's view; hide_probe: a node that does
    not see the files the batch script made), scontrol (three hosts) and torchrun (records its argv)."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'srun').write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  + ('find . -name ".shared_check_*" -delete\n' if hide_probe else '') + '"$@"\n')
    (bin_dir / 'scontrol').write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && '
                                      'printf "gpu-07\\ngpu-08\\ngpu-09\\n"\n')
    (bin_dir / 'torchrun').write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > torchrun_args.txt\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID='4242', SLURM_JOB_NUM_NODES='3',
                SLURM_JOB_NODELIST='gpu-[07-09]', JOIN_TIMEOUT='120')


def test_slurm_script_launches_one_torchrun_per_node_with_c10d_on_the_first(tmp_path):
    env = _fake_slurm(tmp_path)
    res = subprocess.run(['bash', os.path.join(REPO, 'machinery', 'slurm_sampling.sh'), '--max_iters=100'],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert '3 nodes x 8 GPUs; rendezvous at gpu-07:29500' in res.stdout
    assert (tmp_path / 'torchrun_args.txt').read_text().split() == [
        '--nnodes=3', '--nproc_per_node=8', '--rdzv_backend=c10d', '--rdzv_endpoint=gpu-07:29500',
        '--rdzv_id=4242', '--rdzv_conf=join_timeout=120', 'train_sampling.py', '--data_dir=data/1x',
        '--out_dir=out_sampling_paper', '--max_iters=100']
    assert not list(tmp_path.rglob('.shared_check_*'))   # the probe files are gone


def test_slurm_script_refuses_folders_a_node_does_not_see(tmp_path):
    env = _fake_slurm(tmp_path, hide_probe=True)
    res = subprocess.run(['bash', os.path.join(REPO, 'machinery', 'slurm_sampling.sh')], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert 'is not on storage every node sees' in res.stderr
    assert not (tmp_path / 'torchrun_args.txt').exists()   # no GPU started


def test_slurm_script_outside_slurm_says_how_to_submit(tmp_path):
    env = {k: v for k, v in _fake_slurm(tmp_path).items() if k != 'SLURM_JOB_ID'}
    res = subprocess.run(['bash', os.path.join(REPO, 'machinery', 'slurm_sampling.sh')], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert res.returncode != 0 and 'submit with sbatch machinery/slurm_sampling.sh' in res.stderr


# ===============================================================================================
# machinery/speed.py: a step's samples/s and MFU
# ===============================================================================================


def test_step_speed_on_the_cpu_is_samples_per_s_alone():
    speed = StepSpeed('cpu', samples_per_step=8, flops_per_step=1e9)
    speed.start()
    figures = speed.stop()
    assert figures['samples_per_s'] > 0 and figures['mfu'] is None and figures['max_mem_gib'] is None


def test_peak_flops_is_unknown_on_the_cpu():
    assert peak_flops('cpu') is None


# ===============================================================================================
# machinery/hub.py: downloads from the Hugging Face Hub
# ===============================================================================================


def test_hub_download_into_models_dir_keeps_one_plain_copy_in_the_official_layout(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    cfg = WanConfig.tiny()
    src = randomize(WanDiT(cfg, state_cond=False))
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, local_dir=None, **kw):   # the Hub, offline
        calls.append(dict(repo_id=repo_id, allow_patterns=allow_patterns, local_dir=local_dir))
        write_official_checkpoint(src, Path(local_dir or tmp_path / 'hub_cache' / 'snapshot'))
        return str(local_dir or tmp_path / 'hub_cache' / 'snapshot')
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', fake_snapshot_download)
    monkeypatch.setenv('NANOWM_MODELS_DIR', str(tmp_path / 'models'))
    loaded = load_dit('Wan-AI/Wan2.2-TI2V-5B', state_cond=False, r_dim=cfg.r_dim)
    assert calls == [dict(repo_id='Wan-AI/Wan2.2-TI2V-5B', local_dir=tmp_path / 'models' / 'Wan2.2-TI2V-5B',
                          allow_patterns=['config.json', 'diffusion_pytorch_model*', 'transformer/*'])]
    assert 'into ' + str(tmp_path / 'models' / 'Wan2.2-TI2V-5B') in capsys.readouterr().out
    assert not (tmp_path / 'hub_cache').exists()                       # one copy: no Hub cache beside it
    files = list((tmp_path / 'models' / 'Wan2.2-TI2V-5B').iterdir())
    assert len(files) == 4 and not any(p.is_symlink() for p in files)
    x, t_BL, context, _ = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x, t_BL, context), src(x, t_BL, context))
    # the folder then serves as it is (no download), and without NANOWM_MODELS_DIR the Hub cache is used
    assert resolve(tmp_path / 'models' / 'Wan2.2-TI2V-5B', ['*']) == tmp_path / 'models' / 'Wan2.2-TI2V-5B'
    monkeypatch.delenv('NANOWM_MODELS_DIR')
    assert resolve('Wan-AI/Wan2.2-TI2V-5B', ['config.json']) == tmp_path / 'hub_cache' / 'snapshot'
    assert len(calls) == 2 and calls[1]['local_dir'] is None


# ===============================================================================================
# machinery/tokenized.py: the tokenized data on disk, and the disk it needs
# ===============================================================================================


def test_a_download_that_would_fill_the_disk_stops_before_it_starts(tmp_path, synthetic_dir, monkeypatch):
    import functools
    import huggingface_hub
    import huggingface_hub.constants
    meta = data.read_json(os.path.join(synthetic_dir, 'train_v2.0', 'metadata.json'))
    whole = sum(data.expected_sizes(meta['num_images']).values())   # the split's bytes, from its metadata
    report = run_dir.disk_report

    def free(n):   # a disk with n bytes free
        monkeypatch.setattr(run_dir, 'disk_report', functools.partial(report, usage=lambda p: FakeUsage(n)))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))   # the disk of out
    free(whole - 1)
    with pytest.raises(SystemExit, match=r'not enough disk space: the train_v2\.0 download [\d.]+ MiB need'):
        tokenized.check_room_for(str(tmp_path / 'data'), 'train_v2.0', meta)
    tokenized.check_room_for(str(tmp_path / 'data'), 'train_v2.0', meta, shards=[0])   # half of it fits
    # a resumed download needs only what is missing: here nothing
    shutil.copytree(os.path.join(synthetic_dir, 'train_v2.0'), tmp_path / 'data' / 'train_v2.0')
    free(0)
    tokenized.check_room_for(str(tmp_path / 'data'), 'train_v2.0', meta)
    # a disk that fills up all the same is said as such, not as a network problem
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', full)
    with pytest.raises(SystemExit, match=r'the disk filled up while fetching val_v2\.0/metadata\.json'):
        hub.hub_file(data.HF_REPO_TOKENIZED, 'val_v2.0/metadata.json', str(tmp_path / 'data'), '')


def test_the_tokenized_download_counts_8_7_gib_less_what_is_there(tmp_path, synthetic_dir):
    n = tokenized.tokenized_bytes(str(tmp_path), ['train_v2.0', 'val_v2.0'])
    assert n == sum(data.expected_sizes(11_254_161).values()) + sum(data.expected_sizes(50_300).values())
    assert round(n / 2 ** 30, 1) == 8.7
    assert tokenized.tokenized_bytes(str(tmp_path), ['train_v2.0'], shards=[0, 1]) == sum(
        data.expected_sizes(11_254_161 * 2 // 100).values())
    # by the metadata on disk, less what is there: a whole split needs nothing, a split missing a shard that shard
    shutil.copytree(synthetic_dir, tmp_path / 'syn')
    assert tokenized.tokenized_bytes(str(tmp_path / 'syn'), ['train_v2.0', 'val_v2.0']) == 0
    shard = data.shard_paths(str(tmp_path / 'syn' / 'train_v2.0'), 1)
    missing = os.path.getsize(shard['video'])
    os.remove(shard['video'])
    # (an estimate: frames spread evenly over the shards, json files counted as held: within a block a shard)
    assert abs(tokenized.tokenized_bytes(str(tmp_path / 'syn'), ['train_v2.0']) - missing) < 2 * 3 * 32 * 32 * 4


# ===============================================================================================
# machinery/latents.py: raw clips encoded to latents, and the disk they need
# ===============================================================================================


def test_an_interrupted_encoding_resumes_with_its_own_settings_only(raw_data, tmp_path):
    from safetensors.torch import load_file, save_file
    raw = raw_data / 'train_v2.0_raw'
    whole = tmp_path / 'whole'
    n = latents.encode_raw_split(raw, whole, PixelCodec(), stride=77)
    info = json.loads((whole / 'encoding.json').read_text())
    assert info['stride'] == 77 and info['codec'] == 'PixelCodec' and info['clips'] == n == len(latents.LatentClips(whole))
    assert not (tmp_path / 'whole.partial').exists()
    # an interrupted run left shard 0 (marked: zero latents) in resumed.partial and no resumed/
    (tmp_path / 'resumed.partial').mkdir()
    shard0 = load_file(whole / 'latents_0.safetensors')
    save_file({**shard0, 'latents': torch.zeros_like(shard0['latents'])}, tmp_path / 'resumed.partial' / 'latents_0.safetensors')
    assert latents.encode_raw_split(raw, tmp_path / 'resumed', PixelCodec(), stride=77) == n
    resumed = load_file(tmp_path / 'resumed' / 'latents_0.safetensors')
    assert resumed['latents'].abs().max() == 0                          # kept, not encoded again
    assert torch.equal(load_file(tmp_path / 'resumed' / 'latents_1.safetensors')['latents'],
                       load_file(whole / 'latents_1.safetensors')['latents'])   # the rest encoded
    assert latents.encode_raw_split(raw, whole, PixelCodec(), stride=77) == n        # finished: kept as it is
    with pytest.raises(SystemExit, match='encoded with stride 77: pass --clip_stride=77'):
        latents.encode_raw_split(raw, whole, PixelCodec(), stride=8)
    # an interrupted encoding resumed with another stride is an error, not two strides under one encoding.json
    (tmp_path / 'mixed.partial').mkdir()
    settings = {k: v for k, v in info.items() if k != 'clips'}
    (tmp_path / 'mixed.partial' / 'settings.json').write_text(json.dumps(settings))
    with pytest.raises(SystemExit, match=r'mixed.partial has other settings \(stride=77 on disk, 8 asked for\)'):
        latents.encode_raw_split(raw, tmp_path / 'mixed', PixelCodec(), stride=8)


def test_encoded_latents_match_the_codec_on_raw_clips(raw_data):
    clips = data.RawClips(raw_data / 'train_v2.0_raw', stride=8)
    encoded = latents.LatentClips(raw_data / 'latents_pixel' / 'train_v2.0_raw')
    assert len(clips) == len(encoded) > 100
    for k in (0, len(clips) - 1):
        z, states = encoded[k]
        item = clips[k]
        assert torch.equal(z, PixelCodec().encode(frames_to_video(item['frames_THWC'][None]))[0])
        assert torch.equal(states, item['states_TD'])


def test_the_1x_latents_at_a_window_every_8_frames_are_0_83_terabytes(tmp_path):
    n = latents.latents_bytes(str(tmp_path), ['train_v2.0_raw'], 'wan', 8)
    assert n == 11_254_161 // 8 * 48 * 6 * 32 * 32 * 2 and round(n / 1e12, 2) == 0.83


def test_a_truncated_raw_metadata_json_stops_the_data_preparation_with_its_name(tmp_path):
    synthetic_video.write_synthetic_raw_set(tmp_path, train_shards=1, frames=200, size=SIZE, seed=0)
    meta = tmp_path / 'train_v2.0_raw' / 'metadata.json'
    meta.write_text(meta.read_text()[:20])
    with pytest.raises(SystemExit, match=rf'{meta} is not valid JSON .*: the file is truncated or damaged; download '
                                         rf'or write it again'):
        latents.raw_latents(str(tmp_path), ['train_v2.0_raw'], 'pixel', '', 8, 8, download=False, device='cpu')


@pytest.mark.parametrize('damage', ['flipped', 'resized'])
def test_a_damaged_or_resized_train_video_stops_the_encoding_with_its_name(tmp_path, damage):
    synthetic_video.write_synthetic_raw_set(tmp_path, train_shards=2, frames=200, size=SIZE, seed=0)
    train = tmp_path / 'train_v2.0_raw'
    if damage == 'flipped':
        flip_bytes_of_frame(train / 'videos' / 'video_1.mp4', 100)
        said = r"videos/video_1\.mp4: not the bytes its metadata's sha256 names: delete it and fetch it again"
    else:   # a shard of another data set: 64 px frames among 32 px ones
        synthetic_video.write_synthetic_raw(tmp_path / 'big', num_shards=2, frames_per_shard=200, size=2 * SIZE)
        for folder, name in data.shard_files(1, 'mp4').values():
            shutil.copy(tmp_path / 'big' / folder / name, train / folder / name)
        said = rf'videos/video_1\.mp4: frames are {2 * SIZE}x{2 * SIZE}, expected {SIZE}x{SIZE}'
    with pytest.raises(SystemExit, match=said):
        latents.raw_latents(str(tmp_path), ['train_v2.0_raw'], 'pixel', '', 8, 8, download=False, device='cpu')
    assert not (tmp_path / 'latents_pixel' / 'train_v2.0_raw').exists()   # nothing that looks finished


def test_the_disk_check_of_a_synthetic_run_counts_the_raw_videos_it_writes(tmp_path):
    settings = dict(train_shards=2, frames=300, size=SIZE, seed=0, val_frames=200)
    latents_only = (2 * 300 // 8) * 48 * 6 * (SIZE // 16) ** 2 * 4
    raw = (2 * 300 + 200) * (SIZE ** 2 // 4 + 26 * 4)   # frames x (a quarter byte a pixel + state row + segment id)
    assert latents.latents_bytes(str(tmp_path), ['train_v2.0_raw'], 'pixel', 8, settings) == raw + latents_only
    synthetic_video.write_synthetic_raw_set(tmp_path, **settings)
    written_bytes = sum(p.stat().st_size for s in ('train_v2.0_raw', 'val_v2.0_raw') for p in (tmp_path / s).rglob('*')
                        if p.is_file() and not p.name.endswith('.json'))
    assert 0.5 * raw < written_bytes <= raw   # a bound, not a wild one
    # once written (synthetic.json is there), only the latents are still to come
    assert latents.latents_bytes(str(tmp_path), ['train_v2.0_raw'], 'pixel', 8, settings) == latents_only


def test_a_full_disk_while_writing_latents_is_one_sentence_and_leaves_no_partial_file(tmp_path, monkeypatch):
    split = raw_split(tmp_path / 'raw', frames=200)

    def full(tensors, path):
        open(path, 'wb').write(b'half a file')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(latents, 'save_file', full)
    with pytest.raises(SystemExit, match=re.escape(f'could not write {tmp_path}/latents.partial/latents_0.safetensors '
                                                   f'(No space left on device): free space on its disk')):
        latents.encode_raw_split(split, tmp_path / 'latents', PixelCodec(), stride=8)
    assert sorted(os.listdir(tmp_path / 'latents.partial')) == ['settings.json']


# ===============================================================================================
# machinery/vae.py: the pixel codec and the Wan 2.2 VAE
# ===============================================================================================


def official_vae_names(sd):
    """diffusers AutoencoderKLWan names -> the original Wan2.2_VAE.pth names (wan/modules/vae2_2.py),
    written independently of the loader's map and in the other direction."""
    n_resnets = {}   # the official stage is one Sequential: its resnets, then the resampler
    for k in sd:
        m = re.match(r'(encoder\.down|decoder\.up)_blocks\.(\d+)\.resnets\.(\d+)\.', k)
        if m:
            n_resnets[m[1], m[2]] = max(n_resnets.get((m[1], m[2]), 0), int(m[3]) + 1)

    def stage(m):    # encoder.down_blocks.1.resnets.0. -> encoder.downsamples.1.downsamples.0.
        index = m[4] if m[3] == 'resnets.' else n_resnets[m[1], m[2]]
        return f"{m[1]}samples.{m[2]}.{m[1].split('.')[1]}samples.{index}."
    out = {}
    for k, v in sd.items():
        o = re.sub(r'(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets\.|downsampler|upsampler)(\d*)\.', stage, k)
        for a, b in (('.norm1.', '.residual.0.'), ('.conv1.', '.residual.2.'), ('.norm2.', '.residual.3.'),
                     ('.conv2.', '.residual.6.'), ('.conv_shortcut.', '.shortcut.'), ('.conv_in.', '.conv1.'),
                     ('.norm_out.', '.head.0.'), ('.conv_out.', '.head.2.'), ('mid_block.resnets.0.', 'middle.0.'),
                     ('mid_block.attentions.0.', 'middle.1.'), ('mid_block.resnets.1.', 'middle.2.')):
            o = o.replace(a, b)
        out[re.sub(r'^quant_conv\.', 'conv1.', re.sub(r'^post_quant_conv\.', 'conv2.', o))] = v
    return out


def test_pixel_codec_is_lossless_on_keyframes_in_wans_layout():
    codec = PixelCodec()
    video = torch.rand(2, 3, 21, SIZE, SIZE) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (2, 48, 6, SIZE // 4, SIZE // 4)
    back = codec.decode(z)
    assert back.shape == video.shape
    assert torch.equal(back[:, :, ::4], video[:, :, ::4])     # keyframes 0, 4, .., 20 (target included)
    assert torch.allclose(back[:, :, 1], 0.75 * video[:, :, 0] + 0.25 * video[:, :, 4])
    assert torch.equal(codec.encode(video[:, :, :5]), z[:, :, :2])   # context alone -> the same 2 latents


def test_pixel_codec_decodes_on_the_latents_device():
    z = torch.empty(2, 48, 6, 8, 8, device='meta')   # a tensor made without device= would be on the CPU: error
    assert PixelCodec().decode(z).shape == (2, 3, 21, 32, 32)


def test_official_vae_pth_loads_as_the_diffusers_layout(tmp_path):
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    mean, std = torch.linspace(-1, 1, 48).tolist(), torch.linspace(0.5, 3, 48).tolist()
    size = dict(base_dim=8, decoder_base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=mean,
                latents_std=std)
    tiny = AutoencoderKLWan(z_dim=48, temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16, **size)
    randomize(tiny, std=0.2)
    tiny.save_pretrained(tmp_path / 'diffusers' / 'vae')
    (tmp_path / 'official').mkdir()
    official = official_vae_names(tiny.state_dict())
    assert 'encoder.downsamples.1.downsamples.1.time_conv.weight' in official    # resampler after 1 resnet
    assert 'decoder.upsamples.0.upsamples.2.resample.1.weight' in official      # after 2 (num_res_blocks + 1)
    torch.save(official, tmp_path / 'official' / 'Wan2.2_VAE.pth')
    (tmp_path / 'official' / 'config.json').write_text(json.dumps(dict(dim=3072)))   # the DiT's, as in the repo
    want = WanVAE.from_pretrained(tmp_path / 'diffusers')
    for src in (tmp_path / 'official', tmp_path / 'official' / 'Wan2.2_VAE.pth'):
        got = WanVAE.from_pretrained(src, **size)
        video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
        z = got.encode(video)
        assert torch.equal(z, want.encode(video))
        assert torch.equal(got.decode(z), want.decode(z))
    # sample.py --vae_dtype=bfloat16: the same weights, cast as read; close to fp32's output
    half = WanVAE.from_pretrained(tmp_path / 'official', dtype=torch.bfloat16, **size)
    assert {p.dtype for p in half.vae.parameters()} == {torch.bfloat16}
    assert torch.allclose(half.decode(z), want.decode(z), atol=0.05)


def test_vae_latents_are_normalised_in_wans_layout(tmp_path):
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    mean, std = torch.linspace(-1, 1, 48).tolist(), torch.linspace(0.5, 3, 48).tolist()
    # the Wan 2.2 kind: 48 latent channels, 2x2 patchify + residual blocks, 16x spatial, 4x temporal
    tiny = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16,
                            latents_mean=mean, latents_std=std)
    tiny.save_pretrained(tmp_path / 'repo' / 'vae')
    vae = WanVAE.from_pretrained(tmp_path / 'repo')
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 48, 2, 2, 2)           # 1 + (5 - 1) / 4 latent frames, 32 / 16 pixels
    with torch.no_grad():
        mu = tiny.encode(video).latent_dist.mode()
    want = (mu - torch.tensor(mean).view(1, -1, 1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1, 1)
    assert torch.allclose(z, want, atol=1e-5)
    out = vae.decode(z)
    assert out.shape == (1, 3, 5, 32, 32) and out.abs().max() <= 1
    with pytest.raises(ValueError, match=r'\[B, 3, 4k\+1, H, W\]'):
        vae.encode(video[:, :, :4])
    # `python -m machinery.prepare encode_raw --codec=wan`: a raw split's clips as bf16 Wan latents, what training reads
    raw = tmp_path / 'raw'
    synthetic_video.write_synthetic_raw(raw, num_shards=1, frames_per_shard=200, size=32, seed=0, flat=True)
    prepare.main(['encode_raw', '--codec=wan', '--split', str(raw), '--out', str(tmp_path / 'latents'), '--vae_path',
                  str(tmp_path / 'repo'), '--device', 'cpu'])
    clips = latents.LatentClips(tmp_path / 'latents')
    frames_THWC, _ = data.RawShard(raw, 0).read_clip(data.RawShard(raw, 0).clip_starts()[0])
    z0, states = clips[0]
    assert z0.shape == (48, 6, 2, 2) and states.shape == (21, 25)
    want = vae.encode(frames_to_video(torch.from_numpy(frames_THWC)[None]))[0]
    torch.testing.assert_close(z0, want, atol=1e-2, rtol=8e-3)   # stored in bf16 (8 bits of mantissa)


def test_a_damaged_or_crafted_vae_file_stops_with_a_sentence_naming_it(tmp_path):
    pytest.importorskip('diffusers')
    root = tmp_path / 'official'
    root.mkdir()
    pth = root / 'Wan2.2_VAE.pth'
    for content, message in (([torch.zeros(3)], 'it holds no dict of named tensors'),
                             ({'conv1.weight': torch.full((3,), math.nan)}, 'conv1.weight holds NaN or inf values'),
                             ({'conv1.weight': torch.zeros(3)}, 'does not match the model config')):
        torch.save(content, pth)
        with pytest.raises(SystemExit, match=f'^the Wan 2.2 VAE: (checkpoint )?{pth}.*{message}'):
            WanVAE.from_pretrained(root)
    pth.unlink()
    with pytest.raises(SystemExit, match='has neither Wan2.2_VAE.pth'):
        WanVAE.from_pretrained(root)
    assert 'holds no dict of named tensors' in str(pytest.raises(ValueError, read_pth, _saved(tmp_path, 7)).value)


def _saved(tmp_path, obj):
    torch.save(obj, tmp_path / 'obj.pth')
    return tmp_path / 'obj.pth'


# ===============================================================================================
# machinery/wan_files.py: Wan checkpoints and their key names, the umT5 empty prompt, a run's model
# ===============================================================================================


def tiny_umt5(tmp_path):
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, feed_forward_proj='gated-gelu', dropout_rate=0.0)
    model = UMT5EncoderModel(config).eval()
    with torch.no_grad():   # T5 init leaves the norms at 1; make them matter
        for n, p in model.named_parameters():
            if 'layer_norm' in n:
                p.copy_(1 + 0.5 * torch.randn_like(p))
        want = model(input_ids=torch.tensor([[1]])).last_hidden_state[0]   # "" -> [EOS], EOS id 1
    return model, want


def test_from_pretrained_loads_official_sharded_layout(tmp_path):
    cfg = WanConfig.tiny()
    src = randomize(WanDiT(cfg, state_cond=False))
    write_official_checkpoint(src, tmp_path / 'ckpt')
    loaded = load_dit(tmp_path / 'ckpt', state_cond=True, r_dim=cfg.r_dim)
    assert loaded.cfg == cfg and loaded.state_cond
    assert all(p.device.type == 'cpu' and p.dtype == torch.float32 for p in loaded.parameters())
    x, t_BL, context, states = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x, t_BL, context, states), src(x, t_BL, context))


def test_from_pretrained_loads_diffusers_layout(tmp_path):
    cfg = WanConfig.tiny()
    src = randomize(WanDiT(cfg, state_cond=False))
    ref = diffusers_twin(cfg)
    ref.load_state_dict(to_diffusers_state_dict(src.state_dict()), strict=True)
    ref.save_pretrained(tmp_path / 'repo' / 'transformer')
    loaded = load_dit(tmp_path / 'repo', state_cond=False, text_len=cfg.text_len, r_dim=cfg.r_dim)
    assert loaded.cfg == cfg
    x, t_BL, context, _ = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x, t_BL, context), src(x, t_BL, context))


def test_from_pretrained_missing_shard_fails_clearly(tmp_path):
    root = write_official_checkpoint(randomize(WanDiT(WanConfig.tiny(), state_cond=False)), tmp_path / 'ckpt')
    (root / 'diffusion_pytorch_model-00002-of-00002.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='00002-of-00002.*download the checkpoint again'):
        load_dit(root)


def test_from_pretrained_truncated_shard_fails_clearly(tmp_path):
    root = write_official_checkpoint(randomize(WanDiT(WanConfig.tiny(), state_cond=False)), tmp_path / 'ckpt')
    shard = root / 'diffusion_pytorch_model-00001-of-00002.safetensors'
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match='00001-of-00002.safetensors: cannot read.*truncated'):
        load_dit(root)


def test_from_pretrained_lists_every_key_that_does_not_fit(tmp_path):
    from safetensors.torch import save_file
    cfg = WanConfig.tiny()
    sd = {k: v.contiguous() for k, v in randomize(WanDiT(cfg, state_cond=False)).state_dict().items()}
    del sd['blocks.1.ffn.2.bias']
    sd['blocks.0.extra.weight'] = torch.zeros(3)
    sd['head.head.weight'] = torch.zeros(7, cfg.dim)
    root = tmp_path / 'bad'
    root.mkdir()
    save_file(sd, str(root / 'diffusion_pytorch_model.safetensors'))
    (root / 'config.json').write_text(json.dumps(dict(dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
                                                      num_heads=cfg.num_heads, text_dim=cfg.text_dim,
                                                      text_len=cfg.text_len, freq_dim=cfg.freq_dim)))
    with pytest.raises(ValueError) as err:
        load_dit(root)
    msg = str(err.value)
    assert 'missing (1): blocks.1.ffn.2.bias' in msg
    assert 'unexpected (1): blocks.0.extra.weight' in msg
    assert 'wrong shape (1): head.head.weight: checkpoint (7, 64) vs model (192, 64)' in msg


def test_null_context_matches_transformers_umt5_on_eos(tmp_path):
    model, want = tiny_umt5(tmp_path)
    model.save_pretrained(tmp_path / 'repo' / 'text_encoder')
    cache = tmp_path / 'null.safetensors'
    ctx = null_context(tmp_path / 'repo', cache_path=cache, text_len=8)
    assert ctx.shape == (1, 8, 16)
    assert (ctx[0, :1] - want).abs().max() < 1e-5
    assert ctx[0, 1:].abs().max() == 0        # zero-padded to text_len as the reference does
    (tmp_path / 'repo' / 'text_encoder' / 'model.safetensors').unlink()
    assert torch.equal(null_context(tmp_path / 'repo', cache_path=cache, text_len=8), ctx)   # from the cache


def test_null_context_reads_original_umt5_checkpoint(tmp_path):
    model, want = tiny_umt5(tmp_path)
    hf = model.state_dict()
    orig = {'token_embedding.weight': hf['shared.weight'], 'norm.weight': hf['encoder.final_layer_norm.weight']}
    for i in range(2):
        p = f'encoder.block.{i}.layer.'
        orig.update({f'blocks.{i}.norm1.weight': hf[p + '0.layer_norm.weight'],
                     f'blocks.{i}.norm2.weight': hf[p + '1.layer_norm.weight'],
                     f'blocks.{i}.ffn.gate.0.weight': hf[p + '1.DenseReluDense.wi_0.weight'],
                     f'blocks.{i}.ffn.fc1.weight': hf[p + '1.DenseReluDense.wi_1.weight'],
                     f'blocks.{i}.ffn.fc2.weight': hf[p + '1.DenseReluDense.wo.weight'],
                     f'blocks.{i}.pos_embedding.embedding.weight':
                         hf[p + '0.SelfAttention.relative_attention_bias.weight']})
        for n in 'qkvo':
            orig[f'blocks.{i}.attn.{n}.weight'] = hf[p + f'0.SelfAttention.{n}.weight']
    (tmp_path / 'official').mkdir()
    torch.save(orig, tmp_path / 'official' / 'models_t5_umt5-xxl-enc-bf16.pth')
    ctx = null_context(tmp_path / 'official', cache_path=tmp_path / 'n.safetensors', text_len=8)
    assert (ctx[0, :1] - want).abs().max() < 1e-5


def test_a_file_nanowm_cannot_read_or_write_is_named(tmp_path):
    import pickle

    class Payload:   # a pickle that would run code when loaded without weights_only
        def __reduce__(self):
            return (os.system, ('echo ran',))
    root = tmp_path / 'official'
    root.mkdir()
    with open(root / 'Wan2.2_VAE.pth', 'wb') as f:
        pickle.dump({'w': Payload()}, f)
    with pytest.raises(SystemExit, match='Wan2.2_VAE.pth: not a weights file nanoWM can read'):
        WanVAE.from_pretrained(root)
    torch.save({'w': torch.zeros(1000)}, root / 'Wan2.2_VAE.pth')
    (root / 'Wan2.2_VAE.pth').write_bytes((root / 'Wan2.2_VAE.pth').read_bytes()[:500])   # truncated
    with pytest.raises(SystemExit, match='not a weights file nanoWM can read'):
        WanVAE.from_pretrained(root)
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(SystemExit, match='cannot write the LoRA files into'):
        export_lora({'state_embedder.null': torch.zeros(4)}, tmp_path / 'a_file')


def test_build_model_passes_null_state_to_a_pretrained_base(tmp_path):
    base = write_official_checkpoint(randomize(WanDiT(WanConfig.tiny(), state_cond=False)), tmp_path / 'base')
    kw = dict(model='tiny', pretrained=str(base), train_mode='lora', lora_rank=4, lora_alpha=4, init_seed=0,
              device='cpu', dtype=torch.float32, tiny={})
    without, with_null = build_model(**kw, null_state=False), build_model(**kw)
    assert 'state_embedder.null' not in dict(without.named_parameters())
    assert with_null.state_embedder.null.requires_grad


def test_a_damaged_or_crafted_dit_checkpoint_is_one_sentence_naming_its_file(tmp_path):
    from safetensors.torch import save_file
    kw = dict(model='tiny', train_mode='lora', lora_rank=4, lora_alpha=4, init_seed=0, device='cpu',
              dtype=torch.float32, tiny={})
    for name, damage, message in (
            ('truncated_config', lambda root: (root / 'config.json').write_text('{"dim": 6'),
             r'config.json: not the config.json of a Wan DiT \(JSONDecodeError'),
            ('crafted_config', lambda root: (root / 'config.json').write_text(json.dumps(dict(dim='64', num_heads=-2))),
             r"config.json: dim='64', num_heads=-2: a Wan DiT's sizes are positive numbers"),
            ('nan_weights', None, r'00001-of-00002.safetensors: [\w.]+ holds NaN or inf values')):
        root = write_official_checkpoint(randomize(WanDiT(WanConfig.tiny(), state_cond=False)), tmp_path / name)
        if damage:
            damage(root)
        else:
            shard = root / 'diffusion_pytorch_model-00001-of-00002.safetensors'
            sd = load_file(str(shard))
            sd[next(iter(sd))].view(-1)[0] = math.nan
            save_file(sd, str(shard))
        with pytest.raises(ValueError, match=message):
            load_dit(root)
        with pytest.raises(SystemExit, match=f'^--pretrained={root}: .*' + message):   # the scripts' path
            build_model(pretrained=str(root), **kw)


def test_a_crafted_or_damaged_text_encoder_is_named(tmp_path, monkeypatch, capsys):
    pytest.importorskip('transformers')
    model, _ = tiny_umt5(tmp_path)
    hf = model.state_dict()
    root = tmp_path / 'official'
    root.mkdir()
    torch.save({'token_embedding.weight': hf['shared.weight']}, root / 'models_t5_umt5-xxl-enc-bf16.pth')   # no blocks
    with pytest.raises(ValueError, match=f"{root}: not the weights of Wan's umT5-XXL encoder \\(KeyError"):
        null_context(root, cache_path=tmp_path / 'a.safetensors', text_len=8)
    model.save_pretrained(tmp_path / 'repo' / 'text_encoder')
    shard = tmp_path / 'repo' / 'text_encoder' / 'model.safetensors'
    from safetensors.torch import save_file
    sd = load_file(str(shard))
    sd['encoder.final_layer_norm.weight'][:] = math.nan
    save_file(sd, str(shard), metadata={'format': 'pt'})
    with pytest.raises(ValueError, match='the umT5 encoding of the empty prompt holds NaN or inf values'):
        null_context(tmp_path / 'repo', cache_path=tmp_path / 'b.safetensors', text_len=8)
    assert not (tmp_path / 'b.safetensors').exists()   # nothing cached
    # a disk without room for the cache: the context all the same, and a note
    model.save_pretrained(tmp_path / 'repo' / 'text_encoder')

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr('machinery.wan_files.save_file', full_disk)
    ctx = null_context(tmp_path / 'repo', cache_path=tmp_path / 'c.safetensors', text_len=8)
    assert ctx.shape == (1, 8, 16) and torch.isfinite(ctx).all()
    assert 'not cached in' in capsys.readouterr().out and os.listdir(tmp_path).count('c.safetensors') == 0


FAST = ['--ensemble=2', '--steps=1', '--max_clips=2', '--gif=False', '--lpips_fid=False']


def test_build_model_without_state_cond_builds_the_base_model():
    net = build_model(model='tiny', pretrained='', train_mode='full', lora_rank=4, lora_alpha=4, init_seed=0,
                      device='cpu', dtype=torch.float32, tiny=WAN_TINY, state_cond=False)
    assert not net.state_cond and not any(k.startswith('state_embedder.') for k in net.state_dict())


def test_a_full_run_folder_is_the_frozen_base_of_a_lora_run_with_fresh_state_weights(tmp_path):
    base = base_run(tmp_path / 'stage1')
    assert run_settings(tmp_path / 'stage1')['dim'] == WAN_TINY['dim']
    assert run_settings('Wan-AI/Wan2.2-TI2V-5B') is None and run_settings(tmp_path) is None
    net = stage_two(tmp_path / 'stage1')
    assert net.state_cond and lora_modules(net)
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained == {n for n in net.state_dict() if '.lora_' in n or n.startswith('state_embedder.')}
    sd = net.state_dict()
    for k, v in base.state_dict().items():   # the base's weights, exactly
        assert torch.equal(sd[k], v), k
    x, t_BL, context, states = inputs(net.cfg)
    with torch.no_grad():   # zero LoRA B and AdaLN-Zero's zero output: the model starts as the base
        assert torch.allclose(net(x, t_BL, context, states), base(x, t_BL, context), atol=1e-6)
    again = stage_two(tmp_path / 'stage1')   # the state embedder's init: from init_seed
    assert all(torch.equal(again.state_dict()[k], v) for k, v in sd.items() if k.startswith('state_embedder.'))


def test_a_lora_run_is_refused_as_a_base_with_the_flag_to_use(tmp_path):
    base_run(tmp_path / 'lora_run', train_mode='lora')
    with pytest.raises(SystemExit, match=r'a LoRA run \(train_mode lora\).*--init_lora='):
        stage_two(tmp_path / 'lora_run')


def test_text_context_of_a_base_run_folder_is_the_one_it_trained_on(tmp_path):
    base_run(tmp_path / 'stage1')
    cfg = WanConfig.tiny(**WAN_TINY)
    assert torch.equal(text_context(cfg, str(tmp_path / 'stage1'), 'cpu'), text_context(cfg, 'zeros', 'cpu'))


# ===============================================================================================
# machinery/lora_files.py: LoRA files in (every Wan tool's format) and out (ComfyUI's keys), the export command
# ===============================================================================================


def diffusers_pipe(base):
    """diffusers' WanPipeline around a twin of `base` (a WanDiT without LoRA): the reference loader."""
    from diffusers import WanPipeline
    twin = diffusers_twin(base.cfg)
    twin.load_state_dict(to_diffusers_state_dict(base.state_dict()), strict=True)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=twin)


def twin(model):
    other = WanDiT(model.cfg, state_cond=False)
    other.load_state_dict(model.state_dict())
    return other


def trained_lora_model(seed=0):
    model = randomize(WanDiT(WanConfig.tiny()), seed=seed)
    add_lora(model, rank=4, alpha=4)
    for m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    return model


def write_lora(fmt, lora, path, alpha):
    """The same adapters as another tool writes them."""
    from safetensors.torch import save_file
    if fmt == 'diffusers':   # diffusers' own writer, with its PEFT metadata (r, lora_alpha)
        from diffusers import WanPipeline
        layers = to_diffusers_state_dict({f'{name}.lora_{p}.weight': w for name, (A, B) in lora.items()
                                          for p, w in (('A', A), ('B', B))})   # blocks.0.attn1.to_q.lora_A.weight
        WanPipeline.save_lora_weights(path.parent, transformer_lora_layers=layers, weight_name=path.name,
                                      transformer_lora_adapter_metadata=dict(r=4, lora_alpha=alpha, target_modules=[
                                          'to_q', 'to_k', 'to_v', 'to_out.0', 'ffn.net.0.proj', 'ffn.net.2']))
        return
    sd = {}
    for name, (A, B) in lora.items():
        if fmt == 'comfyui':
            sd.update({f'diffusion_model.{name}.lora_down.weight': A, f'diffusion_model.{name}.lora_up.weight': B,
                       f'diffusion_model.{name}.alpha': torch.tensor(float(alpha))})
        elif fmt == 'musubi':
            k = 'lora_unet_' + name.replace('.', '_')
            sd.update({f'{k}.lora_down.weight': A, f'{k}.lora_up.weight': B, f'{k}.alpha': torch.tensor(float(alpha))})
        elif fmt == 'diffsynth':
            sd.update({f'{name}.lora_A.default.weight': A, f'{name}.lora_B.default.weight': B})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def effective_weight(model, name):
    """The weight a linear applies: W merged, or W + B A alpha / rank with adapters."""
    m = model.get_submodule(name)
    return m.weight + m.delta() if lora_modules(model) and not m.merged else m.weight.clone()


def tiny_run_model(rank):
    """The DiT train_sampling.py builds for --train_mode=lora: zero-initialised adapters of `rank`."""
    return build_model(model='tiny', pretrained='', train_mode='lora', lora_rank=rank, lora_alpha=rank, init_seed=0,
                       device='cpu', dtype=torch.float32, tiny={})


def test_trainable_weights_round_trip_through_their_file(tmp_path):
    cfg = WanConfig.tiny()
    base = randomize(WanDiT(cfg, state_cond=False)).state_dict()
    model = WanDiT(cfg)
    model.load_state_dict(base, strict=False)
    add_lora(model, rank=4, alpha=4)
    randomize(model.state_embedder, seed=3)
    for m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.01)
    save_trainable(model, tmp_path / 'lora.safetensors')

    fresh = WanDiT(cfg)
    fresh.load_state_dict(base, strict=False)
    load_trainable(fresh, tmp_path / 'lora.safetensors')          # adds rank-4 LoRA from the metadata
    assert 'blocks.0.self_attn.q.lora_A.weight' in trainable_state_dict(fresh)
    assert 'blocks.1.ffn.2.lora_B.weight' in trainable_state_dict(fresh)
    assert not any(k.endswith('q.weight') for k in trainable_state_dict(fresh))
    x, t_BL, context, states = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(fresh(x, t_BL, context, states), model(x, t_BL, context, states))


def test_exported_lora_loads_in_diffusers_with_the_output_of_our_merged_model(tmp_path):
    cfg = WanConfig.tiny()
    model = randomize(WanDiT(cfg, state_cond=False))
    base = WanDiT(cfg, state_cond=False)
    base.load_state_dict(model.state_dict())
    add_lora(model, rank=4, alpha=8)                       # alpha != rank: the scale 2 must survive
    for m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    assert [p.name for p in export_lora(model, tmp_path)] == ['lora.safetensors']   # no state embedder here
    pipe = diffusers_pipe(base)
    pipe.load_lora_weights(str(tmp_path), weight_name='lora.safetensors')          # as a user calls it
    x, t_BL, context, _ = inputs(cfg)
    with torch.no_grad():
        merge_lora(model)
        ours, want, plain = model(x, t_BL, context), pipe.transformer(x, t_BL, context).sample, base(x, t_BL, context)
    assert (ours - plain).abs().max() > 1e-2          # the LoRA changes the output
    assert (ours - want).abs().max() < 1e-4


def test_exported_lora_has_comfyui_keys_with_alpha_folded_in(tmp_path):
    from safetensors.torch import load_file
    cfg = WanConfig.tiny()
    model = randomize(WanDiT(cfg))
    add_lora(model, rank=4, alpha=8)
    for m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    export_lora(model, tmp_path)
    sd = load_file(str(tmp_path / 'lora.safetensors'))
    assert len(sd) == 3 * 10 * cfg.num_layers
    m = model.blocks[1].cross_attn.o
    key = 'diffusion_model.blocks.1.cross_attn.o'
    assert sd[f'{key}.alpha'].item() == 4.0              # alpha = rank: scale 1 whoever reads it...
    delta = sd[f'{key}.lora_B.weight'] @ sd[f'{key}.lora_A.weight']
    assert torch.allclose(delta, m.delta(), atol=1e-6)   # ...so B @ A alone (DiffSynth) is the update
    assert set(load_file(str(tmp_path / 'state_embedder.safetensors'))) == {
        k for k in model.state_dict() if k.startswith('state_embedder.')}


def test_the_export_of_a_checkpoint_loads_back_exactly(tmp_path):
    cfg = WanConfig.tiny()
    model = randomize(WanDiT(cfg))
    add_lora(model, rank=4, alpha=2)
    randomize(model.state_embedder, seed=3)
    for m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    base = {k: v for k, v in model.state_dict().items() if '.lora_' not in k and not k.startswith('state_embedder.')}
    ckpt = dict(kind='sampling', trainable={n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                config=dict(lora_rank=4, lora_alpha=2))   # as train_sampling.py writes it
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    lora_files_main(['export', '--ckpt', str(tmp_path / 'ckpt.pt')])   # python -m machinery.lora_files export --ckpt ...
    fresh = WanDiT(cfg)
    fresh.load_state_dict(base, strict=False)
    load_lora(fresh, tmp_path)                   # the folder: lora.safetensors + state_embedder.safetensors
    x, t_BL, context, states = inputs(cfg)
    with torch.no_grad():
        assert (fresh(x, t_BL, context, states) - model(x, t_BL, context, states)).abs().max() < 1e-5


def test_step_numbered_exports_keep_the_newest_beside_the_latest(tmp_path):
    from safetensors.torch import load_file
    model = trained_lora_model()
    for step in (100, 200, 300, 400):
        with torch.no_grad():
            model.blocks[0].ffn[0].lora_B.weight.fill_(step)
        written = export_lora(model, tmp_path, step=step, keep_last=2)
    assert [p.name for p in written] == ['lora_step0000400.safetensors', 'lora.safetensors',
                                         'state_embedder_step0000400.safetensors', 'state_embedder.safetensors']
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'lora.safetensors', 'lora_step0000300.safetensors', 'lora_step0000400.safetensors',
        'state_embedder.safetensors', 'state_embedder_step0000300.safetensors',
        'state_embedder_step0000400.safetensors']
    key = 'diffusion_model.blocks.0.ffn.0.lora_B.weight'
    assert load_file(str(tmp_path / 'lora.safetensors'))[key].unique().tolist() == [400.0]
    assert load_file(str(tmp_path / 'lora_step0000300.safetensors'))[key].unique().tolist() == [300.0]
    export_lora(model, tmp_path, step=50, keep_last=1)   # a run started over here: later steps are left alone
    assert (tmp_path / 'lora_step0000400.safetensors').exists() and (tmp_path / 'lora_step0000050.safetensors').exists()
    with pytest.raises(ValueError, match='keep_last=0: a count >= 1'):
        export_lora(model, tmp_path, step=500, keep_last=0)


def test_exported_files_get_the_mode_of_ckpt_pt(tmp_path):
    old = os.umask(0o027)   # a shared machine's umask: group may read
    try:
        written = export_lora(trained_lora_model(), tmp_path)
        torch.save({}, tmp_path / 'ckpt.pt')   # checkpoints.save_checkpoint writes ckpt.pt with torch.save
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {stat.S_IMODE((tmp_path / 'ckpt.pt').stat().st_mode)} \
        == {0o640}
    assert not list(tmp_path.glob('*.tmp'))


def test_export_command_refuses_to_replace_lora_files_unless_overwrite(tmp_path, capsys):
    model = trained_lora_model()
    ckpt = dict(kind='sampling', trainable={n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                config=dict(lora_rank=4, lora_alpha=4))
    torch.save(ckpt, tmp_path / 'ckpt_best.pt')
    export_lora(trained_lora_model(seed=1), tmp_path)   # the run's latest export, already there
    latest = (tmp_path / 'lora.safetensors').read_bytes()
    with pytest.raises(SystemExit, match=r'lora.safetensors exists: pass --out with another folder, or --overwrite'):
        lora_files_main(['export', '--ckpt', str(tmp_path / 'ckpt_best.pt')])
    assert (tmp_path / 'lora.safetensors').read_bytes() == latest
    lora_files_main(['export', '--ckpt', str(tmp_path / 'ckpt_best.pt'), '--out', str(tmp_path / 'best')])
    lora_files_main(['export', '--ckpt', str(tmp_path / 'ckpt_best.pt'), '--overwrite'])
    replaced = (tmp_path / 'lora.safetensors').read_bytes()
    assert replaced == (tmp_path / 'best' / 'lora.safetensors').read_bytes() and replaced != latest


def test_a_full_disk_during_a_lora_export_is_one_sentence_with_no_tmp_left(tmp_path, monkeypatch):
    path = tmp_path / 'lora.safetensors'
    save_atomic({'w': torch.ones(2)}, path)
    real_replace = os.replace

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'replace', full_disk)
    with pytest.raises(SystemExit, match=r'could not write .*lora.safetensors \(No space left on device\): free space'):
        save_atomic({'w': torch.zeros(2)}, path)
    monkeypatch.setattr(os, 'replace', real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['lora.safetensors']
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(path))['w'], torch.ones(2))


@pytest.mark.parametrize('fmt', ['comfyui', 'diffusers', 'musubi', 'diffsynth'])
def test_load_lora_reads_each_common_format_as_its_tool_applies_it(tmp_path, fmt):
    cfg = WanConfig.tiny()
    base = randomize(WanDiT(cfg, state_cond=False))
    lora = random_lora(cfg)
    write_lora(fmt, lora, tmp_path / 'file.safetensors', alpha=8)
    x, t_BL, context, _ = inputs(cfg)
    if fmt == 'diffsynth':   # DiffSynth's GeneralLoRALoader: W += B @ A (no alpha)
        ref = WanDiT(cfg, state_cond=False)
        ref.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, (A, B) in lora.items():
                ref.get_submodule(name).weight += B @ A
            want = ref(x, t_BL, context)
    else:                    # diffusers' own loader reads the other three (scale 8 / 4)
        pipe = diffusers_pipe(base)
        pipe.load_lora_weights(str(tmp_path), weight_name='file.safetensors')
        with torch.no_grad():
            want = pipe.transformer(x, t_BL, context).sample
    model = WanDiT(cfg, state_cond=False)
    model.load_state_dict(base.state_dict())
    load_lora(model, tmp_path / 'file.safetensors')             # as trainable adapters of the file's rank
    assert {m.rank for m in lora_modules(model)} == {4} and len(lora_modules(model)) == 10 * cfg.num_layers
    merged = WanDiT(cfg, state_cond=False)
    merged.load_state_dict(base.state_dict())
    load_lora(merged, tmp_path / 'file.safetensors', merge=True)  # into the base weights
    with torch.no_grad():
        got, got_merged, plain = model(x, t_BL, context), merged(x, t_BL, context), base(x, t_BL, context)
    assert (want - plain).abs().max() > 1e-2
    assert (got - want).abs().max() < 1e-4
    assert (got_merged - want).abs().max() < 1e-4


def test_a_lora_file_that_does_not_fit_leaves_the_model_unchanged(tmp_path):
    from safetensors.torch import save_file
    cfg = WanConfig.tiny()
    lora = random_lora(cfg)
    model = randomize(WanDiT(cfg, state_cond=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def comfy(lora, **extra):
        sd = {f'diffusion_model.{n}.lora_{p}.weight': w for n, (A, B) in lora.items() for p, w in (('A', A), ('B', B))}
        return {**sd, **extra}
    bad = {'wider': (comfy({**lora, 'blocks.0.ffn.0': (torch.zeros(4, cfg.dim + 1), lora['blocks.0.ffn.0'][1])}),
                     r'blocks.0.ffn.0 has A \(4, 65\) .* linear maps 64 -> 128: the LoRA is for another model'),
           'nan': (comfy({**lora, 'blocks.1.self_attn.o': (lora['blocks.1.self_attn.o'][0], torch.full((64, 4), math.nan))}),
                   'blocks.1.self_attn.o.lora_B.weight holds NaN or inf'),
           'twice': (comfy(lora, **{'blocks.0.self_attn.q.lora_A.default.weight': lora['blocks.0.self_attn.q'][0]}),
                     'blocks.0.self_attn.q has its A twice .* mixes two LoRA formats'),
           'ranks': (comfy(lora, **{'diffusion_model.blocks.0.self_attn.k.lora_B.weight': torch.zeros(64, 3)}),
                     'must be \\[rank, in\\] and B \\[out, rank\\]')}
    for name, (sd, message) in bad.items():
        save_file({k: v.clone() for k, v in sd.items()}, str(tmp_path / f'{name}.safetensors'))
        for merge in (False, True):
            with pytest.raises(ValueError, match=message):
                load_lora(model, tmp_path / f'{name}.safetensors', merge=merge)
    (tmp_path / 'text.safetensors').write_text('not a LoRA')
    with pytest.raises(ValueError, match='not a readable safetensors LoRA file'):
        load_lora(model, tmp_path / 'text.safetensors')
    assert not lora_modules(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_lora_alpha_is_read_as_each_tool_reads_it(tmp_path):
    from safetensors.torch import save_file
    cfg = WanConfig.tiny()
    lora = random_lora(cfg)   # rank 4
    for fmt, alpha, scale in (('musubi', 0, 1.0), ('musubi', 8, 2.0), ('comfyui', 0, 0.0), ('diffsynth', None, 1.0)):
        write_lora(fmt, lora, tmp_path / 'file.safetensors', alpha=alpha)   # kohya, musubi: alpha 0 means rank
        assert {s for _, _, s in read_lora(tmp_path / 'file.safetensors', cfg.num_layers).values()} == {scale}, fmt
    # PEFT metadata: lora_alpha, overridden per module by alpha_pattern (diffusers names)
    sd = {f'transformer.{k}': v.contiguous() for k, v in to_diffusers_state_dict(
        {f'{n}.lora_{p}.weight': w for n, (A, B) in lora.items() for p, w in (('A', A), ('B', B))}).items()}
    meta = dict(r=4, lora_alpha=8, alpha_pattern={'attn1.to_q': 2})
    save_file(sd, str(tmp_path / 'peft.safetensors'), metadata={'lora_adapter_metadata': json.dumps(meta)})
    scales = {n: s for n, (_, _, s) in read_lora(tmp_path / 'peft.safetensors', cfg.num_layers).items()}
    assert scales['blocks.0.self_attn.q'] == scales['blocks.1.self_attn.q'] == 0.5
    assert {s for n, s in scales.items() if not n.endswith('self_attn.q')} == {2.0}


def test_legacy_diffusers_naming_loads_to_the_update_of_the_same_weights_in_peft_naming(tmp_path):
    cfg = WanConfig.tiny()
    lora = random_lora(cfg)   # rank 4
    legacy = save_lora(tmp_path / 'legacy.safetensors', lora, 'legacy')
    peft = save_lora(tmp_path / 'peft.safetensors', lora, 'peft')
    with open(legacy, 'rb') as f:   # the file really holds the legacy names
        assert b'transformer.blocks.0.attn1.to_q.lora.down.weight' in f.read(20000)
    got, want = read_lora(legacy, cfg.num_layers), read_lora(peft, cfg.num_layers)
    assert len(got) == len(want) == 10 * cfg.num_layers
    for name, (A, B, scale) in want.items():
        assert torch.equal(got[name][0], A) and torch.equal(got[name][1], B) and got[name][2] == scale == 1.0
    base = randomize(WanDiT(cfg, state_cond=False))
    model = load_lora(twin(base), legacy)
    pipe = diffusers_pipe(base)   # diffusers maps .lora.down -> .lora_A itself: the reference
    pipe.load_lora_weights(str(tmp_path), weight_name='legacy.safetensors')
    x, t_BL, context, _ = inputs(cfg)
    with torch.no_grad():
        ours, ref, plain = model(x, t_BL, context), pipe.transformer(x, t_BL, context).sample, base(x, t_BL, context)
    assert (ref - plain).abs().max() > 1e-2
    assert (ours - ref).abs().max() < 1e-4


def test_legacy_naming_reads_alpha_tensors_as_comfyui_does(tmp_path):
    from safetensors.torch import load_file, save_file
    cfg = WanConfig.tiny()
    path = save_lora(tmp_path / 'legacy.safetensors', random_lora(cfg), 'legacy')
    sd = load_file(str(path))
    sd.update({k.replace('.lora.down.weight', '.alpha'): torch.tensor(8.0) for k in list(sd) if 'lora.down' in k})
    save_file(sd, str(path))
    assert {s for _, _, s in read_lora(path, cfg.num_layers).values()} == {2.0}   # alpha 8 / rank 4


@pytest.mark.parametrize('merge', [False, True], ids=['adapters', 'merged'])
def test_lora_scale_multiplies_the_files_update(tmp_path, merge):
    cfg = WanConfig.tiny()
    path = save_lora(tmp_path / 'peft.safetensors', random_lora(cfg), 'peft')
    base = randomize(WanDiT(cfg, state_cond=False))
    x, t_BL, context, _ = inputs(cfg)
    with torch.no_grad():
        off = load_lora(twin(base), path, merge=merge, scale=0.0)
        assert torch.equal(off(x, t_BL, context), base(x, t_BL, context))
        update = {s: effective_weight(load_lora(twin(base), path, merge=merge, scale=s), 'blocks.1.ffn.2')
                  - base.blocks[1].ffn[2].weight for s in (0.5, 1.0)}
    assert update[1.0].abs().max() > 1e-2
    assert torch.allclose(update[0.5], update[1.0] / 2, atol=1e-6)
    with pytest.raises(ValueError, match='LoRA scale nan: a finite number'):
        load_lora(twin(base), path, merge=merge, scale=float('nan'))


def test_init_lora_makes_the_files_update_the_trainable_adapters_of_a_new_run(tmp_path):
    cfg = WanConfig.tiny()
    lora = random_lora(cfg)   # rank 4
    path = save_lora(tmp_path / 'peft.safetensors', lora, 'peft',
                     metadata={'lora_adapter_metadata': json.dumps(dict(r=4, lora_alpha=8))})   # scale 2
    model = randomize(tiny_run_model(rank=4))   # a pretrained base (a random one's zero head passes no gradient)
    for m in lora_modules(model):
        torch.nn.init.zeros_(m.lora_B.weight)   # a new run's adapters: B = 0
    base = {k: v.clone() for k, v in model.state_dict().items() if '.lora_' not in k}
    load_lora(model, path)
    m = model.blocks[0].self_attn.q
    assert m.scale == 1.0                                       # the run's alpha / rank stays
    assert torch.allclose(m.delta(), lora['blocks.0.self_attn.q'][1] @ lora['blocks.0.self_attn.q'][0] * 2.0, atol=1e-6)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len([n for n in trainable if '.lora_' in n]) == 2 * 10 * cfg.num_layers
    assert all('.lora_' in n or n.startswith('state_embedder.') for n in trainable)
    # a step of training moves the loaded adapters
    x, t_BL, context, states = inputs(cfg)
    model(x, t_BL, context, states).square().mean().backward()
    assert m.lora_B.weight.grad.abs().max() > 0


def test_init_lora_of_another_rank_is_refused_with_the_rank_to_pass(tmp_path):
    cfg = WanConfig.tiny()
    path = save_lora(tmp_path / 'peft.safetensors', random_lora(cfg, rank=4), 'peft')
    model = tiny_run_model(rank=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r'adapters of rank 4, the model\'s of rank 8: .*--lora_rank=4'):
        load_lora(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_no_state_token_travels_in_an_export_only_where_the_model_has_one(tmp_path, capsys):
    def model(null_state, seed):
        net = randomize(WanDiT(WanConfig.tiny(null_state=null_state)), seed=seed)
        add_lora(net, rank=4, alpha=4)
        return net
    export_lora(model(False, 1), tmp_path / 'without')
    export_lora(model(True, 2), tmp_path / 'with')
    assert 'state_embedder.null' not in load_file(str(tmp_path / 'without' / 'state_embedder.safetensors'))
    assert 'state_embedder.null' in load_file(str(tmp_path / 'with' / 'state_embedder.safetensors'))
    # a file with the token into a model without: the token left out, with a note; the rest loaded
    target = model(False, 3)
    load_lora(target, tmp_path / 'with')
    assert 'state_embedder.null left out (this model has no no-state embedding)' in capsys.readouterr().out
    exported = load_file(str(tmp_path / 'with' / 'state_embedder.safetensors'))
    assert all(torch.equal(v, exported[k]) for k, v in target.state_dict().items() if k in exported)
    # a file without it into a model with one: the model keeps its own token, with a note
    target = model(True, 4)
    own = target.state_embedder.null.detach().clone()
    load_lora(target, tmp_path / 'without')
    assert 'no state_embedder.null in it: the model keeps its own' in capsys.readouterr().out
    assert torch.equal(target.state_embedder.null, own)


@pytest.mark.parametrize('alpha, where', [
    (torch.tensor(math.nan), 'tensor'), (torch.tensor(1e20), 'tensor'),
    (math.nan, 'peft'), (1e20, 'peft'), ('thirty-two', 'peft')])
def test_a_lora_alpha_that_is_no_sane_number_is_named_with_its_file(tmp_path, alpha, where):
    from safetensors.torch import save_file
    cfg = WanConfig.tiny()
    lora = random_lora(cfg)
    path = tmp_path / 'bad.safetensors'
    if where == 'tensor':   # ComfyUI / kohya: a .alpha tensor per module
        sd = {f'diffusion_model.{n}.lora_{p}.weight': w for n, (A, B) in lora.items() for p, w in (('A', A), ('B', B))}
        sd['diffusion_model.blocks.0.self_attn.q.alpha'] = alpha
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        key = 'diffusion_model.blocks.0.self_attn.q.alpha'
    else:   # diffusers / PEFT: lora_alpha in the file's metadata
        save_lora(path, lora, 'peft', metadata={'lora_adapter_metadata': json.dumps(dict(r=4, lora_alpha=alpha))})
        key = 'a lora_alpha in its lora_adapter_metadata'
    model = randomize(WanDiT(cfg, state_cond=False))
    message = 'holds NaN or inf' if where == 'tensor' and math.isnan(alpha) else \
        re.escape(f'{key} is ') + r'.*not a LoRA alpha \(a number of at most 10,000 in size'
    with pytest.raises(ValueError, match=re.escape(str(path)) + '.*' + message):
        load_lora(model, path)
    assert not lora_modules(model)


def test_a_lora_file_without_tensors_is_refused_not_loaded_as_nothing(tmp_path):
    from safetensors.torch import save_file
    save_file({}, str(tmp_path / 'empty.safetensors'))
    model = tiny_run_model(rank=4)
    with pytest.raises(ValueError, match='empty.safetensors holds no LoRA tensors: an empty or unfinished file'):
        load_lora(model, tmp_path / 'empty.safetensors')
    (tmp_path / 'folder').mkdir()   # an export folder whose lora.safetensors is empty: refused too
    save_file({}, str(tmp_path / 'folder' / 'lora.safetensors'))
    with pytest.raises(ValueError, match='lora.safetensors holds no LoRA tensors'):
        load_lora(model, tmp_path / 'folder')
    # train_sampling.py --init_lora goes through build_model: one sentence naming the flag and the file
    with pytest.raises(SystemExit, match=f'--init_lora={tmp_path}/empty.safetensors: .*holds no LoRA tensors'):
        build_model(model='tiny', pretrained='', train_mode='lora', lora_rank=4, lora_alpha=4, init_seed=0,
                    device='cpu', dtype=torch.float32, tiny={}, init_lora=str(tmp_path / 'empty.safetensors'))


def test_non_finite_state_weights_in_an_export_folder_are_named_before_anything_loads(tmp_path):
    from safetensors.torch import save_file
    model = trained_lora_model()
    export_lora(model, tmp_path)
    sd = load_file(str(tmp_path / 'state_embedder.safetensors'))
    sd['state_embedder.mlp_in.0.weight'][0, 0] = math.inf
    save_file(sd, str(tmp_path / 'state_embedder.safetensors'))
    target = trained_lora_model(seed=1)
    adapter = target.blocks[0].self_attn.q.lora_B.weight.clone()
    embedding = target.state_embedder.mlp_in[0].weight.clone()
    with pytest.raises(ValueError, match=r'state_embedder.safetensors: state_embedder.mlp_in.0.weight holds NaN'):
        load_lora(target, tmp_path)   # checked before anything loads: the model as it was
    assert torch.equal(target.blocks[0].self_attn.q.lora_B.weight, adapter)
    assert torch.equal(target.state_embedder.mlp_in[0].weight, embedding)


def test_a_full_disk_during_an_export_keeps_the_older_exports_whole(tmp_path, monkeypatch):
    export_lora(trained_lora_model(), tmp_path, step=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'fsync', full_disk)
    with pytest.raises(SystemExit, match=r'^could not write .*lora_step0000002.safetensors \(No space left on '
                                         r'device\): free space on its disk .*then resume or export again'):
        export_lora(trained_lora_model(seed=1), tmp_path, step=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before   # no .tmp, the older files as they were
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(SystemExit, match='cannot write the LoRA files into .*a_file'):
        export_lora(trained_lora_model(), tmp_path / 'a_file')


def base_run(root, train_mode='full', seed=0):
    """A stage-1 run folder as train_sampling.py writes it: a tiny base trained without states (every weight
    in ckpt['trainable']), its settings in ckpt['config']."""
    cfg = WanConfig.tiny(**WAN_TINY)
    base = randomize(WanDiT(cfg, state_cond=False), seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    config = dict(model='tiny', **WAN_TINY, train_mode=train_mode, use_states=False, vae='pixel',
                  text_encoder='zeros', pretrained='', frame_size=32)
    checkpoints.save_checkpoint(str(root), dict(kind='sampling', step=7, config=config,
                                                trainable={k: v.clone() for k, v in base.state_dict().items()}))
    return base


def stage_two(pretrained, state_cond=True, train_mode='lora'):
    return build_model(model='tiny', pretrained=str(pretrained), train_mode=train_mode, lora_rank=4, lora_alpha=4,
                       init_seed=3, device='cpu', dtype=torch.float32, tiny={}, state_cond=state_cond)


@pytest.mark.parametrize('fmt, alpha, want', [('musubi', 8, 8.0), ('musubi', 0, 4.0), ('comfyui', 2, 2.0),
                                             ('diffsynth', None, 4.0)])
def test_lora_rank_alpha_reads_a_files_rank_and_alpha_without_a_model(tmp_path, fmt, alpha, want):
    write_lora(fmt, random_lora(WanConfig.tiny(**WAN_TINY), rank=4), tmp_path / 'f.safetensors', alpha)
    assert lora_rank_alpha(tmp_path / 'f.safetensors') == (4, want)


def test_lora_rank_alpha_reads_peft_metadata_and_an_export_folder(tmp_path):
    cfg = WanConfig.tiny(**WAN_TINY)
    save_lora(tmp_path / 'peft.safetensors', random_lora(cfg, rank=4), 'peft',
              metadata={'lora_adapter_metadata': json.dumps(dict(r=4, lora_alpha=16))})
    assert lora_rank_alpha(tmp_path / 'peft.safetensors') == (4, 16.0)
    model = build_model(model='tiny', pretrained='', train_mode='lora', lora_rank=8, lora_alpha=16, init_seed=0,
                        device='cpu', dtype=torch.float32, tiny=WAN_TINY)
    export_lora(model, tmp_path / 'export')   # alpha / rank folded into B: the file's alpha is its rank
    assert lora_rank_alpha(tmp_path / 'export') == (8, 8.0)
    (tmp_path / 'export' / 'lora.safetensors').unlink()   # state weights alone: no adapters to size
    assert lora_rank_alpha(tmp_path / 'export') == (None, None)


def test_lora_rank_alpha_refuses_a_bad_file_in_a_sentence_naming_it(tmp_path):
    from safetensors.torch import save_file
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(b'not a safetensors file')
    with pytest.raises(SystemExit, match=f'{bad}: not a readable safetensors LoRA file'):
        lora_rank_alpha(bad)
    save_file({'other': torch.zeros(1)}, str(tmp_path / 'empty.safetensors'))
    with pytest.raises(SystemExit, match='not LoRA adapters'):
        lora_rank_alpha(tmp_path / 'empty.safetensors')
    save_file({}, str(tmp_path / 'none.safetensors'))
    with pytest.raises(SystemExit, match='holds no LoRA tensors'):
        lora_rank_alpha(tmp_path / 'none.safetensors')
    lora = random_lora(WanConfig.tiny(**WAN_TINY), rank=4)
    lora['blocks.0.ffn.0'] = (lora['blocks.0.ffn.0'][0] * math.nan, lora['blocks.0.ffn.0'][1])
    save_lora(tmp_path / 'nan.safetensors', lora, 'peft')
    with pytest.raises(SystemExit, match='holds NaN or inf'):
        lora_rank_alpha(tmp_path / 'nan.safetensors')
    write_lora('musubi', random_lora(WanConfig.tiny(**WAN_TINY)), tmp_path / 'a.safetensors', 1e9)
    with pytest.raises(SystemExit, match='not a LoRA alpha'):
        lora_rank_alpha(tmp_path / 'a.safetensors')
    with pytest.raises(SystemExit, match='no LoRA file'):
        lora_rank_alpha(tmp_path / 'missing')


def test_stacked_lora_files_give_the_sum_of_their_updates_at_their_strengths(tmp_path):
    cfg = WanConfig.tiny(**WAN_TINY)
    base = randomize(WanDiT(cfg, state_cond=False))
    a, b = random_lora(cfg, rank=4, seed=1), random_lora(cfg, rank=2, seed=2)
    del b['blocks.0.ffn.0']   # a module only one file adapts
    write_lora('musubi', a, tmp_path / 'a.safetensors', alpha=8)   # scale 2
    save_lora(tmp_path / 'b.safetensors', b, 'peft')               # scale 1
    model = twin(base)
    add_lora(model, rank=8, alpha=8)   # a LoRA run's own adapters: replaced
    stack_loras(model, [(tmp_path / 'a.safetensors', 0.8), (tmp_path / 'b.safetensors', -0.5)])
    assert {m.rank for m in lora_modules(model)} == {6}   # ranks concatenated
    for name, (A, B) in a.items():
        want = 0.8 * 2 * B @ A + (-0.5 * b[name][1] @ b[name][0] if name in b else 0)
        assert torch.allclose(model.get_submodule(name).delta(), want, atol=1e-6), name
    x, t_BL, context, _ = inputs(cfg)
    with torch.no_grad():
        stack_loras(model, [(tmp_path / 'a.safetensors', 0.0)])   # strength 0: the base again
        assert torch.allclose(model(x, t_BL, context), base(x, t_BL, context), atol=1e-6)
    with pytest.raises(ValueError, match='strength nan'):
        stack_loras(model, [(tmp_path / 'a.safetensors', math.nan)])


def test_exports_carry_rank_alpha_base_model_step_and_what_diffusers_and_kohya_read(tmp_path):
    from safetensors import safe_open
    model = build_model(model='tiny', pretrained='', train_mode='lora', lora_rank=4, lora_alpha=8, init_seed=0,
                        device='cpu', dtype=torch.float32, tiny=WAN_TINY)
    for m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    written = export_lora(model, tmp_path, step=40, info=dict(base_model='Wan-AI/Wan2.2-TI2V-5B'))
    assert [p.name for p in written] == ['lora_step0000040.safetensors', 'lora.safetensors',
                                         'state_embedder_step0000040.safetensors', 'state_embedder.safetensors']
    with safe_open(str(tmp_path / 'lora.safetensors'), 'pt') as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ('lora_rank', 'lora_alpha', 'base_model', 'step', 'ss_network_dim',
                                 'ss_network_alpha', 'ss_base_model_version')} == dict(
        lora_rank='4', lora_alpha='4', base_model='Wan-AI/Wan2.2-TI2V-5B', step='40', ss_network_dim='4',
        ss_network_alpha='4', ss_base_model_version='Wan-AI/Wan2.2-TI2V-5B')   # alpha / rank is folded into B
    peft = json.loads(meta['lora_adapter_metadata'])
    assert peft['transformer.r'] == peft['transformer.lora_alpha'] == 4
    assert peft['transformer.target_modules'] == sorted(['attn1.to_q', 'attn1.to_k', 'attn1.to_v', 'attn1.to_out.0',
                                                          'attn2.to_q', 'attn2.to_k', 'attn2.to_v', 'attn2.to_out.0',
                                                          'ffn.net.0.proj', 'ffn.net.2'])
    assert lora_rank_alpha(tmp_path) == (4, 4.0)
    again = tmp_path / 'again'
    export_lora(model, again, step=40, info=dict(base_model='Wan-AI/Wan2.2-TI2V-5B'))   # the same bytes
    assert (again / 'lora.safetensors').read_bytes() == (tmp_path / 'lora.safetensors').read_bytes()
    fresh = tiny_lora_model()
    load_lora(fresh, tmp_path)   # the update round-trips with the metadata in the file
    for m, n in zip(lora_modules(model), lora_modules(fresh)):
        assert torch.allclose(m.delta(), n.delta(), atol=1e-6)


def tiny_lora_model():
    return build_model(model='tiny', pretrained='', train_mode='lora', lora_rank=4, lora_alpha=4, init_seed=0,
                       device='cpu', dtype=torch.float32, tiny=WAN_TINY)


# ===============================================================================================
# machinery/synthetic_tokens.py: the compression track's synthetic world
# ===============================================================================================


def test_the_synthetic_token_worlds_bayes_floor_is_exact(tmp_path, synthetic_dir):
    synthetic_tokens.write_synthetic(str(tmp_path), seed=0)
    for f in ('train_v2.0/videos/video_1.bin', 'train_v2.0/robot_states/states_1.bin', 'val_v2.0/video_0.bin'):
        assert (tmp_path / f).read_bytes() == open(os.path.join(synthetic_dir, f), 'rb').read()
    ds = data.TokenDataset(os.path.join(synthetic_dir, 'train_v2.0'), vocab_size=1000)
    world = ds.metadata['synthetic']
    sums, lags = torch.zeros(3), []
    for j in range(0, len(ds), 48):  # chunks of 8 samples: the oracle logits are 8 x 3072 x 1000
        z, s = (torch.stack(x) for x in zip(*[ds[i] for i in range(j, min(j + 48, len(ds)), 6)]))
        target = z[:, 3:].reshape(-1)
        oracle = synthetic_tokens.synthetic_oracle_logits(z, s, world).reshape(-1, 1000)
        blind = synthetic_tokens.synthetic_oracle_logits(z, s, world, use_states=False).reshape(-1, 1000)
        sums += torch.tensor([F.cross_entropy(oracle, target, reduction='sum'), cross_entropy_topk(oracle, target).sum(),
                              F.cross_entropy(blind, target, reduction='sum')]) / 1024
        lags.append(s[:, -34:, synthetic_tokens.LAG_DIM][:, [data.grid_frames(g)[0] for g in (3, 4, 5)]])
    lags = torch.cat(lags)
    full, topk, blind = (sums / lags.numel()).tolist()
    # the closed form equals the metric applied to the Bayes predictor, given the fraction of
    # new places in these samples (their tokens are many, the grids few: the fraction is noisy)
    p_new = (lags == 0).float().mean().item()
    every_lag = torch.stack([ds[i][1][-34:, synthetic_tokens.LAG_DIM][[17, 18, 26]] for i in range(len(ds))])
    assert (every_lag == 0).float().mean().item() == pytest.approx(synthetic_tokens.SYNTHETIC_P_NEW, abs=0.03)  # 8/27
    floors = synthetic_tokens.synthetic_floors(world['vocab'], world['eps'], p_new=p_new)
    assert full == pytest.approx(floors['full'], abs=0.01)
    assert topk == pytest.approx(floors['topk'], abs=0.02)
    # ignoring the states costs most of a nat: the states are needed
    assert blind > floors['full'] + 0.4


def test_the_synthetic_writer_finishes_only_sets_of_its_own_settings(tmp_path):
    small = dict(train_shards=1, train_frames=340, val_frames=340)
    synthetic_tokens.write_synthetic(str(tmp_path), **small)
    video = tmp_path / 'val_v2.0' / 'video_0.bin'
    good = video.read_bytes()
    # interrupted: a half-written split and no synthetic.json -> written again, not reused
    (tmp_path / 'synthetic.json').unlink()
    video.write_bytes(good[:100])
    (tmp_path / 'train_v2.0.partial').mkdir()
    synthetic_tokens.write_synthetic(str(tmp_path), **small)
    assert video.read_bytes() == good and not (tmp_path / 'train_v2.0.partial').exists()
    with pytest.raises(SystemExit, match='other settings \\(vocab=1000 on disk, 2000 asked for\\)'):
        synthetic_tokens.write_synthetic(str(tmp_path), vocab=2000, **small)
    (tmp_path / 'synthetic.json').write_text('{"settings": {"seed"')
    with pytest.raises(ValueError, match='synthetic.json is not valid JSON'):
        synthetic_tokens.write_synthetic(str(tmp_path), **small)


# ===============================================================================================
# machinery/synthetic_video.py: the sampling track's synthetic world
# ===============================================================================================


def test_synthetic_clips_follow_their_states(tmp_path):
    for name, seed in (('a', 3), ('b', 3), ('c', 4)):
        synthetic_video.write_synthetic_raw(tmp_path / name, num_shards=1, frames_per_shard=300, size=SIZE, seed=seed)
    a, b, c = (data.RawShard(tmp_path / n, 0) for n in 'abc')
    assert np.array_equal(a.states_ND, b.states_ND) and np.array_equal(a.segment_N, b.segment_N)
    assert np.array_equal(a.read_frames(0, 77), b.read_frames(0, 77))
    assert not np.array_equal(a.states_ND, c.states_ND)
    starts = a.clip_starts(stride=10)
    assert starts and all(len(set(a.segment_N[s:s + 77])) == 1 for s in starts)
    assert all(len(set(a.segment_N[s:s + 77])) > 1 for s in range(300 - 76) if s not in a.clip_starts(stride=1))
    frames_THWC, states_TD = a.read_clip(starts[0])
    assert frames_THWC.shape == (21, SIZE, SIZE, 3) and states_TD.shape == (21, 25)
    assert np.array_equal(frames_THWC[20], a.read_frames(starts[0] + 76, 1)[0])
    assert np.array_equal(states_TD[20], a.states_ND[starts[0] + 76])
    # the picture is a function of the states: moving an arm joint moves its disc
    tex = synthetic_video._texture(np.random.default_rng(0), SIZE * 3 // 2)
    s = np.zeros(25, np.float32)
    moved = s.copy()
    moved[6] = 0.8
    assert np.abs(synthetic_video.render_synthetic_frame(tex, s, SIZE).astype(int) - synthetic_video.render_synthetic_frame(tex, moved, SIZE)).sum() > 0


def test_the_synthetic_world_redraws_any_frame_for_any_states(tmp_path):
    synthetic_video.write_synthetic_raw(tmp_path / 'val', num_shards=2, frames_per_shard=300, size=SIZE, seed=5, flat=True)
    shard = data.RawShard(tmp_path / 'val', 1)
    start = shard.clip_starts()[0]
    frames_THWC, states_TD = shard.read_clip(start)
    redrawn = synthetic_video.synthetic_frame(tmp_path / 'val', 1, start + data.TARGET_FRAME, states_TD[-1])
    assert np.abs(redrawn.astype(int) - frames_THWC[-1]).max() <= 2   # the recorded frame, up to the codec's rounding
    swung = synthetic_video.arms_swing_across(states_TD)
    assert np.array_equal(swung[:data.NUM_CONTEXT_FRAMES], states_TD[:data.NUM_CONTEXT_FRAMES])   # context untouched
    others = [j for j in range(25) if j not in synthetic_video.SYNTHETIC_ARM_X]
    assert np.all(swung[data.NUM_CONTEXT_FRAMES:, others] == states_TD[data.NUM_CONTEXT_FRAMES - 1, others])   # still
    for j in synthetic_video.SYNTHETIC_ARM_X:   # each arm ends on the far side of where it was
        assert swung[-1, j] == pytest.approx(-0.8 if states_TD[data.NUM_CONTEXT_FRAMES - 1, j] >= 0 else 0.8)
    counterfactual = synthetic_video.synthetic_frame(tmp_path / 'val', 1, start + data.TARGET_FRAME, swung[-1])
    assert np.abs(counterfactual.astype(int) - redrawn).max() > 100   # the arm discs moved
    synthetic_video.write_synthetic_raw(tmp_path / 'other', num_shards=1, frames_per_shard=300, size=SIZE, seed=6, flat=True)
    meta = json.loads((tmp_path / 'other' / 'metadata.json').read_text())
    del meta['synthetic']
    (tmp_path / 'other' / 'metadata.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='not a synthetic split'):
        synthetic_video.synthetic_frame(tmp_path / 'other', 0, 100, states_TD[-1])


def test_writing_the_synthetic_raw_set_keeps_an_encoding_of_other_data(tmp_path):
    out = tmp_path / 'data'
    other = out / 'latents_wan' / 'train_v2.0_raw'   # the encoding of a real split whose videos were deleted
    other.mkdir(parents=True)
    (other / 'encoding.json').write_text('{"clips": 1}')
    unrelated = out / 'latents_pixel' / 'my_split'
    unrelated.mkdir(parents=True)
    (unrelated / 'latents_0.safetensors').write_text('x')
    with pytest.raises(SystemExit, match=re.escape(f"{other} holds an encoding of other train_v2.0_raw data: refusing")):
        synthetic_video.write_synthetic_raw_set(out, train_shards=1, frames=100, size=SIZE)
    assert (other / 'encoding.json').read_text() == '{"clips": 1}'
    shutil.rmtree(out / 'latents_wan')
    assert synthetic_video.write_synthetic_raw_set(out, train_shards=1, frames=100, size=SIZE)
    assert (unrelated / 'latents_0.safetensors').read_text() == 'x'


def test_an_encoding_of_an_unfinished_synthetic_set_is_written_again(tmp_path):
    out = tmp_path / 'data'
    synthetic_video.write_synthetic_raw_set(out, train_shards=1, frames=100, size=SIZE)
    (out / 'synthetic.json').unlink()   # interrupted: its encoding is of data written again below
    stale = out / 'latents_pixel' / 'train_v2.0_raw'
    stale.mkdir(parents=True)
    assert synthetic_video.write_synthetic_raw_set(out, train_shards=1, frames=100, size=SIZE)
    assert not stale.exists() and (out / 'latents_pixel').exists()


def test_a_full_disk_while_writing_the_synthetic_set_is_one_sentence_and_leaves_nothing_finished(tmp_path):
    code = (f"import sys; sys.path.insert(0, {REPO!r})\nfrom machinery import synthetic_video\n"
            f"synthetic_video.write_synthetic_raw_set({str(tmp_path)!r}, train_shards=1, frames=300, size=64)")
    limit = 100_000   # bytes a file may have (ulimit -f): the 64 px video needs ~200 kB
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr[-2000:]
    assert re.fullmatch(rf'could not write {tmp_path}/train_v2\.0_raw\.partial/videos/video_0\.mp4 \(File too large\): '
                        r'free space on its disk \(or fix its permissions\), then run again\n', res.stderr), res.stderr
    left = [p.name for p in tmp_path.rglob('*')]
    assert not [n for n in left if n.endswith('.tmp')] and 'synthetic.json' not in left and 'train_v2.0_raw' not in left


# ===============================================================================================
# machinery/own_clips.py: your own clips in the raw 1X layout
# ===============================================================================================


def write_clip(folder, name, frames=80, size=32, state_width=25, state_rows=None, seed=0):
    """NAME.mp4 (frame k: a gradient shifted by k, so frames are told apart) + NAME.npy states."""
    import av
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    ramp = np.add.outer(np.arange(size), np.arange(size)) * 4
    for k in range(frames):
        video[k] = ((ramp + 3 * k + 40 * seed)[..., None] + np.array([0, 60, 120])) % 256
    with av.open(str(folder / f'{name}.mp4'), 'w') as container:
        stream = container.add_stream('libx264', rate=30)
        stream.width = stream.height = size
        stream.pix_fmt, stream.options = 'yuv444p', {'crf': '0'}
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
        container.mux(stream.encode())
    states = g.standard_normal((state_rows or frames, state_width)).astype(np.float32)
    np.save(folder / f'{name}.npy', states)
    return video, states


def test_own_clips_become_the_raw_layout_that_the_sampling_reader_reads(tmp_path, capsys):
    import data
    from machinery import own_clips
    clips = {name: write_clip(tmp_path / 'clips', name, frames=80 + 10 * i, seed=i)
             for i, name in enumerate(('arm_a', 'arm_b', 'arm_c'))}
    own_clips.main(['--clips', str(tmp_path / 'clips'), '--out', str(tmp_path / 'mine'), '--size', '32', '--crf', '0'])
    assert 'train on it: python train_sampling.py --data_dir=' in capsys.readouterr().out
    train, val = tmp_path / 'mine' / 'train_v2.0_raw', tmp_path / 'mine' / 'val_v2.0_raw'
    assert latents.raw_split_is_whole(train) and latents.raw_split_is_whole(val)
    assert (train / 'videos' / 'video_1.mp4').exists() and (val / 'video_0.mp4').exists()   # nested / flat
    assert json.loads((train / 'metadata.json').read_text()) == dict(num_shards=2, query=None, hz=30, num_images=170)
    meta = json.loads((val / 'metadata_0.json').read_text())
    assert meta == dict(shard_num_frames=100, shard_ind=0, source='arm_c.mp4', sha256=meta['sha256'])   # + a checksum
    for split, names in ((train, ('arm_a', 'arm_b')), (val, ('arm_c',))):
        ds = data.RawClips(str(split), stride=1, frame_size=(32, 32))
        for shard, name in enumerate(names):
            video, states = clips[name]
            starts = [s for i, s in ds.items if i == shard]
            assert starts == list(range(len(states) - 76))                 # one segment: every window is a clip
            item = ds[ds.items.index((shard, starts[-1]))]
            idx = np.array(data.clip_frame_indices()) + starts[-1]
            assert np.array_equal(item['states_TD'].numpy(), states[idx])
            diff = np.abs(item['frames_THWC'].numpy().astype(int) - video[idx].astype(int))
            assert diff.max() <= 3, f"{name}: frames differ by {diff.max()}"   # yuv444p round-off only


@pytest.mark.parametrize('case, message', [
    ('lengths', r'b.mp4 has 80 frames but .*b.npy 79 state rows: one row per frame'),
    ('width', r'b.npy: states of shape \(80, 24\), expected \(frames, 25\)'),
    ('size', r'b.mp4: frames are 48x48 \(height x width\), expected 32x32 \(--size'),
    ('no_states', r'b.mp4 has no b.npy'),
    ('no_video', r'b.npy has no b.mp4'),
    ('nan', r'b.npy: robot states hold nan at row \(frame\) 5, column 3'),
    ('short', r'b.npy: 40 frames; a training clip needs 77')])
def test_own_clips_name_a_bad_file_before_writing(tmp_path, case, message):
    from machinery import own_clips
    clips = tmp_path / 'clips'
    write_clip(clips, 'a')
    write_clip(clips, 'c', seed=2)
    kw = dict(lengths=dict(state_rows=79), width=dict(state_width=24), size=dict(size=48), short=dict(frames=40))
    write_clip(clips, 'b', seed=1, **kw.get(case, {}))
    if case == 'no_states':
        (clips / 'b.npy').unlink()
    if case == 'no_video':
        (clips / 'b.mp4').unlink()
    if case == 'nan':
        states = np.load(clips / 'b.npy')
        states[5, 3] = np.nan
        np.save(clips / 'b.npy', states)
    with pytest.raises(SystemExit, match=message):
        own_clips.main(['--clips', str(clips), '--out', str(tmp_path / 'mine'), '--size', '32'])
    assert not (tmp_path / 'mine').exists() or not any((tmp_path / 'mine').iterdir())


@pytest.mark.slow
def test_own_clips_train_with_train_sampling_as_the_converter_says(tmp_path):
    from machinery import own_clips
    for i, name in enumerate(('a', 'b', 'c')):
        write_clip(tmp_path / 'clips', name, frames=120, seed=i)
    own_clips.main(['--clips', str(tmp_path / 'clips'), '--out', str(tmp_path / 'mine'), '--size', '32'])
    out = run_script('train_sampling.py', f'--data_dir={tmp_path / "mine"}', f'--out_dir={tmp_path / "run"}',
                     '--dim=32', '--num_layers=1', '--num_heads=2', '--ffn_dim=64', '--batch_size=2',
                     '--global_batch_size=2', '--max_iters=1', '--eval_clips=1', '--eval_ensemble=2', '--eval_steps=2',
                     cwd=tmp_path)
    assert '12 training clips (train_v2.0_raw, a window every 8 frames)' in out   # 2 videos x 6 windows of 120 frames
    assert (tmp_path / 'run' / 'ckpt.pt').exists()


@pytest.mark.slow
def test_prepare_own_clips_writes_a_folder_train_sampling_trains_on(tmp_path):
    for i, name in enumerate(('a', 'b', 'c')):
        write_clip(tmp_path / 'clips', name, frames=120, seed=i)
    said = run_script('machinery.prepare', 'own_clips', '--clips', str(tmp_path / 'clips'), '--out', str(tmp_path / 'mine'),
                      '--size', '32', cwd=tmp_path)
    assert f'train on it: python train_sampling.py --data_dir={tmp_path / "mine"}' in said
    out = run_script('train_sampling.py', f'--data_dir={tmp_path / "mine"}', f'--out_dir={tmp_path / "run"}',
                     *(f'--{k}={v}' for k, v in WAN_TINY.items()), '--batch_size=2', '--global_batch_size=2',
                     '--max_iters=2', *VAL, cwd=tmp_path)
    assert '12 training clips (train_v2.0_raw, a window every 8 frames)' in out   # 2 videos x 6 windows of 120 frames
    assert [r['step'] for r in read_log(tmp_path / 'run')] == [1, 2]


def test_own_clips_keep_each_videos_sha256_for_the_reader(tmp_path):
    for i, name in enumerate(('a', 'b')):
        write_clip(tmp_path / 'clips', name, frames=80, seed=i)
    own_clips.main(['--clips', str(tmp_path / 'clips'), '--out', str(tmp_path / 'mine'), '--size', '32', '--crf', '0'])
    val = tmp_path / 'mine' / 'val_v2.0_raw'
    import hashlib
    assert json.loads((val / 'metadata_0.json').read_text())['sha256'] == \
        hashlib.sha256((val / 'video_0.mp4').read_bytes()).hexdigest()
    assert not [p for p in (tmp_path / 'mine').rglob('*.tmp')]


# ===============================================================================================
# machinery/pictures.py: labelled frame grids and GIFs
# ===============================================================================================


def _frames(n, px=32, seed=0, colours=None):
    """n random uint8 frames [px, px, 3]; with colours, drawn from that many distinct colours (GIF-exact)."""
    rng = np.random.default_rng(seed)
    if colours is None:
        return list(rng.integers(0, 256, (n, px, px, 3), dtype=np.uint8))
    palette = rng.integers(0, 256, (colours, 3), dtype=np.uint8)
    return list(palette[rng.integers(0, colours, (n, px, px))])


def _find(image, frame_HWC):
    """(y, x) of every place where frame_HWC appears pixel-exact in image."""
    a = np.asarray(image.convert('RGB'))
    h, w = frame_HWC.shape[:2]
    ys, xs = np.nonzero((a[:a.shape[0] - h + 1, :a.shape[1] - w + 1] == frame_HWC[0, 0]).all(-1))
    return [(y, x) for y, x in zip(ys, xs) if np.array_equal(a[y:y + h, x:x + w], frame_HWC)]


def test_upscale_uses_the_smallest_integer_factor_reaching_min_px():
    assert pictures.upscale(np.zeros((32, 32, 3), np.uint8)).shape == (128, 128, 3)
    assert pictures.upscale(np.zeros((30, 40, 3), np.uint8)).shape == (150, 200, 3)   # ceil(128 / 30) = 5
    assert pictures.upscale(np.zeros((512, 512, 3), np.uint8)).shape == (512, 512, 3)
    assert pictures.upscale(np.zeros((32, 32, 3), np.uint8), min_px=64).shape == (64, 64, 3)


def test_upscale_is_nearest_neighbour():
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    big = pictures.upscale(img, min_px=6)
    assert big.shape == (6, 6, 3) and big.dtype == np.uint8
    for y in range(6):
        for x in range(6):
            assert (big[y, x] == img[y // 3, x // 3]).all()


def test_frames_must_be_uint8_hwc():
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\], got float32 \(32, 32\)"):
        pictures.upscale(np.zeros((32, 32), np.float32))


def test_grid_draws_every_frame_pixel_exact_in_its_cell():
    a, b, c = _frames(3)
    img = pictures.grid([[a, b], [c]], ['row one', 'row two'], ['left', 'right'], title='a title')
    (ya, xa), = _find(img, pictures.upscale(a))
    (yb, xb), = _find(img, pictures.upscale(b))
    (yc, xc), = _find(img, pictures.upscale(c))
    assert ya == yb and xb - xa == 128 + pictures.GAP   # same row, next column
    assert xc == xa and yc >= ya + 128                   # next row, first column
    assert img.width >= xb + 128 and img.height >= yc + 128


def test_grid_grows_with_its_cells():
    f = _frames(1)[0]
    one = pictures.grid([[f]], ['r'])
    wider = pictures.grid([[f, f]], ['r'])
    taller = pictures.grid([[f], [f]], ['r', 'r'])
    assert wider.width - one.width == 128 + pictures.GAP and wider.height == one.height
    assert taller.height - one.height >= 128 and taller.width == one.width


def test_grid_leaves_empty_cells_white():
    f = _frames(1)[0]
    img = np.asarray(pictures.grid([[None, f]], ['r']))
    (y, x), = _find(Image.fromarray(img), pictures.upscale(f))
    assert (img[y:y + 128, x - 128 - pictures.GAP:x] == 255).all()


def test_grid_text_is_never_clipped():
    f = _frames(1)[0]
    caption = 'a caption much wider than its cell with Pneumonoultramicroscopicsilicovolcanoconiosis'
    img = np.asarray(pictures.grid([[f]], ['a rather long row label'], [[caption]], title='a title wider than the one frame'))
    assert (img[0] == 255).all() and (img[-1] == 255).all() and (img[:, 0] == 255).all() and (img[:, -1] == 255).all()
    assert all(pictures._text_size(line)[0] <= 128 for line in pictures._fit(caption, 128).split('\n'))
    assert '...' in pictures._fit(caption, 128)


def test_grid_rejects_frames_of_different_sizes():
    with pytest.raises(ValueError, match='same size'):
        pictures.grid([[np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)]], ['r'])


def test_error_map_is_mean_absolute_error_times_gain_clipped():
    pred = np.zeros((2, 2, 3), np.uint8)
    truth = np.array([[[3, 6, 9], [0, 0, 0]], [[255, 255, 255], [10, 20, 30]]], np.uint8)
    err = pictures.error_map(pred, truth)
    assert err.dtype == np.uint8 and err.shape == (2, 2, 3)
    assert (err[..., 0] == [[24, 0], [255, 80]]).all() and (err[..., 0] == err[..., 2]).all()
    assert pictures.error_map(truth, pred, gain=1)[1, 1, 0] == 20   # symmetric


def test_clip_figure_shows_every_panel():
    context, members, (mean, truth) = _frames(5, seed=1), _frames(3, seed=2), _frames(2, seed=3)
    img = pictures.clip_figure(context, members, mean, truth, title='clip 0')
    for frame in [*context, *members, mean, truth, pictures.error_map(mean, truth)]:
        assert len(_find(img, pictures.upscale(frame))) == 1
    (y_ctx, _), (y_truth, x_truth) = _find(img, pictures.upscale(context[0]))[0], _find(img, pictures.upscale(truth))[0]
    assert y_truth > y_ctx + 128
    assert img.width >= x_truth + 2 * 128   # the error map is right of the truth


def test_counterfactual_figure_has_a_row_per_future():
    context = _frames(5, seed=4)
    preds, truths = _frames(2, seed=5), _frames(2, seed=6)
    futures = [dict(name=n, pred_HWC=p, truth_HWC=t, psnr_truth=20.0, psnr_orig=15.0)
               for n, p, t in zip(['own states', 'arms swung across'], preds, truths)]
    img = pictures.counterfactual_figure(context, futures)
    (y0, x0), = _find(img, pictures.upscale(truths[0]))
    (y1, x1), = _find(img, pictures.upscale(truths[1]))
    assert x0 == x1 and y1 - y0 > 128
    assert _find(img, pictures.upscale(preds[1])) == [(y1, x1 - 128 - pictures.GAP)]
    with pytest.raises(ValueError, match='psnr_orig'):
        pictures.counterfactual_figure(context, [dict(name='x', pred_HWC=preds[0], truth_HWC=truths[0], psnr_truth=1.0)])


def test_save_gif_writes_21_looping_frames_with_both_clips(tmp_path):
    frames = _frames(42, colours=16)
    predicted, real = np.stack(frames[:21]), np.stack(frames[21:])
    path = tmp_path / 'clip.gif'
    pictures.save_gif(path, [predicted, real], ['predicted', 'real'], fps=5)
    gif = Image.open(path)
    assert gif.n_frames == 21 and gif.info['loop'] == 0 and gif.info['duration'] == 200
    assert len(_find(gif, pictures.upscale(predicted[0]))) == 1 and len(_find(gif, pictures.upscale(real[0]))) == 1
    gif.seek(20)
    assert len(_find(gif, pictures.upscale(real[20]))) == 1


@pytest.mark.parametrize('kind', ['png', 'gif'])
def test_a_full_disk_while_writing_a_figure_is_one_sentence_and_leaves_no_file(tmp_path, monkeypatch, kind):
    from PIL import Image as PILImage
    path = tmp_path / f'clip_0.{kind}'

    def full(self, fp, format=None, **kw):
        assert format == kind.upper()   # the .tmp name hides the format
        open(fp, 'wb').write(b'half a figure')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(PILImage.Image, 'save', full)
    clip = np.zeros((21, 8, 8, 3), np.uint8)
    with pytest.raises(SystemExit, match=re.escape(f'could not write {path} (No space left on device): free space on '
                                                   f'its disk (or fix its permissions), then resume')):
        if kind == 'png':
            pictures.save_png(pictures.grid([[clip[0]]], ['a']), path, then='then resume')
        else:
            pictures.save_gif(path, [clip], ['a'], then='then resume')
    assert os.listdir(tmp_path) == []


def test_save_png_writes_a_png_whole(tmp_path):
    figure = pictures.grid([[np.full((8, 8, 3), 200, np.uint8)]], ['a'])
    pictures.save_png(figure, tmp_path / 'f.png')
    with Image.open(tmp_path / 'f.png') as img:
        assert img.format == 'PNG' and img.size == figure.size
    assert os.listdir(tmp_path) == ['f.png']


# ===============================================================================================
# machinery/image_scores.py: LPIPS and FID against the reference packages
# ===============================================================================================


def random_lpips():
    """LPIPS with a random AlexNet trunk (no download); the linear layers ship in the package."""
    lpips = pytest.importorskip('lpips')
    torch.manual_seed(0)
    with warnings.catch_warnings():   # lpips 0.1.4 asks torchvision for AlexNet the pre-0.13 way
        warnings.simplefilter('ignore', UserWarning)
        return lpips.LPIPS(net='alex', pnet_rand=True, verbose=False).eval().requires_grad_(False)


def fid_by_sqrtm(a, b):
    """The textbook FID with scipy's matrix square root of S_a S_b (pytorch-fid's route)."""
    from scipy import linalg
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


class RandomFeatures(torch.nn.Module):
    """A stand-in for the Inception: uint8 NCHW images -> [N, 8] features, random fixed weights."""
    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=2)

    def forward(self, x):
        return self.conv(x.float() / 255).relu().mean((2, 3)) * 10


def test_lpips_equals_the_packages_own_call_on_the_same_random_alexnet():
    import lpips
    net = random_lpips()
    a, b = images(2)
    ours = lpips_distance(net, a, b)
    theirs = float(net(lpips.im2tensor(a), lpips.im2tensor(b)))   # the package's uint8 -> [-1, 1] NCHW
    assert ours > 0.01 and abs(ours - theirs) <= 1e-6 * theirs
    # floats in [0, 1] are the same images: the package's normalize=True maps them to [-1, 1]
    af, bf = a / 255.0, b / 255.0
    theirs_float = float(net(*(torch.from_numpy(x).permute(2, 0, 1)[None].float() for x in (af, bf)), normalize=True))
    assert abs(lpips_distance(net, af, bf) - theirs_float) <= 1e-6 * theirs_float
    assert lpips_distance(net, a, a) == 0.0


def test_frechet_distance_equals_the_reference_computations():
    pytest.importorskip('torchmetrics')
    from torchmetrics.image.fid import _compute_fid
    rng = np.random.RandomState(0)
    a = rng.randn(200, 16)
    b = rng.randn(200, 16) @ rng.randn(16, 16) * 0.5 + 0.3   # another mean and covariance
    ours = frechet_distance(a, b)
    assert ours > 1.0
    assert abs(ours - fid_by_sqrtm(a, b)) < 1e-8 * ours
    A, B = torch.from_numpy(a), torch.from_numpy(b)
    theirs = float(_compute_fid(A.mean(0), torch.cov(A.T), B.mean(0), torch.cov(B.T)))
    assert abs(ours - theirs) < 1e-8 * ours
    # fewer samples than features (the covariances are singular), as FID over a few clips is
    few_a, few_b = a[:10], b[:10]
    assert abs(frechet_distance(few_a, few_b) - fid_by_sqrtm(few_a, few_b)) < 1e-6 * fid_by_sqrtm(few_a, few_b)
    # a set against itself is 0; a shifted copy is exactly the squared shift (equal covariances)
    assert abs(frechet_distance(a, a)) < 1e-9
    assert abs(frechet_distance(a, a + 0.5) - 16 * 0.25) < 1e-9
    with pytest.raises(ValueError, match='at least 2'):
        frechet_distance(a[:1], b)


def test_fid_of_image_sets_equals_torchmetrics_metric_on_the_same_random_backbone():
    pytest.importorskip('torchmetrics')
    from torchmetrics.image.fid import FrechetInceptionDistance
    net = RandomFeatures()
    preds, truths = images(12, seed=1), images(12, seed=2) // 2   # the real set darker: a clear distance
    ours = frechet_distance(torch.cat([inception_features(net, p) for p in preds]), inception_features(net, truths))
    metric = FrechetInceptionDistance(feature=net)   # the package's own update / compute
    metric.update(torch.from_numpy(preds).permute(0, 3, 1, 2), real=False)
    metric.update(torch.from_numpy(truths).permute(0, 3, 1, 2), real=True)
    theirs = float(metric.compute())
    assert ours > 1.0 and abs(ours - theirs) < 1e-5 * theirs


def test_missing_weights_are_named_with_where_to_put_them(monkeypatch, tmp_path):
    pytest.importorskip('lpips')
    pytest.importorskip('torchmetrics')
    import urllib.error
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    import torchvision.models._api as torchvision_weights

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError('no network')
    no_downloads(monkeypatch, tmp_path)
    monkeypatch.setattr(torchvision_weights, 'load_state_dict_from_url', offline)   # torchvision's AlexNet
    monkeypatch.setattr(fidelity, 'load_state_dict_from_url', offline)
    folder = f"{tmp_path / 'torch_home'}/hub/checkpoints/"
    with pytest.raises(MetricUnavailable) as err:
        lpips_network()
    assert 'https://download.pytorch.org/models/alexnet-owt-7be5be79.pth' in str(err.value) and folder in str(err.value)
    with pytest.raises(MetricUnavailable) as err:
        fid_network()
    assert 'weights-inception-2015-12-05-6726825d.pth' in str(err.value) and folder in str(err.value)


def random_inception_weights(torch_home, monkeypatch):
    """The file the packages download the FID Inception to, holding random_weights_in_the_cache's random trunk
    with its convolutions redrawn at He scale (std sqrt(2 / fan_in)): the 2048 features stay of order 0.1
    through the 94 layers (at PyTorch's default init they shrink to ~1e-8 and any two images look alike)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    random_weights_in_the_cache(torch_home, monkeypatch)
    path = torch_home / 'hub' / 'checkpoints' / os.path.basename(URL_INCEPTION_V3)
    state, g = torch.load(path, weights_only=True), torch.Generator().manual_seed(0)
    torch.save({k: torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5 if k.endswith('conv.weight') else v
                for k, v in state.items()}, path)
    return str(path)


def frames_512(n):
    """uint8 [n, 512, 512, 3]: smooth colour fields with film grain (std 20), detail at every scale as in camera
    frames; the antialiased resize changes the features of smooth images far less (0.1%), of pure noise more (40%)."""
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(n, 3, 8, 8, generator=g) * 200 + 28, size=512, mode='bicubic')
    grain = torch.randn(n, 3, 512, 512, generator=g) * 20
    return (smooth + grain).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


@pytest.mark.slow
def test_fid_features_equal_torch_fidelity_extractor_and_differ_antialiased(monkeypatch, tmp_path):
    """The standard FID resize: torch-fidelity's own extractor (the TensorFlow FID network's port; its bilinear
    resize to 299 has no antialiasing, as the original and pytorch-fid) gives exactly our 2048 features of
    512 x 512 frames on the same random trunk; torchmetrics' default antialias=True does not. Offline: the
    weights lie where the packages download them to, and no_downloads makes any download fail."""
    pytest.importorskip('torchmetrics')
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchmetrics.image.fid import NoTrainInceptionV3
    if 'antialias' not in inspect.signature(NoTrainInceptionV3).parameters:
        pytest.skip("torchmetrics < 1.8 has no antialiased resize to compare with")
    no_downloads(monkeypatch, tmp_path)
    weights = random_inception_weights(tmp_path / 'torch_home', monkeypatch)
    frames = frames_512(2)
    ours = inception_features(fid_network(), frames)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    fidelity = FeatureExtractorInceptionV3('inception-v3-compat', ['2048'], feature_extractor_weights_path=weights)
    with torch.no_grad():
        theirs = fidelity(x)[0].double()
        antialiased = NoTrainInceptionV3('inception-v3-compat', ['2048'], weights, antialias=True)(x).double()
    assert ours.shape == (2, 2048) and ours.abs().mean() > 0.01
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6), (ours - theirs).abs().max()   # measured: 0.0
    relative = float((antialiased - theirs).norm() / theirs.norm())
    assert relative > 0.05, relative   # measured: 0.12 on these frames (~5% on camera frames, trained weights)


def test_a_silent_network_makes_the_scores_unavailable_within_seconds(monkeypatch, tmp_path):
    """A proxy (or firewall) that takes the connection and never answers: urllib alone would wait forever."""
    pytest.importorskip('torchmetrics')
    no_downloads(monkeypatch, tmp_path)
    silent = socket.socket()
    silent.bind(('127.0.0.1', 0))
    silent.listen()   # the kernel accepts the connection; nothing ever replies
    for var in ('https_proxy', 'HTTPS_PROXY'):
        monkeypatch.setenv(var, f'http://127.0.0.1:{silent.getsockname()[1]}')
    monkeypatch.setattr(urllib.request, '_opener', None)   # urlopen's opener keeps the proxies it first saw
    monkeypatch.setattr(image_scores, 'DOWNLOAD_TIMEOUT_S', 1)
    start = time.time()
    with pytest.raises(MetricUnavailable, match='could not be downloaded or read .*timed out.*: download https://'):
        fid_network()
    assert time.time() - start < 10
    silent.close()


class _Touch:
    """A pickle that would create a file when unpickled fully: code run by loading a crafted weights file."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_a_damaged_cached_weights_file_is_named_at_once_and_never_runs_code(monkeypatch, tmp_path):
    pytest.importorskip('lpips')
    pytest.importorskip('torchmetrics')
    no_downloads(monkeypatch, tmp_path)
    random_weights_in_the_cache(tmp_path / 'torch_home', monkeypatch)
    folder = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    good = {path: path.read_bytes() for path in folder.iterdir()}
    ran = tmp_path / 'code_ran'

    def nan_in(path):
        state = torch.load(path, weights_only=True)
        next(v for v in state.values() if v.is_floating_point())[0] = float('nan')
        torch.save(state, path)
    crafted = pickle.dumps(_Touch(ran), protocol=2)
    damages = {'is damaged or not a weights file (RuntimeError)': lambda p: p.write_bytes(good[p][:len(good[p]) // 2]),
               'is damaged or not a weights file (EOFError)': lambda p: p.write_bytes(b''),
               'is damaged or not a weights file (UnpicklingError)': lambda p: p.write_bytes(crafted),
               'holds NaN, infinite or non-tensor weights': nan_in,
               "does not hold the network's tensors": lambda p: torch.save({'x': torch.zeros(2)}, p)}
    for says, damage in damages.items():
        for path in good:
            path.write_bytes(good[path])
            damage(path)
        for network, name in ((lpips_network, 'alexnet-owt-7be5be79.pth'),
                              (fid_network, 'weights-inception-2015-12-05-6726825d.pth')):
            start = time.time()
            with pytest.raises(MetricUnavailable) as err:
                network()
            assert time.time() - start < 5
            assert f"{folder / name} {says}: delete it, and it downloads again from https://" in str(err.value)
    assert not ran.exists()


# ===============================================================================================
# machinery/prepare.py: the data commands
# ===============================================================================================


def test_prepare_subcommand_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        prepare.main(['encode_raw', '--help'])
    out = ' '.join(capsys.readouterr().out.split())
    assert '(default: pixel)' in out and '(default: 77)' in out and '(default: 8)' in out
    assert '(default: None)' not in out   # a required option has no default to show


def test_prepare_says_what_is_wrong_with_its_input_without_a_traceback(tmp_path):
    (tmp_path / 'afile').write_text('')
    with pytest.raises(SystemExit, match=r'^machinery\.prepare synthetic: .*afile'):
        prepare.main(['synthetic', '--out', str(tmp_path / 'afile')])
    with pytest.raises(SystemExit, match=r'^machinery\.prepare encode_raw: .*nowhere.*metadata\.json'):
        prepare.main(['encode_raw', '--split', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'latents')])


# ===============================================================================================
# machinery/bench.py: the benchmark
# ===============================================================================================


@pytest.mark.slow
def test_bench_cpu_smoke_prints_finite_positive_figures_for_every_benchmark():
    out = run_script('machinery.bench', '--device=cpu', '--preset=cpu')
    rows = {}
    for line in out.splitlines():
        m = re.match(r'(\w+)\s+.*?\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(n/a|[\d.]+%)\s+(n/a|[\d.]+)$', line)
        if m:
            rows[m[1]] = [float(m[i]) for i in (2, 3, 4)] + [m[5]]
    assert set(rows) == {'st_train', 'st_forward_fp32', 'st_decode_cache', 'st_decode_nocache', 'wan_fwd',
                         'wan_fwd_per_token', 'ensemble_batched', 'ensemble_looped', 'wan_lora', 'vae_clip', 'vae_clip_bf16'}, out
    for name, (ms, samples_per_s, tokens_per_s, mfu) in rows.items():
        assert all(math.isfinite(v) and v > 0 for v in (ms, samples_per_s, tokens_per_s)), (name, rows[name])
        assert mfu == 'n/a'   # no peak FLOP/s for a CPU
    ratios = dict(re.findall(r'^(.+): ([-\d.e+]+)$', out, re.M))
    assert float(ratios['decode greedy tokens that differ with / without cache']) == 0
    assert float(ratios['ensemble max |batched - looped| latent (same maths)']) < 1e-4
    assert float(ratios['decode with cache / teacher-forced forward']) > 0
    # the bf16 VAE decodes the fp32 one's frames to within rounding (the tiny VAE: ~50 dB)
    assert 35 < float(ratios['VAE bf16 frame 77 against fp32, PSNR dB (random weights)']) < 100


@pytest.mark.slow
def test_bench_times_a_st_train_row_per_loss_chunk_and_the_forward_alone():
    out = run_script('machinery.bench', '--device=cpu', '--what=st_train,wan_fwd', '--st_loss_chunk=100,0',
                     '--wan_fwd_per_token=False', '--warmup=0', '--iters=1')
    rows = bench_rows(out)
    assert set(rows) == {'st_train_chunk100', 'st_train_chunk0', 'wan_fwd'}, out
    assert 'chunk <= 100' in out and 'no loss chunks' in out
    assert all(float(rows[r][1]) > 0 for r in rows)   # samples/s


def test_bench_refuses_a_negative_loss_chunk_and_an_activation_budget_without_compile():
    err = run_script('machinery.bench', '--device=cpu', '--st_loss_chunk=4096,-1', fails=True)
    assert '--st_loss_chunk=4096,-1: give token counts >= 0' in err and 'Traceback' not in err
    err = run_script('machinery.bench', '--device=cpu', '--act_budget=0.5', fails=True)
    assert '--act_budget=0.5 acts on compiled blocks only: add --compile' in err and 'Traceback' not in err


@pytest.mark.slow
def test_bench_sample_rows_warm_up_on_a_cheaper_call_of_the_same_shapes():
    # the ensemble warms up on one solver step, the VAE on one decode of 4 members: the timed
    # calls still run the whole clip (20 members decoded, sample.py's seconds per clip summed)
    out = run_script('machinery.bench', '--device=cpu', '--what=ensemble,vae', '--ensemble=5', '--steps=2',
                     '--latent_hw=4', '--ensemble_looped=False', '--warmup=1', '--iters=1')
    rows = bench_rows(out)
    assert set(rows) == {'ensemble_batched', 'vae_clip', 'vae_clip_bf16'}, out
    assert 'decode 5 x 21 frames' in out
    assert re.search(r'^sample\.py seconds per clip \(ensemble_batched \+ vae_clip\): [\d.]+', out, re.M)


@pytest.mark.slow
def test_bench_compiled_st_rows_compile_the_block_once_and_the_loss_once_a_chunk_size():
    # static shapes (dynamic=False): the blocks keep one graph across the rows, the loss chunk
    # compiles once for each loss chunk row (4 chunks of 96 tokens, then one of 384)
    env = dict(os.environ, TORCH_LOGS='recompiles', PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, '-m', 'machinery.bench', '--device=cpu', '--what=st_train', '--compile',
                          '--st_loss_chunk=100,4096', '--warmup=1', '--iters=1'],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    recompiled = re.findall(r'Recompiling function (\w+)', res.stderr)
    assert recompiled == ['_chunk_ce_sum'], res.stderr[-3000:]
    assert set(bench_rows(res.stdout)) == {'st_train_chunk100', 'st_train_chunk4096'}
