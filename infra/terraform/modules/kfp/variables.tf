variable "kfp_version" {
  description = "Kubeflow Pipelines manifests tag; kfp SDK 2.17.x (pyproject.toml) -> backend 2.17.x."
  type        = string

  validation {
    condition     = can(regex("^2\\.17\\.[0-9]+$", var.kfp_version))
    error_message = "kfp_version must be 2.17.x to match the kfp 2.17 SDK."
  }
}

variable "namespace" {
  description = "Namespace of KFP standalone (fixed by the upstream manifests)."
  type        = string
  default     = "kubeflow"
}

variable "pipeline_root" {
  description = "Default pipeline root, s3://bucket/prefix."
  type        = string

  validation {
    condition     = can(regex("^s3://[a-z0-9.-]+/.+$", var.pipeline_root))
    error_message = "pipeline_root must be s3://bucket/prefix."
  }
}

variable "region" {
  description = "Region of the pipeline-root bucket."
  type        = string
}
