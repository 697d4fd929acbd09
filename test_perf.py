"""Tests of the performance work (issue 5): bench.py runs and prints a full table on the CPU, the
temporal KV cache decodes exactly what the uncached model decodes, per-block-count gradient
checkpointing changes no gradient, and the FLOP estimates behind MFU match torch's FLOP counter.
No test times anything: speed is bench.py's job."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from st_transformer import STConfig, STTransformer, peak_flops
from wan_state import WanConfig, WanDiT, add_lora, per_token_timestep

ROOT = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def perf_one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core box competing threads are much slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_weights(model, std, seed=0):
    """Random values in every parameter, large enough that greedy decoding has no near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# ------------------------------------------------------------------------------------ bench.py

def test_bench_cpu_smoke_prints_finite_positive_figures_for_every_benchmark():
    out = subprocess.run([sys.executable, 'bench.py', '--device=cpu', '--preset=cpu'], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {}
    for line in out.stdout.splitlines():
        m = re.match(r'(\w+)\s+.*?\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(n/a|[\d.]+%)\s+(nan|[\d.]+)$', line)
        if m:
            rows[m[1]] = [float(m[i]) for i in (2, 3, 4)] + [m[5]]
    assert set(rows) == {'st_train', 'st_forward_fp32', 'st_decode_cache', 'st_decode_nocache', 'wan_fwd',
                         'ensemble_batched', 'ensemble_looped', 'wan_lora', 'vae_clip'}, out.stdout
    for name, (ms, samples_per_s, tokens_per_s, mfu) in rows.items():
        assert all(math.isfinite(v) and v > 0 for v in (ms, samples_per_s, tokens_per_s)), (name, rows[name])
        assert mfu == 'n/a'   # no peak FLOP/s for a CPU
    ratios = dict(re.findall(r'^(.+): ([-\d.e+]+)$', out.stdout, re.M))
    assert float(ratios['decode greedy tokens that differ with / without cache']) == 0
    assert float(ratios['ensemble max |batched - looped| latent (same maths)']) < 1e-4
    assert float(ratios['decode with cache / teacher-forced forward']) > 0


def test_peak_flops_is_unknown_on_the_cpu():
    assert peak_flops('cpu') is None


# ---------------------------------------------------------------------------- temporal KV cache

def st_model(dropout=0.0):
    cfg = STConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, T=5, H=4, W=4, dropout=dropout, state_window=64)
    return random_weights(STTransformer(cfg), std=0.3), cfg


def st_inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    z_BTHW = torch.randint(0, cfg.vocab_size, (3, 3, cfg.H, cfg.W), generator=g)
    return z_BTHW, torch.randn(3, cfg.state_window, cfg.state_dim, generator=g)


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


def test_generate_turns_dropout_off_and_restores_training_mode():
    model, cfg = st_model(dropout=0.5)
    z_BTHW, states_BLD = st_inputs(cfg)
    model.eval()
    want, _ = model.generate(z_BTHW, states_BLD, use_cache=False)
    model.train()
    for use_cache in (True, False):
        got, _ = model.generate(z_BTHW, states_BLD, use_cache=use_cache)
        assert torch.equal(got, want) and model.training


# ------------------------------------------------------------------ gradient checkpointing (Wan)

def wan_inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_dim, 3, 8, 8, generator=g)
    t_BL = per_token_timestep(torch.tensor([[0, 1, 1], [0, 0, 1]]), torch.tensor([999.0, 421.5]), 16)
    return x, t_BL, torch.randn(2, cfg.text_len, cfg.text_dim, generator=g), torch.randn(2, 9, 25, generator=g)


def test_checkpointing_the_first_n_blocks_gives_the_same_loss_and_gradients():
    cfg = WanConfig.tiny(num_layers=3)
    model = random_weights(WanDiT(cfg), std=0.1)
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
    with pytest.raises(AssertionError, match='block count in 0..2'):
        model(x, t_BL, context, states)


# --------------------------------------------------------------------------- FLOPs behind MFU

def counted_flops(fn):
    """FLOPs that torch counts for fn (math attention, so that the attention products are counted)."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        fn()
    return counter.get_total_flops()


def test_wan_flop_estimates_match_torch_flop_counter():
    cfg = WanConfig.tiny(num_layers=3)
    model = WanDiT(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_dim, 6, 16, 16, generator=g)
    mask_BF = torch.ones(2, 6)
    mask_BF[:, :2] = 0
    t_BL = per_token_timestep(mask_BF, torch.tensor([500.0, 100.0]), 64)
    context, states = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g), torch.randn(2, 21, 25, generator=g)
    with torch.no_grad():
        fwd = counted_flops(lambda: model(x, t_BL, context, states)) / 2
    assert abs(model.flops_per_sample(6, 16, 16) / fwd - 1) < 0.01
    add_lora(model)
    step = counted_flops(lambda: model(x, t_BL, context, states).square().mean().backward()) / 2
    assert abs(model.flops_per_sample(6, 16, 16, lora_step=True) / step - 1) < 0.01


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
