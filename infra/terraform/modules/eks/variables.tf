variable "name" {
  description = "EKS cluster name."
  type        = string
}

variable "kubernetes_version" {
  description = "Kubernetes major.minor."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the cluster."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for the control plane ENIs and the nodes."
  type        = list(string)
}

variable "endpoint_public_access_cidrs" {
  description = "CIDRs allowed on the public API endpoint; empty = private endpoint only."
  type        = list(string)
}

variable "system_instance_types" {
  description = "Instance types of the system node group."
  type        = list(string)
}

variable "system_min_size" {
  description = "Minimum (and desired) system nodes."
  type        = number
}

variable "system_max_size" {
  description = "Maximum system nodes."
  type        = number
}

variable "gpu_instance_types" {
  description = "Instance types of the on-demand GPU group."
  type        = list(string)
}

variable "gpu_max_size" {
  description = "Maximum on-demand GPU nodes (minimum is 0)."
  type        = number
}

variable "gpu_disk_size_gb" {
  description = "Root volume of GPU nodes (GiB)."
  type        = number
}

variable "enable_spot_gpu_group" {
  description = "Create the spot GPU group for search campaigns."
  type        = bool
}

variable "spot_gpu_instance_types" {
  description = "Instance types of the spot GPU group."
  type        = list(string)
}

variable "spot_gpu_max_size" {
  description = "Maximum spot GPU nodes (minimum is 0)."
  type        = number
}
