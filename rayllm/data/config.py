"""The curation stage's settings: ``DataConfig``, which gathers every block's own config, and
the configs of the passes over the whole corpus (dedup, tokenizer training).

Nothing here imports Ray or transformers, so the CLI checks a config before anything starts.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from rayllm.config import StageConfig
from rayllm.data.blocks.c4 import BadWordsConfig, C4Config
from rayllm.data.blocks.classifier import ClassifierConfig
from rayllm.data.blocks.gopher import GopherQualityConfig, GopherRepetitionConfig
from rayllm.data.blocks.language import LanguageConfig
from rayllm.data.blocks.normalise import NormaliseConfig
from rayllm.data.blocks.pii import PIIConfig
from rayllm.data.readers import Split


class TokenizerConfig(StageConfig):
    kind: Literal["bpe", "wordpiece", "unigram"] = "bpe"
    """bpe: byte-level BPE (GPT-2, Llama 3), no unknown tokens; wordpiece: BERT's;
    unigram: SentencePiece's unigram model with its metaspace pre-tokenizer."""
    vocab_size: int = 4096
    min_frequency: int = 2
    pretrained: str | None = None
    """A Hugging Face model folder (or fsspec URL) whose tokenizer the shards use instead of
    training one (``kind``, ``vocab_size`` and ``min_frequency`` then do not apply): for text a
    model of that family trains on or a teacher distills on."""


class FuzzyDedupConfig(StageConfig):
    """Defaults tuned on the Shakespeare modern / First Folio pairs (see README, Performance)."""

    enabled: bool = True
    ngram: int = 3
    """Words per shingle."""
    bands: int = 64
    rows: int = 2
    """bands x rows min-hashes per document; a pair becomes a candidate when any band matches."""
    threshold: float = 0.2
    """Estimated Jaccard similarity at which a candidate pair counts as a duplicate."""
    seed: int = 1


class ParagraphDedupConfig(StageConfig):
    """Paragraph-level dedup across documents: repeated boilerplate, quoted passages."""

    enabled: bool = True
    min_chars: int = 100
    """Shorter paragraphs are never removed (headings, stage directions, short replies)."""


class DataConfig(StageConfig):
    """Every knob of the curation stage; each block can be switched off with ``enabled``."""

    work_paths: ClassVar[dict[str, str]] = {"output": "data"}

    corpus: str = "shakespeare"
    """A built-in corpus (shakespeare, shakespeare-folio, shakespeare-all, bible, chat), or a
    file, folder, glob or fsspec URL of .txt / .jsonl / .parquet files."""
    split: Split = "paragraph"
    """How plain-text files are cut into documents."""
    text_field: str = "text"
    max_documents: int | None = None
    """Keep only the corpus's first N documents (a quick slice for trials and tests)."""
    strict: bool = False
    """Fail on the first unreadable record instead of counting and skipping it."""
    output: str | None = None
    """Where the shards, tokenizer and stats go; default rayllm-work/data."""
    overwrite: bool = False
    """Replace ``output`` even when it holds something rayllm did not write."""
    keep_curated: bool = True
    """Keep ``curated/``: every document read, as Parquet, with its drop reason and the
    blocks' columns (language and its score, quality score, PII counts), before dedup."""
    normalise: NormaliseConfig = NormaliseConfig()
    language: LanguageConfig = LanguageConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    c4: C4Config = C4Config()
    bad_words: BadWordsConfig = BadWordsConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    pii: PIIConfig = PIIConfig()
    exact_dedup: bool = True
    paragraph_dedup: ParagraphDedupConfig = ParagraphDedupConfig()
    fuzzy_dedup: FuzzyDedupConfig = FuzzyDedupConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    seq_len: int = 256
    """Tokens per training sequence; shards store seq_len + 1 tokens per row (inputs+target)."""
    val_fraction: float = 0.02
    sequences_per_shard: int = 8192
    workers: int = 2
    """Parallel actors for the stateful steps (language models, MinHash, tokenising)."""
    block_mb: int = 32
    """Megabytes per Ray Data block (and per shuffle batch; the dedup and packing passes read
    the curated Parquet in blocks of this many compressed megabytes): what a worker holds at
    a time, whatever the corpus size."""
