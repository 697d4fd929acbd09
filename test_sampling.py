"""Tests of the sampling track (data.py section 2, train_sampling.py, sample.py), tiny and on the CPU."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from sample import blur_baseline, match_histograms, psnr, sample_latents, ssim
from train_sampling import build_model, flow_matching_loss, sample_draws, shift_sigma, text_context, tokens_per_frame

REPO = Path(__file__).resolve().parent
SIZE = 32   # synthetic frames: 32x32 -> pixel-codec latents [48, 6, 8, 8], 16 tokens per latent frame
TINY = dict(dim=32, num_layers=1, num_heads=2, ffn_dim=64)


def run_script(*args, torchrun=False):
    """Run a repo script the way a user does; fail with its output if it fails."""
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] if torchrun \
        else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS='1') if torchrun else dict(os.environ)
    res = subprocess.run([*launcher, *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    """A small synthetic raw dataset in the 1X layout, with its training latents encoded."""
    root = tmp_path_factory.mktemp('sampling_data')
    data.write_synthetic_raw(root / 'train_v2.0_raw', num_shards=2, frames_per_shard=1500, size=SIZE, seed=0)
    data.write_synthetic_raw(root / 'val_v2.0_raw', num_shards=1, frames_per_shard=1200, size=SIZE, seed=1, flat=True)
    data.encode_raw_split(root / 'train_v2.0_raw', root / 'latents_pixel' / 'train', data.PixelCodec(), stride=8)
    return root


def tiny_model(seed=0):
    net = build_model('tiny', '', 'full', 32, 32, seed, 'cpu', torch.float32, TINY)
    torch.nn.init.normal_(net.head.head.weight, std=0.02)   # the zero-init head would output 0 everywhere
    return net


# --- data ----------------------------------------------------------------------------------------

def test_clip_indices_put_context_in_latents_0_1_and_frame_76_last():
    idx = data.clip_frame_indices()
    assert idx == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 76]
    assert idx[:data.NUM_CONTEXT_FRAMES] == [0, 4, 8, 12, 16] and max(idx[data.NUM_CONTEXT_FRAMES:]) == 76
    # Wan's causal VAE: latent 0 = clip frame 0, latent k = clip frames 4k-3 .. 4k
    frames_of_latent = [[0]] + [list(range(4 * k - 3, 4 * k + 1)) for k in range(1, data.NUM_LATENTS)]
    context = [idx[j] for k in range(data.NUM_CONTEXT_LATENTS) for j in frames_of_latent[k]]
    assert context == [0, 4, 8, 12, 16]                       # latents 0-1 hold exactly the given frames
    assert idx[frames_of_latent[-1][-1]] == data.TARGET_FRAME == 76   # the target is the last clip frame


def test_pixel_codec_has_wan_layout_and_is_lossless_on_keyframes():
    codec = data.PixelCodec()
    video = torch.rand(2, 3, 21, SIZE, SIZE) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (2, 48, 6, SIZE // 4, SIZE // 4)
    back = codec.decode(z)
    assert back.shape == video.shape
    assert torch.equal(back[:, :, ::4], video[:, :, ::4])     # keyframes 0, 4, .., 20 (target included)
    assert torch.allclose(back[:, :, 1], 0.75 * video[:, :, 0] + 0.25 * video[:, :, 4])
    assert torch.equal(codec.encode(video[:, :, :5]), z[:, :, :2])   # context alone -> the same 2 latents


def test_synthetic_raw_is_deterministic_readable_and_follows_states(tmp_path):
    for name, seed in (('a', 3), ('b', 3), ('c', 4)):
        data.write_synthetic_raw(tmp_path / name, num_shards=1, frames_per_shard=300, size=SIZE, seed=seed)
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
    tex = data._texture(np.random.default_rng(0), SIZE * 3 // 2)
    s = np.zeros(25, np.float32)
    moved = s.copy()
    moved[6] = 0.8
    assert np.abs(data.render_synthetic_frame(tex, s, SIZE).astype(int) - data.render_synthetic_frame(tex, moved, SIZE)).sum() > 0


def test_reader_rejects_truncated_and_missing_files(tmp_path):
    data.write_synthetic_raw(tmp_path / 'raw', num_shards=1, frames_per_shard=200, size=SIZE, seed=0, flat=True)
    with open(tmp_path / 'raw' / 'states_0.bin', 'r+b') as f:
        f.truncate(100)
    with pytest.raises(ValueError, match='states_0.bin.*truncated'):
        data.RawShard(tmp_path / 'raw', 0)
    with pytest.raises(FileNotFoundError, match='metadata.json'):
        data.RawClips(tmp_path / 'nothing')


def test_encoded_latents_match_the_codec_on_raw_clips(synthetic):
    clips, latents = data.RawClips(synthetic / 'train_v2.0_raw', stride=8), data.LatentClips(synthetic / 'latents_pixel' / 'train')
    assert len(clips) == len(latents) > 100
    for k in (0, len(clips) - 1):
        z, states = latents[k]
        item = clips[k]
        assert torch.equal(z, data.PixelCodec().encode(data.frames_to_video(item['frames_THWC'][None]))[0])
        assert torch.equal(states, item['states_TD'])


# --- flow matching and sampling --------------------------------------------------------------------

def test_shifted_sigma_matches_wan():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_sigma(u, 5.0), torch.tensor([0.0, 1.25 / 2.0, 2.5 / 3.0, 1.0]))
    assert torch.equal(shift_sigma(u, 1.0), u)


def test_loss_is_zero_for_the_true_velocity_and_ignores_context_latents():
    net = tiny_model()
    z0 = torch.randn(3, 48, 6, 8, 8)
    states = torch.randn(3, 21, 25)
    sigma, noise, drop = sample_draws(0, 0, [0, 1, 2], z0.shape[1:], 3.0, 0.0)
    ctx = text_context(net.cfg, 'zeros', 'cpu')
    seen = {}

    def oracle(x_t, t_BL, context, states_BTD, drop_B):   # predicts noise - x0 exactly, garbage on context
        seen.update(x_t=x_t, t_BL=t_BL)
        v = noise - z0
        v[:, :, :2] = 1e6
        return v
    tokens = tokens_per_frame(net.cfg, z0)
    assert tokens == 16
    assert flow_matching_loss(oracle, z0, states, ctx, sigma, noise, drop, tokens).item() == 0.0
    assert torch.equal(seen['x_t'][:, :, :2], z0[:, :, :2])              # context enters clean ...
    assert torch.all(seen['t_BL'][:, :2 * 16] == 0)                      # ... at timestep 0
    assert torch.allclose(seen['t_BL'][:, 2 * 16:], 1000 * sigma[:, None].expand(3, 4 * 16))
    # the real model: changing its output on the context latents leaves the loss unchanged
    base = flow_matching_loss(net, z0, states, ctx, sigma, noise, drop, tokens)

    def perturbed(*args):
        v = net(*args)
        return torch.cat([v[:, :, :2] + 100.0, v[:, :, 2:]], dim=2)
    assert flow_matching_loss(perturbed, z0, states, ctx, sigma, noise, drop, tokens).item() == base.item()


@pytest.mark.parametrize('scheduler,cfg_scale', [('euler', 1.0), ('unipc', 1.5)])
def test_sampling_keeps_context_latents_bit_identical(scheduler, cfg_scale):
    net = tiny_model()
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


def test_metrics_and_blur_baseline():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert psnr(img, img) == 100.0 and ssim(img, img) == pytest.approx(1.0)
    off = np.clip(img.astype(int) + 10, 0, 255).astype(np.uint8)
    assert psnr(off, img) == pytest.approx(10 * np.log10(1 / np.mean(((off.astype(float) - img) / 255) ** 2)))
    ref = rng.normal(120, 20, (32, 32, 3)).clip(0, 255).astype(np.uint8)
    matched = match_histograms(img, ref)   # uniform values take the reference's normal histogram
    assert abs(matched.mean() - ref.mean()) < 1 and abs(matched.std() - ref.std()) < 1
    order = np.argsort(img[..., 0], axis=None)
    assert np.all(np.diff(matched[..., 0].ravel()[order].astype(int)) >= 0)   # a monotone map of the values
    assert blur_baseline(img, ref, 1.0).std() <= ref.std() + 1


# --- training runs (subprocesses, as a user runs them) ----------------------------------------------

def train_args(synthetic, out, *extra):
    return ['train_sampling.py', f'--data_dir={synthetic}', '--make_synthetic=False', f'--out_dir={out}',
            *(f'--{k}={v}' for k, v in TINY.items()), '--batch_size=2', '--global_batch_size=8',
            '--log_interval=1', *extra]


def trained(out):
    return torch.load(Path(out) / 'ckpt.pt', weights_only=False)


@pytest.fixture(scope='module')
def straight_run(synthetic, tmp_path_factory):
    """4 uninterrupted steps in one process: the reference for the DDP and resume tests."""
    out = tmp_path_factory.mktemp('straight')
    run_script(*train_args(synthetic, out, '--max_iters=4'))
    return trained(out)


def test_ddp_two_processes_equals_single_process(synthetic, straight_run, tmp_path):
    out = run_script(*train_args(synthetic, tmp_path, '--max_iters=4'), torchrun=True)
    assert '2 process(es) x batch 2 x 2 accumulation' in out   # the single process accumulates 4
    two = trained(tmp_path)
    init = build_model('tiny', '', 'full', 32, 32, 0, 'cpu', torch.float32, TINY).state_dict()
    # equal up to float summation order; AdamW turns the ~1e-9 gradient noise of weights whose true
    # gradient is 0 (cross-attention key biases) into updates of ~1e-6, hence atol 1e-5 (lr 1e-3 x 4 steps)
    for n, p in straight_run['trainable'].items():
        assert torch.allclose(p, two['trainable'][n], atol=1e-5, rtol=1e-4), n
    assert max((p - init[n]).abs().max().item() for n, p in straight_run['trainable'].items()) > 1e-4   # it trained


def test_resume_equals_no_stop(synthetic, straight_run, tmp_path):
    run_script(*train_args(synthetic, tmp_path, '--max_iters=2'))
    run_script(*train_args(synthetic, tmp_path, '--max_iters=4', '--init_from=resume'))
    a, b = straight_run, trained(tmp_path)
    assert a['step'] == b['step'] == 4
    for n, p in a['trainable'].items():
        assert torch.equal(p, b['trainable'][n]), n
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert torch.equal(sa['exp_avg'], sb['exp_avg']) and torch.equal(sa['exp_avg_sq'], sb['exp_avg_sq'])


@pytest.fixture(scope='module')
def demo_metrics(synthetic, tmp_path_factory):
    """Train a tiny model on the synthetic clips and evaluate it on the validation split."""
    out = tmp_path_factory.mktemp('demo')
    run_script('train_sampling.py', f'--data_dir={synthetic}', '--make_synthetic=False', f'--out_dir={out}',
               '--max_iters=300', '--log_interval=50')   # the demo's defaults: dim 256, 2 layers, batch 8
    run_script('sample.py', f'--out_dir={out}', '--ensemble=16', '--steps=10', '--max_clips=8')
    with open(out / 'samples' / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and (out / 'samples' / 'clip_0.png').exists()
    return {k: np.mean([float(r[k]) for r in rows]) for k in rows[0] if k.startswith(('psnr', 'ssim'))}


def test_trained_tiny_model_beats_copy_last_frame(demo_metrics):
    assert demo_metrics['psnr_ensemble_16'] > demo_metrics['psnr_copy_last'] + 0.2, demo_metrics


def test_ensemble_mean_beats_a_single_sample(demo_metrics):
    assert demo_metrics['psnr_ensemble_16'] > demo_metrics['psnr_single'] + 1.0, demo_metrics
