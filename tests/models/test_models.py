"""Loading: tiny presets in-process, and checkpoints saved in the hub's layout."""

import torch
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from pg_tune.config.recipe import ModelConfig
from pg_tune.models.family import resolve_dtype
from pg_tune.models.paligemma import PaliGemmaFamily


def test_both_generations_build(tiny_preset):
    model = PaliGemmaFamily().load_model(ModelConfig(name_or_path=tiny_preset))
    text_type = model.config.text_config.model_type
    assert text_type == {"tiny-paligemma": "gemma", "tiny-paligemma2": "gemma2"}[tiny_preset]
    assert model.config.text_config.vocab_size == 257216
    assert model.dtype == torch.float32  # CPU default


def test_local_checkpoint_in_hub_layout_loads(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    model = PaliGemmaFamily().load_model(ModelConfig(name_or_path=str(tiny_checkpoint)))
    processor = PaliGemmaFamily().load_processor(ModelConfig(name_or_path=str(tiny_checkpoint)))
    assert isinstance(model, PaliGemmaForConditionalGeneration)
    assert isinstance(processor, PaliGemmaProcessor)
    assert processor.image_seq_length == 64
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 257152
    # Same weights as the preset it was saved from.
    preset = PaliGemmaFamily().load_model(ModelConfig(name_or_path="tiny-paligemma2"))
    for (name, a), (_, b) in zip(model.state_dict().items(), preset.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_dtype_defaults():
    assert resolve_dtype("float32") == torch.float32
    expected = (
        torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    )
    assert resolve_dtype("auto") == expected
