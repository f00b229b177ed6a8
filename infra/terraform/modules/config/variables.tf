variable "namespace" {
  description = "Namespace the pipeline pods run in."
  type        = string
}

variable "mlflow_tracking_uri" {
  description = "MLflow tracking URL (the in-cluster Service)."
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

variable "cache_dir" {
  description = "DATADREAM_CACHE inside the pods."
  type        = string
}

variable "hf_home" {
  description = "HF_HOME inside the pods."
  type        = string
}

variable "mlflow_username" {
  description = "MLflow user of the pipeline pods."
  type        = string
}

variable "mlflow_password" {
  description = "MLflow password of the pipeline pods."
  type        = string
  sensitive   = true
}

variable "hf_token" {
  description = "Hugging Face token (may be empty)."
  type        = string
  sensitive   = true
}

variable "optuna_storage" {
  description = "Optuna RDB storage URL."
  type        = string
  sensitive   = true
}
