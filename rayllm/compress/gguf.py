"""A registry version written as one GGUF file (llama.cpp's format), and checked by loading it
back with ``transformers``.

The ``gguf`` package (llama.cpp's own Python writer) names the tensors, quantizes them and
writes the file; rayllm supplies what llama.cpp's converter would: the Llama metadata, the
byte-level BPE vocabulary, and query and key rows reordered for GGUF's rotary layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from rayllm.errors import RayllmError
from rayllm.model.hf import head_width
from rayllm.registry.store import Registry

TYPES = {
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "f16": gguf.GGMLQuantizationType.F16,
    "f32": gguf.GGMLQuantizationType.F32,
}
"""What ``--gguf-type`` writes the matrices as (vectors stay float32)."""


def write_gguf(folder: Path, path: Path, kind: str) -> None:
    """The Llama model in ``folder`` (a Hugging Face folder) as the GGUF file ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "llama" or getattr(config, "quantization_config", None):
        raise RayllmError(
            f"{folder}: GGUF export writes unquantized Llama models (this one is "
            f"{config.model_type}{', quantized' if hasattr(config, 'quantization_config') else ''}"
            "); export its parent"
        )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    head_dim = head_width(config.to_dict())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(folder.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(kind))
    _add_vocabulary(writer, tokenizer, folder, config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, tensor in state.items():
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise RayllmError(f"{folder}: GGUF has no name for tensor {name}")
        data = tensor.numpy()
        if name.endswith("q_proj.weight"):
            data = _rotary_rows(data, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _rotary_rows(data, config.num_key_value_heads)
        quant = TYPES[kind] if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(target, gguf.quants.quantize(data, quant), raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Each head's rows reordered from Hugging Face's rotary layout (halves) to GGUF's
    (interleaved pairs), as llama.cpp's converter does; transformers reverses it on load."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _add_vocabulary(writer: gguf.GGUFWriter, tokenizer, folder: Path, size: int) -> None:
    """The byte-level BPE vocabulary (tokens, their kinds, merges, special ids and the chat
    template), from the folder's tokenizer.json."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    if spec["model"]["type"] != "BPE":
        raise RayllmError(
            f"{folder}: GGUF export writes BPE vocabularies, not {spec['model']['type']}"
        )
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens, kinds = [], []
    for i in range(size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            kinds.append(gguf.TokenType.UNUSED)
        elif i in special:
            kinds.append(gguf.TokenType.CONTROL)
        else:
            kinds.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=size).add_to_gguf(writer, quiet=True)


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _file_type(kind: str) -> int:
    return {
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "f32": gguf.LlamaFileType.ALL_F32,
    }[kind]


PROBE = (
    "The registry holds every version. Ünïcode, numbers 12345, tabs\tand\nnew lines; "
    "punctuation!? <code>x = y[0]</code>"
)
"""Text the loaded-back file must tokenize and score as the source does."""


def export_gguf(registry: Registry, ref: str, destination: Path, kind: str = "q8_0") -> dict:
    """Write ``ref`` as the GGUF file ``destination``: written beside it, loaded back with
    transformers and compared with the source on :data:`PROBE`, and only then put in place.
    Returns the comparison and the file's size."""
    if kind not in TYPES:
        raise RayllmError(f"GGUF type {kind!r}: choose one of {', '.join(TYPES)}")
    if destination.exists():
        raise RayllmError(f"{destination} exists; choose a new file name")
    version, folder = registry.local_path(ref)
    partial = destination.with_name(f".{destination.name}.partial")
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_gguf(folder, partial, kind)
        check = loaded_back(folder, partial)
        if not check["same_tokens"] or check["top1_agreement"] < 0.9:
            raise RayllmError(
                f"{version.ref}'s GGUF did not load back as the same model (same tokens: "
                f"{check['same_tokens']}, next-token agreement {check['top1_agreement']:.0%}); "
                "nothing was written"
            )
        partial.rename(destination)
    finally:
        partial.unlink(missing_ok=True)
    return check | {"version": version.ref, "type": kind, "bytes": destination.stat().st_size}


def loaded_back(folder: Path, path: Path) -> dict:
    """The GGUF file loaded with transformers against the Hugging Face folder it came from:
    whether :data:`PROBE` gets the same token ids, the share of positions whose most likely
    next token agrees, and the largest logit difference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayllm.eval.models import agreement

    source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder)(PROBE)["input_ids"]
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    loaded_ids = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)(PROBE)["input_ids"]
    with torch.no_grad():
        expected = source(torch.tensor([ids])).logits[0]
        got = loaded(torch.tensor([ids])).logits[0]
    return {"same_tokens": loaded_ids == ids} | agreement(expected, got)
