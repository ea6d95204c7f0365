"""Qwen2 text features for HART, read through ``transformers`` from a local directory (never downloaded).

Upstream (``hart/utils/tools.py:encode_prompts``): tokenise each prompt padded to ``context_token`` (300)
and truncated there; run the LM on [system prompt ; prompt] with an all-ones mask on the system part; keep
the last hidden state of the prompt positions only, in float32. ``transformers`` is imported only when an
encoder is built, so ``import freqar`` never pulls it in.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import FreqarError, InvalidOption, WeightsNotFound
from .hart import TextFeatures

LLM_SYSTEM_PROMPT = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions '
    "suitable for image generation.\n"
    "\n"
    "Examples:\n"
    "- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n"
    "- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing "
    "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing "
    "by towering glass skyscrapers.\n"
    "\n"
    "Please generate only the enhanced description for the prompt below and DO NOT include any "
    'additional sentences. Start your response with "Enhanced Prompt:".\n'
    "\n"
    "User Prompt:\n"
)


class QwenTextEncoder:
    """A local Qwen2 checkpoint (tokenizer + model) producing HART's ``TextFeatures``.

    ``use_system_prompt`` (upstream default True) prefixes upstream's "Enhanced prompt" instruction; prompts
    longer than ``max_tokens`` are truncated with a warning, as upstream truncates (silently).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_tokens: int = 300,
        use_system_prompt: bool = True,
        device: str | torch.device = "cpu",
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        d = Path(directory)
        if model is None or tokenizer is None:
            if not d.is_dir():
                raise WeightsNotFound(f"text encoder directory not found: '{d}'")
            if not (d / "config.json").is_file():
                raise WeightsNotFound(f"text encoder directory '{d}' has no config.json")
            try:
                from transformers import AutoModel, AutoTokenizer
            except ImportError:
                raise FreqarError("the HART text encoder needs `pip install transformers`") from None
            try:
                tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(d), local_files_only=True)
                model = model or AutoModel.from_pretrained(str(d), local_files_only=True)
            except (OSError, ValueError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise WeightsNotFound(f"cannot load the text encoder from '{d}': {msg}") from None
        self.tokenizer = tokenizer
        self.model = model.to(device).eval()
        self.max_tokens = max_tokens
        self.use_system_prompt = use_system_prompt
        if getattr(self.tokenizer, "pad_token_id", None) is None:
            raise InvalidOption(f"text tokenizer in '{d}' has no pad token")

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def _ids(self, text: str, pad: bool) -> torch.Tensor:
        enc = self.tokenizer(
            text,
            return_tensors="pt",
            padding="max_length" if pad else "longest",
            max_length=self.max_tokens,
            truncation=True,
        )
        return enc.input_ids[0]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextFeatures:
        """Features (B, max_tokens, width) float32, mask and position ids of a batch of prompts."""
        if not prompts:
            raise InvalidOption("no prompt given")
        for p in prompts:
            n = len(self.tokenizer(p).input_ids)
            if n > self.max_tokens:
                warnings.warn(
                    f"prompt of {n} tokens truncated to {self.max_tokens} (HART's context_token)",
                    stacklevel=2,
                )
        dev = next(self.model.parameters()).device
        ids = torch.stack([self._ids(p, pad=True) for p in prompts]).to(dev)
        mask = ids != self.tokenizer.pad_token_id
        pos = mask.long().cumsum(1) - 1
        if self.use_system_prompt:
            sys_ids = self._ids(LLM_SYSTEM_PROMPT, pad=False).to(dev).unsqueeze(0).repeat(len(prompts), 1)
            n_sys = sys_ids.shape[1]
            out = self.model(
                torch.cat((sys_ids, ids), 1),
                attention_mask=torch.cat((torch.ones_like(sys_ids, dtype=torch.bool), mask), 1).long(),
                output_hidden_states=True,
            )
            feats = out.hidden_states[-1][:, n_sys:]
        else:
            out = self.model(ids, attention_mask=mask.long(), output_hidden_states=True)
            feats = out.hidden_states[-1]
        return TextFeatures(feats.float(), mask.long(), pos)
