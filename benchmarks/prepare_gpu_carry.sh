#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on a lent GPU machine (no network there; its python3 is 3.12
# with torch, numpy, pandas, pyarrow, rich, typer, pyyaml already installed). Run from the repository root.
# Both outputs are git-ignored; together with the working tree they must stay under the 64 MiB a call carries.
#   .whl/                 py3.12 wheels of what `cxr train` imports and that machine lacks (~23 MB)
#   .carry/public.tar.xz  data/public + data/public.dvc imported from ../shared/data/covid-chestxray-dataset (~36 MB)
# The wheel list was found by running `cxr train` in an environment holding only that machine's packages.
set -euo pipefail
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl .carry
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 monai==1.6.1 SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3 \
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 databricks-sdk==0.162.0 google-auth==2.63.0 pyasn1==0.6.5 \
  pyasn1-modules cachetools==7.3.3 fastapi==0.165.0 starlette==1.10.0 GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3 \
  importlib_metadata==9.1.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 \
  opentelemetry-semantic-conventions==0.66b2 pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 \
  python-dotenv==1.2.4 sqlparse==0.6.1 typing-inspection==0.4.5 annotated-types==0.8.0
proj=$(mktemp -d)
git -C "$proj" init -q
CXR_PROJECT_ROOT=$proj CXR_HOME=$proj/.cxr .venv/bin/cxr data import ../shared/data/covid-chestxray-dataset --name public
tar -C "$proj" -cJf .carry/public.tar.xz data/public data/public.dvc
rm -rf "$proj"
du -sh .whl .carry
