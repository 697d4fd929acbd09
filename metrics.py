"""The two scores of the 1X World Model Challenge, as nanoWM reads the challenge's rules, and their
neighbours.

    compression track: Top-500 cross-entropy per token of the predicted grids (cross_entropy_topk)
    sampling track:    PSNR of the predicted frame 77 against the real one (psnr)
    beside PSNR:       SSIM (ssim), and the earlier blur + histogram matching baseline (blur_baseline);
                       LPIPS and FID, which need pretrained networks: machinery/image_scores.py

Images are uint8 [H, W, 3] numpy arrays. train_compression.py, train_sampling.py and sample.py
report these scores; machinery/synthetic_tokens.py computes the exact floor of its tokenized set
under the first.
The official scorer is not public: the README (Compression track) states our reading of it.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Compression track: Top-500 cross-entropy
# ---------------------------------------------------------------------------------------------

# A true token outside the k largest logits scores -log(P_FLOOR). We choose 1 / 64000: such a token
# costs what a uniform guess over the real Cosmos vocabulary costs (log 64000 = 11.07 nats).
TOP_K = 500
P_FLOOR = 1 / 64000


def cross_entropy_topk(logits_NV, target_N, k=TOP_K, p_floor=P_FLOOR):
    """Top-k cross-entropy per token (nanoWM's reading of the 1X challenge metric, which is only
    described as "considers only the top-500 logits per token"):
    keep the k largest logits, log-softmax over them, loss = -log p(true token); a true token
    outside the top k scores -log(p_floor). With k = V this is the plain cross-entropy.

    Ties at the k-th largest logit (uniform logits, a baseline's equal "other" tokens, bf16
    logits) leave open which of the tied tokens are kept; the log-softmax is the same for any
    choice, only whether the true token is kept changes. A true token tied there scores the
    expectation over a uniformly random choice: kept with probability (slots left) / (tokens
    tied). So the score never depends on how a topk kernel breaks ties (CPU and GPU agree)."""
    logits_NV = logits_NV.float()
    top_NK = logits_NV.topk(min(k, logits_NV.shape[-1]), dim=-1).values
    kth_N = top_NK[:, -1]
    true_N = logits_NV.gather(1, target_N[:, None])[:, 0]
    p_kept_N = (true_N > kth_N).float()
    tied = (true_N == kth_N).nonzero()[:, 0]   # rows whose true token is tied at the k-th: count the ties there
    if len(tied):
        above = (top_NK[tied] > kth_N[tied, None]).sum(-1)   # all larger logits are among the kept k
        ties = (logits_NV[tied] == kth_N[tied, None]).sum(-1, dtype=torch.int32)
        p_kept_N[tied] = (top_NK.shape[1] - above) / ties
    logp_true_N = true_N - torch.logsumexp(top_NK, dim=-1)   # log-softmax over the kept k, if kept
    floor = -math.log(p_floor)
    kept_score_N = torch.where(p_kept_N > 0, -logp_true_N, 0.0)   # no 0 x inf for a dropped -inf logit
    return p_kept_N * kept_score_N + (1 - p_kept_N) * floor


# ---------------------------------------------------------------------------------------------
# Sampling track: PSNR, and SSIM beside it
# ---------------------------------------------------------------------------------------------

def psnr(pred_HWC, target_HWC):
    """PSNR in dB of uint8 images with pixels in [0, 1] (the challenge metric; paper 2, problem statement)."""
    mse = np.mean((pred_HWC.astype(np.float64) / 255 - target_HWC.astype(np.float64) / 255) ** 2)
    return float(10 * np.log10(1.0 / max(mse, 1e-10)))


def _gaussian_kernel(sigma, radius=None):
    """A normalised 1-D Gaussian of 2 radius + 1 taps (radius: 3 sigma unless given)."""
    radius = radius if radius is not None else max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def _blur_NCHW(x, k, padding_mode):
    """Each channel filtered by the separable kernel k (rows, then columns); padding_mode None keeps
    only the valid positions, else the image is padded by the kernel's radius ('reflect')."""
    r = len(k) // 2
    C = x.shape[1]
    if padding_mode:
        x = F.pad(x, (r, r, r, r), mode=padding_mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1).to(x), groups=C)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1).to(x), groups=C)


def ssim(pred_HWC, target_HWC):
    """SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, pixels in
    [0, 1], valid windows only, mean over pixels and channels."""
    x, y = (torch.from_numpy(a.astype(np.float64) / 255).permute(2, 0, 1)[None] for a in (pred_HWC, target_HWC))
    k = _gaussian_kernel(1.5, radius=5)
    mu_x, mu_y = _blur_NCHW(x, k, None), _blur_NCHW(y, k, None)
    var_x = _blur_NCHW(x * x, k, None) - mu_x ** 2
    var_y = _blur_NCHW(y * y, k, None) - mu_y ** 2
    cov = _blur_NCHW(x * y, k, None) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


# ---------------------------------------------------------------------------------------------
# The earlier baseline: Gaussian blur + histogram matching (paper 2.3)
# ---------------------------------------------------------------------------------------------

def gaussian_blur(img_HWC, sigma):
    """img_HWC blurred by a Gaussian of sigma pixels, edges reflected."""
    x = torch.from_numpy(img_HWC.astype(np.float64)).permute(2, 0, 1)[None]
    out = _blur_NCHW(x, _gaussian_kernel(sigma), 'reflect')
    return out[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)


def match_histograms(img_HWC, ref_HWC):
    """Map each channel's values so its histogram matches the reference's (quantile mapping)."""
    out = np.empty_like(img_HWC)
    for c in range(img_HWC.shape[2]):
        values, inverse, counts = np.unique(img_HWC[..., c], return_inverse=True, return_counts=True)
        ref_values, ref_counts = np.unique(ref_HWC[..., c], return_counts=True)
        quantiles = np.cumsum(counts) / img_HWC[..., c].size
        ref_quantiles = np.cumsum(ref_counts) / ref_HWC[..., c].size
        out[..., c] = np.round(np.interp(quantiles, ref_quantiles, ref_values))[inverse].reshape(img_HWC.shape[:2])
    return out


def blur_baseline(pred_HWC, last_context_HWC, sigma):
    """The earlier post-processing (paper 2.3, after Team Duke [24]): Gaussian blur, then match the
    colour histogram to the last context frame."""
    return match_histograms(gaussian_blur(pred_HWC, sigma), last_context_HWC)
