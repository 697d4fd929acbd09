"""What runs the two recipes but is not the recipe, one job a module:
run_dir (a run's folder: lock, divergence guard, log, disk check), checkpoints (atomic saves, loads that
run no code), trackers (TensorBoard, W&B, curves.png), distributed (the processes torchrun starts), speed
(samples/s, MFU), hub (Hugging Face downloads), tokenized and latents (each track's data on disk), vae
(the codecs), wan_files (Wan checkpoints, the umT5 empty prompt), lora_files (LoRA files in and out),
image_scores (LPIPS, FID), synthetic_tokens and synthetic_video (the two synthetic worlds), own_clips
(your clips in the 1X layout), pictures (frame figures), prepare (`python -m machinery.prepare`: the data
commands), bench (`python -m machinery.bench`). Optional packages are imported where used, through need().
"""
import importlib


def need(package, what):
    """The optional package `what` needs, imported; or a stop naming the pip line that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise SystemExit(f"{what} needs the {package} package ({err}): pip install -r requirements-sampling.txt"
                         ) from None
