"""Pure builders: a ZeroCopyModel (or a ZeroCopyCluster and its models) in, the KubeRay RayService out. No I/O.

Model and serving settings land in `serveConfigV2`, which KubeRay applies to
the running cluster in place; cluster shape lands in `rayClusterConfig`,
which KubeRay rolls out by its upgrade strategy. A ZeroCopyCluster's
RayService holds one Serve application per model: Serve redeploys only the
applications whose config changed.
"""

from __future__ import annotations

from typing import Any

import yaml

from zerocopy_runtime.config import AppArgs, ModelSource, ReplicaConfig, ReplicaSettings, fields_of
from zerocopy_runtime.contract import ROUTER_APP, ROUTER_DEPLOYMENT, ROUTER_IMPORT_PATH, RoutedModel, RouterArgs

from . import quantity
from .api import (
    Cluster,
    Head,
    SecretReference,
    Serving,
    UpgradeStrategy,
    WorkerGroup,
    ZeroCopyModelSpec,
)
from .resources import SERVE_PORT, parse_cluster_spec, parse_spec, route_prefix

#: The runtime's Serve application builder, as `serveConfigV2` imports it.
IMPORT_PATH = "zerocopy_runtime.serve:build_app"
DEPLOYMENT = "ZeroCopyDeployment"
#: Ray's Prometheus endpoint on every node: the chart's PodMonitor scrapes the port by this name.
METRICS_PORT = {"name": "metrics", "containerPort": 8080}
METRICS_PARAMS = {"metrics-export-port": str(METRICS_PORT["containerPort"])}
MODEL_LABEL = "zerocopy.dev/model"
CLUSTER_LABEL = "zerocopy.dev/cluster"
MANAGED_BY = {"app.kubernetes.io/managed-by": "zerocopy-operator"}
#: /dev/shm holds the object store plus Ray's own scratch: this much more, at least.
SHM_HEADROOM = 256 * 2**20


def build_rayservice(resource: dict[str, Any], default_image: str) -> dict[str, Any]:
    """The RayService of a ZeroCopyModel with a cluster of its own (owner reference and namespace: the caller's)."""
    spec = parse_spec(resource)
    if spec.cluster_ref is not None:
        raise ValueError(
            f"ZeroCopyModel {resource['metadata']['name']} runs on a ZeroCopyCluster: it has no RayService"
        )
    name = resource["metadata"]["name"]
    application = build_serve_application(name, spec, route_prefix(resource, spec))
    env_from = build_env_from([spec.model.credentials_secret])
    return _rayservice(
        name, {MODEL_LABEL: name}, [application], spec.cluster, spec.upgrade_strategy, env_from, default_image
    )


def build_cluster_rayservice(
    resource: dict[str, Any], applications: list[dict[str, Any]], default_image: str
) -> dict[str, Any]:
    """The RayService of a ZeroCopyCluster, serving `applications` (one per model, from `build_serve_application`).

    Applications are sorted by name, so the same models always give the same serveConfigV2 and only a change
    to a model changes it; with none, Serve runs no application and the cluster stays up for the next model.
    The OpenAI router (`build_router_application`) comes last, when there is a text model to route to.
    """
    spec = parse_cluster_spec(resource)
    name = resource["metadata"]["name"]
    router = build_router_application(applications)
    ordered = sorted(applications, key=lambda app: str(app["name"])) + ([router] if router else [])
    env_from = build_env_from(list(spec.credentials_secrets))
    return _rayservice(name, {CLUSTER_LABEL: name}, ordered, spec, spec.upgrade_strategy, env_from, default_image)


def _rayservice(
    name: str,
    labels: dict[str, str],
    applications: list[dict[str, Any]],
    cluster: Cluster,
    strategy: UpgradeStrategy,
    env_from: list[dict[str, Any]],
    default_image: str,
) -> dict[str, Any]:
    serve_config = {"http_options": {"host": "0.0.0.0", "port": SERVE_PORT}, "applications": applications}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {**labels, **MANAGED_BY}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": build_ray_cluster(name, labels, cluster, default_image, env_from),
            "upgradeStrategy": build_upgrade_strategy(strategy),
        },
    }


def build_serve_application(name: str, spec: ZeroCopyModelSpec, route: str) -> dict[str, Any]:
    """One Serve application: the runtime's builder, this model's args, and the deployment's options.

    `zerocopy serve` deploys exactly this on a local Ray, the operator puts it in serveConfigV2.
    """
    return {
        "name": name,
        "route_prefix": route,
        "import_path": IMPORT_PATH,
        "args": build_app_args(name, spec).model_dump(mode="json", exclude_none=True),
        "deployments": [build_deployment_options(spec.serving, ReplicaConfig(adapters=spec.adapters))],
    }


def build_router_application(applications: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The cluster's OpenAI router at `/`, in front of the text models among `applications` (None: there are
    none). Its args name each model's application and task, so it refuses a wrong route before forwarding."""
    models = [
        RoutedModel(
            name=app["name"],
            application=app["name"],
            task=app["args"].get("task", "tensor"),
            adapters=[a["name"] for a in (app["deployments"][0].get("user_config") or {}).get("adapters", [])],
        )
        for app in applications
        if app["args"].get("task", "tensor") != "tensor"
    ]
    if not models:
        return None
    return {
        "name": ROUTER_APP,
        "route_prefix": "/",
        "import_path": ROUTER_IMPORT_PATH,
        "args": RouterArgs(models=sorted(models, key=lambda m: m.name)).model_dump(mode="json"),
        # It only forwards: no CPU of its own to schedule, so it never keeps a model's replica off a node.
        "deployments": [{"name": ROUTER_DEPLOYMENT, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}],
    }


def build_app_args(name: str, spec: ZeroCopyModelSpec) -> AppArgs:
    """The runtime's arguments, taken field by field from the typed spec: the one conversion there is."""
    return AppArgs(
        name=name,
        model=ModelSource.model_validate(spec.model.model_dump(include=fields_of(ModelSource))),
        **spec.serving.model_dump(include=fields_of(ReplicaSettings)),
    )


def build_deployment_options(serving: Serving, config: ReplicaConfig | None = None) -> dict[str, Any]:
    """Serve deployment options: changing these is an in-place update of the running app. `config`: what
    replicas take in place (`user_config`: the adapters), for the models that can hold adapters: always there,
    so that removing the last adapter reaches the replicas too (Serve skips `reconfigure` for no user_config)."""
    options: dict[str, Any] = {"name": DEPLOYMENT}
    if config is not None and serving.task == "text-generation" and serving.engine == "transformers":
        options["user_config"] = config.model_dump(mode="json")
    if serving.autoscaling is not None:
        options["autoscaling_config"] = {
            "min_replicas": serving.autoscaling.min_replicas,
            "max_replicas": serving.autoscaling.max_replicas,
            "target_ongoing_requests": serving.autoscaling.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = 1 if serving.replicas is None else serving.replicas
    options["max_ongoing_requests"] = serving.max_ongoing_requests
    options["health_check_period_s"] = serving.health_check_period_s
    options["health_check_timeout_s"] = serving.health_check_timeout_s
    options["ray_actor_options"] = {"num_cpus": serving.cpus_per_replica, "num_gpus": serving.gpus_per_replica}
    return options


def build_ray_cluster(
    name: str, labels: dict[str, str], cluster: Cluster, default_image: str, env_from: list[dict[str, Any]]
) -> dict[str, Any]:
    image = cluster.image or default_image
    return {
        "rayVersion": cluster.ray_version,
        "enableInTreeAutoscaling": cluster.enable_in_tree_autoscaling,
        "headGroupSpec": build_head_group(labels, cluster.head, image, env_from),
        "workerGroupSpecs": [build_worker_group(labels, group, image, env_from) for group in cluster.worker_groups],
    }


def build_env_from(secrets: list[SecretReference | None]) -> list[dict[str, Any]]:
    """Storage credentials from the referenced Secrets, as environment variables (never inline)."""
    return [{"secretRef": {"name": secret.name}} for secret in secrets if secret is not None]


def build_head_group(labels: dict[str, str], head: Head, image: str, env_from: list[dict[str, Any]]) -> dict[str, Any]:
    """The head: runs Serve's controller and proxy but no replicas (`num-cpus: 0`)."""
    store = quantity.to_bytes(head.object_store_memory)
    params = {"num-cpus": "0", "object-store-memory": str(store), "dashboard-host": "0.0.0.0", **METRICS_PARAMS}
    ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
        {"name": "serve", "containerPort": SERVE_PORT},
        METRICS_PORT,
    ]
    container = build_container("ray-head", image, head.cpu, head.memory, store, env_from, {}, ports)
    return {"rayStartParams": params, "template": build_pod_template(labels, "head", container, store, {}, [])}


def build_worker_group(
    labels: dict[str, str], group: WorkerGroup, image: str, env_from: list[dict[str, Any]]
) -> dict[str, Any]:
    """A worker group: GPUs as limits, tolerations for the GPU taint, and the object store sized explicitly."""
    store = quantity.to_bytes(group.object_store_memory)
    params = {"object-store-memory": str(store), **METRICS_PARAMS}
    extra: dict[str, Any] = {}
    if group.gpus:
        params["num-gpus"] = str(group.gpus)
        extra[group.gpu_resource] = group.gpus
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in group.tolerations]
    if group.gpus and not tolerations:
        tolerations = [{"key": group.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    container = build_container("ray-worker", image, group.cpu, group.memory, store, env_from, extra, [METRICS_PORT])
    replicas = group.min_replicas if group.replicas is None else group.replicas
    return {
        "groupName": group.name,
        "replicas": max(group.min_replicas, min(replicas, group.max_replicas)),
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": params,
        "template": build_pod_template(labels, group.name, container, store, dict(group.node_selector), tolerations),
    }


def shm_bytes(store: int) -> int:
    """/dev/shm for an object store of `store` bytes: the store plus headroom for Ray's scratch files."""
    return store + max(SHM_HEADROOM, store // 10)


def build_container(
    name: str,
    image: str,
    cpu: int | str,
    memory: int | str,
    store: int,
    env_from: list[dict[str, Any]],
    extra_resources: dict[str, Any],
    ports: list[dict[str, Any]],
) -> dict[str, Any]:
    """A Ray container whose memory covers its processes and the memory-backed /dev/shm."""
    total = quantity.memory(quantity.to_bytes(memory) + shm_bytes(store))
    resources = {"cpu": str(cpu), "memory": total, **extra_resources}
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if env_from:
        container["envFrom"] = env_from
    if ports:
        container["ports"] = ports
    return container


def build_pod_template(
    owner_labels: dict[str, str],
    group: str,
    container: dict[str, Any],
    store: int,
    node_selector: dict[str, str],
    tolerations: list[dict[str, Any]],
) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": quantity.memory(shm_bytes(store))}}],
    }
    if node_selector:
        pod["nodeSelector"] = node_selector
    if tolerations:
        pod["tolerations"] = tolerations
    labels = {**owner_labels, "zerocopy.dev/group": group, **MANAGED_BY}
    return {"metadata": {"labels": labels}, "spec": pod}


def build_upgrade_strategy(upgrade: UpgradeStrategy) -> dict[str, Any]:
    strategy: dict[str, Any] = {"type": upgrade.type}
    if upgrade.incremental is not None:
        strategy["clusterUpgradeOptions"] = upgrade.incremental.model_dump(by_alias=True)
    return strategy
