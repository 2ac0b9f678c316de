"""docker/deploy against botocore's Stubber (no AWS): every planned call is a valid
request for the real API model, in the right order, with the arguments we mean."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

boto3 = pytest.importorskip("boto3")
from botocore.stub import Stubber  # noqa: E402

from streamasr import sagemaker_deploy as dep  # noqa: E402

from .conftest import ROOT  # noqa: E402

ROLE = "arn:aws:iam::123456789012:role/streamasr-sagemaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/streamasr:1"
KMS = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def clients():
    s = boto3.session.Session(aws_access_key_id="x", aws_secret_access_key="y",
                              region_name="us-east-1")
    return {"sagemaker": s.client("sagemaker"),
            "application-autoscaling": s.client("application-autoscaling")}


def run_stubbed(calls, responses=None, errors=None):
    """Execute ``calls`` with stubbed clients; each call expects exactly its params."""
    cs = clients()
    stubs = {k: Stubber(c) for k, c in cs.items()}
    for i, c in enumerate(calls):
        if errors and i in errors:
            stubs[c.service].add_client_error(c.operation, service_error_code=errors[i],
                                              expected_params=c.params)
        else:
            stubs[c.service].add_response(c.operation, (responses or {}).get(c.operation, {}),
                                          expected_params=c.params)
    for s in stubs.values():
        s.activate()
    out = io.StringIO()
    result = dep.execute(calls, cs.__getitem__, dry_run=False, out=out)
    for s in stubs.values():
        s.assert_no_pending_responses()
    return result, out.getvalue()


RESPONSES = {
    "create_model": {"ModelArn": "arn:aws:sagemaker:us-east-1:123456789012:model/asr"},
    "create_endpoint_config": {
        "EndpointConfigArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/asr"},
    "create_endpoint": {"EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/asr"},
    "put_scaling_policy": {"PolicyARN": "arn:aws:autoscaling:us-east-1:123456789012:policy",
                           "Alarms": []},
}


def test_create_defaults():
    a = dep.parse_args(["create", "--name", "asr", "--image", IMAGE, "--role", ROLE])
    calls = dep.plan_create(a)
    assert [c.operation for c in calls] == ["create_model", "create_endpoint_config",
                                            "create_endpoint"]
    model, epc, ep = (c.params for c in calls)
    assert model["PrimaryContainer"]["Image"] == IMAGE and "VpcConfig" not in model
    (v,) = epc["ProductionVariants"]
    assert (v["InstanceType"], v["InitialInstanceCount"]) == ("ml.g5.xlarge", 1)
    assert "DataCaptureConfig" not in epc, "data capture must be OFF by default"
    assert "KmsKeyId" not in epc
    assert ep == {"EndpointName": "asr", "EndpointConfigName": "asr"}
    results, _ = run_stubbed(calls, RESPONSES)
    assert results[2]["EndpointArn"].endswith("endpoint/asr")


def test_create_everything():
    a = dep.parse_args(["create", "--name", "asr", "--image", IMAGE, "--role", ROLE,
                        "--instance-type", "ml.g6.2xlarge", "--count", "2", "--kms-key", KMS,
                        "--subnets", "subnet-1,subnet-2", "--security-groups", "sg-1",
                        "--grpc", "--env", "STREAMASR_GATEWAY_MAX_PENDING=80",
                        "--autoscale-min", "2", "--autoscale-max", "6",
                        "--target-concurrency", "25",
                        "--data-capture-s3", "s3://bucket/capture"])
    calls = dep.plan_create(a)
    assert [c.operation for c in calls][-2:] == ["register_scalable_target",
                                                 "put_scaling_policy"]
    model, epc = calls[0].params, calls[1].params
    assert model["VpcConfig"] == {"Subnets": ["subnet-1", "subnet-2"],
                                  "SecurityGroupIds": ["sg-1"]}
    env = model["PrimaryContainer"]["Environment"]
    assert env["SAGEMAKER_TRITON_ALLOW_GRPC"] == "true"
    assert env["STREAMASR_GATEWAY_MAX_PENDING"] == "80"
    assert epc["KmsKeyId"] == KMS and epc["DataCaptureConfig"]["EnableCapture"] is True
    reg, pol = calls[-2].params, calls[-1].params
    assert reg["ResourceId"] == "endpoint/asr/variant/AllTraffic"
    assert (reg["MinCapacity"], reg["MaxCapacity"]) == (2, 6)
    tt = pol["TargetTrackingScalingPolicyConfiguration"]
    assert tt["PredefinedMetricSpecification"]["PredefinedMetricType"] == dep.CONCURRENCY_METRIC
    assert tt["TargetValue"] == 25.0
    run_stubbed(calls, RESPONSES)      # Stubber validates every request against the API model


def test_metric_names_exist_in_the_api_model():
    import botocore.session

    enum = botocore.session.get_session().get_service_model(
        "application-autoscaling").shape_for("MetricType").enum
    assert dep.CONCURRENCY_METRIC in enum and dep.INVOCATIONS_METRIC in enum


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="both"):
        dep.plan_create(dep.parse_args(["create", "--name", "a", "--image", IMAGE, "--role",
                                        ROLE, "--subnets", "subnet-1"]))
    with pytest.raises(ValueError, match="autoscale"):
        dep.plan_create(dep.parse_args(["create", "--name", "a", "--image", IMAGE, "--role",
                                        ROLE, "--autoscale-min", "3", "--autoscale-max", "2"]))


def test_delete_tolerates_missing_resources_but_not_other_errors():
    calls = dep.plan_delete(dep.parse_args(["delete", "--name", "asr"]))
    assert [c.operation for c in calls] == ["deregister_scalable_target", "delete_endpoint",
                                            "delete_endpoint_config", "delete_model"]
    # no autoscaling target was ever registered: fine, the rest is deleted
    results, _ = run_stubbed(calls, errors={0: "ObjectNotFoundException"})
    assert results[0] is None
    with pytest.raises(Exception, match="AccessDenied"):
        run_stubbed(calls, errors={1: "AccessDeniedException"})


def test_dry_run_prints_every_call_and_calls_nothing():
    out = io.StringIO()
    # no credentials, no region: a real call would fail
    code = dep.main(["create", "--dry-run", "--name", "asr", "--image", IMAGE, "--role", ROLE,
                     "--autoscale-max", "3"], out=out)
    assert code == 0
    text = out.getvalue()
    for op in ("sagemaker.create_model(", "sagemaker.create_endpoint_config(",
               "sagemaker.create_endpoint(", "application-autoscaling.register_scalable_target(",
               "application-autoscaling.put_scaling_policy("):
        assert f"DRY RUN {op}" in text
    assert ROLE in text and "ml.g5.xlarge" in text


def test_docker_deploy_script_runs():
    r = subprocess.run([sys.executable, str(ROOT / "docker" / "deploy"), "delete", "--dry-run",
                        "--name", "asr"], capture_output=True, text=True, cwd=ROOT)
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
    actions = {a for p in policies for st in p["Statement"]
               for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert "sagemaker:InvokeEndpointWithBidirectionalStream" in actions
    for op in ("CreateModel", "CreateEndpointConfig", "CreateEndpoint", "DeleteEndpoint"):
        assert f"sagemaker:{op}" in actions
    assert "iam:PassRole" in actions
