"""A GPU's dense bf16 peak FLOP/s, the MFU's denominator (model FLOPs / s / peak, as nanoGPT's), and
StepSpeed, the speed both training scripts log every step (samples/s, MFU, peak GPU memory)."""
import time

import torch

# Dense bf16 peak FLOP/s (vendor datasheets, without sparsity), for MFU; the first name that
# occurs in torch.cuda.get_device_name() wins, so the PCIe H100 comes before the SXM one.
PEAK_BF16_FLOPS = (('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('B200', 2250e12), ('A100', 312e12))


def peak_flops(device):
    """The device's dense bf16 peak FLOP/s, or None (the CPU, an unlisted GPU: no MFU)."""
    if not str(device).startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


class StepSpeed:
    """The speed of a training step: start() before it, stop() after it returns samples_per_s; mfu,
    model FLOPs per step over its time and the device's peak as nanoGPT's running average (0.9 old
    + 0.1 new), once the first `warmup` steps (allocation, compilation) are past; and max_mem_gib,
    the peak GPU memory so far. A figure the device does not have is None (on the CPU)."""

    def __init__(self, device, samples_per_step, flops_per_step, warmup=5):
        self.samples_per_step, self.flops_per_step, self.warmup = samples_per_step, flops_per_step, warmup
        self.peak, self.cuda = peak_flops(device), str(device).startswith('cuda')
        self.steps, self.mfu, self.t = 0, None, None

    def start(self):
        self.t = time.time()

    def stop(self):
        dt = time.time() - self.t
        self.steps += 1
        if self.peak and self.steps > self.warmup:
            mfu = self.flops_per_step / dt / self.peak
            self.mfu = mfu if self.mfu is None else 0.9 * self.mfu + 0.1 * mfu
        return dict(samples_per_s=self.samples_per_step / dt, mfu=self.mfu,
                    max_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else None)
