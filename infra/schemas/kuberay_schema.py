"""Writes ``kuberay-v1.schema.json``: a JSON schema of the two KubeRay objects infra/ ships
(``RayCluster`` and ``RayJob``, API ``ray.io/v1``), the file ``tests/test_infra.py`` validates
``infra/kuberay/*.yaml`` against.

    python infra/schemas/kuberay_schema.py          (from the repository root; the test checks the
                                                     written file is what this script writes)

Where the fields come from. No Python package ships KubeRay's CRDs, and the CRD files themselves
are generated from the Go types of KubeRay's operator. The tables below are written from those
types, read in the ray-project/kuberay repository:

* ray-operator/apis/ray/v1/raycluster_types.go at 3275ee09f6a6c899c37e82ea6349785536de6bd4
  (RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, AutoscalerOptions, ScaleStrategy);
* ray-operator/apis/ray/v1/rayjob_types.go at f6ef3f7b32639dc6555797512d7cb784bd436901
  (RayJobSpec, SubmitterConfig, the submission modes);
* ray-operator/controllers/ray/utils/validation.go at 0074504f84f22d26df800ebcd2e0a3e1490e2aef,
  for the fields of later releases that the controller validates (``authOptions.mode``,
  ``autoscalerOptions.version``, the groups' ``resources`` and ``labels``, ``deletionStrategy``,
  the ``SidecarMode`` submission mode).

Each KubeRay object is closed (``additionalProperties: false``): ``kubectl apply`` validates fields
strictly against a CRD's structural schema, so a misspelt field is an error there too. The
Kubernetes types inside (pod templates, Services, env vars, ...) are referenced, not written here:
they resolve to the Kubernetes schemas the ``kubernetes-validate`` package ships, for the
Kubernetes version ``K8S_VERSION``, in their strict form.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

K8S_VERSION = "1.33.0"
K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"   # the $id of kubernetes-validate's definitions
OUT = Path(__file__).with_name("kuberay-v1.schema.json")

STRING = {"type": "string"}
BOOL = {"type": "boolean"}
INT = {"type": "integer"}
NUMBER = {"type": "number"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def k8s(name: str) -> dict:
    """A Kubernetes type by its OpenAPI name (``io.k8s.api.core.v1.PodTemplateSpec``, ...)."""
    return {"$ref": f"{K8S_DEFINITIONS}#/$defs/{name}"}


def core(kind: str) -> dict:
    return k8s(f"io.k8s.api.core.v1.{kind}")


def closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def array(items: dict) -> dict:
    return {"type": "array", "items": items}


def enum(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


AUTOSCALER_OPTIONS = closed({
    "resources": core("ResourceRequirements"), "image": STRING, "imagePullPolicy": STRING,
    "securityContext": core("SecurityContext"), "idleTimeoutSeconds": INT,
    "upscalingMode": enum("Default", "Aggressive", "Conservative"), "env": array(core("EnvVar")),
    "envFrom": array(core("EnvFromSource")), "volumeMounts": array(core("VolumeMount")), "version": enum("v1", "v2"),
})

HEAD_GROUP = closed({
    "template": core("PodTemplateSpec"), "headService": core("Service"), "enableIngress": BOOL,
    "rayStartParams": STRING_MAP, "serviceType": STRING, "resources": STRING_MAP, "labels": STRING_MAP,
}, required=("template",))

WORKER_GROUP = closed({
    "suspend": BOOL, "groupName": STRING, "replicas": INT, "minReplicas": INT, "maxReplicas": INT,
    "idleTimeoutSeconds": INT, "rayStartParams": STRING_MAP, "template": core("PodTemplateSpec"),
    "scaleStrategy": closed({"workersToDelete": array(STRING)}), "numOfHosts": INT,
    "resources": STRING_MAP, "labels": STRING_MAP,
}, required=("groupName", "template"))

RAY_CLUSTER_SPEC = closed({
    "suspend": BOOL, "managedBy": STRING, "autoscalerOptions": AUTOSCALER_OPTIONS,
    "headServiceAnnotations": STRING_MAP, "enableInTreeAutoscaling": BOOL,
    "gcsFaultToleranceOptions": {"type": "object"}, "headGroupSpec": HEAD_GROUP, "rayVersion": STRING,
    "workerGroupSpecs": array(WORKER_GROUP), "authOptions": closed({"mode": enum("disabled", "token")}),
}, required=("headGroupSpec",))

RAY_JOB_SPEC = closed({
    "activeDeadlineSeconds": INT, "backoffLimit": INT, "rayClusterSpec": RAY_CLUSTER_SPEC,
    "submitterPodTemplate": core("PodTemplateSpec"), "metadata": STRING_MAP, "clusterSelector": STRING_MAP,
    "submitterConfig": closed({"backoffLimit": INT}), "managedBy": STRING,
    "deletionPolicy": enum("DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"),
    "deletionStrategy": {"type": "object"}, "entrypoint": STRING, "runtimeEnvYAML": STRING, "jobId": STRING,
    "submissionMode": enum("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
    "entrypointResources": STRING, "entrypointNumCpus": NUMBER, "entrypointNumGpus": NUMBER,
    "ttlSecondsAfterFinished": INT, "shutdownAfterJobFinishes": BOOL, "suspend": BOOL,
})


def resource(kind: str, spec: dict) -> dict:
    return closed({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                   "metadata": k8s("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"), "spec": spec,
                   "status": {"type": "object"}}, required=("apiVersion", "kind", "metadata", "spec"))


def schema() -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "generated by infra/schemas/kuberay_schema.py (its docstring names the sources); do not edit",
        "x-kubernetes-version": K8S_VERSION,
        "$defs": {"RayCluster": resource("RayCluster", RAY_CLUSTER_SPEC), "RayJob": resource("RayJob", RAY_JOB_SPEC)},
    }


def render() -> str:
    return json.dumps(schema(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
