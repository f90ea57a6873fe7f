"""Loading a checkpoint tensor by tensor (``pg_tune.models.shards``): the same model as
``from_pretrained``'s memory-mapped load, with nothing of the checkpoint left mapped."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pg_tune.config.recipe import ModelConfig, QuantizationConfig
from pg_tune.models.shards import LazyTensor, ShardReader, checkpoint_files, lazy_state_dict
from tests.families import family_of


def _mapped(folder) -> list[str]:
    """Lines of /proc/self/maps naming a file of ``folder``."""
    with open("/proc/self/maps") as f:
        return [line for line in f if str(folder) in line]


def test_shard_reader_reads_every_dtype_exactly(tmp_path):
    tensors = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, 2),
        "empty": torch.empty(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    assert checkpoint_files(tmp_path) == ["model.safetensors"]
    reader = ShardReader(tmp_path / "model.safetensors")
    for key, tensor in tensors.items():
        read = reader.read(key)
        assert read.dtype == tensor.dtype and torch.equal(read, tensor)
    lazy = LazyTensor(reader, "a")
    assert lazy.get_shape() == [3, 5] and lazy.dtype == torch.bfloat16 and lazy.get_dtype() == "BF16"
    assert torch.equal(lazy[...], tensors["a"]) and torch.equal(lazy[1:], tensors["a"][1:])
    assert not _mapped(tmp_path)  # plain reads: the file is never mapped
    reader.close()


def test_a_folder_without_safetensors_is_named(tmp_path):
    with pytest.raises(ValueError, match="no model.safetensors"):
        lazy_state_dict(tmp_path)


# The tiny checkpoint is stored fp32: bf16 is a cast as each tensor is read.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loads_the_same_weights_as_from_pretrained_and_maps_nothing(tiny_checkpoint, dtype):
    family = family_of(str(tiny_checkpoint))
    model = family.load_model(ModelConfig(name_or_path=str(tiny_checkpoint), dtype=dtype))
    assert not _mapped(tiny_checkpoint)
    reference = family.model_class.from_pretrained(tiny_checkpoint, dtype=getattr(torch, dtype))
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as from_pretrained ties
    assert model.generation_config.eos_token_id == reference.generation_config.eos_token_id
    assert model.config._name_or_path == str(tiny_checkpoint)


def test_quantized_load_matches_from_pretrained_and_maps_nothing(tiny_checkpoint):
    pytest.importorskip("bitsandbytes")
    from pg_tune.models.quantize import bnb_config

    family = family_of(str(tiny_checkpoint))
    config = ModelConfig(name_or_path=str(tiny_checkpoint), dtype="float32")
    quant = QuantizationConfig(mode="4bit", bnb_4bit_compute_dtype="float32")
    model = family.load_model(config, quant)
    assert not _mapped(tiny_checkpoint)
    reference = family.model_class.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, quantization_config=bnb_config(quant, family)
    )
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key].data, theirs[key].data), key  # packed NF4 bytes included
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        same = model.model.language_model(input_ids=ids).last_hidden_state
        expected = reference.model.language_model(input_ids=ids).last_hidden_state
    assert torch.equal(same, expected)
    assert model.is_loaded_in_4bit and getattr(model, "hf_quantizer", None) is not None
