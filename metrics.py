"""The two scores of the 1X World Model Challenge, as nanoWM reads the challenge's rules, and the
image scores sample.py reports beside them.

    compression track: Top-500 cross-entropy per token of the predicted grids (cross_entropy_topk)
    sampling track:    PSNR of the predicted frame 77 against the real one (psnr)
    beside PSNR:       SSIM (ssim), and the earlier blur + histogram matching baseline (blur_baseline);
                       LPIPS (lpips_distance) and FID (frechet_distance of inception_features), as
                       paper Table 2 reports them, through the field's reference packages (their
                       networks: lpips_network, fid_network; MetricUnavailable when they cannot load)

Images are uint8 [H, W, 3] numpy arrays. train_compression.py, train_sampling.py and sample.py
report these scores; synthetic.py computes the exact floor of its tokenized set under the first.
The official scorer is not public: the README (Compression track) states our reading of it.
"""
import math
import os
import warnings

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


# ---------------------------------------------------------------------------------------------
# Beside PSNR and SSIM, as paper Table 2 reports them: LPIPS and FID
# ---------------------------------------------------------------------------------------------
# Both score through networks trained elsewhere, taken from the field's reference packages and
# imported only when asked for: `lpips` (Zhang et al. 2018) with AlexNet, the variant video-prediction
# papers report, and torchmetrics' FID, whose Inception is the TensorFlow FID network (Heusel et al.
# 2017) as torch-fidelity ports it. We take torchmetrics because the world-model evaluations we
# compare with use it (NVIDIA Cosmos: nvidia-cosmos/cosmos-cookbook, scripts/metrics/qualitative/
# fvd_fid/compute_fid_single_view.py, with torchmetrics' defaults as here); pytorch-fid and
# torch-fidelity load the same Inception weights, clean-fid resizes differently. The networks'
# weights download on first use; without them there is no number, and MetricUnavailable says what
# to install or fetch.

class MetricUnavailable(RuntimeError):
    """A score's package or pretrained weights are not on this machine; the message says how to get them."""


def _weights_missing(metric, what, url, err):
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    return MetricUnavailable(f"{metric} needs {what}, which could not be loaded ({type(err).__name__}; offline?): "
                             f"download {url} into {folder}/")


def _images_NCHW(images):
    """uint8 [H, W, 3] or [N, H, W, 3] images (numpy or torch), or floats in [0, 1] -> [N, 3, H, W], dtype kept."""
    x = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else torch.as_tensor(images)
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images of shape {tuple(x.shape)}: expected [H, W, 3] or [N, H, W, 3]")
    return x.permute(0, 3, 1, 2)


def lpips_network(device='cpu'):
    """LPIPS v0.1 with the AlexNet trunk: torchvision's ImageNet AlexNet (downloaded on first use)
    and the linear layers calibrated on human judgments (shipped in the lpips package)."""
    try:
        import lpips
        from torchvision.models import AlexNet_Weights
    except ImportError as err:
        raise MetricUnavailable(f"LPIPS needs the lpips package and torchvision ({err}): pip install lpips torchvision"
                                ) from None
    try:
        with warnings.catch_warnings():   # lpips 0.1.4 asks torchvision for AlexNet the pre-0.13 way
            warnings.simplefilter('ignore', UserWarning)
            return lpips.LPIPS(net='alex', verbose=False).to(device).eval()
    except (OSError, RuntimeError) as err:   # no network (URLError is an OSError), or a damaged download
        url = AlexNet_Weights.IMAGENET1K_V1.url
        raise _weights_missing('LPIPS', "torchvision's AlexNet weights", url, err) from None


@torch.no_grad()
def lpips_distance(net, pred_HWC, target_HWC):
    """LPIPS between two images (uint8, or floats in [0, 1]): the package takes [-1, 1] NCHW."""
    device = next(net.parameters()).device
    x, y = (_images_NCHW(a).to(device) for a in (pred_HWC, target_HWC))
    x, y = ((a.float() / 255 if a.dtype == torch.uint8 else a.float()) * 2 - 1 for a in (x, y))
    return float(net(x, y).mean())


def fid_network(device='cpu'):
    """torchmetrics' FID Inception (2048 pooled features; downloaded on first use). It takes uint8
    NCHW images of any size and resizes them to 299 x 299 itself (bilinear, antialiased: torchmetrics'
    default)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3   # torchmetrics' Inception
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as err:
        raise MetricUnavailable(f"FID needs torchmetrics with torch-fidelity ({err}): pip install 'torchmetrics[image]'"
                                ) from None
    try:
        return FrechetInceptionDistance(feature=2048).inception.to(device)
    except (OSError, RuntimeError) as err:
        raise _weights_missing('FID', "torch-fidelity's Inception weights", URL_INCEPTION_V3, err) from None


@torch.no_grad()
def inception_features(net, images):
    """[N, D] float64 features of images (uint8, or floats in [0, 1] made uint8 as torchmetrics' FID
    does: x * 255 truncated)."""
    x = _images_NCHW(images)
    x = x if x.dtype == torch.uint8 else (x.float() * 255).byte()
    device = next(net.parameters()).device
    return net(x.to(device)).double().cpu().reshape(len(x), -1)


def frechet_distance(feats_a_ND, feats_b_ND):
    """FID: the Frechet distance between Gaussians fitted to two sets of features (Heusel et al. 2017),
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), in float64; tr (S_a S_b)^1/2 is computed as
    tr (S_a^1/2 S_b S_a^1/2)^1/2, the same number from a symmetric matrix (eigenvalues, no sqrtm).
    FID from N images is biased upward, the more so when N is below the 2048 features (Chong &
    Forsyth 2020, "Effectively unbiased FID"): compare FIDs only over the same number of clips. The
    paper reports it over the validation set (Table 2)."""
    a, b = (torch.as_tensor(f, dtype=torch.float64) for f in (feats_a_ND, feats_b_ND))
    if min(len(a), len(b)) < 2:
        raise ValueError(f"FID of {len(a)} and {len(b)} images: each set needs at least 2 (a covariance)")
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)   # unbiased (N - 1), as torchmetrics and pytorch-fid
    w, v = torch.linalg.eigh(cov_a)
    sqrt_a = (v * w.clamp(min=0).sqrt()) @ v.T
    m = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt)
