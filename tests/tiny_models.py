"""A tiny randomly initialised CLIP saved in the `save_pretrained` layout (weights, config,
tokenizer, image processor), so extraction code runs end to end with nothing downloaded."""

from __future__ import annotations

from pathlib import Path

WORDS = ["a", "man", "woman", "dog", "on", "the", "floor", "with", "in", "of", "red", "blue",
         "car", "sitting", "standing", "kitchen"]
CLIP_PROJ, CLIP_TEXT_HIDDEN = 16, 24
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 32, "patch_size": 8}


def build_tiny_clip(path: Path, seed: int = 0) -> Path:
    """CLIP with 16-d image embeddings and 24-d token states, 32-px images; char-level vocab."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizerFast,
    )

    torch.manual_seed(seed)
    chars = sorted(set("".join(WORDS)))
    vocab: dict[str, int] = {}
    for t in ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]:
        vocab[t] = len(vocab)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": CLIP_TEXT_HIDDEN,
                     "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config=TINY_VISION, projection_dim=CLIP_PROJ,
    )
    CLIPModel(cfg).save_pretrained(path)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                           crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizerFast(vocab=vocab, merges=[]),
    ).save_pretrained(path)
    return path
