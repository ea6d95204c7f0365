"""T5 text features for Infinity, read through ``transformers`` from a local directory (never downloaded).

Upstream (``tools/run_infinity.py``): tokenise with the Flan-T5 tokenizer (max_length 512, truncation), run
``T5EncoderModel`` and keep, per prompt, the ``attention_mask.sum()`` first rows of ``last_hidden_state``
(the ``</s>`` token included), in float32. Padding to the longest prompt instead of to 512 gives the same
rows, because the encoder masks padded keys. ``transformers`` is imported only when an encoder is built,
so ``import freqar`` never pulls it in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import FreqarError, InvalidOption, WeightsNotFound


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise FreqarError(
            "text prompts need the 'transformers' package (pip install transformers sentencepiece)"
        ) from None
    return transformers


class T5TextEncoder:
    """A local T5 encoder + tokenizer producing ``(features (B, T, C) float32, lens (B,))``.

    ``max_length`` is the tokenizer's truncation length (upstream 512 = the model's ``text_maxlen``);
    ``dtype`` is the encoder's compute dtype (upstream runs Flan-T5-XL in fp16 on GPUs).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        max_length: int = 512,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        if model is None or tokenizer is None:
            if directory is None:
                raise InvalidOption(
                    "a T5 text encoder needs a local directory (e.g. a google/flan-t5-xl copy)"
                )
            d = Path(directory)
            if not d.is_dir():
                raise WeightsNotFound(f"text encoder directory not found: '{d}'")
            if not (d / "config.json").is_file():
                raise WeightsNotFound(f"'{d}' has no config.json (expected a T5 checkpoint folder)")
            tf = _transformers()
            try:
                tokenizer = tokenizer or tf.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
                model = model or tf.T5EncoderModel.from_pretrained(
                    str(d), local_files_only=True, torch_dtype=dtype
                )
            except Exception as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise WeightsNotFound(f"cannot load a T5 encoder from '{d}': {msg}") from None
        if max_length < 1:
            raise InvalidOption(f"max_length must be >= 1, got {max_length}")
        self.tokenizer = tokenizer
        self.model = model.to(device).eval()
        self.max_length = max_length
        self.device = torch.device(device)

    @property
    def channels(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (features (B, T, C) float32 with zero rows past each length, lens (B,) int64)."""
        if not prompts:
            raise InvalidOption("no prompt given")
        if any(not isinstance(p, str) for p in prompts):
            raise InvalidOption("prompts must be strings")
        tok = self.tokenizer(
            list(prompts), max_length=self.max_length, padding="longest", truncation=True, return_tensors="pt"
        )
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        lens = mask.sum(dim=1).long()
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lens[:, None]
        return hidden * keep.unsqueeze(-1), lens.cpu()
