variable "name" {
  description = "Prefix of the database resources."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the database."
  type        = string
}

variable "db_subnet_group_name" {
  description = "RDS subnet group (private database subnets)."
  type        = string
}

variable "allowed_security_group_ids" {
  description = "Security groups allowed to connect on 5432 (the EKS node security group)."
  type        = list(string)
}

variable "instance_class" {
  description = "RDS instance class."
  type        = string
}

variable "engine_version" {
  description = "Postgres major version."
  type        = string
}

variable "allocated_storage" {
  description = "Initial storage (GiB)."
  type        = number
}

variable "multi_az" {
  description = "Multi-AZ deployment."
  type        = bool
}

variable "username" {
  description = "Master user name."
  type        = string
  default     = "datadream"

  validation {
    condition     = can(regex("^[a-z][a-z0-9_]{2,15}$", var.username))
    error_message = "username must be 3-16 lowercase letters, digits or '_', starting with a letter."
  }
}
