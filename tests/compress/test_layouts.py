"""Low-rank factorisation, weight sharing and the recovery fine-tune on small random Llama models
in this process: the folder rayllm writes loads back, in rayllm and in plain transformers
(``trust_remote_code``), to the logits the compressed model computed, with fewer weights stored;
recovery lowers the loss and keeps shared weights one; bad settings are refused, and so is
serving or recompressing such a version."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from rayllm.compress.calibration import mean_loss
from rayllm.compress.config import (
    CompressConfig,
    LowRankSettings,
    RecoverySettings,
    ShareSettings,
)
from rayllm.compress.lowrank import energy_rank, factorise_model
from rayllm.compress.recovery import recover
from rayllm.compress.servable import check_servable
from rayllm.compress.sharing import share_layers
from rayllm.compress.task import saved_state, write_rayllm_layout
from rayllm.config import load_config
from rayllm.errors import RayllmError
from rayllm.eval.models import load_causal_lm
from rayllm.registry.store import Registry
from rayllm.serve.node_cpus import local_cpus
from tests.compress.test_methods import rows, save, small_llama


def written(model, folder):
    """The folder as ``rayllm compress`` writes it, read back by rayllm's loader and by plain
    transformers running the code the folder carries."""
    write_rayllm_layout(model.config, folder)
    save_file(saved_state(model), folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    by_rayllm = load_causal_lm(folder, torch.float32).eval()
    by_transformers = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=True
    ).eval()
    return by_rayllm, by_transformers


def stored(folder) -> int:
    """Weights in the folder's safetensors file."""
    from safetensors.torch import load_file

    return sum(tensor.numel() for tensor in load_file(folder / "model.safetensors").values())


@torch.no_grad()
def test_a_factorised_model_computes_the_dense_one_where_weights_are_low_rank(tmp_path):
    model = small_llama()
    generator = torch.Generator().manual_seed(2)
    for layer in model.model.layers:  # rank-6 weights: the truncated SVD at rank 6 is exact
        for linear in (layer.self_attn.q_proj, layer.mlp.down_proj):
            out, inp = linear.weight.shape
            linear.weight.copy_(
                torch.randn(out, 6, generator=generator)
                @ torch.randn(6, inp, generator=generator)
                / 8
            )
    dense = model(rows()).logits
    before = stored_numel = sum(t.numel() for t in saved_state(model).values())
    details = factorise_model(model, LowRankSettings(energy=0.999999))
    assert details["ranks"]["min"] == 6 and details["factorised_layers"] >= 8
    torch.testing.assert_close(model(rows()).logits, dense, atol=1e-4, rtol=1e-4)
    by_rayllm, by_transformers = written(model, tmp_path)
    assert type(by_rayllm.model.layers[0].self_attn.q_proj).__name__ == "LowRankLinear"
    for loaded in (by_rayllm, by_transformers):
        torch.testing.assert_close(loaded(rows()).logits, model(rows()).logits)
    assert stored(tmp_path) < stored_numel == before
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["low_rank"]["model.layers.0.self_attn.q_proj"] == 6


@torch.no_grad()
def test_a_fixed_rank_factorises_every_layer_it_shrinks_and_counts_the_rest():
    model = small_llama()  # q, o 64x64, k, v 32x64 (break-even 32, 21.3); MLP 64x128 (42.7)
    details = factorise_model(model, LowRankSettings(rank=40))
    assert details["factorised_layers"] == 4 * 3  # gate, up, down of each layer
    assert details["dense_layers"] == 4 * 4  # q, k, v, o stay dense
    assert set(model.config.low_rank.values()) == {40}


def test_energy_rank_keeps_the_smallest_prefix_that_reaches_the_share():
    values = torch.tensor([3.0, 2.0, 1.0, 1.0])  # squared: 9, 4, 1, 1 of 15
    assert energy_rank(values, 0.5) == 1
    assert energy_rank(values, 0.61) == 2
    assert energy_rank(values, 0.9) == 3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (LowRankSettings(rank=64), r"rank 64 shrinks none of the 28 targeted layers.*at most 21"),
        (LowRankSettings(energy=0.99, targets=["q_proj"]), r"energy 0.99 keeps ranks .*lower"),
    ],
)
def test_settings_that_shrink_nothing_are_refused(settings, message):
    with pytest.raises(RayllmError, match=message):
        factorise_model(small_llama(), settings)


@torch.no_grad()
def test_shared_layers_are_one_set_of_weights_stored_once(tmp_path):
    model = small_llama()
    first, second = (layer.mlp.up_proj.weight.clone() for layer in model.model.layers[:2])
    details = share_layers(model, ShareSettings(group=3))
    assert details == {"share": {"group": 3, "merge": "mean"}, "stored_layers": 2, "layers": 4}
    assert model.config.shared_layers == [0, 0, 0, 3]
    layers = model.model.layers
    assert layers[2].mlp.up_proj.weight is layers[0].mlp.up_proj.weight
    assert layers[3].mlp.up_proj.weight is not layers[0].mlp.up_proj.weight
    third = small_llama().model.layers[2].mlp.up_proj.weight
    torch.testing.assert_close(layers[0].mlp.up_proj.weight, (first + second + third) / 3)
    by_rayllm, by_transformers = written(model, tmp_path)
    for loaded in (by_rayllm, by_transformers):
        assert loaded.model.layers[1].self_attn.o_proj.weight is (
            loaded.model.layers[0].self_attn.o_proj.weight
        )
        torch.testing.assert_close(loaded(rows()).logits, model(rows()).logits)
        prompt = rows(1, 5)
        cached, recomputed = (
            loaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=use_cache)
            for use_cache in (True, False)
        )
        assert torch.equal(cached, recomputed)  # each layer keeps its own KV cache
    per_layer = sum(t.numel() for t in layers[0].parameters())
    everything = sum(t.numel() for t in saved_state(small_llama()).values())
    assert stored(tmp_path) == everything - 2 * per_layer


def test_a_group_longer_than_the_model_is_refused():
    with pytest.raises(RayllmError, match="share.group 5 is more than the model's 4 layers"):
        share_layers(small_llama(), ShareSettings(group=5))


def test_recovery_lowers_the_loss_and_keeps_shared_weights_one():
    model = small_llama()
    share_layers(model, ShareSettings(group=2))
    training = rows(32)
    before = mean_loss(model, training, 8)["val_loss"]
    details = recover(model, training, RecoverySettings(steps=12, learning_rate=3e-3))
    assert mean_loss(model, training, 8)["val_loss"] < before - 0.2
    first, last = details["recovery"]["losses"]
    assert last < first
    layers = model.model.layers
    assert layers[1].self_attn.q_proj.weight is layers[0].self_attn.q_proj.weight
    assert not model.training


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["method=quantize"], "quantize has no recovery fine-tune"),
        (["method=prune"], r"prune \(unstructured\) has no recovery"),
        (["method=distill"], "distill has no recovery"),
    ],
)
def test_recovery_after_a_method_it_would_undo_is_refused(settings, message):
    with pytest.raises(RayllmError, match=message):
        load_config(CompressConfig, None, [*settings, "recovery.steps=10"])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["method=low_rank"], "recovery.workers: low_rank leaves a model rayllm's trainer"),
        (["method=share"], "recovery.workers: share leaves"),
        (
            ["method=prune", "prune.structure=channels", "recovery.rows_per_step=5"],
            "rows_per_step 5 is not a multiple of recovery.workers 2",
        ),
    ],
)
def test_a_recovery_on_ray_train_needs_a_shape_the_trainer_computes(settings, message):
    given = [*settings, "recovery.steps=10", "recovery.workers=2"]
    with pytest.raises(RayllmError, match=message):
        load_config(CompressConfig, None, given)
    load_config(CompressConfig, None, [*given[:-1], "recovery.workers=0"])  # in the task: fine


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["low_rank.rank=8", "low_rank.energy=0.5"], "rank and low_rank.energy each choose"),
        (["low_rank.rank=0"], "low_rank.rank"),
        (["low_rank.energy=1"], "low_rank.energy"),
        (["low_rank.targets=[]"], "targets is empty"),
        (["low_rank.targets=[lm_head]"], "low_rank.targets"),
        (["share.group=1"], "share.group"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(RayllmError, match=message):
        load_config(CompressConfig, None, [*settings, "method=low_rank"])


@pytest.mark.parametrize("method", ["low_rank", "share"])
def test_such_a_version_is_neither_served_nor_compressed_again(method, tmp_path):
    model_folder = tmp_path / "model"
    model_folder.mkdir()
    save(small_llama(), saved_state(small_llama()), model_folder)
    store = Registry(str(tmp_path / "registry"))
    version = store.publish("small", str(model_folder), {"compression": {"method": method}})
    with pytest.raises(RayllmError, match="which no vLLM model class loads.*serve its parent"):
        check_servable(version, on_gpu=True, cpus=local_cpus())
    config = CompressConfig(source="small:1", registry=store.url)
    with pytest.raises(RayllmError, match="compress its parent instead"):
        config.source_version()
