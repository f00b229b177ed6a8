"""Where the pipelines' tasks run on the cluster: image, GPU placement, resources, retries, settings
from the cluster's ConfigMap and Secret. Set at compile time; infra/terraform must agree."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClusterSettings:
    """How tasks are placed on the cluster; set at compile time (infra/terraform must agree)."""

    image: str | None = None  # None = components.image_reference()
    gpu_node_selector: tuple[str, str] = ("datadream.io/node-pool", "gpu")
    gpu_toleration: tuple[str, str] = ("nvidia.com/gpu", "NoSchedule")  # key, effect (operator Exists)
    gpu_cpu: str = "8"
    gpu_memory: str = "48Gi"
    shm_size: str = "16Gi"
    cpu_cpu: str = "2"
    cpu_memory: str = "8Gi"
    retries: int = 2
    # Where KFP writes the steps' artifacts, e.g. s3://bucket/pipeline-root; None = the cluster's default
    # (the kfp-launcher ConfigMap's defaultPipelineRoot).
    pipeline_root: str | None = None
    # Settings reach the tasks from the cluster, never as pipeline parameters (secrets least of all).
    config_map: str = "datadream-config"
    config_map_keys: tuple[str, ...] = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                                        "DATADREAM_CACHE", "HF_HOME")
    secret: str = "datadream-secrets"
    # Where the register step serves a champion it promoted, with `deploy` on (infra/terraform/modules/serving).
    serving_namespace: str = "datadream-serving"
    secret_keys: tuple[str, ...] = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN",
                                    "OPTUNA_STORAGE")
    extra: dict = field(default_factory=dict)


def _common(task, s: ClusterSettings):
    from kfp import kubernetes as k8s

    k8s.use_config_map_as_env(task, s.config_map, {k: k for k in s.config_map_keys}, optional=True)
    k8s.use_secret_as_env(task, s.secret, {k: k for k in s.secret_keys}, optional=True)
    return task


def on_cpu(task, s: ClusterSettings):
    task.set_cpu_request(s.cpu_cpu).set_memory_request(s.cpu_memory)
    task.set_retry(num_retries=s.retries, backoff_duration="30s", backoff_factor=2.0)
    return _common(task, s)


def on_gpu(task, s: ClusterSettings):
    """One NVIDIA GPU on the GPU node group; /dev/shm in memory for DataLoader workers; retries."""
    from kfp import kubernetes as k8s

    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    task.set_cpu_request(s.gpu_cpu).set_memory_request(s.gpu_memory)
    task.set_retry(num_retries=s.retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="3600s")
    k8s.add_node_selector(task, *s.gpu_node_selector)
    k8s.add_toleration(task, key=s.gpu_toleration[0], operator="Exists", effect=s.gpu_toleration[1])
    k8s.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=s.shm_size)
    return _common(task, s)
