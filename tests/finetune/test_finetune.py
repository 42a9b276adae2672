"""The README's fine-tuning and evaluation commands, on the session's served model (the
lifecycle's tiny model in the S3 registry, served with ``max_loras=2``): LoRA over DDP
publishes an adapter of that version, which the running app answers with at once, and which
merges into a full version; QLoRA trains the same adapters over the base held in 4 bits; the
same LoRA under ZeRO-3 follows DDP's losses; the full fine-tune under FSDP2 publishes a whole
model; DPO on preference pairs (over 2 pipeline stages) publishes an adapter too, and prompt
and prefix tuning ones the app refuses to serve and rayllm eval scores. Each lowers its
held-out loss (prompt and prefix tuning keep it, within noise, on this model). The adapter is
scored through the endpoint, the base in Ray tasks with few-shot chain-of-thought prompts; both
results land in their manifests, and the gate they miss refuses the promotion until it is
forced. Bad input is refused before any worker starts."""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from rayllm.finetune.examples import built_preferences, read_conversations
from rayllm.registry.store import Registry
from tests.conftest import API_KEYS, TINY_MODEL, overrides, publish_random_model
from tests.test_cli import rayllm, rayllm_ok
from tests.test_jobs import readme_job, run_job
from tests.test_readme import block_with, commands

pytestmark = pytest.mark.slow

MODEL = "tiny-shakespeare"


def test_the_readme_finetunes_publish_versions_the_served_app_answers_with(
    tiny_run, ray_cluster, tmp_path
):
    root = tiny_run["settings"]["registry"]["root"]
    base = tiny_run["report"]["registry"]["ref"]
    url = tiny_run["report"]["serve"]["url"]
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"], "COLUMNS": "200"}
    block = commands(block_with("rayllm finetune --config"))
    assert [args[0] for args in block] == [
        "registry",
        "finetune",
        "finetune",
        "finetune",
        "finetune",
        "finetune",
        "finetune",
        "registry",
        "serve",
        "chat",
    ]
    _, lora, qlora, dpo, full, prompt, prefix, merge, _, chat = (
        block  # the import and serve lines: tests/registry, the session app
    )
    small = {
        "base": base,
        "registry": root,
        "seq_len": 96,
        "train": {
            "steps": 4,
            "cpus_per_worker": 0.5,
            "learning_rate": 0.003,
            "log_every": 2,
            "eval_every": 4,
            "eval_batches": 2,
            "checkpoint_every": 4,
            "storage": str(tmp_path / "runs"),
        },
    }
    registry = Registry(root)

    def finetune(
        args: list[str], name: str, job: bool = False, data: str = "", noise: float = 0, **train
    ) -> dict:
        settings = small | {"name": name, "train": small["train"] | {"run_name": name} | train}
        settings |= {"data": data, "held_out": 0.1} if data else {}
        if job:  # the README's `ray job submit` of jobs/finetune.py
            out, _ = run_job(ray_cluster["dashboard"], *args, *overrides(settings))
        else:
            out = rayllm_ok(*args, *overrides(settings), env=env, timeout=900)
        assert f"published {name}:1" in out, out
        lineage = registry.resolve(f"{name}:1").lineage
        assert lineage["parent"] == base
        metrics = lineage["metrics"]
        assert metrics["val_loss"] < metrics["base_val_loss"] + noise
        return lineage

    pairs = tmp_path / "pairs.jsonl"  # the reward-model format, from the chat corpus's answers
    built = built_preferences(read_conversations("chat"), seed=0)[:160]
    pairs.write_text(
        "".join(
            json.dumps({"prompt": p[-1]["content"], "chosen": c, "rejected": r}) + "\n"
            for p, c, r in built
        )
    )
    adapter_eval, base_eval, gate, promote = commands(block_with("rayllm registry gate"))
    key = API_KEYS.split(",")[0]
    scoring = env | {"RAYLLM_REGISTRY": root, "RAYLLM_API_KEY": key}

    def ours(args: list[str]) -> list[str]:
        mapped = (a.replace("http://127.0.0.1:8000", url) for a in args)
        return [a.replace("smollm2-chat", f"{MODEL}-chat").replace("smollm2", base) for a in mapped]

    # The seven runs share only their base, and the base's evaluation reads only the base: two
    # at a time (one alone leaves this machine's two cores idle a third of the time, while its
    # processes start), the evaluation last, beside the seventh run.
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {
            "lora": pool.submit(finetune, lora, f"{MODEL}-chat"),
            "qlora": pool.submit(finetune, qlora, f"{MODEL}-qlora"),
            "zero3": pool.submit(  # the README's `ray job submit` of jobs/finetune.py
                finetune,
                readme_job("jobs/finetune.py", str(tmp_path)),
                f"{MODEL}-chat-zero3",
                job=True,
                parallel={"strategy": "zero", "zero_stage": 3},
            ),
            # Over 2 pipeline stages: the reference log-probabilities come from the last stage.
            "dpo": pool.submit(
                finetune,
                dpo,
                f"{MODEL}-dpo",
                data=str(pairs),
                parallel={"strategy": "ddp", "pp": 2},
            ),
            "full": pool.submit(finetune, full, f"{MODEL}-sft"),  # its own: method full, FSDP2
            # Prompt tuning: 20 virtual tokens of the model's width. The session's model, a few
            # steps from unigram statistics, reads too little of its context for them to move
            # its held-out loss beyond noise (measured: -0.003 to +0.008 over learning rates
            # and steps): they must only not harm it. tests/finetune/test_prompt.py shows
            # them learning, on a base whose answers they can change.
            "prompt": pool.submit(finetune, prompt, f"{MODEL}-prompt", noise=0.02),
            "prefix": pool.submit(
                finetune, prefix, f"{MODEL}-prefix", noise=0.02, learning_rate=0.03
            ),
        }
        few = ["--set", "max_examples=4", "--set", "workers=2"]
        base_scores = pool.submit(rayllm_ok, *ours(base_eval), *few, env=scoring)
    adapter = runs["lora"].result()
    assert adapter["adapter"]["peft_type"] == "LORA"
    assert adapter["finetune"]["trainable_parameters"] < 10_000
    assert adapter["finetune"]["examples"]["examples"] > 1000  # the built-in chat corpus
    refused = rayllm("finetune", "--set", f"base={MODEL}-chat", env={"RAYLLM_REGISTRY": root})
    assert refused.returncode == 2 and "is an adapter" in refused.stdout + refused.stderr

    # The adapter merged into its base: a full version computing what peft's adapter does.
    merged = rayllm_ok(
        *(a.replace("smollm2", MODEL) for a in merge), env=env | {"RAYLLM_REGISTRY": root}
    )
    assert f"published {MODEL}-chat-merged:1: {MODEL}-chat:1 merged into {base}" in merged
    assert registry.resolve(f"{MODEL}-chat-merged:1").lineage["parent"] == f"{MODEL}-chat:1"
    _, base_folder = registry.local_path(base)
    _, adapter_folder = registry.local_path(f"{MODEL}-chat:1")
    _, merged_folder = registry.local_path(f"{MODEL}-chat-merged:1")
    plain = AutoModelForCausalLM.from_pretrained(base_folder)
    tokens = torch.randint(0, plain.config.vocab_size, (2, 24))
    with torch.no_grad():
        unadapted = plain(tokens).logits
        expected = PeftModel.from_pretrained(plain, adapter_folder)(tokens).logits
        got = AutoModelForCausalLM.from_pretrained(merged_folder)(tokens).logits
    assert not torch.allclose(expected, unadapted, atol=1e-4)  # the adapter changes the model
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    # QLoRA: the same adapters over a base held in 4 bits on each of the 2 DDP ranks.
    quantized = runs["qlora"].result()
    assert quantized["finetune"]["settings"]["lora"]["quantize_base"] is True
    assert (
        quantized["finetune"]["trainable_parameters"] == adapter["finetune"]["trainable_parameters"]
    )
    assert quantized["metrics"]["base_val_loss"] != adapter["metrics"]["base_val_loss"]
    assert quantized["metrics"]["base_val_loss"] == pytest.approx(
        adapter["metrics"]["base_val_loss"], abs=0.1
    )

    zero3 = runs["zero3"].result()  # ZeRO-3 follows DDP's run
    for key in ("base_val_loss", "val_loss", "loss"):
        assert zero3["metrics"][key] == pytest.approx(adapter["metrics"][key], abs=1e-4)

    preferred = runs["dpo"].result()
    assert preferred["finetune"]["objective"] == "dpo" and preferred["adapter"]["r"] == 8
    assert preferred["metrics"]["base_val_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert 0 <= preferred["metrics"]["preference_accuracy"] <= 1

    whole = runs["full"].result()
    assert "adapter" not in whole and whole["finetune"]["method"] == "full"
    assert whole["finetune"]["trainable_parameters"] > 100_000
    with registry.fs.open(
        f"{registry.version_url(registry.resolve(f'{MODEL}-sft:1'))}/config.json"
    ) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]

    prompted = runs["prompt"].result()
    assert prompted["adapter"] == {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 20}
    assert prompted["finetune"]["trainable_parameters"] == 20 * TINY_MODEL["dim"]
    # Prefix tuning: 20 keys and values of every layer (one KV head of 32).
    prefixed = runs["prefix"].result()
    assert prefixed["adapter"] == {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 20}
    assert prefixed["finetune"]["trainable_parameters"] == 20 * TINY_MODEL["n_layers"] * 2 * 32

    # The served app answers with the new adapter without a redeploy, pinned to its version.
    session = {"http://127.0.0.1:8000": url, "smollm2:smollm2-chat": f"{MODEL}:{MODEL}-chat"}
    answer = rayllm_ok(
        *(session.get(a, a) for a in chat), "--max-tokens", "6", env=env | {"RAYLLM_API_KEY": key}
    )
    assert answer.strip()
    reply = httpx.post(
        f"{url}/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": f"{MODEL}:{MODEL}-chat", "prompt": "KING.\n", "max_tokens": 2},
        timeout=120,
    )
    assert reply.status_code == 200 and reply.json()["model"] == f"{MODEL}:{MODEL}-chat:1"
    refused = httpx.post(
        f"{url}/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": f"{MODEL}:{MODEL}-prompt", "prompt": "KING.\n", "max_tokens": 2},
        timeout=120,
    )
    assert refused.status_code == 400 and "vLLM serves LoRA only" in refused.text

    env = scoring
    small = ["--set", "max_examples=12", "--set", "max_tokens=12"]
    scored = rayllm_ok(*ours(adapter_eval), *small, env=env)
    assert f"{MODEL}-chat:1: qa: exact match" in scored and "over 12 held-out questions" in scored
    assert f"{MODEL}-chat:1: safety: refusal rate" in scored
    assert f"{MODEL}-chat:1: lm-evaluation-harness (lm-eval " in scored
    assert f"{base}: qa-3shot-cot: exact match" in base_scores.result()
    evaluations = registry.resolve(f"{MODEL}-chat:1").manifest["evaluations"]
    assert (
        set(evaluations) == {"qa", "safety", "harness"} and evaluations["safety"]["examples"] == 24
    )
    assert (
        evaluations["harness"]["examples"] == 12 and 0 <= evaluations["harness"]["exact_match"] <= 1
    )
    assert 0 <= evaluations["qa"]["f1"] <= 1 and 0 <= evaluations["qa"]["bleu"] <= 100
    assert "qa-3shot-cot" in registry.resolve(base).manifest["evaluations"]
    # A prompt-tuning adapter is scored as peft reads it on its base (it does not merge).
    prompt_eval = ["--set", f"model={MODEL}-prompt", "--set", "tasks=[qa]", "--set", "workers=1"]
    scored = rayllm_ok("eval", *prompt_eval, "--set", "max_examples=4", *small[2:], env=env)
    assert f"{MODEL}-prompt:1: qa: exact match" in scored
    assert "qa" in registry.resolve(f"{MODEL}-prompt:1").manifest["evaluations"]

    rayllm_ok(*ours(gate), env=env)  # qa.f1 >= 0.2: beyond a model this small and brief
    refused = rayllm(*ours(promote), env=env)
    assert refused.returncode == 2 and "qa.f1" in refused.stdout + refused.stderr
    forced = rayllm_ok(*ours(promote), "--force", "--reason", "test", env=env)
    assert f"{MODEL}-chat@production: None -> 1" in forced


def test_a_tied_base_fine_tunes_under_tensor_and_pipeline_parallelism(
    tiny_run, ray_cluster, tmp_path
):
    """A base whose head is its embedding (as SmolLM2's is), with the session's tokenizer and
    two KV heads, fully fine-tuned over 2 tensor-parallel ranks and its 2 layers over 2
    pipeline stages (the packed examples' segments passed to each): the matrix trained as one
    (split by vocabulary under tensor parallelism, its two pipeline copies' gradients summed)
    and published tied, and beside it with ``untie_embeddings`` a head of its own starting as
    the embedding's copy."""
    root = tiny_run["settings"]["registry"]["root"]
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"], "RAYLLM_REGISTRY": root}
    registry = Registry(root)
    tied = f"{MODEL}-tied:1"
    if f"{MODEL}-tied" not in registry.models():
        publish_random_model(tiny_run, f"{MODEL}-tied", tmp_path / "tied", tie_embeddings=True)

    def finetune(untie: bool) -> None:
        name = f"{MODEL}-tied-{'untied' if untie else 'tied'}-sft"
        settings = {
            "base": tied,
            "name": name,
            "method": "full",
            "untie_embeddings": untie,
            "seq_len": 96,
            "max_examples": 64,
            "train": {
                "steps": 2,
                "num_workers": 4,
                "micro_batch_size": 2,
                "cpus_per_worker": 0.5,
                "learning_rate": 0.003,
                "parallel": {"strategy": "fsdp", "tp": 2, "pp": 2},
                "log_every": 1,
                "eval_every": 2,
                "eval_batches": 1,
                "checkpoint_every": 2,
                "storage": str(tmp_path / "runs"),
            },
        }
        out = rayllm_ok("finetune", *overrides(settings), env=env, timeout=900)
        assert f"published {name}:1" in out, out
        lineage = registry.resolve(f"{name}:1").lineage
        assert lineage["metrics"]["val_loss"] < lineage["metrics"]["base_val_loss"]
        _, tuned = registry.local_path(f"{name}:1")
        assert json.loads((tuned / "config.json").read_text())["tie_word_embeddings"] is not untie
        with safe_open(tuned / "model.safetensors", "pt") as weights:
            names = list(weights.keys())
            assert ("lm_head.weight" in names) is untie  # a tied head is stored once
            if untie:
                head, embedding = (
                    weights.get_tensor(f"{n}.weight") for n in ("lm_head", "model.embed_tokens")
                )
                assert head.shape == embedding.shape and not torch.equal(head, embedding)

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [pool.submit(finetune, untie) for untie in (False, True)]
    for run in runs:
        run.result()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"base": "no-such-model"}, "no-such-model"),
        ({"base": MODEL, "train": {"model": {"dim": 128}}}, "train.model: set by rayllm finetune"),
        (
            {"base": MODEL, "lora": {"quantize_base": True}, "train": {"parallel": {"tp": 2}}},
            "and tp = pp = 1",
        ),
        ({"base": MODEL, "lora": {"target_modules": ["qkv"]}}, "lora.target_modules"),
        (
            {
                "base": MODEL,
                "lora": {"quantize_base": True},
                "train": {"parallel": {"strategy": "zero"}},
            },
            "trains with parallel.strategy=ddp",
        ),
        ({"base": MODEL, "method": "full", "lora": {"quantize_base": True}}, "needs method lora"),
        (
            {"base": MODEL, "untie_embeddings": True},
            "untie_embeddings trains the output head apart",
        ),
        (
            {"base": MODEL, "method": "full", "untie_embeddings": True},
            "has its own output head already",
        ),
    ],
)
def test_bad_finetunes_are_refused_before_any_worker_starts(tiny_run, settings, message):
    env = {"RAYLLM_REGISTRY": tiny_run["settings"]["registry"]["root"], "RAY_ADDRESS": ""}
    done = rayllm("finetune", *overrides(settings), env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stdout + done.stderr and "Traceback" not in done.stderr
