# Root module: wires one module per concern. Names shared with the pipeline code
# (pipelines/pipeline.py ClusterSettings) are set in the modules and checked by tests/test_infra.py.

locals {
  kfp_namespace      = "kubeflow"
  kfp_runner_sa      = "pipeline-runner" # KFP standalone runs every pipeline pod as this ServiceAccount
  kfp_ui_sa          = "ml-pipeline-ui"
  mlflow_namespace   = "mlflow"
  mlflow_sa          = "mlflow"
  mlflow_port        = 5000
  mlflow_service_dns = "mlflow.${local.mlflow_namespace}.svc.cluster.local"
  pipeline_root      = "s3://${module.buckets.pipeline_root_bucket}/${var.pipeline_root_prefix}"
  serving_namespace  = "datadream-serving" # datadream.serving.manifests.DEFAULT_NAMESPACE
}

module "network" {
  source = "./modules/network"

  name     = var.name
  vpc_cidr = var.vpc_cidr
}

module "eks" {
  source = "./modules/eks"

  name                         = var.name
  kubernetes_version           = var.kubernetes_version
  vpc_id                       = module.network.vpc_id
  subnet_ids                   = module.network.private_subnets
  endpoint_public_access_cidrs = var.endpoint_public_access_cidrs
  system_instance_types        = var.system_instance_types
  system_min_size              = var.system_min_size
  system_max_size              = var.system_max_size
  gpu_instance_types           = var.gpu_instance_types
  gpu_max_size                 = var.gpu_max_size
  gpu_disk_size_gb             = var.gpu_disk_size_gb
  enable_spot_gpu_group        = var.enable_spot_gpu_group
  spot_gpu_instance_types      = var.spot_gpu_instance_types
  spot_gpu_max_size            = var.spot_gpu_max_size
}

module "cluster_addons" {
  source = "./modules/cluster-addons"

  cluster_name                 = module.eks.cluster_name
  region                       = var.region
  nvidia_device_plugin_version = var.nvidia_device_plugin_version
  gpu_node_label               = module.eks.gpu_node_label
  gpu_taint_key                = module.eks.gpu_taint_key

  depends_on = [module.iam]
}

module "buckets" {
  source = "./modules/buckets"

  bucket_prefix                      = var.bucket_prefix
  noncurrent_version_expiration_days = var.noncurrent_version_expiration_days
}

module "database" {
  source = "./modules/database"

  name                       = var.name
  vpc_id                     = module.network.vpc_id
  db_subnet_group_name       = module.network.database_subnet_group_name
  allowed_security_group_ids = [module.eks.node_security_group_id]
  instance_class             = var.db_instance_class
  engine_version             = var.db_engine_version
  allocated_storage          = var.db_allocated_storage
  multi_az                   = var.db_multi_az
}

module "iam" {
  source = "./modules/iam"

  name                      = var.name
  cluster_name              = module.eks.cluster_name
  data_bucket_arn           = module.buckets.data_bucket_arn
  pipeline_root_bucket_arn  = module.buckets.pipeline_root_bucket_arn
  pipeline_root_prefix      = var.pipeline_root_prefix
  mlflow_bucket_arn         = module.buckets.mlflow_bucket_arn
  buckets_kms_key_arn       = module.buckets.kms_key_arn
  kfp_namespace             = local.kfp_namespace
  kfp_runner_service_account = local.kfp_runner_sa
  kfp_ui_service_account    = local.kfp_ui_sa
  mlflow_namespace          = local.mlflow_namespace
  mlflow_service_account    = local.mlflow_sa
}

module "kfp" {
  source = "./modules/kfp"

  kfp_version   = var.kfp_version
  namespace     = local.kfp_namespace
  pipeline_root = local.pipeline_root
  region        = var.region

  depends_on = [module.eks, module.cluster_addons]
}

module "mlflow" {
  source = "./modules/mlflow"

  namespace             = local.mlflow_namespace
  service_account       = local.mlflow_sa
  port                  = local.mlflow_port
  image                 = var.mlflow_image
  artifacts_destination = "s3://${module.buckets.mlflow_bucket}/mlflow"
  region                = var.region
  allowed_hosts = concat([
    "${local.mlflow_service_dns}:*", local.mlflow_service_dns,
    "mlflow.${local.mlflow_namespace}:*", "mlflow.${local.mlflow_namespace}",
    "localhost:*", "127.0.0.1:*",
  ], var.mlflow_extra_allowed_hosts)
  db_host                = module.database.address
  db_port                = module.database.port
  db_username            = module.database.username
  db_password            = module.database.password
  client_namespaces      = [local.kfp_namespace, local.serving_namespace]

  depends_on = [module.eks, module.iam]
}

module "config" {
  source = "./modules/config"

  namespace              = local.kfp_namespace
  mlflow_tracking_uri    = "http://${local.mlflow_service_dns}:${local.mlflow_port}"
  region                 = var.region
  cache_dir              = "/tmp/datadream-cache"
  hf_home                = "/tmp/hf-home"
  mlflow_username        = module.mlflow.admin_username
  mlflow_password        = module.mlflow.admin_password
  hf_token               = var.hf_token
  optuna_storage         = module.mlflow.optuna_storage_url

  depends_on = [module.kfp]
}

# The classifier's serving namespace (RBAC, credentials, NetworkPolicy); `datadream registry deploy` applies
# the Deployment/Service/HPA/PDB of the champion version there.
module "serving" {
  source = "./modules/serving"

  namespace                = local.serving_namespace
  service_account          = "datadream-serving"
  config_map               = "datadream-config"
  secret                   = "datadream-secrets"
  port                     = 8080
  mlflow_tracking_uri      = "http://${local.mlflow_service_dns}:${local.mlflow_port}"
  region                   = var.region
  mlflow_username          = module.mlflow.admin_username
  mlflow_password          = module.mlflow.admin_password
  pipeline_namespace       = local.kfp_namespace
  pipeline_service_account = local.kfp_runner_sa
  deployer_groups          = var.serving_deployer_groups
  client_namespaces        = concat([local.serving_namespace], var.serving_client_namespaces)

  depends_on = [module.eks]
}
