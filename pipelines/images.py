"""The container image every Kubeflow task and TrainJob pod runs (built from the repository's Dockerfile:
the project and its pinned dependencies; nothing is installed at run time)."""
BASE_IMAGE = "covid-cxr:latest"
