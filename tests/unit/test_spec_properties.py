"""Validate means renders: every ZeroCopyModel the API server accepts is refused with a reason, or served.

The resources are generated from the committed CRD itself: its
`openAPIV3Schema` (leaves drawn by hypothesis-jsonschema, see
tests/crd_schema.py), filtered by its CEL rules run with cel-python after
the API server's defaulting, so the test follows the CRD as it changes.
Each one, as written and as stored (defaulted), must be either

(a) refused by `validate()` with an `InvalidSpec` that says why, or
(b) rendered into a RayService that KubeRay takes (its CRD schema and CEL
    rules, its controller's own checks, no field pruned, integers that fit
    its Go types) with a Serve config that Ray Serve deploys and whose app
    args the runtime's `AppArgs` accepts.

Anything in between (a crash, a RayService KubeRay refuses, a Serve config
Serve refuses) is the bug this test is for: a bad spec must be caught by
`validate()`, where it becomes a condition and an Event, not later in KubeRay
or Serve where the user sees nothing.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, Phase, assume, event, given, note, settings
from hypothesis import strategies as st

from tests.crd_schema import (
    INT_OR_STRING,
    apply_defaults,
    cel_violations,
    compile_rules,
    integer_format_violations,
    openapi_schema,
    pruned_fields,
    satisfying,
    strategy_for,
    to_json_schema,
)
from tests.kube import kuberay

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "zerocopymodels.zerocopy.dev.yaml"
KUBERAY = kuberay.crd("rayservices")
IMAGE = "runtime:test"
API_VERSION, KIND = "zerocopy.dev/v1alpha1", "ZeroCopyModel"

if reason := kuberay.missing():
    pytest.skip(f"{reason} (without them a rendered RayService cannot be checked)", allow_module_level=True)

# Imported after the skip: importing Ray's Serve schema takes a second.
from ray.serve._private.config import DeploymentConfig, ReplicaConfig  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from zerocopy_operator.manifests import (  # noqa: E402
    build_cluster_rayservice,
    build_rayservice,
    build_serve_application,
    parse_spec,
    route_prefix,
)
from zerocopy_operator.validation import InvalidSpec, validate  # noqa: E402
from zerocopy_runtime.config import AppArgs  # noqa: E402

#: libyaml's loader where PyYAML has it: the pure-Python one costs more than the rest of a check.
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
ZCM_SCHEMA = openapi_schema(CRD, "v1alpha1")
KUBERAY_SCHEMA = openapi_schema(KUBERAY, "v1")
KUBERAY_VALIDATOR = jsonschema.Draft4Validator(KUBERAY_SCHEMA)  # as tests/unit/test_manifests.py checks it
ZCM_VALIDATOR = jsonschema.Draft4Validator(ZCM_SCHEMA)
#: What the generator means to draw from (the CRD's schema as JSON Schema): checks the generator itself.
GENERATED_VALIDATOR = jsonschema.Draft7Validator(
    to_json_schema(ZCM_SCHEMA["properties"]["spec"], max_items=2**31, max_properties=2**31, max_length=2**31)
)
compile_rules(ZCM_SCHEMA)  # parse every CEL rule once, before any example runs
compile_rules(KUBERAY_SCHEMA)

# --- generation ---------------------------------------------------------------------------------

#: ALNUM first: a name shrinks towards "a", "aa", ...
_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"


@st.composite
def dns1123_labels(draw: st.DrawFn) -> str:
    """metadata.name: a DNS-1123 label of 1 to 63 characters, lengths around KubeRay's limits drawn often."""
    size = draw(st.integers(1, 63) | st.sampled_from([46, 47, 48, 53, 54, 62, 63]))
    if size == 1:
        return draw(st.sampled_from(_ALNUM))
    middle = draw(st.text(_ALNUM + "-", min_size=size - 2, max_size=size - 2))
    return draw(st.sampled_from(_ALNUM)) + middle + draw(st.sampled_from(_ALNUM))


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
SPECS = strategy_for(ZCM_SCHEMA["properties"]["spec"], custom_formats={INT_OR_STRING: QUANTITY_TEXT})


@st.composite
def crd_valid_resources(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ZeroCopyModel the API server accepts: as written (`kubectl apply -f`), and as stored (defaulted)."""
    spec = draw(SPECS)  # its nodes' CEL rules already hold; rules at the root (on metadata.name) are checked here

    def valid(name: str) -> bool:
        resource = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": "default"}}
        broken = cel_violations(ZCM_SCHEMA, apply_defaults(ZCM_SCHEMA, {**resource, "spec": spec}))
        for rule in broken:
            event(f"CEL refused: {rule.split(' (')[0]}")
        return not broken

    name = draw(satisfying(dns1123_labels(), valid))  # a new name, not a whole new spec, when a rule refuses one
    resource = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }
    stored = apply_defaults(ZCM_SCHEMA, resource)
    assume(not cel_violations(ZCM_SCHEMA, stored))  # every rule, at any depth, on the whole resource
    return resource, stored


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


def assert_kuberay_accepts(rayservice: dict[str, Any]) -> None:
    """KubeRay's CRD schema (and CEL rules) and its controller accept the RayService, and nothing is pruned.

    One assertion per source, so that Hypothesis reports each kind of refusal as a bug of its own.
    """
    schema_errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in KUBERAY_VALIDATOR.iter_errors(rayservice)
    ]
    assert not schema_errors, "KubeRay's CRD schema refuses the RayService:\n" + "\n".join(schema_errors)
    broken = cel_violations(KUBERAY_SCHEMA, rayservice)
    assert not broken, "KubeRay's CEL rules refuse the RayService:\n" + "\n".join(broken)
    overflows = integer_format_violations(KUBERAY_SCHEMA, rayservice)
    assert not overflows, "KubeRay's Go types cannot hold:\n" + "\n".join(overflows)
    unknown = pruned_fields(KUBERAY_SCHEMA["properties"]["spec"], rayservice["spec"], "spec")
    assert not unknown, "KubeRay's CRD does not know (the API server drops them):\n" + "\n".join(unknown)
    named = kuberay_metadata_problems(rayservice)
    assert not named, "KubeRay refuses the RayService's name:\n" + "\n".join(named)
    clustered = kuberay_cluster_problems(rayservice)
    assert not clustered, "KubeRay refuses the RayService's cluster:\n" + "\n".join(clustered)
    upgrading = kuberay_upgrade_problems(rayservice)
    assert not upgrading, "KubeRay refuses the RayService's upgrade strategy:\n" + "\n".join(upgrading)


def assert_serve_accepts(rayservice: dict[str, Any]) -> None:
    """Serve deploys the serveConfigV2 as it would in the cluster, and the runtime takes the app's args.

    Serve validates the config with ServeDeploySchema, then builds each
    deployment's DeploymentConfig and ReplicaConfig from the overrides
    (ray.serve._private.application_state.override_deployment_info); both
    are pure, so no Ray is started.
    """
    config = yaml.load(rayservice["spec"]["serveConfigV2"], Loader=SafeLoader)
    applications = ServeDeploySchema.model_validate(config).applications
    assert len(applications) == 1, f"expected one Serve application, got {len(applications)}"
    app = applications[0]
    AppArgs.model_validate(app.args)
    assert app.deployments, "the Serve application sets no deployment options (replicas, resources)"
    for deployment in app.deployments:
        options = deployment.model_dump(exclude_unset=True)
        options.pop("name")
        ReplicaConfig.create(app.import_path, ray_actor_options=options.pop("ray_actor_options", {}))
        DeploymentConfig(**options, request_router_config=_ROUTER)


#: Serve's default request router, built (and cloudpickled) once instead of per DeploymentConfig: 35 ms each.
_ROUTER = DeploymentConfig().request_router_config


def outcome(resource: dict[str, Any]) -> str:
    """'refused' or 'rendered'; raises (failing the test) for anything in between."""
    reason: str | None = None
    try:
        validate(resource)
    except InvalidSpec as refused:
        reason = str(refused)
    if reason is not None:
        assert reason.strip(), "InvalidSpec without a message"
        return "refused"
    spec = parse_spec(resource)
    if spec.cluster_ref is None:
        rayservice = build_rayservice(resource, IMAGE)
    else:  # one application of its ZeroCopyCluster's RayService (a default cluster: the model fixes no shape)
        application = build_serve_application(resource["metadata"]["name"], spec, route_prefix(resource, spec))
        cluster = {"metadata": {"name": spec.cluster_ref.name}, "spec": {}}
        rayservice = build_cluster_rayservice(cluster, [application], IMAGE)
    assert_kuberay_accepts(rayservice)
    assert_serve_accepts(rayservice)
    return "rendered"


# --- the property -------------------------------------------------------------------------------


def test_every_crd_valid_model_is_refused_with_a_reason_or_renders_a_servable_rayservice() -> None:
    """Both as written and as stored (defaulted); and both outcomes must occur, or the test says nothing."""
    seen: Counter[str] = Counter()

    @settings(
        max_examples=400,
        deadline=None,
        print_blob=True,  # and the example database (.hypothesis/, which ignores itself) replays a failure next run
        phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],  # no "explain": minutes per bug
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(crd_valid_resources())
    def check(resources: tuple[dict[str, Any], dict[str, Any]]) -> None:
        written, stored = resources
        # The generator's own checks: it drew what the CRD's schema accepts.
        GENERATED_VALIDATOR.validate(written["spec"])
        ZCM_VALIDATOR.validate(stored)
        for variant, resource in (("as written", written), ("as stored, defaulted", stored)):
            note(f"checking the resource {variant}")
            result = outcome(copy.deepcopy(resource))  # the example stays as drawn, for the report
            event(f"{result} ({variant})")
            seen[result] += 1

    check()
    total = sum(seen.values())
    assert seen["rendered"] >= total // 10, f"too few generated models render ({seen}): the property is barely tested"
    assert seen["refused"] >= total // 20, f"too few generated models are refused ({seen})"


# --- edge cases the property found ---------------------------------------------------------------------

_ARCHITECTURE = {"factory": "models:build"}
_INCREMENTAL = {"type": "NewClusterWithIncrementalUpgrade"}
_INCREMENTAL_OPTIONS = {"gatewayClassName": "istio", "stepSizePercent": 10, "intervalSeconds": 30}
#: Each one was CRD-valid and neither refused nor servable once; Hypothesis finds them only now and then, so
#: they are checked every run. The spec is merged over a minimal model; the name defaults to "m".
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
def test_edge_case_is_refused_by_the_crd_or_validate_or_renders(name: str, spec: dict[str, Any]) -> None:
    """The property on one resource, which holds too when the CRD itself refuses it: the API server never lets it in."""
    resource = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"model": {"uri": "/m", "architecture": _ARCHITECTURE}, **spec},
    }
    stored = apply_defaults(ZCM_SCHEMA, resource)
    if ZCM_VALIDATOR.is_valid(stored) and not cel_violations(ZCM_SCHEMA, stored):
        for variant in (resource, stored):
            outcome(copy.deepcopy(variant))
