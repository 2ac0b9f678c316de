"""Where AWS publishes the SageMaker Triton base image for a region.

The Deep Learning Containers registry is account 763104351884 in most regions but not in
all: about ten regions (af-south-1, ap-east-1, eu-south-1, me-south-1, ap-south-2, ...) use
accounts of their own, and the China regions a different domain.  The table,
``tritonserver-registries.json`` (beside this module), is the one the SageMaker Python SDK resolves image
URIs from (``image_uri_config/sagemaker-tritonserver.json``), reduced to region -> account
and tag -> regions; ``python -m streamasr.sagemaker.deploy.images --update <sdk json>`` rebuilds it.

    python -m streamasr.sagemaker.deploy.images --region eu-south-2 --triton-tag 25.09-py3
    docker build $(python -m streamasr.sagemaker.deploy.images --region $AWS_REGION --build-args) ...
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from streamasr.cli import argument_parser

log = logging.getLogger("streamasr.images")

TABLE = Path(__file__).with_name("tritonserver-registries.json")  # package data
# The Dockerfile's default TRITON_TAG (test_docker checks the two agree).
DEFAULT_TRITON_TAG = "25.09-py3"


class UnknownImage(ValueError):
    pass


@dataclass(frozen=True)
class BaseImage:
    account: str
    region: str
    tag: str
    repository: str = "sagemaker-tritonserver"

    @property
    def domain(self) -> str:
        # ECR in the China partition lives under amazonaws.com.cn.
        return "amazonaws.com.cn" if self.region.startswith("cn-") else "amazonaws.com"

    @property
    def registry(self) -> str:
        return f"{self.account}.dkr.ecr.{self.region}.{self.domain}"

    @property
    def uri(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"

    def build_args(self) -> list[str]:
        """``docker build`` arguments for the Dockerfile's base-image ARGs."""
        return [
            f"--build-arg={k}={v}"
            for k, v in (
                ("REGION", self.region),
                ("BASE_ACCOUNT", self.account),
                ("ECR_DOMAIN", self.domain),
                ("TRITON_TAG", self.tag),
            )
        ]


def load_table(path: Path = TABLE) -> dict:
    return json.loads(path.read_text())


def base_image(region: str, tag: str = DEFAULT_TRITON_TAG, table: dict | None = None) -> BaseImage:
    t = load_table() if table is None else table
    if region not in t["accounts"]:
        raise UnknownImage(
            f"no SageMaker Triton image is published in region {region!r} "
            f"(known: {', '.join(sorted(t['accounts']))})"
        )
    regions = t["tags"].get(tag)
    if regions is None:
        raise UnknownImage(
            f"unknown sagemaker-tritonserver tag {tag!r} (known: {', '.join(sorted(t['tags']))})"
        )
    if region not in regions:
        have = sorted(k for k, v in t["tags"].items() if region in v)
        raise UnknownImage(
            f"sagemaker-tritonserver:{tag} is not published in {region}; "
            f"tags there: {', '.join(have)}"
        )
    return BaseImage(t["accounts"][region], region, tag, t["repository"])


def table_from_sdk(sdk_json: dict, source: str) -> dict:
    """The SDK's image_uri_config file -> our table (accounts must agree across versions)."""
    accounts: dict[str, str] = {}
    tags: dict[str, list[str]] = {}
    repository = None
    for version, entry in sdk_json["versions"].items():
        for region, account in entry["registries"].items():
            if accounts.setdefault(region, account) != account:
                raise ValueError(f"{region}: accounts differ between versions ({version})")
        tags[entry["tag_prefix"]] = sorted(entry["registries"])
        repository = entry["repository"]
    return {
        "_source": source,
        "repository": repository,
        "accounts": dict(sorted(accounts.items())),
        "tags": dict(sorted(tags.items())),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    p = argument_parser("python -m streamasr.sagemaker.deploy.images", __doc__)
    p.add_argument("--region")
    p.add_argument("--triton-tag", default=DEFAULT_TRITON_TAG)
    p.add_argument(
        "--build-args",
        action="store_true",
        help="print docker build --build-arg flags instead of the URI",
    )
    p.add_argument(
        "--update",
        metavar="SDK_JSON",
        help="rebuild the table from the SDK's sagemaker-tritonserver.json",
    )
    a = p.parse_args(argv)
    if a.update:
        TABLE.write_text(
            json.dumps(
                table_from_sdk(
                    json.loads(Path(a.update).read_text()), f"aws/sagemaker-python-sdk {a.update}"
                ),
                indent=1,
            )
            + "\n"
        )
        return 0
    if not a.region:
        p.error("--region is required")
    try:
        img = base_image(a.region, a.triton_tag)
    except UnknownImage as exc:
        log.error("%s", exc)
        return 2
    sys.stdout.write((" ".join(img.build_args()) if a.build_args else img.uri) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
