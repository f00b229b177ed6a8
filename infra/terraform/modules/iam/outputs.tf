output "pipeline_role_arn" {
  description = "Role of pipeline pods."
  value       = aws_iam_role.pipeline.arn
}

output "mlflow_role_arn" {
  description = "Role of the MLflow server."
  value       = aws_iam_role.mlflow.arn
}
