"""The README's compression commands on the session's model (the lifecycle's tiny model in the
S3 registry, its shard set): GPTQ int4 through the README's `ray job submit`, w8a8 and channel
pruning from the command line, each published with the source as its parent and its sizes and
losses; `rayllm eval` loads the int4 version back with transformers and measures the loss the
compressor recorded; the README's distillation trains a student against it; its low-rank and
weight-shared versions run in transformers and are refused by serving. Bad input is refused
with exit 2 and nothing published. (The session's served app rolls onto a quantized version in
tests/serve/test_rollout.py.)"""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rayllm.compress.calibration import token_rows
from rayllm.data.config import TokenizerConfig
from rayllm.data.shards import load_manifest, read_shard
from rayllm.data.tokenizer import load_tokenizer, tokenizer_vocabulary, train_tokenizer
from rayllm.errors import RayllmError
from rayllm.registry.store import Registry
from tests.conftest import overrides, publish_random_model
from tests.test_cli import rayllm, rayllm_ok
from tests.test_jobs import readme_job, run_job
from tests.test_readme import REDUCED, block_with, commands

pytestmark = pytest.mark.slow

MODEL = "tiny-shakespeare"


def test_the_readme_compressions_publish_measured_versions(tiny_run, ray_cluster, tmp_path):
    root = tiny_run["settings"]["registry"]["root"]
    source = tiny_run["report"]["registry"]["ref"]
    data = str(tiny_run["workdir"] / "data")
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"], "RAYLLM_REGISTRY": root}
    block = commands(block_with("rayllm compress --config"))
    verbs = ["registry", "data", "compress", "compress", "compress", "serve"]
    assert [args[0] for args in block] == verbs
    # the import, data and serve lines: tests/registry, the lifecycle, tests/serve
    _, _, _, w8a8, pruning, _ = block
    small = {"source": source, "data": data, "calibration_rows": 32, "eval_rows": 24}
    registry = Registry(root)

    def published(name: str) -> dict:
        lineage = registry.resolve(f"{name}:1").lineage
        assert lineage["parent"] == source
        compression = lineage["compression"]
        assert compression["bytes_after"] < compression["bytes_before"]
        assert lineage["metrics"]["eval_tokens"] == 24 * 64  # rows of 65: inputs, targets
        return lineage

    job = readme_job("jobs/compress.py", str(tmp_path))  # the README's GPTQ int4 recipe
    settings = small | {"registry": root, "name": f"{MODEL}-w4a16"}
    # The three read only the source: side by side (one launch alone leaves a core idle while
    # its processes start).
    with ThreadPoolExecutor(max_workers=2) as pool:
        gptq = pool.submit(run_job, ray_cluster["dashboard"], *job, *overrides(settings))
        w8a8_name = small | {"name": f"{MODEL}-w8a8"}
        w8a8_out = pool.submit(rayllm_ok, *w8a8, *overrides(w8a8_name), env=env)
        # The pruned version is named by default.
        pruning_out = pool.submit(rayllm_ok, *pruning, *overrides(small), env=env)
    logs, _ = gptq.result()
    assert f"published {MODEL}-w4a16:1" in logs, logs
    int4 = published(f"{MODEL}-w4a16")
    assert int4["compression"]["quantization"] == {
        "scheme": "w4a16",
        "group_size": 64,
        "algorithm": "gptq",
        "dampening": 0.01,
        "block_size": 128,
    }
    assert int4["compression"]["calibration_rows"] == 32
    assert int4["compression"]["bytes_after"] < 0.75 * int4["compression"]["bytes_before"]
    again = rayllm("compress", *overrides(small | {"source": f"{MODEL}-w4a16:1"}), env=env)
    assert again.returncode == 2 and "is quantized; compress its parent instead" in again.stderr

    assert f"published {MODEL}-w8a8:1" in w8a8_out.result()
    assert published(f"{MODEL}-w8a8")["compression"]["quantization"]["scheme"] == "w8a8"

    assert f"published {MODEL}-pruned-channels:1" in pruning_out.result()
    pruned = published(f"{MODEL}-pruned-channels")
    assert pruned["compression"]["intermediate_size"] == 96  # 128 channels less a quarter

    # transformers loads the int4 version from the registry and measures what was recorded
    scored = rayllm_ok(
        "eval",
        *overrides({"model": f"{MODEL}-w4a16:1", "data": data, "max_rows": 24, "batch_size": 8}),
        env=env,
    )
    assert f"{MODEL}-w4a16:1: held-out perplexity" in scored
    recorded = registry.resolve(f"{MODEL}-w4a16:1")
    assert recorded.manifest["evaluations"]["perplexity"]["val_loss"] == pytest.approx(
        int4["metrics"]["val_loss"], rel=1e-4
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"quantize.group_size": 48}, "does not divide the input size of layers of [64, 128]"),
        ({"source": "no-such-model"}, "no-such-model"),
    ],
)
def test_bad_compressions_are_refused_and_publish_nothing(tiny_run, ray_cluster, settings, message):
    """A refusal from inside the Ray task (the layers' sizes are known once the model is read)
    reaches the command line as one line, as one before the task does."""
    root = tiny_run["settings"]["registry"]["root"]
    source = tiny_run["report"]["registry"]["ref"]
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"], "RAYLLM_REGISTRY": root}
    registry = Registry(root)
    models = {name: registry.versions(name) for name in registry.models()}
    given = {"source": source, "data": str(tiny_run["workdir"] / "data")} | settings
    done = rayllm("compress", *overrides(given), env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 2 and message in output, output
    assert "Traceback" not in output
    assert {name: registry.versions(name) for name in registry.models()} == models


def test_calibration_text_is_the_models_tokens_and_too_little_is_refused(tiny_run, tmp_path):
    """Rows of the shards' own tokenizer come as they are; for another tokenizer the text is
    decoded and re-tokenized into rows of the same length."""
    data = str(tiny_run["workdir"] / "data")
    own = load_tokenizer(f"{data}/tokenizer")
    rows = token_rows(data, "train", 8, own, "calibration_rows")
    assert rows.shape == (8, 65) and torch.equal(rows[0], torch.from_numpy(first_row(data)))
    texts = [own.decode(row, skip_special_tokens=True) for row in rows.tolist()]
    other = train_tokenizer(texts * 4, TokenizerConfig(kind="bpe", vocab_size=300))
    retokenized = token_rows(data, "train", 4, other, "calibration_rows")
    assert retokenized.shape == (4, 65) and int(retokenized.max()) < len(other)
    assert other.decode(retokenized[0][:8].tolist()) in " ".join(texts)
    with pytest.raises(RayllmError, match="fewer than the 100000 calibration_rows asks for"):
        token_rows(data, "train", 100000, own, "calibration_rows")


def first_row(data: str):
    manifest = load_manifest(data)
    return read_shard(data, manifest["shards"]["train"][0])[0].astype("int64")


def test_the_readme_distillation_curates_with_the_teachers_tokenizer_and_trains_a_student(
    tiny_run, ray_cluster, tmp_path
):
    """The README's two lines, the session's model as the teacher: the shards are cut with its
    tokenizer, and a one-layer student trains on them against its logits (a few steps, DDP
    on 2 workers) and is published with the teacher as its parent."""
    root = tiny_run["settings"]["registry"]["root"]
    source = tiny_run["report"]["registry"]["ref"]
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"], "RAYLLM_REGISTRY": root}
    registry = Registry(root)
    _, teacher = registry.local_path(source)
    curate, distill = commands(block_with("--set method=distill"))
    ours = {
        "rayllm-work/registry/smollm2/versions/1": str(teacher),
        "rayllm-work/data-bible-smollm2": str(tmp_path / "data"),
        "smollm2": source,
        "distill.student.n_layers=8": "distill.student.n_layers=1",
    }

    def ours_in(args: list[str]) -> list[str]:
        return [next((arg.replace(k, v) for k, v in ours.items() if k in arg), arg) for arg in args]

    reduced = {k: v for k, v in REDUCED["data"].items() if k != "tokenizer"}
    rayllm_ok(*ours_in(curate), *overrides(reduced), env=env)
    shards = load_manifest(str(tmp_path / "data"))
    assert tokenizer_vocabulary(f"{tmp_path}/data/{shards['tokenizer']}") == tokenizer_vocabulary(
        str(teacher)
    )

    train = {"steps": 6, "micro_batch_size": 2, "cpus_per_worker": 0.5, "log_every": 3}
    train |= {"eval_every": 6, "eval_batches": 1, "checkpoint_every": 6}
    train |= {"storage": str(tmp_path / "runs")}
    small = {"eval_rows": 8, "distill": {"train": train}}
    out = rayllm_ok(*ours_in(distill), *overrides(small), env=env)
    assert f"published {MODEL}-distilled:1" in out, out
    student = registry.resolve(f"{MODEL}-distilled:1")
    lineage = student.lineage
    assert lineage["parent"] == source
    distillation = lineage["compression"]["distillation"]
    assert distillation["student"]["n_layers"] == 1 and distillation["steps"] == 6
    assert distillation["parameters"] < distillation["teacher_parameters"]
    assert distillation["alpha"] == 0.5 and distillation["temperature"] == 2.0
    assert distillation["init"] == "teacher_layers"  # the default: the teacher's last layer
    assert lineage["compression"]["bytes_after"] < lineage["compression"]["bytes_before"]
    assert lineage["metrics"]["eval_tokens"] == 8 * 64
    _, folder = registry.local_path(student.ref)
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 1


def test_the_readme_low_rank_and_sharing_publish_versions_transformers_runs_and_vllm_refuses(
    tiny_run, ray_cluster
):
    """The README's three lines on the session's model (recovery shortened): a factorised and
    a weight-shared version, each smaller than the source and recovered by a few steps;
    `rayllm eval` runs the factorised one in transformers and measures the loss recorded;
    `rayllm serve` and `rayllm compress` refuse them before anything starts."""
    root = tiny_run["settings"]["registry"]["root"]
    source = tiny_run["report"]["registry"]["ref"]
    data = str(tiny_run["workdir"] / "data")
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"], "RAYLLM_REGISTRY": root}
    registry = Registry(root)
    low_rank, share, score = commands(block_with("--set method=low_rank"))
    small = {"source": source, "data": data, "calibration_rows": 32, "eval_rows": 24}
    small |= {"recovery": {"steps": 3, "rows_per_step": 4}}
    with ThreadPoolExecutor(max_workers=2) as pool:  # both read only the source
        outs = [
            pool.submit(rayllm_ok, *line, *overrides(small), env=env) for line in (low_rank, share)
        ]
    for out, name in zip(outs, (f"{MODEL}-low-rank", f"{MODEL}-shared"), strict=True):
        assert f"published {name}:1" in out.result()
        lineage = registry.resolve(f"{name}:1").lineage
        assert lineage["parent"] == source
        compression = lineage["compression"]
        assert compression["bytes_after"] < compression["bytes_before"]
        assert compression["recovery"]["steps"] == 3
        assert lineage["metrics"]["eval_tokens"] == 24 * 64
    factorised = registry.resolve(f"{MODEL}-low-rank:1").lineage["compression"]
    assert factorised["low_rank"]["calibrated"] and factorised["factorised_layers"] > 0
    _, folder = registry.local_path(f"{MODEL}-low-rank:1")
    assert json.loads((folder / "config.json").read_text())["auto_map"] == {
        "AutoModelForCausalLM": "modeling_rayllm.RayllmLlamaForCausalLM"
    }
    assert registry.resolve(f"{MODEL}-shared:1").lineage["compression"]["stored_layers"] == 1

    given = {"model": f"{MODEL}-low-rank:1", "data": data, "max_rows": 24, "batch_size": 8}
    scored = rayllm_ok(*score, *overrides(given), env=env)
    assert f"{MODEL}-low-rank:1: held-out perplexity" in scored
    recorded = registry.resolve(f"{MODEL}-low-rank:1").manifest["evaluations"]["perplexity"]
    assert recorded["val_loss"] == pytest.approx(
        registry.resolve(f"{MODEL}-low-rank:1").lineage["metrics"]["val_loss"], rel=1e-4
    )

    for args, message in (
        (["serve", "--set", f"model={MODEL}-low-rank:1"], "which no vLLM model class loads"),
        (
            ["compress", *overrides(small | {"source": f"{MODEL}-shared:1", "method": "share"})],
            "compress its parent",
        ),
    ):
        done = rayllm(*args, env=env)
        assert done.returncode == 2 and message in done.stderr, done.stdout + done.stderr
        assert "Traceback" not in done.stderr


def test_the_readme_recovery_on_ray_train_trains_the_pruned_model_on_workers(
    tiny_run, ray_cluster, tmp_path
):
    """The README's line on the session's model (its shards are in its own tokenizer): the
    pruned model is staged, trained a few steps by 2 DDP workers of the trainer, measured and
    published, smaller than the source and better than it was pruned."""
    root = tiny_run["settings"]["registry"]["root"]
    source = tiny_run["report"]["registry"]["ref"]
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"], "RAYLLM_REGISTRY": root}
    registry = Registry(root)
    (line,) = commands(block_with("--set recovery.workers=2"))
    ours = {"source=smollm2": f"source={source}", "recovery.steps=30": "recovery.steps=6"}
    ours["data=rayllm-work/data-bible-smollm2"] = f"data={tiny_run['workdir'] / 'data'}"
    recovery = {"learning_rate": 1e-3, "rows_per_step": 4, "cpus_per_worker": 0.5}
    small = {"name": f"{MODEL}-recovered", "calibration_rows": 16, "eval_rows": 16}
    small |= {"recovery": recovery | {"storage": str(tmp_path / "runs")}}
    out = rayllm_ok(*(ours.get(arg, arg) for arg in line), *overrides(small), env=env)
    assert f"published {MODEL}-recovered:1" in out, out
    lineage = registry.resolve(f"{MODEL}-recovered:1").lineage
    assert lineage["parent"] == source
    compression = lineage["compression"]
    assert compression["bytes_after"] < compression["bytes_before"]
    assert compression["pruning"]["structure"] == "channels"
    recovered = compression["recovery"]
    assert (recovered["workers"], recovered["steps"]) == (2, 6)
    assert recovered["checkpoint"].startswith(str(tmp_path / "runs"))
    assert lineage["metrics"]["val_loss"] < recovered["pruned_val_loss"]
    assert not (tmp_path / "runs" / f"{MODEL}-recovered-recovery-start").exists()
    _, folder = registry.local_path(f"{MODEL}-recovered:1")
    _, source_folder = registry.local_path(source)
    config, source_config = (
        json.loads((path / "config.json").read_text()) for path in (folder, source_folder)
    )
    assert config["intermediate_size"] == source_config["intermediate_size"] * 3 // 4


def test_a_model_with_pruned_heads_recovers_on_ray_train(tiny_run, ray_cluster, tmp_path):
    """Heads pruned from a model with two KV groups leave heads narrower than dim / heads
    (``head_dim`` kept): the trainer's worker computes that shape from the staged weights, and
    the recovered version keeps it."""
    root = tiny_run["settings"]["registry"]["root"]
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"], "RAYLLM_REGISTRY": root}
    registry = Registry(root)
    wide = publish_random_model(tiny_run, f"{MODEL}-wide", tmp_path / "wide")

    settings = {
        "source": wide,
        "data": str(tiny_run["workdir"] / "data"),
        "method": "prune",
        "prune": {"structure": "heads", "sparsity": 0.5},
        "calibration_rows": 8,
        "eval_rows": 16,
        "recovery": {
            "steps": 4,
            "workers": 1,
            "rows_per_step": 4,
            "learning_rate": 1e-3,
            "cpus_per_worker": 0.5,
            "storage": str(tmp_path / "runs"),
        },
    }
    out = rayllm_ok("compress", *overrides(settings), env=env)
    assert f"published {MODEL}-wide-pruned-heads:1" in out, out
    lineage = registry.resolve(f"{MODEL}-wide-pruned-heads:1").lineage
    assert lineage["compression"]["recovery"]["workers"] == 1
    assert lineage["metrics"]["val_loss"] < lineage["compression"]["recovery"]["pruned_val_loss"]
    _, pruned = registry.local_path(f"{MODEL}-wide-pruned-heads:1")
    config = json.loads((pruned / "config.json").read_text())
    heads = (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"])
    assert heads == (2, 1, 32) and config["hidden_size"] == 128
