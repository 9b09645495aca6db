"""Tiny randomly initialised backbones for fast tests (weights don't matter there)."""

from __future__ import annotations

from typing import Any

import torch

from models.classifier import MultimodalModel
from models.config import ModelConfig
from models.encoders import HFVisionEncoder, TextEncoder, resolve_text_source


def tiny_config(**overrides: Any) -> ModelConfig:
    base: dict[str, Any] = dict(
        text_backbone="tiny-bert",
        image_backbone="tiny-vit",
        embed_dim=16,
        fusion_dim=16,
        fusion_heads=2,
        dropout=0.0,
        max_text_length=16,
        image_size=32,
    )
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(config: ModelConfig | None = None, seed: int = 0) -> tuple[MultimodalModel, Any]:
    """A 2-layer BERT (the MiniLM tokenizer's vocabulary) and a 1-layer ViT on 32x32 images."""
    from transformers import AutoTokenizer, BertConfig, ViTConfig

    torch.manual_seed(seed)
    config = config or tiny_config()
    text = TextEncoder.from_config(
        BertConfig(
            vocab_size=30522,
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            max_position_embeddings=64,
        )
    )
    image = HFVisionEncoder.from_config(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=20,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=40,
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_source("default"))
    return MultimodalModel(config, text, image), tokenizer
