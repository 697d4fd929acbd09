"""Where a run's log goes besides log.jsonl, each package imported only when asked for:
TensorBoard (--log_with=tensorboard: out_dir/tensorboard), Weights & Biases (--log_with=wandb: files
in out_dir/wandb, the run id in out_dir/wandb_id, so a resume continues the same W&B run), and
curves.png (matplotlib), drawn from log.jsonl at the end of a run. run_dir.RunLog calls them.
"""
import os
import uuid

import numpy as np


class TensorBoard:
    def __init__(self, out_dir, start_step):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: events of steps after the resumed one (written before a crash) are dropped
        self.writer = SummaryWriter(os.path.join(out_dir, 'tensorboard'), purge_step=start_step + 1 if start_step else None)

    def write(self, step, figures, images):
        for k, v in figures.items():
            self.writer.add_scalar(k, v, step)
        for name, path in images.items():
            from PIL import Image
            self.writer.add_image(name, np.asarray(Image.open(path).convert('RGB')), step, dataformats='HWC')

    def close(self):
        self.writer.close()


class WandB:
    def __init__(self, out_dir, start_step, config, project, run_name):
        import wandb
        id_path = os.path.join(out_dir, 'wandb_id')
        if start_step > 0 and os.path.exists(id_path):   # the run resumed: its W&B run continues
            run_id = open(id_path).read().strip()
        else:
            run_id = uuid.uuid4().hex[:8]
            with open(id_path, 'w') as f:
                f.write(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_name or None, config=config, dir=out_dir, id=run_id,
                              resume='allow')

    def write(self, step, figures, images):
        self.run.log({**figures, **{name: self.wandb.Image(path) for name, path in images.items()}}, step=step)

    def close(self):
        self.run.finish()


def plot_curves(out_dir, panels, title=''):
    """curves.png in out_dir: one panel per (y label, [log keys]), step on the x axis. Prints where
    it is; without matplotlib says so and returns None (a finished run loses only the picture)."""
    try:
        import matplotlib
    except ImportError as e:
        print(f"no curves.png ({e}: pip install matplotlib); the figures are in {out_dir}/log.jsonl")
        return None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from machinery.run_dir import read_log
    records = read_log(out_dir)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (ylabel, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(r['step'], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker='o' if len(points) < 30 else None, markersize=3, label=key)
        ax.set_xlabel('step')
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(out_dir, 'curves.png')
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"curves: {path}")
    return path
