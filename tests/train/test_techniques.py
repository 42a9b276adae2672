"""Recomputation and gradient accumulation change memory and batch shape, never the gradients;
a head tied to the embedding stays one matrix through training, checkpoint and export; QLoRA
holds its frozen base in 4 bits."""

import pytest
import torch
import torch.distributed as dist

# torchao keys NF4's override of F.linear by the function F.linear is when torchao is imported:
# import it before DeepSpeed's ZeRO-3 (the tied-head test's) replaces F.linear in this process.
import torchao.quantization  # noqa: F401
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from rayllm.errors import RayllmError
from rayllm.model.config import ModelConfig
from rayllm.model.hf import read_hf_model, save_hf_model
from rayllm.model.model import Transformer, next_token_loss
from rayllm.train.checkpoint import consolidate, run_layout, trained_model, write_progress
from rayllm.train.config import TrainConfig
from rayllm.train.engine import TorchEngine, build_engine, build_model
from rayllm.train.lora import save_adapter
from rayllm.train.mesh import mesh_shape
from rayllm.train.metrics import held_bytes
from rayllm.train.parallelize import apply_recompute
from rayllm.train.trainer import worker_env
from tests.conftest import free_port

MODEL = {"vocab_size": 128, "dim": 64, "n_layers": 4, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 128}


@pytest.fixture(scope="module")
def one_rank():
    """A process group of one: the engine's mesh needs one even on a single process."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def batch(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(
        0, MODEL["vocab_size"], (rows, 33), generator=torch.Generator().manual_seed(1)
    )
    return tokens[:, :-1], tokens[:, 1:]


def gradients(every: int | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.model_validate(MODEL))
    if every:
        apply_recompute(model, every)
    inputs, targets = batch(4)
    next_token_loss(model(inputs), targets).backward()
    return {name: param.grad for name, param in model.named_parameters()}


@pytest.mark.parametrize("every", [1, 2])
def test_recomputed_layers_give_the_same_gradients(every):
    plain, recomputed = gradients(None), gradients(every)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], msg=name)


def test_accumulated_micro_batches_give_the_same_step(one_rank):
    inputs, targets = batch(8)
    outcomes = []
    for micro, accum in ((8, 1), (4, 2), (2, 4)):
        config = TrainConfig.model_validate(
            {
                "num_workers": 1,
                "model": MODEL,
                "micro_batch_size": micro,
                "grad_accum_steps": accum,
                "parallel": {"strategy": "ddp"},
            }
        )
        torch.manual_seed(0)
        engine = TorchEngine(config, mesh_shape(config), torch.device("cpu"))
        window = [
            (inputs[i * micro : (i + 1) * micro], targets[i * micro : (i + 1) * micro])
            for i in range(accum)
        ]
        loss, norm = engine.train_step(window)
        outcomes.append((loss.item(), norm, dict(engine.parts[0].state_dict())))
    loss, norm, weights = outcomes[0]
    for other_loss, other_norm, other_weights in outcomes[1:]:
        assert other_loss == pytest.approx(loss, rel=1e-5)
        assert other_norm == pytest.approx(norm, rel=1e-5)
        for name in weights:
            torch.testing.assert_close(other_weights[name], weights[name], msg=name)


def test_bf16_trains_close_to_fp32(one_rank):
    """bf16 compute (autocast for ddp, FSDP2's policy for fsdp) keeps fp32 weights and lands
    near the fp32 loss."""
    inputs, targets = batch(8)
    losses = {}
    for strategy in ("ddp", "fsdp"):
        for precision in ("fp32", "bf16"):
            config = TrainConfig.model_validate(
                {
                    "num_workers": 1,
                    "model": MODEL,
                    "precision": precision,
                    "parallel": {"strategy": strategy},
                }
            )
            torch.manual_seed(0)
            engine = TorchEngine(config, mesh_shape(config), torch.device("cpu"))
            for _ in range(3):
                loss, _ = engine.train_step([(inputs, targets)])
            assert all(p.dtype == torch.float32 for p in engine.parameters())
            losses[strategy, precision] = loss.item()
        assert losses[strategy, "bf16"] == pytest.approx(losses[strategy, "fp32"], rel=2e-2)
        assert losses[strategy, "bf16"] != losses[strategy, "fp32"]  # bf16 did compute


def test_fsdp_offload_applies_on_one_rank_and_trains_as_the_plain_model(one_rank):
    """One GPU with CPU offload is how a model too big for that GPU trains, so at one rank
    ``fsdp_offload`` still wraps the model in FSDP2 (which then holds parameters, gradients and
    optimizer state on the CPU); plain ``fsdp`` at one rank has nothing to shard."""
    inputs, targets = batch(8)
    losses = {}
    for offload in (False, True):
        config = TrainConfig.model_validate(
            {
                "num_workers": 1,
                "model": MODEL,
                "parallel": {"strategy": "fsdp", "fsdp_offload": offload},
            }
        )
        torch.manual_seed(0)
        engine = TorchEngine(config, mesh_shape(config), torch.device("cpu"))
        for _ in range(3):
            loss, _ = engine.train_step([(inputs, targets)])
        losses[offload] = loss.item()
        assert isinstance(engine.parts[0], FSDPModule) is offload
        assert all(isinstance(p, DTensor) is offload for p in engine.parameters())
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.parametrize(
    "parallel", [{"strategy": "ddp"}, {"strategy": "fsdp"}, {"strategy": "zero", "zero_stage": 3}]
)
def test_a_tied_head_trains_as_one_matrix_and_exports_tied(
    one_rank, tmp_path, monkeypatch, parallel
):
    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed's launcher would have set it
    for name, value in worker_env().items():  # a training worker's: DeepSpeed's ops prebuilt
        monkeypatch.setenv(name, value)
    tied = MODEL | {"tie_embeddings": True}
    config = TrainConfig.model_validate({"num_workers": 1, "model": tied, "parallel": parallel})
    torch.manual_seed(0)
    engine = build_engine(config, mesh_shape(config), torch.device("cpu"))
    inputs, targets = batch(4)
    first, _ = engine.train_step([(inputs, targets)])
    for _ in range(2):
        loss, _ = engine.train_step([(inputs, targets)])
    assert loss < first
    checkpoint = tmp_path / "checkpoint"
    engine.save(checkpoint)
    write_progress(checkpoint, 3, run_layout(config, "", {"seq_len": 32, "eos_token_id": 0}))
    shape, state, _ = consolidate(checkpoint)
    assert shape.tie_embeddings and torch.equal(
        state["lm_head.weight"], state["embed_tokens.weight"]
    )
    save_hf_model(tmp_path / "hf", shape, state, bos_token_id=0, eos_token_id=0)
    exported_shape, exported = read_hf_model(str(tmp_path / "hf"))
    model = Transformer(exported_shape)
    model.load_state_dict(exported)
    assert model.lm_head.weight is model.embed_tokens.weight
    with torch.no_grad():
        assert next_token_loss(model(inputs), targets) < first


def test_a_tied_start_trains_untied_from_a_copy_of_its_embedding(tmp_path):
    """init_from a tied model into an untied shape (what tensor parallelism needs): the head
    starts as the embedding's values in a matrix of its own; the other way is refused."""
    tied = ModelConfig(**MODEL, tie_embeddings=True)
    torch.manual_seed(0)
    start = Transformer(tied).eval()
    save_hf_model(tmp_path / "tied", tied, start.state_dict(), bos_token_id=0, eos_token_id=0)
    untied = {"num_workers": 1, "model": MODEL, "init_from": str(tmp_path / "tied")}
    model = build_model(TrainConfig.model_validate(untied), torch.device("cpu")).eval()
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, start.embed_tokens.weight)
    inputs, _ = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), start(inputs))
    save_hf_model(
        tmp_path / "untied",
        ModelConfig(**MODEL),
        model.state_dict(),
        bos_token_id=0,
        eos_token_id=0,
    )
    retied = {"num_workers": 1, "model": tied.model_dump(), "init_from": str(tmp_path / "untied")}
    with pytest.raises(RayllmError, match="has the shape"):
        build_model(TrainConfig.model_validate(retied), torch.device("cpu"))


def test_qlora_holds_the_frozen_base_in_4_bits_and_its_adapter_fits_the_full_base(
    one_rank, tmp_path, monkeypatch
):
    """QLoRA (``lora.quantize_base``): the decoder blocks' frozen linear weights are NF4 on the
    rank, the adapters train against them, and the checkpoint consolidates into an adapter
    that peft loads onto the full-precision base, computing what the trained adapters do."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # DeepSpeed's ZeRO-3 (the tied-head test's, in this process) replaces F.linear for good,
    # and NF4 weights are dequantized by F.linear's own override (a QLoRA worker runs DDP only).
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)

    shape = ModelConfig.model_validate(MODEL)
    torch.manual_seed(0)
    save_hf_model(
        tmp_path / "base", shape, Transformer(shape).state_dict(), bos_token_id=0, eos_token_id=0
    )
    inputs, targets = batch(4)
    runs = {}
    for quantize in (False, True):
        config = TrainConfig.model_validate(
            {
                "num_workers": 1,
                "model": MODEL,
                "init_from": str(tmp_path / "base"),
                "lora": {"r": 4, "quantize_base": quantize},
                "parallel": {"strategy": "ddp"},
                "learning_rate": 0.01,
                "warmup_steps": 0,
            }
        )
        torch.manual_seed(0)
        engine = TorchEngine(config, mesh_shape(config), torch.device("cpu"))
        losses = [engine.train_step([(inputs, targets)])[0].item() for _ in range(3)]
        runs[quantize] = config, engine, losses

    def frozen_linear_bytes(engine: TorchEngine) -> int:
        return held_bytes(
            p
            for name, p in engine.parts[0].named_parameters()
            if name.startswith("layers.") and p.dim() == 2 and not p.requires_grad
        )

    (_, full, full_losses), (config, qlora, losses) = runs[False], runs[True]
    assert frozen_linear_bytes(qlora) < frozen_linear_bytes(full) / 6  # 4 bits + scales vs 32
    assert qlora.held_memory()["params"] < full.held_memory()["params"] / 2
    assert losses[0] != full_losses[0] and losses[0] == pytest.approx(full_losses[0], abs=0.05)
    assert losses[-1] < losses[0]

    qlora.save(tmp_path / "checkpoint")
    layout = run_layout(config, "", {"seq_len": 32, "eos_token_id": 0})
    write_progress(tmp_path / "checkpoint", 3, layout)
    _, state, progress = consolidate(tmp_path / "checkpoint")
    model = trained_model(progress["layout"])
    model.load_state_dict(state)
    save_adapter(model, config.lora, tmp_path / "adapter", base=str(tmp_path / "base"))
    served = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )

    unquantized = config.lora.model_copy(update={"quantize_base": False})
    reference = build_model(config.model_copy(update={"lora": unquantized}), torch.device("cpu"))
    adapters = {n: p for n, p in qlora.parts[0].named_parameters() if p.requires_grad}
    assert set(adapters) <= set(reference.state_dict())
    reference.load_state_dict(adapters, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(served(inputs).logits, reference(inputs), atol=1e-4, rtol=0)
        base_alone = AutoModelForCausalLM.from_pretrained(tmp_path / "base")(inputs).logits
        assert not torch.allclose(served(inputs).logits, base_alone, atol=1e-3)  # it trained


def test_qlora_trains_with_ddp_only():
    with pytest.raises(ValueError, match="quantize_base .QLoRA. trains with parallel.strategy=ddp"):
        TrainConfig(lora={"quantize_base": True}, parallel={"strategy": "fsdp"})
