variable "name" {
  description = "Name of the stack: the EKS cluster, the VPC and the prefix of every AWS resource."
  type        = string
  default     = "datadream"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}[a-z0-9]$", var.name))
    error_message = "name must be 3-32 characters of lowercase letters, digits and '-', starting with a letter."
  }
}

variable "region" {
  description = "AWS region of the stack, e.g. us-east-1 (also written to the datadream-config ConfigMap)."
  type        = string
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must look like an AWS region, e.g. us-east-1."
  }
}

variable "tags" {
  description = "Tags added to every AWS resource."
  type        = map(string)
  default     = {}
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version (major.minor)."
  type        = string
  default     = "1.33"

  validation {
    condition     = can(regex("^1\\.[0-9]{2}$", var.kubernetes_version))
    error_message = "kubernetes_version must be major.minor, e.g. 1.33."
  }
}

variable "vpc_cidr" {
  description = "CIDR of the VPC; split into three private, three public and three database subnets."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && tonumber(split("/", var.vpc_cidr)[1]) <= 18
    error_message = "vpc_cidr must be a valid IPv4 CIDR of size /18 or larger."
  }
}

variable "endpoint_public_access_cidrs" {
  description = "CIDRs allowed to reach the public EKS API endpoint. Empty = private endpoint only (reach it over VPN/bastion)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.endpoint_public_access_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "endpoint_public_access_cidrs must be valid CIDRs and must not include 0.0.0.0/0."
  }
}

variable "system_instance_types" {
  description = "Instance types of the system node group (KFP, MLflow, CPU pipeline steps)."
  type        = list(string)
  default     = ["m6i.xlarge"]

  validation {
    condition     = length(var.system_instance_types) > 0
    error_message = "system_instance_types needs at least one instance type."
  }
}

variable "system_min_size" {
  description = "Minimum (and initial) number of system nodes."
  type        = number
  default     = 2

  validation {
    condition     = var.system_min_size >= 1
    error_message = "system_min_size must be at least 1: KFP and MLflow run there."
  }
}

variable "system_max_size" {
  description = "Maximum number of system nodes."
  type        = number
  default     = 5

  validation {
    condition     = var.system_max_size >= 1
    error_message = "system_max_size must be at least 1."
  }
}

variable "gpu_instance_types" {
  description = "NVIDIA instance types of the on-demand GPU node group (g5/g6/g6e families; one GPU per node suits the pipeline)."
  type        = list(string)
  default     = ["g6e.2xlarge", "g5.2xlarge"]

  validation {
    condition     = length(var.gpu_instance_types) > 0 && alltrue([for t in var.gpu_instance_types : can(regex("^(g4dn|g5|g6|g6e|gr6|p3|p4d|p4de|p5|p5e|p5en)\\.", t))])
    error_message = "gpu_instance_types must be NVIDIA GPU instance types (g4dn, g5, g6, g6e, gr6, p3, p4d, p5 families)."
  }
}

variable "gpu_max_size" {
  description = "Maximum number of on-demand GPU nodes (the group's minimum is 0: it scales to zero when idle)."
  type        = number
  default     = 4

  validation {
    condition     = var.gpu_max_size >= 1 && var.gpu_max_size <= 64
    error_message = "gpu_max_size must be between 1 and 64."
  }
}

variable "gpu_disk_size_gb" {
  description = "Root volume (GiB) of GPU nodes: the image with torch/CUDA and the Hugging Face cache live there."
  type        = number
  default     = 200

  validation {
    condition     = var.gpu_disk_size_gb >= 100
    error_message = "gpu_disk_size_gb must be at least 100 GiB (CUDA image plus model weights)."
  }
}

variable "enable_spot_gpu_group" {
  description = "Create a second GPU node group on spot capacity (same label and taint) for Optuna search campaigns."
  type        = bool
  default     = true
}

variable "spot_gpu_instance_types" {
  description = "Instance types of the spot GPU group; list several for better spot availability."
  type        = list(string)
  default     = ["g6e.2xlarge", "g6.2xlarge", "g5.2xlarge"]

  validation {
    condition     = length(var.spot_gpu_instance_types) > 0 && alltrue([for t in var.spot_gpu_instance_types : can(regex("^(g4dn|g5|g6|g6e|gr6|p3|p4d|p4de|p5|p5e|p5en)\\.", t))])
    error_message = "spot_gpu_instance_types must be NVIDIA GPU instance types."
  }
}

variable "spot_gpu_max_size" {
  description = "Maximum number of spot GPU nodes (minimum 0)."
  type        = number
  default     = 8

  validation {
    condition     = var.spot_gpu_max_size >= 1 && var.spot_gpu_max_size <= 128
    error_message = "spot_gpu_max_size must be between 1 and 128."
  }
}

variable "nvidia_device_plugin_version" {
  description = "Helm chart version of the NVIDIA device plugin (AL2023 NVIDIA AMIs do not ship it)."
  type        = string
  default     = "0.17.4"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.nvidia_device_plugin_version))
    error_message = "nvidia_device_plugin_version must be a semantic version, e.g. 0.17.4."
  }
}

variable "bucket_prefix" {
  description = "Prefix of the three S3 bucket names (<prefix>-data, <prefix>-pipeline-root, <prefix>-mlflow-artifacts); must be globally unique."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{2,40}[a-z0-9]$", var.bucket_prefix))
    error_message = "bucket_prefix must be 4-42 characters of lowercase letters, digits and '-'."
  }
}

variable "pipeline_root_prefix" {
  description = "Key prefix inside the pipeline-root bucket where KFP writes step artifacts."
  type        = string
  default     = "pipeline-root"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9/_-]*[a-z0-9]$", var.pipeline_root_prefix))
    error_message = "pipeline_root_prefix must be a relative key prefix without leading/trailing '/'."
  }
}

variable "noncurrent_version_expiration_days" {
  description = "Days after which noncurrent object versions are deleted."
  type        = number
  default     = 30

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1
    error_message = "noncurrent_version_expiration_days must be at least 1."
  }
}

variable "db_instance_class" {
  description = "RDS instance class of the Postgres database shared by MLflow (tracking, auth) and Optuna."
  type        = string
  default     = "db.t4g.medium"

  validation {
    condition     = can(regex("^db\\.", var.db_instance_class))
    error_message = "db_instance_class must be an RDS instance class, e.g. db.t4g.medium."
  }
}

variable "db_engine_version" {
  description = "Postgres major version of the RDS instance."
  type        = string
  default     = "17"

  validation {
    condition     = contains(["15", "16", "17"], var.db_engine_version)
    error_message = "db_engine_version must be 15, 16 or 17."
  }
}

variable "db_allocated_storage" {
  description = "Initial RDS storage (GiB); it autoscales up to 5x."
  type        = number
  default     = 50

  validation {
    condition     = var.db_allocated_storage >= 20
    error_message = "db_allocated_storage must be at least 20 GiB."
  }
}

variable "db_multi_az" {
  description = "Run the RDS instance Multi-AZ."
  type        = bool
  default     = true
}

variable "kfp_version" {
  description = "Kubeflow Pipelines standalone manifests tag. Must match the kfp SDK's major.minor (pyproject pins kfp==2.17.3 -> backend 2.17.x)."
  type        = string
  default     = "2.17.1"

  validation {
    condition     = can(regex("^2\\.17\\.[0-9]+$", var.kfp_version))
    error_message = "kfp_version must be a 2.17.x tag: the backend must match the kfp 2.17 SDK pinned in pyproject.toml."
  }
}

variable "mlflow_image" {
  description = "MLflow server image: what docker/build.sh --mlflow builds (mlflow[auth], psycopg2, boto3). Pin by digest."
  type        = string
  default     = "ghcr.io/datadream/datadream-mlflow:3.17.2"

  validation {
    condition     = length(trimspace(var.mlflow_image)) > 0 && !can(regex("\\s", var.mlflow_image))
    error_message = "mlflow_image must be a container image reference."
  }
}

variable "mlflow_extra_allowed_hosts" {
  description = "Extra Host headers the MLflow server accepts (e.g. an ingress hostname), added to the in-cluster service names."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for h in var.mlflow_extra_allowed_hosts : can(regex("^[A-Za-z0-9.*:-]+$", h))])
    error_message = "mlflow_extra_allowed_hosts entries must be host or host:port patterns."
  }
}

variable "hf_token" {
  description = "Hugging Face token put into the datadream-secrets Secret (HF_TOKEN); empty for public models."
  type        = string
  default     = ""
  sensitive   = true
}

variable "serving_deployer_groups" {
  description = "Kubernetes groups allowed to run `datadream registry deploy` (the datadream-deployer Role in the serving namespace)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for g in var.serving_deployer_groups : length(g) > 0])
    error_message = "serving_deployer_groups must not contain empty names."
  }
}

variable "serving_client_namespaces" {
  description = "Namespaces (besides the serving namespace) whose pods may call the classifier servers."
  type        = list(string)
  default     = ["kubeflow"]

  validation {
    condition     = alltrue([for n in var.serving_client_namespaces : can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", n))])
    error_message = "serving_client_namespaces must be Kubernetes namespace names."
  }
}
