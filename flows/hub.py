"""Publishing an export: the Hugging Face Hub, or a local folder with the Hub's layout.

An export directory already has the Hub's dataset layout: one ``<name>.parquet`` per dataset
and a ``README.md`` card whose YAML ``configs`` name them, so ``datasets.load_dataset(<repo or
folder>, "<name>")`` finds each one. Publishing copies exactly those files (never the
``save_to_disk`` folders): to a dataset repo through ``huggingface_hub``, or, for a target
written ``file://<dir>``, into that directory (how it is tested offline, and a way to stage an
upload for review). The token is read from an environment variable, never from the command line.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

HUB_FILES = ("README.md", "*.parquet")


def hub_files(folder: Path) -> list[Path]:
    files = sorted({p for pattern in HUB_FILES for p in folder.glob(pattern)})
    if not any(p.suffix == ".parquet" for p in files):
        raise ValueError(f"{folder} has no .parquet datasets to publish (export with parquet: true)")
    return files


def push_to_hub(folder: Path, repo: str, token_env: str = "HF_TOKEN", private: bool = False) -> str:
    """Publish the export in ``folder`` to ``repo``; returns where it went."""
    files = hub_files(folder)
    if repo.startswith("file://"):
        target = Path(repo.removeprefix("file://")).expanduser()
        target.mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copy2(path, target / path.name)
        return str(target)
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:  # a dependency of datasets: present unless the install is broken
        raise ImportError("publishing needs huggingface_hub: pip install huggingface_hub") from exc
    api = HfApi(token=os.environ.get(token_env))
    api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(folder), repo_id=repo, repo_type="dataset", allow_patterns=list(HUB_FILES),
        commit_message="stepforge export",
    )
    return f"https://huggingface.co/datasets/{repo}"
