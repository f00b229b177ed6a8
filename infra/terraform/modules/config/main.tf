# The ConfigMap and Secret every pipeline component reads (pipelines/pipeline.py ClusterSettings:
# config_map/config_map_keys, secret/secret_keys). tests/test_infra.py checks names and keys match.

resource "kubernetes_config_map_v1" "datadream" {
  metadata {
    name      = "datadream-config"
    namespace = var.namespace
  }

  data = {
    MLFLOW_TRACKING_URI = var.mlflow_tracking_uri
    AWS_ENDPOINT_URL    = "https://s3.${var.region}.amazonaws.com"
    AWS_DEFAULT_REGION  = var.region
    DATADREAM_CACHE     = var.cache_dir
    HF_HOME             = var.hf_home
  }
}

resource "kubernetes_secret_v1" "datadream" {
  metadata {
    name      = "datadream-secrets"
    namespace = var.namespace
  }

  data = {
    MLFLOW_TRACKING_USERNAME = var.mlflow_username
    MLFLOW_TRACKING_PASSWORD = var.mlflow_password
    HF_TOKEN                 = var.hf_token
    OPTUNA_STORAGE           = var.optuna_storage
  }
}
