# terraform-aws-modules/eks v21 (variable names: name, kubernetes_version, addons, endpoint_public_access, ...).
#
# GPU node groups: the label and taint below are what pipelines/pipeline.py ClusterSettings selects and
# tolerates (gpu_node_selector = datadream.io/node-pool=gpu, gpu_toleration = nvidia.com/gpu NoSchedule,
# operator Exists). tests/test_infra.py compares them.

locals {
  # On-demand GPU group: scale to zero when idle.
  gpu_node_group = {
    ami_type       = "AL2023_x86_64_NVIDIA"
    instance_types = var.gpu_instance_types
    capacity_type  = "ON_DEMAND"
    min_size       = 0
    max_size       = var.gpu_max_size
    desired_size   = 0
    labels = {
      "datadream.io/node-pool" = "gpu"
    }
    taints = {
      gpu = {
        key    = "nvidia.com/gpu"
        value  = "true"
        effect = "NO_SCHEDULE"
      }
    }
    block_device_mappings = {
      xvda = {
        device_name = "/dev/xvda"
        ebs = {
          volume_size           = var.gpu_disk_size_gb
          volume_type           = "gp3"
          encrypted             = true
          delete_on_termination = true
        }
      }
    }
  }

  # Spot GPU group for search campaigns (datadream-tune): same label and taint, so the same tasks land there.
  spot_gpu_node_group = {
    ami_type       = "AL2023_x86_64_NVIDIA"
    instance_types = var.spot_gpu_instance_types
    capacity_type  = "SPOT"
    min_size       = 0
    max_size       = var.spot_gpu_max_size
    desired_size   = 0
    labels = {
      "datadream.io/node-pool" = "gpu"
      "datadream.io/capacity"  = "spot"
    }
    taints = {
      gpu = {
        key    = "nvidia.com/gpu"
        value  = "true"
        effect = "NO_SCHEDULE"
      }
    }
    block_device_mappings = {
      xvda = {
        device_name = "/dev/xvda"
        ebs = {
          volume_size           = var.gpu_disk_size_gb
          volume_type           = "gp3"
          encrypted             = true
          delete_on_termination = true
        }
      }
    }
  }
}

module "eks" {
  # checkov:skip=CKV_TF_1: registry module pinned by version constraint (~> 21.0); registry sources cannot take a commit hash
  source  = "terraform-aws-modules/eks/aws"
  version = "~> 21.0"

  name               = var.name
  kubernetes_version = var.kubernetes_version

  endpoint_public_access       = length(var.endpoint_public_access_cidrs) > 0
  endpoint_public_access_cidrs = var.endpoint_public_access_cidrs
  endpoint_private_access      = true

  enable_cluster_creator_admin_permissions = true
  enabled_log_types                        = ["api", "audit", "authenticator"]

  addons = {
    coredns    = {}
    kube-proxy = {}
    eks-pod-identity-agent = {
      before_compute = true
    }
    vpc-cni = {
      before_compute = true
    }
  }

  vpc_id     = var.vpc_id
  subnet_ids = var.subnet_ids

  eks_managed_node_groups = merge(
    {
      system = {
        ami_type       = "AL2023_x86_64_STANDARD"
        instance_types = var.system_instance_types
        capacity_type  = "ON_DEMAND"
        min_size       = var.system_min_size
        max_size       = var.system_max_size
        desired_size   = var.system_min_size
        labels = {
          "datadream.io/node-pool" = "system"
        }
      }
      gpu = local.gpu_node_group
    },
    var.enable_spot_gpu_group ? { gpu_spot = local.spot_gpu_node_group } : {}
  )
}
