output "url" {
  description = "In-cluster tracking URL."
  value       = "http://${kubernetes_service_v1.mlflow.metadata[0].name}.${var.namespace}.svc.cluster.local:${var.port}"
}

output "admin_username" {
  description = "MLflow admin user."
  value       = local.admin_user
}

output "admin_password" {
  description = "MLflow admin password."
  value       = random_password.admin.result
  sensitive   = true
}

output "admin_secret" {
  description = "Kubernetes Secret holding the server configuration (auth ini)."
  value       = "${var.namespace}/${kubernetes_secret_v1.server.metadata[0].name}"
}

output "optuna_storage_url" {
  description = "SQLAlchemy URL of the Optuna database."
  value       = local.optuna_url
  sensitive   = true
}
