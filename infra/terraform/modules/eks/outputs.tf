output "cluster_name" {
  description = "EKS cluster name."
  value       = module.eks.cluster_name
}

output "cluster_endpoint" {
  description = "EKS API endpoint."
  value       = module.eks.cluster_endpoint
}

output "cluster_certificate_authority_data" {
  description = "Base64 CA of the API endpoint."
  value       = module.eks.cluster_certificate_authority_data
}

output "node_security_group_id" {
  description = "Security group shared by the nodes (allowed into RDS)."
  value       = module.eks.node_security_group_id
}

output "gpu_node_label" {
  description = "Label (key, value) of the GPU node groups."
  value       = ["datadream.io/node-pool", "gpu"]
}

output "gpu_taint_key" {
  description = "Taint key of the GPU node groups (effect NoSchedule)."
  value       = "nvidia.com/gpu"
}
