"""Quantization and pruning on small random Llama models in this process: GPTQ's output error
is below round-to-nearest's on correlated inputs; what compressed-tensors writes, transformers
loads back to the logits the compressor measured; structured pruning shrinks the config and the
saved model computes what the pruned one did; bad settings are refused."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rayllm.compress.config import CompressConfig, PruneSettings, QuantizeSettings
from rayllm.compress.prune import prune_model
from rayllm.compress.quantize import (
    compressed_state,
    gptq,
    quantize_model,
    rounded,
    scales_of,
    scheme,
)
from rayllm.compress.task import saved_state
from rayllm.config import load_config
from rayllm.errors import RayllmError
from rayllm.serve.node_cpus import NodeCpus, common, local_cpus


def small_llama(**changes) -> LlamaForCausalLM:
    torch.manual_seed(0)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4}
    shape |= {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    config = LlamaConfig(vocab_size=128, tie_word_embeddings=True, **(shape | changes))
    return LlamaForCausalLM(config).eval()


def rows(count: int = 16, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 128, (count, length), generator=torch.Generator().manual_seed(1))


def save(model: LlamaForCausalLM, tensors: dict, folder) -> LlamaForCausalLM:
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_gptq_spreads_rounding_error_below_round_to_nearest():
    torch.manual_seed(0)
    mixing = torch.randn(64, 64)
    inputs = torch.randn(2048, 64) @ mixing  # correlated features, as a layer's inputs are
    weight = torch.randn(48, 64)
    settings = QuantizeSettings(scheme="w4a16", group_size=32)
    args = scheme(settings).weights
    hessian = 2 * inputs.T @ inputs / len(inputs)
    by_gptq, gptq_scales = gptq(weight, hessian, args, settings, torch.float32)
    by_rtn = rounded(weight, scales_of(weight, args, torch.float32), args)

    def output_error(quantized):
        return (inputs @ (weight - quantized).T).pow(2).mean().item()

    assert output_error(by_gptq) < 0.7 * output_error(by_rtn)
    levels = by_gptq.reshape(48, 2, 32) / gptq_scales[:, :, None]
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the int4 grid of its group
    assert levels.round().min() >= -8 and levels.round().max() <= 7


@pytest.mark.parametrize(
    ("settings", "stored"),
    [
        (QuantizeSettings(scheme="w4a16", group_size=32, algorithm="gptq"), torch.int32),
        (QuantizeSettings(scheme="w8a16", group_size=None, algorithm="rtn"), torch.int32),
    ],
)
def test_transformers_loads_what_the_quantizer_measured(settings, stored, tmp_path):
    model = small_llama()
    original = model(rows()).logits
    scales = quantize_model(model, settings, rows(), 8, torch.float32)
    assert len(scales) == 4 * 7  # q, k, v, o, gate, up, down of 4 layers; not the head
    measured = model(rows()).logits
    assert not torch.allclose(measured, original, atol=1e-3)
    tensors, config = compressed_state(saved_state(model), scales, settings, torch.float32)
    assert tensors["model.layers.0.mlp.down_proj.weight_packed"].dtype == stored
    model.config.quantization_config = config
    loaded = save(model, tensors, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert torch.allclose(loaded(rows()).logits, measured, atol=1e-4)


def test_w8a8_stores_int8_weights_and_measures_int8_activations():
    model = small_llama()
    settings = QuantizeSettings(scheme="w8a8", algorithm="rtn")
    scales = quantize_model(model, settings, None, 8, torch.float32)
    with_activations = model(rows()).logits
    tensors, config = compressed_state(saved_state(model), scales, settings, torch.float32)
    assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
    name = "model.layers.1.mlp.up_proj"
    assert tensors[f"{name}.weight"].dtype == torch.int8
    assert tensors[f"{name}.weight_scale"].shape == (128, 1)
    stored = tensors[f"{name}.weight"].float() * tensors[f"{name}.weight_scale"]
    assert torch.equal(stored, model.get_submodule(name).weight.data)
    for module in model.modules():
        module._forward_pre_hooks.clear()
    assert not torch.allclose(model(rows()).logits, with_activations, atol=1e-4)


def test_a_group_size_the_layers_do_not_divide_is_refused_with_the_sizes_that_do():
    model = small_llama(intermediate_size=96)  # down_proj reads 96 features
    with pytest.raises(RayllmError, match=r"does not divide .* \[96\].*\(32\)"):
        quantize_model(
            model, QuantizeSettings(group_size=64, algorithm="rtn"), None, 8, torch.float32
        )


@pytest.mark.parametrize(
    ("structure", "config_changes"),
    [
        ("heads", {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}),
        ("channels", {"intermediate_size": 64}),
        ("layers", {"num_hidden_layers": 2}),
    ],
)
def test_structured_pruning_shrinks_the_model_and_saves_what_it_computes(
    structure, config_changes, tmp_path
):
    model = small_llama()
    before = sum(p.numel() for p in model.parameters())
    details = prune_model(model, PruneSettings(structure=structure, sparsity=0.5), rows(), 8)
    assert details
    for key, value in config_changes.items():
        assert getattr(model.config, key) == value
    assert sum(p.numel() for p in model.parameters()) < before
    loaded = save(model, saved_state(model), tmp_path)
    assert torch.allclose(loaded(rows()).logits, model(rows()).logits, atol=1e-5)


def test_unstructured_pruning_reaches_its_sparsity_on_every_layer():
    model = small_llama()
    details = prune_model(model, PruneSettings(structure="unstructured", sparsity=0.6), None, 8)
    assert details["sparsity"] == pytest.approx(0.6, abs=0.01)
    q = model.model.layers[2].self_attn.q_proj.weight
    assert (q == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (PruneSettings(structure="heads", sparsity=0.4), "removes 0 of 2 key-value head groups"),
        (PruneSettings(structure="layers", sparsity=0.2), "removes 0 of 4 layers"),
    ],
)
def test_a_share_that_removes_nothing_is_refused(settings, message):
    with pytest.raises(RayllmError, match=message):
        prune_model(small_llama(), settings, rows(), 8)


def test_w8a8_takes_no_group_size():
    with pytest.raises(ValueError, match="w8a8 quantizes weights per channel"):
        CompressConfig(quantize={"scheme": "w8a8", "group_size": 64})
    assert CompressConfig(quantize={"scheme": "w8a8"}).quantize.group_size == 128
    assert CompressConfig(quantize={"scheme": "w8a8", "group_size": None})
    with pytest.raises(RayllmError) as refused:  # as the command line says it
        load_config(CompressConfig, None, ["quantize.scheme=w8a8", "quantize.group_size=64"])
    assert str(refused.value) == ("w8a8 quantizes weights per channel: leave group_size unset")


def quantized_app(tmp_path, scheme: str):
    """An app config serving a version recorded as quantized with ``scheme``."""
    from rayllm.registry.store import Registry
    from rayllm.serve.app import pin
    from rayllm.serve.config import ServeConfig

    folder = tmp_path / "model"
    folder.mkdir()
    small_llama().config.save_pretrained(folder)
    quantization = QuantizeSettings(scheme=scheme).model_dump(mode="json")
    Registry(str(tmp_path / "registry")).publish(
        f"tiny-{scheme}",
        folder,
        {"compression": {"method": "quantize", "quantization": quantization}},
    )
    return pin(ServeConfig(registry=str(tmp_path / "registry"), model=f"tiny-{scheme}"))


def test_serving_refuses_int8_weights_only_where_the_engine_has_no_kernel(tmp_path):
    from rayllm.serve.app import llm_config

    config, cpus = quantized_app(tmp_path, "w8a16"), local_cpus()
    with pytest.raises(RayllmError, match="tiny-w8a16:1 is quantized w8a16 .* serve it on GPUs"):
        llm_config(config.models[0], config, has_gpus=False, cpus=cpus)
    assert llm_config(config.models[0], config, has_gpus=True, cpus=cpus).model_id == "tiny-w8a16"


def test_int4_is_served_on_cpus_where_the_engine_has_its_kernel(tmp_path):
    """The rule (AVX-512 on x86) against the library vLLM's CPU platform loads on this machine,
    then applied to the nodes replicas may run on: one node without AVX-512 refuses it."""
    from vllm.platforms.cpu import CpuPlatform

    from rayllm.serve.app import llm_config

    CpuPlatform.import_kernels()
    engine_has_it = hasattr(torch.ops._C, "cpu_gemm_wna16")
    here = local_cpus()
    assert here.has_int4_kernel == engine_has_it
    config = quantized_app(tmp_path, "w4a16")
    avx512 = NodeCpus(frozenset({"avx2", "avx512f"}), frozenset({"x86_64"}), nodes=1)
    avx2 = NodeCpus(frozenset({"avx2"}), frozenset({"x86_64"}), nodes=1)
    assert llm_config(config.models[0], config, False, avx512).model_id == "tiny-w4a16"
    with pytest.raises(RayllmError, match="w4a16 .* AVX-512, which the 2 node.* lack"):
        llm_config(config.models[0], config, has_gpus=False, cpus=common([avx512, avx2]))
    assert llm_config(config.models[0], config, True, common([avx2])).model_id == "tiny-w4a16"
