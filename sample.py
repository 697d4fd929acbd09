"""Predict frame 77 of every clip of a split and score it as the challenge does (paper 2.3, 2.4).

    python sample.py --ensemble 20                  # the paper's evaluation of the trained run
    python sample.py --ensemble 20 --cfg 2.0 --out_dir=out_sampling_paper_cfg   # a CFG-trained run (--preset=paper_cfg)

Everything (model, VAE, data) is read from the run's out_dir/ckpt.pt; with no --out_dir, the
paper run's (out_sampling_paper) if there is one, else the demo's (out_sampling).

The ensemble (paper 2.3): a clip's 5 context frames are encoded to the 2 context latents, N
members are denoised from their own noise as one batch (the context latents re-imposed after
every step), decoded, and their frames 77 averaged in pixel space. Where the future is uncertain
the mean blurs, and PSNR rewards that over any single guess.

Each clip's PSNR, SSIM and LPIPS are written for: copy the last context frame, one member, the
ensemble mean, and the blur + histogram matching baseline; the table adds FID over the clips (paper
Table 2; LPIPS and FID download their networks on first use). --lora: LoRA files of any Wan tool in
place of the run's adapters. --ablation: the same clip and noise under another clip's states and under
none; --counterfactual (a synthetic split): other futures, scored against the frames the world draws
for them. Outputs in {out_dir}/samples/: metrics.csv (replaced only when every clip is scored; the
scores so far are in metrics.partial.csv), clip_{k}.png, counterfactual_{k}.png, clip_0.gif.
"""
import csv
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data
from configurator import configure
from flow_matching import predict_frame77
from machinery import checkpoints, pictures, written
from machinery.distributed import resolve_device
from machinery.vae import PixelCodec, WanVAE
from machinery.wan_files import build_model, text_context
from metrics import blur_baseline, psnr, ssim
from wan_state import lora_modules, merge_lora as merge_lora_into_base

# --- settings ----------------------------------------------------------------------------------
out_dir = ''                # the run's folder (ckpt.pt); '' = out_sampling_paper if it has one, else out_sampling
ckpt = 'ckpt.pt'            # checkpoint file in out_dir (ckpt_best.pt: the best val PSNR)
results_dir = ''            # where the PNGs and metrics.csv go; '' = {out_dir}/samples
split = ''                  # a raw split folder; '' = {data_dir of the run}/val_v2.0_raw
max_clips = 0               # clips to evaluate (0 = every clip of the split)
clip_stride = 77            # frames between evaluated windows (77 = no overlap)
ensemble = 20               # N members, averaged in pixel space (paper 2.3, Table 2: 20)
steps = 20                  # sampler steps (paper Table 2: 20)
cfg = 1.0                   # classifier-free guidance scale; 1.0 = off (the 23.0 dB submission; CFG runs: 2.0)
scheduler = 'euler'         # 'euler' (Wan's reference flow-matching Euler schedule) or 'unipc' (Wan's default)
shift = 0.0                 # timestep shift; 0 = the one the model was trained with
blur = True                 # also score the blur + histogram-matching baseline
blur_sigma = 1.0            # Gaussian sigma in pixels for the blur baseline
png_members = 4             # members drawn in each PNG
ablation = True             # also the ensemble under another clip's states and, if trained, the no-state embedding
counterfactual = True       # synthetic splits: also hand-made state futures, each scored against its own truth
gif = True                  # clip_0.gif: the first clip's predicted video next to the real one
lpips_fid = True            # also LPIPS (AlexNet) per clip and FID (Inception) over the clips, as paper Table 2
                            # (machinery/image_scores.py)
lora = ''                   # LoRA files (ComfyUI, diffusers / PEFT, DiffSynth, kohya / musubi) or export_lora
                            # folders, each path:strength, their updates added in place of the run's adapters:
                            # 'a.safetensors:0.8,b.safetensors:0.5' (a folder's state_embedder.safetensors too)
lora_scale = 1.0            # strength of --lora paths without ':strength': B A alpha / r times this (0: none)
compile = True              # torch.compile the DiT blocks on CUDA (the first clip pays the compilation; the CPU
                            # runs eager); --compile=False turns it off
merge_lora = False          # fold LoRA into the base weights: at most 1.6% fewer FLOPs, but in bf16 the rounding
                            # of W + BA loses part of the update: not the function the run's validation scored
decode_batch = 4            # members the VAE decodes at once (more: faster on a large GPU, more memory)
vae_dtype = 'float32'       # the Wan VAE's precision: 'float32' (the reference's) or 'bfloat16' (faster)
seed = -1                   # the ensemble's noise (per clip); -1: the run's seed, the noise its validation drew
device = 'auto'             # 'auto' (cuda if there is a GPU, else cpu), 'cpu', 'cuda', 'cuda:1'
configure(globals(), choices=dict(scheduler=('euler', 'unipc'), vae_dtype=('float32', 'bfloat16')),
          positive=('ensemble', 'steps', 'clip_stride', 'decode_batch', 'cfg', 'blur_sigma'),
          nonnegative=('max_clips', 'shift', 'png_members'))
if lora_scale != 1.0 and not lora:
    raise SystemExit(f"--lora_scale={lora_scale} sets the strength of --lora: give the LoRA file with --lora")
for flag, most, why in (('cfg', 20, 'guidance scales in use lie between 1 (off) and about 7'),
                        ('shift', 100, 'Wan samples with 5 to 12 (0: the run\'s)'), ('blur_sigma', 64, 'pixels'),
                        ('lora_scale', 10, '1 applies the file as written, 0 leaves it out, -1 subtracts it')):
    if not abs(globals()[flag]) <= most:   # a typo (or inf) stops here, not after hours of sampling
        raise SystemExit(f"--{flag}={globals()[flag]} is out of range: at most {most} in size ({why})")
loras = []   # --lora: (path, strength) of each file
for item in filter(None, lora.split(',')):
    path, sep, strength = item.rpartition(':')
    try:
        loras.append((path, float(strength)) if sep else (item, lora_scale))
    except ValueError:
        raise SystemExit(f"--lora={lora}: {item!r} is no path:strength (a number, e.g. a.safetensors:0.8)") from None
    if not abs(loras[-1][1]) <= 10:
        raise SystemExit(f"--lora={lora}: strength {loras[-1][1]} of {loras[-1][0]}: at most 10 in size (1 applies "
                         f"the file as written, 0 leaves it out, -1 subtracts it)")
device = resolve_device(device)
if device.startswith('cuda') and torch.cuda.device_count() <= int(device[5:] or 0):
    raise SystemExit(f"--device={device}: this torch ({torch.__version__}) sees {torch.cuda.device_count()} CUDA "
                     f"GPU(s); pass --device=cpu (or auto), or the number of a GPU it sees")
scorer = None   # --lpips_fid: LPIPS per prediction and FID over the clips; loaded first, so that a missing
if lpips_fid:   # package or network file is said within seconds, not after the model and the clips
    from machinery.image_scores import LpipsFid
    scorer = LpipsFid(device)
    for why in scorer.unavailable:
        print(f"not computed: {why}")
said = len(scorer.unavailable) if scorer else 0   # the end adds what comes up later (FID of fewer than 2 clips)
if not out_dir:
    out_dir = 'out_sampling_paper' if os.path.exists(os.path.join('out_sampling_paper', checkpoints.CKPT)) \
        else 'out_sampling'
    which = 'the paper run' if out_dir == 'out_sampling_paper' else 'the demo; no paper run in out_sampling_paper/'
    print(f"--out_dir={out_dir} ({which})")

# --- the trained run: its model, text context and VAE ------------------------------------------
ckpt_path = os.path.join(out_dir, ckpt)   # tensors and plain data only (weights_only): loading never runs code
if not os.path.exists(ckpt_path):
    raise SystemExit(f"{ckpt_path} not found: train first (python train_sampling.py) or pass --out_dir")
state = checkpoints.load_checkpoint(ckpt_path, 'sampling')
run = state['config']
print(f"{ckpt_path}: step {state['step']}, model {run['model']}, vae {run['vae']}, {run['train_mode']}")
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
# as the run's validation computed: a LoRA run's frozen base in bf16; full training's fp32 weights in fp32 (TF32)
ptdtype = torch.bfloat16 if device_type == 'cuda' and run['dtype'] == 'bfloat16' and run['train_mode'] == 'lora' \
    else torch.float32
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
net = build_model(model=run['model'], pretrained=run['pretrained'], train_mode=run['train_mode'],
                  lora_rank=run['lora_rank'], lora_alpha=run['lora_alpha'], init_seed=run['init_seed'],
                  device=device, dtype=ptdtype, tiny=dict(dim=run['dim'], num_layers=run['num_layers'],
                                                          num_heads=run['num_heads'], ffn_dim=run['ffn_dim']),
                  state_embedder=run['state_embedder'],   # the no-state embedding: trained with state dropout
                  null_state=run['state_dropout'] > 0 or 'state_embedder.null' in state['trainable'],   # (or older)
                  state_cond=run.get('use_states', True))   # False: a base trained without states
params = dict(net.named_parameters())
differ = sorted({n for n, p in params.items() if p.requires_grad} ^ set(state['trainable']))
if differ:
    raise SystemExit(f"{ckpt_path} does not fit the model its settings build (tensors differ: {differ[:4]}): pass "
                     f"--ckpt={checkpoints.PREV} (or {checkpoints.BEST}), or the --out_dir of another run")
with torch.no_grad():
    for n, v in state['trainable'].items():
        params[n].copy_(v)


def load_loras(net):
    """--lora: the files' updates added, in place of the run's adapters (stack_loras: ranks concatenated)."""
    from machinery.lora_files import stack_loras
    try:
        stack_loras(net, loras)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"--lora={lora}: {err}")
    print(f"--lora: {', '.join(f'{p} at strength {v}' for p, v in loras)}, " +
          ("in place of the run's adapters" if run['train_mode'] == 'lora' else "added to the run's weights"))


if loras:
    load_loras(net)
net.eval().requires_grad_(False)
if merge_lora and lora_modules(net):   # W + B A alpha / r once, rounded to the base's dtype
    merge_lora_into_base(net)
if ptdtype != torch.float32:   # bf16 inference on GPUs (fp32 kept where the reference keeps it)
    net.set_dtype(ptdtype)
if compile and device_type == 'cuda':   # fused kernels for the 30 identical blocks
    net.compile_blocks()
try:
    context_1LD = text_context(net.cfg, run['text_encoder'], device)   # [1, 512, 4096]: shared by every row
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"the run's text encoder {run['text_encoder']}: {e}")
shift = shift or run['shift']
seed = run['seed'] if seed == -1 else seed
codec = PixelCodec() if run['vae'] == 'pixel' else \
    WanVAE.from_pretrained(run['vae_path'], device=device, dtype=getattr(torch, vae_dtype))

# --- the clips ---------------------------------------------------------------------------------
split = split or os.path.join(run['data_dir'], 'val_v2.0_raw')
try:   # a split missing or damaged: named
    clips = data.RawClips(split, stride=clip_stride, max_clips=max_clips or None, frame_size=run.get('frame_size'))
    # a synthetic split records its world's look: it can be drawn again for any states
    look = 'look' in data.read_json(os.path.join(split, 'metadata.json')).get('synthetic', {})
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"--split={split}: {e}")
counterfactual = counterfactual and look and net.state_cond
if cfg != 1.0 and not net.state_cond:
    raise SystemExit(f"--cfg={cfg}: {ckpt_path} was trained without states (use_states False): there are no states "
                     f"to guide with; use --cfg=1.0")
if ablation and not net.state_cond:
    print(f"{ckpt_path} was trained without states (use_states False): no state ablation or counterfactual rows")
    ablation = False
if ablation and len(clips) < 2:
    print("one clip: no state ablation (it takes another clip's states)")
    ablation = False
# the no-state embedding learns only from the samples whose states were dropped in training
untrained = f"{ckpt_path} was trained with state_dropout=0: its no-state embedding was never trained"
if cfg != 1.0 and run['state_dropout'] == 0:
    raise SystemExit(f"--cfg={cfg}: {untrained}, so there is no unconditional model to guide with. Use --cfg=1.0, "
                     f"or train with --state_dropout > 0 (preset paper_cfg)")
no_states_row = ablation and net.state_embedder.null is not None
if ablation and not no_states_row:
    print(f"note: {ckpt_path} was trained without state dropout, so it has no no-state embedding: no 'no states' row")
elif ablation and run['state_dropout'] == 0:   # an older run's, built whatever its dropout
    print(f"note: {untrained}; the 'no states' row shows an untrained embedding, not the model without states")
results_dir = results_dir or os.path.join(out_dir, 'samples')
os.makedirs(results_dir, exist_ok=True)
# this run's scores only, clip by clip, set aside until every clip is scored: the earlier metrics.csv
# (hours of evaluation at full scale) stays whole whatever stops this run
metrics_csv, partial_csv = (os.path.join(results_dir, f) for f in ('metrics.csv', 'metrics.partial.csv'))
if os.path.exists(partial_csv):   # a stopped run's rows
    os.remove(partial_csv)
print(f"{len(clips)} clips of {split}; ensemble {ensemble}, {steps} {scheduler} steps, shift {shift}, cfg {cfg}"
      f"{'; state ablation' if ablation else ''}{'; counterfactual futures' if counterfactual else ''}")

# --- every clip: the ensemble, the state ablation, the counterfactual futures, the figures -------
FUTURES = {'own': 'own states', 'other': "another clip's states", 'arms': "another clip's arms",
           'swing': 'arms swing across'}
C = data.NUM_CONTEXT_FRAMES


def counterfactual_futures(k, item, futures, predict, preds, row):
    """--counterfactual, on a synthetic split: the ensemble's frame 77 under hand-made state futures
    too, every future's prediction scored into row against the frame the synthetic world draws for
    its states (its truth) and against the recorded one; counterfactual_{k}.png."""
    from machinery import synthetic_video as world
    states_TD, truth = item['states_TD'], item['frames_THWC'][-1].numpy()
    if 'other' in futures:   # the other clip's arms alone: the camera pans as recorded, so only the arms differ
        arms = list(world.SYNTHETIC_ARM_JOINTS)
        futures['arms'] = states_TD.clone()
        futures['arms'][C:, arms] = futures['other'][C:, arms]
    futures['swing'] = torch.from_numpy(world.arms_swing_across(states_TD.numpy()))
    own_psnr = row[f'psnr_ensemble_{ensemble}']
    panels = [dict(name=FUTURES['own'], pred_HWC=preds[f'ensemble_{ensemble}'], truth_HWC=truth,
                   psnr_truth=own_psnr, psnr_orig=own_psnr)]
    for name, states in futures.items():
        pred = preds['other_states'] if name == 'other' else predict(states)[1]
        cf_truth = world.synthetic_frame(split, item['shard'], item['start'] + data.TARGET_FRAME, states[-1].numpy())
        row[f'psnr_cf_{name}_truth'] = round(psnr(pred, cf_truth), 4)
        row[f'psnr_cf_{name}_recorded'] = round(psnr(pred, truth), 4)
        panels.append(dict(name=FUTURES[name], pred_HWC=pred, truth_HWC=cf_truth,
                           psnr_truth=row[f'psnr_cf_{name}_truth'], psnr_orig=row[f'psnr_cf_{name}_recorded']))
    pictures.save_png(pictures.counterfactual_figure(item['frames_THWC'][:C].numpy(), panels,
                                                     title=f'clip {k}: frame 77 under other state futures'),
                      os.path.join(results_dir, f'counterfactual_{k}.png'), then=f"then run again ({kept()})")


rows, seconds = [], []


def kept():
    """What a stop leaves: the earlier result, and this run's scores so far."""
    return f"{metrics_csv} (an earlier result, if any) is untouched" + (
        f"; {partial_csv} holds the scores of this run's {len(rows)} clip(s) so far" if rows else "")


for k in tqdm(range(len(clips)), desc='clips', disable=None):   # a bar on a terminal only
    try:
        item = clips[k]
    except ValueError as e:   # a damaged video: named, with the scores so far kept
        raise SystemExit(f"clip {k}: {e}; pass --split with a good copy of the split\n{kept()}")
    frames_THWC, states_TD = item['frames_THWC'], item['states_TD']
    truth = frames_THWC[-1].numpy()
    last_ctx = frames_THWC[C - 1].numpy()
    noise_seed = hash((seed, item['shard'], item['start'])) % 2 ** 62   # every variant of a clip: the same noise

    def predict(states, no_states=False, videos=False):
        try:
            return predict_frame77(net, codec, frames_THWC, states, context_1LD, ensemble=ensemble, steps=steps,
                                   shift=shift, noise_seed=noise_seed, cfg_scale=1.0 if no_states else cfg,
                                   scheduler=scheduler, decode_batch=decode_batch, device=device,
                                   no_states=no_states, videos=videos)
        except FloatingPointError as e:
            raise SystemExit(f"clip {k} (shard {item['shard']}, frame {item['start']}): {e}; pass an earlier "
                             f"state: --ckpt={checkpoints.PREV} (or {checkpoints.BEST})\n{kept()}")

    if device_type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.time()
    # only the 5 context frames are encoded: the target never reaches the model
    members, mean, *videos = predict(states_TD, videos=gif and k == 0)
    if device_type == 'cuda':
        torch.cuda.synchronize()
    seconds.append(time.time() - t0)
    preds = {'copy_last': last_ctx, 'single': members[0], f'ensemble_{ensemble}': mean}
    if blur:
        preds['blur'] = blur_baseline(members[0], last_ctx, blur_sigma)
    futures = {}   # name -> states [21, 25]: the same clip under other state futures
    if ablation:
        # the frames to predict take the states of clip k + n/2 (mod n), a fixed derangement: no clip
        # keeps its own, and neighbours (which overlap in time and scene) are never paired; the
        # context frames keep theirs (their video is given)
        other_TD = clips.states((k + len(clips) // 2) % len(clips))
        futures['other'] = states_TD.clone()
        futures['other'][C:] = other_TD[C:]
        _, preds['other_states'] = predict(futures['other'])
    if no_states_row:
        _, preds['no_states'] = predict(states_TD, no_states=True)
    row = dict(clip=k, shard=item['shard'], start=item['start'], seconds=round(seconds[-1], 3))
    lpips = scorer.clip(preds, truth) if scorer else {}   # FID: their features kept for the table
    for name, img in preds.items():
        row[f'psnr_{name}'] = round(psnr(img, truth), 4)
        row[f'ssim_{name}'] = round(ssim(img, truth), 4)
        if name in lpips:
            row[f'lpips_{name}'] = lpips[name]
    pictures.save_png(pictures.clip_figure(frames_THWC[:C].numpy(), members[:png_members], mean, truth,
                                           title=f'clip {k} (shard {item["shard"]}, frame {item["start"]})'),
                      os.path.join(results_dir, f'clip_{k}.png'), then=f"then run again ({kept()})")
    if counterfactual:
        counterfactual_futures(k, item, futures, predict, preds, row)
    # after every clip, so that a stop keeps the scores so far (kept(): those of the clips before this one)
    with written(partial_csv, then=f"then run again ({kept()})") as tmp, open(tmp, 'w', newline='') as f:
        rows.append(row)
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if not sys.stderr.isatty():   # no bar in a file: a line a clip
        print(f"clip {k + 1}/{len(clips)}: ensemble PSNR {row[f'psnr_ensemble_{ensemble}']:.2f} dB, {seconds[-1]:.1f} s")
    if videos:   # the first clip as a video: one sample and the ensemble mean next to the real clip
        members_video = videos[0]
        mean_video = members_video.astype(np.float64).mean(0).round().astype(np.uint8)
        pictures.save_gif(os.path.join(results_dir, 'clip_0.gif'), [members_video[0], mean_video, frames_THWC.numpy()],
                          ['sample 1', f'mean of {ensemble}', 'real'], then=f"then run again ({kept()})")

# --- the tables: means over the clips, and the spread over the clips of each margin ---------------
over_clips = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]
              if key.startswith(('psnr', 'ssim', 'lpips'))}
if scorer:   # the set of predicted frames 77 against the set of real ones
    over_clips.update({f'fid_{name}': fid for name, fid in scorer.fid().items()})


def spread(better, worse):
    """min and median over the clips of the margin psnr_better - psnr_worse (dB)"""
    margins = [r[f'psnr_{better}'] - r[f'psnr_{worse}'] for r in rows]
    return f"(per clip: min {min(margins):.2f}, median {float(np.median(margins)):.2f})"


own = over_clips[f'psnr_ensemble_{ensemble}']
labels = {'copy_last': 'copy last context frame', 'single': 'single sample',
          f'ensemble_{ensemble}': f'ensemble of {ensemble}', 'blur': 'blur + histogram matching',
          'other_states': f"ensemble, {FUTURES['other']}",
          'no_states': 'ensemble, no states (no-state embedding)'}
columns = [c for c in ('lpips', 'fid') if f'{c}_copy_last' in over_clips]   # those computed
print(f"\n{'prediction of frame 77':<44} {'PSNR (dB)':>10} {'SSIM':>8}" + ''.join(f' {c.upper():>8}' for c in columns)
      + f"   ({len(rows)} clips)")
for name, label in labels.items():
    if f'psnr_{name}' not in over_clips:
        continue
    p, s = over_clips[f'psnr_{name}'], over_clips[f'ssim_{name}']
    scores = [over_clips[f'{c}_{name}'] for c in columns]
    if not all(math.isfinite(v) for v in (p, s, *scores)):
        raise SystemExit(f"the {label}'s scores came out {p}, {s}, {scores}: not a result; {kept()}")
    margin = f'   own states better by {own - p:.2f} dB {spread(f"ensemble_{ensemble}", name)}' \
        if name in ('other_states', 'no_states') else ''
    print(f"{label:<44} {p:>10.2f} {s:>8.3f}" + ''.join(f' {v:>8.3f}' if c == 'lpips' else f' {v:>8.2f}'
                                                      for c, v in zip(columns, scores)) + margin)
for why in scorer.unavailable[said:] if scorer else []:
    print(f"not computed: {why}")
if counterfactual:
    print("\ncounterfactual futures: the ensemble's frame 77 under other states, scored against the frame the "
          "synthetic world draws for those states (its truth) and against the recorded frame")
    print(f"{'future states':<28} {'vs its truth':>13} {'vs recorded':>12} {'closer to its truth by':>24}")
    print(f"{FUTURES['own']:<28} {own:>13.2f} {own:>12.2f} {'-':>24}")
    for name in [n for n in ('other', 'arms', 'swing') if f'psnr_cf_{n}_truth' in over_clips]:
        t, r = over_clips[f'psnr_cf_{name}_truth'], over_clips[f'psnr_cf_{name}_recorded']
        print(f"{FUTURES[name]:<28} {t:>13.2f} {r:>12.2f} {t - r:>21.2f} dB "
              f"{spread(f'cf_{name}_truth', f'cf_{name}_recorded')}")
print(f"{np.mean(seconds[1:] or seconds):.2f} s per clip on {device} (ensemble {ensemble}, {steps} steps, cfg {cfg}; "
      f"the own states' prediction, ablations not counted)")
os.replace(partial_csv, metrics_csv)   # every clip scored: the new result replaces the earlier one
print(f"wrote {results_dir}/metrics.csv, clip_*.png{', counterfactual_*.png' if counterfactual else ''}"
      f"{', clip_0.gif' if gif else ''}")
