output "address" {
  description = "RDS endpoint host name."
  value       = aws_db_instance.this.address
}

output "port" {
  description = "RDS port."
  value       = aws_db_instance.this.port
}

output "username" {
  description = "Master user name."
  value       = aws_db_instance.this.username
}

output "password_secret_arn" {
  description = "Secrets Manager secret with the master credentials (JSON: username, password, host, port)."
  value       = aws_secretsmanager_secret.master.arn
}

output "password" {
  description = "Master password (the same value as in Secrets Manager), for the in-cluster Secrets."
  value       = random_password.master.result
  sensitive   = true
}
