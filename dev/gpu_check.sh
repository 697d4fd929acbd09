#!/usr/bin/env bash
# nanoWM: first-GPU-run checks on one H100 or H200 (no internet, random weights, synthetic data).
# Section 1 brings back the four speed figures, each printed (stdout and summary, naming the card)
# as soon as it is measured: the LoRA step (clips/s), the compression step (samples/s), the DiT
# forward (MFU) and sample.py --ensemble 20 (seconds a clip with the VAE). Section 2, the full-size
# runs and checks, follows while the budget lasts, or in a second call. Run from the repository root:
#     bash dev/gpu_check.sh                    # one call of 600 s: section 1 (~6 min), then section 2
#     SKIP_SPEED=1 BUDGET=300 bash dev/gpu_check.sh   # a second call: section 2 only, in BUDGET s
#     DEVICE=cpu bash dev/gpu_check.sh         # CPU dry run of the same commands at tiny sizes (typos, flags)
# Logs go to $OUT/ if set, else ./gpu_out/.
# The GPU machine has no package index and lacks `av` and `diffusers` (the sampling track's mp4 steps
# and the VAE row need them). Bring them as wheels in .whl/ beside the checkout (40 MiB; av's abi3
# wheel serves Python >= 3.11), fetched on a machine with an index:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl av==18.1.0 diffusers==0.42.1
# A runner that copies only the files git tracks must be told to bring .whl/ as well (it is no part
# of the repository). Without it the mp4 steps and the VAE row are skipped: no sample.py figure.
# Every step: `timeout`, failures logged and skipped over, a global time budget (BUDGET s).
# Output: $LOGDIR/gpu_check.log (everything) and $LOGDIR/summary.txt (rc, seconds, key lines).
# Big files (checkpoints, data) go to $WORK, never to $OUT.
set -u
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
REPO=$PWD                  # the repository root (this script lives in $REPO/dev/)
[ -f "$REPO/machinery/bench.py" ] && [ -f "$REPO/train_compression.py" ] && [ -f "$REPO/dev/gpu_check.sh" ] \
    || { echo "run from the nanoWM repository root: bash dev/gpu_check.sh"; exit 2; }
LOGDIR=${OUT:-$REPO/gpu_out}
WORK=${WORK:-/tmp/nanowm_gpu_work}
rm -rf "$WORK"/tc_b10 "$WORK"/tc_ddp "$WORK"/ts_5b "$WORK"/ts_tiny "$WORK"/ts_data "$WORK"/logs
mkdir -p "$LOGDIR" "$WORK/logs"
LOG=$LOGDIR/gpu_check.log
SUM=$LOGDIR/summary.txt
: > "$LOG"; : > "$SUM"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$WORK/inductor
START=$(date +%s)
if [ "$DEVICE" = cpu ]; then
    BUDGET=${BUDGET:-3000}; TMUL=6
    DEV=cpu; BDEV=cpu
    # tiny sizes, appended after each step's own flags (later flags win): the flag names are checked
    B_SMALL="--threads=2 --st_layers=2 --st_heads=2 --st_embd=64 --st_vocab=512 --st_grid=8 --st_batch=2 --decode_batch=2 --wan_model=tiny --latent_hw=8 --wan_batch=1 --wan_lora_batch=1 --ensemble=2 --steps=1 --vae=tiny --wan_ckpt_blocks=1 --warmup=0 --iters=1"
    TC_SMALL="--n_layer=1 --n_embd=64 --n_head=2 --batch_size=2 --global_batch_size=4 --num_workers=0 --eval_samples=2"
    TS_SMALL="--model=tiny --dtype=float32 --gradient_checkpointing=1 --batch_size=2 --global_batch_size=4"
    SYN=32                  # synthetic frame size: the pixel codec's latents are SYN / 4 = 8
else
    BUDGET=${BUDGET:-540}; TMUL=1   # one device call: 600 s at most
    DEV=cuda; BDEV=cuda     # bench.py resolves 'cuda' to the current GPU's index
    B_SMALL=""; TC_SMALL=""; TS_SMALL=""
    SYN=128                 # pixel-codec latents of 128 px frames are 32 x 32: a 512x512 clip's 1536 tokens
fi

say() { echo "$*" | tee -a "$SUM"; }
FIG='^(st_|wan_|ensemble_|vae_)[a-z0-9_]* '   # a row of machinery.bench's table: a figure
# run_step NAME TIMEOUT_S CMD...: run under timeout (capped by the budget left), log, summarise; the
# figures reach stdout and the summary the moment they are printed, so a call cut short keeps them
run_step() {
    local name=$1 t=$(( $2 * TMUL )); shift 2
    local now rem t0 rc dt steplog
    now=$(date +%s); rem=$(( BUDGET - (now - START) ))
    if [ "$rem" -lt 20 ]; then say "SKIP  $name: time budget spent"; return; fi
    [ "$t" -gt "$rem" ] && t=$rem
    steplog=$WORK/logs/$name.log
    printf '\n===== [%s] at t+%ss, timeout %ss\n$ %s\n' "$name" "$(( now - START ))" "$t" "$*" >> "$LOG"
    t0=$(date +%s)
    timeout --kill-after=15 "$t" "$@" < /dev/null 2>&1 | tee "$steplog" | grep --line-buffered -E "$FIG" \
        | sed -u "s/^/    [$CARD] /" | tee -a "$SUM"
    rc=${PIPESTATUS[0]}
    dt=$(( $(date +%s) - t0 ))
    tr '\r' '\n' < "$steplog" | grep -v '^override:' >> "$LOG"
    say "----- $name: rc=$rc ($( [ $rc = 124 ] || [ $rc = 137 ] && echo TIMEOUT || { [ $rc = 0 ] && echo ok || echo FAILED; } )) ${dt}s"
    # the lines that matter: results, memory, speed, errors
    tr '\r' '\n' < "$steplog" | grep -E 'PROBE|GiB|MFU|mfu|samples/s|samples_s|ms/step|parameters|Error|error:|Traceback|out of memory|No available kernel|^step [0-9]|trained|resumed|memwrap|process\(es\)|decode|ratio|looped|per clip|^VAE |^device|torch [0-9]' \
        | grep -v -E "^override:|[0-9?]it/s|s/it|$FIG" | awk '!seen[$0]++' | tail -n 14 | cut -c1-220 | sed 's/^/    /' >> "$SUM"
}

# ---------------------------------------------------------------------------------------------
# 0. environment: GPU, versions, packages (wheels from .whl/ when carried, else the steps needing them skip)
# ---------------------------------------------------------------------------------------------
{
    echo "date $(date -u +%FT%TZ); DEVICE=$DEVICE; repo $REPO; commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)"
    command -v nvidia-smi >/dev/null && nvidia-smi
} >> "$LOG" 2>&1
CARD=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if '$DEVICE' != 'cpu' and torch.cuda.is_available() else 'CPU')" 2>/dev/null)
say "card: ${CARD:=unknown}"
command -v nvidia-smi >/dev/null && say "nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -n 2)"
if ! $PY -c "import av, diffusers" 2>/dev/null && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl >> "$LOG" 2>&1 \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
HAVE_AV=1; $PY -c "import av" 2>/dev/null || { HAVE_AV=0; say "NOTE: no PyAV here: the sampling-track steps with mp4 data are skipped"; }
HAVE_DIFFUSERS=1; $PY -c "import diffusers" 2>/dev/null || { HAVE_DIFFUSERS=0; say "NOTE: no diffusers here: the vae row is skipped"; }
$PY - >> "$SUM" 2>&1 <<'EOF'
import torch, importlib
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"{torch.cuda.get_device_name(0) + ' ' + str(torch.cuda.get_device_capability(0)) + ', %.1f GiB' % (torch.cuda.mem_get_info()[1] / 2**30) if torch.cuda.is_available() else 'no CUDA'}")
for m in ('av', 'diffusers', 'einops', 'safetensors', 'huggingface_hub', 'PIL', 'tqdm', 'numpy'):
    try:
        mod = importlib.import_module(m); print(f"  {m} {getattr(mod, '__version__', '?')} ({getattr(mod, '__file__', '')})")
    except Exception as e:
        print(f"  {m}: MISSING ({type(e).__name__})")
EOF

# ---------------------------------------------------------------------------------------------
# 1. the four speed figures (targets on one H100: DiT forward >= 55% MFU, sample.py --ensemble 20
# <= 12 s a clip with the VAE, compression step >= 60 samples/s, LoRA step >= 11 clips/s), each
# step compiled as its preset runs it. bench.py --compile compiles block by block with static shapes
# and each step has one shape, so every step compiles one graph a model (the loss chunk divides the
# micro-batch's tokens; the chunk-size rows add one small loss graph each). Each step estimated
# on an H100 (cold compile cache), then its timeout: 60 / 80, 65 / 100, 35 / 70, 95 / 120, 100 / 150 s.
# ---------------------------------------------------------------------------------------------
# field FROM_END of bench row NAME in the log of STEP (from the end: 4 ms, 3 samples/s, 1 MFU)
fig() { [ -f "$WORK/logs/$1.log" ] && awk -v n="$2" -v k="$3" '$1 == n {v = $(NF - k)} END {print v}' \
    "$WORK/logs/$1.log"; }
if [ "${SKIP_SPEED:-0}" = 0 ]; then
# the DiT forward (batch 4, a timestep per latent frame)
run_step speed_wan_fwd_b4 80 $PY -m machinery.bench --preset=full --device=$BDEV --what=wan_fwd --wan_batch=4 \
    --wan_fwd_per_token=False --compile --warmup=2 --iters=5 $B_SMALL
# sample.py's DiT work on a clip: 20 members x 20 solver steps as one batch (the warm-up: one step)
run_step speed_ensemble_20x20 100 $PY -m machinery.bench --preset=full --device=$BDEV --what=ensemble --ensemble=20 \
    --steps=20 --ensemble_looped=False --compile --warmup=1 --iters=1 $B_SMALL
# sample.py's VAE work on that clip: encode the context, decode the 20 members 4 at a time, fp32
# (sample.py's default) and bf16 (--vae_dtype=bfloat16, with its frame 77's PSNR against fp32's)
[ "$HAVE_DIFFUSERS" = 1 ] && run_step speed_vae_20 70 $PY -m machinery.bench --preset=full --device=$BDEV --what=vae \
    --ensemble=20 --warmup=1 --iters=1 $B_SMALL
ens=$(fig speed_ensemble_20x20 ensemble_batched 4); vae=$(fig speed_vae_20 vae_clip 4)
vae_bf16=$(fig speed_vae_20 vae_clip_bf16 4)
sec() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (a + b) / 1000}'; }   # ms + ms -> s
[ -n "$ens" ] && [ -n "$vae" ] && say "    [$CARD] sample.py --ensemble 20 --steps 20: $(sec "$ens" "$vae") s a clip \
(DiT $(sec "$ens" 0) + VAE $(sec 0 "$vae")); --vae_dtype=bfloat16: $(sec "$ens" "${vae_bf16:-nan}") s"
# the compression step at the paper preset's micro-batch 10 (30,720 scored tokens: 8 loss chunks of
# 3,840), then the loss as a lever: one chunk of 30,720, recomputed in the backward; no chunks and no
# recomputation (--st_loss_chunk=0: one head matmul less, the bf16 logits kept, 3.7 GiB)
run_step speed_st_train_b10 120 $PY -m machinery.bench --preset=full --device=$BDEV --what=st_train --st_batch=10 \
    --st_loss_chunk=4096,30720,0 --compile --warmup=1 --iters=3 $B_SMALL
# the LoRA step at the paper preset's per-GPU batch 8 with 12 of 30 blocks checkpointed (its 80 GB estimate)
run_step speed_wan_lora_b8_ckpt12 150 $PY -m machinery.bench --preset=full --device=$BDEV --what=wan_lora \
    --wan_lora_batch=8 --wan_ckpt_blocks=12 --compile --warmup=1 --iters=2 $B_SMALL
lora=$(fig speed_wan_lora_b8_ckpt12 wan_lora 3); st=$(fig speed_st_train_b10 st_train_chunk4096 3)
mfu=$(fig speed_wan_fwd_b4 wan_fwd 1)
say "FIGURES [$CARD] $(date -u +%F): LoRA step ${lora:-?} clips/s (target >= 11); compression ${st:-?} samples/s \
(>= 60); DiT forward MFU ${mfu:-?} (>= 55%); sample.py: the line above (<= 12 s a clip)"
fi
# the lever that needs a process of its own (a compile setting: its graphs differ), first after section 1:
# selective activation checkpointing of the compiled blocks (torch.compile's activation memory budget:
# half the activations saved, the matmuls' first, the elementwise work recomputed) in place of whole
# blocks checkpointed, beside speed_wan_lora_b8_ckpt12 (estimated ~100 s, ~50 GiB on an H100)
run_step lever_wan_lora_b8_budget 150 $PY -m machinery.bench --preset=full --device=$BDEV --what=wan_lora \
    --wan_lora_batch=8 --wan_ckpt_blocks=0 --act_budget=0.5 --compile --warmup=1 --iters=2 $B_SMALL
# LoRA's B product accumulated by the base GEMM (torch.addmm) in place of a separate add, beside
# speed_wan_lora_b8_ckpt12 with the same checkpointing (estimated ~100 s)
run_step lever_wan_lora_b8_addmm 150 $PY -m machinery.bench --preset=full --device=$BDEV --what=wan_lora \
    --wan_lora_batch=8 --wan_ckpt_blocks=12 --lora_addmm=True --compile --warmup=1 --iters=2 $B_SMALL

# ---------------------------------------------------------------------------------------------
# helpers written to $WORK: peak-memory wrapper, CUDA probe, synthetic data
# ---------------------------------------------------------------------------------------------
cat > "$WORK/memwrap.py" <<'EOF'
"""python memwrap.py SCRIPT ARGS...: run a repo script as __main__ and print the CUDA peak at exit (OOM too)."""
import atexit, os, runpy, sys, time
import torch
t0 = time.time()
def report():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f"memwrap: peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, reserved "
              f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB, {time.time() - t0:.0f} s", flush=True)
    else:
        print(f"memwrap: no CUDA peak (CPU run), {time.time() - t0:.0f} s", flush=True)
atexit.register(report)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.getcwd())
runpy.run_path(sys.argv[0], run_name='__main__')
EOF

cat > "$WORK/probe.py" <<'EOF'
"""CUDA facts the scripts rely on, each tried alone (PROBE name: OK/FAIL). 'expect FAIL' marks what
torch is known to refuse: the scripts avoid it, and the probe shows they must."""
import sys, time, traceback
sys.path.insert(0, '.')
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
dev = sys.argv[1]
cuda = dev.startswith('cuda')
FLASH, EFF = [SDPBackend.FLASH_ATTENTION], [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
def probe(name, fn):
    t0 = time.time()
    try:
        r = fn()
        print(f"PROBE {name}: OK {'' if r is None else r} ({time.time() - t0:.1f} s)", flush=True)
    except Exception as e:
        print(f"PROBE {name}: FAIL {type(e).__name__}: {str(e).strip().splitlines()[0][:220]}", flush=True)
    if cuda:
        torch.cuda.synchronize()
def rnd(*shape, dtype=torch.bfloat16, grad=False):
    return torch.randn(*shape, device=dev, dtype=dtype, requires_grad=grad)
def attn(shape_q, shape_k, dtype, kernels, causal=False, dropout=0.0, backward=True):
    q, k, v = rnd(*shape_q, dtype=dtype, grad=backward), rnd(*shape_k, dtype=dtype, grad=backward), rnd(*shape_k, dtype=dtype, grad=backward)
    with sdpa_kernel(kernels):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout)
        if backward:
            out.float().sum().backward()
    return tuple(out.shape)

from machinery.speed import peak_flops
from machinery.vae import PixelCodec
print(f"device {torch.cuda.get_device_name(dev) if cuda else 'cpu (flash probes below are NOT CUDA results)'}; "
      f"peak_flops -> {peak_flops(dev)}; flash_sdp_enabled {torch.backends.cuda.flash_sdp_enabled()}, "
      f"mem_efficient_sdp_enabled {torch.backends.cuda.mem_efficient_sdp_enabled()}")
# 1. what CUDA autocast does to the ST attention inputs: LayerNorm (QK-norm) -> fp32, SDPA casts back to bf16
def ln_dtype():
    lin, ln = torch.nn.Linear(64, 192).to(dev), torch.nn.LayerNorm(64).to(dev)
    with torch.autocast(dev.split(':')[0], dtype=torch.bfloat16):
        y = lin(rnd(8, 64, dtype=torch.float32))
        return f"linear -> {y.dtype}, LayerNorm(bf16) -> {ln(y[:, :64]).dtype}"
probe('autocast dtypes', ln_dtype)
# 2. the attention shapes of the scripts under flash only (bench.py --sdpa=flash), forward + backward
# (the ST spatial attention has no probability dropout, so cuDNN may take it too; the temporal one is no SDPA call)
probe('flash ST spatial  (8*5, 8, 1024, 64) bf16', lambda: attn((40, 8, 1024, 64), (40, 8, 1024, 64), torch.bfloat16, FLASH))
if cuda:
    probe('cudnn ST spatial  (8*5, 8, 1024, 64) bf16', lambda: attn((40, 8, 1024, 64), (40, 8, 1024, 64), torch.bfloat16, [SDPBackend.CUDNN_ATTENTION]))
probe('flash Wan self  (4, 24, 1536, 128) bf16', lambda: attn((4, 24, 1536, 128), (4, 24, 1536, 128), torch.bfloat16, FLASH))
probe('flash Wan cross (4, 24, 1536|512, 128) bf16', lambda: attn((4, 24, 1536, 128), (4, 24, 512, 128), torch.bfloat16, FLASH))
probe('flash+eff ST decode fp32 spatial (8, 8, 1024, 64)', lambda: attn((8, 8, 1024, 64), (8, 8, 1024, 64), torch.float32, EFF, backward=False))
# Wan 2.2 VAE mid-block attention: one head of 1024 channels (decoder; 640 in the encoder), fp32
probe('flash VAE attention fp32 (4, 1, 1024, 1024)  [expect FAIL: why the vae row allows any kernel]', lambda: attn((4, 1, 1024, 1024), (4, 1, 1024, 1024), torch.float32, FLASH, backward=False))
probe('flash+eff VAE attention fp32 (4, 1, 1024, 1024)', lambda: attn((4, 1, 1024, 1024), (4, 1, 1024, 1024), torch.float32, EFF, backward=False))
probe('flash VAE attention bf16 (4, 1, 1024, 1024)  [expect FAIL: head_dim > 256]', lambda: attn((4, 1, 1024, 1024), (4, 1, 1024, 1024), torch.bfloat16, FLASH, backward=False))
# 3. the modules themselves under flash only: one full-width block each, a training step
def st_block():
    from st_transformer import STConfig, STTransformer
    m = STTransformer(STConfig(vocab_size=64000, n_layer=1, dropout=0.1)).to(dev)
    b = 4 if cuda else 1
    z, s = torch.randint(0, 64000, (b, 6, 32, 32), device=dev), torch.randn(b, 64, 25, device=dev)
    with sdpa_kernel(FLASH), torch.autocast(dev.split(':')[0], dtype=torch.bfloat16, enabled=cuda):
        loss = m(z[:, :5], s, predict_from=2, targets_BTHW=z[:, 3:])
        loss.backward()
    return f"loss {loss.item():.3f}"
probe('flash-only ST 1 layer d512 train step (autocast bf16)', st_block)
def wan_block():
    from wan_state import WanConfig, WanDiT, add_lora, frame_timesteps
    with torch.device(dev):
        net = WanDiT(WanConfig(num_layers=1) if cuda else WanConfig.tiny(num_heads=1, dim=128), state_cond=True)
    if cuda:
        net.set_dtype(torch.bfloat16)
    add_lora(net, 32, 32)
    net.gradient_checkpointing = True
    cfg = net.cfg
    x = torch.randn(2, 48, 6, 32, 32, device=dev)
    mask = torch.ones(2, 6, device=dev); mask[:, :2] = 0
    with sdpa_kernel(FLASH if cuda else EFF + [SDPBackend.MATH]):
        out = net(x, frame_timesteps(mask, torch.full((2,), 500.0, device=dev)), torch.randn(1, cfg.text_len, cfg.text_dim, device=dev),
                  torch.randn(2, 21, 25, device=dev))
        out.float().pow(2).mean().backward()
    return f"out {out.dtype}"
probe('flash-only Wan 1 block LoRA step, bf16 weights, checkpointed', wan_block)
# 4. device handling the scripts rely on, each tried directly
probe("torch.cuda.set_device('cuda')  [expect FAIL: torch wants an index; bench.py passes one]", lambda: torch.cuda.set_device('cuda'))
def pixel_decode():
    z = PixelCodec().encode(torch.rand(2, 3, 21, 32, 32, device=dev) * 2 - 1)
    return tuple(PixelCodec().decode(z).shape)
probe('PixelCodec decode of latents on the device', pixel_decode)
# 5. the ST temporal attention at the paper preset's micro-batch 10 (10 x 1024 positions, 8 heads, T 5),
# forward + backward: st_transformer.causal_time_attention (eager, compiled) against flash SDPA on
# the (B S) heads T c layout the block used to move its residual into (the transposes not timed)
def temporal_ms():
    from st_transformer import causal_time_attention
    b = 10 if cuda else 1
    qkv = [rnd(b, 5, 1024, 8, 64, grad=True) for _ in range(3)]
    qkv_sdpa = [rearrange(a.detach(), 'b t s h c -> (b s) h t c').contiguous().requires_grad_() for a in qkv]
    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    def ms(fn, args, n=5):
        for i in range(n + 2):
            if i == 2:
                sync(); t0 = time.perf_counter()
            fn(*args).float().sum().backward()
        sync()
        return (time.perf_counter() - t0) / n * 1000
    with sdpa_kernel(FLASH if cuda else [SDPBackend.MATH]):
        return (f"explicit {ms(causal_time_attention, qkv):.2f} ms, compiled {ms(torch.compile(causal_time_attention), qkv):.2f} ms, "
                f"SDPA {ms(sdpa, qkv_sdpa):.2f} ms (fwd+bwd, batch {b})")
def sync():
    if cuda:
        torch.cuda.synchronize()
from einops import rearrange
probe('ST temporal attention T=5: explicit vs SDPA', temporal_ms)
EOF

# ---------------------------------------------------------------------------------------------
# 2. the checks, most informative / riskiest first (each step's timeout in GPU seconds)
# ---------------------------------------------------------------------------------------------
run_step data_prep 90 bash -c "$PY -m machinery.prepare synthetic --out $WORK/syn64k --vocab 64000 && { [ $HAVE_AV = 0 ] || \
    $PY -c 'from machinery import synthetic_video; synthetic_video.write_synthetic_raw_set(\"$WORK/ts_data\", 1, 1500, $SYN, 0, 1200)'; }"
# the sampling runs below: the synthetic raw set above (1 shard, SYN px), pixel codec, a window every 8 frames
TS_DATA="--data_dir=$WORK/ts_data --make_synthetic --synthetic_shards=1 --synthetic_size=$SYN --vae=pixel --download=False"
TS_VAL="--eval_clips=1 --eval_ensemble=2 --eval_steps=2 --eval_interval=1000 --ckpt_interval=1000"

run_step probe 60 $PY "$WORK/probe.py" "$BDEV"

# bench.py with its default device ('cuda' resolved to the current GPU's index)
run_step bench_default_device 40 $PY -m machinery.bench --preset=full --what=wan_fwd --warmup=0 --iters=1 $( [ "$DEVICE" = cpu ] && echo --device=cpu ) $B_SMALL

# Wan 2.2 TI2V-5B LoRA step at the paper's per-GPU setting (batch 8, all 30 blocks checkpointed)
run_step bench_wan_lora_b8_ckpt30 60 $PY -m machinery.bench --preset=full --device=$BDEV --what=wan_lora --wan_lora_batch=8 --wan_ckpt_blocks=30 --warmup=1 --iters=2 $B_SMALL

# the real training script at full size: random 5B base (CPU init, ~30-60 s), LoRA rank 32,
# batch 8 x 2 accumulation, 3 steps, 1536 tokens a clip (pixel codec on 128 px frames), umT5
# replaced by zeros; the first sampling run also encodes the synthetic clips (once). Eager
# (--compile=False, the preset compiles): the bench rows above time the compiled blocks.
[ "$HAVE_AV" = 1 ] && run_step train_sampling_5b_lora 150 $PY "$WORK/memwrap.py" train_sampling.py --preset=paper --device=$DEV \
    --pretrained= --text_encoder=zeros $TS_DATA $TS_VAL --out_dir=$WORK/ts_5b --batch_size=8 \
    --global_batch_size=16 --max_iters=3 --log_interval=1 --compile=False $TS_SMALL

# compression track, paper preset at its micro-batch 10 (54 GiB measured on an H100)
run_step train_compression_paper_b10 75 $PY "$WORK/memwrap.py" train_compression.py --preset=paper --device=$DEV \
    --data_dir=$WORK/syn64k --out_dir=$WORK/tc_b10 --max_iters=8 --global_batch_size=20 \
    --final_eval=False --eval_interval=1000 --eval_samples=16 --num_workers=4 --compile=False $TC_SMALL
[ -f "$WORK/tc_b10/log.jsonl" ] && { echo "    tc_b10 log.jsonl (last 3):"; tail -n 3 "$WORK/tc_b10/log.jsonl" | sed 's/^/      /'; } >> "$SUM"

# ST-transformer rows at the bench defaults: training step (batch 8), fp32 decoding with / without KV cache
run_step bench_st 60 $PY -m machinery.bench --preset=full --device=$BDEV --what=st_train,st_decode --warmup=1 --iters=3 $B_SMALL

# DDP with NCCL (torchrun, 1 process: init, no_sync accumulation, all-reduce), both tracks, small models
run_step ddp_train_compression 45 $PY -m torch.distributed.run --standalone --nproc_per_node=1 train_compression.py \
    --device=$DEV --data_dir=$WORK/syn64k --out_dir=$WORK/tc_ddp --max_iters=2 --n_layer=2 --batch_size=4 \
    --global_batch_size=8 --final_eval=False --eval_samples=4 --num_workers=2 --compile=False $TC_SMALL \
    $( [ "$DEVICE" = cpu ] && echo --preset=paper )
    # (torchrun on CUDA picks preset paper by itself, compiled: eager here, the DDP path is what is checked)
[ "$HAVE_AV" = 1 ] && run_step ddp_train_sampling_tiny 45 $PY -m torch.distributed.run --standalone --nproc_per_node=1 \
    train_sampling.py --preset=cpu --device=$DEV $TS_DATA $TS_VAL --out_dir=$WORK/ts_tiny \
    --batch_size=2 --global_batch_size=4 --max_iters=2 --log_interval=1

# LoRA step at the bench default (batch 2, no checkpointing: ~30 blocks x 0.39 GiB x 2 clips of activations)
run_step bench_wan_lora_default 45 $PY -m machinery.bench --preset=full --device=$BDEV --what=wan_lora --warmup=1 --iters=2 $B_SMALL

# DiT forward (batch 4) and sample.py's batched ensemble (20 members; 2 solver steps: time scales with steps)
run_step bench_wan_fwd_ensemble 60 $PY -m machinery.bench --preset=full --device=$BDEV --what=wan_fwd,ensemble --ensemble=20 --steps=2 --warmup=1 --iters=2 $B_SMALL

# resume the tiny sampling run without torchrun (the optimizer state loads from the CPU onto the GPU)
[ "$HAVE_AV" = 1 ] && run_step resume_train_sampling_tiny 40 $PY train_sampling.py --preset=cpu --device=$DEV $TS_DATA \
    $TS_VAL --out_dir=$WORK/ts_tiny --batch_size=2 --global_batch_size=4 --max_iters=3 --log_interval=1 --init_from=resume

# sample.py end to end on the tiny checkpoint (pixel codec, the synthetic val clips of its data_dir)
if [ "$HAVE_AV" = 1 ]; then
    run_step sample_tiny_pixel 45 $PY sample.py --device=$DEV --out_dir=$WORK/ts_tiny --ensemble=4 --steps=2 --max_clips=1
fi

# the speed rows' comparisons, if time is left: the LoRA step of section 1 eager; each SDPA
# kernel on the transformer rows (batch 4: the math kernel keeps the 1024 x 1024 scores of every
# layer); where the time goes (the profiler's top operators and kernels, into the summary too)
run_step bench_wan_lora_b8_ckpt12 60 $PY -m machinery.bench --preset=full --device=$BDEV --what=wan_lora --wan_lora_batch=8 --wan_ckpt_blocks=12 --warmup=1 --iters=2 $B_SMALL
run_step bench_sdpa_kernels 120 $PY -m machinery.bench --preset=full --device=$BDEV --what=st_train,wan_fwd --sdpa=flash,efficient,cudnn,math --st_batch=4 --warmup=1 --iters=2 $B_SMALL
for what in st_train wan_lora; do
    run_step bench_${what}_profile 60 $PY -m machinery.bench --preset=full --device=$BDEV --what=$what --wan_lora_batch=8 --wan_ckpt_blocks=12 --profile --warmup=1 --iters=1 $B_SMALL
    [ -f "$WORK/logs/bench_${what}_profile.log" ] && grep -A 22 -m1 'Self CPU %' "$WORK/logs/bench_${what}_profile.log" | cut -c1-180 | sed 's/^/    /' >> "$SUM"
done

say "===== done in $(( $(date +%s) - START )) s (budget ${BUDGET} s); full log $LOG"
cat "$SUM"
