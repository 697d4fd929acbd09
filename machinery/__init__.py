"""What runs the two recipes but is not the recipe: one job a module.

    run_dir         a run's folder: lock, atomic checkpoints, the divergence guard, log.jsonl, disk check
    distributed     the processes torchrun starts (DDP setup, rank-0 work, barriers)
    speed           a step's samples/s and MFU (a GPU's peak FLOP/s)
    hub             downloads from the Hugging Face Hub
    tokenized       the compression track's data on disk (checked, downloaded)
    latents         the sampling track's data on disk (raw videos downloaded, encoded to latents)
    vae             the latent codecs: the Wan 2.2 VAE, the CPU demo's pixel codec
    wan_files       the Wan ecosystem's files: checkpoints, the umT5 empty prompt, LoRA exports
    synthetic_tokens, synthetic_video   the two synthetic worlds, in the exact 1X layout
    own_clips       a folder of your own clips -> the raw 1X layout
    pictures        figures of frames: labelled grids (PNG), side-by-side clips (GIF)
    prepare         `python -m machinery.prepare ...`: the data commands
    bench           `python -m machinery.bench`: timings, samples/s and MFU of both tracks
    checkpoints     a run's checkpoints: atomic saves, loads that run no code, resume
    trackers        TensorBoard, W&B and curves.png, each imported only when asked for

Optional packages (requirements-sampling.txt) are imported where they are used, through need().
"""
import importlib


def need(package, what):
    """The optional package (requirements-sampling.txt) `what` needs, imported; or a stop that says
    which pip line installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise SystemExit(f"{what} needs the {package} package ({err}): pip install -r requirements-sampling.txt"
                         ) from None
