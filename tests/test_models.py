"""Model specs: local folders load, bad specs give one clear line saying what was tried."""

import pytest

from pipeline.lm.models import ModelLoadError, load_model, resolve_spec


def test_local_folder_loads_with_its_shape(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    assert loaded.info.source == "local"
    assert (loaded.info.n_layers, loaded.info.d_model, loaded.info.default_layer) == (4, 32, 2)
    assert loaded.info.revision.startswith("local:")
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_missing_path_says_so(tmp_path):
    with pytest.raises(ModelLoadError, match="no such local path"):
        load_model(str(tmp_path / "nowhere"))


def test_missing_gguf_says_so(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file .* does not exist"):
        load_model(str(tmp_path / "model.gguf"))


def test_hub_id_offline_names_what_was_tried():
    with pytest.raises(ModelLoadError) as info:
        load_model("nobody-owns-this/tiny-model-that-does-not-exist")
    message = str(info.value)
    assert "tried Hugging Face hub id" in message and "\n" not in message


def test_plain_file_is_not_a_model(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_spec(str(path))
