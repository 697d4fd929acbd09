#!/usr/bin/env bash
# The paper's sampling run on SLURM (paper 2.2: 4 nodes x 8 GPUs): one task per node, each a torchrun
# whose c10d rendezvous is on the job's first node. Submit from the repository root; flags after the
# script go to train_sampling.py:
#     sbatch machinery/slurm_sampling.sh                              # preset paper on 4 x 8 GPUs
#     sbatch --nodes=2 machinery/slurm_sampling.sh --max_iters=100    # another size, another length
# Environment: DATA_DIR, OUT_DIR (data/1x, out_sampling_paper: on storage every node sees, checked
# before any GPU starts), GPUS_PER_NODE (8), MASTER_PORT (29500), JOIN_TIMEOUT (seconds the first node
# waits for the others, 900).
#SBATCH --job-name=nanowm-sampling
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
: "${SLURM_JOB_ID:?is not set: submit with sbatch machinery/slurm_sampling.sh (or run it inside salloc)}"
NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
GPUS=${GPUS_PER_NODE:-8}
DATA_DIR=${DATA_DIR:-data/1x}
OUT_DIR=${OUT_DIR:-out_sampling_paper}
PORT=${MASTER_PORT:-29500}
JOIN_TIMEOUT=${JOIN_TIMEOUT:-900}
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)   # sed reads all: no SIGPIPE under pipefail

# Every rank reads data_dir and rank 0 writes out_dir: a file made here must be seen on every node
probe=".shared_check_$SLURM_JOB_ID"
mkdir -p "$DATA_DIR" "$OUT_DIR"
touch "$DATA_DIR/$probe" "$OUT_DIR/$probe"
if ! srun --nodes="$NODES" --ntasks-per-node=1 test -f "$DATA_DIR/$probe" -a -f "$OUT_DIR/$probe"; then
    rm -f "$DATA_DIR/$probe" "$OUT_DIR/$probe"
    echo "DATA_DIR=$DATA_DIR or OUT_DIR=$OUT_DIR is not on storage every node sees: set both to folders" \
         "of a shared file system" >&2
    exit 1
fi
rm -f "$DATA_DIR/$probe" "$OUT_DIR/$probe"

echo "$NODES nodes x $GPUS GPUs; rendezvous at $MASTER:$PORT, waiting up to $JOIN_TIMEOUT s for every node"
if ! srun --nodes="$NODES" --ntasks-per-node=1 torchrun --nnodes="$NODES" --nproc_per_node="$GPUS" \
        --rdzv_backend=c10d --rdzv_endpoint="$MASTER:$PORT" --rdzv_id="$SLURM_JOB_ID" \
        --rdzv_conf=join_timeout="$JOIN_TIMEOUT" \
        train_sampling.py --data_dir="$DATA_DIR" --out_dir="$OUT_DIR" "$@"; then
    echo "the run failed (above). If torchrun's rendezvous timed out, a node did not join within" \
         "JOIN_TIMEOUT=$JOIN_TIMEOUT s: raise it, or check that port $PORT of $MASTER is reachable from every node." \
         "A run that had started resumes with: sbatch machinery/slurm_sampling.sh --init_from=resume" >&2
    exit 1
fi
