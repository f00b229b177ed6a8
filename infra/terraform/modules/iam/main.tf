# EKS Pod Identity roles (the eks-pod-identity-agent addon is installed by modules/eks):
#   pipeline  (kubeflow/pipeline-runner): read the data bucket; read+write only the pipeline-root prefix.
#   kfp-ui    (kubeflow/ml-pipeline-ui):  read the pipeline-root prefix (artifact previews).
#   mlflow    (mlflow/mlflow):            the only principal that writes the MLflow artifacts bucket.
#   autoscaler (kube-system/cluster-autoscaler): scale the node groups' ASGs.
# Nodes keep IMDSv2 with hop limit 1 (EKS v21 default), so pods cannot fall back to the node role.

locals {
  pod_identity_trust = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "pods.eks.amazonaws.com" }
      Action    = ["sts:AssumeRole", "sts:TagSession"]
    }]
  })
  kms_use = {
    Sid      = "UseBucketKey"
    Effect   = "Allow"
    Action   = ["kms:Decrypt", "kms:GenerateDataKey"]
    Resource = [var.buckets_kms_key_arn]
  }
}

# ---- pipeline pods ----
resource "aws_iam_role" "pipeline" {
  name_prefix        = "${var.name}-pipeline-"
  description        = "Kubeflow pipeline pods: read data, write their pipeline-root prefix"
  assume_role_policy = local.pod_identity_trust
}

resource "aws_iam_role_policy" "pipeline" {
  name = "s3-least-privilege"
  role = aws_iam_role.pipeline.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "ListBuckets"
        Effect   = "Allow"
        Action   = ["s3:ListBucket", "s3:GetBucketLocation"]
        Resource = [var.data_bucket_arn, var.pipeline_root_bucket_arn]
      },
      {
        Sid      = "ReadData"
        Effect   = "Allow"
        Action   = ["s3:GetObject", "s3:GetObjectVersion"]
        Resource = ["${var.data_bucket_arn}/*"]
      },
      {
        Sid      = "ReadWritePipelineRoot"
        Effect   = "Allow"
        Action   = ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
        Resource = ["${var.pipeline_root_bucket_arn}/${var.pipeline_root_prefix}/*"]
      },
      local.kms_use,
    ]
  })
}

resource "aws_eks_pod_identity_association" "pipeline" {
  cluster_name    = var.cluster_name
  namespace       = var.kfp_namespace
  service_account = var.kfp_runner_service_account
  role_arn        = aws_iam_role.pipeline.arn
}

# ---- KFP UI (artifact previews) ----
resource "aws_iam_role" "kfp_ui" {
  name_prefix        = "${var.name}-kfp-ui-"
  description        = "Kubeflow Pipelines UI: read the pipeline root"
  assume_role_policy = local.pod_identity_trust
}

resource "aws_iam_role_policy" "kfp_ui" {
  name = "s3-read-pipeline-root"
  role = aws_iam_role.kfp_ui.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "List"
        Effect   = "Allow"
        Action   = ["s3:ListBucket"]
        Resource = [var.pipeline_root_bucket_arn]
      },
      {
        Sid      = "Read"
        Effect   = "Allow"
        Action   = ["s3:GetObject"]
        Resource = ["${var.pipeline_root_bucket_arn}/${var.pipeline_root_prefix}/*"]
      },
      {
        Sid      = "DecryptBucketKey"
        Effect   = "Allow"
        Action   = ["kms:Decrypt"]
        Resource = [var.buckets_kms_key_arn]
      },
    ]
  })
}

resource "aws_eks_pod_identity_association" "kfp_ui" {
  cluster_name    = var.cluster_name
  namespace       = var.kfp_namespace
  service_account = var.kfp_ui_service_account
  role_arn        = aws_iam_role.kfp_ui.arn
}

# ---- MLflow server (proxied artifacts: clients never touch this bucket) ----
resource "aws_iam_role" "mlflow" {
  name_prefix        = "${var.name}-mlflow-"
  description        = "MLflow tracking server: sole writer of the MLflow artifacts bucket"
  assume_role_policy = local.pod_identity_trust
}

resource "aws_iam_role_policy" "mlflow" {
  name = "s3-mlflow-artifacts"
  role = aws_iam_role.mlflow.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "List"
        Effect   = "Allow"
        Action   = ["s3:ListBucket", "s3:GetBucketLocation"]
        Resource = [var.mlflow_bucket_arn]
      },
      {
        Sid      = "ReadWriteArtifacts"
        Effect   = "Allow"
        Action   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
        Resource = ["${var.mlflow_bucket_arn}/*"]
      },
      local.kms_use,
    ]
  })
}

resource "aws_eks_pod_identity_association" "mlflow" {
  cluster_name    = var.cluster_name
  namespace       = var.mlflow_namespace
  service_account = var.mlflow_service_account
  role_arn        = aws_iam_role.mlflow.arn
}

# ---- Cluster Autoscaler ----
resource "aws_iam_role" "cluster_autoscaler" {
  name_prefix        = "${var.name}-ca-"
  description        = "Cluster Autoscaler: scale this cluster's node groups"
  assume_role_policy = local.pod_identity_trust
}

resource "aws_iam_role_policy" "cluster_autoscaler" {
  # checkov:skip=CKV_AWS_355: the Describe* calls do not support resource-level permissions; the scaling actions are limited by the cluster's ASG tag condition
  name = "autoscaling"
  role = aws_iam_role.cluster_autoscaler.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid    = "Describe"
        Effect = "Allow"
        Action = [
          "autoscaling:DescribeAutoScalingGroups",
          "autoscaling:DescribeAutoScalingInstances",
          "autoscaling:DescribeLaunchConfigurations",
          "autoscaling:DescribeScalingActivities",
          "autoscaling:DescribeTags",
          "ec2:DescribeImages",
          "ec2:DescribeInstanceTypes",
          "ec2:DescribeLaunchTemplateVersions",
          "ec2:GetInstanceTypesFromInstanceRequirements",
          "eks:DescribeNodegroup",
        ]
        Resource = ["*"] # describe calls do not support resource-level permissions
      },
      {
        Sid      = "ScaleOwnGroupsOnly"
        Effect   = "Allow"
        Action   = ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"]
        Resource = ["*"]
        Condition = {
          StringEquals = { "aws:ResourceTag/k8s.io/cluster-autoscaler/${var.cluster_name}" = "owned" }
        }
      },
    ]
  })
}

resource "aws_eks_pod_identity_association" "cluster_autoscaler" {
  cluster_name    = var.cluster_name
  namespace       = "kube-system"
  service_account = "cluster-autoscaler"
  role_arn        = aws_iam_role.cluster_autoscaler.arn
}
