"""KubeRay manifests rendered from rayllm's configs, never kept by hand: one RayCluster with
in-tree autoscaling, a RayJob per job entrypoint, a RayService whose ``serveConfigV2`` is the
file ``rayllm serve --export-config`` wrote, and the volume they share.

Every Ray node's ``rayStartParams`` are derived from its container's resources, so the two
cannot disagree. ``rayllm k8s render`` writes the files; the copies under ``k8s/`` are its
output for the default settings (``tests/test_k8s.py`` checks that, and validates every object
against the KubeRay 1.7 CRDs).
"""

from __future__ import annotations

import shlex
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

import rayllm
from rayllm.config import StageConfig, dump_yaml, load_config
from rayllm.errors import RayllmError
from rayllm.serve.app import DIRECT_INGRESS_CLUSTER, placement
from rayllm.serve.config import ModelEntry, ServeConfig

API_KEYS_ENV = "RAYLLM_API_KEYS"
"""Where the RayService's head reads the serving keys from its Secret; the served app's
``api_keys_env`` must name it."""

RENDERED = "# Written by `rayllm k8s render"
"""How every file the renderer writes begins."""

SERVE_PORT = 8000
"""The port KubeRay's serve Service targets."""

IMAGE_REPO = "/opt/rayllm"
"""Where cluster/Dockerfile puts the repository (entrypoints and recipes) in the image."""


class NodeGroup(BaseModel):
    """One kind of Ray node: its pod's resources, and how many pods the autoscaler may run."""

    model_config = ConfigDict(extra="forbid")

    cpus: int = Field(ge=1)
    memory_gib: int = Field(ge=1)
    gpus: int = Field(0, ge=0)
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(4, ge=1)
    image: str | None = None
    """None: the config's ``image``. GPU groups take the image built with ``DEVICE=gpu``."""


class JobSpec(BaseModel):
    """A RayJob: a ``jobs/`` entrypoint, its recipe, overrides and arguments, on its own
    cluster (torn down when the job ends) or on the RayCluster (``existing_cluster``).
    ``{mount}`` in ``set`` and ``args`` stands for the shared volume's mount path."""

    model_config = ConfigDict(extra="forbid")

    entrypoint: str
    recipe: str | None = None
    set: list[str] = []
    """``--set key=value`` overrides of the recipe."""
    args: list[str] = []
    """The entrypoint's other arguments, e.g. what ``jobs/publish.py`` publishes."""
    existing_cluster: bool = False

    def mounted(self, mount: str) -> JobSpec:
        """This job with ``{mount}`` in its overrides and arguments read as ``mount``."""
        return self.model_copy(
            update={
                "set": [item.replace("{mount}", mount) for item in self.set],
                "args": [item.replace("{mount}", mount) for item in self.args],
            }
        )


class K8sConfig(StageConfig):
    """What ``rayllm k8s render`` writes, and the cluster it describes."""

    name: str = "rayllm"
    image: str = f"rayllm:{rayllm.__version__}"
    """Built by ``cluster/Dockerfile``; the repository sits at ``IMAGE_REPO`` in it."""
    head: NodeGroup = NodeGroup(cpus=4, memory_gib=16)
    workers: dict[str, NodeGroup] = {
        "cpu": NodeGroup(cpus=8, memory_gib=32, max_replicas=4),
        "gpu": NodeGroup(
            cpus=8, memory_gib=64, gpus=1, max_replicas=2, image=f"rayllm:{rayllm.__version__}-gpu"
        ),
    }
    volume_claim: str = "rayllm-work"
    volume_gib: int = Field(200, ge=1)
    storage_class: str | None = None
    """None: the cluster's default. The claim is ReadWriteMany: every node reads the registry."""
    mount: str = "/mnt/rayllm"
    object_storage_secret: str | None = None
    """A Secret every pod takes environment variables from (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``...) for ``s3://`` registry and data roots.
    None: the nodes' own credentials, if any (an instance role), or the shared volume only."""
    jobs: dict[str, JobSpec] = {
        "lifecycle": JobSpec(
            entrypoint="jobs/lifecycle.py",
            recipe="jobs/configs/lifecycle.yaml",
            set=["workdir={mount}/work", "serve.host=0.0.0.0"],
        ),
        "data": JobSpec(
            entrypoint="jobs/data.py",
            recipe="jobs/configs/data-bible.yaml",
            set=["output={mount}/work/data-bible"],
            existing_cluster=True,
        ),
        "train": JobSpec(
            entrypoint="jobs/train.py",
            recipe="jobs/configs/train-bible.yaml",
            set=[
                "data={mount}/work/data-bible",
                "output={mount}/work/model-bible",
                "storage={mount}/work/runs",
            ],
            existing_cluster=True,
        ),
        "eval": JobSpec(
            entrypoint="jobs/eval.py",
            set=["model={mount}/work/model-bible", "data={mount}/work/data-bible"],
            existing_cluster=True,
        ),
        "publish": JobSpec(
            entrypoint="jobs/publish.py",
            args=["bible", "{mount}/work/model-bible", "--root", "{mount}/work/registry"],
            existing_cluster=True,
        ),
        "finetune": JobSpec(
            entrypoint="jobs/finetune.py",
            recipe="jobs/configs/finetune-chat.yaml",
            set=["registry={mount}/work/registry", "train.storage={mount}/work/runs"],
            existing_cluster=True,
        ),
        "compress": JobSpec(
            entrypoint="jobs/compress.py",
            recipe="jobs/configs/compress-w4a16.yaml",
            set=["registry={mount}/work/registry", "data={mount}/work/data-bible"],
            existing_cluster=True,
        ),
    }
    serve_app: str | None = "cluster/serve-app.yaml"
    """A file ``rayllm serve --export-config`` wrote: the RayService's ``serveConfigV2``, as
    it is. None: no RayService."""
    api_keys_secret: str = "rayllm-api-keys"
    """The Secret (key ``keys``: comma-separated API keys) the RayService's head reads."""

    @model_validator(mode="after")
    def _some_workers(self) -> K8sConfig:
        if not self.workers:
            raise ValueError("workers: name at least one worker group")
        return self


def render(config: K8sConfig, repo: Path) -> dict[str, dict[str, Any]]:
    """File name -> Kubernetes object. ``repo``: where the recipes and the serve app file are
    read (the checkout the image was built from)."""
    files = {
        "pvc.yaml": _volume_claim(config),
        "raycluster.yaml": {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {"name": config.name},
            "spec": _cluster_spec(config),
        },
    }
    for name, job in config.jobs.items():
        job = job.mounted(config.mount)
        for path in (job.entrypoint, job.recipe):
            if path is not None and not (repo / path).is_file():
                raise RayllmError(f"jobs.{name}: {path} is not a file of {repo}")
        _check_workers_fit(config, name, job, repo)
        files[f"rayjob-{name}.yaml"] = _job(config, name, job)
    if config.serve_app is not None:
        files["rayservice.yaml"] = _service(config, repo / config.serve_app)
    return files


def write(files: dict[str, dict[str, Any]], folder: Path, options: str = "") -> list[Path]:
    """Write the manifests under ``folder``, and remove the ones an earlier render wrote that
    this one no longer has (a dropped job's RayJob). ``options``: the command's, for the
    header."""
    header = f"{RENDERED}{options}`: change its settings, not this file.\n"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.yaml"):
        if stale.name not in files and stale.read_text().startswith(RENDERED):
            stale.unlink()
    written = []
    for name, document in files.items():
        path = folder / name
        path.write_text(header + dump_yaml(document))
        written.append(path)
    return written


def _volume_claim(config: K8sConfig) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": f"{config.volume_gib}Gi"}},
    }
    if config.storage_class:
        spec["storageClassName"] = config.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": config.volume_claim},
        "spec": spec,
    }


def _cluster_spec(config: K8sConfig, head_env: list[dict] | None = None) -> dict[str, Any]:
    workers = [
        {
            "groupName": name,
            "replicas": group.min_replicas,
            "minReplicas": group.min_replicas,
            "maxReplicas": group.max_replicas,
            "rayStartParams": _start_params(group),
            "template": _pod(config, "ray-worker", group),
        }
        for name, group in config.workers.items()
    ]
    head = _pod(config, "ray-head", config.head, env=head_env)
    head["spec"]["containers"][0]["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": SERVE_PORT, "name": "serve"},
    ]
    return {
        "rayVersion": version("ray"),
        "enableInTreeAutoscaling": True,
        "headGroupSpec": {"rayStartParams": _start_params(config.head), "template": head},
        "workerGroupSpecs": workers,
    }


def _start_params(group: NodeGroup) -> dict[str, str]:
    """What Ray schedules on the node: exactly the container's CPUs, GPUs and memory."""
    params = {"num-cpus": str(group.cpus), "memory": str(group.memory_gib * 2**30)}
    if group.gpus:
        params["num-gpus"] = str(group.gpus)
    return params


def _pod(
    config: K8sConfig, container: str, group: NodeGroup, env: list[dict] | None = None
) -> dict[str, Any]:
    resources: dict[str, Any] = {"cpu": str(group.cpus), "memory": f"{group.memory_gib}Gi"}
    if group.gpus:
        resources["nvidia.com/gpu"] = str(group.gpus)
    spec: dict[str, Any] = {
        "name": container,
        "image": group.image or config.image,
        "resources": {"requests": resources, "limits": resources},
        "volumeMounts": [{"name": "work", "mountPath": config.mount}],
    }
    if env:
        spec["env"] = env
    if config.object_storage_secret:
        spec["envFrom"] = [{"secretRef": {"name": config.object_storage_secret}}]
    volume = {"name": "work", "persistentVolumeClaim": {"claimName": config.volume_claim}}
    return {"spec": {"containers": [spec], "volumes": [volume]}}


def _job(config: K8sConfig, name: str, job: JobSpec) -> dict[str, Any]:
    words = ["python", f"{IMAGE_REPO}/{job.entrypoint}"]
    if job.recipe is not None:
        words += ["--config", f"{IMAGE_REPO}/{job.recipe}"]
    for override in job.set:
        words += ["--set", override]
    words += job.args
    spec: dict[str, Any] = {"entrypoint": shlex.join(words)}
    if job.existing_cluster:
        spec["clusterSelector"] = {"ray.io/cluster": config.name}
    else:
        spec |= {
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": _cluster_spec(config),
        }
    spec["submissionMode"] = "K8sJobMode"
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": f"{config.name}-{name}"},
        "spec": spec,
    }


def _service(config: K8sConfig, serve_app: Path) -> dict[str, Any]:
    if not serve_app.is_file():
        raise RayllmError(
            f"serve_app: {serve_app} does not exist; write it with `rayllm serve --config "
            "serve.yaml --export-config FILE`, or set serve_app to null for no RayService"
        )
    text = serve_app.read_text()
    served = _check_served_app(yaml.safe_load(text), serve_app)
    _check_versions(served, serve_app)
    for entry in served.models:
        _check_replica_fits(config, f"{serve_app}: a replica of {entry.model_id}", entry)
    keys = {"secretKeyRef": {"name": config.api_keys_secret, "key": "keys"}}
    cluster = _cluster_spec(config, head_env=[{"name": API_KEYS_ENV, "valueFrom": keys}])
    for template in [cluster["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster["workerGroupSpecs"]
    ]:
        container = template["spec"]["containers"][0]
        container |= _probes()
        if served.ingress == "direct":  # Serve's HAProxy mode on every node (README, Serving)
            direct = [{"name": name, "value": v} for name, v in DIRECT_INGRESS_CLUSTER.items()]
            container["env"] = [*container.get("env", []), *direct]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": f"{config.name}-serve"},
        "spec": {
            # The old cluster serves until the new one's app is ready, then traffic moves.
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": text,
            "rayClusterConfig": cluster,
        },
    }


def _probes() -> dict[str, Any]:
    """Liveness: the node's raylet answers; readiness: its Serve proxy does (KubeRay's own
    health endpoints, so a pod leaves the serve Service while its proxy is down)."""

    def probe(port: int, path: str, period_s: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": port},
            "initialDelaySeconds": 30,
            "periodSeconds": period_s,
            "timeoutSeconds": 2,
            "failureThreshold": 10,
        }

    return {
        "livenessProbe": probe(52365, "/api/local_raylet_healthz", 5),
        "readinessProbe": probe(SERVE_PORT, "/-/healthz", 5),
    }


def _check_workers_fit(config: K8sConfig, name: str, job: JobSpec, repo: Path) -> None:
    """A job that trains (its recipe a training, fine-tuning or lifecycle config) has workers
    some node group can hold."""
    from rayllm.finetune.config import FinetuneConfig
    from rayllm.lifecycle import LifecycleConfig
    from rayllm.train.config import TrainConfig

    stage = {
        "jobs/train.py": TrainConfig,
        "jobs/finetune.py": FinetuneConfig,
        "jobs/lifecycle.py": LifecycleConfig,
    }.get(job.entrypoint)
    if stage is None or job.recipe is None:
        return
    settings = load_config(stage, repo / job.recipe, job.set)
    train = settings if isinstance(settings, TrainConfig) else settings.train
    gpus = int(train.use_gpu)
    _check_fits(config, f"jobs.{name}: a training worker", train.cpus_per_worker, gpus)


def _check_served_app(document: Any, path: Path) -> ServeConfig:
    """A Serve config a RayService can serve: one that listens for the pod's Service, with
    API keys from the Secret and a registry every node reaches."""
    try:
        (app,) = document["applications"]
        http = document["http_options"]
        served = ServeConfig.model_validate(app["args"])
    except (KeyError, TypeError, ValueError):
        raise RayllmError(
            f"{path} is not a file `rayllm serve --export-config` wrote (one rayllm app); "
            "write it again with that command"
        ) from None
    fix = f"export it again with `rayllm serve --config ... --export-config {path}`"
    if http.get("host") != "0.0.0.0" or http.get("port") != SERVE_PORT:
        raise RayllmError(
            f"{path} listens on {http.get('host')}:{http.get('port')}, which the RayService's "
            f"Service cannot reach; {fix} --set host=0.0.0.0 --set port={SERVE_PORT}"
        )
    if served.api_keys_env != API_KEYS_ENV:
        raise RayllmError(
            f"{path} serves without API keys from the Secret; {fix} "
            f"--set api_keys_env={API_KEYS_ENV}"
        )
    if "://" not in served.registry and not served.registry.startswith("/"):
        raise RayllmError(
            f"{path} reads the registry at the relative path {served.registry!r}, which no pod "
            f"has; {fix} --set registry=/mnt/rayllm/... (the shared volume) or an s3:// URL"
        )
    return served


def _check_versions(served: ServeConfig, path: Path) -> None:
    """Every version the app pins is in its registry, where this machine can read the root
    (object storage with credentials, or the volume mounted here too); a root only the pods
    mount is read when the app starts."""
    from rayllm.registry.store import Registry

    try:
        registry = Registry(served.registry)
        readable = registry.fs.exists(registry.root)
    except Exception:  # noqa: BLE001 - no credentials or no network here: the pods check
        return
    if not readable:
        return
    for entry in served.models:
        try:
            registry.resolve(entry.version or entry.model)
        except RayllmError as error:
            raise RayllmError(
                f"{path} serves {entry.version}, which the registry cannot give: {error}"
            ) from None


def _check_replica_fits(config: K8sConfig, what: str, entry: ModelEntry) -> None:
    """Some node group holds what the replica's placement group reserves on one node: all its
    bundles where they are packed strictly (a CPU engine's ranks, processes of one node), one
    bundle otherwise (each may land on a node of its own)."""
    group = placement(entry, on_gpu=bool(entry.use_gpu))
    bundles = group["bundles"]
    if group["strategy"] == "STRICT_PACK" and len(bundles) > 1:
        what = f"{what} ({len(bundles)} tensor-parallel ranks on one node)"
    else:
        bundles = bundles[:1]
    cpus = sum(bundle["CPU"] for bundle in bundles)
    _check_fits(config, what, cpus, int(sum(bundle.get("GPU", 0) for bundle in bundles)))


def _check_fits(config: K8sConfig, what: str, cpus: float, gpus: int) -> None:
    """Some node group (the head included) has the CPUs and GPUs ``what`` asks for."""
    groups = {"head": config.head, **config.workers}
    if not any(g.cpus >= cpus and g.gpus >= gpus for g in groups.values()):
        sizes = ", ".join(f"{name}: {g.cpus} CPUs, {g.gpus} GPUs" for name, g in groups.items())
        raise RayllmError(
            f"{what} asks for {cpus:g} CPUs and {gpus} GPUs, which no node group has ({sizes}); "
            "lower the request or give a group (workers.NAME.cpus / gpus) that much"
        )
