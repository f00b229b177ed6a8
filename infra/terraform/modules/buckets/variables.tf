variable "bucket_prefix" {
  description = "Prefix of the bucket names."
  type        = string
}

variable "noncurrent_version_expiration_days" {
  description = "Days before noncurrent versions are deleted."
  type        = number
}
