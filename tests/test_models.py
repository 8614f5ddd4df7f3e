"""Where weights come from: packaged GGUFs, checksum verification, local paths."""

from __future__ import annotations

import pytest

from stepforge.stages.llm import models


def test_smollm2_resolves_from_its_package_with_a_content_id():
    resolved = models.resolve_model("smollm2-135m")
    assert resolved.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and resolved.path.is_file()
    assert resolved.model_id == f"smollm2-135m-instruct-q4_1@{resolved.sha256[:16]}"


def test_a_local_gguf_path_works_and_its_id_follows_its_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPFORGE_MODEL_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "tiny.gguf"
    weights.write_bytes(b"GGUF" + b"\0" * 64)
    first = models.resolve_model(str(weights))
    assert first.path == weights and first.name == "tiny"
    weights.write_bytes(b"GGUF" + b"\1" * 64)
    assert models.resolve_model(str(weights)).model_id != first.model_id


def test_unknown_model_names_say_what_is_accepted():
    with pytest.raises(models.ModelUnavailable, match="neither a known name"):
        models.resolve_model("no-such-model")


def test_a_tampered_demo_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPFORGE_MODEL_CACHE", str(tmp_path))
    (tmp_path / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf").write_bytes(b"not the published weights")
    with pytest.raises(models.ModelUnavailable, match="refusing to load"):
        models.resolve_model("qwen2.5-coder-1.5b")


def test_joining_chunks_checks_the_digest_before_keeping_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPFORGE_MODEL_CACHE", str(tmp_path / "cache"))
    chunks = []
    for i in range(3):
        chunk = tmp_path / f"part{i}.bin"
        chunk.write_bytes(bytes([i]) * 10)
        chunks.append(chunk)
    monkeypatch.setattr(models, "_qwen_chunk_paths", lambda: chunks)
    with pytest.raises(models.ModelUnavailable, match="refusing to load"):
        models.qwen_coder_path()
    assert not list((tmp_path / "cache").glob("*.gguf*")), "a file with the wrong digest is not kept"
