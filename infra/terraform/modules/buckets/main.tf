# Three buckets: data (datasets, read by pipelines), pipeline root (KFP step artifacts) and MLflow artifacts
# (written by the MLflow server only). Each: SSE-KMS, versioning, public access blocked, TLS-only policy,
# lifecycle rule aborting incomplete multipart uploads.

data "aws_caller_identity" "current" {}

locals {
  buckets = {
    data          = "${var.bucket_prefix}-data"
    pipeline_root = "${var.bucket_prefix}-pipeline-root"
    mlflow        = "${var.bucket_prefix}-mlflow-artifacts"
  }
}

resource "aws_kms_key" "buckets" {
  description             = "SSE-KMS key of the datadream S3 buckets"
  enable_key_rotation     = true
  deletion_window_in_days = 30

  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "AccountAdministers"
      Effect    = "Allow"
      Principal = { AWS = "arn:aws:iam::${data.aws_caller_identity.current.account_id}:root" }
      Action    = "kms:*"
      Resource  = "*"
    }]
  })
}

resource "aws_kms_alias" "buckets" {
  name          = "alias/${var.bucket_prefix}-s3"
  target_key_id = aws_kms_key.buckets.key_id
}

resource "aws_s3_bucket" "data" {
  # checkov:skip=CKV_AWS_18: access is audited with CloudTrail S3 data events (account-wide), not per-bucket server access logs
  # checkov:skip=CKV_AWS_144: single-region stack; versioning protects objects, and pipeline outputs are reproducible from data + code
  # checkov:skip=CKV2_AWS_62: nothing consumes S3 events; KFP and MLflow track their own writes
  bucket = local.buckets.data
}

resource "aws_s3_bucket" "pipeline_root" {
  # checkov:skip=CKV_AWS_18: access is audited with CloudTrail S3 data events (account-wide), not per-bucket server access logs
  # checkov:skip=CKV_AWS_144: single-region stack; versioning protects objects, and pipeline outputs are reproducible from data + code
  # checkov:skip=CKV2_AWS_62: nothing consumes S3 events; KFP and MLflow track their own writes
  bucket = local.buckets.pipeline_root
}

resource "aws_s3_bucket" "mlflow" {
  # checkov:skip=CKV_AWS_18: access is audited with CloudTrail S3 data events (account-wide), not per-bucket server access logs
  # checkov:skip=CKV_AWS_144: single-region stack; versioning protects objects, and pipeline outputs are reproducible from data + code
  # checkov:skip=CKV2_AWS_62: nothing consumes S3 events; KFP and MLflow track their own writes
  bucket = local.buckets.mlflow
}

locals {
  bucket_ids = {
    data          = aws_s3_bucket.data.id
    pipeline_root = aws_s3_bucket.pipeline_root.id
    mlflow        = aws_s3_bucket.mlflow.id
  }
  bucket_arns = {
    data          = aws_s3_bucket.data.arn
    pipeline_root = aws_s3_bucket.pipeline_root.arn
    mlflow        = aws_s3_bucket.mlflow.arn
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data" {
  bucket = aws_s3_bucket.data.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.buckets.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "pipeline_root" {
  bucket = aws_s3_bucket.pipeline_root.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.buckets.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "mlflow" {
  bucket = aws_s3_bucket.mlflow.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.buckets.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_versioning" "data" {
  bucket = aws_s3_bucket.data.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_versioning" "pipeline_root" {
  bucket = aws_s3_bucket.pipeline_root.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_versioning" "mlflow" {
  bucket = aws_s3_bucket.mlflow.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_public_access_block" "data" {
  bucket                  = aws_s3_bucket.data.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_public_access_block" "pipeline_root" {
  bucket                  = aws_s3_bucket.pipeline_root.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_public_access_block" "mlflow" {
  bucket                  = aws_s3_bucket.mlflow.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_lifecycle_configuration" "data" {
  bucket = aws_s3_bucket.data.id

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "pipeline_root" {
  bucket = aws_s3_bucket.pipeline_root.id

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "mlflow" {
  bucket = aws_s3_bucket.mlflow.id

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
  }
}

resource "aws_s3_bucket_ownership_controls" "all" {
  for_each = local.bucket_ids
  bucket   = each.value
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

# Deny plain-HTTP access to every bucket.
resource "aws_s3_bucket_policy" "tls_only" {
  for_each = local.bucket_ids
  bucket   = each.value

  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "DenyInsecureTransport"
      Effect    = "Deny"
      Principal = "*"
      Action    = "s3:*"
      Resource  = [local.bucket_arns[each.key], "${local.bucket_arns[each.key]}/*"]
      Condition = { Bool = { "aws:SecureTransport" = "false" } }
    }]
  })

  depends_on = [
    aws_s3_bucket_public_access_block.data,
    aws_s3_bucket_public_access_block.pipeline_root,
    aws_s3_bucket_public_access_block.mlflow,
  ]
}
