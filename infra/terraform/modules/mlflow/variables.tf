variable "namespace" {
  description = "Namespace of the MLflow server."
  type        = string
}

variable "service_account" {
  description = "ServiceAccount of the MLflow server (its Pod Identity role writes the artifacts bucket)."
  type        = string
}

variable "port" {
  description = "Port of the server and of its ClusterIP Service."
  type        = number

  validation {
    condition     = var.port > 0 && var.port < 65536
    error_message = "port must be 1-65535."
  }
}

variable "image" {
  description = "MLflow server image (mlflow[auth] >= 3.17.2, psycopg2, boto3)."
  type        = string
}

variable "postgres_client_image" {
  description = "Image with psql for the database-init Job."
  type        = string
  default     = "postgres:17-alpine"
}

variable "replicas" {
  description = "Server replicas (they share the Flask secret key)."
  type        = number
  default     = 2

  validation {
    condition     = var.replicas >= 1
    error_message = "replicas must be at least 1."
  }
}

variable "artifacts_destination" {
  description = "S3 URI of the proxied artifact store."
  type        = string

  validation {
    condition     = can(regex("^s3://", var.artifacts_destination))
    error_message = "artifacts_destination must be an s3:// URI."
  }
}

variable "allowed_hosts" {
  description = "Host headers accepted by the server (--allowed-hosts)."
  type        = list(string)

  validation {
    condition     = length(var.allowed_hosts) > 0
    error_message = "allowed_hosts must not be empty."
  }
}

variable "region" {
  description = "AWS region of the artifacts bucket."
  type        = string
}

variable "db_host" {
  description = "Postgres host."
  type        = string
}

variable "db_port" {
  description = "Postgres port."
  type        = number
}

variable "db_username" {
  description = "Postgres user."
  type        = string
}

variable "db_password" {
  description = "Postgres password (from the database module; also in Secrets Manager)."
  type        = string
  sensitive   = true
}

variable "client_namespaces" {
  description = "Namespaces allowed to reach the server (NetworkPolicy)."
  type        = list(string)
}
