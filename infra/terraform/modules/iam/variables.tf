variable "name" {
  description = "Prefix of the role names."
  type        = string
}

variable "cluster_name" {
  description = "EKS cluster of the Pod Identity associations."
  type        = string
}

variable "data_bucket_arn" {
  description = "Data bucket (read-only for pipelines)."
  type        = string
}

variable "pipeline_root_bucket_arn" {
  description = "Pipeline-root bucket."
  type        = string
}

variable "pipeline_root_prefix" {
  description = "Prefix in the pipeline-root bucket that pipelines may write."
  type        = string
}

variable "mlflow_bucket_arn" {
  description = "MLflow artifacts bucket (MLflow server only)."
  type        = string
}

variable "buckets_kms_key_arn" {
  description = "KMS key of the buckets."
  type        = string
}

variable "kfp_namespace" {
  description = "Namespace of Kubeflow Pipelines."
  type        = string
}

variable "kfp_runner_service_account" {
  description = "ServiceAccount of pipeline pods."
  type        = string
}

variable "kfp_ui_service_account" {
  description = "ServiceAccount of the KFP UI."
  type        = string
}

variable "mlflow_namespace" {
  description = "Namespace of the MLflow server."
  type        = string
}

variable "mlflow_service_account" {
  description = "ServiceAccount of the MLflow server."
  type        = string
}
