"""Downloads from the Hugging Face Hub, through huggingface_hub: a file of a dataset repo (the 1X
data) and a model repo or folder (Wan 2.2's weights). Offline, each stops with what to do instead.
"""
import errno
import os
import shutil
from pathlib import Path


def hub_file(repo, repo_file, out, how_to_prepare, force=False):
    """One file of a Hugging Face dataset repo into out/repo_file, through the huggingface_hub cache
    (HF_HUB_CACHE: resumable, atomic per file), then hard-linked (or copied) into place atomically.
    Offline, stop with how_to_prepare: the commands that prepare the data on another machine."""
    from huggingface_hub import hf_hub_download
    try:
        cached = hf_hub_download(repo, repo_file, repo_type='dataset', force_download=force)
    except Exception as e:   # offline, no network, no such file, ... (huggingface_hub's errors vary by version)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if getattr(e, 'errno', None) == errno.ENOSPC or 'No space left on device' in str(e):
            raise SystemExit(f"the disk filled up while fetching {repo_file} of {repo} ({first}). Free space on the "
                             f"disks of {out} and of the huggingface_hub cache (HF_HUB_CACHE), then run the same "
                             f"command again: whole files are kept, the rest is fetched.")
        raise SystemExit(f"could not fetch {repo_file} of the Hugging Face dataset {repo} ({first}).\n"
                         f"Without network access here, prepare the data where there is one and copy the folder:\n"
                         f"{how_to_prepare}"
                         f"then pass --data_dir=DIR (or point HF_HUB_CACHE at a cache that holds the dataset).")
    dst = os.path.join(out, repo_file)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        os.link(os.path.realpath(cached), tmp)
    except OSError:   # another file system: copy
        shutil.copyfile(cached, tmp)
    os.replace(tmp, dst)
    return dst


def resolve(repo_id_or_dir, allow_patterns, models_dir=None):
    """A local directory as it is, else a Hub repo id downloaded (only allow_patterns files).

    models_dir (default: the NANOWM_MODELS_DIR environment variable): download into
    models_dir/<name> (Wan-AI/Wan2.2-TI2V-5B -> models_dir/Wan2.2-TI2V-5B, as Wan's README
    downloads it with --local-dir) with huggingface_hub's local-dir download: one copy of the
    weights, plain files, resumed where it stopped; that folder can later be passed as it is.
    Without it the files go to the Hub cache (HF_HUB_CACHE). huggingface_hub draws the progress
    bar: one for the files, one for the bytes of them all. A path that is no folder, or a download
    that fails (offline), stops with what to do, as the data downloads do."""
    p = Path(os.path.expanduser(str(repo_id_or_dir)))
    if p.is_dir():
        return p
    if p.exists() or str(repo_id_or_dir).startswith(('/', '.', '~')) or str(repo_id_or_dir).count('/') != 1:
        raise SystemExit(f"{repo_id_or_dir}: not a folder, and not a Hub repo id like 'Wan-AI/Wan2.2-TI2V-5B'")
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    models_dir = models_dir or os.environ.get('NANOWM_MODELS_DIR') or None
    local_dir = Path(models_dir).expanduser() / str(repo_id_or_dir).split('/')[1] if models_dir else None
    if are_progress_bars_disabled() and not os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'):
        enable_progress_bars()   # a library turned them off; the user did not
    print(f"fetching {repo_id_or_dir} ({', '.join(allow_patterns)}) into "
          f"{local_dir or 'the Hugging Face cache'}", flush=True)
    try:
        return Path(huggingface_hub.snapshot_download(str(repo_id_or_dir), allow_patterns=allow_patterns,
                                                      local_dir=local_dir))
    except Exception as err:   # offline, no such repo, ... (huggingface_hub's errors vary by version)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SystemExit(f"could not fetch {repo_id_or_dir} from the Hugging Face Hub ({first}). Without network "
                         f"access here, fetch it where there is one (`huggingface-cli download {repo_id_or_dir} "
                         f"--local-dir DIR`) and pass DIR in its place (train_sampling.py --pretrained, --text_encoder, "
                         f"--vae_path; python -m machinery.prepare encode_raw --vae_path)")
