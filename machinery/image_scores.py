"""LPIPS and FID, the image scores paper Table 2 reports beside PSNR and SSIM (metrics.py), for
sample.py --lpips_fid: each prediction's LPIPS against the real frame 77, and the FID of the
predicted frames 77 against the real ones over the clips (LpipsFid). Through the field's reference
packages, imported only when asked for: `lpips` (Zhang et al. 2018) with AlexNet, as video-prediction
papers report it, and torchmetrics' FID (as NVIDIA Cosmos evaluates world models), whose Inception is
the TensorFlow FID network (Heusel et al. 2017) as torch-fidelity ports it, fed frames resized to 299 x
299 as the original does (antialias=False; torchmetrics' default since 1.8 antialiases). The weights
download on first use; without them there is no number, and MetricUnavailable says what to fetch.
"""
import inspect
import os
import pickle
import socket
import warnings

import numpy as np
import torch


class MetricUnavailable(RuntimeError):
    """A score's package or pretrained weights are not on this machine; the message says how to get them."""


DOWNLOAD_TIMEOUT_S = 15   # a weights download that gets no answer this long fails (urllib's default: never)


def pretrained(metric, url, build):
    """build(): a package's network, which loads its weights from torch's hub cache. The file is downloaded
    first if missing (a silent network fails in seconds), then read here as tensors only and checked finite,
    since the packages unpickle it fully (weights_only=False): a crafted file fails here, before it runs code."""
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(url))
    again = f"delete it, and it downloads again from {url}"
    default_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location='cpu', weights_only=True)
    except OSError as err:   # no network (URLError), a timeout, a full disk
        raise MetricUnavailable(f"{metric} needs {path}, which could not be downloaded or read ({err}; offline?): "
                                f"download {url} there") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:   # objects, not tensors; truncated
        raise MetricUnavailable(f"{metric}: {path} is damaged or not a weights file ({type(err).__name__}): {again}"
                                ) from None
    finally:
        socket.setdefaulttimeout(default_timeout)
    tensors = state.values() if isinstance(state, dict) else [state]
    if not all(isinstance(t, torch.Tensor) and t.isfinite().all() for t in tensors):
        raise MetricUnavailable(f"{metric}: {path} holds NaN, infinite or non-tensor weights: {again}")
    try:
        return build()
    except RuntimeError:   # the package's load_state_dict: other tensors than its network's
        raise MetricUnavailable(f"{metric}: {path} does not hold the network's tensors: {again}") from None


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
    with warnings.catch_warnings():   # lpips 0.1.4 asks torchvision for AlexNet the pre-0.13 way
        warnings.simplefilter('ignore', UserWarning)
        net = pretrained('LPIPS', AlexNet_Weights.IMAGENET1K_V1.url, lambda: lpips.LPIPS(net='alex', verbose=False))
    return net.to(device).eval()


@torch.no_grad()
def lpips_distance(net, pred_HWC, target_HWC):
    """LPIPS between two images (uint8, or floats in [0, 1]): the package takes [-1, 1] NCHW."""
    device = next(net.parameters()).device
    x, y = (_images_NCHW(a).to(device) for a in (pred_HWC, target_HWC))
    x, y = ((a.float() / 255 if a.dtype == torch.uint8 else a.float()) * 2 - 1 for a in (x, y))
    return float(net(x, y).mean())


def fid_network(device='cpu'):
    """torchmetrics' FID Inception (2048 pooled features; downloaded on first use). It takes uint8
    NCHW images of any size and resizes them to 299 x 299 itself: bilinear without antialiasing, as
    the TensorFlow original, torch-fidelity and pytorch-fid (torchmetrics' default antialiases)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3   # torchmetrics' Inception
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as err:
        raise MetricUnavailable(f"FID needs torchmetrics with torch-fidelity ({err}): pip install 'torchmetrics[image]'"
                                ) from None
    # torchmetrics 1.8 made the antialiased resize its default; before 1.8 it resized as torch-fidelity does
    standard = {'antialias': False} if 'antialias' in inspect.signature(FrechetInceptionDistance).parameters else {}
    return pretrained('FID', URL_INCEPTION_V3, lambda: FrechetInceptionDistance(feature=2048, **standard).inception
                      ).to(device)


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


class LpipsFid:
    """sample.py's LPIPS per prediction and FID over the clips, with the networks that load on this
    machine; `unavailable` says why the others are not computed."""

    def __init__(self, device='cpu'):
        self.networks, self.unavailable, self.features = {}, [], {}   # features: name -> one [1, D] per clip
        for name, load in (('lpips', lpips_network), ('fid', fid_network)):
            try:
                self.networks[name] = load(device)
            except MetricUnavailable as err:
                self.unavailable.append(str(err))

    def clip(self, preds, truth_HWC):
        """{name: LPIPS of the prediction against the truth} of a clip's predictions (if LPIPS loaded);
        their Inception features and the truth's kept for fid()."""
        if 'fid' in self.networks:
            for name, img in [*preds.items(), ('truth', truth_HWC)]:
                self.features.setdefault(name, []).append(inception_features(self.networks['fid'], img))
        net = self.networks.get('lpips')
        return {name: round(lpips_distance(net, img, truth_HWC), 4) for name, img in preds.items()} if net else {}

    def fid(self):
        """{name: FID of its predicted frames 77 against the real ones} over the clips (paper Table 2)."""
        if not self.features:
            return {}
        if len(self.features['truth']) < 2:
            self.unavailable.append("FID needs at least 2 clips (a covariance of their features)")
            return {}
        truth_ND = torch.cat(self.features['truth'])
        return {name: frechet_distance(torch.cat(f), truth_ND) for name, f in self.features.items() if name != 'truth'}
