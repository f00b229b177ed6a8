# NVIDIA device plugin: AL2023 NVIDIA AMIs ship the driver but not the device plugin, so without it no
# node advertises nvidia.com/gpu. It runs only on GPU nodes and tolerates their taint.
resource "helm_release" "nvidia_device_plugin" {
  name       = "nvidia-device-plugin"
  namespace  = "kube-system"
  repository = "https://nvidia.github.io/k8s-device-plugin"
  chart      = "nvidia-device-plugin"
  version    = var.nvidia_device_plugin_version

  values = [yamlencode({
    nodeSelector = { (var.gpu_node_label[0]) = var.gpu_node_label[1] }
    tolerations = [
      { key = var.gpu_taint_key, operator = "Exists", effect = "NoSchedule" },
      { key = "CriticalAddonsOnly", operator = "Exists" },
    ]
    priorityClassName = "system-node-critical"
  })]
}

# Cluster Autoscaler: scales the GPU groups from 0 when a GPU task is pending and back to 0 when idle.
# It discovers managed node groups by the k8s.io/cluster-autoscaler/* tags EKS puts on their ASGs and
# reads their labels/taints from the EKS API (eks:DescribeNodegroup) when a group is at zero.
resource "helm_release" "cluster_autoscaler" {
  name       = "cluster-autoscaler"
  namespace  = "kube-system"
  repository = "https://kubernetes.github.io/autoscaler"
  chart      = "cluster-autoscaler"
  version    = var.cluster_autoscaler_chart_version

  values = [yamlencode({
    autoDiscovery = { clusterName = var.cluster_name }
    awsRegion     = var.region
    rbac = {
      serviceAccount = { create = true, name = "cluster-autoscaler" }
    }
    extraArgs = {
      "balance-similar-node-groups"   = true
      "skip-nodes-with-system-pods"   = false
      "scale-down-unneeded-time"      = "10m"
      "scale-down-delay-after-add"    = "10m"
      "expander"                      = "priority,least-waste"
    }
    expanderPriorities = {
      # Prefer spot GPUs (search campaigns tolerate preemption); fall back to on-demand.
      "50" = [".*gpu_spot.*"]
      "10" = [".*"]
    }
    nodeSelector = { "datadream.io/node-pool" = "system" }
  })]
}
