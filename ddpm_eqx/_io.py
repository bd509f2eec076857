"""Small file helpers shared by the CLI, the trainer and the evaluator."""

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so that a reader (or a run killed mid-write) sees the old file or the
    new one, never a truncated mix: write a temporary file beside it, flush it to disk, rename it over."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of ``err``'s message, cut at ``limit`` characters: its reason in a one-line error."""
    return (str(err).strip().splitlines() or [""])[0][:limit]


INIT_FROM_FILE = "init_from.json"
"""In a fine-tuning run's workdir: the ``--init-from`` it started from and the checkpoint step it read."""

WANDB_ID_FILE = "wandb_id.txt"
"""In a run's workdir: the id of its W&B run, which a resume logs into."""

WANDB_MODEL_FILE = "wandb_model.txt"
"""In a run's workdir: ``<W&B run id> <step>`` once that step's model artifact was logged and the run finished
(a rerun of a run killed before then logs it)."""
