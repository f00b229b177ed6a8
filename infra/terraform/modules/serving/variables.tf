variable "namespace" {
  description = "Namespace of the classifier servers (datadream.serving.manifests.DEFAULT_NAMESPACE)."
  type        = string
}

variable "service_account" {
  description = "ServiceAccount of the serving pods (no API token is mounted)."
  type        = string
}

variable "config_map" {
  description = "Name of the ConfigMap the serving pods read MLFLOW_TRACKING_URI from (same as the pipeline's)."
  type        = string
}

variable "secret" {
  description = "Name of the Secret holding the MLflow credentials (same as the pipeline's)."
  type        = string
}

variable "port" {
  description = "Container port of the scoring server (datadream.serving.manifests.ServingSettings.port)."
  type        = number

  validation {
    condition     = var.port > 0 && var.port < 65536
    error_message = "port must be 1-65535."
  }
}

variable "mlflow_tracking_uri" {
  description = "MLflow tracking URL (the in-cluster Service) the servers load models from."
  type        = string

  validation {
    condition     = can(regex("^https?://", var.mlflow_tracking_uri))
    error_message = "mlflow_tracking_uri must be an http(s) URL."
  }
}

variable "region" {
  description = "AWS region."
  type        = string
}

variable "mlflow_username" {
  description = "MLflow user the servers read the registry as."
  type        = string
}

variable "mlflow_password" {
  description = "Password of that MLflow user."
  type        = string
  sensitive   = true
}

variable "pipeline_namespace" {
  description = "Namespace of the pipeline's ServiceAccount, which may deploy (the register step's deploy setting)."
  type        = string
}

variable "pipeline_service_account" {
  description = "The pipeline pods' ServiceAccount, bound to the datadream-deployer Role."
  type        = string
}

variable "deployer_groups" {
  description = "Kubernetes groups (e.g. mapped from IAM through EKS access entries) bound to the datadream-deployer Role."
  type        = list(string)
  default     = []
}

variable "client_namespaces" {
  description = "Namespaces whose pods may call the classifier servers."
  type        = list(string)
}
