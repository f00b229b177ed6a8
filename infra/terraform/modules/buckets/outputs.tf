output "data_bucket" {
  description = "Data bucket name."
  value       = aws_s3_bucket.data.id
}

output "data_bucket_arn" {
  description = "Data bucket ARN."
  value       = aws_s3_bucket.data.arn
}

output "pipeline_root_bucket" {
  description = "Pipeline-root bucket name."
  value       = aws_s3_bucket.pipeline_root.id
}

output "pipeline_root_bucket_arn" {
  description = "Pipeline-root bucket ARN."
  value       = aws_s3_bucket.pipeline_root.arn
}

output "mlflow_bucket" {
  description = "MLflow artifacts bucket name."
  value       = aws_s3_bucket.mlflow.id
}

output "mlflow_bucket_arn" {
  description = "MLflow artifacts bucket ARN."
  value       = aws_s3_bucket.mlflow.arn
}

output "kms_key_arn" {
  description = "KMS key encrypting the buckets."
  value       = aws_kms_key.buckets.arn
}
