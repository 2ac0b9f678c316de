"""docker/deploy against botocore's Stubber (no AWS): every planned call is a valid
request for the real API model, in the right order, with the arguments we mean."""

from __future__ import annotations

import io
import subprocess
import sys

import boto3
import pytest
from botocore.stub import Stubber

from streamasr.sagemaker import deploy as dep

from ..helpers import ROOT

ROLE = "arn:aws:iam::123456789012:role/streamasr-sagemaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/streamasr:1"
KMS = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def clients():
    s = boto3.session.Session(
        aws_access_key_id="x", aws_secret_access_key="y", region_name="us-east-1"
    )
    return {
        "sagemaker": s.client("sagemaker"),
        "application-autoscaling": s.client("application-autoscaling"),
    }


def run_stubbed(calls, responses=None, errors=None, in_service=False, order=None):
    """Execute ``calls`` with stubbed clients; each call expects exactly its params.
    ``in_service``: the endpoint is Creating, then InService when the autoscaling calls
    need it (DescribeEndpoint answers for boto3's real waiter).  ``order`` collects the
    operations as they are sent, across clients."""
    cs = clients()
    if order is not None:
        for c in cs.values():
            c.meta.events.register("before-call.*.*", lambda model, **_: order.append(model.name))
    stubs = {k: Stubber(c) for k, c in cs.items()}
    for i, c in enumerate(calls):
        if c.needs_in_service and in_service:
            for status in ("Creating", "InService"):
                stubs["sagemaker"].add_response(
                    "describe_endpoint",
                    describe_endpoint(status),
                    expected_params={"EndpointName": "asr"},
                )
        if errors and i in errors:
            stubs[c.service].add_client_error(
                c.operation, service_error_code=errors[i], expected_params=c.params
            )
        else:
            stubs[c.service].add_response(
                c.operation, (responses or {}).get(c.operation, {}), expected_params=c.params
            )
    for s in stubs.values():
        s.activate()
    out = io.StringIO()
    result = dep.execute(
        calls,
        cs.__getitem__,
        dry_run=False,
        out=out,
        wait_before=lambda c: dep.wait_in_service(c, "asr", delay_s=0),
    )
    for s in stubs.values():
        s.assert_no_pending_responses()
    return result, out.getvalue()


def describe_endpoint(status: str) -> dict:
    import datetime as dt

    now = dt.datetime(2026, 11, 25, tzinfo=dt.timezone.utc)
    return {
        "EndpointName": "asr",
        "EndpointConfigName": "asr",
        "EndpointStatus": status,
        "EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/asr",
        "CreationTime": now,
        "LastModifiedTime": now,
    }


RESPONSES = {
    "create_model": {"ModelArn": "arn:aws:sagemaker:us-east-1:123456789012:model/asr"},
    "create_endpoint_config": {
        "EndpointConfigArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/asr"
    },
    "create_endpoint": {"EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/asr"},
    "put_scaling_policy": {
        "PolicyARN": "arn:aws:autoscaling:us-east-1:123456789012:policy",
        "Alarms": [],
    },
}


def test_create_defaults():
    a = dep.parse_args(["create", "--name", "asr", "--image", IMAGE, "--role", ROLE])
    calls = dep.plan_create(a)
    assert [c.operation for c in calls] == [
        "create_model",
        "create_endpoint_config",
        "create_endpoint",
    ]
    model, epc, ep = (c.params for c in calls)
    assert model["PrimaryContainer"]["Image"] == IMAGE and "VpcConfig" not in model
    (v,) = epc["ProductionVariants"]
    assert (v["InstanceType"], v["InitialInstanceCount"]) == ("ml.g5.xlarge", 1)
    # the CUDA 13 base needs driver 580 on a GPU instance (issue 22)
    assert v["InferenceAmiVersion"] == dep.GPU_INFERENCE_AMI
    assert "DataCaptureConfig" not in epc, "data capture must be OFF by default"
    assert "KmsKeyId" not in epc
    assert ep == {"EndpointName": "asr", "EndpointConfigName": "asr"}
    results, _ = run_stubbed(calls, RESPONSES)
    assert results[2]["EndpointArn"].endswith("endpoint/asr")


def test_create_everything():
    a = dep.parse_args(
        [
            "create",
            "--name",
            "asr",
            "--image",
            IMAGE,
            "--role",
            ROLE,
            "--instance-type",
            "ml.m5.2xlarge",
            "--count",
            "2",
            "--kms-key",
            KMS,
            "--subnets",
            "subnet-1,subnet-2",
            "--security-groups",
            "sg-1",
            "--env",
            "STREAMASR_GATEWAY_MAX_PENDING=80",
            "--autoscale-min",
            "2",
            "--autoscale-max",
            "6",
            "--target-concurrency",
            "25",
            "--data-capture-s3",
            "s3://bucket/capture",
        ]
    )
    calls = dep.plan_create(a)
    assert [c.operation for c in calls][-2:] == ["register_scalable_target", "put_scaling_policy"]
    model, epc = calls[0].params, calls[1].params
    assert model["VpcConfig"] == {"Subnets": ["subnet-1", "subnet-2"], "SecurityGroupIds": ["sg-1"]}
    env = model["PrimaryContainer"]["Environment"]
    assert "SAGEMAKER_TRITON_ALLOW_GRPC" not in env  # nothing reaches it on SageMaker
    assert env["STREAMASR_GATEWAY_MAX_PENDING"] == "80"
    assert "InferenceAmiVersion" not in epc["ProductionVariants"][0]  # ml.m5: no GPU
    assert epc["KmsKeyId"] == KMS and epc["DataCaptureConfig"]["EnableCapture"] is True
    reg, pol = calls[-2].params, calls[-1].params
    assert reg["ResourceId"] == "endpoint/asr/variant/AllTraffic"
    assert (reg["MinCapacity"], reg["MaxCapacity"]) == (2, 6)
    tt = pol["TargetTrackingScalingPolicyConfiguration"]
    assert tt["PredefinedMetricSpecification"]["PredefinedMetricType"] == dep.CONCURRENCY_METRIC
    assert tt["TargetValue"] == 25.0
    # autoscaling waits for InService: DescribeEndpoint (the waiter) comes first
    run_stubbed(calls, RESPONSES, in_service=True)  # Stubber validates every request


def test_autoscaling_target_follows_the_instances_admission_limit():
    from streamasr.core import admission

    base = ["create", "--name", "asr", "--image", IMAGE, "--role", ROLE, "--autoscale-max", "4"]

    def target(*extra: str) -> float:
        pol = dep.plan_create(dep.parse_args([*base, *extra]))[-1].params
        return pol["TargetTrackingScalingPolicyConfiguration"]["TargetValue"]

    share = admission.AUTOSCALE_TARGET_SHARE
    assert target() == round(share * admission.FALLBACK_STREAMS_HELD, 1)
    assert target("--streams-per-instance", "40") == round(share * 40, 1)  # calibrated
    # the container's override is the limit in force, so it wins over the calibration's
    assert target("--env", f"{admission.ENV_LIMIT}=20", "--streams-per-instance", "40") == 15.0
    assert target("--target-concurrency", "7", "--streams-per-instance", "40") == 7.0


def test_inference_ami_is_in_botocores_enum_and_set_for_gpu_types_only():
    import botocore.session

    shapes = (
        botocore.session.get_session().get_service_model("sagemaker")._shape_resolver._shape_map
    )
    enum = shapes["ProductionVariantInferenceAmiVersion"]["enum"]
    assert dep.GPU_INFERENCE_AMI in enum
    for itype, gpu in (
        ("ml.g5.xlarge", True),
        ("ml.g4dn.xlarge", True),
        ("ml.g6e.2xlarge", True),
        ("ml.p4d.24xlarge", True),
        ("ml.m5.large", False),
        ("ml.c7i.xlarge", False),
        ("ml.inf2.xlarge", False),
    ):
        assert dep.is_gpu_instance(itype) is gpu, itype
    base = ["create", "--name", "a", "--image", IMAGE, "--role", ROLE]
    none = dep.parse_args([*base, "--inference-ami", "none"])
    assert "InferenceAmiVersion" not in dep.plan_create(none)[1].params["ProductionVariants"][0]
    other = dep.parse_args([*base, "--inference-ami", "al2-ami-sagemaker-inference-gpu-3-1"])
    (v,) = dep.plan_create(other)[1].params["ProductionVariants"]
    assert v["InferenceAmiVersion"] == "al2-ami-sagemaker-inference-gpu-3-1"
    run_stubbed(dep.plan_create(other), RESPONSES)  # a request botocore's validator accepts


def test_metric_names_exist_in_the_api_model():
    import botocore.session

    enum = (
        botocore.session.get_session()
        .get_service_model("application-autoscaling")
        .shape_for("MetricType")
        .enum
    )
    assert dep.CONCURRENCY_METRIC in enum and dep.INVOCATIONS_METRIC in enum


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="both"):
        dep.plan_create(
            dep.parse_args(
                ["create", "--name", "a", "--image", IMAGE, "--role", ROLE, "--subnets", "subnet-1"]
            )
        )
    with pytest.raises(ValueError, match="autoscale"):
        dep.plan_create(
            dep.parse_args(
                [
                    "create",
                    "--name",
                    "a",
                    "--image",
                    IMAGE,
                    "--role",
                    ROLE,
                    "--autoscale-min",
                    "3",
                    "--autoscale-max",
                    "2",
                ]
            )
        )


def test_delete_tolerates_missing_resources_but_not_other_errors():
    calls = dep.plan_delete(dep.parse_args(["delete", "--name", "asr"]))
    assert [c.operation for c in calls] == [
        "deregister_scalable_target",
        "delete_endpoint",
        "delete_endpoint_config",
        "delete_model",
    ]
    # no autoscaling target was ever registered: fine, the rest is deleted
    results, _ = run_stubbed(calls, errors={0: "ObjectNotFoundException"})
    assert results[0] is None
    with pytest.raises(Exception, match="AccessDenied"):
        run_stubbed(calls, errors={1: "AccessDeniedException"})


def test_dry_run_prints_every_call_and_calls_nothing():
    out = io.StringIO()
    # no credentials, no region: a real call would fail
    code = dep.main(
        [
            "create",
            "--dry-run",
            "--name",
            "asr",
            "--image",
            IMAGE,
            "--role",
            ROLE,
            "--autoscale-max",
            "3",
        ],
        out=out,
    )
    assert code == 0
    text = out.getvalue()
    for op in (
        "sagemaker.create_model(",
        "sagemaker.create_endpoint_config(",
        "sagemaker.create_endpoint(",
        "application-autoscaling.register_scalable_target(",
        "application-autoscaling.put_scaling_policy(",
    ):
        assert f"DRY RUN {op}" in text
    assert ROLE in text and "ml.g5.xlarge" in text


def test_docker_deploy_script_runs():
    r = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "deploy"), "delete", "--dry-run", "--name", "asr"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("DRY RUN") == 4


def test_docs_commands_and_policies_are_current():
    """docs/sagemaker.md: every docker/deploy command parses with today's flags, every
    JSON policy block is valid JSON, and the caller policy allows the bidi action."""
    import json
    import re
    import shlex

    doc = (ROOT / "docs" / "sagemaker.md").read_text()
    cmds = [line.strip() for line in doc.splitlines() if line.strip().startswith("docker/deploy ")]
    assert any(" create " in c for c in cmds) and any(" delete " in c for c in cmds)
    subst = {"$AWS_REGION": "us-east-1", "$NAME": "asr", "$IMAGE": IMAGE, "$ROLE": ROLE}
    for c in cmds:
        for k, v in subst.items():
            c = c.replace(k, v)
        a = dep.parse_args(shlex.split(c)[1:])
        (dep.plan_create if a.command == "create" else dep.plan_delete)(a)
    blocks = re.findall(r"```json\n(.*?)```", doc, re.S)
    policies = [json.loads(b) for b in blocks]
    assert len(policies) == 3
    actions = {
        a
        for p in policies
        for st in p["Statement"]
        for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])
    }
    assert "sagemaker:InvokeEndpointWithBidirectionalStream" in actions
    for op in ("CreateModel", "CreateEndpointConfig", "CreateEndpoint", "DeleteEndpoint"):
        assert f"sagemaker:{op}" in actions
    assert "iam:PassRole" in actions


def test_kms_key_is_refused_on_instances_with_local_nvme_before_any_call(monkeypatch, caplog):
    """CreateEndpointConfig rejects KmsKeyId on Nitro instances with instance store (the
    default ml.g5.xlarge among them): refused up front, naming why, with no AWS call."""

    def no_aws(*a, **kw):
        raise AssertionError("an AWS client was created")

    monkeypatch.setattr(boto3.session, "Session", no_aws)
    for itype in (
        "ml.g5.xlarge",
        "ml.g6.2xlarge",
        "ml.g4dn.xlarge",
        "ml.p4d.24xlarge",
        "ml.m5d.large",
    ):
        args = [
            "create",
            "--name",
            "asr",
            "--image",
            IMAGE,
            "--role",
            ROLE,
            "--instance-type",
            itype,
            "--kms-key",
            KMS,
        ]
        with pytest.raises(ValueError, match="local NVMe"):
            dep.plan_create(dep.parse_args(args))
        caplog.clear()
        assert dep.main(args, out=io.StringIO()) == 2
        assert itype in caplog.text and "KmsKeyId" in caplog.text
    # the default instance type is one of them
    assert dep.has_local_instance_storage(
        dep.parse_args(["create", "--name", "a", "--image", IMAGE, "--role", ROLE]).instance_type
    )
    for itype in ("ml.m5.xlarge", "ml.c5.2xlarge", "ml.p3.2xlarge", "ml.inf2.xlarge"):
        assert not dep.has_local_instance_storage(itype), itype


def test_data_capture_can_be_encrypted_on_local_nvme_instances():
    a = dep.parse_args(
        [
            "create",
            "--name",
            "asr",
            "--image",
            IMAGE,
            "--role",
            ROLE,
            "--data-capture-s3",
            "s3://bucket/capture",
            "--data-capture-kms-key",
            KMS,
        ]
    )
    calls = dep.plan_create(a)
    epc = calls[1].params
    assert "KmsKeyId" not in epc and epc["DataCaptureConfig"]["KmsKeyId"] == KMS
    run_stubbed(calls, RESPONSES)


def test_autoscaling_is_registered_only_once_the_endpoint_is_in_service():
    """Without --wait too: DescribeEndpoint is polled (boto3's waiter) until InService,
    and only then RegisterScalableTarget is sent."""
    a = dep.parse_args(
        ["create", "--name", "asr", "--image", IMAGE, "--role", ROLE, "--autoscale-max", "3"]
    )
    assert not a.wait
    order: list[str] = []
    run_stubbed(dep.plan_create(a), RESPONSES, in_service=True, order=order)
    assert order == [
        "CreateModel",
        "CreateEndpointConfig",
        "CreateEndpoint",
        "DescribeEndpoint",
        "DescribeEndpoint",
        "RegisterScalableTarget",
        "PutScalingPolicy",
    ]


def test_autoscaling_is_not_registered_on_a_failed_endpoint():
    from botocore.exceptions import WaiterError

    a = dep.parse_args(
        ["create", "--name", "asr", "--image", IMAGE, "--role", ROLE, "--autoscale-max", "3"]
    )
    calls = dep.plan_create(a)
    cs = clients()
    sm, aas = Stubber(cs["sagemaker"]), Stubber(cs["application-autoscaling"])
    for c in calls[:3]:
        sm.add_response(c.operation, RESPONSES[c.operation], expected_params=c.params)
    sm.add_response(
        "describe_endpoint",
        dict(describe_endpoint("Failed"), FailureReason="image not found"),
        expected_params={"EndpointName": "asr"},
    )
    sm.activate()
    aas.activate()  # nothing queued: any call would fail
    with pytest.raises(WaiterError, match="Failed|failure"):
        dep.execute(
            calls,
            cs.__getitem__,
            dry_run=False,
            out=io.StringIO(),
            wait_before=lambda c: dep.wait_in_service(c, "asr", delay_s=0),
        )
    aas.assert_no_pending_responses()


def test_dry_run_shows_the_wait_before_autoscaling():
    out = io.StringIO()
    assert (
        dep.main(
            [
                "create",
                "--dry-run",
                "--name",
                "asr",
                "--image",
                IMAGE,
                "--role",
                ROLE,
                "--autoscale-max",
                "3",
            ],
            out=out,
        )
        == 0
    )
    lines = [line for line in out.getvalue().splitlines() if line.startswith("DRY RUN ")]
    wait = [i for i, line in enumerate(lines) if "InService" in line]
    reg = [i for i, line in enumerate(lines) if "register_scalable_target(" in line]
    assert wait and reg and wait[0] < reg[0]


def test_base_image_account_per_region(caplog):
    from streamasr.sagemaker.deploy import images

    for region, account in (
        ("us-east-1", "763104351884"),
        ("eu-west-1", "763104351884"),
        ("af-south-1", "626614931356"),
        ("eu-south-1", "692866216735"),
        ("me-south-1", "217643126080"),
        ("ap-east-1", "871362719292"),
        ("ap-south-2", "772153158452"),
        ("ca-west-1", "204538143572"),
    ):
        img = images.base_image(region, "25.09-py3")
        assert img.uri == (
            f"{account}.dkr.ecr.{region}.amazonaws.com/sagemaker-tritonserver:25.09-py3"
        )
    accounts = images.load_table()["accounts"]
    assert len({r for r, a in accounts.items() if a != "763104351884"}) >= 10
    cn = images.base_image("cn-north-1", "24.09-py3")
    assert cn.registry == "727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn"
    with pytest.raises(images.UnknownImage, match="not published in ap-south-2"):
        images.base_image("ap-south-2", "23.12-py3")
    with pytest.raises(images.UnknownImage, match="region 'mars-1'"):
        images.base_image("mars-1")
    out = io.StringIO()
    assert dep.main(["base-image", "--region", "eu-south-2", "--build-args"], out=out) == 0
    assert out.getvalue().split() == [
        "--build-arg=REGION=eu-south-2",
        "--build-arg=BASE_ACCOUNT=503227376785",
        "--build-arg=ECR_DOMAIN=amazonaws.com",
        f"--build-arg=TRITON_TAG={images.DEFAULT_TRITON_TAG}",
    ]
    assert dep.main(["base-image", "--region", "mars-1"], out=io.StringIO()) == 2
    assert "mars-1" in caplog.text


def test_execution_role_policy_covers_model_data_and_data_capture():
    """--model-data-url is downloaded and data capture written with the execution role:
    its documented policy must allow both."""
    import json
    import re

    doc = (ROOT / "docs" / "sagemaker.md").read_text()
    head, _, rest = doc.partition("*Execution role*")
    execution = json.loads(re.search(r"```json\n(.*?)```", rest, re.S)[1])
    allowed = {}
    for st in execution["Statement"]:
        for action in [st["Action"]] if isinstance(st["Action"], str) else st["Action"]:
            allowed.setdefault(action, []).append(st["Resource"])
    assert any(r.startswith("arn:aws:s3:::") for r in allowed.get("s3:GetObject", []))
    assert any(
        r.startswith("arn:aws:s3:::") and r.endswith("/*") for r in allowed.get("s3:PutObject", [])
    )
    assert "kms:GenerateDataKey" in allowed
