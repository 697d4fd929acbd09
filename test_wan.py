"""Tests for wan_state.py: the Wan 2.2 DiT against diffusers, checkpoint loading, the umT5 null
context against transformers, zero-init state conditioning and LoRA, the VAE wrapper. CPU, tiny."""
import json

import pytest
import torch

from wan_state import (WanConfig, WanDiT, WanVAE, add_lora, load_trainable, lora_modules, merge_lora,
                       null_context, parameter_counts, per_token_timestep, save_trainable, to_diffusers_state_dict,
                       trainable_state_dict, unmerge_lora)

B, C, NF, H, W = 2, 48, 3, 8, 8          # 3 latent frames of 8x8 -> 3 x 16 tokens
TOKENS_PER_FRAME = (H // 2) * (W // 2)
NS = 4 * (NF - 1) + 1                    # state rows for 3 latent frames


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core box two OpenMP threads make them ~50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize(model, std=0.1, seed=0):
    """Random values in every parameter (the reference init zeroes the head, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, NF, H, W, generator=g)
    context = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    mask_BF = torch.tensor([[0, 1, 1], [0, 0, 1]])       # first frame(s) held as context
    t_BL = per_token_timestep(mask_BF, torch.tensor([999.0, 421.5]), TOKENS_PER_FRAME)
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


# ------------------------------------------------------------------------------------------ DiT

def test_per_token_timestep_gives_context_frames_t0():
    t_BL = per_token_timestep(torch.tensor([[0, 1, 1], [0, 0, 1]]), torch.tensor([700.0, 300.0]), 4)
    assert t_BL.shape == (2, 12)
    assert t_BL[0].tolist() == [0.0] * 4 + [700.0] * 8
    assert t_BL[1].tolist() == [0.0] * 8 + [300.0] * 4


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


# ------------------------------------------------------------------------------------ loading

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


def test_from_pretrained_loads_official_sharded_layout(tmp_path):
    cfg = WanConfig.tiny()
    src = randomize(WanDiT(cfg, state_cond=False))
    write_official_checkpoint(src, tmp_path / 'ckpt')
    loaded = WanDiT.from_pretrained(tmp_path / 'ckpt', state_cond=True, r_dim=cfg.r_dim)
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
    loaded = WanDiT.from_pretrained(tmp_path / 'repo', state_cond=False, text_len=cfg.text_len, r_dim=cfg.r_dim)
    assert loaded.cfg == cfg
    x, t_BL, context, _ = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x, t_BL, context), src(x, t_BL, context))


def test_from_pretrained_missing_shard_fails_clearly(tmp_path):
    root = write_official_checkpoint(randomize(WanDiT(WanConfig.tiny(), state_cond=False)), tmp_path / 'ckpt')
    (root / 'diffusion_pytorch_model-00002-of-00002.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='00002-of-00002.*download the checkpoint again'):
        WanDiT.from_pretrained(root)


def test_from_pretrained_truncated_shard_fails_clearly(tmp_path):
    root = write_official_checkpoint(randomize(WanDiT(WanConfig.tiny(), state_cond=False)), tmp_path / 'ckpt')
    shard = root / 'diffusion_pytorch_model-00001-of-00002.safetensors'
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match='00001-of-00002.safetensors: cannot read.*truncated'):
        WanDiT.from_pretrained(root)


def test_from_pretrained_lists_missing_unexpected_and_wrong_shape(tmp_path):
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
        WanDiT.from_pretrained(root)
    msg = str(err.value)
    assert 'missing (1): blocks.1.ffn.2.bias' in msg
    assert 'unexpected (1): blocks.0.extra.weight' in msg
    assert 'wrong shape (1): head.head.weight: checkpoint (7, 64) vs model (192, 64)' in msg


# ------------------------------------------------------------------------------- null context

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


# ------------------------------------------------------------------- state conditioning, LoRA

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


def test_states_of_wrong_length_fail_clearly():
    cfg = WanConfig.tiny()
    model = WanDiT(cfg)
    x, t_BL, context, states = inputs(cfg)
    with pytest.raises(AssertionError, match=r'give 4 \* \(F - 1\) \+ 1 = 9 state rows'):
        model(x, t_BL, context, states[:, :5])


def test_lora_zero_init_train_merge_and_frozen_base():
    cfg = WanConfig.tiny()
    model = randomize(WanDiT(cfg, state_cond=False))
    x, t_BL, context, _ = inputs(cfg)
    with torch.no_grad():
        want = model(x, t_BL, context)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=4, alpha=8)
    assert len(lora_modules(model)) == 10 * cfg.num_layers
    with torch.no_grad():
        assert torch.equal(model(x, t_BL, context), want)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all('.lora_' in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x, t_BL, context).square().mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if '.lora_' not in n)   # frozen base
    opt.step()
    with torch.no_grad():
        tuned = model(x, t_BL, context)
        assert (tuned - want).abs().max() > 1e-4
        merge_lora(model)
        assert (model(x, t_BL, context) - tuned).abs().max() < 1e-5
        unmerge_lora(model)
        assert (model(x, t_BL, context) - tuned).abs().max() < 1e-5
    for k, v in base_before.items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k


def test_save_and_load_trainable_roundtrip(tmp_path):
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


# ------------------------------------------------------------------------------------------ VAE

def test_vae_encode_decode_shapes_and_normalisation(tmp_path):
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
    with pytest.raises(AssertionError, match=r'\[B, 3, 4k\+1, H, W\]'):
        vae.encode(video[:, :, :4])
