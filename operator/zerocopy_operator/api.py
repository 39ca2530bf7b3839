"""The ZeroCopyModel API: spec and status as typed models, the single source of truth.

The CRD (`zerocopy crd`, committed as crds/zerocopymodels.zerocopy.dev.yaml)
is generated from these classes, and the operator, `zerocopy render` and
`zerocopy serve` validate every resource with them, so the API server, the
operator and the runtime can never disagree on a field. The parts replicas
act on (model source, architecture, handler, batching, device) are declared
in `zerocopy_runtime.config` and composed here, because the runtime must
validate its arguments without importing the operator.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, WithJsonSchema, field_validator, model_validator

from zerocopy_runtime.config import (
    ADAPTERS_RULE,
    BUILDABLE_RULE,
    REPLICA_RULES,
    Adapter,
    ApiModel,
    ModelSource,
    ReplicaSettings,
    api_config,
    cel,
    check_adapters,
    check_buildable,
)

GROUP = "zerocopy.dev"
VERSION = "v1alpha1"
KIND = "ZeroCopyModel"
PLURAL = "zerocopymodels"
SHORT_NAME = "zcm"
CLUSTER_KIND = "ZeroCopyCluster"
CLUSTER_PLURAL = "zerocopyclusters"
CLUSTER_SHORT_NAME = "zcc"
API_VERSION = f"{GROUP}/{VERSION}"

#: The Ray version the runtime image is built for; a cluster may pin another.
DEFAULT_RAY_VERSION = "2.60.0"
#: KubeRay refuses RayServices with longer names (it derives RayCluster and Service names from them),
#: and the RayService takes the model's (or the cluster resource's) name.
MAX_NAME_LENGTH = 47
#: A DNS-1035 label, as KubeRay requires of RayService names (a letter first).
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")


def _quantity(value: int | str) -> int | str:
    if not _QUANTITY.match(str(value)):
        raise ValueError(f"{value!r} is not a Kubernetes quantity such as 16Gi, 512Mi, 4 or 500m")
    return value


#: A Kubernetes quantity ("16Gi", "500m", 4): an int-or-string in the CRD, like the API's own.
Quantity = Annotated[
    int | str,
    AfterValidator(_quantity),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}),
]

#: Ray refuses to start with a smaller object store.
MIN_OBJECT_STORE = 75 * 2**20
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_PREFIX = r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
_LABEL_KEY = re.compile(_PREFIX + r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def _store_size(value: int | str) -> int | str:
    from .quantity import memory, to_bytes

    if to_bytes(value) < MIN_OBJECT_STORE:
        raise ValueError(f"objectStoreMemory {value!r} is below Ray's minimum of {memory(MIN_OBJECT_STORE)}")
    return value


#: An object store size: a quantity Ray accepts (at least MIN_OBJECT_STORE).
StoreQuantity = Annotated[Quantity, AfterValidator(_store_size)]

_Spec = ApiModel


class SecretReference(_Spec):
    """A Secret in the model's namespace whose keys become environment variables of every Ray pod."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=_DNS_SUBDOMAIN,
        description="Secret name (for example AWS_ACCESS_KEY_ID keys).",
    )


class Model(ModelSource):
    """The weights as replicas see them (`ModelSource`), plus what only the cluster needs."""

    size: Quantity | None = Field(
        default=None,
        description="Expected size of the weights as published, in model.dtype (a bfloat16 checkpoint served in "
        "float32 takes twice its file size; a GGUF file, its dequantized size), for example 5Gi: checked against "
        "object stores before deploying; the larger of this and the size the replicas report counts.",
    )
    credentials_secret: SecretReference | None = Field(
        default=None, description="Secret with the storage credentials, as environment variables; never inline."
    )


class Autoscaling(_Spec):
    """Serve autoscaling of the replicas."""

    model_config = cel(("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas"))

    min_replicas: int = Field(default=1, ge=0, le=1000, description="Fewest replicas (0 scales to zero).")
    max_replicas: int = Field(ge=1, le=1000, description="Most replicas.")
    target_ongoing_requests: float = Field(default=2, gt=0, description="Requests in flight per replica to aim at.")

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaling.minReplicas ({self.min_replicas}) must not exceed maxReplicas ({self.max_replicas})"
            )
        return self


class Serving(ReplicaSettings):
    """The Serve application: what each replica does (`ReplicaSettings`), how many, and what each needs."""

    model_config = cel(
        *REPLICA_RULES,
        ("!(has(self.replicas) && has(self.autoscaling))", "set serving.replicas or serving.autoscaling, not both"),
        (
            "!has(self.engine) || self.engine != 'vllm' || !has(self.gpusPerReplica) || "
            "double(self.gpusPerReplica) == 0.0 || (has(self.vllm) && has(self.vllm.tensorParallelSize) && "
            "self.vllm.tensorParallelSize > 1 ? double(self.gpusPerReplica) == double(self.vllm.tensorParallelSize) "
            ": double(self.gpusPerReplica) <= 1.0)",
            "serving.gpusPerReplica with engine vllm: 0, at most 1 for a one-GPU engine (a share of a GPU with a "
            "lower vllm.gpuMemoryUtilization), or exactly vllm.tensorParallelSize",
        ),
    )

    route_prefix: str | None = Field(
        default=None, pattern=r"^/[-a-zA-Z0-9_/]*$", description="HTTP route; default /<name>."
    )
    replicas: int | None = Field(default=None, ge=1, le=1000, description="Fixed replica count (default 1).")
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: int = Field(default=16, ge=1, le=10000, description="Requests a replica takes at once.")
    cpus_per_replica: float = Field(default=1, ge=0, le=512, description="Ray CPUs per replica (fractions allowed).")
    gpus_per_replica: float = Field(default=0, ge=0, le=64, description="Ray GPUs per replica (fractions allowed).")
    health_check_period_s: float = Field(default=10, gt=0, le=3600)
    health_check_timeout_s: float = Field(default=30, gt=0, le=3600)

    @field_validator("cpus_per_replica", "gpus_per_replica")
    @classmethod
    def _ray_precision(cls, value: float) -> float:
        if round(value, 4) != value:  # as Ray checks it: a multiple of 0.0001 as written
            raise ValueError(f"{value!r} has more precision than Ray's 0.0001 resource unit: round it, as in 0.25")
        return value

    @model_validator(mode="after")
    def _one_count(self) -> Serving:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("set serving.replicas or serving.autoscaling, not both")
        parallel = self.vllm.tensor_parallel_size if self.vllm is not None else 1
        gpus = self.gpus_per_replica
        if self.engine == "vllm" and gpus and (gpus != parallel if parallel > 1 else gpus > 1):
            raise ValueError(
                "serving.gpusPerReplica with engine vllm: 0, at most 1 for a one-GPU engine (a share of a GPU with a "
                f"lower vllm.gpuMemoryUtilization), or exactly vllm.tensorParallelSize ({parallel}); it is {gpus:g}"
            )
        return self


class Toleration(_Spec):
    """A pod toleration, as in the core API."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists takes no value (Kubernetes refuses the pod)")
        return self


class Head(_Spec):
    """The Ray head pod. It runs no replicas (num-cpus 0) so that they land on workers."""

    cpu: Quantity = Field(default="1", description="CPU request and limit.")
    memory: Quantity = Field(default="4Gi", description="Memory for the head's processes.")
    object_store_memory: StoreQuantity = Field(default="1Gi", description="The head's object store (and /dev/shm).")


class WorkerGroup(_Spec):
    """A group of identical Ray worker pods: GPUs, CPU, memory and the object store the replicas share."""

    model_config = cel(("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas"))

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40, description="Group name.")
    replicas: int | None = Field(default=None, ge=0, le=1000, description="Pods to start; default minReplicas.")
    min_replicas: int = Field(default=1, ge=0, le=1000)
    max_replicas: int = Field(default=1, ge=0, le=1000)
    gpus: int = Field(default=0, ge=0, le=64, description="GPUs per pod.")
    gpu_resource: str = Field(
        default="nvidia.com/gpu",
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description="Extended resource name of the GPUs.",
    )
    cpu: Quantity = Field(default="4", description="CPU request and limit per pod.")
    memory: Quantity = Field(default="16Gi", description="Memory for the pod's processes, object store excluded.")
    object_store_memory: StoreQuantity = Field(
        default="4Gi", description="Ray object store per pod: holds the shared weights; /dev/shm is sized to it."
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, description="Default with GPUs: the GPU taint.")

    @field_validator("node_selector")
    @classmethod
    def _labels(cls, selector: dict[str, str]) -> dict[str, str]:
        for key, value in selector.items():
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise ValueError(f"nodeSelector {key}: {value!r} is not a valid Kubernetes label key and value")
        return selector

    @model_validator(mode="after")
    def _ordered(self) -> WorkerGroup:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"worker group {self.name!r}: minReplicas ({self.min_replicas}) must not exceed "
                f"maxReplicas ({self.max_replicas})"
            )
        return self


class Cluster(_Spec):
    """The Ray cluster KubeRay runs: a model's own (`spec.cluster`), or a ZeroCopyCluster's that models share."""

    ray_version: str = Field(default=DEFAULT_RAY_VERSION, pattern=r"^\d+\.\d+\.\d+$")
    image: str | None = Field(
        default=None, pattern=r"^[!-~]+$", description="Runtime image; default: the operator's runtime image."
    )
    head: Head = Field(default_factory=Head)
    worker_groups: list[WorkerGroup] = Field(
        default_factory=lambda: [WorkerGroup(name="gpu", gpus=1)], min_length=1, max_length=16
    )
    enable_in_tree_autoscaling: bool = Field(default=False, description="KubeRay's autoscaler adds and removes pods.")


class IncrementalUpgrade(_Spec):
    """Options of KubeRay's NewClusterWithIncrementalUpgrade (needs the Gateway API)."""

    model_config = cel(
        (
            "!has(self.maxSurgePercent) || self.stepSizePercent <= self.maxSurgePercent",
            "incremental.stepSizePercent must not exceed maxSurgePercent (KubeRay)",
        )
    )

    gateway_class_name: str = Field(min_length=1, description="The Gateway API class KubeRay shifts traffic with.")
    step_size_percent: int = Field(ge=1, le=100)
    interval_seconds: int = Field(ge=1, le=2**31 - 1, description="KubeRay holds it as a 32-bit integer.")
    max_surge_percent: int = Field(default=100, ge=1, le=100)

    @model_validator(mode="after")
    def _step_within_surge(self) -> IncrementalUpgrade:
        if self.step_size_percent > self.max_surge_percent:
            raise ValueError(
                f"incremental.stepSizePercent ({self.step_size_percent}) must not exceed maxSurgePercent "
                f"({self.max_surge_percent}) (KubeRay)"
            )
        return self


class UpgradeStrategy(_Spec):
    """How KubeRay rolls out cluster changes; model and serving changes are always in place."""

    type: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"] = "NewCluster"
    incremental: IncrementalUpgrade | None = None

    @model_validator(mode="after")
    def _options(self) -> UpgradeStrategy:
        if (self.type == "NewClusterWithIncrementalUpgrade") != (self.incremental is not None):
            raise ValueError("upgradeStrategy.incremental goes with type NewClusterWithIncrementalUpgrade, only")
        return self


_INCREMENTAL_MESSAGE = (
    "upgradeStrategy NewClusterWithIncrementalUpgrade needs {where}enableInTreeAutoscaling: true (KubeRay)"
)


def _incremental_rule(where: str) -> tuple[str, str]:
    """KubeRay's rule for incremental upgrades, on a spec whose cluster fields sit at `self.<where>`."""
    path = f"self.{where}" if where else "self"
    has_field = f"has({path}) && " if where else ""
    return (
        "!has(self.upgradeStrategy) || !has(self.upgradeStrategy.type) || "
        "self.upgradeStrategy.type != 'NewClusterWithIncrementalUpgrade' || "
        f"({has_field}has({path}.enableInTreeAutoscaling) && {path}.enableInTreeAutoscaling)",
        _INCREMENTAL_MESSAGE.format(where=f"{where}." if where else ""),
    )


def _check_incremental(strategy: UpgradeStrategy, cluster: Cluster, where: str) -> None:
    if strategy.type == "NewClusterWithIncrementalUpgrade" and not cluster.enable_in_tree_autoscaling:
        raise ValueError(_INCREMENTAL_MESSAGE.format(where=where))


class ClusterRef(_Spec):
    """A ZeroCopyCluster in the model's namespace: the model runs there as one Serve application of several."""

    name: str = Field(
        min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN, description="The ZeroCopyCluster's name."
    )


_CLUSTER_REF_MESSAGE = (
    "spec.clusterRef takes the cluster and its upgrade strategy from the ZeroCopyCluster: remove spec.cluster and "
    "spec.upgradeStrategy (or remove spec.clusterRef to give the model a cluster of its own)"
)


class ZeroCopyModelSpec(_Spec):
    """A PyTorch model served on Ray with its weights held once per node."""

    model_config = cel(
        _incremental_rule("cluster"),
        BUILDABLE_RULE,
        ("!has(self.clusterRef) || (!has(self.cluster) && !has(self.upgradeStrategy))", _CLUSTER_REF_MESSAGE),
        ADAPTERS_RULE,
    )

    model: Model
    adapters: list[Adapter] = Field(
        default_factory=list,
        max_length=64,
        description="LoRA adapters served on the model's shared base weights, each as the OpenAI model "
        "<model>:<name>; adding or removing one is an in-place update.",
    )
    serving: Serving = Field(default_factory=Serving)
    cluster: Cluster = Field(
        default_factory=Cluster, description="The model's own Ray cluster; not with clusterRef. Default: one GPU pod."
    )
    upgrade_strategy: UpgradeStrategy = Field(default_factory=UpgradeStrategy)
    cluster_ref: ClusterRef | None = Field(
        default=None, description="Serve on this ZeroCopyCluster, beside other models, instead of an own cluster."
    )

    @model_validator(mode="after")
    def _incremental_needs_autoscaler(self) -> ZeroCopyModelSpec:
        if self.cluster_ref is not None and {"cluster", "upgrade_strategy"} & self.model_fields_set:
            raise ValueError(_CLUSTER_REF_MESSAGE)
        _check_incremental(self.upgrade_strategy, self.cluster, "cluster.")
        check_buildable(self.model, self.serving.engine)
        check_adapters(self.adapters, self.serving.task, self.serving.engine)
        return self


class ZeroCopyClusterSpec(Cluster):
    """A Ray cluster that ZeroCopyModels share: one RayService, one Serve application per model that names it.

    Serve deploys, upgrades and deletes each application on its own, so a
    change to one model never restarts another's replicas, and the cluster
    itself is replaced only when its own shape changes.
    """

    model_config = cel(_incremental_rule(""))

    upgrade_strategy: UpgradeStrategy = Field(default_factory=UpgradeStrategy)
    credentials_secrets: list[SecretReference] = Field(
        default_factory=list,
        max_length=16,
        description="Secrets whose keys become environment variables of every pod: list each one a model's "
        "model.credentialsSecret names (pods are shared, so a model cannot add its own).",
    )

    @model_validator(mode="after")
    def _incremental_needs_autoscaler(self) -> ZeroCopyClusterSpec:
        _check_incremental(self.upgrade_strategy, self, "")
        return self


class Condition(_Spec):
    """A status condition in the Kubernetes convention."""

    model_config = api_config(extra="allow")

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class WeightsInfo(_Spec):
    """What the replicas report at <route>/-/info."""

    model_config = api_config(extra="allow")

    name: str | None = None
    revision: str | None = None
    bytes: int | None = None
    tensors: int | None = None
    shared: bool | None = None
    attach_seconds: float | None = None


class ZeroCopyModelStatus(_Spec):
    """What the operator observed, for people (printer columns) and tools (conditions)."""

    model_config = api_config(extra="allow")

    observed_generation: int | None = None
    phase: Literal["Pending", "Provisioning", "Ready", "Upgrading", "Failed"] | None = None
    conditions: list[Condition] = Field(default_factory=list, description="Ready first, then Cluster, Weights, Serve.")
    ray_service: str | None = Field(default=None, description="The RayService this model runs in.")
    cluster: str | None = Field(default=None, description="The ZeroCopyCluster it runs on (spec.clusterRef).")
    endpoint: str | None = Field(default=None, description="In-cluster URL of the model's route.")
    task: str | None = Field(default=None, description="What the replicas serve: spec.serving.task.")
    openai_base_url: str | None = Field(default=None, description="base_url for OpenAI clients (text tasks).")
    weights: WeightsInfo | None = None
    replicas: str | None = Field(default=None, description="Ready replicas / desired, for `kubectl get`.")
    ready_replicas: int | None = None
    desired_replicas: int | None = None


class ClusterModel(_Spec):
    """One model that names the cluster: served as an application, or refused with the reason."""

    name: str
    route: str | None = None
    application: str | None = Field(default=None, description="Serve's status of its application (RUNNING, ...).")
    ready: bool = False
    weights_bytes: int | None = Field(default=None, description="Its weights: what its replicas report, or size.")
    message: str = ""


class ObjectStoreUse(_Spec):
    """How much of one worker group's per-pod object store the weights of the models that may land there take."""

    group: str
    capacity_bytes: int
    weights_bytes: int
    models: list[str] = Field(default_factory=list)


class ZeroCopyClusterStatus(_Spec):
    """The shared cluster at a glance: its readiness, the models it serves, its object stores' use."""

    model_config = api_config(extra="allow")

    observed_generation: int | None = None
    phase: Literal["Pending", "Provisioning", "Ready", "Upgrading", "Failed"] | None = None
    conditions: list[Condition] = Field(default_factory=list, description="Ready first, then ClusterReady.")
    ray_service: str | None = Field(default=None, description="The RayService the cluster runs as.")
    endpoint: str | None = Field(default=None, description="In-cluster URL of its Serve service; models add routes.")
    openai_base_url: str | None = Field(
        default=None, description="base_url for OpenAI clients: every text model of the cluster, by model name."
    )
    models: list[ClusterModel] = Field(default_factory=list)
    models_ready: str | None = Field(default=None, description="Models serving / models naming it, for `kubectl get`.")
    object_store: list[ObjectStoreUse] = Field(default_factory=list)
    object_store_summary: str | None = Field(default=None, description="Per group: weights / capacity per pod.")


_READY_COLUMN: dict[str, Any] = {
    "name": "Ready",
    "type": "string",
    "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
}
_AGE_COLUMN: dict[str, Any] = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}

#: Columns of `kubectl get zcm`.
PRINTER_COLUMNS: list[dict[str, Any]] = [
    _READY_COLUMN,
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Replicas", "type": "string", "jsonPath": ".status.replicas"},
    {"name": "Cluster", "type": "string", "jsonPath": ".spec.clusterRef.name", "priority": 1},
    {"name": "Task", "type": "string", "jsonPath": ".spec.serving.task", "priority": 1},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    _AGE_COLUMN,
]

#: Columns of `kubectl get zcc`.
CLUSTER_PRINTER_COLUMNS: list[dict[str, Any]] = [
    _READY_COLUMN,
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Models", "type": "string", "jsonPath": ".status.modelsReady"},
    {"name": "Object-Store", "type": "string", "jsonPath": ".status.objectStoreSummary"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
    _AGE_COLUMN,
]
