"""The tokenized 1X data of the compression track on disk: checked whole, or downloaded from the
Hugging Face Hub (every rank its share), with the disk it will take counted first: tokenized_splits
(train_compression.py), tokenized_bytes (its disk check), download_tokenized (`python -m
machinery.prepare download`).
"""
import os

from tqdm import tqdm

from data import HF_REPO_TOKENIZED, SPLITS_1X, check_shards, expected_sizes, read_json, repo_files, shard_paths
from machinery import run_dir
from machinery.distributed import on_master, wait_for_all


def tokenized_split_problems(split_dir, shards=None):
    """What is missing or the wrong size in a tokenized split (the sizes follow from the metadata,
    so a partial download is recognised); [] when it is whole."""
    meta = os.path.join(split_dir, 'metadata.json')
    if not os.path.exists(meta):
        return [f"{meta} is missing"]
    try:
        num_shards = read_json(meta, counts=('num_shards',))['num_shards']
    except ValueError as e:   # damaged: named (a download fetches it again)
        return [str(e)]
    problems = []
    check_shards(shards, num_shards, meta)
    for i in range(num_shards) if shards is None else shards:
        try:
            paths = shard_paths(split_dir, i)
            n = read_json(paths['metadata'], counts=('shard_num_frames',))['shard_num_frames']
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e).split('. ')[0])
            continue
        for kind, size in expected_sizes(n).items():
            if os.path.getsize(paths[kind]) != size:
                problems.append(f"{paths[kind]} has {os.path.getsize(paths[kind])} bytes, not {size}")
    return problems


def _fetch(repo_file, out, force=False):
    """One file of the tokenized dataset into out/repo_file (hub_file)."""
    from machinery.hub import hub_file   # only a download reaches the Hub
    return hub_file(HF_REPO_TOKENIZED, repo_file, out, "    python -m machinery.prepare download --out DIR --split train_v2.0\n"
                    "    python -m machinery.prepare download --out DIR --split val_v2.0\n", force)


def download_tokenized(out, split='val_v2.0', shards=None, rank=0, world=1):
    """Fetch a split of 1x-technologies/worldmodel into out/split: its metadata, then the shards
    (shards=[0]: one train shard to try; None: all), shard i by rank i % world (out must be on
    storage every rank sees). A file of another size than its metadata implies is fetched again once."""
    meta = read_json(_fetch(f'{split}/metadata.json', out), counts=('num_shards', 'num_images'))
    check_shards(shards, meta['num_shards'], os.path.join(out, split, 'metadata.json'))
    check_room_for(out, split, meta, shards)
    mine = [i for i in (range(meta['num_shards']) if shards is None else shards) if i % world == rank]
    for i in tqdm(mine, desc=f'download {split}', unit='shard', disable=rank != 0):   # the overall progress
        files = repo_files(split, i)
        n = read_json(_fetch(files['metadata'], out), counts=('shard_num_frames',))['shard_num_frames']
        for kind, size in expected_sizes(n).items():
            path = os.path.join(out, files[kind])
            if os.path.exists(path) and os.path.getsize(path) == size:
                continue   # a resumed download: this file is whole
            if os.path.getsize(_fetch(files[kind], out)) != size:
                if os.path.getsize(_fetch(files[kind], out, force=True)) != size:
                    raise SystemExit(f"{path}: {os.path.getsize(path)} bytes after download, its metadata implies "
                                     f"{size}: the dataset on the Hub does not match its metadata")
    return os.path.join(out, split)


def tokenized_split_bytes(meta, shards=None):
    """Bytes of a tokenized split's files (all its shards, or `shards`) by its metadata.json: its
    num_images frames spread evenly over num_shards, in the three files of data.expected_sizes."""
    n_shards = meta['num_shards'] if shards is None else len(shards)
    return sum(expected_sizes(meta['num_images'] * n_shards // meta['num_shards']).values())


def tokenized_bytes(data_dir, splits, shards=None):
    """Bytes the tokenized splits will still download into data_dir (train_compression.py's disk
    check): each split's size by its metadata.json on disk, else by the 1X dataset's (SPLITS_1X;
    another split counts 0), less what its folder holds. shards: those of train_v2.0 (None: all)."""
    total = 0
    for s in splits:
        path = os.path.join(data_dir, s, 'metadata.json')
        try:
            meta = read_json(path, counts=('num_shards', 'num_images')) if os.path.exists(path) else SPLITS_1X.get(s)
        except ValueError:   # damaged: the download fetches it again
            meta = SPLITS_1X.get(s)
        if meta is not None:
            whole = tokenized_split_bytes(meta, shards if s == 'train_v2.0' else None)
            total += max(0, whole - _bytes_in([os.path.join(data_dir, s)]))
    return total


def check_room_for(out, split, meta, shards=None):
    """Stop before a download that would fill the disk: the split's shards (all, or `shards`) take
    the bytes its metadata.json implies (tokenized_split_bytes), less what out/split holds already.
    The huggingface_hub cache holds the files first: on the disk of out the files are hard links to
    it (counted once), on another disk they take room twice."""
    from huggingface_hub.constants import HF_HUB_CACHE
    total = tokenized_split_bytes(meta, shards)
    repo = os.path.join(HF_HUB_CACHE, f"datasets--{HF_REPO_TOKENIZED.replace('/', '--')}", 'snapshots')
    have, cached = _bytes_in([os.path.join(out, split)]), _bytes_in(
        [os.path.join(repo, rev, split) for rev in (os.listdir(repo) if os.path.isdir(repo) else [])])
    disk = lambda folder: os.stat(run_dir.existing_parent(folder)).st_dev
    if disk(HF_HUB_CACHE) == disk(out):
        needs = [(out, max(0, total - max(have, cached)), f'the {split} download')]
    else:
        needs = [(out, max(0, total - have), f'the {split} download'),
                 (HF_HUB_CACHE, max(0, total - cached), 'its huggingface_hub cache (HF_HUB_CACHE)')]
    _, refusal = run_dir.disk_report(needs)
    if refusal:
        raise SystemExit(refusal)


def _bytes_in(folders):
    """Bytes of the files under folders, each file once (the cache's snapshots link to its blobs)."""
    files = {os.path.realpath(os.path.join(d, f)) for folder in folders for d, _, names in os.walk(folder)
             for f in names}
    return sum(os.path.getsize(f) for f in files if os.path.exists(f))


def finish_download(out, split, shards=None):
    """After every rank's share: the whole split must be there (else data_dir is not shared)."""
    problems = tokenized_split_problems(os.path.join(out, split), shards)
    if problems:
        raise SystemExit(f"{os.path.join(out, split)} is incomplete after the download: {'; '.join(problems[:3])}. "
                         f"A multi-node run needs data_dir on storage that every node sees.")


def _is_synthetic(data_dir):
    """A folder synthetic_tokens.py wrote: its synthetic.json, or a split's metadata that says so."""
    def says_synthetic(split):
        try:
            return 'synthetic' in read_json(os.path.join(data_dir, split, 'metadata.json'))
        except (OSError, ValueError):
            return False
    return os.path.exists(os.path.join(data_dir, 'synthetic.json')) or any(map(says_synthetic, SPLITS_1X))


def tokenized_splits(data_dir, splits, shards=None, rank=0, world_size=1, download=False):
    """Make the tokenized splits a run reads whole in data_dir: with download, the missing or
    incomplete ones are fetched (every rank its share), then rank 0 checks each; without, or in a
    synthetic set, what is wrong stops the run. shards: those of train_v2.0 (None: all)."""
    shards_of = lambda split: shards if split == 'train_v2.0' else None
    try:
        problems = {s: tokenized_split_problems(os.path.join(data_dir, s), shards_of(s)) for s in splits}
    except ValueError as e:   # shards the split does not have
        raise SystemExit(f"--shards: {e}")
    missing = [s for s in splits if problems[s]]
    if not missing:
        return
    synthetic_set, s = _is_synthetic(data_dir), missing[0]   # a synthetic set is never mixed with 1X files
    if synthetic_set or not download:
        fix = (f"It is a synthetic set: delete {data_dir} and write it again (`python -m machinery.prepare synthetic "
               f"--out {data_dir}` with the --vocab and --seed it had)" if synthetic_set else
               f"A mistyped --data_dir? Pass the folder of the 1X tokenized data, --download to fetch what is "
               f"missing from the Hugging Face Hub (preset paper does), or prepare it where there is a network: "
               f"`python -m machinery.prepare download --out DIR --split {s}`")
        more = f" (and {len(problems[s]) - 3} more)" if len(problems[s]) > 3 else ''
        raise SystemExit(f"{os.path.join(data_dir, s)} is not whole: {'; '.join(problems[s][:3])}{more}. {fix}.")
    for s in missing:
        try:
            download_tokenized(data_dir, s, shards_of(s), rank, world_size)
        except ValueError as e:   # shards the Hub's split does not have, a damaged metadata file
            raise SystemExit(str(e))
    wait_for_all(f"downloading {', '.join(missing)}")
    for s in missing:
        on_master(finish_download, data_dir, s, shards_of(s))
    wait_for_all('the split metadata')
