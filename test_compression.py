"""Tests of the compression track: st_transformer.py, data.py section 1, train_compression.py."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
from st_transformer import P_FLOOR, STConfig, STTransformer, cross_entropy_topk, get_lr

REPO = os.path.dirname(os.path.abspath(__file__))
TINY = dict(vocab_size=1000, n_layer=1, n_head=2, n_embd=32, dropout=0.0)


def tiny_model(**kw):
    torch.manual_seed(0)
    return STTransformer(STConfig(**{**TINY, **kw}))


def run_script(args, cwd, nproc=None, timeout=300):
    """Run train_compression.py (under torchrun when nproc is given); return its stdout."""
    cmd = [sys.executable, os.path.join(REPO, 'train_compression.py')] + args
    if nproc:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] + cmd[1:]
    env = {**os.environ, 'OMP_NUM_THREADS': '1' if nproc else os.environ.get('OMP_NUM_THREADS', '2')}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope='module')
def synthetic_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('synthetic'))
    data.write_synthetic(out, seed=0)
    return out


# --- the model -------------------------------------------------------------------------------

def test_forward_and_generate_shapes():
    model = tiny_model().eval()
    z = torch.randint(0, 1000, (2, 6, 32, 32))
    s = torch.randn(2, 64, 25)
    assert model(z[:, :5], s).shape == (2, 5, 32, 32, 1000)
    assert model(z[:, :5], s, predict_from=2).shape == (2, 3, 32, 32, 1000)
    grids, logits = model.generate(z[:, :3], s, num_grids=3)
    assert grids.shape == (2, 3, 32, 32) and grids.dtype == torch.int64
    assert logits.shape == (2, 3, 32, 32, 1000) and logits.dtype == torch.float32
    # greedy decoding: each grid is the argmax of its logits, and its logits are the
    # teacher-forced logits of the sequence built from the earlier generated grids
    assert torch.equal(grids, logits.argmax(-1))
    tf = model(torch.cat([z[:, :3], grids[:, :2]], 1), s, predict_from=2)
    torch.testing.assert_close(tf, logits, rtol=1e-4, atol=1e-4)
    sampled, _ = model.generate(z[:, :3], s, num_grids=2, temperature=1.0, top_k=5)
    assert sampled.shape == (2, 2, 32, 32)


def test_attention_is_spatial_per_grid_and_causal_in_time():
    model = tiny_model(n_layer=2).eval()
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


def test_output_head_is_tied_to_token_embedding():
    model = tiny_model()
    assert model.head.weight is model.tok_emb.weight
    untied = sum(p.numel() for p in model.parameters()) + model.tok_emb.weight.numel()
    assert model.num_params() == untied - 1000 * 32


def test_init_follows_paper():
    model = tiny_model(n_embd=256)
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.002
    assert abs(model.pos_emb_SC.std().item() - 0.02) < 0.002


def test_weight_decay_groups_and_lr_schedule_match_paper():
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
    # peak 8e-4, warmup 2000 steps, linear to 0
    lr = [get_lr(it, 8e-4, 2000, 100_000) for it in (0, 999, 1999, 2000, 51_000, 99_999, 100_000)]
    assert lr == pytest.approx([4e-7, 4e-4, 8e-4, 8e-4, 4e-4, 8e-4 / 98_000, 0.0])


def test_paper_preset_dry_run(tmp_path):
    out = run_script(['--preset=paper', '--dry_run'], cwd=tmp_path)
    cfg = json.loads(out.split('settings: ', 1)[1].splitlines()[0])
    assert (cfg['n_layer'], cfg['n_head'], cfg['n_embd'], cfg['T'], cfg['dropout']) == (24, 8, 512, 5, 0.1)
    assert (cfg['total_batch_size'], cfg['epochs'], cfg['warmup_iters'], cfg['learning_rate']) == (160, 80.0, 2000, 8e-4)
    assert (cfg['beta1'], cfg['beta2'], cfg['weight_decay'], cfg['vocab_size']) == (0.9, 0.95, 0.05, 64000)
    n = int(out.split('parameters: ', 1)[1].split()[0].replace(',', ''))
    # 24 blocks of (2 x 4d^2 attention + 8d^2 MLP) + 64000 x 512 tied embedding, plus small parts
    assert 24 * 16 * 512 ** 2 + 64000 * 512 < n < 24 * 16 * 512 ** 2 + 64000 * 512 + 2_000_000


# --- the metric ------------------------------------------------------------------------------

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


# --- the data --------------------------------------------------------------------------------

def write_known_shard(split_dir, i, nested, segment_F, vocab=1000, seed=0):
    rng = np.random.default_rng(seed)
    n = len(segment_F)
    tokens = rng.integers(0, vocab, size=(math.ceil(n / 17), 3, 32, 32)).astype(np.int32)
    states = rng.standard_normal((n, 25)).astype(np.float32)
    data.write_shard(split_dir, i, tokens, states, np.asarray(segment_F, np.int32), nested)
    return tokens, states


def write_meta(split_dir, num_shards, frames):
    with open(os.path.join(split_dir, 'metadata.json'), 'w') as f:
        json.dump({'num_shards': num_shards, 'query': None, 'hz': 30, 'num_images': frames}, f)


@pytest.mark.parametrize('nested', [True, False], ids=['train-subfolders', 'val-flat'])
def test_reader_round_trip_and_windows_stay_in_one_segment(tmp_path, nested):
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


def test_reader_errors_name_the_file_and_the_problem(tmp_path):
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


def test_synthetic_world_is_deterministic_and_its_floor_is_exact(tmp_path, synthetic_dir):
    data.write_synthetic(str(tmp_path), seed=0)
    for f in ('train_v2.0/videos/video_1.bin', 'train_v2.0/robot_states/states_1.bin', 'val_v2.0/video_0.bin'):
        assert (tmp_path / f).read_bytes() == open(os.path.join(synthetic_dir, f), 'rb').read()
    ds = data.TokenDataset(os.path.join(synthetic_dir, 'train_v2.0'), vocab_size=1000)
    world = ds.metadata['synthetic']
    sums, lags = torch.zeros(3), []
    for j in range(0, len(ds), 48):  # chunks of 8 samples: the oracle logits are 8 x 3072 x 1000
        z, s = (torch.stack(x) for x in zip(*[ds[i] for i in range(j, min(j + 48, len(ds)), 6)]))
        target = z[:, 3:].reshape(-1)
        oracle = data.synthetic_oracle_logits(z, s, world).reshape(-1, 1000)
        blind = data.synthetic_oracle_logits(z, s, world, use_states=False).reshape(-1, 1000)
        sums += torch.tensor([F.cross_entropy(oracle, target, reduction='sum'), cross_entropy_topk(oracle, target).sum(),
                              F.cross_entropy(blind, target, reduction='sum')]) / 1024
        lags.append(s[:, -34:, data.LAG_DIM][:, [data.grid_frames(g)[0] for g in (3, 4, 5)]])
    lags = torch.cat(lags)
    full, topk, blind = (sums / lags.numel()).tolist()
    # the closed form equals the metric applied to the Bayes predictor, given the fraction of
    # new places in these samples (their tokens are many, the grids few: the fraction is noisy)
    p_new = (lags == 0).float().mean().item()
    every_lag = torch.stack([ds[i][1][-34:, data.LAG_DIM][[17, 18, 26]] for i in range(len(ds))])
    assert (every_lag == 0).float().mean().item() == pytest.approx(data.SYNTHETIC_P_NEW, abs=0.03)  # 8/27
    floors = data.synthetic_floors(world['vocab'], world['eps'], p_new=p_new)
    assert full == pytest.approx(floors['full'], abs=0.01)
    assert topk == pytest.approx(floors['topk'], abs=0.02)
    # ignoring the states costs most of a nat: the states are needed
    assert blind > floors['full'] + 0.4


# --- training --------------------------------------------------------------------------------

def test_tiny_model_overfits_one_batch(synthetic_dir):
    ds = data.TokenDataset(os.path.join(synthetic_dir, 'train_v2.0'), vocab_size=1000)
    z, s = (torch.stack(x) for x in zip(ds[0], ds[1]))
    target = z[:, 3:].reshape(-1)
    bayes = F.cross_entropy(data.synthetic_oracle_logits(z, s, ds.metadata['synthetic']).reshape(-1, 1000), target)
    model = tiny_model(n_embd=64, n_head=4)
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


SMALL_RUN = ['--n_embd=32', '--n_head=2', '--eval_interval=1000', '--eval_samples=2', '--final_eval=False', '--num_workers=0',
             '--learning_rate=1e-3', '--warmup_iters=1']


def test_two_process_ddp_takes_the_same_step_as_one_process_with_accumulation(tmp_path, synthetic_dir):
    common = SMALL_RUN + [f'--data_dir={synthetic_dir}', '--max_iters=1', '--total_batch_size=4', '--batch_size=2']
    run_script(common + [f'--out_dir={tmp_path}/one'], cwd=tmp_path)
    run_script(common + [f'--out_dir={tmp_path}/ddp'], cwd=tmp_path, nproc=2)
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


def test_resume_gives_the_same_next_loss_as_not_stopping(tmp_path, synthetic_dir):
    common = SMALL_RUN + [f'--data_dir={synthetic_dir}', '--max_iters=5', '--batch_size=2', '--total_batch_size=2',
                          '--dropout=0.1']
    run_script(common + [f'--out_dir={tmp_path}/full'], cwd=tmp_path)
    run_script(common + [f'--out_dir={tmp_path}/split', '--stop_at=3'], cwd=tmp_path)
    run_script(common + [f'--out_dir={tmp_path}/split', '--resume'], cwd=tmp_path)
    log = lambda d: [json.loads(line) for line in open(tmp_path / d / 'log.jsonl')]
    full, split = log('full'), log('split')
    assert [r['step'] for r in split] == [0, 1, 2, 3, 4]
    assert [r['loss'] for r in split] == [r['loss'] for r in full]  # exact, dropout included
    assert [r['lr'] for r in split] == [r['lr'] for r in full]


def results_of(out_dir):
    with open(os.path.join(out_dir, 'results.json')) as f:
        return json.load(f)


LEARN_RUN = ['--max_iters=80', '--batch_size=4', '--total_batch_size=4', '--final_eval_samples=16',
             '--eval_interval=1000', '--eval_samples=2', '--num_workers=0']


def test_short_run_learns_beyond_the_baselines(tmp_path, synthetic_dir):
    """80 steps of batch 4 (the README default is longer; neither reaches the Bayes floor)."""
    run_script(LEARN_RUN + [f'--data_dir={synthetic_dir}', f'--out_dir={tmp_path}'], cwd=tmp_path)
    r = results_of(tmp_path)
    model, copy_last = r['model, teacher-forced'], r['copy the last context grid']
    assert model['top500'] < copy_last['top500'] - 0.3 and model['ce'] < copy_last['ce'] - 0.3
    assert model['ce'] < r['uniform over the vocabulary']['ce'] - 1.0
    assert model['ce'] > r['Bayes floor (states known)']['ce'] - 0.05  # nothing beats the floor
    assert r['model, greedy autoregressive']['top500'] < r['uniform over the vocabulary']['top500']


def test_model_without_states_cannot_beat_the_state_blind_floor(tmp_path, synthetic_dir):
    run_script(LEARN_RUN + [f'--data_dir={synthetic_dir}', f'--out_dir={tmp_path}', '--use_states=False'], cwd=tmp_path)
    r = results_of(tmp_path)
    model, blind = r['model, teacher-forced'], r['state-blind floor']
    assert model['ce'] < r['uniform over the vocabulary']['ce'] - 0.5  # it learned something
    # but it cannot see where the robot looks next: above the best state-blind predictor,
    # which is most of a nat above the Bayes floor
    assert model['ce'] > blind['ce'] - 0.05
    assert blind['ce'] > r['Bayes floor (states known)']['ce'] + 0.5
