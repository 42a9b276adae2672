"""Train a tokenizer with `tokenizers` (BPE, WordPiece or Unigram) and save it in HF format."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rayllm.data.config import TokenizerConfig
from rayllm.errors import RayllmError
from rayllm.paths import filesystem

END_OF_TEXT = "<|endoftext|>"
PADDING = "<|pad|>"
UNKNOWN = "<|unk|>"


def _untrained(kind: str) -> tuple[Tokenizer, object]:
    special = [END_OF_TEXT, PADDING, UNKNOWN]
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            special_tokens=special[:2], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    elif kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=UNKNOWN))
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(special_tokens=special)
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(special_tokens=special, unk_token=UNKNOWN)
    return tokenizer, trainer


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Learn the vocabulary from ``texts``; the end-of-text token separates documents."""
    tokenizer, trainer = _untrained(config.kind)
    trainer.vocab_size = config.vocab_size
    if hasattr(trainer, "min_frequency"):
        trainer.min_frequency = config.min_frequency
    trainer.show_progress = False
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=PADDING,
        unk_token=None if config.kind == "bpe" else UNKNOWN,
        model_max_length=1 << 20,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> None:
    """Write tokenizer.json and its config, the files transformers and vLLM load."""
    tokenizer.save_pretrained(str(folder))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""What a Hugging Face fast tokenizer is saved as (a model folder holds its weights too)."""


def load_tokenizer(url: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved at ``url`` (a local folder or any fsspec URL, a model's or its own)."""
    fs, path = filesystem(str(url))
    path = path.rstrip("/")
    if not fs.exists(f"{path}/tokenizer.json"):
        raise RayllmError(f"{url} holds no tokenizer.json: name a folder a tokenizer was saved in")
    if isinstance(fs, LocalFileSystem):
        return PreTrainedTokenizerFast.from_pretrained(path)
    with tempfile.TemporaryDirectory(prefix="rayllm-tokenizer-") as local:
        for name in TOKENIZER_FILES:
            if fs.exists(f"{path}/{name}"):
                fs.get(f"{path}/{name}", f"{local}/{name}")
        return PreTrainedTokenizerFast.from_pretrained(local)


def tokenizer_vocabulary(folder: str) -> dict[str, Any]:
    """What decides the id of every piece of text: the model and the added tokens of the
    tokenizer.json in ``folder`` (its chat template and other settings aside)."""
    fs, path = filesystem(folder)
    saved = json.loads(fs.cat_file(f"{path.rstrip('/')}/tokenizer.json"))
    added = sorted((token["id"], token["content"]) for token in saved.get("added_tokens", []))
    return {"model": saved["model"], "added": added}


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""A role-tagged template for base models: each turn is ``<|role|>``, a newline, the text
and the end-of-text token; a generation prompt opens the assistant's turn."""


def with_chat_template(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The tokenizer with a chat template (its own if it has one, else :data:`CHAT_TEMPLATE`),
    so ``/v1/chat/completions`` and ``apply_chat_template`` work on any model rayllm trains."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
