"""``docker/deploy``: create or tear down the SageMaker endpoint for the streamasr image.

    docker/deploy create --name streamasr --image <ecr uri> --role <execution role arn> \\
        [--region us-east-1] [--instance-type ml.g5.xlarge] [--count 1] [--kms-key <arn>] \\
        [--subnets subnet-a,subnet-b --security-groups sg-1] [--inference-ami <version>] \\
        [--autoscale-min 1 --autoscale-max 4 --target-concurrency N] [--wait] [--dry-run]
    docker/deploy delete --name streamasr [--dry-run]
    docker/deploy base-image --region eu-south-2 [--triton-tag 25.09-py3] [--build-args]

Each step is one AWS API call: ``plan_create``/``plan_delete`` return them as data
(service, operation, arguments); ``execute`` runs them with boto3 clients, or with
``--dry-run`` only prints them.  Names: model ``<name>``, endpoint config ``<name>``,
endpoint ``<name>``, variant ``AllTraffic``.  Data capture stays off unless
``--data-capture-s3`` is given (it would store audio and transcripts).  Autoscaling is
registered only once the endpoint is InService (``RegisterScalableTarget`` fails on an
endpoint that is still Creating), with or without ``--wait``.  ``base-image`` prints the
SageMaker Triton base image (or ``docker build`` arguments) for a region: the registry
account differs between regions (streamasr/sagemaker/deploy/images.py).

GPU instances get ``InferenceAmiVersion`` (driver 580 / CUDA 13.0): without it a
real-time instance keeps an older default driver that the CUDA 13 base image (25.09)
cannot run on.  Nothing but ``/ping``, ``/invocations`` and the bidirectional WebSocket
reaches a SageMaker container (the runtime API is the only way in), so there is no
option to expose Triton's gRPC port.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from streamasr.cli import argument_parser
from streamasr.core import admission

log = logging.getLogger("streamasr.deploy")

VARIANT = "AllTraffic"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
# Concurrent requests per model container, sampled every 10 s; an open bidirectional
# stream counts as a request in flight until it closes.
CONCURRENCY_METRIC = "SageMakerVariantConcurrentRequestsPerModelHighResolution"
INVOCATIONS_METRIC = "SageMakerVariantInvocationsPerInstance"
# CreateEndpointConfig fails when KmsKeyId is given for an instance type with local
# (NVMe instance store) storage: Nitro encrypts those volumes in hardware (AWS API
# reference, CreateEndpointConfig, KmsKeyId; the families are those whose EC2 twins have
# instance store volumes).  Families with a "d" attribute (m5d, c6id, g4dn, p4de, ...) have
# it by naming convention; these have it without the letter.
LOCAL_STORAGE_FAMILIES = {
    "g5",
    "g6",
    "g6e",
    "gr6",
    "p5",
    "p5e",
    "p5en",
    "p6-b200",
    "p6e-gb200",
    "trn1",
    "trn1n",
    "trn2",
    "x2iedn",
}
# The inference AMI for GPU variants (botocore's ProductionVariantInferenceAmiVersion):
# NVIDIA driver 580, CUDA 13.0 -- what sagemaker-tritonserver:25.09-py3 (CUDA 13) needs;
# older default drivers would need CUDA forward compatibility, which not every GPU has.
GPU_INFERENCE_AMI = "al2023-ami-sagemaker-inference-gpu-4-1"
# Instance families with NVIDIA GPUs (ml.g4dn, ml.g5, ml.g6, ml.g6e, ml.p4d, ml.p5, ...).
GPU_FAMILY = re.compile(r"^(g|gr|p)\d")
# AWS's default waiter polls DescribeEndpoint every 30 s (up to 120 times).
WAITER_DELAY_S = 30
WAITER_MAX_ATTEMPTS = 120


@dataclass
class Call:
    service: str  # boto3 client name
    operation: str  # snake_case method
    params: dict[str, Any]
    # error codes that mean "already in the wanted state" (teardown of absent things)
    tolerate: tuple[str, ...] = field(default=())
    # the endpoint must be InService before this call (autoscaling registration)
    needs_in_service: bool = False

    def render(self) -> str:
        return (
            f"{self.service}.{self.operation}({json.dumps(self.params, indent=2, sort_keys=True)})"
        )


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"--env takes KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        env[k] = v
    return env


def container_environment(a: argparse.Namespace) -> dict[str, str]:
    env = {"SAGEMAKER_TRITON_LOG_VERBOSE": "false", "STREAMASR_LOG_LEVEL": "INFO"}
    env.update(_env_pairs(a.env or []))
    return env


def has_local_instance_storage(instance_type: str) -> bool:
    """True for SageMaker instance types with NVMe instance store (``ml.g5.xlarge``...)."""
    family = instance_type.removeprefix("ml.").split(".")[0]
    if family in LOCAL_STORAGE_FAMILIES:
        return True
    m = re.fullmatch(r"[a-z]+\d+([a-z]*)", family)
    return bool(m and "d" in m[1])


def is_gpu_instance(instance_type: str) -> bool:
    return bool(GPU_FAMILY.match(instance_type.removeprefix("ml.")))


def inference_ami(a: argparse.Namespace) -> str | None:
    """--inference-ami; by default GPU_INFERENCE_AMI on GPU instance types, none on CPU
    ones ("none" leaves it to SageMaker)."""
    if a.inference_ami is not None:
        return None if a.inference_ami == "none" else a.inference_ami
    return GPU_INFERENCE_AMI if is_gpu_instance(a.instance_type) else None


def resource_id(name: str) -> str:
    return f"endpoint/{name}/variant/{VARIANT}"


def plan_create(a: argparse.Namespace) -> list[Call]:
    if a.kms_key and has_local_instance_storage(a.instance_type):
        raise ValueError(
            f"--kms-key cannot be used with {a.instance_type}: it has local NVMe instance "
            "storage, which Nitro encrypts in hardware, and CreateEndpointConfig rejects a "
            "KmsKeyId for such instance types; drop --kms-key (use --data-capture-kms-key "
            "to encrypt captured data) or choose an instance type without local storage"
        )
    container: dict[str, Any] = {"Image": a.image, "Environment": container_environment(a)}
    if a.model_data_url:
        container["ModelDataUrl"] = a.model_data_url
    model: dict[str, Any] = {
        "ModelName": a.name,
        "ExecutionRoleArn": a.role,
        "PrimaryContainer": container,
    }
    if a.subnets or a.security_groups:
        if not (a.subnets and a.security_groups):
            raise ValueError("VPC mode needs both --subnets and --security-groups")
        model["VpcConfig"] = {
            "Subnets": a.subnets.split(","),
            "SecurityGroupIds": a.security_groups.split(","),
        }
    if a.network_isolation:
        model["EnableNetworkIsolation"] = True
    variant = {
        "VariantName": VARIANT,
        "ModelName": a.name,
        "InstanceType": a.instance_type,
        "InitialInstanceCount": a.count,
        "InitialVariantWeight": 1.0,
        "ContainerStartupHealthCheckTimeoutInSeconds": a.startup_timeout,
    }
    ami = inference_ami(a)
    if ami:
        variant["InferenceAmiVersion"] = ami
    epc: dict[str, Any] = {"EndpointConfigName": a.name, "ProductionVariants": [variant]}
    if a.kms_key:
        epc["KmsKeyId"] = a.kms_key
    if a.data_capture_s3:
        epc["DataCaptureConfig"] = {
            "EnableCapture": True,
            "InitialSamplingPercentage": a.data_capture_percent,
            "DestinationS3Uri": a.data_capture_s3,
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        }
        capture_key = a.data_capture_kms_key or a.kms_key
        if capture_key:
            epc["DataCaptureConfig"]["KmsKeyId"] = capture_key
    calls = [
        Call("sagemaker", "create_model", model),
        Call("sagemaker", "create_endpoint_config", epc),
        Call(
            "sagemaker", "create_endpoint", {"EndpointName": a.name, "EndpointConfigName": a.name}
        ),
    ]
    if a.autoscale_max:
        calls += plan_autoscaling(a)
    return calls


def concurrency_target(a: argparse.Namespace) -> float:
    """Concurrent sessions per instance to aim at: ``--target-concurrency``, else a share
    of the instance's admission limit: the container's STREAMASR_MAX_ACTIVE_STREAMS
    override when --env sets one, else ``--streams-per-instance`` (what the instance type's
    start-up calibration picks: its log line "admission limit N streams (calibrated ...)"
    or the streamasr_stream_capacity metric), else the fallback limit."""
    if a.target_concurrency is not None:
        return float(a.target_concurrency)
    override = container_environment(a).get(admission.ENV_LIMIT, "").strip()
    limit = admission.parse_limit(override, admission.ENV_LIMIT) if override else None
    return admission.autoscale_target(limit or a.streams_per_instance)


def plan_autoscaling(a: argparse.Namespace) -> list[Call]:
    if a.autoscale_max < a.autoscale_min:
        raise ValueError("--autoscale-max must be >= --autoscale-min")
    metric = CONCURRENCY_METRIC if a.scale_on == "concurrency" else INVOCATIONS_METRIC
    target = concurrency_target(a) if a.scale_on == "concurrency" else a.target_invocations
    rid = resource_id(a.name)
    return [
        Call(
            "application-autoscaling",
            "register_scalable_target",
            {
                "ServiceNamespace": "sagemaker",
                "ResourceId": rid,
                "ScalableDimension": SCALABLE_DIMENSION,
                "MinCapacity": a.autoscale_min,
                "MaxCapacity": a.autoscale_max,
            },
            needs_in_service=True,
        ),
        Call(
            "application-autoscaling",
            "put_scaling_policy",
            {
                "PolicyName": f"{a.name}-{a.scale_on}",
                "ServiceNamespace": "sagemaker",
                "ResourceId": rid,
                "ScalableDimension": SCALABLE_DIMENSION,
                "PolicyType": "TargetTrackingScaling",
                "TargetTrackingScalingPolicyConfiguration": {
                    "TargetValue": float(target),
                    "PredefinedMetricSpecification": {"PredefinedMetricType": metric},
                    # streams are long: scale out fast, in slowly
                    "ScaleOutCooldown": 60,
                    "ScaleInCooldown": 600,
                },
            },
        ),
    ]


def plan_delete(a: argparse.Namespace) -> list[Call]:
    gone = ("ValidationException", "ObjectNotFoundException", "ResourceNotFound")
    return [
        Call(
            "application-autoscaling",
            "deregister_scalable_target",
            {
                "ServiceNamespace": "sagemaker",
                "ResourceId": resource_id(a.name),
                "ScalableDimension": SCALABLE_DIMENSION,
            },
            tolerate=gone,
        ),
        Call("sagemaker", "delete_endpoint", {"EndpointName": a.name}, tolerate=gone),
        Call("sagemaker", "delete_endpoint_config", {"EndpointConfigName": a.name}, tolerate=gone),
        Call("sagemaker", "delete_model", {"ModelName": a.name}, tolerate=gone),
    ]


def wait_in_service(
    client, name: str, delay_s: float = WAITER_DELAY_S, max_attempts: int = WAITER_MAX_ATTEMPTS
) -> None:
    """boto3's ``endpoint_in_service`` waiter (DescribeEndpoint until InService; fails
    at once on Failed)."""
    log.info("waiting for endpoint %s to be InService", name)
    client.get_waiter("endpoint_in_service").wait(
        EndpointName=name, WaiterConfig={"Delay": delay_s, "MaxAttempts": max_attempts}
    )


def execute(
    calls: list[Call],
    client_for: Callable[[str], Any] | None,
    dry_run: bool,
    out: TextIO,
    wait: Callable[[Any], None] | None = None,
    wait_before: Callable[[Any], None] | None = None,
) -> list[Any]:
    """Run (or with dry_run only print) the calls in order; returns the responses.
    ``wait_before(sagemaker_client)`` runs once before the first call that needs the
    endpoint InService; ``wait(sagemaker_client)`` after create_endpoint (``--wait``)."""
    from botocore.exceptions import ClientError

    results = []
    in_service = False
    for c in calls:
        if c.needs_in_service and not in_service:
            out.write(("DRY RUN " if dry_run else "") + "wait until the endpoint is InService\n")
            if not dry_run and wait_before is not None:
                assert client_for is not None
                wait_before(client_for("sagemaker"))
            in_service = True
        out.write(("DRY RUN " if dry_run else "") + c.render() + "\n")
        if dry_run:
            continue
        assert client_for is not None  # only a dry run goes without clients
        client = client_for(c.service)
        try:
            results.append(getattr(client, c.operation)(**c.params))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in c.tolerate:
                log.info("%s.%s: %s (nothing to do)", c.service, c.operation, code)
                results.append(None)
                continue
            raise
        if c.operation == "create_endpoint" and wait is not None:
            wait(client)
            in_service = True
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser("docker/deploy", __doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--region", default=None, help="AWS region (default: boto3's)")
    common.add_argument(
        "--dry-run",
        action="store_true",
        help="print every API call and its arguments; call nothing",
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "create", parents=[common], help="model + endpoint config + endpoint (+ autoscaling)"
    )
    c.add_argument("--name", required=True)
    c.add_argument("--image", required=True, help="ECR URI of the image built from Dockerfile")
    c.add_argument("--role", required=True, help="SageMaker execution role ARN")
    c.add_argument("--instance-type", default="ml.g5.xlarge")
    c.add_argument("--count", type=int, default=1)
    c.add_argument(
        "--model-data-url",
        default=None,
        help="s3://.../model.tar.gz to replace the baked-in /opt/ml/model",
    )
    c.add_argument(
        "--kms-key",
        default=None,
        help="KMS key for the instance's EBS storage volume (refused for instance "
        "types with local NVMe storage, e.g. ml.g5/ml.g6)",
    )
    c.add_argument(
        "--data-capture-kms-key",
        default=None,
        help="KMS key for captured data in S3 (default: --kms-key)",
    )
    c.add_argument("--subnets", default=None, help="comma-separated subnet ids (VPC mode)")
    c.add_argument("--security-groups", default=None, help="comma-separated SG ids")
    c.add_argument("--network-isolation", action="store_true")
    c.add_argument(
        "--inference-ami",
        default=None,
        help=f"the variant's InferenceAmiVersion (default: {GPU_INFERENCE_AMI} on GPU "
        "instance types, none on CPU ones; 'none' leaves it out)",
    )
    c.add_argument(
        "--env",
        action="append",
        metavar="KEY=VALUE",
        help="extra container environment (repeatable)",
    )
    c.add_argument(
        "--startup-timeout",
        type=int,
        default=900,
        help="ContainerStartupHealthCheckTimeoutInSeconds",
    )
    c.add_argument(
        "--data-capture-s3",
        default=None,
        help="turn data capture ON to this S3 prefix (stores audio + transcripts)",
    )
    c.add_argument("--data-capture-percent", type=int, default=100)
    c.add_argument("--autoscale-min", type=int, default=1)
    c.add_argument("--autoscale-max", type=int, default=0, help="0: no autoscaling")
    c.add_argument("--scale-on", choices=("concurrency", "invocations"), default="concurrency")
    c.add_argument(
        "--target-concurrency",
        type=float,
        default=None,
        help=f"concurrent sessions per instance to aim for (default: "
        f"{admission.AUTOSCALE_TARGET_SHARE:g} x the instance's admission limit: "
        f"--env {admission.ENV_LIMIT}=N when given, else --streams-per-instance, else "
        f"{admission.FALLBACK_STREAMS_HELD})",
    )
    c.add_argument(
        "--streams-per-instance",
        type=int,
        default=None,
        help="the admission limit the instance type's start-up calibration picks (its log: "
        '"admission limit N streams (calibrated ...)"), for the autoscaling target',
    )
    c.add_argument(
        "--target-invocations",
        type=float,
        default=600.0,
        help="invocations per instance per minute to aim for",
    )
    c.add_argument("--wait", action="store_true", help="wait until the endpoint is InService")
    d = sub.add_parser(
        "delete", parents=[common], help="autoscaling target, endpoint, endpoint config, model"
    )
    d.add_argument("--name", required=True)
    b = sub.add_parser(
        "base-image",
        parents=[common],
        help="the SageMaker Triton base image for a region (or build args)",
    )
    b.add_argument(
        "--triton-tag", default=None, help="sagemaker-tritonserver tag (default: the Dockerfile's)"
    )
    b.add_argument(
        "--build-args",
        action="store_true",
        help="print `docker build` --build-arg flags instead of the URI",
    )
    return p.parse_args(argv)


def base_image_command(a: argparse.Namespace, out: TextIO) -> int:
    from streamasr.sagemaker.deploy import images

    region = a.region
    if region is None:
        import boto3

        region = boto3.session.Session().region_name
    if not region:
        log.error("no region: pass --region or set AWS_REGION")
        return 2
    try:
        img = images.base_image(region, a.triton_tag or images.DEFAULT_TRITON_TAG)
    except images.UnknownImage as exc:
        log.error("%s", exc)
        return 2
    out.write((" ".join(img.build_args()) if a.build_args else img.uri) + "\n")
    return 0


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    a = parse_args(argv)
    if a.command == "base-image":
        return base_image_command(a, out)
    try:
        calls = plan_create(a) if a.command == "create" else plan_delete(a)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    client_for = None
    if not a.dry_run:
        import boto3

        session = boto3.session.Session(region_name=a.region)
        clients: dict[str, Any] = {}

        def client_for(service: str):
            if service not in clients:
                clients[service] = session.client(service)
            return clients[service]

    def wait(client) -> None:
        wait_in_service(client, a.name)

    execute(
        calls,
        client_for,
        a.dry_run,
        out,
        wait if getattr(a, "wait", False) else None,
        wait_before=wait,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
