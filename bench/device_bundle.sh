#!/usr/bin/env bash
# Packs what the lent GPU machine lacks (Ray, MLflow and their dependencies, built for its
# Python 3.12) into .whl/site.tar.xz, small enough for the 64 MiB that travels with a call
# (about 53 MB). That machine has torch with CUDA, numpy, pandas, pyarrow, scikit-learn,
# matplotlib, pillow, grpcio and the like already; it can reach no package index.
#   bash bench/device_bundle.sh            # here, once per session: about 1.5 minutes
# Then on the machine (in one call, with carry [".whl"]):
#   mkdir -p /tmp/site && tar -xJf .whl/site.tar.xz -C /tmp/site &&
#   find /tmp/site/ray/core -type f -exec chmod +x {} + &&
#   export PYTHONPATH=/tmp/site:$PWD/bench:$PWD && bash bench/gpu_suite.sh $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ray_version=$(.venv/bin/python -c "import ray; print(ray.__version__)")
mlflow_version=$(.venv/bin/python -c "import mlflow; print(mlflow.__version__)")
python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -d "$work/wheels" "ray[default,train,tune]==$ray_version" "mlflow==$mlflow_version"
# Only what the machine's image lacks (its package list: the device tool's KINDS.md).
wanted="ray aiohttp_cors colorful google_api_core google_auth googleapis_common_protos
  proto_plus jsonschema jsonschema_specifications referencing rpds_py opencensus
  opencensus_context opentelemetry_api opentelemetry_exporter_prometheus opentelemetry_proto
  opentelemetry_sdk opentelemetry_semantic_conventions pydantic pydantic_core annotated_types
  typing_inspection smart_open tensorboardx virtualenv distlib python_discovery pyasn1
  pyasn1_modules protobuf typing_extensions platformdirs aiohttp multidict yarl propcache
  frozenlist aiosignal aiohappyeyeballs cffi pycparser mlflow mlflow_skinny mlflow_tracing
  sqlalchemy alembic mako graphene graphql_core graphql_relay flask flask_cors blinker
  itsdangerous gunicorn huey skops docker databricks_sdk cachetools sqlparse gitpython gitdb
  smmap prettytable wcwidth python_dotenv importlib_metadata zipp fastapi starlette uvicorn
  annotated_doc cryptography"
mkdir -p "$work/site"
for name in $wanted; do
  wheel=$(ls "$work/wheels/${name}"-[0-9]*.whl | head -1)
  python3 -m zipfile -e "$wheel" "$work/site"
done
# Not needed to train, evaluate or register: Ray's Java jar, RLlib, Serve, source maps, and
# MLflow's web UI (about 60 MB together).
rm -rf "$work/site/ray/jars" "$work/site/ray/rllib" "$work/site/ray/serve" \
  "$work/site/mlflow/server/js"
rm -f "$work/site"/ray/dashboard/client/build/static/js/*.map
mkdir -p .whl
tar -C "$work/site" -cf - . | xz -T0 -6 > .whl/site.tar.xz
ls -l .whl/site.tar.xz
