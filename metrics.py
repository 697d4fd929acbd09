"""The two scores of the 1X World Model Challenge, computed as nanoWM reads the challenge's rules.

    compression track: Top-500 cross-entropy per token of the predicted grids (cross_entropy_topk)
    sampling track:    PSNR of the predicted frame 77 against the real one (psnr)

train_compression.py and train_sampling.py / sample.py report them; data.py computes the exact
floor of its synthetic tokenized set under the first. README (Fidelity) says where the rules are
silent and what we chose.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

# Top-500 CE (the 1X challenge metric, cross_entropy_topk): a true token outside the k largest
# logits scores -log(P_FLOOR). The official scorer is not public; we choose 1 / 64000, i.e. such a token
# costs what a uniform guess over the real Cosmos vocabulary costs (log 64000 = 11.07 nats).
TOP_K = 500
P_FLOOR = 1 / 64000


def cross_entropy_topk(logits_NV, target_N, k=TOP_K, p_floor=P_FLOOR):
    """Top-k cross-entropy per token (nanoWM's reading of the 1X challenge metric, which is only
    described as "considers only the top-500 logits per token"):
    keep the k largest logits, log-softmax over them, loss = -log p(true token); a true token
    outside the top k scores -log(p_floor). With k = V this is the plain cross-entropy."""
    logits_NV = logits_NV.float()
    top_NK, idx_NK = logits_NV.topk(min(k, logits_NV.shape[-1]), dim=-1)
    logp_NK = F.log_softmax(top_NK, dim=-1)
    hit_NK = idx_NK == target_N[:, None]
    in_top_N = hit_NK.any(-1)
    logp_true_N = (logp_NK * hit_NK).sum(-1)
    return torch.where(in_top_N, -logp_true_N, torch.full_like(logp_true_N, -math.log(p_floor)))


def psnr(pred_HWC, target_HWC):
    """PSNR in dB of uint8 images with pixels in [0, 1] (the challenge metric; paper 2, problem statement)."""
    mse = np.mean((pred_HWC.astype(np.float64) / 255 - target_HWC.astype(np.float64) / 255) ** 2)
    return float(10 * np.log10(1.0 / max(mse, 1e-10)))
