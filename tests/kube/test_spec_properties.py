"""Validate means renders: every ZeroCopyModel and ZeroCopyCluster the API server accepts is refused with a reason,
or served.

The resources are generated from the committed CRDs themselves: their
`openAPIV3Schema` (leaves drawn by hypothesis-jsonschema, see
tests/crd_schema.py), so the test follows the CRDs as they change. A real API
server (`kube_cluster`: envtest's kube-apiserver, or the `--kubeconfig`
cluster) judges them: a node with CEL rules is redrawn until the server's
rules on it hold, and each resource is created with a server-side dry run,
which refuses what a cluster refuses (an example given up, not a failure) and
returns it as the cluster would store it (defaulted). Each one, as written
and as stored, must be either

(a) refused by `validate()` (`validate_cluster()`) with an `InvalidSpec` that says why, or
(b) rendered into a RayService that KubeRay takes (the server takes it under
    KubeRay's CRD: its schema and CEL rules, no unknown field; its
    controller's own checks, ported below; integers that fit its Go types)
    with a Serve config that Ray Serve deploys and whose app args the
    runtime's `AppArgs` accepts.

Anything in between (a crash, a RayService KubeRay refuses, a Serve config
Serve refuses) is the bug this test is for: a bad spec must be caught by
`validate()`, where it becomes a condition and an Event, not later in KubeRay
or Serve where the user sees nothing.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, given, note, reject, settings
from hypothesis import strategies as st

from tests.crd_schema import (
    INT_OR_STRING,
    Keep,
    NodePath,
    biased_coin,
    integer_format_violations,
    openapi_schema,
    strategy_for,
    to_json_schema,
)
from tests.kube import kuberay
from tests.kube.clusters import Cluster, Refused

pytestmark = [pytest.mark.kube]

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = kuberay.crd("rayservices")
IMAGE = "runtime:test"
API_VERSION, KIND, CLUSTER_KIND = "zerocopy.dev/v1alpha1", "ZeroCopyModel", "ZeroCopyCluster"
NAMESPACE = "default"  # dry runs write nothing: every example may take any name there

if reason := kuberay.missing():
    pytest.skip(f"{reason} (without them a rendered RayService cannot be checked)", allow_module_level=True)

# Imported after the skip: importing Ray's Serve schema takes a second.
from ray.serve._private.config import DeploymentConfig, ReplicaConfig  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from zerocopy_operator.manifests import build_cluster_rayservice, build_rayservice  # noqa: E402
from zerocopy_operator.placement import plan_cluster  # noqa: E402
from zerocopy_operator.resources import parse_cluster_spec  # noqa: E402
from zerocopy_operator.validation import InvalidSpec, validate, validate_cluster  # noqa: E402
from zerocopy_runtime.config import AppArgs  # noqa: E402
from zerocopy_runtime.contract import ROUTER_APP, RouterArgs  # noqa: E402

#: libyaml's loader where PyYAML has it: the pure-Python one costs more than the rest of a check.
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
ZCM_SCHEMA = openapi_schema(ROOT / "crds" / "zerocopymodels.zerocopy.dev.yaml", "v1alpha1")
ZCC_SCHEMA = openapi_schema(ROOT / "crds" / "zerocopyclusters.zerocopy.dev.yaml", "v1alpha1")
KUBERAY_SCHEMA = openapi_schema(KUBERAY, "v1")
#: The least spec of each kind the API server takes: what a node drawn alone is placed in (`rules_hold`).
_ARCHITECTURE = {"factory": "models:build"}
LEAST_SPEC: dict[str, dict[str, Any]] = {
    KIND: {"model": {"uri": "/m", "architecture": _ARCHITECTURE}},
    CLUSTER_KIND: {},
}

# --- generation ---------------------------------------------------------------------------------

#: ALNUM first: a name shrinks towards "a", "aa", ...
_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_LETTERS = _ALNUM[:26]


@st.composite
def names(draw: st.DrawFn) -> str:
    """metadata.name: mostly a name both CRDs take (a DNS-1035 label of at most 47 characters: KubeRay's limit on
    RayService names, which the CRDs' rules enforce), lengths at that limit drawn often; now and then any DNS-1123
    label of up to 63 characters, which the API server may refuse (and the example is given up)."""
    if draw(biased_coin(0.1)):
        size, first = draw(st.integers(1, 63) | st.sampled_from([47, 48, 63])), _ALNUM
    else:
        size, first = draw(st.integers(1, 47) | st.sampled_from([1, 46, 47])), _LETTERS
    if size == 1:
        return draw(st.sampled_from(first))
    middle = draw(st.text(_ALNUM + "-", min_size=size - 2, max_size=size - 2))
    return draw(st.sampled_from(first)) + middle + draw(st.sampled_from(_ALNUM))


#: The string side of an int-or-string. The CRD gives these fields no pattern, so any string is CRD-valid
#: and some are drawn; but they are Kubernetes quantities, so mostly draw what people write ("4", "512Mi",
#: "500m") and the rest of Kubernetes' quantity grammar (signs, ".5", exponents, n and u), or no example
#: would get past the quantity checks and the rendering branch would go untested.
QUANTITY_TEXT = st.one_of(
    st.from_regex(r"[1-9][0-9]{0,3}(\.[0-9]{1,2})?(Ki|Mi|Gi|Ti|m|k|M|G)?", fullmatch=True),
    st.from_regex(r"[1-9][0-9]{0,2}(Mi|Gi)", fullmatch=True),
    st.from_regex(
        r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?", fullmatch=True
    ),
    st.text(max_size=8),
)


def field_path(path: NodePath) -> str:
    """A node's path as the API server writes it in a refusal: `spec.cluster.workerGroups[0]`."""
    return "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in path).lstrip(".")


def rules_hold(cluster: Cluster, kind: str) -> Keep:
    """A `keep` for `strategy_for`: the API server's verdict on a node's own CEL rules, for a value drawn for it.

    The value is placed alone in the least resource of `kind` (other nodes' refusals are not its own) and
    dry-run created; the node is refused where the server names one of the node's rules at the node's path.
    """

    def keep(path: NodePath, node: dict[str, Any], value: Any) -> bool:
        if node.get("type") != "object":  # the server names other values in its refusals, not "object"
            raise NotImplementedError(f"rules_hold reads the refusals of rules on objects only, not on {node}")
        resource = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": "m"}, "spec": LEAST_SPEC[kind]}
        resource = place(copy.deepcopy(resource), path, value)
        try:
            cluster.dry_run_create(resource, NAMESPACE)
        except Refused as refused:
            where = field_path(path)
            messages = [
                rule.get("message") or f"failed rule: {rule['rule']}" for rule in node["x-kubernetes-validations"]
            ]
            return not any(f'{where}: Invalid value: "object": {message}' in refused.message for message in messages)
        return True

    return keep


def place(resource: dict[str, Any], path: NodePath, value: Any) -> dict[str, Any]:
    """`resource` with `value` at `path` (replacing what was there; objects and one-item lists made on the way)."""
    target: Any = resource
    for key, after in itertools.pairwise(path):
        fresh: Any = [None] if isinstance(after, int) else {}
        if isinstance(key, int):  # the one item of a list made on the way
            target[key] = fresh if target[key] is None else target[key]
        else:
            target.setdefault(key, fresh)
        target = target[key]
    target[path[-1]] = value
    return resource


@st.composite
def dry_runs(
    draw: st.DrawFn, cluster: Cluster, kind: str, specs: st.SearchStrategy[Any]
) -> tuple[dict[str, Any], dict[str, Any] | Refused]:
    """A resource of `kind` as written (`kubectl apply -f`), and the API server's answer to its creation: the
    resource as it would store it (defaulted), or its refusal."""
    resource = {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": draw(names()), "namespace": NAMESPACE},
        "spec": draw(specs),
    }
    return resource, answer(cluster, resource)


def answer(cluster: Cluster, resource: dict[str, Any]) -> dict[str, Any] | Refused:
    """The API server's answer to creating `resource` (a dry run): the resource as it would store it, or why not."""
    try:
        return cluster.dry_run_create(copy.deepcopy(resource), NAMESPACE)
    except Refused as refused:
        return refused


def stored_or_reject(written: dict[str, Any], reply: dict[str, Any] | Refused) -> dict[str, Any]:
    """The resource as stored; where the API server refused it, `zerocopy validate` must refuse it too (or it
    would pass what `kubectl apply` refuses), and the example is given up: a cluster never has it."""
    if not isinstance(reply, Refused):
        return reply
    kind = written["kind"]
    for reason in refusal_reasons(reply.message):
        event(f"the API server refused the {kind}: {reason}")
    check = validate if kind == KIND else validate_cluster
    assert refusal(check, copy.deepcopy(written)) is not None, (
        f"the API server refuses the {kind}, but {check.__name__}() takes it: {reply.message}"
    )
    reject()


def refusal_reasons(message: str) -> list[str]:
    """The reasons in an API server's refusal, without the values (so that Hypothesis' statistics group them):
    each CEL rule it names by its message, else the refusal's start."""
    named = [rule for rule in RULE_MESSAGES if f": {rule}" in message]
    return named or [re.sub(r'"[^"]*"', '"..."', message)[:160]]


def _rule_messages(node: Any) -> set[str]:
    if isinstance(node, list):
        return set().union(*map(_rule_messages, node)) if node else set()
    if not isinstance(node, dict):
        return set()
    own = {str(rule.get("message") or "") for rule in node.get("x-kubernetes-validations", [])} - {""}
    return own.union(*(_rule_messages(value) for key, value in node.items() if key != "x-kubernetes-validations"))


RULE_MESSAGES = sorted(_rule_messages([ZCM_SCHEMA, ZCC_SCHEMA]), key=len, reverse=True)


# --- what KubeRay and Serve accept ---------------------------------------------------------------

#: KubeRay's MaxRayServiceNameLength (MaxRayClusterNameLength 53 minus the 6 characters of the cluster suffix).
MAX_RAYSERVICE_NAME = 47
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
_UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}


# What KubeRay's controller refuses beyond its CRD schema, for the fields a rendered RayService sets: a port of
# ValidateRayServiceMetadata and ValidateRayServiceSpec (with the parts of ValidateRayClusterSpec they call) in
# ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0. A RayService failing them never gets a cluster.


def kuberay_metadata_problems(rayservice: dict[str, Any]) -> list[str]:
    """ValidateRayServiceMetadata: the name becomes the RayCluster's (plus 6 characters) and its Services'."""
    name = rayservice["metadata"]["name"]
    problems = []
    if len(name) > MAX_RAYSERVICE_NAME:
        problems.append(f"RayService name should be no more than {MAX_RAYSERVICE_NAME} characters: {name!r}")
    if len(name) > 63 or not _DNS1035.match(name):
        problems.append(f"RayService name should be a valid DNS1035 label (a letter first): {name!r}")
    return problems


def kuberay_cluster_problems(rayservice: dict[str, Any]) -> list[str]:
    """ValidateRayClusterSpec, for the fields a rendered cluster sets."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    problems = []
    groups = [("Head", cluster["headGroupSpec"])] + [
        (g.get("groupName"), g) for g in cluster.get("workerGroupSpecs", [])
    ]
    for group_name, group in groups:
        if not group["template"]["spec"].get("containers"):
            problems.append(f"{group_name} group should have at least one container")
        params = group.get("rayStartParams", {})
        if "labels" in params:
            problems.append(f"rayStartParams['labels'] is not supported for {group_name} group")
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            problems.append(f"resource fields set in both rayStartParams and resources for {group_name} group")
        if group_name == "Head":
            continue
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            problems.append(f"worker group {group_name} must set both minReplicas and maxReplicas")
        if low is not None and high is not None and low > high:
            problems.append(f"worker group {group_name} has minReplicas {low} greater than maxReplicas {high}")
    return problems


def kuberay_upgrade_problems(rayservice: dict[str, Any]) -> list[str]:
    """ValidateRayServiceSpec's upgrade checks and ValidateClusterUpgradeOptions (its feature gate on)."""
    strategy = rayservice["spec"].get("upgradeStrategy") or {}
    kind = strategy.get("type")
    if kind is not None and kind not in _UPGRADE_TYPES:
        return [f"Spec.UpgradeStrategy.Type value {kind} is invalid"]
    if kind != "NewClusterWithIncrementalUpgrade":
        return []
    problems = []
    if not rayservice["spec"]["rayClusterConfig"].get("enableInTreeAutoscaling"):
        problems.append("Ray Autoscaler (enableInTreeAutoscaling) is required for NewClusterWithIncrementalUpgrade")
    options = strategy.get("clusterUpgradeOptions")
    if options is None:
        return [*problems, "ClusterUpgradeOptions are required for NewClusterWithIncrementalUpgrade"]
    surge, step = options.get("maxSurgePercent", 100), options.get("stepSizePercent")
    if not 0 <= surge <= 100:
        problems.append("maxSurgePercent must be between 0 and 100")
    if step is None or not 0 <= step <= 100:
        problems.append("stepSizePercent must be between 0 and 100")
    elif step > surge:
        problems.append(f"stepSizePercent ({step}) must be less than or equal to maxSurgePercent ({surge})")
    if (options.get("intervalSeconds") or 0) <= 0:
        problems.append("intervalSeconds must be greater than 0")
    if not options.get("gatewayClassName"):
        problems.append("gatewayClassName is required for NewClusterWithIncrementalUpgrade")
    return problems


def assert_kuberay_accepts(kube: Cluster, rayservice: dict[str, Any]) -> None:
    """The API server takes the RayService under KubeRay's CRD (its schema and CEL rules; an unknown field, which
    a cluster would silently drop, refused), KubeRay's controller takes it, and its integers fit KubeRay's Go types.

    One assertion per source, so that Hypothesis reports each kind of refusal as a bug of its own.
    """
    try:
        kube.dry_run_create(copy.deepcopy(rayservice), NAMESPACE)
    except Refused as refused:
        raise AssertionError(f"the API server refuses the RayService ({refused.status}): {refused.message}") from None
    overflows = integer_format_violations(KUBERAY_SCHEMA, rayservice)
    assert not overflows, "KubeRay's Go types cannot hold:\n" + "\n".join(overflows)
    named = kuberay_metadata_problems(rayservice)
    assert not named, "KubeRay refuses the RayService's name:\n" + "\n".join(named)
    clustered = kuberay_cluster_problems(rayservice)
    assert not clustered, "KubeRay refuses the RayService's cluster:\n" + "\n".join(clustered)
    upgrading = kuberay_upgrade_problems(rayservice)
    assert not upgrading, "KubeRay refuses the RayService's upgrade strategy:\n" + "\n".join(upgrading)


def assert_serve_accepts(rayservice: dict[str, Any], applications: int = 1) -> None:
    """Serve deploys the serveConfigV2 as it would in the cluster, and the runtime takes the app's args.

    Serve validates the config with ServeDeploySchema, then builds each
    deployment's DeploymentConfig and ReplicaConfig from the overrides
    (ray.serve._private.application_state.override_deployment_info); both
    are pure, so no Ray is started.
    """
    config = yaml.load(rayservice["spec"]["serveConfigV2"], Loader=SafeLoader)
    apps = ServeDeploySchema.model_validate(config).applications
    models = [app for app in apps if app.name != ROUTER_APP]  # a cluster's OpenAI router comes with text models
    assert len(models) == applications, f"expected {applications} Serve applications, got {len(models)}"
    for app in apps:
        if app.name == ROUTER_APP:
            RouterArgs.model_validate(app.args)
        else:
            AppArgs.model_validate(app.args)
        assert app.deployments, "the Serve application sets no deployment options (replicas, resources)"
        for deployment in app.deployments:
            options = deployment.model_dump(exclude_unset=True)
            options.pop("name")
            ReplicaConfig.create(app.import_path, ray_actor_options=options.pop("ray_actor_options", {}))
            DeploymentConfig(**options, request_router_config=_ROUTER)


#: Serve's default request router, built (and cloudpickled) once instead of per DeploymentConfig: 35 ms each.
_ROUTER = DeploymentConfig().request_router_config


def outcome(kube: Cluster, resource: dict[str, Any]) -> str:
    """'refused' or 'rendered' for a ZeroCopyModel; raises (failing the test) for anything in between."""
    spec = validated(validate, resource)
    if spec is None:
        return "refused"
    if spec.cluster_ref is None:
        rayservice = build_rayservice(resource, IMAGE)
    else:  # one application of its ZeroCopyCluster's RayService, placed as the operator places it
        cluster = default_cluster(kube, spec.cluster_ref.name)
        plan = plan_cluster(spec.cluster_ref.name, parse_cluster_spec(cluster), [resource], {})
        (member,) = plan.members
        if member.problems:
            assert all(problem.strip() for problem in member.problems), f"a problem without a message: {plan}"
            return "refused"
        rayservice = build_cluster_rayservice(cluster, plan.applications, IMAGE)
    assert_kuberay_accepts(kube, rayservice)
    assert_serve_accepts(rayservice)
    return "rendered"


def validated(check: Any, resource: dict[str, Any]) -> Any:
    """What `check` (`validate`, `validate_cluster`) returns, or None where it refuses with an `InvalidSpec`, which
    must say why; each resource is validated once."""
    try:
        return check(resource)
    except InvalidSpec as refused:
        message = str(refused)
    assert message.strip(), "InvalidSpec without a message"
    return None


def refusal(check: Any, resource: dict[str, Any]) -> str | None:
    """The message of the `InvalidSpec` that `check` (`validate`, `validate_cluster`) raises, or None."""
    try:
        check(resource)
    except InvalidSpec as refused:
        return str(refused)
    return None


def default_cluster(kube: Cluster, name: str) -> dict[str, Any]:
    """ZeroCopyCluster `name` with every field left to its default, as the API server stores it (the model fixes
    no shape of its cluster); the operator must take it."""
    written = {"apiVersion": API_VERSION, "kind": CLUSTER_KIND, "metadata": {"name": name, "namespace": NAMESPACE}}
    stored = kube.dry_run_create({**written, "spec": {}}, NAMESPACE)
    refused = refusal(validate_cluster, stored)
    assert refused is None, f"validate_cluster() refuses ZeroCopyCluster {name} with its defaults: {refused}"
    return stored


#: The model a drawn ZeroCopyCluster is rendered with: the least one, on that cluster.
MEMBER = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "member", "namespace": NAMESPACE}}


def cluster_outcome(kube: Cluster, resource: dict[str, Any]) -> str:
    """'refused' or 'rendered' for a ZeroCopyCluster; raises (failing the test) for anything in between."""
    spec = validated(validate_cluster, resource)
    if spec is None:
        return "refused"
    name = resource["metadata"]["name"]
    member = {**MEMBER, "spec": {**LEAST_SPEC[KIND], "clusterRef": {"name": name}}}
    plan = plan_cluster(name, spec, [member], {})  # no application where the member does not fit: Serve runs none
    rayservice = build_cluster_rayservice(resource, plan.applications, IMAGE)
    assert_kuberay_accepts(kube, rayservice)
    assert_serve_accepts(rayservice, applications=len(plan.applications))
    return "rendered"


# --- the properties -----------------------------------------------------------------------------

#: Examples per property: each costs a few dry runs (about 3 ms each) and Serve's config checks.
MODEL_EXAMPLES, CLUSTER_EXAMPLES = 400, 150
#: What the generator means to draw from (each CRD's schema as JSON Schema): checks the generator itself, since
#: the API server's refusal of a drawn resource is no failure (the example is given up, silently).
GENERATED_SPECS = {
    kind: jsonschema.Draft7Validator(
        to_json_schema(schema["properties"]["spec"], max_items=2**31, max_properties=2**31, max_length=2**31)
    )
    for kind, schema in ((KIND, ZCM_SCHEMA), (CLUSTER_KIND, ZCC_SCHEMA))
}
PROPERTY_SETTINGS = settings(
    deadline=None,
    print_blob=True,  # and the example database (.hypothesis/, which ignores itself) replays a failure next run
    phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],  # no "explain": minutes per bug
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


#: How often optional fields are drawn where half the time would have the CRD's rules refuse most specs, each then
#: drawn again whole: a model without an architecture needs engine vllm, and serving.vllm goes with engine vllm only.
#: No clusterRef: `model_specs` puts one on a quarter of the models.
PRESENCE: dict[str, dict[NodePath, float]] = {
    KIND: {("spec", "model", "architecture"): 0.9, ("spec", "clusterRef"): 0, ("spec", "serving", "vllm"): 0.25},
    CLUSTER_KIND: {},
}
#: What a model on a ZeroCopyCluster leaves to its cluster (the CRD's rule refuses them beside spec.clusterRef).
CLUSTER_FIELDS = ("cluster", "upgradeStrategy")
CLUSTER_REFS = strategy_for(ZCM_SCHEMA["properties"]["spec"]["properties"]["clusterRef"], path=("spec", "clusterRef"))


def specs_of(kube: Cluster, kind: str, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Specs of `kind` drawn from its CRD's schema, each node's CEL rules holding as the API server says."""
    formats = {INT_OR_STRING: QUANTITY_TEXT}
    keep = rules_hold(kube, kind)
    return strategy_for(schema["properties"]["spec"], formats, keep=keep, path=("spec",), presence=PRESENCE[kind])


def model_specs(kube: Cluster) -> st.SearchStrategy[dict[str, Any]]:
    """ZeroCopyModel specs, a quarter of them on a ZeroCopyCluster: drawn whole, a spec with a clusterRef would
    seldom also leave out both cluster fields, and models on a cluster would be a few in a hundred."""
    own = specs_of(kube, KIND, ZCM_SCHEMA)

    @st.composite
    def draw_spec(draw: st.DrawFn) -> dict[str, Any]:
        spec = dict(draw(own))
        if draw(biased_coin(0.25)):
            for name in CLUSTER_FIELDS:
                spec.pop(name, None)
            spec["clusterRef"] = draw(CLUSTER_REFS)
        return spec

    return draw_spec()


def test_every_model_the_api_server_accepts_is_refused_with_a_reason_or_renders_a_servable_rayservice(
    kube_cluster: Cluster,
) -> None:
    """Both as written and as stored (defaulted); and both outcomes must occur, or the test says nothing."""
    seen: Counter[str] = Counter()

    @settings(PROPERTY_SETTINGS, max_examples=MODEL_EXAMPLES)
    @given(dry_runs(kube_cluster, KIND, model_specs(kube_cluster)))
    def check(example: tuple[dict[str, Any], dict[str, Any] | Refused]) -> None:
        written, reply = example
        GENERATED_SPECS[KIND].validate(written["spec"])
        stored = stored_or_reject(written, reply)
        for variant, resource in (("as written", written), ("as stored, defaulted", stored)):
            note(f"checking the resource {variant}")
            result = outcome(kube_cluster, copy.deepcopy(resource))  # the example stays as drawn, for the report
            event(f"{result} ({variant})")
            seen[result] += 1

    check()
    total = sum(seen.values())
    assert seen["rendered"] >= total // 10, f"too few generated models render ({seen}): the property is barely tested"
    assert seen["refused"] >= total // 20, f"too few generated models are refused ({seen})"


def test_every_cluster_the_api_server_accepts_is_refused_with_a_reason_or_renders_a_servable_rayservice(
    kube_cluster: Cluster,
) -> None:
    """The same for ZeroCopyClusters, rendered with one model on them as the operator renders them."""
    seen: Counter[str] = Counter()

    @settings(PROPERTY_SETTINGS, max_examples=CLUSTER_EXAMPLES)
    @given(dry_runs(kube_cluster, CLUSTER_KIND, specs_of(kube_cluster, CLUSTER_KIND, ZCC_SCHEMA)))
    def check(example: tuple[dict[str, Any], dict[str, Any] | Refused]) -> None:
        written, reply = example
        GENERATED_SPECS[CLUSTER_KIND].validate(written["spec"])
        stored = stored_or_reject(written, reply)
        for variant, resource in (("as written", written), ("as stored, defaulted", stored)):
            note(f"checking the resource {variant}")
            result = cluster_outcome(kube_cluster, copy.deepcopy(resource))
            event(f"{result} ({variant})")
            seen[result] += 1

    check()
    total = sum(seen.values())
    assert seen["rendered"] >= total // 10, f"too few generated clusters render ({seen}): the property is barely tested"
    assert seen["refused"] >= total // 20, f"too few generated clusters are refused ({seen})"


# --- edge cases the property found ---------------------------------------------------------------------

_INCREMENTAL = {"type": "NewClusterWithIncrementalUpgrade"}
_INCREMENTAL_OPTIONS = {"gatewayClassName": "istio", "stepSizePercent": 10, "intervalSeconds": 30}
#: Each one was CRD-valid and neither refused nor servable once (the CRD has rules against most since); Hypothesis
#: finds them only now and then, so they are checked every run. The spec is merged over a minimal model.
EDGE_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "config-with-factory": ("m", {"model": {"uri": "/m", "architecture": {"factory": "a:b", "config": "c.json"}}}),
    "kwargs-with-transformers": (
        "m",
        {"model": {"uri": "/m", "architecture": {"transformers": "A", "kwargs": {"k": 1}}}},
    ),
    "zero-replicas": ("m", {"serving": {"replicas": 0}}),
    "scheme-inside-a-path": ("m", {"model": {"uri": "/a://b", "architecture": _ARCHITECTURE}}),
    "name-of-48": ("m" * 48, {}),
    "name-starting-with-a-digit": ("0m", {}),
    "incremental-without-autoscaler": ("m", {"upgradeStrategy": {**_INCREMENTAL, "incremental": _INCREMENTAL_OPTIONS}}),
    "incremental-empty-gateway-class": (
        "m",
        {
            "cluster": {"enableInTreeAutoscaling": True},
            "upgradeStrategy": {**_INCREMENTAL, "incremental": {**_INCREMENTAL_OPTIONS, "gatewayClassName": ""}},
        },
    ),
    "incremental-step-over-surge": (
        "m",
        {
            "cluster": {"enableInTreeAutoscaling": True},
            "upgradeStrategy": {
                **_INCREMENTAL,
                "incremental": {**_INCREMENTAL_OPTIONS, "stepSizePercent": 50, "maxSurgePercent": 10},
            },
        },
    ),
    "incremental-interval-over-int32": (
        "m",
        {
            "cluster": {"enableInTreeAutoscaling": True},
            "upgradeStrategy": {**_INCREMENTAL, "incremental": {**_INCREMENTAL_OPTIONS, "intervalSeconds": 2**31}},
        },
    ),
    "cpus-below-ray-precision": ("m", {"serving": {"cpusPerReplica": 5e-324}}),
    "gpus-below-ray-precision": ("m", {"serving": {"gpusPerReplica": 1e-12}}),
}


@pytest.mark.parametrize(("name", "spec"), list(EDGE_CASES.values()), ids=list(EDGE_CASES))
def test_edge_case_is_refused_by_the_api_server_or_validate_or_renders(
    name: str, spec: dict[str, Any], kube_cluster: Cluster
) -> None:
    """The property on one resource; where the API server refuses it (a cluster never has it), validate() must too."""
    resource = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {**LEAST_SPEC[KIND], **spec},
    }
    stored = answer(kube_cluster, resource)
    if isinstance(stored, Refused):
        assert refusal(validate, resource) is not None, f"the API server refuses it, validate() takes it: {stored}"
        return
    for variant in (resource, stored):
        outcome(kube_cluster, copy.deepcopy(variant))
