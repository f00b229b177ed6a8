variable "cluster_name" {
  description = "EKS cluster name (Cluster Autoscaler auto-discovery)."
  type        = string
}

variable "region" {
  description = "AWS region."
  type        = string
}

variable "nvidia_device_plugin_version" {
  description = "nvidia-device-plugin Helm chart version."
  type        = string
}

variable "cluster_autoscaler_chart_version" {
  description = "cluster-autoscaler Helm chart version."
  type        = string
  default     = "9.46.6"
}

variable "gpu_node_label" {
  description = "GPU node label as [key, value]."
  type        = list(string)

  validation {
    condition     = length(var.gpu_node_label) == 2
    error_message = "gpu_node_label must be [key, value]."
  }
}

variable "gpu_taint_key" {
  description = "Taint key of the GPU nodes."
  type        = string
}
