output "cluster_name" {
  description = "EKS cluster name (aws eks update-kubeconfig --name <this>)."
  value       = module.eks.cluster_name
}

output "kfp_endpoint" {
  description = "Kubeflow Pipelines API/UI inside the cluster; reach it with `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80` and use http://localhost:8080 as --host."
  value       = module.kfp.endpoint
}

output "mlflow_url" {
  description = "MLflow tracking URL inside the cluster (ClusterIP); `kubectl port-forward -n mlflow svc/mlflow 5000:5000` for http://localhost:5000."
  value       = module.mlflow.url
}

output "pipeline_root" {
  description = "S3 pipeline root (kfp-launcher defaultPipelineRoot); pass it to `datadream pipeline upload --pipeline-root`."
  value       = local.pipeline_root
}

output "buckets" {
  description = "The three S3 buckets."
  value = {
    data             = module.buckets.data_bucket
    pipeline_root    = module.buckets.pipeline_root_bucket
    mlflow_artifacts = module.buckets.mlflow_bucket
  }
}

output "database_endpoint" {
  description = "RDS Postgres endpoint (MLflow tracking, MLflow auth, Optuna)."
  value       = module.database.address
}

output "database_password_secret_arn" {
  description = "Secrets Manager secret holding the RDS master password."
  value       = module.database.password_secret_arn
}

output "mlflow_admin_secret" {
  description = "Kubernetes Secret (namespace/name) holding the MLflow admin credentials; rotate them after the first login."
  value       = module.mlflow.admin_secret
}

output "serving_namespace" {
  description = "Namespace of the classifier servers (`datadream registry deploy --namespace`); in-cluster URL http://<name>-classifier.<namespace>.svc.cluster.local/invocations."
  value       = module.serving.namespace
}
