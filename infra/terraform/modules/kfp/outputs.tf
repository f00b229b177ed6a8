output "endpoint" {
  description = "In-cluster KFP UI/API address (ml-pipeline-ui proxies the API)."
  value       = "http://ml-pipeline-ui.${var.namespace}.svc.cluster.local:80"
}

output "version" {
  description = "Installed KFP backend version."
  value       = var.kfp_version
}
