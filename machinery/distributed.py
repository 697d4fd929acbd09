"""The processes of a training run, as torchrun starts them (both training scripts use these):
the device and DDP (resolve_device, setup_distributed, grad_accum_steps), rank 0's work that may
stop every rank (on_master), barriers that outlast hours of data preparation (wait_for_all), the
loss averaged over the ranks (mean_over_ranks), and the end of a run (finish).

Over several nodes the same torchrun command runs on every node (--nnodes N, the c10d rendezvous
on the first node). torchrun starts the script only when every node's torchrun has joined, and
until then it waits without a word (up to --rdzv_conf=join_timeout, 600 s by default): rank 0's
first line, "DDP (...): P processes on N nodes, every node has joined", says the wait is over.
"""
import datetime
import os

import torch
import torch.distributed as dist


def resolve_device(device, mps=False):
    """'auto': the CUDA GPU if torch sees one, else Apple's 'mps' if allowed and present, else 'cpu';
    any other name as given."""
    if device != 'auto':
        return device
    return 'cuda' if torch.cuda.is_available() else 'mps' if mps and torch.backends.mps.is_available() else 'cpu'


def setup_distributed(device):
    """DDP when launched by torchrun (RANK set), as nanoGPT: NCCL on GPUs, gloo on the CPU, and
    each process on the GPU of its LOCAL_RANK. Returns (ddp, rank, world_size, device)."""
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit(f"--device={device}: this torch ({torch.__version__}) sees no CUDA GPU; pass --device=cpu, or "
                         f"install a CUDA build of torch on a machine with a GPU")
    if int(os.environ.get('RANK', -1)) == -1:
        if device.startswith('cuda:'):   # --device=cuda:N: memory statistics and syncs go to that GPU
            torch.cuda.set_device(device)
        return False, 0, 1, device
    backend = 'nccl' if device.startswith('cuda') else 'gloo'
    # rank 0 evaluates and saves alone while the others wait in the next step's all-reduce; NCCL's
    # default 10 minutes would abort a run whose first evaluation compiles or whose checkpoint is large
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=1))
    if device.startswith('cuda'):
        device = f'cuda:{int(os.environ["LOCAL_RANK"])}'
        torch.cuda.set_device(device)
    if dist.get_rank() == 0:   # torchrun starts the script only once every node's torchrun has joined
        world, nodes = dist.get_world_size(), int(os.environ.get('GROUP_WORLD_SIZE', 1))
        print(f"DDP ({backend}): {world} process{'es' if world > 1 else ''} on {nodes} node{'s' if nodes > 1 else ''}, "
              f"every node has joined", flush=True)
    return True, dist.get_rank(), dist.get_world_size(), device


def grad_accum_steps(global_batch_size, batch_size, world_size):
    """Micro-steps per optimizer step, as nanoGPT splits its batch: global_batch_size = batch_size
    (per process and micro-step) x world_size x this. Stops with a message if that is no whole number."""
    if global_batch_size % (batch_size * world_size):
        raise SystemExit(f"--global_batch_size={global_batch_size} must be a multiple of --batch_size={batch_size} x "
                         f"{world_size} process(es)")
    return global_batch_size // (batch_size * world_size)


def on_master(fn, *args):
    """Run fn on rank 0 only. If it stops the run (SystemExit), every rank stops, rank 0 with fn's
    message: no rank is left waiting for the others at a later collective."""
    ddp = dist.is_available() and dist.is_initialized()
    master = not ddp or dist.get_rank() == 0
    box = [None]   # rank 0's stop message, sent to every rank
    if master:
        try:
            fn(*args)
        except SystemExit as e:
            box = [str(e)]
    if ddp:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise SystemExit(box[0] if master else 1)


def wait_for_all(what, hours=48):
    """A barrier that outlasts a long download or encoding (hours; NCCL's timeout is minutes): a gloo
    group with a long timeout, waiting on the CPU."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_rank() == 0:
            print(f"waiting for every rank to finish {what}")
        dist.barrier(group=dist.new_group(backend='gloo', timeout=datetime.timedelta(hours=hours)))


def mean_over_ranks(t):
    """t averaged over every rank, in place (t itself in one process). Every rank then holds the
    same loss, so a NaN on one rank stops them all together."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def finish():
    """The end of a DDP run: every rank waits for the others (rank 0 may still be writing), then the
    process groups go. A rank that tears gloo down while a peer still holds its connections can die
    in C++ (SIGABRT) after its work is done, with an exit code that fails the launch."""
    if dist.is_available() and dist.is_initialized():
        wait_for_all('the run')
        dist.destroy_process_group()
