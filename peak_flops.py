"""A GPU's dense bf16 peak FLOP/s: the denominator of the MFU that the training scripts and
bench.py print (model FLOPs per second / this peak, as nanoGPT reports it)."""
import torch

# Dense bf16 peak FLOP/s (vendor datasheets, without sparsity), for MFU; the first name that
# occurs in torch.cuda.get_device_name() wins, so the PCIe H100 comes before the SXM one.
PEAK_BF16_FLOPS = (('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12),
                   ('B200', 2250e12), ('A100', 312e12))


def peak_flops(device):
    """The device's dense bf16 peak FLOP/s, or None (the CPU, an unlisted GPU: no MFU)."""
    if not str(device).startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
