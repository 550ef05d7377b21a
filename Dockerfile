# driftsweep image for the Ray head/workers, the RayJob submitter and the MLflow server.
# Base: the official Ray GPU image (CUDA, Python 3.11, user `ray` uid 1000, gid 100). Its Ray version MUST equal
# the ray[tune] pin in pyproject.toml (tests/test_manifests.py checks it): the driver, the workers and the
# RayJob submitter must all run the same Ray.
# Build: docker build -t driftsweep:0.1.0-ray2.60.0 .
FROM rayproject/ray:2.60.0-py311-gpu

# The base image's user; the build and every container run as it (the manifests set runAsUser 1000).
USER ray
# Created by `ray` (WORKDIR alone would create it owned by root, and the build writes into it).
RUN mkdir -p /home/ray/driftsweep
WORKDIR /home/ray/driftsweep
# Only what the package build needs (.dockerignore keeps .venv, caches and results out).
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users orchestrator ./orchestrator
COPY --chown=ray:users workloads ./workloads
# pip keeps the base image's ray (the pin matches it) and adds torch (the CUDA build from PyPI), mlflow,
# optuna, psycopg2 and the rest of pyproject's dependencies; the import (from /, so the installed package
# is the one found) proves the install.
RUN pip install --no-cache-dir . && cd / && python -c "import orchestrator, workloads, ray"
