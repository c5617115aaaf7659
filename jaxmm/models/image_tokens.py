"""Models that give every image one fixed square and a fixed number of tokens (LLaVA-1.5,
Gemma 3): the token count and the checks of pixels and precomputed embeddings they share."""

from __future__ import annotations

import numpy as np


class FixedImageTokens:
    """Mixin: the model defines `_tokens_per_image()`, and has `hf_config` (its
    `vision_config`) and `config` (the language model's)."""

    # said when the processor's pixels do not fit the tower
    pixel_shape_hint = "check the checkpoint's preprocessor_config.json"

    def _tokens_per_image(self) -> int:
        raise NotImplementedError

    def mm_num_tokens(self, modality: str, item: dict) -> int:
        vc = self.hf_config.vision_config
        want = (vc.num_channels, vc.image_size, vc.image_size)
        got = tuple(np.shape(item["pixel_values"]))
        if got != want:
            raise ValueError(
                f"the image processor produced pixel values of shape {got}; this model's vision "
                f"tower takes {want} ({self.pixel_shape_hint})"
            )
        return self._tokens_per_image()

    def mm_check_embeds(self, modality: str, embeds: np.ndarray, meta: dict) -> dict:
        want = (self._tokens_per_image(), self.config.hidden_size)
        if embeds.ndim != 2 or tuple(embeds.shape) != want:
            raise ValueError(
                f"image embeddings must have shape (num_tokens, hidden_size) = {want} for this "
                f"model; got {tuple(embeds.shape)}"
            )
        return {}
