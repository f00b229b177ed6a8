output "vpc_id" {
  description = "VPC id."
  value       = module.vpc.vpc_id
}

output "private_subnets" {
  description = "Private subnet ids (EKS nodes)."
  value       = module.vpc.private_subnets
}

output "database_subnet_group_name" {
  description = "RDS subnet group."
  value       = module.vpc.database_subnet_group_name
}
