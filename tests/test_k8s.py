"""``rayllm k8s render``: the manifests under k8s/ are what it writes; every KubeRay object
passes the KubeRay 1.7 CRD schemas strictly (unknown fields refused, as ``kubectl apply
--validate=strict`` does); Ray's resources agree with the pods'; jobs load their recipes; the
RayService serves exactly the file ``rayllm serve --export-config`` wrote, with its keys from a
Secret; and a served app a cluster cannot use is refused before anything is written."""

import json
from pathlib import Path

import pytest
import ray
import yaml

from rayllm.model.config import ModelConfig
from rayllm.model.hf import save_hf_model
from rayllm.model.model import Transformer
from rayllm.registry.store import Registry
from tests.test_cli import rayllm
from tests.test_recipes import REPO, check_job, job_command

CHECKED_IN = REPO / "k8s"
SCHEMAS = REPO / "tests" / "kuberay"


def strict(schema: object) -> object:
    """The CRD schema with unknown fields refused wherever Kubernetes would prune them."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def validate(document: dict) -> None:
    import jsonschema

    kind = document["kind"].lower() + "s"
    schema = json.loads((SCHEMAS / f"{kind}.v1.schema.json").read_text())
    jsonschema.validate(document, strict(schema))


def render(tmp_path: Path, *settings: str) -> dict[str, dict]:
    out = tmp_path / "k8s"
    done = rayllm("k8s", "render", "--out", str(out), *(a for s in settings for a in ("--set", s)))
    assert done.returncode == 0, done.stderr
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted(out.glob("*.yaml"))}


def cluster_of(document: dict) -> dict | None:
    """The RayCluster spec a KubeRay object carries (None: a job on an existing cluster)."""
    spec = document["spec"]
    if document["kind"] == "RayCluster":
        return spec
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig")


def test_the_checked_in_manifests_are_what_the_renderer_writes(tmp_path):
    rendered = tmp_path / "k8s"
    done = rayllm("k8s", "render", "--out", str(rendered))
    assert done.returncode == 0, done.stderr
    names = sorted(path.name for path in rendered.iterdir())
    assert names == sorted(path.name for path in CHECKED_IN.iterdir())
    assert names == [
        "pvc.yaml",
        "raycluster.yaml",
        "rayjob-compress.yaml",
        "rayjob-data.yaml",
        "rayjob-eval.yaml",
        "rayjob-finetune.yaml",
        "rayjob-lifecycle.yaml",
        "rayjob-publish.yaml",
        "rayjob-train.yaml",
        "rayservice.yaml",
    ]
    for name in names:
        assert (rendered / name).read_text() == (CHECKED_IN / name).read_text(), (
            f"k8s/{name} differs from `rayllm k8s render`; run it and commit the result"
        )


@pytest.mark.parametrize("name", sorted(p.name for p in CHECKED_IN.glob("ray*.yaml")))
def test_every_kuberay_object_passes_its_crd_strictly(name):
    document = yaml.safe_load((CHECKED_IN / name).read_text())
    assert document["apiVersion"] == "ray.io/v1"
    validate(document)
    if (cluster := cluster_of(document)) is not None:
        assert cluster["rayVersion"] == ray.__version__
        assert cluster["enableInTreeAutoscaling"] is True
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            params = group["rayStartParams"]
            (container,) = group["template"]["spec"]["containers"]
            limits = container["resources"]["limits"]
            assert container["resources"]["requests"] == limits
            assert params["num-cpus"] == limits["cpu"]
            assert int(params["memory"]) == int(limits["memory"].removesuffix("Gi")) * 2**30
            assert params.get("num-gpus") == limits.get("nvidia.com/gpu")
            claim = group["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]
            assert claim["claimName"] == "rayllm-work"
        assert any("num-gpus" in g["rayStartParams"] for g in cluster["workerGroupSpecs"])


def test_the_volume_claim_the_pods_mount_is_defined():
    claim = yaml.safe_load((CHECKED_IN / "pvc.yaml").read_text())
    assert claim["kind"] == "PersistentVolumeClaim" and claim["apiVersion"] == "v1"
    assert claim["metadata"]["name"] == "rayllm-work"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node reads the registry


@pytest.mark.parametrize("name", sorted(p.name for p in CHECKED_IN.glob("rayjob-*.yaml")))
def test_each_job_runs_its_recipe_through_the_cli(name):
    job = yaml.safe_load((CHECKED_IN / name).read_text())
    check_job(job_command(job["spec"]["entrypoint"]))
    own_cluster = "rayClusterSpec" in job["spec"]
    assert own_cluster != ("clusterSelector" in job["spec"])
    if not own_cluster:
        raycluster = yaml.safe_load((CHECKED_IN / "raycluster.yaml").read_text())
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": raycluster["metadata"]["name"]}


def test_the_jobs_paths_follow_the_volumes_mount(tmp_path):
    files = render(tmp_path, "mount=/data", "serve_app=null")
    jobs = [document for name, document in files.items() if name.startswith("rayjob-")]
    assert len(jobs) == 7
    for job in jobs:
        assert "/data/work" in job["spec"]["entrypoint"]
        assert "/mnt/rayllm" not in json.dumps(job)


def test_the_service_serves_the_exported_app_with_keys_from_a_secret():
    service = yaml.safe_load((CHECKED_IN / "rayservice.yaml").read_text())
    spec = service["spec"]
    assert spec["serveConfigV2"] == (REPO / "cluster" / "serve-app.yaml").read_text()
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    cluster = spec["rayClusterConfig"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert head["env"] == [
        {
            "name": "RAYLLM_API_KEYS",
            "valueFrom": {"secretKeyRef": {"name": "rayllm-api-keys", "key": "keys"}},
        }
    ]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": 8000}
        assert container["livenessProbe"]["httpGet"]["path"] == "/api/local_raylet_healthz"
    app = yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]
    assert app["api_keys_env"] == "RAYLLM_API_KEYS" and app["host"] == "0.0.0.0"


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("k8s-model")
    config = ModelConfig(
        vocab_size=128, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16
    )
    save_hf_model(folder, config, Transformer(config).state_dict(), bos_token_id=0, eos_token_id=0)
    root = str(tmp_path_factory.mktemp("k8s-registry"))
    Registry(root).publish("bard", folder, lineage={})
    return root


def export(registry: str, path: Path, *settings: str) -> Path:
    args = ["serve", "--set", f"registry={registry}", "--set", "model=bard"]
    args += [a for s in settings for a in ("--set", s)]
    done = rayllm(*args, "--export-config", str(path))
    assert done.returncode == 0, done.stderr
    return path


def test_a_users_export_becomes_the_services_serve_config(registry, tmp_path):
    app = export(registry, tmp_path / "app.yaml", "host=0.0.0.0", "api_keys_env=RAYLLM_API_KEYS")
    files = render(tmp_path, f"serve_app={app}", "image=registry.example/rayllm:9")
    service = files["rayservice.yaml"]
    validate(service)
    assert service["spec"]["serveConfigV2"] == app.read_text()
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "registry.example/rayllm:9"
    assert "rayservice.yaml" not in render(tmp_path, "serve_app=null")


def test_a_direct_ingress_app_runs_serve_in_haproxy_mode_on_every_node(registry, tmp_path):
    keyed = ["host=0.0.0.0", "api_keys_env=RAYLLM_API_KEYS"]
    direct = export(registry, tmp_path / "direct.yaml", *keyed, "ingress=direct")
    service = render(tmp_path, f"serve_app={direct}")["rayservice.yaml"]
    validate(service)
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        env = {variable["name"]: variable.get("value") for variable in container["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert env["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure empty-response"
    app = export(registry, tmp_path / "app.yaml", *keyed)
    plain = str(render(tmp_path, f"serve_app={app}"))
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in plain and "RAY_SERVE_HAPROXY_RETRY_ON" not in plain


def test_pods_take_object_storage_credentials_from_a_secret(registry, tmp_path):
    """An s3:// registry: every pod of every object (cluster, jobs' clusters, service) reads
    the credentials from one Secret, and the objects still pass their CRDs."""
    app = export(registry, tmp_path / "app.yaml", "host=0.0.0.0", "api_keys_env=RAYLLM_API_KEYS")
    document = yaml.safe_load(app.read_text())
    document["applications"][0]["args"]["registry"] = "s3://models/registry"
    app.write_text(yaml.safe_dump(document))
    files = render(tmp_path, f"serve_app={app}", "object_storage_secret=rayllm-s3")
    containers = 0
    for name, document in files.items():
        if cluster := cluster_of(document):
            validate(document)
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
                (container,) = group["template"]["spec"]["containers"]
                assert container["envFrom"] == [{"secretRef": {"name": "rayllm-s3"}}], name
                containers += 1
    assert containers == 3 * 3  # the RayCluster's, the lifecycle job's and the service's
    assert "envFrom" not in (CHECKED_IN / "raycluster.yaml").read_text()  # none by default


@pytest.mark.parametrize(
    "settings, message",
    [
        (["api_keys_env=RAYLLM_API_KEYS"], "listens on 127.0.0.1:8000"),
        (["host=0.0.0.0"], "serves without API keys from the Secret"),
    ],
)
def test_an_app_a_cluster_cannot_serve_is_refused_and_nothing_written(
    registry, tmp_path, settings, message
):
    app = export(registry, tmp_path / "app.yaml", *settings)
    out = tmp_path / "k8s"
    done = rayllm("k8s", "render", "--out", str(out), "--set", f"serve_app={app}")
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_a_relative_registry_and_a_missing_file_are_refused(registry, tmp_path, monkeypatch):
    app = export(registry, tmp_path / "app.yaml", "host=0.0.0.0", "api_keys_env=RAYLLM_API_KEYS")
    text = yaml.safe_load(app.read_text())
    text["applications"][0]["args"]["registry"] = "rayllm-work/registry"
    app.write_text(yaml.safe_dump(text))
    done = rayllm("k8s", "render", "--out", str(tmp_path / "k8s"), "--set", f"serve_app={app}")
    assert done.returncode == 2 and "relative path 'rayllm-work/registry'" in done.stderr
    done = rayllm("k8s", "render", "--out", str(tmp_path / "k8s"), "--set", "serve_app=nope.yaml")
    assert done.returncode == 2 and "--export-config" in done.stderr


def test_requests_no_node_group_can_hold_are_refused_and_nothing_written(registry, tmp_path):
    out = tmp_path / "k8s"
    keyed = ["host=0.0.0.0", "api_keys_env=RAYLLM_API_KEYS"]
    app = export(registry, tmp_path / "app.yaml", *keyed, "cpus_per_replica=16")
    done = rayllm("k8s", "render", "--out", str(out), "--set", f"serve_app={app}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "a replica of bard asks for 16 CPUs and 0 GPUs, which no node group has" in done.stderr
    app = export(
        registry, tmp_path / "app.yaml", *keyed, "tensor_parallel_size=3", "cpus_per_replica=3"
    )
    done = rayllm("k8s", "render", "--out", str(out), "--set", f"serve_app={app}")
    assert done.returncode == 2
    assert "bard (3 tensor-parallel ranks on one node) asks for 9 CPUs and 0" in done.stderr
    settings = ["serve_app=null", 'jobs.train.set=["cpus_per_worker=12"]']
    done = rayllm("k8s", "render", "--out", str(out), *(a for s in settings for a in ("--set", s)))
    assert done.returncode == 2
    assert "jobs.train: a training worker asks for 12 CPUs and 0 GPUs" in done.stderr
    assert not out.exists()


def test_an_app_pinned_to_a_version_its_registry_lacks_is_refused(registry, tmp_path):
    app = export(registry, tmp_path / "app.yaml", "host=0.0.0.0", "api_keys_env=RAYLLM_API_KEYS")
    app.write_text(app.read_text().replace("bard:1", "bard:9"))
    done = rayllm("k8s", "render", "--out", str(tmp_path / "k8s"), "--set", f"serve_app={app}")
    assert done.returncode == 2 and "serves bard:9, which the registry cannot give" in done.stderr


def test_the_readme_commands_render_an_exported_app(registry, tmp_path):
    """The README's Kubernetes block as written, on a scratch registry and output folder."""
    from tests.test_readme import block_with, commands

    export_line, render_line = commands(block_with("rayllm k8s render"))
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({"models": ["bard"]}))
    app = tmp_path / "serve-app.yaml"
    swaps = {
        "serve.yaml": str(tmp_path / "serve.yaml"),
        "registry=/mnt/rayllm/work/registry": f"registry={registry}",
        "cluster/serve-app.yaml": str(app),
    }
    done = rayllm(*(swaps.get(word, word) for word in export_line))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "k8s"
    done = rayllm(*render_line, "--set", f"serve_app={app}", "--out", str(out))
    assert done.returncode == 0, done.stderr
    service = yaml.safe_load((out / "rayservice.yaml").read_text())
    assert service["spec"]["serveConfigV2"] == app.read_text()
